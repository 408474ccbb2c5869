//! A time-bounded fuzzer over hypercall decoding and the attribute manager, on the stable
//! toolchain so that CI runs it on every push: random register values (biased towards the edges
//! that matter: RAM bounds, page and line boundaries, flag bits, huge and wrapping sizes) go
//! through `call::decode`, the request decoders and the ledger operations, and after every
//! call the stage 2, the ledger and the hypervisor's alias must agree and nothing may panic.
//!
//! `STAGEHAND_FUZZ_SECONDS` sets the duration (default 3 s); `STAGEHAND_FUZZ_SEED` replays a
//! run (the seed is printed when a case fails).

use hyp_core::alias::AliasPlace;
use hyp_core::attributes::{Attribute, AttributeManager};
use hyp_core::call::{self, Call};
use hyp_core::layout::GuestRam;
use hyp_core::maintenance::Recorder;
use hyp_core::pagetable::{Table, TableMemory, ENTRIES, PAGE_SIZE};
use hyp_core::requests;
use stagehand_abi::function;
use std::time::{Duration, Instant};

/// xorshift64*: small, fast, reproducible.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

const RAM: GuestRam = GuestRam {
    ipa: 0x4000_0000,
    pa: 0x1_0000_0000,
    size: 16 << 20,
};

/// Table memory in a vector (the crate's own fake is private to its unit tests).
struct Tables(Vec<Box<Table>>);

const TABLE_BASE: u64 = 0x8000_0000;

impl TableMemory for Tables {
    fn allocate(&mut self) -> Option<u64> {
        if self.0.len() >= 4096 {
            return None;
        }
        self.0.push(Box::new([0; ENTRIES]));
        Some(TABLE_BASE + (self.0.len() as u64 - 1) * PAGE_SIZE)
    }
    fn entry(&self, table: u64, index: usize) -> u64 {
        self.0[((table - TABLE_BASE) / PAGE_SIZE) as usize][index]
    }
    fn set_entry(&mut self, table: u64, index: usize, value: u64) {
        self.0[((table - TABLE_BASE) / PAGE_SIZE) as usize][index] = value;
    }
}

/// An address biased towards the interesting places.
fn address(rng: &mut Rng) -> u64 {
    let base = match rng.below(8) {
        0 => RAM.ipa,
        1 => RAM.ipa_end(),
        2 => RAM.ipa + rng.below(RAM.size),
        3 => 0x0900_0000, // the guest's UART (MMIO: DENIED)
        4 => u64::MAX - rng.below(0x10000),
        5 => rng.next(),
        6 => RAM.ipa + (rng.below(RAM.size / PAGE_SIZE) * PAGE_SIZE),
        _ => RAM.ipa + rng.below(8) * (2 << 20),
    };
    match rng.below(4) {
        0 => base.wrapping_add(rng.below(64)),
        1 => base.wrapping_sub(rng.below(64)),
        _ => base,
    }
}

fn size(rng: &mut Rng) -> u64 {
    match rng.below(8) {
        0 => 0,
        1 => PAGE_SIZE,
        2 => rng.below(8) * PAGE_SIZE,
        3 => rng.below(RAM.size),
        4 => u64::MAX - rng.below(0x1000),
        5 => rng.next(),
        6 => (2 << 20) * rng.below(5),
        _ => rng.below(3 << 20) & !(PAGE_SIZE - 1),
    }
}

fn small_or_wild(rng: &mut Rng) -> u64 {
    if rng.below(2) == 0 {
        rng.below(0x400)
    } else {
        rng.next()
    }
}

fn run(seed: u64, deadline: Instant) -> u64 {
    let mut rng = Rng(seed | 1);
    let mut tables = Tables(Vec::new());
    let geometry =
        hyp_core::geometry::Geometry::for_cpu(if seed & 4 == 0 { 4 } else { 2 }).unwrap();
    let alias = AliasPlace {
        va: 0x7f00_0000_0000,
        table: tables.allocate().unwrap(),
    };
    let mut manager =
        AttributeManager::new(&mut tables, seed & 2 == 0, RAM, &geometry, alias).unwrap();
    manager.map_mmio(&mut tables, 0x0900_0000, 0x1000).unwrap();
    let mut arch = Recorder::new();
    let mut iterations = 0;
    let functions = [
        function::MEM_SET_ATTR,
        function::MEM_GET_ATTR,
        function::CACHE_OP,
        function::CACHE_OP_BATCH,
        function::MEM_QUERY_VA,
        function::DMA_MAP,
        function::AUDIT_READ,
        0x8400_0003,
        0xC400_0003,
        0x8000_0001,
    ];
    while Instant::now() < deadline {
        iterations += 1;
        let id = if rng.below(4) == 0 {
            rng.next()
        } else {
            functions[rng.below(functions.len() as u64) as usize] as u64
        };
        let args = [
            address(&mut rng),
            size(&mut rng),
            small_or_wild(&mut rng),
            rng.next(),
            rng.next(),
            rng.next(),
        ];
        arch.clear();
        match call::decode(id, &args) {
            Call::MemSetAttr {
                ipa,
                size,
                attribute,
            } => {
                if let Some(attribute) = Attribute::from_abi(attribute) {
                    if let Ok(p) =
                        manager.set_attribute(&mut tables, &mut arch, ipa, size, attribute)
                    {
                        assert!(
                            p.done > 0 && p.done <= hyp_core::attributes::WORK_BUDGET,
                            "seed {seed:#x}"
                        );
                    }
                }
            }
            Call::MemGetAttr { ipa } => {
                let _ = manager.get(&tables, ipa);
            }
            Call::CacheOp { address, size, op } => {
                if let Ok(request) = requests::cache_request(op) {
                    if !request.by_va {
                        if let Ok(p) = manager.cache_operation(
                            &mut arch,
                            address,
                            size,
                            request.op,
                            hyp_core::attributes::Requester::Guest,
                        ) {
                            assert!(p.done > 0 && p.done <= size, "seed {seed:#x}");
                        }
                    }
                }
            }
            Call::CacheOpBatch { count, cookie, .. } => {
                let _ = requests::Cookie::decode(cookie, count);
                let mut entry = [0u8; requests::BATCH_ENTRY_SIZE];
                entry.iter_mut().for_each(|b| *b = rng.next() as u8);
                let _ = requests::batch_entry(&entry);
            }
            Call::MemQueryVa { access, .. } => {
                let _ = requests::query_access(access);
                let _ = requests::par(rng.next());
            }
            Call::DmaMap { ipa, size, .. } => {
                // Pins come and go as DMA mappings would.
                if rng.below(2) == 0 {
                    let _ = manager.pin(
                        &mut tables,
                        &mut arch,
                        ipa & !(PAGE_SIZE - 1),
                        size.min(1 << 20) & !(PAGE_SIZE - 1),
                    );
                } else {
                    manager.unpin(ipa & !(PAGE_SIZE - 1), size.min(1 << 20) & !(PAGE_SIZE - 1));
                }
            }
            _ => {}
        }
        if let Err(problem) = manager.check_invariants(&tables) {
            panic!("seed {seed:#x}, iteration {iterations}: {problem}");
        }
    }
    iterations
}

#[test]
fn fuzz_decoding_and_the_ledger() {
    let seconds: u64 = std::env::var("STAGEHAND_FUZZ_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3);
    let seed: u64 = std::env::var("STAGEHAND_FUZZ_SEED")
        .ok()
        .and_then(|s| u64::from_str_radix(s.trim_start_matches("0x"), 16).ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(1, |d| d.as_nanos() as u64)
        });
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let mut total = 0;
    let mut round = 0u64;
    while Instant::now() < deadline {
        let round_seed = seed.wrapping_add(round.wrapping_mul(0x9e37_79b9_7f4a_7c15));
        let round_deadline = (Instant::now() + Duration::from_millis(500)).min(deadline);
        total += run(round_seed, round_deadline);
        round += 1;
    }
    eprintln!("fuzz: {total} calls in {round} rounds from seed {seed:#x}");
    assert!(total > 0);
}
