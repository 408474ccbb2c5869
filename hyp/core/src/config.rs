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
//! | `exit`| `psci`, `semihosting`: how the hypervisor ends QEMU        | `psci`  |
//!
//! To add a key, add one entry to [`KEYS`].

#![forbid(unsafe_code)]

use alloc::string::String;
use core::fmt;

use log::LevelFilter;

/// Name of the fw_cfg file that holds the configuration.
pub const FW_CFG_NAME: &str = "opt/stagehand/config";

/// Guest RAM sizes are whole 2 MiB blocks, so stage 2 can map them with block entries.
const RAM_GRANULE: u64 = 2 << 20;

/// How the hypervisor ends the machine when the guest is done.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExitMethod {
    /// PSCI SYSTEM_OFF (QEMU exits with status 0).
    Psci,
    /// Semihosting SYS_EXIT, which carries an exit status (needs `-semihosting-config enable=on`).
    Semihosting,
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
    /// How to end the machine.
    pub exit: ExitMethod,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            ram_size: None,
            log_level: LevelFilter::Info,
            fwb: true,
            exit: ExitMethod::Psci,
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
            ConfigError::UnknownKey { key } => write!(
                f,
                "config: unknown key `{}` (known: ram, log, fwb, exit)",
                key.escape_debug()
            ),
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

/// Every key the configuration accepts.
const KEYS: [Key; 4] = [
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
        name: "exit",
        expected: "psci or semihosting",
        apply: |config, value| {
            config.exit = match value {
                "psci" => ExitMethod::Psci,
                "semihosting" => ExitMethod::Semihosting,
                _ => return None,
            };
            Some(())
        },
    },
];

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
/// A [`ConfigError`] for the first item that is not `key=value`, names an unknown key, repeats a
/// key, or carries a value its key does not accept.
pub fn parse(text: &str) -> Result<Config, ConfigError> {
    let mut config = Config::default();
    let mut seen = [false; KEYS.len()];
    let items = text
        .lines()
        .map(|line| line.split('#').next().unwrap_or_default())
        .flat_map(|line| line.split(|c: char| c.is_whitespace() || c == ';' || c == ','))
        .filter(|item| !item.is_empty());
    for item in items {
        let (key, value) = item
            .split_once('=')
            .filter(|(key, _)| !key.is_empty())
            .ok_or_else(|| ConfigError::NotKeyValue { item: item.into() })?;
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
                exit: ExitMethod::Psci
            }
        );
    }

    #[test]
    fn every_key_and_separator() {
        let config =
            parse("ram=512M log=debug\nfwb=off; exit=semihosting # trailing comment").unwrap();
        assert_eq!(
            config,
            Config {
                ram_size: Some(512 << 20),
                log_level: LevelFilter::Debug,
                fwb: false,
                exit: ExitMethod::Semihosting,
            }
        );
        assert_eq!(parse("fwb=on,exit=psci").unwrap().exit, ExitMethod::Psci);
        assert!(parse("fwb=on,exit=psci").unwrap().fwb);
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
            ("memory=1G", "config: unknown key `memory` (known: ram, log, fwb, exit)".to_string()),
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
                "exit=halt",
                "config: bad value `halt` for `exit`: expected psci or semihosting".to_string(),
            ),
            (
                "exit=psci=1",
                "config: bad value `psci=1` for `exit`: expected psci or semihosting".to_string(),
            ),
            ("x\u{7}=1", "config: unknown key `x\\u{7}` (known: ram, log, fwb, exit)".to_string()),
        ];
        for (text, message) in cases {
            assert_eq!(parse(text).unwrap_err().to_string(), message, "{text}");
        }
    }

    proptest! {
        #[test]
        fn parse_never_panics(text in "\\PC{0,80}") {
            let _ = parse(&text);
        }

        #[test]
        fn parse_never_panics_on_near_misses(
            items in proptest::collection::vec(
                ("(ram|log|fwb|exit|x)", "[0-9a-zA-Z#=]{0,12}", "[ ,;\n#]"),
                0..6,
            )
        ) {
            let text: String = items
                .iter()
                .map(|(key, value, separator)| alloc::format!("{key}={value}{separator}"))
                .collect();
            if let Ok(config) = parse(&text) {
                if let Some(size) = config.ram_size {
                    prop_assert!(size != 0 && size % RAM_GRANULE == 0);
                }
            }
        }
    }
}
