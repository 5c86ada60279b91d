//! The hardware-reduced ACPI sleep registers (ACPI 6.5, 4.8.3.7-8): a
//! control byte where the guest writes `SLP_EN | SLP_TYP << 2` to enter a
//! sleep state, and a status byte. Writing the soft-off type (`_S5`) with
//! `SLP_EN` signals an eventfd: the guest powered itself off. Other sleep
//! states are not offered (the DSDT names only `_S5`) and are ignored.

use vm_device::bus::{PioAddress, PioAddressOffset};
use vm_device::MutDevicePio;
use vmm_sys_util::eventfd::EventFd;

/// Ports the registers take: control, then status.
pub const ACPI_SLEEP_PORT_SIZE: u16 = 2;
/// The sleep type of soft-off this device acts on (the DSDT's `_S5`).
pub const SLEEP_TYPE_S5: u8 = 5;
const SLEEP_ENABLE: u8 = 1 << 5;
/// Wake status (bit 7 of the status register): set once the sleep ended,
/// which for power-off never happens.
const WAKE_STATUS: u8 = 1 << 7;

/// The sleep control and status registers.
#[derive(Debug)]
pub struct AcpiSleep {
    power_off: EventFd,
}

impl AcpiSleep {
    /// Signals `power_off` when the guest enters `_S5`.
    pub fn new(power_off: EventFd) -> Self {
        AcpiSleep { power_off }
    }
}

impl MutDevicePio for AcpiSleep {
    fn pio_read(&mut self, _base: PioAddress, offset: PioAddressOffset, data: &mut [u8]) {
        // Control reads 0; status never shows WAKE_STATUS (a powered-off
        // guest does not wake).
        let _ = (offset, WAKE_STATUS);
        data.fill(0);
    }

    fn pio_write(&mut self, _base: PioAddress, offset: PioAddressOffset, data: &[u8]) {
        let [value] = data else {
            log::debug!("acpi: ignoring {}-byte sleep register write", data.len());
            return;
        };
        if offset != 0 {
            // Status: write-1-to-clear bits, nothing to clear.
            return;
        }
        if value & SLEEP_ENABLE != 0 && (value >> 2) & 0x7 == SLEEP_TYPE_S5 {
            log::info!("the guest powered off (ACPI S5)");
            if let Err(e) = self.power_off.write(1) {
                log::error!("acpi: cannot signal the power-off: {e}");
            }
        } else if value & SLEEP_ENABLE != 0 {
            log::warn!(
                "acpi: the guest asked for sleep type {}, which is not offered",
                (value >> 2) & 0x7
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_s5_with_slp_en_powers_off() {
        let evt = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut dev = AcpiSleep::new(evt.try_clone().unwrap());
        let base = PioAddress(0x600);
        for v in [SLEEP_TYPE_S5 << 2, SLEEP_ENABLE | (3 << 2), !SLEEP_ENABLE] {
            dev.pio_write(base, 0, &[v]);
        }
        dev.pio_write(base, 0, &[SLEEP_ENABLE | (SLEEP_TYPE_S5 << 2), 0]);
        dev.pio_write(base, 1, &[SLEEP_ENABLE | (SLEEP_TYPE_S5 << 2)]);
        assert!(evt.read().is_err(), "nothing signalled yet");
        dev.pio_write(base, 0, &[SLEEP_ENABLE | (SLEEP_TYPE_S5 << 2)]);
        assert_eq!(evt.read().unwrap(), 1);
        let mut b = [0xaau8; 1];
        dev.pio_read(base, 1, &mut b);
        assert_eq!(b, [0]);
    }
}
