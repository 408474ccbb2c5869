//! EL1 exception vectors. Every exception saves the general-purpose and FP/SIMD registers in an
//! [`ExceptionFrame`] on the current stack and calls [`handle_exception`]: an armed probe
//! swallows a synchronous abort, a registered handler takes IRQs, anything else is a decoded
//! report that fails the suite.

use core::arch::global_asm;
use core::sync::atomic::{AtomicUsize, Ordering};

use alloc::format;

use crate::{probe, test};

/// Size in bytes of [`ExceptionFrame`], as the assembly lays it out.
const FRAME_SIZE: usize = 800;

/// Registers saved on exception entry and restored by `eret`.
#[repr(C)]
pub struct ExceptionFrame {
    /// x0-x30.
    pub x: [u64; 31],
    /// ELR_EL1: where `eret` returns to.
    pub elr: u64,
    /// SPSR_EL1.
    pub spsr: u64,
    /// FPCR.
    pub fpcr: u64,
    /// FPSR.
    pub fpsr: u64,
    _pad: u64,
    /// q0-q31.
    pub q: [u128; 32],
}

const _: () = assert!(core::mem::size_of::<ExceptionFrame>() == FRAME_SIZE);

global_asm!(
    r#"
    .section .text.vectors, "ax"
    .balign 2048
    .global __vectors
__vectors:
    .irp kind, 0,1,2,3,4,5,6,7,8,9,10,11,12,13,14,15
    .balign 0x80
    sub     sp, sp, #{frame_size}
    stp     x0, x1, [sp]
    mov     x1, #\kind
    b       __exception_common
    .endr

__exception_common:
    stp     x2, x3, [sp, #16]
    stp     x4, x5, [sp, #32]
    stp     x6, x7, [sp, #48]
    stp     x8, x9, [sp, #64]
    stp     x10, x11, [sp, #80]
    stp     x12, x13, [sp, #96]
    stp     x14, x15, [sp, #112]
    stp     x16, x17, [sp, #128]
    stp     x18, x19, [sp, #144]
    stp     x20, x21, [sp, #160]
    stp     x22, x23, [sp, #176]
    stp     x24, x25, [sp, #192]
    stp     x26, x27, [sp, #208]
    stp     x28, x29, [sp, #224]
    mrs     x2, elr_el1
    stp     x30, x2, [sp, #240]
    mrs     x3, spsr_el1
    mrs     x4, fpcr
    stp     x3, x4, [sp, #256]
    mrs     x5, fpsr
    str     x5, [sp, #272]
    stp     q0, q1, [sp, #288]
    stp     q2, q3, [sp, #320]
    stp     q4, q5, [sp, #352]
    stp     q6, q7, [sp, #384]
    stp     q8, q9, [sp, #416]
    stp     q10, q11, [sp, #448]
    stp     q12, q13, [sp, #480]
    stp     q14, q15, [sp, #512]
    stp     q16, q17, [sp, #544]
    stp     q18, q19, [sp, #576]
    stp     q20, q21, [sp, #608]
    stp     q22, q23, [sp, #640]
    stp     q24, q25, [sp, #672]
    stp     q26, q27, [sp, #704]
    stp     q28, q29, [sp, #736]
    stp     q30, q31, [sp, #768]
    mov     x0, sp
    bl      {handler}
    ldp     q0, q1, [sp, #288]
    ldp     q2, q3, [sp, #320]
    ldp     q4, q5, [sp, #352]
    ldp     q6, q7, [sp, #384]
    ldp     q8, q9, [sp, #416]
    ldp     q10, q11, [sp, #448]
    ldp     q12, q13, [sp, #480]
    ldp     q14, q15, [sp, #512]
    ldp     q16, q17, [sp, #544]
    ldp     q18, q19, [sp, #576]
    ldp     q20, q21, [sp, #608]
    ldp     q22, q23, [sp, #640]
    ldp     q24, q25, [sp, #672]
    ldp     q26, q27, [sp, #704]
    ldp     q28, q29, [sp, #736]
    ldp     q30, q31, [sp, #768]
    ldr     x5, [sp, #272]
    msr     fpsr, x5
    ldp     x3, x4, [sp, #256]
    msr     spsr_el1, x3
    msr     fpcr, x4
    ldp     x30, x2, [sp, #240]
    msr     elr_el1, x2
    ldp     x28, x29, [sp, #224]
    ldp     x26, x27, [sp, #208]
    ldp     x24, x25, [sp, #192]
    ldp     x22, x23, [sp, #176]
    ldp     x20, x21, [sp, #160]
    ldp     x18, x19, [sp, #144]
    ldp     x16, x17, [sp, #128]
    ldp     x14, x15, [sp, #112]
    ldp     x12, x13, [sp, #96]
    ldp     x10, x11, [sp, #80]
    ldp     x8, x9, [sp, #64]
    ldp     x6, x7, [sp, #48]
    ldp     x4, x5, [sp, #32]
    ldp     x2, x3, [sp, #16]
    ldp     x0, x1, [sp]
    add     sp, sp, #{frame_size}
    eret
    "#,
    frame_size = const FRAME_SIZE,
    handler = sym handle_exception,
);

/// Which vector an exception came through (the entry's index in the table).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Vector {
    CurrentSp0(Kind),
    CurrentSpx(Kind),
    Lower64(Kind),
    Lower32(Kind),
}

/// The kind of exception within a vector group.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Sync,
    Irq,
    Fiq,
    SError,
}

impl Vector {
    fn from_index(index: u64) -> Vector {
        let kind = match index % 4 {
            0 => Kind::Sync,
            1 => Kind::Irq,
            2 => Kind::Fiq,
            _ => Kind::SError,
        };
        match index / 4 {
            0 => Vector::CurrentSp0(kind),
            1 => Vector::CurrentSpx(kind),
            2 => Vector::Lower64(kind),
            _ => Vector::Lower32(kind),
        }
    }
}

/// The IRQ handler registered by a test (a `fn()` stored as an address; 0 = none).
static IRQ_HANDLER: AtomicUsize = AtomicUsize::new(0);

/// Registers `handler` to run for every IRQ taken at EL1 (on any CPU), replacing any earlier
/// one. `None` removes it: an IRQ then fails the suite.
pub fn set_irq_handler(handler: Option<fn()>) {
    IRQ_HANDLER.store(handler.map_or(0, |f| f as usize), Ordering::SeqCst);
}

extern "C" fn handle_exception(frame: &mut ExceptionFrame, index: u64) {
    let vector = Vector::from_index(index);
    match vector {
        Vector::CurrentSpx(Kind::Sync) => {
            let esr = crate::read_sysreg!(esr_el1);
            let far = crate::read_sysreg!(far_el1);
            if probe::take(frame, esr, far) {
                return;
            }
        }
        Vector::CurrentSpx(Kind::Irq) => {
            let handler = IRQ_HANDLER.load(Ordering::SeqCst);
            if handler != 0 {
                // SAFETY: the only non-zero values stored are `fn()` pointers
                // (see `set_irq_handler`).
                let handler: fn() = unsafe { core::mem::transmute::<usize, fn()>(handler) };
                handler();
                return;
            }
        }
        Vector::Lower64(_) | Vector::Lower32(_) => {
            crate::el0::take(
                frame,
                index,
                crate::read_sysreg!(esr_el1),
                crate::read_sysreg!(far_el1),
            );
        }
        _ => {}
    }
    let esr = crate::read_sysreg!(esr_el1);
    let far = crate::read_sysreg!(far_el1);
    test::abort_suite(&format!(
        "unexpected exception on CPU {}: {:?}, ESR {:#x} ({}), FAR {:#x}, ELR {:#x}, SPSR {:#x}",
        crate::arch::cpu_index(),
        vector,
        esr,
        exception_class_name(esr >> 26),
        far,
        frame.elr,
        frame.spsr
    ));
}

/// A short name for an ESR_ELx exception class.
pub fn exception_class_name(class: u64) -> &'static str {
    match class {
        0x00 => "unknown reason",
        0x01 => "WFI/WFE",
        0x07 => "FP/SIMD access",
        0x0e => "illegal execution state",
        0x15 => "SVC",
        0x16 => "HVC",
        0x17 => "SMC",
        0x18 => "system register access",
        0x20 => "instruction abort from a lower EL",
        0x21 => "instruction abort",
        0x22 => "PC alignment fault",
        0x24 => "data abort from a lower EL",
        0x25 => "data abort",
        0x26 => "SP alignment fault",
        0x2f => "SError",
        0x3c => "BRK",
        _ => "other",
    }
}
