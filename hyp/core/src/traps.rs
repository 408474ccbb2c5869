//! What the guest may use directly and what traps to EL2: the values of the EL2 trap controls
//! whose reset value real hardware leaves UNKNOWN (MDCR_EL2, HSTR_EL2, the fine-grained trap
//! registers of FEAT_FGT, HCRX_EL2 of FEAT_HCX) and the feature enables of HCR_EL2, computed
//! from the CPU's ID registers so that the guest sees the features it would see without the
//! hypervisor. Anything that still traps and is not emulated gets an UNDEF in the guest
//! (`inject::undefined`), never a stop.
//!
//! Hidden from the guest, on purpose: nothing the ID registers advertise is taken away, except
//! the registers below whose "do not trap" control this code does not set (they UNDEF):
//! ACCDATA_EL1 (LS64), the BRBE and SPE controls with negative polarity, S2POR_EL1 (a nested
//! hypervisor's), and everything the second fine-grained trap set (FEAT_FGT2) controls.

/// The ID registers the trap controls depend on (raw values, read at boot).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IdRegisters {
    /// ID_AA64PFR0_EL1.
    pub pfr0: u64,
    /// ID_AA64PFR1_EL1.
    pub pfr1: u64,
    /// ID_AA64DFR0_EL1.
    pub dfr0: u64,
    /// ID_AA64MMFR0_EL1.
    pub mmfr0: u64,
    /// ID_AA64MMFR1_EL1.
    pub mmfr1: u64,
    /// ID_AA64MMFR3_EL1.
    pub mmfr3: u64,
    /// ID_AA64ISAR2_EL1.
    pub isar2: u64,
}

fn field(value: u64, shift: u32) -> u64 {
    (value >> shift) & 0xf
}

impl IdRegisters {
    /// FEAT_FGT: the fine-grained trap registers exist.
    pub fn has_fgt(&self) -> bool {
        field(self.mmfr0, 56) >= 1
    }

    /// FEAT_HCX: HCRX_EL2 exists.
    pub fn has_hcx(&self) -> bool {
        field(self.mmfr1, 40) >= 1
    }

    /// FEAT_AMUv1: the activity monitors (and, with FGT, HAFGRTR_EL2) exist.
    pub fn has_amu(&self) -> bool {
        field(self.pfr0, 44) >= 1
    }

    /// FEAT_SME.
    pub fn has_sme(&self) -> bool {
        field(self.pfr1, 24) >= 1
    }

    /// FEAT_SVE.
    pub fn has_sve(&self) -> bool {
        field(self.pfr0, 32) >= 1
    }

    /// The GICv3 system-register interface (ICC_*): absent on a CPU wired to a GICv2.
    pub fn has_gic_system_registers(&self) -> bool {
        field(self.pfr0, 24) >= 1
    }

    /// SCXTNUM_ELx exist (FEAT_CSV2_2, or FEAT_CSV2_1p2).
    pub fn has_scxtnum(&self) -> bool {
        let csv2 = field(self.pfr0, 56);
        csv2 >= 2 || (csv2 == 1 && field(self.pfr1, 32) >= 2)
    }

    /// A PMUv3 is implemented (PMUVer neither 0 nor IMPLEMENTATION DEFINED).
    pub fn has_pmu(&self) -> bool {
        !matches!(field(self.dfr0, 8), 0 | 0xf)
    }

    /// FEAT_PMUv3p1: MDCR_EL2.HPMD exists.
    fn has_pmuv3p1(&self) -> bool {
        self.has_pmu() && field(self.dfr0, 8) >= 4
    }

    /// The Statistical Profiling Extension.
    fn has_spe(&self) -> bool {
        field(self.dfr0, 32) >= 1
    }

    /// FEAT_GCS.
    fn has_gcs(&self) -> bool {
        field(self.pfr1, 44) >= 1
    }

    /// FEAT_S1PIE.
    fn has_s1pie(&self) -> bool {
        field(self.mmfr3, 8) >= 1
    }

    /// FEAT_S1POE.
    fn has_s1poe(&self) -> bool {
        field(self.mmfr3, 16) >= 1
    }

    /// FEAT_AIE.
    fn has_aie(&self) -> bool {
        field(self.mmfr3, 24) >= 1
    }

    /// FEAT_TCR2.
    fn has_tcr2(&self) -> bool {
        field(self.mmfr3, 0) >= 1
    }

    /// FEAT_SCTLR2.
    fn has_sctlr2(&self) -> bool {
        field(self.mmfr3, 4) >= 1
    }

    /// FEAT_MOPS.
    fn has_mops(&self) -> bool {
        field(self.isar2, 16) >= 1
    }
}

/// HFGRTR_EL2 and HFGWTR_EL2 (the same layout for the bits used here): every positive-polarity
/// trap off (0); the negative-polarity ("n") controls set, which means "do not trap", only for
/// the features the CPU has (for a feature it lacks the bit is RES0).
pub fn fine_grained_read_write_traps(id: &IdRegisters) -> u64 {
    let mut value = 0;
    if id.has_sme() {
        value |= 1 << 55 | 1 << 54; // nTPIDR2_EL0, nSMPRI_EL1
    }
    if id.has_gcs() {
        value |= 1 << 53 | 1 << 52; // nGCS_EL1, nGCS_EL0
    }
    if id.has_s1pie() {
        value |= 1 << 58 | 1 << 57; // nPIR_EL1, nPIRE0_EL1
    }
    if id.has_s1poe() {
        value |= 1 << 60 | 1 << 59; // nPOR_EL1, nPOR_EL0
    }
    if id.has_aie() {
        value |= 1 << 63 | 1 << 62; // nAMAIR2_EL1, nMAIR2_EL1
    }
    value
}

/// HFGITR_EL2, HDFGRTR_EL2, HDFGWTR_EL2 and HAFGRTR_EL2: no instruction, debug, PMU or
/// activity-monitor trap (their negative-polarity bits belong to features this hypervisor does
/// not give the guest: BRBE, SPE's FnE filter).
pub const FINE_GRAINED_OTHER_TRAPS: u64 = 0;

/// HCRX_EL2: the enables for features the guest would have on this CPU without a hypervisor
/// (a clear enable makes the feature's instructions or registers UNDEF at EL1 and EL0).
pub fn hcrx(id: &IdRegisters) -> u64 {
    let mut value = 0;
    if id.has_mops() {
        value |= 1 << 11; // MSCEn: memory copy and set instructions
    }
    if id.has_tcr2() {
        value |= 1 << 14; // TCR2En
    }
    if id.has_sctlr2() {
        value |= 1 << 15; // SCTLR2En
    }
    if id.has_gcs() {
        value |= 1 << 22; // GCSEn
    }
    value
}

/// MDCR_EL2: no debug, PMU or trace trap (the guest owns its pinned CPU's debug and PMU), every
/// event counter the guest's (HPMN = PMCR_EL0.N, `counters`), EL2 itself not counted where the
/// PMU can say so (HPMD), and SPE's buffer owned by EL1 (E2PB = 0b11) where SPE exists.
pub fn mdcr(id: &IdRegisters, counters: u64) -> u64 {
    let mut value = 0;
    if id.has_pmu() {
        value |= counters & 0x1f; // HPMN
    }
    if id.has_pmuv3p1() {
        value |= 1 << 17; // HPMD
    }
    if id.has_spe() {
        value |= 0b11 << 12; // E2PB
    }
    value
}

/// HSTR_EL2: no AArch32 CP15 trap.
pub const HSTR: u64 = 0;

#[cfg(test)]
mod tests {
    use super::*;

    /// A CPU with FGT, HCX, SME, CSV2_2, MOPS, TCR2 and SCTLR2 (shaped like QEMU's `max`).
    const MAX: IdRegisters = IdRegisters {
        pfr0: 0x1201_1111_1111_2222,
        pfr1: 0x0000_0001_0100_0221,
        dfr0: 0x0000_0000_f010_f50a,
        mmfr0: 0x0100_0000_0010_1125,
        mmfr1: 0x0000_1011_1112_2122,
        mmfr3: 0x0000_0000_0000_1111,
        isar2: 0x0000_0000_0011_1101,
    };
    /// Cortex-A53: no FGT, no HCX, no SME, no CSV2.
    const A53: IdRegisters = IdRegisters {
        pfr0: 0x0000_0000_0000_2222,
        pfr1: 0,
        dfr0: 0x1030_5106,
        mmfr0: 0x1122,
        mmfr1: 0,
        mmfr3: 0,
        isar2: 0,
    };

    #[test]
    fn the_sme_registers_the_review_found_are_not_trapped_where_sme_exists() {
        let value = fine_grained_read_write_traps(&MAX);
        assert!(MAX.has_fgt() && MAX.has_sme());
        assert_ne!(value & 1 << 55, 0, "nTPIDR2_EL0");
        assert_ne!(value & 1 << 54, 0, "nSMPRI_EL1");
        assert_eq!(value & ((1 << 50) - 1), 0, "no positive-polarity trap");
        assert_eq!(value & 1 << 50, 0, "ACCDATA_EL1 stays trapped");
        assert!(MAX.has_scxtnum(), "EnSCXT is set on this CPU");
    }

    #[test]
    fn a_cpu_without_the_features_gets_zeros_and_no_enables() {
        assert!(!A53.has_fgt() && !A53.has_hcx() && !A53.has_scxtnum());
        assert_eq!(fine_grained_read_write_traps(&A53), 0);
        assert_eq!(hcrx(&A53), 0);
        assert!(!A53.has_gic_system_registers() || A53.pfr0 >> 24 & 0xf != 0);
    }

    #[test]
    fn hcrx_enables_what_the_cpu_has() {
        let value = hcrx(&MAX);
        assert_ne!(value & 1 << 11, 0, "FEAT_MOPS: MSCEn");
        assert_ne!(value & 1 << 14, 0, "FEAT_TCR2: TCR2En");
        assert_ne!(value & 1 << 15, 0, "FEAT_SCTLR2: SCTLR2En");
    }

    #[test]
    fn mdcr_gives_the_guest_every_counter_and_traps_nothing() {
        assert_eq!(mdcr(&A53, 6), 6, "PMUv3 without v3p1: no HPMD");
        assert_ne!(mdcr(&MAX, 6) & 1 << 17, 0, "HPMD");
        let no_pmu = IdRegisters { dfr0: 0x6, ..A53 };
        assert_eq!(mdcr(&no_pmu, 6), 0);
        let traps = 1 << 5 | 1 << 6 | 1 << 8 | 1 << 9 | 1 << 10 | 1 << 11 | 1 << 19;
        assert_eq!(
            mdcr(&MAX, 31) & traps,
            0,
            "TPMCR, TPM, TDE, TDA, TDOSA, TDRA, TTRF"
        );
    }
}
