//! The VMM's error type: everything that can go wrong building or running
//! a VM, one variant per cause.

use crate::{config, passt, seccomp};

/// Everything that can go wrong building or running a VM. Messages name
/// what failed; the source (if any) says why.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Invalid configuration.
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    /// `/dev/kvm` cannot be opened.
    #[error("cannot open /dev/kvm (is KVM available and accessible?)")]
    OpenKvm(#[source] kvm_ioctls::Error),
    /// A KVM ioctl failed.
    #[error("{0} failed")]
    Kvm(&'static str, #[source] kvm_ioctls::Error),
    /// More vCPUs than KVM allows.
    #[error("machine.vcpus = {asked} is more than KVM allows on this host ({max})")]
    TooManyVcpus {
        /// Asked for.
        asked: u8,
        /// KVM_CAP_MAX_VCPUS.
        max: usize,
    },
    /// Guest memory cannot be laid out or mapped.
    #[error(transparent)]
    Memory(#[from] ember_memory::Error),
    /// More memory regions than KVM slots.
    #[error("too many guest memory regions")]
    TooManyRegions,
    /// The kernel, initrd or command line cannot be loaded.
    #[error(transparent)]
    Load(#[from] ember_loader::Error),
    /// A vCPU cannot be created or configured.
    #[error("cannot set up a vCPU")]
    Vcpu(#[source] ember_vcpu::Error),
    /// A vCPU thread cannot be started.
    #[error("cannot start the thread of vcpu{0}")]
    SpawnVcpu(u8, #[source] std::io::Error),
    /// An eventfd cannot be created.
    #[error("cannot create the {0} eventfd")]
    EventFd(&'static str, #[source] std::io::Error),
    /// A device cannot be placed on a bus.
    #[error("cannot place a device on the bus: {0}")]
    Bus(String),
    /// The event loop failed.
    #[error("event loop: {0}")]
    EventLoop(String),
    /// The stop signals cannot be set up.
    #[error("cannot set up SIGINT/SIGTERM handling")]
    Signals(#[source] std::io::Error),
    /// Console input cannot be set up.
    #[error("cannot use stdin as console input")]
    Console(#[source] std::io::Error),
    /// A disk cannot be opened or set up.
    #[error("disk {index}")]
    Disk {
        /// Which disk, in config order.
        index: usize,
        /// Why.
        #[source]
        source: ember_virtio_blk::Error,
    },
    /// A NIC cannot be opened or set up.
    #[error("NIC {index}")]
    Net {
        /// Which NIC, in config order.
        index: usize,
        /// Why.
        #[source]
        source: ember_virtio_net::Error,
    },
    /// A user-mode NIC's passt cannot be started or reached.
    #[error("NIC {index} (user-mode)")]
    UserNet {
        /// Which NIC, in config order.
        index: usize,
        /// Why.
        #[source]
        source: passt::PasstError,
    },
    /// The jail cannot be set up, or the jailed VM cannot start.
    #[error("jail")]
    Jail(#[from] ember_jail::Error),
    /// The VM config cannot be passed into a jail.
    #[error("jail: {0}")]
    JailConfig(String),
    /// A seccomp filter cannot be compiled or installed.
    #[error(transparent)]
    Seccomp(#[from] seccomp::Error),
    /// The operation does not fit the VM's state.
    #[error("{0}")]
    Lifecycle(String),
    /// The API socket cannot be set up.
    #[error("API socket")]
    Api(#[from] ember_api::Error),
    /// A device's I/O thread cannot be started or commanded.
    #[error("I/O thread {0}")]
    Thread(String),
    /// The console cannot be set up (`--serial`).
    #[error("{0}")]
    Serial(String),
    /// The API thread cannot be started.
    #[error("cannot start the API thread")]
    SpawnApi(#[source] std::io::Error),
    /// The CPU model cannot be given to a guest on this host.
    #[error("CPU model: {0}")]
    Cpu(#[source] ember_vcpu::model::ModelError),
    /// A saved guest's CPU cannot run on this host.
    #[error("cannot restore the snapshot: {0}")]
    CpuMismatch(#[source] ember_vcpu::model::fingerprint::FingerprintError),
    /// A snapshot cannot be restored.
    #[error("cannot restore the snapshot: {0}")]
    Restore(String),
    /// A snapshot file cannot be read or written.
    #[error(transparent)]
    Snapshot(#[from] ember_snapshot::Error),
    /// The guest or KVM failed while running.
    #[error("the VM failed: {0}")]
    Guest(String),
    /// A live migration failed.
    #[error("migration: {0}")]
    Migration(String),
    /// A stop signal came while waiting (for a migration's source); the
    /// event loop reads it next.
    #[error("interrupted by a stop signal")]
    Interrupted,
    /// Shared guest memory cannot be made or mapped.
    #[error("shared guest memory: {0}")]
    SharedMemory(String),
    /// The ACPI tables cannot be built or written.
    #[error("ACPI tables: {0}")]
    Acpi(String),
    /// The balloon cannot be made or driven.
    #[error("balloon: {0}")]
    Balloon(String),
    /// A device (vsock, entropy) cannot be made or restored.
    #[error("{name}: {why}")]
    Device {
        /// The device.
        name: &'static str,
        /// What went wrong.
        why: String,
    },
    /// Guest memory cannot be backed, advised, bound or prefaulted as the
    /// configuration asks.
    #[error("guest memory: {0}")]
    MemoryBackend(String),
}

/// The error and its sources on one line (a source whose text an outer
/// message already quotes is not repeated).
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut line = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !line.contains(&text) {
            line.push_str(": ");
            line.push_str(&text);
        }
        source = s.source();
    }
    line.replace('\n', " ")
}

/// Result type of this crate.
pub type Result<T> = std::result::Result<T, Error>;
