//! The DMA calls: DEV_INFO, DMA_MAP, DMA_UNMAP, DMA_SYNC, and from ABI 1.1 DMA_MAP_SG and
//! DMA_UNMAP_SG. Buffers are byte-granular. A mapped buffer's pages are pinned in the ledger
//! (their attribute cannot change, I4); a strict device's stage 2 gives each page the counted
//! union of its live mappings' rights (`hyp_core::dma`), rewritten only when that union
//! changes; a non-coherent device's buffer is maintained over exactly its lines as its
//! direction requires. An unmap narrows or removes the device's entries and waits for the SMMU
//! (TLBI + CMD_SYNC) before the CPU-side invalidate and the unpin. One audit record per
//! mapping (per run of pages of one attribute in strict mode) and per refusal.

use crate::arch::cpu::Cpu;
use crate::arch::mmu::HeapTables;
use crate::guest_memory;
use crate::smmu::{self, DmaDevice, Issued, RightsUpdate};
use crate::trap::current_vcpu;
use crate::vm::{audit, vm};
use alloc::vec::Vec;
use hyp_core::attributes::{self, Attribute, AttributeManager};
use hyp_core::audit::{DmaDirection, Event, Maintenance};
use hyp_core::dma::{self, Mapping, Mappings, RamSpan, RightsChange, SgBudget, SgRequest, Step};
use hyp_core::maintenance::CacheOp;
use hyp_core::pagetable::MemoryType;
use hyp_core::window::Window;
use stagehand_abi::dma_sg::{Segment, HANDLE_OFFSET, SEGMENT_SIZE};
use stagehand_abi::{function, Status};
use zerocopy::FromBytes;

/// The live mappings and the strict devices' counted rights. Lock order: the attribute
/// manager, then this, then this CPU's window, then the SMMU.
static MAPPINGS: spin::Mutex<Mappings> = spin::Mutex::new(Mappings::new());

/// Sets the VM's live-mapping quota (configuration `dma-mappings`), at boot.
pub fn set_quota(quota: usize) {
    MAPPINGS.lock().set_quota(quota);
}

/// x0-x3 of a reply.
type Reply = [u64; 4];

fn reply(status: Status, x1: u64, x2: u64) -> Reply {
    [status.code() as u64, x1, x2, 0]
}

fn record_refusal(function: u32, error: Status, ipa: u64, size: u64) {
    audit(
        current_vcpu(),
        Event::RefusedRange {
            function,
            status: error.code(),
            ipa,
            size,
        },
    );
}

fn refused(function: u32, error: Status, ipa: u64, size: u64) -> Reply {
    record_refusal(function, error, ipa, size);
    reply(error, 0, 0)
}

/// DEV_INFO(index): x1 StreamID, x2 segment << 16 | bus << 8 | device << 3 | function, x3 flags
/// (bit 0 coherent, bit 1 strict).
pub fn device_info(index: u64) -> Reply {
    match smmu::device_info(index as usize) {
        Some(info) => {
            let flags = info.coherent as u64
                | ((info.mode == hyp_core::config::DmaMode::Strict) as u64) << 1;
            [
                Status::Success.code() as u64,
                info.stream_id as u64,
                info.bdf.rid() as u64,
                flags,
            ]
        }
        None => refused(function::DEV_INFO, Status::NoDevice, index, 0),
    }
}

/// `op` over guest `[ipa, ipa + size)` through this CPU's window, to the end (the caller bounds
/// `size`): exactly the buffer's lines, partial edge lines of an invalidate cleaned too. Returns
/// the lines maintained.
fn maintain(
    manager: &AttributeManager,
    window: &mut Window<HeapTables>,
    op: CacheOp,
    ipa: u64,
    size: u64,
) -> Result<u64, Status> {
    let mut done = 0;
    while done < size {
        let progress = manager.cache_operation(
            &mut Cpu::new(),
            window,
            ipa + done,
            size - done,
            op,
            attributes::Requester::Dma,
        )?;
        done += progress.done;
    }
    let line = vm().dcache_line;
    Ok((ipa + size).div_ceil(line) - ipa / line)
}

fn ram() -> RamSpan {
    let ram = vm().ram;
    RamSpan {
        ipa: ram.ipa,
        size: ram.size,
    }
}

fn memory_type(attribute: Attribute) -> MemoryType {
    match attribute {
        Attribute::WriteBack => MemoryType::NormalWriteBack,
        Attribute::NonCacheable => MemoryType::NormalNonCacheable,
    }
}

/// The SMMU writes of rights changes: each run split where the pages' attribute changes, which
/// the device's mapping follows (I1; pinned pages keep their attribute).
fn updates(manager: &AttributeManager, changes: &[RightsChange]) -> Vec<RightsUpdate> {
    let ram = vm().ram;
    let mut updates = Vec::new();
    for change in changes {
        for (at, bytes, attribute) in manager.attribute_runs(change.ipa, change.size) {
            updates.push(RightsUpdate {
                ipa: at,
                pa: ram.pa_of(at, bytes).unwrap_or_default(),
                size: bytes,
                before: change.before,
                after: change.after,
                memory: memory_type(attribute),
            });
        }
    }
    updates
}

/// The runs the SMMU's TLB must forget: entries that were valid before and changed.
fn stale(changes: &[RightsChange]) -> impl Iterator<Item = (u64, u64)> + '_ {
    changes
        .iter()
        .filter(|c| c.needs_tlbi())
        .map(|c| (c.ipa, c.size))
}

/// A buffer mapped by [`map_buffer`], for its records.
struct Mapped {
    handle: u64,
    ipa: u64,
    size: u64,
    op: Option<CacheOp>,
}

/// Maps one buffer for `device` (DMA_MAP, or one DMA_MAP_SG segment), with the attribute
/// manager and the mappings held: quota, pin, rights (device stage 2), table entry,
/// maintenance; undone on any failure. The TLB invalidations of entries widened in place are
/// added to `stale_runs`, for the caller's one CMD_SYNC before it returns to the guest (the
/// device cannot use the buffer before it learns of it).
fn map_buffer(
    manager: &mut AttributeManager,
    mappings: &mut Mappings,
    device: DmaDevice,
    ipa: u64,
    size: u64,
    direction: DmaDirection,
    stale_runs: &mut Vec<(u64, u64)>,
) -> Result<Mapped, Status> {
    let span = dma::check_buffer(ipa, size)?;
    manager.check(span.ipa, span.size)?;
    if !mappings.has_room(1) {
        return Err(Status::NoMemory);
    }
    // Pinning splits the blocks the buffer touches, so that no attribute change elsewhere in
    // them ever breaks the translation a device uses (shared mode walks the CPU's stage 2).
    manager.pin(&mut HeapTables, &mut Cpu::new(), span.ipa, span.size)?;
    let undo_rights = |manager: &AttributeManager, mappings: &mut Mappings| {
        let back = mappings.revoke(device.stream_id, ipa, size, direction);
        let _ = smmu::apply_rights(device.stream_id, &updates(manager, &back));
        // Entries narrowed back (a widening undone) may be cached wide: forget them now.
        let runs: Vec<_> = stale(&back).collect();
        let _ = smmu::invalidate_strict(device.stream_id, &runs);
    };
    if device.strict {
        let changes = match mappings.grant(ram(), device.stream_id, ipa, size, direction) {
            Ok(changes) => changes,
            Err(error) => {
                manager.unpin(span.ipa, span.size);
                return Err(error);
            }
        };
        if let Err(error) = smmu::apply_rights(device.stream_id, &updates(manager, &changes)) {
            undo_rights(manager, mappings);
            manager.unpin(span.ipa, span.size);
            return Err(error);
        }
        stale_runs.extend(stale(&changes));
    }
    let handle = match mappings.insert(Mapping {
        stream_id: device.stream_id,
        ipa,
        size,
        direction,
        strict: device.strict,
    }) {
        Ok(handle) => handle,
        Err(error) => {
            // Not expected (the quota was checked under the same lock).
            if device.strict {
                undo_rights(manager, mappings);
            }
            manager.unpin(span.ipa, span.size);
            return Err(error);
        }
    };
    let op = if device.coherent {
        None
    } else {
        dma::maintenance(direction, Step::Map)
    };
    if let Some(op) = op {
        let vm = vm();
        let mut window = vm.windows[current_vcpu()].lock();
        if let Err(error) = maintain(manager, &mut window, op, ipa, size) {
            // Not expected (the pin checked the range): undo the mapping rather than hand the
            // device a buffer that was not maintained.
            drop(window);
            let _ = mappings.remove(handle);
            if device.strict {
                undo_rights(manager, mappings);
            }
            manager.unpin(span.ipa, span.size);
            return Err(error);
        }
    }
    Ok(Mapped {
        handle,
        ipa,
        size,
        op,
    })
}

/// The `dma-map` records of a mapped buffer: one per run of pages of one attribute in strict
/// mode (each with the attribute the device's mapping of it has, clipped to the buffer), one
/// for the whole buffer when the device shares the guest's stage 2. `issued` (the SMMU commands
/// of the call that mapped it) goes on the first.
fn record_map(
    manager: &AttributeManager,
    device: DmaDevice,
    direction: DmaDirection,
    mapped: &Mapped,
    issued: Issued,
) {
    let line = vm().dcache_line;
    let span = dma::check_buffer(mapped.ipa, mapped.size).unwrap_or(dma::PageSpan {
        ipa: mapped.ipa,
        size: 0,
    });
    let runs = if device.strict {
        manager.attribute_runs(span.ipa, span.size)
    } else {
        alloc::vec![(mapped.ipa, mapped.size, Attribute::WriteBack)]
    };
    let end = mapped.ipa + mapped.size;
    for (i, (at, bytes, run_attribute)) in runs.into_iter().enumerate() {
        let start = at.max(mapped.ipa);
        let stop = (at + bytes).min(end);
        audit(
            current_vcpu(),
            Event::DmaMap {
                stream_id: device.stream_id,
                ipa: start,
                size: stop - start,
                direction,
                handle: mapped.handle,
                attribute: device.strict.then_some(run_attribute),
                maintenance: Maintenance {
                    cmo: mapped.op,
                    cmo_lines: if mapped.op.is_some() {
                        stop.div_ceil(line) - start / line
                    } else {
                        0
                    },
                    smmu_commands: if i == 0 { issued.count } else { 0 },
                    smmu_kinds: if i == 0 { issued.kinds } else { 0 },
                    ..Maintenance::default()
                },
                status: 0,
            },
        );
    }
}

/// DMA_MAP(device, ipa, size, direction): x1 IOVA (= IPA), x2 handle.
pub fn map(device: u64, ipa: u64, size: u64, direction: u64) -> Reply {
    // A driver's DMA calls are where its device's faults matter: drain them into the log
    // (one register read when there are none).
    smmu::drain_events();
    let refuse = |error| refused(function::DMA_MAP, error, ipa, size);
    let Some(direction) = dma::direction(direction) else {
        return refuse(Status::InvalidParameter);
    };
    if let Err(error) = dma::check_buffer(ipa, size) {
        return refuse(error);
    }
    let Some(device) = u32::try_from(device).ok().and_then(smmu::dma_device) else {
        return refuse(Status::NoDevice);
    };
    let vm = vm();
    let mut manager = vm.attributes.write();
    let mut mappings = MAPPINGS.lock();
    let mut stale_runs = Vec::new();
    let mapped = match map_buffer(
        &mut manager,
        &mut mappings,
        device,
        ipa,
        size,
        direction,
        &mut stale_runs,
    ) {
        Ok(mapped) => mapped,
        Err(error) => return refuse(error),
    };
    let issued = match smmu::invalidate_strict(device.stream_id, &stale_runs) {
        Ok(issued) => issued,
        Err(error) => {
            // The SMMU failed to confirm the widened rights: the mapping is not handed out. Its
            // pages stay pinned and its rights granted, since the SMMU's state is unknown (I4).
            let _ = mappings.remove(mapped.handle);
            return refuse(error);
        }
    };
    record_map(&manager, device, direction, &mapped, issued);
    reply(Status::Success, ipa, mapped.handle)
}

/// What the first phase of an unmap did to one mapping.
struct Unmapping {
    handle: u64,
    mapping: Mapping,
    device: Option<DmaDevice>,
}

/// Phase 1 of an unmap, with the manager and the mappings held: the mapping leaves the table
/// and, for a strict device, its rights leave the device's stage 2 (narrowed or removed where
/// the union changes). The runs to invalidate in the SMMU's TLB are added to `stale_runs`.
fn revoke(
    manager: &AttributeManager,
    mappings: &mut Mappings,
    handle: u64,
    stale_runs: &mut Vec<(u64, u64)>,
) -> Result<Unmapping, Status> {
    let mapping = mappings.get(handle)?;
    let device = smmu::dma_device(mapping.stream_id);
    if mapping.strict {
        let changes = mappings.revoke(
            mapping.stream_id,
            mapping.ipa,
            mapping.size,
            mapping.direction,
        );
        if let Err(error) = smmu::apply_rights(mapping.stream_id, &updates(manager, &changes)) {
            // Rewriting or removing entries allocates nothing: a mismatch the log reports.
            log::error!("DMA_UNMAP of handle {handle}: device tables did not match ({error:?})");
        }
        stale_runs.extend(stale(&changes));
    }
    let _ = mappings.remove(handle);
    Ok(Unmapping {
        handle,
        mapping,
        device,
    })
}

/// Phase 3 of an unmap, after the SMMU's CMD_SYNC: the invalidate a non-coherent device's
/// FROM_DEVICE or BIDIRECTIONAL buffer needs (exactly its lines, partial edge lines cleaned
/// too), the unpin, and the `dma-unmap` record with the call's SMMU commands.
fn finish_unmap(manager: &mut AttributeManager, unmapping: &Unmapping, issued: Issued) {
    let mapping = unmapping.mapping;
    let mut maintenance = Maintenance {
        smmu_commands: issued.count,
        smmu_kinds: issued.kinds,
        ..Maintenance::default()
    };
    let coherent = unmapping.device.is_none_or(|d| d.coherent);
    if !coherent {
        if let Some(op) = dma::maintenance(mapping.direction, Step::Unmap) {
            let vm = vm();
            let mut window = vm.windows[current_vcpu()].lock();
            maintenance.cmo = Some(op);
            maintenance.cmo_lines =
                maintain(manager, &mut window, op, mapping.ipa, mapping.size).unwrap_or(0);
        }
    }
    let span = mapping.span();
    manager.unpin(span.ipa, span.size);
    audit(
        current_vcpu(),
        Event::DmaUnmap {
            stream_id: mapping.stream_id,
            handle: unmapping.handle,
            ipa: mapping.ipa,
            size: mapping.size,
            direction: mapping.direction,
            maintenance,
            status: 0,
        },
    );
}

/// DMA_UNMAP(handle).
pub fn unmap(handle: u64) -> Reply {
    let vm = vm();
    let mut manager = vm.attributes.write();
    let mut mappings = MAPPINGS.lock();
    let mut stale_runs = Vec::new();
    let unmapping = match revoke(&manager, &mut mappings, handle, &mut stale_runs) {
        Ok(unmapping) => unmapping,
        Err(error) => return refused(function::DMA_UNMAP, error, handle, 0),
    };
    // The device loses access, and the SMMU confirms it (CMD_SYNC), before any invalidate.
    let issued = match smmu::invalidate_strict(unmapping.mapping.stream_id, &stale_runs) {
        Ok(issued) => issued,
        Err(error) => return refused(function::DMA_UNMAP, error, handle, 0),
    };
    finish_unmap(&mut manager, &unmapping, issued);
    reply(Status::Success, 0, 0)
}

/// DMA_SYNC(handle, offset, size, target): target 0 = for the CPU, 1 = for the device.
/// NOT_REQUIRED for a coherent device or a non-cacheable buffer, without touching the cache.
pub fn sync(handle: u64, offset: u64, size: u64, target: u64) -> Reply {
    let vm = vm();
    let manager = vm.attributes.read();
    let mapping = match MAPPINGS.lock().get(handle) {
        Ok(mapping) => mapping,
        Err(error) => return refused(function::DMA_SYNC, error, handle, 0),
    };
    let for_device = match target {
        0 => false,
        1 => true,
        _ => {
            return refused(
                function::DMA_SYNC,
                Status::InvalidParameter,
                mapping.ipa,
                size,
            )
        }
    };
    if size == 0 {
        return refused(
            function::DMA_SYNC,
            Status::InvalidParameter,
            mapping.ipa,
            size,
        );
    }
    if offset
        .checked_add(size)
        .is_none_or(|end| end > mapping.size)
    {
        return refused(function::DMA_SYNC, Status::OutOfRange, mapping.ipa, size);
    }
    let ipa = mapping.ipa + offset;
    let coherent = smmu::dma_device(mapping.stream_id).is_none_or(|d| d.coherent);
    let step = if for_device {
        Step::ForDevice
    } else {
        Step::ForCpu
    };
    let op = dma::maintenance(mapping.direction, step);
    let mut maintenance = Maintenance::default();
    let status = match op {
        Some(op) if !coherent && !manager.all_non_cacheable(ipa, size) => {
            let mut window = vm.windows[current_vcpu()].lock();
            match maintain(&manager, &mut window, op, ipa, size) {
                Ok(lines) => {
                    maintenance.cmo = Some(op);
                    maintenance.cmo_lines = lines;
                    Status::Success
                }
                Err(error) => error,
            }
        }
        _ => Status::NotRequired,
    };
    audit(
        current_vcpu(),
        Event::DmaSync {
            stream_id: mapping.stream_id,
            handle,
            ipa,
            size,
            for_device,
            maintenance,
            status: status.code(),
        },
    );
    reply(status, 0, 0)
}

/// Reads segment `index` of a scatter-gather array.
fn read_segment(
    manager: &AttributeManager,
    request: &SgRequest,
    index: u64,
) -> Result<Segment, Status> {
    let mut raw = [0u8; SEGMENT_SIZE as usize];
    let vm = vm();
    let mut window = vm.windows[current_vcpu()].lock();
    guest_memory::read_locked(manager, &mut window, request.segment_ipa(index), &mut raw)?;
    Segment::read_from_bytes(&raw).map_err(|_| Status::InvalidParameter)
}

/// x1 segments done in all (the next segment's index), x2 the resume cookie (0 when done).
fn sg_reply(status: Status, next: u64) -> Reply {
    let cookie = if status == Status::Incomplete {
        next
    } else {
        0
    };
    reply(status, next, cookie)
}

/// DMA_MAP_SG(device, array, count, direction, cookie): maps segments from `cookie` on (at
/// most [`dma_sg::SEGMENTS_PER_CALL`] and about one work budget of bytes per call), writes each
/// one's handle into its `handle` field, and answers x1 = segments mapped so far (the next
/// index), x2 = the resume cookie when INCOMPLETE. On an error the segments before x1 stay
/// mapped (the caller unmaps them with DMA_UNMAP_SG over the first x1 segments). One CMD_SYNC
/// per call at most (for entries widened in place).
pub fn map_sg(device: u64, array: u64, count: u64, direction: u64, cookie: u64) -> Reply {
    smmu::drain_events();
    let refuse = |error, at| {
        record_refusal(function::DMA_MAP_SG, error, array, count);
        sg_reply(error, at)
    };
    let request = match SgRequest::check(array, count, cookie) {
        Ok(request) => request,
        Err(error) => return refuse(error, 0),
    };
    let Some(direction) = dma::direction(direction) else {
        return refuse(Status::InvalidParameter, cookie);
    };
    let Some(device) = u32::try_from(device).ok().and_then(smmu::dma_device) else {
        return refuse(Status::NoDevice, cookie);
    };
    let vm = vm();
    let mut manager = vm.attributes.write();
    if let Err(error) = manager.check(array, count * SEGMENT_SIZE) {
        return refuse(error, cookie);
    }
    let mut mappings = MAPPINGS.lock();
    let mut budget = SgBudget::new(attributes::WORK_BUDGET);
    let mut stale_runs = Vec::new();
    let mut done = Vec::new();
    let mut next = request.first;
    let mut outcome = Ok(());
    while next < count && budget.admits() {
        let segment = match read_segment(&manager, &request, next) {
            Ok(segment) => segment,
            Err(error) => {
                outcome = Err((error, array, count));
                break;
            }
        };
        let mapped = match map_buffer(
            &mut manager,
            &mut mappings,
            device,
            segment.addr,
            segment.size,
            direction,
            &mut stale_runs,
        ) {
            Ok(mapped) => mapped,
            Err(error) => {
                outcome = Err((error, segment.addr, segment.size));
                break;
            }
        };
        let written = {
            let mut window = vm.windows[current_vcpu()].lock();
            guest_memory::write_locked(
                &manager,
                &mut window,
                request.segment_ipa(next) + HANDLE_OFFSET,
                &mapped.handle.to_le_bytes(),
            )
        };
        done.push(mapped);
        if let Err(error) = written {
            // The array was checked: not expected. The segment stays mapped and counted.
            outcome = Err((error, array, count));
            next += 1;
            break;
        }
        budget.charge(segment.size);
        next += 1;
    }
    let issued = match smmu::invalidate_strict(device.stream_id, &stale_runs) {
        Ok(issued) => issued,
        Err(error) => {
            // The SMMU failed: nothing of this call is handed out. Its pages stay pinned and
            // their rights granted, since the SMMU's state is unknown (I4).
            for mapped in &done {
                let _ = mappings.remove(mapped.handle);
            }
            return refuse(error, request.first);
        }
    };
    for (i, mapped) in done.iter().enumerate() {
        record_map(
            &manager,
            device,
            direction,
            mapped,
            if i == 0 { issued } else { Issued::default() },
        );
    }
    match outcome {
        Err((error, ipa, size)) => {
            record_refusal(function::DMA_MAP_SG, error, ipa, size);
            sg_reply(error, next)
        }
        Ok(()) if next == count => sg_reply(Status::Success, next),
        Ok(()) => sg_reply(Status::Incomplete, next),
    }
}

/// DMA_UNMAP_SG(array, count, cookie): unmaps the segments' mappings (by the handles
/// DMA_MAP_SG wrote) from `cookie` on, within one call's budget: every device entry of the call
/// is narrowed or removed, then one TLB invalidation and CMD_SYNC per device, then each
/// buffer's invalidate and unpin. x1 = segments unmapped so far, x2 = the resume cookie when
/// INCOMPLETE. On an error (a stale handle) the segments before x1 are unmapped.
pub fn unmap_sg(array: u64, count: u64, cookie: u64) -> Reply {
    let refuse = |error, at| {
        record_refusal(function::DMA_UNMAP_SG, error, array, count);
        sg_reply(error, at)
    };
    let request = match SgRequest::check(array, count, cookie) {
        Ok(request) => request,
        Err(error) => return refuse(error, 0),
    };
    let vm = vm();
    let mut manager = vm.attributes.write();
    if let Err(error) = manager.check(array, count * SEGMENT_SIZE) {
        return refuse(error, cookie);
    }
    let mut mappings = MAPPINGS.lock();
    let mut budget = SgBudget::new(attributes::WORK_BUDGET);
    // (device, stale runs) for each device the call names.
    let mut stale_by_device: Vec<(u32, Vec<(u64, u64)>)> = Vec::new();
    let mut unmappings = Vec::new();
    let mut next = request.first;
    let mut outcome = Ok(());
    while next < count && budget.admits() {
        let handle = match read_segment(&manager, &request, next) {
            Ok(segment) => segment.handle,
            Err(error) => {
                outcome = Err((error, array, count));
                break;
            }
        };
        let stream_id = match mappings.get(handle) {
            Ok(mapping) => mapping.stream_id,
            Err(error) => {
                outcome = Err((error, handle, 0));
                break;
            }
        };
        let index = match stale_by_device
            .iter()
            .position(|(sid, _)| *sid == stream_id)
        {
            Some(index) => index,
            None => {
                stale_by_device.push((stream_id, Vec::new()));
                stale_by_device.len() - 1
            }
        };
        match revoke(
            &manager,
            &mut mappings,
            handle,
            &mut stale_by_device[index].1,
        ) {
            Ok(unmapping) => {
                budget.charge(unmapping.mapping.size);
                unmappings.push(unmapping);
            }
            Err(error) => {
                outcome = Err((error, handle, 0));
                break;
            }
        }
        next += 1;
    }
    let mut issued = Issued::default();
    for (stream_id, runs) in &stale_by_device {
        match smmu::invalidate_strict(*stream_id, runs) {
            Ok(more) => {
                issued.count += more.count;
                issued.kinds |= more.kinds;
            }
            Err(error) => return refuse(error, request.first),
        }
    }
    for unmapping in &unmappings {
        finish_unmap(&mut manager, unmapping, issued);
    }
    match outcome {
        Err((error, ipa, size)) => {
            record_refusal(function::DMA_UNMAP_SG, error, ipa, size);
            sg_reply(error, next)
        }
        Ok(()) if next == count => sg_reply(Status::Success, next),
        Ok(()) => sg_reply(Status::Incomplete, next),
    }
}
