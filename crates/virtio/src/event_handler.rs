//! The event-loop side of every virtio device, written once: when a
//! queue's eventfd fires (the guest notified it; KVM signalled the
//! ioeventfd), the device processes that queue.

use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use vmm_sys_util::eventfd::EventFd;

use crate::device::VirtioDevice;
use crate::transport::VirtioPciDevice;

/// Watches the queue eventfds of one virtio-pci device.
pub struct QueueEvents<D: VirtioDevice> {
    device: Arc<Mutex<VirtioPciDevice<D>>>,
    evts: Vec<EventFd>,
}

impl<D: VirtioDevice> std::fmt::Debug for QueueEvents<D> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QueueEvents")
            .field("queues", &self.evts.len())
            .finish_non_exhaustive()
    }
}

impl<D: VirtioDevice> QueueEvents<D> {
    /// A subscriber for `device`'s queues.
    pub fn new(device: Arc<Mutex<VirtioPciDevice<D>>>) -> std::io::Result<Self> {
        let evts = device
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .queue_evts()
            .iter()
            .map(EventFd::try_clone)
            .collect::<std::io::Result<Vec<_>>>()?;
        Ok(QueueEvents { device, evts })
    }
}

impl<D: VirtioDevice> MutEventSubscriber for QueueEvents<D> {
    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        let Some(index) = self.evts.iter().position(|e| e.as_raw_fd() == events.fd()) else {
            return;
        };
        // Reading resets the counter: several notifications, one pass.
        if self.evts[index].read().is_err() {
            return;
        }
        self.device
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .process_queue(index);
    }

    fn init(&mut self, ops: &mut EventOps) {
        for (i, evt) in self.evts.iter().enumerate() {
            if let Err(e) = ops.add(Events::new(evt, EventSet::IN)) {
                log::error!("cannot watch virtio queue {i}: {e:?}");
            }
        }
    }
}
