//! The PSCI calls that change a vCPU's power state: CPU_ON and CPU_OFF, over the firmware's own
//! (vCPUs are pinned one to one to physical CPUs).

use super::platform::Firmware;
use super::Vm;
use crate::psci::PsciError;
use core::sync::atomic::Ordering;

/// CPU_ON(target, entry, context): starts the physical CPU of vCPU `target` at the
/// hypervisor's secondary entry, which enters the guest at `entry` with x0 = `context`.
///
/// # Errors
/// INVALID_ADDRESS for an entry outside guest RAM or not 4-byte aligned; the errors of
/// [`crate::psci::PowerStates::begin_on`]; INTERNAL_FAILURE when the firmware refused.
pub fn cpu_on<M, I, S, F: Firmware>(
    vm: &Vm<M, I, S>,
    firmware: &mut F,
    target: u64,
    entry: u64,
    context: u64,
) -> Result<(), PsciError> {
    if vm.ram.pa_of(entry, 4).is_none() || !entry.is_multiple_of(4) {
        return Err(PsciError::InvalidAddress);
    }
    let index = vm.power.begin_on(target)?;
    let (slot_entry, slot_context) = &vm.boot_requests[index];
    slot_entry.store(entry, Ordering::Release);
    slot_context.store(context, Ordering::Release);
    match firmware.cpu_on(vm.power.mpidr(index), index) {
        Ok(()) => Ok(()),
        Err(_) => {
            vm.power.abort_on(index);
            Err(PsciError::InternalFailure)
        }
    }
}

/// CPU_OFF: turns vCPU `vcpu` (this CPU) off. Returns only when the firmware refused.
///
/// # Errors
/// INTERNAL_FAILURE: the firmware did not turn the CPU off; it runs on.
pub fn cpu_off<M, I, S, F: Firmware>(
    vm: &Vm<M, I, S>,
    firmware: &mut F,
    vcpu: usize,
) -> Result<(), PsciError> {
    vm.power.mark_off(vcpu);
    log::debug!("vCPU {vcpu} off");
    firmware.cpu_off();
    vm.power.mark_on(vcpu);
    Err(PsciError::InternalFailure)
}
