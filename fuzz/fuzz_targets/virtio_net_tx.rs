//! The `virtio_net_tx` fuzz target: see `ember_fuzz_harness::virtio_net_tx`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| ember_fuzz_harness::virtio_net_tx(data));
