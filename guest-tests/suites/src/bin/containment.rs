//! Suite `containment`: the guest tries to reach IPAs it does not own. Each read and write must
//! give it a synchronous external abort (and nothing else), an instruction fetch from an unmapped
//! IPA an instruction abort, and afterwards the hypervisor still answers hypercalls.
#![no_std]
#![no_main]

extern crate alloc;

use alloc::format;
use alloc::string::String;

use guest_rt::mmu::{self, MemoryType};
use guest_rt::probe::{self, Abort};
use guest_rt::{check, check_eq};
use stagehand_abi::function;

guest_rt::main!(main);

fn main() -> ! {
    guest_rt::test::run_suite(
        "containment",
        &guest_rt::tests![
            flash_bank_0,
            flash_bank_1,
            fw_cfg,
            smmu,
            second_uart,
            gic_its,
            virtio_mmio,
            first_page_past_ram,
            ram_end_plus_512m,
            just_under_2_pow_44,
            instruction_fetch_from_unmapped_ipa,
            pcie_only_behind_an_smmu,
            hypervisor_still_answers,
        ],
    )
}

/// Checks that `abort` is a synchronous external data abort reported for `addr`.
fn expect_external_data_abort(
    what: &str,
    addr: usize,
    result: Result<(), Abort>,
) -> Result<(), String> {
    let Err(abort) = result else {
        return Err(format!("{what} at {addr:#x} did not fault"));
    };
    check!(
        abort.is_external_data_abort(),
        "{} at {:#x}: expected a synchronous external data abort (EC 0x25, DFSC 0x10), got {:?}",
        what,
        addr,
        abort
    );
    // FAR is only meaningful when ESR.FnV (bit 10) is clear.
    if abort.esr & (1 << 10) == 0 {
        check_eq!(abort.far as usize, addr, "{} FAR", what);
    }
    Ok(())
}

/// Maps `addr`'s page as Device (so that stage 1 lets the access through to stage 2), then
/// reads and writes it; both must abort. `value` is what the write stores (harmless for the
/// device that lives there, should the hypervisor wrongly let it through).
fn probe_ipa(addr: usize, value: u32) -> Result<(), String> {
    mmu::map_identity(addr, mmu::PAGE_SIZE, MemoryType::Device)
        .map_err(|e| format!("mapping {addr:#x}: {e:?}"))?;
    expect_external_data_abort("read", addr, probe::read_u32(addr).map(|_| ()))?;
    expect_external_data_abort("write", addr, probe::write_u32(addr, value))?;
    Ok(())
}

/// CFI flash command "read array": the one write that cannot change the flash's mode.
const FLASH_SAFE: u32 = 0xff;

fn flash_bank_0() -> Result<(), String> {
    probe_ipa(0x0, FLASH_SAFE)
}

fn flash_bank_1() -> Result<(), String> {
    probe_ipa(0x0400_0000, FLASH_SAFE)
}

fn fw_cfg() -> Result<(), String> {
    probe_ipa(0x0902_0000, 0)
}

fn smmu() -> Result<(), String> {
    probe_ipa(0x0905_0000, 0)
}

fn second_uart() -> Result<(), String> {
    probe_ipa(0x0904_0000, u32::from(b'!'))
}

fn gic_its() -> Result<(), String> {
    probe_ipa(0x0808_0000, 0)
}

fn virtio_mmio() -> Result<(), String> {
    probe_ipa(0x0a00_0000, 0)
}

fn first_page_past_ram() -> Result<(), String> {
    probe_ipa(guest_rt::dt::main_ram().end(), 0)
}

fn ram_end_plus_512m() -> Result<(), String> {
    probe_ipa(guest_rt::dt::main_ram().end() + (512 << 20), 0)
}

/// The top page of the IPA space, or of the 44 bits the virt board uses, whichever is lower
/// (a 40-bit CPU's own stage 1 cannot even name an address above its PA size).
fn just_under_2_pow_44() -> Result<(), String> {
    let parange: u64;
    // SAFETY: reading an ID register has no side effects.
    unsafe {
        core::arch::asm!("mrs {}, id_aa64mmfr0_el1", out(reg) parange, options(nomem, nostack))
    };
    let bits = match parange & 0xf {
        0 => 32,
        1 => 36,
        2 => 40,
        3 => 42,
        _ => 44,
    };
    probe_ipa((1 << bits) - mmu::PAGE_SIZE, 0)
}

/// On a board without an SMMU the guest must get no PCIe (its devices' DMA could not be
/// contained): no host bridge in its device tree, and the 32-bit PCIe window of `virt` (where
/// the bridge would put device registers) aborts. The runner says which board this is with
/// `stagehand.expect_pcie=off` on the command line; without it, the guest has the bridge.
fn pcie_only_behind_an_smmu() -> Result<(), String> {
    let tree = guest_rt::dt::tree();
    let bootargs = tree.chosen().bootargs().unwrap_or("");
    let expect_pcie = !bootargs
        .split_whitespace()
        .any(|arg| arg == "stagehand.expect_pcie=off");
    let has_bridge = tree.find_compatible(&["pci-host-ecam-generic"]).is_some();
    check_eq!(
        has_bridge,
        expect_pcie,
        "PCIe host bridge in the device tree"
    );
    if !expect_pcie {
        probe_ipa(0x1000_0000, 0)?;
    }
    Ok(())
}

fn instruction_fetch_from_unmapped_ipa() -> Result<(), String> {
    let target = guest_rt::dt::main_ram().end() + (256 << 20);
    // Executable at stage 1, so that only stage 2 can stop the fetch.
    mmu::map_identity(target, mmu::PAGE_SIZE, MemoryType::NormalWriteBack)
        .map_err(|e| format!("mapping {target:#x}: {e:?}"))?;
    // SAFETY: the target IPA is outside the guest's RAM: the fetch faults and the probe resumes.
    let result = unsafe { probe::execute(target) };
    let Err(abort) = result else {
        return Err(format!("branch to {target:#x} did not fault"));
    };
    check!(
        abort.is_external_instruction_abort(),
        "fetch at {:#x}: expected a synchronous external instruction abort (EC 0x21, IFSC 0x10), got {:?}",
        target,
        abort
    );
    Ok(())
}

fn hypervisor_still_answers() -> Result<(), String> {
    let regs = guest_suites::hypercall(function::REVISION, &[]);
    check_eq!(
        (regs.x0, regs.x1),
        (stagehand_abi::ABI_MAJOR, stagehand_abi::ABI_MINOR),
        "REVISION after the probes"
    );
    Ok(())
}
