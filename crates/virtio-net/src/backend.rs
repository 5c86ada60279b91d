//! The seam between the device and the host network: a [`NetBackend`]
//! moves whole frames, each preceded by the 12-byte virtio-net header.

use std::io;
use std::os::fd::RawFd;

use ember_memory::Slice;

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

    /// Writes one frame given as guest buffers, one after the other (the
    /// device's transmit path); returns the bytes taken and must not block.
    ///
    /// The default gathers the buffers into one and calls
    /// [`NetBackend::write`]; a [`Tap`](crate::Tap) hands them to the kernel
    /// as they are with `writev`.
    fn write_vectored(&mut self, bufs: &[Slice<'_>]) -> io::Result<usize> {
        let mut frame = vec![0u8; bufs.iter().map(|s| s.len()).sum()];
        let mut at = 0;
        for s in bufs {
            at += s.copy_to(&mut frame[at..]);
        }
        self.write(&frame)
    }

    /// Reads one frame (header included) into the guest buffers `bufs`,
    /// one after the other, and returns its length; errors as for
    /// [`NetBackend::read`]. The buffers hold at least
    /// [`MAX_FRAME`](crate::MAX_FRAME) bytes.
    ///
    /// The default reads into a buffer with [`NetBackend::read`] and copies;
    /// a [`Tap`](crate::Tap) reads into guest memory itself with `readv`.
    fn read_vectored(&mut self, bufs: &[Slice<'_>]) -> io::Result<usize> {
        let mut frame = vec![0u8; bufs.iter().map(|s| s.len()).sum()];
        let n = self.read(&mut frame)?;
        let mut at = 0;
        for s in bufs {
            if at >= n {
                break;
            }
            let k = s.len().min(n - at);
            s.copy_from(&frame[at..at + k]);
            at += k;
        }
        Ok(n)
    }

    /// Tells the backend which offloads the driver accepts in frames it
    /// receives: a mask of the `TUN_F_*` flags (`libc::TUN_F_CSUM`, ...).
    /// Frames read afterwards must not need any other.
    fn set_offload(&mut self, flags: u32) -> io::Result<()>;

    /// The fd an event loop must watch for readability, if there is one.
    fn raw_fd(&self) -> Option<RawFd>;

    /// Attaches this queue of a multi-queue backend again, or detaches it
    /// so that it gets no frames (a queue pair the driver does not use);
    /// unsupported by default (a backend with one queue).
    fn set_queue_enabled(&mut self, _on: bool) -> io::Result<()> {
        Err(io::ErrorKind::Unsupported.into())
    }

    /// A descriptor of the tap queue under the backend, for vhost-net to
    /// move the frames itself; none by default (vhost-net takes only a
    /// plain tap).
    fn tap_file(&self) -> Option<io::Result<std::fs::File>> {
        None
    }

    /// Frames the backend read and dropped itself because they were not
    /// for this NIC (another VLAN's, say); none by default.
    fn rx_filtered(&self) -> u64 {
        0
    }
}
