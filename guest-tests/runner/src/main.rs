//! `guest-runner`: boots each stagehand test guest in its own QEMU under the hypervisor
//! firmware, with a timeout, reads the guest's TEST/RESULT lines and prints one line per test
//! and, last, `N passed, M failed` (host test counts from `--host-results` included).
//!
//! ```text
//! guest-runner --firmware build/stagehand.bin --guests build/guests [--qemu qemu-system-aarch64]
//!              [--only NAME]... [--timeout SECS] [--logs DIR] [--host-results P,F]
//! ```

mod protocol;
mod qemu;
mod suites;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use protocol::{Exit, TestOutcome};
use suites::{Image, Initrd, Suite};

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
    "usage: guest-runner --firmware FILE --guests DIR [--qemu BIN] [--only NAME]... \
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
        if suites::find(name).is_none() {
            let known: Vec<&str> = suites::SUITES.iter().map(|s| s.name).collect();
            return Err(format!(
                "no suite named {name:?} (suites: {})",
                known.join(", ")
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
            (guests.join(format!("{}.elf", suite.name)), None)
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
    let timeout = options.timeout.unwrap_or(suite.timeout_secs);
    let launch = qemu::Launch {
        qemu: options
            .qemu
            .clone()
            .unwrap_or_else(|| "qemu-system-aarch64".into()),
        firmware: options.firmware.clone().unwrap_or_default(),
        kernel,
        initrd,
        append: suite.append.map(String::from),
        cpus: suite.cpus,
        memory: suite.memory.into(),
        config: suite.config_string(),
        hypervisor_log: logs.join(format!("{}.hyp.log", suite.name)),
        extra_args: suite.extra_args.iter().map(|s| s.to_string()).collect(),
        timeout: Duration::from_secs(timeout),
    };
    eprintln!(
        "guest-runner: {} ({} CPUs, {} RAM, timeout {} s)",
        suite.name, suite.cpus, suite.memory, timeout
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
    let transcript = protocol::parse_console(suite.name, &outcome.console);
    let mut outcomes = protocol::judge(suite.name, &transcript, &outcome.exit);
    // Point the reader of a run-level failure at the evidence.
    let stderr_hint = outcome
        .stderr
        .lines()
        .find(|l| !l.trim().is_empty())
        .map(|l| format!("; QEMU: {}", l.trim()));
    for test in outcomes.iter_mut().skip(transcript.tests.len()) {
        if let Some(reason) = &mut test.failure {
            reason.push_str(&format!(" (console: {}", console_log.display()));
            if matches!(outcome.exit, Exit::Exited(Some(code)) if code != 0)
                || matches!(outcome.exit, Exit::NotStarted(_))
            {
                if let Some(hint) = &stderr_hint {
                    reason.push_str(hint);
                }
            }
            reason.push(')');
        }
    }
    outcomes
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
    for suite in selected {
        let outcomes = run_suite(suite, &options, &logs);
        for outcome in &outcomes {
            println!("{}", outcome.line());
        }
        let (p, f) = protocol::totals(&outcomes);
        passed += p;
        failed += f;
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
    }
}
