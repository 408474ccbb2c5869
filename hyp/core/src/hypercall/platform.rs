//! What the call handlers need from the machine, as small traits: the IOMMU ([`Iommu`]: an
//! absent one here, the SMMUv3 in the aarch64 layer, a recording fake in tests), the guest's
//! memory and translation regime on this CPU ([`GuestMemory`]), the firmware's CPU power calls
//! ([`Firmware`]) and the audit log's call-side entry points ([`AuditSink`]). CPU instructions
//! come through [`crate::maintenance::Arch`].

use crate::address::{GuestVa, HypVa, Ipa, Pa};
use crate::audit::{Event, ReadResult};
use crate::config::DmaMode;
use crate::maintenance::{Arch, TableWrite};
use crate::pagetable::{MemoryType, Permissions};

/// What DEV_INFO reports about one device: StreamID, requester ID, mode and coherence.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DeviceInfo {
    /// StreamID (the device id of the DMA calls).
    pub stream_id: u32,
    /// PCI segment/bus/device/function as the ABI packs it.
    pub requester_id: u16,
    /// DMA mode.
    pub mode: DmaMode,
    /// Snoops CPU caches.
    pub coherent: bool,
}

/// A device the guest may use for DMA (not blocked).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DmaDevice {
    /// Its StreamID.
    pub stream_id: u32,
    /// Strict mode: it reaches only mapped buffers.
    pub strict: bool,
    /// It snoops CPU caches.
    pub coherent: bool,
}

/// A run of pages of a strict device's stage 2 whose rights change, all of one attribute.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RightsUpdate {
    /// First page's IPA (= IOVA).
    pub ipa: Ipa,
    /// Its PA.
    pub pa: Pa,
    /// Bytes (a page multiple).
    pub size: u64,
    /// The rights before (`None`: not mapped).
    pub before: Option<Permissions>,
    /// The rights after (`None`: unmapped).
    pub after: Option<Permissions>,
    /// The pages' attribute, which the device's mapping follows (I1).
    pub memory: MemoryType,
}

/// IOMMU commands an operation issued, for its audit record.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Issued {
    /// Commands, the final sync included.
    pub count: u32,
    /// Their kinds: bits of `stagehand_abi::audit::smmu_command`.
    pub kinds: u16,
}

impl Issued {
    /// Both counts together.
    pub fn add(&mut self, more: Issued) {
        self.count += more.count;
        self.kinds |= more.kinds;
    }
}

/// Why the IOMMU did not do what it was asked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum IommuError {
    /// No such device, or it has no tables of its own.
    NoDevice,
    /// Its tables ran out of memory (the writes before the failing page stand; the caller
    /// undoes them).
    NoMemory,
    /// The IOMMU did not confirm the operation (a command error or a timeout), or its tables
    /// did not match the counted rights.
    NotConfirmed,
}

/// The IOMMU in front of the guest's devices. Its implementations serialise themselves (the
/// methods take `&self`): several vCPUs call them at once.
pub trait Iommu {
    /// FEATURES capability bits it contributes (SMMU present, strict mode in use).
    fn features(&self) -> u64;
    /// Device `index` in discovery order, or `None` past the last.
    fn device_info(&self, index: usize) -> Option<DeviceInfo>;
    /// The DMA-capable (not blocked) device with StreamID `stream_id`.
    fn dma_device(&self, stream_id: u32) -> Option<DmaDevice>;
    /// Writes rights changes into a strict device's own stage 2, page by page: mapped, unmapped
    /// or rewritten in place. The entries are visible to the IOMMU's walks when it returns;
    /// the caller then invalidates ([`Self::invalidate_strict`]).
    ///
    /// # Errors
    /// An [`IommuError`].
    fn apply_rights(&self, stream_id: u32, updates: &[RightsUpdate]) -> Result<(), IommuError>;
    /// Invalidates a strict device's IOTLB for each run `(ipa, size)` and waits for one sync.
    /// No runs: nothing issued.
    ///
    /// # Errors
    /// An [`IommuError`].
    fn invalidate_strict(&self, stream_id: u32, runs: &[(Ipa, u64)]) -> Result<Issued, IommuError>;
    /// Invalidates the IOTLB of the devices that share the guest's stage 2 for
    /// `[ipa, ipa + size)` and waits for it. Nothing when no device shares it.
    fn invalidate_shared(&self, ipa: Ipa, size: u64) -> Issued;
    /// Turns fault events that arrived into audit records (on `vcpu`'s time).
    fn drain_events(&self, vcpu: usize, audit: &impl AuditSink);
}

/// No IOMMU: no devices, nothing to invalidate.
#[derive(Clone, Copy, Debug, Default)]
pub struct NoIommu;

impl Iommu for NoIommu {
    fn features(&self) -> u64 {
        0
    }
    fn device_info(&self, _index: usize) -> Option<DeviceInfo> {
        None
    }
    fn dma_device(&self, _stream_id: u32) -> Option<DmaDevice> {
        None
    }
    fn apply_rights(&self, _stream_id: u32, _updates: &[RightsUpdate]) -> Result<(), IommuError> {
        Err(IommuError::NoDevice)
    }
    fn invalidate_strict(
        &self,
        _stream_id: u32,
        runs: &[(Ipa, u64)],
    ) -> Result<Issued, IommuError> {
        if runs.is_empty() {
            Ok(Issued::default())
        } else {
            Err(IommuError::NoDevice)
        }
    }
    fn invalidate_shared(&self, _ipa: Ipa, _size: u64) -> Issued {
        Issued::default()
    }
    fn drain_events(&self, _vcpu: usize, _audit: &impl AuditSink) {}
}

/// An IOMMU the board may or may not have: `None` is [`NoIommu`].
impl<I: Iommu> Iommu for Option<I> {
    fn features(&self) -> u64 {
        self.as_ref().map_or(0, Iommu::features)
    }
    fn device_info(&self, index: usize) -> Option<DeviceInfo> {
        self.as_ref()?.device_info(index)
    }
    fn dma_device(&self, stream_id: u32) -> Option<DmaDevice> {
        self.as_ref()?.dma_device(stream_id)
    }
    fn apply_rights(&self, stream_id: u32, updates: &[RightsUpdate]) -> Result<(), IommuError> {
        match self {
            Some(iommu) => iommu.apply_rights(stream_id, updates),
            None => NoIommu.apply_rights(stream_id, updates),
        }
    }
    fn invalidate_strict(&self, stream_id: u32, runs: &[(Ipa, u64)]) -> Result<Issued, IommuError> {
        match self {
            Some(iommu) => iommu.invalidate_strict(stream_id, runs),
            None => NoIommu.invalidate_strict(stream_id, runs),
        }
    }
    fn invalidate_shared(&self, ipa: Ipa, size: u64) -> Issued {
        self.as_ref()
            .map_or_else(Issued::default, |iommu| iommu.invalidate_shared(ipa, size))
    }
    fn drain_events(&self, vcpu: usize, audit: &impl AuditSink) {
        if let Some(iommu) = self {
            iommu.drain_events(vcpu, audit)
        }
    }
}

/// A stage-2 edit's CPU operations plus the IOMMU: [`Arch::device_tlbi`] invalidates the devices
/// that share the guest's stage 2. The CPU alone has no device TLB; the handlers always edit
/// stage 2 through this, so no arch code calls up into the IOMMU driver.
pub struct WithDeviceTlb<'a, A, I> {
    /// The CPU.
    pub cpu: &'a mut A,
    /// The IOMMU whose shared devices walk the guest's stage 2.
    pub iommu: &'a I,
}

impl<A: Arch, I: Iommu> Arch for WithDeviceTlb<'_, A, I> {
    fn line_size(&self) -> u64 {
        self.cpu.line_size()
    }
    fn dcache_range(&mut self, op: crate::maintenance::CacheOp, va: u64, len: u64) {
        self.cpu.dcache_range(op, va, len)
    }
    fn dsb_ish(&mut self) {
        self.cpu.dsb_ish()
    }
    fn dsb_ishst(&mut self) {
        self.cpu.dsb_ishst()
    }
    fn dsb_sy(&mut self) {
        self.cpu.dsb_sy()
    }
    fn isb(&mut self) {
        self.cpu.isb()
    }
    fn tlbi_ipas2e1is(&mut self, ipa: u64) {
        self.cpu.tlbi_ipas2e1is(ipa)
    }
    fn tlbi_vmalle1is(&mut self) {
        self.cpu.tlbi_vmalle1is()
    }
    fn tlbi_vmalls12e1is(&mut self) {
        self.cpu.tlbi_vmalls12e1is()
    }
    fn tlbi_vae2is(&mut self, va: u64) {
        self.cpu.tlbi_vae2is(va)
    }
    fn tlbi_alle2is(&mut self) {
        self.cpu.tlbi_alle2is()
    }
    fn device_tlbi(&mut self, ipa: u64, size: u64) {
        self.cpu.device_tlbi(ipa, size);
        self.iommu.invalidate_shared(Ipa::new(ipa), size);
    }
    fn table_write(&mut self, write: TableWrite) {
        self.cpu.table_write(write)
    }
}

/// An address translation through the guest's own regime failed (the walk faulted, or took an
/// external abort on tables the guest placed in MMIO).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TranslationFailed;

/// The guest's memory as this CPU reaches it: bytes through the hypervisor's alias of guest RAM, and the
/// guest's own translation regime (its EL1 MMU state and the AT instructions).
pub trait GuestMemory {
    /// Copies guest bytes at `at` (in the hypervisor's alias of guest RAM; physically `pa`, for
    /// implementations that model memory by physical address) into `into`.
    fn read_bytes(&mut self, at: HypVa, pa: Pa, into: &mut [u8]);
    /// Copies `bytes` to guest memory at `at` (physically `pa`).
    fn write_bytes(&mut self, at: HypVa, pa: Pa, bytes: &[u8]);
    /// Whether the guest's EL1 stage 1 is on (SCTLR_EL1.M).
    fn stage1_enabled(&self) -> bool;
    /// Translates `va` through the guest's stage 1 (or both stages with `both_stages`) for a
    /// read or a write, and returns PAR_EL1 as the AT instruction left it (decoded by
    /// [`crate::requests::par`]).
    ///
    /// # Errors
    /// [`TranslationFailed`] when the walk itself aborted.
    fn translate(
        &mut self,
        va: GuestVa,
        both_stages: bool,
        write: bool,
    ) -> Result<u64, TranslationFailed>;
}

/// The firmware's CPU power calls (PSCI below the hypervisor).
pub trait Firmware {
    /// Starts physical CPU `mpidr` at the hypervisor's secondary entry with `vcpu` as its
    /// context. Retries briefly while the firmware still reports the CPU on (it may have just
    /// turned itself off).
    ///
    /// # Errors
    /// [`FirmwareRefused`] when the firmware did not start it.
    fn cpu_on(&mut self, mpidr: u64, vcpu: usize) -> Result<(), FirmwareRefused>;
    /// Turns this CPU off. Returns only if the firmware refused.
    fn cpu_off(&mut self);
}

/// The firmware refused a power call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FirmwareRefused;

/// The audit log's call-side entry points (the log itself, its ring and its stream belong to
/// the aarch64 layer; a fake in tests keeps a [`crate::audit::AuditLog`]).
pub trait AuditSink {
    /// Records `event`, caused by `vcpu`; returns its sequence number, or `None` when the
    /// configured level leaves such events out.
    fn record(&self, vcpu: usize, event: &Event) -> Option<u64>;
    /// Whether the configuration keeps any records.
    fn enabled(&self) -> bool;
    /// Streams what waits, then reads up to `max` records from sequence `first` on for the
    /// guest (losses reported first).
    fn read(&self, vcpu: usize, first: u64, max: usize) -> ReadResult;
}
