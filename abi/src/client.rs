//! Guest-side client: issue a hypercall with `HVC #0`.
//!
//! Only this module holds inline assembly; everything above it is safe. On a non-aarch64 host
//! the client is absent, so host tests of other crates never execute an `hvc`.

#[cfg(target_arch = "aarch64")]
use crate::Regs;

/// Issues the SMCCC fast call `function` with arguments x1-x6 and returns x0-x3.
///
/// Registers x4-x17 may be clobbered by an SMCCC 1.1 callee in general; this hypervisor
/// preserves them, but the client does not rely on it.
#[cfg(target_arch = "aarch64")]
pub fn call(function: u32, args: [u64; 6]) -> Regs {
    let (x0, x1, x2, x3);
    // SAFETY: `hvc #0` traps to the hypervisor, which follows SMCCC: it reads x0-x6, writes
    // x0-x3 and touches no guest memory except what a documented call names in its arguments.
    unsafe {
        core::arch::asm!(
            "hvc #0",
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

/// Issues `function` with up to six arguments, padding the rest with zeros.
#[cfg(target_arch = "aarch64")]
pub fn call_with(function: u32, args: &[u64]) -> Regs {
    let mut padded = [0u64; 6];
    let n = args.len().min(6);
    padded[..n].copy_from_slice(&args[..n]);
    call(function, padded)
}
