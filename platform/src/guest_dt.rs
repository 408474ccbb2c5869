//! The guest's device tree: a new blob written from the host's, with the guest's RAM, only the
//! MMIO its stage 2 maps, PSCI over HVC, its initrd and command line, and a node that
//! advertises the hypervisor.
//!
//! The blob is written with the `vm-fdt` crate (rust-vmm): it is `no_std` + `alloc`, writes a
//! compact version 17 blob (8-byte aligned reservation block, deduplicated strings) and checks
//! names and nesting. It has no option for free space, so [`guest_device_tree`] appends
//! [`GUEST_DT_FREE_SPACE`] zero bytes after the strings block and raises `totalsize`, which is
//! the layout libfdt's `fdt_open_into` produces.
//!
//! What is removed, and why it is kept simple:
//! - every `device_type = "memory"` node (one new `memory@<base>` node takes the place of the
//!   first one under the root);
//! - every node with a `reg` on a memory-mapped bus (parent `#size-cells` > 0, not a PCI bus)
//!   whose ranges, translated to CPU addresses, are not each inside one `allowed_mmio` region;
//!   a `reg` that cannot be decoded or translated counts as not allowed;
//! - every node whose `gpios`, `*-gpios`, `clocks` or `interrupt-parent` names a removed node
//!   (`msi-parent` and `iommus` are deleted everywhere, so they never keep a reference alive);
//! - a node left with no children by these removals whose only properties are `compatible`
//!   (and a phandle), such as `gpio-keys` once its key's GPIO controller is gone;
//! - the properties `iommu-map`, `iommu-map-mask`, `iommus`, `msi-map`, `msi-map-mask` and
//!   `msi-parent` on every node: the hypervisor owns the SMMU and the ITS is not the guest's;
//! - `/aliases` entries whose path names a removed node;
//! - from a PCI host bridge's `ranges`, every window whose CPU range is not inside one
//!   `allowed_mmio` region (a 64-bit window beyond the IPA space of a 40-bit CPU): the guest
//!   would place BARs there and fault on every access;
//! - from a GICv2 node, the GICH and GICV regions that follow its distributor and CPU interface
//!   (`reg` is cut to the allowed leading entries; the virtualization interface stays the
//!   hypervisor's, and Linux's driver needs only the first two).
//!
//! The memory reservation block of the host blob is not copied: its entries are host physical
//! addresses, which mean nothing in the guest's IPA space.

#![forbid(unsafe_code)]

use alloc::string::ToString;
use alloc::vec;
use alloc::vec::Vec;
use alloc::{collections::BTreeMap, format};

use stagehand_abi::DT_COMPATIBLE;
use vm_fdt::FdtWriter;

use crate::board::{DtError, Region, GICV2_COMPATIBLES};
use crate::fdt_reader::{be32, read_cells, string_value, Tree, ROOT};

/// Zero bytes left at the end of the guest's blob (inside `totalsize`), so the guest can add
/// or grow properties in place.
pub const GUEST_DT_FREE_SPACE: usize = 4096;

/// Properties deleted from every node.
const DELETED_PROPERTIES: [&str; 6] = [
    "iommu-map",
    "iommu-map-mask",
    "iommus",
    "msi-map",
    "msi-map-mask",
    "msi-parent",
];

/// Properties that may stay on a node that is removed once its children are gone.
const CONTAINER_ONLY_PROPERTIES: [&str; 3] = ["compatible", "phandle", "linux,phandle"];

const PSCI_COMPATIBLES: [&str; 3] = ["arm,psci-1.0", "arm,psci-0.2", "arm,psci"];

/// The `reg` entries of a GICv2 node the guest needs: distributor and CPU interface.
const GICV2_GUEST_REG_ENTRIES: usize = 2;

fn is_gicv2(tree: &Tree<'_>, index: usize) -> bool {
    GICV2_COMPATIBLES
        .iter()
        .any(|compatible| tree.is_compatible(index, compatible))
}

/// What the guest's device tree describes.
#[derive(Clone, Copy, Debug)]
pub struct GuestDtConfig<'a> {
    /// Guest RAM in IPA space, e.g. `0x4000_0000` + size.
    pub ram: Region,
    /// IPA range of the initrd, if any.
    pub initrd: Option<Region>,
    /// Replaces `/chosen/bootargs` when `Some`.
    pub bootargs: Option<&'a str>,
    /// MMIO the guest's stage 2 maps (IPA == PA for MMIO).
    pub allowed_mmio: &'a [Region],
    /// ABI version advertised in `/hypervisor/abi-version` as `<major minor>`.
    pub abi_version: (u32, u32),
}

/// Writes the guest's device tree from the host's blob; see the module documentation for every
/// edit. The result is a new version 17 blob with [`GUEST_DT_FREE_SPACE`] free bytes at its end.
///
/// # Errors
///
/// - any reading error of [`DtError`] for a malformed `host_dtb`;
/// - [`DtError::InvalidConfig`] for empty RAM or a RAM or initrd range that wraps;
/// - [`DtError::ValueTooWide`] when RAM does not fit the root's `#address-cells`/`#size-cells`;
/// - [`DtError::Write`] when a name or string cannot be written (e.g. bootargs containing NUL).
pub fn guest_device_tree(host_dtb: &[u8], config: &GuestDtConfig) -> Result<Vec<u8>, DtError> {
    if config.ram.size == 0 {
        return Err(DtError::InvalidConfig("guest RAM is empty"));
    }
    if config.ram.end().is_none() {
        return Err(DtError::InvalidConfig(
            "guest RAM wraps past the end of the address space",
        ));
    }
    if config.initrd.is_some_and(|initrd| initrd.end().is_none()) {
        return Err(DtError::InvalidConfig(
            "initrd wraps past the end of the address space",
        ));
    }
    let tree = Tree::parse(host_dtb)?;
    let removed = removed_nodes(&tree, config.allowed_mmio);
    let editor = Editor {
        tree: &tree,
        config,
        removed: &removed,
        chosen: tree.find_path("/chosen"),
        aliases: tree.find_path("/aliases"),
    };

    let mut writer = FdtWriter::new().map_err(write_error)?;
    writer.set_boot_cpuid_phys(tree.boot_cpuid_phys);
    editor.write_node(&mut writer, ROOT)?;
    let mut blob = writer.finish().map_err(write_error)?;

    let total_size = blob
        .len()
        .checked_add(GUEST_DT_FREE_SPACE)
        .ok_or_else(|| DtError::Write("blob too large".to_string()))?;
    blob.resize(total_size, 0);
    let total_size =
        u32::try_from(total_size).map_err(|_| DtError::Write("blob over 4 GiB".to_string()))?;
    blob.get_mut(4..8)
        .ok_or_else(|| DtError::Write("blob shorter than its header".to_string()))?
        .copy_from_slice(&total_size.to_be_bytes());
    Ok(blob)
}

fn write_error(error: vm_fdt::Error) -> DtError {
    DtError::Write(error.to_string())
}

/// Marks node `index` and everything below it as removed.
fn remove_subtree(tree: &Tree<'_>, index: usize, removed: &mut [bool]) {
    let mut pending = vec![index];
    while let Some(current) = pending.pop() {
        if let Some(flag) = removed.get_mut(current) {
            *flag = true;
        }
        if let Some(node) = tree.node(current) {
            pending.extend_from_slice(&node.children);
        }
    }
}

fn is_memory(tree: &Tree<'_>, index: usize) -> bool {
    index != ROOT && tree.device_type(index) == Some("memory")
}

/// Whether node `index` has a `reg` on a memory-mapped bus that is not entirely allowed.
fn has_forbidden_mmio(tree: &Tree<'_>, index: usize, allowed: &[Region]) -> bool {
    let Some(parent) = tree.node(index).and_then(|node| node.parent) else {
        return false;
    };
    let (_, size_cells) = tree.child_cells(parent);
    if size_cells == 0 || tree.device_type(parent) == Some("pci") {
        return false;
    }
    match allowed_reg_entries(tree, index, allowed) {
        None => true,
        Some((allowed_entries, total)) if is_gicv2(tree, index) => {
            allowed_entries < GICV2_GUEST_REG_ENTRIES.min(total)
        }
        Some((allowed_entries, total)) => allowed_entries < total,
    }
}

/// How many leading `reg` entries of node `index` lie inside `allowed`, and how many there are
/// (`None`: `reg` cannot be decoded). An entry that cannot be translated is not allowed.
fn allowed_reg_entries(
    tree: &Tree<'_>,
    index: usize,
    allowed: &[Region],
) -> Option<(usize, usize)> {
    let entries = match tree.reg(index) {
        Ok(None) => return Some((0, 0)),
        Ok(Some(entries)) => entries,
        Err(_) => return None,
    };
    let leading = entries
        .iter()
        .take_while(|&&entry| {
            tree.translate(index, entry).is_some_and(|physical| {
                allowed
                    .iter()
                    .any(|region| region.contains_region(&physical))
            })
        })
        .count();
    Some((leading, entries.len()))
}

/// The nodes a phandle-list property of node `index` refers to. `args_cells` names the
/// provider property that gives the number of argument cells after each phandle (`None`:
/// a single phandle). Parsing stops at an unknown phandle, whose argument count is unknown.
fn referenced_nodes(
    tree: &Tree<'_>,
    value: &[u8],
    args_cells: Option<&str>,
    phandles: &BTreeMap<u32, usize>,
) -> Vec<usize> {
    let mut nodes = Vec::new();
    let mut cell = 0usize;
    while let Some(handle) = be32(value, cell.saturating_mul(4)) {
        cell += 1;
        if handle == 0 {
            continue; // an empty entry, allowed in GPIO lists
        }
        let Some(&provider) = phandles.get(&handle) else {
            break;
        };
        nodes.push(provider);
        let Some(cells_property) = args_cells else {
            break;
        };
        let arguments = tree.u32_property(provider, cells_property).unwrap_or(0);
        cell = cell.saturating_add(arguments as usize);
    }
    nodes
}

/// Whether node `index` refers to a removed node through a property the guest would follow.
fn references_removed(
    tree: &Tree<'_>,
    index: usize,
    phandles: &BTreeMap<u32, usize>,
    removed: &[bool],
) -> bool {
    let Some(node) = tree.node(index) else {
        return false;
    };
    node.properties.iter().any(|property| {
        let args_cells = match property.name {
            "interrupt-parent" => None,
            "clocks" => Some("#clock-cells"),
            name if name == "gpios" || name.ends_with("-gpios") => Some("#gpio-cells"),
            _ => return false,
        };
        referenced_nodes(tree, property.value, args_cells, phandles)
            .iter()
            .any(|&target| removed.get(target).copied().unwrap_or(false))
    })
}

/// Whether node `index` had children, lost them all, and holds nothing but `compatible`.
fn is_emptied_container(tree: &Tree<'_>, index: usize, removed: &[bool]) -> bool {
    let Some(node) = tree.node(index) else {
        return false;
    };
    !node.children.is_empty()
        && node
            .children
            .iter()
            .all(|&child| removed.get(child).copied().unwrap_or(false))
        && node
            .properties
            .iter()
            .all(|property| CONTAINER_ONLY_PROPERTIES.contains(&property.name))
}

/// Which nodes the guest does not see (memory nodes are replaced, not listed here).
fn removed_nodes(tree: &Tree<'_>, allowed: &[Region]) -> Vec<bool> {
    let count = tree.nodes.len();
    let mut removed = vec![false; count];
    for index in 1..count {
        if !removed[index] && !is_memory(tree, index) && has_forbidden_mmio(tree, index, allowed) {
            remove_subtree(tree, index, &mut removed);
        }
    }
    // Removals cascade (a key whose GPIO controller went, then the emptied key container), so
    // repeat until nothing changes; every round removes at least one node, so this ends.
    let phandles = tree.phandles();
    loop {
        let mut changed = false;
        for index in 1..count {
            if !removed[index]
                && (references_removed(tree, index, &phandles, &removed)
                    || is_emptied_container(tree, index, &removed))
            {
                remove_subtree(tree, index, &mut removed);
                changed = true;
            }
        }
        if !changed {
            return removed;
        }
    }
}

/// Encodes `value` in `cells` big-endian 32-bit cells.
fn encode_cells(
    out: &mut Vec<u8>,
    value: u64,
    cells: u32,
    property: &'static str,
) -> Result<(), DtError> {
    let too_wide = DtError::ValueTooWide {
        property,
        value,
        cells,
    };
    match cells {
        0 if value == 0 => {}
        0 => return Err(too_wide),
        1 => out.extend_from_slice(&u32::try_from(value).map_err(|_| too_wide)?.to_be_bytes()),
        _ => {
            for _ in 2..cells {
                out.extend_from_slice(&[0; 4]);
            }
            out.extend_from_slice(&value.to_be_bytes());
        }
    }
    Ok(())
}

/// The state of one rewrite: the host tree, the configuration and the removal decisions.
struct Editor<'t, 'a> {
    tree: &'t Tree<'a>,
    config: &'t GuestDtConfig<'t>,
    removed: &'t [bool],
    chosen: Option<usize>,
    aliases: Option<usize>,
}

impl Editor<'_, '_> {
    fn is_removed(&self, index: usize) -> bool {
        self.removed.get(index).copied().unwrap_or(true)
    }

    fn write_node(&self, writer: &mut FdtWriter, index: usize) -> Result<(), DtError> {
        let tree = self.tree;
        let Some(node) = tree.node(index) else {
            return Ok(());
        };
        let handle = writer.begin_node(node.name).map_err(write_error)?;
        let is_psci = PSCI_COMPATIBLES
            .iter()
            .any(|compatible| tree.is_compatible(index, compatible));
        let is_chosen = Some(index) == self.chosen;

        for property in &node.properties {
            let name = property.name;
            if DELETED_PROPERTIES.contains(&name) {
                continue;
            }
            if is_psci && name == "method" {
                writer.property_string(name, "hvc").map_err(write_error)?;
            } else if is_chosen && name == "bootargs" && self.config.bootargs.is_some() {
                // written below, with the other /chosen additions
            } else if is_chosen && (name == "linux,initrd-start" || name == "linux,initrd-end") {
                // stale without an initrd; rewritten below with one
            } else if Some(index) == self.aliases && self.alias_names_removed(property.value) {
                // the alias would name a node the guest does not have
            } else if name == "ranges" && tree.device_type(index) == Some("pci") {
                writer
                    .property(name, &self.pci_guest_ranges(index, property.value))
                    .map_err(write_error)?;
            } else if name == "reg" && is_gicv2(tree, index) {
                writer
                    .property(name, self.gicv2_guest_reg(index, property.value))
                    .map_err(write_error)?;
            } else {
                writer.property(name, property.value).map_err(write_error)?;
            }
        }
        if is_psci && tree.property(index, "method").is_none() {
            writer
                .property_string("method", "hvc")
                .map_err(write_error)?;
        }
        if is_chosen {
            self.write_chosen_additions(writer)?;
        }

        let mut memory_written = false;
        for &child in &node.children {
            if self.is_removed(child) {
                continue;
            }
            if is_memory(tree, child) {
                if index == ROOT && !memory_written {
                    self.write_memory(writer)?;
                    memory_written = true;
                }
                continue;
            }
            if index == ROOT && tree.node(child).is_some_and(|n| n.name == "hypervisor") {
                continue; // replaced by ours
            }
            self.write_node(writer, child)?;
        }
        if index == ROOT {
            if !memory_written {
                self.write_memory(writer)?;
            }
            let needs_chosen = self.config.initrd.is_some() || self.config.bootargs.is_some();
            if self.chosen.is_none() && needs_chosen {
                let chosen = writer.begin_node("chosen").map_err(write_error)?;
                self.write_chosen_additions(writer)?;
                writer.end_node(chosen).map_err(write_error)?;
            }
            self.write_hypervisor(writer)?;
        }
        writer.end_node(handle).map_err(write_error)
    }

    /// A GICv2 node's `reg` cut to the distributor and CPU interface.
    fn gicv2_guest_reg<'v>(&self, index: usize, value: &'v [u8]) -> &'v [u8] {
        let tree = self.tree;
        let Some(parent) = tree.node(index).and_then(|node| node.parent) else {
            return value;
        };
        let (address_cells, size_cells) = tree.child_cells(parent);
        let entry = 4 * (address_cells + size_cells) as usize;
        &value[..value.len().min(entry * GICV2_GUEST_REG_ENTRIES)]
    }

    /// A PCI host bridge's `ranges` with only the windows whose CPU range lies inside one
    /// allowed region; an entry that cannot be decoded or translated is left out.
    fn pci_guest_ranges(&self, index: usize, value: &[u8]) -> Vec<u8> {
        let tree = self.tree;
        let parent = tree
            .node(index)
            .and_then(|node| node.parent)
            .unwrap_or(ROOT);
        let (child_cells, size_cells) = tree.child_cells(index);
        let (parent_cells, _) = tree.child_cells(parent);
        let entry_bytes = 4 * (child_cells + parent_cells + size_cells) as usize;
        if entry_bytes == 0 {
            return Vec::new();
        }
        value
            .chunks_exact(entry_bytes)
            .filter(|entry| {
                let cpu = read_cells(entry, child_cells as usize, parent_cells).zip(read_cells(
                    entry,
                    (child_cells + parent_cells) as usize,
                    size_cells,
                ));
                cpu.and_then(|(base, size)| tree.translate(index, Region::new(base, size)))
                    .is_some_and(|window| {
                        self.config
                            .allowed_mmio
                            .iter()
                            .any(|region| region.contains_region(&window))
                    })
            })
            .flatten()
            .copied()
            .collect()
    }

    fn alias_names_removed(&self, value: &[u8]) -> bool {
        string_value(value)
            .and_then(|path| self.tree.find_path(path))
            .is_some_and(|target| self.is_removed(target))
    }

    fn write_chosen_additions(&self, writer: &mut FdtWriter) -> Result<(), DtError> {
        if let Some(bootargs) = self.config.bootargs {
            writer
                .property_string("bootargs", bootargs)
                .map_err(write_error)?;
        }
        if let Some(initrd) = self.config.initrd {
            let end = initrd.end().ok_or(DtError::InvalidConfig(
                "initrd wraps past the end of the address space",
            ))?;
            writer
                .property_u64("linux,initrd-start", initrd.base)
                .map_err(write_error)?;
            writer
                .property_u64("linux,initrd-end", end)
                .map_err(write_error)?;
        }
        Ok(())
    }

    fn write_memory(&self, writer: &mut FdtWriter) -> Result<(), DtError> {
        let (address_cells, size_cells) = self.tree.child_cells(ROOT);
        let ram = self.config.ram;
        let mut reg = Vec::new();
        encode_cells(&mut reg, ram.base, address_cells, "reg")?;
        encode_cells(&mut reg, ram.size, size_cells, "reg")?;
        let memory = writer
            .begin_node(&format!("memory@{:x}", ram.base))
            .map_err(write_error)?;
        writer
            .property_string("device_type", "memory")
            .map_err(write_error)?;
        writer.property("reg", &reg).map_err(write_error)?;
        writer.end_node(memory).map_err(write_error)
    }

    fn write_hypervisor(&self, writer: &mut FdtWriter) -> Result<(), DtError> {
        let (major, minor) = self.config.abi_version;
        let hypervisor = writer.begin_node("hypervisor").map_err(write_error)?;
        writer
            .property_string("compatible", DT_COMPATIBLE)
            .map_err(write_error)?;
        writer
            .property_array_u32("abi-version", &[major, minor])
            .map_err(write_error)?;
        writer.end_node(hypervisor).map_err(write_error)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::board::Board;
    use alloc::string::String;
    use proptest::prelude::*;

    const TWO_SERIALS: &[u8] = include_bytes!("../../tests/fixtures/qemu-virt-smp4-1g.dtb");
    const ONE_SERIAL: &[u8] =
        include_bytes!("../../tests/fixtures/qemu-virt-smp4-1g-one-serial.dtb");
    const SMALL: &[u8] = include_bytes!("../../tests/fixtures/qemu-virt-smp2-512m.dtb");
    const FIXTURES: [&[u8]; 3] = [TWO_SERIALS, ONE_SERIAL, SMALL];

    /// The MMIO a guest of QEMU virt is given: UART0, RTC, GIC distributor and
    /// redistributors, PCIe ECAM and the PCIe I/O, 32-bit and 64-bit windows.
    const VIRT_GUEST_MMIO: [Region; 8] = [
        Region::new(0x0900_0000, 0x1000),
        Region::new(0x0901_0000, 0x1000),
        Region::new(0x0800_0000, 0x1_0000),
        Region::new(0x080a_0000, 0xf6_0000),
        Region::new(0x40_1000_0000, 0x1000_0000),
        Region::new(0x3eff_0000, 0x1_0000),
        Region::new(0x1000_0000, 0x2eff_0000),
        Region::new(0x80_0000_0000, 0x80_0000_0000),
    ];
    const RAM: Region = Region::new(0x4000_0000, 0x1000_0000);
    const INITRD: Region = Region::new(0x4800_0000, 0x12_3400);

    fn standard_config() -> GuestDtConfig<'static> {
        GuestDtConfig {
            ram: RAM,
            initrd: Some(INITRD),
            bootargs: Some("console=ttyAMA0 earlycon"),
            allowed_mmio: &VIRT_GUEST_MMIO,
            abi_version: (1, 0),
        }
    }

    fn header(blob: &[u8], word: usize) -> u32 {
        be32(blob, word * 4).unwrap()
    }

    /// Checks the blob's layout: version 17, compact blocks, aligned reservation block,
    /// deduplicated strings, free space at the end, and that the `fdt` crate can walk it.
    fn assert_valid_layout(blob: &[u8]) {
        let total = header(blob, 1) as usize;
        let (structure, strings, reservations) = (
            header(blob, 2) as usize,
            header(blob, 3) as usize,
            header(blob, 4) as usize,
        );
        let (strings_size, structure_size) = (header(blob, 8) as usize, header(blob, 9) as usize);
        assert_eq!(header(blob, 0), 0xd00d_feed);
        assert_eq!(total, blob.len());
        assert_eq!((header(blob, 5), header(blob, 6)), (17, 16));
        assert_eq!(reservations % 8, 0);
        assert_eq!(reservations, 40);
        assert_eq!(structure, reservations + 16, "empty reservation block");
        assert_eq!(strings, structure + structure_size);
        assert_eq!(total, strings + strings_size + GUEST_DT_FREE_SPACE);
        assert!(blob[strings + strings_size..].iter().all(|&byte| byte == 0));
        let names: Vec<&[u8]> = blob[strings..strings + strings_size]
            .split(|&byte| byte == 0)
            .filter(|name| !name.is_empty())
            .collect();
        let mut unique = names.clone();
        unique.sort();
        unique.dedup();
        assert_eq!(names.len(), unique.len(), "strings are deduplicated");

        let parsed = fdt::Fdt::new(blob).unwrap();
        assert_eq!(parsed.total_size(), blob.len());
        assert!(parsed.all_nodes().count() > 0);
        Tree::parse(blob).unwrap();
    }

    fn node_names(blob: &[u8]) -> Vec<String> {
        let parsed = fdt::Fdt::new(blob).unwrap();
        parsed
            .all_nodes()
            .map(|node| node.name.to_string())
            .collect()
    }

    fn property<'b>(parsed: &'b fdt::Fdt<'b>, path: &str, name: &str) -> Option<&'b [u8]> {
        Some(parsed.find_node(path)?.property(name)?.value)
    }

    #[test]
    fn a_gicv2_keeps_its_distributor_and_cpu_interface_only() {
        const GICV2: &[u8] = include_bytes!("../../tests/fixtures/qemu-virt-gicv2-a53-smp2-1g.dtb");
        let board = crate::board::Board::from_fdt(GICV2).unwrap();
        let gic = board.gic.as_ref().unwrap();
        assert_eq!(gic.version, crate::board::GicVersion::V2);
        assert_eq!(gic.distributor, Region::new(0x0800_0000, 0x1_0000));
        assert_eq!(gic.cpu_interface, Some(Region::new(0x0801_0000, 0x1_0000)));
        assert!(gic.redistributors.is_empty() && gic.its.is_empty());
        let allowed = [
            gic.distributor,
            gic.cpu_interface.unwrap(),
            Region::new(0x0900_0000, 0x1000),
        ];
        let config = GuestDtConfig {
            allowed_mmio: &allowed,
            ..standard_config()
        };
        let blob = guest_device_tree(GICV2, &config).unwrap();
        assert_valid_layout(&blob);
        let parsed = fdt::Fdt::new(&blob).unwrap();
        let reg = property(&parsed, "/intc@8000000", "reg").expect("the GIC stays");
        let mut expected = Vec::new();
        for (base, size) in [(0x0800_0000u64, 0x1_0000u64), (0x0801_0000, 0x1_0000)] {
            expected.extend_from_slice(&base.to_be_bytes());
            expected.extend_from_slice(&size.to_be_bytes());
        }
        assert_eq!(reg, &expected[..], "GICH and GICV are cut");
        // Without the CPU interface allowed, the node goes.
        let config = GuestDtConfig {
            allowed_mmio: &allowed[..1],
            ..standard_config()
        };
        let blob = guest_device_tree(GICV2, &config).unwrap();
        assert!(!node_names(&blob).iter().any(|name| name == "intc@8000000"));
    }

    #[test]
    fn standard_guest_tree_has_every_edit() {
        let host = Tree::parse(TWO_SERIALS).unwrap();
        let blob = guest_device_tree(TWO_SERIALS, &standard_config()).unwrap();
        assert_valid_layout(&blob);
        let parsed = fdt::Fdt::new(&blob).unwrap();
        let names = node_names(&blob);

        for gone in [
            "flash@0",
            "fw-cfg@9020000",
            "smmuv3@9050000",
            "pl011@9040000",
            "its@8080000",
            "pl061@9030000",
            "gpio-keys",
            "poweroff",
        ] {
            assert!(!names.iter().any(|name| name == gone), "{gone} removed");
        }
        assert!(!names.iter().any(|name| name.starts_with("virtio_mmio")));
        for kept in [
            "pl011@9000000",
            "pl031@9010000",
            "intc@8000000",
            "pcie@10000000",
            "cpus",
            "cpu@3",
            "timer",
            "pmu",
            "apb-pclk",
            "psci",
            "chosen",
            "aliases",
            "hypervisor",
        ] {
            assert!(names.iter().any(|name| name == kept), "{kept} kept");
        }
        // platform-bus has no reg of its own (it is a bus with `ranges`), so it stays.
        assert!(names.iter().any(|name| name == "platform-bus@c000000"));

        let memory: Vec<_> = parsed
            .all_nodes()
            .filter(|node| {
                node.property("device_type")
                    .and_then(|p| p.as_str())
                    .is_some_and(|kind| kind == "memory")
            })
            .collect();
        assert_eq!(memory.len(), 1);
        assert_eq!(memory[0].name, "memory@40000000");
        assert_eq!(
            memory[0].property("reg").unwrap().value,
            [0, 0, 0, 0, 0x40, 0, 0, 0, 0, 0, 0, 0, 0x10, 0, 0, 0]
        );

        let pcie = parsed.find_node("/pcie@10000000").unwrap();
        for deleted in DELETED_PROPERTIES {
            assert!(pcie.property(deleted).is_none(), "{deleted} deleted");
        }
        assert!(pcie.property("interrupt-map").is_some());
        assert_eq!(property(&parsed, "/psci", "method"), Some(&b"hvc\0"[..]));

        assert_eq!(
            property(&parsed, "/chosen", "bootargs"),
            Some(&b"console=ttyAMA0 earlycon\0"[..])
        );
        assert_eq!(
            property(&parsed, "/chosen", "linux,initrd-start"),
            Some(&0x4800_0000u64.to_be_bytes()[..])
        );
        assert_eq!(
            property(&parsed, "/chosen", "linux,initrd-end"),
            Some(&0x4812_3400u64.to_be_bytes()[..])
        );
        let chosen = host.find_path("/chosen").unwrap();
        for kept in ["stdout-path", "rng-seed", "kaslr-seed"] {
            assert_eq!(
                property(&parsed, "/chosen", kept),
                host.property(chosen, kept)
            );
        }

        assert_eq!(
            property(&parsed, "/aliases", "serial0"),
            Some(&b"/pl011@9000000\0"[..])
        );
        assert_eq!(property(&parsed, "/aliases", "serial1"), None);

        assert_eq!(
            property(&parsed, "/hypervisor", "compatible"),
            Some(&b"stagehand,hypervisor\0"[..])
        );
        assert_eq!(
            property(&parsed, "/hypervisor", "abi-version"),
            Some(&[0, 0, 0, 1, 0, 0, 0, 0][..])
        );
    }

    /// Every node of the output that the edits do not touch has exactly the host's properties,
    /// in the host's order.
    #[test]
    fn untouched_nodes_are_verbatim() {
        let host = Tree::parse(TWO_SERIALS).unwrap();
        let blob = guest_device_tree(TWO_SERIALS, &standard_config()).unwrap();
        let guest = Tree::parse(&blob).unwrap();
        let edited = [
            "/psci",
            "/chosen",
            "/aliases",
            "/pcie@10000000",
            "/hypervisor",
        ];
        let mut compared = 0;
        for index in 0..guest.nodes.len() {
            let path = guest.path(index);
            if edited.contains(&path.as_str()) || path.starts_with("/memory") {
                continue;
            }
            let host_index = host.find_path(&path).unwrap();
            let pairs = |tree: &Tree<'_>, i: usize| -> Vec<(String, Vec<u8>)> {
                tree.node(i)
                    .unwrap()
                    .properties
                    .iter()
                    .map(|p| (p.name.to_string(), p.value.to_vec()))
                    .collect()
            };
            assert_eq!(pairs(&guest, index), pairs(&host, host_index), "{path}");
            compared += 1;
        }
        assert!(compared > 15);
        assert_eq!(guest.boot_cpuid_phys, host.boot_cpuid_phys);
    }

    #[test]
    fn without_initrd_or_bootargs_chosen_keeps_its_own() {
        let config = GuestDtConfig {
            initrd: None,
            bootargs: None,
            ..standard_config()
        };
        let blob = guest_device_tree(ONE_SERIAL, &config).unwrap();
        assert_valid_layout(&blob);
        let parsed = fdt::Fdt::new(&blob).unwrap();
        assert!(property(&parsed, "/chosen", "linux,initrd-start").is_none());
        assert!(property(&parsed, "/chosen", "linux,initrd-end").is_none());
        let host = Tree::parse(ONE_SERIAL).unwrap();
        let chosen = host.find_path("/chosen").unwrap();
        assert_eq!(
            property(&parsed, "/chosen", "bootargs"),
            host.property(chosen, "bootargs")
        );
    }

    #[test]
    fn everything_allowed_keeps_every_device() {
        let config = GuestDtConfig {
            allowed_mmio: &[Region::new(0, u64::MAX)],
            ..standard_config()
        };
        let blob = guest_device_tree(TWO_SERIALS, &config).unwrap();
        assert_valid_layout(&blob);
        let names = node_names(&blob);
        for kept in [
            "flash@0",
            "fw-cfg@9020000",
            "gpio-keys",
            "poweroff",
            "its@8080000",
        ] {
            assert!(names.iter().any(|name| name == kept), "{kept} kept");
        }
        assert_eq!(
            names
                .iter()
                .filter(|n| n.starts_with("virtio_mmio"))
                .count(),
            32
        );
        let parsed = fdt::Fdt::new(&blob).unwrap();
        assert!(property(&parsed, "/aliases", "serial1").is_some());
    }

    #[test]
    fn nothing_allowed_still_gives_a_valid_tree() {
        let config = GuestDtConfig {
            allowed_mmio: &[],
            ..standard_config()
        };
        let blob = guest_device_tree(TWO_SERIALS, &config).unwrap();
        assert_valid_layout(&blob);
        let names = node_names(&blob);
        // The GIC is gone, so is every node that names it as its interrupt parent.
        assert!(!names.iter().any(|name| name == "intc@8000000"));
        assert!(!names.iter().any(|name| name == "platform-bus@c000000"));
        assert!(names.iter().any(|name| name == "memory@40000000"));
        assert!(names.iter().any(|name| name == "hypervisor"));
    }

    #[test]
    fn guest_tree_reads_back_as_a_board() {
        for fixture in FIXTURES {
            let blob = guest_device_tree(fixture, &standard_config()).unwrap();
            let board = Board::from_fdt(&blob).unwrap();
            assert_eq!(board.memory, [RAM]);
            assert_eq!(board.uarts.len(), 1);
            assert_eq!(board.fw_cfg, None);
            assert_eq!(board.smmu, None);
            assert!(board.flash.is_empty());
            assert_eq!(board.gic.as_ref().unwrap().its, []);
            assert_eq!(board.pcie.as_ref().unwrap().iommu_map, []);
            assert_eq!(board.psci_method, Some(crate::board::PsciMethod::Hvc));
            // Editing the edited tree again changes nothing but the free space it drops.
            let again = guest_device_tree(&blob, &standard_config()).unwrap();
            assert_eq!(again, blob);
        }
    }

    /// On a CPU whose IPA space ends below QEMU's 64-bit PCIe window (cortex-a53: 40-bit PA,
    /// a 39-bit stage 2), the hypervisor does not map that window: the guest's `ranges` must
    /// not offer it, or Linux puts BARs there and faults on them.
    #[test]
    fn pci_windows_outside_the_allowed_mmio_are_cut_from_ranges() {
        let below_39_bits: Vec<Region> = VIRT_GUEST_MMIO
            .iter()
            .copied()
            .filter(|region| region.base < 1 << 39)
            .collect();
        let config = GuestDtConfig {
            allowed_mmio: &below_39_bits,
            ..standard_config()
        };
        for fixture in FIXTURES {
            let all = Board::from_fdt(&guest_device_tree(fixture, &standard_config()).unwrap())
                .unwrap()
                .pcie
                .unwrap()
                .windows;
            assert_eq!(all, Board::from_fdt(fixture).unwrap().pcie.unwrap().windows);
            let cut = Board::from_fdt(&guest_device_tree(fixture, &config).unwrap())
                .unwrap()
                .pcie
                .unwrap()
                .windows;
            let expected: Vec<_> = all
                .iter()
                .filter(|w| w.cpu_base < 1 << 39)
                .cloned()
                .collect();
            assert_eq!(cut, expected);
            assert_eq!(cut.len(), 2);
        }
    }

    #[test]
    fn memory_cells_follow_the_root() {
        let mut writer = FdtWriter::new().unwrap();
        let root = writer.begin_node("").unwrap();
        writer.property_u32("#address-cells", 1).unwrap();
        writer.property_u32("#size-cells", 1).unwrap();
        let memory = writer.begin_node("memory@80000000").unwrap();
        writer.property_string("device_type", "memory").unwrap();
        writer
            .property_array_u32("reg", &[0x8000_0000, 0x1000_0000])
            .unwrap();
        writer.end_node(memory).unwrap();
        writer.end_node(root).unwrap();
        let host = writer.finish().unwrap();

        let config = GuestDtConfig {
            initrd: None,
            bootargs: Some("quiet"),
            ..standard_config()
        };
        let blob = guest_device_tree(&host, &config).unwrap();
        assert_valid_layout(&blob);
        let parsed = fdt::Fdt::new(&blob).unwrap();
        assert_eq!(
            property(&parsed, "/memory@40000000", "reg"),
            Some(&[0x40, 0, 0, 0, 0x10, 0, 0, 0][..])
        );
        assert!(property(&parsed, "/memory@80000000", "reg").is_none());
        // No /chosen in the host tree: one is created for the bootargs.
        assert_eq!(
            property(&parsed, "/chosen", "bootargs"),
            Some(&b"quiet\0"[..])
        );

        let high = GuestDtConfig {
            ram: Region::new(0x1_0000_0000, 0x1000_0000),
            ..config
        };
        assert_eq!(
            guest_device_tree(&host, &high),
            Err(DtError::ValueTooWide {
                property: "reg",
                value: 0x1_0000_0000,
                cells: 1
            })
        );
    }

    #[test]
    fn bad_configurations_are_errors() {
        let cases = [
            (
                GuestDtConfig {
                    ram: Region::new(0x4000_0000, 0),
                    ..standard_config()
                },
                "guest device tree: guest RAM is empty",
            ),
            (
                GuestDtConfig {
                    ram: Region::new(u64::MAX, 2),
                    ..standard_config()
                },
                "guest device tree: guest RAM wraps past the end of the address space",
            ),
            (
                GuestDtConfig {
                    initrd: Some(Region::new(u64::MAX - 1, 4)),
                    ..standard_config()
                },
                "guest device tree: initrd wraps past the end of the address space",
            ),
            (
                GuestDtConfig {
                    bootargs: Some("a\0b"),
                    ..standard_config()
                },
                "guest device tree: cannot write blob: Strings cannot contain NUL",
            ),
        ];
        for (config, message) in cases {
            let error = guest_device_tree(TWO_SERIALS, &config).unwrap_err();
            assert_eq!(error.to_string(), message);
        }
        assert_eq!(
            guest_device_tree(&TWO_SERIALS[..100], &standard_config()),
            Err(DtError::Truncated)
        );
    }

    proptest! {
        /// Any subset of the fixture's MMIO regions, any RAM and initrd: the output is a valid
        /// blob, and every node with MMIO in it lies inside the allowed set.
        #[test]
        fn output_is_always_a_valid_fdt(
            fixture in 0..FIXTURES.len(),
            mask in any::<u64>(),
            ram_base_pages in 0u64..0x10_0000,
            ram_pages in 1u64..0x10_0000,
            initrd in proptest::option::of((0u64..0x1_0000_0000, 0u64..0x100_0000)),
            bootargs in proptest::option::of("[ -~]{0,64}"),
        ) {
            let host = FIXTURES[fixture];
            let candidates = mmio_of(host);
            let allowed: Vec<Region> = candidates
                .iter()
                .enumerate()
                .filter(|(i, _)| mask & (1 << (i % 64)) != 0)
                .map(|(_, region)| *region)
                .collect();
            let config = GuestDtConfig {
                ram: Region::new(ram_base_pages << 12, ram_pages << 12),
                initrd: initrd.map(|(base, size)| Region::new(base, size)),
                bootargs: bootargs.as_deref(),
                allowed_mmio: &allowed,
                abi_version: (1, 0),
            };
            let blob = guest_device_tree(host, &config).unwrap();
            assert_valid_layout(&blob);
            let guest = Tree::parse(&blob).unwrap();
            for index in 0..guest.nodes.len() {
                if is_memory(&guest, index) {
                    continue;
                }
                if let Some(entries) = guest.reg(index).unwrap() {
                    let parent = guest.node(index).unwrap().parent.unwrap();
                    if guest.child_cells(parent).1 == 0 {
                        continue;
                    }
                    for entry in entries {
                        let physical = guest.translate(index, entry).unwrap();
                        prop_assert!(allowed.iter().any(|r| r.contains_region(&physical)));
                    }
                }
            }
        }

        /// Damaged blobs give errors, never panics.
        #[test]
        fn damaged_blobs_never_panic(
            fixture in 0..FIXTURES.len(),
            edits in proptest::collection::vec((any::<usize>(), any::<u8>()), 1..8),
            cut in proptest::option::of(0usize..0x2000),
        ) {
            // QEMU pads its blob to 1 MiB; drop the padding so that edits land in the blocks.
            let host = FIXTURES[fixture];
            let used = (header(host, 3) + header(host, 8)) as usize;
            let mut blob = host[..used].to_vec();
            blob[4..8].copy_from_slice(&(used as u32).to_be_bytes());
            prop_assert!(guest_device_tree(&blob, &standard_config()).is_ok());
            for (offset, byte) in edits {
                blob[offset % used] = byte;
            }
            if let Some(cut) = cut {
                blob.truncate(cut);
            }
            let _ = guest_device_tree(&blob, &standard_config());
            let _ = Board::from_fdt(&blob);
        }
    }

    /// Every MMIO region named by a `reg` in the blob, translated to CPU addresses.
    fn mmio_of(blob: &[u8]) -> Vec<Region> {
        let tree = Tree::parse(blob).unwrap();
        let mut regions = Vec::new();
        for index in 1..tree.nodes.len() {
            let parent = tree.node(index).unwrap().parent.unwrap();
            if tree.child_cells(parent).1 == 0 || is_memory(&tree, index) {
                continue;
            }
            for entry in tree.reg(index).unwrap().unwrap_or_default() {
                regions.push(tree.translate(index, entry).unwrap());
            }
        }
        regions
    }
}
