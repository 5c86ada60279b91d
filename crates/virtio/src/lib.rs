//! What every Ember virtio device shares: the [`VirtioDevice`] trait a
//! device implements, and the transports that put it before the guest:
//! modern virtio-pci on a PCI bus, and virtio-mmio.
#![forbid(unsafe_code)]

pub mod device;
pub mod event_handler;
pub mod mmio;
pub mod queue;
pub mod state;
pub mod transport;

pub use device::{
    ActivateContext, ActivateError, BackendInterest, CountingInterrupt, InterruptKind,
    VirtioDevice, VirtioInterrupt,
};
pub use event_handler::QueueEvents;
pub use state::{QueueState, TransportState};
pub use transport::{VirtioPciDevice, VIRTIO_BAR_SIZE};
