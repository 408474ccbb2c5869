//! The hypercall path, portable: the [`Vm`] a call acts on, the [`PerCpu`] context of the vCPU
//! that made it, the handlers of every call (attributes and cache maintenance in [`memory`],
//! DMA in [`dma`], the audit calls in [`audit_calls`], PSCI in [`power`]) and the one
//! [`dispatch`] that runs them.
//!
//! A handler returns `Result<Reply, HypercallError>`. An `Err` means the call was refused and
//! changed nothing: the dispatcher turns the error into its SMCCC status and writes the call's
//! one refusal record. A [`Reply`] means the call did (some of) its work and wrote its own
//! records; a call that stopped on an error after some progress says so in its
//! [`Completion`]. The aarch64 layer decodes the trap, finds the VM and this CPU's context once,
//! calls [`dispatch`], and writes the registers back.

pub mod audit_calls;
pub mod constant;
pub mod dma;
pub mod memory;
pub mod platform;
pub mod power;

#[cfg(test)]
pub(crate) mod fake;
#[cfg(test)]
mod tests;

use crate::attributes::AttributeManager;
use crate::audit::{Event, StopReason};
use crate::call::{self, Call};
use crate::layout::GuestRam;
use crate::lock::FairRwLock;
use crate::maintenance::Arch;
use crate::pagetable::TableMemory;
use crate::psci::PowerStates;
use alloc::vec::Vec;
use core::sync::atomic::AtomicU64;
use platform::{AuditSink, Firmware, GuestMemory, Iommu};
use stagehand_abi::{feature, Status};

/// Why a call was refused. Each converts into its SMCCC status once, in [`dispatch`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HypercallError {
    /// The call, or what it asks for, is not offered (unknown function, audit log off).
    NotSupported,
    /// An unknown attribute, operation, direction or flag, a zero size, a bad cookie.
    InvalidParameter,
    /// An address that must be aligned is not.
    Alignment,
    /// The range wraps, or leaves the caller's RAM.
    OutOfRange,
    /// Memory the caller may not touch this way (its MMIO).
    Denied,
    /// A page is pinned for DMA, or the IOMMU did not confirm an operation.
    Busy,
    /// A table, a rights table or the mapping quota ran out.
    NoMemory,
    /// No such device, or it is not assigned for DMA.
    NoDevice,
    /// An unknown or stale DMA handle.
    BadHandle,
}

impl HypercallError {
    /// The SMCCC status x0 carries.
    #[inline]
    pub fn status(self) -> Status {
        match self {
            HypercallError::NotSupported => Status::NotSupported,
            HypercallError::InvalidParameter => Status::InvalidParameter,
            HypercallError::Alignment => Status::Alignment,
            HypercallError::OutOfRange => Status::OutOfRange,
            HypercallError::Denied => Status::Denied,
            HypercallError::Busy => Status::Busy,
            HypercallError::NoMemory => Status::NoMemory,
            HypercallError::NoDevice => Status::NoDevice,
            HypercallError::BadHandle => Status::BadHandle,
        }
    }

    /// The code, as an audit record carries it.
    #[inline]
    pub fn code(self) -> i64 {
        self.status().code()
    }
}

/// The portable core's own checks still answer with the wire [`Status`]; only their error
/// codes reach here. A success code would be a bug in the core: it is answered as
/// NOT_SUPPORTED (never a panic), and host tests pin every core error path.
impl From<Status> for HypercallError {
    fn from(status: Status) -> Self {
        match status {
            Status::InvalidParameter => HypercallError::InvalidParameter,
            Status::Alignment => HypercallError::Alignment,
            Status::OutOfRange => HypercallError::OutOfRange,
            Status::Denied => HypercallError::Denied,
            Status::Busy => HypercallError::Busy,
            Status::NoMemory => HypercallError::NoMemory,
            Status::NoDevice => HypercallError::NoDevice,
            Status::BadHandle => HypercallError::BadHandle,
            _ => HypercallError::NotSupported,
        }
    }
}

impl From<platform::IommuError> for HypercallError {
    fn from(error: platform::IommuError) -> Self {
        match error {
            platform::IommuError::NoDevice => HypercallError::NoDevice,
            platform::IommuError::NoMemory => HypercallError::NoMemory,
            platform::IommuError::NotConfirmed => HypercallError::Busy,
        }
    }
}

/// How a call that did work ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Completion {
    /// All of it.
    Success,
    /// The work budget ran out; x1 says how far it got (I6).
    Incomplete,
    /// Nothing needed doing (DMA_SYNC of a coherent device or a non-cacheable buffer).
    NotRequired,
    /// It stopped on this error after some progress, which x1 reports.
    Stopped(HypercallError),
}

impl Completion {
    /// The SMCCC status.
    #[inline]
    pub fn status(self) -> Status {
        match self {
            Completion::Success => Status::Success,
            Completion::Incomplete => Status::Incomplete,
            Completion::NotRequired => Status::NotRequired,
            Completion::Stopped(error) => error.status(),
        }
    }

    /// The code, as an audit record carries it.
    #[inline]
    pub fn code(self) -> i64 {
        self.status().code()
    }
}

/// What a call that did work answers: its completion (x0) and x1-x3. (`repr(C)`, results
/// first: the words stay aligned, so moving a reply is four loads and stores, not a byte copy
/// behind the one-byte completion tag.)
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(C)]
pub struct Reply {
    /// x1-x3.
    pub results: [u64; 3],
    /// How it ended.
    pub completion: Completion,
}

impl Reply {
    /// SUCCESS with x1-x3.
    pub fn success(results: [u64; 3]) -> Self {
        Self {
            completion: Completion::Success,
            results,
        }
    }

    /// `completion` with x1-x3.
    pub fn new(completion: Completion, results: [u64; 3]) -> Self {
        Self {
            completion,
            results,
        }
    }
}

/// What the aarch64 layer does after a call.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// x0-x3 hold the answer: return to the guest.
    Return,
    /// Stop the guest (PSCI SYSTEM_OFF or SYSTEM_RESET): the layer records the stop and powers
    /// off or resets the machine.
    Stop(StopReason),
}

/// x0-x3 of an answer.
type Answer = [u64; 4];

/// The guest's stage 2 with the table memory it lives in: one lock covers both, so readers
/// read entries and writers hold it alone.
pub struct GuestStage2<M> {
    /// The ledger and the stage-2 engine.
    pub manager: AttributeManager,
    /// Where its tables are.
    pub tables: M,
}

/// One VM: everything a call may change, shared by its vCPUs.
pub struct Vm<M, I, S> {
    /// Guest RAM.
    pub ram: GuestRam,
    /// PSCI view of the vCPUs.
    pub power: PowerStates,
    /// Pending CPU_ON requests: entry point and context id per vCPU.
    pub boot_requests: Vec<(AtomicU64, AtomicU64)>,
    /// Stage 2 uses FEAT_S2FWB encodings.
    pub fwb: bool,
    /// Smallest D-cache line in bytes.
    pub dcache_line: u64,
    /// Stage 2 and its ledger. Cache operations, queries and guest-memory copies share it; an
    /// attribute change or a pin holds it alone, which serialises operations on a page. The
    /// lock is phase-fair. Lock order: this, then [`Self::mappings`], then the IOMMU's own.
    pub stage2: FairRwLock<GuestStage2<M>>,
    /// The live DMA mappings and the strict devices' counted rights.
    pub mappings: spin::Mutex<crate::dma::Mappings>,
    /// The IOMMU in front of the guest's devices.
    pub iommu: I,
    /// The audit log's call-side handle.
    pub audit: S,
}

impl<M: TableMemory, I: Iommu, S: AuditSink> Vm<M, I, S> {
    /// A VM over a built stage 2; no DMA mappings yet, `quota` at most.
    pub fn new(
        stage2: GuestStage2<M>,
        power: PowerStates,
        dcache_line: u64,
        mapping_quota: usize,
        iommu: I,
        audit: S,
    ) -> Self {
        let mut mappings = crate::dma::Mappings::new();
        mappings.set_quota(mapping_quota);
        let vcpus = power.len();
        Self {
            ram: *stage2.manager.ram(),
            fwb: stage2.manager.fwb(),
            power,
            boot_requests: (0..vcpus)
                .map(|_| (AtomicU64::new(0), AtomicU64::new(0)))
                .collect(),
            dcache_line,
            stage2: FairRwLock::new(stage2),
            mappings: spin::Mutex::new(mappings),
            iommu,
            audit,
        }
    }
}

impl<M, I, S: AuditSink> Vm<M, I, S> {
    /// Records `event`, caused by `vcpu`.
    pub fn record(&self, vcpu: usize, event: &Event) {
        self.audit.record(vcpu, event);
    }
}

/// The vCPU making a call, found once where the trap enters: its index, this CPU's
/// instructions, guest-memory access and firmware calls. It holds no lock and no mapping: the
/// hypervisor reaches guest RAM through its alias, which the `Vm`'s attribute lock guards.
pub struct PerCpu<C> {
    /// vCPU index (= physical CPU index: pinned one to one).
    pub vcpu: usize,
    /// This CPU.
    pub cpu: C,
}

/// The range a refusal record names, from the call's own arguments (`None`: a call with no
/// range, whose refusal record carries only the function and status).
fn subject(call: &Call) -> Option<(u64, u64)> {
    Some(match *call {
        Call::MemSetAttr { ipa, size, .. } => (ipa, size),
        Call::MemGetAttr { ipa } => (ipa, 1),
        Call::MemQueryVa { va, .. } => (va, 0),
        Call::CacheOp { address, size, .. } => (address, size),
        Call::CacheOpBatch { array, count, .. } => (array, count),
        Call::AuditRead { buffer, size, .. } => (buffer, size),
        Call::DevInfo { index } => (index, 0),
        Call::DmaMap { ipa, size, .. } => (ipa, size),
        Call::DmaMapSg { array, count, .. } | Call::DmaUnmapSg { array, count, .. } => {
            (array, count)
        }
        Call::DmaUnmap { handle } => (handle, 0),
        Call::DmaSync { handle, .. } => (handle, 0),
        _ => return None,
    })
}

/// x0-x3 of a status and three results.
#[inline]
fn registers(status: i64, results: [u64; 3]) -> [u64; 4] {
    [status as u64, results[0], results[1], results[2]]
}

/// Runs the call in x0 with arguments x1-x6 (`registers`, the guest's x0-x6) for `cpu`,
/// audits a refusal, writes the answer into x0-x3 and says what to do next. Every call is
/// decoded in full here, the constant ones included: an `HVC #0` whose answer is constant
/// never gets here (the vector answers it from [`constant::TABLE`]); a trapped SMC does.
#[inline(always)]
pub fn dispatch<M, I, S, C>(
    vm: &Vm<M, I, S>,
    cpu: &mut PerCpu<C>,
    registers: &mut [u64; 7],
) -> Action
where
    M: TableMemory,
    I: Iommu,
    S: AuditSink,
    C: Arch + GuestMemory + Firmware,
{
    run(vm, cpu, registers)
}

/// Every call: writes x0-x3, or says why the guest stops. Out of line, so that its frame is
/// paid for by the calls that reach it only.
#[inline(never)]
fn run<M, I, S, C>(vm: &Vm<M, I, S>, cpu: &mut PerCpu<C>, registers: &mut [u64; 7]) -> Action
where
    M: TableMemory,
    I: Iommu,
    S: AuditSink,
    C: Arch + GuestMemory + Firmware,
{
    match answer(vm, cpu, registers) {
        Ok(answer) => {
            registers[..4].copy_from_slice(&answer);
            Action::Return
        }
        Err(reason) => Action::Stop(reason),
    }
}

/// The answer of a call [`run`] runs: x0-x3, or why the guest stops.
#[inline(always)]
fn answer<M, I, S, C>(
    vm: &Vm<M, I, S>,
    cpu: &mut PerCpu<C>,
    guest: &[u64; 7],
) -> Result<Answer, StopReason>
where
    M: TableMemory,
    I: Iommu,
    S: AuditSink,
    C: Arch + GuestMemory + Firmware,
{
    let [x0, x1, x2, x3, x4, x5, x6] = *guest;
    let function = x0 as u32;
    let call = call::decode(x0, &[x1, x2, x3, x4, x5, x6]);
    let result = match call {
        Call::SmcccVersion => return Ok([constant::SMCCC_VERSION_1_1, 0, 0, 0]),
        Call::SmcccArchFeatures { function } => {
            return Ok([call::arch_feature(function) as u64, 0, 0, 0])
        }
        Call::PsciVersion => return Ok([constant::PSCI_VERSION_1_1, 0, 0, 0]),
        Call::PsciFeatures { function } => {
            return Ok([call::psci_feature(function) as u64, 0, 0, 0])
        }
        Call::CpuSuspend => return Ok([0; 4]),
        Call::MigrateInfoType => return Ok([constant::MIGRATE_INFO_NO_TRUSTED_OS, 0, 0, 0]),
        Call::SystemOff => return Err(StopReason::SystemOff),
        Call::SystemReset => return Err(StopReason::SystemReset),
        Call::CpuOff | Call::CpuOn { .. } | Call::AffinityInfo { .. } => {
            let result = match call {
                Call::CpuOn {
                    target,
                    entry,
                    context,
                } => power::cpu_on(vm, &mut cpu.cpu, target, entry, context).map(|()| 0),
                Call::AffinityInfo { target, level } => vm
                    .power
                    .affinity_info(target, level)
                    .map(|state| state as i64),
                _ => power::cpu_off(vm, &mut cpu.cpu, cpu.vcpu).map(|()| 0),
            };
            return Ok(match result {
                Ok(value) => [value as u64, 0, 0, 0],
                Err(error) => {
                    vm.record(
                        cpu.vcpu,
                        &Event::Refused {
                            function,
                            status: error as i64,
                        },
                    );
                    [error as i64 as u64, 0, 0, 0]
                }
            });
        }
        Call::CallUid => {
            let w = stagehand_abi::uuid_words();
            return Ok([w[0] as u64, w[1] as u64, w[2] as u64, w[3] as u64]);
        }
        Call::Revision => return Ok([stagehand_abi::ABI_MAJOR, stagehand_abi::ABI_MINOR, 0, 0]),
        Call::Features => {
            let capabilities = feature::VA_ADDRESSING
                | vm.iommu.features()
                | if vm.fwb { feature::FWB } else { 0 };
            Ok(Reply::success([
                capabilities,
                vm.dcache_line,
                crate::attributes::WORK_BUDGET,
            ]))
        }
        Call::MemSetAttr {
            ipa,
            size,
            attribute,
        } => memory::set_attribute(vm, cpu, ipa, size, attribute),
        Call::MemGetAttr { ipa } => memory::get_attribute(vm, ipa),
        Call::MemQueryVa { va, access } => memory::query_va(vm, cpu, va, access),
        Call::CacheOp { address, size, op } => memory::cache_operation(vm, cpu, address, size, op),
        Call::CacheOpBatch {
            array,
            count,
            cookie,
        } => memory::cache_batch(vm, cpu, array, count, cookie),
        Call::AuditRead {
            buffer,
            size,
            first,
        } => audit_calls::read(vm, cpu, buffer, size, first),
        Call::AuditMark { tag } => audit_calls::mark(vm, cpu.vcpu, tag),
        Call::DevInfo { index } => dma::device_info(vm, index),
        Call::DmaMap {
            device,
            ipa,
            size,
            direction,
        } => dma::map(vm, cpu, device, ipa, size, direction),
        Call::DmaMapSg {
            device,
            array,
            count,
            direction,
            cookie,
        } => dma::map_sg(vm, cpu, device, array, count, direction, cookie),
        Call::DmaUnmapSg {
            array,
            count,
            cookie,
        } => dma::unmap_sg(vm, cpu, array, count, cookie),
        Call::DmaUnmap { handle } => dma::unmap(vm, cpu, handle),
        Call::DmaSync {
            handle,
            offset,
            size,
            target,
        } => dma::sync(vm, cpu, handle, offset, size, target),
        Call::Unknown(_) => Err(HypercallError::NotSupported),
    };
    Ok(match result {
        Ok(reply) => registers(reply.completion.code(), reply.results),
        Err(error) => {
            refuse(vm, cpu.vcpu, function, &call, error);
            registers(error.code(), [0; 3])
        }
    })
}

/// The one record of a refused call.
fn refuse<M, I: Iommu, S: AuditSink>(
    vm: &Vm<M, I, S>,
    vcpu: usize,
    function: u32,
    call: &Call,
    error: HypercallError,
) {
    let status = error.code();
    let event = match subject(call) {
        Some((ipa, size)) => Event::RefusedRange {
            function,
            status,
            ipa,
            size,
        },
        None => Event::Refused { function, status },
    };
    vm.audit.record(vcpu, &event);
}

/// A call through a conduit SMCCC does not use (HVC with an immediate other than 0): refused
/// with NOT_SUPPORTED and audited like any refusal. Returns x0; the other registers are the
/// caller's.
pub fn refuse_conduit<M, I: Iommu, S: AuditSink>(vm: &Vm<M, I, S>, vcpu: usize, x0: u64) -> u64 {
    let error = HypercallError::NotSupported;
    refuse(vm, vcpu, x0 as u32, &Call::Unknown(x0 as u32), error);
    error.code() as u64
}
