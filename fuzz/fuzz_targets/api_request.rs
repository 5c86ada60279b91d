//! The `api_request` fuzz target: see `ember_fuzz_harness::api_request`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| ember_fuzz_harness::api_request(data));
