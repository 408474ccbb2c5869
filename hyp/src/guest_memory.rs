//! The hypervisor's access to guest RAM. It keeps no mapping of guest RAM of its own: every copy
//! and every cache operation on the guest's behalf goes through this CPU's maintenance window,
//! mapped page by page with the attribute the guest's stage 2 gives the page (invariant I1).

use crate::arch::cpu::Cpu;
use crate::arch::mmu::HeapTables;
use crate::trap::current_vcpu;
use crate::vm::vm;
use hyp_core::attributes::AttributeManager;
use hyp_core::pagetable::PAGE_SIZE;
use hyp_core::window::{Window, WINDOW_PAGES};
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
    if len == 0 {
        return Ok(());
    }
    attributes.ram().pa_of(ipa, len).ok_or(Status::OutOfRange)?;
    let mut cpu = Cpu::new();
    let end = ipa + len;
    let mut at = ipa;
    while at < end {
        let piece_end = end.min((at & !(PAGE_SIZE - 1)) + WINDOW_PAGES * PAGE_SIZE);
        let va = attributes.map_for_access(&mut cpu, window, at, piece_end - at)?;
        visit(va, at - ipa, piece_end - at);
        window.unmap(&mut cpu);
        at = piece_end;
    }
    Ok(())
}

/// Reads `buffer.len()` bytes of guest RAM at `ipa`.
///
/// # Errors
/// OUT_OF_RANGE or DENIED when the range is not guest RAM.
pub fn read(ipa: u64, buffer: &mut [u8]) -> Result<(), Status> {
    let vm = vm();
    let attributes = vm.attributes.read();
    let mut window = vm.windows[current_vcpu()].lock();
    read_locked(&attributes, &mut window, ipa, buffer)
}

/// [`read`] for a caller that holds the attribute manager (read or write) and this CPU's window.
///
/// # Errors
/// OUT_OF_RANGE or DENIED when the range is not guest RAM.
pub fn read_locked(
    attributes: &AttributeManager,
    window: &mut Window<HeapTables>,
    ipa: u64,
    buffer: &mut [u8],
) -> Result<(), Status> {
    with_mapped(
        attributes,
        window,
        ipa,
        buffer.len() as u64,
        |va, offset, len| {
            // SAFETY: the window maps this piece of guest RAM for the duration of the call; a byte
            // copy has no alignment requirement. The guest may change the bytes concurrently: they
            // are parsed afterwards, never trusted as a Rust value.
            unsafe {
                core::ptr::copy_nonoverlapping(
                    va as *const u8,
                    buffer[offset as usize..].as_mut_ptr(),
                    len as usize,
                )
            };
        },
    )
}

/// Writes `bytes` to guest RAM at `ipa`.
///
/// # Errors
/// OUT_OF_RANGE or DENIED when the range is not guest RAM.
pub fn write(ipa: u64, bytes: &[u8]) -> Result<(), Status> {
    let vm = vm();
    let attributes = vm.attributes.read();
    let mut window = vm.windows[current_vcpu()].lock();
    write_locked(&attributes, &mut window, ipa, bytes)
}

/// [`write`] for a caller that holds the attribute manager (read or write) and this CPU's
/// window.
///
/// # Errors
/// OUT_OF_RANGE or DENIED when the range is not guest RAM.
pub fn write_locked(
    attributes: &AttributeManager,
    window: &mut Window<HeapTables>,
    ipa: u64,
    bytes: &[u8],
) -> Result<(), Status> {
    with_mapped(
        attributes,
        window,
        ipa,
        bytes.len() as u64,
        |va, offset, len| {
            // SAFETY: as in `read_locked`; guest RAM is never hypervisor memory.
            unsafe {
                core::ptr::copy_nonoverlapping(
                    bytes[offset as usize..].as_ptr(),
                    va as *mut u8,
                    len as usize,
                )
            };
        },
    )
}

/// Checks that guest `[ipa, ipa + len)` is RAM, without mapping it.
///
/// # Errors
/// OUT_OF_RANGE when it wraps or leaves guest RAM, DENIED when it touches the guest's MMIO.
pub fn translate(ipa: u64, len: u64) -> Result<u64, Status> {
    let vm = vm();
    vm.attributes.read().check(ipa, len)?;
    vm.ram.pa_of(ipa, len).ok_or(Status::OutOfRange)
}
