//! The `legacy_ports` fuzz target: see `ember_fuzz_harness::legacy_ports`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| ember_fuzz_harness::legacy_ports(data));
