//! Board support: what the hypervisor learns from QEMU's device tree, the guest's edited copy of
//! it, and the register blocks of the devices it drives (one module per device).

#![no_std]

extern crate alloc;
