//! `audit-report [FILE|-] [--svg FILE] [--html FILE] [--quiet]`: reads a stagehand audit stream
//! (a file, or standard input when FILE is `-` or absent), prints the report, writes the picture,
//! and exits 0 when every check passed, 1 when one failed, 2 on a usage or I/O error.
//!
//! The stream is read twice, a line at a time; standard input is first copied to a temporary
//! file for that, so a stream of any length is checked in bounded memory.

use std::io::{BufReader, BufWriter, Seek, SeekFrom, Write};
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
    let report = match input.as_deref() {
        None | Some("-") => read_stdin(),
        Some(path) => std::fs::File::open(path)
            .and_then(|file| audit_report::analyse_reader(BufReader::new(file))),
    };
    let report = match report {
        Ok(report) => report,
        Err(error) => {
            eprintln!(
                "audit-report: {}: {error}",
                input.as_deref().unwrap_or("stdin")
            );
            return ExitCode::from(2);
        }
    };
    if !quiet {
        print!("{}", report.summary());
    }
    for (path, is_svg) in [(svg, true), (html, false)] {
        if let Some(path) = path {
            let written = std::fs::File::create(&path).and_then(|file| {
                let mut out = IoText::new(BufWriter::new(file));
                if is_svg {
                    report.write_svg(&mut out);
                } else {
                    report.write_html(&mut out);
                }
                out.finish()
            });
            if let Err(error) = written {
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

/// Checks standard input through a temporary file, removed afterwards.
fn read_stdin() -> std::io::Result<audit_report::Report> {
    let path = std::env::temp_dir().join(format!("audit-report-{}.log", std::process::id()));
    let result = (|| {
        let mut file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&path)?;
        std::io::copy(&mut std::io::stdin().lock(), &mut file)?;
        file.seek(SeekFrom::Start(0))?;
        audit_report::analyse_reader(BufReader::new(file))
    })();
    let _ = std::fs::remove_file(&path);
    result
}

/// Text written to a file, keeping the first I/O error for the end.
struct IoText<W: Write> {
    out: W,
    error: Option<std::io::Error>,
}

impl<W: Write> IoText<W> {
    fn new(out: W) -> Self {
        IoText { out, error: None }
    }

    fn finish(mut self) -> std::io::Result<()> {
        match self.error.take() {
            Some(error) => Err(error),
            None => self.out.flush(),
        }
    }
}

impl<W: Write> std::fmt::Write for IoText<W> {
    fn write_str(&mut self, text: &str) -> std::fmt::Result {
        if self.error.is_none() {
            if let Err(error) = self.out.write_all(text.as_bytes()) {
                self.error = Some(error);
            }
        }
        Ok(())
    }
}
