//! Emulating an exception entry into the guest's EL1, as hardware would have taken it: the
//! hypervisor uses it to give the guest a synchronous external abort for an access to an IPA it
//! does not own, and an UNDEF for an instruction it does not emulate, so the guest, not the
//! hypervisor, deals with its own mistake. The guest may have been in AArch64 EL1 or EL0, or in
//! AArch32 EL0; the exception is taken to AArch64 EL1 at the vector that state selects.

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

const MODE_MASK: u64 = 0b1_1111;
/// SPSR.M[4]: the interrupted state was AArch32.
const MODE_AARCH32: u64 = 0b1_0000;
const MODE_EL1T: u64 = 0b0_0100;
const MODE_EL1H: u64 = 0b0_0101;
const DAIF: u64 = 0b1111 << 6;
const PAN: u64 = 1 << 22;
const SCTLR_SPAN: u64 = 1 << 23;
const IL: u64 = 1 << 25;
const WNR: u64 = 1 << 6;
/// Fault status: synchronous external abort, not on a table walk.
const SYNC_EXTERNAL_ABORT: u64 = 0x10;

/// Where the guest was when the exception happened, which picks the vector (offset from
/// VBAR_EL1) and whether the exception classes "from a lower EL" apply.
fn origin(spsr: u64) -> (u64, bool) {
    if spsr & MODE_AARCH32 != 0 {
        // Only EL0 can be AArch32 (HCR_EL2.RW = 1): "lower EL using AArch32".
        return (0x600, true);
    }
    match spsr & MODE_MASK {
        MODE_EL1T => (0x000, false),
        MODE_EL1H => (0x200, false),
        // EL0t, and any mode the guest cannot really be in: "lower EL using AArch64".
        _ => (0x400, true),
    }
}

/// The exception entry common to every injection: vector, PSTATE on entry, saved state.
fn enter(guest: &GuestContext, esr: u64, far: u64) -> Injection {
    let (vector_offset, _) = origin(guest.spsr);
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
        esr_el1: esr,
        far_el1: far,
    }
}

/// Builds a synchronous external abort for an access at virtual address `far`.
pub fn external_abort(guest: &GuestContext, far: u64, access: Access) -> Injection {
    let (_, from_lower) = origin(guest.spsr);
    let class: u64 = match (access, from_lower) {
        (Access::Fetch, true) => 0x20,
        (Access::Fetch, false) => 0x21,
        (_, true) => 0x24,
        (_, false) => 0x25,
    };
    let write = if access == Access::Write { WNR } else { 0 };
    // AArch32 state has 32-bit addresses: the top half of FAR_EL1 is zero.
    let far = if guest.spsr & MODE_AARCH32 != 0 {
        far & 0xffff_ffff
    } else {
        far
    };
    enter(guest, class << 26 | IL | write | SYNC_EXTERNAL_ABORT, far)
}

/// Builds the exception an instruction the hypervisor does not emulate gives the guest: an
/// UNDEF ("unknown reason", EC 0, IL 1), as if the CPU did not implement it. FAR_EL1 is left
/// as it is (`far` = its current value), which the architecture allows for this class.
pub fn undefined(guest: &GuestContext, far: u64) -> Injection {
    enter(guest, IL, far)
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

    #[test]
    fn an_abort_from_aarch32_el0_goes_to_the_lower_el_aarch32_vector() {
        // SPSR.M = 0b10000: AArch32 User mode.
        let guest = GuestContext {
            spsr: 0b1_0000,
            ..GUEST
        };
        let i = external_abort(&guest, 0xffff_ffff_0000_1234, Access::Read);
        assert_eq!(i.elr_el2, 0x4009_0600);
        assert_eq!(i.esr_el1 >> 26, 0x24, "data abort from a lower EL");
        assert_eq!(i.far_el1, 0x1234, "32-bit address");
        assert_eq!(i.spsr_el1, 0b1_0000);
        let i = external_abort(&guest, 0x8000, Access::Fetch);
        assert_eq!((i.elr_el2, i.esr_el1 >> 26), (0x4009_0600, 0x20));
    }

    #[test]
    fn undefined_is_an_unknown_reason_exception_at_the_vector_the_state_selects() {
        for (spsr, vector) in [
            (0x3c4, 0x000), // EL1t
            (0x3c5, 0x200), // EL1h
            (0x000, 0x400), // EL0t
            (0x010, 0x600), // AArch32 User
            (0x01f, 0x600), // AArch32, any mode
        ] {
            let guest = GuestContext { spsr, ..GUEST };
            let i = undefined(&guest, 0x55);
            assert_eq!(i.elr_el2, GUEST.vbar + vector, "SPSR {spsr:#x}");
            assert_eq!(i.esr_el1, 1 << 25, "EC 0, IL 1");
            assert_eq!((i.elr_el1, i.spsr_el1, i.far_el1), (GUEST.elr, spsr, 0x55));
            assert_eq!(i.spsr_el2 & 0x3cf, 0x3c5, "EL1h, DAIF masked");
        }
    }
}
