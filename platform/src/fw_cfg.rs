//! QEMU's fw_cfg interface (MMIO flavour, `qemu,fw-cfg-mmio`): the register block, the DMA
//! descriptor and the file directory format. The driver that moves bytes lives in the
//! hypervisor, which owns DMA-able memory; this module is the layout and its parsing.

use alloc::string::String;
use alloc::vec::Vec;
use tock_registers::register_structs;
use tock_registers::registers::{ReadOnly, WriteOnly};

register_structs! {
    /// The fw_cfg MMIO register block. The selector and DMA address are big-endian.
    pub FwCfgRegisters {
        (0x00 => pub data: ReadOnly<u64>),
        (0x08 => pub selector: WriteOnly<u16>),
        (0x0a => _reserved),
        (0x10 => pub dma_address: WriteOnly<u64>),
        (0x18 => @END),
    }
}

/// Well-known selector keys.
pub mod key {
    /// Signature, reads "QEMU".
    pub const SIGNATURE: u16 = 0x00;
    /// Feature bits (bit 1: DMA interface).
    pub const FEATURES: u16 = 0x01;
    /// Size of `-kernel` (le32).
    pub const KERNEL_SIZE: u16 = 0x08;
    /// Size of `-initrd` (le32).
    pub const INITRD_SIZE: u16 = 0x0b;
    /// Contents of `-kernel`.
    pub const KERNEL_DATA: u16 = 0x11;
    /// Contents of `-initrd`.
    pub const INITRD_DATA: u16 = 0x12;
    /// Size of `-append` (le32, including the NUL).
    pub const CMDLINE_SIZE: u16 = 0x14;
    /// Contents of `-append`.
    pub const CMDLINE_DATA: u16 = 0x15;
    /// The file directory.
    pub const FILE_DIR: u16 = 0x19;
}

/// Feature bit: the DMA interface exists.
pub const FEATURE_DMA: u32 = 1 << 1;

/// DMA control bits.
pub mod control {
    /// The device reports an error.
    pub const ERROR: u32 = 1 << 0;
    /// Read from the selected item into memory.
    pub const READ: u32 = 1 << 1;
    /// Skip bytes of the selected item.
    pub const SKIP: u32 = 1 << 2;
    /// Select the key in bits 31:16 first.
    pub const SELECT: u32 = 1 << 3;
}

/// The DMA descriptor, in memory, 16-byte aligned, all fields big-endian.
#[repr(C, align(16))]
#[derive(Debug, Default)]
pub struct DmaAccess {
    /// Control word (big-endian).
    pub control: u32,
    /// Length in bytes (big-endian).
    pub length: u32,
    /// Physical address of the buffer (big-endian).
    pub address: u64,
}

/// One entry of the file directory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct File {
    /// Size in bytes.
    pub size: u32,
    /// Selector key.
    pub select: u16,
    /// Name, e.g. `opt/stagehand/config`.
    pub name: String,
}

/// Bytes per directory entry.
pub const FILE_ENTRY_SIZE: usize = 64;

/// Parses the file directory (key 0x19): a be32 count and 64-byte entries. Entries past the
/// end of `bytes` are ignored; names stop at the first NUL.
pub fn parse_directory(bytes: &[u8]) -> Vec<File> {
    let Some(count) = bytes.get(..4) else {
        return Vec::new();
    };
    let count = u32::from_be_bytes([count[0], count[1], count[2], count[3]]) as usize;
    bytes[4..]
        .chunks_exact(FILE_ENTRY_SIZE)
        .take(count)
        .map(|entry| {
            let name = &entry[8..];
            let len = name.iter().position(|&b| b == 0).unwrap_or(name.len());
            File {
                size: u32::from_be_bytes([entry[0], entry[1], entry[2], entry[3]]),
                select: u16::from_be_bytes([entry[4], entry[5]]),
                name: String::from_utf8_lossy(&name[..len]).into_owned(),
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use alloc::vec;

    #[test]
    fn parses_a_directory() {
        let mut bytes = vec![0, 0, 0, 2];
        for (size, select, name) in [(12u32, 0x20u16, "opt/stagehand/config"), (5, 0x21, "etc/x")] {
            let mut entry = [0u8; 64];
            entry[..4].copy_from_slice(&size.to_be_bytes());
            entry[4..6].copy_from_slice(&select.to_be_bytes());
            entry[8..8 + name.len()].copy_from_slice(name.as_bytes());
            bytes.extend_from_slice(&entry);
        }
        let files = parse_directory(&bytes);
        assert_eq!(files.len(), 2);
        assert_eq!(
            files[0],
            File {
                size: 12,
                select: 0x20,
                name: "opt/stagehand/config".into()
            }
        );
        assert_eq!(
            parse_directory(&bytes[..70]).len(),
            1,
            "a truncated directory keeps whole entries"
        );
        assert!(parse_directory(&[0, 0]).is_empty());
    }
}
