//! The per-CPU maintenance window: a run of EL2 virtual addresses, backed by one level-3 table
//! of the hypervisor's own map, through which the hypervisor reaches guest pages, each mapped
//! with the attribute the guest's stage 2 gives it. The hypervisor keeps no other mapping of
//! guest RAM once the guest runs, so it never holds a cacheable alias of a non-cacheable page
//! (invariant I1). Each CPU owns its window, so no other CPU can remap it mid-operation.
//!
//! A window writes its table through table memory of its own, so mapping it needs `&mut` of the
//! window alone: a CPU that only reads the guest's stage 2 (under the attribute manager's
//! shared lock) never needs write access to the guest's tables to use its window.

use crate::maintenance::{Arch, TableWrite};
use crate::pagetable::{
    El2, Format, MemoryType, Permissions, TableMemory, PAGE_SIZE, TABLE_OR_PAGE, VALID,
};

/// Pages one window maps at most (one level-3 table: 2 MiB).
pub const WINDOW_PAGES: u64 = 512;
/// Above this many pages, unmapping invalidates all EL2 TLB entries at once instead of page by
/// page, so the TLBI count stays constant for large operations.
pub const WINDOW_TLBI_THRESHOLD: u64 = 16;

/// One CPU's window, writing its table through `M`.
#[derive(Debug)]
pub struct Window<M: TableMemory> {
    va: u64,
    table: u64,
    mapped: u64,
    memory: M,
}

impl<M: TableMemory> Window<M> {
    /// A window at EL2 address `va` (2 MiB-aligned) whose level-3 table, already linked into
    /// the EL2 map, is at physical address `table` in `memory`.
    pub const fn new(va: u64, table: u64, memory: M) -> Self {
        Self {
            va,
            table,
            mapped: 0,
            memory,
        }
    }

    /// First VA of the window.
    pub fn va(&self) -> u64 {
        self.va
    }

    /// Maps `pages` physically contiguous pages from `pa`; page `i` is non-cacheable when
    /// `non_cacheable(i)`. Returns the VA of `pa`. The window must be empty.
    pub fn map(
        &mut self,
        arch: &mut impl Arch,
        pa: u64,
        pages: u64,
        non_cacheable: impl Fn(u64) -> bool,
    ) -> u64 {
        debug_assert!(self.mapped == 0 && pages <= WINDOW_PAGES && pa.is_multiple_of(PAGE_SIZE));
        let mut all_nc = true;
        for i in 0..pages {
            let nc = non_cacheable(i);
            all_nc &= nc;
            let memory_type = if nc {
                MemoryType::NormalNonCacheable
            } else {
                MemoryType::NormalWriteBack
            };
            self.memory.set_entry(
                self.table,
                i as usize,
                (pa + i * PAGE_SIZE)
                    | El2.leaf_attributes(memory_type, Permissions::RW)
                    | TABLE_OR_PAGE
                    | VALID,
            );
        }
        self.mapped = pages;
        arch.table_write(TableWrite::WindowMap {
            va: self.va,
            pa,
            pages,
            non_cacheable: all_nc,
        });
        // The walker must see the entries, and this CPU must not use a stale context.
        arch.dsb_ishst();
        arch.isb();
        self.va
    }

    /// Unmaps whatever is mapped and removes it from every TLB.
    pub fn unmap(&mut self, arch: &mut impl Arch) {
        let pages = core::mem::take(&mut self.mapped);
        if pages == 0 {
            return;
        }
        // A plain loop: for the usual few entries it is cheaper than a `memset` call.
        for index in 0..pages as usize {
            self.memory.set_entry(self.table, index, 0);
        }
        arch.table_write(TableWrite::WindowUnmap { va: self.va, pages });
        arch.dsb_ishst();
        if pages > WINDOW_TLBI_THRESHOLD {
            arch.tlbi_alle2is();
        } else {
            for i in 0..pages {
                arch.tlbi_vae2is(self.va + i * PAGE_SIZE);
            }
        }
        arch.dsb_ish();
        arch.isb();
    }

    /// Pages mapped now.
    pub fn mapped(&self) -> u64 {
        self.mapped
    }

    /// Physical address of the window's level-3 table.
    pub fn table(&self) -> u64 {
        self.table
    }
}
