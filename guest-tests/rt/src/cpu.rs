//! Secondary CPUs: start one with PSCI CPU_ON on a function chosen by the boot CPU; it runs the
//! function on its own stack with the boot CPU's translation tables, records that it finished,
//! and turns itself off with CPU_OFF.

use core::sync::atomic::{AtomicU8, AtomicUsize, Ordering};

use crate::boot::{secondary_entry_address, MAX_CPUS};
use crate::psci;

/// What the runtime knows of a secondary CPU.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum CpuState {
    /// Never started, or turned off after finishing and restarted never since.
    Off = 0,
    /// CPU_ON succeeded; the CPU has not reached its function yet.
    Starting = 1,
    /// Running its function.
    Running = 2,
    /// Its function returned; it is calling (or has called) CPU_OFF.
    Finished = 3,
}

impl CpuState {
    fn from_u8(value: u8) -> CpuState {
        match value {
            1 => CpuState::Starting,
            2 => CpuState::Running,
            3 => CpuState::Finished,
            _ => CpuState::Off,
        }
    }
}

struct Slot {
    state: AtomicU8,
    work: AtomicUsize,
}

static SLOTS: [Slot; MAX_CPUS] = [const {
    Slot {
        state: AtomicU8::new(0),
        work: AtomicUsize::new(0),
    }
}; MAX_CPUS];

/// How many CPUs the device tree describes (at most [`MAX_CPUS`] are usable).
pub fn count() -> usize {
    crate::dt::boot_info().cpu_mpidrs.len().min(MAX_CPUS)
}

/// The MPIDR affinity of CPU `index` (device-tree order; the boot CPU is index 0).
pub fn mpidr(index: usize) -> Option<u64> {
    crate::dt::boot_info().cpu_mpidrs.get(index).copied()
}

/// The runtime's view of CPU `index`.
pub fn state(index: usize) -> CpuState {
    SLOTS.get(index).map_or(CpuState::Off, |slot| {
        CpuState::from_u8(slot.state.load(Ordering::SeqCst))
    })
}

/// Starts CPU `index` (not the boot CPU) running `work(index)` with PSCI CPU_ON over HVC.
/// Restarting a CPU whose work finished is allowed once AFFINITY_INFO reports it off.
///
/// # Errors
/// The PSCI status of CPU_ON (`INVALID_PARAMETERS` for an index the runtime cannot start,
/// `ALREADY_ON` if the runtime knows it is still running).
pub fn start(index: usize, work: fn(usize)) -> Result<(), i64> {
    let (Some(mpidr), Some(slot)) = (mpidr(index), SLOTS.get(index)) else {
        return Err(psci::code::INVALID_PARAMETERS);
    };
    if index == 0 {
        return Err(psci::code::INVALID_PARAMETERS);
    }
    let previous = slot.state.load(Ordering::SeqCst);
    if matches!(
        CpuState::from_u8(previous),
        CpuState::Starting | CpuState::Running
    ) {
        return Err(psci::code::ALREADY_ON);
    }
    slot.work.store(work as usize, Ordering::SeqCst);
    slot.state.store(CpuState::Starting as u8, Ordering::SeqCst);
    let status = psci::cpu_on(mpidr, secondary_entry_address(), index as u64);
    if status != psci::code::SUCCESS {
        slot.state.store(previous, Ordering::SeqCst);
        return Err(status);
    }
    Ok(())
}

/// Waits until CPU `index` has reached `wanted`, for at most `seconds` of the generic timer.
/// Returns whether it did. Tests whose CPUs run long use this rather than a poll count: under
/// QEMU's TCG a loaded host may run the waiting vCPU's thread far more often than the others,
/// so a fixed number of polls can run out while the others still have work.
pub fn wait_for_state_within(index: usize, wanted: CpuState, seconds: u64) -> bool {
    let deadline = crate::arch::counter()
        .saturating_add(seconds.saturating_mul(crate::arch::counter_frequency()));
    while crate::arch::counter() < deadline {
        if state(index) == wanted {
            return true;
        }
        core::hint::spin_loop();
    }
    state(index) == wanted
}

/// Waits until CPU `index` has reached `wanted`, polling at most `polls` times.
/// Returns whether it did.
pub fn wait_for_state(index: usize, wanted: CpuState, polls: usize) -> bool {
    for _ in 0..polls {
        if state(index) == wanted {
            return true;
        }
        core::hint::spin_loop();
    }
    state(index) == wanted
}

/// Polls PSCI AFFINITY_INFO for CPU `mpidr` until it answers `wanted`, at most `polls` times.
/// Returns the last answer.
pub fn wait_for_affinity(mpidr: u64, wanted: i64, polls: usize) -> i64 {
    let mut last = psci::affinity_info(mpidr);
    for _ in 0..polls {
        if last == wanted {
            break;
        }
        core::hint::spin_loop();
        last = psci::affinity_info(mpidr);
    }
    last
}

/// Runs on a secondary CPU after the entry code: the registered work, then CPU_OFF.
pub(crate) fn secondary_run(index: usize) -> ! {
    let slot = &SLOTS[index];
    slot.state.store(CpuState::Running as u8, Ordering::SeqCst);
    let work = slot.work.load(Ordering::SeqCst);
    if work != 0 {
        // SAFETY: only `fn(usize)` pointers are stored in `work` (see `start`).
        let work: fn(usize) = unsafe { core::mem::transmute::<usize, fn(usize)>(work) };
        work(index);
    }
    slot.state.store(CpuState::Finished as u8, Ordering::SeqCst);
    let status = psci::Conduit::Hvc.call_status(psci::CPU_OFF, &[]);
    crate::test::abort_suite(&alloc::format!("CPU_OFF on CPU {index} returned {status}"));
}
