//! Suite `smccc`: SMCCC and PSCI over HVC and trapped SMC, and the life cycle of secondary CPUs.
#![no_std]
#![no_main]

extern crate alloc;

use alloc::string::String;
use core::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};

use guest_rt::cpu::{self, CpuState};
use guest_rt::psci::{self, code, Conduit};
use guest_rt::{check, check_eq, println};

guest_rt::main!(main);

fn main() -> ! {
    guest_rt::test::run_suite(
        "smccc",
        &guest_rt::tests![
            smccc_version_hvc,
            smccc_arch_features_hvc,
            psci_version_hvc,
            psci_features_hvc,
            unknown_function_not_supported_hvc,
            secondaries_start_run_and_stop,
            cpu_on_already_on,
            cpu_on_unknown_mpidr,
            cpu_on_entry_outside_ram,
            restart_after_cpu_off,
            // Last: a hypervisor that does not trap SMC leaves it UNDEFINED at EL1, which ends the suite.
            smccc_version_smc,
            smccc_arch_features_smc,
            psci_version_smc,
            psci_features_smc,
            unknown_function_not_supported_smc,
        ],
    )
}

/// A function ID that no SMCCC service defines (fast call, owner "standard secure", unused).
const UNKNOWN_ID: u32 = 0x8400_FFFF;
/// Bound on polls while waiting for another CPU.
const POLLS: usize = 50_000_000;

fn smccc_version(conduit: Conduit) -> Result<(), String> {
    let version = conduit.call_status(psci::SMCCC_VERSION, &[]);
    check!(version >= 0x10001, "SMCCC_VERSION {:#x} below 1.1", version);
    Ok(())
}

fn smccc_arch_features(conduit: Conduit) -> Result<(), String> {
    let known = conduit.call_status(psci::SMCCC_ARCH_FEATURES, &[u64::from(psci::SMCCC_VERSION)]);
    check_eq!(known, 0, "ARCH_FEATURES(SMCCC_VERSION)");
    let unknown = conduit.call_status(psci::SMCCC_ARCH_FEATURES, &[u64::from(UNKNOWN_ID)]);
    check_eq!(unknown, code::NOT_SUPPORTED, "ARCH_FEATURES(unknown ID)");
    Ok(())
}

fn psci_version(conduit: Conduit) -> Result<(), String> {
    let version = conduit.call_status(psci::PSCI_VERSION, &[]);
    check!(version >= 0x10000, "PSCI_VERSION {:#x} below 1.0", version);
    Ok(())
}

fn psci_features(conduit: Conduit) -> Result<(), String> {
    let supported = [
        ("PSCI_VERSION", psci::PSCI_VERSION),
        ("CPU_ON", psci::CPU_ON),
        ("CPU_OFF", psci::CPU_OFF),
        ("AFFINITY_INFO", psci::AFFINITY_INFO),
        ("SYSTEM_OFF", psci::SYSTEM_OFF),
        ("SYSTEM_RESET", psci::SYSTEM_RESET),
    ];
    for (name, id) in supported {
        let answer = conduit.call_status(psci::PSCI_FEATURES, &[u64::from(id)]);
        check_eq!(answer, 0, "PSCI_FEATURES({})", name);
    }
    let unknown = conduit.call_status(psci::PSCI_FEATURES, &[u64::from(UNKNOWN_ID)]);
    check_eq!(unknown, code::NOT_SUPPORTED, "PSCI_FEATURES(unknown ID)");
    Ok(())
}

fn unknown_function_not_supported(conduit: Conduit) -> Result<(), String> {
    for id in [UNKNOWN_ID, 0xC400_FFFF, 0x8000_FFFF] {
        let answer = conduit.call_status(id, &[]);
        check_eq!(answer, code::NOT_SUPPORTED, "function {:#x}", id);
    }
    Ok(())
}

/// Defines `<name>_hvc` and `<name>_smc` tests that run `name(conduit)`.
macro_rules! per_conduit {
    ($($name:ident: $hvc:ident, $smc:ident;)*) => {
        $(
            fn $hvc() -> Result<(), String> {
                $name(Conduit::Hvc)
            }
            fn $smc() -> Result<(), String> {
                $name(Conduit::Smc)
            }
        )*
    };
}

per_conduit! {
    smccc_version: smccc_version_hvc, smccc_version_smc;
    smccc_arch_features: smccc_arch_features_hvc, smccc_arch_features_smc;
    psci_version: psci_version_hvc, psci_version_smc;
    psci_features: psci_features_hvc, psci_features_smc;
    unknown_function_not_supported: unknown_function_not_supported_hvc, unknown_function_not_supported_smc;
}

/// How many secondaries reached their work.
static ARRIVED: AtomicUsize = AtomicUsize::new(0);
/// Set by the boot CPU to let the secondaries return (and turn off).
static RELEASE: AtomicBool = AtomicBool::new(false);
/// The MPIDR each CPU read from its own MPIDR_EL1.
static SEEN_MPIDR: [AtomicU64; guest_rt::boot::MAX_CPUS] =
    [const { AtomicU64::new(u64::MAX) }; guest_rt::boot::MAX_CPUS];

fn arrive_and_wait(index: usize) {
    SEEN_MPIDR[index].store(guest_rt::arch::mpidr(), Ordering::SeqCst);
    ARRIVED.fetch_add(1, Ordering::SeqCst);
    for _ in 0..POLLS {
        if RELEASE.load(Ordering::SeqCst) {
            return;
        }
        core::hint::spin_loop();
    }
}

fn secondaries() -> core::ops::Range<usize> {
    1..cpu::count()
}

/// Waits until every started secondary has finished its work, then until PSCI reports it off.
fn wait_all_off() -> Result<(), String> {
    for index in secondaries() {
        if cpu::state(index) != CpuState::Off {
            check!(
                cpu::wait_for_state(index, CpuState::Finished, POLLS),
                "CPU {} did not finish",
                index
            );
        }
        let mpidr = cpu::mpidr(index).unwrap_or(0);
        let state = cpu::wait_for_affinity(mpidr, psci::AFFINITY_OFF, POLLS / 100);
        check_eq!(
            state,
            psci::AFFINITY_OFF,
            "AFFINITY_INFO of CPU {} after CPU_OFF",
            index
        );
    }
    Ok(())
}

fn secondaries_start_run_and_stop() -> Result<(), String> {
    let count = cpu::count();
    check!(
        count >= 4,
        "the runner gives -smp 4, the device tree lists {} CPUs",
        count
    );
    ARRIVED.store(0, Ordering::SeqCst);
    RELEASE.store(false, Ordering::SeqCst);
    for index in secondaries() {
        cpu::start(index, arrive_and_wait)
            .map_err(|e| alloc::format!("CPU_ON of CPU {index}: {e}"))?;
    }
    let mut spins = 0;
    while ARRIVED.load(Ordering::SeqCst) < count - 1 && spins < POLLS {
        spins += 1;
        core::hint::spin_loop();
    }
    check_eq!(
        ARRIVED.load(Ordering::SeqCst),
        count - 1,
        "secondaries that ran"
    );
    for index in secondaries() {
        let expected = cpu::mpidr(index).unwrap_or(0);
        check_eq!(
            SEEN_MPIDR[index].load(Ordering::SeqCst),
            expected,
            "MPIDR seen by CPU {}",
            index
        );
        check_eq!(
            psci::affinity_info(expected),
            psci::AFFINITY_ON,
            "AFFINITY_INFO of running CPU {}",
            index
        );
    }
    check_eq!(
        psci::affinity_info(guest_rt::arch::mpidr()),
        psci::AFFINITY_ON,
        "AFFINITY_INFO of the boot CPU"
    );
    // While they wait, CPU_ON on a running CPU must say ALREADY_ON.
    let first = cpu::mpidr(1).unwrap_or(0);
    let again = psci::cpu_on(first, guest_rt::boot::secondary_entry_address(), 1);
    RELEASE.store(true, Ordering::SeqCst);
    check_eq!(again, code::ALREADY_ON, "CPU_ON of running CPU 1");
    wait_all_off()?;
    println!("smccc: {} secondaries ran and turned off", count - 1);
    Ok(())
}

fn hold(_index: usize) {
    for _ in 0..POLLS {
        if RELEASE.load(Ordering::SeqCst) {
            return;
        }
        core::hint::spin_loop();
    }
}

fn cpu_on_already_on() -> Result<(), String> {
    // The boot CPU itself is on.
    let me = guest_rt::arch::mpidr();
    let answer = psci::cpu_on(me, guest_rt::boot::secondary_entry_address(), 0);
    check_eq!(answer, code::ALREADY_ON, "CPU_ON of the calling CPU");
    // And a secondary kept running.
    RELEASE.store(false, Ordering::SeqCst);
    cpu::start(2, hold).map_err(|e| alloc::format!("CPU_ON of CPU 2: {e}"))?;
    check!(
        cpu::wait_for_state(2, CpuState::Running, POLLS),
        "CPU 2 did not start running"
    );
    let mpidr = cpu::mpidr(2).unwrap_or(0);
    let answer = psci::cpu_on(mpidr, guest_rt::boot::secondary_entry_address(), 2);
    RELEASE.store(true, Ordering::SeqCst);
    check_eq!(answer, code::ALREADY_ON, "CPU_ON of running CPU 2");
    wait_all_off()
}

fn cpu_on_unknown_mpidr() -> Result<(), String> {
    for mpidr in [0xff_u64, 0x0001_0000_0000, 0x40] {
        let answer = psci::cpu_on(mpidr, guest_rt::boot::secondary_entry_address(), 1);
        check_eq!(
            answer,
            code::INVALID_PARAMETERS,
            "CPU_ON of MPIDR {:#x}",
            mpidr
        );
    }
    Ok(())
}

fn cpu_on_entry_outside_ram() -> Result<(), String> {
    let ram = guest_rt::dt::main_ram();
    let mpidr = cpu::mpidr(3).unwrap_or(0);
    for entry in [
        0x0u64,
        0x0900_0000,
        ram.end() as u64,
        (ram.end() + 0x2000_0000) as u64,
    ] {
        let answer = psci::cpu_on(mpidr, entry, 3);
        check_eq!(
            answer,
            code::INVALID_ADDRESS,
            "CPU_ON with entry {:#x}",
            entry
        );
    }
    check_eq!(
        psci::affinity_info(mpidr),
        psci::AFFINITY_OFF,
        "CPU 3 after refused CPU_ON"
    );
    Ok(())
}

fn restart_after_cpu_off() -> Result<(), String> {
    for round in 0..2 {
        ARRIVED.store(0, Ordering::SeqCst);
        RELEASE.store(true, Ordering::SeqCst);
        for index in secondaries() {
            cpu::start(index, arrive_and_wait)
                .map_err(|e| alloc::format!("round {round}: CPU_ON of CPU {index}: {e}"))?;
        }
        wait_all_off()?;
        check_eq!(
            ARRIVED.load(Ordering::SeqCst),
            cpu::count() - 1,
            "round {}: secondaries that ran",
            round
        );
    }
    Ok(())
}
