//! The attribute manager: the ledger (one entry per 4 KiB page of guest RAM: attribute and pin
//! count) and the engine that changes the guest's live stage 2 by the rules of invariants I1
//! and I2. It is portable: translation tables come through [`TableMemory`], instructions
//! through [`Arch`], and the hypervisor's access to guest pages through its alias of guest RAM
//! ([`HypAlias`]), whose memory types this engine keeps equal to stage 2's.
//!
//! A change of one run of pages inside one 2 MiB region, write-back to non-cacheable:
//! 1. check every page (pinned: BUSY) before touching anything;
//! 2. break the guest's entries (a block is split first if the range cuts it, with the pages to
//!    change already invalid in the new table), DSB, TLBI IPAS2E1IS per entry then TLBI
//!    VMALLE1IS for the combined entries (or one TLBI VMALLS12E1IS above a threshold), DSB:
//!    from here the guest cannot allocate a line for these pages;
//! 3. clean and invalidate through the hypervisor's alias, still write-back, DSB; change the
//!    alias to non-cacheable (break, TLBI VAE2IS, DSB, make); clean and invalidate again
//!    through it, which drops any line the write-back alias let the CPU allocate
//!    speculatively after the first pass;
//! 4. make the new entries, DSB; merge the 2 MiB region back into one block if all its pages
//!    now agree.
//!
//! Non-cacheable to write-back is the same with one pass in step 3 (invalidate again through
//! the alias while it is still non-cacheable), then the alias changed to write-back.

use crate::alias::{AliasPlace, HypAlias};
use crate::layout::GuestRam;
use crate::maintenance::{Arch, CacheOp, TableWrite};
use crate::pagetable::{
    level_size, MapError, MemoryType, PageTable, Permissions, Stage2, TableMemory, ADDRESS_MASK,
    PAGE_SIZE, TABLE_OR_PAGE, VALID,
};
use alloc::vec;
use alloc::vec::Vec;
use stagehand_abi::{attr, Status};

/// Bytes of work one call does at most (FEATURES x3): one 2 MiB block of attribute change, or
/// 2 MiB of cache maintenance.
pub const WORK_BUDGET: u64 = 2 << 20;
/// Above this many pages changed at once, stage-2 TLB maintenance is one TLBI VMALLS12E1IS.
pub const STAGE2_TLBI_THRESHOLD: u64 = 16;
/// Bytes of a level-2 block: the most one MEM_SET_ATTR call changes.
pub const BLOCK: u64 = 2 << 20;
const PAGES_PER_BLOCK: usize = 512;

/// A page's stage-2 memory attribute.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Attribute {
    /// Normal write-back (the default).
    WriteBack,
    /// Normal non-cacheable.
    NonCacheable,
}

impl Attribute {
    /// Decodes the ABI value (MEM_SET_ATTR x3).
    pub fn from_abi(value: u64) -> Option<Self> {
        match value {
            attr::NORMAL_WB => Some(Attribute::WriteBack),
            attr::NORMAL_NC => Some(Attribute::NonCacheable),
            _ => None,
        }
    }

    /// The ABI value.
    pub fn abi(self) -> u64 {
        match self {
            Attribute::WriteBack => attr::NORMAL_WB,
            Attribute::NonCacheable => attr::NORMAL_NC,
        }
    }

    fn memory_type(self) -> MemoryType {
        match self {
            Attribute::WriteBack => MemoryType::NormalWriteBack,
            Attribute::NonCacheable => MemoryType::NormalNonCacheable,
        }
    }
}

/// One page of the ledger.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Page {
    non_cacheable: bool,
    pins: u16,
}

/// Counts over the pages of one 2 MiB region, kept with the ledger so that whether the region
/// may be one block is known without reading its 512 pages.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct RegionCounts {
    /// Pages that are non-cacheable.
    non_cacheable: u16,
    /// Pages with at least one pin.
    pinned: u16,
    /// Known to be mapped by a table of pages: set when a pin finds or makes it so, cleared
    /// when a merge makes it one block again (the only change that makes a block of a split
    /// region). A pin of a page in a region known split skips the walk that looks for a block.
    split: bool,
}

/// What MEM_GET_ATTR reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PageInfo {
    /// The stage-2 attribute.
    pub attribute: Attribute,
    /// DMA mappings holding the page.
    pub pins: u16,
    /// Mapped by a 2 MiB block (else by a 4 KiB page).
    pub block_mapped: bool,
}

/// TLB maintenance a change used.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum TlbiScope {
    /// None (nothing was broken).
    #[default]
    None,
    /// Per IPA, then stage 1 of the VMID.
    ByIpa,
    /// One invalidation of the whole VMID.
    Vmid,
}

/// The maintenance one call performed, for its audit record.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Maintenance {
    /// Pages whose attribute changed.
    pub pages: u64,
    /// Bytes cleaned and/or invalidated (each pass counted).
    pub cmo_bytes: u64,
    /// Stage-2 TLB maintenance scope.
    pub tlbi: TlbiScope,
    /// TLBI instructions issued (stage 2 and the EL2 alias).
    pub tlbi_count: u32,
    /// A 2 MiB block was split.
    pub split: bool,
    /// A 2 MiB region was merged back into a block.
    pub merged: bool,
}

/// How far a range call got.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Progress {
    /// Bytes done by this call, from the start of the range it was given.
    pub done: u64,
    /// The whole range is done (else: INCOMPLETE, call again from `start + done`).
    pub complete: bool,
    /// What it took.
    pub maintenance: Maintenance,
}

/// Who asks for a cache operation, which decides whether an INVALIDATE may discard data.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Requester {
    /// The guest (CACHE_OP, CACHE_OP_BATCH): an INVALIDATE on a page it does not own alone
    /// (pinned for a device's DMA) is widened to CLEAN_INVALIDATE.
    Guest,
    /// The hypervisor's DMA path, which invalidates exactly where the DMA rules require it
    /// (before a device writes, after it lost access): never widened.
    Dma,
}

/// How far a cache operation got.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CacheProgress {
    /// Bytes done by this call.
    pub done: u64,
    /// The whole range is done.
    pub complete: bool,
    /// An INVALIDATE was widened to CLEAN_INVALIDATE (a page is not the caller's alone).
    pub widened: bool,
}

/// Counts TLBIs issued through it.
struct Counting<'a, A: Arch> {
    arch: &'a mut A,
    tlbis: u32,
}

impl<A: Arch> Arch for Counting<'_, A> {
    fn line_size(&self) -> u64 {
        self.arch.line_size()
    }
    fn dcache_range(&mut self, op: CacheOp, va: u64, len: u64) {
        self.arch.dcache_range(op, va, len)
    }
    fn dsb_ish(&mut self) {
        self.arch.dsb_ish()
    }
    fn dsb_ishst(&mut self) {
        self.arch.dsb_ishst()
    }
    fn dsb_sy(&mut self) {
        self.arch.dsb_sy()
    }
    fn isb(&mut self) {
        self.arch.isb()
    }
    fn tlbi_ipas2e1is(&mut self, ipa: u64) {
        self.tlbis += 1;
        self.arch.tlbi_ipas2e1is(ipa)
    }
    fn tlbi_vmalle1is(&mut self) {
        self.tlbis += 1;
        self.arch.tlbi_vmalle1is()
    }
    fn tlbi_vmalls12e1is(&mut self) {
        self.tlbis += 1;
        self.arch.tlbi_vmalls12e1is()
    }
    fn tlbi_vae2is(&mut self, va: u64) {
        self.tlbis += 1;
        self.arch.tlbi_vae2is(va)
    }
    fn tlbi_alle2is(&mut self) {
        self.tlbis += 1;
        self.arch.tlbi_alle2is()
    }
    fn device_tlbi(&mut self, ipa: u64, size: u64) {
        self.arch.device_tlbi(ipa, size)
    }
    fn table_write(&mut self, write: TableWrite) {
        self.arch.table_write(write)
    }
}

/// The guest's stage 2 and its ledger.
pub struct AttributeManager {
    stage2: PageTable<Stage2>,
    ram: GuestRam,
    mmio: Vec<(u64, u64)>,
    pages: Vec<Page>,
    /// [`RegionCounts`] per 2 MiB region of guest RAM, the first one holding `ram.ipa`.
    regions: Vec<RegionCounts>,
    /// A walker that does not snoop the CPU caches reads these tables (a device sharing the
    /// guest's stage 2 behind a non-coherent SMMU): every entry written is cleaned to the point
    /// of coherency, and barriers are DSB SY, before that walker may read it.
    noncoherent_walker: bool,
    /// The hypervisor's alias of guest RAM, whose memory types mirror stage 2's.
    alias: HypAlias,
}

impl AttributeManager {
    /// Builds stage 2 with all of guest RAM write-back (2 MiB blocks where aligned), and the
    /// hypervisor's alias of it, write-back too, in the EL2 table of `alias`; the caller adds
    /// MMIO through [`Self::map_mmio`], and issues DSB ISHST and ISB before the alias is used.
    ///
    /// # Errors
    /// A [`MapError`] if tables run out.
    pub fn new(
        memory: &mut impl TableMemory,
        fwb: bool,
        ram: GuestRam,
        geometry: &crate::geometry::Geometry,
        alias: AliasPlace,
    ) -> Result<Self, MapError> {
        let mut stage2 = PageTable::new(
            memory,
            Stage2 { fwb },
            geometry.start_level,
            geometry.ipa_bits,
        )?;
        stage2.map(
            memory,
            ram.ipa,
            ram.pa,
            ram.size,
            MemoryType::NormalWriteBack,
            Permissions::RWX,
        )?;
        let alias = HypAlias::new(memory, alias, &ram)?;
        let pages = vec![Page::default(); (ram.size / PAGE_SIZE) as usize];
        let regions = (ram.ipa_end().div_ceil(BLOCK) - ram.ipa / BLOCK) as usize;
        Ok(Self {
            stage2,
            ram,
            mmio: Vec::new(),
            pages,
            regions: vec![RegionCounts::default(); regions],
            noncoherent_walker: false,
            alias,
        })
    }

    /// From now on a walker that does not snoop the CPU caches reads the tables (a shared
    /// device behind a non-coherent SMMU): cleans every table written so far to the point of
    /// coherency, and makes every later edit clean the entries it writes before the barrier
    /// and TLB invalidation (device TLBI included) that follow them.
    pub fn set_noncoherent_walker(&mut self, memory: &impl TableMemory, arch: &mut impl Arch) {
        self.noncoherent_walker = true;
        crate::noncoherent::clean_all_tables(&self.stage2, memory, arch);
    }

    /// Cleans the line holding entry `index` of `table` for a non-coherent walker.
    fn clean_entry(&self, arch: &mut impl Arch, table: u64, index: usize) {
        if self.noncoherent_walker {
            let line = arch.line_size();
            let address = table + index as u64 * 8;
            arch.dcache_range(CacheOp::Clean, address & !(line - 1), line);
        }
    }

    /// Cleans a whole table for a non-coherent walker (one about to be linked in).
    fn clean_table(&self, arch: &mut impl Arch, table: u64) {
        if self.noncoherent_walker {
            arch.dcache_range(CacheOp::Clean, table, PAGE_SIZE);
        }
    }

    /// The barrier after breaking entries, before TLB invalidation: DSB ISH, or DSB SY when a
    /// non-coherent walker must see the cleaned entries.
    fn complete_writes(&self, arch: &mut impl Arch) {
        if self.noncoherent_walker {
            arch.dsb_sy();
        } else {
            arch.dsb_ish();
        }
    }

    /// The barrier after making entries: DSB ISHST, or DSB SY for a non-coherent walker.
    fn complete_stores(&self, arch: &mut impl Arch) {
        if self.noncoherent_walker {
            arch.dsb_sy();
        } else {
            arch.dsb_ishst();
        }
    }

    /// Identity-maps an MMIO range for the guest (Device, never executable). Memory calls on it
    /// answer DENIED.
    ///
    /// # Errors
    /// A [`MapError`].
    pub fn map_mmio(
        &mut self,
        memory: &mut impl TableMemory,
        base: u64,
        size: u64,
    ) -> Result<(), MapError> {
        self.mmio.push((base, size));
        self.stage2.map(
            memory,
            base,
            base,
            size,
            MemoryType::Device,
            Permissions::RW,
        )
    }

    /// Records `[base, base + size)` as guest MMIO that is deliberately left unmapped (trapped
    /// and emulated), so memory calls on it answer DENIED too.
    pub fn note_trapped_mmio(&mut self, base: u64, size: u64) {
        self.mmio.push((base, size));
    }

    /// Physical address of the stage-2 root (for VTTBR_EL2).
    pub fn root(&self) -> u64 {
        self.stage2.root()
    }

    /// Guest RAM.
    pub fn ram(&self) -> &GuestRam {
        &self.ram
    }

    /// Whether stage 2 uses FWB encodings.
    pub fn fwb(&self) -> bool {
        self.stage2.format().fwb
    }

    /// Whether `ipa` is guest RAM (a stage-2 fault there is a transient break, to retry).
    pub fn is_ram(&self, ipa: u64) -> bool {
        self.ram.pa_of(ipa, 1).is_some()
    }

    /// Checks that `[start, start + size)` is guest RAM.
    ///
    /// # Errors
    /// DENIED if it touches the guest's MMIO, OUT_OF_RANGE otherwise (beyond RAM, wrapping,
    /// hypervisor or unassigned addresses).
    pub fn check(&self, start: u64, size: u64) -> Result<(), Status> {
        self.check_range(start, size)
    }

    /// The status for a range that is not all guest RAM: DENIED if it touches the guest's MMIO,
    /// OUT_OF_RANGE otherwise (beyond RAM, wrapping, hypervisor or unassigned addresses).
    fn check_range(&self, start: u64, size: u64) -> Result<(), Status> {
        let Some(end) = start.checked_add(size) else {
            return Err(Status::OutOfRange);
        };
        if self.ram.pa_of(start, size).is_some() {
            return Ok(());
        }
        let touches_mmio = self
            .mmio
            .iter()
            .any(|&(base, len)| start < base + len && base < end);
        Err(if touches_mmio {
            Status::Denied
        } else {
            Status::OutOfRange
        })
    }

    fn page_index(&self, ipa: u64) -> usize {
        ((ipa - self.ram.ipa) / PAGE_SIZE) as usize
    }

    /// The counts of the 2 MiB region holding `ipa` (guest RAM).
    #[inline]
    fn region_counts(&mut self, ipa: u64) -> &mut RegionCounts {
        &mut self.regions[(ipa / BLOCK - self.ram.ipa / BLOCK) as usize]
    }

    /// MEM_GET_ATTR.
    ///
    /// # Errors
    /// OUT_OF_RANGE or DENIED for an address that is not guest RAM.
    pub fn get(&self, memory: &impl TableMemory, ipa: u64) -> Result<PageInfo, Status> {
        self.check_range(ipa, 1)?;
        let page = self.pages[self.page_index(ipa)];
        let block_mapped = self
            .stage2
            .translate(memory, ipa)
            .is_some_and(|t| t.level == 2);
        Ok(PageInfo {
            attribute: if page.non_cacheable {
                Attribute::NonCacheable
            } else {
                Attribute::WriteBack
            },
            pins: page.pins,
            block_mapped,
        })
    }

    /// MEM_SET_ATTR: changes the attribute of `[ipa, ipa + size)`, at most one 2 MiB region
    /// (and [`WORK_BUDGET`] bytes) per call.
    ///
    /// # Errors
    /// INVALID_PARAMETER (zero size), ALIGNMENT, OUT_OF_RANGE, DENIED (MMIO), BUSY (a pinned
    /// page in this call's chunk), NO_MEMORY (no table for a split). Nothing changes on error.
    pub fn set_attribute(
        &mut self,
        memory: &mut impl TableMemory,
        arch: &mut impl Arch,
        ipa: u64,
        size: u64,
        attribute: Attribute,
    ) -> Result<Progress, Status> {
        if size == 0 {
            return Err(Status::InvalidParameter);
        }
        if !ipa.is_multiple_of(PAGE_SIZE) || !size.is_multiple_of(PAGE_SIZE) {
            return Err(Status::Alignment);
        }
        self.check_range(ipa, size)?;
        let end = ipa + size;
        let chunk_end = end.min((ipa & !(BLOCK - 1)) + BLOCK).min(ipa + WORK_BUDGET);
        let first = self.page_index(ipa);
        let count = ((chunk_end - ipa) / PAGE_SIZE) as usize;
        let target_nc = attribute == Attribute::NonCacheable;

        // Check all, then set all.
        if self.pages[first..first + count].iter().any(|p| p.pins > 0) {
            return Err(Status::Busy);
        }
        let changing: Vec<bool> = self.pages[first..first + count]
            .iter()
            .map(|p| p.non_cacheable != target_nc)
            .collect();
        let mut counting = Counting { arch, tlbis: 0 };
        let mut maintenance = Maintenance::default();
        if changing.iter().any(|&c| c) {
            self.change(
                memory,
                &mut counting,
                ipa,
                &changing,
                attribute,
                &mut maintenance,
            )?;
            for (page, &c) in self.pages[first..first + count].iter_mut().zip(&changing) {
                if c {
                    page.non_cacheable = target_nc;
                }
            }
            // The chunk lies in one 2 MiB region.
            let changed = changing.iter().filter(|&&c| c).count() as u16;
            let counts = self.region_counts(ipa);
            if target_nc {
                counts.non_cacheable += changed;
            } else {
                counts.non_cacheable -= changed;
            }
            let region = ipa & !(BLOCK - 1);
            maintenance.merged = self.merge_if_uniform(memory, &mut counting, region, attribute);
        }
        maintenance.tlbi_count = counting.tlbis;
        Ok(Progress {
            done: chunk_end - ipa,
            complete: chunk_end == end,
            maintenance,
        })
    }

    /// Steps 2-4 for the pages of one 2 MiB region starting at `ipa` whose `changing` flag is set.
    #[allow(clippy::too_many_arguments)]
    fn change(
        &mut self,
        memory: &mut impl TableMemory,
        arch: &mut impl Arch,
        ipa: u64,
        changing: &[bool],
        attribute: Attribute,
        maintenance: &mut Maintenance,
    ) -> Result<(), Status> {
        let region = ipa & !(BLOCK - 1);
        let whole_region =
            ipa == region && changing.len() == PAGES_PER_BLOCK && changing.iter().all(|&c| c);
        let is_block = self
            .stage2
            .translate(memory, region)
            .is_some_and(|t| t.level == 2);
        let changed = changing.iter().filter(|&&c| c).count() as u64;
        maintenance.pages = changed;
        // The alias's split table, if it needs one, is allocated before anything is broken.
        let alias_change = self
            .alias
            .prepare(memory, ipa, changing)
            .map_err(|_| Status::NoMemory)?;

        // Step 2: break.
        if is_block && whole_region {
            if let Err(status) = self.break_block(memory, arch, region) {
                HypAlias::abandon(memory, alias_change);
                return Err(status);
            }
            maintenance.tlbi = TlbiScope::ByIpa;
        } else if is_block {
            // Split, with the pages to change already invalid in the new table.
            let first_in_region = ((ipa - region) / PAGE_SIZE) as usize;
            if let Err(status) = self.split_block(memory, arch, region, first_in_region, changing) {
                HypAlias::abandon(memory, alias_change);
                return Err(status);
            }
            maintenance.split = true;
            maintenance.tlbi = TlbiScope::ByIpa;
        } else {
            for (i, _) in changing.iter().enumerate().filter(|(_, &c)| c) {
                let page_ipa = ipa + i as u64 * PAGE_SIZE;
                let (table, index) = self
                    .stage2
                    .slot(memory, page_ipa, 3)
                    .ok_or(Status::InvalidParameter)?;
                memory.set_entry(table, index, 0);
                arch.table_write(TableWrite::Break {
                    ipa: page_ipa,
                    level: 3,
                });
                self.clean_entry(arch, table, index);
            }
            self.complete_writes(arch);
            if changed > STAGE2_TLBI_THRESHOLD {
                arch.tlbi_vmalls12e1is();
                maintenance.tlbi = TlbiScope::Vmid;
            } else {
                for (i, _) in changing.iter().enumerate().filter(|(_, &c)| c) {
                    arch.tlbi_ipas2e1is(ipa + i as u64 * PAGE_SIZE);
                }
                arch.dsb_ish();
                arch.tlbi_vmalle1is();
                maintenance.tlbi = TlbiScope::ByIpa;
            }
            arch.dsb_ish();
            let first = changing.iter().position(|&c| c).unwrap_or(0) as u64;
            let last = changing.iter().rposition(|&c| c).unwrap_or(0) as u64;
            arch.device_tlbi(ipa + first * PAGE_SIZE, (last + 1 - first) * PAGE_SIZE);
        }

        // Step 3: maintenance through the alias, run by run of changing pages, and the
        // alias's own change. To NC: clean+invalidate through the alias while it is still
        // write-back (I2), make the alias NC, then again through it, which drops the lines the
        // write-back alias may have let the CPU allocate speculatively in between; from then no
        // cacheable mapping of the pages is left anywhere (I1). To WB: invalidate through the
        // alias while it is still NC (no cacheable alias exists yet), then make it WB.
        let non_cacheable = attribute == Attribute::NonCacheable;
        let passes = if non_cacheable { 2 } else { 1 };
        self.clean_invalidate_runs(arch, ipa, changing);
        self.alias.change(
            memory,
            arch,
            &self.ram,
            alias_change,
            changing,
            non_cacheable,
        );
        if non_cacheable {
            self.clean_invalidate_runs(arch, ipa, changing);
        }
        maintenance.cmo_bytes += passes * changed * PAGE_SIZE;

        // Step 4: make.
        if is_block && whole_region {
            let pa = self.ram.pa + (region - self.ram.ipa);
            let (table, index) = self
                .stage2
                .slot(memory, region, 2)
                .ok_or(Status::InvalidParameter)?;
            memory.set_entry(
                table,
                index,
                self.stage2
                    .leaf_descriptor(pa, 2, attribute.memory_type(), Permissions::RWX),
            );
            arch.table_write(TableWrite::Make {
                ipa: region,
                level: 2,
                non_cacheable: attribute == Attribute::NonCacheable,
            });
            self.clean_entry(arch, table, index);
        } else {
            for (i, _) in changing.iter().enumerate().filter(|(_, &c)| c) {
                let page_ipa = ipa + i as u64 * PAGE_SIZE;
                let pa = self.ram.pa + (page_ipa - self.ram.ipa);
                let (table, index) = self
                    .stage2
                    .slot(memory, page_ipa, 3)
                    .ok_or(Status::InvalidParameter)?;
                memory.set_entry(
                    table,
                    index,
                    self.stage2
                        .leaf_descriptor(pa, 3, attribute.memory_type(), Permissions::RWX),
                );
                arch.table_write(TableWrite::Make {
                    ipa: page_ipa,
                    level: 3,
                    non_cacheable: attribute == Attribute::NonCacheable,
                });
                self.clean_entry(arch, table, index);
            }
        }
        self.complete_stores(arch);
        Ok(())
    }

    /// Cleans and invalidates, through the alias, the pages from `ipa` on whose `changing` flag
    /// is set, run by run, then DSB ISH.
    fn clean_invalidate_runs(&self, arch: &mut impl Arch, ipa: u64, changing: &[bool]) {
        let mut i = 0;
        while i < changing.len() {
            if !changing[i] {
                i += 1;
                continue;
            }
            let run_start = i;
            while i < changing.len() && changing[i] {
                i += 1;
            }
            let run_ipa = ipa + run_start as u64 * PAGE_SIZE;
            arch.dcache_range(
                CacheOp::CleanInvalidate,
                self.alias.va_of(run_ipa),
                (i - run_start) as u64 * PAGE_SIZE,
            );
        }
        arch.dsb_ish();
    }

    /// Replaces the 2 MiB block at `region` by a table of pages with the block's attribute,
    /// except those flagged in `breaking` (whose first flag is page `first_breaking` of the
    /// region), which are left invalid (the caller makes them). The table is prepared first (the only step that can fail), then the
    /// block is broken (see [`Self::break_block`]) and the table made. The break is the only
    /// moment any page of the region is unmapped, so it must hold no pinned page: pinning
    /// splits a page's block first ([`Self::pin`]), and merging waits for no pins.
    ///
    /// # Errors
    /// NO_MEMORY when no table can be allocated; nothing changed then.
    fn split_block(
        &self,
        memory: &mut impl TableMemory,
        arch: &mut impl Arch,
        region: u64,
        first_breaking: usize,
        breaking: &[bool],
    ) -> Result<(), Status> {
        // Every entry is written below, before the table is linked in.
        let new_table = memory.allocate_for_overwrite().ok_or(Status::NoMemory)?;
        let block_pa = self.ram.pa + (region - self.ram.ipa);
        // A block has one attribute, which every page of its region has in the ledger (see
        // `check_invariants`); the region's counts say which. A page's descriptor differs from
        // the first page's only in its address, whose low 21 bits are the page's offset in the
        // block (zero in the block's own).
        let counts = self.regions[(region / BLOCK - self.ram.ipa / BLOCK) as usize];
        debug_assert!(matches!(counts.non_cacheable, 0 | 512));
        let attribute = if usize::from(counts.non_cacheable) == PAGES_PER_BLOCK {
            Attribute::NonCacheable
        } else {
            Attribute::WriteBack
        };
        let descriptor =
            self.stage2
                .leaf_descriptor(block_pa, 3, attribute.memory_type(), Permissions::RWX);
        for i in 0..PAGES_PER_BLOCK {
            memory.set_entry(new_table, i, descriptor + i as u64 * PAGE_SIZE);
        }
        for (i, _) in breaking.iter().enumerate().filter(|(_, &b)| b) {
            memory.set_entry(new_table, first_breaking + i, 0);
        }
        // Cleaned before the break, whose barrier completes it before the table is linked in.
        self.clean_table(arch, new_table);
        let (table, index) = self.break_block(memory, arch, region)?;
        memory.set_entry(table, index, new_table | TABLE_OR_PAGE | VALID);
        arch.table_write(TableWrite::Table { ipa: region });
        self.clean_entry(arch, table, index);
        self.complete_stores(arch);
        Ok(())
    }

    /// Break-before-make's break of the 2 MiB block at `region`: the entry made invalid, then the
    /// CPUs' TLBs (stage 2 by IPA; stage 1 of the VMID, for combined entries) and the devices'
    /// TLBs, each completed. Returns the entry's slot, for the make.
    fn break_block(
        &self,
        memory: &mut impl TableMemory,
        arch: &mut impl Arch,
        region: u64,
    ) -> Result<(u64, usize), Status> {
        let (table, index) = self
            .stage2
            .slot(memory, region, 2)
            .ok_or(Status::InvalidParameter)?;
        memory.set_entry(table, index, 0);
        arch.table_write(TableWrite::Break {
            ipa: region,
            level: 2,
        });
        self.clean_entry(arch, table, index);
        self.complete_writes(arch);
        arch.tlbi_ipas2e1is(region);
        arch.dsb_ish();
        arch.tlbi_vmalle1is();
        arch.dsb_ish();
        arch.device_tlbi(region, BLOCK);
        Ok((table, index))
    }

    /// Replaces the level-3 table of the 2 MiB region at `region` by one block when all its
    /// pages now have `attribute`. Returns whether it merged.
    fn merge_if_uniform(
        &mut self,
        memory: &mut impl TableMemory,
        arch: &mut impl Arch,
        region: u64,
        attribute: Attribute,
    ) -> bool {
        let first = self.page_index(region);
        let target_nc = attribute == Attribute::NonCacheable;
        if !region.is_multiple_of(BLOCK) || self.pages.get(first..first + PAGES_PER_BLOCK).is_none()
        {
            return false;
        }
        // A pinned page's translation is never broken: a device may be using it (shared mode
        // reads the CPU's stage 2), and a device has no retry.
        let counts = *self.region_counts(region);
        let uniform = counts.non_cacheable == if target_nc { PAGES_PER_BLOCK as u16 } else { 0 };
        if !uniform || counts.pinned > 0 {
            return false;
        }
        let Some((table, index)) = self.stage2.slot(memory, region, 2) else {
            return false;
        };
        let entry = memory.entry(table, index);
        if entry & VALID == 0 || entry & TABLE_OR_PAGE == 0 {
            return false; // Already a block.
        }
        let old_table = entry & ADDRESS_MASK;
        memory.set_entry(table, index, 0);
        arch.table_write(TableWrite::Break {
            ipa: region,
            level: 2,
        });
        self.clean_entry(arch, table, index);
        self.complete_writes(arch);
        // Every page of the region may be cached, and the walk caches hold the old table.
        arch.tlbi_vmalls12e1is();
        arch.dsb_ish();
        arch.device_tlbi(region, BLOCK);
        let pa = self.ram.pa + (region - self.ram.ipa);
        memory.set_entry(
            table,
            index,
            self.stage2
                .leaf_descriptor(pa, 2, attribute.memory_type(), Permissions::RWX),
        );
        arch.table_write(TableWrite::Merge {
            ipa: region,
            non_cacheable: target_nc,
        });
        self.region_counts(region).split = false;
        self.clean_entry(arch, table, index);
        self.complete_stores(arch);
        memory.free(old_table);
        true
    }

    /// CACHE_OP by IPA: `op` on `[ipa, ipa + size)`, to the point of coherency, through the
    /// hypervisor's alias (each page with its own attribute; nothing is mapped or invalidated
    /// per call). At most [`WORK_BUDGET`] bytes, and no more than the 2 MiB from the page of
    /// `ipa`, per call. An INVALIDATE cleans and invalidates partial edge
    /// lines, and for the guest is widened to CLEAN_INVALIDATE on a pinned page (shared with a
    /// device).
    ///
    /// # Errors
    /// INVALID_PARAMETER (zero size), OUT_OF_RANGE, DENIED.
    pub fn cache_operation(
        &self,
        arch: &mut impl Arch,
        ipa: u64,
        size: u64,
        op: CacheOp,
        requester: Requester,
    ) -> Result<CacheProgress, Status> {
        if size == 0 {
            return Err(Status::InvalidParameter);
        }
        self.check_range(ipa, size)?;
        let end = ipa + size;
        let page_base = ipa & !(PAGE_SIZE - 1);
        let chunk_end = end.min(page_base + BLOCK).min(ipa + WORK_BUDGET);
        let line = arch.line_size();
        let widened = requester == Requester::Guest && op == CacheOp::Invalidate && {
            let high = chunk_end.next_multiple_of(line);
            let pages = (high.next_multiple_of(PAGE_SIZE) - page_base) / PAGE_SIZE;
            let first = self.page_index(page_base);
            self.pages[first..first + pages as usize]
                .iter()
                .any(|p| p.pins > 0)
        };

        let va = |address: u64| self.alias.va_of(address);
        let op = if widened {
            CacheOp::CleanInvalidate
        } else {
            op
        };
        for (stroke_op, start, len) in crate::maintenance::plan(op, ipa, chunk_end, line)
            .into_iter()
            .flatten()
        {
            arch.dcache_range(stroke_op, va(start), len);
        }
        arch.dsb_ish();
        Ok(CacheProgress {
            done: chunk_end - ipa,
            complete: chunk_end == end,
            widened,
        })
    }

    /// The cache maintenance of a DMA buffer `[ipa, ipa + size)`, whole, through the alias:
    /// exactly its lines, an invalidate's partial edge lines cleaned too
    /// ([`crate::maintenance::plan`]), then DSB ISH. Never widened (the DMA path invalidates
    /// only where the DMA rules require it). The caller bounds `size` (a mapping is at most
    /// `dma::MAX_MAPPING_BYTES`, I6): the alias is linear, so the buffer is one VA range and
    /// one DC loop, with none of [`Self::cache_operation`]'s per-2 MiB chunking. Returns the
    /// lines maintained.
    ///
    /// # Errors
    /// INVALID_PARAMETER for a zero size; OUT_OF_RANGE or DENIED when the range is not guest
    /// RAM (nothing is maintained).
    pub fn dma_cache_operation(
        &self,
        arch: &mut impl Arch,
        ipa: u64,
        size: u64,
        op: CacheOp,
    ) -> Result<u64, Status> {
        if size == 0 {
            return Err(Status::InvalidParameter);
        }
        self.check_range(ipa, size)?;
        let line = arch.line_size();
        let end = ipa + size;
        let low = ipa & !(line - 1);
        let high = end.next_multiple_of(line);
        if op == CacheOp::Invalidate && (ipa | end) & (line - 1) != 0 {
            // Partial edge lines: cleaned and invalidated, the rest invalidated.
            for (stroke_op, start, len) in crate::maintenance::plan(op, ipa, end, line)
                .into_iter()
                .flatten()
            {
                arch.dcache_range(stroke_op, self.alias.va_of(start), len);
            }
        } else {
            arch.dcache_range(op, self.alias.va_of(low), high - low);
        }
        arch.dsb_ish();
        Ok((high - low) / line)
    }

    /// The EL2 VA of `[ipa, ipa + len)` in the hypervisor's alias (each page with the attribute
    /// stage 2 gives it), for the hypervisor's reads and writes of guest memory. It stays valid
    /// while the caller holds the attribute lock (shared or alone) and makes no change itself.
    ///
    /// # Errors
    /// OUT_OF_RANGE or DENIED when the range is not guest RAM.
    pub fn alias_of(&self, ipa: u64, len: u64) -> Result<u64, Status> {
        self.check_range(ipa, len.max(1))?;
        Ok(self.alias.va_of(ipa))
    }

    /// Checks that stage 2 maps every page of guest RAM to its own PA with the ledger's
    /// attribute, blocks only where a whole 2 MiB region agrees and holds no pinned page, and
    /// that the hypervisor's alias maps every page with the ledger's attribute too (I1). (A
    /// region that agrees may stay split after its pins went; the next attribute change in it
    /// merges it.)
    ///
    /// # Errors
    /// A description of the first mismatch.
    pub fn check_invariants(&self, memory: &impl TableMemory) -> Result<(), alloc::string::String> {
        use alloc::format;
        self.alias.check(memory, &self.ram, |ipa| {
            self.pages[self.page_index(ipa)].non_cacheable
        })?;
        let format = *self.stage2.format();
        let mut ipa = self.ram.ipa;
        while ipa < self.ram.ipa_end() {
            let Some(t) = self.stage2.translate(memory, ipa) else {
                return Err(format!("IPA {ipa:#x} is unmapped"));
            };
            if t.output != self.ram.pa + (ipa - self.ram.ipa) {
                return Err(format!("IPA {ipa:#x} maps to {:#x}", t.output));
            }
            use crate::pagetable::Format;
            let (memory_type, _) = format
                .decode(t.descriptor)
                .ok_or_else(|| format!("IPA {ipa:#x}: unknown encoding"))?;
            let page = self.pages[self.page_index(ipa)];
            let want = if page.non_cacheable {
                MemoryType::NormalNonCacheable
            } else {
                MemoryType::NormalWriteBack
            };
            if memory_type != want {
                return Err(format!(
                    "IPA {ipa:#x}: stage 2 says {memory_type:?}, ledger {want:?}"
                ));
            }
            if ipa == self.ram.ipa || ipa.is_multiple_of(BLOCK) {
                let from = self.page_index(ipa);
                let to = self.page_index(((ipa & !(BLOCK - 1)) + BLOCK).min(self.ram.ipa_end()));
                let region = &self.pages[from..to];
                let kept = self.regions[(ipa / BLOCK - self.ram.ipa / BLOCK) as usize];
                let counted = RegionCounts {
                    non_cacheable: region.iter().filter(|p| p.non_cacheable).count() as u16,
                    pinned: region.iter().filter(|p| p.pins > 0).count() as u16,
                    split: kept.split,
                };
                if kept.split && t.level == 2 {
                    return Err(format!(
                        "2 MiB region {ipa:#x} is counted split but is one block"
                    ));
                }
                if kept != counted {
                    return Err(format!(
                        "2 MiB region {ipa:#x}: counts {kept:?}, ledger {counted:?}"
                    ));
                }
            }
            if ipa.is_multiple_of(BLOCK) && ipa + BLOCK <= self.ram.ipa_end() {
                let region =
                    &self.pages[self.page_index(ipa)..self.page_index(ipa) + PAGES_PER_BLOCK];
                let uniform = region
                    .iter()
                    .all(|p| p.non_cacheable == region[0].non_cacheable);
                let pinned = region.iter().any(|p| p.pins > 0);
                if t.level == 2 && (!uniform || pinned) {
                    return Err(format!(
                        "2 MiB region {ipa:#x} is a block but disagrees or holds a pinned page"
                    ));
                }
            }
            ipa += if t.level == 2 {
                level_size(2)
            } else {
                PAGE_SIZE
            };
        }
        Ok(())
    }

    /// Whether every page of `[ipa, ipa + size)` (guest RAM, checked by the caller) is
    /// non-cacheable.
    pub fn all_non_cacheable(&self, ipa: u64, size: u64) -> bool {
        if self.check_range(ipa, size.max(1)).is_err() {
            return false;
        }
        let first = self.page_index(ipa);
        let last = self.page_index(ipa + size.max(1) - 1);
        self.pages[first..=last].iter().all(|p| p.non_cacheable)
    }

    /// The runs of pages of `[ipa, ipa + size)` (page-aligned guest RAM, checked by the caller)
    /// that share one attribute, in order: `(start, bytes, attribute)`. What an audit record
    /// describes when a range is not uniform.
    pub fn attribute_runs(&self, ipa: u64, size: u64) -> Vec<(u64, u64, Attribute)> {
        let first = self.page_index(ipa);
        let pages = &self.pages[first..first + (size / PAGE_SIZE) as usize];
        let mut runs = Vec::new();
        let mut start = 0;
        while start < pages.len() {
            let non_cacheable = pages[start].non_cacheable;
            let len = pages[start..]
                .iter()
                .position(|p| p.non_cacheable != non_cacheable)
                .unwrap_or(pages.len() - start);
            let attribute = if non_cacheable {
                Attribute::NonCacheable
            } else {
                Attribute::WriteBack
            };
            runs.push((
                ipa + start as u64 * PAGE_SIZE,
                len as u64 * PAGE_SIZE,
                attribute,
            ));
            start += len;
        }
        runs
    }

    /// The attribute of the page holding `ipa` and how many bytes of the page-aligned range
    /// `[ipa, ipa + size)` (guest RAM, checked by the caller) share it from there: the next run
    /// of [`Self::attribute_runs`], without collecting them.
    pub fn attribute_run(&self, ipa: u64, size: u64) -> (Attribute, u64) {
        let first = self.page_index(ipa);
        let pages = &self.pages[first..first + (size / PAGE_SIZE) as usize];
        let non_cacheable = pages.first().is_some_and(|p| p.non_cacheable);
        let len = pages
            .iter()
            .position(|p| p.non_cacheable != non_cacheable)
            .unwrap_or(pages.len());
        let attribute = if non_cacheable {
            Attribute::NonCacheable
        } else {
            Attribute::WriteBack
        };
        (attribute, len as u64 * PAGE_SIZE)
    }

    /// The attribute of the page holding `ipa` (guest RAM, checked by the caller).
    pub fn attribute_of(&self, ipa: u64) -> Attribute {
        match self.pages.get(self.page_index(ipa)) {
            Some(p) if p.non_cacheable => Attribute::NonCacheable,
            _ => Attribute::WriteBack,
        }
    }

    /// Adds a DMA pin to every page of `[ipa, ipa + size)` (page-aligned, checked by the caller).
    /// A 2 MiB block holding one of the pages is split first (its pages keep their attributes),
    /// so that no later change elsewhere in the block breaks the translation of a pinned page:
    /// attribute changes break only the pages they change, and a region with a pin is never
    /// merged. The split's own break holds no pinned page (any earlier pin split it already).
    ///
    /// # Errors
    /// OUT_OF_RANGE/DENIED, BUSY when a pin count would overflow, NO_MEMORY when a block
    /// cannot be split (blocks split before that stay split, which changes nothing visible).
    pub fn pin(
        &mut self,
        memory: &mut impl TableMemory,
        arch: &mut impl Arch,
        ipa: u64,
        size: u64,
    ) -> Result<(), Status> {
        self.check_range(ipa, size)?;
        if size == PAGE_SIZE {
            return self.pin_page(memory, arch, ipa);
        }
        let (first, count) = (self.page_index(ipa), (size / PAGE_SIZE) as usize);
        if self.pages[first..first + count]
            .iter()
            .any(|p| p.pins == u16::MAX)
        {
            return Err(Status::Busy);
        }
        let mut region = ipa & !(BLOCK - 1);
        while region < ipa + size {
            self.make_split(memory, arch, region)?;
            region += BLOCK;
        }
        let mut newly_pinned = 0;
        for page in &mut self.pages[first..first + count] {
            newly_pinned += u16::from(page.pins == 0);
            page.pins += 1;
        }
        self.count_pins(first, count, newly_pinned, true);
        Ok(())
    }

    /// [`Self::pin`] of the one page at `ipa` (guest RAM, checked by the caller): a driver's
    /// typical buffer, without the range's loops.
    fn pin_page(
        &mut self,
        memory: &mut impl TableMemory,
        arch: &mut impl Arch,
        ipa: u64,
    ) -> Result<(), Status> {
        let index = self.page_index(ipa);
        match self.pages[index].pins {
            u16::MAX => return Err(Status::Busy),
            0 => {
                self.make_split(memory, arch, ipa & !(BLOCK - 1))?;
                self.region_counts(ipa).pinned += 1;
            }
            _ => {}
        }
        self.pages[index].pins += 1;
        Ok(())
    }

    /// Splits the 2 MiB region at `region` if one block maps it. A region holding a pinned
    /// page, or known split, is not a block (pins are never merged over): no walk needed, the
    /// common case of a driver's next buffer.
    ///
    /// # Errors
    /// NO_MEMORY when the block cannot be split.
    #[inline]
    fn make_split(
        &mut self,
        memory: &mut impl TableMemory,
        arch: &mut impl Arch,
        region: u64,
    ) -> Result<(), Status> {
        let counts = *self.region_counts(region);
        if counts.split || counts.pinned > 0 {
            debug_assert!(!self.is_block(memory, region), "a block counted split");
            return Ok(());
        }
        if self.is_block(memory, region) {
            self.split_block(memory, arch, region, 0, &[])?;
        }
        self.region_counts(region).split = true;
        Ok(())
    }

    /// Whether stage 2 maps the 2 MiB region at `region` with one block (its level-2 entry is
    /// a valid block): two table reads and the entry, not a walk to the leaf.
    fn is_block(&self, memory: &impl TableMemory, region: u64) -> bool {
        self.stage2
            .slot(memory, region, 2)
            .is_some_and(|(table, index)| {
                let entry = memory.entry(table, index);
                entry & VALID != 0 && entry & TABLE_OR_PAGE == 0
            })
    }

    /// Removes a DMA pin from every page of `[ipa, ipa + size)`.
    pub fn unpin(&mut self, ipa: u64, size: u64) {
        if self.check_range(ipa, size).is_err() {
            return;
        }
        let (first, count) = (self.page_index(ipa), (size / PAGE_SIZE) as usize);
        if count == 1 {
            // One page: no loop, and its region's count directly.
            let page = &mut self.pages[first];
            let unpinned = page.pins == 1;
            page.pins = page.pins.saturating_sub(1);
            if unpinned {
                self.region_counts(ipa).pinned -= 1;
            }
            return;
        }
        let mut unpinned = 0;
        for page in &mut self.pages[first..first + count] {
            unpinned += u16::from(page.pins == 1);
            page.pins = page.pins.saturating_sub(1);
        }
        self.count_pins(first, count, unpinned, false);
    }

    /// Updates the regions' pinned-page counts after pages `first..first + count` changed pins:
    /// `changed` of them went from 0 to 1 pin (`up`) or from 1 to 0. A range of several regions
    /// is recounted region by region (rare: buffers are mostly within one).
    fn count_pins(&mut self, first: usize, count: usize, changed: u16, up: bool) {
        if changed == 0 {
            return;
        }
        let start = self.ram.ipa + first as u64 * PAGE_SIZE;
        let end = start + count as u64 * PAGE_SIZE;
        if start / BLOCK == (end - 1) / BLOCK {
            let counts = self.region_counts(start);
            if up {
                counts.pinned += changed;
            } else {
                counts.pinned -= changed;
            }
            return;
        }
        let mut region = start & !(BLOCK - 1);
        while region < end {
            let from = self.page_index(region.max(self.ram.ipa));
            let to = self.page_index((region + BLOCK).min(self.ram.ipa_end()));
            let pinned = self.pages[from..to].iter().filter(|p| p.pins > 0).count() as u16;
            self.region_counts(region).pinned = pinned;
            region += BLOCK;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::maintenance::{Op, Recorder};
    use crate::pagetable::fake::VecMemory;
    use crate::pagetable::Format;
    use proptest::prelude::*;
    use TableWrite::*;

    const RAM: GuestRam = GuestRam {
        ipa: 0x4000_0000,
        pa: 0x1_0000_0000,
        size: 8 << 20,
    };
    /// EL2 VA of IPA 0 in the hypervisor's alias.
    const ALIAS_VA: u64 = 0x7f00_0000_0000;
    const UART: (u64, u64) = (0x0900_0000, 0x1000);
    const R0: u64 = 0x4000_0000; // first 2 MiB region
    const R1: u64 = 0x4020_0000;

    struct Fixture {
        memory: VecMemory,
        manager: AttributeManager,
        arch: Recorder,
    }

    fn fixture(fwb: bool) -> Fixture {
        let mut memory = VecMemory::new(256);
        // Both stage-2 shapes: a 44-bit space from a level-0 root with FWB, and the 39-bit one
        // from a level-1 root of a 40-bit CPU (which has no FWB, as cortex-a53) without.
        let geometry = crate::geometry::Geometry::for_cpu(if fwb { 4 } else { 2 }).unwrap();
        let alias = AliasPlace {
            va: ALIAS_VA,
            table: memory.allocate().unwrap(),
        };
        let mut manager = AttributeManager::new(&mut memory, fwb, RAM, &geometry, alias).unwrap();
        manager.map_mmio(&mut memory, UART.0, UART.1).unwrap();
        Fixture {
            memory,
            manager,
            arch: Recorder::new(),
        }
    }

    impl Fixture {
        fn set(&mut self, ipa: u64, size: u64, attribute: Attribute) -> Result<Progress, Status> {
            self.manager
                .set_attribute(&mut self.memory, &mut self.arch, ipa, size, attribute)
        }
        fn set_all(&mut self, ipa: u64, size: u64, attribute: Attribute) -> Vec<Progress> {
            let mut calls = Vec::new();
            let mut at = ipa;
            loop {
                let p = self.set(at, ipa + size - at, attribute).unwrap();
                calls.push(p);
                at += p.done;
                if p.complete {
                    return calls;
                }
            }
        }
        fn cmo(&mut self, ipa: u64, size: u64, op: CacheOp) -> Result<CacheProgress, Status> {
            self.manager
                .cache_operation(&mut self.arch, ipa, size, op, Requester::Guest)
        }
        fn check(&mut self) {
            self.manager.check_invariants(&self.memory).unwrap();
        }
        fn mem_attr(&mut self, ipa: u64) -> u64 {
            (self
                .manager
                .stage2
                .translate(&self.memory, ipa)
                .unwrap()
                .descriptor
                >> 2)
                & 0xf
        }
    }

    /// One clean+invalidate pass through the alias over `pages` pages from `ipa`, then DSB.
    fn alias_pass(ipa: u64, pages: u64) -> Vec<Op> {
        vec![
            Op::Dc(CacheOp::CleanInvalidate, ALIAS_VA + ipa, pages * PAGE_SIZE),
            Op::DsbIsh,
        ]
    }

    /// The alias's break-before-make of pages `ipa..` (already a level-3 table).
    fn alias_pages(ipa: u64, pages: u64, nc: bool) -> Vec<Op> {
        let va = |i: u64| ALIAS_VA + ipa + i * PAGE_SIZE;
        let mut ops: Vec<Op> = (0..pages)
            .map(|i| {
                Op::Write(AliasBreak {
                    va: va(i),
                    level: 3,
                })
            })
            .collect();
        ops.push(Op::DsbIshst);
        if pages > crate::alias::ALIAS_TLBI_THRESHOLD as u64 {
            ops.push(Op::TlbiAlle2);
        } else {
            ops.extend((0..pages).map(|i| Op::TlbiVae2(va(i))));
        }
        ops.push(Op::DsbIsh);
        ops.extend((0..pages).map(|i| {
            Op::Write(AliasMake {
                va: va(i),
                level: 3,
                non_cacheable: nc,
            })
        }));
        ops.extend([Op::DsbIshst, Op::Isb]);
        ops
    }

    /// The alias's split of the block of `region` with pages `ipa..` changing to `nc`.
    fn alias_split(region: u64, ipa: u64, pages: u64, nc: bool) -> Vec<Op> {
        let mut ops = vec![
            Op::Write(AliasBreak {
                va: ALIAS_VA + region,
                level: 2,
            }),
            Op::DsbIshst,
            Op::TlbiVae2(ALIAS_VA + region),
            Op::DsbIsh,
            Op::Write(AliasTable {
                va: ALIAS_VA + region,
            }),
        ];
        ops.extend((0..pages).map(|i| {
            Op::Write(AliasMake {
                va: ALIAS_VA + ipa + i * PAGE_SIZE,
                level: 3,
                non_cacheable: nc,
            })
        }));
        ops.extend([Op::DsbIshst, Op::Isb]);
        ops
    }

    /// The alias's block of `region` broken (one TLBI VAE2IS) and made again as `nc`.
    fn alias_block(region: u64, nc: bool) -> Vec<Op> {
        vec![
            Op::Write(AliasBreak {
                va: ALIAS_VA + region,
                level: 2,
            }),
            Op::DsbIshst,
            Op::TlbiVae2(ALIAS_VA + region),
            Op::DsbIsh,
            Op::Write(AliasMake {
                va: ALIAS_VA + region,
                level: 2,
                non_cacheable: nc,
            }),
            Op::DsbIshst,
            Op::Isb,
        ]
    }

    /// The address of the line holding the stage-2 entry a recorded write describes.
    fn written_line(f: &mut Fixture, write: TableWrite) -> Option<u64> {
        let (ipa, level) = match write {
            Break { ipa, level } | Make { ipa, level, .. } => (ipa, level),
            Table { ipa } | Merge { ipa, .. } => (ipa, 2),
            AliasBreak { .. } | AliasMake { .. } | AliasTable { .. } => return None,
        };
        let (table, index) = f.manager.stage2.slot(&f.memory, ipa, level)?;
        Some((table + index as u64 * 8) & !63)
    }

    #[test]
    fn a_noncoherent_walker_gets_every_written_entry_cleaned_before_it_may_read_it() {
        let mut f = fixture(false);
        f.manager.set_noncoherent_walker(&f.memory, &mut f.arch);
        // Everything built so far is cleaned whole, then DSB SY.
        let mut tables = Vec::new();
        f.manager
            .stage2
            .for_each_table(&f.memory, &mut |pa| tables.push(pa));
        let expected: Vec<Op> = tables
            .iter()
            .map(|&pa| Op::Dc(CacheOp::Clean, pa, PAGE_SIZE))
            .chain([Op::DsbSy])
            .collect();
        assert_eq!(f.arch.ops, expected);

        // A split (one page of a block to NC), a change of split pages, a merge back to WB.
        for (ipa, size, attribute) in [
            (R0 + PAGE_SIZE, PAGE_SIZE, Attribute::NonCacheable),
            (R0 + 2 * PAGE_SIZE, 2 * PAGE_SIZE, Attribute::NonCacheable),
            (R0 + PAGE_SIZE, 3 * PAGE_SIZE, Attribute::WriteBack),
        ] {
            f.arch.clear();
            f.set(ipa, size, attribute).unwrap();
            f.check();
            let ops = f.arch.ops.clone();
            if attribute == Attribute::NonCacheable && ipa == R0 + PAGE_SIZE {
                // The split's new level-3 table is cleaned whole before it is linked in.
                let (l3, _) = f.manager.stage2.slot(&f.memory, R0, 3).unwrap();
                let cleaned = ops
                    .iter()
                    .position(|op| *op == Op::Dc(CacheOp::Clean, l3, PAGE_SIZE))
                    .expect("new table cleaned");
                let linked = ops
                    .iter()
                    .position(|op| *op == Op::Write(Table { ipa: R0 }))
                    .unwrap();
                assert!(cleaned < linked);
                assert!(ops[cleaned..linked].contains(&Op::DsbSy));
            }
            let mut unclean_since_barrier = false;
            for (at, op) in ops.iter().enumerate() {
                match *op {
                    Op::Write(write) => {
                        let Some(line) = written_line(&mut f, write) else {
                            continue;
                        };
                        if matches!(
                            write,
                            Merge { .. } | Table { .. } | Make { .. } | Break { .. }
                        ) {
                            assert_eq!(
                                ops.get(at + 1),
                                Some(&Op::Dc(CacheOp::Clean, line, 64)),
                                "{write:?} not followed by a clean of its line: {ops:?}"
                            );
                            unclean_since_barrier = true;
                        }
                    }
                    Op::DsbSy => unclean_since_barrier = false,
                    Op::DsbIsh | Op::DsbIshst => {
                        assert!(
                            !unclean_since_barrier,
                            "a table clean completed by DSB ISH only"
                        )
                    }
                    Op::DeviceTlbi(..) => {
                        assert!(
                            !unclean_since_barrier,
                            "device TLBI before the cleans completed"
                        )
                    }
                    _ => {}
                }
            }
            assert!(
                !unclean_since_barrier,
                "cleans not completed at the end: {ops:?}"
            );
        }
        let region_table = f.manager.stage2.slot(&f.memory, R0, 3).map(|(t, _)| t);
        assert!(region_table.is_none(), "merged back into a block");
    }

    #[test]
    fn wb_to_nc_of_one_page_splits_the_block_then_breaks_cleans_twice_and_makes() {
        for fwb in [true, false] {
            let mut f = fixture(fwb);
            let ipa = R0 + 0x3000;
            let p = f.set(ipa, PAGE_SIZE, Attribute::NonCacheable).unwrap();
            assert!(p.complete && p.maintenance.split && !p.maintenance.merged);
            let mut expected = vec![
                Op::Write(Break { ipa: R0, level: 2 }),
                Op::DsbIsh,
                Op::TlbiIpas2(R0),
                Op::DsbIsh,
                Op::TlbiVmalle1,
                Op::DsbIsh,
                Op::DeviceTlbi(R0, BLOCK),
                Op::Write(Table { ipa: R0 }),
                Op::DsbIshst,
            ];
            expected.extend(alias_pass(ipa, 1));
            expected.extend(alias_split(R0, ipa, 1, true));
            expected.extend(alias_pass(ipa, 1));
            expected.extend([
                Op::Write(Make {
                    ipa,
                    level: 3,
                    non_cacheable: true,
                }),
                Op::DsbIshst,
            ]);
            assert_eq!(f.arch.ops, expected, "fwb={fwb}");
            assert_eq!(f.mem_attr(ipa), 0b0101);
            assert_eq!(
                f.mem_attr(ipa + PAGE_SIZE),
                if fwb { 0b0110 } else { 0b1111 }
            );
            f.check();
        }
    }

    #[test]
    fn nc_to_wb_invalidates_again_then_merges_the_block_back() {
        for fwb in [true, false] {
            let mut f = fixture(fwb);
            let ipa = R0 + 0x3000;
            f.set(ipa, PAGE_SIZE, Attribute::NonCacheable).unwrap();
            f.arch.clear();
            let p = f.set(ipa, PAGE_SIZE, Attribute::WriteBack).unwrap();
            assert!(p.maintenance.merged);
            let mut expected = vec![
                Op::Write(Break { ipa, level: 3 }),
                Op::DsbIsh,
                Op::TlbiIpas2(ipa),
                Op::DsbIsh,
                Op::TlbiVmalle1,
                Op::DsbIsh,
                Op::DeviceTlbi(ipa, PAGE_SIZE),
            ];
            expected.extend(alias_pass(ipa, 1));
            expected.extend(alias_pages(ipa, 1, false));
            expected.extend([
                Op::Write(Make {
                    ipa,
                    level: 3,
                    non_cacheable: false,
                }),
                Op::DsbIshst,
                Op::Write(Break { ipa: R0, level: 2 }),
                Op::DsbIsh,
                Op::TlbiVmalls12,
                Op::DsbIsh,
                Op::DeviceTlbi(R0, BLOCK),
                Op::Write(Merge {
                    ipa: R0,
                    non_cacheable: false,
                }),
                Op::DsbIshst,
            ]);
            // The alias's region stays split (no merge, no TLBI ALLE2IS).
            assert_eq!(f.arch.ops, expected, "fwb={fwb}");
            assert!(f.manager.get(&f.memory, ipa).unwrap().block_mapped);
            f.check();
        }
    }

    #[test]
    fn an_aligned_2mib_range_stays_a_block_with_a_constant_number_of_tlbis() {
        let mut f = fixture(true);
        let p = f.set(R1, BLOCK, Attribute::NonCacheable).unwrap();
        assert!(!p.maintenance.split);
        let mut expected = vec![
            Op::Write(Break { ipa: R1, level: 2 }),
            Op::DsbIsh,
            Op::TlbiIpas2(R1),
            Op::DsbIsh,
            Op::TlbiVmalle1,
            Op::DsbIsh,
            Op::DeviceTlbi(R1, BLOCK),
        ];
        expected.extend(alias_pass(R1, 512));
        expected.extend(alias_block(R1, true));
        expected.extend(alias_pass(R1, 512));
        expected.extend([
            Op::Write(Make {
                ipa: R1,
                level: 2,
                non_cacheable: true,
            }),
            Op::DsbIshst,
        ]);
        assert_eq!(f.arch.ops, expected);
        assert!(f.manager.get(&f.memory, R1).unwrap().block_mapped);
        f.check();
    }

    #[test]
    fn tlbi_count_does_not_grow_with_the_range() {
        let mut f = fixture(true);
        // Every call of a 2 MiB-aligned range: 2 stage-2 TLBIs and one for the alias's block.
        for p in f.set_all(RAM.ipa, RAM.size, Attribute::NonCacheable) {
            assert_eq!(p.maintenance.tlbi_count, 3);
        }
        for p in f.set_all(RAM.ipa, RAM.size, Attribute::WriteBack) {
            assert_eq!(p.maintenance.tlbi_count, 3);
        }
        // Inside split regions: above the threshold, one VMID-wide TLBI whatever the size, plus
        // one TLBI ALLE2IS for the alias's pages.
        let mut counts = Vec::new();
        for pages in [17u64, 100, 300, 510] {
            let mut f = fixture(true);
            f.set(R0, PAGE_SIZE, Attribute::NonCacheable).unwrap(); // split R0
            f.arch.clear();
            let p = f
                .set(R0 + PAGE_SIZE, pages * PAGE_SIZE, Attribute::NonCacheable)
                .unwrap();
            assert_eq!(p.maintenance.tlbi, TlbiScope::Vmid);
            counts.push(f.arch.tlbi_count());
        }
        assert!(counts.windows(2).all(|w| w[0] == w[1]), "{counts:?}");
    }

    #[test]
    fn large_ranges_take_several_calls_and_report_progress() {
        let mut f = fixture(false);
        let calls = f.set_all(R0 + 0x1000, 5 << 20, Attribute::NonCacheable);
        let done: Vec<u64> = calls.iter().map(|p| p.done).collect();
        assert_eq!(done, vec![BLOCK - 0x1000, BLOCK, (1 << 20) + 0x1000]);
        assert!(calls.iter().all(|p| p.done <= WORK_BUDGET));
        f.check();
    }

    #[test]
    fn bad_input_gets_its_own_status_and_changes_nothing() {
        let mut f = fixture(true);
        let cases = [
            (R0, 0, Status::InvalidParameter),
            (R0 + 1, PAGE_SIZE, Status::Alignment),
            (R0, 100, Status::Alignment),
            (RAM.ipa_end(), PAGE_SIZE, Status::OutOfRange),
            (RAM.ipa_end() - PAGE_SIZE, 2 * PAGE_SIZE, Status::OutOfRange),
            (0xffff_ffff_ffff_f000, 0x2000, Status::OutOfRange),
            (0x2000_0000, PAGE_SIZE, Status::OutOfRange),
            (UART.0, PAGE_SIZE, Status::Denied),
        ];
        for (ipa, size, status) in cases {
            assert_eq!(
                f.set(ipa, size, Attribute::NonCacheable),
                Err(status),
                "{ipa:#x}+{size:#x}"
            );
        }
        f.manager
            .pin(&mut f.memory, &mut f.arch, R0, PAGE_SIZE)
            .unwrap();
        f.arch.clear();
        assert_eq!(f.set(R0, BLOCK, Attribute::NonCacheable), Err(Status::Busy));
        assert!(f.arch.ops.is_empty());
        assert_eq!(f.manager.get(&f.memory, R0).unwrap().pins, 1);
        f.manager.unpin(R0, PAGE_SIZE);
        assert!(f.set(R0, BLOCK, Attribute::NonCacheable).is_ok());
        assert_eq!(Attribute::from_abi(2), None);
        f.check();
    }

    #[test]
    fn invalidate_cleans_partial_edge_lines_and_is_widened_on_pinned_pages() {
        let mut f = fixture(true);
        let ipa = R0 + 0x1010; // starts 16 bytes into a line
        let p = f.cmo(ipa, 0x100, CacheOp::Invalidate).unwrap();
        assert!(p.complete && !p.widened);
        let va = ALIAS_VA + R0 + 0x1000; // the alias of the page of `ipa`
        assert_eq!(
            f.arch.ops[0..3],
            [
                Op::Dc(CacheOp::CleanInvalidate, va, 64),
                Op::Dc(CacheOp::CleanInvalidate, va + 0x100, 64),
                Op::Dc(CacheOp::Invalidate, va + 64, 0xc0),
            ]
        );
        assert_eq!(f.arch.ops[3..], [Op::DsbIsh]);
        f.arch.clear();
        f.manager
            .pin(&mut f.memory, &mut f.arch, R0 + 0x1000, PAGE_SIZE)
            .unwrap();
        f.arch.clear();
        let p = f.cmo(ipa, 0x100, CacheOp::Invalidate).unwrap();
        assert!(p.widened);
        // The hypervisor's own DMA maintenance invalidates exactly, pinned or not.
        let dma = f
            .manager
            .cache_operation(&mut f.arch, ipa, 0x100, CacheOp::Invalidate, Requester::Dma)
            .unwrap();
        assert!(!dma.widened);
        assert_eq!(f.arch.ops[0], Op::Dc(CacheOp::CleanInvalidate, va, 0x140));
        f.check();
    }

    /// What a DMA buffer (any alignment) is checked against before anything is pinned: the
    /// buffer itself, then the pages it touches in the ledger. Every bad-input row.
    #[test]
    fn dma_buffers_are_checked_byte_by_byte_then_page_by_page() {
        use crate::dma;
        let f = fixture(true);
        let end = RAM.ipa + RAM.size;
        let rows: [(&str, u64, u64, Result<(), Status>); 11] = [
            ("a page", R0, PAGE_SIZE, Ok(())),
            ("a byte", R0 + 0x123, 1, Ok(())),
            ("across a page", R0 + 0xff0, 0x20, Ok(())),
            ("the last byte of RAM", end - 1, 1, Ok(())),
            ("zero size", R0, 0, Err(Status::InvalidParameter)),
            (
                "above 16 MiB",
                R0,
                dma::MAX_MAPPING_BYTES + 1,
                Err(Status::InvalidParameter),
            ),
            ("wrapping", u64::MAX - 0xf, 0x20, Err(Status::OutOfRange)),
            (
                "across the end of RAM",
                end - 8,
                16,
                Err(Status::OutOfRange),
            ),
            ("below RAM", RAM.ipa - 8, 4, Err(Status::OutOfRange)),
            ("bytes of the UART", UART.0 + 0x10, 8, Err(Status::Denied)),
            (
                "outside RAM and MMIO",
                0x1_0000_0000,
                8,
                Err(Status::OutOfRange),
            ),
        ];
        for (what, ipa, size, want) in rows {
            let got =
                dma::check_buffer(ipa, size).and_then(|span| f.manager.check(span.ipa, span.size));
            assert_eq!(got, want, "{what}: {ipa:#x}+{size:#x}");
        }
    }

    /// The DMA maintenance of a byte-granular buffer, for every alignment of its start and end
    /// within a line and every direction and step: each line the buffer touches gets exactly
    /// one operation, no other line any, and a line the buffer covers only in part is never
    /// only invalidated (the bytes of a neighbour in it survive).
    #[test]
    fn dma_maintenance_covers_exactly_the_buffer_lines_at_every_alignment() {
        use crate::audit::DmaDirection;
        use crate::dma::{self, Step};
        let mut f = fixture(true);
        let line = 64;
        let base = R0 + 3 * PAGE_SIZE;
        f.manager
            .pin(&mut f.memory, &mut f.arch, base, 2 * PAGE_SIZE)
            .unwrap();
        let directions = [
            DmaDirection::ToDevice,
            DmaDirection::FromDevice,
            DmaDirection::Bidirectional,
        ];
        let steps = [Step::Map, Step::Unmap, Step::ForCpu, Step::ForDevice];
        let mut cases = 0;
        for direction in directions {
            for step in steps {
                let Some(op) = dma::maintenance(direction, step) else {
                    continue;
                };
                // The buffer starts at every offset in a line and ends at every offset in the
                // same line, the next one and the one after (page 3's last lines included, so
                // that buffers crossing into page 4 are covered).
                for first_line in [base + line, base + PAGE_SIZE - 2 * line] {
                    for head in 0..line {
                        for len in 1..=3 * line - head {
                            let start = first_line + head;
                            let end = start + len;
                            f.arch.clear();
                            let lines = f
                                .manager
                                .dma_cache_operation(&mut f.arch, start, len, op)
                                .unwrap();
                            assert_eq!(lines, end.div_ceil(line) - start / line);
                            assert_eq!(f.arch.ops.last(), Some(&Op::DsbIsh));
                            let mut seen = std::collections::BTreeMap::new();
                            for o in &f.arch.ops {
                                if let Op::Dc(dc, va, bytes) = *o {
                                    for at in (va..va + bytes).step_by(line as usize) {
                                        let ipa = at - ALIAS_VA;
                                        assert!(
                                            seen.insert(ipa, dc).is_none(),
                                            "{op:?} {start:#x}+{len}: line {ipa:#x} twice"
                                        );
                                    }
                                }
                            }
                            let low = start & !(line - 1);
                            let high = end.next_multiple_of(line);
                            let want: Vec<u64> = (low..high).step_by(line as usize).collect();
                            assert_eq!(
                                seen.keys().copied().collect::<Vec<_>>(),
                                want,
                                "{op:?} {start:#x}+{len}: lines maintained"
                            );
                            for (&at, &dc) in &seen {
                                let whole = at >= start && at + line <= end;
                                let expected = match (op, whole) {
                                    (CacheOp::Invalidate, false) => CacheOp::CleanInvalidate,
                                    _ => op,
                                };
                                assert_eq!(dc, expected, "{op:?} {start:#x}+{len}: line {at:#x}");
                            }
                            cases += 1;
                        }
                    }
                }
            }
        }
        // 10 (direction, step) pairs with maintenance, 2 places, 64 starts x their lengths.
        assert_eq!(
            cases,
            10 * 2 * (0..line).map(|head| 3 * line - head).sum::<u64>()
        );
        f.manager.unpin(base, 2 * PAGE_SIZE);
        f.check();
    }

    /// A DMA buffer across a 2 MiB boundary is one DC range and one DSB (the alias is linear);
    /// bad input maintains nothing.
    #[test]
    fn dma_maintenance_is_one_range_across_regions_and_refuses_bad_input() {
        let mut f = fixture(true);
        let start = R0 + BLOCK - PAGE_SIZE + 0x40;
        let lines = f
            .manager
            .dma_cache_operation(&mut f.arch, start, 2 * PAGE_SIZE, CacheOp::CleanInvalidate)
            .unwrap();
        assert_eq!(lines, 2 * PAGE_SIZE / 64);
        assert_eq!(
            f.arch.ops,
            [
                Op::Dc(CacheOp::CleanInvalidate, ALIAS_VA + start, 2 * PAGE_SIZE),
                Op::DsbIsh
            ]
        );
        f.arch.clear();
        let end = RAM.ipa + RAM.size;
        for (ipa, size, want) in [
            (R0, 0, Status::InvalidParameter),
            (end - 8, 16, Status::OutOfRange),
            (u64::MAX - 8, 16, Status::OutOfRange),
            (UART.0, 4, Status::Denied),
        ] {
            assert_eq!(
                f.manager
                    .dma_cache_operation(&mut f.arch, ipa, size, CacheOp::Clean),
                Err(want),
                "{ipa:#x}+{size:#x}"
            );
        }
        assert!(f.arch.ops.is_empty());
    }

    #[test]
    fn pinning_splits_the_block_and_no_later_change_breaks_the_pinned_page() {
        let mut f = fixture(true);
        f.manager
            .pin(&mut f.memory, &mut f.arch, R0 + 5 * PAGE_SIZE, PAGE_SIZE)
            .unwrap();
        // The pin's split: one break of the block (nothing pinned yet), then the table.
        assert_eq!(
            f.arch.writes(),
            [Break { ipa: R0, level: 2 }, Table { ipa: R0 }]
        );
        let info = f.manager.get(&f.memory, R0 + 5 * PAGE_SIZE).unwrap();
        assert!(!info.block_mapped && info.pins == 1);
        // Changes of the neighbours, there and back (which would merge without the pin), break
        // only the pages they change.
        for attribute in [Attribute::NonCacheable, Attribute::WriteBack] {
            f.arch.clear();
            f.set(R0, 5 * PAGE_SIZE, attribute).unwrap();
            f.set(R0 + 6 * PAGE_SIZE, BLOCK - 6 * PAGE_SIZE, attribute)
                .unwrap();
            for write in f.arch.writes() {
                if let Break { ipa, level } = write {
                    assert_eq!(level, 3, "{write:?}");
                    assert_ne!(ipa, R0 + 5 * PAGE_SIZE);
                }
            }
            f.check();
        }
        // Unpinned, the next change merges the region again.
        f.manager.unpin(R0 + 5 * PAGE_SIZE, PAGE_SIZE);
        let p = f.set(R0, PAGE_SIZE, Attribute::WriteBack).unwrap();
        assert!(!p.maintenance.merged, "no change, no merge");
        f.set(R0, PAGE_SIZE, Attribute::NonCacheable).unwrap();
        assert!(
            f.set(R0, PAGE_SIZE, Attribute::WriteBack)
                .unwrap()
                .maintenance
                .merged
        );
        f.check();
    }

    #[test]
    fn a_region_merged_after_its_pins_went_is_split_again_by_the_next_pin() {
        let mut f = fixture(true);
        let page = R0 + 7 * PAGE_SIZE;
        f.manager
            .pin(&mut f.memory, &mut f.arch, page, PAGE_SIZE)
            .unwrap();
        f.manager.unpin(page, PAGE_SIZE);
        // Known split: a pin of another page of the region walks nothing and writes nothing.
        f.arch.clear();
        f.manager
            .pin(&mut f.memory, &mut f.arch, R0, PAGE_SIZE)
            .unwrap();
        assert!(f.arch.ops.is_empty(), "{:?}", f.arch.ops);
        f.manager.unpin(R0, PAGE_SIZE);
        // An attribute change there and back merges the region into one block again...
        f.set(R0, PAGE_SIZE, Attribute::NonCacheable).unwrap();
        assert!(
            f.set(R0, PAGE_SIZE, Attribute::WriteBack)
                .unwrap()
                .maintenance
                .merged
        );
        assert!(f.manager.get(&f.memory, page).unwrap().block_mapped);
        f.check();
        // ...which the next pin, of one page or of a range, splits again.
        for size in [PAGE_SIZE, 3 * PAGE_SIZE] {
            f.arch.clear();
            f.manager
                .pin(&mut f.memory, &mut f.arch, page, size)
                .unwrap();
            assert_eq!(
                f.arch.writes(),
                [Break { ipa: R0, level: 2 }, Table { ipa: R0 }]
            );
            assert!(!f.manager.get(&f.memory, page).unwrap().block_mapped);
            f.check();
            f.manager.unpin(page, size);
            f.set(R0, PAGE_SIZE, Attribute::NonCacheable).unwrap();
            f.set(R0, PAGE_SIZE, Attribute::WriteBack).unwrap();
            assert!(f.manager.get(&f.memory, page).unwrap().block_mapped);
        }
    }

    #[test]
    fn a_one_page_pin_and_unpin_agree_with_the_range_path() {
        // The same pages pinned one by one (the one-page path) and as one range, in two
        // fixtures: the same writes, pins, blocks and region counts after each step.
        let mut one = fixture(false);
        let mut range = fixture(false);
        let first = R1 - 2 * PAGE_SIZE; // across the two regions
        for page in 0..4 {
            one.manager
                .pin(
                    &mut one.memory,
                    &mut one.arch,
                    first + page * PAGE_SIZE,
                    PAGE_SIZE,
                )
                .unwrap();
        }
        range
            .manager
            .pin(&mut range.memory, &mut range.arch, first, 4 * PAGE_SIZE)
            .unwrap();
        assert_eq!(one.arch.writes(), range.arch.writes());
        assert_eq!(one.manager.regions, range.manager.regions);
        for page in 0..4 {
            let ipa = first + page * PAGE_SIZE;
            assert_eq!(
                one.manager.get(&one.memory, ipa),
                range.manager.get(&range.memory, ipa)
            );
        }
        one.check();
        range.check();
        for page in 0..4 {
            one.manager.unpin(first + page * PAGE_SIZE, PAGE_SIZE);
        }
        range.manager.unpin(first, 4 * PAGE_SIZE);
        assert_eq!(one.manager.regions, range.manager.regions);
        assert_eq!(one.manager.pages, range.manager.pages);
        one.check();
        range.check();
        // A pin count at its limit answers BUSY on both paths and changes nothing.
        let ipa = R0 + PAGE_SIZE;
        let index = one.manager.page_index(ipa);
        one.manager.pages[index].pins = u16::MAX;
        let before = one.manager.pages.clone();
        assert_eq!(
            one.manager
                .pin(&mut one.memory, &mut one.arch, ipa, PAGE_SIZE),
            Err(Status::Busy)
        );
        assert_eq!(
            one.manager.pin(
                &mut one.memory,
                &mut one.arch,
                ipa - PAGE_SIZE,
                2 * PAGE_SIZE
            ),
            Err(Status::Busy)
        );
        assert_eq!(one.manager.pages, before);
    }

    #[test]
    fn attribute_runs_split_a_range_where_the_attribute_changes() {
        let mut f = fixture(false);
        f.set(R0 + 2 * PAGE_SIZE, 3 * PAGE_SIZE, Attribute::NonCacheable)
            .unwrap();
        assert_eq!(
            f.manager.attribute_runs(R0 + PAGE_SIZE, 7 * PAGE_SIZE),
            [
                (R0 + PAGE_SIZE, PAGE_SIZE, Attribute::WriteBack),
                (R0 + 2 * PAGE_SIZE, 3 * PAGE_SIZE, Attribute::NonCacheable),
                (R0 + 5 * PAGE_SIZE, 3 * PAGE_SIZE, Attribute::WriteBack),
            ]
        );
        assert_eq!(
            f.manager.attribute_runs(R1, BLOCK),
            [(R1, BLOCK, Attribute::WriteBack)]
        );
    }

    #[test]
    fn cache_operations_go_through_the_alias_with_no_mapping_and_no_tlbi() {
        let mut f = fixture(true);
        f.set(R0 + PAGE_SIZE, PAGE_SIZE, Attribute::NonCacheable)
            .unwrap();
        f.arch.clear();
        f.cmo(R0, 3 * PAGE_SIZE, CacheOp::Clean).unwrap();
        // The pages keep the alias's attributes (the middle one NC, as stage 2 says; `check`
        // below compares them): one DC range and its DSB, nothing else.
        assert_eq!(
            f.arch.ops,
            [
                Op::Dc(CacheOp::Clean, ALIAS_VA + R0, 3 * PAGE_SIZE),
                Op::DsbIsh
            ]
        );
        assert_eq!(f.cmo(R0, 0, CacheOp::Clean), Err(Status::InvalidParameter));
        assert_eq!(f.cmo(UART.0, 4, CacheOp::Clean), Err(Status::Denied));
        assert_eq!(
            f.cmo(RAM.ipa_end() - 4, 8, CacheOp::Clean),
            Err(Status::OutOfRange)
        );
        let p = f.cmo(R0 + 8, 3 << 20, CacheOp::CleanInvalidate).unwrap();
        assert!(
            !p.complete && p.done == BLOCK - 8,
            "2 MiB from the page per call"
        );
        f.check();
    }

    /// I1 and I2 read off a recorded call, replayed over a model of both mappings of each page
    /// (the guest's stage 2 and the hypervisor's alias; `None` while broken), starting from the
    /// ledger `before`. I2: every page made non-cacheable in stage 2 was broken, TLB-invalidated
    /// (with a DSB after), cleaned and invalidated through the alias while write-back and then
    /// again while non-cacheable, all before its make; every page made write-back again was
    /// invalidated through the non-cacheable alias before its make. I1: stage 2 never makes a
    /// page NC while the alias maps it WB, and the alias never maps a page WB while stage 2
    /// maps it NC. No DC goes through a broken alias entry.
    fn check_i2(ops: &[Op], before: &[bool]) -> Result<(), String> {
        let page_of = |ipa: u64| ((ipa - RAM.ipa) / PAGE_SIZE) as usize;
        let pages_of = |level: usize| (level_size(level) / PAGE_SIZE) as usize;
        let mut guest: Vec<Option<bool>> = before.iter().map(|&nc| Some(nc)).collect();
        let mut alias = guest.clone();
        // What a broken block held, for the split that links a table of the same pages.
        let mut guest_saved = guest.clone();
        let mut alias_saved = alias.clone();
        let mut broken: Vec<(u64, u64, usize)> = Vec::new(); // ipa, bytes, index of break
        let mut passes: Vec<(usize, bool, usize)> = Vec::new(); // page, nc, index
        let mut last_tlbi_done = 0usize;
        for (i, op) in ops.iter().enumerate() {
            match *op {
                Op::Write(Break { ipa, level }) => {
                    broken.push((ipa, level_size(level), i));
                    let first = page_of(ipa);
                    for page in first..(first + pages_of(level)).min(guest.len()) {
                        guest_saved[page] = guest[page];
                        guest[page] = None;
                    }
                }
                Op::Write(Table { ipa }) => {
                    // A split leaves the pages it changes invalid: those a later make maps.
                    let first = page_of(ipa);
                    for page in first..(first + 512).min(guest.len()) {
                        let made_later = ops[i..].iter().any(|o| {
                            matches!(*o, Op::Write(Make { ipa, level: 3, .. })
                                if page_of(ipa) == page)
                        });
                        guest[page] = if made_later { None } else { guest_saved[page] };
                    }
                }
                Op::Write(Merge { ipa, non_cacheable }) => {
                    let first = page_of(ipa);
                    for page in first..(first + 512).min(guest.len()) {
                        if non_cacheable && alias[page] != Some(true) {
                            return Err(format!("{ipa:#x} merged NC over a WB alias page"));
                        }
                        guest[page] = Some(non_cacheable);
                    }
                }
                Op::Write(AliasBreak { va, level }) => {
                    let first = page_of(va - ALIAS_VA);
                    for page in first..(first + pages_of(level)).min(alias.len()) {
                        alias_saved[page] = alias[page];
                        alias[page] = None;
                    }
                }
                Op::Write(AliasTable { va }) => {
                    let first = page_of(va - ALIAS_VA);
                    for page in first..(first + 512).min(alias.len()) {
                        let made_later = ops[i..].iter().any(|o| {
                            matches!(*o, Op::Write(AliasMake { va, level: 3, .. })
                                if page_of(va - ALIAS_VA) == page)
                        });
                        alias[page] = if made_later { None } else { alias_saved[page] };
                    }
                }
                Op::Write(AliasMake {
                    va,
                    level,
                    non_cacheable,
                }) => {
                    let first = page_of(va - ALIAS_VA);
                    for page in first..(first + pages_of(level)).min(alias.len()) {
                        if !non_cacheable && guest[page] == Some(true) {
                            return Err(format!(
                                "alias of page {page} made WB while NC in stage 2"
                            ));
                        }
                        alias[page] = Some(non_cacheable);
                    }
                }
                Op::DsbIsh
                    if i > 0
                        && ops[..i]
                            .iter()
                            .rev()
                            .take_while(|o| **o != Op::DsbIsh)
                            .any(|o| o.is_tlbi()) =>
                {
                    last_tlbi_done = i
                }
                Op::Dc(CacheOp::CleanInvalidate, va, len) => {
                    let first = page_of(va - ALIAS_VA);
                    let last = page_of(va - ALIAS_VA + len - 1);
                    for (page, state) in alias.iter().enumerate().take(last + 1).skip(first) {
                        let nc = state.ok_or(format!("DC through broken alias page {page}"))?;
                        passes.push((page, nc, i));
                    }
                }
                Op::Write(Make {
                    ipa,
                    level,
                    non_cacheable,
                }) => {
                    let size = level_size(level);
                    let brk = broken
                        .iter()
                        .filter(|&&(b, len, _)| b <= ipa && ipa + size <= b + len)
                        .map(|&(_, _, at)| at)
                        .next_back()
                        .ok_or(format!("make of {ipa:#x} without a break"))?;
                    if last_tlbi_done < brk {
                        return Err(format!(
                            "make of {ipa:#x}: no completed TLBI after its break"
                        ));
                    }
                    for page in page_of(ipa)..page_of(ipa) + pages_of(level) {
                        let covered = |want_nc: bool| {
                            passes
                                .iter()
                                .any(|&(p, nc, at)| nc == want_nc && at > brk && p == page)
                        };
                        if non_cacheable && !(covered(false) && covered(true)) {
                            return Err(format!("{ipa:#x} made NC without both clean passes"));
                        }
                        if !non_cacheable && !covered(true) {
                            return Err(format!("{ipa:#x} made WB without an invalidate"));
                        }
                        if non_cacheable && alias[page] != Some(true) {
                            return Err(format!("{ipa:#x} made NC while its alias is not NC"));
                        }
                        guest[page] = Some(non_cacheable);
                    }
                }
                _ => {}
            }
        }
        if let Some(page) = (0..alias.len()).find(|&p| alias[p].is_none() || guest[p].is_none()) {
            return Err(format!("page {page} left broken"));
        }
        Ok(())
    }

    #[test]
    fn a_split_without_table_memory_changes_nothing_in_stage_2_or_the_alias() {
        // No table for the alias's split, then one for it but none for stage 2's.
        for spare in [0, 1] {
            let mut f = fixture(true);
            f.memory.limit = f.memory.tables.len() + spare;
            let ipa = R0 + 0x5000;
            assert_eq!(
                f.set(ipa, PAGE_SIZE, Attribute::NonCacheable).unwrap_err(),
                Status::NoMemory
            );
            assert!(f.arch.ops.is_empty(), "spare {spare}: {:?}", f.arch.ops);
            assert_eq!(f.manager.attribute_of(ipa), Attribute::WriteBack);
            f.check();
        }
    }

    #[test]
    fn the_alias_stays_split_until_a_whole_region_changes() {
        let mut f = fixture(true);
        f.set(R1 + PAGE_SIZE, PAGE_SIZE, Attribute::NonCacheable)
            .unwrap();
        f.arch.clear();
        // Back to WB: stage 2 merges, the alias keeps its table (a page break, no ALLE2IS).
        f.set(R1 + PAGE_SIZE, PAGE_SIZE, Attribute::WriteBack)
            .unwrap();
        let alias_ops: Vec<Op> = f
            .arch
            .ops
            .iter()
            .copied()
            .filter(|o| matches!(o, Op::Write(AliasBreak { .. } | AliasMake { .. })))
            .collect();
        assert_eq!(
            alias_ops,
            [
                Op::Write(AliasBreak {
                    va: ALIAS_VA + R1 + PAGE_SIZE,
                    level: 3
                }),
                Op::Write(AliasMake {
                    va: ALIAS_VA + R1 + PAGE_SIZE,
                    level: 3,
                    non_cacheable: false
                })
            ]
        );
        f.check();
        // The whole region: its table goes (TLBI ALLE2IS: any page may be cached), one block.
        f.arch.clear();
        f.set(R1, BLOCK, Attribute::NonCacheable).unwrap();
        let at = f
            .arch
            .ops
            .iter()
            .position(|o| matches!(o, Op::Write(AliasBreak { .. })))
            .unwrap();
        assert_eq!(
            f.arch.ops[at..at + 7],
            [
                Op::Write(AliasBreak {
                    va: ALIAS_VA + R1,
                    level: 2
                }),
                Op::DsbIshst,
                Op::TlbiAlle2,
                Op::DsbIsh,
                Op::Write(AliasMake {
                    va: ALIAS_VA + R1,
                    level: 2,
                    non_cacheable: true
                }),
                Op::DsbIshst,
                Op::Isb,
            ]
        );
        f.check();
    }

    #[test]
    fn the_i1_i2_replay_catches_a_wrong_order() {
        let mut f = fixture(true);
        let ipa = R0 + 0x3000;
        f.set(ipa, PAGE_SIZE, Attribute::NonCacheable).unwrap();
        let before = vec![false; (RAM.size / PAGE_SIZE) as usize];
        let good = f.arch.ops.clone();
        check_i2(&good, &before).unwrap();
        // Without the pass through the write-back alias (no clean before NC: I2).
        let first_dc = good.iter().position(|o| matches!(o, Op::Dc(..))).unwrap();
        let mut bad = good.clone();
        bad.remove(first_dc);
        assert!(check_i2(&bad, &before).is_err());
        // Stage 2 made NC before the alias is (a cacheable alias of an NC page: I1).
        let make = good
            .iter()
            .position(|o| matches!(o, Op::Write(Make { .. })))
            .unwrap();
        let alias_make = good
            .iter()
            .position(|o| matches!(o, Op::Write(AliasMake { .. })))
            .unwrap();
        let mut bad = good.clone();
        let op = bad.remove(make);
        bad.insert(alias_make, op);
        assert!(check_i2(&bad, &before).is_err());
        // A DC through the alias while its entry is broken.
        let alias_break = good
            .iter()
            .position(|o| matches!(o, Op::Write(AliasBreak { .. })))
            .unwrap();
        let mut bad = good.clone();
        bad.insert(
            alias_break + 1,
            Op::Dc(CacheOp::CleanInvalidate, ALIAS_VA + ipa, 64),
        );
        assert!(check_i2(&bad, &before).is_err());
    }

    #[derive(Clone, Debug)]
    enum Step {
        Set { page: u64, pages: u64, nc: bool },
        Pin { page: u64, pages: u64 },
        Unpin { page: u64, pages: u64 },
        Cmo { offset: u64, len: u64, op: u8 },
    }

    fn step() -> impl Strategy<Value = Step> {
        let pages = RAM.size / PAGE_SIZE;
        prop_oneof![
            4 => (0..pages, 1..1200u64, any::<bool>()).prop_map(|(page, pages, nc)| Step::Set { page, pages, nc }),
            // One page (a driver's typical buffer, its own path) twice as often as a range.
            2 => (0..pages).prop_map(|page| Step::Pin { page, pages: 1 }),
            1 => (0..pages, 2..600u64).prop_map(|(page, pages)| Step::Pin { page, pages }),
            2 => (0..pages).prop_map(|page| Step::Unpin { page, pages: 1 }),
            1 => (0..pages, 2..600u64).prop_map(|(page, pages)| Step::Unpin { page, pages }),
            1 => (0..RAM.size, 1..20_000u64, 1..4u8).prop_map(|(offset, len, op)| Step::Cmo { offset, len, op }),
        ]
    }

    /// No break in `ops` covers a page pinned in `pins` (indexed from the start of RAM): a
    /// device may be using it, and DMA has no retry.
    fn no_pinned_page_broken(ops: &[Op], pins: &[u16]) -> Result<(), TestCaseError> {
        for op in ops {
            if let Op::Write(Break { ipa, level }) = *op {
                let first = ((ipa - RAM.ipa) / PAGE_SIZE) as usize;
                let pages = (level_size(level) / PAGE_SIZE) as usize;
                if let Some(page) =
                    (first..first + pages).find(|&i| pins.get(i).is_some_and(|&p| p > 0))
                {
                    return Err(TestCaseError::fail(format!(
                        "break of {ipa:#x} (level {level}) covers pinned page {page}"
                    )));
                }
            }
        }
        Ok(())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]
        /// Random operation sequences against a reference model: after every call the ledger
        /// and stage 2 agree with the model (I1 for the guest's alias, blocks where possible),
        /// the hypervisor's alias agrees with the ledger, the recorded sequence satisfies I1 and I2,
        /// each call does at most the budget (I6), and each call yields one outcome to audit (I5).
        #[test]
        fn random_sequences_keep_the_invariants(fwb in any::<bool>(), steps in proptest::collection::vec(step(), 1..25)) {
            let mut f = fixture(fwb);
            let total = (RAM.size / PAGE_SIZE) as usize;
            let mut model_nc = vec![false; total];
            let mut model_pins = vec![0u16; total];
            let mut audited = 0usize;
            let mut calls = 0usize;
            for step in steps {
                match step {
                    Step::Set { page, pages, nc } => {
                        let pages = pages.min(total as u64 - page);
                        let mut at = RAM.ipa + page * PAGE_SIZE;
                        let end = at + pages * PAGE_SIZE;
                        let attribute = if nc { Attribute::NonCacheable } else { Attribute::WriteBack };
                        loop {
                            f.arch.clear();
                            calls += 1;
                            let result = f.set(at, end - at, attribute);
                            audited += 1;
                            match result {
                                Ok(p) => {
                                    prop_assert!(p.done <= WORK_BUDGET && p.done > 0);
                                    check_i2(&f.arch.ops, &model_nc).map_err(TestCaseError::fail)?;
                                    no_pinned_page_broken(&f.arch.ops, &model_pins)?;
                                    let first = ((at - RAM.ipa) / PAGE_SIZE) as usize;
                                    model_nc[first..first + (p.done / PAGE_SIZE) as usize].fill(nc);
                                    at += p.done;
                                    if p.complete { break; }
                                }
                                Err(Status::Busy) => {
                                    let first = ((at - RAM.ipa) / PAGE_SIZE) as usize;
                                    let chunk = (end.min((at & !(BLOCK - 1)) + BLOCK) - at) / PAGE_SIZE;
                                    prop_assert!(model_pins[first..first + chunk as usize].iter().any(|&p| p > 0));
                                    prop_assert!(f.arch.ops.is_empty());
                                    break;
                                }
                                Err(other) => return Err(TestCaseError::fail(format!("unexpected {other:?}"))),
                            }
                        }
                    }
                    Step::Pin { page, pages } => {
                        let pages = pages.min(total as u64 - page) as usize;
                        f.arch.clear();
                        f.manager.pin(&mut f.memory, &mut f.arch, RAM.ipa + page * PAGE_SIZE, pages as u64 * PAGE_SIZE).unwrap();
                        no_pinned_page_broken(&f.arch.ops, &model_pins)?;
                        for pins in &mut model_pins[page as usize..page as usize + pages] {
                            *pins += 1;
                        }
                    }
                    Step::Unpin { page, pages } => {
                        let pages = pages.min(total as u64 - page) as usize;
                        f.manager.unpin(RAM.ipa + page * PAGE_SIZE, pages as u64 * PAGE_SIZE);
                        for pins in &mut model_pins[page as usize..page as usize + pages] {
                            *pins = pins.saturating_sub(1);
                        }
                    }
                    Step::Cmo { offset, len, op } => {
                        let op = [CacheOp::Clean, CacheOp::Invalidate, CacheOp::CleanInvalidate][op as usize - 1];
                        let len = len.min(RAM.size - offset);
                        f.arch.clear();
                        calls += 1;
                        audited += 1;
                        let p = f.cmo(RAM.ipa + offset, len, op).unwrap();
                        prop_assert!(p.done <= WORK_BUDGET);
                        // Through the alias, with no mapping or TLBI of its own.
                        prop_assert!(f.arch.ops.iter().all(|op| matches!(op, Op::Dc(..) | Op::DsbIsh)));
                    }
                }
                f.manager.check_invariants(&f.memory).map_err(TestCaseError::fail)?;
                for (i, &nc) in model_nc.iter().enumerate() {
                    let info = f.manager.get(&f.memory, RAM.ipa + i as u64 * PAGE_SIZE).unwrap();
                    prop_assert_eq!(info.attribute == Attribute::NonCacheable, nc, "page {}", i);
                    prop_assert_eq!(info.pins, model_pins[i]);
                }
            }
            prop_assert_eq!(audited, calls);
        }
    }

    #[test]
    fn stage2_format_decodes_what_the_engine_writes() {
        let mut f = fixture(false);
        f.set(R0, PAGE_SIZE, Attribute::NonCacheable).unwrap();
        let d = f
            .manager
            .stage2
            .translate(&f.memory, R0)
            .unwrap()
            .descriptor;
        assert_eq!(
            Stage2 { fwb: false }.decode(d).unwrap().0,
            MemoryType::NormalNonCacheable
        );
    }
}
