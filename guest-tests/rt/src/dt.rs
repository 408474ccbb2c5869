//! The device tree the guest was booted with (x0 at entry), and the facts the runtime takes from
//! it at boot: RAM, console UART, GIC, CPUs.

use alloc::vec::Vec;

use fdt::Fdt;
use spin::Once;

/// QEMU `virt`'s RAM base, where QEMU's own loader puts the DTB when x0 does not point at one.
const FALLBACK_DTB: usize = 0x4000_0000;
/// QEMU `virt`'s first PL011, when the device tree names no console.
const DEFAULT_UART: usize = 0x0900_0000;

/// A physical (IPA) address range.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Region {
    /// First address.
    pub base: usize,
    /// Size in bytes.
    pub size: usize,
}

impl Region {
    /// One past the last address.
    pub fn end(&self) -> usize {
        self.base + self.size
    }

    /// Whether `addr` lies in the region.
    pub fn contains(&self, addr: usize) -> bool {
        addr >= self.base && addr < self.end()
    }
}

/// What the runtime learned from the device tree at boot.
#[derive(Debug)]
pub struct BootInfo {
    /// Address of the device tree blob.
    pub dtb: usize,
    /// The RAM regions of the memory node(s).
    pub ram: Vec<Region>,
    /// Base of the console PL011.
    pub uart_base: usize,
    /// GICv3 distributor, if the tree has one.
    pub gic_distributor: Option<Region>,
    /// GICv3 redistributor region, if the tree has one.
    pub gic_redistributors: Option<Region>,
    /// MPIDR affinity values of the CPUs, in device-tree order (index = CPU index).
    pub cpu_mpidrs: Vec<u64>,
}

static BOOT_INFO: Once<BootInfo> = Once::new();

/// Parses the device tree at `dtb` (falling back to QEMU's placement at the RAM base) and
/// records the boot facts. Fails the boot with a message if there is no valid tree.
pub(crate) fn init(dtb: usize) -> &'static BootInfo {
    let dtb = if parse(dtb).is_some() {
        dtb
    } else {
        FALLBACK_DTB
    };
    let Some(tree) = parse(dtb) else {
        crate::println!(
            "guest-rt: no valid device tree at x0 ({:#x}) nor at {:#x}",
            dtb,
            FALLBACK_DTB
        );
        crate::psci::system_off();
    };
    let ram = tree
        .memory()
        .regions()
        .filter_map(|r| {
            Some(Region {
                base: r.starting_address as usize,
                size: r.size?,
            })
        })
        .collect();
    let uart_base = tree
        .chosen()
        .stdout()
        .and_then(|node| node.reg()?.next())
        .map_or(DEFAULT_UART, |r| r.starting_address as usize);
    let gic = tree.find_compatible(&["arm,gic-v3"]);
    let gic_region = |n: usize| {
        gic.and_then(|node| node.reg()?.nth(n)).and_then(|r| {
            Some(Region {
                base: r.starting_address as usize,
                size: r.size?,
            })
        })
    };
    let cpu_mpidrs = tree.cpus().map(|cpu| cpu.ids().first() as u64).collect();
    BOOT_INFO.call_once(|| BootInfo {
        dtb,
        ram,
        uart_base,
        gic_distributor: gic_region(0),
        gic_redistributors: gic_region(1),
        cpu_mpidrs,
    })
}

fn parse(dtb: usize) -> Option<Fdt<'static>> {
    if dtb == 0 || !dtb.is_multiple_of(8) {
        return None;
    }
    // SAFETY: a non-null, aligned pointer; `from_ptr` reads the header and checks the magic
    // before trusting the size. Guest RAM holding the tree stays mapped and is never written.
    unsafe { Fdt::from_ptr(dtb as *const u8).ok() }
}

/// The facts recorded at boot.
pub fn boot_info() -> &'static BootInfo {
    BOOT_INFO.get().expect("device tree read at boot")
}

/// The device tree the guest was booted with.
pub fn tree() -> Fdt<'static> {
    parse(boot_info().dtb).expect("device tree checked at boot")
}

/// The guest's first RAM region (where the image runs).
pub fn main_ram() -> Region {
    let image = crate::mmu::image_start();
    let ram = &boot_info().ram;
    ram.iter()
        .copied()
        .find(|r| r.contains(image))
        .or_else(|| ram.first().copied())
        .expect("a memory node")
}
