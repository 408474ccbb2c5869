//! Suite `dma-shared-nc-smmu`: suite `dma` (see dma.rs) as a binary of its own name, for the
//! runner row that runs it in shared mode with the SMMU treated as non-coherent
//! (`smmu-coherent=off`), so that the guest's stage 2 is cleaned entry by entry on every
//! attribute change; the suite takes its name from the binary.
#![no_std]
#![no_main]

#[allow(unused_attributes)]
#[path = "dma.rs"]
mod dma;
