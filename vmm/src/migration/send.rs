//! The source's side: a worker thread, started with the VM (before any
//! seccomp filter, under its own), that sends guest memory while the guest
//! runs and asks the VMM thread for the hand-over.

use std::io::{BufWriter, Write};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use ember_memory::GuestMemoryMmap;
use ember_migration::memory::{send_memory, Round, SendStats};
use ember_migration::transport::{connect, Connection};
use ember_migration::{read_reply, Reply, Writer};
use kvm_ioctls::VmFd;
use vmm_sys_util::eventfd::EventFd;

use super::{count_pages, postcopy, unite, Postcopy, Progress, SendParams};
use crate::disks::DiskDevice;
use crate::nets::NetDevice;
use crate::seccomp::{Filters, ThreadKind};
use crate::{vm, Error};
use std::os::fd::{AsRawFd, RawFd};

/// What the worker asks of the VMM thread.
#[derive(Debug)]
pub enum ToVmm {
    /// Pause the guest and send its state (the `State` payload) back on
    /// the hand-over channel.
    Handover,
    /// The migration ended.
    Finished(Outcome),
}

/// How a migration ended.
#[derive(Debug, Clone)]
pub enum Outcome {
    /// The destination runs the guest: the source ends.
    Completed(Progress),
    /// It failed; `resume` says whether the source may run the guest
    /// again (false only when the destination may be running it).
    Failed {
        /// Why.
        error: String,
        /// Whether the source may resume the guest.
        resume: bool,
    },
}

/// What the API and the worker share about the current migration.
#[derive(Debug, Default)]
pub struct Shared {
    /// The progress report.
    pub progress: Mutex<Progress>,
    cancel: AtomicBool,
    conn: Mutex<Option<Connection>>,
    bytes: AtomicU64,
}

impl Shared {
    /// Asks the migration to stop. Only before the hand-over: returns
    /// false once the guest is being handed over (or the migration is
    /// over).
    pub fn cancel(&self) -> bool {
        let progress = self.progress.lock().unwrap_or_else(|e| e.into_inner());
        if !matches!(progress.state.as_str(), "connecting" | "precopy") {
            return false;
        }
        self.cancel.store(true, Ordering::SeqCst);
        if let Some(c) = self.conn.lock().unwrap_or_else(|e| e.into_inner()).as_ref() {
            // Whatever the worker waits for returns at once.
            let _ = c.shutdown();
        }
        true
    }

    /// Ends the connection whatever the phase (the VM is going away).
    fn abort(&self) {
        self.cancel.store(true, Ordering::SeqCst);
        if let Some(c) = self.conn.lock().unwrap_or_else(|e| e.into_inner()).as_ref() {
            let _ = c.shutdown();
        }
    }

    fn set(&self, f: impl FnOnce(&mut Progress)) {
        f(&mut self.progress.lock().unwrap_or_else(|e| e.into_inner()));
    }

    /// A copy of the progress report.
    pub fn progress(&self) -> Progress {
        self.progress
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

struct Job {
    params: SendParams,
    shared: Arc<Shared>,
    hello: Vec<u8>,
}

/// What the worker reads and writes of the VM.
struct Context {
    vm: Arc<VmFd>,
    mem: GuestMemoryMmap,
    disks: Vec<DiskDevice>,
    nets: Vec<NetDevice>,
    /// KVM's dirty log stays on after a failed migration (diff snapshots
    /// use it).
    track_dirty_pages: bool,
    to_vmm: Sender<ToVmm>,
    wake: EventFd,
    handover: Receiver<Result<Vec<u8>, String>>,
    stall_after_release: Option<Duration>,
    /// `/proc/self/pagemap`, where a page not present is a zero page (see
    /// `touched`).
    pagemap: Option<std::fs::File>,
}

/// Tests only: milliseconds the source waits after releasing the guest
/// before it reads the destination's last answer (to kill it there).
pub const STALL_ENV: &str = "EMBER_TEST_MIGRATION_STALL_AFTER_RELEASE_MS";

impl Context {
    fn tell(&self, m: ToVmm) {
        if self.to_vmm.send(m).is_err() || self.wake.write(1).is_err() {
            log::warn!("migration: the VMM thread is gone");
        }
    }
}

/// The migration worker of one VM.
#[derive(Debug)]
pub struct Worker {
    jobs: Option<Sender<Job>>,
    handle: Option<JoinHandle<()>>,
    /// Messages for the VMM thread (woken through the event loop's
    /// wake-up eventfd).
    pub to_vmm: Receiver<ToVmm>,
    /// The VMM thread's answer to [`ToVmm::Handover`].
    pub handover: Sender<Result<Vec<u8>, String>>,
    current: Mutex<Option<Arc<Shared>>>,
}

/// Counts what goes through to the connection.
struct Counted<W> {
    inner: W,
    shared: Arc<Shared>,
}

impl<W: Write> Write for Counted<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.shared.bytes.fetch_add(n as u64, Ordering::Relaxed);
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// What the worker is given of the VM.
pub struct VmParts {
    /// The VM (dirty log).
    pub vm: Arc<VmFd>,
    /// Guest memory.
    pub mem: GuestMemoryMmap,
    /// The disks (flushed, their locks handed over).
    pub disks: Vec<DiskDevice>,
    /// The NICs (their taps, in a local migration).
    pub nets: Vec<NetDevice>,
    /// KVM's dirty log stays on after a migration.
    pub track_dirty_pages: bool,
    /// A page of anonymous memory that is not present reads as zeros (no
    /// userfaultfd handler fills it).
    pub untouched_is_zero: bool,
}

impl Worker {
    /// Starts the worker thread; it installs the migration filter first
    /// thing and waits for a job.
    pub fn spawn(parts: VmParts, wake: EventFd, filters: &Filters) -> Result<Self, Error> {
        let VmParts {
            vm,
            mem,
            disks,
            nets,
            track_dirty_pages,
            untouched_is_zero,
        } = parts;
        let (jobs_tx, jobs) = mpsc::channel::<Job>();
        let (to_vmm_tx, to_vmm) = mpsc::channel();
        let (handover, handover_rx) = mpsc::channel();
        let ctx = Context {
            vm,
            mem,
            disks,
            nets,
            track_dirty_pages,
            to_vmm: to_vmm_tx,
            wake,
            handover: handover_rx,
            stall_after_release: std::env::var(STALL_ENV)
                .ok()
                .and_then(|v| v.parse().ok())
                .map(Duration::from_millis),
            pagemap: if untouched_is_zero {
                super::touched::open_pagemap()
            } else {
                None
            },
        };
        let filters = filters.clone();
        let handle = std::thread::Builder::new()
            .name("ember-migration".into())
            .spawn(move || {
                if let Err(e) = filters.install(ThreadKind::Migration, "migration") {
                    log::error!("migration: {}", crate::error_chain(&e));
                    return;
                }
                while let Ok(job) = jobs.recv() {
                    let outcome = run(&ctx, &job);
                    *job.shared.conn.lock().unwrap_or_else(|e| e.into_inner()) = None;
                    ctx.tell(ToVmm::Finished(outcome));
                }
            })
            .map_err(|e| Error::Migration(format!("cannot start the migration thread: {e}")))?;
        Ok(Worker {
            jobs: Some(jobs_tx),
            handle: Some(handle),
            to_vmm,
            handover,
            current: Mutex::new(None),
        })
    }

    /// Starts a migration; `hello` is the `Start` payload.
    pub fn send(
        &self,
        params: SendParams,
        shared: Arc<Shared>,
        hello: Vec<u8>,
    ) -> Result<(), Error> {
        shared.set(|p| {
            *p = Progress {
                state: "connecting".into(),
                destination_url: params.url.to_string(),
                ..Progress::default()
            }
        });
        *self.current.lock().unwrap_or_else(|e| e.into_inner()) = Some(shared.clone());
        self.jobs
            .as_ref()
            .and_then(|j| {
                j.send(Job {
                    params,
                    shared,
                    hello,
                })
                .ok()
            })
            .ok_or_else(|| Error::Migration("the migration thread is gone".into()))
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        // A migration under way ends now: its connection is shut, a wait
        // for the hand-over state ends (its sender replaced), and closing
        // the job channel ends the thread's loop.
        if let Some(s) = self
            .current
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
        {
            s.abort();
        }
        self.handover = mpsc::channel().0;
        self.jobs = None;
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

fn run(ctx: &Context, job: &Job) -> Outcome {
    let t = Instant::now();
    let shared = &job.shared;
    let mut handed_over = false;
    let mut released = false;
    let mut ran_there = false;
    let result = send(ctx, job, t, &mut handed_over, &mut released, &mut ran_there);
    if !ctx.track_dirty_pages {
        if let Err(e) = vm::set_dirty_log(&ctx.vm, &ctx.mem, false) {
            log::warn!("migration: cannot turn the dirty log off: {e}");
        }
    }
    match result {
        Ok(()) => {
            shared.set(|p| {
                p.state = "completed".into();
                p.total_ms = ms(t.elapsed());
            });
            Outcome::Completed(shared.progress())
        }
        Err(error) => {
            let cancelled = shared.cancel.load(Ordering::SeqCst) && !handed_over;
            let error = if cancelled {
                "cancelled; the guest runs on here".to_string()
            } else {
                error
            };
            // Once the guest ran at the destination (post-copy), its disks
            // moved on from this memory: it never runs here again.
            let resume = !ran_there && (!released || retake_locks(ctx));
            if ran_there {
                log::error!("migration: the guest ran at the destination before the post-copy failed: it stays paused here, and the destination cannot go on without the pages this side still holds");
            }
            shared.set(|p| {
                p.state = if cancelled { "cancelled" } else { "failed" }.into();
                p.error = Some(error.clone());
                p.total_ms = ms(t.elapsed());
            });
            Outcome::Failed { error, resume }
        }
    }
}

/// After a failure past `Release`: takes every disk's lock back. The guest
/// may run here again only if every writable disk's lock was free (a
/// destination running it would hold them); with no writable disk, that
/// cannot be known and the guest stays paused.
fn retake_locks(ctx: &Context) -> bool {
    let mut exclusive = false;
    let mut all = true;
    for (i, d) in ctx.disks.iter().enumerate() {
        let mut d = d.lock().unwrap_or_else(|e| e.into_inner());
        exclusive |= !d.device().read_only();
        if let Err(e) = d.device_mut().retake_lock() {
            log::error!(
                "migration: disk {i}: {}: the destination may be running the guest",
                crate::error_chain(&e)
            );
            all = false;
        }
    }
    if !exclusive {
        log::error!(
            "migration: the hand-over failed after the source let go of the guest; with no writable disk whose lock would tell, the destination may be running it: the source stays paused (resume it with PATCH /vm only if the destination does not run it)"
        );
    }
    all && exclusive
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// A stream error at step `what`, saying so plainly when the peer is gone
/// (it closed the connection, was killed or unplugged).
fn err(what: &str) -> impl Fn(ember_migration::Error) -> String + '_ {
    use std::io::ErrorKind;
    move |e| match &e {
        ember_migration::Error::Truncated("frame head") => {
            format!("{what}: the destination closed the connection")
        }
        ember_migration::Error::Io(io)
            if matches!(
                io.kind(),
                ErrorKind::BrokenPipe | ErrorKind::ConnectionReset | ErrorKind::ConnectionAborted
            ) =>
        {
            format!("{what}: the destination closed the connection ({io})")
        }
        _ => format!("{what}: {}", crate::error_chain(&e)),
    }
}

fn send(
    ctx: &Context,
    job: &Job,
    t: Instant,
    handed_over: &mut bool,
    released: &mut bool,
    ran_there: &mut bool,
) -> Result<(), String> {
    let (params, shared) = (&job.params, &job.shared);
    let conn = connect(&params.url).map_err(|e| crate::error_chain(&e))?;
    let mut back = conn.try_clone().map_err(|e| format!("socket: {e}"))?;
    // For frames that carry descriptors, past the buffered writer.
    let mut raw = conn.try_clone().map_err(|e| format!("socket: {e}"))?;
    *shared.conn.lock().unwrap_or_else(|e| e.into_inner()) =
        Some(conn.try_clone().map_err(|e| format!("socket: {e}"))?);
    // A canceller that came before the connection existed.
    if shared.cancel.load(Ordering::SeqCst) {
        return Err("cancelled".into());
    }
    let out = Counted {
        inner: BufWriter::with_capacity(1 << 20, conn),
        shared: shared.clone(),
    };
    let mut w = Writer::new(out).map_err(err("header"))?;

    // 1. What the destination checks before memory moves.
    w.start(&job.hello).map_err(err("start"))?;
    w.flush().map_err(err("start"))?;
    match read_reply(&mut back).map_err(err("the destination's answer"))? {
        Reply::Ready => {}
        Reply::Refused(why) => return Err(format!("the destination refused the VM: {why}")),
        other => return Err(format!("the destination answered {other:?} to the start")),
    }

    // 2. Memory: handed over as a file (local), or copied in rounds.
    let (mut pending, round, postcopy) = if params.local {
        let (file, offsets) = memory_file(&ctx.mem)?;
        w.flush().map_err(err("start"))?;
        let payload = serde_json::to_vec(&super::MemoryFile { offsets })
            .map_err(|e| format!("memory layout: {e}"))?;
        let frame = ember_migration::frame_bytes(ember_migration::Kind::MemoryFd, &payload)
            .map_err(err("memory"))?;
        raw.send_with_fds(&frame, &[file])
            .map_err(|e| format!("cannot hand the memory over: {e}"))?;
        log::info!("migration: guest memory handed over as a file descriptor");
        (Vec::new(), 0, false)
    } else {
        precopy(&mut w, &mut back, ctx, job, t)?
    };
    if shared.cancel.load(Ordering::SeqCst) {
        return Err("cancelled".into());
    }

    // 3. The hand-over: the VMM thread pauses the guest and saves it.
    shared.set(|p| p.state = "handover".into());
    *handed_over = true;
    ctx.tell(super::ToVmm::Handover);
    let paused = Instant::now();
    let state = ctx
        .handover
        .recv()
        .map_err(|_| "the VMM thread is gone".to_string())??;
    let saved = paused.elapsed();
    let mut last_pages = 0;
    let mut stale = None;
    if !params.local {
        unite(&mut pending, &take_dirty(ctx)?);
        if postcopy && count_pages(&pending) > 0 {
            // The guest moves now; these pages follow it.
            let set = ember_migration::PageSet { maps: pending };
            log::info!(
                "migration: post-copy: {} pages follow the guest",
                set.count()
            );
            w.postcopy(&set).map_err(err("post-copy page set"))?;
            stale = Some(set);
        } else {
            last_pages = send_round(&mut w, ctx, shared, round + 1, Round::Dirty(&pending))?.pages;
        }
    }
    let paged = paused.elapsed();
    w.state(&state).map_err(err("state"))?;
    w.end().map_err(err("end"))?;
    match read_reply(&mut back).map_err(err("the destination's answer to the state"))? {
        Reply::Received => {}
        Reply::Refused(why) => return Err(format!("the destination refused the state: {why}")),
        other => return Err(format!("the destination answered {other:?} to the state")),
    }
    let received = paused.elapsed();

    // 4. The disks go to the destination.
    *released = true;
    for (i, d) in ctx.disks.iter().enumerate() {
        let mut d = d.lock().unwrap_or_else(|e| e.into_inner());
        d.device_mut()
            .release_lock()
            .map_err(|e| format!("disk {i}: {}", crate::error_chain(&e)))?;
    }
    if params.local {
        // The taps go with the guest (a tap takes one process at a time);
        // the source keeps its own descriptors, in case this fails.
        let taps = tap_fds(ctx)?;
        w.flush().map_err(err("release"))?;
        let frame = ember_migration::frame_bytes(ember_migration::Kind::Release, &[])
            .map_err(err("release"))?;
        raw.send_with_fds(&frame, &taps)
            .map_err(|e| format!("cannot hand the taps over: {e}"))?;
    } else {
        w.release().map_err(err("release"))?;
    }
    let mut post = postcopy::OutgoingStats::default();
    if let Some(stale) = &stale {
        shared.set(|p| {
            p.state = "postcopy".into();
            p.postcopy_pages_left = stale.count();
        });
        if let Err(e) = raw.set_send_buffer(postcopy::SEND_BUFFER) {
            log::warn!("migration: post-copy: cannot shrink the send buffer: {e}");
        }
        let served = postcopy::serve_source(
            &mut w,
            &mut back,
            &ctx.mem,
            stale,
            round + 1,
            &mut post,
            &|left, s| {
                shared.set(|p| {
                    p.postcopy_pages_left = left;
                    p.page_requests = s.requests;
                    p.pages_sent_on_request = s.requested;
                    p.bytes_sent = shared.bytes.load(Ordering::Relaxed);
                    if p.downtime_ms.is_none() {
                        p.downtime_ms = s
                            .running_at
                            .map(|at| ms(at.saturating_duration_since(paused)));
                    }
                })
            },
        );
        *ran_there = post.running_at.is_some();
        served?;
        shared.set(|p| p.pages_sent += post.pages);
    }
    if let Some(d) = ctx.stall_after_release {
        // Tests only: a window to kill the source after the hand-over.
        log::warn!("migration: stalling {d:?} after the release ({STALL_ENV})");
        // A futex wait (the filter has no clock_nanosleep).
        let (_keep, never) = mpsc::channel::<()>();
        let _ = never.recv_timeout(d);
    }
    let downtime = match post.running_at {
        Some(at) => at.saturating_duration_since(paused),
        None => {
            match read_reply(&mut back).map_err(err("the destination's last answer"))? {
                Reply::Done => {}
                Reply::Refused(why) => {
                    return Err(format!("the destination could not run the guest: {why}"))
                }
                other => return Err(format!("the destination answered {other:?} to the release")),
            }
            paused.elapsed()
        }
    };
    log::info!(
        "migration: pause breakdown: paused and saved {:.1} ms, last {last_pages} pages {:.1} ms, \
         state ({} KiB) sent and checked {:.1} ms, disks handed over and guest resumed {:.1} ms",
        ms(saved),
        ms(paged - saved),
        state.len() >> 10,
        ms(received - paged),
        ms(downtime.saturating_sub(received))
    );
    let rounds = if params.local { 0 } else { round + 1 };
    shared.set(|p| {
        p.downtime_ms = Some(ms(downtime));
        p.round = rounds;
    });
    if stale.is_some() {
        log::info!(
            "migration: post-copy: {} pages after the guest moved ({} on {} requests), last one {:.1} ms after the resume",
            post.pages,
            post.requested,
            post.requests,
            ms(paused.elapsed().saturating_sub(downtime))
        );
    }
    log::info!(
        "migration: done in {:.1} ms, guest paused {:.1} ms, {} rounds{}, {} bytes",
        ms(t.elapsed()),
        ms(downtime),
        rounds,
        if stale.is_some() {
            " and post-copy"
        } else {
            ""
        },
        shared.bytes.load(Ordering::Relaxed)
    );
    Ok(())
}

/// The pre-copy rounds: every page, then the pages dirtied meanwhile,
/// until they fit the downtime (or the round limit, or the timeout).
/// Returns the dirty pages not sent yet and the last round's number.
fn precopy<W: Write>(
    w: &mut Writer<W>,
    back: &mut Connection,
    ctx: &Context,
    job: &Job,
    t: Instant,
) -> Result<(Vec<Vec<u64>>, u32, bool), String> {
    let (params, shared) = (&job.params, &job.shared);
    // Dirty tracking from here: everything sent from now on that changes
    // is sent again.
    vm::set_dirty_log(&ctx.vm, &ctx.mem, true).map_err(|e| crate::error_chain(&e))?;
    take_dirty(ctx)?;
    shared.set(|p| p.state = "precopy".into());
    let mut round = 0u32;
    let started = Instant::now();
    // Pages never touched are zeros at the destination too: not read.
    let touched = ctx.pagemap.as_ref().and_then(|pm| {
        super::touched::touched_pages(&ctx.mem, pm)
            .map_err(|e| log::warn!("migration: reading the page map: {e}; every page is read"))
            .ok()
    });
    let first = match &touched {
        Some(maps) => {
            log::info!("migration: {} pages were ever touched", count_pages(maps));
            Round::Touched(maps)
        }
        None => Round::All,
    };
    let stats = send_round(w, ctx, shared, round, first)?;
    sync(w, back)?;
    let mut bandwidth = rate(shared, &stats, started.elapsed());
    let mut pending = take_dirty(ctx)?;
    // Rounds in a row that did not shrink the dirty set below 90% of the
    // smallest one yet.
    let (mut smallest, mut stalled) = (u64::MAX, 0u32);
    loop {
        if shared.cancel.load(Ordering::SeqCst) {
            return Err("cancelled".into());
        }
        let dirty = count_pages(&pending);
        let expected = Duration::from_secs_f64(dirty as f64 * 4096.0 / bandwidth.max(1.0));
        shared.set(|p| {
            p.dirty_pages = dirty;
            p.expected_downtime_ms = ms(expected);
            p.total_ms = ms(t.elapsed());
        });
        log::info!(
            "migration: round {round}: {dirty} dirty pages, {:.0} MiB/s, expected pause {:.1} ms",
            bandwidth / f64::from(1 << 20),
            ms(expected)
        );
        if expected <= params.downtime {
            break;
        }
        if dirty * 10 < smallest * 9 {
            stalled = 0;
        } else {
            stalled += 1;
        }
        smallest = smallest.min(dirty);
        let switch = match params.postcopy {
            Postcopy::Never => false,
            Postcopy::Now => true,
            Postcopy::Auto => stalled >= STALLED_ROUNDS || round >= params.max_rounds,
        };
        if switch {
            log::info!(
                "migration: round {round}: switching to post-copy ({})",
                if params.postcopy == Postcopy::Now {
                    "memory_mode Postcopy".to_string()
                } else {
                    format!("{dirty} dirty pages, {stalled} rounds without shrinking")
                }
            );
            return Ok((pending, round, true));
        }
        if round >= params.max_rounds {
            break;
        }
        if t.elapsed() > params.timeout {
            if params.ignore_timeout {
                log::warn!("migration: not converged after {:?}; handing over anyway (timeout_strategy Ignore)", params.timeout);
                break;
            }
            return Err(format!(
                "not converged within timeout_s ({} s): {dirty} pages still dirty; the guest runs on here",
                params.timeout.as_secs()
            ));
        }
        round += 1;
        shared.set(|p| p.round = round);
        let r = Instant::now();
        let stats = send_round(w, ctx, shared, round, Round::Dirty(&pending))?;
        sync(w, back)?;
        let took = r.elapsed();
        bandwidth = rate(shared, &stats, took);
        pending = take_dirty(ctx)?;
        let rate_now = count_pages(&pending) as f64 / took.as_secs_f64().max(1e-6);
        shared.set(|p| p.dirty_rate_pages_per_s = rate_now);
    }
    Ok((pending, round, false))
}

/// Rounds in a row whose dirty set does not shrink before a migration
/// switches to post-copy (`Postcopy::Auto`).
const STALLED_ROUNDS: u32 = 3;

/// The memfd behind guest memory and where each region lies in it.
fn memory_file(mem: &GuestMemoryMmap) -> Result<(RawFd, Vec<u64>), String> {
    use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
    let mut fd = None;
    let mut offsets = Vec::new();
    for r in mem.iter() {
        let fo = r.file_offset().ok_or_else(|| {
            "local migration needs shared guest memory (--memory size=MIB,shared=on)".to_string()
        })?;
        let this = fo.arc();
        if !std::sync::Arc::ptr_eq(fd.get_or_insert(this), this) {
            return Err("guest memory is in more than one file".into());
        }
        offsets.push(fo.start());
    }
    fd.map(|f| (f.as_raw_fd(), offsets))
        .ok_or_else(|| "no guest memory".to_string())
}

/// Each NIC's tap descriptors (one per queue pair) or socket to passt, in
/// order.
fn tap_fds(ctx: &Context) -> Result<Vec<RawFd>, String> {
    let mut fds = Vec::new();
    for (i, n) in ctx.nets.iter().enumerate() {
        let mine = n
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .device()
            .backend_raw_fds();
        if mine.is_empty() {
            return Err(format!("NIC {i} has no descriptor to hand over"));
        }
        fds.extend(mine);
    }
    Ok(fds)
}

fn take_dirty(ctx: &Context) -> Result<Vec<Vec<u64>>, String> {
    vm::take_dirty_pages(&ctx.vm, &ctx.mem).map_err(|e| crate::error_chain(&e))
}

fn send_round<W: Write>(
    w: &mut Writer<W>,
    ctx: &Context,
    shared: &Shared,
    round: u32,
    which: Round<'_>,
) -> Result<SendStats, String> {
    let stats = send_memory(w, &ctx.mem, round, which).map_err(err("memory"))?;
    w.flush().map_err(err("memory"))?;
    shared.set(|p| {
        p.pages_sent += stats.pages;
        p.zero_pages_sent += stats.zero_pages;
        p.bytes_sent = shared.bytes.load(Ordering::Relaxed);
    });
    Ok(stats)
}

/// Ends a round: `Sync`, and the destination's `Synced` once it has
/// written everything into guest memory. A round is then timed end to end
/// (the bandwidth is what the destination takes in, not what the local
/// socket buffers swallow), and when the guest pauses nothing is left
/// queued between the two (megabytes in autotuned socket buffers: tens
/// of milliseconds of pause on a fast link, hundreds on a slow one).
fn sync<W: Write>(w: &mut Writer<W>, back: &mut Connection) -> Result<(), String> {
    w.sync().map_err(err("round end"))?;
    match read_reply(back).map_err(err("the destination's answer to a round"))? {
        Reply::Synced => Ok(()),
        Reply::Refused(why) => Err(format!("the destination refused the memory: {why}")),
        other => Err(format!("the destination answered {other:?} to a round")),
    }
}

/// Bytes per second of a round (a round too small to time well counts as
/// fast).
fn rate(shared: &Shared, stats: &SendStats, took: Duration) -> f64 {
    let bytes = (stats.pages * 4096 + stats.zero_pages * 8) as f64;
    let bw = if took < Duration::from_millis(1) || bytes < 65536.0 {
        // Too little to measure: assume a gigabit link at least.
        125e6
    } else {
        bytes / took.as_secs_f64()
    };
    shared.set(|p| p.bandwidth_mib_per_s = bw / f64::from(1 << 20));
    bw
}
