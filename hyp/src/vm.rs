//! The one VM: building it (guest RAM layout, stage 2, images through fw_cfg, the guest's
//! device tree) and entering it on each CPU. After [`build`] the VM description is read-only
//! except for atomics (power states, pending CPU_ON requests).

use crate::arch::entry::{MAX_CPUS, STACK_SIZE};
use crate::arch::mmu::HeapTables;
use crate::arch::vectors::{enter_guest, TrapFrame};
use crate::arch::{self, read_sysreg, write_sysreg};
use crate::fw_cfg::{FwCfg, FwCfgError};
use crate::gic::InterruptController;
use crate::guest_memory;
use crate::{console, exit, QEMU_DTB};
use alloc::boxed::Box;
use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;
use core::fmt;
use core::sync::atomic::{AtomicU64, Ordering};
use hyp_core::attributes::AttributeManager;
use hyp_core::audit;
use hyp_core::config::{self, Config};
use hyp_core::geometry::{Geometry, UnsupportedPaRange};
use hyp_core::image;
use hyp_core::layout::{self, GuestRam};
use hyp_core::lock::FairRwLock;
use hyp_core::pagetable::{MapError, PAGE_SIZE};
use hyp_core::psci::PowerStates;
use hyp_core::traps::{self, IdRegisters};
use hyp_core::window::Window;
use stagehand_platform::board::{Board, Region};
use stagehand_platform::fw_cfg::key;
use stagehand_platform::guest_dt::{guest_device_tree, GuestDtConfig};

/// VMID of the one guest.
const VMID: u64 = 1;
/// SCTLR_EL1 a guest starts with: RES1 bits, MMU and caches off.
const SCTLR_EL1_RESET: u64 = 0x30d0_0800;
/// PSTATE a guest starts with: EL1h, D, A, I, F masked.
const SPSR_EL1H_MASKED: u64 = 0x3c5;

/// Everything the traps need to know about the VM.
pub struct Vm {
    /// Guest RAM.
    pub ram: GuestRam,
    /// PSCI view of the vCPUs.
    pub power: PowerStates,
    /// Pending CPU_ON requests: entry point and context id per vCPU.
    pub boot_requests: Vec<(AtomicU64, AtomicU64)>,
    /// HCR_EL2 while the guest runs.
    pub hcr: u64,
    /// VTCR_EL2.
    pub vtcr: u64,
    /// The shape of stage 2 (strict devices' own tables take the same).
    pub geometry: Geometry,
    /// VTTBR_EL2 (VMID and stage-2 root).
    pub vttbr: u64,
    /// Stage 2 uses FEAT_S2FWB encodings.
    pub fwb: bool,
    /// The interrupt controller (GICv2 or GICv3), as the hypervisor uses it.
    pub gic: Box<dyn InterruptController>,
    /// Smallest D-cache line in bytes.
    pub dcache_line: u64,
    /// Stage 2 and its ledger. Readers (cache operations, queries, guest-memory copies) share
    /// it; an attribute change holds it alone, which serialises operations on a page. The lock
    /// is phase-fair: vCPUs looping cache operations cannot hold off an attribute change for
    /// more than the sections already inside.
    pub attributes: FairRwLock<AttributeManager>,
    /// Each CPU's maintenance window, indexed like the vCPUs (pinned one to one).
    pub windows: Vec<spin::Mutex<Window>>,
}

static VM: spin::Once<Vm> = spin::Once::new();

/// The VM (after [`build`]).
pub fn vm() -> &'static Vm {
    match VM.get() {
        Some(vm) => vm,
        None => exit::fatal(format_args!("VM used before it was built")),
    }
}

/// Records an audit event caused by `vcpu` (into the ring, and onto the host stream).
pub fn audit(vcpu: usize, event: audit::Event) {
    crate::audit::record(vcpu, &event);
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
    /// Guest RAM could not be reached through the maintenance window.
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
pub fn build(board: &Board, mut windows: Vec<Window>) -> Result<BootCpu, BuildError> {
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
    crate::audit::configure(config.audit, board.hypervisor_uart().is_none());
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
    let geometry =
        Geometry::for_cpu(read_sysreg!("id_aa64mmfr0_el1") & 0xf).map_err(BuildError::Geometry)?;
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
    let mut attributes =
        AttributeManager::new(&mut HeapTables, fwb, ram, &geometry).map_err(BuildError::Stage2)?;
    map_guest_mmio(&mut attributes, &guest_mmio, gic.as_ref()).map_err(BuildError::Stage2)?;
    // The walker reads tables through the caches (VTCR says write-back walks), so a DSB makes
    // the entries visible; they are not live until VTTBR_EL2 is written.
    arch::dsb_ish();

    let boot_mpidr = arch::mpidr() & hyp_core::psci::MPIDR_AFFINITY_MASK;
    let boot_vcpu = board
        .cpus
        .iter()
        .position(|&m| m == boot_mpidr)
        .unwrap_or(0);
    let window = windows
        .get_mut(boot_vcpu)
        .ok_or(BuildError::Missing("maintenance window for the boot CPU"))?;
    let (entry, kernel_end) = load_kernel(&fw_cfg, &attributes, window)?;
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
        clean_for_guest(&attributes, window, initrd.base, initrd.size)?;
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
        window,
        placement.dtb,
        dtb.len() as u64,
        |va, offset, len| {
            // SAFETY: the window maps this piece of guest RAM write-back and no guest runs yet.
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
    VM.call_once(|| Vm {
        ram,
        power: PowerStates::new(board.cpus.clone(), boot_vcpu),
        boot_requests: (0..board.cpus.len())
            .map(|_| (AtomicU64::new(0), AtomicU64::new(0)))
            .collect(),
        hcr: hcr_value(fwb),
        vtcr: geometry.vtcr(),
        geometry,
        vttbr: VMID << 48 | root,
        fwb,
        gic,
        dcache_line: arch::dcache_line_size(),
        attributes: FairRwLock::new(attributes),
        windows: windows.into_iter().map(spin::Mutex::new).collect(),
    });
    crate::smmu::init(board, &config, vm());
    crate::dma_calls::set_quota(config.dma_mappings);
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
fn guest_mmio(board: &Board, gic: &dyn InterruptController) -> Vec<Region> {
    let mut regions = Vec::new();
    regions.extend(board.console_uart().map(|u| u.region));
    regions.extend(board.rtc);
    regions.extend(gic.guest_regions());
    if let Some(pcie) = &board.pcie {
        regions.push(pcie.ecam);
        regions.extend(pcie.windows.iter().map(|w| Region::new(w.cpu_base, w.size)));
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

/// Cleans and invalidates `[ipa, ipa + len)` to the point of coherency through the window: the
/// guest starts with its MMU off, so its reads go to memory.
fn clean_for_guest(
    attributes: &AttributeManager,
    window: &mut Window,
    ipa: u64,
    len: u64,
) -> Result<(), BuildError> {
    guest_memory::with_mapped(attributes, window, ipa, len, |va, _, len| {
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
fn load_kernel(
    fw_cfg: &FwCfg,
    attributes: &AttributeManager,
    window: &mut Window,
) -> Result<(u64, u64), BuildError> {
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
                window,
                segment.ipa + segment.file_size,
                bss,
                |va, _, len| {
                    // SAFETY: the window maps this piece of guest RAM and no guest runs yet.
                    unsafe { core::ptr::write_bytes(va as *mut u8, 0, len as usize) };
                },
            )
            .map_err(BuildError::GuestMemory)?;
        }
        clean_for_guest(attributes, window, segment.ipa, segment.mem_size)?;
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
    (read_sysreg!("id_aa64mmfr2_el1") >> 40) & 0xf != 0
}

/// HCR_EL2 for the guest: AArch64 EL1 (RW), stage 2 on (VM), SMC trapped (TSC), WFI trapped
/// (TWI, the hypervisor's deferred work runs then), set/way
/// invalidates upgraded to clean+invalidate (SWIO), pointer authentication, MTE tags and
/// SCXTNUM left to the guest where the CPU has them, FWB when chosen. Interrupts are not routed to EL2: the GIC
/// is the guest's.
fn hcr_value(fwb: bool) -> u64 {
    const VM: u64 = 1 << 0;
    const SWIO: u64 = 1 << 1;
    const TWI: u64 = 1 << 13;
    const TSC: u64 = 1 << 19;
    const RW: u64 = 1 << 31;
    const APK: u64 = 1 << 40;
    const API: u64 = 1 << 41;
    const FWB: u64 = 1 << 46;
    const ATA: u64 = 1 << 56;
    let isar1 = read_sysreg!("id_aa64isar1_el1");
    let isar2 = read_sysreg!("id_aa64isar2_el1");
    let has_pauth =
        (isar1 >> 4) & 0xff != 0 || (isar1 >> 24) & 0xff != 0 || (isar2 >> 8) & 0xff != 0;
    let has_mte2 = (read_sysreg!("id_aa64pfr1_el1") >> 8) & 0xf >= 2;
    // TWI: the guest's idle time is when the hypervisor streams its audit log and drains SMMU
    // events (see `trap::idle`).
    let mut hcr = VM | SWIO | TSC | RW | TWI;
    if id_registers().has_scxtnum() {
        hcr |= traps::HCR_ENSCXT; // SCXTNUM_EL0/EL1 are the guest's, as without EL2
    }
    if has_pauth {
        hcr |= APK | API;
    }
    if has_mte2 {
        hcr |= ATA;
    }
    if fwb {
        hcr |= FWB;
    }
    hcr
}

/// The ID registers the EL2 trap controls depend on.
fn id_registers() -> IdRegisters {
    IdRegisters {
        pfr0: read_sysreg!("id_aa64pfr0_el1"),
        pfr1: read_sysreg!("id_aa64pfr1_el1"),
        dfr0: read_sysreg!("id_aa64dfr0_el1"),
        mmfr0: read_sysreg!("id_aa64mmfr0_el1"),
        mmfr1: read_sysreg!("id_aa64mmfr1_el1"),
        mmfr3: read_sysreg!("s3_0_c0_c7_3"), // ID_AA64MMFR3_EL1 (reads 0 before it existed)
        isar2: read_sysreg!("id_aa64isar2_el1"),
    }
}

/// Per-CPU EL2 state for running the guest on this CPU as vCPU `vcpu`. Every trap control
/// whose reset value hardware leaves UNKNOWN is written, from what the ID registers say (see
/// `hyp_core::traps`).
fn configure_cpu(vm: &Vm, vcpu: usize) {
    let id = id_registers();
    // CPTR_EL2 (non-VHE): RES1 bits 13, 9, 7:0, and 12/8 when SME/SVE are absent; no FP, SVE or
    // SME traps: the guest owns those registers on its pinned CPU, and EL2 never uses them.
    let mut cptr: u64 = 0x33ff;
    if id.has_sve() {
        cptr &= !(1 << 8);
    }
    if id.has_sme() {
        cptr &= !(1 << 12);
    }
    write_sysreg!("cptr_el2", cptr);
    arch::isb();
    if id.has_sve() {
        write_sysreg!("s3_4_c1_c2_0", 0xf); // ZCR_EL2.LEN: the largest vector length
    }
    if id.has_sme() {
        write_sysreg!("s3_4_c1_c2_6", 0xf); // SMCR_EL2.LEN
    }
    let counters = if id.has_pmu() {
        (read_sysreg!("pmcr_el0") >> 11) & 0x1f
    } else {
        0
    };
    write_sysreg!("mdcr_el2", traps::mdcr(&id, counters));
    write_sysreg!("hstr_el2", traps::HSTR);
    if id.has_fgt() {
        let read_write = traps::fine_grained_read_write_traps(&id);
        write_sysreg!("s3_4_c1_c1_4", read_write); // HFGRTR_EL2
        write_sysreg!("s3_4_c1_c1_5", read_write); // HFGWTR_EL2
        write_sysreg!("s3_4_c1_c1_6", traps::FINE_GRAINED_OTHER_TRAPS); // HFGITR_EL2
        write_sysreg!("s3_4_c3_c1_4", traps::FINE_GRAINED_OTHER_TRAPS); // HDFGRTR_EL2
        write_sysreg!("s3_4_c3_c1_5", traps::FINE_GRAINED_OTHER_TRAPS); // HDFGWTR_EL2
        if id.has_amu() {
            write_sysreg!("s3_4_c3_c1_6", traps::FINE_GRAINED_OTHER_TRAPS); // HAFGRTR_EL2
        }
    }
    if id.has_hcx() {
        write_sysreg!("s3_4_c1_c2_2", traps::hcrx(&id)); // HCRX_EL2
    }
    write_sysreg!("hcr_el2", vm.hcr);
    write_sysreg!("vtcr_el2", vm.vtcr);
    write_sysreg!("vttbr_el2", vm.vttbr);
    write_sysreg!("cnthctl_el2", 0b11); // EL1 may use the physical counter and timer
    write_sysreg!("cntvoff_el2", 0);
    write_sysreg!("vpidr_el2", read_sysreg!("midr_el1"));
    write_sysreg!("vmpidr_el2", read_sysreg!("mpidr_el1"));
    vm.gic.configure_cpu(&id);
    write_sysreg!("tpidr_el2", vcpu as u64);
    write_sysreg!("sctlr_el1", SCTLR_EL1_RESET);
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
    frame.spsr = SPSR_EL1H_MASKED;
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
    audit(
        boot.vcpu,
        audit::Event::GuestStart {
            entry: boot.entry,
            ram: vm.ram.size,
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
    if vcpu >= vm.power.len() {
        exit::fatal(format_args!("CPU started with unknown index {vcpu}"));
    }
    configure_cpu(vm, vcpu);
    let (entry, context) = &vm.boot_requests[vcpu];
    let (entry, context) = (
        entry.load(Ordering::Acquire),
        context.load(Ordering::Acquire),
    );
    vm.power.mark_on(vcpu);
    log::debug!("vCPU {vcpu} on at {entry:#x}");
    enter(vcpu, entry, context)
}
