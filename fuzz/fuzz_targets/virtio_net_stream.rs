//! The `virtio_net_stream` fuzz target: see `ember_fuzz_harness::virtio_net_stream`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| ember_fuzz_harness::virtio_net_stream(data));
