//! Suite `hostile-sysreg`: one row of the hostile suites (see guest-tests/suites/src/hostile/mod.rs).
#![no_std]
#![no_main]

guest_rt::main!(main);

fn main() -> ! {
    guest_suites::hostile::run(env!("CARGO_BIN_NAME"))
}
