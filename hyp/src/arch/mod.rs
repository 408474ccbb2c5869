//! The thin aarch64 layer: entry code, vectors, the EL2 MMU, and one-instruction wrappers for
//! barriers, cache and TLB maintenance. Everything here is `unsafe` at its core and small.
//! System registers are reached through `aarch64-cpu`'s typed registers, or through
//! [`sysreg`] for those it lacks.

pub mod cpu;
pub mod entry;
pub mod mmu;
pub mod recover;
pub mod sysreg;
pub mod vectors;

use aarch64_cpu::registers::{CurrentEL, Readable, Writeable, MPIDR_EL1, PAR_EL1};
use core::arch::asm;
use sysreg::CTR_EL0;

/// `DSB SY`: all earlier memory accesses and maintenance complete.
pub fn dsb_sy() {
    // SAFETY: a barrier has no memory-safety effect.
    unsafe { asm!("dsb sy", options(nostack, preserves_flags)) };
}

/// `DSB ISH`: earlier accesses and maintenance complete in the inner-shareable domain.
pub fn dsb_ish() {
    // SAFETY: a barrier has no memory-safety effect.
    unsafe { asm!("dsb ish", options(nostack, preserves_flags)) };
}

/// `ISB`: later instructions see earlier system-register writes.
pub fn isb() {
    // SAFETY: a barrier has no memory-safety effect.
    unsafe { asm!("isb", options(nostack, preserves_flags)) };
}

/// The smallest data-cache line, in bytes, from CTR_EL0.DminLine.
pub fn dcache_line_size() -> u64 {
    4 << CTR_EL0.read(CTR_EL0::DminLine)
}

/// Cleans and invalidates `[start, start + len)` to the point of coherency, by VA, then waits
/// for completion (`DSB SY`). Used on images the guest will read with its MMU off.
pub fn clean_invalidate_range(start: u64, len: u64) {
    let line = dcache_line_size();
    let mut va = start & !(line - 1);
    while va < start + len {
        // SAFETY: DC CIVAC on a mapped address writes back and drops a cache line; it does not
        // change memory contents as seen by any observer.
        unsafe { asm!("dc civac, {}", in(reg) va, options(nostack, preserves_flags)) };
        va += line;
    }
    dsb_sy();
}

/// Cleans `[start, start + len)` to the point of coherency (`DC CVAC`) and waits: used for data
/// a CPU with its MMU still off must read.
pub fn clean_range(start: u64, len: u64) {
    let line = dcache_line_size();
    let mut va = start & !(line - 1);
    while va < start + len {
        // SAFETY: DC CVAC writes back a line; memory contents do not change.
        unsafe { asm!("dc cvac, {}", in(reg) va, options(nostack, preserves_flags)) };
        va += line;
    }
    dsb_sy();
}

/// Invalidates `[start, start + len)` by VA without cleaning (`DC IVAC`). Only for memory that
/// was written with the MMU off, whose cache lines (if any) are stale by construction.
pub fn invalidate_range(start: u64, len: u64) {
    let line = dcache_line_size();
    let mut va = start & !(line - 1);
    while va < start + len {
        // SAFETY: the caller passes memory written non-cacheably; any line dropped here holds
        // nothing newer than memory.
        unsafe { asm!("dc ivac, {}", in(reg) va, options(nostack, preserves_flags)) };
        va += line;
    }
    dsb_sy();
}

/// Invalidates the whole instruction cache to the point of unification, inner shareable.
pub fn invalidate_icache() {
    // SAFETY: IC IALLUIS only drops instruction-cache contents.
    unsafe {
        asm!(
            "ic ialluis",
            "dsb ish",
            "isb",
            options(nostack, preserves_flags)
        )
    };
}

/// Invalidates every stage-1 and stage-2 TLB entry of the current VMID, inner shareable.
pub fn tlbi_vmalls12e1is() {
    // SAFETY: TLB invalidation only forces later walks.
    unsafe {
        asm!(
            "tlbi vmalls12e1is",
            "dsb ish",
            "isb",
            options(nostack, preserves_flags)
        )
    };
}

/// The MPIDR_EL1 of this CPU.
pub fn mpidr() -> u64 {
    MPIDR_EL1.get()
}

/// Waits for an interrupt (WFI): returns when one is pending for this CPU, whatever exception
/// level it targets and whatever PSTATE masks, or spuriously.
pub fn wait_for_interrupt() {
    dsb_sy();
    // SAFETY: WFI only waits.
    unsafe { asm!("wfi", options(nomem, nostack, preserves_flags)) };
}

/// Whether an interrupt (IRQ, FIQ or SError) is pending for this CPU: ISR_EL1 read at EL2,
/// where it shows the physical ones, which are the guest's (they are not routed to EL2). Deferred
/// work that runs while the guest idles stops when this says the guest has something to do.
pub fn interrupt_pending() -> bool {
    let isr: u64;
    // SAFETY: reading ISR_EL1 has no side effects.
    unsafe { asm!("mrs {}, isr_el1", out(reg) isr, options(nomem, nostack, preserves_flags)) };
    isr & 0x1c0 != 0 // A, I, F
}

/// The exception level this code runs at (CurrentEL.EL).
pub fn current_el() -> u64 {
    CurrentEL.read(CurrentEL::EL)
}

/// Waits for an event, forever (a CPU with nothing left to do).
pub fn halt() -> ! {
    loop {
        // SAFETY: WFE only waits.
        unsafe { asm!("wfe", options(nomem, nostack, preserves_flags)) };
    }
}

/// Reads a `width`-byte (1, 2, 4 or 8) device register at physical address `pa`.
///
/// # Safety
/// `pa` must be a register the hypervisor maps as Device memory, naturally aligned, and
/// reading it must have no effect the caller has not decided on.
pub unsafe fn mmio_read(pa: u64, width: u8) -> u64 {
    // SAFETY: per the contract above.
    unsafe {
        match width {
            1 => (pa as *const u8).read_volatile() as u64,
            2 => (pa as *const u16).read_volatile() as u64,
            4 => (pa as *const u32).read_volatile() as u64,
            _ => (pa as *const u64).read_volatile(),
        }
    }
}

/// An address translation for the current guest: stage 1 only or both stages, for a read or a
/// write. Returns PAR_EL1 and restores the guest's own PAR_EL1, which AT overwrites.
///
/// # Errors
/// [`recover::ExternalAbort`] when the walk through the guest's tables took an external abort
/// (the guest placed a table in MMIO that does not answer).
pub fn translate_guest_va(
    va: u64,
    both_stages: bool,
    write: bool,
) -> Result<u64, recover::ExternalAbort> {
    use recover::Translate;
    let saved = PAR_EL1.get();
    let kind = match (both_stages, write) {
        (false, false) => Translate::Stage1Read,
        (false, true) => Translate::Stage1Write,
        (true, false) => Translate::BothRead,
        (true, true) => Translate::BothWrite,
    };
    let result = recover::translate(va, kind);
    let par = PAR_EL1.get();
    PAR_EL1.set(saved);
    result.map(|()| par)
}
