//! `ember`: boot a microVM from a config file and/or flags.

use std::io::Write;
use std::os::fd::AsFd;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Instant;

use clap::Parser;
use ember_vmm::config::{DiskConfig, NetConfig, Overrides, VmConfig};
use ember_vmm::terminal::RawTerminal;
use ember_vmm::{Console, Vmm};

/// Ember: a minimal KVM microVM monitor.
#[derive(Debug, Parser)]
#[command(name = "ember", version, about)]
struct Cli {
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
    /// Log level on stderr: off, error, warn, info, debug, trace.
    #[arg(long, value_name = "LEVEL", default_value = "warn")]
    log_level: log::LevelFilter,
}

/// The error and its sources on one line (a source whose text an outer
/// message already quotes is not repeated).
fn error_chain(e: &dyn std::error::Error) -> String {
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

fn run(cli: Cli, started: Instant) -> ember_vmm::Result<i32> {
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
    let cfg = cfg.validate()?;
    let console = Console::stdio()?;
    let stdin = std::io::stdin();
    // Restored when this function returns, whichever way.
    let _raw = RawTerminal::enter(stdin.as_fd());
    let vmm = Vmm::build(&cfg, console, started)?;
    let reason = vmm.run()?;
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
    init_logging(cli.log_level);
    match run(cli, started) {
        Ok(code) => ExitCode::from(u8::try_from(code).unwrap_or(1)),
        Err(e) => {
            eprintln!("ember: error: {}", error_chain(&e));
            ExitCode::FAILURE
        }
    }
}
