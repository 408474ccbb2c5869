//! The PL011 UART register block and a transmit-only driver (the hypervisor only writes).

use tock_registers::interfaces::{Readable, Writeable};
use tock_registers::registers::{ReadOnly, ReadWrite, WriteOnly};
use tock_registers::{register_bitfields, register_structs};

register_bitfields! {u32,
    /// Flag register.
    pub FR [
        /// Transmit FIFO empty.
        TXFE OFFSET(7) NUMBITS(1) [],
        /// Transmit FIFO full.
        TXFF OFFSET(5) NUMBITS(1) [],
        /// UART busy transmitting.
        BUSY OFFSET(3) NUMBITS(1) []
    ],
    /// Line control.
    pub LCR_H [
        /// Word length.
        WLEN OFFSET(5) NUMBITS(2) [Eight = 0b11],
        /// FIFOs enabled.
        FEN OFFSET(4) NUMBITS(1) []
    ],
    /// Control.
    pub CR [
        /// Receive enable.
        RXE OFFSET(9) NUMBITS(1) [],
        /// Transmit enable.
        TXE OFFSET(8) NUMBITS(1) [],
        /// UART enable.
        UARTEN OFFSET(0) NUMBITS(1) []
    ]
}

register_structs! {
    /// The PL011 register block.
    pub Pl011Registers {
        (0x00 => pub dr: ReadWrite<u32>),
        (0x04 => _reserved0),
        (0x18 => pub fr: ReadOnly<u32, FR::Register>),
        (0x1c => _reserved1),
        (0x2c => pub lcr_h: ReadWrite<u32, LCR_H::Register>),
        (0x30 => pub cr: ReadWrite<u32, CR::Register>),
        (0x34 => _reserved2),
        (0x44 => pub icr: WriteOnly<u32>),
        (0x48 => @END),
    }
}

/// Bytes the transmit FIFO holds at least, on every PL011 revision (32 from r1p5 on).
const FIFO_DEPTH: usize = 16;

/// A PL011 used for output.
pub struct Pl011<'a> {
    registers: &'a Pl011Registers,
}

impl<'a> Pl011<'a> {
    /// Wraps a mapped register block. Creating the reference is the caller's unsafe step.
    pub fn new(registers: &'a Pl011Registers) -> Self {
        Self { registers }
    }

    /// Enables the transmitter with 8-bit words and FIFOs. The baud rate stays as firmware
    /// or reset left it (QEMU ignores it).
    pub fn init(&self) {
        self.registers.cr.set(0);
        self.registers
            .lcr_h
            .write(LCR_H::WLEN::Eight + LCR_H::FEN::SET);
        self.registers
            .cr
            .write(CR::UARTEN::SET + CR::TXE::SET + CR::RXE::SET);
    }

    /// Writes one byte, waiting for room in the FIFO.
    pub fn write_byte(&self, byte: u8) {
        while self.registers.fr.is_set(FR::TXFF) {
            core::hint::spin_loop();
        }
        self.registers.dr.set(byte as u32);
    }

    /// Writes a string, turning `\n` into `\r\n`.
    pub fn write_str(&self, text: &str) {
        for byte in text.bytes() {
            if byte == b'\n' {
                self.write_byte(b'\r');
            }
            self.write_byte(byte);
        }
    }

    /// Bytes the transmit FIFO holds at least, on every PL011 revision (32 from r1p5 on).
    pub const FIFO_DEPTH: usize = FIFO_DEPTH;

    /// Waits until the transmit FIFO is empty.
    #[inline(always)]
    fn wait_until_empty(&self) {
        while !self.registers.fr.is_set(FR::TXFE) {
            core::hint::spin_loop();
        }
    }

    /// Waits until every byte has left the UART.
    pub fn flush(&self) {
        while self.registers.fr.is_set(FR::BUSY) {
            core::hint::spin_loop();
        }
    }
}

/// A transmit FIFO, as [`FifoLine`] uses it: the PL011's, or a recording fake in tests.
pub trait TransmitFifo {
    /// Waits until the FIFO is empty.
    fn wait_until_empty(&self);
    /// Puts a byte into the FIFO, which must have room for it.
    fn put(&self, byte: u8);
}

impl TransmitFifo for Pl011<'_> {
    #[inline(always)]
    fn wait_until_empty(&self) {
        Pl011::wait_until_empty(self);
    }

    #[inline(always)]
    fn put(&self, byte: u8) {
        self.registers.dr.set(byte as u32);
    }
}

impl Pl011<'_> {
    /// Whether the FIFOs are enabled (LCR_H.FEN): without them the transmitter holds one byte,
    /// and a [`FifoLine`] must not be used.
    #[inline(always)]
    pub fn fifos_enabled(&self) -> bool {
        self.registers.lcr_h.is_set(LCR_H::FEN)
    }
}

/// A line written in pieces of up to 8 bytes straight into a transmit FIFO (a
/// [`LineSink`](stagehand_abi::audit::LineSink): the audit stream formats into it with no line
/// buffer between). The writer reserves room ahead in amounts fixed by the place in the line
/// (see `LineSink`), so the room count below folds away at compile time: what is left is a
/// wait for the FIFO to empty at fixed points, one status read per [`Pl011::FIFO_DEPTH`]
/// bytes reserved or so, and a store per byte. Only for a FIFO of that depth at least, enabled
/// ([`Pl011::fifos_enabled`]): with FIFOs off the transmitter holds one byte.
pub struct FifoLine<'a, F: TransmitFifo> {
    fifo: &'a F,
    /// Bytes the FIFO has room for at least.
    room: u32,
    /// [`FREQUENT`], as values the compiler cannot see through.
    frequent: [u8; FREQUENT.len()],
}

/// The characters the line's constant text repeats most (a space and a `=` per field, the
/// `0x` of hex values, `-` for "none"...). A store to the FIFO takes its byte from a register;
/// as constants, the compiler would put each into one again before every store (a move per
/// byte). A [`FifoLine`] holds these in registers for the whole line instead.
const FREQUENT: [u8; 16] = *b" =sx0aidte-clonm";

const _: () = assert!(FIFO_DEPTH as u32 >= stagehand_abi::audit::MAX_RESERVATION);

impl<'a, F: TransmitFifo> FifoLine<'a, F> {
    /// A line starting at the FIFO's current state (its room unknown until the first wait).
    #[inline(always)]
    pub fn new(fifo: &'a F) -> Self {
        // Each is `zero | character`: a register the compiler must keep (or reload), never
        // re-create from a constant.
        let zero = core::hint::black_box(0u8);
        macro_rules! opaque {
            ($($i:literal)*) => { [$(zero | FREQUENT[$i]),*] };
        }
        FifoLine {
            fifo,
            room: 0,
            frequent: opaque!(0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15),
        }
    }

    /// `byte` of constant text, from a register of [`FREQUENT`] when it is one of them.
    #[inline(always)]
    fn constant_byte(&self, byte: u8) -> u8 {
        // A comparison per entry, written out: `byte` is a constant where this is inlined,
        // so they fold to the one register or to the constant.
        macro_rules! index {
            ($($i:literal)*) => {
                match byte {
                    $(_ if byte == FREQUENT[$i] => $i,)*
                    _ => return byte,
                }
            };
        }
        let index = index!(0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15);
        self.frequent[index]
    }
}

/// Puts the low `$count` (at most 8) bytes of `$word`, the first lowest, each through `$map`:
/// a store per byte, taken from the word without a reload. A whole word (constant text and
/// most digits) is 8 stores; other counts go by their bits, a test-and-branch each, rather
/// than a search for the count.
macro_rules! put_bytes {
    ($line:ident, $word:expr, $count:expr, $map:ident) => {{
        let (word, count): (u64, u32) = ($word, $count);
        if count >= 8 {
            put!($line, $map, word: 0 1 2 3 4 5 6 7);
        } else {
            let mut rest = word;
            if count & 4 != 0 {
                put!($line, $map, rest: 0 1 2 3);
                rest >>= 32;
            }
            if count & 2 != 0 {
                put!($line, $map, rest: 0 1);
                rest >>= 16;
            }
            if count & 1 != 0 {
                put!($line, $map, rest: 0);
            }
        }
    }};
}

/// The bytes `$i` of `$word`, through `$map`, into the FIFO.
macro_rules! put {
    ($line:ident, $map:ident, $word:ident: $($i:literal)*) => {{
        $($line.fifo.put($line.$map(($word >> (8 * $i)) as u8));)*
    }};
}

impl<F: TransmitFifo> FifoLine<'_, F> {
    #[inline(always)]
    fn variable_byte(&self, byte: u8) -> u8 {
        byte
    }
}

impl<F: TransmitFifo> stagehand_abi::audit::LineSink for FifoLine<'_, F> {
    #[inline(always)]
    fn reserve(&mut self, bytes: u32) {
        if self.room < bytes {
            self.fifo.wait_until_empty();
            self.room = FIFO_DEPTH as u32;
        }
        self.room -= bytes;
    }

    #[inline(always)]
    fn push(&mut self, word: u64, count: u32) {
        put_bytes!(self, word, count, variable_byte);
    }

    /// A jump on the count into stores of that many bytes: cheaper than shifting the digits
    /// down and going by the count's bits.
    #[inline(always)]
    fn push_tail(&mut self, word: u64, count: u32) {
        match count {
            8 => put!(self, variable_byte, word: 0 1 2 3 4 5 6 7),
            7 => put!(self, variable_byte, word: 1 2 3 4 5 6 7),
            6 => put!(self, variable_byte, word: 2 3 4 5 6 7),
            5 => put!(self, variable_byte, word: 3 4 5 6 7),
            4 => put!(self, variable_byte, word: 4 5 6 7),
            3 => put!(self, variable_byte, word: 5 6 7),
            2 => put!(self, variable_byte, word: 6 7),
            _ => put!(self, variable_byte, word: 7),
        }
    }

    #[inline(always)]
    fn constant(&mut self, word: u64, count: u32) {
        put_bytes!(self, word, count, constant_byte);
    }

    /// Split at the FIFO's wait when it has room for part of it only: text fills the FIFO
    /// to the last byte (its length, like the room, is known at compile time).
    #[inline(always)]
    fn text(&mut self, word: u64, count: u32) {
        if self.room < count {
            let first = self.room;
            put_bytes!(self, word, first, constant_byte);
            self.fifo.wait_until_empty();
            self.room = FIFO_DEPTH as u32;
            put_bytes!(self, word >> (8 * first), count - first, constant_byte);
            self.room -= count - first;
        } else {
            put_bytes!(self, word, count, constant_byte);
            self.room -= count;
        }
    }

    /// An empty FIFO has room for everything: what is pushed next, then what was counted on.
    #[inline(always)]
    fn settle(&mut self) {
        self.fifo.wait_until_empty();
    }
}

#[cfg(test)]
mod tests {
    extern crate std;
    use super::*;
    use core::cell::RefCell;
    use stagehand_abi::audit::{format_stream_line_words, line_bytes, write_line, Record};
    use std::vec::Vec;

    /// A FIFO that records what it is given and how full it is.
    #[derive(Default)]
    struct RecordingFifo {
        sent: RefCell<Vec<u8>>,
        held: RefCell<usize>,
        waits: RefCell<usize>,
    }

    impl TransmitFifo for RecordingFifo {
        fn wait_until_empty(&self) {
            *self.held.borrow_mut() = 0;
            *self.waits.borrow_mut() += 1;
        }

        fn put(&self, byte: u8) {
            let mut held = self.held.borrow_mut();
            assert!(*held < FIFO_DEPTH, "a byte into a full FIFO");
            *held += 1;
            self.sent.borrow_mut().push(byte);
        }
    }

    /// Waits a line takes beyond its fixed ones: two for each value longer than its
    /// reservation (more than 8 digits), three for a decimal of more than 16.
    fn unplanned_waits(record: &Record) -> usize {
        let decimal = |value: u64| match value {
            0..100_000_000 => 0,
            100_000_000..10_000_000_000_000_000 => 2,
            _ => 3,
        };
        let hex = |value: u64| if value >> 32 == 0 { 0 } else { 2 };
        [
            record.sequence.get(),
            record.timestamp.get(),
            record.cmo_lines.get(),
            record.dropped.get(),
            record.tlbi_count.get().into(),
            record.smmu_commands.get().into(),
            record.status.get().unsigned_abs(),
        ]
        .map(decimal)
        .into_iter()
        .chain([record.ipa, record.size, record.detail, record.tag].map(|value| hex(value.get())))
        .sum()
    }

    /// The FIFO's record of `write_line` for `record`, and the buffered line.
    fn stream(record: &Record) -> (RecordingFifo, Vec<u8>) {
        let words = record.words();
        let fifo = RecordingFifo::default();
        write_line(&words, &mut FifoLine::new(&fifo), true);
        let mut line = [0; 64];
        let len = format_stream_line_words(&words, &mut line);
        (fifo, line_bytes(&line, len).to_vec())
    }

    /// The waits of a line whose values all fit their reservations (with and without a
    /// StreamID): about one per 7 to 8 bytes sent.
    fn fixed_waits() -> usize {
        let short = Record::empty(stagehand_abi::audit::kind::CMO);
        let mut with_stream = short;
        with_stream.stream_id = 0x10.into();
        [short, with_stream]
            .map(|record| {
                let (fifo, line) = stream(&record);
                let waits = *fifo.waits.borrow();
                assert!(waits <= line.len().div_ceil(7), "{waits} waits");
                waits
            })
            .into_iter()
            .max()
            .unwrap()
    }

    /// Lines written straight into the FIFO are the buffered lines, byte for byte, and never
    /// overfill it. The waits are at fixed places in the line (a line of short values waits
    /// once per FIFO's worth of room its fields reserve: a wait per 7 to 8 bytes it sends),
    /// plus two or three for each long value.
    #[test]
    fn fifo_lines_are_the_buffered_lines() {
        let fixed_waits = fixed_waits();
        let mut state = 0x2545_f491_4f6c_dd1du64;
        for round in 0..2000 {
            let mut bytes = [0u8; 128];
            for chunk in bytes.chunks_mut(8) {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                let value = match round % 3 {
                    0 => state & 0xff,
                    1 => state >> (state % 64),
                    _ => state,
                };
                chunk.copy_from_slice(&value.to_le_bytes());
            }
            bytes[2] = (state % 16) as u8;
            let record = Record::parse(&bytes).unwrap();
            let (fifo, line) = stream(&record);
            assert_eq!(&fifo.sent.borrow()[..], &line[..]);
            let waits = *fifo.waits.borrow();
            assert!(waits <= fixed_waits + unplanned_waits(&record));
        }
    }

    /// Values at every digit-count boundary, decimal and hex, in every field at once: each
    /// long value goes out unplanned, between waits, and none overfills the FIFO.
    #[test]
    fn fifo_lines_at_every_digit_count() {
        let mut values = std::vec![0, 1, u64::MAX];
        values.extend((1..20).flat_map(|digits| {
            let power = 10u64.pow(digits);
            [power - 1, power]
        }));
        values.extend((1..16).flat_map(|digits| {
            let power = 1u64 << (4 * digits);
            [power - 1, power]
        }));
        for value in values {
            let mut bytes = [0u8; 128];
            for chunk in bytes.chunks_mut(8) {
                chunk.copy_from_slice(&value.to_le_bytes());
            }
            bytes[2] = stagehand_abi::audit::kind::GUEST_START;
            let record = Record::parse(&bytes).unwrap();
            let (fifo, line) = stream(&record);
            assert_eq!(&fifo.sent.borrow()[..], &line[..]);
            assert!(*fifo.waits.borrow() <= fixed_waits() + unplanned_waits(&record));
        }
    }
}
