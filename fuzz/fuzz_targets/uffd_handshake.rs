//! The `uffd_handshake` fuzz target: see `ember_fuzz_harness::uffd_handshake`.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| ember_fuzz_harness::uffd_handshake(data));
