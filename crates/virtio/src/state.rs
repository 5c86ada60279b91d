//! The saved state of a virtio-pci device's transport and queues, plain
//! data apart from the guest memory, eventfds and interrupt routes the VMM
//! hands the rebuilt device.

use ember_pci::MsixState;
use serde::{Deserialize, Serialize};

/// The version of [`TransportState`]'s layout.
pub const TRANSPORT_STATE_VERSION: u32 = 1;

/// One virtqueue: its configuration and the device's position in it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QueueState {
    /// The most the device offers.
    pub max_size: u16,
    /// What the driver chose.
    pub size: u16,
    /// The driver enabled it.
    pub ready: bool,
    /// Descriptor table address.
    pub desc_table: u64,
    /// Available ring address.
    pub avail_ring: u64,
    /// Used ring address.
    pub used_ring: u64,
    /// The next available entry the device takes.
    pub next_avail: u16,
    /// The next used entry the device fills.
    pub next_used: u16,
    /// VIRTIO_RING_F_EVENT_IDX is in use.
    pub event_idx: bool,
}

impl From<virtio_queue::QueueState> for QueueState {
    fn from(q: virtio_queue::QueueState) -> Self {
        QueueState {
            max_size: q.max_size,
            size: q.size,
            ready: q.ready,
            desc_table: q.desc_table,
            avail_ring: q.avail_ring,
            used_ring: q.used_ring,
            next_avail: q.next_avail,
            next_used: q.next_used,
            event_idx: q.event_idx_enabled,
        }
    }
}

impl From<QueueState> for virtio_queue::QueueState {
    fn from(q: QueueState) -> Self {
        virtio_queue::QueueState {
            max_size: q.max_size,
            next_avail: q.next_avail,
            next_used: q.next_used,
            event_idx_enabled: q.event_idx,
            size: q.size,
            ready: q.ready,
            desc_table: q.desc_table,
            avail_ring: q.avail_ring,
            used_ring: q.used_ring,
        }
    }
}

/// A virtio-pci function's state: PCI config space, MSI-X, the common
/// configuration registers, and the queues.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TransportState {
    /// Layout version ([`TRANSPORT_STATE_VERSION`]).
    pub version: u32,
    /// The virtio device type.
    pub device_type: u32,
    /// The 256 bytes of PCI configuration space.
    pub pci_config: Vec<u8>,
    /// The MSI-X table and pending bits.
    pub msix: MsixState,
    /// Device feature select.
    pub device_feature_select: u32,
    /// Driver feature select.
    pub driver_feature_select: u32,
    /// The features the driver acknowledged.
    pub driver_features: u64,
    /// The device status register.
    pub status: u8,
    /// The configuration generation.
    pub config_generation: u8,
    /// Queue select.
    pub queue_select: u16,
    /// The configuration-change MSI-X vector.
    pub config_vector: u16,
    /// Each queue's MSI-X vector.
    pub queue_vectors: Vec<u16>,
    /// The ISR status byte.
    pub isr: u8,
    /// Each queue as the driver configured it.
    pub queues: Vec<QueueState>,
    /// The device was activated (DRIVER_OK and running).
    pub activated: bool,
    /// The activated device's queues, in order, with their positions.
    pub device_queues: Vec<QueueState>,
}
