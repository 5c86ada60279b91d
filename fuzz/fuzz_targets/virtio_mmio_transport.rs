//! The `virtio_mmio_transport` fuzz target: see `ember_fuzz_harness::virtio_mmio_transport`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| ember_fuzz_harness::virtio_mmio_transport(data));
