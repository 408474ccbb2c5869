//! Decoding of SMCCC calls (HVC #0 or a trapped SMC) into typed requests. Guest integers
//! become a [`Call`] here, once; handlers never see raw register values.

use smccc::arch::{SMCCC_ARCH_FEATURES, SMCCC_VERSION};
use smccc::psci::*;
use stagehand_abi::function;

/// A decoded call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Call {
    /// SMCCC_VERSION.
    SmcccVersion,
    /// SMCCC_ARCH_FEATURES for one function ID.
    SmcccArchFeatures {
        /// The function asked about.
        function: u32,
    },
    /// PSCI_VERSION.
    PsciVersion,
    /// PSCI_FEATURES for one function ID.
    PsciFeatures {
        /// The function asked about.
        function: u32,
    },
    /// CPU_SUSPEND (32 or 64-bit): treated as a standby that returns at once.
    CpuSuspend,
    /// CPU_OFF.
    CpuOff,
    /// CPU_ON (32 or 64-bit).
    CpuOn {
        /// MPIDR of the CPU to start.
        target: u64,
        /// IPA where it starts.
        entry: u64,
        /// Value it receives in x0.
        context: u64,
    },
    /// AFFINITY_INFO (32 or 64-bit).
    AffinityInfo {
        /// MPIDR asked about.
        target: u64,
        /// Affinity level (only 0 is supported).
        level: u64,
    },
    /// MIGRATE_INFO_TYPE.
    MigrateInfoType,
    /// SYSTEM_OFF.
    SystemOff,
    /// SYSTEM_RESET.
    SystemReset,
    /// CALL_UID of the vendor hypervisor service.
    CallUid,
    /// REVISION of the vendor hypervisor service.
    Revision,
    /// FEATURES of this ABI.
    Features,
    /// AUDIT_READ: copy records from `first` on into the guest buffer `[buffer, buffer + size)`.
    AuditRead {
        /// IPA of the buffer (unchecked).
        buffer: u64,
        /// Size of the buffer in bytes (unchecked).
        size: u64,
        /// First sequence number wanted.
        first: u64,
    },
    /// AUDIT_MARK: write a mark record carrying `tag`.
    AuditMark {
        /// The guest's tag.
        tag: u64,
    },
    /// MEM_SET_ATTR.
    MemSetAttr {
        /// First IPA.
        ipa: u64,
        /// Bytes.
        size: u64,
        /// Attribute (ABI value, checked by the handler).
        attribute: u64,
    },
    /// MEM_GET_ATTR.
    MemGetAttr {
        /// The IPA asked about.
        ipa: u64,
    },
    /// MEM_QUERY_VA.
    MemQueryVa {
        /// Guest virtual address.
        va: u64,
        /// 0 read, 1 write (checked by the handler).
        access: u64,
    },
    /// CACHE_OP.
    CacheOp {
        /// First address (IPA, or guest VA with the flag).
        address: u64,
        /// Bytes.
        size: u64,
        /// Operation and flags (checked by the handler).
        op: u64,
    },
    /// CACHE_OP_BATCH.
    CacheOpBatch {
        /// IPA of the entry array.
        array: u64,
        /// Entries in it.
        count: u64,
        /// Resume cookie (0 on the first call).
        cookie: u64,
    },
    /// DEV_INFO.
    DevInfo {
        /// Index of the device.
        index: u64,
    },
    /// DMA_MAP.
    DmaMap {
        /// StreamID of the device.
        device: u64,
        /// First IPA of the buffer.
        ipa: u64,
        /// Bytes.
        size: u64,
        /// Direction (checked by the handler).
        direction: u64,
    },
    /// DMA_MAP_SG (ABI 1.1).
    DmaMapSg {
        /// StreamID of the device.
        device: u64,
        /// IPA of the segment array (checked by the handler).
        array: u64,
        /// Segments in it.
        count: u64,
        /// Direction of every segment (checked by the handler).
        direction: u64,
        /// Resume cookie (0 on the first call).
        cookie: u64,
    },
    /// DMA_UNMAP_SG (ABI 1.1).
    DmaUnmapSg {
        /// IPA of the segment array DMA_MAP_SG filled in.
        array: u64,
        /// Segments in it.
        count: u64,
        /// Resume cookie (0 on the first call).
        cookie: u64,
    },
    /// DMA_UNMAP.
    DmaUnmap {
        /// The handle DMA_MAP returned.
        handle: u64,
    },
    /// DMA_SYNC.
    DmaSync {
        /// The handle.
        handle: u64,
        /// Offset into the buffer.
        offset: u64,
        /// Bytes.
        size: u64,
        /// 0 for the CPU, 1 for the device (checked by the handler).
        target: u64,
    },
    /// Anything else.
    Unknown(u32),
}

/// Functions PSCI_FEATURES answers SUCCESS for: the PSCI functions implemented here, and
/// SMCCC_VERSION, whose presence tells a caller it may use SMCCC 1.1 discovery.
pub const PSCI_IMPLEMENTED: [u32; 13] = [
    SMCCC_VERSION,
    PSCI_VERSION,
    PSCI_CPU_SUSPEND_32,
    PSCI_CPU_SUSPEND_64,
    PSCI_CPU_OFF,
    PSCI_CPU_ON_32,
    PSCI_CPU_ON_64,
    PSCI_AFFINITY_INFO_32,
    PSCI_AFFINITY_INFO_64,
    PSCI_MIGRATE_INFO_TYPE,
    PSCI_SYSTEM_OFF,
    PSCI_SYSTEM_RESET,
    PSCI_FEATURES,
];

/// Decodes the function ID in w0 and the arguments in x1-x6. SMC32/HVC32 calls take 32-bit
/// arguments, so their upper halves are ignored, as SMCCC requires.
pub fn decode(x0: u64, args: &[u64; 6]) -> Call {
    let id = x0 as u32;
    let narrow = |v: u64| v & 0xffff_ffff;
    match id {
        SMCCC_VERSION => Call::SmcccVersion,
        SMCCC_ARCH_FEATURES => Call::SmcccArchFeatures {
            function: args[0] as u32,
        },
        PSCI_VERSION => Call::PsciVersion,
        PSCI_FEATURES => Call::PsciFeatures {
            function: args[0] as u32,
        },
        PSCI_CPU_SUSPEND_32 | PSCI_CPU_SUSPEND_64 => Call::CpuSuspend,
        PSCI_CPU_OFF => Call::CpuOff,
        PSCI_CPU_ON_64 => Call::CpuOn {
            target: args[0],
            entry: args[1],
            context: args[2],
        },
        PSCI_CPU_ON_32 => Call::CpuOn {
            target: narrow(args[0]),
            entry: narrow(args[1]),
            context: narrow(args[2]),
        },
        PSCI_AFFINITY_INFO_64 => Call::AffinityInfo {
            target: args[0],
            level: args[1],
        },
        PSCI_AFFINITY_INFO_32 => Call::AffinityInfo {
            target: narrow(args[0]),
            level: narrow(args[1]),
        },
        PSCI_MIGRATE_INFO_TYPE => Call::MigrateInfoType,
        PSCI_SYSTEM_OFF => Call::SystemOff,
        PSCI_SYSTEM_RESET => Call::SystemReset,
        function::CALL_UID => Call::CallUid,
        function::REVISION => Call::Revision,
        function::FEATURES => Call::Features,
        function::MEM_SET_ATTR => Call::MemSetAttr {
            ipa: args[0],
            size: args[1],
            attribute: args[2],
        },
        function::MEM_GET_ATTR => Call::MemGetAttr { ipa: args[0] },
        function::MEM_QUERY_VA => Call::MemQueryVa {
            va: args[0],
            access: args[1],
        },
        function::CACHE_OP => Call::CacheOp {
            address: args[0],
            size: args[1],
            op: args[2],
        },
        function::CACHE_OP_BATCH => Call::CacheOpBatch {
            array: args[0],
            count: args[1],
            cookie: args[2],
        },
        function::DEV_INFO => Call::DevInfo { index: args[0] },
        function::DMA_MAP => Call::DmaMap {
            device: args[0],
            ipa: args[1],
            size: args[2],
            direction: args[3],
        },
        function::DMA_MAP_SG => Call::DmaMapSg {
            device: args[0],
            array: args[1],
            count: args[2],
            direction: args[3],
            cookie: args[4],
        },
        function::DMA_UNMAP_SG => Call::DmaUnmapSg {
            array: args[0],
            count: args[1],
            cookie: args[2],
        },
        function::DMA_UNMAP => Call::DmaUnmap { handle: args[0] },
        function::DMA_SYNC => Call::DmaSync {
            handle: args[0],
            offset: args[1],
            size: args[2],
            target: args[3],
        },
        function::AUDIT_READ => Call::AuditRead {
            buffer: args[0],
            size: args[1],
            first: args[2],
        },
        function::AUDIT_MARK => Call::AuditMark { tag: args[0] },
        other => Call::Unknown(other),
    }
}

/// SMCCC_ARCH_FEATURES: which architecture calls exist (0) and which do not (-1).
pub fn arch_feature(function: u32) -> i64 {
    match function {
        SMCCC_VERSION | SMCCC_ARCH_FEATURES => 0,
        _ => -1,
    }
}

/// PSCI_FEATURES: 0 for an implemented function (no optional feature flags), -1 otherwise.
pub fn psci_feature(function: u32) -> i64 {
    if PSCI_IMPLEMENTED.contains(&function) {
        0
    } else {
        -1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_psci_with_32_bit_arguments_narrowed() {
        let args = [0xffff_0000_0000_0001, 0xffff_0000_4008_0000, 7, 0, 0, 0];
        assert_eq!(
            decode(PSCI_CPU_ON_32 as u64, &args),
            Call::CpuOn {
                target: 1,
                entry: 0x4008_0000,
                context: 7
            }
        );
        assert_eq!(
            decode(PSCI_CPU_ON_64 as u64, &args),
            Call::CpuOn {
                target: args[0],
                entry: args[1],
                context: 7
            }
        );
    }

    #[test]
    fn function_id_is_w0_only() {
        assert_eq!(
            decode(0xdead_beef_0000_0000 | PSCI_VERSION as u64, &[0; 6]),
            Call::PsciVersion
        );
    }

    #[test]
    fn abi_calls_and_unknown_ids() {
        assert_eq!(decode(function::CALL_UID as u64, &[0; 6]), Call::CallUid);
        assert_eq!(
            decode(
                function::DMA_MAP as u64,
                &[0x10, 0x4000_0000, 0x1000, 2, 0, 0]
            ),
            Call::DmaMap {
                device: 0x10,
                ipa: 0x4000_0000,
                size: 0x1000,
                direction: 2
            }
        );
        assert_eq!(
            decode(
                function::DMA_MAP_SG as u64,
                &[0x10, 0x4000_0000, 3, 1, 2, 9]
            ),
            Call::DmaMapSg {
                device: 0x10,
                array: 0x4000_0000,
                count: 3,
                direction: 1,
                cookie: 2
            }
        );
        assert_eq!(
            decode(function::DMA_UNMAP_SG as u64, &[0x4000_0000, 3, 1, 9, 9, 9]),
            Call::DmaUnmapSg {
                array: 0x4000_0000,
                count: 3,
                cookie: 1
            }
        );
        assert_eq!(decode(0xC600_0FFF, &[0; 6]), Call::Unknown(0xC600_0FFF));
        assert_eq!(
            decode(
                function::AUDIT_READ as u64,
                &[0x4000_1000, 4096, 7, 9, 9, 9]
            ),
            Call::AuditRead {
                buffer: 0x4000_1000,
                size: 4096,
                first: 7
            }
        );
        assert_eq!(
            decode(function::AUDIT_MARK as u64, &[u64::MAX, 0, 0, 0, 0, 0]),
            Call::AuditMark { tag: u64::MAX }
        );
        assert_eq!(psci_feature(PSCI_CPU_ON_64), 0);
        assert_eq!(psci_feature(PSCI_SYSTEM_RESET2_64), -1);
        assert_eq!(
            psci_feature(SMCCC_VERSION),
            0,
            "Linux asks before using SMCCC 1.1"
        );
        assert_eq!(arch_feature(SMCCC_VERSION), 0);
        assert_eq!(arch_feature(0x8000_8000), -1);
    }
}
