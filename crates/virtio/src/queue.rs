//! Taking chains from a queue with the driver's notifications suppressed
//! while the device works (virtio 1.2, 2.7.10): the `NO_NOTIFY` flag, or
//! with `VIRTIO_RING_F_EVENT_IDX` the `avail_event` index.

use virtio_queue::{DescriptorChain, Queue, QueueT};
use vm_memory::GuestMemoryMmap;

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
