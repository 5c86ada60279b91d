//! Turning a KVM exit into a bus access or a decision.
//!
//! [`handle_exit`] is a plain function of the exit and the buses, so it is
//! unit-tested without `/dev/kvm`. No device address appears here: the
//! [`IoManager`] decides who answers.

use std::collections::HashSet;

use kvm_ioctls::VcpuExit;
use vm_device::bus::{MmioAddress, PioAddress};
use vm_device::device_manager::{IoManager, MmioManager, PioManager};

/// Why a guest asked to stop.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum GuestStop {
    /// Reboot: triple fault (KVM shutdown exit) or a reset system event.
    Reset,
    /// Power off: a shutdown system event.
    PowerOff,
    /// The vCPU halted with nothing to wake it (only without an in-kernel LAPIC).
    Halted,
}

/// What the run loop does after an exit.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ExitAction {
    /// Run the guest again.
    Continue,
    /// `KVM_RUN` was interrupted (a kick): look at the requested state.
    Interrupted,
    /// The guest asked to stop.
    Stop(GuestStop),
    /// KVM could not go on: the message says why.
    Fail(String),
}

/// Remembers which unhandled addresses were reported, so each is logged
/// once at warning level (then at debug level), and the memory used is capped.
#[derive(Debug, Default)]
pub struct UnhandledLog {
    seen: HashSet<(bool, u64)>,
}

impl UnhandledLog {
    const MAX_REMEMBERED: usize = 256;

    fn report(&mut self, vcpu: u8, mmio: bool, write: bool, addr: u64, len: usize) {
        let kind = if mmio { "MMIO" } else { "port" };
        let dir = if write { "write to" } else { "read of" };
        if self.seen.len() < Self::MAX_REMEMBERED && self.seen.insert((mmio, addr)) {
            log::warn!("vcpu{vcpu}: unhandled {len}-byte {kind} {dir} {addr:#x}, ignored");
        } else {
            log::debug!("vcpu{vcpu}: unhandled {len}-byte {kind} {dir} {addr:#x}, ignored");
        }
    }

    /// How many distinct unhandled addresses were seen.
    pub fn distinct(&self) -> usize {
        self.seen.len()
    }
}

/// How many times `KVM_RUN` returned to the VMM, by kind. Exits KVM handles
/// in the kernel (ioeventfd notifications, the in-kernel LAPIC and IOAPIC,
/// emulated instructions) never reach the run loop and are not here.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ExitCounts {
    /// Port reads.
    pub io_in: u64,
    /// Port writes.
    pub io_out: u64,
    /// MMIO reads.
    pub mmio_read: u64,
    /// MMIO writes.
    pub mmio_write: u64,
    /// `KVM_RUN` interrupted by a signal (a kick) or `EAGAIN`.
    pub interrupted: u64,
    /// Everything else (halt, shutdown, system events, failures).
    pub other: u64,
}

impl ExitCounts {
    /// Counts one exit.
    pub fn record(&mut self, exit: &VcpuExit<'_>) {
        let c = match exit {
            VcpuExit::IoIn(..) => &mut self.io_in,
            VcpuExit::IoOut(..) => &mut self.io_out,
            VcpuExit::MmioRead(..) => &mut self.mmio_read,
            VcpuExit::MmioWrite(..) => &mut self.mmio_write,
            VcpuExit::Intr => &mut self.interrupted,
            _ => &mut self.other,
        };
        *c = c.saturating_add(1);
    }

    /// Every exit counted.
    pub fn total(&self) -> u64 {
        [
            self.io_in,
            self.io_out,
            self.mmio_read,
            self.mmio_write,
            self.interrupted,
            self.other,
        ]
        .iter()
        .fold(0u64, |a, b| a.saturating_add(*b))
    }
}

/// [`ExitCounts`] that the vCPU thread counts and any thread reads while
/// it runs (for metrics): relaxed atomics, one uncontended add per exit.
#[derive(Debug, Default)]
pub struct SharedExitCounts {
    io_in: std::sync::atomic::AtomicU64,
    io_out: std::sync::atomic::AtomicU64,
    mmio_read: std::sync::atomic::AtomicU64,
    mmio_write: std::sync::atomic::AtomicU64,
    interrupted: std::sync::atomic::AtomicU64,
    other: std::sync::atomic::AtomicU64,
}

impl SharedExitCounts {
    /// Counts one exit.
    pub fn record(&self, exit: &VcpuExit<'_>) {
        let c = match exit {
            VcpuExit::IoIn(..) => &self.io_in,
            VcpuExit::IoOut(..) => &self.io_out,
            VcpuExit::MmioRead(..) => &self.mmio_read,
            VcpuExit::MmioWrite(..) => &self.mmio_write,
            VcpuExit::Intr => &self.interrupted,
            _ => &self.other,
        };
        c.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    /// Counts one interrupted `KVM_RUN` (a kick).
    pub fn record_interrupted(&self) {
        self.interrupted
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    }

    /// The counts so far.
    pub fn snapshot(&self) -> ExitCounts {
        let r = |a: &std::sync::atomic::AtomicU64| a.load(std::sync::atomic::Ordering::Relaxed);
        ExitCounts {
            io_in: r(&self.io_in),
            io_out: r(&self.io_out),
            mmio_read: r(&self.mmio_read),
            mmio_write: r(&self.mmio_write),
            interrupted: r(&self.interrupted),
            other: r(&self.other),
        }
    }
}

impl std::fmt::Display for ExitCounts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} exits to the VMM: io_in={} io_out={} mmio_read={} mmio_write={} interrupted={} other={}",
            self.total(),
            self.io_in,
            self.io_out,
            self.mmio_read,
            self.mmio_write,
            self.interrupted,
            self.other
        )
    }
}

/// Handles one exit of vCPU `vcpu`. Port and MMIO accesses go to `io`; an
/// access nobody claims is logged and ignored (reads see all-ones, as on a
/// bus with nothing behind the address).
pub fn handle_exit(
    vcpu: u8,
    exit: VcpuExit<'_>,
    io: &IoManager,
    unhandled: &mut UnhandledLog,
) -> ExitAction {
    match exit {
        VcpuExit::IoIn(port, data) => {
            if io.pio_read(PioAddress(port), data).is_err() {
                data.fill(0xff);
                unhandled.report(vcpu, false, false, u64::from(port), data.len());
            }
            ExitAction::Continue
        }
        VcpuExit::IoOut(port, data) => {
            if io.pio_write(PioAddress(port), data).is_err() {
                unhandled.report(vcpu, false, true, u64::from(port), data.len());
            }
            ExitAction::Continue
        }
        VcpuExit::MmioRead(addr, data) => {
            if io.mmio_read(MmioAddress(addr), data).is_err() {
                data.fill(0xff);
                unhandled.report(vcpu, true, false, addr, data.len());
            }
            ExitAction::Continue
        }
        VcpuExit::MmioWrite(addr, data) => {
            if io.mmio_write(MmioAddress(addr), data).is_err() {
                unhandled.report(vcpu, true, true, addr, data.len());
            }
            ExitAction::Continue
        }
        VcpuExit::Intr => ExitAction::Interrupted,
        VcpuExit::IrqWindowOpen | VcpuExit::IoapicEoi(_) => ExitAction::Continue,
        VcpuExit::Hlt => ExitAction::Stop(GuestStop::Halted),
        VcpuExit::Shutdown => ExitAction::Stop(GuestStop::Reset),
        VcpuExit::SystemEvent(kind, _) => match kind {
            kvm_bindings::KVM_SYSTEM_EVENT_RESET => ExitAction::Stop(GuestStop::Reset),
            kvm_bindings::KVM_SYSTEM_EVENT_SHUTDOWN => ExitAction::Stop(GuestStop::PowerOff),
            other => ExitAction::Fail(format!("vcpu{vcpu}: unexpected system event {other}")),
        },
        VcpuExit::FailEntry(reason, cpu) => ExitAction::Fail(format!(
            "vcpu{vcpu}: KVM could not enter the guest (hardware reason {reason:#x}, host cpu {cpu})"
        )),
        VcpuExit::InternalError => {
            ExitAction::Fail(format!("vcpu{vcpu}: KVM internal error (emulation failed)"))
        }
        other => ExitAction::Fail(format!("vcpu{vcpu}: unexpected KVM exit {other:?}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};
    use vm_device::bus::{PioAddressOffset, PioRange};
    use vm_device::MutDevicePio;

    #[test]
    fn exit_counts_sort_exits_by_kind() {
        let mut c = ExitCounts::default();
        let mut data = [0u8; 4];
        c.record(&VcpuExit::IoIn(0x3f8, &mut data));
        c.record(&VcpuExit::IoOut(0x3f8, &[1]));
        c.record(&VcpuExit::IoOut(0x3f8, &[2]));
        c.record(&VcpuExit::MmioRead(0xd000_0000, &mut data));
        c.record(&VcpuExit::MmioWrite(0xd000_0000, &[1, 2, 3, 4]));
        c.record(&VcpuExit::Intr);
        c.record(&VcpuExit::Hlt);
        assert_eq!(
            c,
            ExitCounts {
                io_in: 1,
                io_out: 2,
                mmio_read: 1,
                mmio_write: 1,
                interrupted: 1,
                other: 1,
            }
        );
        assert_eq!(c.total(), 7);
        assert_eq!(
            c.to_string(),
            "7 exits to the VMM: io_in=1 io_out=2 mmio_read=1 mmio_write=1 interrupted=1 other=1"
        );
    }

    #[derive(Default)]
    struct Latch {
        written: Vec<(u16, Vec<u8>)>,
    }

    impl MutDevicePio for Latch {
        fn pio_read(&mut self, _base: PioAddress, offset: PioAddressOffset, data: &mut [u8]) {
            data.fill(u8::try_from(offset).unwrap_or(0) + 0x40);
        }
        fn pio_write(&mut self, _base: PioAddress, offset: PioAddressOffset, data: &[u8]) {
            self.written.push((offset, data.to_vec()));
        }
    }

    fn bus() -> (IoManager, Arc<Mutex<Latch>>) {
        let latch = Arc::new(Mutex::new(Latch::default()));
        let mut io = IoManager::new();
        io.register_pio(PioRange::new(PioAddress(0x3f8), 8).unwrap(), latch.clone())
            .unwrap();
        (io, latch)
    }

    #[test]
    fn port_write_reaches_the_device_at_its_offset() {
        let (io, latch) = bus();
        let mut log = UnhandledLog::default();
        let a = handle_exit(0, VcpuExit::IoOut(0x3f9, &[7]), &io, &mut log);
        assert_eq!(a, ExitAction::Continue);
        assert_eq!(latch.lock().unwrap().written, vec![(1, vec![7])]);
    }

    #[test]
    fn port_read_is_answered_by_the_device() {
        let (io, _) = bus();
        let mut log = UnhandledLog::default();
        let mut data = [0u8; 1];
        handle_exit(0, VcpuExit::IoIn(0x3fa, &mut data), &io, &mut log);
        assert_eq!(data, [0x42]);
        assert_eq!(log.distinct(), 0);
    }

    #[test]
    fn unhandled_port_read_sees_all_ones_and_continues() {
        let (io, _) = bus();
        let mut log = UnhandledLog::default();
        let mut data = [0u8; 2];
        let a = handle_exit(0, VcpuExit::IoIn(0x1234, &mut data), &io, &mut log);
        assert_eq!(a, ExitAction::Continue);
        assert_eq!(data, [0xff, 0xff]);
        assert_eq!(log.distinct(), 1);
    }

    #[test]
    fn access_straddling_the_end_of_a_device_is_unhandled() {
        let (io, latch) = bus();
        let mut log = UnhandledLog::default();
        handle_exit(0, VcpuExit::IoOut(0x3fe, &[1, 2, 3, 4]), &io, &mut log);
        assert!(latch.lock().unwrap().written.is_empty());
        assert_eq!(log.distinct(), 1);
    }

    #[test]
    fn unhandled_mmio_is_ignored_and_remembered_once() {
        let (io, _) = bus();
        let mut log = UnhandledLog::default();
        for _ in 0..3 {
            let a = handle_exit(
                1,
                VcpuExit::MmioWrite(0xd000_0000, &[1, 2, 3, 4]),
                &io,
                &mut log,
            );
            assert_eq!(a, ExitAction::Continue);
        }
        let mut data = [0u8; 4];
        handle_exit(1, VcpuExit::MmioRead(0xd000_0000, &mut data), &io, &mut log);
        assert_eq!(data, [0xff; 4]);
        assert_eq!(log.distinct(), 1);
    }

    #[test]
    fn unhandled_log_memory_is_capped() {
        let (io, _) = bus();
        let mut log = UnhandledLog::default();
        for port in 0..1000u16 {
            handle_exit(
                0,
                VcpuExit::IoOut(port.wrapping_add(0x1000), &[0]),
                &io,
                &mut log,
            );
        }
        assert_eq!(log.distinct(), UnhandledLog::MAX_REMEMBERED);
    }

    #[test]
    fn shutdown_and_system_events_stop_the_guest() {
        let (io, _) = bus();
        let mut log = UnhandledLog::default();
        assert_eq!(
            handle_exit(0, VcpuExit::Shutdown, &io, &mut log),
            ExitAction::Stop(GuestStop::Reset)
        );
        assert_eq!(
            handle_exit(
                0,
                VcpuExit::SystemEvent(kvm_bindings::KVM_SYSTEM_EVENT_SHUTDOWN, &[]),
                &io,
                &mut log
            ),
            ExitAction::Stop(GuestStop::PowerOff)
        );
        assert_eq!(
            handle_exit(0, VcpuExit::Intr, &io, &mut log),
            ExitAction::Interrupted
        );
        assert!(matches!(
            handle_exit(0, VcpuExit::InternalError, &io, &mut log),
            ExitAction::Fail(_)
        ));
    }
}
