//! Translation tables read by a walker that does not snoop the CPU caches: an SMMU whose
//! SMMU_IDR0.COHACC is 0 (or one the configuration declares so, `smmu-coherent=off`). The CPU
//! writes tables through its write-back mapping, so a new entry may sit in a dirty cache line
//! while memory still holds the old one, and such an SMMU reads memory. Every written line must
//! therefore be cleaned to the point of coherency, and the clean completed (DSB SY), before
//! the SMMU may read it: before the CFGI/TLBI command and CMD_SYNC that let it walk again.
//!
//! [`CleaningTables`] does this for a strict device's own tables, whose edits are whole
//! `PageTable::map`/`unmap` calls followed by commands: it wraps the table memory, remembers
//! every table the edit writes (with a copy of its contents before the first write), and afterwards
//! cleans exactly the lines that changed, and new tables (allocated, zeroed and filled in the
//! cache) whole. The guest's own stage 2, which a shared device walks, is edited live with
//! break-before-make; the attribute engine cleans each entry in its sequence
//! (`AttributeManager::set_noncoherent_walker`), and [`clean_all_tables`] cleans what was built
//! before.
//!
//! Tables are addressed by physical address, which the hypervisor's own map makes equal to
//! their virtual address (its table memory is identity-mapped), so the PA is the VA a DC CVAC
//! takes.

use alloc::boxed::Box;
use alloc::vec::Vec;

use crate::maintenance::{Arch, CacheOp};
use crate::pagetable::{Format, PageTable, Table, TableMemory, ENTRIES, PAGE_SIZE};

/// A table the edit wrote.
struct Touched {
    pa: u64,
    /// Its contents before the edit; `None` for a table the edit allocated (cleaned whole).
    before: Option<Box<Table>>,
}

/// Table memory that records what an edit writes, so that [`Self::clean`] can clean it.
pub struct CleaningTables<'a, M: TableMemory> {
    memory: &'a mut M,
    touched: Vec<Touched>,
}

impl<'a, M: TableMemory> CleaningTables<'a, M> {
    /// Wraps `memory` for one edit.
    pub fn new(memory: &'a mut M) -> Self {
        Self {
            memory,
            touched: Vec::new(),
        }
    }

    /// Cleans every line the edit changed to the point of coherency, then DSB SY: after this
    /// returns, a walker that reads memory sees the edit. The caller's commands (CFGI_STE,
    /// TLBI, CMD_SYNC) come after.
    pub fn clean(self, arch: &mut impl Arch) {
        let line = arch.line_size();
        let words_per_line = (line / 8) as usize;
        for touched in &self.touched {
            let Some(before) = &touched.before else {
                arch.dcache_range(CacheOp::Clean, touched.pa, PAGE_SIZE);
                continue;
            };
            // Runs of changed lines, one range each.
            let mut run: Option<(u64, u64)> = None;
            for (index, old) in before.chunks(words_per_line).enumerate() {
                let first_word = index * words_per_line;
                let changed = old.iter().enumerate().any(|(word, &entry)| {
                    self.memory.entry(touched.pa, first_word + word) != entry
                });
                let start = touched.pa + index as u64 * line;
                match (changed, run) {
                    (true, Some((first, len))) => run = Some((first, len + line)),
                    (true, None) => run = Some((start, line)),
                    (false, Some((first, len))) => {
                        arch.dcache_range(CacheOp::Clean, first, len);
                        run = None;
                    }
                    (false, None) => {}
                }
            }
            if let Some((first, len)) = run {
                arch.dcache_range(CacheOp::Clean, first, len);
            }
        }
        arch.dsb_sy();
    }
}

impl<M: TableMemory> TableMemory for CleaningTables<'_, M> {
    fn allocate(&mut self) -> Option<u64> {
        let pa = self.memory.allocate()?;
        self.touched.push(Touched { pa, before: None });
        Some(pa)
    }

    fn allocate_for_overwrite(&mut self) -> Option<u64> {
        let pa = self.memory.allocate_for_overwrite()?;
        self.touched.push(Touched { pa, before: None });
        Some(pa)
    }

    fn entry(&self, table: u64, index: usize) -> u64 {
        self.memory.entry(table, index)
    }

    fn set_entry(&mut self, table: u64, index: usize, value: u64) {
        if !self.touched.iter().any(|t| t.pa == table) {
            let mut before = Box::new([0; ENTRIES]);
            self.memory.copy_table(table, &mut before);
            self.touched.push(Touched {
                pa: table,
                before: Some(before),
            });
        }
        self.memory.set_entry(table, index, value)
    }

    fn free(&mut self, pa: u64) {
        // A freed table is no longer reachable by any walker: nothing of it needs cleaning.
        self.touched.retain(|t| t.pa != pa);
        self.memory.free(pa)
    }
}

/// Cleans every table of `table` whole to the point of coherency, then DSB SY: for tables built
/// before a non-coherent walker is pointed at them.
pub fn clean_all_tables<F: Format>(
    table: &PageTable<F>,
    memory: &impl TableMemory,
    arch: &mut impl Arch,
) {
    let mut tables = Vec::new();
    table.for_each_table(memory, &mut |pa| tables.push(pa));
    for pa in tables {
        arch.dcache_range(CacheOp::Clean, pa, PAGE_SIZE);
    }
    arch.dsb_sy();
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::maintenance::{Op, Recorder};
    use crate::pagetable::fake::VecMemory;
    use crate::pagetable::{MemoryType, Permissions, Stage2};

    /// A strict device's empty stage 2, as the SMMU driver makes it (level-0 root, 44 bits).
    fn device_table(memory: &mut VecMemory) -> PageTable<Stage2> {
        PageTable::new(memory, Stage2 { fwb: false }, 0, 44).unwrap()
    }

    /// Every 64-byte line of `pa`'s table that differs between `before` and `memory`.
    fn changed_lines(memory: &VecMemory, before: &[(u64, Table)]) -> Vec<u64> {
        let mut lines = Vec::new();
        for (pa, old) in before {
            let new = copy(memory, *pa);
            for line in 0..(PAGE_SIZE / 64) as usize {
                if old[line * 8..line * 8 + 8] != new[line * 8..line * 8 + 8] {
                    lines.push(pa + line as u64 * 64);
                }
            }
        }
        lines
    }

    fn copy(memory: &VecMemory, pa: u64) -> Table {
        let mut table = [0; ENTRIES];
        memory.copy_table(pa, &mut table);
        table
    }

    fn cleaned(ops: &[Op]) -> Vec<u64> {
        let mut lines = Vec::new();
        for op in ops {
            if let Op::Dc(CacheOp::Clean, va, len) = op {
                lines.extend((0..len / 64).map(|i| va + i * 64));
            }
        }
        lines
    }

    #[test]
    fn a_strict_map_cleans_new_tables_whole_and_the_written_lines_then_dsb_sy() {
        let mut memory = VecMemory::new(16);
        let mut table = device_table(&mut memory);
        let root = table.root();
        let root_before = copy(&memory, root);
        let mut arch = Recorder::new();

        let mut tracking = CleaningTables::new(&mut memory);
        table
            .map(
                &mut tracking,
                0x4010_0000,
                0x8010_0000,
                2 * PAGE_SIZE,
                MemoryType::NormalWriteBack,
                Permissions::RW,
            )
            .unwrap();
        tracking.clean(&mut arch);

        // Root (existing: only its changed line) and three new tables (levels 1-3, whole).
        assert_eq!(memory.tables.len(), 4);
        let mut expected = changed_lines(&memory, &[(root, root_before)]);
        assert_eq!(expected.len(), 1, "one root entry written");
        for pa in (1..4).map(|i| root + i * PAGE_SIZE) {
            expected.extend((0..PAGE_SIZE / 64).map(|i| pa + i * 64));
        }
        let mut got = cleaned(&arch.ops);
        got.sort_unstable();
        expected.sort_unstable();
        assert_eq!(got, expected);
        assert!(arch.ops[..arch.ops.len() - 1]
            .iter()
            .all(|op| matches!(op, Op::Dc(CacheOp::Clean, _, _))));
        assert_eq!(arch.ops.last(), Some(&Op::DsbSy), "cleans complete last");

        // A second map into the same level-3 table cleans just its lines; the unmap, the lines
        // it zeroes.
        let snapshot: Vec<(u64, Table)> = (0..4)
            .map(|i| (root + i * PAGE_SIZE, copy(&memory, root + i * PAGE_SIZE)))
            .collect();
        arch.clear();
        let mut tracking = CleaningTables::new(&mut memory);
        table
            .map(
                &mut tracking,
                0x4010_8000,
                0x8010_8000,
                PAGE_SIZE,
                MemoryType::NormalWriteBack,
                Permissions::RO,
            )
            .unwrap();
        tracking.clean(&mut arch);
        assert_eq!(cleaned(&arch.ops), changed_lines(&memory, &snapshot));
        assert_eq!(cleaned(&arch.ops).len(), 1);
        assert_eq!(arch.ops.last(), Some(&Op::DsbSy));

        let snapshot: Vec<(u64, Table)> = (0..4)
            .map(|i| (root + i * PAGE_SIZE, copy(&memory, root + i * PAGE_SIZE)))
            .collect();
        arch.clear();
        let mut tracking = CleaningTables::new(&mut memory);
        table
            .unmap(&mut tracking, 0x4010_0000, 2 * PAGE_SIZE)
            .unwrap();
        tracking.clean(&mut arch);
        let zeroed = changed_lines(&memory, &snapshot);
        assert!(!zeroed.is_empty());
        assert_eq!(cleaned(&arch.ops), zeroed);
        assert_eq!(arch.ops.last(), Some(&Op::DsbSy));
    }

    #[test]
    fn clean_all_tables_cleans_each_table_whole() {
        let mut memory = VecMemory::new(16);
        let mut table = device_table(&mut memory);
        table
            .map(
                &mut memory,
                0x4000_0000,
                0x8000_0000,
                4 << 20,
                MemoryType::NormalWriteBack,
                Permissions::RWX,
            )
            .unwrap();
        let mut arch = Recorder::new();
        clean_all_tables(&table, &memory, &mut arch);
        let root = table.root();
        // Root, level 1, level 2 (two 2 MiB blocks: no level 3).
        assert_eq!(
            arch.ops,
            vec![
                Op::Dc(CacheOp::Clean, root, PAGE_SIZE),
                Op::Dc(CacheOp::Clean, root + PAGE_SIZE, PAGE_SIZE),
                Op::Dc(CacheOp::Clean, root + 2 * PAGE_SIZE, PAGE_SIZE),
                Op::DsbSy,
            ]
        );
    }
}
