//! Why ember ended, and the exit status that says so.

use ember_vcpu::{GuestStop, VcpuEnd};

use crate::event_loop::Stop;
use crate::{Error, Result};

/// Why ember ended, and the exit status that says so.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExitReason {
    /// The guest rebooted (i8042 reset, triple fault, reset event).
    GuestReset,
    /// The guest powered off.
    GuestPowerOff,
    /// The guest halted with nothing to wake it.
    GuestHalted,
    /// A signal (SIGINT, SIGTERM) ended the VM.
    Signal(libc::c_int),
    /// The guest was migrated away: it runs on the destination.
    Migrated,
}

impl ExitReason {
    /// The process exit status: 0 for a guest that ended by itself,
    /// 128 + the signal number for a signal (130 SIGINT, 143 SIGTERM).
    pub fn code(self) -> i32 {
        match self {
            ExitReason::GuestReset
            | ExitReason::GuestPowerOff
            | ExitReason::GuestHalted
            | ExitReason::Migrated => 0,
            ExitReason::Signal(n) => 128 + n,
        }
    }
}

impl ExitReason {
    /// What a [`Stop`] of the event loop means for the process.
    pub fn from_stop(stop: Stop) -> Result<ExitReason> {
        match stop {
            Stop::I8042Reset => Ok(ExitReason::GuestReset),
            Stop::AcpiPowerOff => Ok(ExitReason::GuestPowerOff),
            Stop::Signal(n) => Ok(ExitReason::Signal(n)),
            Stop::Migrated => Ok(ExitReason::Migrated),
            Stop::MigrationFailed(msg) => Err(Error::Migration(msg)),
            Stop::Vcpu(VcpuEnd::Guest(GuestStop::Reset)) => Ok(ExitReason::GuestReset),
            Stop::Vcpu(VcpuEnd::Guest(GuestStop::PowerOff)) => Ok(ExitReason::GuestPowerOff),
            Stop::Vcpu(VcpuEnd::Guest(GuestStop::Halted)) => Ok(ExitReason::GuestHalted),
            Stop::Vcpu(VcpuEnd::Failed(msg)) => Err(Error::Guest(msg)),
            Stop::Vcpu(VcpuEnd::Stopped) => Err(Error::Guest("a vCPU stopped unexpectedly".into())),
        }
    }
}
