//! A virtio-net device (virtio 1.2, section 5.1) for microVMs.
//!
//! - [`backend`] holds the [`NetBackend`] trait the device moves frames
//!   through: each frame is preceded by the 12-byte virtio-net header
//!   (`struct virtio_net_hdr_mrg_rxbuf`), exactly as the guest sees it.
//! - [`tap`] holds [`Tap`], a Linux tap interface opened through
//!   `/dev/net/tun` with `IFF_VNET_HDR`; the crate's only `unsafe` (the
//!   ioctls) lives there.
//! - [`stream`] holds [`StreamBackend`], frames over a stream socket in
//!   QEMU's `-netdev stream` framing (passt's user-mode networking): no
//!   virtio-net header, so no offloads.
//! - [`vlan`] holds [`VlanBackend`], host-side 802.1Q over another backend.
//! - [`device`] holds [`Net`], an [`ember_virtio::VirtioDevice`] with a
//!   receive queue (0) and a transmit queue (1), mergeable receive buffers
//!   and, when asked for, checksum and segmentation offloads.
//!
//! The transport hands the device guest memory, an interrupt and its queues
//! on activation. The event loop calls `process_queue(i)` when the driver
//! notifies queue `i`, and `process_backend()` when the tap is readable; the
//! latter tells it whether to keep watching the tap
//! ([`ember_virtio::BackendInterest`]).
//!
//! On a host with a tap (`ip tuntap add tap0 mode tap && ip link set tap0 up`):
//!
//! ```no_run
//! use ember_virtio::VirtioDevice;
//! use ember_virtio_net::{Net, NetConfig};
//!
//! let net = Net::new(&NetConfig {
//!     tap: "tap0".to_string(),
//!     mac: [0x52, 0x54, 0x00, 0x12, 0x34, 0x56],
//!     offloads: true,
//!     vlan: None,
//!     queues: 1,
//! })?;
//! // The event loop watches this fd and calls `process_backend` when it is
//! // readable.
//! assert!(net.backend_fd().is_some());
//! # Ok::<(), ember_virtio_net::Error>(())
//! ```
//!
//! Any other frame source implements [`NetBackend`]:
//!
//! ```
//! use std::io;
//! use std::os::fd::RawFd;
//!
//! use ember_virtio::VirtioDevice;
//! use ember_virtio_net::{Net, NetBackend};
//! use virtio_bindings::virtio_ids::VIRTIO_ID_NET;
//!
//! /// Swallows every frame and never has one to give.
//! struct Sink;
//!
//! impl NetBackend for Sink {
//!     fn read(&mut self, _buf: &mut [u8]) -> io::Result<usize> {
//!         Err(io::ErrorKind::WouldBlock.into())
//!     }
//!     fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
//!         Ok(buf.len())
//!     }
//!     fn set_offload(&mut self, _flags: u32) -> io::Result<()> {
//!         Ok(())
//!     }
//!     fn raw_fd(&self) -> Option<RawFd> {
//!         None
//!     }
//! }
//!
//! let mac = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];
//! let net = Net::with_backend(Box::new(Sink), mac, false);
//! assert_eq!(net.device_type(), VIRTIO_ID_NET);
//! // Receive, transmit, control.
//! assert_eq!(net.queue_max_sizes(), &[256, 256, 64]);
//!
//! // The MAC is the first field of the config space.
//! let mut config_mac = [0u8; 6];
//! net.read_config(0, &mut config_mac);
//! assert_eq!(config_mac, mac);
//! assert_eq!(net.counters().rx_packets, 0);
//! ```
#![deny(unsafe_code)]

pub mod backend;
pub mod ctrl;
pub mod device;
pub mod state;
pub mod stream;
pub mod tap;
pub mod vhost;
pub mod vlan;

#[cfg(test)]
mod test_utils;

use std::io;

pub use backend::NetBackend;
pub use device::{
    Announced, Net, NetConfig, NetCounters, CTRL_QUEUE_SIZE, MAX_FRAME, MAX_QUEUE_PAIRS,
    QUEUE_SIZE, VNET_HDR_LEN,
};
pub use state::NetState;
pub use stream::StreamBackend;
pub use tap::Tap;
pub use vlan::VlanBackend;

/// Why a tap could not be opened or set up.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The rate limits cannot be changed.
    #[error("rate limiter: {0}")]
    RateLimiter(String),
    /// A saved state does not fit the rebuilt device.
    #[error("saved state does not match: {0}")]
    StateMismatch(String),
    /// The name is not a valid interface name.
    #[error("tap name {name:?} is invalid: {reason}")]
    TapName {
        /// The name given.
        name: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// No interface has this name (in the caller's network namespace).
    #[error("tap {name} does not exist: create it with `ip tuntap add {name} mode tap`")]
    TapMissing {
        /// The tap's name.
        name: String,
    },
    /// An interface has this name but is not a tap.
    #[error("interface {name} is not a tap device")]
    NotTap {
        /// The interface's name.
        name: String,
    },
    /// Several queues asked of a single-queue tap.
    #[error(
        "tap {name} has one queue and {queues} were asked for: create it with \
         `ip tuntap add {name} mode tap multi_queue`"
    )]
    NotMultiQueue {
        /// The tap's name.
        name: String,
        /// The queues asked for.
        queues: u16,
    },
    /// The tap took fewer queues than asked for.
    #[error(
        "tap {name} took {attached} of the {queues} queues asked for (Linux attaches at \
         most 256 to a tap, other processes' included)"
    )]
    TapQueues {
        /// The tap's name.
        name: String,
        /// The queues asked for.
        queues: u16,
        /// The queues it took.
        attached: u16,
    },
    /// A queue pair count the device does not support.
    #[error("{queues} queue pairs for {name}: a NIC has 1 to {max}")]
    QueuePairs {
        /// The tap's name.
        name: String,
        /// The count asked for.
        queues: u16,
        /// The most there can be.
        max: u16,
    },
    /// Another file (another VMM?) is attached to the tap.
    #[error("tap {name} is in use by another process (another VMM?)")]
    TapBusy {
        /// The tap's name.
        name: String,
    },
    /// `/dev/net/tun` could not be opened or the tap could not be attached
    /// (no permission, no tun driver).
    #[error("cannot open tap {name} through /dev/net/tun")]
    TapOpen {
        /// The tap's name.
        name: String,
        /// What the kernel said.
        #[source]
        source: io::Error,
    },
    /// The tap was attached but could not be configured.
    #[error("cannot set up tap {name}: {what} failed")]
    TapSetup {
        /// The tap's name.
        name: String,
        /// The ioctl that failed.
        what: &'static str,
        /// What the kernel said.
        #[source]
        source: io::Error,
    },
    /// A host-side VLAN id out of range.
    #[error("VLAN id {vid} for tap {name} is out of range (1 to 4094)")]
    Vlan {
        /// The tap's name.
        name: String,
        /// The id given.
        vid: u16,
    },
    /// The MAC address is a multicast or all-zero address.
    #[error("MAC address {} for tap {name} is not a unicast address", mac_string(.mac))]
    InvalidMac {
        /// The tap's name.
        name: String,
        /// The address given.
        mac: [u8; 6],
    },
}

/// `52:54:00:12:34:56`.
fn mac_string(mac: &[u8; 6]) -> String {
    let hex: Vec<String> = mac.iter().map(|b| format!("{b:02x}")).collect();
    hex.join(":")
}

/// The result of this crate's fallible host-side operations.
pub type Result<T> = std::result::Result<T, Error>;
