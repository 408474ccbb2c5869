//! Parsing of the guests' console protocol:
//!
//! ```text
//! TEST <suite>/<name>: PASS
//! TEST <suite>/<name>: FAIL <reason>
//! RESULT <suite>: <passed> passed, <failed> failed
//! ```
//!
//! and the judgement of one suite's run from its lines, the hypervisor's exit status and whether
//! it timed out.

/// The outcome of one test, as the guest reported it or as the runner decided it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TestOutcome {
    /// `<suite>/<name>`.
    pub name: String,
    /// `None` for a pass, the reason for a failure.
    pub failure: Option<String>,
}

impl TestOutcome {
    /// A passed test.
    pub fn pass(name: impl Into<String>) -> Self {
        TestOutcome {
            name: name.into(),
            failure: None,
        }
    }

    /// A failed test with its reason.
    pub fn fail(name: impl Into<String>, reason: impl Into<String>) -> Self {
        TestOutcome {
            name: name.into(),
            failure: Some(reason.into()),
        }
    }

    /// The line the runner prints for this outcome.
    pub fn line(&self) -> String {
        match &self.failure {
            None => format!("PASS {}", self.name),
            Some(reason) => format!("FAIL {}: {}", self.name, reason),
        }
    }
}

/// The counts of a RESULT line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ResultLine {
    /// Tests the guest says passed.
    pub passed: u32,
    /// Tests the guest says failed.
    pub failed: u32,
}

/// What a suite printed: its TEST lines in order and its RESULT line, if any.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Transcript {
    /// One entry per TEST line of the suite.
    pub tests: Vec<TestOutcome>,
    /// The first RESULT line of the suite.
    pub result: Option<ResultLine>,
}

/// Parses a `TEST <suite>/<name>: PASS|FAIL <reason>` line of `suite`. Text before `TEST `
/// (a kernel message that ran into the line) is ignored.
pub fn parse_test_line(suite: &str, line: &str) -> Option<TestOutcome> {
    let line = line.trim_end_matches(['\r', '\n']);
    let prefix = format!("TEST {suite}/");
    let start = line.find(&prefix)?;
    let rest = &line[start + 5..];
    let (name, verdict) = rest.split_once(": ")?;
    if name.contains(char::is_whitespace) || name.len() <= suite.len() + 1 {
        return None;
    }
    if verdict.trim_end() == "PASS" {
        Some(TestOutcome::pass(name))
    } else if let Some(reason) = verdict.strip_prefix("FAIL") {
        let reason = reason.trim();
        Some(TestOutcome::fail(
            name,
            if reason.is_empty() {
                "(no reason given)"
            } else {
                reason
            },
        ))
    } else {
        None
    }
}

/// Parses a `RESULT <suite>: <p> passed, <f> failed` line of `suite`.
pub fn parse_result_line(suite: &str, line: &str) -> Option<ResultLine> {
    let line = line.trim_end_matches(['\r', '\n']);
    let prefix = format!("RESULT {suite}: ");
    let start = line.find(&prefix)?;
    let rest = line[start + prefix.len()..].trim_end();
    let (passed, failed) = rest.split_once(", ")?;
    let passed = passed.strip_suffix(" passed")?.parse().ok()?;
    let failed = failed.strip_suffix(" failed")?.parse().ok()?;
    Some(ResultLine { passed, failed })
}

/// Collects the TEST lines and the first RESULT line of `suite` from a console transcript.
pub fn parse_console(suite: &str, console: &str) -> Transcript {
    let mut transcript = Transcript::default();
    for line in console.lines() {
        if let Some(test) = parse_test_line(suite, line) {
            if transcript.result.is_none() {
                transcript.tests.push(test);
            }
        } else if let Some(result) = parse_result_line(suite, line) {
            transcript.result.get_or_insert(result);
        }
    }
    transcript
}

/// How a run ended. QEMU never enables semihosting, so its own exit status is 0 whenever the
/// hypervisor powers the machine off: the hypervisor's status comes from its exit status line
/// ([`stagehand_abi::exit_status`]) on its UART.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Exit {
    /// The hypervisor wrote its exit status line with this status, and QEMU exited with status 0.
    Status(u8),
    /// QEMU exited with status 0, but the hypervisor wrote no exit status line (it stopped
    /// without one, e.g. on a guest reset under `-no-reboot`, or died before its UART was up).
    NoStatusLine,
    /// QEMU itself failed: it exited with this non-zero status (`None`: killed by a signal).
    QemuFailed(Option<i32>),
    /// The runner killed QEMU after this many seconds.
    TimedOut(u64),
    /// QEMU could not be started.
    NotStarted(String),
}

impl Exit {
    /// How a run ended whose QEMU process exited by itself with `process_status` (`None`:
    /// killed by a signal), given the text of the hypervisor's UART (its log file, or the
    /// console when the UART is shared): the last exit status line there counts.
    pub fn of_run(process_status: Option<i32>, hypervisor_uart: &str) -> Exit {
        match process_status {
            Some(0) => match stagehand_abi::exit_status::last_in(hypervisor_uart) {
                Some(status) => Exit::Status(status),
                None => Exit::NoStatusLine,
            },
            other => Exit::QemuFailed(other),
        }
    }

    /// What went wrong, as the end of a sentence; `None` for a clean end (status 0).
    pub fn problem(&self) -> Option<String> {
        Some(match self {
            Exit::Status(0) => return None,
            Exit::Status(status) => format!("the hypervisor ended with exit status {status}"),
            Exit::NoStatusLine => {
                String::from("QEMU exited without the hypervisor's exit status line")
            }
            Exit::QemuFailed(Some(code)) => format!("QEMU exited with status {code}"),
            Exit::QemuFailed(None) => String::from("QEMU was killed by a signal"),
            Exit::TimedOut(seconds) => format!("timed out after {seconds} s; QEMU killed"),
            Exit::NotStarted(why) => format!("QEMU did not start: {why}"),
        })
    }
}

/// Judges one suite: the guest's own outcomes, plus one failure (named `<suite>/<what>`) for
/// each way the run itself went wrong: timeout, a non-zero or missing hypervisor exit status,
/// a failure of QEMU itself, no RESULT line, a RESULT line whose counts disagree with the TEST
/// lines, or no test at all.
pub fn judge(suite: &str, transcript: &Transcript, exit: &Exit) -> Vec<TestOutcome> {
    let mut outcomes = transcript.tests.clone();
    if let Some(problem) = exit.problem() {
        outcomes.push(TestOutcome::fail(format!("{suite}/run"), problem));
    }
    let passed = transcript
        .tests
        .iter()
        .filter(|t| t.failure.is_none())
        .count() as u32;
    let failed = transcript.tests.len() as u32 - passed;
    match transcript.result {
        None => outcomes.push(TestOutcome::fail(
            format!("{suite}/result"),
            format!(
                "no RESULT line (after {} TEST line(s))",
                transcript.tests.len()
            ),
        )),
        Some(result) if result.passed != passed || result.failed != failed => {
            outcomes.push(TestOutcome::fail(
                format!("{suite}/result"),
                format!(
                    "RESULT says {} passed, {} failed but the TEST lines say {} passed, {} failed",
                    result.passed, result.failed, passed, failed
                ),
            ))
        }
        Some(_) if transcript.tests.is_empty() => outcomes.push(TestOutcome::fail(
            format!("{suite}/result"),
            "the suite ran no test",
        )),
        Some(_) => {}
    }
    outcomes
}

/// Tallies passes and failures.
pub fn totals(outcomes: &[TestOutcome]) -> (u64, u64) {
    let failed = outcomes.iter().filter(|o| o.failure.is_some()).count() as u64;
    (outcomes.len() as u64 - failed, failed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_pass_and_fail_lines() {
        assert_eq!(
            parse_test_line("dt", "TEST dt/no_smmu: PASS"),
            Some(TestOutcome::pass("dt/no_smmu"))
        );
        assert_eq!(
            parse_test_line("dt", "TEST dt/no_smmu: PASS\r"),
            Some(TestOutcome::pass("dt/no_smmu"))
        );
        assert_eq!(
            parse_test_line(
                "dt",
                "TEST dt/one_pl011: FAIL PL011 nodes: got 2, expected 1"
            ),
            Some(TestOutcome::fail(
                "dt/one_pl011",
                "PL011 nodes: got 2, expected 1"
            ))
        );
        assert_eq!(
            parse_test_line("dt", "TEST dt/x: FAIL"),
            Some(TestOutcome::fail("dt/x", "(no reason given)"))
        );
    }

    #[test]
    fn ignores_other_suites_and_malformed_lines() {
        assert_eq!(parse_test_line("dt", "TEST smccc/version: PASS"), None);
        assert_eq!(parse_test_line("dt", "TEST dt/: PASS"), None);
        assert_eq!(parse_test_line("dt", "TEST dt/a b: PASS"), None);
        assert_eq!(parse_test_line("dt", "TEST dt/a: MAYBE"), None);
        assert_eq!(parse_test_line("dt", "TEST dt/a PASS"), None);
        assert_eq!(parse_test_line("dt", "hello"), None);
    }

    #[test]
    fn tolerates_text_before_the_marker() {
        assert_eq!(
            parse_test_line("linux", "[    3.2] random: crng initTEST linux/shell: PASS"),
            Some(TestOutcome::pass("linux/shell"))
        );
    }

    #[test]
    fn parses_result_lines() {
        assert_eq!(
            parse_result_line("smccc", "RESULT smccc: 9 passed, 1 failed\r"),
            Some(ResultLine {
                passed: 9,
                failed: 1
            })
        );
        assert_eq!(
            parse_result_line("smccc", "RESULT dt: 9 passed, 1 failed"),
            None
        );
        assert_eq!(
            parse_result_line("smccc", "RESULT smccc: nine passed, 1 failed"),
            None
        );
        assert_eq!(parse_result_line("smccc", "RESULT smccc: 9 passed"), None);
    }

    const GOOD: &str =
        "boot noise\nTEST s/a: PASS\nTEST s/b: FAIL broke\nRESULT s: 1 passed, 1 failed\n";

    #[test]
    fn a_clean_run_keeps_the_guest_outcomes() {
        let transcript = parse_console("s", GOOD);
        assert_eq!(
            transcript.result,
            Some(ResultLine {
                passed: 1,
                failed: 1
            })
        );
        let outcomes = judge("s", &transcript, &Exit::Status(0));
        assert_eq!(
            outcomes,
            vec![TestOutcome::pass("s/a"), TestOutcome::fail("s/b", "broke")]
        );
        assert_eq!(totals(&outcomes), (1, 1));
        assert_eq!(outcomes[1].line(), "FAIL s/b: broke");
        assert_eq!(outcomes[0].line(), "PASS s/a");
    }

    #[test]
    fn a_missing_result_line_is_a_failure() {
        let transcript = parse_console("s", "TEST s/a: PASS\n");
        let outcomes = judge("s", &transcript, &Exit::Status(0));
        assert_eq!(totals(&outcomes), (1, 1));
        assert_eq!(outcomes[1].name, "s/result");
        assert!(outcomes[1]
            .failure
            .as_deref()
            .unwrap()
            .contains("no RESULT line"));
    }

    #[test]
    fn disagreeing_counts_are_a_failure() {
        let transcript = parse_console("s", "TEST s/a: PASS\nRESULT s: 2 passed, 0 failed\n");
        let outcomes = judge("s", &transcript, &Exit::Status(0));
        assert_eq!(totals(&outcomes), (1, 1));
        assert!(outcomes[1]
            .failure
            .as_deref()
            .unwrap()
            .contains("RESULT says 2 passed"));
    }

    #[test]
    fn timeouts_and_bad_exits_are_failures() {
        let transcript = parse_console("s", GOOD);
        let timed_out = judge("s", &transcript, &Exit::TimedOut(60));
        assert_eq!(totals(&timed_out), (1, 2));
        assert!(timed_out[2]
            .failure
            .as_deref()
            .unwrap()
            .contains("timed out after 60 s"));
        let bad_exit = judge("s", &transcript, &Exit::Status(3));
        assert_eq!(
            bad_exit[2].line(),
            "FAIL s/run: the hypervisor ended with exit status 3"
        );
        let no_line = judge("s", &transcript, &Exit::NoStatusLine);
        assert_eq!(
            no_line[2].line(),
            "FAIL s/run: QEMU exited without the hypervisor's exit status line"
        );
        let qemu_failed = judge("s", &transcript, &Exit::QemuFailed(Some(1)));
        assert_eq!(
            qemu_failed[2].line(),
            "FAIL s/run: QEMU exited with status 1"
        );
        let killed = judge("s", &transcript, &Exit::QemuFailed(None));
        assert_eq!(killed[2].line(), "FAIL s/run: QEMU was killed by a signal");
        let not_started = judge(
            "s",
            &Transcript::default(),
            &Exit::NotStarted("no such file".into()),
        );
        assert_eq!(totals(&not_started), (0, 2));
    }

    #[test]
    fn the_status_comes_from_the_hypervisors_line() {
        let line = |status| format!("{}\r\n", stagehand_abi::exit_status::Line(status));
        let log = format!("[stagehand INFO ] guest powered off\r\n{}", line(0));
        assert_eq!(Exit::of_run(Some(0), &log), Exit::Status(0));
        assert_eq!(Exit::of_run(Some(0), &line(3)), Exit::Status(3));
        // A guest's forged line on a shared console is followed by the hypervisor's own.
        let shared = format!("{}TEST s/a: PASS\n{}", line(0), line(4));
        assert_eq!(Exit::of_run(Some(0), &shared), Exit::Status(4));
        // No line: abnormal, like a failed QEMU.
        assert_eq!(
            Exit::of_run(Some(0), "[stagehand INFO ] x\n"),
            Exit::NoStatusLine
        );
        assert_eq!(Exit::of_run(Some(0), ""), Exit::NoStatusLine);
        // QEMU's own failure wins over any line.
        assert_eq!(Exit::of_run(Some(1), &line(0)), Exit::QemuFailed(Some(1)));
        assert_eq!(Exit::of_run(None, &line(0)), Exit::QemuFailed(None));
        assert_eq!(Exit::Status(0).problem(), None);
        assert!(Exit::NoStatusLine.problem().is_some());
    }

    #[test]
    fn an_empty_suite_is_a_failure() {
        let transcript = parse_console("s", "RESULT s: 0 passed, 0 failed\n");
        let outcomes = judge("s", &transcript, &Exit::Status(0));
        assert_eq!(totals(&outcomes), (0, 1));
    }

    #[test]
    fn lines_after_the_result_are_not_counted() {
        let transcript = parse_console(
            "s",
            "TEST s/a: PASS\nRESULT s: 1 passed, 0 failed\nTEST s/b: PASS\n",
        );
        assert_eq!(transcript.tests.len(), 1);
        assert_eq!(totals(&judge("s", &transcript, &Exit::Status(0))), (1, 0));
    }
}
