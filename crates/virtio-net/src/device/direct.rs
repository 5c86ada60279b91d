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
//! 43 chains are parked at a time. Their buffers are found in guest memory
//! once per receive pass and kept as runs of adjacent bytes
//! ([`PassSlices`]), not once per frame: a 64-byte frame then costs one
//! `readv`, one chain parked and one completed, however many buffers are
//! parked. Chains are read from slices of the rings
//! ([`ChainReader`](ember_virtio::queue::ChainReader)), one descriptor
//! load for a chain of one buffer (what Linux posts).

use std::collections::VecDeque;
use std::io;

use ember_memory::{GuestMemoryMmap, Slice};
use ember_virtio::queue::ChainReader;
use virtio_bindings::virtio_ring::VRING_DESC_F_WRITE;
use virtio_queue::QueueT;
use vm_memory::{
    Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion, VolatileSlice,
};

use super::rx::RxQueue;
use super::{FILTER_HEAD, MAX_CHAIN_DESCS, MAX_FRAME, NUM_BUFFERS_AT, VNET_HDR_LEN};
use crate::backend::NetBackend;
use crate::ctrl::RxFilter;

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

/// A memory region of the guest as one slice, and where it starts.
#[derive(Clone, Copy)]
struct Region<'m> {
    start: GuestAddress,
    whole: Slice<'m>,
}

impl<'m> Region<'m> {
    /// Where `addr` lies in the region, if `len` bytes from it fit there.
    fn offset(&self, addr: GuestAddress, len: usize) -> Option<usize> {
        let off = usize::try_from(addr.checked_offset_from(self.start)?).ok()?;
        (off.checked_add(len)? <= self.whole.len()).then_some(off)
    }
}

/// Parked bytes adjacent in guest memory, in one region.
#[derive(Clone, Copy)]
struct Run<'m> {
    addr: GuestAddress,
    len: usize,
    region: Region<'m>,
}

impl<'m> Run<'m> {
    fn slice(&self) -> Option<Slice<'m>> {
        let off = self.region.offset(self.addr, self.len)?;
        self.region.whole.subslice(off, self.len).ok()
    }
}

/// The parked buffers in guest memory, for one receive pass (they borrow
/// the guest memory the pass works on): their bytes in queue order, in as
/// few runs as contiguity allows. A Linux driver carves its receive
/// buffers one after another out of 32 KiB page fragments, so some 43
/// parked buffers of 1536 bytes make three or four runs, and `readv` gets
/// that many iovecs rather than 43. A buffer that follows the last run is
/// added to it with two comparisons; slices are made only for the runs a
/// read or a header write touches.
#[derive(Default)]
pub(super) struct PassSlices<'m> {
    runs: VecDeque<Run<'m>>,
    /// How many of the parked regions (from the front) are in `runs`.
    synced: usize,
    /// The memory region of the last lookup.
    region: Option<Region<'m>>,
    /// The slices handed to one read (kept for the pass's next reads).
    iov: Vec<Slice<'m>>,
}

impl<'m> PassSlices<'m> {
    fn clear(&mut self) {
        self.runs.clear();
        self.synced = 0;
    }

    /// The memory region holding the `len` bytes at `addr`, if one does:
    /// the region of the previous lookup without a search when it does
    /// (the receive buffers of a guest usually lie in one).
    fn region_of(
        &mut self,
        mem: &'m GuestMemoryMmap,
        addr: GuestAddress,
        len: usize,
    ) -> Option<Region<'m>> {
        if let Some(r) = self.region {
            if r.offset(addr, len).is_some() {
                return Some(r);
            }
        }
        let found = mem.find_region(addr)?;
        let r = Region {
            start: found.start_addr(),
            whole: found.as_volatile_slice().ok()?,
        };
        self.region = Some(r);
        r.offset(addr, len).map(|_| r)
    }

    /// Appends the `len` bytes at `addr`, to the last run when they follow
    /// it in guest memory and its region; false if they are not all guest
    /// memory.
    fn push(&mut self, mem: &'m GuestMemoryMmap, addr: GuestAddress, len: usize) -> bool {
        if let Some(last) = self.runs.back_mut() {
            let end = last.addr.checked_add(last.len as u64);
            if end == Some(addr) && last.region.offset(last.addr, last.len + len).is_some() {
                last.len += len;
                return true;
            }
        }
        if let Some(region) = self.region_of(mem, addr, len) {
            self.runs.push_back(Run { addr, len, region });
            return true;
        }
        // Across regions: one run per region.
        let (mut at, mut left) = (addr, len);
        while left > 0 {
            let Some(found) = mem.find_region(at) else {
                return false;
            };
            let Ok(whole) = found.as_volatile_slice() else {
                return false;
            };
            let region = Region {
                start: found.start_addr(),
                whole,
            };
            let Some(off) = region.offset(at, 0) else {
                return false;
            };
            let n = left.min(whole.len() - off);
            if n == 0 {
                return false;
            }
            self.runs.push_back(Run {
                addr: at,
                len: n,
                region,
            });
            at = GuestAddress(at.0.wrapping_add(n as u64));
            left -= n;
        }
        true
    }

    /// How many runs there are (iovecs for a read of all of them).
    fn len(&self) -> usize {
        self.runs.len()
    }

    /// Drops the first `bytes` bytes (a completed chain's buffers).
    fn consume(&mut self, mut bytes: usize) {
        while bytes > 0 {
            let Some(front) = self.runs.front_mut() else {
                return;
            };
            if front.len <= bytes {
                bytes -= front.len;
                self.runs.pop_front();
            } else {
                front.addr = GuestAddress(front.addr.0.wrapping_add(bytes as u64));
                front.len -= bytes;
                return;
            }
        }
    }

    /// The runs as slices, from the first on, until they hold `room`
    /// bytes (the last one cut there), into `self.iov`; false if a run is
    /// not a slice (it was checked when added, so this does not happen).
    fn slices_for(&mut self, mut room: usize) -> bool {
        self.iov.clear();
        for run in &self.runs {
            if room == 0 {
                break;
            }
            let Some(s) = run.slice() else {
                return false;
            };
            if s.len() >= room {
                match s.subslice(0, room) {
                    Ok(end) => self.iov.push(end),
                    Err(_) => return false,
                }
                break;
            }
            room -= s.len();
            self.iov.push(s);
        }
        true
    }

    /// Copies the first `out.len()` bytes of the runs into `out`.
    fn copy_head(&self, out: &mut [u8]) {
        let mut done = 0usize;
        for run in &self.runs {
            let Some(rest) = out.get_mut(done..) else {
                break;
            };
            if rest.is_empty() {
                break;
            }
            let Some(s) = run.slice() else {
                break;
            };
            done += s.copy_to(rest);
        }
    }

    /// Writes `bytes` at frame offset `at` through the runs.
    fn write_frame_bytes(&self, at: usize, bytes: &[u8]) {
        let mut pos = 0usize;
        let mut done = 0usize;
        for run in &self.runs {
            if done == bytes.len() {
                break;
            }
            let len = run.len;
            let want = at + done;
            if want < pos + len {
                let off = want - pos;
                let n = (len - off).min(bytes.len() - done);
                if let (Some(part), Some(s)) = (bytes.get(done..done + n), run.slice()) {
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
    /// The receive filter dropped the frame (the parked chains stay
    /// parked, the guest sees nothing of it).
    Filtered,
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

    /// How many chains are parked (taken from the queue, not yet used).
    pub(super) fn chain_count(&self) -> usize {
        self.chains.len()
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
        filter: &RxFilter,
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
            || slices.len() > iovecs
            || (fill == Fill::Short && bounce.len() < MAX_FRAME)
            || !slices.slices_for(MAX_FRAME)
        {
            self.give_back(rx, slices);
            return DirectOutcome::Unusable;
        }
        // A backend never hands over more than the largest frame: the
        // parked buffers past it stay untouched for the next frames.
        let read = if fill == Fill::Full {
            backend.read_vectored(&slices.iov)
        } else {
            let tail = bounce.get_mut(self.capacity..MAX_FRAME).unwrap_or_default();
            let mut bufs: Vec<Slice<'_>> = Vec::with_capacity(slices.iov.len() + 1);
            bufs.extend(slices.iov.iter().copied());
            bufs.push(host_slice(tail));
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
        let mut head = [0u8; FILTER_HEAD];
        if let Some(h) = head.get_mut(..n.min(FILTER_HEAD)) {
            slices.copy_head(h);
        }
        if !filter.accepts(
            head.get(VNET_HDR_LEN..n.min(FILTER_HEAD))
                .unwrap_or_default(),
        ) {
            return DirectOutcome::Filtered;
        }
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

/// `buf`, a host buffer, as a slice of the type guest memory gives (with
/// no dirty bitmap: it is not guest memory), so one vectored read can fill
/// guest buffers and it.
#[allow(unsafe_code)]
fn host_slice(buf: &mut [u8]) -> Slice<'_> {
    // SAFETY: `buf` is a live, exclusively borrowed host buffer of
    // `buf.len()` bytes for the slice's lifetime; nothing else accesses it
    // meanwhile.
    unsafe { VolatileSlice::with_bitmap(buf.as_mut_ptr(), buf.len(), None, None) }
}
