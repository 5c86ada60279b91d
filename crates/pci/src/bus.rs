//! The PCI bus (bus 0, single-function devices), its host bridge and the
//! configuration mechanism #1 port pair at 0xCF8-0xCFF.

use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard};

use log::debug;
use vm_device::bus::{MmioAddress, MmioAddressOffset, PioAddress, PioAddressOffset};
use vm_device::{MutDeviceMmio, MutDevicePio};

use crate::config::{BarMove, PciConfigParams, PciConfiguration};
use crate::{Error, Result};

/// First port of configuration mechanism #1 (the address register).
pub const PCI_CONFIG_IO_PORT: u16 = 0xcf8;
/// Number of ports of configuration mechanism #1 (address and data).
pub const PCI_CONFIG_IO_PORT_SIZE: u16 = 8;

/// Device numbers on one bus.
const DEVICES_PER_BUS: usize = 32;

/// Address register bit 31: configuration access enabled.
const CONFIG_ENABLE: u32 = 1 << 31;
/// Address register bits that hold something: enable, bus, device,
/// function and dword-aligned register; the rest are reserved and read 0.
const CONFIG_ADDRESS_MASK: u32 = 0x80ff_fffc;

/// A device on the PCI bus. BAR (MMIO) accesses do not come through the bus:
/// the VMM registers each BAR's range on its MMIO bus and routes it to the
/// device directly.
pub trait PciDevice: Send {
    /// Reads `data.len()` bytes of configuration space at `offset`.
    fn config_read(&mut self, offset: u16, data: &mut [u8]);
    /// Writes `data` to configuration space at `offset`; returns the BAR the
    /// write moved, if any.
    fn config_write(&mut self, offset: u16, data: &[u8]) -> Option<BarMove>;
}

/// The host bridge at 00:00.0 (class 0x0600) that makes the guest accept
/// bus 0 as a PCI bus.
#[derive(Debug)]
pub struct HostBridge {
    config: PciConfiguration,
}

impl HostBridge {
    /// Creates the host bridge: vendor 0x8086, device 0x0d57, class 0x06,
    /// subclass 0x00.
    pub fn new() -> Self {
        HostBridge {
            config: PciConfiguration::new(&PciConfigParams {
                vendor_id: 0x8086,
                device_id: 0x0d57,
                revision: 0,
                class: 0x06,
                subclass: 0x00,
                prog_if: 0,
                subsystem_vendor_id: 0,
                subsystem_id: 0,
            }),
        }
    }
}

impl Default for HostBridge {
    fn default() -> Self {
        Self::new()
    }
}

impl PciDevice for HostBridge {
    fn config_read(&mut self, offset: u16, data: &mut [u8]) {
        self.config.read(offset, data);
    }

    fn config_write(&mut self, offset: u16, data: &[u8]) -> Option<BarMove> {
        self.config.write(offset, data)
    }
}

/// Locks a device, recovering from a poisoned lock: a device's state is
/// plain registers, still usable after another thread panicked.
fn lock<T: ?Sized>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

type Slot = Option<Arc<Mutex<dyn PciDevice>>>;

/// PCI bus 0: up to 32 single-function devices, the host bridge at device 0.
pub struct PciBus {
    devices: [Slot; DEVICES_PER_BUS],
}

impl fmt::Debug for PciBus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let present: Vec<usize> = (0..DEVICES_PER_BUS)
            .filter(|&d| self.devices.get(d).is_some_and(Option::is_some))
            .collect();
        f.debug_struct("PciBus").field("devices", &present).finish()
    }
}

impl PciBus {
    /// Creates bus 0 with the host bridge at 00:00.0.
    pub fn new() -> Self {
        let mut devices: [Slot; DEVICES_PER_BUS] = std::array::from_fn(|_| None);
        devices[0] = Some(Arc::new(Mutex::new(HostBridge::new())));
        PciBus { devices }
    }

    /// Puts `dev` at the lowest free device number (1..=31) and returns it;
    /// fails when the bus is full.
    pub fn add_device(&mut self, dev: Arc<Mutex<dyn PciDevice>>) -> Result<u8> {
        let (number, slot) = self
            .devices
            .iter_mut()
            .enumerate()
            .skip(1)
            .find(|(_, s)| s.is_none())
            .ok_or(Error::BusFull)?;
        let number = u8::try_from(number).map_err(|_| Error::BusFull)?;
        *slot = Some(dev);
        Ok(number)
    }

    /// How many devices were added with [`PciBus::add_device`] (the host
    /// bridge not counted). A VMM can leave out the configuration ports of a
    /// bus with none, so the guest finds no PCI and spends no time probing.
    pub fn device_count(&self) -> usize {
        self.devices.iter().skip(1).filter(|s| s.is_some()).count()
    }

    fn device(&self, bus: u8, device: u8, function: u8) -> Option<&Arc<Mutex<dyn PciDevice>>> {
        if bus != 0 || function != 0 {
            return None;
        }
        self.devices.get(usize::from(device))?.as_ref()
    }

    /// Reads configuration space of `bus:device.function` at `offset`; an
    /// absent device or function, or a bus other than 0, reads all-ones.
    pub fn config_read(&self, bus: u8, device: u8, function: u8, offset: u16, data: &mut [u8]) {
        match self.device(bus, device, function) {
            Some(dev) => lock(dev).config_read(offset, data),
            None => data.fill(0xff),
        }
    }

    /// Writes configuration space of `bus:device.function` at `offset`
    /// (ignored for an absent device); returns the device number and the BAR
    /// the write moved, if any.
    pub fn config_write(
        &self,
        bus: u8,
        device: u8,
        function: u8,
        offset: u16,
        data: &[u8],
    ) -> Option<(u8, BarMove)> {
        let dev = self.device(bus, device, function)?;
        let mv = lock(dev).config_write(offset, data)?;
        Some((device, mv))
    }
}

impl Default for PciBus {
    fn default() -> Self {
        Self::new()
    }
}

/// Config mechanism #1 on ports 0xCF8-0xCFF as a vm-device port-I/O device
/// (register it at `PioAddress(0xCF8)`, size 8).
///
/// 0xCF8 is a 4-byte address register (bit 31 enable, bus 23:16, device
/// 15:11, function 10:8, register 7:2) that reads back what was written;
/// narrower accesses to it are ignored and read all-ones. 0xCFC-0xCFF is the
/// data window: 1, 2 or 4 bytes at the addressed register plus the port
/// offset, all-ones or ignored while the enable bit is clear.
pub struct PciConfigIo {
    bus: Arc<Mutex<PciBus>>,
    on_bar_move: Box<dyn Fn(u8, BarMove) + Send>,
    address: u32,
}

impl fmt::Debug for PciConfigIo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PciConfigIo")
            .field("address", &format_args!("{:#010x}", self.address))
            .finish_non_exhaustive()
    }
}

impl PciConfigIo {
    /// Serves configuration accesses to `bus`; `on_bar_move` is called with
    /// the device number whenever the guest moves a BAR (after the bus lock
    /// is released, so it may lock the bus or a device again).
    pub fn new(bus: Arc<Mutex<PciBus>>, on_bar_move: Box<dyn Fn(u8, BarMove) + Send>) -> Self {
        PciConfigIo {
            bus,
            on_bar_move,
            address: 0,
        }
    }

    /// Decodes the address register and a data-port access into
    /// (bus, device, function, offset), or `None` when it does not reach a
    /// register.
    fn target(&self, port: PioAddressOffset, len: usize) -> Option<(u8, u8, u8, u16)> {
        if self.address & CONFIG_ENABLE == 0 {
            return None;
        }
        let byte = port.checked_sub(4)?;
        let fits = matches!(len, 1 | 2 | 4) && usize::from(byte) + len <= 4;
        if !fits {
            return None;
        }
        let [register, devfn, bus, _] = self.address.to_le_bytes();
        let offset = u16::from(register & 0xfc) + byte;
        Some((bus, devfn >> 3, devfn & 0x7, offset))
    }
}

impl MutDevicePio for PciConfigIo {
    fn pio_read(&mut self, _base: PioAddress, offset: PioAddressOffset, data: &mut [u8]) {
        if offset == 0 && data.len() == 4 {
            data.copy_from_slice(&self.address.to_le_bytes());
            return;
        }
        match self.target(offset, data.len()) {
            Some((bus, dev, func, reg)) => lock(&self.bus).config_read(bus, dev, func, reg, data),
            None => data.fill(0xff),
        }
    }

    fn pio_write(&mut self, _base: PioAddress, offset: PioAddressOffset, data: &[u8]) {
        if offset < 4 {
            match <[u8; 4]>::try_from(data) {
                Ok(b) if offset == 0 => self.address = u32::from_le_bytes(b) & CONFIG_ADDRESS_MASK,
                _ => debug!(
                    "pci: ignoring {}-byte write to port 0xcf8+{offset}",
                    data.len()
                ),
            }
            return;
        }
        let Some((bus, dev, func, reg)) = self.target(offset, data.len()) else {
            return;
        };
        // The guard is dropped before the callback runs.
        let moved = lock(&self.bus).config_write(bus, dev, func, reg, data);
        if let Some((device, mv)) = moved {
            (self.on_bar_move)(device, mv);
        }
    }
}

/// Bytes of MMCONFIG (ECAM) space per bus: 32 devices x 8 functions x 4 KiB.
pub const ECAM_BUS_SIZE: u64 = 1 << 20;

/// The PCI Express enhanced configuration access mechanism (MMCONFIG) as a
/// vm-device MMIO device: register it over `ECAM_BUS_SIZE` bytes per bus
/// (from bus 0). Offset bits 27:20 are the bus, 19:15 the device, 14:12 the
/// function and 11:0 the register; 1-, 2- and 4-byte accesses within one
/// dword reach the function's configuration space, others read all-ones
/// and are ignored.
pub struct PciConfigMmio {
    bus: Arc<Mutex<PciBus>>,
    on_bar_move: Box<dyn Fn(u8, BarMove) + Send>,
}

impl fmt::Debug for PciConfigMmio {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PciConfigMmio").finish_non_exhaustive()
    }
}

impl PciConfigMmio {
    /// Serves MMCONFIG accesses to `bus`; `on_bar_move` as for
    /// [`PciConfigIo::new`].
    pub fn new(bus: Arc<Mutex<PciBus>>, on_bar_move: Box<dyn Fn(u8, BarMove) + Send>) -> Self {
        PciConfigMmio { bus, on_bar_move }
    }

    fn target(offset: MmioAddressOffset, len: usize) -> Option<(u8, u8, u8, u16)> {
        let reg = offset & 0xfff;
        let fits = matches!(len, 1 | 2 | 4) && (reg & 3) + len as u64 <= 4;
        if !fits {
            return None;
        }
        let bus = u8::try_from(offset >> 20).ok()?;
        let dev = u8::try_from((offset >> 15) & 0x1f).ok()?;
        let func = u8::try_from((offset >> 12) & 0x7).ok()?;
        Some((bus, dev, func, u16::try_from(reg).ok()?))
    }
}

impl MutDeviceMmio for PciConfigMmio {
    fn mmio_read(&mut self, _base: MmioAddress, offset: MmioAddressOffset, data: &mut [u8]) {
        match Self::target(offset, data.len()) {
            Some((bus, dev, func, reg)) => lock(&self.bus).config_read(bus, dev, func, reg, data),
            None => data.fill(0xff),
        }
    }

    fn mmio_write(&mut self, _base: MmioAddress, offset: MmioAddressOffset, data: &[u8]) {
        let Some((bus, dev, func, reg)) = Self::target(offset, data.len()) else {
            debug!(
                "pci: ignoring {}-byte MMCONFIG write at {offset:#x}",
                data.len()
            );
            return;
        };
        let moved = lock(&self.bus).config_write(bus, dev, func, reg, data);
        if let Some((device, mv)) = moved {
            (self.on_bar_move)(device, mv);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{BarKind, PciBar};

    struct TestDevice {
        config: PciConfiguration,
    }

    impl PciDevice for TestDevice {
        fn config_read(&mut self, offset: u16, data: &mut [u8]) {
            self.config.read(offset, data);
        }
        fn config_write(&mut self, offset: u16, data: &[u8]) -> Option<BarMove> {
            self.config.write(offset, data)
        }
    }

    fn test_device() -> Arc<Mutex<TestDevice>> {
        let mut config = PciConfiguration::new(&PciConfigParams {
            vendor_id: 0x1af4,
            device_id: 0x1042,
            revision: 1,
            class: 0x01,
            subclass: 0x00,
            prog_if: 0,
            subsystem_vendor_id: 0x1af4,
            subsystem_id: 0x40,
        });
        config
            .add_bar(PciBar {
                index: 0,
                addr: 0xc000_0000,
                size: 0x4000,
                kind: BarKind::Mem64,
                prefetchable: false,
            })
            .unwrap();
        Arc::new(Mutex::new(TestDevice { config }))
    }

    type Moves = Arc<Mutex<Vec<(u8, BarMove)>>>;

    fn setup() -> (PciConfigIo, Moves) {
        let mut bus = PciBus::new();
        assert_eq!(bus.add_device(test_device()).unwrap(), 1);
        let moves = Moves::default();
        let sink = moves.clone();
        let io = PciConfigIo::new(
            Arc::new(Mutex::new(bus)),
            Box::new(move |d, mv| sink.lock().unwrap().push((d, mv))),
        );
        (io, moves)
    }

    const BASE: PioAddress = PioAddress(PCI_CONFIG_IO_PORT);

    fn addr(dev: u32, func: u32, reg: u32) -> u32 {
        CONFIG_ENABLE | dev << 11 | func << 8 | reg
    }

    fn select(io: &mut PciConfigIo, a: u32) {
        io.pio_write(BASE, 0, &a.to_le_bytes());
    }

    fn read_at(io: &mut PciConfigIo, a: u32) -> u32 {
        select(io, a);
        let mut b = [0u8; 4];
        io.pio_read(BASE, 4, &mut b);
        u32::from_le_bytes(b)
    }

    #[test]
    fn mmconfig_reaches_each_function_and_ignores_odd_accesses() {
        let mut bus = PciBus::new();
        bus.add_device(Arc::new(Mutex::new(HostBridge::new())))
            .unwrap();
        let bus = Arc::new(Mutex::new(bus));
        let moves = Arc::new(Mutex::new(0));
        let m2 = moves.clone();
        let mut ecam = PciConfigMmio::new(bus, Box::new(move |_, _| *m2.lock().unwrap() += 1));
        let base = MmioAddress(0xe000_0000);
        let at = |dev: u64, func: u64, reg: u64| (dev << 15) | (func << 12) | reg;
        let mut id = [0u8; 4];
        ecam.mmio_read(base, at(0, 0, 0), &mut id);
        assert_eq!(u32::from_le_bytes(id), 0x0d57_8086);
        ecam.mmio_read(base, at(1, 0, 0), &mut id);
        assert_eq!(u32::from_le_bytes(id), 0x0d57_8086);
        // Absent device, absent function, other bus: all-ones.
        for off in [at(2, 0, 0), at(1, 1, 0), (1 << 20) | at(1, 0, 0)] {
            ecam.mmio_read(base, off, &mut id);
            assert_eq!(id, [0xff; 4], "offset {off:#x}");
        }
        // A word at byte 2 is the device id; a dword across two registers
        // and an 8-byte access read all-ones.
        let mut w = [0u8; 2];
        ecam.mmio_read(base, at(0, 0, 2), &mut w);
        assert_eq!(u16::from_le_bytes(w), 0x0d57);
        ecam.mmio_read(base, at(0, 0, 2), &mut id);
        assert_eq!(id, [0xff; 4]);
        let mut q = [0u8; 8];
        ecam.mmio_read(base, at(0, 0, 0), &mut q);
        assert_eq!(q, [0xff; 8]);
        // Extended space (past 256) reads 0 on a conventional function.
        ecam.mmio_read(base, at(0, 0, 0x100), &mut id);
        assert_eq!(id, [0; 4]);
        // Writes through MMCONFIG reach config space: the command register.
        ecam.mmio_write(base, at(1, 0, 4), &[0x06, 0]);
        ecam.mmio_write(base, at(1, 0, 0x101), &[1, 2, 3, 4, 5, 6, 7, 8]);
        assert_eq!(*moves.lock().unwrap(), 0);
    }

    #[test]
    fn config_io_reads_host_bridge_identity() {
        let (mut io, _) = setup();
        assert_eq!(read_at(&mut io, addr(0, 0, 0)), 0x0d57_8086);
        assert_eq!(read_at(&mut io, addr(0, 0, 8)) >> 8, 0x06_0000);
        assert_eq!(read_at(&mut io, addr(0, 0, 0x0c)) >> 16 & 0x7f, 0);
    }

    #[test]
    fn config_io_address_register_reads_back_masked() {
        let (mut io, _) = setup();
        select(&mut io, 0xffff_ffff);
        let mut b = [0u8; 4];
        io.pio_read(BASE, 0, &mut b);
        assert_eq!(u32::from_le_bytes(b), 0x80ff_fffc);
        // Narrower accesses to the address register: ignored, all-ones.
        io.pio_write(BASE, 3, &[0x01]);
        io.pio_write(BASE, 0, &[0, 0]);
        let mut w = [0u8; 2];
        io.pio_read(BASE, 0, &mut w);
        assert_eq!(w, [0xff; 2]);
        io.pio_read(BASE, 0, &mut b);
        assert_eq!(u32::from_le_bytes(b), 0x80ff_fffc);
    }

    #[test]
    fn config_io_absent_device_reads_all_ones() {
        let (mut io, _) = setup();
        assert_eq!(read_at(&mut io, addr(2, 0, 0)), 0xffff_ffff);
        assert_eq!(read_at(&mut io, addr(31, 0, 0)), 0xffff_ffff);
        assert_eq!(read_at(&mut io, addr(1, 1, 0)), 0xffff_ffff);
        assert_eq!(read_at(&mut io, addr(1, 0, 0) | 1 << 16), 0xffff_ffff);
        assert_eq!(read_at(&mut io, addr(1, 0, 0)), 0x1042_1af4);
    }

    #[test]
    fn config_io_enable_bit_clear_reads_all_ones_and_ignores_writes() {
        let (mut io, _) = setup();
        assert_eq!(
            read_at(&mut io, addr(0, 0, 0) & !CONFIG_ENABLE),
            0xffff_ffff
        );
        io.pio_write(BASE, 4, &0xc000_0000u32.to_le_bytes());
        select(&mut io, addr(0, 0, 0x3c));
        io.pio_write(BASE, 4, &[0x0b]);
        select(&mut io, addr(0, 0, 0x3c) & !CONFIG_ENABLE);
        io.pio_write(BASE, 4, &[0x0c]);
        assert_eq!(read_at(&mut io, addr(0, 0, 0x3c)) & 0xff, 0x0b);
    }

    #[test]
    fn config_io_byte_and_word_access_to_0xcfe() {
        let (mut io, _) = setup();
        select(&mut io, addr(0, 0, 0));
        let mut w = [0u8; 2];
        io.pio_read(BASE, 6, &mut w);
        assert_eq!(u16::from_le_bytes(w), 0x0d57);
        let mut b = [0u8; 1];
        io.pio_read(BASE, 6, &mut b);
        assert_eq!(b, [0x57]);
        io.pio_read(BASE, 7, &mut b);
        assert_eq!(b, [0x0d]);
        // A word at 0xCFF or a dword at 0xCFE would leave the window.
        io.pio_read(BASE, 7, &mut w);
        assert_eq!(w, [0xff; 2]);
        let mut d = [0u8; 4];
        io.pio_read(BASE, 6, &mut d);
        assert_eq!(d, [0xff; 4]);
        // Word write to 0xCFE at 0x3c hits min_gnt/max_lat (read-only); the
        // interrupt line at 0xCFC takes a byte.
        select(&mut io, addr(1, 0, 0x3c));
        io.pio_write(BASE, 6, &[0x12, 0x34]);
        io.pio_write(BASE, 4, &[0x05]);
        assert_eq!(read_at(&mut io, addr(1, 0, 0x3c)), 0x05);
    }

    #[test]
    fn config_io_bar_move_reaches_callback_and_sizing_does_not() {
        let (mut io, moves) = setup();
        select(&mut io, addr(1, 0, 0x10));
        io.pio_write(BASE, 4, &u32::MAX.to_le_bytes());
        assert_eq!(read_at(&mut io, addr(1, 0, 0x10)), 0xffff_c004);
        select(&mut io, addr(1, 0, 0x10));
        io.pio_write(BASE, 4, &0xc000_0004u32.to_le_bytes());
        assert!(moves.lock().unwrap().is_empty());
        select(&mut io, addr(1, 0, 0x10));
        io.pio_write(BASE, 4, &0xd000_0000u32.to_le_bytes());
        assert_eq!(
            moves.lock().unwrap().as_slice(),
            &[(
                1,
                BarMove {
                    index: 0,
                    old: 0xc000_0000,
                    new: 0xd000_0000,
                    size: 0x4000
                }
            )]
        );
    }

    #[test]
    fn bus_add_device_fills_numbers_then_fails() {
        let mut bus = PciBus::new();
        assert_eq!(bus.device_count(), 0, "the host bridge is not counted");
        for n in 1..32u8 {
            assert_eq!(bus.add_device(test_device()).unwrap(), n);
            assert_eq!(bus.device_count(), usize::from(n));
        }
        assert!(bus.add_device(test_device()).is_err());
        assert_eq!(bus.device_count(), 31);
        let mut b = [0u8; 2];
        bus.config_read(0, 31, 0, 0, &mut b);
        assert_eq!(u16::from_le_bytes(b), 0x1af4);
        bus.config_read(0, 32, 0, 0, &mut b);
        assert_eq!(b, [0xff; 2]);
        assert_eq!(bus.config_write(0, 32, 0, 0x10, &[0; 4]), None);
    }
}
