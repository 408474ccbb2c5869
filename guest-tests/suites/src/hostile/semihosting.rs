//! Semihosting (`hlt #0xf000`) must not reach the host from an untrusted guest: from EL0 and
//! from EL1 it is UNDEFINED (EC 0x0). Calls: SYS_SYSTEM (0x12) with the shell no-op ":" as its
//! command, then SYS_EXIT (0x18) with exit code 94, last, because where semihosting is on it
//! ends QEMU (status 94 then points at this test).

use alloc::format;
use alloc::string::String;

use guest_rt::mmu::{self, MemoryType};
use guest_rt::probe;
use guest_rt::{check, check_eq};

use super::stubs;

const SYS_SYSTEM: u64 = 0x12;
const SYS_EXIT: u64 = 0x18;
/// ADP_Stopped_ApplicationExit.
const APPLICATION_EXIT: u64 = 0x2_0026;
const EXIT_CODE: u64 = 94;

/// A parameter block EL0 and EL1 can both read: `[words..., ":"]`. Returns (EL1 VA, EL0 VA).
fn parameters(call: u64) -> (u64, u64) {
    let page = crate::edu::page();
    let words: &mut [u64] =
        // SAFETY: the page is 4096 bytes, page-aligned and exclusively ours.
        unsafe { core::slice::from_raw_parts_mut(page.as_mut_ptr() as *mut u64, 512) };
    let user = mmu::map_user_alias(page.as_ptr() as usize, 4096, MemoryType::NormalWriteBack)
        .expect("mapping the parameter block for EL0");
    let base = page.as_ptr() as u64;
    // The command string at offset 64 (EL1 address; EL0 gets its own below).
    words[8] = u64::from(b':');
    if call == SYS_EXIT {
        words[0] = APPLICATION_EXIT;
        words[1] = EXIT_CODE;
        words[2] = APPLICATION_EXIT;
        words[3] = EXIT_CODE;
    } else {
        words[0] = base + 64;
        words[1] = 1;
        words[2] = user as u64 + 64;
        words[3] = 1;
    }
    (base, user as u64 + 16)
}

fn from_el1(call: u64) -> Result<(), String> {
    let (block, _) = parameters(call);
    // SAFETY: the `hlt; ret` stub: UNDEF resumes at the caller; semihosting returns through
    // the `ret` with x0 = its result.
    let result = unsafe { probe::call(stubs::base() + stubs::HLT_RET, call, block) };
    let Err(abort) = result else {
        return Err(format!(
            "hlt #0xf000 with w0 = {call:#x} at EL1 was a semihosting call (x0 = {:#x})",
            result.unwrap_or(0)
        ));
    };
    check_eq!(
        abort.class(),
        0,
        "exception class of hlt #0xf000 at EL1 ({:?})",
        abort
    );
    super::alive("hlt at EL1")
}

fn from_el0(call: u64) -> Result<(), String> {
    let (_, block) = parameters(call);
    let exit = stubs::run_at_el0(stubs::HLT_SVC, call, block);
    check!(
        !exit.is_svc(),
        "hlt #0xf000 with w0 = {call:#x} at EL0 was a semihosting call (x0 = {:#x})",
        exit.x0
    );
    check_eq!(
        exit.class(),
        0,
        "exception class of hlt #0xf000 at EL0 ({:x?})",
        exit
    );
    check_eq!(exit.vector, 0x400, "vector of hlt #0xf000 at EL0");
    super::alive("hlt at EL0")
}

pub(crate) fn sys_exit_from_el0_is_undefined() -> Result<(), String> {
    from_el0(SYS_EXIT)
}

pub(crate) fn sys_system_from_el0_is_undefined() -> Result<(), String> {
    from_el0(SYS_SYSTEM)
}

pub(crate) fn sys_system_from_el1_is_undefined() -> Result<(), String> {
    from_el1(SYS_SYSTEM)
}

pub(crate) fn sys_exit_from_el1_is_undefined() -> Result<(), String> {
    from_el1(SYS_EXIT)
}
