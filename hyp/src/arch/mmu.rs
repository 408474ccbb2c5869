//! The hypervisor's own EL2 stage-1 map (identity: VA == PA): its own RAM as Normal
//! write-back, the MMIO it drives as Device, nothing else (flash is never mapped), plus one
//! level-1 table at [`ALIAS_BASE`] for the alias of guest RAM, which `hyp_core::alias` fills and
//! edits. Built by the boot CPU with the MMU off in tables the linker script reserves, then
//! shared by every CPU.

use super::sysreg::{SCTLR_EL2_RES1, TCR_EL2_RES1};
use super::{dsb_sy, invalidate_range, isb};
use aarch64_cpu::registers::{
    Readable, Writeable, ID_AA64MMFR0_EL1, MAIR_EL2, SCTLR_EL2, TCR_EL2, TTBR0_EL2,
};
use core::arch::asm;
use core::sync::atomic::{AtomicU64, Ordering};
use hyp_core::alias::AliasPlace;
use hyp_core::pagetable::{
    El2, MapError, MemoryType, PageTable, Permissions, TableMemory, ENTRIES, PAGE_SIZE,
};

/// EL2 virtual-address bits (T0SZ = 16): a level-0 walk covering every PA QEMU virt uses.
const VA_BITS: u32 = 48;

/// MAIR, TCR, TTBR0 and SCTLR for EL2, published for secondary CPUs, which load them in
/// assembly with their MMU still off (so the boot CPU cleans them to the point of coherency).
#[unsafe(no_mangle)]
static SECONDARY_MMU: [AtomicU64; 4] = [const { AtomicU64::new(0) }; 4];

/// The entry `index` of the table at `table`, as an atomic: tables are read by other CPUs and
/// by the hardware walker while they are written, so each entry is accessed with one 64-bit
/// load or store, and no reference to a whole table (let alone a `&mut`) is ever made.
/// Relaxed ordering suffices: the barriers the stage-2 engine issues (DSB) order the writes
/// for the walker, and the attribute lock orders them between CPUs.
///
/// # Safety
/// `table` must be the address of a live table (4 KiB-aligned, identity-mapped, or accessed
/// with the MMU off) that no code accesses other than through these atomics, and `index` must be
/// below [`ENTRIES`].
unsafe fn entry_at<'a>(table: u64, index: usize) -> &'a AtomicU64 {
    debug_assert!(index < ENTRIES && table.is_multiple_of(PAGE_SIZE));
    let pointer = (table as *mut u64).wrapping_add(index);
    // SAFETY: the caller guarantees `pointer` is an aligned entry of a live table that is only
    // ever accessed atomically.
    unsafe { AtomicU64::from_ptr(pointer) }
}

/// Table memory between two linker symbols, handed out front to back. Used before the MMU (and
/// hence the heap) is on.
pub struct BootTables {
    next: u64,
    end: u64,
}

unsafe extern "C" {
    static __boot_tables_start: u8;
    static __boot_tables_end: u8;
    static __image_start: u8;
    static __heap_start: u8;
}

/// Address of a linker symbol.
fn symbol(s: &u8) -> u64 {
    s as *const u8 as u64
}

impl BootTables {
    /// The region the linker script reserves.
    pub fn new() -> Self {
        // SAFETY: taking the address of a linker symbol does not read it.
        let (start, end) = unsafe { (symbol(&__boot_tables_start), symbol(&__boot_tables_end)) };
        Self { next: start, end }
    }
}

impl TableMemory for BootTables {
    fn allocate(&mut self) -> Option<u64> {
        if self.next >= self.end {
            return None;
        }
        let pa = self.next;
        self.next += PAGE_SIZE;
        for index in 0..ENTRIES {
            self.set_entry(pa, index, 0);
        }
        Some(pa)
    }

    fn entry(&self, table: u64, index: usize) -> u64 {
        // SAFETY: `table` was handed out by `allocate` from the linker-reserved region, which
        // only this allocator uses; VA == PA with the MMU off and under the identity map.
        unsafe { entry_at(table, index) }.load(Ordering::Relaxed)
    }

    fn set_entry(&mut self, table: u64, index: usize, value: u64) {
        // SAFETY: as in `entry`.
        unsafe { entry_at(table, index) }.store(value, Ordering::Relaxed)
    }
}

/// Table memory from the heap (after the MMU is on). It holds nothing: each entry is read or
/// written where it lies, atomically, so CPUs that share the attribute lock can read the same
/// tables at once with `&HeapTables`, and a writer, which holds the lock alone, edits them with
/// `&mut HeapTables`. Entries of the boot tables (the alias's level-1 table) are reached the same way.
#[derive(Debug)]
pub struct HeapTables;

impl TableMemory for HeapTables {
    fn allocate(&mut self) -> Option<u64> {
        let layout =
            core::alloc::Layout::from_size_align(PAGE_SIZE as usize, PAGE_SIZE as usize).ok()?;
        // SAFETY: the layout has a non-zero size.
        let ptr = unsafe { alloc::alloc::alloc_zeroed(layout) };
        (!ptr.is_null()).then_some(ptr as u64)
    }

    fn allocate_for_overwrite(&mut self) -> Option<u64> {
        let layout =
            core::alloc::Layout::from_size_align(PAGE_SIZE as usize, PAGE_SIZE as usize).ok()?;
        // SAFETY: the layout has a non-zero size. The caller writes every entry before reading
        // any (the trait's contract), so the block's old contents are never read.
        let ptr = unsafe { alloc::alloc::alloc(layout) };
        (!ptr.is_null()).then_some(ptr as u64)
    }

    fn entry(&self, table: u64, index: usize) -> u64 {
        // SAFETY: `table` came from `allocate` (a live heap block of table size, not yet freed)
        // or from the boot tables (never freed), is only accessed through `entry_at`, and the
        // hypervisor's map is the identity.
        unsafe { entry_at(table, index) }.load(Ordering::Relaxed)
    }

    fn set_entry(&mut self, table: u64, index: usize, value: u64) {
        // SAFETY: as in `entry`.
        unsafe { entry_at(table, index) }.store(value, Ordering::Relaxed)
    }

    fn free(&mut self, pa: u64) {
        if let Ok(layout) =
            core::alloc::Layout::from_size_align(PAGE_SIZE as usize, PAGE_SIZE as usize)
        {
            // SAFETY: `pa` came from `allocate` with this layout, and the caller guarantees no
            // walker can reach it any more (its TLB invalidation completed).
            unsafe { alloc::alloc::dealloc(pa as *mut u8, layout) };
        }
    }
}

/// Builds the EL2 map: `ram` banks write-back and executable, `mmio` regions Device.
///
/// # Errors
/// A [`MapError`] when the boot tables run out or regions overlap.
pub fn build(
    tables: &mut BootTables,
    ram: &[(u64, u64)],
    mmio: &[(u64, u64)],
) -> Result<PageTable<El2>, MapError> {
    let mut map = PageTable::new(tables, El2, 0, VA_BITS)?;
    for &(base, size) in ram {
        map.map(
            tables,
            base,
            base,
            size,
            MemoryType::NormalWriteBack,
            Permissions::RWX,
        )?;
    }
    for &(base, size) in mmio {
        let start = base & !(PAGE_SIZE - 1);
        let end = (base + size + PAGE_SIZE - 1) & !(PAGE_SIZE - 1);
        map.map(
            tables,
            start,
            start,
            end - start,
            MemoryType::Device,
            Permissions::RW,
        )?;
    }
    Ok(map)
}

/// Turns on the EL2 MMU and caches with `map` on this (the boot) CPU, and publishes the
/// configuration for secondary CPUs.
///
/// # Safety
/// `map` must identity-map all code, data and stacks of the hypervisor, and the MMU must be off.
pub unsafe fn enable(map: &PageTable<El2>) {
    // The output size is the CPU's PA size, at most 48 bits (52 would need another format).
    let parange = ID_AA64MMFR0_EL1
        .read(ID_AA64MMFR0_EL1::PARange)
        .min(TCR_EL2::PS::Value::Bits_48 as u64);
    let tcr = TCR_EL2_RES1
        + TCR_EL2::T0SZ.val(64 - VA_BITS as u64)
        + TCR_EL2::IRGN0::WriteBack_ReadAlloc_WriteAlloc_Cacheable
        + TCR_EL2::ORGN0::WriteBack_ReadAlloc_WriteAlloc_Cacheable
        + TCR_EL2::SH0::Inner
        + TCR_EL2::TG0::KiB_4
        + TCR_EL2::PS.val(parange);
    let sctlr = SCTLR_EL2_RES1
        + SCTLR_EL2::M::Enable
        + SCTLR_EL2::C::Cacheable
        + SCTLR_EL2::SA::Enable
        + SCTLR_EL2::I::Cacheable;
    let values = [El2::MAIR, tcr.value, map.root(), sctlr.value];
    for (slot, value) in SECONDARY_MMU.iter().zip(values) {
        slot.store(value, Ordering::Relaxed);
    }
    // Everything written so far went to memory uncached; drop whatever stale lines the caches
    // may hold for the hypervisor's RAM before they start being used.
    // SAFETY: linker symbols; the range is the hypervisor's own image, tables and stacks.
    let (start, end) = unsafe { (symbol(&__image_start), symbol(&__heap_start)) };
    invalidate_range(start, end - start);
    // The architectural sequence: registers, ISB, local TLB invalidate, DSB, ISB, then SCTLR.
    // The ISBs (compiler barriers too) keep every memory access of this function on its side
    // of the MMU switch; the register accesses themselves declare no memory effects.
    MAIR_EL2.set(El2::MAIR);
    TCR_EL2.write(tcr);
    TTBR0_EL2.set(map.root());
    isb();
    // SAFETY: TLB maintenance only; nothing is translated by the EL2 regime yet.
    unsafe { asm!("tlbi alle2", "dsb nsh", options(nostack, preserves_flags)) };
    isb();
    // The map covers the hypervisor (caller's contract), so turning it on changes no address.
    SCTLR_EL2.write(sctlr);
    isb();
    // Secondary CPUs read the configuration with their MMU off.
    let config = SECONDARY_MMU.as_ptr() as u64;
    super::clean_range(config, core::mem::size_of_val(&SECONDARY_MMU) as u64);
    dsb_sy();
    isb();
}

/// Adds the MMIO the hypervisor drives to the live EL2 map. Guest RAM is deliberately absent
/// from the identity map: the hypervisor reaches it only through its alias
/// ([`create_alias_table`]), whose pages have the attributes stage 2 gives them, so it never
/// holds a cacheable alias of a non-cacheable page. Only
/// invalid entries are filled, which needs no break-before-make and no TLB invalidation
/// (translation faults are never cached), just a barrier before the first use.
///
/// # Errors
/// A [`MapError`] when the boot tables run out.
pub fn extend(
    tables: &mut BootTables,
    map: &mut PageTable<El2>,
    board: &stagehand_platform::board::Board,
) -> Result<(), MapError> {
    let mut mmio: alloc::vec::Vec<(u64, u64)> = board
        .uarts
        .iter()
        .map(|u| (u.region.base, u.region.size))
        .collect();
    if let Some(gic) = &board.gic {
        mmio.push((gic.distributor.base, gic.distributor.size));
        mmio.extend(gic.redistributors.iter().map(|r| (r.base, r.size)));
    }
    mmio.extend(
        board
            .fw_cfg
            .iter()
            .chain(board.smmu.iter())
            .map(|r| (r.base, r.size)),
    );
    mmio.extend(board.pcie.iter().map(|p| (p.ecam.base, p.ecam.size)));
    for (base, size) in mmio {
        let start = base & !(PAGE_SIZE - 1);
        let end = (base + size).next_multiple_of(PAGE_SIZE);
        map.map(
            tables,
            start,
            start,
            end - start,
            MemoryType::Device,
            Permissions::RW,
        )?;
    }
    super::dsb_ish();
    isb();
    Ok(())
}

/// EL2 address of IPA 0 in the hypervisor's alias of guest RAM (guest IPA `ipa` is at
/// `ALIAS_BASE + ipa`): 512 GiB-aligned, so one level-1 table of the EL2 map covers it, and far
/// above every physical address of the board, so it never collides with the identity map.
pub const ALIAS_BASE: u64 = 0x7f00_0000_0000;

/// Creates the empty level-1 table of the alias of guest RAM, linked into the EL2 map; the
/// attribute manager fills it ([`hyp_core::alias`]).
///
/// # Errors
/// A [`MapError`] when the boot tables run out.
pub fn create_alias_table(
    tables: &mut BootTables,
    map: &mut PageTable<El2>,
) -> Result<AliasPlace, MapError> {
    let table = map.table_at(tables, ALIAS_BASE, 1)?;
    Ok(AliasPlace {
        va: ALIAS_BASE,
        table,
    })
}
