//! The `pci_config_space` fuzz target: see `ember_fuzz_harness::pci_config_space`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| ember_fuzz_harness::pci_config_space(data));
