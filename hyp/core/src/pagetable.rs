//! Translation tables with a 4 KiB granule: one walker for the guest's stage 2 and for the
//! hypervisor's own EL2 stage-1 map. The two differ only in how a leaf descriptor encodes
//! memory type and permissions, which a [`Format`] supplies.
//!
//! Tables live in memory the caller provides through [`TableMemory`]; on the target that is
//! identity-mapped RAM, in host tests a vector. Building a table never needs TLB maintenance:
//! the tables built here are not live yet. Edits of live tables (break-before-make) belong to
//! the stage-2 engine, which drives the barriers and TLBIs through the arch layer.

use core::fmt;

/// Entries per table.
pub const ENTRIES: usize = 512;
/// One translation table.
pub type Table = [u64; ENTRIES];
/// Size of the smallest mapping, and of a table.
pub const PAGE_SIZE: u64 = 4096;

/// Descriptor bit 0: the entry is valid.
pub const VALID: u64 = 1 << 0;
/// Descriptor bit 1: a table (levels 0-2) or a page (level 3), not a block.
pub const TABLE_OR_PAGE: u64 = 1 << 1;
/// Output-address bits of a descriptor (bits 47:12).
pub const ADDRESS_MASK: u64 = 0x0000_FFFF_FFFF_F000;

/// Memory the tables are built in, addressed by table and entry.
///
/// Readers need only `&self`: several CPUs walk the same tables at once (under the attribute
/// manager's shared lock), and so does the hardware walker. Writers need `&mut self`, which the
/// exclusive lock gives. No method hands out a reference into a table: an implementation
/// backed by live table memory reads and writes each entry as a single 64-bit access, and a
/// whole table is read as a copy.
pub trait TableMemory {
    /// Allocates a zeroed, 4 KiB-aligned table and returns its physical address, or `None`
    /// when no memory is left.
    fn allocate(&mut self) -> Option<u64>;
    /// Allocates a table whose every entry the caller writes before any walker can reach it:
    /// its contents are unspecified (skipping the zeroing that [`allocate`](Self::allocate)
    /// does), and reading an entry before writing it is a bug.
    fn allocate_for_overwrite(&mut self) -> Option<u64> {
        self.allocate()
    }
    /// Entry `index` of the table at physical address `table` (one returned by `allocate`).
    fn entry(&self, table: u64, index: usize) -> u64;
    /// Writes entry `index` of the table at physical address `table`.
    fn set_entry(&mut self, table: u64, index: usize, value: u64);
    /// Copies the whole table at `table` into `copy`.
    fn copy_table(&self, table: u64, copy: &mut Table) {
        for (index, entry) in copy.iter_mut().enumerate() {
            *entry = self.entry(table, index);
        }
    }
    /// Returns a table no walker can reach any more (after its TLB invalidation completed).
    fn free(&mut self, pa: u64) {
        let _ = pa;
    }
}

/// What a mapping is: the memory type every access through it gets.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MemoryType {
    /// Normal memory, inner and outer write-back, inner shareable.
    NormalWriteBack,
    /// Normal memory, non-cacheable.
    NormalNonCacheable,
    /// Device-nGnRE memory (MMIO).
    Device,
}

/// Access rights of a mapping. Stage 2 can express every combination of read and write (a
/// device that only writes a DMA buffer gets write-only access); the EL2 regime always allows
/// reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Permissions {
    /// Reads allowed.
    pub read: bool,
    /// Writes allowed.
    pub write: bool,
    /// Instruction fetches allowed.
    pub execute: bool,
}

impl Permissions {
    /// Read, write and execute: guest RAM, the hypervisor's own image.
    pub const RWX: Permissions = Permissions {
        read: true,
        write: true,
        execute: true,
    };
    /// Read and write, never execute: MMIO and data.
    pub const RW: Permissions = Permissions {
        read: true,
        write: true,
        execute: false,
    };
    /// Read only (a device reading a TO_DEVICE buffer).
    pub const RO: Permissions = Permissions {
        read: true,
        write: false,
        execute: false,
    };
    /// Write only (a device filling a FROM_DEVICE buffer).
    pub const WO: Permissions = Permissions {
        read: false,
        write: true,
        execute: false,
    };
}

/// How a translation regime encodes a leaf descriptor.
pub trait Format {
    /// The leaf (block or page) descriptor mapping `pa` at `level`, without the valid and
    /// type bits, which the walker adds.
    fn leaf_attributes(&self, memory: MemoryType, permissions: Permissions) -> u64;
    /// Decodes the memory type and permissions of a leaf descriptor; `None` for an
    /// encoding this format never writes.
    fn decode(&self, descriptor: u64) -> Option<(MemoryType, Permissions)>;
}

/// Why a mapping could not be made.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MapError {
    /// No memory was left for another table.
    OutOfTableMemory,
    /// Part of the range is already mapped; nothing is ever silently replaced.
    AlreadyMapped {
        /// First input address found mapped.
        address: u64,
    },
    /// Input address, output address or size is not 4 KiB-aligned.
    Misaligned,
    /// The range wraps or exceeds the input-address size of the table.
    OutOfRange,
}

impl fmt::Display for MapError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MapError::OutOfTableMemory => write!(f, "out of memory for translation tables"),
            MapError::AlreadyMapped { address } => {
                write!(f, "address {address:#x} is already mapped")
            }
            MapError::Misaligned => write!(f, "range is not 4 KiB-aligned"),
            MapError::OutOfRange => write!(f, "range exceeds the input-address size"),
        }
    }
}

/// Where one input address leads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Translation {
    /// Output address of the input address looked up.
    pub output: u64,
    /// Level of the leaf descriptor (1 = 1 GiB block, 2 = 2 MiB block, 3 = page).
    pub level: usize,
    /// The leaf descriptor itself.
    pub descriptor: u64,
}

/// Number of input-address bits one entry at `level` covers.
pub const fn level_shift(level: usize) -> u32 {
    12 + 9 * (3 - level as u32)
}

/// Bytes one entry at `level` maps.
pub const fn level_size(level: usize) -> u64 {
    1 << level_shift(level)
}

fn index(address: u64, level: usize) -> usize {
    ((address >> level_shift(level)) as usize) & (ENTRIES - 1)
}

/// A translation table tree: its root and the shape of its input-address space.
pub struct PageTable<F: Format> {
    root: u64,
    start_level: usize,
    input_bits: u32,
    format: F,
}

impl<F: Format> PageTable<F> {
    /// Creates an empty tree whose walk starts at `start_level` (0-2) over `input_bits` bits of
    /// input address.
    ///
    /// # Errors
    /// [`MapError::OutOfTableMemory`] when no root table can be allocated.
    pub fn new(
        memory: &mut impl TableMemory,
        format: F,
        start_level: usize,
        input_bits: u32,
    ) -> Result<Self, MapError> {
        debug_assert!(start_level <= 2);
        debug_assert!(input_bits <= level_shift(start_level) + 9);
        let root = memory.allocate().ok_or(MapError::OutOfTableMemory)?;
        Ok(Self {
            root,
            start_level,
            input_bits,
            format,
        })
    }

    /// A tree whose root table already exists: a sub-tree that its owner linked into a larger
    /// map (the hypervisor's alias of guest RAM is one level-1 table of the EL2 map).
    pub fn from_root(root: u64, format: F, start_level: usize, input_bits: u32) -> Self {
        debug_assert!(start_level <= 2 && input_bits <= level_shift(start_level) + 9);
        Self {
            root,
            start_level,
            input_bits,
            format,
        }
    }

    /// Physical address of the root table (for TTBR/VTTBR).
    pub fn root(&self) -> u64 {
        self.root
    }

    /// The descriptor format.
    pub fn format(&self) -> &F {
        &self.format
    }

    /// Maps `[input, input + size)` to `[output, output + size)` with the largest blocks that
    /// alignment allows (1 GiB, 2 MiB, else 4 KiB pages).
    ///
    /// # Errors
    /// A [`MapError`]; on error the mappings made before the failing address stay in place
    /// (the tables are not live yet, so the caller drops the whole tree).
    pub fn map(
        &mut self,
        memory: &mut impl TableMemory,
        input: u64,
        output: u64,
        size: u64,
        memory_type: MemoryType,
        permissions: Permissions,
    ) -> Result<(), MapError> {
        if !input.is_multiple_of(PAGE_SIZE)
            || !output.is_multiple_of(PAGE_SIZE)
            || !size.is_multiple_of(PAGE_SIZE)
        {
            return Err(MapError::Misaligned);
        }
        let end = input.checked_add(size).ok_or(MapError::OutOfRange)?;
        output.checked_add(size).ok_or(MapError::OutOfRange)?;
        if end > 1u64 << self.input_bits
            || output
                .checked_add(size)
                .is_none_or(|e| e > ADDRESS_MASK + PAGE_SIZE)
        {
            return Err(MapError::OutOfRange);
        }
        let attributes = self.format.leaf_attributes(memory_type, permissions);
        let mut at = input;
        while at < end {
            let out = output + (at - input);
            let level = (1..=3)
                .find(|&level| {
                    let block = level_size(level);
                    level >= self.start_level.max(1)
                        && at.is_multiple_of(block)
                        && out.is_multiple_of(block)
                        && end - at >= block
                })
                .unwrap_or(3);
            self.set_leaf(memory, at, out, level, attributes)?;
            at += level_size(level);
        }
        Ok(())
    }

    fn set_leaf(
        &mut self,
        memory: &mut impl TableMemory,
        input: u64,
        output: u64,
        leaf_level: usize,
        attributes: u64,
    ) -> Result<(), MapError> {
        let table = self.table_at(memory, input, leaf_level)?;
        let slot = index(input, leaf_level);
        if memory.entry(table, slot) & VALID != 0 {
            return Err(MapError::AlreadyMapped { address: input });
        }
        let page_bit = if leaf_level == 3 { TABLE_OR_PAGE } else { 0 };
        memory.set_entry(table, slot, output | attributes | page_bit | VALID);
        Ok(())
    }

    /// The leaf descriptor for `output` at `level` (valid and type bits included).
    pub fn leaf_descriptor(
        &self,
        output: u64,
        level: usize,
        memory: MemoryType,
        permissions: Permissions,
    ) -> u64 {
        let page_bit = if level == 3 { TABLE_OR_PAGE } else { 0 };
        output | self.format.leaf_attributes(memory, permissions) | page_bit | VALID
    }

    /// The entry that maps `input` at `level` (a leaf or a table descriptor), as the table's
    /// physical address and the index in it; `None` when the walk stops above `level` (an
    /// invalid entry or a block).
    pub fn slot(
        &self,
        memory: &impl TableMemory,
        input: u64,
        level: usize,
    ) -> Option<(u64, usize)> {
        if input >= 1u64 << self.input_bits || level < self.start_level {
            return None;
        }
        let mut table = self.root;
        for walk in self.start_level..level {
            let entry = memory.entry(table, index(input, walk));
            if entry & VALID == 0 || entry & TABLE_OR_PAGE == 0 {
                return None;
            }
            table = entry & ADDRESS_MASK;
        }
        Some((table, index(input, level)))
    }

    /// Creates the tables down to `level` for `input` (which must not lie under a block) and
    /// returns the physical address of the table at `level`: for the walker's own leaf writes,
    /// and for a caller that manages that table's entries itself (the per-CPU windows).
    ///
    /// # Errors
    /// [`MapError::OutOfTableMemory`], [`MapError::AlreadyMapped`] under a block, or
    /// [`MapError::OutOfRange`].
    pub fn table_at(
        &mut self,
        memory: &mut impl TableMemory,
        input: u64,
        level: usize,
    ) -> Result<u64, MapError> {
        if input >= 1u64 << self.input_bits || level < self.start_level || level > 3 {
            return Err(MapError::OutOfRange);
        }
        let mut table = self.root;
        for walk in self.start_level..level {
            let slot = index(input, walk);
            let entry = memory.entry(table, slot);
            table = if entry & VALID == 0 {
                let next = memory.allocate().ok_or(MapError::OutOfTableMemory)?;
                memory.set_entry(table, slot, next | TABLE_OR_PAGE | VALID);
                next
            } else if entry & TABLE_OR_PAGE == 0 {
                return Err(MapError::AlreadyMapped { address: input });
            } else {
                entry & ADDRESS_MASK
            };
        }
        Ok(table)
    }

    /// Removes the mappings of `[input, input + size)`, which must cover whole leaves (as a
    /// range mapped by one [`Self::map`] call does). Tables are kept. The caller does the TLB
    /// maintenance.
    ///
    /// # Errors
    /// [`MapError::Misaligned`] when a leaf extends outside the range, or
    /// [`MapError::OutOfRange`]; entries before the failing one are already removed.
    pub fn unmap(
        &mut self,
        memory: &mut impl TableMemory,
        input: u64,
        size: u64,
    ) -> Result<(), MapError> {
        let end = input.checked_add(size).ok_or(MapError::OutOfRange)?;
        let mut at = input;
        while at < end {
            let Some(t) = self.translate(memory, at) else {
                at = (at | (PAGE_SIZE - 1)) + 1;
                continue;
            };
            let leaf = level_size(t.level);
            if !at.is_multiple_of(leaf) || end - at < leaf {
                return Err(MapError::Misaligned);
            }
            let (table, index) = self.slot(memory, at, t.level).ok_or(MapError::OutOfRange)?;
            memory.set_entry(table, index, 0);
            at += leaf;
        }
        Ok(())
    }

    /// Rewrites the valid page (level-3) entry of `input` in place with `memory_type` and
    /// `permissions`, keeping its output address: a change of rights of a live mapping, which
    /// needs no break (the caller invalidates the TLBs that may hold the old entry).
    ///
    /// # Errors
    /// [`MapError::OutOfRange`] when `input` is not mapped by a page entry.
    pub fn set_page(
        &mut self,
        memory: &mut impl TableMemory,
        input: u64,
        memory_type: MemoryType,
        permissions: Permissions,
    ) -> Result<(), MapError> {
        let (table, index) = self.slot(memory, input, 3).ok_or(MapError::OutOfRange)?;
        self.rewrite_page_entry(memory, table, index, memory_type, permissions)
    }

    /// Rewrites the valid page entry `index` of level-3 table `table` in place (see
    /// [`Self::set_page`]); [`MapError::OutOfRange`] when it is not valid.
    #[inline]
    fn rewrite_page_entry(
        &self,
        memory: &mut impl TableMemory,
        table: u64,
        index: usize,
        memory_type: MemoryType,
        permissions: Permissions,
    ) -> Result<(), MapError> {
        let entry = memory.entry(table, index);
        if entry & VALID == 0 {
            return Err(MapError::OutOfRange);
        }
        memory.set_entry(
            table,
            index,
            self.leaf_descriptor(entry & ADDRESS_MASK, 3, memory_type, permissions),
        );
        Ok(())
    }

    /// Looks up one input address.
    pub fn translate(&self, memory: &impl TableMemory, input: u64) -> Option<Translation> {
        if input >= 1u64 << self.input_bits {
            return None;
        }
        let mut table = self.root;
        for level in self.start_level..=3 {
            let entry = memory.entry(table, index(input, level));
            if entry & VALID == 0 {
                return None;
            }
            let is_table = level < 3 && entry & TABLE_OR_PAGE != 0;
            if !is_table {
                let offset = input & (level_size(level) - 1);
                return Some(Translation {
                    output: (entry & ADDRESS_MASK & !(level_size(level) - 1)) + offset,
                    level,
                    descriptor: entry,
                });
            }
            table = entry & ADDRESS_MASK;
        }
        None
    }

    /// Calls `visit(input, output, size, descriptor)` for every leaf, in input-address order.
    pub fn for_each_leaf(
        &self,
        memory: &impl TableMemory,
        visit: &mut impl FnMut(u64, u64, u64, u64),
    ) {
        self.walk(memory, self.root, self.start_level, 0, visit);
    }

    /// Calls `visit(pa)` for every table, the root first, each before the tables it points to.
    pub fn for_each_table(&self, memory: &impl TableMemory, visit: &mut impl FnMut(u64)) {
        self.tables_from(memory, self.root, self.start_level, visit);
    }

    fn tables_from(
        &self,
        memory: &impl TableMemory,
        table: u64,
        level: usize,
        visit: &mut impl FnMut(u64),
    ) {
        visit(table);
        if level == 3 {
            return;
        }
        for slot in 0..ENTRIES {
            let entry = memory.entry(table, slot);
            if entry & VALID != 0 && entry & TABLE_OR_PAGE != 0 {
                self.tables_from(memory, entry & ADDRESS_MASK, level + 1, visit);
            }
        }
    }

    fn walk(
        &self,
        memory: &impl TableMemory,
        table: u64,
        level: usize,
        base: u64,
        visit: &mut impl FnMut(u64, u64, u64, u64),
    ) {
        let entries = if level == self.start_level {
            1usize << (self.input_bits - level_shift(level)).min(9)
        } else {
            ENTRIES
        };
        for slot in 0..entries {
            let entry = memory.entry(table, slot);
            if entry & VALID == 0 {
                continue;
            }
            let input = base + (slot as u64) * level_size(level);
            if level < 3 && entry & TABLE_OR_PAGE != 0 {
                self.walk(memory, entry & ADDRESS_MASK, level + 1, input, visit);
            } else {
                visit(input, entry & ADDRESS_MASK, level_size(level), entry);
            }
        }
    }
}

/// Stage-2 descriptors (guest IPA to PA), with or without FEAT_S2FWB.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Stage2 {
    /// HCR_EL2.FWB is set: MemAttr uses the forced-write-back encodings.
    pub fwb: bool,
}

impl Stage2 {
    /// MemAttr[3:0] (descriptor bits 5:2) for a memory type. With FWB, 0b0110 forces
    /// write-back whatever stage 1 says; without it, 0b1111 is Normal WB (and would mean
    /// Device-nGnRnE under FWB, hence two tables).
    pub const fn mem_attr(&self, memory: MemoryType) -> u64 {
        match (memory, self.fwb) {
            (MemoryType::NormalWriteBack, true) => 0b0110,
            (MemoryType::NormalWriteBack, false) => 0b1111,
            (MemoryType::NormalNonCacheable, _) => 0b0101,
            (MemoryType::Device, _) => 0b0001,
        }
    }
}

const S2AP_READ: u64 = 1 << 6;
const S2AP_WRITE: u64 = 1 << 7;
const SH_INNER: u64 = 0b11 << 8;
const ACCESS_FLAG: u64 = 1 << 10;
const S2_XN: u64 = 0b10 << 53;
const EL2_AP_READ_ONLY: u64 = 1 << 7;
const EL2_XN: u64 = 1 << 54;

impl Format for Stage2 {
    fn leaf_attributes(&self, memory: MemoryType, permissions: Permissions) -> u64 {
        let shareability = if memory == MemoryType::Device {
            0
        } else {
            SH_INNER
        };
        let read = if permissions.read { S2AP_READ } else { 0 };
        let write = if permissions.write { S2AP_WRITE } else { 0 };
        let execute = if permissions.execute && memory != MemoryType::Device {
            0
        } else {
            S2_XN
        };
        self.mem_attr(memory) << 2 | read | write | shareability | ACCESS_FLAG | execute
    }

    fn decode(&self, descriptor: u64) -> Option<(MemoryType, Permissions)> {
        let attr = (descriptor >> 2) & 0xf;
        let memory = [
            MemoryType::NormalWriteBack,
            MemoryType::NormalNonCacheable,
            MemoryType::Device,
        ]
        .into_iter()
        .find(|&m| self.mem_attr(m) == attr)?;
        Some((
            memory,
            Permissions {
                read: descriptor & S2AP_READ != 0,
                write: descriptor & S2AP_WRITE != 0,
                execute: descriptor & S2_XN == 0,
            },
        ))
    }
}

/// The hypervisor's own EL2 stage-1 descriptors. MAIR_EL2 must hold [`El2::MAIR`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct El2;

impl El2 {
    /// MAIR_EL2: index 0 Device-nGnRE, 1 Normal WB read/write-allocate, 2 Normal NC.
    pub const MAIR: u64 = 0x04 | 0xff << 8 | 0x44 << 16;

    const fn attr_index(memory: MemoryType) -> u64 {
        match memory {
            MemoryType::Device => 0,
            MemoryType::NormalWriteBack => 1,
            MemoryType::NormalNonCacheable => 2,
        }
    }
}

impl Format for El2 {
    fn leaf_attributes(&self, memory: MemoryType, permissions: Permissions) -> u64 {
        let shareability = if memory == MemoryType::Device {
            0
        } else {
            SH_INNER
        };
        let read_only = if permissions.write {
            0
        } else {
            EL2_AP_READ_ONLY
        };
        let execute = if permissions.execute && memory != MemoryType::Device {
            0
        } else {
            EL2_XN
        };
        Self::attr_index(memory) << 2 | read_only | shareability | ACCESS_FLAG | execute
    }

    fn decode(&self, descriptor: u64) -> Option<(MemoryType, Permissions)> {
        let memory = match (descriptor >> 2) & 0b111 {
            0 => MemoryType::Device,
            1 => MemoryType::NormalWriteBack,
            2 => MemoryType::NormalNonCacheable,
            _ => return None,
        };
        Some((
            memory,
            Permissions {
                read: true,
                write: descriptor & EL2_AP_READ_ONLY == 0,
                execute: descriptor & EL2_XN == 0,
            },
        ))
    }
}

/// A page-granular translation table of a device (a strict device's SMMU stage 2): every leaf is
/// a 4 KiB page, entries are only mapped, unmapped or rewritten in place, and no table is ever
/// freed or replaced once linked. That last property is what makes its leaf cache sound: the
/// level-3 table of the last 2 MiB region written stays the one the walk reaches, so a one-page
/// update of a region just written is a direct store instead of a walk. Nothing else can edit
/// the tree (the [`PageTable`] is private; [`Self::table`] lends it read-only). Should a table
/// ever be freed or replaced (a merge into a block, a teardown), the method doing it must call
/// [`Self::forget_leaf`] first; debug builds check every cache hit against a walk.
pub struct DeviceTable<F: Format> {
    table: PageTable<F>,
    /// `(input >> 21, level-3 table)` of the last region reached, if any.
    leaf: Option<(u64, u64)>,
}

impl<F: Format> DeviceTable<F> {
    /// An empty table (its root allocated).
    ///
    /// # Errors
    /// [`MapError::OutOfTableMemory`].
    pub fn new(
        memory: &mut impl TableMemory,
        format: F,
        start_level: usize,
        input_bits: u32,
    ) -> Result<Self, MapError> {
        Ok(Self {
            table: PageTable::new(memory, format, start_level, input_bits)?,
            leaf: None,
        })
    }

    /// The tree, read-only (walks, the cleaning of every table, the root for the STE).
    pub fn table(&self) -> &PageTable<F> {
        &self.table
    }

    /// Drops the cached leaf table: for any change that could unlink or free a level-3 table.
    pub fn forget_leaf(&mut self) {
        self.leaf = None;
    }

    /// The level-3 table holding `input`'s entry, from the cache when `input` lies in the
    /// region last reached; else walked (and created when `create`), then cached. `None`
    /// when no table holds it and `create` is false.
    #[inline]
    fn leaf_table(
        &mut self,
        memory: &mut impl TableMemory,
        input: u64,
        create: bool,
    ) -> Result<Option<u64>, MapError> {
        if !input.is_multiple_of(PAGE_SIZE) {
            return Err(MapError::Misaligned);
        }
        if input >= 1u64 << self.table.input_bits {
            return Err(MapError::OutOfRange);
        }
        let region = input >> level_shift(2);
        if let Some((cached, table)) = self.leaf {
            if cached == region {
                debug_assert_eq!(
                    self.table.slot(memory, input, 3).map(|(t, _)| t),
                    Some(table),
                    "stale leaf cache"
                );
                return Ok(Some(table));
            }
        }
        let table = if create {
            Some(self.table.table_at(memory, input, 3)?)
        } else {
            self.table.slot(memory, input, 3).map(|(table, _)| table)
        };
        if let Some(table) = table {
            self.leaf = Some((region, table));
        }
        Ok(table)
    }

    /// Maps the page at `input` to `output` (creating tables as needed).
    ///
    /// # Errors
    /// [`MapError::AlreadyMapped`] when the page is mapped (nothing is replaced),
    /// [`MapError::Misaligned`], [`MapError::OutOfRange`], [`MapError::OutOfTableMemory`].
    pub fn map_page(
        &mut self,
        memory: &mut impl TableMemory,
        input: u64,
        output: u64,
        memory_type: MemoryType,
        permissions: Permissions,
    ) -> Result<(), MapError> {
        if !output.is_multiple_of(PAGE_SIZE) {
            return Err(MapError::Misaligned);
        }
        if output > ADDRESS_MASK {
            return Err(MapError::OutOfRange);
        }
        let table = self
            .leaf_table(memory, input, true)?
            .ok_or(MapError::OutOfRange)?;
        let slot = index(input, 3);
        if memory.entry(table, slot) & VALID != 0 {
            return Err(MapError::AlreadyMapped { address: input });
        }
        let descriptor = self
            .table
            .leaf_descriptor(output, 3, memory_type, permissions);
        memory.set_entry(table, slot, descriptor);
        Ok(())
    }

    /// Unmaps the page at `input` (nothing to do when it is not mapped). Tables are kept.
    ///
    /// # Errors
    /// [`MapError::Misaligned`], [`MapError::OutOfRange`].
    pub fn unmap_page(
        &mut self,
        memory: &mut impl TableMemory,
        input: u64,
    ) -> Result<(), MapError> {
        if let Some(table) = self.leaf_table(memory, input, false)? {
            let slot = index(input, 3);
            if memory.entry(table, slot) != 0 {
                memory.set_entry(table, slot, 0);
            }
        }
        Ok(())
    }

    /// Rewrites the mapped page at `input` in place with `memory_type` and `permissions`,
    /// keeping its output address (no break: see [`PageTable::set_page`]).
    ///
    /// # Errors
    /// [`MapError::OutOfRange`] when the page is not mapped; [`MapError::Misaligned`].
    pub fn set_page(
        &mut self,
        memory: &mut impl TableMemory,
        input: u64,
        memory_type: MemoryType,
        permissions: Permissions,
    ) -> Result<(), MapError> {
        let table = self
            .leaf_table(memory, input, false)?
            .ok_or(MapError::OutOfRange)?;
        self.table
            .rewrite_page_entry(memory, table, index(input, 3), memory_type, permissions)
    }
}

/// Table memory backed by a vector, for host tests; physical addresses are fake but aligned.
#[cfg(test)]
pub(crate) mod fake {
    use super::*;
    use alloc::vec::Vec;

    pub struct VecMemory {
        pub tables: Vec<Table>,
        pub limit: usize,
    }

    pub const BASE: u64 = 0x8000_0000;

    impl VecMemory {
        pub fn new(limit: usize) -> Self {
            Self {
                tables: Vec::new(),
                limit,
            }
        }
    }

    impl TableMemory for VecMemory {
        fn allocate(&mut self) -> Option<u64> {
            if self.tables.len() >= self.limit {
                return None;
            }
            self.tables.push([0; ENTRIES]);
            Some(BASE + (self.tables.len() as u64 - 1) * PAGE_SIZE)
        }
        fn allocate_for_overwrite(&mut self) -> Option<u64> {
            // Garbage, valid-looking entries: a caller that forgets one leaves a wrong mapping
            // a test sees, not a hole that happens to be right.
            let table = self.allocate()?;
            for index in 0..ENTRIES {
                self.set_entry(table, index, 0xdead_0000_0000_0003 | (index as u64) << 12);
            }
            Some(table)
        }
        fn entry(&self, table: u64, index: usize) -> u64 {
            self.tables[((table - BASE) / PAGE_SIZE) as usize][index]
        }
        fn set_entry(&mut self, table: u64, index: usize, value: u64) {
            self.tables[((table - BASE) / PAGE_SIZE) as usize][index] = value;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::fake::VecMemory;
    use super::*;
    use alloc::vec::Vec;

    const GIB: u64 = 1 << 30;
    const MIB2: u64 = 2 << 20;

    fn stage2(fwb: bool, memory: &mut VecMemory) -> PageTable<Stage2> {
        PageTable::new(memory, Stage2 { fwb }, 0, 44).unwrap()
    }

    #[test]
    fn aligned_ram_uses_2mib_blocks_and_offsets_output() {
        let mut mem = VecMemory::new(64);
        let mut s2 = stage2(true, &mut mem);
        s2.map(
            &mut mem,
            0x4000_0000,
            0x4400_0000,
            64 << 20,
            MemoryType::NormalWriteBack,
            Permissions::RWX,
        )
        .unwrap();
        let t = s2.translate(&mem, 0x4000_1234).unwrap();
        assert_eq!(t.output, 0x4400_1234);
        assert_eq!(t.level, 2);
        assert_eq!(
            s2.translate(&mem, 0x4400_0000),
            None,
            "end of range is unmapped"
        );
        assert_eq!(s2.translate(&mem, 0x3fff_f000), None);
        let mut leaves = Vec::new();
        s2.for_each_leaf(&mem, &mut |i, o, s, _| leaves.push((i, o, s)));
        assert_eq!(leaves.len(), 32);
        assert!(leaves.iter().all(|&(_, _, s)| s == MIB2));
    }

    #[test]
    fn gib_aligned_ranges_use_1gib_blocks_and_ragged_edges_use_pages() {
        let mut mem = VecMemory::new(64);
        let mut s2 = stage2(false, &mut mem);
        s2.map(
            &mut mem,
            0x80_0000_0000,
            0x80_0000_0000,
            2 * GIB,
            MemoryType::Device,
            Permissions::RW,
        )
        .unwrap();
        assert_eq!(s2.translate(&mem, 0x80_4000_0000).unwrap().level, 1);
        s2.map(
            &mut mem,
            0x0900_0000,
            0x0900_0000,
            0x1000,
            MemoryType::Device,
            Permissions::RW,
        )
        .unwrap();
        assert_eq!(s2.translate(&mem, 0x0900_0fff).unwrap().level, 3);
        s2.map(
            &mut mem,
            0x4000_1000,
            0x5000_1000,
            MIB2 + 0x1000,
            MemoryType::NormalWriteBack,
            Permissions::RWX,
        )
        .unwrap();
        assert_eq!(s2.translate(&mem, 0x4000_1000).unwrap().level, 3);
    }

    #[test]
    fn refuses_overlap_misalignment_and_out_of_range() {
        let mut mem = VecMemory::new(64);
        let mut s2 = stage2(true, &mut mem);
        s2.map(
            &mut mem,
            0x4000_0000,
            0x4000_0000,
            MIB2,
            MemoryType::NormalWriteBack,
            Permissions::RWX,
        )
        .unwrap();
        assert_eq!(
            s2.map(
                &mut mem,
                0x4010_0000,
                0x0,
                0x1000,
                MemoryType::Device,
                Permissions::RW
            ),
            Err(MapError::AlreadyMapped {
                address: 0x4010_0000
            })
        );
        assert_eq!(
            s2.map(
                &mut mem,
                0x123,
                0,
                0x1000,
                MemoryType::Device,
                Permissions::RW
            ),
            Err(MapError::Misaligned)
        );
        assert_eq!(
            s2.map(
                &mut mem,
                (1 << 44) - 0x1000,
                0,
                0x2000,
                MemoryType::Device,
                Permissions::RW
            ),
            Err(MapError::OutOfRange)
        );
        assert_eq!(
            s2.map(
                &mut mem,
                u64::MAX - 0xfff,
                0,
                0x2000,
                MemoryType::Device,
                Permissions::RW
            ),
            Err(MapError::OutOfRange)
        );
    }

    #[test]
    fn set_page_rewrites_rights_in_place_and_only_of_a_mapped_page() {
        let mut mem = VecMemory::new(64);
        let mut s2 = stage2(true, &mut mem);
        let (ipa, pa) = (0x4000_1000, 0x8000_1000);
        s2.map(
            &mut mem,
            ipa,
            pa,
            PAGE_SIZE,
            MemoryType::NormalWriteBack,
            Permissions::RO,
        )
        .unwrap();
        s2.set_page(&mut mem, ipa, MemoryType::NormalWriteBack, Permissions::RW)
            .unwrap();
        let t = s2.translate(&mut mem, ipa + 0x10).unwrap();
        assert_eq!(t.output, pa + 0x10, "the output address is kept");
        assert_eq!(
            Stage2 { fwb: true }.decode(t.descriptor).unwrap(),
            (MemoryType::NormalWriteBack, Permissions::RW)
        );
        assert_eq!(
            s2.set_page(
                &mut mem,
                ipa + PAGE_SIZE,
                MemoryType::NormalWriteBack,
                Permissions::RW
            ),
            Err(MapError::OutOfRange),
            "an unmapped page"
        );
    }

    #[test]
    fn unmap_removes_whole_leaves_only() {
        let mut mem = VecMemory::new(64);
        let mut s2 = stage2(true, &mut mem);
        s2.map(
            &mut mem,
            0x4000_0000,
            0x5000_0000,
            MIB2 + 0x2000,
            MemoryType::NormalWriteBack,
            Permissions::WO,
        )
        .unwrap();
        assert_eq!(
            s2.unmap(&mut mem, 0x4000_0000, 0x1000),
            Err(MapError::Misaligned),
            "inside a block"
        );
        s2.unmap(&mut mem, 0x4000_0000, MIB2 + 0x2000).unwrap();
        assert_eq!(s2.translate(&mem, 0x4000_0000), None);
        assert_eq!(s2.translate(&mem, 0x4020_1000), None);
        s2.map(
            &mut mem,
            0x4000_0000,
            0x5000_0000,
            0x1000,
            MemoryType::NormalWriteBack,
            Permissions::RO,
        )
        .unwrap();
        let d = s2.translate(&mem, 0x4000_0000).unwrap().descriptor;
        assert_eq!(Stage2 { fwb: true }.decode(d).unwrap().1, Permissions::RO);
    }

    #[test]
    fn running_out_of_table_memory_is_an_error() {
        let mut mem = VecMemory::new(2);
        let mut s2 = stage2(true, &mut mem);
        assert_eq!(
            s2.map(&mut mem, 0, 0, 0x1000, MemoryType::Device, Permissions::RW),
            Err(MapError::OutOfTableMemory)
        );
    }

    #[test]
    fn stage2_encodings_differ_with_and_without_fwb() {
        let fwb = Stage2 { fwb: true };
        let plain = Stage2 { fwb: false };
        let wb_fwb = fwb.leaf_attributes(MemoryType::NormalWriteBack, Permissions::RWX);
        let wb = plain.leaf_attributes(MemoryType::NormalWriteBack, Permissions::RWX);
        assert_eq!((wb_fwb >> 2) & 0xf, 0b0110);
        assert_eq!((wb >> 2) & 0xf, 0b1111);
        assert_eq!(
            (plain.leaf_attributes(MemoryType::NormalNonCacheable, Permissions::RWX) >> 2) & 0xf,
            0b0101
        );
        for format in [fwb, plain] {
            for memory in [
                MemoryType::NormalWriteBack,
                MemoryType::NormalNonCacheable,
                MemoryType::Device,
            ] {
                let d = format.leaf_attributes(memory, Permissions::RW);
                assert_eq!(format.decode(d), Some((memory, Permissions::RW)));
                assert_ne!(d & ACCESS_FLAG, 0, "QEMU's SMMU has no hardware AF update");
            }
        }
        let device = plain.leaf_attributes(MemoryType::Device, Permissions::RWX);
        assert_eq!(device & S2_XN, S2_XN, "device memory is never executable");
    }

    #[test]
    fn el2_descriptors_match_mair() {
        assert_eq!((El2::MAIR >> 8) & 0xff, 0xff);
        let d = El2.leaf_attributes(MemoryType::NormalWriteBack, Permissions::RWX);
        assert_eq!(
            El2.decode(d),
            Some((MemoryType::NormalWriteBack, Permissions::RWX))
        );
        let dev = El2.leaf_attributes(MemoryType::Device, Permissions::RW);
        assert_ne!(dev & EL2_XN, 0);
    }

    /// The leaf cache gives exactly what the generic walker gives: the same descriptors for
    /// pages in one region, in another region whose table indices below level 2 are equal, and
    /// back; unmapping and rewriting through the cache reach the right table too.
    #[test]
    fn device_table_leaf_cache_matches_the_walker() {
        let mut mem = VecMemory::new(64);
        let mut cached = DeviceTable::new(&mut mem, Stage2 { fwb: true }, 0, 44).unwrap();
        let mut reference = stage2(true, &mut mem);
        // Regions 1 GiB apart share every index below level 1: a cache keyed too loosely
        // would write the second into the first one's table.
        let pages = [
            0x4000_0000u64,
            0x4000_1000,
            0x8000_0000,
            0x4000_2000,
            0x8000_1000,
            0x4020_0000,
        ];
        for (i, &ipa) in pages.iter().enumerate() {
            let (pa, rights) = (0x9_0000_0000 + i as u64 * PAGE_SIZE, Permissions::RO);
            cached
                .map_page(&mut mem, ipa, pa, MemoryType::NormalWriteBack, rights)
                .unwrap();
            reference
                .map(
                    &mut mem,
                    ipa,
                    pa,
                    PAGE_SIZE,
                    MemoryType::NormalWriteBack,
                    rights,
                )
                .unwrap();
        }
        let same =
            |mem: &VecMemory, cached: &DeviceTable<Stage2>, reference: &PageTable<Stage2>| {
                for &ipa in &pages {
                    assert_eq!(
                        cached.table().translate(mem, ipa),
                        reference.translate(mem, ipa),
                        "{ipa:#x}"
                    );
                }
            };
        same(&mem, &cached, &reference);
        assert_eq!(
            cached.map_page(
                &mut mem,
                0x4000_1000,
                0,
                MemoryType::NormalWriteBack,
                Permissions::RW
            ),
            Err(MapError::AlreadyMapped {
                address: 0x4000_1000
            })
        );
        for &ipa in &pages[1..3] {
            cached
                .set_page(
                    &mut mem,
                    ipa,
                    MemoryType::NormalNonCacheable,
                    Permissions::RW,
                )
                .unwrap();
            reference
                .set_page(
                    &mut mem,
                    ipa,
                    MemoryType::NormalNonCacheable,
                    Permissions::RW,
                )
                .unwrap();
        }
        same(&mem, &cached, &reference);
        for &ipa in &pages[3..] {
            cached.unmap_page(&mut mem, ipa).unwrap();
            reference.unmap(&mut mem, ipa, PAGE_SIZE).unwrap();
        }
        same(&mem, &cached, &reference);
        assert_eq!(cached.table().translate(&mem, 0x8000_1000), None);
        // Unmapping a page of a region without a table creates nothing; rewriting one fails.
        let tables = mem.tables.len();
        cached.unmap_page(&mut mem, 0x1_0000_0000).unwrap();
        assert_eq!(
            cached.set_page(
                &mut mem,
                0x1_0000_0000,
                MemoryType::NormalWriteBack,
                Permissions::RW
            ),
            Err(MapError::OutOfRange)
        );
        assert_eq!(mem.tables.len(), tables);
        // Hostile addresses.
        assert_eq!(
            cached.unmap_page(&mut mem, 0x4000_0010),
            Err(MapError::Misaligned)
        );
        assert_eq!(
            cached.unmap_page(&mut mem, 1 << 44),
            Err(MapError::OutOfRange)
        );
        assert_eq!(
            cached.map_page(
                &mut mem,
                0x4000_3000,
                1 << 48,
                MemoryType::NormalWriteBack,
                Permissions::RW
            ),
            Err(MapError::OutOfRange)
        );
    }

    /// A cached leaf table that the tree no longer reaches is never used: after a (test-only)
    /// unlink of the region's table, `forget_leaf` sends the next update through a walk, which
    /// builds a new table. Without the forget, debug builds stop at the stale hit.
    #[test]
    fn device_table_forgotten_leaf_is_walked_again() {
        let mut mem = VecMemory::new(64);
        let mut cached = DeviceTable::new(&mut mem, Stage2 { fwb: true }, 0, 44).unwrap();
        let rights = Permissions::RW;
        cached
            .map_page(
                &mut mem,
                0x4000_0000,
                0x4000_0000,
                MemoryType::NormalWriteBack,
                rights,
            )
            .unwrap();
        let (level2, slot) = cached.table().slot(&mem, 0x4000_0000, 2).unwrap();
        let old_leaf = mem.entry(level2, slot) & ADDRESS_MASK;
        // What a merge or teardown would do: unlink the level-3 table.
        mem.set_entry(level2, slot, 0);
        cached.forget_leaf();
        cached
            .map_page(
                &mut mem,
                0x4000_1000,
                0x4000_1000,
                MemoryType::NormalWriteBack,
                rights,
            )
            .unwrap();
        let new_leaf = mem.entry(level2, slot) & ADDRESS_MASK;
        assert_ne!(new_leaf, old_leaf);
        assert_eq!(cached.table().translate(&mem, 0x4000_0000), None);
        assert_eq!(
            cached
                .table()
                .translate(&mem, 0x4000_1000)
                .map(|t| t.output),
            Some(0x4000_1000)
        );
    }

    #[test]
    #[should_panic(expected = "stale leaf cache")]
    fn device_table_stale_leaf_is_caught_in_debug_builds() {
        let mut mem = VecMemory::new(64);
        let mut cached = DeviceTable::new(&mut mem, Stage2 { fwb: true }, 0, 44).unwrap();
        let rights = Permissions::RW;
        cached
            .map_page(
                &mut mem,
                0x4000_0000,
                0x4000_0000,
                MemoryType::NormalWriteBack,
                rights,
            )
            .unwrap();
        let (level2, slot) = cached.table().slot(&mem, 0x4000_0000, 2).unwrap();
        mem.set_entry(level2, slot, 0);
        let _ = cached.map_page(
            &mut mem,
            0x4000_1000,
            0x4000_1000,
            MemoryType::NormalWriteBack,
            rights,
        );
    }
}
