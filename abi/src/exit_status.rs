//! The hypervisor's exit status line: the one way it tells the host how a run ended.
//!
//! Just before it powers the machine off (PSCI SYSTEM_OFF through the platform firmware, after
//! which QEMU exits with status 0 whatever happened), the hypervisor writes one line of its own
//! on its UART (the second PL011 when the board has one, else the console it shares with the
//! guest):
//!
//! ```text
//! stagehand: exit status <N>
//! ```
//!
//! `<N>` is decimal, 0 to 255, one of the constants below. The test runner and `scripts/run`
//! read the status from this line; a run that ends without it ended abnormally.
//!
//! Why a line and not QEMU's own exit status: only semihosting can give QEMU a non-zero exit
//! status, and QEMU never lets the hypervisor keep semihosting to itself. `HLT #0xF000` cannot
//! be trapped at EL2, so with semihosting enabled any guest code (even EL0 in some
//! configurations) could run host commands (SYS_SYSTEM) and read or write host files. QEMU is
//! therefore never started with semihosting enabled.

use core::fmt;

/// What the line starts with; the status follows it.
pub const PREFIX: &str = "stagehand: exit status ";

/// The guest powered the machine off (PSCI SYSTEM_OFF).
pub const GUEST_POWERED_OFF: u8 = 0;
/// The hypervisor stopped with an error line (`stagehand: error: ...`): bad configuration,
/// malformed or missing guest image, unsupported board, internal error.
pub const ERROR: u8 = 1;
/// The hypervisor panicked.
pub const PANIC: u8 = 2;
/// The guest did something the hypervisor cannot handle, and was stopped with a report.
pub const GUEST_STOPPED: u8 = 3;
/// The hypervisor itself took an exception it cannot handle.
pub const HYPERVISOR_FAULT: u8 = 4;

/// The line for `status`, without its newline: `format!("{}", Line(3))` is
/// `stagehand: exit status 3`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Line(pub u8);

impl fmt::Display for Line {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{PREFIX}{}", self.0)
    }
}

/// The status of one line, if it is a status line: [`PREFIX`] at its start, then decimal digits
/// of a value up to 255, then nothing but an optional line end (`\r`, `\n`).
pub fn parse_line(line: &str) -> Option<u8> {
    let digits = line.strip_prefix(PREFIX)?.trim_end_matches(['\r', '\n']);
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// The status of the last status line in `text` (a UART transcript), if any. The last one
/// counts: on a UART shared with the guest, the guest may print such a line too, but the
/// hypervisor's own comes after everything the guest printed.
pub fn last_in(text: &str) -> Option<u8> {
    text.lines().rev().find_map(parse_line)
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;
    use std::format;

    #[test]
    fn a_line_reads_back_its_status() {
        for status in [0, 1, 2, 3, 4, 255] {
            let line = format!("{}", Line(status));
            assert!(line.starts_with(PREFIX));
            assert_eq!(parse_line(&line), Some(status));
            assert_eq!(parse_line(&format!("{line}\r\n")), Some(status));
        }
        assert_eq!(format!("{}", Line(3)), "stagehand: exit status 3");
    }

    #[test]
    fn other_lines_are_not_status_lines() {
        for line in [
            "",
            "stagehand: exit status ",
            "stagehand: exit status 256",
            "stagehand: exit status -1",
            "stagehand: exit status 3 and more",
            "stagehand: exit status 0x3",
            "x stagehand: exit status 3",
            "[stagehand INFO ] stagehand: exit status 3",
            "stagehand: error: config: unknown key `exit`",
        ] {
            assert_eq!(parse_line(line), None, "{line:?}");
        }
    }

    #[test]
    fn the_last_status_line_counts() {
        assert_eq!(last_in(""), None);
        assert_eq!(last_in("[stagehand INFO ] guest powered off\n"), None);
        let text = "stagehand: exit status 0\r\nguest text\nstagehand: exit status 3\r\n";
        assert_eq!(last_in(text), Some(3));
        assert_eq!(last_in("stagehand: exit status 1"), Some(1));
    }
}
