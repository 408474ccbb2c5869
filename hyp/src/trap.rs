//! Trap dispatch: decodes what the guest did (hypervisor call, trapped SMC, stage-2 fault) and
//! hands it to `hyp_core`. A call finds the VM and this CPU's context (vCPU index, the
//! CPU itself) once here and runs in `hyp_core::hypercall::dispatch`; the other decisions (GIC
//! filtering, abort injection) are made in `hyp_core` too.

use crate::arch::cpu::Cpu;
use crate::arch::vectors::{el2_vectors, TrapFrame, Vector};
use crate::arch::{self, recover};
use crate::console::{self, LineBuffer};
use crate::exit;
use crate::vm::{vm, Vm};
use aarch64_cpu::registers::{
    Readable, Writeable, ELR_EL1, ESR_EL1, ESR_EL2, FAR_EL1, FAR_EL2, HPFAR_EL2, SCTLR_EL1,
    SPSR_EL1, TPIDR_EL2, VBAR_EL1, VBAR_EL2,
};
use core::fmt::Write;
use hyp_core::audit::{Event, StopReason};
use hyp_core::esr::{self, DataAbort, ExceptionClass, Syndrome};
use hyp_core::gic::{self, Decision};
use hyp_core::hypercall::platform::Iommu;
use hyp_core::hypercall::{self, Action, PerCpu};
use hyp_core::inject::{self, Access, GuestContext};
use stagehand_abi::exit_status;

/// Points VBAR_EL2 at the vector table.
///
/// # Safety
/// Call once per CPU, before anything can trap.
pub unsafe fn install_vectors() {
    // SAFETY: taking the address of the vector table reads nothing.
    let vectors = unsafe { &el2_vectors as *const u8 as u64 };
    VBAR_EL2.set(vectors);
    arch::isb();
}

/// The vCPU (and physical CPU) this code runs on: set when the guest was entered on this CPU.
fn current_vcpu() -> usize {
    TPIDR_EL2.get() as usize
}

/// Called from the vectors with the saved frame.
#[unsafe(no_mangle)]
extern "C" fn handle_trap(frame: &mut TrapFrame, vector: u64) {
    match Vector::from_raw(vector) {
        Vector::GuestSync => guest_sync(vm(), current_vcpu(), frame),
        Vector::El2Sync => match recover::resume_address(frame.elr) {
            // An access made on the guest's behalf (emulated MMIO, an AT walk through the
            // guest's tables) took an abort: the caller gets an error instead.
            Some(resume) if is_data_abort_at_el2(ESR_EL2.get()) => {
                frame.x[recover::FLAG_REGISTER] = 1;
                frame.elr = resume;
            }
            _ => hypervisor_fault(frame, "synchronous exception at EL2"),
        },
        Vector::El2Async => hypervisor_fault(frame, "interrupt or SError at EL2"),
        Vector::GuestSError => stop_guest(frame, "SError from the guest"),
        Vector::GuestAsync => stop_guest(frame, "interrupt routed to EL2"),
        Vector::Unexpected => hypervisor_fault(frame, "unexpected exception vector"),
    }
}

/// Called from the vectors for `HVC #0` from AArch64 (told apart there by its ESR_EL2), with a
/// frame that holds x0-x18, x30, ELR and SPSR only: all that [`smccc`] reads.
#[unsafe(no_mangle)]
extern "C" fn handle_hypercall(frame: &mut TrapFrame) {
    smccc(vm(), current_vcpu(), frame);
}

fn guest_sync(vm: &Vm, vcpu: usize, frame: &mut TrapFrame) {
    let esr = ESR_EL2.get();
    match ExceptionClass::from_esr(esr) {
        ExceptionClass::Hvc64 if esr & 0xffff == 0 => smccc(vm, vcpu, frame),
        ExceptionClass::Hvc64 => {
            // SMCCC uses HVC #0 only: another immediate is refused, and audited like any refusal.
            frame.x[0] = hypercall::refuse_conduit(&vm.core, vcpu, frame.x[0]);
        }
        ExceptionClass::Smc64 => {
            // A trapped SMC returns to the SMC itself; step over it.
            frame.elr += 4;
            // The dispatcher answers the constant calls too (the HVC vector's table only
            // shortens their path, and host tests hold the two to the same answers).
            smccc(vm, vcpu, frame);
        }
        ExceptionClass::WaitForInterrupt if esr & 1 == 0 => idle(vm, vcpu, frame, esr),
        ExceptionClass::DataAbortLower => data_abort(vm, vcpu, frame, esr),
        ExceptionClass::InstructionAbortLower => {
            let ipa = esr::fault_ipa(HPFAR_EL2.get(), FAR_EL2.get());
            if !retry_if_breaking(vm, ipa) {
                inject_abort(vm, vcpu, frame, Access::Fetch, ipa);
            }
        }
        // Everything else that traps (a system register the guest may not use, an AArch32
        // coprocessor access, HVC/SMC from AArch32): what a CPU without the feature gives.
        _ => inject_undefined(vm, vcpu, frame, esr),
    }
}

/// The guest waits for an interrupt (HCR_EL2.TWI): the hypervisor's deferred work runs on this
/// idle time (SMMU fault events into the log, the log's records hashed and streamed), then the
/// CPU waits for the guest as the guest asked. An interrupt for the guest (routed to EL1) ends
/// the wait even though EL2 runs with interrupts masked: WFI wakes on a pending interrupt
/// whatever PSTATE's masks.
fn idle(vm: &Vm, vcpu: usize, frame: &mut TrapFrame, esr: u64) {
    vm.core.iommu.drain_events(vcpu, &vm.core.audit);
    vm.core.audit.drain(vcpu);
    arch::wait_for_interrupt();
    frame.elr += instruction_length(esr);
}

/// A data abort taken at EL2 itself (the only kind a recoverable access may take).
fn is_data_abort_at_el2(esr: u64) -> bool {
    ExceptionClass::from_esr(esr) == ExceptionClass::DataAbortSame
}

/// An SMCCC call: this CPU's context (its vCPU index, the CPU itself) is found here, once, and the
/// portable dispatcher does the rest.
#[inline(always)]
fn smccc(vm: &Vm, vcpu: usize, frame: &mut TrapFrame) {
    let mut cpu = PerCpu {
        vcpu,
        cpu: Cpu::with_line(vm.core.dcache_line),
    };
    let Some(registers) = frame.x.first_chunk_mut::<7>() else {
        return; // x0-x6 are always in the frame.
    };
    match hypercall::dispatch(&vm.core, &mut cpu, registers) {
        Action::Return => {}
        Action::Stop(reason) => {
            // The console first: with a shared UART, held audit lines are streamed at the stop.
            console::set_guest_running(false);
            vm.core.audit.record(vcpu, &Event::GuestStop { reason });
            if reason == StopReason::SystemReset {
                log::info!("guest asked for a reset");
                exit::system_reset()
            }
            log::info!("guest powered off");
            exit::exit(exit_status::GUEST_POWERED_OFF)
        }
    }
}

fn data_abort(vm: &Vm, vcpu: usize, frame: &mut TrapFrame, esr: u64) {
    let ipa = esr::fault_ipa(HPFAR_EL2.get(), FAR_EL2.get());
    let abort = DataAbort::from_esr(esr);
    let redistributor = vm.gic.trapped_offset(ipa);
    match redistributor {
        Some(offset)
            if abort.valid_syndrome
                && !abort.stage1_walk
                && ipa.is_multiple_of(abort.access_size as u64) =>
        {
            emulate_redistributor(vm, vcpu, frame, &abort, ipa, offset)
        }
        _ if retry_if_breaking(vm, ipa) => {}
        _ => inject_abort(
            vm,
            vcpu,
            frame,
            if abort.write {
                Access::Write
            } else {
                Access::Read
            },
            ipa,
        ),
    }
}

/// A stage-2 fault on guest RAM is never the guest's fault: an attribute change on another CPU
/// has broken the entry (break-before-make) and will make it again. Waiting for the attribute
/// manager (a shared lock, held alone by the change) and returning retries the access.
fn retry_if_breaking(vm: &Vm, ipa: u64) -> bool {
    vm.core.stage2.read().manager.is_ram(ipa)
}

fn emulate_redistributor(
    vm: &Vm,
    vcpu: usize,
    frame: &mut TrapFrame,
    abort: &DataAbort,
    ipa: u64,
    offset: u64,
) {
    let width = abort.access_size;
    let size_mask = if width == 8 {
        u64::MAX
    } else {
        (1u64 << (8 * width as u32)) - 1
    };
    let register = abort.register as usize;
    let access = if abort.write {
        Access::Write
    } else {
        Access::Read
    };
    if abort.write {
        let value = if register == 31 {
            0
        } else {
            frame.x[register] & size_mask
        };
        let decision = gic::decide(offset, Some(value));
        if decision.filtered(Some(value)) {
            vm.core.audit.record(
                vcpu,
                &Event::Filtered {
                    ipa,
                    requested: value,
                },
            );
        }
        if let Decision::Write(value) = decision {
            // SAFETY: `ipa` is in a populated redistributor frame (identity-mapped, Device at
            // EL2), naturally aligned; the write is the guest's own, filtered above.
            if unsafe { recover::mmio_write(ipa, width, value) }.is_err() {
                return inject_abort(vm, vcpu, frame, access, ipa);
            }
        }
    } else {
        let mut value = match gic::decide(offset, None) {
            // SAFETY: as above, for the guest's own read.
            Decision::Read { clear } => match unsafe { recover::mmio_read(ipa, width) } {
                Ok(value) => value & !clear,
                // A register nothing answers: the guest gets the abort it would get without us.
                Err(_) => return inject_abort(vm, vcpu, frame, access, ipa),
            },
            Decision::ReadAs(value) => value,
            Decision::Write(_) | Decision::Ignore => 0,
        } & size_mask;
        if abort.sign_extend && width < 8 {
            let shift = 64 - 8 * width as u32;
            value = (((value << shift) as i64) >> shift) as u64;
        }
        if !abort.sixty_four {
            value &= 0xffff_ffff;
        }
        if register != 31 {
            frame.x[register] = value;
        }
    }
    frame.elr += instruction_length(ESR_EL2.get());
}

/// Bytes of the trapped instruction: ESR.IL is 0 for a 16-bit T32 instruction (AArch32 EL0).
fn instruction_length(esr: u64) -> u64 {
    if ESR_EL2::IL.is_set(esr) {
        4
    } else {
        2
    }
}

/// What the guest was doing, for an exception injected into it.
fn guest_context(frame: &TrapFrame) -> GuestContext {
    GuestContext {
        spsr: frame.spsr,
        elr: frame.elr,
        vbar: VBAR_EL1.get(),
        sctlr: SCTLR_EL1.get(),
    }
}

/// Delivers `injection` to the guest's EL1, unless it would only fault again (a guest that
/// faults before it has vectors): the guest is then stopped with the report, never left to
/// spin between its fault and its vector.
fn deliver(vm: &Vm, frame: &mut TrapFrame, injection: inject::Injection) {
    let is_ram = |ipa: u64| vm.core.stage2.read().manager.is_ram(ipa);
    if let Err(undeliverable) = inject::check_delivery(&guest_context(frame), &injection, is_ram) {
        let mut why = LineBuffer::new();
        let _ = write!(why, "{undeliverable}");
        stop_guest(frame, why.as_str());
    }
    ELR_EL1.set(injection.elr_el1);
    SPSR_EL1.set(injection.spsr_el1);
    ESR_EL1.set(injection.esr_el1);
    FAR_EL1.set(injection.far_el1);
    frame.elr = injection.elr_el2;
    frame.spsr = injection.spsr_el2;
}

/// Gives the guest a synchronous external abort for an access to `ipa`, which it does not own.
fn inject_abort(vm: &Vm, vcpu: usize, frame: &mut TrapFrame, access: Access, ipa: u64) {
    let far = FAR_EL2.get();
    vm.core
        .audit
        .record(vcpu, &Event::Stage2Fault { ipa, access });
    deliver(
        vm,
        frame,
        inject::external_abort(&guest_context(frame), far, access),
    );
}

/// Gives the guest an UNDEF for a trapped instruction the hypervisor does not emulate.
fn inject_undefined(vm: &Vm, vcpu: usize, frame: &mut TrapFrame, esr: u64) {
    let far = FAR_EL1.get();
    vm.core.audit.record(vcpu, &Event::Undefined { esr });
    deliver(vm, frame, inject::undefined(&guest_context(frame), far));
}

fn report(frame: &TrapFrame, title: &str) {
    let esr = ESR_EL2.get();
    let mut line = LineBuffer::new();
    let _ = write!(
        line,
        "\n[stagehand FATAL] {title} on CPU {:#x}\n  {}\n  FAR {:#x}  HPFAR {:#x}  ELR {:#x}  SPSR {:#x}\n",
        arch::mpidr() & 0xff_ffff,
        Syndrome(esr),
        FAR_EL2.get(),
        HPFAR_EL2.get(),
        frame.elr,
        frame.spsr,
    );
    console::emergency_write(line.as_str());
    for row in 0..8 {
        let mut line = LineBuffer::new();
        for i in (row * 4)..(row * 4 + 4).min(31) {
            let _ = write!(line, "  x{i:<2} {:#018x}", frame.x[i]);
        }
        let _ = writeln!(line);
        console::emergency_write(line.as_str());
    }
}

/// The guest did something the hypervisor cannot handle: report it and stop the guest.
fn stop_guest(frame: &TrapFrame, why: &str) -> ! {
    console::set_guest_running(false);
    report(frame, why);
    vm().core.audit.record(
        current_vcpu(),
        &Event::GuestStop {
            reason: StopReason::Fault,
        },
    );
    exit::exit(exit_status::GUEST_STOPPED)
}

/// The hypervisor itself faulted: report and stop.
fn hypervisor_fault(frame: &TrapFrame, why: &str) -> ! {
    console::set_guest_running(false);
    report(frame, why);
    exit::exit(exit_status::HYPERVISOR_FAULT)
}
