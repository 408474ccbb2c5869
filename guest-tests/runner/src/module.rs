//! Checks of a Linux row that loads the stagehand kernel module (`stagehand.module=1`), made
//! from the guest's console and the hypervisor's audit stream after QEMU exits.

use crate::protocol::TestOutcome;

/// What the guest hook 90-stagehand prints before one `dma-map` line it read from debugfs
/// `stagehand/audit`.
pub const SAMPLE_MARKER: &str = "STAGEHAND-AUDIT-SAMPLE ";

/// Two outcomes:
/// - `<suite>/module-audit-format`: the line the guest read through the module (AUDIT_READ,
///   formatted in the kernel) is a well-formed record line and appears, byte for byte, in the
///   hypervisor's own stream;
/// - `<suite>/module-dma-no-refusals`: the stream has DMA mappings (the driver's DMA went
///   through the calls) and no refused record of a stagehand call (function IDs 0xc600_00xx),
///   (DEV_INFO's end of list aside), so the module's traffic was well-formed. Other refusals
///   (Linux probing SMCCC services the hypervisor does not offer) are not the module's.
pub fn check(suite: &str, console: &str, hypervisor_log: &str) -> Vec<TestOutcome> {
    vec![
        check_sample(suite, console, hypervisor_log),
        check_refusals(suite, hypervisor_log),
    ]
}

fn check_sample(suite: &str, console: &str, hypervisor_log: &str) -> TestOutcome {
    let name = format!("{suite}/module-audit-format");
    let Some(sample) = console
        .lines()
        .find_map(|line| line.trim_end().split_once(SAMPLE_MARKER).map(|(_, s)| s))
    else {
        return TestOutcome::fail(name, "the guest printed no STAGEHAND-AUDIT-SAMPLE line");
    };
    if let Err(error) = stagehand_abi::audit::parse_line(sample) {
        return TestOutcome::fail(name, format!("{error}: {sample}"));
    }
    if hypervisor_log
        .lines()
        .any(|line| line.trim_end().ends_with(sample))
    {
        TestOutcome::pass(name)
    } else {
        TestOutcome::fail(
            name,
            format!("the guest's line is not in the hypervisor's stream: {sample}"),
        )
    }
}

/// Whether an audit line is a refusal of a stagehand call. DEV_INFO answers NO_DEVICE (audited)
/// for the index past the last device: that is how the ABI ends the list, not a refusal of
/// well-formed traffic.
fn is_stagehand_refusal(line: &str) -> bool {
    let end_of_device_list = line.contains(" fn=0xc6000030 ") && line.contains(" status=-9 ");
    line.contains("AUDIT v1 ")
        && line.contains(" kind=refused ")
        && line.contains(" fn=0xc60000")
        && !end_of_device_list
}

fn check_refusals(suite: &str, hypervisor_log: &str) -> TestOutcome {
    let name = format!("{suite}/module-dma-no-refusals");
    let maps = hypervisor_log
        .lines()
        .filter(|line| line.contains("AUDIT v1 ") && line.contains(" kind=dma-map "))
        .count();
    let refusals: Vec<&str> = hypervisor_log
        .lines()
        .filter(|line| is_stagehand_refusal(line))
        .collect();
    match (maps, refusals.first()) {
        (0, _) => TestOutcome::fail(
            name,
            "no dma-map record: the DMA did not go through stagehand",
        ),
        (_, Some(first)) => TestOutcome::fail(
            name,
            format!(
                "{} refused stagehand calls, the first: {}",
                refusals.len(),
                first.trim()
            ),
        ),
        _ => TestOutcome::pass(name),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAP: &str = "AUDIT v1 seq=40 t=5 vm=1 vcpu=1 kind=dma-map flags=0x0 fn=0xc6000031 ipa=0x4d0c1000 size=0x10 old=wb new=wb cmo=clean:1 tlbi=-:0 smmu=2:0x14 sid=0x8 access=- dir=to-device status=0 detail=0x7 tag=0x0 dropped=0 hash=0x0123456789abcdef";

    #[test]
    fn the_sample_must_be_in_the_stream() {
        let console = format!("x\nSTAGEHAND-AUDIT-SAMPLE {MAP}\n");
        let log = format!("[stagehand INFO ] boot\n{MAP}\n");
        assert!(check_sample("s", &console, &log).failure.is_none());
        assert!(check_sample("s", &console, "").failure.is_some());
        assert!(check_sample("s", "", &log).failure.is_some());
        let altered = console.replace("size=0x10", "size=0x11");
        assert!(check_sample("s", &altered, &log).failure.is_some());
        let malformed = "STAGEHAND-AUDIT-SAMPLE AUDIT v1 seq=1\n";
        assert!(check_sample("s", malformed, malformed).failure.is_some());
    }

    #[test]
    fn only_refusals_of_stagehand_calls_count() {
        let trng = "AUDIT v1 seq=3 t=1 vm=1 vcpu=0 kind=refused flags=0x0 fn=0x84000050 ipa=0x0";
        let map_refused =
            "AUDIT v1 seq=9 t=1 vm=1 vcpu=0 kind=refused flags=0x0 fn=0xc6000031 ipa=0x0";
        assert!(check_refusals("s", &format!("{MAP}\n{trng}\n"))
            .failure
            .is_none());
        assert!(check_refusals("s", &format!("{MAP}\n{map_refused}\n"))
            .failure
            .is_some());
        assert!(check_refusals("s", trng).failure.is_some());
        let end_of_list = "AUDIT v1 seq=2 t=1 vm=1 vcpu=1 kind=refused flags=0x0 fn=0xc6000030 ipa=0x2 size=0x0 status=-9 detail=0x0";
        assert!(check_refusals("s", &format!("{MAP}\n{end_of_list}\n"))
            .failure
            .is_none());
        let bad_index = end_of_list.replace("status=-9", "status=-3");
        assert!(check_refusals("s", &format!("{MAP}\n{bad_index}\n"))
            .failure
            .is_some());
    }
}
