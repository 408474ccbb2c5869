//! The Arm SMMUv3: its register block (declared once), and the pure encodings a driver needs:
//! stream table entries, commands, event records, queue index arithmetic and the collapsing of
//! fault floods. Nothing here touches hardware; the EL2 driver (`hyp/src/smmu.rs`) writes what
//! these functions compute, and the host tests check every encoding against the layouts of the
//! Arm SMMUv3 architecture specification (IHI 0070): STE in 5.2, commands in 4, events in 7.3,
//! registers in 6.3.
//!
//! Only what stagehand uses is encoded: stage-2-only translation (STE.Config = 0b110) with
//! AArch64 tables and a 4 KiB granule, linear stream tables, polled CMD_SYNC (no MSIs, no
//! interrupts: the guest owns the GIC).

#![forbid(unsafe_code)]

use core::fmt;
use tock_registers::registers::{ReadOnly, ReadWrite};
use tock_registers::{register_bitfields, register_structs};

register_bitfields! {u32,
    /// SMMU_IDR0: features.
    pub IDR0 [
        /// Stream table formats: linear only, or linear and 2-level.
        ST_LEVEL OFFSET(27) NUMBITS(2) [Linear = 0, TwoLevel = 1],
        /// 16-bit VMIDs.
        VMID16 OFFSET(18) NUMBITS(1) [],
        /// Coherent access to tables and queues (the SMMU snoops CPU caches).
        COHACC OFFSET(4) NUMBITS(1) [],
        /// Broadcast TLB maintenance.
        BTM OFFSET(5) NUMBITS(1) [],
        /// Translation table formats.
        TTF OFFSET(2) NUMBITS(2) [AArch32 = 1, AArch64 = 2, Both = 3],
        /// Stage 1 translation.
        S1P OFFSET(1) NUMBITS(1) [],
        /// Stage 2 translation.
        S2P OFFSET(0) NUMBITS(1) []
    ],
    /// SMMU_IDR1: table and queue sizes.
    pub IDR1 [
        /// log2 of the largest command queue.
        CMDQS OFFSET(21) NUMBITS(5) [],
        /// log2 of the largest event queue.
        EVENTQS OFFSET(16) NUMBITS(5) [],
        /// StreamID bits.
        SIDSIZE OFFSET(0) NUMBITS(6) []
    ],
    /// SMMU_IDR3: more features.
    pub IDR3 [
        /// STE.S2FWB is supported (stage-2 forced write-back, as HCR_EL2.FWB).
        FWB OFFSET(8) NUMBITS(1) []
    ],
    /// SMMU_IDR5: output address size and granules.
    pub IDR5 [
        /// 64 KiB granule.
        GRAN64K OFFSET(6) NUMBITS(1) [],
        /// 4 KiB granule.
        GRAN4K OFFSET(4) NUMBITS(1) [],
        /// Output address size, encoded as ID_AA64MMFR0_EL1.PARange.
        OAS OFFSET(0) NUMBITS(3) []
    ],
    /// SMMU_CR0 and SMMU_CR0ACK.
    pub CR0 [
        /// Command queue enabled.
        CMDQEN OFFSET(3) NUMBITS(1) [],
        /// Event queue enabled.
        EVTQEN OFFSET(2) NUMBITS(1) [],
        /// PRI queue enabled.
        PRIQEN OFFSET(1) NUMBITS(1) [],
        /// Translation enabled (else GBPA applies).
        SMMUEN OFFSET(0) NUMBITS(1) []
    ],
    /// SMMU_CR1: cacheability and shareability of table and queue accesses.
    pub CR1 [
        /// Queue shareability.
        QUEUE_SH OFFSET(10) NUMBITS(2) [NonShareable = 0, Outer = 2, Inner = 3],
        /// Queue outer cacheability.
        QUEUE_OC OFFSET(8) NUMBITS(2) [NonCacheable = 0, WriteBack = 1, WriteThrough = 2],
        /// Queue inner cacheability.
        QUEUE_IC OFFSET(6) NUMBITS(2) [NonCacheable = 0, WriteBack = 1, WriteThrough = 2],
        /// Table shareability.
        TABLE_SH OFFSET(4) NUMBITS(2) [NonShareable = 0, Outer = 2, Inner = 3],
        /// Table outer cacheability.
        TABLE_OC OFFSET(2) NUMBITS(2) [NonCacheable = 0, WriteBack = 1, WriteThrough = 2],
        /// Table inner cacheability.
        TABLE_IC OFFSET(0) NUMBITS(2) [NonCacheable = 0, WriteBack = 1, WriteThrough = 2]
    ],
    /// SMMU_CR2.
    pub CR2 [
        /// Private TLB maintenance: ignore broadcast TLBIs from the CPUs.
        PTM OFFSET(2) NUMBITS(1) [],
        /// Record C_BAD_STREAMID for StreamIDs beyond the stream table.
        RECINVSID OFFSET(1) NUMBITS(1) [],
        /// EL2 translation regime with E2H.
        E2H OFFSET(0) NUMBITS(1) []
    ],
    /// SMMU_GBPA: what happens to traffic while SMMU_CR0.SMMUEN = 0.
    pub GBPA [
        /// Set with a new value; the SMMU clears it when the update has taken effect.
        UPDATE OFFSET(31) NUMBITS(1) [],
        /// Abort all incoming traffic (instead of bypassing the SMMU).
        ABORT OFFSET(20) NUMBITS(1) []
    ],
    /// SMMU_IRQ_CTRL and SMMU_IRQ_CTRLACK.
    pub IRQ_CTRL [
        /// Event queue interrupt.
        EVTQ_IRQEN OFFSET(2) NUMBITS(1) [],
        /// PRI queue interrupt.
        PRIQ_IRQEN OFFSET(1) NUMBITS(1) [],
        /// Global error interrupt.
        GERROR_IRQEN OFFSET(0) NUMBITS(1) []
    ],
    /// SMMU_GERROR and SMMU_GERRORN: an error is active while the two bits differ.
    pub GERROR [
        /// Service failure mode.
        SFM_ERR OFFSET(8) NUMBITS(1) [],
        /// An MSI write of GERROR was aborted.
        MSI_GERROR_ABT_ERR OFFSET(7) NUMBITS(1) [],
        /// An MSI write of the PRI queue was aborted.
        MSI_PRIQ_ABT_ERR OFFSET(6) NUMBITS(1) [],
        /// An MSI write of the event queue was aborted.
        MSI_EVTQ_ABT_ERR OFFSET(5) NUMBITS(1) [],
        /// A CMD_SYNC MSI write was aborted.
        MSI_CMDQ_ABT_ERR OFFSET(4) NUMBITS(1) [],
        /// A PRI queue write was aborted.
        PRIQ_ABT_ERR OFFSET(3) NUMBITS(1) [],
        /// An event queue write was aborted: events were lost.
        EVTQ_ABT_ERR OFFSET(2) NUMBITS(1) [],
        /// The command at CMDQ_CONS is in error (CMDQ_CONS.ERR says why).
        CMDQ_ERR OFFSET(0) NUMBITS(1) []
    ],
    /// SMMU_STRTAB_BASE_CFG.
    pub STRTAB_BASE_CFG [
        /// Table format.
        FMT OFFSET(16) NUMBITS(2) [Linear = 0, TwoLevel = 1],
        /// StreamID split point of a 2-level table.
        SPLIT OFFSET(6) NUMBITS(5) [],
        /// log2 of the number of StreamIDs the table covers.
        LOG2SIZE OFFSET(0) NUMBITS(6) []
    ],
    /// SMMU_CMDQ_CONS.
    pub CMDQ_CONS [
        /// Why the command at RD is in error (see [`CommandError`]).
        ERR OFFSET(24) NUMBITS(7) [],
        /// Read index with wrap bit.
        RD OFFSET(0) NUMBITS(20) []
    ],
    /// SMMU_EVENTQ_PROD (register page 1).
    pub EVTQ_PROD [
        /// Overflow flag: toggles when events were lost because the queue was full.
        OVFLG OFFSET(31) NUMBITS(1) [],
        /// Write index with wrap bit.
        WR OFFSET(0) NUMBITS(20) []
    ],
    /// SMMU_EVENTQ_CONS (register page 1).
    pub EVTQ_CONS [
        /// Overflow acknowledged: software copies OVFLG here.
        OVACKFLG OFFSET(31) NUMBITS(1) [],
        /// Read index with wrap bit.
        RD OFFSET(0) NUMBITS(20) []
    ]
}

register_bitfields! {u64,
    /// SMMU_STRTAB_BASE.
    pub STRTAB_BASE [
        /// Read-allocate hint.
        RA OFFSET(62) NUMBITS(1) [],
        /// Physical address bits 51:6 of the table.
        ADDR OFFSET(6) NUMBITS(46) []
    ],
    /// SMMU_CMDQ_BASE and SMMU_EVENTQ_BASE (bit 62 is RA for the former, WA for the latter).
    pub QUEUE_BASE [
        /// Read-allocate (command queue) or write-allocate (event queue) hint.
        ALLOCATE OFFSET(62) NUMBITS(1) [],
        /// Physical address bits 51:5 of the queue.
        ADDR OFFSET(5) NUMBITS(47) [],
        /// log2 of the number of entries.
        LOG2SIZE OFFSET(0) NUMBITS(5) []
    ]
}

register_structs! {
    /// The SMMUv3 register block: page 0 and the start of page 1 (64 KiB later), where the
    /// event queue's PROD and CONS live on hardware.
    pub Smmuv3Registers {
        (0x00000 => pub idr0: ReadOnly<u32, IDR0::Register>),
        (0x00004 => pub idr1: ReadOnly<u32, IDR1::Register>),
        (0x00008 => pub idr2: ReadOnly<u32>),
        (0x0000c => pub idr3: ReadOnly<u32, IDR3::Register>),
        (0x00010 => pub idr4: ReadOnly<u32>),
        (0x00014 => pub idr5: ReadOnly<u32, IDR5::Register>),
        (0x00018 => pub iidr: ReadOnly<u32>),
        (0x0001c => pub aidr: ReadOnly<u32>),
        (0x00020 => pub cr0: ReadWrite<u32, CR0::Register>),
        (0x00024 => pub cr0ack: ReadOnly<u32, CR0::Register>),
        (0x00028 => pub cr1: ReadWrite<u32, CR1::Register>),
        (0x0002c => pub cr2: ReadWrite<u32, CR2::Register>),
        (0x00030 => _reserved0),
        (0x00040 => pub statusr: ReadOnly<u32>),
        (0x00044 => pub gbpa: ReadWrite<u32, GBPA::Register>),
        (0x00048 => pub agbpa: ReadWrite<u32>),
        (0x0004c => _reserved1),
        (0x00050 => pub irq_ctrl: ReadWrite<u32, IRQ_CTRL::Register>),
        (0x00054 => pub irq_ctrlack: ReadOnly<u32, IRQ_CTRL::Register>),
        (0x00058 => _reserved2),
        (0x00060 => pub gerror: ReadOnly<u32, GERROR::Register>),
        (0x00064 => pub gerrorn: ReadWrite<u32, GERROR::Register>),
        (0x00068 => _reserved3),
        (0x00080 => pub strtab_base: ReadWrite<u64, STRTAB_BASE::Register>),
        (0x00088 => pub strtab_base_cfg: ReadWrite<u32, STRTAB_BASE_CFG::Register>),
        (0x0008c => _reserved4),
        (0x00090 => pub cmdq_base: ReadWrite<u64, QUEUE_BASE::Register>),
        (0x00098 => pub cmdq_prod: ReadWrite<u32>),
        (0x0009c => pub cmdq_cons: ReadWrite<u32, CMDQ_CONS::Register>),
        (0x000a0 => pub evtq_base: ReadWrite<u64, QUEUE_BASE::Register>),
        (0x000a8 => _reserved5),
        (0x100a8 => pub evtq_prod: ReadWrite<u32, EVTQ_PROD::Register>),
        (0x100ac => pub evtq_cons: ReadWrite<u32, EVTQ_CONS::Register>),
        (0x100b0 => @END),
    }
}

/// Bytes of one stream table entry.
pub const STE_BYTES: u64 = 64;
/// Bytes of one command.
pub const COMMAND_BYTES: u64 = 16;
/// Bytes of one event record.
pub const EVENT_BYTES: u64 = 32;
/// Mask of a physical or intermediate physical address field (bits 51:0).
const ADDRESS_BITS_51: u64 = (1 << 52) - 1;

const fn field(value: u64, shift: u32, bits: u32) -> u64 {
    (value & ((1 << bits) - 1)) << shift
}

const fn extract(value: u64, shift: u32, bits: u32) -> u64 {
    (value >> shift) & ((1 << bits) - 1)
}

// ---------------------------------------------------------------------------------------------
// Stream table entries
// ---------------------------------------------------------------------------------------------

/// How a stream's stage 2 is set up: the same fields as the CPU's VTCR_EL2/VTTBR_EL2.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Stage2Config {
    /// VMID tagging the SMMU's TLB entries of this stream.
    pub vmid: u16,
    /// VTCR_EL2 of the tables (only bits 18:0 are used: T0SZ, SL0, IRGN0, ORGN0, SH0, TG0, PS).
    pub vtcr: u64,
    /// Physical address of the root table (4 KiB-aligned, one root: no concatenation).
    pub root: u64,
    /// The tables use FEAT_S2FWB MemAttr encodings (needs SMMU_IDR3.FWB).
    pub fwb: bool,
}

/// VTCR_EL2.PS, bits 18:16.
const VTCR_PS_SHIFT: u32 = 16;

/// `vtcr` with its PS (output size) field lowered to at most `oas` (SMMU_IDR5.OAS, the same
/// encoding): the SMMU must not be told of more output bits than it has.
pub const fn cap_output_size(vtcr: u64, oas: u64) -> u64 {
    let ps = extract(vtcr, VTCR_PS_SHIFT, 3);
    let capped = if ps > oas { oas } else { ps };
    (vtcr & !field(0b111, VTCR_PS_SHIFT, 3)) | field(capped, VTCR_PS_SHIFT, 3)
}

/// A stream table entry: eight 64-bit words.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ste(pub [u64; 8]);

/// STE.V.
const STE_0_VALID: u64 = 1 << 0;
/// STE.Config, bits 3:1.
const STE_0_CONFIG_SHIFT: u32 = 1;
const CONFIG_ABORT: u64 = 0b000;
const CONFIG_STAGE2: u64 = 0b110;
/// STE.SHCFG (bits 109:108, dword 1 bits 45:44): 0b01 = use the incoming shareability.
const STE_1_SHCFG_INCOMING: u64 = 0b01 << 44;
/// STE.S2FWB (bit 89, dword 1 bit 25).
const STE_1_S2FWB: u64 = 1 << 25;
/// STE.S2VTCR, dword 2 bits 50:32 (VTCR_EL2 bits 18:0).
const STE_2_S2VTCR_SHIFT: u32 = 32;
/// STE.S2AA64: AArch64 tables (QEMU crashes on 0).
const STE_2_S2AA64: u64 = 1 << 51;
/// STE.S2AFFD: no access-flag faults (our descriptors set AF; QEMU has no AF update).
const STE_2_S2AFFD: u64 = 1 << 53;
/// STE.S2R: record stage-2 faults in the event queue (else they are silent).
const STE_2_S2R: u64 = 1 << 58;
/// STE.S2TTB, dword 3 bits 51:4.
const STE_3_S2TTB_MASK: u64 = ADDRESS_BITS_51 & !0xf;

impl Ste {
    /// All zeros: V = 0. The default of every StreamID no device was found for: traffic is
    /// aborted and C_BAD_STE recorded, never bypassed.
    pub const INVALID: Ste = Ste([0; 8]);

    /// Valid, Config = abort: traffic is aborted, nothing is recorded. For devices the
    /// configuration keeps from the guest.
    pub const fn abort() -> Ste {
        Ste([
            STE_0_VALID | CONFIG_ABORT << STE_0_CONFIG_SHIFT,
            0,
            0,
            0,
            0,
            0,
            0,
            0,
        ])
    }

    /// Stage 1 bypassed, stage 2 translated by `config`'s tables; stage-2 faults terminate the
    /// transaction and are recorded.
    pub const fn stage2(config: &Stage2Config) -> Ste {
        let dword1 = STE_1_SHCFG_INCOMING | if config.fwb { STE_1_S2FWB } else { 0 };
        let dword2 = config.vmid as u64
            | field(config.vtcr, STE_2_S2VTCR_SHIFT, 19)
            | STE_2_S2AA64
            | STE_2_S2AFFD
            | STE_2_S2R;
        Ste([
            STE_0_VALID | CONFIG_STAGE2 << STE_0_CONFIG_SHIFT,
            dword1,
            dword2,
            config.root & STE_3_S2TTB_MASK,
            0,
            0,
            0,
            0,
        ])
    }

    /// Whether the entry is valid.
    pub const fn is_valid(&self) -> bool {
        self.0[0] & STE_0_VALID != 0
    }

    /// The order in which to write the words of a new entry over an old one: every word but
    /// the first, then the first (which holds V and Config), so that the SMMU never sees a
    /// valid entry with stale fields. A barrier belongs between the two steps.
    pub const WRITE_ORDER: [usize; 8] = [1, 2, 3, 4, 5, 6, 7, 0];
}

/// log2 of the number of entries of a linear stream table that covers StreamIDs
/// `0..=max_stream_id` and at least `minimum_log2` of them, or `None` when the SMMU's
/// `sid_bits` (SMMU_IDR1.SIDSIZE) cannot express `max_stream_id`.
pub fn linear_table_log2(max_stream_id: u32, minimum_log2: u32, sid_bits: u32) -> Option<u32> {
    let needed = u32::BITS - max_stream_id.leading_zeros();
    if needed > sid_bits {
        return None;
    }
    Some(needed.max(minimum_log2).min(sid_bits))
}

/// SMMU_STRTAB_BASE for a table at `pa`, read-allocate.
pub const fn strtab_base(pa: u64) -> u64 {
    1 << 62 | (pa & ADDRESS_BITS_51 & !0x3f)
}

/// SMMU_STRTAB_BASE_CFG for a linear table of `2^log2` entries.
pub const fn strtab_base_cfg_linear(log2: u32) -> u32 {
    log2 & 0x3f
}

/// SMMU_CMDQ_BASE / SMMU_EVENTQ_BASE for a queue of `2^log2` entries at `pa`, with the
/// read- or write-allocate hint.
pub const fn queue_base(pa: u64, log2: u32) -> u64 {
    1 << 62 | (pa & ADDRESS_BITS_51 & !0x1f) | (log2 as u64 & 0x1f)
}

// ---------------------------------------------------------------------------------------------
// Commands
// ---------------------------------------------------------------------------------------------

/// Command opcodes (dword 0 bits 7:0).
pub mod opcode {
    /// Invalidate the cached STE of one StreamID.
    pub const CFGI_STE: u8 = 0x03;
    /// Invalidate every cached configuration structure.
    pub const CFGI_ALL: u8 = 0x04;
    /// Invalidate stage-1 and stage-2 TLB entries of a VMID.
    pub const TLBI_S12_VMALL: u8 = 0x28;
    /// Invalidate stage-2 TLB entries of an IPA in a VMID.
    pub const TLBI_S2_IPA: u8 = 0x2a;
    /// Invalidate every non-secure, non-hypervisor TLB entry.
    pub const TLBI_NSNH_ALL: u8 = 0x30;
    /// Completion barrier: consumed once every earlier command has completed.
    pub const CMD_SYNC: u8 = 0x46;
}

/// One command-queue entry: two 64-bit words.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Command(pub [u64; 2]);

impl Command {
    /// CMD_CFGI_STE for `stream_id`, leaf only (we use linear tables: there is nothing else).
    pub const fn cfgi_ste(stream_id: u32) -> Command {
        Command([opcode::CFGI_STE as u64 | (stream_id as u64) << 32, 1])
    }

    /// CMD_CFGI_ALL: every StreamID (Range = 31).
    pub const fn cfgi_all() -> Command {
        Command([opcode::CFGI_ALL as u64, 31])
    }

    /// CMD_TLBI_S2_IPA for the 4 KiB page holding `ipa` in `vmid`; `leaf` when only the last
    /// level changed (a page unmapped or its permissions changed, tables kept).
    pub const fn tlbi_s2_ipa(vmid: u16, ipa: u64, leaf: bool) -> Command {
        Command([
            opcode::TLBI_S2_IPA as u64 | (vmid as u64) << 32,
            (ipa & ADDRESS_BITS_51 & !0xfff) | leaf as u64,
        ])
    }

    /// CMD_TLBI_S12_VMALL: everything of `vmid`.
    pub const fn tlbi_s12_vmall(vmid: u16) -> Command {
        Command([opcode::TLBI_S12_VMALL as u64 | (vmid as u64) << 32, 0])
    }

    /// CMD_TLBI_NSNH_ALL: every non-secure, non-hypervisor TLB entry (used once at boot).
    pub const fn tlbi_nsnh_all() -> Command {
        Command([opcode::TLBI_NSNH_ALL as u64, 0])
    }

    /// CMD_SYNC without a completion signal (CS = SIG_NONE): software polls CMDQ_CONS.
    /// MSH = inner shareable, so that it also orders the SMMU's earlier memory writes.
    pub const fn sync() -> Command {
        Command([opcode::CMD_SYNC as u64 | 0b11 << 22, 0])
    }

    /// The opcode.
    pub const fn opcode(&self) -> u8 {
        self.0[0] as u8
    }
}

/// Above this many pages, one CMD_TLBI_S12_VMALL replaces per-page CMD_TLBI_S2_IPA: a long run
/// of per-page commands would cost more than refilling the device's TLB.
pub const TLBI_PAGE_THRESHOLD: u64 = 16;

/// The commands that make the SMMU forget its translations of `[ipa, ipa + size)` in `vmid`,
/// in queue order: one leaf CMD_TLBI_S2_IPA per 4 KiB page for up to [`TLBI_PAGE_THRESHOLD`]
/// pages, else one CMD_TLBI_S12_VMALL; then exactly one CMD_SYNC, after which the device can
/// no longer use a stale translation. This list is what one DMA_UNMAP of a strict device (or
/// one attribute change seen by shared devices) issues, and what its audit record counts.
pub fn tlb_invalidation(vmid: u16, ipa: u64, size: u64) -> alloc::vec::Vec<Command> {
    tlb_invalidation_commands(vmid, ipa, size)
        .chain(core::iter::once(Command::sync()))
        .collect()
}

/// The commands of [`tlb_invalidation`] before its CMD_SYNC, one by one, allocating nothing:
/// what a driver queues for each run ahead of its own single CMD_SYNC.
pub fn tlb_invalidation_commands(vmid: u16, ipa: u64, size: u64) -> TlbInvalidationCommands {
    let pages = size.div_ceil(4096);
    TlbInvalidationCommands {
        vmid,
        ipa,
        // A wide run is one command, as if it were one page.
        left: if pages > TLBI_PAGE_THRESHOLD {
            1
        } else {
            pages
        },
        wide: pages > TLBI_PAGE_THRESHOLD,
    }
}

/// The iterator [`tlb_invalidation_commands`] returns: a counter, so that a driver's loop over
/// it is a few instructions a command (a chain of adapters costs dozens on the unmap path).
#[derive(Clone, Debug)]
pub struct TlbInvalidationCommands {
    vmid: u16,
    /// The next page's IPA.
    ipa: u64,
    /// Commands still to come.
    left: u64,
    /// One CMD_TLBI_S12_VMALL instead of per-page commands.
    wide: bool,
}

impl Iterator for TlbInvalidationCommands {
    type Item = Command;

    fn next(&mut self) -> Option<Command> {
        if self.left == 0 {
            return None;
        }
        self.left -= 1;
        if self.wide {
            return Some(Command::tlbi_s12_vmall(self.vmid));
        }
        let command = Command::tlbi_s2_ipa(self.vmid, self.ipa, true);
        self.ipa += 4096;
        Some(command)
    }
}

/// The kinds of `commands` as an audit record reports them: bits of
/// [`stagehand_abi::audit::smmu_command`].
pub fn command_kinds(commands: &[Command]) -> u16 {
    use stagehand_abi::audit::smmu_command;
    commands.iter().fold(0, |kinds, command| {
        kinds
            | match command.opcode() {
                opcode::CFGI_STE => smmu_command::CFGI_STE,
                opcode::CFGI_ALL => smmu_command::CFGI_ALL,
                opcode::TLBI_S2_IPA => smmu_command::TLBI_S2_IPA,
                opcode::TLBI_S12_VMALL => smmu_command::TLBI_S12_VMALL,
                opcode::CMD_SYNC => smmu_command::SYNC,
                _ => smmu_command::OTHER,
            }
    })
}

/// Why the command at CMDQ_CONS stopped the queue (CMDQ_CONS.ERR).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CommandError {
    /// CERROR_NONE: no error recorded.
    None,
    /// CERROR_ILL: an unknown or malformed command.
    Illegal,
    /// CERROR_ABT: fetching the command aborted.
    Abort,
    /// CERROR_ATC_INV_SYNC: an ATC invalidation timed out.
    AtcInvalidationSync,
    /// Another code.
    Other(u8),
}

impl CommandError {
    /// Decodes CMDQ_CONS.ERR.
    pub const fn from_code(code: u8) -> CommandError {
        match code {
            0 => CommandError::None,
            1 => CommandError::Illegal,
            2 => CommandError::Abort,
            3 => CommandError::AtcInvalidationSync,
            other => CommandError::Other(other),
        }
    }
}

impl fmt::Display for CommandError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CommandError::None => write!(f, "no error"),
            CommandError::Illegal => write!(f, "illegal command"),
            CommandError::Abort => write!(f, "command fetch aborted"),
            CommandError::AtcInvalidationSync => write!(f, "ATC invalidation timed out"),
            CommandError::Other(code) => write!(f, "command error {code:#x}"),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Queue indices
// ---------------------------------------------------------------------------------------------

/// PROD/CONS arithmetic of a queue of `2^log2` entries: the low `log2` bits are the index, the
/// next bit the wrap flag (toggled at each pass round the queue). The queue is empty when index
/// and wrap are equal, full when the indices are equal and the wraps differ.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QueueIndex {
    log2: u32,
}

impl QueueIndex {
    /// A queue of `2^log2` entries (`log2` at most 19, the register field's limit).
    pub const fn new(log2: u32) -> QueueIndex {
        QueueIndex { log2 }
    }

    /// Number of entries.
    pub const fn entries(&self) -> u32 {
        1 << self.log2
    }

    /// log2 of the number of entries.
    pub const fn log2(&self) -> u32 {
        self.log2
    }

    const fn wrap_bit(&self) -> u32 {
        1 << self.log2
    }

    /// Index plus wrap bit of a PROD/CONS value (other bits, such as the overflow flag or
    /// CONS.ERR, dropped).
    pub const fn position(&self, value: u32) -> u32 {
        value & ((self.wrap_bit() << 1) - 1)
    }

    /// The slot a PROD/CONS value points at.
    pub const fn slot(&self, value: u32) -> u32 {
        value & (self.entries() - 1)
    }

    /// The wrap flag of a PROD/CONS value.
    pub const fn wrap(&self, value: u32) -> bool {
        value & self.wrap_bit() != 0
    }

    /// The position after `value` (the wrap flag toggles past the last slot).
    pub const fn next(&self, value: u32) -> u32 {
        self.position(self.position(value) + 1)
    }

    /// Number of entries between `cons` and `prod` (what the consumer has left to read).
    pub const fn used(&self, prod: u32, cons: u32) -> u32 {
        let prod = self.position(prod);
        let cons = self.position(cons);
        (prod.wrapping_sub(cons)) & ((self.wrap_bit() << 1) - 1)
    }

    /// Whether the queue is empty.
    pub const fn is_empty(&self, prod: u32, cons: u32) -> bool {
        self.position(prod) == self.position(cons)
    }

    /// Whether the queue is full.
    pub const fn is_full(&self, prod: u32, cons: u32) -> bool {
        self.slot(prod) == self.slot(cons) && self.wrap(prod) != self.wrap(cons)
    }

    /// Free slots for the producer.
    pub const fn free(&self, prod: u32, cons: u32) -> u32 {
        self.entries() - self.used(prod, cons)
    }
}

/// EVENTQ_PROD.OVFLG / EVENTQ_CONS.OVACKFLG.
pub const EVENTQ_OVERFLOW_FLAG: u32 = 1 << 31;

/// Whether the event queue overflowed since software last acknowledged it: PROD.OVFLG differs
/// from CONS.OVACKFLG.
pub const fn event_queue_overflowed(prod: u32, cons: u32) -> bool {
    (prod ^ cons) & EVENTQ_OVERFLOW_FLAG != 0
}

// ---------------------------------------------------------------------------------------------
// Global errors
// ---------------------------------------------------------------------------------------------

/// SMMU_GERROR bits that are active: those that differ from SMMU_GERRORN. Writing
/// `gerrorn ^ active` to GERRORN acknowledges them.
pub const fn active_global_errors(gerror: u32, gerrorn: u32) -> u32 {
    gerror ^ gerrorn
}

/// Names of the SMMU_GERROR bits, by bit number.
const GLOBAL_ERROR_NAMES: [(u32, &str); 9] = [
    (0, "CMDQ_ERR"),
    (2, "EVENTQ_ABT_ERR"),
    (3, "PRIQ_ABT_ERR"),
    (4, "MSI_CMDQ_ABT_ERR"),
    (5, "MSI_EVENTQ_ABT_ERR"),
    (6, "MSI_PRIQ_ABT_ERR"),
    (7, "MSI_GERROR_ABT_ERR"),
    (8, "SFM_ERR"),
    (9, "CMDQP_ERR"),
];

/// The bit of SMMU_GERROR.CMDQ_ERR.
pub const GERROR_CMDQ_ERR: u32 = 1 << 0;
/// The bit of SMMU_GERROR.EVENTQ_ABT_ERR.
pub const GERROR_EVENTQ_ABT_ERR: u32 = 1 << 2;

/// A set of SMMU_GERROR bits that displays as their names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GlobalErrors(pub u32);

impl fmt::Display for GlobalErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut first = true;
        for bit in 0..32 {
            if self.0 & (1 << bit) == 0 {
                continue;
            }
            if !first {
                write!(f, "|")?;
            }
            first = false;
            match GLOBAL_ERROR_NAMES.iter().find(|(b, _)| *b == bit) {
                Some((_, name)) => write!(f, "{name}")?,
                None => write!(f, "bit{bit}")?,
            }
        }
        if first {
            write!(f, "none")?;
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// Events
// ---------------------------------------------------------------------------------------------

/// The type of an event record (dword 0 bits 7:0).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct EventType(pub u8);

impl EventType {
    /// Unsupported upstream transaction.
    pub const F_UUT: EventType = EventType(0x01);
    /// StreamID beyond the stream table.
    pub const C_BAD_STREAMID: EventType = EventType(0x02);
    /// Fetching the STE aborted.
    pub const F_STE_FETCH: EventType = EventType(0x03);
    /// Invalid or ILLEGAL STE.
    pub const C_BAD_STE: EventType = EventType(0x04);
    /// Translation not permitted (ATS).
    pub const F_TRANSL_FORBIDDEN: EventType = EventType(0x07);
    /// Fetching a context descriptor aborted.
    pub const F_CD_FETCH: EventType = EventType(0x09);
    /// Invalid context descriptor.
    pub const C_BAD_CD: EventType = EventType(0x0a);
    /// A table walk access aborted.
    pub const F_WALK_EABT: EventType = EventType(0x0b);
    /// Translation fault: no mapping.
    pub const F_TRANSLATION: EventType = EventType(0x10);
    /// Address size fault.
    pub const F_ADDR_SIZE: EventType = EventType(0x11);
    /// Access flag fault.
    pub const F_ACCESS: EventType = EventType(0x12);
    /// Permission fault.
    pub const F_PERMISSION: EventType = EventType(0x13);
    /// TLB conflict.
    pub const F_TLB_CONFLICT: EventType = EventType(0x20);
    /// Configuration cache conflict.
    pub const F_CFG_CONFLICT: EventType = EventType(0x21);

    /// A short lower-case name, `None` for codes this code does not know.
    pub const fn name(self) -> Option<&'static str> {
        Some(match self.0 {
            0x01 => "unsupported-transaction",
            0x02 => "bad-streamid",
            0x03 => "ste-fetch",
            0x04 => "bad-ste",
            0x05 => "bad-ats-request",
            0x06 => "stream-disabled",
            0x07 => "translation-forbidden",
            0x08 => "bad-substreamid",
            0x09 => "cd-fetch",
            0x0a => "bad-cd",
            0x0b => "walk-abort",
            0x10 => "translation",
            0x11 => "address-size",
            0x12 => "access",
            0x13 => "permission",
            0x20 => "tlb-conflict",
            0x21 => "config-conflict",
            0x24 => "page-request",
            0x25 => "vms-fetch",
            _ => return None,
        })
    }

    /// Whether records of this type carry the faulting input address, access direction and
    /// stage (the translation-fault family and F_WALK_EABT / F_TRANSL_FORBIDDEN / F_UUT).
    pub const fn has_address(self) -> bool {
        matches!(self.0, 0x01 | 0x07 | 0x0b | 0x10..=0x13)
    }
}

/// A decoded event record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Event {
    /// What happened.
    pub kind: EventType,
    /// The device's StreamID.
    pub stream_id: u32,
    /// The SubstreamID, when the transaction had one.
    pub substream_id: Option<u32>,
    /// The transaction was a write (RnW = 0); `false` for reads and for records without an
    /// access.
    pub write: bool,
    /// The fault was at stage 2 (S2 = 1).
    pub stage2: bool,
    /// The input address (the IOVA; with stage 1 bypassed, the IPA), for records that carry it.
    pub input_address: Option<u64>,
    /// The IPA of a stage-2 fault, bits 51:12 (the record's low bits are not meaningful).
    pub ipa: Option<u64>,
}

/// Dword 0: SSV bit 11, SubstreamID 31:12, StreamID 63:32.
const EVT_0_SSV: u64 = 1 << 11;
/// Dword 1: RnW bit 35 (1 = read), S2 bit 39.
const EVT_1_RNW: u64 = 1 << 35;
const EVT_1_S2: u64 = 1 << 39;
/// Dword 3: IPA bits 51:12.
const EVT_3_IPA_MASK: u64 = ADDRESS_BITS_51 & !0xfff;

impl Event {
    /// Decodes the four words of a record.
    pub const fn decode(record: [u64; 4]) -> Event {
        let kind = EventType(record[0] as u8);
        let addressed = kind.has_address();
        let stage2 = addressed && record[1] & EVT_1_S2 != 0;
        Event {
            kind,
            stream_id: (record[0] >> 32) as u32,
            substream_id: if record[0] & EVT_0_SSV != 0 {
                Some(extract(record[0], 12, 20) as u32)
            } else {
                None
            },
            write: addressed && record[1] & EVT_1_RNW == 0,
            stage2,
            input_address: if addressed { Some(record[2]) } else { None },
            ipa: if stage2 && !matches!(kind.0, 0x01 | 0x07) {
                Some(record[3] & EVT_3_IPA_MASK)
            } else {
                None
            },
        }
    }

    /// The address to report: the stage-2 IPA when there is one, else the input address
    /// (which is the IPA too while stage 1 is bypassed, as it always is here).
    pub const fn address(&self) -> Option<u64> {
        match (self.ipa, self.input_address) {
            (Some(ipa), _) => Some(ipa),
            (None, address) => address,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Collapsing fault floods
// ---------------------------------------------------------------------------------------------

/// One group of events: the same StreamID, type, direction and 4 KiB page, with how many
/// records were seen.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FaultGroup {
    /// The device.
    pub stream_id: u32,
    /// The event type.
    pub kind: EventType,
    /// A write (else a read, or no access).
    pub write: bool,
    /// The page (address & !0xfff), `None` for records without an address.
    pub page: Option<u64>,
    /// Records in the group.
    pub count: u32,
}

/// Collapses a run of events into groups, so that QEMU's flood (one record per 4 bytes of a
/// faulting DMA: 1024 for a page) becomes one audit record with a count. Holds up to `N` open
/// groups; when a new group does not fit, the oldest is handed back to be reported at once.
#[derive(Clone, Debug)]
pub struct FaultCollector<const N: usize> {
    groups: [Option<FaultGroup>; N],
    /// Insertion order of the open groups (oldest first).
    order: [usize; N],
    open: usize,
}

impl<const N: usize> Default for FaultCollector<N> {
    fn default() -> Self {
        Self::new()
    }
}

impl<const N: usize> FaultCollector<N> {
    /// An empty collector.
    pub const fn new() -> Self {
        FaultCollector {
            groups: [None; N],
            order: [0; N],
            open: 0,
        }
    }

    /// Adds one event; returns a group that had to be closed to make room, if any.
    pub fn add(&mut self, event: &Event) -> Option<FaultGroup> {
        let page = event.address().map(|a| a & !0xfff);
        for group in self.groups.iter_mut().flatten() {
            if group.stream_id == event.stream_id
                && group.kind == event.kind
                && group.write == event.write
                && group.page == page
            {
                group.count = group.count.saturating_add(1);
                return None;
            }
        }
        let new = FaultGroup {
            stream_id: event.stream_id,
            kind: event.kind,
            write: event.write,
            page,
            count: 1,
        };
        if N == 0 {
            return Some(new);
        }
        let mut evicted = None;
        if self.open == N {
            let oldest = self.order[0];
            evicted = self.groups[oldest].take();
            self.order.copy_within(1.., 0);
            self.open -= 1;
        }
        let slot = self
            .groups
            .iter()
            .position(Option::is_none)
            .unwrap_or_default();
        self.groups[slot] = Some(new);
        self.order[self.open] = slot;
        self.open += 1;
        evicted
    }

    /// Closes every open group, oldest first.
    pub fn finish(&mut self, mut report: impl FnMut(FaultGroup)) {
        for &slot in &self.order[..self.open] {
            if let Some(group) = self.groups[slot].take() {
                report(group);
            }
        }
        self.open = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::format;
    use alloc::vec::Vec;

    /// VTCR_EL2 as stagehand builds it: T0SZ 20, SL0 2, IRGN0/ORGN0 WB, SH0 inner, TG0 4 KiB,
    /// PS 44 bits (0b100), RES1 bit 31.
    const VTCR: u64 = 20 | 2 << 6 | 1 << 8 | 1 << 10 | 3 << 12 | 4 << 16 | 1 << 31;

    #[test]
    fn register_offsets_match_the_specification() {
        // register_structs! checks the layout at compile time; spot-check the offsets a
        // driver depends on against section 6.3 through the size of the block.
        assert_eq!(core::mem::size_of::<Smmuv3Registers>(), 0x100b0);
    }

    #[test]
    fn stage2_ste_words() {
        let ste = Ste::stage2(&Stage2Config {
            vmid: 1,
            vtcr: VTCR,
            root: 0x4_4123_4000,
            fwb: false,
        });
        // V | Config 0b110 in bits 3:1.
        assert_eq!(ste.0[0], 0xd);
        // SHCFG = incoming (0b01 at bits 45:44), no S2FWB.
        assert_eq!(ste.0[1], 1 << 44);
        // VMID 1; VTCR[18:0] = 0x43594 at bits 50:32; S2AA64 (51), S2AFFD (53), S2R (58).
        assert_eq!(VTCR & 0x7ffff, 0x4_3594);
        assert_eq!(ste.0[2], 1 | 0x4_3594 << 32 | 1 << 51 | 1 << 53 | 1 << 58);
        assert_eq!(ste.0[2], 0x042c_3594_0000_0001);
        assert_eq!(ste.0[3], 0x4_4123_4000);
        assert_eq!(&ste.0[4..], &[0; 4]);
        assert!(ste.is_valid());
    }

    #[test]
    fn stage2_ste_with_fwb_sets_bit_89() {
        let ste = Ste::stage2(&Stage2Config {
            vmid: 0x1234,
            vtcr: VTCR,
            root: 0x8000_0000,
            fwb: true,
        });
        assert_eq!(ste.0[1], 1 << 44 | 1 << 25);
        assert_eq!(ste.0[2] & 0xffff, 0x1234);
    }

    #[test]
    fn stage2_ste_masks_the_table_address_and_foreign_vtcr_bits() {
        let ste = Ste::stage2(&Stage2Config {
            vmid: 2,
            // RES1 bit 31 and anything above bit 18 never reach the STE.
            vtcr: VTCR | 1 << 19 | 1 << 40,
            root: 0xfff0_0000_0000_0000 | 0x000f_0000_0000_1000 | 0xf,
            fwb: false,
        });
        assert_eq!(ste.0[2] >> 32 & 0x7ffff, 0x4_3594);
        assert_eq!(
            ste.0[2] >> 51,
            1 | 1 << 2 | 1 << 7,
            "only S2AA64, S2AFFD, S2R above S2PS"
        );
        assert_eq!(ste.0[3], 0x000f_0000_0000_1000);
    }

    #[test]
    fn abort_and_invalid_entries() {
        assert_eq!(Ste::abort().0, [1, 0, 0, 0, 0, 0, 0, 0]);
        assert!(Ste::abort().is_valid());
        assert_eq!(Ste::INVALID.0, [0; 8]);
        assert!(!Ste::INVALID.is_valid());
        assert_eq!(*Ste::WRITE_ORDER.last().unwrap(), 0);
    }

    #[test]
    fn output_size_is_capped_by_the_smmu() {
        // PS 44 bits (0b100) against OAS 40 bits (0b010).
        assert_eq!(cap_output_size(VTCR, 0b010) >> 16 & 7, 0b010);
        assert_eq!(cap_output_size(VTCR, 0b101), VTCR);
        assert_eq!(cap_output_size(VTCR, 0b010) & !(7 << 16), VTCR & !(7 << 16));
    }

    #[test]
    fn commands() {
        assert_eq!(Command::cfgi_ste(0x10).0, [0x0000_0010_0000_0003, 1]);
        assert_eq!(Command::cfgi_all().0, [0x04, 31]);
        assert_eq!(
            Command::tlbi_s2_ipa(1, 0x4012_3456, true).0,
            [0x0000_0001_0000_002a, 0x4012_3001]
        );
        assert_eq!(
            Command::tlbi_s2_ipa(0xffff, 0xfff0_0000_0000_0000 | 0x1000, false).0,
            [0x0000_ffff_0000_002a, 0x1000]
        );
        assert_eq!(Command::tlbi_s12_vmall(3).0, [0x0000_0003_0000_0028, 0]);
        assert_eq!(Command::tlbi_nsnh_all().0, [0x30, 0]);
        // CS = SIG_NONE (bits 13:12 = 0), MSH = inner shareable (bits 23:22 = 0b11).
        assert_eq!(Command::sync().0, [0x00c0_0046, 0]);
        assert_eq!(Command::sync().opcode(), opcode::CMD_SYNC);
    }

    #[test]
    fn command_errors() {
        assert_eq!(CommandError::from_code(1), CommandError::Illegal);
        assert_eq!(CommandError::from_code(0), CommandError::None);
        assert_eq!(
            format!("{}", CommandError::from_code(9)),
            "command error 0x9"
        );
    }

    #[test]
    fn table_and_queue_bases() {
        assert_eq!(strtab_base(0x4500_4000), 1 << 62 | 0x4500_4000);
        assert_eq!(strtab_base(0x4500_403f), 1 << 62 | 0x4500_4000);
        assert_eq!(strtab_base_cfg_linear(8), 8);
        assert_eq!(queue_base(0x4510_0000, 15), 1 << 62 | 0x4510_0000 | 15);
        assert_eq!(queue_base(0x4510_001f, 8), 1 << 62 | 0x4510_0000 | 8);
    }

    #[test]
    fn linear_table_sizes() {
        // 00:02.0 is StreamID 0x10: five bits, raised to the minimum.
        assert_eq!(linear_table_log2(0x10, 8, 16), Some(8));
        assert_eq!(linear_table_log2(0x10, 0, 16), Some(5));
        assert_eq!(linear_table_log2(0x1ff, 8, 16), Some(9));
        assert_eq!(linear_table_log2(0xffff, 8, 16), Some(16));
        assert_eq!(linear_table_log2(0x1_0000, 8, 16), None);
        // A minimum above SIDSIZE is cut to SIDSIZE.
        assert_eq!(linear_table_log2(0, 8, 4), Some(4));
    }

    #[test]
    fn queue_index_arithmetic() {
        let q = QueueIndex::new(3); // 8 entries, wrap bit 3
        assert_eq!(q.entries(), 8);
        assert!(q.is_empty(0, 0));
        assert_eq!(q.next(6), 7);
        assert_eq!(q.next(7), 8, "past the last slot: slot 0, wrap set");
        assert_eq!(q.next(15), 0, "and back");
        assert_eq!(q.slot(9), 1);
        assert!(q.wrap(9));
        assert!(q.is_full(8, 0));
        assert!(!q.is_empty(8, 0));
        assert_eq!(q.used(8, 0), 8);
        assert_eq!(q.used(2, 14), 4, "prod wrapped back, cons not yet");
        assert_eq!(q.free(2, 14), 4);
        assert!(
            q.is_empty(5 | 1 << 31, 5),
            "the overflow flag is not part of the position"
        );
        assert_eq!(q.position(0x7f00_0009), 9);
        // Walk round twice: every step keeps used() consistent.
        let mut prod = 0;
        for step in 1..=16 {
            prod = q.next(prod);
            assert_eq!(q.used(prod, 0), step % 16);
        }
    }

    #[test]
    fn overflow_flags() {
        assert!(!event_queue_overflowed(5, 5));
        assert!(event_queue_overflowed(5 | 1 << 31, 5));
        assert!(!event_queue_overflowed(5 | 1 << 31, 7 | 1 << 31));
    }

    #[test]
    fn global_errors() {
        assert_eq!(active_global_errors(0b101, 0b001), 0b100);
        assert_eq!(
            format!("{}", GlobalErrors(0b101)),
            "CMDQ_ERR|EVENTQ_ABT_ERR"
        );
        assert_eq!(format!("{}", GlobalErrors(1 << 12)), "bit12");
        assert_eq!(format!("{}", GlobalErrors(0)), "none");
    }

    /// A stage-2 translation fault record as the specification lays it out (7.3.12): type 0x10,
    /// StreamID 0x10, a read (RnW = 1) at stage 2 (S2 = 1), input address and IPA.
    fn translation_fault(sid: u32, address: u64, read: bool) -> [u64; 4] {
        [
            0x10 | (sid as u64) << 32,
            1 << 39 | (read as u64) << 35,
            address,
            address & !0x7,
        ]
    }

    #[test]
    fn decodes_a_stage2_translation_fault() {
        let event = Event::decode(translation_fault(0x10, 0x5010_0ffc, true));
        assert_eq!(event.kind, EventType::F_TRANSLATION);
        assert_eq!(event.kind.name(), Some("translation"));
        assert_eq!(event.stream_id, 0x10);
        assert_eq!(event.substream_id, None);
        assert!(!event.write);
        assert!(event.stage2);
        assert_eq!(event.input_address, Some(0x5010_0ffc));
        assert_eq!(event.ipa, Some(0x5010_0000), "IPA bits 11:0 masked");
        assert_eq!(event.address(), Some(0x5010_0000));
    }

    #[test]
    fn decodes_writes_permissions_access_and_unknown_types() {
        let mut record = translation_fault(0x18, 0x4020_0000, false);
        record[0] = (record[0] & !0xff) | 0x13;
        let event = Event::decode(record);
        assert_eq!(event.kind, EventType::F_PERMISSION);
        assert!(event.write);
        record[0] = (record[0] & !0xff) | 0x12;
        assert_eq!(Event::decode(record).kind.name(), Some("access"));
        // SubstreamID present.
        let with_ssid = Event::decode([0x10 | 1 << 11 | 0x5 << 12 | 1 << 32, 1 << 35, 0, 0]);
        assert_eq!(with_ssid.substream_id, Some(5));
        assert!(!with_ssid.stage2, "S2 clear: a stage-1 fault, no IPA");
        assert_eq!(with_ssid.ipa, None);
        assert_eq!(with_ssid.address(), Some(0));
        let unknown = Event::decode([0x7e | 3 << 32, u64::MAX, 1, 2]);
        assert_eq!(unknown.kind, EventType(0x7e));
        assert_eq!(unknown.kind.name(), None);
        assert_eq!(unknown.input_address, None);
        assert!(!unknown.write);
    }

    #[test]
    fn decodes_a_bad_ste_without_an_address() {
        let event = Event::decode([0x04 | 0x20 << 32, 0, 0xdead, 0xbeef]);
        assert_eq!(event.kind, EventType::C_BAD_STE);
        assert_eq!(event.kind.name(), Some("bad-ste"));
        assert_eq!(event.stream_id, 0x20);
        assert_eq!(event.address(), None);
        assert!(!event.write && !event.stage2);
    }

    #[test]
    fn tlb_invalidation_is_per_page_up_to_16_pages_then_vmid_wide_with_one_sync() {
        use stagehand_abi::audit::smmu_command;
        const VMID: u16 = 0x100;
        const IPA: u64 = 0x4100_0000;
        let syncs = |commands: &[Command]| {
            commands
                .iter()
                .filter(|c| c.opcode() == opcode::CMD_SYNC)
                .count()
        };
        // 4 KiB, 64 KiB (16 pages, the last per-page size), a partial page, 1 MiB, 16 MiB.
        for (size, per_page) in [
            (4096, Some(1)),
            (16 * 4096, Some(16)),
            (100, Some(1)),
            (17 * 4096, None),
            (1 << 20, None),
            (16 << 20, None),
        ] {
            let commands = tlb_invalidation(VMID, IPA, size);
            assert_eq!(syncs(&commands), 1, "{size:#x}: one CMD_SYNC per call");
            assert_eq!(
                commands.last(),
                Some(&Command::sync()),
                "{size:#x}: CMD_SYNC last"
            );
            let body = &commands[..commands.len() - 1];
            match per_page {
                Some(pages) => {
                    let expected: Vec<Command> = (0..pages)
                        .map(|i| Command::tlbi_s2_ipa(VMID, IPA + i * 4096, true))
                        .collect();
                    assert_eq!(body, expected.as_slice(), "{size:#x}");
                    assert_eq!(
                        command_kinds(&commands),
                        smmu_command::TLBI_S2_IPA | smmu_command::SYNC
                    );
                }
                None => {
                    assert_eq!(body, [Command::tlbi_s12_vmall(VMID)], "{size:#x}");
                    assert_eq!(
                        command_kinds(&commands),
                        smmu_command::TLBI_S12_VMALL | smmu_command::SYNC
                    );
                }
            }
        }
        // What the DMA benchmark rows report per DMA_UNMAP of a strict device.
        assert_eq!(tlb_invalidation(VMID, IPA, 4 << 10).len(), 2);
        assert_eq!(tlb_invalidation(VMID, IPA, 64 << 10).len(), 17);
        assert_eq!(tlb_invalidation(VMID, IPA, 1 << 20).len(), 2);
        assert_eq!(
            command_kinds(&[Command::cfgi_ste(3), Command::tlbi_nsnh_all()]),
            smmu_command::CFGI_STE | smmu_command::OTHER
        );
    }

    #[test]
    fn a_4k_flood_collapses_to_one_group() {
        let mut collector = FaultCollector::<4>::new();
        for offset in (0..4096).step_by(4) {
            let event = Event::decode(translation_fault(0x10, 0x5010_0000 + offset, true));
            assert_eq!(collector.add(&event), None);
        }
        let mut groups = Vec::new();
        collector.finish(|g| groups.push(g));
        assert_eq!(
            groups,
            [FaultGroup {
                stream_id: 0x10,
                kind: EventType::F_TRANSLATION,
                write: false,
                page: Some(0x5010_0000),
                count: 1024,
            }]
        );
        let mut again = Vec::new();
        collector.finish(|g| again.push(g));
        assert!(again.is_empty(), "finish empties the collector");
    }

    #[test]
    fn groups_split_by_page_device_direction_and_type_and_the_oldest_is_evicted() {
        let mut collector = FaultCollector::<2>::new();
        let a = Event::decode(translation_fault(0x10, 0x5000_0000, true));
        let b = Event::decode(translation_fault(0x10, 0x5000_1000, true));
        let c = Event::decode(translation_fault(0x18, 0x5000_1000, true));
        let d = Event::decode(translation_fault(0x18, 0x5000_1000, false));
        assert_eq!(collector.add(&a), None);
        assert_eq!(collector.add(&b), None);
        assert_eq!(collector.add(&b), None);
        let evicted = collector.add(&c).expect("full: the oldest group goes");
        assert_eq!((evicted.page, evicted.count), (Some(0x5000_0000), 1));
        let evicted = collector.add(&d).expect("full again");
        assert_eq!((evicted.page, evicted.count), (Some(0x5000_1000), 2));
        let mut rest = Vec::new();
        collector.finish(|g| rest.push((g.stream_id, g.write, g.count)));
        assert_eq!(rest, [(0x18, false, 1), (0x18, true, 1)]);
    }
}
