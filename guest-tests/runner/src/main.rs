//! Test runner.
fn main() {}
