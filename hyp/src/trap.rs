//! Trap dispatch: decodes what the guest did (hypervisor call, trapped SMC, stage-2 fault) and
//! calls the handler. Guest registers become typed requests in `hyp_core::call::decode`; the
//! decisions (PSCI state, GIC filtering, abort injection) are made in `hyp_core`.

use crate::arch::vectors::{el2_vectors, TrapFrame, Vector};
use crate::arch::{self, entry::secondary_entry, recover};
use crate::console::{self, LineBuffer};
use crate::exit;
use crate::vm::{audit, vm, Vm};
use crate::{dma_calls, memory_calls};
use aarch64_cpu::registers::{
    Readable, Writeable, CNTFRQ_EL0, CNTPCT_EL0, ELR_EL1, ESR_EL1, ESR_EL2, FAR_EL1, FAR_EL2,
    HPFAR_EL2, SCTLR_EL1, SPSR_EL1, TPIDR_EL2, VBAR_EL1, VBAR_EL2,
};
use core::fmt::Write;
use core::sync::atomic::Ordering;
use hyp_core::audit::{Event, StopReason};
use hyp_core::call::{self, Call};
use hyp_core::esr::{self, DataAbort, ExceptionClass, Syndrome};
use hyp_core::gic::{self, Decision};
use hyp_core::inject::{self, Access, GuestContext};
use hyp_core::psci::PsciError;
use stagehand_abi::{exit_status, feature, Status};

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

/// The vCPU (and physical CPU) this code runs on.
pub fn current_vcpu() -> usize {
    TPIDR_EL2.get() as usize
}

/// Called from the vectors with the saved frame.
#[unsafe(no_mangle)]
extern "C" fn handle_trap(frame: &mut TrapFrame, vector: u64) {
    match Vector::from_raw(vector) {
        Vector::GuestSync => guest_sync(frame),
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
    smccc(frame);
}

fn guest_sync(frame: &mut TrapFrame) {
    let esr = ESR_EL2.get();
    match ExceptionClass::from_esr(esr) {
        ExceptionClass::Hvc64 if esr & 0xffff == 0 => smccc(frame),
        ExceptionClass::Hvc64 => {
            // SMCCC uses HVC #0 only: another immediate is refused, and audited like any refusal.
            audit(
                current_vcpu(),
                Event::Refused {
                    function: frame.x[0] as u32,
                    status: Status::NotSupported.code(),
                },
            );
            frame.x[0] = Status::NotSupported.code() as u64;
        }
        ExceptionClass::Smc64 => {
            // A trapped SMC returns to the SMC itself; step over it.
            frame.elr += 4;
            smccc(frame);
        }
        ExceptionClass::WaitForInterrupt if esr & 1 == 0 => idle(frame, esr),
        ExceptionClass::DataAbortLower => data_abort(frame, esr),
        ExceptionClass::InstructionAbortLower => {
            let ipa = esr::fault_ipa(HPFAR_EL2.get(), FAR_EL2.get());
            if !retry_if_breaking(ipa) {
                inject_abort(frame, Access::Fetch, ipa);
            }
        }
        // Everything else that traps (a system register the guest may not use, an AArch32
        // coprocessor access, HVC/SMC from AArch32): what a CPU without the feature gives.
        _ => inject_undefined(frame, esr),
    }
}

/// The guest waits for an interrupt (HCR_EL2.TWI): the hypervisor's deferred work runs on this
/// idle time (SMMU fault events into the log, the log's records hashed and streamed), then the
/// CPU waits for the guest as the guest asked. An interrupt for the guest (routed to EL1) ends
/// the wait even though EL2 runs with interrupts masked: WFI wakes on a pending interrupt
/// whatever PSTATE's masks.
fn idle(frame: &mut TrapFrame, esr: u64) {
    let vcpu = current_vcpu();
    crate::smmu::drain_events();
    crate::audit::drain(vcpu);
    arch::wait_for_interrupt();
    frame.elr += instruction_length(esr);
}

/// A data abort taken at EL2 itself (the only kind a recoverable access may take).
fn is_data_abort_at_el2(esr: u64) -> bool {
    ExceptionClass::from_esr(esr) == ExceptionClass::DataAbortSame
}

fn set_results(frame: &mut TrapFrame, results: [u64; 4]) {
    frame.x[..4].copy_from_slice(&results);
}

fn smccc(frame: &mut TrapFrame) {
    let vcpu = current_vcpu();
    let vm = vm();
    let function = frame.x[0] as u32;
    let mut args = [0u64; 6];
    args.copy_from_slice(&frame.x[1..7]);
    let status = |code: i64| [code as u64, 0, 0, 0];
    let results = match call::decode(frame.x[0], &args) {
        Call::SmcccVersion => status(0x1_0001),
        Call::SmcccArchFeatures { function } => status(call::arch_feature(function)),
        Call::PsciVersion => status(0x1_0001),
        Call::PsciFeatures { function } => status(call::psci_feature(function)),
        Call::CpuSuspend => status(0),
        Call::CpuOff => cpu_off(vm, vcpu),
        Call::CpuOn {
            target,
            entry,
            context,
        } => match cpu_on(vm, target, entry, context) {
            Ok(()) => status(0),
            Err(error) => {
                audit(
                    vcpu,
                    Event::Refused {
                        function,
                        status: error as i64,
                    },
                );
                status(error as i64)
            }
        },
        Call::AffinityInfo { target, level } => match vm.power.affinity_info(target, level) {
            Ok(state) => status(state as i64),
            Err(error) => {
                audit(
                    vcpu,
                    Event::Refused {
                        function,
                        status: error as i64,
                    },
                );
                status(error as i64)
            }
        },
        Call::MigrateInfoType => status(2), // No trusted OS needs migrating.
        Call::SystemOff => {
            // The console first: with a shared UART, held audit lines are streamed at the stop.
            console::set_guest_running(false);
            audit(
                vcpu,
                Event::GuestStop {
                    reason: StopReason::SystemOff,
                },
            );
            log::info!("guest powered off");
            exit::exit(exit_status::GUEST_POWERED_OFF)
        }
        Call::SystemReset => {
            console::set_guest_running(false);
            audit(
                vcpu,
                Event::GuestStop {
                    reason: StopReason::SystemReset,
                },
            );
            log::info!("guest asked for a reset");
            exit::system_reset()
        }
        Call::CallUid => {
            let w = stagehand_abi::uuid_words();
            [w[0] as u64, w[1] as u64, w[2] as u64, w[3] as u64]
        }
        Call::Revision => [stagehand_abi::ABI_MAJOR, stagehand_abi::ABI_MINOR, 0, 0],
        Call::Features => {
            let capabilities = feature::VA_ADDRESSING
                | crate::smmu::features()
                | if vm.fwb { feature::FWB } else { 0 };
            [
                0,
                capabilities,
                vm.dcache_line,
                hyp_core::attributes::WORK_BUDGET,
            ]
        }
        Call::MemSetAttr {
            ipa,
            size,
            attribute,
        } => memory_calls::set_attribute(ipa, size, attribute),
        Call::MemGetAttr { ipa } => memory_calls::get_attribute(ipa),
        Call::MemQueryVa { va, access } => memory_calls::query_va(va, access),
        Call::CacheOp { address, size, op } => memory_calls::cache_operation(address, size, op),
        Call::CacheOpBatch {
            array,
            count,
            cookie,
        } => memory_calls::cache_batch(array, count, cookie),
        Call::AuditRead {
            buffer,
            size,
            first,
        } => match crate::audit::read(vcpu, buffer, size, first) {
            Ok([copied, next, dropped]) => [0, copied, next, dropped],
            Err(error) => status(error.code()),
        },
        Call::AuditMark { tag } => match crate::audit::mark(vcpu, tag) {
            Ok([sequence, _, _]) => [0, sequence, 0, 0],
            Err(error) => status(error.code()),
        },
        Call::DevInfo { index } => dma_calls::device_info(index),
        Call::DmaMap {
            device,
            ipa,
            size,
            direction,
        } => dma_calls::map(device, ipa, size, direction),
        Call::DmaMapSg {
            device,
            array,
            count,
            direction,
            cookie,
        } => dma_calls::map_sg(device, array, count, direction, cookie),
        Call::DmaUnmapSg {
            array,
            count,
            cookie,
        } => dma_calls::unmap_sg(array, count, cookie),
        Call::DmaUnmap { handle } => dma_calls::unmap(handle),
        Call::DmaSync {
            handle,
            offset,
            size,
            target,
        } => dma_calls::sync(handle, offset, size, target),
        Call::Unknown(_) => {
            audit(
                vcpu,
                Event::Refused {
                    function,
                    status: Status::NotSupported.code(),
                },
            );
            status(Status::NotSupported.code())
        }
    };
    set_results(frame, results);
}

fn cpu_on(vm: &Vm, target: u64, entry: u64, context: u64) -> Result<(), PsciError> {
    if vm.ram.pa_of(entry, 4).is_none() || !entry.is_multiple_of(4) {
        return Err(PsciError::InvalidAddress);
    }
    let index = vm.power.begin_on(target)?;
    let (slot_entry, slot_context) = &vm.boot_requests[index];
    slot_entry.store(entry, Ordering::Release);
    slot_context.store(context, Ordering::Release);
    let start = secondary_entry as *const () as u64;
    // A CPU that has just turned itself off may not be off in the firmware yet (the guest can
    // see AFFINITY_INFO = OFF first): keep asking for up to 100 ms of counter time.
    let deadline = CNTPCT_EL0.get() + CNTFRQ_EL0.get() / 10;
    loop {
        match smccc::psci::cpu_on::<smccc::Smc>(vm.power.mpidr(index), start, index as u64) {
            Ok(()) => return Ok(()),
            Err(smccc::psci::Error::AlreadyOn) if CNTPCT_EL0.get() < deadline => {
                core::hint::spin_loop()
            }
            Err(error) => {
                log::warn!("firmware CPU_ON of vCPU {index} failed: {error:?}");
                break;
            }
        }
    }
    vm.power.abort_on(index);
    Err(PsciError::InternalFailure)
}

fn cpu_off(vm: &Vm, vcpu: usize) -> [u64; 4] {
    vm.power.mark_off(vcpu);
    log::debug!("vCPU {vcpu} off");
    let _ = smccc::psci::cpu_off::<smccc::Smc>();
    // CPU_OFF only returns on failure.
    vm.power.mark_on(vcpu);
    let failure = PsciError::InternalFailure as i64;
    audit(
        vcpu,
        Event::Refused {
            function: smccc::psci::PSCI_CPU_OFF,
            status: failure,
        },
    );
    [failure as u64, 0, 0, 0]
}

fn data_abort(frame: &mut TrapFrame, esr: u64) {
    let ipa = esr::fault_ipa(HPFAR_EL2.get(), FAR_EL2.get());
    let abort = DataAbort::from_esr(esr);
    let vm = vm();
    let redistributor = vm.gic.trapped_offset(ipa);
    match redistributor {
        Some(offset)
            if abort.valid_syndrome
                && !abort.stage1_walk
                && ipa.is_multiple_of(abort.access_size as u64) =>
        {
            emulate_redistributor(frame, &abort, ipa, offset)
        }
        _ if retry_if_breaking(ipa) => {}
        _ => inject_abort(
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
fn retry_if_breaking(ipa: u64) -> bool {
    let attributes = vm().attributes.read();
    attributes.is_ram(ipa)
}

fn emulate_redistributor(frame: &mut TrapFrame, abort: &DataAbort, ipa: u64, offset: u64) {
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
            audit(
                current_vcpu(),
                Event::Filtered {
                    ipa,
                    requested: value,
                },
            );
        }
        if let Decision::Write(value) = decision {
            // SAFETY: `ipa` is in a populated redistributor frame (identity-mapped, Device at
            // EL2), naturally aligned; the write is the guest's own, filtered above.
            if unsafe { recover::mmio_write(ipa, width, value) }.is_err() {
                return inject_abort(frame, access, ipa);
            }
        }
    } else {
        let mut value = match gic::decide(offset, None) {
            // SAFETY: as above, for the guest's own read.
            Decision::Read { clear } => match unsafe { recover::mmio_read(ipa, width) } {
                Ok(value) => value & !clear,
                // A register nothing answers: the guest gets the abort it would get without us.
                Err(_) => return inject_abort(frame, access, ipa),
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
fn deliver(frame: &mut TrapFrame, injection: inject::Injection) {
    let is_ram = |ipa: u64| vm().attributes.read().is_ram(ipa);
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
fn inject_abort(frame: &mut TrapFrame, access: Access, ipa: u64) {
    let far = FAR_EL2.get();
    audit(current_vcpu(), Event::Stage2Fault { ipa, access });
    deliver(
        frame,
        inject::external_abort(&guest_context(frame), far, access),
    );
}

/// Gives the guest an UNDEF for a trapped instruction the hypervisor does not emulate.
fn inject_undefined(frame: &mut TrapFrame, esr: u64) {
    let far = FAR_EL1.get();
    audit(current_vcpu(), Event::Undefined { esr });
    deliver(frame, inject::undefined(&guest_context(frame), far));
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
    audit(
        current_vcpu(),
        Event::GuestStop {
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
