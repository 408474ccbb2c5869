//! Long streams: the tool checks them in time linear in the stream and keeps what grows with the
//! pages the records name, not with the records. Also the concurrent cases a correct hypervisor
//! produces and the replay must accept.

mod synth;

use std::io::Cursor;
use std::time::{Duration, Instant};

use audit_report::{analyse, analyse_reader, Report, COLUMNS, HISTORY_KEPT, KEPT};
use hyp_core::audit::{Attribute, DmaDirection, Event, Maintenance};
use stagehand_abi::audit::smmu_command;
use stagehand_abi::{function, Status};
use synth::{synthesise, Writer};

fn stream(records: u64, buffers: u64) -> Vec<u8> {
    let mut writer = Writer::new(Vec::new());
    synthesise(&mut writer, records, buffers);
    writer.into_inner()
}

fn check(bytes: Vec<u8>) -> Report {
    analyse_reader(Cursor::new(bytes)).expect("read from memory")
}

#[test]
fn a_long_valid_stream_checks_in_linear_time() {
    let bytes = stream(200_000, 16);
    let start = Instant::now();
    let report = check(bytes);
    let took = start.elapsed();
    assert!(report.passed(), "{}", report.summary());
    assert!(report.stream.records >= 200_000);
    assert_eq!(report.chain.verified, report.stream.records);
    // Superlinear versions took minutes here; a linear one takes about a second even in a debug
    // build on a busy machine.
    assert!(
        took < Duration::from_secs(30),
        "200,000 records took {took:?}"
    );
    // The picture is down-sampled: at most two shapes a column per buffer, whatever the length.
    let svg = report.svg();
    let bound = (report.replay.buffers.len() + 1) * 2 * COLUMNS as usize * 400;
    assert!(svg.len() < bound, "{} bytes of picture", svg.len());
    eprintln!("200,000 records checked in {took:?}");
}

#[test]
fn memory_follows_pages_not_records() {
    let short = check(stream(10_000, 16));
    let long = check(stream(100_000, 16));
    assert!(short.passed() && long.passed(), "{}", long.summary());
    // The same pages and buffers: the same model, however many records.
    assert_eq!(short.replay.page_runs, long.replay.page_runs);
    assert_eq!(short.replay.live_mappings, long.replay.live_mappings);
    assert_eq!(short.replay.buffers.len(), long.replay.buffers.len());
    // Everything else the report keeps has a bound that does not depend on the records.
    let buffers = long.replay.buffers.len();
    let bound = buffers * (1 + 2 * COLUMNS as usize + 2 * HISTORY_KEPT)
        + 6 * KEPT
        + 4 * COLUMNS as usize
        + 64
        + long.replay.page_runs
        + long.replay.live_mappings;
    assert!(
        long.replay.tracked_entries() <= bound,
        "{} entries kept for {} records",
        long.replay.tracked_entries(),
        long.stream.records
    );
    // And more pages do mean more entries.
    let wide = check(stream(10_000, 64));
    assert!(wide.replay.buffers.len() > short.replay.buffers.len());
}

#[test]
fn in_memory_and_streamed_reading_agree() {
    let bytes = stream(5_000, 4);
    let text = String::from_utf8(bytes.clone()).unwrap();
    assert_eq!(analyse(&text).summary(), check(bytes).summary());
}

fn toggle(old: Attribute, new: Attribute) -> Event {
    toggle_at(PAGE_IPA, old, new)
}

fn toggle_at(ipa: u64, old: Attribute, new: Attribute) -> Event {
    Event::AttributeChange {
        ipa,
        size: 0x1000,
        old,
        new,
        maintenance: if old == new {
            Maintenance::default()
        } else {
            Maintenance {
                cmo: Some(hyp_core::audit::CacheOp::CleanInvalidate),
                cmo_lines: 64,
                tlbi: hyp_core::audit::TlbiScope::ByIpa,
                tlbi_count: 1,
                break_before_make: true,
                hypervisor_alias: true,
                ..Maintenance::default()
            }
        },
        status: 0,
    }
}

const PAGE_IPA: u64 = 0x4030_0000;

fn dma(map: bool, handle: u64, ipa: u64, size: u64, attribute: Option<Attribute>) -> Event {
    let maintenance = Maintenance {
        smmu_commands: 2,
        smmu_kinds: smmu_command::TLBI_S2_IPA | smmu_command::SYNC,
        ..Maintenance::default()
    };
    if map {
        Event::DmaMap {
            stream_id: 0x20,
            ipa,
            size,
            direction: DmaDirection::Bidirectional,
            handle,
            attribute,
            maintenance,
            status: 0,
        }
    } else {
        Event::DmaUnmap {
            stream_id: 0x20,
            handle,
            ipa,
            size,
            direction: DmaDirection::Bidirectional,
            maintenance,
            status: 0,
        }
    }
}

/// Two vCPUs toggle one page's attribute while a third maps and unmaps it for DMA. Each record
/// takes its number under the lock that makes its change, so the stream is in the order the
/// changes became visible: a toggle of a mapped page is refused BUSY, a map sees the attribute
/// the last toggle left. The replay must find nothing.
#[test]
fn concurrent_toggles_and_dma_of_one_page_replay_clean() {
    let mut writer = Writer::new(Vec::new());
    let (wb, nc) = (Attribute::WriteBack, Attribute::NonCacheable);
    let mut attribute = wb;
    let mut mapped: Option<u64> = None;
    let mut handle = 100;
    let mut state = 0x2545_f491_4f6c_dd1du64;
    for _ in 0..5_000 {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        let vcpu = (state % 3) as u16;
        match vcpu {
            0 | 1 => {
                let wanted = if vcpu == 0 { nc } else { wb };
                if mapped.is_some() {
                    writer.record(
                        vcpu,
                        Event::RefusedRange {
                            function: function::MEM_SET_ATTR,
                            status: Status::Busy.code(),
                            ipa: PAGE_IPA,
                            size: 0x1000,
                        },
                    );
                } else {
                    writer.record(vcpu, toggle(attribute, wanted));
                    attribute = wanted;
                }
            }
            _ => match mapped.take() {
                Some(h) => writer.record(2, dma(false, h, PAGE_IPA, 0x1000, None)),
                None => {
                    handle += 1;
                    writer.record(2, dma(true, handle, PAGE_IPA, 0x1000, Some(attribute)));
                    mapped = Some(handle);
                }
            },
        }
    }
    let report = check(writer.into_inner());
    assert!(report.passed(), "{}", report.summary());
    assert!(
        report.replay.refusals.total() > 0,
        "some toggles met a mapped page"
    );
}

/// A strict map of a range that is part NC, part WB is one dma-map record per run, all with the
/// same handle; the unmap names the handle once and releases every run.
#[test]
fn a_map_of_several_runs_is_released_by_one_unmap() {
    let mut writer = Writer::new(Vec::new());
    let (wb, nc) = (Attribute::WriteBack, Attribute::NonCacheable);
    let base = PAGE_IPA;
    writer.record(0, toggle_at(base + 0x1000, wb, nc));
    writer.record(1, dma(true, 7, base, 0x1000, Some(wb)));
    writer.record(1, dma(true, 7, base + 0x1000, 0x1000, Some(nc)));
    writer.record(1, dma(true, 7, base + 0x2000, 0x1000, Some(wb)));
    writer.record(
        1,
        Event::DmaSync {
            stream_id: 0x20,
            handle: 7,
            ipa: base,
            size: 0x3000,
            for_device: true,
            maintenance: Maintenance::default(),
            status: 0,
        },
    );
    writer.record(1, dma(false, 7, base, 0x3000, None));
    // Every run is released: each page may change attribute again.
    for page in 0..3 {
        let (old, new) = if page == 1 { (nc, wb) } else { (wb, nc) };
        writer.record(0, toggle_at(base + page * 0x1000, old, new));
    }
    let report = check(writer.into_inner());
    assert!(report.passed(), "{}", report.summary());
    assert_eq!(report.replay.live_mappings, 0);
}
