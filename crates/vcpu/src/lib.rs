//! One x86_64 KVM vCPU, ready for the Linux 64-bit boot protocol.
//!
//! - [`cpuid`]: KVM's supported CPUID normalised for the VM's topology, with
//!   the features masked that the guest must not use ([`cpuid::MASKED_FEATURES`]).
//! - [`regs`]: long-mode registers, GDT, identity page tables, FPU, MSRs.
//! - [`exit`]: a plain function from a KVM exit to a bus access or a decision.
//! - [`Vcpu`]: creates the vCPU, configures it and runs it as a small state
//!   machine ([`VcpuControl`]) that another thread pauses, resumes or stops,
//!   kicking it out of `KVM_RUN` with a real-time signal ([`kick_thread`]).
//!
//! The vCPU knows nothing of devices: port and MMIO exits go to a
//! vm-device [`IoManager`](vm_device::device_manager::IoManager).
//!
//! ```no_run
//! use std::sync::Arc;
//! use ember_vcpu::{register_kick_signal, Vcpu, VcpuControl};
//! use kvm_bindings::KVM_MAX_CPUID_ENTRIES;
//! use vm_device::device_manager::IoManager;
//!
//! let kvm = kvm_ioctls::Kvm::new().unwrap();
//! let vm = kvm.create_vm().unwrap();
//! vm.create_irq_chip().unwrap();
//! let mem = ember_memory::MemoryLayout::new(64).unwrap().create_guest_memory().unwrap();
//! // ... register `mem` with the VM and load a kernel ...
//! let supported = kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES).unwrap();
//! let mut vcpu = Vcpu::new(&vm, 0, Arc::new(IoManager::new())).unwrap();
//! let forced = vcpu.set_cpuid(supported.as_slice(), 1).unwrap();
//! // Add `cpuid::kernel_params_hiding(&forced)` to the kernel command line.
//! vcpu.setup_boot(&mem, 0x100_0000).unwrap();
//! register_kick_signal().unwrap();
//! let control = Arc::new(VcpuControl::default());
//! let end = std::thread::spawn(move || vcpu.run(&control)).join().unwrap();
//! println!("vcpu ended: {end:?}");
//! ```

pub mod cpuid;
pub mod exit;
pub mod model;
pub mod regs;
pub mod state;
mod vcpu;

use std::os::unix::thread::JoinHandleExt;
use std::thread::JoinHandle;

pub use exit::{ExitAction, ExitCounts, GuestStop, SharedExitCounts};
pub use state::VcpuState;
pub use vcpu::{RunState, Vcpu, VcpuControl, VcpuEnd};

/// Errors of this crate.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A KVM ioctl failed.
    #[error("{0} failed")]
    Kvm(&'static str, #[source] kvm_ioctls::Error),
    /// More CPUID or MSR entries than KVM accepts.
    #[error("too many CPUID or MSR entries for KVM")]
    CpuidTooLarge,
    /// KVM refused to set an MSR.
    #[error("KVM refused to set MSR {0:#x}")]
    MsrRejected(u32),
    /// Boot structures could not be written.
    #[error(transparent)]
    Regs(#[from] regs::Error),
    /// A saved state of another layout version.
    #[error("{what} state version {found} is not supported (this ember reads {supported})")]
    StateVersion {
        /// Which state.
        what: &'static str,
        /// In the snapshot.
        found: u32,
        /// What this build reads.
        supported: u32,
    },
    /// A saved state does not fit this vCPU.
    #[error("{0}")]
    StateMismatch(String),
    /// The kick signal handler could not be installed or sent.
    #[error("cannot install or send the vCPU kick signal")]
    Signal(#[source] vmm_sys_util::errno::Error),
}

/// Result type of this crate.
pub type Result<T> = std::result::Result<T, Error>;

/// The error and its sources on one line.
pub(crate) fn error_chain(e: &dyn std::error::Error) -> String {
    let mut line = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        line.push_str(": ");
        line.push_str(&s.to_string());
        source = s.source();
    }
    line
}

/// The real-time signal that kicks a vCPU thread out of `KVM_RUN`.
pub fn kick_signal() -> libc::c_int {
    vmm_sys_util::signal::SIGRTMIN()
}

/// Installs the kick signal's handler for the process. Call once before
/// starting vCPU threads.
pub fn register_kick_signal() -> Result<()> {
    vmm_sys_util::signal::register_signal_handler(kick_signal(), vcpu::kick_handler)
        .map_err(Error::Signal)
}

/// Kicks the vCPU thread `handle` out of `KVM_RUN` (its run loop then looks
/// at its [`VcpuControl`]).
pub fn kick_thread<T>(handle: &JoinHandle<T>) -> Result<()> {
    // SAFETY: pthread_kill on a thread we own and have not joined: the
    // pthread_t is valid until the JoinHandle is consumed by join().
    let ret = unsafe { libc::pthread_kill(handle.as_pthread_t(), kick_signal()) };
    if ret != 0 {
        return Err(Error::Signal(vmm_sys_util::errno::Error::new(ret)));
    }
    Ok(())
}
