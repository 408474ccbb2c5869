//! Shared helpers for the suites.
#![no_std]
