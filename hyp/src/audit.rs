//! The hypervisor's one audit log ([`hyp_core::audit::AuditLog`]) behind a lock, the host
//! stream of its records on the hypervisor's UART, and the AUDIT_READ / AUDIT_MARK calls.
//!
//! Records are streamed in sequence order while the lock is held, so two vCPUs never interleave
//! or reorder lines. When the hypervisor shares its UART with the guest, records wait in the
//! ring while the guest runs and are streamed when it stops (a loss meanwhile is reported by a
//! STREAM_LOSS overflow record; see `hyp_core::audit`).

use crate::arch::read_sysreg;
use crate::guest_memory;
use alloc::vec::Vec;
use hyp_core::audit::{AuditLevel, AuditLog, Event, RING_CAPACITY};
use stagehand_abi::audit::RECORD_SIZE;
use stagehand_abi::{function, Status};

/// VM id the records carry.
const VM_ID: u16 = 1;

struct Audit {
    log: AuditLog,
    level: AuditLevel,
    /// The UART is the guest's console too.
    shared_uart: bool,
    /// A guest runs (meaningful with a shared UART: lines then wait).
    guest_running: bool,
}

static AUDIT: spin::Mutex<Option<Audit>> = spin::Mutex::new(None);

/// The configured level, readable without the lock: events the level leaves out (cache
/// operations under `audit=changes`) cost one load, not a lock round trip.
static LEVEL: core::sync::atomic::AtomicU8 =
    core::sync::atomic::AtomicU8::new(AuditLevel::All as u8);

fn with_audit<R>(f: impl FnOnce(&mut Audit) -> R) -> R {
    let mut guard = AUDIT.lock();
    let audit = guard.get_or_insert_with(|| Audit {
        log: AuditLog::new(VM_ID, RING_CAPACITY),
        level: AuditLevel::All,
        shared_uart: false,
        guest_running: false,
    });
    f(audit)
}

fn now() -> u64 {
    read_sysreg!("cntpct_el0")
}

/// Sets the level from the configuration and says whether the UART is shared with the guest.
pub fn configure(level: AuditLevel, shared_uart: bool) {
    LEVEL.store(level as u8, core::sync::atomic::Ordering::Relaxed);
    with_audit(|audit| {
        audit.level = level;
        audit.shared_uart = shared_uart;
    });
}

/// Whether the configuration keeps any records (AUDIT_READ and AUDIT_MARK answer
/// NOT_SUPPORTED otherwise).
pub fn enabled() -> bool {
    with_audit(|audit| audit.level != AuditLevel::Off)
}

impl Audit {
    fn record(&mut self, vcpu: u16, event: &Event) -> Option<u64> {
        if !self.level.admits(event) {
            return None;
        }
        if matches!(event, Event::GuestStop { .. }) {
            self.guest_running = false;
        }
        let sequence = self.log.record(now(), vcpu, event);
        self.stream(vcpu);
        if matches!(event, Event::GuestStart { .. }) {
            self.guest_running = true;
        }
        Some(sequence)
    }

    /// Writes the records the stream has not had, unless the guest owns the UART now.
    fn stream(&mut self, vcpu: u16) {
        if self.shared_uart && self.guest_running {
            return;
        }
        let mut line = [0u8; stagehand_abi::audit::MAX_LINE];
        for record in self.log.take_unstreamed(now(), vcpu) {
            let len = record.format_line(&mut line);
            crate::console::write_audit_line(&line[..len]);
        }
    }
}

/// Records `event`, caused by `vcpu`, and streams it. Returns its sequence number, or `None`
/// when the configured level leaves such events out.
pub fn record(vcpu: usize, event: &Event) -> Option<u64> {
    let level = LEVEL.load(core::sync::atomic::Ordering::Relaxed);
    if [AuditLevel::All, AuditLevel::Changes, AuditLevel::Off]
        .into_iter()
        .any(|l| l as u8 == level && !l.admits(event))
    {
        return None;
    }
    with_audit(|audit| audit.record(vcpu as u16, event))
}

/// The results of AUDIT_READ or AUDIT_MARK, or the refusal (already audited).
pub type CallResult = Result<[u64; 3], Status>;

/// AUDIT_MARK: a mark record with `tag`; x1 = its sequence number.
pub fn mark(vcpu: usize, tag: u64) -> CallResult {
    with_audit(|audit| {
        let refused = |audit: &mut Audit, status: Status| {
            audit.record(
                vcpu as u16,
                &Event::Refused {
                    function: function::AUDIT_MARK,
                    status: status.code(),
                },
            );
            Err(status)
        };
        match audit.record(vcpu as u16, &Event::Mark { tag }) {
            Some(sequence) => Ok([sequence, 0, 0]),
            None => refused(audit, Status::NotSupported),
        }
    })
}

/// AUDIT_READ: copies whole records from `first` on into the guest buffer `[buffer, buffer +
/// size)`, which must be 8-byte aligned, inside guest RAM and hold at least one record.
/// Results: x1 records copied, x2 next sequence, x3 records dropped so far. Records hold no
/// host physical address (the layout has none), so they are copied as they are.
pub fn read(vcpu: usize, buffer: u64, size: u64, first: u64) -> CallResult {
    let check = || {
        if !enabled() {
            return Err(Status::NotSupported);
        }
        if size == 0 {
            return Err(Status::InvalidParameter);
        }
        if !buffer.is_multiple_of(8) {
            return Err(Status::Alignment);
        }
        if size < RECORD_SIZE as u64 {
            return Err(Status::InvalidParameter);
        }
        guest_memory::translate(buffer, size).map(|_| ())
    };
    if let Err(status) = check() {
        record(
            vcpu,
            &Event::RefusedRange {
                function: function::AUDIT_READ,
                status: status.code(),
                ipa: buffer,
                size,
            },
        );
        return Err(status);
    }
    // SMMU faults not yet drained must be in the ring before the guest reads it.
    crate::smmu::drain_events();
    let max = (size / RECORD_SIZE as u64) as usize;
    let read = with_audit(|audit| {
        audit.log.report_losses(now(), vcpu as u16);
        audit.stream(vcpu as u16);
        audit.log.read(first, max.min(RING_CAPACITY))
    });
    let mut bytes = Vec::with_capacity(read.records.len() * RECORD_SIZE);
    for record in &read.records {
        bytes.extend_from_slice(record.bytes());
    }
    // The range was checked above and guest RAM does not move; a failure here is the same
    // answer the check would have given.
    guest_memory::write(buffer, &bytes)?;
    Ok([read.records.len() as u64, read.next_sequence, read.dropped])
}
