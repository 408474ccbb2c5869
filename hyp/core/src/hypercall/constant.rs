//! The calls whose answer never changes (versions, the UUID, the PSCI calls that only answer a
//! code), as a table the EL2 vector reads directly: an `HVC #0` whose function ID is in it is
//! answered with about a dozen instructions, before any register beyond x0-x3 is saved and
//! before Rust runs. None of these calls is audited on the full path either (they change
//! nothing and refuse nothing), so answering them early loses no record.
//!
//! Lookup: `slot(id) = ((id ^ id.rotate_right(ROTATE)) >> SHIFT) & (SLOTS - 1)`, then one
//! compare of the slot's ID with the caller's w0 (SMCCC function IDs are 32 bits; the full
//! decoder ignores x0's upper half too). The two hash parameters are searched at compile time
//! so that no two IDs share a slot; a table that cannot be separated fails the build. A slot
//! no call owns holds an ID that hashes elsewhere, so no w0 can match it.

use smccc::arch::SMCCC_VERSION;
use smccc::psci::{PSCI_CPU_SUSPEND_32, PSCI_CPU_SUSPEND_64, PSCI_MIGRATE_INFO_TYPE, PSCI_VERSION};
use stagehand_abi::function;

/// SMCCC_VERSION's answer: 1.1.
pub const SMCCC_VERSION_1_1: u64 = 0x1_0001;
/// PSCI_VERSION's answer: 1.1.
pub const PSCI_VERSION_1_1: u64 = 0x1_0001;
/// MIGRATE_INFO_TYPE's answer: no trusted OS that would need migrating.
pub const MIGRATE_INFO_NO_TRUSTED_OS: u64 = 2;

/// Every constant call with its x0-x3. REVISION first: it is the null call the benchmarks and
/// drivers use. The full path ([`super::dispatch`]) answers each the same; a host test holds
/// the two together.
pub const CALLS: [(u32, [u64; 4]); 7] = {
    let uuid = stagehand_abi::uuid_words();
    [
        (
            function::REVISION,
            [stagehand_abi::ABI_MAJOR, stagehand_abi::ABI_MINOR, 0, 0],
        ),
        (SMCCC_VERSION, [SMCCC_VERSION_1_1, 0, 0, 0]),
        (PSCI_VERSION, [PSCI_VERSION_1_1, 0, 0, 0]),
        (
            function::CALL_UID,
            [
                uuid[0] as u64,
                uuid[1] as u64,
                uuid[2] as u64,
                uuid[3] as u64,
            ],
        ),
        (PSCI_CPU_SUSPEND_32, [0; 4]),
        (PSCI_CPU_SUSPEND_64, [0; 4]),
        (
            PSCI_MIGRATE_INFO_TYPE,
            [MIGRATE_INFO_NO_TRUSTED_OS, 0, 0, 0],
        ),
    ]
};

/// Slots in the table (a power of two; the index is 5 bits wide).
pub const SLOTS: usize = 32;
/// log2 of a slot's size in bytes, by which the vector scales the index.
pub const SLOT_SIZE_LOG2: u32 = 6;
/// Width of the index field (`ubfx` width in the vector).
pub const INDEX_BITS: u32 = SLOTS.trailing_zeros();

/// One slot: the function ID in the low 32 bits of the first word (the vector compares only
/// those), then x0-x3. Padded to 64 bytes so the index scales by a shift.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(C, align(64))]
pub struct Slot {
    /// The function ID this slot answers (or, for a slot no call owns, one that hashes
    /// elsewhere).
    pub id: u64,
    /// x0-x3 of the answer.
    pub answer: [u64; 4],
    _pad: [u64; 3],
}

const _: () = assert!(core::mem::size_of::<Slot>() == 1 << SLOT_SIZE_LOG2);
const _: () = assert!(core::mem::offset_of!(Slot, answer) == 8);

/// The hash's two parameters.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Hash {
    /// Rotation of the ID that is xor-ed into it (1-31; `eor w, w, w, ror #ROTATE`).
    pub rotate: u32,
    /// Lowest bit of the index field (`ubfx` lsb, at most 32 - INDEX_BITS).
    pub shift: u32,
}

impl Hash {
    /// The slot of `id`.
    pub const fn slot(self, id: u32) -> usize {
        (((id ^ id.rotate_right(self.rotate)) >> self.shift) as usize) & (SLOTS - 1)
    }
}

/// The first hash (in a fixed search order) that puts each of `calls` in its own slot.
const fn separate(calls: &[(u32, [u64; 4])]) -> Hash {
    let mut rotate = 1;
    while rotate < 32 {
        let mut shift = 0;
        while shift <= 32 - INDEX_BITS {
            let hash = Hash { rotate, shift };
            let mut used = 0u64;
            let mut i = 0;
            while i < calls.len() {
                let bit = 1u64 << hash.slot(calls[i].0);
                if used & bit != 0 {
                    break;
                }
                used |= bit;
                i += 1;
            }
            if i == calls.len() {
                return hash;
            }
            shift += 1;
        }
        rotate += 1;
    }
    panic!("no hash separates the constant calls: widen the table");
}

/// The hash the table is built with and the vector computes.
pub const HASH: Hash = separate(&CALLS);

// The vector encodes these as `ror` and `ubfx` immediates.
const _: () = assert!(HASH.rotate >= 1 && HASH.rotate < 32);
const _: () = assert!(HASH.shift + INDEX_BITS <= 32);

const fn build(calls: &[(u32, [u64; 4])], hash: Hash) -> [Slot; SLOTS] {
    // A free slot holds an ID that hashes to another slot: no w0 can match it.
    let mut table = [Slot {
        id: 0,
        answer: [0; 4],
        _pad: [0; 3],
    }; SLOTS];
    let mut slot = 0;
    while slot < SLOTS {
        let mut id = 0u32;
        while hash.slot(id) == slot {
            id += 1;
        }
        table[slot].id = id as u64;
        slot += 1;
    }
    let mut i = 0;
    while i < calls.len() {
        let (id, answer) = calls[i];
        let slot = hash.slot(id);
        table[slot].id = id as u64;
        table[slot].answer = answer;
        i += 1;
    }
    table
}

/// The table the vector reads (`.rodata`: built here, never written).
pub static TABLE: [Slot; SLOTS] = build(&CALLS, HASH);

/// x0-x3 of `x0`'s call if it is a constant one: what the vector computes, in Rust.
pub fn lookup(x0: u64) -> Option<[u64; 4]> {
    let id = x0 as u32;
    let slot = &TABLE[HASH.slot(id)];
    (slot.id as u32 == id).then_some(slot.answer)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_constant_call_is_found_with_its_answer() {
        for (id, answer) in CALLS {
            assert_eq!(lookup(id as u64), Some(answer), "{id:#x}");
            // The upper half of x0 is not part of the function ID.
            assert_eq!(lookup(0xdead_beef_0000_0000 | id as u64), Some(answer));
        }
    }

    #[test]
    fn free_slots_match_no_id() {
        let owned: alloc::vec::Vec<usize> = CALLS.iter().map(|(id, _)| HASH.slot(*id)).collect();
        for (i, slot) in TABLE.iter().enumerate() {
            if owned.contains(&i) {
                assert_eq!(HASH.slot(slot.id as u32), i);
            } else {
                assert_ne!(HASH.slot(slot.id as u32), i, "slot {i}");
                assert_eq!(slot.answer, [0; 4]);
            }
        }
    }

    #[test]
    fn no_other_id_is_answered() {
        let known = |id: u32| CALLS.iter().any(|(c, _)| *c == id);
        // Every function number of the owners in use, fast and yielding, 32 and 64 bit, and
        // a spread of other words.
        let mut ids = alloc::vec::Vec::new();
        for owner in 0..64u32 {
            for flags in [0x8000_0000u32, 0xc000_0000, 0x0000_0000, 0x4000_0000] {
                for number in 0..0x200u32 {
                    ids.push(flags | owner << 24 | number);
                }
                ids.push(flags | owner << 24 | 0xff01);
                ids.push(flags | owner << 24 | 0xff03);
            }
        }
        let mut x = 0x9e37_79b9u32;
        for _ in 0..200_000 {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            ids.push(x);
        }
        for id in ids {
            assert_eq!(lookup(id as u64).is_some(), known(id), "{id:#x}");
        }
    }

    #[test]
    fn the_table_has_the_layout_the_vector_reads() {
        assert_eq!(core::mem::size_of_val(&TABLE), SLOTS << SLOT_SIZE_LOG2);
        assert_eq!(core::mem::align_of_val(&TABLE), 64);
    }
}
