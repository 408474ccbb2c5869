//! Synthesises long, valid audit streams with the hypervisor's own encoder: what a busy guest's
//! drivers do to a fixed set of buffers, over and over, from several vCPUs. Shared by the tests
//! and the `synthesise` example (which writes a stream for timing the tool).

use std::io::Write;

use hyp_core::audit::{Attribute, AuditLog, CacheOp, DmaDirection, Event, Maintenance, TlbiScope};
use stagehand_abi::audit::smmu_command;
use stagehand_abi::{function, Status};

/// First IPA of the synthesised buffers.
pub const BASE: u64 = 0x4100_0000;
/// Pages per buffer.
pub const BUFFER_PAGES: u64 = 4;
const PAGE: u64 = 4096;

/// Writes records as the hypervisor streams them.
pub struct Writer<W: Write> {
    log: AuditLog,
    out: W,
    time: u64,
    /// Records written.
    pub records: u64,
}

impl<W: Write> Writer<W> {
    /// A writer into `out`, with a small ring as the hypervisor has.
    pub fn new(out: W) -> Self {
        Writer {
            log: AuditLog::new(1, 64),
            out,
            time: 1000,
            records: 0,
        }
    }

    /// Records `event` as vCPU `vcpu` did it and streams it.
    pub fn record(&mut self, vcpu: u16, event: Event) {
        self.time += 40;
        self.log.record(self.time, vcpu, &event);
        self.records += 1;
        for r in self.log.take_unstreamed(self.time, vcpu) {
            writeln!(self.out, "[stagehand INFO ] {r}").expect("write the stream");
        }
    }

    /// The output.
    pub fn into_inner(self) -> W {
        self.out
    }
}

fn to_nc() -> Maintenance {
    Maintenance {
        cmo: Some(CacheOp::CleanInvalidate),
        cmo_lines: 64 * BUFFER_PAGES,
        tlbi: TlbiScope::ByIpa,
        tlbi_count: BUFFER_PAGES as u32,
        break_before_make: true,
        hypervisor_alias: true,
        ..Maintenance::default()
    }
}

fn set_attr(ipa: u64, size: u64, old: Attribute, new: Attribute) -> Event {
    Event::AttributeChange {
        ipa,
        size,
        old,
        new,
        maintenance: if old == new {
            Maintenance::default()
        } else {
            to_nc()
        },
        status: 0,
    }
}

fn map(handle: u64, ipa: u64, size: u64, attribute: Attribute) -> Event {
    Event::DmaMap {
        stream_id: 0x10,
        ipa,
        size,
        direction: DmaDirection::Bidirectional,
        handle,
        attribute: Some(attribute),
        maintenance: Maintenance {
            cmo: Some(CacheOp::CleanInvalidate),
            cmo_lines: 64,
            smmu_commands: 2,
            smmu_kinds: smmu_command::TLBI_S2_IPA | smmu_command::SYNC,
            ..Maintenance::default()
        },
        status: 0,
    }
}

fn unmap(handle: u64, ipa: u64, size: u64) -> Event {
    Event::DmaUnmap {
        stream_id: 0x10,
        handle,
        ipa,
        size,
        direction: DmaDirection::Bidirectional,
        maintenance: Maintenance {
            cmo: Some(CacheOp::CleanInvalidate),
            cmo_lines: 64,
            smmu_commands: 2,
            smmu_kinds: smmu_command::TLBI_S2_IPA | smmu_command::SYNC,
            ..Maintenance::default()
        },
        status: 0,
    }
}

/// Writes at least `records` records about `buffers` buffers of [`BUFFER_PAGES`] pages: each
/// round makes a buffer NC, maps it for DMA in two runs (its first page is set back to WB, so a
/// strict map yields one record per run), syncs it, is refused an attribute change while mapped,
/// unmaps it, makes it WB again, and does a CMO and a mark.
pub fn synthesise<W: Write>(writer: &mut Writer<W>, records: u64, buffers: u64) {
    let mut handle = 1;
    let mut round = 0u64;
    writer.record(
        0,
        Event::GuestStart {
            entry: 0x4008_0000,
            ram: 0x1000_0000,
        },
    );
    while writer.records < records {
        let buffer = round % buffers;
        let vcpu = (round % 4) as u16;
        let ipa = BASE + buffer * BUFFER_PAGES * PAGE * 2;
        let size = BUFFER_PAGES * PAGE;
        let (wb, nc) = (Attribute::WriteBack, Attribute::NonCacheable);
        writer.record(vcpu, set_attr(ipa, size, wb, nc));
        writer.record(vcpu, set_attr(ipa, PAGE, nc, wb));
        writer.record(vcpu, map(handle, ipa, PAGE, wb));
        writer.record(vcpu, map(handle, ipa + PAGE, size - PAGE, nc));
        writer.record(
            vcpu,
            Event::DmaSync {
                stream_id: 0x10,
                handle,
                ipa,
                size,
                for_device: true,
                maintenance: Maintenance::default(),
                status: Status::NotRequired.code(),
            },
        );
        writer.record(
            (vcpu + 1) % 4,
            Event::RefusedRange {
                function: function::MEM_SET_ATTR,
                status: Status::Busy.code(),
                ipa,
                size,
            },
        );
        writer.record(vcpu, unmap(handle, ipa, size));
        writer.record(vcpu, set_attr(ipa + PAGE, size - PAGE, nc, wb));
        writer.record(
            vcpu,
            Event::Cmo {
                function: function::CACHE_OP,
                address: ipa,
                size,
                op: CacheOp::Clean,
                lines: 64 * BUFFER_PAGES,
                widened: false,
                va: None,
                status: 0,
            },
        );
        writer.record(vcpu, Event::Mark { tag: round });
        handle += 1;
        round += 1;
    }
}
