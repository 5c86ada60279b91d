//! The i8042 keyboard controller, only for its CPU-reset command (what
//! Linux's `reboot=k` uses), as a port-I/O device on ports 0x60-0x64.

use vm_device::bus::{PioAddress, PioAddressOffset};
use vm_device::MutDevicePio;
use vm_superio::I8042Device;
use vmm_sys_util::eventfd::EventFd;

use crate::EventFdTrigger;

/// First port: the data port 0x60.
pub const I8042_PORT_BASE: u16 = 0x60;
/// Ports 0x60 to 0x64 (the command/status port is at offset 4).
pub const I8042_PORT_SIZE: u16 = 5;

/// An i8042 that signals `reset` when the guest writes 0xFE to the command port.
pub struct I8042 {
    inner: I8042Device<EventFdTrigger>,
}

impl std::fmt::Debug for I8042 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("I8042").finish_non_exhaustive()
    }
}

impl I8042 {
    /// Signals `reset` on a CPU reset command.
    pub fn new(reset: EventFd) -> Self {
        I8042 {
            inner: I8042Device::new(EventFdTrigger::new(reset)),
        }
    }
}

impl MutDevicePio for I8042 {
    fn pio_read(&mut self, _base: PioAddress, offset: PioAddressOffset, data: &mut [u8]) {
        match (u8::try_from(offset), data) {
            (Ok(off), [byte]) => *byte = self.inner.read(off),
            (_, data) => data.fill(0xff),
        }
    }

    fn pio_write(&mut self, _base: PioAddress, offset: PioAddressOffset, data: &[u8]) {
        if let (Ok(off), [byte]) = (u8::try_from(offset), data) {
            if let Err(e) = self.inner.write(off, *byte) {
                log::error!("i8042: cannot signal the reset: {e:?}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: PioAddress = PioAddress(I8042_PORT_BASE);

    fn device() -> (I8042, EventFd) {
        let reset = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        (I8042::new(reset.try_clone().unwrap()), reset)
    }

    #[test]
    fn i8042_reset_command_signals_reset() {
        let (mut dev, reset) = device();
        dev.pio_write(BASE, 4, &[0xfe]);
        assert_eq!(reset.read().unwrap(), 1);
    }

    #[test]
    fn i8042_other_writes_do_not_reset() {
        let (mut dev, reset) = device();
        dev.pio_write(BASE, 4, &[0xfd]);
        dev.pio_write(BASE, 0, &[0xfe]);
        dev.pio_write(BASE, 4, &[0xfe, 0xfe]);
        assert!(reset.read().is_err(), "no reset was signalled");
    }

    #[test]
    fn i8042_status_reads_ready() {
        let (mut dev, _) = device();
        let mut b = [0xaa];
        dev.pio_read(BASE, 4, &mut b);
        // Input buffer empty: Linux's kb_wait() proceeds.
        assert_eq!(b[0] & 0x2, 0);
    }
}
