//! A parsed, checked API request: the method and path pick the endpoint,
//! the body is parsed into the spec's type, and the checks that need no
//! VM (ids, ranges, MAC format) are made here. What is left is for the
//! VMM to decide.

use serde::de::DeserializeOwned;

use crate::model::{
    ActionType, BootSource, CpuConfig, Drive, InstanceActionInfo, Logger, MachineConfiguration,
    MachineConfigurationUpdate, Metrics, NetworkInterface, PartialDrive, PartialNetworkInterface,
    RateLimiter, ReceiveMigrationData, SendMigrationData, SnapshotCreateParams, SnapshotLoadParams,
    Vm, VmState,
};

/// The most vCPUs the spec allows.
pub const MAX_VCPUS: u8 = 32;
/// The longest drive or interface id (Firecracker's limit).
pub const MAX_ID_LEN: usize = 64;

/// One request the VMM serves.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Request {
    /// `GET /`.
    GetInstanceInfo,
    /// `GET /version`.
    GetVersion,
    /// `GET /machine-config`.
    GetMachineConfig,
    /// `PUT /machine-config`.
    PutMachineConfig(MachineConfiguration),
    /// `PATCH /machine-config`.
    PatchMachineConfig(MachineConfigurationUpdate),
    /// `PUT /boot-source`.
    PutBootSource(BootSource),
    /// `PUT /drives/{id}`.
    PutDrive(Drive),
    /// `PATCH /drives/{id}`.
    PatchDrive(PartialDrive),
    /// `PUT /network-interfaces/{id}`.
    PutNetworkInterface(NetworkInterface),
    /// `PATCH /network-interfaces/{id}`.
    PatchNetworkInterface(PartialNetworkInterface),
    /// `PUT /actions`.
    Action(ActionType),
    /// `PATCH /vm`.
    PatchVm(VmState),
    /// `GET /vm/config`.
    GetVmConfig,
    /// `PUT /logger`.
    PutLogger(Logger),
    /// `PUT /metrics`.
    PutMetrics(Metrics),
    /// `PUT /cpu-config`.
    PutCpuConfig(CpuConfig),
    /// `PUT /snapshot/create`.
    CreateSnapshot(SnapshotCreateParams),
    /// `PUT /snapshot/load`.
    LoadSnapshot(SnapshotLoadParams),
    /// `GET /balloon`.
    GetBalloon,
    /// `PUT /balloon`.
    PutBalloon(crate::balloon::Balloon),
    /// `PUT /vsock`.
    PutVsock(crate::model::Vsock),
    /// `PUT /entropy`.
    PutEntropy(crate::model::EntropyDevice),
    /// `PATCH /balloon`.
    PatchBalloon(crate::balloon::BalloonUpdate),
    /// `GET /balloon/statistics`.
    GetBalloonStats,
    /// `PATCH /balloon/statistics`.
    PatchBalloonStats(crate::balloon::BalloonStatsUpdate),
    /// `PUT /api/v1/vm.send-migration` (Cloud Hypervisor's).
    SendMigration(SendMigrationData),
    /// `PUT /api/v1/vm.receive-migration` (Cloud Hypervisor's).
    ReceiveMigration(ReceiveMigrationData),
    /// `GET /api/v1/vm.migration-status` (ember's): the migration's progress.
    GetMigration,
    /// `PUT /api/v1/vm.migration-cancel` (ember's): stop the migration; the
    /// guest runs on at the source.
    CancelMigration,
    /// `PUT /api/v1/vm.power-button` (Cloud Hypervisor's): press the guest's
    /// ACPI power button.
    PowerButton,
}

/// Why a request is refused before it reaches the VMM. The message is the
/// `fault_message`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    /// No such endpoint (Firecracker's wording).
    #[error("Invalid request method and/or path: {0} {1}")]
    InvalidPathMethod(String, String),
    /// An endpoint of the spec ember does not serve yet.
    #[error("{method} {path} is not supported by ember yet ({feature})")]
    Unsupported {
        /// The method.
        method: String,
        /// The path.
        path: String,
        /// What it belongs to.
        feature: &'static str,
    },
    /// The body is missing.
    #[error("{0} needs a JSON body")]
    MissingBody(String),
    /// A body where none belongs.
    #[error("{0} takes no body")]
    UnexpectedBody(String),
    /// The body does not parse as the endpoint's type.
    #[error("invalid body for {0}: {1}")]
    Body(String, String),
    /// A value is out of range or malformed.
    #[error("invalid body for {0}: {1}")]
    Value(String, String),
}

impl RequestError {
    /// The HTTP status (400 for all of them, as Firecracker answers).
    pub fn status(&self) -> u16 {
        400
    }
}

/// The spec's endpoints that belong to later work: method, path (`{id}`
/// stands for one path segment) and what they are part of.
const UNSUPPORTED: &[(&str, &str, &str)] = &[
    (
        "PATCH",
        "/balloon/hinting/start",
        "free page hinting (free page reporting is supported)",
    ),
    (
        "GET",
        "/balloon/hinting/status",
        "free page hinting (free page reporting is supported)",
    ),
    (
        "PATCH",
        "/balloon/hinting/stop",
        "free page hinting (free page reporting is supported)",
    ),
    ("PUT", "/pmem/{id}", "virtio-pmem"),
    ("PATCH", "/pmem/{id}", "virtio-pmem"),
    ("GET", "/mmds", "MMDS"),
    ("PUT", "/mmds", "MMDS"),
    ("PATCH", "/mmds", "MMDS"),
    ("PUT", "/mmds/config", "MMDS"),
    ("PUT", "/serial", "serial output redirection"),
    ("GET", "/hotplug/memory", "memory hotplug"),
    ("PUT", "/hotplug/memory", "memory hotplug"),
    ("PATCH", "/hotplug/memory", "memory hotplug"),
];

/// The largest value of the spec's `int64` token bucket fields.
const MAX_INT64: u64 = i64::MAX.unsigned_abs();
/// The longest refill time whose nanoseconds fit a `u64` (Firecracker's
/// rate limiter counts in nanoseconds).
pub const MAX_REFILL_TIME_MS: u64 = u64::MAX / 1_000_000;
/// The MTU range of the spec.
pub const MTU_RANGE: std::ops::RangeInclusive<u32> = 68..=65535;

fn parse_body<T: DeserializeOwned>(what: &str, body: &[u8]) -> Result<T, RequestError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Err(RequestError::MissingBody(what.to_string()));
    }
    serde_json::from_slice(body)
        .map_err(|e| RequestError::Body(what.to_string(), e.to_string().replace('\n', " ")))
}

/// A migration URL as Cloud Hypervisor writes it.
fn check_migration_url(what: &str, field: &str, url: &str) -> Result<(), RequestError> {
    let ok = match url.split_once(':') {
        Some(("unix", path)) => !path.is_empty(),
        Some(("tcp", addr)) => addr
            .rsplit_once(':')
            .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok()),
        _ => false,
    };
    if ok {
        Ok(())
    } else {
        Err(RequestError::Value(
            what.to_string(),
            format!("{field} {url:?} is not tcp:HOST:PORT or unix:PATH"),
        ))
    }
}

/// The values of a send that ember does not support are refused, naming
/// the field; ranges as Cloud Hypervisor checks them.
fn check_send_migration(what: &str, m: &SendMigrationData) -> Result<(), RequestError> {
    let bad = |m: String| Err(RequestError::Value(what.to_string(), m));
    check_migration_url(what, "destination_url", &m.destination_url)?;
    if m.downtime_ms == Some(0) {
        return bad("downtime_ms must be at least 1".into());
    }
    if m.timeout_s == Some(0) {
        return bad("timeout_s must be at least 1".into());
    }
    match m.connections {
        None | Some(1) => {}
        Some(n) if (2..=128).contains(&n) => {
            return bad(format!(
                "connections = {n}: ember migrates over one connection (connections = 1)"
            ))
        }
        Some(n) => return bad(format!("connections = {n} is out of range: 1 to 128")),
    }
    if m.tls_dir.is_some() {
        return bad("tls_dir: ember does not support TLS for migration (use a Unix socket or a trusted network)".into());
    }
    if m.preserve_source && !m.local {
        return bad("preserve_source requires local = true".into());
    }
    if m.local && !m.destination_url.starts_with("unix:") {
        return bad("local = true needs a unix: destination_url".into());
    }
    Ok(())
}

fn check_receive_migration(what: &str, m: &ReceiveMigrationData) -> Result<(), RequestError> {
    let bad = |m: &str| Err(RequestError::Value(what.to_string(), m.to_string()));
    check_migration_url(what, "receiver_url", &m.receiver_url)?;
    if m.tls_dir.is_some() {
        return bad("tls_dir: ember does not support TLS for migration");
    }
    if m.vfio_fds.as_ref().is_some_and(|v| !v.is_empty()) {
        return bad("vfio_fds: ember has no VFIO devices");
    }
    if m.iommufd_fd.is_some() {
        return bad("iommufd_fd: ember has no iommufd");
    }
    if m.zone_updates.as_ref().is_some_and(|v| !v.is_empty()) {
        return bad("zone_updates: ember has no memory zones to move");
    }
    Ok(())
}

/// Firecracker's rules for a load: exactly one of `mem_backend` and
/// `mem_file_path`, a non-empty state path, valid override ids.
fn check_load(what: &str, l: &SnapshotLoadParams) -> Result<(), RequestError> {
    let bad = |m: &str| Err(RequestError::Value(what.to_string(), m.to_string()));
    match (&l.mem_backend, &l.mem_file_path) {
        (Some(_), Some(_)) => {
            return bad("too many fields: either `mem_backend` or `mem_file_path` exclusively")
        }
        (None, None) => return bad("missing field: either `mem_backend` or `mem_file_path`"),
        (Some(b), None) if b.backend_path.is_empty() => return bad("backend_path is empty"),
        (None, Some(p)) if p.is_empty() => return bad("mem_file_path is empty"),
        _ => {}
    }
    if l.snapshot_path.is_empty() {
        return bad("snapshot_path is empty");
    }
    for o in l.network_overrides.iter().flatten() {
        check_id(what, "iface_id", &o.iface_id)?;
        if o.host_dev_name.is_empty() {
            return bad("host_dev_name is empty");
        }
    }
    Ok(())
}

fn check_id(what: &str, kind: &str, id: &str) -> Result<(), RequestError> {
    let ok = !id.is_empty()
        && id.len() <= MAX_ID_LEN
        && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
    if ok {
        Ok(())
    } else {
        Err(RequestError::Value(
            what.to_string(),
            format!("{kind} {id:?} must be 1 to {MAX_ID_LEN} characters of A-Z, a-z, 0-9 and _"),
        ))
    }
}

fn check_path_id(what: &str, kind: &str, path_id: &str, body_id: &str) -> Result<(), RequestError> {
    check_id(what, kind, path_id)?;
    if path_id != body_id {
        return Err(RequestError::Value(
            what.to_string(),
            format!("the path's {kind} {path_id:?} differs from the body's {body_id:?}"),
        ));
    }
    Ok(())
}

fn check_vcpus(what: &str, v: u8) -> Result<(), RequestError> {
    if (1..=MAX_VCPUS).contains(&v) {
        Ok(())
    } else {
        Err(RequestError::Value(
            what.to_string(),
            format!("vcpu_count = {v} is out of range: it must be 1 to {MAX_VCPUS}"),
        ))
    }
}

fn check_memory(what: &str, mib: u64) -> Result<(), RequestError> {
    if mib == 0 {
        return Err(RequestError::Value(
            what.to_string(),
            "mem_size_mib must be more than 0".into(),
        ));
    }
    Ok(())
}

/// A rate limiter's token buckets. As in Firecracker, a bucket whose
/// `size` or `refill_time` is 0 limits nothing; the values are the spec's
/// `int64`, and the refill time must fit in nanoseconds.
fn check_limiter(what: &str, field: &str, r: Option<&RateLimiter>) -> Result<(), RequestError> {
    let Some(r) = r else { return Ok(()) };
    for (name, bucket) in [("bandwidth", &r.bandwidth), ("ops", &r.ops)] {
        let Some(b) = bucket else { continue };
        let burst = b.one_time_burst.unwrap_or(0);
        let wrong = if b.size > MAX_INT64 || burst > MAX_INT64 {
            Some(format!("is over {MAX_INT64}"))
        } else if b.refill_time > MAX_REFILL_TIME_MS {
            Some(format!(
                "has refill_time = {} ms, over {MAX_REFILL_TIME_MS}",
                b.refill_time
            ))
        } else {
            None
        };
        if let Some(wrong) = wrong {
            return Err(RequestError::Value(
                what.to_string(),
                format!("{field}.{name} {wrong}"),
            ));
        }
    }
    Ok(())
}

/// Whether `s` is a MAC address `aa:bb:cc:dd:ee:ff` (any case).
pub fn is_mac(s: &str) -> bool {
    let parts: Vec<&str> = s.split(':').collect();
    parts.len() == 6
        && parts
            .iter()
            .all(|p| p.len() == 2 && p.bytes().all(|b| b.is_ascii_hexdigit()))
}

impl Request {
    /// Picks the endpoint for `method` and `path` (query string already
    /// removed) and parses and checks `body`.
    pub fn parse(method: &str, path: &str, body: &[u8]) -> Result<Request, RequestError> {
        let what = format!("{method} {path}");
        let trimmed = path.trim_end_matches('/');
        let segments: Vec<&str> = trimmed.split('/').skip(1).collect();
        let no_body = |r: Request| {
            if body.iter().all(u8::is_ascii_whitespace) {
                Ok(r)
            } else {
                Err(RequestError::UnexpectedBody(what.clone()))
            }
        };
        let request = match (method, segments.as_slice()) {
            ("GET", []) => no_body(Request::GetInstanceInfo)?,
            ("GET", ["version"]) => no_body(Request::GetVersion)?,
            ("GET", ["machine-config"]) => no_body(Request::GetMachineConfig)?,
            ("GET", ["vm", "config"]) => no_body(Request::GetVmConfig)?,
            ("PUT", ["machine-config"]) => {
                let m: MachineConfiguration = parse_body(&what, body)?;
                check_vcpus(&what, m.vcpu_count)?;
                check_memory(&what, m.mem_size_mib)?;
                Request::PutMachineConfig(m)
            }
            ("PATCH", ["machine-config"]) => {
                let m: MachineConfigurationUpdate = parse_body(&what, body)?;
                if m == MachineConfigurationUpdate::default() {
                    // Firecracker's "Empty PATCH request".
                    return Err(RequestError::Value(
                        what,
                        "nothing to change: give at least one field".into(),
                    ));
                }
                if let Some(v) = m.vcpu_count {
                    check_vcpus(&what, v)?;
                }
                if let Some(mib) = m.mem_size_mib {
                    check_memory(&what, mib)?;
                }
                Request::PatchMachineConfig(m)
            }
            ("PUT", ["cpu-config"]) => Request::PutCpuConfig(parse_body(&what, body)?),
            ("PUT", ["boot-source"]) => {
                let b: BootSource = parse_body(&what, body)?;
                if b.kernel_image_path.is_empty() {
                    return Err(RequestError::Value(
                        what,
                        "kernel_image_path is empty".into(),
                    ));
                }
                Request::PutBootSource(b)
            }
            ("PUT", ["drives", id]) => {
                let d: Drive = parse_body(&what, body)?;
                check_path_id(&what, "drive_id", id, &d.drive_id)?;
                check_limiter(&what, "rate_limiter", d.rate_limiter.as_ref())?;
                Request::PutDrive(d)
            }
            ("PATCH", ["drives", id]) => {
                let d: PartialDrive = parse_body(&what, body)?;
                check_path_id(&what, "drive_id", id, &d.drive_id)?;
                check_limiter(&what, "rate_limiter", d.rate_limiter.as_ref())?;
                Request::PatchDrive(d)
            }
            ("PUT", ["network-interfaces", id]) => {
                let n: NetworkInterface = parse_body(&what, body)?;
                check_path_id(&what, "iface_id", id, &n.iface_id)?;
                if let Some(mac) = &n.guest_mac {
                    if !is_mac(mac) {
                        return Err(RequestError::Value(
                            what,
                            format!(
                                "guest_mac {mac:?} is not a MAC address like 06:00:AC:10:00:02"
                            ),
                        ));
                    }
                }
                if let Some(mtu) = n.mtu.filter(|m| !MTU_RANGE.contains(m)) {
                    return Err(RequestError::Value(
                        what,
                        format!("mtu = {mtu} is out of range: it must be 68 to 65535"),
                    ));
                }
                check_limiter(&what, "rx_rate_limiter", n.rx_rate_limiter.as_ref())?;
                check_limiter(&what, "tx_rate_limiter", n.tx_rate_limiter.as_ref())?;
                Request::PutNetworkInterface(n)
            }
            ("PATCH", ["network-interfaces", id]) => {
                let n: PartialNetworkInterface = parse_body(&what, body)?;
                check_path_id(&what, "iface_id", id, &n.iface_id)?;
                check_limiter(&what, "rx_rate_limiter", n.rx_rate_limiter.as_ref())?;
                check_limiter(&what, "tx_rate_limiter", n.tx_rate_limiter.as_ref())?;
                Request::PatchNetworkInterface(n)
            }
            ("PUT", ["actions"]) => {
                let a: InstanceActionInfo = parse_body(&what, body)?;
                Request::Action(a.action_type)
            }
            ("PATCH", ["vm"]) => {
                let v: Vm = parse_body(&what, body)?;
                Request::PatchVm(v.state)
            }
            ("PUT", ["snapshot", "create"]) => {
                let c: SnapshotCreateParams = parse_body(&what, body)?;
                if c.mem_file_path.is_empty() || c.snapshot_path.is_empty() {
                    return Err(RequestError::Value(
                        what,
                        "mem_file_path and snapshot_path must not be empty".into(),
                    ));
                }
                Request::CreateSnapshot(c)
            }
            ("PUT", ["snapshot", "load"]) => {
                let l: SnapshotLoadParams = parse_body(&what, body)?;
                check_load(&what, &l)?;
                Request::LoadSnapshot(l)
            }
            ("PUT", ["api", "v1", "vm.send-migration"]) => {
                let m: SendMigrationData = parse_body(&what, body)?;
                check_send_migration(&what, &m)?;
                Request::SendMigration(m)
            }
            ("PUT", ["api", "v1", "vm.receive-migration"]) => {
                let m: ReceiveMigrationData = parse_body(&what, body)?;
                check_receive_migration(&what, &m)?;
                Request::ReceiveMigration(m)
            }
            ("GET", ["api", "v1", "vm.migration-status"]) => no_body(Request::GetMigration)?,
            ("PUT", ["api", "v1", "vm.migration-cancel"]) => no_body(Request::CancelMigration)?,
            ("PUT", ["api", "v1", "vm.power-button"]) => no_body(Request::PowerButton)?,
            ("GET", ["balloon"]) => no_body(Request::GetBalloon)?,
            ("PUT", ["balloon"]) => {
                let b: crate::balloon::Balloon = parse_body(&what, body)?;
                if b.free_page_hinting == Some(true) {
                    return Err(RequestError::Value(
                        what,
                        "free_page_hinting is not supported by ember (use free_page_reporting)"
                            .into(),
                    ));
                }
                Request::PutBalloon(b)
            }
            ("PATCH", ["balloon"]) => Request::PatchBalloon(parse_body(&what, body)?),
            ("PUT", ["vsock"]) => {
                let v: crate::model::Vsock = parse_body(&what, body)?;
                if v.guest_cid < 3 || v.guest_cid > u64::from(u32::MAX) {
                    return Err(RequestError::Value(
                        what,
                        format!(
                            "guest_cid = {} is not a guest context id (3 to {})",
                            v.guest_cid,
                            u32::MAX
                        ),
                    ));
                }
                if v.uds_path.is_empty() {
                    return Err(RequestError::Value(what, "uds_path is empty".into()));
                }
                Request::PutVsock(v)
            }
            ("PUT", ["entropy"]) => {
                let e: crate::model::EntropyDevice = parse_body(&what, body)?;
                check_limiter(&what, "rate_limiter", e.rate_limiter.as_ref())?;
                Request::PutEntropy(e)
            }
            ("GET", ["balloon", "statistics"]) => no_body(Request::GetBalloonStats)?,
            ("PATCH", ["balloon", "statistics"]) => {
                Request::PatchBalloonStats(parse_body(&what, body)?)
            }
            ("PUT", ["logger"]) => Request::PutLogger(parse_body(&what, body)?),
            ("PUT", ["metrics"]) => {
                let m: Metrics = parse_body(&what, body)?;
                if m.metrics_path.is_empty() {
                    return Err(RequestError::Value(what, "metrics_path is empty".into()));
                }
                Request::PutMetrics(m)
            }
            _ => return Err(unsupported_or_invalid(method, path, &segments)),
        };
        Ok(request)
    }
}

fn unsupported_or_invalid(method: &str, path: &str, segments: &[&str]) -> RequestError {
    let unsupported = UNSUPPORTED.iter().find(|(m, spec_path, _)| {
        let spec: Vec<&str> = spec_path.split('/').skip(1).collect();
        *m == method
            && spec.len() == segments.len()
            && spec
                .iter()
                .zip(segments)
                .all(|(s, p)| *s == *p || (*s == "{id}" && !p.is_empty()))
    });
    match unsupported {
        Some((_, _, feature)) => RequestError::Unsupported {
            method: method.to_string(),
            path: path.to_string(),
            feature,
        },
        None => RequestError::InvalidPathMethod(method.to_string(), path.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(method: &str, path: &str, body: &str) -> Request {
        Request::parse(method, path, body.as_bytes())
            .unwrap_or_else(|e| panic!("{method} {path} {body}: {e}"))
    }

    fn err(method: &str, path: &str, body: &str) -> RequestError {
        Request::parse(method, path, body.as_bytes()).unwrap_err()
    }

    #[test]
    fn request_every_route_parses() {
        assert_eq!(ok("GET", "/", ""), Request::GetInstanceInfo);
        assert_eq!(ok("GET", "/version", ""), Request::GetVersion);
        assert_eq!(ok("GET", "/machine-config", ""), Request::GetMachineConfig);
        assert_eq!(ok("GET", "/vm/config", ""), Request::GetVmConfig);
        assert!(matches!(
            ok("PUT", "/snapshot/create", r#"{"mem_file_path":"m","snapshot_path":"s","snapshot_type":"Diff"}"#),
            Request::CreateSnapshot(c) if c.snapshot_type == Some(crate::model::SnapshotType::Diff)
        ));
        assert!(matches!(
            ok("PUT", "/snapshot/load", r#"{"snapshot_path":"s","mem_backend":{"backend_type":"Uffd","backend_path":"/u"},"resume_vm":true}"#),
            Request::LoadSnapshot(l) if l.resume_vm == Some(true)
        ));
        for body in [
            r#"{"snapshot_path":"s"}"#,
            r#"{"snapshot_path":"s","mem_file_path":"m","mem_backend":{"backend_type":"File","backend_path":"m"}}"#,
            r#"{"snapshot_path":"","mem_file_path":"m"}"#,
            r#"{"snapshot_path":"s","mem_file_path":"m","network_overrides":[{"iface_id":"a b","host_dev_name":"t"}]}"#,
        ] {
            assert!(
                Request::parse("PUT", "/snapshot/load", body.as_bytes()).is_err(),
                "{body}"
            );
        }
        assert!(matches!(
            ok("PUT", "/machine-config", r#"{"vcpu_count":2,"mem_size_mib":256}"#),
            Request::PutMachineConfig(m) if m.vcpu_count == 2
        ));
        assert!(matches!(
            ok("PATCH", "/machine-config", r#"{"mem_size_mib":512}"#),
            Request::PatchMachineConfig(m) if m.mem_size_mib == Some(512)
        ));
        assert!(matches!(
            ok("PUT", "/boot-source", r#"{"kernel_image_path":"/k"}"#),
            Request::PutBootSource(_)
        ));
        assert!(matches!(
            ok(
                "PUT",
                "/drives/root",
                r#"{"drive_id":"root","path_on_host":"/r","is_root_device":true}"#
            ),
            Request::PutDrive(_)
        ));
        assert!(matches!(
            ok(
                "PATCH",
                "/drives/root",
                r#"{"drive_id":"root","path_on_host":"/s"}"#
            ),
            Request::PatchDrive(_)
        ));
        assert!(matches!(
            ok(
                "PUT",
                "/network-interfaces/eth0",
                r#"{"iface_id":"eth0","host_dev_name":"tap0","guest_mac":"06:00:AC:10:00:02"}"#
            ),
            Request::PutNetworkInterface(_)
        ));
        assert!(matches!(
            ok(
                "PATCH",
                "/network-interfaces/eth0",
                r#"{"iface_id":"eth0"}"#
            ),
            Request::PatchNetworkInterface(_)
        ));
        assert_eq!(
            ok("PUT", "/actions", r#"{"action_type":"InstanceStart"}"#),
            Request::Action(ActionType::InstanceStart)
        );
        assert_eq!(
            ok("PATCH", "/vm", r#"{"state":"Paused"}"#),
            Request::PatchVm(VmState::Paused)
        );
        assert!(matches!(
            ok("PUT", "/logger", r#"{"level":"Debug","show_level":true}"#),
            Request::PutLogger(_)
        ));
        assert!(matches!(
            ok("PUT", "/metrics", r#"{"metrics_path":"/m"}"#),
            Request::PutMetrics(_)
        ));
    }

    #[test]
    fn request_cloud_hypervisor_migration_bodies_parse_and_bad_values_name_the_field() {
        // ch-remote's bodies, byte for byte (every field, nulls included).
        let send = r#"{"destination_url":"tcp:10.0.0.2:6000","local":false,"preserve_source":false,"downtime_ms":300,"timeout_s":3600,"timeout_strategy":"Cancel","connections":1,"tls_dir":null,"memory_mode":"Precopy"}"#;
        let Request::SendMigration(m) = ok("PUT", "/api/v1/vm.send-migration", send) else {
            panic!()
        };
        assert_eq!(m.downtime_ms, Some(300));
        assert_eq!(
            m.timeout_strategy,
            Some(crate::model::TimeoutStrategy::Cancel)
        );
        let recv = r#"{"receiver_url":"unix:/tmp/sock","tls_dir":null,"memory_mode":"Precopy","vfio_fds":null,"iommufd_fd":null,"zone_updates":[]}"#;
        assert!(matches!(
            ok("PUT", "/api/v1/vm.receive-migration", recv),
            Request::ReceiveMigration(_)
        ));
        assert_eq!(
            ok("GET", "/api/v1/vm.migration-status", ""),
            Request::GetMigration
        );
        assert_eq!(
            ok("PUT", "/api/v1/vm.migration-cancel", ""),
            Request::CancelMigration
        );
        assert_eq!(
            ok("PUT", "/api/v1/vm.power-button", ""),
            Request::PowerButton
        );
        assert!(matches!(
            err("GET", "/api/v1/vm.power-button", ""),
            RequestError::InvalidPathMethod(..)
        ));
        assert!(matches!(
            err("PUT", "/api/v1/vm.power-button", "{}"),
            RequestError::UnexpectedBody(_)
        ));
        for (body, needle) in [
            (r#"{"destination_url":"http://x"}"#, "destination_url"),
            (r#"{"destination_url":"tcp:1.2.3.4"}"#, "destination_url"),
            (
                r#"{"destination_url":"unix:/s","connections":4}"#,
                "connections = 4",
            ),
            (
                r#"{"destination_url":"unix:/s","connections":129}"#,
                "out of range",
            ),
            (
                r#"{"destination_url":"unix:/s","downtime_ms":0}"#,
                "downtime_ms",
            ),
            (
                r#"{"destination_url":"unix:/s","timeout_s":0}"#,
                "timeout_s",
            ),
            (r#"{"destination_url":"tcp:a:1","tls_dir":"/t"}"#, "tls_dir"),
            (r#"{"destination_url":"tcp:a:1","local":true}"#, "local"),
            (
                r#"{"destination_url":"unix:/s","preserve_source":true}"#,
                "preserve_source",
            ),
            (
                r#"{"destination_url":"unix:/s","memory_mode":"Later"}"#,
                "expected `Precopy` or `Postcopy`",
            ),
            (r#"{"destination_url":"unix:/s","speed":1}"#, "speed"),
        ] {
            let e = err("PUT", "/api/v1/vm.send-migration", body).to_string();
            assert!(e.contains(needle), "{body}: {e}");
        }
        for (body, needle) in [
            (r#"{"receiver_url":"unix:"}"#, "receiver_url"),
            (
                r#"{"receiver_url":"unix:/s","vfio_fds":[{"id":"a"}]}"#,
                "vfio_fds",
            ),
            (
                r#"{"receiver_url":"unix:/s","zone_updates":[{"id":"a","host_numa_node":1}]}"#,
                "zone_updates",
            ),
        ] {
            let e = err("PUT", "/api/v1/vm.receive-migration", body).to_string();
            assert!(e.contains(needle), "{body}: {e}");
        }
    }

    #[test]
    fn request_vsock_and_entropy_bodies_parse_and_bad_ones_are_named() {
        assert_eq!(
            ok(
                "PUT",
                "/vsock",
                r#"{"guest_cid":3,"uds_path":"./v.sock","vsock_id":"vsock0"}"#
            ),
            Request::PutVsock(crate::model::Vsock {
                guest_cid: 3,
                uds_path: "./v.sock".into(),
                vsock_id: Some("vsock0".into()),
            })
        );
        assert_eq!(
            ok("PUT", "/entropy", "{}"),
            Request::PutEntropy(crate::model::EntropyDevice::default())
        );
        let limited = ok(
            "PUT",
            "/entropy",
            r#"{"rate_limiter":{"bandwidth":{"size":1000,"refill_time":100}}}"#,
        );
        assert!(matches!(limited, Request::PutEntropy(e) if e.rate_limiter.is_some()));
        for (path, body, needle) in [
            (
                "/vsock",
                r#"{"guest_cid":2,"uds_path":"v"}"#,
                "guest_cid = 2 is not a guest context id",
            ),
            (
                "/vsock",
                r#"{"guest_cid":4294967296,"uds_path":"v"}"#,
                "is not a guest context id",
            ),
            (
                "/vsock",
                r#"{"guest_cid":3,"uds_path":""}"#,
                "uds_path is empty",
            ),
            ("/vsock", r#"{"guest_cid":3}"#, "missing field `uds_path`"),
            (
                "/vsock",
                r#"{"guest_cid":3,"uds_path":"v","port":1}"#,
                "unknown field `port`",
            ),
            ("/entropy", r#"{"rate":1}"#, "unknown field `rate`"),
            (
                "/entropy",
                r#"{"rate_limiter":{"ops":{"size":1,"refill_time":18446744073709551615}}}"#,
                "rate_limiter.ops has refill_time",
            ),
        ] {
            let e = err("PUT", path, body).to_string();
            assert!(e.contains(needle), "{path} {body}: {e}");
        }
    }

    #[test]
    fn request_balloon_bodies_parse_and_bad_ones_are_named() {
        let ok = |m: &str, p: &str, b: &str| Request::parse(m, p, b.as_bytes()).unwrap();
        assert_eq!(
            ok(
                "PUT",
                "/balloon",
                r#"{"amount_mib":64,"deflate_on_oom":true,"stats_polling_interval_s":1,"free_page_reporting":true}"#
            ),
            Request::PutBalloon(crate::balloon::Balloon {
                amount_mib: 64,
                deflate_on_oom: true,
                stats_polling_interval_s: 1,
                free_page_hinting: None,
                free_page_reporting: true,
            })
        );
        assert_eq!(ok("GET", "/balloon", ""), Request::GetBalloon);
        assert_eq!(
            ok("GET", "/balloon/statistics", ""),
            Request::GetBalloonStats
        );
        assert_eq!(
            ok("PATCH", "/balloon", r#"{"amount_mib":0}"#),
            Request::PatchBalloon(crate::balloon::BalloonUpdate { amount_mib: 0 })
        );
        assert_eq!(
            ok(
                "PATCH",
                "/balloon/statistics",
                r#"{"stats_polling_interval_s":5}"#
            ),
            Request::PatchBalloonStats(crate::balloon::BalloonStatsUpdate {
                stats_polling_interval_s: 5
            })
        );
        for (m, p, body, needle) in [
            (
                "PUT",
                "/balloon",
                r#"{"amount_mib":64}"#,
                "missing field `deflate_on_oom`",
            ),
            (
                "PUT",
                "/balloon",
                r#"{"amount_mib":-1,"deflate_on_oom":true}"#,
                "invalid value",
            ),
            (
                "PUT",
                "/balloon",
                r#"{"amount_mib":1,"deflate_on_oom":true,"size":2}"#,
                "unknown field `size`",
            ),
            (
                "PUT",
                "/balloon",
                r#"{"amount_mib":1,"deflate_on_oom":true,"free_page_hinting":true}"#,
                "free_page_hinting is not supported",
            ),
            ("PATCH", "/balloon", r#"{}"#, "missing field `amount_mib`"),
            (
                "PATCH",
                "/balloon/statistics",
                r#"{"stats_polling_interval_s":70000}"#,
                "invalid value",
            ),
            ("GET", "/balloon", "{}", "takes no body"),
        ] {
            let e = err(m, p, body).to_string();
            assert!(e.contains(needle), "{m} {p} {body}: {e}");
        }
    }

    #[test]
    fn request_unsupported_spec_endpoints_say_so() {
        for (method, path) in [
            ("GET", "/mmds"),
            ("PUT", "/mmds/config"),
            ("PUT", "/serial"),
            ("PUT", "/pmem/p0"),
            ("PUT", "/hotplug/memory"),
            ("PATCH", "/hotplug/memory"),
            ("PATCH", "/balloon/hinting/start"),
            ("GET", "/balloon/hinting/status"),
            ("PATCH", "/pmem/p0"),
            ("PATCH", "/mmds"),
        ] {
            let e = err(method, path, "{}");
            assert!(
                matches!(e, RequestError::Unsupported { .. }),
                "{method} {path}: {e}"
            );
            assert!(e.to_string().contains("not supported"), "{e}");
            assert_eq!(e.status(), 400);
        }
    }

    #[test]
    fn request_unknown_path_or_method_is_invalid() {
        for (method, path) in [
            ("GET", "/nothing"),
            ("DELETE", "/machine-config"),
            ("POST", "/actions"),
            ("GET", "/drives"),
            ("PUT", "/drives/a/b"),
            ("BREW", "/"),
            // Spec paths, but not with these methods.
            ("GET", "/vsock"),
            ("PATCH", "/snapshot/create"),
            ("DELETE", "/balloon"),
            ("PUT", "/balloon/statistics"),
            ("PUT", "/pmem"),
            ("PUT", "/pmem/a/b"),
            ("PUT", "/vm"),
            ("PUT", "/version"),
        ] {
            let e = err(method, path, "");
            assert!(
                matches!(e, RequestError::InvalidPathMethod(..)),
                "{method} {path}: {e}"
            );
            assert!(e
                .to_string()
                .starts_with("Invalid request method and/or path"));
        }
    }

    #[test]
    fn request_bad_bodies_are_refused_with_what_is_wrong() {
        let mc = "/machine-config";
        let cases = [
            ("{", "EOF"),
            (
                r#"{"vcpu_count":1,"mem_size_mib":8,"foo":1}"#,
                "unknown field `foo`",
            ),
            (r#"{"vcpu_count":"two","mem_size_mib":8}"#, "invalid type"),
            (r#"{"vcpu_count":1}"#, "missing field `mem_size_mib`"),
            (r#"{"vcpu_count":0,"mem_size_mib":8}"#, "vcpu_count = 0"),
            (r#"{"vcpu_count":33,"mem_size_mib":8}"#, "1 to 32"),
            (r#"{"vcpu_count":-1,"mem_size_mib":8}"#, "invalid value"),
            (r#"{"vcpu_count":1,"mem_size_mib":0}"#, "mem_size_mib"),
            ("", "needs a JSON body"),
        ];
        for (body, needle) in cases {
            let e = err("PUT", mc, body);
            assert!(e.to_string().contains(needle), "{body}: {e}");
            assert!(!e.to_string().contains('\n'));
        }
        assert!(matches!(
            err("GET", "/", "{}"),
            RequestError::UnexpectedBody(_)
        ));
    }

    #[test]
    fn request_ids_must_match_and_be_well_formed() {
        let e = err(
            "PUT",
            "/drives/a",
            r#"{"drive_id":"b","path_on_host":"/r","is_root_device":false}"#,
        );
        assert!(e.to_string().contains("differs"), "{e}");
        let e = err(
            "PUT",
            "/drives/a-b",
            r#"{"drive_id":"a-b","path_on_host":"/r","is_root_device":false}"#,
        );
        assert!(e.to_string().contains("A-Z"), "{e}");
        let long = "x".repeat(65);
        let e = err(
            "PUT",
            &format!("/network-interfaces/{long}"),
            &format!(r#"{{"iface_id":"{long}","host_dev_name":"t"}}"#),
        );
        assert!(e.to_string().contains("64"), "{e}");
    }

    #[test]
    fn request_bad_mac_and_rate_limiter_are_refused() {
        for mac in ["06:00:AC:10:00", "zz:00:AC:10:00:02", "0600AC100002"] {
            let e = err(
                "PUT",
                "/network-interfaces/eth0",
                &format!(r#"{{"iface_id":"eth0","host_dev_name":"tap0","guest_mac":"{mac}"}}"#),
            );
            assert!(e.to_string().contains("MAC"), "{mac}: {e}");
        }
    }

    #[test]
    fn request_token_buckets_follow_firecrackers_rules() {
        let drive = |limiter: &str| {
            format!(r#"{{"drive_id":"d","is_root_device":false,"rate_limiter":{limiter}}}"#)
        };
        // A zero size or refill time disables the bucket, as in Firecracker.
        for ok_limiter in [
            r#"{"bandwidth":{"size":10,"refill_time":0}}"#,
            r#"{"ops":{"size":0,"one_time_burst":0,"refill_time":0}}"#,
            r#"{"bandwidth":{"size":5000,"refill_time":100},"ops":{"size":500,"refill_time":100}}"#,
            r#"{}"#,
        ] {
            assert!(
                matches!(
                    ok("PUT", "/drives/d", &drive(ok_limiter)),
                    Request::PutDrive(_)
                ),
                "{ok_limiter}"
            );
        }
        let too_big = format!(r#"{{"bandwidth":{{"size":{},"refill_time":1}}}}"#, u64::MAX);
        let e = err("PUT", "/drives/d", &drive(&too_big));
        assert!(
            e.to_string().contains("rate_limiter.bandwidth is over"),
            "{e}"
        );
        let slow = format!(
            r#"{{"ops":{{"size":1,"refill_time":{}}}}}"#,
            u64::MAX / 999_999
        );
        let e = err("PUT", "/drives/d", &drive(&slow));
        assert!(
            e.to_string().contains("rate_limiter.ops has refill_time"),
            "{e}"
        );
        let e = err(
            "PATCH",
            "/network-interfaces/n",
            &format!(r#"{{"iface_id":"n","tx_rate_limiter":{too_big}}}"#),
        );
        assert!(e.to_string().contains("tx_rate_limiter.bandwidth"), "{e}");
        // A missing required field of a bucket is a body error.
        let e = err("PUT", "/drives/d", &drive(r#"{"ops":{"size":100}}"#));
        assert!(e.to_string().contains("missing field `refill_time`"), "{e}");
    }

    #[test]
    fn request_mtu_outside_the_spec_range_is_refused() {
        let net = |mtu: u32| format!(r#"{{"iface_id":"n","host_dev_name":"t","mtu":{mtu}}}"#);
        for good in [68, 1500, 65535] {
            assert!(matches!(
                ok("PUT", "/network-interfaces/n", &net(good)),
                Request::PutNetworkInterface(n) if n.mtu == Some(good)
            ));
        }
        for bad in [0, 67, 65536] {
            let e = err("PUT", "/network-interfaces/n", &net(bad));
            assert!(e.to_string().contains("mtu"), "{bad}: {e}");
        }
    }

    #[test]
    fn request_empty_patch_is_refused() {
        let e = err("PATCH", "/machine-config", "{}");
        assert!(e.to_string().contains("nothing to change"), "{e}");
        // PATCH /drives with only the id is Firecracker's no-op, not an error.
        assert!(matches!(
            ok("PATCH", "/drives/a", r#"{"drive_id":"a"}"#),
            Request::PatchDrive(_)
        ));
    }
}
