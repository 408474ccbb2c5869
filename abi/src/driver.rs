//! The client library for guest drivers: a safe API over the memory-attribute and
//! cache-maintenance calls that hides the INCOMPLETE loops and the batch cookies.
//!
//! Every call goes through a [`Conduit`]: [`Hvc`] in a guest (aarch64 only), or a fake in host
//! tests. A range call is repeated from where the hypervisor stopped until the whole range is
//! done; a call that reports no progress [`MAX_STALLED_CALLS`] times in a row ends the loop with
//! [`Error::Stalled`], so a misbehaving hypervisor can never make a driver spin forever.
//!
//! Addresses: attribute calls and IPA-addressed cache operations take IPAs; a cache operation
//! with [`Addressing::Va`] takes a VA of the calling guest's current stage 1 (the hypervisor
//! translates it). A guest whose buffers live at VA != IPA passes the IPA to the first kind and
//! either to the second; [`Client::ipa_of_buffer`] finds the IPA of a buffer.
//!
//! The worked example of docs/abi.md: a descriptor ring made non-cacheable once, and a receive
//! buffer kept write-back, cleaned before the device writes it and truly invalidated by VA after.
//!
//! ```
//! use stagehand_abi::driver::{Addressing, Attribute, Client, Conduit, Error, Range};
//!
//! /// Once: the descriptor ring becomes non-cacheable in every alias.
//! fn ring_setup<C: Conduit>(hypervisor: &mut Client<C>, ring_ipa: u64, ring_len: u64) -> Result<(), Error> {
//!     if !hypervisor.features()?.va_addressing() {
//!         return Err(Error::NotSupported);
//!     }
//!     hypervisor.set_attribute(Range::new(ring_ipa, ring_len), Attribute::NonCacheable)
//! }
//!
//! /// Before the device writes the buffer: no dirty line may be left to be evicted over its data.
//! fn receive_prepare<C: Conduit>(hypervisor: &mut Client<C>, buffer_va: u64, len: u64) -> Result<(), Error> {
//!     hypervisor.clean_invalidate(Range::new(buffer_va, len), Addressing::Va).map(|_| ())
//! }
//!
//! /// After the device has written it: drop what the CPU fetched meanwhile, writing nothing back.
//! fn receive_complete<C: Conduit>(hypervisor: &mut Client<C>, buffer_va: u64, len: u64) -> Result<(), Error> {
//!     let outcome = hypervisor.invalidate(Range::new(buffer_va, len), Addressing::Va)?;
//!     // `widened`: a page is pinned for a device, so the hypervisor cleaned as well.
//!     let _ = outcome.widened;
//!     Ok(())
//! }
//! # struct Accepting;
//! # impl Conduit for Accepting {
//! #     fn call(&mut self, function: u32, args: [u64; 6]) -> stagehand_abi::Regs {
//! #         let features = stagehand_abi::feature::VA_ADDRESSING;
//! #         let x1 = if function == stagehand_abi::function::FEATURES { features } else { args[1] };
//! #         stagehand_abi::Regs { x0: 0, x1, x2: 0, x3: 0 }
//! #     }
//! # }
//! # let mut hypervisor = Client::new(Accepting);
//! # ring_setup(&mut hypervisor, 0x4100_0000, 0x4000).unwrap();
//! # receive_prepare(&mut hypervisor, 0x2000_0000_1000, 1500).unwrap();
//! # receive_complete(&mut hypervisor, 0x2000_0000_1000, 1500).unwrap();
//! ```
//!
//! In a guest the client is `Client::new(Hvc)`.
//!
//! No allocation, no `unsafe`: the only instruction is in [`crate::client`].

#![forbid(unsafe_code)]

use core::fmt;

use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

use crate::dma_sg::Segment;
use crate::{
    access, attr, batch, cache_op, dma_direction, dma_sync, feature, function, page_flag, Regs,
    Status,
};

/// Consecutive calls without progress after which a loop gives up with [`Error::Stalled`].
/// The hypervisor always makes progress on a call it answers INCOMPLETE, so reaching this bound
/// means the hypervisor (or the conduit) misbehaves.
pub const MAX_STALLED_CALLS: u32 = 8;

/// How a hypercall reaches the hypervisor.
pub trait Conduit {
    /// Issues the fast call `function` with x1-x6 = `args` and returns x0-x3.
    fn call(&mut self, function: u32, args: [u64; 6]) -> Regs;
}

/// The real conduit: `HVC #0` through [`crate::client::call`].
#[cfg(target_arch = "aarch64")]
#[derive(Clone, Copy, Debug, Default)]
pub struct Hvc;

#[cfg(target_arch = "aarch64")]
impl Conduit for Hvc {
    fn call(&mut self, function: u32, args: [u64; 6]) -> Regs {
        crate::client::call(function, args)
    }
}

/// Everything a call of this library can fail with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Error {
    /// NOT_SUPPORTED: the hypervisor does not implement the call (or is not stagehand).
    NotSupported,
    /// NOT_REQUIRED: nothing had to be done.
    NotRequired,
    /// INVALID_PARAMETER: unknown attribute, operation or flag, zero size, a guest VA that stage
    /// 1 does not map, or a malformed batch entry or cookie.
    InvalidParameter,
    /// ALIGNMENT: an address or size is not aligned as the call requires.
    Alignment,
    /// OUT_OF_RANGE: the range wraps or leaves the caller's RAM.
    OutOfRange,
    /// DENIED: the range touches memory the caller may not use this way (its MMIO).
    Denied,
    /// BUSY: a page is pinned for DMA.
    Busy,
    /// NO_MEMORY: the hypervisor ran out of memory for the request.
    NoMemory,
    /// NO_DEVICE: unknown device, or one not assigned to the caller.
    NoDevice,
    /// BAD_HANDLE: unknown or stale handle.
    BadHandle,
    /// The hypervisor answered a status code that this ABI does not define.
    UnknownStatus(i64),
    /// The answer broke the ABI: SUCCESS or INCOMPLETE where it cannot be, more progress than
    /// was asked for, a cookie that went backwards, an unknown attribute.
    Protocol,
    /// [`MAX_STALLED_CALLS`] calls in a row answered INCOMPLETE without progress.
    Stalled,
    /// A [`Batch`] has no room for another entry.
    BatchFull,
}

impl From<Status> for Error {
    /// Maps an error status to its variant; SUCCESS and INCOMPLETE, which are no errors, map to
    /// [`Error::Protocol`].
    fn from(status: Status) -> Self {
        match status {
            Status::Success | Status::Incomplete => Error::Protocol,
            Status::NotSupported => Error::NotSupported,
            Status::NotRequired => Error::NotRequired,
            Status::InvalidParameter => Error::InvalidParameter,
            Status::Alignment => Error::Alignment,
            Status::OutOfRange => Error::OutOfRange,
            Status::Denied => Error::Denied,
            Status::Busy => Error::Busy,
            Status::NoMemory => Error::NoMemory,
            Status::NoDevice => Error::NoDevice,
            Status::BadHandle => Error::BadHandle,
        }
    }
}

impl Error {
    /// The ABI status this error came from, if it came from one.
    pub fn status(self) -> Option<Status> {
        Some(match self {
            Error::NotSupported => Status::NotSupported,
            Error::NotRequired => Status::NotRequired,
            Error::InvalidParameter => Status::InvalidParameter,
            Error::Alignment => Status::Alignment,
            Error::OutOfRange => Status::OutOfRange,
            Error::Denied => Status::Denied,
            Error::Busy => Status::Busy,
            Error::NoMemory => Status::NoMemory,
            Error::NoDevice => Status::NoDevice,
            Error::BadHandle => Status::BadHandle,
            Error::UnknownStatus(_) | Error::Protocol | Error::Stalled | Error::BatchFull => {
                return None
            }
        })
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::UnknownStatus(code) => write!(f, "unknown status {code}"),
            Error::Protocol => f.write_str("the hypervisor's answer broke the ABI"),
            Error::Stalled => write!(f, "no progress in {MAX_STALLED_CALLS} calls"),
            Error::BatchFull => f.write_str("the batch is full"),
            other => f.write_str(other.status().map_or("?", Status::name)),
        }
    }
}

/// Reads x0 as a status: `Ok` for SUCCESS and INCOMPLETE, the error otherwise.
fn status_of(regs: &Regs) -> Result<Status, Error> {
    let code = regs.x0 as i64;
    match Status::from_code(code) {
        Some(status @ (Status::Success | Status::Incomplete)) => Ok(status),
        Some(error) => Err(error.into()),
        None => Err(Error::UnknownStatus(code)),
    }
}

/// A page's stage-2 attribute.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Attribute {
    /// Normal write-back (the default).
    WriteBack,
    /// Normal non-cacheable: every alias of the page is non-cacheable.
    NonCacheable,
}

impl Attribute {
    /// The ABI value (MEM_SET_ATTR x3, MEM_GET_ATTR x1).
    pub const fn abi(self) -> u64 {
        match self {
            Attribute::WriteBack => attr::NORMAL_WB,
            Attribute::NonCacheable => attr::NORMAL_NC,
        }
    }

    /// Decodes an ABI value.
    pub const fn from_abi(value: u64) -> Option<Self> {
        match value {
            attr::NORMAL_WB => Some(Attribute::WriteBack),
            attr::NORMAL_NC => Some(Attribute::NonCacheable),
            _ => None,
        }
    }
}

/// A cache operation, to the point of coherency.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Operation {
    /// Write dirty lines back.
    Clean,
    /// Discard lines (partial edge lines are cleaned first; widened to clean+invalidate on a
    /// page the caller shares with a device).
    Invalidate,
    /// Write back, then discard.
    CleanInvalidate,
}

impl Operation {
    /// The ABI operation code (CACHE_OP x3 without flags).
    pub const fn abi(self) -> u64 {
        match self {
            Operation::Clean => cache_op::CLEAN,
            Operation::Invalidate => cache_op::INVALIDATE,
            Operation::CleanInvalidate => cache_op::CLEAN_INVALIDATE,
        }
    }
}

/// What kind of address a cache operation names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Addressing {
    /// An intermediate physical address.
    Ipa,
    /// A virtual address of the calling guest (translated by its current stage 1).
    Va,
}

impl Addressing {
    const fn flag(self) -> u64 {
        match self {
            Addressing::Ipa => 0,
            Addressing::Va => cache_op::FLAG_VA,
        }
    }
}

/// How MEM_QUERY_VA translates.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    /// As a read.
    Read,
    /// As a write.
    Write,
}

/// A byte range: an IPA or a VA, as the call says.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Range {
    /// First byte.
    pub start: u64,
    /// Bytes.
    pub size: u64,
}

impl Range {
    /// `[start, start + size)`.
    pub const fn new(start: u64, size: u64) -> Self {
        Range { start, size }
    }
}

/// What FEATURES reports.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Features {
    /// The raw capability bits (x1), [`crate::feature`].
    pub bits: u64,
    /// D-cache line size in bytes (x2).
    pub line_size: u64,
    /// Bytes of work one call does at most (x3).
    pub budget: u64,
}

impl Features {
    /// Stage 2 uses FEAT_S2FWB encodings.
    pub const fn fwb(&self) -> bool {
        self.bits & feature::FWB != 0
    }
    /// The hypervisor owns an SMMUv3.
    pub const fn smmu(&self) -> bool {
        self.bits & feature::SMMU != 0
    }
    /// A device is in strict DMA mode.
    pub const fn dma_strict(&self) -> bool {
        self.bits & feature::DMA_STRICT != 0
    }
    /// CACHE_OP accepts guest VAs.
    pub const fn va_addressing(&self) -> bool {
        self.bits & feature::VA_ADDRESSING != 0
    }
}

/// What MEM_GET_ATTR reports of one page.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PageInfo {
    /// Its stage-2 attribute.
    pub attribute: Attribute,
    /// Pinned by a DMA mapping.
    pub pinned: bool,
    /// Mapped by a 2 MiB stage-2 block.
    pub block_mapped: bool,
    /// DMA mappings holding it.
    pub pins: u64,
}

/// What MEM_QUERY_VA reports of one guest VA.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VaInfo {
    /// The IPA it translates to (page offset included).
    pub ipa: u64,
    /// The attribute after both stages, MAIR encoding ([`crate::mair`]).
    pub effective: u8,
    /// The attribute of the guest's own stage 1, MAIR encoding.
    pub stage1: u8,
}

/// How a cache operation went.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Outcome {
    /// An INVALIDATE was widened to CLEAN_INVALIDATE on at least part of the range.
    pub widened: bool,
}

/// One CACHE_OP_BATCH entry, as the hypervisor reads it: 24 bytes, little-endian (the guest's
/// own byte order on every aarch64 system this ABI targets).
#[derive(
    Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
)]
#[repr(C)]
pub struct BatchEntry {
    /// First address (IPA, or guest VA with [`cache_op::FLAG_VA`] in `op`).
    pub address: u64,
    /// Bytes (not zero).
    pub size: u64,
    /// [`cache_op`] code, or-ed with [`cache_op::FLAG_VA`] for a guest VA.
    pub op: u32,
    /// Zero.
    pub reserved: u32,
}

const _: () = assert!(core::mem::size_of::<BatchEntry>() as u64 == batch::ENTRY_SIZE);
const _: () = assert!(core::mem::align_of::<BatchEntry>() as u64 >= batch::ARRAY_ALIGN);

impl BatchEntry {
    /// The entry for `operation` on `range`.
    pub const fn new(range: Range, operation: Operation, addressing: Addressing) -> Self {
        BatchEntry {
            address: range.start,
            size: range.size,
            op: (operation.abi() | addressing.flag()) as u32,
            reserved: 0,
        }
    }
}

/// The direction of a DMA buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Direction {
    /// The device reads and writes it.
    Bidirectional,
    /// The device reads it.
    ToDevice,
    /// The device writes it.
    FromDevice,
}

impl Direction {
    /// The DMA_MAP x4 value.
    pub const fn abi(self) -> u64 {
        match self {
            Direction::Bidirectional => dma_direction::BIDIRECTIONAL,
            Direction::ToDevice => dma_direction::TO_DEVICE,
            Direction::FromDevice => dma_direction::FROM_DEVICE,
        }
    }
}

/// A live DMA mapping, as DMA_MAP returns it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DmaMapping {
    /// The address to program the device with (= the buffer's IPA).
    pub iova: u64,
    /// The handle for DMA_SYNC and DMA_UNMAP.
    pub handle: u64,
}

/// How far a scatter-gather map got before an error.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SgError {
    /// What stopped it.
    pub error: Error,
    /// Segments mapped (their handles written): unmap them with [`Client::dma_unmap_sg`].
    pub mapped: usize,
}

/// A CACHE_OP_BATCH under construction, in an array the caller provides (and whose IPA it
/// knows: the hypervisor reads the array by IPA).
#[derive(Debug)]
pub struct Batch<'a> {
    entries: &'a mut [BatchEntry],
    ipa: u64,
    len: usize,
}

impl<'a> Batch<'a> {
    /// An empty batch that fills `storage`, which lies at IPA `storage_ipa`, contiguous in IPA
    /// space (see [`Client::ipa_of_buffer`]).
    ///
    /// # Errors
    /// [`Error::Alignment`] if `storage_ipa` is not 8-byte aligned.
    pub fn new(storage: &'a mut [BatchEntry], storage_ipa: u64) -> Result<Self, Error> {
        if !storage_ipa.is_multiple_of(batch::ARRAY_ALIGN) {
            return Err(Error::Alignment);
        }
        Ok(Batch {
            entries: storage,
            ipa: storage_ipa,
            len: 0,
        })
    }

    /// Appends `operation` on `range`.
    ///
    /// # Errors
    /// [`Error::BatchFull`] when the storage (or the ABI's [`batch::MAX_ENTRIES`]) is full.
    pub fn push(
        &mut self,
        range: Range,
        operation: Operation,
        addressing: Addressing,
    ) -> Result<(), Error> {
        let slot = self
            .entries
            .get_mut(self.len)
            .filter(|_| (self.len as u64) < batch::MAX_ENTRIES);
        let slot = slot.ok_or(Error::BatchFull)?;
        *slot = BatchEntry::new(range, operation, addressing);
        self.len += 1;
        Ok(())
    }

    /// Entries pushed.
    pub fn len(&self) -> usize {
        self.len
    }

    /// No entry pushed.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Entries the storage holds at most.
    pub fn capacity(&self) -> usize {
        self.entries.len()
    }

    /// The entries pushed so far.
    pub fn entries(&self) -> &[BatchEntry] {
        &self.entries[..self.len]
    }

    /// Forgets every entry.
    pub fn clear(&mut self) {
        self.len = 0;
    }
}

/// The hypervisor, as a guest driver sees it.
#[derive(Debug)]
pub struct Client<C: Conduit> {
    conduit: C,
}

impl<C: Conduit> Client<C> {
    /// A client that calls through `conduit`.
    pub const fn new(conduit: C) -> Self {
        Client { conduit }
    }

    /// The conduit.
    pub fn conduit(&mut self) -> &mut C {
        &mut self.conduit
    }

    fn call(&mut self, function: u32, x1: u64, x2: u64, x3: u64) -> Regs {
        self.conduit.call(function, [x1, x2, x3, 0, 0, 0])
    }

    /// FEATURES: capability bits, line size, budget per call.
    ///
    /// # Errors
    /// [`Error::NotSupported`] from a hypervisor that is not stagehand, or any error status.
    pub fn features(&mut self) -> Result<Features, Error> {
        let regs = self.call(function::FEATURES, 0, 0, 0);
        match status_of(&regs)? {
            Status::Success => Ok(Features {
                bits: regs.x1,
                line_size: regs.x2,
                budget: regs.x3,
            }),
            _ => Err(Error::Protocol),
        }
    }

    /// MEM_SET_ATTR over the whole of `range` (IPA, 4 KiB-aligned start and size), as many
    /// calls as it takes. On an error part of the range may already have the new attribute;
    /// the pages the failing call named have not changed.
    ///
    /// # Errors
    /// The first error status (ALIGNMENT, OUT_OF_RANGE, DENIED, BUSY, INVALID_PARAMETER,
    /// NO_MEMORY), [`Error::Stalled`] or [`Error::Protocol`].
    pub fn set_attribute(&mut self, range: Range, attribute: Attribute) -> Result<(), Error> {
        self.range_calls(function::MEM_SET_ATTR, range, attribute.abi())
            .map(|_| ())
    }

    /// MEM_GET_ATTR of the page holding `ipa`.
    ///
    /// # Errors
    /// OUT_OF_RANGE, DENIED, or [`Error::Protocol`] for an attribute this ABI does not define.
    pub fn attribute(&mut self, ipa: u64) -> Result<PageInfo, Error> {
        let regs = self.call(function::MEM_GET_ATTR, ipa, 0, 0);
        if status_of(&regs)? != Status::Success {
            return Err(Error::Protocol);
        }
        Ok(PageInfo {
            attribute: Attribute::from_abi(regs.x1).ok_or(Error::Protocol)?,
            pinned: regs.x2 & page_flag::PINNED != 0,
            block_mapped: regs.x2 & page_flag::BLOCK_MAPPED != 0,
            pins: regs.x3,
        })
    }

    /// MEM_QUERY_VA: translates the calling guest's `va` through both stages.
    ///
    /// # Errors
    /// INVALID_PARAMETER (stage 1 does not map it), OUT_OF_RANGE (the IPA is not the caller's
    /// RAM), DENIED (it is the caller's MMIO).
    pub fn query_va(&mut self, va: u64, access: Access) -> Result<VaInfo, Error> {
        let kind = match access {
            Access::Read => access::READ,
            Access::Write => access::WRITE,
        };
        let regs = self.call(function::MEM_QUERY_VA, va, kind, 0);
        if status_of(&regs)? != Status::Success {
            return Err(Error::Protocol);
        }
        Ok(VaInfo {
            ipa: regs.x1,
            effective: regs.x2 as u8,
            stage1: regs.x3 as u8,
        })
    }

    /// The IPA of the buffer at guest VA `va`, `len` bytes long, checking with MEM_QUERY_VA
    /// that every page of it is contiguous in IPA space (what the hypervisor needs of a batch
    /// array).
    ///
    /// # Errors
    /// Those of [`Self::query_va`]; [`Error::InvalidParameter`] if the buffer is not
    /// contiguous in IPA space or wraps.
    pub fn ipa_of_buffer(&mut self, va: u64, len: u64) -> Result<u64, Error> {
        let ipa = self.query_va(va, Access::Read)?.ipa;
        let end = va.checked_add(len).ok_or(Error::InvalidParameter)?;
        let mut page = (va | (crate::PAGE_SIZE - 1)).wrapping_add(1);
        while page < end {
            if self.query_va(page, Access::Read)?.ipa != ipa + (page - va) {
                return Err(Error::InvalidParameter);
            }
            page += crate::PAGE_SIZE;
        }
        Ok(ipa)
    }

    /// CACHE_OP over the whole of `range`, as many calls as it takes. Any byte range works:
    /// the hypervisor rounds out to whole lines (an INVALIDATE cleans the partial edge lines).
    ///
    /// # Errors
    /// The first error status (INVALID_PARAMETER, OUT_OF_RANGE, DENIED), [`Error::Stalled`]
    /// or [`Error::Protocol`]. On an error the part before the failing call is done.
    pub fn cache_operation(
        &mut self,
        range: Range,
        operation: Operation,
        addressing: Addressing,
    ) -> Result<Outcome, Error> {
        let flags = self.range_calls(
            function::CACHE_OP,
            range,
            operation.abi() | addressing.flag(),
        )?;
        Ok(Outcome {
            widened: flags & cache_op::RESULT_WIDENED != 0,
        })
    }

    /// [`Self::cache_operation`] with [`Operation::Clean`].
    ///
    /// # Errors
    /// As [`Self::cache_operation`].
    pub fn clean(&mut self, range: Range, addressing: Addressing) -> Result<Outcome, Error> {
        self.cache_operation(range, Operation::Clean, addressing)
    }

    /// [`Self::cache_operation`] with [`Operation::Invalidate`] (a true invalidate, which
    /// EL1's own `DC IVAC` is not under stage 2).
    ///
    /// # Errors
    /// As [`Self::cache_operation`].
    pub fn invalidate(&mut self, range: Range, addressing: Addressing) -> Result<Outcome, Error> {
        self.cache_operation(range, Operation::Invalidate, addressing)
    }

    /// [`Self::cache_operation`] with [`Operation::CleanInvalidate`].
    ///
    /// # Errors
    /// As [`Self::cache_operation`].
    pub fn clean_invalidate(
        &mut self,
        range: Range,
        addressing: Addressing,
    ) -> Result<Outcome, Error> {
        self.cache_operation(range, Operation::CleanInvalidate, addressing)
    }

    /// CACHE_OP_BATCH over every entry of `batch`, resuming with the cookie until all are done.
    /// An empty batch makes no call.
    ///
    /// # Errors
    /// The first error status (INVALID_PARAMETER for a malformed entry, OUT_OF_RANGE,
    /// DENIED, ALIGNMENT), [`Error::Stalled`] or [`Error::Protocol`]. The entries before the
    /// failing one are done.
    pub fn submit(&mut self, batch: &Batch<'_>) -> Result<(), Error> {
        let count = batch.len() as u64;
        if count == 0 {
            return Ok(());
        }
        // The hypervisor reads the entries from memory: make sure the compiler has stored them.
        core::hint::black_box(batch.entries.as_ptr());
        core::sync::atomic::compiler_fence(core::sync::atomic::Ordering::SeqCst);
        let mut cookie = 0u64;
        let mut stalled = 0;
        loop {
            let regs = self.call(function::CACHE_OP_BATCH, batch.ipa, count, cookie);
            match status_of(&regs)? {
                Status::Success if regs.x1 == count => return Ok(()),
                Status::Incomplete
                    if regs.x1 < count && regs.x2 >> batch::COOKIE_ENTRY_SHIFT < count =>
                {
                    // The cookie orders progress: entry index, then bytes of that entry.
                    if regs.x2 < cookie {
                        return Err(Error::Protocol);
                    }
                    if regs.x2 == cookie {
                        stalled += 1;
                        if stalled >= MAX_STALLED_CALLS {
                            return Err(Error::Stalled);
                        }
                    } else {
                        stalled = 0;
                    }
                    cookie = regs.x2;
                }
                _ => return Err(Error::Protocol),
            }
        }
    }

    /// DMA_MAP of `range` (IPA, any alignment from ABI 1.1) for `device` (a StreamID from
    /// DEV_INFO).
    ///
    /// # Errors
    /// INVALID_PARAMETER, OUT_OF_RANGE, DENIED, NO_DEVICE, NO_MEMORY (quota), BUSY, or
    /// [`Error::Protocol`].
    pub fn dma_map(
        &mut self,
        device: u32,
        range: Range,
        direction: Direction,
    ) -> Result<DmaMapping, Error> {
        let regs = self.conduit.call(
            function::DMA_MAP,
            [
                u64::from(device),
                range.start,
                range.size,
                direction.abi(),
                0,
                0,
            ],
        );
        match status_of(&regs)? {
            Status::Success => Ok(DmaMapping {
                iova: regs.x1,
                handle: regs.x2,
            }),
            _ => Err(Error::Protocol),
        }
    }

    /// DMA_UNMAP of a handle.
    ///
    /// # Errors
    /// BAD_HANDLE, BUSY (the SMMU did not confirm), or [`Error::Protocol`].
    pub fn dma_unmap(&mut self, handle: u64) -> Result<(), Error> {
        let regs = self.call(function::DMA_UNMAP, handle, 0, 0);
        match status_of(&regs)? {
            Status::Success => Ok(()),
            _ => Err(Error::Protocol),
        }
    }

    /// DMA_SYNC of `[offset, offset + size)` of a mapping, for the device (`for_device`) or for
    /// the CPU. `Ok(false)` when nothing had to be done (NOT_REQUIRED: a coherent device, a
    /// non-cacheable buffer, or TO_DEVICE for the CPU).
    ///
    /// # Errors
    /// BAD_HANDLE, INVALID_PARAMETER, OUT_OF_RANGE, or [`Error::Protocol`].
    pub fn dma_sync(
        &mut self,
        handle: u64,
        offset: u64,
        size: u64,
        for_device: bool,
    ) -> Result<bool, Error> {
        let target = if for_device {
            dma_sync::FOR_DEVICE
        } else {
            dma_sync::FOR_CPU
        };
        let regs = self
            .conduit
            .call(function::DMA_SYNC, [handle, offset, size, target, 0, 0]);
        match status_of(&regs) {
            Ok(Status::Success) => Ok(true),
            Err(Error::NotRequired) => Ok(false),
            Ok(_) => Err(Error::Protocol),
            Err(error) => Err(error),
        }
    }

    /// DMA_MAP_SG (ABI 1.1) of every segment of `segments`, which the hypervisor reads at IPA
    /// `segments_ipa` (contiguous in IPA space) and into which it writes each segment's handle,
    /// resuming with the cookie until all are mapped. An empty list makes no call.
    ///
    /// # Errors
    /// An [`SgError`]: the first error status, [`Error::Stalled`] or [`Error::Protocol`], and
    /// how many segments are mapped (the caller unmaps them with [`Self::dma_unmap_sg`]).
    pub fn dma_map_sg(
        &mut self,
        device: u32,
        segments: &mut [Segment],
        segments_ipa: u64,
        direction: Direction,
    ) -> Result<(), SgError> {
        let count = segments.len() as u64;
        self.sg_calls(count, segments.as_mut_ptr(), |conduit, cookie| {
            conduit.call(
                function::DMA_MAP_SG,
                [
                    u64::from(device),
                    segments_ipa,
                    count,
                    direction.abi(),
                    cookie,
                    0,
                ],
            )
        })
    }

    /// DMA_UNMAP_SG (ABI 1.1) of every segment of `segments` (mapped by
    /// [`Self::dma_map_sg`], the handles in place), at IPA `segments_ipa`.
    ///
    /// # Errors
    /// As [`Self::dma_map_sg`]; `mapped` counts the segments unmapped.
    pub fn dma_unmap_sg(
        &mut self,
        segments: &mut [Segment],
        segments_ipa: u64,
    ) -> Result<(), SgError> {
        let count = segments.len() as u64;
        self.sg_calls(count, segments.as_mut_ptr(), |conduit, cookie| {
            conduit.call(
                function::DMA_UNMAP_SG,
                [segments_ipa, count, cookie, 0, 0, 0],
            )
        })
    }

    /// Repeats a scatter-gather call from its cookie until all `count` segments are done.
    fn sg_calls(
        &mut self,
        count: u64,
        segments: *mut Segment,
        mut call: impl FnMut(&mut C, u64) -> Regs,
    ) -> Result<(), SgError> {
        if count == 0 {
            return Ok(());
        }
        let fail = |error, mapped: u64| SgError {
            error,
            mapped: mapped as usize,
        };
        let mut cookie = 0u64;
        let mut stalled = 0;
        loop {
            // The hypervisor reads the segments and writes their handles: the compiler must
            // have stored them before, and must reload them after.
            core::hint::black_box(segments);
            core::sync::atomic::compiler_fence(core::sync::atomic::Ordering::SeqCst);
            let regs = call(&mut self.conduit, cookie);
            core::sync::atomic::compiler_fence(core::sync::atomic::Ordering::SeqCst);
            match status_of(&regs) {
                Ok(Status::Success) if regs.x1 == count => return Ok(()),
                Ok(Status::Incomplete) if regs.x1 < count && regs.x2 == regs.x1 => {
                    if regs.x2 < cookie {
                        return Err(fail(Error::Protocol, cookie));
                    }
                    if regs.x2 == cookie {
                        stalled += 1;
                        if stalled >= MAX_STALLED_CALLS {
                            return Err(fail(Error::Stalled, cookie));
                        }
                    } else {
                        stalled = 0;
                    }
                    cookie = regs.x2;
                }
                Ok(_) => return Err(fail(Error::Protocol, cookie)),
                Err(error) => return Err(fail(error, regs.x1.clamp(cookie, count))),
            }
        }
    }

    /// Repeats `function(start, remaining, x3)` until the range is done; returns x2 of every
    /// answer or-ed together.
    fn range_calls(&mut self, function: u32, range: Range, x3: u64) -> Result<u64, Error> {
        let (mut start, mut remaining) = (range.start, range.size);
        let mut flags = 0;
        let mut stalled = 0;
        loop {
            let regs = self.call(function, start, remaining, x3);
            let status = status_of(&regs)?;
            flags |= regs.x2;
            match status {
                Status::Success if regs.x1 == remaining => return Ok(flags),
                Status::Incomplete if regs.x1 == 0 => {
                    stalled += 1;
                    if stalled >= MAX_STALLED_CALLS {
                        return Err(Error::Stalled);
                    }
                }
                Status::Incomplete if regs.x1 < remaining => {
                    stalled = 0;
                    start += regs.x1;
                    remaining -= regs.x1;
                }
                _ => return Err(Error::Protocol),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const RAM: u64 = 0x4000_0000;
    const RAM_SIZE: u64 = 128 << 20;
    const BUDGET: u64 = 2 << 20;
    const LINE: u64 = 64;

    fn regs(status: Status, x1: u64, x2: u64) -> Regs {
        Regs {
            x0: status.code() as u64,
            x1,
            x2,
            x3: 0,
        }
    }

    /// A fake hypervisor that answers like stagehand's handlers: MEM_SET_ATTR at most one
    /// 2 MiB region per call, CACHE_OP at most the budget cut at a line, CACHE_OP_BATCH at most
    /// `entries_per_call` entries, with a ledger of one attribute per page.
    struct FakeHypervisor {
        calls: [(u32, [u64; 6]); 256],
        made: usize,
        non_cacheable: [bool; (RAM_SIZE / 4096) as usize],
        widen_at: Option<u64>,
        entries_per_call: u64,
    }

    impl FakeHypervisor {
        fn new() -> Self {
            FakeHypervisor {
                calls: [(0, [0; 6]); 256],
                made: 0,
                non_cacheable: [false; (RAM_SIZE / 4096) as usize],
                widen_at: None,
                entries_per_call: batch::ENTRIES_PER_CALL,
            }
        }

        fn calls(&self) -> &[(u32, [u64; 6])] {
            &self.calls[..self.made.min(256)]
        }

        fn check_ram(start: u64, size: u64) -> Result<(), Status> {
            match start.checked_add(size) {
                None => Err(Status::OutOfRange),
                Some(end) if start < RAM || end > RAM + RAM_SIZE => Err(Status::OutOfRange),
                Some(_) => Ok(()),
            }
        }
    }

    impl Conduit for FakeHypervisor {
        fn call(&mut self, function: u32, args: [u64; 6]) -> Regs {
            if self.made < 256 {
                self.calls[self.made] = (function, args);
            }
            self.made += 1;
            let [a, b, c, ..] = args;
            let answer = match function {
                function::FEATURES => {
                    return Regs {
                        x0: 0,
                        x1: feature::FWB | feature::VA_ADDRESSING,
                        x2: LINE,
                        x3: BUDGET,
                    }
                }
                function::MEM_SET_ATTR => (|| {
                    let target = Attribute::from_abi(c).ok_or(Status::InvalidParameter)?;
                    if b == 0 {
                        return Err(Status::InvalidParameter);
                    }
                    if a % 4096 != 0 || b % 4096 != 0 {
                        return Err(Status::Alignment);
                    }
                    Self::check_ram(a, b)?;
                    let chunk_end = (a + b).min((a & !(BUDGET - 1)) + BUDGET);
                    for page in (a..chunk_end).step_by(4096) {
                        self.non_cacheable[((page - RAM) / 4096) as usize] =
                            target == Attribute::NonCacheable;
                    }
                    let done = chunk_end - a;
                    Ok(regs(
                        if done == b {
                            Status::Success
                        } else {
                            Status::Incomplete
                        },
                        done,
                        0,
                    ))
                })(),
                function::CACHE_OP => (|| {
                    if !(1..=3).contains(&(c & 0xff)) || c & !0x1ff != 0 || b == 0 {
                        return Err(Status::InvalidParameter);
                    }
                    let address = if c & cache_op::FLAG_VA != 0 {
                        a.wrapping_sub(0x1000_0000_0000)
                    } else {
                        a
                    };
                    a.checked_add(b).ok_or(Status::OutOfRange)?;
                    // Like the hypervisor, only this call's part of the range is checked.
                    let cut = (a + BUDGET) & !(LINE - 1);
                    let done = b.min(cut - a);
                    Self::check_ram(address, done)?;
                    let widened = self.widen_at.is_some_and(|w| a <= w && w < a + done);
                    Ok(regs(
                        if done == b {
                            Status::Success
                        } else {
                            Status::Incomplete
                        },
                        done,
                        widened as u64,
                    ))
                })(),
                function::CACHE_OP_BATCH => (|| {
                    if b == 0 {
                        return Err(Status::InvalidParameter);
                    }
                    if a % 8 != 0 {
                        return Err(Status::Alignment);
                    }
                    let entry = c >> batch::COOKIE_ENTRY_SHIFT;
                    if entry >= b {
                        return Err(Status::InvalidParameter);
                    }
                    let next = (entry + self.entries_per_call).min(b);
                    if next == b {
                        Ok(regs(Status::Success, b, 0))
                    } else {
                        Ok(regs(
                            Status::Incomplete,
                            next,
                            next << batch::COOKIE_ENTRY_SHIFT,
                        ))
                    }
                })(),
                function::MEM_GET_ATTR => Self::check_ram(a, 1).map(|()| {
                    let nc = self.non_cacheable[((a - RAM) / 4096) as usize];
                    Regs {
                        x0: 0,
                        x1: nc as u64,
                        x2: page_flag::BLOCK_MAPPED,
                        x3: 0,
                    }
                }),
                function::MEM_QUERY_VA => {
                    // VA = IPA + 0x1000_0000_0000, except that one page is mapped elsewhere.
                    let ipa = if a & !0xfff == 0x1000_4000_3000 {
                        0x4400_0000
                    } else {
                        a.wrapping_sub(0x1000_0000_0000)
                    };
                    Self::check_ram(ipa, 1).map(|()| Regs {
                        x0: 0,
                        x1: ipa,
                        x2: 0xff,
                        x3: 0xff,
                    })
                }
                _ => Err(Status::NotSupported),
            };
            answer.unwrap_or_else(|status| regs(status, 0, 0))
        }
    }

    /// A conduit that always answers the same registers.
    struct Always(Regs, u32);

    impl Conduit for Always {
        fn call(&mut self, _: u32, _: [u64; 6]) -> Regs {
            self.1 += 1;
            self.0
        }
    }

    /// A fake of the scatter-gather calls: `per_call` segments a call, an error at segment
    /// `fail_at` if any; records each call's function and x1-x6.
    struct Scatter {
        per_call: u64,
        fail_at: Option<(u64, Status)>,
        calls: [(u32, [u64; 6]); 16],
        made: usize,
    }

    impl Conduit for Scatter {
        fn call(&mut self, function: u32, args: [u64; 6]) -> Regs {
            self.calls[self.made] = (function, args);
            self.made += 1;
            let (count, cookie) = match function {
                function::DMA_MAP_SG => (args[2], args[4]),
                _ => (args[1], args[2]),
            };
            let end = count.min(cookie + self.per_call);
            match self.fail_at {
                Some((at, status)) if at < end => regs(status, at, 0),
                _ if end == count => regs(Status::Success, count, 0),
                _ => regs(Status::Incomplete, end, end),
            }
        }
    }

    fn scatter(per_call: u64, fail_at: Option<(u64, Status)>) -> Client<Scatter> {
        Client::new(Scatter {
            per_call,
            fail_at,
            calls: [(0, [0; 6]); 16],
            made: 0,
        })
    }

    #[test]
    fn scatter_gather_resumes_with_the_cookie_and_reports_what_is_mapped() {
        let mut segments = [Segment::new(RAM + 0x10, 0x20); 5];
        let mut client = scatter(2, None);
        client
            .dma_map_sg(0x10, &mut segments, RAM + 0x1000, Direction::FromDevice)
            .unwrap();
        let made = client.conduit().made;
        let calls = &client.conduit().calls[..made];
        assert_eq!(calls.len(), 3);
        let cookies = [calls[0].1[4], calls[1].1[4], calls[2].1[4]];
        assert_eq!(cookies, [0, 2, 4], "cookies");
        assert_eq!(
            calls[0],
            (function::DMA_MAP_SG, [0x10, RAM + 0x1000, 5, 2, 0, 0])
        );
        let mut client = scatter(2, None);
        client.dma_unmap_sg(&mut segments, RAM + 0x1000).unwrap();
        assert_eq!(
            client.conduit().calls[1],
            (function::DMA_UNMAP_SG, [RAM + 0x1000, 5, 2, 0, 0, 0])
        );
        // An error in segment 3: segments 0-2 are mapped.
        let mut client = scatter(2, Some((3, Status::Denied)));
        assert_eq!(
            client.dma_map_sg(0x10, &mut segments, RAM + 0x1000, Direction::ToDevice),
            Err(SgError {
                error: Error::Denied,
                mapped: 3
            })
        );
        // A refusal of the whole call: nothing mapped. An empty list makes no call.
        let mut client = scatter(2, Some((0, Status::Alignment)));
        assert_eq!(
            client.dma_map_sg(0x10, &mut segments, RAM + 0x1004, Direction::ToDevice),
            Err(SgError {
                error: Error::Alignment,
                mapped: 0
            })
        );
        let mut client = scatter(2, None);
        client
            .dma_map_sg(0x10, &mut [], RAM, Direction::ToDevice)
            .unwrap();
        assert_eq!(client.conduit().made, 0);
        // No progress: stalled.
        let mut client = Client::new(Always(regs(Status::Incomplete, 0, 0), 0));
        assert_eq!(
            client
                .dma_map_sg(0x10, &mut segments, RAM, Direction::ToDevice)
                .map_err(|e| e.error),
            Err(Error::Stalled)
        );
    }

    #[test]
    fn dma_calls_pass_their_registers_and_read_their_answers() {
        let mut client = Client::new(Always(regs(Status::Success, RAM + 0x10, 7), 0));
        assert_eq!(
            client.dma_map(0x10, Range::new(RAM + 0x10, 0x20), Direction::Bidirectional),
            Ok(DmaMapping {
                iova: RAM + 0x10,
                handle: 7
            })
        );
        assert_eq!(client.dma_unmap(7), Ok(()));
        assert_eq!(client.dma_sync(7, 0, 0x20, true), Ok(true));
        let mut client = Client::new(Always(regs(Status::NotRequired, 0, 0), 0));
        assert_eq!(client.dma_sync(7, 0, 0x20, false), Ok(false));
        let mut client = Client::new(Always(regs(Status::BadHandle, 0, 0), 0));
        assert_eq!(client.dma_unmap(7), Err(Error::BadHandle));
        assert_eq!(client.dma_sync(7, 0, 1, true), Err(Error::BadHandle));
    }

    #[test]
    fn errors_map_from_every_status_and_back() {
        for status in Status::ALL {
            let error = Error::from(status);
            match status {
                Status::Success | Status::Incomplete => assert_eq!(error, Error::Protocol),
                _ => assert_eq!(error.status(), Some(status)),
            }
        }
        assert_eq!(Error::Stalled.status(), None);
    }

    #[test]
    fn set_attribute_of_64_mib_loops_one_region_per_call() {
        let mut client = Client::new(FakeHypervisor::new());
        let range = Range::new(RAM + (4 << 20), 64 << 20);
        assert_eq!(client.set_attribute(range, Attribute::NonCacheable), Ok(()));
        let fake = client.conduit();
        assert_eq!(fake.calls().len(), 32);
        for (i, (function, args)) in fake.calls().iter().enumerate() {
            let done = i as u64 * BUDGET;
            assert_eq!(
                (*function, args[0], args[1], args[2]),
                (
                    function::MEM_SET_ATTR,
                    range.start + done,
                    range.size - done,
                    1
                )
            );
        }
        assert!(fake.non_cacheable[1024..1024 + 16384].iter().all(|&nc| nc));
        assert!(!fake.non_cacheable[1023] && !fake.non_cacheable[1024 + 16384]);
        assert_eq!(
            client.attribute(range.start).map(|p| p.attribute),
            Ok(Attribute::NonCacheable)
        );
    }

    #[test]
    fn set_attribute_resumes_from_an_unaligned_start() {
        let mut client = Client::new(FakeHypervisor::new());
        assert_eq!(
            client.set_attribute(Range::new(RAM + 0x1ff000, 0x3000), Attribute::NonCacheable),
            Ok(())
        );
        let calls = client.conduit().calls();
        assert_eq!(calls.len(), 2);
        assert_eq!((calls[1].1[0], calls[1].1[1]), (RAM + 0x20_0000, 0x2000));
    }

    #[test]
    fn errors_end_the_loop_with_the_status() {
        let mut client = Client::new(FakeHypervisor::new());
        assert_eq!(
            client.set_attribute(Range::new(RAM + 1, 4096), Attribute::WriteBack),
            Err(Error::Alignment)
        );
        assert_eq!(
            client.set_attribute(Range::new(RAM, 0), Attribute::WriteBack),
            Err(Error::InvalidParameter)
        );
        // MEM_SET_ATTR checks the whole range first; CACHE_OP runs off the end of RAM on its
        // third call, after two that made progress.
        let range = Range::new(RAM + RAM_SIZE - (4 << 20), 8 << 20);
        assert_eq!(
            client.set_attribute(range, Attribute::NonCacheable),
            Err(Error::OutOfRange)
        );
        assert_eq!(client.conduit().calls().len(), 2 + 1);
        assert_eq!(client.clean(range, Addressing::Ipa), Err(Error::OutOfRange));
        assert_eq!(client.conduit().calls().len(), 3 + 3);
        assert_eq!(
            client.clean(Range::new(0x0900_0000, 64), Addressing::Ipa),
            Err(Error::OutOfRange)
        );
        assert_eq!(client.attribute(0), Err(Error::OutOfRange));
    }

    #[test]
    fn cache_operations_pass_op_and_va_flag_and_loop_over_the_budget() {
        let mut client = Client::new(FakeHypervisor::new());
        let va = 0x1000_0000_0000 + RAM + 17;
        assert_eq!(
            client.invalidate(Range::new(va, 16 << 20), Addressing::Va),
            Ok(Outcome { widened: false })
        );
        let calls = client.conduit().calls();
        assert_eq!(
            calls.len(),
            9,
            "16 MiB from an unaligned start: 8 whole budgets and a tail"
        );
        assert!(calls
            .iter()
            .all(|(f, args)| *f == function::CACHE_OP && args[2] == 0x102));
        assert_eq!(calls[1].1[0] % LINE, 0, "the second call starts on a line");
        for (op, code) in [(Operation::Clean, 1), (Operation::CleanInvalidate, 3)] {
            let mut client = Client::new(FakeHypervisor::new());
            client
                .cache_operation(Range::new(RAM, 64), op, Addressing::Ipa)
                .unwrap();
            assert_eq!(client.conduit().calls()[0].1[..3], [RAM, 64, code]);
        }
    }

    #[test]
    fn a_widened_invalidate_is_reported_from_any_call() {
        let mut fake = FakeHypervisor::new();
        fake.widen_at = Some(RAM + (5 << 20));
        let mut client = Client::new(fake);
        assert_eq!(
            client.invalidate(Range::new(RAM, 8 << 20), Addressing::Ipa),
            Ok(Outcome { widened: true })
        );
        assert_eq!(
            client.invalidate(Range::new(RAM, 4 << 20), Addressing::Ipa),
            Ok(Outcome { widened: false })
        );
    }

    #[test]
    fn a_hypervisor_that_never_progresses_is_given_up_on() {
        let mut client = Client::new(Always(regs(Status::Incomplete, 0, 0), 0));
        assert_eq!(
            client.clean(Range::new(RAM, 4096), Addressing::Ipa),
            Err(Error::Stalled)
        );
        assert_eq!(client.conduit().1, MAX_STALLED_CALLS);
        let mut client = Client::new(Always(regs(Status::Incomplete, 0, 0), 0));
        assert_eq!(
            client.set_attribute(Range::new(RAM, 4096), Attribute::NonCacheable),
            Err(Error::Stalled)
        );
        // A batch whose cookie never moves.
        let mut storage = [BatchEntry::default(); 2];
        let mut batch = Batch::new(&mut storage, RAM).unwrap();
        batch
            .push(Range::new(RAM, 64), Operation::Clean, Addressing::Ipa)
            .unwrap();
        batch
            .push(Range::new(RAM, 64), Operation::Clean, Addressing::Ipa)
            .unwrap();
        let mut client = Client::new(Always(regs(Status::Incomplete, 0, 0), 0));
        assert_eq!(client.submit(&batch), Err(Error::Stalled));
        assert_eq!(client.conduit().1, MAX_STALLED_CALLS);
    }

    #[test]
    fn impossible_answers_are_protocol_errors() {
        let cases = [
            regs(Status::Incomplete, 4096, 0), // claims the whole range yet INCOMPLETE
            regs(Status::Incomplete, 8192, 0), // more than asked
            regs(Status::Success, 64, 0),      // SUCCESS short of the range
        ];
        for answer in cases {
            let mut client = Client::new(Always(answer, 0));
            assert_eq!(
                client.clean(Range::new(RAM, 4096), Addressing::Ipa),
                Err(Error::Protocol),
                "{answer:?}"
            );
            assert_eq!(client.conduit().1, 1);
        }
        let mut client = Client::new(Always(
            Regs {
                x0: 7,
                ..Regs::default()
            },
            0,
        ));
        assert_eq!(client.features(), Err(Error::UnknownStatus(7)));
        let mut client = Client::new(Always(
            Regs {
                x0: 0,
                x1: 5,
                ..Regs::default()
            },
            0,
        ));
        assert_eq!(
            client.attribute(RAM),
            Err(Error::Protocol),
            "attribute 5 does not exist"
        );
        let mut client = Client::new(Always(
            Regs {
                x0: (-11i64) as u64,
                ..Regs::default()
            },
            0,
        ));
        assert_eq!(
            client.query_va(0, Access::Read),
            Err(Error::UnknownStatus(-11))
        );
    }

    #[test]
    fn batch_entries_have_the_abi_layout() {
        let entry = BatchEntry::new(
            Range::new(0x1122_3344_5566_7788, 0x1000),
            Operation::Invalidate,
            Addressing::Va,
        );
        let bytes = entry.as_bytes();
        assert_eq!(bytes.len(), 24);
        assert_eq!(bytes[..8], 0x1122_3344_5566_7788u64.to_le_bytes());
        assert_eq!(bytes[8..16], 0x1000u64.to_le_bytes());
        assert_eq!(bytes[16..20], 0x102u32.to_le_bytes());
        assert_eq!(bytes[20..], [0; 4]);
        assert_eq!(core::mem::align_of::<BatchEntry>(), 8);
    }

    #[test]
    fn batches_fill_their_storage_and_check_alignment() {
        let mut storage = [BatchEntry::default(); 3];
        assert_eq!(
            Batch::new(&mut storage, RAM + 4).map(|_| ()),
            Err(Error::Alignment)
        );
        let mut batch = Batch::new(&mut storage, RAM + 8).unwrap();
        for i in 0..3 {
            batch
                .push(
                    Range::new(RAM + i * 4096, 4096),
                    Operation::Clean,
                    Addressing::Ipa,
                )
                .unwrap();
        }
        assert_eq!(
            batch.push(Range::new(RAM, 1), Operation::Clean, Addressing::Ipa),
            Err(Error::BatchFull)
        );
        assert_eq!((batch.len(), batch.capacity()), (3, 3));
        assert_eq!(batch.entries()[2].address, RAM + 8192);
        batch.clear();
        assert!(batch.is_empty());
        let mut client = Client::new(FakeHypervisor::new());
        assert_eq!(client.submit(&batch), Ok(()));
        assert!(
            client.conduit().calls().is_empty(),
            "an empty batch makes no call"
        );
    }

    #[test]
    fn batches_resume_with_the_cookie() {
        let mut storage = [BatchEntry::default(); 150];
        let mut batch = Batch::new(&mut storage, RAM + 0x1000).unwrap();
        for i in 0..150 {
            batch
                .push(
                    Range::new(RAM + i * 8192, 4096),
                    Operation::CleanInvalidate,
                    Addressing::Ipa,
                )
                .unwrap();
        }
        let mut client = Client::new(FakeHypervisor::new());
        assert_eq!(client.submit(&batch), Ok(()));
        let calls = client.conduit().calls();
        assert_eq!(calls.len(), 3);
        let cookies: [u64; 3] = core::array::from_fn(|i| calls[i].1[2]);
        assert_eq!(cookies, [0, 64 << 40, 128 << 40]);
        assert!(calls.iter().all(|(f, args)| *f == function::CACHE_OP_BATCH
            && args[0] == RAM + 0x1000
            && args[1] == 150));
    }

    #[test]
    fn a_batch_cookie_that_goes_backwards_is_a_protocol_error() {
        struct Backwards(u32);
        impl Conduit for Backwards {
            fn call(&mut self, _: u32, _: [u64; 6]) -> Regs {
                self.0 += 1;
                let cookie = if self.0 == 1 { 1 << 40 | 5 } else { 1 << 40 };
                regs(Status::Incomplete, 1, cookie)
            }
        }
        let mut storage = [BatchEntry::default(); 2];
        let mut batch = Batch::new(&mut storage, RAM).unwrap();
        batch
            .push(Range::new(RAM, 64), Operation::Clean, Addressing::Ipa)
            .unwrap();
        batch
            .push(Range::new(RAM, 64), Operation::Clean, Addressing::Ipa)
            .unwrap();
        let mut client = Client::new(Backwards(0));
        assert_eq!(client.submit(&batch), Err(Error::Protocol));
        assert_eq!(client.conduit().0, 2);
    }

    #[test]
    fn features_decode() {
        let mut client = Client::new(FakeHypervisor::new());
        let features = client.features().unwrap();
        assert!(
            features.fwb()
                && features.va_addressing()
                && !features.smmu()
                && !features.dma_strict()
        );
        assert_eq!((features.line_size, features.budget), (LINE, BUDGET));
        let mut client = Client::new(Always(regs(Status::NotSupported, 0, 0), 0));
        assert_eq!(client.features(), Err(Error::NotSupported));
    }

    #[test]
    fn buffers_must_be_contiguous_in_ipa_space() {
        let mut client = Client::new(FakeHypervisor::new());
        let va = 0x1000_0000_0000 + RAM;
        assert_eq!(client.ipa_of_buffer(va + 0x10, 0x2ff0), Ok(RAM + 0x10));
        assert_eq!(client.conduit().calls().len(), 3, "one query per page");
        // The fourth page of this VA range maps elsewhere.
        assert_eq!(
            client.ipa_of_buffer(va + 0x10, 0x3ff0),
            Err(Error::InvalidParameter)
        );
        assert_eq!(client.ipa_of_buffer(va + 0x3000, 8), Ok(0x4400_0000));
        assert_eq!(
            client.ipa_of_buffer(va, u64::MAX),
            Err(Error::InvalidParameter)
        );
        assert_eq!(
            client
                .query_va(va, Access::Write)
                .map(|i| (i.effective, i.stage1)),
            Ok((0xff, 0xff))
        );
    }
}
