//! The boot-time access to guest RAM (loading images, writing the device tree, cleaning what
//! the guest reads with its MMU off). It keeps no mapping of guest RAM of its own: like every
//! access on the guest's behalf (`hyp_core::hypercall::memory`), it goes through the
//! hypervisor's alias of guest RAM, whose pages have the attribute the guest's stage 2 gives
//! them (invariant I1).

use crate::arch::cpu::Cpu;
use hyp_core::attributes::AttributeManager;
use stagehand_abi::Status;

/// Calls `visit(va, offset, len)` for guest `[ipa, ipa + len)`, reached at `va` in the alias.
///
/// # Errors
/// OUT_OF_RANGE or DENIED when the range is not guest RAM.
pub fn with_mapped(
    attributes: &AttributeManager,
    ipa: u64,
    len: u64,
    mut visit: impl FnMut(u64, u64, u64),
) -> Result<(), Status> {
    hyp_core::hypercall::memory::with_mapped(
        attributes,
        &mut Cpu::new(),
        ipa,
        len,
        |_, va, _, offset, len| visit(va.get(), offset, len),
    )
}
