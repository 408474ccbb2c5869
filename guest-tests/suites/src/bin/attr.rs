//! Suite `attr`: the attribute and cache-maintenance calls (MEM_SET_ATTR, MEM_GET_ATTR,
//! MEM_QUERY_VA, CACHE_OP, CACHE_OP_BATCH) and the driver library over them, from a guest with
//! 4 vCPUs. The same guest runs twice (runner rows `attr` and `attr-nofwb`): with the
//! hypervisor's default FEAT_S2FWB encodings and with `fwb=off`; the row passes what FEATURES
//! must say as `stagehand.expect_fwb=on|off` on the command line, and the suite's name is its
//! binary's name.
//!
//! QEMU models no caches, so cache maintenance is judged by what the calls answer (status, bytes
//! done, flags) and by data staying intact; attributes are judged by MEM_GET_ATTR and by the
//! CPU's own two-stage translation (MEM_QUERY_VA).
#![no_std]
#![no_main]

extern crate alloc;

use alloc::format;
use alloc::string::String;
use alloc::vec;
use alloc::vec::Vec;
use core::sync::atomic::{AtomicU64, AtomicU8, AtomicUsize, Ordering};

use guest_rt::mmu::{self, MemoryType};
use guest_rt::{arch, check, check_eq, cpu, println};
use guest_suites::{expect_status, status_name};
use stagehand_abi::driver::{
    Access, Addressing, Attribute, Batch, BatchEntry, Client, Conduit, Error, Hvc, Operation, Range,
};
use stagehand_abi::{
    attr, batch, cache_op, feature, function, mair, page_flag, Regs, Status, PAGE_SIZE,
};

guest_rt::main!(main);

/// The suite's name: `attr` or `attr-nofwb`, after the binary.
const SUITE: &str = env!("CARGO_BIN_NAME");

fn main() -> ! {
    guest_rt::test::run_suite(
        SUITE,
        &guest_rt::tests![
            layout_fits,
            features_match_the_configuration,
            bad_inputs_get_their_own_status,
            batch_bad_inputs_get_their_own_status,
            get_attribute_reports_defaults,
            block_kept_split_and_merged,
            effective_attributes_follow_set_attribute,
            own_non_cacheable_alias_combines_with_stage_2,
            range_of_64_mib_takes_several_calls,
            library_loops_over_64_mib,
            unaligned_range_splits_and_merges_edge_blocks,
            cache_ops_by_va_on_an_alias,
            cache_ops_by_va_across_discontiguous_pages,
            cache_op_reports_progress_before_a_fault,
            cache_op_by_ipa_any_byte_range,
            batch_of_scattered_buffers,
            batch_resumes_with_cookie,
            data_survives_wb_nc_wb,
            four_vcpus_hammer_overlapping_ranges,
        ],
    )
}

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;
const BLOCK: u64 = 2 * MIB;

/// Where each test works, as offsets from the start of guest RAM. The image (with its stacks,
/// heap and page tables) lies in the first 4 MiB; the device tree in the last 2 MiB.
const BLOCK_TESTS: u64 = 16 * MIB;
const QUERY_TESTS: u64 = 18 * MIB;
const DATA_TESTS: u64 = 20 * MIB;
const CMO_TESTS: u64 = 32 * MIB;
const BATCH_TESTS: u64 = 40 * MIB;
const LARGE: u64 = 64 * MIB;
const LARGE_SIZE: u64 = 64 * MIB;
const HAMMER: u64 = 160 * MIB;
const HAMMER_SIZE: u64 = 4 * MIB;
/// Guest RAM the suite needs (the runner row gives it `ram=512M`).
const MIN_RAM: u64 = 256 * MIB;

/// Guest VAs for hand-made mappings, far from the identity map and from `mmu::map_alias`.
const SCRATCH_VA: u64 = 1 << 46;

fn ram_base() -> u64 {
    guest_rt::dt::main_ram().base as u64
}

fn ram_end() -> u64 {
    guest_rt::dt::main_ram().end() as u64
}

fn area(offset: u64) -> u64 {
    ram_base() + offset
}

fn line_size() -> u64 {
    guest_rt::arch::dcache_line_size() as u64
}

/// One raw hypercall with up to three arguments.
fn call(function: u32, x1: u64, x2: u64, x3: u64) -> Regs {
    guest_suites::hypercall(function, &[x1, x2, x3])
}

/// A conduit that counts the calls it passes on.
struct Counting {
    calls: u32,
}

impl Conduit for Counting {
    fn call(&mut self, function: u32, args: [u64; 6]) -> Regs {
        self.calls += 1;
        Hvc.call(function, args)
    }
}

fn counting_client() -> Client<Counting> {
    Client::new(Counting { calls: 0 })
}

fn client() -> Client<Hvc> {
    Client::new(Hvc)
}

/// MEM_GET_ATTR as (attribute, flags, pins), failing on any status but SUCCESS.
fn page(ipa: u64) -> Result<(u64, u64, u64), String> {
    let regs = call(function::MEM_GET_ATTR, ipa, 0, 0);
    expect_status(&regs, Status::Success, &format!("MEM_GET_ATTR {ipa:#x}"))?;
    Ok((regs.x1, regs.x2, regs.x3))
}

/// MEM_SET_ATTR of a whole range with the library, failing on any error.
fn set(ipa: u64, size: u64, attribute: Attribute) -> Result<(), String> {
    client()
        .set_attribute(Range::new(ipa, size), attribute)
        .map_err(|e| format!("MEM_SET_ATTR {ipa:#x}+{size:#x} {attribute:?}: {e}"))
}

/// MEM_QUERY_VA as (IPA, effective, stage 1).
fn query(va: u64) -> Result<(u64, u64, u64), String> {
    let regs = call(function::MEM_QUERY_VA, va, 0, 0);
    expect_status(&regs, Status::Success, &format!("MEM_QUERY_VA {va:#x}"))?;
    Ok((regs.x1, regs.x2, regs.x3))
}

/// Whether this run expects FWB, from `stagehand.expect_fwb=on|off` on the command line.
fn expected_fwb() -> Result<bool, String> {
    let tree = guest_rt::dt::tree();
    let bootargs = tree.chosen().bootargs().unwrap_or("");
    match bootargs
        .split_whitespace()
        .find_map(|arg| arg.strip_prefix("stagehand.expect_fwb="))
    {
        Some("on") => Ok(true),
        Some("off") => Ok(false),
        other => Err(format!(
            "the command line ({bootargs:?}) must say stagehand.expect_fwb=on|off, not {other:?}"
        )),
    }
}

fn fwb() -> bool {
    call(function::FEATURES, 0, 0, 0).x1 & feature::FWB != 0
}

/// A byte pattern that depends on the address and a seed.
fn pattern(address: u64, seed: u64) -> u64 {
    (address ^ seed).wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ seed.rotate_left(17)
}

fn fill(va: u64, len: u64, seed: u64) {
    for at in (va..va + len).step_by(8) {
        // SAFETY: callers pass ranges of test memory that this suite maps and owns.
        unsafe { (at as *mut u64).write_volatile(pattern(at - va, seed)) };
    }
}

/// The first word of `[va, va + len)` that does not hold the pattern, if any.
fn verify(va: u64, len: u64, seed: u64) -> Result<(), String> {
    for at in (va..va + len).step_by(8) {
        // SAFETY: as in `fill`.
        let value = unsafe { (at as *const u64).read_volatile() };
        check!(
            value == pattern(at - va, seed),
            "word at {:#x} (offset {:#x}) is {:#x}, expected {:#x}",
            at,
            at - va,
            value,
            pattern(at - va, seed)
        );
    }
    Ok(())
}

fn layout_fits() -> Result<(), String> {
    let ram = guest_rt::dt::main_ram();
    check!(
        ram.size as u64 >= MIN_RAM,
        "guest RAM {:#x} bytes, the suite needs {:#x}",
        ram.size,
        MIN_RAM
    );
    check!(
        (mmu::image_end() as u64) < area(BLOCK_TESTS),
        "the image ends at {:#x}, inside the test areas",
        mmu::image_end()
    );
    check!(
        area(BLOCK_TESTS).is_multiple_of(BLOCK),
        "RAM base {:#x} not 2 MiB aligned",
        ram_base()
    );
    Ok(())
}

fn features_match_the_configuration() -> Result<(), String> {
    let want_fwb = expected_fwb()?;
    let regs = call(function::FEATURES, 0, 0, 0);
    expect_status(&regs, Status::Success, "FEATURES")?;
    check_eq!(
        regs.x1 & feature::FWB != 0,
        want_fwb,
        "FEATURES x1 {:#x} bit 0 (FWB)",
        regs.x1
    );
    check!(
        regs.x1 & feature::VA_ADDRESSING != 0,
        "FEATURES x1 {:#x} lacks VA addressing",
        regs.x1
    );
    check_eq!(regs.x2, line_size(), "FEATURES x2 (D-cache line)");
    check_eq!(regs.x3, 2 * MIB, "FEATURES x3 (budget per call)");
    let features = client()
        .features()
        .map_err(|e| format!("library features(): {e}"))?;
    check_eq!(
        (features.fwb(), features.line_size, features.budget),
        (want_fwb, line_size(), 2 * MIB),
        "library features()"
    );
    Ok(())
}

/// One bad input: the call, its arguments and the status it must get.
struct BadInput {
    what: String,
    function: u32,
    args: [u64; 3],
    status: Status,
}

fn bad(what: &str, function: u32, args: [u64; 3], status: Status) -> BadInput {
    BadInput {
        what: String::from(what),
        function,
        args,
        status,
    }
}

/// Addresses outside guest RAM that belong to the hypervisor or to nobody: flash at 0, fw_cfg,
/// the hypervisor's own UART, physical RAM past the guest's, and the top of the IPA space.
fn foreign_addresses() -> [(&'static str, u64); 5] {
    [
        ("flash", 0),
        ("fw_cfg", 0x0902_0000),
        ("hypervisor UART", 0x0904_0000),
        ("RAM past the guest's", ram_end() + 64 * MIB),
        ("top of the IPA space", 0xffff_ffff_f000),
    ]
}

fn bad_inputs_get_their_own_status() -> Result<(), String> {
    use function::{CACHE_OP, MEM_GET_ATTR, MEM_QUERY_VA, MEM_SET_ATTR};
    use Status::{Alignment, Denied, InvalidParameter, OutOfRange};
    let target = area(BLOCK_TESTS);
    let end = ram_end();
    let uart = guest_rt::dt::boot_info().uart_base as u64;
    let nc = attr::NORMAL_NC;
    let mut table = vec![
        // MEM_SET_ATTR
        bad(
            "set: attribute 2",
            MEM_SET_ATTR,
            [target, PAGE_SIZE, 2],
            InvalidParameter,
        ),
        bad(
            "set: attribute -1",
            MEM_SET_ATTR,
            [target, PAGE_SIZE, u64::MAX],
            InvalidParameter,
        ),
        bad(
            "set: zero size",
            MEM_SET_ATTR,
            [target, 0, nc],
            InvalidParameter,
        ),
        bad(
            "set: misaligned IPA",
            MEM_SET_ATTR,
            [target + 8, PAGE_SIZE, nc],
            Alignment,
        ),
        bad(
            "set: misaligned size",
            MEM_SET_ATTR,
            [target, 100, nc],
            Alignment,
        ),
        bad(
            "set: wrapping",
            MEM_SET_ATTR,
            [!0xfff, 2 * PAGE_SIZE, nc],
            OutOfRange,
        ),
        bad(
            "set: past the end of RAM",
            MEM_SET_ATTR,
            [end - PAGE_SIZE, 2 * PAGE_SIZE, nc],
            OutOfRange,
        ),
        bad(
            "set: just past RAM",
            MEM_SET_ATTR,
            [end, PAGE_SIZE, nc],
            OutOfRange,
        ),
        bad(
            "set: below RAM",
            MEM_SET_ATTR,
            [ram_base() - PAGE_SIZE, 2 * PAGE_SIZE, nc],
            OutOfRange,
        ),
        bad(
            "set: guest UART",
            MEM_SET_ATTR,
            [uart, PAGE_SIZE, nc],
            Denied,
        ),
        bad(
            "set: GIC distributor",
            MEM_SET_ATTR,
            [0x0800_0000, PAGE_SIZE, nc],
            Denied,
        ),
        // MEM_GET_ATTR
        bad("get: just past RAM", MEM_GET_ATTR, [end, 0, 0], OutOfRange),
        bad("get: guest UART", MEM_GET_ATTR, [uart + 4, 0, 0], Denied),
        bad("get: wrapping", MEM_GET_ATTR, [u64::MAX, 0, 0], OutOfRange),
        // MEM_QUERY_VA
        bad(
            "query: access 2",
            MEM_QUERY_VA,
            [target, 2, 0],
            InvalidParameter,
        ),
        bad(
            "query: VA unmapped at stage 1",
            MEM_QUERY_VA,
            [SCRATCH_VA - PAGE_SIZE, 0, 0],
            InvalidParameter,
        ),
        bad(
            "query: VA of the guest UART",
            MEM_QUERY_VA,
            [uart, 0, 0],
            Denied,
        ),
        bad(
            "query: VA of fw_cfg (no guest IPA)",
            MEM_QUERY_VA,
            [0x0902_0000, 0, 0],
            OutOfRange,
        ),
        // CACHE_OP
        bad("cache: op 0", CACHE_OP, [target, 64, 0], InvalidParameter),
        bad("cache: op 4", CACHE_OP, [target, 64, 4], InvalidParameter),
        bad(
            "cache: VA flag alone",
            CACHE_OP,
            [target, 64, cache_op::FLAG_VA],
            InvalidParameter,
        ),
        bad(
            "cache: unknown flag 0x200",
            CACHE_OP,
            [target, 64, 0x201],
            InvalidParameter,
        ),
        bad(
            "cache: high flag bit",
            CACHE_OP,
            [target, 64, 1 << 40 | 1],
            InvalidParameter,
        ),
        bad(
            "cache: zero size",
            CACHE_OP,
            [target, 0, cache_op::CLEAN],
            InvalidParameter,
        ),
        bad(
            "cache: wrapping",
            CACHE_OP,
            [u64::MAX - 63, 128, cache_op::CLEAN],
            OutOfRange,
        ),
        bad(
            "cache: within 2 MiB of 2^64",
            CACHE_OP,
            [u64::MAX - 127, 64, cache_op::CLEAN],
            OutOfRange,
        ),
        bad(
            "cache: past the end of RAM",
            CACHE_OP,
            [end - 64, 128, cache_op::CLEAN],
            OutOfRange,
        ),
        bad(
            "cache: guest UART",
            CACHE_OP,
            [uart, 64, cache_op::CLEAN],
            Denied,
        ),
        bad(
            "cache: VA of the guest UART",
            CACHE_OP,
            [uart, 64, cache_op::CLEAN | cache_op::FLAG_VA],
            Denied,
        ),
        bad(
            "cache: VA unmapped",
            CACHE_OP,
            [SCRATCH_VA - PAGE_SIZE, 64, 0x101],
            InvalidParameter,
        ),
        bad(
            "cache: VA of fw_cfg",
            CACHE_OP,
            [0x0902_0000, 64, 0x103],
            OutOfRange,
        ),
    ];
    for (name, address) in foreign_addresses() {
        let aligned = address & !(PAGE_SIZE - 1);
        for (call_name, function, args) in [
            ("set", MEM_SET_ATTR, [aligned, PAGE_SIZE, nc]),
            ("get", MEM_GET_ATTR, [address, 0, 0]),
            ("cache", CACHE_OP, [address, 64, cache_op::CLEAN_INVALIDATE]),
        ] {
            table.push(BadInput {
                what: format!("{call_name}: {name} at {address:#x}"),
                function,
                args,
                status: OutOfRange,
            });
        }
    }
    let mut failures = Vec::new();
    for row in &table {
        let regs = call(row.function, row.args[0], row.args[1], row.args[2]);
        if regs.x0 as i64 != row.status.code() || regs.x1 != 0 {
            failures.push(format!(
                "{}: got {} x1 {:#x}, expected {} x1 0",
                row.what,
                status_name(regs.x0),
                regs.x1,
                row.status.name()
            ));
        }
    }
    // Nothing changed on the way.
    check_eq!(
        page(area(BLOCK_TESTS))?.0,
        attr::NORMAL_WB,
        "attribute after the refusals"
    );
    check!(
        failures.is_empty(),
        "{} of {} rows: {}",
        failures.len(),
        table.len(),
        failures.join("; ")
    );
    Ok(())
}

fn batch_bad_inputs_get_their_own_status() -> Result<(), String> {
    use Status::{Alignment, Denied, InvalidParameter, OutOfRange};
    let buffer = area(BATCH_TESTS);
    let uart = guest_rt::dt::boot_info().uart_base as u64;
    let good = BatchEntry::new(
        Range::new(buffer, 4 * KIB),
        Operation::Clean,
        Addressing::Ipa,
    );
    let mut entries = vec![good; 4];
    let array = entries.as_ptr() as u64; // The heap is identity-mapped: VA = IPA.
    let run = |entries: &[BatchEntry], array: u64, count: u64, cookie: u64| {
        core::hint::black_box(entries.as_ptr());
        call(function::CACHE_OP_BATCH, array, count, cookie)
    };
    // Array-level refusals: nothing is done (x1 0).
    // (what, array, count, cookie, status, entries done)
    let array_rows: [(&str, u64, u64, u64, Status, u64); 9] = [
        ("zero count", array, 0, 0, InvalidParameter, 0),
        (
            "count over the maximum",
            array,
            batch::MAX_ENTRIES + 1,
            0,
            InvalidParameter,
            0,
        ),
        ("misaligned array", array + 4, 3, 0, Alignment, 0),
        ("array past RAM", ram_end(), 1, 0, OutOfRange, 0),
        ("array runs off RAM", ram_end() - 24, 2, 0, OutOfRange, 0),
        (
            "array longer than RAM",
            ram_end() - 64 * MIB,
            batch::MAX_ENTRIES,
            0,
            OutOfRange,
            0,
        ),
        ("array in flash", 0, 1, 0, OutOfRange, 0),
        (
            "cookie names entry 4 of 4",
            array,
            4,
            4 << batch::COOKIE_ENTRY_SHIFT,
            InvalidParameter,
            0,
        ),
        // A cookie offset is checked when its entry is reached: entry 1 is where it stops.
        (
            "cookie offset past entry 1",
            array,
            4,
            (1 << batch::COOKIE_ENTRY_SHIFT) | (4 * KIB),
            InvalidParameter,
            1,
        ),
    ];
    let mut failures = Vec::new();
    for (what, array, count, cookie, want, done) in array_rows {
        let regs = run(&entries, array, count, cookie);
        if regs.x0 as i64 != want.code() || regs.x1 != done {
            failures.push(format!(
                "{what}: got {} x1 {}, expected {} x1 {done}",
                status_name(regs.x0),
                regs.x1,
                want.name()
            ));
        }
    }
    // Entry-level refusals at entry 2: entries 0 and 1 are done first (x1 2).
    let entry_rows: [(&str, BatchEntry, Status); 9] = [
        (
            "reserved word set",
            BatchEntry {
                reserved: 1,
                ..good
            },
            InvalidParameter,
        ),
        (
            "zero size",
            BatchEntry { size: 0, ..good },
            InvalidParameter,
        ),
        ("op 0", BatchEntry { op: 0, ..good }, InvalidParameter),
        ("op 4", BatchEntry { op: 4, ..good }, InvalidParameter),
        (
            "unknown flag",
            BatchEntry { op: 0x201, ..good },
            InvalidParameter,
        ),
        (
            "address past RAM",
            BatchEntry {
                address: ram_end(),
                ..good
            },
            OutOfRange,
        ),
        (
            "guest UART",
            BatchEntry {
                address: uart,
                size: 64,
                ..good
            },
            Denied,
        ),
        (
            "unmapped VA",
            BatchEntry {
                address: SCRATCH_VA - PAGE_SIZE,
                op: 0x101,
                ..good
            },
            InvalidParameter,
        ),
        (
            "wrapping",
            BatchEntry {
                address: u64::MAX - 63,
                size: 128,
                ..good
            },
            OutOfRange,
        ),
    ];
    for (what, entry, want) in entry_rows {
        entries[2] = entry;
        let regs = run(&entries, array, 4, 0);
        if regs.x0 as i64 != want.code() || regs.x1 != 2 {
            failures.push(format!(
                "entry 2 {what}: got {} x1 {}, expected {} x1 2",
                status_name(regs.x0),
                regs.x1,
                want.name()
            ));
        }
    }
    // The same batch resumed past the bad entry completes.
    let regs = run(&entries, array, 4, 3 << batch::COOKIE_ENTRY_SHIFT);
    if regs.x0 != 0 || regs.x1 != 4 || regs.x2 != 0 {
        failures.push(format!(
            "resumed past the bad entry: got {} x1 {} x2 {:#x}",
            status_name(regs.x0),
            regs.x1,
            regs.x2
        ));
    }
    // The library reports the first error.
    let mut storage = [BatchEntry::default(); 2];
    let storage_ipa = storage.as_ptr() as u64;
    let mut batch =
        Batch::new(&mut storage, storage_ipa).map_err(|e| format!("Batch::new: {e}"))?;
    let _ = batch.push(Range::new(buffer, 64), Operation::Clean, Addressing::Ipa);
    let _ = batch.push(Range::new(uart, 64), Operation::Clean, Addressing::Ipa);
    let submitted = client().submit(&batch);
    if submitted != Err(Error::Denied) {
        failures.push(format!("library submit with a UART entry: {submitted:?}"));
    }
    check!(failures.is_empty(), "{}", failures.join("; "));
    Ok(())
}

fn get_attribute_reports_defaults() -> Result<(), String> {
    for ipa in [
        area(BLOCK_TESTS),
        area(BLOCK_TESTS) + 0x1234,
        area(LARGE) + LARGE_SIZE - 1,
    ] {
        check_eq!(
            page(ipa)?,
            (attr::NORMAL_WB, page_flag::BLOCK_MAPPED, 0),
            "MEM_GET_ATTR {:#x} (attribute, flags, pins)",
            ipa
        );
    }
    let info = client()
        .attribute(area(BLOCK_TESTS))
        .map_err(|e| format!("library attribute(): {e}"))?;
    check!(
        info.attribute == Attribute::WriteBack
            && info.block_mapped
            && !info.pinned
            && info.pins == 0,
        "library attribute(): {:?}",
        info
    );
    Ok(())
}

fn block_kept_split_and_merged() -> Result<(), String> {
    let region = area(BLOCK_TESTS);
    let nc = attr::NORMAL_NC;
    let wb = attr::NORMAL_WB;
    // A whole aligned block changes as a block.
    let regs = call(function::MEM_SET_ATTR, region, BLOCK, nc);
    expect_status(&regs, Status::Success, "MEM_SET_ATTR of a whole block")?;
    check_eq!(regs.x1, BLOCK, "bytes done");
    for ipa in [region, region + MIB, region + BLOCK - 1] {
        check_eq!(
            page(ipa)?,
            (nc, page_flag::BLOCK_MAPPED, 0),
            "{:#x} after NC of the block",
            ipa
        );
    }
    let regs = call(function::MEM_SET_ATTR, region, BLOCK, wb);
    expect_status(&regs, Status::Success, "MEM_SET_ATTR back to WB")?;
    check_eq!(
        page(region)?,
        (wb, page_flag::BLOCK_MAPPED, 0),
        "after WB of the block"
    );
    // One page splits the block.
    let regs = call(function::MEM_SET_ATTR, region + PAGE_SIZE, PAGE_SIZE, nc);
    expect_status(&regs, Status::Success, "MEM_SET_ATTR of one page")?;
    check_eq!(regs.x1, PAGE_SIZE, "bytes done");
    check_eq!(
        page(region + PAGE_SIZE)?,
        (nc, 0, 0),
        "the page after the split"
    );
    check_eq!(page(region)?, (wb, 0, 0), "its neighbour after the split");
    check_eq!(
        page(region + BLOCK - PAGE_SIZE)?,
        (wb, 0, 0),
        "the block's last page"
    );
    // Setting the same attribute again changes nothing.
    let regs = call(function::MEM_SET_ATTR, region + PAGE_SIZE, PAGE_SIZE, nc);
    expect_status(&regs, Status::Success, "MEM_SET_ATTR repeated")?;
    check_eq!(
        page(region + PAGE_SIZE)?,
        (nc, 0, 0),
        "the page after a repeat"
    );
    // Undoing merges it back.
    let regs = call(function::MEM_SET_ATTR, region + PAGE_SIZE, PAGE_SIZE, wb);
    expect_status(&regs, Status::Success, "MEM_SET_ATTR undo")?;
    for ipa in [region, region + PAGE_SIZE, region + BLOCK - PAGE_SIZE] {
        check_eq!(
            page(ipa)?,
            (wb, page_flag::BLOCK_MAPPED, 0),
            "{:#x} after the undo",
            ipa
        );
    }
    // Two halves made NC one after the other merge into an NC block, and back.
    set(region, MIB, Attribute::NonCacheable)?;
    check_eq!(page(region)?, (nc, 0, 0), "first half NC");
    set(region + MIB, MIB, Attribute::NonCacheable)?;
    check_eq!(
        page(region + MIB)?,
        (nc, page_flag::BLOCK_MAPPED, 0),
        "both halves NC"
    );
    set(region + 4 * PAGE_SIZE, 8 * PAGE_SIZE, Attribute::WriteBack)?;
    check_eq!(
        page(region + 4 * PAGE_SIZE)?,
        (wb, 0, 0),
        "a hole punched back to WB"
    );
    check_eq!(page(region)?, (nc, 0, 0), "around the hole");
    set(region, BLOCK, Attribute::WriteBack)?;
    check_eq!(
        page(region + 5 * PAGE_SIZE)?,
        (wb, page_flag::BLOCK_MAPPED, 0),
        "all WB again"
    );
    Ok(())
}

fn effective_attributes_follow_set_attribute() -> Result<(), String> {
    let region = area(QUERY_TESTS);
    let target = region + 3 * PAGE_SIZE;
    // The guest's own mapping of RAM is the identity, write-back.
    for (what, ipa, size) in [
        ("one page", target, PAGE_SIZE),
        ("a whole block", region, BLOCK),
    ] {
        let va = target + 0x123;
        check_eq!(
            query(va)?,
            (va, mair::NORMAL_WB, mair::NORMAL_WB),
            "{} before (IPA, effective, stage 1)",
            what
        );
        set(ipa, size, Attribute::NonCacheable)?;
        check_eq!(
            query(va)?,
            (va, mair::NORMAL_NC, mair::NORMAL_WB),
            "{} NC (IPA, effective, stage 1)",
            what
        );
        let write = call(function::MEM_QUERY_VA, va, 1, 0);
        expect_status(&write, Status::Success, "MEM_QUERY_VA for a write")?;
        check_eq!(
            (write.x2, write.x3),
            (mair::NORMAL_NC, mair::NORMAL_WB),
            "{} NC, write access",
            what
        );
        if size == PAGE_SIZE {
            check_eq!(
                query(va + PAGE_SIZE)?.1,
                mair::NORMAL_WB,
                "the next page stays WB"
            );
        }
        set(ipa, size, Attribute::WriteBack)?;
        check_eq!(
            query(va)?,
            (va, mair::NORMAL_WB, mair::NORMAL_WB),
            "{} back to WB",
            what
        );
    }
    // The library's view.
    let info = client()
        .query_va(target, Access::Write)
        .map_err(|e| format!("library query_va: {e}"))?;
    check_eq!(
        (info.ipa, info.effective as u64, info.stage1 as u64),
        (target, 0xff, 0xff),
        "library query_va"
    );
    Ok(())
}

fn own_non_cacheable_alias_combines_with_stage_2() -> Result<(), String> {
    // The guest's own NC mapping of a WB page: with FWB, stage 2's "forced write-back" wins
    // (0xff); without, the combination is the weaker NC (0x44). Over an NC page both are NC.
    let ipa = area(QUERY_TESTS) + 8 * PAGE_SIZE;
    let alias = mmu::map_alias(
        ipa as usize,
        PAGE_SIZE as usize,
        MemoryType::NormalNonCacheable,
    )
    .map_err(|e| format!("map_alias: {e:?}"))? as u64;
    check!(alias != ipa, "the alias VA equals the IPA");
    let over_wb = if fwb() {
        mair::NORMAL_WB
    } else {
        mair::NORMAL_NC
    };
    check_eq!(
        query(alias)?,
        (ipa, over_wb, mair::NORMAL_NC),
        "NC alias over WB (fwb {})",
        fwb()
    );
    set(ipa, PAGE_SIZE, Attribute::NonCacheable)?;
    check_eq!(
        query(alias)?,
        (ipa, mair::NORMAL_NC, mair::NORMAL_NC),
        "NC alias over NC"
    );
    set(ipa, PAGE_SIZE, Attribute::WriteBack)?;
    check_eq!(
        query(alias)?,
        (ipa, over_wb, mair::NORMAL_NC),
        "NC alias over WB again"
    );
    Ok(())
}

/// Issues a range call raw until SUCCESS; checks that every call but the last answers
/// INCOMPLETE with `step` bytes done. Returns the number of calls.
fn raw_range(function: u32, start: u64, size: u64, x3: u64, step: u64) -> Result<u32, String> {
    let (mut at, mut calls) = (start, 0u32);
    loop {
        let remaining = start + size - at;
        let regs = call(function, at, remaining, x3);
        calls += 1;
        check!(calls <= 1000, "no end after 1000 calls");
        let want = if remaining <= step {
            Status::Success
        } else {
            Status::Incomplete
        };
        expect_status(
            &regs,
            want,
            &format!("call {calls} at {at:#x}, {remaining:#x} left"),
        )?;
        check_eq!(
            regs.x1,
            remaining.min(step),
            "bytes done by call {} at {:#x}",
            calls,
            at
        );
        if want == Status::Success {
            return Ok(calls);
        }
        at += regs.x1;
    }
}

fn range_of_64_mib_takes_several_calls() -> Result<(), String> {
    let start = area(LARGE);
    let calls = raw_range(
        function::MEM_SET_ATTR,
        start,
        LARGE_SIZE,
        attr::NORMAL_NC,
        BLOCK,
    )?;
    check_eq!(calls, 32, "MEM_SET_ATTR calls for 64 MiB to NC");
    for ipa in [start, start + 33 * MIB, start + LARGE_SIZE - PAGE_SIZE] {
        check_eq!(
            page(ipa)?,
            (attr::NORMAL_NC, page_flag::BLOCK_MAPPED, 0),
            "{:#x} after 64 MiB to NC",
            ipa
        );
        check_eq!(
            query(ipa)?.1,
            mair::NORMAL_NC,
            "effective attribute of {:#x}",
            ipa
        );
    }
    check_eq!(
        page(start + LARGE_SIZE)?.0,
        attr::NORMAL_WB,
        "the page after the range"
    );
    // Cache maintenance over the same 64 MiB: the budget is 2 MiB per call here too.
    for op in [
        cache_op::CLEAN,
        cache_op::INVALIDATE,
        cache_op::CLEAN_INVALIDATE,
    ] {
        let calls = raw_range(function::CACHE_OP, start, LARGE_SIZE, op, BLOCK)?;
        check_eq!(calls, 32, "CACHE_OP {} calls for 64 MiB", op);
    }
    let calls = raw_range(
        function::MEM_SET_ATTR,
        start,
        LARGE_SIZE,
        attr::NORMAL_WB,
        BLOCK,
    )?;
    check_eq!(calls, 32, "MEM_SET_ATTR calls for 64 MiB back to WB");
    check_eq!(
        page(start + 40 * MIB)?,
        (attr::NORMAL_WB, page_flag::BLOCK_MAPPED, 0),
        "back to WB"
    );
    Ok(())
}

fn library_loops_over_64_mib() -> Result<(), String> {
    let range = Range::new(area(LARGE), LARGE_SIZE);
    for attribute in [Attribute::NonCacheable, Attribute::WriteBack] {
        let mut client = counting_client();
        client
            .set_attribute(range, attribute)
            .map_err(|e| format!("set_attribute {attribute:?}: {e}"))?;
        check_eq!(
            client.conduit().calls,
            32,
            "library calls for 64 MiB to {:?}",
            attribute
        );
        check_eq!(
            page(range.start + 63 * MIB)?.0,
            attribute.abi(),
            "attribute after the library's loop"
        );
        check_eq!(
            Attribute::from_abi(page(range.start)?.0),
            Some(attribute),
            "first page"
        );
    }
    let mut client = counting_client();
    let outcome = client
        .clean_invalidate(
            Range::new(area(LARGE) + 100, LARGE_SIZE - 200),
            Addressing::Ipa,
        )
        .map_err(|e| format!("clean_invalidate of 64 MiB: {e}"))?;
    check!(!outcome.widened, "widened without DMA pins");
    check!(
        (32..=33).contains(&client.conduit().calls),
        "{} calls for an unaligned 64 MiB",
        client.conduit().calls
    );
    Ok(())
}

fn unaligned_range_splits_and_merges_edge_blocks() -> Result<(), String> {
    // 4 MiB starting 1 MiB + 4 KiB into a block: three calls (to the first block boundary, one
    // whole block, the rest), the two edge blocks split, the middle one kept.
    let base = area(LARGE);
    let start = base + MIB + PAGE_SIZE;
    let regs = call(function::MEM_SET_ATTR, start, 4 * MIB, attr::NORMAL_NC);
    expect_status(&regs, Status::Incomplete, "first call")?;
    check_eq!(
        regs.x1,
        MIB - PAGE_SIZE,
        "the first call stops at the block boundary"
    );
    let mut client = counting_client();
    client
        .set_attribute(
            Range::new(start + regs.x1, 4 * MIB - regs.x1),
            Attribute::NonCacheable,
        )
        .map_err(|e| format!("set_attribute: {e}"))?;
    check_eq!(client.conduit().calls, 2, "library calls for the rest");
    check_eq!(
        page(start - PAGE_SIZE)?,
        (attr::NORMAL_WB, 0, 0),
        "the page before the range"
    );
    check_eq!(page(start)?, (attr::NORMAL_NC, 0, 0), "the first page");
    check_eq!(
        page(base + BLOCK)?,
        (attr::NORMAL_NC, page_flag::BLOCK_MAPPED, 0),
        "the middle block"
    );
    check_eq!(
        page(start + 4 * MIB - PAGE_SIZE)?,
        (attr::NORMAL_NC, 0, 0),
        "the last page"
    );
    check_eq!(
        page(start + 4 * MIB)?,
        (attr::NORMAL_WB, 0, 0),
        "the page after"
    );
    set(start, 4 * MIB, Attribute::WriteBack)?;
    for ipa in [base, base + BLOCK, base + 2 * BLOCK] {
        check_eq!(
            page(ipa)?,
            (attr::NORMAL_WB, page_flag::BLOCK_MAPPED, 0),
            "block {:#x} merged",
            ipa
        );
    }
    Ok(())
}

fn cache_ops_by_va_on_an_alias() -> Result<(), String> {
    let ipa = area(CMO_TESTS);
    let size = 64 * KIB;
    let va = mmu::map_alias(ipa as usize, size as usize, MemoryType::NormalWriteBack)
        .map_err(|e| format!("map_alias: {e:?}"))? as u64;
    check!(va != ipa, "the alias VA equals the IPA");
    check_eq!(
        query(va + 0x2345)?,
        (ipa + 0x2345, mair::NORMAL_WB, mair::NORMAL_WB),
        "the alias translates"
    );
    fill(va, size, 1);
    for op in [
        cache_op::CLEAN,
        cache_op::CLEAN_INVALIDATE,
        cache_op::INVALIDATE,
    ] {
        let regs = call(function::CACHE_OP, va, size, op | cache_op::FLAG_VA);
        expect_status(&regs, Status::Success, &format!("CACHE_OP {op} by VA"))?;
        check_eq!(
            (regs.x1, regs.x2),
            (size, 0),
            "CACHE_OP {} by VA: bytes done, flags",
            op
        );
        if op != cache_op::INVALIDATE {
            verify(va, size, 1).map_err(|e| format!("after op {op}, through the alias: {e}"))?;
            verify(ipa, size, 1)
                .map_err(|e| format!("after op {op}, through the identity map: {e}"))?;
        }
    }
    // Partial lines at both ends of a true invalidate: the bytes done are the bytes asked for.
    fill(va, size, 2);
    let regs = call(
        function::CACHE_OP,
        va + 3,
        200,
        cache_op::INVALIDATE | cache_op::FLAG_VA,
    );
    expect_status(&regs, Status::Success, "INVALIDATE of 200 bytes at +3")?;
    check_eq!((regs.x1, regs.x2), (200, 0), "bytes done, flags");
    // Through the library, the same VA range, every operation.
    let mut client = client();
    let range = Range::new(va + 1, size - 2);
    for (operation, outcome) in [
        (Operation::Clean, client.clean(range, Addressing::Va)),
        (
            Operation::CleanInvalidate,
            client.clean_invalidate(range, Addressing::Va),
        ),
        (
            Operation::Invalidate,
            client.invalidate(range, Addressing::Va),
        ),
    ] {
        let outcome = outcome.map_err(|e| format!("library {operation:?} by VA: {e}"))?;
        check!(!outcome.widened, "{:?} widened without DMA pins", operation);
    }
    // A VA range larger than the budget: two calls.
    let big_ipa = area(CMO_TESTS) + 2 * MIB;
    let big_va = mmu::map_alias(
        big_ipa as usize,
        (4 * MIB) as usize,
        MemoryType::NormalWriteBack,
    )
    .map_err(|e| format!("map_alias: {e:?}"))? as u64;
    fill(big_va, 4 * MIB, 3);
    let calls = raw_range(
        function::CACHE_OP,
        big_va,
        4 * MIB,
        cache_op::CLEAN | cache_op::FLAG_VA,
        BLOCK,
    )?;
    check_eq!(calls, 2, "calls for 4 MiB by VA");
    verify(big_ipa, 4 * MIB, 3)
}

/// Maps two pages that are 1 MiB apart in IPA space at consecutive VAs.
fn map_discontiguous(va: u64, ipa: u64) -> Result<(), String> {
    for (i, target) in [ipa, ipa + MIB].into_iter().enumerate() {
        mmu::map(
            (va + i as u64 * PAGE_SIZE) as usize,
            target as usize,
            PAGE_SIZE as usize,
            MemoryType::NormalWriteBack,
        )
        .map_err(|e| format!("map: {e:?}"))?;
    }
    Ok(())
}

fn cache_ops_by_va_across_discontiguous_pages() -> Result<(), String> {
    let va = SCRATCH_VA;
    let ipa = area(CMO_TESTS) + 6 * MIB;
    map_discontiguous(va, ipa)?;
    check_eq!(query(va + PAGE_SIZE)?.0, ipa + MIB, "the second page's IPA");
    fill(va, 2 * PAGE_SIZE, 4);
    for op in [
        cache_op::CLEAN,
        cache_op::CLEAN_INVALIDATE,
        cache_op::INVALIDATE,
    ] {
        let regs = call(
            function::CACHE_OP,
            va + 100,
            2 * PAGE_SIZE - 200,
            op | cache_op::FLAG_VA,
        );
        expect_status(
            &regs,
            Status::Success,
            &format!("CACHE_OP {op} across the pages"),
        )?;
        check_eq!(
            (regs.x1, regs.x2),
            (2 * PAGE_SIZE - 200, 0),
            "bytes done, flags"
        );
        if op != cache_op::INVALIDATE {
            verify(va, 2 * PAGE_SIZE, 4)?;
        }
    }
    verify(ipa, PAGE_SIZE, 4)?;
    // The library finds that the two pages are not one IPA buffer.
    let contiguous = client().ipa_of_buffer(va, 2 * PAGE_SIZE);
    check_eq!(
        contiguous,
        Err(Error::InvalidParameter),
        "ipa_of_buffer across the pages"
    );
    check_eq!(
        client().ipa_of_buffer(va + 8, 16),
        Ok(ipa + 8),
        "ipa_of_buffer in one page"
    );
    Ok(())
}

fn cache_op_reports_progress_before_a_fault() -> Result<(), String> {
    // One mapped page, then an unmapped one: the first page is done, then the fault.
    let va = SCRATCH_VA + 4 * PAGE_SIZE;
    let ipa = area(CMO_TESTS) + 7 * MIB;
    mmu::map(
        va as usize,
        ipa as usize,
        PAGE_SIZE as usize,
        MemoryType::NormalWriteBack,
    )
    .map_err(|e| format!("map: {e:?}"))?;
    let regs = call(
        function::CACHE_OP,
        va,
        2 * PAGE_SIZE,
        cache_op::CLEAN | cache_op::FLAG_VA,
    );
    expect_status(
        &regs,
        Status::InvalidParameter,
        "CACHE_OP into an unmapped page",
    )?;
    check_eq!(regs.x1, PAGE_SIZE, "bytes done before the fault");
    let mut client = counting_client();
    check_eq!(
        client.clean(Range::new(va, 2 * PAGE_SIZE), Addressing::Va),
        Err(Error::InvalidParameter),
        "library clean into an unmapped page"
    );
    check_eq!(client.conduit().calls, 1, "library calls");
    Ok(())
}

fn cache_op_by_ipa_any_byte_range() -> Result<(), String> {
    let base = area(CMO_TESTS) + MIB;
    let line = line_size();
    fill(base, 64 * KIB, 5);
    for (start, size) in [
        (1, 1),
        (line - 1, 2),
        (0, line),
        (7, 3 * PAGE_SIZE),
        (PAGE_SIZE - 5, 10),
        (0, 64 * KIB),
    ] {
        for op in [
            cache_op::CLEAN,
            cache_op::INVALIDATE,
            cache_op::CLEAN_INVALIDATE,
        ] {
            let regs = call(function::CACHE_OP, base + start, size, op);
            expect_status(
                &regs,
                Status::Success,
                &format!("CACHE_OP {op} at +{start:#x} size {size:#x}"),
            )?;
            check_eq!(
                (regs.x1, regs.x2),
                (size, 0),
                "CACHE_OP {} at +{:#x}: bytes done, flags",
                op,
                start
            );
        }
    }
    verify(base, 64 * KIB, 5)?;
    // On an NC page a CMO is still performed and succeeds.
    set(base, PAGE_SIZE, Attribute::NonCacheable)?;
    let regs = call(function::CACHE_OP, base + 8, 256, cache_op::INVALIDATE);
    expect_status(&regs, Status::Success, "INVALIDATE on an NC page")?;
    check_eq!(
        (regs.x1, regs.x2),
        (256, 0),
        "bytes done, flags on an NC page"
    );
    set(base, PAGE_SIZE, Attribute::WriteBack)?;
    verify(base, 64 * KIB, 5)
}

/// Fills `entries` with 64 scattered 4 KiB buffers (every 64 KiB of the batch area), mixing
/// operations and addressing (VA through an alias for every third).
fn scattered_entries(entries: &mut [BatchEntry], alias: u64) {
    let base = area(BATCH_TESTS);
    let ops = [
        Operation::Clean,
        Operation::Invalidate,
        Operation::CleanInvalidate,
    ];
    for (i, entry) in entries.iter_mut().enumerate() {
        let offset = (i as u64 % 64) * 64 * KIB;
        let (address, addressing) = if i % 3 == 2 {
            (alias + offset, Addressing::Va)
        } else {
            (base + offset, Addressing::Ipa)
        };
        *entry = BatchEntry::new(Range::new(address, 4 * KIB), ops[i % 3], addressing);
    }
}

/// What a batch entry asks for, as the library's `push` takes it.
fn parts(entry: &BatchEntry) -> (Range, Operation, Addressing) {
    let operation = match u64::from(entry.op) & 0xff {
        cache_op::CLEAN => Operation::Clean,
        cache_op::INVALIDATE => Operation::Invalidate,
        _ => Operation::CleanInvalidate,
    };
    let addressing = if u64::from(entry.op) & cache_op::FLAG_VA != 0 {
        Addressing::Va
    } else {
        Addressing::Ipa
    };
    (Range::new(entry.address, entry.size), operation, addressing)
}

fn batch_alias() -> Result<u64, String> {
    static ALIAS: AtomicU64 = AtomicU64::new(0);
    let existing = ALIAS.load(Ordering::SeqCst);
    if existing != 0 {
        return Ok(existing);
    }
    let va = mmu::map_alias(
        area(BATCH_TESTS) as usize,
        (4 * MIB) as usize,
        MemoryType::NormalWriteBack,
    )
    .map_err(|e| format!("map_alias: {e:?}"))? as u64;
    ALIAS.store(va, Ordering::SeqCst);
    Ok(va)
}

fn batch_of_scattered_buffers() -> Result<(), String> {
    let alias = batch_alias()?;
    fill(area(BATCH_TESTS), 4 * MIB, 6);
    let mut entries = vec![BatchEntry::default(); 64];
    scattered_entries(&mut entries, alias);
    core::hint::black_box(entries.as_ptr());
    let array = entries.as_ptr() as u64;
    let regs = call(function::CACHE_OP_BATCH, array, 64, 0);
    expect_status(&regs, Status::Success, "CACHE_OP_BATCH of 64 entries")?;
    check_eq!((regs.x1, regs.x2), (64, 0), "entries done, cookie");
    // The library, with the array's IPA found by MEM_QUERY_VA.
    let mut client = counting_client();
    let mut storage = [BatchEntry::default(); 64];
    let storage_ipa = client
        .ipa_of_buffer(
            storage.as_ptr() as u64,
            core::mem::size_of_val(&storage) as u64,
        )
        .map_err(|e| format!("ipa_of_buffer: {e}"))?;
    check_eq!(
        storage_ipa,
        storage.as_ptr() as u64,
        "the stack is identity-mapped"
    );
    let queries = client.conduit().calls;
    let mut batch =
        Batch::new(&mut storage, storage_ipa).map_err(|e| format!("Batch::new: {e}"))?;
    for entry in &entries {
        let (range, operation, addressing) = parts(entry);
        batch
            .push(range, operation, addressing)
            .map_err(|e| format!("push: {e}"))?;
    }
    client.submit(&batch).map_err(|e| format!("submit: {e}"))?;
    check_eq!(client.conduit().calls - queries, 1, "calls for 64 entries");
    verify(area(BATCH_TESTS), 4 * MIB, 6)
}

fn batch_resumes_with_cookie() -> Result<(), String> {
    let alias = batch_alias()?;
    // 100 small entries: 64 per call.
    let mut entries = vec![BatchEntry::default(); 100];
    scattered_entries(&mut entries, alias);
    core::hint::black_box(entries.as_ptr());
    let array = entries.as_ptr() as u64;
    let regs = call(function::CACHE_OP_BATCH, array, 100, 0);
    expect_status(&regs, Status::Incomplete, "100 entries, first call")?;
    check_eq!(
        (regs.x1, regs.x2),
        (64, 64 << batch::COOKIE_ENTRY_SHIFT),
        "entries done, cookie"
    );
    let regs = call(function::CACHE_OP_BATCH, array, 100, regs.x2);
    expect_status(&regs, Status::Success, "100 entries, second call")?;
    check_eq!((regs.x1, regs.x2), (100, 0), "entries done, cookie");
    // An entry larger than the budget stops inside it; the cookie carries the offset.
    entries.truncate(4);
    entries[1] = BatchEntry::new(
        Range::new(area(LARGE), 5 * MIB),
        Operation::CleanInvalidate,
        Addressing::Ipa,
    );
    core::hint::black_box(entries.as_ptr());
    let array = entries.as_ptr() as u64;
    let mut cookie = 0;
    let mut answers = Vec::new();
    for _ in 0..10 {
        let regs = call(function::CACHE_OP_BATCH, array, 4, cookie);
        answers.push((regs.x0 as i64, regs.x1, regs.x2));
        if regs.x0 != Status::Incomplete.code() as u64 {
            break;
        }
        cookie = regs.x2;
    }
    // Entry 0 (4 KiB) and 2 MiB - 4 KiB of entry 1, then 2 MiB, then the rest and entries 2-3.
    let entry1 = 1 << batch::COOKIE_ENTRY_SHIFT;
    let want = [
        (1, 1, entry1 | (2 * MIB - 4 * KIB)),
        (1, 1, entry1 | (4 * MIB - 4 * KIB)),
        (0, 4, 0),
    ];
    check_eq!(
        answers.as_slice(),
        &want[..],
        "(status, entries done, cookie) per call"
    );
    let mut client = counting_client();
    let mut storage = [BatchEntry::default(); 4];
    let storage_ipa = storage.as_ptr() as u64;
    let mut batch =
        Batch::new(&mut storage, storage_ipa).map_err(|e| format!("Batch::new: {e}"))?;
    for entry in &entries {
        let (range, operation, addressing) = parts(entry);
        batch
            .push(range, operation, addressing)
            .map_err(|e| format!("push: {e}"))?;
    }
    client.submit(&batch).map_err(|e| format!("submit: {e}"))?;
    check_eq!(client.conduit().calls, 3, "library calls");
    Ok(())
}

fn data_survives_wb_nc_wb() -> Result<(), String> {
    // Three pages at the end of one block and a whole block after them.
    let ipa = area(DATA_TESTS) + BLOCK - 3 * PAGE_SIZE;
    let size = BLOCK + 3 * PAGE_SIZE;
    let nc_alias = mmu::map_alias(ipa as usize, size as usize, MemoryType::NormalNonCacheable)
        .map_err(|e| format!("map_alias: {e:?}"))? as u64;
    fill(ipa, size, 7);
    set(ipa, size, Attribute::NonCacheable)?;
    verify(ipa, size, 7).map_err(|e| format!("NC, through the WB mapping: {e}"))?;
    verify(nc_alias, size, 7).map_err(|e| format!("NC, through the NC alias: {e}"))?;
    fill(nc_alias, size, 8);
    set(ipa, size, Attribute::WriteBack)?;
    verify(ipa, size, 8).map_err(|e| format!("back to WB, written through the NC alias: {e}"))?;
    verify(nc_alias, size, 8).map_err(|e| format!("back to WB, through the NC alias: {e}"))?;
    check_eq!(
        page(ipa + 3 * PAGE_SIZE)?,
        (attr::NORMAL_WB, page_flag::BLOCK_MAPPED, 0),
        "the block"
    );
    Ok(())
}

// ----- Four vCPUs at once -----

const HAMMER_CPUS: usize = 4;
const HAMMER_PAGES: usize = (HAMMER_SIZE / PAGE_SIZE) as usize;
const HAMMER_ITERATIONS: u32 = 600;
/// Pages per run that one CPU owns in the final phase (runs interleave between CPUs).
const RUN_PAGES: usize = 8;
/// How long a CPU waits for the others (the suite's QEMU timeout is 120 s).
const HAMMER_SECONDS: u64 = 60;

static HAMMER_ALIAS: AtomicU64 = AtomicU64::new(0);
static PROBLEMS: AtomicUsize = AtomicUsize::new(0);
static CALLS: AtomicUsize = AtomicUsize::new(0);
static PHASE_DONE: AtomicUsize = AtomicUsize::new(0);
static BELIEF: [AtomicU8; HAMMER_PAGES] = [const { AtomicU8::new(0xff) }; HAMMER_PAGES];

/// Counts a problem a vCPU met and prints the first few.
fn problem(cpu: usize, text: &str) {
    if PROBLEMS.fetch_add(1, Ordering::SeqCst) < 8 {
        println!("{}: CPU {}: {}", SUITE, cpu, text);
    }
}

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// Checks one raw answer: SUCCESS or (for range calls) INCOMPLETE only.
fn answer_ok(cpu: usize, what: &str, regs: &Regs, incomplete_ok: bool) -> bool {
    let code = regs.x0 as i64;
    let ok = code == 0 || (incomplete_ok && code == Status::Incomplete.code());
    if !ok {
        problem(
            cpu,
            &format!(
                "{what}: unexpected {} (x1 {:#x})",
                status_name(regs.x0),
                regs.x1
            ),
        );
    }
    ok
}

fn hammer(cpu: usize) {
    let base = area(HAMMER);
    let alias = HAMMER_ALIAS.load(Ordering::SeqCst);
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ ((cpu as u64 + 1) * 0x1234_5678_9abc));
    let mut storage = [BatchEntry::default(); 8];
    let storage_ipa = storage.as_ptr() as u64;
    let mut hvc = client();
    let ops = [
        Operation::Clean,
        Operation::Invalidate,
        Operation::CleanInvalidate,
    ];
    for _ in 0..HAMMER_ITERATIONS {
        CALLS.fetch_add(1, Ordering::Relaxed);
        let first = rng.below(HAMMER_PAGES as u64);
        let pages = 1 + rng.below((HAMMER_PAGES as u64 - first).clamp(1, 300));
        let (ipa, size) = (base + first * PAGE_SIZE, pages * PAGE_SIZE);
        match rng.below(9) {
            0 | 1 => {
                let attribute = if rng.below(2) == 0 {
                    Attribute::NonCacheable
                } else {
                    Attribute::WriteBack
                };
                if let Err(e) = hvc.set_attribute(Range::new(ipa, size), attribute) {
                    problem(
                        cpu,
                        &format!("set_attribute {ipa:#x}+{size:#x} {attribute:?}: {e}"),
                    );
                }
            }
            2 => {
                // Raw MEM_SET_ATTR, one call: SUCCESS or INCOMPLETE with progress.
                let regs = call(function::MEM_SET_ATTR, ipa, size, rng.below(2));
                if answer_ok(cpu, "MEM_SET_ATTR", &regs, true) && (regs.x1 == 0 || regs.x1 > size) {
                    problem(
                        cpu,
                        &format!("MEM_SET_ATTR {ipa:#x}+{size:#x}: {:#x} bytes done", regs.x1),
                    );
                }
            }
            3 => {
                let offset = rng.below(PAGE_SIZE);
                let (start, len) = (ipa + offset, 1 + rng.below(size - offset));
                let op = ops[rng.below(3) as usize];
                if let Err(e) = hvc.cache_operation(Range::new(start, len), op, Addressing::Ipa) {
                    problem(
                        cpu,
                        &format!("CACHE_OP {op:?} by IPA {start:#x}+{len:#x}: {e}"),
                    );
                }
            }
            4 => {
                let offset = rng.below(PAGE_SIZE);
                let (start, len) = (alias + (ipa - base) + offset, 1 + rng.below(size - offset));
                let op = ops[rng.below(3) as usize];
                match hvc.cache_operation(Range::new(start, len), op, Addressing::Va) {
                    Ok(outcome) if outcome.widened => {
                        problem(cpu, "CACHE_OP by VA widened without pins")
                    }
                    Ok(_) => {}
                    Err(e) => problem(
                        cpu,
                        &format!("CACHE_OP {op:?} by VA {start:#x}+{len:#x}: {e}"),
                    ),
                }
            }
            5 => {
                let Ok(mut batch) = Batch::new(&mut storage, storage_ipa) else {
                    problem(cpu, "Batch::new");
                    continue;
                };
                for _ in 0..8 {
                    let at = base + rng.below(HAMMER_SIZE - 64 * KIB);
                    let len = 1 + rng.below(64 * KIB);
                    let addressing = if rng.below(2) == 0 {
                        Addressing::Ipa
                    } else {
                        Addressing::Va
                    };
                    let start = if addressing == Addressing::Va {
                        alias + (at - base)
                    } else {
                        at
                    };
                    let _ = batch.push(
                        Range::new(start, len),
                        ops[rng.below(3) as usize],
                        addressing,
                    );
                }
                if let Err(e) = hvc.submit(&batch) {
                    problem(cpu, &format!("CACHE_OP_BATCH: {e}"));
                }
            }
            6 => {
                let regs = call(function::MEM_GET_ATTR, ipa + rng.below(size), 0, 0);
                if answer_ok(cpu, "MEM_GET_ATTR", &regs, false)
                    && (regs.x1 > 1 || regs.x2 & page_flag::PINNED != 0 || regs.x3 != 0)
                {
                    problem(
                        cpu,
                        &format!(
                            "MEM_GET_ATTR {ipa:#x}: {:#x} {:#x} {:#x}",
                            regs.x1, regs.x2, regs.x3
                        ),
                    );
                }
            }
            7 => {
                let va = ipa + rng.below(size);
                let regs = call(function::MEM_QUERY_VA, va, rng.below(2), 0);
                let sane = regs.x1 == va
                    && (regs.x2 == mair::NORMAL_WB || regs.x2 == mair::NORMAL_NC)
                    && regs.x3 == mair::NORMAL_WB;
                if answer_ok(cpu, "MEM_QUERY_VA", &regs, false) && !sane {
                    problem(
                        cpu,
                        &format!(
                            "MEM_QUERY_VA {va:#x}: {:#x} {:#x} {:#x}",
                            regs.x1, regs.x2, regs.x3
                        ),
                    );
                }
            }
            _ => {
                // This CPU's own word in a page others are changing: accesses must neither
                // fault nor lose data while stage 2 is broken and remade around them.
                let word = ipa + cpu as u64 * 8;
                let value = rng.next();
                // SAFETY: guest RAM of the hammer area; each CPU writes only its own word.
                unsafe { (word as *mut u64).write_volatile(value) };
                // SAFETY: as above.
                let back = unsafe { (word as *const u64).read_volatile() };
                if back != value {
                    problem(
                        cpu,
                        &format!("word {word:#x} reads {back:#x} after writing {value:#x}"),
                    );
                }
            }
        }
    }
    // Wait for every CPU before the final phase, so that no hammering overwrites it.
    PHASE_DONE.fetch_add(1, Ordering::SeqCst);
    let deadline = arch::counter() + HAMMER_SECONDS * arch::counter_frequency();
    while PHASE_DONE.load(Ordering::SeqCst) < HAMMER_CPUS {
        if arch::counter() > deadline {
            problem(cpu, "timed out waiting for the others to finish hammering");
            return;
        }
        core::hint::spin_loop();
    }
    // Final phase: this CPU's runs of pages get a known attribute. Region 0 ends all NC (so
    // it must end merged into one block), region 1 a mix.
    for run in (cpu..HAMMER_PAGES / RUN_PAGES).step_by(HAMMER_CPUS) {
        let first = run * RUN_PAGES;
        let in_first_region = (first as u64 * PAGE_SIZE) < BLOCK;
        let attribute = if in_first_region || rng.below(2) == 0 {
            Attribute::NonCacheable
        } else {
            Attribute::WriteBack
        };
        let ipa = base + first as u64 * PAGE_SIZE;
        match hvc.set_attribute(Range::new(ipa, RUN_PAGES as u64 * PAGE_SIZE), attribute) {
            Ok(()) => {
                for belief in &BELIEF[first..first + RUN_PAGES] {
                    belief.store(attribute.abi() as u8, Ordering::SeqCst);
                }
            }
            Err(e) => problem(
                cpu,
                &format!("final set_attribute {ipa:#x} {attribute:?}: {e}"),
            ),
        }
    }
}

fn four_vcpus_hammer_overlapping_ranges() -> Result<(), String> {
    check!(
        cpu::count() >= HAMMER_CPUS,
        "{} CPUs; the runner row gives 4",
        cpu::count()
    );
    let base = area(HAMMER);
    let alias = mmu::map_alias(
        base as usize,
        HAMMER_SIZE as usize,
        MemoryType::NormalWriteBack,
    )
    .map_err(|e| format!("map_alias: {e:?}"))? as u64;
    HAMMER_ALIAS.store(alias, Ordering::SeqCst);
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
        "problems met while hammering (printed above)"
    );
    // Every page has what its owner believes; a 2 MiB region is one block exactly when all its
    // pages agree.
    let mut mismatches = Vec::new();
    for (i, belief) in BELIEF.iter().enumerate() {
        let ipa = base + i as u64 * PAGE_SIZE;
        let (attribute, flags, pins) = page(ipa)?;
        let believed = belief.load(Ordering::SeqCst) as u64;
        if attribute != believed || pins != 0 {
            mismatches.push(format!(
                "{ipa:#x}: attribute {attribute} pins {pins}, believed {believed}"
            ));
        }
        let region = i / 512;
        let uniform = BELIEF[region * 512..(region + 1) * 512]
            .iter()
            .all(|b| b.load(Ordering::SeqCst) as u64 == believed);
        if uniform != (flags & page_flag::BLOCK_MAPPED != 0) {
            mismatches.push(format!(
                "{ipa:#x}: flags {flags:#x}, region uniform: {uniform}"
            ));
        }
    }
    check!(
        mismatches.is_empty(),
        "{} pages disagree, first: {}",
        mismatches.len(),
        mismatches
            .iter()
            .take(4)
            .cloned()
            .collect::<Vec<_>>()
            .join("; ")
    );
    // Leave the area write-back.
    set(base, HAMMER_SIZE, Attribute::WriteBack)?;
    check_eq!(
        page(base + BLOCK)?,
        (attr::NORMAL_WB, page_flag::BLOCK_MAPPED, 0),
        "after the clean-up"
    );
    Ok(())
}
