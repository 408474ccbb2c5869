//! Boot checks: QEMU runs whose verdict comes from the hypervisor's own behaviour (its exit
//! status line, the lines on its UART, where they land on a shared console) rather than from a
//! guest's TEST lines. Each check is one test, `boot/<name>`. The malformed images some checks
//! boot are made at run time from the descriptions here, never kept as files.

use crate::protocol::{self, Exit};
use crate::suites;
use stagehand_abi::exit_status;

/// What every boot error line of the hypervisor starts with (`exit::fatal`).
pub const ERROR_PREFIX: &str = "stagehand: error: ";
/// What every log line of the hypervisor starts with (`console`).
pub const LOG_PREFIX: &str = "[stagehand ";
/// How an audit record line starts (the hypervisor's other kind of line).
pub const AUDIT_PREFIX: &str = stagehand_abi::audit::LINE_MARKER;
/// The hypervisor's exit status after a boot error (`exit::fatal`).
pub const BOOT_ERROR_STATUS: u8 = exit_status::ERROR;
/// The hypervisor's exit status after a fault of its own (`trap::hypervisor_fault`).
pub const HYPERVISOR_FAULT_STATUS: u8 = exit_status::HYPERVISOR_FAULT;
/// The address `selftest=el2-fault` reads. Keep in step with `el2_fault_selftest` in
/// hyp/src/main.rs.
pub const EL2_FAULT_ADDRESS: u64 = 0x0000_f000_0000_0000;
/// Where the test guests are linked and raw images are loaded: RAM base + 0x80000.
const GUEST_LINK_ADDRESS: u64 = 0x4008_0000;
/// The title and decoded syndrome of the report `selftest=el2-fault` must produce.
const EL2_FAULT_TITLE: &str = "[stagehand FATAL] synchronous exception at EL2";
const EL2_FAULT_SYNDROME: &str = "(data abort at EL2), translation fault on read";

/// What QEMU gets as `-kernel`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kernel {
    /// No `-kernel` at all.
    None,
    /// The test guest `<guests>/<name>.elf`.
    Elf(&'static str),
    /// The test guest as a raw binary, `<guests>/<name>.bin` (made by scripts/build).
    Raw(&'static str),
    /// A malformed image, written to the log directory before the run.
    Malformed(Malformed),
}

/// A malformed guest image.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Malformed {
    /// A well-formed ELF64 executable, but for x86-64 (EM_X86_64).
    WrongMachine,
    /// An AArch64 ELF whose program header table runs past the end of the file.
    TruncatedProgramHeaders,
}

/// What a boot check expects of its run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Expect {
    /// The suite passes exactly as [`protocol::judge`] judges a normal run, and the hypervisor's
    /// log contains `log_says` (proof that the image went the intended way).
    SuitePasses {
        /// The suite the guest runs.
        suite: &'static str,
        /// Text the hypervisor's log must contain.
        log_says: &'static str,
    },
    /// The suite passes on the one UART the hypervisor shares with the guest, and the
    /// hypervisor's lines appear there before the guest's first line and after its RESULT
    /// line, never between.
    SharedConsole {
        /// The suite the guest runs.
        suite: &'static str,
    },
    /// The hypervisor refuses to boot: its exit status line says [`BOOT_ERROR_STATUS`], its
    /// UART holds exactly one line starting with [`ERROR_PREFIX`], that line contains `message`,
    /// and the guest console stays empty.
    BootError {
        /// Text the error line must contain.
        message: &'static str,
    },
    /// The hypervisor faults on purpose at EL2 (`selftest=el2-fault`): its exit status line
    /// says [`HYPERVISOR_FAULT_STATUS`], the report names the exception, decodes the syndrome as a
    /// translation fault on a read, gives FAR = [`EL2_FAULT_ADDRESS`] and dumps x0-x30, and the
    /// guest console stays empty.
    El2Fault,
}

/// One row of the boot-check table.
#[derive(Clone, Copy, Debug)]
pub struct BootCheck {
    /// Name: the test is `boot/<name>`.
    pub name: &'static str,
    /// The guest image.
    pub kernel: Kernel,
    /// Configuration items beyond [`suites::COMMON_CONFIG`].
    pub config: &'static [&'static str],
    /// QEMU gets one UART, which the hypervisor shares with the guest.
    pub shared_uart: bool,
    /// Seconds before QEMU is killed.
    pub timeout_secs: u64,
    /// What the run must show.
    pub expect: Expect,
}

const fn check(name: &'static str, kernel: Kernel, expect: Expect) -> BootCheck {
    BootCheck {
        name,
        kernel,
        config: &[],
        shared_uart: false,
        timeout_secs: 30,
        expect,
    }
}

/// Every boot check, in the order they run.
pub const BOOT_CHECKS: &[BootCheck] = &[
    BootCheck {
        timeout_secs: 60,
        ..check(
            "raw-image",
            Kernel::Raw("discovery"),
            Expect::SuitePasses {
                suite: "discovery",
                // The hypervisor's `kernel: <format>, <bytes> bytes, ...` line (vm.rs).
                log_says: "kernel: Raw,",
            },
        )
    },
    BootCheck {
        config: &["bogus=1"],
        ..check(
            "bad-config",
            Kernel::Elf("discovery"),
            Expect::BootError {
                message: "unknown key `bogus`",
            },
        )
    },
    // The old `exit=semihosting` (the test rig's own setting once): refused, never obeyed.
    BootCheck {
        config: &["exit=semihosting"],
        ..check(
            "removed-exit-key",
            Kernel::Elf("discovery"),
            Expect::BootError {
                message: "config: `exit` was removed: semihosting is never enabled",
            },
        )
    },
    check(
        "bad-image",
        Kernel::Malformed(Malformed::WrongMachine),
        Expect::BootError {
            message: "guest image: ELF: machine 62 is not EM_AARCH64 (183)",
        },
    ),
    check(
        "truncated-image",
        Kernel::Malformed(Malformed::TruncatedProgramHeaders),
        Expect::BootError {
            message:
                "guest image: ELF: program headers at offset 0x40 do not lie in the first 120 bytes",
        },
    ),
    check(
        "no-kernel",
        Kernel::None,
        Expect::BootError {
            message: "no guest to run: start QEMU with -kernel",
        },
    ),
    BootCheck {
        shared_uart: true,
        timeout_secs: 60,
        ..check(
            "single-uart",
            Kernel::Elf("discovery"),
            Expect::SharedConsole { suite: "discovery" },
        )
    },
    BootCheck {
        config: &["selftest=el2-fault"],
        ..check("el2-fault", Kernel::Elf("discovery"), Expect::El2Fault)
    },
];

/// Finds a boot check by name.
pub fn find(name: &str) -> Option<&'static BootCheck> {
    BOOT_CHECKS.iter().find(|check| check.name == name)
}

impl BootCheck {
    /// The test name, `boot/<name>`.
    pub fn test_name(&self) -> String {
        format!("boot/{}", self.name)
    }

    /// The configuration string: [`suites::COMMON_CONFIG`], then this check's items.
    pub fn config_string(&self) -> String {
        suites::config_string(self.config)
    }
}

impl Malformed {
    /// The file name the image is written under.
    pub fn file_name(self) -> &'static str {
        match self {
            Malformed::WrongMachine => "boot-x86-64.elf",
            Malformed::TruncatedProgramHeaders => "boot-truncated.elf",
        }
    }

    /// The image's bytes.
    pub fn bytes(self) -> Vec<u8> {
        const EM_X86_64: u16 = 62;
        const EM_AARCH64: u16 = 183;
        match self {
            Malformed::WrongMachine => elf_image(EM_X86_64, 1),
            Malformed::TruncatedProgramHeaders => {
                // The header announces four program headers; the file ends after the first.
                let mut bytes = elf_image(EM_AARCH64, 4);
                bytes.truncate(ELF_HEADER_LEN + PROGRAM_HEADER_LEN);
                bytes
            }
        }
    }
}

const ELF_HEADER_LEN: usize = 64;
const PROGRAM_HEADER_LEN: usize = 56;

/// A little-endian ELF64 executable for `machine`: the header, `program_headers` program
/// headers (the first a PT_LOAD of the code at [`GUEST_LINK_ADDRESS`], the others PT_NULL), then
/// the code: branch-to-self instructions, so a wrongly accepted image hangs rather than runs on.
fn elf_image(machine: u16, program_headers: u16) -> Vec<u8> {
    const BRANCH_TO_SELF: [u8; 4] = [0x00, 0x00, 0x00, 0x14];
    let code = BRANCH_TO_SELF.repeat(4);
    let code_offset = ELF_HEADER_LEN + PROGRAM_HEADER_LEN * usize::from(program_headers);
    let mut bytes = vec![0u8; code_offset];
    let mut put = |offset: usize, field: &[u8]| {
        bytes[offset..offset + field.len()].copy_from_slice(field);
    };
    // e_ident: magic, ELFCLASS64, ELFDATA2LSB, EV_CURRENT.
    put(0, &[0x7f, b'E', b'L', b'F', 2, 1, 1]);
    put(16, &2u16.to_le_bytes()); // e_type: ET_EXEC
    put(18, &machine.to_le_bytes());
    put(20, &1u32.to_le_bytes()); // e_version
    put(24, &GUEST_LINK_ADDRESS.to_le_bytes()); // e_entry
    put(32, &(ELF_HEADER_LEN as u64).to_le_bytes()); // e_phoff
    put(52, &(ELF_HEADER_LEN as u16).to_le_bytes()); // e_ehsize
    put(54, &(PROGRAM_HEADER_LEN as u16).to_le_bytes()); // e_phentsize
    put(56, &program_headers.to_le_bytes()); // e_phnum
    let first = ELF_HEADER_LEN;
    put(first, &1u32.to_le_bytes()); // p_type: PT_LOAD
    put(first + 4, &5u32.to_le_bytes()); // p_flags: R X
    put(first + 8, &(code_offset as u64).to_le_bytes()); // p_offset
    put(first + 16, &GUEST_LINK_ADDRESS.to_le_bytes()); // p_vaddr
    put(first + 24, &GUEST_LINK_ADDRESS.to_le_bytes()); // p_paddr
    put(first + 32, &(code.len() as u64).to_le_bytes()); // p_filesz
    put(first + 40, &(code.len() as u64).to_le_bytes()); // p_memsz
    put(first + 48, &4u64.to_le_bytes()); // p_align
    bytes.extend_from_slice(&code);
    bytes
}

/// What one boot check's run produced.
#[derive(Clone, Copy, Debug)]
pub struct Observed<'a> {
    /// The guest console (first UART).
    pub console: &'a str,
    /// The hypervisor's UART: the second UART, or the console itself when shared.
    pub hypervisor_log: &'a str,
    /// How the run ended (the hypervisor's exit status line included).
    pub exit: &'a Exit,
}

/// Judges a run against what its check expects.
///
/// # Errors
/// The first expectation the run does not meet, as a sentence.
pub fn judge(expect: &Expect, observed: &Observed) -> Result<(), String> {
    match *expect {
        Expect::SuitePasses { suite, log_says } => {
            judge_suite(suite, observed)?;
            if !observed.hypervisor_log.contains(log_says) {
                return Err(format!(
                    "the suite passed, but the hypervisor's log does not say {log_says:?}"
                ));
            }
            Ok(())
        }
        Expect::SharedConsole { suite } => {
            judge_suite(suite, observed)?;
            judge_shared_console(suite, observed.console)
        }
        Expect::BootError { message } => judge_boot_error(message, observed),
        Expect::El2Fault => judge_el2_fault(observed),
    }
}

/// The suite's normal judgement, with its first failure as the reason.
fn judge_suite(suite: &str, observed: &Observed) -> Result<(), String> {
    let transcript = protocol::parse_console(suite, observed.console);
    let outcomes = protocol::judge(suite, &transcript, observed.exit);
    match outcomes.iter().find(|outcome| outcome.failure.is_some()) {
        Some(failed) => Err(format!("suite {suite}: {}", failed.line())),
        None => Ok(()),
    }
}

fn judge_shared_console(suite: &str, console: &str) -> Result<(), String> {
    let lines: Vec<&str> = console.lines().collect();
    let is_log = |line: &str| {
        line.starts_with(LOG_PREFIX)
            || line.starts_with(AUDIT_PREFIX)
            || exit_status::parse_line(line).is_some()
    };
    if let Some(torn) = lines
        .iter()
        .find(|l| !is_log(l) && (l.contains(LOG_PREFIX) || l.contains(AUDIT_PREFIX)))
    {
        return Err(format!(
            "a hypervisor line starts inside a guest line: {torn:?}"
        ));
    }
    let first_guest = lines
        .iter()
        .position(|line| !line.trim().is_empty() && !is_log(line))
        .ok_or("the guest printed nothing")?;
    let result = lines
        .iter()
        .position(|line| !is_log(line) && protocol::parse_result_line(suite, line).is_some())
        .ok_or("no RESULT line")?;
    if let Some(line) = lines[first_guest..result].iter().find(|l| is_log(l)) {
        return Err(format!(
            "a hypervisor line between the guest's first line and its RESULT line: {line:?}"
        ));
    }
    if !lines[..first_guest].iter().any(|l| is_log(l)) {
        return Err(String::from(
            "no hypervisor line before the guest's first line: it did not log on the shared UART",
        ));
    }
    if !lines[result + 1..].iter().any(|l| is_log(l)) {
        return Err(String::from(
            "no hypervisor line after the guest's RESULT line: it did not resume logging",
        ));
    }
    Ok(())
}

fn judge_boot_error(message: &str, observed: &Observed) -> Result<(), String> {
    expect_exit(observed.exit, BOOT_ERROR_STATUS)?;
    let errors: Vec<&str> = observed
        .hypervisor_log
        .lines()
        .filter(|line| line.contains(ERROR_PREFIX.trim_end()))
        .collect();
    match errors.as_slice() {
        [] => {
            return Err(String::from(
                "no `stagehand: error:` line on the hypervisor's UART",
            ))
        }
        [line] if !line.starts_with(ERROR_PREFIX) => {
            return Err(format!("the error line does not start the line: {line:?}"))
        }
        [line] if !line.contains(message) => {
            return Err(format!("the error line {line:?} does not say {message:?}"))
        }
        [_] => {}
        many => {
            return Err(format!(
                "{} error lines, expected one: {many:?}",
                many.len()
            ))
        }
    }
    if observed.hypervisor_log.contains("[stagehand FATAL]") {
        return Err(String::from("the hypervisor also reported a fatal fault"));
    }
    expect_silent_guest(observed.console)
}

fn judge_el2_fault(observed: &Observed) -> Result<(), String> {
    expect_exit(observed.exit, HYPERVISOR_FAULT_STATUS)?;
    let log = observed.hypervisor_log;
    if !log.lines().any(|line| line.starts_with(EL2_FAULT_TITLE)) {
        return Err(format!("no {EL2_FAULT_TITLE:?} line"));
    }
    if !log
        .lines()
        .any(|line| line.trim_start().starts_with("ESR ") && line.contains(EL2_FAULT_SYNDROME))
    {
        return Err(format!("no ESR line decoded as {EL2_FAULT_SYNDROME:?}"));
    }
    let far = log.lines().find_map(|line| {
        let mut words = line.split_whitespace();
        (words.next() == Some("FAR")).then(|| words.next().unwrap_or_default())
    });
    let expected_far = format!("{EL2_FAULT_ADDRESS:#x}");
    match far {
        None => return Err(String::from("no FAR in the report")),
        Some(far) if far != expected_far => {
            return Err(format!("FAR {far}, expected {expected_far}"))
        }
        Some(_) => {}
    }
    if let Some(missing) = (0..31).find(|&n| dumped_register(log, n).is_none()) {
        return Err(format!("the register dump lacks x{missing}"));
    }
    expect_silent_guest(observed.console)
}

/// The value of `x<n>` in a register dump (`x0  0x0000000040216161  x1 ...`).
fn dumped_register(log: &str, n: usize) -> Option<u64> {
    let name = format!("x{n}");
    log.lines().find_map(|line| {
        let words: Vec<&str> = line.split_whitespace().collect();
        let index = words.iter().position(|word| *word == name)?;
        let value = words.get(index + 1)?.strip_prefix("0x")?;
        u64::from_str_radix(value, 16).ok()
    })
}

fn expect_exit(exit: &Exit, status: u8) -> Result<(), String> {
    let ended = match exit {
        Exit::Status(reported) if *reported == status => return Ok(()),
        Exit::Status(reported) => format!("the hypervisor reported exit status {reported}"),
        Exit::NoStatusLine => String::from("QEMU exited without the hypervisor's exit status line"),
        Exit::QemuFailed(Some(code)) => format!("QEMU exited with status {code}"),
        Exit::QemuFailed(None) => String::from("QEMU was killed by a signal"),
        Exit::TimedOut(seconds) => format!("QEMU was still running after {seconds} s (killed)"),
        Exit::NotStarted(why) => format!("QEMU did not start: {why}"),
    };
    Err(format!("{ended}, expected exit status {status}"))
}

fn expect_silent_guest(console: &str) -> Result<(), String> {
    match console.lines().find(|line| !line.trim().is_empty()) {
        Some(line) => Err(format!("the guest console is not empty: {line:?}")),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hyp_core::{config, esr, image};

    const DISCOVERY: &str = "TEST discovery/a: PASS\nTEST discovery/b: PASS\n\
                             RESULT discovery: 2 passed, 0 failed\n";

    fn observed<'a>(console: &'a str, log: &'a str, exit: &'a Exit) -> Observed<'a> {
        Observed {
            console,
            hypervisor_log: log,
            exit,
        }
    }

    fn reason(expect: Expect, console: &str, log: &str, exit: Exit) -> String {
        judge(&expect, &observed(console, log, &exit)).unwrap_err()
    }

    #[test]
    fn names_are_unique_and_every_kind_is_checked() {
        for (i, check) in BOOT_CHECKS.iter().enumerate() {
            assert!(BOOT_CHECKS[..i]
                .iter()
                .all(|other| other.name != check.name));
            assert!(check.timeout_secs > 0);
            assert!(
                suites::find(check.name).is_none(),
                "{} is a suite",
                check.name
            );
        }
        for name in [
            "raw-image",
            "bad-config",
            "removed-exit-key",
            "bad-image",
            "no-kernel",
            "single-uart",
            "el2-fault",
        ] {
            assert!(find(name).is_some(), "{name}");
        }
        assert_eq!(find("el2-fault").unwrap().test_name(), "boot/el2-fault");
        assert_eq!(
            find("el2-fault").unwrap().config_string(),
            "log=debug selftest=el2-fault"
        );
    }

    #[test]
    fn the_expected_errors_are_the_hypervisors_own_messages() {
        let ram = (0x4000_0000, 256 << 20);
        for check in BOOT_CHECKS {
            let Expect::BootError { message } = check.expect else {
                continue;
            };
            match check.kernel {
                Kernel::Malformed(malformed) => {
                    let bytes = malformed.bytes();
                    let error = image::plan(&bytes, bytes.len() as u64, ram.0, ram.1).unwrap_err();
                    assert!(
                        format!("guest image: {error}").contains(message),
                        "{}: {error}",
                        check.name
                    );
                }
                _ if !check.config.is_empty() => {
                    let text = check.config_string();
                    let error = config::parse(&text).unwrap_err();
                    assert!(error.to_string().contains(message), "{error}");
                }
                _ => assert_eq!(check.kernel, Kernel::None),
            }
        }
    }

    #[test]
    fn the_selftest_key_and_the_fault_report_match_the_hypervisor() {
        let text = find("el2-fault").unwrap().config_string();
        assert_eq!(
            config::parse(&text).unwrap().selftest,
            Some(config::SelfTest::El2Fault)
        );
        // A data abort taken at EL2, translation fault at level 0, on a read.
        let syndrome = format!("{}", esr::Syndrome(0x9600_0004));
        assert!(syndrome.ends_with(EL2_FAULT_SYNDROME), "{syndrome}");
    }

    #[test]
    fn malformed_images_are_what_they_say() {
        let wrong = Malformed::WrongMachine.bytes();
        assert_eq!(&wrong[..4], b"\x7fELF");
        assert_eq!(u16::from_le_bytes([wrong[18], wrong[19]]), 62);
        assert_eq!(wrong.len(), ELF_HEADER_LEN + PROGRAM_HEADER_LEN + 16);
        let truncated = Malformed::TruncatedProgramHeaders.bytes();
        assert_eq!(u16::from_le_bytes([truncated[18], truncated[19]]), 183);
        assert_eq!(u16::from_le_bytes([truncated[56], truncated[57]]), 4);
        assert_eq!(truncated.len(), 120);
        // The same header for AArch64 with its whole table is a loadable image.
        let good = elf_image(183, 1);
        let plan = image::plan(&good, good.len() as u64, 0x4000_0000, 256 << 20).unwrap();
        assert_eq!(plan.entry, GUEST_LINK_ADDRESS);
        assert_ne!(
            Malformed::WrongMachine.file_name(),
            Malformed::TruncatedProgramHeaders.file_name()
        );
    }

    #[test]
    fn a_suite_check_needs_the_suite_and_the_log_line() {
        let expect = Expect::SuitePasses {
            suite: "discovery",
            log_says: "kernel: Raw,",
        };
        let log = "[stagehand INFO ] kernel: Raw, 43624 bytes, 1 segment(s)\n";
        assert_eq!(
            judge(&expect, &observed(DISCOVERY, log, &Exit::Status(0))),
            Ok(())
        );
        assert!(
            reason(expect, DISCOVERY, "kernel: Elf, 1 bytes", Exit::Status(0))
                .contains("does not say \"kernel: Raw,\"")
        );
        assert_eq!(
            reason(expect, "", log, Exit::Status(0)),
            "suite discovery: FAIL discovery/result: no RESULT line (after 0 TEST line(s))"
        );
        assert!(reason(expect, DISCOVERY, log, Exit::TimedOut(60)).contains("discovery/run"));
        let failing = "TEST discovery/a: FAIL no\nRESULT discovery: 0 passed, 1 failed\n";
        assert_eq!(
            reason(expect, failing, log, Exit::Status(0)),
            "suite discovery: FAIL discovery/a: no"
        );
    }

    #[test]
    fn a_shared_console_holds_the_log_while_the_guest_runs() {
        let expect = Expect::SharedConsole { suite: "discovery" };
        let before = "[stagehand INFO ] stagehand 0.1.0 on CPU 0\n[stagehand INFO ] entering\n";
        let after = "[stagehand INFO ] guest powered off\nstagehand: exit status 0\n";
        let good = format!("{before}{DISCOVERY}{after}");
        let exit = Exit::of_run(Some(0), &good);
        assert_eq!(exit, Exit::Status(0));
        assert_eq!(judge(&expect, &observed(&good, &good, &exit)), Ok(()));
        // The status line alone counts as the hypervisor's line after the guest's.
        let only_status = format!("{before}{DISCOVERY}stagehand: exit status 0\n");
        assert_eq!(judge(&expect, &observed(&only_status, "", &exit)), Ok(()));

        let between = format!(
            "{before}TEST discovery/a: PASS\n[stagehand INFO ] AUDIT x\n\
             TEST discovery/b: PASS\nRESULT discovery: 2 passed, 0 failed\n{after}"
        );
        assert!(
            reason(expect, &between, "", Exit::Status(0)).starts_with("a hypervisor line between")
        );
        let torn = format!(
            "{before}TEST discovery/a: PASS\nTES[stagehand INFO ] x\n\
             TEST discovery/b: PASS\nRESULT discovery: 2 passed, 0 failed\n{after}"
        );
        assert!(reason(expect, &torn, "", Exit::Status(0)).contains("inside a guest line"));
        let silent_before = format!("{DISCOVERY}{after}");
        assert!(reason(expect, &silent_before, "", Exit::Status(0))
            .starts_with("no hypervisor line before"));
        let silent_after = format!("{before}{DISCOVERY}");
        assert!(reason(expect, &silent_after, "", Exit::Status(0))
            .starts_with("no hypervisor line after"));
        // The suite's own judgement comes first.
        assert!(reason(expect, before, "", Exit::Status(0)).starts_with("suite discovery"));
    }

    #[test]
    fn a_boot_error_is_one_line_a_status_and_no_guest() {
        let expect = Expect::BootError {
            message: "unknown key `bogus`",
        };
        let line = "stagehand: error: configuration (opt/stagehand/config): config: unknown key \
                    `bogus` (known: ram, log)";
        let log = format!("[stagehand INFO ] stagehand 0.1.0 on CPU 0\n{line}\n");
        let exit = Exit::Status(1);
        assert_eq!(judge(&expect, &observed("", &log, &exit)), Ok(()));
        assert_eq!(
            reason(expect, "", &log, Exit::Status(0)),
            "the hypervisor reported exit status 0, expected exit status 1"
        );
        assert_eq!(
            reason(expect, "", &log, Exit::NoStatusLine),
            "QEMU exited without the hypervisor's exit status line, expected exit status 1"
        );
        assert!(reason(expect, "", &log, Exit::QemuFailed(Some(1)))
            .starts_with("QEMU exited with status 1,"));
        assert!(reason(expect, "", &log, Exit::TimedOut(30)).contains("still running after 30 s"));
        assert!(reason(expect, "", "[stagehand INFO ] x\n", Exit::Status(1))
            .starts_with("no `stagehand: error:` line"));
        assert!(
            reason(expect, "", &format!("{log}{line}\n"), Exit::Status(1))
                .starts_with("2 error lines")
        );
        assert!(reason(expect, "", &format!("x {line}\n"), Exit::Status(1))
            .contains("does not start the line"));
        assert!(reason(
            Expect::BootError {
                message: "unknown key `other`"
            },
            "",
            &log,
            Exit::Status(1)
        )
        .contains("does not say"));
        assert!(
            reason(expect, "TEST discovery/a: PASS\n", &log, Exit::Status(1))
                .starts_with("the guest console is not empty")
        );
        assert!(reason(
            expect,
            "",
            &format!("{log}[stagehand FATAL] panic\n"),
            Exit::Status(1)
        )
        .contains("fatal fault"));
    }

    /// A report as the hypervisor printed it.
    const FAULT_REPORT: &str = r"[stagehand WARN ] selftest: reading 0xf00000000000 at EL2, which must fault

[stagehand FATAL] synchronous exception at EL2 on CPU 0x0
  ESR 0x96000004: EC 0x25 (data abort at EL2), translation fault on read
  FAR 0xf00000000000  HPFAR 0x0  ELR 0x40203564  SPSR 0x600003c9
  x0  0x0000000040216161  x1  0x000000004025889c  x2  0x000000000000004c  x3  0x000000000000004c
  x4  0x0000000000000002  x5  0x000000000000000c  x6  0x0000000000000001  x7  0x0000000000000000
  x8  0x0000f00000000000  x9  0x000000000000000d  x10 0x000000000000000a  x11 0x0000000000000090
  x12 0x000000000000000a  x13 0x4c45207461203030  x14 0x6166207473756d20  x15 0x0000000061662074
  x16 0x0000000061660000  x17 0x0000000000002074  x18 0x0000000000660000  x19 0x0000000040215f80
  x20 0x000000004020b6f0  x21 0x0000000000002800  x22 0x0000000040258d80  x23 0x0000000040258d88
  x24 0x0000000000000000  x25 0x0000000040258dc8  x26 0x0000000000000001  x27 0x0000000040258df8
  x28 0x0000000000001cd5  x29 0x000000005fe00000  x30 0x0000000040203558
";

    #[test]
    fn an_el2_fault_is_reported_in_full() {
        let expect = Expect::El2Fault;
        let exit = Exit::Status(4);
        assert_eq!(judge(&expect, &observed("", FAULT_REPORT, &exit)), Ok(()));
        assert_eq!(dumped_register(FAULT_REPORT, 8), Some(EL2_FAULT_ADDRESS));
        assert_eq!(dumped_register(FAULT_REPORT, 30), Some(0x4020_3558));
        assert!(reason(expect, "", FAULT_REPORT, Exit::Status(1)).contains("status 1"));
        let cases = [
            (
                "[stagehand FATAL] synchronous",
                "[stagehand FATAL] asynchronous",
                "no \"[stagehand FATAL]",
            ),
            (
                "translation fault on read",
                "permission fault on read",
                "no ESR line",
            ),
            (
                "FAR 0xf00000000000",
                "FAR 0xf00000000008",
                "FAR 0xf00000000008, expected 0xf00000000000",
            ),
            ("  FAR", "  far", "no FAR"),
            ("x30 0x", "x30 0y", "lacks x30"),
            ("  x17 0x0000000000002074", "", "lacks x17"),
        ];
        for (from, to, why) in cases {
            let log = FAULT_REPORT.replace(from, to);
            assert_ne!(log, FAULT_REPORT, "{from}");
            assert!(
                reason(expect, "", &log, Exit::Status(4)).contains(why),
                "{from} -> {to}"
            );
        }
        assert!(reason(expect, "hello\n", FAULT_REPORT, Exit::Status(4))
            .starts_with("the guest console is not empty"));
    }
}
