//! A tiny driver for QEMU's `edu` PCI device (1234:11e8), the DMA engine of the SMMU and DMA
//! suites (started with `-device edu,addr=02.0,dma_mask=0xffffffffffffffff`; the default mask
//! of 28 bits would clamp IOVAs). It finds the device through ECAM on bus 0, assigns BAR0 at
//! the start of the 32-bit window (the hypervisor assigns no BARs), turns on memory decoding
//! and bus mastering, and runs DMAs between guest memory (by IOVA, which is the IPA) and the
//! device's 4 KiB buffer.
//!
//! edu reports no error for a DMA the SMMU blocks: a blocked read gives the device zeros and a
//! blocked write writes nothing. Tests judge by memory and by the audit records of SMMU faults.
//! Each DMA takes 100 ms of virtual time.

use alloc::format;
use alloc::string::String;
use core::sync::atomic::{AtomicUsize, Ordering};

use guest_rt::mmu::{self, MemoryType};
use guest_rt::{check, read_sysreg};

/// PCI vendor ID.
pub const VENDOR: u16 = 0x1234;
/// PCI device ID.
pub const DEVICE: u16 = 0x11e8;
/// The identification register reads 0x010000ed (version 1.0).
pub const IDENT: u32 = 0x0100_00ed;
/// The device's DMA buffer, in its own address space (outside it QEMU aborts).
pub const BUFFER: u64 = 0x40000;
/// Bytes of the device's DMA buffer.
pub const BUFFER_SIZE: u64 = 4096;
/// The device's StreamID on QEMU `virt` (RID of 00:02.0 through the identity `iommu-map`).
pub const STREAM_ID: u32 = 0x10;
/// Its requester ID as DEV_INFO packs it: bus << 8 | device << 3 | function.
pub const RID: u64 = 2 << 3;

/// Registers (offsets in BAR0).
const REG_IDENT: usize = 0x00;
const REG_LIVENESS: usize = 0x04;
const REG_DMA_SRC: usize = 0x80;
const REG_DMA_DST: usize = 0x88;
const REG_DMA_COUNT: usize = 0x90;
const REG_DMA_CMD: usize = 0x98;
/// DMA command bits: start (reads as busy), direction device to RAM.
const DMA_START: u64 = 1 << 0;
const DMA_TO_RAM: u64 = 1 << 1;
/// Bytes of a page.
const PAGE: usize = 4096;

/// Where BAR0 was put (0 until [`Edu::get`] first ran).
static BAR0: AtomicUsize = AtomicUsize::new(0);

/// The enabled device: its BAR0.
#[derive(Clone, Copy, Debug)]
pub struct Edu {
    bar: usize,
}

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
    // SAFETY: ECAM is mapped Device (see `Edu::get`); bus 0, function 0 of `device`, aligned.
    unsafe { ((ecam + (device << 15) + offset) as *const u32).read_volatile() }
}

fn config_write(ecam: usize, device: usize, offset: usize, value: u32) {
    // SAFETY: as in `config_read`; the registers written are the edu's own BAR and command.
    unsafe { ((ecam + (device << 15) + offset) as *mut u32).write_volatile(value) }
}

impl Edu {
    /// Finds edu on bus 0, assigns BAR0 and enables memory decoding and bus mastering (the
    /// first time); then returns the device.
    ///
    /// # Errors
    /// A sentence saying what is missing (no PCIe node, no edu on bus 0, a BAR that does not
    /// size).
    pub fn get() -> Result<Edu, String> {
        let bar = BAR0.load(Ordering::Relaxed);
        if bar != 0 {
            return Ok(Edu { bar });
        }
        let (ecam, window) = pcie()?;
        // Bus 0's configuration space only.
        mmu::map_identity(ecam, 1 << 20, MemoryType::Device)
            .map_err(|e| format!("mapping ECAM at {ecam:#x}: {e:?}"))?;
        let device = (0..32)
            .find(|&d| config_read(ecam, d, 0) == (DEVICE as u32) << 16 | VENDOR as u32)
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
        BAR0.store(address, Ordering::Relaxed);
        Ok(Edu { bar: address })
    }

    /// A 32-bit register.
    pub fn read32(&self, register: usize) -> u32 {
        // SAFETY: BAR0 lies in the 32-bit window, identity-mapped Device by the runtime.
        unsafe { ((self.bar + register) as *const u32).read_volatile() }
    }

    /// Writes a 32-bit register.
    pub fn write32(&self, register: usize, value: u32) {
        // SAFETY: as in `read32`.
        unsafe { ((self.bar + register) as *mut u32).write_volatile(value) }
    }

    fn read64(&self, register: usize) -> u64 {
        // SAFETY: as in `read32`.
        unsafe { ((self.bar + register) as *const u64).read_volatile() }
    }

    fn write64(&self, register: usize, value: u64) {
        // SAFETY: as in `read32`; edu wants 64-bit stores for the DMA registers.
        unsafe { ((self.bar + register) as *mut u64).write_volatile(value) }
    }

    /// The identification register.
    pub fn ident(&self) -> u32 {
        self.read32(REG_IDENT)
    }

    /// Writes `value` to the liveness register and reads back what the device made of it
    /// (its complement when the device is alive).
    pub fn liveness(&self, value: u32) -> u32 {
        self.write32(REG_LIVENESS, value);
        self.read32(REG_LIVENESS)
    }

    /// Runs one DMA of `count` bytes and waits (up to 5 s of counter time) for it to finish.
    ///
    /// # Errors
    /// When the device is still busy after 5 s.
    pub fn dma(
        &self,
        source: u64,
        destination: u64,
        count: u64,
        to_ram: bool,
    ) -> Result<(), String> {
        self.write64(REG_DMA_SRC, source);
        self.write64(REG_DMA_DST, destination);
        self.write64(REG_DMA_COUNT, count);
        let direction = if to_ram { DMA_TO_RAM } else { 0 };
        self.write64(REG_DMA_CMD, DMA_START | direction);
        let deadline = read_sysreg!(cntpct_el0) + 5 * read_sysreg!(cntfrq_el0);
        while self.read64(REG_DMA_CMD) & DMA_START != 0 {
            check!(
                read_sysreg!(cntpct_el0) < deadline,
                "edu DMA {source:#x} -> {destination:#x} did not finish in 5 s"
            );
            core::hint::spin_loop();
        }
        Ok(())
    }

    /// Device buffer <- guest memory at `iova` (`count` bytes).
    ///
    /// # Errors
    /// As [`Edu::dma`].
    pub fn read_from(&self, iova: u64, count: u64) -> Result<(), String> {
        self.dma(iova, BUFFER, count, false)
    }

    /// Guest memory at `iova` <- device buffer (`count` bytes).
    ///
    /// # Errors
    /// As [`Edu::dma`].
    pub fn write_to(&self, iova: u64, count: u64) -> Result<(), String> {
        self.dma(BUFFER, iova, count, true)
    }
}

/// A zeroed, page-aligned page of guest RAM from the heap (IPA = VA under the runtime's
/// identity map), leaked on purpose: a device may write it.
pub fn page() -> &'static mut [u8] {
    let layout = core::alloc::Layout::from_size_align(PAGE, PAGE).expect("page layout");
    // SAFETY: non-zero size.
    let pointer = unsafe { alloc::alloc::alloc_zeroed(layout) };
    assert!(!pointer.is_null(), "out of heap");
    // SAFETY: a fresh, exclusively owned allocation of PAGE bytes.
    unsafe { core::slice::from_raw_parts_mut(pointer, PAGE) }
}

/// Pushes `buffer` to memory and drops its lines, by VA from EL1 (QEMU has no caches; hardware
/// would need it around a non-coherent DMA).
pub fn clean_invalidate(buffer: &[u8]) {
    let line = guest_rt::arch::dcache_line_size();
    let start = buffer.as_ptr() as usize & !(line - 1);
    for address in (start..buffer.as_ptr() as usize + buffer.len()).step_by(line) {
        guest_rt::arch::dc_civac(address);
    }
    guest_rt::arch::dsb_sy();
}

/// Byte `index` of `buffer`, read volatile: the device wrote it behind the compiler's back.
pub fn read_volatile(buffer: &[u8], index: usize) -> u8 {
    assert!(index < buffer.len(), "read_volatile out of bounds");
    // SAFETY: in bounds (checked).
    unsafe { buffer.as_ptr().add(index).read_volatile() }
}
