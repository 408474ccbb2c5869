//! The EL2 exception vector table and the guest entry/exit path.
//!
//! Every exception saves the guest's registers, ELR_EL2 and SPSR_EL2 in a [`TrapFrame`] on the
//! CPU's EL2 stack and calls a Rust handler with it; the handler may change the frame (results
//! of a call, a new ELR), and the same path restores it and returns with `eret`. Entering a
//! guest for the first time is a return through that path with a frame built by hand.
//!
//! The hypercall (`HVC #0` from AArch64, told apart in the vector by its exact ESR_EL2) takes a
//! shorter path. A call whose answer is constant (REVISION, the versions, CALL_UID: the table
//! of `hyp_core::hypercall::constant`) is answered in the vector itself, with x0-x3 only, and
//! returns without saving anything else. Any other call saves only what the Rust handler may
//! clobber (x0-x18, x30, ELR, SPSR) and leaves x19-x29 in the registers, where the AAPCS64
//! makes the handler preserve them. vCPUs are pinned one to one to CPUs, so nothing else runs
//! on this CPU before the `eret`. Every other exception (MMIO emulation reads and writes any
//! register by number, fault reports print them all) saves the full frame.

use core::arch::global_asm;
use hyp_core::hypercall::constant;

/// The guest's general-purpose registers and return state, as saved on entry to EL2. On the
/// hypercall path (`handle_hypercall`) `x[19..30]` are not saved: they hold stale values and
/// the guest's own stay in the registers.
#[repr(C)]
#[derive(Clone, Debug, Default)]
pub struct TrapFrame {
    /// x0-x30.
    pub x: [u64; 31],
    /// ELR_EL2: where the guest resumes.
    pub elr: u64,
    /// SPSR_EL2: the guest's PSTATE.
    pub spsr: u64,
    _pad: u64,
}

/// Which vector was taken.
#[repr(u64)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Vector {
    /// Synchronous, from EL2 itself.
    El2Sync = 0,
    /// IRQ, FIQ or SError at EL2 (never expected).
    El2Async = 1,
    /// Synchronous from the guest (AArch64, or AArch32 at EL0).
    GuestSync = 2,
    /// IRQ/FIQ from the guest (not routed to EL2, so unexpected).
    GuestAsync = 3,
    /// SError from the guest.
    GuestSError = 4,
    /// Anything taken at EL2 with SP_EL0 (EL2 always runs on SP_EL2).
    Unexpected = 5,
}

impl Vector {
    /// The vector number the assembly passes in x1.
    pub fn from_raw(raw: u64) -> Self {
        match raw {
            0 => Vector::El2Sync,
            1 => Vector::El2Async,
            2 => Vector::GuestSync,
            3 => Vector::GuestAsync,
            4 => Vector::GuestSError,
            _ => Vector::Unexpected,
        }
    }
}

global_asm!(
    r#"
    .macro VECTOR kind
    .balign 0x80
    sub     sp, sp, #{frame}
    stp     x0, x1, [sp]
    mov     x0, #\kind
    b       trap_save
    .endm

    .section .text.vectors, "ax"
    .balign 0x800
    .global el2_vectors
el2_vectors:
    VECTOR 5
    VECTOR 5
    VECTOR 5
    VECTOR 5
    VECTOR 0
    VECTOR 1
    VECTOR 1
    VECTOR 1
    // Lower EL, AArch64, synchronous: the hypercall's path first.
    .balign 0x80
    sub     sp, sp, #{frame}
    stp     x0, x1, [sp]
    stp     x2, x3, [sp, #16]
    mrs     x2, esr_el2
    // ESR_EL2 of HVC #0 from AArch64: EC 0x16, IL 1, ISS (the immediate) 0.
    movz    x3, #{esr_hvc0_high}, lsl #16
    cmp     x2, x3
    b.ne    guest_sync_save
    // A call whose answer is constant: its slot in the table (hypercall::constant), then one
    // compare of w0 with the slot's ID. Only x0-x3 are touched (x0-x3 are the answer; the
    // guest's x0-x3 are in the frame for a miss) and ELR/SPSR are left as they are: this is
    // register arithmetic and loads from the read-only table, which cannot fault, and taking
    // this exception masked interrupts, SError and debug, so nothing overwrites them before
    // the eret.
    eor     w1, w0, w0, ror #{hash_rotate}
    ubfx    w1, w1, #{hash_shift}, #{index_bits}
    adrp    x2, {table}
    add     x2, x2, :lo12:{table}
    add     x2, x2, x1, lsl #{slot_size_log2}
    ldr     w3, [x2]
    cmp     w3, w0
    b.ne    hvc_save
    ldp     x0, x1, [x2, #8]
    ldp     x2, x3, [x2, #24]
    add     sp, sp, #{frame}
    eret
guest_sync_save:
    ldp     x2, x3, [sp, #16]
    mov     x0, #2
    b       trap_save
    // The assembler stops here if the path above outgrows its 32-instruction slot.
    .org    el2_vectors + 0x480
    VECTOR 3
    VECTOR 3
    VECTOR 4
    VECTOR 2
    VECTOR 3
    VECTOR 3
    VECTOR 4

    // x0-x3 saved by the vector (their registers hold scratch now). x19-x29 stay in their
    // registers (callee-saved in Rust). ELR and SPSR are saved: the handlers may take an
    // exception at EL2 (a recoverable access to guest memory), whose entry overwrites them.
hvc_save:
    stp     x4, x5, [sp, #32]
    stp     x6, x7, [sp, #48]
    stp     x8, x9, [sp, #64]
    stp     x10, x11, [sp, #80]
    stp     x12, x13, [sp, #96]
    stp     x14, x15, [sp, #112]
    stp     x16, x17, [sp, #128]
    str     x18, [sp, #144]
    mrs     x2, elr_el2
    mrs     x3, spsr_el2
    stp     x30, x2, [sp, #240]
    str     x3, [sp, #256]
    mov     x0, sp
    bl      handle_hypercall
    ldr     x2, [sp, #256]
    ldp     x30, x3, [sp, #240]
    msr     spsr_el2, x2
    msr     elr_el2, x3
    ldp     x2, x3, [sp, #16]
    ldp     x4, x5, [sp, #32]
    ldp     x6, x7, [sp, #48]
    ldp     x8, x9, [sp, #64]
    ldp     x10, x11, [sp, #80]
    ldp     x12, x13, [sp, #96]
    ldp     x14, x15, [sp, #112]
    ldp     x16, x17, [sp, #128]
    ldr     x18, [sp, #144]
    ldp     x0, x1, [sp]
    add     sp, sp, #{frame}
    eret

trap_save:
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
    mrs     x2, elr_el2
    stp     x30, x2, [sp, #240]
    mrs     x2, spsr_el2
    str     x2, [sp, #256]
    mov     x1, x0
    mov     x0, sp
    bl      handle_trap
    // fall through

    .global trap_restore
trap_restore:
    ldr     x2, [sp, #256]
    msr     spsr_el2, x2
    ldp     x30, x2, [sp, #240]
    msr     elr_el2, x2
    ldp     x2, x3, [sp, #16]
    ldp     x4, x5, [sp, #32]
    ldp     x6, x7, [sp, #48]
    ldp     x8, x9, [sp, #64]
    ldp     x10, x11, [sp, #80]
    ldp     x12, x13, [sp, #96]
    ldp     x14, x15, [sp, #112]
    ldp     x16, x17, [sp, #128]
    ldp     x18, x19, [sp, #144]
    ldp     x20, x21, [sp, #160]
    ldp     x22, x23, [sp, #176]
    ldp     x24, x25, [sp, #192]
    ldp     x26, x27, [sp, #208]
    ldp     x28, x29, [sp, #224]
    ldp     x0, x1, [sp]
    add     sp, sp, #{frame}
    eret

    // x0: a TrapFrame to enter the guest with; x1: the top of this CPU's stack, which is reset
    // since nothing on it is needed any more. The frame is read into registers directly, so it
    // may live anywhere, the abandoned stack included.
    .global enter_guest_with
enter_guest_with:
    mov     sp, x1
    ldr     x2, [x0, #256]
    msr     spsr_el2, x2
    ldp     x30, x2, [x0, #240]
    msr     elr_el2, x2
    ldp     x2, x3, [x0, #16]
    ldp     x4, x5, [x0, #32]
    ldp     x6, x7, [x0, #48]
    ldp     x8, x9, [x0, #64]
    ldp     x10, x11, [x0, #80]
    ldp     x12, x13, [x0, #96]
    ldp     x14, x15, [x0, #112]
    ldp     x16, x17, [x0, #128]
    ldp     x18, x19, [x0, #144]
    ldp     x20, x21, [x0, #160]
    ldp     x22, x23, [x0, #176]
    ldp     x24, x25, [x0, #192]
    ldp     x26, x27, [x0, #208]
    ldp     x28, x29, [x0, #224]
    ldp     x0, x1, [x0]
    eret
"#,
    frame = const core::mem::size_of::<TrapFrame>(),
    esr_hvc0_high = const ESR_HVC0 >> 16,
    hash_rotate = const constant::HASH.rotate,
    hash_shift = const constant::HASH.shift,
    index_bits = const constant::INDEX_BITS,
    slot_size_log2 = const constant::SLOT_SIZE_LOG2,
    table = sym constant::TABLE,
);

/// ESR_EL2 of `HVC #0` from AArch64: EC 0x16 (bits 31:26), IL (bit 25), immediate 0.
const ESR_HVC0: u64 = (0x16 << 26) | (1 << 25);
const _: () = assert!(ESR_HVC0 & 0xffff == 0);

unsafe extern "C" {
    /// Base of the vector table, for VBAR_EL2.
    pub static el2_vectors: u8;
    fn enter_guest_with(frame: *const TrapFrame, stack_top: u64) -> !;
}

/// Enters the guest with `frame`, abandoning the current stack.
///
/// # Safety
/// EL2 must be fully set up for the guest (HCR_EL2, stage 2, VBAR_EL2), and `stack_top` must be
/// the top of this CPU's own stack.
pub unsafe fn enter_guest(frame: &TrapFrame, stack_top: u64) -> ! {
    // SAFETY: per the contract above; the frame is read into registers before anything is
    // written below the new stack pointer.
    unsafe { enter_guest_with(frame, stack_top) }
}

const _: () = assert!(core::mem::size_of::<TrapFrame>() == 272);
