//! The attribute and cache-maintenance calls: MEM_SET_ATTR, MEM_GET_ATTR, MEM_QUERY_VA,
//! CACHE_OP and CACHE_OP_BATCH. Each checks its arguments (through `hyp_core`), takes the
//! attribute manager shared (queries, cache operations) or alone (attribute changes) and this
//! CPU's window, and audits exactly one record per call, refusals included.

use crate::arch;
use crate::arch::cpu::Cpu;
use crate::arch::mmu::HeapTables;
use crate::guest_memory;
use crate::trap::current_vcpu;
use crate::vm::{audit, vm};
use aarch64_cpu::registers::{Readable, SCTLR_EL1};
use hyp_core::attributes::{self, Attribute, AttributeManager, CacheProgress};
use hyp_core::audit::{Event, Maintenance};
use hyp_core::maintenance::CacheOp;
use hyp_core::pagetable::PAGE_SIZE;
use hyp_core::requests::{self, BatchEntry, CacheRequest, Cookie, Translation, BATCH_ENTRY_SIZE};
use hyp_core::window::Window;
use stagehand_abi::{cache_op, function, Status};

/// x0-x3 of a reply.
type Reply = [u64; 4];

fn status(status: Status, x1: u64, x2: u64) -> Reply {
    [status.code() as u64, x1, x2, 0]
}

fn refused(function: u32, error: Status, ipa: u64, size: u64) -> Reply {
    audit(
        current_vcpu(),
        Event::RefusedRange {
            function,
            status: error.code(),
            ipa,
            size,
        },
    );
    status(error, 0, 0)
}

/// MEM_SET_ATTR(ipa, size, attr). The records are written while the attribute manager is
/// still held alone: the change and its records take their place in the audit stream
/// together, so a replay of any interleaving of calls equals what MEM_GET_ATTR answers.
pub fn set_attribute(ipa: u64, size: u64, value: u64) -> Reply {
    let Some(attribute) = Attribute::from_abi(value) else {
        return refused(function::MEM_SET_ATTR, Status::InvalidParameter, ipa, size);
    };
    let vm = vm();
    let mut manager = vm.attributes.write();
    let mut window = vm.windows[current_vcpu()].lock();
    // What each page was before, for the records: runs of one old attribute, within the most
    // one call may do (the rest of the 2 MiB region).
    let before = match manager.check(ipa, size) {
        Ok(()) if ipa.is_multiple_of(PAGE_SIZE) => {
            let region_end = (ipa | (attributes::BLOCK - 1)) + 1;
            manager.attribute_runs(ipa, size.min(region_end - ipa) & !(PAGE_SIZE - 1))
        }
        _ => alloc::vec::Vec::new(),
    };
    let result = manager.set_attribute(
        &mut HeapTables,
        &mut Cpu::new(),
        &mut window,
        ipa,
        size,
        attribute,
    );
    // Debug builds check stage 2, the ledger and the window after every change.
    #[cfg(debug_assertions)]
    if let Err(problem) = manager.check_invariants(&HeapTables, &window) {
        crate::exit::fatal(format_args!(
            "attribute invariant broken after MEM_SET_ATTR: {problem}"
        ));
    }
    let progress = match result {
        Ok(progress) => progress,
        Err(error) => return refused(function::MEM_SET_ATTR, error, ipa, size),
    };
    let code = if progress.complete {
        Status::Success
    } else {
        Status::Incomplete
    };
    let m = progress.maintenance;
    let passes = match attribute {
        Attribute::NonCacheable => 2, // through a write-back alias, then a non-cacheable one
        Attribute::WriteBack => 1,
    };
    // One record per run of pages that had one attribute before.
    let done_end = ipa + progress.done;
    for &(start, bytes, old) in &before {
        let bytes = bytes.min(done_end.saturating_sub(start));
        if bytes == 0 {
            break;
        }
        let changed = old != attribute;
        audit(
            current_vcpu(),
            Event::AttributeChange {
                ipa: start,
                size: bytes,
                old,
                new: attribute,
                maintenance: if changed {
                    Maintenance {
                        cmo: Some(CacheOp::CleanInvalidate),
                        cmo_lines: passes * bytes / vm.dcache_line,
                        tlbi: m.tlbi,
                        tlbi_count: m.tlbi_count,
                        break_before_make: true,
                        hypervisor_alias: true,
                        ..Maintenance::default()
                    }
                } else {
                    Maintenance::default()
                },
                status: code.code(),
            },
        );
    }
    drop(window);
    drop(manager);
    status(code, progress.done, 0)
}

/// MEM_GET_ATTR(ipa): x1 attribute, x2 flags (bit 0 pinned, bit 1 block-mapped), x3 pins.
pub fn get_attribute(ipa: u64) -> Reply {
    let info = vm().attributes.read().get(&HeapTables, ipa);
    match info {
        Ok(info) => {
            let flags = (info.pins > 0) as u64 | (info.block_mapped as u64) << 1;
            [
                Status::Success.code() as u64,
                info.attribute.abi(),
                flags,
                info.pins as u64,
            ]
        }
        Err(error) => refused(function::MEM_GET_ATTR, error, ipa, 1),
    }
}

/// MEM_QUERY_VA(va, access): x1 IPA, x2 effective attribute (both stages), x3 stage-1 attribute,
/// both in MAIR encoding. With the guest's MMU off, VA = IPA and data accesses are
/// Device-nGnRnE (0x00) at stage 1.
pub fn query_va(va: u64, access: u64) -> Reply {
    let write = match requests::query_access(access) {
        Ok(write) => write,
        Err(error) => return refused(function::MEM_QUERY_VA, error, va, 0),
    };
    let vm = vm();
    let mmu_on = SCTLR_EL1.is_set(SCTLR_EL1::M);
    let (ipa, stage1) = if mmu_on {
        // A walk that took an external abort (tables in MMIO) is a translation that failed.
        match arch::translate_guest_va(va, false, write).map(requests::par) {
            Ok(Translation::Ok { address, attribute }) => {
                (address | (va & (PAGE_SIZE - 1)), attribute)
            }
            _ => return refused(function::MEM_QUERY_VA, Status::InvalidParameter, va, 0),
        }
    } else {
        (va, 0x00)
    };
    let manager = vm.attributes.read();
    if let Err(error) = manager.get(&HeapTables, ipa) {
        return refused(function::MEM_QUERY_VA, error, va, 0);
    }
    // Both stages through the CPU itself. (Not with the guest's MMU off: QEMU crashes on an
    // AT S12E1W stage-2 permission fault then, and stage 1 is the identity anyway.)
    let effective = if mmu_on {
        match arch::translate_guest_va(va, true, write).map(requests::par) {
            Ok(Translation::Ok { attribute, .. }) => attribute,
            _ => return refused(function::MEM_QUERY_VA, Status::OutOfRange, va, 0),
        }
    } else {
        0x00
    };
    [
        Status::Success.code() as u64,
        ipa,
        effective as u64,
        stage1 as u64,
    ]
}

/// The IPA run that starts at guest VA `va` and is contiguous in IPA space, at most `limit`
/// bytes long.
fn va_run(va: u64, limit: u64) -> Result<(u64, u64), Status> {
    let translate = |va: u64| -> Result<u64, Status> {
        if !SCTLR_EL1.is_set(SCTLR_EL1::M) {
            return Ok(va);
        }
        match arch::translate_guest_va(va, false, false).map(requests::par) {
            Ok(Translation::Ok { address, .. }) => Ok(address | (va & (PAGE_SIZE - 1))),
            _ => Err(Status::InvalidParameter),
        }
    };
    let ipa = translate(va)?;
    let mut len = (PAGE_SIZE - (va & (PAGE_SIZE - 1))).min(limit);
    while len < limit {
        match translate(va + len) {
            Ok(next) if next == ipa + len => len = (len + PAGE_SIZE).min(limit),
            _ => break,
        }
    }
    Ok((ipa, len))
}

/// A piece of a cache request: `len` bytes at IPA `ipa`, asked for at guest VA `va` (or at the
/// IPA itself).
#[derive(Clone, Copy)]
struct Piece {
    va: u64,
    ipa: u64,
    len: u64,
}

/// Up to `limit` bytes of one cache request from `address`; returns bytes done and whether an
/// INVALIDATE was widened. An error after some progress still reports that progress. By VA,
/// each IPA run touched is pushed on `pieces` (what the audit records say was maintained).
fn cache_work(
    manager: &AttributeManager,
    window: &mut Window<HeapTables>,
    request: CacheRequest,
    address: u64,
    limit: u64,
    pieces: &mut alloc::vec::Vec<Piece>,
) -> (u64, bool, Result<(), Status>) {
    let (mut done, mut widened) = (0, false);
    while done < limit {
        let (ipa, len) = if request.by_va {
            match va_run(address + done, limit - done) {
                Ok(run) => run,
                Err(error) => return (done, widened, Err(error)),
            }
        } else {
            (address + done, limit - done)
        };
        match manager.cache_operation(
            &mut Cpu::new(),
            window,
            ipa,
            len,
            request.op,
            hyp_core::attributes::Requester::Guest,
        ) {
            Ok(CacheProgress {
                done: step,
                widened: w,
                ..
            }) => {
                if request.by_va {
                    pieces.push(Piece {
                        va: address + done,
                        ipa,
                        len: step,
                    });
                }
                done += step;
                widened |= w;
            }
            Err(error) => return (done, widened, Err(error)),
        }
    }
    (done, widened, Ok(()))
}

/// How much of `[address, address + size)` one call may do: the budget, cut at a line so that
/// the next call does not split one.
fn budget(address: u64, size: u64, line: u64) -> u64 {
    // Saturating: `address` is the guest's, and may lie anywhere up to 2^64 - 1.
    let cut = address.saturating_add(attributes::WORK_BUDGET) & !(line - 1);
    size.min(cut.saturating_sub(address).max(line.min(size)))
}

/// CACHE_OP(address, size, op): x1 bytes done, x2 flags (1: an INVALIDATE was widened).
pub fn cache_operation(address: u64, size: u64, value: u64) -> Reply {
    let request = match requests::cache_request(value) {
        Ok(request) if size > 0 => request,
        Ok(_) | Err(_) => {
            return refused(function::CACHE_OP, Status::InvalidParameter, address, size)
        }
    };
    if address.checked_add(size).is_none() {
        return refused(function::CACHE_OP, Status::OutOfRange, address, size);
    }
    let vm = vm();
    let limit = budget(address, size, vm.dcache_line);
    let mut pieces = alloc::vec::Vec::new();
    let (done, widened, result) = {
        let manager = vm.attributes.read();
        if !request.by_va {
            // Like MEM_SET_ATTR, refuse a range that leaves guest RAM before doing any of it.
            if let Err(error) = manager.check(address, size) {
                drop(manager);
                return refused(function::CACHE_OP, error, address, size);
            }
        }
        let mut window = vm.windows[current_vcpu()].lock();
        cache_work(&manager, &mut window, request, address, limit, &mut pieces)
    };
    let code = match result {
        Err(error) if done == 0 => return refused(function::CACHE_OP, error, address, size),
        Err(error) => error,
        Ok(()) if done == size => Status::Success,
        Ok(()) => Status::Incomplete,
    };
    let op = if widened {
        CacheOp::CleanInvalidate
    } else {
        request.op
    };
    // By IPA, one record for the range; by VA, one per IPA run touched, so that the record
    // names the memory maintained (and its VA), not only the VA. (By IPA nothing is collected:
    // `pieces` never allocates on that path.)
    let whole = [Piece {
        va: address,
        ipa: address,
        len: done,
    }];
    let pieces = if request.by_va {
        &pieces[..]
    } else {
        &whole[..]
    };
    for piece in pieces {
        audit(
            current_vcpu(),
            Event::Cmo {
                function: function::CACHE_OP,
                address: piece.ipa,
                size: piece.len,
                op,
                lines: lines(piece.va, piece.len, vm.dcache_line),
                widened,
                va: request.by_va.then_some(piece.va),
                status: code.code(),
            },
        );
    }
    status(
        code,
        done,
        if widened { cache_op::RESULT_WIDENED } else { 0 },
    )
}

fn lines(address: u64, len: u64, line: u64) -> u64 {
    // `address + len` does not overflow (checked by the caller), `address + len - 1` neither.
    match len {
        0 => 0,
        _ => (address + (len - 1)) / line - address / line + 1,
    }
}

/// CACHE_OP_BATCH(array, count, cookie): x1 entries done, x2 resume cookie.
pub fn cache_batch(array: u64, count: u64, cookie: u64) -> Reply {
    let refuse = |error| refused(function::CACHE_OP_BATCH, error, array, count);
    if count == 0 || count > requests::BATCH_MAX_ENTRIES {
        return refuse(Status::InvalidParameter);
    }
    if !array.is_multiple_of(8) {
        return refuse(Status::Alignment);
    }
    let Some(bytes) = count.checked_mul(BATCH_ENTRY_SIZE as u64) else {
        return refuse(Status::OutOfRange);
    };
    if let Err(error) = guest_memory::translate(array, bytes) {
        return refuse(error);
    }
    let mut at = match Cookie::decode(cookie, count) {
        Ok(at) => at,
        Err(error) => return refuse(error),
    };
    let vm = vm();
    let mut budget_left = attributes::WORK_BUDGET;
    let mut total = 0;
    let mut result = Ok(());
    let mut entries_this_call = 0;
    let mut last_op = CacheOp::CleanInvalidate;
    let mut pieces = alloc::vec::Vec::new();
    while at.entry < count
        && budget_left > 0
        && entries_this_call < requests::BATCH_ENTRIES_PER_CALL
    {
        let mut raw = [0u8; BATCH_ENTRY_SIZE];
        let entry: Result<BatchEntry, Status> =
            guest_memory::read(array + at.entry * BATCH_ENTRY_SIZE as u64, &mut raw)
                .and_then(|()| requests::batch_entry(&raw))
                .and_then(|entry| {
                    if at.fits(entry.size) {
                        Ok(entry)
                    } else {
                        Err(Status::InvalidParameter)
                    }
                });
        let entry = match entry {
            Ok(entry) => entry,
            Err(error) => {
                result = Err(error);
                break;
            }
        };
        let Some(start) = entry.address.checked_add(at.offset) else {
            result = Err(Status::OutOfRange);
            break;
        };
        last_op = entry.request.op;
        let limit = (entry.size - at.offset).min(budget(start, budget_left, vm.dcache_line));
        let (done, _, outcome) = {
            let manager = vm.attributes.read();
            let mut window = vm.windows[current_vcpu()].lock();
            // The batch's one record summarises it; its pieces are not listed.
            pieces.clear();
            cache_work(
                &manager,
                &mut window,
                entry.request,
                start,
                limit,
                &mut pieces,
            )
        };
        at.offset += done;
        total += done;
        budget_left = budget_left.saturating_sub(done.max(1));
        if let Err(error) = outcome {
            result = Err(error);
            break;
        }
        if at.offset == entry.size {
            at = Cookie {
                entry: at.entry + 1,
                offset: 0,
            };
            entries_this_call += 1;
        }
    }
    let code = match result {
        Err(error) => error,
        Ok(()) if at.entry == count => Status::Success,
        Ok(()) => Status::Incomplete,
    };
    audit(
        current_vcpu(),
        Event::Cmo {
            function: function::CACHE_OP_BATCH,
            address: array,
            size: total,
            op: last_op,
            lines: total / vm.dcache_line,
            widened: false,
            va: None,
            status: code.code(),
        },
    );
    let next = if code == Status::Success {
        0
    } else {
        at.encode()
    };
    status(code, at.entry, next)
}
