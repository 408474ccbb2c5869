//! Suite `dt`: the device tree the hypervisor hands its guest. Its RAM, no trace of the devices
//! the hypervisor keeps for itself, PSCI over HVC, the hypervisor node, initrd and bootargs.
#![no_std]
#![no_main]

extern crate alloc;

use alloc::string::String;
use alloc::vec::Vec;

use guest_rt::{check, check_eq};
use guest_suites::{dt_initrd_byte, DT_BOOTARGS, DT_INITRD_LEN};

guest_rt::main!(main);

fn main() -> ! {
    guest_rt::test::run_suite(
        "dt",
        &guest_rt::tests![
            memory_is_exactly_guest_ram,
            no_smmu,
            no_iommu_or_msi_map_on_pcie,
            no_flash,
            no_fw_cfg,
            one_pl011,
            no_its,
            no_virtio_mmio,
            psci_method_hvc,
            hypervisor_node,
            initrd_present_and_readable,
            bootargs_from_append,
        ],
    )
}

/// The RAM the runner gives this suite (`ram=256M`).
const EXPECTED_RAM: (usize, usize) = (0x4000_0000, 256 << 20);

/// Paths of every node whose `compatible` list contains `compatible`.
fn nodes_compatible_with(compatible: &str) -> Vec<String> {
    let tree = guest_rt::dt::tree();
    tree.all_nodes()
        .filter(|node| {
            node.compatible()
                .is_some_and(|c| c.all().any(|s| s == compatible))
        })
        .map(|node| String::from(node.name))
        .collect()
}

fn none_compatible(compatible: &str) -> Result<(), String> {
    let found = nodes_compatible_with(compatible);
    check!(
        found.is_empty(),
        "nodes compatible with {:?} remain: {:?}",
        compatible,
        found
    );
    Ok(())
}

fn memory_is_exactly_guest_ram() -> Result<(), String> {
    let tree = guest_rt::dt::tree();
    let memory_nodes: Vec<_> = tree
        .all_nodes()
        .filter(|n| n.name.split('@').next() == Some("memory"))
        .collect();
    check_eq!(memory_nodes.len(), 1, "memory nodes");
    let regions: Vec<(usize, usize)> = tree
        .memory()
        .regions()
        .map(|r| (r.starting_address as usize, r.size.unwrap_or(0)))
        .collect();
    check_eq!(
        regions,
        alloc::vec![EXPECTED_RAM],
        "memory node regions (base, size)"
    );
    Ok(())
}

fn no_smmu() -> Result<(), String> {
    none_compatible("arm,smmu-v3")
}

fn no_iommu_or_msi_map_on_pcie() -> Result<(), String> {
    let tree = guest_rt::dt::tree();
    for node in tree.all_nodes() {
        let is_pcie = node
            .compatible()
            .is_some_and(|c| c.all().any(|s| s == "pci-host-ecam-generic"));
        if !is_pcie {
            continue;
        }
        for property in ["iommu-map", "msi-map"] {
            check!(
                node.property(property).is_none(),
                "{} still has {}",
                node.name,
                property
            );
        }
    }
    Ok(())
}

fn no_flash() -> Result<(), String> {
    none_compatible("cfi-flash")
}

fn no_fw_cfg() -> Result<(), String> {
    none_compatible("qemu,fw-cfg-mmio")
}

fn one_pl011() -> Result<(), String> {
    let found = nodes_compatible_with("arm,pl011");
    check_eq!(found.len(), 1, "PL011 nodes ({:?})", found);
    Ok(())
}

fn no_its() -> Result<(), String> {
    none_compatible("arm,gic-v3-its")
}

fn no_virtio_mmio() -> Result<(), String> {
    none_compatible("virtio,mmio")
}

fn psci_method_hvc() -> Result<(), String> {
    let tree = guest_rt::dt::tree();
    let psci = tree.all_nodes().find(|n| {
        n.compatible()
            .is_some_and(|c| c.all().any(|s| s.starts_with("arm,psci")))
    });
    let Some(psci) = psci else {
        return Err(String::from("no PSCI node"));
    };
    let method = psci.property("method").and_then(|p| p.as_str());
    check_eq!(method, Some("hvc"), "PSCI method");
    Ok(())
}

fn hypervisor_node() -> Result<(), String> {
    let tree = guest_rt::dt::tree();
    let Some(node) = tree.find_node(stagehand_abi::DT_NODE_PATH) else {
        return Err(String::from("no /hypervisor node"));
    };
    let compatible: Vec<&str> = node
        .compatible()
        .map(|c| c.all().collect())
        .unwrap_or_default();
    check!(
        compatible.contains(&stagehand_abi::DT_COMPATIBLE),
        "/hypervisor compatible is {:?}",
        compatible
    );
    let Some(version) = node.property("abi-version") else {
        return Err(String::from("/hypervisor has no abi-version"));
    };
    let cells: Vec<u32> = version
        .value
        .chunks(4)
        .map(|c| u32::from_be_bytes([c[0], c[1], c[2], *c.get(3).unwrap_or(&0)]))
        .collect();
    check_eq!(
        cells,
        alloc::vec![
            stagehand_abi::ABI_MAJOR as u32,
            stagehand_abi::ABI_MINOR as u32
        ],
        "abi-version cells"
    );
    Ok(())
}

/// Reads a 32- or 64-bit cell value of a /chosen property.
fn chosen_address(name: &str) -> Option<usize> {
    let tree = guest_rt::dt::tree();
    let property = tree.find_node("/chosen")?.property(name)?;
    match property.value.len() {
        4 => Some(u32::from_be_bytes(property.value.try_into().ok()?) as usize),
        8 => Some(u64::from_be_bytes(property.value.try_into().ok()?) as usize),
        _ => None,
    }
}

fn initrd_present_and_readable() -> Result<(), String> {
    let (Some(start), Some(end)) = (
        chosen_address("linux,initrd-start"),
        chosen_address("linux,initrd-end"),
    ) else {
        return Err(String::from("linux,initrd-start/-end missing from /chosen"));
    };
    check_eq!(
        end.wrapping_sub(start),
        DT_INITRD_LEN,
        "initrd size (start {:#x}, end {:#x})",
        start,
        end
    );
    let ram = guest_rt::dt::main_ram();
    check!(
        ram.contains(start) && end <= ram.end(),
        "initrd {:#x}..{:#x} outside RAM {:?}",
        start,
        end,
        ram
    );
    for index in 0..DT_INITRD_LEN {
        let byte = guest_rt::probe::read_u8(start + index).map_err(|abort| {
            alloc::format!("initrd byte {index} at {:#x}: {:?}", start + index, abort)
        })?;
        check_eq!(
            byte,
            dt_initrd_byte(index),
            "initrd byte {} at {:#x}",
            index,
            start + index
        );
    }
    Ok(())
}

fn bootargs_from_append() -> Result<(), String> {
    let tree = guest_rt::dt::tree();
    check_eq!(
        tree.chosen().bootargs(),
        Some(DT_BOOTARGS),
        "/chosen/bootargs"
    );
    Ok(())
}
