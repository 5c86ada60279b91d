//! The `cpu_model` fuzz target: see `ember_fuzz_harness::cpu_model`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| ember_fuzz_harness::cpu_model(data));
