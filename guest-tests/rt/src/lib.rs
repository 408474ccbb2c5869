//! EL1 runtime for stagehand test guests: entry for the boot and secondary CPUs, exception
//! vectors with fault probes, a stage-1 identity map, the PL011 console, device-tree access,
//! a small heap, SMCCC/PSCI conduits and the test framework whose output the runner parses.
//!
//! A suite is a `no_std`, `no_main` binary linked with this crate's `link.ld`:
//!
//! ```ignore
//! guest_rt::main!(main);
//! fn main() -> ! {
//!     guest_rt::test::run_suite("example", &guest_rt::tests![first_test])
//! }
//! ```

#![no_std]
#![deny(unsafe_op_in_unsafe_fn, clippy::undocumented_unsafe_blocks)]
#![warn(missing_docs)]

extern crate alloc;

pub mod arch;
pub mod boot;
pub mod console;
pub mod cpu;
pub mod dt;
pub mod el0;
pub mod exceptions;
mod heap;
pub mod mmu;
pub mod probe;
pub mod psci;
pub mod test;

/// Re-exports for the macros of this crate.
#[doc(hidden)]
pub mod __private {
    pub use alloc::format;
}

/// Declares the suite's main function, which the boot CPU calls once the runtime is up:
/// `guest_rt::main!(main);` with `fn main() -> !`.
#[macro_export]
macro_rules! main {
    ($main:path) => {
        #[unsafe(no_mangle)]
        fn __guest_rt_main() -> ! {
            let main: fn() -> ! = $main;
            main()
        }
    };
}

#[panic_handler]
fn panic(info: &core::panic::PanicInfo<'_>) -> ! {
    test::abort_suite(&alloc::format!("panic: {}", info))
}
