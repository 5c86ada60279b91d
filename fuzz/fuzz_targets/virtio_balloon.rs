//! The `virtio_balloon` fuzz target: see `ember_fuzz_harness::virtio_balloon`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| ember_fuzz_harness::virtio_balloon(data));
