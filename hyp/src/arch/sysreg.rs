//! The system registers `aarch64-cpu` does not declare, or declares without the fields the
//! hypervisor writes, declared here the crate's way (tock-registers bitfields behind the
//! `Readable`/`Writeable` traits), so that every access reads as `REGISTER.write(FIELD::Value)`
//! whichever crate declares the register. Each declaration says why the crate cannot serve;
//! docs/design.md keeps the same list. Also: the RES1 bits of the crate's registers that it
//! gives no field for.

use aarch64_cpu::registers::{SCTLR_EL1, SCTLR_EL2, TCR_EL2};
use tock_registers::fields::FieldValue;
use tock_registers::register_bitfields;

/// Declares a system register accessed by its name or `S<op0>_<op1>_C<n>_C<m>_<op2>`
/// encoding, as aarch64-cpu does: the constant `$name` (a unit `$type`) implements `Readable`
/// and/or `Writeable` over `$fields` (a bitfields module's `Register`, or `()` for a register
/// written whole).
macro_rules! system_register {
    (
        $(#[$doc:meta])*
        $name:ident: $type:ident<$fields:ty>, $encoding:literal, $($access:ident),+
    ) => {
        $(#[$doc])*
        pub struct $type;
        $(#[$doc])*
        pub const $name: $type = $type;
        $(system_register!(@$access $type, $fields, $encoding);)+
    };
    (@read $type:ident, $fields:ty, $encoding:literal) => {
        impl tock_registers::interfaces::Readable for $type {
            type T = u64;
            type R = $fields;

            #[inline]
            fn get(&self) -> u64 {
                let value: u64;
                // SAFETY: the registers read here are ID, cache-type and PMU-control registers:
                // reading them has no side effects.
                unsafe {
                    core::arch::asm!(
                        concat!("mrs {}, ", $encoding),
                        out(reg) value,
                        options(nomem, nostack, preserves_flags)
                    )
                };
                value
            }
        }
    };
    (@write $type:ident, $fields:ty, $encoding:literal) => {
        impl tock_registers::interfaces::Writeable for $type {
            type T = u64;
            type R = $fields;

            #[inline]
            fn set(&self, value: u64) {
                // SAFETY: the registers written here control what lower exception levels trap
                // or see (FP/SVE/SME traps and vector lengths, AArch32 traps, HCRX, the guest's
                // MIDR); none changes the hypervisor's own translation or memory.
                unsafe {
                    core::arch::asm!(
                        concat!("msr ", $encoding, ", {}"),
                        in(reg) value,
                        options(nostack, preserves_flags)
                    )
                };
            }
        }
    };
}

register_bitfields! {u64,
    /// CTR_EL0, the cache type.
    pub CTR_EL0 [
        /// Log2 of the words in the smallest data-cache line.
        DminLine OFFSET(16) NUMBITS(4) []
    ],
    /// ID_AA64ISAR2_EL1: the fields the hypervisor tests itself (the rest is decoded by
    /// `hyp_core::traps`).
    pub ID_AA64ISAR2_EL1 [
        /// QARMA3 address authentication.
        APA3 OFFSET(12) NUMBITS(4) [],
        /// QARMA3 generic authentication.
        GPA3 OFFSET(8) NUMBITS(4) []
    ],
    /// PMCR_EL0: the one field read.
    pub PMCR_EL0 [
        /// Event counters implemented.
        N OFFSET(11) NUMBITS(5) []
    ],
    /// CPTR_EL2 without E2H (the hypervisor never sets E2H).
    pub CPTR_EL2 [
        /// Traps CPACR_EL1 accesses.
        TCPAC OFFSET(31) NUMBITS(1) [],
        /// Traps Activity Monitor accesses.
        TAM OFFSET(30) NUMBITS(1) [],
        /// Traps trace register accesses.
        TTA OFFSET(20) NUMBITS(1) [],
        /// Traps SME; RES1 without FEAT_SME.
        TSM OFFSET(12) NUMBITS(1) [],
        /// Traps FP and Advanced SIMD.
        TFP OFFSET(10) NUMBITS(1) [],
        /// Traps SVE; RES1 without FEAT_SVE.
        TZ OFFSET(8) NUMBITS(1) []
    ],
    /// ZCR_EL2 (FEAT_SVE).
    pub ZCR_EL2 [
        /// Vector length, in 128-bit units, minus one (the CPU lowers it to one it has).
        LEN OFFSET(0) NUMBITS(4) [
            Largest = 0xf
        ]
    ],
    /// SMCR_EL2 (FEAT_SME).
    pub SMCR_EL2 [
        /// Streaming vector length, in 128-bit units, minus one (the CPU lowers it to one it
        /// has).
        LEN OFFSET(0) NUMBITS(4) [
            Largest = 0xf
        ]
    ]
}

system_register! {
    /// CTR_EL0: not declared by aarch64-cpu.
    CTR_EL0: CtrEl0<CTR_EL0::Register>, "ctr_el0", read
}
system_register! {
    /// ID_AA64ISAR2_EL1: not declared by aarch64-cpu.
    ID_AA64ISAR2_EL1: IdAa64Isar2El1<ID_AA64ISAR2_EL1::Register>, "id_aa64isar2_el1", read
}
system_register! {
    /// ID_AA64MMFR3_EL1 (reads 0 on CPUs older than the register): not declared by aarch64-cpu,
    /// and named by encoding because older assemblers do not know it.
    ID_AA64MMFR3_EL1: IdAa64Mmfr3El1<()>, "s3_0_c0_c7_3", read
}
system_register! {
    /// PMCR_EL0: not declared by aarch64-cpu.
    PMCR_EL0: PmcrEl0<PMCR_EL0::Register>, "pmcr_el0", read
}
system_register! {
    /// CPTR_EL2: aarch64-cpu declares only its TAM field, not TZ, TSM, TFP or the RES1 bits.
    CPTR_EL2: CptrEl2<CPTR_EL2::Register>, "cptr_el2", write
}
system_register! {
    /// ZCR_EL2 (FEAT_SVE): not declared by aarch64-cpu; by encoding, as the assembler wants the
    /// SVE feature for its name.
    ZCR_EL2: ZcrEl2<ZCR_EL2::Register>, "s3_4_c1_c2_0", write
}
system_register! {
    /// SMCR_EL2 (FEAT_SME): not declared by aarch64-cpu; by encoding, as for ZCR_EL2.
    SMCR_EL2: SmcrEl2<SMCR_EL2::Register>, "s3_4_c1_c2_6", write
}
system_register! {
    /// HSTR_EL2: not declared by aarch64-cpu.
    HSTR_EL2: HstrEl2<()>, "hstr_el2", write
}
system_register! {
    /// HCRX_EL2 (FEAT_HCX): not declared by aarch64-cpu; by encoding, as the assembler wants the
    /// HCX feature for its name.
    HCRX_EL2: HcrxEl2<()>, "s3_4_c1_c2_2", write
}
system_register! {
    /// VPIDR_EL2: not declared by aarch64-cpu.
    VPIDR_EL2: VpidrEl2<()>, "vpidr_el2", write
}

/// CPTR_EL2 (without E2H) bits 13, 9 and 7:0: RES1 in every version of the architecture.
pub const CPTR_EL2_RES1: FieldValue<u64, CPTR_EL2::Register> =
    FieldValue::<u64, CPTR_EL2::Register>::new(0x22ff, 0, 0x22ff);

/// SCTLR_EL1 bits 29, 28, 23, 22, 20 and 11: RES1 in Armv8.0 (later LSMAOE, nTLSMD, SPAN, EIS,
/// TSCXT, EOS, which aarch64-cpu does not name), set as a reset Armv8.0 CPU has them.
pub const SCTLR_EL1_RES1: FieldValue<u64, SCTLR_EL1::Register> =
    FieldValue::<u64, SCTLR_EL1::Register>::new(0x30d0_0800, 0, 0x30d0_0800);

/// SCTLR_EL2 (without E2H) bits 29, 28, 23, 22, 18, 16, 11, 5 and 4: RES1 (22 and 11 became
/// EIS and EOS, set as before them).
pub const SCTLR_EL2_RES1: FieldValue<u64, SCTLR_EL2::Register> =
    FieldValue::<u64, SCTLR_EL2::Register>::new(0x30c5_0830, 0, 0x30c5_0830);

/// TCR_EL2 (without E2H) bits 31 and 23: RES1, not named by aarch64-cpu.
pub const TCR_EL2_RES1: FieldValue<u64, TCR_EL2::Register> =
    FieldValue::<u64, TCR_EL2::Register>::new(0x8080_0000, 0, 0x8080_0000);
