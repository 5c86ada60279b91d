//! The `virtio_net_ctrl` fuzz target: see `ember_fuzz_harness::virtio_net_ctrl`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| ember_fuzz_harness::virtio_net_ctrl(data));
