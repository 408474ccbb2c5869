//! The host-side check of the DMA suites: a device programmed to reach past guest RAM was
//! blocked *and* the hypervisor's own audit stream says so, independently of what the guest
//! read back through AUDIT_READ.

use std::path::Path;

use crate::protocol::TestOutcome;

/// Suites whose hypervisor log gets the check.
pub const CHECKED: &[&str] = &["dma", "dma-shared", "dma-nc-smmu", "dma-shared-nc-smmu"];
/// edu's StreamID (00:02.0).
pub const EDU_STREAM_ID: u64 = 0x10;
/// End of guest RAM in the checked rows (`ram=256M` from IPA 0x4000_0000).
pub const GUEST_RAM_END: u64 = 0x4000_0000 + (256 << 20);

/// What the hypervisor's SMMU line ends with when it treats the SMMU as non-coherent (smmu.rs).
pub const NONCOHERENT_SMMU_SAYS: &str = "-entry event queue, non-coherent";

/// Whether suite `name` runs with `smmu-coherent=off`.
fn noncoherent_smmu(name: &str) -> bool {
    crate::suites::find(name).is_some_and(|suite| suite.config.contains(&"smmu-coherent=off"))
}

/// Whether suite `name` gets the check.
pub fn applies(name: &str) -> bool {
    CHECKED.contains(&name)
}

/// Value of field `name` (`name=value`) of an audit line.
fn field<'a>(line: &'a str, name: &str) -> Option<&'a str> {
    line.split_whitespace()
        .find_map(|word| word.strip_prefix(name)?.strip_prefix('='))
}

fn hex(value: &str) -> Option<u64> {
    u64::from_str_radix(value.strip_prefix("0x")?, 16).ok()
}

/// Whether `line` is an `smmu-fault` audit record of edu at or past the end of guest RAM.
fn is_fault_past_ram(line: &str) -> bool {
    line.contains("AUDIT v1 ")
        && field(line, "kind") == Some("smmu-fault")
        && field(line, "sid").and_then(hex) == Some(EDU_STREAM_ID)
        && field(line, "ipa")
            .and_then(hex)
            .is_some_and(|ipa| ipa >= GUEST_RAM_END)
}

/// `<suite>/smmu-fault-audited`: `<logs>/<suite>.hyp.log` holds an `smmu-fault` record of edu
/// past guest RAM, and, for a row with `smmu-coherent=off`, says the SMMU was driven as
/// non-coherent (so the cleans ran).
pub fn check(suite: &str, logs: &Path) -> TestOutcome {
    let name = format!("{suite}/smmu-fault-audited");
    let path = logs.join(format!("{suite}.hyp.log"));
    match std::fs::read(&path) {
        Ok(bytes) => {
            let text = String::from_utf8_lossy(&bytes);
            if noncoherent_smmu(suite) && !text.contains(NONCOHERENT_SMMU_SAYS) {
                TestOutcome::fail(
                    name,
                    format!(
                        "{} does not say {NONCOHERENT_SMMU_SAYS:?}: the SMMU was not driven as non-coherent",
                        path.display()
                    ),
                )
            } else if text.lines().any(is_fault_past_ram) {
                TestOutcome::pass(name)
            } else {
                TestOutcome::fail(
                    name,
                    format!(
                        "no AUDIT line kind=smmu-fault sid={EDU_STREAM_ID:#x} with ipa >= {GUEST_RAM_END:#x} in {}",
                        path.display()
                    ),
                )
            }
        }
        Err(error) => TestOutcome::fail(name, format!("{}: {error}", path.display())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LINE: &str =
        "[stagehand WARN ] AUDIT v1 seq=80 t=5 vm=1 vcpu=0 kind=smmu-fault flags=0x40 \
        fn=0x00000000 ipa=0x50100000 size=0x1000 old=- new=- cmo=-:0 tlbi=-:0 smmu=0:0x0 sid=0x10 \
        access=write dir=- status=0 detail=0x10 tag=0x0 dropped=0 hash=0x0123456789abcdef";

    #[test]
    fn finds_a_fault_of_edu_past_guest_ram() {
        assert!(is_fault_past_ram(LINE));
        assert!(!is_fault_past_ram(
            &LINE.replace("ipa=0x50100000", "ipa=0x41100000")
        ));
        assert!(!is_fault_past_ram(&LINE.replace("sid=0x10", "sid=0x8")));
        assert!(!is_fault_past_ram(
            &LINE.replace("kind=smmu-fault", "kind=dma-map")
        ));
        assert!(!is_fault_past_ram(&LINE.replace("AUDIT v1", "AUDIT v2")));
    }

    #[test]
    fn the_checked_rows_exist_with_the_ram_size_assumed() {
        for name in CHECKED {
            let suite = crate::suites::find(name).expect("a row");
            assert!(suite.config.contains(&"ram=256M"), "{name}");
        }
        assert!(noncoherent_smmu("dma-nc-smmu") && noncoherent_smmu("dma-shared-nc-smmu"));
        assert!(!noncoherent_smmu("dma") && !noncoherent_smmu("dma-shared"));
        let outcome = check("dma", Path::new("/nonexistent"));
        assert!(outcome.failure.is_some());
    }
}
