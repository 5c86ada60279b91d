//! The modern virtio-pci transport (virtio 1.2, section 4.1): one 64-bit
//! memory BAR holding the common configuration, ISR, device configuration,
//! notification and MSI-X regions, described by vendor capabilities in PCI
//! config space. The same type serves virtio-mmio (see [`crate::mmio`]):
//! the feature negotiation, status machine, queues, activation and reset
//! here are the transports' common part.
//!
//! BAR 0 layout:
//!
//! | offset | region |
//! | --- | --- |
//! | 0x0000 | common configuration (0x38 bytes) |
//! | 0x1000 | ISR status (1 byte, read to clear) |
//! | 0x2000 | device configuration |
//! | 0x3000 | notifications, 4 bytes per queue |
//! | 0x4000 | MSI-X table |
//! | 0x6000 | MSI-X pending bit array |

use std::sync::atomic::{AtomicU16, AtomicU8, Ordering};
use std::sync::{Arc, Mutex};

use ember_memory::GuestMemoryMmap;
use ember_pci::{
    BarKind, BarMove, MsiSink, MsixConfig, PciBar, PciConfigParams, PciConfiguration, PciDevice,
    PCI_CAP_ID_MSIX,
};
use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK, VIRTIO_CONFIG_S_FEATURES_OK,
    VIRTIO_CONFIG_S_NEEDS_RESET, VIRTIO_F_VERSION_1,
};
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use virtio_queue::{Queue, QueueT};
use vm_device::bus::{MmioAddress, MmioAddressOffset};
use vm_device::MutDeviceMmio;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::device::{ActivateContext, InterruptKind, VirtioDevice, VirtioInterrupt};

/// PCI vendor id of virtio devices.
pub const VIRTIO_PCI_VENDOR_ID: u16 = 0x1af4;
/// Modern virtio-pci device ids are this plus the virtio device type.
pub const VIRTIO_PCI_DEVICE_ID_BASE: u16 = 0x1040;
/// "No MSI-X vector" (virtio 1.2, 4.1.4.3).
pub const VIRTIO_MSI_NO_VECTOR: u16 = 0xffff;

// virtio_pci.h capability types (virtio-bindings does not carry virtio_pci.h).
const PCI_CAP_ID_VNDR: u8 = 0x09;
const VIRTIO_PCI_CAP_COMMON_CFG: u8 = 1;
const VIRTIO_PCI_CAP_NOTIFY_CFG: u8 = 2;
const VIRTIO_PCI_CAP_ISR_CFG: u8 = 3;
const VIRTIO_PCI_CAP_DEVICE_CFG: u8 = 4;

/// The BAR holding every region.
pub const VIRTIO_BAR_INDEX: u8 = 0;
/// Its size.
pub const VIRTIO_BAR_SIZE: u64 = 0x8000;
const COMMON_CFG_OFFSET: u64 = 0x0000;
const COMMON_CFG_LEN: usize = 0x38;
const COMMON_CFG_SIZE: u64 = COMMON_CFG_LEN as u64;
const ISR_CFG_OFFSET: u64 = 0x1000;
const ISR_CFG_SIZE: u64 = 1;
const DEVICE_CFG_OFFSET: u64 = 0x2000;
const DEVICE_CFG_SIZE: u64 = 0x1000;
/// Where queue notifications are written.
pub const NOTIFY_OFFSET: u64 = 0x3000;
const NOTIFY_SIZE: u64 = 0x1000;
/// Queue `n` is notified at `NOTIFY_OFFSET + n * NOTIFY_OFF_MULTIPLIER`.
pub const NOTIFY_OFF_MULTIPLIER: u32 = 4;
const MSIX_TABLE_OFFSET: u64 = 0x4000;
const MSIX_PBA_OFFSET: u64 = 0x6000;

const ISR_QUEUE: u8 = 0x1;
const ISR_CONFIG: u8 = 0x2;

/// The device status bits as u8 (they all fit).
const fn status_bit(b: u32) -> u8 {
    (b & 0xff) as u8
}
const S_DRIVER: u8 = status_bit(VIRTIO_CONFIG_S_DRIVER);
pub(crate) const S_DRIVER_OK: u8 = status_bit(VIRTIO_CONFIG_S_DRIVER_OK);
const S_FEATURES_OK: u8 = status_bit(VIRTIO_CONFIG_S_FEATURES_OK);
const S_NEEDS_RESET: u8 = status_bit(VIRTIO_CONFIG_S_NEEDS_RESET);

fn low32(v: u64) -> u32 {
    u32::try_from(v & 0xffff_ffff).unwrap_or(0)
}

fn low16(v: u64) -> u16 {
    u16::try_from(v & 0xffff).unwrap_or(0)
}

/// The PCI class of a virtio device type (block: mass storage, net:
/// network; others: unclassified).
fn pci_class(device_type: u32) -> (u8, u8) {
    match device_type {
        virtio_bindings::virtio_ids::VIRTIO_ID_BLOCK => (0x01, 0x80),
        virtio_bindings::virtio_ids::VIRTIO_ID_NET => (0x02, 0x00),
        _ => (0xff, 0x00),
    }
}

/// Interrupts of one virtio device: the ISR byte (virtio-mmio's
/// InterruptStatus) and MSI-X vectors on PCI, or one interrupt line (an
/// irqfd) on virtio-mmio.
pub(crate) struct TransportInterrupt {
    pub(crate) msix: Arc<Mutex<MsixConfig>>,
    pub(crate) isr: Arc<AtomicU8>,
    pub(crate) config_vector: Arc<AtomicU16>,
    pub(crate) queue_vectors: Vec<u16>,
    pub(crate) irq: Option<Arc<EventFd>>,
}

impl VirtioInterrupt for TransportInterrupt {
    fn trigger(&self, kind: InterruptKind) -> std::io::Result<()> {
        if let Some(irq) = &self.irq {
            let bit = match kind {
                InterruptKind::Queue(_) => ISR_QUEUE,
                InterruptKind::Config => ISR_CONFIG,
            };
            self.isr.fetch_or(bit, Ordering::SeqCst);
            return irq.write(1);
        }
        let vector = match kind {
            InterruptKind::Queue(q) => {
                self.isr.fetch_or(ISR_QUEUE, Ordering::SeqCst);
                self.queue_vectors
                    .get(usize::from(q))
                    .copied()
                    .unwrap_or(VIRTIO_MSI_NO_VECTOR)
            }
            InterruptKind::Config => {
                self.isr.fetch_or(ISR_CONFIG, Ordering::SeqCst);
                self.config_vector.load(Ordering::SeqCst)
            }
        };
        if vector != VIRTIO_MSI_NO_VECTOR {
            self.msix
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .trigger(vector);
        }
        Ok(())
    }
}

/// A virtio device on the PCI bus.
pub struct VirtioPciDevice<D: VirtioDevice> {
    pub(crate) device: D,
    pub(crate) config: PciConfiguration,
    pub(crate) msix: Arc<Mutex<MsixConfig>>,
    pub(crate) msix_control_offset: u16,
    pub(crate) mem: GuestMemoryMmap,
    pub(crate) queues: Vec<Queue>,
    pub(crate) queue_vectors: Vec<u16>,
    pub(crate) queue_evts: Vec<EventFd>,
    pub(crate) isr: Arc<AtomicU8>,
    pub(crate) config_vector: Arc<AtomicU16>,
    pub(crate) device_feature_select: u32,
    pub(crate) driver_feature_select: u32,
    pub(crate) driver_features: u64,
    pub(crate) status: u8,
    pub(crate) config_generation: u8,
    pub(crate) queue_select: u16,
    pub(crate) misuse_logged: bool,
    pub(crate) name: String,
    /// virtio-mmio: the register file's guest address and the interrupt
    /// line (see [`VirtioPciDevice::new_mmio`]); `None` on PCI.
    pub(crate) mmio: Option<(u64, Arc<EventFd>)>,
}

impl<D: VirtioDevice> std::fmt::Debug for VirtioPciDevice<D> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VirtioPciDevice")
            .field("name", &self.name)
            .field("status", &self.status)
            .finish_non_exhaustive()
    }
}

/// Errors building a virtio-pci device.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// A queue could not be created.
    #[error("cannot create queue {0} of {1}")]
    Queue(usize, String),
    /// An eventfd could not be created.
    #[error("cannot create an eventfd")]
    EventFd(#[source] std::io::Error),
    /// The PCI configuration could not be built.
    #[error("cannot build the PCI configuration: {0}")]
    Pci(String),
}

fn vndr_cap(cfg_type: u8, offset: u64, length: u64, extra: Option<u32>) -> Vec<u8> {
    // struct virtio_pci_cap after cap_vndr and cap_next: cap_len, cfg_type,
    // bar, id, padding[2], offset, length (+ notify_off_multiplier).
    let cap_len: u8 = if extra.is_some() { 20 } else { 16 };
    let mut body = vec![cap_len, cfg_type, VIRTIO_BAR_INDEX, 0, 0, 0];
    body.extend(u32::try_from(offset).unwrap_or(0).to_le_bytes());
    body.extend(u32::try_from(length).unwrap_or(0).to_le_bytes());
    if let Some(x) = extra {
        body.extend(x.to_le_bytes());
    }
    body
}

impl<D: VirtioDevice> VirtioPciDevice<D> {
    /// Puts `device` behind a virtio-pci function whose BAR 0 is at
    /// `bar_addr` (64-bit, [`VIRTIO_BAR_SIZE`] bytes), interrupting through
    /// `msi` (one vector per queue plus one for configuration changes).
    /// `name` names it in logs.
    pub fn new(
        name: &str,
        device: D,
        mem: GuestMemoryMmap,
        bar_addr: u64,
        msi: Arc<dyn MsiSink>,
    ) -> Result<Self, TransportError> {
        Self::build(name, device, mem, bar_addr, msi, None)
    }

    pub(crate) fn build(
        name: &str,
        device: D,
        mem: GuestMemoryMmap,
        bar_addr: u64,
        msi: Arc<dyn MsiSink>,
        mmio: Option<(u64, Arc<EventFd>)>,
    ) -> Result<Self, TransportError> {
        let device_type = device.device_type();
        let (class, subclass) = pci_class(device_type);
        let mut config = PciConfiguration::new(&PciConfigParams {
            vendor_id: VIRTIO_PCI_VENDOR_ID,
            device_id: VIRTIO_PCI_DEVICE_ID_BASE + u16::try_from(device_type).unwrap_or(0),
            revision: 1,
            class,
            subclass,
            prog_if: 0,
            subsystem_vendor_id: VIRTIO_PCI_VENDOR_ID,
            subsystem_id: 0x40,
        });
        let pci = |e: ember_pci::Error| TransportError::Pci(e.to_string());
        config
            .add_bar(PciBar {
                index: VIRTIO_BAR_INDEX,
                addr: bar_addr,
                size: VIRTIO_BAR_SIZE,
                kind: BarKind::Mem64,
                prefetchable: false,
            })
            .map_err(pci)?;

        let queue_count = device.queue_max_sizes().len();
        let vectors = u16::try_from(queue_count + 1).unwrap_or(u16::MAX);
        let msix = MsixConfig::new(vectors, msi);
        let body = msix.capability_body(
            VIRTIO_BAR_INDEX,
            u32::try_from(MSIX_TABLE_OFFSET).unwrap_or(0),
            VIRTIO_BAR_INDEX,
            u32::try_from(MSIX_PBA_OFFSET).unwrap_or(0),
        );
        let msix_cap = config.add_capability(PCI_CAP_ID_MSIX, &body).map_err(pci)?;
        // Message control: enable (bit 15) and function mask (bit 14) are writable.
        config.set_writable(msix_cap + 3, &[0xc0]);
        for (cfg_type, off, len, extra) in [
            (
                VIRTIO_PCI_CAP_COMMON_CFG,
                COMMON_CFG_OFFSET,
                COMMON_CFG_SIZE,
                None,
            ),
            (VIRTIO_PCI_CAP_ISR_CFG, ISR_CFG_OFFSET, ISR_CFG_SIZE, None),
            (
                VIRTIO_PCI_CAP_DEVICE_CFG,
                DEVICE_CFG_OFFSET,
                DEVICE_CFG_SIZE,
                None,
            ),
            (
                VIRTIO_PCI_CAP_NOTIFY_CFG,
                NOTIFY_OFFSET,
                NOTIFY_SIZE,
                Some(NOTIFY_OFF_MULTIPLIER),
            ),
        ] {
            config
                .add_capability(PCI_CAP_ID_VNDR, &vndr_cap(cfg_type, off, len, extra))
                .map_err(pci)?;
        }

        let mut queues = Vec::with_capacity(queue_count);
        let mut queue_evts = Vec::with_capacity(queue_count);
        for (i, &max) in device.queue_max_sizes().iter().enumerate() {
            queues.push(Queue::new(max).map_err(|e| TransportError::Queue(i, format!("{e:?}")))?);
            queue_evts.push(EventFd::new(EFD_NONBLOCK).map_err(TransportError::EventFd)?);
        }
        Ok(VirtioPciDevice {
            device,
            config,
            msix: Arc::new(Mutex::new(msix)),
            msix_control_offset: u16::from(msix_cap) + 2,
            mem,
            queue_vectors: vec![VIRTIO_MSI_NO_VECTOR; queue_count],
            queues,
            queue_evts,
            isr: Arc::new(AtomicU8::new(0)),
            config_vector: Arc::new(AtomicU16::new(VIRTIO_MSI_NO_VECTOR)),
            device_feature_select: 0,
            driver_feature_select: 0,
            driver_features: 0,
            status: 0,
            config_generation: 0,
            queue_select: 0,
            misuse_logged: false,
            name: name.to_string(),
            mmio,
        })
    }

    /// The device behind the transport.
    pub fn device(&self) -> &D {
        &self.device
    }

    /// The device behind the transport, mutably (e.g. to flush a disk).
    pub fn device_mut(&mut self) -> &mut D {
        &mut self.device
    }

    /// The eventfd of each queue: the VMM registers each as an ioeventfd at
    /// [`Self::notify_addr`] and watches it in its event loop.
    pub fn queue_evts(&self) -> &[EventFd] {
        &self.queue_evts
    }

    /// The guest address where queue `index` is notified (on virtio-mmio
    /// every queue is notified at the same address, with its index as the
    /// value: see [`Self::notify_datamatch`]).
    pub fn notify_addr(&self, index: usize) -> u64 {
        match &self.mmio {
            Some((base, _)) => base + crate::mmio::QUEUE_NOTIFY,
            None => {
                self.bar_addr() + NOTIFY_OFFSET + index as u64 * u64::from(NOTIFY_OFF_MULTIPLIER)
            }
        }
    }

    /// The value the driver writes to notify queue `index`, when the
    /// ioeventfd must match it (virtio-mmio); `None`: any value (PCI).
    pub fn notify_datamatch(&self, index: usize) -> Option<u32> {
        self.mmio
            .as_ref()
            .map(|_| u32::try_from(index).unwrap_or(u32::MAX))
    }

    /// BAR 0's current address (virtio-mmio: the register file's address).
    pub fn bar_addr(&self) -> u64 {
        if let Some((base, _)) = &self.mmio {
            return *base;
        }
        self.config
            .bar(VIRTIO_BAR_INDEX)
            .map(|b| b.addr)
            .unwrap_or(0)
    }

    /// Whether the device is on virtio-mmio (else PCI).
    pub fn is_mmio(&self) -> bool {
        self.mmio.is_some()
    }

    /// The device's interrupts, with `queue_vectors` for its queues.
    pub(crate) fn interrupt(&self, queue_vectors: Vec<u16>) -> TransportInterrupt {
        TransportInterrupt {
            msix: self.msix.clone(),
            isr: self.isr.clone(),
            config_vector: self.config_vector.clone(),
            queue_vectors,
            irq: self.mmio.as_ref().map(|(_, irq)| irq.clone()),
        }
    }

    /// The device status register.
    pub fn status(&self) -> u8 {
        self.status
    }

    /// The device's backend fd became readable.
    pub fn process_backend(&mut self) -> crate::device::BackendInterest {
        self.device.process_backend()
    }

    /// Whether the driver finished setting up the device and it runs.
    pub fn is_running(&self) -> bool {
        self.status & S_DRIVER_OK != 0
            && self.status & S_NEEDS_RESET == 0
            && self.device.is_activated()
    }

    /// Queue `index` was notified (its eventfd fired): the device
    /// processes it when it runs; a notification before DRIVER_OK is dropped.
    pub fn process_queue(&mut self, index: usize) {
        if self.is_running() {
            self.device.process_queue(index);
        } else {
            log::debug!(
                "{}: queue {index} notified before DRIVER_OK, ignored",
                self.name
            );
        }
    }

    pub(crate) fn log_misuse(&mut self, what: &str) {
        if !self.misuse_logged {
            self.misuse_logged = true;
            log::warn!(
                "{}: the driver broke the virtio protocol: {what} (logged once)",
                self.name
            );
        } else {
            log::debug!("{}: {what}", self.name);
        }
    }

    pub(crate) fn selected_queue(&self) -> Option<&Queue> {
        self.queues.get(usize::from(self.queue_select))
    }

    fn msix_vectors(&self) -> u16 {
        self.msix
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .vectors()
    }

    pub(crate) fn valid_vector(&self, v: u16) -> u16 {
        if v < self.msix_vectors() {
            v
        } else {
            VIRTIO_MSI_NO_VECTOR
        }
    }

    /// The common configuration structure as the driver sees it now.
    fn common_cfg_bytes(&self) -> [u8; COMMON_CFG_LEN] {
        let mut b = [0u8; COMMON_CFG_LEN];
        let feature = match self.device_feature_select {
            0 => self.device.avail_features() & 0xffff_ffff,
            1 => self.device.avail_features() >> 32,
            _ => 0,
        };
        let put = |b: &mut [u8], off: usize, v: &[u8]| b[off..off + v.len()].copy_from_slice(v);
        put(&mut b, 0x00, &self.device_feature_select.to_le_bytes());
        put(
            &mut b,
            0x04,
            &u32::try_from(feature).unwrap_or(0).to_le_bytes(),
        );
        put(&mut b, 0x08, &self.driver_feature_select.to_le_bytes());
        let driver = match self.driver_feature_select {
            0 => self.driver_features & 0xffff_ffff,
            1 => self.driver_features >> 32,
            _ => 0,
        };
        put(
            &mut b,
            0x0c,
            &u32::try_from(driver).unwrap_or(0).to_le_bytes(),
        );
        put(
            &mut b,
            0x10,
            &self.config_vector.load(Ordering::SeqCst).to_le_bytes(),
        );
        let num_queues = u16::try_from(self.queues.len()).unwrap_or(0);
        put(&mut b, 0x12, &num_queues.to_le_bytes());
        b[0x14] = self.status;
        b[0x15] = self.config_generation;
        put(&mut b, 0x16, &self.queue_select.to_le_bytes());
        if let Some(q) = self.selected_queue() {
            let i = usize::from(self.queue_select);
            put(&mut b, 0x18, &q.size().to_le_bytes());
            put(&mut b, 0x1a, &self.queue_vectors[i].to_le_bytes());
            put(&mut b, 0x1c, &u16::from(q.ready()).to_le_bytes());
            put(&mut b, 0x1e, &self.queue_select.to_le_bytes());
            put(&mut b, 0x20, &q.desc_table().to_le_bytes());
            put(&mut b, 0x28, &q.avail_ring().to_le_bytes());
            put(&mut b, 0x30, &q.used_ring().to_le_bytes());
        }
        b
    }

    fn read_common(&self, offset: u64, data: &mut [u8]) {
        let b = self.common_cfg_bytes();
        let start = usize::try_from(offset).unwrap_or(usize::MAX);
        match start
            .checked_add(data.len())
            .and_then(|end| b.get(start..end))
        {
            Some(src) => data.copy_from_slice(src),
            None => data.fill(0),
        }
    }

    fn write_common(&mut self, offset: u64, data: &[u8]) {
        let v = match data.len() {
            1 => u64::from(data[0]),
            2 => u64::from(u16::from_le_bytes([data[0], data[1]])),
            4 => u64::from(u32::from_le_bytes([data[0], data[1], data[2], data[3]])),
            8 => u64::from_le_bytes([
                data[0], data[1], data[2], data[3], data[4], data[5], data[6], data[7],
            ]),
            _ => {
                self.log_misuse("common config write of odd width");
                return;
            }
        };
        let v32 = low32(v);
        let v16 = low16(v);
        match (offset, data.len()) {
            (0x00, 4) => self.device_feature_select = v32,
            (0x08, 4) => self.driver_feature_select = v32,
            (0x0c, 4) => self.write_driver_features(v32),
            (0x10, 2) => {
                let vector = self.valid_vector(v16);
                self.config_vector.store(vector, Ordering::SeqCst);
            }
            (0x14, 1) => self.write_status(data[0]),
            (0x16, 2) => self.queue_select = v16,
            (0x18, 2) | (0x1a, 2) | (0x1c, 2) | (0x20..=0x37, 4) | (0x20 | 0x28 | 0x30, 8) => {
                self.write_queue_register(offset, data.len(), v)
            }
            _ => self.log_misuse(&format!(
                "write of {} bytes to read-only or unknown common config offset {offset:#x}",
                data.len()
            )),
        }
    }

    pub(crate) fn write_driver_features(&mut self, v: u32) {
        if self.status & S_DRIVER == 0 || self.status & S_FEATURES_OK != 0 {
            self.log_misuse("driver features written outside feature negotiation");
            return;
        }
        match self.driver_feature_select {
            0 => self.driver_features = (self.driver_features & !0xffff_ffff) | u64::from(v),
            1 => self.driver_features = (self.driver_features & 0xffff_ffff) | (u64::from(v) << 32),
            _ => {}
        }
    }

    /// Queue registers may change only between FEATURES_OK... and DRIVER_OK:
    /// once the device runs they are fixed (a driver changing a queue's size
    /// or addresses after DRIVER_OK is refused: Firecracker CVE-2026-5747).
    fn write_queue_register(&mut self, offset: u64, len: usize, v: u64) {
        if self.status & S_DRIVER_OK != 0 {
            self.log_misuse("queue configuration changed after DRIVER_OK, refused");
            return;
        }
        let i = usize::from(self.queue_select);
        let vector = self.valid_vector(low16(v));
        let Some(q) = self.queues.get_mut(i) else {
            return;
        };
        let lo = Some(low32(v));
        let hi = Some(low32(v >> 32));
        let (low, high) = if len == 8 {
            (lo, hi)
        } else if offset % 8 == 0 {
            (lo, None)
        } else {
            (None, lo)
        };
        let mut misuse = None;
        match offset {
            0x18 => {
                if let Err(e) = q.try_set_size(low16(v)) {
                    misuse = Some(format!("invalid queue size {v}: {e:?}"));
                }
            }
            0x1a => self.queue_vectors[i] = vector,
            0x1c => q.set_ready(v == 1),
            0x20..=0x27 => q.set_desc_table_address(low, high),
            0x28..=0x2f => q.set_avail_ring_address(low, high),
            0x30..=0x37 => q.set_used_ring_address(low, high),
            _ => {}
        }
        if let Some(m) = misuse {
            self.log_misuse(&m);
        }
    }

    pub(crate) fn write_status(&mut self, new: u8) {
        if new == 0 {
            self.reset();
            return;
        }
        // Bits are only ever added; clearing one needs a reset.
        if new & self.status != self.status {
            self.log_misuse("status bits cleared without a reset");
            return;
        }
        let added = new & !self.status;
        if added & S_FEATURES_OK != 0 {
            let avail = self.device.avail_features();
            let version_1 = 1u64 << VIRTIO_F_VERSION_1;
            if self.driver_features & !avail != 0 || self.driver_features & version_1 == 0 {
                // Leave FEATURES_OK clear: the driver reads it back and gives up.
                self.log_misuse("driver accepted features the device does not offer");
                self.status = new & !S_FEATURES_OK;
                return;
            }
        }
        if added & S_DRIVER_OK != 0 {
            if self.status & S_FEATURES_OK == 0 {
                self.log_misuse("DRIVER_OK without FEATURES_OK");
                return;
            }
            self.status = new;
            self.activate();
            return;
        }
        self.status = new;
    }

    pub(crate) fn activate(&mut self) {
        let event_idx = self.driver_features & (1u64 << VIRTIO_RING_F_EVENT_IDX) != 0;
        let mut queues = Vec::new();
        let mut vectors = Vec::new();
        for (i, q) in self.queues.iter_mut().enumerate() {
            if !q.ready() {
                continue;
            }
            if !q.is_valid(&self.mem) {
                self.needs_reset(&format!(
                    "queue {i} is invalid (size or addresses outside guest memory)"
                ));
                return;
            }
            q.set_event_idx(event_idx);
            match Queue::try_from(q.state()) {
                Ok(dq) => queues.push(dq),
                Err(e) => {
                    self.needs_reset(&format!("queue {i}: {e:?}"));
                    return;
                }
            }
            vectors.push(self.queue_vectors[i]);
        }
        let interrupt = Arc::new(self.interrupt(vectors));
        let ctx = ActivateContext {
            mem: self.mem.clone(),
            interrupt,
            queues,
            acked_features: self.driver_features,
        };
        if let Err(e) = self.device.activate(ctx) {
            self.needs_reset(&format!("activation failed: {e}"));
        } else {
            log::debug!("{}: activated", self.name);
        }
    }

    /// The device cannot go on until the driver resets it.
    fn needs_reset(&mut self, why: &str) {
        self.log_misuse(why);
        self.status |= S_NEEDS_RESET;
        let _ = self.signal_config_change();
    }

    /// The device's configuration space changed (a disk's capacity, say):
    /// the generation moves on, so a driver reading it knows, and the
    /// configuration-change interrupt is raised.
    pub fn signal_config_change(&mut self) -> std::io::Result<()> {
        self.config_generation = self.config_generation.wrapping_add(1);
        self.interrupt(Vec::new()).trigger(InterruptKind::Config)
    }

    pub(crate) fn reset(&mut self) {
        self.device.reset();
        for q in &mut self.queues {
            q.reset();
        }
        self.queue_vectors.fill(VIRTIO_MSI_NO_VECTOR);
        self.config_vector
            .store(VIRTIO_MSI_NO_VECTOR, Ordering::SeqCst);
        self.isr.store(0, Ordering::SeqCst);
        self.device_feature_select = 0;
        self.driver_feature_select = 0;
        self.driver_features = 0;
        self.queue_select = 0;
        self.status = 0;
        self.misuse_logged = false;
    }

    /// Reads `data.len()` bytes at `offset` into BAR 0.
    pub fn bar_read(&mut self, offset: u64, data: &mut [u8]) {
        let end = offset.saturating_add(data.len() as u64);
        match offset {
            o if end <= COMMON_CFG_OFFSET + COMMON_CFG_SIZE => self.read_common(o, data),
            o if (ISR_CFG_OFFSET..ISR_CFG_OFFSET + ISR_CFG_SIZE).contains(&o) => {
                // Reading the ISR clears it.
                data.fill(0);
                if let Some(first) = data.first_mut() {
                    *first = self.isr.swap(0, Ordering::SeqCst);
                }
            }
            o if (DEVICE_CFG_OFFSET..DEVICE_CFG_OFFSET + DEVICE_CFG_SIZE).contains(&o) => {
                self.device.read_config(o - DEVICE_CFG_OFFSET, data)
            }
            o if (MSIX_TABLE_OFFSET..MSIX_PBA_OFFSET).contains(&o) => self
                .msix
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .read_table(o - MSIX_TABLE_OFFSET, data),
            o if (MSIX_PBA_OFFSET..VIRTIO_BAR_SIZE).contains(&o) => self
                .msix
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .read_pba(o - MSIX_PBA_OFFSET, data),
            _ => data.fill(0),
        }
    }

    /// Writes `data` at `offset` into BAR 0.
    pub fn bar_write(&mut self, offset: u64, data: &[u8]) {
        let end = offset.saturating_add(data.len() as u64);
        match offset {
            o if end <= COMMON_CFG_OFFSET + COMMON_CFG_SIZE => self.write_common(o, data),
            o if (DEVICE_CFG_OFFSET..DEVICE_CFG_OFFSET + DEVICE_CFG_SIZE).contains(&o) => {
                self.device.write_config(o - DEVICE_CFG_OFFSET, data)
            }
            o if (NOTIFY_OFFSET..NOTIFY_OFFSET + NOTIFY_SIZE).contains(&o) => {
                // Normally an ioeventfd catches this in KVM; without one the
                // notification arrives here.
                let q = (o - NOTIFY_OFFSET) / u64::from(NOTIFY_OFF_MULTIPLIER);
                if let Some(evt) = usize::try_from(q).ok().and_then(|q| self.queue_evts.get(q)) {
                    if let Err(e) = evt.write(1) {
                        log::warn!("{}: cannot signal queue {q}: {e}", self.name);
                    }
                }
            }
            o if (MSIX_TABLE_OFFSET..MSIX_PBA_OFFSET).contains(&o) => self
                .msix
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .write_table(o - MSIX_TABLE_OFFSET, data),
            _ => {}
        }
    }
}

impl<D: VirtioDevice> PciDevice for VirtioPciDevice<D> {
    fn config_read(&mut self, offset: u16, data: &mut [u8]) {
        self.config.read(offset, data);
    }

    fn config_write(&mut self, offset: u16, data: &[u8]) -> Option<BarMove> {
        let moved = self.config.write(offset, data);
        let end = offset.saturating_add(u16::try_from(data.len()).unwrap_or(u16::MAX));
        if offset < self.msix_control_offset + 2 && end > self.msix_control_offset {
            let mut control = [0u8; 2];
            self.config.read(self.msix_control_offset, &mut control);
            self.msix
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .set_message_control(u16::from_le_bytes(control));
        }
        moved
    }
}

impl<D: VirtioDevice> MutDeviceMmio for VirtioPciDevice<D> {
    fn mmio_read(&mut self, _base: MmioAddress, offset: MmioAddressOffset, data: &mut [u8]) {
        if self.mmio.is_some() {
            self.mmio_reg_read(offset, data);
        } else {
            self.bar_read(offset, data);
        }
    }

    fn mmio_write(&mut self, _base: MmioAddress, offset: MmioAddressOffset, data: &[u8]) {
        if self.mmio.is_some() {
            self.mmio_reg_write(offset, data);
        } else {
            self.bar_write(offset, data);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::device::ActivateError;
    use ember_pci::MsiMessage;
    use std::sync::atomic::AtomicUsize;
    use vm_memory::GuestAddress;

    #[derive(Default)]
    struct Recorder {
        fired: Mutex<Vec<u16>>,
        configured: Mutex<Vec<(u16, MsiMessage)>>,
    }
    impl MsiSink for Recorder {
        fn configure(&self, vector: u16, msg: MsiMessage) -> std::io::Result<()> {
            self.configured.lock().unwrap().push((vector, msg));
            Ok(())
        }
        fn fire(&self, vector: u16) -> std::io::Result<()> {
            self.fired.lock().unwrap().push(vector);
            Ok(())
        }
    }

    #[derive(Default)]
    struct Dummy {
        active: Option<ActivateContext>,
        activations: usize,
        resets: usize,
        processed: Arc<AtomicUsize>,
    }
    const DUMMY_FEATURE: u64 = 1 << 5;
    impl VirtioDevice for Dummy {
        fn device_type(&self) -> u32 {
            virtio_bindings::virtio_ids::VIRTIO_ID_BLOCK
        }
        fn queue_max_sizes(&self) -> &[u16] {
            &[16]
        }
        fn avail_features(&self) -> u64 {
            (1 << VIRTIO_F_VERSION_1) | DUMMY_FEATURE
        }
        fn read_config(&self, offset: u64, data: &mut [u8]) {
            data.fill(u8::try_from(offset).unwrap_or(0xee));
        }
        fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
        fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
            self.activations += 1;
            self.active = Some(ctx);
            Ok(())
        }
        fn is_activated(&self) -> bool {
            self.active.is_some()
        }
        fn process_queue(&mut self, index: usize) {
            self.processed.fetch_add(1, Ordering::SeqCst);
            if let Some(ctx) = &self.active {
                let _ = ctx
                    .interrupt
                    .trigger(InterruptKind::Queue(u16::try_from(index).unwrap()));
            }
        }
        fn reset(&mut self) {
            self.resets += 1;
            self.active = None;
        }
        fn queue_states(&self) -> Vec<virtio_queue::QueueState> {
            self.active
                .as_ref()
                .map(|a| a.queues.iter().map(|q| q.state()).collect())
                .unwrap_or_default()
        }
    }

    const BAR: u64 = 0x1_0000_0000;

    fn setup() -> (VirtioPciDevice<Dummy>, Arc<Recorder>) {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        let rec = Arc::new(Recorder::default());
        let dev = VirtioPciDevice::new("test", Dummy::default(), mem, BAR, rec.clone()).unwrap();
        (dev, rec)
    }

    fn w8(d: &mut VirtioPciDevice<Dummy>, off: u64, v: u8) {
        d.bar_write(off, &[v]);
    }
    fn w16(d: &mut VirtioPciDevice<Dummy>, off: u64, v: u16) {
        d.bar_write(off, &v.to_le_bytes());
    }
    fn w32(d: &mut VirtioPciDevice<Dummy>, off: u64, v: u32) {
        d.bar_write(off, &v.to_le_bytes());
    }
    fn w64(d: &mut VirtioPciDevice<Dummy>, off: u64, v: u64) {
        d.bar_write(off, &v.to_le_bytes());
    }
    fn r8(d: &mut VirtioPciDevice<Dummy>, off: u64) -> u8 {
        let mut b = [0u8; 1];
        d.bar_read(off, &mut b);
        b[0]
    }
    fn r16(d: &mut VirtioPciDevice<Dummy>, off: u64) -> u16 {
        let mut b = [0u8; 2];
        d.bar_read(off, &mut b);
        u16::from_le_bytes(b)
    }
    fn r32(d: &mut VirtioPciDevice<Dummy>, off: u64) -> u32 {
        let mut b = [0u8; 4];
        d.bar_read(off, &mut b);
        u32::from_le_bytes(b)
    }
    fn r64(d: &mut VirtioPciDevice<Dummy>, off: u64) -> u64 {
        let mut b = [0u8; 8];
        d.bar_read(off, &mut b);
        u64::from_le_bytes(b)
    }

    /// The Linux driver's sequence up to FEATURES_OK, accepting `features`.
    fn negotiate(d: &mut VirtioPciDevice<Dummy>, features: u64) -> u8 {
        w8(d, 0x14, S_ACKNOWLEDGE_BIT);
        w8(d, 0x14, S_ACKNOWLEDGE_BIT | S_DRIVER);
        w32(d, 0x08, 0);
        w32(d, 0x0c, low32(features));
        w32(d, 0x08, 1);
        w32(d, 0x0c, low32(features >> 32));
        w8(d, 0x14, S_ACKNOWLEDGE_BIT | S_DRIVER | S_FEATURES_OK);
        r8(d, 0x14)
    }
    const S_ACKNOWLEDGE_BIT: u8 = 1;
    const VERSION_1: u64 = 1 << VIRTIO_F_VERSION_1;

    /// Queue 0 at valid addresses, enabled.
    fn setup_queue(d: &mut VirtioPciDevice<Dummy>) {
        w16(d, 0x16, 0);
        w16(d, 0x18, 16);
        w64(d, 0x20, 0x1000);
        w64(d, 0x28, 0x2000);
        w64(d, 0x30, 0x3000);
        w16(d, 0x1c, 1);
    }

    fn driver_ok(d: &mut VirtioPciDevice<Dummy>) {
        let s = r8(d, 0x14);
        w8(d, 0x14, s | S_DRIVER_OK);
    }

    /// Enables MSI-X in config space and unmasks `vector` with `data`.
    fn enable_msix_vector(d: &mut VirtioPciDevice<Dummy>, vector: u64, data: u32) {
        let ctl = d.msix_control_offset;
        let mut c = [0u8; 2];
        d.config_read(ctl, &mut c);
        let v = u16::from_le_bytes(c) | 0x8000;
        d.config_write(ctl, &v.to_le_bytes());
        let entry = MSIX_TABLE_OFFSET + 16 * vector;
        w64(d, entry, 0xfee0_0000);
        w32(d, entry + 8, data);
        w32(d, entry + 12, 0);
    }

    fn config_read32(d: &mut VirtioPciDevice<Dummy>, off: u16) -> u32 {
        let mut b = [0u8; 4];
        d.config_read(off, &mut b);
        u32::from_le_bytes(b)
    }

    #[test]
    fn transport_config_space_identifies_a_modern_virtio_device_with_its_capabilities() {
        let (mut d, _) = setup();
        let id = config_read32(&mut d, 0);
        assert_eq!(id & 0xffff, 0x1af4);
        assert_eq!(id >> 16, 0x1042);
        // Walk the capability list.
        let mut caps = Vec::new();
        let mut ptr = config_read32(&mut d, 0x34) & 0xff;
        while ptr != 0 && caps.len() < 16 {
            let off = u16::try_from(ptr).unwrap();
            let head = config_read32(&mut d, off);
            let (id, next, cfg_type) = (head & 0xff, (head >> 8) & 0xff, (head >> 24) & 0xff);
            let bar_off = config_read32(&mut d, off + 8);
            caps.push((id, cfg_type, bar_off));
            ptr = next;
        }
        assert!(caps.iter().any(|c| c.0 == 0x11), "MSI-X capability");
        for (ty, off) in [(1, 0x0000), (2, 0x3000), (3, 0x1000), (4, 0x2000)] {
            assert!(
                caps.iter().any(|c| c.0 == 0x09 && c.1 == ty && c.2 == off),
                "vendor capability type {ty} at {off:#x}: {caps:x?}"
            );
        }
        assert_eq!(d.bar_addr(), BAR);
    }

    #[test]
    fn transport_common_config_reports_features_and_queues() {
        let (mut d, _) = setup();
        w32(&mut d, 0x00, 0);
        assert_eq!(r32(&mut d, 0x04), low32(DUMMY_FEATURE));
        w32(&mut d, 0x00, 1);
        assert_eq!(r32(&mut d, 0x04), 1, "VERSION_1 is bit 32");
        w32(&mut d, 0x00, 7);
        assert_eq!(r32(&mut d, 0x04), 0);
        assert_eq!(r16(&mut d, 0x12), 1, "one queue");
        assert_eq!(r16(&mut d, 0x18), 16, "max size before setup");
        assert_eq!(r16(&mut d, 0x1e), 0, "notify offset of queue 0");
        w16(&mut d, 0x16, 5);
        assert_eq!(r16(&mut d, 0x18), 0, "no queue 5");
    }

    #[test]
    fn transport_features_without_version_1_are_refused() {
        let (mut d, _) = setup();
        let status = negotiate(&mut d, DUMMY_FEATURE);
        assert_eq!(status & S_FEATURES_OK, 0);
    }

    #[test]
    fn transport_features_the_device_lacks_are_refused() {
        let (mut d, _) = setup();
        let status = negotiate(&mut d, VERSION_1 | (1 << 7));
        assert_eq!(status & S_FEATURES_OK, 0);
    }

    #[test]
    fn transport_driver_ok_activates_the_device_with_its_queue() {
        let (mut d, _) = setup();
        assert_ne!(
            negotiate(&mut d, VERSION_1 | DUMMY_FEATURE) & S_FEATURES_OK,
            0
        );
        setup_queue(&mut d);
        driver_ok(&mut d);
        assert!(d.is_running());
        let ctx = d.device().active.as_ref().unwrap();
        assert_eq!(ctx.queues.len(), 1);
        assert_eq!(ctx.queues[0].size(), 16);
        assert_eq!(ctx.queues[0].desc_table(), 0x1000);
        assert_eq!(ctx.acked_features, VERSION_1 | DUMMY_FEATURE);
        assert_eq!(r64(&mut d, 0x28), 0x2000);
    }

    #[test]
    fn transport_driver_ok_without_features_ok_is_ignored() {
        let (mut d, _) = setup();
        w8(&mut d, 0x14, S_ACKNOWLEDGE_BIT | S_DRIVER);
        setup_queue(&mut d);
        driver_ok(&mut d);
        assert!(!d.device().is_activated());
        assert_eq!(d.status() & S_DRIVER_OK, 0);
    }

    #[test]
    fn transport_queue_outside_guest_memory_sets_needs_reset() {
        let (mut d, _) = setup();
        negotiate(&mut d, VERSION_1);
        setup_queue(&mut d);
        w64(&mut d, 0x30, 0x10_0000_0000); // used ring far outside memory
        driver_ok(&mut d);
        assert!(!d.device().is_activated());
        assert_ne!(d.status() & S_NEEDS_RESET, 0);
        assert!(!d.is_running());
    }

    #[test]
    fn transport_bad_queue_size_is_ignored() {
        let (mut d, _) = setup();
        negotiate(&mut d, VERSION_1);
        w16(&mut d, 0x18, 12); // not a power of two
        assert_eq!(r16(&mut d, 0x18), 16);
        w16(&mut d, 0x18, 64); // above the maximum
        assert_eq!(r16(&mut d, 0x18), 16);
    }

    /// Firecracker CVE-2026-5747: a driver changing a queue's size or
    /// addresses after DRIVER_OK made the device write out of bounds. Here
    /// the change is refused and the running device keeps its queue.
    #[test]
    fn transport_queue_changes_after_driver_ok_are_refused() {
        let (mut d, _) = setup();
        negotiate(&mut d, VERSION_1);
        setup_queue(&mut d);
        driver_ok(&mut d);
        w16(&mut d, 0x18, 8);
        w64(&mut d, 0x20, 0xdead_0000);
        w64(&mut d, 0x30, 0xfff0);
        w16(&mut d, 0x1c, 0);
        assert_eq!(r16(&mut d, 0x18), 16);
        assert_eq!(r64(&mut d, 0x20), 0x1000);
        assert_eq!(r64(&mut d, 0x30), 0x3000);
        assert_eq!(r16(&mut d, 0x1c), 1);
        let q = &d.device().active.as_ref().unwrap().queues[0];
        assert_eq!(
            (q.size(), q.desc_table(), q.used_ring()),
            (16, 0x1000, 0x3000)
        );
        assert!(d.is_running());
    }

    #[test]
    fn transport_reset_returns_to_the_initial_state() {
        let (mut d, _) = setup();
        negotiate(&mut d, VERSION_1);
        setup_queue(&mut d);
        driver_ok(&mut d);
        w8(&mut d, 0x14, 0);
        assert_eq!(d.status(), 0);
        assert_eq!(d.device().resets, 1);
        assert!(!d.device().is_activated());
        assert_eq!(r16(&mut d, 0x1c), 0, "queue disabled");
        assert_eq!(r64(&mut d, 0x20), 0);
        // The driver can set it up again.
        negotiate(&mut d, VERSION_1);
        setup_queue(&mut d);
        driver_ok(&mut d);
        assert!(d.is_running());
        assert_eq!(d.device().activations, 2);
    }

    #[test]
    fn transport_status_bits_cannot_be_cleared_without_reset() {
        let (mut d, _) = setup();
        negotiate(&mut d, VERSION_1);
        w8(&mut d, 0x14, S_ACKNOWLEDGE_BIT);
        assert_ne!(d.status() & S_FEATURES_OK, 0);
    }

    #[test]
    fn transport_notify_before_driver_ok_is_not_processed() {
        let (mut d, _) = setup();
        let processed = d.device().processed.clone();
        d.bar_write(NOTIFY_OFFSET, &0u16.to_le_bytes());
        assert_eq!(
            d.queue_evts()[0].read().unwrap(),
            1,
            "the notify reached the eventfd"
        );
        d.process_queue(0);
        assert_eq!(processed.load(Ordering::SeqCst), 0);
        negotiate(&mut d, VERSION_1);
        setup_queue(&mut d);
        driver_ok(&mut d);
        d.process_queue(0);
        assert_eq!(processed.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn transport_queue_interrupt_goes_to_its_msix_vector_and_sets_isr() {
        let (mut d, rec) = setup();
        enable_msix_vector(&mut d, 1, 0x41);
        negotiate(&mut d, VERSION_1);
        setup_queue(&mut d);
        w16(&mut d, 0x1a, 1);
        assert_eq!(r16(&mut d, 0x1a), 1);
        w16(&mut d, 0x10, 9); // no such vector
        assert_eq!(r16(&mut d, 0x10), VIRTIO_MSI_NO_VECTOR);
        driver_ok(&mut d);
        d.process_queue(0);
        assert_eq!(*rec.fired.lock().unwrap(), vec![1]);
        assert!(rec
            .configured
            .lock()
            .unwrap()
            .iter()
            .any(|(v, m)| *v == 1 && m.data == 0x41));
        assert_eq!(r8(&mut d, ISR_CFG_OFFSET), ISR_QUEUE);
        assert_eq!(r8(&mut d, ISR_CFG_OFFSET), 0, "reading the ISR clears it");
    }

    #[test]
    fn transport_state_restores_a_running_device_where_it_was() {
        let (mut d, _) = setup();
        enable_msix_vector(&mut d, 1, 0x41);
        negotiate(&mut d, VERSION_1 | DUMMY_FEATURE);
        setup_queue(&mut d);
        w16(&mut d, 0x1a, 1);
        driver_ok(&mut d);
        d.device_mut().active.as_mut().unwrap().queues[0].set_next_avail(5);
        d.device_mut().active.as_mut().unwrap().queues[0].set_next_used(4);
        let saved = d.state();
        assert!(saved.activated);

        let (mut e, rec) = setup();
        e.restore_state(&saved).unwrap();
        assert!(e.is_running());
        assert_eq!(e.state(), saved);
        let q = &e.device().active.as_ref().unwrap().queues[0];
        assert_eq!((q.next_avail(), q.next_used()), (5, 4));
        for off in (0..COMMON_CFG_SIZE).step_by(4) {
            assert_eq!(
                r32(&mut e, off),
                r32(&mut d, off),
                "common config at {off:#x}"
            );
        }
        assert!(rec
            .configured
            .lock()
            .unwrap()
            .iter()
            .any(|(v, m)| *v == 1 && m.data == 0x41));
        e.kick();
        assert!(rec.fired.lock().unwrap().contains(&1));
    }

    #[test]
    fn transport_restore_refuses_a_state_of_another_device() {
        let (d, _) = setup();
        let mut saved = d.state();
        saved.device_type = 99;
        let (mut e, _) = setup();
        assert!(e.restore_state(&saved).unwrap_err().contains("type 99"));
        let mut saved = d.state();
        saved.queues.push(saved.queues[0]);
        assert!(e.restore_state(&saved).is_err());
        let mut saved = d.state();
        saved.pci_config.truncate(10);
        assert!(e.restore_state(&saved).is_err());
    }

    #[test]
    fn transport_config_change_moves_the_generation_and_fires_the_config_vector() {
        let (mut d, rec) = setup();
        enable_msix_vector(&mut d, 0, 0x42);
        negotiate(&mut d, VERSION_1);
        w16(&mut d, 0x10, 0); // config vector 0
        setup_queue(&mut d);
        driver_ok(&mut d);
        let before = r8(&mut d, 0x15);
        d.signal_config_change().unwrap();
        assert_eq!(r8(&mut d, 0x15), before.wrapping_add(1));
        assert_eq!(*rec.fired.lock().unwrap(), vec![0]);
        assert_eq!(r8(&mut d, ISR_CFG_OFFSET), ISR_CONFIG);
    }

    #[test]
    fn transport_device_config_region_reaches_the_device() {
        let (mut d, _) = setup();
        assert_eq!(r8(&mut d, DEVICE_CFG_OFFSET + 7), 7);
    }

    #[test]
    fn transport_random_accesses_never_panic() {
        let (mut d, _) = setup();
        let mut x: u64 = 0x1234_5678_9abc_def1;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for _ in 0..20_000 {
            let r = next();
            let off = r % VIRTIO_BAR_SIZE;
            let len = [1usize, 2, 4, 8, 3][usize::try_from((r >> 20) % 5).unwrap()];
            let val = next().to_le_bytes();
            if r & (1 << 40) == 0 {
                d.bar_write(off, &val[..len]);
            } else {
                let mut buf = vec![0u8; len];
                d.bar_read(off, &mut buf);
            }
            if r & (1 << 41) != 0 {
                d.process_queue(usize::try_from((r >> 42) % 3).unwrap());
            }
            if r % 997 == 0 {
                let cfg_off = u16::try_from((r >> 8) % 300).unwrap();
                d.config_write(cfg_off, &val[..4]);
            }
        }
    }
}
