//! The suite table: what each guest needs from QEMU and from the hypervisor's configuration.

use std::path::{Path, PathBuf};

use crate::qemu::{Gic, Machine};

/// Length of the initrd generated for suite `dt`. Keep in step with `DT_INITRD_LEN` in
/// guest-tests/suites/src/lib.rs.
pub const DT_INITRD_LEN: usize = 65_831;

/// Byte `index` of the initrd generated for suite `dt`. Keep in step with `dt_initrd_byte` in
/// guest-tests/suites/src/lib.rs.
pub fn dt_initrd_byte(index: usize) -> u8 {
    ((index * 7) % 251) as u8
}

/// The kernel command line suite `dt` gets. Keep in step with `DT_BOOTARGS` in
/// guest-tests/suites/src/lib.rs.
pub const DT_BOOTARGS: &str = "stagehand.suite=dt answer=42 quiet";

/// Environment variable naming the Linux kernel image for suite `linux`.
pub const LINUX_KERNEL_VAR: &str = "STAGEHAND_LINUX_KERNEL";
/// Environment variable naming the initramfs for suite `linux`.
pub const LINUX_INITRD_VAR: &str = "STAGEHAND_LINUX_INITRD";

/// Configuration items every suite passes to the hypervisor. (None chooses how it exits: it
/// always writes its exit status line and powers off; semihosting is never enabled.)
pub const COMMON_CONFIG: &[&str] = &["log=debug"];

/// Where a suite's guest image comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Image {
    /// `<guests>/<name>.elf`, built by scripts/build.
    TestGuest,
    /// A Linux kernel and initramfs named by environment variables.
    Linux,
}

/// An initrd for the guest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Initrd {
    /// None.
    None,
    /// The pattern file suite `dt` checks, generated into the log directory.
    DtPattern,
    /// The one named by [`LINUX_INITRD_VAR`].
    Linux,
}

/// A disk for the guest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Disk {
    /// None.
    None,
    /// The virtio-blk disk of the Linux guest's hook (guest-tests/linux/init.d/50-virtio-blk),
    /// behind the SMMU: see [`crate::disk`].
    VirtioBlk,
    /// The Linux I/O rows' random-data disk and network card, both behind the SMMU, driven by
    /// the hooks 55-virtio-blk-io and 60-virtio-net and checked from the host: see
    /// [`crate::linux_io`].
    LinuxIo,
}

/// One row of the suite table.
#[derive(Clone, Copy, Debug)]
pub struct Suite {
    /// Row name: the prefix of the TEST lines the runner prints and of the log files. The
    /// guest's own name when the row runs it on the default machine, else the guest's name and
    /// the board, e.g. `linux-a53-gicv2`.
    pub name: &'static str,
    /// The guest: the test guest binary's name (`<guests>/<guest>.elf`), and the prefix of the
    /// TEST and RESULT lines it prints (`linux` for Linux), which the runner renames to `name`.
    pub guest: &'static str,
    /// The board it runs on.
    pub machine: Machine,
    /// `-smp`.
    pub cpus: u32,
    /// `-m`.
    pub memory: &'static str,
    /// Configuration items beyond [`COMMON_CONFIG`].
    pub config: &'static [&'static str],
    /// The guest image.
    pub image: Image,
    /// The initrd, if any.
    pub initrd: Initrd,
    /// `-append`, if any.
    pub append: Option<&'static str>,
    /// Seconds before QEMU is killed.
    pub timeout_secs: u64,
    /// Extra QEMU arguments.
    pub extra_args: &'static [&'static str],
    /// A disk, created before the run and checked after it.
    pub disk: Disk,
}

/// QEMU's `edu` DMA engine at 00:02.0, with a mask that does not clamp IOVAs.
const EDU: &[&str] = &["-device", "edu,addr=02.0,dma_mask=0xffffffffffffffff"];

const fn guest(name: &'static str, cpus: u32, memory: &'static str) -> Suite {
    Suite {
        name,
        guest: name,
        machine: Machine::DEFAULT,
        cpus,
        memory,
        config: &[],
        image: Image::TestGuest,
        initrd: Initrd::None,
        append: None,
        timeout_secs: 60,
        extra_args: &[],
        disk: Disk::None,
    }
}

/// Suite `attr` on the default machine (`-cpu max` has FEAT_S2FWB).
const ATTR: Suite = Suite {
    config: &["ram=512M"],
    append: Some("stagehand.expect_fwb=on"),
    timeout_secs: 120,
    ..guest("attr", 4, "1G")
};

/// Suite `attr-nofwb`: the same guest with `fwb=off`.
const ATTR_NOFWB: Suite = Suite {
    config: &["ram=512M", "fwb=off"],
    append: Some("stagehand.expect_fwb=off"),
    timeout_secs: 120,
    ..guest("attr-nofwb", 4, "1G")
};

/// A board: `virt` with EL2, CPU model `cpu`, GIC `gic` and an SMMU or not.
const fn board(cpu: &'static str, gic: Gic, smmu: bool) -> Machine {
    Machine { cpu, gic, smmu }
}

/// The Linux row on the default machine; the variants on other boards start from it.
const LINUX: Suite = Suite {
    image: Image::Linux,
    initrd: Initrd::Linux,
    append: Some("console=ttyAMA0 stagehand.expect_cpus=2 stagehand.blk_test=1 panic=-1"),
    timeout_secs: 180,
    disk: Disk::VirtioBlk,
    ..guest("linux", 2, "1G")
};

/// The command line of a Linux row without a disk: on a board without an SMMU the hypervisor
/// cannot contain DMA (a device would write guest IPAs as physical addresses), so no row
/// gives such a board a DMA-capable device.
const LINUX_NO_DISK_APPEND: &str = "console=ttyAMA0 stagehand.expect_cpus=2 panic=-1";

/// The Linux I/O rows' command line; the runner adds the seed and the network items
/// ([`crate::linux_io::append_items`]). `loglevel=4` keeps kernel messages from splitting the
/// hooks' manifest lines.
const LINUX_IO_APPEND: &str = "console=ttyAMA0 stagehand.expect_cpus=2 panic=-1 loglevel=4";

/// The Linux I/O row in shared mode (the hypervisor's default: each device's SMMU stage 2 is
/// the guest's RAM), without the kernel module: real virtio-blk and virtio-net drivers.
const LINUX_IO: Suite = Suite {
    name: "linux-io",
    append: Some(LINUX_IO_APPEND),
    timeout_secs: 240,
    disk: Disk::LinuxIo,
    ..LINUX
};

/// The Linux I/O row with both devices strict and declared non-coherent, their DMA routed
/// through the stagehand kernel module (loaded by the hook 10-stagehand before virtio_pci).
const LINUX_IO_STRICT: Suite = Suite {
    name: "linux-io-strict",
    config: &["devices=00:03.0/strict/noncoherent+00:04.0/strict/noncoherent"],
    append: Some("console=ttyAMA0 stagehand.expect_cpus=2 panic=-1 loglevel=4 stagehand.module=1"),
    ..LINUX_IO
};

/// The negative row: the disk at 00:03.0 strict and non-coherent through the module, with a
/// mapping quota far below what parallel 1 MiB direct I/O needs (hook 58-dma-quota). The disk
/// is QEMU's null block device (writes vanish, reads give zeros): the row checks that I/O ends,
/// not what it stores.
const LINUX_IO_QUOTA: Suite = Suite {
    name: "linux-io-quota",
    config: &["devices=00:03.0/strict/noncoherent", "dma-mappings=64"],
    append: Some(
        "console=ttyAMA0 stagehand.expect_cpus=2 panic=-1 loglevel=4 stagehand.quota_test=1",
    ),
    extra_args: &[
        "-blockdev",
        "driver=null-co,node-name=q0,size=67108864,read-zeroes=on",
        "-device",
        "virtio-blk-pci,drive=q0,addr=03.0,iommu_platform=on,disable-legacy=on",
    ],
    disk: Disk::None,
    timeout_secs: 180,
    ..LINUX
};

/// The command line of the Linux row with the stagehand module: `stagehand.module=1` makes the
/// init hooks load it (10-stagehand) and check it at the end (90-stagehand).
const LINUX_MODULE_APPEND: &str =
    "console=ttyAMA0 stagehand.expect_cpus=2 stagehand.blk_test=1 stagehand.module=1 panic=-1";

/// Every suite, in the order they run.
pub const SUITES: &[Suite] = &[
    Suite {
        config: &["ram=256M"],
        initrd: Initrd::DtPattern,
        append: Some(DT_BOOTARGS),
        ..guest("dt", 2, "512M")
    },
    guest("smccc", 4, "512M"),
    guest("discovery", 1, "512M"),
    guest("audit", 1, "512M"),
    guest("containment", 1, "512M"),
    guest("gic", 2, "512M"),
    guest("rt", 1, "512M"),
    guest("demo", 4, "512M"),
    // The attribute manager, twice: with FEAT_S2FWB encodings (the default) and without. The
    // guest reads what FEATURES must say from its command line.
    ATTR,
    ATTR_NOFWB,
    Suite {
        extra_args: &["-device", "edu,addr=02.0,dma_mask=0xffffffffffffffff"],
        ..guest("smmu", 1, "512M")
    },
    // The DMA calls with edu, twice: strict and declared non-coherent, then in the default
    // shared mode (coherent). The guest reads the mode it must see from its command line.
    Suite {
        config: &["ram=256M", "devices=00:02.0/strict/noncoherent"],
        append: Some("stagehand.expect_dma=strict/noncoherent"),
        extra_args: &["-device", "edu,addr=02.0,dma_mask=0xffffffffffffffff"],
        ..guest("dma", 4, "512M")
    },
    Suite {
        config: &["ram=256M"],
        append: Some("stagehand.expect_dma=shared/coherent"),
        extra_args: &["-device", "edu,addr=02.0,dma_mask=0xffffffffffffffff"],
        ..guest("dma-shared", 4, "512M")
    },
    // Both again with the SMMU treated as not snooping the caches: every clean of the stream
    // table, queues and tables runs (QEMU's SMMU is coherent, so the data would not tell).
    Suite {
        config: &[
            "ram=256M",
            "devices=00:02.0/strict/noncoherent",
            "smmu-coherent=off",
        ],
        append: Some("stagehand.expect_dma=strict/noncoherent"),
        extra_args: &["-device", "edu,addr=02.0,dma_mask=0xffffffffffffffff"],
        ..guest("dma-nc-smmu", 4, "512M")
    },
    Suite {
        config: &["ram=256M", "smmu-coherent=off"],
        append: Some("stagehand.expect_dma=shared/coherent"),
        extra_args: &["-device", "edu,addr=02.0,dma_mask=0xffffffffffffffff"],
        ..guest("dma-shared-nc-smmu", 4, "512M")
    },
    // The hostile suites (guest-tests/suites/src/hostile): a guest that attacks the hypervisor.
    // An attack that kills the hypervisor ends its run, so the attacks are spread over rows by
    // the QEMU setup they need and by how likely they are to end the run.
    Suite {
        config: &["ram=256M", "devices=00:02.0/strict/noncoherent"],
        extra_args: EDU,
        timeout_secs: 120,
        ..guest("hostile", 4, "512M")
    },
    Suite {
        config: &["ram=256M", "devices=00:02.0/strict/noncoherent"],
        extra_args: EDU,
        ..guest("hostile-mixed", 1, "512M")
    },
    Suite {
        config: &["ram=256M"],
        extra_args: EDU,
        timeout_secs: 120,
        ..guest("hostile-dma", 4, "512M")
    },
    Suite {
        config: &["ram=256M", "devices=00:02.0/strict/noncoherent"],
        extra_args: EDU,
        timeout_secs: 90,
        ..guest("hostile-fuzz", 4, "512M")
    },
    Suite {
        timeout_secs: 90,
        ..guest("hostile-sysreg", 1, "512M")
    },
    // Every page of IPA space below RAM, each an abort and an audit record: about 100 s alone
    // on two cores, so the timeout leaves room for a loaded host.
    Suite {
        timeout_secs: 240,
        ..guest("hostile-ipa", 1, "512M")
    },
    guest("hostile-gicr", 4, "512M"),
    guest("hostile-at", 1, "512M"),
    guest("hostile-hlt", 1, "512M"),
    // The sweeps again on the other CPU and GIC class: a 40-bit CPU without FGT, SME or FWB,
    // on the plain board (GICv2: GICH and GICV must stay out of reach; no SMMU, no PCIe).
    Suite {
        name: "hostile-sysreg-a53",
        machine: board("cortex-a53", Gic::V2, false),
        timeout_secs: 90,
        ..guest("hostile-sysreg", 1, "512M")
    },
    Suite {
        name: "hostile-ipa-a53-gicv2",
        machine: board("cortex-a53", Gic::V2, false),
        timeout_secs: 240,
        ..guest("hostile-ipa", 1, "512M")
    },
    Suite {
        name: "hostile-at-a53-gicv2",
        machine: board("cortex-a53", Gic::V2, false),
        ..guest("hostile-at", 1, "512M")
    },
    // The demo guest and the attribute manager on a CPU model without FEAT_S2FWB and with a
    // 40-bit physical address space: FEATURES must say no FWB whatever the configuration asks,
    // so the non-FWB encodings run on a real CPU model.
    // Containment on the plain board (GICv2, no SMMU): the guest must get no PCIe there.
    Suite {
        name: "containment-a53-gicv2",
        machine: board("cortex-a53", Gic::V2, false),
        append: Some("stagehand.expect_pcie=off"),
        ..guest("containment", 1, "512M")
    },
    Suite {
        name: "demo-a53-gicv2",
        machine: board("cortex-a53", Gic::V2, false),
        ..guest("demo", 4, "512M")
    },
    Suite {
        name: "attr-a53",
        machine: board("cortex-a53", Gic::V3, true),
        append: Some("stagehand.expect_fwb=off"),
        ..ATTR
    },
    Suite {
        name: "attr-nofwb-a53",
        machine: board("cortex-a53", Gic::V3, true),
        ..ATTR_NOFWB
    },
    // Linux, with a virtio-blk disk behind the SMMU (shared mode) that its hook writes.
    LINUX,
    // Linux with its virtio-blk disk (00:01.0 on this board) strict and non-coherent, its DMA
    // routed through the stagehand kernel module (guest-drivers/linux), which the init hook
    // 10-stagehand loads before virtio_pci. Needs the initramfs scripts/build-linux-module makes.
    Suite {
        name: "linux-module",
        config: &["devices=00:01.0/strict/noncoherent"],
        append: Some(LINUX_MODULE_APPEND),
        ..LINUX
    },
    // Linux on other boards: every CPU model class (40-bit PA cortex-a53, 44-bit cortex-a72,
    // max), GICv2 and GICv3, with and without an SMMU, each pair of values of two axes at least
    // once. The rows with an SMMU keep the disk behind it.
    Suite {
        name: "linux-a53-gicv2",
        machine: board("cortex-a53", Gic::V2, false),
        append: Some(LINUX_NO_DISK_APPEND),
        disk: Disk::None,
        ..LINUX
    },
    Suite {
        name: "linux-a53-gicv3-smmu",
        machine: board("cortex-a53", Gic::V3, true),
        ..LINUX
    },
    Suite {
        name: "linux-a72-gicv2-smmu",
        machine: board("cortex-a72", Gic::V2, true),
        ..LINUX
    },
    Suite {
        name: "linux-a72-gicv3",
        machine: board("cortex-a72", Gic::V3, false),
        append: Some(LINUX_NO_DISK_APPEND),
        disk: Disk::None,
        ..LINUX
    },
    Suite {
        name: "linux-max-gicv2",
        machine: board("max", Gic::V2, false),
        append: Some(LINUX_NO_DISK_APPEND),
        disk: Disk::None,
        ..LINUX
    },
    // Linux's real drivers moving random data (guest-tests/runner/src/linux_io.rs).
    LINUX_IO,
    LINUX_IO_STRICT,
    LINUX_IO_QUOTA,
];

/// The configuration string of [`COMMON_CONFIG`] followed by `extra`: `key=value` items
/// separated by spaces, as the hypervisor's configuration parser expects.
pub fn config_string(extra: &[&str]) -> String {
    COMMON_CONFIG
        .iter()
        .chain(extra)
        .copied()
        .collect::<Vec<_>>()
        .join(" ")
}

/// Finds a suite by name.
pub fn find(name: &str) -> Option<&'static Suite> {
    SUITES.iter().find(|suite| suite.name == name)
}

impl Suite {
    /// The SMMU mode the hypervisor's log must give the virtio-blk disk (00:01.0), as its
    /// `{:?}` prints it: `Strict` when the row's configuration declares the device strict.
    pub fn disk_mode(&self) -> &'static str {
        let strict = self.config.iter().any(|item| {
            item.strip_prefix("devices=").is_some_and(|devices| {
                devices
                    .split('+')
                    .any(|device| device.starts_with("00:01.0/strict"))
            })
        });
        if strict {
            "Strict"
        } else {
            "Shared"
        }
    }

    /// Whether the row loads the stagehand kernel module (`stagehand.module=1`).
    pub fn loads_module(&self) -> bool {
        self.append
            .unwrap_or("")
            .split(' ')
            .any(|word| word == "stagehand.module=1")
    }

    /// The configuration string for `-fw_cfg name=opt/stagehand/config,string=...`:
    /// `key=value` items separated by spaces, as the hypervisor's configuration parser expects.
    pub fn config_string(&self) -> String {
        config_string(self.config)
    }

    /// The kernel and initrd paths of suite `linux` from the environment.
    ///
    /// # Errors
    /// A sentence naming the variable that is unset.
    pub fn linux_paths(
        lookup: impl Fn(&str) -> Option<String>,
    ) -> Result<(PathBuf, PathBuf), String> {
        let kernel = lookup(LINUX_KERNEL_VAR).filter(|v| !v.is_empty());
        let initrd = lookup(LINUX_INITRD_VAR).filter(|v| !v.is_empty());
        match (kernel, initrd) {
            (Some(kernel), Some(initrd)) => Ok((kernel.into(), initrd.into())),
            _ => Err(format!(
                "skipped: {LINUX_KERNEL_VAR} and {LINUX_INITRD_VAR} must name a kernel and an initramfs \
                 (scripts/fetch-linux prints them)"
            )),
        }
    }
}

/// Writes the pattern file suite `dt` reads as its initrd into `dir` and returns its path.
///
/// # Errors
/// The I/O error, if the file cannot be written.
pub fn write_dt_initrd(dir: &Path) -> std::io::Result<PathBuf> {
    let path = dir.join("dt.initrd");
    let bytes: Vec<u8> = (0..DT_INITRD_LEN).map(dt_initrd_byte).collect();
    std::fs::write(&path, bytes)?;
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_unique_and_timeouts_positive() {
        for (i, suite) in SUITES.iter().enumerate() {
            assert!(
                SUITES[..i].iter().all(|other| other.name != suite.name),
                "duplicate {}",
                suite.name
            );
            assert!(suite.timeout_secs > 0);
        }
        assert_eq!(find("linux").map(|s| s.timeout_secs), Some(180));
        assert!(find("nope").is_none());
    }

    /// A row on another board than the default says so in its name; a disk (a DMA-capable
    /// device) only sits behind an SMMU.
    #[test]
    fn rows_on_other_boards_are_named_apart_and_keep_dma_behind_an_smmu() {
        for suite in SUITES {
            if suite.machine != Machine::DEFAULT {
                assert_ne!(suite.name, suite.guest);
                assert!(suite.name.starts_with(suite.guest), "{}", suite.name);
            }
            if suite.disk != Disk::None || !suite.extra_args.is_empty() {
                assert!(suite.machine.smmu, "{}", suite.name);
            }
            let blk_test = suite.append.unwrap_or("").contains("stagehand.blk_test=1");
            assert_eq!(blk_test, suite.disk == Disk::VirtioBlk, "{}", suite.name);
        }
    }

    /// Linux runs on every CPU model class, both GICs, with and without an SMMU, and on each
    /// pair of values of two of those axes; the demo guest and the attribute suites run on
    /// cortex-a53 (no FEAT_S2FWB, 40-bit PA) too.
    #[test]
    fn linux_covers_the_board_matrix() {
        let linux: Vec<Machine> = SUITES
            .iter()
            .filter(|s| s.image == Image::Linux)
            .map(|s| s.machine)
            .collect();
        for cpu in ["cortex-a53", "cortex-a72", "max"] {
            for gic in [Gic::V2, Gic::V3] {
                assert!(
                    linux.iter().any(|m| m.cpu == cpu && m.gic == gic),
                    "{cpu} {gic:?}"
                );
            }
            for smmu in [false, true] {
                assert!(
                    linux.iter().any(|m| m.cpu == cpu && m.smmu == smmu),
                    "{cpu} {smmu}"
                );
            }
        }
        for gic in [Gic::V2, Gic::V3] {
            for smmu in [false, true] {
                assert!(
                    linux.iter().any(|m| m.gic == gic && m.smmu == smmu),
                    "{gic:?} {smmu}"
                );
            }
        }
        for guest in ["demo", "attr", "attr-nofwb"] {
            assert!(
                SUITES
                    .iter()
                    .any(|s| s.guest == guest && s.machine.cpu == "cortex-a53"),
                "{guest}"
            );
        }
    }

    #[test]
    fn the_module_row_declares_its_disk_strict() {
        let row = find("linux-module").unwrap();
        assert!(row.loads_module());
        assert_eq!(row.disk, Disk::VirtioBlk);
        assert_eq!(row.disk_mode(), "Strict");
        assert_eq!(find("linux").unwrap().disk_mode(), "Shared");
        assert!(!find("linux").unwrap().loads_module());
    }

    #[test]
    fn config_strings_start_with_the_common_items() {
        assert_eq!(find("dt").unwrap().config_string(), "log=debug ram=256M");
        assert_eq!(find("smccc").unwrap().config_string(), "log=debug");
    }

    #[test]
    fn linux_needs_both_variables() {
        let both = |name: &str| Some(format!("/x/{name}"));
        assert!(Suite::linux_paths(both).is_ok());
        let only_kernel = |name: &str| (name == LINUX_KERNEL_VAR).then(|| "/k".to_string());
        assert!(Suite::linux_paths(only_kernel)
            .unwrap_err()
            .starts_with("skipped"));
        assert!(Suite::linux_paths(|_| None).is_err());
    }

    #[test]
    fn dt_initrd_pattern_is_not_trivial() {
        let bytes: Vec<u8> = (0..DT_INITRD_LEN).map(dt_initrd_byte).collect();
        assert_eq!(&bytes[..4], &[0, 7, 14, 21]);
        assert!(bytes.iter().any(|&b| b > 200));
    }
}
