//! The lifecycle's side of a live migration: start one (source), answer
//! the worker's hand-over, end the VM once it runs elsewhere; receive one
//! (destination).

use std::os::fd::OwnedFd;
use std::sync::Arc;
use std::time::Duration;

use ember_api::model::{MigrationMode, SendMigrationData, TimeoutStrategy};
use ember_migration::transport::{Connection, Url};
use ember_migration::{write_reply, Reply};

use super::{Instance, LifecycleError, State};
use crate::config::VmConfig;
use crate::event_loop::Stop;
use crate::migration::{self, parse_url, Outcome, SendParams, Shared, ToVmm};
use crate::{Console, Error, Result};

/// Cloud Hypervisor's defaults.
const DEFAULT_DOWNTIME_MS: u64 = 300;
const DEFAULT_TIMEOUT_S: u64 = 3600;

impl Instance {
    /// Whether an outgoing migration is under way.
    fn migrating(&self) -> bool {
        self.migration.as_ref().is_some_and(|m| {
            matches!(
                m.progress().state.as_str(),
                "connecting" | "precopy" | "handover" | "postcopy"
            )
        })
    }

    /// Refuses an operation that would change the VM under a migration.
    pub(super) fn require_not_migrating(&self) -> Result<()> {
        if self.migrating() {
            return Err(Error::Lifecycle(
                "a migration is in progress (PUT /api/v1/vm.migration-cancel stops it)".into(),
            ));
        }
        Ok(())
    }

    /// Starts sending the VM to `data.destination_url` (Cloud Hypervisor's
    /// `vm.send-migration`): checked here, then run by the migration
    /// worker while the guest runs; the answer comes before any data
    /// moves, the progress from [`Instance::migration_progress`].
    pub fn send_migration(&mut self, data: &SendMigrationData) -> Result<()> {
        match self.state {
            State::Running | State::Paused => {}
            State::Stopped => return Err(LifecycleError::Stopped.into()),
            State::NotStarted => return Err(LifecycleError::NotStarted.into()),
        }
        self.require_not_migrating()?;
        if self.incoming.is_some() {
            return Err(Error::Migration(
                "a post-copy migration is still bringing this guest's pages in".into(),
            ));
        }
        let postcopy = match (data.memory_mode, data.auto_postcopy) {
            (Some(MigrationMode::Postcopy), Some(false)) => {
                return Err(Error::Migration(
                    "memory_mode Postcopy and auto_postcopy false contradict each other".into(),
                ))
            }
            (Some(MigrationMode::Postcopy), _) if data.local => {
                return Err(Error::Migration(
                    "memory_mode Postcopy does not apply to a local migration (its memory is handed over, not copied)".into(),
                ))
            }
            (Some(MigrationMode::Postcopy), _) => migration::Postcopy::Now,
            (_, Some(false)) => migration::Postcopy::Never,
            _ => migration::Postcopy::Auto,
        };
        let url = parse_url(&data.destination_url)?;
        let vmm = self.vmm.as_ref().ok_or(LifecycleError::NotStarted)?;
        if data.local && !vmm.shared_memory() {
            return Err(Error::Migration(
                "local = true needs the guest memory shared (--memory size=MIB,shared=on, or [machine] shared = true)".into(),
            ));
        }
        // Post-copy fills 4 KiB pages; guest memory on hugetlbfs is filled
        // by whole huge pages, so such a guest moves by pre-copy only.
        let postcopy = match (postcopy, vmm.config().memory_backend.hugepages) {
            (migration::Postcopy::Now, Some(_)) => {
                return Err(Error::Migration(
                    "memory_mode Postcopy does not apply to a guest on huge pages (hugepages=on); use Precopy".into(),
                ))
            }
            (migration::Postcopy::Auto, Some(_)) => migration::Postcopy::Never,
            (p, _) => p,
        };
        let params = SendParams {
            url,
            downtime: Duration::from_millis(data.downtime_ms.unwrap_or(DEFAULT_DOWNTIME_MS)),
            timeout: Duration::from_secs(data.timeout_s.unwrap_or(DEFAULT_TIMEOUT_S)),
            ignore_timeout: data.timeout_strategy == Some(TimeoutStrategy::Ignore),
            max_rounds: migration::MAX_ROUNDS,
            local: data.local,
            postcopy,
        };
        let worker = vmm
            .migration_worker()
            .ok_or_else(|| Error::Migration("the VM has no migration thread".into()))?;
        let hello = vmm.migration_hello()?;
        let shared = Arc::new(Shared::default());
        log::info!(
            "instance {}: migrating to {} (downtime {} ms, timeout {} s)",
            self.id,
            params.url,
            params.downtime.as_millis(),
            params.timeout.as_secs()
        );
        worker.send(params, shared.clone(), hello)?;
        self.migration = Some(shared);
        Ok(())
    }

    /// The current (or last) migration's progress; `None` if there was none.
    pub fn migration_progress(&self) -> Option<migration::Progress> {
        self.migration.as_ref().map(|m| m.progress())
    }

    /// Stops the migration under way; the guest runs on here.
    pub fn cancel_migration(&mut self) -> Result<()> {
        match &self.migration {
            Some(m) if m.cancel() => Ok(()),
            Some(m) => Err(Error::Migration(format!(
                "nothing to cancel: the migration is {}",
                m.progress().state
            ))),
            None => Err(Error::Migration("no migration to cancel".into())),
        }
    }

    /// Answers what the migration worker asks (run from the event loop).
    pub(super) fn poll_migration(&mut self) {
        match self.incoming.as_mut().and_then(|i| i.poll()) {
            Some(Ok(s)) => {
                log::info!(
                    "instance {}: post-copy done: {} pages arrived in {:.1} ms after the resume ({} guest faults, {} requests, {} zero-filled touches)",
                    self.id,
                    s.pages,
                    s.took.as_secs_f64() * 1000.0,
                    s.faults,
                    s.requests,
                    s.zero_faults
                );
                self.incoming = None;
            }
            Some(Err(e)) => {
                log::error!("instance {}: post-copy failed: {e}", self.id);
                self.event_loop
                    .stop_with(Stop::MigrationFailed(format!("post-copy failed: {e}")));
            }
            None => {}
        }
        loop {
            let Some(msg) = self
                .vmm
                .as_ref()
                .and_then(|v| v.migration_worker())
                .and_then(|w| w.to_vmm.try_recv().ok())
            else {
                return;
            };
            match msg {
                ToVmm::Handover => {
                    let state = self.handover().map_err(|e| crate::error_chain(&e));
                    if let Some(w) = self.vmm.as_ref().and_then(|v| v.migration_worker()) {
                        let _ = w.handover.send(state);
                    }
                }
                ToVmm::Finished(outcome) => self.migration_finished(outcome),
            }
        }
    }

    /// Pauses the guest (if it runs) and saves its state for the worker.
    fn handover(&mut self) -> Result<Vec<u8>> {
        let run = self.state == State::Running;
        if run {
            self.pause()?;
            self.migration_paused = true;
        }
        let vmm = self.vmm.as_mut().ok_or(LifecycleError::NotStarted)?;
        vmm.migration_state(run)
    }

    fn migration_finished(&mut self, outcome: Outcome) {
        let paused = std::mem::take(&mut self.migration_paused);
        match outcome {
            Outcome::Completed(p) => {
                log::info!(
                    "instance {}: migrated to {} in {:.1} ms (guest paused {:.1} ms, {} rounds, {} pages, {} zero pages, {} bytes); exiting",
                    self.id,
                    p.destination_url,
                    p.total_ms,
                    p.downtime_ms.unwrap_or(0.0),
                    p.round,
                    p.pages_sent,
                    p.zero_pages_sent,
                    p.bytes_sent
                );
                self.event_loop.stop_with(Stop::Migrated);
            }
            Outcome::Failed { error, resume } => {
                log::error!("instance {}: migration failed: {error}", self.id);
                if paused && resume {
                    match self.resume() {
                        Ok(_) => log::info!("instance {}: the guest runs on here", self.id),
                        Err(e) => log::error!(
                            "instance {}: cannot resume after the failed migration: {}",
                            self.id,
                            crate::error_chain(&e)
                        ),
                    }
                } else if paused {
                    log::error!(
                        "instance {}: the guest stays paused here (it may run at the destination)",
                        self.id
                    );
                }
            }
        }
    }

    /// Receives a VM from a source at `url` into this fresh instance
    /// (Cloud Hypervisor's `vm.receive-migration`, `ember --incoming`):
    /// returns once the guest runs here (or waits paused, if it was paused
    /// at the source). A failure leaves the instance as it was.
    pub fn receive_migration(&mut self, url: &Url) -> Result<()> {
        self.require_not_started()?;
        if self.config != VmConfig::default() {
            return Err(Error::Lifecycle(
                "receiving a migration is only allowed before any other configuration".into(),
            ));
        }
        let console = match self.console.take() {
            Some(c) => c,
            None => Console::stdio()?,
        };
        let received = migration::receive(
            url,
            console,
            self.started,
            migration::Env {
                wake: &self.wake,
                filters: &self.filters,
                stop: self.event_loop.signal_fd(),
            },
        )?;
        let t = received.accepted_at;
        let migration::Received {
            mut vmm,
            resume,
            back,
            pages,
            state_at,
            postcopy,
            ..
        } = received;
        // Written with write(2) once the filter is on (no send(2) there).
        let mut back = std::fs::File::from(match back {
            Connection::Tcp(s) => OwnedFd::from(s),
            Connection::Unix(s, _) => OwnedFd::from(s),
        });
        if let Err(e) = vmm.start(&self.filters, &mut self.event_loop, &self.wake) {
            // Let go of the disks first, then tell the source, which takes
            // them back and resumes (the guest never ran here).
            drop(vmm);
            drop(postcopy);
            let _ = write_reply(&mut back, &Reply::Refused(crate::error_chain(&e)));
            return Err(e);
        }
        self.started_with = Some(vmm.config());
        self.vmm = Some(vmm);
        self.incoming = postcopy;
        self.state = State::Paused;
        if resume {
            self.resume()?;
        }
        let resumed_after = state_at.elapsed();
        let done = match &self.incoming {
            Some(i) => i.reply(&Reply::Done),
            None => {
                write_reply(&mut back, &Reply::Done).map_err(|e| Error::Migration(e.to_string()))
            }
        };
        if let Err(e) = done {
            // The source will find the disks locked and stay stopped.
            log::warn!("migration: cannot tell the source it is done: {e}");
        }
        if resume {
            if let Some(v) = &self.vmm {
                v.announce();
            }
        }
        log::info!(
            "instance {}: received a migration ({pages} pages) in {:.1} ms from the connection; {} {:.1} ms after the state arrived",
            self.id,
            t.elapsed().as_secs_f64() * 1000.0,
            if resume { "running" } else { "paused" },
            resumed_after.as_secs_f64() * 1000.0
        );
        Ok(())
    }
}
