//! DMA mappings (ABI 1.1): the direction of a mapping and what it implies (the device's access
//! rights in strict mode, the cache maintenance at each step for a non-coherent device), the
//! checks of a byte-granular buffer, the counted rights of each page a strict device reaches,
//! the table of live mappings (a slab of slots reused under generation-tagged handles, bounded
//! by its quota), and the decoding and work budget of the scatter-gather calls.
//!
//! The map and unmap path allocates nothing once the table has grown to its working size: a
//! freed slot is reused, and rights changes reach the caller one run at a time through a
//! closure, not in a vector.
//!
//! Rights are counted per device and per page: each live mapping adds one read and/or one write
//! to every page its buffer touches, and the device's SMMU entry for a page grants exactly the
//! union (read if any read count, write if any write count). Only a change of that union
//! rewrites the entry, so buffers of any directions may share a page, and the device never holds
//! a right no live mapping granted.

use crate::address::Ipa;
use crate::audit::DmaDirection;
use crate::maintenance::CacheOp;
use crate::pagetable::{Permissions, PAGE_SIZE};
use alloc::vec::Vec;
use stagehand_abi::{dma_sg, Status};

/// Largest buffer (or scatter-gather segment) one mapping covers: the maintenance of one
/// mapping must stay bounded (I6).
pub const MAX_MAPPING_BYTES: u64 = 16 << 20;
/// Live mappings a VM may hold unless the configuration (`dma-mappings`) says otherwise.
pub const DEFAULT_MAPPING_QUOTA: usize = 65_536;

/// Decodes DMA_MAP x4 (and DMA_MAP_SG x4).
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
/// hide or overwrite what the device wrote (invalidate). An invalidate of a buffer whose ends are
/// not line-aligned cleans and invalidates the edge lines ([`crate::maintenance::plan`]).
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

/// The pages a buffer touches: first page's IPA and bytes (a page multiple).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PageSpan {
    /// IPA of the first page.
    pub ipa: u64,
    /// Bytes from it to the end of the last page.
    pub size: u64,
}

impl PageSpan {
    /// Pages in the span.
    pub fn pages(&self) -> u64 {
        self.size / PAGE_SIZE
    }
}

/// Checks a buffer's address and size (any alignment) and returns the pages it touches. Whether
/// those pages are the guest's RAM is the ledger's check.
///
/// # Errors
/// INVALID_PARAMETER for a zero size or one above [`MAX_MAPPING_BYTES`]; OUT_OF_RANGE when the
/// buffer (or its last page) wraps.
#[inline]
pub fn check_buffer(ipa: u64, size: u64) -> Result<PageSpan, Status> {
    if size == 0 || size > MAX_MAPPING_BYTES {
        return Err(Status::InvalidParameter);
    }
    // One add: the end rounded up to a page (size is small, so only this add can wrap).
    let last = ipa
        .checked_add(size + (PAGE_SIZE - 1))
        .ok_or(Status::OutOfRange)?
        & !(PAGE_SIZE - 1);
    let first = ipa & !(PAGE_SIZE - 1);
    Ok(PageSpan {
        ipa: first,
        size: last - first,
    })
}

/// One live mapping.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Mapping {
    /// The device (StreamID).
    pub stream_id: u32,
    /// First IPA (= IOVA), any alignment.
    pub ipa: u64,
    /// Bytes.
    pub size: u64,
    /// Direction.
    pub direction: DmaDirection,
    /// Whether the device's own stage 2 maps it (strict mode): its rights are counted.
    pub strict: bool,
    /// Whether the device snoops CPU caches (then no maintenance at unmap or sync).
    pub coherent: bool,
}

impl Mapping {
    /// The pages the buffer touches.
    pub fn span(&self) -> PageSpan {
        // A live mapping passed `check_buffer`.
        check_buffer(self.ipa, self.size).unwrap_or(PageSpan {
            ipa: self.ipa,
            size: 0,
        })
    }
}

/// How many live mappings of one device grant read and write on one page.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Counts {
    read: u16,
    write: u16,
}

impl Counts {
    fn union(self) -> Option<Permissions> {
        match (self.read > 0, self.write > 0) {
            (false, false) => None,
            (true, false) => Some(Permissions::RO),
            (false, true) => Some(Permissions::WO),
            (true, true) => Some(Permissions::RW),
        }
    }
}

/// A run of pages whose device rights change from `before` to `after` (`None`: no access): what
/// the SMMU entries of `[ipa, ipa + size)` must become.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RightsChange {
    /// First page.
    pub ipa: u64,
    /// Bytes (a page multiple).
    pub size: u64,
    /// The union before.
    pub before: Option<Permissions>,
    /// The union after.
    pub after: Option<Permissions>,
}

impl RightsChange {
    /// Whether a valid entry the device may have cached changes (then the SMMU's TLB must be
    /// invalidated and synchronised): a rewrite or a removal, not a first map. An invalid
    /// entry faults, and an entry that generates a Translation fault is never cached in a TLB
    /// (Arm ARM DDI 0487 R_XCLRD; I_WZCBG: making it valid needs no TLBI; Linux's arm-smmu-v3
    /// sends nothing on map either): docs/design.md, SMMU.
    pub fn needs_tlbi(&self) -> bool {
        self.before.is_some()
    }
}

/// Exact runs [`StaleRuns`] keeps before it folds them into one. Three keep the value at 56
/// bytes, which the compiler zeroes with a few stores; at four (72 bytes) every map and unmap
/// paid an out-of-line `memset` of ~48 instructions.
const STALE_RUNS: usize = 3;

/// The IOTLB runs one call must invalidate before its one sync, kept on the stack: up to
/// [`STALE_RUNS`] exact runs (adjacent ones merged), then a single run covering all of them.
/// Invalidating more than changed is always safe (the SMMU driver turns a long run into one
/// VMID-wide invalidation); invalidating less never happens.
#[derive(Clone, Copy, Debug)]
pub struct StaleRuns {
    runs: [(Ipa, u64); STALE_RUNS],
    len: usize,
}

impl Default for StaleRuns {
    fn default() -> Self {
        Self::new()
    }
}

impl StaleRuns {
    /// None yet.
    pub const fn new() -> Self {
        Self {
            runs: [(Ipa::new(0), 0); STALE_RUNS],
            len: 0,
        }
    }

    /// Adds `[ipa, ipa + size)`.
    pub fn push(&mut self, ipa: Ipa, size: u64) {
        if let Some(last) = self.len.checked_sub(1).map(|i| &mut self.runs[i]) {
            if last.0.get() + last.1 == ipa.get() {
                last.1 += size;
                return;
            }
        }
        if self.len < STALE_RUNS {
            self.runs[self.len] = (ipa, size);
            self.len += 1;
            return;
        }
        let kept = &self.runs[..self.len];
        let start = kept.iter().map(|r| r.0.get()).fold(ipa.get(), u64::min);
        let end = kept
            .iter()
            .map(|r| r.0.get() + r.1)
            .fold(ipa.get() + size, u64::max);
        self.runs[0] = (Ipa::new(start), end - start);
        self.len = 1;
    }

    /// The runs, in the order added (or the one covering run).
    pub fn as_slice(&self) -> &[(Ipa, u64)] {
        &self.runs[..self.len]
    }

    /// Whether nothing is to be invalidated.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// The counted rights of one strict device over the guest's RAM, one entry per page, allocated
/// on the device's first mapping.
#[derive(Debug)]
struct DeviceRights {
    base: u64,
    counts: Vec<Counts>,
}

impl DeviceRights {
    fn new(base: u64, pages: usize) -> Result<Self, Status> {
        let mut counts = Vec::new();
        counts
            .try_reserve_exact(pages)
            .map_err(|_| Status::NoMemory)?;
        counts.resize(pages, Counts::default());
        Ok(Self { base, counts })
    }

    fn range(&self, span: PageSpan) -> Option<core::ops::Range<usize>> {
        let first = usize::try_from(span.ipa.checked_sub(self.base)? / PAGE_SIZE).ok()?;
        let end = first.checked_add(span.pages() as usize)?;
        (end <= self.counts.len()).then_some(first..end)
    }

    /// Adds (`add`) or removes one mapping's rights; check-all, then set-all. Hands each run of
    /// pages whose union changed to `emit`, in address order, adjacent pages of the same change
    /// merged.
    fn update(
        &mut self,
        span: PageSpan,
        permissions: Permissions,
        add: bool,
        mut emit: impl FnMut(RightsChange),
    ) -> Result<(), Status> {
        let range = self.range(span).ok_or(Status::OutOfRange)?;
        let step = |count: u16, granted: bool| -> Option<u16> {
            match (granted, add) {
                (false, _) => Some(count),
                (true, true) => count.checked_add(1),
                (true, false) => count.checked_sub(1),
            }
        };
        if range.len() == 1 {
            // One page (a driver's typical 4 KiB element): the same check and set, no run to
            // merge.
            let count = &mut self.counts[range.start];
            let (Some(read), Some(write)) = (
                step(count.read, permissions.read),
                step(count.write, permissions.write),
            ) else {
                return Err(Status::Busy);
            };
            let before = count.union();
            *count = Counts { read, write };
            let after = count.union();
            if before != after {
                emit(RightsChange {
                    ipa: span.ipa,
                    size: PAGE_SIZE,
                    before,
                    after,
                });
            }
            return Ok(());
        }
        let counts = &mut self.counts[range];
        if counts.iter().any(|c| {
            step(c.read, permissions.read).is_none() || step(c.write, permissions.write).is_none()
        }) {
            // Overflow: pins (u16 as well) answer BUSY first. Underflow: a bug; refuse.
            return Err(Status::Busy);
        }
        let mut pending: Option<RightsChange> = None;
        for (i, c) in counts.iter_mut().enumerate() {
            let before = c.union();
            c.read = step(c.read, permissions.read).unwrap_or(c.read);
            c.write = step(c.write, permissions.write).unwrap_or(c.write);
            let after = c.union();
            if before == after {
                continue;
            }
            let ipa = span.ipa + i as u64 * PAGE_SIZE;
            match pending.as_mut() {
                Some(last)
                    if last.ipa + last.size == ipa
                        && last.before == before
                        && last.after == after =>
                {
                    last.size += PAGE_SIZE
                }
                _ => {
                    if let Some(done) = pending.take() {
                        emit(done);
                    }
                    pending = Some(RightsChange {
                        ipa,
                        size: PAGE_SIZE,
                        before,
                        after,
                    });
                }
            }
        }
        if let Some(done) = pending {
            emit(done);
        }
        Ok(())
    }

    fn union(&self, ipa: u64) -> Option<Permissions> {
        let index = self.range(PageSpan {
            ipa: ipa & !(PAGE_SIZE - 1),
            size: PAGE_SIZE,
        })?;
        self.counts[index.start].union()
    }
}

/// The guest RAM the rights tables cover.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RamSpan {
    /// First IPA.
    pub ipa: u64,
    /// Bytes.
    pub size: u64,
}

/// One slot of the mapping table: a live mapping, or a free slot on the free list.
#[derive(Clone, Copy, Debug)]
struct Slot {
    mapping: Mapping,
    /// The generation a handle of this slot must carry; bumped when the mapping goes.
    generation: u32,
    /// Free: the next free slot ([`NO_SLOT`] at the end of the list).
    next_free: u32,
    live: bool,
}

/// The end of the free list.
const NO_SLOT: u32 = u32::MAX;

/// A slot whose generation reached this is retired, never reused: a handle is then never
/// issued twice, so a stale one answers BAD_HANDLE forever.
const LAST_GENERATION: u32 = u32::MAX;

/// The handle of `index` in `generation`: the generation in the high half (never 0, so no
/// handle is 0), the slot index in the low half.
fn handle_of(index: u32, generation: u32) -> u64 {
    u64::from(generation) << 32 | u64::from(index)
}

/// The live mappings of one VM, and the counted rights of its strict devices.
///
/// Mappings live in a slab of slots found by handle in O(1): a handle names a slot and the
/// generation the slot had when the mapping was made. Unmapping frees the slot and bumps its
/// generation, so the old handle no longer matches (BAD_HANDLE) while the slot serves the next
/// mapping without any allocation. The slab grows (doubling, fallibly) only when every slot is
/// live, never beyond the quota.
#[derive(Debug)]
pub struct Mappings {
    slots: Vec<Slot>,
    free: u32,
    live: usize,
    quota: usize,
    rights: Vec<(u32, DeviceRights)>,
}

impl Default for Mappings {
    fn default() -> Self {
        Self::new()
    }
}

impl Mappings {
    /// No mappings, the default quota.
    pub const fn new() -> Self {
        Self {
            slots: Vec::new(),
            free: NO_SLOT,
            live: 0,
            quota: DEFAULT_MAPPING_QUOTA,
            rights: Vec::new(),
        }
    }

    /// Sets the most live mappings (the configuration's `dma-mappings`, at most 16M: every
    /// slot index fits the handle's low half).
    pub fn set_quota(&mut self, quota: usize) {
        self.quota = quota.min(NO_SLOT as usize);
    }

    /// Live mappings.
    pub fn len(&self) -> usize {
        self.live
    }

    /// Whether no mapping is live.
    pub fn is_empty(&self) -> bool {
        self.live == 0
    }

    /// Whether `more` mappings fit under the quota.
    pub fn has_room(&self, more: usize) -> bool {
        self.live.saturating_add(more) <= self.quota
    }

    /// Makes sure the next [`Self::insert`] cannot fail: the quota has room and a slot is free
    /// or the slab has the capacity for one more (the check step of a map).
    ///
    /// # Errors
    /// NO_MEMORY when the quota is reached or the slab cannot grow.
    #[inline]
    pub fn reserve(&mut self) -> Result<(), Status> {
        if !self.has_room(1) {
            return Err(Status::NoMemory);
        }
        if self.free == NO_SLOT && self.slots.len() == self.slots.capacity() {
            return self.grow();
        }
        Ok(())
    }

    /// Makes room for one more slot when every slot is live: doubles the slab, up to the quota
    /// (at least one more). Out of line: a map seldom needs it.
    ///
    /// # Errors
    /// NO_MEMORY when the slab cannot grow.
    #[cold]
    #[inline(never)]
    fn grow(&mut self) -> Result<(), Status> {
        let more = self
            .slots
            .len()
            .min(self.quota.saturating_sub(self.slots.len()))
            .max(1);
        self.slots
            .try_reserve_exact(more)
            .map_err(|_| Status::NoMemory)
    }

    /// `stream_id`'s rights table, if prepared (a linear search: a VM has a few strict devices).
    fn device_rights(&mut self, stream_id: u32) -> Option<&mut DeviceRights> {
        self.rights
            .iter_mut()
            .find(|(id, _)| *id == stream_id)
            .map(|(_, rights)| rights)
    }

    /// Prepares `stream_id`'s rights table over `ram` (allocated on the device's first mapping),
    /// so that a later [`Self::grant`] allocates nothing.
    ///
    /// # Errors
    /// NO_MEMORY when it cannot be allocated.
    pub fn prepare_rights(&mut self, ram: RamSpan, stream_id: u32) -> Result<(), Status> {
        if self.device_rights(stream_id).is_none() {
            let rights = DeviceRights::new(ram.ipa, (ram.size / PAGE_SIZE) as usize)?;
            self.rights.try_reserve(1).map_err(|_| Status::NoMemory)?;
            self.rights.push((stream_id, rights));
        }
        Ok(())
    }

    /// Grants a strict device `direction`'s rights on `span` (the pages of a buffer checked by
    /// [`check_buffer`] and the ledger, the rights table prepared by [`Self::prepare_rights`])
    /// and hands each run whose rights changed to `emit`, for the caller to write into the
    /// device's stage 2. Nothing changes on error.
    ///
    /// # Errors
    /// NO_DEVICE when the rights table was not prepared; OUT_OF_RANGE outside RAM; BUSY when a
    /// count would overflow.
    pub fn grant(
        &mut self,
        stream_id: u32,
        span: PageSpan,
        direction: DmaDirection,
        emit: impl FnMut(RightsChange),
    ) -> Result<(), Status> {
        self.device_rights(stream_id)
            .ok_or(Status::NoDevice)?
            .update(span, device_permissions(direction), true, emit)
    }

    /// Takes back what [`Self::grant`] gave (a mapping's unmap, or the undo of a failed map)
    /// and hands each run whose rights changed to `emit`. Returns whether the rights were found
    /// and taken back (all or nothing).
    pub fn revoke(
        &mut self,
        stream_id: u32,
        span: PageSpan,
        direction: DmaDirection,
        emit: impl FnMut(RightsChange),
    ) -> bool {
        self.device_rights(stream_id).is_some_and(|rights| {
            rights
                .update(span, device_permissions(direction), false, emit)
                .is_ok()
        })
    }

    /// The rights a strict device holds on the page of `ipa` (the union of its live mappings').
    pub fn rights(&self, stream_id: u32, ipa: u64) -> Option<Permissions> {
        self.rights
            .iter()
            .find(|(id, _)| *id == stream_id)?
            .1
            .union(ipa)
    }

    /// Adds a mapping and returns its handle.
    ///
    /// # Errors
    /// NO_MEMORY when the quota is reached or the slab cannot grow ([`Self::reserve`] first
    /// makes this infallible).
    pub fn insert(&mut self, mapping: Mapping) -> Result<u64, Status> {
        self.reserve()?;
        let index = if self.free != NO_SLOT {
            let index = self.free;
            let slot = &mut self.slots[index as usize];
            self.free = slot.next_free;
            slot.mapping = mapping;
            slot.live = true;
            index
        } else {
            let index = self.slots.len() as u32;
            self.slots.push(Slot {
                mapping,
                generation: 1,
                next_free: NO_SLOT,
                live: true,
            });
            index
        };
        self.live += 1;
        Ok(handle_of(index, self.slots[index as usize].generation))
    }

    /// The handles of the live mappings, in slot order.
    pub fn handles(&self) -> impl Iterator<Item = u64> + '_ {
        self.slots
            .iter()
            .enumerate()
            .filter(|(_, slot)| slot.live)
            .map(|(index, slot)| handle_of(index as u32, slot.generation))
    }

    /// The live slot `handle` names, if its generation still matches.
    fn slot(&self, handle: u64) -> Option<usize> {
        let index = (handle as u32) as usize;
        let slot = self.slots.get(index)?;
        (slot.live && handle_of(index as u32, slot.generation) == handle).then_some(index)
    }

    /// The mapping of `handle`.
    ///
    /// # Errors
    /// BAD_HANDLE for an unknown or stale handle.
    pub fn get(&self, handle: u64) -> Result<Mapping, Status> {
        self.slot(handle)
            .map(|index| self.slots[index].mapping)
            .ok_or(Status::BadHandle)
    }

    /// Removes the mapping of `handle` (its rights stay until [`Self::revoke`]). Its slot goes
    /// back to the free list under the next generation, or is retired after the last one.
    ///
    /// # Errors
    /// BAD_HANDLE for an unknown or stale handle.
    pub fn remove(&mut self, handle: u64) -> Result<Mapping, Status> {
        let index = self.slot(handle).ok_or(Status::BadHandle)?;
        let free = self.free;
        let slot = &mut self.slots[index];
        slot.live = false;
        slot.generation += 1;
        if slot.generation != LAST_GENERATION {
            slot.next_free = free;
            self.free = index as u32;
        }
        self.live -= 1;
        Ok(slot.mapping)
    }
}

/// A checked DMA_MAP_SG / DMA_UNMAP_SG request: where the segment array is and where this call
/// starts in it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SgRequest {
    /// IPA of the array.
    pub array: u64,
    /// Segments in it.
    pub count: u64,
    /// Index of the first segment this call handles (the resume cookie).
    pub first: u64,
}

impl SgRequest {
    /// Checks a scatter-gather call's array, count and cookie. The array must then be guest RAM
    /// (the caller's translation checks that).
    ///
    /// # Errors
    /// INVALID_PARAMETER for a zero count, one above [`dma_sg::MAX_SEGMENTS`] or a cookie at or
    /// past the end; ALIGNMENT for an array not 8-byte aligned; OUT_OF_RANGE when it wraps.
    pub fn check(array: u64, count: u64, cookie: u64) -> Result<Self, Status> {
        if count == 0 || count > dma_sg::MAX_SEGMENTS || cookie >= count {
            return Err(Status::InvalidParameter);
        }
        if !array.is_multiple_of(dma_sg::ARRAY_ALIGN) {
            return Err(Status::Alignment);
        }
        array
            .checked_add(count * dma_sg::SEGMENT_SIZE)
            .ok_or(Status::OutOfRange)?;
        Ok(Self {
            array,
            count,
            first: cookie,
        })
    }

    /// IPA of segment `index`.
    pub fn segment_ipa(&self, index: u64) -> u64 {
        self.array + index * dma_sg::SEGMENT_SIZE
    }
}

/// The work one scatter-gather call may do (I6): at most [`dma_sg::SEGMENTS_PER_CALL`] segments
/// and, past the first segment, no new segment once `bytes` have been maintained or mapped.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SgBudget {
    segments: u64,
    bytes: u64,
    limit: u64,
}

impl SgBudget {
    /// A fresh budget of `limit` bytes.
    pub fn new(limit: u64) -> Self {
        Self {
            segments: 0,
            bytes: 0,
            limit,
        }
    }

    /// Whether one more segment may start in this call (the first always may).
    pub fn admits(&self) -> bool {
        self.segments == 0 || (self.segments < dma_sg::SEGMENTS_PER_CALL && self.bytes < self.limit)
    }

    /// Charges a finished segment of `size` bytes.
    pub fn charge(&mut self, size: u64) {
        self.segments += 1;
        self.bytes = self.bytes.saturating_add(size);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use DmaDirection::*;

    const RAM: RamSpan = RamSpan {
        ipa: 0x4000_0000,
        size: 64 * PAGE_SIZE,
    };
    const SID: u32 = 0x10;

    /// Grants through the rights table (prepared on first use) and collects the changes.
    fn grant(
        table: &mut Mappings,
        ram: RamSpan,
        sid: u32,
        ipa: u64,
        size: u64,
        direction: DmaDirection,
    ) -> Result<Vec<RightsChange>, Status> {
        let span = check_buffer(ipa, size)?;
        table.prepare_rights(ram, sid)?;
        let mut changes = Vec::new();
        table.grant(sid, span, direction, |c| changes.push(c))?;
        Ok(changes)
    }

    /// Revokes and collects the changes (none when refused).
    fn revoke(
        table: &mut Mappings,
        sid: u32,
        ipa: u64,
        size: u64,
        direction: DmaDirection,
    ) -> Vec<RightsChange> {
        let Ok(span) = check_buffer(ipa, size) else {
            return Vec::new();
        };
        let mut changes = Vec::new();
        if !table.revoke(sid, span, direction, |c| changes.push(c)) {
            assert!(changes.is_empty(), "a refused revoke reported changes");
        }
        changes
    }

    fn mapping(ipa: u64, size: u64, direction: DmaDirection) -> Mapping {
        Mapping {
            stream_id: SID,
            ipa,
            size,
            direction,
            strict: true,
            coherent: false,
        }
    }

    #[test]
    fn stale_runs_merge_neighbours_and_fold_past_their_room() {
        let page = |n: u64| Ipa::new(0x4000_0000 + n * PAGE_SIZE);
        let mut runs = StaleRuns::new();
        assert!(runs.is_empty());
        runs.push(page(0), PAGE_SIZE);
        runs.push(page(1), 2 * PAGE_SIZE);
        assert_eq!(runs.as_slice(), &[(page(0), 3 * PAGE_SIZE)]);
        for n in [5, 7] {
            runs.push(page(n), PAGE_SIZE);
        }
        assert_eq!(runs.as_slice().len(), STALE_RUNS);
        // A fourth, below them all: one run covering every page pushed.
        runs.push(Ipa::new(0x3fff_f000), PAGE_SIZE);
        assert_eq!(runs.as_slice(), &[(Ipa::new(0x3fff_f000), 9 * PAGE_SIZE)]);
    }

    #[test]
    fn a_freed_slot_is_reused_and_its_old_handle_stays_bad() {
        let mut table = Mappings::new();
        let a = mapping(0x4000_0000, 0x10, ToDevice);
        let b = mapping(0x4000_1000, 0x20, FromDevice);
        let first = table.insert(a).unwrap();
        table.remove(first).unwrap();
        let second = table.insert(b).unwrap();
        // Same slot, next generation.
        assert_eq!(first as u32, second as u32);
        assert_ne!(first, second);
        assert_eq!(table.slots.len(), 1, "no new slot for a reused one");
        assert_eq!(table.get(first), Err(Status::BadHandle));
        assert_eq!(table.remove(first), Err(Status::BadHandle));
        assert_eq!(table.get(second), Ok(b), "a stale unmap changed nothing");
        // A handle with the slot right but another generation, or past the slab.
        assert_eq!(table.get(second + (1 << 32)), Err(Status::BadHandle));
        assert_eq!(table.get(second | 0xffff), Err(Status::BadHandle));
        assert_eq!(table.get(0), Err(Status::BadHandle), "no handle is 0");
    }

    #[test]
    fn a_slot_is_retired_at_its_last_generation() {
        let mut table = Mappings::new();
        let m = mapping(0x4000_0000, 0x10, ToDevice);
        let handle = table.insert(m).unwrap();
        assert_eq!(handle, handle_of(0, 1));
        table.slots[0].generation = LAST_GENERATION - 1;
        let old = handle_of(0, LAST_GENERATION - 1);
        assert_eq!(table.remove(old), Ok(m));
        // Retired: the next mapping takes a new slot, the retired one answers nothing.
        let next = table.insert(m).unwrap();
        assert_eq!(next as u32, 1);
        assert_eq!(table.get(old), Err(Status::BadHandle));
        assert_eq!(
            table.get(handle_of(0, LAST_GENERATION)),
            Err(Status::BadHandle)
        );
        assert_eq!(table.len(), 1);
    }

    #[test]
    fn steady_map_and_unmap_reuse_one_slot() {
        let mut table = Mappings::new();
        table.set_quota(4);
        let m = mapping(0x4000_0000, 0x10, ToDevice);
        let keep = table.insert(m).unwrap();
        for _ in 0..1000 {
            table.reserve().unwrap();
            let handle = table.insert(m).unwrap();
            table.remove(handle).unwrap();
        }
        assert_eq!(table.slots.len(), 2);
        assert!(table.slots.capacity() <= 4, "growth bounded by the quota");
        assert_eq!(table.get(keep), Ok(m));
    }

    #[test]
    fn handles_are_never_reused() {
        let mut table = Mappings::new();
        let m = mapping(0x4000_0010, 0x20, ToDevice);
        let first = table.insert(m).unwrap();
        assert_eq!(table.get(first), Ok(m));
        assert_eq!(table.remove(first), Ok(m));
        assert_eq!(table.get(first), Err(Status::BadHandle));
        assert_eq!(table.remove(first), Err(Status::BadHandle));
        let second = table.insert(m).unwrap();
        assert_ne!(first, second);
        assert_eq!(table.get(first), Err(Status::BadHandle));
        for bad in [0, u64::MAX, 0xffff_ffff, second + 1] {
            assert_eq!(table.get(bad), Err(Status::BadHandle), "{bad:#x}");
        }
    }

    #[test]
    fn the_default_quota_holds_65536_and_a_configured_one_is_enforced() {
        let mut table = Mappings::new();
        let m = mapping(0x4000_0000, 8, ToDevice);
        for _ in 0..DEFAULT_MAPPING_QUOTA {
            table.insert(m).unwrap();
        }
        assert_eq!(table.len(), DEFAULT_MAPPING_QUOTA);
        assert_eq!(table.insert(m), Err(Status::NoMemory));
        let mut small = Mappings::new();
        small.set_quota(2);
        let a = small.insert(m).unwrap();
        small.insert(m).unwrap();
        assert!(!small.has_room(1));
        assert_eq!(small.insert(m), Err(Status::NoMemory));
        small.remove(a).unwrap();
        assert!(small.insert(m).is_ok(), "room again after an unmap");
    }

    #[test]
    fn buffers_are_checked_and_spanned() {
        let rows: [(u64, u64, Result<PageSpan, Status>); 9] = [
            (
                0x4000_0000,
                0x1000,
                Ok(PageSpan {
                    ipa: 0x4000_0000,
                    size: 0x1000,
                }),
            ),
            (
                0x4000_0010,
                0x10,
                Ok(PageSpan {
                    ipa: 0x4000_0000,
                    size: 0x1000,
                }),
            ),
            (
                0x4000_0ff0,
                0x20,
                Ok(PageSpan {
                    ipa: 0x4000_0000,
                    size: 0x2000,
                }),
            ),
            (
                0x4000_0001,
                0x1000,
                Ok(PageSpan {
                    ipa: 0x4000_0000,
                    size: 0x2000,
                }),
            ),
            (0x4000_0000, 0, Err(Status::InvalidParameter)),
            (
                0x4000_0000,
                MAX_MAPPING_BYTES + 1,
                Err(Status::InvalidParameter),
            ),
            (
                0x4000_0000,
                MAX_MAPPING_BYTES,
                Ok(PageSpan {
                    ipa: 0x4000_0000,
                    size: MAX_MAPPING_BYTES,
                }),
            ),
            (u64::MAX - 0xf, 0x20, Err(Status::OutOfRange)),
            (u64::MAX - 0xfff, 0x10, Err(Status::OutOfRange)),
        ];
        for (ipa, size, want) in rows {
            assert_eq!(check_buffer(ipa, size), want, "{ipa:#x}+{size:#x}");
        }
    }

    fn change(
        page: u64,
        pages: u64,
        before: Option<Permissions>,
        after: Option<Permissions>,
    ) -> RightsChange {
        RightsChange {
            ipa: RAM.ipa + page * PAGE_SIZE,
            size: pages * PAGE_SIZE,
            before,
            after,
        }
    }

    const RO: Option<Permissions> = Some(Permissions::RO);
    const WO: Option<Permissions> = Some(Permissions::WO);
    const RW: Option<Permissions> = Some(Permissions::RW);

    /// Table of steps: (grant or revoke, buffer offset from RAM, size, direction, changes).
    #[test]
    fn rights_are_the_counted_union_of_live_mappings() {
        struct Row {
            grant: bool,
            offset: u64,
            size: u64,
            direction: DmaDirection,
            changes: Vec<RightsChange>,
        }
        let row = |grant, offset, size, direction, changes| Row {
            grant,
            offset,
            size,
            direction,
            changes,
        };
        // virtio-blk's shape: a header (to the device) and a status byte (from the device) in
        // one page, then a data buffer across two pages.
        let rows = [
            row(true, 0x100, 16, ToDevice, vec![change(0, 1, None, RO)]),
            row(true, 0x110, 1, FromDevice, vec![change(0, 1, RO, RW)]),
            // The data buffer starts in page 0 (already written to) and ends in page 1.
            row(
                true,
                0x200,
                0x1000,
                FromDevice,
                vec![change(1, 1, None, WO)],
            ),
            row(true, 0x300, 8, ToDevice, vec![]),
            // Removing the header keeps read (the second to-device buffer).
            row(false, 0x100, 16, ToDevice, vec![]),
            // The status byte goes; the data buffer still writes page 0.
            row(false, 0x110, 1, FromDevice, vec![]),
            row(
                false,
                0x200,
                0x1000,
                FromDevice,
                vec![change(0, 1, RW, RO), change(1, 1, WO, None)],
            ),
            row(false, 0x300, 8, ToDevice, vec![change(0, 1, RO, None)]),
            // Bidirectional over three pages, then from-device in the middle one: no change.
            row(
                true,
                0x2000,
                0x3000,
                Bidirectional,
                vec![change(2, 3, None, RW)],
            ),
            row(true, 0x3800, 0x10, FromDevice, vec![]),
            row(
                false,
                0x2000,
                0x3000,
                Bidirectional,
                vec![
                    change(2, 1, RW, None),
                    change(3, 1, RW, WO),
                    change(4, 1, RW, None),
                ],
            ),
            row(
                false,
                0x3800,
                0x10,
                FromDevice,
                vec![change(3, 1, WO, None)],
            ),
        ];
        let mut table = Mappings::new();
        for (i, r) in rows.iter().enumerate() {
            let ipa = RAM.ipa + r.offset;
            let changes = if r.grant {
                grant(&mut table, RAM, SID, ipa, r.size, r.direction).unwrap()
            } else {
                revoke(&mut table, SID, ipa, r.size, r.direction)
            };
            assert_eq!(changes, r.changes, "row {i}");
            // The other device is untouched.
            assert_eq!(table.rights(SID + 1, ipa), None);
        }
        for page in 0..8 {
            assert_eq!(
                table.rights(SID, RAM.ipa + page * PAGE_SIZE),
                None,
                "page {page} at the end"
            );
        }
    }

    #[test]
    fn rights_refusals_change_nothing() {
        let mut table = Mappings::new();
        assert_eq!(
            grant(&mut table, RAM, SID, RAM.ipa + RAM.size, 0x10, ToDevice),
            Err(Status::OutOfRange)
        );
        assert_eq!(
            grant(&mut table, RAM, SID, RAM.ipa - 0x1000, 0x2000, ToDevice),
            Err(Status::OutOfRange)
        );
        assert_eq!(
            grant(&mut table, RAM, SID, RAM.ipa, 0, ToDevice),
            Err(Status::InvalidParameter)
        );
        assert_eq!(table.rights(SID, RAM.ipa), None);
        // A revoke of what was never granted (a bug) is refused whole, not half-applied.
        grant(&mut table, RAM, SID, RAM.ipa, 0x10, ToDevice).unwrap();
        assert_eq!(revoke(&mut table, SID, RAM.ipa, 0x2000, ToDevice), vec![]);
        assert_eq!(table.rights(SID, RAM.ipa), RO);
        assert_eq!(revoke(&mut table, SID + 5, RAM.ipa, 0x10, ToDevice), vec![]);
        // The one-page path refuses the same way: an underflow (write never granted) and an
        // overflow change nothing and report nothing.
        assert_eq!(revoke(&mut table, SID, RAM.ipa, 0x10, FromDevice), vec![]);
        assert_eq!(table.rights(SID, RAM.ipa), RO);
        let page = RAM.ipa + 0x5000;
        grant(&mut table, RAM, SID, page, 8, ToDevice).unwrap();
        for _ in 1..u16::MAX {
            assert_eq!(grant(&mut table, RAM, SID, page, 8, ToDevice), Ok(vec![]));
        }
        assert_eq!(
            grant(&mut table, RAM, SID, page, 8, Bidirectional),
            Err(Status::Busy)
        );
        assert_eq!(table.rights(SID, page), RO);
        assert_eq!(
            grant(&mut table, RAM, SID, page, 8, FromDevice),
            Ok(vec![RightsChange {
                ipa: page,
                size: PAGE_SIZE,
                before: RO,
                after: RW
            }])
        );
    }

    /// Every interleaving of map and unmap of three buffers on one page keeps the union equal to
    /// the union of what is live.
    #[test]
    fn the_union_never_exceeds_the_live_mappings() {
        let buffers = [
            (0x0, ToDevice),
            (0x40, FromDevice),
            (0x80, Bidirectional),
            (0xc0, ToDevice),
        ];
        for order in 0u32..(1 << 8) {
            let mut table = Mappings::new();
            let mut live = [false; 4];
            for step in 0..8 {
                let which = ((order >> step) & 1) as usize + (step % 2) * 2;
                let (offset, direction) = buffers[which];
                let ipa = RAM.ipa + offset;
                if live[which] {
                    revoke(&mut table, SID, ipa, 0x40, direction);
                } else {
                    grant(&mut table, RAM, SID, ipa, 0x40, direction).unwrap();
                }
                live[which] = !live[which];
                let want = buffers
                    .iter()
                    .zip(live)
                    .filter(|(_, l)| *l)
                    .fold(Counts::default(), |c, ((_, d), _)| {
                        let p = device_permissions(*d);
                        Counts {
                            read: c.read + p.read as u16,
                            write: c.write + p.write as u16,
                        }
                    })
                    .union();
                assert_eq!(
                    table.rights(SID, RAM.ipa),
                    want,
                    "order {order:#x} step {step}"
                );
            }
        }
    }

    #[test]
    fn scatter_gather_requests_are_checked() {
        use dma_sg::{MAX_SEGMENTS, SEGMENT_SIZE};
        let rows: [(u64, u64, u64, Result<SgRequest, Status>); 8] = [
            (
                0x4000_0000,
                3,
                0,
                Ok(SgRequest {
                    array: 0x4000_0000,
                    count: 3,
                    first: 0,
                }),
            ),
            (
                0x4000_0000,
                3,
                2,
                Ok(SgRequest {
                    array: 0x4000_0000,
                    count: 3,
                    first: 2,
                }),
            ),
            (0x4000_0000, 3, 3, Err(Status::InvalidParameter)),
            (0x4000_0000, 0, 0, Err(Status::InvalidParameter)),
            (
                0x4000_0000,
                MAX_SEGMENTS + 1,
                0,
                Err(Status::InvalidParameter),
            ),
            (0x4000_0004, 3, 0, Err(Status::Alignment)),
            (u64::MAX - 7, 1, 0, Err(Status::OutOfRange)),
            (
                u64::MAX - 2 * SEGMENT_SIZE + 1,
                2,
                0,
                Err(Status::OutOfRange),
            ),
        ];
        for (array, count, cookie, want) in rows {
            assert_eq!(
                SgRequest::check(array, count, cookie),
                want,
                "{array:#x} {count} {cookie}"
            );
        }
        let request = SgRequest::check(0x4000_0000, 3, 0).unwrap();
        assert_eq!(request.segment_ipa(2), 0x4000_0000 + 2 * SEGMENT_SIZE);
    }

    #[test]
    fn the_scatter_gather_budget_bounds_a_call() {
        // Small segments: the segment limit.
        let mut budget = SgBudget::new(1 << 20);
        let mut done = 0;
        while budget.admits() {
            budget.charge(64);
            done += 1;
        }
        assert_eq!(done, dma_sg::SEGMENTS_PER_CALL);
        // Large segments: the byte limit, but never less than one segment.
        let mut budget = SgBudget::new(1 << 20);
        assert!(budget.admits());
        budget.charge(MAX_MAPPING_BYTES);
        assert!(!budget.admits());
        let mut budget = SgBudget::new(1 << 20);
        budget.charge(512 << 10);
        assert!(budget.admits());
        budget.charge(512 << 10);
        assert!(!budget.admits());
    }

    #[test]
    fn maintenance_by_direction_and_step() {
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
        assert_eq!(direction(u64::MAX), None);
        assert_eq!(direction(2), Some(FromDevice));
    }
}
