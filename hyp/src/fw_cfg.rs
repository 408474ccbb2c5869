//! The fw_cfg driver: how the hypervisor receives the guest's kernel, initrd, command line and
//! its own configuration from QEMU, the way edk2 does. Bulk data moves by DMA straight into
//! guest RAM (the data port takes about a second per 20 MiB; DMA a few milliseconds).

use alloc::boxed::Box;
use alloc::string::String;
use alloc::vec;
use alloc::vec::Vec;
use core::fmt;
use core::ptr::{addr_of, addr_of_mut};
use stagehand_platform::fw_cfg::{self, control, key, DmaAccess, FwCfgRegisters};
use tock_registers::interfaces::{Readable, Writeable};

/// What went wrong talking to fw_cfg.
#[derive(Debug)]
pub enum FwCfgError {
    /// The signature is not "QEMU".
    NotPresent,
    /// This QEMU has no DMA interface.
    NoDma,
    /// The device flagged a DMA error.
    Dma {
        /// The selector being read.
        key: u16,
    },
}

impl fmt::Display for FwCfgError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FwCfgError::NotPresent => write!(f, "fw_cfg: no QEMU signature"),
            FwCfgError::NoDma => write!(f, "fw_cfg: QEMU offers no DMA interface"),
            FwCfgError::Dma { key } => write!(f, "fw_cfg: DMA error reading item {key:#x}"),
        }
    }
}

/// The fw_cfg device.
pub struct FwCfg {
    registers: &'static FwCfgRegisters,
}

impl FwCfg {
    /// Probes the device at `base`.
    ///
    /// # Safety
    /// `base` must be the fw_cfg register block, mapped as Device memory for the hypervisor's
    /// life, and no one else may drive it.
    ///
    /// # Errors
    /// [`FwCfgError::NotPresent`] or [`FwCfgError::NoDma`].
    pub unsafe fn new(base: u64) -> Result<Self, FwCfgError> {
        // SAFETY: per the contract above.
        let registers = unsafe { &*(base as *const FwCfgRegisters) };
        let device = Self { registers };
        device.registers.selector.set(key::SIGNATURE.to_be());
        if device.registers.data.get().to_le_bytes()[..4] != *b"QEMU" {
            return Err(FwCfgError::NotPresent);
        }
        device.registers.selector.set(key::FEATURES.to_be());
        if (device.registers.data.get() as u32) & fw_cfg::FEATURE_DMA == 0 {
            return Err(FwCfgError::NoDma);
        }
        Ok(device)
    }

    /// Runs one DMA operation to completion. With `select`, the item is selected first (which
    /// rewinds it to offset 0); without, the operation continues where the last one stopped.
    fn dma(
        &self,
        item: u16,
        select: bool,
        op: u32,
        length: u32,
        address: u64,
    ) -> Result<(), FwCfgError> {
        let select_bits = if select {
            u32::from(item) << 16 | control::SELECT
        } else {
            0
        };
        let mut access = Box::new(DmaAccess {
            control: (select_bits | op).to_be(),
            length: length.to_be(),
            address: address.to_be(),
        });
        let descriptor = addr_of_mut!(*access);
        // The descriptor must be in memory before the device is told where it is.
        crate::arch::dsb_sy();
        self.registers.dma_address.set((descriptor as u64).to_be());
        loop {
            // SAFETY: the descriptor is live (boxed above) and the device writes its control
            // word concurrently, hence the volatile read.
            let status = u32::from_be(unsafe { addr_of!((*descriptor).control).read_volatile() });
            if status & control::ERROR != 0 {
                return Err(FwCfgError::Dma { key: item });
            }
            if status == 0 {
                break;
            }
            core::hint::spin_loop();
        }
        crate::arch::dsb_sy();
        Ok(())
    }

    /// Copies `length` bytes of item `item`, starting `offset` bytes in, to physical address
    /// `destination` (identity-mapped), in DMA operations of at most 1 GiB.
    ///
    /// # Errors
    /// [`FwCfgError::Dma`].
    pub fn read_to(
        &self,
        item: u16,
        offset: u64,
        destination: u64,
        length: u64,
    ) -> Result<(), FwCfgError> {
        const CHUNK: u64 = 1 << 30;
        let mut select = true;
        let mut skipped = 0;
        while skipped < offset {
            let chunk = (offset - skipped).min(CHUNK);
            self.dma(item, select, control::SKIP, chunk as u32, 0)?;
            select = false;
            skipped += chunk;
        }
        let mut done = 0;
        while done < length {
            let chunk = (length - done).min(CHUNK);
            self.dma(
                item,
                select,
                control::READ,
                chunk as u32,
                destination + done,
            )?;
            select = false;
            done += chunk;
        }
        Ok(())
    }

    /// Reads a whole item of `length` bytes into a vector.
    ///
    /// # Errors
    /// [`FwCfgError::Dma`].
    pub fn read_vec(&self, item: u16, length: usize) -> Result<Vec<u8>, FwCfgError> {
        let mut buffer = vec![0u8; length];
        if length > 0 {
            self.read_to(item, 0, buffer.as_mut_ptr() as u64, length as u64)?;
        }
        Ok(buffer)
    }

    /// Reads a little-endian u32 item (the legacy size keys).
    ///
    /// # Errors
    /// [`FwCfgError::Dma`].
    pub fn read_u32(&self, item: u16) -> Result<u32, FwCfgError> {
        let bytes = self.read_vec(item, 4)?;
        Ok(u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]))
    }

    /// The file directory.
    ///
    /// # Errors
    /// [`FwCfgError::Dma`].
    pub fn files(&self) -> Result<Vec<fw_cfg::File>, FwCfgError> {
        let count = self.read_vec(key::FILE_DIR, 4)?;
        let count = u32::from_be_bytes([count[0], count[1], count[2], count[3]]) as usize;
        let bytes = self.read_vec(key::FILE_DIR, 4 + count.min(4096) * fw_cfg::FILE_ENTRY_SIZE)?;
        Ok(fw_cfg::parse_directory(&bytes))
    }

    /// The contents of the file `name`, if QEMU has it.
    ///
    /// # Errors
    /// [`FwCfgError::Dma`].
    pub fn file(&self, name: &str) -> Result<Option<Vec<u8>>, FwCfgError> {
        match self.files()?.into_iter().find(|f| f.name == name) {
            Some(file) => Ok(Some(self.read_vec(file.select, file.size as usize)?)),
            None => Ok(None),
        }
    }

    /// The `-append` command line, without its NUL, if any.
    ///
    /// # Errors
    /// [`FwCfgError::Dma`].
    pub fn command_line(&self) -> Result<Option<String>, FwCfgError> {
        let size = self.read_u32(key::CMDLINE_SIZE)? as usize;
        if size == 0 {
            return Ok(None);
        }
        let bytes = self.read_vec(key::CMDLINE_DATA, size)?;
        let len = bytes.iter().position(|&b| b == 0).unwrap_or(bytes.len());
        Ok(Some(String::from_utf8_lossy(&bytes[..len]).into_owned()))
    }
}
