//! `virtio_pci_transport`: a sequence of guest accesses to a virtio-pci
//! function (BAR 0's common configuration, ISR, device configuration,
//! notification, MSI-X table and PBA regions, and its PCI configuration
//! space through ports 0xCF8-0xCFF), with resets at any point, and the
//! event loop running in between.
//!
//! The device is a virtio-blk disk in memory or a virtio-net NIC on a
//! socketpair tap; it sits on the buses as the VMM puts it there (a
//! vm-device MMIO range for BAR 0, the PCI bus behind config mechanism
//! #1) and its queues are served by the real event-loop subscriber
//! ([`ember_virtio::QueueEvents`]) in an `event_manager::EventManager`.
//!
//! Input: one flags byte, a section of operations, then the memory image.

use std::os::unix::net::UnixDatagram;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use ember_memory::GuestMemoryMmap;
use ember_pci::{
    BarMove, MsiMessage, MsiSink, PciBus, PciConfigIo, PCI_CONFIG_IO_PORT, PCI_CONFIG_IO_PORT_SIZE,
};
use ember_virtio::{QueueEvents, VirtioDevice, VirtioPciDevice, VIRTIO_BAR_SIZE};
use ember_virtio_blk::Block;
use ember_virtio_net::Net;
use event_manager::{EventManager, MutEventSubscriber, SubscriberOps};
use vm_device::bus::{MmioAddress, MmioRange, PioAddress, PioRange};
use vm_device::device_manager::{IoManager, MmioManager, PioManager};

use crate::blk::CheckedDisk;
use crate::guest::{access, guest_memory, init_logging, poke, QueueSetup};
use crate::input::Input;
use crate::net::SocketTap;

/// Where BAR 0 is (64-bit, naturally aligned, as the VMM places it).
pub const BAR: u64 = 0x1_0000_0000;
/// The PCI device number the function gets (the host bridge is 0).
pub const DEVICE: u32 = 1;

/// BAR 0's regions, as `ember_virtio::transport` lays them out:
/// (offset, the span an access offset is taken modulo).
pub const REGIONS: [(u64, u64); 6] = [
    (0x0000, 0x40),  // common configuration (0x38 bytes)
    (0x1000, 0x8),   // ISR
    (0x2000, 0x40),  // device configuration
    (0x3000, 0x10),  // notifications, 4 bytes per queue
    (0x4000, 0x100), // MSI-X table
    (0x6000, 0x10),  // MSI-X PBA
];

/// Common configuration offsets (virtio 1.2, 4.1.4.3).
pub mod common {
    /// driver_feature_select (le32).
    pub const DRIVER_FEATURE_SELECT: u64 = 0x08;
    /// driver_feature (le32).
    pub const DRIVER_FEATURE: u64 = 0x0c;
    /// device_status (u8).
    pub const STATUS: u64 = 0x14;
    /// queue_select (le16).
    pub const QUEUE_SELECT: u64 = 0x16;
    /// queue_size (le16).
    pub const QUEUE_SIZE: u64 = 0x18;
    /// queue_msix_vector (le16).
    pub const QUEUE_MSIX_VECTOR: u64 = 0x1a;
    /// queue_enable (le16).
    pub const QUEUE_ENABLE: u64 = 0x1c;
    /// queue_desc (le64).
    pub const QUEUE_DESC: u64 = 0x20;
    /// queue_driver, the available ring (le64).
    pub const QUEUE_AVAIL: u64 = 0x28;
    /// queue_device, the used ring (le64).
    pub const QUEUE_USED: u64 = 0x30;
}

/// The flags byte: the device is virtio-net (else virtio-blk).
pub const FLAG_NET: u8 = 1;
/// The flags byte: the MSI sink fails.
pub const FLAG_MSI_FAILS: u8 = 2;

/// Operation opcodes (the opcode byte modulo [`op::COUNT`]).
pub mod op {
    /// BAR 0 write: u8 region (modulo 7; 6 is "anywhere", past the BAR
    /// too), u16 offset, u8 width code, u64 value.
    pub const MMIO_WRITE: u8 = 0;
    /// BAR 0 read: u8 region, u16 offset, u8 width code.
    pub const MMIO_READ: u8 = 1;
    /// PCI config write through 0xCF8/0xCFC: u8 register, u8 width code,
    /// u32 value.
    pub const CONFIG_WRITE: u8 = 2;
    /// PCI config read: u8 register, u8 width code.
    pub const CONFIG_READ: u8 = 3;
    /// One pass of the event loop (queue notifications, tap readable).
    pub const EVENT_LOOP: u8 = 4;
    /// The driver writes 0 to device_status: reset.
    pub const RESET: u8 = 5;
    /// Write to guest memory: u32 address, u8 length (up to 16), bytes.
    pub const POKE: u8 = 6;
    /// A frame arrives on the tap (net only): u16 length, u8 seed.
    pub const FRAME: u8 = 7;
    /// The Linux driver's whole setup: u64 features, then a
    /// [`super::QueueSetup`] and a u16 MSI-X vector per queue, then
    /// DRIVER_OK and MSI-X enabled.
    pub const DRIVER_INIT: u8 = 8;
    /// How many there are.
    pub const COUNT: u8 = 9;
}

/// Takes MSI-X messages and interrupts (the VMM turns them into KVM routes
/// and irqfd writes); fails when told to.
#[derive(Default)]
struct Msi {
    fail: AtomicBool,
}

impl MsiSink for Msi {
    fn configure(&self, _vector: u16, _msg: MsiMessage) -> std::io::Result<()> {
        if self.fail.load(Ordering::Relaxed) {
            return Err(std::io::ErrorKind::Other.into());
        }
        Ok(())
    }

    fn fire(&self, _vector: u16) -> std::io::Result<()> {
        if self.fail.load(Ordering::Relaxed) {
            return Err(std::io::ErrorKind::Other.into());
        }
        Ok(())
    }
}

type Subscriber = Arc<Mutex<dyn MutEventSubscriber + Send>>;

/// A virtio-pci function on the buses, and the event loop serving it.
pub(crate) struct Rig {
    io: IoManager,
    events: EventManager<Subscriber>,
    pub(crate) mem: GuestMemoryMmap,
    queues: usize,
    peer: Option<UnixDatagram>,
    frame: Vec<u8>,
}

/// The fuzzed NIC: virtio-net on a socketpair tap, and the host's end.
pub(crate) fn fuzz_net() -> Option<(Net, UnixDatagram)> {
    let (dev_end, peer) = UnixDatagram::pair().ok()?;
    dev_end.set_nonblocking(true).ok()?;
    peer.set_nonblocking(true).ok()?;
    let tap = SocketTap::new(dev_end, false);
    let net = Net::with_backend(Box::new(tap), [0x52, 0x54, 0, 1, 2, 3], true);
    Some((net, peer))
}

/// The fuzzed disk: virtio-blk on 64 KiB in memory.
pub(crate) fn fuzz_blk() -> Block {
    let disk = CheckedDisk::in_memory(0x1_0000, false);
    Block::with_backend(Box::new(disk), false, Some("fuzz".into()))
}

/// The operations both transports' targets share: POKE (u32 address, u8
/// length up to 16, bytes) and FRAME (u16 length, u8 seed: a frame
/// arrives on the tap).
pub(crate) fn shared_op(
    code: u8,
    ops: &mut Input<'_>,
    mem: &GuestMemoryMmap,
    peer: Option<&UnixDatagram>,
    frame: &mut [u8],
) {
    if code == op::POKE {
        let addr = u64::from(ops.u32());
        let len = usize::from(ops.u8() % 17);
        poke(mem, addr, ops.bytes(len));
    } else {
        let len = usize::from(ops.u16());
        let seed = ops.u8();
        let frame = &mut frame[..len];
        frame.fill(seed);
        if let Some(peer) = peer {
            let _ = peer.send(frame);
        }
    }
}

impl Rig {
    fn new(flags: u8, mem: GuestMemoryMmap) -> Option<Rig> {
        let msi = Arc::new(Msi::default());
        msi.fail
            .store(flags & FLAG_MSI_FAILS != 0, Ordering::Relaxed);
        if flags & FLAG_NET != 0 {
            let (net, peer) = fuzz_net()?;
            let mut rig = Rig::with_device(net, mem, msi)?;
            rig.peer = Some(peer);
            Some(rig)
        } else {
            Rig::with_device(fuzz_blk(), mem, msi)
        }
    }

    fn with_device<D: VirtioDevice + 'static>(
        device: D,
        mem: GuestMemoryMmap,
        msi: Arc<Msi>,
    ) -> Option<Rig> {
        let queues = device.queue_max_sizes().len();
        let dev = VirtioPciDevice::new("fuzz", device, mem.clone(), BAR, msi).ok()?;
        let dev = Arc::new(Mutex::new(dev));
        let mut bus = PciBus::new();
        bus.add_device(dev.clone()).ok()?;
        let config_io = PciConfigIo::new(Arc::new(Mutex::new(bus)), Box::new(|_, _: BarMove| {}));
        let mut io = IoManager::new();
        let ports = PioRange::new(PioAddress(PCI_CONFIG_IO_PORT), PCI_CONFIG_IO_PORT_SIZE).ok()?;
        io.register_pio(ports, Arc::new(Mutex::new(config_io)))
            .ok()?;
        let bar = MmioRange::new(MmioAddress(BAR), VIRTIO_BAR_SIZE).ok()?;
        io.register_mmio(bar, dev.clone()).ok()?;
        let mut events = EventManager::<Subscriber>::new().ok()?;
        let subscriber: Subscriber = Arc::new(Mutex::new(QueueEvents::new(dev).ok()?));
        events.add_subscriber(subscriber);
        Some(Rig {
            io,
            events,
            mem,
            queues,
            peer: None,
            frame: vec![0; 0x1_0000],
        })
    }

    fn mmio_write(&self, offset: u64, data: &[u8]) {
        let _ = self.io.mmio_write(MmioAddress(BAR + offset), data);
    }

    fn config_select(&self, register: u8) {
        let address = 0x8000_0000 | DEVICE << 11 | u32::from(register & 0xfc);
        let _ = self
            .io
            .pio_write(PioAddress(PCI_CONFIG_IO_PORT), &address.to_le_bytes());
    }

    fn config_port(register: u8) -> PioAddress {
        PioAddress(PCI_CONFIG_IO_PORT + 4 + u16::from(register & 3))
    }

    fn config_read32(&self, register: u8) -> u32 {
        self.config_select(register);
        let mut b = [0u8; 4];
        let _ = self.io.pio_read(Self::config_port(0), &mut b);
        u32::from_le_bytes(b)
    }

    /// The offset of the MSI-X capability, found as a guest finds it.
    fn msix_capability(&self) -> Option<u8> {
        let mut ptr = self.config_read32(0x34).to_le_bytes()[0];
        for _ in 0..48 {
            let [id, next, ..] = self.config_read32(ptr).to_le_bytes();
            if id == ember_pci::PCI_CAP_ID_MSIX {
                return Some(ptr);
            }
            if next == 0 {
                break;
            }
            ptr = next;
        }
        None
    }

    /// The Linux virtio-pci driver's probe, with the input's features,
    /// queues and vectors: MSI-X on with every vector programmed, feature
    /// negotiation, queue setup, DRIVER_OK.
    fn driver_init(&self, ops: &mut Input<'_>) {
        if let Some(cap) = self.msix_capability() {
            // Message control is the upper half of the capability's dword.
            self.config_select(cap);
            let _ = self
                .io
                .pio_write(Self::config_port(2), &0x8000u16.to_le_bytes());
        }
        for v in 0..=self.queues as u64 {
            let entry = REGIONS[4].0 + 16 * v;
            self.mmio_write(entry, &0xfee0_0000u32.to_le_bytes());
            self.mmio_write(entry + 8, &(0x40 + v).to_le_bytes()[..4]);
            self.mmio_write(entry + 12, &0u32.to_le_bytes());
        }
        let status = |s: u8| self.mmio_write(common::STATUS, &[s]);
        status(1);
        status(1 | 2);
        let features = ops.u64().to_le_bytes();
        for (select, half) in [(0u32, &features[..4]), (1, &features[4..])] {
            self.mmio_write(common::DRIVER_FEATURE_SELECT, &select.to_le_bytes());
            self.mmio_write(common::DRIVER_FEATURE, half);
        }
        status(1 | 2 | 8);
        for q in 0..self.queues {
            let setup: QueueSetup = ops.read();
            let vector = ops.u16();
            let q = u16::try_from(q).unwrap_or(u16::MAX);
            self.mmio_write(common::QUEUE_SELECT, &q.to_le_bytes());
            self.mmio_write(common::QUEUE_SIZE, &setup.size.to_le_bytes());
            self.mmio_write(common::QUEUE_MSIX_VECTOR, &vector.to_le_bytes());
            self.mmio_write(common::QUEUE_DESC, &setup.desc.to_le_bytes());
            self.mmio_write(common::QUEUE_AVAIL, &setup.avail.to_le_bytes());
            self.mmio_write(common::QUEUE_USED, &setup.used.to_le_bytes());
            self.mmio_write(common::QUEUE_ENABLE, &1u16.to_le_bytes());
        }
        status(1 | 2 | 8 | 4);
    }

    fn run_op(&mut self, ops: &mut Input<'_>) {
        let mut buf = [0u8; 16];
        match ops.u8() % op::COUNT {
            code @ (op::MMIO_WRITE | op::MMIO_READ) => {
                let region = usize::from(ops.u8() % 7);
                let offset = u64::from(ops.u16());
                let offset = match REGIONS.get(region) {
                    Some((base, span)) => base + offset % span,
                    None => offset,
                };
                let width = ops.u8();
                if code == op::MMIO_WRITE {
                    let data = access(width, ops.u64(), &mut buf);
                    self.mmio_write(offset, data);
                } else {
                    let data = access(width, 0, &mut buf);
                    let _ = self.io.mmio_read(MmioAddress(BAR + offset), data);
                }
            }
            code @ (op::CONFIG_WRITE | op::CONFIG_READ) => {
                let register = ops.u8();
                let width = ops.u8();
                self.config_select(register);
                let port = Self::config_port(register);
                if code == op::CONFIG_WRITE {
                    let data = access(width, u64::from(ops.u32()), &mut buf);
                    let _ = self.io.pio_write(port, data);
                } else {
                    let _ = self.io.pio_read(port, access(width, 0, &mut buf));
                }
            }
            op::EVENT_LOOP => {
                let _ = self.events.run_with_timeout(0);
            }
            op::RESET => self.mmio_write(common::STATUS, &[0]),
            code @ (op::POKE | op::FRAME) => {
                shared_op(code, ops, &self.mem, self.peer.as_ref(), &mut self.frame)
            }
            _ => self.driver_init(ops),
        }
        // Whatever the device transmitted goes to the host network.
        if let Some(peer) = &self.peer {
            while peer.recv(&mut self.frame).is_ok() {}
        }
    }
}

/// The `virtio_pci_transport` target.
pub fn virtio_pci_transport(data: &[u8]) {
    run(data);
}

/// Runs a `virtio_pci_transport` input; the buses afterwards.
pub(crate) fn run(data: &[u8]) -> Option<Rig> {
    init_logging();
    let mut input = Input::new(data);
    let flags = input.u8();
    let mut ops = input.section();
    let mem = guest_memory(input.rest());
    let mut rig = Rig::new(flags, mem)?;
    while !ops.is_empty() {
        rig.run_op(&mut ops);
    }
    Some(rig)
}
