//! The hypervisor's alias of guest RAM: one EL2 stage-1 mapping of all of it, at
//! `va + ipa`, whose memory type mirrors the guest's stage 2 page by page (write-back or
//! non-cacheable, never Device). Cache maintenance by VA and the hypervisor's reads and writes
//! of guest memory go through it with no mapping, unmapping or TLB invalidation per call; it
//! changes only when an attribute changes, under the attribute manager's exclusive lock, by
//! break-before-make. So while a page is non-cacheable in stage 2 it is non-cacheable here
//! too, and the hypervisor holds no cacheable alias of it (invariant I1).
//!
//! Layout: 2 MiB blocks at first (a level-3 table where RAM does not fill a region). The first
//! attribute change that cuts a block splits it, and the region stays split while changes only
//! cut it: merging it back when its pages agree again would cost a TLBI ALLE2IS and the split
//! again at the next change (the 512 entries are most of a one-page MEM_SET_ATTR), while a
//! split region costs only its 4 KiB table and TLB reach for the hypervisor's own cache
//! maintenance. A change of a whole region makes it one block again (one entry instead of 512).
//! Stage 2 keeps its own schedule (it merges, and splits for DMA pins; the alias has no device
//! walking it). The EL2
//! walker reads these tables through inner-shareable write-back walks (TCR_EL2 SH0/IRGN0/
//! ORGN0), so it is coherent with the CPU's stores: no table is cleaned to the point of
//! coherency, a DSB ISHST suffices before a walk may see an entry.
//!
//! Every CPU shares the alias, so its TLB invalidations are broadcast (TLBI VAE2IS, or one
//! TLBI ALLE2IS above [`ALIAS_TLBI_THRESHOLD`] pages). No CPU uses an entry while it is broken:
//! users (cache operations, guest-memory copies) hold the attribute lock shared, editors hold
//! it alone.

use crate::layout::GuestRam;
use crate::maintenance::{Arch, TableWrite};
use crate::pagetable::{
    level_size, El2, Format, MapError, MemoryType, PageTable, Permissions, TableMemory,
    ADDRESS_MASK, PAGE_SIZE, TABLE_OR_PAGE, VALID,
};

/// Bytes a level-2 entry of the alias maps.
const BLOCK: u64 = 2 << 20;
/// Pages per 2 MiB block.
const PAGES_PER_BLOCK: usize = 512;
/// Input-address bits of the alias's level-1 table: it covers 512 GiB of IPA.
const INPUT_BITS: u32 = 39;
/// Above this many pages broken at once, one TLBI ALLE2IS replaces the per-page TLBI VAE2IS,
/// so the TLBI count stays constant for large changes.
pub const ALIAS_TLBI_THRESHOLD: usize = 16;

/// The alias: an EL2 level-1 table (already linked into the EL2 map by its owner) through
/// which IPA `ipa` of guest RAM is reached at EL2 address `va + ipa`.
pub struct HypAlias {
    tree: PageTable<El2>,
    va: u64,
}

/// A change of the alias checked and prepared by [`HypAlias::prepare`]: the level-2 entry of
/// its region and, when the change cuts a block, the table of the split.
#[derive(Debug)]
pub struct PreparedChange {
    ipa: u64,
    slot: (u64, usize),
    entry: u64,
    split_table: Option<u64>,
}

/// Where the alias lives: its base VA (512 GiB-aligned, so that the level-1 table indexes the
/// IPA itself) and the physical address of its empty level-1 table, linked into the EL2 map.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AliasPlace {
    /// EL2 VA of IPA 0.
    pub va: u64,
    /// Physical address of the level-1 table that maps `[va, va + 512 GiB)`.
    pub table: u64,
}

impl HypAlias {
    /// Maps all of `ram` write-back (2 MiB blocks where aligned) into the empty table of
    /// `place`. Nothing was mapped there, so no TLB can hold an entry for it: the caller issues
    /// DSB ISHST and ISB before the first use.
    ///
    /// # Errors
    /// A [`MapError`] when tables run out or guest RAM lies beyond 512 GiB of IPA.
    pub fn new(
        memory: &mut impl TableMemory,
        place: AliasPlace,
        ram: &GuestRam,
    ) -> Result<Self, MapError> {
        if !place.va.is_multiple_of(1 << INPUT_BITS) {
            return Err(MapError::Misaligned);
        }
        let mut tree = PageTable::from_root(place.table, El2, 1, INPUT_BITS);
        // One 2 MiB region at a time, so that no 1 GiB block is made (the alias splits blocks
        // into pages only).
        let mut at = ram.ipa;
        while at < ram.ipa_end() {
            let end = ((at & !(BLOCK - 1)) + BLOCK).min(ram.ipa_end());
            tree.map(
                memory,
                at,
                ram.pa + (at - ram.ipa),
                end - at,
                MemoryType::NormalWriteBack,
                Permissions::RW,
            )?;
            at = end;
        }
        Ok(Self { tree, va: place.va })
    }

    /// The EL2 VA of guest `ipa` (guest RAM, checked by the caller).
    #[inline]
    pub fn va_of(&self, ipa: u64) -> u64 {
        self.va + ipa
    }

    fn memory_type(non_cacheable: bool) -> MemoryType {
        if non_cacheable {
            MemoryType::NormalNonCacheable
        } else {
            MemoryType::NormalWriteBack
        }
    }

    /// The first half of [`Self::change`], the only one that can fail: finds whether the change
    /// of the pages of one 2 MiB region, from `ipa` on, whose `changing` flag is set, cuts a
    /// block, and if so allocates the table of the split. Nothing is changed; a prepared change
    /// that is not carried out is given back with [`Self::abandon`].
    ///
    /// # Errors
    /// [`MapError::OutOfTableMemory`] when a split finds no table.
    pub fn prepare(
        &self,
        memory: &mut impl TableMemory,
        ipa: u64,
        changing: &[bool],
    ) -> Result<PreparedChange, MapError> {
        let region = ipa & !(BLOCK - 1);
        let first = ((ipa - region) / PAGE_SIZE) as usize;
        let (table, index) = self
            .tree
            .slot(memory, region, 2)
            .ok_or(MapError::OutOfRange)?;
        let entry = memory.entry(table, index);
        if entry & VALID == 0 {
            return Err(MapError::OutOfRange);
        }
        let is_block = entry & TABLE_OR_PAGE == 0;
        let whole = first == 0 && changing.len() == PAGES_PER_BLOCK && changing.iter().all(|&c| c);
        let split_table = if is_block && !whole {
            Some(
                memory
                    .allocate_for_overwrite()
                    .ok_or(MapError::OutOfTableMemory)?,
            )
        } else {
            None
        };
        Ok(PreparedChange {
            ipa,
            slot: (table, index),
            entry,
            split_table,
        })
    }

    /// Gives back what [`Self::prepare`] allocated, for a change that will not happen.
    pub fn abandon(memory: &mut impl TableMemory, prepared: PreparedChange) {
        if let Some(table) = prepared.split_table {
            memory.free(table);
        }
    }

    /// Changes the memory type of the pages of one 2 MiB region, from `ipa` on, whose
    /// `changing` flag is set, to non-cacheable or write-back: break, DSB ISHST, TLBI VAE2IS per
    /// page (one TLBI ALLE2IS above the threshold), DSB ISH, make, DSB ISHST, ISB. A block the
    /// change cuts is split (the table `prepared` holds), with the changing pages already
    /// invalid in the new table; a block changed whole is broken and made whole. `prepared`
    /// comes from [`Self::prepare`] with the same `changing`, under the same lock.
    pub fn change(
        &mut self,
        memory: &mut impl TableMemory,
        arch: &mut impl Arch,
        ram: &GuestRam,
        prepared: PreparedChange,
        changing: &[bool],
        non_cacheable: bool,
    ) {
        let ipa = prepared.ipa;
        let region = ipa & !(BLOCK - 1);
        let first = ((ipa - region) / PAGE_SIZE) as usize;
        let pa_of = |at: u64| ram.pa + (at - ram.ipa);
        let memory_type = Self::memory_type(non_cacheable);
        let (l2_table, l2_index) = prepared.slot;
        let entry = prepared.entry;
        let is_block = entry & VALID != 0 && entry & TABLE_OR_PAGE == 0;
        let whole = first == 0 && changing.len() == PAGES_PER_BLOCK && changing.iter().all(|&c| c);
        if whole && prepared.split_table.is_none() {
            // The whole region changes: break its block (one TLBI VAE2IS) or its table (TLBI
            // ALLE2IS: any page may be cached), and make one block with the new type.
            let table_descriptor = !is_block;
            self.break_entries(
                memory,
                arch,
                core::iter::once((l2_table, l2_index, region, 2)),
                table_descriptor,
            );
            memory.set_entry(
                l2_table,
                l2_index,
                self.tree
                    .leaf_descriptor(pa_of(region), 2, memory_type, Permissions::RW),
            );
            arch.table_write(TableWrite::AliasMake {
                va: self.va_of(region),
                level: 2,
                non_cacheable,
            });
            arch.dsb_ishst();
            arch.isb();
            if table_descriptor {
                // No walker can reach the old table any more (its TLBI completed).
                memory.free(entry & ADDRESS_MASK);
            }
            return;
        }
        let table = if let Some(new_table) = prepared.split_table {
            // Split: every page keeps the block's type except those changing, left invalid.
            let old_type = El2
                .decode(entry)
                .map_or(MemoryType::NormalWriteBack, |(memory_type, _)| memory_type);
            let descriptor = self
                .tree
                .leaf_descriptor(pa_of(region), 3, old_type, Permissions::RW);
            for i in 0..PAGES_PER_BLOCK {
                memory.set_entry(new_table, i, descriptor + i as u64 * PAGE_SIZE);
            }
            for (i, _) in changing.iter().enumerate().filter(|(_, &c)| c) {
                memory.set_entry(new_table, first + i, 0);
            }
            self.break_entries(
                memory,
                arch,
                core::iter::once((l2_table, l2_index, region, 2)),
                false,
            );
            memory.set_entry(l2_table, l2_index, new_table | TABLE_OR_PAGE | VALID);
            arch.table_write(TableWrite::AliasTable {
                va: self.va_of(region),
            });
            new_table
        } else {
            let table = entry & ADDRESS_MASK;
            let broken = changing
                .iter()
                .enumerate()
                .filter(|(_, &c)| c)
                .map(|(i, _)| (table, first + i, ipa + i as u64 * PAGE_SIZE, 3));
            self.break_entries(memory, arch, broken, false);
            table
        };
        for (i, _) in changing.iter().enumerate().filter(|(_, &c)| c) {
            let at = ipa + i as u64 * PAGE_SIZE;
            memory.set_entry(
                table,
                first + i,
                self.tree
                    .leaf_descriptor(pa_of(at), 3, memory_type, Permissions::RW),
            );
            arch.table_write(TableWrite::AliasMake {
                va: self.va_of(at),
                level: 3,
                non_cacheable,
            });
        }
        arch.dsb_ishst();
        arch.isb();
    }

    /// Break-before-make's break of alias entries `(table, index, ipa, level)`: each made
    /// invalid, DSB ISHST (the walker sees the invalid entries), the TLB entries of every CPU
    /// removed, DSB ISH. A leaf (page or block) is one TLB entry, removed by one TLBI VAE2IS of
    /// its VA (which also drops the walk-cache entries on its path); a broken table
    /// descriptor (`table_descriptor`) may have any of its 512 pages cached, so it takes TLBI
    /// ALLE2IS, as do more than [`ALIAS_TLBI_THRESHOLD`] leaves.
    fn break_entries(
        &self,
        memory: &mut impl TableMemory,
        arch: &mut impl Arch,
        entries: impl Iterator<Item = (u64, usize, u64, usize)> + Clone,
        table_descriptor: bool,
    ) {
        let mut count = 0;
        for (table, index, ipa, level) in entries.clone() {
            memory.set_entry(table, index, 0);
            arch.table_write(TableWrite::AliasBreak {
                va: self.va_of(ipa),
                level,
            });
            count += 1;
        }
        arch.dsb_ishst();
        if table_descriptor || count > ALIAS_TLBI_THRESHOLD {
            arch.tlbi_alle2is();
        } else {
            for (_, _, ipa, _) in entries {
                arch.tlbi_vae2is(self.va_of(ipa));
            }
        }
        arch.dsb_ish();
    }

    /// Checks that the alias maps every page of `ram` to its own PA, read-write and never
    /// executable, non-cacheable exactly where `non_cacheable(ipa)` says, and with a block only
    /// over a uniform region.
    ///
    /// # Errors
    /// A description of the first mismatch.
    pub fn check(
        &self,
        memory: &impl TableMemory,
        ram: &GuestRam,
        non_cacheable: impl Fn(u64) -> bool,
    ) -> Result<(), alloc::string::String> {
        use alloc::format;
        let mut ipa = ram.ipa;
        while ipa < ram.ipa_end() {
            let Some(t) = self.tree.translate(memory, ipa) else {
                return Err(format!("alias of IPA {ipa:#x} is unmapped"));
            };
            if t.output != ram.pa + (ipa - ram.ipa) {
                return Err(format!("alias of IPA {ipa:#x} maps {:#x}", t.output));
            }
            let Some((memory_type, permissions)) = El2.decode(t.descriptor) else {
                return Err(format!("alias of IPA {ipa:#x}: unknown encoding"));
            };
            if permissions.execute || !permissions.write {
                return Err(format!(
                    "alias of IPA {ipa:#x}: permissions {permissions:?}"
                ));
            }
            let span = if t.level == 2 {
                level_size(2)
            } else {
                PAGE_SIZE
            };
            let mut page = ipa;
            while page < ipa + span {
                let want = Self::memory_type(non_cacheable(page));
                if memory_type != want {
                    return Err(format!(
                        "alias of IPA {page:#x} is {memory_type:?}, ledger {want:?}"
                    ));
                }
                page += PAGE_SIZE;
            }
            ipa += span;
        }
        Ok(())
    }
}
