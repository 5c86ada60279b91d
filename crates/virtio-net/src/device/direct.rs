//! The direct receive path: frames read from the backend straight into the
//! guest's receive buffers (`readv` on a tap), without the device's bounce
//! buffer.
//!
//! A frame's length is unknown until it is read, so the device first takes
//! ("parks") enough receive chains to hold the largest frame,
//! [`MAX_FRAME`](super::MAX_FRAME), reads into all of them at once, then
//! completes the chains the frame filled and keeps the others parked for
//! the next frame. Each chain is parsed once however many frames pass
//! before it is used. Parked chains are always the last ones taken from
//! the queue, so giving them all back is one `set_next_avail`: that is what
//! happens whenever the direct path cannot be used (too few buffers, a
//! malformed chain, more buffers than one `readv` takes), and the copying
//! path in `rx.rs` then handles the frame as before.

use std::collections::VecDeque;
use std::io;

use virtio_queue::QueueT;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, VolatileSlice};

use super::rx::RxQueue;
use super::{MAX_CHAIN_DESCS, MAX_FRAME, NUM_BUFFERS_AT, VNET_HDR_LEN};
use crate::backend::NetBackend;

/// The most guest buffers handed to one read (Linux's `UIO_MAXIOV`).
pub(super) const MAX_IOVECS: usize = 1024;

/// One receive chain the device has taken but not yet used.
#[derive(Clone, Copy, Debug)]
struct Parked {
    head: u16,
    /// Its device-writable bytes.
    capacity: u32,
    /// How many of the parked regions are its buffers.
    regions: usize,
}

/// The parked chains and their buffers, in queue order.
#[derive(Debug, Default)]
pub(super) struct ParkedChains {
    chains: VecDeque<Parked>,
    regions: VecDeque<(GuestAddress, u32)>,
    capacity: usize,
}

/// What one direct receive did.
pub(super) enum DirectOutcome {
    /// A frame of this length (header included) went into `chains` chains.
    Delivered(usize),
    /// The backend gave something shorter than a header: dropped.
    Short,
    /// Interrupted: try again.
    Retry,
    /// Nothing to read now.
    Idle,
    /// The backend is closed (`Ok(0)`) or failed, with the error.
    Closed(Option<io::Error>),
    /// The direct path cannot take a frame now; every parked chain was
    /// given back to the queue.
    Unusable,
}

impl ParkedChains {
    /// Gives every parked chain back to the queue (the driver sees no
    /// difference) and forgets them.
    pub(super) fn give_back(&mut self, rx: &mut RxQueue<'_>) {
        if !self.chains.is_empty() {
            let n = u16::try_from(self.chains.len()).unwrap_or(u16::MAX);
            rx.queue
                .set_next_avail(rx.queue.next_avail().wrapping_sub(n));
        }
        self.forget();
    }

    /// Forgets the parked chains without touching the queue (reset,
    /// activation: the queue is gone or new).
    pub(super) fn forget(&mut self) {
        self.chains.clear();
        self.regions.clear();
        self.capacity = 0;
    }

    /// Parks chains until they hold [`MAX_FRAME`] bytes; whether they do.
    /// A chain the direct path does not take (malformed, or a first chain
    /// without room for the header) ends parking with `false`, given back.
    fn fill(&mut self, rx: &mut RxQueue<'_>) -> bool {
        let max_chains = if rx.mrg_rxbuf {
            usize::from(rx.queue.size())
        } else {
            1
        };
        while self.capacity < MAX_FRAME {
            if self.chains.len() >= max_chains || self.regions.len() >= MAX_IOVECS {
                return false;
            }
            let Some(chain) = rx.queue.pop_descriptor_chain(rx.mem) else {
                return false;
            };
            let head = chain.head_index();
            let first = self.regions.len();
            let mut capacity = 0usize;
            let mut ok = true;
            let mut more = false;
            for (i, d) in chain.enumerate() {
                more = d.has_next();
                let in_memory = usize::try_from(d.len())
                    .is_ok_and(|l| l == 0 || rx.mem.check_range(d.addr(), l));
                if i >= MAX_CHAIN_DESCS || !d.is_write_only() || !in_memory {
                    ok = false;
                    break;
                }
                if d.len() > 0 {
                    self.regions.push_back((d.addr(), d.len()));
                    capacity += d.len() as usize;
                }
            }
            // Any parked chain may become a frame's first, which holds the
            // whole header.
            if !ok || more || capacity < VNET_HDR_LEN {
                // Undo this chain; the copying path deals with it.
                self.regions.truncate(first);
                rx.queue
                    .set_next_avail(rx.queue.next_avail().wrapping_sub(1));
                return false;
            }
            self.chains.push_back(Parked {
                head,
                capacity: u32::try_from(capacity).unwrap_or(u32::MAX),
                regions: self.regions.len() - first,
            });
            self.capacity += capacity;
        }
        true
    }

    /// Reads one frame from `backend` straight into the parked chains
    /// (parking more first), completes the chains it filled with
    /// `num_buffers` set, and keeps the rest parked.
    pub(super) fn receive(
        &mut self,
        rx: &mut RxQueue<'_>,
        backend: &mut dyn NetBackend,
        guest_csum: bool,
    ) -> DirectOutcome {
        if !self.fill(rx) || self.regions.len() > MAX_IOVECS {
            self.give_back(rx);
            return DirectOutcome::Unusable;
        }
        // Exactly MAX_FRAME bytes of buffers: a backend never hands over
        // more than the largest frame.
        let mut slices: Vec<VolatileSlice<'_>> = Vec::with_capacity(self.regions.len());
        let mut room = MAX_FRAME;
        'regions: for &(addr, len) in &self.regions {
            for s in rx.mem.get_slices(addr, len as usize) {
                let Ok(s) = s else {
                    self.give_back(rx);
                    return DirectOutcome::Unusable;
                };
                let k = s.len().min(room);
                match s.subslice(0, k) {
                    Ok(s) => slices.push(s),
                    Err(_) => {
                        self.give_back(rx);
                        return DirectOutcome::Unusable;
                    }
                }
                room -= k;
                if room == 0 {
                    break 'regions;
                }
            }
        }
        if slices.len() > MAX_IOVECS {
            self.give_back(rx);
            return DirectOutcome::Unusable;
        }
        let n = match backend.read_vectored(&slices) {
            Ok(0) => return DirectOutcome::Closed(None),
            Ok(n) if n < VNET_HDR_LEN => return DirectOutcome::Short,
            Ok(n) => n.min(self.capacity),
            Err(e) => {
                return match e.kind() {
                    io::ErrorKind::WouldBlock => DirectOutcome::Idle,
                    io::ErrorKind::Interrupted => DirectOutcome::Retry,
                    _ => DirectOutcome::Closed(Some(e)),
                }
            }
        };
        drop(slices);
        // How many chains the frame filled (each holds at least a header,
        // and the frame fits the parked capacity).
        let mut left = n;
        let mut used = 0usize;
        for c in &self.chains {
            if left == 0 {
                break;
            }
            left -= left.min(c.capacity as usize);
            used += 1;
        }
        // Without VIRTIO_NET_F_GUEST_CSUM the flags must be 0 (and so no
        // segmentation): clear everything in the header but num_buffers.
        if !guest_csum {
            self.write_frame_bytes(rx.mem, 0, &[0u8; NUM_BUFFERS_AT]);
        }
        let num_buffers = u16::try_from(used).unwrap_or(u16::MAX);
        self.write_frame_bytes(rx.mem, NUM_BUFFERS_AT, &num_buffers.to_le_bytes());
        let mut left = n;
        for _ in 0..used {
            let Some(c) = self.chains.pop_front() else {
                break;
            };
            let take = left.min(c.capacity as usize);
            left -= take;
            for _ in 0..c.regions {
                self.regions.pop_front();
            }
            self.capacity -= c.capacity as usize;
            rx.complete(c.head, u32::try_from(take).unwrap_or(u32::MAX));
        }
        DirectOutcome::Delivered(n)
    }

    /// Writes `bytes` at frame offset `at` through the parked regions.
    fn write_frame_bytes(&self, mem: &GuestMemoryMmap, at: usize, bytes: &[u8]) {
        let mut pos = 0usize;
        let mut done = 0usize;
        for &(addr, len) in &self.regions {
            let len = len as usize;
            if done == bytes.len() {
                break;
            }
            let want = at + done;
            if want < pos + len {
                let off = want - pos;
                let n = (len - off).min(bytes.len() - done);
                // Checked to be in guest memory when parked.
                let _ = mem.write_slice(&bytes[done..done + n], GuestAddress(addr.0 + off as u64));
                done += n;
            }
            pos += len;
        }
    }
}
