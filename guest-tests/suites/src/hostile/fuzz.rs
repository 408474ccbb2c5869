//! The hypercall fuzzer: every vCPU issues [`CALLS_PER_CPU`] HVCs with random function IDs
//! (stagehand's, unknown IDs in its ranges, harmless PSCI/SMCCC IDs, junk) and arguments biased
//! toward edge values (0, page-aligned and misaligned addresses, the bounds of RAM, just past
//! it, 2^64 - 1, MMIO from the device tree, the guest's own code). Per call:
//!
//! - the status is one the ABI documents for that call (docs/abi.md), and where it is
//!   computable from the arguments alone it is exactly that (unknown ID: NOT_SUPPORTED; an
//!   unknown attribute, op or direction, a zero size: INVALID_PARAMETER; ...);
//! - x4-x17 come back as they went in (checked on the registers themselves, around the HVC).
//!
//! Never issued: SYSTEM_OFF, SYSTEM_RESET, CPU_OFF, CPU_ON (and anything else that powers a CPU
//! or the machine). AUDIT_READ only gets buffers in a scratch area or outside RAM, so that the
//! hypervisor never overwrites the guest's own code or stacks. DMA mappings that succeed are
//! unmapped at once; at the end all of RAM is set back to write-back.

use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;
use core::arch::asm;
use core::sync::atomic::{AtomicU64, Ordering};

use guest_rt::{check, cpu, println};
use spin::Mutex;
use stagehand_abi::{attr, function, Regs, Status};

use super::{alive, Rng};
use crate::{hypercall, status_name};

/// HVCs per vCPU.
const CALLS_PER_CPU: u64 = 5000;
const PAGE: u64 = 4096;
const MIB: u64 = 1 << 20;
/// Offset in RAM of the scratch area AUDIT_READ may write.
const SCRATCH: u64 = 40 * MIB;
const SCRATCH_SIZE: u64 = 64 * 1024;

static CALLS: AtomicU64 = AtomicU64::new(0);
static FAILURES: AtomicU64 = AtomicU64::new(0);
/// The first failure of each function ID (up to 8 IDs).
static FIRST: Mutex<Vec<(u32, String)>> = Mutex::new(Vec::new());

/// A call for messages: `0xc6000040(0x0, 0x1000, ...)`.
fn show(id: u32, args: &[u64; 6]) -> String {
    let args: Vec<String> = args.iter().map(|a| format!("{a:#x}")).collect();
    format!("{id:#x}({})", args.join(", "))
}

const STAGEHAND: [u32; 18] = [
    function::CALL_UID,
    function::REVISION,
    function::FEATURES,
    function::MEM_SET_ATTR,
    function::MEM_GET_ATTR,
    function::MEM_QUERY_VA,
    function::CACHE_OP,
    function::CACHE_OP_BATCH,
    function::DEV_INFO,
    function::DMA_MAP,
    function::DMA_UNMAP,
    function::DMA_SYNC,
    function::DMA_MAP_SG,
    function::DMA_UNMAP_SG,
    function::AUDIT_READ,
    function::AUDIT_MARK,
    function::MEM_SET_ATTR,
    function::CACHE_OP,
];

/// PSCI and SMCCC calls that power nothing: PSCI_VERSION, CPU_SUSPEND (returns at once),
/// AFFINITY_INFO, MIGRATE_INFO_TYPE, PSCI_FEATURES; SMCCC_VERSION, SMCCC_ARCH_FEATURES.
const FIRMWARE: [u32; 9] = [
    0x8400_0000,
    0x8400_0001,
    0xc400_0001,
    0x8400_0004,
    0xc400_0004,
    0x8400_0006,
    0x8400_000a,
    0x8000_0000,
    0x8000_0001,
];

/// IDs the fuzzer must not issue as "junk": the PSCI and SMCCC architecture ranges.
fn firmware_range(id: u32) -> bool {
    matches!(id & 0xbfff_ffe0, 0x8400_0000) || (id & 0xbfff_0000) == 0x8000_0000
}

struct Bounds {
    ram_base: u64,
    ram_end: u64,
    image: u64,
    scratch: u64,
    mmio: Vec<u64>,
}

fn bounds() -> Bounds {
    let ram = guest_rt::dt::main_ram();
    let info = guest_rt::dt::boot_info();
    let mut mmio = alloc::vec![info.uart_base as u64, 0x0902_0000, 0x0904_0000, 0x0905_0000];
    for region in [info.gic_distributor, info.gic_redistributors]
        .into_iter()
        .flatten()
    {
        mmio.push(region.base as u64);
    }
    Bounds {
        ram_base: ram.base as u64,
        ram_end: ram.end() as u64,
        image: guest_rt::mmu::image_start() as u64,
        scratch: ram.base as u64 + SCRATCH,
        mmio,
    }
}

fn address(rng: &mut Rng, b: &Bounds) -> u64 {
    match rng.below(20) {
        0 => 0,
        1 => u64::MAX,
        2 => !(PAGE - 1),
        3 => b.ram_base,
        4 => b.ram_end,
        5 => b.ram_end - PAGE,
        6 => b.ram_end + PAGE,
        7 => b.image + rng.below(4) * PAGE,
        8 => rng.pick(&b.mmio),
        9 => (b.ram_base + rng.below(b.ram_end - b.ram_base)) & !(PAGE - 1),
        10 => b.ram_base + rng.below(b.ram_end - b.ram_base),
        11 => b.scratch + rng.pick(&[0, 1, 8, 64, PAGE]),
        12 => 1 << rng.below(64),
        13 => rng.next_u64() & 0xffff_ffff_f000,
        14 => b.ram_base - PAGE,
        15 => b.ram_base + 1,
        _ => rng.next_u64(),
    }
}

fn size(rng: &mut Rng) -> u64 {
    match rng.below(14) {
        0 => 0,
        1 => 1,
        2 => 8,
        3 => 128,
        4 => PAGE,
        5 => PAGE + 1,
        6 => 2 * MIB,
        7 => 16 * MIB,
        8 => 16 * MIB + PAGE,
        9 => u64::MAX,
        10 => 1 << 63,
        11 => !(PAGE - 1),
        12 => rng.below(8) * PAGE,
        _ => rng.next_u64() >> rng.below(64),
    }
}

fn small(rng: &mut Rng) -> u64 {
    match rng.below(6) {
        0..=2 => rng.below(4),
        3 => rng.below(0x200),
        4 => u64::MAX,
        _ => rng.next_u64(),
    }
}

/// One call: function ID and x1-x6.
fn generate(rng: &mut Rng, b: &Bounds) -> (u32, [u64; 6]) {
    let id = match rng.below(10) {
        0..=5 => rng.pick(&STAGEHAND),
        6 => 0xc600_0000 | rng.below(0x100) as u32,
        7 => 0x8600_ff00 | rng.below(0x100) as u32,
        8 => rng.pick(&FIRMWARE),
        _ => loop {
            let id = rng.next_u64() as u32;
            if !firmware_range(id) {
                break id;
            }
        },
    };
    let mut args = [0u64; 6];
    for arg in &mut args {
        *arg = match rng.below(3) {
            0 => address(rng, b),
            1 => size(rng),
            _ => small(rng),
        };
    }
    match id {
        function::MEM_SET_ATTR | function::CACHE_OP => {
            args[1] = size(rng);
            args[2] = small(rng) | rng.pick(&[0, 0, 0x100]);
        }
        function::DMA_MAP => {
            args[2] = size(rng);
            args[3] = small(rng);
        }
        function::AUDIT_READ => {
            // Only a scratch buffer or one that is not RAM.
            args[0] = rng.pick(&[
                0,
                1,
                u64::MAX,
                b.ram_end,
                b.ram_end - 64,
                b.scratch,
                b.scratch + 1,
                b.scratch + 8,
            ]);
            args[1] = if args[0] >= b.scratch && args[0] < b.scratch + PAGE {
                rng.pick(&[0, 1, 127, 128, PAGE, SCRATCH_SIZE - PAGE, u64::MAX, 1 << 40])
            } else {
                size(rng)
            };
        }
        function::CACHE_OP_BATCH => {
            args[1] = rng.pick(&[0, 1, 2, 64, 65, 1 << 24, (1 << 24) + 1, u64::MAX]);
        }
        // Scatter-gather arrays never in readable RAM: a segment read from memory the fuzzer
        // does not control could map (and pin) pages nobody unmaps, and the handle written
        // back could land in memory another vCPU uses. So the calls are refused before any
        // segment is read: the array is outside RAM or misaligned, or the count or the
        // cookie is bad.
        function::DMA_MAP_SG | function::DMA_UNMAP_SG => {
            let at = usize::from(id == function::DMA_MAP_SG);
            args[at] = rng.pick(&[
                0,
                1,
                u64::MAX,
                u64::MAX - 7,
                b.ram_end,
                b.ram_end - 8,
                b.scratch + 4,
                b.scratch + 1,
            ]);
            args[at + 1] = rng.pick(&[0, 1, 2, 64, 65, 1 << 24, (1 << 24) + 1, u64::MAX]);
        }
        _ => {}
    }
    if id == function::DMA_MAP && rng.below(2) == 0 {
        args[0] = u64::from(crate::edu::STREAM_ID);
    }
    (id, args)
}

/// The HVC, with x4-x17 loaded with `preserved` (x4-x6 are arguments too) and compared after.
/// Returns the results and the first register that changed, if any.
fn call(id: u32, args: &[u64; 6], filler: u64) -> (Regs, Option<(usize, u64, u64)>) {
    let mut input = [0u64; 14];
    input[0] = args[3];
    input[1] = args[4];
    input[2] = args[5];
    for (i, value) in input.iter_mut().enumerate().skip(3) {
        *value = filler.rotate_left(i as u32 * 5) ^ i as u64;
    }
    let mut output = input;
    let (x0, x1, x2, x3): (u64, u64, u64, u64);
    // SAFETY: an HVC under the SMCCC: the hypervisor may write x0-x3 (declared) and must
    // preserve the others; x4-x17 are declared in and out so that a change is seen, not
    // assumed away. A buffer argument is in the guest's RAM or rejected by the hypervisor.
    unsafe {
        asm!(
            "hvc #0",
            inout("x0") u64::from(id) => x0,
            inout("x1") args[0] => x1,
            inout("x2") args[1] => x2,
            inout("x3") args[2] => x3,
            inout("x4") output[0], inout("x5") output[1], inout("x6") output[2],
            inout("x7") output[3], inout("x8") output[4], inout("x9") output[5],
            inout("x10") output[6], inout("x11") output[7], inout("x12") output[8],
            inout("x13") output[9], inout("x14") output[10], inout("x15") output[11],
            inout("x16") output[12], inout("x17") output[13],
            options(nostack),
        );
    }
    let changed = (0..14)
        .find(|&i| output[i] != input[i])
        .map(|i| (i + 4, input[i], output[i]));
    (Regs { x0, x1, x2, x3 }, changed)
}

const S: fn(Status) -> i64 = Status::code;

/// What the ABI allows for the call, and the exact status when the arguments decide it.
fn oracle(id: u32, a: &[u64; 6], b: &Bounds) -> (Vec<i64>, Option<i64>) {
    use Status::*;
    let page_misaligned = |x: u64| !x.is_multiple_of(PAGE);
    let valid_op = |op: u64| matches!(op & !0x100, 1..=3) && op >> 9 == 0;
    let in_ram = |x: u64| x >= b.ram_base && x < b.ram_end;
    let list = |statuses: &[Status]| statuses.iter().map(|&s| S(s)).collect::<Vec<i64>>();
    match id {
        function::FEATURES => (list(&[Success]), Some(0)),
        function::MEM_SET_ATTR => {
            let exact = if a[2] > 1 || a[1] == 0 && !page_misaligned(a[0]) {
                Some(S(InvalidParameter))
            } else if a[1] != 0 && (page_misaligned(a[0]) || page_misaligned(a[1])) {
                Some(S(Alignment))
            } else if a[0].checked_add(a[1]).is_none() && a[1] != 0 {
                Some(S(OutOfRange))
            } else {
                None
            };
            let allowed = &[
                Success,
                Incomplete,
                InvalidParameter,
                Alignment,
                OutOfRange,
                Denied,
                Busy,
                NoMemory,
            ];
            (list(allowed), exact)
        }
        function::MEM_GET_ATTR => (
            list(&[Success, OutOfRange, Denied]),
            in_ram(a[0]).then_some(0),
        ),
        function::MEM_QUERY_VA => (
            list(&[Success, InvalidParameter, OutOfRange, Denied]),
            (a[1] > 1).then_some(S(InvalidParameter)),
        ),
        function::CACHE_OP => (
            list(&[Success, Incomplete, InvalidParameter, OutOfRange, Denied]),
            (!valid_op(a[2]) || a[1] == 0).then_some(S(InvalidParameter)),
        ),
        function::CACHE_OP_BATCH => {
            let array_ok = a[0].is_multiple_of(8)
                && in_ram(a[0])
                && a[0].saturating_add(a[1].max(1).saturating_mul(24)) <= b.ram_end;
            let exact = (array_ok && (a[1] == 0 || a[1] > 1 << 24)).then_some(S(InvalidParameter));
            (
                list(&[
                    Success,
                    Incomplete,
                    InvalidParameter,
                    Alignment,
                    OutOfRange,
                    Denied,
                ]),
                exact,
            )
        }
        function::DEV_INFO => (list(&[Success, NoDevice]), None),
        function::DMA_MAP => {
            // Byte-granular from ABI 1.1: any alignment is accepted.
            let exact = if a[3] > 2 || a[2] == 0 || a[2] > 16 * MIB {
                Some(S(InvalidParameter))
            } else {
                None
            };
            let allowed = &[
                Success,
                InvalidParameter,
                NoDevice,
                OutOfRange,
                Denied,
                Busy,
                NoMemory,
                NotSupported,
            ];
            (list(allowed), exact)
        }
        function::DMA_UNMAP => (list(&[Success, Busy, BadHandle]), None),
        function::DMA_MAP_SG | function::DMA_UNMAP_SG => (
            list(&[InvalidParameter, Alignment, OutOfRange, Denied, NoDevice]),
            None,
        ),
        function::DMA_SYNC => (
            list(&[
                Success,
                NotRequired,
                BadHandle,
                InvalidParameter,
                OutOfRange,
            ]),
            None,
        ),
        function::AUDIT_READ => {
            let exact = (a[1] == 0 && a[0].is_multiple_of(8) && in_ram(a[0]))
                .then_some(S(InvalidParameter));
            (
                list(&[
                    Success,
                    InvalidParameter,
                    Alignment,
                    OutOfRange,
                    Denied,
                    NotSupported,
                ]),
                exact,
            )
        }
        function::AUDIT_MARK => (list(&[Success, NotSupported]), None),
        _ if FIRMWARE.contains(&id) => (Vec::new(), None),
        _ => (list(&[NotSupported]), Some(S(NotSupported))),
    }
}

fn judge(id: u32, args: &[u64; 6], regs: &Regs, b: &Bounds) -> Result<(), String> {
    let status = regs.x0 as i64;
    match id {
        function::CALL_UID => {
            let words = stagehand_abi::uuid_words();
            let got = [
                regs.x0 as u32,
                regs.x1 as u32,
                regs.x2 as u32,
                regs.x3 as u32,
            ];
            check!(got == words, "CALL_UID answered {got:x?}");
            return Ok(());
        }
        function::REVISION => {
            check!(
                (regs.x0, regs.x1) == (stagehand_abi::ABI_MAJOR, stagehand_abi::ABI_MINOR),
                "REVISION answered {:#x}.{:#x}",
                regs.x0,
                regs.x1
            );
            return Ok(());
        }
        _ => {}
    }
    let (allowed, exact) = oracle(id, args, b);
    if allowed.is_empty() {
        return Ok(());
    }
    check!(
        allowed.contains(&status),
        "{} answered {}, which the ABI does not allow for this call",
        show(id, args),
        status_name(regs.x0)
    );
    if let Some(want) = exact {
        check!(
            status == want,
            "{} answered {}, expected {}",
            show(id, args),
            status_name(regs.x0),
            status_name(want as u64)
        );
    }
    Ok(())
}

fn fuzz(index: usize) {
    let b = bounds();
    let mut rng = Rng::new(0xf022 + index as u64);
    for _ in 0..CALLS_PER_CPU {
        let (id, args) = generate(&mut rng, &b);
        let (regs, changed) = call(id, &args, rng.next_u64());
        CALLS.fetch_add(1, Ordering::Relaxed);
        let mut verdict = judge(id, &args, &regs, &b);
        if let Some((register, before, after)) = changed {
            verdict = Err(format!(
                "{} changed x{register} from {before:#x} to {after:#x}",
                show(id, &args)
            ));
        }
        if id == function::DMA_MAP && regs.x0 == 0 {
            hypercall(function::DMA_UNMAP, &[regs.x2]);
        }
        if let Err(message) = verdict {
            FAILURES.fetch_add(1, Ordering::Relaxed);
            let mut first = FIRST.lock();
            if first.len() < 8 && first.iter().all(|(f, _)| *f != id) {
                first.push((id, format!("CPU {index}: {message}")));
            }
        }
    }
}

pub(crate) fn hypercall_fuzz() -> Result<(), String> {
    CALLS.store(0, Ordering::SeqCst);
    FAILURES.store(0, Ordering::SeqCst);
    let cpus = cpu::count().min(4);
    for index in 1..cpus {
        cpu::start(index, fuzz).map_err(|e| format!("CPU_ON {index}: {e}"))?;
    }
    fuzz(0);
    for index in 1..cpus {
        check!(
            cpu::wait_for_state_within(index, cpu::CpuState::Finished, 60),
            "CPU {index} did not finish"
        );
    }
    println!(
        "hostile: {} hypercalls fuzzed on {} vCPUs, {} failed their oracle",
        CALLS.load(Ordering::SeqCst),
        cpus,
        FAILURES.load(Ordering::SeqCst)
    );
    // Back to write-back everywhere (the fuzzer made random pages NC).
    let ram = guest_rt::dt::main_ram();
    let (mut at, end) = (ram.base as u64, ram.end() as u64);
    while at < end {
        let regs = hypercall(function::MEM_SET_ATTR, &[at, end - at, attr::NORMAL_WB]);
        check!(
            regs.x0 <= 1 && regs.x1 > 0,
            "MEM_SET_ATTR back to write-back at {at:#x}: {}",
            status_name(regs.x0)
        );
        at += regs.x1;
    }
    let first: Vec<String> = FIRST.lock().iter().map(|(_, m)| m.clone()).collect();
    check!(
        first.is_empty(),
        "{} calls failed their oracle; the first for each function: {}",
        FAILURES.load(Ordering::SeqCst),
        first.join("; ")
    );
    alive("the fuzzer")
}
