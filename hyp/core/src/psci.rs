//! The power state of each vCPU, as PSCI sees it. vCPUs are pinned one to one to physical CPUs,
//! so starting a vCPU means starting its physical CPU through the real firmware; this table
//! makes the transitions atomic so that racing CPU_ON calls from several vCPUs get
//! ALREADY_ON / ON_PENDING instead of starting a CPU twice.

use alloc::vec::Vec;
use core::sync::atomic::{AtomicU8, Ordering};

/// PSCI return codes this module produces.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(i64)]
pub enum PsciError {
    /// Not supported.
    NotSupported = -1,
    /// Unknown MPIDR or bad affinity level.
    InvalidParameters = -2,
    /// The CPU is already on.
    AlreadyOn = -4,
    /// A CPU_ON for it is in progress.
    OnPending = -5,
    /// The firmware refused to start it.
    InternalFailure = -6,
    /// The entry point is not in the caller's RAM.
    InvalidAddress = -9,
}

/// AFFINITY_INFO values.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum PowerState {
    /// Running.
    On = 0,
    /// Off.
    Off = 1,
    /// CPU_ON accepted, not yet running.
    OnPending = 2,
}

impl PowerState {
    fn from_u8(v: u8) -> Self {
        match v {
            0 => PowerState::On,
            2 => PowerState::OnPending,
            _ => PowerState::Off,
        }
    }
}

/// Affinity fields of an MPIDR (Aff3, Aff2, Aff1, Aff0).
pub const MPIDR_AFFINITY_MASK: u64 = 0xff_00ff_ffff;

/// Power states of the VM's vCPUs, indexed like the device tree's CPU nodes.
pub struct PowerStates {
    mpidrs: Vec<u64>,
    states: Vec<AtomicU8>,
}

impl PowerStates {
    /// All vCPUs off except `boot`.
    pub fn new(mpidrs: Vec<u64>, boot: usize) -> Self {
        let states = (0..mpidrs.len())
            .map(|i| {
                AtomicU8::new(if i == boot {
                    PowerState::On
                } else {
                    PowerState::Off
                } as u8)
            })
            .collect();
        Self { mpidrs, states }
    }

    /// Number of vCPUs.
    pub fn len(&self) -> usize {
        self.mpidrs.len()
    }

    /// True when there are no vCPUs.
    pub fn is_empty(&self) -> bool {
        self.mpidrs.is_empty()
    }

    /// MPIDR of vCPU `index`.
    pub fn mpidr(&self, index: usize) -> u64 {
        self.mpidrs[index]
    }

    /// The vCPU whose MPIDR affinity is `mpidr`.
    pub fn index_of(&self, mpidr: u64) -> Option<usize> {
        let want = mpidr & MPIDR_AFFINITY_MASK;
        self.mpidrs
            .iter()
            .position(|&m| m & MPIDR_AFFINITY_MASK == want)
    }

    /// Current state of vCPU `index`.
    pub fn state(&self, index: usize) -> PowerState {
        PowerState::from_u8(self.states[index].load(Ordering::Acquire))
    }

    /// Claims an OFF vCPU for CPU_ON (OFF to ON_PENDING). Returns its index.
    ///
    /// # Errors
    /// INVALID_PARAMETERS for an unknown MPIDR, ALREADY_ON or ON_PENDING otherwise.
    pub fn begin_on(&self, target: u64) -> Result<usize, PsciError> {
        if target & !MPIDR_AFFINITY_MASK != 0 {
            return Err(PsciError::InvalidParameters);
        }
        let index = self.index_of(target).ok_or(PsciError::InvalidParameters)?;
        match self.states[index].compare_exchange(
            PowerState::Off as u8,
            PowerState::OnPending as u8,
            Ordering::AcqRel,
            Ordering::Acquire,
        ) {
            Ok(_) => Ok(index),
            Err(v) if PowerState::from_u8(v) == PowerState::OnPending => Err(PsciError::OnPending),
            Err(_) => Err(PsciError::AlreadyOn),
        }
    }

    /// The firmware refused: back to OFF.
    pub fn abort_on(&self, index: usize) {
        self.states[index].store(PowerState::Off as u8, Ordering::Release);
    }

    /// The vCPU is running.
    pub fn mark_on(&self, index: usize) {
        self.states[index].store(PowerState::On as u8, Ordering::Release);
    }

    /// The vCPU turned itself off.
    pub fn mark_off(&self, index: usize) {
        self.states[index].store(PowerState::Off as u8, Ordering::Release);
    }

    /// AFFINITY_INFO at level 0.
    ///
    /// # Errors
    /// INVALID_PARAMETERS for an unknown MPIDR or a level other than 0.
    pub fn affinity_info(&self, target: u64, level: u64) -> Result<PowerState, PsciError> {
        if level != 0 || target & !MPIDR_AFFINITY_MASK != 0 {
            return Err(PsciError::InvalidParameters);
        }
        let index = self.index_of(target).ok_or(PsciError::InvalidParameters)?;
        Ok(self.state(index))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec;

    #[test]
    fn cpu_on_transitions() {
        let p = PowerStates::new(vec![0, 1, 2, 3], 0);
        assert_eq!(p.begin_on(0), Err(PsciError::AlreadyOn));
        assert_eq!(p.begin_on(2), Ok(2));
        assert_eq!(p.begin_on(2), Err(PsciError::OnPending));
        assert_eq!(p.affinity_info(2, 0), Ok(PowerState::OnPending));
        p.mark_on(2);
        assert_eq!(p.affinity_info(2, 0), Ok(PowerState::On));
        p.mark_off(2);
        assert_eq!(p.affinity_info(2, 0), Ok(PowerState::Off));
        assert_eq!(p.begin_on(9), Err(PsciError::InvalidParameters));
        assert_eq!(p.begin_on(1 << 63 | 1), Err(PsciError::InvalidParameters));
        assert_eq!(p.affinity_info(1, 1), Err(PsciError::InvalidParameters));
        assert_eq!(p.begin_on(3), Ok(3));
        p.abort_on(3);
        assert_eq!(p.state(3), PowerState::Off);
    }

    #[test]
    fn racing_cpu_on_starts_a_cpu_once() {
        let p = std::sync::Arc::new(PowerStates::new(vec![0, 1], 0));
        let winners: usize = (0..8)
            .map(|_| {
                let p = p.clone();
                std::thread::spawn(move || p.begin_on(1).is_ok() as usize)
            })
            .collect::<Vec<_>>()
            .into_iter()
            .map(|t| t.join().unwrap())
            .sum();
        assert_eq!(winners, 1);
    }
}
