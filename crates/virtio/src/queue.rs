//! Taking chains from a queue with the driver's notifications suppressed
//! while the device works (virtio 1.2, 2.7.10): the `NO_NOTIFY` flag, or
//! with `VIRTIO_RING_F_EVENT_IDX` the `avail_event` index; and
//! [`UsedRing`], completing many chains with one publication of the used
//! index.

use std::sync::atomic::{fence, Ordering};

use virtio_queue::{DescriptorChain, Queue, QueueT};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, VolatileSlice};

/// The used ring's header (`flags`, `idx`) in bytes.
const USED_HEADER: usize = 4;
/// One used element (`id`, `len`) in bytes.
const USED_ELEM: usize = 8;
/// The avail ring's header (`flags`, `idx`) in bytes.
const AVAIL_HEADER: u64 = 4;

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
    ring: VolatileSlice<'m>,
    /// The driver's `used_event` (after the avail ring), with
    /// `VIRTIO_RING_F_EVENT_IDX`.
    used_event: Option<VolatileSlice<'m>>,
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
        let mut elem = [0u8; USED_ELEM];
        elem[..4].copy_from_slice(&u32::from(head).to_le_bytes());
        elem[4..].copy_from_slice(&len.to_le_bytes());
        self.ring
            .write_slice(&elem, USED_HEADER + USED_ELEM * slot)
            .map_err(|_| UsedRingError::Write)?;
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
        while let Some(chain) = queue.pop_descriptor_chain(mem) {
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

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_queue::desc::{split::Descriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
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
