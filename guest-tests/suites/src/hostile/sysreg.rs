//! Every system-register encoding (op0 2-3: 32,768 of them), read with MRS and written back
//! with MSR, from EL1 and from EL0. Each access gives a value or a synchronous exception the
//! architecture allows for a system-register access (UNDEF EC 0x0, trapped EC 0x18, or the
//! FP/SVE/SME trap classes); the hypervisor must never stop the VM for one. MSR writes back the
//! value MRS returned; where MRS failed (write-only registers: ICC_EOIR*, ICC_DIR, ICC_SGI*R,
//! OSLAR...) it writes 0, which for each of those is harmless to the guest.
//!
//! Deny list: none. Every register the guest may write, written with the value it just read,
//! leaves the guest as it was (SPSel, DAIF, NZCV, SP_EL0, ELR/SPSR_EL1, the translation
//! registers, TPIDR_EL1 all get their own value back). Reads with a side effect (ICC_IAR0/1,
//! ICC_NMIAR1 acknowledge an interrupt) see no interrupt pending in this guest.

use alloc::format;
use alloc::string::String;

use guest_rt::el0;
use guest_rt::println;
use guest_rt::probe::{self, Abort};

use super::stubs::{self, index_of, name, ENCODINGS};
use super::{alive, Failures};

/// Exception classes a system-register access may raise: unknown (UNDEF), FP/SIMD trap, MSR/MRS
/// trap, SVE trap, SME trap.
const ALLOWED_CLASSES: [u64; 5] = [0x00, 0x07, 0x18, 0x19, 0x1d];
/// Encodings between two REVISION checks.
const BATCH: usize = 256;

/// What one access did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Outcome {
    Value(u64),
    /// ESR, and the vector offset for EL0 (0 at EL1).
    Exception(u64, u64),
}

fn at_el1(address: usize, x0: u64) -> Outcome {
    // SAFETY: a generated `mrs`/`msr` stub ending in `ret`; a fault resumes at the caller.
    match unsafe { probe::call(address, x0, 0) } {
        Ok(value) => Outcome::Value(value),
        Err(Abort { esr, .. }) => Outcome::Exception(esr, 0),
    }
}

fn at_el0(offset: usize, x0: u64) -> Outcome {
    let exit = stubs::run_at_el0(offset, x0, 0);
    if exit.class() == el0::EC_SVC64 {
        Outcome::Value(exit.x0)
    } else {
        Outcome::Exception(exit.esr, exit.vector)
    }
}

/// Counts of a sweep.
#[derive(Default, Debug)]
struct Tally {
    read_values: u64,
    read_exceptions: u64,
    write_done: u64,
    write_exceptions: u64,
}

/// Reads then writes back encoding `index` with `access`, judging both outcomes.
fn read_write(
    index: usize,
    el: &str,
    access: &dyn Fn(usize, u64) -> Outcome,
    offsets: (usize, usize),
    tally: &mut Tally,
    failures: &mut Failures,
) {
    let judge = |outcome: Outcome, what: &str, failures: &mut Failures| -> bool {
        match outcome {
            Outcome::Value(_) => true,
            Outcome::Exception(esr, vector) => {
                let class = esr >> 26;
                if !ALLOWED_CLASSES.contains(&class) || (vector != 0 && vector != 0x400) {
                    failures.add(format!(
                        "{what} {} at {el}: ESR {esr:#x} (EC {class:#x}) vector {vector:#x}",
                        name(index)
                    ));
                }
                false
            }
        }
    };
    let read = access(offsets.0, 0);
    let value = match read {
        Outcome::Value(value) => value,
        Outcome::Exception(..) => 0,
    };
    if judge(read, "MRS", failures) {
        tally.read_values += 1;
    } else {
        tally.read_exceptions += 1;
    }
    if judge(access(offsets.1, value), "MSR", failures) {
        tally.write_done += 1;
    } else {
        tally.write_exceptions += 1;
    }
}

fn sweep(el: &str, access: &dyn Fn(usize, u64) -> Outcome) -> Result<(), String> {
    let mut tally = Tally::default();
    let mut failures = Failures::default();
    for index in 0..ENCODINGS {
        read_write(
            index,
            el,
            access,
            (
                stubs::mrs(index) - stubs::base(),
                stubs::msr(index) - stubs::base(),
            ),
            &mut tally,
            &mut failures,
        );
        if index % BATCH == BATCH - 1 {
            alive(&format!("encodings up to {} at {el}", name(index)))?;
        }
    }
    println!(
        "hostile: {} encodings swept at {} (MRS: {} values, {} exceptions; MSR: {} done, {} exceptions; 0 skipped)",
        ENCODINGS, el, tally.read_values, tally.read_exceptions, tally.write_done, tally.write_exceptions
    );
    failures.result("system-register access")
}

fn el1_access(offset: usize, x0: u64) -> Outcome {
    at_el1(stubs::base() + offset, x0)
}

pub(crate) fn sweep_from_el1() -> Result<(), String> {
    sweep("EL1", &el1_access)
}

pub(crate) fn sweep_from_el0() -> Result<(), String> {
    sweep("EL0", &at_el0)
}

/// One register, read and written back, from `el`; then the hypervisor must answer.
fn one(index: usize, el0: bool) -> Result<(), String> {
    let mut tally = Tally::default();
    let mut failures = Failures::default();
    let offsets = (
        stubs::mrs(index) - stubs::base(),
        stubs::msr(index) - stubs::base(),
    );
    if el0 {
        read_write(index, "EL0", &at_el0, offsets, &mut tally, &mut failures);
    } else {
        read_write(
            index,
            "EL1",
            &el1_access,
            offsets,
            &mut tally,
            &mut failures,
        );
    }
    println!(
        "hostile: {} from {}: MRS {}, MSR {}",
        name(index),
        if el0 { "EL0" } else { "EL1" },
        if tally.read_values == 1 {
            "value"
        } else {
            "exception"
        },
        if tally.write_done == 1 {
            "done"
        } else {
            "exception"
        }
    );
    failures.result("system-register access")?;
    alive(&name(index))
}

const TPIDR2_EL0: usize = index_of(3, 3, 13, 0, 5);
const SMPRI_EL1: usize = index_of(3, 0, 1, 2, 4);
const SCXTNUM_EL1: usize = index_of(3, 0, 13, 0, 7);
const SCXTNUM_EL0: usize = index_of(3, 3, 13, 0, 7);

pub(crate) fn tpidr2_el0_from_el1() -> Result<(), String> {
    one(TPIDR2_EL0, false)
}

pub(crate) fn tpidr2_el0_from_el0() -> Result<(), String> {
    one(TPIDR2_EL0, true)
}

pub(crate) fn smpri_el1_from_el1() -> Result<(), String> {
    one(SMPRI_EL1, false)
}

pub(crate) fn scxtnum_el1_from_el1() -> Result<(), String> {
    one(SCXTNUM_EL1, false)
}

pub(crate) fn scxtnum_el0_from_el1() -> Result<(), String> {
    one(SCXTNUM_EL0, false)
}

pub(crate) fn scxtnum_el0_from_el0() -> Result<(), String> {
    one(SCXTNUM_EL0, true)
}
