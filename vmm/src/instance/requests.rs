//! What the VMM thread does with each API request.

use ember_api::model::{ActionType, FirecrackerVersion, InstanceInfo, VmState};
use ember_api::{Request, Response};

use super::{Instance, LifecycleError, State};
use crate::config::firecracker as fc;
use crate::config::{ConfigError, VmConfig};

/// Ember's version, as `GET /` and `GET /version` report it.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");

fn bad_request(e: &dyn std::error::Error) -> Response {
    Response::fault(400, &crate::error_chain(e))
}

impl Instance {
    /// Answers one API request, and counts it in the metrics.
    pub(super) fn handle(&mut self, request: Request) -> Response {
        log::debug!("api: {request:?}");
        let (group, name) = metric_name(&request);
        let response = self.dispatch(request);
        self.metrics.count_api(group, name, response.status >= 400);
        response
    }

    fn dispatch(&mut self, request: Request) -> Response {
        if matches!(
            request,
            Request::PatchVm(_)
                | Request::CreateSnapshot(_)
                | Request::PatchDrive(_)
                | Request::SendMigration(_)
        ) {
            if let Err(e) = self.require_not_migrating() {
                return bad_request(&e);
            }
        }
        match request {
            Request::GetInstanceInfo => Response::json(
                200,
                &InstanceInfo {
                    app_name: "ember".into(),
                    id: self.id.clone(),
                    state: self.state.api_name().into(),
                    vmm_version: VERSION.into(),
                },
            ),
            Request::GetVersion => Response::json(
                200,
                &FirecrackerVersion {
                    firecracker_version: VERSION.into(),
                },
            ),
            Request::GetMachineConfig => {
                Response::json(200, &fc::machine_to_api(&self.config.machine))
            }
            Request::GetVmConfig => Response::json(200, &fc::to_api(&self.config)),
            Request::PutMachineConfig(m) => self.change(|c| fc::apply_machine(c, &m)),
            Request::PatchMachineConfig(m) => self.change(|c| fc::apply_machine_update(c, &m)),
            Request::PutBootSource(b) => self.change(|c| fc::apply_boot_source(c, &b)),
            Request::PutCpuConfig(t) => self.change(|c| fc::apply_cpu_config(c, &t)),
            Request::PutDrive(d) => self.change(|c| fc::apply_drive(c, &d)),
            Request::PutNetworkInterface(n) => self.change(|c| fc::apply_net(c, &n)),
            Request::PatchDrive(d) => {
                if let Some(path) = &d.path_on_host {
                    if let Err(e) = self.patch_drive(&d.drive_id, std::path::Path::new(path)) {
                        return bad_request(&e);
                    }
                }
                if let Some(l) = &d.rate_limiter {
                    let l = fc::limiter_from_api(l);
                    if let Err(e) = self.patch_drive_rate_limit(&d.drive_id, &l) {
                        return bad_request(&e);
                    }
                }
                Response::no_content()
            }
            Request::PatchNetworkInterface(n) => {
                let rx = n.rx_rate_limiter.as_ref().map(fc::limiter_from_api);
                let tx = n.tx_rate_limiter.as_ref().map(fc::limiter_from_api);
                match self.patch_net_rate_limits(&n.iface_id, rx.as_ref(), tx.as_ref()) {
                    Ok(()) => Response::no_content(),
                    Err(e) => bad_request(&e),
                }
            }
            Request::Action(action) => self.action(action),
            Request::PatchVm(VmState::Paused) => match self.pause() {
                Ok(_) => Response::no_content(),
                Err(e) => bad_request(&e),
            },
            Request::PatchVm(VmState::Resumed) => match self.resume() {
                Ok(_) => Response::no_content(),
                Err(e) => bad_request(&e),
            },
            Request::PowerButton => self.press("power button", crate::Vmm::press_power_button),
            Request::SendMigration(m) => match self.send_migration(&m) {
                Ok(()) => Response::no_content(),
                Err(e) => bad_request(&e),
            },
            Request::ReceiveMigration(m) => {
                let url = match crate::migration::parse_url(&m.receiver_url) {
                    Ok(u) => u,
                    Err(e) => return bad_request(&e),
                };
                if let Err(e) = self.require_not_started() {
                    return bad_request(&e);
                }
                match self.receive_migration(&url) {
                    Ok(()) => Response::no_content(),
                    // As Cloud Hypervisor: a migration that could not be
                    // received is a 500.
                    Err(e) => Response::fault(500, &crate::error_chain(&e)),
                }
            }
            Request::GetMigration => match self.migration_progress() {
                Some(p) => Response::json(200, &p),
                None => Response::json(
                    200,
                    &crate::migration::Progress {
                        state: "none".into(),
                        ..Default::default()
                    },
                ),
            },
            Request::CancelMigration => match self.cancel_migration() {
                Ok(()) => Response::no_content(),
                Err(e) => bad_request(&e),
            },
            Request::GetBalloon
            | Request::PutBalloon(_)
            | Request::PatchBalloon(_)
            | Request::GetBalloonStats
            | Request::PatchBalloonStats(_) => self.balloon_request(request),
            Request::PutVsock(v) => self.change(|c| fc::apply_vsock(c, &v)),
            Request::PutEntropy(e) => self.change(|c| fc::apply_entropy(c, &e)),
            Request::CreateSnapshot(c) => self.api_create_snapshot(&c),
            Request::LoadSnapshot(l) => self.api_load_snapshot(&l),
            Request::PutLogger(l) => self.put_logger(&l),
            Request::PutMetrics(m) => {
                if let Err(e) = self.require_not_started() {
                    return bad_request(&e);
                }
                let props = m.properties.clone().unwrap_or_default();
                match self.set_metrics(
                    std::path::Path::new(&m.metrics_path),
                    m.emit_id.unwrap_or(false),
                    props,
                ) {
                    Ok(()) => Response::no_content(),
                    Err(e) => bad_request(&e),
                }
            }
        }
    }

    /// The balloon endpoints: before boot they read and change the
    /// configuration; after, the running device (Firecracker's rules: `PUT`
    /// only before boot, statistics only if enabled before boot).
    fn balloon_request(&mut self, request: Request) -> Response {
        let no_balloon = || {
            Response::fault(
                400,
                "no balloon device is configured (PUT /balloon before boot)",
            )
        };
        let running = self
            .vmm
            .as_ref()
            .filter(|_| matches!(self.state, State::Running | State::Paused));
        match (request, running) {
            (Request::PutBalloon(b), _) => self.change(|c| fc::apply_balloon(c, &b)),
            (Request::GetBalloon, None) => match &self.config.balloon {
                Some(b) => Response::json(200, &fc::balloon_to_api(b)),
                None => no_balloon(),
            },
            (Request::GetBalloon, Some(vmm)) => match vmm.balloon_config() {
                Ok(b) => Response::json(200, &fc::balloon_to_api(&b)),
                Err(_) => no_balloon(),
            },
            (Request::PatchBalloon(u), None) => {
                if self.config.balloon.is_none() {
                    return no_balloon();
                }
                self.change(|c| {
                    let mut b = c.balloon.unwrap_or_default();
                    b.amount_mib = u.amount_mib;
                    let backend = c.machine.memory_backend()?;
                    crate::config::balloon::validate(&b, c.machine.memory_mib, &backend)?;
                    c.balloon = Some(b);
                    Ok(())
                })
            }
            (Request::PatchBalloon(u), Some(vmm)) => match vmm.set_balloon_target(u.amount_mib) {
                Ok(()) => Response::no_content(),
                Err(e) => bad_request(&e),
            },
            // Before boot the statistics queue can still come or go.
            (Request::PatchBalloonStats(u), None) => match self.config.balloon {
                None => no_balloon(),
                Some(_) => self.change(|c| {
                    if let Some(b) = c.balloon.as_mut() {
                        b.stats_polling_interval_s = u.stats_polling_interval_s;
                    }
                    Ok(())
                }),
            },
            (Request::PatchBalloonStats(u), Some(vmm)) => {
                match vmm.set_balloon_stats_interval(u.stats_polling_interval_s) {
                    Ok(()) => Response::no_content(),
                    Err(e) => bad_request(&e),
                }
            }
            (Request::GetBalloonStats, None) => match self.config.balloon {
                None => no_balloon(),
                Some(_) => {
                    Response::fault(400, "the balloon's statistics exist once the microVM runs")
                }
            },
            (Request::GetBalloonStats, Some(vmm)) => match vmm.balloon_stats() {
                Ok(s) => {
                    let mib = |p: u32| p / 256;
                    Response::json(
                        200,
                        &ember_api::balloon::BalloonStats {
                            target_pages: s.target_pages,
                            actual_pages: s.actual_pages,
                            target_mib: mib(s.target_pages),
                            actual_mib: mib(s.actual_pages),
                            values: s.values.iter().map(|(k, v)| (k.to_string(), *v)).collect(),
                        },
                    )
                }
                Err(e) => bad_request(&e),
            },
            _ => Response::fault(500, "not a balloon request"),
        }
    }

    /// A pre-boot configuration change: applied to a copy and committed
    /// only if it is valid.
    fn change(&mut self, apply: impl FnOnce(&mut VmConfig) -> Result<(), ConfigError>) -> Response {
        if let Err(e) = self.require_not_started() {
            return bad_request(&e);
        }
        let mut cfg = self.config.clone();
        match apply(&mut cfg) {
            Ok(()) => {
                self.config = cfg;
                Response::no_content()
            }
            Err(e) => bad_request(&e),
        }
    }

    /// Presses a button of the running guest's (Ctrl-Alt-Del, power).
    fn press(&self, what: &str, button: fn(&crate::Vmm) -> crate::Result<()>) -> Response {
        match (self.state, self.vmm.as_ref()) {
            (State::Running, Some(vmm)) => match button(vmm) {
                Ok(()) => Response::no_content(),
                Err(e) => bad_request(&e),
            },
            (State::Paused, _) => Response::fault(
                400,
                &format!("{what}: the microVM is paused; resume it first"),
            ),
            _ => bad_request(&LifecycleError::NotStarted),
        }
    }

    fn action(&mut self, action: ActionType) -> Response {
        match action {
            ActionType::InstanceStart => match self.start() {
                Ok(()) => Response::no_content(),
                Err(e) => bad_request(&e),
            },
            ActionType::SendCtrlAltDel => {
                self.press("SendCtrlAltDel", crate::Vmm::send_ctrl_alt_del)
            }
            ActionType::FlushMetrics => match self.flush_metrics() {
                Ok(()) => Response::no_content(),
                Err(e) => bad_request(&e),
            },
        }
    }

    fn api_create_snapshot(&mut self, c: &ember_api::model::SnapshotCreateParams) -> Response {
        use ember_api::model::SnapshotType;
        let params = crate::snapshot::CreateParams {
            state_path: c.snapshot_path.clone().into(),
            mem_path: c.mem_file_path.clone().into(),
            kind: match c.snapshot_type.unwrap_or_default() {
                SnapshotType::Full => ember_snapshot::SnapshotKind::Full,
                SnapshotType::Diff => ember_snapshot::SnapshotKind::Diff,
            },
        };
        match self.create_snapshot(&params) {
            Ok(_) => Response::no_content(),
            Err(e) => bad_request(&e),
        }
    }

    fn api_load_snapshot(&mut self, l: &ember_api::model::SnapshotLoadParams) -> Response {
        use ember_api::model::MemoryBackendType;
        if l.clock_realtime == Some(true) {
            return Response::fault(400, "clock_realtime is not supported by ember yet");
        }
        if let Some(h) = l
            .huge_pages
            .as_deref()
            .filter(|h| !matches!(*h, "Snapshot" | "None"))
        {
            return Response::fault(
                400,
                &format!("huge_pages = {h} is not supported by ember yet"),
            );
        }
        let memory = match (&l.mem_backend, &l.mem_file_path) {
            (Some(b), _) if b.backend_type == MemoryBackendType::Uffd => {
                crate::snapshot::MemorySource::Uffd(b.backend_path.clone().into())
            }
            (Some(b), _) => crate::snapshot::MemorySource::File(b.backend_path.clone().into()),
            (None, Some(p)) => crate::snapshot::MemorySource::File(p.into()),
            (None, None) => {
                return Response::fault(
                    400,
                    "missing field: either `mem_backend` or `mem_file_path`",
                )
            }
        };
        let params = crate::snapshot::LoadParams {
            state_path: l.snapshot_path.clone().into(),
            memory,
            network_overrides: l
                .network_overrides
                .iter()
                .flatten()
                .map(|o| (o.iface_id.clone(), o.host_dev_name.clone()))
                .collect(),
            disk_overrides: Vec::new(),
            track_dirty_pages: l.track_dirty_pages.or(l.enable_diff_snapshots) == Some(true),
            vsock_override: l.vsock_override.as_ref().map(|v| v.uds_path.clone().into()),
        };
        match self.load_snapshot(&params, l.resume_vm.unwrap_or(false)) {
            Ok(()) => Response::no_content(),
            Err(e) => bad_request(&e),
        }
    }

    /// `PUT /logger`, before start (as Firecracker): all or nothing.
    fn put_logger(&mut self, l: &ember_api::model::Logger) -> Response {
        if let Err(e) = self.require_not_started() {
            return bad_request(&e);
        }
        let mut settings = crate::logger::settings();
        if let Some(level) = &l.level {
            settings.level = level_filter(*level);
        }
        if let Some(path) = &l.log_path {
            settings.path = Some(path.into());
        }
        if let Some(v) = l.show_level {
            settings.show_level = v;
        }
        if let Some(v) = l.show_log_origin {
            settings.show_origin = v;
        }
        if let Some(m) = &l.module {
            // Firecracker's `module` is a module path to keep: everything
            // else goes quiet.
            settings.modules = Some(format!("off,{m}={}", settings.level));
        }
        match crate::logger::reconfigure(settings) {
            Ok(()) => Response::no_content(),
            Err(e) => bad_request(&e),
        }
    }
}

fn level_filter(l: ember_api::model::LogLevel) -> log::LevelFilter {
    use ember_api::model::LogLevel as L;
    match l {
        L::Off => log::LevelFilter::Off,
        L::Error => log::LevelFilter::Error,
        L::Warning => log::LevelFilter::Warn,
        L::Info => log::LevelFilter::Info,
        L::Debug => log::LevelFilter::Debug,
        L::Trace => log::LevelFilter::Trace,
    }
}

/// Firecracker's metric group and counter for a request.
fn metric_name(r: &Request) -> (&'static str, &'static str) {
    const GET: &str = "get_api_requests";
    const PUT: &str = "put_api_requests";
    const PATCH: &str = "patch_api_requests";
    match r {
        Request::GetInstanceInfo => (GET, "instance_info_count"),
        Request::GetVersion => (GET, "vmm_version_count"),
        Request::GetMachineConfig => (GET, "machine_cfg_count"),
        Request::GetVmConfig => (GET, "vm_config_count"),
        Request::PutMachineConfig(_) => (PUT, "machine_cfg_count"),
        Request::PatchMachineConfig(_) => (PATCH, "machine_cfg_count"),
        Request::PutBootSource(_) => (PUT, "boot_source_count"),
        Request::PutCpuConfig(_) => (PUT, "cpu_cfg_count"),
        Request::PutDrive(_) => (PUT, "drive_count"),
        Request::PatchDrive(_) => (PATCH, "drive_count"),
        Request::PutNetworkInterface(_) => (PUT, "network_count"),
        Request::PatchNetworkInterface(_) => (PATCH, "network_count"),
        Request::Action(_) => (PUT, "actions_count"),
        Request::PatchVm(_) => (PATCH, "vm_count"),
        Request::PutLogger(_) => (PUT, "logger_count"),
        Request::PutMetrics(_) => (PUT, "metrics_count"),
        Request::CreateSnapshot(_) => (PUT, "snapshot_create_count"),
        Request::LoadSnapshot(_) => (PUT, "snapshot_load_count"),
        Request::SendMigration(_) => (PUT, "send_migration_count"),
        Request::ReceiveMigration(_) => (PUT, "receive_migration_count"),
        Request::GetMigration => (GET, "migration_status_count"),
        Request::GetBalloon | Request::GetBalloonStats => (GET, "balloon_count"),
        Request::PutBalloon(_) => (PUT, "balloon_count"),
        Request::PutVsock(_) => (PUT, "vsock_count"),
        Request::PutEntropy(_) => (PUT, "entropy_count"),
        Request::PatchBalloon(_) | Request::PatchBalloonStats(_) => (PATCH, "balloon_count"),
        Request::CancelMigration => (PUT, "migration_cancel_count"),
        Request::PowerButton => (PUT, "power_button_count"),
    }
}
