//! The `virtio_pci_transport` fuzz target: see `ember_fuzz_harness::virtio_pci_transport`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| ember_fuzz_harness::virtio_pci_transport(data));
