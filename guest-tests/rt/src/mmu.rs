//! Stage-1 translation at EL1: an identity map of the guest's RAM (Normal write-back) and of the
//! low 1 GiB of MMIO (Device), with a 4 KiB granule and 48-bit VAs, plus an API to map more
//! ranges, change the memory type of a range, or map an alias of a physical range elsewhere.
//!
//! Tables come from a fixed pool in .bss. Changing a live entry follows break-before-make:
//! invalidate the entry, DSB, TLBI, DSB, then write the new one.

use core::cell::UnsafeCell;
use core::sync::atomic::{AtomicU64, Ordering};

use spin::Mutex;

use crate::arch;
use crate::dt::{BootInfo, Region};

/// The memory type of a mapping (the MAIR index it uses).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MemoryType {
    /// Device-nGnRE, never executable.
    Device,
    /// Normal, inner and outer write-back, read- and write-allocate.
    NormalWriteBack,
    /// Normal, non-cacheable.
    NormalNonCacheable,
}

impl MemoryType {
    fn mair_index(self) -> u64 {
        match self {
            MemoryType::Device => 0,
            MemoryType::NormalWriteBack => 1,
            MemoryType::NormalNonCacheable => 2,
        }
    }

    /// This type's attribute byte in MAIR_EL1 (as PAR_EL1.ATTR reports it too).
    pub fn mair_attribute(self) -> u8 {
        (MAIR >> (8 * self.mair_index())) as u8
    }
}

/// MAIR_EL1: index 0 Device-nGnRE, 1 Normal WB RaWa, 2 Normal NC.
const MAIR: u64 = 0x04 | (0xff << 8) | (0x44 << 16);

/// Bytes per page.
pub const PAGE_SIZE: usize = 4096;
const ENTRIES: usize = 512;
const TABLE_POOL: usize = 96;
/// VA bits (T0SZ = 64 - VA_BITS): four levels, starting at level 0.
const VA_BITS: u64 = 48;
/// Where aliases made by [`map_alias`] are placed: above every IPA a `virt` guest can have.
const ALIAS_WINDOW: usize = 1 << 45;
/// The identity-mapped MMIO below RAM.
const LOW_MMIO: Region = Region {
    base: 0,
    size: 0x4000_0000,
};

const DESC_VALID: u64 = 1 << 0;
const DESC_TABLE_OR_PAGE: u64 = 1 << 1;
const DESC_ATTR_SHIFT: u64 = 2;
/// AP[1]: EL0 may access (read and write, with AP[2] clear).
const DESC_AP_EL0: u64 = 1 << 6;
const DESC_SH_INNER: u64 = 0b11 << 8;
const DESC_AF: u64 = 1 << 10;
const DESC_PXN: u64 = 1 << 53;
const DESC_UXN: u64 = 1 << 54;
const DESC_ADDRESS: u64 = 0x0000_ffff_ffff_f000;

/// Register values a secondary CPU loads before it turns its MMU on: MAIR, TCR, TTBR0, SCTLR.
/// Read by the secondary entry code with the MMU off, so it is cleaned to the point of coherency.
pub(crate) static SECONDARY_MMU_CONFIG: SecondaryMmuConfig =
    SecondaryMmuConfig([const { AtomicU64::new(0) }; 4]);

/// The four register values, in one cache line so that one clean publishes them all.
#[repr(C, align(64))]
pub(crate) struct SecondaryMmuConfig([AtomicU64; 4]);

#[repr(C, align(4096))]
struct Table([u64; ENTRIES]);

/// The table pool. Only touched through [`PageTables`], which sits behind [`TABLES`]' lock.
struct Pool(UnsafeCell<[Table; TABLE_POOL]>);

// SAFETY: the pool is only accessed by `PageTables` methods, while holding the `TABLES` lock.
unsafe impl Sync for Pool {}

static POOL: Pool = Pool(UnsafeCell::new([const { Table([0; ENTRIES]) }; TABLE_POOL]));

/// The live translation tables; the lock serialises every change.
static TABLES: Mutex<PageTables> = Mutex::new(PageTables {
    used: 0,
    next_alias: ALIAS_WINDOW,
});

/// The allocator of tables and alias VAs, and the walker that edits them.
struct PageTables {
    used: usize,
    next_alias: usize,
}

unsafe extern "C" {
    static __image_start: u8;
    static __image_end: u8;
}

/// First address of the loaded image.
pub fn image_start() -> usize {
    (&raw const __image_start) as usize
}

/// One past the end of the image, .bss (stacks, heap, tables) included.
pub fn image_end() -> usize {
    (&raw const __image_end) as usize
}

/// Errors of the mapping API.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MapError {
    /// An address or size is not a multiple of the page size.
    Unaligned,
    /// The table pool is exhausted.
    OutOfTables,
    /// The range is outside the 48-bit VA space.
    OutOfRange,
    /// The range would change the mapping of the running image in a way that needs a
    /// break-before-make on the code doing it.
    ImageRange,
}

fn shift(level: usize) -> u32 {
    39 - 9 * level as u32
}

/// Attributes of a mapping EL0 can use: readable, writable and (for Normal memory) executable
/// at EL0; never executable at EL1 (the architecture makes EL0-writable pages PXN anyway).
fn user_attributes(memory: MemoryType) -> u64 {
    attributes(memory) | DESC_AP_EL0 | DESC_PXN
}

fn attributes(memory: MemoryType) -> u64 {
    let base = DESC_AF | (memory.mair_index() << DESC_ATTR_SHIFT);
    match memory {
        MemoryType::Device => base | DESC_PXN | DESC_UXN,
        _ => base | DESC_SH_INNER,
    }
}

impl PageTables {
    fn table(&mut self, index: usize) -> *mut u64 {
        // SAFETY: `index` < TABLE_POOL (checked by callers); the pointer is derived from the
        // pool, which only this lock holder touches.
        unsafe { (*POOL.0.get())[index].0.as_mut_ptr() }
    }

    fn root(&mut self) -> *mut u64 {
        self.table(0)
    }

    fn allocate(&mut self) -> Result<*mut u64, MapError> {
        if self.used == 0 {
            self.used = 1; // table 0 is the root
        }
        if self.used >= TABLE_POOL {
            return Err(MapError::OutOfTables);
        }
        let table = self.table(self.used);
        self.used += 1;
        for i in 0..ENTRIES {
            // SAFETY: `table` points at ENTRIES u64 of a pool table not yet reachable by the MMU.
            unsafe { table.add(i).write_volatile(0) };
        }
        Ok(table)
    }

    /// Replaces a live entry: break, TLB invalidation, make.
    fn replace(&mut self, slot: *mut u64, new: u64, va: usize, level: usize) {
        // SAFETY: `slot` points into a pool table (from `walk`); the lock is held.
        let old = unsafe { slot.read_volatile() };
        if old == new {
            return;
        }
        if old & DESC_VALID != 0 {
            // SAFETY: as above.
            unsafe { slot.write_volatile(0) };
            arch::dsb_ishst();
            let is_table = level < 3 && old & DESC_TABLE_OR_PAGE != 0;
            if is_table {
                arch::tlbi_vmalle1is();
            } else {
                arch::tlbi_vaae1is(va);
            }
            arch::dsb_ish();
        }
        // SAFETY: as above.
        unsafe { slot.write_volatile(new) };
        arch::dsb_ishst();
    }

    /// Maps `[va, va + size)` to `[pa, pa + size)` with `memory`, using the largest blocks that
    /// fit and splitting existing blocks where a sub-range changes.
    fn map(
        &mut self,
        va: usize,
        pa: usize,
        size: usize,
        memory: MemoryType,
    ) -> Result<(), MapError> {
        self.map_raw(va, pa, size, attributes(memory))
    }

    /// [`PageTables::map`] with the descriptor's attribute bits given.
    fn map_raw(
        &mut self,
        va: usize,
        pa: usize,
        size: usize,
        attributes: u64,
    ) -> Result<(), MapError> {
        if !va.is_multiple_of(PAGE_SIZE)
            || !pa.is_multiple_of(PAGE_SIZE)
            || !size.is_multiple_of(PAGE_SIZE)
        {
            return Err(MapError::Unaligned);
        }
        if va.checked_add(size).is_none_or(|end| end > 1 << VA_BITS) {
            return Err(MapError::OutOfRange);
        }
        let root = self.root();
        self.map_level(root, 0, va, pa, size, attributes)?;
        arch::dsb_ish();
        arch::isb();
        Ok(())
    }

    fn map_level(
        &mut self,
        table: *mut u64,
        level: usize,
        mut va: usize,
        mut pa: usize,
        mut size: usize,
        attributes: u64,
    ) -> Result<(), MapError> {
        let block = 1usize << shift(level);
        while size > 0 {
            let index = (va >> shift(level)) % ENTRIES;
            // SAFETY: index < ENTRIES; `table` is a pool table.
            let slot = unsafe { table.add(index) };
            let chunk = (block - va % block).min(size);
            let whole = chunk == block && pa.is_multiple_of(block);
            if level >= 1 && whole {
                let kind = if level == 3 { DESC_TABLE_OR_PAGE } else { 0 };
                let new = (pa as u64 & DESC_ADDRESS) | attributes | kind | DESC_VALID;
                self.replace(slot, new, va, level);
            } else {
                let child = self.child(slot, va, level)?;
                self.map_level(child, level + 1, va, pa, chunk, attributes)?;
            }
            va += chunk;
            pa += chunk;
            size -= chunk;
        }
        Ok(())
    }

    /// The next-level table under `slot`, creating it (or splitting a block into it).
    fn child(&mut self, slot: *mut u64, va: usize, level: usize) -> Result<*mut u64, MapError> {
        // SAFETY: `slot` points into a pool table; the lock is held.
        let entry = unsafe { slot.read_volatile() };
        if entry & DESC_VALID != 0 && entry & DESC_TABLE_OR_PAGE != 0 {
            return Ok((entry & DESC_ADDRESS) as usize as *mut u64);
        }
        let child = self.allocate()?;
        if entry & DESC_VALID != 0 {
            // A block: the new table repeats it at the next level, then replaces it.
            let block_base = va & !((1usize << shift(level)) - 1);
            let image = image_start()..image_end();
            if image.start < block_base + (1 << shift(level)) && block_base < image.end {
                return Err(MapError::ImageRange);
            }
            let step = 1u64 << shift(level + 1);
            let kind = if level + 1 == 3 {
                DESC_TABLE_OR_PAGE
            } else {
                0
            };
            let low = entry & !DESC_ADDRESS & !DESC_TABLE_OR_PAGE;
            for i in 0..ENTRIES {
                let address = (entry & DESC_ADDRESS) + i as u64 * step;
                // SAFETY: `child` is a fresh pool table of ENTRIES entries.
                unsafe { child.add(i).write_volatile(address | low | kind) };
            }
        }
        arch::dsb_ishst();
        self.replace(
            slot,
            child as u64 | DESC_TABLE_OR_PAGE | DESC_VALID,
            va,
            level,
        );
        Ok(child)
    }
}

/// Builds the boot identity map from the device tree and turns the MMU on (boot CPU, MMU off).
pub(crate) fn init(info: &BootInfo) {
    let mut tables = TABLES.lock();
    let result = (|| {
        tables.map(
            LOW_MMIO.base,
            LOW_MMIO.base,
            LOW_MMIO.size,
            MemoryType::Device,
        )?;
        // The 2 MiB blocks holding the image are mapped with pages, so that later changes to
        // other pages there (heap buffers) never need a break-before-make on running code.
        let image_first = image_start() & !(0x20_0000 - 1);
        let image_last = (image_end() + 0x20_0000 - 1) & !(0x20_0000 - 1);
        for ram in &info.ram {
            let base = ram.base & !(PAGE_SIZE - 1);
            let end = (ram.end() + PAGE_SIZE - 1) & !(PAGE_SIZE - 1);
            let split = [
                base,
                image_first.clamp(base, end),
                image_last.clamp(base, end),
                end,
            ];
            for (i, pair) in split.windows(2).enumerate() {
                let (start, stop) = (pair[0], pair[1]);
                if stop <= start {
                    continue;
                }
                if i == 1 {
                    for page in (start..stop).step_by(PAGE_SIZE) {
                        tables.map(page, page, PAGE_SIZE, MemoryType::NormalWriteBack)?;
                    }
                } else {
                    tables.map(start, start, stop - start, MemoryType::NormalWriteBack)?;
                }
            }
        }
        Ok::<(), MapError>(())
    })();
    if let Err(error) = result {
        crate::println!("guest-rt: cannot build the boot page tables: {:?}", error);
        crate::psci::system_off();
    }
    let parange = crate::read_sysreg!(id_aa64mmfr0_el1) & 0xf;
    let ips = parange.min(5);
    let tcr = (64 - VA_BITS)          // T0SZ
        | (0b01 << 8)                 // IRGN0: write-back, write-allocate
        | (0b01 << 10)                // ORGN0
        | (0b11 << 12)                // SH0: inner shareable
        | (1 << 23)                   // EPD1: no TTBR1 walks
        | ((64 - VA_BITS) << 16)      // T1SZ
        | (ips << 32); // IPS
    let sctlr = (1 << 0)              // M
        | (1 << 2)                    // C
        | (1 << 12)                   // I
        | (1 << 11) | (1 << 20) | (1 << 22) | (1 << 23) | (1 << 28) | (1 << 29); // RES1 in v8.0
    let ttbr0 = tables.root() as u64;
    for (slot, value) in SECONDARY_MMU_CONFIG.0.iter().zip([MAIR, tcr, ttbr0, sctlr]) {
        slot.store(value, Ordering::SeqCst);
    }
    arch::dc_civac(&SECONDARY_MMU_CONFIG as *const SecondaryMmuConfig as usize);
    arch::dsb_sy();
    // SAFETY: the tables identity-map the image, its stack and data, the console and the DTB
    // with the attributes the code already assumed, so turning the MMU on changes no address
    // the running code uses; barriers order the register writes.
    unsafe {
        core::arch::asm!(
            "msr mair_el1, {mair}",
            "msr tcr_el1, {tcr}",
            "msr ttbr0_el1, {ttbr0}",
            "isb",
            "tlbi vmalle1",
            "dsb nsh",
            "isb",
            "msr sctlr_el1, {sctlr}",
            "isb",
            mair = in(reg) MAIR, tcr = in(reg) tcr, ttbr0 = in(reg) ttbr0, sctlr = in(reg) sctlr,
            options(nostack),
        );
    }
}

/// Identity-maps `[addr, addr + size)` (rounded out to pages) with `memory`, replacing whatever
/// mapping the range had.
///
/// # Errors
/// See [`MapError`].
pub fn map_identity(addr: usize, size: usize, memory: MemoryType) -> Result<(), MapError> {
    let start = addr & !(PAGE_SIZE - 1);
    let end = (addr + size + PAGE_SIZE - 1) & !(PAGE_SIZE - 1);
    TABLES.lock().map(start, start, end - start, memory)
}

/// Maps `[pa, pa + size)` at `va` with `memory` (page-aligned), replacing any earlier mapping.
///
/// # Errors
/// See [`MapError`].
pub fn map(va: usize, pa: usize, size: usize, memory: MemoryType) -> Result<(), MapError> {
    TABLES.lock().map(va, pa, size, memory)
}

/// Maps an alias of the physical (IPA) range `[pa, pa + size)` at a fresh VA that differs from
/// the IPA, and returns the VA of `pa` (the offset within the page is kept).
///
/// # Errors
/// See [`MapError`].
pub fn map_alias(pa: usize, size: usize, memory: MemoryType) -> Result<usize, MapError> {
    let mut tables = TABLES.lock();
    let first = pa & !(PAGE_SIZE - 1);
    let end = (pa + size + PAGE_SIZE - 1) & !(PAGE_SIZE - 1);
    // Keep the offset within a 2 MiB block so that block mappings stay possible.
    let block = 0x20_0000;
    let va_first = tables.next_alias.next_multiple_of(block) + first % block;
    tables.map(va_first, first, end - first, memory)?;
    tables.next_alias = va_first + (end - first);
    Ok(va_first + (pa - first))
}

/// Maps an alias of `[pa, pa + size)` that EL0 can read, write and (for Normal memory) execute,
/// at a fresh VA, and returns the VA of `pa` (the offset within the page is kept). EL1 cannot
/// execute from it.
///
/// # Errors
/// See [`MapError`].
pub fn map_user_alias(pa: usize, size: usize, memory: MemoryType) -> Result<usize, MapError> {
    let mut tables = TABLES.lock();
    let first = pa & !(PAGE_SIZE - 1);
    let end = (pa + size + PAGE_SIZE - 1) & !(PAGE_SIZE - 1);
    let va_first = tables.next_alias.next_multiple_of(0x20_0000) + first % 0x20_0000;
    tables.map_raw(va_first, first, end - first, user_attributes(memory))?;
    tables.next_alias = va_first + (end - first);
    Ok(va_first + (pa - first))
}

/// Maps `[pa, pa + size)` at `va` (page-aligned) for EL0 as [`map_user_alias`] does, replacing
/// any earlier mapping; for a VA an AArch32 EL0 can reach (below 4 GiB).
///
/// # Errors
/// See [`MapError`].
pub fn map_user(va: usize, pa: usize, size: usize, memory: MemoryType) -> Result<(), MapError> {
    TABLES.lock().map_raw(va, pa, size, user_attributes(memory))
}

/// Writes a raw table descriptor in the level-`level` table (1 or 2) that translates `va`,
/// pointing the next level of the walk at `table_ipa`, which may be anything: MMIO, memory the
/// guest does not own. `None` removes the entry. Used to aim the hypervisor's own address
/// translations (MEM_QUERY_VA, CACHE_OP by VA) at hostile tables; the guest must not touch `va`
/// itself while the entry is there.
///
/// # Errors
/// [`MapError::OutOfRange`] for a level other than 1 or 2 or a VA outside the 48-bit space,
/// [`MapError::ImageRange`] if `va` is in the running image's 1 GiB region, or a table
/// allocation error.
pub fn set_raw_table_entry(
    va: usize,
    level: usize,
    table_ipa: Option<usize>,
) -> Result<(), MapError> {
    if !(1..=2).contains(&level) || va >= 1 << VA_BITS {
        return Err(MapError::OutOfRange);
    }
    if va >> 30 == image_start() >> 30 {
        return Err(MapError::ImageRange);
    }
    let mut tables = TABLES.lock();
    let mut table = tables.root();
    for current in 0..level {
        // SAFETY: index < ENTRIES; `table` is a pool table.
        let slot = unsafe { table.add((va >> shift(current)) % ENTRIES) };
        table = tables.child(slot, va, current)?;
    }
    // SAFETY: as above.
    let slot = unsafe { table.add((va >> shift(level)) % ENTRIES) };
    let new = table_ipa.map_or(0, |ipa| {
        (ipa as u64 & DESC_ADDRESS) | DESC_TABLE_OR_PAGE | DESC_VALID
    });
    // Break, invalidate the whole VMID's stage 1 (a table entry), make.
    // SAFETY: `slot` is in a pool table; the lock is held.
    unsafe { slot.write_volatile(0) };
    arch::dsb_ishst();
    arch::tlbi_vmalle1is();
    arch::dsb_ish();
    // SAFETY: as above.
    unsafe { slot.write_volatile(new) };
    arch::dsb_ish();
    arch::isb();
    Ok(())
}

/// Translates `va` with `AT S1E1R` and returns PAR_EL1 (bit 0 set: the walk faulted).
pub fn translate_read(va: usize) -> u64 {
    // SAFETY: an address translation instruction writes only PAR_EL1.
    unsafe { core::arch::asm!("at s1e1r, {}", "isb", in(reg) va, options(nostack)) };
    crate::read_sysreg!(par_el1)
}
