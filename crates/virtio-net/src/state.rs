//! A NIC's saved state: its MAC address, what the control queue set (the
//! receive filter, a pending announcement) and a received frame still
//! waiting for guest buffers, by queue pair. The transport and queue positions are the virtio
//! crate's [`TransportState`](ember_virtio::TransportState); the tap is
//! reopened by name when the VM is restored.

use serde::{Deserialize, Serialize};

use crate::ctrl::RxFilterState;

/// The NIC's own state.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetState {
    /// The MAC address the NIC was built with (the guest may have set
    /// another, in `filter`).
    pub mac: [u8; 6],
    /// A frame (virtio-net header first) read from the first queue pair's
    /// backend and not yet delivered.
    pub pending_frame: Option<Vec<u8>>,
    /// The same for the other queue pairs of a multi-queue NIC: (pair,
    /// frame).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub pair_pending: Vec<(u16, Vec<u8>)>,
    /// The receive filter, MAC and queue pairs the control queue set
    /// (absent in snapshots older than the control queue, and when the
    /// device was not activated).
    #[serde(default)]
    pub filter: Option<RxFilterState>,
    /// The guest was asked to announce itself and has not acknowledged.
    #[serde(default)]
    pub announcing: bool,
}
