//! Legacy PC devices a microVM still needs, as vm-device port-I/O devices:
//!
//! - [`SerialDevice`]: a 16550A UART (vm-superio) for the console, with its
//!   interrupt on an eventfd (the VMM registers it as an irqfd) and a
//!   "receive FIFO drained" eventfd so console input is read only when the
//!   guest has room for it.
//! - [`I8042`]: the keyboard controller with a PS/2 keyboard: its CPU-reset
//!   command ends the VM, and the host can press Ctrl-Alt-Del.
//! - [`Cmos`]: the CMOS real-time clock, so the guest's wall clock is right.
//! - [`AcpiSleep`]: the hardware-reduced ACPI sleep control register, where
//!   an ACPI guest powers itself off.
//!
//! ```
//! use std::sync::{Arc, Mutex};
//! use ember_legacy::{Cmos, I8042, SerialDevice, CMOS_PORT_BASE, CMOS_PORT_SIZE};
//! use vm_device::bus::{PioAddress, PioRange};
//! use vm_device::device_manager::{IoManager, PioManager};
//! use vmm_sys_util::eventfd::EventFd;
//!
//! let mut io = IoManager::new();
//! let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
//! let drained = EventFd::new(libc::EFD_NONBLOCK).unwrap();
//! let serial = Arc::new(Mutex::new(SerialDevice::new(irq, drained, std::io::sink())));
//! io.register_pio(PioRange::new(PioAddress(0x3f8), 8).unwrap(), serial).unwrap();
//! let cmos = Arc::new(Mutex::new(Cmos::default()));
//! io.register_pio(PioRange::new(PioAddress(CMOS_PORT_BASE), CMOS_PORT_SIZE).unwrap(), cmos).unwrap();
//!
//! // A guest reading the CMOS status D register sees a valid clock.
//! io.pio_write(PioAddress(0x70), &[0x0d]).unwrap();
//! let mut b = [0u8];
//! io.pio_read(PioAddress(0x71), &mut b).unwrap();
//! assert_eq!(b[0], 0x80);
//! ```
#![forbid(unsafe_code)]

pub mod acpi_sleep;
pub mod cmos;
pub mod i8042;
pub mod serial;
pub mod state;

pub use acpi_sleep::{AcpiSleep, ACPI_SLEEP_PORT_SIZE};
pub use cmos::{Cmos, CMOS_PORT_BASE, CMOS_PORT_SIZE};
pub use i8042::{I8042, I8042_PORT_BASE, I8042_PORT_SIZE};
pub use serial::{SerialDevice, SERIAL_PORT_SIZE};
pub use state::{CmosState, I8042State, SerialState};

use vmm_sys_util::eventfd::EventFd;

/// The standard port of the first serial port (COM1).
pub const COM1_PORT_BASE: u16 = 0x3f8;

/// A vm-superio interrupt/reset trigger that writes an eventfd.
#[derive(Debug)]
pub struct EventFdTrigger(EventFd);

impl EventFdTrigger {
    /// Triggers by writing 1 to `evt`.
    pub fn new(evt: EventFd) -> Self {
        EventFdTrigger(evt)
    }
}

impl vm_superio::Trigger for EventFdTrigger {
    type E = std::io::Error;

    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}
