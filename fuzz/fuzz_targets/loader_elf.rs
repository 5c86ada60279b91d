//! The `loader_elf` fuzz target: see `ember_fuzz_harness::loader_elf`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| ember_fuzz_harness::loader_elf(data));
