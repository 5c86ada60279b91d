//! The `virtio_vsock` fuzz target: see `ember_fuzz_harness::virtio_vsock`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| ember_fuzz_harness::virtio_vsock(data));
