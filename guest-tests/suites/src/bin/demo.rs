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
            every_cpu_says_hello
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
