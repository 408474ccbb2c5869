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
            constant_answers_hvc,
            hvc_preserves_x4_to_x30,
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
            constant_answers_smc,
        ],
    )
}

/// A function ID that no SMCCC service defines (fast call, owner "standard secure", unused).
const UNKNOWN_ID: u32 = 0x8400_FFFF;
/// Bound on polls while waiting for another CPU.
const POLLS: usize = 50_000_000;

/// Loads x4-x30 from `input`, calls `HVC #0` (or, with `other_immediate`, `HVC #1`, which
/// takes the full trap path) with x0 = `function`, and returns x4-x30 as they came back.
fn hvc_with_registers(function: u32, input: &[u64; 27], other_immediate: bool) -> [u64; 27] {
    let mut output = [0u64; 27];
    macro_rules! body {
        ($hvc:literal) => {
            // SAFETY: x19-x30 (which Rust reserves or needs back) are saved on the stack and
            // restored; every other register the block writes is declared clobbered. The
            // hypervisor reads x0-x6 and writes x0-x3 only.
            unsafe {
                core::arch::asm!(
                    "sub sp, sp, #112",
                    "stp x19, x20, [sp]",
                    "stp x21, x22, [sp, #16]",
                    "stp x23, x24, [sp, #32]",
                    "stp x25, x26, [sp, #48]",
                    "stp x27, x28, [sp, #64]",
                    "stp x29, x30, [sp, #80]",
                    "stp x18, x2, [sp, #96]",
                    "ldp x4, x5, [x1]",
                    "ldp x6, x7, [x1, #16]",
                    "ldp x8, x9, [x1, #32]",
                    "ldp x10, x11, [x1, #48]",
                    "ldp x12, x13, [x1, #64]",
                    "ldp x14, x15, [x1, #80]",
                    "ldp x16, x17, [x1, #96]",
                    "ldp x18, x19, [x1, #112]",
                    "ldp x20, x21, [x1, #128]",
                    "ldp x22, x23, [x1, #144]",
                    "ldp x24, x25, [x1, #160]",
                    "ldp x26, x27, [x1, #176]",
                    "ldp x28, x29, [x1, #192]",
                    "ldr x30, [x1, #208]",
                    $hvc,
                    "ldr x1, [sp, #104]",
                    "stp x4, x5, [x1]",
                    "stp x6, x7, [x1, #16]",
                    "stp x8, x9, [x1, #32]",
                    "stp x10, x11, [x1, #48]",
                    "stp x12, x13, [x1, #64]",
                    "stp x14, x15, [x1, #80]",
                    "stp x16, x17, [x1, #96]",
                    "stp x18, x19, [x1, #112]",
                    "stp x20, x21, [x1, #128]",
                    "stp x22, x23, [x1, #144]",
                    "stp x24, x25, [x1, #160]",
                    "stp x26, x27, [x1, #176]",
                    "stp x28, x29, [x1, #192]",
                    "str x30, [x1, #208]",
                    "ldp x19, x20, [sp]",
                    "ldp x21, x22, [sp, #16]",
                    "ldp x23, x24, [sp, #32]",
                    "ldp x25, x26, [sp, #48]",
                    "ldp x27, x28, [sp, #64]",
                    "ldp x29, x30, [sp, #80]",
                    "ldr x18, [sp, #96]",
                    "add sp, sp, #112",
                    inout("x0") u64::from(function) => _,
                    inout("x1") input.as_ptr() => _,
                    inout("x2") output.as_mut_ptr() => _,
                    out("x3") _, out("x4") _, out("x5") _, out("x6") _, out("x7") _,
                    out("x8") _, out("x9") _, out("x10") _, out("x11") _, out("x12") _,
                    out("x13") _, out("x14") _, out("x15") _, out("x16") _, out("x17") _,
                )
            }
        };
    }
    if other_immediate {
        body!("hvc #1");
    } else {
        body!("hvc #0");
    }
    output
}

/// The SMCCC preserves every register but x0-x3: the hypercall's short paths save only what
/// they clobber, so x19-x30 are checked here as well as x4-x18, on each: a constant answer
/// from the vector's table (PSCI_VERSION, CALL_UID), a call the handler runs (FEATURES), one
/// refused and audited, and the full trap path.
fn hvc_preserves_x4_to_x30() -> Result<(), String> {
    let calls = [
        ("PSCI_VERSION", psci::PSCI_VERSION, false),
        ("CALL_UID", stagehand_abi::function::CALL_UID, false),
        ("FEATURES", stagehand_abi::function::FEATURES, false),
        ("an unknown ID", UNKNOWN_ID, false),
        ("HVC #1", psci::PSCI_VERSION, true),
    ];
    for (round, (name, function, other_immediate)) in calls.into_iter().enumerate() {
        let input: [u64; 27] =
            core::array::from_fn(|i| 0x5a5a_0000_0000_0000 | (round as u64) << 32 | (i as u64 + 4));
        let output = hvc_with_registers(function, &input, other_immediate);
        for i in 0..27 {
            check_eq!(output[i], input[i], "x{} after {}", i + 4, name);
        }
    }
    Ok(())
}

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

/// The calls the hypervisor answers from its table of constants (in the HVC vector, and for a
/// trapped SMC): each answers x0-x3 in full, whatever x1-x3 held; their neighbours, which the
/// table does not hold, are still refused.
fn constant_answers(conduit: Conduit) -> Result<(), String> {
    let uuid = stagehand_abi::uuid_words().map(u64::from);
    let answers = [
        (
            "REVISION",
            stagehand_abi::function::REVISION,
            [stagehand_abi::ABI_MAJOR, stagehand_abi::ABI_MINOR, 0, 0],
        ),
        ("CALL_UID", stagehand_abi::function::CALL_UID, uuid),
        ("SMCCC_VERSION", psci::SMCCC_VERSION, [0x1_0001, 0, 0, 0]),
        ("PSCI_VERSION", psci::PSCI_VERSION, [0x1_0001, 0, 0, 0]),
        ("CPU_SUSPEND (32)", 0x8400_0001, [0; 4]),
        ("CPU_SUSPEND (64)", 0xC400_0001, [0; 4]),
        ("MIGRATE_INFO_TYPE", 0x8400_0006, [2, 0, 0, 0]),
    ];
    for (name, id, expected) in answers {
        let regs = conduit.call(id, &[0xa1, 0xa2, 0xa3]);
        check_eq!([regs.x0, regs.x1, regs.x2, regs.x3], expected, "{}", name);
    }
    for id in [
        0x8600_FF00,
        0x8600_FF02,
        0x8400_0007,
        0xC600_FF03,
        0x8000_0002,
    ] {
        check_eq!(
            conduit.call_status(id, &[]),
            code::NOT_SUPPORTED,
            "function {:#x}",
            id
        );
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
    constant_answers: constant_answers_hvc, constant_answers_smc;
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
