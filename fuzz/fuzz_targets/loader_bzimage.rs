//! The `loader_bzimage` fuzz target: see `ember_fuzz_harness::loader_bzimage`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| ember_fuzz_harness::loader_bzimage(data));
