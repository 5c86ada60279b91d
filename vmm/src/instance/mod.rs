//! The VM's lifecycle: one object with explicit states that the command
//! line and the API both drive.
//!
//! ```text
//!   NotStarted --start--> Running --pause--> Paused
//!       |                   ^  |               |
//!       |                   +--|----resume-----+
//!       +------------------> Stopped <---------+   (guest ended, signal)
//! ```
//!
//! While `NotStarted` the configuration may change, each change checked
//! as it is made (a bad one changes nothing); [`Instance::start`] checks
//! it again as a whole, builds the VM and starts it. The command line is
//! "configure from the file, then start".

mod migrate;
mod requests;

use std::time::{Duration, Instant};

use crate::api::{ApiChannel, ApiThread};
use crate::config::VmConfig;
use crate::event_loop::EventLoop;
use crate::metrics::Metrics;
use crate::seccomp::Filters;
use crate::signals::StopSignals;
use crate::{Console, Error, ExitReason, Result, Vmm};

/// Where the VM is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    /// Being configured; nothing built yet.
    NotStarted,
    /// The vCPUs run the guest.
    Running,
    /// The vCPUs are parked and the devices stopped.
    Paused,
    /// The VM has ended.
    Stopped,
}

impl State {
    /// The name Firecracker's `InstanceInfo.state` uses.
    pub fn api_name(self) -> &'static str {
        match self {
            State::NotStarted => "Not started",
            State::Running => "Running",
            State::Paused => "Paused",
            State::Stopped => "Stopped",
        }
    }
}

/// What a lifecycle operation cannot do in the current state.
#[derive(Debug, thiserror::Error)]
pub enum LifecycleError {
    /// The operation needs a VM that has not started.
    #[error("the operation is not supported after starting the microVM (it is {})", .0.api_name())]
    Started(State),
    /// The operation needs a VM that has started.
    #[error("the operation is not supported before starting the microVM")]
    NotStarted,
    /// The VM has ended.
    #[error("the microVM has stopped")]
    Stopped,
}

/// How ember was asked to run the VM.
#[derive(Debug)]
pub struct InstanceOptions {
    /// The VM's id (`--id`), reported by `GET /`.
    pub id: String,
    /// Seccomp filters for every thread.
    pub filters: Filters,
    /// Process start, for timing logs.
    pub started: Instant,
}

/// The microVM and its lifecycle.
pub struct Instance {
    state: State,
    id: String,
    config: VmConfig,
    vmm: Option<Vmm>,
    /// The configuration the VM was started with (devices in bus order).
    started_with: Option<crate::config::ValidConfig>,
    console: Option<Console>,
    filters: Filters,
    event_loop: EventLoop,
    // The channel is dropped before the thread is joined (field order):
    // a request still waiting then gets its "gone" answer.
    api: Option<ApiChannel>,
    api_thread: Option<ApiThread>,
    started: Instant,
    metrics: Metrics,
    api_stats: Option<std::sync::Arc<ember_api::ServerStats>>,
    /// Wakes the event loop (the API's requests, the migration worker).
    wake: vmm_sys_util::eventfd::EventFd,
    /// The current (or last) outgoing migration.
    migration: Option<std::sync::Arc<crate::migration::Shared>>,
    /// The guest was paused for a migration's hand-over (and is resumed
    /// if it fails).
    migration_paused: bool,
    /// A post-copy migration still bringing pages in (destination).
    incoming: Option<crate::migration::Incoming>,
    /// Set by a disk a failed request stopped (`werror=stop`): the loop
    /// pauses the VM.
    io_stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl std::fmt::Debug for Instance {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Instance")
            .field("state", &self.state)
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

impl Instance {
    /// A VM not started yet, with the default configuration, its console
    /// on `console`. `signals` are the stop signals, blocked before any
    /// thread was started; `api`, if any, is served from now on.
    pub fn new(
        opts: InstanceOptions,
        console: Console,
        signals: StopSignals,
        api: Option<ember_api::Server>,
    ) -> Result<Self> {
        let api_stats = api.as_ref().map(ember_api::Server::stats);
        let (api_thread, api) = match api {
            Some(server) => {
                let (thread, channel) = ApiThread::spawn(server, &opts.filters)?;
                (Some(thread), Some(channel))
            }
            None => (None, None),
        };
        let wake = match &api {
            Some(c) => c
                .wake
                .try_clone()
                .map_err(|e| Error::EventFd("API wake-up", e))?,
            None => vmm_sys_util::eventfd::EventFd::new(vmm_sys_util::eventfd::EFD_NONBLOCK)
                .map_err(|e| Error::EventFd("wake-up", e))?,
        };
        let event_loop = EventLoop::new(
            signals,
            Some(wake.try_clone().map_err(|e| Error::EventFd("wake-up", e))?),
        )?;
        Ok(Instance {
            state: State::NotStarted,
            id: opts.id,
            config: VmConfig::default(),
            vmm: None,
            started_with: None,
            console: Some(console),
            filters: opts.filters,
            event_loop,
            api,
            api_thread,
            started: opts.started,
            metrics: Metrics::default(),
            api_stats,
            wake,
            migration: None,
            migration_paused: false,
            incoming: None,
            io_stop: Default::default(),
        })
    }

    /// Where the VM is in its life.
    pub fn state(&self) -> State {
        self.state
    }

    /// The configuration (as set so far, or as started).
    pub fn config(&self) -> &VmConfig {
        &self.config
    }

    fn require_not_started(&self) -> std::result::Result<(), LifecycleError> {
        match self.state {
            State::NotStarted => Ok(()),
            s => Err(LifecycleError::Started(s)),
        }
    }

    /// Replaces the whole configuration (the command line's "configure
    /// from file"). It is checked in full at [`Instance::start`].
    pub fn configure(&mut self, cfg: VmConfig) -> std::result::Result<(), LifecycleError> {
        self.require_not_started()?;
        self.config = cfg;
        Ok(())
    }

    /// Checks the configuration as a whole, builds the VM and starts it.
    /// A failure leaves the instance not started (and its configuration
    /// as it was), so it can be corrected and started again.
    pub fn start(&mut self) -> Result<()> {
        self.require_not_started()
            .map_err(|e| Error::Lifecycle(e.to_string()))?;
        let cfg = self.config.validate()?;
        let console = match self.console.take() {
            Some(c) => c,
            None => Console::stdio()?,
        };
        let t = Instant::now();
        let mut vmm = Vmm::build(&cfg, console, self.started)?;
        vmm.start(&self.filters, &mut self.event_loop, &self.wake)?;
        vmm.watch_disk_stops(&self.io_stop, &self.wake)?;
        self.metrics
            .latencies_us
            .insert("instance_start", micros(t.elapsed()));
        self.vmm = Some(vmm);
        self.started_with = Some(cfg);
        self.state = State::Running;
        log::info!("instance {}: running", self.id);
        Ok(())
    }

    /// Loads a snapshot into this fresh instance (nothing configured yet)
    /// and leaves it paused, or running with `resume`. A failure leaves
    /// the instance as it was: not started, configurable.
    pub fn load_snapshot(
        &mut self,
        params: &crate::snapshot::LoadParams,
        resume: bool,
    ) -> Result<()> {
        self.require_not_started()
            .map_err(|e| Error::Lifecycle(e.to_string()))?;
        if self.config != VmConfig::default() {
            return Err(Error::Lifecycle(
                "loading a snapshot is only allowed before any other configuration (the machine, boot source, drives or network interfaces were set)".into(),
            ));
        }
        let console = match self.console.take() {
            Some(c) => c,
            None => Console::stdio()?,
        };
        let t = Instant::now();
        let mut vmm = Vmm::restore(params, console, self.started)?;
        vmm.start(&self.filters, &mut self.event_loop, &self.wake)?;
        vmm.watch_disk_stops(&self.io_stop, &self.wake)?;
        let took = t.elapsed();
        self.metrics
            .latencies_us
            .insert("load_snapshot", micros(took));
        log::info!(
            "instance {}: snapshot loaded in {:.2} ms, paused",
            self.id,
            took.as_secs_f64() * 1000.0
        );
        self.started_with = Some(vmm.config());
        self.vmm = Some(vmm);
        self.state = State::Paused;
        if resume {
            self.resume()?;
        }
        Ok(())
    }

    /// Writes a snapshot of the paused VM (see [`Vmm::snapshot`]).
    pub fn create_snapshot(
        &mut self,
        params: &crate::snapshot::CreateParams,
    ) -> Result<crate::snapshot::CreateStats> {
        let vmm = match (self.state, self.vmm.as_mut()) {
            (State::Paused, Some(vmm)) => vmm,
            (State::Running, _) => {
                return Err(Error::Lifecycle(
                    "the microVM must be paused to snapshot it (PATCH /vm Paused)".into(),
                ))
            }
            (State::Stopped, _) => return Err(LifecycleError::Stopped.into()),
            _ => return Err(LifecycleError::NotStarted.into()),
        };
        let t = Instant::now();
        let stats = vmm.snapshot(params)?;
        let took = t.elapsed();
        let key = match params.kind {
            ember_snapshot::SnapshotKind::Full => "full_create_snapshot",
            ember_snapshot::SnapshotKind::Diff => "diff_create_snapshot",
        };
        self.metrics.latencies_us.insert(key, micros(took));
        log::info!(
            "instance {}: snapshot {} written in {:.1} ms (state {:.1} ms, {} bytes; memory {:.1} ms, {} pages)",
            self.id,
            params.state_path.display(),
            took.as_secs_f64() * 1000.0,
            stats.state_ms,
            stats.state_bytes,
            stats.memory_ms,
            stats.pages_written
        );
        Ok(stats)
    }

    /// Pauses a running VM (idempotent on a paused one). Returns how long
    /// it took.
    pub fn pause(&mut self) -> Result<Duration> {
        let t = Instant::now();
        match (self.state, self.vmm.as_mut()) {
            (State::Paused, _) => {}
            (State::Running, Some(vmm)) => {
                vmm.pause(&mut self.event_loop)?;
                self.state = State::Paused;
            }
            (State::Stopped, _) => {
                return Err(Error::Lifecycle(LifecycleError::Stopped.to_string()))
            }
            _ => return Err(Error::Lifecycle(LifecycleError::NotStarted.to_string())),
        }
        let took = t.elapsed();
        self.metrics.latencies_us.insert("pause_vm", micros(took));
        log::info!("instance {}: paused in {} us", self.id, took.as_micros());
        Ok(took)
    }

    /// Resumes a paused VM (idempotent on a running one). Returns how long
    /// it took.
    pub fn resume(&mut self) -> Result<Duration> {
        let t = Instant::now();
        match (self.state, self.vmm.as_mut()) {
            (State::Running, _) => {}
            (State::Paused, Some(vmm)) => {
                // A disk a failed request stopped runs it again first; if
                // it fails again the VM stays paused.
                vmm.retry_disks().map_err(|why| {
                    Error::Lifecycle(format!(
                        "{why}: the request fails again, the microVM stays paused"
                    ))
                })?;
                vmm.resume(&mut self.event_loop)?;
                self.state = State::Running;
            }
            (State::Stopped, _) => {
                return Err(Error::Lifecycle(LifecycleError::Stopped.to_string()))
            }
            _ => return Err(Error::Lifecycle(LifecycleError::NotStarted.to_string())),
        }
        let took = t.elapsed();
        self.metrics.latencies_us.insert("resume_vm", micros(took));
        log::info!("instance {}: resumed in {} us", self.id, took.as_micros());
        Ok(took)
    }

    /// Serves the event loop and the API until the VM ends (or, before it
    /// is started, a stop signal arrives); then stops the vCPUs, flushes
    /// the disks and says why it ended.
    pub fn run(mut self) -> Result<ExitReason> {
        let stop = loop {
            if let Some(stop) = self.event_loop.take_stop() {
                break stop;
            }
            self.serve_api();
            self.poll_io_stop();
            self.poll_migration();
            if self.metrics.due() {
                let _ = self.flush_metrics();
            }
            if let Some(stop) = self.event_loop.take_stop() {
                break stop;
            }
            self.event_loop.run_once(self.metrics.next_flush_ms())?;
        };
        self.state = State::Stopped;
        if let Some(vmm) = self.vmm.as_mut() {
            vmm.shutdown();
        }
        // The last counters, as Firecracker writes them at exit.
        if self.metrics.next_flush_ms() >= 0 {
            let _ = self.flush_metrics();
        }
        // Requests still queued get their "gone" answer; then the socket
        // is removed.
        self.api = None;
        if let Some(t) = self.api_thread.take() {
            t.stop();
        }
        ExitReason::from_stop(stop)
    }

    /// Changes the rate limits of the disk the API calls `drive_id`
    /// (`PATCH /drives` with a `rate_limiter`): a bucket given replaces the
    /// one in force (a bucket of size or refill time 0 removes it), a bucket
    /// left out stays. Only while running, as a path change.
    pub fn patch_drive_rate_limit(
        &mut self,
        drive_id: &str,
        patch: &ember_rate_limiter::RateLimiterConfig,
    ) -> Result<()> {
        let (vmm, index) = self.running_drive(drive_id)?;
        let now = vmm.patch_drive_rate_limit(index, patch)?;
        let now = (!now.is_unlimited()).then_some(now);
        self.update_drive_config(index, drive_id, |d| d.rate_limiter = now);
        Ok(())
    }

    /// Changes the limits of the NIC the API calls `iface_id` (`PATCH
    /// /network-interfaces`), while running; kept in the configuration
    /// `GET /vm/config` reports and a snapshot saves.
    pub fn patch_net_rate_limits(
        &mut self,
        iface_id: &str,
        rx: Option<&ember_rate_limiter::RateLimiterConfig>,
        tx: Option<&ember_rate_limiter::RateLimiterConfig>,
    ) -> Result<()> {
        let (Some(vmm), Some(cfg)) = (self.vmm.as_ref(), self.started_with.as_ref()) else {
            return Err(LifecycleError::NotStarted.into());
        };
        let index = cfg
            .nets
            .iter()
            .enumerate()
            .position(|(i, (n, _))| n.iface_id(i) == iface_id)
            .ok_or_else(|| {
                Error::Lifecycle(format!("no network interface with id {iface_id:?}"))
            })?;
        let (rx, tx) = vmm.patch_net_rate_limits(index, rx, tx)?;
        let set = |n: &mut crate::config::NetConfig| {
            n.rx_rate_limiter = (!rx.is_unlimited()).then_some(rx);
            n.tx_rate_limiter = (!tx.is_unlimited()).then_some(tx);
        };
        if let Some((n, _)) = self
            .started_with
            .as_mut()
            .and_then(|c| c.nets.get_mut(index))
        {
            set(n);
        }
        if let Some(n) = self
            .config
            .net
            .iter_mut()
            .enumerate()
            .find(|(i, n)| n.iface_id(*i) == iface_id)
            .map(|(_, n)| n)
        {
            set(n);
        }
        Ok(())
    }

    /// Serves the disk the API calls `drive_id` from the image at `path`
    /// (`PATCH /drives`, as Kata swaps its placeholder drives); only while
    /// running, so the guest hears of it at once.
    pub fn patch_drive(&mut self, drive_id: &str, path: &std::path::Path) -> Result<()> {
        if self.state == State::Paused && self.vmm.is_some() {
            return Err(Error::Lifecycle(
                "the microVM is paused; resume it before changing a drive".into(),
            ));
        }
        let (vmm, index) = self.running_drive(drive_id)?;
        let (format, cache) = self.started_with.as_ref().map_or(Default::default(), |c| {
            (c.disks[index].format, c.disks[index].cache)
        });
        vmm.patch_drive(index, path, format, cache)?;
        self.update_drive_config(index, drive_id, |d| d.path = path.to_owned());
        Ok(())
    }

    /// The running VM and the index (in the started configuration) of the
    /// disk the API calls `drive_id`.
    fn running_drive(&self, drive_id: &str) -> Result<(&crate::Vmm, usize)> {
        let (Some(vmm), Some(cfg)) = (self.vmm.as_ref(), self.started_with.as_ref()) else {
            return Err(LifecycleError::NotStarted.into());
        };
        let index = cfg
            .disks
            .iter()
            .position(|d| d.drive_id.as_deref() == Some(drive_id))
            .ok_or_else(|| Error::Lifecycle(format!("no drive with id {drive_id:?}")))?;
        Ok((vmm, index))
    }

    /// Applies a change to disk `index` of the started configuration and
    /// to the same disk (by API id) of the configuration `GET /vm/config`
    /// reports.
    fn update_drive_config(
        &mut self,
        index: usize,
        drive_id: &str,
        change: impl Fn(&mut crate::config::DiskConfig),
    ) {
        if let Some(d) = self
            .started_with
            .as_mut()
            .and_then(|c| c.disks.get_mut(index))
        {
            change(d);
        }
        if let Some(d) = self
            .config
            .disk
            .iter_mut()
            .enumerate()
            .find(|(i, d)| d.drive_id(*i) == drive_id)
            .map(|(_, d)| d)
        {
            change(d);
        }
    }

    /// Sets the metrics file (`--metrics-path`, `PUT /metrics`).
    pub fn set_metrics(
        &mut self,
        path: &std::path::Path,
        emit_id: bool,
        properties: std::collections::BTreeMap<String, String>,
    ) -> std::result::Result<(), crate::metrics::MetricsError> {
        self.metrics.set_sink(path, emit_id, properties)
    }

    /// Writes the metrics now.
    pub fn flush_metrics(&mut self) -> std::result::Result<(), crate::metrics::MetricsError> {
        let mut devices = self
            .vmm
            .as_ref()
            .map(Vmm::device_metrics)
            .unwrap_or_default();
        if let Some(s) = &self.api_stats {
            use std::sync::atomic::Ordering::Relaxed;
            devices.push((
                "api_server",
                crate::metrics::Counters::from([
                    ("requests_count", s.requests.load(Relaxed)),
                    ("bad_requests_count", s.bad_requests.load(Relaxed)),
                    ("connections_count", s.connections.load(Relaxed)),
                    (
                        "refused_connections_count",
                        s.refused_connections.load(Relaxed),
                    ),
                ]),
            ));
        }
        let r = self.metrics.flush(&self.id, devices);
        if let Err(e) = &r {
            log::warn!("metrics: {}", crate::error_chain(e));
        }
        r
    }

    /// Pauses the VM when a disk a failed request stopped asks for it
    /// (`werror`/`rerror` = stop).
    fn poll_io_stop(&mut self) {
        if !self
            .io_stop
            .swap(false, std::sync::atomic::Ordering::SeqCst)
        {
            return;
        }
        let why = self
            .vmm
            .as_ref()
            .map(Vmm::stopped_disks)
            .unwrap_or_default();
        if why.is_empty() || self.state != State::Running {
            return;
        }
        let why = why.join("; ");
        match self.pause() {
            Ok(_) => log::warn!(
                "instance {}: paused on an I/O error: {why}; once the host is fixed, PATCH /vm {{\"state\": \"Resumed\"}} runs the request again",
                self.id
            ),
            Err(e) => log::error!(
                "instance {}: cannot pause on an I/O error ({why}): {}",
                self.id,
                crate::error_chain(&e)
            ),
        }
    }

    /// Answers every request waiting on the API channel, in order.
    fn serve_api(&mut self) {
        loop {
            let Some(call) = self.api.as_ref().and_then(|c| c.requests.try_recv().ok()) else {
                return;
            };
            let response = self.handle(call.request);
            if call.reply.send(response).is_err() {
                log::warn!("api: a client went away before its answer");
            }
        }
    }
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

impl From<LifecycleError> for Error {
    fn from(e: LifecycleError) -> Self {
        Error::Lifecycle(e.to_string())
    }
}
