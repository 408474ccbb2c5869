//! Audit records: the fixed 128-byte layout that AUDIT_READ copies into a guest buffer, the
//! running hash that chains them, and the one-line text form the hypervisor streams to the host.
//!
//! Every integer is little-endian. A record is parsed from bytes with [`Record::parse`] (never
//! cast from a pointer). Fields that a kind does not use are zero, except the "none" markers
//! named below (`0xff` for the one-byte enumerations that have a meaningful zero, `0xffff_ffff`
//! for the StreamID). No field ever holds a host physical address: addresses are IPAs (or a
//! guest VA, flagged), as the guest sees them.
//!
//! The hash chain: `hash(n) = SipHash-2-4(HASH_KEY, hash(n - 1) as 8 LE bytes ++ bytes 0..120 of
//! record n)`, with `hash(-1) = 0` (see [`chain_hash`]). It runs over every record the
//! hypervisor ever wrote, in sequence order, whether or not a reader still has them; it detects
//! an altered, dropped or reordered record, and is not a signature.

use core::fmt;

use zerocopy::byteorder::little_endian::{I64, U16, U32, U64};
use zerocopy::{FromBytes, FromZeros, Immutable, IntoBytes, KnownLayout};

/// Size of one record in bytes.
pub const RECORD_SIZE: usize = 128;
/// The layout version this crate describes (the record's `version` field, `v1` in a line).
pub const LAYOUT_VERSION: u16 = 1;
/// Bytes of a record that the hash covers: everything before the `hash` field.
pub const HASHED_BYTES: usize = 120;
/// The fixed SipHash-2-4 key of the hash chain: the ASCII bytes `stagehan` and `d-audit1` read
/// as little-endian words. It is public: the chain detects accidents and naive edits, not forgers.
pub const HASH_KEY: (u64, u64) = (
    u64::from_le_bytes(*b"stagehan"),
    u64::from_le_bytes(*b"d-audit1"),
);
/// The `prev` hash of the first record (sequence 0).
pub const GENESIS_HASH: u64 = 0;

/// One audit record, as it lies in memory and in an AUDIT_READ buffer (128 bytes, LE).
#[derive(Clone, Copy, Debug, PartialEq, Eq, FromBytes, IntoBytes, KnownLayout, Immutable)]
#[repr(C)]
pub struct Record {
    /// 0x00: layout version, [`LAYOUT_VERSION`].
    pub version: U16,
    /// 0x02: what happened, one of [`kind`].
    pub kind: u8,
    /// 0x03: reserved, zero.
    pub reserved0: u8,
    /// 0x04: bits of [`flag`].
    pub flags: U32,
    /// 0x08: sequence number: 0 for the first record after boot, then +1 per record, no gaps.
    pub sequence: U64,
    /// 0x10: the counter (CNTPCT_EL0) when the record was written.
    pub timestamp: U64,
    /// 0x18: VM id (1 for the one guest; 0 for the hypervisor itself).
    pub vm: U16,
    /// 0x1a: the vCPU that caused the event.
    pub vcpu: U16,
    /// 0x1c: the function ID of the call that caused it (0 when no call did).
    pub function: U32,
    /// 0x20: start of the range (an IPA; for a CMO asked by guest VA, [`flag::BY_VA`], the IPA
    /// run it touched, whose VA is in `detail`).
    pub ipa: U64,
    /// 0x28: size of the range in bytes (for a partial call: the part done).
    pub size: U64,
    /// 0x30: stage-2 attribute before ([`attr`]).
    pub old_attr: u8,
    /// 0x31: stage-2 attribute after ([`attr`]); for a DMA map, that of the device's mapping.
    pub new_attr: u8,
    /// 0x32: cache maintenance performed ([`cmo`]).
    pub cmo_op: u8,
    /// 0x33: TLB invalidation scope ([`tlbi`]).
    pub tlbi_scope: u8,
    /// 0x34: access of a fault ([`access`]).
    pub access: u8,
    /// 0x35: DMA direction ([`direction`]).
    pub direction: u8,
    /// 0x36: reserved, zero.
    pub reserved1: U16,
    /// 0x38: TLB invalidation instructions issued.
    pub tlbi_count: U32,
    /// 0x3c: SMMU commands issued (CMD_SYNC included).
    pub smmu_commands: U32,
    /// 0x40: D-cache lines maintained by the CMO.
    pub cmo_lines: U64,
    /// 0x48: StreamID of the device, [`NO_STREAM`] when none.
    pub stream_id: U32,
    /// 0x4c: kinds of SMMU commands issued, bits of [`smmu_command`].
    pub smmu_kinds: U16,
    /// 0x4e: reserved, zero.
    pub reserved2: U16,
    /// 0x50: the status the call returned (ABI or PSCI code; 0 for events that are no call).
    pub status: I64,
    /// 0x58: a kind-specific value: DMA handle, value of a filtered register write, guest-stop
    /// reason ([`stop_reason`]), SMMU event type, first lost sequence of an overflow.
    pub detail: U64,
    /// 0x60: a mark's tag; for an overflow, the hash of the last lost record (the chain anchor).
    pub tag: U64,
    /// 0x68: for an overflow, how many records were lost in the range it reports.
    pub dropped: U64,
    /// 0x70: reserved, zero.
    pub reserved3: U64,
    /// 0x78: the running hash: [`chain_hash`] of the previous record's hash and bytes 0..0x78.
    pub hash: U64,
}

const _: () = assert!(core::mem::size_of::<Record>() == RECORD_SIZE);

/// The StreamID field when no device is involved.
pub const NO_STREAM: u32 = 0xffff_ffff;

/// Record kinds.
pub mod kind {
    /// A range changed stage-2 attribute (MEM_SET_ATTR).
    pub const ATTRIBUTE_CHANGE: u8 = 1;
    /// Cache maintenance asked for by the guest (CACHE_OP, CACHE_OP_BATCH).
    pub const CMO: u8 = 2;
    /// A buffer was mapped for DMA.
    pub const DMA_MAP: u8 = 3;
    /// A DMA mapping was removed.
    pub const DMA_UNMAP: u8 = 4;
    /// A DMA buffer was synchronised for the CPU or the device.
    pub const DMA_SYNC: u8 = 5;
    /// The SMMU reported a fault (a device touched what it may not).
    pub const SMMU_FAULT: u8 = 6;
    /// The guest touched an IPA it does not own; it got an external abort.
    pub const STAGE2_FAULT: u8 = 7;
    /// A call was refused; `status` says why.
    pub const REFUSED: u8 = 8;
    /// The guest was entered for the first time (`ipa` = entry, `size` = RAM size).
    pub const GUEST_START: u8 = 9;
    /// The guest stopped (`detail` = [`super::stop_reason`]).
    pub const GUEST_STOP: u8 = 10;
    /// AUDIT_MARK (`tag`).
    pub const MARK: u8 = 11;
    /// Records were lost from the ring (`detail` first lost, `dropped` count, `tag` anchor).
    pub const OVERFLOW: u8 = 12;
    /// A guest register write the hypervisor changed or dropped (GIC: LPI enabling).
    pub const FILTERED_WRITE: u8 = 13;
    /// A guest instruction trapped to the hypervisor, which does not emulate it (a system
    /// register the guest may not use, say); the guest got an UNDEF (`detail` = ESR_EL2).
    pub const UNDEFINED: u8 = 14;
}

/// Flag bits.
pub mod flag {
    /// The old stage-2 entry was broken (made invalid), TLB-invalidated and synchronised before
    /// the new one was written.
    pub const BREAK_BEFORE_MAKE: u32 = 1 << 0;
    /// The hypervisor's own alias of the range was unmapped or remapped with the new attribute.
    pub const HYPERVISOR_ALIAS: u32 = 1 << 1;
    /// An INVALIDATE was widened to CLEAN_INVALIDATE.
    pub const WIDENED: u32 = 1 << 2;
    /// A CMO the guest asked for by virtual address: `ipa` is the IPA run it touched and
    /// `detail` the VA of that run's start.
    pub const BY_VA: u32 = 1 << 3;
    /// DMA sync for the device (clear: for the CPU).
    pub const FOR_DEVICE: u32 = 1 << 4;
    /// Overflow: the lost records never reached the host stream either (not only the ring).
    pub const STREAM_LOSS: u32 = 1 << 5;
    /// Fault: it happened at stage 2.
    pub const STAGE2: u32 = 1 << 6;
}

/// Stage-2 attributes (same numbers as [`crate::attr`]).
pub mod attr {
    /// Normal write-back.
    pub const WB: u8 = 0;
    /// Normal non-cacheable.
    pub const NC: u8 = 1;
    /// Not applicable.
    pub const NONE: u8 = 0xff;
}

/// Cache maintenance operations (same numbers as [`crate::cache_op`]).
pub mod cmo {
    /// None.
    pub const NONE: u8 = 0;
    /// Clean to the point of coherency.
    pub const CLEAN: u8 = 1;
    /// Invalidate to the point of coherency.
    pub const INVALIDATE: u8 = 2;
    /// Clean and invalidate to the point of coherency.
    pub const CLEAN_INVALIDATE: u8 = 3;
}

/// TLB invalidation scopes.
pub mod tlbi {
    /// No TLB invalidation.
    pub const NONE: u8 = 0;
    /// Stage 2 by IPA (then stage 1 of the VMID).
    pub const BY_IPA: u8 = 1;
    /// The whole VMID (stage 1 and 2), used for large ranges.
    pub const VMID: u8 = 2;
}

/// Access of a fault.
pub mod access {
    /// Not applicable.
    pub const NONE: u8 = 0;
    /// Read.
    pub const READ: u8 = 1;
    /// Write.
    pub const WRITE: u8 = 2;
    /// Instruction fetch.
    pub const FETCH: u8 = 3;
}

/// DMA directions (same numbers as DMA_MAP x4).
pub mod direction {
    /// Device reads and writes.
    pub const BIDIRECTIONAL: u8 = 0;
    /// Device reads.
    pub const TO_DEVICE: u8 = 1;
    /// Device writes.
    pub const FROM_DEVICE: u8 = 2;
    /// Not applicable.
    pub const NONE: u8 = 0xff;
}

/// SMMU command kinds (bits of `smmu_kinds`).
pub mod smmu_command {
    /// CMD_CFGI_STE.
    pub const CFGI_STE: u16 = 1 << 0;
    /// CMD_CFGI_ALL.
    pub const CFGI_ALL: u16 = 1 << 1;
    /// CMD_TLBI_S2_IPA.
    pub const TLBI_S2_IPA: u16 = 1 << 2;
    /// CMD_TLBI_S12_VMALL.
    pub const TLBI_S12_VMALL: u16 = 1 << 3;
    /// CMD_SYNC.
    pub const SYNC: u16 = 1 << 4;
    /// Any other command.
    pub const OTHER: u16 = 1 << 15;
}

/// Why a guest stopped (`detail` of a guest-stop record).
pub mod stop_reason {
    /// PSCI SYSTEM_OFF.
    pub const SYSTEM_OFF: u64 = 1;
    /// PSCI SYSTEM_RESET.
    pub const SYSTEM_RESET: u64 = 2;
    /// A trap the hypervisor could not handle (SError, unexpected interrupt, unknown trap).
    pub const FAULT: u64 = 3;
}

/// The next link of the hash chain: SipHash-2-4 under [`HASH_KEY`] of `previous` (8 bytes LE)
/// followed by the first [`HASHED_BYTES`] bytes of `record` (its `hash` field is not covered).
///
/// The message is always 128 bytes, 16 little-endian words: SipHash is written out here for
/// exactly that, a word per compression, rather than through a byte-buffered `Hasher` (the
/// drain hashes every record; this is a third of the cost). The tests check it against the
/// `siphasher` crate.
pub fn chain_hash(previous: u64, record: &Record) -> u64 {
    chain_hash_words(previous, &record.words())
}

/// [`chain_hash`] of a record given as its [`RecordWords`] (the drain's form: aligned words
/// read straight from the ring, where `Record`'s byte-aligned fields cost a load per byte on
/// targets without unaligned access).
pub fn chain_hash_words(previous: u64, words: &RecordWords) -> u64 {
    // The initial state, loaded from memory: as constants, the compiler builds each word
    // with four moves.
    static INITIAL: SipState = SipState::new(HASH_KEY);
    let mut state = SipState(core::hint::black_box(&INITIAL).0);
    state.compress(previous);
    // Written out: the loop's own counting would be a tenth of the cost.
    macro_rules! compress {
        ($($i:literal)*) => { $(state.compress(words[$i]);)* };
    }
    compress!(0 1 2 3 4 5 6 7 8 9 10 11 12 13 14);
    const { assert!(HASHED_BYTES / 8 == 15) };
    state.finish(8 + HASHED_BYTES as u64)
}

/// A record as 16 words: its bytes read as little-endian `u64`s (word 1 is the sequence
/// number, word 15 the hash; see the field offsets of [`Record`]).
pub type RecordWords = [u64; RECORD_SIZE / 8];

/// SipHash-2-4's four state words.
struct SipState([u64; 4]);

impl SipState {
    const fn new(key: (u64, u64)) -> SipState {
        SipState([
            key.0 ^ 0x736f_6d65_7073_6575,
            key.1 ^ 0x646f_7261_6e64_6f6d,
            key.0 ^ 0x6c79_6765_6e65_7261,
            key.1 ^ 0x7465_6462_7974_6573,
        ])
    }

    #[inline(always)]
    fn round(&mut self) {
        let [v0, v1, v2, v3] = &mut self.0;
        *v0 = v0.wrapping_add(*v1);
        *v1 = v1.rotate_left(13) ^ *v0;
        *v0 = v0.rotate_left(32);
        *v2 = v2.wrapping_add(*v3);
        *v3 = v3.rotate_left(16) ^ *v2;
        *v0 = v0.wrapping_add(*v3);
        *v3 = v3.rotate_left(21) ^ *v0;
        *v2 = v2.wrapping_add(*v1);
        *v1 = v1.rotate_left(17) ^ *v2;
        *v2 = v2.rotate_left(32);
    }

    /// One message word, two compression rounds.
    #[inline(always)]
    fn compress(&mut self, word: u64) {
        self.0[3] ^= word;
        self.round();
        self.round();
        self.0[0] ^= word;
    }

    /// The last block (no tail bytes: the message is whole words) and four finalisation rounds.
    #[inline(always)]
    fn finish(mut self, message_bytes: u64) -> u64 {
        self.compress(message_bytes << 56);
        self.0[2] ^= 0xff;
        // Written out, as the compressions are.
        self.round();
        self.round();
        self.round();
        self.round();
        self.0[0] ^ self.0[1] ^ self.0[2] ^ self.0[3]
    }
}

impl Record {
    /// An all-zero record of this layout version, with the "none" markers set.
    #[inline(always)]
    pub fn empty(kind: u8) -> Record {
        let mut record = Record::new_zeroed();
        record.version = U16::new(LAYOUT_VERSION);
        record.kind = kind;
        record.old_attr = attr::NONE;
        record.new_attr = attr::NONE;
        record.direction = direction::NONE;
        record.stream_id = U32::new(NO_STREAM);
        record
    }

    /// Parses one record from exactly [`RECORD_SIZE`] bytes (any alignment).
    pub fn parse(bytes: &[u8]) -> Option<Record> {
        Record::read_from_bytes(bytes).ok()
    }

    /// The record's bytes.
    pub fn bytes(&self) -> &[u8] {
        self.as_bytes()
    }

    /// The record as [`RecordWords`].
    pub fn words(&self) -> RecordWords {
        let words: [U64; RECORD_SIZE / 8] = zerocopy::transmute!(*self);
        words.map(|word| word.get())
    }

    /// Whether `hash` is the chain's next link after `previous`.
    pub fn hash_follows(&self, previous: u64) -> bool {
        self.hash.get() == chain_hash(previous, self)
    }

    /// The kind's name as the line format writes it (`None` for an unknown kind).
    pub fn kind_name(&self) -> Option<&'static str> {
        KINDS.iter().find(|(k, _)| *k == self.kind).map(|(_, n)| *n)
    }
}

/// Kind numbers and their names in the line format.
pub const KINDS: [(u8, &str); 14] = [
    (kind::ATTRIBUTE_CHANGE, "attr"),
    (kind::CMO, "cmo"),
    (kind::DMA_MAP, "dma-map"),
    (kind::DMA_UNMAP, "dma-unmap"),
    (kind::DMA_SYNC, "dma-sync"),
    (kind::SMMU_FAULT, "smmu-fault"),
    (kind::STAGE2_FAULT, "s2-fault"),
    (kind::REFUSED, "refused"),
    (kind::GUEST_START, "guest-start"),
    (kind::GUEST_STOP, "guest-stop"),
    (kind::MARK, "mark"),
    (kind::OVERFLOW, "overflow"),
    (kind::FILTERED_WRITE, "filtered"),
    (kind::UNDEFINED, "undef"),
];

const ATTR_NAMES: [(u8, &str); 3] = [(attr::WB, "wb"), (attr::NC, "nc"), (attr::NONE, "-")];
const CMO_NAMES: [(u8, &str); 4] = [
    (cmo::NONE, "-"),
    (cmo::CLEAN, "clean"),
    (cmo::INVALIDATE, "inv"),
    (cmo::CLEAN_INVALIDATE, "clean-inv"),
];
const TLBI_NAMES: [(u8, &str); 3] = [
    (tlbi::NONE, "-"),
    (tlbi::BY_IPA, "ipa"),
    (tlbi::VMID, "vmid"),
];
const ACCESS_NAMES: [(u8, &str); 4] = [
    (access::NONE, "-"),
    (access::READ, "read"),
    (access::WRITE, "write"),
    (access::FETCH, "fetch"),
];
const DIRECTION_NAMES: [(u8, &str); 4] = [
    (direction::BIDIRECTIONAL, "bidir"),
    (direction::TO_DEVICE, "to-device"),
    (direction::FROM_DEVICE, "from-device"),
    (direction::NONE, "-"),
];

/// A one-byte enumeration written by name, or in decimal when it has none (the reference
/// formatter of the tests).
#[cfg(test)]
struct Named<'a>(u8, &'a [(u8, &'static str)]);

#[cfg(test)]
impl fmt::Display for Named<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.1.iter().find(|(v, _)| *v == self.0) {
            Some((_, name)) => f.write_str(name),
            None => write!(f, "{}", self.0),
        }
    }
}

fn parse_named(text: &str, names: &[(u8, &str)]) -> Option<u8> {
    names
        .iter()
        .find(|(_, n)| *n == text)
        .map(|(v, _)| *v)
        .or_else(|| text.parse().ok())
}

/// The marker that starts a record line (the version follows it: `AUDIT v1 `).
pub const LINE_MARKER: &str = "AUDIT v";

/// The line form (no newline):
///
/// ```text
/// AUDIT v1 seq=5 t=123 vm=1 vcpu=0 kind=attr flags=0x3 fn=0xc6000010 ipa=0x40200000
///   size=0x2000 old=wb new=nc cmo=clean-inv:128 tlbi=ipa:2 smmu=0:0x0 sid=- access=- dir=-
///   status=0 detail=0x0 tag=0x0 dropped=0 hash=0x1f2e3d4c5b6a7988
/// ```
///
/// (one line; wrapped here). Every field is always present, in this order; together they give
/// back the record's exact bytes ([`parse_line`]).
/// Longest line [`Record::format_line`] writes (the widest value in every field stays below).
pub const MAX_LINE: usize = 512;

/// Up to 16 bytes of constant text as two little-endian words (first byte lowest) and a
/// length.
#[derive(Clone, Copy)]
struct Packed {
    words: [u64; 2],
    len: u8,
}

impl Packed {
    const fn new(text: &str) -> Packed {
        let bytes = text.as_bytes();
        assert!(!bytes.is_empty() && bytes.len() <= 16);
        let mut words = [0u64; 2];
        let mut i = 0;
        while i < bytes.len() {
            words[i / 8] |= (bytes[i] as u64) << (8 * (i % 8));
            i += 1;
        }
        Packed {
            words,
            len: bytes.len() as u8,
        }
    }
}

/// Constant text of the line, packed at compile time.
macro_rules! text {
    ($text:expr) => {
        const { Packed::new($text) }
    };
}

/// Bytes a one-byte enumeration of `names` takes at most in a line: its longest name, or
/// three decimal digits for a value without one.
const fn widest_name(names: &[(u8, &str)]) -> u32 {
    let mut widest = 3;
    let mut i = 0;
    while i < names.len() {
        if names[i].1.len() > widest {
            widest = names[i].1.len();
        }
        i += 1;
    }
    widest as u32
}

/// ASCII `0` in every byte of a word: ORed into digits 0 to 15 (no carries), it is an
/// immediate operand, where an addition would need it in a register first.
const ZEROS: u64 = 0x3030_3030_3030_3030;

/// The 8 decimal digits of `value` (below 10^8, leading zeros included), most significant
/// first (in the word's lowest byte), as numbers 0-9: both halves of four digits are split at
/// once in the lanes of one word, by multiplications that divide by 100 and 10 exactly in
/// that range.
#[inline(always)]
fn decimal_digits8(value: u32) -> u64 {
    let halves = (value / 10_000) as u64 | (((value % 10_000) as u64) << 32);
    let hundreds = ((halves * 10486) >> 20) & 0x0000_007f_0000_007f;
    let pairs = ((halves - hundreds * 100) << 16) + hundreds;
    let tens = ((pairs * 103) >> 10) & 0x000f_000f_000f_000f;
    tens + ((pairs - tens * 10) << 8)
}

/// The 8 hex digits of `value`, most significant first (in the word's lowest byte), in ASCII.
#[inline(always)]
fn hex_digits8(value: u32) -> u64 {
    let mut nibbles = value as u64;
    nibbles = (nibbles | (nibbles << 16)) & 0x0000_ffff_0000_ffff;
    nibbles = (nibbles | (nibbles << 8)) & 0x00ff_00ff_00ff_00ff;
    nibbles = (nibbles | (nibbles << 4)) & 0x0f0f_0f0f_0f0f_0f0f;
    // Byte i holds nibble i, the least significant first: the line wants the most first.
    nibbles = nibbles.swap_bytes();
    let letters = ((nibbles + 0x0606_0606_0606_0606) >> 4) & 0x0101_0101_0101_0101;
    (nibbles | ZEROS) + letters * (b'a' - b'0' - 10) as u64
}

/// A line as aligned little-endian words (byte `i` is byte `i % 8` of word `i / 8`): the form
/// [`format_line_words`] writes, so that every store is a whole aligned word (targets without
/// unaligned access would otherwise store the line a byte at a time).
pub type LineWords = [u64; MAX_LINE / 8];

/// The first `len` bytes of a line in [`LineWords`], as they lie in memory (on a little-endian
/// target, which both of stagehand's are: the one below keeps a big-endian one from building).
#[cfg(target_endian = "little")]
pub fn line_bytes(line: &LineWords, len: usize) -> &[u8] {
    &line.as_bytes()[..len.min(MAX_LINE)]
}

/// Byte `index` of a line in [`LineWords`].
#[inline(always)]
pub fn line_byte(line: &LineWords, index: usize) -> u8 {
    (line[index / 8] >> (8 * (index % 8))) as u8
}

/// The most bytes one [`LineSink::reserve`] covers, or pushed between two
/// [`LineSink::settle`]s: the transmit FIFO depth of every PL011 revision.
pub const MAX_RESERVATION: u32 = 16;

/// Where [`write_line`] puts a line: pieces of up to 8 bytes, in order.
///
/// A sink with little room (a UART's FIFO) is told ahead how much is coming: the text every
/// line has at that place comes as [`LineSink::text`], of known length, and [`write_line`]
/// reserves room before every other piece, in amounts that depend on the place in the line
/// only, never on the record (a field's usual widest value). Such a sink can count its room
/// at compile time and wait at fixed points instead of counting every piece. The rare value
/// wider than its reservation (a long number) goes out between [`LineSink::settle`]s.
pub trait LineSink {
    /// The pieces other than [`LineSink::text`] from here to the next reservation hold at
    /// most `bytes` bytes, at most [`MAX_RESERVATION`] (fewer is fine).
    #[inline(always)]
    fn reserve(&mut self, bytes: u32) {
        let _ = bytes;
    }

    /// Appends the low `count` (at most 8) bytes of `word`, the first lowest; the bytes above
    /// them are zero.
    fn push(&mut self, word: u64, count: u32);

    /// [`LineSink::push`] of the last `count` (1 to 8) of the 8 bytes of `word`: a number's
    /// digits after its leading zeros, without shifting them down first.
    #[inline(always)]
    fn push_tail(&mut self, word: u64, count: u32) {
        self.push(word >> (8 * (8 - count)), count);
    }

    /// [`LineSink::push`] of a constant (known when the writer is compiled: an enumeration's
    /// name, within a reservation): a sink may take its bytes from elsewhere than the word.
    #[inline(always)]
    fn constant(&mut self, word: u64, count: u32) {
        self.push(word, count);
    }

    /// [`LineSink::constant`] of the text every line has at this place (the keys of the
    /// fields): no reservation covers it, the sink counts its bytes itself.
    #[inline(always)]
    fn text(&mut self, word: u64, count: u32) {
        self.push(word, count);
    }

    /// Makes room for [`MAX_RESERVATION`] bytes beyond every reservation (a FIFO waits until
    /// it is empty). Pieces no reservation covers, at most that many bytes, go out between two
    /// of these: then the sink has again at least the room it counted on.
    #[inline(always)]
    fn settle(&mut self) {}
}

/// A [`LineSink`] into [`LineWords`], without `core::fmt` and with few instructions per byte.
/// The word being filled stays in a register (`pending`); each piece is ORed in and the word
/// stored whole, moving on to the next word when it is full. Word indices wrap at the
/// buffer's end instead of being checked on every piece: the widest line stays well below
/// [`MAX_LINE`] (a test checks the widest record), so they never do.
pub struct LineBuffer<'a> {
    out: &'a mut LineWords,
    /// Index of the word being filled.
    index: usize,
    /// The bytes written to that word so far, the first lowest; the bytes above are zero.
    pending: u64,
    /// Bits of `pending` in use: a multiple of 8, below 64.
    bits: u32,
}

impl<'a> LineBuffer<'a> {
    /// An empty line in `out`.
    pub fn new(out: &'a mut LineWords) -> Self {
        LineBuffer {
            out,
            index: 0,
            pending: 0,
            bits: 0,
        }
    }

    /// Stores the word being filled and returns the line's length in bytes.
    #[inline(always)]
    pub fn finish(self) -> usize {
        self.out[self.index % (MAX_LINE / 8)] = self.pending;
        self.index * 8 + (self.bits / 8) as usize
    }
}

impl LineSink for LineBuffer<'_> {
    #[inline(always)]
    fn push(&mut self, word: u64, count: u32) {
        let filled = self.pending | word << self.bits;
        // The bytes that do not fit in this word (none when it was empty: shifts stay below 64).
        let spilled = (word >> 1) >> (63 - self.bits);
        self.out[self.index % (MAX_LINE / 8)] = filled;
        let bits = self.bits + 8 * count;
        self.index += (bits / 64) as usize;
        self.pending = if bits >= 64 { spilled } else { filled };
        self.bits = bits % 64;
    }
}

/// Text and numbers of the line form, as pieces for a [`LineSink`]: the drain formats every
/// record, on a recording guest's time at the high water. Each method reserves the room its
/// pieces need (see [`LineSink`]): the usual widest value, at most 8 digits; a longer number
/// goes out unplanned, between [`LineSink::settle`]s.
struct LineWriter<'a, S: LineSink>(&'a mut S);

impl<S: LineSink> LineWriter<'_, S> {
    #[inline(always)]
    fn push(&mut self, word: u64, count: u32) {
        self.0.push(word, count);
    }

    #[inline(always)]
    fn reserve(&mut self, bytes: u32) {
        self.0.reserve(bytes);
    }

    /// Up to 16 bytes of the text every line has at this place.
    #[inline(always)]
    fn text(&mut self, text: Packed) {
        let len = text.len as u32;
        self.0.text(text.words[0], len.min(8));
        if len > 8 {
            self.0.text(text.words[1], len - 8);
        }
    }

    /// Up to 16 bytes of constant text, within a reservation.
    #[inline(always)]
    fn constant(&mut self, text: Packed) {
        let len = text.len as u32;
        self.0.constant(text.words[0], len.min(8));
        if len > 8 {
            self.0.constant(text.words[1], len - 8);
        }
    }

    /// `value` below 10^8 without leading zeros, within a reservation.
    #[inline(always)]
    fn decimal_below_10e8(&mut self, value: u32) {
        let digits = decimal_digits8(value);
        // Leading zero digits are the low zero bytes; a zero value keeps one.
        let zeros = (digits | 1 << 56).trailing_zeros() / 8;
        self.0.push_tail(digits | ZEROS, 8 - zeros);
    }

    /// `value` in decimal, which has at most `max_digits` digits (its type's): up to 8 are
    /// reserved, a longer value goes out unplanned (between [`LineSink::settle`]s).
    #[inline(always)]
    fn decimal(&mut self, value: u64, max_digits: u32) {
        const E8: u64 = 100_000_000;
        self.reserve(max_digits.min(8));
        if value < 10 {
            // Most counts are single digits.
            self.push(value + b'0' as u64, 1);
        } else if value < E8 {
            self.decimal_below_10e8(value as u32);
        } else {
            let high = value / E8;
            let low = decimal_digits8((value % E8) as u32) | ZEROS;
            self.0.settle();
            if high < E8 {
                self.decimal_below_10e8(high as u32);
            } else {
                // 17 to 20 digits: at most 12, then 8.
                self.decimal_below_10e8((high / E8) as u32);
                self.push(decimal_digits8((high % E8) as u32) | ZEROS, 8);
                self.0.settle();
            }
            self.push(low, 8);
            self.0.settle();
        }
    }

    #[inline(always)]
    fn signed(&mut self, value: i64) {
        self.reserve(1);
        if value < 0 {
            self.push(b'-' as u64, 1);
        }
        self.decimal(value.unsigned_abs(), 20);
    }

    /// At least `width` hex digits (1 or 8) of `value`, which has at most `max_digits` (its
    /// type's), no prefix: up to 8 digits are reserved, 9 to 16 go out unplanned (between
    /// [`LineSink::settle`]s). All eight or sixteen are converted and the leading zeros beyond
    /// `width` left out.
    #[inline(always)]
    fn hex(&mut self, value: u64, width: u32, max_digits: u32) {
        self.reserve(max_digits.min(8));
        self.hex_reserved(value, width);
    }

    /// [`Self::hex`] within a reservation of 8 digits.
    #[inline(always)]
    fn hex_reserved(&mut self, value: u64, width: u32) {
        if value < 10 && width == 1 {
            // Flags, kinds and most details are 0.
            self.push(value + b'0' as u64, 1);
        } else if value >> 32 == 0 {
            let count = (8 - (value as u32).leading_zeros() / 4).max(width).max(1);
            self.0.push_tail(hex_digits8(value as u32), count);
        } else {
            let count = 16 - value.leading_zeros() / 4;
            let high = hex_digits8((value >> 32) as u32);
            let low = hex_digits8(value as u32);
            self.0.settle();
            self.0.push_tail(high, count - 8);
            self.push(low, 8);
            self.0.settle();
        }
    }

    /// All 16 hex digits of `value`.
    #[inline(always)]
    fn hex16(&mut self, value: u64) {
        self.reserve(16);
        self.push(hex_digits8((value >> 32) as u32), 8);
        self.push(hex_digits8(value as u32), 8);
    }
}

/// A one-byte enumeration by its name in `names` (a table of this module), or in decimal
/// when it has none. Written out as one comparison with a constant per name, which the
/// compiler turns into a jump to that name's constant text.
macro_rules! named {
    ($writer:ident, $value:expr, $names:ident: $($i:literal)*) => {{
        const { assert!($names.len() == [$($i),*].len(), "every name listed") };
        $writer.reserve(const { widest_name(&$names) });
        match $value {
            $(value if value == $names[$i].0 => {
                $writer.constant(const { Packed::new($names[$i].1) })
            })*
            // Below 256: within the reservation.
            value => $writer.decimal_below_10e8(value as u32),
        }
    }};
}

impl Record {
    /// Writes the line form (no newline) into `out` and returns its length:
    ///
    /// ```text
    /// AUDIT v1 seq=5 t=123 vm=1 vcpu=0 kind=attr flags=0x3 fn=0xc6000010 ipa=0x40200000
    ///   size=0x2000 old=wb new=nc cmo=clean-inv:128 tlbi=ipa:2 smmu=0:0x0 sid=- access=- dir=-
    ///   status=0 detail=0x0 tag=0x0 dropped=0 hash=0x1f2e3d4c5b6a7988
    /// ```
    ///
    /// (one line; wrapped here). Every field is always present, in this order; together they
    /// give back the record's exact bytes ([`parse_line`]). Bytes of `out` past the length
    /// are unspecified.
    pub fn format_line(&self, out: &mut [u8; MAX_LINE]) -> usize {
        let mut line = [0; MAX_LINE / 8];
        let len = format_line_words(&self.words(), &mut line);
        for (chunk, word) in out.chunks_exact_mut(8).zip(line) {
            chunk.copy_from_slice(&word.to_le_bytes());
        }
        len
    }
}

/// [`Record::format_line`] of a record given as its [`RecordWords`] (the drain's form; see
/// [`chain_hash_words`]), into [`LineWords`]. Bytes past the length are zero up to the end of
/// their word.
pub fn format_line_words(words: &RecordWords, out: &mut LineWords) -> usize {
    let mut line = LineBuffer::new(out);
    write_line(words, &mut line, false);
    line.finish()
}

/// [`format_line_words`] followed by `\r\n`: the line as the hypervisor streams it (it gives
/// [`write_line`]'s pieces straight to the UART; this buffered form is what tests compare).
pub fn format_stream_line_words(words: &RecordWords, out: &mut LineWords) -> usize {
    let mut line = LineBuffer::new(out);
    write_line(words, &mut line, true);
    line.finish()
}

/// The line form of a record given as its [`RecordWords`] (see [`Record::format_line`]), as
/// pieces into `sink`, followed by `\r\n` if `crlf` (the streamed form). The hypervisor's
/// stream gives the pieces straight to the UART.
#[inline(always)]
pub fn write_line(words: &RecordWords, sink: &mut impl LineSink, crlf: bool) {
    // Fields by their offsets in `Record`: word, then bit shift.
    let field = |offset: usize, bits: u32| -> u64 {
        let value = words[offset / 8] >> (8 * (offset % 8));
        if bits == 64 {
            value
        } else {
            value & ((1 << bits) - 1)
        }
    };
    let byte = |offset: usize| field(offset, 8) as u8;
    let mut w = LineWriter(sink);
    w.text(text!(LINE_MARKER));
    w.decimal(field(0x00, 16), 5);
    w.text(text!(" seq="));
    w.decimal(field(0x08, 64), 20);
    w.text(text!(" t="));
    w.decimal(field(0x10, 64), 20);
    w.text(text!(" vm="));
    w.decimal(field(0x18, 16), 5);
    w.text(text!(" vcpu="));
    w.decimal(field(0x1a, 16), 5);
    w.text(text!(" kind="));
    named!(w, byte(0x02), KINDS: 0 1 2 3 4 5 6 7 8 9 10 11 12 13);
    w.text(text!(" flags=0x"));
    w.hex(field(0x04, 32), 1, 8);
    w.text(text!(" fn=0x"));
    w.hex(field(0x1c, 32), 8, 8);
    w.text(text!(" ipa=0x"));
    w.hex(field(0x20, 64), 1, 16);
    w.text(text!(" size=0x"));
    w.hex(field(0x28, 64), 1, 16);
    w.text(text!(" old="));
    named!(w, byte(0x30), ATTR_NAMES: 0 1 2);
    w.text(text!(" new="));
    named!(w, byte(0x31), ATTR_NAMES: 0 1 2);
    w.text(text!(" cmo="));
    named!(w, byte(0x32), CMO_NAMES: 0 1 2 3);
    w.text(text!(":"));
    w.decimal(field(0x40, 64), 20);
    w.text(text!(" tlbi="));
    named!(w, byte(0x33), TLBI_NAMES: 0 1 2);
    w.text(text!(":"));
    w.decimal(field(0x38, 32), 10);
    w.text(text!(" smmu="));
    w.decimal(field(0x3c, 32), 10);
    w.text(text!(":0x"));
    w.hex(field(0x4c, 16), 1, 4);
    w.text(text!(" sid="));
    // The same reservation either way: the room counted after it does not depend on the
    // record.
    w.reserve(2 + 8);
    match field(0x48, 32) as u32 {
        NO_STREAM => w.constant(text!("-")),
        sid => {
            w.constant(text!("0x"));
            w.hex_reserved(sid as u64, 1);
        }
    }
    w.text(text!(" access="));
    named!(w, byte(0x34), ACCESS_NAMES: 0 1 2 3);
    w.text(text!(" dir="));
    named!(w, byte(0x35), DIRECTION_NAMES: 0 1 2 3);
    w.text(text!(" status="));
    w.signed(field(0x50, 64) as i64);
    w.text(text!(" detail=0x"));
    w.hex(field(0x58, 64), 1, 16);
    w.text(text!(" tag=0x"));
    w.hex(field(0x60, 64), 1, 16);
    w.text(text!(" dropped="));
    w.decimal(field(0x68, 64), 20);
    w.text(text!(" hash=0x"));
    w.hex16(field(0x78, 64));
    if crlf {
        w.text(text!("\r\n"));
    }
}

/// The line form; see [`Record::format_line`].
impl fmt::Display for Record {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut line = [0u8; MAX_LINE];
        let len = self.format_line(&mut line);
        f.write_str(core::str::from_utf8(&line[..len]).map_err(|_| fmt::Error)?)
    }
}

/// Why a line that starts a record could not be read back.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LineError {
    /// The line holds no [`LINE_MARKER`].
    NotARecord,
    /// The field with this key is missing, out of order or malformed.
    BadField(&'static str),
    /// Text follows the last field.
    TrailingText,
}

impl fmt::Display for LineError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LineError::NotARecord => write!(f, "not an audit record line"),
            LineError::BadField(key) => write!(f, "field `{key}` missing or malformed"),
            LineError::TrailingText => write!(f, "text after the last field"),
        }
    }
}

fn number(text: &str) -> Option<u64> {
    match text.strip_prefix("0x") {
        Some(hex) => u64::from_str_radix(hex, 16).ok(),
        None => text.parse().ok(),
    }
}

/// Reads a record back from its line form. Text before [`LINE_MARKER`] (a log prefix) and a
/// trailing `\r` are ignored; everything after the marker must be exactly the fields.
///
/// # Errors
/// A [`LineError`] naming the first field that is missing or malformed.
pub fn parse_line(line: &str) -> Result<Record, LineError> {
    let start = line.find(LINE_MARKER).ok_or(LineError::NotARecord)?;
    let mut words = line[start + LINE_MARKER.len()..]
        .trim_end_matches(['\r', '\n'])
        .split(' ');
    let mut record = Record::new_zeroed();
    let version = words.next().and_then(|v| v.parse::<u16>().ok());
    record.version = U16::new(version.ok_or(LineError::BadField("version"))?);
    let mut field = |key: &'static str| -> Result<&str, LineError> {
        words
            .next()
            .and_then(|word| word.strip_prefix(key))
            .and_then(|rest| rest.strip_prefix('='))
            .ok_or(LineError::BadField(key))
    };
    fn num<T: TryFrom<u64>>(text: &str, key: &'static str) -> Result<T, LineError> {
        number(text)
            .and_then(|n| T::try_from(n).ok())
            .ok_or(LineError::BadField(key))
    }
    fn pair<'a>(text: &'a str, key: &'static str) -> Result<(&'a str, &'a str), LineError> {
        text.split_once(':').ok_or(LineError::BadField(key))
    }
    fn named(text: &str, names: &[(u8, &str)], key: &'static str) -> Result<u8, LineError> {
        parse_named(text, names).ok_or(LineError::BadField(key))
    }
    record.sequence = U64::new(num(field("seq")?, "seq")?);
    record.timestamp = U64::new(num(field("t")?, "t")?);
    record.vm = U16::new(num(field("vm")?, "vm")?);
    record.vcpu = U16::new(num(field("vcpu")?, "vcpu")?);
    record.kind = named(field("kind")?, &KINDS, "kind")?;
    record.flags = U32::new(num(field("flags")?, "flags")?);
    record.function = U32::new(num(field("fn")?, "fn")?);
    record.ipa = U64::new(num(field("ipa")?, "ipa")?);
    record.size = U64::new(num(field("size")?, "size")?);
    record.old_attr = named(field("old")?, &ATTR_NAMES, "old")?;
    record.new_attr = named(field("new")?, &ATTR_NAMES, "new")?;
    let (op, lines) = pair(field("cmo")?, "cmo")?;
    record.cmo_op = named(op, &CMO_NAMES, "cmo")?;
    record.cmo_lines = U64::new(num(lines, "cmo")?);
    let (scope, count) = pair(field("tlbi")?, "tlbi")?;
    record.tlbi_scope = named(scope, &TLBI_NAMES, "tlbi")?;
    record.tlbi_count = U32::new(num(count, "tlbi")?);
    let (count, kinds) = pair(field("smmu")?, "smmu")?;
    record.smmu_commands = U32::new(num(count, "smmu")?);
    record.smmu_kinds = U16::new(num(kinds, "smmu")?);
    record.stream_id = U32::new(match field("sid")? {
        "-" => NO_STREAM,
        sid => num(sid, "sid")?,
    });
    record.access = named(field("access")?, &ACCESS_NAMES, "access")?;
    record.direction = named(field("dir")?, &DIRECTION_NAMES, "dir")?;
    let status = field("status")?;
    record.status = I64::new(status.parse().map_err(|_| LineError::BadField("status"))?);
    record.detail = U64::new(num(field("detail")?, "detail")?);
    record.tag = U64::new(num(field("tag")?, "tag")?);
    record.dropped = U64::new(num(field("dropped")?, "dropped")?);
    record.hash = U64::new(num(field("hash")?, "hash")?);
    if words.next().is_some() {
        return Err(LineError::TrailingText);
    }
    Ok(record)
}

#[cfg(test)]
mod reference {
    //! The line format as `core::fmt` writes it, to check the fast writer against.
    use super::*;

    extern crate std;

    pub struct Reference<'a>(pub &'a Record);

    impl fmt::Display for Reference<'_> {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            write!(
                f,
                "{LINE_MARKER}{} seq={} t={} vm={} vcpu={} kind=",
                self.0.version.get(),
                self.0.sequence.get(),
                self.0.timestamp.get(),
                self.0.vm.get(),
                self.0.vcpu.get()
            )?;
            match self.0.kind_name() {
                Some(name) => f.write_str(name)?,
                None => write!(f, "{}", self.0.kind)?,
            }
            write!(
            f,
            " flags={:#x} fn={:#010x} ipa={:#x} size={:#x} old={} new={} cmo={}:{} tlbi={}:{} smmu={}:{:#x} sid=",
            self.0.flags.get(),
            self.0.function.get(),
            self.0.ipa.get(),
            self.0.size.get(),
            Named(self.0.old_attr, &ATTR_NAMES),
            Named(self.0.new_attr, &ATTR_NAMES),
            Named(self.0.cmo_op, &CMO_NAMES),
            self.0.cmo_lines.get(),
            Named(self.0.tlbi_scope, &TLBI_NAMES),
            self.0.tlbi_count.get(),
            self.0.smmu_commands.get(),
            self.0.smmu_kinds.get(),
        )?;
            match self.0.stream_id.get() {
                NO_STREAM => f.write_str("-")?,
                sid => write!(f, "{sid:#x}")?,
            }
            write!(
                f,
                " access={} dir={} status={} detail={:#x} tag={:#x} dropped={} hash={:#018x}",
                Named(self.0.access, &ACCESS_NAMES),
                Named(self.0.direction, &DIRECTION_NAMES),
                self.0.status.get(),
                self.0.detail.get(),
                self.0.tag.get(),
                self.0.dropped.get(),
                self.0.hash.get()
            )
        }
    }

    pub fn line(record: &Record) -> std::string::String {
        std::format!("{}", Reference(record))
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_fast_line_writer_matches_core_fmt() {
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for round in 0..4000 {
            let mut bytes = [0u8; super::RECORD_SIZE];
            for chunk in bytes.chunks_mut(8) {
                let value = match round % 4 {
                    0 => 0,
                    1 => u64::MAX,
                    _ => next(),
                };
                chunk.copy_from_slice(&value.to_le_bytes()[..chunk.len()]);
            }
            if round % 3 == 0 {
                bytes[2] = (next() % 16) as u8; // known and unknown kinds
            }
            let record = super::Record::parse(&bytes).expect("128 bytes");
            let mut line = [0u8; super::MAX_LINE];
            let len = record.format_line(&mut line);
            assert!(len < super::MAX_LINE, "a line filled the buffer");
            assert_eq!(
                core::str::from_utf8(&line[..len]).unwrap(),
                super::reference::line(&record)
            );
        }
    }

    extern crate std;
    use super::*;
    use std::string::ToString;

    fn sample() -> Record {
        let mut r = Record::empty(kind::ATTRIBUTE_CHANGE);
        r.sequence = U64::new(5);
        r.timestamp = U64::new(123);
        r.vm = U16::new(1);
        r.flags = U32::new(flag::BREAK_BEFORE_MAKE | flag::HYPERVISOR_ALIAS);
        r.function = U32::new(crate::function::MEM_SET_ATTR);
        r.ipa = U64::new(0x4020_0000);
        r.size = U64::new(0x2000);
        r.old_attr = attr::WB;
        r.new_attr = attr::NC;
        r.cmo_op = cmo::CLEAN_INVALIDATE;
        r.cmo_lines = U64::new(128);
        r.tlbi_scope = tlbi::BY_IPA;
        r.tlbi_count = U32::new(2);
        r.status = I64::new(-7);
        r.hash = U64::new(chain_hash(0x1234, &r));
        r
    }

    #[test]
    fn layout_offsets_are_the_documented_ones() {
        let r = sample();
        let bytes = r.bytes();
        assert_eq!(bytes.len(), RECORD_SIZE);
        assert_eq!(&bytes[0..2], &1u16.to_le_bytes());
        assert_eq!(bytes[2], kind::ATTRIBUTE_CHANGE);
        assert_eq!(&bytes[8..16], &5u64.to_le_bytes());
        assert_eq!(&bytes[0x1c..0x20], &0xC600_0010u32.to_le_bytes());
        assert_eq!(&bytes[0x20..0x28], &0x4020_0000u64.to_le_bytes());
        assert_eq!(
            bytes[0x30..0x34],
            [attr::WB, attr::NC, cmo::CLEAN_INVALIDATE, tlbi::BY_IPA]
        );
        assert_eq!(&bytes[0x40..0x48], &128u64.to_le_bytes());
        assert_eq!(&bytes[0x48..0x4c], &NO_STREAM.to_le_bytes());
        assert_eq!(&bytes[0x50..0x58], &(-7i64).to_le_bytes());
        assert_eq!(&bytes[0x78..0x80], &r.hash.get().to_le_bytes());
        assert_eq!(Record::parse(bytes), Some(r));
        assert_eq!(Record::parse(&bytes[1..]), None);
    }

    #[test]
    fn line_round_trips_exactly() {
        let r = sample();
        let line = r.to_string();
        assert_eq!(
            line,
            "AUDIT v1 seq=5 t=123 vm=1 vcpu=0 kind=attr flags=0x3 fn=0xc6000010 ipa=0x40200000 \
             size=0x2000 old=wb new=nc cmo=clean-inv:128 tlbi=ipa:2 smmu=0:0x0 sid=- access=- \
             dir=- status=-7 detail=0x0 tag=0x0 dropped=0 hash=0x"
                .to_string()
                + &std::format!("{:016x}", r.hash.get())
        );
        assert_eq!(
            parse_line(&std::format!("[stagehand INFO ] {line}\r")),
            Ok(r)
        );
        // Unknown enumeration values survive as numbers.
        let mut odd = r;
        odd.kind = 99;
        odd.cmo_op = 7;
        odd.stream_id = U32::new(0x10);
        assert_eq!(parse_line(&odd.to_string()), Ok(odd));
    }

    #[test]
    fn malformed_lines_name_the_field() {
        let line = sample().to_string();
        assert_eq!(parse_line("hello"), Err(LineError::NotARecord));
        assert_eq!(
            parse_line(&line.replace("tlbi=ipa:2", "tlbi=ipa")),
            Err(LineError::BadField("tlbi"))
        );
        assert_eq!(
            parse_line(&line.replace(" vm=1", "")),
            Err(LineError::BadField("vm"))
        );
        assert_eq!(
            parse_line(&(line.clone() + " x=1")),
            Err(LineError::TrailingText)
        );
        assert_eq!(
            parse_line(&line[..line.len() - 3]).map(|r| r.hash_follows(0x1234)),
            Ok(false),
            "a cut line still parses but no longer chains"
        );
    }

    #[test]
    fn hash_chain_covers_everything_but_the_hash() {
        let r = sample();
        assert!(r.hash_follows(0x1234));
        assert!(!r.hash_follows(0x1235));
        let mut altered = r;
        altered.size = U64::new(0x3000);
        assert!(!altered.hash_follows(0x1234));
        let mut rehashed = r;
        rehashed.hash = U64::new(0);
        assert_eq!(chain_hash(0x1234, &rehashed), r.hash.get());
    }

    /// The chain link as `siphasher` computes it, byte-buffered (the reference of the
    /// word-wise [`chain_hash`]).
    fn chain_hash_by_bytes(previous: u64, record: &Record) -> u64 {
        use core::hash::Hasher;
        let mut hasher = siphasher::sip::SipHasher24::new_with_keys(HASH_KEY.0, HASH_KEY.1);
        hasher.write(&previous.to_le_bytes());
        hasher.write(&record.as_bytes()[..HASHED_BYTES]);
        hasher.finish()
    }

    /// A record whose every field takes a value likely to hit an edge of the fast writer or
    /// of the word-wise hash: zero, one digit, a power of ten or sixteen and its neighbours, the
    /// type's maximum, or anything.
    fn edgy_record(next: &mut impl FnMut() -> u64) -> Record {
        let mut bytes = [0u8; RECORD_SIZE];
        for chunk in bytes.chunks_mut(8) {
            let anything = next();
            let power = (next() % 20) as u32;
            let value = match next() % 8 {
                0 => 0,
                1 => anything % 10,
                2 => 10u64.pow(power).wrapping_add(next() % 3).wrapping_sub(1),
                3 => (1u64 << (next() % 64))
                    .wrapping_add(next() % 3)
                    .wrapping_sub(1),
                4 => u64::MAX,
                5 => anything >> (next() % 64),
                _ => anything,
            };
            chunk.copy_from_slice(&value.to_le_bytes());
        }
        if next() % 2 == 0 {
            bytes[2] = (next() % 16) as u8; // known and unknown kinds
        }
        for byte in &mut bytes[0x30..0x36] {
            if next() % 2 == 0 {
                *byte = [0, 1, 2, 3, 0xff][(next() % 5) as usize]; // named and unnamed values
            }
        }
        if next() % 4 == 0 {
            bytes[0x48..0x4c].copy_from_slice(&NO_STREAM.to_le_bytes());
        }
        Record::parse(&bytes).expect("128 bytes")
    }

    fn xorshift(mut state: u64) -> impl FnMut() -> u64 {
        move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        }
    }

    #[test]
    fn the_word_wise_hash_matches_siphasher() {
        let mut next = xorshift(0x2545_f491_4f6c_dd1d);
        for _ in 0..20_000 {
            let record = edgy_record(&mut next);
            let previous = next();
            assert_eq!(
                chain_hash(previous, &record),
                chain_hash_by_bytes(previous, &record)
            );
            assert_eq!(
                chain_hash_words(previous, &record.words()),
                chain_hash_by_bytes(previous, &record)
            );
        }
    }

    #[test]
    fn the_fast_line_writer_matches_core_fmt_at_the_edges() {
        let mut next = xorshift(0x9e37_79b9_7f4a_7c15);
        for _ in 0..20_000 {
            let record = edgy_record(&mut next);
            let expected = reference::line(&record);
            let mut line = [0u64; MAX_LINE / 8];
            let len = format_line_words(&record.words(), &mut line);
            assert_eq!(line_text(&line, len), expected);
            let len = format_stream_line_words(&record.words(), &mut line);
            assert_eq!(line_text(&line, len), expected.clone() + "\r\n");
            assert_eq!(line_bytes(&line, len), line_text(&line, len).as_bytes());
            // The rest of the last word is zero, and so is every word after it (the writer
            // stores no further).
            assert!((len..MAX_LINE).all(|i| line_byte(&line, i) == 0));
        }
    }

    /// The first `len` bytes of `line` as text.
    fn line_text(line: &LineWords, len: usize) -> std::string::String {
        let bytes: std::vec::Vec<u8> = (0..len).map(|i| line_byte(line, i)).collect();
        std::string::String::from_utf8(bytes).unwrap()
    }

    /// Every number field at every digit-count boundary, decimal and hex (0, 9 and 10, 99
    /// and 100, ..., 15 and 16, 0xff and 0x100, ..., the type's maximum): the edges of the
    /// writer's paths (one digit, up to 8 digits within the reservation, the longer ones
    /// sent unplanned, the 17- to 20-digit decimals in two parts).
    #[test]
    fn the_fast_line_writer_matches_core_fmt_at_every_digit_count() {
        let mut values = std::vec![0, 1, u64::MAX, u64::MAX - 1];
        for digits in 1..20 {
            let power = 10u64.pow(digits);
            values.extend([power - 1, power, power + 1]);
        }
        for digits in 1..16 {
            let power = 1u64 << (4 * digits);
            values.extend([power - 1, power, power + 1]);
        }
        // Each value in every field in turn, the others left as they are, and in all at once.
        let offsets = [
            0x00, 0x08, 0x10, 0x18, 0x1a, 0x04, 0x1c, 0x20, 0x28, 0x40, 0x38, 0x3c,
        ]
        .into_iter()
        .chain([0x4c, 0x48, 0x50, 0x58, 0x60, 0x68, 0x78]);
        let widths = |offset: usize| match offset {
            0x00 | 0x18 | 0x1a | 0x4c => 2,
            0x04 | 0x1c | 0x38 | 0x3c | 0x48 => 4,
            _ => 8,
        };
        let check = |record: &Record| {
            let mut line = [0u64; MAX_LINE / 8];
            let len = format_stream_line_words(&record.words(), &mut line);
            assert_eq!(line_text(&line, len), reference::line(record) + "\r\n");
        };
        for value in values {
            let mut all = sample();
            for offset in offsets.clone() {
                let width = widths(offset);
                let bytes = &value.to_le_bytes()[..width];
                let mut one = sample();
                one.as_mut_bytes()[offset..offset + width].copy_from_slice(bytes);
                check(&one);
                all.as_mut_bytes()[offset..offset + width].copy_from_slice(bytes);
                // The status, negated too.
                one.status = I64::new((value as i64).wrapping_neg());
                check(&one);
            }
            check(&all);
        }
    }

    #[test]
    fn the_widest_streamed_line_fits_with_room_to_spare() {
        let mut r = Record::new_zeroed();
        for word in r.as_mut_bytes().chunks_mut(8) {
            word.copy_from_slice(&u64::MAX.to_le_bytes());
        }
        r.kind = kind::GUEST_START;
        r.cmo_op = cmo::CLEAN_INVALIDATE;
        r.direction = direction::FROM_DEVICE;
        r.access = access::WRITE;
        r.stream_id = U32::new(NO_STREAM - 1);
        r.status = I64::new(i64::MIN);
        let mut line = [0u64; MAX_LINE / 8];
        let len = format_stream_line_words(&r.words(), &mut line);
        assert_eq!(len, reference::line(&r).len() + 2);
        // The writer's word index wraps at the end of the buffer instead of being checked:
        // the widest streamed line must leave room to spare.
        assert!(len + 16 <= MAX_LINE, "{len}");
    }

    #[test]
    fn siphash_matches_the_reference_vector() {
        use core::hash::Hasher;
        // SipHash-2-4 paper, appendix A: key 00..0f, message 00..0e.
        let mut hasher =
            siphasher::sip::SipHasher24::new_with_keys(0x0706050403020100, 0x0f0e0d0c0b0a0908);
        let message: [u8; 15] = core::array::from_fn(|i| i as u8);
        hasher.write(&message);
        assert_eq!(hasher.finish(), 0xa129ca6149be45e5);
    }
}
