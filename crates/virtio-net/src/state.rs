//! A NIC's saved state: its MAC address and a received frame still waiting
//! for guest buffers. The transport and queue positions are the virtio
//! crate's [`TransportState`](ember_virtio::TransportState); the tap is
//! reopened by name when the VM is restored.

use serde::{Deserialize, Serialize};

/// The NIC's own state.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetState {
    /// The MAC address the guest sees.
    pub mac: [u8; 6],
    /// A frame (virtio-net header first) read from the backend and not yet
    /// delivered.
    pub pending_frame: Option<Vec<u8>>,
}
