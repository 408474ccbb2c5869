//! The in-guest test framework and its output protocol, which the runner parses exactly:
//!
//! ```text
//! TEST <suite>/<name>: PASS
//! TEST <suite>/<name>: FAIL <reason>
//! RESULT <suite>: <p> passed, <f> failed
//! ```
//!
//! followed by PSCI SYSTEM_OFF. An unexpected exception or a panic fails the running test with
//! a report, prints the RESULT line and powers off.

use alloc::string::String;
use core::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use spin::Mutex;

use crate::println;

/// One test: a name and a function that returns `Err(reason)` on failure.
#[derive(Clone, Copy)]
pub struct Test {
    /// The test's name within its suite.
    pub name: &'static str,
    /// The test itself.
    pub run: fn() -> Result<(), String>,
}

/// The suite being run and the test in progress, for reports from exception handlers.
struct Progress {
    suite: &'static str,
    current: Option<&'static str>,
}

static PROGRESS: Mutex<Progress> = Mutex::new(Progress {
    suite: "guest",
    current: None,
});
static PASSED: AtomicUsize = AtomicUsize::new(0);
static FAILED: AtomicUsize = AtomicUsize::new(0);
static ABORTING: AtomicBool = AtomicBool::new(false);

/// Runs every test of `suite` in order, prints a line for each and the RESULT line, then powers
/// the machine off with PSCI SYSTEM_OFF.
pub fn run_suite(suite: &'static str, tests: &[Test]) -> ! {
    PROGRESS.lock().suite = suite;
    for test in tests {
        PROGRESS.lock().current = Some(test.name);
        let outcome = (test.run)();
        PROGRESS.lock().current = None;
        report(suite, test.name, outcome);
    }
    finish()
}

/// Prints the line for one test's outcome and counts it.
pub fn report(suite: &str, name: &str, outcome: Result<(), String>) {
    match outcome {
        Ok(()) => {
            PASSED.fetch_add(1, Ordering::SeqCst);
            println!("TEST {}/{}: PASS", suite, name);
        }
        Err(reason) => {
            FAILED.fetch_add(1, Ordering::SeqCst);
            println!("TEST {}/{}: FAIL {}", suite, name, one_line(&reason));
        }
    }
}

/// Prints the RESULT line with the counts so far and powers off.
pub fn finish() -> ! {
    let suite = PROGRESS.lock().suite;
    println!(
        "RESULT {}: {} passed, {} failed",
        suite,
        PASSED.load(Ordering::SeqCst),
        FAILED.load(Ordering::SeqCst)
    );
    crate::psci::system_off()
}

/// Fails the suite from anywhere (exception handler, panic, secondary CPU): the running test
/// (or a pseudo-test named `runtime` outside tests) fails with `reason`, then RESULT and power
/// off. Only the first CPU to get here reports; any other stops.
pub fn abort_suite(reason: &str) -> ! {
    if ABORTING.swap(true, Ordering::SeqCst) {
        loop {
            crate::arch::wfi();
        }
    }
    // The lock may be held by the code that faulted on this CPU: do not wait for it forever.
    let (suite, current) = match PROGRESS.try_lock() {
        Some(progress) => (progress.suite, progress.current),
        None => ("guest", None),
    };
    report(
        suite,
        current.unwrap_or("runtime"),
        Err(String::from(reason)),
    );
    finish()
}

fn one_line(text: &str) -> String {
    text.replace(['\n', '\r'], " | ")
}

/// Builds a `[Test; N]` from test function names: `tests![first, second]`.
#[macro_export]
macro_rules! tests {
    ($($test:ident),* $(,)?) => {
        [$($crate::test::Test { name: stringify!($test), run: $test }),*]
    };
}

/// Fails the test with a formatted reason unless `cond` holds:
/// `check!(x > 0, "x was {}", x)`.
#[macro_export]
macro_rules! check {
    ($cond:expr $(,)?) => {
        if !$cond {
            return Err($crate::__private::format!("check failed: {}", stringify!($cond)));
        }
    };
    ($cond:expr, $($arg:tt)+) => {
        if !$cond {
            return Err($crate::__private::format!($($arg)+));
        }
    };
}

/// Fails the test unless `left == right`, showing both (with `Debug`):
/// `check_eq!(version, 0x10001, "SMCCC_VERSION")`.
#[macro_export]
macro_rules! check_eq {
    ($left:expr, $right:expr $(,)?) => {
        $crate::check_eq!($left, $right, "{} == {}", stringify!($left), stringify!($right))
    };
    ($left:expr, $right:expr, $($arg:tt)+) => {
        match (&$left, &$right) {
            (left, right) => {
                if !(*left == *right) {
                    return Err($crate::__private::format!(
                        "{}: got {:?}, expected {:?}",
                        $crate::__private::format!($($arg)+), left, right
                    ));
                }
            }
        }
    };
}
