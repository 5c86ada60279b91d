//! The saved state of a virtio-pci device's transport and queues, plain
//! data apart from the guest memory, eventfds and interrupt routes the VMM
//! hands the rebuilt device.

use std::sync::atomic::Ordering;

use ember_pci::MsixState;
use serde::{Deserialize, Serialize};
use virtio_queue::{Queue, QueueT};

use crate::device::{InterruptKind, VirtioDevice, VirtioInterrupt};
use crate::transport::VirtioPciDevice;

/// The version of [`TransportState`]'s layout.
pub const TRANSPORT_STATE_VERSION: u32 = 1;

/// One virtqueue: its configuration and the device's position in it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QueueState {
    /// The most the device offers.
    pub max_size: u16,
    /// What the driver chose.
    pub size: u16,
    /// The driver enabled it.
    pub ready: bool,
    /// Descriptor table address.
    pub desc_table: u64,
    /// Available ring address.
    pub avail_ring: u64,
    /// Used ring address.
    pub used_ring: u64,
    /// The next available entry the device takes.
    pub next_avail: u16,
    /// The next used entry the device fills.
    pub next_used: u16,
    /// VIRTIO_RING_F_EVENT_IDX is in use.
    pub event_idx: bool,
}

impl From<virtio_queue::QueueState> for QueueState {
    fn from(q: virtio_queue::QueueState) -> Self {
        QueueState {
            max_size: q.max_size,
            size: q.size,
            ready: q.ready,
            desc_table: q.desc_table,
            avail_ring: q.avail_ring,
            used_ring: q.used_ring,
            next_avail: q.next_avail,
            next_used: q.next_used,
            event_idx: q.event_idx_enabled,
        }
    }
}

impl From<QueueState> for virtio_queue::QueueState {
    fn from(q: QueueState) -> Self {
        virtio_queue::QueueState {
            max_size: q.max_size,
            next_avail: q.next_avail,
            next_used: q.next_used,
            event_idx_enabled: q.event_idx,
            size: q.size,
            ready: q.ready,
            desc_table: q.desc_table,
            avail_ring: q.avail_ring,
            used_ring: q.used_ring,
        }
    }
}

/// A virtio-pci function's state: PCI config space, MSI-X, the common
/// configuration registers, and the queues.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TransportState {
    /// Layout version ([`TRANSPORT_STATE_VERSION`]).
    pub version: u32,
    /// The virtio device type.
    pub device_type: u32,
    /// The 256 bytes of PCI configuration space.
    pub pci_config: Vec<u8>,
    /// The MSI-X table and pending bits.
    pub msix: MsixState,
    /// Device feature select.
    pub device_feature_select: u32,
    /// Driver feature select.
    pub driver_feature_select: u32,
    /// The features the driver acknowledged.
    pub driver_features: u64,
    /// The device status register.
    pub status: u8,
    /// The configuration generation.
    pub config_generation: u8,
    /// Queue select.
    pub queue_select: u16,
    /// The configuration-change MSI-X vector.
    pub config_vector: u16,
    /// Each queue's MSI-X vector.
    pub queue_vectors: Vec<u16>,
    /// The ISR status byte.
    pub isr: u8,
    /// Each queue as the driver configured it.
    pub queues: Vec<QueueState>,
    /// The device was activated (DRIVER_OK and running).
    pub activated: bool,
    /// The activated device's queues, in order, with their positions.
    pub device_queues: Vec<QueueState>,
}

impl<D: VirtioDevice> VirtioPciDevice<D> {
    /// The transport's state and the device's queue positions, for a
    /// snapshot (the device is paused: no queue is being processed).
    pub fn state(&self) -> TransportState {
        let activated = self.is_running();
        TransportState {
            version: TRANSPORT_STATE_VERSION,
            device_type: self.device.device_type(),
            pci_config: self.config.state(),
            msix: self.msix.lock().unwrap_or_else(|e| e.into_inner()).state(),
            device_feature_select: self.device_feature_select,
            driver_feature_select: self.driver_feature_select,
            driver_features: self.driver_features,
            status: self.status,
            config_generation: self.config_generation,
            queue_select: self.queue_select,
            config_vector: self.config_vector.load(Ordering::SeqCst),
            queue_vectors: self.queue_vectors.clone(),
            isr: self.isr.load(Ordering::SeqCst),
            queues: self.queues.iter().map(|q| q.state().into()).collect(),
            activated,
            device_queues: if activated {
                self.device
                    .queue_states()
                    .into_iter()
                    .map(Into::into)
                    .collect()
            } else {
                Vec::new()
            },
        }
    }

    /// Puts this newly built transport (same device type, BAR and queue
    /// count) in `state` and, if the device was running, activates it with
    /// its queues where they were. Then [`kick`](Self::kick) it once the VM
    /// is ready to run.
    pub fn restore_state(&mut self, state: &TransportState) -> Result<(), String> {
        let name = self.name.clone();
        let err = |what: String| format!("{name}: {what}");
        if state.version != TRANSPORT_STATE_VERSION {
            return Err(err(format!(
                "transport state version {} is not supported (this ember reads {TRANSPORT_STATE_VERSION})",
                state.version
            )));
        }
        if state.device_type != self.device.device_type() {
            return Err(err(format!(
                "saved as virtio device type {}, this is type {}",
                state.device_type,
                self.device.device_type()
            )));
        }
        if state.queues.len() != self.queues.len() || state.queue_vectors.len() != self.queues.len()
        {
            return Err(err(format!(
                "{} queues saved, the device has {}",
                state.queues.len(),
                self.queues.len()
            )));
        }
        self.config
            .restore_state(&state.pci_config)
            .map_err(|e| err(e.to_string()))?;
        self.msix
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .restore_state(&state.msix)
            .map_err(err)?;
        let mut queues = Vec::with_capacity(state.queues.len());
        for (i, q) in state.queues.iter().enumerate() {
            let max = self.queues[i].max_size();
            if q.max_size != max {
                return Err(err(format!(
                    "queue {i}: saved with {} entries at most, the device offers {max}",
                    q.max_size
                )));
            }
            queues.push(
                Queue::try_from(virtio_queue::QueueState::from(*q))
                    .map_err(|e| err(format!("queue {i}: {e:?}")))?,
            );
        }
        self.queues = queues;
        self.device_feature_select = state.device_feature_select;
        self.driver_feature_select = state.driver_feature_select;
        self.driver_features = state.driver_features;
        self.status = state.status;
        self.config_generation = state.config_generation;
        self.queue_select = state.queue_select;
        self.config_vector
            .store(self.valid_vector(state.config_vector), Ordering::SeqCst);
        self.queue_vectors = state
            .queue_vectors
            .iter()
            .map(|&v| self.valid_vector(v))
            .collect();
        self.isr.store(state.isr, Ordering::SeqCst);
        if !state.activated {
            return Ok(());
        }
        // The running queues go on from the device's positions.
        let mut running = state.device_queues.iter();
        for q in self.queues.iter_mut().filter(|q| q.ready()) {
            let Some(pos) = running.next() else {
                return Err(err("fewer running queues saved than ready ones".into()));
            };
            q.set_next_avail(pos.next_avail);
            q.set_next_used(pos.next_used);
        }
        self.activate();
        if !self.is_running() {
            return Err(err("the restored device did not activate".into()));
        }
        // The transport's own copies stay as the driver left them.
        for (q, saved) in self.queues.iter_mut().zip(&state.queues) {
            q.set_next_avail(saved.next_avail);
            q.set_next_used(saved.next_used);
        }
        Ok(())
    }

    /// After a restore: processes every queue (a notification may have
    /// been pending when the snapshot was taken) and raises every queue's
    /// interrupt (one may have been raised and not delivered); a driver
    /// takes a spurious interrupt in its stride.
    pub fn kick(&mut self) {
        if !self.is_running() {
            return;
        }
        for i in 0..self.queues.len() {
            self.device.process_queue(i);
        }
        let interrupt = self.interrupt(self.queue_vectors.clone());
        for i in 0..self.queues.len() {
            let q = u16::try_from(i).unwrap_or(u16::MAX);
            if let Err(e) = interrupt.trigger(InterruptKind::Queue(q)) {
                log::warn!("{}: queue {i} interrupt after restore: {e}", self.name);
            }
        }
    }
}
