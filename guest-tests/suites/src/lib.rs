//! Helpers shared by the suites: the hypervisor's own calls, small formatting aids and the
//! `edu` DMA device's driver ([`edu`]).
#![no_std]

extern crate alloc;

pub mod edu;
pub mod hostile;

use alloc::format;
use alloc::string::String;
use stagehand_abi::{Regs, Status};

/// Issues a stagehand hypercall over HVC with up to six arguments.
pub fn hypercall(function: u32, args: &[u64]) -> Regs {
    stagehand_abi::client::call_with(function, args)
}

/// x0 of a call read as a signed status.
pub fn status(regs: &Regs) -> i64 {
    regs.x0 as i64
}

/// The initrd the runner generates for suite `dt`: its length in bytes.
/// Keep in step with the runner's `initrd_pattern` (guest-tests/runner).
pub const DT_INITRD_LEN: usize = 65_831;

/// Byte `index` of the initrd the runner generates for suite `dt`.
pub fn dt_initrd_byte(index: usize) -> u8 {
    ((index * 7) % 251) as u8
}

/// The kernel command line the runner passes to suite `dt` with `-append`.
pub const DT_BOOTARGS: &str = "stagehand.suite=dt answer=42 quiet";

/// The name of a status code (for messages).
pub fn status_name(x0: u64) -> String {
    match Status::from_code(x0 as i64) {
        Some(status) => String::from(status.name()),
        None => format!("unknown status {}", x0 as i64),
    }
}

/// Fails unless the call answered `want`.
///
/// # Errors
/// A message naming `what`, the status received and the one expected.
pub fn expect_status(regs: &Regs, want: Status, what: &str) -> Result<(), String> {
    if regs.x0 as i64 != want.code() {
        return Err(format!(
            "{}: got {} (x1 {:#x}, x2 {:#x}), expected {}",
            what,
            status_name(regs.x0),
            regs.x1,
            regs.x2,
            want.name()
        ));
    }
    Ok(())
}
