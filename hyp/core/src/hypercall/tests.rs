//! Every handler end to end on the host: the dispatcher over a VM whose stage 2 lives in
//! vector-backed table memory, a recording CPU that models guest RAM, a recording IOMMU and an
//! audit sink over a real log. Each bad-input row of the specification (section 7) gets its own
//! status and exactly one record and changes nothing; each rollback path leaves the state it
//! promises.

use super::fake::{FakeAudit, FakeCpu, FakeIommu, IommuOp};
use super::platform::IommuError;
use super::*;
use crate::address::{Ipa, Pa};
use crate::alias::AliasPlace;
use crate::audit::{DmaDirection, Event};
use crate::config::DmaMode;
use crate::maintenance::{CacheOp, Op, TableWrite};
use crate::pagetable::fake::VecMemory;
use crate::pagetable::{MemoryType, Permissions};
use alloc::vec;
use stagehand_abi::{cache_op, function, Status};

const RAM: GuestRam = GuestRam {
    ipa: 0x4000_0000,
    pa: 0x1_0000_0000,
    size: 8 << 20,
};
const RAM_END: u64 = 0x4080_0000;
const UART: u64 = 0x0900_0000;
/// EL2 VA of IPA 0 in the hypervisor's alias of guest RAM.
const ALIAS_VA: u64 = 0x7f00_0000_0000;
/// StreamIDs of the fake devices.
const STRICT_NC: u32 = 0x10;
const SHARED: u32 = 0x18;
const BLOCKED: u32 = 0x20;
const STRICT_COHERENT: u32 = 0x28;

struct Harness {
    vm: Vm<VecMemory, FakeIommu, FakeAudit>,
    cpu: FakeCpu,
}

fn harness() -> Harness {
    harness_with(|_| {})
}

fn harness_with(adjust: impl FnOnce(&mut VecMemory)) -> Harness {
    let mut tables = VecMemory::new(64);
    let geometry = crate::geometry::Geometry::for_cpu(4).unwrap();
    let alias = AliasPlace {
        va: ALIAS_VA,
        table: tables.allocate().unwrap(),
    };
    let mut manager = AttributeManager::new(&mut tables, true, RAM, &geometry, alias).unwrap();
    manager.map_mmio(&mut tables, UART, 0x1000).unwrap();
    adjust(&mut tables);
    let iommu = FakeIommu::with(&[
        (STRICT_NC, DmaMode::Strict, false),
        (SHARED, DmaMode::Shared, true),
        (BLOCKED, DmaMode::Blocked, true),
        (STRICT_COHERENT, DmaMode::Strict, true),
    ]);
    let vm = Vm::new(
        GuestStage2 { manager, tables },
        PowerStates::new(vec![0, 1, 2, 3], 0),
        64,
        4,
        iommu,
        FakeAudit::default(),
    );
    Harness {
        vm,
        cpu: FakeCpu::default(),
    }
}

impl Harness {
    /// Makes the call `function(args...)` on vCPU 0.
    /// Makes the call `function(args...)` on vCPU 0; returns x0-x6 after it.
    fn call(&mut self, function: u32, args: &[u64]) -> (Action, [u64; 7]) {
        // Registers the call does not answer in keep what the guest had (x4-x6 here).
        let mut x = [function as u64, 0, 0, 0, 0xa4, 0xa5, 0xa6];
        x[1..1 + args.len()].copy_from_slice(args);
        let mut cpu = PerCpu {
            vcpu: 0,
            cpu: core::mem::take(&mut self.cpu),
        };
        let action = dispatch(&self.vm, &mut cpu, &mut x);
        self.cpu = cpu.cpu;
        (action, x)
    }

    /// x0-x3 of a call that returns.
    fn regs(&mut self, function: u32, args: &[u64]) -> [u64; 4] {
        match self.call(function, args) {
            (Action::Return, x) => {
                // x4-x6 that were no argument are preserved.
                for (i, value) in x.iter().enumerate().skip((1 + args.len()).max(4)) {
                    assert_eq!(*value, 0xa0 + i as u64, "x{i} of {function:#x}");
                }
                [x[0], x[1], x[2], x[3]]
            }
            other => panic!("{function:#x} did not return: {other:?}"),
        }
    }

    fn pins(&mut self, ipa: u64) -> u64 {
        let regs = self.regs(function::MEM_GET_ATTR, &[ipa]);
        assert_eq!(regs[0], 0);
        regs[3]
    }

    fn attribute(&mut self, ipa: u64) -> u64 {
        self.regs(function::MEM_GET_ATTR, &[ipa])[1]
    }

    fn events(&self) -> Vec<Event> {
        self.vm.audit.take()
    }

    /// DMA_MAP that must succeed; returns the handle.
    fn map(&mut self, device: u32, ipa: u64, size: u64, direction: u64) -> u64 {
        let regs = self.regs(function::DMA_MAP, &[device as u64, ipa, size, direction]);
        assert_eq!(regs[0], 0, "DMA_MAP {ipa:#x}+{size:#x}: {}", regs[0] as i64);
        assert_eq!(regs[1], ipa);
        regs[2]
    }

    fn pa(ipa: u64) -> u64 {
        RAM.pa + (ipa - RAM.ipa)
    }
}

fn code(status: Status) -> u64 {
    status.code() as u64
}

/// Specification section 7: every bad input gets its own status and exactly one record (which
/// names the call and the range it was given), and nothing changes: no table write, no cache
/// operation, no IOMMU command.
#[test]
fn every_bad_input_gets_its_status_and_one_record_and_changes_nothing() {
    use Status::*;
    let f = function::MEM_SET_ATTR;
    let rows: &[(&str, u32, &[u64], Status)] = &[
        (
            "unknown attribute",
            f,
            &[RAM.ipa, 4096, 2],
            InvalidParameter,
        ),
        ("zero size", f, &[RAM.ipa, 0, 1], InvalidParameter),
        ("misaligned", f, &[RAM.ipa + 0x10, 4096, 1], Alignment),
        ("wrapping", f, &[u64::MAX - 0xfff, 0x2000, 1], OutOfRange),
        (
            "across the end of RAM",
            f,
            &[RAM_END - 4096, 8192, 1],
            OutOfRange,
        ),
        (
            "below RAM (the hypervisor's)",
            f,
            &[RAM.ipa - 0x1000, 4096, 1],
            OutOfRange,
        ),
        ("MMIO", f, &[UART, 4096, 1], Denied),
        (
            "get: outside RAM",
            function::MEM_GET_ATTR,
            &[RAM_END],
            OutOfRange,
        ),
        ("get: MMIO", function::MEM_GET_ATTR, &[UART], Denied),
        (
            "query: access 2",
            function::MEM_QUERY_VA,
            &[RAM.ipa, 2],
            InvalidParameter,
        ),
        (
            "query: outside RAM",
            function::MEM_QUERY_VA,
            &[RAM_END, 0],
            OutOfRange,
        ),
        ("query: MMIO", function::MEM_QUERY_VA, &[UART, 0], Denied),
        (
            "cmo: op 0",
            function::CACHE_OP,
            &[RAM.ipa, 64, 0],
            InvalidParameter,
        ),
        (
            "cmo: op 4",
            function::CACHE_OP,
            &[RAM.ipa, 64, 4],
            InvalidParameter,
        ),
        (
            "cmo: unknown flag",
            function::CACHE_OP,
            &[RAM.ipa, 64, 0x201],
            InvalidParameter,
        ),
        (
            "cmo: zero size",
            function::CACHE_OP,
            &[RAM.ipa, 0, 1],
            InvalidParameter,
        ),
        (
            "cmo: wrapping",
            function::CACHE_OP,
            &[u64::MAX - 63, 128, 1],
            OutOfRange,
        ),
        (
            "cmo: across the end",
            function::CACHE_OP,
            &[RAM_END - 64, 128, 1],
            OutOfRange,
        ),
        ("cmo: MMIO", function::CACHE_OP, &[UART, 64, 3], Denied),
        (
            "batch: zero count",
            function::CACHE_OP_BATCH,
            &[RAM.ipa, 0, 0],
            InvalidParameter,
        ),
        (
            "batch: misaligned",
            function::CACHE_OP_BATCH,
            &[RAM.ipa + 4, 1, 0],
            Alignment,
        ),
        (
            "batch: outside RAM",
            function::CACHE_OP_BATCH,
            &[RAM_END, 1, 0],
            OutOfRange,
        ),
        (
            "batch: MMIO",
            function::CACHE_OP_BATCH,
            &[UART, 1, 0],
            Denied,
        ),
        (
            "batch: cookie past the end",
            function::CACHE_OP_BATCH,
            &[RAM.ipa, 1, 1 << 40],
            InvalidParameter,
        ),
        (
            "batch: too many",
            function::CACHE_OP_BATCH,
            &[RAM.ipa, (1 << 24) + 1, 0],
            InvalidParameter,
        ),
        (
            "dev_info: past the last",
            function::DEV_INFO,
            &[4],
            NoDevice,
        ),
        (
            "map: unknown device",
            function::DMA_MAP,
            &[0x99, RAM.ipa, 4096, 0],
            NoDevice,
        ),
        (
            "map: blocked device",
            function::DMA_MAP,
            &[BLOCKED as u64, RAM.ipa, 4096, 0],
            NoDevice,
        ),
        (
            "map: device id beyond 32 bits",
            function::DMA_MAP,
            &[1 << 32 | STRICT_NC as u64, RAM.ipa, 4096, 0],
            NoDevice,
        ),
        (
            "map: direction 3",
            function::DMA_MAP,
            &[STRICT_NC as u64, RAM.ipa, 4096, 3],
            InvalidParameter,
        ),
        (
            "map: zero size",
            function::DMA_MAP,
            &[STRICT_NC as u64, RAM.ipa, 0, 0],
            InvalidParameter,
        ),
        (
            "map: above 16 MiB",
            function::DMA_MAP,
            &[STRICT_NC as u64, RAM.ipa, (16 << 20) + 1, 0],
            InvalidParameter,
        ),
        (
            "map: wrapping",
            function::DMA_MAP,
            &[STRICT_NC as u64, u64::MAX - 0xfff, 0x2000, 0],
            OutOfRange,
        ),
        (
            "map: across the end",
            function::DMA_MAP,
            &[STRICT_NC as u64, RAM_END - 4096, 8192, 0],
            OutOfRange,
        ),
        (
            "map: below RAM",
            function::DMA_MAP,
            &[STRICT_NC as u64, RAM.ipa - 4096, 4096, 0],
            OutOfRange,
        ),
        (
            "map: MMIO",
            function::DMA_MAP,
            &[SHARED as u64, UART, 4096, 0],
            Denied,
        ),
        (
            "unmap: stale handle",
            function::DMA_UNMAP,
            &[12345],
            BadHandle,
        ),
        (
            "sync: stale handle",
            function::DMA_SYNC,
            &[12345, 0, 64, 0],
            BadHandle,
        ),
        (
            "map_sg: zero count",
            function::DMA_MAP_SG,
            &[STRICT_NC as u64, RAM.ipa, 0, 0, 0],
            InvalidParameter,
        ),
        (
            "map_sg: misaligned array",
            function::DMA_MAP_SG,
            &[STRICT_NC as u64, RAM.ipa + 4, 1, 0, 0],
            Alignment,
        ),
        (
            "unmap_sg: cookie past the end",
            function::DMA_UNMAP_SG,
            &[RAM.ipa, 1, 1],
            InvalidParameter,
        ),
        (
            "audit_read: zero size",
            function::AUDIT_READ,
            &[RAM.ipa, 0, 0],
            InvalidParameter,
        ),
        (
            "audit_read: misaligned",
            function::AUDIT_READ,
            &[RAM.ipa + 4, 4096, 0],
            Alignment,
        ),
        (
            "audit_read: smaller than a record",
            function::AUDIT_READ,
            &[RAM.ipa, 64, 0],
            InvalidParameter,
        ),
        (
            "audit_read: outside RAM",
            function::AUDIT_READ,
            &[RAM_END - 64, 4096, 0],
            OutOfRange,
        ),
        (
            "audit_read: MMIO",
            function::AUDIT_READ,
            &[UART, 4096, 0],
            Denied,
        ),
    ];
    for &(name, function, args, status) in rows {
        let mut h = harness();
        let regs = h.regs(function, args);
        assert_eq!(regs, [code(status), 0, 0, 0], "{name}");
        let subject = match function {
            function::MEM_GET_ATTR => (args[0], 1),
            function::MEM_QUERY_VA | function::DEV_INFO | function::DMA_UNMAP => (args[0], 0),
            function::DMA_MAP => (args[1], args[2]),
            function::DMA_MAP_SG => (args[1], args[2]),
            function::DMA_SYNC => (args[0], 0),
            _ => (args[0], args[1]),
        };
        assert_eq!(
            h.events(),
            vec![Event::RefusedRange {
                function,
                status: status.code(),
                ipa: subject.0,
                size: subject.1,
            }],
            "{name}"
        );
        assert!(
            h.cpu.ops().iter().all(|op| !matches!(
                op,
                Op::Dc(..) | Op::Write(TableWrite::Break { .. } | TableWrite::Make { .. })
            )),
            "{name}: {:?}",
            h.cpu.ops()
        );
        assert_eq!(h.vm.iommu.take(), vec![], "{name}");
        assert!(h.vm.mappings.lock().is_empty(), "{name}");
    }
}

#[test]
fn unknown_calls_and_conduits_are_refused_and_audited() {
    let mut h = harness();
    assert_eq!(
        h.regs(0xC600_00FF, &[1, 2, 3]),
        [code(Status::NotSupported), 0, 0, 0]
    );
    assert_eq!(
        h.events(),
        vec![Event::Refused {
            function: 0xC600_00FF,
            status: Status::NotSupported.code(),
        }]
    );
    assert_eq!(
        refuse_conduit(&h.vm, 0, function::REVISION as u64),
        code(Status::NotSupported)
    );
    assert_eq!(h.events().len(), 1);
    // With the log off, AUDIT_MARK is not supported (and nothing can record it).
    h.vm.audit = FakeAudit {
        enabled: false,
        ..FakeAudit::default()
    };
    assert_eq!(
        h.regs(function::AUDIT_MARK, &[7])[0],
        code(Status::NotSupported)
    );
    assert_eq!(
        h.regs(function::AUDIT_READ, &[RAM.ipa, 4096, 0])[0],
        code(Status::NotSupported)
    );
}

#[test]
fn features_and_discovery() {
    let mut h = harness();
    let regs = h.regs(function::FEATURES, &[]);
    assert_eq!(regs[0], 0);
    assert_eq!(
        regs[1],
        stagehand_abi::feature::VA_ADDRESSING
            | stagehand_abi::feature::SMMU
            | stagehand_abi::feature::FWB
    );
    assert_eq!((regs[2], regs[3]), (64, crate::attributes::WORK_BUDGET));
    assert_eq!(
        h.regs(function::DEV_INFO, &[0]),
        [0, STRICT_NC as u64, STRICT_NC as u64, 0b10]
    );
    assert_eq!(
        h.regs(function::DEV_INFO, &[1]),
        [0, SHARED as u64, SHARED as u64, 0b01]
    );
    assert_eq!(
        h.regs(function::REVISION, &[]),
        [stagehand_abi::ABI_MAJOR, stagehand_abi::ABI_MINOR, 0, 0]
    );
    assert!(h.events().is_empty());
}

#[test]
fn set_attribute_breaks_invalidates_the_shared_devices_and_audits_each_run() {
    let mut h = harness();
    let ipa = RAM.ipa + 0x3000;
    assert_eq!(
        h.regs(function::MEM_SET_ATTR, &[ipa, 0x2000, 1]),
        [0, 0x2000, 0, 0]
    );
    assert_eq!(h.attribute(ipa), 1);
    assert_eq!(h.attribute(ipa + 0x2000), 0);
    // The device TLB invalidation of the break reaches the IOMMU through the handler's
    // composition, not through an up-call from the CPU layer.
    let device_tlbis: Vec<_> = h
        .cpu
        .ops()
        .iter()
        .filter(|op| matches!(op, Op::DeviceTlbi(..)))
        .collect();
    assert!(!device_tlbis.is_empty());
    let shared: Vec<_> =
        h.vm.iommu
            .take()
            .into_iter()
            .filter(|op| matches!(op, IommuOp::InvalidateShared(..)))
            .collect();
    assert_eq!(shared.len(), device_tlbis.len());
    assert!(shared
        .iter()
        .any(|op| matches!(op, IommuOp::InvalidateShared(at, size)
        if at.get() <= ipa && ipa + 0x2000 <= at.get() + size)));
    let events = h.events();
    assert!(matches!(
        events[..],
        [Event::AttributeChange {
            ipa: 0x4000_3000,
            size: 0x2000,
            status: 0,
            ..
        }]
    ));
    // Half of the range was NC already: one record per run of old attribute.
    assert_eq!(
        h.regs(function::MEM_SET_ATTR, &[ipa + 0x1000, 0x2000, 1])[0],
        0
    );
    let events = h.events();
    assert_eq!(events.len(), 2);
}

#[test]
fn a_pinned_page_answers_busy_and_stays_as_it_was() {
    let mut h = harness();
    let handle = h.map(SHARED, RAM.ipa + 0x1000, 100, 0);
    h.events();
    assert_eq!(h.pins(RAM.ipa + 0x1000), 1);
    assert_eq!(
        h.regs(function::MEM_SET_ATTR, &[RAM.ipa, 0x4000, 1])[0],
        code(Status::Busy)
    );
    assert_eq!(h.attribute(RAM.ipa), 0);
    assert!(matches!(
        h.events()[..],
        [Event::RefusedRange {
            function: function::MEM_SET_ATTR,
            status: -7,
            ..
        }]
    ));
    assert_eq!(h.regs(function::DMA_UNMAP, &[handle])[0], 0);
    assert_eq!(h.pins(RAM.ipa + 0x1000), 0);
    assert_eq!(
        h.regs(function::DMA_UNMAP, &[handle])[0],
        code(Status::BadHandle)
    );
}

#[test]
fn strict_map_writes_typed_rights_cleans_and_unmap_syncs_before_the_invalidate() {
    let mut h = harness();
    let ipa = RAM.ipa + 0x1_0040;
    let handle = h.map(STRICT_NC, ipa, 0x1000, 1); // TO_DEVICE
                                                   // The pin split the 2 MiB block (a break a shared device must see), then the rights.
    let ops = h.vm.iommu.take();
    assert_eq!(
        ops[0],
        IommuOp::InvalidateShared(Ipa::new(RAM.ipa), 2 << 20)
    );
    let ops = ops[1..].to_vec();
    assert_eq!(
        ops,
        vec![IommuOp::Rights(
            STRICT_NC,
            vec![platform::RightsUpdate {
                ipa: Ipa::new(RAM.ipa + 0x1_0000),
                pa: Pa::new(Harness::pa(RAM.ipa + 0x1_0000)),
                size: 0x2000,
                before: None,
                after: Some(Permissions::RO),
                memory: MemoryType::NormalWriteBack,
            }]
        )]
    );
    // TO_DEVICE on a non-coherent device cleans exactly the buffer's lines.
    assert!(h.cpu.ops().contains(&Op::Dc(
        CacheOp::Clean,
        ALIAS_VA + RAM.ipa + 0x1_0040,
        0x1000
    )));
    assert!(matches!(
        h.events()[..],
        [Event::DmaMap {
            stream_id: STRICT_NC,
            direction: DmaDirection::ToDevice,
            status: 0,
            ..
        }]
    ));
    assert_eq!(h.pins(ipa), 1);
    h.cpu = FakeCpu::default();
    assert_eq!(h.regs(function::DMA_UNMAP, &[handle])[0], 0);
    let ops = h.vm.iommu.take();
    assert!(
        matches!(&ops[..], [IommuOp::Rights(_, u), IommuOp::InvalidateStrict(STRICT_NC, runs)]
        if u[0].after.is_none() && runs == &vec![(Ipa::new(RAM.ipa + 0x1_0000), 0x2000)])
    );
    // TO_DEVICE needs no invalidate at unmap.
    assert!(!h.cpu.ops().iter().any(|op| matches!(op, Op::Dc(..))));
    assert_eq!(h.pins(ipa), 0);
}

#[test]
fn from_device_unmap_invalidates_after_the_device_lost_access() {
    let mut h = harness();
    let ipa = RAM.ipa + 0x2_0000;
    let handle = h.map(STRICT_NC, ipa, 0x1000, 2); // FROM_DEVICE
    h.vm.iommu.take();
    h.cpu = FakeCpu::default();
    assert_eq!(h.regs(function::DMA_UNMAP, &[handle])[0], 0);
    assert!(h.cpu.ops().contains(&Op::Dc(
        CacheOp::Invalidate,
        ALIAS_VA + RAM.ipa + 0x2_0000,
        0x1000
    )));
    let events = h.events();
    assert!(matches!(
        events[1..],
        [Event::DmaUnmap {
            status: 0,
            maintenance: crate::audit::Maintenance {
                cmo: Some(CacheOp::Invalidate),
                cmo_lines: 64,
                ..
            },
            ..
        }]
    ));
}

#[test]
fn a_failed_rights_write_is_undone_completely() {
    let mut h = harness();
    h.vm.iommu.fail_rights.set(Some((1, IommuError::NoMemory)));
    let regs = h.regs(
        function::DMA_MAP,
        &[STRICT_NC as u64, RAM.ipa + 0x5000, 0x1000, 0],
    );
    assert_eq!(regs[0], code(Status::NoMemory));
    assert_eq!(h.pins(RAM.ipa + 0x5000), 0);
    assert!(h.vm.mappings.lock().is_empty());
    assert_eq!(
        h.vm.mappings.lock().rights(STRICT_NC, RAM.ipa + 0x5000),
        None
    );
    assert_eq!(h.events().len(), 1);
    // Nothing is left behind: the next map grants from nothing.
    h.map(STRICT_NC, RAM.ipa + 0x5000, 0x1000, 0);
    assert!(matches!(&h.vm.iommu.take()[..], [.., IommuOp::Rights(_, u)] if u[0].before.is_none()));
}

#[test]
fn a_failed_undo_keeps_the_pages_pinned() {
    let mut h = harness();
    // The write fails, and so does the write that would undo it.
    h.vm.iommu
        .fail_rights
        .set(Some((2, IommuError::NotConfirmed)));
    let regs = h.regs(
        function::DMA_MAP,
        &[STRICT_NC as u64, RAM.ipa + 0x5000, 0x1000, 0],
    );
    assert_eq!(regs[0], code(Status::Busy));
    // The device's view is unknown: the page cannot change attribute or leave (I4).
    assert_eq!(h.pins(RAM.ipa + 0x5000), 1);
    assert!(h.vm.mappings.lock().is_empty());
}

#[test]
fn a_pin_that_cannot_split_takes_back_the_rights() {
    // No table memory left for the split of the 2 MiB block.
    let mut h = harness_with(|tables| tables.limit = tables.tables.len());
    let regs = h.regs(
        function::DMA_MAP,
        &[STRICT_NC as u64, RAM.ipa + 0x5000, 0x1000, 0],
    );
    assert_eq!(regs[0], code(Status::NoMemory));
    assert_eq!(
        h.vm.mappings.lock().rights(STRICT_NC, RAM.ipa + 0x5000),
        None
    );
    assert_eq!(h.vm.iommu.take(), vec![]);
    assert_eq!(h.pins(RAM.ipa + 0x5000), 0);
}

#[test]
fn the_quota_refuses_before_anything_changes() {
    let mut h = harness();
    for i in 0..4 {
        h.map(SHARED, RAM.ipa + i * 0x1000, 64, 0);
    }
    h.events();
    let regs = h.regs(function::DMA_MAP, &[SHARED as u64, RAM.ipa + 0x8000, 64, 0]);
    assert_eq!(regs[0], code(Status::NoMemory));
    assert_eq!(h.pins(RAM.ipa + 0x8000), 0);
    assert_eq!(h.events().len(), 1);
}

#[test]
fn an_unconfirmed_widening_is_not_handed_out_and_stays_pinned() {
    let mut h = harness();
    let page = RAM.ipa + 0x6000;
    h.map(STRICT_COHERENT, page, 64, 1); // read-only
    h.vm.iommu.take();
    h.vm.iommu.fail_invalidate.set(true);
    // A write mapping of the same page widens the live entry in place: needs an IOTLB sync.
    let regs = h.regs(
        function::DMA_MAP,
        &[STRICT_COHERENT as u64, page + 64, 64, 2],
    );
    assert_eq!(regs[0], code(Status::Busy));
    assert_eq!(h.vm.mappings.lock().len(), 1);
    assert_eq!(h.pins(page), 2);
    assert_eq!(
        h.vm.mappings.lock().rights(STRICT_COHERENT, page),
        Some(Permissions::RW)
    );
}

#[test]
fn an_unconfirmed_unmap_loses_the_handle_and_keeps_the_pin() {
    let mut h = harness();
    let handle = h.map(STRICT_COHERENT, RAM.ipa, 0x1000, 0);
    h.vm.iommu.fail_invalidate.set(true);
    assert_eq!(
        h.regs(function::DMA_UNMAP, &[handle])[0],
        code(Status::Busy)
    );
    assert_eq!(h.pins(RAM.ipa), 1);
    h.vm.iommu.fail_invalidate.set(false);
    assert_eq!(
        h.regs(function::DMA_UNMAP, &[handle])[0],
        code(Status::BadHandle)
    );
}

#[test]
fn sync_answers_by_coherence_attribute_and_range() {
    let mut h = harness();
    let nc = h.map(STRICT_NC, RAM.ipa + 0x1000, 0x1000, 0);
    let coherent = h.map(STRICT_COHERENT, RAM.ipa + 0x3000, 0x1000, 0);
    h.events();
    assert_eq!(h.regs(function::DMA_SYNC, &[nc, 0, 64, 1]), [0; 4]);
    assert_eq!(
        h.regs(function::DMA_SYNC, &[coherent, 0, 64, 1])[0],
        code(Status::NotRequired)
    );
    for (args, status) in [
        ([nc, 0, 64, 2], Status::InvalidParameter),
        ([nc, 0, 0, 0], Status::InvalidParameter),
        ([nc, 0x800, 0x801, 0], Status::OutOfRange),
        ([nc, u64::MAX, 2, 0], Status::OutOfRange),
    ] {
        assert_eq!(
            h.regs(function::DMA_SYNC, &args)[0],
            code(status),
            "{args:?}"
        );
    }
    let events = h.events();
    assert_eq!(events.len(), 6);
    assert!(matches!(events[1], Event::DmaSync { status: -2, .. }));
    // A refusal past the handle names the buffer.
    assert!(matches!(
        events[5],
        Event::RefusedRange {
            function: function::DMA_SYNC,
            status: -5,
            ipa: 0x4000_1000,
            size: 2
        }
    ));
}

#[test]
fn scatter_gather_stops_at_a_bad_segment_and_reports_what_is_mapped() {
    let mut h = harness();
    let array = RAM.ipa + 0x10_0000;
    let segments = [
        (RAM.ipa + 0x1000, 0x100),
        (RAM.ipa + 0x2000, 0x100),
        (UART, 0x100), // MMIO
        (RAM.ipa + 0x4000, 0x100),
    ];
    for (i, (addr, size)) in segments.iter().enumerate() {
        let at = Harness::pa(array) + i as u64 * 24;
        h.cpu.poke(at, &addr.to_le_bytes());
        h.cpu.poke(at + 8, &(*size as u64).to_le_bytes());
    }
    let regs = h.regs(function::DMA_MAP_SG, &[STRICT_NC as u64, array, 4, 0, 0]);
    assert_eq!(regs, [code(Status::Denied), 2, 0, 0]);
    // The handles of the mapped segments were written back; the others are untouched.
    let handle = |h: &Harness, i: u64| {
        u64::from_le_bytes(
            h.cpu
                .peek(Harness::pa(array) + i * 24 + 16, 8)
                .try_into()
                .unwrap(),
        )
    };
    assert_ne!(handle(&h, 0), 0);
    assert_ne!(handle(&h, 1), 0);
    assert_eq!(handle(&h, 2), 0);
    let events = h.events();
    assert_eq!(events.len(), 3);
    assert!(matches!(
        events[2],
        Event::RefusedRange {
            function: function::DMA_MAP_SG,
            status: -6,
            ipa: UART,
            size: 0x100
        }
    ));
    // Unmapping the first two undoes them.
    assert_eq!(h.regs(function::DMA_UNMAP_SG, &[array, 2, 0]), [0, 2, 0, 0]);
    assert_eq!(h.pins(RAM.ipa + 0x1000), 0);
    assert!(h.vm.mappings.lock().is_empty());
    // A refusal after the array's checks answers the cookie in x1.
    assert_eq!(
        h.regs(function::DMA_MAP_SG, &[0x99, array, 4, 0, 3]),
        [code(Status::NoDevice), 3, 0, 0]
    );
}

#[test]
fn cache_op_by_va_records_each_ipa_run_and_reports_progress_before_a_fault() {
    let mut h = harness();
    // Two VA pages onto two IPA pages that are not adjacent; the third VA page is unmapped.
    let va = 0x1_0000_0000u64;
    let mut stage1 = alloc::collections::BTreeMap::new();
    stage1.insert(va, RAM.ipa + 0x5000);
    stage1.insert(va + 0x1000, RAM.ipa + 0x9000);
    h.cpu.stage1 = Some(stage1);
    let op = cache_op::CLEAN | cache_op::FLAG_VA;
    assert_eq!(
        h.regs(function::CACHE_OP, &[va + 0x800, 0x1000, op]),
        [0, 0x1000, 0, 0]
    );
    let events = h.events();
    assert!(matches!(
        events[..],
        [
            Event::Cmo {
                address: 0x4000_5800,
                size: 0x800,
                va: Some(_),
                ..
            },
            Event::Cmo {
                address: 0x4000_9000,
                size: 0x800,
                va: Some(_),
                ..
            },
        ]
    ));
    // Into the unmapped page: the part done is reported, with the error.
    assert_eq!(
        h.regs(function::CACHE_OP, &[va + 0x1800, 0x1000, op]),
        [code(Status::InvalidParameter), 0x800, 0, 0]
    );
    assert!(matches!(
        h.events()[..],
        [Event::Cmo {
            status: -3,
            size: 0x800,
            ..
        }]
    ));
    // Nothing done at all: a refusal.
    assert_eq!(
        h.regs(function::CACHE_OP, &[va + 0x2000, 64, op])[0],
        code(Status::InvalidParameter)
    );
    assert!(matches!(h.events()[..], [Event::RefusedRange { .. }]));
}

#[test]
fn batch_entries_are_read_through_the_abi_layout() {
    let mut h = harness();
    let array = RAM.ipa + 0x20_0000;
    let entries = [
        stagehand_abi::driver::BatchEntry {
            address: RAM.ipa,
            size: 128,
            op: cache_op::CLEAN as u32,
            reserved: 0,
        },
        stagehand_abi::driver::BatchEntry {
            address: RAM.ipa + 0x1000,
            size: 64,
            op: cache_op::CLEAN_INVALIDATE as u32,
            reserved: 1, // must be zero
        },
    ];
    for (i, entry) in entries.iter().enumerate() {
        h.cpu.poke(
            Harness::pa(array) + i as u64 * 24,
            zerocopy::IntoBytes::as_bytes(entry),
        );
    }
    assert_eq!(
        h.regs(function::CACHE_OP_BATCH, &[array, 1, 0]),
        [0, 1, 0, 0]
    );
    // The bad second entry stops the batch after the first.
    assert_eq!(
        h.regs(function::CACHE_OP_BATCH, &[array, 2, 0]),
        [code(Status::InvalidParameter), 1, 1 << 40, 0]
    );
    assert!(matches!(
        h.events()[..],
        [
            Event::Cmo {
                status: 0,
                size: 128,
                ..
            },
            Event::Cmo {
                status: -3,
                size: 128,
                ..
            }
        ]
    ));
}

#[test]
fn audit_read_copies_records_into_guest_memory() {
    let mut h = harness();
    let regs = h.regs(function::AUDIT_MARK, &[0xfeed]);
    assert_eq!(regs[0], 0);
    let first = regs[1];
    h.vm.iommu
        .pending_faults
        .borrow_mut()
        .push((SHARED, RAM.ipa));
    let buffer = RAM.ipa + 0x3_0000;
    let regs = h.regs(function::AUDIT_READ, &[buffer, 4096, first]);
    // The mark, then the fault drained before the read.
    assert_eq!(regs[0], 0);
    assert_eq!(regs[1], 2);
    assert_eq!(regs[2], first + 2);
    let bytes = h.cpu.peek(Harness::pa(buffer), 256);
    let log = h.vm.audit.log.borrow_mut().read(first, 2);
    assert_eq!(&bytes[..128], log.records[0].bytes());
    assert_eq!(&bytes[128..], log.records[1].bytes());
}

#[test]
fn query_va_reports_both_stages() {
    let mut h = harness();
    // MMU off: the identity, Device-nGnRnE at stage 1.
    assert_eq!(
        h.regs(function::MEM_QUERY_VA, &[RAM.ipa + 0x123, 0]),
        [0, RAM.ipa + 0x123, 0, 0]
    );
    let mut stage1 = alloc::collections::BTreeMap::new();
    stage1.insert(0x8000_0000, RAM.ipa + 0x7000);
    h.cpu.stage1 = Some(stage1);
    h.cpu.effective_attribute = 0x44;
    assert_eq!(
        h.regs(function::MEM_QUERY_VA, &[0x8000_0010, 1]),
        [0, RAM.ipa + 0x7010, 0x44, 0xff]
    );
    assert_eq!(
        h.regs(function::MEM_QUERY_VA, &[0x9000_0000, 0])[0],
        code(Status::InvalidParameter)
    );
}

#[test]
fn power_calls_go_through_the_firmware_and_undo_on_refusal() {
    let mut h = harness();
    let entry = RAM.ipa + 0x8_0000;
    assert_eq!(h.regs(0xC400_0003, &[2, entry, 7])[0], 0); // CPU_ON 64
    assert_eq!(h.cpu.firmware_calls, vec![(2, 2)]);
    assert_eq!(
        h.vm.boot_requests[2]
            .0
            .load(core::sync::atomic::Ordering::Relaxed),
        entry
    );
    assert_eq!(h.regs(0xC400_0003, &[2, entry, 7])[0] as i64, -5); // ON_PENDING
    h.cpu.firmware_refuses = true;
    assert_eq!(h.regs(0xC400_0003, &[3, entry, 0])[0] as i64, -6);
    assert_eq!(h.regs(0xC400_0004, &[3, 0])[0], 1); // AFFINITY_INFO: off again
    assert_eq!(h.regs(0xC400_0003, &[1, RAM_END, 0])[0] as i64, -9);
    assert_eq!(h.regs(0xC400_0003, &[1, entry + 2, 0])[0] as i64, -9);
    assert_eq!(h.regs(0xC400_0003, &[9, entry, 0])[0] as i64, -2);
    let events = h.events();
    assert_eq!(events.len(), 5);
    assert!(events.iter().all(|e| matches!(e, Event::Refused { .. })));
    // CPU_OFF returns only when the firmware refused: the vCPU is on again, the guest told so.
    assert_eq!(h.regs(0x8400_0002, &[])[0] as i64, -6);
    assert_eq!(h.cpu.firmware_calls.last(), Some(&(u64::MAX, 0)));
    assert_eq!(h.regs(0xC400_0004, &[0, 0])[0], 0);
    assert_eq!(
        h.call(0x8400_0008, &[]).0,
        Action::Stop(crate::audit::StopReason::SystemOff)
    );
    assert_eq!(
        h.call(0x8400_0009, &[]).0,
        Action::Stop(crate::audit::StopReason::SystemReset)
    );
}

/// Random calls with hostile and plausible arguments: no panic, every error answer leaves a
/// record, stage 2 and the ledger stay consistent after each call, and once every live
/// mapping is unmapped no page is left pinned.
#[test]
fn random_calls_keep_every_promise() {
    let mut h = harness();
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let functions = [
        function::MEM_SET_ATTR,
        function::MEM_GET_ATTR,
        function::MEM_QUERY_VA,
        function::CACHE_OP,
        function::CACHE_OP_BATCH,
        function::DMA_MAP,
        function::DMA_UNMAP,
        function::DMA_SYNC,
        function::DMA_MAP_SG,
        function::DMA_UNMAP_SG,
        function::AUDIT_READ,
        function::AUDIT_MARK,
        function::DEV_INFO,
        function::FEATURES,
        0xC600_0099,
    ];
    let devices = [STRICT_NC, SHARED, BLOCKED, STRICT_COHERENT, 0x99];
    let mut successes = alloc::collections::BTreeMap::new();
    // Handles DMA_MAP answered: plausible unmaps and syncs pick among them (live or stale).
    let mut handles: Vec<u64> = vec![1];
    for round in 0..2500 {
        let function = functions[next() as usize % functions.len()];
        let mut value = |slot: u64| -> u64 {
            let r = next();
            match (r >> 60) % 8 {
                0 => RAM.ipa + (r % RAM.size),
                1 => RAM.ipa + (r % RAM.size) / 4096 * 4096,
                2 => r % 0x3000,
                3 => [UART, 0, u64::MAX - (r % 4096), RAM_END - (r % 8192)][(r % 4) as usize],
                4 => devices[(r % 5) as usize] as u64,
                5 => 1 + r % 40, // a handle, a count, an op, a direction
                6 => slot,
                _ => r,
            }
        };
        let mut args: Vec<u64> = (0..5).map(&mut value).collect();
        // Half of the calls get arguments a driver would pass, so that the work runs too.
        let (r, s) = (next(), next());
        let page = RAM.ipa + (r % (RAM.size / 4096)) * 4096;
        let device = devices[(s % 4) as usize] as u64;
        let plausible = match function {
            function::MEM_SET_ATTR => Some(vec![page, (1 + s % 8) * 4096, r % 2]),
            function::CACHE_OP => Some(vec![page + s % 4096, 1 + s % 8192, 1 + r % 3]),
            function::DMA_MAP => Some(vec![device, page + s % 4096, 1 + s % 0x3000, r % 3]),
            function::DMA_UNMAP => Some(vec![handles[s as usize % handles.len()]]),
            function::DMA_SYNC => Some(vec![
                handles[s as usize % handles.len()],
                r % 0x100,
                1 + s % 0x100,
                r % 2,
            ]),
            function::DMA_MAP_SG => Some(vec![device, page, 1 + s % 4, r % 3, 0]),
            function::AUDIT_READ => Some(vec![page, 4096, 0]),
            _ => None,
        };
        if let Some(plausible) = plausible.filter(|_| r % 2 == 0) {
            args = plausible;
        }
        let regs = h.regs(function, &args);
        let status = regs[0] as i64;
        if status == 0 {
            *successes.entry(function).or_insert(0) += 1;
            if function == function::DMA_MAP {
                handles.push(regs[2]);
            }
        }
        let events = h.events();
        if status < 0 && function != function::REVISION {
            assert!(
                !events.is_empty(),
                "round {round}: {function:#x}{args:x?} answered {status} without a record"
            );
        }
        let stage2 = h.vm.stage2.read();
        if let Err(problem) = stage2.manager.check_invariants(&stage2.tables) {
            panic!("round {round}: {function:#x}{args:x?}: {problem}");
        }
    }
    // The arguments reach the handlers' work, not only their checks.
    for function in [
        function::MEM_SET_ATTR,
        function::CACHE_OP,
        function::DMA_MAP,
        function::DMA_UNMAP,
        function::AUDIT_READ,
    ] {
        assert!(
            successes.get(&function).copied().unwrap_or(0) > 3,
            "{function:#x}: {successes:x?}"
        );
    }
    // Unmap everything still mapped: no pin is left behind.
    let live: Vec<u64> = h.vm.mappings.lock().handles().collect();
    for handle in live {
        assert_eq!(h.regs(function::DMA_UNMAP, &[handle])[0], 0);
    }
    for page in (RAM.ipa..RAM_END).step_by(4096) {
        assert_eq!(h.pins(page), 0, "{page:#x} still pinned");
    }
}

/// The vector answers the calls of [`constant::TABLE`] without reaching the dispatcher: the
/// full path must give each exactly the same registers, and record nothing either way.
#[test]
fn the_vectors_constant_answers_are_the_dispatchers() {
    let mut h = harness();
    for (id, answer) in constant::CALLS {
        for x0 in [id as u64, 0xffff_ffff_0000_0000 | id as u64] {
            assert_eq!(constant::lookup(x0), Some(answer), "{x0:#x}");
            let mut x = [x0, 0xa1, 0xa2, 0xa3, 0xa4, 0xa5, 0xa6];
            let mut cpu = PerCpu {
                vcpu: 0,
                cpu: core::mem::take(&mut h.cpu),
            };
            assert_eq!(run(&h.vm, &mut cpu, &mut x), Action::Return);
            h.cpu = cpu.cpu;
            assert_eq!(x[..4], answer, "{x0:#x}");
            assert_eq!(x[4..], [0xa4, 0xa5, 0xa6], "{x0:#x}");
        }
    }
    assert!(h.events().is_empty());
    // Calls whose answer depends on the VM or an argument are not in the table.
    for id in [
        function::FEATURES,
        smccc::arch::SMCCC_ARCH_FEATURES,
        smccc::psci::PSCI_FEATURES,
        smccc::psci::PSCI_CPU_ON_64,
    ] {
        assert_eq!(constant::lookup(id as u64), None, "{id:#x}");
    }
}

#[test]
fn a_reused_slot_never_accepts_the_handle_it_had_before() {
    let mut h = harness();
    let first = h.map(STRICT_COHERENT, RAM.ipa + 0x3000, 0x100, 0);
    assert_eq!(h.regs(function::DMA_UNMAP, &[first])[0], 0);
    // The next mapping takes the freed slot under a new generation.
    let second = h.map(STRICT_COHERENT, RAM.ipa + 0x7000, 0x100, 1);
    assert_ne!(first, second);
    h.events();
    h.vm.iommu.take();
    for (function, args) in [
        (function::DMA_UNMAP, vec![first]),
        (function::DMA_SYNC, vec![first, 0, 0x10, 1]),
    ] {
        assert_eq!(
            h.regs(function, &args)[0],
            code(Status::BadHandle),
            "{function:#x}"
        );
        assert!(
            matches!(h.events()[..], [Event::RefusedRange { status: -10, .. }]),
            "{function:#x}: one refusal record"
        );
    }
    // The stale handle changed nothing: the live mapping keeps its pin, rights and entry.
    assert_eq!(h.vm.iommu.take(), vec![]);
    assert_eq!(h.pins(RAM.ipa + 0x7000), 1);
    assert_eq!(
        h.vm.mappings
            .lock()
            .rights(STRICT_COHERENT, RAM.ipa + 0x7000),
        Some(Permissions::RO)
    );
    assert_eq!(h.regs(function::DMA_UNMAP, &[second])[0], 0);
    assert_eq!(h.pins(RAM.ipa + 0x7000), 0);
}

#[test]
fn a_strict_mapping_follows_each_page_attribute_run_without_collecting_them() {
    let mut h = harness();
    let ipa = RAM.ipa + 0x4_0000;
    // The middle page of a three-page buffer is non-cacheable.
    assert_eq!(
        h.regs(function::MEM_SET_ATTR, &[ipa + 0x1000, 0x1000, 1])[0],
        0
    );
    h.events();
    h.vm.iommu.take();
    let handle = h.map(STRICT_COHERENT, ipa + 0x800, 0x2000, 0);
    let rights: Vec<_> =
        h.vm.iommu
            .take()
            .into_iter()
            .filter_map(|op| match op {
                IommuOp::Rights(STRICT_COHERENT, updates) => Some(updates),
                _ => None,
            })
            .flatten()
            .map(|u| (u.ipa.get(), u.pa.get(), u.size, u.memory, u.after))
            .collect();
    let rw = Some(Permissions::RW);
    assert_eq!(
        rights,
        vec![
            (
                ipa,
                Harness::pa(ipa),
                0x1000,
                MemoryType::NormalWriteBack,
                rw
            ),
            (
                ipa + 0x1000,
                Harness::pa(ipa + 0x1000),
                0x1000,
                MemoryType::NormalNonCacheable,
                rw
            ),
            (
                ipa + 0x2000,
                Harness::pa(ipa + 0x2000),
                0x1000,
                MemoryType::NormalWriteBack,
                rw
            ),
        ]
    );
    // One record per run, clipped to the buffer, the attribute each run's entry has.
    let records: Vec<_> = h
        .events()
        .into_iter()
        .filter_map(|e| match e {
            Event::DmaMap {
                ipa,
                size,
                attribute,
                handle: h,
                ..
            } if h == handle => Some((ipa, size, attribute)),
            _ => None,
        })
        .collect();
    use crate::attributes::Attribute::{NonCacheable, WriteBack};
    assert_eq!(
        records,
        vec![
            (ipa + 0x800, 0x800, Some(WriteBack)),
            (ipa + 0x1000, 0x1000, Some(NonCacheable)),
            (ipa + 0x2000, 0x800, Some(WriteBack)),
        ]
    );
    // The unmap removes all three and invalidates the one run they form, then syncs once.
    assert_eq!(h.regs(function::DMA_UNMAP, &[handle])[0], 0);
    let ops = h.vm.iommu.take();
    assert_eq!(
        ops.last(),
        Some(&IommuOp::InvalidateStrict(
            STRICT_COHERENT,
            vec![(Ipa::new(ipa), 0x3000)]
        ))
    );
    assert_eq!(
        ops.iter()
            .filter(|op| matches!(op, IommuOp::InvalidateStrict(..)))
            .count(),
        1
    );
}

/// One step of [`dma_maps_of_one_page_and_more_agree_with_the_model`].
#[derive(Clone, Debug)]
enum DmaStep {
    /// DMA_MAP of `size` bytes at `offset` into the window, for device `device` (an index
    /// into [`MODEL_DEVICES`]).
    Map {
        device: usize,
        offset: u64,
        size: u64,
        direction: u64,
    },
    /// DMA_UNMAP of the live mapping `which` (modulo their number).
    Unmap { which: usize },
}

/// The devices the model maps for: strict non-coherent, strict coherent, shared.
const MODEL_DEVICES: [u32; 3] = [STRICT_NC, STRICT_COHERENT, SHARED];
/// The model's pages: a few, so that buffers overlap and share pages.
const WINDOW: u64 = RAM.ipa + 0x10_0000;
const WINDOW_PAGES: u64 = 6;

fn dma_step() -> impl proptest::strategy::Strategy<Value = DmaStep> {
    use proptest::prelude::*;
    let window = WINDOW_PAGES * 4096;
    prop_oneof![
        // Within one page (the common case and the ledger's one-page path)...
        3 => (0..3usize, 0..window, 0..3u64, any::<u64>()).prop_map(|(device, offset, direction, r)| {
            let room = 4096 - offset % 4096;
            DmaStep::Map { device, offset, size: 1 + r % room, direction }
        }),
        // ...or across pages.
        2 => (0..3usize, 0..window, 0..3u64, any::<u64>()).prop_map(move |(device, offset, direction, r)| {
            let room = window - offset;
            DmaStep::Map { device, offset, size: 1 + r % room, direction }
        }),
        3 => any::<usize>().prop_map(|which| DmaStep::Unmap { which }),
    ]
}

/// A strict device's rights for a direction (TO_DEVICE: the device reads).
fn rights_of(direction: u64) -> Permissions {
    [Permissions::RW, Permissions::RO, Permissions::WO][direction as usize]
}

/// The union of `rights`, `None` for none.
fn union(rights: impl Iterator<Item = Permissions>) -> Option<Permissions> {
    let (read, write) = rights.fold((false, false), |(r, w), p| (r || p.read, w || p.write));
    match (read, write) {
        (false, false) => None,
        (true, false) => Some(Permissions::RO),
        (false, true) => Some(Permissions::WO),
        (true, true) => Some(Permissions::RW),
    }
}

/// A live mapping of the model: handle, device, first IPA, size, direction.
type Live = (u64, u32, u64, u64, u64);

/// A harness whose quota holds every mapping of the model.
fn model_harness() -> Harness {
    let h = harness();
    h.vm.mappings.lock().set_quota(1024);
    h
}

/// The pages `[ipa, ipa + size)` touches.
fn pages_of(ipa: u64, size: u64) -> core::ops::Range<u64> {
    ipa / 4096..(ipa + size).div_ceil(4096)
}

impl Harness {
    /// Maps `live`'s buffer and records it; checks the call's one record.
    fn model_map(&mut self, live: &mut Vec<Live>, device: u32, ipa: u64, size: u64, dir: u64) {
        let handle = self.map(device, ipa, size, dir);
        live.push((handle, device, ipa, size, dir));
        // One dma-map record: every page of the window is write-back, one attribute run.
        let events = self.events();
        assert!(
            matches!(events[..], [Event::DmaMap { status: 0, .. }]),
            "{events:?}"
        );
    }

    /// The entries the IOMMU was told to write since the last look, applied to `entries` (per
    /// StreamID and page); returns the IOMMU's operations.
    fn apply_rights_written(
        &self,
        entries: &mut BTreeMap<(u32, u64), Option<Permissions>>,
    ) -> Vec<IommuOp> {
        let ops = self.vm.iommu.take();
        for op in &ops {
            if let IommuOp::Rights(stream_id, updates) = op {
                for update in updates {
                    for page in pages_of(update.ipa.get(), update.size) {
                        let entry = entries.entry((*stream_id, page)).or_insert(None);
                        assert_eq!(*entry, update.before, "{stream_id:#x} page {page:#x}");
                        *entry = update.after;
                    }
                }
            }
        }
        ops
    }

    /// Pins, counted rights and the device entries of every page of the window agree with
    /// the live mappings.
    fn check_model(&mut self, live: &[Live], entries: &BTreeMap<(u32, u64), Option<Permissions>>) {
        for page in pages_of(WINDOW, WINDOW_PAGES * 4096) {
            let touching = || {
                live.iter()
                    .filter(move |&&(_, _, ipa, size, _)| pages_of(ipa, size).contains(&page))
            };
            assert_eq!(
                self.pins(page * 4096),
                touching().count() as u64,
                "page {page:#x}"
            );
            for stream_id in [STRICT_NC, STRICT_COHERENT] {
                let want = union(
                    touching()
                        .filter(|&&(_, device, ..)| device == stream_id)
                        .map(|&(.., direction)| rights_of(direction)),
                );
                let counted = self.vm.mappings.lock().rights(stream_id, page * 4096);
                assert_eq!(counted, want, "{stream_id:#x} page {page:#x}");
                let entry = entries.get(&(stream_id, page)).copied().flatten();
                assert_eq!(entry, want, "entry of {stream_id:#x} page {page:#x}");
            }
        }
    }
}

use alloc::collections::BTreeMap;

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig::with_cases(48))]
    /// Random DMA_MAP and DMA_UNMAP of buffers within one page (the ledger's one-page pin and
    /// unpin, the rights writer's one-page update) and across pages, overlapping in a few
    /// pages, in every direction, for strict and shared devices, against a model: after every
    /// call each page's pin count is the number of live mappings touching it, a strict
    /// device's counted rights and its entries (as the IOMMU was told to write them) are the
    /// union of its live mappings' rights, each call has its one record, and an unmap's IOTLB
    /// sync follows the entry's change. Then the same live buffers mapped again, cut into
    /// pieces within one page, give the same pins, rights and entries as mapped whole, and
    /// unmapping everything leaves nothing pinned or granted on either side.
    #[test]
    fn dma_maps_of_one_page_and_more_agree_with_the_model(
        steps in proptest::collection::vec(dma_step(), 1..40)
    ) {
        let mut h = model_harness();
        let mut live: Vec<Live> = Vec::new();
        let mut entries = BTreeMap::new();
        for step in steps {
            match step {
                DmaStep::Map { device, offset, size, direction } => {
                    h.model_map(&mut live, MODEL_DEVICES[device], WINDOW + offset, size, direction);
                }
                DmaStep::Unmap { which } if !live.is_empty() => {
                    let (handle, ..) = live.remove(which % live.len());
                    assert_eq!(h.regs(function::DMA_UNMAP, &[handle])[0], 0);
                    let events = h.events();
                    assert!(matches!(events[..], [Event::DmaUnmap { status: 0, .. }]), "{events:?}");
                    // The entries narrowed or removed, then one sync covering them.
                    let ops = h.apply_rights_written(&mut entries);
                    if let Some((last, written)) = ops.split_last() {
                        let IommuOp::InvalidateStrict(_, runs) = last else {
                            panic!("unmap without a sync: {ops:?}");
                        };
                        for op in written {
                            let IommuOp::Rights(_, updates) = op else {
                                panic!("unmap: {ops:?}");
                            };
                            for page in updates.iter().flat_map(|u| pages_of(u.ipa.get(), u.size)) {
                                assert!(
                                    runs.iter().any(|&(ipa, size)| pages_of(ipa.get(), size).contains(&page)),
                                    "page {page:#x} not invalidated: {ops:?}"
                                );
                            }
                        }
                    }
                    h.check_model(&live, &entries);
                    continue;
                }
                DmaStep::Unmap { .. } => continue,
            }
            h.apply_rights_written(&mut entries);
            h.check_model(&live, &entries);
            let stage2 = h.vm.stage2.read();
            stage2.manager.check_invariants(&stage2.tables).unwrap();
        }
        // The same buffers, cut at page boundaries: every piece within one page.
        let mut pieces = model_harness();
        let mut pieces_live = Vec::new();
        let mut pieces_entries = BTreeMap::new();
        for &(_, device, ipa, size, direction) in &live {
            let mut at = ipa;
            while at < ipa + size {
                let end = (ipa + size).min((at & !4095) + 4096);
                pieces.model_map(&mut pieces_live, device, at, end - at, direction);
                at = end;
            }
        }
        pieces.apply_rights_written(&mut pieces_entries);
        pieces.check_model(&pieces_live, &pieces_entries);
        h.check_model(&pieces_live, &entries);
        for (harness, live, entries) in [
            (&mut h, &mut live, &mut entries),
            (&mut pieces, &mut pieces_live, &mut pieces_entries),
        ] {
            for (handle, ..) in live.drain(..) {
                assert_eq!(harness.regs(function::DMA_UNMAP, &[handle])[0], 0);
            }
            harness.apply_rights_written(entries);
            harness.check_model(&[], entries);
            assert_eq!(harness.vm.mappings.lock().len(), 0);
        }
    }
}
