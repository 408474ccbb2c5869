//! stagehand: an EL2 hypervisor booted as QEMU `virt` firmware (`-bios`). It owns the stage-2
//! memory attributes of one guest, which it loads through fw_cfg and runs at EL1.
//!
//! Boot: `arch::entry` copies the image from flash to RAM; [`boot_cpu_main`] maps the
//! hypervisor's reserved RAM, turns the MMU on, reads the board from QEMU's device tree, builds
//! the VM ([`vm`]) and enters it. Traps come back through `arch::vectors` to [`trap`].

#![no_std]
#![no_main]
#![deny(unsafe_op_in_unsafe_fn, clippy::undocumented_unsafe_blocks)]

extern crate alloc;

mod arch;
mod audit;
mod console;
mod exit;
mod fw_cfg;
mod gic;
mod guest_memory;
mod heap;
mod smmu;
mod trap;
mod vm;

use arch::mmu::{self, BootTables};
use core::fmt::Write;
use hyp_core::config::SelfTest;
use hyp_core::layout::HYP_RESERVED;
use stagehand_abi::exit_status;
use stagehand_platform::board::Board;

/// QEMU places its device tree at the start of RAM when booting firmware; no register points at
/// it (the `-bios` boot contract of the `virt` machine).
const QEMU_DTB: u64 = 0x4000_0000;

unsafe extern "C" {
    static __image_start: u8;
}

/// The boot CPU's Rust entry, with the MMU off and a stack.
#[unsafe(no_mangle)]
extern "C" fn boot_cpu_main(cpu: u64) -> ! {
    // SAFETY: taking a linker symbol's address reads nothing.
    let image = unsafe { &__image_start as *const u8 as u64 };
    // The reserved region is the aligned block the image is linked into: QEMU's DTB, the
    // image, stacks, boot tables and the heap.
    let reserved = image & !(HYP_RESERVED - 1);
    let el = arch::current_el();
    if el != 2 {
        not_at_el2(el, reserved);
    }
    let mut tables = BootTables::new();
    // Until `console::init`, no UART is known: the exit status line cannot be written.
    let Ok(mut map) = mmu::build(&mut tables, &[(reserved, HYP_RESERVED)], &[]) else {
        exit::exit(exit_status::ERROR);
    };
    // SAFETY: the map covers the whole reserved region, which holds all code, data and stacks.
    unsafe { mmu::enable(&map) };
    // SAFETY: the heap follows the image inside the reserved region, now mapped write-back.
    unsafe { heap::init(reserved + HYP_RESERVED) };

    let dtb = dtb_slice(QEMU_DTB);
    let board = match Board::from_fdt(dtb) {
        Ok(board) => board,
        Err(_) => exit::exit(exit_status::ERROR), // No UART known yet: nothing to print on.
    };
    let Some(log_uart) = board.hypervisor_uart().or(board.console_uart()) else {
        exit::exit(exit_status::ERROR);
    };
    let alias = match mmu::extend(&mut tables, &mut map, &board)
        .and_then(|()| mmu::create_alias_table(&mut tables, &mut map))
    {
        Ok(alias) => alias,
        Err(_) => exit::exit(exit_status::ERROR), // The UART may be unmapped: nothing to print on.
    };
    // SAFETY: the UART was just mapped as Device memory and stays mapped.
    unsafe { console::init(log_uart.region.base, board.hypervisor_uart().is_none()) };
    if let Some(missing) = board.missing_device() {
        exit::fatal(format_args!("{missing}"));
    }
    // SAFETY: the vector table is part of the image.
    unsafe { trap::install_vectors() };
    log::info!(
        "stagehand {} on CPU {cpu}: EL2 MMU on, {} CPUs, RAM {:?}",
        env!("CARGO_PKG_VERSION"),
        board.cpus.len(),
        board.memory
    );

    match vm::build(&board, alias) {
        Ok(boot) => {
            if boot.selftest == Some(SelfTest::El2Fault) {
                el2_fault_selftest();
            }
            vm::enter_boot_cpu(boot)
        }
        Err(error) => exit::fatal(format_args!("{error}")),
    }
}

/// Started below EL2 (QEMU without `virtualization=on` starts its firmware at EL1): nothing
/// of the hypervisor can run, but the error must still reach a person. The MMU stays off (every
/// access is to Device memory, which QEMU lets the heap's and the console's locks use), the
/// device tree gives a UART and the PSCI conduit, and the machine powers off after one error
/// line.
fn not_at_el2(el: u64, reserved: u64) -> ! {
    // SAFETY: the heap follows the image inside the reserved region, which nothing else uses.
    unsafe { heap::init(reserved + HYP_RESERVED) };
    if let Ok(board) = Board::from_fdt(dtb_slice(QEMU_DTB)) {
        if board.psci_method == Some(stagehand_platform::board::PsciMethod::Hvc) {
            exit::use_hvc_for_psci();
        }
        if let Some(uart) = board.hypervisor_uart().or(board.console_uart()) {
            // SAFETY: with the MMU off every address is reachable as Device memory, and the
            // UART is the device tree's PL011.
            unsafe { console::init(uart.region.base, board.hypervisor_uart().is_none()) };
        }
    }
    exit::fatal(format_args!(
        "started at EL{el}, not EL2: the hypervisor needs EL2 (QEMU: -M virt,virtualization=on)"
    ))
}

/// Configuration `selftest=el2-fault`: a data abort at EL2 on purpose, so that tests can check
/// the hypervisor's own fault report and exit status.
fn el2_fault_selftest() -> ! {
    /// Below 2^48 (the EL2 VA size) but far above any RAM or MMIO of the board: never mapped.
    const UNMAPPED: u64 = 0x0000_f000_0000_0000;
    log::warn!("selftest: reading {UNMAPPED:#x} at EL2, which must fault");
    // SAFETY: meant to fault: the EL2 map has no entry for this address, so the read raises a
    // synchronous data abort, whose handler reports it and stops the machine. Nothing is read.
    let _ = unsafe { core::ptr::read_volatile(UNMAPPED as *const u64) };
    exit::fatal(format_args!(
        "selftest: reading {UNMAPPED:#x} at EL2 did not fault"
    ))
}

/// A secondary CPU's Rust entry, MMU on (set up in assembly from the published configuration).
#[unsafe(no_mangle)]
extern "C" fn secondary_cpu_main(cpu: u64) -> ! {
    // SAFETY: the vector table is part of the image.
    unsafe { trap::install_vectors() };
    vm::enter_secondary(cpu as usize)
}

/// The device tree at `pa`, as long as its header says.
fn dtb_slice(pa: u64) -> &'static [u8] {
    // SAFETY: QEMU wrote a device tree here (the `-bios` contract); its header is 40 bytes and
    // the reserved region is mapped.
    let header = unsafe { core::slice::from_raw_parts(pa as *const u8, 8) };
    let total = u32::from_be_bytes([header[4], header[5], header[6], header[7]]) as usize;
    // SAFETY: the blob lies in the first megabytes of the mapped reserved region; a corrupt
    // size is bounded to 1 MiB, QEMU's allocation.
    unsafe { core::slice::from_raw_parts(pa as *const u8, total.min(1 << 20)) }
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo) -> ! {
    // No allocation here: the panic may have happened with the heap lock held.
    let mut line = console::LineBuffer::new();
    let _ = write!(
        line,
        "\n[stagehand FATAL] panic on CPU {:#x}: {info}\n",
        arch::mpidr() & 0xff_ffff
    );
    console::emergency_write(line.as_str());
    exit::exit(exit_status::PANIC)
}
