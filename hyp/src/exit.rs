//! Stopping the machine: through semihosting when the configuration says QEMU has it enabled
//! (the only way to hand QEMU a non-zero exit status), else through PSCI SYSTEM_OFF.

use core::arch::asm;
use core::sync::atomic::{AtomicBool, Ordering};

static SEMIHOSTING: AtomicBool = AtomicBool::new(false);

/// The configuration says QEMU runs with `-semihosting-config enable=on`.
pub fn use_semihosting(enabled: bool) {
    SEMIHOSTING.store(enabled, Ordering::Relaxed);
}

/// Stops the machine with `code` as QEMU's exit status where possible.
pub fn exit(code: u8) -> ! {
    if SEMIHOSTING.load(Ordering::Relaxed) {
        // SYS_EXIT_EXTENDED with ADP_Stopped_ApplicationExit and the status.
        let block: [u64; 2] = [0x20026, code as u64];
        // SAFETY: semihosting is enabled (configuration), so HLT #0xF000 is a call into QEMU
        // that reads the two words at x1 and ends the emulation.
        unsafe {
            asm!("hlt #0xf000", in("w0") 0x20u32, in("x1") block.as_ptr(), options(nostack));
        }
    }
    system_off()
}

/// Prints one clear error line and stops the machine with status 1.
pub fn fatal(message: core::fmt::Arguments) -> ! {
    use core::fmt::Write;
    let mut line = crate::console::LineBuffer::new();
    let _ = writeln!(line, "stagehand: error: {message}");
    crate::console::emergency_write(line.as_str());
    exit(1)
}

/// PSCI SYSTEM_OFF through the platform firmware (QEMU exits with status 0).
pub fn system_off() -> ! {
    let _ = smccc::psci::system_off::<smccc::Smc>();
    crate::arch::halt()
}

/// PSCI SYSTEM_RESET through the platform firmware.
pub fn system_reset() -> ! {
    let _ = smccc::psci::system_reset::<smccc::Smc>();
    crate::arch::halt()
}
