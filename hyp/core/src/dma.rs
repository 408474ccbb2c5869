//! DMA mappings: the direction of a mapping and what it implies (the device's access rights in
//! strict mode, the cache maintenance at each step for a non-coherent device), and the table of
//! live mappings, whose handles carry a generation so that a stale handle is recognised.

use crate::audit::DmaDirection;
use crate::maintenance::CacheOp;
use crate::pagetable::Permissions;
use alloc::vec::Vec;
use stagehand_abi::Status;

/// Largest buffer one DMA_MAP accepts: the maintenance of a call must stay bounded (I6).
pub const MAX_MAPPING_BYTES: u64 = 16 << 20;
/// Live mappings at most.
pub const MAX_MAPPINGS: usize = 4096;

/// Decodes DMA_MAP x4.
pub fn direction(value: u64) -> Option<DmaDirection> {
    match value {
        0 => Some(DmaDirection::Bidirectional),
        1 => Some(DmaDirection::ToDevice),
        2 => Some(DmaDirection::FromDevice),
        _ => None,
    }
}

/// What the device may do with a buffer in strict mode.
pub fn device_permissions(direction: DmaDirection) -> Permissions {
    match direction {
        DmaDirection::Bidirectional => Permissions::RW,
        DmaDirection::ToDevice => Permissions::RO,
        DmaDirection::FromDevice => Permissions::WO,
    }
}

/// A step in a buffer's life.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    /// DMA_MAP.
    Map,
    /// DMA_UNMAP (after the device lost access).
    Unmap,
    /// DMA_SYNC for the CPU (the device has finished writing).
    ForCpu,
    /// DMA_SYNC for the device (the CPU has finished writing).
    ForDevice,
}

/// The cache maintenance a non-coherent device's buffer needs at `step`, if any: data the CPU
/// wrote must reach memory before the device reads it (clean), and lines the CPU holds must not
/// hide or overwrite what the device wrote (invalidate).
pub fn maintenance(direction: DmaDirection, step: Step) -> Option<CacheOp> {
    use DmaDirection::*;
    match (step, direction) {
        (Step::Map, ToDevice) | (Step::ForDevice, ToDevice) => Some(CacheOp::Clean),
        (Step::Map, FromDevice) | (Step::ForDevice, FromDevice) => Some(CacheOp::Invalidate),
        (Step::Map, Bidirectional) | (Step::ForDevice, Bidirectional) => {
            Some(CacheOp::CleanInvalidate)
        }
        (Step::Unmap | Step::ForCpu, FromDevice | Bidirectional) => Some(CacheOp::Invalidate),
        (Step::Unmap | Step::ForCpu, ToDevice) => None,
    }
}

/// One live mapping.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Mapping {
    /// The device (StreamID).
    pub stream_id: u32,
    /// First IPA (= IOVA).
    pub ipa: u64,
    /// Bytes (page multiple).
    pub size: u64,
    /// Direction.
    pub direction: DmaDirection,
}

/// The live mappings. A handle is `generation << 32 | slot + 1`; removing a mapping bumps its
/// slot's generation, so the old handle answers BAD_HANDLE forever after (until the 32-bit
/// generation wraps).
#[derive(Debug, Default)]
pub struct Mappings {
    slots: Vec<(u32, Option<Mapping>)>,
}

impl Mappings {
    /// No mappings.
    pub const fn new() -> Self {
        Self { slots: Vec::new() }
    }

    /// Adds a mapping and returns its handle.
    ///
    /// # Errors
    /// NO_MEMORY when [`MAX_MAPPINGS`] are live.
    pub fn insert(&mut self, mapping: Mapping) -> Result<u64, Status> {
        let slot = match self.slots.iter().position(|(_, m)| m.is_none()) {
            Some(free) => free,
            None if self.slots.len() < MAX_MAPPINGS => {
                self.slots.push((0, None));
                self.slots.len() - 1
            }
            None => return Err(Status::NoMemory),
        };
        self.slots[slot].1 = Some(mapping);
        Ok((self.slots[slot].0 as u64) << 32 | (slot as u64 + 1))
    }

    fn slot(&self, handle: u64) -> Option<usize> {
        let slot = (handle & 0xffff_ffff).checked_sub(1)? as usize;
        let (generation, mapping) = self.slots.get(slot)?;
        (mapping.is_some() && *generation as u64 == handle >> 32).then_some(slot)
    }

    /// The mapping of `handle`.
    ///
    /// # Errors
    /// BAD_HANDLE for an unknown or stale handle.
    pub fn get(&self, handle: u64) -> Result<Mapping, Status> {
        let slot = self.slot(handle).ok_or(Status::BadHandle)?;
        self.slots[slot].1.ok_or(Status::BadHandle)
    }

    /// Removes the mapping of `handle`.
    ///
    /// # Errors
    /// BAD_HANDLE for an unknown or stale handle.
    pub fn remove(&mut self, handle: u64) -> Result<Mapping, Status> {
        let slot = self.slot(handle).ok_or(Status::BadHandle)?;
        let entry = &mut self.slots[slot];
        entry.0 = entry.0.wrapping_add(1);
        entry.1.take().ok_or(Status::BadHandle)
    }

    /// Whether a live mapping of `stream_id` overlaps `[ipa, ipa + size)`.
    pub fn overlaps(&self, stream_id: u32, ipa: u64, size: u64) -> bool {
        self.slots
            .iter()
            .filter_map(|(_, m)| m.as_ref())
            .any(|m| m.stream_id == stream_id && ipa < m.ipa + m.size && m.ipa < ipa + size)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAPPING: Mapping = Mapping {
        stream_id: 0x10,
        ipa: 0x4000_0000,
        size: 0x2000,
        direction: DmaDirection::ToDevice,
    };

    #[test]
    fn handles_go_stale_after_removal() {
        let mut table = Mappings::new();
        let first = table.insert(MAPPING).unwrap();
        assert_eq!(table.get(first), Ok(MAPPING));
        assert_eq!(table.remove(first), Ok(MAPPING));
        assert_eq!(table.get(first), Err(Status::BadHandle));
        assert_eq!(table.remove(first), Err(Status::BadHandle));
        let second = table.insert(MAPPING).unwrap();
        assert_ne!(first, second, "the slot is reused with a new generation");
        assert_eq!(table.get(first), Err(Status::BadHandle));
        for bad in [0, u64::MAX, 0xffff_ffff, 2] {
            assert_eq!(table.get(bad), Err(Status::BadHandle), "{bad:#x}");
        }
        assert!(table.overlaps(0x10, 0x4000_1000, 0x1000));
        assert!(!table.overlaps(0x11, 0x4000_1000, 0x1000));
        assert!(!table.overlaps(0x10, 0x4000_2000, 0x1000));
    }

    #[test]
    fn the_table_is_bounded() {
        let mut table = Mappings::new();
        for _ in 0..MAX_MAPPINGS {
            table.insert(MAPPING).unwrap();
        }
        assert_eq!(table.insert(MAPPING), Err(Status::NoMemory));
    }

    #[test]
    fn maintenance_by_direction_and_step() {
        use DmaDirection::*;
        assert_eq!(maintenance(ToDevice, Step::Map), Some(CacheOp::Clean));
        assert_eq!(
            maintenance(FromDevice, Step::Map),
            Some(CacheOp::Invalidate)
        );
        assert_eq!(
            maintenance(Bidirectional, Step::Map),
            Some(CacheOp::CleanInvalidate)
        );
        assert_eq!(maintenance(ToDevice, Step::Unmap), None);
        assert_eq!(
            maintenance(FromDevice, Step::Unmap),
            Some(CacheOp::Invalidate)
        );
        assert_eq!(
            maintenance(Bidirectional, Step::ForCpu),
            Some(CacheOp::Invalidate)
        );
        assert_eq!(maintenance(ToDevice, Step::ForDevice), Some(CacheOp::Clean));
        assert_eq!(device_permissions(ToDevice), Permissions::RO);
        assert_eq!(device_permissions(FromDevice), Permissions::WO);
        assert_eq!(direction(3), None);
        assert_eq!(direction(2), Some(FromDevice));
    }
}
