//! The virtio-mmio transport (virtio 1.2, section 4.2: the "modern",
//! version 2 register layout): one 4 KiB page of 32-bit registers followed
//! by the device's configuration, one interrupt line, and one notification
//! register for every queue (an ioeventfd per queue, matched on the value:
//! the queue's index).
//!
//! A device on virtio-mmio is the same [`VirtioPciDevice`] as on PCI, built
//! with [`VirtioPciDevice::new_mmio`]: the feature negotiation, the status
//! machine, the queues, activation, reset and snapshots are shared; only
//! the register file and the interrupt differ. Its unused PCI parts (config
//! space, MSI-X table) stay inert.
//!
//! | offset | register |
//! | --- | --- |
//! | 0x000 | MagicValue `virt` |
//! | 0x004 | Version (2) |
//! | 0x008, 0x00c | DeviceID, VendorID |
//! | 0x010, 0x014 | DeviceFeatures, DeviceFeaturesSel |
//! | 0x020, 0x024 | DriverFeatures, DriverFeaturesSel |
//! | 0x030, 0x034, 0x038 | QueueSel, QueueNumMax, QueueNum |
//! | 0x044 | QueueReady |
//! | 0x050 | QueueNotify |
//! | 0x060, 0x064 | InterruptStatus, InterruptACK |
//! | 0x070 | Status |
//! | 0x080..0x0a4 | QueueDesc, QueueDriver, QueueDevice (low, high) |
//! | 0x0ac..0x0bc | SHMSel, SHMLen, SHMBase (no shared memory regions) |
//! | 0x0fc | ConfigGeneration |
//! | 0x100.. | device configuration |

use std::sync::atomic::Ordering;
use std::sync::Arc;

use ember_memory::GuestMemoryMmap;
use ember_pci::{MsiMessage, MsiSink};
use virtio_queue::QueueT;
use vmm_sys_util::eventfd::EventFd;

use crate::device::VirtioDevice;
use crate::transport::{TransportError, VirtioPciDevice, S_DRIVER_OK};

/// The size of a device's register window (the Linux command line's
/// `virtio_mmio.device=4K@ADDR:IRQ`).
pub const MMIO_WINDOW: u64 = 0x1000;
/// `virt`, little-endian.
pub const MAGIC_VALUE: u32 = 0x7472_6976;
/// The modern register layout.
pub const MMIO_VERSION: u32 = 2;
/// "QEMU", the vendor id drivers see from most VMMs.
pub const VENDOR_ID: u32 = 0x554d_4551;

const MAGIC: u64 = 0x000;
const VERSION: u64 = 0x004;
const DEVICE_ID: u64 = 0x008;
const VENDOR: u64 = 0x00c;
const DEVICE_FEATURES: u64 = 0x010;
const DEVICE_FEATURES_SEL: u64 = 0x014;
const DRIVER_FEATURES: u64 = 0x020;
const DRIVER_FEATURES_SEL: u64 = 0x024;
const QUEUE_SEL: u64 = 0x030;
const QUEUE_NUM_MAX: u64 = 0x034;
const QUEUE_NUM: u64 = 0x038;
const QUEUE_READY: u64 = 0x044;
/// Where the driver writes a queue's index to notify it.
pub const QUEUE_NOTIFY: u64 = 0x050;
const INTERRUPT_STATUS: u64 = 0x060;
const INTERRUPT_ACK: u64 = 0x064;
const STATUS: u64 = 0x070;
const QUEUE_DESC_LOW: u64 = 0x080;
const QUEUE_DESC_HIGH: u64 = 0x084;
const QUEUE_DRIVER_LOW: u64 = 0x090;
const QUEUE_DRIVER_HIGH: u64 = 0x094;
const QUEUE_DEVICE_LOW: u64 = 0x0a0;
const QUEUE_DEVICE_HIGH: u64 = 0x0a4;
const SHM_SEL: u64 = 0x0ac;
const SHM_LEN_LOW: u64 = 0x0b0;
const SHM_BASE_HIGH: u64 = 0x0bc;
const CONFIG_GENERATION: u64 = 0x0fc;
/// Where the device configuration starts.
pub const CONFIG: u64 = 0x100;

/// A virtio-mmio device has no MSI-X: its table stays disabled, and this
/// sink is never fired.
struct NoMsi;

impl MsiSink for NoMsi {
    fn configure(&self, _vector: u16, _msg: MsiMessage) -> std::io::Result<()> {
        Ok(())
    }

    fn fire(&self, _vector: u16) -> std::io::Result<()> {
        Ok(())
    }
}

/// One of a queue's registers.
#[derive(Clone, Copy, Debug)]
enum QueueReg {
    Num,
    Ready,
    Desc(bool),
    Driver(bool),
    Device(bool),
}

impl<D: VirtioDevice> VirtioPciDevice<D> {
    /// Puts `device` behind a virtio-mmio register window at `base`
    /// ([`MMIO_WINDOW`] bytes) that interrupts the driver by writing `irq`
    /// (an irqfd on the device's interrupt line). The VMM registers each
    /// queue's eventfd as an ioeventfd at [`Self::notify_addr`] matching
    /// [`Self::notify_datamatch`]. `name` names it in logs.
    pub fn new_mmio(
        name: &str,
        device: D,
        mem: GuestMemoryMmap,
        base: u64,
        irq: EventFd,
    ) -> Result<Self, TransportError> {
        Self::build(
            name,
            device,
            mem,
            0,
            Arc::new(NoMsi),
            Some((base, Arc::new(irq))),
        )
    }

    /// The register window's guest address (virtio-mmio only).
    pub fn mmio_base(&self) -> Option<u64> {
        self.mmio.as_ref().map(|(base, _)| *base)
    }

    fn mmio_reg(&self, offset: u64) -> u32 {
        let half = |v: u64, sel: u32| match sel {
            0 => u32::try_from(v & 0xffff_ffff).unwrap_or(0),
            1 => u32::try_from(v >> 32).unwrap_or(0),
            _ => 0,
        };
        let queue = self.selected_queue();
        match offset {
            MAGIC => MAGIC_VALUE,
            VERSION => MMIO_VERSION,
            DEVICE_ID => self.device.device_type(),
            VENDOR => VENDOR_ID,
            DEVICE_FEATURES => half(self.device.avail_features(), self.device_feature_select),
            QUEUE_NUM_MAX => queue.map_or(0, |q| u32::from(q.max_size())),
            QUEUE_NUM => queue.map_or(0, |q| u32::from(q.size())),
            QUEUE_READY => queue.map_or(0, |q| u32::from(q.ready())),
            INTERRUPT_STATUS => u32::from(self.isr.load(Ordering::SeqCst)),
            STATUS => u32::from(self.status),
            QUEUE_DESC_LOW | QUEUE_DESC_HIGH => queue.map_or(0, |q| {
                half(q.desc_table(), u32::from(offset == QUEUE_DESC_HIGH))
            }),
            QUEUE_DRIVER_LOW | QUEUE_DRIVER_HIGH => queue.map_or(0, |q| {
                half(q.avail_ring(), u32::from(offset == QUEUE_DRIVER_HIGH))
            }),
            QUEUE_DEVICE_LOW | QUEUE_DEVICE_HIGH => queue.map_or(0, |q| {
                half(q.used_ring(), u32::from(offset == QUEUE_DEVICE_HIGH))
            }),
            // No shared memory regions: every one reads as length and base -1.
            SHM_LEN_LOW..=SHM_BASE_HIGH => u32::MAX,
            CONFIG_GENERATION => u32::from(self.config_generation),
            _ => 0,
        }
    }

    /// Reads `data.len()` bytes at `offset` in the register window.
    pub fn mmio_reg_read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= CONFIG {
            self.device.read_config(offset - CONFIG, data);
            return;
        }
        if data.len() != 4 || offset % 4 != 0 {
            self.log_misuse(&format!(
                "{}-byte read of register {offset:#x} (registers are 32-bit)",
                data.len()
            ));
            data.fill(0);
            return;
        }
        data.copy_from_slice(&self.mmio_reg(offset).to_le_bytes());
    }

    /// Writes `data` at `offset` in the register window.
    pub fn mmio_reg_write(&mut self, offset: u64, data: &[u8]) {
        if offset >= CONFIG {
            self.device.write_config(offset - CONFIG, data);
            return;
        }
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            self.log_misuse(&format!(
                "{}-byte write to register {offset:#x} (registers are 32-bit)",
                data.len()
            ));
            return;
        };
        if offset % 4 != 0 {
            self.log_misuse(&format!("unaligned write to register {offset:#x}"));
            return;
        }
        let v = u32::from_le_bytes(bytes);
        match offset {
            DEVICE_FEATURES_SEL => self.device_feature_select = v,
            DRIVER_FEATURES => self.write_driver_features(v),
            DRIVER_FEATURES_SEL => self.driver_feature_select = v,
            QUEUE_SEL => self.queue_select = u16::try_from(v).unwrap_or(u16::MAX),
            QUEUE_NUM => self.mmio_queue_write(QueueReg::Num, v),
            QUEUE_READY => self.mmio_queue_write(QueueReg::Ready, v),
            QUEUE_DESC_LOW => self.mmio_queue_write(QueueReg::Desc(false), v),
            QUEUE_DESC_HIGH => self.mmio_queue_write(QueueReg::Desc(true), v),
            QUEUE_DRIVER_LOW => self.mmio_queue_write(QueueReg::Driver(false), v),
            QUEUE_DRIVER_HIGH => self.mmio_queue_write(QueueReg::Driver(true), v),
            QUEUE_DEVICE_LOW => self.mmio_queue_write(QueueReg::Device(false), v),
            QUEUE_DEVICE_HIGH => self.mmio_queue_write(QueueReg::Device(true), v),
            QUEUE_NOTIFY => {
                // Normally an ioeventfd catches this in KVM; without one the
                // notification arrives here.
                match usize::try_from(v).ok().and_then(|q| self.queue_evts.get(q)) {
                    Some(evt) => {
                        if let Err(e) = evt.write(1) {
                            log::warn!("{}: cannot signal queue {v}: {e}", self.name);
                        }
                    }
                    None => self.log_misuse(&format!("notify of queue {v}, which does not exist")),
                }
            }
            INTERRUPT_ACK => {
                let bits = u8::try_from(v & 0xff).unwrap_or(0);
                self.isr.fetch_and(!bits, Ordering::SeqCst);
            }
            STATUS => match u8::try_from(v) {
                Ok(s) => self.write_status(s),
                Err(_) => self.log_misuse(&format!("status {v:#x} has bits above 8")),
            },
            SHM_SEL => {}
            _ => self.log_misuse(&format!(
                "write to read-only or unknown register {offset:#x}"
            )),
        }
    }

    /// The queue registers change only before DRIVER_OK (as on PCI).
    fn mmio_queue_write(&mut self, reg: QueueReg, v: u32) {
        if self.status & S_DRIVER_OK != 0 {
            self.log_misuse("queue configuration changed after DRIVER_OK, refused");
            return;
        }
        let i = usize::from(self.queue_select);
        let Some(q) = self.queues.get_mut(i) else {
            self.log_misuse(&format!("queue {i} does not exist"));
            return;
        };
        let part = |high: bool| {
            if high {
                (None, Some(v))
            } else {
                (Some(v), None)
            }
        };
        let mut misuse = None;
        match reg {
            QueueReg::Num => {
                let size = u16::try_from(v).unwrap_or(0);
                if let Err(e) = q.try_set_size(size) {
                    misuse = Some(format!("invalid queue size {v}: {e:?}"));
                }
            }
            QueueReg::Ready => q.set_ready(v == 1),
            QueueReg::Desc(high) => {
                let (lo, hi) = part(high);
                q.set_desc_table_address(lo, hi);
            }
            QueueReg::Driver(high) => {
                let (lo, hi) = part(high);
                q.set_avail_ring_address(lo, hi);
            }
            QueueReg::Device(high) => {
                let (lo, hi) = part(high);
                q.set_used_ring_address(lo, hi);
            }
        }
        if let Some(m) = misuse {
            self.log_misuse(&m);
        }
    }
}

#[cfg(test)]
mod tests;
