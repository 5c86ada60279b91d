//! The `virtio_net_rx` fuzz target: see `ember_fuzz_harness::virtio_net_rx`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| ember_fuzz_harness::virtio_net_rx(data));
