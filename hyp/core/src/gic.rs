//! The guest uses the GICv3 directly (distributor and redistributors are passed through), with
//! one exception: nothing may let the GIC read or write memory the guest chooses. Without an
//! ITS the only such registers are in the first 4 KiB page of each redistributor's RD frame
//! (GICR_PROPBASER, GICR_PENDBASER and GICR_CTLR.EnableLPIs), so that page is left out of stage
//! 2 and every access to it is decided here. LPIs stay off: GICR_TYPER.PLPIS reads 0.

/// Bytes per redistributor (RD_base frame plus SGI_base frame).
pub const REDISTRIBUTOR_STRIDE: u64 = 0x2_0000;
/// Bytes of each RD frame that are trapped.
pub const TRAPPED_PAGE: u64 = 0x1000;

const GICR_CTLR: u64 = 0x0000;
const GICR_TYPER: u64 = 0x0008;
const GICR_TYPER_HIGH: u64 = 0x000c;
const GICR_PROPBASER: u64 = 0x0070;
const GICR_PENDBASER: u64 = 0x0078;
const LPI_COMMANDS: [u64; 5] = [0x0040, 0x0048, 0x00a0, 0x00b0, 0x00c0];

const CTLR_ENABLE_LPIS: u64 = 1 << 0;
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

/// The offset into the trapped page of an access at `ipa`, if `ipa` lies in the first page of
/// one of the redistributors in `[base, base + size)`.
pub fn trapped_offset(base: u64, size: u64, ipa: u64) -> Option<u64> {
    let offset = ipa.checked_sub(base)?;
    (offset < size && offset % REDISTRIBUTOR_STRIDE < TRAPPED_PAGE)
        .then_some(offset % REDISTRIBUTOR_STRIDE)
}

/// Decides an access at `offset` in the RD frame: `write` holds the value of a store.
pub fn decide(offset: u64, write: Option<u64>) -> Decision {
    match (offset, write) {
        (GICR_CTLR, Some(value)) => Decision::Write(value & !CTLR_ENABLE_LPIS),
        (GICR_CTLR, None) => Decision::Read {
            clear: CTLR_ENABLE_LPIS,
        },
        (GICR_TYPER, None) => Decision::Read {
            clear: TYPER_PLPIS | TYPER_DIRECT_LPI,
        },
        (GICR_TYPER | GICR_TYPER_HIGH, Some(_)) => Decision::Ignore,
        (GICR_PROPBASER | GICR_PENDBASER, None) => Decision::ReadAs(0),
        (GICR_PROPBASER | GICR_PENDBASER, Some(_)) => Decision::Ignore,
        (o, None) if LPI_COMMANDS.contains(&o) => Decision::ReadAs(0),
        (o, Some(_)) if LPI_COMMANDS.contains(&o) => Decision::Ignore,
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
    fn only_the_first_page_of_each_redistributor_is_trapped() {
        let (base, size) = (0x080a_0000, 0xf6_0000);
        assert_eq!(trapped_offset(base, size, base + 0x70), Some(0x70));
        assert_eq!(trapped_offset(base, size, base + 0x2_0014), Some(0x14));
        assert_eq!(trapped_offset(base, size, base + 0x1000), None);
        assert_eq!(
            trapped_offset(base, size, base + 0x1_0000),
            None,
            "SGI frame is mapped"
        );
        assert_eq!(trapped_offset(base, size, base + size), None);
        assert_eq!(trapped_offset(base, size, base - 4), None);
    }
}
