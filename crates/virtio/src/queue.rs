//! Taking chains from a queue with the driver's notifications suppressed
//! while the device works (virtio 1.2, 2.7.10): the `NO_NOTIFY` flag, or
//! with `VIRTIO_RING_F_EVENT_IDX` the `avail_event` index; [`UsedRing`],
//! completing many chains with one publication of the used index; and
//! [`ChainReader`], reading many chains' descriptors without a guest-memory
//! lookup each.

use std::sync::atomic::{fence, Ordering};

use ember_memory::{GuestMemoryMmap, Slice};
use virtio_bindings::virtio_ring::{VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT};
use virtio_queue::desc::split::Descriptor;
use virtio_queue::{DescriptorChain, Queue, QueueT};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend, VolatileMemory};

/// The used ring's header (`flags`, `idx`) in bytes.
const USED_HEADER: usize = 4;
/// One used element (`id`, `len`) in bytes.
const USED_ELEM: usize = 8;
/// The avail ring's header (`flags`, `idx`) in bytes.
const AVAIL_HEADER: u64 = 4;
/// Where the avail ring's entries start.
const AVAIL_ENTRIES_AT: usize = 4;

/// Why [`UsedRing::add`] could not complete a chain.
#[derive(Debug, thiserror::Error)]
pub enum UsedRingError {
    /// The head is not a descriptor index of the queue.
    #[error("descriptor index {0} is out of the ring")]
    BadHead(u16),
    /// The element could not be written (the ring slice is shorter than
    /// the queue: cannot happen for a ring made by [`UsedRing::new`]).
    #[error("cannot write the used element")]
    Write,
}

/// A split queue's used ring as one slice of guest memory, for a device
/// that completes many chains per pass (virtio-net's receive path
/// completes one per guest buffer: sixteen for a 64 KiB frame in 4 KiB
/// buffers).
///
/// virtio-queue's `add_used` looks guest memory up twice per chain and
/// publishes the used index each time. Here the ring is looked up once per
/// pass, each element is written into the slice, and the index is stored
/// once per [`publish`](UsedRing::publish) (with release ordering, after
/// the elements). The queue's own count of new entries is not kept by
/// [`add`](UsedRing::add), so a device using it decides its interrupts
/// with [`needs_notification`](UsedRing::needs_notification), not the
/// queue's.
pub struct UsedRing<'m> {
    ring: Slice<'m>,
    /// The driver's `used_event` (after the avail ring), with
    /// `VIRTIO_RING_F_EVENT_IDX`.
    used_event: Option<Slice<'m>>,
    size: u16,
    /// Entries added since the last notification decision (a pass may add
    /// more than the index space, and then always interrupts).
    added: u32,
}

impl<'m> UsedRing<'m> {
    /// The used ring of `queue` (and with `VIRTIO_RING_F_EVENT_IDX` the
    /// driver's `used_event`), or `None` if either is not one slice of
    /// guest memory; then complete with the queue's `add_used`.
    pub fn new(queue: &Queue, mem: &'m GuestMemoryMmap) -> Option<Self> {
        let size = queue.size();
        if size == 0 {
            return None;
        }
        let len = USED_HEADER + USED_ELEM * usize::from(size);
        let ring = mem.get_slice(GuestAddress(queue.used_ring()), len).ok()?;
        let used_event = if queue.event_idx_enabled() {
            let at =
                GuestAddress(queue.avail_ring()).checked_add(AVAIL_HEADER + 2 * u64::from(size))?;
            Some(mem.get_slice(at, 2).ok()?)
        } else {
            None
        };
        Some(UsedRing {
            ring,
            used_event,
            size,
            added: 0,
        })
    }

    /// Writes the used element of chain `head` (`len` bytes written to its
    /// buffers) at the queue's next used slot and moves that on. The driver
    /// sees it after the next [`publish`](UsedRing::publish).
    pub fn add(&mut self, queue: &mut Queue, head: u16, len: u32) -> Result<(), UsedRingError> {
        if head >= self.size {
            return Err(UsedRingError::BadHead(head));
        }
        let next = queue.next_used();
        let slot = usize::from(next % self.size);
        // The element (`id`, then `len`, little-endian) as one store.
        let elem = (u64::from(len) << 32) | u64::from(head);
        self.ring
            .get_ref::<u64>(USED_HEADER + USED_ELEM * slot)
            .map_err(|_| UsedRingError::Write)?
            .store(elem.to_le());
        queue.set_next_used(next.wrapping_add(1));
        self.added = self.added.saturating_add(1);
        Ok(())
    }

    /// Makes the elements added so far visible to the driver: stores the
    /// queue's next used index as the ring's `idx`, ordered after them.
    pub fn publish(&self, queue: &Queue) {
        // In bounds: the slice starts with the 4-byte header.
        let _ = self
            .ring
            .store(queue.next_used().to_le(), 2, Ordering::Release);
    }

    /// Whether the driver asked for an interrupt for the entries added
    /// since the last call (always, without `VIRTIO_RING_F_EVENT_IDX`);
    /// call after [`publish`](UsedRing::publish). The test is the one of
    /// virtio 1.2, 2.7.10.2 (Linux's `vring_need_event`): `used_event`
    /// lies among the entries just added.
    pub fn needs_notification(&mut self, queue: &Queue) -> bool {
        let added = std::mem::take(&mut self.added);
        let Some(event) = &self.used_event else {
            return true;
        };
        // The published index before the driver's used_event is read.
        fence(Ordering::SeqCst);
        let Ok(used_event) = event.load::<u16>(0, Ordering::Relaxed) else {
            return true;
        };
        let used_event = u16::from_le(used_event);
        let new = queue.next_used();
        u32::from(new.wrapping_sub(used_event).wrapping_sub(1)) < added
    }
}

/// One descriptor in bytes.
const DESC_SIZE: usize = 16;

/// Why [`ChainReader`] could not read a chain. The chain is malformed or
/// of a kind the reader leaves to virtio-queue; nothing was changed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ChainError {
    /// The avail ring names a head past the descriptor table.
    #[error("head {0} is out of the ring")]
    BadHead(u16),
    /// A descriptor's `next` is past the descriptor table.
    #[error("a descriptor links to {0}, past the ring")]
    BadNext(u16),
    /// The chain has more descriptors than the queue (a loop).
    #[error("the chain is longer than the queue (a loop)")]
    TooLong,
    /// The chain's buffers add up to more than 4 GiB (virtio 1.2,
    /// 2.7.5.2: drivers must not add such chains).
    #[error("the chain's buffers add up to more than 4 GiB")]
    TooLarge,
    /// An indirect descriptor (the reader does not follow them).
    #[error("descriptor {0} is indirect")]
    Indirect(u16),
}

/// A split queue's descriptor table and avail ring as slices of guest
/// memory, for a device that takes many chains per pass (virtio-net's
/// receive path takes sixteen single-buffer chains for a 64 KiB frame).
///
/// virtio-queue looks guest memory up for every avail entry and every
/// descriptor it reads. Here the table and the ring are looked up once, and
/// each entry is read from its slice. The reader does not move the queue:
/// the device takes the chains it read with `set_next_avail`. Chains the
/// reader refuses ([`ChainError`]: malformed, or indirect) are left for
/// virtio-queue, whose error handling the device already has.
pub struct ChainReader<'m> {
    desc: Slice<'m>,
    /// The avail ring's header and entries.
    avail: Slice<'m>,
    size: u16,
}

impl<'m> ChainReader<'m> {
    /// The descriptor table and avail ring of `queue`, or `None` if either
    /// is not one slice of guest memory (then take chains with
    /// virtio-queue).
    pub fn new(queue: &Queue, mem: &'m GuestMemoryMmap) -> Option<Self> {
        let size = queue.size();
        // virtio-queue takes nothing from a queue that is not ready or
        // whose avail ring is at 0; neither does the reader. (It also
        // refuses ring addresses misaligned for virtio 1.2, 2.7, so the
        // avail entries here can be read as aligned atomics.)
        if !queue.ready() || queue.avail_ring() == 0 || size == 0 || !size.is_power_of_two() {
            return None;
        }
        let n = usize::from(size);
        let desc = mem
            .get_slice(GuestAddress(queue.desc_table()), DESC_SIZE * n)
            .ok()?;
        let avail = mem
            .get_slice(GuestAddress(queue.avail_ring()), AVAIL_ENTRIES_AT + 2 * n)
            .ok()?;
        Some(ChainReader { desc, avail, size })
    }

    /// How many chains the driver has made available from `next_avail` on
    /// (the avail index read with acquire ordering, so the entries and
    /// descriptors it covers are read after it), or `None` if the index is
    /// more than a queue ahead (a corrupt ring: take nothing).
    pub fn available(&self, next_avail: u16) -> Option<u16> {
        let idx = self.avail.load::<u16>(2, Ordering::Acquire).ok()?;
        let n = u16::from_le(idx).wrapping_sub(next_avail);
        (n <= self.size).then_some(n)
    }

    /// The head of the chain at avail position `pos` (the ring entry
    /// `pos % size`).
    pub fn head(&self, pos: u16) -> Result<u16, ChainError> {
        let slot = usize::from(pos % self.size);
        let head = self
            .avail
            .load::<u16>(AVAIL_ENTRIES_AT + 2 * slot, Ordering::Relaxed)
            .map(u16::from_le)
            .unwrap_or(self.size);
        if head >= self.size {
            return Err(ChainError::BadHead(head));
        }
        Ok(head)
    }

    /// Descriptor `index` of the table (`None` past it). A device that
    /// finds a chain's head without `VRING_DESC_F_NEXT` and
    /// `VRING_DESC_F_INDIRECT` has the whole chain; [`chain`](Self::chain)
    /// follows longer ones.
    pub fn descriptor(&self, index: u16) -> Option<Descriptor> {
        if index >= self.size {
            return None;
        }
        // One volatile read of the whole descriptor.
        self.desc
            .get_ref::<Descriptor>(DESC_SIZE * usize::from(index))
            .ok()
            .map(|d| d.load())
    }

    /// The descriptors of the chain starting at `head`, in order; an error
    /// ends it.
    pub fn chain(&self, head: u16) -> ChainDescriptors<'_, 'm> {
        ChainDescriptors {
            reader: self,
            next: Some(head),
            first: true,
            left: self.size,
            bytes: 0,
        }
    }
}

/// The descriptors of one chain, from [`ChainReader::chain`].
pub struct ChainDescriptors<'r, 'm> {
    reader: &'r ChainReader<'m>,
    next: Option<u16>,
    first: bool,
    /// Descriptors the chain may still have (a queue's worth in all).
    left: u16,
    /// The lengths of the descriptors yielded so far.
    bytes: u32,
}

impl Iterator for ChainDescriptors<'_, '_> {
    type Item = Result<Descriptor, ChainError>;

    fn next(&mut self) -> Option<Self::Item> {
        let index = self.next.take()?;
        let Some(d) = self.reader.descriptor(index) else {
            return Some(Err(if self.first {
                ChainError::BadHead(index)
            } else {
                ChainError::BadNext(index)
            }));
        };
        self.first = false;
        if self.left == 0 {
            return Some(Err(ChainError::TooLong));
        }
        self.left -= 1;
        let flags = u32::from(d.flags());
        if flags & VRING_DESC_F_INDIRECT != 0 {
            return Some(Err(ChainError::Indirect(index)));
        }
        let Some(bytes) = self.bytes.checked_add(d.len()) else {
            return Some(Err(ChainError::TooLarge));
        };
        self.bytes = bytes;
        if flags & VRING_DESC_F_NEXT != 0 {
            self.next = Some(d.next());
        }
        Some(Ok(d))
    }
}

/// Calls `f` on every chain the driver has made available, with its
/// notifications off meanwhile, then turns them back on (with
/// `VIRTIO_RING_F_EVENT_IDX`: asks for a notification for the next chain
/// after the last one taken) and takes the chains added in between too.
///
/// A pass that takes no chain ends it, so a driver whose avail index is
/// corrupt cannot keep the device spinning. Errors writing the ring's
/// notification fields (a bad ring address) are returned after the chains
/// are taken; the chains are still processed.
pub fn drain<'m, F>(
    queue: &mut Queue,
    mem: &'m GuestMemoryMmap,
    mut f: F,
) -> Result<(), virtio_queue::Error>
where
    F: FnMut(&mut Queue, DescriptorChain<&'m GuestMemoryMmap>),
{
    let mut result = Ok(());
    loop {
        if let Err(e) = queue.disable_notification(mem) {
            result = Err(e);
        }
        let mut took = false;
        while let Some(chain) = pop(queue, mem) {
            took = true;
            f(queue, chain);
        }
        match queue.enable_notification(mem) {
            Ok(true) if took => {}
            Ok(_) => return result,
            Err(e) => return Err(e),
        }
    }
}

/// The next chain the driver made available, or `None`: there is none,
/// the ring cannot be read, or the driver's avail index is more than a
/// ring's size ahead of the device (corrupt: nothing is taken). Unlike
/// virtio-queue's own `pop_descriptor_chain`, it logs nothing, so a
/// driver that corrupts its index and notifies in a loop cannot flood
/// the log; the caller reports what it wants, once.
pub fn pop<'m>(
    queue: &mut Queue,
    mem: &'m GuestMemoryMmap,
) -> Option<DescriptorChain<&'m GuestMemoryMmap>> {
    let avail = queue.avail_idx(mem, Ordering::Acquire).ok()?;
    if avail.0.wrapping_sub(queue.next_avail()) > queue.size() {
        return None;
    }
    queue.pop_descriptor_chain(mem)
}

/// What the callback of [`drain_while`] says after a chain.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Flow {
    /// The chain was taken care of; go on.
    Continue,
    /// The chain was not taken (a rate limiter said no): it goes back to
    /// the ring, taken again next time, and the pass ends with the
    /// driver's notifications left off.
    PutBack,
}

/// [`drain`], where the callback can put a chain back and stop (a rate
/// limit was reached). Returns whether it stopped so; the device calls it
/// again when it may go on (its timer fired), not on a notification.
pub fn drain_while<'m, F>(
    queue: &mut Queue,
    mem: &'m GuestMemoryMmap,
    mut f: F,
) -> Result<bool, virtio_queue::Error>
where
    F: FnMut(&mut Queue, DescriptorChain<&'m GuestMemoryMmap>) -> Flow,
{
    let mut result = Ok(false);
    loop {
        if let Err(e) = queue.disable_notification(mem) {
            result = Err(e);
        }
        let mut took = false;
        while let Some(chain) = pop(queue, mem) {
            if f(queue, chain) == Flow::PutBack {
                virtio_queue::QueueOwnedT::go_to_previous_position(queue);
                return result.map(|_| true);
            }
            took = true;
        }
        match queue.enable_notification(mem) {
            Ok(true) if took => {}
            Ok(_) => return result,
            Err(e) => return Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_queue::desc::{split::Descriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;

    /// `VRING_DESC_F_NEXT` and `VRING_DESC_F_INDIRECT` as descriptor flags.
    const DESC_F_NEXT: u16 = 1;
    const DESC_F_INDIRECT: u16 = 4;
    use vm_memory::{Address, Bytes, GuestAddress};

    fn setup(
        mem: &GuestMemoryMmap,
        event_idx: bool,
    ) -> (MockSplitQueue<'_, GuestMemoryMmap>, Queue) {
        let vq = MockSplitQueue::new(mem, 16);
        let descs: Vec<RawDescriptor> = (0..4u64)
            .map(|i| RawDescriptor::from(Descriptor::new(0x8000 + i * 0x100, 0x100, 0, 0)))
            .collect();
        vq.add_desc_chains(&descs, 0).unwrap();
        let mut q: Queue = vq.create_queue().unwrap();
        q.set_event_idx(event_idx);
        (vq, q)
    }

    #[test]
    fn drain_takes_every_chain_and_asks_for_the_next_one() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x1_0000)]).unwrap();
        for event_idx in [false, true] {
            let (vq, mut q) = setup(&mem, event_idx);
            let mut heads = Vec::new();
            drain(&mut q, &mem, |q, chain| {
                heads.push(chain.head_index());
                q.add_used(&mem, chain.head_index(), 0).unwrap();
            })
            .unwrap();
            assert_eq!(heads, vec![0, 1, 2, 3]);
            // Notifications are back on: no NO_NOTIFY flag, and with
            // EVENT_IDX the driver is asked to notify for chain 4.
            let used = vq.used_addr();
            let flags: u16 = mem.read_obj(used).unwrap();
            assert_eq!(flags, 0, "event_idx {event_idx}");
            if event_idx {
                let avail_event = vq.used_addr().unchecked_add(4 + 8 * 16);
                assert_eq!(mem.read_obj::<u16>(avail_event).unwrap(), 4);
            }
        }
    }

    #[test]
    fn drain_while_puts_a_refused_chain_back_and_takes_it_next_time() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x1_0000)]).unwrap();
        let (_vq, mut q) = setup(&mem, false);
        let mut heads = Vec::new();
        let stopped = drain_while(&mut q, &mem, |q, chain| {
            if chain.head_index() == 2 {
                return Flow::PutBack;
            }
            heads.push(chain.head_index());
            q.add_used(&mem, chain.head_index(), 0).unwrap();
            Flow::Continue
        })
        .unwrap();
        assert!(stopped);
        assert_eq!(heads, vec![0, 1]);
        let stopped = drain_while(&mut q, &mem, |q, chain| {
            heads.push(chain.head_index());
            q.add_used(&mem, chain.head_index(), 0).unwrap();
            Flow::Continue
        })
        .unwrap();
        assert!(!stopped);
        assert_eq!(heads, vec![0, 1, 2, 3], "chain 2 is taken again, once");
    }

    #[test]
    fn used_ring_writes_what_add_used_writes_with_one_index_store() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x1_0000)]).unwrap();
        let twin = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x1_0000)]).unwrap();
        let (vq, mut q) = setup(&mem, false);
        let (_, mut t) = setup(&twin, false);
        let idx = vq.used_addr().unchecked_add(2);
        let mut used = UsedRing::new(&q, &mem).unwrap();
        for (head, len) in [(2u16, 100u32), (0, 0), (3, 4096)] {
            used.add(&mut q, head, len).unwrap();
            t.add_used(&twin, head, len).unwrap();
        }
        // Nothing visible before publishing, then the same ring bytes.
        assert_eq!(mem.read_obj::<u16>(idx).unwrap(), 0);
        used.publish(&q);
        assert_eq!(q.next_used(), 3);
        let mut a = [0u8; 4 + 8 * 16];
        let mut b = [0u8; 4 + 8 * 16];
        mem.read_slice(&mut a, vq.used_addr()).unwrap();
        twin.read_slice(&mut b, vq.used_addr()).unwrap();
        assert_eq!(a, b);
        assert_eq!(mem.read_obj::<u16>(idx).unwrap(), 3);
        // A head past the ring is refused and nothing moves.
        assert!(matches!(
            used.add(&mut q, 16, 0),
            Err(UsedRingError::BadHead(16))
        ));
        assert_eq!(q.next_used(), 3);
    }

    #[test]
    fn used_ring_notifies_when_used_event_is_among_the_new_entries() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x1_0000)]).unwrap();
        // Without EVENT_IDX: always.
        let (_, mut q) = setup(&mem, false);
        let mut used = UsedRing::new(&q, &mem).unwrap();
        used.add(&mut q, 0, 0).unwrap();
        used.publish(&q);
        assert!(used.needs_notification(&q));

        let (vq, mut q) = setup(&mem, true);
        let used_event = vq.avail_addr().unchecked_add(4 + 2 * 16);
        let mut used = UsedRing::new(&q, &mem).unwrap();
        let add = |used: &mut UsedRing<'_>, q: &mut Queue, n: u16| {
            for head in 0..n {
                used.add(q, head, 0).unwrap();
            }
            used.publish(q);
        };
        // Entries 0..3 added: the driver asked after entry 1 (used_event 1).
        add(&mut used, &mut q, 3);
        mem.write_obj(1u16, used_event).unwrap();
        assert!(used.needs_notification(&q));
        // Entry 3 added, the driver waits for entry 5: no interrupt.
        add(&mut used, &mut q, 1);
        mem.write_obj(5u16, used_event).unwrap();
        assert!(!used.needs_notification(&q));
        // Entries 4 and 5 added: entry 5 is among them.
        add(&mut used, &mut q, 2);
        assert!(used.needs_notification(&q));
        // Nothing added since: no interrupt, whatever used_event says.
        mem.write_obj(5u16, used_event).unwrap();
        assert!(!used.needs_notification(&q));
        // Across the index's wrap: next_used 65535 -> 1, used_event 0.
        q.set_next_used(65535);
        add(&mut used, &mut q, 2);
        mem.write_obj(0u16, used_event).unwrap();
        assert!(used.needs_notification(&q));
    }

    /// Chains as (head, descriptors as (addr, len, flags without NEXT)).
    type Chains = Vec<(u16, Vec<(u64, u32, u16)>)>;

    /// The chains virtio-queue pops from `q`.
    fn popped(q: &mut Queue, mem: &GuestMemoryMmap) -> Chains {
        let mut out = Vec::new();
        while let Some(chain) = q.pop_descriptor_chain(mem) {
            let head = chain.head_index();
            let descs = chain
                .map(|d| (d.addr().0, d.len(), d.flags() & !DESC_F_NEXT))
                .collect();
            out.push((head, descs));
        }
        out
    }

    /// The chains `reader` reads from avail position `from` on.
    fn read(reader: &ChainReader<'_>, from: u16) -> Chains {
        let n = reader.available(from).unwrap();
        (0..n)
            .map(|k| {
                let head = reader.head(from.wrapping_add(k)).unwrap();
                let descs = reader
                    .chain(head)
                    .map(|d| {
                        let d = d.unwrap();
                        (d.addr().0, d.len(), d.flags() & !DESC_F_NEXT)
                    })
                    .collect();
                (head, descs)
            })
            .collect()
    }

    #[test]
    fn chain_reader_reads_what_virtio_queue_pops() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x1_0000)]).unwrap();
        let vq = MockSplitQueue::new(&mem, 16);
        // Chains of 1, 3 and 2 descriptors, mixed directions.
        let d = |i: u16, flags: u16, next: u16| {
            let addr = 0x8000 + u64::from(i) * 0x100;
            RawDescriptor::from(Descriptor::new(addr, 0x100 + u32::from(i), flags, next))
        };
        let (w, n) = (2, DESC_F_NEXT);
        vq.add_desc_chains(
            &[
                d(0, w, 0),
                d(1, n, 2),
                d(2, w | n, 3),
                d(3, w, 0),
                d(4, w | n, 5),
                d(5, w, 0),
            ],
            0,
        )
        .unwrap();
        let mut q: Queue = vq.create_queue().unwrap();
        let reader = ChainReader::new(&q, &mem).unwrap();
        let ours = read(&reader, 0);
        let theirs = popped(&mut q, &mem);
        let lens: Vec<usize> = ours.iter().map(|(_, d)| d.len()).collect();
        assert_eq!(lens, [1, 3, 2]);
        assert_eq!(ours, theirs);
    }

    #[test]
    fn chain_reader_refuses_malformed_chains() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x1_0000)]).unwrap();
        let vq = MockSplitQueue::new(&mem, 16);
        let desc_at = |i: u64| vq.desc_table_addr().unchecked_add(16 * i);
        let put = |i: u64, flags: u16, next: u16| {
            let raw = RawDescriptor::from(Descriptor::new(0x8000, 0x100, flags, next));
            mem.write_obj(raw, desc_at(i)).unwrap();
        };
        let mut q: Queue = vq.create_queue().unwrap();
        // No reader for a queue virtio-queue would take nothing from.
        q.set_ready(false);
        assert!(ChainReader::new(&q, &mem).is_none());
        q.set_ready(true);
        let reader = ChainReader::new(&q, &mem).unwrap();
        let first_error = |head: u16| reader.chain(head).find_map(|d| d.err());
        // 0 -> 1 -> 0: a loop ends after a queue's worth of descriptors.
        put(0, DESC_F_NEXT, 1);
        put(1, DESC_F_NEXT, 0);
        assert_eq!(first_error(0), Some(ChainError::TooLong));
        assert_eq!(reader.chain(0).filter(|d| d.is_ok()).count(), 16);
        // 2 -> 16: past the table.
        put(2, DESC_F_NEXT, 16);
        assert_eq!(first_error(2), Some(ChainError::BadNext(16)));
        // 4 -> 5 of 4 GiB - 1 bytes each: more than 4 GiB in all.
        let huge = |i: u64, flags: u16, next: u16| {
            let raw = RawDescriptor::from(Descriptor::new(0x8000, u32::MAX, flags, next));
            mem.write_obj(raw, desc_at(i)).unwrap();
        };
        huge(4, DESC_F_NEXT, 5);
        huge(5, 0, 0);
        assert_eq!(first_error(4), Some(ChainError::TooLarge));
        // An indirect descriptor.
        put(3, DESC_F_INDIRECT, 0);
        assert_eq!(first_error(3), Some(ChainError::Indirect(3)));
        assert_eq!(first_error(16), Some(ChainError::BadHead(16)));
        // A ring entry naming head 40.
        let avail = vq.avail_addr();
        mem.write_obj(40u16, avail.unchecked_add(4 + 2 * 5))
            .unwrap();
        assert_eq!(reader.head(5), Err(ChainError::BadHead(40)));
        // Position 21 is entry 5 again (a 16-entry ring).
        assert_eq!(reader.head(21), Err(ChainError::BadHead(40)));
        // An avail index more than a queue ahead: nothing to take.
        mem.write_obj(17u16, avail.unchecked_add(2)).unwrap();
        assert_eq!(reader.available(0), None);
        assert_eq!(reader.available(1), Some(16));
        // Across the index's wrap: idx 2, next_avail 65534.
        mem.write_obj(2u16, avail.unchecked_add(2)).unwrap();
        assert_eq!(reader.available(65534), Some(4));
    }

    #[test]
    fn drain_stops_on_a_corrupt_avail_index() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x1_0000)]).unwrap();
        let (vq, mut q) = setup(&mem, true);
        // An avail index more than a queue ahead: nothing can be popped, and
        // enable_notification keeps saying there is more.
        mem.write_obj(0x4000u16, vq.avail_addr().unchecked_add(2))
            .unwrap();
        let mut calls = 0;
        drain(&mut q, &mem, |_, _| calls += 1).unwrap();
        assert_eq!(calls, 0);
    }
}
