//! This CPU, as the portable core sees it: [`hyp_core::maintenance::Arch`] (one instruction per
//! call, one per line for cache ranges, in order; the portable engine decides the sequence and
//! host tests pin it), the guest's memory and translation regime
//! ([`hyp_core::hypercall::platform::GuestMemory`]) and the firmware's PSCI power calls
//! ([`hyp_core::hypercall::platform::Firmware`]).

use aarch64_cpu::registers::{Readable, CNTFRQ_EL0, CNTPCT_EL0, SCTLR_EL1};
use core::arch::asm;
use hyp_core::address::{GuestVa, HypVa, Pa};
use hyp_core::hypercall::platform::{Firmware, FirmwareRefused, GuestMemory, TranslationFailed};
use hyp_core::maintenance::{Arch, CacheOp, TableWrite};

/// This CPU.
pub struct Cpu {
    line: u64,
}

impl Cpu {
    /// The CPU, with its data-cache line size read once.
    pub fn new() -> Self {
        Self::with_line(super::dcache_line_size())
    }

    /// The CPU, whose smallest data-cache line (CTR_EL0.DminLine) the caller read before.
    pub fn with_line(line: u64) -> Self {
        Self { line }
    }
}

/// `dc <op>` on every line of `[va, va + len)`: eight lines per iteration while at least eight
/// remain (2.25 instructions a line), then one at a time (4 a line). Written in assembly so that
/// the loop is exactly this, whatever the compiler would lay out.
macro_rules! dc_loop {
    ($op:literal, $va:expr, $len:expr, $line:expr) => {{
        let (va, len, line): (u64, u64, u64) = ($va, $len, $line);
        let end = va + len;
        let bulk_end = va + (len / (8 * line)) * (8 * line);
        // SAFETY: the engine passes a range of the hypervisor's alias of guest RAM, mapped while
        // the attribute lock is held; a cache maintenance instruction does not change memory
        // contents any observer relies on except as the engine intends (IVAC only where the
        // engine decided to discard).
        unsafe {
            core::arch::asm!(
                "cmp {va}, {bulk_end}",
                "b.hs 2f",
                "1:",
                concat!("dc ", $op, ", {va}"),
                "add {next}, {va}, {line}",
                concat!("dc ", $op, ", {next}"),
                "add {next}, {next}, {line}",
                concat!("dc ", $op, ", {next}"),
                "add {next}, {next}, {line}",
                concat!("dc ", $op, ", {next}"),
                "add {next}, {next}, {line}",
                concat!("dc ", $op, ", {next}"),
                "add {next}, {next}, {line}",
                concat!("dc ", $op, ", {next}"),
                "add {next}, {next}, {line}",
                concat!("dc ", $op, ", {next}"),
                "add {next}, {next}, {line}",
                concat!("dc ", $op, ", {next}"),
                "add {va}, {va}, {line8}",
                "cmp {va}, {bulk_end}",
                "b.lo 1b",
                "2:",
                "cmp {va}, {end}",
                "b.hs 4f",
                "3:",
                concat!("dc ", $op, ", {va}"),
                "add {va}, {va}, {line}",
                "cmp {va}, {end}",
                "b.lo 3b",
                "4:",
                va = inout(reg) va => _,
                next = out(reg) _,
                line = in(reg) line,
                line8 = in(reg) 8 * line,
                bulk_end = in(reg) bulk_end,
                end = in(reg) end,
                options(nostack),
            );
        }
    }};
}

impl Arch for Cpu {
    fn line_size(&self) -> u64 {
        self.line
    }

    #[inline]
    fn dcache_range(&mut self, op: CacheOp, va: u64, len: u64) {
        match op {
            CacheOp::Clean => dc_loop!("cvac", va, len, self.line),
            CacheOp::Invalidate => dc_loop!("ivac", va, len, self.line),
            CacheOp::CleanInvalidate => dc_loop!("civac", va, len, self.line),
        }
    }

    fn dsb_ish(&mut self) {
        super::dsb_ish();
    }

    fn dsb_ishst(&mut self) {
        // SAFETY: a barrier.
        unsafe { asm!("dsb ishst", options(nostack, preserves_flags)) };
    }

    fn dsb_sy(&mut self) {
        super::dsb_sy();
    }

    fn isb(&mut self) {
        super::isb();
    }

    fn tlbi_ipas2e1is(&mut self, ipa: u64) {
        // SAFETY: TLB invalidation only forces later walks. The operand is IPA[51:12].
        unsafe { asm!("tlbi ipas2e1is, {}", in(reg) ipa >> 12, options(nostack, preserves_flags)) };
    }

    fn tlbi_vmalle1is(&mut self) {
        // SAFETY: as above; applies to the VMID in VTTBR_EL2, the guest's.
        unsafe { asm!("tlbi vmalle1is", options(nostack, preserves_flags)) };
    }

    fn tlbi_vmalls12e1is(&mut self) {
        // SAFETY: as above.
        unsafe { asm!("tlbi vmalls12e1is", options(nostack, preserves_flags)) };
    }

    fn tlbi_vae2is(&mut self, va: u64) {
        // SAFETY: as above; the operand is VA[55:12].
        unsafe {
            asm!("tlbi vae2is, {}", in(reg) (va >> 12) & 0xfff_ffff_ffff, options(nostack, preserves_flags))
        };
    }

    fn tlbi_alle2is(&mut self) {
        // SAFETY: as above.
        unsafe { asm!("tlbi alle2is", options(nostack, preserves_flags)) };
    }

    fn device_tlbi(&mut self, _ipa: u64, _size: u64) {
        // The CPU has no device TLB. The call handlers edit stage 2 through
        // `hyp_core::hypercall::platform::WithDeviceTlb`, which adds the IOMMU's invalidation.
    }

    fn table_write(&mut self, _write: TableWrite) {}
}

impl GuestMemory for Cpu {
    fn read_bytes(&mut self, at: HypVa, _pa: Pa, into: &mut [u8]) {
        // SAFETY: `at` is the alias of `into.len()` bytes of guest RAM, which stays mapped while
        // the caller holds the attribute lock, as it does for the duration of the call; a byte copy has no alignment requirement. The guest may
        // change the bytes concurrently: they are parsed afterwards, never trusted as a value.
        unsafe {
            core::ptr::copy_nonoverlapping(at.get() as *const u8, into.as_mut_ptr(), into.len())
        };
    }

    fn write_bytes(&mut self, at: HypVa, _pa: Pa, bytes: &[u8]) {
        // SAFETY: as in `read_bytes`; guest RAM is never hypervisor memory.
        unsafe { core::ptr::copy_nonoverlapping(bytes.as_ptr(), at.get() as *mut u8, bytes.len()) };
    }

    fn stage1_enabled(&self) -> bool {
        SCTLR_EL1.is_set(SCTLR_EL1::M)
    }

    fn translate(
        &mut self,
        va: GuestVa,
        both_stages: bool,
        write: bool,
    ) -> Result<u64, TranslationFailed> {
        super::translate_guest_va(va.get(), both_stages, write).map_err(|_| TranslationFailed)
    }
}

impl Firmware for Cpu {
    fn cpu_on(&mut self, mpidr: u64, vcpu: usize) -> Result<(), FirmwareRefused> {
        let start = super::entry::secondary_entry as *const () as u64;
        // A CPU that has just turned itself off may not be off in the firmware yet (the guest
        // can see AFFINITY_INFO = OFF first): keep asking for up to 100 ms of counter time.
        let deadline = CNTPCT_EL0.get() + CNTFRQ_EL0.get() / 10;
        loop {
            match smccc::psci::cpu_on::<smccc::Smc>(mpidr, start, vcpu as u64) {
                Ok(()) => return Ok(()),
                Err(smccc::psci::Error::AlreadyOn) if CNTPCT_EL0.get() < deadline => {
                    core::hint::spin_loop()
                }
                Err(error) => {
                    log::warn!("firmware CPU_ON of vCPU {vcpu} failed: {error:?}");
                    return Err(FirmwareRefused);
                }
            }
        }
    }

    fn cpu_off(&mut self) {
        // Returns only on failure, which the caller reports to the guest.
        if let Err(error) = smccc::psci::cpu_off::<smccc::Smc>() {
            log::warn!("firmware CPU_OFF failed: {error:?}");
        }
    }
}
