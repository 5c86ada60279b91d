//! `virtio_mmio_transport`: a sequence of guest accesses to a virtio-mmio
//! register window (every register and the device configuration, at any
//! width and offset), resets at any point, and the event loop running in
//! between.
//!
//! The device is a virtio-blk disk in memory or a virtio-net NIC on a
//! socketpair tap behind [`VirtioPciDevice::new_mmio`], on a vm-device MMIO
//! range as the VMM places it, its queues served by the real event-loop
//! subscriber ([`ember_virtio::QueueEvents`]).
//!
//! Input: one flags byte, a section of operations, then the memory image.

use std::os::unix::net::UnixDatagram;
use std::sync::{Arc, Mutex};

use ember_memory::GuestMemoryMmap;
use ember_virtio::mmio::MMIO_WINDOW;
use ember_virtio::{QueueEvents, VirtioDevice, VirtioPciDevice};
use event_manager::{EventManager, MutEventSubscriber, SubscriberOps};
use vm_device::bus::{MmioAddress, MmioRange};
use vm_device::device_manager::{IoManager, MmioManager};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::guest::{access, guest_memory, init_logging, QueueSetup};
use crate::input::Input;
use crate::transport::{fuzz_blk, fuzz_net, shared_op};

/// Where the register window is, as the VMM places the first device.
pub const BASE: u64 = 0xd000_0000;

/// The flags byte: the device is virtio-net (else virtio-blk).
pub const FLAG_NET: u8 = 1;

/// Register offsets (virtio 1.2, 4.2.2) the seeds and the driver use.
pub mod reg {
    /// DriverFeatures.
    pub const DRIVER_FEATURES: u64 = 0x020;
    /// DriverFeaturesSel.
    pub const DRIVER_FEATURES_SEL: u64 = 0x024;
    /// QueueSel.
    pub const QUEUE_SEL: u64 = 0x030;
    /// QueueNum.
    pub const QUEUE_NUM: u64 = 0x038;
    /// QueueReady.
    pub const QUEUE_READY: u64 = 0x044;
    /// QueueNotify.
    pub const QUEUE_NOTIFY: u64 = 0x050;
    /// InterruptStatus.
    pub const INTERRUPT_STATUS: u64 = 0x060;
    /// InterruptACK.
    pub const INTERRUPT_ACK: u64 = 0x064;
    /// Status.
    pub const STATUS: u64 = 0x070;
    /// QueueDescLow (High at +4; QueueDriver at +0x10, QueueDevice at +0x20).
    pub const QUEUE_DESC_LOW: u64 = 0x080;
}

/// Operation opcodes (the opcode byte modulo [`op::COUNT`]).
pub mod op {
    /// Register write: u16 offset (modulo 0x200: registers and the start
    /// of the device configuration), u8 width code, u64 value.
    pub const WRITE: u8 = 0;
    /// Register read: u16 offset, u8 width code.
    pub const READ: u8 = 1;
    /// One pass of the event loop (queue notifications, tap readable).
    pub const EVENT_LOOP: u8 = 2;
    /// The driver writes 0 to Status: reset.
    pub const RESET: u8 = 3;
    /// Write to guest memory: u32 address, u8 length (up to 16), bytes.
    pub const POKE: u8 = 4;
    /// A frame arrives on the tap (net only): u16 length, u8 seed.
    pub const FRAME: u8 = 5;
    /// Linux's virtio_mmio setup: u64 features, then a
    /// [`super::QueueSetup`] per queue, then DRIVER_OK.
    pub const DRIVER_INIT: u8 = 6;
    /// How many there are.
    pub const COUNT: u8 = 7;
}

type Subscriber = Arc<Mutex<dyn MutEventSubscriber + Send>>;

/// A virtio-mmio device on the bus, and the event loop serving it.
pub(crate) struct Rig {
    io: IoManager,
    events: EventManager<Subscriber>,
    pub(crate) mem: GuestMemoryMmap,
    pub(crate) irq: EventFd,
    queues: usize,
    peer: Option<UnixDatagram>,
    frame: Vec<u8>,
}

impl Rig {
    fn new(flags: u8, mem: GuestMemoryMmap) -> Option<Rig> {
        if flags & FLAG_NET != 0 {
            let (net, peer) = fuzz_net()?;
            let mut rig = Rig::with_device(net, mem)?;
            rig.peer = Some(peer);
            Some(rig)
        } else {
            Rig::with_device(fuzz_blk(), mem)
        }
    }

    fn with_device<D: VirtioDevice + 'static>(device: D, mem: GuestMemoryMmap) -> Option<Rig> {
        let queues = device.queue_max_sizes().len();
        let irq = EventFd::new(EFD_NONBLOCK).ok()?;
        let dev =
            VirtioPciDevice::new_mmio("fuzz", device, mem.clone(), BASE, irq.try_clone().ok()?)
                .ok()?;
        let dev = Arc::new(Mutex::new(dev));
        let mut io = IoManager::new();
        let window = MmioRange::new(MmioAddress(BASE), MMIO_WINDOW).ok()?;
        io.register_mmio(window, dev.clone()).ok()?;
        let mut events = EventManager::<Subscriber>::new().ok()?;
        let subscriber: Subscriber = Arc::new(Mutex::new(QueueEvents::new(dev).ok()?));
        events.add_subscriber(subscriber);
        Some(Rig {
            io,
            events,
            mem,
            irq,
            queues,
            peer: None,
            frame: vec![0; 0x1_0000],
        })
    }

    fn write32(&self, offset: u64, v: u32) {
        let _ = self
            .io
            .mmio_write(MmioAddress(BASE + offset), &v.to_le_bytes());
    }

    /// Linux's virtio_mmio probe and virtio core's setup with the input's
    /// features and queues.
    fn driver_init(&self, ops: &mut Input<'_>) {
        self.write32(reg::STATUS, 0);
        self.write32(reg::STATUS, 1);
        self.write32(reg::STATUS, 1 | 2);
        let features = ops.u64();
        for (select, half) in [(0u32, features & 0xffff_ffff), (1, features >> 32)] {
            self.write32(reg::DRIVER_FEATURES_SEL, select);
            self.write32(reg::DRIVER_FEATURES, u32::try_from(half).unwrap_or(0));
        }
        self.write32(reg::STATUS, 1 | 2 | 8);
        for q in 0..self.queues {
            let setup: QueueSetup = ops.read();
            self.write32(reg::QUEUE_SEL, u32::try_from(q).unwrap_or(u32::MAX));
            self.write32(reg::QUEUE_NUM, u32::from(setup.size));
            for (i, addr) in [setup.desc, setup.avail, setup.used]
                .into_iter()
                .enumerate()
            {
                let at = reg::QUEUE_DESC_LOW + 0x10 * i as u64;
                self.write32(at, u32::try_from(addr & 0xffff_ffff).unwrap_or(0));
                self.write32(at + 4, u32::try_from(addr >> 32).unwrap_or(0));
            }
            self.write32(reg::QUEUE_READY, 1);
        }
        self.write32(reg::STATUS, 1 | 2 | 8 | 4);
    }

    fn run_op(&mut self, ops: &mut Input<'_>) {
        let mut buf = [0u8; 16];
        match ops.u8() % op::COUNT {
            code @ (op::WRITE | op::READ) => {
                let offset = u64::from(ops.u16() % 0x200);
                let width = ops.u8();
                if code == op::WRITE {
                    let data = access(width, ops.u64(), &mut buf);
                    let _ = self.io.mmio_write(MmioAddress(BASE + offset), data);
                } else {
                    let data = access(width, 0, &mut buf);
                    let _ = self.io.mmio_read(MmioAddress(BASE + offset), data);
                }
            }
            op::EVENT_LOOP => {
                let _ = self.events.run_with_timeout(0);
                // The guest's interrupt handler: read the status, ack it.
                if self.irq.read().is_ok() {
                    let mut status = [0u8; 4];
                    let _ = self
                        .io
                        .mmio_read(MmioAddress(BASE + reg::INTERRUPT_STATUS), &mut status);
                    self.write32(reg::INTERRUPT_ACK, u32::from_le_bytes(status));
                }
            }
            op::RESET => self.write32(reg::STATUS, 0),
            op::POKE => {
                let code = crate::transport::op::POKE;
                shared_op(code, ops, &self.mem, self.peer.as_ref(), &mut self.frame)
            }
            op::FRAME => {
                let code = crate::transport::op::FRAME;
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

/// The `virtio_mmio_transport` target.
pub fn virtio_mmio_transport(data: &[u8]) {
    run(data);
}

/// Runs a `virtio_mmio_transport` input; the rig afterwards.
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
