//! Probes: memory accesses and instruction fetches that are expected to fault. While a probe is
//! armed on a CPU, a synchronous exception at EL1 on that CPU is recorded instead of failing the
//! suite, and execution resumes after the probing instruction:
//!
//! ```ignore
//! let result = probe::read_u32(0x0902_0000); // Err(Abort { esr, far }) if it faulted
//! ```

use core::arch::asm;
use core::fmt;
use core::sync::atomic::{AtomicU64, AtomicU8, Ordering};

use crate::arch::cpu_index;
use crate::boot::MAX_CPUS;
use crate::exceptions::ExceptionFrame;

/// The exception a probe caught.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Abort {
    /// ESR_EL1 at the exception.
    pub esr: u64,
    /// FAR_EL1 at the exception.
    pub far: u64,
}

/// ESR exception class of a data abort taken without a change of EL.
pub const EC_DATA_ABORT: u64 = 0x25;
/// ESR exception class of an instruction abort taken without a change of EL.
pub const EC_INSTRUCTION_ABORT: u64 = 0x21;
/// Data/instruction fault status code: synchronous external abort, not on a table walk.
pub const FSC_SYNC_EXTERNAL: u64 = 0b01_0000;

impl Abort {
    /// The exception class (ESR bits 31:26).
    pub fn class(&self) -> u64 {
        self.esr >> 26
    }

    /// The fault status code (ESR bits 5:0) of an abort.
    pub fn fault_status(&self) -> u64 {
        self.esr & 0x3f
    }

    /// Whether this is a synchronous external abort on a data access.
    pub fn is_external_data_abort(&self) -> bool {
        self.class() == EC_DATA_ABORT && self.fault_status() == FSC_SYNC_EXTERNAL
    }

    /// Whether this is a synchronous external abort on an instruction fetch.
    pub fn is_external_instruction_abort(&self) -> bool {
        self.class() == EC_INSTRUCTION_ABORT && self.fault_status() == FSC_SYNC_EXTERNAL
    }
}

impl fmt::Debug for Abort {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "Abort {{ ESR {:#x} (EC {:#x} {}, FSC {:#04x}), FAR {:#x} }}",
            self.esr,
            self.class(),
            crate::exceptions::exception_class_name(self.class()),
            self.fault_status(),
            self.far
        )
    }
}

/// What the exception handler does with an armed probe's fault.
#[repr(u8)]
#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    /// Not armed: a fault is unexpected.
    Disarmed = 0,
    /// Resume at the instruction after the faulting one (data accesses).
    SkipInstruction = 1,
    /// Resume at the link register (a `blr` to a target that cannot be fetched).
    ReturnToLink = 2,
}

/// One CPU's probe state.
struct Slot {
    mode: AtomicU8,
    fired: AtomicU8,
    esr: AtomicU64,
    far: AtomicU64,
}

static SLOTS: [Slot; MAX_CPUS] = [const {
    Slot {
        mode: AtomicU8::new(0),
        fired: AtomicU8::new(0),
        esr: AtomicU64::new(0),
        far: AtomicU64::new(0),
    }
}; MAX_CPUS];

fn slot() -> &'static Slot {
    &SLOTS[cpu_index()]
}

/// Called by the exception handler for a synchronous exception at EL1. Returns true if an
/// armed probe took it (and the frame was adjusted to resume).
pub(crate) fn take(frame: &mut ExceptionFrame, esr: u64, far: u64) -> bool {
    let slot = slot();
    let mode = slot.mode.load(Ordering::SeqCst);
    if mode == Mode::Disarmed as u8 || slot.fired.load(Ordering::SeqCst) != 0 {
        return false;
    }
    slot.esr.store(esr, Ordering::SeqCst);
    slot.far.store(far, Ordering::SeqCst);
    slot.fired.store(1, Ordering::SeqCst);
    if mode == Mode::SkipInstruction as u8 {
        frame.elr += 4;
    } else {
        frame.elr = frame.x[30];
    }
    true
}

/// Runs `access` with a probe armed in `mode`; returns what it produced, or the abort.
fn with_probe<T>(mode: Mode, access: impl FnOnce() -> T) -> Result<T, Abort> {
    let slot = slot();
    slot.fired.store(0, Ordering::SeqCst);
    slot.mode.store(mode as u8, Ordering::SeqCst);
    let value = access();
    slot.mode.store(Mode::Disarmed as u8, Ordering::SeqCst);
    if slot.fired.swap(0, Ordering::SeqCst) != 0 {
        Err(Abort {
            esr: slot.esr.load(Ordering::SeqCst),
            far: slot.far.load(Ordering::SeqCst),
        })
    } else {
        Ok(value)
    }
}

macro_rules! probe_access {
    ($read:ident, $write:ident, $ty:ty, $ldr:literal, $str:literal, $modifier:literal) => {
        /// Reads from `addr` (a mapped VA) with one load instruction; a fault is returned
        /// as an [`Abort`].
        ///
        /// # Errors
        /// The abort the load raised.
        pub fn $read(addr: usize) -> Result<$ty, Abort> {
            with_probe(Mode::SkipInstruction, || {
                let value: u64;
                // SAFETY: a single load from a caller-chosen address; a fault is caught by the
                // armed probe, which skips the load. No Rust-visible memory is changed.
                unsafe {
                    asm!(concat!($ldr, " {v", $modifier, "}, [{a}]"), a = in(reg) addr,
                        v = out(reg) value, options(nostack));
                }
                value as $ty
            })
        }

        /// Writes `value` to `addr` (a mapped VA) with one store instruction; a fault is
        /// returned as an [`Abort`].
        ///
        /// # Errors
        /// The abort the store raised.
        pub fn $write(addr: usize, value: $ty) -> Result<(), Abort> {
            with_probe(Mode::SkipInstruction, || {
                // SAFETY: a single store to a caller-chosen address that the caller owns or
                // expects to fault (test memory or a foreign IPA); a fault is caught by the
                // armed probe, which skips the store.
                unsafe {
                    asm!(concat!($str, " {v", $modifier, "}, [{a}]"), a = in(reg) addr,
                        v = in(reg) value as u64, options(nostack));
                }
            })
        }
    };
}

probe_access!(read_u8, write_u8, u8, "ldrb", "strb", ":w");
probe_access!(read_u16, write_u16, u16, "ldrh", "strh", ":w");
probe_access!(read_u32, write_u32, u32, "ldr", "str", ":w");
probe_access!(read_u64, write_u64, u64, "ldr", "str", ":x");

/// Branches with link to `addr`; an instruction abort there is returned as an [`Abort`] and
/// execution resumes after the branch.
///
/// # Errors
/// The abort the fetch raised.
///
/// # Safety
/// If `addr` holds executable code, it runs: the caller must only pass addresses that fault.
pub unsafe fn execute(addr: usize) -> Result<(), Abort> {
    with_probe(Mode::ReturnToLink, || {
        // SAFETY: the caller guarantees the target faults; the probe then resumes at the link
        // register. All caller-saved registers are declared clobbered.
        unsafe { asm!("blr {a}", a = in(reg) addr, clobber_abi("C")) }
    })
}

/// Calls the code at `addr` with x0 = `arg`, x1 = `arg1` and returns its x0; a synchronous exception in it
/// (an UNDEF, a trapped system register, an abort) is returned as an [`Abort`] and execution
/// resumes at the link register: the code must not have changed x30 or SP when it faults.
/// Made for one-instruction stubs such as `mrs x0, <reg>; ret`.
///
/// # Errors
/// The exception the code raised.
///
/// # Safety
/// The code at `addr` runs at EL1 with the C calling convention: the caller vouches for it.
pub unsafe fn call(addr: usize, arg: u64, arg1: u64) -> Result<u64, Abort> {
    with_probe(Mode::ReturnToLink, || {
        let value: u64;
        // SAFETY: the caller vouches for the code; a fault resumes at the link register;
        // all caller-saved registers are declared clobbered.
        unsafe {
            asm!("blr {a}", a = in(reg) addr, inout("x0") arg => value, inout("x1") arg1 => _,
                clobber_abi("C"));
        }
        value
    })
}
