//! AUDIT_READ and AUDIT_MARK: the guest's view of the audit log.

use super::memory::write_guest;
use super::platform::{AuditSink, GuestMemory, Iommu};
use super::{HypercallError, PerCpu, Reply, Vm};
use crate::audit::{Event, RING_CAPACITY};
use crate::maintenance::Arch;
use crate::pagetable::TableMemory;
use alloc::vec::Vec;
use stagehand_abi::audit::RECORD_SIZE;

/// AUDIT_MARK(tag): a mark record carrying `tag`; x1 = its sequence number.
///
/// # Errors
/// NOT_SUPPORTED when the configuration keeps no records.
pub fn mark<M, I, S: AuditSink>(
    vm: &Vm<M, I, S>,
    vcpu: usize,
    tag: u64,
) -> Result<Reply, HypercallError> {
    let sequence = vm
        .audit
        .record(vcpu, &Event::Mark { tag })
        .ok_or(HypercallError::NotSupported)?;
    Ok(Reply::success([sequence, 0, 0]))
}

/// AUDIT_READ(buffer, size, first): copies whole records from `first` on into the guest buffer
/// `[buffer, buffer + size)`, which must be 8-byte aligned, inside guest RAM and hold at least
/// one record. x1 records copied, x2 next sequence, x3 records dropped so far. Records hold no
/// host physical address (the layout has none), so they are copied as they are. IOMMU faults
/// not yet drained are in the log before the guest reads it.
///
/// # Errors
/// NOT_SUPPORTED (no records kept), INVALID_PARAMETER (size), ALIGNMENT, OUT_OF_RANGE, DENIED.
pub fn read<M, I, S, C>(
    vm: &Vm<M, I, S>,
    cpu: &mut PerCpu<C>,
    buffer: u64,
    size: u64,
    first: u64,
) -> Result<Reply, HypercallError>
where
    M: TableMemory,
    I: Iommu,
    S: AuditSink,
    C: Arch + GuestMemory,
{
    if !vm.audit.enabled() {
        return Err(HypercallError::NotSupported);
    }
    if size == 0 {
        return Err(HypercallError::InvalidParameter);
    }
    if !buffer.is_multiple_of(8) {
        return Err(HypercallError::Alignment);
    }
    if size < RECORD_SIZE as u64 {
        return Err(HypercallError::InvalidParameter);
    }
    vm.stage2.read().manager.check(buffer, size)?;
    vm.iommu.drain_events(cpu.vcpu, &vm.audit);
    let max = (size / RECORD_SIZE as u64).min(RING_CAPACITY as u64) as usize;
    let read = vm.audit.read(cpu.vcpu, first, max);
    let mut bytes = Vec::with_capacity(read.records.len() * RECORD_SIZE);
    for record in &read.records {
        bytes.extend_from_slice(record.bytes());
    }
    // The range was checked above and guest RAM does not move: a failure here is the answer
    // the check would have given.
    let stage2 = vm.stage2.read();
    write_guest(&stage2.manager, &mut cpu.cpu, buffer, &bytes)?;
    Ok(Reply::success([
        read.records.len() as u64,
        read.next_sequence,
        read.dropped,
    ]))
}
