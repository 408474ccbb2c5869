//! `audit-report`: reads a stagehand audit stream (the hypervisor's UART log, or any text with
//! `AUDIT v1 ...` lines in it), and
//!
//! 1. checks the stream: sequence numbers without unexplained gaps, in order, each record's hash
//!    chained to the previous one ([`check_chain`]); a gap is accepted only where a later
//!    STREAM_LOSS overflow record reports exactly those records;
//! 2. replays the records through a model of the attribute rules and reports every violation of
//!    I1 (no cacheable alias of an NC page), I2 (clean + invalidate, break and TLBI before NC;
//!    invalidate before WB again) and I4 (no attribute change of a pinned page, no sync or unmap
//!    of a buffer that is not mapped, no unpin before the SMMU's CMD_SYNC) ([`replay`]);
//! 3. prints a summary a person reads ([`Report::summary`]) and draws the page attributes and DMA
//!    mappings over time as a self-contained SVG or HTML page ([`Report::svg`], [`Report::html`]).
//!
//! Lines that are not audit records (guest console output, log lines) are skipped.

#![forbid(unsafe_code)]

use std::collections::BTreeMap;
use std::fmt::Write as _;

use stagehand_abi::audit::{
    self, attr, cmo, direction, flag, kind, parse_line, smmu_command, tlbi, Record, GENESIS_HASH,
    LAYOUT_VERSION, LINE_MARKER,
};
use stagehand_abi::Status;

const PAGE: u64 = 4096;

/// A record and the line it came from (1-based).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Line {
    /// Line number in the input.
    pub number: usize,
    /// The record.
    pub record: Record,
}

/// The audit records of a text, in the order they appear.
#[derive(Clone, Debug, Default)]
pub struct Stream {
    /// Records read back from their lines.
    pub lines: Vec<Line>,
    /// Lines that start like a record but could not be read back: (line number, why).
    pub malformed: Vec<(usize, String)>,
}

/// Reads every audit record line of `text`; other lines are skipped.
pub fn parse_stream(text: &str) -> Stream {
    let mut stream = Stream::default();
    for (index, line) in text.lines().enumerate() {
        if !line.contains(LINE_MARKER) {
            continue;
        }
        match parse_line(line) {
            Ok(record) => stream.lines.push(Line {
                number: index + 1,
                record,
            }),
            Err(error) => stream.malformed.push((index + 1, error.to_string())),
        }
    }
    stream
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
    pub problems: Vec<Problem>,
    /// Losses reported by overflow records (ring and stream).
    pub losses: Vec<Loss>,
    /// Records whose hash was verified.
    pub verified: usize,
    /// Times the numbering restarted at 0 (a new boot in the same log).
    pub restarts: usize,
}

fn is_stream_loss(r: &Record) -> bool {
    r.kind == kind::OVERFLOW && r.flags.get() & flag::STREAM_LOSS != 0
}

/// Checks sequence continuity, order and the hash chain of `stream`.
pub fn check_chain(stream: &Stream) -> ChainReport {
    let mut report = ChainReport::default();
    for (line, why) in &stream.malformed {
        report.problems.push(Problem::Malformed {
            line: *line,
            why: why.clone(),
        });
    }
    let mut expected = 0u64;
    let mut previous = GENESIS_HASH;
    for (index, line) in stream.lines.iter().enumerate() {
        let r = &line.record;
        let sequence = r.sequence.get();
        if r.kind == kind::OVERFLOW {
            report.losses.push(Loss {
                first: r.detail.get(),
                count: r.dropped.get(),
                reported_by: sequence,
                from_stream: is_stream_loss(r),
            });
        }
        if r.version.get() != LAYOUT_VERSION
            || r.reserved0 != 0
            || r.reserved1.get() != 0
            || r.reserved2.get() != 0
            || r.reserved3.get() != 0
        {
            report.problems.push(Problem::BadLayout {
                sequence,
                line: line.number,
            });
        }
        if sequence == 0 && index > 0 && r.hash_follows(GENESIS_HASH) {
            // The hypervisor started again and appended to the same log.
            report.restarts += 1;
            expected = 0;
            previous = GENESIS_HASH;
        }
        if sequence < expected {
            report.problems.push(Problem::OutOfOrder {
                sequence,
                after: expected - 1,
                line: line.number,
            });
            continue;
        }
        if sequence > expected {
            let reported = stream.lines[index..].iter().find(|l| {
                is_stream_loss(&l.record)
                    && l.record.detail.get() == expected
                    && l.record.detail.get() + l.record.dropped.get() == sequence
            });
            match reported {
                Some(loss) => previous = loss.record.tag.get(),
                None => {
                    report.problems.push(Problem::Gap {
                        first: expected,
                        end: sequence,
                        line: line.number,
                    });
                    // Resynchronise on this record so one gap is one problem.
                    previous = r.hash.get();
                    expected = sequence + 1;
                    continue;
                }
            }
        }
        if r.hash_follows(previous) {
            report.verified += 1;
        } else {
            report.problems.push(Problem::Altered {
                sequence,
                line: line.number,
            });
        }
        previous = r.hash.get();
        expected = sequence + 1;
    }
    report
}

/// The state of a page or buffer at one point of the replay.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct State {
    /// Non-cacheable (else write-back).
    pub non_cacheable: bool,
    /// Some page of it is mapped for DMA.
    pub pinned: bool,
}

/// A range that records name: an attribute-change or DMA range.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Buffer {
    /// First IPA.
    pub ipa: u64,
    /// Bytes.
    pub size: u64,
    /// What happened to it: (sequence, description).
    pub history: Vec<(u64, String)>,
    /// Its state after each record that changed it: (sequence, state), first entry the state
    /// before its first record.
    pub states: Vec<(u64, State)>,
}

#[derive(Clone, Copy, Debug)]
struct Mapping {
    stream_id: u32,
    ipa: u64,
    size: u64,
    used_smmu: bool,
}

/// What the replay of the records found.
#[derive(Clone, Debug, Default)]
pub struct Replay {
    /// Invariant violations, in order.
    pub violations: Vec<Problem>,
    /// Findings the replay could not be sure of after a loss (not failures).
    pub notes: Vec<String>,
    /// Every buffer records name, by first IPA.
    pub buffers: Vec<Buffer>,
    /// Refused requests: (sequence, description).
    pub refusals: Vec<(u64, String)>,
    /// Faults (stage 2 and SMMU): (sequence, description).
    pub faults: Vec<(u64, String)>,
    /// Other events worth a line: marks, guest start and stop, filtered writes.
    pub events: Vec<(u64, u8, String)>,
    /// Records per kind name.
    pub kinds: BTreeMap<String, usize>,
    /// First and last sequence numbers seen.
    pub span: Option<(u64, u64)>,
}

fn status_name(code: i64) -> String {
    match Status::from_code(code) {
        Some(status) => status.name().to_string(),
        None => format!("{code}"),
    }
}

fn pages(ipa: u64, size: u64) -> impl Iterator<Item = u64> {
    let first = ipa / PAGE;
    let end = ipa.saturating_add(size).div_ceil(PAGE);
    first..end.max(first)
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

struct Model {
    non_cacheable: BTreeMap<u64, bool>,
    pins: BTreeMap<u64, u32>,
    mappings: BTreeMap<u64, Mapping>,
    /// A loss happened before this point: history-dependent findings become notes.
    uncertain: bool,
}

impl Model {
    fn page_nc(&self, page: u64) -> bool {
        self.non_cacheable.get(&page).copied().unwrap_or(false)
    }
    fn pinned(&self, page: u64) -> bool {
        self.pins.get(&page).copied().unwrap_or(0) > 0
    }
    fn state(&self, buffer: &Buffer) -> State {
        State {
            non_cacheable: self.page_nc(buffer.ipa / PAGE),
            pinned: pages(buffer.ipa, buffer.size).any(|p| self.pinned(p)),
        }
    }
}

/// Replays `stream` through the attribute model.
pub fn replay(stream: &Stream) -> Replay {
    let mut out = Replay::default();
    let mut model = Model {
        non_cacheable: BTreeMap::new(),
        pins: BTreeMap::new(),
        mappings: BTreeMap::new(),
        uncertain: false,
    };
    // Buffers first, so each can be drawn from the start.
    let mut buffers: BTreeMap<(u64, u64), Buffer> = BTreeMap::new();
    for line in &stream.lines {
        let r = &line.record;
        if matches!(
            r.kind,
            kind::ATTRIBUTE_CHANGE | kind::DMA_MAP | kind::DMA_UNMAP
        ) && r.size.get() > 0
            && r.status.get() >= 0
        {
            buffers
                .entry((r.ipa.get(), r.size.get()))
                .or_insert_with(|| Buffer {
                    ipa: r.ipa.get(),
                    size: r.size.get(),
                    history: Vec::new(),
                    states: Vec::new(),
                });
        }
    }
    let mut buffers: Vec<Buffer> = buffers.into_values().collect();
    let mut previous_sequence: Option<u64> = None;
    for line in &stream.lines {
        let r = &line.record;
        let s = r.sequence.get();
        if previous_sequence.is_some_and(|p| s != p + 1) {
            model.uncertain = true;
        }
        previous_sequence = Some(s);
        out.span = Some(out.span.map_or((s, s), |(a, _)| (a, s)));
        let name = r.kind_name().unwrap_or("unknown").to_string();
        *out.kinds.entry(name).or_default() += 1;
        let before: Vec<State> = buffers.iter().map(|b| model.state(b)).collect();
        let described = apply(r, &mut model, &mut out);
        for (buffer, old) in buffers.iter_mut().zip(before) {
            if buffer.states.is_empty() {
                buffer.states.push((s, old));
            }
            let new = model.state(buffer);
            let touches = r.ipa.get() < buffer.ipa + buffer.size
                && buffer.ipa < r.ipa.get().saturating_add(r.size.get().max(1));
            if let (Some(text), true) = (&described, touches) {
                buffer.history.push((s, text.clone()));
            }
            if new != old {
                buffer.states.push((s, new));
            }
        }
    }
    out.buffers = buffers;
    out
}

/// Applies one record to the model; returns a description when it concerns a buffer.
fn apply(r: &Record, model: &mut Model, out: &mut Replay) -> Option<String> {
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
            let pinned: Vec<u64> = pages(ipa, size).filter(|&p| model.pinned(p)).collect();
            if let Some(page) = pinned.first() {
                violation(
                    out,
                    "I4",
                    format!(
                        "attribute of {range} changed while page {:#x} is mapped for DMA",
                        page * PAGE
                    ),
                );
            }
            let mismatched = pages(ipa, size).find(|&p| model.page_nc(p) != (old == attr::NC));
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
            for page in pages(ipa, size) {
                model.non_cacheable.insert(page, new == attr::NC);
            }
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
            if r.new_attr != attr::NONE {
                let device_nc = r.new_attr == attr::NC;
                if let Some(page) = pages(ipa, size).find(|&p| model.page_nc(p) != device_nc) {
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
            for page in pages(ipa, size) {
                *model.pins.entry(page).or_default() += 1;
            }
            model.mappings.insert(
                handle,
                Mapping {
                    stream_id: r.stream_id.get(),
                    ipa,
                    size,
                    used_smmu: r.smmu_commands.get() > 0,
                },
            );
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
                    if mapping.used_smmu && r.smmu_kinds.get() & smmu_command::SYNC == 0 {
                        violation(
                            out,
                            "I4",
                            format!(
                                "handle {handle} (device {:#x}) unpinned without a CMD_SYNC after its SMMU unmap",
                                mapping.stream_id
                            ),
                        );
                    }
                    for page in pages(mapping.ipa, mapping.size) {
                        if let Some(pins) = model.pins.get_mut(&page) {
                            *pins = pins.saturating_sub(1);
                        }
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
                .is_some_and(|m| ipa >= m.ipa && ipa.saturating_add(size) <= m.ipa + m.size);
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
            out.refusals.push((s, text));
            None
        }
        kind::STAGE2_FAULT => {
            out.faults.push((
                s,
                format!(
                    "stage-2 fault: {} of IPA {ipa:#x}, abort injected",
                    access_name(r.access)
                ),
            ));
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
            out.faults.push((
                s,
                format!(
                    "SMMU fault {:#x}: device {:#x} {} of IOVA {ipa:#x}",
                    r.detail.get(),
                    r.stream_id.get(),
                    access_name(r.access)
                ),
            ));
            None
        }
        kind::OVERFLOW => {
            if is_stream_loss(r) {
                model.uncertain = true;
            }
            None
        }
        kind::MARK => {
            out.events
                .push((s, r.kind, format!("mark {:#x}", r.tag.get())));
            None
        }
        kind::GUEST_START => {
            out.events
                .push((s, r.kind, format!("guest start at {ipa:#x}, RAM {size:#x}")));
            None
        }
        kind::GUEST_STOP => {
            let why = match r.detail.get() {
                audit::stop_reason::SYSTEM_OFF => "SYSTEM_OFF",
                audit::stop_reason::SYSTEM_RESET => "SYSTEM_RESET",
                audit::stop_reason::FAULT => "unhandled trap",
                _ => "unknown reason",
            };
            out.events.push((s, r.kind, format!("guest stop ({why})")));
            None
        }
        kind::FILTERED_WRITE => {
            out.events.push((
                s,
                r.kind,
                format!(
                    "filtered write of {:#x} to register {ipa:#x}",
                    r.detail.get()
                ),
            ));
            None
        }
        _ => None,
    }
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

/// Everything the tool says about one stream.
#[derive(Clone, Debug)]
pub struct Report {
    /// The records.
    pub stream: Stream,
    /// Sequence and hash checks.
    pub chain: ChainReport,
    /// The replay.
    pub replay: Replay,
}

/// Reads and checks a stream.
pub fn analyse(text: &str) -> Report {
    let stream = parse_stream(text);
    let chain = check_chain(&stream);
    let replay = replay(&stream);
    Report {
        stream,
        chain,
        replay,
    }
}

impl Report {
    /// Every failed check: chain problems first, then invariant violations.
    pub fn problems(&self) -> Vec<&Problem> {
        self.chain
            .problems
            .iter()
            .chain(&self.replay.violations)
            .collect()
    }

    /// Whether every check passed (and there was at least one record).
    pub fn passed(&self) -> bool {
        self.problems().is_empty() && !self.stream.lines.is_empty()
    }

    /// The text report.
    pub fn summary(&self) -> String {
        let mut out = String::new();
        let records = self.stream.lines.len();
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
                problems.len(),
                problems[0]
            );
            for problem in &problems {
                let _ = writeln!(out, "  - {problem}");
            }
        }
        for note in &self.replay.notes {
            let _ = writeln!(out, "  note: {note}");
        }
        let _ = writeln!(out);
        let _ = writeln!(out, "Losses");
        if self.chain.losses.is_empty() {
            let _ = writeln!(out, "  none");
        }
        for loss in &self.chain.losses {
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
        }
        let _ = writeln!(out);
        let _ = writeln!(out, "Refused requests ({})", self.replay.refusals.len());
        for (sequence, what) in &self.replay.refusals {
            let _ = writeln!(out, "  #{sequence:<6} {what}");
        }
        let _ = writeln!(out);
        let _ = writeln!(out, "Faults ({})", self.replay.faults.len());
        for (sequence, what) in &self.replay.faults {
            let _ = writeln!(out, "  #{sequence:<6} {what}");
        }
        let _ = writeln!(out);
        let _ = writeln!(out, "Events ({})", self.replay.events.len());
        const SHOWN: usize = 20;
        for (sequence, _, what) in self.replay.events.iter().take(SHOWN) {
            let _ = writeln!(out, "  #{sequence:<6} {what}");
        }
        if self.replay.events.len() > SHOWN {
            let _ = writeln!(out, "  ... {} more", self.replay.events.len() - SHOWN);
        }
        out
    }

    /// The picture: one row per buffer (colour: WB grey, NC orange; a blue band while mapped
    /// for DMA) against the sequence number, and a row of events (refusals red, faults purple,
    /// marks grey, losses black).
    pub fn svg(&self) -> String {
        const LEFT: f64 = 170.0;
        const WIDTH: f64 = 960.0;
        const ROW: f64 = 26.0;
        const TOP: f64 = 40.0;
        let (first, last) = self.replay.span.unwrap_or((0, 0));
        let span = (last - first + 1) as f64;
        let x = |s: u64| LEFT + (s.saturating_sub(first)) as f64 / span * (WIDTH - LEFT - 20.0);
        let rows = self.replay.buffers.len() + 1;
        let height = TOP + rows as f64 * ROW + 50.0;
        let mut svg = String::new();
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
        for (s, _, what) in &self.replay.events {
            tick(*s, "#868e96", what);
        }
        for (s, what) in &self.replay.refusals {
            tick(*s, "#e03131", what);
        }
        for (s, what) in &self.replay.faults {
            tick(*s, "#7048e8", what);
        }
        for loss in &self.chain.losses {
            tick(loss.reported_by, "#000000", "overflow");
        }
        let axis = y + ROW + 14.0;
        let _ = writeln!(
            svg,
            r#"<text x="{LEFT}" y="{axis}">#{first}</text><text x="{}" y="{axis}" text-anchor="end">#{last}</text><text x="{}" y="{axis}" text-anchor="middle">sequence number</text>"#,
            WIDTH - 20.0,
            (LEFT + WIDTH) / 2.0
        );
        svg.push_str("</svg>\n");
        svg
    }

    /// A self-contained HTML page: the picture and the text report.
    pub fn html(&self) -> String {
        format!(
            "<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>stagehand audit report</title></head>\n<body>\n{}<pre>{}</pre>\n</body></html>\n",
            self.svg(),
            xml_escape(&self.summary())
        )
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
        let stream = parse_stream("hello\n[stagehand INFO ] boot\nAUDIT v1 seq=x\n");
        assert!(stream.lines.is_empty());
        assert_eq!(stream.malformed.len(), 1);
        assert_eq!(stream.malformed[0].0, 3);
        let report = analyse("nothing here\n");
        assert!(!report.passed(), "a stream with no record is no evidence");
    }

    #[test]
    fn page_ranges() {
        assert_eq!(pages(0x1000, 0x2000).collect::<Vec<_>>(), [1, 2]);
        assert_eq!(pages(0x1800, 0x1000).collect::<Vec<_>>(), [1, 2]);
        assert_eq!(pages(0x1000, 0).count(), 0);
        assert_eq!(pages(u64::MAX - 10, 100).count(), 1);
    }
}
