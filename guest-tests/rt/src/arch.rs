//! Small wrappers around the aarch64 instructions the runtime needs: system registers,
//! barriers, TLB and cache maintenance. Each wrapper holds exactly one instruction sequence.

use core::arch::asm;

/// Reads a system register by name, e.g. `read_sysreg!(esr_el1)`.
#[macro_export]
macro_rules! read_sysreg {
    ($name:ident) => {{
        let value: u64;
        // SAFETY: reading a system register has no side effects on memory.
        unsafe {
            core::arch::asm!(concat!("mrs {}, ", stringify!($name)), out(reg) value,
                options(nomem, nostack, preserves_flags));
        }
        value
    }};
}

/// Writes a system register by name, e.g. `write_sysreg!(vbar_el1, value)`.
///
/// Only for registers whose write cannot break memory safety on its own (timers, GIC CPU
/// interface, thread ID); translation registers go through [`crate::mmu`].
#[macro_export]
macro_rules! write_sysreg {
    ($name:ident, $value:expr) => {{
        let value: u64 = $value;
        // SAFETY: callers use this only for registers that do not change the translation
        // regime or the memory model (see the macro's documentation).
        unsafe {
            core::arch::asm!(concat!("msr ", stringify!($name), ", {}"), in(reg) value,
                options(nostack, preserves_flags));
        }
    }};
}

/// The index of the CPU running this code (set in TPIDR_EL1 at entry: 0 for the boot CPU,
/// the PSCI context ID for secondaries).
pub fn cpu_index() -> usize {
    read_sysreg!(tpidr_el1) as usize
}

/// This CPU's MPIDR_EL1 affinity fields (Aff3..Aff0, without the U and MT bits).
pub fn mpidr() -> u64 {
    read_sysreg!(mpidr_el1) & 0xff_00ff_ffff
}

/// Full-system data synchronization barrier.
pub fn dsb_sy() {
    // SAFETY: a barrier only orders memory accesses.
    unsafe { asm!("dsb sy", options(nostack, preserves_flags)) }
}

/// Inner-shareable data synchronization barrier.
pub fn dsb_ish() {
    // SAFETY: a barrier only orders memory accesses.
    unsafe { asm!("dsb ish", options(nostack, preserves_flags)) }
}

/// Inner-shareable barrier that orders earlier stores (page-table writes) before later
/// accesses and TLB maintenance.
pub fn dsb_ishst() {
    // SAFETY: a barrier only orders memory accesses.
    unsafe { asm!("dsb ishst", options(nostack, preserves_flags)) }
}

/// Instruction synchronization barrier.
pub fn isb() {
    // SAFETY: a context synchronization event has no effect on memory.
    unsafe { asm!("isb", options(nostack, preserves_flags)) }
}

/// Invalidates, on every CPU of the inner-shareable domain, the EL1 stage-1 TLB entries for
/// `va` at any ASID and any level.
pub fn tlbi_vaae1is(va: usize) {
    // SAFETY: TLB invalidation only drops cached translations.
    unsafe {
        asm!("tlbi vaae1is, {}", in(reg) (va >> 12) as u64 & 0xfff_ffff_ffff, options(nostack, preserves_flags))
    }
}

/// Invalidates every EL1 stage-1 TLB entry of this VM on every CPU of the inner-shareable
/// domain.
pub fn tlbi_vmalle1is() {
    // SAFETY: TLB invalidation only drops cached translations.
    unsafe { asm!("tlbi vmalle1is", options(nostack, preserves_flags)) }
}

/// Cleans and invalidates the data cache line holding `addr` to the point of coherency.
pub fn dc_civac(addr: usize) {
    // SAFETY: clean+invalidate never loses data and needs only a mapped or MMU-off address,
    // which every caller passes (addresses of statics).
    unsafe { asm!("dc civac, {}", in(reg) addr, options(nostack, preserves_flags)) }
}

/// The smallest D-cache line size in bytes (CTR_EL0.DminLine).
pub fn dcache_line_size() -> usize {
    4 << ((read_sysreg!(ctr_el0) >> 16) & 0xf)
}

/// The generic timer's virtual count (CNTVCT_EL0).
pub fn counter() -> u64 {
    read_sysreg!(cntvct_el0)
}

/// The generic timer's frequency in Hz (CNTFRQ_EL0).
pub fn counter_frequency() -> u64 {
    read_sysreg!(cntfrq_el0)
}

/// Waits for an interrupt (or returns at once if one is pending).
pub fn wfi() {
    // SAFETY: waiting has no effect on memory.
    unsafe { asm!("wfi", options(nomem, nostack, preserves_flags)) }
}

/// Unmasks IRQs at EL1 (clears PSTATE.I).
pub fn enable_irqs() {
    // SAFETY: the vectors handle IRQs; unmasking only allows them to be taken.
    unsafe { asm!("msr daifclr, #2", options(nomem, nostack)) }
}

/// Masks IRQs at EL1 (sets PSTATE.I).
pub fn disable_irqs() {
    // SAFETY: masking interrupts has no effect on memory.
    unsafe { asm!("msr daifset, #2", options(nomem, nostack)) }
}
