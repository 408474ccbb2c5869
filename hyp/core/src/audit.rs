//! Audit events and their line format. Every change the hypervisor makes for a guest and every
//! request it refuses becomes one event with a gap-free sequence number. This is the first
//! cut: events are streamed as lines on the hypervisor's log; the bounded ring, AUDIT_READ and
//! the hash chain come with the audit-log work.

use core::fmt;

/// What happened.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Event {
    /// The guest was entered for the first time.
    GuestStart {
        /// Entry point IPA.
        entry: u64,
        /// RAM size in bytes.
        ram: u64,
    },
    /// The guest stopped (SYSTEM_OFF, SYSTEM_RESET or a fault it could not survive).
    GuestStop {
        /// Why.
        reason: &'static str,
    },
    /// A guest access to an IPA it does not own; the guest got an external abort.
    Stage2Fault {
        /// Faulting IPA.
        ipa: u64,
        /// Read, write or fetch.
        access: &'static str,
    },
    /// A guest register write the hypervisor changed or dropped (LPI enabling).
    Filtered {
        /// IPA of the register.
        ipa: u64,
        /// Value the guest wrote.
        requested: u64,
    },
    /// A call the hypervisor refused.
    Refused {
        /// Function ID.
        function: u32,
        /// Status returned (SMCCC/PSCI or ABI code).
        status: i64,
    },
}

/// One record: sequence number, time, vCPU and event.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Record {
    /// Gap-free sequence number.
    pub sequence: u64,
    /// Counter (CNTPCT) value when it happened.
    pub time: u64,
    /// The vCPU that caused it.
    pub vcpu: usize,
    /// What happened.
    pub event: Event,
}

impl fmt::Display for Record {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "AUDIT seq={} t={} vm=1 vcpu={} ",
            self.sequence, self.time, self.vcpu
        )?;
        match self.event {
            Event::GuestStart { entry, ram } => {
                write!(f, "kind=guest-start entry={entry:#x} ram={ram:#x}")
            }
            Event::GuestStop { reason } => write!(f, "kind=guest-stop reason={reason}"),
            Event::Stage2Fault { ipa, access } => {
                write!(
                    f,
                    "kind=stage2-fault ipa={ipa:#x} access={access} result=abort-injected"
                )
            }
            Event::Filtered { ipa, requested } => {
                write!(
                    f,
                    "kind=refused ipa={ipa:#x} requested={requested:#x} result=filtered"
                )
            }
            Event::Refused { function, status } => {
                write!(f, "kind=refused function={function:#010x} status={status}")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::format;

    #[test]
    fn line_format_is_stable() {
        let r = Record {
            sequence: 7,
            time: 99,
            vcpu: 1,
            event: Event::Stage2Fault {
                ipa: 0x905_0000,
                access: "read",
            },
        };
        assert_eq!(
            format!("{r}"),
            "AUDIT seq=7 t=99 vm=1 vcpu=1 kind=stage2-fault ipa=0x9050000 access=read result=abort-injected"
        );
    }
}
