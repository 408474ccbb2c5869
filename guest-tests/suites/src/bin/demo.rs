//! Suite `demo`: the guest `scripts/run` boots. It walks through the stagehand ABI in plain
//! words (who is the hypervisor, which ABI, what it offers), wakes the other CPUs, and then
//! reports TEST/RESULT lines like every other suite.
#![no_std]
#![no_main]

extern crate alloc;

use alloc::string::String;
use alloc::vec::Vec;
use core::sync::atomic::{AtomicUsize, Ordering};

use guest_rt::psci::{self, Conduit};
use guest_rt::{check, check_eq, cpu, println};
use stagehand_abi::{feature, function, Status};

guest_rt::main!(main);

fn main() -> ! {
    println!("");
    println!("Hello from the stagehand demo guest, running at EL1.");
    println!("");
    tour();
    println!("");
    println!("Now the same facts, checked:");
    guest_rt::test::run_suite(
        "demo",
        &guest_rt::tests![
            hypervisor_identifies_itself,
            abi_is_1_0,
            features_make_sense,
            every_cpu_says_hello,
            buffer_goes_non_cacheable_and_back
        ],
    )
}

/// Formats the 16 UUID bytes carried in w0-w3 (little-endian words) the usual way.
fn uuid_string(words: [u32; 4]) -> String {
    let bytes: Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).collect();
    let hex: Vec<String> = bytes.iter().map(|b| alloc::format!("{b:02x}")).collect();
    alloc::format!(
        "{}-{}-{}-{}-{}",
        hex[0..4].concat(),
        hex[4..6].concat(),
        hex[6..8].concat(),
        hex[8..10].concat(),
        hex[10..16].concat()
    )
}

fn tour() {
    let uid = guest_suites::hypercall(function::CALL_UID, &[]);
    let words = [uid.x0 as u32, uid.x1 as u32, uid.x2 as u32, uid.x3 as u32];
    println!(
        "1. Who is there?  CALL_UID ({:#x}) answers {}",
        function::CALL_UID,
        uuid_string(words)
    );
    if words == stagehand_abi::uuid_words() {
        println!("   That is stagehand's UUID: the hypervisor is stagehand.");
    } else {
        println!(
            "   That is not stagehand's UUID ({}).",
            uuid_string(stagehand_abi::uuid_words())
        );
    }

    let revision = guest_suites::hypercall(function::REVISION, &[]);
    println!(
        "2. Which ABI?     REVISION ({:#x}) answers {}.{}",
        function::REVISION,
        revision.x0 as i64,
        revision.x1
    );

    let features = guest_suites::hypercall(function::FEATURES, &[]);
    match features.status() {
        Some(Status::Success) => {
            let names = [
                (feature::FWB, "stage 2 uses FWB"),
                (feature::SMMU, "an SMMUv3 guards DMA"),
                (feature::DMA_STRICT, "strict DMA mode"),
                (feature::VA_ADDRESSING, "cache operations by guest VA"),
            ];
            let have: Vec<&str> = names
                .iter()
                .filter(|(bit, _)| features.x1 & bit != 0)
                .map(|(_, n)| *n)
                .collect();
            println!(
                "3. What is there? FEATURES ({:#x}): {}",
                function::FEATURES,
                if have.is_empty() {
                    String::from("no optional features")
                } else {
                    have.join(", ")
                }
            );
            println!(
                "                  D-cache line {} bytes; up to {} bytes of work per call",
                features.x2, features.x3
            );
        }
        other => println!(
            "3. What is there? FEATURES ({:#x}) answered {:?}",
            function::FEATURES,
            other
        ),
    }

    let version = Conduit::Hvc.call_status(psci::PSCI_VERSION, &[]);
    println!(
        "4. Power control: PSCI {}.{} over HVC",
        version >> 16,
        version & 0xffff
    );
    let others = cpu::count().saturating_sub(1);
    println!(
        "5. Waking the other {} CPU(s) with PSCI CPU_ON, one after the other:",
        others
    );
    for index in 1..=others {
        match cpu::start(index, greet) {
            Ok(()) => {
                if !cpu::wait_for_state(index, cpu::CpuState::Finished, POLLS) {
                    println!("   CPU {} did not answer.", index);
                }
            }
            Err(status) => println!("   CPU_ON of CPU {} answered {}.", index, status),
        }
    }
    buffer_walk(false);
    audit_tail();
}

/// A driver's DMA buffer: 64 KiB, page-aligned, in guest RAM (VA = IPA in this runtime).
#[repr(C, align(4096))]
struct DmaBuffer([u8; 0x10000]);

static BUFFER: spin::Mutex<DmaBuffer> = spin::Mutex::new(DmaBuffer([0; 0x10000]));

/// Room for the last few audit records (128 bytes each).
#[repr(C, align(8))]
struct AuditBuffer([u8; 8 * stagehand_abi::audit::RECORD_SIZE]);

static AUDIT: spin::Mutex<AuditBuffer> =
    spin::Mutex::new(AuditBuffer([0; 8 * stagehand_abi::audit::RECORD_SIZE]));

/// MEM_QUERY_VA's effective attribute for `va` (MAIR encoding).
fn effective_attribute(va: u64) -> u64 {
    guest_suites::hypercall(function::MEM_QUERY_VA, &[va, 0]).x2
}

/// What the DMA-buffer walk saw: effective attributes before, during and after, and the
/// invalidate's bytes done.
struct BufferWalk {
    before: u64,
    during: u64,
    after: u64,
    invalidated: u64,
    set_status: (i64, i64),
}

fn buffer_walk(quiet: bool) -> BufferWalk {
    use stagehand_abi::{attr, cache_op};
    let buffer = BUFFER.lock();
    let ipa = buffer.0.as_ptr() as u64;
    let size = buffer.0.len() as u64;
    let before = effective_attribute(ipa);
    let to_nc = guest_suites::hypercall(function::MEM_SET_ATTR, &[ipa, size, attr::NORMAL_NC]);
    let during = effective_attribute(ipa);
    // A second mapping of the same buffer at another VA, as a driver's vmap would make, and a
    // true invalidate through it (at EL1 a DC IVAC would be a clean+invalidate).
    let alias = guest_rt::mmu::map_alias(
        ipa as usize,
        size as usize,
        guest_rt::mmu::MemoryType::NormalWriteBack,
    )
    .map(|va| va as u64)
    .unwrap_or(ipa);
    let invalidate = guest_suites::hypercall(
        function::CACHE_OP,
        &[alias, size, cache_op::INVALIDATE | cache_op::FLAG_VA],
    );
    let to_wb = guest_suites::hypercall(function::MEM_SET_ATTR, &[ipa, size, attr::NORMAL_WB]);
    let after = effective_attribute(ipa);
    if !quiet {
        println!("6. A driver's 64 KiB DMA buffer at IPA {ipa:#x}:");
        println!(
            "   seen through the guest's own write-back mapping, it is {}",
            attribute_name(before)
        );
        println!(
            "   MEM_SET_ATTR NC -> status {}; now it is {} in every alias",
            to_nc.x0 as i64,
            attribute_name(during)
        );
        println!(
            "   CACHE_OP INVALIDATE by VA through a second mapping at {alias:#x} -> {} bytes, a true invalidate",
            invalidate.x1
        );
        println!(
            "   MEM_SET_ATTR WB -> status {}; back to {}",
            to_wb.x0 as i64,
            attribute_name(after)
        );
    }
    BufferWalk {
        before,
        during,
        after,
        invalidated: invalidate.x1,
        set_status: (to_nc.x0 as i64, to_wb.x0 as i64),
    }
}

fn attribute_name(mair: u64) -> &'static str {
    match mair {
        0xff => "write-back (0xff)",
        0x44 => "non-cacheable (0x44)",
        0x00 => "device (0x00)",
        _ => "something else",
    }
}

/// Prints the last records of the audit log, read back with AUDIT_READ.
fn audit_tail() {
    use stagehand_abi::audit::{Record, RECORD_SIZE};
    let mark = guest_suites::hypercall(function::AUDIT_MARK, &[0xde30]);
    let first = mark.x1.saturating_sub(6);
    let mut buffer = AUDIT.lock();
    let ipa = buffer.0.as_mut_ptr() as u64;
    let read = guest_suites::hypercall(function::AUDIT_READ, &[ipa, buffer.0.len() as u64, first]);
    println!(
        "7. The audit log, read back with AUDIT_READ (the last {} records):",
        read.x1
    );
    for chunk in buffer.0.chunks_exact(RECORD_SIZE).take(read.x1 as usize) {
        if let Some(record) = Record::parse(chunk) {
            println!(
                "   #{:<4} {:<11} ipa {:#x} size {:#x} status {}",
                record.sequence.get(),
                record.kind_name().unwrap_or("?"),
                record.ipa.get(),
                record.size.get(),
                record.status.get()
            );
        }
    }
    println!(
        "   The hypervisor streams the same records on its own UART; scripts/run prints how to"
    );
    println!("   turn them into a report.");
}

/// Bound on polls while waiting for another CPU.
const POLLS: usize = 50_000_000;

/// CPUs that printed their greeting.
static GREETED: AtomicUsize = AtomicUsize::new(0);

fn greet(index: usize) {
    println!(
        "   CPU {} (MPIDR {:#x}) says hello and goes back to sleep.",
        index,
        guest_rt::arch::mpidr()
    );
    GREETED.fetch_add(1, Ordering::SeqCst);
}

fn hypervisor_identifies_itself() -> Result<(), String> {
    let uid = guest_suites::hypercall(function::CALL_UID, &[]);
    check_eq!(
        [uid.x0 as u32, uid.x1 as u32, uid.x2 as u32, uid.x3 as u32],
        stagehand_abi::uuid_words(),
        "CALL_UID"
    );
    Ok(())
}

fn abi_is_1_0() -> Result<(), String> {
    let revision = guest_suites::hypercall(function::REVISION, &[]);
    check_eq!(
        (revision.x0, revision.x1),
        (stagehand_abi::ABI_MAJOR, stagehand_abi::ABI_MINOR),
        "REVISION"
    );
    Ok(())
}

fn features_make_sense() -> Result<(), String> {
    let features = guest_suites::hypercall(function::FEATURES, &[]);
    check_eq!(features.status(), Some(Status::Success), "FEATURES status");
    check_eq!(
        features.x2,
        guest_rt::arch::dcache_line_size() as u64,
        "D-cache line size"
    );
    check!(features.x3 != 0, "zero work budget");
    Ok(())
}

fn every_cpu_says_hello() -> Result<(), String> {
    let others = cpu::count().saturating_sub(1);
    check_eq!(
        GREETED.load(Ordering::SeqCst),
        others,
        "CPUs that said hello during the tour"
    );
    for index in 1..=others {
        let mpidr = cpu::mpidr(index).unwrap_or(0);
        let state = cpu::wait_for_affinity(mpidr, psci::AFFINITY_OFF, POLLS / 100);
        check_eq!(
            state,
            psci::AFFINITY_OFF,
            "AFFINITY_INFO of CPU {} after its hello",
            index
        );
    }
    Ok(())
}

fn buffer_goes_non_cacheable_and_back() -> Result<(), String> {
    let walk = buffer_walk(true);
    check_eq!(
        walk.set_status,
        (0, 0),
        "MEM_SET_ATTR statuses (to NC, back to WB)"
    );
    check_eq!(
        (walk.before, walk.during, walk.after),
        (0xff, 0x44, 0xff),
        "effective attributes"
    );
    check_eq!(walk.invalidated, 0x10000, "bytes invalidated");
    Ok(())
}
