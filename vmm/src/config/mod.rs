//! The VM configuration: a TOML file, command-line flags that override or
//! replace it, and validation of the whole before anything is created.
//!
//! ```toml
//! [machine]
//! vcpus = 2
//! memory_mib = 512
//!
//! [boot]
//! kernel = "vmlinux"            # ELF vmlinux or bzImage, detected from the file
//! initrd = "initramfs.cpio"     # optional
//! cmdline = "console=ttyS0 reboot=k panic=1"
//! ```
//!
//! Relative paths in the file are relative to the file's directory; unknown
//! keys are errors.

pub mod balloon;
pub mod boot;
pub mod disk;
pub mod firecracker;
pub mod machine;
pub mod net;
pub mod numa;
pub mod vsock;

use std::path::{Path, PathBuf};

use serde::Deserialize;

pub use boot::BootConfig;
pub use disk::DiskConfig;
pub use machine::{CpuChoice, HugePageSize, MachineConfig, MemoryBackend, MemoryFlag, Transport};
pub use net::NetConfig;
pub use numa::{NumaConfig, NumaNode, NumaPolicy};

/// What is wrong with a configuration. Each message names the key or file.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The config file cannot be read.
    #[error("cannot read config file {}", .path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The config file is not valid TOML or has unknown keys or wrong types.
    #[error("invalid config file {}: {message}", .path.display())]
    Parse {
        /// The file.
        path: PathBuf,
        /// Where and what, on one line.
        message: String,
    },
    /// `machine.vcpus` is out of range.
    #[error("machine.vcpus = {0} is out of range: it must be 1 to {max}", max = machine::MAX_VCPUS)]
    Vcpus(u64),
    /// `machine.cpu` (or the CPU template) cannot be used.
    #[error("machine.cpu: {0}")]
    Cpu(#[source] ember_vcpu::model::ModelError),
    /// `machine.memory_mib` is not a usable size.
    #[error("machine.memory_mib is invalid")]
    Memory(#[source] ember_memory::Error),
    /// No kernel was given.
    #[error("no kernel given: set boot.kernel in the config file or pass --kernel")]
    NoKernel,
    /// A file named by the config does not exist or cannot be read.
    #[error("{key} = {}: cannot access the file", .path.display())]
    File {
        /// The key naming it.
        key: &'static str,
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// A file named by the config is a directory or a device.
    #[error("{key} = {}: not a regular file", .path.display())]
    NotAFile {
        /// The key naming it.
        key: &'static str,
        /// The path.
        path: PathBuf,
    },
    /// A `--memory` flag cannot be parsed.
    #[error("--memory {flag}: {why}")]
    MemoryFlag {
        /// The flag's value.
        flag: String,
        /// What is wrong.
        why: String,
    },
    /// The memory backend's keys do not go together.
    #[error("memory: {0}")]
    MemoryBackend(String),
    /// The NUMA layout is wrong.
    #[error("numa: {0}")]
    Numa(String),
    /// A `--numa` flag cannot be parsed.
    #[error("--numa {flag}: {why}")]
    NumaFlag {
        /// The flag's value.
        flag: String,
        /// What is wrong.
        why: String,
    },
    /// A device's settings are wrong.
    #[error("{name}: {why}")]
    Device {
        /// The device (`vsock`, `entropy`).
        name: &'static str,
        /// What is wrong.
        why: String,
    },
    /// A device's flag cannot be parsed.
    #[error("--{name} {flag}: {why}")]
    DeviceFlag {
        /// The device (`vsock`, `entropy`).
        name: &'static str,
        /// The flag's value.
        flag: String,
        /// What is wrong.
        why: String,
    },
    /// The balloon's settings are wrong.
    #[error("balloon: {0}")]
    Balloon(String),
    /// A `--balloon` flag cannot be parsed.
    #[error("--balloon {flag}: {why}")]
    BalloonFlag {
        /// The flag's value.
        flag: String,
        /// What is wrong.
        why: String,
    },
    /// The vCPU pinning is wrong.
    #[error("vcpu_affinity: {0}")]
    Affinity(String),
    /// A `--disk` flag cannot be parsed.
    #[error("--disk {flag}: {why}")]
    DiskFlag {
        /// The flag's value.
        flag: String,
        /// What is wrong.
        why: String,
    },
    /// Too many disks.
    #[error("{0} disks configured; at most {max} are supported", max = disk::MAX_DISKS)]
    TooManyDisks(usize),
    /// A disk id is too long.
    #[error("disk {index}: id is {len} bytes long; at most {max} are allowed", max = disk::MAX_ID_LEN)]
    DiskId {
        /// Which disk (0-based, in config order).
        index: usize,
        /// The id's length.
        len: usize,
    },
    /// A disk's `partuuid` cannot be used.
    #[error("disk {index}: partuuid {why}")]
    DiskPartuuid {
        /// Which disk (0-based, in config order).
        index: usize,
        /// What is wrong.
        why: String,
    },
    /// A disk option (queue count or size, cache mode) is not allowed.
    #[error("disk {index}: {why}")]
    DiskOption {
        /// Which disk (0-based, in config order).
        index: usize,
        /// What is wrong.
        why: String,
    },
    /// The same image is given twice.
    #[error("disk.path = {}: the same image is configured twice", .0.display())]
    DuplicateDisk(PathBuf),
    /// A `--net` flag cannot be parsed.
    #[error("--net {flag}: {why}")]
    NetFlag {
        /// The flag's value.
        flag: String,
        /// What is wrong.
        why: String,
    },
    /// Too many NICs.
    #[error("{0} NICs configured; at most {max} are supported", max = net::MAX_NETS)]
    TooManyNets(usize),
    /// A tap name Linux cannot have.
    #[error("net.tap = {0:?} is not a valid interface name (1 to 15 bytes, no '/' or spaces)")]
    TapName(String),
    /// A host-side VLAN id out of range.
    #[error("net.vlan = {vid} (tap {tap}) is out of range: a VLAN id is 1 to 4094")]
    Vlan {
        /// The NIC's tap.
        tap: String,
        /// The id given.
        vid: u16,
    },
    /// vhost-net asked for with something it cannot do.
    #[error("net.vhost (tap {tap}) cannot go with {why}")]
    NetVhost {
        /// The NIC's tap.
        tap: String,
        /// What it cannot go with.
        why: &'static str,
    },
    /// A NIC's queue pair count out of range.
    #[error(
        "net.queues = {queues} (tap {tap}) is out of range: 1 to {}",
        net::MAX_NET_QUEUES
    )]
    NetQueues {
        /// The NIC's tap.
        tap: String,
        /// The count given.
        queues: u16,
    },
    /// A MAC address that cannot be used.
    #[error("net.mac = {0:?} is not a unicast MAC address like 52:54:00:12:34:56")]
    Mac(String),
    /// A user-mode NIC's options do not hold together.
    #[error("net {index} (user-mode): {why}")]
    UserNet {
        /// The NIC's position.
        index: usize,
        /// What is wrong.
        why: String,
    },
    /// The same tap is given twice.
    #[error("net.tap = {0}: the same tap is configured twice")]
    DuplicateTap(String),
    /// Two disks or two NICs have the same API id.
    #[error("{what} id {id:?} is used twice")]
    DuplicateId {
        /// `drive` or `network interface`.
        what: &'static str,
        /// The id.
        id: String,
    },
    /// More than one disk is the root device.
    #[error("disks {0} and {1} are both the root device; at most one can be")]
    TwoRoots(usize, usize),
    /// Something Firecracker's configuration has that ember does not do
    /// yet; the message says what.
    #[error("{0}")]
    Unsupported(String),
    /// A Firecracker JSON config file cannot be parsed.
    #[error("invalid config file {}: {message}", .path.display())]
    Json {
        /// The file.
        path: PathBuf,
        /// What and where, on one line.
        message: String,
    },
    /// The command line is too long.
    #[error("boot.cmdline is {0} bytes long; the limit is {max} bytes", max = ember_memory::layout::CMDLINE_MAX_SIZE - 1)]
    CmdlineTooLong(usize),
    /// The virtio transport cannot be used as asked.
    #[error("machine.transport: {0}")]
    Transport(String),
    /// The boot protocol is not one ember has.
    #[error("boot.protocol: {0}")]
    BootProtocol(String),
}

/// The configuration file's contents.
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct VmConfig {
    /// `[machine]`.
    #[serde(default)]
    pub machine: MachineConfig,
    /// `[boot]`.
    #[serde(default)]
    pub boot: BootConfig,
    /// `[[disk]]`, in order: /dev/vda, /dev/vdb, ...
    #[serde(default)]
    pub disk: Vec<DiskConfig>,
    /// `[[net]]`, in order: eth0, eth1, ...
    #[serde(default)]
    pub net: Vec<NetConfig>,
    /// `[[numa]]`: guest NUMA nodes.
    #[serde(default)]
    pub numa: Vec<NumaConfig>,
    /// `[balloon]`: a virtio-balloon device.
    #[serde(default)]
    pub balloon: Option<ember_virtio_balloon::BalloonConfig>,
    /// `[vsock]`: a virtio-vsock device.
    #[serde(default)]
    pub vsock: Option<ember_virtio_vsock::VsockConfig>,
    /// `[entropy]`: a virtio-rng device.
    #[serde(default)]
    pub entropy: Option<ember_virtio_rng::EntropyConfig>,
}

/// Flags that override the file (or stand in for it).
#[derive(Clone, Debug, Default)]
pub struct Overrides {
    /// `--kernel`.
    pub kernel: Option<PathBuf>,
    /// `--initrd`.
    pub initrd: Option<PathBuf>,
    /// `--cmdline`.
    pub cmdline: Option<String>,
    /// `--vcpus`.
    pub vcpus: Option<u64>,
    /// `--memory`.
    pub memory: MemoryFlag,
    /// `--numa`, repeated: replace the file's nodes when given.
    pub numa: Vec<NumaConfig>,
    /// `--vcpu-affinity`.
    pub vcpu_affinity: Option<String>,
    /// `--balloon`.
    pub balloon: Option<ember_virtio_balloon::BalloonConfig>,
    /// `--vsock`.
    pub vsock: Option<ember_virtio_vsock::VsockConfig>,
    /// `--entropy`.
    pub entropy: Option<ember_virtio_rng::EntropyConfig>,
    /// `--cpu`.
    pub cpu: Option<String>,
    /// `--disk`, repeated: replace the file's disks when given.
    pub disks: Vec<DiskConfig>,
    /// `--net`, repeated: replace the file's NICs when given.
    pub nets: Vec<NetConfig>,
}

/// A configuration that passed validation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ValidConfig {
    /// Number of vCPUs.
    pub vcpus: u8,
    /// Guest memory in MiB.
    pub memory_mib: u64,
    /// Guest memory in a memfd, mapped shared.
    pub memory_shared: bool,
    /// How guest memory is backed (shared, huge pages, KSM, prefault).
    pub memory_backend: MemoryBackend,
    /// Guest NUMA nodes (none: no SRAT).
    pub numa: Vec<NumaNode>,
    /// Host CPUs per vCPU (empty: not pinned).
    pub vcpu_affinity: Vec<Vec<usize>>,
    /// The balloon, if any.
    pub balloon: Option<ember_virtio_balloon::BalloonConfig>,
    /// The vsock device, if any.
    pub vsock: Option<ember_virtio_vsock::VsockConfig>,
    /// The entropy device, if any.
    pub entropy: Option<ember_virtio_rng::EntropyConfig>,
    /// Dirty-page tracking for diff snapshots.
    pub track_dirty_pages: bool,
    /// The CPU model.
    pub cpu: CpuChoice,
    /// The kernel file.
    pub kernel: PathBuf,
    /// The initrd file.
    pub initrd: Option<PathBuf>,
    /// The kernel command line.
    pub cmdline: String,
    /// Disks, in order.
    pub disks: Vec<DiskConfig>,
    /// NICs, in order, with the MAC each gets.
    pub nets: Vec<(NetConfig, [u8; 6])>,
    /// The bus of every virtio device.
    pub transport: Transport,
    /// How the kernel is entered.
    pub boot_protocol: ember_loader::BootProtocol,
}

/// Formats a TOML error as "line L, column C: message" on one line.
fn toml_error_line(text: &str, e: &toml::de::Error) -> String {
    let msg = e.message().trim().replace('\n', " ");
    match e.span() {
        Some(span) => {
            let before = &text[..span.start.min(text.len())];
            let line = before.matches('\n').count() + 1;
            let col = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
            format!("line {line}, column {col}: {msg}")
        }
        None => msg,
    }
}

impl VmConfig {
    /// Parses TOML `text`; relative paths are made relative to `base`.
    /// `path` names the source in errors.
    pub fn from_toml(text: &str, path: &Path, base: &Path) -> Result<Self, ConfigError> {
        let mut cfg: VmConfig = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_owned(),
            message: toml_error_line(text, &e),
        })?;
        cfg.boot.resolve_paths(base);
        cfg.machine.resolve_paths(base);
        for d in &mut cfg.disk {
            d.resolve_path(base);
        }
        Ok(cfg)
    }

    /// Reads and parses the config file at `path`.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        let base = path.parent().unwrap_or(Path::new("."));
        Self::from_toml(&text, path, base)
    }

    /// Applies command-line flags over the file's values.
    pub fn apply(&mut self, o: &Overrides) {
        if let Some(k) = &o.kernel {
            self.boot.kernel = Some(k.clone());
        }
        if let Some(i) = &o.initrd {
            self.boot.initrd = Some(i.clone());
        }
        if let Some(c) = &o.cmdline {
            self.boot.cmdline = Some(c.clone());
        }
        if let Some(v) = o.vcpus {
            self.machine.vcpus = v;
        }
        let m = &o.memory;
        if let Some(size) = m.size_mib {
            self.machine.memory_mib = size;
        }
        for (flag, key) in [
            (m.shared, &mut self.machine.shared),
            (m.hugepages, &mut self.machine.hugepages),
            (m.thp, &mut self.machine.thp),
            (m.prefault, &mut self.machine.prefault),
            (m.mergeable, &mut self.machine.mergeable),
        ] {
            if let Some(v) = flag {
                *key = v;
            }
        }
        if let Some(h) = &m.hugepage_size {
            self.machine.hugepage_size = Some(h.clone());
        }
        if !o.numa.is_empty() {
            self.numa = o.numa.clone();
        }
        if let Some(a) = &o.vcpu_affinity {
            self.machine.vcpu_affinity = Some(a.clone());
        }
        if let Some(b) = o.balloon {
            self.balloon = Some(b);
        }
        if let Some(v) = &o.vsock {
            self.vsock = Some(v.clone());
        }
        if let Some(e) = &o.entropy {
            self.entropy = Some(e.clone());
        }
        if let Some(c) = &o.cpu {
            self.machine.cpu = Some(c.clone());
        }
        if !o.disks.is_empty() {
            self.disk = o.disks.clone();
        }
        if !o.nets.is_empty() {
            self.net = o.nets.clone();
        }
    }

    /// Validates everything that can be checked before touching KVM.
    pub fn validate(&self) -> Result<ValidConfig, ConfigError> {
        let vcpus = self.machine.validate()?;
        self.boot.validate()?;
        if self.disk.len() > disk::MAX_DISKS {
            return Err(ConfigError::TooManyDisks(self.disk.len()));
        }
        for (i, d) in self.disk.iter().enumerate() {
            d.validate(i)?;
            let canon = |p: &Path| std::fs::canonicalize(p).unwrap_or_else(|_| p.to_owned());
            if self.disk[..i]
                .iter()
                .any(|o| canon(&o.path) == canon(&d.path))
            {
                return Err(ConfigError::DuplicateDisk(d.path.clone()));
            }
        }
        if self.net.len() > net::MAX_NETS {
            return Err(ConfigError::TooManyNets(self.net.len()));
        }
        let mut nets = Vec::with_capacity(self.net.len());
        for (i, n) in self.net.iter().enumerate() {
            let mac = n.validate(i)?;
            if let Some(tap) = n.tap_name() {
                if self.net[..i].iter().any(|o| o.tap_name() == Some(tap)) {
                    return Err(ConfigError::DuplicateTap(tap.to_string()));
                }
            }
            let mut n = n.clone();
            // passt's frames carry no virtio-net header.
            if n.user.is_some() {
                n.offloads = false;
            }
            nets.push((n, mac));
        }
        check_unique_ids(
            "drive",
            self.disk.iter().enumerate().map(|(i, d)| d.drive_id(i)),
        )?;
        check_unique_ids(
            "network interface",
            self.net.iter().enumerate().map(|(i, n)| n.iface_id(i)),
        )?;
        let (mut disks, cmdline) = self.root_first()?;
        // One queue per vCPU unless the disk says otherwise; the number is
        // kept with the configuration a snapshot saves.
        for d in &mut disks {
            d.num_queues
                .get_or_insert(u16::from(vcpus).min(ember_virtio_blk::MAX_QUEUES));
        }
        if cmdline.len() >= ember_memory::layout::CMDLINE_MAX_SIZE {
            return Err(ConfigError::CmdlineTooLong(cmdline.len()));
        }
        let memory_backend = self.machine.memory_backend()?;
        let numa = numa::validate(&self.numa, vcpus, self.machine.memory_mib)?;
        if let Some(h) = memory_backend.hugepages {
            let mib = h.bytes() >> 20;
            if let Some((i, n)) = numa
                .iter()
                .enumerate()
                .find(|(_, n)| n.memory_mib % mib != 0)
            {
                return Err(ConfigError::Numa(format!(
                    "node {i}'s {} MiB is not a multiple of the {mib} MiB huge page",
                    n.memory_mib
                )));
            }
        }
        if let Some(b) = &self.balloon {
            balloon::validate(b, self.machine.memory_mib, &memory_backend)?;
        }
        if let Some(v) = &self.vsock {
            vsock::validate_vsock(v)?;
        }
        let vcpu_affinity = match &self.machine.vcpu_affinity {
            Some(a) => numa::parse_affinity(a, vcpus)?,
            None => vec![Vec::new(); usize::from(vcpus)],
        };
        Ok(ValidConfig {
            vcpus,
            memory_mib: self.machine.memory_mib,
            memory_shared: self.machine.shared,
            memory_backend,
            numa,
            vcpu_affinity,
            balloon: self.balloon,
            vsock: self.vsock.clone(),
            entropy: self.entropy.clone(),
            track_dirty_pages: self.machine.track_dirty_pages,
            cpu: self.machine.cpu_choice(),
            kernel: self.boot.kernel()?.to_owned(),
            initrd: self.boot.initrd.clone(),
            transport: self.machine.resolve_transport(&cmdline)?,
            boot_protocol: self.boot.protocol()?,
            cmdline,
            disks,
            nets,
        })
    }

    /// The disks with the root device first, and the command line naming
    /// it (`root=/dev/vda rw` or `ro`), as Firecracker does.
    fn root_first(&self) -> Result<(Vec<DiskConfig>, String), ConfigError> {
        let roots: Vec<usize> = (0..self.disk.len())
            .filter(|&i| self.disk[i].root)
            .collect();
        let mut cmdline = self.boot.cmdline().to_owned();
        let mut disks = self.disk.clone();
        // Ids by position are taken before the root moves to the front.
        for (i, d) in disks.iter_mut().enumerate() {
            d.drive_id = Some(d.drive_id(i));
        }
        match roots.as_slice() {
            [] => {}
            [r] => {
                let root = disks.remove(*r);
                let mode = if root.read_only { "ro" } else { "rw" };
                let arg = match &root.partuuid {
                    Some(p) => format!(" root=PARTUUID={p} {mode}"),
                    None => format!(" root=/dev/vda {mode}"),
                };
                insert_kernel_args(&mut cmdline, &arg);
                disks.insert(0, root);
            }
            [a, b, ..] => return Err(ConfigError::TwoRoots(*a, *b)),
        }
        Ok((disks, cmdline))
    }
}

/// Adds `args` (starting with a space) to the kernel's part of
/// `cmdline`: before `--`, since what follows it is init's.
pub fn insert_kernel_args(cmdline: &mut String, args: &str) {
    match cmdline
        .find(" -- ")
        .or(cmdline.starts_with("-- ").then_some(0))
    {
        Some(at) => cmdline.insert_str(at, args),
        None => cmdline.push_str(args),
    }
}

fn check_unique_ids(
    what: &'static str,
    ids: impl Iterator<Item = String>,
) -> Result<(), ConfigError> {
    let mut seen = std::collections::HashSet::new();
    for id in ids {
        if !seen.insert(id.clone()) {
            return Err(ConfigError::DuplicateId { what, id });
        }
    }
    Ok(())
}

impl crate::Vmm {
    /// The configuration this VM was built with (a restored VM's kernel
    /// path is empty: the kernel is in guest memory).
    pub fn config(&self) -> ValidConfig {
        ValidConfig {
            vcpus: self.saved.machine.vcpus,
            memory_mib: self.saved.machine.memory_mib,
            memory_shared: self.saved.machine.shared_memory,
            memory_backend: self.saved.machine.memory_backend,
            numa: self.saved.machine.numa.clone(),
            vcpu_affinity: self.saved.machine.vcpu_affinity.clone(),
            balloon: self.balloon_config().ok(),
            vsock: self.vsock.as_ref().map(|v| {
                v.lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .device()
                    .config()
                    .clone()
            }),
            entropy: self.entropy.as_ref().map(|e| {
                e.lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .device()
                    .config()
                    .clone()
            }),
            track_dirty_pages: self.track_dirty_pages,
            cpu: self.saved.cpu_choice.clone(),
            kernel: std::path::PathBuf::new(),
            initrd: None,
            cmdline: self.saved.machine.cmdline.clone(),
            transport: self.saved.machine.transport,
            boot_protocol: ember_loader::BootProtocol::Auto,
            disks: self.saved.disks.clone(),
            nets: self
                .saved
                .nets
                .iter()
                .cloned()
                .zip(self.nets.iter().map(|n| {
                    n.lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .device()
                        .state()
                        .mac
                }))
                .collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<VmConfig, ConfigError> {
        VmConfig::from_toml(text, Path::new("vm.toml"), Path::new("/etc/ember"))
    }

    #[test]
    fn config_full_example_parses_and_resolves_paths() {
        let c = parse(
            r#"
            [machine]
            vcpus = 2
            memory_mib = 512
            [boot]
            kernel = "vmlinux"
            initrd = "/abs/initramfs.cpio"
            cmdline = "console=ttyS0"
            "#,
        )
        .unwrap();
        assert_eq!(c.machine.vcpus, 2);
        assert_eq!(c.machine.memory_mib, 512);
        assert_eq!(
            c.boot.kernel.as_deref(),
            Some(Path::new("/etc/ember/vmlinux"))
        );
        assert_eq!(
            c.boot.initrd.as_deref(),
            Some(Path::new("/abs/initramfs.cpio"))
        );
        assert_eq!(c.boot.cmdline(), "console=ttyS0");
    }

    #[test]
    fn config_defaults_apply_to_missing_tables() {
        let c = parse("").unwrap();
        assert_eq!(c.machine, MachineConfig::default());
        assert_eq!(c.boot.cmdline(), boot::DEFAULT_CMDLINE);
    }

    #[test]
    fn config_unknown_key_is_an_error_naming_it() {
        let e = parse("[machine]\nvcpus = 1\ncpus = 2\n").unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains("cpus"), "{msg}");
        assert!(msg.contains("line 3"), "{msg}");
        assert!(!msg.contains('\n'));
    }

    #[test]
    fn config_unknown_table_is_an_error() {
        assert!(matches!(
            parse("[gpu]\nx = 1\n"),
            Err(ConfigError::Parse { .. })
        ));
    }

    #[test]
    fn config_malformed_toml_is_one_line() {
        let e = parse("[machine\nvcpus = \n").unwrap_err();
        assert!(matches!(e, ConfigError::Parse { .. }));
        assert!(!e.to_string().contains('\n'));
    }

    #[test]
    fn config_wrong_type_is_an_error() {
        assert!(parse("[machine]\nvcpus = \"two\"\n").is_err());
        assert!(parse("[machine]\nvcpus = -1\n").is_err());
    }

    #[test]
    fn validate_rejects_zero_and_too_many_vcpus() {
        let mut c = VmConfig::default();
        c.machine.vcpus = 0;
        assert!(matches!(c.machine.validate(), Err(ConfigError::Vcpus(0))));
        c.machine.vcpus = 255;
        assert!(matches!(c.machine.validate(), Err(ConfigError::Vcpus(255))));
        c.machine.vcpus = 1 << 40;
        assert!(matches!(c.machine.validate(), Err(ConfigError::Vcpus(_))));
    }

    #[test]
    fn validate_rejects_zero_memory() {
        let mut c = VmConfig::default();
        c.machine.memory_mib = 0;
        assert!(matches!(c.machine.validate(), Err(ConfigError::Memory(_))));
    }

    #[test]
    fn validate_requires_a_kernel_that_exists() {
        let c = VmConfig::default();
        assert!(matches!(c.validate(), Err(ConfigError::NoKernel)));
        let mut c = VmConfig::default();
        c.boot.kernel = Some("/nonexistent/vmlinux".into());
        let e = c.validate().unwrap_err();
        assert!(e.to_string().contains("/nonexistent/vmlinux"));
        c.boot.kernel = Some("/".into());
        assert!(matches!(c.validate(), Err(ConfigError::NotAFile { .. })));
    }

    #[test]
    fn validate_rejects_a_missing_initrd() {
        let exe = std::env::current_exe().unwrap();
        let mut c = VmConfig::default();
        c.boot.kernel = Some(exe);
        c.boot.initrd = Some("/nonexistent/initrd".into());
        let e = c.validate().unwrap_err();
        assert!(e.to_string().starts_with("boot.initrd"), "{e}");
    }

    #[test]
    fn machine_cpu_is_parsed_and_checked() {
        let c = parse("[machine]\ncpu = \"Cascadelake-Server,check\"\n[boot]\nkernel = \"a\"\n")
            .unwrap();
        assert_eq!(c.machine.cpu.as_deref(), Some("Cascadelake-Server,check"));
        assert!(c.machine.validate().is_ok());
        let t = VmConfig::from_toml(
            "[machine]\ncpu = \"t2s.json\"\n",
            Path::new("/etc/vm.toml"),
            Path::new("/etc/vms"),
        )
        .unwrap();
        assert_eq!(t.machine.cpu.as_deref(), Some("/etc/vms/t2s.json"));
        let bad = parse("[machine]\ncpu = \"Cascadelake-Server,+avx512vnnni\"\n").unwrap();
        let e = bad.machine.validate().unwrap_err().to_string();
        assert!(
            e.contains("machine.cpu") && e.contains("did you mean \"avx512vnni\""),
            "{e}"
        );
    }

    #[test]
    fn memory_flags_parse_sizes_and_shared_and_name_what_is_wrong() {
        let m = MemoryFlag::parse("512").unwrap();
        assert_eq!((m.size_mib, m.shared), (Some(512), None));
        let m = MemoryFlag::parse("size=256,shared=on").unwrap();
        assert_eq!((m.size_mib, m.shared), (Some(256), Some(true)));
        assert_eq!(MemoryFlag::parse("shared=off").unwrap().shared, Some(false));
        for (bad, needle) in [
            ("size=lots", "not a number"),
            ("shared=maybe", "expected on or off"),
            ("hugepages=yes", "hugepages=yes: expected on or off"),
            ("hugepage_size=4M", "expected 2M or 1G"),
            ("colour=red", "unknown key"),
            ("256,shared", "not KEY=VALUE"),
        ] {
            let e = MemoryFlag::parse(bad).unwrap_err().to_string();
            assert!(
                e.starts_with(&format!("--memory {bad}: ")) && e.contains(needle),
                "{e}"
            );
        }
        let c = parse("[machine]\nshared = true\n[boot]\nkernel = \"/k\"\n").unwrap();
        assert!(c.machine.shared);
        let m = MemoryFlag::parse("size=1024,hugepages=on,hugepage_size=1G,prefault=on").unwrap();
        assert_eq!(m.hugepages, Some(true));
        assert_eq!(m.hugepage_size.as_deref(), Some("1G"));
        assert_eq!(m.prefault, Some(true));
    }

    #[test]
    fn memory_backends_are_checked_as_a_whole() {
        let backend = |toml: &str| {
            parse(&format!("[machine]\n{toml}\n"))
                .unwrap()
                .machine
                .memory_backend()
        };
        let b = backend("memory_mib = 512\nhugepages = true").unwrap();
        assert_eq!(b.hugepages, Some(HugePageSize::Size2M));
        let b = backend("memory_mib = 2048\nhugepages = true\nhugepage_size = \"1G\"").unwrap();
        assert_eq!(b.hugepages, Some(HugePageSize::Size1G));
        let b = backend("thp = true\nmergeable = true\nprefault = true").unwrap();
        assert!(b.thp && b.mergeable && b.prefault && b.hugepages.is_none());
        for (toml, why) in [
            (
                "hugepage_size = \"2M\"",
                "hugepage_size is given without hugepages=on",
            ),
            ("hugepages = true\nthp = true", "exclude each other"),
            ("shared = true\nmergeable = true", "KSM merges neither"),
            (
                "memory_mib = 1000\nhugepages = true\nhugepage_size = \"1G\"",
                "not a multiple of the 1024 MiB huge page",
            ),
            (
                "hugepages = true\nhugepage_size = \"3M\"",
                "expected 2M or 1G",
            ),
        ] {
            let e = backend(toml).unwrap_err().to_string();
            assert!(e.starts_with("memory: ") && e.contains(why), "{toml}: {e}");
        }
    }

    #[test]
    fn numa_tables_and_affinity_validate_with_the_machine() {
        let c = parse(
            "[machine]\nvcpus = 2\nmemory_mib = 256\nvcpu_affinity = \"0=0,1=0\"\n[boot]\nkernel = \"/k\"\n\
             [[numa]]\nnode = 0\ncpus = \"0\"\nmemory_mib = 128\nhost_node = 0\npolicy = \"preferred\"\n\
             [[numa]]\nnode = 1\ncpus = \"1\"\nmemory_mib = 128\ndistances = \"0:15\"\n",
        )
        .unwrap();
        assert_eq!(c.numa.len(), 2);
        assert_eq!(c.numa[0].policy, Some(NumaPolicy::Preferred));
        let e = parse("[[numa]]\nnode = 0\ncpus = \"0\"\nmemory = 5\n").unwrap_err();
        assert!(e.to_string().contains("unknown field `memory`"), "{e}");
    }

    #[test]
    fn overrides_replace_file_values() {
        let mut c = parse("[machine]\nvcpus = 2\n[boot]\nkernel = \"a\"\n").unwrap();
        c.apply(&Overrides {
            kernel: Some("/k".into()),
            vcpus: Some(4),
            memory: MemoryFlag::parse("size=256,shared=on,mergeable=on,thp=on").unwrap(),
            cmdline: Some("quiet".into()),
            initrd: None,
            cpu: Some("EPYC-Rome,-sha-ni".into()),
            disks: vec![],
            nets: vec![],
            numa: vec![NumaConfig::parse_flag("node=0,cpus=0-3,memory=256").unwrap()],
            vcpu_affinity: Some("0=0".into()),
            balloon: None,
            vsock: None,
            entropy: None,
        });
        assert!(c.machine.mergeable && c.machine.thp && !c.machine.hugepages);
        assert_eq!(c.numa.len(), 1);
        assert_eq!(c.machine.vcpu_affinity.as_deref(), Some("0=0"));
        assert_eq!(c.machine.cpu.as_deref(), Some("EPYC-Rome,-sha-ni"));
        assert_eq!(c.machine.vcpus, 4);
        assert_eq!(c.machine.memory_mib, 256);
        assert!(c.machine.shared);
        assert_eq!(c.boot.kernel.as_deref(), Some(Path::new("/k")));
        assert_eq!(c.boot.cmdline(), "quiet");
    }

    #[test]
    fn config_disks_parse_in_order_with_resolved_paths() {
        let c = parse(
            "[[disk]]\npath = \"root.ext4\"\n[[disk]]\npath = \"/d.img\"\nread_only = true\nid = \"data\"\n",
        )
        .unwrap();
        assert_eq!(c.disk.len(), 2);
        assert_eq!(c.disk[0].path, Path::new("/etc/ember/root.ext4"));
        assert!(!c.disk[0].read_only);
        assert_eq!(c.disk[1].id.as_deref(), Some("data"));
        assert!(c.disk[1].read_only);
    }

    #[test]
    fn config_disk_unknown_key_is_an_error() {
        assert!(parse("[[disk]]\npath = \"a\"\nbus = \"ide\"\n").is_err());
    }

    #[test]
    fn disk_flag_parses_and_rejects() {
        let d = DiskConfig::parse_flag("path=/a.img,read_only=on,id=x").unwrap();
        assert_eq!(
            (d.path.as_path(), d.read_only, d.id.as_deref()),
            (Path::new("/a.img"), true, Some("x"))
        );
        assert!(!DiskConfig::parse_flag("path=/a").unwrap().read_only);
        for bad in [
            "",
            "read_only=on",
            "path=/a,read_only=maybe",
            "path=/a,bus=ide",
            "path",
        ] {
            assert!(DiskConfig::parse_flag(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn validate_rejects_too_many_disks_long_ids_and_duplicates() {
        let exe = std::env::current_exe().unwrap();
        let disk = |id: Option<&str>| DiskConfig {
            path: exe.clone(),
            read_only: false,
            id: id.map(str::to_string),
            drive_id: None,
            root: false,
            format: disk::ImageFormat::Raw,
            partuuid: None,
            num_queues: None,
            queue_size: None,
            rate_limiter: None,
            io: Default::default(),
            cache: Default::default(),
            iothread: false,
            werror: Default::default(),
            rerror: Default::default(),
        };
        let mut c = VmConfig::default();
        c.boot.kernel = Some(exe.clone());
        c.disk = vec![disk(None); 9];
        assert!(matches!(c.validate(), Err(ConfigError::TooManyDisks(9))));
        c.disk = vec![disk(Some("x".repeat(21).as_str()))];
        assert!(matches!(
            c.validate(),
            Err(ConfigError::DiskId { index: 0, len: 21 })
        ));
        c.disk = vec![disk(None), disk(None)];
        assert!(matches!(c.validate(), Err(ConfigError::DuplicateDisk(_))));
    }

    #[test]
    fn validate_rejects_an_overlong_cmdline() {
        let exe = std::env::current_exe().unwrap();
        let mut c = VmConfig::default();
        c.boot.kernel = Some(exe);
        c.boot.cmdline = Some("x".repeat(5000));
        assert!(matches!(
            c.validate(),
            Err(ConfigError::CmdlineTooLong(5000))
        ));
    }
}
