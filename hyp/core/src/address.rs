//! Address newtypes: an intermediate physical address (what the guest calls physical), a
//! physical address (what the hypervisor and the SMMU's output use), a guest virtual address and
//! a hypervisor virtual address. Each is its own type, so passing an IPA where a PA is expected
//! does not compile; conversions between them are explicit and name what they do.

use core::fmt;

macro_rules! address {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
        pub struct $name(u64);

        impl $name {
            /// The address `value`.
            pub const fn new(value: u64) -> Self {
                Self(value)
            }

            /// The number.
            pub const fn get(self) -> u64 {
                self.0
            }

            /// `self + bytes`, or `None` when it wraps.
            pub const fn checked_add(self, bytes: u64) -> Option<Self> {
                match self.0.checked_add(bytes) {
                    Some(value) => Some(Self(value)),
                    None => None,
                }
            }

            /// `self + bytes`; the caller knows it does not wrap (a checked range).
            pub const fn offset(self, bytes: u64) -> Self {
                Self(self.0 + bytes)
            }

            /// Bytes from `base` to `self` (`base <= self`).
            pub const fn bytes_from(self, base: Self) -> u64 {
                self.0 - base.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{:#x}", self.0)
            }
        }
    };
}

address!(
    /// An intermediate physical address: an address in the guest's physical address space,
    /// translated by stage 2.
    Ipa
);
address!(
    /// A physical address: what stage 2 and the SMMU output.
    Pa
);
address!(
    /// A virtual address of the guest's EL1/EL0 regime, translated by the guest's stage 1.
    GuestVa
);
address!(
    /// A virtual address of the hypervisor's EL2 regime (in its alias of guest RAM).
    HypVa
);

/// A range of guest RAM, checked once (inside RAM, no wrap, not empty) where it is decoded, then
/// trusted: whoever holds one does not check it again.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GuestRange {
    start: Ipa,
    size: u64,
    pa: Pa,
}

impl GuestRange {
    /// The range `[start, start + size)` of `ram`, or the status a guest gets for it.
    ///
    /// # Errors
    /// INVALID_PARAMETER for a zero size, OUT_OF_RANGE when it wraps or leaves RAM.
    pub fn new(
        ram: &crate::layout::GuestRam,
        start: Ipa,
        size: u64,
    ) -> Result<Self, stagehand_abi::Status> {
        if size == 0 {
            return Err(stagehand_abi::Status::InvalidParameter);
        }
        let pa = ram
            .pa_of(start.get(), size)
            .ok_or(stagehand_abi::Status::OutOfRange)?;
        Ok(Self {
            start,
            size,
            pa: Pa::new(pa),
        })
    }

    /// First IPA.
    pub fn start(&self) -> Ipa {
        self.start
    }

    /// Bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Where the first byte lies in physical memory (guest RAM is one contiguous block).
    pub fn pa(&self) -> Pa {
        self.pa
    }

    /// One past the last IPA.
    pub fn end(&self) -> Ipa {
        self.start.offset(self.size)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::GuestRam;
    use stagehand_abi::Status;

    const RAM: GuestRam = GuestRam {
        ipa: 0x4000_0000,
        pa: 0x4400_0000,
        size: 0x100_0000,
    };

    #[test]
    fn ranges_are_checked_once() {
        let range = GuestRange::new(&RAM, Ipa::new(0x4000_1000), 0x2000).unwrap();
        assert_eq!(range.pa(), Pa::new(0x4400_1000));
        assert_eq!(range.end(), Ipa::new(0x4000_3000));
        assert_eq!(
            GuestRange::new(&RAM, Ipa::new(0x4000_0000), 0),
            Err(Status::InvalidParameter)
        );
        for (start, size) in [
            (0x3fff_f000, 0x2000),      // below RAM
            (0x40ff_f000, 0x2000),      // across the end
            (u64::MAX - 0xfff, 0x2000), // wraps
            (0x0900_0000, 0x1000),      // MMIO
        ] {
            assert_eq!(
                GuestRange::new(&RAM, Ipa::new(start), size),
                Err(Status::OutOfRange),
                "{start:#x}+{size:#x}"
            );
        }
    }

    #[test]
    fn arithmetic_names_what_it_does() {
        let a = Ipa::new(0x4000_0000);
        assert_eq!(a.checked_add(0x10), Some(Ipa::new(0x4000_0010)));
        assert_eq!(Ipa::new(u64::MAX).checked_add(1), None);
        assert_eq!(Ipa::new(0x4000_0100).bytes_from(a), 0x100);
    }
}
