//! Decoding of exception syndromes (ESR_EL2) and fault addresses, for trap dispatch and for
//! the reports printed when something cannot be handled.

use core::fmt;

/// Exception classes the hypervisor distinguishes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExceptionClass {
    /// Trapped WFI/WFE.
    WaitForInterrupt,
    /// HVC from AArch64.
    Hvc64,
    /// SMC from AArch64, trapped by HCR_EL2.TSC.
    Smc64,
    /// MSR/MRS/system instruction trapped.
    SystemRegister,
    /// Instruction abort from a lower exception level (stage-2 fault on fetch).
    InstructionAbortLower,
    /// Instruction abort taken at EL2 itself.
    InstructionAbortSame,
    /// Data abort from a lower exception level (stage-2 fault on access).
    DataAbortLower,
    /// Data abort taken at EL2 itself.
    DataAbortSame,
    /// Any other class; the raw value is kept for reports.
    Other(u8),
}

impl ExceptionClass {
    /// Decodes ESR.EC (bits 31:26).
    pub fn from_esr(esr: u64) -> Self {
        match ((esr >> 26) & 0x3f) as u8 {
            0x01 => Self::WaitForInterrupt,
            0x16 => Self::Hvc64,
            0x17 => Self::Smc64,
            0x18 => Self::SystemRegister,
            0x20 => Self::InstructionAbortLower,
            0x21 => Self::InstructionAbortSame,
            0x24 => Self::DataAbortLower,
            0x25 => Self::DataAbortSame,
            other => Self::Other(other),
        }
    }

    /// A short name for reports.
    pub fn name(self) -> &'static str {
        match self {
            Self::WaitForInterrupt => "WFI/WFE",
            Self::Hvc64 => "HVC64",
            Self::Smc64 => "SMC64",
            Self::SystemRegister => "MSR/MRS trap",
            Self::InstructionAbortLower => "instruction abort from lower EL",
            Self::InstructionAbortSame => "instruction abort at EL2",
            Self::DataAbortLower => "data abort from lower EL",
            Self::DataAbortSame => "data abort at EL2",
            Self::Other(_) => "other",
        }
    }
}

/// The syndrome of a data abort (ESR.ISS for EC 0x24/0x25).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DataAbort {
    /// ISV: the access fields below (size, register, sign) are valid.
    pub valid_syndrome: bool,
    /// Access size in bytes (1, 2, 4, 8).
    pub access_size: u8,
    /// The load sign-extends.
    pub sign_extend: bool,
    /// Register transferred (31 = XZR).
    pub register: u8,
    /// The register is 64-bit (else 32-bit).
    pub sixty_four: bool,
    /// The access is a write.
    pub write: bool,
    /// The fault happened on a stage-1 table walk (S1PTW).
    pub stage1_walk: bool,
    /// Data fault status code.
    pub status: u8,
}

impl DataAbort {
    /// Decodes the ISS of a data abort.
    pub fn from_esr(esr: u64) -> Self {
        Self {
            valid_syndrome: esr & (1 << 24) != 0,
            access_size: 1 << ((esr >> 22) & 0b11),
            sign_extend: esr & (1 << 21) != 0,
            register: ((esr >> 16) & 0x1f) as u8,
            sixty_four: esr & (1 << 15) != 0,
            write: esr & (1 << 6) != 0,
            stage1_walk: esr & (1 << 7) != 0,
            status: (esr & 0x3f) as u8,
        }
    }
}

/// Data/instruction fault status code names, for reports.
pub fn fault_status_name(status: u8) -> &'static str {
    match status {
        0x00..=0x03 => "address size fault",
        0x04..=0x07 => "translation fault",
        0x09..=0x0b => "access flag fault",
        0x0d..=0x0f => "permission fault",
        0x10 => "synchronous external abort",
        0x21 => "alignment fault",
        _ => "other fault",
    }
}

/// The faulting IPA from HPFAR_EL2 (page) and FAR_EL2 (offset in page).
pub fn fault_ipa(hpfar: u64, far: u64) -> u64 {
    ((hpfar >> 4) & 0xff_ffff_ffff) << 12 | (far & 0xfff)
}

/// A one-line description of a syndrome: class, fault status and direction.
pub struct Syndrome(pub u64);

impl fmt::Display for Syndrome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let class = ExceptionClass::from_esr(self.0);
        write!(
            f,
            "ESR {:#010x}: EC {:#04x} ({})",
            self.0,
            (self.0 >> 26) & 0x3f,
            class.name()
        )?;
        match class {
            ExceptionClass::DataAbortLower | ExceptionClass::DataAbortSame => {
                let abort = DataAbort::from_esr(self.0);
                write!(
                    f,
                    ", {} on {}",
                    fault_status_name(abort.status),
                    if abort.write { "write" } else { "read" }
                )
            }
            ExceptionClass::InstructionAbortLower | ExceptionClass::InstructionAbortSame => {
                write!(f, ", {} on fetch", fault_status_name((self.0 & 0x3f) as u8))
            }
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::format;

    #[test]
    fn decodes_a_guest_str_w1_abort() {
        // EC 0x24, IL, ISV, SAS=2 (word), SRT=1, WnR, DFSC translation fault level 3.
        let esr = 0x24 << 26 | 1 << 25 | 1 << 24 | 2 << 22 | 1 << 16 | 1 << 6 | 0x07;
        assert_eq!(
            ExceptionClass::from_esr(esr),
            ExceptionClass::DataAbortLower
        );
        let abort = DataAbort::from_esr(esr);
        assert!(abort.valid_syndrome && abort.write);
        assert_eq!(
            (abort.access_size, abort.register, abort.status),
            (4, 1, 0x07)
        );
        assert_eq!(
            format!("{}", Syndrome(esr)),
            "ESR 0x93810047: EC 0x24 (data abort from lower EL), translation fault on write"
        );
    }

    #[test]
    fn fault_ipa_combines_hpfar_page_and_far_offset() {
        assert_eq!(
            fault_ipa(0x0905_0000 >> 8, 0xffff_0000_0000_0abc),
            0x0905_0abc
        );
    }
}
