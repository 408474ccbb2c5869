//! Benchmark guest: path lengths of hypercalls beside the guest doing the same work natively.
//!
//! Run under `-icount shift=0,sleep=off` (scripts/bench), where the virtual counter advances by
//! one per instruction and every run is identical. Each figure is the counter delta over a loop
//! of a fixed number of iterations, minus the same loop with an empty body, divided by the
//! iterations: instructions per operation, round trip, the hypervisor's included. Output lines:
//! `BENCH <row> <guest-native> <hypercall>`, where a dash means "no native equivalent", and one
//! `BENCH-INFO line-size <bytes>` line that scripts/bench uses to derive per-line costs.
#![no_std]
#![no_main]

use guest_rt::println;
use guest_suites::hypercall;
use stagehand_abi::driver::{
    Addressing, Attribute, Batch, BatchEntry, Client, Hvc, Operation, Range,
};
use stagehand_abi::function;

guest_rt::main!(main);

/// The DMA rows (DMA_MAP + DMA_UNMAP with `edu`), run alone when the command line says
/// `stagehand.bench=dma`.
#[path = "bench/dma_rows.rs"]
mod dma_rows;

/// The lock rows (a one-page MEM_SET_ATTR while three vCPUs loop CACHE_OP), run alone when the
/// command line says `stagehand.bench=lock`.
#[path = "bench/lock_rows.rs"]
mod lock_rows;

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;

/// Where the rows work, as offsets from the start of guest RAM (the image lies in the first
/// 4 MiB): cache operations and batches here, attribute changes of up to 64 MiB after it.
const CACHE_AREA: u64 = 16 * MIB;
const ATTRIBUTE_AREA: u64 = 64 * MIB;

fn counter() -> u64 {
    let value: u64;
    // SAFETY: ISB then reading CNTVCT_EL0 has no side effects; the ISB keeps the read from
    // being taken early.
    unsafe { core::arch::asm!("isb", "mrs {}, cntvct_el0", out(reg) value, options(nostack)) };
    value
}

/// A buffer for AUDIT_READ (one record).
#[repr(C, align(8))]
struct RecordBuffer([u8; 128]);
static mut AUDIT_BUFFER: RecordBuffer = RecordBuffer([0; 128]);

/// Lets the hypervisor stream the audit records written so far (AUDIT_READ drains the log
/// first; reading past the newest record copies nothing). A real guest's idle time does the
/// same: measuring after it keeps the deferred hashing and streaming out of the call path
/// figures, which [`drain_cost`] measures apart.
fn drain_audit() {
    let buffer = core::ptr::addr_of!(AUDIT_BUFFER) as u64;
    core::hint::black_box(hypercall(function::AUDIT_READ, &[buffer, 128, u64::MAX]));
}

/// Instructions the hypervisor spends per audit record off the call path: `records` CACHE_OP
/// calls of one line each (one record each), then one drain, less the drain of nothing.
fn drain_cost(base: u64, records: u64) -> u64 {
    let empty = {
        drain_audit();
        let start = counter();
        drain_audit();
        counter() - start
    };
    for _ in 0..records {
        core::hint::black_box(hypercall(function::CACHE_OP, &[base, 64, 1]));
    }
    let start = counter();
    drain_audit();
    (counter() - start).saturating_sub(empty) / records
}

/// Instructions per iteration of `body` over `iterations` iterations, less the loop's own cost.
fn per_iteration(iterations: u64, mut body: impl FnMut()) -> u64 {
    drain_audit();
    let baseline = {
        let start = counter();
        for _ in 0..iterations {
            core::hint::black_box(());
        }
        counter() - start
    };
    let start = counter();
    for _ in 0..iterations {
        body();
    }
    let total = counter() - start;
    total.saturating_sub(baseline) / iterations
}

#[inline(never)]
fn empty_function() {
    core::hint::black_box(());
}

/// The guest's own maintenance loop over `[start, start + len)`, one `DC <op>` per line, then
/// a DSB, as a driver writes it.
macro_rules! dc_loop {
    ($op:literal, $start:expr, $len:expr, $line:expr) => {{
        let start: u64 = $start & !($line - 1);
        let end: u64 = $start + $len;
        // SAFETY: data-cache maintenance by VA on guest RAM this guest maps (identity) loses
        // no data for clean and clean+invalidate; the loop only reads its registers.
        unsafe {
            core::arch::asm!(
                "0:",
                concat!("dc ", $op, ", {address}"),
                "add {address}, {address}, {line}",
                "cmp {address}, {end}",
                "b.lo 0b",
                "dsb ish",
                address = inout(reg) start => _,
                line = in(reg) $line,
                end = in(reg) end,
                options(nostack),
            )
        }
    }};
}

fn iterations_for(bytes: u64) -> u64 {
    match bytes {
        0..=4096 => 500,
        4097..=65536 => 100,
        65537..=1048576 => 10,
        _ => 2,
    }
}

fn row(name: &str, native: Option<u64>, hypercall: u64) {
    match native {
        Some(native) => println!("BENCH {name} {native} {hypercall}"),
        None => println!("BENCH {name} - {hypercall}"),
    }
}

fn size_name(bytes: u64) -> alloc::string::String {
    if bytes >= MIB {
        alloc::format!("{}m", bytes / MIB)
    } else if bytes >= KIB {
        alloc::format!("{}k", bytes / KIB)
    } else {
        alloc::format!("{bytes}")
    }
}

extern crate alloc;

fn main() -> ! {
    if dma_rows::requested() {
        dma_rows::run();
        guest_rt::psci::system_off()
    }
    if lock_rows::requested() {
        lock_rows::run();
        guest_rt::psci::system_off()
    }
    let base = guest_rt::dt::main_ram().base as u64;
    let line = guest_rt::arch::dcache_line_size() as u64;
    let mut hypervisor = Client::new(Hvc);
    println!("BENCH-INFO line-size {line}");

    let native = per_iteration(1000, || core::hint::black_box(empty_function)());
    let null = per_iteration(1000, || {
        core::hint::black_box(hypercall(function::REVISION, &[]));
    });
    row("null-hypercall", Some(native), null);
    // The call the KVM figures of issue 10 were measured with.
    let psci_version = per_iteration(1000, || {
        core::hint::black_box(hypercall(guest_rt::psci::PSCI_VERSION, &[]));
    });
    row("null-psci-version", Some(native), psci_version);
    // Every call of the hypervisor's constant table must be answered in its vector (about 30
    // instructions): a slot the vector's hash misses would still answer right, through the
    // full path, at three times the cost (90 or more), which only a count shows. The bound is
    // issue 10's for the null call.
    for id in [
        function::REVISION,
        function::CALL_UID,
        guest_rt::psci::SMCCC_VERSION,
        guest_rt::psci::PSCI_VERSION,
        0x8400_0001, // CPU_SUSPEND (32)
        0xC400_0001, // CPU_SUSPEND (64)
        0x8400_0006, // MIGRATE_INFO_TYPE
    ] {
        let cost = per_iteration(100, || {
            core::hint::black_box(hypercall(id, &[]));
        });
        if cost > 60 {
            println!("BENCH-ERROR constant call {id:#x} costs {cost}, not answered in the vector");
        }
    }
    row(
        "audit-drain-per-record",
        None,
        drain_cost(base + CACHE_AREA, 1000),
    );

    // MEM_SET_ATTR, write-back to non-cacheable and back, the library's loops included.
    for size in [4 * KIB, 64 * KIB, 2 * MIB, 64 * MIB] {
        let range = Range::new(base + ATTRIBUTE_AREA, size);
        let mut failed = false;
        let cost = per_iteration(iterations_for(size).min(100), || {
            failed |= hypervisor
                .set_attribute(range, Attribute::NonCacheable)
                .is_err();
            failed |= hypervisor
                .set_attribute(range, Attribute::WriteBack)
                .is_err();
        });
        if failed {
            println!("BENCH-ERROR set-attr-{} failed", size_name(size));
        }
        row(&alloc::format!("set-attr-{}", size_name(size)), None, cost);
    }

    // CACHE_OP by IPA beside the guest's own DC loop over the same range.
    for (name, operation) in [
        ("clean", Operation::Clean),
        ("invalidate", Operation::Invalidate),
    ] {
        for size in [64, 4 * KIB, 64 * KIB, MIB, 16 * MIB] {
            let start = base + CACHE_AREA;
            let iterations = iterations_for(size);
            let native = match operation {
                Operation::Clean => {
                    per_iteration(iterations, || dc_loop!("cvac", start, size, line))
                }
                // EL1's DC IVAC is performed as clean+invalidate under stage 2: the guest's
                // honest equivalent is DC CIVAC.
                _ => per_iteration(iterations, || dc_loop!("civac", start, size, line)),
            };
            let mut failed = false;
            let call = per_iteration(iterations, || {
                failed |= hypervisor
                    .cache_operation(Range::new(start, size), operation, Addressing::Ipa)
                    .is_err();
            });
            if failed {
                println!("BENCH-ERROR {name}-{} failed", size_name(size));
            }
            row(
                &alloc::format!("{name}-{}", size_name(size)),
                Some(native),
                call,
            );
        }
    }
    // A true invalidate by guest VA (the hypervisor translates each page).
    {
        let start = base + CACHE_AREA;
        let native = per_iteration(10, || dc_loop!("civac", start, MIB, line));
        let mut failed = false;
        let call = per_iteration(10, || {
            failed |= hypervisor
                .invalidate(Range::new(start, MIB), Addressing::Va)
                .is_err();
        });
        if failed {
            println!("BENCH-ERROR invalidate-va-1m failed");
        }
        row("invalidate-va-1m", Some(native), call);
    }

    // 64 scattered 4 KiB buffers: one CACHE_OP_BATCH, and 64 single CACHE_OP calls, each beside
    // the guest's own loop over the same buffers.
    let buffer = |i: u64| base + CACHE_AREA + i * 64 * KIB;
    let native = per_iteration(50, || {
        for i in 0..64 {
            dc_loop!("civac", buffer(i), 4 * KIB, line);
        }
    });
    let mut storage = [BatchEntry::default(); 64];
    let storage_ipa = storage.as_ptr() as u64; // The image is identity-mapped: VA = IPA.
    let batch = Batch::new(&mut storage, storage_ipa).map(|mut batch| {
        for i in 0..64 {
            let _ = batch.push(
                Range::new(buffer(i), 4 * KIB),
                Operation::CleanInvalidate,
                Addressing::Ipa,
            );
        }
        batch
    });
    let mut failed = batch.is_err();
    let batched = match &batch {
        Ok(batch) => per_iteration(50, || failed |= hypervisor.submit(batch).is_err()),
        Err(_) => 0,
    };
    let singles = per_iteration(50, || {
        for i in 0..64 {
            failed |= hypervisor
                .clean_invalidate(Range::new(buffer(i), 4 * KIB), Addressing::Ipa)
                .is_err();
        }
    });
    if failed {
        println!("BENCH-ERROR batch rows failed");
    }
    row("batch-64x4k", Some(native), batched);
    row("single-64x4k", Some(native), singles);
    guest_rt::psci::system_off()
}
