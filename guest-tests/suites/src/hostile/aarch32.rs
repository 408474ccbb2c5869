//! An abort the hypervisor injects into AArch32 EL0 must be taken at VBAR_EL1 + 0x600 (lower
//! EL, AArch32), not + 0x400. A tiny A32 program at EL0 (`ldr r0, [r1]; svc #0`) loads from a
//! VA that stage 1 maps to an IPA stage 2 does not (the hole above RAM). Runs only where the CPU
//! has AArch32 EL0 (ID_AA64PFR0_EL1.EL0 == 2); elsewhere it passes with a printed reason.

use alloc::format;
use alloc::string::String;

use guest_rt::el0::{self, Entry};
use guest_rt::mmu::{self, MemoryType};
use guest_rt::{check_eq, println, read_sysreg};

use super::stubs;

/// VAs below 4 GiB (AArch32 reaches no higher) for the code and the data page.
const CODE_VA: usize = 0xf000_0000;
const DATA_VA: usize = 0xf010_0000;

pub(crate) fn abort_into_aarch32_el0_uses_the_aarch32_vector() -> Result<(), String> {
    let el0_field = read_sysreg!(id_aa64pfr0_el1) & 0xf;
    if el0_field != 2 {
        println!("hostile: skipped: no AArch32 at EL0 (ID_AA64PFR0_EL1.EL0 = {el0_field})");
        return Ok(());
    }
    let target = guest_rt::dt::main_ram().end() + (64 << 20);
    mmu::map_user(
        CODE_VA,
        stubs::base() + stubs::A32_LOAD,
        4096,
        MemoryType::NormalWriteBack,
    )
    .map_err(|e| format!("mapping the A32 code: {e:?}"))?;
    mmu::map_user(DATA_VA, target, 4096, MemoryType::Device)
        .map_err(|e| format!("mapping the data page: {e:?}"))?;
    // SAFETY: the generated A32 stub: a load that faults, then an SVC.
    let exit = unsafe { el0::run(CODE_VA, 0, Entry::aarch32(0, DATA_VA as u64)) };
    println!("hostile: AArch32 EL0 load from IPA {target:#x}: {exit:x?}");
    check_eq!(
        exit.vector,
        el0::VECTOR_LOWER_AARCH32,
        "vector of the abort (ESR {:#x})",
        exit.esr
    );
    // A data abort from a lower EL, synchronous external.
    check_eq!(
        (exit.class(), exit.esr & 0x3f),
        (0x24, 0x10),
        "ESR class and DFSC"
    );
    super::alive("the AArch32 abort")
}
