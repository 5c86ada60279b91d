//! A PCI bus for microVMs that a guest discovers by itself through
//! configuration mechanism #1, reusable by any VMM:
//!
//! - [`PciConfiguration`]: a type-0 configuration space with read-only,
//!   writable and write-1-to-clear bits, BARs with the sizing protocol and
//!   move reports ([`BarMove`]), and a capability list.
//! - [`MsixConfig`]: the MSI-X table, pending bits and message control,
//!   delivering through an [`MsiSink`] (KVM routes and irqfds in a VMM, a
//!   recorder in tests).
//! - [`PciBus`] with its [`HostBridge`] at 00:00.0, and [`PciConfigIo`], the
//!   0xCF8-0xCFF ports as a vm-device port-I/O device, and
//!   [`PciConfigMmio`], the same configuration space through MMCONFIG
//!   (ECAM) as a vm-device MMIO device.
//!
//! Everything here is driven by the guest: odd, unaligned or out-of-range
//! accesses are ignored or read all-ones, never panic.
//!
//! ```
//! use std::sync::{Arc, Mutex};
//! use ember_pci::{
//!     BarMove, PciBus, PciConfigIo, PciConfigParams, PciConfiguration, PciDevice,
//!     PCI_CONFIG_IO_PORT, PCI_CONFIG_IO_PORT_SIZE,
//! };
//! use vm_device::bus::{PioAddress, PioRange};
//! use vm_device::device_manager::{IoManager, PioManager};
//!
//! struct MyDevice(PciConfiguration);
//!
//! impl PciDevice for MyDevice {
//!     fn config_read(&mut self, offset: u16, data: &mut [u8]) {
//!         self.0.read(offset, data)
//!     }
//!     fn config_write(&mut self, offset: u16, data: &[u8]) -> Option<BarMove> {
//!         self.0.write(offset, data)
//!     }
//! }
//!
//! let config = PciConfiguration::new(&PciConfigParams {
//!     vendor_id: 0x1af4,
//!     device_id: 0x1042,
//!     revision: 1,
//!     class: 0x01,
//!     subclass: 0x00,
//!     prog_if: 0,
//!     subsystem_vendor_id: 0x1af4,
//!     subsystem_id: 0x40,
//! });
//! let mut bus = PciBus::new();
//! let dev = bus.add_device(Arc::new(Mutex::new(MyDevice(config)))).unwrap();
//! assert_eq!(dev, 1);
//!
//! let bus = Arc::new(Mutex::new(bus));
//! let config_io = PciConfigIo::new(bus, Box::new(|dev, mv| println!("{dev}: {mv:?}")));
//! let mut io = IoManager::new();
//! let range = PioRange::new(PioAddress(PCI_CONFIG_IO_PORT), PCI_CONFIG_IO_PORT_SIZE).unwrap();
//! io.register_pio(range, Arc::new(Mutex::new(config_io))).unwrap();
//!
//! // The guest selects 00:01.0 register 0 and reads its vendor ID.
//! let address: u32 = 0x8000_0000 | u32::from(dev) << 11;
//! io.pio_write(PioAddress(0xcf8), &address.to_le_bytes()).unwrap();
//! let mut vendor = [0u8; 2];
//! io.pio_read(PioAddress(0xcfc), &mut vendor).unwrap();
//! assert_eq!(u16::from_le_bytes(vendor), 0x1af4);
//! ```
#![forbid(unsafe_code)]

pub mod bus;
pub mod config;
pub mod msix;

pub use bus::{
    HostBridge, PciBus, PciConfigIo, PciConfigMmio, PciDevice, ECAM_BUS_SIZE, PCI_CONFIG_IO_PORT,
    PCI_CONFIG_IO_PORT_SIZE,
};
pub use config::{
    BarKind, BarMove, PciBar, PciConfigParams, PciConfiguration, PCI_CONFIG_SPACE_SIZE,
};
pub use msix::{
    MsiMessage, MsiSink, MsixConfig, MsixState, MSIX_TABLE_ENTRY_SIZE, PCI_CAP_ID_MSIX,
};

/// Errors from building a PCI device's configuration or the bus.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    /// A saved configuration space does not fit this device.
    #[error("PCI config space state: {0}")]
    State(String),
    /// The BAR slot is out of range.
    #[error("BAR {index}: slot out of range (6 slots, a 64-bit BAR takes two)")]
    BarIndex {
        /// Requested slot.
        index: u8,
    },
    /// The BAR slot (or the second slot of a 64-bit BAR) is taken.
    #[error("BAR {index}: slot already in use")]
    BarSlotInUse {
        /// Requested slot.
        index: u8,
    },
    /// The BAR size is not a power of two in the allowed range.
    #[error("BAR {index}: size {size:#x} is not a power of two of at least 16 (memory) or 4 (I/O) bytes within the address space")]
    BarSize {
        /// Requested slot.
        index: u8,
        /// Requested size.
        size: u64,
    },
    /// The BAR address is not aligned to its size.
    #[error("BAR {index}: address {addr:#x} is not aligned to its size {size:#x}")]
    BarAlignment {
        /// Requested slot.
        index: u8,
        /// Requested address.
        addr: u64,
        /// Requested size.
        size: u64,
    },
    /// The BAR region does not fit the BAR's address space.
    #[error("BAR {index}: region {addr:#x}+{size:#x} does not fit the BAR's address space")]
    BarRange {
        /// Requested slot.
        index: u8,
        /// Requested address.
        addr: u64,
        /// Requested size.
        size: u64,
    },
    /// An I/O BAR was marked prefetchable.
    #[error("BAR {index}: an I/O BAR cannot be prefetchable")]
    BarPrefetchableIo {
        /// Requested slot.
        index: u8,
    },
    /// The capability does not fit in the configuration space.
    #[error("capability {cap_id:#04x} with a {len}-byte body does not fit in configuration space")]
    CapabilitySpaceFull {
        /// Capability ID.
        cap_id: u8,
        /// Length of the body.
        len: usize,
    },
    /// All 31 device numbers of the bus are taken.
    #[error("PCI bus 0 is full: no free device number")]
    BusFull,
}

/// Result of this crate's fallible operations.
pub type Result<T> = std::result::Result<T, Error>;

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use vm_device::bus::PioAddress;
    use vm_device::MutDevicePio;

    use super::*;
    use crate::msix::tests::Recorder;

    struct Dev(PciConfiguration);

    impl PciDevice for Dev {
        fn config_read(&mut self, offset: u16, data: &mut [u8]) {
            self.0.read(offset, data);
        }
        fn config_write(&mut self, offset: u16, data: &[u8]) -> Option<BarMove> {
            self.0.write(offset, data)
        }
    }

    /// Deterministic xorshift64 generator.
    struct Rng(u64);

    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
    }

    fn device() -> Dev {
        let mut c = PciConfiguration::new(&PciConfigParams {
            vendor_id: 0x1af4,
            device_id: 0x1041,
            revision: 1,
            class: 0x02,
            subclass: 0,
            prog_if: 0,
            subsystem_vendor_id: 0x1af4,
            subsystem_id: 1,
        });
        let bars = [
            (0, 0xc000_0000, 0x1000, BarKind::Mem32),
            (1, 0x2_0000_0000, 0x4000, BarKind::Mem64),
            (3, 0xc000, 0x40, BarKind::Io),
            (4, 0, 0x1_0000_0000, BarKind::Mem64),
        ];
        for (index, addr, size, kind) in bars {
            c.add_bar(PciBar {
                index,
                addr,
                size,
                kind,
                prefetchable: false,
            })
            .unwrap();
        }
        let msix = c.add_capability(PCI_CAP_ID_MSIX, &[0; 10]).unwrap();
        c.set_writable(msix + 2, &[0x00, 0xc0]);
        c.add_capability(0x09, &[0x55; 20]).unwrap();
        Dev(c)
    }

    #[test]
    fn random_accesses_through_config_io_and_msix_never_panic() {
        let mut bus = PciBus::new();
        bus.add_device(Arc::new(Mutex::new(device()))).unwrap();
        let moves = Arc::new(Mutex::new(0usize));
        let counter = moves.clone();
        let mut io = PciConfigIo::new(
            Arc::new(Mutex::new(bus)),
            Box::new(move |_, _| *counter.lock().unwrap() += 1),
        );
        let rec = Arc::new(Recorder::default());
        let mut msix = MsixConfig::new(33, rec.clone());
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
        let base = PioAddress(PCI_CONFIG_IO_PORT);
        let mut buf = [0u8; 9];
        for _ in 0..10_000 {
            let len = usize::try_from(rng.below(10)).unwrap();
            let value = rng.next().to_le_bytes();
            buf[..8].copy_from_slice(&value);
            let data = &mut buf[..len];
            match rng.below(8) {
                0 => {
                    // Mostly well-formed addresses, sometimes garbage.
                    let a = if rng.below(4) == 0 {
                        u32::from_le_bytes([value[0], value[1], value[2], value[3]])
                    } else {
                        let devfn = u32::try_from(rng.below(3) << 3).unwrap();
                        let reg = u32::try_from(rng.below(256)).unwrap();
                        0x8000_0000 | devfn << 8 | reg
                    };
                    io.pio_write(base, 0, &a.to_le_bytes());
                }
                1 => io.pio_read(base, u16::try_from(rng.below(10)).unwrap(), data),
                2 | 3 => io.pio_write(base, u16::try_from(rng.below(10)).unwrap(), data),
                4 => msix.read_table(rng.below(33 * 16 + 16), data),
                5 => msix.write_table(rng.below(33 * 16 + 16), data),
                6 => {
                    if rng.below(2) == 0 {
                        msix.read_pba(rng.below(24), data);
                    } else {
                        msix.write_pba(rng.below(24), data);
                    }
                }
                _ => match rng.below(4) {
                    0 => msix.set_message_control(u16::from_le_bytes([value[0], value[1]])),
                    1 => msix.reset(),
                    _ => msix.trigger(u16::try_from(rng.below(40)).unwrap()),
                },
            }
        }
        // Something happened on both sides.
        assert!(!rec.take().is_empty());
        assert!(*moves.lock().unwrap() > 0);
    }

    #[test]
    fn error_messages_name_what_failed() {
        let e = Error::BarAlignment {
            index: 2,
            addr: 0x1800,
            size: 0x1000,
        };
        assert_eq!(
            e.to_string(),
            "BAR 2: address 0x1800 is not aligned to its size 0x1000"
        );
    }
}
