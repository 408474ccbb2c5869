//! What the hypervisor needs from the interrupt controller, behind one interface with a GICv2
//! and a GICv3 implementation, chosen from the device tree. The GIC is the guest's (interrupts
//! are not routed to EL2); the hypervisor only decides what of it the guest may reach, traps
//! what could point the GIC at memory, and sets up each CPU's EL2 view of the CPU interface.

use crate::arch::mmu::HeapTables;
use crate::arch::recover;
use aarch64_cpu::registers::{Writeable, ICC_SRE_EL2};
use alloc::boxed::Box;
use alloc::vec::Vec;
use hyp_core::attributes::AttributeManager;
use hyp_core::gic as policy;
use hyp_core::pagetable::{MapError, PAGE_SIZE};
use hyp_core::traps::IdRegisters;
use stagehand_platform::board::{Board, Gic, GicVersion, Region};

/// The interrupt controller, as the hypervisor uses it.
pub trait InterruptController: Send + Sync {
    /// The register blocks the guest may reach (for its device tree), before trapping.
    fn guest_regions(&self) -> Vec<Region>;

    /// Maps the guest's GIC registers into stage 2, leaving out what [`Self::trapped_offset`]
    /// decides.
    ///
    /// # Errors
    /// What mapping returns.
    fn map_for_guest(&self, attributes: &mut AttributeManager) -> Result<(), MapError>;

    /// For a guest access at `ipa` that the hypervisor emulates: the register frame's base and
    /// the offset into its trapped page.
    fn trapped_offset(&self, ipa: u64) -> Option<u64>;

    /// Sets up this CPU's EL2 side of the CPU interface for the guest.
    fn configure_cpu(&self, id: &IdRegisters);
}

/// The controller the board has, or `None` when its device tree names none the hypervisor
/// knows.
pub fn from_board(board: &Board) -> Option<Box<dyn InterruptController>> {
    let gic = board.gic.as_ref()?;
    Some(match gic.version {
        GicVersion::V2 => Box::new(GicV2::new(gic)?),
        GicVersion::V3 => Box::new(GicV3::new(gic)),
    })
}

fn map_region(attributes: &mut AttributeManager, region: Region) -> Result<(), MapError> {
    let start = region.base & !(PAGE_SIZE - 1);
    let end = (region.base + region.size).next_multiple_of(PAGE_SIZE);
    attributes.map_mmio(&mut HeapTables, start, end - start)
}

/// A GICv2 (GIC-400 and the like): the guest gets its distributor and CPU interface as they
/// are. Nothing in them makes the GIC read or write memory, so nothing is trapped. GICH and
/// GICV stay the hypervisor's (absent from stage 2 and from the guest's device tree). The
/// GICv2m MSI frame is not given: `msi-parent` is removed from the guest's tree, as for the
/// ITS of a GICv3, so devices interrupt through INTx.
pub struct GicV2 {
    distributor: Region,
    cpu_interface: Region,
}

impl GicV2 {
    fn new(gic: &Gic) -> Option<Self> {
        Some(Self {
            distributor: gic.distributor,
            cpu_interface: gic.cpu_interface?,
        })
    }
}

impl InterruptController for GicV2 {
    fn guest_regions(&self) -> Vec<Region> {
        alloc::vec![self.distributor, self.cpu_interface]
    }

    fn map_for_guest(&self, attributes: &mut AttributeManager) -> Result<(), MapError> {
        map_region(attributes, self.distributor)?;
        map_region(attributes, self.cpu_interface)
    }

    fn trapped_offset(&self, _ipa: u64) -> Option<u64> {
        None
    }

    fn configure_cpu(&self, _id: &IdRegisters) {}
}

/// A GICv3: the guest gets the distributor and the redistributor frames that exist, minus the
/// first page of each RD frame (GICR_PROPBASER, GICR_PENDBASER and EnableLPIs could point the
/// GIC at any memory), which is emulated through `hyp_core::gic::decide`. The ITS is hidden.
pub struct GicV3 {
    distributor: Region,
    /// The device tree's redistributor regions (room for the most CPUs the board could have).
    regions: Vec<Region>,
    /// The frames that exist.
    frames: Vec<Region>,
}

impl GicV3 {
    fn new(gic: &Gic) -> Self {
        Self {
            distributor: gic.distributor,
            regions: gic.redistributors.clone(),
            frames: populated_frames(&gic.redistributors),
        }
    }
}

/// The redistributor frames that exist. The device tree's region has room for the most CPUs
/// the board could have; frames past the last populated one answer nothing (an access aborts),
/// so they are neither mapped for the guest nor touched by the emulation.
fn populated_frames(regions: &[Region]) -> Vec<Region> {
    let mut frames = Vec::new();
    for region in regions {
        let found = policy::populated_frames(region.base, region.size, |frame| {
            // SAFETY: inside the redistributor region from the device tree, mapped Device at
            // EL2 by `mmu::extend`; GICR_TYPER is read-only and reading it has no effect.
            unsafe { recover::mmio_read(frame + 8, 8) }.ok()
        });
        frames.extend(
            found
                .into_iter()
                .map(|(base, size)| Region::new(base, size)),
        );
    }
    frames
}

impl InterruptController for GicV3 {
    fn guest_regions(&self) -> Vec<Region> {
        let mut regions = alloc::vec![self.distributor];
        regions.extend(self.regions.iter().copied());
        regions
    }

    fn map_for_guest(&self, attributes: &mut AttributeManager) -> Result<(), MapError> {
        map_region(attributes, self.distributor)?;
        for frame in &self.frames {
            attributes.note_trapped_mmio(frame.base, policy::TRAPPED_PAGE);
            attributes.map_mmio(
                &mut HeapTables,
                frame.base + policy::TRAPPED_PAGE,
                frame.size - policy::TRAPPED_PAGE,
            )?;
        }
        Ok(())
    }

    fn trapped_offset(&self, ipa: u64) -> Option<u64> {
        self.frames
            .iter()
            .find_map(|frame| policy::trapped_offset(frame.base, ipa))
    }

    fn configure_cpu(&self, id: &IdRegisters) {
        if id.has_gic_system_registers() {
            // EL1 may use the system-register interface (Enable), which is on at EL2 (SRE) with
            // IRQ and FIQ bypass off (DIB, DFB). UNDEFINED on a CPU without it.
            ICC_SRE_EL2.write(
                ICC_SRE_EL2::SRE::SET
                    + ICC_SRE_EL2::DFB::SET
                    + ICC_SRE_EL2::DIB::SET
                    + ICC_SRE_EL2::ENABLE::SET,
            );
        }
    }
}
