//! Stopping the machine. The exit status goes out as one line on the hypervisor's UART
//! ([`stagehand_abi::exit_status`]), then PSCI SYSTEM_OFF powers the machine off (QEMU exits
//! with status 0). Never semihosting: `HLT` cannot be trapped at EL2, so QEMU must never enable
//! it, or any guest could run host commands.

use core::fmt::Write;
use stagehand_abi::exit_status;

/// Writes the exit status line for `status` (one of [`exit_status`]'s constants) and powers
/// the machine off. Before the UART is known nothing can be written: the run then ends without
/// the line, which the host treats as an abnormal end.
pub fn exit(status: u8) -> ! {
    let mut line = crate::console::LineBuffer::new();
    let _ = writeln!(line, "{}", exit_status::Line(status));
    crate::console::write_final_line(line.as_str());
    system_off()
}

/// Prints one clear error line and stops the machine with status [`exit_status::ERROR`].
pub fn fatal(message: core::fmt::Arguments) -> ! {
    let mut line = crate::console::LineBuffer::new();
    let _ = writeln!(line, "stagehand: error: {message}");
    crate::console::emergency_write(line.as_str());
    exit(exit_status::ERROR)
}

/// PSCI SYSTEM_OFF through the platform firmware (QEMU exits with status 0).
fn system_off() -> ! {
    let _ = smccc::psci::system_off::<smccc::Smc>();
    crate::arch::halt()
}

/// PSCI SYSTEM_RESET through the platform firmware. No exit status line: the machine restarts
/// (under `-no-reboot`, QEMU exits with status 0 and no status line).
pub fn system_reset() -> ! {
    let _ = smccc::psci::system_reset::<smccc::Smc>();
    crate::arch::halt()
}
