//! Board support: what the hypervisor learns from QEMU's device tree, the guest's edited copy of
//! it, and the register blocks of the devices it drives (one module per device).

#![cfg_attr(not(test), no_std)]

extern crate alloc;

pub mod board;
mod fdt_reader;
pub mod fw_cfg;
pub mod guest_dt;
pub mod pci;
pub mod pl011;
pub mod smmuv3;
