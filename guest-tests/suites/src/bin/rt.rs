//! Suite `rt`: self-tests of the guest runtime that the other suites build on: aliases, memory
//! type changes, probes of unmapped VAs, and the heap.
#![no_std]
#![no_main]

extern crate alloc;

use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;

use guest_rt::mmu::{self, MemoryType, PAGE_SIZE};
use guest_rt::probe;
use guest_rt::{check, check_eq};

guest_rt::main!(main);

fn main() -> ! {
    guest_rt::test::run_suite(
        "rt",
        &guest_rt::tests![
            heap_allocates,
            ram_is_write_back,
            alias_shares_the_bytes,
            memory_type_changes_and_back,
            probe_reports_translation_fault,
            probe_passes_good_accesses,
        ],
    )
}

/// A page of RAM well away from the image, the DTB and the initrd (which sit at the ends).
fn scratch_page() -> usize {
    guest_rt::dt::main_ram().base + (64 << 20)
}

/// The memory attribute (MAIR encoding) stage 1 gives `va`, from AT S1E1R.
fn stage1_attribute(va: usize) -> Result<u8, String> {
    let par = mmu::translate_read(va);
    check!(
        par & 1 == 0,
        "AT S1E1R of {:#x} faulted (PAR {:#x})",
        va,
        par
    );
    Ok((par >> 56) as u8)
}

fn heap_allocates() -> Result<(), String> {
    let values: Vec<u64> = (0..10_000).collect();
    check_eq!(
        values.iter().sum::<u64>(),
        49_995_000,
        "sum of a heap vector"
    );
    Ok(())
}

fn ram_is_write_back() -> Result<(), String> {
    check_eq!(
        stage1_attribute(scratch_page())?,
        MemoryType::NormalWriteBack.mair_attribute(),
        "RAM attribute"
    );
    check_eq!(
        stage1_attribute(main as *const () as usize)?,
        MemoryType::NormalWriteBack.mair_attribute(),
        "image attribute"
    );
    Ok(())
}

fn alias_shares_the_bytes() -> Result<(), String> {
    let page = scratch_page();
    let alias = mmu::map_alias(page, 2 * PAGE_SIZE, MemoryType::NormalWriteBack)
        .map_err(|e| format!("{e:?}"))?;
    check!(alias != page, "alias VA equals the IPA");
    check_eq!(
        mmu::translate_read(alias) & 0xffff_ffff_f000,
        page as u64,
        "alias translation"
    );
    for i in 0..8 {
        probe::write_u64(page + i * 8, 0x5a5a_0000 + i as u64).map_err(|a| format!("{a:?}"))?;
    }
    for i in 0..8 {
        let value = probe::read_u64(alias + i * 8).map_err(|a| format!("{a:?}"))?;
        check_eq!(
            value,
            0x5a5a_0000 + i as u64,
            "word {} through the alias",
            i
        );
    }
    probe::write_u32(alias + PAGE_SIZE, 0xfeed).map_err(|a| format!("{a:?}"))?;
    check_eq!(
        probe::read_u32(page + PAGE_SIZE).map_err(|a| format!("{a:?}"))?,
        0xfeed,
        "second page"
    );
    Ok(())
}

fn memory_type_changes_and_back() -> Result<(), String> {
    let page = scratch_page() + 0x3000;
    for memory in [
        MemoryType::NormalNonCacheable,
        MemoryType::Device,
        MemoryType::NormalWriteBack,
    ] {
        mmu::map_identity(page, PAGE_SIZE, memory).map_err(|e| format!("{memory:?}: {e:?}"))?;
        check_eq!(
            stage1_attribute(page)?,
            memory.mair_attribute(),
            "attribute after mapping {:?}",
            memory
        );
        probe::write_u32(page, 7).map_err(|a| format!("{memory:?}: {a:?}"))?;
        check_eq!(
            probe::read_u32(page).map_err(|a| format!("{memory:?}: {a:?}"))?,
            7,
            "{:?} read back",
            memory
        );
    }
    // Its neighbours in the split block kept their mapping.
    check_eq!(
        stage1_attribute(page + PAGE_SIZE)?,
        MemoryType::NormalWriteBack.mair_attribute(),
        "neighbour"
    );
    Ok(())
}

fn probe_reports_translation_fault() -> Result<(), String> {
    let unmapped = 1usize << 46;
    let Err(abort) = probe::read_u32(unmapped) else {
        return Err(format!("read of unmapped VA {unmapped:#x} did not fault"));
    };
    check_eq!(
        abort.class(),
        probe::EC_DATA_ABORT,
        "exception class ({:?})",
        abort
    );
    check_eq!(
        abort.fault_status() & 0b11_1100,
        0b00_0100,
        "DFSC: translation fault ({:?})",
        abort
    );
    check_eq!(abort.far as usize, unmapped, "FAR");
    Ok(())
}

fn probe_passes_good_accesses() -> Result<(), String> {
    let page = scratch_page() + 0x4000;
    probe::write_u8(page + 1, 0xab).map_err(|a| format!("{a:?}"))?;
    probe::write_u16(page + 2, 0xcdef).map_err(|a| format!("{a:?}"))?;
    check_eq!(
        probe::read_u32(page).map_err(|a| format!("{a:?}"))? & 0xffff_ff00,
        0xcdef_ab00,
        "bytes written"
    );
    Ok(())
}
