//! Firecracker's configuration (the API's bodies and the `--config-file`
//! JSON) in terms of ember's [`VmConfig`], both ways.
//!
//! Each `apply_*` changes a copy, checks what changed, and only then
//! commits it: a bad request changes nothing. What ember does not
//! support yet is refused with a message that says so, never ignored.

use std::path::PathBuf;

use ember_api::model::{
    BootSource, CpuConfig, CpuTemplate, Drive, FullVmConfiguration, HugePages,
    MachineConfiguration, MachineConfigurationUpdate, NetworkInterface,
};

use ember_rate_limiter::{BucketConfig, RateLimiterConfig};

use super::{BootConfig, ConfigError, DiskConfig, MachineConfig, NetConfig, VmConfig};

fn unsupported(what: &str, why: &str) -> ConfigError {
    ConfigError::Unsupported(format!("{what} is not supported by ember yet ({why})"))
}

/// `PUT /machine-config`: the whole machine section (fields not given
/// take their defaults).
pub fn apply_machine(cfg: &mut VmConfig, m: &MachineConfiguration) -> Result<(), ConfigError> {
    check_machine_extras(Some(m.smt), m.cpu_template.as_ref())?;
    let mut machine = MachineConfig {
        vcpus: u64::from(m.vcpu_count),
        memory_mib: m.mem_size_mib,
        track_dirty_pages: m.track_dirty_pages,
        // The CPU is chosen by `PUT /cpu-config` (or ember's `machine.cpu`).
        cpu: cfg.machine.cpu.clone(),
        cpu_template: cfg.machine.cpu_template.clone(),
        ..cfg.machine.clone()
    };
    apply_huge_pages(&mut machine, m.huge_pages.as_ref());
    machine.validate()?;
    machine.memory_backend()?;
    cfg.machine = machine;
    Ok(())
}

/// `PATCH /machine-config`: only the fields given.
pub fn apply_machine_update(
    cfg: &mut VmConfig,
    m: &MachineConfigurationUpdate,
) -> Result<(), ConfigError> {
    check_machine_extras(m.smt, m.cpu_template.as_ref())?;
    let mut machine = cfg.machine.clone();
    if m.huge_pages.is_some() {
        apply_huge_pages(&mut machine, m.huge_pages.as_ref());
    }
    if let Some(t) = m.track_dirty_pages {
        machine.track_dirty_pages = t;
    }
    if let Some(v) = m.vcpu_count {
        machine.vcpus = u64::from(v);
    }
    if let Some(mib) = m.mem_size_mib {
        machine.memory_mib = mib;
    }
    machine.validate()?;
    machine.memory_backend()?;
    cfg.machine = machine;
    Ok(())
}

/// Firecracker's `huge_pages`: `2M` is hugetlbfs (`hugepages=on`), `Transparent`
/// is THP, `None` neither.
fn apply_huge_pages(machine: &mut MachineConfig, huge_pages: Option<&HugePages>) {
    let h = huge_pages.copied().unwrap_or_default();
    machine.hugepages = h == HugePages::Hugetlbfs2M;
    machine.hugepage_size = machine.hugepages.then(|| "2M".to_string());
    machine.thp = h == HugePages::Transparent;
}

fn check_machine_extras(
    smt: Option<bool>,
    cpu_template: Option<&CpuTemplate>,
) -> Result<(), ConfigError> {
    if smt == Some(true) {
        return Err(unsupported(
            "machine-config.smt = true",
            "every vCPU is its own core",
        ));
    }
    if let Some(t) = cpu_template.filter(|t| **t != CpuTemplate::None) {
        return Err(unsupported(
            &format!("machine-config.cpu_template = {t:?}"),
            "Firecracker's static templates are deprecated there and not modelled here: give a custom template with PUT /cpu-config, or an ember CPU model (machine.cpu)",
        ));
    }
    Ok(())
}

/// The machine section as Firecracker reports it.
pub fn machine_to_api(m: &MachineConfig) -> MachineConfiguration {
    MachineConfiguration {
        vcpu_count: u8::try_from(m.vcpus).unwrap_or(u8::MAX),
        mem_size_mib: m.memory_mib,
        smt: false,
        track_dirty_pages: m.track_dirty_pages,
        cpu_template: None,
        huge_pages: Some(if m.hugepages {
            HugePages::Hugetlbfs2M
        } else if m.thp {
            HugePages::Transparent
        } else {
            HugePages::None
        }),
    }
}

/// `PUT /boot-source`: the kernel (which must exist), initrd and
/// command line.
pub fn apply_boot_source(cfg: &mut VmConfig, b: &BootSource) -> Result<(), ConfigError> {
    let boot = BootConfig {
        kernel: Some(PathBuf::from(&b.kernel_image_path)),
        initrd: b.initrd_path.as_ref().map(PathBuf::from),
        cmdline: b.boot_args.clone(),
        protocol: cfg.boot.protocol.clone(),
    };
    boot.validate()?;
    cfg.boot = boot;
    Ok(())
}

/// `PUT /drives/{id}`: adds a disk, or replaces the one with that id.
pub fn apply_drive(cfg: &mut VmConfig, d: &Drive) -> Result<(), ConfigError> {
    if d.socket.is_some() {
        return Err(unsupported("drives.socket", "no vhost-user disks"));
    }
    let path = d.path_on_host.as_ref().ok_or_else(|| {
        ConfigError::Unsupported(format!("drive {}: path_on_host is required", d.drive_id))
    })?;
    let disk = DiskConfig {
        path: PathBuf::from(path),
        read_only: d.is_read_only.unwrap_or(false),
        id: None,
        drive_id: Some(d.drive_id.clone()),
        root: d.is_root_device,
        // Firecracker's drives are raw images.
        format: super::disk::ImageFormat::Raw,
        partuuid: d.partuuid.clone(),
        num_queues: None,
        queue_size: None,
        rate_limiter: d.rate_limiter.as_ref().map(limiter_from_api),
        io: match d.io_engine {
            Some(ember_api::model::IoEngine::Async) => super::disk::IoEngine::IoUring,
            _ => super::disk::IoEngine::Sync,
        },
        // Both of Firecracker's cache types go through the page cache;
        // ember honours the guest's flushes in both (Unsafe included).
        cache: super::disk::CacheMode::Writeback,
        iothread: false,
        werror: Default::default(),
        rerror: Default::default(),
    };
    let mut disks = cfg.disk.clone();
    let index = disks
        .iter()
        .enumerate()
        .position(|(i, o)| o.drive_id(i) == d.drive_id)
        .unwrap_or(disks.len());
    disk.validate(index)?;
    if index == disks.len() {
        disks.push(disk);
    } else {
        disks[index] = disk;
    }
    if disk_count_error(&disks).is_some() {
        return Err(ConfigError::TooManyDisks(disks.len()));
    }
    if d.is_root_device {
        if let Some(other) = disks
            .iter()
            .enumerate()
            .position(|(i, o)| o.root && i != index)
        {
            return Err(ConfigError::TwoRoots(other, index));
        }
    }
    cfg.disk = disks;
    Ok(())
}

/// Firecracker's `RateLimiter` body as the limiter's configuration.
pub fn limiter_from_api(l: &ember_api::model::RateLimiter) -> RateLimiterConfig {
    let bucket = |b: &ember_api::model::TokenBucket| BucketConfig {
        size: b.size,
        one_time_burst: b.one_time_burst,
        refill_time: b.refill_time,
    };
    RateLimiterConfig {
        bandwidth: l.bandwidth.as_ref().map(bucket),
        ops: l.ops.as_ref().map(bucket),
    }
}

/// The limiter's configuration as Firecracker's `RateLimiter` body.
pub fn limiter_to_api(l: &RateLimiterConfig) -> ember_api::model::RateLimiter {
    let bucket = |b: &BucketConfig| ember_api::model::TokenBucket {
        size: b.size,
        one_time_burst: b.one_time_burst,
        refill_time: b.refill_time,
    };
    ember_api::model::RateLimiter {
        bandwidth: l.bandwidth.as_ref().map(bucket),
        ops: l.ops.as_ref().map(bucket),
    }
}

fn disk_count_error(disks: &[DiskConfig]) -> Option<usize> {
    (disks.len() > super::disk::MAX_DISKS).then_some(disks.len())
}

/// `PUT /network-interfaces/{id}`: adds a NIC, or replaces the one with
/// that id.
pub fn apply_net(cfg: &mut VmConfig, n: &NetworkInterface) -> Result<(), ConfigError> {
    if n.mtu.is_some() {
        return Err(unsupported(
            "network-interfaces.mtu",
            "the guest's MTU is set inside the guest",
        ));
    }
    let net = NetConfig {
        tap: Some(n.host_dev_name.clone()),
        user: None,
        mac: n.guest_mac.clone(),
        offloads: true,
        iface_id: Some(n.iface_id.clone()),
        vlan: None,
        queues: 1,
        vhost: false,
        rx_rate_limiter: n
            .rx_rate_limiter
            .as_ref()
            .map(limiter_from_api)
            .filter(|l| !l.is_unlimited()),
        tx_rate_limiter: n
            .tx_rate_limiter
            .as_ref()
            .map(limiter_from_api)
            .filter(|l| !l.is_unlimited()),
    };
    let mut nets = cfg.net.clone();
    let index = nets
        .iter()
        .enumerate()
        .position(|(i, o)| o.iface_id(i) == n.iface_id)
        .unwrap_or(nets.len());
    net.validate(index)?;
    if nets
        .iter()
        .enumerate()
        .any(|(i, o)| i != index && o.tap == net.tap)
    {
        return Err(ConfigError::DuplicateTap(n.host_dev_name.clone()));
    }
    if index == nets.len() {
        nets.push(net);
    } else {
        nets[index] = net;
    }
    if nets.len() > super::net::MAX_NETS {
        return Err(ConfigError::TooManyNets(nets.len()));
    }
    cfg.net = nets;
    Ok(())
}

/// The whole configuration in Firecracker's terms (`GET /vm/config`),
/// usable as a `--config-file`.
pub fn to_api(cfg: &VmConfig) -> FullVmConfiguration {
    FullVmConfiguration {
        boot_source: cfg.boot.kernel.as_ref().map(|k| BootSource {
            kernel_image_path: k.to_string_lossy().into_owned(),
            initrd_path: cfg
                .boot
                .initrd
                .as_ref()
                .map(|p| p.to_string_lossy().into_owned()),
            boot_args: Some(cfg.boot.cmdline().to_owned()),
        }),
        drives: cfg
            .disk
            .iter()
            .enumerate()
            .map(|(i, d)| Drive {
                drive_id: d.drive_id(i),
                path_on_host: Some(d.path.to_string_lossy().into_owned()),
                is_root_device: d.root,
                is_read_only: Some(d.read_only),
                partuuid: d.partuuid.clone(),
                // Ember always honours flushes.
                cache_type: Some(ember_api::model::CacheType::Writeback),
                io_engine: Some(match d.io {
                    super::disk::IoEngine::IoUring => ember_api::model::IoEngine::Async,
                    super::disk::IoEngine::Sync => ember_api::model::IoEngine::Sync,
                }),
                rate_limiter: d
                    .rate_limiter
                    .as_ref()
                    .filter(|l| !l.is_unlimited())
                    .map(limiter_to_api),
                socket: None,
            })
            .collect(),
        machine_config: Some(machine_to_api(&cfg.machine)),
        cpu_config: cfg.machine.cpu_template.as_ref().map(template_to_api),
        // Firecracker's schema has no user-mode NIC: only the taps show.
        network_interfaces: cfg
            .net
            .iter()
            .enumerate()
            .filter_map(|(i, n)| n.tap_name().map(|tap| (i, n, tap)))
            .map(|(i, n, tap)| NetworkInterface {
                iface_id: n.iface_id(i),
                host_dev_name: tap.to_string(),
                guest_mac: Some(
                    n.validate(i)
                        .map(mac_text)
                        .unwrap_or_else(|_| n.mac.clone().unwrap_or_default()),
                ),
                rx_rate_limiter: n
                    .rx_rate_limiter
                    .as_ref()
                    .filter(|l| !l.is_unlimited())
                    .map(limiter_to_api),
                tx_rate_limiter: n
                    .tx_rate_limiter
                    .as_ref()
                    .filter(|l| !l.is_unlimited())
                    .map(limiter_to_api),
                ..Default::default()
            })
            .collect(),
        balloon: cfg.balloon.as_ref().map(balloon_to_api),
        vsock: cfg.vsock.as_ref().map(|v| ember_api::model::Vsock {
            guest_cid: v.guest_cid,
            uds_path: v.uds_path.to_string_lossy().into_owned(),
            vsock_id: None,
        }),
        entropy: cfg
            .entropy
            .as_ref()
            .map(|e| ember_api::model::EntropyDevice {
                rate_limiter: e
                    .rate_limiter
                    .as_ref()
                    .filter(|l| !l.is_unlimited())
                    .map(limiter_to_api),
            }),
        ..Default::default()
    }
}

/// `PUT /vsock` before boot (and the config file's `vsock`).
pub fn apply_vsock(cfg: &mut VmConfig, v: &ember_api::model::Vsock) -> Result<(), ConfigError> {
    let config = ember_virtio_vsock::VsockConfig {
        guest_cid: v.guest_cid,
        uds_path: v.uds_path.clone().into(),
    };
    super::vsock::validate_vsock(&config)?;
    cfg.vsock = Some(config);
    Ok(())
}

/// `PUT /entropy` before boot (and the config file's `entropy`).
pub fn apply_entropy(
    cfg: &mut VmConfig,
    e: &ember_api::model::EntropyDevice,
) -> Result<(), ConfigError> {
    cfg.entropy = Some(ember_virtio_rng::EntropyConfig {
        rate_limiter: e.rate_limiter.as_ref().map(limiter_from_api),
    });
    Ok(())
}

/// `PUT /cpu-config`: a custom CPU template becomes the VM's CPU model.
pub fn apply_cpu_config(cfg: &mut VmConfig, c: &CpuConfig) -> Result<(), ConfigError> {
    // The same JSON schema on both sides.
    let value = serde_json::to_value(c).map_err(|e| ConfigError::Unsupported(e.to_string()))?;
    let t: ember_vcpu::model::CustomTemplate = serde_json::from_value(value)
        .map_err(|e| ConfigError::Cpu(ember_vcpu::model::ModelError::Template(e.to_string())))?;
    t.validate().map_err(ConfigError::Cpu)?;
    let mut machine = cfg.machine.clone();
    machine.cpu_template = Some(t);
    machine.cpu = None;
    machine.validate()?;
    cfg.machine = machine;
    Ok(())
}

fn template_to_api(t: &ember_vcpu::model::CustomTemplate) -> CpuConfig {
    serde_json::to_value(t)
        .ok()
        .and_then(|v| serde_json::from_value(v).ok())
        .unwrap_or_default()
}

/// `aa:bb:cc:dd:ee:ff`.
pub fn mac_text(mac: [u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// A Firecracker `--config-file` as ember's configuration: each section
/// applied as the API would apply it, in the order Firecracker does.
pub fn from_api(full: &FullVmConfiguration) -> Result<VmConfig, ConfigError> {
    if full.logger.is_some() || full.metrics.is_some() {
        return Err(unsupported(
            "the logger and metrics sections of a config file",
            "use --log-path, --level and --metrics-path",
        ));
    }
    let mut cfg = VmConfig::default();
    if let Some(m) = &full.machine_config {
        apply_machine(&mut cfg, m)?;
    }
    if let Some(c) = &full.cpu_config {
        apply_cpu_config(&mut cfg, c)?;
    }
    if let Some(b) = &full.boot_source {
        apply_boot_source(&mut cfg, b)?;
    }
    for d in &full.drives {
        apply_drive(&mut cfg, d)?;
    }
    for n in &full.network_interfaces {
        apply_net(&mut cfg, n)?;
    }
    if let Some(b) = &full.balloon {
        apply_balloon(&mut cfg, b)?;
    }
    if let Some(v) = &full.vsock {
        apply_vsock(&mut cfg, v)?;
    }
    if let Some(e) = &full.entropy {
        apply_entropy(&mut cfg, e)?;
    }
    Ok(cfg)
}

/// `PUT /balloon` before boot (and the config file's `balloon`).
pub fn apply_balloon(
    cfg: &mut VmConfig,
    b: &ember_api::balloon::Balloon,
) -> Result<(), ConfigError> {
    if b.free_page_hinting == Some(true) {
        return Err(unsupported(
            "balloon.free_page_hinting",
            "free page reporting is: free_page_reporting = true",
        ));
    }
    let config = balloon_from_api(b);
    let backend = cfg.machine.memory_backend()?;
    super::balloon::validate(&config, cfg.machine.memory_mib, &backend)?;
    cfg.balloon = Some(config);
    Ok(())
}

/// Firecracker's balloon body as the device's configuration.
pub fn balloon_from_api(b: &ember_api::balloon::Balloon) -> ember_virtio_balloon::BalloonConfig {
    ember_virtio_balloon::BalloonConfig {
        amount_mib: b.amount_mib,
        deflate_on_oom: b.deflate_on_oom,
        stats_polling_interval_s: b.stats_polling_interval_s,
        free_page_reporting: b.free_page_reporting,
    }
}

/// The device's configuration as Firecracker's balloon body.
pub fn balloon_to_api(b: &ember_virtio_balloon::BalloonConfig) -> ember_api::balloon::Balloon {
    ember_api::balloon::Balloon {
        amount_mib: b.amount_mib,
        deflate_on_oom: b.deflate_on_oom,
        stats_polling_interval_s: b.stats_polling_interval_s,
        free_page_hinting: None,
        free_page_reporting: b.free_page_reporting,
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    fn exe() -> String {
        std::env::current_exe().unwrap().display().to_string()
    }

    #[test]
    fn firecracker_json_and_the_same_toml_give_the_same_vm() {
        let exe = exe();
        let json = format!(
            r#"{{
              "boot-source": {{"kernel_image_path": "{exe}", "boot_args": "console=ttyS0 reboot=k panic=1"}},
              "drives": [
                {{"drive_id": "data", "path_on_host": "{exe}", "is_root_device": false, "is_read_only": true}}
              ],
              "machine-config": {{"vcpu_count": 2, "mem_size_mib": 256}},
              "network-interfaces": [{{"iface_id": "eth0", "host_dev_name": "tap0", "guest_mac": "06:00:ac:10:00:02"}}]
            }}"#
        );
        let full: FullVmConfiguration = serde_json::from_str(&json).unwrap();
        let from_json = from_api(&full).unwrap().validate().unwrap();
        let toml = format!(
            r#"
            [machine]
            vcpus = 2
            memory_mib = 256
            [boot]
            kernel = "{exe}"
            cmdline = "console=ttyS0 reboot=k panic=1"
            [[disk]]
            path = "{exe}"
            read_only = true
            drive_id = "data"
            [[net]]
            tap = "tap0"
            mac = "06:00:ac:10:00:02"
            iface_id = "eth0"
            "#
        );
        let from_toml = VmConfig::from_toml(&toml, Path::new("vm.toml"), Path::new("/"))
            .unwrap()
            .validate()
            .unwrap();
        assert_eq!(from_json, from_toml);
        // And GET /vm/config of it reads back as the same configuration.
        let again = from_api(&to_api(&from_api(&full).unwrap())).unwrap();
        assert_eq!(again.validate().unwrap(), from_toml);
    }

    #[test]
    fn firecracker_root_device_goes_first_and_on_the_command_line() {
        let exe = exe();
        let mut cfg = VmConfig::default();
        apply_boot_source(
            &mut cfg,
            &BootSource {
                kernel_image_path: exe.clone(),
                boot_args: Some("console=ttyS0".into()),
                initrd_path: None,
            },
        )
        .unwrap();
        let drive = |id: &str, root: bool| Drive {
            drive_id: id.into(),
            path_on_host: Some(exe.clone()),
            is_root_device: root,
            is_read_only: Some(true),
            partuuid: None,
            cache_type: None,
            io_engine: None,
            rate_limiter: None,
            socket: None,
        };
        // io_engine Async is io=io_uring, and reads back as Async.
        let mut uring = cfg.clone();
        let mut d = drive("fast", false);
        d.io_engine = Some(ember_api::model::IoEngine::Async);
        apply_drive(&mut uring, &d).unwrap();
        assert_eq!(uring.disk[0].io, super::super::disk::IoEngine::IoUring);
        assert!(matches!(
            to_api(&uring).drives[0].io_engine,
            Some(ember_api::model::IoEngine::Async)
        ));
        apply_drive(&mut cfg, &drive("data", false)).unwrap();
        assert_eq!(cfg.disk[0].io, super::super::disk::IoEngine::Sync);
        // The same image twice is refused when the whole is checked.
        apply_drive(&mut cfg, &drive("rootfs", true)).unwrap();
        assert!(matches!(cfg.validate(), Err(ConfigError::DuplicateDisk(_))));
        let other = std::env::temp_dir().join(format!("ember-fc-test-{}.img", std::process::id()));
        std::fs::write(&other, [0u8; 512]).unwrap();
        cfg.disk[0].path = other.clone();
        let valid = cfg.validate();
        std::fs::remove_file(&other).unwrap();
        let valid = valid.unwrap();
        assert_eq!(valid.disks[0].drive_id.as_deref(), Some("rootfs"));
        assert_eq!(valid.disks[1].drive_id.as_deref(), Some("data"));
        assert_eq!(valid.cmdline, "console=ttyS0 root=/dev/vda ro");
        assert_eq!(valid.disks[0].num_queues, Some(1), "one queue per vCPU");
        // With its partition id, the root is named by it; a rate limiter
        // comes along and is reported back.
        let mut with_uuid = cfg.clone();
        let mut d = drive("rootfs", true);
        d.partuuid = Some("0eaa91a0-01".into());
        d.rate_limiter = Some(ember_api::model::RateLimiter {
            bandwidth: None,
            ops: Some(ember_api::model::TokenBucket {
                size: 100,
                one_time_burst: None,
                refill_time: 1000,
            }),
        });
        std::fs::write(&other, [0u8; 512]).unwrap();
        apply_drive(&mut with_uuid, &d).unwrap();
        let valid = with_uuid.validate();
        let api = to_api(&with_uuid);
        std::fs::remove_file(&other).unwrap();
        assert_eq!(
            valid.unwrap().cmdline,
            "console=ttyS0 root=PARTUUID=0eaa91a0-01 ro"
        );
        // Init's arguments stay last.
        let mut with_init = cfg.clone();
        with_init.boot.cmdline = Some("console=ttyS0 init=/bin/sh -- -c reboot".into());
        std::fs::write(&other, [0u8; 512]).unwrap();
        let valid = with_init.validate();
        std::fs::remove_file(&other).unwrap();
        assert_eq!(
            valid.unwrap().cmdline,
            "console=ttyS0 init=/bin/sh root=/dev/vda ro -- -c reboot"
        );
        let root = api.drives.iter().find(|d| d.drive_id == "rootfs").unwrap();
        assert_eq!(root.partuuid.as_deref(), Some("0eaa91a0-01"));
        assert_eq!(root.rate_limiter, d.rate_limiter);
        // A second root is refused and changes nothing.
        let before = cfg.clone();
        let mut c2 = cfg.clone();
        assert!(matches!(
            apply_drive(&mut c2, &drive("other", true)),
            Err(ConfigError::TwoRoots(..)) | Err(ConfigError::File { .. })
        ));
        assert_eq!(cfg, before);
    }

    #[test]
    fn firecracker_unsupported_fields_are_refused_by_name() {
        let mut cfg = VmConfig::default();
        let m = MachineConfiguration {
            vcpu_count: 1,
            mem_size_mib: 128,
            smt: false,
            track_dirty_pages: false,
            cpu_template: Some(CpuTemplate::T2),
            huge_pages: None,
        };
        let e = apply_machine(&mut cfg, &m).unwrap_err();
        assert!(e.to_string().contains("cpu_template"), "{e}");
        assert_eq!(cfg, VmConfig::default(), "nothing changed");
    }

    #[test]
    fn firecracker_huge_pages_map_to_the_memory_backend() {
        let mut cfg = VmConfig::default();
        let m = MachineConfiguration {
            vcpu_count: 1,
            mem_size_mib: 128,
            smt: false,
            track_dirty_pages: false,
            cpu_template: None,
            huge_pages: Some(HugePages::Hugetlbfs2M),
        };
        apply_machine(&mut cfg, &m).unwrap();
        assert!(cfg.machine.hugepages && !cfg.machine.thp);
        assert_eq!(
            machine_to_api(&cfg.machine).huge_pages,
            Some(HugePages::Hugetlbfs2M)
        );
        let t = MachineConfiguration {
            huge_pages: Some(HugePages::Transparent),
            ..m.clone()
        };
        apply_machine(&mut cfg, &t).unwrap();
        assert!(cfg.machine.thp && !cfg.machine.hugepages);
        // 2M pages need a size in whole pages: nothing changes on a refusal.
        let before = cfg.clone();
        let odd = MachineConfiguration {
            mem_size_mib: 129,
            ..m
        };
        let e = apply_machine(&mut cfg, &odd).unwrap_err();
        assert!(
            e.to_string()
                .contains("not a multiple of the 2 MiB huge page"),
            "{e}"
        );
        assert_eq!(cfg, before);
    }
}
