//! Suite `attr-nofwb`: suite `attr` (see attr.rs) as a binary of its own name, for the runner
//! row that turns FEAT_S2FWB off (`fwb=off`); the suite takes its name from the binary.
#![no_std]
#![no_main]

#[allow(unused_attributes)]
#[path = "attr.rs"]
mod attr;
