//! One thread per vCPU, and how the main thread stops them.

use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use ember_vcpu::{kick_thread, RunState, Vcpu, VcpuControl, VcpuEnd};
use vmm_sys_util::eventfd::EventFd;

use crate::seccomp::{Filters, ThreadKind};
use crate::Error;

/// How the first vCPU to end says so to the event loop: the reason in a
/// slot, then a write to an eventfd.
#[derive(Debug)]
pub struct VcpuExitReport {
    first: Mutex<Option<VcpuEnd>>,
    evt: EventFd,
}

impl VcpuExitReport {
    /// Reports through `evt`.
    pub fn new(evt: EventFd) -> Self {
        VcpuExitReport {
            first: Mutex::new(None),
            evt,
        }
    }

    fn report(&self, end: VcpuEnd) {
        let mut first = self.first.lock().unwrap_or_else(|e| e.into_inner());
        if first.is_none() {
            *first = Some(end);
            if let Err(e) = self.evt.write(1) {
                log::error!("cannot signal the end of a vCPU: {e}");
            }
        }
    }

    /// The first reported end, if any.
    pub fn take(&self) -> Option<VcpuEnd> {
        self.first.lock().unwrap_or_else(|e| e.into_inner()).take()
    }
}

/// Counts running vCPU threads so the main thread can wait for them with a deadline.
#[derive(Debug, Default)]
struct Running {
    count: Mutex<usize>,
    changed: Condvar,
}

/// The running vCPU threads.
#[derive(Debug)]
pub struct VcpuThreads {
    threads: Vec<(JoinHandle<()>, Arc<VcpuControl>)>,
    running: Arc<Running>,
}

impl VcpuThreads {
    /// Starts one thread per vCPU. `started` is the process start time, for
    /// the log line of the first `KVM_RUN`.
    /// `affinity[i]` lists the host CPUs vCPU `i`'s thread is pinned to
    /// (none: not pinned).
    pub fn start(
        vcpus: Vec<Vcpu>,
        affinity: &[Vec<usize>],
        report: Arc<VcpuExitReport>,
        started: Instant,
        filters: Filters,
        paused: bool,
    ) -> Result<Self, Error> {
        ember_vcpu::register_kick_signal().map_err(Error::Vcpu)?;
        let running = Arc::new(Running::default());
        let mut threads = Vec::with_capacity(vcpus.len());
        for mut vcpu in vcpus {
            let control = Arc::new(VcpuControl::default());
            if paused {
                // A restored vCPU parks before it first enters the guest.
                control.request(RunState::Paused);
            }
            let (c, r, run) = (control.clone(), report.clone(), running.clone());
            let filters = filters.clone();
            *running.count.lock().unwrap_or_else(|e| e.into_inner()) += 1;
            let index = vcpu.index();
            let name = format!("ember-vcpu{index}");
            let pin = affinity
                .get(usize::from(index))
                .cloned()
                .unwrap_or_default();
            let handle = std::thread::Builder::new()
                .name(name.clone())
                .spawn(move || {
                    // Before the first KVM_RUN: from here on the guest drives
                    // what this thread does.
                    let pinned = crate::memory::pin_thread(&pin).map_err(|e| {
                        format!("vcpu{index}: cannot pin the thread to host CPUs {pin:?}: {e}")
                    });
                    if !pin.is_empty() && pinned.is_ok() {
                        log::info!("vcpu{index}: pinned to host CPUs {pin:?}");
                    }
                    let end = match pinned.map(|()| filters.install(ThreadKind::Vcpu, &name)) {
                        Err(msg) => VcpuEnd::Failed(msg),
                        Ok(Err(e)) => VcpuEnd::Failed(crate::error_chain(&e)),
                        Ok(Ok(())) => {
                            log::info!(
                                "vcpu{index}: entering the guest {:.1} ms after start",
                                started.elapsed().as_secs_f64() * 1000.0
                            );
                            vcpu.run(&c)
                        }
                    };
                    log::debug!("vcpu{index}: run loop ended: {end:?}");
                    log::info!("vcpu{index}: {}", vcpu.exit_counts());
                    c.mark_ended();
                    r.report(end);
                    drop(vcpu);
                    let mut n = run.count.lock().unwrap_or_else(|e| e.into_inner());
                    *n -= 1;
                    run.changed.notify_all();
                });
            match handle {
                Ok(h) => threads.push((h, control)),
                Err(e) => {
                    *running.count.lock().unwrap_or_else(|e| e.into_inner()) -= 1;
                    let mut partial = VcpuThreads { threads, running };
                    partial.stop(Duration::from_secs(1));
                    return Err(Error::SpawnVcpu(index, e));
                }
            }
        }
        Ok(VcpuThreads { threads, running })
    }

    /// Parks every vCPU: each is kicked out of the guest, completes its
    /// pending exit and says it is parked. Returns once all have, or an
    /// error naming the first that did not within `timeout`.
    pub fn pause(&self, timeout: Duration) -> Result<(), Error> {
        for (handle, control) in &self.threads {
            control.request(RunState::Paused);
            if let Err(e) = kick_thread(handle) {
                log::warn!("cannot kick {:?}: {e}", handle.thread().name());
            }
        }
        let deadline = Instant::now() + timeout;
        for (i, (_, control)) in self.threads.iter().enumerate() {
            let left = deadline.saturating_duration_since(Instant::now());
            if !control.wait_parked(left) {
                return Err(Error::Guest(format!(
                    "vcpu{i} did not pause within {} ms",
                    timeout.as_millis()
                )));
            }
        }
        Ok(())
    }

    /// Has every parked vCPU save its state on its own thread.
    pub fn save_states(&self, timeout: Duration) -> Result<Vec<ember_vcpu::VcpuState>, Error> {
        let mut states = Vec::with_capacity(self.threads.len());
        for (i, (_, control)) in self.threads.iter().enumerate() {
            if !control.wait_parked(timeout) {
                return Err(Error::Guest(format!("vcpu{i} is not paused")));
            }
            let state = control
                .save_parked(timeout)
                .map_err(|e| Error::Guest(format!("vcpu{i}: cannot save its state: {e}")))?;
            states.push(state);
        }
        Ok(states)
    }

    /// Lets every parked vCPU run the guest again.
    pub fn resume(&self) {
        for (_, control) in &self.threads {
            control.request(RunState::Running);
        }
    }

    /// Asks every vCPU to stop, kicks them out of the guest, and waits up to
    /// `timeout` for them to end. Returns whether all ended.
    pub fn stop(&mut self, timeout: Duration) -> bool {
        for (handle, control) in &self.threads {
            control.request(RunState::Stopped);
            if let Err(e) = kick_thread(handle) {
                log::warn!("cannot kick {:?}: {e}", handle.thread().name());
            }
        }
        let deadline = Instant::now() + timeout;
        let mut n = self.running.count.lock().unwrap_or_else(|e| e.into_inner());
        while *n > 0 {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                log::warn!("{} vCPU thread(s) did not stop in time", *n);
                return false;
            }
            n = self
                .running
                .changed
                .wait_timeout(n, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        drop(n);
        for (handle, _) in self.threads.drain(..) {
            if handle.join().is_err() {
                log::error!("a vCPU thread panicked");
            }
        }
        true
    }
}
