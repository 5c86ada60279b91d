//! The `migration_stream` fuzz target: see `ember_fuzz_harness::migration_stream`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| ember_fuzz_harness::migration_stream(data));
