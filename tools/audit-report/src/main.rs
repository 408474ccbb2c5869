//! `audit-report [FILE|-] [--svg FILE] [--html FILE] [--quiet]`: reads a stagehand audit stream
//! (a file, or standard input when FILE is `-` or absent), prints the report, writes the picture,
//! and exits 0 when every check passed, 1 when one failed, 2 on a usage or I/O error.

use std::io::Read;
use std::process::ExitCode;

const USAGE: &str = "usage: audit-report [FILE|-] [--svg FILE] [--html FILE] [--quiet]";

fn main() -> ExitCode {
    let mut input: Option<String> = None;
    let mut svg: Option<String> = None;
    let mut html: Option<String> = None;
    let mut quiet = false;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--svg" | "--html" => {
                let Some(path) = args.next() else {
                    eprintln!("audit-report: {arg} needs a file name\n{USAGE}");
                    return ExitCode::from(2);
                };
                if arg == "--svg" {
                    svg = Some(path);
                } else {
                    html = Some(path);
                }
            }
            "--quiet" | "-q" => quiet = true,
            "-h" | "--help" => {
                println!("{USAGE}");
                return ExitCode::SUCCESS;
            }
            other if input.is_none() && (other == "-" || !other.starts_with('-')) => {
                input = Some(other.to_string())
            }
            other => {
                eprintln!("audit-report: unexpected argument {other:?}\n{USAGE}");
                return ExitCode::from(2);
            }
        }
    }
    let mut bytes = Vec::new();
    let read = match input.as_deref() {
        None | Some("-") => std::io::stdin().read_to_end(&mut bytes).map(|_| ()),
        Some(path) => std::fs::read(path).map(|b| bytes = b),
    };
    if let Err(error) = read {
        eprintln!(
            "audit-report: {}: {error}",
            input.as_deref().unwrap_or("stdin")
        );
        return ExitCode::from(2);
    }
    let report = audit_report::analyse(&String::from_utf8_lossy(&bytes));
    if !quiet {
        print!("{}", report.summary());
    }
    for (path, text) in [(svg, report.svg()), (html, report.html())] {
        if let Some(path) = path {
            if let Err(error) = std::fs::write(&path, text) {
                eprintln!("audit-report: {path}: {error}");
                return ExitCode::from(2);
            }
            if !quiet {
                println!("picture: {path}");
            }
        }
    }
    if report.passed() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
