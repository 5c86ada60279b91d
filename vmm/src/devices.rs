//! The legacy devices on the port-I/O bus: COM1 on IRQ 4, the i8042 (keyboard on IRQ 1), the CMOS clock,
//! the ACPI sleep registers (power-off), and the ACPI power button's interrupt (IOAPIC pin 23).

use std::io::Write;
use std::sync::{Arc, Mutex};

use ember_legacy::{
    AcpiSleep, Cmos, SerialDevice, ACPI_SLEEP_PORT_SIZE, CMOS_PORT_BASE, CMOS_PORT_SIZE,
    COM1_PORT_BASE, I8042, I8042_PORT_BASE, I8042_PORT_SIZE, SERIAL_PORT_SIZE,
};
use ember_memory::layout;
use kvm_ioctls::VmFd;
use vm_device::bus::{PioAddress, PioRange};
use vm_device::device_manager::{IoManager, PioManager};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::Error;

/// Where the console's output goes.
pub type ConsoleOut = Box<dyn Write + Send>;
/// The console UART.
pub type Serial = SerialDevice<ConsoleOut>;

/// The legacy devices and the events they raise towards the event loop.
pub struct LegacyDevices {
    /// The console UART.
    pub serial: Arc<Mutex<Serial>>,
    /// Signalled when the guest drained the UART's receive FIFO.
    pub serial_input_drained: EventFd,
    /// Signalled when the guest resets through the i8042.
    pub reset: EventFd,
    /// Signalled when the guest powers off through ACPI.
    pub power_off: EventFd,
    /// Raises the ACPI power button's GSI (the DSDT's GED0 notifies the
    /// button when it fires).
    pub power_button: EventFd,
    /// The keyboard controller, for the host's Ctrl-Alt-Del.
    pub i8042: Arc<Mutex<I8042>>,
    /// The CMOS clock.
    pub cmos: Arc<Mutex<Cmos>>,
}

/// The legacy devices' saved states, for a restore.
#[derive(Clone, Copy, Debug)]
pub struct LegacyStates<'a> {
    /// The UART.
    pub serial: &'a ember_legacy::SerialState,
    /// The keyboard controller.
    pub i8042: &'a ember_legacy::I8042State,
    /// The CMOS clock.
    pub cmos: &'a ember_legacy::CmosState,
}

impl std::fmt::Debug for LegacyDevices {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LegacyDevices").finish_non_exhaustive()
    }
}

fn eventfd(what: &'static str) -> Result<EventFd, Error> {
    EventFd::new(EFD_NONBLOCK).map_err(|e| Error::EventFd(what, e))
}

fn pio_range(base: u16, size: u16) -> Result<PioRange, Error> {
    PioRange::new(PioAddress(base), size).map_err(|e| Error::Bus(format!("{e:?}")))
}

impl LegacyDevices {
    /// Creates the devices, registers them on `io`, and wires the UART's
    /// interrupt to IOAPIC pin 4 through an irqfd.
    pub fn create(
        vm: &VmFd,
        io: &mut IoManager,
        console: ConsoleOut,
        restore: Option<LegacyStates<'_>>,
    ) -> Result<Self, Error> {
        let state_err = |what: String| Error::Restore(what);
        let serial_irq = eventfd("serial interrupt")?;
        vm.register_irqfd(&serial_irq, layout::SERIAL_IRQ)
            .map_err(|e| Error::Kvm("KVM_IRQFD", e))?;
        let serial_input_drained = eventfd("serial input")?;
        let drained = serial_input_drained
            .try_clone()
            .map_err(|e| Error::EventFd("serial input", e))?;
        let serial = match restore {
            Some(r) => SerialDevice::from_state(serial_irq, drained, console, r.serial)
                .map_err(state_err)?,
            None => SerialDevice::new(serial_irq, drained, console),
        };
        let serial = Arc::new(Mutex::new(serial));
        io.register_pio(pio_range(COM1_PORT_BASE, SERIAL_PORT_SIZE)?, serial.clone())
            .map_err(|e| Error::Bus(format!("COM1: {e:?}")))?;

        let reset = eventfd("i8042 reset")?;
        let kbd_irq = eventfd("keyboard interrupt")?;
        vm.register_irqfd(&kbd_irq, layout::KEYBOARD_IRQ)
            .map_err(|e| Error::Kvm("KVM_IRQFD", e))?;
        let i8042 = Arc::new(Mutex::new(I8042::new(
            reset
                .try_clone()
                .map_err(|e| Error::EventFd("i8042 reset", e))?,
            kbd_irq,
        )));
        let mut cmos = Cmos::default();
        if let Some(r) = restore {
            i8042
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .restore_state(r.i8042)
                .map_err(state_err)?;
            cmos.restore_state(r.cmos).map_err(state_err)?;
        }
        let cmos = Arc::new(Mutex::new(cmos));
        io.register_pio(pio_range(I8042_PORT_BASE, I8042_PORT_SIZE)?, i8042.clone())
            .map_err(|e| Error::Bus(format!("i8042: {e:?}")))?;

        io.register_pio(pio_range(CMOS_PORT_BASE, CMOS_PORT_SIZE)?, cmos.clone())
            .map_err(|e| Error::Bus(format!("CMOS: {e:?}")))?;

        let power_off = eventfd("ACPI power-off")?;
        let sleep = AcpiSleep::new(
            power_off
                .try_clone()
                .map_err(|e| Error::EventFd("ACPI power-off", e))?,
        );
        io.register_pio(
            pio_range(layout::ACPI_SLEEP_PORT, ACPI_SLEEP_PORT_SIZE)?,
            Arc::new(Mutex::new(sleep)),
        )
        .map_err(|e| Error::Bus(format!("ACPI sleep registers: {e:?}")))?;
        let power_button = eventfd("ACPI power button")?;
        vm.register_irqfd(&power_button, layout::POWER_BUTTON_IRQ)
            .map_err(|e| Error::Kvm("KVM_IRQFD", e))?;

        Ok(LegacyDevices {
            serial,
            serial_input_drained,
            reset,
            power_off,
            power_button,
            i8042,
            cmos,
        })
    }
}
