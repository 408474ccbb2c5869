//! `audit-report`: reads a stagehand audit stream (the hypervisor's UART log, or any text with
//! `AUDIT v1 ...` lines in it), and
//!
//! 1. checks the stream: sequence numbers without unexplained gaps, in order, each record's hash
//!    chained to the previous one; a gap is accepted only where a later STREAM_LOSS overflow
//!    record reports exactly those records;
//! 2. replays the records through a model of the attribute rules and reports every violation of
//!    I1 (no cacheable alias of an NC page), I2 (clean + invalidate, break and TLBI before NC;
//!    invalidate before WB again) and I4 (no attribute change of a pinned page, no sync or unmap
//!    of a buffer that is not mapped, no unpin before the SMMU's CMD_SYNC);
//! 3. prints a summary a person reads ([`Report::summary`]) and draws the page attributes and DMA
//!    mappings over time as a self-contained SVG or HTML page ([`Report::svg`], [`Report::html`]).
//!
//! Lines that are not audit records (guest console output, log lines) are skipped.
//!
//! A busy guest writes millions of records, so the tool reads a stream line by line, twice (a
//! [`Survey`] names the buffers and the span, then an [`Analyser`] checks), in time linear in
//! the stream. What it keeps grows with the pages, runs and live mappings the records name, not
//! with the records: page state is kept as runs ([`RangeMap`]), the picture has at most
//! [`COLUMNS`] time columns, a buffer's history keeps its first and last
//! [`HISTORY_KEPT`] entries, and each list of findings keeps its first [`KEPT`] entries and counts
//! the rest.

#![forbid(unsafe_code)]

mod ranges;

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::fmt::Write as _;
use std::io::{BufRead, Seek, SeekFrom};
use std::ops::Deref;

use stagehand_abi::audit::{
    self, attr, cmo, direction, flag, kind, parse_line, smmu_command, tlbi, Record, GENESIS_HASH,
    LAYOUT_VERSION, LINE_MARKER,
};
use stagehand_abi::Status;

pub use ranges::RangeMap;

const PAGE: u64 = 4096;

/// Entries each list of findings (problems, notes, refusals, faults, events, losses) keeps; the
/// rest are counted.
pub const KEPT: usize = 10_000;

/// Time columns of the picture: a longer stream is down-sampled, a column then showing every
/// state its records passed through.
pub const COLUMNS: u64 = 1024;

/// Entries a buffer's history keeps at its start, and again at its end.
pub const HISTORY_KEPT: usize = 64;

/// A list that keeps its first [`KEPT`] entries and counts all of them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Kept<T> {
    items: Vec<T>,
    total: u64,
}

impl<T> Default for Kept<T> {
    fn default() -> Self {
        Kept {
            items: Vec::new(),
            total: 0,
        }
    }
}

impl<T> Kept<T> {
    fn push(&mut self, item: T) {
        self.total += 1;
        if self.items.len() < KEPT {
            self.items.push(item);
        }
    }

    /// How many entries there were, kept or not.
    pub fn total(&self) -> u64 {
        self.total
    }

    /// How many entries were counted but not kept.
    pub fn omitted(&self) -> u64 {
        self.total - self.items.len() as u64
    }
}

impl<T> Deref for Kept<T> {
    type Target = [T];
    fn deref(&self) -> &[T] {
        &self.items
    }
}

/// What the lines of a text held.
#[derive(Clone, Debug, Default)]
pub struct Stream {
    /// Records read back from their lines.
    pub records: usize,
    /// Lines that start like a record but could not be read back: (line number, why).
    pub malformed: Kept<(usize, String)>,
}

/// Reads one line: `None` when it is not an audit record line.
fn read_line(line: &str) -> Option<Result<Record, String>> {
    if !line.contains(LINE_MARKER) {
        return None;
    }
    Some(parse_line(line).map_err(|error| error.to_string()))
}
/// A failed check.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Problem {
    /// A line that looks like a record but does not parse (cut or edited).
    Malformed {
        /// Line number.
        line: usize,
        /// Why.
        why: String,
    },
    /// Records `first..end` are missing and no overflow record reports them.
    Gap {
        /// First missing sequence number.
        first: u64,
        /// One past the last missing one.
        end: u64,
        /// Line of the record after the gap.
        line: usize,
    },
    /// A record's number is not above its predecessor's.
    OutOfOrder {
        /// Its sequence number.
        sequence: u64,
        /// The sequence number of the record before it.
        after: u64,
        /// Its line.
        line: usize,
    },
    /// A record's hash does not follow from the previous record's hash and its own bytes.
    Altered {
        /// Its sequence number.
        sequence: u64,
        /// Its line.
        line: usize,
    },
    /// A record of another layout version, or with reserved bytes set.
    BadLayout {
        /// Its sequence number.
        sequence: u64,
        /// Its line.
        line: usize,
    },
    /// An invariant the replayed records break.
    Invariant {
        /// `I1`, `I2` or `I4`.
        invariant: &'static str,
        /// The record that breaks it.
        sequence: u64,
        /// What is wrong.
        what: String,
    },
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Problem::Malformed { line, why } => {
                write!(f, "line {line}: malformed audit record ({why})")
            }
            Problem::Gap { first, end, line } => write!(
                f,
                "gap: records {first}..={} missing before line {line}, and no overflow record reports them",
                end - 1
            ),
            Problem::OutOfOrder {
                sequence,
                after,
                line,
            } => write!(
                f,
                "reordered: record {sequence} comes after record {after} (line {line})"
            ),
            Problem::Altered { sequence, line } => write!(
                f,
                "altered: the hash chain breaks at record {sequence} (line {line}): it or the record before it was changed"
            ),
            Problem::BadLayout { sequence, line } => write!(
                f,
                "record {sequence} (line {line}) has another layout version or reserved bytes set"
            ),
            Problem::Invariant {
                invariant,
                sequence,
                what,
            } => write!(f, "{invariant} violated at record {sequence}: {what}"),
        }
    }
}

/// Records lost from the stream and reported by an overflow record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Loss {
    /// First lost sequence number.
    pub first: u64,
    /// How many.
    pub count: u64,
    /// The overflow record that reports them.
    pub reported_by: u64,
    /// Lost from the host stream too (else only from the hypervisor's ring).
    pub from_stream: bool,
}

/// What the sequence and hash checks found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ChainReport {
    /// Breaks, in stream order.
    pub problems: Kept<Problem>,
    /// Losses reported by overflow records (ring and stream).
    pub losses: Kept<Loss>,
    /// Records whose hash was verified.
    pub verified: usize,
    /// Times the numbering restarted at 0 (a new boot in the same log).
    pub restarts: usize,
}

fn is_stream_loss(r: &Record) -> bool {
    r.kind == kind::OVERFLOW && r.flags.get() & flag::STREAM_LOSS != 0
}

/// Problems that name a line, by line (malformed lines are found in passing, and a gap is only
/// known to be unexplained at the end).
fn problem_line(problem: &Problem) -> usize {
    match problem {
        Problem::Malformed { line, .. }
        | Problem::Gap { line, .. }
        | Problem::OutOfOrder { line, .. }
        | Problem::Altered { line, .. }
        | Problem::BadLayout { line, .. } => *line,
        Problem::Invariant { .. } => usize::MAX,
    }
}

/// A gap waiting for the STREAM_LOSS record that may explain it: the record after the gap, whose
/// hash is checked from that record's anchor.
#[derive(Clone, Copy, Debug)]
struct PendingGap {
    record: Record,
    line: usize,
}

/// Checks sequence continuity, order and the hash chain, one record at a time.
#[derive(Debug)]
struct ChainChecker {
    report: ChainReport,
    expected: u64,
    previous: u64,
    seen: usize,
    /// Gaps `(first, end)` no overflow record has explained yet.
    pending: BTreeMap<(u64, u64), PendingGap>,
}

impl ChainChecker {
    fn new() -> Self {
        ChainChecker {
            report: ChainReport::default(),
            expected: 0,
            previous: GENESIS_HASH,
            seen: 0,
            pending: BTreeMap::new(),
        }
    }

    fn record(&mut self, r: &Record, line: usize) {
        let report = &mut self.report;
        let sequence = r.sequence.get();
        let first_record = self.seen == 0;
        self.seen += 1;
        if r.version.get() != LAYOUT_VERSION
            || r.reserved0 != 0
            || r.reserved1.get() != 0
            || r.reserved2.get() != 0
            || r.reserved3.get() != 0
        {
            report.problems.push(Problem::BadLayout { sequence, line });
        }
        if sequence == 0 && !first_record && r.hash_follows(GENESIS_HASH) {
            // The hypervisor started again and appended to the same log.
            report.restarts += 1;
            self.expected = 0;
            self.previous = GENESIS_HASH;
        }
        if sequence < self.expected {
            report.problems.push(Problem::OutOfOrder {
                sequence,
                after: self.expected - 1,
                line,
            });
        } else if sequence > self.expected {
            // Checked when the overflow record that explains it comes (it may be this one).
            self.pending
                .insert((self.expected, sequence), PendingGap { record: *r, line });
            if self.pending.len() > KEPT {
                // A stream this broken: the oldest gap stays unexplained.
                if let Some(((first, end), gap)) = self.pending.pop_first() {
                    self.report.problems.push(Problem::Gap {
                        first,
                        end,
                        line: gap.line,
                    });
                }
            }
            self.previous = r.hash.get();
            self.expected = sequence + 1;
        } else {
            if r.hash_follows(self.previous) {
                report.verified += 1;
            } else {
                report.problems.push(Problem::Altered { sequence, line });
            }
            self.previous = r.hash.get();
            self.expected = sequence + 1;
        }
        if r.kind == kind::OVERFLOW {
            self.report.losses.push(Loss {
                first: r.detail.get(),
                count: r.dropped.get(),
                reported_by: sequence,
                from_stream: is_stream_loss(r),
            });
            if is_stream_loss(r) {
                let first = r.detail.get();
                let end = first.saturating_add(r.dropped.get());
                if let Some(gap) = self.pending.remove(&(first, end)) {
                    if gap.record.hash_follows(r.tag.get()) {
                        self.report.verified += 1;
                    } else {
                        self.report.problems.push(Problem::Altered {
                            sequence: gap.record.sequence.get(),
                            line: gap.line,
                        });
                    }
                }
            }
        }
    }

    fn finish(mut self) -> ChainReport {
        for ((first, end), gap) in std::mem::take(&mut self.pending) {
            self.report.problems.push(Problem::Gap {
                first,
                end,
                line: gap.line,
            });
        }
        self.report.problems.items.sort_by_key(problem_line);
        self.report
    }
}

/// The state of a page or buffer at one point of the replay.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct State {
    /// Non-cacheable (else write-back).
    pub non_cacheable: bool,
    /// Some page of it is mapped for DMA.
    pub pinned: bool,
}

impl State {
    /// Both states at once, for a picture column that saw both.
    fn either(self, other: State) -> State {
        State {
            non_cacheable: self.non_cacheable | other.non_cacheable,
            pinned: self.pinned | other.pinned,
        }
    }
}

/// How sequence numbers map to the picture's time columns.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timeline {
    /// First sequence number of the stream.
    pub first: u64,
    /// Last sequence number of the stream.
    pub last: u64,
    /// Sequence numbers per column.
    pub width: u64,
}

impl Timeline {
    fn new(first: u64, last: u64) -> Self {
        Timeline {
            first,
            last,
            width: last.saturating_sub(first) / COLUMNS + 1,
        }
    }

    /// The column of sequence number `s`.
    pub fn column(&self, s: u64) -> u64 {
        (s.saturating_sub(self.first) / self.width).min(COLUMNS - 1)
    }

    /// The first sequence number of `column`.
    pub fn start(&self, column: u64) -> u64 {
        self.first + column * self.width
    }
}

/// A range that records name: an attribute-change or DMA range.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Buffer {
    /// First IPA.
    pub ipa: u64,
    /// Bytes.
    pub size: u64,
    /// What happened to it: (sequence, description), its first [`HISTORY_KEPT`] entries.
    pub history: Vec<(u64, String)>,
    /// Entries between `history` and `history_tail`, counted only.
    pub history_omitted: u64,
    /// Its last entries after `history`, at most [`HISTORY_KEPT`].
    pub history_tail: VecDeque<(u64, String)>,
    /// Its state from each point on: (sequence, state), first entry the state before its first
    /// record. On a down-sampled [`Timeline`], at most two entries per column: what the column
    /// saw (both states of a change inside it), then the state it ended in.
    pub states: Vec<(u64, State)>,
    /// Its state after the records so far.
    current: State,
}

impl Buffer {
    fn new(ipa: u64, size: u64, first: u64) -> Self {
        Buffer {
            ipa,
            size,
            history: Vec::new(),
            history_omitted: 0,
            history_tail: VecDeque::new(),
            states: vec![(first, State::default())],
            current: State::default(),
        }
    }

    fn add_history(&mut self, sequence: u64, text: String) {
        if self.history.len() < HISTORY_KEPT {
            self.history.push((sequence, text));
            return;
        }
        if self.history_tail.len() == HISTORY_KEPT {
            self.history_tail.pop_front();
            self.history_omitted += 1;
        }
        self.history_tail.push_back((sequence, text));
    }

    /// Notes that record `s` left the buffer in state `new`.
    fn change(&mut self, s: u64, new: State, timeline: &Timeline) {
        if new == self.current {
            return;
        }
        let column = timeline.column(s);
        self.settle(column, timeline);
        let (last_start, last_state) = *self.states.last().expect("a buffer starts with a state");
        if timeline.column(last_start) >= column {
            // A second change in one column: the column shows everything it saw.
            self.states.last_mut().expect("not empty").1 = last_state.either(new);
        } else {
            let start = timeline.start(column);
            let shown = if s <= start {
                new
            } else {
                self.current.either(new)
            };
            if shown != last_state {
                self.states.push((start.max(last_start), shown));
            }
        }
        self.current = new;
    }

    /// Closes the columns before `column`: after a column that showed more than the state it
    /// ended in, the next column starts in that state.
    fn settle(&mut self, column: u64, timeline: &Timeline) {
        let (last_start, last_state) = *self.states.last().expect("a buffer starts with a state");
        if last_state == self.current {
            return;
        }
        let next = timeline.column(last_start) + 1;
        if next < column {
            self.states.push((timeline.start(next), self.current));
        }
    }
}

/// A live DMA mapping: one handle, one device, one or more runs (a strict mapping of a range
/// whose pages differ in attribute is recorded as one dma-map record per run). Ranges are
/// byte-granular (ABI 1.1); a mapping holds every page its bytes touch.
#[derive(Clone, Debug)]
struct Mapping {
    stream_id: u32,
    /// (first IPA, bytes) of each run, in record order.
    runs: Vec<(u64, u64)>,
    /// The rights a strict device's stage 2 gives it (read, write); `None` when the device
    /// shares the guest's stage 2 (no rights of its own to count).
    rights: Option<(bool, bool)>,
}

/// The rights a device holds on a page: how many live strict mappings grant read and write. The
/// device's entry is their union; an unmap that narrows the union must be followed by the
/// SMMU's TLB invalidation and CMD_SYNC before the unpin (I4), one that does not needs none.
#[derive(Debug, Default)]
struct Rights {
    counts: BTreeMap<(u32, u64), (u32, u32)>,
}

impl Rights {
    /// Adds (`add`) or removes a mapping's rights on pages `[first, end)`; returns whether the
    /// union of some page changed.
    fn update(
        &mut self,
        stream_id: u32,
        (first, end): (u64, u64),
        (read, write): (bool, bool),
        add: bool,
    ) -> bool {
        let mut changed = false;
        for page in first..end {
            let counts = self.counts.entry((stream_id, page)).or_default();
            let before = (counts.0 > 0, counts.1 > 0);
            let step = |count: u32, granted: bool| match (granted, add) {
                (false, _) => count,
                (true, true) => count.saturating_add(1),
                (true, false) => count.saturating_sub(1),
            };
            *counts = (step(counts.0, read), step(counts.1, write));
            changed |= before != (counts.0 > 0, counts.1 > 0);
            if *counts == (0, 0) {
                self.counts.remove(&(stream_id, page));
            }
        }
        changed
    }
}

impl Mapping {
    /// Whether `[ipa, ipa + size)` lies inside the mapping (its runs joined).
    fn covers(&self, ipa: u64, size: u64) -> bool {
        let mut runs = self.runs.clone();
        runs.sort_unstable();
        let end = ipa.saturating_add(size);
        let mut covered_to: Option<u64> = None;
        for (start, bytes) in runs {
            let run_end = start.saturating_add(bytes);
            covered_to = match covered_to {
                Some(to) if start <= to => Some(to.max(run_end)),
                _ if start <= ipa => Some(run_end),
                Some(to) => return to >= end,
                None => return false,
            };
        }
        covered_to.is_some_and(|to| to >= end)
    }
}

/// Marks on the picture's event row: (colour, column) -> (sequence, title) of the first.
pub type Ticks = BTreeMap<(u8, u64), (u64, String)>;

/// Colours of the event row.
mod tick {
    pub const EVENT: u8 = 0;
    pub const REFUSAL: u8 = 1;
    pub const FAULT: u8 = 2;
    pub const LOSS: u8 = 3;
}

/// What the replay of the records found.
#[derive(Clone, Debug, Default)]
pub struct Replay {
    /// Invariant violations, in order.
    pub violations: Kept<Problem>,
    /// Findings the replay could not be sure of after a loss (not failures).
    pub notes: Kept<String>,
    /// Every buffer records name, by first IPA.
    pub buffers: Vec<Buffer>,
    /// Refused requests: (sequence, description).
    pub refusals: Kept<(u64, String)>,
    /// Faults (stage 2 and SMMU): (sequence, description).
    pub faults: Kept<(u64, String)>,
    /// Other events worth a line: marks, guest start and stop, filtered writes.
    pub events: Kept<(u64, u8, String)>,
    /// The picture's event row.
    pub ticks: Ticks,
    /// Records per kind name.
    pub kinds: BTreeMap<&'static str, usize>,
    /// First and last sequence numbers seen.
    pub span: Option<(u64, u64)>,
    /// Runs of pages the model tracks (attribute and pin count), at the end.
    pub page_runs: usize,
    /// DMA mappings live at the end.
    pub live_mappings: usize,
}

impl Replay {
    /// Entries kept in memory for this stream: page runs, mappings, buffers with their states
    /// and history, kept findings and picture marks. It grows with what the records name, not
    /// with their number.
    pub fn tracked_entries(&self) -> usize {
        let buffers: usize = self
            .buffers
            .iter()
            .map(|b| 1 + b.states.len() + b.history.len() + b.history_tail.len())
            .sum();
        self.page_runs
            + self.live_mappings
            + buffers
            + self.violations.len()
            + self.notes.len()
            + self.refusals.len()
            + self.faults.len()
            + self.events.len()
            + self.ticks.len()
            + self.kinds.len()
    }
}

fn status_name(code: i64) -> String {
    match Status::from_code(code) {
        Some(status) => status.name().to_string(),
        None => format!("{code}"),
    }
}

/// The pages `[first, end)` that `[ipa, ipa + size)` touches.
fn pages(ipa: u64, size: u64) -> (u64, u64) {
    let first = ipa / PAGE;
    let end = ipa.saturating_add(size).div_ceil(PAGE);
    (first, end.max(first))
}

fn attr_name(value: u8) -> &'static str {
    match value {
        attr::WB => "WB",
        attr::NC => "NC",
        _ => "?",
    }
}

fn cmo_name(value: u8) -> &'static str {
    match value {
        cmo::CLEAN => "clean",
        cmo::INVALIDATE => "invalidate",
        cmo::CLEAN_INVALIDATE => "clean+invalidate",
        _ => "no CMO",
    }
}

fn tlbi_name(value: u8) -> &'static str {
    match value {
        tlbi::BY_IPA => "TLBI by IPA",
        tlbi::VMID => "TLBI VMID-wide",
        _ => "no TLBI",
    }
}

#[derive(Debug, Default)]
struct Model {
    non_cacheable: RangeMap<bool>,
    pins: RangeMap<u32>,
    mappings: BTreeMap<u64, Mapping>,
    rights: Rights,
    /// A loss happened before this point: history-dependent findings become notes.
    uncertain: bool,
}

impl Model {
    fn page_nc(&self, page: u64) -> bool {
        self.non_cacheable.get(page)
    }
    fn state(&self, buffer: &Buffer) -> State {
        let (first, end) = pages(buffer.ipa, buffer.size);
        State {
            non_cacheable: self.page_nc(first),
            pinned: self
                .pins
                .overlapping(first, end)
                .any(|(_, _, pins)| pins > 0),
        }
    }
}

/// The buffers records name, found by overlap: by size class (a power of two), then by first
/// IPA, so a lookup reads only buffers that can reach the range.
#[derive(Debug, Default)]
struct BufferIndex {
    classes: Vec<BTreeMap<u64, Vec<usize>>>,
}

impl BufferIndex {
    fn new(buffers: &[Buffer]) -> Self {
        let mut classes = vec![BTreeMap::<u64, Vec<usize>>::new(); 64];
        for (index, buffer) in buffers.iter().enumerate() {
            let class = 63 - buffer.size.max(1).leading_zeros() as usize;
            classes[class].entry(buffer.ipa).or_default().push(index);
        }
        BufferIndex { classes }
    }

    /// Adds the buffers that overlap `[ipa, end)` to `out`.
    fn overlapping(&self, buffers: &[Buffer], ipa: u64, end: u64, out: &mut Vec<usize>) {
        for (class, starts) in self.classes.iter().enumerate() {
            if starts.is_empty() {
                continue;
            }
            let largest = if class >= 63 {
                u64::MAX
            } else {
                (1u64 << (class + 1)) - 1
            };
            let lowest = ipa.saturating_sub(largest);
            for ids in starts.range(lowest..end).map(|(_, ids)| ids) {
                out.extend(ids.iter().copied().filter(|&id| {
                    let b = &buffers[id];
                    b.ipa < end && ipa < b.ipa.saturating_add(b.size)
                }));
            }
        }
    }
}

/// Replays records through the attribute model, one at a time.
#[derive(Debug)]
struct Replayer {
    out: Replay,
    model: Model,
    index: BufferIndex,
    timeline: Timeline,
    previous_sequence: Option<u64>,
    /// Scratch: buffers a record touches.
    touched: Vec<usize>,
}

impl Replayer {
    fn new(survey: &Survey, timeline: Timeline) -> Self {
        let buffers: Vec<Buffer> = survey
            .buffers
            .iter()
            .map(|&(ipa, size)| Buffer::new(ipa, size, timeline.first))
            .collect();
        Replayer {
            index: BufferIndex::new(&buffers),
            out: Replay {
                buffers,
                ..Replay::default()
            },
            model: Model::default(),
            timeline,
            previous_sequence: None,
            touched: Vec::new(),
        }
    }

    fn record(&mut self, r: &Record) {
        let s = r.sequence.get();
        if self.previous_sequence.is_some_and(|p| s != p + 1) {
            self.model.uncertain = true;
        }
        self.previous_sequence = Some(s);
        self.out.span = Some(self.out.span.map_or((s, s), |(a, _)| (a, s)));
        let name = r.kind_name().unwrap_or("unknown");
        *self.out.kinds.entry(name).or_default() += 1;
        let (ipa, size) = (r.ipa.get(), r.size.get());
        // An unmap changes its mapping's runs, which the record's range covers; look them up
        // before the record removes them.
        let mut ranges = vec![(ipa, ipa.saturating_add(size.max(1)))];
        if r.kind == kind::DMA_UNMAP {
            if let Some(mapping) = self.model.mappings.get(&r.detail.get()) {
                ranges.extend(
                    mapping
                        .runs
                        .iter()
                        .map(|&(run, bytes)| (run, run.saturating_add(bytes))),
                );
            }
        }
        let described = apply(r, &mut self.model, &mut self.out, &self.timeline);
        self.touched.clear();
        for &(start, end) in &ranges {
            self.index
                .overlapping(&self.out.buffers, start, end, &mut self.touched);
        }
        self.touched.sort_unstable();
        self.touched.dedup();
        let record_end = ipa.saturating_add(size.max(1));
        for &id in &self.touched {
            let buffer = &mut self.out.buffers[id];
            let new = self.model.state(buffer);
            if let Some(text) = &described {
                if ipa < buffer.ipa + buffer.size && buffer.ipa < record_end {
                    buffer.add_history(s, text.clone());
                }
            }
            buffer.change(s, new, &self.timeline);
        }
    }

    fn finish(mut self) -> Replay {
        for buffer in &mut self.out.buffers {
            buffer.settle(COLUMNS, &self.timeline);
        }
        self.out.page_runs = self.model.non_cacheable.runs() + self.model.pins.runs();
        self.out.live_mappings = self.model.mappings.len();
        self.out
    }
}

fn add_tick(
    out: &mut Replay,
    timeline: &Timeline,
    s: u64,
    colour: u8,
    title: impl FnOnce() -> String,
) {
    out.ticks
        .entry((colour, timeline.column(s)))
        .or_insert_with(|| (s, title()));
}

/// Applies one record to the model; returns a description when it concerns a buffer.
fn apply(r: &Record, model: &mut Model, out: &mut Replay, timeline: &Timeline) -> Option<String> {
    let s = r.sequence.get();
    let (ipa, size) = (r.ipa.get(), r.size.get());
    let status = r.status.get();
    let violation = |out: &mut Replay, invariant: &'static str, what: String| {
        out.violations.push(Problem::Invariant {
            invariant,
            sequence: s,
            what,
        });
    };
    match r.kind {
        kind::ATTRIBUTE_CHANGE if status >= 0 && size > 0 => {
            let (old, new) = (r.old_attr, r.new_attr);
            let flags = r.flags.get();
            let broke = flags & flag::BREAK_BEFORE_MAKE != 0;
            let tlb = r.tlbi_scope != tlbi::NONE && r.tlbi_count.get() > 0;
            let lines = r.cmo_lines.get() > 0;
            let range = format!("{ipa:#x}+{size:#x}");
            let (first, end) = pages(ipa, size);
            if let Some(page) = model.pins.find(first, end, |pins| pins > 0) {
                violation(
                    out,
                    "I4",
                    format!(
                        "attribute of {range} changed while page {:#x} is mapped for DMA",
                        page * PAGE
                    ),
                );
            }
            let mismatched = model
                .non_cacheable
                .find(first, end, |nc| nc != (old == attr::NC));
            if let Some(page) = mismatched {
                let text = format!(
                    "record says {range} was {} but page {:#x} was {} by the records before",
                    attr_name(old),
                    page * PAGE,
                    if model.page_nc(page) { "NC" } else { "WB" }
                );
                // A range that was partly in the new state already is recorded with one old
                // attribute: worth a note, not a failure.
                out.notes.push(format!(
                    "record {s}: {text}{}",
                    if model.uncertain {
                        " (after a loss)"
                    } else {
                        ""
                    }
                ));
            }
            if old != new {
                if new == attr::NC {
                    if r.cmo_op != cmo::CLEAN_INVALIDATE || !lines {
                        violation(
                            out,
                            "I2",
                            format!(
                                "{range} became NC after {} instead of a clean+invalidate",
                                cmo_name(r.cmo_op)
                            ),
                        );
                    }
                    if flags & flag::HYPERVISOR_ALIAS == 0 {
                        violation(
                            out,
                            "I1",
                            format!("{range} became NC but the hypervisor's own cacheable alias was not removed"),
                        );
                    }
                } else if !matches!(r.cmo_op, cmo::INVALIDATE | cmo::CLEAN_INVALIDATE) || !lines {
                    violation(
                        out,
                        "I2",
                        format!(
                            "{range} went back to WB after {} instead of an invalidate",
                            cmo_name(r.cmo_op)
                        ),
                    );
                }
                if !broke || !tlb {
                    violation(
                        out,
                        "I2",
                        format!(
                            "{range} changed attribute without {}",
                            match (broke, tlb) {
                                (false, false) => "a break and a TLBI",
                                (false, true) => "a break (break-before-make)",
                                _ => "a TLBI",
                            }
                        ),
                    );
                }
            }
            model.non_cacheable.set(first, end, new == attr::NC);
            Some(format!(
                "{} -> {} ({}, {} lines, {}{}{}){}",
                attr_name(old),
                attr_name(new),
                cmo_name(r.cmo_op),
                r.cmo_lines.get(),
                tlbi_name(r.tlbi_scope),
                if r.tlbi_count.get() > 0 {
                    format!(" x{}", r.tlbi_count.get())
                } else {
                    String::new()
                },
                if broke { ", break-before-make" } else { "" },
                if status == Status::Incomplete.code() {
                    " INCOMPLETE"
                } else {
                    ""
                }
            ))
        }
        kind::DMA_MAP if status >= 0 => {
            let handle = r.detail.get();
            let (first, end) = pages(ipa, size);
            if r.new_attr != attr::NONE {
                let device_nc = r.new_attr == attr::NC;
                if let Some(page) = model.non_cacheable.find(first, end, |nc| nc != device_nc) {
                    violation(
                        out,
                        "I1",
                        format!(
                            "device {:#x} maps page {:#x} {} while the guest's mapping is {}",
                            r.stream_id.get(),
                            page * PAGE,
                            attr_name(r.new_attr),
                            if model.page_nc(page) { "NC" } else { "WB" }
                        ),
                    );
                }
            }
            model.pins.update(first, end, |pins| pins.saturating_add(1));
            let stream_id = r.stream_id.get();
            // A strict device's own mapping (with an attribute) grants its direction's rights.
            let rights = (r.new_attr != attr::NONE).then_some(match r.direction {
                direction::TO_DEVICE => (true, false),
                direction::FROM_DEVICE => (false, true),
                _ => (true, true),
            });
            if let Some(rights) = rights {
                model.rights.update(stream_id, (first, end), rights, true);
            }
            match model.mappings.get_mut(&handle) {
                // Another run of the same mapping (its pages differ in attribute).
                Some(mapping) if mapping.stream_id == stream_id => {
                    mapping.runs.push((ipa, size));
                }
                Some(mapping) => {
                    let text = format!(
                        "DMA map handle {handle} for device {:#x}, while the handle is mapped for device {:#x}",
                        stream_id,
                        mapping.stream_id
                    );
                    violation(out, "I4", text);
                    mapping.runs.push((ipa, size));
                }
                None => {
                    model.mappings.insert(
                        handle,
                        Mapping {
                            stream_id,
                            runs: vec![(ipa, size)],
                            rights,
                        },
                    );
                }
            }
            Some(format!(
                "DMA map handle {handle} for device {:#x} ({}, {}, {} SMMU commands)",
                r.stream_id.get(),
                direction_name(r.direction),
                cmo_name(r.cmo_op),
                r.smmu_commands.get()
            ))
        }
        kind::DMA_UNMAP if status >= 0 => {
            let handle = r.detail.get();
            match model.mappings.remove(&handle) {
                Some(mapping) => {
                    // Runs of one mapping may share a page: count each page once.
                    let mut pages_held: Vec<(u64, u64)> = mapping
                        .runs
                        .iter()
                        .map(|&(run, bytes)| pages(run, bytes))
                        .collect();
                    pages_held.sort_unstable();
                    let mut merged: Vec<(u64, u64)> = Vec::new();
                    for (first, end) in pages_held {
                        match merged.last_mut() {
                            Some(last) if first <= last.1 => last.1 = last.1.max(end),
                            _ => merged.push((first, end)),
                        }
                    }
                    let mut narrowed = false;
                    for &(first, end) in &merged {
                        if let Some(rights) = mapping.rights {
                            narrowed |=
                                model
                                    .rights
                                    .update(mapping.stream_id, (first, end), rights, false);
                        }
                        model.pins.update(first, end, |pins| pins.saturating_sub(1));
                    }
                    if narrowed && r.smmu_kinds.get() & smmu_command::SYNC == 0 {
                        violation(
                            out,
                            "I4",
                            format!(
                                "handle {handle} (device {:#x}) unpinned without a CMD_SYNC after its SMMU rights were narrowed",
                                mapping.stream_id
                            ),
                        );
                    }
                }
                None => {
                    let text = format!("DMA unmap of handle {handle}, which is not mapped");
                    if model.uncertain {
                        out.notes.push(format!("record {s}: {text} (after a loss)"));
                    } else {
                        violation(out, "I4", text);
                    }
                }
            }
            Some(format!(
                "DMA unmap handle {handle} ({} SMMU commands{})",
                r.smmu_commands.get(),
                if r.smmu_kinds.get() & smmu_command::SYNC != 0 {
                    ", CMD_SYNC"
                } else {
                    ""
                }
            ))
        }
        kind::DMA_SYNC if status >= 0 || status == Status::NotRequired.code() => {
            let handle = r.detail.get();
            let inside = model
                .mappings
                .get(&handle)
                .is_some_and(|m| m.covers(ipa, size));
            if !inside {
                let text = format!(
                    "DMA sync of {ipa:#x}+{size:#x} (handle {handle}), which is not mapped"
                );
                if model.uncertain {
                    out.notes.push(format!("record {s}: {text} (after a loss)"));
                } else {
                    violation(out, "I4", text);
                }
            }
            None
        }
        kind::REFUSED
        | kind::ATTRIBUTE_CHANGE
        | kind::DMA_MAP
        | kind::DMA_UNMAP
        | kind::DMA_SYNC => {
            let mut text = format!(
                "function {:#010x} refused: {}",
                r.function.get(),
                status_name(status)
            );
            if size > 0 || ipa > 0 {
                let _ = write!(text, " (range {ipa:#x}+{size:#x})");
            }
            add_tick(out, timeline, s, tick::REFUSAL, || text.clone());
            out.refusals.push((s, text));
            None
        }
        kind::STAGE2_FAULT => {
            let text = format!(
                "stage-2 fault: {} of IPA {ipa:#x}, abort injected",
                access_name(r.access)
            );
            add_tick(out, timeline, s, tick::FAULT, || text.clone());
            out.faults.push((s, text));
            None
        }
        kind::UNDEFINED => {
            out.faults.push((
                s,
                format!(
                    "trapped instruction (ESR {:#x}) not emulated, UNDEF injected",
                    r.detail.get()
                ),
            ));
            None
        }
        kind::SMMU_FAULT => {
            let text = format!(
                "SMMU fault {:#x}: device {:#x} {} of IOVA {ipa:#x}",
                r.detail.get(),
                r.stream_id.get(),
                access_name(r.access)
            );
            add_tick(out, timeline, s, tick::FAULT, || text.clone());
            out.faults.push((s, text));
            None
        }
        kind::OVERFLOW => {
            add_tick(out, timeline, s, tick::LOSS, || "overflow".to_string());
            if is_stream_loss(r) {
                model.uncertain = true;
            }
            None
        }
        kind::MARK => {
            push_event(out, timeline, r, format!("mark {:#x}", r.tag.get()));
            None
        }
        kind::GUEST_START => {
            push_event(
                out,
                timeline,
                r,
                format!("guest start at {ipa:#x}, RAM {size:#x}"),
            );
            None
        }
        kind::GUEST_STOP => {
            let why = match r.detail.get() {
                audit::stop_reason::SYSTEM_OFF => "SYSTEM_OFF",
                audit::stop_reason::SYSTEM_RESET => "SYSTEM_RESET",
                audit::stop_reason::FAULT => "unhandled trap",
                _ => "unknown reason",
            };
            push_event(out, timeline, r, format!("guest stop ({why})"));
            None
        }
        kind::FILTERED_WRITE => {
            let text = format!(
                "filtered write of {:#x} to register {ipa:#x}",
                r.detail.get()
            );
            push_event(out, timeline, r, text);
            None
        }
        _ => None,
    }
}

fn push_event(out: &mut Replay, timeline: &Timeline, r: &Record, text: String) {
    let s = r.sequence.get();
    add_tick(out, timeline, s, tick::EVENT, || text.clone());
    out.events.push((s, r.kind, text));
}

fn access_name(value: u8) -> &'static str {
    match value {
        audit::access::READ => "read",
        audit::access::WRITE => "write",
        audit::access::FETCH => "fetch",
        _ => "access",
    }
}

fn direction_name(value: u8) -> &'static str {
    match value {
        direction::BIDIRECTIONAL => "bidirectional",
        direction::TO_DEVICE => "to device",
        direction::FROM_DEVICE => "from device",
        _ => "-",
    }
}

/// The first pass over a stream: the buffers its records name and its span, which the picture
/// needs from the start.
#[derive(Clone, Debug, Default)]
pub struct Survey {
    /// (first IPA, bytes) of every buffer.
    buffers: BTreeSet<(u64, u64)>,
    /// First and last sequence numbers.
    span: Option<(u64, u64)>,
}

impl Survey {
    /// Reads one line of the stream.
    pub fn line(&mut self, text: &str) {
        if let Some(Ok(r)) = read_line(text) {
            let s = r.sequence.get();
            self.span = Some(self.span.map_or((s, s), |(first, _)| (first, s)));
            if matches!(
                r.kind,
                kind::ATTRIBUTE_CHANGE | kind::DMA_MAP | kind::DMA_UNMAP
            ) && r.size.get() > 0
                && r.status.get() >= 0
            {
                self.buffers.insert((r.ipa.get(), r.size.get()));
            }
        }
    }
}

/// The second pass over a stream: every check, one line at a time.
#[derive(Debug)]
pub struct Analyser {
    stream: Stream,
    chain: ChainChecker,
    replay: Replayer,
    timeline: Timeline,
}

impl Analyser {
    /// An analyser for the stream `survey` read.
    pub fn new(survey: &Survey) -> Self {
        let (first, last) = survey.span.unwrap_or((0, 0));
        let timeline = Timeline::new(first, last);
        Analyser {
            stream: Stream::default(),
            chain: ChainChecker::new(),
            replay: Replayer::new(survey, timeline),
            timeline,
        }
    }

    /// Reads line `number` (1-based) of the stream.
    pub fn line(&mut self, number: usize, text: &str) {
        match read_line(text) {
            None => {}
            Some(Ok(record)) => {
                self.stream.records += 1;
                self.chain.record(&record, number);
                self.replay.record(&record);
            }
            Some(Err(why)) => {
                self.chain.report.problems.push(Problem::Malformed {
                    line: number,
                    why: why.clone(),
                });
                self.stream.malformed.push((number, why));
            }
        }
    }

    /// The report on every line read.
    pub fn finish(self) -> Report {
        Report {
            stream: self.stream,
            chain: self.chain.finish(),
            replay: self.replay.finish(),
            timeline: self.timeline,
        }
    }
}

/// Everything the tool says about one stream.
#[derive(Clone, Debug)]
pub struct Report {
    /// What the lines held.
    pub stream: Stream,
    /// Sequence and hash checks.
    pub chain: ChainReport,
    /// The replay.
    pub replay: Replay,
    /// The picture's time axis.
    pub timeline: Timeline,
}

/// Reads and checks a stream held in memory.
pub fn analyse(text: &str) -> Report {
    let mut survey = Survey::default();
    text.lines().for_each(|line| survey.line(line));
    let mut analyser = Analyser::new(&survey);
    for (index, line) in text.lines().enumerate() {
        analyser.line(index + 1, line);
    }
    analyser.finish()
}

/// Reads and checks a stream from `input`, which it reads twice, a line at a time. Bytes that
/// are not UTF-8 are replaced, as the hypervisor's channel may carry a guest's.
///
/// # Errors
/// Any error reading or rewinding `input`.
pub fn analyse_reader<R: BufRead + Seek>(mut input: R) -> std::io::Result<Report> {
    let mut survey = Survey::default();
    let mut buffer = Vec::new();
    while read_text_line(&mut input, &mut buffer)? {
        survey.line(&String::from_utf8_lossy(&buffer));
    }
    input.seek(SeekFrom::Start(0))?;
    let mut analyser = Analyser::new(&survey);
    let mut number = 0;
    while read_text_line(&mut input, &mut buffer)? {
        number += 1;
        analyser.line(number, &String::from_utf8_lossy(&buffer));
    }
    Ok(analyser.finish())
}

/// Reads the next line into `buffer` without its end; false at the end of the input.
fn read_text_line(input: &mut impl BufRead, buffer: &mut Vec<u8>) -> std::io::Result<bool> {
    buffer.clear();
    if input.read_until(b'\n', buffer)? == 0 {
        return Ok(false);
    }
    if buffer.last() == Some(&b'\n') {
        buffer.pop();
        if buffer.last() == Some(&b'\r') {
            buffer.pop();
        }
    }
    Ok(true)
}

impl Report {
    /// Every failed check kept: chain problems first, then invariant violations.
    pub fn problems(&self) -> Vec<&Problem> {
        self.chain
            .problems
            .iter()
            .chain(self.replay.violations.iter())
            .collect()
    }

    /// How many checks failed, counting the problems not kept.
    pub fn problem_count(&self) -> u64 {
        self.chain.problems.total() + self.replay.violations.total()
    }

    /// Whether every check passed (and there was at least one record).
    pub fn passed(&self) -> bool {
        self.problem_count() == 0 && self.stream.records > 0
    }

    /// The text report.
    pub fn summary(&self) -> String {
        let mut out = String::new();
        let records = self.stream.records;
        let _ = writeln!(out, "stagehand audit report");
        let _ = writeln!(out, "======================");
        match self.replay.span {
            Some((first, last)) => {
                let _ = writeln!(
                    out,
                    "{records} records, sequence {first}..={last}, {} hashes verified{}",
                    self.chain.verified,
                    if self.chain.restarts > 0 {
                        format!(", {} restart(s)", self.chain.restarts)
                    } else {
                        String::new()
                    }
                );
            }
            None => {
                let _ = writeln!(out, "no audit records found");
            }
        }
        let kinds: Vec<String> = self
            .replay
            .kinds
            .iter()
            .map(|(k, n)| format!("{k} {n}"))
            .collect();
        if !kinds.is_empty() {
            let _ = writeln!(out, "kinds: {}", kinds.join(", "));
        }
        let problems = self.problems();
        let _ = writeln!(out);
        if problems.is_empty() {
            let _ = writeln!(
                out,
                "CHECKS PASSED: sequence continuous, hash chain intact, I1 I2 I4 replay clean"
            );
        } else {
            let _ = writeln!(
                out,
                "CHECKS FAILED ({} problems); first: {}",
                self.problem_count(),
                problems[0]
            );
            for problem in &problems {
                let _ = writeln!(out, "  - {problem}");
            }
            let omitted = self.problem_count() - problems.len() as u64;
            if omitted > 0 {
                let _ = writeln!(out, "  - ... {omitted} more, not kept");
            }
        }
        for note in self.replay.notes.iter() {
            let _ = writeln!(out, "  note: {note}");
        }
        if self.replay.notes.omitted() > 0 {
            let _ = writeln!(
                out,
                "  note: ... {} more, not kept",
                self.replay.notes.omitted()
            );
        }
        let _ = writeln!(out);
        let _ = writeln!(out, "Losses");
        if self.chain.losses.is_empty() {
            let _ = writeln!(out, "  none");
        }
        for loss in self.chain.losses.iter() {
            let _ = writeln!(
                out,
                "  records {}..={} ({}) lost from {}, reported by overflow record {}",
                loss.first,
                (loss.first + loss.count).saturating_sub(1),
                loss.count,
                if loss.from_stream {
                    "the host stream and the ring"
                } else {
                    "the ring (AUDIT_READ), not from this stream"
                },
                loss.reported_by
            );
        }
        if self.chain.losses.omitted() > 0 {
            let _ = writeln!(out, "  ... {} more, not kept", self.chain.losses.omitted());
        }
        let _ = writeln!(out);
        let _ = writeln!(out, "Buffers (attribute and DMA history)");
        if self.replay.buffers.is_empty() {
            let _ = writeln!(out, "  none");
        }
        for buffer in &self.replay.buffers {
            let _ = writeln!(out, "  {:#x}+{:#x}", buffer.ipa, buffer.size);
            for (sequence, what) in &buffer.history {
                let _ = writeln!(out, "    #{sequence:<6} {what}");
            }
            if buffer.history_omitted > 0 {
                let _ = writeln!(out, "    ... {} more", buffer.history_omitted);
            }
            for (sequence, what) in &buffer.history_tail {
                let _ = writeln!(out, "    #{sequence:<6} {what}");
            }
        }
        let _ = writeln!(out);
        for (title, list) in [
            ("Refused requests", &self.replay.refusals),
            ("Faults", &self.replay.faults),
        ] {
            let _ = writeln!(out, "{title} ({})", list.total());
            for (sequence, what) in list.iter() {
                let _ = writeln!(out, "  #{sequence:<6} {what}");
            }
            if list.omitted() > 0 {
                let _ = writeln!(out, "  ... {} more, not kept", list.omitted());
            }
            let _ = writeln!(out);
        }
        let _ = writeln!(out, "Events ({})", self.replay.events.total());
        const SHOWN: usize = 20;
        for (sequence, _, what) in self.replay.events.iter().take(SHOWN) {
            let _ = writeln!(out, "  #{sequence:<6} {what}");
        }
        if self.replay.events.total() > SHOWN as u64 {
            let _ = writeln!(
                out,
                "  ... {} more",
                self.replay.events.total() - SHOWN as u64
            );
        }
        out
    }

    /// The picture: one row per buffer (colour: WB grey, NC orange; a blue band while mapped
    /// for DMA) against the sequence number, and a row of events (refusals red, faults purple,
    /// marks grey, losses black). A long stream is drawn in at most [`COLUMNS`] columns; a
    /// column where a buffer was NC or mapped at some point is drawn so.
    pub fn svg(&self) -> String {
        let mut svg = String::new();
        self.write_svg(&mut svg);
        svg
    }

    /// Writes [`Report::svg`] to `svg` (a long stream's picture need not be held in memory).
    pub fn write_svg(&self, svg: &mut impl std::fmt::Write) {
        const LEFT: f64 = 170.0;
        const WIDTH: f64 = 960.0;
        const ROW: f64 = 26.0;
        const TOP: f64 = 40.0;
        let (first, last) = self.replay.span.unwrap_or((0, 0));
        let span = (last.saturating_sub(first) + 1) as f64;
        let x = |s: u64| LEFT + (s.saturating_sub(first)) as f64 / span * (WIDTH - LEFT - 20.0);
        let rows = self.replay.buffers.len() + 1;
        let height = TOP + rows as f64 * ROW + 50.0;
        let _ = writeln!(
            svg,
            r#"<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" viewBox="0 0 {WIDTH} {height}" font-family="monospace" font-size="11">"#
        );
        let _ = writeln!(svg, r#"<rect width="100%" height="100%" fill="white"/>"#);
        let verdict = if self.passed() {
            "checks passed"
        } else {
            "CHECKS FAILED"
        };
        let _ = writeln!(
            svg,
            r#"<text x="10" y="18" font-size="13">stagehand audit: records {first}..{last}, {verdict}</text>"#
        );
        let _ = writeln!(
            svg,
            r##"<g font-size="10"><rect x="{}" y="24" width="10" height="8" fill="#cfd4da"/><text x="{}" y="32">WB</text><rect x="{}" y="24" width="10" height="8" fill="#f08c00"/><text x="{}" y="32">NC</text><rect x="{}" y="24" width="10" height="8" fill="#1c7ed6"/><text x="{}" y="32">mapped for DMA</text><rect x="{}" y="24" width="3" height="8" fill="#e03131"/><text x="{}" y="32">refused</text><rect x="{}" y="24" width="3" height="8" fill="#7048e8"/><text x="{}" y="32">fault</text><rect x="{}" y="24" width="3" height="8" fill="#000"/><text x="{}" y="32">loss</text></g>"##,
            LEFT,
            LEFT + 14.0,
            LEFT + 40.0,
            LEFT + 54.0,
            LEFT + 80.0,
            LEFT + 94.0,
            LEFT + 200.0,
            LEFT + 206.0,
            LEFT + 260.0,
            LEFT + 266.0,
            LEFT + 310.0,
            LEFT + 316.0
        );
        for (row, buffer) in self.replay.buffers.iter().enumerate() {
            let y = TOP + row as f64 * ROW;
            let _ = writeln!(
                svg,
                r#"<text x="6" y="{}">{:#x}+{:#x}</text>"#,
                y + 15.0,
                buffer.ipa,
                buffer.size
            );
            for (i, (start, state)) in buffer.states.iter().enumerate() {
                let end = buffer.states.get(i + 1).map_or(last + 1, |(s, _)| *s);
                let (x0, x1) = (x(*start), x(end));
                let fill = if state.non_cacheable {
                    "#f08c00"
                } else {
                    "#cfd4da"
                };
                let _ = writeln!(
                    svg,
                    r#"<rect x="{x0:.1}" y="{}" width="{:.1}" height="18" fill="{fill}"><title>{}: {} from record {start}</title></rect>"#,
                    y + 2.0,
                    (x1 - x0).max(1.0),
                    if state.non_cacheable { "NC" } else { "WB" },
                    if state.pinned {
                        "mapped for DMA"
                    } else {
                        "not mapped"
                    },
                );
                if state.pinned {
                    let _ = writeln!(
                        svg,
                        r##"<rect x="{x0:.1}" y="{}" width="{:.1}" height="5" fill="#1c7ed6"/>"##,
                        y + 15.0,
                        (x1 - x0).max(1.0)
                    );
                }
            }
        }
        let y = TOP + self.replay.buffers.len() as f64 * ROW;
        let _ = writeln!(svg, r#"<text x="6" y="{}">events</text>"#, y + 15.0);
        let _ = writeln!(
            svg,
            r##"<line x1="{LEFT}" y1="{}" x2="{}" y2="{}" stroke="#adb5bd"/>"##,
            y + 11.0,
            WIDTH - 20.0,
            y + 11.0
        );
        // One tick per pixel column and colour is enough to see; it keeps long runs small.
        let mut drawn = std::collections::BTreeSet::new();
        let mut tick = |s: u64, colour: &str, title: &str| {
            if !drawn.insert((x(s) as i64, colour.to_string())) {
                return;
            }
            let _ = writeln!(
                svg,
                r#"<rect x="{:.1}" y="{}" width="2" height="18" fill="{colour}"><title>#{s} {}</title></rect>"#,
                x(s),
                y + 2.0,
                xml_escape(title)
            );
        };
        for (&(colour, _), (s, what)) in &self.replay.ticks {
            let colour = match colour {
                tick::REFUSAL => "#e03131",
                tick::FAULT => "#7048e8",
                tick::LOSS => "#000000",
                _ => "#868e96",
            };
            tick(*s, colour, what);
        }
        let axis = y + ROW + 14.0;
        let _ = writeln!(
            svg,
            r#"<text x="{LEFT}" y="{axis}">#{first}</text><text x="{}" y="{axis}" text-anchor="end">#{last}</text><text x="{}" y="{axis}" text-anchor="middle">sequence number</text>"#,
            WIDTH - 20.0,
            (LEFT + WIDTH) / 2.0
        );
        let _ = svg.write_str("</svg>\n");
    }

    /// A self-contained HTML page: the picture and the text report.
    pub fn html(&self) -> String {
        let mut html = String::new();
        self.write_html(&mut html);
        html
    }

    /// Writes [`Report::html`] to `html`.
    pub fn write_html(&self, html: &mut impl std::fmt::Write) {
        let _ = html.write_str("<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>stagehand audit report</title></head>\n<body>\n");
        self.write_svg(html);
        let _ = write!(
            html,
            "<pre>{}</pre>\n</body></html>\n",
            xml_escape(&self.summary())
        );
    }
}

fn xml_escape(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn skips_noise_and_reports_malformed_lines() {
        let report = analyse("hello\n[stagehand INFO ] boot\nAUDIT v1 seq=x\n");
        assert_eq!(report.stream.records, 0);
        assert_eq!(report.stream.malformed.len(), 1);
        assert_eq!(report.stream.malformed[0].0, 3);
        assert!(matches!(
            report.problems()[0],
            Problem::Malformed { line: 3, .. }
        ));
        let report = analyse("nothing here\n");
        assert!(!report.passed(), "a stream with no record is no evidence");
    }

    #[test]
    fn page_ranges() {
        assert_eq!(pages(0x1000, 0x2000), (1, 3));
        assert_eq!(pages(0x1800, 0x1000), (1, 3));
        assert_eq!(pages(0x1000, 0), (1, 1));
        assert_eq!(
            pages(u64::MAX - 10, 100),
            (u64::MAX / PAGE, u64::MAX / PAGE + 1)
        );
    }

    #[test]
    fn a_mapping_of_adjacent_runs_covers_their_union() {
        let mapping = Mapping {
            stream_id: 1,
            runs: vec![(0x3000, 0x1000), (0x1000, 0x2000)],
            rights: None,
        };
        assert!(mapping.covers(0x1000, 0x3000));
        assert!(mapping.covers(0x2800, 0x1000));
        assert!(!mapping.covers(0x1000, 0x3001));
        assert!(!mapping.covers(0x800, 0x1000));
        let split = Mapping {
            runs: vec![(0x1000, 0x1000), (0x3000, 0x1000)],
            ..mapping
        };
        assert!(!split.covers(0x1000, 0x3000));
        assert!(split.covers(0x3000, 0x800));
    }

    #[test]
    fn a_down_sampled_column_shows_what_it_saw() {
        let timeline = Timeline::new(0, 10 * COLUMNS - 1);
        assert_eq!(timeline.width, 10);
        let mut buffer = Buffer::new(0, PAGE, 0);
        let nc = State {
            non_cacheable: true,
            pinned: false,
        };
        // NC and back inside column 3: the column shows NC, column 4 WB again.
        buffer.change(33, nc, &timeline);
        buffer.change(35, State::default(), &timeline);
        buffer.settle(COLUMNS, &timeline);
        assert_eq!(
            buffer.states,
            [(0, State::default()), (30, nc), (40, State::default())]
        );
        // With one sequence number per column the states are exact.
        let timeline = Timeline::new(0, 100);
        let mut buffer = Buffer::new(0, PAGE, 0);
        buffer.change(33, nc, &timeline);
        buffer.change(35, State::default(), &timeline);
        buffer.settle(COLUMNS, &timeline);
        assert_eq!(
            buffer.states,
            [(0, State::default()), (33, nc), (35, State::default())]
        );
    }

    #[test]
    fn the_buffer_index_finds_every_overlap() {
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let buffers: Vec<Buffer> = (0..300)
            .map(|_| {
                let ipa = next() % 0x10_0000;
                let size = 1 + next() % (1 << (next() % 20));
                Buffer::new(ipa, size, 0)
            })
            .collect();
        let index = BufferIndex::new(&buffers);
        for _ in 0..300 {
            let ipa = next() % 0x10_0000;
            let end = ipa + 1 + next() % 0x1_0000;
            let mut found = Vec::new();
            index.overlapping(&buffers, ipa, end, &mut found);
            found.sort_unstable();
            let expected: Vec<usize> = (0..buffers.len())
                .filter(|&i| buffers[i].ipa < end && ipa < buffers[i].ipa + buffers[i].size)
                .collect();
            assert_eq!(found, expected);
        }
    }
}
