//! IPA space outside RAM, page by page: a 32-bit read of each page, then a write of what the
//! read returned; where the read aborted, a write of 0 to one page in [`ABORTED_WRITE_STRIDE`]
//! (each aborted access costs an audit line on the hypervisor's UART, the bulk of the time). Each access gives a value (memory or MMIO the guest owns)
//! or a synchronous external abort (EC 0x25, DFSC 0x10), and the hypervisor lives on. Every
//! page below RAM is swept; above RAM, every page of the first 4 MiB and of the PCIe ECAM, a
//! 2 MiB stride up to 4 GiB, and about 2048 samples per region beyond, up to the top of the
//! IPA space stage 1 can output (PARange, at most 48 bits). Writes to the console UART's page
//! are skipped (counted), so that the console lives.

use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;

use guest_rt::mmu::{self, MemoryType};
use guest_rt::probe::{self, Abort};
use guest_rt::{check_eq, println};

use super::{alive, Failures};

const PAGE: usize = 4096;
const MIB: usize = 1 << 20;
const GIB: usize = 1 << 30;
/// Size of a GICv3 redistributor frame (RD_base + SGI_base).
const GICR_FRAME: usize = 0x2_0000;
/// Where the sweep above RAM maps the gigabyte it probes (above every alias of the runtime).
const WINDOW_VA: usize = 1 << 46;
/// Where a read aborted, the write of 0 goes to one page in this many.
const ABORTED_WRITE_STRIDE: usize = 8;
/// Pages between two REVISION checks.
const BATCH: usize = 4096;

#[derive(Default)]
struct Tally {
    pages: u64,
    values: u64,
    aborts: u64,
    writes: u64,
    writes_skipped: u64,
}

fn judge(result: Result<(), Abort>, what: &str, ipa: usize, failures: &mut Failures) -> bool {
    match result {
        Ok(()) => true,
        Err(abort) if abort.is_external_data_abort() => false,
        Err(abort) => {
            failures.add(format!("{what} {ipa:#x}: {abort:?}"));
            false
        }
    }
}

/// Reads then writes `va` (which maps IPA `ipa`), judging both.
fn probe_page(va: usize, ipa: usize, tally: &mut Tally, failures: &mut Failures) {
    tally.pages += 1;
    let read = probe::read_u32(va);
    let value = *read.as_ref().unwrap_or(&0);
    if judge(read.map(|_| ()), "read", ipa, failures) {
        tally.values += 1;
    } else {
        tally.aborts += 1;
    }
    if ipa & !(PAGE - 1) == guest_rt::dt::boot_info().uart_base & !(PAGE - 1) {
        tally.writes_skipped += 1;
        return;
    }
    if read.is_err() && !(ipa / PAGE).is_multiple_of(ABORTED_WRITE_STRIDE) {
        return;
    }
    tally.writes += 1;
    if !judge(probe::write_u32(va, value), "write", ipa, failures) {
        tally.aborts += 1;
    }
}

fn one_read(ipa: usize) -> Result<(), String> {
    mmu::map_identity(ipa, PAGE, MemoryType::Device)
        .map_err(|e| format!("mapping {ipa:#x}: {e:?}"))?;
    let mut failures = Failures::default();
    let read = probe::read_u32(ipa);
    println!("hostile: read {ipa:#x}: {read:x?}");
    judge(read.map(|_| ()), "read", ipa, &mut failures);
    failures.result("access")?;
    alive(&format!("a read of {ipa:#x}"))
}

fn redistributors() -> Result<guest_rt::dt::Region, String> {
    guest_rt::dt::boot_info()
        .gic_redistributors
        .ok_or_else(|| String::from("no GICv3 redistributor region in the device tree"))
}

pub(crate) fn unpopulated_redistributor_frame_0x080c0000() -> Result<(), String> {
    one_read(0x080c_0000)
}

pub(crate) fn redistributor_0x080e0000() -> Result<(), String> {
    one_read(0x080e_0000)
}

pub(crate) fn first_unpopulated_redistributor_frame() -> Result<(), String> {
    let region = redistributors()?;
    let cpus = guest_rt::dt::boot_info().cpu_mpidrs.len();
    one_read(region.base + cpus * GICR_FRAME)
}

/// A 32-bit write of a pattern to the upper half of a 64-bit register of CPU 0's RD_base frame
/// must read back 0 (LPIs cannot be enabled: the register reads 0 and ignores writes).
fn upper_half_reads_zero(offset: usize, name: &str) -> Result<(), String> {
    let address = redistributors()?.base + offset;
    probe::write_u32(address, 0x0000_7e57).map_err(|a| format!("write {name}: {a:?}"))?;
    let value = probe::read_u32(address).map_err(|a| format!("read {name}: {a:?}"))?;
    check_eq!(value, 0, "{name} read back after a 32-bit write of 0x7e57");
    let whole = probe::read_u64(address - 4).map_err(|a| format!("read {name}: {a:?}"))?;
    check_eq!(whole, 0, "64-bit read of the register after it");
    alive(name)
}

pub(crate) fn propbaser_upper_half_reads_zero() -> Result<(), String> {
    upper_half_reads_zero(0x74, "GICR_PROPBASER[63:32]")
}

pub(crate) fn pendbaser_upper_half_reads_zero() -> Result<(), String> {
    upper_half_reads_zero(0x7c, "GICR_PENDBASER[63:32]")
}

pub(crate) fn sweep_below_ram() -> Result<(), String> {
    let ram = guest_rt::dt::main_ram();
    let mut tally = Tally::default();
    let mut failures = Failures::default();
    // The runtime identity-maps the low 1 GiB as Device.
    for (n, ipa) in (0..ram.base.min(GIB)).step_by(PAGE).enumerate() {
        probe_page(ipa, ipa, &mut tally, &mut failures);
        if n % BATCH == BATCH - 1 {
            alive(&format!("pages up to {ipa:#x}"))?;
        }
    }
    println!(
        "hostile: {} pages swept below RAM ({:#x}): {} reads gave a value, {} writes, {} accesses aborted, {} writes skipped (console UART)",
        tally.pages, ram.base, tally.values, tally.writes, tally.aborts, tally.writes_skipped
    );
    failures.result("access")
}

/// The top of the IPA space stage 1 can output: 2^PARange bits, at most 48.
fn ipa_top() -> usize {
    let bits = match guest_rt::read_sysreg!(id_aa64mmfr0_el1) & 0xf {
        0 => 32,
        1 => 36,
        2 => 40,
        3 => 42,
        4 => 44,
        _ => 48,
    };
    1 << bits
}

/// The PCIe ECAM and 64-bit window from the device tree (empty when absent).
fn described_above(floor: usize) -> Vec<(usize, usize)> {
    let mut regions = Vec::new();
    let tree = guest_rt::dt::tree();
    if let Some(node) = tree.find_compatible(&["pci-host-ecam-generic"]) {
        if let Some(reg) = node.reg().and_then(|mut r| r.next()) {
            regions.push((reg.starting_address as usize, reg.size.unwrap_or(0)));
        }
        if let Some(ranges) = node.property("ranges") {
            let cell = |i: usize| -> usize {
                let b = &ranges.value[4 * i..4 * i + 4];
                u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize
            };
            for entry in 0..ranges.value.len() / 28 {
                let base = entry * 7;
                let cpu = cell(base + 3) << 32 | cell(base + 4);
                let size = cell(base + 5) << 32 | cell(base + 6);
                regions.push((cpu, size));
            }
        }
    }
    regions.retain(|&(base, size)| base >= floor && size > 0);
    regions.sort();
    regions
}

fn gap_stride(span: usize) -> usize {
    (span / 2048).next_multiple_of(2 * MIB).max(2 * MIB)
}

pub(crate) fn sweep_above_ram() -> Result<(), String> {
    let ram = guest_rt::dt::main_ram();
    let top = ipa_top();
    let low_end = (4 * GIB).min(top);
    let mut plan: Vec<(usize, usize, usize)> = Vec::new();
    plan.push((ram.end(), ram.end() + 4 * MIB, PAGE));
    plan.push((ram.end() + 4 * MIB, low_end, 2 * MIB));
    let mut cursor = low_end;
    for (base, size) in described_above(low_end) {
        let end = (base + size).min(top);
        if base >= top || base < cursor {
            continue;
        }
        if base > cursor {
            plan.push((cursor, base, gap_stride(base - cursor)));
        }
        // Dense where it is small (the ECAM: every page), sampled where it is huge.
        let stride = if size <= 256 * MIB {
            PAGE
        } else {
            gap_stride(size)
        };
        plan.push((base, end, stride));
        cursor = end;
    }
    if cursor < top {
        plan.push((cursor, top, gap_stride(top - cursor)));
    }
    let mut tally = Tally::default();
    let mut failures = Failures::default();
    let mut mapped: Option<usize> = None;
    let mut n = 0usize;
    for &(start, end, stride) in &plan {
        let mut ipa = start;
        while ipa < end {
            let gib = ipa & !(GIB - 1);
            if mapped != Some(gib) {
                mmu::map(WINDOW_VA, gib, GIB, MemoryType::Device)
                    .map_err(|e| format!("mapping {gib:#x}: {e:?}"))?;
                mapped = Some(gib);
            }
            probe_page(WINDOW_VA + (ipa - gib), ipa, &mut tally, &mut failures);
            n += 1;
            if n.is_multiple_of(BATCH) {
                alive(&format!("pages up to {ipa:#x}"))?;
            }
            ipa += stride;
        }
    }
    println!(
        "hostile: {} pages sampled above RAM ({:#x} to {:#x}): {} reads gave a value, {} writes, {} accesses aborted",
        tally.pages,
        ram.end(),
        top,
        tally.values,
        tally.writes,
        tally.aborts
    );
    failures.result("access")
}
