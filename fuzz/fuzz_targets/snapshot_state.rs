//! The `snapshot_state` fuzz target: see `ember_fuzz_harness::snapshot_state`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| ember_fuzz_harness::snapshot_state(data));
