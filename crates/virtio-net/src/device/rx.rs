//! The receive path: a frame from the backend is copied into one receive
//! chain, or several with VIRTIO_NET_F_MRG_RXBUF, with `num_buffers` set;
//! chains are completed only once the whole frame is in them.

use std::io;
use std::num::Wrapping;
use std::sync::atomic::Ordering;

use ember_memory::GuestMemoryMmap;
use ember_virtio::queue::{ChainReader, UsedRing};
use virtio_queue::{DescriptorChain, Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};

use ember_virtio::BackendInterest;

use super::direct::{DirectOutcome, PassSlices};
use super::{
    average, complete, interrupt, limits, notify, payload_len, rearm, rx_index, Fault, FaultLog,
    Net, DIRECT_MIN_AVG, MAX_CHAIN_DESCS, NUM_BUFFERS_AT, RX_BUDGET, VNET_HDR_LEN,
};
use crate::backend::NetBackend;

impl Net {
    /// Moves frames from the backend into the guest's receive buffers while
    /// there are both, at most [`RX_BUDGET`] of them; a frame read when no
    /// buffer is left waits in the device. Pair `p`'s queue and backend.
    pub(super) fn process_rx(&mut self, p: usize) -> BackendInterest {
        let (Some(active), Some(pair)) = (self.active.as_mut(), self.pairs.get_mut(p)) else {
            return BackendInterest::Pause;
        };
        let Some(queues) = active.queues.get_mut(p) else {
            return BackendInterest::Pause;
        };
        let used = UsedRing::new(&queues.rx, &active.mem);
        let reader = ChainReader::new(&queues.rx, &active.mem);
        let mut rx = RxQueue {
            queue: &mut queues.rx,
            mem: &active.mem,
            mrg_rxbuf: active.mrg_rxbuf,
            chains: &mut pair.rx_chains,
            log: &mut self.log,
            used_any: false,
            used,
            reader,
        };
        let mut interest = BackendInterest::Keep;
        // The direct path (straight into guest buffers) until it cannot be
        // used; then the copying path for the rest of this pass.
        // A receive limit needs each frame's length before it reaches the
        // guest: frames are copied then.
        let limited = self.limits.as_ref().is_some_and(limits::Limits::rx_limited);
        let mut direct = pair.rx_pending.is_none() && pair.rx_avg >= DIRECT_MIN_AVG && !limited;
        let mut slices = PassSlices::default();
        if !direct {
            // The copying path takes chains in queue order from the first
            // parked one on.
            pair.rx_parked.give_back(&mut rx, &mut slices);
        }
        // Whether the driver was already asked for a notification of new
        // buffers in this pass.
        let mut rearmed = false;
        // The backend failed or closed: the link goes down after this pass.
        let mut gone = false;
        for _ in 0..RX_BUDGET {
            if direct {
                match pair.rx_parked.receive(
                    &mut rx,
                    &mut slices,
                    &mut *pair.backend,
                    active.guest_csum,
                    &self.filter,
                    &mut pair.rx_buf,
                ) {
                    DirectOutcome::Delivered(len) => {
                        let c = &mut self.counters;
                        c.rx_packets = c.rx_packets.saturating_add(1);
                        pair.rx_packets = pair.rx_packets.saturating_add(1);
                        pair.rx_packets = pair.rx_packets.saturating_add(1);
                        c.rx_bytes = c.rx_bytes.saturating_add(payload_len(len));
                        pair.rx_avg = average(pair.rx_avg, len);
                        if pair.rx_avg < DIRECT_MIN_AVG {
                            pair.rx_parked.give_back(&mut rx, &mut slices);
                            direct = false;
                        }
                        continue;
                    }
                    DirectOutcome::Pending(len) => {
                        pair.rx_pending = Some(len);
                        direct = false;
                    }
                    DirectOutcome::Filtered => {
                        self.counters.rx_filtered = self.counters.rx_filtered.saturating_add(1);
                        continue;
                    }
                    DirectOutcome::Short => {
                        rx.log.report(
                            Fault::RxShort,
                            format_args!("dropped a frame shorter than its header"),
                        );
                        self.counters.rx_dropped = self.counters.rx_dropped.saturating_add(1);
                        continue;
                    }
                    DirectOutcome::Retry => continue,
                    DirectOutcome::Idle => break,
                    DirectOutcome::Closed(e) => {
                        match e {
                            None => rx
                                .log
                                .report(Fault::RxBackend, format_args!("the backend is closed")),
                            Some(e) => rx.log.report(
                                Fault::RxBackend,
                                format_args!(
                                    "cannot read from the backend (was the tap deleted?): {e}"
                                ),
                            ),
                        }
                        pair.rx_parked.give_back(&mut rx, &mut slices);
                        interest = BackendInterest::Pause;
                        gone = true;
                        break;
                    }
                    DirectOutcome::Unusable => direct = false,
                }
            }
            let len = match pair.rx_pending.take() {
                Some(len) => len,
                None if !has_available(rx.queue, rx.mem) => {
                    if !rearmed && rearm(&mut rx) {
                        rearmed = true;
                        continue;
                    }
                    interest = BackendInterest::Pause;
                    break;
                }
                None => match read_frame(
                    &mut *pair.backend,
                    &mut pair.rx_buf,
                    active.guest_csum,
                    rx.log,
                ) {
                    ReadOutcome::Frame(len) => len,
                    ReadOutcome::Short => {
                        self.counters.rx_dropped = self.counters.rx_dropped.saturating_add(1);
                        continue;
                    }
                    ReadOutcome::Retry => continue,
                    // Keep watching: the tap is level-triggered, so the
                    // event loop calls again once a frame is there.
                    ReadOutcome::Idle => break,
                    ReadOutcome::Stop => {
                        interest = BackendInterest::Pause;
                        gone = true;
                        break;
                    }
                },
            };
            let frame = pair.rx_buf.get(..len).unwrap_or_default();
            if !self
                .filter
                .accepts(frame.get(VNET_HDR_LEN..).unwrap_or_default())
            {
                self.counters.rx_filtered = self.counters.rx_filtered.saturating_add(1);
                continue;
            }
            // Over the receive limit: the frame waits in the device and the
            // backend is left alone until the limiter's timer fires.
            if let Some(l) = self.limits.as_mut().filter(|_| limited) {
                if !limits::admit(&mut l.rx, payload_len(len)) {
                    pair.rx_pending = Some(len);
                    interest = BackendInterest::Pause;
                    break;
                }
            }
            match rx.deliver(frame) {
                Delivery::Delivered => {
                    let c = &mut self.counters;
                    c.rx_packets = c.rx_packets.saturating_add(1);
                    pair.rx_packets = pair.rx_packets.saturating_add(1);
                    c.rx_bytes = c.rx_bytes.saturating_add(payload_len(len));
                    pair.rx_avg = average(pair.rx_avg, len);
                    direct = pair.rx_avg >= DIRECT_MIN_AVG && !limited;
                }
                Delivery::Dropped => {
                    self.counters.rx_dropped = self.counters.rx_dropped.saturating_add(1);
                }
                Delivery::NoBuffers => {
                    pair.rx_pending = Some(len);
                    // Let through but not delivered: its tokens go back
                    // (it is charged when it is delivered).
                    if let Some(l) = self.limits.as_mut().filter(|_| limited) {
                        limits::refund(&mut l.rx, payload_len(len));
                    }
                    if !rearmed && rearm(&mut rx) {
                        rearmed = true;
                        continue;
                    }
                    interest = BackendInterest::Pause;
                    break;
                }
            }
        }
        let used_any = rx.used_any;
        let index = rx_index(p);
        match rx.finish() {
            Some(true) => interrupt(active, index, &mut self.log),
            Some(false) => {}
            None if used_any => notify(active, index, &mut self.log),
            None => {}
        }
        if gone {
            self.link_down();
        }
        interest
    }
}

/// What one read from the backend gave.
pub(super) enum ReadOutcome {
    /// A frame of this length (header included) is in the buffer.
    Frame(usize),
    /// Something shorter than the header: dropped.
    Short,
    /// Interrupted: read again.
    Retry,
    /// Nothing to read now.
    Idle,
    /// The backend is closed or failed: stop watching it.
    Stop,
}

/// Reads the next frame from the backend into `buf`. Without
/// VIRTIO_NET_F_GUEST_CSUM the device must hand over flags 0 (and so no
/// segmentation): everything in the header but `num_buffers` is cleared.
pub(super) fn read_frame(
    backend: &mut dyn NetBackend,
    buf: &mut [u8],
    guest_csum: bool,
    log: &mut FaultLog,
) -> ReadOutcome {
    match backend.read(buf) {
        Ok(0) => {
            log.report(Fault::RxBackend, format_args!("the backend is closed"));
            ReadOutcome::Stop
        }
        Ok(n) if n < VNET_HDR_LEN => {
            log.report(
                Fault::RxShort,
                format_args!("dropped a {n}-byte frame, shorter than its header"),
            );
            ReadOutcome::Short
        }
        Ok(n) => {
            if !guest_csum {
                if let Some(fields) = buf.get_mut(..NUM_BUFFERS_AT) {
                    fields.fill(0);
                }
            }
            ReadOutcome::Frame(n.min(buf.len()))
        }
        Err(e) => match e.kind() {
            io::ErrorKind::WouldBlock => ReadOutcome::Idle,
            io::ErrorKind::Interrupted => ReadOutcome::Retry,
            _ => {
                log.report(
                    Fault::RxBackend,
                    format_args!("cannot read from the backend (was the tap deleted?): {e}"),
                );
                ReadOutcome::Stop
            }
        },
    }
}

/// Whether the receive queue has a chain the device has not taken.
pub(super) fn has_available(queue: &Queue, mem: &GuestMemoryMmap) -> bool {
    queue
        .avail_idx(mem, Ordering::Acquire)
        .map(|idx| {
            let n = (idx - Wrapping(queue.next_avail())).0;
            n != 0 && n <= queue.size()
        })
        .unwrap_or(false)
}

/// What became of a received frame.
pub(super) enum Delivery {
    /// In the guest's buffers.
    Delivered,
    /// Lost: larger than the guest's buffers can ever hold, or a malformed
    /// chain cut it off.
    Dropped,
    /// Not enough buffers yet; none were used for it.
    NoBuffers,
}

/// Why a receive chain could not take its part of a frame. Only logged;
/// the chain is completed with length 0.
#[derive(Debug, thiserror::Error)]
enum RxChainError {
    #[error("it has a device-readable descriptor")]
    ReadableDescriptor,
    #[error("it has more than {MAX_CHAIN_DESCS} descriptors")]
    TooManyDescriptors,
    #[error("guest memory at {:#x} is not accessible", .0 .0)]
    GuestMemory(GuestAddress),
    #[error("its {0} bytes do not hold the {VNET_HDR_LEN}-byte header")]
    NoRoomForHeader(usize),
    #[error("it has no room")]
    Empty,
    #[error("it ends in a bad link (a loop, an index out of range, or past 4 GiB)")]
    Cut,
}

/// The guest addresses of the two `num_buffers` bytes, found while the
/// header is copied into the first chain.
#[derive(Default)]
struct NumBuffersAt([Option<GuestAddress>; 2]);

impl NumBuffersAt {
    /// Frame bytes `at..at + n` went to guest address `addr`.
    fn note(&mut self, at: usize, n: usize, addr: GuestAddress) {
        for (i, slot) in self.0.iter_mut().enumerate() {
            let byte = NUM_BUFFERS_AT + i;
            if (at..at + n).contains(&byte) {
                *slot = u64::try_from(byte - at)
                    .ok()
                    .and_then(|off| addr.0.checked_add(off))
                    .map(GuestAddress);
            }
        }
    }

    fn write(&self, mem: &GuestMemoryMmap, num_buffers: u16) {
        for (slot, byte) in self.0.iter().zip(num_buffers.to_le_bytes()) {
            if let Some(addr) = slot {
                // The frame was just written there, so this cannot fail.
                let _ = mem.write_obj(byte, *addr);
            }
        }
    }
}

/// The receive queue, borrowed from the device for one pass.
pub(super) struct RxQueue<'a> {
    pub(super) queue: &'a mut Queue,
    pub(super) mem: &'a GuestMemoryMmap,
    pub(super) mrg_rxbuf: bool,
    pub(super) chains: &'a mut Vec<(u16, u32)>,
    pub(super) log: &'a mut FaultLog,
    pub(super) used_any: bool,
    /// The used ring as one slice for this pass (`None`: it is not, and
    /// chains are completed through the queue's `add_used`).
    pub(super) used: Option<UsedRing<'a>>,
    /// The descriptor table and avail ring as slices for this pass, for the
    /// direct path (`None`: they are not, and the copying path takes every
    /// chain with virtio-queue).
    pub(super) reader: Option<ChainReader<'a>>,
}

impl RxQueue<'_> {
    /// Completes chain `head` with `len` bytes written; the driver sees it
    /// after [`publish`](Self::publish).
    pub(super) fn complete(&mut self, head: u16, len: u32) {
        let done = match &mut self.used {
            Some(used) => match used.add(self.queue, head, len) {
                Ok(()) => true,
                Err(e) => {
                    self.log.report(
                        Fault::UsedRing,
                        format_args!("cannot complete chain {head}: {e}"),
                    );
                    false
                }
            },
            None => complete(self.queue, self.mem, head, len, self.log),
        };
        self.used_any |= done;
    }

    /// Makes the chains completed so far visible to the driver.
    pub(super) fn publish(&self) {
        if let Some(used) = &self.used {
            used.publish(self.queue);
        }
    }

    /// Ends the pass: publishes, and says whether the driver wants an
    /// interrupt for what the pass completed (`None`: ask the queue).
    pub(super) fn finish(&mut self) -> Option<bool> {
        self.publish();
        let used = self.used.as_mut()?;
        Some(self.used_any && used.needs_notification(self.queue))
    }

    /// Copies `frame` into as many chains as it needs (one without
    /// VIRTIO_NET_F_MRG_RXBUF), sets `num_buffers`, and completes them.
    ///
    /// Chains that were filled but not completed (the frame did not fit,
    /// or not yet) are given back: the guest sees nothing of them. A
    /// malformed chain is completed with length 0; if it came after the
    /// first chain of a frame, the frame is dropped and its chains are
    /// completed with length 0 too, since used entries of one frame must be
    /// adjacent.
    pub(super) fn deliver(&mut self, frame: &[u8]) -> Delivery {
        let mut start = self.queue.next_avail();
        let max_chains = if self.mrg_rxbuf {
            usize::from(self.queue.size())
        } else {
            1
        };
        self.chains.clear();
        let mut written = 0usize;
        let mut descs = 0usize;
        let mut num_buffers_at = NumBuffersAt::default();
        while written < frame.len() {
            if self.chains.len() >= max_chains {
                return self.too_big(start, frame.len());
            }
            let Some(chain) = ember_virtio::queue::pop(self.queue, self.mem) else {
                if descs >= usize::from(self.queue.size()) {
                    // Every descriptor the driver has is in use for this
                    // frame: more room will never come.
                    return self.too_big(start, frame.len());
                }
                self.queue.set_next_avail(start);
                return Delivery::NoBuffers;
            };
            let head = chain.head_index();
            let rest = frame.get(written..).unwrap_or_default();
            match scatter(chain, self.mem, rest, written, &mut num_buffers_at) {
                Ok((n, d)) => {
                    descs += d;
                    written += n;
                    self.chains
                        .push((head, u32::try_from(n).unwrap_or(u32::MAX)));
                }
                Err(e) => {
                    if self.bad_chain(head, &e) {
                        return Delivery::Dropped;
                    }
                    start = self.queue.next_avail();
                }
            }
        }
        let count = u16::try_from(self.chains.len()).unwrap_or(u16::MAX);
        num_buffers_at.write(self.mem, count);
        self.complete_taken(true);
        self.publish();
        Delivery::Delivered
    }

    /// Completes the chains taken for the frame, with the bytes written
    /// into each or with 0.
    fn complete_taken(&mut self, with_len: bool) {
        for i in 0..self.chains.len() {
            if let Some(&(head, len)) = self.chains.get(i) {
                self.complete(head, if with_len { len } else { 0 });
            }
        }
    }

    /// Completes a malformed chain with length 0, and the chains of the
    /// frame it cut off if there is one; whether there was.
    fn bad_chain(&mut self, head: u16, e: &RxChainError) -> bool {
        self.log.report(
            Fault::RxChain,
            format_args!("bad receive chain {head}: {e}"),
        );
        let cut_off = !self.chains.is_empty();
        self.complete_taken(false);
        self.complete(head, 0);
        cut_off
    }

    /// Gives back the chains taken since `start` and drops the frame.
    fn too_big(&mut self, start: u16, len: usize) -> Delivery {
        self.queue.set_next_avail(start);
        self.log.report(
            Fault::RxTooBig,
            format_args!("dropped a {len}-byte frame: larger than the receive buffers"),
        );
        Delivery::Dropped
    }
}

/// Copies the start of `src` (frame bytes from `at` on) into the chain's
/// device-writable descriptors; returns the bytes copied and the
/// descriptors visited.
fn scatter(
    chain: DescriptorChain<&GuestMemoryMmap>,
    mem: &GuestMemoryMmap,
    src: &[u8],
    at: usize,
    num_buffers_at: &mut NumBuffersAt,
) -> std::result::Result<(usize, usize), RxChainError> {
    let mut done = 0usize;
    let mut descs = 0usize;
    let mut more = false;
    for d in chain {
        descs += 1;
        if descs > MAX_CHAIN_DESCS {
            return Err(RxChainError::TooManyDescriptors);
        }
        if !d.is_write_only() {
            return Err(RxChainError::ReadableDescriptor);
        }
        more = d.has_next();
        let left = src.len() - done;
        let n = usize::try_from(d.len()).map_or(left, |l| l.min(left));
        if n > 0 {
            let part = src.get(done..done + n).unwrap_or_default();
            mem.write_slice(part, d.addr())
                .map_err(|_| RxChainError::GuestMemory(d.addr()))?;
            num_buffers_at.note(at + done, n, d.addr());
            done += n;
        }
        if done == src.len() {
            more = false;
            break;
        }
    }
    if more {
        return Err(RxChainError::Cut);
    }
    if done == 0 {
        return Err(RxChainError::Empty);
    }
    if at == 0 && done < VNET_HDR_LEN.min(src.len()) {
        return Err(RxChainError::NoRoomForHeader(done));
    }
    Ok((done, descs))
}
