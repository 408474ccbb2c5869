//! Suite `discovery`: the calls a guest driver makes first: CALL_UID, REVISION, FEATURES, and
//! the answer to an unknown ID in the hypervisor's vendor range.
#![no_std]
#![no_main]

extern crate alloc;

use alloc::string::String;

use guest_rt::{check, check_eq, println};
use guest_suites::{hypercall, status};
use stagehand_abi::{function, Status};

guest_rt::main!(main);

fn main() -> ! {
    guest_rt::test::run_suite(
        "discovery",
        &guest_rt::tests![
            call_uid,
            revision,
            features,
            unknown_vendor_id_not_supported
        ],
    )
}

fn call_uid() -> Result<(), String> {
    let regs = hypercall(function::CALL_UID, &[]);
    let words = [
        regs.x0 as u32,
        regs.x1 as u32,
        regs.x2 as u32,
        regs.x3 as u32,
    ];
    check_eq!(words, stagehand_abi::uuid_words(), "CALL_UID w0-w3");
    Ok(())
}

fn revision() -> Result<(), String> {
    let regs = hypercall(function::REVISION, &[]);
    check_eq!(
        (regs.x0, regs.x1),
        (stagehand_abi::ABI_MAJOR, stagehand_abi::ABI_MINOR),
        "REVISION (major, minor)"
    );
    Ok(())
}

fn features() -> Result<(), String> {
    let regs = hypercall(function::FEATURES, &[]);
    check_eq!(
        regs.status(),
        Some(Status::Success),
        "FEATURES status (x0 = {})",
        status(&regs)
    );
    let line = guest_rt::arch::dcache_line_size() as u64;
    check_eq!(
        regs.x2,
        line,
        "FEATURES x2 (D-cache line bytes; CTR_EL0 says {})",
        line
    );
    check!(regs.x3 != 0, "FEATURES x3 (work budget per call) is zero");
    println!(
        "discovery: capabilities {:#x}, D-cache line {} bytes, budget {} bytes",
        regs.x1, regs.x2, regs.x3
    );
    Ok(())
}

fn unknown_vendor_id_not_supported() -> Result<(), String> {
    for id in [0xC600_0FFF_u32, 0x8600_0FFF, 0xC600_0002] {
        let regs = hypercall(id, &[1, 2, 3]);
        check_eq!(
            regs.status(),
            Some(Status::NotSupported),
            "function {:#x} (x0 = {})",
            id,
            status(&regs)
        );
    }
    Ok(())
}
