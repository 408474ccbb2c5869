//! The attribute and cache-maintenance calls: MEM_SET_ATTR, MEM_GET_ATTR, MEM_QUERY_VA,
//! CACHE_OP and CACHE_OP_BATCH, and the hypervisor's copies to and from guest RAM through this
//! hypervisor's alias of guest RAM. Each takes stage 2 shared (queries, cache operations,
//! copies) or alone (attribute changes), and writes its own records when it did work.

use super::platform::{AuditSink, GuestMemory, Iommu, WithDeviceTlb};
use super::{Completion, HypercallError, PerCpu, Reply, Vm};
use crate::address::{GuestRange, GuestVa, HypVa, Ipa, Pa};
use crate::attributes::{self, Attribute, AttributeManager, CacheProgress, Requester};
use crate::audit::{Event, Maintenance};
use crate::maintenance::{Arch, CacheOp};
use crate::pagetable::{TableMemory, PAGE_SIZE};
use crate::requests::{self, CacheRequest, Cookie, Translation, BATCH_ENTRY_SIZE};
use alloc::vec::Vec;
use stagehand_abi::{cache_op, function, Status};

/// Calls `visit(arch, va, pa, offset, len)` once for guest `[ipa, ipa + len)`, reached through
/// the hypervisor's alias of guest RAM (each page with its own attribute) at `va`. The caller
/// holds stage 2 (either way), which keeps the alias unchanged while `visit` runs.
///
/// # Errors
/// OUT_OF_RANGE or DENIED when the range is not guest RAM.
pub fn with_mapped<A: Arch>(
    manager: &AttributeManager,
    arch: &mut A,
    ipa: u64,
    len: u64,
    mut visit: impl FnMut(&mut A, HypVa, Pa, u64, u64),
) -> Result<(), Status> {
    if len == 0 {
        return Ok(());
    }
    let va = manager.alias_of(ipa, len)?;
    // Checked once: from here on the range is guest RAM, and its PA follows from it.
    let range = GuestRange::new(manager.ram(), Ipa::new(ipa), len)?;
    visit(arch, HypVa::new(va), range.pa(), 0, len);
    Ok(())
}

/// Reads `into.len()` bytes of guest RAM at `ipa`, for a caller that holds stage 2 (either way).
///
/// # Errors
/// OUT_OF_RANGE or DENIED when the range is not guest RAM.
pub fn read_guest<C: Arch + GuestMemory>(
    manager: &AttributeManager,
    cpu: &mut C,
    ipa: u64,
    into: &mut [u8],
) -> Result<(), Status> {
    let len = into.len() as u64;
    with_mapped(manager, cpu, ipa, len, |cpu, va, pa, offset, len| {
        cpu.read_bytes(va, pa, &mut into[offset as usize..(offset + len) as usize])
    })
}

/// Writes `bytes` to guest RAM at `ipa`, for a caller that holds stage 2 (either way).
///
/// # Errors
/// OUT_OF_RANGE or DENIED when the range is not guest RAM.
pub fn write_guest<C: Arch + GuestMemory>(
    manager: &AttributeManager,
    cpu: &mut C,
    ipa: u64,
    bytes: &[u8],
) -> Result<(), Status> {
    let len = bytes.len() as u64;
    with_mapped(manager, cpu, ipa, len, |cpu, va, pa, offset, len| {
        cpu.write_bytes(va, pa, &bytes[offset as usize..(offset + len) as usize])
    })
}

/// MEM_SET_ATTR(ipa, size, attr): x1 bytes done. The records are written while stage 2 is still
/// held alone: the change and its records take their place in the audit stream together, so a
/// replay of any interleaving of calls equals what MEM_GET_ATTR answers.
///
/// # Errors
/// INVALID_PARAMETER, ALIGNMENT, OUT_OF_RANGE, DENIED, BUSY, NO_MEMORY; nothing changed.
pub fn set_attribute<M, I, S, C>(
    vm: &Vm<M, I, S>,
    cpu: &mut PerCpu<C>,
    ipa: u64,
    size: u64,
    value: u64,
) -> Result<Reply, HypercallError>
where
    M: TableMemory,
    I: Iommu,
    S: AuditSink,
    C: Arch,
{
    let attribute = Attribute::from_abi(value).ok_or(HypercallError::InvalidParameter)?;
    let mut stage2 = vm.stage2.write();
    let stage2 = &mut *stage2;
    // What each page was before, for the records: runs of one old attribute, within the most
    // one call may do (the rest of the 2 MiB region).
    let before = match stage2.manager.check(ipa, size) {
        Ok(()) if ipa.is_multiple_of(PAGE_SIZE) => {
            let region_end = (ipa | (attributes::BLOCK - 1)) + 1;
            stage2
                .manager
                .attribute_runs(ipa, size.min(region_end - ipa) & !(PAGE_SIZE - 1))
        }
        _ => Vec::new(),
    };
    let mut arch = WithDeviceTlb {
        cpu: &mut cpu.cpu,
        iommu: &vm.iommu,
    };
    let result = stage2
        .manager
        .set_attribute(&mut stage2.tables, &mut arch, ipa, size, attribute);
    // Debug builds check stage 2, the ledger and the alias after every change: a mismatch is
    // a hypervisor bug, not a guest's doing.
    #[cfg(debug_assertions)]
    if let Err(problem) = stage2.manager.check_invariants(&stage2.tables) {
        panic!("attribute invariant broken after MEM_SET_ATTR: {problem}");
    }
    let progress = result?;
    let completion = if progress.complete {
        Completion::Success
    } else {
        Completion::Incomplete
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
        let maintenance = if old != attribute {
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
        };
        vm.record(
            cpu.vcpu,
            &Event::AttributeChange {
                ipa: start,
                size: bytes,
                old,
                new: attribute,
                maintenance,
                status: completion.code(),
            },
        );
    }
    Ok(Reply::new(completion, [progress.done, 0, 0]))
}

/// MEM_GET_ATTR(ipa): x1 attribute, x2 flags (bit 0 pinned, bit 1 block-mapped), x3 pins.
///
/// # Errors
/// OUT_OF_RANGE or DENIED for an address that is not guest RAM.
pub fn get_attribute<M: TableMemory, I, S>(
    vm: &Vm<M, I, S>,
    ipa: u64,
) -> Result<Reply, HypercallError> {
    let stage2 = vm.stage2.read();
    let info = stage2.manager.get(&stage2.tables, ipa)?;
    let flags = (info.pins > 0) as u64 | (info.block_mapped as u64) << 1;
    Ok(Reply::success([
        info.attribute.abi(),
        flags,
        info.pins as u64,
    ]))
}

/// The IPA of guest VA `va` (the identity while the guest's MMU is off), and its stage-1
/// attribute in MAIR encoding (Device-nGnRnE, 0x00, with the MMU off). Inlined: a request by
/// VA runs it once per page.
#[inline(always)]
fn stage1<C: GuestMemory>(cpu: &mut C, va: u64, write: bool) -> Result<(u64, u8), HypercallError> {
    if !cpu.stage1_enabled() {
        return Ok((va, 0x00));
    }
    // A walk that took an external abort (tables in MMIO) is a translation that failed.
    match cpu
        .translate(GuestVa::new(va), false, write)
        .map(requests::par)
    {
        Ok(Translation::Ok { address, attribute }) => {
            Ok((address | (va & (PAGE_SIZE - 1)), attribute))
        }
        _ => Err(HypercallError::InvalidParameter),
    }
}

/// MEM_QUERY_VA(va, access): x1 IPA, x2 effective attribute (both stages), x3 stage-1 attribute,
/// both in MAIR encoding.
///
/// # Errors
/// INVALID_PARAMETER (bad access kind, stage 1 does not translate), OUT_OF_RANGE or DENIED
/// (not guest RAM; both stages do not translate).
pub fn query_va<M, I, S, C>(
    vm: &Vm<M, I, S>,
    cpu: &mut PerCpu<C>,
    va: u64,
    access: u64,
) -> Result<Reply, HypercallError>
where
    M: TableMemory,
    C: GuestMemory,
{
    let write = requests::query_access(access)?;
    let (ipa, stage1_attribute) = stage1(&mut cpu.cpu, va, write)?;
    let stage2 = vm.stage2.read();
    stage2.manager.get(&stage2.tables, ipa)?;
    // Both stages through the CPU itself. (Not with the guest's MMU off: QEMU crashes on an
    // AT S12E1W stage-2 permission fault then, and stage 1 is the identity anyway.)
    let effective = if cpu.cpu.stage1_enabled() {
        match cpu
            .cpu
            .translate(GuestVa::new(va), true, write)
            .map(requests::par)
        {
            Ok(Translation::Ok { attribute, .. }) => attribute,
            _ => return Err(HypercallError::OutOfRange),
        }
    } else {
        0x00
    };
    Ok(Reply::success([
        ipa,
        effective as u64,
        stage1_attribute as u64,
    ]))
}

/// The IPA run that starts at guest VA `va` and is contiguous in IPA space, at most `limit`
/// bytes long.
fn va_run<C: GuestMemory>(cpu: &mut C, va: u64, limit: u64) -> Result<(u64, u64), HypercallError> {
    let (ipa, _) = stage1(cpu, va, false)?;
    let mut len = (PAGE_SIZE - (va & (PAGE_SIZE - 1))).min(limit);
    while len < limit {
        match stage1(cpu, va + len, false) {
            Ok((next, _)) if next == ipa + len => len = (len + PAGE_SIZE).min(limit),
            _ => break,
        }
    }
    Ok((ipa, len))
}

/// A piece of a cache request: `len` bytes at IPA `ipa`, asked for at guest VA `va` (or at the
/// IPA itself).
#[derive(Clone, Copy, Debug)]
struct Piece {
    va: u64,
    ipa: u64,
    len: u64,
}

/// What [`cache_work`] did: bytes done, whether an INVALIDATE was widened, and the error it
/// stopped on, if any (after `done` bytes).
struct Work {
    done: u64,
    widened: bool,
    stopped: Option<HypercallError>,
}

/// Up to `limit` bytes of one cache request from `address`. An error after some progress still
/// reports that progress. By VA, each IPA run touched is pushed on `pieces` (what the audit
/// records say was maintained).
fn cache_work<C: Arch + GuestMemory>(
    manager: &AttributeManager,
    cpu: &mut C,
    request: CacheRequest,
    address: u64,
    limit: u64,
    pieces: &mut Vec<Piece>,
) -> Work {
    let mut work = Work {
        done: 0,
        widened: false,
        stopped: None,
    };
    while work.done < limit {
        let at = address + work.done;
        let (ipa, len) = if request.by_va {
            match va_run(cpu, at, limit - work.done) {
                Ok(run) => run,
                Err(error) => {
                    work.stopped = Some(error);
                    return work;
                }
            }
        } else {
            (at, limit - work.done)
        };
        match manager.cache_operation(cpu, ipa, len, request.op, Requester::Guest) {
            Ok(CacheProgress {
                done: step,
                widened,
                ..
            }) => {
                if request.by_va {
                    pieces.push(Piece {
                        va: at,
                        ipa,
                        len: step,
                    });
                }
                work.done += step;
                work.widened |= widened;
            }
            Err(error) => {
                work.stopped = Some(error.into());
                return work;
            }
        }
    }
    work
}

/// How much of `[address, address + size)` one call may do: the budget, cut at a line so that
/// the next call does not split one.
fn budget(address: u64, size: u64, line: u64) -> u64 {
    // Saturating: `address` is the guest's, and may lie anywhere up to 2^64 - 1.
    let cut = address.saturating_add(attributes::WORK_BUDGET) & !(line - 1);
    size.min(cut.saturating_sub(address).max(line.min(size)))
}

/// D-cache lines `[address, address + len)` touches.
fn lines(address: u64, len: u64, line: u64) -> u64 {
    // `address + len` does not overflow (checked by the caller), `address + len - 1` neither.
    match len {
        0 => 0,
        _ => (address + (len - 1)) / line - address / line + 1,
    }
}

/// CACHE_OP(address, size, op): x1 bytes done, x2 flags (1: an INVALIDATE was widened).
///
/// # Errors
/// INVALID_PARAMETER (op, flags, zero size, an untranslatable VA), OUT_OF_RANGE, DENIED, when
/// nothing was done.
pub fn cache_operation<M, I, S, C>(
    vm: &Vm<M, I, S>,
    cpu: &mut PerCpu<C>,
    address: u64,
    size: u64,
    value: u64,
) -> Result<Reply, HypercallError>
where
    M: TableMemory,
    S: AuditSink,
    C: Arch + GuestMemory,
{
    let request = requests::cache_request(value)?;
    if size == 0 {
        return Err(HypercallError::InvalidParameter);
    }
    if address.checked_add(size).is_none() {
        return Err(HypercallError::OutOfRange);
    }
    let limit = budget(address, size, vm.dcache_line);
    let mut pieces = Vec::new();
    let work = {
        let stage2 = vm.stage2.read();
        if !request.by_va {
            // Like MEM_SET_ATTR, refuse a range that leaves guest RAM before doing any of it.
            stage2.manager.check(address, size)?;
        }
        cache_work(
            &stage2.manager,
            &mut cpu.cpu,
            request,
            address,
            limit,
            &mut pieces,
        )
    };
    let completion = match work.stopped {
        Some(error) if work.done == 0 => return Err(error),
        Some(error) => Completion::Stopped(error),
        None if work.done == size => Completion::Success,
        None => Completion::Incomplete,
    };
    let op = if work.widened {
        CacheOp::CleanInvalidate
    } else {
        request.op
    };
    // By IPA, one record for the range; by VA, one per IPA run touched, so that the record
    // names the memory maintained (and its VA), not only the VA.
    let whole = [Piece {
        va: address,
        ipa: address,
        len: work.done,
    }];
    let pieces = if request.by_va {
        &pieces[..]
    } else {
        &whole[..]
    };
    for piece in pieces {
        vm.record(
            cpu.vcpu,
            &Event::Cmo {
                function: function::CACHE_OP,
                address: piece.ipa,
                size: piece.len,
                op,
                lines: lines(piece.va, piece.len, vm.dcache_line),
                widened: work.widened,
                va: request.by_va.then_some(piece.va),
                status: completion.code(),
            },
        );
    }
    let flags = if work.widened {
        cache_op::RESULT_WIDENED
    } else {
        0
    };
    Ok(Reply::new(completion, [work.done, flags, 0]))
}

/// CACHE_OP_BATCH(array, count, cookie): x1 entries done, x2 resume cookie. Each entry is read
/// through the ABI's own `BatchEntry` layout.
///
/// # Errors
/// INVALID_PARAMETER (count, cookie), ALIGNMENT, OUT_OF_RANGE, DENIED, when nothing was done.
/// An entry that fails after the call started stops it with that status (and its record).
pub fn cache_batch<M, I, S, C>(
    vm: &Vm<M, I, S>,
    cpu: &mut PerCpu<C>,
    array: u64,
    count: u64,
    cookie: u64,
) -> Result<Reply, HypercallError>
where
    M: TableMemory,
    S: AuditSink,
    C: Arch + GuestMemory,
{
    if count == 0 || count > requests::BATCH_MAX_ENTRIES {
        return Err(HypercallError::InvalidParameter);
    }
    if !array.is_multiple_of(8) {
        return Err(HypercallError::Alignment);
    }
    let bytes = count
        .checked_mul(BATCH_ENTRY_SIZE as u64)
        .ok_or(HypercallError::OutOfRange)?;
    vm.stage2.read().manager.check(array, bytes)?;
    let mut at = Cookie::decode(cookie, count)?;
    let mut budget_left = attributes::WORK_BUDGET;
    let mut total = 0;
    let mut stopped = None;
    let mut entries_this_call = 0;
    let mut last_op = CacheOp::CleanInvalidate;
    let mut pieces = Vec::new();
    while at.entry < count
        && budget_left > 0
        && entries_this_call < requests::BATCH_ENTRIES_PER_CALL
    {
        let stage2 = vm.stage2.read();
        let mut raw = [0u8; BATCH_ENTRY_SIZE];
        let entry = read_guest(
            &stage2.manager,
            &mut cpu.cpu,
            array + at.entry * BATCH_ENTRY_SIZE as u64,
            &mut raw,
        )
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
                stopped = Some(error.into());
                break;
            }
        };
        let Some(start) = entry.address.checked_add(at.offset) else {
            stopped = Some(HypercallError::OutOfRange);
            break;
        };
        last_op = entry.request.op;
        let limit = (entry.size - at.offset).min(budget(start, budget_left, vm.dcache_line));
        // The batch's one record summarises it; its pieces are not listed.
        pieces.clear();
        let work = cache_work(
            &stage2.manager,
            &mut cpu.cpu,
            entry.request,
            start,
            limit,
            &mut pieces,
        );
        drop(stage2);
        at.offset += work.done;
        total += work.done;
        budget_left = budget_left.saturating_sub(work.done.max(1));
        if let Some(error) = work.stopped {
            stopped = Some(error);
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
    let completion = match stopped {
        Some(error) => Completion::Stopped(error),
        None if at.entry == count => Completion::Success,
        None => Completion::Incomplete,
    };
    vm.record(
        cpu.vcpu,
        &Event::Cmo {
            function: function::CACHE_OP_BATCH,
            address: array,
            size: total,
            op: last_op,
            lines: total / vm.dcache_line,
            widened: false,
            va: None,
            status: completion.code(),
        },
    );
    let next = if completion == Completion::Success {
        0
    } else {
        at.encode()
    };
    Ok(Reply::new(completion, [at.entry, next, 0]))
}
