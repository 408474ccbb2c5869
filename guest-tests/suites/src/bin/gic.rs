//! Suite `gic`: the guest's GICv3 redistributor has LPIs disabled for good (no PLPIS, enabling
//! LPIs does not stick, PROPBASER/PENDBASER read as zero), while ordinary interrupts still work:
//! an SGI sent to itself is taken at EL1.
#![no_std]
#![no_main]

extern crate alloc;

use alloc::format;
use alloc::string::String;
use core::sync::atomic::{AtomicU64, Ordering};

use guest_rt::dt::Region;
use guest_rt::{check, check_eq, read_sysreg, write_sysreg};

guest_rt::main!(main);

fn main() -> ! {
    guest_rt::test::run_suite(
        "gic",
        &guest_rt::tests![lpis_not_supported, lpis_cannot_be_enabled, sgi_to_self],
    )
}

/// Bytes per redistributor (RD_base and SGI_base frames, 64 KiB each).
const REDISTRIBUTOR_STRIDE: usize = 0x2_0000;
/// Offset of the SGI_base frame in a redistributor.
const SGI_FRAME: usize = 0x1_0000;

/// GICR_CTLR and its EnableLPIs bit.
const GICR_CTLR: usize = 0x0;
const CTLR_ENABLE_LPIS: u32 = 1 << 0;
/// GICR_TYPER, its PLPIS and Last bits, and where the affinity value sits.
const GICR_TYPER: usize = 0x8;
const TYPER_PLPIS: u64 = 1 << 0;
const TYPER_LAST: u64 = 1 << 4;
/// GICR_WAKER and its ProcessorSleep / ChildrenAsleep bits.
const GICR_WAKER: usize = 0x14;
const WAKER_PROCESSOR_SLEEP: u32 = 1 << 1;
const WAKER_CHILDREN_ASLEEP: u32 = 1 << 2;
/// GICR_PROPBASER and GICR_PENDBASER.
const GICR_PROPBASER: usize = 0x70;
const GICR_PENDBASER: usize = 0x78;
/// SGI_base registers: group, set-enable, priority.
const GICR_IGROUPR0: usize = 0x80;
const GICR_ISENABLER0: usize = 0x100;
const GICR_IPRIORITYR: usize = 0x400;
/// GICD_CTLR: EnableGrp1NS and ARE_NS.
const GICD_CTLR: usize = 0x0;
const GICD_CTLR_ENABLE_GRP1: u32 = 1 << 1;
const GICD_CTLR_ARE_NS: u32 = 1 << 4;

fn read32(addr: usize) -> Result<u32, String> {
    guest_rt::probe::read_u32(addr).map_err(|a| format!("read of {addr:#x}: {a:?}"))
}

fn write32(addr: usize, value: u32) -> Result<(), String> {
    guest_rt::probe::write_u32(addr, value).map_err(|a| format!("write of {addr:#x}: {a:?}"))
}

fn read64(addr: usize) -> Result<u64, String> {
    guest_rt::probe::read_u64(addr).map_err(|a| format!("read of {addr:#x}: {a:?}"))
}

fn write64(addr: usize, value: u64) -> Result<(), String> {
    guest_rt::probe::write_u64(addr, value).map_err(|a| format!("write of {addr:#x}: {a:?}"))
}

/// This CPU's affinity as GICR_TYPER[63:32] encodes it (Aff3.Aff2.Aff1.Aff0).
fn my_gic_affinity() -> u64 {
    let mpidr = guest_rt::arch::mpidr();
    ((mpidr >> 32) & 0xff) << 24 | (mpidr & 0xff_ffff)
}

/// The RD_base of the calling CPU's redistributor, found by GICR_TYPER affinity.
fn my_redistributor() -> Result<usize, String> {
    let Some(region) = guest_rt::dt::boot_info().gic_redistributors else {
        return Err(String::from(
            "no GICv3 redistributor region in the device tree",
        ));
    };
    let Region { base, size } = region;
    let wanted = my_gic_affinity();
    let mut frame = base;
    while frame + REDISTRIBUTOR_STRIDE <= base + size {
        let typer = read64(frame + GICR_TYPER)?;
        if typer >> 32 == wanted {
            return Ok(frame);
        }
        if typer & TYPER_LAST != 0 {
            break;
        }
        frame += REDISTRIBUTOR_STRIDE;
    }
    Err(format!(
        "no redistributor with affinity {wanted:#x} in {region:x?}"
    ))
}

fn lpis_not_supported() -> Result<(), String> {
    let redistributor = my_redistributor()?;
    let typer = read64(redistributor + GICR_TYPER)?;
    check_eq!(
        typer & TYPER_PLPIS,
        0,
        "GICR_TYPER.PLPIS (GICR_TYPER = {:#x})",
        typer
    );
    Ok(())
}

fn lpis_cannot_be_enabled() -> Result<(), String> {
    let redistributor = my_redistributor()?;
    let ram = guest_rt::dt::main_ram();
    // Guest addresses for the property and pending tables, 64 KiB aligned, with the
    // IDbits/attribute fields a driver would set.
    let propbase = (ram.base + (32 << 20)) as u64 | (0b111 << 7) | 15;
    let pendbase = (ram.base + (33 << 20)) as u64 | (0b111 << 7);
    write64(redistributor + GICR_PROPBASER, propbase)?;
    write64(redistributor + GICR_PENDBASER, pendbase)?;
    let ctlr = read32(redistributor + GICR_CTLR)?;
    write32(redistributor + GICR_CTLR, ctlr | CTLR_ENABLE_LPIS)?;
    let ctlr = read32(redistributor + GICR_CTLR)?;
    check_eq!(
        ctlr & CTLR_ENABLE_LPIS,
        0,
        "GICR_CTLR.EnableLPIs after setting it"
    );
    check_eq!(
        read64(redistributor + GICR_PROPBASER)?,
        0,
        "GICR_PROPBASER after a write"
    );
    check_eq!(
        read64(redistributor + GICR_PENDBASER)?,
        0,
        "GICR_PENDBASER after a write"
    );
    Ok(())
}

/// INTID of the last interrupt taken (u64::MAX: none).
static TAKEN: AtomicU64 = AtomicU64::new(u64::MAX);

fn irq_handler() {
    let intid = read_sysreg!(S3_0_C12_C12_0); // ICC_IAR1_EL1
    TAKEN.store(intid & 0xff_ffff, Ordering::SeqCst);
    write_sysreg!(S3_0_C12_C12_1, intid); // ICC_EOIR1_EL1
}

fn sgi_to_self() -> Result<(), String> {
    const SGI: u64 = 3;
    let Some(distributor) = guest_rt::dt::boot_info().gic_distributor else {
        return Err(String::from("no GICv3 distributor in the device tree"));
    };
    let redistributor = my_redistributor()?;
    // Distributor: affinity routing and group 1 on.
    let ctlr = read32(distributor.base + GICD_CTLR)?;
    write32(
        distributor.base + GICD_CTLR,
        ctlr | GICD_CTLR_ARE_NS | GICD_CTLR_ENABLE_GRP1,
    )?;
    // Redistributor: awake, SGI in group 1, enabled, mid priority.
    let waker = read32(redistributor + GICR_WAKER)?;
    write32(redistributor + GICR_WAKER, waker & !WAKER_PROCESSOR_SLEEP)?;
    let mut polls = 0;
    while read32(redistributor + GICR_WAKER)? & WAKER_CHILDREN_ASLEEP != 0 {
        polls += 1;
        check!(polls < 1_000_000, "redistributor stays asleep");
    }
    let sgi_frame = redistributor + SGI_FRAME;
    let group = read32(sgi_frame + GICR_IGROUPR0)?;
    write32(sgi_frame + GICR_IGROUPR0, group | 1 << SGI)?;
    let priority_word = sgi_frame + GICR_IPRIORITYR + (SGI as usize & !3);
    let shift = 8 * (SGI as usize % 4);
    let priorities = read32(priority_word)?;
    write32(
        priority_word,
        (priorities & !(0xff << shift)) | (0x80 << shift),
    )?;
    write32(sgi_frame + GICR_ISENABLER0, 1 << SGI)?;
    // CPU interface: system registers on, all priorities, group 1 on.
    let sre = read_sysreg!(S3_0_C12_C12_5); // ICC_SRE_EL1
    write_sysreg!(S3_0_C12_C12_5, sre | 1);
    guest_rt::arch::isb();
    write_sysreg!(S3_0_C4_C6_0, 0xff); // ICC_PMR_EL1
    write_sysreg!(S3_0_C12_C12_7, 1); // ICC_IGRPEN1_EL1
    guest_rt::arch::isb();

    TAKEN.store(u64::MAX, Ordering::SeqCst);
    guest_rt::exceptions::set_irq_handler(Some(irq_handler));
    guest_rt::arch::enable_irqs();
    let mpidr = guest_rt::arch::mpidr();
    let target = (1u64 << (mpidr & 0xf))
        | ((mpidr >> 8) & 0xff) << 16
        | ((mpidr >> 16) & 0xff) << 32
        | ((mpidr >> 32) & 0xff) << 48
        | SGI << 24;
    write_sysreg!(S3_0_C12_C11_5, target); // ICC_SGI1R_EL1
    guest_rt::arch::isb();
    let mut polls = 0;
    while TAKEN.load(Ordering::SeqCst) == u64::MAX && polls < 10_000_000 {
        polls += 1;
        core::hint::spin_loop();
    }
    guest_rt::arch::disable_irqs();
    guest_rt::exceptions::set_irq_handler(None);
    check_eq!(
        TAKEN.load(Ordering::SeqCst),
        SGI,
        "INTID of the interrupt taken after sending SGI {}",
        SGI
    );
    Ok(())
}
