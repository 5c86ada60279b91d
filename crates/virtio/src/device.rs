//! The interface between a virtio device and its transport.

use std::sync::Arc;

use ember_memory::GuestMemoryMmap;
use virtio_queue::Queue;

/// Which interrupt a device raises.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum InterruptKind {
    /// The used ring of queue `n` changed.
    Queue(u16),
    /// The device configuration changed.
    Config,
}

/// How a device interrupts the driver. The transport implements it (MSI-X
/// vectors through irqfds for virtio-pci); tests implement it with a counter.
pub trait VirtioInterrupt: Send + Sync {
    /// Raises `kind`. An error means the interrupt could not be delivered.
    fn trigger(&self, kind: InterruptKind) -> std::io::Result<()>;
}

/// An interrupt that counts what it raises: for device tests and for VMMs
/// that poll rather than inject.
#[derive(Debug, Default)]
pub struct CountingInterrupt(pub std::sync::atomic::AtomicUsize);

impl CountingInterrupt {
    /// Interrupts raised so far.
    pub fn count(&self) -> usize {
        self.0.load(std::sync::atomic::Ordering::SeqCst)
    }
}

impl VirtioInterrupt for CountingInterrupt {
    fn trigger(&self, _kind: InterruptKind) -> std::io::Result<()> {
        self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        Ok(())
    }
}

/// Why a device could not be activated.
#[derive(Debug, thiserror::Error)]
pub enum ActivateError {
    /// The driver set up a different number of queues than the device has.
    #[error("expected {expected} queues, the driver set up {got}")]
    QueueCount {
        /// What the device needs.
        expected: usize,
        /// What the driver enabled.
        got: usize,
    },
    /// Device-specific failure.
    #[error("{0}")]
    Device(String),
}

/// What the transport hands a device when the driver sets DRIVER_OK.
pub struct ActivateContext {
    /// Guest memory.
    pub mem: GuestMemoryMmap,
    /// How to interrupt the driver.
    pub interrupt: Arc<dyn VirtioInterrupt>,
    /// The queues, set up and validated by the transport (`Queue::is_valid`),
    /// in queue-index order; a queue the driver did not enable is absent
    /// from the end.
    pub queues: Vec<Queue>,
    /// The features the driver acknowledged (a subset of
    /// [`VirtioDevice::avail_features`], including VIRTIO_F_VERSION_1).
    pub acked_features: u64,
}

impl std::fmt::Debug for ActivateContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ActivateContext")
            .field("queues", &self.queues.len())
            .field("acked_features", &self.acked_features)
            .finish_non_exhaustive()
    }
}

/// Whether the event loop keeps watching a device's backend fd.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BackendInterest {
    /// Keep watching it.
    Keep,
    /// Stop watching it until the driver next notifies one of the device's
    /// queues (for a net device: no receive buffers, so reading the tap would
    /// only spin).
    Pause,
}

/// A virtio device, independent of its transport.
///
/// The transport calls `read_config`/`write_config` from a vCPU thread on
/// device-config accesses, `activate` when the driver sets DRIVER_OK,
/// `process_queue` from the event loop when a queue is notified, and `reset`
/// when the driver writes 0 to the status register. All of it is driven by
/// the guest: no method may panic on any input.
pub trait VirtioDevice: Send {
    /// The virtio device type (`virtio_bindings::virtio_ids::VIRTIO_ID_*`).
    fn device_type(&self) -> u32;

    /// The maximum size of each queue; its length is the number of queues.
    fn queue_max_sizes(&self) -> &[u16];

    /// Every feature the device offers, VIRTIO_F_VERSION_1 included.
    fn avail_features(&self) -> u64;

    /// Reads device-config bytes at `offset`; bytes past the end read 0.
    fn read_config(&self, offset: u64, data: &mut [u8]);

    /// Writes device-config bytes at `offset` (most devices ignore this).
    fn write_config(&mut self, offset: u64, data: &[u8]);

    /// Starts the device with the driver's queues.
    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError>;

    /// Whether the device is activated.
    fn is_activated(&self) -> bool;

    /// Processes queue `index` (its notification fired). Does nothing when
    /// the device is not activated or `index` is out of range. The device
    /// raises the queue's interrupt itself when it used descriptors.
    fn process_queue(&mut self, index: usize);

    /// Returns the device to its state before activation (drops the
    /// queues, memory and interrupt). The backend (file, tap) is kept.
    fn reset(&mut self);

    /// The activated device's queues, in order, as a snapshot keeps them:
    /// the positions a restored device goes on from. A device that holds
    /// descriptor chains it has taken but not used gives positions before
    /// them (the restored device takes them again). Empty when not
    /// activated.
    fn queue_states(&self) -> Vec<virtio_queue::QueueState> {
        Vec::new()
    }

    /// A host file descriptor the event loop must watch for readability
    /// (a tap), if the device has one.
    fn backend_fd(&self) -> Option<std::os::fd::RawFd> {
        None
    }

    /// The backend fd is readable (or in error). Called from the event loop,
    /// also before activation. Returning [`BackendInterest::Pause`] stops the
    /// watching until the driver notifies any queue of this device.
    fn process_backend(&mut self) -> BackendInterest {
        BackendInterest::Pause
    }
}
