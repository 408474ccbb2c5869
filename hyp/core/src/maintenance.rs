//! The instructions the stage-2 engine needs from the CPU (cache maintenance by VA, TLB
//! invalidation, barriers), as a trait: the aarch64 layer implements it with single
//! instructions, and [`Recorder`] writes down every call so host tests can pin the exact
//! sequence real hardware needs. QEMU models no caches, so this is the only place those
//! sequences are checked.
//!
//! The engine also reports every translation-table write it makes through
//! [`Arch::table_write`], so the recorded sequence reads like the architecture text:
//! "break, DSB, TLBI IPA, DSB, TLBI VMALLE1, DSB, clean, make".

use alloc::vec::Vec;

/// A data-cache operation by VA to the point of coherency.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CacheOp {
    /// DC CVAC.
    Clean,
    /// DC IVAC (a true invalidate at EL2).
    Invalidate,
    /// DC CIVAC.
    CleanInvalidate,
}

/// One data-cache range operation of a [`plan`]: `op` over `[start, start + len)`, line-aligned.
pub type Stroke = (CacheOp, u64, u64);

/// The data-cache operations that perform `op` on the bytes `[start, end)` (`start < end`) with
/// `line`-byte lines: every line the range touches, once. An INVALIDATE whose range starts or
/// ends inside a line cleans and invalidates that partial edge line instead, so that bytes of
/// the line outside the range (a neighbouring object's dirty data) are never lost; only lines
/// wholly inside the range are invalidated. CLEAN and CLEAN_INVALIDATE lose nothing and cover
/// the touched lines as they are. Unused strokes are `None`.
#[inline]
pub fn plan(op: CacheOp, start: u64, end: u64, line: u64) -> [Option<Stroke>; 3] {
    let low = start & !(line - 1);
    let high = end.next_multiple_of(line);
    if op != CacheOp::Invalidate {
        return [Some((op, low, high - low)), None, None];
    }
    let mut full_low = low;
    let mut full_high = high;
    let mut head = None;
    let mut tail = None;
    if !start.is_multiple_of(line) {
        head = Some((CacheOp::CleanInvalidate, low, line));
        full_low += line;
    }
    if !end.is_multiple_of(line) && high - line >= full_low {
        tail = Some((CacheOp::CleanInvalidate, high - line, line));
        full_high -= line;
    }
    let middle =
        (full_high > full_low).then_some((CacheOp::Invalidate, full_low, full_high - full_low));
    [head, tail, middle]
}

/// A translation-table write, as the engine describes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TableWrite {
    /// A guest stage-2 entry made invalid (break-before-make's break).
    Break {
        /// First IPA the entry mapped.
        ipa: u64,
        /// Level of the entry.
        level: usize,
    },
    /// A guest stage-2 leaf written (the make).
    Make {
        /// First IPA it maps.
        ipa: u64,
        /// Level (2: block, 3: page).
        level: usize,
        /// Non-cacheable (else write-back).
        non_cacheable: bool,
    },
    /// A 2 MiB block written over a level-3 table whose pages all agree (no attribute changes).
    Merge {
        /// First IPA of the block.
        ipa: u64,
        /// Non-cacheable (else write-back).
        non_cacheable: bool,
    },
    /// A guest stage-2 table descriptor written (after a split).
    Table {
        /// First IPA it covers.
        ipa: u64,
    },
    /// An entry of the hypervisor's alias of guest RAM made invalid (break).
    AliasBreak {
        /// First EL2 VA the entry mapped.
        va: u64,
        /// Level of the entry (2: a block or a table descriptor, 3: a page).
        level: usize,
    },
    /// An alias leaf written (make).
    AliasMake {
        /// First EL2 VA it maps.
        va: u64,
        /// Level (2: block, 3: page).
        level: usize,
        /// Non-cacheable (else write-back).
        non_cacheable: bool,
    },
    /// An alias table descriptor written over a broken block (a split).
    AliasTable {
        /// First EL2 VA it covers.
        va: u64,
    },
}

/// The CPU operations the engine issues. Implementations must issue each as one instruction
/// (or, for `dcache_range`, one instruction per line), in call order.
pub trait Arch {
    /// The data-cache line size in bytes (CTR_EL0.DminLine).
    fn line_size(&self) -> u64;
    /// `op` on every line of `[va, va + len)`; `va` and `len` are line-aligned.
    fn dcache_range(&mut self, op: CacheOp, va: u64, len: u64);
    /// DSB ISH.
    fn dsb_ish(&mut self);
    /// DSB ISHST.
    fn dsb_ishst(&mut self);
    /// DSB SY: completes earlier cache maintenance for every observer, including one outside
    /// the inner-shareable domain that does not snoop the caches (a non-coherent SMMU).
    fn dsb_sy(&mut self);
    /// ISB.
    fn isb(&mut self);
    /// TLBI IPAS2E1IS: stage-2 entries for one IPA of the current VMID.
    fn tlbi_ipas2e1is(&mut self, ipa: u64);
    /// TLBI VMALLE1IS: stage-1 (and combined) entries of the current VMID.
    fn tlbi_vmalle1is(&mut self);
    /// TLBI VMALLS12E1IS: every stage-1 and stage-2 entry of the current VMID.
    fn tlbi_vmalls12e1is(&mut self);
    /// TLBI VAE2IS: EL2 entries for one VA.
    fn tlbi_vae2is(&mut self, va: u64);
    /// TLBI ALLE2IS: every EL2 entry.
    fn tlbi_alle2is(&mut self);
    /// Invalidates every device TLB (SMMU) that caches the guest's stage 2 for
    /// `[ipa, ipa + size)` and waits until that has completed (CMD_SYNC). The SMMU does not
    /// snoop the CPU's broadcast TLBIs, so devices sharing the guest's stage 2 need this in
    /// every break.
    fn device_tlbi(&mut self, ipa: u64, size: u64);
    /// A translation-table write the engine just made (no instruction; for recorders).
    fn table_write(&mut self, write: TableWrite);
}

/// One recorded operation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    /// A data-cache range operation.
    Dc(CacheOp, u64, u64),
    /// DSB ISH.
    DsbIsh,
    /// DSB ISHST.
    DsbIshst,
    /// DSB SY.
    DsbSy,
    /// ISB.
    Isb,
    /// TLBI IPAS2E1IS.
    TlbiIpas2(u64),
    /// TLBI VMALLE1IS.
    TlbiVmalle1,
    /// TLBI VMALLS12E1IS.
    TlbiVmalls12,
    /// TLBI VAE2IS.
    TlbiVae2(u64),
    /// TLBI ALLE2IS.
    TlbiAlle2,
    /// Device (SMMU) TLB invalidation of a range, completed.
    DeviceTlbi(u64, u64),
    /// A table write.
    Write(TableWrite),
}

impl Op {
    /// Whether this is a TLB invalidation.
    pub fn is_tlbi(&self) -> bool {
        matches!(
            self,
            Op::TlbiIpas2(_) | Op::TlbiVmalle1 | Op::TlbiVmalls12 | Op::TlbiVae2(_) | Op::TlbiAlle2
        )
    }
}

/// An [`Arch`] that records every call, for tests.
#[derive(Debug, Default)]
pub struct Recorder {
    /// Everything issued, in order.
    pub ops: Vec<Op>,
}

impl Recorder {
    /// A recorder with a 64-byte line.
    pub fn new() -> Self {
        Self::default()
    }

    /// Number of TLB invalidations recorded.
    pub fn tlbi_count(&self) -> usize {
        self.ops.iter().filter(|op| op.is_tlbi()).count()
    }

    /// The stage-2 and window writes recorded, in order, without the instructions between them.
    pub fn writes(&self) -> Vec<TableWrite> {
        self.ops
            .iter()
            .filter_map(|op| match op {
                Op::Write(write) => Some(*write),
                _ => None,
            })
            .collect()
    }

    /// Forgets what was recorded.
    pub fn clear(&mut self) {
        self.ops.clear();
    }
}

impl Arch for Recorder {
    fn line_size(&self) -> u64 {
        64
    }
    fn dcache_range(&mut self, op: CacheOp, va: u64, len: u64) {
        assert_eq!(va % 64, 0, "unaligned DC range start");
        assert_eq!(len % 64, 0, "unaligned DC range length");
        self.ops.push(Op::Dc(op, va, len));
    }
    fn dsb_ish(&mut self) {
        self.ops.push(Op::DsbIsh);
    }
    fn dsb_ishst(&mut self) {
        self.ops.push(Op::DsbIshst);
    }
    fn dsb_sy(&mut self) {
        self.ops.push(Op::DsbSy);
    }
    fn isb(&mut self) {
        self.ops.push(Op::Isb);
    }
    fn tlbi_ipas2e1is(&mut self, ipa: u64) {
        self.ops.push(Op::TlbiIpas2(ipa));
    }
    fn tlbi_vmalle1is(&mut self) {
        self.ops.push(Op::TlbiVmalle1);
    }
    fn tlbi_vmalls12e1is(&mut self) {
        self.ops.push(Op::TlbiVmalls12);
    }
    fn tlbi_vae2is(&mut self, va: u64) {
        self.ops.push(Op::TlbiVae2(va));
    }
    fn tlbi_alle2is(&mut self) {
        self.ops.push(Op::TlbiAlle2);
    }
    fn device_tlbi(&mut self, ipa: u64, size: u64) {
        self.ops.push(Op::DeviceTlbi(ipa, size));
    }
    fn table_write(&mut self, write: TableWrite) {
        self.ops.push(Op::Write(write));
    }
}
