//! The seam between the device and the host network: a [`NetBackend`]
//! moves whole frames, each preceded by the 12-byte virtio-net header.

use std::io;
use std::os::fd::RawFd;

/// Where the device's frames go and come from: a [`Tap`](crate::Tap) on a
/// host, an in-memory queue in tests.
///
/// Every frame, in both directions, starts with the 12-byte
/// `struct virtio_net_hdr_mrg_rxbuf` ([`VNET_HDR_LEN`](crate::VNET_HDR_LEN));
/// the device passes it through as the guest wrote it (transmit) or as the
/// backend gave it (receive, after filling in `num_buffers`).
pub trait NetBackend: Send {
    /// Reads one frame into `buf` and returns its length (header included).
    /// [`io::ErrorKind::WouldBlock`] when no frame is waiting; `Ok(0)` means
    /// the backend is closed. A frame longer than `buf` may be cut short.
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize>;

    /// Writes one frame (header included) and returns the bytes taken; it
    /// must not block ([`io::ErrorKind::WouldBlock`] instead).
    fn write(&mut self, buf: &[u8]) -> io::Result<usize>;

    /// Tells the backend which offloads the driver accepts in frames it
    /// receives: a mask of the `TUN_F_*` flags (`libc::TUN_F_CSUM`, ...).
    /// Frames read afterwards must not need any other.
    fn set_offload(&mut self, flags: u32) -> io::Result<()>;

    /// The fd an event loop must watch for readability, if there is one.
    fn raw_fd(&self) -> Option<RawFd>;
}
