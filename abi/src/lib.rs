//! The stagehand hypercall ABI, version 1.1: function IDs, status codes, flags and the
//! guest-side client; and the lines the hypervisor writes for the host on its UART (audit
//! records, [`exit_status`]).
//!
//! This crate is the single definition shared by the hypervisor, the test guests and guest
//! drivers. It is `no_std` and has no dependencies. The calls follow SMCCC 1.1 fast-call
//! conventions over `HVC #0`: arguments in x1-x6, a signed status in x0, results in x1-x3.
//! Addresses are IPAs unless a flag says guest VA; a page is 4 KiB.

#![no_std]
#![deny(unsafe_op_in_unsafe_fn, clippy::undocumented_unsafe_blocks)]
#![warn(missing_docs)]

pub mod audit;
pub mod client;
pub mod driver;
pub mod exit_status;

/// Major version of the ABI this crate describes (REVISION x0).
pub const ABI_MAJOR: u64 = 1;
/// Minor version of the ABI this crate describes (REVISION x1).
pub const ABI_MINOR: u64 = 1;

/// This hypervisor's UUID, `a61eba14-6d38-495c-9e88-7830b073fe65`, in its canonical byte order.
pub const UUID: [u8; 16] = [
    0xa6, 0x1e, 0xba, 0x14, 0x6d, 0x38, 0x49, 0x5c, 0x9e, 0x88, 0x78, 0x30, 0xb0, 0x73, 0xfe, 0x65,
];

/// The UUID as SMCCC returns it from CALL_UID: four little-endian words in w0-w3.
pub const fn uuid_words() -> [u32; 4] {
    let mut words = [0u32; 4];
    let mut i = 0;
    while i < 4 {
        words[i] = u32::from_le_bytes([
            UUID[4 * i],
            UUID[4 * i + 1],
            UUID[4 * i + 2],
            UUID[4 * i + 3],
        ]);
        i += 1;
    }
    words
}

/// `compatible` string of the device-tree node that advertises the hypervisor to its guest.
pub const DT_COMPATIBLE: &str = "stagehand,hypervisor";
/// Path of that node in the guest's device tree.
pub const DT_NODE_PATH: &str = "/hypervisor";

/// Hypercall function IDs (x0 on entry).
pub mod function {
    /// Vendor-specific hypervisor service: CALL_UID (SMCCC standard query).
    pub const CALL_UID: u32 = 0x8600_FF01;
    /// Vendor-specific hypervisor service: REVISION (SMCCC standard query).
    pub const REVISION: u32 = 0x8600_FF03;
    /// Capability bits, D-cache line size, per-call work budget.
    pub const FEATURES: u32 = 0xC600_0001;
    /// Set the stage-2 attribute of an IPA range.
    pub const MEM_SET_ATTR: u32 = 0xC600_0010;
    /// Read the stage-2 attribute, flags and pin count of one page.
    pub const MEM_GET_ATTR: u32 = 0xC600_0011;
    /// Translate a guest VA through both stages and report the effective attribute.
    pub const MEM_QUERY_VA: u32 = 0xC600_0012;
    /// Clean and/or invalidate the data cache over a range, by IPA or guest VA.
    pub const CACHE_OP: u32 = 0xC600_0020;
    /// Several cache operations described by an array in guest memory.
    pub const CACHE_OP_BATCH: u32 = 0xC600_0021;
    /// Describe the n-th device assigned to the caller.
    pub const DEV_INFO: u32 = 0xC600_0030;
    /// Map a buffer for DMA by a device.
    pub const DMA_MAP: u32 = 0xC600_0031;
    /// Remove a DMA mapping.
    pub const DMA_UNMAP: u32 = 0xC600_0032;
    /// Synchronise a DMA buffer for the CPU or the device.
    pub const DMA_SYNC: u32 = 0xC600_0033;
    /// DMA_MAP_SG (ABI 1.1): map the segments of an array in guest memory for one device.
    pub const DMA_MAP_SG: u32 = 0xC600_0034;
    /// DMA_UNMAP_SG (ABI 1.1): unmap the segments DMA_MAP_SG mapped, by the handles it wrote.
    pub const DMA_UNMAP_SG: u32 = 0xC600_0035;
    /// Copy audit records into a guest buffer.
    pub const AUDIT_READ: u32 = 0xC600_0040;
    /// Insert a mark record into the audit stream.
    pub const AUDIT_MARK: u32 = 0xC600_0041;
}

/// Status codes returned in x0 (signed).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(i64)]
pub enum Status {
    /// The call did everything it was asked.
    Success = 0,
    /// The work budget was reached; x1 says how far the call got; call again for the rest.
    Incomplete = 1,
    /// Unknown function ID, or a feature this hypervisor does not have.
    NotSupported = -1,
    /// Nothing to do (for example a DMA sync of a coherent device).
    NotRequired = -2,
    /// Unknown attribute, operation, direction or flag, or a zero size.
    InvalidParameter = -3,
    /// An address or size is not aligned as the call requires.
    Alignment = -4,
    /// The range wraps or leaves the caller's RAM.
    OutOfRange = -5,
    /// Memory the caller may not touch this way.
    Denied = -6,
    /// The page is pinned or in use.
    Busy = -7,
    /// The hypervisor ran out of memory for the request.
    NoMemory = -8,
    /// Unknown device, or one not assigned to the caller.
    NoDevice = -9,
    /// Unknown or stale handle.
    BadHandle = -10,
}

impl Status {
    /// Every status, in code order (useful for tables and tests).
    pub const ALL: [Status; 12] = [
        Status::Success,
        Status::Incomplete,
        Status::NotSupported,
        Status::NotRequired,
        Status::InvalidParameter,
        Status::Alignment,
        Status::OutOfRange,
        Status::Denied,
        Status::Busy,
        Status::NoMemory,
        Status::NoDevice,
        Status::BadHandle,
    ];

    /// The value placed in x0.
    pub const fn code(self) -> i64 {
        self as i64
    }

    /// Decodes x0; `None` for a value that is no status of this ABI.
    pub fn from_code(code: i64) -> Option<Status> {
        Self::ALL.iter().copied().find(|s| s.code() == code)
    }

    /// The name used in documents and logs.
    pub const fn name(self) -> &'static str {
        match self {
            Status::Success => "SUCCESS",
            Status::Incomplete => "INCOMPLETE",
            Status::NotSupported => "NOT_SUPPORTED",
            Status::NotRequired => "NOT_REQUIRED",
            Status::InvalidParameter => "INVALID_PARAMETER",
            Status::Alignment => "ALIGNMENT",
            Status::OutOfRange => "OUT_OF_RANGE",
            Status::Denied => "DENIED",
            Status::Busy => "BUSY",
            Status::NoMemory => "NO_MEMORY",
            Status::NoDevice => "NO_DEVICE",
            Status::BadHandle => "BAD_HANDLE",
        }
    }
}

/// Capability bits returned by FEATURES in x1.
pub mod feature {
    /// Stage 2 uses FEAT_S2FWB encodings.
    pub const FWB: u64 = 1 << 0;
    /// An SMMUv3 is present and owned by the hypervisor.
    pub const SMMU: u64 = 1 << 1;
    /// At least one device is in strict DMA mode.
    pub const DMA_STRICT: u64 = 1 << 2;
    /// CACHE_OP accepts guest-VA addressing.
    pub const VA_ADDRESSING: u64 = 1 << 3;
}

/// Stage-2 memory attributes (MEM_SET_ATTR x3, MEM_GET_ATTR x1).
pub mod attr {
    /// Normal memory, inner and outer write-back (the default).
    pub const NORMAL_WB: u64 = 0;
    /// Normal memory, non-cacheable.
    pub const NORMAL_NC: u64 = 1;
}

/// Cache operations (CACHE_OP x3).
pub mod cache_op {
    /// Clean to the point of coherency.
    pub const CLEAN: u64 = 1;
    /// Invalidate to the point of coherency (edge lines are cleaned too).
    pub const INVALIDATE: u64 = 2;
    /// Clean and invalidate to the point of coherency.
    pub const CLEAN_INVALIDATE: u64 = 3;
    /// Flag: the address is a guest virtual address.
    pub const FLAG_VA: u64 = 0x100;
    /// Result flag in x2: an INVALIDATE was widened to CLEAN_INVALIDATE.
    pub const RESULT_WIDENED: u64 = 1;
}

/// MEM_GET_ATTR flags (x2).
pub mod page_flag {
    /// At least one DMA mapping pins the page.
    pub const PINNED: u64 = 1 << 0;
    /// Stage 2 maps the page with a 2 MiB block (else with a 4 KiB page).
    pub const BLOCK_MAPPED: u64 = 1 << 1;
}

/// MEM_QUERY_VA access kinds (x2).
pub mod access {
    /// Translate as a read.
    pub const READ: u64 = 0;
    /// Translate as a write.
    pub const WRITE: u64 = 1;
}

/// Memory attributes as MEM_QUERY_VA reports them: MAIR encoding, as PAR_EL1.ATTR holds them.
pub mod mair {
    /// Normal, inner and outer write-back (non-transient, read- and write-allocate).
    pub const NORMAL_WB: u64 = 0xff;
    /// Normal, inner and outer non-cacheable.
    pub const NORMAL_NC: u64 = 0x44;
    /// Device-nGnRnE (also what a guest running with its MMU off gets for data).
    pub const DEVICE_NGNRNE: u64 = 0x00;
}

/// DMA_MAP x4 (and DMA_MAP_SG x4): the direction of a buffer.
pub mod dma_direction {
    /// The device reads and writes.
    pub const BIDIRECTIONAL: u64 = 0;
    /// The device reads.
    pub const TO_DEVICE: u64 = 1;
    /// The device writes.
    pub const FROM_DEVICE: u64 = 2;
}

/// DMA_SYNC x4: whom the buffer is handed to.
pub mod dma_sync {
    /// The device has finished: the CPU reads next.
    pub const FOR_CPU: u64 = 0;
    /// The CPU has finished: the device reads next.
    pub const FOR_DEVICE: u64 = 1;
}

/// DEV_INFO x3 flags.
pub mod dev_flag {
    /// The device snoops CPU caches.
    pub const COHERENT: u64 = 1 << 0;
    /// The device is in strict mode (it reaches only mapped buffers).
    pub const STRICT: u64 = 1 << 1;
}

/// DMA_MAP_SG and DMA_UNMAP_SG (ABI 1.1): the segment layout `{u64 addr, u64 size, u64
/// handle}` (little endian), the limits of one call and the segment struct itself, shared by
/// the hypervisor (which parses it) and guest drivers (which fill it in).
pub mod dma_sg {
    use zerocopy::{FromBytes, Immutable, IntoBytes, KnownLayout};

    /// Bytes of one segment.
    pub const SEGMENT_SIZE: u64 = 24;
    /// The array's alignment in guest memory.
    pub const ARRAY_ALIGN: u64 = 8;
    /// Most segments one call works through (then INCOMPLETE with a resume cookie).
    pub const SEGMENTS_PER_CALL: u64 = 64;
    /// Most segments an array may hold.
    pub const MAX_SEGMENTS: u64 = 1 << 24;
    /// Offset of `handle` in a segment: DMA_MAP_SG writes the segment's handle there.
    pub const HANDLE_OFFSET: u64 = 16;

    /// One segment. The guest fills in `addr` and `size` (any alignment, not zero, at most
    /// 16 MiB); DMA_MAP_SG writes `handle` (the segment's IOVA is `addr`); DMA_UNMAP_SG reads
    /// `handle`.
    #[derive(
        Clone, Copy, Debug, Default, PartialEq, Eq, FromBytes, IntoBytes, Immutable, KnownLayout,
    )]
    #[repr(C)]
    pub struct Segment {
        /// First IPA of the buffer (its IOVA).
        pub addr: u64,
        /// Bytes.
        pub size: u64,
        /// The mapping's handle, written by DMA_MAP_SG (0 until then).
        pub handle: u64,
    }

    const _: () = assert!(core::mem::size_of::<Segment>() as u64 == SEGMENT_SIZE);
    const _: () = assert!(core::mem::align_of::<Segment>() as u64 >= ARRAY_ALIGN);
    const _: () = assert!(core::mem::offset_of!(Segment, handle) as u64 == HANDLE_OFFSET);

    impl Segment {
        /// A segment of `size` bytes at `addr`, not yet mapped.
        pub const fn new(addr: u64, size: u64) -> Self {
            Segment {
                addr,
                size,
                handle: 0,
            }
        }
    }
}

/// CACHE_OP_BATCH: the entry layout `{u64 addr, u64 size, u32 op, u32 reserved}` (little
/// endian) and the limits of one call.
pub mod batch {
    /// Bytes of one entry.
    pub const ENTRY_SIZE: u64 = 24;
    /// Required alignment of the array's IPA.
    pub const ARRAY_ALIGN: u64 = 8;
    /// Most entries one call completes before it answers INCOMPLETE.
    pub const ENTRIES_PER_CALL: u64 = 64;
    /// Most entries one batch may have.
    pub const MAX_ENTRIES: u64 = 1 << 24;
    /// The resume cookie is `entry index << COOKIE_ENTRY_SHIFT | bytes done of that entry`.
    pub const COOKIE_ENTRY_SHIFT: u32 = 40;
}

/// Page size the ABI counts in.
pub const PAGE_SIZE: u64 = 4096;

/// The values of x0-x3 after a hypercall.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Regs {
    /// x0: status (or the first result word for CALL_UID and REVISION).
    pub x0: u64,
    /// x1: first result.
    pub x1: u64,
    /// x2: second result.
    pub x2: u64,
    /// x3: third result.
    pub x3: u64,
}

impl Regs {
    /// x0 read as a status.
    pub fn status(&self) -> Option<Status> {
        Status::from_code(self.x0 as i64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_codes_round_trip() {
        for status in Status::ALL {
            assert_eq!(Status::from_code(status.code()), Some(status));
        }
        assert_eq!(Status::from_code(2), None);
        assert_eq!(Status::from_code(-11), None);
    }

    #[test]
    fn uuid_words_are_little_endian_quarters() {
        let words = uuid_words();
        assert_eq!(words[0], 0x14ba_1ea6);
        assert_eq!(words[3], 0x65fe_73b0);
    }

    #[test]
    fn fast_call_ids_have_the_fast_bit_and_vendor_hyp_owner() {
        for id in [
            function::CALL_UID,
            function::REVISION,
            function::FEATURES,
            function::AUDIT_MARK,
        ] {
            assert_ne!(id & 0x8000_0000, 0, "fast call bit");
            assert_eq!(
                (id >> 24) & 0x3f,
                6,
                "owner: vendor-specific hypervisor service"
            );
        }
    }
}
