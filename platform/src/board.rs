//! Board discovery: what the hypervisor learns from the device tree QEMU's `virt` machine
//! passes to its firmware (RAM, CPUs, PSCI conduit, GIC, UARTs, RTC, fw_cfg, SMMU, PCIe, flash).
//!
//! Devices are matched by `compatible`, disabled nodes (`status` other than "okay") are
//! skipped, and every address is decoded with the `#address-cells` / `#size-cells` of the
//! node's parent and translated to a CPU physical address through the `ranges` of the buses
//! above it.

#![forbid(unsafe_code)]

use alloc::string::String;
use alloc::vec::Vec;
use core::fmt;

use crate::fdt_reader::{be32, read_cells, string_value, Tree, ROOT};

/// A physical (or, for the guest, intermediate physical) address range `[base, base + size)`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Region {
    /// First byte of the range.
    pub base: u64,
    /// Length in bytes.
    pub size: u64,
}

impl Region {
    /// The range `[base, base + size)`.
    pub const fn new(base: u64, size: u64) -> Self {
        Region { base, size }
    }

    /// The first byte after the range, or `None` when the range wraps past 2^64 (no region
    /// that [`Board::from_fdt`] returns does; the check is for regions built elsewhere).
    pub const fn end(&self) -> Option<u64> {
        self.base.checked_add(self.size)
    }

    /// Whether `address` lies inside the range.
    pub const fn contains(&self, address: u64) -> bool {
        address >= self.base && address - self.base < self.size
    }

    /// Whether all of `other` lies inside this range (an empty `other` counts as inside when its
    /// base is inside or at the end of this range).
    pub const fn contains_region(&self, other: &Region) -> bool {
        if other.base < self.base {
            return false;
        }
        let offset = other.base - self.base;
        offset <= self.size && other.size <= self.size - offset
    }

    /// Whether the two ranges share at least one byte.
    pub const fn overlaps(&self, other: &Region) -> bool {
        if self.size == 0 || other.size == 0 {
            return false;
        }
        self.contains(other.base) || other.contains(self.base)
    }
}

impl fmt::Display for Region {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.end() {
            Some(end) => write!(f, "[{:#x}, {:#x})", self.base, end),
            None => write!(f, "[{:#x}, +{:#x})", self.base, self.size),
        }
    }
}

/// Why a device tree could not be read or written.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DtError {
    /// The blob is shorter than its header, or than the total size its header claims.
    Truncated,
    /// The blob does not start with the FDT magic number 0xd00dfeed.
    BadMagic(u32),
    /// The header's version is not one this code reads (17, readable as 16).
    UnsupportedVersion {
        /// `version` field of the header.
        version: u32,
        /// `last_comp_version` field of the header.
        last_compatible: u32,
    },
    /// A block the header names (structure, strings, memory reservation) lies outside the blob.
    BlockOutOfBounds(&'static str),
    /// The structure block is malformed at this byte offset of the blob.
    Malformed {
        /// Offset from the start of the blob.
        offset: usize,
        /// What is wrong there.
        reason: &'static str,
    },
    /// A property the hypervisor relies on has a value that does not fit its meaning.
    BadProperty {
        /// Path of the node.
        node: String,
        /// Name of the property.
        property: &'static str,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// The guest device-tree configuration cannot be expressed (for example a range that wraps).
    InvalidConfig(&'static str),
    /// A value does not fit the cells the tree gives it (RAM above 4 GiB with one address cell).
    ValueTooWide {
        /// The property being written.
        property: &'static str,
        /// The value that does not fit.
        value: u64,
        /// The number of 32-bit cells available.
        cells: u32,
    },
    /// Writing the new blob failed: a name the FDT format rejects, or a blob over 4 GiB.
    Write(String),
}

impl fmt::Display for DtError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DtError::Truncated => write!(f, "device tree: blob truncated"),
            DtError::BadMagic(magic) => {
                write!(f, "device tree: bad magic {magic:#010x} (expected 0xd00dfeed)")
            }
            DtError::UnsupportedVersion {
                version,
                last_compatible,
            } => write!(
                f,
                "device tree: unsupported version {version} (last compatible {last_compatible}), need 17"
            ),
            DtError::BlockOutOfBounds(block) => {
                write!(f, "device tree: {block} block lies outside the blob")
            }
            DtError::Malformed { offset, reason } => {
                write!(f, "device tree: malformed at offset {offset:#x}: {reason}")
            }
            DtError::BadProperty {
                node,
                property,
                reason,
            } => write!(f, "device tree: {node}: bad `{property}`: {reason}"),
            DtError::InvalidConfig(reason) => write!(f, "guest device tree: {reason}"),
            DtError::ValueTooWide {
                property,
                value,
                cells,
            } => write!(
                f,
                "guest device tree: `{property}` value {value:#x} does not fit in {cells} cell(s)"
            ),
            DtError::Write(reason) => write!(f, "guest device tree: cannot write blob: {reason}"),
        }
    }
}

/// How PSCI calls reach the firmware, from `/psci` `method`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PsciMethod {
    /// `SMC #0`.
    Smc,
    /// `HVC #0`.
    Hvc,
}

/// A PL011 UART.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Uart {
    /// Full device-tree path, e.g. `/pl011@9000000`.
    pub path: String,
    /// Its register block.
    pub region: Region,
    /// Whether `/chosen/stdout-path` names it.
    pub is_stdout: bool,
}

/// The GIC architecture a board has.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GicVersion {
    /// GICv2 (GIC-400 and the like): memory-mapped CPU interface, no redistributors.
    V2,
    /// GICv3 or later: redistributors, system-register CPU interface.
    V3,
}

/// The interrupt controller.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Gic {
    /// Which architecture.
    pub version: GicVersion,
    /// GICD register block.
    pub distributor: Region,
    /// GICv2: the CPU interface (GICC). (GICH and GICV, which follow it in `reg`, are the
    /// hypervisor's and are not read.)
    pub cpu_interface: Option<Region>,
    /// GICv3: GICR regions (`#redistributor-regions` of them, default one).
    pub redistributors: Vec<Region>,
    /// GIC ITS register blocks (enabled `arm,gic-v3-its` children).
    pub its: Vec<Region>,
}

/// The address space of a PCI host-bridge window, from the space code of its `ranges` entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PciWindowKind {
    /// I/O space (space code 0b01).
    Io,
    /// 32-bit memory space (space code 0b10).
    Mem32,
    /// 64-bit memory space (space code 0b11).
    Mem64,
}

/// One window of a PCI host bridge: PCI addresses `[pci_base, pci_base + size)` appear at CPU
/// physical addresses `[cpu_base, cpu_base + size)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PciWindow {
    /// Which PCI address space the window opens.
    pub kind: PciWindowKind,
    /// First PCI bus address of the window.
    pub pci_base: u64,
    /// CPU physical address of `pci_base`.
    pub cpu_base: u64,
    /// Length in bytes.
    pub size: u64,
}

/// One `iommu-map` entry: requester IDs `[rid_base, rid_base + length)` reach the IOMMU with
/// phandle `iommu_phandle` as StreamIDs `[sid_base, sid_base + length)`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IommuMapEntry {
    /// First PCI requester ID (bus << 8 | devfn).
    pub rid_base: u32,
    /// Phandle of the IOMMU node.
    pub iommu_phandle: u32,
    /// StreamID of `rid_base`.
    pub sid_base: u32,
    /// Number of requester IDs.
    pub length: u32,
}

/// A generic ECAM PCIe host bridge.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Pcie {
    /// Configuration space (ECAM).
    pub ecam: Region,
    /// First bus number (`bus-range`).
    pub bus_start: u8,
    /// Last bus number (`bus-range`).
    pub bus_end: u8,
    /// I/O and memory windows, in `ranges` order (configuration-space entries skipped).
    pub windows: Vec<PciWindow>,
    /// `iommu-map` entries (assumes `#iommu-cells = <1>`, as SMMUv3 has).
    pub iommu_map: Vec<IommuMapEntry>,
}

/// What the hypervisor knows about the machine, read from its device tree.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Board {
    /// RAM regions (every `device_type = "memory"` node), in tree order.
    pub memory: Vec<Region>,
    /// MPIDR affinity value (`reg`) of each `/cpus/cpu@*` node, in tree order.
    pub cpus: Vec<u64>,
    /// The PSCI conduit, when a PSCI node exists.
    pub psci_method: Option<PsciMethod>,
    /// The first GICv3.
    pub gic: Option<Gic>,
    /// Every PL011, in tree order.
    pub uarts: Vec<Uart>,
    /// The PL031 real-time clock.
    pub rtc: Option<Region>,
    /// The fw_cfg MMIO interface.
    pub fw_cfg: Option<Region>,
    /// The first SMMUv3.
    pub smmu: Option<Region>,
    /// The first generic ECAM PCIe host bridge.
    pub pcie: Option<Pcie>,
    /// Every CFI flash bank (each `reg` entry of each `cfi-flash` node).
    pub flash: Vec<Region>,
}

const PSCI_COMPATIBLES: [&str; 3] = ["arm,psci-1.0", "arm,psci-0.2", "arm,psci"];
/// Bytes of ECAM per bus: 32 devices x 8 functions x 4 KiB.
const ECAM_BYTES_PER_BUS: u64 = 1 << 20;

impl Board {
    /// Reads the board description from a flattened device tree.
    ///
    /// # Errors
    ///
    /// A [`DtError`] when the blob is malformed, or when a node the hypervisor uses has a
    /// property it cannot decode (a `reg` that is not whole entries, a PSCI method that is
    /// neither "smc" nor "hvc", a GIC with fewer regions than it declares, ...).
    pub fn from_fdt(dtb: &[u8]) -> Result<Board, DtError> {
        let tree = Tree::parse(dtb)?;
        let stdout = tree
            .find_path("/chosen")
            .and_then(|chosen| tree.property(chosen, "stdout-path"))
            .and_then(string_value)
            .and_then(|reference| tree.resolve_reference(reference));

        let mut board = Board::default();
        for index in 0..tree.nodes.len() {
            if !tree.is_enabled(index) {
                continue;
            }
            if tree.device_type(index) == Some("memory") {
                board.memory.extend(mmio_regions(&tree, index)?);
            } else if tree.is_compatible(index, "arm,pl011") {
                board.uarts.push(Uart {
                    path: tree.path(index),
                    region: first_region(&tree, index)?,
                    is_stdout: stdout == Some(index),
                });
            } else if tree.is_compatible(index, "arm,pl031") {
                board.rtc.get_or_insert(first_region(&tree, index)?);
            } else if tree.is_compatible(index, "qemu,fw-cfg-mmio") {
                board.fw_cfg.get_or_insert(first_region(&tree, index)?);
            } else if tree.is_compatible(index, "arm,smmu-v3") {
                board.smmu.get_or_insert(first_region(&tree, index)?);
            } else if tree.is_compatible(index, "cfi-flash") {
                board.flash.extend(mmio_regions(&tree, index)?);
            } else if tree.is_compatible(index, "arm,gic-v3") && board.gic.is_none() {
                board.gic = Some(read_gic(&tree, index)?);
            } else if crate::guest_dt::GICV2_COMPATIBLES
                .iter()
                .any(|compatible| tree.is_compatible(index, compatible))
                && board.gic.is_none()
            {
                board.gic = Some(read_gicv2(&tree, index)?);
            } else if tree.is_compatible(index, "pci-host-ecam-generic") && board.pcie.is_none() {
                board.pcie = Some(read_pcie(&tree, index)?);
            } else if PSCI_COMPATIBLES
                .iter()
                .any(|compatible| tree.is_compatible(index, compatible))
                && board.psci_method.is_none()
            {
                board.psci_method = read_psci_method(&tree, index)?;
            }
        }
        board.cpus = read_cpus(&tree)?;
        Ok(board)
    }

    /// The UART the hypervisor keeps for itself: the PL011 that is not `/chosen/stdout-path`
    /// (not the [`console_uart`](Self::console_uart)), when there are two or more.
    pub fn hypervisor_uart(&self) -> Option<&Uart> {
        if self.uarts.len() < 2 {
            return None;
        }
        let console = self.console_uart()?;
        self.uarts.iter().find(|uart| uart.path != console.path)
    }

    /// The guest's console UART: the one `/chosen/stdout-path` names, else the first PL011.
    pub fn console_uart(&self) -> Option<&Uart> {
        self.uarts
            .iter()
            .find(|uart| uart.is_stdout)
            .or_else(|| self.uarts.first())
    }
}

/// Every `reg` entry of node `index`, as CPU physical ranges.
fn mmio_regions(tree: &Tree<'_>, index: usize) -> Result<Vec<Region>, DtError> {
    let Some(entries) = tree.reg(index)? else {
        return Ok(Vec::new());
    };
    entries
        .into_iter()
        .map(|entry| {
            tree.translate(index, entry)
                .ok_or_else(|| DtError::BadProperty {
                    node: tree.path(index),
                    property: "reg",
                    reason: "address not reachable from the CPU through the parents' `ranges`",
                })
        })
        .collect()
}

/// The first `reg` entry of node `index`, which must exist.
fn first_region(tree: &Tree<'_>, index: usize) -> Result<Region, DtError> {
    mmio_regions(tree, index)?
        .first()
        .copied()
        .ok_or_else(|| DtError::BadProperty {
            node: tree.path(index),
            property: "reg",
            reason: "missing or empty",
        })
}

fn read_psci_method(tree: &Tree<'_>, index: usize) -> Result<Option<PsciMethod>, DtError> {
    let Some(value) = tree.property(index, "method") else {
        return Ok(None);
    };
    match string_value(value) {
        Some("smc") => Ok(Some(PsciMethod::Smc)),
        Some("hvc") => Ok(Some(PsciMethod::Hvc)),
        _ => Err(DtError::BadProperty {
            node: tree.path(index),
            property: "method",
            reason: "neither \"smc\" nor \"hvc\"",
        }),
    }
}

fn read_gic(tree: &Tree<'_>, index: usize) -> Result<Gic, DtError> {
    let regions = mmio_regions(tree, index)?;
    let redistributor_count = tree
        .u32_property(index, "#redistributor-regions")
        .unwrap_or(1) as usize;
    let (Some(distributor), Some(redistributors)) = (
        regions.first().copied(),
        redistributor_count
            .checked_add(1)
            .and_then(|end| regions.get(1..end)),
    ) else {
        return Err(DtError::BadProperty {
            node: tree.path(index),
            property: "reg",
            reason: "fewer regions than the distributor and its redistributor regions",
        });
    };
    let mut its = Vec::new();
    for &child in tree
        .node(index)
        .map(|node| node.children.as_slice())
        .unwrap_or_default()
    {
        if tree.is_enabled(child) && tree.is_compatible(child, "arm,gic-v3-its") {
            its.push(first_region(tree, child)?);
        }
    }
    Ok(Gic {
        version: GicVersion::V3,
        distributor,
        cpu_interface: None,
        redistributors: redistributors.to_vec(),
        its,
    })
}

fn read_gicv2(tree: &Tree<'_>, index: usize) -> Result<Gic, DtError> {
    let regions = mmio_regions(tree, index)?;
    let (Some(&distributor), Some(&cpu_interface)) = (regions.first(), regions.get(1)) else {
        return Err(DtError::BadProperty {
            node: tree.path(index),
            property: "reg",
            reason: "a GICv2 needs its distributor and CPU interface",
        });
    };
    Ok(Gic {
        version: GicVersion::V2,
        distributor,
        cpu_interface: Some(cpu_interface),
        redistributors: Vec::new(),
        its: Vec::new(),
    })
}

fn read_pcie(tree: &Tree<'_>, index: usize) -> Result<Pcie, DtError> {
    let bad = |property, reason| DtError::BadProperty {
        node: tree.path(index),
        property,
        reason,
    };
    let ecam = first_region(tree, index)?;
    let (bus_start, bus_end) = match tree.property(index, "bus-range") {
        Some(value) => {
            let (Some(start), Some(end), 8) = (be32(value, 0), be32(value, 4), value.len()) else {
                return Err(bad("bus-range", "not two cells"));
            };
            match (u8::try_from(start), u8::try_from(end)) {
                (Ok(start), Ok(end)) if start <= end => (start, end),
                _ => return Err(bad("bus-range", "not an ordered pair of bus numbers 0-255")),
            }
        }
        None => {
            let buses = (ecam.size / ECAM_BYTES_PER_BUS).min(256);
            let last = u8::try_from(buses.saturating_sub(1)).unwrap_or(u8::MAX);
            if buses == 0 {
                return Err(bad("reg", "ECAM smaller than one bus"));
            }
            (0, last)
        }
    };

    let (child_cells, size_cells) = tree.child_cells(index);
    let parent = tree
        .node(index)
        .and_then(|node| node.parent)
        .unwrap_or(ROOT);
    let (parent_cells, _) = tree.child_cells(parent);
    let mut windows = Vec::new();
    if let Some(ranges) = tree.property(index, "ranges") {
        if child_cells != 3 || parent_cells > 2 || size_cells > 2 {
            return Err(bad(
                "ranges",
                "needs #address-cells = 3 and at most 2 parent/size cells",
            ));
        }
        let entry_cells = (child_cells + parent_cells + size_cells) as usize;
        if !ranges.len().is_multiple_of(entry_cells * 4) {
            return Err(bad("ranges", "not a whole number of entries"));
        }
        for entry in 0..ranges.len() / (entry_cells * 4) {
            let first = entry * entry_cells;
            let decoded = (
                be32(ranges, first * 4),
                read_cells(ranges, first + 1, 2),
                read_cells(ranges, first + 3, parent_cells),
                read_cells(ranges, first + 3 + parent_cells as usize, size_cells),
            );
            let (Some(space), Some(pci_base), Some(bus_base), Some(size)) = decoded else {
                return Err(bad("ranges", "truncated entry"));
            };
            let kind = match (space >> 24) & 0b11 {
                0b01 => PciWindowKind::Io,
                0b10 => PciWindowKind::Mem32,
                0b11 => PciWindowKind::Mem64,
                _ => continue, // configuration space: described by `reg`
            };
            let cpu = tree
                .translate(index, Region::new(bus_base, size))
                .ok_or_else(|| bad("ranges", "window not reachable from the CPU"))?;
            if pci_base.checked_add(size).is_none() {
                return Err(bad("ranges", "window wraps past the end of PCI space"));
            }
            windows.push(PciWindow {
                kind,
                pci_base,
                cpu_base: cpu.base,
                size,
            });
        }
    }

    let mut iommu_map = Vec::new();
    if let Some(map) = tree.property(index, "iommu-map") {
        if !map.len().is_multiple_of(16) {
            return Err(bad("iommu-map", "not a whole number of 4-cell entries"));
        }
        for entry in map.chunks_exact(16) {
            let (Some(rid_base), Some(iommu_phandle), Some(sid_base), Some(length)) = (
                be32(entry, 0),
                be32(entry, 4),
                be32(entry, 8),
                be32(entry, 12),
            ) else {
                return Err(bad("iommu-map", "truncated entry"));
            };
            iommu_map.push(IommuMapEntry {
                rid_base,
                iommu_phandle,
                sid_base,
                length,
            });
        }
    }

    Ok(Pcie {
        ecam,
        bus_start,
        bus_end,
        windows,
        iommu_map,
    })
}

fn read_cpus(tree: &Tree<'_>) -> Result<Vec<u64>, DtError> {
    let Some(cpus) = tree.find_path("/cpus") else {
        return Ok(Vec::new());
    };
    let (address_cells, _) = tree.child_cells(cpus);
    let mut affinities = Vec::new();
    for &child in tree
        .node(cpus)
        .map(|node| node.children.as_slice())
        .unwrap_or_default()
    {
        let Some(node) = tree.node(child) else {
            continue;
        };
        let is_cpu_name = node.name == "cpu" || node.name.starts_with("cpu@");
        let is_cpu_type = tree.device_type(child).is_none_or(|kind| kind == "cpu");
        if !is_cpu_name || !is_cpu_type || !tree.is_enabled(child) {
            continue;
        }
        let value = tree.property(child, "reg").unwrap_or_default();
        let affinity = read_cells(value, 0, address_cells)
            .filter(|_| address_cells > 0 && value.len() == address_cells as usize * 4)
            .ok_or_else(|| DtError::BadProperty {
                node: tree.path(child),
                property: "reg",
                reason: "not one MPIDR value of #address-cells (1 or 2) cells",
            })?;
        affinities.push(affinity);
    }
    Ok(affinities)
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec;

    const TWO_SERIALS: &[u8] = include_bytes!("../../tests/fixtures/qemu-virt-smp4-1g.dtb");
    const ONE_SERIAL: &[u8] =
        include_bytes!("../../tests/fixtures/qemu-virt-smp4-1g-one-serial.dtb");
    const SMALL: &[u8] = include_bytes!("../../tests/fixtures/qemu-virt-smp2-512m.dtb");

    fn uart(path: &str, base: u64, is_stdout: bool) -> Uart {
        Uart {
            path: path.into(),
            region: Region::new(base, 0x1000),
            is_stdout,
        }
    }

    #[test]
    fn reads_qemu_virt_with_two_serials() {
        let board = Board::from_fdt(TWO_SERIALS).unwrap();
        let expected = Board {
            memory: vec![Region::new(0x4000_0000, 0x4000_0000)],
            cpus: vec![0, 1, 2, 3],
            psci_method: Some(PsciMethod::Smc),
            gic: Some(Gic {
                version: GicVersion::V3,
                distributor: Region::new(0x0800_0000, 0x1_0000),
                cpu_interface: None,
                redistributors: vec![Region::new(0x080a_0000, 0xf6_0000)],
                its: vec![Region::new(0x0808_0000, 0x2_0000)],
            }),
            uarts: vec![
                uart("/pl011@9000000", 0x0900_0000, true),
                uart("/pl011@9040000", 0x0904_0000, false),
            ],
            rtc: Some(Region::new(0x0901_0000, 0x1000)),
            fw_cfg: Some(Region::new(0x0902_0000, 0x18)),
            smmu: Some(Region::new(0x0905_0000, 0x2_0000)),
            pcie: Some(Pcie {
                ecam: Region::new(0x40_1000_0000, 0x1000_0000),
                bus_start: 0,
                bus_end: 255,
                windows: vec![
                    PciWindow {
                        kind: PciWindowKind::Io,
                        pci_base: 0,
                        cpu_base: 0x3eff_0000,
                        size: 0x1_0000,
                    },
                    PciWindow {
                        kind: PciWindowKind::Mem32,
                        pci_base: 0x1000_0000,
                        cpu_base: 0x1000_0000,
                        size: 0x2eff_0000,
                    },
                    PciWindow {
                        kind: PciWindowKind::Mem64,
                        pci_base: 0x80_0000_0000,
                        cpu_base: 0x80_0000_0000,
                        size: 0x80_0000_0000,
                    },
                ],
                iommu_map: vec![IommuMapEntry {
                    rid_base: 0,
                    iommu_phandle: 0x8007,
                    sid_base: 0,
                    length: 0x1_0000,
                }],
            }),
            flash: vec![
                Region::new(0, 0x400_0000),
                Region::new(0x400_0000, 0x400_0000),
            ],
        };
        assert_eq!(board, expected);
        assert_eq!(board.console_uart().unwrap().region.base, 0x0900_0000);
        assert_eq!(board.hypervisor_uart().unwrap().region.base, 0x0904_0000);
    }

    #[test]
    fn one_serial_leaves_no_hypervisor_uart() {
        let board = Board::from_fdt(ONE_SERIAL).unwrap();
        assert_eq!(board.uarts, vec![uart("/pl011@9000000", 0x0900_0000, true)]);
        assert_eq!(board.console_uart().unwrap().path, "/pl011@9000000");
        assert_eq!(board.hypervisor_uart(), None);
    }

    #[test]
    fn reads_memory_and_cpus_of_a_smaller_machine() {
        let board = Board::from_fdt(SMALL).unwrap();
        assert_eq!(board.memory, vec![Region::new(0x4000_0000, 0x2000_0000)]);
        assert_eq!(board.cpus, vec![0, 1]);
        assert_eq!(board.uarts.len(), 2);
    }

    #[test]
    fn console_falls_back_to_the_first_uart() {
        let board = Board {
            uarts: vec![
                uart("/pl011@9000000", 0x0900_0000, false),
                uart("/pl011@9040000", 0x0904_0000, false),
            ],
            ..Board::default()
        };
        assert_eq!(board.console_uart().unwrap().path, "/pl011@9000000");
        assert_eq!(board.hypervisor_uart().unwrap().path, "/pl011@9040000");
        let board = Board {
            uarts: vec![
                uart("/pl011@9000000", 0x0900_0000, false),
                uart("/pl011@9040000", 0x0904_0000, true),
            ],
            ..Board::default()
        };
        assert_eq!(board.console_uart().unwrap().path, "/pl011@9040000");
        assert_eq!(board.hypervisor_uart().unwrap().path, "/pl011@9000000");
    }

    #[test]
    fn region_helpers() {
        let region = Region::new(0x1000, 0x1000);
        assert_eq!(region.end(), Some(0x2000));
        assert!(region.contains(0x1000) && region.contains(0x1fff));
        assert!(!region.contains(0x2000) && !region.contains(0xfff));
        assert!(region.overlaps(&Region::new(0x1fff, 1)));
        assert!(!region.overlaps(&Region::new(0x2000, 0x1000)));
        assert!(!region.overlaps(&Region::new(0x1800, 0)));
        assert!(region.contains_region(&Region::new(0x1800, 0x800)));
        assert!(!region.contains_region(&Region::new(0x1800, 0x801)));
        let top = Region::new(u64::MAX - 0xfff, 0x1000);
        assert_eq!(
            top.end(),
            None,
            "the end of the last page is 2^64, which u64 cannot hold"
        );
        assert!(top.contains(u64::MAX));
        assert!(Region::new(0, u64::MAX).contains_region(&Region::new(u64::MAX - 1, 1)));
        assert_eq!(Region::new(u64::MAX, 2).end(), None);
        assert!(Region::new(u64::MAX, 2).overlaps(&top));
        assert_eq!(alloc::format!("{region}"), "[0x1000, 0x2000)");
    }

    #[test]
    fn damaged_blobs_are_errors() {
        let mut blob = TWO_SERIALS.to_vec();
        // Make the first property's name offset point far outside the strings block.
        let structure = be32(&blob, 8).unwrap() as usize;
        let first_prop = structure + 8; // FDT_BEGIN_NODE, empty root name padded to 4
        assert_eq!(be32(&blob, first_prop), Some(3));
        blob[first_prop + 8..first_prop + 12].copy_from_slice(&0x00ff_ffffu32.to_be_bytes());
        let error = Board::from_fdt(&blob).unwrap_err();
        assert!(matches!(error, DtError::Malformed { .. }), "{error}");
        assert_eq!(
            alloc::format!("{error}"),
            alloc::format!(
                "device tree: malformed at offset {first_prop:#x}: property name outside the strings block"
            )
        );
    }
}
