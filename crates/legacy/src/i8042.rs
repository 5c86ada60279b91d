//! The i8042 keyboard controller with a PS/2 keyboard behind it, as a
//! port-I/O device on ports 0x60 (data) and 0x64 (status/command).
//!
//! What a microVM needs of it: the CPU-reset command (0xFE, what Linux's
//! `reboot=k` uses) ends the VM, and the host can press Ctrl-Alt-Del
//! ([`I8042::trigger_ctrl_alt_del`], Firecracker's `SendCtrlAltDel`), which
//! Linux's keyboard driver turns into a reboot or a signal to init. The
//! controller answers the commands Linux's i8042 and atkbd drivers send
//! when they probe (self-tests, the command byte, keyboard reset and
//! identify), has no auxiliary (mouse) port, and sends scan code set 2
//! untranslated. Its interrupt (IRQ 1) is an eventfd the VMM wires to the
//! IOAPIC as an irqfd; each byte put in the output buffer while the
//! keyboard interrupt is enabled raises it.
//!
//! vm-superio's `I8042Device` was the starting point but implements only
//! the reset command, so ember has its own.

use std::collections::VecDeque;

use vm_device::bus::{PioAddress, PioAddressOffset};
use vm_device::MutDevicePio;
use vmm_sys_util::eventfd::EventFd;

/// First port: the data port 0x60.
pub const I8042_PORT_BASE: u16 = 0x60;
/// Ports 0x60 to 0x64 (the command/status port is at offset 4).
pub const I8042_PORT_SIZE: u16 = 5;

const DATA: PioAddressOffset = 0;
const COMMAND: PioAddressOffset = 4;

// Status register bits.
const SB_OUT_FULL: u8 = 0x01;
const SB_SYSTEM: u8 = 0x04;
const SB_LAST_WAS_COMMAND: u8 = 0x08;
const SB_KBD_ENABLED: u8 = 0x10;

// Command byte bits.
const CB_KBD_INT: u8 = 0x01;
const CB_SYSTEM: u8 = 0x04;
const CB_KBD_DISABLED: u8 = 0x10;
const CB_AUX_DISABLED: u8 = 0x20;

// Controller commands (port 0x64).
const CMD_READ_CB: u8 = 0x20;
const CMD_WRITE_CB: u8 = 0x60;
const CMD_DISABLE_AUX: u8 = 0xa7;
const CMD_ENABLE_AUX: u8 = 0xa8;
const CMD_TEST_AUX: u8 = 0xa9;
const CMD_SELF_TEST: u8 = 0xaa;
const CMD_TEST_KBD: u8 = 0xab;
const CMD_DISABLE_KBD: u8 = 0xad;
const CMD_ENABLE_KBD: u8 = 0xae;
const CMD_READ_OUTPUT_PORT: u8 = 0xd0;
const CMD_WRITE_OUTPUT_PORT: u8 = 0xd1;
const CMD_WRITE_KBD_BUFFER: u8 = 0xd2;
const CMD_WRITE_AUX_BUFFER: u8 = 0xd3;
const CMD_WRITE_AUX: u8 = 0xd4;
const CMD_RESET_CPU: u8 = 0xfe;

// Keyboard commands (port 0x60) and answers.
const KBD_SET_LEDS: u8 = 0xed;
const KBD_ECHO: u8 = 0xee;
const KBD_SCANCODE_SET: u8 = 0xf0;
const KBD_IDENTIFY: u8 = 0xf2;
const KBD_SET_RATE: u8 = 0xf3;
const KBD_RESET: u8 = 0xff;
const KBD_ACK: u8 = 0xfa;
const KBD_SELF_TEST_OK: u8 = 0xaa;

/// Scan code set 2: left Ctrl, left Alt, Delete (extended), and the break
/// prefix.
const SC_CTRL: u8 = 0x14;
const SC_ALT: u8 = 0x11;
const SC_EXTENDED: u8 = 0xe0;
const SC_DEL: u8 = 0x71;
const SC_BREAK: u8 = 0xf0;

/// Most bytes the output buffer holds; a guest that never reads it loses
/// the newest, never grows ember's memory.
const OUTPUT_CAPACITY: usize = 32;

/// A byte the controller expects on the data port after a command (the
/// discriminant is what a saved state holds).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
enum Expect {
    Nothing = 0,
    CommandByte,
    OutputPort,
    KbdBuffer,
    AuxBuffer,
    AuxByte,
    KbdArgument,
}

/// The controller and its keyboard.
pub struct I8042 {
    reset: EventFd,
    irq: EventFd,
    command_byte: u8,
    last_was_command: bool,
    expect: Expect,
    output: VecDeque<u8>,
}

impl std::fmt::Debug for I8042 {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("I8042")
            .field("command_byte", &self.command_byte)
            .field("pending", &self.output.len())
            .finish_non_exhaustive()
    }
}

impl I8042 {
    /// Signals `reset` on a CPU-reset command and `irq` (IRQ 1) when the
    /// keyboard has a byte for the guest.
    pub fn new(reset: EventFd, irq: EventFd) -> Self {
        I8042 {
            reset,
            irq,
            // As firmware leaves it: keyboard interrupt on, POST passed,
            // no mouse, no translation.
            command_byte: CB_KBD_INT | CB_SYSTEM | CB_AUX_DISABLED,
            last_was_command: false,
            expect: Expect::Nothing,
            output: VecDeque::with_capacity(OUTPUT_CAPACITY),
        }
    }

    /// The controller's state.
    pub fn state(&self) -> crate::I8042State {
        crate::I8042State {
            command_byte: self.command_byte,
            last_was_command: self.last_was_command,
            expect: self.expect as u8,
            output: self.output.iter().copied().collect(),
        }
    }

    /// Puts the controller in `state` (as saved by [`state`](Self::state));
    /// an unknown `expect` value or an oversized output queue is an error.
    pub fn restore_state(&mut self, state: &crate::I8042State) -> Result<(), String> {
        let expect = [
            Expect::Nothing,
            Expect::CommandByte,
            Expect::OutputPort,
            Expect::KbdBuffer,
            Expect::AuxBuffer,
            Expect::AuxByte,
            Expect::KbdArgument,
        ]
        .into_iter()
        .find(|e| *e as u8 == state.expect)
        .ok_or_else(|| format!("i8042: unknown expect value {}", state.expect))?;
        if state.output.len() > OUTPUT_CAPACITY {
            return Err(format!(
                "i8042: {} bytes queued, at most {OUTPUT_CAPACITY}",
                state.output.len()
            ));
        }
        self.command_byte = state.command_byte;
        self.last_was_command = state.last_was_command;
        self.expect = expect;
        self.output = state.output.iter().copied().collect();
        Ok(())
    }

    /// Presses and releases Ctrl-Alt-Del on the keyboard.
    pub fn trigger_ctrl_alt_del(&mut self) -> std::io::Result<()> {
        let keys = [
            SC_CTRL,
            SC_ALT,
            SC_EXTENDED,
            SC_DEL,
            SC_EXTENDED,
            SC_BREAK,
            SC_DEL,
            SC_BREAK,
            SC_ALT,
            SC_BREAK,
            SC_CTRL,
        ];
        if self.output.len() + keys.len() > OUTPUT_CAPACITY {
            return Err(std::io::Error::new(
                std::io::ErrorKind::WouldBlock,
                "the keyboard buffer is full (the guest is not reading it)",
            ));
        }
        self.output.extend(keys);
        self.interrupt()
    }

    fn interrupt(&self) -> std::io::Result<()> {
        if self.command_byte & CB_KBD_INT != 0 && !self.output.is_empty() {
            self.irq.write(1)?;
        }
        Ok(())
    }

    fn push(&mut self, bytes: &[u8]) {
        for &b in bytes {
            if self.output.len() < OUTPUT_CAPACITY {
                self.output.push_back(b);
            }
        }
        if let Err(e) = self.interrupt() {
            log::warn!("i8042: cannot raise the keyboard interrupt: {e}");
        }
    }

    fn status(&self) -> u8 {
        let mut s = SB_SYSTEM;
        if !self.output.is_empty() {
            s |= SB_OUT_FULL;
        }
        if self.last_was_command {
            s |= SB_LAST_WAS_COMMAND;
        }
        if self.command_byte & CB_KBD_DISABLED == 0 {
            s |= SB_KBD_ENABLED;
        }
        s
    }

    fn read_data(&mut self) -> u8 {
        let b = self.output.pop_front().unwrap_or(0);
        // One interrupt per byte: the next one, if any.
        if let Err(e) = self.interrupt() {
            log::warn!("i8042: cannot raise the keyboard interrupt: {e}");
        }
        b
    }

    fn write_command(&mut self, cmd: u8) {
        self.last_was_command = true;
        self.expect = Expect::Nothing;
        match cmd {
            CMD_READ_CB => self.push(&[self.command_byte]),
            CMD_WRITE_CB => self.expect = Expect::CommandByte,
            CMD_DISABLE_AUX => self.command_byte |= CB_AUX_DISABLED,
            CMD_ENABLE_AUX => {}
            // No auxiliary port: its clock line reads stuck low.
            CMD_TEST_AUX => self.push(&[0x01]),
            CMD_SELF_TEST => self.push(&[0x55]),
            CMD_TEST_KBD => self.push(&[0x00]),
            CMD_DISABLE_KBD => self.command_byte |= CB_KBD_DISABLED,
            CMD_ENABLE_KBD => self.command_byte &= !CB_KBD_DISABLED,
            // A20 on, no reset.
            CMD_READ_OUTPUT_PORT => self.push(&[0x03]),
            CMD_WRITE_OUTPUT_PORT => self.expect = Expect::OutputPort,
            CMD_WRITE_KBD_BUFFER => self.expect = Expect::KbdBuffer,
            CMD_WRITE_AUX_BUFFER => self.expect = Expect::AuxBuffer,
            CMD_WRITE_AUX => self.expect = Expect::AuxByte,
            CMD_RESET_CPU => {
                if let Err(e) = self.reset.write(1) {
                    log::error!("i8042: cannot signal the reset: {e}");
                }
            }
            other => log::debug!("i8042: ignoring controller command {other:#04x}"),
        }
    }

    fn write_data(&mut self, byte: u8) {
        self.last_was_command = false;
        match std::mem::replace(&mut self.expect, Expect::Nothing) {
            Expect::CommandByte => self.command_byte = byte,
            // Bit 0 low would reset the CPU; Linux never does that here.
            Expect::OutputPort => {}
            Expect::KbdBuffer => self.push(&[byte]),
            // No mouse behind the controller. Linux's loopback probe
            // (0xD3, 0x5A) waits for the byte to come back with interrupts
            // off for up to half a second, which a software hypervisor
            // emulates instruction by instruction: answer at once with
            // what a missing device reads as, so the probe fails fast.
            Expect::AuxBuffer => self.push(&[0xff]),
            Expect::AuxByte => {}
            Expect::KbdArgument => self.push(&[KBD_ACK]),
            Expect::Nothing => self.keyboard_command(byte),
        }
    }

    fn keyboard_command(&mut self, cmd: u8) {
        match cmd {
            KBD_RESET => {
                self.output.clear();
                self.push(&[KBD_ACK, KBD_SELF_TEST_OK]);
            }
            // An MF2 keyboard.
            KBD_IDENTIFY => self.push(&[KBD_ACK, 0xab, 0x83]),
            KBD_ECHO => self.push(&[KBD_ECHO]),
            KBD_SET_LEDS | KBD_SCANCODE_SET | KBD_SET_RATE => {
                self.push(&[KBD_ACK]);
                self.expect = Expect::KbdArgument;
            }
            _ => self.push(&[KBD_ACK]),
        }
    }
}

impl MutDevicePio for I8042 {
    fn pio_read(&mut self, _base: PioAddress, offset: PioAddressOffset, data: &mut [u8]) {
        match (offset, data) {
            (DATA, [byte]) => *byte = self.read_data(),
            (COMMAND, [byte]) => *byte = self.status(),
            (_, data) => data.fill(0xff),
        }
    }

    fn pio_write(&mut self, _base: PioAddress, offset: PioAddressOffset, data: &[u8]) {
        match (offset, data) {
            (DATA, [byte]) => self.write_data(*byte),
            (COMMAND, [byte]) => self.write_command(*byte),
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: PioAddress = PioAddress(I8042_PORT_BASE);

    struct Rig {
        dev: I8042,
        reset: EventFd,
        irq: EventFd,
    }

    fn rig() -> Rig {
        let reset = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let irq = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        Rig {
            dev: I8042::new(reset.try_clone().unwrap(), irq.try_clone().unwrap()),
            reset,
            irq,
        }
    }

    impl Rig {
        fn read(&mut self, offset: PioAddressOffset) -> u8 {
            let mut b = [0u8];
            self.dev.pio_read(BASE, offset, &mut b);
            b[0]
        }

        fn drain(&mut self) -> Vec<u8> {
            let mut v = Vec::new();
            while self.read(COMMAND) & SB_OUT_FULL != 0 {
                v.push(self.read(DATA));
            }
            v
        }
    }

    #[test]
    fn i8042_reset_command_signals_reset() {
        let mut r = rig();
        r.dev.pio_write(BASE, COMMAND, &[0xfe]);
        assert_eq!(r.reset.read().unwrap(), 1);
    }

    #[test]
    fn i8042_other_writes_do_not_reset() {
        let mut r = rig();
        r.dev.pio_write(BASE, COMMAND, &[0xfd]);
        r.dev.pio_write(BASE, DATA, &[0xfe]);
        r.dev.pio_write(BASE, COMMAND, &[0xfe, 0xfe]);
        assert!(r.reset.read().is_err(), "no reset was signalled");
    }

    #[test]
    fn i8042_status_reads_ready() {
        let mut r = rig();
        // Input buffer empty: Linux's kb_wait() proceeds.
        assert_eq!(r.read(COMMAND) & 0x2, 0);
        assert_eq!(r.read(COMMAND) & SB_OUT_FULL, 0);
    }

    #[test]
    fn i8042_state_round_trips_pending_output() {
        let mut a = rig();
        a.dev.trigger_ctrl_alt_del().unwrap();
        a.dev.pio_write(BASE, COMMAND, &[0x60]);
        let saved = a.dev.state();
        let mut b = rig();
        b.dev.restore_state(&saved).unwrap();
        assert_eq!(b.dev.state(), saved);
        assert_eq!(b.drain(), a.drain());
    }

    #[test]
    fn i8042_restore_refuses_bad_state() {
        let mut r = rig();
        let mut bad = r.dev.state();
        bad.expect = 200;
        assert!(r.dev.restore_state(&bad).is_err());
        let mut big = r.dev.state();
        big.output = vec![0; 1000];
        assert!(r.dev.restore_state(&big).is_err());
    }

    #[test]
    fn i8042_probe_commands_answer_as_linux_expects() {
        let mut r = rig();
        r.dev.pio_write(BASE, COMMAND, &[CMD_SELF_TEST]);
        assert_eq!(r.drain(), [0x55]);
        r.dev.pio_write(BASE, COMMAND, &[CMD_TEST_KBD]);
        assert_eq!(r.drain(), [0x00]);
        r.dev.pio_write(BASE, COMMAND, &[CMD_READ_CB]);
        let cb = r.drain();
        assert_eq!(cb, [CB_KBD_INT | CB_SYSTEM | CB_AUX_DISABLED]);
        r.dev.pio_write(BASE, COMMAND, &[CMD_WRITE_CB]);
        r.dev.pio_write(BASE, DATA, &[0x45]);
        r.dev.pio_write(BASE, COMMAND, &[CMD_READ_CB]);
        assert_eq!(r.drain(), [0x45]);
        r.dev.pio_write(BASE, DATA, &[KBD_RESET]);
        assert_eq!(r.drain(), [KBD_ACK, KBD_SELF_TEST_OK]);
        r.dev.pio_write(BASE, DATA, &[KBD_IDENTIFY]);
        assert_eq!(r.drain(), [KBD_ACK, 0xab, 0x83]);
        // No mouse: the aux loopback does not echo, and fails at once.
        r.dev.pio_write(BASE, COMMAND, &[CMD_WRITE_AUX_BUFFER]);
        r.dev.pio_write(BASE, DATA, &[0x5a]);
        assert_eq!(r.drain(), [0xff]);
        r.dev.pio_write(BASE, COMMAND, &[CMD_TEST_AUX]);
        assert_eq!(r.drain(), [0x01]);
        r.dev.pio_write(BASE, DATA, &[KBD_SET_LEDS]);
        r.dev.pio_write(BASE, DATA, &[0x07]);
        assert_eq!(r.drain(), [KBD_ACK, KBD_ACK]);
        assert!(r.reset.read().is_err());
    }

    #[test]
    fn i8042_ctrl_alt_del_sends_set_2_codes_with_an_interrupt() {
        let mut r = rig();
        r.dev.trigger_ctrl_alt_del().unwrap();
        assert!(r.irq.read().unwrap() >= 1);
        assert_eq!(
            r.drain(),
            [0x14, 0x11, 0xe0, 0x71, 0xe0, 0xf0, 0x71, 0xf0, 0x11, 0xf0, 0x14]
        );
    }

    #[test]
    fn i8042_no_interrupt_when_the_guest_disabled_it() {
        let mut r = rig();
        r.dev.pio_write(BASE, COMMAND, &[CMD_WRITE_CB]);
        r.dev.pio_write(BASE, DATA, &[CB_SYSTEM]);
        r.dev.trigger_ctrl_alt_del().unwrap();
        assert!(r.irq.read().is_err(), "no interrupt");
        assert_eq!(r.drain().len(), 11);
    }

    #[test]
    fn i8042_output_buffer_is_bounded() {
        let mut r = rig();
        r.dev.trigger_ctrl_alt_del().unwrap();
        r.dev.trigger_ctrl_alt_del().unwrap();
        assert!(
            r.dev.trigger_ctrl_alt_del().is_err(),
            "a guest that never reads"
        );
        for _ in 0..100 {
            r.dev.pio_write(BASE, DATA, &[KBD_ECHO]);
        }
        assert_eq!(r.drain().len(), OUTPUT_CAPACITY);
    }

    #[test]
    fn i8042_odd_sizes_and_ports_are_ignored() {
        let mut r = rig();
        let mut two = [0u8; 2];
        r.dev.pio_read(BASE, DATA, &mut two);
        assert_eq!(two, [0xff, 0xff]);
        r.dev.pio_write(BASE, 2, &[0xfe]);
        assert!(r.reset.read().is_err());
    }
}
