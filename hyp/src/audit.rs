//! The hypervisor's one audit log ([`hyp_core::audit::AuditLog`]) behind a lock, the host
//! stream of its records on the hypervisor's UART, and [`HypAudit`], the handle through which
//! the portable AUDIT_READ / AUDIT_MARK handlers and every other call reach it.
//!
//! Recording an event on a call's path only encodes it into the ring ([`record`]): its hash,
//! its text line and the UART write happen later, in [`drain`], which runs when a vCPU idles
//! (the guest's WFI traps), before AUDIT_READ answers, when the guest starts or stops, and,
//! synchronously on every recording vCPU, when the records waiting reach [`HIGH_WATER`] (so
//! that a guest that never idles, or whose vCPUs record faster than one drain streams, loses
//! nothing: they wait for the stream instead). One drain at a time (the `STREAM` lock) takes
//! records in sequence order in small batches under the log's lock and writes their lines
//! outside it, so lines never interleave or reorder and other vCPUs are held for a batch at
//! most. When the hypervisor shares its UART with the guest, records wait in the ring while the
//! guest runs and are streamed when it stops (a loss meanwhile is reported by a STREAM_LOSS
//! overflow record; see `hyp_core::audit`).

use aarch64_cpu::registers::{Readable, CNTPCT_EL0};
use alloc::vec::Vec;
use hyp_core::audit::{AuditLevel, AuditLog, Event, ReadResult, RING_CAPACITY};
use hyp_core::hypercall::platform::AuditSink;

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

/// Held by the one vCPU draining records to the UART.
static STREAM: spin::Mutex<()> = spin::Mutex::new(());

/// Records waiting for the stream at which the recording vCPU drains them itself: well below
/// the ring's capacity, so that a busy guest loses none.
pub const HIGH_WATER: u64 = (RING_CAPACITY as u64) / 2;

/// Records one drain takes from the log at a time (the log is held while they are sealed).
const BATCH: usize = 16;

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
    CNTPCT_EL0.get()
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
    /// Writes the record of `event` into the ring; returns its sequence number and whether the
    /// records waiting for the stream reached [`HIGH_WATER`].
    fn record(&mut self, vcpu: u16, event: &Event) -> Option<(u64, bool)> {
        if !self.level.admits(event) {
            return None;
        }
        match event {
            Event::GuestStop { .. } => self.guest_running = false,
            Event::GuestStart { .. } => self.guest_running = true,
            _ => {}
        }
        let sequence = self.log.record(now(), vcpu, event);
        Some((sequence, self.log.unstreamed() >= HIGH_WATER))
    }

    /// Whether lines may go to the UART now (not while a guest owns a shared one).
    fn may_stream(&self) -> bool {
        !(self.shared_uart && self.guest_running)
    }
}

/// Records `event`, caused by `vcpu`. Returns its sequence number, or `None` when the
/// configured level leaves such events out. Start and stop records, and a log at its high
/// water, are drained at once.
pub fn record(vcpu: usize, event: &Event) -> Option<u64> {
    let level = LEVEL.load(core::sync::atomic::Ordering::Relaxed);
    if [AuditLevel::All, AuditLevel::Changes, AuditLevel::Off]
        .into_iter()
        .any(|l| l as u8 == level && !l.admits(event))
    {
        return None;
    }
    let (sequence, full) = with_audit(|audit| audit.record(vcpu as u16, event))?;
    if full || matches!(event, Event::GuestStart { .. } | Event::GuestStop { .. }) {
        // Nothing may be left behind when the guest stops (QEMU exits next). At the high
        // water, every recording vCPU waits for the drain: vCPUs that record faster than one
        // drain streams would otherwise overrun the ring and lose records from the stream.
        drain_all(vcpu);
    }
    Some(sequence)
}

/// Seals the records waiting and writes their lines to the UART, oldest first, unless another
/// vCPU is draining (it takes these too) or a running guest owns the UART.
pub fn drain(vcpu: usize) {
    if let Some(stream) = STREAM.try_lock() {
        drain_locked(vcpu, stream);
    }
}

/// [`drain`], waiting for a drain in progress to finish first: every record written before
/// the call is streamed when it returns (unless a running guest owns the UART).
pub fn drain_all(vcpu: usize) {
    drain_locked(vcpu, STREAM.lock());
}

fn drain_locked(vcpu: usize, _stream: spin::MutexGuard<'_, ()>) {
    let mut batch = Vec::with_capacity(BATCH);
    let mut line = [0u8; stagehand_abi::audit::MAX_LINE];
    loop {
        batch.clear();
        with_audit(|audit| {
            if audit.may_stream() {
                audit
                    .log
                    .take_unstreamed_into(now(), vcpu as u16, &mut batch, BATCH);
            }
        });
        if batch.is_empty() {
            return;
        }
        for record in &batch {
            let len = record.format_line(&mut line);
            crate::console::write_audit_line(&line[..len]);
        }
    }
}

/// The audit log's call-side handle, which the portable call handlers record through. The log
/// it reaches is this module's one log.
pub struct HypAudit;

impl AuditSink for HypAudit {
    fn record(&self, vcpu: usize, event: &Event) -> Option<u64> {
        record(vcpu, event)
    }

    fn enabled(&self) -> bool {
        enabled()
    }

    /// AUDIT_READ's view: what waits is streamed first, losses are reported, then up to `max`
    /// records from `first` on.
    fn read(&self, vcpu: usize, first: u64, max: usize) -> ReadResult {
        drain(vcpu);
        with_audit(|audit| {
            audit.log.report_losses(now(), vcpu as u16);
            audit.log.read(first, max.min(RING_CAPACITY))
        })
    }
}
