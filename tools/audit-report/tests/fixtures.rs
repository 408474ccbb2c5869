//! Recorded-stream fixtures under `tests/fixtures/`, made by the hypervisor's own encoder
//! (`hyp_core::audit::AuditLog`) with guest-console and log noise between the records, and the
//! verdict the tool must give on each. The files are regenerated and compared on every run: a
//! change of the encoder shows up as a diff; `AUDIT_REPORT_BLESS=1` rewrites them.

use std::path::PathBuf;

use audit_report::{analyse, Problem};
use hyp_core::audit::{
    Access, Attribute, AuditLog, CacheOp, DmaDirection, Event, Maintenance, StopReason, TlbiScope,
};
use stagehand_abi::audit::smmu_command;
use stagehand_abi::{function, Status};

/// Writes records as the hypervisor streams them, with noise around them.
struct Writer {
    log: AuditLog,
    text: String,
    time: u64,
}

impl Writer {
    fn new(capacity: usize) -> Self {
        Writer {
            log: AuditLog::new(1, capacity),
            text: String::from("[stagehand INFO ] stagehand 0.1.0 on CPU 0\n"),
            time: 1000,
        }
    }

    fn record(&mut self, event: Event) {
        self.record_held(event);
        self.flush();
    }

    /// Records without streaming (a UART shared with a running guest).
    fn record_held(&mut self, event: Event) {
        self.time += 250;
        self.log.record(self.time, 0, &event);
    }

    fn flush(&mut self) {
        let lines: Vec<String> = self
            .log
            .take_unstreamed(self.time, 0)
            .map(|r| format!("[stagehand INFO ] {r}\n"))
            .collect();
        for line in lines {
            self.text.push_str(&line);
        }
    }

    fn noise(&mut self, line: &str) {
        self.text.push_str(line);
        self.text.push('\n');
    }
}

const BUFFER: u64 = 0x4020_0000;
const DMA_BUFFER: u64 = 0x4040_0000;

fn good_nc() -> Maintenance {
    Maintenance {
        cmo: Some(CacheOp::CleanInvalidate),
        cmo_lines: 128,
        tlbi: TlbiScope::ByIpa,
        tlbi_count: 3,
        break_before_make: true,
        hypervisor_alias: true,
        ..Maintenance::default()
    }
}

fn set_attr(old: Attribute, new: Attribute, maintenance: Maintenance) -> Event {
    Event::AttributeChange {
        ipa: BUFFER,
        size: 0x2000,
        old,
        new,
        maintenance,
        status: 0,
    }
}

/// A run a driver would make: NC buffer, DMA round trip, back to WB, a refusal, faults.
fn clean() -> String {
    let mut w = Writer::new(64);
    w.record(Event::GuestStart {
        entry: 0x4008_0000,
        ram: 0x1000_0000,
    });
    w.noise("guest: hello from the console");
    w.record(Event::Mark { tag: 0x51 });
    w.record(set_attr(
        Attribute::WriteBack,
        Attribute::NonCacheable,
        good_nc(),
    ));
    w.record(Event::DmaMap {
        stream_id: 0x10,
        ipa: DMA_BUFFER,
        size: 0x1000,
        direction: DmaDirection::FromDevice,
        handle: 1,
        attribute: None,
        maintenance: Maintenance {
            cmo: Some(CacheOp::Invalidate),
            cmo_lines: 64,
            smmu_commands: 2,
            smmu_kinds: smmu_command::CFGI_STE | smmu_command::SYNC,
            ..Maintenance::default()
        },
        status: 0,
    });
    w.noise("[stagehand DEBUG] vCPU 1 on at 0x40080064");
    w.record(Event::DmaSync {
        stream_id: 0x10,
        handle: 1,
        ipa: DMA_BUFFER,
        size: 0x1000,
        for_device: false,
        maintenance: Maintenance {
            cmo: Some(CacheOp::Invalidate),
            cmo_lines: 64,
            ..Maintenance::default()
        },
        status: 0,
    });
    w.record(Event::SmmuFault {
        stream_id: 0x10,
        ipa: 0x4100_0000,
        access: Access::Write,
        event: 0x10,
        stage2: true,
    });
    w.record(Event::RefusedRange {
        function: function::MEM_SET_ATTR,
        status: Status::Busy.code(),
        ipa: DMA_BUFFER,
        size: 0x1000,
    });
    w.record(Event::DmaUnmap {
        stream_id: 0x10,
        handle: 1,
        ipa: DMA_BUFFER,
        size: 0x1000,
        direction: DmaDirection::FromDevice,
        maintenance: Maintenance {
            cmo: Some(CacheOp::Invalidate),
            cmo_lines: 64,
            smmu_commands: 2,
            smmu_kinds: smmu_command::TLBI_S2_IPA | smmu_command::SYNC,
            ..Maintenance::default()
        },
        status: 0,
    });
    w.record(set_attr(
        Attribute::NonCacheable,
        Attribute::WriteBack,
        Maintenance {
            cmo: Some(CacheOp::Invalidate),
            ..good_nc()
        },
    ));
    w.record(Event::Cmo {
        function: function::CACHE_OP,
        address: BUFFER,
        size: 0x40,
        op: CacheOp::CleanInvalidate,
        lines: 1,
        widened: true,
        va: None,
        status: 0,
    });
    w.record(Event::Stage2Fault {
        ipa: 0x905_0000,
        access: Access::Read,
    });
    w.record(Event::Refused {
        function: 0xC600_0FFF,
        status: Status::NotSupported.code(),
    });
    w.noise("TEST demo/x: PASS");
    w.record(Event::GuestStop {
        reason: StopReason::SystemOff,
    });
    w.text
}

fn drop_line_containing(text: &str, needle: &str) -> String {
    let mut dropped = false;
    text.lines()
        .filter(|line| {
            let hit = !dropped && line.contains(needle);
            dropped |= hit;
            !hit
        })
        .map(|l| format!("{l}\n"))
        .collect()
}

fn gap() -> String {
    drop_line_containing(&clean(), "kind=dma-sync")
}

fn altered() -> String {
    // The NC buffer's size edited after the fact.
    clean().replacen(
        "kind=attr flags=0x3 fn=0xc6000010 ipa=0x40200000 size=0x2000",
        "kind=attr flags=0x3 fn=0xc6000010 ipa=0x40200000 size=0x1000",
        1,
    )
}

fn reordered() -> String {
    let text = clean();
    let mut lines: Vec<&str> = text.lines().collect();
    let a = lines.iter().position(|l| l.contains("kind=mark")).unwrap();
    let b = lines.iter().position(|l| l.contains("kind=attr")).unwrap();
    lines.swap(a, b);
    lines.iter().map(|l| format!("{l}\n")).collect()
}

fn nc_without_clean() -> String {
    let mut w = Writer::new(64);
    w.record(Event::GuestStart {
        entry: 0x4008_0000,
        ram: 0x1000_0000,
    });
    w.record(set_attr(
        Attribute::WriteBack,
        Attribute::NonCacheable,
        Maintenance {
            cmo: None,
            cmo_lines: 0,
            ..good_nc()
        },
    ));
    w.text
}

fn pinned_change() -> String {
    let mut w = Writer::new(64);
    w.record(Event::DmaMap {
        stream_id: 0x10,
        ipa: BUFFER,
        size: 0x1000,
        direction: DmaDirection::Bidirectional,
        handle: 9,
        attribute: None,
        maintenance: Maintenance::default(),
        status: 0,
    });
    w.record(set_attr(
        Attribute::WriteBack,
        Attribute::NonCacheable,
        good_nc(),
    ));
    w.text
}

/// A guest marks past a small ring; each record is streamed at once, so the stream is whole
/// and the overflow records report ring losses only.
fn ring_overflow() -> String {
    let mut w = Writer::new(8);
    w.record(Event::GuestStart {
        entry: 0x4008_0000,
        ram: 0x1000_0000,
    });
    for tag in 0..30 {
        w.record(Event::Mark { tag });
    }
    w.log.report_losses(w.time, 0);
    w.flush();
    w.text
}

/// Records held (shared UART) while more are written than the ring holds: the stream has a gap,
/// and a STREAM_LOSS overflow record reports exactly it.
fn stream_overflow() -> String {
    let mut w = Writer::new(8);
    w.record(Event::GuestStart {
        entry: 0x4008_0000,
        ram: 0x1000_0000,
    });
    for tag in 0..20 {
        w.record_held(Event::Mark { tag });
    }
    w.record_held(Event::GuestStop {
        reason: StopReason::SystemOff,
    });
    w.flush();
    w.text
}

fn fixture(name: &str, text: &str) -> String {
    let path: PathBuf = [env!("CARGO_MANIFEST_DIR"), "tests", "fixtures", name]
        .iter()
        .collect();
    let bless = std::env::var_os("AUDIT_REPORT_BLESS").is_some();
    match std::fs::read_to_string(&path) {
        Ok(stored) if !bless => {
            assert_eq!(
                stored, text,
                "{name} differs from what the encoder makes now; rerun with AUDIT_REPORT_BLESS=1 if the change is meant"
            );
            stored
        }
        _ => {
            std::fs::write(&path, text).unwrap();
            text.to_string()
        }
    }
}

#[test]
fn clean_stream_passes() {
    let report = analyse(&fixture("clean.log", &clean()));
    assert!(report.passed(), "{}", report.summary());
    assert_eq!(report.chain.verified, report.stream.records);
    assert_eq!(report.replay.refusals.len(), 2);
    assert_eq!(report.replay.faults.len(), 2);
    let buffer = report
        .replay
        .buffers
        .iter()
        .find(|b| b.ipa == BUFFER)
        .unwrap();
    assert_eq!(buffer.history.len(), 2, "{:?}", buffer.history);
    assert!(buffer.states.iter().any(|(_, s)| s.non_cacheable));
    let svg = report.svg();
    assert!(
        svg.starts_with("<svg") && svg.contains("#f08c00"),
        "NC drawn"
    );
    assert!(report.html().contains("CHECKS PASSED"));
}

#[test]
fn gap_is_flagged() {
    let report = analyse(&fixture("gap.log", &gap()));
    assert!(!report.passed());
    assert!(
        matches!(
            report.problems()[0],
            Problem::Gap {
                first: 4,
                end: 5,
                ..
            }
        ),
        "{}",
        report.summary()
    );
}

#[test]
fn altered_record_is_flagged() {
    let report = analyse(&fixture("altered.log", &altered()));
    assert!(!report.passed());
    assert!(
        matches!(report.problems()[0], Problem::Altered { sequence: 2, .. }),
        "{}",
        report.summary()
    );
}

#[test]
fn reordering_is_flagged() {
    let report = analyse(&fixture("reordered.log", &reordered()));
    assert!(!report.passed());
    assert!(
        report
            .problems()
            .iter()
            .any(|p| matches!(p, Problem::OutOfOrder { sequence: 1, .. })),
        "{}",
        report.summary()
    );
}

#[test]
fn nc_without_clean_is_flagged() {
    let report = analyse(&fixture("nc-without-clean.log", &nc_without_clean()));
    assert!(!report.passed());
    assert!(
        report.chain.problems.is_empty(),
        "the chain itself is intact"
    );
    assert!(
        matches!(
            report.problems()[0],
            Problem::Invariant {
                invariant: "I2",
                sequence: 1,
                ..
            }
        ),
        "{}",
        report.summary()
    );
}

#[test]
fn attribute_change_of_a_pinned_page_is_flagged() {
    let report = analyse(&fixture("pinned-change.log", &pinned_change()));
    assert!(
        report.problems().iter().any(|p| matches!(
            p,
            Problem::Invariant {
                invariant: "I4",
                ..
            }
        )),
        "{}",
        report.summary()
    );
}

#[test]
fn ring_overflow_is_reported_not_flagged() {
    let report = analyse(&fixture("ring-overflow.log", &ring_overflow()));
    assert!(report.passed(), "{}", report.summary());
    let lost: u64 = report.chain.losses.iter().map(|l| l.count).sum();
    assert!(lost > 0);
    assert!(report.chain.losses.iter().all(|l| !l.from_stream));
    assert!(report.summary().contains("lost from the ring"));
}

#[test]
fn stream_overflow_gap_is_reported_not_flagged() {
    let text = fixture("stream-overflow.log", &stream_overflow());
    let report = analyse(&text);
    assert!(report.passed(), "{}", report.summary());
    let loss = report.chain.losses.iter().find(|l| l.from_stream).unwrap();
    assert_eq!(loss.first, 1, "everything after the streamed guest start");
    assert_eq!(
        report.chain.verified, report.stream.records,
        "the chain is checked across the loss from the overflow record's anchor"
    );
    // The same stream with one more record cut is not excused.
    let cut = drop_line_containing(&text, "kind=guest-stop");
    let cut = drop_line_containing(&cut, "kind=mark");
    assert!(!analyse(&cut).passed());
}

/// Sub-page buffers of one strict device in one page, in both directions (ABI 1.1): the
/// device's rights are the counted union of the live mappings', so an unmap that leaves the
/// union as it was needs no SMMU command, and one that narrows it needs the CMD_SYNC.
fn shared_page(sync_on_narrowing: bool) -> String {
    let mut w = Writer::new(64);
    let page = DMA_BUFFER;
    let map = |ipa, size, direction, handle, smmu_kinds: u16| Event::DmaMap {
        stream_id: 0x10,
        ipa,
        size,
        direction,
        handle,
        attribute: Some(Attribute::WriteBack),
        maintenance: Maintenance {
            smmu_commands: smmu_kinds.count_ones(),
            smmu_kinds,
            ..Maintenance::default()
        },
        status: 0,
    };
    let unmap = |ipa, size, direction, handle, smmu_kinds: u16| Event::DmaUnmap {
        stream_id: 0x10,
        handle,
        ipa,
        size,
        direction,
        maintenance: Maintenance {
            smmu_commands: smmu_kinds.count_ones(),
            smmu_kinds,
            ..Maintenance::default()
        },
        status: 0,
    };
    let widen = smmu_command::TLBI_S2_IPA | smmu_command::SYNC;
    // A request header (read), a status byte (write: the page's entry is widened in place) and
    // a second written buffer (no change).
    w.record(map(page + 0x100, 16, DmaDirection::ToDevice, 1, 0));
    w.record(map(page + 0x110, 1, DmaDirection::FromDevice, 2, widen));
    w.record(map(page + 0x200, 0x10, DmaDirection::FromDevice, 3, 0));
    // The status byte goes: the other written buffer keeps the union as it was.
    w.record(unmap(page + 0x110, 1, DmaDirection::FromDevice, 2, 0));
    // The last written buffer goes: write leaves the page's entry.
    let narrowing = if sync_on_narrowing {
        widen
    } else {
        smmu_command::TLBI_S2_IPA
    };
    w.record(unmap(
        page + 0x200,
        0x10,
        DmaDirection::FromDevice,
        3,
        narrowing,
    ));
    w.record(unmap(page + 0x100, 16, DmaDirection::ToDevice, 1, widen));
    w.text
}

#[test]
fn counted_rights_need_a_sync_only_when_the_union_narrows() {
    let report = analyse(&shared_page(true));
    assert!(report.passed(), "{}", report.summary());
    let report = analyse(&shared_page(false));
    let all = report.problems();
    let problems: Vec<_> = all
        .iter()
        .filter(|p| {
            matches!(
                p,
                Problem::Invariant {
                    invariant: "I4",
                    ..
                }
            )
        })
        .collect();
    assert_eq!(problems.len(), 1, "{}", report.summary());
    assert!(
        matches!(problems[0], Problem::Invariant { sequence: 4, .. }),
        "{}",
        report.summary()
    );
}
