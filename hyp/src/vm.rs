//! The one VM: building it (guest RAM layout, stage 2, images through fw_cfg, the guest's
//! device tree, the SMMU) and entering it on each CPU. What the calls act on is the portable
//! [`hyp_core::hypercall::Vm`] inside; this adds what only the aarch64 layer uses (register
//! values, the GIC). It is the one global the hardware entry needs: a trap
//! finds it once and passes it down.

use crate::arch;
use crate::arch::entry::{MAX_CPUS, STACK_SIZE};
use crate::arch::mmu::HeapTables;
use crate::arch::sysreg::{
    CPTR_EL2, CPTR_EL2_RES1, HCRX_EL2, HSTR_EL2, ID_AA64ISAR2_EL1, ID_AA64MMFR3_EL1, PMCR_EL0,
    SCTLR_EL1_RES1, SMCR_EL2, VPIDR_EL2, ZCR_EL2,
};
use crate::arch::vectors::{enter_guest, TrapFrame};
use crate::audit::HypAudit;
use crate::fw_cfg::{FwCfg, FwCfgError};
use crate::gic::InterruptController;
use crate::guest_memory;
use crate::smmu::{GuestStage2Config, SmmuV3};
use crate::{console, exit, QEMU_DTB};
use aarch64_cpu::registers::{
    Readable, Writeable, CNTHCTL_EL2, CNTVOFF_EL2, HAFGRTR_EL2, HCR_EL2, HDFGRTR_EL2, HDFGWTR_EL2,
    HFGITR_EL2, HFGRTR_EL2, HFGWTR_EL2, ID_AA64DFR0_EL1, ID_AA64ISAR1_EL1, ID_AA64MMFR0_EL1,
    ID_AA64MMFR1_EL1, ID_AA64MMFR2_EL1, ID_AA64PFR0_EL1, ID_AA64PFR1_EL1, MDCR_EL2, MIDR_EL1,
    MPIDR_EL1, SCTLR_EL1, SPSR_EL2, TPIDR_EL2, VMPIDR_EL2, VTCR_EL2, VTTBR_EL2,
};
use alloc::boxed::Box;
use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;
use core::fmt;
use core::sync::atomic::Ordering;
use hyp_core::alias::AliasPlace;
use hyp_core::attributes::AttributeManager;
use hyp_core::audit;
use hyp_core::config::{self, Config};
use hyp_core::geometry::{Geometry, UnsupportedPaRange};
use hyp_core::hypercall::GuestStage2;
use hyp_core::image;
use hyp_core::layout::{self, GuestRam};
use hyp_core::pagetable::{MapError, PAGE_SIZE};
use hyp_core::psci::PowerStates;
use hyp_core::traps::{self, IdRegisters};
use stagehand_platform::board::{Board, Region};
use stagehand_platform::fw_cfg::key;
use stagehand_platform::guest_dt::{guest_device_tree, GuestDtConfig};

/// VMID of the one guest.
const VMID: u64 = 1;

/// The portable VM as this hypervisor instantiates it: tables on the heap, the SMMUv3 if the
/// board has one, the hypervisor's audit log.
pub type CoreVm = hyp_core::hypercall::Vm<HeapTables, Option<SmmuV3>, HypAudit>;

/// Everything the traps need to know about the VM.
pub struct Vm {
    /// What the calls act on: stage 2 and its ledger, DMA mappings, the IOMMU, the audit log,
    /// power states.
    pub core: CoreVm,
    /// HCR_EL2 while the guest runs.
    pub hcr: u64,
    /// VTCR_EL2.
    pub vtcr: u64,
    /// VTTBR_EL2 (VMID and stage-2 root).
    pub vttbr: u64,
    /// The interrupt controller (GICv2 or GICv3), as the hypervisor uses it.
    pub gic: Box<dyn InterruptController>,
}

static VM: spin::Once<Vm> = spin::Once::new();

/// The VM (after [`build`]).
pub fn vm() -> &'static Vm {
    match VM.get() {
        Some(vm) => vm,
        None => exit::fatal(format_args!("VM used before it was built")),
    }
}

/// Why the VM could not be built: one clear line each.
#[derive(Debug)]
pub enum BuildError {
    /// A device the hypervisor needs is missing from the device tree.
    Missing(&'static str),
    /// fw_cfg failed.
    FwCfg(FwCfgError),
    /// The configuration item is malformed.
    Config(config::ConfigError),
    /// RAM cannot be laid out.
    Layout(layout::LayoutError),
    /// QEMU was started without `-kernel`.
    NoKernel,
    /// The guest image is malformed.
    Image(image::ImageError),
    /// The guest's device tree could not be made.
    DeviceTree(stagehand_platform::board::DtError),
    /// Stage 2 could not be built.
    Stage2(MapError),
    /// Guest RAM could not be reached through the hypervisor's alias.
    GuestMemory(stagehand_abi::Status),
    /// More CPUs than the hypervisor has stacks for.
    TooManyCpus(usize),
    /// The CPU's physical address size is not one stage 2 supports.
    Geometry(UnsupportedPaRange),
    /// Guest RAM does not fit the IPA space this CPU allows (bits).
    RamBeyondIpaSpace(u32),
}

impl fmt::Display for BuildError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BuildError::Missing(what) => write!(f, "the device tree has no {what}"),
            BuildError::FwCfg(e) => write!(f, "{e}"),
            BuildError::Config(e) => write!(f, "configuration ({}): {e}", config::FW_CFG_NAME),
            BuildError::Layout(e) => write!(f, "{e}"),
            BuildError::NoKernel => write!(f, "no guest to run: start QEMU with -kernel"),
            BuildError::Image(e) => write!(f, "guest image: {e}"),
            BuildError::DeviceTree(e) => write!(f, "guest device tree: {e}"),
            BuildError::Stage2(e) => write!(f, "stage 2: {e}"),
            BuildError::GuestMemory(status) => {
                write!(f, "guest RAM access refused: {}", status.name())
            }
            BuildError::Geometry(e) => write!(f, "{e}"),
            BuildError::RamBeyondIpaSpace(bits) => write!(
                f,
                "guest RAM does not fit this CPU's {bits}-bit IPA space: give QEMU less -m"
            ),
            BuildError::TooManyCpus(n) => {
                write!(f, "{n} CPUs, but this build supports at most {MAX_CPUS}")
            }
        }
    }
}

impl From<FwCfgError> for BuildError {
    fn from(e: FwCfgError) -> Self {
        BuildError::FwCfg(e)
    }
}

/// The boot CPU's first guest entry.
pub struct BootCpu {
    vcpu: usize,
    entry: u64,
    dtb: u64,
    /// The failure the configuration asks for before the guest is entered (tests only).
    pub selftest: Option<config::SelfTest>,
}

/// Reads the configuration and images from fw_cfg, lays out guest RAM, builds stage 2 and the
/// guest device tree. `boot_cpu` is the index of this CPU's stack.
///
/// # Errors
/// A [`BuildError`], whose `Display` is the one line printed before stopping.
pub fn build(board: &Board, alias: AliasPlace) -> Result<BootCpu, BuildError> {
    let fw_cfg_region = board.fw_cfg.ok_or(BuildError::Missing("fw_cfg"))?;
    // SAFETY: the region comes from the device tree and `mmu::extend` mapped it as Device; only
    // this code drives fw_cfg.
    let fw_cfg = unsafe { FwCfg::new(fw_cfg_region.base) }?;
    let config = match fw_cfg.file(config::FW_CFG_NAME)? {
        Some(bytes) => {
            config::parse(&String::from_utf8_lossy(&bytes)).map_err(BuildError::Config)?
        }
        None => Config::default(),
    };
    console::set_level(config.log_level);
    let audit_log = HypAudit::new(config.audit, board.hypervisor_uart().is_none());
    if board.cpus.len() > MAX_CPUS {
        return Err(BuildError::TooManyCpus(board.cpus.len()));
    }

    let bank = board
        .memory
        .iter()
        .find(|bank| bank.contains(QEMU_DTB))
        .ok_or(BuildError::Missing("memory bank holding the hypervisor"))?;
    let ram =
        layout::guest_ram(bank.base, bank.size, config.ram_size).map_err(BuildError::Layout)?;
    let fwb = config.fwb && cpu_has_fwb();
    let geometry = Geometry::for_cpu(ID_AA64MMFR0_EL1.read(ID_AA64MMFR0_EL1::PARange))
        .map_err(BuildError::Geometry)?;
    if !geometry.contains(ram.ipa, ram.size) {
        return Err(BuildError::RamBeyondIpaSpace(geometry.ipa_bits));
    }

    let gic = crate::gic::from_board(board).ok_or(BuildError::Missing(
        "interrupt controller it supports (arm,gic-v3 or a GICv2)",
    ))?;
    let guest_mmio: Vec<Region> = guest_mmio(board, gic.as_ref())
        .into_iter()
        .filter(|region| {
            let reachable = geometry.contains(region.base, region.size);
            if !reachable {
                log::warn!(
                    "MMIO {region} lies beyond this CPU's {}-bit IPA space: not given to the guest",
                    geometry.ipa_bits
                );
            }
            reachable
        })
        .collect();
    let mut attributes = AttributeManager::new(&mut HeapTables, fwb, ram, &geometry, alias)
        .map_err(BuildError::Stage2)?;
    map_guest_mmio(&mut attributes, &guest_mmio, gic.as_ref()).map_err(BuildError::Stage2)?;
    // The walkers read tables through the caches (VTCR and TCR_EL2 say write-back walks), so a
    // DSB makes the entries visible; stage 2's are not live until VTTBR_EL2 is written, and the
    // alias's were invalid before (no TLB holds them), so the ISB is all this CPU needs.
    arch::dsb_ish();
    arch::isb();

    let boot_mpidr = arch::mpidr() & hyp_core::psci::MPIDR_AFFINITY_MASK;
    let boot_vcpu = board
        .cpus
        .iter()
        .position(|&m| m == boot_mpidr)
        .unwrap_or(0);
    let (entry, kernel_end) = load_kernel(&fw_cfg, &attributes)?;
    let initrd_len = fw_cfg.read_u32(key::INITRD_SIZE)? as u64;
    let placement =
        layout::place_boot_images(&ram, kernel_end, initrd_len, 0).map_err(BuildError::Layout)?;
    let initrd = (initrd_len > 0).then(|| Region::new(placement.initrd, initrd_len));
    if let Some(initrd) = initrd {
        fw_cfg.read_to(
            key::INITRD_DATA,
            0,
            guest_pa(&ram, initrd.base, initrd.size),
            initrd.size,
        )?;
        clean_for_guest(&attributes, initrd.base, initrd.size)?;
    }
    let command_line = fw_cfg.command_line()?;
    let dtb = guest_device_tree(
        crate::dtb_slice(QEMU_DTB),
        &GuestDtConfig {
            ram: Region::new(ram.ipa, ram.size),
            initrd,
            bootargs: command_line.as_deref(),
            allowed_mmio: &guest_mmio,
            abi_version: (
                stagehand_abi::ABI_MAJOR as u32,
                stagehand_abi::ABI_MINOR as u32,
            ),
        },
    )
    .map_err(BuildError::DeviceTree)?;
    if dtb.len() as u64 > layout::DTB_SLOT {
        return Err(BuildError::Layout(layout::LayoutError::ImagesDoNotFit));
    }
    guest_memory::with_mapped(
        &attributes,
        placement.dtb,
        dtb.len() as u64,
        |va, offset, len| {
            // SAFETY: the alias maps guest RAM write-back (no page is NC yet) and no guest runs.
            unsafe {
                core::ptr::copy_nonoverlapping(
                    dtb[offset as usize..].as_ptr(),
                    va as *mut u8,
                    len as usize,
                )
            };
            arch::clean_invalidate_range(va, len);
        },
    )
    .map_err(BuildError::GuestMemory)?;

    let root = attributes.root();
    let stage2 = GuestStage2Config {
        fwb,
        vtcr: geometry.vtcr(),
        vttbr: (VTTBR_EL2::VMID.val(VMID) + VTTBR_EL2::BADDR.val(root >> 1)).value,
        geometry,
    };
    // Before the guest runs, so before any device can master the bus.
    let smmu = crate::smmu::init(board, &config, &stage2, &mut attributes);
    VM.call_once(|| Vm {
        core: CoreVm::new(
            GuestStage2 {
                manager: attributes,
                tables: HeapTables,
            },
            PowerStates::new(board.cpus.clone(), boot_vcpu),
            arch::dcache_line_size(),
            config.dma_mappings,
            smmu,
            audit_log,
        ),
        hcr: hcr_value(fwb),
        vtcr: stage2.vtcr,
        vttbr: stage2.vttbr,
        gic,
    });
    let (used, total) = crate::heap::usage();
    log::info!(
        "guest: RAM IPA {:#x}+{:#x} at PA {:#x}, entry {entry:#x}, dtb {:#x} ({} bytes), initrd {}, FWB {}, heap {used}/{total}",
        ram.ipa, ram.size, ram.pa, placement.dtb, dtb.len(),
        initrd.map_or(String::from("none"), |r| format!("{r}")), fwb
    );
    Ok(BootCpu {
        vcpu: boot_vcpu,
        entry,
        dtb: placement.dtb,
        selftest: config.selftest,
    })
}

/// The MMIO the guest may touch, identity-mapped: its console UART, the RTC, the GIC's
/// guest registers, PCIe ECAM and windows.
///
/// PCIe only behind an SMMU: the guest's IPAs are not physical addresses, so without an SMMU
/// translating its devices' DMA, a device would read and write whatever physical memory the
/// guest's addresses happen to name, the hypervisor's own included (I3).
fn guest_mmio(board: &Board, gic: &dyn InterruptController) -> Vec<Region> {
    let mut regions = Vec::new();
    regions.extend(board.console_uart().map(|u| u.region));
    regions.extend(board.rtc);
    regions.extend(gic.guest_regions());
    match &board.pcie {
        Some(pcie) if board.smmu.is_some() && !pcie.iommu_map.is_empty() => {
            regions.push(pcie.ecam);
            regions.extend(pcie.windows.iter().map(|w| Region::new(w.cpu_base, w.size)));
        }
        Some(_) => log::warn!(
            "PCIe is not given to the guest: no SMMU translates its devices' DMA, which could \
             then reach any memory, the hypervisor's included"
        ),
        None => {}
    }
    regions
}

/// Identity-maps the guest's MMIO in stage 2; the GIC maps its own (see [`crate::gic`]).
fn map_guest_mmio(
    attributes: &mut AttributeManager,
    mmio: &[Region],
    gic: &dyn InterruptController,
) -> Result<(), MapError> {
    let gic_regions = gic.guest_regions();
    for region in mmio.iter().filter(|r| !gic_regions.contains(r)) {
        let start = region.base & !(PAGE_SIZE - 1);
        let end = (region.base + region.size).next_multiple_of(PAGE_SIZE);
        attributes.map_mmio(&mut HeapTables, start, end - start)?;
    }
    gic.map_for_guest(attributes)
}

/// Cleans and invalidates `[ipa, ipa + len)` to the point of coherency through the alias: the
/// guest starts with its MMU off, so its reads go to memory.
fn clean_for_guest(attributes: &AttributeManager, ipa: u64, len: u64) -> Result<(), BuildError> {
    guest_memory::with_mapped(attributes, ipa, len, |va, _, len| {
        arch::clean_invalidate_range(va, len)
    })
    .map_err(BuildError::GuestMemory)
}

/// The PA of guest `[ipa, ipa + len)`, which the caller has checked lies in guest RAM.
fn guest_pa(ram: &GuestRam, ipa: u64, len: u64) -> u64 {
    ram.pa_of(ipa, len).unwrap_or_else(|| {
        exit::fatal(format_args!("internal: {ipa:#x}+{len:#x} is not guest RAM"))
    })
}

/// Loads `-kernel` into guest RAM per its format. Returns the entry point and the end of what it
/// occupies.
fn load_kernel(fw_cfg: &FwCfg, attributes: &AttributeManager) -> Result<(u64, u64), BuildError> {
    let ram = attributes.ram();
    let size = fw_cfg.read_u32(key::KERNEL_SIZE)? as u64;
    if size == 0 {
        return Err(BuildError::NoKernel);
    }
    let prefix = fw_cfg.read_vec(key::KERNEL_DATA, size.min(64 << 10) as usize)?;
    let plan = image::plan(&prefix, size, ram.ipa, ram.size).map_err(BuildError::Image)?;
    for segment in &plan.segments {
        // DMA straight to guest RAM: fw_cfg needs no CPU mapping.
        let pa = guest_pa(ram, segment.ipa, segment.mem_size);
        fw_cfg.read_to(key::KERNEL_DATA, segment.file_offset, pa, segment.file_size)?;
        let bss = segment.mem_size - segment.file_size;
        if bss > 0 {
            guest_memory::with_mapped(
                attributes,
                segment.ipa + segment.file_size,
                bss,
                |va, _, len| {
                    // SAFETY: the alias maps this piece of guest RAM and no guest runs yet.
                    unsafe { core::ptr::write_bytes(va as *mut u8, 0, len as usize) };
                },
            )
            .map_err(BuildError::GuestMemory)?;
        }
        clean_for_guest(attributes, segment.ipa, segment.mem_size)?;
    }
    log::info!(
        "kernel: {:?}, {} bytes, {} segment(s)",
        plan.format,
        size,
        plan.segments.len()
    );
    Ok((plan.entry, plan.end))
}

fn cpu_has_fwb() -> bool {
    ID_AA64MMFR2_EL1.read(ID_AA64MMFR2_EL1::FWB) != 0
}

/// HCR_EL2 for the guest: AArch64 EL1 (RW), stage 2 on (VM), SMC trapped (TSC), WFI trapped
/// (TWI, the hypervisor's deferred work runs then), set/way
/// invalidates upgraded to clean+invalidate (SWIO), pointer authentication, MTE tags and
/// SCXTNUM left to the guest where the CPU has them, FWB when chosen. Interrupts are not routed to EL2: the GIC
/// is the guest's.
fn hcr_value(fwb: bool) -> u64 {
    let isar1 = ID_AA64ISAR1_EL1.extract();
    let isar2 = ID_AA64ISAR2_EL1.extract();
    let has_pauth = isar1.read(ID_AA64ISAR1_EL1::APA) != 0
        || isar1.read(ID_AA64ISAR1_EL1::API) != 0
        || isar1.read(ID_AA64ISAR1_EL1::GPA) != 0
        || isar1.read(ID_AA64ISAR1_EL1::GPI) != 0
        || isar2.read(ID_AA64ISAR2_EL1::APA3) != 0
        || isar2.read(ID_AA64ISAR2_EL1::GPA3) != 0;
    let has_mte2 = ID_AA64PFR1_EL1.read(ID_AA64PFR1_EL1::MTE) >= 2;
    // TWI: the guest's idle time is when the hypervisor streams its audit log and drains SMMU
    // events (see `trap::idle`).
    let mut hcr = HCR_EL2::VM::Enable
        + HCR_EL2::SWIO::SET
        + HCR_EL2::TSC::EnableTrapEl1SmcToEl2
        + HCR_EL2::RW::EL1IsAarch64
        + HCR_EL2::TWI::SET;
    if id_registers().has_scxtnum() {
        hcr += HCR_EL2::EnSCXT::SET; // SCXTNUM_EL0/EL1 are the guest's, as without EL2
    }
    if has_pauth {
        hcr += HCR_EL2::APK::DisableTrapPointerAuthKeyRegsToEl2
            + HCR_EL2::API::DisableTrapPointerAuthInstToEl2;
    }
    if has_mte2 {
        hcr += HCR_EL2::ATA::SET;
    }
    if fwb {
        hcr += HCR_EL2::FWB::Enabled;
    }
    hcr.value
}

/// The ID registers the EL2 trap controls depend on.
fn id_registers() -> IdRegisters {
    IdRegisters {
        pfr0: ID_AA64PFR0_EL1.get(),
        pfr1: ID_AA64PFR1_EL1.get(),
        dfr0: ID_AA64DFR0_EL1.get(),
        mmfr0: ID_AA64MMFR0_EL1.get(),
        mmfr1: ID_AA64MMFR1_EL1.get(),
        mmfr3: ID_AA64MMFR3_EL1.get(),
        isar2: ID_AA64ISAR2_EL1.get(),
    }
}

/// Per-CPU EL2 state for running the guest on this CPU as vCPU `vcpu`. Every trap control
/// whose reset value hardware leaves UNKNOWN is written, from what the ID registers say (see
/// `hyp_core::traps`).
fn configure_cpu(vm: &Vm, vcpu: usize) {
    let id = id_registers();
    // No FP, SVE or SME traps: the guest owns those registers on its pinned CPU, and EL2 never
    // uses them. TZ and TSM are RES1 when SVE and SME are absent.
    let res1_if_absent = |present: bool| u64::from(!present);
    CPTR_EL2.write(
        CPTR_EL2_RES1
            + CPTR_EL2::TFP::CLEAR
            + CPTR_EL2::TZ.val(res1_if_absent(id.has_sve()))
            + CPTR_EL2::TSM.val(res1_if_absent(id.has_sme())),
    );
    arch::isb();
    if id.has_sve() {
        ZCR_EL2.write(ZCR_EL2::LEN::Largest);
    }
    if id.has_sme() {
        SMCR_EL2.write(SMCR_EL2::LEN::Largest);
    }
    let counters = if id.has_pmu() {
        PMCR_EL0.read(PMCR_EL0::N)
    } else {
        0
    };
    MDCR_EL2.set(traps::mdcr(&id, counters));
    HSTR_EL2.set(traps::HSTR);
    if id.has_fgt() {
        let read_write = traps::fine_grained_read_write_traps(&id);
        HFGRTR_EL2.set(read_write);
        HFGWTR_EL2.set(read_write);
        HFGITR_EL2.set(traps::FINE_GRAINED_OTHER_TRAPS);
        HDFGRTR_EL2.set(traps::FINE_GRAINED_OTHER_TRAPS);
        HDFGWTR_EL2.set(traps::FINE_GRAINED_OTHER_TRAPS);
        if id.has_amu() {
            HAFGRTR_EL2.set(traps::FINE_GRAINED_OTHER_TRAPS);
        }
    }
    if id.has_hcx() {
        HCRX_EL2.set(traps::hcrx(&id));
    }
    HCR_EL2.set(vm.hcr);
    VTCR_EL2.set(vm.vtcr);
    VTTBR_EL2.set(vm.vttbr);
    // EL1 may use the physical counter and timer.
    CNTHCTL_EL2.write(CNTHCTL_EL2::EL1PCTEN::SET + CNTHCTL_EL2::EL1PCEN::SET);
    CNTVOFF_EL2.set(0);
    VPIDR_EL2.set(MIDR_EL1.get());
    VMPIDR_EL2.set(MPIDR_EL1.get());
    vm.gic.configure_cpu(&id);
    TPIDR_EL2.set(vcpu as u64);
    // The guest starts as from reset: MMU and caches off.
    SCTLR_EL1.write(
        SCTLR_EL1_RES1
            + SCTLR_EL1::M::Disable
            + SCTLR_EL1::C::NonCacheable
            + SCTLR_EL1::I::NonCacheable,
    );
    arch::isb();
    // Nothing of this VMID may linger from before (a previous run of this CPU).
    // SAFETY: TLB maintenance only.
    unsafe { core::arch::asm!("tlbi vmalls12e1", "dsb nsh", "isb", options(nostack)) };
}

fn stack_top(index: usize) -> u64 {
    unsafe extern "C" {
        static __stacks_start: u8;
    }
    // SAFETY: taking a linker symbol's address reads nothing.
    let base = unsafe { &__stacks_start as *const u8 as u64 };
    base + (index as u64 + 1) * STACK_SIZE
}

fn enter(vcpu: usize, entry: u64, x0: u64) -> ! {
    let mut frame = TrapFrame::default();
    frame.x[0] = x0;
    frame.elr = entry;
    // PSTATE as from reset: EL1h, debug, SError, IRQ and FIQ masked.
    frame.spsr = (SPSR_EL2::M::EL1h
        + SPSR_EL2::D::Masked
        + SPSR_EL2::A::Masked
        + SPSR_EL2::I::Masked
        + SPSR_EL2::F::Masked)
        .value;
    // SAFETY: `configure_cpu` set up EL2 for the guest and the vectors are installed; the stack
    // is this CPU's own.
    unsafe { enter_guest(&frame, stack_top(vcpu)) }
}

/// Enters the guest on the boot CPU.
pub fn enter_boot_cpu(boot: BootCpu) -> ! {
    let vm = vm();
    configure_cpu(vm, boot.vcpu);
    arch::tlbi_vmalls12e1is();
    arch::invalidate_icache();
    vm.core.audit.record(
        boot.vcpu,
        &audit::Event::GuestStart {
            entry: boot.entry,
            ram: vm.core.ram.size,
        },
    );
    log::info!(
        "entering the guest at {:#x} on vCPU {}",
        boot.entry,
        boot.vcpu
    );
    console::set_guest_running(true);
    enter(boot.vcpu, boot.entry, boot.dtb)
}

/// Enters the guest on a secondary CPU started by the guest's CPU_ON.
pub fn enter_secondary(vcpu: usize) -> ! {
    let vm = vm();
    if vcpu >= vm.core.power.len() {
        exit::fatal(format_args!("CPU started with unknown index {vcpu}"));
    }
    configure_cpu(vm, vcpu);
    let (entry, context) = &vm.core.boot_requests[vcpu];
    let (entry, context) = (
        entry.load(Ordering::Acquire),
        context.load(Ordering::Acquire),
    );
    vm.core.power.mark_on(vcpu);
    log::debug!("vCPU {vcpu} on at {entry:#x}");
    enter(vcpu, entry, context)
}
