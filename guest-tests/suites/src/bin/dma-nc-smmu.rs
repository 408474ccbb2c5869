//! Suite `dma-nc-smmu`: suite `dma` (see dma.rs) as a binary of its own name, for the runner row
//! that runs it strict with the SMMU treated as non-coherent (`smmu-coherent=off`), so that every
//! clean of the stream table, the queues and the strict device's tables runs; the suite takes its
//! name from the binary.
#![no_std]
#![no_main]

#[allow(unused_attributes)]
#[path = "dma.rs"]
mod dma;
