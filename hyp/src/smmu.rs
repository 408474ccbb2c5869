//! The SMMUv3 at EL2: the hypervisor owns it, the guest never sees it (it is neither in the
//! guest's device tree nor in its stage 2).
//!
//! [`init`] runs once, while [`crate::vm::build`] prepares the VM and before the guest runs (so
//! before any PCI device can have bus mastering enabled): it scans PCI configuration space,
//! decides each function's DMA mode from the configuration, builds a linear stream table, a
//! command queue and a large event queue, makes the SMMU abort traffic it has no entry for,
//! and enables it. Shared-mode devices translate through the guest's own stage-2 tables
//! (same VTCR fields, same root, same VMID); strict-mode devices get a stage-2 table of their
//! own, empty until DMA_MAP fills it; blocked devices get an abort entry.
//!
//! The driver is a value, [`SmmuV3`], which the VM owns and the portable call handlers use
//! through [`hyp_core::hypercall::platform::Iommu`]. Its `drain_events` turns SMMU fault events
//! into audit records. It runs when the guest idles (its WFI traps), on DMA_MAP and before
//! AUDIT_READ, not on every trap; its common case (nothing new) costs one MMIO read.
//!
//! The encodings (STE, commands, event records, queue arithmetic) are portable and host-tested
//! in `stagehand_platform::smmuv3`; this file only moves them to and from memory and registers.

use crate::arch;
use crate::arch::cpu::Cpu;
use crate::arch::mmu::HeapTables;
use aarch64_cpu::registers::{CNTFRQ_EL0, CNTPCT_EL0};
use alloc::vec::Vec;
use core::fmt;
use core::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use hyp_core::address::Ipa;
use hyp_core::attributes::AttributeManager;
use hyp_core::audit::Event;
use hyp_core::config::{Config, DmaMode};
use hyp_core::geometry::Geometry;
use hyp_core::hypercall::platform::{
    AuditSink, DeviceInfo, DmaDevice, Iommu, IommuError, Issued, RightsUpdate,
};
use hyp_core::inject::Access;
use hyp_core::noncoherent::{self, CleaningTables};
use hyp_core::pagetable::{DeviceTable, MapError, Stage2, TableMemory, PAGE_SIZE};
use stagehand_abi::feature;
use stagehand_platform::board::Board;
use stagehand_platform::pci::{self, Bdf, Function};
use stagehand_platform::smmuv3::{
    self, Command, CommandError, Event as SmmuEvent, FaultCollector, FaultGroup, GlobalErrors,
    QueueIndex, Smmuv3Registers, Stage2Config, Ste, CMDQ_CONS, CR0, CR1, CR2, GBPA, IDR0, IDR1,
    IDR3, IDR5,
};
use tock_registers::interfaces::{Readable, Writeable};

/// log2 of the event queue's entries (32 KiB entries, 1 MiB): QEMU writes one record per 4
/// bytes of a faulting DMA, 1024 for a page, and the queue is only drained when the guest next
/// traps. Capped by SMMU_IDR1.EVENTQS.
const EVENT_QUEUE_LOG2: u32 = 15;
/// log2 of the command queue's entries (256, 4 KiB). Capped by SMMU_IDR1.CMDQS.
const COMMAND_QUEUE_LOG2: u32 = 8;
/// The stream table covers at least bus 0 (256 StreamIDs with QEMU's identity `iommu-map`).
const MIN_STREAM_TABLE_LOG2: u32 = 8;
/// VMIDs of strict-mode devices start here (the guest, and shared devices, use the CPU's).
const FIRST_STRICT_VMID: u16 = 0x100;
/// Fault groups one drain keeps open before reporting the oldest.
const OPEN_FAULT_GROUPS: usize = 8;

/// Why the SMMU could not be brought up. Every one stops the boot: a guest with an SMMU the
/// hypervisor does not control could DMA anywhere.
#[derive(Debug)]
pub enum SmmuError {
    /// The SMMU lacks something this driver needs.
    Unsupported(&'static str),
    /// The SMMU did not acknowledge a register update in time.
    Timeout(&'static str),
    /// The heap had no room for a table or queue.
    OutOfMemory,
    /// A device's StreamID does not fit the SMMU's StreamID size.
    StreamIdTooLarge(u32),
    /// A command failed.
    Command(CommandError),
    /// A strict device's stage-2 table could not be made.
    Stage2(MapError),
}

impl fmt::Display for SmmuError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SmmuError::Unsupported(what) => write!(f, "SMMU: {what} is not supported"),
            SmmuError::Timeout(what) => write!(f, "SMMU: timed out waiting for {what}"),
            SmmuError::OutOfMemory => write!(f, "SMMU: out of memory for tables and queues"),
            SmmuError::StreamIdTooLarge(sid) => {
                write!(
                    f,
                    "SMMU: StreamID {sid:#x} exceeds the SMMU's StreamID size"
                )
            }
            SmmuError::Command(error) => write!(f, "SMMU: command queue error: {error}"),
            SmmuError::Stage2(error) => write!(f, "SMMU: stage 2 of a strict device: {error}"),
        }
    }
}

/// One PCI function behind the SMMU and what the configuration gave it.
pub struct AssignedDevice {
    /// Where it is.
    pub bdf: Bdf,
    /// Vendor and device ID.
    pub id: (u16, u16),
    /// Its StreamID.
    pub stream_id: u32,
    /// Its DMA mode.
    pub mode: DmaMode,
    /// Whether it snoops CPU caches (from the configuration; QEMU's devices all do).
    pub coherent: bool,
    /// The VMID its STE uses.
    pub vmid: u16,
    /// Strict mode: its own stage-2 table (IOVA = IPA to PA), empty until DMA_MAP fills it;
    /// page-granular, with the last leaf table cached (a one-page update is one store).
    pub stage2: Option<DeviceTable<Stage2>>,
}

/// Zeroed, naturally aligned heap memory the SMMU reads or writes (tables, queues). Accessed
/// only with volatile reads and writes, since the SMMU is another observer. Never freed: it
/// lives as long as the SMMU is enabled, which is until the machine stops.
struct DeviceMemory {
    pa: u64,
    bytes: u64,
}

impl DeviceMemory {
    fn new(bytes: u64) -> Result<DeviceMemory, SmmuError> {
        let layout = core::alloc::Layout::from_size_align(bytes as usize, bytes as usize)
            .map_err(|_| SmmuError::OutOfMemory)?;
        // SAFETY: the layout has a non-zero size (every caller asks for at least 4 KiB).
        let pointer = unsafe { alloc::alloc::alloc_zeroed(layout) };
        if pointer.is_null() {
            return Err(SmmuError::OutOfMemory);
        }
        // The heap is identity-mapped: the pointer is the physical address.
        Ok(DeviceMemory {
            pa: pointer as u64,
            bytes,
        })
    }

    fn write(&self, word: u64, value: u64) {
        assert!(word * 8 < self.bytes, "SMMU memory index out of range");
        // SAFETY: inside the allocation (checked), 8-byte aligned, owned by this driver; the
        // SMMU only reads it.
        unsafe { ((self.pa + word * 8) as *mut u64).write_volatile(value) };
    }

    fn read(&self, word: u64) -> u64 {
        assert!(word * 8 < self.bytes, "SMMU memory index out of range");
        // SAFETY: inside the allocation (checked), 8-byte aligned; the SMMU may write it
        // concurrently, hence volatile.
        unsafe { ((self.pa + word * 8) as *const u64).read_volatile() }
    }
}

/// The SMMU's register block, shareable between CPUs.
#[derive(Clone, Copy)]
struct Registers(&'static Smmuv3Registers);

// SAFETY: the block is MMIO: every access is one volatile load or store of a register, which
// any CPU may do. Which CPU may write what is decided by the driver: writes happen with
// `SMMU`'s lock held (or before it exists, at boot); the lock-free path only reads EVENTQ_PROD.
unsafe impl Sync for Registers {}
// SAFETY: as above; the reference is to MMIO that stays mapped for the machine's lifetime.
unsafe impl Send for Registers {}

impl core::ops::Deref for Registers {
    type Target = Smmuv3Registers;
    fn deref(&self) -> &Smmuv3Registers {
        self.0
    }
}

/// The driver's state, behind [`SMMU`]'s lock.
struct Smmu {
    registers: Registers,
    /// IDR0.COHACC: the SMMU snoops the CPU caches (else tables and queues need cleaning).
    coherent: bool,
    stream_table: DeviceMemory,
    command_queue: DeviceMemory,
    commands: QueueIndex,
    /// Our copy of CMDQ_PROD.
    command_prod: u32,
    event_queue: DeviceMemory,
    events: QueueIndex,
    /// Our copy of EVENTQ_CONS (with OVACKFLG).
    event_cons: u32,
    /// A global error said event-queue writes were aborted; the next drain records the loss
    /// (a command submission that notices it has no audit log at hand).
    events_lost: bool,
    devices: Vec<AssignedDevice>,
}

/// The SMMUv3 driver, owned by the VM: the locked driver state, and what the lock-free fast
/// path of [`Iommu::drain_events`] reads.
pub struct SmmuV3 {
    /// The register block, for the lock-free check of EVENTQ_PROD.
    registers: Registers,
    /// EVENTQ_CONS as last written (with OVACKFLG): equal to EVENTQ_PROD when nothing is new.
    event_cons: AtomicU32,
    /// Whether some device is in strict mode (FEATURES).
    any_strict: bool,
    /// The devices that may do DMA (not blocked), as DMA_MAP looks them up: fixed at boot, so
    /// read without the lock.
    dma_devices: Vec<DmaDevice>,
    /// A command submission saw event-queue writes aborted: the next drain must run (and
    /// record the loss) even if no event is new.
    loss_pending: AtomicBool,
    /// Everything else, one CPU at a time.
    state: spin::Mutex<Smmu>,
}

/// What the SMMU needs to know of the guest's stage 2: shared devices walk it, strict devices'
/// own tables take its shape.
pub struct GuestStage2Config {
    /// Stage 2 uses FEAT_S2FWB encodings.
    pub fwb: bool,
    /// VTCR_EL2.
    pub vtcr: u64,
    /// VTTBR_EL2 (VMID and root).
    pub vttbr: u64,
    /// The shape of stage 2.
    pub geometry: Geometry,
}

/// Maps the register block at `base`.
///
/// # Safety
/// `base` must be the SMMU's register block from the device tree, mapped as Device memory at
/// EL2 (identity) for at least 128 KiB, and driven by nothing else.
unsafe fn registers_at(base: u64) -> Registers {
    // SAFETY: per the contract above; the block is never unmapped.
    Registers(unsafe { &*(base as *const Smmuv3Registers) })
}

/// Counter ticks in `millis` milliseconds.
fn ticks(millis: u64) -> u64 {
    CNTFRQ_EL0.get() * millis / 1000
}

/// Polls `done` for up to 100 ms of counter time.
fn wait_for(what: &'static str, mut done: impl FnMut() -> bool) -> Result<(), SmmuError> {
    let deadline = CNTPCT_EL0.get() + ticks(100);
    while !done() {
        if CNTPCT_EL0.get() > deadline {
            return Err(SmmuError::Timeout(what));
        }
        core::hint::spin_loop();
    }
    Ok(())
}

/// Brings the SMMU up and assigns every PCI function behind it. Call once, from
/// [`crate::vm::build`], after the guest's stage 2 exists and before the guest runs. `None`
/// when the board has no SMMU. On error it stops the machine with one line: without a working
/// SMMU, DMA is not contained.
pub fn init(
    board: &Board,
    config: &Config,
    vm: &GuestStage2Config,
    attributes: &mut AttributeManager,
) -> Option<SmmuV3> {
    let Some(region) = board.smmu else {
        log::warn!(
            "no SMMUv3 in the device tree: DMA cannot be contained, so the guest gets no PCIe \
             and the DMA calls answer NO_DEVICE"
        );
        return None;
    };
    match try_init(region.base, board, config, vm, attributes) {
        Ok(smmu) => Some(smmu),
        Err(error) => crate::exit::fatal(format_args!("{error}")),
    }
}

fn try_init(
    base: u64,
    board: &Board,
    config: &Config,
    vm: &GuestStage2Config,
    attributes: &mut AttributeManager,
) -> Result<SmmuV3, SmmuError> {
    // SAFETY: `board.smmu` is the SMMU's register block, which `mmu::extend` mapped as Device;
    // only this driver touches it.
    let registers = unsafe { registers_at(base) };
    let idr0 = registers.idr0.extract();
    let idr1 = registers.idr1.extract();
    let idr5 = registers.idr5.extract();
    if !idr0.is_set(IDR0::S2P) {
        return Err(SmmuError::Unsupported("stage 2 translation"));
    }
    if !matches!(idr0.read(IDR0::TTF), 2 | 3) {
        return Err(SmmuError::Unsupported("AArch64 translation tables"));
    }
    if !idr5.is_set(IDR5::GRAN4K) {
        return Err(SmmuError::Unsupported("the 4 KiB granule"));
    }
    // `smmu-coherent=off` takes the non-coherent path on an SMMU that snoops (QEMU's), so that
    // every clean below runs and is tested end to end.
    let coherent = idr0.is_set(IDR0::COHACC) && !config.smmu_noncoherent;
    if config.smmu_noncoherent && idr0.is_set(IDR0::COHACC) {
        log::info!("SMMU: treated as non-coherent (smmu-coherent=off)");
    }
    let sid_bits = idr1.read(IDR1::SIDSIZE);
    let fwb = vm.fwb && registers.idr3.is_set(IDR3::FWB);
    if vm.fwb && !fwb {
        // QEMU ignores stage-2 memory attributes for DMA; hardware would read FWB encodings
        // the classic way.
        log::warn!("SMMU: no STE.S2FWB: devices may see other memory types than the CPU");
    }

    // Traffic without an STE aborts from now on, even before SMMUEN.
    if registers.cr0.is_set(CR0::SMMUEN) {
        registers.cr0.set(0);
        wait_for("CR0ACK (disable)", || registers.cr0ack.get() == 0)?;
    }
    registers.gbpa.write(GBPA::ABORT::SET + GBPA::UPDATE::SET);
    wait_for("GBPA.UPDATE", || !registers.gbpa.is_set(GBPA::UPDATE))?;

    let devices = discover(board, config, vm, fwb, sid_bits)?;
    let max_sid = devices.iter().map(|d| d.stream_id).max().unwrap_or(0);
    let table_log2 = smmuv3::linear_table_log2(max_sid, MIN_STREAM_TABLE_LOG2, sid_bits)
        .ok_or(SmmuError::StreamIdTooLarge(max_sid))?;
    let stream_table = DeviceMemory::new((1u64 << table_log2) * smmuv3::STE_BYTES)?;
    let commands = QueueIndex::new(COMMAND_QUEUE_LOG2.min(idr1.read(IDR1::CMDQS)));
    let command_queue =
        DeviceMemory::new((commands.entries() as u64 * smmuv3::COMMAND_BYTES).max(4096))?;
    let events = QueueIndex::new(EVENT_QUEUE_LOG2.min(idr1.read(IDR1::EVENTQS)));
    let event_queue = DeviceMemory::new((events.entries() as u64 * smmuv3::EVENT_BYTES).max(4096))?;

    // Table and queue accesses: write-back, inner shareable when the SMMU is coherent.
    registers.cr1.write(if coherent {
        CR1::TABLE_IC::WriteBack
            + CR1::TABLE_OC::WriteBack
            + CR1::TABLE_SH::Inner
            + CR1::QUEUE_IC::WriteBack
            + CR1::QUEUE_OC::WriteBack
            + CR1::QUEUE_SH::Inner
    } else {
        CR1::TABLE_IC::NonCacheable
            + CR1::TABLE_OC::NonCacheable
            + CR1::TABLE_SH::Outer
            + CR1::QUEUE_IC::NonCacheable
            + CR1::QUEUE_OC::NonCacheable
            + CR1::QUEUE_SH::Outer
    });
    // Record StreamIDs beyond the table; ignore the CPUs' broadcast TLBIs (we send our own).
    registers.cr2.write(CR2::RECINVSID::SET + CR2::PTM::SET);
    registers
        .strtab_base
        .set(smmuv3::strtab_base(stream_table.pa));
    registers
        .strtab_base_cfg
        .set(smmuv3::strtab_base_cfg_linear(table_log2));
    registers
        .cmdq_base
        .set(smmuv3::queue_base(command_queue.pa, commands.log2()));
    registers.cmdq_prod.set(0);
    registers.cmdq_cons.set(0);
    registers
        .evtq_base
        .set(smmuv3::queue_base(event_queue.pa, events.log2()));
    registers.evtq_prod.set(0);
    registers.evtq_cons.set(0);
    // Polling only: the GIC is the guest's.
    registers.irq_ctrl.set(0);

    let mut smmu = Smmu {
        registers,
        coherent,
        stream_table,
        command_queue,
        commands,
        command_prod: 0,
        event_queue,
        events,
        event_cons: 0,
        events_lost: false,
        devices,
    };
    if !coherent {
        // The SMMU reads memory, not the caches: the zeroed stream table (invalid STEs) and
        // command queue go out to memory, and the event queue leaves no line the CPU could
        // write back over a record the SMMU wrote.
        arch::clean_range(smmu.stream_table.pa, smmu.stream_table.bytes);
        arch::clean_range(smmu.command_queue.pa, smmu.command_queue.bytes);
        arch::clean_invalidate_range(smmu.event_queue.pa, smmu.event_queue.bytes);
        // The tables the STEs will point at: strict devices' own (empty) ones, and the guest's
        // stage 2, from now on cleaned entry by entry whenever an attribute change edits it.
        let mut cpu = Cpu::new();
        for device in &smmu.devices {
            if let Some(table) = &device.stage2 {
                noncoherent::clean_all_tables(table.table(), &HeapTables, &mut cpu);
            }
        }
        if smmu.devices.iter().any(|d| d.mode == DmaMode::Shared) {
            attributes.set_noncoherent_walker(&HeapTables, &mut cpu);
        }
    }
    // Every entry before the SMMU may read one.
    for index in 0..smmu.devices.len() {
        let sid = smmu.devices[index].stream_id;
        let ste = smmu.ste_of(&smmu.devices[index], vm, fwb);
        smmu.write_ste(sid, &ste);
    }
    arch::dsb_sy();

    registers.cr0.write(CR0::CMDQEN::SET);
    wait_for("CR0ACK (command queue)", || {
        registers.cr0ack.is_set(CR0::CMDQEN)
    })?;
    smmu.submit([Command::cfgi_all(), Command::tlbi_nsnh_all()])?;
    registers.cr0.write(CR0::CMDQEN::SET + CR0::EVTQEN::SET);
    wait_for("CR0ACK (event queue)", || {
        registers.cr0ack.is_set(CR0::EVTQEN)
    })?;
    registers
        .cr0
        .write(CR0::CMDQEN::SET + CR0::EVTQEN::SET + CR0::SMMUEN::SET);
    wait_for("CR0ACK (SMMU enable)", || {
        registers.cr0ack.is_set(CR0::SMMUEN)
    })?;

    for device in &smmu.devices {
        log::info!(
            "SMMU: {} {:04x}:{:04x} StreamID {:#x}: {:?}{}, VMID {}",
            device.bdf,
            device.id.0,
            device.id.1,
            device.stream_id,
            device.mode,
            if device.coherent {
                ""
            } else {
                ", non-coherent"
            },
            device.vmid
        );
    }
    log::info!(
        "SMMU at {base:#x} enabled: {} StreamIDs, {}-entry command queue, {}-entry event queue, {}coherent",
        1u32 << table_log2,
        smmu.commands.entries(),
        smmu.events.entries(),
        if coherent { "" } else { "non-" }
    );
    Ok(SmmuV3 {
        registers,
        event_cons: AtomicU32::new(smmu.event_cons),
        any_strict: smmu.devices.iter().any(|d| d.mode == DmaMode::Strict),
        dma_devices: smmu
            .devices
            .iter()
            .filter(|d| d.mode != DmaMode::Blocked)
            .map(|d| DmaDevice {
                stream_id: d.stream_id,
                strict: d.mode == DmaMode::Strict,
                coherent: d.coherent,
            })
            .collect(),
        loss_pending: AtomicBool::new(false),
        state: spin::Mutex::new(smmu),
    })
}

/// Scans PCI configuration space and decides each function's mode.
fn discover(
    board: &Board,
    config: &Config,
    vm: &GuestStage2Config,
    fwb: bool,
    sid_bits: u32,
) -> Result<Vec<AssignedDevice>, SmmuError> {
    let Some(pcie) = &board.pcie else {
        return Ok(Vec::new());
    };
    let functions = pci::scan(pcie.bus_start, pcie.bus_end, |bdf, offset| {
        read_config(pcie.ecam.base, pcie.ecam.size, pcie.bus_start, bdf, offset)
    });
    for rule in config.devices.iter() {
        if !functions.iter().any(|f| f.bdf.rid() == rule.rid) {
            log::warn!(
                "config: devices names {}, which is not present",
                Bdf::from_rid(rule.rid)
            );
        }
    }
    let mut devices = Vec::new();
    let mut next_vmid = FIRST_STRICT_VMID;
    let vmid = (vm.vttbr >> 48) as u16;
    for function in &functions {
        let Function {
            bdf,
            vendor,
            device,
            ..
        } = *function;
        let Some(stream_id) = pci::stream_id(&pcie.iommu_map, bdf.rid()) else {
            log::warn!("PCI {bdf} is not behind the SMMU: its DMA is NOT contained");
            continue;
        };
        if sid_bits < 32 && stream_id >> sid_bits != 0 {
            return Err(SmmuError::StreamIdTooLarge(stream_id));
        }
        let policy = config.device_policy(bdf.rid());
        let (vmid, stage2) = match policy.mode {
            DmaMode::Strict => {
                // The guest's geometry: the STE takes the same VTCR fields.
                let table = DeviceTable::new(
                    &mut HeapTables,
                    Stage2 { fwb },
                    vm.geometry.start_level,
                    vm.geometry.ipa_bits,
                )
                .map_err(SmmuError::Stage2)?;
                next_vmid += 1;
                (next_vmid - 1, Some(table))
            }
            DmaMode::Shared | DmaMode::Blocked => (vmid, None),
        };
        devices.push(AssignedDevice {
            bdf,
            id: (vendor, device),
            stream_id,
            mode: policy.mode,
            coherent: policy.coherent,
            vmid,
            stage2,
        });
    }
    Ok(devices)
}

/// Reads a 32-bit configuration register through ECAM.
fn read_config(ecam: u64, ecam_size: u64, bus_start: u8, bdf: Bdf, offset: u16) -> u32 {
    let Some(function) = bdf
        .ecam_offset(bus_start)
        .filter(|&o| o + 4096 <= ecam_size)
    else {
        return u32::MAX;
    };
    // SAFETY: inside the ECAM region from the device tree, which `mmu::extend` mapped as
    // Device; a configuration read has no side effect, and `offset` is 4-byte aligned.
    unsafe { arch::mmio_read(ecam + function + (offset as u64 & 0xffc), 4) as u32 }
}

impl Smmu {
    /// The STE a device gets.
    fn ste_of(&self, device: &AssignedDevice, vm: &GuestStage2Config, fwb: bool) -> Ste {
        let oas = self.registers.idr5.read(IDR5::OAS) as u64;
        let vtcr = smmuv3::cap_output_size(vm.vtcr, oas);
        match (&device.mode, &device.stage2) {
            (DmaMode::Blocked, _) => Ste::abort(),
            (DmaMode::Strict, Some(table)) => Ste::stage2(&Stage2Config {
                vmid: device.vmid,
                vtcr,
                root: table.table().root(),
                fwb,
            }),
            // Shared: the guest's own tables (one root, which QEMU walks correctly).
            _ => Ste::stage2(&Stage2Config {
                vmid: device.vmid,
                vtcr,
                root: vm.vttbr & 0x0000_ffff_ffff_fffe,
                fwb,
            }),
        }
    }

    /// Writes an STE: every word but the first, a barrier, then the first (V and Config).
    /// The caller invalidates the SMMU's cached copy (CFGI_STE + CMD_SYNC) if it was live.
    fn write_ste(&mut self, stream_id: u32, ste: &Ste) {
        let first_word = stream_id as u64 * smmuv3::STE_BYTES / 8;
        for (step, &word) in Ste::WRITE_ORDER.iter().enumerate() {
            if step == Ste::WRITE_ORDER.len() - 1 {
                arch::dsb_sy();
            }
            self.stream_table
                .write(first_word + word as u64, ste.0[word]);
        }
        if !self.coherent {
            arch::clean_range(self.stream_table.pa + first_word * 8, smmuv3::STE_BYTES);
        }
    }

    /// Queues `commands` and a CMD_SYNC, and waits until the SMMU has consumed the CMD_SYNC,
    /// which it does only once every earlier command has completed. One read of CMDQ_CONS
    /// before the batch (another only when the queue looks full), one write of CMDQ_PROD for
    /// the whole batch, then CMDQ_CONS polled: when it already equals PROD (an SMMU that was
    /// quick, QEMU's always) the batch succeeded, since the SMMU stops at an erroneous command
    /// and CONS cannot pass it; otherwise the bounded wait, which also watches GERROR.
    fn submit(&mut self, commands: impl IntoIterator<Item = Command>) -> Result<(), SmmuError> {
        let mut cons = self.registers.cmdq_cons.get();
        for command in commands {
            self.queue(command, &mut cons)?;
        }
        self.sync(&mut cons)
    }

    /// Writes `command` into the next slot of the command queue (not yet published), waiting
    /// for room when it looks full; `cons` is CMDQ_CONS as last read. A plain loop over
    /// commands calls it, so that queuing one costs a few instructions (an iterator chain of
    /// the commands and the CMD_SYNC cost dozens on the unmap path).
    #[inline(always)]
    fn queue(&mut self, command: Command, cons: &mut u32) -> Result<(), SmmuError> {
        let registers = self.registers;
        let queue = self.commands;
        if queue.is_full(self.command_prod, *cons) {
            // Room for one more: wait for the SMMU to consume.
            let prod = self.command_prod;
            wait_for("command queue space", || {
                *cons = registers.cmdq_cons.get();
                !queue.is_full(prod, *cons)
            })?;
        }
        let word = queue.slot(self.command_prod) as u64 * 2;
        self.command_queue.write(word, command.0[0]);
        self.command_queue.write(word + 1, command.0[1]);
        if !self.coherent {
            arch::clean_range(self.command_queue.pa + word * 8, smmuv3::COMMAND_BYTES);
        }
        self.command_prod = queue.next(self.command_prod);
        Ok(())
    }

    /// The end of a [`Self::submit`]: queues the CMD_SYNC, publishes the batch and waits for
    /// the SMMU to consume it.
    #[inline(always)]
    fn sync(&mut self, cons: &mut u32) -> Result<(), SmmuError> {
        self.queue(Command::sync(), cons)?;
        let registers = self.registers;
        let queue = self.commands;
        // The commands must be in memory before the SMMU reads PROD.
        arch::dsb_sy();
        registers.cmdq_prod.set(self.command_prod);
        let prod = self.command_prod;
        if !queue.is_empty(prod, registers.cmdq_cons.get()) {
            let outcome = wait_for("CMD_SYNC", || {
                let cons = registers.cmdq_cons.get();
                queue.is_empty(prod, cons) || self.global_errors() & smmuv3::GERROR_CMDQ_ERR != 0
            });
            if self.global_errors() & smmuv3::GERROR_CMDQ_ERR != 0 {
                let error = CommandError::from_code(registers.cmdq_cons.read(CMDQ_CONS::ERR) as u8);
                self.handle_global_errors();
                return Err(SmmuError::Command(error));
            }
            outcome?;
        }
        // The CMD_SYNC was seen complete: what the caller does next (the CPU-side invalidate
        // and the unpin of an unmap, I4) must not be performed before that read.
        arch::dsb_sy();
        Ok(())
    }

    fn global_errors(&self) -> u32 {
        smmuv3::active_global_errors(self.registers.gerror.get(), self.registers.gerrorn.get())
    }

    /// Logs and acknowledges active global errors. A command error replaces the failing command
    /// by a CMD_SYNC (the SMMU re-reads the slot at CONS once the error is acknowledged, so the
    /// queue runs again); an aborted event-queue write means events were lost, which the next
    /// drain audits as such.
    fn handle_global_errors(&mut self) {
        let active = self.global_errors();
        if active == 0 {
            return;
        }
        log::error!("SMMU global error: {}", GlobalErrors(active));
        if active & smmuv3::GERROR_CMDQ_ERR != 0 {
            let slot = self.commands.slot(self.registers.cmdq_cons.get()) as u64 * 2;
            let sync = Command::sync();
            self.command_queue.write(slot, sync.0[0]);
            self.command_queue.write(slot + 1, sync.0[1]);
            if !self.coherent {
                arch::clean_range(self.command_queue.pa + slot * 8, smmuv3::COMMAND_BYTES);
            }
            arch::dsb_sy();
        }
        if active & smmuv3::GERROR_EVENTQ_ABT_ERR != 0 {
            self.events_lost = true;
        }
        let gerrorn = self.registers.gerrorn.get();
        self.registers.gerrorn.set(gerrorn ^ active);
    }

    /// Reads every new event record, collapses floods, audits each group, then frees the
    /// slots and acknowledges an overflow.
    fn drain_locked(&mut self, vcpu: usize, audit: &impl AuditSink, event_cons: &AtomicU32) {
        let registers = self.registers;
        let queue = self.events;
        let mut collector = FaultCollector::<OPEN_FAULT_GROUPS>::new();
        let mut seen: u64 = 0;
        // A flood still being written could keep the loop going: stop after two queues' worth
        // (the next entry drains the rest).
        let budget = 2 * queue.entries() as u64;
        while seen < budget {
            let prod = registers.evtq_prod.get();
            if queue.is_empty(prod, self.event_cons) {
                if smmuv3::event_queue_overflowed(prod, self.event_cons) {
                    audit_lost_events(vcpu, audit);
                    self.event_cons ^= smmuv3::EVENTQ_OVERFLOW_FLAG;
                    registers.evtq_cons.set(self.event_cons);
                }
                break;
            }
            // Records are in memory before PROD says so; read them after reading PROD.
            arch::dsb_sy();
            while !queue.is_empty(prod, self.event_cons) {
                let word = queue.slot(self.event_cons) as u64 * 4;
                if !self.coherent {
                    arch::invalidate_range(self.event_queue.pa + word * 8, smmuv3::EVENT_BYTES);
                }
                let record = [0, 1, 2, 3].map(|i| self.event_queue.read(word + i));
                let event = SmmuEvent::decode(record);
                if let Some(group) = collector.add(&event) {
                    audit_fault(vcpu, audit, &group);
                }
                seen += 1;
                let overflow = self.event_cons & smmuv3::EVENTQ_OVERFLOW_FLAG;
                self.event_cons = queue.next(self.event_cons) | overflow;
            }
            // Every read done before the slots are handed back.
            arch::dsb_sy();
            registers.evtq_cons.set(self.event_cons);
        }
        collector.finish(|group| audit_fault(vcpu, audit, &group));
        event_cons.store(self.event_cons, Ordering::Release);
        self.handle_global_errors();
        if core::mem::take(&mut self.events_lost) {
            audit_lost_events(vcpu, audit);
        }
        if seen > 0 {
            log::debug!("SMMU: drained {seen} event(s)");
        }
    }
}

/// Audits one collapsed group of fault events, on `vcpu`'s time.
fn audit_fault(vcpu: usize, audit: &impl AuditSink, group: &FaultGroup) {
    let kind = group.kind.name().unwrap_or("other");
    log::warn!(
        "SMMU fault: StreamID {:#x} {} {} at {:#x}: {} event(s)",
        group.stream_id,
        if group.write { "write" } else { "read" },
        kind,
        group.page.unwrap_or(0),
        group.count
    );
    audit.record(
        vcpu,
        &Event::SmmuFault {
            stream_id: group.stream_id,
            ipa: group.page.unwrap_or(0),
            access: if group.write {
                Access::Write
            } else {
                Access::Read
            },
            event: group.kind.0,
            stage2: group.page.is_some(),
        },
    );
}

/// StreamID of the records that stand for lost events (no device is known). Stopgap until the
/// audit record has a "lost" form of its own.
pub const LOST_EVENTS_STREAM_ID: u32 = u32::MAX;

/// Audits that SMMU events were lost (queue overflow or aborted queue writes): at least one
/// fault happened whose details are gone.
fn audit_lost_events(vcpu: usize, audit: &impl AuditSink) {
    log::error!("SMMU: fault events were lost (event queue overflow)");
    audit.record(
        vcpu,
        &Event::SmmuFault {
            stream_id: LOST_EVENTS_STREAM_ID,
            ipa: 0,
            access: Access::Read,
            event: 0,
            stage2: false,
        },
    );
}

/// Submits the TLB invalidation of each run `(ipa, size)` for `vmid`
/// (`smmuv3::tlb_invalidation_commands`, which host tests pin down) with [`Smmu::submit`]'s one
/// CMD_SYNC, queuing the commands as they are made (no vector), and returns what the audit
/// record counts, the CMD_SYNC included. (Nothing is counted on failure: the callers report
/// no commands then.)
fn invalidate(smmu: &mut Smmu, vmid: u16, runs: &[(Ipa, u64)]) -> Result<Issued, SmmuError> {
    let mut issued = Issued {
        count: 1,
        kinds: stagehand_abi::audit::smmu_command::SYNC,
    };
    let mut cons = smmu.registers.cmdq_cons.get();
    for &(ipa, size) in runs {
        for command in smmuv3::tlb_invalidation_commands(vmid, ipa.get(), size) {
            issued.count += 1;
            issued.kinds |= smmuv3::command_kinds(core::slice::from_ref(&command));
            smmu.queue(command, &mut cons)?;
        }
    }
    smmu.sync(&mut cons)?;
    Ok(issued)
}

impl SmmuV3 {
    /// After a command submission: a loss its global-error handling saw wakes the next drain.
    fn note_loss(&self, smmu: &Smmu) {
        if smmu.events_lost {
            self.loss_pending.store(true, Ordering::Release);
        }
    }

    fn vmid_of(smmu: &Smmu, stream_id: u32) -> Result<u16, IommuError> {
        smmu.devices
            .iter()
            .find(|d| d.stream_id == stream_id)
            .map(|d| d.vmid)
            .ok_or(IommuError::NoDevice)
    }
}

impl Iommu for SmmuV3 {
    /// [`feature::SMMU`], and [`feature::DMA_STRICT`] when some device is in strict mode.
    fn features(&self) -> u64 {
        if self.any_strict {
            feature::SMMU | feature::DMA_STRICT
        } else {
            feature::SMMU
        }
    }

    /// Device `index` in BDF order: StreamID, BDF as the ABI packs it (segment 0), mode and
    /// coherence.
    fn device_info(&self, index: usize) -> Option<DeviceInfo> {
        let smmu = self.state.lock();
        smmu.devices.get(index).map(|d| DeviceInfo {
            stream_id: d.stream_id,
            requester_id: d.bdf.rid(),
            mode: d.mode,
            coherent: d.coherent,
        })
    }

    fn dma_device(&self, stream_id: u32) -> Option<DmaDevice> {
        self.dma_devices
            .iter()
            .find(|d| d.stream_id == stream_id)
            .copied()
    }

    /// Writes rights changes into a strict device's stage 2, page by page: a page without
    /// rights before is mapped, one without rights after is unmapped, any other is rewritten in
    /// place (no break: the output address and attribute stay, so a device DMA in flight to the
    /// page's other buffers goes on).
    fn apply_rights(&self, stream_id: u32, updates: &[RightsUpdate]) -> Result<(), IommuError> {
        if updates.is_empty() {
            return Ok(());
        }
        let mut smmu = self.state.lock();
        let coherent = smmu.coherent;
        let device = smmu
            .devices
            .iter_mut()
            .find(|d| d.stream_id == stream_id)
            .ok_or(IommuError::NoDevice)?;
        let table = device.stage2.as_mut().ok_or(IommuError::NoDevice)?;
        let mut heap = HeapTables;
        // The SMMU walks write-back tables when it is coherent (CR1): a DSB makes the entries
        // visible; otherwise every line written is cleaned to the point of coherency first (the
        // tracking that finds those lines copies each table it writes, so only then).
        if coherent {
            let written = write_rights(table, &mut heap, stream_id, updates);
            arch::dsb_ish();
            written
        } else {
            let mut cleaning = CleaningTables::new(&mut heap);
            let written = write_rights(table, &mut cleaning, stream_id, updates);
            cleaning.clean(&mut Cpu::new());
            written
        }
    }

    fn invalidate_strict(&self, stream_id: u32, runs: &[(Ipa, u64)]) -> Result<Issued, IommuError> {
        if runs.is_empty() {
            return Ok(Issued::default());
        }
        let mut smmu = self.state.lock();
        let vmid = Self::vmid_of(&smmu, stream_id)?;
        let submitted = invalidate(&mut smmu, vmid, runs);
        self.note_loss(&smmu);
        submitted.map_err(|error| {
            log::error!("SMMU: TLB invalidation failed: {error}");
            IommuError::NotConfirmed
        })
    }

    fn invalidate_shared(&self, ipa: Ipa, size: u64) -> Issued {
        let mut smmu = self.state.lock();
        let Some(vmid) = smmu
            .devices
            .iter()
            .find(|d| d.mode == DmaMode::Shared)
            .map(|d| d.vmid)
        else {
            return Issued::default();
        };
        let submitted = invalidate(&mut smmu, vmid, &[(ipa, size)]);
        self.note_loss(&smmu);
        match submitted {
            Ok(issued) => issued,
            Err(error) => {
                // A device could still use a stale translation: say so loudly.
                log::error!("SMMU: TLB invalidation for shared devices failed: {error}");
                Issued::default()
            }
        }
    }

    /// When nothing is new it costs one MMIO read (EVENTQ_PROD, compared with the cached CONS)
    /// and takes no lock; when another CPU is draining, it returns and leaves the work to that
    /// CPU.
    fn drain_events(&self, vcpu: usize, audit: &impl AuditSink) {
        if self.registers.evtq_prod.get() == self.event_cons.load(Ordering::Acquire)
            && !self.loss_pending.load(Ordering::Acquire)
        {
            return;
        }
        if let Some(mut smmu) = self.state.try_lock() {
            self.loss_pending.store(false, Ordering::Release);
            smmu.drain_locked(vcpu, audit, &self.event_cons);
        }
    }
}

/// Writes each page of `updates` into a strict device's stage 2: mapped, unmapped, or its
/// rights rewritten in place.
fn write_rights(
    table: &mut DeviceTable<Stage2>,
    memory: &mut impl TableMemory,
    stream_id: u32,
    updates: &[RightsUpdate],
) -> Result<(), IommuError> {
    for update in updates {
        let mut offset = 0;
        while offset < update.size {
            let (ipa, pa) = (update.ipa.get() + offset, update.pa.get() + offset);
            let result = match (update.before, update.after) {
                (_, None) => table.unmap_page(memory, ipa),
                (None, Some(rights)) => table.map_page(memory, ipa, pa, update.memory, rights),
                (Some(_), Some(rights)) => table.set_page(memory, ipa, update.memory, rights),
            };
            if let Err(error) = result {
                log::error!("SMMU: rights of {ipa:#x} for StreamID {stream_id:#x}: {error:?}");
                return Err(match error {
                    MapError::OutOfTableMemory => IommuError::NoMemory,
                    _ => IommuError::NotConfirmed,
                });
            }
            offset += PAGE_SIZE;
        }
    }
    Ok(())
}
