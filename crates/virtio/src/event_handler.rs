//! The event-loop side of every virtio device, written once: when a
//! queue's eventfd fires (the guest notified it; KVM signalled the
//! ioeventfd), the device processes that queue.

use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Mutex};

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use vmm_sys_util::eventfd::EventFd;

use crate::device::{BackendInterest, VirtioDevice};
use crate::transport::VirtioPciDevice;

/// Watches the queue eventfds of one virtio-pci device, and its backend
/// fd (a tap) if it has one.
pub struct QueueEvents<D: VirtioDevice> {
    device: Arc<Mutex<VirtioPciDevice<D>>>,
    evts: Vec<EventFd>,
    backend: Option<RawFd>,
    backend_paused: bool,
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
        let backend = device
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .device()
            .backend_fd();
        Ok(QueueEvents {
            device,
            evts,
            backend,
            backend_paused: false,
        })
    }

    fn watch_backend(&mut self, ops: &mut EventOps) {
        if let (Some(fd), true) = (self.backend, self.backend_paused) {
            match ops.add(Events::new_raw(fd, EventSet::IN)) {
                Ok(()) => self.backend_paused = false,
                Err(e) => log::error!("cannot watch a virtio backend again: {e:?}"),
            }
        }
    }
}

impl<D: VirtioDevice> MutEventSubscriber for QueueEvents<D> {
    fn process(&mut self, events: Events, ops: &mut EventOps) {
        if Some(events.fd()) == self.backend {
            let interest = self
                .device
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .process_backend();
            if interest == BackendInterest::Pause {
                let _ = ops.remove(Events::new_raw(events.fd(), EventSet::IN));
                self.backend_paused = true;
            }
            return;
        }
        let Some(index) = self.evts.iter().position(|e| e.as_raw_fd() == events.fd()) else {
            return;
        };
        // The driver did something: the backend may be served again.
        self.watch_backend(ops);
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
        // Also when the subscriber is put back after a VM pause: the
        // backend is watched again and tells whether it still waits.
        self.backend_paused = false;
        if let Some(fd) = self.backend {
            if let Err(e) = ops.add(Events::new_raw(fd, EventSet::IN)) {
                log::error!("cannot watch a virtio backend: {e:?}");
            }
        }
    }
}
