//! `legacy_ports`: a sequence of port accesses to the serial port (COM1,
//! 0x3F8), the i8042 (0x60-0x64) and the CMOS clock (0x70-0x71), registered
//! on a vm-device I/O bus as the VMM registers them, with console input
//! arriving in between and the host clock at any time.
//!
//! Input: a u64 host time (seconds since the epoch), then a sequence of
//! operations.

use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use ember_legacy::{
    Cmos, SerialDevice, CMOS_PORT_BASE, CMOS_PORT_SIZE, COM1_PORT_BASE, I8042, I8042_PORT_BASE,
    I8042_PORT_SIZE, SERIAL_PORT_SIZE,
};
use vm_device::bus::{PioAddress, PioRange};
use vm_device::device_manager::{IoManager, PioManager};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::guest::{access, init_logging};
use crate::input::Input;

/// The devices: (base port, number of ports).
pub const DEVICES: [(u16, u16); 3] = [
    (COM1_PORT_BASE, SERIAL_PORT_SIZE),
    (I8042_PORT_BASE, I8042_PORT_SIZE),
    (CMOS_PORT_BASE, CMOS_PORT_SIZE),
];

/// Operation opcodes (the opcode byte modulo [`op::COUNT`]).
pub mod op {
    /// Write: u8 device (modulo 3), u8 port offset (modulo its ports + 2),
    /// u8 width code, u8 value (repeated to the width).
    pub const WRITE: u8 = 0;
    /// Read: u8 device, u8 port offset, u8 width code.
    pub const READ: u8 = 1;
    /// Console input for the serial port: u8 length, bytes.
    pub const INPUT: u8 = 2;
    /// The VMM reads the serial interrupt, input-drained and reset
    /// eventfds.
    pub const EVENTS: u8 = 3;
    /// The host clock jumps: u64 seconds.
    pub const CLOCK: u8 = 4;
    /// Any port: u16 port, u8 width code, u8 write flag, u8 value.
    pub const RAW: u8 = 5;
    /// How many there are.
    pub const COUNT: u8 = 6;
}

/// The host time the CMOS clock reads.
static NOW: AtomicU64 = AtomicU64::new(0);

fn now() -> u64 {
    NOW.load(Ordering::Relaxed)
}

/// The console: counts what the guest printed.
#[derive(Clone, Default)]
struct Console(Arc<AtomicU64>);

impl Write for Console {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.fetch_add(buf.len() as u64, Ordering::Relaxed);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

struct Rig {
    io: IoManager,
    serial: Arc<Mutex<SerialDevice<Console>>>,
    events: [EventFd; 3],
}

impl Rig {
    fn new() -> Option<Rig> {
        let evt = || EventFd::new(EFD_NONBLOCK).ok();
        let (irq, drained, reset, kbd) = (evt()?, evt()?, evt()?, evt()?);
        let serial = SerialDevice::new(
            irq.try_clone().ok()?,
            drained.try_clone().ok()?,
            Console::default(),
        );
        let serial = Arc::new(Mutex::new(serial));
        let mut io = IoManager::new();
        let range = |(base, size): (u16, u16)| PioRange::new(PioAddress(base), size).ok();
        io.register_pio(range(DEVICES[0])?, serial.clone()).ok()?;
        let i8042 = I8042::new(reset.try_clone().ok()?, kbd);
        io.register_pio(range(DEVICES[1])?, Arc::new(Mutex::new(i8042)))
            .ok()?;
        io.register_pio(range(DEVICES[2])?, Arc::new(Mutex::new(Cmos::new(now))))
            .ok()?;
        Some(Rig {
            io,
            serial,
            events: [irq, drained, reset],
        })
    }

    fn port(ops: &mut Input<'_>) -> PioAddress {
        let (base, size) = DEVICES[usize::from(ops.u8() % 3)];
        PioAddress(base + u16::from(ops.u8()) % (size + 2))
    }

    fn run_op(&mut self, ops: &mut Input<'_>) {
        let mut buf = [0u8; 16];
        match ops.u8() % op::COUNT {
            op::WRITE => {
                let port = Self::port(ops);
                let width = ops.u8();
                let value = u64::from(ops.u8()) * 0x0101_0101_0101_0101;
                let _ = self.io.pio_write(port, access(width, value, &mut buf));
            }
            op::READ => {
                let port = Self::port(ops);
                let _ = self.io.pio_read(port, access(ops.u8(), 0, &mut buf));
            }
            op::INPUT => {
                let len = usize::from(ops.u8());
                let bytes = ops.bytes(len);
                let mut serial = self.serial.lock().unwrap_or_else(|e| e.into_inner());
                let room = serial.input_capacity();
                let taken = serial.enqueue_input(bytes);
                assert!(
                    taken <= room.min(bytes.len()),
                    "serial bug: took {taken} of {} bytes with room for {room}",
                    bytes.len()
                );
            }
            op::EVENTS => {
                for e in &self.events {
                    let _ = e.read();
                }
            }
            op::CLOCK => NOW.store(ops.u64(), Ordering::Relaxed),
            _ => {
                let port = PioAddress(ops.u16());
                let width = ops.u8();
                let write = ops.u8() & 1 != 0;
                let data = access(width, u64::from(ops.u8()), &mut buf);
                if write {
                    let _ = self.io.pio_write(port, data);
                } else {
                    let _ = self.io.pio_read(port, data);
                }
            }
        }
    }
}

/// The `legacy_ports` target.
pub fn legacy_ports(data: &[u8]) {
    init_logging();
    let mut ops = Input::new(data);
    NOW.store(ops.u64(), Ordering::Relaxed);
    let Some(mut rig) = Rig::new() else {
        return;
    };
    while !ops.is_empty() {
        rig.run_op(&mut ops);
    }
}
