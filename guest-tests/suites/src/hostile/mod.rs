//! The hostile suites: a guest that attacks the hypervisor the way a malicious kernel would, and
//! checks that every attack gets what the architecture gives (a value, an UNDEF, an external
//! abort, an error status) and that the hypervisor lives on.
//!
//! An attack that kills the hypervisor ends the QEMU run, and with it every later test of the
//! run; so the attacks are split over several runner rows, one binary each, named after the
//! group it runs ([`run`]). Every row prints its seed; randomness comes from [`Rng`] only.
//!
//! | row | vCPUs | what |
//! |---|---|---|
//! | `hostile` | 4 | audit-order interleaving (strict edu, audit replayed), edu escapes and the split/merge race, an abort into AArch32 EL0 |
//! | `hostile-mixed` | 1 | a strict DMA_MAP of a range part NC, part WB (audit replayed) |
//! | `hostile-dma` | 4 | edu escapes and the race again, in shared mode |
//! | `hostile-fuzz` | 4 | the hypercall fuzzer |
//! | `hostile-sysreg` | 1 | every MRS/MSR encoding from EL1 and EL0 |
//! | `hostile-ipa` | 1 | every page of IPA space below RAM, and samples above |
//! | `hostile-gicr` | 4 | redistributor reproducers |
//! | `hostile-at` | 1 | stage-1 tables in memory the guest does not own, walked by the hypervisor |
//! | `hostile-hlt` | 1 | semihosting calls (`hlt #0xf000`) from EL0 and EL1; the row's name avoids the word, which no QEMU command line of the runner may contain |

pub mod aarch32;
pub mod at;
pub mod dma;
pub mod fuzz;
pub mod ipa;
pub mod semihosting;
pub mod stubs;
pub mod sysreg;

use alloc::format;
use alloc::string::String;

use guest_rt::check_eq;
use guest_rt::test::Test;
use guest_rt::{println, tests};
use stagehand_abi::function;

use crate::hypercall;
use aarch32::*;
use at::*;
use dma::*;
use fuzz::*;
use ipa::*;
use semihosting::*;
use sysreg::*;

/// Default seed; `stagehand.seed=<hex>` on the command line overrides it.
const DEFAULT_SEED: u64 = 0x05ee_d0f5_7a6e_4a1d;

/// Runs the tests of the row named `suite` (the binary's name).
pub fn run(suite: &'static str) -> ! {
    println!("{}: seed {:#x}", suite, seed());
    let tests: &[Test] = match suite {
        "hostile" => &tests![
            audit_order_interleaving,
            escapes_are_blocked,
            split_merge_race_loses_no_write,
            abort_into_aarch32_el0_uses_the_aarch32_vector,
            hypervisor_still_answers,
        ],
        "hostile-mixed" => &tests![strict_map_of_a_mixed_nc_wb_range, hypervisor_still_answers],
        "hostile-dma" => &tests![
            escapes_are_blocked,
            split_merge_race_loses_no_write,
            hypervisor_still_answers,
        ],
        "hostile-fuzz" => &tests![hypercall_fuzz, hypervisor_still_answers],
        "hostile-sysreg" => &tests![
            tpidr2_el0_from_el1,
            tpidr2_el0_from_el0,
            smpri_el1_from_el1,
            scxtnum_el1_from_el1,
            scxtnum_el0_from_el1,
            scxtnum_el0_from_el0,
            sweep_from_el1,
            sweep_from_el0,
            hypervisor_still_answers,
        ],
        "hostile-ipa" => &tests![
            unpopulated_redistributor_frame_0x080c0000,
            sweep_below_ram,
            sweep_above_ram,
            hypervisor_still_answers,
        ],
        "hostile-gicr" => &tests![
            propbaser_upper_half_reads_zero,
            pendbaser_upper_half_reads_zero,
            redistributor_0x080e0000,
            first_unpopulated_redistributor_frame,
            hypervisor_still_answers,
        ],
        "hostile-at" => &tests![
            table_in_gicr_hole_0x080d0000,
            table_in_flash,
            table_in_fw_cfg,
            table_in_smmu,
            table_in_hypervisor_uart,
            table_past_ram,
            table_in_trapped_gicr_page,
            hypervisor_still_answers,
        ],
        "hostile-hlt" => &tests![
            sys_exit_from_el0_is_undefined,
            sys_system_from_el0_is_undefined,
            sys_system_from_el1_is_undefined,
            sys_exit_from_el1_is_undefined,
            hypervisor_still_answers,
        ],
        _ => &[],
    };
    guest_rt::test::run_suite(suite, tests)
}

/// The run's seed.
pub fn seed() -> u64 {
    let tree = guest_rt::dt::tree();
    tree.chosen()
        .bootargs()
        .unwrap_or("")
        .split_whitespace()
        .find_map(|arg| arg.strip_prefix("stagehand.seed="))
        .and_then(|hex| u64::from_str_radix(hex.trim_start_matches("0x"), 16).ok())
        .unwrap_or(DEFAULT_SEED)
}

/// xorshift64*: small, fast, deterministic.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    /// A generator for stream `stream` of the run's seed (one per vCPU or per test).
    pub fn new(stream: u64) -> Rng {
        let mut state = seed() ^ stream.wrapping_mul(0x9e37_79b9_7f4a_7c15);
        if state == 0 {
            state = 1;
        }
        let mut rng = Rng(state);
        for _ in 0..4 {
            rng.next_u64();
        }
        rng
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// A number below `bound` (not zero).
    pub fn below(&mut self, bound: u64) -> u64 {
        self.next_u64() % bound
    }

    /// One element of `items`.
    pub fn pick<T: Copy>(&mut self, items: &[T]) -> T {
        items[self.below(items.len() as u64) as usize]
    }
}

/// REVISION answers 1.0: the hypervisor is alive.
pub fn alive(after: &str) -> Result<(), String> {
    let regs = hypercall(function::REVISION, &[]);
    check_eq!(
        (regs.x0, regs.x1),
        (stagehand_abi::ABI_MAJOR, stagehand_abi::ABI_MINOR),
        "REVISION after {}",
        after
    );
    Ok(())
}

fn hypervisor_still_answers() -> Result<(), String> {
    alive("the suite")
}

/// Up to a few failure messages and the total count, for sweeps that must go on after one.
#[derive(Default)]
pub struct Failures {
    count: u64,
    first: alloc::vec::Vec<String>,
}

impl Failures {
    /// Records one failure.
    pub fn add(&mut self, message: String) {
        self.count += 1;
        if self.first.len() < 6 {
            self.first.push(message);
        }
    }

    /// Ok when nothing failed, else a message with the count and the first few.
    pub fn result(&self, what: &str) -> Result<(), String> {
        if self.count == 0 {
            return Ok(());
        }
        Err(format!(
            "{} {} failure(s), first: {}",
            self.count,
            what,
            self.first.join("; ")
        ))
    }
}
