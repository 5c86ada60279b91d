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
//! happens whenever the direct path cannot be used (no buffers, a malformed
//! chain, more buffers than one `readv` takes), and the copying path in
//! `rx.rs` then handles the frame as before.
//!
//! When the guest has posted fewer bytes of buffers than the largest frame
//! needs, the device's own buffer is the `readv`'s last iovec: a frame that
//! fits the guest's buffers (nearly always) still goes straight in, and
//! only a larger one is gathered whole in the device's buffer, where it
//! waits for more guest buffers like a frame on the copying path.
//!
//! A Linux driver posts 1536-byte buffers while frames are small, so about
//! 43 chains are parked at a time. Their buffers are turned into slices of
//! guest memory once per receive pass ([`PassSlices`]), not once per frame:
//! a 64-byte frame then costs one `readv`, one chain parked and one
//! completed, however many buffers are parked.

use std::collections::VecDeque;
use std::io;

use ember_virtio::queue::ChainReader;
use virtio_bindings::virtio_ring::VRING_DESC_F_WRITE;
use virtio_queue::QueueT;
use vm_memory::{
    Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
    VolatileSlice,
};

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

/// The parked buffers as slices of guest memory, for one receive pass (the
/// slices borrow the guest memory the pass works on): their bytes in queue
/// order, in as few slices as contiguity allows. A Linux driver carves its
/// receive buffers one after another out of 32 KiB page fragments, so some
/// 43 parked buffers of 1536 bytes make three or four slices, and `readv`
/// gets that many iovecs rather than 43.
#[derive(Default)]
pub(super) struct PassSlices<'m> {
    slices: VecDeque<VolatileSlice<'m>>,
    /// The guest address each slice starts at.
    addrs: VecDeque<GuestAddress>,
    /// How many of the parked regions (from the front) are in `slices`.
    synced: usize,
    /// The memory region of the last lookup: its start and all of it.
    region: Option<(GuestAddress, VolatileSlice<'m>)>,
}

impl<'m> PassSlices<'m> {
    fn clear(&mut self) {
        self.slices.clear();
        self.addrs.clear();
        self.synced = 0;
    }

    /// The `len` bytes at `addr` as one slice, if they lie in one memory
    /// region: found in the region of the previous lookup without a search
    /// when they lie there too (the receive buffers of a guest usually do).
    fn lookup(
        &mut self,
        mem: &'m GuestMemoryMmap,
        addr: GuestAddress,
        len: usize,
    ) -> Option<VolatileSlice<'m>> {
        if let Some((start, whole)) = &self.region {
            let off = addr.checked_offset_from(*start);
            let off = off.and_then(|off| usize::try_from(off).ok());
            if let Some(s) = off.and_then(|off| whole.subslice(off, len).ok()) {
                return Some(s);
            }
        }
        let region = mem.find_region(addr)?;
        let whole = region.as_volatile_slice().ok()?;
        let start = region.start_addr();
        self.region = Some((start, whole));
        let off = usize::try_from(addr.checked_offset_from(start)?).ok()?;
        whole.subslice(off, len).ok()
    }

    /// Appends the `len` bytes at `addr`, extending the last slice when
    /// they follow it in guest memory (and in the same memory region).
    fn push(&mut self, mem: &'m GuestMemoryMmap, addr: GuestAddress, len: usize) -> bool {
        if let (Some(&last_addr), Some(last_len)) =
            (self.addrs.back(), self.slices.back().map(|s| s.len()))
        {
            if last_addr.checked_add(last_len as u64) == Some(addr) {
                let joined = last_len
                    .checked_add(len)
                    .and_then(|j| self.lookup(mem, last_addr, j));
                if let (Some(joined), Some(last)) = (joined, self.slices.back_mut()) {
                    *last = joined;
                    return true;
                }
            }
        }
        if let Some(s) = self.lookup(mem, addr, len) {
            self.slices.push_back(s);
            self.addrs.push_back(addr);
            return true;
        }
        // Across regions: one slice per region.
        let mut at = addr;
        for s in mem.get_slices(addr, len) {
            let Ok(s) = s else {
                return false;
            };
            let n = s.len() as u64;
            self.slices.push_back(s);
            self.addrs.push_back(at);
            at = GuestAddress(at.0.wrapping_add(n));
        }
        true
    }

    /// Drops the first `bytes` bytes (a completed chain's buffers).
    fn consume(&mut self, mut bytes: usize) {
        while bytes > 0 {
            let (Some(front), Some(addr)) = (self.slices.front_mut(), self.addrs.front_mut())
            else {
                return;
            };
            if front.len() <= bytes {
                bytes -= front.len();
                self.slices.pop_front();
                self.addrs.pop_front();
            } else {
                match front.offset(bytes) {
                    Ok(rest) => *front = rest,
                    Err(_) => return,
                }
                *addr = GuestAddress(addr.0.wrapping_add(bytes as u64));
                return;
            }
        }
    }

    /// Copies the first `out.len()` bytes of the slices into `out`.
    fn copy_head(&self, out: &mut [u8]) {
        let mut done = 0usize;
        for s in &self.slices {
            let Some(rest) = out.get_mut(done..) else {
                break;
            };
            if rest.is_empty() {
                break;
            }
            done += s.copy_to(rest);
        }
    }

    /// Writes `bytes` at frame offset `at` through the slices.
    fn write_frame_bytes(&self, at: usize, bytes: &[u8]) {
        let mut pos = 0usize;
        let mut done = 0usize;
        for s in &self.slices {
            if done == bytes.len() {
                break;
            }
            let len = s.len();
            let want = at + done;
            if want < pos + len {
                let off = want - pos;
                let n = (len - off).min(bytes.len() - done);
                if let Some(part) = bytes.get(done..done + n) {
                    // In bounds: off + n <= len.
                    let _ = s.write_slice(part, off);
                }
                done += n;
            }
            pos += len;
        }
    }
}

/// How far parking got.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Fill {
    /// The parked chains hold [`MAX_FRAME`] bytes.
    Full,
    /// They hold less, and no more can be parked now (the queue is empty,
    /// or holds as many chains or buffers as one frame may take).
    Short,
    /// Nothing is parked, or a chain the direct path does not take is next.
    Unusable,
}

/// What one direct receive did.
pub(super) enum DirectOutcome {
    /// A frame of this length (header included) went into `chains` chains.
    Delivered(usize),
    /// A frame of this length (header included) was larger than the parked
    /// chains: it is now whole in the device's buffer, with the header
    /// fields cleared as [`read_frame`](super::rx::read_frame) clears them,
    /// and every parked chain was given back. The copying path delivers it
    /// once the guest has posted enough buffers.
    Pending(usize),
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
    pub(super) fn give_back(&mut self, rx: &mut RxQueue<'_>, slices: &mut PassSlices<'_>) {
        if !self.chains.is_empty() {
            let n = u16::try_from(self.chains.len()).unwrap_or(u16::MAX);
            rx.queue
                .set_next_avail(rx.queue.next_avail().wrapping_sub(n));
        }
        self.forget();
        slices.clear();
    }

    /// Forgets the parked chains without touching the queue (reset,
    /// activation: the queue is gone or new).
    pub(super) fn forget(&mut self) {
        self.chains.clear();
        self.regions.clear();
        self.capacity = 0;
    }

    /// Adds the parked regions that `slices` does not have yet (parked in
    /// an earlier pass, or just now); false if one is not in guest memory
    /// (then `slices` is emptied).
    fn sync<'m>(&self, mem: &'m GuestMemoryMmap, slices: &mut PassSlices<'m>) -> bool {
        for &(addr, len) in self.regions.iter().skip(slices.synced) {
            if !slices.push(mem, addr, len as usize) {
                slices.clear();
                return false;
            }
            slices.synced += 1;
        }
        true
    }

    /// Parks chains until they hold [`MAX_FRAME`] bytes, or until no more
    /// can be parked now. A chain the direct path does not take (malformed,
    /// or without room for the header) is left in the queue and ends
    /// parking as [`Fill::Unusable`].
    fn fill(&mut self, rx: &mut RxQueue<'_>) -> Fill {
        let max_chains = if rx.mrg_rxbuf {
            usize::from(rx.queue.size())
        } else {
            1
        };
        let short = |parked: &Self| {
            if parked.chains.is_empty() {
                Fill::Unusable
            } else {
                Fill::Short
            }
        };
        let Some(reader) = rx.reader.as_ref() else {
            // The rings are not slices of guest memory: chains are taken
            // with virtio-queue, on the copying path.
            return Fill::Unusable;
        };
        // One look at the avail index for all the chains taken now.
        let next = rx.queue.next_avail();
        let available = reader.available(next).unwrap_or(0);
        let mut taken = 0u16;
        let mut fill = Fill::Full;
        while self.capacity < MAX_FRAME {
            if self.chains.len() >= max_chains
                || self.regions.len() >= MAX_IOVECS
                || taken == available
            {
                fill = short(self);
                break;
            }
            let first = self.regions.len();
            let Some(parked) = self.read_chain(reader, next.wrapping_add(taken)) else {
                // Left in the queue; the copying path deals with it.
                self.regions.truncate(first);
                fill = Fill::Unusable;
                break;
            };
            self.capacity += parked.capacity as usize;
            self.chains.push_back(parked);
            taken += 1;
        }
        rx.queue.set_next_avail(next.wrapping_add(taken));
        fill
    }

    /// Reads the chain at avail position `pos` and appends its buffers to
    /// the parked regions; `None` if the direct path does not take it
    /// (malformed, with a device-readable or indirect descriptor, or
    /// without room for the header: any parked chain may become a frame's
    /// first, which holds the whole header). Some regions may have been
    /// appended then.
    fn read_chain(&mut self, reader: &ChainReader<'_>, pos: u16) -> Option<Parked> {
        let head = reader.head(pos).ok()?;
        // A Linux driver's receive chains are one writable buffer each.
        let d = reader.descriptor(head)?;
        if u32::from(d.flags()) == VRING_DESC_F_WRITE {
            if (d.len() as usize) < VNET_HDR_LEN {
                return None;
            }
            self.regions.push_back((d.addr(), d.len()));
            return Some(Parked {
                head,
                capacity: d.len(),
                regions: 1,
            });
        }
        let first = self.regions.len();
        let mut capacity = 0u32;
        for (i, d) in reader.chain(head).enumerate() {
            let d = d.ok()?;
            // Whether the buffer is in guest memory is found when it
            // becomes a slice (`sync`).
            if i >= MAX_CHAIN_DESCS || !d.is_write_only() {
                return None;
            }
            if d.len() > 0 {
                self.regions.push_back((d.addr(), d.len()));
                capacity = capacity.checked_add(d.len())?;
            }
        }
        if (capacity as usize) < VNET_HDR_LEN {
            return None;
        }
        Some(Parked {
            head,
            capacity,
            regions: self.regions.len() - first,
        })
    }

    /// Reads one frame from `backend` straight into the parked chains
    /// (parking more first), completes the chains it filled with
    /// `num_buffers` set, and keeps the rest parked. `slices` holds the
    /// parked buffers as slices for this pass.
    ///
    /// When the queue holds fewer buffers than the largest frame needs,
    /// the device's buffer `bounce` ([`MAX_FRAME`] bytes) takes what the
    /// parked ones cannot: a frame that fits them still goes straight in,
    /// and a larger one is moved whole into `bounce` for the copying path
    /// ([`DirectOutcome::Pending`]).
    pub(super) fn receive<'m>(
        &mut self,
        rx: &mut RxQueue<'m>,
        slices: &mut PassSlices<'m>,
        backend: &mut dyn NetBackend,
        guest_csum: bool,
        bounce: &mut [u8],
    ) -> DirectOutcome {
        let fill = self.fill(rx);
        // A short fill needs one more iovec, for the device's buffer.
        let iovecs = if fill == Fill::Short {
            MAX_IOVECS - 1
        } else {
            MAX_IOVECS
        };
        if fill == Fill::Unusable
            || self.regions.len() > iovecs
            || !self.sync(rx.mem, slices)
            || slices.slices.len() > iovecs
            || (fill == Fill::Short && bounce.len() < MAX_FRAME)
        {
            self.give_back(rx, slices);
            return DirectOutcome::Unusable;
        }
        let read = if fill == Fill::Full {
            read_max_frame(slices, backend)
        } else {
            let tail = bounce.get_mut(self.capacity..MAX_FRAME).unwrap_or_default();
            let mut bufs: Vec<VolatileSlice<'_>> = Vec::with_capacity(slices.slices.len() + 1);
            bufs.extend(slices.slices.iter().copied());
            bufs.push(VolatileSlice::from(tail));
            backend.read_vectored(&bufs)
        };
        let n = match read {
            Ok(0) => return DirectOutcome::Closed(None),
            Ok(n) if n < VNET_HDR_LEN => return DirectOutcome::Short,
            Ok(n) if n > self.capacity => {
                // The tail is in `bounce` already; the head joins it
                // (capacity < MAX_FRAME <= bounce.len() on a short fill).
                if let Some(head) = bounce.get_mut(..self.capacity) {
                    slices.copy_head(head);
                }
                if !guest_csum {
                    if let Some(fields) = bounce.get_mut(..NUM_BUFFERS_AT) {
                        fields.fill(0);
                    }
                }
                self.give_back(rx, slices);
                return DirectOutcome::Pending(n.min(MAX_FRAME));
            }
            Ok(n) => n,
            Err(e) => {
                return match e.kind() {
                    io::ErrorKind::WouldBlock => DirectOutcome::Idle,
                    io::ErrorKind::Interrupted => DirectOutcome::Retry,
                    _ => DirectOutcome::Closed(Some(e)),
                }
            }
        };
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
        // num_buffers; without VIRTIO_NET_F_GUEST_CSUM the flags must be 0
        // (and so no segmentation): everything before it is cleared too.
        let num_buffers = u16::try_from(used).unwrap_or(u16::MAX).to_le_bytes();
        if guest_csum {
            slices.write_frame_bytes(NUM_BUFFERS_AT, &num_buffers);
        } else {
            let mut fields = [0u8; NUM_BUFFERS_AT + 2];
            fields[NUM_BUFFERS_AT..].copy_from_slice(&num_buffers);
            slices.write_frame_bytes(0, &fields);
        }
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
            slices.synced = slices.synced.saturating_sub(c.regions);
            slices.consume(c.capacity as usize);
            self.capacity -= c.capacity as usize;
            rx.complete(c.head, u32::try_from(take).unwrap_or(u32::MAX));
        }
        rx.publish();
        DirectOutcome::Delivered(n)
    }
}

/// Reads one frame into the first [`MAX_FRAME`] bytes of the parked
/// buffers (they hold at least that): a backend never hands over more than
/// the largest frame, and the rest stay untouched for the next frames.
fn read_max_frame(slices: &mut PassSlices<'_>, backend: &mut dyn NetBackend) -> io::Result<usize> {
    let all = slices.slices.make_contiguous();
    let mut room = MAX_FRAME;
    let mut last = 0usize;
    while let Some(s) = all.get(last) {
        if s.len() >= room {
            break;
        }
        room -= s.len();
        last += 1;
    }
    match all.get(last).copied() {
        Some(whole) => match whole.subslice(0, room) {
            Ok(end) => {
                all[last] = end;
                let read = backend.read_vectored(&all[..=last]);
                all[last] = whole;
                read
            }
            Err(_) => backend.read_vectored(all),
        },
        None => backend.read_vectored(all),
    }
}
