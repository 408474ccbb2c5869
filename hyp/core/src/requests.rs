//! Decoding and checking of the memory calls' arguments that are not addresses: cache
//! operation codes and flags, CACHE_OP_BATCH entries and resume cookies, MEM_QUERY_VA's access
//! kind, and the PAR_EL1 value an address translation returns. Every guest integer is checked
//! here once; handlers receive typed values.

use crate::maintenance::CacheOp;
use stagehand_abi::driver::BatchEntry as AbiBatchEntry;
use stagehand_abi::{batch, cache_op, Status};
use zerocopy::FromBytes;

/// A decoded CACHE_OP x3.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CacheRequest {
    /// The operation.
    pub op: CacheOp,
    /// The address is a guest VA (else an IPA).
    pub by_va: bool,
}

/// Decodes CACHE_OP's x3 (or a batch entry's op): 1 CLEAN, 2 INVALIDATE, 3 CLEAN_INVALIDATE,
/// or-ed with 0x100 for a guest VA.
///
/// # Errors
/// INVALID_PARAMETER for any other operation or flag bit.
pub fn cache_request(value: u64) -> Result<CacheRequest, Status> {
    if value & !(0xff | cache_op::FLAG_VA) != 0 {
        return Err(Status::InvalidParameter);
    }
    let op = match value & 0xff {
        cache_op::CLEAN => CacheOp::Clean,
        cache_op::INVALIDATE => CacheOp::Invalidate,
        cache_op::CLEAN_INVALIDATE => CacheOp::CleanInvalidate,
        _ => return Err(Status::InvalidParameter),
    };
    Ok(CacheRequest {
        op,
        by_va: value & cache_op::FLAG_VA != 0,
    })
}

/// Bytes of one CACHE_OP_BATCH entry: the ABI's [`AbiBatchEntry`].
pub const BATCH_ENTRY_SIZE: usize = batch::ENTRY_SIZE as usize;
/// Most entries a batch may name (the cookie keeps the index in 24 bits).
pub const BATCH_MAX_ENTRIES: u64 = batch::MAX_ENTRIES;
/// Most entries one call works through, however small they are (I6).
pub const BATCH_ENTRIES_PER_CALL: u64 = batch::ENTRIES_PER_CALL;

/// One CACHE_OP_BATCH entry, checked: the guest's [`AbiBatchEntry`] with its operation decoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BatchRequest {
    /// First address.
    pub address: u64,
    /// Bytes.
    pub size: u64,
    /// The operation.
    pub request: CacheRequest,
}

/// Parses and checks one entry from the guest's bytes, through the ABI's own layout (the same
/// struct a guest driver fills in), never by casting guest memory.
///
/// # Errors
/// INVALID_PARAMETER for a short slice, a bad op, a non-zero reserved word or a zero size.
pub fn batch_entry(bytes: &[u8]) -> Result<BatchRequest, Status> {
    let entry = AbiBatchEntry::read_from_bytes(bytes).map_err(|_| Status::InvalidParameter)?;
    if entry.reserved != 0 || entry.size == 0 {
        return Err(Status::InvalidParameter);
    }
    Ok(BatchRequest {
        address: entry.address,
        size: entry.size,
        request: cache_request(entry.op as u64)?,
    })
}

/// Where a batch resumes: entry index and bytes of that entry already done.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Cookie {
    /// Entries completed.
    pub entry: u64,
    /// Bytes done of entry `entry`.
    pub offset: u64,
}

const COOKIE_OFFSET_BITS: u32 = batch::COOKIE_ENTRY_SHIFT;

impl Cookie {
    /// The value returned in x2.
    pub fn encode(self) -> u64 {
        self.entry << COOKIE_OFFSET_BITS | self.offset
    }

    /// Decodes x3 of a call with `count` entries.
    ///
    /// # Errors
    /// INVALID_PARAMETER when it names an entry past the end.
    pub fn decode(value: u64, count: u64) -> Result<Cookie, Status> {
        let cookie = Cookie {
            entry: value >> COOKIE_OFFSET_BITS,
            offset: value & ((1 << COOKIE_OFFSET_BITS) - 1),
        };
        if cookie.entry >= count {
            return Err(Status::InvalidParameter);
        }
        Ok(cookie)
    }

    /// Whether an entry of `size` bytes can be resumed at this cookie's offset.
    pub fn fits(&self, size: u64) -> bool {
        self.offset < size && size < 1 << COOKIE_OFFSET_BITS
    }
}

/// MEM_QUERY_VA's x2: whether to translate for a write.
///
/// # Errors
/// INVALID_PARAMETER for anything but 0 (read) and 1 (write).
pub fn query_access(value: u64) -> Result<bool, Status> {
    match value {
        0 => Ok(false),
        1 => Ok(true),
        _ => Err(Status::InvalidParameter),
    }
}

/// What an AT instruction left in PAR_EL1.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Translation {
    /// It translated: output address of the page and the MAIR-encoded attribute.
    Ok {
        /// Output address (bits 47:12; add the page offset).
        address: u64,
        /// Memory attribute, MAIR encoding (PAR.ATTR).
        attribute: u8,
    },
    /// It faulted at stage 1.
    Stage1Fault,
    /// It faulted at stage 2.
    Stage2Fault,
}

/// Decodes PAR_EL1.
pub fn par(value: u64) -> Translation {
    if value & 1 != 0 {
        return if value & (1 << 9) != 0 {
            Translation::Stage2Fault
        } else {
            Translation::Stage1Fault
        };
    }
    Translation::Ok {
        address: value & 0x0000_ffff_ffff_f000,
        attribute: (value >> 56) as u8,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cache_op_codes_and_flags() {
        assert_eq!(
            cache_request(1),
            Ok(CacheRequest {
                op: CacheOp::Clean,
                by_va: false
            })
        );
        assert_eq!(
            cache_request(0x102),
            Ok(CacheRequest {
                op: CacheOp::Invalidate,
                by_va: true
            })
        );
        assert_eq!(cache_request(3).unwrap().op, CacheOp::CleanInvalidate);
        for bad in [0, 4, 0xff, 0x200, 0x101 | 1 << 40, u64::MAX] {
            assert_eq!(
                cache_request(bad),
                Err(Status::InvalidParameter),
                "{bad:#x}"
            );
        }
    }

    #[test]
    fn batch_entries() {
        let mut bytes = [0u8; 24];
        bytes[..8].copy_from_slice(&0x4000_1000u64.to_le_bytes());
        bytes[8..16].copy_from_slice(&4096u64.to_le_bytes());
        bytes[16..20].copy_from_slice(&3u32.to_le_bytes());
        let entry = batch_entry(&bytes).unwrap();
        assert_eq!(
            (entry.address, entry.size, entry.request.op),
            (0x4000_1000, 4096, CacheOp::CleanInvalidate)
        );
        let mut reserved = bytes;
        reserved[23] = 1;
        assert_eq!(batch_entry(&reserved), Err(Status::InvalidParameter));
        let mut zero = bytes;
        zero[8..16].fill(0);
        assert_eq!(batch_entry(&zero), Err(Status::InvalidParameter));
        let mut op = bytes;
        op[16] = 9;
        assert_eq!(batch_entry(&op), Err(Status::InvalidParameter));
        assert_eq!(batch_entry(&bytes[..23]), Err(Status::InvalidParameter));
    }

    #[test]
    fn cookies_round_trip_and_are_checked() {
        let c = Cookie {
            entry: 5,
            offset: 0x1234,
        };
        assert_eq!(Cookie::decode(c.encode(), 6), Ok(c));
        assert_eq!(Cookie::decode(c.encode(), 5), Err(Status::InvalidParameter));
        assert_eq!(Cookie::decode(0, 1), Ok(Cookie::default()));
        assert!(c.fits(0x2000) && !c.fits(0x1234));
    }

    #[test]
    fn par_values() {
        assert_eq!(
            par(0x4400_0000_4008_1000 | 0xff << 56),
            Translation::Ok {
                address: 0x4008_1000,
                attribute: 0xff
            }
        );
        assert_eq!(
            par(0x44 << 56 | 0x4008_1f00),
            Translation::Ok {
                address: 0x4008_1000,
                attribute: 0x44
            }
        );
        assert_eq!(par(1 | 0b100 << 1), Translation::Stage1Fault);
        assert_eq!(par(1 | 1 << 9), Translation::Stage2Fault);
        assert_eq!(query_access(1), Ok(true));
        assert_eq!(query_access(2), Err(Status::InvalidParameter));
    }
}
