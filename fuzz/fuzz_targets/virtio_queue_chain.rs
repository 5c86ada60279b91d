//! The `virtio_queue_chain` fuzz target: see `ember_fuzz_harness::virtio_queue_chain`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| ember_fuzz_harness::virtio_queue_chain(data));
