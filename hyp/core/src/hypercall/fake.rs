//! Fakes of the machine for host tests of the handlers: a CPU that records its instructions
//! and models guest RAM by physical address, an IOMMU that records its commands, and an audit
//! sink over a real [`AuditLog`].

use super::platform::{
    AuditSink, DeviceInfo, DmaDevice, Firmware, FirmwareRefused, GuestMemory, Iommu, IommuError,
    Issued, RightsUpdate, TranslationFailed,
};
use crate::address::{GuestVa, HypVa, Ipa, Pa};
use crate::audit::{AuditLog, Event, ReadResult};
use crate::config::DmaMode;
use crate::maintenance::{Arch, CacheOp, Op, Recorder, TableWrite};
use alloc::collections::BTreeMap;
use alloc::vec::Vec;
use core::cell::{Cell, RefCell};

/// The recording CPU, with guest RAM by PA and a stage 1 of its own.
#[derive(Default)]
pub struct FakeCpu {
    /// Every instruction, in order.
    pub recorder: Recorder,
    /// Guest memory contents by PA (absent bytes read 0).
    pub memory: BTreeMap<u64, u8>,
    /// Stage 1 on, with these page translations (VA page -> IPA page); off: identity.
    pub stage1: Option<BTreeMap<u64, u64>>,
    /// PAR attribute both stages give (MAIR encoding).
    pub effective_attribute: u8,
    /// What the firmware answers to CPU_ON.
    pub firmware_refuses: bool,
    /// CPU_ON and CPU_OFF calls the firmware got: (mpidr, vcpu) or (u64::MAX, vcpu) for off.
    pub firmware_calls: Vec<(u64, usize)>,
}

impl Arch for FakeCpu {
    fn line_size(&self) -> u64 {
        self.recorder.line_size()
    }
    fn dcache_range(&mut self, op: CacheOp, va: u64, len: u64) {
        self.recorder.dcache_range(op, va, len)
    }
    fn dsb_ish(&mut self) {
        self.recorder.dsb_ish()
    }
    fn dsb_ishst(&mut self) {
        self.recorder.dsb_ishst()
    }
    fn dsb_sy(&mut self) {
        self.recorder.dsb_sy()
    }
    fn isb(&mut self) {
        self.recorder.isb()
    }
    fn tlbi_ipas2e1is(&mut self, ipa: u64) {
        self.recorder.tlbi_ipas2e1is(ipa)
    }
    fn tlbi_vmalle1is(&mut self) {
        self.recorder.tlbi_vmalle1is()
    }
    fn tlbi_vmalls12e1is(&mut self) {
        self.recorder.tlbi_vmalls12e1is()
    }
    fn tlbi_vae2is(&mut self, va: u64) {
        self.recorder.tlbi_vae2is(va)
    }
    fn tlbi_alle2is(&mut self) {
        self.recorder.tlbi_alle2is()
    }
    fn device_tlbi(&mut self, ipa: u64, size: u64) {
        self.recorder.device_tlbi(ipa, size)
    }
    fn table_write(&mut self, write: TableWrite) {
        self.recorder.table_write(write)
    }
}

impl FakeCpu {
    /// The instructions recorded.
    pub fn ops(&self) -> &[Op] {
        &self.recorder.ops
    }

    /// Writes guest bytes at `pa` directly (as the guest would).
    pub fn poke(&mut self, pa: u64, bytes: &[u8]) {
        for (i, b) in bytes.iter().enumerate() {
            self.memory.insert(pa + i as u64, *b);
        }
    }

    /// Reads guest bytes at `pa` directly.
    pub fn peek(&self, pa: u64, len: usize) -> Vec<u8> {
        (0..len as u64)
            .map(|i| self.memory.get(&(pa + i)).copied().unwrap_or(0))
            .collect()
    }
}

impl GuestMemory for FakeCpu {
    fn read_bytes(&mut self, _at: HypVa, pa: Pa, into: &mut [u8]) {
        let bytes = self.peek(pa.get(), into.len());
        into.copy_from_slice(&bytes);
    }
    fn write_bytes(&mut self, _at: HypVa, pa: Pa, bytes: &[u8]) {
        self.poke(pa.get(), bytes);
    }
    fn stage1_enabled(&self) -> bool {
        self.stage1.is_some()
    }
    fn translate(
        &mut self,
        va: GuestVa,
        both_stages: bool,
        _write: bool,
    ) -> Result<u64, TranslationFailed> {
        let Some(map) = &self.stage1 else {
            return Ok(va.get() & !0xfff);
        };
        match map.get(&(va.get() & !0xfff)) {
            // PAR: output address, attribute in [63:56] (0xff = WB at stage 1).
            Some(&ipa) => {
                let attribute = if both_stages {
                    self.effective_attribute
                } else {
                    0xff
                };
                Ok(ipa | (attribute as u64) << 56)
            }
            None => Ok(1), // PAR.F: a stage-1 fault
        }
    }
}

impl Firmware for FakeCpu {
    fn cpu_on(&mut self, mpidr: u64, vcpu: usize) -> Result<(), FirmwareRefused> {
        self.firmware_calls.push((mpidr, vcpu));
        if self.firmware_refuses {
            Err(FirmwareRefused)
        } else {
            Ok(())
        }
    }
    fn cpu_off(&mut self) {
        self.firmware_calls.push((u64::MAX, 0));
    }
}

/// A device the fake IOMMU knows.
#[derive(Clone, Copy, Debug)]
pub struct FakeDevice {
    /// What DEV_INFO says.
    pub info: DeviceInfo,
}

/// One thing the fake IOMMU was asked to do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum IommuOp {
    /// Rights written for a strict device.
    Rights(u32, Vec<RightsUpdate>),
    /// A strict device's IOTLB invalidated for these runs, then a sync.
    InvalidateStrict(u32, Vec<(Ipa, u64)>),
    /// The shared devices' IOTLB invalidated, then a sync.
    InvalidateShared(Ipa, u64),
}

/// An IOMMU that records its commands; failures can be injected.
#[derive(Default)]
pub struct FakeIommu {
    /// Devices in discovery order.
    pub devices: Vec<FakeDevice>,
    /// Every request, in order.
    pub ops: RefCell<Vec<IommuOp>>,
    /// The next `apply_rights` calls fail with this (counting down).
    pub fail_rights: Cell<Option<(usize, IommuError)>>,
    /// Every `invalidate_strict` with runs fails.
    pub fail_invalidate: Cell<bool>,
    /// Fault events waiting to be drained: (StreamID, IPA).
    pub pending_faults: RefCell<Vec<(u32, u64)>>,
}

impl FakeIommu {
    /// An IOMMU with these devices: (StreamID, mode, coherent).
    pub fn with(devices: &[(u32, DmaMode, bool)]) -> Self {
        Self {
            devices: devices
                .iter()
                .map(|&(stream_id, mode, coherent)| FakeDevice {
                    info: DeviceInfo {
                        stream_id,
                        requester_id: stream_id as u16,
                        mode,
                        coherent,
                    },
                })
                .collect(),
            ..Self::default()
        }
    }

    /// What was recorded, and forgets it.
    pub fn take(&self) -> Vec<IommuOp> {
        core::mem::take(&mut *self.ops.borrow_mut())
    }
}

impl Iommu for FakeIommu {
    fn features(&self) -> u64 {
        stagehand_abi::feature::SMMU
    }
    fn device_info(&self, index: usize) -> Option<DeviceInfo> {
        self.devices.get(index).map(|d| d.info)
    }
    fn dma_device(&self, stream_id: u32) -> Option<DmaDevice> {
        self.devices
            .iter()
            .find(|d| d.info.stream_id == stream_id && d.info.mode != DmaMode::Blocked)
            .map(|d| DmaDevice {
                stream_id,
                strict: d.info.mode == DmaMode::Strict,
                coherent: d.info.coherent,
            })
    }
    fn apply_rights(&self, stream_id: u32, updates: &[RightsUpdate]) -> Result<(), IommuError> {
        if updates.is_empty() {
            return Ok(());
        }
        if let Some((left, error)) = self.fail_rights.get() {
            self.fail_rights
                .set((left > 1).then_some((left - 1, error)));
            return Err(error);
        }
        self.ops
            .borrow_mut()
            .push(IommuOp::Rights(stream_id, updates.to_vec()));
        Ok(())
    }
    fn invalidate_strict(&self, stream_id: u32, runs: &[(Ipa, u64)]) -> Result<Issued, IommuError> {
        if runs.is_empty() {
            return Ok(Issued::default());
        }
        if self.fail_invalidate.get() {
            return Err(IommuError::NotConfirmed);
        }
        self.ops
            .borrow_mut()
            .push(IommuOp::InvalidateStrict(stream_id, runs.to_vec()));
        Ok(Issued {
            count: runs.len() as u32 + 1,
            kinds: stagehand_abi::audit::smmu_command::SYNC
                | stagehand_abi::audit::smmu_command::TLBI_S2_IPA,
        })
    }
    fn invalidate_shared(&self, ipa: Ipa, size: u64) -> Issued {
        self.ops
            .borrow_mut()
            .push(IommuOp::InvalidateShared(ipa, size));
        Issued::default()
    }
    fn drain_events(&self, vcpu: usize, audit: &impl AuditSink) {
        for (stream_id, ipa) in self.pending_faults.borrow_mut().drain(..) {
            audit.record(
                vcpu,
                &Event::SmmuFault {
                    stream_id,
                    ipa,
                    access: crate::inject::Access::Write,
                    event: 0x10,
                    stage2: true,
                },
            );
        }
    }
}

/// An audit sink over a real log; the events are kept too, for assertions.
pub struct FakeAudit {
    /// The log.
    pub log: RefCell<AuditLog>,
    /// Every event recorded, in order.
    pub events: RefCell<Vec<Event>>,
    /// The configuration keeps records.
    pub enabled: bool,
}

impl Default for FakeAudit {
    fn default() -> Self {
        Self {
            log: RefCell::new(AuditLog::new(1, crate::audit::RING_CAPACITY)),
            events: RefCell::new(Vec::new()),
            enabled: true,
        }
    }
}

impl FakeAudit {
    /// The events recorded, and forgets them (the log keeps its records).
    pub fn take(&self) -> Vec<Event> {
        core::mem::take(&mut *self.events.borrow_mut())
    }
}

impl AuditSink for FakeAudit {
    fn record(&self, vcpu: usize, event: &Event) -> Option<u64> {
        if !self.enabled {
            return None;
        }
        self.events.borrow_mut().push(*event);
        Some(self.log.borrow_mut().record(0, vcpu as u16, event))
    }
    fn enabled(&self) -> bool {
        self.enabled
    }
    fn read(&self, vcpu: usize, first: u64, max: usize) -> ReadResult {
        let mut log = self.log.borrow_mut();
        log.report_losses(0, vcpu as u16);
        log.read(first, max)
    }
}
