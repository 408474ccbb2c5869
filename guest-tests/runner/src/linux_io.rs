//! The Linux I/O rows: real virtio-blk and virtio-net drivers moving random data through the
//! SMMU, checked from the host.
//!
//! Before the run the runner picks a seed and fills a [`DISK_BYTES`] disk image with random
//! bytes from it. The guest's hooks (guest-tests/linux/init.d/55-virtio-blk-io and
//! 60-virtio-net; keep them in step with this file) then:
//!
//! - read the whole disk with direct I/O and print `IO-DISK-SHA256 <hex>`, and again through
//!   the page cache, comparing the two;
//! - make random writes, direct (512-byte aligned offsets and sizes, sub-page ones included)
//!   and buffered (any byte offset and size), each copying a random range of the disk's initial
//!   contents to a random offset, and print one manifest line per write,
//!   `IO-WRITE <index> <direct|buffered> <source offset> <disk offset> <bytes>`, then
//!   `IO-WRITES <count>`; they read the disk back and compare it with their own expectation;
//! - bring `eth0` up, print `NET-LISTENING <port>`, and echo what the host sends over one TCP
//!   connection (a `READY` line first), then print `NET-RECEIVED <bytes> <hex>`.
//!
//! After QEMU exits the runner replays the manifest onto the initial image and compares the
//! disk byte for byte; it compares the guest's digests with its own; and its network peer
//! ([`NetPeer`]), which ran while QEMU did, says whether every byte came back unchanged.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use crate::digest::{seeded_bytes, sha256_hex};
use crate::protocol::TestOutcome;
use crate::qemu::qemu_escape;

/// Bytes of the disk image.
pub const DISK_BYTES: usize = 16 << 20;
/// Bytes the host sends to the guest and expects back.
pub const NET_BYTES: usize = 4 << 20;
/// The TCP port the guest listens on (QEMU forwards a free host port to it).
pub const GUEST_PORT: u16 = 5000;
/// Alignment of direct writes (the disk's logical block size).
pub const DIRECT_ALIGN: u64 = 512;
/// Environment variable that fixes the seed (to rerun a failure with the same data).
pub const SEED_VAR: &str = "STAGEHAND_IO_SEED";
/// Fewest writes the manifest must list.
pub const MIN_WRITES: usize = 40;

/// What the I/O rows pass to the guest and keep for the checks.
#[derive(Clone, Debug)]
pub struct Setup {
    /// The seed of the disk's initial contents, the network data and the guest's write plan.
    pub seed: u64,
    /// The disk image.
    pub image: PathBuf,
    /// The host port QEMU forwards to [`GUEST_PORT`].
    pub host_port: u16,
}

/// The seed: [`SEED_VAR`] when set, else one from the clock.
///
/// # Errors
/// A sentence when [`SEED_VAR`] is set but not a number.
pub fn choose_seed(lookup: impl Fn(&str) -> Option<String>) -> Result<u64, String> {
    match lookup(SEED_VAR) {
        Some(text) => text
            .trim()
            .parse()
            .map_err(|_| format!("{SEED_VAR}={text} is not a number")),
        None => Ok(std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64 % 1_000_000_007)),
    }
}

/// The disk's initial contents for `seed`.
pub fn initial_image(seed: u64) -> Vec<u8> {
    seeded_bytes(seed, DISK_BYTES)
}

/// The network data for `seed` (unrelated to the disk's).
pub fn net_data(seed: u64) -> Vec<u8> {
    seeded_bytes(seed ^ 0x6e65_7400, NET_BYTES)
}

/// Writes the disk image for suite `suite` into `dir`, and finds a free host port.
///
/// # Errors
/// The I/O error of writing the image or of binding a port.
pub fn prepare(dir: &Path, suite: &str, seed: u64) -> std::io::Result<Setup> {
    let image = dir.join(format!("{suite}.disk.img"));
    std::fs::write(&image, initial_image(seed))?;
    // The port is free now; QEMU binds it a moment later (another process could take it in
    // between, which only fails this run with a clear QEMU error).
    let host_port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    Ok(Setup {
        seed,
        image,
        host_port,
    })
}

/// The kernel command line items that turn the hooks on.
pub fn append_items(setup: &Setup) -> String {
    format!(
        "stagehand.io_test=1 stagehand.io_seed={} stagehand.net_test=1 stagehand.net_port={GUEST_PORT} \
         stagehand.net_bytes={NET_BYTES}",
        setup.seed
    )
}

/// QEMU arguments: the disk at 00:03.0 and the network card at 00:04.0 (fixed addresses, so a
/// configuration can name them), both modern virtio-pci functions whose DMA goes through the
/// IOMMU; user networking forwards `host_port` on 127.0.0.1 to the guest's [`GUEST_PORT`].
/// `romfile=` keeps QEMU from looking for an option ROM the package does not ship.
pub fn qemu_args(setup: &Setup) -> Vec<String> {
    vec![
        "-drive".into(),
        format!(
            "if=none,id=io0,file={},format=raw",
            qemu_escape(&setup.image.to_string_lossy())
        ),
        "-device".into(),
        "virtio-blk-pci,drive=io0,addr=03.0,iommu_platform=on,disable-legacy=on".into(),
        "-netdev".into(),
        format!(
            "user,id=n0,hostfwd=tcp:127.0.0.1:{}-:{GUEST_PORT}",
            setup.host_port
        ),
        "-device".into(),
        "virtio-net-pci,netdev=n0,addr=04.0,iommu_platform=on,disable-legacy=on,romfile=".into(),
    ]
}

/// One write of the guest's manifest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DiskWrite {
    /// With `O_DIRECT`.
    pub direct: bool,
    /// Offset in the disk's initial contents of the bytes written.
    pub source: u64,
    /// Offset on the disk.
    pub offset: u64,
    /// Bytes.
    pub len: u64,
}

/// What the guest printed about its I/O.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GuestReport {
    /// `IO-DISK-SHA256`.
    pub disk_sha256: Option<String>,
    /// `IO-WRITE` lines in order, with their index.
    pub writes: Vec<(usize, DiskWrite)>,
    /// `IO-WRITES`.
    pub write_count: Option<usize>,
    /// `NET-RECEIVED`: bytes and digest.
    pub net_received: Option<(usize, String)>,
}

/// The words after `keyword` on a line that holds it (text before it, such as a kernel
/// message that ran into the line, is ignored).
fn words_after<'a>(line: &'a str, keyword: &str) -> Option<Vec<&'a str>> {
    let start = line.find(keyword)?;
    let mut words = line[start..].split_whitespace();
    (words.next()? == keyword).then(|| words.collect())
}

/// Parses the guest's I/O lines out of its console.
pub fn parse_guest_report(console: &str) -> GuestReport {
    let mut report = GuestReport::default();
    for line in console.lines() {
        if let Some(words) = words_after(line, "IO-DISK-SHA256") {
            report.disk_sha256 = words.first().map(|w| w.to_string());
        } else if let Some(words) = words_after(line, "IO-WRITE") {
            let number = |i: usize| words.get(i).and_then(|w| w.parse::<u64>().ok());
            let direct = match words.get(1) {
                Some(&"direct") => Some(true),
                Some(&"buffered") => Some(false),
                _ => None,
            };
            if let (Some(index), Some(direct), Some(source), Some(offset), Some(len)) =
                (number(0), direct, number(2), number(3), number(4))
            {
                let write = DiskWrite {
                    direct,
                    source,
                    offset,
                    len,
                };
                report.writes.push((index as usize, write));
            }
        } else if let Some(words) = words_after(line, "IO-WRITES") {
            report.write_count = words.first().and_then(|w| w.parse().ok());
        } else if let Some(words) = words_after(line, "NET-RECEIVED") {
            if let (Some(bytes), Some(digest)) =
                (words.first().and_then(|w| w.parse().ok()), words.get(1))
            {
                report.net_received = Some((bytes, digest.to_string()));
            }
        }
    }
    report
}

/// The disk as it must be after the manifest's writes, each copying bytes of the initial
/// contents. Also checks that the manifest is complete and well-formed and covers sub-page
/// writes of both kinds.
///
/// # Errors
/// What is wrong with the manifest.
pub fn replay(initial: &[u8], report: &GuestReport) -> Result<Vec<u8>, String> {
    let count = report
        .write_count
        .ok_or("the guest printed no IO-WRITES line (its writes did not finish)")?;
    if report.writes.len() != count {
        return Err(format!(
            "the guest announced {count} writes but printed {} IO-WRITE lines",
            report.writes.len()
        ));
    }
    if count < MIN_WRITES {
        return Err(format!(
            "only {count} writes, expected at least {MIN_WRITES}"
        ));
    }
    let disk = initial.len() as u64;
    let mut image = initial.to_vec();
    for (position, (index, write)) in report.writes.iter().enumerate() {
        if *index != position {
            return Err(format!("IO-WRITE line {position} says index {index}"));
        }
        let fits = |start: u64| start.checked_add(write.len).is_some_and(|end| end <= disk);
        if write.len == 0 || !fits(write.source) || !fits(write.offset) {
            return Err(format!(
                "write {index} ({write:?}) leaves the {disk}-byte disk"
            ));
        }
        if write.direct && (write.offset % DIRECT_ALIGN != 0 || write.len % DIRECT_ALIGN != 0) {
            return Err(format!(
                "direct write {index} ({write:?}) is not {DIRECT_ALIGN}-byte aligned"
            ));
        }
        let (source, offset, len) = (
            write.source as usize,
            write.offset as usize,
            write.len as usize,
        );
        image[offset..offset + len].copy_from_slice(&initial[source..source + len]);
    }
    for direct in [true, false] {
        let sub_page = |(_, w): &&(usize, DiskWrite)| w.direct == direct && w.len < 4096;
        if !report.writes.iter().any(|w| sub_page(&w)) {
            let kind = if direct { "direct" } else { "buffered" };
            return Err(format!("no sub-page {kind} write in the manifest"));
        }
    }
    Ok(image)
}

/// Where `actual` first differs from `expected`, and which writes covered that byte.
fn first_difference(actual: &[u8], expected: &[u8], report: &GuestReport) -> Option<String> {
    if actual.len() != expected.len() {
        return Some(format!(
            "the image is {} bytes, expected {}",
            actual.len(),
            expected.len()
        ));
    }
    let at = actual.iter().zip(expected).position(|(a, e)| a != e)?;
    let covering: Vec<usize> = report
        .writes
        .iter()
        .filter(|(_, w)| (w.offset..w.offset + w.len).contains(&(at as u64)))
        .map(|(i, _)| *i)
        .collect();
    Some(format!(
        "byte {at:#x} is {:#04x}, expected {:#04x} (writes covering it: {covering:?})",
        actual[at], expected[at]
    ))
}

/// The disk checks: `<suite>/blk-whole-read-host-check` (the guest's digest of its whole-disk
/// read is the image's) and `<suite>/blk-writes-host-check` (the image after the run is the
/// initial one with the manifest's writes, and nothing else changed).
pub fn check_disk(suite: &str, setup: &Setup, report: &GuestReport) -> Vec<TestOutcome> {
    let read_name = format!("{suite}/blk-whole-read-host-check");
    let writes_name = format!("{suite}/blk-writes-host-check");
    let seed = setup.seed;
    let initial = initial_image(seed);
    let read = match &report.disk_sha256 {
        None => TestOutcome::fail(read_name, "the guest printed no IO-DISK-SHA256 line"),
        Some(digest) if *digest == sha256_hex(&initial) => TestOutcome::pass(read_name),
        Some(digest) => TestOutcome::fail(
            read_name,
            format!(
                "the guest read a disk with SHA-256 {digest}, the image's is {} (seed {seed})",
                sha256_hex(&initial)
            ),
        ),
    };
    let writes = match replay(&initial, report) {
        Err(why) => TestOutcome::fail(writes_name, format!("{why} (seed {seed})")),
        Ok(expected) => match std::fs::read(&setup.image) {
            Err(error) => {
                TestOutcome::fail(writes_name, format!("{}: {error}", setup.image.display()))
            }
            Ok(actual) => match first_difference(&actual, &expected, report) {
                None => TestOutcome::pass(writes_name),
                Some(why) => TestOutcome::fail(
                    writes_name,
                    format!("{why} ({}, seed {seed})", setup.image.display()),
                ),
            },
        },
    };
    vec![read, writes]
}

/// The host's side of the network test: what it sent and what came back.
#[derive(Debug)]
pub struct NetResult {
    /// Bytes sent.
    pub sent: usize,
    /// Bytes received back, all equal to what was sent (else `error` says where they differ).
    pub echoed: usize,
    /// What went wrong, if anything.
    pub error: Option<String>,
}

/// The host's network peer, running while QEMU does.
pub struct NetPeer {
    handle: thread::JoinHandle<NetResult>,
}

impl NetPeer {
    /// Starts the peer: it waits until the console (`console`, chunks of QEMU's standard
    /// output) says `NET-LISTENING`, connects to `host_port`, waits for the guest's `READY`,
    /// sends the seeded data while reading the echo back, and gives up at `deadline`.
    pub fn start(host_port: u16, seed: u64, console: Receiver<Vec<u8>>, deadline: Instant) -> Self {
        let handle = thread::spawn(move || exchange(host_port, &net_data(seed), console, deadline));
        NetPeer { handle }
    }

    /// Waits for the peer to finish (it stops by its deadline at the latest).
    pub fn finish(self) -> NetResult {
        self.handle.join().unwrap_or(NetResult {
            sent: 0,
            echoed: 0,
            error: Some(String::from("the network peer panicked")),
        })
    }
}

/// Waits for `NET-LISTENING` in the console stream.
fn wait_for_listener(console: &Receiver<Vec<u8>>, deadline: Instant) -> Result<(), String> {
    let mut seen = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match console.recv_timeout(left) {
            Ok(chunk) => {
                seen.extend_from_slice(&chunk);
                if String::from_utf8_lossy(&seen).contains("NET-LISTENING") {
                    return Ok(());
                }
                // Only the tail can still complete a match.
                if seen.len() > 4096 {
                    seen.drain(..seen.len() - 64);
                }
            }
            Err(RecvTimeoutError::Timeout) => {
                return Err(String::from("the guest never printed NET-LISTENING"))
            }
            Err(RecvTimeoutError::Disconnected) => {
                return Err(String::from(
                    "QEMU ended before the guest printed NET-LISTENING",
                ))
            }
        }
    }
}

/// Connects and reads the guest's `READY` line, retrying while the guest's listener is not up
/// yet (QEMU accepts the host's connection at once and closes it when the guest refuses), until
/// `deadline` or until QEMU has ended (`ended`).
fn connect(host_port: u16, deadline: Instant, ended: &AtomicBool) -> Result<TcpStream, String> {
    let mut last = String::from("no attempt");
    while Instant::now() < deadline && !ended.load(Ordering::Relaxed) {
        match TcpStream::connect(("127.0.0.1", host_port)) {
            Ok(mut stream) => {
                let _ = stream.set_read_timeout(Some(Duration::from_secs(20)));
                let mut banner = [0u8; 6];
                match stream.read_exact(&mut banner) {
                    Ok(()) if &banner == b"READY\n" => return Ok(stream),
                    Ok(()) => return Err(format!("the guest greeted with {banner:?}, not READY")),
                    Err(error) => last = format!("no READY from the guest: {error}"),
                }
            }
            Err(error) => last = format!("connecting to 127.0.0.1:{host_port}: {error}"),
        }
        thread::sleep(Duration::from_millis(500));
    }
    Err(last)
}

/// The whole exchange; never panics.
fn exchange(
    host_port: u16,
    data: &[u8],
    console: Receiver<Vec<u8>>,
    deadline: Instant,
) -> NetResult {
    let failed = |error: String| NetResult {
        sent: 0,
        echoed: 0,
        error: Some(error),
    };
    if let Err(error) = wait_for_listener(&console, deadline) {
        return failed(error);
    }
    // Keep draining the console (the channel is unbounded, but there is no reason to keep it),
    // and note when QEMU's output ends: no connection can succeed after that.
    let ended = Arc::new(AtomicBool::new(false));
    let ended_by_drain = Arc::clone(&ended);
    thread::spawn(move || {
        while console.recv().is_ok() {}
        ended_by_drain.store(true, Ordering::Relaxed);
    });
    let stream = match connect(host_port, deadline, &ended) {
        Ok(stream) => stream,
        Err(error) => return failed(error),
    };
    let mut writer = match stream.try_clone() {
        Ok(writer) => writer,
        Err(error) => return failed(format!("cloning the socket: {error}")),
    };
    let to_send = data.to_vec();
    // Sending and receiving at once: the guest echoes while it receives, so a sender that
    // waited for the echo, or a reader that waited for the sender, would stall both.
    let sender = thread::spawn(move || -> Result<usize, String> {
        for chunk in to_send.chunks(16 << 10) {
            writer
                .write_all(chunk)
                .map_err(|error| format!("sending: {error}"))?;
        }
        let _ = writer.shutdown(Shutdown::Write);
        Ok(to_send.len())
    });
    let mut reader = stream;
    let mut echoed = 0usize;
    let mut buffer = vec![0u8; 64 << 10];
    let mut error = None;
    while echoed < data.len() {
        if Instant::now() >= deadline {
            error = Some(format!("timed out after {echoed} echoed bytes"));
            break;
        }
        match reader.read(&mut buffer) {
            Ok(0) => {
                error = Some(format!(
                    "the guest closed the connection after echoing {echoed} of {} bytes",
                    data.len()
                ));
                break;
            }
            Ok(n) => {
                let end = (echoed + n).min(data.len());
                if let Some(at) = buffer[..end - echoed]
                    .iter()
                    .zip(&data[echoed..end])
                    .position(|(a, b)| a != b)
                {
                    error = Some(format!(
                        "echoed byte {} differs from the byte sent",
                        echoed + at
                    ));
                    break;
                }
                if echoed + n > data.len() {
                    error = Some(format!(
                        "the guest echoed more than the {} bytes sent",
                        data.len()
                    ));
                    break;
                }
                echoed += n;
            }
            Err(e) => {
                error = Some(format!("receiving after {echoed} bytes: {e}"));
                break;
            }
        }
    }
    let _ = reader.shutdown(Shutdown::Both);
    let sent = match sender.join() {
        Ok(Ok(sent)) => sent,
        Ok(Err(why)) => {
            error.get_or_insert(why);
            0
        }
        Err(_) => {
            error.get_or_insert(String::from("the sender panicked"));
            0
        }
    };
    NetResult {
        sent,
        echoed,
        error,
    }
}

/// `<suite>/net-echo-host-check`: the host got back every byte it sent, unchanged, and the
/// guest's digest of what it received is the digest of what was sent.
pub fn check_net(
    suite: &str,
    setup: &Setup,
    result: &NetResult,
    report: &GuestReport,
) -> TestOutcome {
    let name = format!("{suite}/net-echo-host-check");
    let seed = setup.seed;
    if let Some(error) = &result.error {
        return TestOutcome::fail(name, format!("{error} (seed {seed})"));
    }
    if result.sent != NET_BYTES || result.echoed != NET_BYTES {
        return TestOutcome::fail(
            name,
            format!(
                "sent {} and got back {} bytes of {NET_BYTES}",
                result.sent, result.echoed
            ),
        );
    }
    let expected = sha256_hex(&net_data(seed));
    match &report.net_received {
        None => TestOutcome::fail(name, "the guest printed no NET-RECEIVED line"),
        Some((bytes, digest)) if *bytes == NET_BYTES && *digest == expected => TestOutcome::pass(name),
        Some((bytes, digest)) => TestOutcome::fail(
            name,
            format!(
                "the guest received {bytes} bytes with SHA-256 {digest}; the host sent {NET_BYTES} with {expected} (seed {seed})"
            ),
        ),
    }
}

/// Whether an audit-report refusal line (`function 0x... refused: ...`) is of one of the
/// hypervisor's own calls (SMCCC owner 6, vendor-specific hypervisor service: 0x86.. and
/// 0xC6..). Other refusals are the kernel's boot-time probes of firmware services the
/// hypervisor does not offer (Linux asks for the SMCCC TRNG, for example), not driver traffic.
/// DEV_INFO's NO_DEVICE is how the ABI ends the device list the module walks: not a refusal
/// either.
fn is_own_call_refusal(text: &str) -> bool {
    let function = text
        .strip_prefix("function 0x")
        .and_then(|rest| rest.get(..8))
        .and_then(|hex| u32::from_str_radix(hex, 16).ok());
    let end_of_device_list =
        function == Some(stagehand_abi::function::DEV_INFO) && text.contains(" refused: NO_DEVICE");
    // Unparsable: count it, never excuse it.
    !end_of_device_list && function.is_none_or(|function| (function >> 24) & 0x3f == 6)
}

/// `<suite>/audit-no-refusals`: the hypervisor's audit stream of the run holds records, no
/// fault, and no refused request of its own calls (well-formed driver traffic is never
/// refused).
pub fn check_no_refusals(suite: &str, logs: &Path) -> TestOutcome {
    check_refusals(&format!("{suite}/audit-no-refusals"), suite, logs, None)
}

/// Rows whose mapping quota is meant to run out (their hook is 58-dma-quota).
pub const QUOTA_ROWS: &[&str] = &["linux-io-quota"];

/// `<suite>/audit-quota-refusals`: the stream shows the quota reached (NO_MEMORY refusals) and
/// no fault and no other refusal of the hypervisor's own calls.
pub fn check_quota_refusals(suite: &str, logs: &Path) -> TestOutcome {
    check_refusals(
        &format!("{suite}/audit-quota-refusals"),
        suite,
        logs,
        Some("NO_MEMORY"),
    )
}

/// The stream in `<logs>/<suite>.hyp.log` holds records and no fault; its refusals of the
/// hypervisor's own calls all have status `expected` and there is at least one, or there are
/// none when `expected` is `None`.
fn check_refusals(name: &str, suite: &str, logs: &Path, expected: Option<&str>) -> TestOutcome {
    let path = logs.join(format!("{suite}.hyp.log"));
    let text = match std::fs::read(&path) {
        Ok(bytes) => String::from_utf8_lossy(&bytes).into_owned(),
        Err(error) => return TestOutcome::fail(name, format!("{}: {error}", path.display())),
    };
    let report = audit_report::analyse(&text);
    let replay = &report.replay;
    let is_expected =
        |text: &str| expected.is_some_and(|status| text.contains(&format!(" refused: {status}")));
    let own: Vec<&(u64, String)> = replay
        .refusals
        .iter()
        .filter(|(_, text)| is_own_call_refusal(text))
        .collect();
    let wanted = own.iter().filter(|(_, text)| is_expected(text)).count();
    let unwanted: Vec<&&(u64, String)> =
        own.iter().filter(|(_, text)| !is_expected(text)).collect();
    // Refusals counted past what the report keeps cannot be told apart: all count.
    let refused = unwanted.len() as u64 + replay.refusals.omitted();
    let faults = replay.faults.total();
    if report.stream.records == 0 {
        TestOutcome::fail(name, format!("no audit records in {}", path.display()))
    } else if refused > 0 || faults > 0 {
        let first = unwanted
            .first()
            .map(|entry| **entry)
            .or(replay.faults.first())
            .map_or_else(String::new, |(seq, text)| {
                format!("; first: seq {seq} {text}")
            });
        TestOutcome::fail(
            name,
            format!(
                "{refused} refused calls and {faults} faults audited{first} ({})",
                path.display()
            ),
        )
    } else if let (Some(status), 0) = (expected, wanted) {
        TestOutcome::fail(
            name,
            format!(
                "no {status} refusal audited: the quota was never reached ({})",
                path.display()
            ),
        )
    } else {
        TestOutcome::pass(name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest(writes: &[DiskWrite]) -> String {
        let mut text = String::from("IO-DISK-SHA256 abc\n");
        for (i, w) in writes.iter().enumerate() {
            let kind = if w.direct { "direct" } else { "buffered" };
            text.push_str(&format!(
                "IO-WRITE {i} {kind} {} {} {}\n",
                w.source, w.offset, w.len
            ));
        }
        text.push_str(&format!("IO-WRITES {}\n", writes.len()));
        text
    }

    fn sample_writes() -> Vec<DiskWrite> {
        (0..MIN_WRITES as u64)
            .map(|i| DiskWrite {
                direct: i % 2 == 0,
                source: i * 1000,
                offset: i * 8192,
                len: if i % 2 == 0 {
                    512 * (i + 1)
                } else {
                    1 + i * 300
                },
            })
            .collect()
    }

    #[test]
    fn parses_the_guest_lines_even_after_kernel_text() {
        let mut console = manifest(&sample_writes()[..2]);
        console.push_str("[   12.3] virtio_net virtio1 eth0: NET-RECEIVED 4194304 deadbeef\n");
        console.push_str("IO-WRITE 2 sideways 1 2 3\n");
        let report = parse_guest_report(&console);
        assert_eq!(report.disk_sha256.as_deref(), Some("abc"));
        assert_eq!(report.writes.len(), 2);
        assert_eq!(report.writes[1].1, sample_writes()[1]);
        assert_eq!(report.write_count, Some(2));
        assert_eq!(
            report.net_received,
            Some((4194304, String::from("deadbeef")))
        );
    }

    #[test]
    fn replay_applies_the_writes_in_order() {
        let initial: Vec<u8> = (0..1 << 20).map(|i| (i % 251) as u8).collect();
        let mut writes = sample_writes();
        // Two writes over one place: the later wins.
        writes[1] = DiskWrite {
            direct: false,
            source: 10,
            offset: 4000,
            len: 100,
        };
        writes[3] = DiskWrite {
            direct: false,
            source: 20,
            offset: 4050,
            len: 10,
        };
        let report = parse_guest_report(&manifest(&writes));
        let image = replay(&initial, &report).unwrap();
        assert_eq!(image[4000], initial[10]);
        assert_eq!(image[4050], initial[20]);
        assert_eq!(image[4060], initial[70]);
        assert_eq!(first_difference(&image, &image, &report), None);
        let mut wrong = image.clone();
        wrong[4055] ^= 1;
        let why = first_difference(&wrong, &image, &report).unwrap();
        assert!(why.contains("0xfd7") && why.contains("[1, 3]"), "{why}");
    }

    #[test]
    fn replay_rejects_bad_manifests() {
        let initial = vec![0u8; 1 << 20];
        let good = sample_writes();
        assert!(replay(&initial, &parse_guest_report(&manifest(&good))).is_ok());
        // Missing count line: the writes did not finish.
        let text = manifest(&good).replace("IO-WRITES", "XX");
        assert!(replay(&initial, &parse_guest_report(&text))
            .unwrap_err()
            .contains("no IO-WRITES"));
        // A lost line.
        let text = manifest(&good).replacen("IO-WRITE 3 ", "lost ", 1);
        assert!(replay(&initial, &parse_guest_report(&text)).is_err());
        // Out of the disk, misaligned direct, too few, no sub-page buffered write.
        let mut bad = good.clone();
        bad[0].offset = (1 << 20) - 10;
        assert!(replay(&initial, &parse_guest_report(&manifest(&bad)))
            .unwrap_err()
            .contains("leaves"));
        let mut bad = good.clone();
        bad[0].offset = 100;
        assert!(replay(&initial, &parse_guest_report(&manifest(&bad)))
            .unwrap_err()
            .contains("aligned"));
        assert!(
            replay(&initial, &parse_guest_report(&manifest(&good[..10])))
                .unwrap_err()
                .contains("at least")
        );
        let mut bad = good.clone();
        bad.iter_mut()
            .filter(|w| !w.direct)
            .for_each(|w| w.len = 5000);
        assert!(replay(&initial, &parse_guest_report(&manifest(&bad)))
            .unwrap_err()
            .contains("sub-page buffered"));
    }

    #[test]
    fn qemu_gets_both_devices_behind_the_iommu_and_the_forward() {
        let setup = Setup {
            seed: 3,
            image: PathBuf::from("l/x,y.img"),
            host_port: 4321,
        };
        let args = qemu_args(&setup).join(" ");
        assert!(args.contains("file=l/x,,y.img,"), "{args}");
        assert_eq!(
            args.matches("iommu_platform=on,disable-legacy=on").count(),
            2
        );
        assert!(args.contains("hostfwd=tcp:127.0.0.1:4321-:5000"));
        let append = append_items(&setup);
        assert!(
            append.contains("stagehand.io_seed=3 ")
                && append.contains("stagehand.net_bytes=4194304")
        );
    }

    #[test]
    fn the_hooks_read_what_the_runner_passes() {
        let blk = include_str!("../../linux/init.d/55-virtio-blk-io");
        let net = include_str!("../../linux/init.d/60-virtio-net");
        for item in ["stagehand.io_test", "stagehand.io_seed"] {
            assert!(blk.contains(&format!("cmdline_value {item}")), "{item}");
        }
        for item in [
            "stagehand.net_test",
            "stagehand.net_port",
            "stagehand.net_bytes",
        ] {
            assert!(net.contains(&format!("cmdline_value {item}")), "{item}");
        }
        for word in ["IO-DISK-SHA256", "IO-WRITE ", "IO-WRITES"] {
            assert!(blk.contains(word), "{word}");
        }
        assert!(
            net.contains("NET-LISTENING") && net.contains("NET-RECEIVED") && net.contains("READY")
        );
    }

    #[test]
    fn only_refusals_of_the_hypervisors_own_calls_count() {
        assert!(is_own_call_refusal(
            "function 0xc6000031 refused: BUSY (range 0x1+0x2)"
        ));
        assert!(is_own_call_refusal(
            "function 0x86000001 refused: NOT_SUPPORTED"
        ));
        assert!(!is_own_call_refusal(
            "function 0x84000050 refused: NOT_SUPPORTED"
        ));
        assert!(!is_own_call_refusal(
            "function 0xc4000001 refused: NOT_SUPPORTED"
        ));
        assert!(is_own_call_refusal("something else"));
    }

    /// A stand-in for the guest's `nc -e` script on a local port: READY, then echo every byte,
    /// flipping one when `corrupt` says so.
    fn fake_guest(corrupt: Option<usize>) -> u16 {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        thread::spawn(move || {
            let (mut stream, _) = listener.accept().unwrap();
            stream.write_all(b"READY\n").unwrap();
            let mut buffer = [0u8; 8192];
            let mut seen = 0usize;
            loop {
                let n = match stream.read(&mut buffer) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => n,
                };
                if let Some(at) = corrupt.filter(|at| (seen..seen + n).contains(at)) {
                    buffer[at - seen] ^= 0x40;
                }
                seen += n;
                if stream.write_all(&buffer[..n]).is_err() {
                    break;
                }
            }
        });
        port
    }

    fn run_peer(port: u16) -> NetResult {
        let (tap, console) = std::sync::mpsc::channel();
        let peer = NetPeer::start(port, 9, console, Instant::now() + Duration::from_secs(60));
        tap.send(b"boot...\nNET-LIST".to_vec()).unwrap();
        tap.send(b"ENING 5000\n".to_vec()).unwrap();
        let result = peer.finish();
        drop(tap);
        result
    }

    #[test]
    fn the_peer_sends_everything_and_checks_every_byte_of_the_echo() {
        let good = run_peer(fake_guest(None));
        assert_eq!(
            (good.sent, good.echoed, good.error),
            (NET_BYTES, NET_BYTES, None)
        );
        let bad = run_peer(fake_guest(Some(123_457)));
        assert!(bad.error.unwrap().contains("byte 123457 differs"));
    }

    #[test]
    fn the_peer_gives_up_when_qemu_ends_before_the_guest_listens() {
        let (tap, console) = std::sync::mpsc::channel();
        let peer = NetPeer::start(1, 9, console, Instant::now() + Duration::from_secs(60));
        tap.send(b"kernel panic\n".to_vec()).unwrap();
        drop(tap);
        let result = peer.finish();
        assert!(result
            .error
            .unwrap()
            .contains("before the guest printed NET-LISTENING"));
    }

    /// The rows' configurations name the PCI functions the runner puts the devices at, and the
    /// quota row is the one whose hook expects the quota to run out.
    #[test]
    fn the_rows_configure_the_devices_they_attach() {
        use crate::suites::{find, Disk};
        let args = qemu_args(&Setup {
            seed: 1,
            image: PathBuf::from("d"),
            host_port: 2,
        })
        .join(" ");
        assert!(args.contains("addr=03.0") && args.contains("addr=04.0"));
        let strict = find("linux-io-strict").unwrap();
        assert_eq!(strict.disk, Disk::LinuxIo);
        assert_eq!(
            strict.config,
            &["devices=00:03.0/strict/noncoherent+00:04.0/strict/noncoherent"]
        );
        assert!(strict.loads_module());
        assert_eq!(find("linux-io").unwrap().config, &[] as &[&str]);
        for name in QUOTA_ROWS {
            let row = find(name).unwrap();
            assert!(row.config.iter().any(|c| c.starts_with("dma-mappings=")));
            assert!(row.config.contains(&"devices=00:03.0/strict/noncoherent"));
            assert!(row.append.unwrap().contains("stagehand.quota_test=1"));
            assert!(row.extra_args.join(" ").contains("addr=03.0"));
            assert!(crate::audit_replay::applies(name));
        }
    }

    #[test]
    fn the_seed_comes_from_the_environment_when_set() {
        assert_eq!(choose_seed(|_| Some(String::from("42"))), Ok(42));
        assert!(choose_seed(|_| Some(String::from("x"))).is_err());
        assert!(choose_seed(|_| None).is_ok());
    }

    #[test]
    fn the_net_check_wants_every_byte_and_the_digest() {
        let setup = Setup {
            seed: 5,
            image: PathBuf::new(),
            host_port: 1,
        };
        let good = NetResult {
            sent: NET_BYTES,
            echoed: NET_BYTES,
            error: None,
        };
        let digest = sha256_hex(&net_data(5));
        let report = GuestReport {
            net_received: Some((NET_BYTES, digest.clone())),
            ..GuestReport::default()
        };
        assert!(check_net("s", &setup, &good, &report).failure.is_none());
        let other = GuestReport {
            net_received: Some((NET_BYTES, String::from("00"))),
            ..GuestReport::default()
        };
        assert!(check_net("s", &setup, &good, &other).failure.is_some());
        let short = NetResult { echoed: 10, ..good };
        assert!(check_net("s", &setup, &short, &report).failure.is_some());
        assert!(check_net(
            "s",
            &setup,
            &NetResult {
                sent: 0,
                echoed: 0,
                error: Some("x".into())
            },
            &report
        )
        .failure
        .is_some());
    }
}
