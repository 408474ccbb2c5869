//! `synthesise [RECORDS] [BUFFERS]`: writes a valid audit stream of at least RECORDS records
//! (default 1,000,000) about BUFFERS buffers (default 16) to standard output, for timing
//! `audit-report` on a long stream (docs/bench.md).

#[path = "../tests/synth/mod.rs"]
mod synth;

use std::io::{BufWriter, Write};

fn main() {
    let mut args = std::env::args().skip(1);
    let records = args
        .next()
        .map_or(1_000_000, |a| a.parse().expect("RECORDS is a number"));
    let buffers = args
        .next()
        .map_or(16, |a| a.parse().expect("BUFFERS is a number"));
    let stdout = std::io::stdout();
    let mut writer = synth::Writer::new(BufWriter::new(stdout.lock()));
    synth::synthesise(&mut writer, records, buffers);
    writer.into_inner().flush().expect("write the stream");
}
