//! Stage-1 tables the hypervisor must walk in memory the guest does not own. The guest points
//! the level-1 entry of VA 0x32_0000_0000 at an IPA where no RAM is (MMIO nothing answers,
//! flash, fw_cfg, the SMMU, the hypervisor's UART, past RAM, a trapped redistributor page) and
//! asks the hypervisor to use that VA: MEM_QUERY_VA (read and write), CACHE_OP by VA and
//! CACHE_OP_BATCH with a VA entry. Each call must answer an error status, and the hypervisor
//! must live on. The guest itself never touches the VA.

use alloc::format;
use alloc::string::String;

use guest_rt::mmu;
use guest_rt::{check, println};
use stagehand_abi::{cache_op, function};

use super::alive;
use crate::{hypercall, status_name};

/// The VA whose walk is aimed at hostile tables (level-1 index 200, far from the runtime's).
const VA: usize = 0x32_0000_0000;

fn attack(table_ipa: usize) -> Result<(), String> {
    mmu::set_raw_table_entry(VA, 1, Some(table_ipa))
        .map_err(|e| format!("writing the level-1 entry: {e:?}"))?;
    let result = calls(table_ipa);
    mmu::set_raw_table_entry(VA, 1, None)
        .map_err(|e| format!("removing the level-1 entry: {e:?}"))?;
    result?;
    alive(&format!("walks through a table at {table_ipa:#x}"))
}

fn calls(table_ipa: usize) -> Result<(), String> {
    let mut batch = [0u64; 3];
    batch[0] = VA as u64;
    batch[1] = 64;
    batch[2] = cache_op::CLEAN | cache_op::FLAG_VA;
    let attempts: [(&str, u32, [u64; 3]); 5] = [
        (
            "MEM_QUERY_VA read",
            function::MEM_QUERY_VA,
            [VA as u64, 0, 0],
        ),
        (
            "MEM_QUERY_VA write",
            function::MEM_QUERY_VA,
            [VA as u64, 1, 0],
        ),
        (
            "CACHE_OP CLEAN by VA",
            function::CACHE_OP,
            [VA as u64, 4096, cache_op::CLEAN | cache_op::FLAG_VA],
        ),
        (
            "CACHE_OP INVALIDATE by VA",
            function::CACHE_OP,
            [VA as u64, 64, cache_op::INVALIDATE | cache_op::FLAG_VA],
        ),
        (
            "CACHE_OP_BATCH with a VA entry",
            function::CACHE_OP_BATCH,
            [batch.as_ptr() as u64, 1, 0],
        ),
    ];
    for (what, id, args) in attempts {
        let regs = hypercall(id, &args);
        println!(
            "hostile: table at {table_ipa:#x}: {what}: {}",
            status_name(regs.x0)
        );
        check!(
            (regs.x0 as i64) < 0,
            "{what} of {VA:#x} (level-1 table at {table_ipa:#x}) answered {} (x1 {:#x}), expected an error",
            status_name(regs.x0),
            regs.x1
        );
    }
    Ok(())
}

pub(crate) fn table_in_gicr_hole_0x080d0000() -> Result<(), String> {
    attack(0x080d_0000)
}

pub(crate) fn table_in_flash() -> Result<(), String> {
    attack(0)
}

pub(crate) fn table_in_fw_cfg() -> Result<(), String> {
    attack(0x0902_0000)
}

pub(crate) fn table_in_smmu() -> Result<(), String> {
    attack(0x0905_0000)
}

pub(crate) fn table_in_hypervisor_uart() -> Result<(), String> {
    attack(0x0904_0000)
}

pub(crate) fn table_past_ram() -> Result<(), String> {
    attack(guest_rt::dt::main_ram().end())
}

pub(crate) fn table_in_trapped_gicr_page() -> Result<(), String> {
    match guest_rt::dt::boot_info().gic_redistributors {
        Some(region) => attack(region.base),
        // A GICv2 has no redistributor: attack through its virtualization interface (GICH at
        // the distributor + 0x30000 on virt), which stays the hypervisor's and is unmapped.
        None => attack(0x0803_0000),
    }
}
