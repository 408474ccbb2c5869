//! The Linux guest's virtio-blk disk: made before the run, attached behind the SMMU, and
//! checked from the host after QEMU exits.
//!
//! The image is 1 MiB. The runner writes its first 4 KiB: [`HOST_LINES`] lines
//! `"stagehand virtio-blk host NNNNN\n"` (32 bytes each). The guest's hook
//! (guest-tests/linux/init.d/50-virtio-blk; keep the two in step) reads them, writes
//! [`GUEST_LINES`] lines `"stagehand virtio-blk linuxNNNNN\n"` at [`GUEST_OFFSET`] and reads them
//! back. After the run the host finds exactly that: its own lines, the guest's lines, and zeros
//! everywhere else.

use std::path::{Path, PathBuf};

use crate::protocol::TestOutcome;
use crate::qemu::qemu_escape;

/// Bytes of the image.
pub const IMAGE_BYTES: usize = 1 << 20;
/// Prefix (26 bytes) of the lines the host writes at offset 0.
pub const HOST_PREFIX: &str = "stagehand virtio-blk host ";
/// Lines the host writes (4 KiB).
pub const HOST_LINES: usize = 128;
/// Prefix (26 bytes) of the lines the guest writes.
pub const GUEST_PREFIX: &str = "stagehand virtio-blk linux";
/// Lines the guest writes (64 KiB).
pub const GUEST_LINES: usize = 2048;
/// Where the guest writes them.
pub const GUEST_OFFSET: usize = 64 << 10;

/// `count` lines `"<prefix><5-digit number>\n"`, numbered from 0, as the hook's awk prints them.
pub fn lines(prefix: &str, count: usize) -> Vec<u8> {
    (0..count)
        .flat_map(|i| format!("{prefix}{i:05}\n").into_bytes())
        .collect()
}

/// The image as the runner creates it.
pub fn initial_image() -> Vec<u8> {
    let mut image = lines(HOST_PREFIX, HOST_LINES);
    image.resize(IMAGE_BYTES, 0);
    image
}

/// The image as it must be after the guest's hook ran.
pub fn expected_image() -> Vec<u8> {
    let mut image = initial_image();
    let guest = lines(GUEST_PREFIX, GUEST_LINES);
    image[GUEST_OFFSET..GUEST_OFFSET + guest.len()].copy_from_slice(&guest);
    image
}

/// Writes a fresh image for suite `suite` into `dir` and returns its path.
///
/// # Errors
/// The I/O error, if the file cannot be written.
pub fn create(dir: &Path, suite: &str) -> std::io::Result<PathBuf> {
    let path = dir.join(format!("{suite}.disk.img"));
    std::fs::write(&path, initial_image())?;
    Ok(path)
}

/// The QEMU arguments that attach `image` as a modern virtio-blk PCI device whose DMA goes
/// through the IOMMU (without `iommu_platform=on`, QEMU lets the device bypass the SMMU).
pub fn qemu_args(image: &Path) -> Vec<String> {
    vec![
        "-drive".into(),
        format!(
            "if=none,id=d0,file={},format=raw",
            qemu_escape(&image.to_string_lossy())
        ),
        "-device".into(),
        "virtio-blk-pci,drive=d0,iommu_platform=on,disable-legacy=on".into(),
    ]
}

/// Where `actual` first differs from `expected`, described for a failure message.
fn first_difference(actual: &[u8], expected: &[u8]) -> Option<String> {
    if actual.len() != expected.len() {
        return Some(format!(
            "the image is {} bytes, expected {}",
            actual.len(),
            expected.len()
        ));
    }
    let offset = actual.iter().zip(expected).position(|(a, e)| a != e)?;
    let area = if offset < HOST_LINES * 32 {
        "the host's lines"
    } else if (GUEST_OFFSET..GUEST_OFFSET + GUEST_LINES * 32).contains(&offset) {
        "the guest's lines"
    } else {
        "an area nobody should write"
    };
    let end = (offset + 16).min(actual.len());
    Some(format!(
        "byte {offset:#x} ({area}) is {:#04x}, expected {:#04x}; bytes there: {:?}",
        actual[offset],
        expected[offset],
        String::from_utf8_lossy(&actual[offset..end])
    ))
}

/// `<suite>/virtio-blk-host-check`: the image holds what the host and the guest wrote and
/// nothing else.
pub fn check_image(suite: &str, image: &Path) -> TestOutcome {
    let name = format!("{suite}/virtio-blk-host-check");
    match std::fs::read(image) {
        Ok(actual) => match first_difference(&actual, &expected_image()) {
            None => TestOutcome::pass(name),
            Some(why) => TestOutcome::fail(name, format!("{why} ({})", image.display())),
        },
        Err(error) => TestOutcome::fail(name, format!("{}: {error}", image.display())),
    }
}

/// `<suite>/virtio-blk-behind-smmu`: the hypervisor's log shows a virtio-blk function
/// (1af4:1042) assigned in `mode` (`Shared` or `Strict`), and no SMMU fault was audited during
/// the run.
pub fn check_hypervisor_log(suite: &str, log: &str, mode: &str) -> TestOutcome {
    let name = format!("{suite}/virtio-blk-behind-smmu");
    let assigned = log.lines().any(|line| {
        line.contains("SMMU: ")
            && line.contains(" 1af4:1042 ")
            && line.contains(&format!(": {mode}"))
    });
    if !assigned {
        return TestOutcome::fail(
            name,
            format!(
                "the hypervisor's log has no line assigning virtio-blk (1af4:1042) in {mode} mode"
            ),
        );
    }
    match log
        .lines()
        .find(|line| line.contains("AUDIT v1 ") && line.contains(" kind=smmu-fault "))
    {
        Some(line) => TestOutcome::fail(
            name,
            format!("an SMMU fault was audited during the run: {}", line.trim()),
        ),
        None => TestOutcome::pass(name),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_32_bytes_as_the_hook_expects() {
        assert_eq!(HOST_PREFIX.len(), 26);
        assert_eq!(GUEST_PREFIX.len(), 26);
        let host = lines(HOST_PREFIX, HOST_LINES);
        assert_eq!(host.len(), 4096);
        assert_eq!(&host[..32], b"stagehand virtio-blk host 00000\n");
        assert_eq!(&host[4064..], b"stagehand virtio-blk host 00127\n");
        let guest = lines(GUEST_PREFIX, GUEST_LINES);
        assert_eq!(guest.len(), 64 << 10);
        assert_eq!(&guest[32..64], b"stagehand virtio-blk linux00001\n");
        // The hook must use the same prefixes and counts.
        let hook = include_str!("../../linux/init.d/50-virtio-blk");
        assert!(hook.contains(&format!("blk_lines \"{HOST_PREFIX}\" {HOST_LINES} ")));
        assert!(hook.contains(&format!("blk_lines \"{GUEST_PREFIX}\" {GUEST_LINES} ")));
        assert!(hook.contains("bs=4096 seek=16 ") && GUEST_OFFSET == 16 * 4096);
        // So must the demo disk scripts/build-linux-module writes.
        let script = include_str!("../../../scripts/build-linux-module");
        assert!(script.contains(&format!(
            "i < {HOST_LINES}; i++) printf \"{HOST_PREFIX}%05d\\n\""
        )));
        assert!(script.contains("truncate -s 1M ") && IMAGE_BYTES == 1 << 20);
    }

    #[test]
    fn the_check_finds_each_kind_of_difference() {
        assert_eq!(first_difference(&expected_image(), &expected_image()), None);
        let untouched = initial_image();
        let why = first_difference(&untouched, &expected_image()).unwrap();
        assert!(why.starts_with("byte 0x10000 (the guest's lines)"), "{why}");
        let mut stray = expected_image();
        stray[IMAGE_BYTES - 1] = 1;
        assert!(first_difference(&stray, &expected_image())
            .unwrap()
            .contains("an area nobody should write"));
        let mut host = expected_image();
        host[5] = b'X';
        assert!(first_difference(&host, &expected_image())
            .unwrap()
            .contains("the host's lines"));
        assert!(first_difference(&host[..10], &expected_image())
            .unwrap()
            .contains("bytes, expected"));
    }

    #[test]
    fn qemu_gets_the_device_behind_the_iommu() {
        let args = qemu_args(Path::new("logs/a,b.img")).join(" ");
        assert_eq!(
            args,
            "-drive if=none,id=d0,file=logs/a,,b.img,format=raw \
             -device virtio-blk-pci,drive=d0,iommu_platform=on,disable-legacy=on"
        );
    }

    #[test]
    fn the_log_check_wants_the_assignment_and_no_fault() {
        let assigned = "[stagehand INFO ] SMMU: 00:01.0 1af4:1042 StreamID 0x8: Shared, VMID 1\n";
        assert!(check_hypervisor_log("linux", assigned, "Shared")
            .failure
            .is_none());
        assert!(check_hypervisor_log("linux", assigned, "Strict")
            .failure
            .is_some());
        assert!(check_hypervisor_log("linux", "", "Shared")
            .failure
            .is_some());
        let fault = format!(
            "{assigned}[stagehand INFO ] AUDIT v1 seq=9 t=1 vm=1 vcpu=0 kind=smmu-fault flags=0x40 ...\n"
        );
        assert!(check_hypervisor_log("linux", &fault, "Shared")
            .failure
            .is_some());
    }
}
