//! A 16550A UART (vm-superio's `Serial`) as a port-I/O device.

use std::io::Write;

use vm_device::bus::{PioAddress, PioAddressOffset};
use vm_device::MutDevicePio;
use vm_superio::serial::SerialEvents;
use vm_superio::Serial;
use vmm_sys_util::eventfd::EventFd;

use crate::EventFdTrigger;

/// The UART's eight registers.
pub const SERIAL_PORT_SIZE: u16 = 8;

/// Tells the owner of the console input when the guest has drained the
/// receive FIFO, so reading the input can resume (no byte is read from the
/// host side that the guest has no room for).
#[derive(Debug)]
pub struct InputDrained {
    evt: EventFd,
}

impl InputDrained {
    /// Signals through `evt`.
    pub fn new(evt: EventFd) -> Self {
        InputDrained { evt }
    }
}

impl SerialEvents for InputDrained {
    fn buffer_read(&self) {}
    fn out_byte(&self) {}
    fn tx_lost_byte(&self) {
        log::debug!("serial: a byte of console output was lost");
    }
    fn in_buffer_empty(&self) {
        if let Err(e) = self.evt.write(1) {
            log::warn!("serial: cannot signal that console input was drained: {e}");
        }
    }
}

/// A serial port whose transmitted bytes go to `W` and whose interrupt is
/// an eventfd (registered by the VMM as an irqfd).
pub struct SerialDevice<W: Write + Send> {
    serial: Serial<EventFdTrigger, InputDrained, W>,
}

impl<W: Write + Send> std::fmt::Debug for SerialDevice<W> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SerialDevice").finish_non_exhaustive()
    }
}

impl<W: Write + Send> SerialDevice<W> {
    /// A UART raising `interrupt`, writing to `out`, signalling `drained`
    /// when its receive FIFO empties.
    pub fn new(interrupt: EventFd, drained: EventFd, out: W) -> Self {
        SerialDevice {
            serial: Serial::with_events(
                EventFdTrigger::new(interrupt),
                InputDrained::new(drained),
                out,
            ),
        }
    }

    /// Like [`new`](Self::new), with the registers and receive FIFO of
    /// `state`.
    pub fn from_state(
        interrupt: EventFd,
        drained: EventFd,
        out: W,
        state: &crate::SerialState,
    ) -> Result<Self, String> {
        let serial = Serial::from_state(
            &state.into(),
            EventFdTrigger::new(interrupt),
            InputDrained::new(drained),
            out,
        )
        .map_err(|e| format!("serial: {e:?}"))?;
        Ok(SerialDevice { serial })
    }

    /// The registers and receive FIFO.
    pub fn state(&self) -> crate::SerialState {
        self.serial.state().into()
    }

    /// Room left in the receive FIFO.
    pub fn input_capacity(&self) -> usize {
        self.serial.fifo_capacity()
    }

    /// Queues console input for the guest; returns how many bytes were taken
    /// (at most [`Self::input_capacity`]).
    pub fn enqueue_input(&mut self, bytes: &[u8]) -> usize {
        if bytes.is_empty() || self.serial.fifo_capacity() == 0 {
            return 0;
        }
        match self.serial.enqueue_raw_bytes(bytes) {
            Ok(n) => n,
            Err(e) => {
                log::warn!("serial: cannot queue console input: {e:?}");
                0
            }
        }
    }
}

impl<W: Write + Send> MutDevicePio for SerialDevice<W> {
    fn pio_read(&mut self, _base: PioAddress, offset: PioAddressOffset, data: &mut [u8]) {
        // The UART has byte-wide registers: wider reads see all-ones.
        match (u8::try_from(offset), data) {
            (Ok(off), [byte]) if offset < SERIAL_PORT_SIZE => *byte = self.serial.read(off),
            (_, data) => data.fill(0xff),
        }
    }

    fn pio_write(&mut self, _base: PioAddress, offset: PioAddressOffset, data: &[u8]) {
        if let (Ok(off), [byte]) = (u8::try_from(offset), data) {
            if offset < SERIAL_PORT_SIZE {
                if let Err(e) = self.serial.write(off, *byte) {
                    log::debug!("serial: write to register {off}: {e:?}");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<u8>>>);
    impl Write for Sink {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    const BASE: PioAddress = PioAddress(0x3f8);
    const IER: u16 = 1;
    const LSR: u16 = 5;

    fn device() -> (SerialDevice<Sink>, EventFd, EventFd, Sink) {
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let drained = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let sink = Sink::default();
        let dev = SerialDevice::new(
            irq.try_clone().unwrap(),
            drained.try_clone().unwrap(),
            sink.clone(),
        );
        (dev, irq, drained, sink)
    }

    fn read(dev: &mut SerialDevice<Sink>, off: u16) -> u8 {
        let mut b = [0u8];
        dev.pio_read(BASE, off, &mut b);
        b[0]
    }

    #[test]
    fn serial_state_round_trips_registers_and_input() {
        let (mut a, _, _, _) = device();
        a.pio_write(BASE, IER, &[0x01]);
        a.pio_write(BASE, 7, &[0x5a]);
        assert_eq!(a.enqueue_input(b"abc"), 3);
        let saved = a.state();
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let drained = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let mut b = SerialDevice::from_state(irq, drained, Sink::default(), &saved).unwrap();
        assert_eq!(b.state(), saved);
        assert_eq!(read(&mut b, 7), 0x5a);
        assert_eq!(read(&mut b, 0), b'a');
    }

    #[test]
    fn serial_from_state_refuses_an_oversized_fifo() {
        let (a, _, _, _) = device();
        let mut saved = a.state();
        saved.in_buffer = vec![0; 10_000];
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let drained = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        assert!(SerialDevice::from_state(irq, drained, Sink::default(), &saved).is_err());
    }

    #[test]
    fn serial_transmitted_bytes_reach_the_writer() {
        let (mut dev, _, _, sink) = device();
        for b in b"hi\n" {
            dev.pio_write(BASE, 0, &[*b]);
        }
        assert_eq!(&*sink.0.lock().unwrap(), b"hi\n");
    }

    #[test]
    fn serial_input_is_read_back_and_raises_an_interrupt() {
        let (mut dev, irq, drained, _) = device();
        // Enable the received-data interrupt.
        dev.pio_write(BASE, IER, &[0x1]);
        assert_eq!(dev.enqueue_input(b"ab"), 2);
        assert_eq!(irq.read().unwrap(), 1);
        assert_eq!(read(&mut dev, LSR) & 1, 1, "data ready");
        assert_eq!(read(&mut dev, 0), b'a');
        assert_eq!(read(&mut dev, 0), b'b');
        assert_eq!(read(&mut dev, LSR) & 1, 0);
        assert_eq!(drained.read().unwrap(), 1, "owner told the FIFO is empty");
    }

    #[test]
    fn serial_input_beyond_the_fifo_is_not_taken() {
        let (mut dev, _, _, _) = device();
        let cap = dev.input_capacity();
        let big = vec![b'x'; cap + 10];
        assert_eq!(dev.enqueue_input(&big), cap);
        assert_eq!(dev.input_capacity(), 0);
        assert_eq!(dev.enqueue_input(b"y"), 0);
    }

    #[test]
    fn serial_wide_or_out_of_range_accesses_are_ignored() {
        let (mut dev, _, _, sink) = device();
        let mut wide = [0u8; 4];
        dev.pio_read(BASE, 0, &mut wide);
        assert_eq!(wide, [0xff; 4]);
        dev.pio_write(BASE, 0, b"ab");
        dev.pio_write(BASE, 9, b"c");
        let mut b = [0u8];
        dev.pio_read(BASE, 200, &mut b);
        assert_eq!(b, [0xff]);
        assert!(sink.0.lock().unwrap().is_empty());
    }
}
