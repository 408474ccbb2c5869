//! The end-to-end audit check: after a suite has run, its hypervisor log (the audit stream) goes
//! through `audit-report`, which must find the sequence and hash chain intact and the attribute
//! invariants replaying clean, and must draw the picture of the run.

use std::path::Path;

use crate::protocol::TestOutcome;

/// Suites whose audit stream is replayed after they run.
pub const REPLAYED: &[&str] = &[
    "smccc",
    "audit",
    "dma",
    "dma-shared",
    "containment",
    "gic",
    "hostile",
    "hostile-mixed",
    "hostile-dma",
    "hostile-fuzz",
    "linux-io",
    "linux-io-strict",
    "linux-io-quota",
    "linux-module",
];

/// Whether suite `name` gets the audit checks.
pub fn applies(name: &str) -> bool {
    REPLAYED.contains(&name)
}

/// Two outcomes for suite `suite`: `<suite>/audit-replay` (the stream in
/// `<logs>/<suite>.hyp.log` passes every check of the tool) and `<suite>/audit-picture` (the
/// picture `<logs>/<suite>.audit.svg` was written and is not empty).
pub fn check(suite: &str, logs: &Path) -> Vec<TestOutcome> {
    let log = logs.join(format!("{suite}.hyp.log"));
    let replay = format!("{suite}/audit-replay");
    let picture_name = format!("{suite}/audit-picture");
    let text = match std::fs::read(&log) {
        Ok(bytes) => String::from_utf8_lossy(&bytes).into_owned(),
        Err(error) => {
            let why = format!("{}: {error}", log.display());
            return vec![
                TestOutcome::fail(replay, why.clone()),
                TestOutcome::fail(picture_name, why),
            ];
        }
    };
    let report = audit_report::analyse(&text);
    let summary_path = logs.join(format!("{suite}.audit.txt"));
    let _ = std::fs::write(&summary_path, report.summary());
    let replayed = if report.passed() {
        TestOutcome::pass(replay)
    } else {
        let first = report.problems().first().map_or_else(
            || String::from("no audit records in the log"),
            |p| p.to_string(),
        );
        TestOutcome::fail(
            replay,
            format!("{first} (report: {})", summary_path.display()),
        )
    };
    let picture = logs.join(format!("{suite}.audit.svg"));
    let drawn = match std::fs::write(&picture, report.svg())
        .and_then(|()| std::fs::metadata(&picture))
    {
        Ok(meta) if meta.len() > 0 => TestOutcome::pass(picture_name),
        Ok(_) => TestOutcome::fail(picture_name, format!("{} is empty", picture.display())),
        Err(error) => TestOutcome::fail(picture_name, format!("{}: {error}", picture.display())),
    };
    vec![replayed, drawn]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_log_fails_both_checks() {
        let outcomes = check("nosuch", Path::new("/nonexistent"));
        assert_eq!(outcomes.len(), 2);
        assert!(outcomes.iter().all(|o| o.failure.is_some()));
    }

    #[test]
    fn replayed_suites_exist() {
        for name in REPLAYED {
            assert!(crate::suites::find(name).is_some(), "{name}");
        }
    }
}
