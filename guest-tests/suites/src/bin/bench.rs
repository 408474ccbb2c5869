//! Benchmark guest: path lengths of hypercalls beside the guest doing the same work natively.
//!
//! Run under `-icount shift=0,sleep=off` (scripts/bench), where the virtual counter advances by
//! one per instruction and every run is identical. Each figure is the counter delta over a loop
//! of `ITERATIONS`, minus the same loop with an empty body, divided by `ITERATIONS`: instructions
//! per operation, round trip. Output lines: `BENCH <row> <guest-native> <hypercall>`, where a
//! dash means "no native equivalent".
#![no_std]
#![no_main]

use guest_rt::println;
use guest_suites::hypercall;
use stagehand_abi::function;

guest_rt::main!(main);

const ITERATIONS: u64 = 1000;

fn counter() -> u64 {
    let value: u64;
    // SAFETY: ISB then reading CNTVCT_EL0 has no side effects; the ISB keeps the read from
    // being taken early.
    unsafe { core::arch::asm!("isb", "mrs {}, cntvct_el0", out(reg) value, options(nostack)) };
    value
}

/// Instructions per iteration of `body`, less the loop's own cost.
fn per_iteration(body: impl Fn()) -> u64 {
    let baseline = {
        let start = counter();
        for _ in 0..ITERATIONS {
            core::hint::black_box(());
        }
        counter() - start
    };
    let start = counter();
    for _ in 0..ITERATIONS {
        body();
    }
    let total = counter() - start;
    total.saturating_sub(baseline) / ITERATIONS
}

#[inline(never)]
fn empty_function() {
    core::hint::black_box(());
}

fn main() -> ! {
    let native = per_iteration(|| core::hint::black_box(empty_function)());
    let null = per_iteration(|| {
        core::hint::black_box(hypercall(function::REVISION, &[]));
    });
    println!("BENCH null-hypercall {native} {null}");
    guest_rt::psci::system_off()
}
