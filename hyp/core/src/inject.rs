//! Emulating an exception entry into the guest's EL1, as hardware would have taken it: the
//! hypervisor uses it to give the guest a synchronous external abort for an access to an IPA it
//! does not own, so the guest, not the hypervisor, deals with its own mistake.

/// What the guest was doing when it trapped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GuestContext {
    /// SPSR_EL2: the guest's PSTATE.
    pub spsr: u64,
    /// ELR_EL2: the faulting instruction.
    pub elr: u64,
    /// VBAR_EL1: the guest's vector table.
    pub vbar: u64,
    /// SCTLR_EL1 (its SPAN bit decides PAN on exception entry).
    pub sctlr: u64,
}

/// The kind of access that faulted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    /// A load (or the read of a read-modify-write).
    Read,
    /// A store.
    Write,
    /// An instruction fetch.
    Fetch,
}

/// Register values that deliver the exception.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Injection {
    /// New ELR_EL2: the guest's vector.
    pub elr_el2: u64,
    /// New SPSR_EL2: EL1h with D, A, I, F masked.
    pub spsr_el2: u64,
    /// ELR_EL1: where the guest faulted.
    pub elr_el1: u64,
    /// SPSR_EL1: the guest's PSTATE at the fault.
    pub spsr_el1: u64,
    /// ESR_EL1: the syndrome the guest reads.
    pub esr_el1: u64,
    /// FAR_EL1: the faulting virtual address.
    pub far_el1: u64,
}

const MODE_MASK: u64 = 0b1111;
const MODE_EL0T: u64 = 0b0000;
const MODE_EL1T: u64 = 0b0100;
const MODE_EL1H: u64 = 0b0101;
const DAIF: u64 = 0b1111 << 6;
const PAN: u64 = 1 << 22;
const SCTLR_SPAN: u64 = 1 << 23;
const IL: u64 = 1 << 25;
const WNR: u64 = 1 << 6;
/// Fault status: synchronous external abort, not on a table walk.
const SYNC_EXTERNAL_ABORT: u64 = 0x10;

/// Builds a synchronous external abort for an access at virtual address `far`.
pub fn external_abort(guest: &GuestContext, far: u64, access: Access) -> Injection {
    let from_el0 = guest.spsr & MODE_MASK == MODE_EL0T;
    let vector_offset = match guest.spsr & MODE_MASK {
        MODE_EL1T => 0x000,
        MODE_EL1H => 0x200,
        _ => 0x400,
    };
    let class: u64 = match (access, from_el0) {
        (Access::Fetch, true) => 0x20,
        (Access::Fetch, false) => 0x21,
        (_, true) => 0x24,
        (_, false) => 0x25,
    };
    let write = if access == Access::Write { WNR } else { 0 };
    let pan = if guest.sctlr & SCTLR_SPAN == 0 {
        PAN
    } else {
        guest.spsr & PAN
    };
    Injection {
        elr_el2: guest.vbar + vector_offset,
        spsr_el2: MODE_EL1H | DAIF | pan,
        elr_el1: guest.elr,
        spsr_el1: guest.spsr,
        esr_el1: class << 26 | IL | write | SYNC_EXTERNAL_ABORT,
        far_el1: far,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GUEST: GuestContext = GuestContext {
        spsr: 0x3c5,
        elr: 0x4008_1000,
        vbar: 0x4009_0000,
        sctlr: 1 << 23,
    };

    #[test]
    fn data_abort_from_el1h_goes_to_the_current_el_spx_vector() {
        let i = external_abort(&GUEST, 0xdead_b000, Access::Write);
        assert_eq!(i.elr_el2, 0x4009_0200);
        assert_eq!(i.esr_el1, 0x9600_0050);
        assert_eq!(
            (i.elr_el1, i.spsr_el1, i.far_el1),
            (0x4008_1000, 0x3c5, 0xdead_b000)
        );
        assert_eq!(i.spsr_el2 & 0xf, MODE_EL1H);
        assert_eq!(i.spsr_el2 & DAIF, DAIF);
    }

    #[test]
    fn fetch_abort_from_el0_goes_to_the_lower_el_vector() {
        let guest = GuestContext {
            spsr: 0,
            sctlr: 0,
            ..GUEST
        };
        let i = external_abort(&guest, 0x1000, Access::Fetch);
        assert_eq!(i.elr_el2, 0x4009_0400);
        assert_eq!(i.esr_el1 >> 26, 0x20);
        assert_ne!(i.spsr_el2 & PAN, 0, "SPAN clear sets PAN on entry");
    }
}
