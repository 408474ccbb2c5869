//! DMA attacks with QEMU's `edu` (StreamID 0x10), in strict mode (row `hostile`, declared
//! non-coherent) and shared mode (row `hostile-dma`); the mode is read from FEATURES.
//!
//! - Escapes: edu writes to and reads from IOVAs outside what it may reach (past RAM, flash,
//!   fw_cfg, the SMMU, the hypervisor's UART, and in strict mode guest pages never mapped for
//!   it). A blocked write changes nothing the guest can see; a blocked read gives the device
//!   nothing (zeros, or its buffer stays as it was).
//! - The split/merge race: edu writes a mapped page 40 times while the other vCPUs toggle
//!   MEM_SET_ATTR NC/WB on other pages of the same 2 MiB block (splitting and merging it);
//!   the CPU zeroes the page before each write, and every write must land.
//! - The audit-order interleaving (strict): two vCPUs toggle one page's attribute while a third
//!   maps and unmaps it; the runner replays the audit stream with `audit-report`, which must
//!   find no violation. Likewise a strict DMA_MAP of a range that is part NC, part WB.
//!
//! Each edu DMA takes 100 ms of virtual time.

use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;
use core::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use guest_rt::{check, cpu, println};
use spin::Mutex;
use stagehand_abi::{attr, feature, function, Status, PAGE_SIZE};

use super::alive;
use crate::edu::{self, Edu};
use crate::{expect_status, hypercall, status_name};

const PAGE: u64 = PAGE_SIZE;
const MIB: u64 = 1 << 20;
/// Work areas, as offsets from the start of guest RAM (the image lies in the first 4 MiB).
const INTERLEAVE: u64 = 16 * MIB;
const MIXED: u64 = 18 * MIB;
const ESCAPE: u64 = 20 * MIB;
const RACE_SOURCE: u64 = 22 * MIB;
const RACE_BLOCK: u64 = 24 * MIB;

use stagehand_abi::dma_direction::{BIDIRECTIONAL, FROM_DEVICE, TO_DEVICE};

/// Rounds of each vCPU in the interleaving.
const INTERLEAVE_ROUNDS: u64 = 300;
/// DMA writes in the race.
const RACE_WRITES: usize = 40;

fn area(offset: u64) -> u64 {
    guest_rt::dt::main_ram().base as u64 + offset
}

fn strict() -> bool {
    hypercall(function::FEATURES, &[]).x1 & feature::DMA_STRICT != 0
}

fn memory(ipa: u64) -> &'static mut [u8] {
    // SAFETY: guest RAM past the image (see the offsets above), one test at a time; the device
    // writes it behind the compiler's back, so reads go through `edu::read_volatile`.
    unsafe { core::slice::from_raw_parts_mut(ipa as *mut u8, PAGE as usize) }
}

fn pattern(index: usize, seed: u8) -> u8 {
    (index as u8).wrapping_mul(29).wrapping_add(seed) ^ (index >> 8) as u8 | 1
}

fn fill(ipa: u64, seed: u8) {
    let bytes = memory(ipa);
    for (i, byte) in bytes.iter_mut().enumerate() {
        *byte = pattern(i, seed);
    }
    edu::clean_invalidate(bytes);
}

fn zero(ipa: u64) {
    let bytes = memory(ipa);
    bytes.fill(0);
    edu::clean_invalidate(bytes);
}

/// Bytes of the page at `ipa` that differ from the pattern `seed` (or from zero for `None`).
fn differing(ipa: u64, seed: Option<u8>) -> usize {
    let bytes = memory(ipa);
    edu::clean_invalidate(bytes);
    (0..PAGE as usize)
        .filter(|&i| edu::read_volatile(bytes, i) != seed.map_or(0, |s| pattern(i, s)))
        .count()
}

fn map(ipa: u64, size: u64, direction: u64) -> Result<u64, String> {
    let regs = hypercall(
        function::DMA_MAP,
        &[u64::from(edu::STREAM_ID), ipa, size, direction],
    );
    expect_status(
        &regs,
        Status::Success,
        &format!("DMA_MAP {ipa:#x}+{size:#x} dir {direction}"),
    )?;
    Ok(regs.x2)
}

fn unmap(handle: u64) -> Result<(), String> {
    let regs = hypercall(function::DMA_UNMAP, &[handle]);
    expect_status(&regs, Status::Success, &format!("DMA_UNMAP {handle:#x}"))
}

fn set_attribute(ipa: u64, size: u64, attribute: u64) -> stagehand_abi::Regs {
    hypercall(function::MEM_SET_ATTR, &[ipa, size, attribute])
}

/// MEM_SET_ATTR until it is not BUSY (a vCPU may still be finishing with the page).
fn settle(ipa: u64, size: u64, attribute: u64) -> Result<(), String> {
    for _ in 0..1000 {
        let regs = set_attribute(ipa, size, attribute);
        if regs.x0 as i64 != Status::Busy.code() {
            return expect_status(&regs, Status::Success, &format!("MEM_SET_ATTR {ipa:#x}"));
        }
    }
    Err(format!("MEM_SET_ATTR {ipa:#x} stayed BUSY"))
}

/// State shared with the worker vCPUs of a test.
static STOP: AtomicBool = AtomicBool::new(false);
static CALLS: AtomicU64 = AtomicU64::new(0);
static ERRORS: Mutex<Vec<String>> = Mutex::new(Vec::new());
/// The page (interleaving) or block (race) the workers work on.
static TARGET: AtomicU64 = AtomicU64::new(0);

fn error(message: String) {
    let mut errors = ERRORS.lock();
    if errors.len() < 6 {
        errors.push(message);
    }
}

fn start_workers(work: fn(usize)) -> Result<usize, String> {
    STOP.store(false, Ordering::SeqCst);
    CALLS.store(0, Ordering::SeqCst);
    ERRORS.lock().clear();
    let workers = cpu::count().min(4).saturating_sub(1);
    check!(
        workers >= 3,
        "needs 4 vCPUs, the device tree has {}",
        cpu::count()
    );
    for index in 1..=workers {
        cpu::start(index, work).map_err(|e| format!("CPU_ON {index}: {e}"))?;
    }
    Ok(workers)
}

fn join_workers(workers: usize) -> Result<(), String> {
    STOP.store(true, Ordering::SeqCst);
    for index in 1..=workers {
        check!(
            cpu::wait_for_state_within(index, cpu::CpuState::Finished, 60),
            "CPU {index} did not finish"
        );
        if let Some(mpidr) = cpu::mpidr(index) {
            cpu::wait_for_affinity(mpidr, 1, 1_000_000);
        }
    }
    let errors = ERRORS.lock();
    check!(errors.is_empty(), "{}", errors.join("; "));
    Ok(())
}

/// vCPUs 1 and 2: toggle the page's attribute; vCPU 3: map and unmap it.
fn interleave_worker(index: usize) {
    let page = TARGET.load(Ordering::SeqCst);
    for round in 0..INTERLEAVE_ROUNDS {
        if index == 3 {
            let regs = hypercall(
                function::DMA_MAP,
                &[u64::from(edu::STREAM_ID), page, PAGE, round % 3],
            );
            CALLS.fetch_add(1, Ordering::Relaxed);
            match Status::from_code(regs.x0 as i64) {
                Some(Status::Success) => {
                    let unmapped = hypercall(function::DMA_UNMAP, &[regs.x2]);
                    CALLS.fetch_add(1, Ordering::Relaxed);
                    if unmapped.x0 != 0 {
                        error(format!("DMA_UNMAP: {}", status_name(unmapped.x0)));
                    }
                }
                Some(Status::Busy) => {}
                _ => error(format!("DMA_MAP {page:#x}: {}", status_name(regs.x0))),
            }
        } else {
            let attribute = (round + index as u64) % 2;
            let regs = set_attribute(page, PAGE, attribute);
            CALLS.fetch_add(1, Ordering::Relaxed);
            if !matches!(
                Status::from_code(regs.x0 as i64),
                Some(Status::Success | Status::Busy)
            ) {
                error(format!(
                    "MEM_SET_ATTR {page:#x} {attribute}: {}",
                    status_name(regs.x0)
                ));
            }
        }
    }
}

pub(crate) fn audit_order_interleaving() -> Result<(), String> {
    let page = area(INTERLEAVE);
    TARGET.store(page, Ordering::SeqCst);
    let workers = start_workers(interleave_worker)?;
    join_workers(workers)?;
    settle(page, PAGE, attr::NORMAL_WB)?;
    println!(
        "hostile: {} calls interleaved on {page:#x} (the runner replays the audit stream)",
        CALLS.load(Ordering::SeqCst)
    );
    alive("the interleaving")
}

pub(crate) fn strict_map_of_a_mixed_nc_wb_range() -> Result<(), String> {
    let base = area(MIXED);
    settle(base + 2 * PAGE, 3 * PAGE, attr::NORMAL_NC)?;
    let handle = map(base, 7 * PAGE, BIDIRECTIONAL)?;
    unmap(handle)?;
    settle(base + 2 * PAGE, 3 * PAGE, attr::NORMAL_WB)?;
    alive("the mixed mapping")
}

pub(crate) fn escapes_are_blocked() -> Result<(), String> {
    let strict = strict();
    let edu = Edu::get()?;
    let ram = guest_rt::dt::main_ram();
    let staging = area(ESCAPE);
    let landing = staging + PAGE;
    let unmapped = staging + 2 * PAGE;
    fill(staging, 0x5a);
    zero(landing);
    fill(unmapped, 0x3c);
    let to_device = map(staging, PAGE, TO_DEVICE)?;
    let from_device = map(landing, PAGE, FROM_DEVICE)?;
    let mut failures = Vec::new();
    // Outside the guest's RAM and MMIO: no mode lets the device reach these.
    let mut outside: Vec<(u64, &str)> = alloc::vec![
        (ram.end() as u64, "the first page past RAM"),
        (ram.end() as u64 + 64 * MIB, "RAM end + 64 MiB"),
        (0, "flash"),
        (0x0902_0000, "fw_cfg"),
        (0x0905_0000, "the SMMU"),
        (0x0904_0000, "the hypervisor's UART"),
    ];
    // Reads first: each must give the device nothing: QEMU either leaves the device's buffer as
    // it was (the staging pattern loaded just before) or fills it with zeros.
    if strict {
        outside.push((unmapped, "a guest page never mapped for the device"));
        outside.push((ram.base as u64, "the first page of guest RAM (not mapped)"));
    }
    for &(iova, what) in &outside {
        edu.read_from(staging, PAGE)?;
        edu.read_from(iova, PAGE)?;
        edu.write_to(landing, PAGE)?;
        let (not_zero, not_staging) = (differing(landing, None), differing(landing, Some(0x5a)));
        if not_zero != 0 && not_staging != 0 {
            failures.push(format!(
                "a DMA read of {what} ({iova:#x}) gave the device data ({not_zero} non-zero bytes, {not_staging} not the staging pattern)"
            ));
        }
    }
    // Then writes of the pattern; the guest-visible pages must not change.
    edu.read_from(staging, PAGE)?;
    for &(iova, what) in &outside {
        if iova == 0x0904_0000 {
            // Garbage in the hypervisor's log would hide the rest; it was read above.
            continue;
        }
        edu.write_to(iova, PAGE)?;
        alive(&format!("a DMA write to {what}"))?;
    }
    if strict {
        let changed = differing(unmapped, Some(0x3c));
        if changed != 0 {
            failures.push(format!(
                "a DMA write changed {changed} bytes of an unmapped guest page"
            ));
        }
    }
    // The device still reaches what it was given.
    zero(landing);
    edu.write_to(landing, PAGE)?;
    let wrong = differing(landing, Some(0x5a));
    if wrong != 0 {
        failures.push(format!(
            "the mapped landing page got {wrong} wrong bytes afterwards"
        ));
    }
    unmap(to_device)?;
    unmap(from_device)?;
    check!(failures.is_empty(), "{}", failures.join("; "));
    alive("the escapes")
}

/// Toggles pages of the race block (never the mapped one) between NC and WB until told to stop.
fn race_worker(index: usize) {
    let block = TARGET.load(Ordering::SeqCst);
    let mut round = 0u64;
    while !STOP.load(Ordering::SeqCst) {
        let page = block + ((index as u64 * 97 + round * 13) % 256) * PAGE;
        for attribute in [attr::NORMAL_NC, attr::NORMAL_WB] {
            let regs = set_attribute(page, PAGE, attribute);
            CALLS.fetch_add(1, Ordering::Relaxed);
            if !matches!(
                Status::from_code(regs.x0 as i64),
                Some(Status::Success | Status::Busy)
            ) {
                error(format!(
                    "MEM_SET_ATTR {page:#x} {attribute}: {}",
                    status_name(regs.x0)
                ));
            }
        }
        round += 1;
    }
    // Leave every page of the block write-back.
    for k in 0..256 {
        let page = block + k * PAGE;
        while set_attribute(page, PAGE, attr::NORMAL_WB).x0 as i64 == Status::Busy.code() {}
    }
}

pub(crate) fn split_merge_race_loses_no_write() -> Result<(), String> {
    let edu = Edu::get()?;
    let source = area(RACE_SOURCE);
    let block = area(RACE_BLOCK);
    // The mapped page, in the upper half of the block; the workers toggle the lower half.
    let target = block + 300 * PAGE;
    fill(source, 0xa5);
    let to_device = map(source, PAGE, TO_DEVICE)?;
    edu.read_from(source, PAGE)?;
    unmap(to_device)?;
    let handle = map(target, PAGE, FROM_DEVICE)?;
    TARGET.store(block, Ordering::SeqCst);
    let workers = start_workers(race_worker)?;
    let mut lost = Vec::new();
    for write in 0..RACE_WRITES {
        zero(target);
        edu.write_to(target, PAGE)?;
        let wrong = differing(target, Some(0xa5));
        if wrong != 0 {
            lost.push(format!("#{write}: {wrong} bytes"));
        }
    }
    let joined = join_workers(workers);
    unmap(handle)?;
    println!(
        "hostile: {} DMA writes during {} attribute changes in the block of {target:#x}; {} lost",
        RACE_WRITES,
        CALLS.load(Ordering::SeqCst),
        lost.len()
    );
    joined?;
    check!(
        lost.is_empty(),
        "{} of {} DMA writes did not land ({})",
        lost.len(),
        RACE_WRITES,
        lost.join(", ")
    );
    alive("the race")
}
