//! The DMA rows of the benchmark guest: DMA_MAP then DMA_UNMAP of one BIDIRECTIONAL buffer of
//! 4 KiB, 64 KiB and 1 MiB for QEMU's `edu` device (StreamID 0x10), in whatever mode and
//! coherence the hypervisor's configuration gives it (scripts/bench boots one guest per
//! combination with `stagehand.bench=dma` on the command line, which runs these rows only).
//!
//! One line per size: `BENCH-DMA <strict|shared> <coherent|noncoherent> <size> <instructions>
//! <map commands> <unmap commands>`, the instructions per DMA_MAP + DMA_UNMAP pair (round trips
//! included) and the SMMU commands each call issued (CMD_SYNC included), read back from the
//! calls' own audit records (`smmu_commands`). A failed call prints a `BENCH-ERROR` line.

use alloc::vec;
use alloc::vec::Vec;

use guest_rt::println;
use guest_suites::edu;
use guest_suites::hypercall;
use stagehand_abi::audit::{kind, Record, RECORD_SIZE};
use stagehand_abi::function;

use super::{per_iteration, size_name, KIB, MIB};

/// Where the buffers lie, as an offset from the start of guest RAM (past the other rows' areas).
const DMA_AREA: u64 = 160 * MIB;
/// DMA_MAP direction BIDIRECTIONAL: the most maintenance for a non-coherent device.
const BIDIRECTIONAL: u64 = 0;

/// Whether the command line asks for the DMA rows only (`stagehand.bench=dma`).
pub fn requested() -> bool {
    let tree = guest_rt::dt::tree();
    let bootargs = tree.chosen().bootargs().unwrap_or("");
    bootargs
        .split_whitespace()
        .any(|arg| arg == "stagehand.bench=dma")
}

/// edu's DEV_INFO flags (bit 0 coherent, bit 1 strict), if DEV_INFO lists it.
fn edu_flags() -> Option<u64> {
    (0..32u64)
        .map(|index| hypercall(function::DEV_INFO, &[index]))
        .take_while(|regs| regs.x0 == 0)
        .find(|regs| regs.x1 == edu::STREAM_ID as u64)
        .map(|regs| regs.x3)
}

/// The `smmu_commands` of the first DMA_MAP and DMA_UNMAP records from sequence `first` on.
fn smmu_commands_since(first: u64) -> Option<(u32, u32)> {
    let mut buffer = vec![0u64; 16 * RECORD_SIZE / 8];
    let regs = hypercall(
        function::AUDIT_READ,
        &[buffer.as_mut_ptr() as u64, (buffer.len() * 8) as u64, first],
    );
    if regs.x0 != 0 {
        return None;
    }
    let bytes: Vec<u8> = buffer.iter().flat_map(|w| w.to_le_bytes()).collect();
    let records: Vec<Record> = (0..regs.x1 as usize)
        .filter_map(|i| Record::parse(&bytes[i * RECORD_SIZE..(i + 1) * RECORD_SIZE]))
        .collect();
    let commands = |wanted: u8| {
        records
            .iter()
            .find(|r| r.kind == wanted)
            .map(|r| r.smmu_commands.get())
    };
    Some((commands(kind::DMA_MAP)?, commands(kind::DMA_UNMAP)?))
}

/// Prints the DMA rows.
pub fn run() {
    let Some(flags) = edu_flags() else {
        println!("BENCH-ERROR dma: DEV_INFO lists no edu device (StreamID 0x10)");
        return;
    };
    let coherence = if flags & 1 != 0 {
        "coherent"
    } else {
        "noncoherent"
    };
    let mode = if flags & 2 != 0 { "strict" } else { "shared" };
    let ipa = guest_rt::dt::main_ram().base as u64 + DMA_AREA;
    let device = edu::STREAM_ID as u64;
    for (size, iterations) in [(4 * KIB, 200), (64 * KIB, 50), (MIB, 10)] {
        let mut failed = false;
        // One pair first, outside the measurement: a strict device's first mapping allocates
        // its rights table (a count per page of guest RAM) and the stage-2 tables the buffer
        // needs, once; the rows give the cost of every later pair.
        let warm = hypercall(function::DMA_MAP, &[device, ipa, size, BIDIRECTIONAL]);
        let warm_unmap = hypercall(function::DMA_UNMAP, &[warm.x2]);
        failed |= warm.x0 != 0 || warm_unmap.x0 != 0;
        let cost = per_iteration(iterations, || {
            let map = hypercall(function::DMA_MAP, &[device, ipa, size, BIDIRECTIONAL]);
            let unmap = hypercall(function::DMA_UNMAP, &[map.x2]);
            failed |= map.x0 != 0 || unmap.x0 != 0;
        });
        // One more pair, bracketed by a mark, to read what the SMMU was told.
        let mark = hypercall(function::AUDIT_MARK, &[0xd3a]);
        let map = hypercall(function::DMA_MAP, &[device, ipa, size, BIDIRECTIONAL]);
        let unmap = hypercall(function::DMA_UNMAP, &[map.x2]);
        failed |= mark.x0 != 0 || map.x0 != 0 || unmap.x0 != 0;
        let commands = smmu_commands_since(mark.x1);
        match (failed, commands) {
            (false, Some((on_map, on_unmap))) => println!(
                "BENCH-DMA {mode} {coherence} {} {cost} {on_map} {on_unmap}",
                size_name(size)
            ),
            _ => println!(
                "BENCH-ERROR dma-map-unmap-{} {mode} {coherence}: a call failed or its audit records are missing",
                size_name(size)
            ),
        }
    }
}
