//! Where things live: the hypervisor's reserved physical memory, the guest's RAM in PA and IPA
//! space, and where the kernel, initrd and device tree go inside guest RAM.
//!
//! The guest sees the `virt` memory map (RAM at IPA 0x4000_0000, so images linked for QEMU's own
//! `-kernel` loading run unchanged), but its RAM lies elsewhere in physical memory: the
//! hypervisor keeps the first [`HYP_RESERVED`] bytes of RAM (QEMU's device tree, its image,
//! stacks, heap). Nothing may assume IPA == PA.

use core::fmt;

/// IPA of the first byte of guest RAM.
pub const GUEST_RAM_IPA: u64 = 0x4000_0000;
/// Bytes at the start of physical RAM the hypervisor keeps for itself.
pub const HYP_RESERVED: u64 = 64 << 20;
/// Guest RAM is sized and placed in 2 MiB units so stage 2 can use block mappings.
pub const GUEST_RAM_ALIGN: u64 = 2 << 20;

/// Guest RAM: the same bytes seen from both sides.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GuestRam {
    /// First IPA.
    pub ipa: u64,
    /// First PA.
    pub pa: u64,
    /// Size in bytes.
    pub size: u64,
}

impl GuestRam {
    /// One past the last IPA.
    pub const fn ipa_end(&self) -> u64 {
        self.ipa + self.size
    }

    /// The PA of `ipa`, if `[ipa, ipa + len)` lies inside guest RAM.
    pub fn pa_of(&self, ipa: u64, len: u64) -> Option<u64> {
        let end = ipa.checked_add(len)?;
        (ipa >= self.ipa && end <= self.ipa_end()).then(|| ipa - self.ipa + self.pa)
    }
}

/// Why guest RAM cannot be laid out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LayoutError {
    /// Physical RAM does not even hold the hypervisor's reservation plus 2 MiB.
    RamTooSmall {
        /// Bytes of physical RAM found.
        ram: u64,
    },
    /// The configuration asks for more guest RAM than is left.
    RequestTooLarge {
        /// Bytes asked for.
        requested: u64,
        /// Bytes available.
        available: u64,
    },
    /// Kernel, initrd and device tree do not fit in guest RAM together.
    ImagesDoNotFit,
}

impl fmt::Display for LayoutError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LayoutError::RamTooSmall { ram } => write!(
                f,
                "RAM is too small: {} MiB found, the hypervisor keeps {} MiB and a guest needs at least 2 MiB",
                ram >> 20,
                HYP_RESERVED >> 20
            ),
            LayoutError::RequestTooLarge { requested, available } => write!(
                f,
                "configuration asks for {} MiB of guest RAM but only {} MiB is available",
                requested >> 20,
                available >> 20
            ),
            LayoutError::ImagesDoNotFit => {
                write!(f, "kernel, initrd and device tree do not fit in guest RAM together")
            }
        }
    }
}

/// Lays out guest RAM after the hypervisor's reservation in the physical RAM bank
/// `[ram_base, ram_base + ram_size)`. `requested` is the configured size (`None`: all of it).
///
/// # Errors
/// [`LayoutError::RamTooSmall`] or [`LayoutError::RequestTooLarge`].
pub fn guest_ram(
    ram_base: u64,
    ram_size: u64,
    requested: Option<u64>,
) -> Result<GuestRam, LayoutError> {
    let available = ram_size.saturating_sub(HYP_RESERVED) & !(GUEST_RAM_ALIGN - 1);
    if available == 0 {
        return Err(LayoutError::RamTooSmall { ram: ram_size });
    }
    let size = match requested {
        Some(requested) if requested > available => {
            return Err(LayoutError::RequestTooLarge {
                requested,
                available,
            })
        }
        Some(requested) => requested,
        None => available,
    };
    Ok(GuestRam {
        ipa: GUEST_RAM_IPA,
        pa: ram_base + HYP_RESERVED,
        size,
    })
}

/// Where the initrd and device tree go.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BootPlacement {
    /// IPA of the initrd (meaningful when its length is non-zero).
    pub initrd: u64,
    /// IPA of the device tree.
    pub dtb: u64,
}

/// Space kept for the guest's device tree at the top of guest RAM (Linux allows up to 2 MiB).
pub const DTB_SLOT: u64 = 2 << 20;

/// Places the device tree in the last 2 MiB of guest RAM and the initrd right below it,
/// page-aligned, above everything the kernel occupies (`kernel_end`, exclusive IPA).
///
/// # Errors
/// [`LayoutError::ImagesDoNotFit`] when they overlap the kernel or the DTB is too large.
pub fn place_boot_images(
    ram: &GuestRam,
    kernel_end: u64,
    initrd_len: u64,
    dtb_len: u64,
) -> Result<BootPlacement, LayoutError> {
    if dtb_len > DTB_SLOT || ram.size < DTB_SLOT {
        return Err(LayoutError::ImagesDoNotFit);
    }
    let dtb = ram.ipa_end() - DTB_SLOT;
    let initrd = dtb
        .checked_sub(initrd_len)
        .ok_or(LayoutError::ImagesDoNotFit)?
        & !0xfff;
    if initrd < kernel_end || initrd < ram.ipa {
        return Err(LayoutError::ImagesDoNotFit);
    }
    Ok(BootPlacement { initrd, dtb })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guest_ram_follows_the_reservation_and_differs_from_ipa() {
        let ram = guest_ram(0x4000_0000, 1 << 30, None).unwrap();
        assert_eq!(ram.ipa, 0x4000_0000);
        assert_eq!(ram.pa, 0x4400_0000);
        assert_eq!(ram.size, (1 << 30) - HYP_RESERVED);
        assert_eq!(ram.pa_of(0x4000_1000, 8), Some(0x4400_1000));
        assert_eq!(ram.pa_of(ram.ipa_end() - 4, 8), None);
        assert_eq!(ram.pa_of(u64::MAX - 2, 8), None);
    }

    #[test]
    fn requested_size_is_honoured_or_refused() {
        assert_eq!(
            guest_ram(0x4000_0000, 1 << 30, Some(256 << 20))
                .unwrap()
                .size,
            256 << 20
        );
        assert!(matches!(
            guest_ram(0x4000_0000, 1 << 30, Some(1 << 30)),
            Err(LayoutError::RequestTooLarge { .. })
        ));
        assert!(matches!(
            guest_ram(0x4000_0000, 32 << 20, None),
            Err(LayoutError::RamTooSmall { .. })
        ));
    }

    #[test]
    fn dtb_goes_on_top_and_initrd_below_it() {
        let ram = guest_ram(0x4000_0000, 1 << 30, Some(256 << 20)).unwrap();
        let p = place_boot_images(&ram, 0x4200_0000, 0x12345, 0x3000).unwrap();
        assert_eq!(p.dtb, 0x5000_0000 - DTB_SLOT);
        assert_eq!(p.initrd, (p.dtb - 0x12345) & !0xfff);
        assert_eq!(
            place_boot_images(&ram, 0x4f00_0000, 0x100_0000, 0x3000),
            Err(LayoutError::ImagesDoNotFit)
        );
        assert_eq!(
            place_boot_images(&ram, 0x4008_0000, 0, 3 << 20),
            Err(LayoutError::ImagesDoNotFit)
        );
    }
}
