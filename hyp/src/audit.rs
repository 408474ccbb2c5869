//! The VM's audit log, [`HypAudit`], a value the VM owns: the ring its vCPUs record into
//! without a lock ([`hyp_core::audit::AuditRing`]), its drain side behind a lock, and the host
//! stream of its records on the hypervisor's UART. The portable call handlers reach it as the
//! VM's `AuditSink`, the trap layer (faults, stops, idle) through the same value.
//!
//! Recording an event on a call's path only writes it into the ring ([`HypAudit::record`]): a
//! reserved slot and its stores. Its hash, its text line and the UART write happen later, in
//! [`HypAudit::drain`],
//! which runs when a vCPU idles (the guest's WFI traps; it stops early when an interrupt for
//! the guest is pending), before AUDIT_READ answers, when the guest starts or stops, and,
//! synchronously on every recording vCPU, when the records waiting reach [`HIGH_WATER`]: it
//! then streams batches until they are below it again (so that a guest that never idles, or
//! whose vCPUs record faster than one drain streams, loses nothing: they wait for the stream
//! instead, a batch or two per call, never the whole backlog). A vCPU that finds the ring
//! full streams what waits only if the oldest records are among it, then retires the oldest
//! records (counted and reported losses of the ring, never of the stream unless a running guest
//! owns the UART). One drain at a time (the
//! drain side's lock) seals and streams records in sequence order, so lines never interleave or
//! reorder; recording vCPUs never wait for it below the high water. When the hypervisor shares
//! its UART with the guest, records wait in the ring while the guest runs and are streamed when
//! it stops (a loss meanwhile is reported by a STREAM_LOSS overflow record; see
//! `hyp_core::audit`).

use aarch64_cpu::registers::{Readable, CNTPCT_EL0};
use core::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use hyp_core::audit::{
    AuditDrain, AuditLevel, AuditRing, Event, ReadResult, RingFull, RING_CAPACITY,
};
use hyp_core::hypercall::platform::AuditSink;

/// VM id the records carry.
const VM_ID: u16 = 1;

const LEVEL_ALL: u8 = 0;
const LEVEL_CHANGES: u8 = 1;
const LEVEL_OFF: u8 = 2;

/// Records waiting for the stream at which the recording vCPU drains them itself: well below
/// the ring's capacity, so that a busy guest loses none.
pub const HIGH_WATER: u64 = (RING_CAPACITY as u64) / 2;

/// Records one drain formats between looks at the ring.
const BATCH: usize = 16;

/// Records the idle drain formats between looks for an interrupt for the guest: one, so that
/// the guest waits for at most one line (about 20 ms on a 115,200-baud UART).
const IDLE_BATCH: usize = 1;

fn now() -> u64 {
    CNTPCT_EL0.get()
}

/// The VM's audit log, owned by the VM: the ring vCPUs record into without a lock, the drain
/// side behind one, and what decides whether lines may go to the UART. The portable call
/// handlers reach it as the VM's [`AuditSink`]; the trap layer through the same value.
pub struct HypAudit {
    ring: AuditRing,
    /// Held by the one vCPU sealing, streaming, retiring or reading.
    drain_side: spin::Mutex<AuditDrain>,
    /// The configured level, read on every record without a lock.
    level: AtomicU8,
    /// The UART is the guest's console too.
    shared_uart: bool,
    /// A guest runs (meaningful with a shared UART: lines then wait).
    guest_running: AtomicBool,
}

impl HypAudit {
    /// An empty log at `level`; `shared_uart` says whether the UART is the guest's console too.
    pub fn new(level: AuditLevel, shared_uart: bool) -> Self {
        let code = match level {
            AuditLevel::All => LEVEL_ALL,
            AuditLevel::Changes => LEVEL_CHANGES,
            AuditLevel::Off => LEVEL_OFF,
        };
        Self {
            ring: AuditRing::new(VM_ID, RING_CAPACITY),
            drain_side: spin::Mutex::new(AuditDrain::new()),
            level: AtomicU8::new(code),
            shared_uart,
            guest_running: AtomicBool::new(false),
        }
    }

    #[inline(always)]
    fn level(&self) -> AuditLevel {
        match self.level.load(Ordering::Relaxed) {
            LEVEL_ALL => AuditLevel::All,
            LEVEL_CHANGES => AuditLevel::Changes,
            _ => AuditLevel::Off,
        }
    }

    /// Whether the configuration keeps any records (AUDIT_READ and AUDIT_MARK answer
    /// NOT_SUPPORTED otherwise).
    pub fn enabled(&self) -> bool {
        self.level() != AuditLevel::Off
    }

    /// Whether lines may go to the UART now (not while a guest owns a shared one).
    fn may_stream(&self) -> bool {
        !(self.shared_uart && self.guest_running.load(Ordering::Relaxed))
    }

    /// Records `event`, caused by `vcpu`. Returns its sequence number, or `None` when the
    /// configured level leaves such events out. Start and stop records, and a log at its high
    /// water, are drained at once.
    ///
    /// Inlined: at a call site the event's kind is known, so its level check and encoding fold
    /// into a few stores; everything rare (a full ring, the high water, start and stop) is
    /// called.
    #[inline(always)]
    pub fn record(&self, vcpu: usize, event: &Event) -> Option<u64> {
        if matches!(event, Event::GuestStart { .. } | Event::GuestStop { .. }) {
            return self.record_boundary(vcpu, event);
        }
        if !self.level().admits(event) {
            return None;
        }
        let sequence = match self.ring.record(now(), vcpu as u16, event) {
            Ok(sequence) => sequence,
            Err(RingFull) => self.record_when_full(vcpu as u16, event),
        };
        if self.ring.unstreamed() >= HIGH_WATER {
            self.drain_below_high_water(vcpu as u16);
        }
        Some(sequence)
    }

    /// Every recording vCPU at the high water waits for the drain and streams until the records
    /// waiting are below it again: vCPUs that record faster than one drain streams would
    /// otherwise overrun the ring and lose records from the stream. It streams a batch or two,
    /// not everything waiting: on a 115,200-baud UART a line takes about 20 ms, and a call
    /// that streamed half the ring would hold its vCPU at EL2 for tens of seconds.
    #[cold]
    #[inline(never)]
    fn drain_below_high_water(&self, vcpu: u16) {
        let mut drain = self.drain_side.lock();
        if self.may_stream() {
            drain.stream_batches(
                &self.ring,
                now(),
                vcpu,
                BATCH,
                |ring| ring.unstreamed() >= HIGH_WATER,
                crate::console::write_audit_record,
            );
        }
    }

    /// A full ring: streams what waits if the records about to be retired are among it (so
    /// that retiring loses nothing the stream still needs), retires the oldest records, and
    /// records again. The usual full ring holds only streamed records at its old end: then the
    /// recording vCPU does not wait for the stream (on QEMU with a file-backed UART, a line is
    /// a host write per byte, ~0.4 ms; streaming a batch of 256 inside a call was 0.1 s).
    #[cold]
    #[inline(never)]
    fn record_when_full(&self, vcpu: u16, event: &Event) -> u64 {
        loop {
            {
                let mut drain = self.drain_side.lock();
                if drain.make_room_needs_stream(&self.ring) {
                    self.stream_locked(&mut drain, vcpu);
                }
                drain.make_room(&self.ring, now(), vcpu);
            }
            if let Ok(sequence) = self.ring.record(now(), vcpu, event) {
                return sequence;
            }
        }
    }

    /// The guest's start or stop: the console's state changes, and nothing may be left behind
    /// (QEMU exits after a stop).
    #[cold]
    #[inline(never)]
    fn record_boundary(&self, vcpu: usize, event: &Event) -> Option<u64> {
        self.guest_running
            .store(matches!(event, Event::GuestStart { .. }), Ordering::Relaxed);
        if !self.level().admits(event) {
            return None;
        }
        let sequence = match self.ring.record(now(), vcpu as u16, event) {
            Ok(sequence) => sequence,
            Err(RingFull) => self.record_when_full(vcpu as u16, event),
        };
        self.drain_all(vcpu);
        Some(sequence)
    }

    /// The idle vCPU's drain: seals the records waiting and writes their lines to the UART,
    /// oldest first, until none wait or an interrupt for the guest is pending (then the guest
    /// runs, and the rest waits for its next idle), unless another vCPU is draining (it takes
    /// these too) or a running guest owns the UART.
    pub fn drain(&self, vcpu: usize) {
        if !self.may_stream() {
            return;
        }
        if let Some(mut drain) = self.drain_side.try_lock() {
            drain.stream_batches(
                &self.ring,
                now(),
                vcpu as u16,
                IDLE_BATCH,
                |_| !crate::arch::interrupt_pending(),
                crate::console::write_audit_record,
            );
        }
    }

    /// [`Self::drain`], waiting for a drain in progress to finish first: every record written
    /// before the call is streamed when it returns (unless a running guest owns the UART).
    pub fn drain_all(&self, vcpu: usize) {
        self.stream_locked(&mut self.drain_side.lock(), vcpu as u16);
    }

    /// Streams everything waiting, and what arrives meanwhile (bounded: the recording vCPUs
    /// stop at the high water, waiting for this lock).
    fn stream_locked(&self, drain: &mut AuditDrain, vcpu: u16) {
        if !self.may_stream() {
            return;
        }
        drain.stream_batches(
            &self.ring,
            now(),
            vcpu,
            BATCH,
            |_| true,
            crate::console::write_audit_record,
        );
    }
}

impl AuditSink for HypAudit {
    #[inline(always)]
    fn record(&self, vcpu: usize, event: &Event) -> Option<u64> {
        HypAudit::record(self, vcpu, event)
    }

    fn enabled(&self) -> bool {
        HypAudit::enabled(self)
    }

    /// AUDIT_READ's view: what waits is streamed first (all of it: a reader may use the call
    /// to empty the log, as the kernel module's selftest does before each timed loop, so it
    /// does not stop at the guest's interrupts as the idle drain does), losses are reported,
    /// then up to `max` records from `first` on.
    fn read(&self, vcpu: usize, first: u64, max: usize) -> ReadResult {
        let mut drain = self.drain_side.lock();
        self.stream_locked(&mut drain, vcpu as u16);
        drain.report_losses(&self.ring, now(), vcpu as u16);
        drain.read(&self.ring, first, max.min(RING_CAPACITY))
    }
}
