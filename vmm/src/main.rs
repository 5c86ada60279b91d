//! `ember`: boot a microVM from a config file and/or flags.

use std::os::fd::AsFd;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use clap::{Args, Parser, Subcommand};
use ember_vmm::config::{ConfigError, DiskConfig, NetConfig, Overrides, ValidConfig, VmConfig};
use ember_vmm::instance::{Instance, InstanceOptions};
use ember_vmm::jail::{parse_cgroup_flag, JailOptions};
use ember_vmm::signals::StopSignals;
use ember_vmm::terminal::RawTerminal;
use ember_vmm::{error_chain, seccomp, Console};

/// Ember: a minimal KVM microVM monitor.
#[derive(Debug, Parser)]
#[command(
    name = "ember",
    about,
    disable_version_flag = true,
    args_conflicts_with_subcommands = true
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    vm: VmArgs,
    #[command(flatten)]
    fc: FirecrackerArgs,
    #[command(flatten)]
    restore: RestoreArgs,
}

/// Restoring a snapshot from the command line, for users without an API
/// client.
#[derive(Debug, Args)]
struct RestoreArgs {
    /// Restore the snapshot whose state file this is, instead of booting
    /// (with --restore-mem). The VM waits paused for `PATCH /vm` unless
    /// --resume is given.
    #[arg(
        long,
        value_name = "FILE",
        requires = "restore_mem",
        conflicts_with_all = ["config", "kernel", "initrd", "cmdline", "vcpus", "memory", "cpu", "disk", "net", "config_file"]
    )]
    restore: Option<PathBuf>,
    /// The snapshot's memory file (mapped copy-on-write: nothing is read
    /// up front).
    #[arg(long, value_name = "FILE", requires = "restore")]
    restore_mem: Option<PathBuf>,
    /// Run the restored guest at once.
    #[arg(long, requires = "restore")]
    resume: bool,
    /// Reopen a NIC on another tap: `IFACE_ID=TAP` (net0, net1, ... by
    /// position unless the snapshot's NIC had an id). Repeat for more.
    #[arg(long, value_name = "IFACE_ID=TAP", requires = "restore")]
    restore_net: Vec<String>,
    /// Reopen a disk from another image: `DRIVE_ID=PATH` (drive0, ...).
    /// Repeat for more.
    #[arg(long, value_name = "DRIVE_ID=PATH", requires = "restore")]
    restore_disk: Vec<String>,
    /// Track the pages the restored guest dirties, for diff snapshots of it.
    #[arg(long, requires = "restore")]
    restore_track_dirty_pages: bool,
    /// Receive a live migration instead of booting (QEMU's `-incoming`):
    /// listen at `tcp:IP:PORT` or `unix:PATH` for one source, then run
    /// the guest it sends.
    #[arg(
        long,
        value_name = "URL",
        conflicts_with_all = ["restore", "config", "kernel", "initrd", "cmdline", "vcpus", "memory", "cpu", "disk", "net", "config_file"]
    )]
    incoming: Option<String>,
}

impl RestoreArgs {
    fn params(&self) -> ember_vmm::Result<Option<ember_vmm::snapshot::LoadParams>> {
        let (Some(state), Some(mem)) = (&self.restore, &self.restore_mem) else {
            return Ok(None);
        };
        let pair = |flag: &str, v: &str| -> ember_vmm::Result<(String, String)> {
            v.split_once('=')
                .filter(|(k, v)| !k.is_empty() && !v.is_empty())
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .ok_or_else(|| {
                    ember_vmm::Error::Restore(format!("{flag} {v:?}: expected ID=VALUE"))
                })
        };
        Ok(Some(ember_vmm::snapshot::LoadParams {
            state_path: state.clone(),
            memory: ember_vmm::snapshot::MemorySource::File(mem.clone()),
            network_overrides: self
                .restore_net
                .iter()
                .map(|v| pair("--restore-net", v))
                .collect::<Result<_, _>>()?,
            disk_overrides: self
                .restore_disk
                .iter()
                .map(|v| pair("--restore-disk", v).map(|(k, p)| (k, PathBuf::from(p))))
                .collect::<Result<_, _>>()?,
            track_dirty_pages: self.restore_track_dirty_pages,
            vsock_override: None,
        }))
    }
}

/// Firecracker's command line, for orchestrators that drive ember as they
/// drive Firecracker.
#[derive(Debug, Args)]
struct FirecrackerArgs {
    /// Serve Firecracker's HTTP API on this Unix socket (mode 0600; a stale
    /// socket file is replaced). Without a VM configuration, ember waits
    /// for one through the API.
    #[arg(long, value_name = "PATH")]
    api_sock: Option<PathBuf>,
    /// A Firecracker JSON config file (boot-source, drives, machine-config,
    /// network-interfaces); the VM starts at once.
    #[arg(
        long,
        value_name = "FILE",
        conflicts_with_all = ["config", "kernel", "initrd", "cmdline", "vcpus", "memory", "cpu", "disk", "net"]
    )]
    config_file: Option<PathBuf>,
    /// Do not serve the API (the default without --api-sock); needs a VM
    /// configuration.
    #[arg(long, conflicts_with = "api_sock")]
    no_api: bool,
    /// The VM's id, reported by `GET /`.
    #[arg(long, value_name = "ID", default_value = "anonymous-instance")]
    id: String,
    /// Firecracker's log level: Error, Warning, Info, Debug, Trace or Off
    /// (overrides --log-level).
    #[arg(long, value_name = "LEVEL", value_parser = parse_fc_level)]
    level: Option<log::LevelFilter>,
    /// Write the log to this file or named pipe (appended; reopened on
    /// SIGHUP) instead of stderr, in Firecracker's format.
    #[arg(long, value_name = "PATH")]
    log_path: Option<PathBuf>,
    /// Write Firecracker's metrics (one JSON object a line) to this file or
    /// named pipe, every 60 s and on FlushMetrics.
    #[arg(long, value_name = "PATH")]
    metrics_path: Option<PathBuf>,
    /// Print the version (`ember v<semver>`) and exit.
    #[arg(long)]
    version: bool,
    /// Firecracker's `--enable-pci`: the virtio devices on PCI (as
    /// `--transport pci`; without it a Firecracker guest's `pci=off` picks
    /// virtio-mmio).
    #[arg(long, conflicts_with = "transport")]
    enable_pci: bool,
}

/// Firecracker's level names (any case), and ember's.
fn parse_fc_level(s: &str) -> Result<log::LevelFilter, String> {
    match s.to_ascii_lowercase().as_str() {
        "warning" => Ok(log::LevelFilter::Warn),
        other => other
            .parse()
            .map_err(|_| format!("invalid level `{s}` (Error, Warning, Info, Debug, Trace, Off)")),
    }
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the VM jailed (as root): a new mount namespace pivoted into DIR
    /// holding only what the VM needs, an unprivileged uid/gid with no
    /// capabilities, optionally a network namespace, a new PID namespace
    /// and cgroup limits. Everything it creates is removed after the VM exits.
    Jail(Box<JailArgs>),
    /// Work on snapshot files.
    #[command(subcommand)]
    Snapshot(SnapshotCommand),
    /// CPU models: list them, show what a guest would get on this host.
    #[command(subcommand)]
    Cpu(CpuCommand),
    /// Disk images (raw, qcow2): create, info, check, convert, resize, with
    /// qemu-img's syntax.
    #[command(subcommand)]
    Img(ember_vmm::img::ImgCommand),
}

#[derive(Debug, Subcommand)]
enum CpuCommand {
    /// Every model, one a line, with whether this host can run it.
    List {
        /// JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// A model as a guest would get it here: vendor, family/model/stepping,
    /// features, what the host lacks, what ember hides, the CPUID leaves.
    Show {
        /// `MODEL[,+FEATURE][,-FEATURE]`.
        #[arg(value_name = "MODEL")]
        model: String,
        /// JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Every feature name ember knows, and the CPUID bit or MSR bit it is.
    Features {
        /// JSON instead of text.
        #[arg(long)]
        json: bool,
    },
}

fn run_cpu(cmd: CpuCommand) -> ember_vmm::Result<i32> {
    let text = match cmd {
        CpuCommand::Features { json } => ember_vmm::cpu::feature_list(json),
        CpuCommand::List { json } => {
            ember_vmm::cpu::list(&ember_vmm::vm::Hypervisor::open()?, json)?
        }
        CpuCommand::Show { model, json } => {
            ember_vmm::cpu::show(&ember_vmm::vm::Hypervisor::open()?, &model, json)?
        }
    };
    print!("{text}");
    if !text.ends_with('\n') {
        println!();
    }
    Ok(0)
}

#[derive(Debug, Subcommand)]
enum SnapshotCommand {
    /// Applies a diff snapshot's memory file onto the memory file of the
    /// snapshot it follows (in place), as Firecracker's `snapshot-editor
    /// edit-memory rebase`: the result loads with the diff's state file.
    Rebase {
        /// The base memory file (a full snapshot's, or one already rebased).
        #[arg(long, value_name = "FILE")]
        memory_path: PathBuf,
        /// The diff snapshot's memory file.
        #[arg(long, value_name = "FILE")]
        diff_path: PathBuf,
    },
}

fn run_snapshot(cmd: SnapshotCommand) -> ember_vmm::Result<i32> {
    match cmd {
        SnapshotCommand::Rebase {
            memory_path,
            diff_path,
        } => {
            let io = |path: &std::path::Path, what: &str, source| {
                ember_vmm::Error::Snapshot(ember_snapshot::Error::Memory {
                    path: path.display().to_string(),
                    what: what.into(),
                    source,
                })
            };
            let base = std::fs::OpenOptions::new()
                .write(true)
                .open(&memory_path)
                .map_err(|e| io(&memory_path, "cannot open", e))?;
            let diff =
                std::fs::File::open(&diff_path).map_err(|e| io(&diff_path, "cannot open", e))?;
            let copied = ember_snapshot::memory::apply_diff(&base, &diff)
                .map_err(|e| io(&memory_path, "cannot apply the diff", e))?;
            base.sync_all()
                .map_err(|e| io(&memory_path, "cannot sync", e))?;
            log::info!(
                "{} bytes of {} applied onto {}",
                copied,
                diff_path.display(),
                memory_path.display()
            );
            Ok(0)
        }
    }
}

#[derive(Debug, Args)]
struct JailArgs {
    /// The jail directory; it must exist and becomes the VM's root.
    #[arg(long, value_name = "DIR")]
    dir: PathBuf,
    /// The uid the VM runs as.
    #[arg(long, value_name = "UID")]
    uid: u32,
    /// The gid the VM runs as.
    #[arg(long, value_name = "GID")]
    gid: u32,
    /// The jail's id, naming its cgroup (default ember-PID).
    #[arg(long, value_name = "ID")]
    id: Option<String>,
    /// Allow running the VM as uid or gid 0.
    #[arg(long)]
    allow_root: bool,
    /// A network namespace to join, e.g. /var/run/netns/NAME.
    #[arg(long, value_name = "PATH")]
    netns: Option<PathBuf>,
    /// Run the VM as PID 1 of a new PID namespace.
    #[arg(long)]
    new_pid_ns: bool,
    /// A cgroup limit as a cgroup v2 file and value, e.g.
    /// cpu.max="50000 100000" or memory.max=512M. Repeatable.
    #[arg(long, value_name = "KEY=VALUE", value_parser = parse_cgroup_flag)]
    cgroup: Vec<(String, String)>,
    /// Force cgroup version 1 or 2 (default: what the host has).
    #[arg(long, value_name = "1|2", value_parser = clap::value_parser!(u8).range(1..=2))]
    cgroup_version: Option<u8>,
    /// RLIMIT_NOFILE of the VM.
    #[arg(long, value_name = "N", default_value_t = ember_jail::DEFAULT_MAX_OPEN_FILES)]
    max_open_files: u64,
    /// RLIMIT_FSIZE of the VM, in bytes.
    #[arg(long, value_name = "BYTES")]
    max_file_size: Option<u64>,
    /// Serve the API on /run/NAME inside the jail (DIR/run/NAME on the
    /// host). Without a VM configuration, the VM is configured through it.
    #[arg(long, value_name = "NAME")]
    api_sock: Option<String>,
    #[command(flatten)]
    vm: VmArgs,
}

/// The VM, from a config file and flags.
#[derive(Debug, Args)]
struct VmArgs {
    /// The VM's TOML config file. Flags override its values.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Kernel to boot: an ELF vmlinux or a bzImage.
    #[arg(long, value_name = "PATH")]
    kernel: Option<PathBuf>,
    /// Initrd / initramfs to load.
    #[arg(long, value_name = "PATH")]
    initrd: Option<PathBuf>,
    /// Kernel command line.
    #[arg(long, value_name = "STR")]
    cmdline: Option<String>,
    /// Number of vCPUs.
    #[arg(long, value_name = "N")]
    vcpus: Option<u64>,
    /// Guest memory: `MIB`, or `size=MIB[,shared=on][,hugepages=on][,hugepage_size=2M|1G][,thp=on][,prefault=on][,mergeable=on]`
    /// (shared: in a memfd, which a local live migration hands over instead of
    /// copying; hugepages: hugetlbfs pages reserved up front; thp: transparent
    /// huge pages; prefault: touched before the guest runs; mergeable: KSM
    /// may merge identical pages).
    #[arg(long, value_name = "MIB")]
    memory: Option<String>,
    /// A guest NUMA node: `node=ID,cpus=LIST,memory=MIB[,host_node=N][,policy=bind|preferred][,distances=NODE:DIST,...]`.
    /// Repeat for each node (ids 0 to N-1; the nodes' memory adds up to
    /// --memory); replaces the config file's nodes.
    #[arg(long, value_name = "SPEC")]
    numa: Vec<String>,
    /// Pin vCPU threads to host CPUs: `VCPU=CPU[,CPU...][,VCPU=CPU...]`, e.g. `0=2,1=3`.
    #[arg(long, value_name = "SPEC")]
    vcpu_affinity: Option<String>,
    /// A virtio-balloon: `amount_mib=MIB[,deflate_on_oom=on][,stats_polling_interval_s=S][,free_page_reporting=on]`.
    #[arg(long, value_name = "SPEC")]
    balloon: Option<String>,
    /// A virtio-vsock with Firecracker's host side: `cid=CID,uds_path=PATH`
    /// (host programs connect to PATH and write `CONNECT <port>`; the
    /// guest's connections to host port P reach `PATH_P`).
    #[arg(long, value_name = "SPEC")]
    vsock: Option<String>,
    /// A virtio-rng fed from the host's getrandom(2): `on`, or a rate
    /// limit `bw=SIZE/TIME[,ops=SIZE/TIME]`.
    #[arg(long, value_name = "SPEC", num_args = 0..=1, default_missing_value = "on")]
    entropy: Option<String>,
    /// The guest's CPU model, as QEMU's -cpu:
    /// `MODEL[,+FEATURE][,-FEATURE][,enforce|,check]` (default `host`;
    /// `ember cpu list` lists the models). A `.json` file is a Firecracker
    /// custom CPU template.
    #[arg(long, value_name = "MODEL")]
    cpu: Option<String>,
    /// A virtio-blk disk: `path=FILE[,read_only=on][,id=ID]`. Repeat for more
    /// disks (vda, vdb, ... in order); replaces the config file's disks.
    #[arg(long, value_name = "SPEC")]
    disk: Vec<String>,
    /// A virtio-net NIC on an existing tap:
    /// `tap=NAME[,mac=MAC][,offloads=off][,vlan=ID]`, or on user-mode
    /// networking (passt): `user[,hostfwd=tcp:[ADDR]:PORT-:PORT]...
    /// [,socket=PATH][,mac=MAC]`. Repeat for more (eth0, eth1, ...);
    /// replaces the config file's NICs.
    #[arg(long, value_name = "SPEC")]
    net: Vec<String>,
    /// How the kernel is entered: auto (default: PVH when the ELF kernel
    /// has the PVH note, else the 64-bit entry), linux64 or pvh.
    #[arg(long, value_name = "auto|linux64|pvh")]
    boot_protocol: Option<String>,
    /// How the virtio devices reach the guest: pci or mmio (default: mmio
    /// when the command line says pci=off, else pci).
    #[arg(long, value_name = "pci|mmio")]
    transport: Option<String>,
    /// Where the guest's console (COM1) goes: stdio (default), null,
    /// file=PATH (output appended) or socket=PATH (a Unix socket: one
    /// client at a time reads the output and types the input).
    #[arg(long, value_name = "SPEC", default_value = "stdio")]
    serial: ember_vmm::console::SerialSpec,
    /// Seccomp filters: on (a forbidden syscall kills ember after one line
    /// naming it), log (allowed and logged by the kernel, to build the
    /// lists) or off.
    #[arg(long, value_name = "MODE", default_value = "on")]
    seccomp: seccomp::Mode,
    /// Log level on stderr: off, error, warn, info, debug, trace.
    #[arg(long, value_name = "LEVEL", default_value = "warn")]
    log_level: log::LevelFilter,
}

/// Installs ember's logger: `level` for every module, `RUST_LOG`-style
/// module filters from the environment, on stderr or in `path`.
fn init_logging(
    level: log::LevelFilter,
    path: Option<&std::path::Path>,
    id: &str,
) -> Result<(), String> {
    let settings = ember_vmm::logger::LogSettings {
        level,
        modules: std::env::var("RUST_LOG").ok().filter(|m| !m.is_empty()),
        path: path.map(std::path::Path::to_path_buf),
        ..Default::default()
    };
    ember_vmm::logger::init(settings, id).map_err(|e| error_chain(&e))
}

/// Whether the flags describe a VM (a file or any VM flag).
fn has_vm_config(cli: &VmArgs) -> bool {
    cli.config.is_some()
        || cli.kernel.is_some()
        || cli.initrd.is_some()
        || cli.cmdline.is_some()
        || cli.vcpus.is_some()
        || cli.memory.is_some()
        || !cli.disk.is_empty()
        || !cli.net.is_empty()
        || cli.transport.is_some()
        || cli.boot_protocol.is_some()
}

/// The validated VM config from the config file and flags.
fn vm_config(cli: VmArgs) -> ember_vmm::Result<ValidConfig> {
    Ok(vm_config_unchecked(cli)?.validate()?)
}

/// The VM config from the config file and flags, not yet validated.
fn vm_config_unchecked(cli: VmArgs) -> ember_vmm::Result<VmConfig> {
    let mut cfg = match &cli.config {
        Some(path) => VmConfig::from_file(path)?,
        None => VmConfig::default(),
    };
    let memory = match &cli.memory {
        Some(m) => ember_vmm::config::MemoryFlag::parse(m)?,
        None => Default::default(),
    };
    let disks = cli
        .disk
        .iter()
        .map(|d| DiskConfig::parse_flag(d))
        .collect::<Result<Vec<_>, _>>()?;
    let nets = cli
        .net
        .iter()
        .map(|n| NetConfig::parse_flag(n))
        .collect::<Result<Vec<_>, _>>()?;
    let balloon = cli
        .balloon
        .as_deref()
        .map(ember_vmm::config::balloon::parse_flag)
        .transpose()?;
    let vsock = cli
        .vsock
        .as_deref()
        .map(ember_vmm::config::vsock::parse_vsock)
        .transpose()?;
    let entropy = cli
        .entropy
        .as_deref()
        .map(ember_vmm::config::vsock::parse_entropy)
        .transpose()?;
    let numa = cli
        .numa
        .iter()
        .map(|n| ember_vmm::config::NumaConfig::parse_flag(n))
        .collect::<Result<Vec<_>, _>>()?;
    cfg.apply(&Overrides {
        kernel: cli.kernel,
        initrd: cli.initrd,
        cmdline: cli.cmdline,
        vcpus: cli.vcpus,
        memory,
        cpu: cli.cpu,
        disks,
        nets,
        numa,
        vcpu_affinity: cli.vcpu_affinity,
        balloon,
        vsock,
        entropy,
    });
    if let Some(t) = &cli.transport {
        cfg.machine.transport = Some(t.parse()?);
    }
    if let Some(p) = &cli.boot_protocol {
        cfg.boot.protocol = Some(p.clone());
    }
    Ok(cfg)
}

fn run_jailed(args: JailArgs) -> ember_vmm::Result<i32> {
    if args.vm.serial != ember_vmm::console::SerialSpec::Stdio {
        return Err(ember_vmm::Error::Serial(format!(
            "ember jail: --serial {} is not passed into the jail; the jailed guest's console is ember jail's own stdin and stdout (redirect them)",
            args.vm.serial
        )));
    }
    let opts = JailOptions {
        dir: args.dir,
        uid: args.uid,
        gid: args.gid,
        id: args.id,
        allow_root: args.allow_root,
        netns: args.netns,
        new_pid_ns: args.new_pid_ns,
        cgroup: args.cgroup,
        cgroup_version: args.cgroup_version.map(|v| match v {
            1 => ember_jail::CgroupVersion::V1,
            _ => ember_jail::CgroupVersion::V2,
        }),
        max_open_files: args.max_open_files,
        max_file_size: args.max_file_size,
        seccomp: args.vm.seccomp,
        log_level: args.vm.log_level,
        api_sock: args.api_sock,
    };
    if opts.api_sock.is_some() && !has_vm_config(&args.vm) {
        return ember_vmm::jail::run(None, &opts);
    }
    let cfg = vm_config(args.vm)?;
    ember_vmm::jail::run(Some(&cfg), &opts)
}

/// A Firecracker JSON config file as ember's configuration.
fn fc_config_file(path: &std::path::Path) -> ember_vmm::Result<VmConfig> {
    let read_err = |source| ConfigError::Read {
        path: path.to_owned(),
        source,
    };
    let text = std::fs::read_to_string(path).map_err(read_err)?;
    let full: ember_api::model::FullVmConfiguration =
        serde_json::from_str(&text).map_err(|e| ConfigError::Json {
            path: path.to_owned(),
            message: e.to_string().replace('\n', " "),
        })?;
    Ok(ember_vmm::config::firecracker::from_api(&full)?)
}

fn run(
    cli: VmArgs,
    fc: FirecrackerArgs,
    restore: RestoreArgs,
    started: Instant,
) -> ember_vmm::Result<i32> {
    let mode = cli.seccomp;
    let serial = cli.serial.clone();
    let load = restore.params()?;
    if load.is_some() && !restore.resume && fc.api_sock.is_none() {
        return Err(ember_vmm::Error::Restore(
            "--restore without --api-sock needs --resume (nothing else could resume the VM)".into(),
        ));
    }
    let configured = has_vm_config(&cli) || fc.config_file.is_some();
    let mut cfg = match &fc.config_file {
        Some(path) => fc_config_file(path)?,
        None => vm_config_unchecked(cli)?,
    };
    if fc.enable_pci {
        cfg.machine.transport = Some(ember_vmm::config::Transport::Pci);
    }
    if configured {
        // Checked in full before anything is created.
        cfg.validate()?;
    } else if fc.api_sock.is_none() && load.is_none() && restore.incoming.is_none() {
        return Err(ConfigError::NoKernel.into());
    }
    let filters = seccomp::Filters::new(mode)?;
    match mode {
        seccomp::Mode::On => {}
        seccomp::Mode::Log => log::warn!(
            "seccomp in log mode: forbidden syscalls are allowed and logged by the kernel (dmesg, audit type=1326)"
        ),
        seccomp::Mode::Off => log::warn!("seccomp is off: the threads run without filters"),
    }
    // Before any thread exists, so every thread inherits the mask.
    let signals = StopSignals::block().map_err(ember_vmm::Error::Signals)?;
    let server = match &fc.api_sock {
        Some(path) => Some(ember_api::Server::bind(path)?),
        None => None,
    };
    let console = Console::open(&serial)?;
    let stdin = std::io::stdin();
    // Restored when this function returns, whichever way (stdin is the
    // console's input only with --serial stdio).
    let _raw = (serial == ember_vmm::console::SerialSpec::Stdio)
        .then(|| RawTerminal::enter(stdin.as_fd()));
    let opts = InstanceOptions {
        id: fc.id.clone(),
        filters,
        started,
    };
    let mut instance = Instance::new(opts, console, signals, server)?;
    if let Some(path) = &fc.metrics_path {
        instance
            .set_metrics(path, false, Default::default())
            .map_err(|e| ember_vmm::Error::Lifecycle(error_chain(&e)))?;
    }
    if let Some(url) = &restore.incoming {
        let url = ember_vmm::migration::parse_url(url)?;
        match instance.receive_migration(&url) {
            // A stop signal while waiting for the source: the loop below
            // reads it and ends as any signal does.
            Err(ember_vmm::Error::Interrupted) => {}
            r => r?,
        }
    } else if let Some(load) = &load {
        instance.load_snapshot(load, restore.resume)?;
    } else if configured {
        instance.configure(cfg)?;
        instance.start()?;
    } else if fc.enable_pci {
        // Configured through the API on top of this.
        instance.configure(cfg)?;
    }
    let reason = instance.run()?;
    log::info!("guest ended: {reason:?}");
    Ok(reason.code())
}

fn main() -> ExitCode {
    let started = Instant::now();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if e.use_stderr() => {
            // One line: clap's first line names the problem.
            let text = e.to_string();
            let first = text.lines().next().unwrap_or("invalid arguments");
            eprintln!("ember: {}", first.trim_start_matches("error: "));
            return ExitCode::from(2);
        }
        Err(e) => {
            // --help, --version.
            let _ = e.print();
            return ExitCode::SUCCESS;
        }
    };
    if cli.fc.version {
        println!("ember v{}", env!("CARGO_PKG_VERSION"));
        return ExitCode::SUCCESS;
    }
    let result = match cli.command {
        Some(Command::Snapshot(cmd)) => {
            if let Err(e) = init_logging(cli.vm.log_level, None, "snapshot") {
                eprintln!("ember: error: {e}");
                return ExitCode::FAILURE;
            }
            run_snapshot(cmd)
        }
        Some(Command::Cpu(cmd)) => {
            if let Err(e) = init_logging(cli.vm.log_level, None, "cpu") {
                eprintln!("ember: error: {e}");
                return ExitCode::FAILURE;
            }
            run_cpu(cmd)
        }
        Some(Command::Img(cmd)) => {
            if let Err(e) = init_logging(cli.vm.log_level, None, "img") {
                eprintln!("ember: error: {e}");
                return ExitCode::FAILURE;
            }
            match ember_vmm::img::run(cmd) {
                Ok(code) => return ExitCode::from(u8::try_from(code).unwrap_or(1)),
                Err(e) => {
                    eprintln!("ember img: error: {}", error_chain(&e));
                    return ExitCode::FAILURE;
                }
            }
        }
        Some(Command::Jail(args)) => {
            if let Err(e) = init_logging(args.vm.log_level, None, "jail") {
                eprintln!("ember: error: {e}");
                return ExitCode::FAILURE;
            }
            run_jailed(*args)
        }
        None => {
            let level = cli.fc.level.unwrap_or(cli.vm.log_level);
            if let Err(e) = init_logging(level, cli.fc.log_path.as_deref(), &cli.fc.id) {
                eprintln!("ember: error: {e}");
                return ExitCode::FAILURE;
            }
            run(cli.vm, cli.fc, cli.restore, started)
        }
    };
    match result {
        Ok(code) => ExitCode::from(u8::try_from(code).unwrap_or(1)),
        Err(e) => {
            eprintln!("ember: error: {}", error_chain(&e));
            ExitCode::FAILURE
        }
    }
}
