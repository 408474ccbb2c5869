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

    /// Writes `bytes` as they are (no newline translation), [`Self::FIFO_DEPTH`] at a time
    /// into an empty FIFO: one status read per burst instead of one per byte. Only for a UART
    /// whose FIFOs this driver enabled ([`Self::init`]); with FIFOs off it holds one byte.
    pub fn write_bursts(&self, bytes: &[u8]) {
        let (bursts, rest) = bytes.as_chunks::<FIFO_DEPTH>();
        for burst in bursts {
            self.wait_until_empty();
            // Whole bursts unrolled: two instructions a byte (load, store).
            macro_rules! store {
                ($($i:literal)*) => { $(self.registers.dr.set(burst[$i] as u32);)* };
            }
            store!(0 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15);
        }
        if !rest.is_empty() {
            self.wait_until_empty();
            for &byte in rest {
                self.registers.dr.set(byte as u32);
            }
        }
    }

    /// Waits until the transmit FIFO is empty.
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
