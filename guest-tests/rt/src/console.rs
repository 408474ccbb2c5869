//! The guest console: the PL011 named by the device tree's `/chosen/stdout-path`. Output is
//! written a whole line at a time under a lock, so lines from different CPUs never interleave.

use core::fmt::{self, Write};
use core::sync::atomic::{AtomicUsize, Ordering};

use tock_registers::interfaces::{Readable, Writeable};
use tock_registers::register_bitfields;
use tock_registers::register_structs;
use tock_registers::registers::{ReadOnly, ReadWrite};

use crate::arch::cpu_index;

register_bitfields![u32,
    /// Flag register.
    FR [
        /// Transmit FIFO full.
        TXFF OFFSET(5) NUMBITS(1) []
    ]
];

register_structs! {
    /// The PL011 registers the console uses.
    Pl011Registers {
        (0x00 => dr: ReadWrite<u32>),
        (0x04 => _reserved),
        (0x18 => fr: ReadOnly<u32, FR::Register>),
        (0x1c => @END),
    }
}

/// QEMU `virt`'s first PL011, used until the device tree has been read.
const DEFAULT_UART: usize = 0x0900_0000;

/// Base address of the console UART.
static UART_BASE: AtomicUsize = AtomicUsize::new(DEFAULT_UART);
/// The console lock: 0 when free, else the owning CPU's index + 1 (the owner may re-enter,
/// so a fault while printing can still report).
static OWNER: AtomicUsize = AtomicUsize::new(0);

/// Selects the UART the console writes to (from the device tree).
pub(crate) fn init(base: usize) {
    UART_BASE.store(base, Ordering::SeqCst);
}

/// Writes bytes to the UART; a zero-sized handle to the device.
struct Uart;

impl Uart {
    fn registers(&self) -> &Pl011Registers {
        // SAFETY: UART_BASE holds the address of a PL011 from the device tree (or QEMU's
        // default), mapped as Device memory (or accessed with the MMU off) for the guest's
        // whole life; the registers are only accessed through tock-registers' volatile cells.
        unsafe { &*(UART_BASE.load(Ordering::Relaxed) as *const Pl011Registers) }
    }

    fn put_byte(&self, byte: u8) {
        let registers = self.registers();
        while registers.fr.is_set(FR::TXFF) {
            core::hint::spin_loop();
        }
        registers.dr.set(u32::from(byte));
    }
}

impl Write for Uart {
    fn write_str(&mut self, text: &str) -> fmt::Result {
        for byte in text.bytes() {
            if byte == b'\n' {
                self.put_byte(b'\r');
            }
            self.put_byte(byte);
        }
        Ok(())
    }
}

/// Prints one line (the arguments followed by a newline) atomically with respect to other CPUs.
pub fn print_line(args: fmt::Arguments<'_>) {
    let me = cpu_index() + 1;
    let nested = OWNER.load(Ordering::Acquire) == me;
    if !nested {
        while OWNER
            .compare_exchange_weak(0, me, Ordering::Acquire, Ordering::Relaxed)
            .is_err()
        {
            core::hint::spin_loop();
        }
    }
    let mut uart = Uart;
    let _ = uart.write_fmt(args);
    let _ = uart.write_str("\n");
    if !nested {
        OWNER.store(0, Ordering::Release);
    }
}

/// Prints a line on the guest console: `println!("x = {}", x)`.
#[macro_export]
macro_rules! println {
    () => { $crate::console::print_line(format_args!("")) };
    ($($arg:tt)*) => { $crate::console::print_line(format_args!($($arg)*)) };
}
