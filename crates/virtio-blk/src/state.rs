//! A disk's saved state: what the guest was told of the disk. The
//! transport and queue positions are the virtio crate's
//! [`TransportState`](ember_virtio::TransportState); the image is reopened
//! by path when the VM is restored.

use serde::{Deserialize, Serialize};

/// What the guest knows of the disk, checked against the reopened image.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BlockState {
    /// Capacity in 512-byte sectors.
    pub capacity: u64,
    /// Read-only (VIRTIO_BLK_F_RO offered).
    pub read_only: bool,
    /// Request queues offered (`num_queues`; 1 in files from before
    /// multiqueue).
    #[serde(default = "one")]
    pub num_queues: u16,
}

fn one() -> u16 {
    1
}

impl crate::Block {
    /// The disk's state.
    pub fn state(&self) -> BlockState {
        BlockState {
            capacity: self.capacity(),
            read_only: self.read_only(),
            num_queues: self.num_queues(),
        }
    }

    /// Checks that this rebuilt disk is what the guest saw: an image of
    /// another size or access mode is refused, since the guest's file
    /// systems would not match.
    pub fn check_state(&self, state: &BlockState) -> crate::Result<()> {
        if state.capacity != self.capacity() || state.read_only != self.read_only() {
            return Err(crate::Error::StateMismatch(format!(
                "the guest saw {} sectors{}, the image has {}{}",
                state.capacity,
                if state.read_only { " read-only" } else { "" },
                self.capacity(),
                if self.read_only() { " read-only" } else { "" }
            )));
        }
        if state.num_queues != self.num_queues() {
            return Err(crate::Error::StateMismatch(format!(
                "the guest saw {} queues, the disk is configured with {}",
                state.num_queues,
                self.num_queues()
            )));
        }
        Ok(())
    }
}
