//! The `config` fuzz target: see `ember_fuzz_harness::config`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| ember_fuzz_harness::config(data));
