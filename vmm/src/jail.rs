//! `ember jail`: run one microVM inside an [`ember_jail`] jail. This module
//! only decides what the VM needs inside (the ember binary and its shared
//! libraries, the kernel, initrd and disk images, `/dev/kvm`,
//! `/dev/urandom`, and `/dev/net/tun` when it has NICs) and the command
//! line of the jailed ember, which names the files by their jail paths.
//!
//! With `--api-sock NAME` the jailed ember serves the API on `/run/NAME`, a
//! writable directory of the jail: the host reaches it at
//! `<jail dir>/run/NAME`. A VM configured only through the API finds its
//! kernel and images inside the jail, where the caller put them (as with
//! Firecracker's jailer).

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use ember_jail::{current_exe_files, CgroupVersion, JailFile, JailSpec};

use crate::config::ValidConfig;
use crate::seccomp;
use crate::Error;
use ember_rate_limiter::RateLimiterConfig;

/// Where the jailed ember finds itself.
const EMBER_INSIDE: &str = "/ember";

/// How to jail the VM (the `ember jail` flags).
#[derive(Clone, Debug)]
pub struct JailOptions {
    /// The jail directory (must exist); it becomes the VM's root.
    pub dir: PathBuf,
    /// The uid the VM runs as.
    pub uid: u32,
    /// The gid the VM runs as.
    pub gid: u32,
    /// The jail's id (names its cgroup); default `ember-<pid>`.
    pub id: Option<String>,
    /// Allow uid or gid 0.
    pub allow_root: bool,
    /// A network namespace to join (`/var/run/netns/NAME`).
    pub netns: Option<PathBuf>,
    /// Run the VM as PID 1 of a new PID namespace.
    pub new_pid_ns: bool,
    /// Cgroup limits: cgroup v2 file names and values.
    pub cgroup: Vec<(String, String)>,
    /// Force cgroup v1 or v2 (default: what the host has).
    pub cgroup_version: Option<CgroupVersion>,
    /// RLIMIT_NOFILE.
    pub max_open_files: u64,
    /// RLIMIT_FSIZE.
    pub max_file_size: Option<u64>,
    /// The jailed ember's seccomp mode.
    pub seccomp: seccomp::Mode,
    /// The jailed ember's log level.
    pub log_level: log::LevelFilter,
    /// Serve the API on `/run/<name>` inside the jail.
    pub api_sock: Option<String>,
}

/// The writable directory inside the jail that holds the API socket.
pub const JAIL_RUN_DIR: &str = "/run";

/// Where the host finds the jailed VM's API socket.
pub fn host_api_sock(opts: &JailOptions) -> Option<PathBuf> {
    opts.api_sock.as_ref().map(|name| {
        opts.dir
            .join(JAIL_RUN_DIR.trim_start_matches('/'))
            .join(name)
    })
}

/// Parses a `--cgroup KEY=VALUE` flag.
pub fn parse_cgroup_flag(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() && !v.is_empty() => Ok((k.to_string(), v.to_string())),
        _ => Err(format!(
            "--cgroup expects KEY=VALUE (e.g. cpu.max=\"50000 100000\"), not `{s}`"
        )),
    }
}

fn mac_text(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// A flag value cannot carry a comma (the `--disk`/`--net` separator).
fn flag_safe(what: &str, value: &str) -> Result<(), Error> {
    if value.contains(',') {
        return Err(Error::JailConfig(format!(
            "{what} `{value}` contains a comma, which cannot be passed to the jailed ember"
        )));
    }
    Ok(())
}

/// Appends a rate limiter's buckets as `--disk`/`--net` keys
/// (`,{prefix}bw=SIZE/TIME[+BURST]`, `,{prefix}ops=...`).
fn limits(spec: &mut String, prefix: &str, limiter: Option<&RateLimiterConfig>) {
    let Some(l) = limiter else { return };
    for (key, bucket) in [("bw", &l.bandwidth), ("ops", &l.ops)] {
        if let Some(b) = bucket.as_ref().filter(|b| b.is_limit()) {
            spec.push_str(&format!(",{prefix}{key}={b}"));
        }
    }
}

/// The files, devices and command line of the jailed ember for `cfg`.
fn vm_inside(
    cfg: Option<&ValidConfig>,
    opts: &JailOptions,
) -> Result<(Vec<JailFile>, Vec<OsString>), Error> {
    let mut files = current_exe_files(Path::new(EMBER_INSIDE))?;
    let mut args: Vec<OsString> = Vec::new();
    let mut arg = |a: &str| args.push(a.into());
    if let Some(name) = &opts.api_sock {
        if name.is_empty() || name.contains('/') || name == "." || name == ".." {
            return Err(Error::JailConfig(format!(
                "--api-sock `{name}`: give a file name; the socket goes in the jail's {JAIL_RUN_DIR}"
            )));
        }
        arg("--api-sock");
        arg(&format!("{JAIL_RUN_DIR}/{name}"));
    }
    let Some(cfg) = cfg else {
        arg("--seccomp");
        arg(&opts.seccomp.to_string());
        arg("--log-level");
        arg(&opts.log_level.to_string().to_lowercase());
        return Ok((files, args));
    };

    files.push(JailFile::read_only(&cfg.kernel, "/vm/kernel"));
    arg("--kernel");
    arg("/vm/kernel");
    if let Some(initrd) = &cfg.initrd {
        files.push(JailFile::read_only(initrd, "/vm/initrd"));
        arg("--initrd");
        arg("/vm/initrd");
    }
    arg("--cmdline");
    arg(&cfg.cmdline);
    arg("--vcpus");
    arg(&cfg.vcpus.to_string());
    arg("--memory");
    arg(&cfg.memory_mib.to_string());
    arg("--transport");
    arg(&cfg.transport.to_string());
    arg("--boot-protocol");
    arg(&cfg.boot_protocol.to_string());
    for (i, disk) in cfg.disks.iter().enumerate() {
        let inside = format!("/vm/disk{i}");
        files.push(JailFile {
            host: disk.path.clone(),
            inside: PathBuf::from(&inside),
            writable: !disk.read_only,
        });
        let mut spec = format!(
            "path={inside},format={},io={},cache={},werror={},rerror={}",
            disk.format, disk.io, disk.cache, disk.werror, disk.rerror
        );
        if disk.read_only {
            spec.push_str(",read_only=on");
        }
        if let Some(n) = disk.num_queues {
            spec.push_str(&format!(",num_queues={n}"));
        }
        if let Some(n) = disk.queue_size {
            spec.push_str(&format!(",queue_size={n}"));
        }
        if disk.iothread {
            spec.push_str(",iothread=on");
        }
        limits(&mut spec, "", disk.rate_limiter.as_ref());
        if let Some(id) = &disk.id {
            flag_safe("disk id", id)?;
            spec.push_str(&format!(",id={id}"));
        }
        arg("--disk");
        arg(&spec);
    }
    for (net, mac) in &cfg.nets {
        let Some(tap) = net.tap_name() else {
            return Err(Error::JailConfig(
                "a user-mode NIC cannot be jailed: passt is a program of the host's, \
                 outside the jail; use a tap"
                    .to_string(),
            ));
        };
        flag_safe("tap name", tap)?;
        let mut spec = format!("tap={tap},mac={}", mac_text(mac));
        if !net.offloads {
            spec.push_str(",offloads=off");
        }
        if let Some(vid) = net.vlan {
            spec.push_str(&format!(",vlan={vid}"));
        }
        if net.queues > 1 {
            spec.push_str(&format!(",queues={}", net.queues));
        }
        if net.vhost {
            spec.push_str(",vhost=on");
        }
        limits(&mut spec, "rx_", net.rx_rate_limiter.as_ref());
        limits(&mut spec, "tx_", net.tx_rate_limiter.as_ref());
        arg("--net");
        arg(&spec);
    }
    if let Some(b) = &cfg.balloon {
        let on = |v: bool| if v { "on" } else { "off" };
        arg("--balloon");
        arg(&format!(
            "amount_mib={},deflate_on_oom={},stats_polling_interval_s={},free_page_reporting={}",
            b.amount_mib,
            on(b.deflate_on_oom),
            b.stats_polling_interval_s,
            on(b.free_page_reporting)
        ));
    }
    if let Some(v) = &cfg.vsock {
        // The socket goes in the jail's run directory, as the API's: the
        // host reaches it (and listens for the guest's connections, at
        // `<name>_<port>`) in `<jail dir>/run/`.
        let name = v
            .uds_path
            .file_name()
            .and_then(|n| n.to_str())
            .ok_or_else(|| {
                Error::JailConfig(format!(
                    "vsock uds_path {} has no file name",
                    v.uds_path.display()
                ))
            })?;
        flag_safe("vsock uds_path", name)?;
        arg("--vsock");
        arg(&format!(
            "cid={},uds_path={JAIL_RUN_DIR}/{name}",
            v.guest_cid
        ));
    }
    if let Some(e) = &cfg.entropy {
        let mut spec = String::new();
        limits(&mut spec, "", e.rate_limiter.as_ref());
        arg("--entropy");
        let spec = spec.trim_start_matches(',');
        arg(if spec.is_empty() { "on" } else { spec });
    }
    arg("--seccomp");
    arg(&opts.seccomp.to_string());
    arg("--log-level");
    arg(&opts.log_level.to_string().to_lowercase());
    Ok((files, args))
}

/// The jail for `cfg` (none: a VM configured through the API).
pub fn spec(cfg: Option<&ValidConfig>, opts: &JailOptions) -> Result<JailSpec, Error> {
    let id = opts
        .id
        .clone()
        .unwrap_or_else(|| format!("ember-{}", std::process::id()));
    let mut spec = JailSpec::new(id, &opts.dir, EMBER_INSIDE);
    let (files, args) = vm_inside(cfg, opts)?;
    spec.files = files;
    spec.args = args;
    spec.devices = vec!["/dev/kvm".into(), "/dev/urandom".into()];
    // A VM configured through the API may get NICs later.
    if cfg.is_none_or(|c| !c.nets.is_empty()) {
        spec.devices.push("/dev/net/tun".into());
    }
    // vhost=on NICs, where the host has vhost-net (else they fall back).
    let vhost = cfg.is_some_and(|c| c.nets.iter().any(|(n, _)| n.vhost));
    if vhost && std::path::Path::new(ember_virtio_net::vhost::VHOST_NET_PATH).exists() {
        spec.devices
            .push(ember_virtio_net::vhost::VHOST_NET_PATH.into());
    }
    if opts.api_sock.is_some() || cfg.is_some_and(|c| c.vsock.is_some()) {
        spec.writable_dirs = vec![JAIL_RUN_DIR.into()];
    }
    spec.uid = opts.uid;
    spec.gid = opts.gid;
    spec.allow_root = opts.allow_root;
    spec.netns = opts.netns.clone();
    spec.new_pid_ns = opts.new_pid_ns;
    spec.cgroup = opts.cgroup.clone();
    spec.cgroup_version = opts.cgroup_version;
    spec.max_open_files = opts.max_open_files;
    spec.max_file_size = opts.max_file_size;
    spec.read_only_root = true;
    Ok(spec)
}

/// Runs the VM of `cfg` jailed; returns the jailed ember's exit status
/// (128 + the signal if a signal ended it).
pub fn run(cfg: Option<&ValidConfig>, opts: &JailOptions) -> Result<i32, Error> {
    let spec = spec(cfg, opts)?;
    let sock = host_api_sock(opts);
    if let Some(sock) = &sock {
        log::info!("jail {}: API socket {}", spec.id, sock.display());
    }
    log::info!(
        "jail {}: {} as {}:{}",
        spec.id,
        spec.dir.display(),
        spec.uid,
        spec.gid
    );
    let status = ember_jail::run(&spec);
    // A jailed ember that was killed leaves its socket; the jail's
    // directory can then go too.
    if let Some(sock) = &sock {
        let _ = std::fs::remove_file(sock);
        let _ = std::fs::remove_dir(sock.parent().unwrap_or(Path::new("/")));
    }
    let status = status?;
    use std::os::unix::process::ExitStatusExt;
    Ok(status
        .code()
        .or_else(|| status.signal().map(|s| 128 + s))
        .unwrap_or(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cgroup_flags_parse() {
        assert_eq!(
            parse_cgroup_flag("cpu.max=50000 100000").unwrap(),
            ("cpu.max".to_string(), "50000 100000".to_string())
        );
        assert!(parse_cgroup_flag("cpu.max")
            .unwrap_err()
            .contains("KEY=VALUE"));
        assert!(parse_cgroup_flag("=1").is_err());
        assert!(parse_cgroup_flag("memory.max=").is_err());
    }

    #[test]
    fn the_jailed_ember_gets_every_disk_and_nic_option_that_fits_a_flag() {
        let exe = std::env::current_exe().unwrap();
        let toml = format!(
            r#"
[boot]
kernel = "{exe}"
[[disk]]
path = "{exe}"
format = "qcow2"
io = "io_uring"
num_queues = 2
queue_size = 128
iothread = true
werror = "enospc"
rerror = "stop"
rate_limiter = {{ bandwidth = {{ size = 10485760, refill_time = 1000 }}, ops = {{ size = 100, refill_time = 100, one_time_burst = 50 }} }}
[[net]]
tap = "tap0"
rx_rate_limiter = {{ bandwidth = {{ size = 1048576, refill_time = 1000 }} }}
tx_rate_limiter = {{ ops = {{ size = 1000, refill_time = 1000 }} }}
"#,
            exe = exe.display()
        );
        let cfg = crate::config::VmConfig::from_toml(&toml, &exe, Path::new("/"))
            .unwrap()
            .validate()
            .unwrap();
        let opts = JailOptions {
            dir: PathBuf::from("/nonexistent"),
            uid: 65534,
            gid: 65534,
            id: None,
            allow_root: false,
            netns: None,
            new_pid_ns: false,
            cgroup: Vec::new(),
            cgroup_version: None,
            max_open_files: 1024,
            max_file_size: None,
            seccomp: seccomp::Mode::On,
            log_level: log::LevelFilter::Info,
            api_sock: None,
        };
        let (_, args) = vm_inside(Some(&cfg), &opts).unwrap();
        let after = |flag: &str| {
            let i = args.iter().position(|a| a == flag).unwrap();
            args[i + 1].to_string_lossy().into_owned()
        };
        let disk = crate::config::DiskConfig::parse_flag(&after("--disk")).unwrap();
        let want = &cfg.disks[0];
        assert_eq!(disk.path, Path::new("/vm/disk0"));
        assert_eq!(
            (disk.format, disk.io, disk.cache, disk.iothread),
            (want.format, want.io, want.cache, true)
        );
        assert_eq!((disk.werror, disk.rerror), (want.werror, want.rerror));
        assert_eq!((disk.num_queues, disk.queue_size), (Some(2), Some(128)));
        assert_eq!(disk.rate_limiter, want.rate_limiter);
        let net = crate::config::NetConfig::parse_flag(&after("--net")).unwrap();
        let (want, _) = &cfg.nets[0];
        assert_eq!(net.rx_rate_limiter, want.rx_rate_limiter);
        assert_eq!(net.tx_rate_limiter, want.tx_rate_limiter);
    }

    #[test]
    fn macs_print_as_config_accepts_them() {
        assert_eq!(
            mac_text(&[0x06, 0, 0xac, 0x10, 0, 0x2]),
            "06:00:ac:10:00:02"
        );
    }
}
