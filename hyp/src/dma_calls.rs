//! The DMA calls: DEV_INFO, DMA_MAP, DMA_UNMAP and DMA_SYNC. A mapped buffer is pinned in the
//! ledger (its attribute cannot change, I4), mapped into a strict device's own stage 2 with
//! the rights its direction allows, and maintained for a non-coherent device as its direction
//! requires. DMA_UNMAP removes the device's access and waits for the SMMU (CMD_SYNC) before
//! the maintenance and the unpin. One audit record per call, refusals included.

use crate::arch::cpu::Cpu;
use crate::arch::mmu::HeapTables;
use crate::smmu::{self, Issued};
use crate::trap::current_vcpu;
use crate::vm::{audit, vm};
use hyp_core::attributes::{Attribute, AttributeManager};
use hyp_core::audit::{Event, Maintenance};
use hyp_core::dma::{self, Mapping, Mappings, Step};
use hyp_core::maintenance::CacheOp;
use hyp_core::pagetable::{MemoryType, PAGE_SIZE};
use hyp_core::window::Window;
use stagehand_abi::{function, Status};

/// The live mappings. Lock order: the attribute manager, then this, then the SMMU.
static MAPPINGS: spin::Mutex<Mappings> = spin::Mutex::new(Mappings::new());

/// x0-x3 of a reply.
type Reply = [u64; 4];

fn reply(status: Status, x1: u64, x2: u64) -> Reply {
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
/// `size`). Returns the lines maintained.
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
            hyp_core::attributes::Requester::Dma,
        )?;
        done += progress.done;
    }
    Ok(size.div_ceil(vm().dcache_line))
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
    if size == 0 || size > dma::MAX_MAPPING_BYTES {
        return refuse(Status::InvalidParameter);
    }
    if !ipa.is_multiple_of(PAGE_SIZE) || !size.is_multiple_of(PAGE_SIZE) {
        return refuse(Status::Alignment);
    }
    let Some(device) = u32::try_from(device).ok().and_then(smmu::dma_device) else {
        return refuse(Status::NoDevice);
    };
    let vm = vm();
    let mut manager = vm.attributes.write();
    let mut mappings = MAPPINGS.lock();
    // Pinning splits the blocks the buffer touches, so that no attribute change elsewhere in
    // them ever breaks the translation a device uses (shared mode walks the CPU's stage 2).
    if let Err(error) = manager.pin(&mut HeapTables, &mut Cpu::new(), ipa, size) {
        return refuse(error);
    }
    // The runs of one attribute: a strict device gets each with that attribute in its own
    // stage 2 too (no cacheable device alias of a non-cacheable page, I1), and each gets its
    // own record.
    let runs = manager.attribute_runs(ipa, size);
    if device.strict {
        if mappings.overlaps(device.stream_id, ipa, size) {
            manager.unpin(ipa, size);
            return refuse(Status::Busy);
        }
        for &(at, bytes, run_attribute) in &runs {
            let memory = match run_attribute {
                Attribute::WriteBack => MemoryType::NormalWriteBack,
                Attribute::NonCacheable => MemoryType::NormalNonCacheable,
            };
            let pa = vm.ram.pa_of(at, bytes).unwrap_or_default();
            if let Err(error) = smmu::map_strict(
                device.stream_id,
                at,
                pa,
                bytes,
                dma::device_permissions(direction),
                memory,
            ) {
                if at > ipa {
                    let _ = smmu::unmap_strict(device.stream_id, ipa, at - ipa);
                }
                manager.unpin(ipa, size);
                return refuse(error);
            }
        }
    }
    let handle = match mappings.insert(Mapping {
        stream_id: device.stream_id,
        ipa,
        size,
        direction,
    }) {
        Ok(handle) => handle,
        Err(error) => {
            if device.strict {
                let _ = smmu::unmap_strict(device.stream_id, ipa, size);
            }
            manager.unpin(ipa, size);
            return refuse(error);
        }
    };
    let op = if device.coherent {
        None
    } else {
        dma::maintenance(direction, Step::Map)
    };
    if let Some(op) = op {
        let mut window = vm.windows[current_vcpu()].lock();
        if let Err(error) = maintain(&manager, &mut window, op, ipa, size) {
            // Not expected (the pin checked the range): undo the mapping rather than hand
            // the device a buffer that was not maintained.
            let _ = mappings.remove(handle);
            if device.strict {
                let _ = smmu::unmap_strict(device.stream_id, ipa, size);
            }
            manager.unpin(ipa, size);
            return refuse(error);
        }
    }
    // One record per run in strict mode (each with the attribute the device's mapping of it
    // has); one for the whole buffer when the device shares the guest's stage 2.
    let whole = [(ipa, size, Attribute::WriteBack)];
    let records = if device.strict { &runs[..] } else { &whole[..] };
    for &(at, bytes, run_attribute) in records {
        audit(
            current_vcpu(),
            Event::DmaMap {
                stream_id: device.stream_id,
                ipa: at,
                size: bytes,
                direction,
                handle,
                attribute: device.strict.then_some(run_attribute),
                maintenance: Maintenance {
                    cmo: op,
                    cmo_lines: if op.is_some() {
                        bytes.div_ceil(vm.dcache_line)
                    } else {
                        0
                    },
                    ..Maintenance::default()
                },
                status: 0,
            },
        );
    }
    reply(Status::Success, ipa, handle)
}

/// DMA_UNMAP(handle).
pub fn unmap(handle: u64) -> Reply {
    let vm = vm();
    let mut manager = vm.attributes.write();
    let mut mappings = MAPPINGS.lock();
    let mapping = match mappings.get(handle) {
        Ok(mapping) => mapping,
        Err(error) => return refused(function::DMA_UNMAP, error, handle, 0),
    };
    let Some(device) = smmu::dma_device(mapping.stream_id) else {
        return refused(function::DMA_UNMAP, Status::NoDevice, handle, 0);
    };
    let mut maintenance = Maintenance::default();
    // 1. The device loses access, and the SMMU confirms it (CMD_SYNC).
    if device.strict {
        match smmu::unmap_strict(device.stream_id, mapping.ipa, mapping.size) {
            Ok(Issued { count, kinds }) => {
                maintenance.smmu_commands = count;
                maintenance.smmu_kinds = kinds;
            }
            Err(error) => return refused(function::DMA_UNMAP, error, handle, 0),
        }
    }
    let _ = mappings.remove(handle);
    // 2. Lines the CPU may hold must not hide what the device wrote.
    if !device.coherent {
        if let Some(op) = dma::maintenance(mapping.direction, Step::Unmap) {
            let mut window = vm.windows[current_vcpu()].lock();
            maintenance.cmo = Some(op);
            maintenance.cmo_lines =
                maintain(&manager, &mut window, op, mapping.ipa, mapping.size).unwrap_or(0);
        }
    }
    // 3. The pages may change attribute again.
    manager.unpin(mapping.ipa, mapping.size);
    audit(
        current_vcpu(),
        Event::DmaUnmap {
            stream_id: mapping.stream_id,
            handle,
            ipa: mapping.ipa,
            size: mapping.size,
            direction: mapping.direction,
            maintenance,
            status: 0,
        },
    );
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
    let Some(end) = offset.checked_add(size).filter(|&end| end <= mapping.size) else {
        return refused(function::DMA_SYNC, Status::OutOfRange, mapping.ipa, size);
    };
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
        Some(op) if !coherent && !manager.all_non_cacheable(ipa, end - offset) => {
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
