//! `ember`: boot a microVM from a config file and/or flags.

use std::io::Write;
use std::os::fd::AsFd;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use clap::{Args, Parser, Subcommand};
use ember_vmm::config::{DiskConfig, NetConfig, Overrides, ValidConfig, VmConfig};
use ember_vmm::jail::{parse_cgroup_flag, JailOptions};
use ember_vmm::terminal::RawTerminal;
use ember_vmm::{error_chain, seccomp, Console, Vmm};

/// Ember: a minimal KVM microVM monitor.
#[derive(Debug, Parser)]
#[command(name = "ember", version, about, args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    #[command(flatten)]
    vm: VmArgs,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the VM jailed (as root): a new mount namespace pivoted into DIR
    /// holding only what the VM needs, an unprivileged uid/gid with no
    /// capabilities, optionally a network namespace, a new PID namespace
    /// and cgroup limits. Everything it creates is removed after the VM exits.
    Jail(JailArgs),
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
    /// Guest memory in MiB.
    #[arg(long, value_name = "MIB")]
    memory: Option<u64>,
    /// A virtio-blk disk: `path=FILE[,read_only=on][,id=ID]`. Repeat for more
    /// disks (vda, vdb, ... in order); replaces the config file's disks.
    #[arg(long, value_name = "SPEC")]
    disk: Vec<String>,
    /// A virtio-net NIC on an existing tap: `tap=NAME[,mac=MAC][,offloads=off]`.
    /// Repeat for more (eth0, eth1, ...); replaces the config file's NICs.
    #[arg(long, value_name = "SPEC")]
    net: Vec<String>,
    /// Seccomp filters: on (a forbidden syscall kills ember after one line
    /// naming it), log (allowed and logged by the kernel, to build the
    /// lists) or off.
    #[arg(long, value_name = "MODE", default_value = "on")]
    seccomp: seccomp::Mode,
    /// Log level on stderr: off, error, warn, info, debug, trace.
    #[arg(long, value_name = "LEVEL", default_value = "warn")]
    log_level: log::LevelFilter,
}

fn init_logging(level: log::LevelFilter) {
    env_logger::Builder::new()
        .filter_level(level)
        .format(|buf, record| {
            writeln!(
                buf,
                "ember: {}: {}",
                record.level().as_str().to_lowercase(),
                record.args()
            )
        })
        .init();
}

/// The validated VM config from the config file and flags.
fn vm_config(cli: VmArgs) -> ember_vmm::Result<ValidConfig> {
    let mut cfg = match &cli.config {
        Some(path) => VmConfig::from_file(path)?,
        None => VmConfig::default(),
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
    cfg.apply(&Overrides {
        kernel: cli.kernel,
        initrd: cli.initrd,
        cmdline: cli.cmdline,
        vcpus: cli.vcpus,
        memory_mib: cli.memory,
        disks,
        nets,
    });
    Ok(cfg.validate()?)
}

fn run_jailed(args: JailArgs) -> ember_vmm::Result<i32> {
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
    };
    let cfg = vm_config(args.vm)?;
    ember_vmm::jail::run(&cfg, &opts)
}

fn run(cli: VmArgs, started: Instant) -> ember_vmm::Result<i32> {
    let mode = cli.seccomp;
    let cfg = vm_config(cli)?;
    let filters = seccomp::Filters::new(mode)?;
    match mode {
        seccomp::Mode::On => {}
        seccomp::Mode::Log => log::warn!(
            "seccomp in log mode: forbidden syscalls are allowed and logged by the kernel (dmesg, audit type=1326)"
        ),
        seccomp::Mode::Off => log::warn!("seccomp is off: the threads run without filters"),
    }
    let console = Console::stdio()?;
    let stdin = std::io::stdin();
    // Restored when this function returns, whichever way.
    let _raw = RawTerminal::enter(stdin.as_fd());
    let vmm = Vmm::build(&cfg, console, started)?;
    let reason = vmm.run(&filters)?;
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
    let result = match cli.command {
        Some(Command::Jail(args)) => {
            init_logging(args.vm.log_level);
            run_jailed(args)
        }
        None => {
            init_logging(cli.vm.log_level);
            run(cli.vm, started)
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
