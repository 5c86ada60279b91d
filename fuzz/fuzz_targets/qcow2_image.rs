//! The `qcow2_image` fuzz target: see `ember_fuzz_harness::qcow2_image`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| ember_fuzz_harness::qcow2_image(data));
