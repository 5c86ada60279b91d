//! What Ember's fuzz targets run: one function per target, each driving
//! the real code (devices, transport, PCI bus, legacy ports, loader,
//! config) the way the VMM drives it, on a real `GuestMemoryMmap`.
//!
//! The cargo-fuzz package in `fuzz/` has one `fuzz_targets/<name>.rs` per
//! entry of [`TARGETS`] that only calls the function here; the crate's
//! `tests/replay.rs` runs every seed in `fuzz/corpus/<name>/` and every
//! saved crash in `fuzz/regressions/<name>/` through the same functions as
//! part of `cargo test`.
//!
//! A target function never panics by itself: any input is valid, and
//! whatever the code under test refuses is simply an error. A panic (or,
//! under the fuzzer, a sanitizer report, a timeout or running out of
//! memory) is a bug in the code under test. Some targets also check what
//! the code promises (a block device never reads past the end of its
//! disk, a BAR moves only to an aligned address, ...) and panic when it
//! breaks its word.
//!
//! ```
//! // The empty input is as valid as any other.
//! for (name, run) in ember_fuzz_harness::TARGETS {
//!     run(&[]);
//!     assert!(!name.is_empty());
//! }
//! ```
#![forbid(unsafe_code)]

pub mod api;
pub mod balloon;
pub mod blk;
pub mod config;
pub mod cpu;
pub mod guest;
pub mod input;
pub mod legacy;
pub mod loader;
pub mod migration;
pub mod mmio;
pub mod net;
pub mod net_ctrl;
pub mod net_stream;
pub mod pci;
pub mod qcow2;
pub mod queue;
pub mod seeds;
pub mod snapshot;
pub mod transport;
pub mod uffd;
pub mod vsock;

pub use api::api_request;
pub use balloon::virtio_balloon;
pub use blk::{virtio_blk_chain, virtio_blk_request};
pub use config::config;
pub use cpu::cpu_model;
pub use legacy::legacy_ports;
pub use loader::{loader_bzimage, loader_elf};
pub use migration::migration_stream;
pub use mmio::virtio_mmio_transport;
pub use net::{virtio_net_rx, virtio_net_tx};
pub use net_ctrl::virtio_net_ctrl;
pub use net_stream::virtio_net_stream;
pub use pci::pci_config_space;
pub use qcow2::qcow2_image;
pub use queue::virtio_queue_chain;
pub use snapshot::snapshot_state;
pub use transport::virtio_pci_transport;
pub use uffd::uffd_handshake;
pub use vsock::virtio_vsock;

/// A fuzz target: its name (the cargo-fuzz target and the corpus
/// directory) and its function.
pub type Target = (&'static str, fn(&[u8]));

/// Every target, by name.
pub const TARGETS: &[Target] = &[
    ("api_request", api_request),
    ("virtio_blk_request", virtio_blk_request),
    ("virtio_blk_chain", virtio_blk_chain),
    ("virtio_net_tx", virtio_net_tx),
    ("virtio_net_rx", virtio_net_rx),
    ("virtio_net_ctrl", virtio_net_ctrl),
    ("virtio_net_stream", virtio_net_stream),
    ("virtio_queue_chain", virtio_queue_chain),
    ("virtio_pci_transport", virtio_pci_transport),
    ("virtio_mmio_transport", virtio_mmio_transport),
    ("pci_config_space", pci_config_space),
    ("legacy_ports", legacy_ports),
    ("loader_bzimage", loader_bzimage),
    ("loader_elf", loader_elf),
    ("config", config),
    ("snapshot_state", snapshot_state),
    ("uffd_handshake", uffd_handshake),
    ("qcow2_image", qcow2_image),
    ("cpu_model", cpu_model),
    ("migration_stream", migration_stream),
    ("virtio_balloon", virtio_balloon),
    ("virtio_vsock", virtio_vsock),
];

/// The target called `name`.
pub fn target(name: &str) -> Option<fn(&[u8])> {
    TARGETS.iter().find(|(n, _)| *n == name).map(|(_, f)| *f)
}
