//! Suite `audit`: AUDIT_MARK and AUDIT_READ as a guest driver sees them: increasing sequence
//! numbers, records that say what the guest did (marks with their tags, a refused call with its
//! status) in a gap-free, hash-chained run, a clear status for each bad buffer, and a ring that
//! overflows with the right loss count and an overflow record.
#![no_std]
#![no_main]

extern crate alloc;

use alloc::string::String;
use alloc::vec;
use alloc::vec::Vec;

use guest_rt::{check, check_eq, println};
use guest_suites::hypercall;
use stagehand_abi::audit::{flag, kind, Record, RECORD_SIZE};
use stagehand_abi::{function, Regs, Status};

guest_rt::main!(main);

fn main() -> ! {
    guest_rt::test::run_suite(
        "audit",
        &guest_rt::tests![
            marks_get_increasing_sequence_numbers,
            read_returns_what_the_guest_did,
            bad_buffers_get_their_status,
            read_beyond_the_newest_returns_nothing,
            attribute_changes_are_recorded,
            ring_overflow_is_counted_and_recorded,
        ],
    )
}

/// A function ID in the hypervisor's range that no call uses.
const UNUSED_ID: u32 = 0xC600_0FFF;
/// More marks than the hypervisor's ring holds (4096 records).
const OVERFLOW_MARKS: u64 = 5000;

fn mark(tag: u64) -> Result<u64, String> {
    let regs = hypercall(function::AUDIT_MARK, &[tag]);
    check_eq!(
        regs.status(),
        Some(Status::Success),
        "AUDIT_MARK status (x0 = {:#x})",
        regs.x0
    );
    Ok(regs.x1)
}

/// A buffer of `records` records, 8-byte aligned (guest VA = IPA: RAM is identity-mapped).
fn buffer(records: usize) -> Vec<u64> {
    vec![0u64; records * RECORD_SIZE / 8]
}

fn read_into(buffer: &mut [u64], first: u64) -> Regs {
    hypercall(
        function::AUDIT_READ,
        &[buffer.as_mut_ptr() as u64, (buffer.len() * 8) as u64, first],
    )
}

/// The records of a successful read.
fn records(buffer: &[u64], regs: &Regs) -> Result<Vec<Record>, String> {
    check_eq!(
        regs.status(),
        Some(Status::Success),
        "AUDIT_READ status (x0 = {:#x})",
        regs.x0
    );
    let bytes: Vec<u8> = buffer.iter().flat_map(|w| w.to_le_bytes()).collect();
    let count = regs.x1 as usize;
    check!(
        count * RECORD_SIZE <= bytes.len(),
        "AUDIT_READ copied {} records into a smaller buffer",
        count
    );
    Ok((0..count)
        .filter_map(|i| Record::parse(&bytes[i * RECORD_SIZE..(i + 1) * RECORD_SIZE]))
        .collect())
}

/// Sequence numbers run without gaps and each hash chains to the previous record's.
fn check_run(records: &[Record]) -> Result<(), String> {
    for pair in records.windows(2) {
        check_eq!(
            pair[1].sequence.get(),
            pair[0].sequence.get() + 1,
            "sequence after {}",
            pair[0].sequence.get()
        );
        check!(
            pair[1].hash_follows(pair[0].hash.get()),
            "hash chain broken at {}",
            pair[1].sequence.get()
        );
    }
    Ok(())
}

fn marks_get_increasing_sequence_numbers() -> Result<(), String> {
    let first = mark(1)?;
    let second = mark(2)?;
    let third = mark(3)?;
    check_eq!(
        (second, third),
        (first + 1, first + 2),
        "sequence numbers after {}",
        first
    );
    Ok(())
}

fn read_returns_what_the_guest_did() -> Result<(), String> {
    let start = mark(0xA11CE)?;
    let refused = hypercall(UNUSED_ID, &[]);
    check_eq!(refused.status(), Some(Status::NotSupported), "unused ID");
    mark(0xB0B)?;
    let mut buf = buffer(8);
    let regs = read_into(&mut buf, start);
    let got = records(&buf, &regs)?;
    check_eq!(got.len(), 3, "records from {}", start);
    check_eq!(regs.x2, start + 3, "next sequence");
    check_run(&got)?;
    check_eq!(got[0].sequence.get(), start, "first sequence");
    check_eq!(
        (got[0].kind, got[0].tag.get()),
        (kind::MARK, 0xA11CE),
        "first record (kind, tag)"
    );
    check_eq!(
        (got[1].kind, got[1].function.get(), got[1].status.get()),
        (kind::REFUSED, UNUSED_ID, Status::NotSupported.code()),
        "second record (kind, function, status)"
    );
    check_eq!(
        (got[2].kind, got[2].tag.get()),
        (kind::MARK, 0xB0B),
        "third record (kind, tag)"
    );
    check!(
        got.iter().all(|r| r.vm.get() == 1 && r.version.get() == 1),
        "vm and version"
    );
    Ok(())
}

fn bad_buffers_get_their_status() -> Result<(), String> {
    let ram = guest_rt::dt::main_ram();
    let mut good = buffer(2);
    let aligned = good.as_mut_ptr() as u64;
    let cases: [(&str, u64, u64, Status); 6] = [
        ("below RAM", 0x1000, 256, Status::OutOfRange),
        (
            "across the end of RAM",
            ram.end() as u64 - 128,
            256,
            Status::OutOfRange,
        ),
        ("wrapping", u64::MAX - 127, 256, Status::OutOfRange),
        ("zero size", aligned, 0, Status::InvalidParameter),
        ("misaligned", aligned + 4, 128, Status::Alignment),
        (
            "smaller than a record",
            aligned,
            64,
            Status::InvalidParameter,
        ),
    ];
    let before = mark(0xBAD)?;
    for (what, ipa, size, expected) in cases {
        let regs = hypercall(function::AUDIT_READ, &[ipa, size, 0]);
        check_eq!(
            regs.status(),
            Some(expected),
            "AUDIT_READ {} (x0 = {:#x})",
            what,
            regs.x0
        );
    }
    // Each refusal is itself a record, with the buffer it refused.
    let mut buf = buffer(16);
    let regs = read_into(&mut buf, before + 1);
    let got = records(&buf, &regs)?;
    check_eq!(got.len(), cases.len(), "refusal records");
    check_run(&got)?;
    for (record, (what, ipa, size, expected)) in got.iter().zip(cases) {
        check_eq!(
            (
                record.kind,
                record.function.get(),
                record.status.get(),
                record.ipa.get(),
                record.size.get()
            ),
            (
                kind::REFUSED,
                function::AUDIT_READ,
                expected.code(),
                ipa,
                size
            ),
            "record of the {} refusal",
            what
        );
    }
    Ok(())
}

fn read_beyond_the_newest_returns_nothing() -> Result<(), String> {
    let last = mark(0xE0F)?;
    let mut buf = buffer(4);
    let regs = read_into(&mut buf, u64::MAX);
    check_eq!(regs.status(), Some(Status::Success), "status");
    check_eq!(
        (regs.x1, regs.x2),
        (0, last + 1),
        "(copied, next) beyond the newest"
    );
    Ok(())
}

fn attribute_changes_are_recorded() -> Result<(), String> {
    // Two whole pages of our own, made NC and back to WB.
    let backing = vec![0u8; 3 * 4096];
    let ipa = (backing.as_ptr() as u64).next_multiple_of(4096);
    let start = mark(0x0A77)?;
    for (attribute, name) in [
        (stagehand_abi::attr::NORMAL_NC, "NC"),
        (stagehand_abi::attr::NORMAL_WB, "WB"),
    ] {
        let regs = hypercall(function::MEM_SET_ATTR, &[ipa, 0x2000, attribute]);
        check_eq!(
            (regs.status(), regs.x1),
            (Some(Status::Success), 0x2000),
            "MEM_SET_ATTR {} (x0 = {:#x})",
            name,
            regs.x0
        );
    }
    let mut buf = buffer(8);
    let regs = read_into(&mut buf, start);
    let got = records(&buf, &regs)?;
    check_eq!(got.len(), 3, "records from the mark on");
    check_run(&got)?;
    for (record, (old, new)) in got[1..].iter().zip([(0u8, 1u8), (1, 0)]) {
        check_eq!(
            (
                record.kind,
                record.ipa.get(),
                record.size.get(),
                record.old_attr,
                record.new_attr,
                record.status.get()
            ),
            (kind::ATTRIBUTE_CHANGE, ipa, 0x2000, old, new, 0),
            "record {}",
            record.sequence.get()
        );
        check!(
            record.flags.get() & flag::BREAK_BEFORE_MAKE != 0,
            "record {} shows no break-before-make",
            record.sequence.get()
        );
        check!(
            record.cmo_lines.get() > 0 && record.tlbi_count.get() > 0,
            "record {} shows no CMO or TLBI",
            record.sequence.get()
        );
    }
    drop(backing);
    Ok(())
}

fn ring_overflow_is_counted_and_recorded() -> Result<(), String> {
    // Sequence numbers keep increasing; once the ring is full an overflow record may take one.
    let mut previous = mark(0)?;
    for tag in 1..OVERFLOW_MARKS {
        let sequence = mark(tag)?;
        check!(
            sequence == previous + 1 || sequence == previous + 2,
            "mark {} got sequence {} after {}",
            tag,
            sequence,
            previous
        );
        previous = sequence;
    }
    let mut buf = buffer(64);
    let regs = read_into(&mut buf, 0);
    let got = records(&buf, &regs)?;
    let dropped = regs.x3;
    check!(
        dropped > 0,
        "no loss counted after {} marks",
        OVERFLOW_MARKS
    );
    check_eq!(
        got.first().map(|r| r.sequence.get()),
        Some(dropped),
        "a read from 0 starts at the oldest held, number `dropped`"
    );
    // Read the rest of the ring, chunk by chunk, from where each read says to go on, checking
    // each chunk and its join to the previous one (the guest heap cannot hold the whole ring).
    let mut held = 0u64;
    let mut last: Option<Record> = None;
    let mut overflow: Option<Record> = None;
    let mut chunk = got;
    let mut next = regs.x2;
    while !chunk.is_empty() {
        if let Some(previous) = last {
            check_run(&[previous, chunk[0]])?;
        }
        check_run(&chunk)?;
        held += chunk.len() as u64;
        last = chunk.last().copied();
        if let Some(found) = chunk
            .iter()
            .rev()
            .find(|r| r.kind == kind::OVERFLOW && r.flags.get() & flag::STREAM_LOSS == 0)
        {
            overflow = Some(*found);
        }
        let regs = read_into(&mut buf, next);
        chunk = records(&buf, &regs)?;
        check_eq!(regs.x3, dropped, "dropped count while nothing is lost");
        next = regs.x2;
    }
    check_eq!(dropped + held, next, "lost + held = everything written");
    check!(held <= 4096, "the ring holds {} records", held);
    let Some(overflow) = overflow else {
        return Err(String::from("no overflow record among the records held"));
    };
    check_eq!(
        overflow.detail.get() + overflow.dropped.get(),
        dropped,
        "the newest overflow record's (first lost + count) against AUDIT_READ's x3"
    );
    println!(
        "audit: {} records lost, {} held, overflow record {}",
        dropped,
        held,
        overflow.sequence.get()
    );
    Ok(())
}
