//! SMCCC and PSCI calls over either conduit: HVC (through `stagehand_abi::client`) or SMC
//! (trapped by the hypervisor; this module's own wrapper, same register convention).

use stagehand_abi::Regs;

/// SMCCC_VERSION.
pub const SMCCC_VERSION: u32 = 0x8000_0000;
/// SMCCC_ARCH_FEATURES.
pub const SMCCC_ARCH_FEATURES: u32 = 0x8000_0001;
/// PSCI_VERSION.
pub const PSCI_VERSION: u32 = 0x8400_0000;
/// CPU_OFF.
pub const CPU_OFF: u32 = 0x8400_0002;
/// CPU_ON, SMC64 convention.
pub const CPU_ON: u32 = 0xC400_0003;
/// AFFINITY_INFO, SMC64 convention.
pub const AFFINITY_INFO: u32 = 0xC400_0004;
/// SYSTEM_OFF.
pub const SYSTEM_OFF: u32 = 0x8400_0008;
/// SYSTEM_RESET.
pub const SYSTEM_RESET: u32 = 0x8400_0009;
/// PSCI_FEATURES.
pub const PSCI_FEATURES: u32 = 0x8400_000A;

/// PSCI return codes.
pub mod code {
    /// SUCCESS.
    pub const SUCCESS: i64 = 0;
    /// NOT_SUPPORTED.
    pub const NOT_SUPPORTED: i64 = -1;
    /// INVALID_PARAMETERS.
    pub const INVALID_PARAMETERS: i64 = -2;
    /// DENIED.
    pub const DENIED: i64 = -3;
    /// ALREADY_ON.
    pub const ALREADY_ON: i64 = -4;
    /// ON_PENDING.
    pub const ON_PENDING: i64 = -5;
    /// INTERNAL_FAILURE.
    pub const INTERNAL_FAILURE: i64 = -6;
    /// INVALID_ADDRESS.
    pub const INVALID_ADDRESS: i64 = -9;
}

/// AFFINITY_INFO: the CPU is on.
pub const AFFINITY_ON: i64 = 0;
/// AFFINITY_INFO: the CPU is off.
pub const AFFINITY_OFF: i64 = 1;
/// AFFINITY_INFO: the CPU is being turned on.
pub const AFFINITY_ON_PENDING: i64 = 2;

/// How a call reaches the hypervisor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Conduit {
    /// `HVC #0`.
    Hvc,
    /// `SMC #0`, trapped to EL2 (HCR_EL2.TSC).
    Smc,
}

impl Conduit {
    /// Both conduits, for tests that try each.
    pub const ALL: [Conduit; 2] = [Conduit::Hvc, Conduit::Smc];

    /// Issues `function` with arguments x1-x6 and returns x0-x3.
    pub fn call(self, function: u32, args: &[u64]) -> Regs {
        let mut padded = [0u64; 6];
        let n = args.len().min(6);
        padded[..n].copy_from_slice(&args[..n]);
        match self {
            Conduit::Hvc => stagehand_abi::client::call(function, padded),
            Conduit::Smc => smc_call(function, padded),
        }
    }

    /// Issues `function` and returns x0 as a signed value.
    pub fn call_status(self, function: u32, args: &[u64]) -> i64 {
        self.call(function, args).x0 as i64
    }
}

/// Issues the SMCCC fast call `function` with `SMC #0`, arguments in x1-x6, results x0-x3.
pub fn smc_call(function: u32, args: [u64; 6]) -> Regs {
    let (x0, x1, x2, x3);
    // SAFETY: `smc #0` traps to the hypervisor (or firmware), which follows SMCCC: it reads
    // x0-x6, writes x0-x3 (x4-x17 may be clobbered) and touches no memory the call does not name.
    unsafe {
        core::arch::asm!(
            "smc #0",
            inout("x0") function as u64 => x0,
            inout("x1") args[0] => x1,
            inout("x2") args[1] => x2,
            inout("x3") args[2] => x3,
            inout("x4") args[3] => _,
            inout("x5") args[4] => _,
            inout("x6") args[5] => _,
            out("x7") _, out("x8") _, out("x9") _, out("x10") _, out("x11") _,
            out("x12") _, out("x13") _, out("x14") _, out("x15") _, out("x16") _, out("x17") _,
            options(nostack),
        );
    }
    Regs { x0, x1, x2, x3 }
}

/// PSCI CPU_ON over HVC: start the CPU `mpidr` at `entry` with x0 = `context`.
pub fn cpu_on(mpidr: u64, entry: u64, context: u64) -> i64 {
    Conduit::Hvc.call_status(CPU_ON, &[mpidr, entry, context])
}

/// PSCI AFFINITY_INFO over HVC for one CPU (level 0).
pub fn affinity_info(mpidr: u64) -> i64 {
    Conduit::Hvc.call_status(AFFINITY_INFO, &[mpidr, 0])
}

/// PSCI SYSTEM_OFF over HVC; spins if the call returns.
pub fn system_off() -> ! {
    Conduit::Hvc.call(SYSTEM_OFF, &[]);
    loop {
        crate::arch::wfi();
    }
}
