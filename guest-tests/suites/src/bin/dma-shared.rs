//! Suite `dma-shared`: suite `dma` (see dma.rs) as a binary of its own name, for the runner row
//! that leaves `edu` in the default shared mode, coherent; the suite takes its name from the
//! binary.
#![no_std]
#![no_main]

#[allow(unused_attributes)]
#[path = "dma.rs"]
mod dma;
