//! Running code at EL0 (AArch64 EL0t or AArch32 User mode) from a test at EL1, and coming back.
//!
//! [`run`] saves the calling context of this CPU, points ELR_EL1 at the EL0 entry, SP_EL0 at a
//! user stack and `eret`s. The first exception EL0 takes (an SVC to finish, or a fault, UNDEF,
//! trap) arrives at VBAR_EL1 + 0x400 (AArch64 EL0) or + 0x600 (AArch32 EL0); the exception
//! handler records it and jumps back into the saved context, so that [`run`] returns it as an
//! [`Exit`]. EL0 code must live in pages it may execute ([`crate::mmu::map_user_alias`]).
//!
//! ```ignore
//! let exit = unsafe { el0::run(entry_va, stack_top, el0::Entry::aarch64(arg, 0, lr)) };
//! assert_eq!(exit.class(), 0x15); // SVC
//! ```

use core::arch::global_asm;
use core::cell::UnsafeCell;
use core::sync::atomic::{AtomicBool, Ordering};

use crate::arch::cpu_index;
use crate::boot::MAX_CPUS;
use crate::exceptions::ExceptionFrame;

/// Offset in VBAR_EL1 of the synchronous exception vector from AArch64 EL0.
pub const VECTOR_LOWER_AARCH64: u64 = 0x400;
/// Offset in VBAR_EL1 of the synchronous exception vector from AArch32 EL0.
pub const VECTOR_LOWER_AARCH32: u64 = 0x600;
/// ESR exception class of an SVC from AArch64.
pub const EC_SVC64: u64 = 0x15;
/// ESR exception class of an SVC from AArch32.
pub const EC_SVC32: u64 = 0x11;

/// How EL0 is entered.
#[derive(Clone, Copy, Debug)]
pub struct Entry {
    /// SPSR_EL1 for the `eret`: EL0t (AArch64) or User mode (AArch32), interrupts masked.
    pub spsr: u64,
    /// x0 (r0) at entry.
    pub x0: u64,
    /// x1 (r1) at entry.
    pub x1: u64,
    /// x30 at entry (where an AArch64 `ret` goes).
    pub x30: u64,
}

impl Entry {
    /// AArch64 EL0t with x0 = `x0`, x1 = `x1` and x30 = `x30`; D, A, I, F masked.
    pub fn aarch64(x0: u64, x1: u64, x30: u64) -> Entry {
        Entry {
            spsr: 0b1111 << 6,
            x0,
            x1,
            x30,
        }
    }

    /// AArch32 User mode, A32 instruction set, r0 = `r0`, r1 = `r1`; A, I, F masked.
    pub fn aarch32(r0: u64, r1: u64) -> Entry {
        Entry {
            spsr: 0b111 << 6 | 0b1_0000,
            x0: r0,
            x1: r1,
            x30: 0,
        }
    }
}

/// The exception that ended an EL0 run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Exit {
    /// Offset of the vector that took it from VBAR_EL1 (0x400 AArch64 sync, 0x600 AArch32
    /// sync, plus 0x80/0x100/0x180 for IRQ/FIQ/SError).
    pub vector: u64,
    /// ESR_EL1.
    pub esr: u64,
    /// FAR_EL1.
    pub far: u64,
    /// ELR_EL1: where EL0 was.
    pub elr: u64,
    /// x0 (r0) at the exception.
    pub x0: u64,
}

impl Exit {
    /// ESR exception class.
    pub fn class(&self) -> u64 {
        self.esr >> 26
    }

    /// Whether EL0 ended with an SVC (from either execution state).
    pub fn is_svc(&self) -> bool {
        matches!(self.class(), EC_SVC64 | EC_SVC32)
    }
}

/// The EL1 context saved by `__el0_enter`: x19-x30, SP, DAIF, d8-d15.
#[repr(C)]
struct Context {
    words: [u64; 22],
}

/// One context and one exit per CPU, each only touched by its own CPU.
struct PerCpu {
    context: UnsafeCell<Context>,
    exit: UnsafeCell<Exit>,
    active: AtomicBool,
}

// SAFETY: each CPU touches only its own slot (indexed by `cpu_index`), with interrupts masked.
unsafe impl Sync for PerCpu {}

static SLOTS: [PerCpu; MAX_CPUS] = [const {
    PerCpu {
        context: UnsafeCell::new(Context { words: [0; 22] }),
        exit: UnsafeCell::new(Exit {
            vector: 0,
            esr: 0,
            far: 0,
            elr: 0,
            x0: 0,
        }),
        active: AtomicBool::new(false),
    }
}; MAX_CPUS];

global_asm!(
    r#"
    .section .text.el0, "ax"
    // x0 entry, x1 user SP, x2 x0 for EL0, x3 SPSR, x4 context, x5 x30 for EL0, x6 x1 for EL0.
    .global __el0_enter
__el0_enter:
    stp     x19, x20, [x4, #0]
    stp     x21, x22, [x4, #16]
    stp     x23, x24, [x4, #32]
    stp     x25, x26, [x4, #48]
    stp     x27, x28, [x4, #64]
    stp     x29, x30, [x4, #80]
    mov     x9, sp
    mrs     x10, daif
    stp     x9, x10, [x4, #96]
    stp     d8, d9, [x4, #112]
    stp     d10, d11, [x4, #128]
    stp     d12, d13, [x4, #144]
    stp     d14, d15, [x4, #160]
    msr     elr_el1, x0
    msr     sp_el0, x1
    msr     spsr_el1, x3
    mov     x0, x2
    mov     x30, x5
    mov     x1, x6
    mov     x2, xzr
    mov     x3, xzr
    mov     x4, xzr
    mov     x5, xzr
    mov     x6, xzr
    eret

    // x0 context: back into `__el0_enter`'s caller, as if it returned.
    .global __el0_resume
__el0_resume:
    ldp     x19, x20, [x0, #0]
    ldp     x21, x22, [x0, #16]
    ldp     x23, x24, [x0, #32]
    ldp     x25, x26, [x0, #48]
    ldp     x27, x28, [x0, #64]
    ldp     x29, x30, [x0, #80]
    ldp     x9, x10, [x0, #96]
    mov     sp, x9
    msr     daif, x10
    ldp     d8, d9, [x0, #112]
    ldp     d10, d11, [x0, #128]
    ldp     d12, d13, [x0, #144]
    ldp     d14, d15, [x0, #160]
    isb
    ret
"#
);

unsafe extern "C" {
    fn __el0_enter(
        entry: u64,
        sp: u64,
        x0: u64,
        spsr: u64,
        context: *mut Context,
        x30: u64,
        x1: u64,
    );
    fn __el0_resume(context: *const Context) -> !;
}

/// Runs EL0 code at `entry` with stack pointer `stack` until its first exception, and returns
/// that exception.
///
/// # Safety
/// `entry` and `stack` must be EL0-accessible mappings ([`crate::mmu::map_user_alias`]); the
/// code there may do anything EL0 can do.
pub unsafe fn run(entry: usize, stack: usize, how: Entry) -> Exit {
    let slot = &SLOTS[cpu_index()];
    slot.active.store(true, Ordering::SeqCst);
    // SAFETY: the context belongs to this CPU; `__el0_enter` comes back through
    // `__el0_resume`, which restores every callee-saved register, SP and DAIF, so to the
    // compiler it is an ordinary call that clobbers caller-saved registers.
    unsafe {
        __el0_enter(
            entry as u64,
            stack as u64,
            how.x0,
            how.spsr,
            slot.context.get(),
            how.x30,
            how.x1,
        );
    }
    slot.active.store(false, Ordering::SeqCst);
    // SAFETY: written by this CPU's exception handler before it resumed here.
    unsafe { *slot.exit.get() }
}

/// Called by the exception handler for an exception from a lower EL: if this CPU is in
/// [`run`], records the exception and resumes `run`'s caller (never returns); otherwise returns.
pub(crate) fn take(frame: &ExceptionFrame, vector_index: u64, esr: u64, far: u64) {
    let slot = &SLOTS[cpu_index()];
    if !slot.active.load(Ordering::SeqCst) {
        return;
    }
    let exit = Exit {
        vector: vector_index * 0x80,
        esr,
        far,
        elr: frame.elr,
        x0: frame.x[0],
    };
    // SAFETY: this CPU's slot; `run` reads it only after the resume below.
    unsafe {
        *slot.exit.get() = exit;
        __el0_resume(slot.context.get());
    }
}
