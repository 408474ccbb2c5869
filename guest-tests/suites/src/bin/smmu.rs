//! Suite `smmu`: DMA through the hypervisor-owned SMMU with QEMU's `edu` device (started with
//! `-device edu,addr=02.0,dma_mask=0xffffffffffffffff`), in the default shared mode: the device
//! reaches guest RAM by IPA (IOVA = IPA), and nothing else. A tiny edu driver finds the device
//! through ECAM, assigns its BAR0 in the 32-bit window (the hypervisor assigns no BARs), turns
//! on memory decoding and bus mastering, and runs DMAs of one page. A blocked DMA leaves no
//! trace the guest can see except what the device read (zeros) or did not write; the
//! hypervisor's log shows the SMMU fault records. Each edu DMA takes 100 ms of virtual time.
#![no_std]
#![no_main]

extern crate alloc;

use alloc::format;
use alloc::string::String;
use core::sync::atomic::{AtomicUsize, Ordering};

use guest_rt::mmu::{self, MemoryType};
use guest_rt::{check, check_eq, read_sysreg};
use stagehand_abi::function;

guest_rt::main!(main);

fn main() -> ! {
    guest_rt::test::run_suite(
        "smmu",
        &guest_rt::tests![
            finds_and_enables_edu,
            shared_dma_round_trip,
            dma_from_beyond_ram_reads_zeros,
            dma_into_the_smmu_and_beyond_ram_is_dropped,
            device_sees_the_guest_view_of_ipa_0x4020_0000,
            hypervisor_still_answers,
        ],
    )
}

const EDU_VENDOR: u16 = 0x1234;
const EDU_DEVICE: u16 = 0x11e8;
/// edu's identification register reads 0x010000ed (version 1.0).
const EDU_IDENT: u32 = 0x0100_00ed;
/// edu registers (offsets in BAR0).
const EDU_REG_IDENT: usize = 0x00;
const EDU_REG_LIVENESS: usize = 0x04;
const EDU_REG_DMA_SRC: usize = 0x80;
const EDU_REG_DMA_DST: usize = 0x88;
const EDU_REG_DMA_COUNT: usize = 0x90;
const EDU_REG_DMA_CMD: usize = 0x98;
/// DMA command bits: start (reads as busy), direction device to RAM.
const EDU_DMA_START: u64 = 1 << 0;
const EDU_DMA_TO_RAM: u64 = 1 << 1;
/// edu's internal buffer, in its own address space.
const EDU_BUFFER: u64 = 0x40000;
const PAGE: usize = 4096;

/// Where BAR0 was put (0 until [`edu`] ran).
static EDU_BAR0: AtomicUsize = AtomicUsize::new(0);

/// The host bridge's ECAM and 32-bit memory window, from the guest's device tree.
fn pcie() -> Result<(usize, usize), String> {
    let tree = guest_rt::dt::tree();
    let node = tree
        .find_compatible(&["pci-host-ecam-generic"])
        .ok_or("no pci-host-ecam-generic node in the device tree")?;
    let ecam = node
        .reg()
        .and_then(|mut r| r.next())
        .ok_or("PCIe node without reg")?
        .starting_address as usize;
    // ranges: (3 PCI address cells, 2 CPU address cells, 2 size cells) per entry, as on virt.
    let ranges = node
        .property("ranges")
        .ok_or("PCIe node without ranges")?
        .value;
    let cell = |i: usize| {
        u32::from_be_bytes([
            ranges[4 * i],
            ranges[4 * i + 1],
            ranges[4 * i + 2],
            ranges[4 * i + 3],
        ])
    };
    for entry in 0..ranges.len() / 28 {
        let base = entry * 7;
        let space = (cell(base) >> 24) & 0b11;
        let cpu = (cell(base + 3) as usize) << 32 | cell(base + 4) as usize;
        if space == 0b10 {
            return Ok((ecam, cpu));
        }
    }
    Err("no 32-bit memory window in the PCIe ranges".into())
}

fn config_read(ecam: usize, device: usize, offset: usize) -> u32 {
    // SAFETY: ECAM is mapped Device (see `edu`); bus 0, function 0 of `device`, aligned.
    unsafe { ((ecam + (device << 15) + offset) as *const u32).read_volatile() }
}

fn config_write(ecam: usize, device: usize, offset: usize, value: u32) {
    // SAFETY: as in `config_read`; the registers written are the edu's own BAR and command.
    unsafe { ((ecam + (device << 15) + offset) as *mut u32).write_volatile(value) }
}

/// Finds edu on bus 0, assigns BAR0 and enables it (once); returns BAR0's address.
fn edu() -> Result<usize, String> {
    let bar = EDU_BAR0.load(Ordering::Relaxed);
    if bar != 0 {
        return Ok(bar);
    }
    let (ecam, window) = pcie()?;
    // Bus 0's configuration space only.
    mmu::map_identity(ecam, 1 << 20, MemoryType::Device)
        .map_err(|e| format!("mapping ECAM at {ecam:#x}: {e:?}"))?;
    let device = (0..32)
        .find(|&d| config_read(ecam, d, 0) == (EDU_DEVICE as u32) << 16 | EDU_VENDOR as u32)
        .ok_or("no edu device (1234:11e8) on bus 0")?;
    // Size BAR0 (a 32-bit memory BAR), then put it at the start of the window, aligned.
    config_write(ecam, device, 0x10, u32::MAX);
    let mask = config_read(ecam, device, 0x10) & !0xf;
    check!(mask != 0, "edu BAR0 reads back 0 after sizing");
    let size = (!mask).wrapping_add(1) as usize;
    let address = window.next_multiple_of(size);
    config_write(ecam, device, 0x10, address as u32);
    let command = config_read(ecam, device, 0x04);
    // Memory space (bit 1) and bus master (bit 2).
    config_write(ecam, device, 0x04, command | 0b110);
    EDU_BAR0.store(address, Ordering::Relaxed);
    Ok(address)
}

fn edu_read32(bar: usize, register: usize) -> u32 {
    // SAFETY: BAR0 lies in the 32-bit window, identity-mapped Device by the runtime.
    unsafe { ((bar + register) as *const u32).read_volatile() }
}

fn edu_write32(bar: usize, register: usize, value: u32) {
    // SAFETY: as in `edu_read32`.
    unsafe { ((bar + register) as *mut u32).write_volatile(value) }
}

fn edu_write64(bar: usize, register: usize, value: u64) {
    // SAFETY: as in `edu_read32`; edu wants 64-bit stores for the DMA registers.
    unsafe { ((bar + register) as *mut u64).write_volatile(value) }
}

fn edu_read64(bar: usize, register: usize) -> u64 {
    // SAFETY: as in `edu_read32`.
    unsafe { ((bar + register) as *const u64).read_volatile() }
}

/// Runs one edu DMA of `count` bytes and waits (up to 5 s) for it to finish.
fn dma(bar: usize, source: u64, destination: u64, count: u64, to_ram: bool) -> Result<(), String> {
    edu_write64(bar, EDU_REG_DMA_SRC, source);
    edu_write64(bar, EDU_REG_DMA_DST, destination);
    edu_write64(bar, EDU_REG_DMA_COUNT, count);
    let direction = if to_ram { EDU_DMA_TO_RAM } else { 0 };
    edu_write64(bar, EDU_REG_DMA_CMD, EDU_DMA_START | direction);
    let deadline = read_sysreg!(cntpct_el0) + 5 * read_sysreg!(cntfrq_el0);
    while edu_read64(bar, EDU_REG_DMA_CMD) & EDU_DMA_START != 0 {
        check!(
            read_sysreg!(cntpct_el0) < deadline,
            "edu DMA {source:#x} -> {destination:#x} did not finish in 5 s"
        );
        core::hint::spin_loop();
    }
    Ok(())
}

/// A zeroed, page-aligned page of guest RAM (IPA = VA under the runtime's identity map).
fn page() -> &'static mut [u8] {
    let layout = core::alloc::Layout::from_size_align(PAGE, PAGE).expect("page layout");
    // SAFETY: non-zero size; the page is leaked on purpose (a device may write it).
    let pointer = unsafe { alloc::alloc::alloc_zeroed(layout) };
    assert!(!pointer.is_null(), "out of heap");
    // SAFETY: a fresh, exclusively owned allocation of PAGE bytes.
    unsafe { core::slice::from_raw_parts_mut(pointer, PAGE) }
}

/// Pushes `buffer` to memory / drops stale lines (QEMU has no caches; hardware would).
fn clean_invalidate(buffer: &[u8]) {
    let line = guest_rt::arch::dcache_line_size();
    for address in (buffer.as_ptr() as usize..buffer.as_ptr() as usize + buffer.len()).step_by(line)
    {
        guest_rt::arch::dc_civac(address);
    }
    guest_rt::arch::dsb_sy();
}

fn read_volatile(buffer: &[u8], index: usize) -> u8 {
    // SAFETY: in bounds; volatile because the device wrote it behind the compiler's back.
    unsafe { buffer.as_ptr().add(index).read_volatile() }
}

/// Device buffer <- RAM at `ipa` (one page), then RAM page <- device buffer: what the device
/// read at `ipa`.
fn device_reads(bar: usize, ipa: u64) -> Result<&'static mut [u8], String> {
    dma(bar, ipa, EDU_BUFFER, PAGE as u64, false)?;
    let out = page();
    out.fill(0xa5);
    clean_invalidate(out);
    dma(bar, EDU_BUFFER, out.as_ptr() as u64, PAGE as u64, true)?;
    clean_invalidate(out);
    Ok(out)
}

/// Fills the device's buffer with a known pattern through a DMA from RAM.
fn fill_device(bar: usize, seed: u8) -> Result<(), String> {
    let source = page();
    for (i, byte) in source.iter_mut().enumerate() {
        *byte = (i as u8).wrapping_mul(13).wrapping_add(seed);
    }
    clean_invalidate(source);
    dma(bar, source.as_ptr() as u64, EDU_BUFFER, PAGE as u64, false)
}

fn ram_end() -> u64 {
    guest_rt::dt::main_ram().end() as u64
}

fn finds_and_enables_edu() -> Result<(), String> {
    let bar = edu()?;
    check_eq!(
        edu_read32(bar, EDU_REG_IDENT),
        EDU_IDENT,
        "edu identification"
    );
    edu_write32(bar, EDU_REG_LIVENESS, 0x1234_5678);
    check_eq!(
        edu_read32(bar, EDU_REG_LIVENESS),
        !0x1234_5678u32,
        "edu liveness"
    );
    Ok(())
}

fn shared_dma_round_trip() -> Result<(), String> {
    let bar = edu()?;
    let source = page();
    for (i, byte) in source.iter_mut().enumerate() {
        *byte = (i * 7 % 251) as u8;
    }
    clean_invalidate(source);
    let copy = device_reads(bar, source.as_ptr() as u64)?;
    for i in 0..PAGE {
        check_eq!(
            read_volatile(copy, i),
            source[i],
            "byte {} after RAM -> edu -> RAM",
            i
        );
    }
    Ok(())
}

fn dma_from_beyond_ram_reads_zeros() -> Result<(), String> {
    let bar = edu()?;
    fill_device(bar, 1)?;
    let target = ram_end() + (1 << 20);
    let seen = device_reads(bar, target)?;
    let nonzero = (0..PAGE).filter(|&i| read_volatile(seen, i) != 0).count();
    check_eq!(
        nonzero,
        0,
        "non-zero bytes the device read at IPA {:#x} (past guest RAM)",
        target
    );
    Ok(())
}

fn dma_into_the_smmu_and_beyond_ram_is_dropped() -> Result<(), String> {
    let bar = edu()?;
    fill_device(bar, 2)?;
    // The SMMU's own registers (never in the guest's stage 2) and an IPA past guest RAM: both
    // writes must be dropped. Had the first landed, the SMMU would be reprogrammed with the
    // pattern and the checks below would see it.
    dma(bar, EDU_BUFFER, 0x0905_0000, PAGE as u64, true)?;
    dma(bar, EDU_BUFFER, ram_end() + (2 << 20), PAGE as u64, true)?;
    // Still contained and still translating.
    let seen = device_reads(bar, ram_end() + (1 << 20))?;
    check!(
        (0..PAGE).all(|i| read_volatile(seen, i) == 0),
        "after the blocked writes, the device read non-zero bytes past guest RAM"
    );
    Ok(())
}

fn device_sees_the_guest_view_of_ipa_0x4020_0000() -> Result<(), String> {
    // PA 0x4020_0000 holds the hypervisor's image; as an IPA it is the guest's own RAM, which
    // lives elsewhere in physical memory. The device must read the guest's bytes.
    const IPA: usize = 0x4020_0000;
    let bar = edu()?;
    check!(
        guest_rt::dt::main_ram().contains(IPA),
        "{:#x} is not guest RAM",
        IPA
    );
    // SAFETY: guest RAM, identity-mapped write-back by the runtime; only read.
    let guest_view = unsafe { core::slice::from_raw_parts(IPA as *const u8, PAGE) };
    clean_invalidate(guest_view);
    let seen = device_reads(bar, IPA as u64)?;
    let differing = (0..PAGE)
        .filter(|&i| read_volatile(seen, i) != guest_view[i])
        .count();
    check_eq!(
        differing,
        0,
        "bytes where the device's view of IPA {:#x} differs from the guest's",
        IPA
    );
    Ok(())
}

fn hypervisor_still_answers() -> Result<(), String> {
    // Also a hypervisor entry, where SMMU fault events are drained into the audit stream.
    let regs = guest_suites::hypercall(function::REVISION, &[]);
    check_eq!(
        (regs.x0, regs.x1),
        (stagehand_abi::ABI_MAJOR, stagehand_abi::ABI_MINOR),
        "REVISION after the DMAs"
    );
    Ok(())
}
