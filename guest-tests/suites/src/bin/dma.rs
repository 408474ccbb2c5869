//! Suite `dma`: the DMA calls (DEV_INFO, DMA_MAP, DMA_UNMAP, DMA_SYNC) with QEMU's `edu` device
//! behind the hypervisor's SMMU, from a guest with 4 vCPUs. The same guest runs in several runner
//! rows: `dma`, with edu in strict mode and declared non-coherent
//! (`devices=00:02.0/strict/noncoherent`), `dma-shared`, in the default shared mode (coherent),
//! and both again with the SMMU treated as non-coherent (`smmu-coherent=off`: `dma-nc-smmu`,
//! `dma-shared-nc-smmu`), which runs every clean of its tables and queues. The row
//! says which on the command line, `stagehand.expect_dma=strict/noncoherent` or
//! `stagehand.expect_dma=shared/coherent`, and the suite's name is its binary's name.
//!
//! A blocked DMA is judged by memory (a blocked device write leaves the bytes as they were, a
//! blocked read gives the device zeros) and by the SMMU fault records AUDIT_READ returns. QEMU
//! models no caches, so cache maintenance is judged by what the calls answer. Each edu DMA
//! takes 100 ms of virtual time: the suite runs about ten.
#![no_std]
#![no_main]

extern crate alloc;

use alloc::format;
use alloc::string::String;
use alloc::vec;
use alloc::vec::Vec;
use core::sync::atomic::{AtomicUsize, Ordering};

use guest_rt::{check, check_eq, cpu, println};
use guest_suites::edu::{self, Edu};
use guest_suites::{expect_status, status_name};
use stagehand_abi::audit::{kind, Record, RECORD_SIZE};
use stagehand_abi::dma_sg::{Segment, SEGMENTS_PER_CALL};
use stagehand_abi::{attr, cache_op, feature, function, page_flag, Regs, Status, PAGE_SIZE};

guest_rt::main!(main);

/// The suite's name (`dma`, `dma-shared`, ...), after the binary.
const SUITE: &str = env!("CARGO_BIN_NAME");

fn main() -> ! {
    let tests = if mode().strict {
        &guest_rt::tests![
            dev_info_lists_the_device,
            features_report_the_smmu_and_the_mode,
            mapped_buffers_round_trip_through_the_device,
            strict_mode_blocks_an_unmapped_buffer,
            to_device_mapping_refuses_device_writes,
            dma_after_unmap_is_blocked,
            pinned_page_refuses_attribute_changes,
            invalidate_of_a_pinned_page_is_widened,
            dma_sync_answers_by_coherence_and_attribute,
            overlapping_mappings,
            sub_page_buffers_share_a_page,
            scatter_gather_maps_several_segments,
            bad_inputs_get_their_own_status,
            beyond_guest_ram_is_blocked_and_audited,
            four_vcpus_map_and_unmap_concurrently,
        ][..]
    } else {
        &guest_rt::tests![
            dev_info_lists_the_device,
            features_report_the_smmu_and_the_mode,
            mapped_buffers_round_trip_through_the_device,
            shared_mode_reaches_unmapped_guest_ram,
            pinned_page_refuses_attribute_changes,
            invalidate_of_a_pinned_page_is_widened,
            dma_sync_answers_by_coherence_and_attribute,
            overlapping_mappings,
            sub_page_buffers_share_a_page,
            scatter_gather_maps_several_segments,
            bad_inputs_get_their_own_status,
            beyond_guest_ram_is_blocked_and_audited,
            four_vcpus_map_and_unmap_concurrently,
        ][..]
    };
    guest_rt::test::run_suite(SUITE, tests)
}

const MIB: u64 = 1 << 20;
const PAGE: u64 = PAGE_SIZE;

/// Where each test works, as offsets from the start of guest RAM (the image, with its stacks,
/// heap and page tables, lies in the first 4 MiB). Each area is used by one test only.
const ROUND_TRIP: u64 = 16 * MIB;
const UNMAPPED: u64 = 17 * MIB;
const TO_DEVICE: u64 = 18 * MIB;
const AFTER_UNMAP: u64 = 19 * MIB;
const PINNED: u64 = 20 * MIB;
const SYNC: u64 = 21 * MIB;
const OVERLAP: u64 = 22 * MIB;
const SHARED: u64 = 23 * MIB;
const BEYOND: u64 = 24 * MIB;
const SUB_PAGE: u64 = 25 * MIB;
const SCATTER: u64 = 26 * MIB;
const HAMMER: u64 = 32 * MIB;

use stagehand_abi::dma_direction::{BIDIRECTIONAL, FROM_DEVICE, TO_DEVICE as TO_DEVICE_DIRECTION};
/// SMMU event type of a permission fault (the `detail` of an `smmu-fault` record).
const F_PERMISSION: u64 = 0x13;
use stagehand_abi::dma_sync::{FOR_CPU, FOR_DEVICE};

/// What the runner row says about edu.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Mode {
    strict: bool,
    coherent: bool,
}

/// The mode from `stagehand.expect_dma=strict|shared/coherent|noncoherent` on the command line.
fn mode() -> Mode {
    let tree = guest_rt::dt::tree();
    let bootargs = tree.chosen().bootargs().unwrap_or("");
    let value = bootargs
        .split_whitespace()
        .find_map(|arg| arg.strip_prefix("stagehand.expect_dma="))
        .unwrap_or("");
    match value {
        "strict/noncoherent" => Mode {
            strict: true,
            coherent: false,
        },
        "strict/coherent" => Mode {
            strict: true,
            coherent: true,
        },
        "shared/noncoherent" => Mode {
            strict: false,
            coherent: false,
        },
        "shared/coherent" => Mode {
            strict: false,
            coherent: true,
        },
        other => guest_rt::test::abort_suite(&format!(
            "the command line ({bootargs:?}) must say stagehand.expect_dma=strict|shared/coherent|noncoherent, not {other:?}"
        )),
    }
}

fn ram_base() -> u64 {
    guest_rt::dt::main_ram().base as u64
}

fn ram_end() -> u64 {
    guest_rt::dt::main_ram().end() as u64
}

fn area(offset: u64) -> u64 {
    ram_base() + offset
}

/// One raw hypercall.
fn call(function: u32, args: &[u64]) -> Regs {
    guest_suites::hypercall(function, args)
}

/// DMA_MAP of edu that must succeed, with IOVA = IPA; returns the handle.
fn map(ipa: u64, size: u64, direction: u64) -> Result<u64, String> {
    let regs = call(
        function::DMA_MAP,
        &[edu::STREAM_ID as u64, ipa, size, direction],
    );
    expect_status(
        &regs,
        Status::Success,
        &format!("DMA_MAP {ipa:#x}+{size:#x} dir {direction}"),
    )?;
    check_eq!(regs.x1, ipa, "IOVA of DMA_MAP {:#x}", ipa);
    Ok(regs.x2)
}

/// DMA_UNMAP that must succeed.
fn unmap(handle: u64) -> Result<(), String> {
    let regs = call(function::DMA_UNMAP, &[handle]);
    expect_status(&regs, Status::Success, &format!("DMA_UNMAP {handle:#x}"))
}

/// MEM_GET_ATTR as (attribute, flags, pins).
fn page_state(ipa: u64) -> Result<(u64, u64, u64), String> {
    let regs = call(function::MEM_GET_ATTR, &[ipa]);
    expect_status(&regs, Status::Success, &format!("MEM_GET_ATTR {ipa:#x}"))?;
    Ok((regs.x1, regs.x2 & page_flag::PINNED, regs.x3))
}

fn set_attribute(ipa: u64, size: u64, attribute: u64) -> Regs {
    call(function::MEM_SET_ATTR, &[ipa, size, attribute])
}

/// Guest memory `[ipa, ipa + len)` as bytes (RAM is identity-mapped write-back).
fn memory(ipa: u64, len: u64) -> &'static mut [u8] {
    assert!(
        ipa >= ram_base() && ipa + len <= ram_end(),
        "{ipa:#x}+{len:#x} is not guest RAM"
    );
    // SAFETY: guest RAM past the image, used by one test at a time; a device may write it
    // behind the compiler's back, which is why reads go through `edu::read_volatile`.
    unsafe { core::slice::from_raw_parts_mut(ipa as *mut u8, len as usize) }
}

fn pattern(index: usize, seed: u8) -> u8 {
    (index as u8).wrapping_mul(13).wrapping_add(seed) ^ (index >> 8) as u8
}

/// Fills guest memory with a pattern and pushes it to memory.
fn fill(ipa: u64, len: u64, seed: u8) {
    let bytes = memory(ipa, len);
    for (i, byte) in bytes.iter_mut().enumerate() {
        *byte = pattern(i, seed);
    }
    edu::clean_invalidate(bytes);
}

/// How many bytes of `[ipa, ipa + len)` differ from the pattern of `seed`.
fn differing(ipa: u64, len: u64, seed: u8) -> usize {
    let bytes = memory(ipa, len);
    edu::clean_invalidate(bytes);
    (0..len as usize)
        .filter(|&i| edu::read_volatile(bytes, i) != pattern(i, seed))
        .count()
}

/// Writes a marker; every record written after it has a higher sequence number.
fn mark() -> Result<u64, String> {
    let regs = call(function::AUDIT_MARK, &[0xd3a]);
    expect_status(&regs, Status::Success, "AUDIT_MARK")?;
    Ok(regs.x1)
}

/// Every audit record from sequence `first` on (AUDIT_READ also drains the SMMU's events).
fn records_since(first: u64) -> Result<Vec<Record>, String> {
    const BATCH: usize = 32;
    let mut buffer = vec![0u64; BATCH * RECORD_SIZE / 8];
    let mut records = Vec::new();
    let mut next = first;
    loop {
        let regs = call(
            function::AUDIT_READ,
            &[buffer.as_mut_ptr() as u64, (buffer.len() * 8) as u64, next],
        );
        expect_status(&regs, Status::Success, "AUDIT_READ")?;
        let bytes: Vec<u8> = buffer.iter().flat_map(|w| w.to_le_bytes()).collect();
        records.extend(
            (0..regs.x1 as usize)
                .filter_map(|i| Record::parse(&bytes[i * RECORD_SIZE..(i + 1) * RECORD_SIZE])),
        );
        if regs.x1 == 0 || regs.x2 == next {
            return Ok(records);
        }
        next = regs.x2;
    }
}

/// Whether `records` hold an SMMU fault of edu on the page of `ipa`.
fn fault_recorded(records: &[Record], ipa: u64) -> bool {
    records.iter().any(|r| {
        r.kind == kind::SMMU_FAULT
            && r.stream_id.get() == edu::STREAM_ID
            && r.ipa.get() & !(PAGE - 1) == ipa & !(PAGE - 1)
    })
}

/// A one-line summary of the SMMU fault records (for failure messages).
fn faults(records: &[Record]) -> String {
    let list: Vec<String> = records
        .iter()
        .filter(|r| r.kind == kind::SMMU_FAULT)
        .map(|r| format!("sid {:#x} ipa {:#x}", r.stream_id.get(), r.ipa.get()))
        .collect();
    format!("[{}]", list.join(", "))
}

fn dev_info_lists_the_device() -> Result<(), String> {
    let mut found = None;
    let mut count = 0;
    for index in 0..32u64 {
        let regs = call(function::DEV_INFO, &[index]);
        if regs.x0 as i64 == Status::NoDevice.code() {
            break;
        }
        expect_status(&regs, Status::Success, &format!("DEV_INFO {index}"))?;
        count += 1;
        if regs.x1 == edu::STREAM_ID as u64 {
            found = Some((regs.x2, regs.x3));
        }
    }
    check!(count < 32, "DEV_INFO never answered NO_DEVICE");
    let Some((rid, flags)) = found else {
        return Err(format!(
            "none of the {count} devices DEV_INFO lists has StreamID {:#x}",
            edu::STREAM_ID
        ));
    };
    check_eq!(rid, edu::RID, "edu's segment/bus/device/function");
    let mode = mode();
    check_eq!(
        flags,
        mode.coherent as u64 | (mode.strict as u64) << 1,
        "edu's flags (bit 0 coherent, bit 1 strict)"
    );
    for index in [count, count + 1, u64::MAX] {
        let regs = call(function::DEV_INFO, &[index]);
        expect_status(
            &regs,
            Status::NoDevice,
            &format!("DEV_INFO {index} (past the last)"),
        )?;
    }
    Ok(())
}

fn features_report_the_smmu_and_the_mode() -> Result<(), String> {
    let regs = call(function::FEATURES, &[]);
    expect_status(&regs, Status::Success, "FEATURES")?;
    check!(
        regs.x1 & feature::SMMU != 0,
        "FEATURES x1 {:#x}: no SMMU bit",
        regs.x1
    );
    check_eq!(
        regs.x1 & feature::DMA_STRICT != 0,
        mode().strict,
        "FEATURES x1 {:#x}: the DMA strict bit",
        regs.x1
    );
    let edu = Edu::get()?;
    check_eq!(edu.ident(), edu::IDENT, "edu identification");
    Ok(())
}

fn mapped_buffers_round_trip_through_the_device() -> Result<(), String> {
    let edu = Edu::get()?;
    let source = area(ROUND_TRIP);
    let destination = source + PAGE;
    fill(source, PAGE, 3);
    memory(destination, PAGE).fill(0);
    edu::clean_invalidate(memory(destination, PAGE));
    let to_device = map(source, PAGE, TO_DEVICE_DIRECTION)?;
    let from_device = map(destination, PAGE, FROM_DEVICE)?;
    edu.read_from(source, PAGE)?;
    edu.write_to(destination, PAGE)?;
    unmap(from_device)?;
    unmap(to_device)?;
    check_eq!(
        differing(destination, PAGE, 3),
        0,
        "bytes that differ after RAM -> edu -> RAM"
    );
    for ipa in [source, destination] {
        check_eq!(
            page_state(ipa)?,
            (attr::NORMAL_WB, 0, 0),
            "{:#x} after the unmaps",
            ipa
        );
    }
    Ok(())
}

fn strict_mode_blocks_an_unmapped_buffer() -> Result<(), String> {
    let edu = Edu::get()?;
    let buffer = area(UNMAPPED);
    fill(buffer, PAGE, 5);
    let first = mark()?;
    // The device buffer holds the round trip's pattern: anything landing would show.
    edu.write_to(buffer, PAGE)?;
    check_eq!(
        differing(buffer, PAGE, 5),
        0,
        "bytes of an unmapped buffer the device changed"
    );
    let records = records_since(first)?;
    check!(
        fault_recorded(&records, buffer),
        "no SMMU fault record for StreamID {:#x} at {:#x}; faults: {}",
        edu::STREAM_ID,
        buffer,
        faults(&records)
    );
    Ok(())
}

fn to_device_mapping_refuses_device_writes() -> Result<(), String> {
    let edu = Edu::get()?;
    let source = area(TO_DEVICE);
    let target = source + PAGE;
    fill(source, PAGE, 7);
    fill(target, PAGE, 9);
    let source_handle = map(source, PAGE, TO_DEVICE_DIRECTION)?;
    let target_handle = map(target, PAGE, TO_DEVICE_DIRECTION)?;
    // The device holds pattern 7, then tries to write it over pattern 9.
    edu.read_from(source, PAGE)?;
    let first = mark()?;
    edu.write_to(target, PAGE)?;
    unmap(target_handle)?;
    unmap(source_handle)?;
    check_eq!(
        differing(target, PAGE, 9),
        0,
        "bytes of a TO_DEVICE buffer the device wrote"
    );
    // A permission fault (the page is mapped read-only for the device). The device never read
    // the page before, so QEMU has no cached translation, whose permission faults it would not
    // record.
    let records = records_since(first)?;
    check!(
        records.iter().any(|r| r.kind == kind::SMMU_FAULT
            && r.stream_id.get() == edu::STREAM_ID
            && r.ipa.get() == target
            && r.detail.get() == F_PERMISSION
            && r.access == stagehand_abi::audit::access::WRITE),
        "no SMMU permission-fault record (write) at {:#x}; faults: {}",
        target,
        faults(&records)
    );
    Ok(())
}

fn dma_after_unmap_is_blocked() -> Result<(), String> {
    let edu = Edu::get()?;
    let buffer = area(AFTER_UNMAP);
    // The device buffer holds pattern 7 (previous test). First a write that must land...
    fill(buffer, PAGE, 11);
    let handle = map(buffer, PAGE, FROM_DEVICE)?;
    edu.write_to(buffer, PAGE)?;
    unmap(handle)?;
    check_eq!(
        differing(buffer, PAGE, 7),
        0,
        "bytes that differ from the device's pattern while mapped"
    );
    // ...then the same write once DMA_UNMAP has returned.
    fill(buffer, PAGE, 11);
    let first = mark()?;
    edu.write_to(buffer, PAGE)?;
    check_eq!(
        differing(buffer, PAGE, 11),
        0,
        "bytes the device changed after DMA_UNMAP"
    );
    let records = records_since(first)?;
    check!(
        fault_recorded(&records, buffer),
        "no SMMU fault record for the write after DMA_UNMAP at {:#x}; faults: {}",
        buffer,
        faults(&records)
    );
    // A stale handle stays stale.
    expect_status(
        &call(function::DMA_UNMAP, &[handle]),
        Status::BadHandle,
        "DMA_UNMAP of the unmapped handle",
    )
}

fn shared_mode_reaches_unmapped_guest_ram() -> Result<(), String> {
    let edu = Edu::get()?;
    // Anywhere in guest RAM, without DMA_MAP: near the start, and in the last page.
    let source = area(SHARED);
    let last = ram_end() - PAGE;
    fill(source, PAGE, 13);
    let saved: Vec<u8> = memory(last, PAGE).to_vec();
    edu.read_from(source, PAGE)?;
    edu.write_to(last, PAGE)?;
    let landed = differing(last, PAGE, 13);
    memory(last, PAGE).copy_from_slice(&saved);
    check_eq!(
        landed,
        0,
        "bytes that differ after RAM -> edu -> the last page of RAM, unmapped"
    );
    Ok(())
}

fn pinned_page_refuses_attribute_changes() -> Result<(), String> {
    // Inside one 2 MiB region: a range across a region boundary is changed one region per call
    // (the first call would change the region before the pinned page and answer INCOMPLETE).
    let ipa = area(PINNED) + 8 * PAGE;
    let handle = map(ipa, 2 * PAGE, BIDIRECTIONAL)?;
    for (start, size) in [(ipa, PAGE), (ipa + PAGE, PAGE), (ipa - PAGE, 2 * PAGE)] {
        expect_status(
            &set_attribute(start, size, attr::NORMAL_NC),
            Status::Busy,
            &format!("MEM_SET_ATTR {start:#x}+{size:#x} NC over a pinned page"),
        )?;
    }
    check_eq!(
        page_state(ipa)?,
        (attr::NORMAL_WB, page_flag::PINNED, 1),
        "MEM_GET_ATTR of a mapped page"
    );
    check_eq!(
        page_state(ipa - PAGE)?,
        (attr::NORMAL_WB, 0, 0),
        "MEM_GET_ATTR of the page before, after the refused change"
    );
    unmap(handle)?;
    check_eq!(
        page_state(ipa)?,
        (attr::NORMAL_WB, 0, 0),
        "MEM_GET_ATTR after DMA_UNMAP"
    );
    expect_status(
        &set_attribute(ipa, PAGE, attr::NORMAL_NC),
        Status::Success,
        "MEM_SET_ATTR NC after DMA_UNMAP",
    )?;
    expect_status(
        &set_attribute(ipa, PAGE, attr::NORMAL_WB),
        Status::Success,
        "MEM_SET_ATTR back to WB",
    )
}

fn invalidate_of_a_pinned_page_is_widened() -> Result<(), String> {
    let ipa = area(PINNED) + 4 * PAGE;
    let handle = map(ipa, PAGE, FROM_DEVICE)?;
    let regs = call(function::CACHE_OP, &[ipa, PAGE, cache_op::INVALIDATE]);
    expect_status(
        &regs,
        Status::Success,
        "CACHE_OP INVALIDATE of a pinned page",
    )?;
    check_eq!(regs.x1, PAGE, "bytes done");
    check_eq!(
        regs.x2 & cache_op::RESULT_WIDENED,
        cache_op::RESULT_WIDENED,
        "x2 widened flag on a pinned page"
    );
    unmap(handle)?;
    let regs = call(function::CACHE_OP, &[ipa, PAGE, cache_op::INVALIDATE]);
    expect_status(
        &regs,
        Status::Success,
        "CACHE_OP INVALIDATE after DMA_UNMAP",
    )?;
    check_eq!(
        regs.x2 & cache_op::RESULT_WIDENED,
        0,
        "x2 widened flag once unpinned"
    );
    Ok(())
}

fn dma_sync_answers_by_coherence_and_attribute() -> Result<(), String> {
    let coherent = mode().coherent;
    let buffer = area(SYNC);
    let maintained = if coherent {
        Status::NotRequired
    } else {
        Status::Success
    };
    // Write-back buffer: every direction and target that needs maintenance.
    for (direction, target, want) in [
        (BIDIRECTIONAL, FOR_CPU, maintained),
        (BIDIRECTIONAL, FOR_DEVICE, maintained),
        (FROM_DEVICE, FOR_CPU, maintained),
        (FROM_DEVICE, FOR_DEVICE, maintained),
        (TO_DEVICE_DIRECTION, FOR_DEVICE, maintained),
        // The CPU never needs to drop lines of a buffer the device only reads.
        (TO_DEVICE_DIRECTION, FOR_CPU, Status::NotRequired),
    ] {
        let handle = map(buffer, 4 * PAGE, direction)?;
        let regs = call(function::DMA_SYNC, &[handle, PAGE, 2 * PAGE, target]);
        unmap(handle)?;
        expect_status(
            &regs,
            want,
            &format!("DMA_SYNC dir {direction} target {target} of a WB buffer"),
        )?;
    }
    // A non-cacheable buffer needs no maintenance, whatever the device.
    expect_status(
        &set_attribute(buffer, 4 * PAGE, attr::NORMAL_NC),
        Status::Success,
        "MEM_SET_ATTR NC",
    )?;
    let handle = map(buffer, 4 * PAGE, BIDIRECTIONAL)?;
    let for_cpu = call(function::DMA_SYNC, &[handle, 0, 4 * PAGE, FOR_CPU]);
    let for_device = call(function::DMA_SYNC, &[handle, 0, 4 * PAGE, FOR_DEVICE]);
    // The error cases, on a live handle.
    let errors = [
        (
            "target 2",
            call(function::DMA_SYNC, &[handle, 0, PAGE, 2]),
            Status::InvalidParameter,
        ),
        (
            "zero size",
            call(function::DMA_SYNC, &[handle, 0, 0, FOR_CPU]),
            Status::InvalidParameter,
        ),
        (
            "past the mapping",
            call(function::DMA_SYNC, &[handle, 3 * PAGE, 2 * PAGE, FOR_CPU]),
            Status::OutOfRange,
        ),
        (
            "offset wraps",
            call(function::DMA_SYNC, &[handle, u64::MAX, 2, FOR_CPU]),
            Status::OutOfRange,
        ),
    ];
    unmap(handle)?;
    let stale = call(function::DMA_SYNC, &[handle, 0, PAGE, FOR_CPU]);
    expect_status(
        &set_attribute(buffer, 4 * PAGE, attr::NORMAL_WB),
        Status::Success,
        "MEM_SET_ATTR back to WB",
    )?;
    expect_status(
        &for_cpu,
        Status::NotRequired,
        "DMA_SYNC for the CPU of an NC buffer",
    )?;
    expect_status(
        &for_device,
        Status::NotRequired,
        "DMA_SYNC for the device of an NC buffer",
    )?;
    for (what, regs, want) in errors {
        expect_status(&regs, want, &format!("DMA_SYNC {what}"))?;
    }
    expect_status(&stale, Status::BadHandle, "DMA_SYNC of an unmapped handle")
}

fn overlapping_mappings() -> Result<(), String> {
    let ipa = area(OVERLAP);
    let first = map(ipa, 4 * PAGE, BIDIRECTIONAL)?;
    // ABI 1.1: overlapping mappings of one device succeed in every mode (a strict device's
    // rights are the counted union of its mappings').
    let second = map(ipa + 2 * PAGE, 4 * PAGE, TO_DEVICE_DIRECTION)?;
    check_eq!(
        page_state(ipa + 3 * PAGE)?,
        (attr::NORMAL_WB, page_flag::PINNED, 2),
        "a page of both mappings"
    );
    unmap(first)?;
    check_eq!(
        page_state(ipa + 3 * PAGE)?.2,
        1,
        "pins of a page of the second mapping after the first's unmap"
    );
    check_eq!(
        page_state(ipa)?,
        (attr::NORMAL_WB, 0, 0),
        "a page of the first mapping only, after its unmap"
    );
    unmap(second)?;
    for page in 0..6 {
        check_eq!(
            page_state(ipa + page * PAGE)?,
            (attr::NORMAL_WB, 0, 0),
            "page {} after the unmaps",
            page
        );
    }
    Ok(())
}

/// Offsets in the sub-page test's page: a request header the device reads and a status area it
/// writes, as virtio-blk's driver maps them.
const HEADER_AT: u64 = 0x100;
const STATUS_AT: u64 = 0x800;
const SMALL: u64 = 0x40;

/// Whether the bytes of `[ipa, ipa + len)` outside the `holes` (offsets, lengths) still hold
/// the pattern of `seed`: how many do not.
fn differing_outside(ipa: u64, len: u64, seed: u8, holes: &[(u64, u64)]) -> usize {
    let bytes = memory(ipa, len);
    edu::clean_invalidate(bytes);
    (0..len)
        .filter(|&i| !holes.iter().any(|&(at, n)| i >= at && i < at + n))
        .filter(|&i| edu::read_volatile(bytes, i as usize) != pattern(i as usize, seed))
        .count()
}

fn sub_page_buffers_share_a_page() -> Result<(), String> {
    let edu = Edu::get()?;
    let page = area(SUB_PAGE);
    let (header, status) = (page + HEADER_AT, page + STATUS_AT);
    fill(page, PAGE, 21);
    // Both succeed at once, in different directions (ABI 1.0 answered BUSY to the second).
    let header_handle = map(header, SMALL, TO_DEVICE_DIRECTION)?;
    let status_handle = map(status, SMALL, FROM_DEVICE)?;
    check_eq!(
        page_state(page)?,
        (attr::NORMAL_WB, page_flag::PINNED, 2),
        "the page of both buffers"
    );
    // The device reads the header and writes it into the status area while both are mapped.
    edu.read_from(header, SMALL)?;
    edu.write_to(status, SMALL)?;
    let bytes = memory(page, PAGE);
    edu::clean_invalidate(bytes);
    let copied = (0..SMALL as usize)
        .filter(|&i| {
            edu::read_volatile(bytes, (STATUS_AT as usize) + i)
                == pattern(HEADER_AT as usize + i, 21)
        })
        .count();
    check_eq!(copied, SMALL as usize, "status bytes holding the header's");
    check_eq!(
        differing_outside(page, PAGE, 21, &[(STATUS_AT, SMALL)]),
        0,
        "bytes outside the status area that changed"
    );
    // The written buffer goes first: the header's mapping (read only) stays, and in strict
    // mode the device can no longer write anywhere in the page.
    unmap(status_handle)?;
    check_eq!(
        page_state(page)?.2,
        1,
        "pins of the page after the status area's unmap"
    );
    if mode().strict {
        fill(page, PAGE, 23);
        edu.write_to(page + 0xc00, SMALL)?;
        check_eq!(
            differing(page, PAGE, 23),
            0,
            "bytes the device wrote into a page mapped only for reading"
        );
    }
    unmap(header_handle)?;
    check_eq!(
        page_state(page)?,
        (attr::NORMAL_WB, 0, 0),
        "the page after both unmaps"
    );
    for handle in [header_handle, status_handle] {
        expect_status(
            &call(function::DMA_UNMAP, &[handle]),
            Status::BadHandle,
            "DMA_UNMAP of a handle already unmapped",
        )?;
    }
    Ok(())
}

/// Writes `segments` at `array` (guest RAM) for the hypervisor to read.
fn write_segments(array: u64, segments: &[Segment]) -> &'static mut [u8] {
    let bytes = memory(array, size_of_val(segments) as u64);
    for (chunk, segment) in bytes.chunks_mut(size_of::<Segment>()).zip(segments) {
        for (field, value) in chunk
            .chunks_mut(8)
            .zip([segment.addr, segment.size, segment.handle])
        {
            field.copy_from_slice(&value.to_le_bytes());
        }
    }
    edu::clean_invalidate(bytes);
    bytes
}

/// The handles DMA_MAP_SG wrote into the array at `array`.
fn handles(array: u64, count: usize) -> Vec<u64> {
    let bytes = memory(array, (count * size_of::<Segment>()) as u64);
    edu::clean_invalidate(bytes);
    (0..count)
        .map(|i| {
            let at = i * size_of::<Segment>() + 16;
            u64::from_le_bytes(core::array::from_fn(|b| edu::read_volatile(bytes, at + b)))
        })
        .collect()
}

fn map_sg(array: u64, count: u64, direction: u64, cookie: u64) -> Regs {
    call(
        function::DMA_MAP_SG,
        &[edu::STREAM_ID as u64, array, count, direction, cookie],
    )
}

fn unmap_sg(array: u64, count: u64, cookie: u64) -> Regs {
    call(function::DMA_UNMAP_SG, &[array, count, cookie])
}

fn scatter_gather_maps_several_segments() -> Result<(), String> {
    let edu = Edu::get()?;
    let base = area(SCATTER);
    let array = base;
    let data = base + PAGE;
    fill(data, 7 * PAGE, 31);
    // A segment in one page, one across a page boundary, one of two pages' bytes.
    let segments = [
        Segment::new(data + 0x40, 0x100),
        Segment::new(data + 2 * PAGE - 0x10, 0x20),
        Segment::new(data + 4 * PAGE + 0x80, 0x1f00),
    ];
    write_segments(array, &segments);
    let regs = map_sg(array, 3, BIDIRECTIONAL, 0);
    expect_status(&regs, Status::Success, "DMA_MAP_SG of three segments")?;
    check_eq!(
        (regs.x1, regs.x2),
        (3, 0),
        "DMA_MAP_SG x1 (segments) and x2 (cookie)"
    );
    let mapped = handles(array, 3);
    check!(
        mapped.iter().all(|&h| h != 0) && mapped[0] != mapped[1] && mapped[1] != mapped[2],
        "handles written back: {:x?}",
        mapped
    );
    for (page, pins) in [(0, 1), (1, 1), (2, 1), (3, 0), (4, 1), (5, 1), (6, 0)] {
        check_eq!(
            page_state(data + page * PAGE)?.2,
            pins,
            "pins of data page {} while mapped",
            page
        );
    }
    // The device copies the first segment's first bytes into the second segment.
    edu.read_from(segments[0].addr, 0x20)?;
    edu.write_to(segments[1].addr, 0x20)?;
    let bytes = memory(data, 7 * PAGE);
    edu::clean_invalidate(bytes);
    let second = (2 * PAGE - 0x10) as usize;
    let copied = (0..0x20)
        .filter(|&i| edu::read_volatile(bytes, second + i) == pattern(0x40 + i, 31))
        .count();
    check_eq!(
        copied,
        0x20,
        "bytes of the second segment holding the first's"
    );
    check_eq!(
        differing_outside(data, 7 * PAGE, 31, &[(2 * PAGE - 0x10, 0x20)]),
        0,
        "bytes outside the written segment that changed"
    );
    let regs = unmap_sg(array, 3, 0);
    expect_status(&regs, Status::Success, "DMA_UNMAP_SG of three segments")?;
    check_eq!(regs.x1, 3, "segments DMA_UNMAP_SG unmapped");
    for page in 0..7 {
        check_eq!(
            page_state(data + page * PAGE)?,
            (attr::NORMAL_WB, 0, 0),
            "data page {} after DMA_UNMAP_SG",
            page
        );
    }
    expect_status(
        &call(function::DMA_UNMAP, &[mapped[1]]),
        Status::BadHandle,
        "DMA_UNMAP of a segment's handle after DMA_UNMAP_SG",
    )?;
    expect_status(
        &unmap_sg(array, 3, 0),
        Status::BadHandle,
        "DMA_UNMAP_SG of the same array again",
    )?;

    // A bad segment stops the call there: the ones before stay mapped until the caller unmaps
    // them (what a Linux driver does when dma_map_sg fails).
    let uart = 0x0900_0000;
    let rows: [(&str, Segment, Status); 4] = [
        (
            "zero size",
            Segment::new(data + 0x200, 0),
            Status::InvalidParameter,
        ),
        (
            "above 16 MiB",
            Segment::new(data, 16 * MIB + 1),
            Status::InvalidParameter,
        ),
        ("in the UART", Segment::new(uart + 0x10, 8), Status::Denied),
        (
            "wrapping",
            Segment::new(u64::MAX - 8, 0x10),
            Status::OutOfRange,
        ),
    ];
    for (what, bad, want) in rows {
        write_segments(array, &[segments[0], bad, segments[1]]);
        let regs = map_sg(array, 3, FROM_DEVICE, 0);
        expect_status(&regs, want, &format!("DMA_MAP_SG with a segment {what}"))?;
        check_eq!(regs.x1, 1, "segments mapped before the one {}", what);
        check_eq!(
            page_state(data)?.2,
            1,
            "pins of the first segment's page ({})",
            what
        );
        let regs = unmap_sg(array, 1, 0);
        expect_status(&regs, Status::Success, "DMA_UNMAP_SG of the mapped one")?;
        check_eq!(
            page_state(data)?.2,
            0,
            "pins after unmapping the mapped one ({})",
            what
        );
    }

    // Many small segments in one page: the call stops after its budget, resumes with the cookie.
    let count = SEGMENTS_PER_CALL + 6;
    let many: Vec<Segment> = (0..count)
        .map(|i| Segment::new(data + i * 0x30, 0x18))
        .collect();
    write_segments(array, &many);
    let regs = map_sg(array, count, TO_DEVICE_DIRECTION, 0);
    expect_status(
        &regs,
        Status::Incomplete,
        "DMA_MAP_SG of many segments, first call",
    )?;
    check_eq!(
        (regs.x1, regs.x2),
        (SEGMENTS_PER_CALL, SEGMENTS_PER_CALL),
        "progress of the first call"
    );
    let regs = map_sg(array, count, TO_DEVICE_DIRECTION, regs.x2);
    expect_status(
        &regs,
        Status::Success,
        "DMA_MAP_SG of many segments, resumed",
    )?;
    check_eq!(regs.x1, count, "segments mapped in all");
    check_eq!(
        page_state(data)?.2,
        count,
        "pins of the page of every segment"
    );
    let regs = unmap_sg(array, count, 0);
    expect_status(
        &regs,
        Status::Incomplete,
        "DMA_UNMAP_SG of many segments, first call",
    )?;
    let regs = unmap_sg(array, count, regs.x2);
    expect_status(
        &regs,
        Status::Success,
        "DMA_UNMAP_SG of many segments, resumed",
    )?;
    check_eq!(
        page_state(data)?,
        (attr::NORMAL_WB, 0, 0),
        "the page after the unmaps"
    );

    // Bad requests.
    let sid = edu::STREAM_ID as u64;
    let requests: [(&str, u32, [u64; 5], Status); 7] = [
        (
            "count 0",
            function::DMA_MAP_SG,
            [sid, array, 0, 0, 0],
            Status::InvalidParameter,
        ),
        (
            "cookie past the end",
            function::DMA_MAP_SG,
            [sid, array, 2, 0, 2],
            Status::InvalidParameter,
        ),
        (
            "direction 3",
            function::DMA_MAP_SG,
            [sid, array, 2, 3, 0],
            Status::InvalidParameter,
        ),
        (
            "misaligned array",
            function::DMA_MAP_SG,
            [sid, array + 4, 2, 0, 0],
            Status::Alignment,
        ),
        (
            "unknown device",
            function::DMA_MAP_SG,
            [0x99, array, 2, 0, 0],
            Status::NoDevice,
        ),
        (
            "array in the UART",
            function::DMA_MAP_SG,
            [sid, uart, 2, 0, 0],
            Status::Denied,
        ),
        (
            "unmap: count 0",
            function::DMA_UNMAP_SG,
            [array, 0, 0, 0, 0],
            Status::InvalidParameter,
        ),
    ];
    for (what, id, args, want) in requests {
        let regs = call(id, &args);
        expect_status(&regs, want, &format!("scatter-gather call with {what}"))?;
    }
    check_eq!(
        page_state(data)?,
        (attr::NORMAL_WB, 0, 0),
        "the page after the refusals"
    );
    Ok(())
}

fn bad_inputs_get_their_own_status() -> Result<(), String> {
    let sid = edu::STREAM_ID as u64;
    let ipa = area(OVERLAP) + 16 * PAGE;
    let end = ram_end();
    let uart = 0x0900_0000;
    let cases: [(&str, [u64; 4], Status); 15] = [
        ("unknown device", [0x99, ipa, PAGE, 0], Status::NoDevice),
        (
            "device u32::MAX",
            [u32::MAX as u64, ipa, PAGE, 0],
            Status::NoDevice,
        ),
        (
            "device above 32 bits",
            [1 << 32 | sid, ipa, PAGE, 0],
            Status::NoDevice,
        ),
        ("direction 3", [sid, ipa, PAGE, 3], Status::InvalidParameter),
        (
            "direction u64::MAX",
            [sid, ipa, PAGE, u64::MAX],
            Status::InvalidParameter,
        ),
        ("zero size", [sid, ipa, 0, 0], Status::InvalidParameter),
        (
            "size above 16 MiB",
            [sid, ipa, 16 * MIB + PAGE, 0],
            Status::InvalidParameter,
        ),
        (
            "bytes across the end of RAM",
            [sid, end - 8, 16, 0],
            Status::OutOfRange,
        ),
        (
            "bytes wrapping",
            [sid, u64::MAX - 7, 16, 0],
            Status::OutOfRange,
        ),
        ("just past RAM", [sid, end, PAGE, 0], Status::OutOfRange),
        (
            "across the end of RAM",
            [sid, end - PAGE, 2 * PAGE, 0],
            Status::OutOfRange,
        ),
        (
            "below RAM",
            [sid, ram_base() - 2 * MIB, PAGE, 0],
            Status::OutOfRange,
        ),
        (
            "wrapping",
            [sid, 0xffff_ffff_ffff_f000, 2 * PAGE, 0],
            Status::OutOfRange,
        ),
        ("the guest's UART", [sid, uart, PAGE, 0], Status::Denied),
        (
            "bytes in the guest's UART",
            [sid, uart + 0x10, 8, 0],
            Status::Denied,
        ),
    ];
    let mut wrong = Vec::new();
    for (what, args, want) in cases {
        let regs = call(function::DMA_MAP, &args);
        if regs.x0 as i64 != want.code() {
            wrong.push(format!(
                "{what}: got {}, expected {}",
                status_name(regs.x0),
                want.name()
            ));
        }
    }
    // Handles: never issued, and one that went stale.
    let handle = map(ipa, PAGE, BIDIRECTIONAL)?;
    unmap(handle)?;
    for (what, bad) in [
        ("stale handle", handle),
        ("handle 0", 0),
        ("handle u64::MAX", u64::MAX),
        ("a handle not issued yet", handle + (1 << 32)),
    ] {
        let regs = call(function::DMA_UNMAP, &[bad]);
        if regs.x0 as i64 != Status::BadHandle.code() {
            wrong.push(format!(
                "DMA_UNMAP {what}: got {}, expected BAD_HANDLE",
                status_name(regs.x0)
            ));
        }
    }
    check!(
        wrong.is_empty(),
        "{} wrong answers: {}",
        wrong.len(),
        wrong.join("; ")
    );
    check_eq!(
        page_state(ipa)?,
        (attr::NORMAL_WB, 0, 0),
        "the test page after the refusals"
    );
    Ok(())
}

fn beyond_guest_ram_is_blocked_and_audited() -> Result<(), String> {
    let edu = Edu::get()?;
    let beyond = ram_end() + MIB;
    let smmu = 0x0905_0000;
    let first = mark()?;
    // Writes into the SMMU's registers (never in any stage 2) and past guest RAM.
    edu.write_to(smmu, PAGE)?;
    edu.write_to(beyond, PAGE)?;
    // A read past guest RAM gives the device zeros; fetch them back into a mapped buffer.
    let buffer = area(BEYOND);
    fill(buffer, PAGE, 17);
    edu.read_from(beyond + PAGE, PAGE)?;
    let handle = map(buffer, PAGE, FROM_DEVICE)?;
    edu.write_to(buffer, PAGE)?;
    unmap(handle)?;
    let bytes = memory(buffer, PAGE);
    let nonzero = (0..PAGE as usize)
        .filter(|&i| edu::read_volatile(bytes, i) != 0)
        .count();
    check_eq!(
        nonzero,
        0,
        "non-zero bytes the device read at {:#x} (past guest RAM)",
        beyond + PAGE
    );
    let records = records_since(first)?;
    for (what, ipa) in [
        ("write to the SMMU", smmu),
        ("write past RAM", beyond),
        ("read past RAM", beyond + PAGE),
    ] {
        check!(
            fault_recorded(&records, ipa),
            "no SMMU fault record for the {} at {:#x}; faults: {}",
            what,
            ipa,
            faults(&records)
        );
    }
    Ok(())
}

const HAMMER_CPUS: usize = 4;
const HAMMER_ITERATIONS: u64 = 40;
/// Pages of each CPU's own region, and of the region all CPUs map.
const OWN_PAGES: u64 = 16;
const COMMON_PAGES: u64 = 16;
/// How long the first CPU waits for the others (the suite's QEMU timeout is 60 s).
const HAMMER_SECONDS: u64 = 40;

/// Unexpected answers met by any CPU.
static PROBLEMS: AtomicUsize = AtomicUsize::new(0);
/// Successful overlapping maps, and BUSY answers to them (strict mode).
static COMMON_MAPPED: AtomicUsize = AtomicUsize::new(0);
static COMMON_BUSY: AtomicUsize = AtomicUsize::new(0);

fn hammer_own(cpu: usize) -> u64 {
    area(HAMMER) + cpu as u64 * OWN_PAGES * PAGE
}

fn hammer_common() -> u64 {
    area(HAMMER) + HAMMER_CPUS as u64 * OWN_PAGES * PAGE
}

fn problem(cpu: usize, what: &str, regs: &Regs) {
    if PROBLEMS.fetch_add(1, Ordering::SeqCst) < 8 {
        println!(
            "dma: CPU {cpu}: {what}: {} (x1 {:#x} x2 {:#x} x3 {:#x})",
            status_name(regs.x0),
            regs.x1,
            regs.x2,
            regs.x3
        );
    }
}

/// One CPU's share: maps in its own region (which must always succeed), checks the pin, and
/// maps a window of the common region that overlaps the other CPUs' windows.
fn hammer(cpu: usize) {
    let mode = mode();
    let sid = edu::STREAM_ID as u64;
    let own = hammer_own(cpu);
    let common = hammer_common();
    for iteration in 0..HAMMER_ITERATIONS {
        let direction = (iteration + cpu as u64) % 3;
        let start = own + (iteration % 8) * PAGE;
        let regs = call(function::DMA_MAP, &[sid, start, 8 * PAGE, direction]);
        if regs.x0 != 0 || regs.x1 != start {
            problem(cpu, "DMA_MAP of its own pages", &regs);
            continue;
        }
        let own_handle = regs.x2;
        let regs = call(function::MEM_GET_ATTR, &[start + 3 * PAGE]);
        if regs.x0 != 0 || regs.x2 & page_flag::PINNED == 0 || regs.x3 != 1 {
            problem(cpu, "MEM_GET_ATTR of a mapped own page", &regs);
        }
        let regs = set_attribute(start, PAGE, attr::NORMAL_NC);
        if regs.x0 as i64 != Status::Busy.code() {
            problem(cpu, "MEM_SET_ATTR of a mapped own page", &regs);
        }
        let window = common + ((cpu as u64 + iteration) % 8) * PAGE;
        let regs = call(function::DMA_MAP, &[sid, window, 8 * PAGE, BIDIRECTIONAL]);
        let common_handle = match regs.x0 as i64 {
            0 => {
                COMMON_MAPPED.fetch_add(1, Ordering::SeqCst);
                Some(regs.x2)
            }
            // ABI 1.0 answered BUSY here in strict mode; 1.1 counts the rights.
            code if code == Status::Busy.code() => {
                COMMON_BUSY.fetch_add(1, Ordering::SeqCst);
                None
            }
            _ => {
                problem(cpu, "DMA_MAP of the common region", &regs);
                None
            }
        };
        let regs = call(
            function::CACHE_OP,
            &[window, 8 * PAGE, cache_op::INVALIDATE],
        );
        if regs.x0 != 0 || regs.x1 != 8 * PAGE {
            problem(cpu, "CACHE_OP INVALIDATE of the common region", &regs);
        }
        let want = if mode.coherent {
            Status::NotRequired
        } else {
            Status::Success
        };
        let regs = call(function::DMA_SYNC, &[own_handle, 0, 8 * PAGE, FOR_DEVICE]);
        if regs.x0 as i64 != want.code() {
            problem(cpu, "DMA_SYNC for the device of its own mapping", &regs);
        }
        if let Some(handle) = common_handle {
            let regs = call(function::DMA_UNMAP, &[handle]);
            if regs.x0 != 0 {
                problem(cpu, "DMA_UNMAP of the common mapping", &regs);
            }
        }
        let regs = call(function::DMA_UNMAP, &[own_handle]);
        if regs.x0 != 0 {
            problem(cpu, "DMA_UNMAP of its own mapping", &regs);
        }
        let regs = call(function::DMA_UNMAP, &[own_handle]);
        if regs.x0 as i64 != Status::BadHandle.code() {
            problem(cpu, "DMA_UNMAP of its own mapping again", &regs);
        }
    }
}

fn four_vcpus_map_and_unmap_concurrently() -> Result<(), String> {
    check!(
        cpu::count() >= HAMMER_CPUS,
        "{} CPUs; the runner row gives 4",
        cpu::count()
    );
    for index in 1..HAMMER_CPUS {
        cpu::start(index, hammer).map_err(|status| format!("CPU_ON {index}: {status}"))?;
    }
    hammer(0);
    for index in 1..HAMMER_CPUS {
        check!(
            cpu::wait_for_state_within(index, cpu::CpuState::Finished, HAMMER_SECONDS),
            "CPU {} did not finish",
            index
        );
    }
    check_eq!(
        PROBLEMS.load(Ordering::SeqCst),
        0,
        "unexpected answers while hammering (printed above)"
    );
    let mapped = COMMON_MAPPED.load(Ordering::SeqCst);
    check!(mapped > 0, "no map of the common region ever succeeded");
    check_eq!(
        COMMON_BUSY.load(Ordering::SeqCst),
        0,
        "BUSY answers to overlapping maps"
    );
    // Every page is write-back and unpinned again.
    let total = HAMMER_CPUS as u64 * OWN_PAGES + COMMON_PAGES;
    let mut wrong = Vec::new();
    for page in 0..total {
        let ipa = area(HAMMER) + page * PAGE;
        let state = page_state(ipa)?;
        if state != (attr::NORMAL_WB, 0, 0) {
            wrong.push(format!("{ipa:#x}: {state:?}"));
        }
    }
    check!(
        wrong.is_empty(),
        "{} pages not (WB, unpinned, 0 pins): {}",
        wrong.len(),
        wrong.iter().take(4).cloned().collect::<Vec<_>>().join("; ")
    );
    // No mapping was left behind in a strict device's tables: the whole area maps again.
    let handle = map(area(HAMMER), total * PAGE, BIDIRECTIONAL)?;
    unmap(handle)?;
    println!(
        "dma: common region mapped {mapped} times, BUSY {} times",
        COMMON_BUSY.load(Ordering::SeqCst)
    );
    Ok(())
}
