//! virtio-balloon: see README.md.
//!
//! ```
//! use ember_virtio::VirtioDevice;
//! use ember_virtio_balloon::{Balloon, BalloonConfig};
//!
//! let b = Balloon::new(BalloonConfig {
//!     amount_mib: 64,
//!     deflate_on_oom: true,
//!     stats_polling_interval_s: 1,
//!     free_page_reporting: true,
//! })
//! .unwrap();
//! // inflate, deflate, stats and reporting queues.
//! assert_eq!(b.queue_max_sizes().len(), 4);
//! let mut num_pages = [0u8; 4];
//! b.read_config(0, &mut num_pages);
//! assert_eq!(u32::from_le_bytes(num_pages), 64 * 256);
//! ```

mod discard;
mod stats;

use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ember_memory::GuestMemoryMmap;
use ember_virtio::{
    ActivateContext, ActivateError, BackendInterest, InterruptKind, VirtioDevice, VirtioInterrupt,
};
use log::{info, warn};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::timerfd::TimerFd;

pub use discard::Discarded;
pub use stats::{BalloonStats, StatTag};

/// virtio-balloon's device id.
pub const VIRTIO_ID_BALLOON: u32 = 5;
/// The guest reports pages in 4 KiB frames, whatever its page size.
pub const PFN_SHIFT: u32 = 12;
/// Deflate when the guest runs out of memory.
pub const F_DEFLATE_ON_OOM: u32 = 2;
/// The statistics queue.
pub const F_STATS_VQ: u32 = 1;
/// Free page reporting.
pub const F_REPORTING: u32 = 5;
/// Pages per MiB.
const PAGES_PER_MIB: u32 = 1 << (20 - PFN_SHIFT);
/// Queue size of every queue.
pub const QUEUE_SIZE: u16 = 256;
/// Bytes of config space: num_pages, actual, free_page_hint_cmd_id,
/// poison_val.
const CONFIG_SIZE: usize = 16;

/// Why a balloon cannot be built or changed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    /// The target does not fit the config space's page count.
    #[error("amount_mib = {0} is too large")]
    TooLarge(u32),
    /// Statistics can be turned on or off only before the guest boots.
    #[error("statistics were {}abled when the balloon was configured and cannot be {}abled after boot", if *.0 { "en" } else { "dis" }, if *.0 { "dis" } else { "en" })]
    StatsToggle(bool),
    /// The statistics timer cannot be made or set.
    #[error("statistics timer: {0}")]
    Timer(String),
    /// A saved state this device cannot take.
    #[error("balloon state: {0}")]
    State(String),
}

/// How the balloon is configured (Firecracker's `Balloon` body; in a TOML
/// config, `[balloon]` with these keys, each optional).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BalloonConfig {
    /// The target size in MiB.
    pub amount_mib: u32,
    /// Offer `VIRTIO_BALLOON_F_DEFLATE_ON_OOM`.
    pub deflate_on_oom: bool,
    /// Seconds between statistics (0: no statistics queue).
    pub stats_polling_interval_s: u16,
    /// Offer `VIRTIO_BALLOON_F_REPORTING`.
    pub free_page_reporting: bool,
}

/// What the device did, for metrics and tests.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    /// Pages the guest put in the balloon (inflate requests).
    pub inflated_pages: u64,
    /// Pages the guest took back (deflate requests).
    pub deflated_pages: u64,
    /// Bytes reported free by the guest.
    pub reported_bytes: u64,
    /// Bytes given back to the host (inflated and reported).
    pub discarded_bytes: u64,
    /// Page numbers or ranges that were refused (outside guest memory).
    pub refused: u64,
    /// Statistics buffers received.
    pub stats_updates: u64,
}

/// The balloon's saved state (plain data, versioned by the snapshot).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct BalloonState {
    /// The configuration (with the current target).
    pub config: BalloonConfig,
    /// The guest's `actual` pages.
    pub actual_pages: u32,
    /// The statistics buffer the device held (its descriptor head), given
    /// back to the guest at the next interval after a restore.
    #[serde(default)]
    pub stats_head: Option<u16>,
}

/// The queues' roles, in queue order as the driver set them up.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Role {
    Inflate,
    Deflate,
    Stats,
    Reporting,
}

struct Active {
    mem: GuestMemoryMmap,
    interrupt: Arc<dyn VirtioInterrupt>,
    queues: Vec<(Role, Queue)>,
    /// The statistics buffer the guest handed over and the device holds
    /// until the next poll.
    stats_head: Option<u16>,
}

/// The virtio-balloon device.
pub struct Balloon {
    config: BalloonConfig,
    avail_features: u64,
    queue_sizes: Vec<u16>,
    target_pages: u32,
    actual_pages: u32,
    timer: TimerFd,
    active: Option<Active>,
    stats: Option<(BalloonStats, Instant)>,
    counters: Counters,
    logged_bad_input: bool,
    /// A restored statistics buffer, taken over when the restored
    /// transport activates the device.
    restored_stats_head: Option<u16>,
}

impl std::fmt::Debug for Balloon {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Balloon")
            .field("config", &self.config)
            .field("target_pages", &self.target_pages)
            .field("actual_pages", &self.actual_pages)
            .finish_non_exhaustive()
    }
}

/// A timerfd whose read never blocks: the device reads it when the event
/// loop says it is readable, and a read of a timer that did not fire (a
/// spurious wake-up) must not stall the loop.
#[allow(unsafe_code)]
fn nonblocking_timer() -> Result<TimerFd, Error> {
    let timer = TimerFd::new().map_err(|e| Error::Timer(e.to_string()))?;
    let fd = timer.as_raw_fd();
    // SAFETY: fcntl(2) on a descriptor `timer` owns; F_GETFL/F_SETFL only
    // read and set its status flags.
    let rc = unsafe {
        let flags = libc::fcntl(fd, libc::F_GETFL);
        if flags < 0 {
            flags
        } else {
            libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK)
        }
    };
    if rc < 0 {
        return Err(Error::Timer(std::io::Error::last_os_error().to_string()));
    }
    Ok(timer)
}

fn pages(mib: u32) -> Result<u32, Error> {
    mib.checked_mul(PAGES_PER_MIB).ok_or(Error::TooLarge(mib))
}

impl Balloon {
    /// A balloon that will aim at `config.amount_mib` once the guest drives it.
    pub fn new(config: BalloonConfig) -> Result<Self, Error> {
        let mut avail_features = 1u64 << virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
        let mut queue_sizes = vec![QUEUE_SIZE, QUEUE_SIZE];
        if config.deflate_on_oom {
            avail_features |= 1 << F_DEFLATE_ON_OOM;
        }
        if config.stats_polling_interval_s > 0 {
            avail_features |= 1 << F_STATS_VQ;
            queue_sizes.push(QUEUE_SIZE);
        }
        if config.free_page_reporting {
            avail_features |= 1 << F_REPORTING;
            queue_sizes.push(QUEUE_SIZE);
        }
        Ok(Balloon {
            target_pages: pages(config.amount_mib)?,
            config,
            avail_features,
            queue_sizes,
            actual_pages: 0,
            timer: nonblocking_timer()?,
            active: None,
            stats: None,
            counters: Counters::default(),
            logged_bad_input: false,
            restored_stats_head: None,
        })
    }

    /// The configuration, with the current target.
    pub fn config(&self) -> BalloonConfig {
        self.config
    }

    /// The target in pages.
    pub fn target_pages(&self) -> u32 {
        self.target_pages
    }

    /// The pages the guest says the balloon holds.
    pub fn actual_pages(&self) -> u32 {
        self.actual_pages
    }

    /// What the device did so far.
    pub fn counters(&self) -> Counters {
        self.counters
    }

    /// The latest statistics and when they arrived (none before the first).
    pub fn stats(&self) -> Option<(&BalloonStats, Instant)> {
        self.stats.as_ref().map(|(s, t)| (s, *t))
    }

    /// Sets a new target; the caller raises the config-change interrupt
    /// (the transport's `signal_config_change`) when this returns true.
    pub fn set_target_mib(&mut self, mib: u32) -> Result<bool, Error> {
        let target = pages(mib)?;
        let changed = target != self.target_pages;
        self.target_pages = target;
        self.config.amount_mib = mib;
        Ok(changed)
    }

    /// Changes the statistics interval; statistics cannot be turned on or
    /// off once the device exists (the queue is fixed at boot).
    pub fn set_stats_interval(&mut self, seconds: u16) -> Result<(), Error> {
        let was = self.config.stats_polling_interval_s > 0;
        if was != (seconds > 0) {
            return Err(Error::StatsToggle(was));
        }
        self.config.stats_polling_interval_s = seconds;
        if self.active.is_some() {
            // The first statistics of the new interval right away.
            self.arm_timer(Duration::from_millis(1))?;
        }
        Ok(())
    }

    /// The saved state.
    pub fn state(&self) -> BalloonState {
        BalloonState {
            config: self.config,
            actual_pages: self.actual_pages,
            stats_head: self.active.as_ref().and_then(|a| a.stats_head),
        }
    }

    /// Takes a saved state, before the transport's restore activates the
    /// device: the device must have been made with the same configuration
    /// (the target may differ; the saved one wins).
    pub fn restore_state(&mut self, state: &BalloonState) -> Result<(), Error> {
        let (mine, saved) = (self.config, state.config);
        if (mine.deflate_on_oom, mine.free_page_reporting)
            != (saved.deflate_on_oom, saved.free_page_reporting)
            || (mine.stats_polling_interval_s == 0) != (saved.stats_polling_interval_s == 0)
        {
            return Err(Error::State(format!(
                "saved with {saved:?}, the device was made with {mine:?}"
            )));
        }
        let target = pages(saved.amount_mib)?;
        if state.stats_head.is_some() && saved.stats_polling_interval_s == 0 {
            return Err(Error::State(
                "a statistics buffer saved without statistics".into(),
            ));
        }
        if let Some(head) = state.stats_head.filter(|&h| h >= QUEUE_SIZE) {
            return Err(Error::State(format!(
                "statistics buffer {head} is beyond the queue's {QUEUE_SIZE} entries"
            )));
        }
        self.config = saved;
        self.target_pages = target;
        self.actual_pages = state.actual_pages;
        self.restored_stats_head = state.stats_head;
        Ok(())
    }

    fn arm_timer(&mut self, first: Duration) -> Result<(), Error> {
        let every = Duration::from_secs(u64::from(self.config.stats_polling_interval_s));
        if every.is_zero() {
            return Ok(());
        }
        self.timer
            .reset(first, Some(every))
            .map_err(|e| Error::Timer(e.to_string()))
    }

    fn bad_input(&mut self, what: &str) {
        self.counters.refused = self.counters.refused.saturating_add(1);
        if !std::mem::replace(&mut self.logged_bad_input, true) {
            warn!("virtio-balloon: {what} (ignored; further bad input is counted, not logged)");
        }
    }

    /// Completes `head` on queue `q` with `len` and interrupts if the
    /// driver wants it.
    fn complete(active: &mut Active, q: usize, head: u16, len: u32) {
        let Active {
            mem,
            interrupt,
            queues,
            ..
        } = active;
        let Some((_, queue)) = queues.get_mut(q) else {
            return;
        };
        if let Err(e) = queue.add_used(&*mem, head, len) {
            warn!("virtio-balloon: cannot complete chain {head} on queue {q}: {e}");
            return;
        }
        if queue.needs_notification(&*mem).unwrap_or(true) {
            let index = u16::try_from(q).unwrap_or(u16::MAX);
            if let Err(e) = interrupt.trigger(InterruptKind::Queue(index)) {
                warn!("virtio-balloon: cannot interrupt the guest: {e}");
            }
        }
    }

    /// Reads the readable bytes of a chain (page-number arrays and
    /// statistics are small: at most 256 page numbers or 16 statistics).
    fn readable(mem: &GuestMemoryMmap, chain: &[(u64, u32, bool)], limit: usize) -> Vec<u8> {
        let mut out = Vec::new();
        for &(addr, len, writable) in chain {
            if writable {
                continue;
            }
            let take = usize::try_from(len).unwrap_or(0).min(limit - out.len());
            let start = out.len();
            out.resize(start + take, 0);
            if mem
                .read_slice(&mut out[start..], GuestAddress(addr))
                .is_err()
            {
                out.truncate(start);
                break;
            }
            if out.len() == limit {
                break;
            }
        }
        out
    }

    fn process(&mut self, q: usize) {
        let Some(active) = self.active.as_mut() else {
            return;
        };
        let Some(&(role, _)) = active.queues.get(q) else {
            return;
        };
        let mut chains = Vec::new();
        {
            let Active { mem, queues, .. } = &mut *active;
            let queue = &mut queues[q].1;
            while let Some(chain) = ember_virtio::queue::pop(queue, mem) {
                let head = chain.head_index();
                let descs: Vec<(u64, u32, bool)> = chain
                    .take(usize::from(QUEUE_SIZE))
                    .map(|d| (d.addr().0, d.len(), d.is_write_only()))
                    .collect();
                chains.push((head, descs));
            }
        }
        for (head, descs) in chains {
            match role {
                Role::Inflate | Role::Deflate => {
                    let active = self.active.as_mut().map(|a| a.mem.clone());
                    let Some(mem) = active else { return };
                    let bytes = Self::readable(&mem, &descs, 4 * usize::from(QUEUE_SIZE) * 4);
                    let pfns: Vec<u32> = bytes
                        .chunks_exact(4)
                        .map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                        .collect();
                    if role == Role::Inflate {
                        self.inflate(&mem, &pfns);
                    } else {
                        self.counters.deflated_pages = self
                            .counters
                            .deflated_pages
                            .saturating_add(pfns.len() as u64);
                    }
                    if let Some(a) = self.active.as_mut() {
                        Self::complete(a, q, head, 0);
                    }
                }
                Role::Reporting => {
                    let Some(mem) = self.active.as_ref().map(|a| a.mem.clone()) else {
                        return;
                    };
                    for &(addr, len, _) in &descs {
                        let len = u64::from(len);
                        self.counters.reported_bytes =
                            self.counters.reported_bytes.saturating_add(len);
                        match discard::discard(&mem, addr, len) {
                            Ok(d) => {
                                self.counters.discarded_bytes =
                                    self.counters.discarded_bytes.saturating_add(d.bytes)
                            }
                            Err(e) => {
                                self.bad_input(&format!("reported range {addr:#x}+{len:#x}: {e}"))
                            }
                        }
                    }
                    if let Some(a) = self.active.as_mut() {
                        Self::complete(a, q, head, 0);
                    }
                }
                Role::Stats => {
                    let Some(mem) = self.active.as_ref().map(|a| a.mem.clone()) else {
                        return;
                    };
                    let bytes = Self::readable(&mem, &descs, stats::MAX_BYTES);
                    match BalloonStats::parse(&bytes) {
                        Some(s) => {
                            self.stats = Some((s, Instant::now()));
                            self.counters.stats_updates =
                                self.counters.stats_updates.saturating_add(1);
                        }
                        None => {
                            self.bad_input(&format!("a {}-byte statistics buffer", bytes.len()))
                        }
                    }
                    if let Some(a) = self.active.as_mut() {
                        // Hold the buffer until the next poll; a second one
                        // (the driver keeps one) completes the older.
                        if let Some(old) = a.stats_head.replace(head) {
                            Self::complete(a, q, old, 0);
                        }
                    }
                }
            }
        }
    }

    fn inflate(&mut self, mem: &GuestMemoryMmap, pfns: &[u32]) {
        self.counters.inflated_pages = self
            .counters
            .inflated_pages
            .saturating_add(pfns.len() as u64);
        // Runs of consecutive frames become one range each.
        let mut i = 0;
        while i < pfns.len() {
            let start = pfns[i];
            let mut n = 1u64;
            while i + 1 < pfns.len() && u64::from(pfns[i + 1]) == u64::from(start) + n {
                n += 1;
                i += 1;
            }
            i += 1;
            let addr = u64::from(start) << PFN_SHIFT;
            match discard::discard(mem, addr, n << PFN_SHIFT) {
                Ok(d) => {
                    self.counters.discarded_bytes =
                        self.counters.discarded_bytes.saturating_add(d.bytes)
                }
                Err(e) => self.bad_input(&format!("inflated pages {addr:#x}+{n}: {e}")),
            }
        }
    }

    /// The statistics timer fired: hand the held buffer back so the guest
    /// refills it.
    fn poll_stats(&mut self) {
        // Nothing to do unless the timer fired (the read does not block).
        if !matches!(self.timer.wait(), Ok(n) if n > 0) {
            return;
        }
        let Some(active) = self.active.as_mut() else {
            return;
        };
        let Some(q) = active.queues.iter().position(|(r, _)| *r == Role::Stats) else {
            return;
        };
        if let Some(head) = active.stats_head.take() {
            Self::complete(active, q, head, 0);
        }
    }
}

impl VirtioDevice for Balloon {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_BALLOON
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn avail_features(&self) -> u64 {
        self.avail_features
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let mut config = [0u8; CONFIG_SIZE];
        config[0..4].copy_from_slice(&self.target_pages.to_le_bytes());
        config[4..8].copy_from_slice(&self.actual_pages.to_le_bytes());
        for (i, b) in data.iter_mut().enumerate() {
            *b = usize::try_from(offset)
                .ok()
                .and_then(|o| o.checked_add(i))
                .and_then(|at| config.get(at))
                .copied()
                .unwrap_or(0);
        }
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        // Only `actual` (bytes 4-7) is the driver's to write.
        if offset == 4 && data.len() == 4 {
            let actual = u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
            if actual != self.actual_pages && actual == self.target_pages {
                info!(
                    "virtio-balloon: the guest's balloon holds {} MiB (target {} MiB)",
                    actual / PAGES_PER_MIB,
                    self.target_pages / PAGES_PER_MIB
                );
            }
            self.actual_pages = actual;
        } else {
            log::debug!(
                "virtio-balloon: ignored {}-byte config write at {offset:#x}",
                data.len()
            );
        }
    }

    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
        let acked = ctx.acked_features;
        let mut roles = vec![Role::Inflate, Role::Deflate];
        if acked & (1 << F_STATS_VQ) != 0 {
            roles.push(Role::Stats);
        }
        if acked & (1 << F_REPORTING) != 0 {
            roles.push(Role::Reporting);
        }
        if ctx.queues.len() != roles.len() {
            return Err(ActivateError::QueueCount {
                expected: roles.len(),
                got: ctx.queues.len(),
            });
        }
        let stats = roles.contains(&Role::Stats);
        self.active = Some(Active {
            mem: ctx.mem,
            interrupt: ctx.interrupt,
            queues: roles.into_iter().zip(ctx.queues).collect(),
            stats_head: self.restored_stats_head.take(),
        });
        if stats {
            self.arm_timer(Duration::from_secs(u64::from(
                self.config.stats_polling_interval_s,
            )))
            .map_err(|e| ActivateError::Device(e.to_string()))?;
        }
        // Whatever arrived before activation is taken now.
        for q in 0..self.active.as_ref().map_or(0, |a| a.queues.len()) {
            self.process(q);
        }
        Ok(())
    }

    fn is_activated(&self) -> bool {
        self.active.is_some()
    }

    fn process_queue(&mut self, index: usize) {
        self.process(index);
    }

    fn reset(&mut self) {
        self.active = None;
        self.restored_stats_head = None;
        let _ = self.timer.clear();
        self.actual_pages = 0;
    }

    fn queue_states(&self) -> Vec<virtio_queue::QueueState> {
        self.active
            .as_ref()
            .map(|a| a.queues.iter().map(|(_, q)| q.state()).collect())
            .unwrap_or_default()
    }

    fn backend_fd(&self) -> Option<RawFd> {
        Some(self.timer.as_raw_fd())
    }

    fn process_backend(&mut self) -> BackendInterest {
        self.poll_stats();
        BackendInterest::Keep
    }
}

#[cfg(test)]
mod tests;
