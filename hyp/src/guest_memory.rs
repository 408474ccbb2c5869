//! The boot-time access to guest RAM (loading images, writing the device tree, cleaning what
//! the guest reads with its MMU off). It keeps no mapping of guest RAM of its own: like every
//! access on the guest's behalf (`hyp_core::hypercall::memory`), it goes through this CPU's
//! maintenance window, mapped page by page with the attribute the guest's stage 2 gives the
//! page (invariant I1).

use crate::arch::cpu::Cpu;
use crate::arch::mmu::HeapTables;
use hyp_core::attributes::AttributeManager;
use hyp_core::window::Window;
use stagehand_abi::Status;

/// Calls `visit(va, offset, len)` for each window-sized piece of guest `[ipa, ipa + len)`,
/// mapped in `window` while `visit` runs.
///
/// # Errors
/// OUT_OF_RANGE or DENIED when the range is not guest RAM (checked before anything is mapped).
pub fn with_mapped(
    attributes: &AttributeManager,
    window: &mut Window<HeapTables>,
    ipa: u64,
    len: u64,
    mut visit: impl FnMut(u64, u64, u64),
) -> Result<(), Status> {
    hyp_core::hypercall::memory::with_mapped(
        attributes,
        &mut Cpu::new(),
        window,
        ipa,
        len,
        |_, va, _, offset, len| visit(va.get(), offset, len),
    )
}
