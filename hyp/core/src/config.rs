//! The hypervisor's own configuration, read at boot from the fw_cfg file [`FW_CFG_NAME`]
//! (`-fw_cfg name=opt/stagehand/config,string=...`).
//!
//! Syntax: `key=value` items separated by whitespace, newlines, `;` or `,`; `#` starts a
//! comment that runs to the end of the line; empty input gives [`Config::default`].
//!
//! | key   | values                                                     | default |
//! |-------|------------------------------------------------------------|---------|
//! | `ram` | guest RAM size: decimal or `0x` hex, optional `K`/`M`/`G` suffix, a non-zero multiple of 2 MiB | all RAM the hypervisor does not keep |
//! | `log` | `off`, `error`, `warn`, `info`, `debug`, `trace`           | `info`  |
//! | `fwb` | `on`, `off`: use FEAT_S2FWB when the CPU has it            | `on`    |
//! | `audit` | `all`, `changes` (no records of CMO calls or DMA syncs), `off`: which events become audit records ([`AuditLevel`]) | `all` |
//! | `selftest` | `el2-fault`: fault at EL2 on purpose before entering the guest, to test the fault report | none |
//! | `dma` | `shared`, `strict`, `blocked`: DMA mode of every PCI device behind the SMMU ([`DmaMode`]) | `shared` |
//! | `dma-mappings` | most live DMA mappings of the VM (1 to 16M; `K`/`M` suffixes count 1024s): DMA_MAP and DMA_MAP_SG answer NO_MEMORY beyond | `65536` |
//! | `smmu-coherent` | `auto`, `off`: `off` treats the SMMU as not snooping CPU caches even when SMMU_IDR0.COHACC says it does, so every clean its tables and queues need runs (tests the non-coherent path on QEMU, whose SMMU is coherent) | `auto` |
//! | `devices` | per-device overrides: `<bus:dev.fn>/<option>[/<option>]...`, several joined by `+`; options `shared`, `strict`, `blocked`, `coherent`, `noncoherent` (e.g. `devices=00:02.0/strict/noncoherent+00:03.0/shared`) | none: every device takes `dma`, coherent |
//!
//! To add a key, add one entry to [`KEYS`]. A key that is removed moves to [`REMOVED_KEYS`], so
//! that a configuration still naming it gets the reason rather than "unknown key".
//!
//! There is no `exit` key any more: the hypervisor always reports its exit status with a line on
//! its UART (`stagehand_abi::exit_status`) and powers off with PSCI. The old `exit=semihosting`
//! needed QEMU to enable semihosting, which no guest may ever be given: `HLT` cannot be trapped at
//! EL2, so any guest could then run host commands and read or write host files.

#![forbid(unsafe_code)]

use alloc::string::String;
use core::fmt;

use log::LevelFilter;

pub use crate::audit::AuditLevel;

/// Name of the fw_cfg file that holds the configuration.
pub const FW_CFG_NAME: &str = "opt/stagehand/config";

/// Guest RAM sizes are whole 2 MiB blocks, so stage 2 can map them with block entries.
const RAM_GRANULE: u64 = 2 << 20;

/// A deliberate failure the hypervisor performs at boot, so that tests can watch how it reports
/// failures of its own.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SelfTest {
    /// Read an address the EL2 translation tables do not map, after the VM is built and before
    /// the guest is entered: a synchronous data abort at EL2.
    El2Fault,
}

/// How a PCI device's DMA is translated by the SMMU.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DmaMode {
    /// The device's SMMU stage 2 is the guest's own stage 2: it reaches all guest RAM (and the
    /// MMIO the guest may touch), as under Xen and pKVM.
    Shared,
    /// The device reaches only the buffers the guest maps with DMA_MAP.
    Strict,
    /// The device is kept out of memory: every DMA it makes is aborted.
    Blocked,
}

/// Most `devices` entries (a fixed bound keeps [`Config`] `Copy`).
pub const MAX_DEVICE_RULES: usize = 16;

/// One `devices` entry: what the configuration says about one PCI function.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DeviceRule {
    /// PCI requester ID: bus << 8 | device << 3 | function.
    pub rid: u16,
    /// DMA mode, when the entry names one (else `dma` applies).
    pub mode: Option<DmaMode>,
    /// Whether the device snoops CPU caches, when the entry says (else coherent).
    pub coherent: Option<bool>,
}

/// The `devices` entries, at most [`MAX_DEVICE_RULES`], each requester ID once.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DeviceRules {
    rules: [DeviceRule; MAX_DEVICE_RULES],
    len: usize,
}

impl DeviceRules {
    /// No entries.
    pub const EMPTY: DeviceRules = DeviceRules {
        rules: [DeviceRule {
            rid: 0,
            mode: None,
            coherent: None,
        }; MAX_DEVICE_RULES],
        len: 0,
    };

    /// The entries, in the order given.
    pub fn iter(&self) -> impl Iterator<Item = &DeviceRule> {
        self.rules[..self.len].iter()
    }

    /// The entry for requester `rid`, if any.
    pub fn get(&self, rid: u16) -> Option<&DeviceRule> {
        self.iter().find(|rule| rule.rid == rid)
    }

    /// Adds an entry; `None` when full or when `rid` already has one.
    fn push(&mut self, rule: DeviceRule) -> Option<()> {
        if self.get(rule.rid).is_some() {
            return None;
        }
        *self.rules.get_mut(self.len)? = rule;
        self.len += 1;
        Some(())
    }
}

/// What the configuration decides for one device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DevicePolicy {
    /// Its DMA mode.
    pub mode: DmaMode,
    /// Whether it snoops CPU caches (DMA calls skip cache maintenance for coherent devices).
    pub coherent: bool,
}

/// The hypervisor configuration.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Config {
    /// Guest RAM size in bytes; `None` gives the guest all RAM the hypervisor does not keep.
    pub ram_size: Option<u64>,
    /// Most verbose log level written to the hypervisor's UART.
    pub log_level: LevelFilter,
    /// Whether to use FEAT_S2FWB when the CPU has it.
    pub fwb: bool,
    /// A failure to perform on purpose at boot (tests only).
    pub selftest: Option<SelfTest>,
    /// Which events become audit records.
    pub audit: AuditLevel,
    /// DMA mode of every device without a `devices` entry that names one.
    pub dma: DmaMode,
    /// Per-device overrides.
    pub devices: DeviceRules,
    /// Treat the SMMU's table walks and queue accesses as not snooping CPU caches, whatever
    /// SMMU_IDR0.COHACC says (`smmu-coherent=off`).
    pub smmu_noncoherent: bool,
    /// Most live DMA mappings the VM may hold (`dma-mappings`); DMA_MAP answers NO_MEMORY beyond.
    pub dma_mappings: usize,
}

impl Config {
    /// The mode and coherence of the PCI function with requester ID `rid`.
    pub fn device_policy(&self, rid: u16) -> DevicePolicy {
        let rule = self.devices.get(rid);
        DevicePolicy {
            mode: rule.and_then(|r| r.mode).unwrap_or(self.dma),
            coherent: rule.and_then(|r| r.coherent).unwrap_or(true),
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            ram_size: None,
            log_level: LevelFilter::Info,
            fwb: true,
            selftest: None,
            audit: AuditLevel::All,
            dma: DmaMode::Shared,
            devices: DeviceRules::EMPTY,
            smmu_noncoherent: false,
            dma_mappings: crate::dma::DEFAULT_MAPPING_QUOTA,
        }
    }
}

/// Why the configuration text was refused. Every message names the offending item.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ConfigError {
    /// An item is not of the form `key=value` (no `=`, or nothing before it).
    NotKeyValue {
        /// The item as written.
        item: String,
    },
    /// The key is not one of the known keys.
    UnknownKey {
        /// The key as written.
        key: String,
    },
    /// The key was removed; the configuration must drop it.
    RemovedKey {
        /// The key.
        key: &'static str,
        /// Why it was removed and what replaces it.
        why: &'static str,
    },
    /// The key appears twice.
    DuplicateKey {
        /// The key.
        key: &'static str,
    },
    /// The value is not valid for its key.
    BadValue {
        /// The key.
        key: &'static str,
        /// The value as written.
        value: String,
        /// What the key accepts.
        expected: &'static str,
    },
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ConfigError::NotKeyValue { item } => {
                write!(f, "config: `{}` is not key=value", item.escape_debug())
            }
            ConfigError::UnknownKey { key } => {
                write!(f, "config: unknown key `{}` (known: ", key.escape_debug())?;
                for (index, known) in KEYS.iter().enumerate() {
                    if index > 0 {
                        f.write_str(", ")?;
                    }
                    f.write_str(known.name)?;
                }
                f.write_str(")")
            }
            ConfigError::RemovedKey { key, why } => {
                write!(f, "config: `{key}` was removed: {why}")
            }
            ConfigError::DuplicateKey { key } => write!(f, "config: `{key}` given twice"),
            ConfigError::BadValue {
                key,
                value,
                expected,
            } => write!(
                f,
                "config: bad value `{}` for `{key}`: expected {expected}",
                value.escape_debug()
            ),
        }
    }
}

/// One configuration key: its name, what it accepts, and how it sets the configuration
/// (`None` when the value is not accepted).
struct Key {
    name: &'static str,
    expected: &'static str,
    apply: fn(&mut Config, &str) -> Option<()>,
}

/// Keys the configuration no longer accepts, each with why: the error says so rather than
/// calling the key unknown.
const REMOVED_KEYS: [(&str, &str); 1] = [(
    "exit",
    "semihosting is never enabled, because any guest could use it to run host commands; \
     the hypervisor always reports its exit status as a `stagehand: exit status N` line on its UART",
)];

/// Every key the configuration accepts.
const KEYS: [Key; 9] = [
    Key {
        name: "ram",
        expected:
            "a size (decimal or 0x hex, optional K/M/G suffix) that is a non-zero multiple of 2 MiB",
        apply: |config, value| {
            let size = parse_size(value).filter(|&size| size != 0 && size % RAM_GRANULE == 0)?;
            config.ram_size = Some(size);
            Some(())
        },
    },
    Key {
        name: "log",
        expected: "off, error, warn, info, debug or trace",
        apply: |config, value| {
            config.log_level = match value {
                "off" => LevelFilter::Off,
                "error" => LevelFilter::Error,
                "warn" => LevelFilter::Warn,
                "info" => LevelFilter::Info,
                "debug" => LevelFilter::Debug,
                "trace" => LevelFilter::Trace,
                _ => return None,
            };
            Some(())
        },
    },
    Key {
        name: "fwb",
        expected: "on or off",
        apply: |config, value| {
            config.fwb = match value {
                "on" => true,
                "off" => false,
                _ => return None,
            };
            Some(())
        },
    },
    Key {
        name: "smmu-coherent",
        expected: "auto or off",
        apply: |config, value| {
            config.smmu_noncoherent = match value {
                "auto" => false,
                "off" => true,
                _ => return None,
            };
            Some(())
        },
    },
    Key {
        name: "selftest",
        expected: "el2-fault",
        apply: |config, value| {
            config.selftest = match value {
                "el2-fault" => Some(SelfTest::El2Fault),
                _ => return None,
            };
            Some(())
        },
    },
    Key {
        name: "audit",
        expected: "all, changes or off",
        apply: |config, value| {
            config.audit = match value {
                "all" => AuditLevel::All,
                "changes" => AuditLevel::Changes,
                "off" => AuditLevel::Off,
                _ => return None,
            };
            Some(())
        },
    },
    Key {
        name: "dma",
        expected: "shared, strict or blocked",
        apply: |config, value| {
            config.dma = parse_dma_mode(value)?;
            Some(())
        },
    },
    Key {
        name: "dma-mappings",
        expected: "a number of live DMA mappings from 1 to 16777216 (decimal or 0x hex, optional K/M suffix)",
        apply: |config, value| {
            let count = parse_size(value).filter(|&count| (1..=1 << 24).contains(&count))?;
            config.dma_mappings = count as usize;
            Some(())
        },
    },
    Key {
        name: "devices",
        expected: "entries <bus:dev.fn>/<option>[/<option>...] joined by `+`, options shared, strict, blocked, coherent, noncoherent, each device once, at most 16",
        apply: |config, value| {
            let mut rules = DeviceRules::EMPTY;
            for entry in value.split('+') {
                rules.push(parse_device_rule(entry)?)?;
            }
            config.devices = rules;
            Some(())
        },
    },
];

fn parse_dma_mode(value: &str) -> Option<DmaMode> {
    match value {
        "shared" => Some(DmaMode::Shared),
        "strict" => Some(DmaMode::Strict),
        "blocked" => Some(DmaMode::Blocked),
        _ => None,
    }
}

/// Parses `bus:dev.fn` (hexadecimal, as lspci prints it) into a requester ID.
fn parse_bdf(text: &str) -> Option<u16> {
    let hex = |digits: &str, max: u16| {
        let ok = !digits.is_empty()
            && digits.len() <= 2
            && digits.bytes().all(|b| b.is_ascii_hexdigit());
        u16::from_str_radix(digits, 16)
            .ok()
            .filter(|&n| ok && n <= max)
    };
    let (bus, rest) = text.split_once(':')?;
    let (device, function) = rest.split_once('.')?;
    Some(hex(bus, 0xff)? << 8 | hex(device, 0x1f)? << 3 | hex(function, 7)?)
}

/// Parses one `devices` entry: a BDF, then at least one option, each setting mode or coherence
/// at most once.
fn parse_device_rule(entry: &str) -> Option<DeviceRule> {
    let mut fields = entry.split('/');
    let mut rule = DeviceRule {
        rid: parse_bdf(fields.next()?)?,
        mode: None,
        coherent: None,
    };
    let mut options = 0;
    for option in fields {
        options += 1;
        match option {
            "coherent" | "noncoherent" if rule.coherent.is_none() => {
                rule.coherent = Some(option == "coherent")
            }
            _ if rule.mode.is_none() => rule.mode = Some(parse_dma_mode(option)?),
            _ => return None,
        }
    }
    (options > 0).then_some(rule)
}

/// The items of the configuration text: comments dropped, split at every separator.
fn items(text: &str) -> impl Iterator<Item = &str> {
    text.lines()
        .map(|line| line.split('#').next().unwrap_or_default())
        .flat_map(|line| line.split(|c: char| c.is_whitespace() || c == ';' || c == ','))
        .filter(|item| !item.is_empty())
}

/// Parses a size: decimal or `0x` hex digits, then an optional `K`, `M` or `G` (powers of
/// 1024, either case). `None` on bad digits or overflow.
fn parse_size(text: &str) -> Option<u64> {
    let suffixes: [(&[char], u64); 3] = [
        (&['k', 'K'], 1 << 10),
        (&['m', 'M'], 1 << 20),
        (&['g', 'G'], 1 << 30),
    ];
    let (digits, multiplier) = suffixes
        .iter()
        .find_map(|&(letters, multiplier)| Some((text.strip_suffix(letters)?, multiplier)))
        .unwrap_or((text, 1));
    let number = match digits
        .strip_prefix("0x")
        .or_else(|| digits.strip_prefix("0X"))
    {
        Some(hex) if !hex.is_empty() && hex.bytes().all(|b| b.is_ascii_hexdigit()) => {
            u64::from_str_radix(hex, 16).ok()?
        }
        Some(_) => return None,
        None if !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()) => {
            digits.parse().ok()?
        }
        None => return None,
    };
    number.checked_mul(multiplier)
}

/// Parses the configuration text.
///
/// # Errors
///
/// A [`ConfigError`] for the first item that is not `key=value`, names an unknown or removed key,
/// repeats a key, or carries a value its key does not accept.
pub fn parse(text: &str) -> Result<Config, ConfigError> {
    let mut config = Config::default();
    let mut seen = [false; KEYS.len()];
    for item in items(text) {
        let (key, value) = item
            .split_once('=')
            .filter(|(key, _)| !key.is_empty())
            .ok_or_else(|| ConfigError::NotKeyValue { item: item.into() })?;
        if let Some(&(key, why)) = REMOVED_KEYS.iter().find(|(removed, _)| *removed == key) {
            return Err(ConfigError::RemovedKey { key, why });
        }
        let (index, entry) = KEYS
            .iter()
            .enumerate()
            .find(|(_, entry)| entry.name == key)
            .ok_or_else(|| ConfigError::UnknownKey { key: key.into() })?;
        let already = seen
            .get_mut(index)
            .ok_or(ConfigError::DuplicateKey { key: entry.name })?;
        if *already {
            return Err(ConfigError::DuplicateKey { key: entry.name });
        }
        *already = true;
        (entry.apply)(&mut config, value).ok_or_else(|| ConfigError::BadValue {
            key: entry.name,
            value: value.into(),
            expected: entry.expected,
        })?;
    }
    Ok(config)
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::string::ToString;
    use proptest::prelude::*;

    #[test]
    fn empty_and_comment_only_inputs_give_defaults() {
        for text in ["", "  \n\t", "# nothing here\n", ";,;"] {
            assert_eq!(parse(text), Ok(Config::default()));
        }
        assert_eq!(
            Config::default(),
            Config {
                ram_size: None,
                log_level: LevelFilter::Info,
                fwb: true,
                selftest: None,
                audit: AuditLevel::All,
                dma: DmaMode::Shared,
                devices: DeviceRules::EMPTY,
                smmu_noncoherent: false,
                dma_mappings: crate::dma::DEFAULT_MAPPING_QUOTA,
            }
        );
    }

    #[test]
    fn every_key_and_separator() {
        let config =
            parse("ram=512M log=debug\nfwb=off; selftest=el2-fault # trailing comment").unwrap();
        assert_eq!(
            config,
            Config {
                ram_size: Some(512 << 20),
                log_level: LevelFilter::Debug,
                fwb: false,
                selftest: Some(SelfTest::El2Fault),
                audit: AuditLevel::All,
                dma: DmaMode::Shared,
                devices: DeviceRules::EMPTY,
                smmu_noncoherent: false,
                dma_mappings: crate::dma::DEFAULT_MAPPING_QUOTA,
            }
        );
        assert_eq!(parse("audit=changes").unwrap().audit, AuditLevel::Changes);
        assert!(parse("smmu-coherent=off").unwrap().smmu_noncoherent);
        assert!(!parse("smmu-coherent=auto").unwrap().smmu_noncoherent);
        assert_eq!(parse("audit=off").unwrap().audit, AuditLevel::Off);
        assert!(parse("audit=some").is_err());
        assert!(parse("fwb=on,log=warn").unwrap().fwb);
    }

    #[test]
    fn dma_modes_and_device_rules() {
        let config = parse(
            "dma=strict devices=00:02.0/shared/noncoherent+00:1f.7/blocked+1a:03.1/noncoherent",
        )
        .unwrap();
        assert_eq!(config.dma, DmaMode::Strict);
        assert_eq!(config.dma_mappings, crate::dma::DEFAULT_MAPPING_QUOTA);
        assert_eq!(parse("dma-mappings=128").unwrap().dma_mappings, 128);
        assert_eq!(parse("dma-mappings=1M").unwrap().dma_mappings, 1 << 20);
        for bad in ["dma-mappings=0", "dma-mappings=17M", "dma-mappings=many"] {
            assert!(
                matches!(
                    parse(bad),
                    Err(ConfigError::BadValue {
                        key: "dma-mappings",
                        ..
                    })
                ),
                "{bad}"
            );
        }
        let rules: alloc::vec::Vec<_> = config.devices.iter().copied().collect();
        assert_eq!(
            rules,
            [
                DeviceRule {
                    rid: 0x10,
                    mode: Some(DmaMode::Shared),
                    coherent: Some(false)
                },
                DeviceRule {
                    rid: 0xff,
                    mode: Some(DmaMode::Blocked),
                    coherent: None
                },
                DeviceRule {
                    rid: 0x1a19,
                    mode: None,
                    coherent: Some(false)
                },
            ]
        );
        let policy = |rid| config.device_policy(rid);
        assert_eq!(
            policy(0x10),
            DevicePolicy {
                mode: DmaMode::Shared,
                coherent: false
            }
        );
        assert_eq!(
            policy(0xff),
            DevicePolicy {
                mode: DmaMode::Blocked,
                coherent: true
            }
        );
        assert_eq!(
            policy(0x1a19),
            DevicePolicy {
                mode: DmaMode::Strict,
                coherent: false
            }
        );
        assert_eq!(
            policy(0x18),
            DevicePolicy {
                mode: DmaMode::Strict,
                coherent: true
            }
        );
        // Defaults: shared and coherent for everything.
        assert_eq!(
            Config::default().device_policy(0x10),
            DevicePolicy {
                mode: DmaMode::Shared,
                coherent: true
            }
        );
        assert_eq!(parse("dma=blocked").unwrap().dma, DmaMode::Blocked);
        assert_eq!(
            parse("devices=0:2.0/coherent")
                .unwrap()
                .devices
                .get(0x10)
                .unwrap()
                .coherent,
            Some(true)
        );
        let sixteen: alloc::vec::Vec<_> = (0..16)
            .map(|d| alloc::format!("00:{d:02x}.0/strict"))
            .collect();
        assert_eq!(
            parse(&alloc::format!("devices={}", sixteen.join("+")))
                .unwrap()
                .devices
                .iter()
                .count(),
            16
        );
        for bad in [
            "dma=on",
            "devices=",
            "devices=00:02.0",
            "devices=00:02.0/",
            "devices=00:02.0/fast",
            "devices=00:02.0/strict/shared",
            "devices=00:02.0/coherent/noncoherent",
            "devices=00:02.0/strict+00:02.0/shared",
            "devices=00:20.0/strict",
            "devices=00:02.8/strict",
            "devices=100:02.0/strict",
            "devices=00-02.0/strict",
            "devices=0x0:02.0/strict",
            "devices=00:02.0/strict+",
        ] {
            assert!(
                matches!(parse(bad), Err(ConfigError::BadValue { .. })),
                "{bad} should be refused"
            );
        }
        let seventeen: alloc::vec::Vec<_> = (0..17)
            .map(|d| alloc::format!("00:{d:02x}.0/strict"))
            .collect();
        assert!(parse(&alloc::format!("devices={}", seventeen.join("+"))).is_err());
    }

    #[test]
    fn ram_sizes() {
        let cases = [
            ("ram=2M", 2 << 20),
            ("ram=2048k", 2 << 20),
            ("ram=1G", 1 << 30),
            ("ram=0x40000000", 1 << 30),
            ("ram=0x2m", 2 << 20),
            ("ram=4194304", 4 << 20),
            ("ram=16g", 16 << 30),
        ];
        for (text, size) in cases {
            assert_eq!(parse(text).unwrap().ram_size, Some(size), "{text}");
        }
    }

    #[test]
    fn log_levels() {
        let cases = [
            ("off", LevelFilter::Off),
            ("error", LevelFilter::Error),
            ("warn", LevelFilter::Warn),
            ("info", LevelFilter::Info),
            ("debug", LevelFilter::Debug),
            ("trace", LevelFilter::Trace),
        ];
        for (value, level) in cases {
            assert_eq!(
                parse(&alloc::format!("log={value}")).unwrap().log_level,
                level
            );
        }
    }

    #[test]
    fn errors_name_the_item() {
        let ram = "a size (decimal or 0x hex, optional K/M/G suffix) that is a non-zero multiple of 2 MiB";
        let cases = [
            ("ram", "config: `ram` is not key=value".to_string()),
            ("=5", "config: `=5` is not key=value".to_string()),
            ("memory=1G", "config: unknown key `memory` (known: ram, log, fwb, smmu-coherent, selftest, audit, dma, dma-mappings, devices)".to_string()),
            ("log=info log=warn", "config: `log` given twice".to_string()),
            ("ram=3M", alloc::format!("config: bad value `3M` for `ram`: expected {ram}")),
            ("ram=0", alloc::format!("config: bad value `0` for `ram`: expected {ram}")),
            ("ram=", alloc::format!("config: bad value `` for `ram`: expected {ram}")),
            ("ram=0x", alloc::format!("config: bad value `0x` for `ram`: expected {ram}")),
            ("ram=12T", alloc::format!("config: bad value `12T` for `ram`: expected {ram}")),
            ("ram=-2M", alloc::format!("config: bad value `-2M` for `ram`: expected {ram}")),
            (
                "ram=0xffffffffffffffffG",
                alloc::format!("config: bad value `0xffffffffffffffffG` for `ram`: expected {ram}"),
            ),
            (
                "ram=99999999999999999999",
                alloc::format!("config: bad value `99999999999999999999` for `ram`: expected {ram}"),
            ),
            (
                "log=verbose",
                "config: bad value `verbose` for `log`: expected off, error, warn, info, debug or trace"
                    .to_string(),
            ),
            ("fwb=yes", "config: bad value `yes` for `fwb`: expected on or off".to_string()),
            (
                "selftest=panic",
                "config: bad value `panic` for `selftest`: expected el2-fault".to_string(),
            ),
            ("x\u{7}=1", "config: unknown key `x\\u{7}` (known: ram, log, fwb, smmu-coherent, selftest, audit, dma, dma-mappings, devices)".to_string()),
        ];
        for (text, message) in cases {
            assert_eq!(parse(text).unwrap_err().to_string(), message, "{text}");
        }
    }

    #[test]
    fn the_exit_key_is_refused_with_the_reason() {
        // Every value, alone or among good items: semihosting is never enabled, and there is
        // no other exit method to choose.
        for text in [
            "exit=semihosting",
            "exit=psci",
            "exit=halt",
            "exit=",
            "log=debug exit=semihosting ram=256M",
        ] {
            let error = parse(text).unwrap_err();
            assert!(
                matches!(error, ConfigError::RemovedKey { key: "exit", .. }),
                "{text}"
            );
            let message = error.to_string();
            assert!(
                message.starts_with("config: `exit` was removed: semihosting is never enabled"),
                "{message}"
            );
            assert!(!message.contains('\n'), "{message}");
        }
        // The message names the line that replaces it, in the form the hypervisor writes.
        let message = parse("exit=psci").unwrap_err().to_string();
        assert!(
            message.contains(&alloc::format!("`{}N`", stagehand_abi::exit_status::PREFIX)),
            "{message}"
        );
        // Not a key of any other spelling.
        assert!(matches!(
            parse("noexit=semihosting"),
            Err(ConfigError::UnknownKey { .. })
        ));
        assert_eq!(parse("# exit=semihosting"), Ok(Config::default()));
    }

    proptest! {
        #[test]
        fn parse_never_panics(text in "\\PC{0,80}") {
            let _ = parse(&text);
        }

        #[test]
        fn parse_never_panics_on_near_misses(
            items in proptest::collection::vec(
                ("(ram|log|fwb|exit|selftest|x)", "[0-9a-zA-Z#=]{0,12}", "[ ,;\n#]"),
                0..6,
            )
        ) {
            let text: String = items
                .iter()
                .map(|(key, value, separator)| alloc::format!("{key}={value}{separator}"))
                .collect();
            if let Ok(config) = parse(&text) {
                prop_assert!(super::items(&text).all(|item| !item.starts_with("exit=")));
                if let Some(size) = config.ram_size {
                    prop_assert!(size != 0 && size % RAM_GRANULE == 0);
                }
            }
        }
    }
}
