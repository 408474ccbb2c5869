//! Accesses the hypervisor makes on the guest's behalf that may take a synchronous external
//! abort at EL2: emulated MMIO (a register nothing answers) and address translations (AT) whose
//! stage-1 walk the guest pointed at such MMIO. Each such instruction is listed in the
//! `.fixups` section as a pair (address of the instruction, address to resume at). When one
//! faults, the EL2 exception handler finds it with [`resume_address`], sets x17 in the saved
//! frame to 1 and resumes there, so the caller sees an error instead of the hypervisor dying.
//! x17 is the flag because the frame saves and restores every general-purpose register, and
//! x17 (IP1) is never given special meaning by the procedure-call standard inside a function.

use core::arch::asm;

/// The access took a synchronous external abort (or another data abort) at EL2.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ExternalAbort;

/// The register the exception handler sets to 1 when it resumes at a fixup.
pub const FLAG_REGISTER: usize = 17;

unsafe extern "C" {
    static __fixups_start: u64;
    static __fixups_end: u64;
}

/// Where to resume when the instruction at `pc` faulted, if it is a recoverable one.
pub fn resume_address(pc: u64) -> Option<u64> {
    // SAFETY: the linker script places `.fixups` (pairs of u64, 8-byte aligned) between the two
    // symbols, in the image's read-only data, mapped for the whole run.
    let table = unsafe {
        let start = &__fixups_start as *const u64;
        let end = &__fixups_end as *const u64;
        core::slice::from_raw_parts(start, end.offset_from(start) as usize)
    };
    table
        .chunks_exact(2)
        .find(|pair| pair[0] == pc)
        .map(|pair| pair[1])
}

/// One instruction that may fault, with its fixup entry: `$insn` is the instruction text, the
/// rest are `asm!` operands. Evaluates to `Err(ExternalAbort)` if it faulted.
macro_rules! recoverable {
    ($insn:literal, $($operands:tt)*) => {{
        let failed: u64;
        // SAFETY: the caller's contract for the instruction holds (see each use); a fault on it
        // is recovered by the EL2 handler through the `.fixups` entry emitted here.
        unsafe {
            asm!(
                "7:",
                $insn,
                "8:",
                ".pushsection .fixups, \"a\"",
                ".balign 8",
                ".quad 7b, 8b",
                ".popsection",
                $($operands)*
                inout("x17") 0u64 => failed,
                options(nostack, preserves_flags),
            )
        };
        if failed == 0 { Ok(()) } else { Err(ExternalAbort) }
    }};
}

/// Reads a `width`-byte (1, 2, 4 or 8) device register at physical address `pa`.
///
/// # Safety
/// `pa` must lie in a region the hypervisor maps as Device memory at EL2, naturally aligned,
/// and reading it must have no effect the caller has not decided on.
///
/// # Errors
/// [`ExternalAbort`] when nothing answered the read.
pub unsafe fn mmio_read(pa: u64, width: u8) -> Result<u64, ExternalAbort> {
    let value: u64;
    match width {
        1 => recoverable!("ldrb {v:w}, [{pa}]", pa = in(reg) pa, v = out(reg) value,),
        2 => recoverable!("ldrh {v:w}, [{pa}]", pa = in(reg) pa, v = out(reg) value,),
        4 => recoverable!("ldr {v:w}, [{pa}]", pa = in(reg) pa, v = out(reg) value,),
        _ => recoverable!("ldr {v}, [{pa}]", pa = in(reg) pa, v = out(reg) value,),
    }
    .map(|()| value)
}

/// Writes a `width`-byte device register at physical address `pa`.
///
/// # Safety
/// As for [`mmio_read`], for a write.
///
/// # Errors
/// [`ExternalAbort`] when the write was refused synchronously. (A device may also answer a
/// write with an asynchronous SError, which EL2 keeps masked; it reaches the guest, whose
/// access caused it.)
pub unsafe fn mmio_write(pa: u64, width: u8, value: u64) -> Result<(), ExternalAbort> {
    match width {
        1 => recoverable!("strb {v:w}, [{pa}]", pa = in(reg) pa, v = in(reg) value,),
        2 => recoverable!("strh {v:w}, [{pa}]", pa = in(reg) pa, v = in(reg) value,),
        4 => recoverable!("str {v:w}, [{pa}]", pa = in(reg) pa, v = in(reg) value,),
        _ => recoverable!("str {v}, [{pa}]", pa = in(reg) pa, v = in(reg) value,),
    }
}

/// Which address translation to ask the CPU for on behalf of the guest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Translate {
    /// Stage 1 only, as for a read (`AT S1E1R`).
    Stage1Read,
    /// Stage 1 only, as for a write (`AT S1E1W`).
    Stage1Write,
    /// Both stages, as for a read (`AT S12E1R`).
    BothRead,
    /// Both stages, as for a write (`AT S12E1W`).
    BothWrite,
}

/// Runs one AT instruction for guest VA `va`; the result is in PAR_EL1 (the caller saves and
/// restores the guest's own). The guest's stage-1 tables may lie anywhere it chose, MMIO
/// included, so the walk may take an external abort at EL2.
///
/// # Errors
/// [`ExternalAbort`] when the walk did.
pub fn translate(va: u64, kind: Translate) -> Result<(), ExternalAbort> {
    let result = match kind {
        Translate::Stage1Read => recoverable!("at s1e1r, {va}", va = in(reg) va,),
        Translate::Stage1Write => recoverable!("at s1e1w, {va}", va = in(reg) va,),
        Translate::BothRead => recoverable!("at s12e1r, {va}", va = in(reg) va,),
        Translate::BothWrite => recoverable!("at s12e1w, {va}", va = in(reg) va,),
    };
    super::isb();
    result
}
