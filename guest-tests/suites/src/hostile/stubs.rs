//! Generated code: for every system-register encoding with op0 2 or 3 an `mrs x0, <enc>; ret`
//! and an `msr <enc>, x0; ret` stub, then a few fixed stubs (SVC, semihosting HLT, an A32
//! load). The table is built at compile time and placed in an executable section of the image;
//! EL0 runs it through a user alias ([`user_base`]).

use guest_rt::mmu::{self, MemoryType};
use spin::Once;

/// Encodings swept: op0 2-3, op1 0-7, CRn 0-15, CRm 0-15, op2 0-7.
pub const ENCODINGS: usize = 2 * 8 * 16 * 16 * 8;

const MRS_X0: u32 = 0xd530_0000;
const MSR_X0: u32 = 0xd510_0000;
const RET: u32 = 0xd65f_03c0;
const SVC_0: u32 = 0xd400_0001;
const HLT_SEMIHOSTING: u32 = 0xd45e_0000;
/// A32 `ldr r0, [r1]` and `svc #0`.
const A32_LDR_R0_R1: u32 = 0xe591_0000;
const A32_SVC_0: u32 = 0xef00_0000;

/// Word index of the fixed stubs after the table.
const FIXED: usize = ENCODINGS * 4;
/// `svc #0`: where EL0 stubs return to (x30).
pub const SVC: usize = FIXED * 4;
/// `hlt #0xf000; ret` (EL1 semihosting call).
pub const HLT_RET: usize = SVC + 4;
/// `hlt #0xf000; svc #0` (EL0 semihosting call).
pub const HLT_SVC: usize = HLT_RET + 8;
/// A32 `ldr r0, [r1]; svc #0`, on a page of its own.
pub const A32_LOAD: usize = (FIXED * 4).next_multiple_of(4096) + 4096;
const WORDS: usize = A32_LOAD / 4 + 1024;

/// Bits 19:5 of an MRS/MSR for encoding `index` (op0 = 2 + bit 14 of the index).
pub const fn encoding_bits(index: usize) -> u32 {
    let index = index as u32;
    let o0 = (index >> 14) & 1;
    let op1 = (index >> 11) & 7;
    let crn = (index >> 7) & 15;
    let crm = (index >> 3) & 15;
    let op2 = index & 7;
    o0 << 19 | op1 << 16 | crn << 12 | crm << 8 | op2 << 5
}

/// The register name the assembler accepts for encoding `index`, `S<op0>_<op1>_C<n>_C<m>_<op2>`.
pub fn name(index: usize) -> alloc::string::String {
    alloc::format!(
        "S{}_{}_C{}_C{}_{}",
        2 + (index >> 14 & 1),
        index >> 11 & 7,
        index >> 7 & 15,
        index >> 3 & 15,
        index & 7
    )
}

/// The index of encoding `S<op0>_<op1>_C<n>_C<m>_<op2>`.
pub const fn index_of(op0: usize, op1: usize, crn: usize, crm: usize, op2: usize) -> usize {
    (op0 - 2) << 14 | op1 << 11 | crn << 7 | crm << 3 | op2
}

const fn generate() -> [u32; WORDS] {
    let mut words = [0u32; WORDS];
    let mut i = 0;
    while i < ENCODINGS {
        let bits = encoding_bits(i);
        words[4 * i] = MRS_X0 | bits;
        words[4 * i + 1] = RET;
        words[4 * i + 2] = MSR_X0 | bits;
        words[4 * i + 3] = RET;
        i += 1;
    }
    words[SVC / 4] = SVC_0;
    words[HLT_RET / 4] = HLT_SEMIHOSTING;
    words[HLT_RET / 4 + 1] = RET;
    words[HLT_SVC / 4] = HLT_SEMIHOSTING;
    words[HLT_SVC / 4 + 1] = SVC_0;
    words[A32_LOAD / 4] = A32_LDR_R0_R1;
    words[A32_LOAD / 4 + 1] = A32_SVC_0;
    words
}

#[repr(C, align(4096))]
struct Table([u32; WORDS]);

#[unsafe(link_section = ".text.hostile_stubs")]
static TABLE: Table = Table(generate());

/// EL1 address of the table.
pub fn base() -> usize {
    &TABLE as *const Table as usize
}

/// EL1 address of the MRS stub of encoding `index` (the MSR stub is 8 bytes further).
pub fn mrs(index: usize) -> usize {
    base() + 16 * index
}

/// EL1 address of the MSR stub of encoding `index`.
pub fn msr(index: usize) -> usize {
    mrs(index) + 8
}

static USER: Once<usize> = Once::new();

/// EL0 address of the table (an alias EL0 may execute), mapped on first use.
pub fn user_base() -> usize {
    *USER.call_once(|| {
        mmu::map_user_alias(
            base(),
            core::mem::size_of::<Table>(),
            MemoryType::NormalWriteBack,
        )
        .expect("mapping the stub table for EL0")
    })
}

/// A user stack (one page, EL0 read-write), mapped on first use; returns its top.
pub fn user_stack() -> usize {
    static STACK: Once<usize> = Once::new();
    *STACK.call_once(|| {
        let page = crate::edu::page();
        let va = mmu::map_user_alias(page.as_ptr() as usize, 4096, MemoryType::NormalWriteBack)
            .expect("mapping a user stack");
        va + 4096
    })
}

/// Runs the stub at table offset `offset` at EL0 with x0 = `x0`, x1 = `x1`, returning through
/// the SVC stub.
pub fn run_at_el0(offset: usize, x0: u64, x1: u64) -> guest_rt::el0::Exit {
    let user = user_base();
    // SAFETY: the table is generated code, mapped for EL0; it ends in an SVC or faults.
    unsafe {
        guest_rt::el0::run(
            user + offset,
            user_stack(),
            guest_rt::el0::Entry::aarch64(x0, x1, (user + SVC) as u64),
        )
    }
}
