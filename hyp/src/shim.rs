//! TEMPORARY bring-up shim until hyp_core::{config, image} land. Not for commit.
pub mod config {
    use core::fmt;
    pub const FW_CFG_NAME: &str = "opt/stagehand/config";
    #[derive(PartialEq, Eq, Debug, Clone, Copy)]
    pub enum ExitMethod { Psci, Semihosting }
    pub struct Config { pub ram_size: Option<u64>, pub log_level: log::LevelFilter, pub fwb: bool, pub exit: ExitMethod }
    impl Default for Config { fn default() -> Self { Self { ram_size: None, log_level: log::LevelFilter::Info, fwb: true, exit: ExitMethod::Psci } } }
    #[derive(Debug)] pub struct ConfigError;
    impl fmt::Display for ConfigError { fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result { write!(f, "bad") } }
    pub fn parse(text: &str) -> Result<Config, ConfigError> {
        let mut c = Config::default();
        for item in text.split(|c: char| c.is_whitespace() || c == ';') {
            match item.split_once('=') {
                Some(("exit", "semihosting")) => c.exit = ExitMethod::Semihosting,
                Some(("log", "debug")) => c.log_level = log::LevelFilter::Debug,
                Some(("fwb", "off")) => c.fwb = false,
                Some(("ram", v)) => c.ram_size = v.strip_suffix('M').and_then(|v| v.parse::<u64>().ok()).map(|m| m << 20),
                _ => {}
            }
        }
        Ok(c)
    }
}
pub mod image {
    use alloc::vec::Vec;
    use core::fmt;
    #[derive(Debug)] pub enum Format { LinuxImage, Elf, Raw }
    pub struct Segment { pub ipa: u64, pub file_offset: u64, pub file_size: u64, pub mem_size: u64 }
    pub struct LoadPlan { pub format: Format, pub segments: Vec<Segment>, pub entry: u64, pub end: u64 }
    #[derive(Debug)] pub struct ImageError;
    impl fmt::Display for ImageError { fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result { write!(f, "bad image") } }
    fn u64at(b: &[u8], o: usize) -> u64 { u64::from_le_bytes(b[o..o + 8].try_into().unwrap()) }
    fn u32at(b: &[u8], o: usize) -> u32 { u32::from_le_bytes(b[o..o + 4].try_into().unwrap()) }
    fn u16at(b: &[u8], o: usize) -> u16 { u16::from_le_bytes(b[o..o + 2].try_into().unwrap()) }
    pub fn plan(p: &[u8], len: u64, base: u64, _size: u64) -> Result<LoadPlan, ImageError> {
        if p.starts_with(b"\x7fELF") {
            let phoff = u64at(p, 32) as usize; let phentsize = u16at(p, 54) as usize; let phnum = u16at(p, 56) as usize;
            let mut segments = Vec::new(); let mut end = 0;
            for i in 0..phnum { let h = &p[phoff + i * phentsize..];
                if u32at(h, 0) != 1 { continue; }
                let s = Segment { ipa: u64at(h, 24), file_offset: u64at(h, 8), file_size: u64at(h, 32), mem_size: u64at(h, 40) };
                end = end.max(s.ipa + s.mem_size); segments.push(s); }
            return Ok(LoadPlan { format: Format::Elf, segments, entry: u64at(p, 24), end });
        }
        if p.len() >= 64 && u32at(p, 56) == 0x644d5241 {
            let text = u64at(p, 8); let isz = u64at(p, 16); let ipa = base + text; let ms = isz.max(len);
            return Ok(LoadPlan { format: Format::LinuxImage, segments: alloc::vec![Segment { ipa, file_offset: 0, file_size: len, mem_size: ms }], entry: ipa, end: ipa + ms });
        }
        let ipa = base + 0x80000;
        Ok(LoadPlan { format: Format::Raw, segments: alloc::vec![Segment { ipa, file_offset: 0, file_size: len, mem_size: len }], entry: ipa, end: ipa + len })
    }
}
