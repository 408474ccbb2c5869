//! The shape of stage 2 on this CPU: how many bits of IPA it translates, the level its walk
//! starts at, and VTCR_EL2. The IPA space must fit the CPU's physical address size (PARange: a
//! larger one makes every guest access fault, silently) and be walked from a single root
//! table: QEMU's SMMU mis-walks concatenated stage-2 roots, and a device in shared mode walks
//! the CPU's own tables.

use core::fmt;

/// The stage-2 input space.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Geometry {
    /// IPA bits translated (the guest's physical address space).
    pub ipa_bits: u32,
    /// Level of the single root table (0 or 1).
    pub start_level: usize,
    /// VTCR_EL2.PS: the output size, the CPU's PARange capped at 44 bits.
    pub output_size: u64,
}

/// The CPU's physical address size is one stage 2 cannot be built for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct UnsupportedPaRange(pub u64);

impl fmt::Display for UnsupportedPaRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "the CPU's physical address size (ID_AA64MMFR0_EL1.PARange {:#x}) is not one stage 2 supports",
            self.0
        )
    }
}

/// Bits of physical address a PARange value stands for.
pub fn pa_bits(parange: u64) -> Option<u32> {
    Some(match parange {
        0 => 32,
        1 => 36,
        2 => 40,
        3 => 42,
        4 => 44,
        5 => 48,
        6 => 52,
        _ => return None,
    })
}

impl Geometry {
    /// The geometry for a CPU whose ID_AA64MMFR0_EL1.PARange is `parange`: 44 bits from a
    /// level-0 root where the CPU has 44 bits or more (the PCIe windows of `virt` lie above
    /// 2^39); otherwise 39 bits (or the PA size, if smaller) from a level-1 root, since 40 or
    /// 42 bits from one root would need concatenated level-1 tables.
    ///
    /// # Errors
    /// [`UnsupportedPaRange`] for a reserved PARange value.
    pub fn for_cpu(parange: u64) -> Result<Self, UnsupportedPaRange> {
        let bits = pa_bits(parange).ok_or(UnsupportedPaRange(parange))?;
        let (ipa_bits, start_level) = if bits >= 44 {
            (44, 0)
        } else {
            (bits.min(39), 1)
        };
        Ok(Self {
            ipa_bits,
            start_level,
            output_size: parange.min(4),
        })
    }

    /// Whether `[base, base + size)` lies inside the IPA space.
    pub fn contains(&self, base: u64, size: u64) -> bool {
        base.checked_add(size)
            .is_some_and(|end| end <= 1u64 << self.ipa_bits)
    }

    /// VTCR_EL2: T0SZ and SL0 from the geometry, write-back inner-shareable walks, 4 KiB
    /// granule, PS, and RES1 bit 31.
    pub fn vtcr(&self) -> u64 {
        let t0sz = 64 - self.ipa_bits as u64;
        // SL0 for a 4 KiB granule: 0b10 starts at level 0, 0b01 at level 1.
        let sl0 = 2 - self.start_level as u64;
        t0sz | sl0 << 6 | 1 << 8 | 1 << 10 | 3 << 12 | self.output_size << 16 | 1 << 31
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_cpu_model_of_virt_gets_a_single_root_stage_2_that_fits_its_pa_size() {
        // cortex-a53/a55/a76/a35: 40 bits; a57/a72: 44; Neoverse and max: 48 and more.
        let a53 = Geometry::for_cpu(2).unwrap();
        assert_eq!((a53.ipa_bits, a53.start_level, a53.output_size), (39, 1, 2));
        assert_eq!(a53.vtcr(), 25 | 1 << 6 | 0x3500 | 2 << 16 | 1 << 31);
        let a72 = Geometry::for_cpu(4).unwrap();
        assert_eq!((a72.ipa_bits, a72.start_level), (44, 0));
        assert_eq!(a72.vtcr(), 20 | 2 << 6 | 0x3500 | 4 << 16 | 1 << 31);
        let max = Geometry::for_cpu(6).unwrap();
        assert_eq!((max.ipa_bits, max.output_size), (44, 4));
        let small = Geometry::for_cpu(0).unwrap();
        assert_eq!((small.ipa_bits, small.start_level), (32, 1));
        assert_eq!(Geometry::for_cpu(7), Err(UnsupportedPaRange(7)));
    }

    #[test]
    fn contains_checks_the_end_of_a_region() {
        let a53 = Geometry::for_cpu(2).unwrap();
        assert!(a53.contains(0x4000_0000, 1 << 30));
        assert!(
            !a53.contains(0x80_0000_0000, 0x1000),
            "virt's 64-bit PCIe window"
        );
        assert!(a53.contains(0x7f_ffff_f000, 0x1000));
        assert!(!a53.contains(u64::MAX, 2));
    }
}
