//! The audit log: typed [`Event`]s become fixed-size, hash-chained records
//! ([`stagehand_abi::audit::Record`]) in a bounded ring ([`AuditLog`]) that AUDIT_READ reads
//! and the host stream drains.
//!
//! # Sequence numbers, losses and the hash chain
//!
//! - Every record written gets the next sequence number (0 first), overflow records included,
//!   and its hash chains to the previous record's: the chain and the numbering run over every
//!   record ever written, with no exception. Losing a record never renumbers or rehashes
//!   anything.
//! - The ring holds at most `capacity` records. When a record finds it full, the drain side
//!   retires the oldest (a batch of `capacity / 16`, at least 2, so that a full ring takes
//!   that path once per batch), so the records lost from the ring are always sequences
//!   `0..dropped`; `dropped` is what AUDIT_READ reports in x3, and the oldest record held is
//!   number `dropped`.
//! - Ring losses are reported by overflow records: `detail` = the first lost sequence, `dropped`
//!   = how many in a row, `tag` = the hash of the last of them (a chain anchor). One is written
//!   (a) when records are retired while the ring holds no overflow record, and (b) before
//!   AUDIT_READ answers, whenever losses are unreported ([`AuditDrain::report_losses`]).
//!   Together the ring overflow records cover every loss exactly once, in order.
//! - The host stream normally receives each record as it is written, so ring losses leave it
//!   complete. When streaming must wait (a UART shared with a running guest), records wait in
//!   the ring; if some were evicted before they could be streamed, the stream gets the records
//!   still held and then, in its place in the numbering (it is the newest), an overflow record
//!   flagged [`flag::STREAM_LOSS`] covering exactly the sequences the stream will never see
//!   ([`AuditLog::take_unstreamed`]). A reader of the stream therefore sees a gap `a..b` only
//!   where a later STREAM_LOSS record says `detail = a, dropped = b - a`, and checks the chain
//!   at `b` from that record's `tag`. Any other gap is a missing record.
//!
//! # What a record costs its caller
//!
//! The log has two sides. Recording vCPUs share the [`AuditRing`] and take no lock: a record
//! ([`AuditRing::record`]) reserves the next sequence number with one compare-and-swap (which
//! fails, taking nothing, when the ring is full), writes its 16 words into the slot that number
//! owns, and publishes the slot with a release store of the number: about 70 instructions.
//! Everything else belongs to the [`AuditDrain`], which one holder at a time runs: it seals
//! records (computes their hashes) strictly in sequence order, waiting for a slot whose writer
//! has reserved but not yet published it (a writer never waits in between, so the wait is
//! short); it reads, streams and retires them. A slot is written again only after the drain
//! side retired its record, so nothing it reads changes under it. The sequence number, the
//! content and the order are fixed when the number is reserved and the words written, so
//! sealing later changes nothing a reader can see; it only moves the SipHash off the path of
//! the call being audited. [`AuditLog`] bundles both sides for a single owner (tests, tools).

use alloc::vec::Vec;
use core::sync::atomic::{AtomicU64, Ordering};

use stagehand_abi::audit::{
    self as abi, access, attr, cmo, direction, flag, kind, stop_reason, tlbi, Record, GENESIS_HASH,
    RECORD_SIZE,
};
use stagehand_abi::function;
use zerocopy::byteorder::little_endian::{I64, U16, U32, U64};

pub use crate::attributes::{Attribute, TlbiScope};
pub use crate::inject::Access;
pub use crate::maintenance::CacheOp;

/// Records the hypervisor's ring holds (544 KiB: 128 bytes and a published number each).
pub const RING_CAPACITY: usize = 4096;

/// Why the guest stopped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StopReason {
    /// PSCI SYSTEM_OFF.
    SystemOff,
    /// PSCI SYSTEM_RESET.
    SystemReset,
    /// A trap the hypervisor could not handle (the fatal report says which).
    Fault,
}

/// Direction of a DMA mapping (DMA_MAP x4).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DmaDirection {
    /// The device reads and writes.
    Bidirectional,
    /// The device reads.
    ToDevice,
    /// The device writes.
    FromDevice,
}

/// The maintenance a change performed, as its record shows it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Maintenance {
    /// The cache maintenance done (over the record's range), if any.
    pub cmo: Option<CacheOp>,
    /// D-cache lines it touched.
    pub cmo_lines: u64,
    /// TLB invalidation scope.
    pub tlbi: TlbiScope,
    /// TLBI instructions issued.
    pub tlbi_count: u32,
    /// SMMU commands issued (CMD_SYNC included).
    pub smmu_commands: u32,
    /// Kinds of those commands: bits of [`stagehand_abi::audit::smmu_command`].
    pub smmu_kinds: u16,
    /// The old stage-2 entries were broken, TLB-invalidated and synchronised before the new
    /// ones were written.
    pub break_before_make: bool,
    /// The hypervisor's own alias of the range was unmapped or remapped with the new attribute.
    pub hypervisor_alias: bool,
}

/// Something to audit. One event becomes one record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Event {
    /// The guest was entered for the first time.
    GuestStart {
        /// Entry point IPA.
        entry: u64,
        /// RAM size in bytes.
        ram: u64,
    },
    /// The guest stopped.
    GuestStop {
        /// Why.
        reason: StopReason,
    },
    /// A guest access to an IPA it does not own; the guest got an external abort.
    Stage2Fault {
        /// Faulting IPA.
        ipa: u64,
        /// Read, write or fetch.
        access: Access,
    },
    /// A guest instruction the hypervisor does not emulate; the guest got an UNDEF.
    Undefined {
        /// ESR_EL2 of the trap: which instruction (system register encoding, for a trapped
        /// MRS/MSR).
        esr: u64,
    },
    /// A guest register write the hypervisor changed or dropped (LPI enabling).
    Filtered {
        /// IPA of the register.
        ipa: u64,
        /// Value the guest wrote.
        requested: u64,
    },
    /// A call the hypervisor refused.
    Refused {
        /// Function ID.
        function: u32,
        /// Status returned (SMCCC/PSCI or ABI code).
        status: i64,
    },
    /// A call about a range (or a buffer) that the hypervisor refused.
    RefusedRange {
        /// Function ID.
        function: u32,
        /// Status returned.
        status: i64,
        /// Start of the range as the guest gave it.
        ipa: u64,
        /// Size as the guest gave it.
        size: u64,
    },
    /// MEM_SET_ATTR changed the stage-2 attribute of `[ipa, ipa + size)` (the part done).
    AttributeChange {
        /// First IPA changed.
        ipa: u64,
        /// Bytes changed.
        size: u64,
        /// Attribute before.
        old: Attribute,
        /// Attribute after.
        new: Attribute,
        /// What it took.
        maintenance: Maintenance,
        /// Status returned (SUCCESS, or INCOMPLETE with `size` the part done).
        status: i64,
    },
    /// Cache maintenance the guest asked for (CACHE_OP, CACHE_OP_BATCH).
    Cmo {
        /// CACHE_OP or CACHE_OP_BATCH.
        function: u32,
        /// Start of the IPA range maintained.
        address: u64,
        /// Bytes done.
        size: u64,
        /// The operation performed (after widening).
        op: CacheOp,
        /// D-cache lines touched.
        lines: u64,
        /// An INVALIDATE was widened to CLEAN_INVALIDATE.
        widened: bool,
        /// The guest VA the range starts at, when the guest asked by VA (a request by VA that
        /// spans IPA runs gives one record per run).
        va: Option<u64>,
        /// Status returned.
        status: i64,
    },
    /// A buffer was mapped for DMA (IOVA = IPA).
    DmaMap {
        /// The device.
        stream_id: u32,
        /// First IPA.
        ipa: u64,
        /// Bytes.
        size: u64,
        /// Direction.
        direction: DmaDirection,
        /// The handle returned.
        handle: u64,
        /// Attribute of the device's mapping, when it has one of its own (`None`: the device
        /// shares the guest's stage 2).
        attribute: Option<Attribute>,
        /// What it took (CMO by direction, SMMU commands).
        maintenance: Maintenance,
        /// Status returned.
        status: i64,
    },
    /// A DMA mapping was removed.
    DmaUnmap {
        /// The device.
        stream_id: u32,
        /// The handle.
        handle: u64,
        /// First IPA of the buffer.
        ipa: u64,
        /// Bytes.
        size: u64,
        /// Direction it was mapped with.
        direction: DmaDirection,
        /// What it took (SMMU TLBI + CMD_SYNC, then the CMO).
        maintenance: Maintenance,
        /// Status returned.
        status: i64,
    },
    /// A DMA buffer was synchronised.
    DmaSync {
        /// The device.
        stream_id: u32,
        /// The handle.
        handle: u64,
        /// First IPA synchronised.
        ipa: u64,
        /// Bytes.
        size: u64,
        /// For the device (else for the CPU).
        for_device: bool,
        /// What it took.
        maintenance: Maintenance,
        /// Status returned (NOT_REQUIRED for NC buffers and coherent devices).
        status: i64,
    },
    /// The SMMU reported a fault.
    SmmuFault {
        /// The device.
        stream_id: u32,
        /// The input address (IOVA = IPA) of the access.
        ipa: u64,
        /// Read or write.
        access: Access,
        /// SMMU event type (F_TRANSLATION 0x10, F_ACCESS 0x12, F_PERMISSION 0x13, ...).
        event: u8,
        /// The fault was at stage 2.
        stage2: bool,
    },
    /// AUDIT_MARK.
    Mark {
        /// The guest's tag.
        tag: u64,
    },
}

/// How much of the audit stream the configuration keeps (`audit=`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum AuditLevel {
    /// Every event (the default).
    #[default]
    All,
    /// Every change, refusal, fault, mark and loss, but not the maintenance-only events
    /// (CMO calls and DMA syncs), which change no attribute or mapping.
    Changes,
    /// Nothing: no records, AUDIT_READ and AUDIT_MARK answer NOT_SUPPORTED.
    Off,
}

impl AuditLevel {
    /// Whether `event` becomes a record at this level. Events a level leaves out get no sequence
    /// number, so the stream stays gap-free.
    #[inline(always)]
    pub fn admits(self, event: &Event) -> bool {
        match self {
            AuditLevel::All => true,
            AuditLevel::Changes => !matches!(event, Event::Cmo { .. } | Event::DmaSync { .. }),
            AuditLevel::Off => false,
        }
    }
}

#[inline(always)]
fn attribute_code(attribute: Attribute) -> u8 {
    match attribute {
        Attribute::WriteBack => attr::WB,
        Attribute::NonCacheable => attr::NC,
    }
}

#[inline(always)]
fn cmo_code(op: Option<CacheOp>) -> u8 {
    match op {
        None => cmo::NONE,
        Some(CacheOp::Clean) => cmo::CLEAN,
        Some(CacheOp::Invalidate) => cmo::INVALIDATE,
        Some(CacheOp::CleanInvalidate) => cmo::CLEAN_INVALIDATE,
    }
}

#[inline(always)]
fn access_code(a: Access) -> u8 {
    match a {
        Access::Read => access::READ,
        Access::Write => access::WRITE,
        Access::Fetch => access::FETCH,
    }
}

#[inline(always)]
fn direction_code(d: DmaDirection) -> u8 {
    match d {
        DmaDirection::Bidirectional => direction::BIDIRECTIONAL,
        DmaDirection::ToDevice => direction::TO_DEVICE,
        DmaDirection::FromDevice => direction::FROM_DEVICE,
    }
}

#[inline(always)]
fn with_maintenance(record: &mut Record, m: &Maintenance) {
    record.cmo_op = cmo_code(m.cmo);
    record.cmo_lines = U64::new(m.cmo_lines);
    record.tlbi_scope = match m.tlbi {
        TlbiScope::None => tlbi::NONE,
        TlbiScope::ByIpa => tlbi::BY_IPA,
        TlbiScope::Vmid => tlbi::VMID,
    };
    record.tlbi_count = U32::new(m.tlbi_count);
    record.smmu_commands = U32::new(m.smmu_commands);
    record.smmu_kinds = U16::new(m.smmu_kinds);
    let mut flags = record.flags.get();
    if m.break_before_make {
        flags |= flag::BREAK_BEFORE_MAKE;
    }
    if m.hypervisor_alias {
        flags |= flag::HYPERVISOR_ALIAS;
    }
    record.flags = U32::new(flags);
}

impl Event {
    /// The record body of this event: every field but sequence, time, VM, vCPU and hash.
    #[inline(always)]
    pub fn encode(&self) -> Record {
        let range = |r: &mut Record, ipa: u64, size: u64| {
            r.ipa = U64::new(ipa);
            r.size = U64::new(size);
        };
        let mut r;
        match *self {
            Event::GuestStart { entry, ram } => {
                r = Record::empty(kind::GUEST_START);
                range(&mut r, entry, ram);
            }
            Event::GuestStop { reason } => {
                r = Record::empty(kind::GUEST_STOP);
                r.detail = U64::new(match reason {
                    StopReason::SystemOff => stop_reason::SYSTEM_OFF,
                    StopReason::SystemReset => stop_reason::SYSTEM_RESET,
                    StopReason::Fault => stop_reason::FAULT,
                });
            }
            Event::Stage2Fault { ipa, access } => {
                r = Record::empty(kind::STAGE2_FAULT);
                range(&mut r, ipa, 0);
                r.access = access_code(access);
                r.flags = U32::new(flag::STAGE2);
            }
            Event::Undefined { esr } => {
                r = Record::empty(kind::UNDEFINED);
                r.detail = U64::new(esr);
            }
            Event::Filtered { ipa, requested } => {
                r = Record::empty(kind::FILTERED_WRITE);
                range(&mut r, ipa, 0);
                r.detail = U64::new(requested);
            }
            Event::Refused { function, status } => {
                r = Record::empty(kind::REFUSED);
                r.function = U32::new(function);
                r.status = I64::new(status);
            }
            Event::RefusedRange {
                function,
                status,
                ipa,
                size,
            } => {
                r = Record::empty(kind::REFUSED);
                r.function = U32::new(function);
                r.status = I64::new(status);
                range(&mut r, ipa, size);
            }
            Event::AttributeChange {
                ipa,
                size,
                old,
                new,
                maintenance,
                status,
            } => {
                r = Record::empty(kind::ATTRIBUTE_CHANGE);
                r.function = U32::new(function::MEM_SET_ATTR);
                range(&mut r, ipa, size);
                r.old_attr = attribute_code(old);
                r.new_attr = attribute_code(new);
                with_maintenance(&mut r, &maintenance);
                r.status = I64::new(status);
            }
            Event::Cmo {
                function,
                address,
                size,
                op,
                lines,
                widened,
                va,
                status,
            } => {
                r = Record::empty(kind::CMO);
                r.function = U32::new(function);
                range(&mut r, address, size);
                r.cmo_op = cmo_code(Some(op));
                r.cmo_lines = U64::new(lines);
                let mut flags = 0;
                if widened {
                    flags |= flag::WIDENED;
                }
                if let Some(va) = va {
                    flags |= flag::BY_VA;
                    r.detail = U64::new(va);
                }
                r.flags = U32::new(flags);
                r.status = I64::new(status);
            }
            Event::DmaMap {
                stream_id,
                ipa,
                size,
                direction,
                handle,
                attribute,
                maintenance,
                status,
            } => {
                r = Record::empty(kind::DMA_MAP);
                r.function = U32::new(function::DMA_MAP);
                r.stream_id = U32::new(stream_id);
                range(&mut r, ipa, size);
                r.direction = direction_code(direction);
                r.detail = U64::new(handle);
                r.new_attr = attribute.map_or(attr::NONE, attribute_code);
                with_maintenance(&mut r, &maintenance);
                r.status = I64::new(status);
            }
            Event::DmaUnmap {
                stream_id,
                handle,
                ipa,
                size,
                direction,
                maintenance,
                status,
            } => {
                r = Record::empty(kind::DMA_UNMAP);
                r.function = U32::new(function::DMA_UNMAP);
                r.stream_id = U32::new(stream_id);
                range(&mut r, ipa, size);
                r.direction = direction_code(direction);
                r.detail = U64::new(handle);
                with_maintenance(&mut r, &maintenance);
                r.status = I64::new(status);
            }
            Event::DmaSync {
                stream_id,
                handle,
                ipa,
                size,
                for_device,
                maintenance,
                status,
            } => {
                r = Record::empty(kind::DMA_SYNC);
                r.function = U32::new(function::DMA_SYNC);
                r.stream_id = U32::new(stream_id);
                range(&mut r, ipa, size);
                r.detail = U64::new(handle);
                with_maintenance(&mut r, &maintenance);
                if for_device {
                    r.flags = U32::new(r.flags.get() | flag::FOR_DEVICE);
                }
                r.status = I64::new(status);
            }
            Event::SmmuFault {
                stream_id,
                ipa,
                access,
                event,
                stage2,
            } => {
                r = Record::empty(kind::SMMU_FAULT);
                r.stream_id = U32::new(stream_id);
                range(&mut r, ipa, 0);
                r.access = access_code(access);
                r.detail = U64::new(event.into());
                if stage2 {
                    r.flags = U32::new(flag::STAGE2);
                }
            }
            Event::Mark { tag } => {
                r = Record::empty(kind::MARK);
                r.function = U32::new(function::AUDIT_MARK);
                r.tag = U64::new(tag);
            }
        }
        r
    }
}

/// What [`AuditLog::read`] found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReadResult {
    /// The records, oldest first, sequence numbers without gaps.
    pub records: Vec<Record>,
    /// The sequence number to ask for next.
    pub next_sequence: u64,
    /// Records lost from the ring since boot.
    pub dropped: u64,
}

/// Why [`AuditRing::record`] wrote nothing: every slot holds a record the drain side has not
/// retired yet. The caller makes room ([`AuditDrain::make_room`]) and records again.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RingFull;

/// Words of a record in a slot (the record is 128 bytes).
const WORDS: usize = RECORD_SIZE / 8;
/// Index of the hash in a slot's words (the record's last field).
const HASH_WORD: usize = WORDS - 1;

/// One record's place in the ring. Its words are atomics so that a recording vCPU and the drain
/// side share the ring without a lock and without `unsafe`: each word is written by one side at
/// a time, and `published` says which record the words hold.
#[derive(Debug)]
struct Slot {
    /// `sequence + 1` of the record whose words are complete (0: none yet).
    published: AtomicU64,
    words: [AtomicU64; WORDS],
}

impl Slot {
    fn new() -> Self {
        Slot {
            published: AtomicU64::new(0),
            words: core::array::from_fn(|_| AtomicU64::new(0)),
        }
    }

    /// Waits until the writer of record `sequence` (this slot's) has published it.
    #[inline(always)]
    fn wait_published(&self, sequence: u64) {
        while self.published.load(Ordering::Acquire) != sequence + 1 {
            core::hint::spin_loop();
            // Host threads, unlike vCPUs, can be descheduled between reserving and publishing.
            #[cfg(test)]
            std::thread::yield_now();
        }
    }

    fn load(&self) -> Record {
        let words: [u64; WORDS] = core::array::from_fn(|i| self.words[i].load(Ordering::Relaxed));
        zerocopy::transmute!(words)
    }

    /// The record as the words of [`abi::RecordWords`] (its bytes read as little-endian words;
    /// the slot's words hold them in native order).
    #[inline(always)]
    fn load_words(&self) -> abi::RecordWords {
        // Written out: as a loop (`array::from_fn`) it stays a loop, and copies.
        macro_rules! words {
            ($($i:literal)*) => { [$(u64::from_le(self.words[$i].load(Ordering::Relaxed))),*] };
        }
        words!(0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15)
    }
}

/// The part of the log that recording vCPUs share: a bounded ring of slots and the counters
/// that say which slots are free. Recording ([`record`](Self::record)) takes no lock: it
/// reserves the next sequence number with one compare-and-swap, writes the record's words into
/// its slot and publishes it. Everything else (hashing, losses, reading, streaming) is the
/// drain side's ([`AuditDrain`]), which one holder at a time runs.
#[derive(Debug)]
pub struct AuditRing {
    vm: u16,
    slots: Vec<Slot>,
    /// The next sequence number to hand out.
    reserved: AtomicU64,
    /// Records `0..retired` left the ring (`dropped`): their slots may be written again. Only
    /// the drain side advances it, after it is done with those records.
    retired: AtomicU64,
    /// Records `0..streamed` went to the host stream or were reported lost to it (the drain
    /// side's figure, mirrored here for the high-water check of recording vCPUs).
    streamed: AtomicU64,
}

impl AuditRing {
    /// An empty ring for VM `vm` holding at most `capacity` records (at least 2: an overflow
    /// record and the record that caused it).
    pub fn new(vm: u16, capacity: usize) -> Self {
        let capacity = capacity.max(2);
        AuditRing {
            vm,
            slots: (0..capacity).map(|_| Slot::new()).collect(),
            reserved: AtomicU64::new(0),
            retired: AtomicU64::new(0),
            streamed: AtomicU64::new(0),
        }
    }

    /// Records the ring can hold.
    pub fn capacity(&self) -> usize {
        self.slots.len()
    }

    /// The sequence number the next record will get.
    pub fn next_sequence(&self) -> u64 {
        self.reserved.load(Ordering::Acquire)
    }

    /// Records lost from the ring since boot (AUDIT_READ x3).
    pub fn dropped(&self) -> u64 {
        self.retired.load(Ordering::Acquire)
    }

    /// Records written (or being written) but not yet sent to the host stream or reported lost
    /// to it.
    pub fn unstreamed(&self) -> u64 {
        let first = self.streamed.load(Ordering::Acquire).max(self.dropped());
        self.next_sequence().saturating_sub(first)
    }

    #[inline(always)]
    fn slot(&self, sequence: u64) -> &Slot {
        &self.slots[(sequence % self.slots.len() as u64) as usize]
    }

    /// Takes the next sequence number if its slot is free.
    #[inline(always)]
    fn reserve(&self) -> Result<u64, RingFull> {
        let capacity = self.slots.len() as u64;
        let mut next = self.reserved.load(Ordering::Relaxed);
        loop {
            // Acquire: the drain side finished with the retired slot's old record first.
            if next >= self.retired.load(Ordering::Acquire) + capacity {
                return Err(RingFull);
            }
            match self.reserved.compare_exchange_weak(
                next,
                next + 1,
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => return Ok(next),
                Err(now) => next = now,
            }
        }
    }

    /// Writes `record` (sequence, time, VM, vCPU and hash filled in here) into the next slot
    /// and returns its sequence number. Kept private: only events, and the drain side's own
    /// overflow records, become records.
    ///
    /// # Errors
    /// [`RingFull`] when no slot is free; nothing was written and no number was taken.
    #[inline(always)]
    fn write(&self, time: u64, vcpu: u16, mut record: Record) -> Result<u64, RingFull> {
        let sequence = self.reserve()?;
        record.sequence = U64::new(sequence);
        record.timestamp = U64::new(time);
        record.vm = U16::new(self.vm);
        record.vcpu = U16::new(vcpu);
        record.hash = U64::new(0);
        let words: [u64; WORDS] = zerocopy::transmute!(record);
        let slot = self.slot(sequence);
        // Spelled out: the firmware is built for size, which would keep a loop here.
        macro_rules! store {
            ($($i:literal)*) => { $(slot.words[$i].store(words[$i], Ordering::Relaxed);)* };
        }
        store!(0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15);
        // Release: a drain that sees the number sees the words.
        slot.published.store(sequence + 1, Ordering::Release);
        Ok(sequence)
    }

    /// Writes the record of `event` (caused by `vcpu` at counter `time`) into the next slot and
    /// returns its sequence number: the caller's whole cost of an audit record. Its hash is
    /// computed later, in order, by the drain side ([`AuditDrain`]).
    ///
    /// # Errors
    /// [`RingFull`] when no slot is free.
    #[inline(always)]
    pub fn record(&self, time: u64, vcpu: u16, event: &Event) -> Result<u64, RingFull> {
        self.write(time, vcpu, event.encode())
    }

    /// Record `sequence` once its writer has published it. A writer holds no lock and never
    /// waits between taking a number and publishing it, so the wait is short. Inlined: the
    /// stream hashes and formats the words where they land, without copying them again.
    #[inline(always)]
    fn published(&self, sequence: u64) -> abi::RecordWords {
        let slot = self.slot(sequence);
        slot.wait_published(sequence);
        slot.load_words()
    }
}

/// The drain side of the log: the hash chain, losses and the host stream's progress. One
/// holder at a time uses it (the hypervisor keeps it behind a lock), always with the same
/// [`AuditRing`].
#[derive(Debug)]
pub struct AuditDrain {
    /// Records `0..sealed` have their hash; `last_hash` is the hash of record `sealed - 1`.
    sealed: u64,
    last_hash: u64,
    /// Hash of the newest retired record (the chain anchor of the oldest one held).
    evicted_hash: u64,
    /// Ring losses `0..reported` are covered by ring overflow records.
    reported: u64,
    /// Sequence number of the newest ring overflow record.
    newest_overflow: Option<u64>,
    /// Records `0..streamed` went to the host stream (or were reported lost to it).
    streamed: u64,
}

impl Default for AuditDrain {
    fn default() -> Self {
        Self::new()
    }
}

impl AuditDrain {
    /// The drain side of an empty ring.
    pub const fn new() -> Self {
        AuditDrain {
            sealed: 0,
            last_hash: GENESIS_HASH,
            evicted_hash: GENESIS_HASH,
            reported: 0,
            newest_overflow: None,
            streamed: 0,
        }
    }

    /// Computes the hash of every record taken so far, in sequence order (waiting for records
    /// being written to be published).
    pub fn seal(&mut self, ring: &AuditRing) {
        let end = ring.next_sequence();
        while self.sealed < end {
            let words = ring.published(self.sealed);
            self.last_hash = abi::chain_hash_words(self.last_hash, &words);
            ring.slot(self.sealed).words[HASH_WORD].store(self.last_hash, Ordering::Relaxed);
            self.sealed += 1;
        }
    }

    /// Makes room after [`AuditRing::record`] found the ring full: retires the oldest records
    /// (a batch, so a full ring takes this path once per batch, not once per record) and writes
    /// an overflow record for the loss unless one is held already.
    pub fn make_room(&mut self, ring: &AuditRing, time: u64, vcpu: u16) {
        self.retire(ring, Self::room_batch(ring));
        let ring_overflow_held = self.newest_overflow.is_some_and(|s| s >= ring.dropped());
        if !ring_overflow_held {
            self.report_losses(ring, time, vcpu);
        }
    }

    /// Records [`make_room`](Self::make_room) retires at a time.
    fn room_batch(ring: &AuditRing) -> usize {
        (ring.capacity() / 16).max(2)
    }

    /// Whether [`make_room`](Self::make_room) would now retire records the host stream has not
    /// had yet. If not, the records waiting for the stream can go on waiting (for an idle vCPU,
    /// a reader or the high water): a full ring is the steady state of a busy log, whose oldest
    /// records were streamed long ago.
    pub fn make_room_needs_stream(&self, ring: &AuditRing) -> bool {
        self.streamed.max(ring.dropped()) < ring.dropped() + Self::room_batch(ring) as u64
    }

    /// Retires the oldest `count` records held (fewer if the ring holds fewer).
    fn retire(&mut self, ring: &AuditRing, count: usize) {
        // A retired record's hash is the chain anchor of the loss: seal first.
        self.seal(ring);
        let dropped = ring.dropped();
        let until = (dropped + count as u64).min(self.sealed);
        if until > dropped {
            self.evicted_hash = ring.slot(until - 1).words[HASH_WORD].load(Ordering::Relaxed);
            // Release: nothing of the retired records is read after this.
            ring.retired.store(until, Ordering::Release);
        }
    }

    /// Writes an overflow record for ring losses no overflow record covers yet, if any. Call it
    /// before [`read`](Self::read) answers a guest, so the reader finds every loss recorded.
    pub fn report_losses(&mut self, ring: &AuditRing, time: u64, vcpu: u16) {
        if self.reported < ring.dropped() {
            let first = self.reported;
            let sequence = self.append_overflow(ring, time, vcpu, first, 0);
            self.reported = ring.dropped();
            self.newest_overflow = Some(sequence);
        }
    }

    /// Appends an overflow record for the lost sequences `first..dropped` (retiring more first
    /// if the ring is full: the record then counts those too) and returns its sequence number.
    fn append_overflow(
        &mut self,
        ring: &AuditRing,
        time: u64,
        vcpu: u16,
        first: u64,
        flags: u32,
    ) -> u64 {
        loop {
            // Only this side retires, so `dropped` holds still while the record is written.
            let mut r = Record::empty(kind::OVERFLOW);
            r.flags = U32::new(flags);
            r.detail = U64::new(first);
            r.dropped = U64::new(ring.dropped() - first);
            r.tag = U64::new(self.evicted_hash);
            match ring.write(time, vcpu, r) {
                Ok(sequence) => return sequence,
                Err(RingFull) => self.retire(ring, 1),
            }
        }
    }

    /// Up to `max` records from `first` on, oldest first. A `first` older than the oldest record
    /// held reads from the oldest held; one beyond the newest reads nothing and says where the
    /// next record will be.
    pub fn read(&mut self, ring: &AuditRing, first: u64, max: usize) -> ReadResult {
        self.seal(ring);
        let oldest = ring.dropped();
        let start = first.clamp(oldest, self.sealed);
        let end = start + (self.sealed - start).min(max as u64);
        ReadResult {
            records: (start..end).map(|s| ring.slot(s).load()).collect(),
            next_sequence: end,
            dropped: oldest,
        }
    }

    /// Copies at most `max` records the host stream has not had yet into `out`, oldest first,
    /// and marks them streamed. If some were retired before they could be streamed, they are
    /// followed (in a later call if `max` cuts them off) by a [`flag::STREAM_LOSS`] overflow
    /// record covering exactly those.
    pub fn take_unstreamed_into(
        &mut self,
        ring: &AuditRing,
        time: u64,
        vcpu: u16,
        out: &mut Vec<Record>,
        max: usize,
    ) {
        self.stream_unstreamed(ring, time, vcpu, max, |words| {
            out.push(zerocopy::transmute!(words.map(u64::to_le)));
        });
    }

    /// [`Self::take_unstreamed_into`] handing each record to `each` as [`abi::RecordWords`]
    /// instead of copying it out, and returning how many it handed. This is the hypervisor's
    /// stream: each record is read from its slot once, hashed (if it has no hash yet) and
    /// given to `each` from the same registers and stack words, in the aligned form that
    /// `Record`'s byte-aligned fields lack on targets without unaligned access.
    pub fn stream_unstreamed(
        &mut self,
        ring: &AuditRing,
        time: u64,
        vcpu: u16,
        max: usize,
        mut each: impl FnMut(&abi::RecordWords),
    ) -> usize {
        if self.streamed < ring.dropped() {
            let first = self.streamed;
            self.append_overflow(ring, time, vcpu, first, flag::STREAM_LOSS);
        }
        // Records `first..sealed` have their hash (a reader or a retirement sealed them); the
        // rest are sealed here, in order, as they are streamed. Retirement stops at `sealed`,
        // so `first <= sealed`.
        let first = self.streamed.max(ring.dropped());
        let end = first + (ring.next_sequence() - first).min(max as u64);
        for sequence in first..end {
            let slot = ring.slot(sequence);
            let sealed = sequence < self.sealed;
            if !sealed {
                debug_assert_eq!(sequence, self.sealed);
                slot.wait_published(sequence);
            }
            // One array, filled in place, hashed and handed on (no copies between).
            let mut words = slot.load_words();
            if !sealed {
                self.last_hash = abi::chain_hash_words(self.last_hash, &words);
                words[HASH_WORD] = self.last_hash;
                slot.words[HASH_WORD].store(self.last_hash, Ordering::Relaxed);
                self.sealed += 1;
            }
            each(&words);
        }
        self.streamed = end;
        ring.streamed.store(end, Ordering::Release);
        (end - first) as usize
    }

    /// [`Self::stream_unstreamed`] a batch of at most `batch` records at a time, for as long as
    /// records wait and `go_on` (asked before each batch) agrees; returns how many it handed
    /// to `each`. Each of the hypervisor's drains is this loop with its own stop: below the
    /// high water, an interrupt for the guest, or nothing left. Records that arrive meanwhile
    /// are taken too, so a stop that never comes would stream for as long as others record:
    /// the bounded stops are what keep a call's time at EL2 bounded (I6).
    pub fn stream_batches(
        &mut self,
        ring: &AuditRing,
        time: u64,
        vcpu: u16,
        batch: usize,
        mut go_on: impl FnMut(&AuditRing) -> bool,
        mut each: impl FnMut(&abi::RecordWords),
    ) -> usize {
        let mut total = 0;
        while go_on(ring) {
            let streamed = self.stream_unstreamed(ring, time, vcpu, batch, &mut each);
            if streamed == 0 {
                break;
            }
            total += streamed;
        }
        total
    }
}

/// A log owned by one holder: an [`AuditRing`] with its [`AuditDrain`], recording through
/// `&mut self` (tests and host tools; the hypervisor shares the ring between vCPUs instead).
#[derive(Debug)]
pub struct AuditLog {
    ring: AuditRing,
    drain: AuditDrain,
    /// What [`take_unstreamed`](Self::take_unstreamed) lends out.
    streaming: Vec<Record>,
}

impl AuditLog {
    /// An empty log for VM `vm` holding at most `capacity` records (at least 2).
    pub fn new(vm: u16, capacity: usize) -> Self {
        AuditLog {
            ring: AuditRing::new(vm, capacity),
            drain: AuditDrain::new(),
            streaming: Vec::new(),
        }
    }

    /// Records written but not yet sent to the host stream (or reported lost to it).
    pub fn unstreamed(&self) -> u64 {
        self.ring.unstreamed()
    }

    /// Computes the hash of every record that has none yet, in sequence order.
    pub fn seal(&mut self) {
        self.drain.seal(&self.ring);
    }

    /// The sequence number the next record will get.
    pub fn next_sequence(&self) -> u64 {
        self.ring.next_sequence()
    }

    /// Records lost from the ring since boot (AUDIT_READ x3).
    pub fn dropped(&self) -> u64 {
        self.ring.dropped()
    }

    /// Records the ring holds now.
    pub fn len(&self) -> usize {
        (self.ring.next_sequence() - self.ring.dropped()) as usize
    }

    /// Whether the ring is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Writes the record of `event`, caused by `vcpu` at counter `time`, and returns its sequence
    /// number. A full ring loses its oldest records (see the module docs for how that is
    /// reported).
    pub fn record(&mut self, time: u64, vcpu: u16, event: &Event) -> u64 {
        loop {
            match self.ring.record(time, vcpu, event) {
                Ok(sequence) => return sequence,
                Err(RingFull) => self.drain.make_room(&self.ring, time, vcpu),
            }
        }
    }

    /// AUDIT_MARK: writes a mark with `tag` and returns its sequence number.
    pub fn mark(&mut self, time: u64, vcpu: u16, tag: u64) -> u64 {
        self.record(time, vcpu, &Event::Mark { tag })
    }

    /// See [`AuditDrain::report_losses`].
    pub fn report_losses(&mut self, time: u64, vcpu: u16) {
        self.drain.report_losses(&self.ring, time, vcpu);
    }

    /// See [`AuditDrain::read`].
    pub fn read(&mut self, first: u64, max: usize) -> ReadResult {
        self.drain.read(&self.ring, first, max)
    }

    /// The records the host stream has not had yet, oldest first, and marks them streamed; see
    /// [`AuditDrain::take_unstreamed_into`].
    pub fn take_unstreamed(&mut self, time: u64, vcpu: u16) -> impl Iterator<Item = &Record> {
        let mut out = core::mem::take(&mut self.streaming);
        out.clear();
        self.take_unstreamed_into(time, vcpu, &mut out, usize::MAX);
        self.streaming = out;
        self.streaming.iter()
    }

    /// See [`AuditDrain::take_unstreamed_into`].
    pub fn take_unstreamed_into(
        &mut self,
        time: u64,
        vcpu: u16,
        out: &mut Vec<Record>,
        max: usize,
    ) {
        self.drain
            .take_unstreamed_into(&self.ring, time, vcpu, out, max);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::string::ToString;
    use proptest::prelude::*;

    fn kinds(records: &[Record]) -> Vec<u8> {
        records.iter().map(|r| r.kind).collect()
    }

    /// Checks sequence continuity and the chain of `records`, starting from `previous`.
    fn chained(records: &[Record], mut previous: u64) -> bool {
        records
            .windows(2)
            .all(|w| w[1].sequence.get() == w[0].sequence.get() + 1)
            && records.iter().all(|r| {
                let ok = r.hash_follows(previous);
                previous = r.hash.get();
                ok
            })
    }

    #[test]
    fn records_chain_and_number_from_zero() {
        let mut log = AuditLog::new(1, 16);
        assert_eq!(
            log.record(
                5,
                0,
                &Event::GuestStart {
                    entry: 0x4008_0000,
                    ram: 1 << 30
                }
            ),
            0
        );
        assert_eq!(log.mark(6, 1, 0xabc), 1);
        let read = log.read(0, 10);
        assert_eq!(read.next_sequence, 2);
        assert_eq!(read.dropped, 0);
        assert_eq!(kinds(&read.records), [kind::GUEST_START, kind::MARK]);
        assert!(chained(&read.records, GENESIS_HASH));
        assert_eq!(read.records[1].tag.get(), 0xabc);
        assert_eq!(read.records[1].vcpu.get(), 1);
        assert_eq!(read.records[1].vm.get(), 1);
        assert_eq!(read.records[1].timestamp.get(), 6);
    }

    #[test]
    fn read_windows() {
        let mut log = AuditLog::new(1, 8);
        for tag in 0..5 {
            log.mark(0, 0, tag);
        }
        let middle = log.read(2, 2);
        assert_eq!(middle.records.len(), 2);
        assert_eq!(middle.records[0].sequence.get(), 2);
        assert_eq!(middle.next_sequence, 4);
        let beyond = log.read(u64::MAX, 10);
        assert!(beyond.records.is_empty());
        assert_eq!(beyond.next_sequence, 5);
        assert_eq!(log.read(0, 0).records.len(), 0);
    }

    #[test]
    fn overflow_evicts_oldest_counts_and_reports() {
        let mut log = AuditLog::new(1, 8);
        let mut hashes = Vec::new();
        for tag in 0..8 {
            log.mark(0, 0, tag);
            hashes.push(log.read(tag, 1).records[0].hash.get());
        }
        assert_eq!(log.dropped(), 0);
        // The ninth record finds the ring full: 0 and 1 are retired, an overflow record reports
        // them, then the mark is written.
        assert_eq!(log.mark(0, 0, 8), 9);
        assert_eq!(log.dropped(), 2);
        let read = log.read(0, 100);
        assert_eq!(read.records[0].sequence.get(), 2, "oldest held = dropped");
        assert_eq!(read.records.len(), 8);
        let overflow = read
            .records
            .iter()
            .find(|r| r.kind == kind::OVERFLOW)
            .unwrap();
        assert_eq!(overflow.sequence.get(), 8);
        assert_eq!((overflow.detail.get(), overflow.dropped.get()), (0, 2));
        assert_eq!(
            overflow.tag.get(),
            hashes[1],
            "anchor: hash of the last lost record"
        );
        assert!(chained(&read.records, hashes[1]));
        // More losses accumulate while that overflow record is held (a full ring retires two
        // at a time at this capacity: records 10 and 11 each found it full)...
        for tag in 0..3 {
            log.mark(0, 0, 100 + tag);
        }
        assert_eq!(log.dropped(), 6);
        // ...and a reader gets them reported before it reads.
        log.report_losses(0, 0);
        let read = log.read(0, 100);
        let last = read
            .records
            .iter()
            .rev()
            .find(|r| r.kind == kind::OVERFLOW)
            .unwrap();
        assert_eq!(last.detail.get() + last.dropped.get(), read.dropped);
        assert_eq!(last.detail.get(), 2);
        assert_eq!(read.records[0].sequence.get(), read.dropped);
    }

    #[test]
    fn held_stream_reports_what_it_lost() {
        let mut log = AuditLog::new(1, 4);
        let streamed: Vec<u64> = log
            .take_unstreamed(0, 0)
            .map(|r| r.sequence.get())
            .collect();
        assert!(streamed.is_empty());
        log.mark(0, 0, 0);
        assert_eq!(log.take_unstreamed(0, 0).count(), 1);
        for tag in 1..10 {
            log.mark(0, 0, tag);
        }
        let lines: Vec<Record> = log.take_unstreamed(1, 0).copied().collect();
        let loss = *lines.last().unwrap();
        assert_eq!(loss.kind, kind::OVERFLOW);
        assert_eq!(loss.flags.get() & flag::STREAM_LOSS, flag::STREAM_LOSS);
        assert_eq!(
            loss.sequence.get(),
            log.next_sequence() - 1,
            "in its place: the newest"
        );
        assert_eq!(
            loss.detail.get(),
            1,
            "everything after the last streamed record"
        );
        let resume = loss.detail.get() + loss.dropped.get();
        assert_eq!(
            lines[0].sequence.get(),
            resume,
            "the stream resumes right after the loss"
        );
        assert!(
            lines[0].hash_follows(loss.tag.get()),
            "its chain from the anchor"
        );
        assert!(check_stream(&lines_with_first(&lines)).is_ok());
        assert_eq!(log.take_unstreamed(2, 0).count(), 0);
    }

    #[test]
    fn events_encode_their_fields() {
        let m = Maintenance {
            cmo: Some(CacheOp::CleanInvalidate),
            cmo_lines: 64,
            tlbi: TlbiScope::ByIpa,
            tlbi_count: 3,
            smmu_commands: 2,
            smmu_kinds: abi::smmu_command::TLBI_S2_IPA | abi::smmu_command::SYNC,
            break_before_make: true,
            hypervisor_alias: true,
        };
        let r = Event::AttributeChange {
            ipa: 0x4010_0000,
            size: 0x1000,
            old: Attribute::WriteBack,
            new: Attribute::NonCacheable,
            maintenance: m,
            status: 0,
        }
        .encode();
        assert_eq!(
            r.to_string(),
            "AUDIT v1 seq=0 t=0 vm=0 vcpu=0 kind=attr flags=0x3 fn=0xc6000010 ipa=0x40100000 \
             size=0x1000 old=wb new=nc cmo=clean-inv:64 tlbi=ipa:3 smmu=2:0x14 sid=- access=- \
             dir=- status=0 detail=0x0 tag=0x0 dropped=0 hash=0x0000000000000000"
        );
        let fault = Event::Stage2Fault {
            ipa: 0x905_0000,
            access: Access::Read,
        }
        .encode();
        assert_eq!(
            (fault.kind, fault.access, fault.ipa.get()),
            (kind::STAGE2_FAULT, access::READ, 0x905_0000)
        );
        let map = Event::DmaMap {
            stream_id: 0x10,
            ipa: 0x4020_0000,
            size: 0x2000,
            direction: DmaDirection::FromDevice,
            handle: 7,
            attribute: None,
            maintenance: Maintenance::default(),
            status: 0,
        }
        .encode();
        assert_eq!(
            (
                map.stream_id.get(),
                map.direction,
                map.detail.get(),
                map.new_attr
            ),
            (0x10, direction::FROM_DEVICE, 7, attr::NONE)
        );
        let stop = Event::GuestStop {
            reason: StopReason::SystemReset,
        }
        .encode();
        assert_eq!(stop.detail.get(), stop_reason::SYSTEM_RESET);
    }

    #[test]
    fn levels() {
        let cmo = Event::Cmo {
            function: function::CACHE_OP,
            address: 0,
            size: 64,
            op: CacheOp::Clean,
            lines: 1,
            widened: false,
            va: None,
            status: 0,
        };
        let mark = Event::Mark { tag: 1 };
        assert!(AuditLevel::All.admits(&cmo));
        assert!(!AuditLevel::Changes.admits(&cmo));
        assert!(AuditLevel::Changes.admits(&mark));
        assert!(!AuditLevel::Off.admits(&mark));
    }

    /// Several threads record at once into one small ring while each of them, at a full ring
    /// or at half a ring waiting, drains it the way the hypervisor does (stream first, then
    /// retire): every record reaches the stream once, numbered without gaps, chained, and each
    /// thread's records in its own order. A reader meanwhile reads gap-free, chained windows.
    #[test]
    fn concurrent_recorders_lose_nothing_from_the_stream() {
        use std::sync::Mutex;
        const THREADS: u64 = 3;
        const EACH: u64 = 1000;
        let ring = AuditRing::new(1, 64);
        let drain = Mutex::new((AuditDrain::new(), Vec::<Record>::new()));
        let stream_some = |drain: &mut (AuditDrain, Vec<Record>)| {
            let (side, stream) = drain;
            side.take_unstreamed_into(&ring, 0, 0, stream, usize::MAX);
        };
        std::thread::scope(|scope| {
            for thread in 0..THREADS {
                let (ring, drain) = (&ring, &drain);
                scope.spawn(move || {
                    for i in 0..EACH {
                        let event = Event::Mark {
                            tag: thread << 32 | i,
                        };
                        loop {
                            match ring.record(0, thread as u16, &event) {
                                Ok(_) => break,
                                Err(RingFull) => {
                                    let mut d = drain.lock().unwrap();
                                    stream_some(&mut d);
                                    d.0.make_room(ring, 0, thread as u16);
                                }
                            }
                        }
                        if ring.unstreamed() >= 32 {
                            stream_some(&mut drain.lock().unwrap());
                        }
                    }
                });
            }
            scope.spawn(|| {
                for _ in 0..200 {
                    let mut d = drain.lock().unwrap();
                    let read = d.0.read(&ring, 0, usize::MAX);
                    assert!(chained(&read.records, d.0.evicted_hash));
                    if let Some(first) = read.records.first() {
                        assert_eq!(first.sequence.get(), read.dropped);
                    }
                }
            });
        });
        let mut d = drain.lock().unwrap();
        stream_some(&mut d);
        let stream = &d.1;
        assert!(ring.dropped() > 0, "the ring overflowed");
        assert_eq!(stream.len() as u64, ring.next_sequence());
        check_stream(stream).unwrap();
        assert!(stream
            .iter()
            .all(|r| r.flags.get() & flag::STREAM_LOSS == 0));
        for thread in 0..THREADS {
            let tags: Vec<u64> = stream
                .iter()
                .filter(|r| r.kind == kind::MARK && r.vcpu.get() == thread as u16)
                .map(|r| r.tag.get())
                .collect();
            let expected: Vec<u64> = (0..EACH).map(|i| thread << 32 | i).collect();
            assert_eq!(tags, expected);
        }
    }

    /// Making room needs the stream only while the records it would retire have not been
    /// streamed: a full ring whose old end was streamed lets the rest wait.
    #[test]
    fn making_room_waits_for_the_stream_only_for_unstreamed_old_records() {
        let ring = AuditRing::new(1, 8);
        let mut drain = AuditDrain::new();
        for tag in 0..8 {
            assert_eq!(ring.record(0, 0, &Event::Mark { tag }), Ok(tag));
        }
        assert!(drain.make_room_needs_stream(&ring));
        assert_eq!(drain.stream_unstreamed(&ring, 0, 0, 3, |_| {}), 3);
        // A batch is two records here, both streamed.
        assert!(!drain.make_room_needs_stream(&ring));
        drain.make_room(&ring, 0, 0);
        assert_eq!(ring.dropped(), 2);
        while ring.record(0, 0, &Event::Mark { tag: 9 }).is_ok() {}
        // Records 2 and 3 go next; 3 has not been streamed.
        assert!(drain.make_room_needs_stream(&ring));
    }

    /// A full ring refuses a record without taking a number; the drain side retires the oldest
    /// (sealed first: the anchor is the last retired record's hash) and the record fits.
    #[test]
    fn a_full_ring_refuses_until_room_is_made() {
        let ring = AuditRing::new(1, 4);
        let mut drain = AuditDrain::new();
        for tag in 0..4 {
            assert_eq!(ring.record(0, 0, &Event::Mark { tag }), Ok(tag));
        }
        assert_eq!(ring.record(0, 0, &Event::Mark { tag: 4 }), Err(RingFull));
        assert_eq!(ring.next_sequence(), 4);
        let before = drain.read(&ring, 0, 4).records;
        drain.make_room(&ring, 0, 0);
        assert_eq!(ring.dropped(), 2);
        assert_eq!(drain.evicted_hash, before[1].hash.get());
        assert_eq!(ring.record(0, 0, &Event::Mark { tag: 4 }), Ok(5));
        let read = drain.read(&ring, 0, 10);
        assert_eq!(
            kinds(&read.records),
            [kind::MARK, kind::MARK, kind::OVERFLOW, kind::MARK]
        );
        assert!(chained(&read.records, before[1].hash.get()));
    }

    /// Records marks `0..count` into `ring`.
    fn marks(ring: &AuditRing, count: u64) {
        for tag in 0..count {
            ring.record(0, 0, &Event::Mark { tag }).unwrap();
        }
    }

    #[test]
    fn batches_stop_below_a_limit_having_streamed_whole_batches() {
        // The high-water drain: 21 records waiting, a limit of 20, batches of 4: one batch
        // brings them to 17, below the limit, and the rest wait (a call's stream is bounded).
        let ring = AuditRing::new(1, 64);
        let mut drain = AuditDrain::new();
        marks(&ring, 21);
        let mut seen = Vec::new();
        let streamed = drain.stream_batches(
            &ring,
            0,
            0,
            4,
            |ring| ring.unstreamed() >= 20,
            |words| seen.push(words[1]),
        );
        assert_eq!(streamed, 4);
        assert_eq!(seen, [0, 1, 2, 3], "oldest first");
        assert_eq!(ring.unstreamed(), 17);
        // At 25 waiting, two batches.
        marks(&ring, 8);
        assert_eq!(
            drain.stream_batches(&ring, 0, 0, 4, |r| r.unstreamed() >= 20, |_| {}),
            8
        );
        assert_eq!(ring.unstreamed(), 17);
    }

    #[test]
    fn batches_stop_when_told_or_when_nothing_waits() {
        // The idle drain: it asks before each batch (an interrupt for the guest stops it)...
        let ring = AuditRing::new(1, 64);
        let mut drain = AuditDrain::new();
        marks(&ring, 10);
        let mut asked = 0;
        let streamed = drain.stream_batches(
            &ring,
            0,
            0,
            4,
            |_| {
                asked += 1;
                asked <= 2
            },
            |_| {},
        );
        assert_eq!((streamed, asked, ring.unstreamed()), (8, 3, 2));
        // ...and, never told to stop, streams all there is and returns.
        assert_eq!(drain.stream_batches(&ring, 0, 0, 4, |_| true, |_| {}), 2);
        assert_eq!(ring.unstreamed(), 0);
        assert_eq!(drain.stream_batches(&ring, 0, 0, 4, |_| true, |_| {}), 0);
    }

    /// A stream of records `0`, then `rest`: the checks a stream reader makes.
    fn lines_with_first(rest: &[Record]) -> Vec<Record> {
        let mut log = AuditLog::new(1, 4);
        log.mark(0, 0, 0);
        let mut all: Vec<Record> = log.read(0, 1).records;
        all.extend_from_slice(rest);
        all
    }

    /// What a reader of the stream checks: increasing numbers, every gap `a..b` explained by a
    /// later STREAM_LOSS record `(a, b - a)` whose anchor chains to `b`, every hash chained.
    fn check_stream(stream: &[Record]) -> Result<(), alloc::string::String> {
        let mut previous = GENESIS_HASH;
        let mut expected = 0;
        for (i, r) in stream.iter().enumerate() {
            let s = r.sequence.get();
            if s != expected {
                let loss = stream[i..].iter().find(|l| {
                    l.kind == kind::OVERFLOW
                        && l.flags.get() & flag::STREAM_LOSS != 0
                        && l.detail.get() == expected
                        && l.detail.get() + l.dropped.get() == s
                });
                match loss {
                    Some(loss) => previous = loss.tag.get(),
                    None => return Err(alloc::format!("gap {expected}..{s} unexplained")),
                }
            }
            if !r.hash_follows(previous) {
                return Err(alloc::format!("chain broken at {s}"));
            }
            previous = r.hash.get();
            expected = s + 1;
        }
        Ok(())
    }

    proptest! {
        /// Whatever the interleaving of records, reads, held stretches and stream drains: the
        /// ring never exceeds its capacity, every read is gap-free, chained and starts at
        /// `dropped`, the ring overflow records cover `0..` exactly once in order, and the stream
        /// passes a reader's checks.
        #[test]
        fn ring_and_stream_invariants(
            capacity in 2usize..12,
            ops in proptest::collection::vec(0u8..8, 1..200),
        ) {
            let mut log = AuditLog::new(1, capacity);
            let mut stream = Vec::new();
            let mut ring_reports = Vec::new();
            let mut holding = false;
            for (i, op) in ops.iter().enumerate() {
                match op {
                    0..=4 => { log.mark(i as u64, 0, i as u64); }
                    5 => log.report_losses(i as u64, 0),
                    6 => holding = !holding,
                    _ => {}
                }
                prop_assert!(log.len() <= capacity);
                if !holding {
                    stream.extend(log.take_unstreamed(i as u64, 0).copied());
                }
                let read = log.read(0, usize::MAX);
                if let Some(first) = read.records.first() {
                    prop_assert_eq!(first.sequence.get(), read.dropped);
                }
                prop_assert!(chained(&read.records, log.drain.evicted_hash));
            }
            stream.extend(log.take_unstreamed(0, 0).copied());
            prop_assert_eq!(stream.last().map_or(0, |r| r.sequence.get() + 1), log.next_sequence());
            if let Err(e) = check_stream(&stream) {
                prop_assert!(false, "{}", e);
            }
            for r in &stream {
                if r.kind == kind::OVERFLOW && r.flags.get() & flag::STREAM_LOSS == 0 {
                    ring_reports.push((r.detail.get(), r.dropped.get()));
                }
            }
            // Reports lost from a held stream leave holes; otherwise they tile `0..` exactly.
            let stream_lost = stream
                .iter()
                .any(|r| r.kind == kind::OVERFLOW && r.flags.get() & flag::STREAM_LOSS != 0);
            let mut covered = 0;
            for (first, count) in ring_reports {
                if stream_lost {
                    prop_assert!(first >= covered);
                } else {
                    prop_assert_eq!(first, covered);
                }
                covered = first + count;
            }
            prop_assert!(covered <= log.dropped());
        }
    }
}
