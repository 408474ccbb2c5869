//! The portable core of the hypervisor: stage-2 tables, guest image parsing, configuration,
//! PSCI, hypercall decoding and every hypercall handler (`hypercall`). Nothing here touches hardware; the aarch64 layer in `hyp`
//! calls into it, and `cargo test` runs it on the host.

#![cfg_attr(not(test), no_std)]
// Denied everywhere; `lock` alone allows it (a lock lends references to the value it guards).
#![deny(unsafe_code)]

extern crate alloc;

pub mod address;
pub mod alias;
pub mod attributes;
pub mod audit;
pub mod call;
pub mod config;
pub mod dma;
pub mod esr;
pub mod geometry;
pub mod gic;
pub mod hypercall;
pub mod image;
pub mod inject;
pub mod layout;
pub mod lock;
pub mod maintenance;
pub mod noncoherent;
pub mod pagetable;
pub mod psci;
pub mod requests;
pub mod traps;
