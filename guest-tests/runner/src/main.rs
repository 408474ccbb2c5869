//! `guest-runner`: boots each stagehand test guest in its own QEMU under the hypervisor
//! firmware, with a timeout, reads the guest's TEST/RESULT lines and prints one line per test;
//! then runs the boot checks ([`boot`]), each one test judged from the hypervisor's own
//! behaviour; last, it prints `N passed, M failed` (host test counts from `--host-results`
//! included).
//!
//! ```text
//! guest-runner --firmware build/stagehand.bin --guests build/guests [--qemu qemu-system-aarch64]
//!              [--only NAME|boot|boot/CHECK]... [--timeout SECS] [--logs DIR] [--host-results P,F]
//! ```

mod audit_replay;
mod boot;
mod digest;
mod disk;
mod dma_log;
mod linux_io;
mod module;
mod protocol;
mod qemu;
mod suites;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use boot::{BootCheck, Kernel};
use protocol::{Exit, TestOutcome};
use suites::{Disk, Image, Initrd, Suite};

/// Command-line options.
#[derive(Debug, Default)]
struct Options {
    firmware: Option<PathBuf>,
    guests: Option<PathBuf>,
    qemu: Option<PathBuf>,
    only: Vec<String>,
    timeout: Option<u64>,
    logs: Option<PathBuf>,
    host_results: (u64, u64),
}

const USAGE: &str =
    "usage: guest-runner --firmware FILE --guests DIR [--qemu BIN] [--only NAME|boot|boot/CHECK]... \
[--timeout SECS] [--logs DIR] [--host-results PASSED,FAILED]";

fn parse_options(args: impl IntoIterator<Item = String>) -> Result<Options, String> {
    let mut options = Options::default();
    let mut args = args.into_iter();
    while let Some(arg) = args.next() {
        let mut value = |name: &str| args.next().ok_or_else(|| format!("{name} needs a value"));
        match arg.as_str() {
            "--firmware" => options.firmware = Some(value("--firmware")?.into()),
            "--guests" => options.guests = Some(value("--guests")?.into()),
            "--qemu" => options.qemu = Some(value("--qemu")?.into()),
            "--only" => options.only.push(value("--only")?),
            "--logs" => options.logs = Some(value("--logs")?.into()),
            "--timeout" => {
                let secs = value("--timeout")?;
                options.timeout = Some(
                    secs.parse()
                        .map_err(|_| format!("--timeout {secs}: not a number of seconds"))?,
                );
            }
            "--host-results" => {
                let text = value("--host-results")?;
                let parsed = text
                    .split_once(',')
                    .and_then(|(p, f)| Some((p.trim().parse().ok()?, f.trim().parse().ok()?)));
                options.host_results = parsed
                    .ok_or_else(|| format!("--host-results {text}: expected PASSED,FAILED"))?;
            }
            "-h" | "--help" => return Err(String::new()),
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    if options.firmware.is_none() || options.guests.is_none() {
        return Err(String::from("--firmware and --guests are required"));
    }
    for name in &options.only {
        let boot_check = name
            .strip_prefix("boot/")
            .map_or(name == "boot", |check| boot::find(check).is_some());
        if suites::find(name).is_none() && !boot_check {
            let known: Vec<&str> = suites::SUITES.iter().map(|s| s.name).collect();
            let checks: Vec<&str> = boot::BOOT_CHECKS.iter().map(|c| c.name).collect();
            return Err(format!(
                "no suite named {name:?} (suites: {}; boot checks: boot, or boot/ and one of {})",
                known.join(", "),
                checks.join(", ")
            ));
        }
    }
    Ok(options)
}

/// Runs one suite and returns its judged outcomes.
fn run_suite(suite: &Suite, options: &Options, logs: &Path) -> Vec<TestOutcome> {
    let run_name = format!("{}/run", suite.name);
    let (kernel, linux_initrd) = match suite.image {
        Image::TestGuest => {
            let guests = options.guests.as_deref().unwrap_or(Path::new("."));
            (guests.join(format!("{}.elf", suite.guest)), None)
        }
        Image::Linux => match Suite::linux_paths(|name| std::env::var(name).ok()) {
            Ok((kernel, initrd)) => (kernel, Some(initrd)),
            Err(reason) => return vec![TestOutcome::fail(run_name, reason)],
        },
    };
    if !kernel.is_file() {
        return vec![TestOutcome::fail(
            run_name,
            format!("guest image {} not found", kernel.display()),
        )];
    }
    let initrd = match suite.initrd {
        Initrd::None => None,
        Initrd::Linux => linux_initrd,
        Initrd::DtPattern => match suites::write_dt_initrd(logs) {
            Ok(path) => Some(path),
            Err(error) => {
                return vec![TestOutcome::fail(
                    run_name,
                    format!("writing the initrd: {error}"),
                )]
            }
        },
    };
    let mut extra_args: Vec<String> = suite.extra_args.iter().map(|s| s.to_string()).collect();
    let disk = match suite.disk {
        // The I/O rows' disk is made below, with their network card.
        Disk::None | Disk::LinuxIo => None,
        Disk::VirtioBlk => match disk::create(logs, suite.name) {
            Ok(path) => {
                extra_args.extend(disk::qemu_args(&path));
                Some(path)
            }
            Err(error) => {
                return vec![TestOutcome::fail(
                    run_name,
                    format!("writing the disk image: {error}"),
                )]
            }
        },
    };
    let mut io_setup = None;
    if suite.disk == Disk::LinuxIo {
        let prepared = linux_io::choose_seed(|name| std::env::var(name).ok())
            .and_then(|seed| linux_io::prepare(logs, suite.name, seed).map_err(|e| e.to_string()));
        match prepared {
            Ok(setup) => {
                extra_args.extend(linux_io::qemu_args(&setup));
                io_setup = Some(setup);
            }
            Err(error) => {
                return vec![TestOutcome::fail(
                    run_name,
                    format!("preparing the disk and network: {error}"),
                )]
            }
        }
    }
    let mut launch = suite_launch(suite, options, logs, kernel, initrd, extra_args);
    let mut net_peer = None;
    if let Some(setup) = &io_setup {
        let items = linux_io::append_items(setup);
        launch.append = Some(match launch.append.take() {
            Some(append) => format!("{append} {items}"),
            None => items,
        });
        let (tap, console) = std::sync::mpsc::channel();
        launch.console_tap = Some(tap);
        let deadline = std::time::Instant::now() + launch.timeout;
        net_peer = Some(linux_io::NetPeer::start(
            setup.host_port,
            setup.seed,
            console,
            deadline,
        ));
        eprintln!(
            "guest-runner: {}: seed {} ({} to repeat it)",
            suite.name,
            setup.seed,
            linux_io::SEED_VAR
        );
    }
    eprintln!(
        "guest-runner: {} ({}; {} CPUs, {} RAM, timeout {} s)",
        suite.name,
        suite.machine.describe(),
        suite.cpus,
        suite.memory,
        launch.timeout.as_secs()
    );
    let outcome = launch.run();
    let console_log = logs.join(format!("{}.console.log", suite.name));
    let _ = std::fs::write(&console_log, &outcome.console);
    if !outcome.stderr.is_empty() {
        let _ = std::fs::write(
            logs.join(format!("{}.qemu.log", suite.name)),
            &outcome.stderr,
        );
    }
    // The guest names its lines after itself; a row on another board reports under its own name.
    let transcript = protocol::parse_console(suite.guest, &outcome.console);
    let mut outcomes = protocol::judge(suite.guest, &transcript, &outcome.exit);
    if suite.guest != suite.name {
        let guest_prefix = format!("{}/", suite.guest);
        for test in &mut outcomes {
            if let Some(rest) = test.name.strip_prefix(&guest_prefix) {
                test.name = format!("{}/{rest}", suite.name);
            }
        }
    }
    // Point the reader of a run-level failure at the evidence.
    let stderr_hint = outcome
        .stderr
        .lines()
        .find(|l| !l.trim().is_empty())
        .map(|l| format!("; QEMU: {}", l.trim()));
    for test in outcomes.iter_mut().skip(transcript.tests.len()) {
        if let Some(reason) = &mut test.failure {
            reason.push_str(&format!(" (console: {}", console_log.display()));
            if matches!(
                outcome.exit,
                Exit::QemuFailed(_) | Exit::NoStatusLine | Exit::NotStarted(_)
            ) {
                if let Some(hint) = &stderr_hint {
                    reason.push_str(hint);
                }
            }
            reason.push(')');
        }
    }
    if let Some(image) = &disk {
        outcomes.push(disk::check_image(suite.name, image));
        outcomes.push(disk::check_hypervisor_log(
            suite.name,
            &outcome.hypervisor_uart,
            suite.disk_mode(),
        ));
    }
    if suite.loads_module() {
        outcomes.extend(module::check(
            suite.name,
            &outcome.console,
            &outcome.hypervisor_uart,
        ));
    }
    if let (Some(setup), Some(peer)) = (&io_setup, net_peer) {
        let net = peer.finish();
        let report = linux_io::parse_guest_report(&outcome.console);
        outcomes.extend(linux_io::check_disk(suite.name, setup, &report));
        outcomes.push(linux_io::check_net(suite.name, setup, &net, &report));
        outcomes.push(linux_io::check_no_refusals(suite.name, logs));
    }
    outcomes
}

/// The QEMU run of `suite` with its guest `kernel`, `initrd` and `extra_args` (its own and its
/// disk's); the hypervisor logs to `<logs>/<suite>.hyp.log`.
fn suite_launch(
    suite: &Suite,
    options: &Options,
    logs: &Path,
    kernel: PathBuf,
    initrd: Option<PathBuf>,
    extra_args: Vec<String>,
) -> qemu::Launch {
    qemu::Launch {
        qemu: qemu_binary(options),
        machine: suite.machine,
        firmware: options.firmware.clone().unwrap_or_default(),
        kernel: Some(kernel),
        initrd,
        append: suite.append.map(String::from),
        cpus: suite.cpus,
        memory: suite.memory.into(),
        config: suite.config_string(),
        hypervisor_log: Some(logs.join(format!("{}.hyp.log", suite.name))),
        extra_args,
        timeout: Duration::from_secs(options.timeout.unwrap_or(suite.timeout_secs)),
        console_tap: None,
    }
}

/// The QEMU binary `--qemu` names, else `qemu-system-aarch64` from the PATH.
fn qemu_binary(options: &Options) -> PathBuf {
    options
        .qemu
        .clone()
        .unwrap_or_else(|| "qemu-system-aarch64".into())
}

/// The boot checks `--only` selects: all of them when it is not given, else those named
/// `boot/<name>`, or all for `boot`.
fn selected_boot_checks(only: &[String]) -> Vec<&'static BootCheck> {
    boot::BOOT_CHECKS
        .iter()
        .filter(|check| {
            only.is_empty()
                || only
                    .iter()
                    .any(|name| name == "boot" || *name == check.test_name())
        })
        .collect()
}

/// Runs one boot check and returns its outcome, `boot/<name>`.
fn run_boot_check(check: &BootCheck, options: &Options, logs: &Path) -> TestOutcome {
    let name = check.test_name();
    let guests = options.guests.as_deref().unwrap_or(Path::new("."));
    let kernel = match check.kernel {
        Kernel::None => None,
        Kernel::Elf(guest) => Some(guests.join(format!("{guest}.elf"))),
        Kernel::Raw(guest) => Some(guests.join(format!("{guest}.bin"))),
        Kernel::Malformed(image) => {
            let path = logs.join(image.file_name());
            if let Err(error) = std::fs::write(&path, image.bytes()) {
                return TestOutcome::fail(name, format!("writing {}: {error}", path.display()));
            }
            Some(path)
        }
        Kernel::Tiny(image) => {
            let path = logs.join(image.file_name());
            if let Err(error) = std::fs::write(&path, image.bytes()) {
                return TestOutcome::fail(name, format!("writing {}: {error}", path.display()));
            }
            Some(path)
        }
    };
    if let Some(kernel) = kernel.as_deref().filter(|k| !k.is_file()) {
        return TestOutcome::fail(name, format!("guest image {} not found", kernel.display()));
    }
    let stem = format!("boot-{}", check.name);
    // `Launch::run` removes an earlier run's hypervisor log: no line of it can count.
    let launch = boot_check_launch(check, options, logs, kernel);
    eprintln!(
        "guest-runner: {name} (timeout {} s)",
        launch.timeout.as_secs()
    );
    let outcome = launch.run();
    let console_log = logs.join(format!("{stem}.console.log"));
    let _ = std::fs::write(&console_log, &outcome.console);
    if !outcome.stderr.is_empty() {
        let _ = std::fs::write(logs.join(format!("{stem}.qemu.log")), &outcome.stderr);
    }
    let observed = boot::Observed {
        console: &outcome.console,
        hypervisor_log: &outcome.hypervisor_uart,
        exit: &outcome.exit,
    };
    match boot::judge(&check.expect, &observed) {
        Ok(()) => TestOutcome::pass(name),
        Err(mut reason) => {
            reason.push_str(&format!(
                " (logs: {})",
                logs.join(format!("{stem}.*")).display()
            ));
            if let Some(line) = outcome.stderr.lines().find(|l| !l.trim().is_empty()) {
                reason.push_str(&format!("; QEMU: {}", line.trim()));
            }
            TestOutcome::fail(name, reason)
        }
    }
}

/// The QEMU run of boot check `check` with guest `kernel`; the hypervisor logs to
/// `<logs>/boot-<name>.hyp.log`, or shares the console when the check says so.
fn boot_check_launch(
    check: &BootCheck,
    options: &Options,
    logs: &Path,
    kernel: Option<PathBuf>,
) -> qemu::Launch {
    qemu::Launch {
        qemu: qemu_binary(options),
        machine: qemu::Machine::DEFAULT,
        firmware: options.firmware.clone().unwrap_or_default(),
        kernel,
        initrd: None,
        append: None,
        cpus: 1,
        memory: "512M".into(),
        config: check.config_string(),
        hypervisor_log: (!check.shared_uart)
            .then(|| logs.join(format!("boot-{}.hyp.log", check.name))),
        extra_args: check.qemu_args.iter().map(|&arg| arg.into()).collect(),
        timeout: Duration::from_secs(options.timeout.unwrap_or(check.timeout_secs)),
        console_tap: None,
    }
}

fn main() -> ExitCode {
    let options = match parse_options(std::env::args().skip(1)) {
        Ok(options) => options,
        Err(message) => {
            if !message.is_empty() {
                eprintln!("guest-runner: {message}");
            }
            eprintln!("{USAGE}");
            return ExitCode::from(2);
        }
    };
    let logs = options
        .logs
        .clone()
        .unwrap_or_else(|| PathBuf::from("build/logs"));
    if let Err(error) = std::fs::create_dir_all(&logs) {
        eprintln!("guest-runner: cannot create {}: {error}", logs.display());
        return ExitCode::from(2);
    }
    let selected: Vec<&Suite> = if options.only.is_empty() {
        suites::SUITES.iter().collect()
    } else {
        suites::SUITES
            .iter()
            .filter(|s| options.only.iter().any(|name| name == s.name))
            .collect()
    };
    let (mut passed, mut failed) = options.host_results;
    let mut tally = |outcomes: &[TestOutcome]| {
        for outcome in outcomes {
            println!("{}", outcome.line());
        }
        let (p, f) = protocol::totals(outcomes);
        passed += p;
        failed += f;
    };
    for suite in selected {
        tally(&run_suite(suite, &options, &logs));
        if audit_replay::applies(suite.name) {
            tally(&audit_replay::check(suite.name, &logs));
        }
        if dma_log::applies(suite.name) {
            tally(&[dma_log::check(suite.name, &logs)]);
        }
        if linux_io::QUOTA_ROWS.contains(&suite.name) {
            tally(&[linux_io::check_quota_refusals(suite.name, &logs)]);
        }
    }
    for check in selected_boot_checks(&options.only) {
        tally(&[run_boot_check(check, &options, &logs)]);
    }
    println!("{passed} passed, {failed} failed");
    if failed > 0 {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(text: &str) -> Vec<String> {
        text.split_whitespace().map(String::from).collect()
    }

    #[test]
    fn parses_every_option() {
        let options = parse_options(args(
            "--firmware f.bin --guests g --qemu q --only dt --only smccc --timeout 9 --logs l --host-results 12,3",
        ))
        .unwrap();
        assert_eq!(options.firmware, Some("f.bin".into()));
        assert_eq!(options.only, vec!["dt", "smccc"]);
        assert_eq!(options.timeout, Some(9));
        assert_eq!(options.host_results, (12, 3));
    }

    #[test]
    fn rejects_bad_options() {
        assert!(parse_options(args("--guests g")).is_err());
        assert!(parse_options(args("--firmware f --guests g --only nosuch")).is_err());
        assert!(parse_options(args("--firmware f --guests g --host-results 3")).is_err());
        assert!(parse_options(args("--firmware f --guests g --timeout soon")).is_err());
        assert!(parse_options(args("--firmware f --guests g --bogus")).is_err());
        assert!(parse_options(args("--firmware")).is_err());
        assert!(parse_options(args("--firmware f --guests g --only boot/nosuch")).is_err());
        assert!(parse_options(args("--firmware f --guests g --only boot/")).is_err());
        assert!(parse_options(args("--firmware f --guests g --only raw-image")).is_err());
    }

    /// Semihosting would let any guest run host commands: no QEMU the runner starts may have
    /// it, whatever the suite or check (their disks and extra arguments included).
    #[test]
    fn no_command_line_enables_semihosting() {
        let options = parse_options(args("--firmware f.bin --guests g")).unwrap();
        let logs = Path::new("logs");
        let mut launches = Vec::new();
        for suite in suites::SUITES {
            let mut extra_args: Vec<String> =
                suite.extra_args.iter().map(|s| s.to_string()).collect();
            if suite.disk == Disk::VirtioBlk {
                extra_args.extend(disk::qemu_args(&logs.join("disk.img")));
            }
            if suite.disk == Disk::LinuxIo {
                let setup = linux_io::Setup {
                    seed: 1,
                    image: logs.join("disk.img"),
                    host_port: 1,
                };
                extra_args.extend(linux_io::qemu_args(&setup));
            }
            launches.push(suite_launch(
                suite,
                &options,
                logs,
                "k.elf".into(),
                Some("i".into()),
                extra_args,
            ));
        }
        for check in boot::BOOT_CHECKS {
            launches.push(boot_check_launch(
                check,
                &options,
                logs,
                Some("k.elf".into()),
            ));
        }
        assert_eq!(
            launches.len(),
            suites::SUITES.len() + boot::BOOT_CHECKS.len()
        );
        for launch in &launches {
            let arguments = launch.arguments();
            // The hypervisor's configuration is data for the hypervisor, not for QEMU (boot
            // check removed-exit-key passes the old `exit=semihosting` there to see it refused).
            let config = |arg: &String| arg.starts_with("name=opt/stagehand/config,");
            assert_eq!(arguments.iter().filter(|arg| config(arg)).count(), 1);
            assert!(
                arguments
                    .iter()
                    .filter(|arg| !config(arg))
                    .all(|arg| !arg.to_ascii_lowercase().contains("semihosting")),
                "{arguments:?}"
            );
        }
    }

    /// scripts/run and scripts/bench start QEMU themselves and read the exit status line with
    /// a sed pattern of their own: it must match the hypervisor's format, and neither script
    /// may enable semihosting.
    #[test]
    fn the_scripts_read_the_status_line_and_never_enable_semihosting() {
        let pattern = format!("'s/^{}\\([0-9]", stagehand_abi::exit_status::PREFIX);
        for (name, text) in [
            ("scripts/run", include_str!("../../../scripts/run")),
            ("scripts/bench", include_str!("../../../scripts/bench")),
        ] {
            assert!(text.contains(&pattern), "{name} lacks {pattern}");
            assert!(!text.contains("-semihosting"), "{name}");
            assert!(!text.contains("exit=semihosting"), "{name}");
        }
    }

    #[test]
    fn only_selects_boot_checks_by_name_or_all() {
        let options = parse_options(args(
            "--firmware f --guests g --only dt --only boot/el2-fault --only boot/no-kernel",
        ))
        .unwrap();
        let names: Vec<String> = selected_boot_checks(&options.only)
            .iter()
            .map(|c| c.test_name())
            .collect();
        // In table order, not command-line order.
        assert_eq!(names, vec!["boot/no-kernel", "boot/el2-fault"]);
        assert!(selected_boot_checks(&args("dt smccc")).is_empty());
        let all = boot::BOOT_CHECKS.len();
        assert_eq!(selected_boot_checks(&[]).len(), all);
        assert_eq!(selected_boot_checks(&args("dt boot")).len(), all);
    }
}
