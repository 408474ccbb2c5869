//! Suite `smmu`: DMA through the hypervisor-owned SMMU with QEMU's `edu` device (started with
//! `-device edu,addr=02.0,dma_mask=0xffffffffffffffff`), in the default shared mode: the device
//! reaches guest RAM by IPA (IOVA = IPA), and nothing else. The edu driver is
//! `guest_suites::edu`; the tests run DMAs of one page. A blocked DMA leaves no
//! trace the guest can see except what the device read (zeros) or did not write; the
//! hypervisor's log shows the SMMU fault records. Each edu DMA takes 100 ms of virtual time.
#![no_std]
#![no_main]

extern crate alloc;

use alloc::string::String;

use guest_rt::{check, check_eq};
use guest_suites::edu::{self, clean_invalidate, page, read_volatile, Edu};
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

const PAGE: usize = 4096;

/// Device buffer <- RAM at `ipa` (one page), then RAM page <- device buffer: what the device
/// read at `ipa`.
fn device_reads(edu: Edu, ipa: u64) -> Result<&'static mut [u8], String> {
    edu.read_from(ipa, PAGE as u64)?;
    let out = page();
    out.fill(0xa5);
    clean_invalidate(out);
    edu.write_to(out.as_ptr() as u64, PAGE as u64)?;
    clean_invalidate(out);
    Ok(out)
}

/// Fills the device's buffer with a known pattern through a DMA from RAM.
fn fill_device(edu: Edu, seed: u8) -> Result<(), String> {
    let source = page();
    for (i, byte) in source.iter_mut().enumerate() {
        *byte = (i as u8).wrapping_mul(13).wrapping_add(seed);
    }
    clean_invalidate(source);
    edu.read_from(source.as_ptr() as u64, PAGE as u64)
}

fn ram_end() -> u64 {
    guest_rt::dt::main_ram().end() as u64
}

fn finds_and_enables_edu() -> Result<(), String> {
    let edu = Edu::get()?;
    check_eq!(edu.ident(), edu::IDENT, "edu identification");
    check_eq!(edu.liveness(0x1234_5678), !0x1234_5678u32, "edu liveness");
    Ok(())
}

fn shared_dma_round_trip() -> Result<(), String> {
    let edu = Edu::get()?;
    let source = page();
    for (i, byte) in source.iter_mut().enumerate() {
        *byte = (i * 7 % 251) as u8;
    }
    clean_invalidate(source);
    let copy = device_reads(edu, source.as_ptr() as u64)?;
    for (i, &expected) in source.iter().enumerate().take(PAGE) {
        check_eq!(
            read_volatile(copy, i),
            expected,
            "byte {} after RAM -> edu -> RAM",
            i
        );
    }
    Ok(())
}

fn dma_from_beyond_ram_reads_zeros() -> Result<(), String> {
    let edu = Edu::get()?;
    fill_device(edu, 1)?;
    let target = ram_end() + (1 << 20);
    let seen = device_reads(edu, target)?;
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
    let edu = Edu::get()?;
    fill_device(edu, 2)?;
    // The SMMU's own registers (never in the guest's stage 2) and an IPA past guest RAM: both
    // writes must be dropped. Had the first landed, the SMMU would be reprogrammed with the
    // pattern and the checks below would see it.
    edu.write_to(0x0905_0000, PAGE as u64)?;
    edu.write_to(ram_end() + (2 << 20), PAGE as u64)?;
    // Still contained and still translating.
    let seen = device_reads(edu, ram_end() + (1 << 20))?;
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
    let edu = Edu::get()?;
    check!(
        guest_rt::dt::main_ram().contains(IPA),
        "{:#x} is not guest RAM",
        IPA
    );
    // SAFETY: guest RAM, identity-mapped write-back by the runtime; only read.
    let guest_view = unsafe { core::slice::from_raw_parts(IPA as *const u8, PAGE) };
    clean_invalidate(guest_view);
    let seen = device_reads(edu, IPA as u64)?;
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
