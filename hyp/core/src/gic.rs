//! The guest uses the GICv3 directly (distributor and redistributors are passed through), with
//! one exception: nothing may let the GIC read or write memory the guest chooses. Without an
//! ITS the only such registers are in the first 4 KiB page of each redistributor's RD frame
//! (GICR_PROPBASER, GICR_PENDBASER and GICR_CTLR.EnableLPIs), so that page is left out of stage
//! 2 and every access to it is decided here. LPIs stay off: GICR_TYPER.PLPIS reads 0.

/// Bytes per redistributor (RD_base frame plus SGI_base frame).
pub const REDISTRIBUTOR_STRIDE: u64 = 0x2_0000;
/// Bytes per redistributor with direct virtual LPIs (GICv4: two more frames).
pub const REDISTRIBUTOR_STRIDE_VLPI: u64 = 0x4_0000;
/// Bytes of each RD frame that are trapped.
pub const TRAPPED_PAGE: u64 = 0x1000;

const GICR_CTLR: u64 = 0x0000;
const GICR_TYPER: u64 = 0x0008;
const GICR_PROPBASER: u64 = 0x0070;
const GICR_PENDBASER: u64 = 0x0078;
const LPI_COMMANDS: [u64; 5] = [0x0040, 0x0048, 0x00a0, 0x00b0, 0x00c0];

const CTLR_ENABLE_LPIS: u64 = 1 << 0;
const TYPER_VLPIS: u64 = 1 << 1;
const TYPER_LAST: u64 = 1 << 4;
const TYPER_PLPIS: u64 = 1 << 0;
const TYPER_DIRECT_LPI: u64 = 1 << 3;

/// What to do with one guest access to a trapped redistributor page.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decision {
    /// Read the register, clear the bits in `clear`, return the rest.
    Read {
        /// Bits the guest must not see.
        clear: u64,
    },
    /// Return this value without touching the hardware.
    ReadAs(u64),
    /// Write this value to the register.
    Write(u64),
    /// Drop the write.
    Ignore,
}

impl Decision {
    /// Whether the guest's request was changed (worth an audit record).
    pub fn filtered(&self, requested: Option<u64>) -> bool {
        match (self, requested) {
            (Decision::Write(v), Some(r)) => *v != r,
            (Decision::Ignore, Some(_)) => true,
            _ => false,
        }
    }
}

/// The redistributors that exist in a region the device tree gives as `[base, base + size)`:
/// `(base, stride)` of each. The region is sized for the most CPUs the board could have;
/// only the frames up to the one whose GICR_TYPER says Last are populated, and reading past
/// it aborts. `read_typer(frame)` reads the 64-bit GICR_TYPER of the frame at `frame`, `None`
/// when the read aborted (which ends the walk too).
pub fn populated_frames(
    base: u64,
    size: u64,
    mut read_typer: impl FnMut(u64) -> Option<u64>,
) -> alloc::vec::Vec<(u64, u64)> {
    let mut frames = alloc::vec::Vec::new();
    let mut frame = base;
    while frame
        .checked_add(REDISTRIBUTOR_STRIDE)
        .is_some_and(|end| end <= base + size)
    {
        let Some(typer) = read_typer(frame) else {
            break;
        };
        let stride = if typer & TYPER_VLPIS != 0 {
            REDISTRIBUTOR_STRIDE_VLPI
        } else {
            REDISTRIBUTOR_STRIDE
        };
        frames.push((frame, stride.min(base + size - frame)));
        if typer & TYPER_LAST != 0 {
            break;
        }
        frame += stride;
    }
    frames
}

/// The offset into the trapped page of an access at `ipa`, if `ipa` lies in the first page of
/// the redistributor frame at `frame`.
pub fn trapped_offset(frame: u64, ipa: u64) -> Option<u64> {
    let offset = ipa.checked_sub(frame)?;
    (offset < TRAPPED_PAGE).then_some(offset)
}

/// Decides an access at `offset` in the RD frame: `write` holds the value of a store. The 64-bit
/// registers may be accessed as two 32-bit halves (or in bytes): each part of one is decided
/// like the whole, so that no half of GICR_PROPBASER can be written or read back.
pub fn decide(offset: u64, write: Option<u64>) -> Decision {
    let register = offset & !7;
    let lpi_register = register == GICR_PROPBASER
        || register == GICR_PENDBASER
        || LPI_COMMANDS.contains(&register);
    match (offset, write) {
        (_, None) if lpi_register => Decision::ReadAs(0),
        (_, Some(_)) if lpi_register => Decision::Ignore,
        (GICR_CTLR, Some(value)) => Decision::Write(value & !CTLR_ENABLE_LPIS),
        (GICR_CTLR, None) => Decision::Read {
            clear: CTLR_ENABLE_LPIS,
        },
        (GICR_TYPER, None) => Decision::Read {
            clear: TYPER_PLPIS | TYPER_DIRECT_LPI,
        },
        (_, Some(_)) if register == GICR_TYPER => Decision::Ignore,
        (_, None) => Decision::Read { clear: 0 },
        (_, Some(value)) => Decision::Write(value),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lpis_can_never_be_enabled_or_pointed_at_memory() {
        assert_eq!(decide(GICR_CTLR, Some(0x1)), Decision::Write(0));
        assert_eq!(decide(GICR_CTLR, Some(0x3)), Decision::Write(0x2));
        assert_eq!(decide(GICR_PROPBASER, Some(0x4000_0000)), Decision::Ignore);
        assert_eq!(decide(GICR_PENDBASER, None), Decision::ReadAs(0));
        assert_eq!(decide(GICR_TYPER, None), Decision::Read { clear: 0b1001 });
        assert_eq!(decide(0x40, Some(5)), Decision::Ignore);
        assert!(decide(GICR_PROPBASER, Some(1)).filtered(Some(1)));
        assert!(
            !decide(0x14, Some(2)).filtered(Some(2)),
            "GICR_WAKER passes through"
        );
    }

    #[test]
    fn only_the_first_page_of_a_frame_is_trapped() {
        let frame = 0x080c_0000;
        assert_eq!(trapped_offset(frame, frame + 0x70), Some(0x70));
        assert_eq!(trapped_offset(frame, frame + 0xffc), Some(0xffc));
        assert_eq!(trapped_offset(frame, frame + 0x1000), None);
        assert_eq!(
            trapped_offset(frame, frame + 0x1_0000),
            None,
            "SGI frame is mapped"
        );
        assert_eq!(trapped_offset(frame, frame - 4), None);
    }

    #[test]
    fn only_frames_up_to_the_last_redistributor_are_populated() {
        let (base, size) = (0x080a_0000, 0xf6_0000); // QEMU virt: room for 123 frames
        let two_cpus = |frame: u64| {
            Some(if frame == base + REDISTRIBUTOR_STRIDE {
                TYPER_LAST
            } else {
                0
            })
        };
        assert_eq!(
            populated_frames(base, size, two_cpus),
            [(base, 0x2_0000), (base + 0x2_0000, 0x2_0000)]
        );
        let gicv4 = |frame: u64| Some(TYPER_VLPIS | if frame > base { TYPER_LAST } else { 0 });
        assert_eq!(
            populated_frames(base, size, gicv4),
            [(base, 0x4_0000), (base + 0x4_0000, 0x4_0000)]
        );
        // No Last bit: stop at the region's end; an abort: stop there.
        assert_eq!(populated_frames(base, 0x6_0000, |_| Some(0)).len(), 3);
        assert_eq!(
            populated_frames(base, size, |f| (f < base + 0x4_0000).then_some(0)).len(),
            2
        );
    }

    #[test]
    fn every_part_of_a_64_bit_lpi_register_is_decided_like_the_whole() {
        for offset in [0x74, 0x7c, 0x71, 0x7f, 0x44, 0x4c, 0xa4, 0xb4] {
            assert_eq!(
                decide(offset, Some(0xffff)),
                Decision::Ignore,
                "{offset:#x}"
            );
            assert_eq!(decide(offset, None), Decision::ReadAs(0), "{offset:#x}");
        }
        assert_eq!(
            decide(0x0c, Some(1)),
            Decision::Ignore,
            "GICR_TYPER is read-only"
        );
        assert_eq!(decide(0x0c, None), Decision::Read { clear: 0 });
        assert_eq!(decide(0x04, None), Decision::Read { clear: 0 }, "GICR_IIDR");
    }
}
