//! The hypervisor's log: the `log` crate over a PL011. When QEMU has a second UART the
//! hypervisor keeps it for itself and logs at any time; with a single UART it shares the guest's
//! and logs only while no guest runs, so it never writes into the middle of a guest's line.

use core::fmt::Write;
use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use stagehand_abi::audit::{format_line_words, line_bytes, write_line, RecordWords, MAX_LINE};
use stagehand_platform::pl011::{FifoLine, Pl011, Pl011Registers};

/// The hypervisor's UART and when it may speak.
pub struct Console {
    /// Serialises whole lines.
    lock: spin::Mutex<()>,
    /// Base of the PL011 register block (0 before `init`).
    base: AtomicU64,
    shared_with_guest: AtomicBool,
    guest_running: AtomicBool,
    suppressed: AtomicU64,
}

static CONSOLE: Console = Console {
    lock: spin::Mutex::new(()),
    base: AtomicU64::new(0),
    shared_with_guest: AtomicBool::new(false),
    guest_running: AtomicBool::new(false),
    suppressed: AtomicU64::new(0),
};

/// The register block at `base`.
///
/// # Safety
/// `base` must be a PL011 mapped as Device memory for the rest of the hypervisor's life.
unsafe fn uart_at(base: u64) -> Pl011<'static> {
    // SAFETY: per the contract, the register block is mapped and lives forever.
    Pl011::new(unsafe { &*(base as *const Pl011Registers) })
}

/// Starts logging on the PL011 at `base`. `shared` says the guest's console is the same UART.
///
/// # Safety
/// `base` must be a PL011 mapped as Device memory for the rest of the hypervisor's life.
pub unsafe fn init(base: u64, shared: bool) {
    // SAFETY: forwarded contract.
    let uart = unsafe { uart_at(base) };
    if !shared {
        uart.init();
    }
    CONSOLE.base.store(base, Ordering::Release);
    CONSOLE.shared_with_guest.store(shared, Ordering::Relaxed);
    // `set_logger` fails only if a logger exists already; there is exactly one call.
    let _ = log::set_logger(&CONSOLE);
    set_level(log::LevelFilter::Info);
}

/// The most verbose level of log lines. (Audit records are not log lines: the audit
/// configuration filters them, whatever the log level.)
pub fn set_level(level: log::LevelFilter) {
    LEVEL.store(level as usize, Ordering::Relaxed);
    log::set_max_level(level);
}

/// The configured log level, as a `log::LevelFilter` discriminant.
static LEVEL: core::sync::atomic::AtomicUsize =
    core::sync::atomic::AtomicUsize::new(log::LevelFilter::Info as usize);

/// The guest starts or stops using a shared console.
pub fn set_guest_running(running: bool) {
    CONSOLE.guest_running.store(running, Ordering::Release);
    if !running {
        let lost = CONSOLE.suppressed.swap(0, Ordering::AcqRel);
        if lost > 0 {
            log::info!("{lost} log lines were held back while the guest owned the shared UART");
        }
    }
}

/// Writes the line of one audit record on the hypervisor's UART, whole, under the lock.
/// Audit lines skip the `log` machinery: they are written on every audited call and are their
/// own stable format. The caller (the audit stream) decides when a shared UART may be used.
pub fn write_audit_record(record: &RecordWords) {
    let base = CONSOLE.base.load(Ordering::Acquire);
    if base == 0 {
        return;
    }
    let _guard = CONSOLE.lock.lock();
    // SAFETY: `base` was stored by `init`, whose contract keeps it mapped.
    let uart = unsafe { uart_at(base) };
    if CONSOLE.shared_with_guest.load(Ordering::Relaxed) || !uart.fifos_enabled() {
        // Not our FIFO settings, or no FIFO: byte by byte.
        let mut line = [0; MAX_LINE / 8];
        let len = format_line_words(record, &mut line);
        uart.write_str(core::str::from_utf8(line_bytes(&line, len)).unwrap_or(""));
        uart.write_str("\n");
    } else {
        // Formatted straight into the FIFO, `\r\n` included.
        write_line(record, &mut FifoLine::new(&uart), true);
    }
}

/// Writes text without taking the lock (its holder may be the code that faulted), for fatal
/// reports on the way to stopping the machine.
pub fn emergency_write(text: &str) {
    let base = CONSOLE.base.load(Ordering::Acquire);
    if base != 0 {
        // SAFETY: `base` was stored by `init`, whose contract says it stays mapped; a line torn
        // by a concurrent writer is acceptable in a fatal report.
        unsafe { uart_at(base) }.write_str(text);
    }
}

/// Writes the last line before the machine stops (the exit status line), whole when it can:
/// under the lock if its holder lets go soon, else without it (the holder may be the code that
/// faulted, which will never let go); then waits until the UART has sent every byte.
pub fn write_final_line(line: &str) {
    /// Attempts at the lock: far longer than any line takes to write, still a bounded wait.
    const LOCK_ATTEMPTS: u32 = 1 << 20;
    let base = CONSOLE.base.load(Ordering::Acquire);
    if base == 0 {
        return;
    }
    let guard = (0..LOCK_ATTEMPTS).find_map(|_| {
        let guard = CONSOLE.lock.try_lock();
        if guard.is_none() {
            core::hint::spin_loop();
        }
        guard
    });
    // SAFETY: `base` was stored by `init`, whose contract keeps it mapped.
    let uart = unsafe { uart_at(base) };
    uart.write_str(line);
    uart.flush();
    drop(guard);
}

/// A fixed-size line, formatted without allocating (longer text is cut).
pub struct LineBuffer {
    bytes: [u8; 512],
    len: usize,
}

impl LineBuffer {
    /// An empty line.
    pub const fn new() -> Self {
        Self {
            bytes: [0; 512],
            len: 0,
        }
    }

    /// The text so far (a cut in the middle of a character drops that character).
    pub fn as_str(&self) -> &str {
        match core::str::from_utf8(&self.bytes[..self.len]) {
            Ok(text) => text,
            Err(e) => core::str::from_utf8(&self.bytes[..e.valid_up_to()]).unwrap_or_default(),
        }
    }
}

impl Write for LineBuffer {
    fn write_str(&mut self, s: &str) -> core::fmt::Result {
        let room = self.bytes.len() - self.len;
        let n = s.len().min(room);
        self.bytes[self.len..self.len + n].copy_from_slice(&s.as_bytes()[..n]);
        self.len += n;
        Ok(())
    }
}

impl log::Log for Console {
    fn enabled(&self, metadata: &log::Metadata) -> bool {
        metadata.level() as usize <= LEVEL.load(Ordering::Relaxed)
    }

    fn log(&self, record: &log::Record) {
        if !self.enabled(record.metadata()) {
            return;
        }
        if self.shared_with_guest.load(Ordering::Relaxed)
            && self.guest_running.load(Ordering::Acquire)
        {
            self.suppressed.fetch_add(1, Ordering::Relaxed);
            return;
        }
        // Format outside the lock, write the whole line under it.
        let mut line = LineBuffer::new();
        let _ = writeln!(line, "[stagehand {:5}] {}", record.level(), record.args());
        let base = self.base.load(Ordering::Acquire);
        let _guard = self.lock.lock();
        // SAFETY: `base` was stored by `init`, whose contract keeps it mapped.
        unsafe { uart_at(base) }.write_str(line.as_str());
    }

    fn flush(&self) {
        let base = self.base.load(Ordering::Acquire);
        let _guard = self.lock.lock();
        // SAFETY: as in `log`.
        unsafe { uart_at(base) }.flush();
    }
}
