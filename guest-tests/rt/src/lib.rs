//! EL1 runtime for test guests.
#![no_std]
