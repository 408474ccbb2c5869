//! The lock rows of the benchmark guest: how long a one-page MEM_SET_ATTR waits while three
//! other vCPUs loop CACHE_OP CLEAN over 2 MiB (the cache operations share the hypervisor's
//! attribute lock, the attribute change holds it alone). scripts/bench boots the guest with
//! `-smp 4` and `stagehand.bench=lock`, without `-icount`: the figures are wall-clock time on
//! the host running QEMU, so they vary from run to run.
//!
//! Output: `BENCH-LOCK <uncontended|contended> <calls> <mean ticks> <max ticks> <mean ns>
//! <max ns> <frequency Hz> <mean sections> <max sections>`, the calls being one-page
//! MEM_SET_ATTR WB to NC and NC to WB, each timed alone with the virtual counter, and the
//! sections the CACHE_OP calls (one hypercall each: 2 MiB is one call's work budget) the
//! other vCPUs finished while it ran. The time depends on the host's load; the sections count
//! what fairness bounds. A failed call prints a `BENCH-ERROR` line.

use core::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};

use guest_rt::cpu::{self, CpuState};
use guest_rt::println;
use stagehand_abi::driver::{Addressing, Attribute, Client, Hvc, Operation, Range};

use super::{counter, ATTRIBUTE_AREA, CACHE_AREA, KIB, MIB};

/// Attribute changes timed per row: WB to NC and back, this many times each.
const ROUNDS: usize = 20;
/// vCPUs that loop cache operations.
const READERS: usize = 3;

static STOP: AtomicBool = AtomicBool::new(false);
static LOOPING: AtomicUsize = AtomicUsize::new(0);
static CALLS: AtomicU64 = AtomicU64::new(0);
static FAILED: AtomicBool = AtomicBool::new(false);
static RAM_BASE: AtomicU64 = AtomicU64::new(0);

/// Whether the command line asks for the lock rows only (`stagehand.bench=lock`).
pub fn requested() -> bool {
    let tree = guest_rt::dt::tree();
    let bootargs = tree.chosen().bootargs().unwrap_or("");
    bootargs
        .split_whitespace()
        .any(|arg| arg == "stagehand.bench=lock")
}

fn frequency() -> u64 {
    let value: u64;
    // SAFETY: reading CNTFRQ_EL0 has no side effects.
    unsafe { core::arch::asm!("mrs {}, cntfrq_el0", out(reg) value, options(nostack)) };
    value
}

/// A secondary vCPU: CACHE_OP CLEAN over 2 MiB, the library's loop over INCOMPLETE included,
/// until told to stop.
fn clean_loop(_index: usize) {
    let mut hypervisor = Client::new(Hvc);
    let range = Range::new(RAM_BASE.load(Ordering::SeqCst) + CACHE_AREA, 2 * MIB);
    LOOPING.fetch_add(1, Ordering::SeqCst);
    while !STOP.load(Ordering::Relaxed) {
        if hypervisor
            .cache_operation(range, Operation::Clean, Addressing::Ipa)
            .is_err()
        {
            FAILED.store(true, Ordering::SeqCst);
        }
        CALLS.fetch_add(1, Ordering::Relaxed);
    }
}

/// Times `ROUNDS` one-page changes each way; prints one row.
fn time_changes(hypervisor: &mut Client<Hvc>, page: Range, name: &str, hz: u64) {
    let mut total = 0u64;
    let mut worst = 0u64;
    let mut calls = 0u64;
    let mut sections = 0u64;
    let mut most_sections = 0u64;
    for _ in 0..ROUNDS {
        for attribute in [Attribute::NonCacheable, Attribute::WriteBack] {
            let before = CALLS.load(Ordering::SeqCst);
            let start = counter();
            let result = hypervisor.set_attribute(page, attribute);
            let ticks = counter() - start;
            let during = CALLS.load(Ordering::SeqCst) - before;
            sections += during;
            most_sections = most_sections.max(during);
            if result.is_err() {
                println!("BENCH-ERROR lock {name}: MEM_SET_ATTR failed");
            }
            total += ticks;
            worst = worst.max(ticks);
            calls += 1;
        }
    }
    let mean = total / calls;
    let ns = |ticks: u64| (ticks as u128 * 1_000_000_000 / hz.max(1) as u128) as u64;
    println!(
        "BENCH-LOCK {name} {calls} {mean} {worst} {} {} {hz} {}.{:02} {most_sections}",
        ns(mean),
        ns(worst),
        sections / calls,
        sections * 100 / calls % 100
    );
}

/// Runs the lock rows.
pub fn run() {
    let base = guest_rt::dt::main_ram().base as u64;
    RAM_BASE.store(base, Ordering::SeqCst);
    let hz = frequency();
    let mut hypervisor = Client::new(Hvc);
    let page = Range::new(base + ATTRIBUTE_AREA, 4 * KIB);
    time_changes(&mut hypervisor, page, "uncontended", hz);
    if cpu::count() < READERS + 1 {
        println!(
            "BENCH-ERROR lock: needs {} vCPUs, has {}",
            READERS + 1,
            cpu::count()
        );
        return;
    }
    for index in 1..=READERS {
        if cpu::start(index, clean_loop).is_err() {
            println!("BENCH-ERROR lock: CPU_ON {index} failed");
            return;
        }
    }
    // Every reader looping, and each has been round a few times.
    while LOOPING.load(Ordering::SeqCst) < READERS || CALLS.load(Ordering::SeqCst) < 30 {
        core::hint::spin_loop();
    }
    time_changes(&mut hypervisor, page, "contended", hz);
    STOP.store(true, Ordering::SeqCst);
    for index in 1..=READERS {
        cpu::wait_for_state(index, CpuState::Finished, 100_000_000);
    }
    if FAILED.load(Ordering::SeqCst) {
        println!("BENCH-ERROR lock: a CACHE_OP failed");
    }
    println!("BENCH-INFO lock-cache-ops {}", CALLS.load(Ordering::SeqCst));
}
