//! `pci_config_space`: a sequence of configuration mechanism #1 accesses
//! (ports 0xCF8-0xCFF, any width, any port of the range and around it),
//! BAR sizing as Linux does it, and MSI-X table, PBA and message control
//! accesses.
//!
//! The bus holds the host bridge at 00:00.0, a virtio-blk function at
//! 00:01.0 (one 64-bit BAR with its MSI-X table, reached through a
//! vm-device MMIO range as in the VMM) and at 00:02.0 a plain function
//! with a 32-bit memory BAR, an I/O BAR and a prefetchable 64-bit BAR of
//! 4 GiB, and a vendor capability.
//!
//! Ember has no ECAM (PCIe memory-mapped configuration): mechanism #1 is
//! the only way to configuration space, so that is what this drives.
//!
//! Every BAR move reported to the VMM is checked: the new address is
//! aligned to the BAR's size, a 32-bit BAR stays below 4 GiB, and `old` is
//! where the BAR was. A breach panics: it is a bug in `ember_pci`.
//!
//! Input: a sequence of operations (no memory image).

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use ember_pci::{
    BarKind, BarMove, MsiMessage, MsiSink, PciBar, PciBus, PciConfigIo, PciConfigParams,
    PciConfiguration, PciDevice, PCI_CONFIG_IO_PORT, PCI_CONFIG_IO_PORT_SIZE,
};
use ember_virtio::{VirtioPciDevice, VIRTIO_BAR_SIZE};
use ember_virtio_blk::Block;
use vm_device::bus::{MmioAddress, MmioRange, PioAddress, PioRange};
use vm_device::device_manager::{IoManager, MmioManager, PioManager};

use crate::blk::CheckedDisk;
use crate::guest::{access, guest_memory, init_logging};
use crate::input::Input;
use crate::transport::REGIONS;

/// The virtio function's BAR 0.
const VIRTIO_BAR: u64 = 0x1_0000_0000;

/// The plain function's BARs: (slot, address, size, kind, prefetchable).
const PLAIN_BARS: [(u8, u64, u64, BarKind, bool); 3] = [
    (0, 0xc000_0000, 0x1000, BarKind::Mem32, false),
    (2, 0xc000, 0x40, BarKind::Io, false),
    (3, 0x2_0000_0000, 0x1_0000_0000, BarKind::Mem64, true),
];

/// Operation opcodes (the opcode byte modulo [`op::COUNT`]).
pub mod op {
    /// 0xCF8 := u32, as it is.
    pub const ADDRESS: u8 = 0;
    /// 0xCF8 := enable | u8 device (modulo 4) | u8 function | u8 register.
    pub const SELECT: u8 = 1;
    /// Read a port of 0xCF8-0xCFF: u8 port (modulo 8), u8 width code.
    pub const READ: u8 = 2;
    /// Write a port of 0xCF8-0xCFF: u8 port, u8 width code, u32 value.
    pub const WRITE: u8 = 3;
    /// Size BAR u8 (modulo 6) of device u8 (modulo 4) as Linux does: save,
    /// write all-ones, read back, restore.
    pub const BAR_SIZING: u8 = 4;
    /// MSI-X table write at u16 offset (modulo 0x100): u8 width code, u64
    /// value.
    pub const MSIX_WRITE: u8 = 5;
    /// MSI-X table or PBA read: u8 which (bit 0: PBA), u16 offset, u8
    /// width code.
    pub const MSIX_READ: u8 = 6;
    /// A port access anywhere in 0xCF0-0xD0F: u8 port, u8 width code,
    /// u8 write flag, u32 value.
    pub const RAW: u8 = 7;
    /// How many there are.
    pub const COUNT: u8 = 8;
}

/// A function with only a configuration space.
struct Plain(PciConfiguration);

impl PciDevice for Plain {
    fn config_read(&mut self, offset: u16, data: &mut [u8]) {
        self.0.read(offset, data);
    }

    fn config_write(&mut self, offset: u16, data: &[u8]) -> Option<BarMove> {
        self.0.write(offset, data)
    }
}

/// An MSI sink that drops everything.
struct NoMsi;

impl MsiSink for NoMsi {
    fn configure(&self, _vector: u16, _msg: MsiMessage) -> std::io::Result<()> {
        Ok(())
    }

    fn fire(&self, _vector: u16) -> std::io::Result<()> {
        Ok(())
    }
}

/// Where each BAR is, by (device, slot): what a BAR move must start from.
type BarMap = HashMap<(u8, u8), (u64, u64, BarKind)>;

/// Checks a reported move and records it.
fn check_move(bars: &Mutex<BarMap>, moves: &AtomicUsize, device: u8, mv: BarMove) {
    moves.fetch_add(1, Ordering::Relaxed);
    let mut bars = bars.lock().unwrap_or_else(|e| e.into_inner());
    let Some(bar) = bars.get_mut(&(device, mv.index)) else {
        panic!(
            "pci bug: device {device} moved BAR {} it does not have",
            mv.index
        );
    };
    let (addr, size, kind) = *bar;
    assert_eq!(
        mv.old, addr,
        "pci bug: move of {mv:?} does not start at {addr:#x}"
    );
    assert_eq!(mv.size, size, "pci bug: move of {mv:?} has the wrong size");
    assert_eq!(
        mv.new % size,
        0,
        "pci bug: {mv:?} is not aligned to its size"
    );
    if kind != BarKind::Mem64 {
        assert!(
            mv.new + size <= 1 << 32,
            "pci bug: 32-bit BAR moved past 4 GiB: {mv:?}"
        );
    }
    bar.0 = mv.new;
}

fn plain_device(bars: &mut BarMap) -> Option<Plain> {
    let mut config = PciConfiguration::new(&PciConfigParams {
        vendor_id: 0x1234,
        device_id: 0x5678,
        revision: 2,
        class: 0xff,
        subclass: 0,
        prog_if: 0,
        subsystem_vendor_id: 0x1234,
        subsystem_id: 1,
    });
    for (index, addr, size, kind, prefetchable) in PLAIN_BARS {
        config
            .add_bar(PciBar {
                index,
                addr,
                size,
                kind,
                prefetchable,
            })
            .ok()?;
        bars.insert((2, index), (addr, size, kind));
    }
    config.add_capability(0x09, &[0xa5; 14]).ok()?;
    Some(Plain(config))
}

/// The buses, with the BAR-move checks in the config ports' callback.
pub(crate) struct Rig {
    io: IoManager,
    /// BAR moves reported so far (the seed tests read it).
    #[cfg_attr(not(test), allow(dead_code))]
    pub(crate) moves: Arc<AtomicUsize>,
}

impl Rig {
    fn new() -> Option<Rig> {
        let mut bars = BarMap::new();
        let mem = guest_memory(&[]);
        let disk = CheckedDisk::in_memory(0x1000, true);
        let block = Block::with_backend(Box::new(disk), true, None);
        let virtio = VirtioPciDevice::new("fuzz", block, mem, VIRTIO_BAR, Arc::new(NoMsi)).ok()?;
        bars.insert((1, 0), (VIRTIO_BAR, VIRTIO_BAR_SIZE, BarKind::Mem64));
        let virtio = Arc::new(Mutex::new(virtio));
        let plain = plain_device(&mut bars)?;

        let mut bus = PciBus::new();
        bus.add_device(virtio.clone()).ok()?;
        bus.add_device(Arc::new(Mutex::new(plain))).ok()?;
        let bars = Arc::new(Mutex::new(bars));
        let moves = Arc::new(AtomicUsize::new(0));
        let counter = moves.clone();
        let config_io = PciConfigIo::new(
            Arc::new(Mutex::new(bus)),
            Box::new(move |device, mv| check_move(&bars, &counter, device, mv)),
        );
        let mut io = IoManager::new();
        let ports = PioRange::new(PioAddress(PCI_CONFIG_IO_PORT), PCI_CONFIG_IO_PORT_SIZE).ok()?;
        io.register_pio(ports, Arc::new(Mutex::new(config_io)))
            .ok()?;
        let range = MmioRange::new(MmioAddress(VIRTIO_BAR), VIRTIO_BAR_SIZE).ok()?;
        io.register_mmio(range, virtio).ok()?;
        Some(Rig { io, moves })
    }

    fn select(&mut self, address: u32) {
        let _ = self
            .io
            .pio_write(PioAddress(PCI_CONFIG_IO_PORT), &address.to_le_bytes());
    }

    fn data(port: u8) -> PioAddress {
        PioAddress(PCI_CONFIG_IO_PORT + u16::from(port % 8))
    }

    fn read32(&mut self) -> u32 {
        let mut b = [0u8; 4];
        let _ = self.io.pio_read(Self::data(4), &mut b);
        u32::from_le_bytes(b)
    }

    /// Linux's `__pci_read_base`: save, all-ones, read the size mask,
    /// restore.
    fn bar_sizing(&mut self, device: u8, bar: u8) {
        let register = 0x10 + 4 * u32::from(bar % 6);
        self.select(0x8000_0000 | u32::from(device % 4) << 11 | register);
        let saved = self.read32();
        let _ = self.io.pio_write(Self::data(4), &u32::MAX.to_le_bytes());
        let _ = self.read32();
        let _ = self.io.pio_write(Self::data(4), &saved.to_le_bytes());
    }

    fn run_op(&mut self, ops: &mut Input<'_>) {
        let mut buf = [0u8; 16];
        match ops.u8() % op::COUNT {
            op::ADDRESS => {
                let a = ops.u32();
                self.select(a);
            }
            op::SELECT => {
                let device = u32::from(ops.u8() % 4);
                let function = u32::from(ops.u8() & 7);
                let register = u32::from(ops.u8());
                self.select(0x8000_0000 | device << 11 | function << 8 | register);
            }
            op::READ => {
                let port = Self::data(ops.u8());
                let _ = self.io.pio_read(port, access(ops.u8(), 0, &mut buf));
            }
            op::WRITE => {
                let port = Self::data(ops.u8());
                let width = ops.u8();
                let data = access(width, u64::from(ops.u32()), &mut buf);
                let _ = self.io.pio_write(port, data);
            }
            op::BAR_SIZING => {
                let (bar, device) = (ops.u8(), ops.u8());
                self.bar_sizing(device, bar);
            }
            op::MSIX_WRITE => {
                let offset = u64::from(ops.u16()) % 0x100;
                let width = ops.u8();
                let data = access(width, ops.u64(), &mut buf);
                let addr = MmioAddress(VIRTIO_BAR + REGIONS[4].0 + offset);
                let _ = self.io.mmio_write(addr, data);
            }
            op::MSIX_READ => {
                let (base, span) = if ops.u8() & 1 == 0 {
                    REGIONS[4]
                } else {
                    REGIONS[5]
                };
                let offset = u64::from(ops.u16()) % span;
                let data = access(ops.u8(), 0, &mut buf);
                let _ = self
                    .io
                    .mmio_read(MmioAddress(VIRTIO_BAR + base + offset), data);
            }
            _ => {
                let port = PioAddress(PCI_CONFIG_IO_PORT - 8 + u16::from(ops.u8() % 0x20));
                let width = ops.u8();
                let write = ops.u8() & 1 != 0;
                let data = access(width, u64::from(ops.u32()), &mut buf);
                if write {
                    let _ = self.io.pio_write(port, data);
                } else {
                    let _ = self.io.pio_read(port, data);
                }
            }
        }
    }
}

/// The `pci_config_space` target.
pub fn pci_config_space(data: &[u8]) {
    run(data);
}

/// Runs a `pci_config_space` input; the buses afterwards.
pub(crate) fn run(data: &[u8]) -> Option<Rig> {
    init_logging();
    let mut ops = Input::new(data);
    let mut rig = Rig::new()?;
    while !ops.is_empty() {
        rig.run_op(&mut ops);
    }
    Some(rig)
}
