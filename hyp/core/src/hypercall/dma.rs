//! The DMA calls: DEV_INFO, DMA_MAP, DMA_UNMAP, DMA_SYNC, DMA_MAP_SG and DMA_UNMAP_SG.
//! Buffers are byte-granular. A mapped buffer's pages are pinned in the ledger (their attribute
//! cannot change, I4); a strict device's stage 2 gives each page the counted union of its live
//! mappings' rights (`crate::dma`), rewritten only when that union changes; a non-coherent
//! device's buffer is maintained over exactly its lines as its direction requires.
//!
//! A map checks everything first (direction, buffer, RAM, quota, device), then makes its
//! changes in an order where each step that can still fail (the rights table, a block split,
//! the device's table memory) comes before the ones that cannot, and is undone completely if a
//! later one fails. An unmap removes the device's access and waits for the IOMMU (TLBI + sync)
//! before the CPU-side invalidate and the unpin. No error is dropped: an undo that cannot
//! complete keeps the pages pinned (the device's view is unknown, I4) and says so in the log.

use super::memory::{read_guest, write_guest};
use super::platform::{AuditSink, DmaDevice, GuestMemory, Iommu, Issued, RightsUpdate};
use super::{Completion, HypercallError, PerCpu, Reply, Vm};
use crate::address::{Ipa, Pa};
use crate::attributes::{self, Attribute, AttributeManager};
use crate::audit::{DmaDirection, Event, Maintenance};
use crate::config::DmaMode;
use crate::dma::{
    self, Mapping, Mappings, PageSpan, RamSpan, RightsChange, SgBudget, SgRequest, StaleRuns, Step,
};
use crate::maintenance::{Arch, CacheOp};
use crate::pagetable::{MemoryType, TableMemory, PAGE_SIZE};
use alloc::vec::Vec;
use stagehand_abi::dma_sg::{Segment, HANDLE_OFFSET, SEGMENT_SIZE};
use stagehand_abi::function;
use zerocopy::FromBytes;

/// DEV_INFO(index): x1 StreamID, x2 segment << 16 | bus << 8 | device << 3 | function, x3 flags
/// (bit 0 coherent, bit 1 strict).
///
/// # Errors
/// NO_DEVICE past the last device.
pub fn device_info<M, I: Iommu, S>(vm: &Vm<M, I, S>, index: u64) -> Result<Reply, HypercallError> {
    let info = usize::try_from(index)
        .ok()
        .and_then(|index| vm.iommu.device_info(index))
        .ok_or(HypercallError::NoDevice)?;
    let flags = info.coherent as u64 | ((info.mode == DmaMode::Strict) as u64) << 1;
    Ok(Reply::success([
        info.stream_id as u64,
        info.requester_id as u64,
        flags,
    ]))
}

/// `op` over guest `[ipa, ipa + size)` through the hypervisor's alias of guest RAM, to the end
/// (the caller bounds `size`): exactly the buffer's lines, partial edge lines of an invalidate
/// cleaned too. Returns the lines maintained.
#[inline]
fn maintain<A: Arch>(
    manager: &AttributeManager,
    cpu: &mut A,
    op: CacheOp,
    ipa: u64,
    size: u64,
) -> Result<u64, HypercallError> {
    Ok(manager.dma_cache_operation(cpu, ipa, size, op)?)
}

fn memory_type(attribute: Attribute) -> MemoryType {
    match attribute {
        Attribute::WriteBack => MemoryType::NormalWriteBack,
        Attribute::NonCacheable => MemoryType::NormalNonCacheable,
    }
}

/// Writes rights changes into a strict device's stage 2 as the counted rights hand them over:
/// each change split where the pages' attribute changes (the device's mapping follows it, I1),
/// adjacent pages of one kind merged into one update, one IOMMU call per update (a one-page
/// buffer makes one), no vector. The runs whose valid entries change are added to `stale`, for
/// the caller's IOTLB invalidation and sync. The first error stops the writing (the caller
/// undoes); the stale runs are still collected, so that whatever was written is invalidated.
/// A one-page buffer (the span of a driver's typical 4 KiB element) yields at most one change
/// of that page: it is written at once, with nothing to merge.
struct RightsWriter<'a, I> {
    manager: &'a AttributeManager,
    iommu: &'a I,
    stream_id: u32,
    /// The span is one page.
    one_page: bool,
    pending: Option<RightsUpdate>,
    result: Result<(), HypercallError>,
    stale: &'a mut StaleRuns,
}

impl<'a, I: Iommu> RightsWriter<'a, I> {
    fn new(
        manager: &'a AttributeManager,
        iommu: &'a I,
        stream_id: u32,
        span: PageSpan,
        stale: &'a mut StaleRuns,
    ) -> Self {
        Self {
            manager,
            iommu,
            stream_id,
            one_page: span.size == PAGE_SIZE,
            pending: None,
            result: Ok(()),
            stale,
        }
    }

    fn add(&mut self, change: RightsChange) {
        if change.needs_tlbi() {
            self.stale.push(Ipa::new(change.ipa), change.size);
        }
        if self.result.is_err() {
            return;
        }
        // The runs come from checked buffers inside RAM: one check gives the PA of the run.
        let Some(pa) = self.manager.ram().pa_of(change.ipa, change.size) else {
            self.result = Err(HypercallError::OutOfRange);
            return;
        };
        if self.one_page {
            let attribute = self.manager.attribute_of(change.ipa);
            let update = RightsUpdate {
                ipa: Ipa::new(change.ipa),
                pa: Pa::new(pa),
                size: PAGE_SIZE,
                before: change.before,
                after: change.after,
                memory: memory_type(attribute),
            };
            self.result = self
                .iommu
                .apply_rights(self.stream_id, core::slice::from_ref(&update))
                .map_err(Into::into);
            return;
        }
        let mut offset = 0;
        while offset < change.size {
            let ipa = change.ipa + offset;
            let (attribute, bytes) = self.manager.attribute_run(ipa, change.size - offset);
            let memory = memory_type(attribute);
            match self.pending.as_mut() {
                Some(last)
                    if last.ipa.get() + last.size == ipa
                        && last.memory == memory
                        && last.before == change.before
                        && last.after == change.after =>
                {
                    last.size += bytes
                }
                _ => {
                    self.flush();
                    self.pending = Some(RightsUpdate {
                        ipa: Ipa::new(ipa),
                        pa: Pa::new(pa + offset),
                        size: bytes,
                        before: change.before,
                        after: change.after,
                        memory,
                    });
                }
            }
            offset += bytes;
        }
    }

    fn flush(&mut self) {
        if let Some(update) = self.pending.take() {
            if self.result.is_ok() {
                self.result = self
                    .iommu
                    .apply_rights(self.stream_id, core::slice::from_ref(&update))
                    .map_err(Into::into);
            }
        }
    }

    /// Writes what is pending. (By reference: moving the writer into a call is a copy of it.)
    fn finish(&mut self) -> Result<(), HypercallError> {
        self.flush();
        self.result
    }
}

/// A buffer mapped by [`map_buffer`], for its records. (`repr(C)`: see [`Unmapping`].)
#[repr(C)]
struct Mapped {
    handle: u64,
    ipa: u64,
    size: u64,
    span: PageSpan,
    op: Option<CacheOp>,
}

impl Mapped {
    /// The buffer `[ipa, ipa + size)` (checked by [`map_buffer`], which gave `handle`).
    fn new(handle: u64, ipa: u64, size: u64, device: DmaDevice, direction: DmaDirection) -> Self {
        Self {
            handle,
            ipa,
            size,
            span: dma::check_buffer(ipa, size).unwrap_or(PageSpan { ipa, size: 0 }),
            op: map_maintenance(device, direction),
        }
    }
}

/// The maintenance a map of `device`'s buffer in `direction` needs.
fn map_maintenance(device: DmaDevice, direction: DmaDirection) -> Option<CacheOp> {
    if device.coherent {
        None
    } else {
        dma::maintenance(direction, Step::Map)
    }
}

/// The locks and handles a map or unmap works with.
struct Held<'a, I> {
    manager: &'a mut AttributeManager,
    mappings: &'a mut Mappings,
    iommu: &'a I,
}

impl<I: Iommu> Held<'_, I> {
    /// Grants `device` `direction`'s rights on `span` (its rights table prepared, the pages
    /// pinned) and writes the entries whose rights change; on failure undoes both, and the pin
    /// when the device's view is known again.
    fn grant_rights(
        &mut self,
        device: DmaDevice,
        span: PageSpan,
        direction: DmaDirection,
        stale: &mut StaleRuns,
    ) -> Result<(), HypercallError> {
        let mut writer = RightsWriter::new(self.manager, self.iommu, device.stream_id, span, stale);
        let granted = self
            .mappings
            .grant(device.stream_id, span, direction, |c| writer.add(c));
        let written = writer.finish();
        match (granted, written) {
            (Ok(()), Ok(())) => Ok(()),
            (Err(error), _) => {
                // The counts refused before any change: nothing was written.
                self.manager.unpin(span.ipa, span.size);
                Err(error.into())
            }
            (Ok(()), Err(error)) => {
                if self.undo_rights(device, span, direction) {
                    self.manager.unpin(span.ipa, span.size);
                }
                Err(error)
            }
        }
    }

    /// Takes back the rights `span` was granted and writes the narrowed entries; returns
    /// whether the device's tables and IOTLB are known to match again. When they are not, the
    /// caller keeps the pages pinned.
    fn undo_rights(&mut self, device: DmaDevice, span: PageSpan, direction: DmaDirection) -> bool {
        let mut stale = StaleRuns::new();
        let mut writer =
            RightsWriter::new(self.manager, self.iommu, device.stream_id, span, &mut stale);
        let revoked = self
            .mappings
            .revoke(device.stream_id, span, direction, |c| writer.add(c));
        let written = writer.finish();
        // Entries narrowed back (a widening undone) may be cached wide: forget them now.
        let invalidated = self
            .iommu
            .invalidate_strict(device.stream_id, stale.as_slice());
        match (revoked, written, invalidated) {
            (true, Ok(()), Ok(_)) => true,
            (revoked, written, invalidated) => {
                log::error!(
                    "DMA: undoing rights of {:#x}+{:#x} for StreamID {:#x} failed \
                     (revoked {revoked}, {written:?}, {invalidated:?}): its pages stay pinned",
                    span.ipa,
                    span.size,
                    device.stream_id
                );
                false
            }
        }
    }
}

/// Maps one buffer for `device` (DMA_MAP, or one DMA_MAP_SG segment), with stage 2 and the
/// mappings held. Checks first (buffer, RAM, a slot under the quota, the device's rights
/// table: the allocations a map may need are made here); then the steps that may fail, each
/// undone if a later one fails: the pin (block splits), the device's rights and table entries
/// (table memory); then what cannot fail: the handle (slot reserved), the maintenance (range
/// checked). Returns the handle (the caller builds its [`Mapped`]: a returned struct is a
/// copy). The IOTLB invalidations of entries widened in place are added to `stale_runs`,
/// for the caller's one sync before it returns to the guest (the device cannot use the buffer
/// before it learns of it).
#[allow(clippy::too_many_arguments)]
fn map_buffer<A: Arch, M: TableMemory, I: Iommu>(
    held: &mut Held<'_, I>,
    tables: &mut M,
    cpu: &mut A,
    device: DmaDevice,
    ipa: u64,
    size: u64,
    direction: DmaDirection,
    stale_runs: &mut StaleRuns,
) -> Result<u64, HypercallError> {
    // Check all.
    let span = dma::check_buffer(ipa, size)?;
    held.manager.check(span.ipa, span.size)?;
    held.mappings.reserve()?;
    if device.strict {
        let ram = held.manager.ram();
        let ram = RamSpan {
            ipa: ram.ipa,
            size: ram.size,
        };
        held.mappings.prepare_rights(ram, device.stream_id)?;
    }
    // Set all, fallible steps first. Pinning splits the blocks the buffer touches, so that no
    // attribute change elsewhere in them ever breaks the translation a device uses (shared
    // mode walks the CPU's stage 2). BUSY changes nothing; NO_MEMORY may leave blocks split,
    // which nothing can see.
    let mut arch = super::platform::WithDeviceTlb {
        cpu,
        iommu: held.iommu,
    };
    held.manager.pin(tables, &mut arch, span.ipa, span.size)?;
    let cpu = arch.cpu;
    if device.strict {
        // A rights count cannot overflow once the pin did not (each mapping of the page adds
        // one of each), so this fails only when the device's table memory runs out.
        held.grant_rights(device, span, direction, stale_runs)?;
    }
    // Cannot fail from here on: the slot and the range were checked under the same locks.
    let handle = match held.mappings.insert(Mapping {
        stream_id: device.stream_id,
        ipa,
        size,
        direction,
        strict: device.strict,
        coherent: device.coherent,
    }) {
        Ok(handle) => handle,
        Err(error) => {
            if !device.strict || held.undo_rights(device, span, direction) {
                held.manager.unpin(span.ipa, span.size);
            }
            return Err(error.into());
        }
    };
    if let Some(op) = map_maintenance(device, direction) {
        if let Err(error) = maintain(held.manager, cpu, op, ipa, size) {
            // The device must not get a buffer that was not maintained.
            if held.mappings.remove(handle).is_err() {
                log::error!("DMA: handle {handle} vanished under the lock");
            }
            if !device.strict || held.undo_rights(device, span, direction) {
                held.manager.unpin(span.ipa, span.size);
            }
            return Err(error);
        }
    }
    Ok(handle)
}

/// Calls `each(start, bytes, attribute)` for the runs of pages of one attribute in `span`
/// (guest RAM), in order, without collecting them.
fn for_each_attribute_run(
    manager: &AttributeManager,
    span: PageSpan,
    mut each: impl FnMut(u64, u64, Attribute),
) {
    if span.size == PAGE_SIZE {
        return each(span.ipa, PAGE_SIZE, manager.attribute_of(span.ipa));
    }
    let end = span.ipa + span.size;
    let mut start = span.ipa;
    while start < end {
        let (attribute, bytes) = manager.attribute_run(start, end - start);
        each(start, bytes, attribute);
        start += bytes;
    }
}

/// The `dma-map` records of a mapped buffer: one per run of pages of one attribute in strict
/// mode (each with the attribute the device's mapping of it has, clipped to the buffer), one
/// for the whole buffer when the device shares the guest's stage 2. `issued` (the IOMMU
/// commands of the call that mapped it) goes on the first.
fn record_map<M, I, S: AuditSink>(
    vm: &Vm<M, I, S>,
    vcpu: usize,
    manager: &AttributeManager,
    device: DmaDevice,
    direction: DmaDirection,
    mapped: &Mapped,
    issued: Issued,
) {
    let line = vm.dcache_line;
    let end = mapped.ipa + mapped.size;
    let mut first = true;
    let mut record = |at: u64, bytes: u64, attribute: Option<Attribute>| {
        let start = at.max(mapped.ipa);
        let stop = (at + bytes).min(end);
        let issued = if core::mem::take(&mut first) {
            issued
        } else {
            Issued::default()
        };
        vm.record(
            vcpu,
            &Event::DmaMap {
                stream_id: device.stream_id,
                ipa: start,
                size: stop - start,
                direction,
                handle: mapped.handle,
                attribute,
                maintenance: Maintenance {
                    cmo: mapped.op,
                    cmo_lines: if mapped.op.is_some() {
                        stop.div_ceil(line) - start / line
                    } else {
                        0
                    },
                    smmu_commands: issued.count,
                    smmu_kinds: issued.kinds,
                    ..Maintenance::default()
                },
                status: 0,
            },
        );
    };
    if device.strict {
        for_each_attribute_run(manager, mapped.span, |at, bytes, attribute| {
            record(at, bytes, Some(attribute))
        });
    } else {
        record(mapped.ipa, mapped.size, None);
    }
}

/// The device a call names, if the guest may use it for DMA.
fn dma_device<I: Iommu>(iommu: &I, device: u64) -> Result<DmaDevice, HypercallError> {
    u32::try_from(device)
        .ok()
        .and_then(|id| iommu.dma_device(id))
        .ok_or(HypercallError::NoDevice)
}

/// DMA_MAP(device, ipa, size, direction): x1 IOVA (= IPA), x2 handle.
///
/// # Errors
/// INVALID_PARAMETER, OUT_OF_RANGE, DENIED, NO_DEVICE, NO_MEMORY, BUSY; nothing is mapped.
pub fn map<M, I, S, C>(
    vm: &Vm<M, I, S>,
    cpu: &mut PerCpu<C>,
    device: u64,
    ipa: u64,
    size: u64,
    direction: u64,
) -> Result<Reply, HypercallError>
where
    M: TableMemory,
    I: Iommu,
    S: AuditSink,
    C: Arch,
{
    // A driver's DMA calls are where its device's faults matter: drain them into the log (one
    // register read when there are none).
    vm.iommu.drain_events(cpu.vcpu, &vm.audit);
    let direction = dma::direction(direction).ok_or(HypercallError::InvalidParameter)?;
    let span = dma::check_buffer(ipa, size)?;
    let device = dma_device(&vm.iommu, device)?;
    let mut stage2 = vm.stage2.write();
    let stage2 = &mut *stage2;
    let mut mappings = vm.mappings.lock();
    let mut held = Held {
        manager: &mut stage2.manager,
        mappings: &mut mappings,
        iommu: &vm.iommu,
    };
    let mut stale_runs = StaleRuns::new();
    let handle = map_buffer(
        &mut held,
        &mut stage2.tables,
        &mut cpu.cpu,
        device,
        ipa,
        size,
        direction,
        &mut stale_runs,
    )?;
    let mapped = Mapped {
        handle,
        ipa,
        size,
        span,
        op: map_maintenance(device, direction),
    };
    // Usually nothing to invalidate (the buffer's entries were invalid before): no IOMMU call.
    let invalidated = if stale_runs.is_empty() {
        Ok(Issued::default())
    } else {
        vm.iommu
            .invalidate_strict(device.stream_id, stale_runs.as_slice())
    };
    let issued = match invalidated {
        Ok(issued) => issued,
        Err(error) => {
            // The IOMMU did not confirm the widened rights: the mapping is not handed out. Its
            // pages stay pinned and its rights granted, since the device's view is unknown (I4).
            if held.mappings.remove(mapped.handle).is_err() {
                log::error!("DMA: handle {} vanished under the lock", mapped.handle);
            }
            return Err(error.into());
        }
    };
    record_map(
        vm,
        cpu.vcpu,
        held.manager,
        device,
        direction,
        &mapped,
        issued,
    );
    Ok(Reply::success([ipa, mapped.handle, 0]))
}

/// What the first phase of an unmap did to one mapping. (`repr(C)`, the handle first: moving
/// one is word copies, not a byte copy behind a one-byte field.)
#[repr(C)]
struct Unmapping {
    handle: u64,
    /// The mapping's pages.
    span: PageSpan,
    mapping: Mapping,
}

/// Phase 1 of an unmap, with stage 2 and the mappings held: the mapping leaves the table and,
/// for a strict device, its rights leave the device's stage 2 (narrowed or removed where the
/// union changes). The runs to invalidate in the IOTLB are added to `stale_runs`.
///
/// # Errors
/// BAD_HANDLE for an unknown or stale handle (nothing changed).
#[inline(always)]
fn revoke<I: Iommu>(
    held: &mut Held<'_, I>,
    handle: u64,
    stale_runs: &mut StaleRuns,
) -> Result<Unmapping, HypercallError> {
    let mapping = held.mappings.remove(handle)?;
    let span = mapping.span();
    if mapping.strict {
        let mut writer = RightsWriter::new(
            held.manager,
            held.iommu,
            mapping.stream_id,
            span,
            stale_runs,
        );
        let revoked = held
            .mappings
            .revoke(mapping.stream_id, span, mapping.direction, |c| {
                writer.add(c)
            });
        let written = writer.finish();
        if !revoked || written.is_err() {
            // Rewriting or removing entries allocates nothing, and a live mapping's rights are
            // counted: a mismatch the log reports. The runs are still invalidated.
            log::error!(
                "DMA_UNMAP of handle {handle}: rights or device tables did not match \
                 (revoked {revoked}, {written:?})"
            );
        }
    }
    Ok(Unmapping {
        handle,
        span,
        mapping,
    })
}

/// Phase 3 of an unmap, after the IOMMU's sync: the invalidate a non-coherent device's
/// FROM_DEVICE or BIDIRECTIONAL buffer needs (exactly its lines, partial edge lines cleaned
/// too), the unpin, and the `dma-unmap` record with the call's IOMMU commands. A failed
/// invalidate (the range was checked at map time: not expected) keeps the pin and is the
/// record's status.
#[allow(clippy::too_many_arguments)]
fn finish_unmap<M, I, S: AuditSink, A: Arch>(
    vm: &Vm<M, I, S>,
    vcpu: usize,
    manager: &mut AttributeManager,
    cpu: &mut A,
    unmapping: &Unmapping,
    issued: Issued,
) -> Result<(), HypercallError> {
    let mapping = unmapping.mapping;
    let op = if mapping.coherent {
        None
    } else {
        dma::maintenance(mapping.direction, Step::Unmap)
    };
    let (result, cmo_lines) = match op {
        Some(op) => match maintain(manager, cpu, op, mapping.ipa, mapping.size) {
            Ok(lines) => (Ok(()), lines),
            Err(error) => (Err(error), 0),
        },
        None => (Ok(()), 0),
    };
    if result.is_ok() {
        manager.unpin(unmapping.span.ipa, unmapping.span.size);
    }
    // Built in place (no local copy of the maintenance moved into the record: on a
    // strict-alignment target that move is a byte copy).
    vm.record(
        vcpu,
        &Event::DmaUnmap {
            stream_id: mapping.stream_id,
            handle: unmapping.handle,
            ipa: mapping.ipa,
            size: mapping.size,
            direction: mapping.direction,
            maintenance: Maintenance {
                cmo: op,
                cmo_lines,
                smmu_commands: issued.count,
                smmu_kinds: issued.kinds,
                ..Maintenance::default()
            },
            status: match result {
                Ok(()) => 0,
                Err(error) => error.code(),
            },
        },
    );
    result
}

/// DMA_UNMAP(handle).
///
/// # Errors
/// BAD_HANDLE (nothing changed); BUSY when the IOMMU did not confirm the invalidation (the
/// mapping is gone, its pages stay pinned: the device's view is unknown).
pub fn unmap<M, I, S, C>(
    vm: &Vm<M, I, S>,
    cpu: &mut PerCpu<C>,
    handle: u64,
) -> Result<Reply, HypercallError>
where
    M: TableMemory,
    I: Iommu,
    S: AuditSink,
    C: Arch,
{
    let mut stage2 = vm.stage2.write();
    let mut mappings = vm.mappings.lock();
    let mut held = Held {
        manager: &mut stage2.manager,
        mappings: &mut mappings,
        iommu: &vm.iommu,
    };
    let mut stale_runs = StaleRuns::new();
    let unmapping = revoke(&mut held, handle, &mut stale_runs)?;
    // The device loses access, and the IOMMU confirms it, before any invalidate.
    let issued = vm
        .iommu
        .invalidate_strict(unmapping.mapping.stream_id, stale_runs.as_slice())?;
    match finish_unmap(vm, cpu.vcpu, held.manager, &mut cpu.cpu, &unmapping, issued) {
        Ok(()) => Ok(Reply::success([0; 3])),
        Err(error) => Ok(Reply::new(Completion::Stopped(error), [0; 3])),
    }
}

/// DMA_SYNC(handle, offset, size, target): target 0 = for the CPU, 1 = for the device.
/// NOT_REQUIRED for a coherent device or a non-cacheable buffer, without touching the cache.
///
/// # Errors
/// BAD_HANDLE. INVALID_PARAMETER (target, zero size) and OUT_OF_RANGE (beyond the buffer) are
/// refusals too, recorded here with the buffer's IPA and answered as a reply that did nothing.
pub fn sync<M, I, S, C>(
    vm: &Vm<M, I, S>,
    cpu: &mut PerCpu<C>,
    handle: u64,
    offset: u64,
    size: u64,
    target: u64,
) -> Result<Reply, HypercallError>
where
    M: TableMemory,
    I: Iommu,
    S: AuditSink,
    C: Arch,
{
    let stage2 = vm.stage2.read();
    let mapping = vm.mappings.lock().get(handle)?;
    // Past the handle, a refusal's record names the buffer (its IPA), which the audit report
    // files it under, rather than the handle the dispatcher would name.
    let refuse = |error: HypercallError| {
        vm.record(
            cpu.vcpu,
            &Event::RefusedRange {
                function: function::DMA_SYNC,
                status: error.code(),
                ipa: mapping.ipa,
                size,
            },
        );
        Ok(Reply::new(Completion::Stopped(error), [0; 3]))
    };
    let for_device = match target {
        0 => false,
        1 => true,
        _ => return refuse(HypercallError::InvalidParameter),
    };
    if size == 0 {
        return refuse(HypercallError::InvalidParameter);
    }
    if offset
        .checked_add(size)
        .is_none_or(|end| end > mapping.size)
    {
        return refuse(HypercallError::OutOfRange);
    }
    let ipa = mapping.ipa + offset;
    let coherent = mapping.coherent;
    let step = if for_device {
        Step::ForDevice
    } else {
        Step::ForCpu
    };
    let mut maintenance = Maintenance::default();
    let completion = match dma::maintenance(mapping.direction, step) {
        Some(op) if !coherent && !stage2.manager.all_non_cacheable(ipa, size) => {
            match maintain(&stage2.manager, &mut cpu.cpu, op, ipa, size) {
                Ok(lines) => {
                    maintenance.cmo = Some(op);
                    maintenance.cmo_lines = lines;
                    Completion::Success
                }
                Err(error) => Completion::Stopped(error),
            }
        }
        _ => Completion::NotRequired,
    };
    vm.record(
        cpu.vcpu,
        &Event::DmaSync {
            stream_id: mapping.stream_id,
            handle,
            ipa,
            size,
            for_device,
            maintenance,
            status: completion.code(),
        },
    );
    Ok(Reply::new(completion, [0; 3]))
}

/// Reads segment `index` of a scatter-gather array, through the ABI's own layout.
fn read_segment<C: Arch + GuestMemory>(
    manager: &AttributeManager,
    cpu: &mut C,
    request: &SgRequest,
    index: u64,
) -> Result<Segment, HypercallError> {
    let mut raw = [0u8; SEGMENT_SIZE as usize];
    read_guest(manager, cpu, request.segment_ipa(index), &mut raw)?;
    Segment::read_from_bytes(&raw).map_err(|_| HypercallError::InvalidParameter)
}

/// x1 segments done in all (the next segment's index), x2 the resume cookie (0 when done).
fn sg_reply(completion: Completion, next: u64) -> Reply {
    let cookie = if completion == Completion::Incomplete {
        next
    } else {
        0
    };
    Reply::new(completion, [next, cookie, 0])
}

/// A scatter-gather call stopped mid-way: the refusal record of the segment (or array) that
/// stopped it, and the reply that reports the segments done before it.
fn sg_stopped<M, I, S: AuditSink>(
    vm: &Vm<M, I, S>,
    vcpu: usize,
    function: u32,
    (error, ipa, size): (HypercallError, u64, u64),
    next: u64,
) -> Reply {
    vm.record(
        vcpu,
        &Event::RefusedRange {
            function,
            status: error.code(),
            ipa,
            size,
        },
    );
    sg_reply(Completion::Stopped(error), next)
}

/// DMA_MAP_SG(device, array, count, direction, cookie): maps segments from `cookie` on (at most
/// `dma_sg::SEGMENTS_PER_CALL` and about one work budget of bytes per call), writes each one's
/// handle into its `handle` field, and answers x1 = segments mapped so far (the next index),
/// x2 = the resume cookie when INCOMPLETE. On an error the segments before x1 stay mapped (the
/// caller unmaps them with DMA_UNMAP_SG over the first x1 segments). One IOMMU sync per call at
/// most (for entries widened in place).
///
/// # Errors
/// INVALID_PARAMETER, ALIGNMENT, OUT_OF_RANGE, DENIED, NO_DEVICE before any segment; BUSY when
/// the IOMMU did not confirm (nothing of the call is handed out).
#[allow(clippy::too_many_arguments)]
pub fn map_sg<M, I, S, C>(
    vm: &Vm<M, I, S>,
    cpu: &mut PerCpu<C>,
    device: u64,
    array: u64,
    count: u64,
    direction: u64,
    cookie: u64,
) -> Result<Reply, HypercallError>
where
    M: TableMemory,
    I: Iommu,
    S: AuditSink,
    C: Arch + GuestMemory,
{
    vm.iommu.drain_events(cpu.vcpu, &vm.audit);
    let request = SgRequest::check(array, count, cookie)?;
    // Past the array's own checks a refusal still answers x1 = the cookie (segments mapped by
    // the earlier calls).
    match map_segments(vm, cpu, device, request, direction) {
        Err(error) => Ok(sg_stopped(
            vm,
            cpu.vcpu,
            function::DMA_MAP_SG,
            (error, array, count),
            cookie,
        )),
        done => done,
    }
}

/// DMA_MAP_SG once its array, count and cookie are checked.
fn map_segments<M, I, S, C>(
    vm: &Vm<M, I, S>,
    cpu: &mut PerCpu<C>,
    device: u64,
    request: SgRequest,
    direction: u64,
) -> Result<Reply, HypercallError>
where
    M: TableMemory,
    I: Iommu,
    S: AuditSink,
    C: Arch + GuestMemory,
{
    let SgRequest { array, count, .. } = request;
    let direction = dma::direction(direction).ok_or(HypercallError::InvalidParameter)?;
    let device = dma_device(&vm.iommu, device)?;
    let mut stage2 = vm.stage2.write();
    let stage2 = &mut *stage2;
    stage2.manager.check(array, count * SEGMENT_SIZE)?;
    let mut mappings = vm.mappings.lock();
    let mut held = Held {
        manager: &mut stage2.manager,
        mappings: &mut mappings,
        iommu: &vm.iommu,
    };
    let mut budget = SgBudget::new(attributes::WORK_BUDGET);
    let mut stale_runs = StaleRuns::new();
    let mut done = Vec::new();
    let mut next = request.first;
    let mut stopped = None;
    while next < count && budget.admits() {
        let segment = match read_segment(held.manager, &mut cpu.cpu, &request, next) {
            Ok(segment) => segment,
            Err(error) => {
                stopped = Some((error, array, count));
                break;
            }
        };
        let mapped = match map_buffer(
            &mut held,
            &mut stage2.tables,
            &mut cpu.cpu,
            device,
            segment.addr,
            segment.size,
            direction,
            &mut stale_runs,
        ) {
            Ok(handle) => Mapped::new(handle, segment.addr, segment.size, device, direction),
            Err(error) => {
                stopped = Some((error, segment.addr, segment.size));
                break;
            }
        };
        let written = write_guest(
            held.manager,
            &mut cpu.cpu,
            request.segment_ipa(next) + HANDLE_OFFSET,
            &mapped.handle.to_le_bytes(),
        );
        budget.charge(segment.size);
        done.push(mapped);
        next += 1;
        if let Err(error) = written {
            // The array was checked: not expected. The segment stays mapped and counted.
            stopped = Some((error.into(), array, count));
            break;
        }
    }
    let issued = match vm
        .iommu
        .invalidate_strict(device.stream_id, stale_runs.as_slice())
    {
        Ok(issued) => issued,
        Err(error) => {
            // The IOMMU failed: nothing of this call is handed out. Its pages stay pinned and
            // their rights granted, since the device's view is unknown (I4).
            for mapped in &done {
                if held.mappings.remove(mapped.handle).is_err() {
                    log::error!("DMA: handle {} vanished under the lock", mapped.handle);
                }
            }
            return Err(error.into());
        }
    };
    for (i, mapped) in done.iter().enumerate() {
        let issued = if i == 0 { issued } else { Issued::default() };
        record_map(
            vm,
            cpu.vcpu,
            held.manager,
            device,
            direction,
            mapped,
            issued,
        );
    }
    Ok(match stopped {
        Some(stop) => sg_stopped(vm, cpu.vcpu, function::DMA_MAP_SG, stop, next),
        None if next == count => sg_reply(Completion::Success, next),
        None => sg_reply(Completion::Incomplete, next),
    })
}

/// DMA_UNMAP_SG(array, count, cookie): unmaps the segments' mappings (by the handles
/// DMA_MAP_SG wrote) from `cookie` on, within one call's budget: every device entry of the
/// call is narrowed or removed, then one IOTLB invalidation and sync per device, then each
/// buffer's invalidate and unpin. x1 = segments unmapped so far, x2 = the resume cookie when
/// INCOMPLETE. On an error (a stale handle) the segments before x1 are unmapped.
///
/// # Errors
/// INVALID_PARAMETER, ALIGNMENT, OUT_OF_RANGE, DENIED before any segment; BUSY when the IOMMU
/// did not confirm (the mappings of the call are gone, their pages stay pinned).
pub fn unmap_sg<M, I, S, C>(
    vm: &Vm<M, I, S>,
    cpu: &mut PerCpu<C>,
    array: u64,
    count: u64,
    cookie: u64,
) -> Result<Reply, HypercallError>
where
    M: TableMemory,
    I: Iommu,
    S: AuditSink,
    C: Arch + GuestMemory,
{
    let request = SgRequest::check(array, count, cookie)?;
    match unmap_segments(vm, cpu, request) {
        Err(error) => Ok(sg_stopped(
            vm,
            cpu.vcpu,
            function::DMA_UNMAP_SG,
            (error, array, count),
            cookie,
        )),
        done => done,
    }
}

/// DMA_UNMAP_SG once its array, count and cookie are checked.
fn unmap_segments<M, I, S, C>(
    vm: &Vm<M, I, S>,
    cpu: &mut PerCpu<C>,
    request: SgRequest,
) -> Result<Reply, HypercallError>
where
    M: TableMemory,
    I: Iommu,
    S: AuditSink,
    C: Arch + GuestMemory,
{
    let SgRequest { array, count, .. } = request;
    let mut stage2 = vm.stage2.write();
    stage2.manager.check(array, count * SEGMENT_SIZE)?;
    let mut mappings = vm.mappings.lock();
    let mut held = Held {
        manager: &mut stage2.manager,
        mappings: &mut mappings,
        iommu: &vm.iommu,
    };
    let mut budget = SgBudget::new(attributes::WORK_BUDGET);
    // (device, stale runs) for each device the call names.
    let mut stale_by_device: Vec<(u32, StaleRuns)> = Vec::new();
    let mut unmappings = Vec::new();
    let mut next = request.first;
    let mut stopped = None;
    while next < count && budget.admits() {
        let handle = match read_segment(held.manager, &mut cpu.cpu, &request, next) {
            Ok(segment) => segment.handle,
            Err(error) => {
                stopped = Some((error, array, count));
                break;
            }
        };
        let stream_id = match held.mappings.get(handle) {
            Ok(mapping) => mapping.stream_id,
            Err(error) => {
                stopped = Some((error.into(), handle, 0));
                break;
            }
        };
        let index = match stale_by_device
            .iter()
            .position(|(sid, _)| *sid == stream_id)
        {
            Some(index) => index,
            None => {
                stale_by_device.push((stream_id, StaleRuns::new()));
                stale_by_device.len() - 1
            }
        };
        match revoke(&mut held, handle, &mut stale_by_device[index].1) {
            Ok(unmapping) => {
                budget.charge(unmapping.mapping.size);
                unmappings.push(unmapping);
            }
            Err(error) => {
                stopped = Some((error, handle, 0));
                break;
            }
        }
        next += 1;
    }
    let mut issued = Issued::default();
    for (stream_id, runs) in &stale_by_device {
        issued.add(vm.iommu.invalidate_strict(*stream_id, runs.as_slice())?);
    }
    for unmapping in &unmappings {
        if let Err(error) =
            finish_unmap(vm, cpu.vcpu, held.manager, &mut cpu.cpu, unmapping, issued)
        {
            // Already in that mapping's record; the call reports the first such failure.
            stopped.get_or_insert((error, unmapping.mapping.ipa, unmapping.mapping.size));
        }
    }
    Ok(match stopped {
        Some(stop) => sg_stopped(vm, cpu.vcpu, function::DMA_UNMAP_SG, stop, next),
        None if next == count => sg_reply(Completion::Success, next),
        None => sg_reply(Completion::Incomplete, next),
    })
}
