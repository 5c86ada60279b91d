//! The virtio-blk device: its features, its config space, and the queue
//! loop that parses each chain, runs it on the backend (or hands it to the
//! io_uring engine) and completes it. Request execution is in `exec`, the
//! ring in `uring`; the ring's completions (`device/completions.rs`), what
//! a failure under `werror=stop` does (`device/stop.rs`) and the log's
//! rate limits (`device/logged.rs`) are child modules that share the
//! device's state.

use std::fmt;
use std::mem::{offset_of, size_of};
use std::path::PathBuf;
use std::sync::Arc;

use ember_memory::GuestMemoryMmap;
use std::os::fd::AsRawFd;

use ember_rate_limiter::{RateLimiter, RateLimiterConfig, TokenType};
use ember_virtio::queue::{drain_while, Flow, UsedRing};
use ember_virtio::{
    ActivateContext, ActivateError, BackendInterest, InterruptKind, VirtioDevice, VirtioInterrupt,
};
use log::{debug, warn};
use virtio_bindings::virtio_blk::{
    virtio_blk_config, VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH,
    VIRTIO_BLK_F_MQ, VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_WRITE_ZEROES,
};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ids::VIRTIO_ID_BLOCK;
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use virtio_queue::{Queue, QueueT};

use crate::backend::BlockBackend;
use crate::exec::Executor;
use crate::qcow2::open_backend;
use crate::request::{
    Request, RequestKind, ID_BYTES, MAX_DISCARD_SECTORS, MAX_DISCARD_SEG, MAX_WRITE_ZEROES_SECTORS,
    MAX_WRITE_ZEROES_SEG, QUEUE_SIZE, SECTOR_SIZE, SEG_MAX,
};
use crate::uring::Uring;
use crate::{CacheMode, ErrorPolicy, ImageFormat, IoEngine};
use crate::{Error, Result};

/// An [`Executor`] over a [`Block`]'s fields, with guest memory `mem` and
/// `stop` to say why the disk stops. A macro, not a method: its borrows
/// stay apart from the queues the caller holds.
macro_rules! executor {
    ($block:expr, $mem:expr, $stop:expr) => {
        Executor {
            backend: &mut *$block.backend,
            id: &$block.id,
            mem: $mem,
            disk: &$block.disk,
            capacity: $block.capacity,
            read_only: $block.read_only,
            logged: &mut $block.logged,
            counters: &mut $block.counters,
            slices: Vec::new(),
            werror: $block.werror,
            rerror: $block.rerror,
            stop: $stop,
        }
    };
}

mod completions;
mod logged;
mod stop;

pub(crate) use logged::{first, IoClass, Logged};
use stop::{Held, StopNotify};

/// The most bytes handed to the backend in one call (one `preadv` or
/// `pwritev` for a [`crate::RawFile`]); larger requests take several calls.
pub const IO_CHUNK: usize = 1024 * 1024;

/// The logical block size advertised (`blk_size`): one sector.
const BLK_SIZE: u32 = 512;
/// `discard_sector_alignment`, in 512-byte sectors: any sector.
const DISCARD_SECTOR_ALIGNMENT: u32 = 1;
/// The size of `struct virtio_blk_config`.
const CONFIG_SIZE: usize = size_of::<virtio_blk_config>();

/// What a VMM says about one disk.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlockConfig {
    /// The image (or host block device).
    pub path: PathBuf,
    /// Whether the guest may only read it.
    pub read_only: bool,
    /// The serial the guest sees (GET_ID), at most 20 bytes.
    pub id: Option<String>,
    /// How the image is laid out (given, never guessed).
    pub format: ImageFormat,
    /// Request queues (`VIRTIO_BLK_F_MQ` when more than one), 1 to
    /// [`MAX_QUEUES`].
    pub num_queues: u16,
    /// Each queue's size: a power of two from 16 to [`MAX_QUEUE_SIZE`].
    pub queue_size: u16,
    /// How requests reach the host.
    pub io: IoEngine,
    /// Whether they go through the host's page cache.
    pub cache: CacheMode,
    /// What a failed write, flush, discard or write-zeroes does.
    pub werror: ErrorPolicy,
    /// What a failed read does.
    pub rerror: ErrorPolicy,
}

impl BlockConfig {
    /// A disk with one queue of [`QUEUE_SIZE`] entries.
    pub fn new(path: impl Into<PathBuf>, format: ImageFormat, read_only: bool) -> BlockConfig {
        BlockConfig {
            path: path.into(),
            read_only,
            id: None,
            format,
            num_queues: 1,
            queue_size: QUEUE_SIZE,
            io: IoEngine::Sync,
            cache: CacheMode::Writeback,
            werror: ErrorPolicy::Report,
            rerror: ErrorPolicy::Report,
        }
    }
}

/// The most request queues a disk can have.
pub const MAX_QUEUES: u16 = 64;
/// The largest queue size a disk can have.
pub const MAX_QUEUE_SIZE: u16 = 1024;

/// Checks a queue count and size; the error says which is wrong.
pub fn check_queues(num_queues: u16, queue_size: u16) -> std::result::Result<(), String> {
    if num_queues == 0 || num_queues > MAX_QUEUES {
        return Err(format!(
            "num_queues = {num_queues}: it must be 1 to {MAX_QUEUES}"
        ));
    }
    if !(16..=MAX_QUEUE_SIZE).contains(&queue_size) || !queue_size.is_power_of_two() {
        return Err(format!(
            "queue_size = {queue_size}: it must be a power of two from 16 to {MAX_QUEUE_SIZE}"
        ));
    }
    Ok(())
}

/// What the device holds while activated.
struct Active {
    mem: GuestMemoryMmap,
    interrupt: Arc<dyn VirtioInterrupt>,
    /// The queues the driver enabled, in order (Linux enables the first
    /// `min(num_queues, CPUs)`).
    queues: Vec<Queue>,
}

/// What the device has done since it was built: requests completed, by
/// kind, and the data bytes they moved.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BlockCounters {
    /// Reads (`VIRTIO_BLK_T_IN`) completed with OK.
    pub reads: u64,
    /// Bytes those reads moved to the guest.
    pub read_bytes: u64,
    /// Writes (`VIRTIO_BLK_T_OUT`) completed with OK.
    pub writes: u64,
    /// Bytes those writes moved to the disk.
    pub write_bytes: u64,
    /// Flushes completed with OK.
    pub flushes: u64,
    /// Other requests completed with OK (get-id, discard, write-zeroes).
    pub other: u64,
    /// Requests completed with an error status (malformed, unsupported,
    /// failed).
    pub errors: u64,
    /// Times the device interrupted the guest.
    pub interrupts: u64,
}

/// A virtio-blk device with its queues over a [`BlockBackend`], run
/// synchronously or through io_uring.
pub struct Block {
    backend: Box<dyn BlockBackend>,
    disk: String,
    read_only: bool,
    capacity: u64,
    id: [u8; ID_BYTES],
    avail_features: u64,
    config: [u8; CONFIG_SIZE],
    queue_max_sizes: Vec<u16>,
    active: Option<Active>,
    /// Firecracker's token buckets; unlimited until configured. `None`
    /// only if its timer could not be made (then no limit can be set).
    limiter: Option<RateLimiter>,
    /// The io_uring engine (`io=io_uring`); `None` runs requests
    /// synchronously.
    uring: Option<Uring>,
    logged: Logged,
    counters: BlockCounters,
    /// What a failed write (`werror`) or read (`rerror`) does.
    werror: ErrorPolicy,
    rerror: ErrorPolicy,
    /// Why the disk stopped (a failure under a stopping policy): its
    /// queues wait for [`Block::retry`].
    stopped: Option<String>,
    /// Failed io_uring requests kept for [`Block::retry`] (on `io=sync` the
    /// failed chain goes back to its ring instead).
    held: Vec<Held>,
    /// Told when the disk stops.
    stop_notify: Option<StopNotify>,
    /// [`Block::retry`] is running: a new stop is its answer, not news.
    retrying: bool,
}

impl fmt::Debug for Block {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Block")
            .field("disk", &self.disk)
            .field("read_only", &self.read_only)
            .field("capacity", &self.capacity)
            .field("activated", &self.active.is_some())
            .finish_non_exhaustive()
    }
}

impl Block {
    /// Opens the image `cfg.path` in its format (a [`crate::RawFile`] or a
    /// [`crate::Qcow2Disk`], locking it) and builds a device on it. An id longer than 20 bytes is an error.
    pub fn new(cfg: &BlockConfig) -> Result<Block> {
        if let Some(id) = &cfg.id {
            if id.len() > ID_BYTES {
                return Err(Error::IdTooLong {
                    path: cfg.path.clone(),
                    id: id.clone(),
                    len: id.len(),
                });
            }
        }
        check_queues(cfg.num_queues, cfg.queue_size).map_err(|why| Error::Queues {
            path: cfg.path.clone(),
            why,
        })?;
        let backend = open_backend(&cfg.path, cfg.format, cfg.read_only, cfg.cache)?;
        let mut block = Block::with_backend(backend, cfg.read_only, cfg.id.clone());
        block.disk = cfg.path.display().to_string();
        block.set_queues(cfg.num_queues, cfg.queue_size);
        block.set_error_policy(cfg.werror, cfg.rerror);
        if cfg.io == IoEngine::IoUring {
            block.use_io_uring().map_err(|source| Error::IoUring {
                path: cfg.path.clone(),
                source,
            })?;
        }
        Ok(block)
    }

    /// Runs reads, writes and flushes through io_uring from now on (before
    /// activation).
    pub fn use_io_uring(&mut self) -> std::io::Result<()> {
        let also = self.limiter.as_ref().map(AsRawFd::as_raw_fd);
        self.uring = Some(Uring::new(also)?);
        Ok(())
    }

    /// Requests handed to io_uring so far (0 on `io=sync`).
    pub fn io_uring_submitted(&self) -> u64 {
        self.uring.as_ref().map_or(0, Uring::submitted)
    }

    /// The engine requests run on.
    pub fn io_engine(&self) -> IoEngine {
        if self.uring.is_some() {
            IoEngine::IoUring
        } else {
            IoEngine::Sync
        }
    }

    /// Gives the device `num_queues` queues of `queue_size` entries
    /// (before the transport is built; [`check_queues`] says what is
    /// allowed, and values outside it are clamped).
    pub fn set_queues(&mut self, num_queues: u16, queue_size: u16) {
        let n = num_queues.clamp(1, MAX_QUEUES);
        let size = queue_size.clamp(16, MAX_QUEUE_SIZE);
        self.queue_max_sizes = vec![size; usize::from(n)];
        if n > 1 {
            self.avail_features |= 1 << VIRTIO_BLK_F_MQ;
        } else {
            self.avail_features &= !(1 << VIRTIO_BLK_F_MQ);
        }
        put_num_queues(&mut self.config, n);
    }

    /// Sets the rate limits (at start, or live: Firecracker's `PATCH
    /// /drives`): a bucket given replaces the one in use, a bucket with
    /// size or refill time 0 removes it, a bucket not given stays.
    pub fn update_rate_limit(&mut self, patch: &RateLimiterConfig) -> Result<()> {
        let limiter = self.limiter.as_mut().ok_or_else(|| Error::RateLimiter {
            disk: self.disk.clone(),
            why: "the limiter's timer could not be made".into(),
        })?;
        limiter.update_from_config(patch);
        Ok(())
    }

    /// The rate limits in force.
    pub fn rate_limit(&self) -> RateLimiterConfig {
        self.limiter
            .as_ref()
            .map(RateLimiter::config)
            .unwrap_or_default()
    }

    /// The rate limiter's counters (bytes and requests let through, times
    /// throttled).
    pub fn rate_limiter_counters(&self) -> Option<ember_rate_limiter::Counters> {
        self.limiter.as_ref().map(RateLimiter::counters)
    }

    /// The number of request queues the device offers.
    pub fn num_queues(&self) -> u16 {
        u16::try_from(self.queue_max_sizes.len()).unwrap_or(1)
    }

    /// Builds a device on any backend (tests, fuzzing, other formats). The
    /// capacity is the backend's size rounded down to whole sectors; an id
    /// longer than 20 bytes is cut to 20.
    pub fn with_backend(
        backend: Box<dyn BlockBackend>,
        read_only: bool,
        id: Option<String>,
    ) -> Block {
        let capacity = backend.size() / SECTOR_SIZE;
        let mut id_bytes = [0u8; ID_BYTES];
        if let Some(id) = &id {
            let n = id.len().min(ID_BYTES);
            id_bytes[..n].copy_from_slice(&id.as_bytes()[..n]);
        }
        let mut avail_features = (1u64 << VIRTIO_F_VERSION_1)
            | (1 << VIRTIO_RING_F_EVENT_IDX)
            | (1 << VIRTIO_BLK_F_SEG_MAX)
            | (1 << VIRTIO_BLK_F_BLK_SIZE)
            | (1 << VIRTIO_BLK_F_FLUSH);
        if read_only {
            avail_features |= 1 << VIRTIO_BLK_F_RO;
        } else {
            avail_features |= (1 << VIRTIO_BLK_F_DISCARD) | (1 << VIRTIO_BLK_F_WRITE_ZEROES);
        }
        Block {
            backend,
            disk: "(custom backend)".to_string(),
            read_only,
            capacity,
            id: id_bytes,
            avail_features,
            config: config_space(capacity),
            queue_max_sizes: vec![QUEUE_SIZE],
            active: None,
            uring: None,
            limiter: match RateLimiter::new(&RateLimiterConfig::default()) {
                Ok(l) => Some(l),
                Err(e) => {
                    warn!("virtio-blk: no rate limiter (its timer cannot be made: {e})");
                    None
                }
            },
            logged: Logged::default(),
            counters: BlockCounters::default(),
            werror: ErrorPolicy::Report,
            rerror: ErrorPolicy::Report,
            stopped: None,
            held: Vec::new(),
            stop_notify: None,
            retrying: false,
        }
    }

    /// What the device has done so far.
    pub fn counters(&self) -> BlockCounters {
        self.counters
    }

    /// Makes every completed write durable (fdatasync for a [`crate::RawFile`]);
    /// the VMM calls it before exiting.
    pub fn flush(&mut self) -> Result<()> {
        self.drain();
        self.backend.flush().map_err(|source| Error::Flush {
            disk: self.disk.clone(),
            source,
        })
    }

    /// Flushes the image and drops its lock: a live migration's
    /// destination takes it next. The device must not be used until
    /// [`Block::retake_lock`] (the migration failed) or it is dropped.
    pub fn release_lock(&mut self) -> Result<()> {
        self.flush()?;
        self.backend.unlock().map_err(|source| Error::Lock {
            path: self.disk.clone().into(),
            source,
        })
    }

    /// Takes the image's lock again after [`Block::release_lock`].
    pub fn retake_lock(&mut self) -> Result<()> {
        self.backend.relock().map_err(|source| Error::Lock {
            path: self.disk.clone().into(),
            source,
        })
    }

    /// Serves the disk from `backend` from now on (Firecracker's `PATCH
    /// /drives`): the old backend is flushed first, so no write the guest
    /// saw completed is lost, then replaced; the capacity and the
    /// configuration space follow the new backend's size. Returns whether
    /// the capacity changed (the transport then tells the driver). The
    /// device stays read-only or writable as it was negotiated.
    pub fn swap_backend(&mut self, backend: Box<dyn BlockBackend>, disk: String) -> Result<bool> {
        self.flush()?;
        let capacity = backend.size() / SECTOR_SIZE;
        let changed = capacity != self.capacity;
        self.backend = backend;
        self.disk = disk;
        self.capacity = capacity;
        self.config = config_space(capacity);
        let n = self.num_queues();
        put_num_queues(&mut self.config, n);
        Ok(changed)
    }

    /// The capacity in 512-byte sectors.
    pub fn capacity(&self) -> u64 {
        self.capacity
    }

    /// Whether the guest may only read the disk.
    pub fn read_only(&self) -> bool {
        self.read_only
    }
}

/// Lays out `struct virtio_blk_config` (little-endian, as virtio 1.x says).
fn config_space(capacity: u64) -> [u8; CONFIG_SIZE] {
    let mut c = [0u8; CONFIG_SIZE];
    let mut put = |at: usize, bytes: &[u8]| {
        if let Some(dst) = c.get_mut(at..at + bytes.len()) {
            dst.copy_from_slice(bytes);
        }
    };
    put(
        offset_of!(virtio_blk_config, capacity),
        &capacity.to_le_bytes(),
    );
    put(
        offset_of!(virtio_blk_config, seg_max),
        &SEG_MAX.to_le_bytes(),
    );
    put(
        offset_of!(virtio_blk_config, blk_size),
        &BLK_SIZE.to_le_bytes(),
    );
    put(
        offset_of!(virtio_blk_config, max_discard_sectors),
        &MAX_DISCARD_SECTORS.to_le_bytes(),
    );
    put(
        offset_of!(virtio_blk_config, max_discard_seg),
        &MAX_DISCARD_SEG.to_le_bytes(),
    );
    put(
        offset_of!(virtio_blk_config, discard_sector_alignment),
        &DISCARD_SECTOR_ALIGNMENT.to_le_bytes(),
    );
    put(
        offset_of!(virtio_blk_config, max_write_zeroes_sectors),
        &MAX_WRITE_ZEROES_SECTORS.to_le_bytes(),
    );
    put(
        offset_of!(virtio_blk_config, max_write_zeroes_seg),
        &MAX_WRITE_ZEROES_SEG.to_le_bytes(),
    );
    put(offset_of!(virtio_blk_config, write_zeroes_may_unmap), &[1]);
    c
}

/// Writes `num_queues` into a config space.
fn put_num_queues(config: &mut [u8; CONFIG_SIZE], n: u16) {
    let at = offset_of!(virtio_blk_config, num_queues);
    config[at..at + 2].copy_from_slice(&n.to_le_bytes());
}

/// A status constant as the byte the guest reads.
pub(crate) fn status_byte(status: u32) -> u8 {
    u8::try_from(status).unwrap_or(u8::MAX)
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_BLOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_max_sizes
    }

    fn avail_features(&self) -> u64 {
        self.avail_features
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            *b = u64::try_from(i)
                .ok()
                .and_then(|i| offset.checked_add(i))
                .and_then(|at| usize::try_from(at).ok())
                .and_then(|at| self.config.get(at))
                .copied()
                .unwrap_or(0);
        }
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        // Nothing in the block config space is writable without
        // VIRTIO_BLK_F_CONFIG_WCE, which is not offered.
        debug!(
            "virtio-blk {}: ignored {}-byte config write at {offset:#x}",
            self.disk,
            data.len()
        );
    }

    fn queue_states(&self) -> Vec<virtio_queue::QueueState> {
        // Nothing is in flight: `io=sync` completes requests within
        // process_queue, and the VMM drains the ring before it saves
        // (`Block::drain` at pause).
        self.active
            .as_ref()
            .map(|a| a.queues.iter().map(|q| q.state()).collect())
            .unwrap_or_default()
    }

    fn activate(&mut self, ctx: ActivateContext) -> std::result::Result<(), ActivateError> {
        let got = ctx.queues.len();
        if got == 0 || got > self.queue_max_sizes.len() {
            return Err(ActivateError::QueueCount {
                expected: self.queue_max_sizes.len(),
                got,
            });
        }
        let event_idx = ctx.acked_features & (1 << VIRTIO_RING_F_EVENT_IDX) != 0;
        let mut queues = ctx.queues;
        for q in &mut queues {
            q.set_event_idx(event_idx);
        }
        self.active = Some(Active {
            mem: ctx.mem,
            interrupt: ctx.interrupt,
            queues,
        });
        Ok(())
    }

    fn is_activated(&self) -> bool {
        self.active.is_some()
    }

    fn process_queue(&mut self, index: usize) {
        // A blocked limiter's timer runs the queues when it fires; a
        // stopped disk waits for `retry`.
        if self.stopped.is_some() || self.limiter.as_ref().is_some_and(RateLimiter::is_blocked) {
            return;
        }
        let Some(active) = self.active.as_mut() else {
            return;
        };
        let Some(queue) = active.queues.get_mut(index) else {
            return;
        };
        let mut stop = None;
        let mut exec = executor!(self, &active.mem, &mut stop);
        let mut used_any = false;
        let mem = &active.mem;
        // The used ring as one slice for the pass: each completion is one
        // write and one index store, without looking guest memory up.
        let mut used = UsedRing::new(queue, mem);
        let limiter = &mut self.limiter;
        let uring = &mut self.uring;
        let qi = u16::try_from(index).unwrap_or(u16::MAX);
        let drained = drain_while(queue, mem, |queue, chain| {
            // A full ring: the next completion runs the queues again.
            if uring.as_ref().is_some_and(Uring::is_full) {
                return Flow::PutBack;
            }
            let head = chain.head_index();
            let parsed = exec.parse(chain.clone());
            if let (Ok(req), Some(limiter)) = (&parsed, limiter.as_mut()) {
                if !admit(limiter, req) {
                    return Flow::PutBack;
                }
            }
            if let (Some(u), Ok(req)) = (uring.as_mut(), &parsed) {
                if exec.submit_to_ring(u, qi, head, req) {
                    return Flow::Continue;
                }
                // Run here: only after everything submitted before it.
                if let Err(e) = u.wait_all(mem) {
                    warn!(
                        "virtio-blk {}: waiting for io_uring requests: {e}",
                        exec.disk
                    );
                }
            }
            // Failed under a stopping policy: back to the ring, run again
            // by `retry`.
            let Some(len) = exec.complete_parsed(chain, parsed) else {
                return Flow::PutBack;
            };
            let added = match &mut used {
                Some(used) => used
                    .add(queue, head, len)
                    .map(|()| used.publish(queue))
                    .map_err(|e| e.to_string()),
                None => queue.add_used(mem, head, len).map_err(|e| e.to_string()),
            };
            match added {
                Ok(()) => used_any = true,
                Err(e) => {
                    if first(&mut exec.logged.used_ring) {
                        warn!(
                            "virtio-blk {}: cannot complete chain {head}: {e}",
                            exec.disk
                        );
                    }
                }
            }
            Flow::Continue
        });
        if let Err(e) = drained {
            if first(&mut exec.logged.used_ring) {
                warn!(
                    "virtio-blk {}: cannot update the ring's notification fields: {e}",
                    exec.disk
                );
            }
        }
        let wants = used_any
            && match &mut used {
                Some(used) => used.needs_notification(queue),
                None => queue.needs_notification(mem).unwrap_or(true),
            };
        if wants {
            exec.counters.interrupts = exec.counters.interrupts.saturating_add(1);
            // `index` < the queue count, at most MAX_QUEUES.
            let q = u16::try_from(index).unwrap_or(u16::MAX);
            if let Err(e) = active.interrupt.trigger(InterruptKind::Queue(q)) {
                if first(&mut exec.logged.interrupt) {
                    warn!("virtio-blk {}: cannot interrupt the guest: {e}", exec.disk);
                }
            }
        }
        drop(exec);
        if let Some(u) = self.uring.as_mut() {
            u.flush(&active.mem);
        }
        self.publish_completions();
        if let (Some(why), None) = (stop, &self.stopped) {
            self.stopped = Some(why);
            self.note_stop();
        }
    }

    fn reset(&mut self) {
        // The kernel may still write into guest buffers: wait for it; the
        // driver is gone, so the completions go nowhere.
        if let (Some(u), Some(a)) = (self.uring.as_mut(), self.active.as_ref()) {
            if let Err(e) = u.wait_all(&a.mem) {
                warn!(
                    "virtio-blk {}: waiting for io_uring requests: {e}",
                    self.disk
                );
            }
            drop(u.take_done());
        }
        self.active = None;
        self.stopped = None;
        self.held.clear();
    }

    fn backend_fd(&self) -> Option<std::os::fd::RawFd> {
        match &self.uring {
            Some(u) => Some(u.fd()),
            None => self.limiter.as_ref().map(AsRawFd::as_raw_fd),
        }
    }

    fn process_backend(&mut self) -> BackendInterest {
        // The limiter's timer: tokens are back, run every queue again.
        if let Some(l) = self.limiter.as_mut() {
            if let Err(e) = l.event_handler() {
                debug!("virtio-blk {}: rate limiter: {e}", self.disk);
            }
        }
        // Completions: on the used rings first, then the queues go on (a
        // full ring stopped them).
        if let (Some(u), Some(a)) = (self.uring.as_mut(), self.active.as_ref()) {
            u.reap(&a.mem);
        }
        self.publish_completions();
        let queues = self.active.as_ref().map_or(0, |a| a.queues.len());
        for i in 0..queues {
            self.process_queue(i);
        }
        BackendInterest::Keep
    }
}

/// Takes a request's tokens from the limiter: one op, and its data bytes
/// for a read or a write. False (and nothing taken) when it must wait.
fn admit(limiter: &mut RateLimiter, req: &Request) -> bool {
    if !limiter.consume(1, TokenType::Ops) {
        return false;
    }
    let bytes = match req.kind() {
        RequestKind::In { .. } | RequestKind::Out { .. } => req.data_len(),
        _ => 0,
    };
    if bytes > 0 && !limiter.consume(bytes, TokenType::Bytes) {
        limiter.manual_replenish(1, TokenType::Ops);
        return false;
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::backend::RawFile;
    use crate::test_utils::{
        desc, guest_memory, header, CountingInterrupt, MemBackend, TestQueue, XorShift, DATA, HDR,
        INDIRECT, NEXT, R, STATUS, W,
    };
    use std::os::unix::fs::{FileExt, MetadataExt};
    use std::sync::atomic::Ordering;
    use virtio_bindings::virtio_blk::{
        VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_DISCARD,
        VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
        VIRTIO_BLK_T_WRITE_ZEROES,
    };
    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};
    use vmm_sys_util::tempfile::TempFile;

    const OK: u32 = VIRTIO_BLK_S_OK;
    const IOERR: u32 = VIRTIO_BLK_S_IOERR;
    const UNSUPP: u32 = VIRTIO_BLK_S_UNSUPP;

    /// A 1 MiB image whose sector `n` is filled with byte `n % 251`.
    fn image() -> TempFile {
        let f = TempFile::new().unwrap();
        let bytes = sector_pattern(0, 1 << 20);
        f.as_file().write_all_at(&bytes, 0).unwrap();
        f
    }

    fn file_block(img: &TempFile, read_only: bool) -> Block {
        Block::new(&BlockConfig {
            id: Some("ember-disk-0".to_string()),
            ..BlockConfig::new(img.as_path(), ImageFormat::Raw, read_only)
        })
        .unwrap()
    }

    fn activate(block: &mut Block, mem: &GuestMemoryMmap, q: &TestQueue) -> Arc<CountingInterrupt> {
        // Tests drive the queue as a driver without EVENT_IDX
        // (block_event_idx_* test it with).
        let acked = block.avail_features() & !(1 << VIRTIO_RING_F_EVENT_IDX);
        activate_with(block, mem, q, acked)
    }

    fn activate_with(
        block: &mut Block,
        mem: &GuestMemoryMmap,
        q: &TestQueue,
        acked_features: u64,
    ) -> Arc<CountingInterrupt> {
        let irq = Arc::new(CountingInterrupt::default());
        block
            .activate(ActivateContext {
                mem: mem.clone(),
                interrupt: irq.clone(),
                queues: vec![q.queue()],
                acked_features,
            })
            .unwrap();
        irq
    }

    fn status(mem: &GuestMemoryMmap, addr: u64) -> u32 {
        u32::from(mem.read_obj::<u8>(GuestAddress(addr)).unwrap())
    }

    fn guest_bytes(mem: &GuestMemoryMmap, addr: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0; len];
        mem.read_slice(&mut v, GuestAddress(addr)).unwrap();
        v
    }

    fn file_bytes(img: &TempFile, offset: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0; len];
        img.as_file().read_exact_at(&mut v, offset).unwrap();
        v
    }

    fn sector_pattern(sector: u64, len: usize) -> Vec<u8> {
        (0..len)
            .map(|i| u8::try_from((sector + i as u64 / 512) % 251).unwrap())
            .collect()
    }

    fn segment(mem: &GuestMemoryMmap, addr: u64, sector: u64, num: u32, flags: u32) {
        let mut seg = [0u8; 16];
        seg[..8].copy_from_slice(&sector.to_le_bytes());
        seg[8..12].copy_from_slice(&num.to_le_bytes());
        seg[12..].copy_from_slice(&flags.to_le_bytes());
        mem.write_slice(&seg, GuestAddress(addr)).unwrap();
    }

    #[test]
    fn block_features_depend_on_read_only() {
        let img = image();
        let rw = file_block(&img, false);
        let f = rw.avail_features();
        for bit in [
            VIRTIO_F_VERSION_1,
            VIRTIO_BLK_F_SEG_MAX,
            VIRTIO_BLK_F_BLK_SIZE,
            VIRTIO_BLK_F_FLUSH,
            VIRTIO_BLK_F_DISCARD,
            VIRTIO_BLK_F_WRITE_ZEROES,
        ] {
            assert_ne!(f & (1 << bit), 0, "bit {bit}");
        }
        assert_eq!(f & (1 << VIRTIO_BLK_F_RO), 0);
        drop(rw);
        let ro = file_block(&img, true);
        let f = ro.avail_features();
        assert_ne!(f & (1 << VIRTIO_BLK_F_RO), 0);
        assert_eq!(f & (1 << VIRTIO_BLK_F_DISCARD), 0);
        assert_eq!(f & (1 << VIRTIO_BLK_F_WRITE_ZEROES), 0);
        assert_eq!(ro.device_type(), VIRTIO_ID_BLOCK);
        assert_eq!(ro.queue_max_sizes(), &[256]);
    }

    #[test]
    fn block_config_space_reads_fields_and_zero_beyond() {
        let img = image();
        let mut block = file_block(&img, false);
        let mut c = [0xffu8; CONFIG_SIZE + 8];
        block.read_config(0, &mut c);
        let u32_at = |o: usize| u32::from_le_bytes(c[o..o + 4].try_into().unwrap());
        assert_eq!(u64::from_le_bytes(c[..8].try_into().unwrap()), 2048);
        assert_eq!(u32_at(offset_of!(virtio_blk_config, seg_max)), 254);
        assert_eq!(u32_at(offset_of!(virtio_blk_config, blk_size)), 512);
        assert_eq!(
            u32_at(offset_of!(virtio_blk_config, max_discard_sectors)),
            MAX_DISCARD_SECTORS
        );
        assert_eq!(u32_at(offset_of!(virtio_blk_config, max_discard_seg)), 1);
        assert_eq!(
            u32_at(offset_of!(virtio_blk_config, discard_sector_alignment)),
            1
        );
        assert_eq!(
            u32_at(offset_of!(virtio_blk_config, max_write_zeroes_sectors)),
            MAX_WRITE_ZEROES_SECTORS
        );
        assert_eq!(
            u32_at(offset_of!(virtio_blk_config, max_write_zeroes_seg)),
            1
        );
        assert_eq!(c[offset_of!(virtio_blk_config, write_zeroes_may_unmap)], 1);
        assert!(c[CONFIG_SIZE..].iter().all(|b| *b == 0));
        // Unaligned and partial reads.
        let mut b = [0u8; 2];
        block.read_config(1, &mut b);
        assert_eq!(b, [8, 0]);
        let mut b = [0xffu8; 4];
        block.read_config(u64::MAX - 1, &mut b);
        assert_eq!(b, [0; 4]);
        // Writes are ignored.
        block.write_config(0, &[1, 2, 3, 4]);
        let mut b = [0u8; 8];
        block.read_config(0, &mut b);
        assert_eq!(u64::from_le_bytes(b), 2048);
    }

    #[test]
    fn block_new_rejects_long_id() {
        let img = image();
        let err = Block::new(&BlockConfig {
            id: Some("x".repeat(21)),
            ..BlockConfig::new(img.as_path(), ImageFormat::Raw, false)
        })
        .unwrap_err();
        assert!(matches!(err, Error::IdTooLong { len: 21, .. }));
        assert!(err
            .to_string()
            .contains(&img.as_path().display().to_string()));
    }

    #[test]
    fn block_activate_needs_one_to_num_queues_queues() {
        let mem = guest_memory();
        let q = TestQueue::new(&mem, 16);
        let (backend, _) = MemBackend::new(4096);
        let mut block = Block::with_backend(Box::new(backend), false, None);
        for queues in [vec![], vec![q.queue(), q.queue()]] {
            let got = queues.len();
            let err = block
                .activate(ActivateContext {
                    mem: mem.clone(),
                    interrupt: Arc::new(CountingInterrupt::default()),
                    queues,
                    acked_features: 0,
                })
                .unwrap_err();
            assert!(matches!(err, ActivateError::QueueCount { expected: 1, got: g } if g == got));
            assert!(!block.is_activated());
        }
    }

    #[test]
    fn block_multiqueue_offers_num_queues_and_serves_each_queue_on_its_vector() {
        let img = image();
        let mut block = Block::new(&BlockConfig {
            num_queues: 2,
            queue_size: 64,
            ..BlockConfig::new(img.as_path(), ImageFormat::Raw, false)
        })
        .unwrap();
        assert_eq!(block.queue_max_sizes(), &[64, 64]);
        assert_ne!(block.avail_features() & (1 << VIRTIO_BLK_F_MQ), 0);
        let mut n = [0u8; 2];
        block.read_config(offset_of!(virtio_blk_config, num_queues) as u64, &mut n);
        assert_eq!(u16::from_le_bytes(n), 2);
        assert_eq!(block.state().num_queues, 2);
        let mem = guest_memory();
        let mut q0 = TestQueue::new(&mem, 16);
        let mut q1 = TestQueue::at(&mem, 16, 0x1000);
        header(&mem, HDR, VIRTIO_BLK_T_OUT, 8);
        mem.write_slice(&[0x11; 512], GuestAddress(DATA)).unwrap();
        q0.add(&[desc(HDR, 16, R), desc(DATA, 512, R), desc(STATUS, 1, W)]);
        header(&mem, HDR + 16, VIRTIO_BLK_T_OUT, 9);
        mem.write_slice(&[0x22; 512], GuestAddress(DATA + 4096))
            .unwrap();
        q1.add(&[
            desc(HDR + 16, 16, R),
            desc(DATA + 4096, 512, R),
            desc(STATUS + 1, 1, W),
        ]);
        let irq = Arc::new(CountingInterrupt::default());
        let acked = block.avail_features() & !(1 << VIRTIO_RING_F_EVENT_IDX);
        block
            .activate(ActivateContext {
                mem: mem.clone(),
                interrupt: irq.clone(),
                queues: vec![q0.queue(), q1.queue()],
                acked_features: acked,
            })
            .unwrap();
        block.process_queue(1);
        assert_eq!(q1.used(), vec![(0, 1)]);
        assert_eq!(q0.used(), vec![], "queue 0 untouched until notified");
        block.process_queue(0);
        assert_eq!(q0.used(), vec![(0, 1)]);
        assert_eq!(
            irq.kinds(),
            vec![InterruptKind::Queue(1), InterruptKind::Queue(0)]
        );
        assert_eq!(file_bytes(&img, 8 * 512, 512), vec![0x11; 512]);
        assert_eq!(file_bytes(&img, 9 * 512, 512), vec![0x22; 512]);
        // A queue the driver did not enable is ignored, not a panic.
        block.process_queue(7);
        assert_eq!(block.queue_states().len(), 2);
    }

    #[test]
    fn block_queue_count_and_size_are_checked() {
        let img = image();
        for (n, size, what) in [
            (0, 256, "num_queues = 0"),
            (65, 256, "num_queues = 65"),
            (1, 100, "queue_size = 100"),
            (1, 2048, "queue_size = 2048"),
        ] {
            let err = Block::new(&BlockConfig {
                num_queues: n,
                queue_size: size,
                ..BlockConfig::new(img.as_path(), ImageFormat::Raw, false)
            })
            .unwrap_err();
            assert!(err.to_string().contains(what), "{err}");
        }
    }

    #[test]
    fn block_state_with_another_queue_count_is_refused() {
        let img = image();
        let block = file_block(&img, false);
        let mut state = block.state();
        state.num_queues = 4;
        assert!(block.check_state(&state).is_err());
        // Files from before multiqueue say nothing: one queue.
        let old: crate::BlockState =
            serde_json::from_str(r#"{"capacity": 2048, "read_only": false}"#).unwrap();
        assert_eq!(old.num_queues, 1);
        block.check_state(&old).unwrap();
    }

    #[test]
    #[allow(unsafe_code)]
    fn block_rate_limit_holds_requests_back_until_its_timer_fires() {
        let img = image();
        let mut block = file_block(&img, false);
        // 2 requests at once, then one every 100 ms.
        block
            .update_rate_limit(&"ops=2/200ms".parse().unwrap())
            .unwrap();
        let mem = guest_memory();
        let mut q = TestQueue::new(&mem, 16);
        for i in 0..3u64 {
            header(&mem, HDR + 16 * i, VIRTIO_BLK_T_IN, i);
            q.add(&[
                desc(HDR + 16 * i, 16, R),
                desc(DATA + 4096 * i, 512, W),
                desc(STATUS + i, 1, W),
            ]);
        }
        activate(&mut block, &mem, &q);
        block.process_queue(0);
        assert_eq!(q.used().len(), 2, "the third request waits");
        // A notification while blocked does nothing.
        block.process_queue(0);
        assert_eq!(q.used().len(), 2);
        let fd = block.backend_fd().expect("the limiter's timer");
        let mut pfd = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        let start = std::time::Instant::now();
        // SAFETY: one pollfd on a timerfd the device owns, for at most 2 s.
        let n = unsafe { libc::poll(&mut pfd, 1, 2000) };
        assert_eq!(n, 1, "the timer fires");
        let waited = start.elapsed();
        assert!(waited >= std::time::Duration::from_millis(50), "{waited:?}");
        assert_eq!(block.process_backend(), BackendInterest::Keep);
        assert_eq!(q.used().len(), 3, "the third request ran");
        assert_eq!(status(&mem, STATUS + 2), OK);
        assert_eq!(guest_bytes(&mem, DATA + 8192, 512), sector_pattern(2, 512));
        let c = block.rate_limiter_counters().unwrap();
        assert_eq!(c.ops, 3);
        // Removing the limit (size 0) lets everything through.
        block
            .update_rate_limit(
                &serde_json::from_str(r#"{"ops": {"size": 0, "refill_time": 0}}"#).unwrap(),
            )
            .unwrap();
        assert!(block.rate_limit().is_unlimited());
    }

    #[test]
    fn block_in_reads_file_into_guest() {
        let img = image();
        let mut block = file_block(&img, false);
        let mem = guest_memory();
        let mut q = TestQueue::new(&mem, 16);
        header(&mem, HDR, VIRTIO_BLK_T_IN, 10);
        q.add(&[desc(HDR, 16, R), desc(DATA, 2048, W), desc(STATUS, 1, W)]);
        let irq = activate(&mut block, &mem, &q);
        block.process_queue(0);
        assert_eq!(status(&mem, STATUS), OK);
        assert_eq!(guest_bytes(&mem, DATA, 2048), sector_pattern(10, 2048));
        assert_eq!(q.used(), vec![(0, 2049)]);
        assert_eq!(irq.count(), 1);
    }

    #[test]
    fn block_swap_backend_flushes_old_and_serves_new_with_its_capacity() {
        let img = image();
        let mut block = file_block(&img, false);
        let mem = guest_memory();
        let mut q = TestQueue::new(&mem, 16);
        // A write to the old image, then the swap.
        header(&mem, HDR, VIRTIO_BLK_T_OUT, 1);
        mem.write_slice(&[0x5a; 512], GuestAddress(DATA)).unwrap();
        q.add(&[desc(HDR, 16, R), desc(DATA, 512, R), desc(STATUS, 1, W)]);
        activate(&mut block, &mem, &q);
        block.process_queue(0);
        assert_eq!(status(&mem, STATUS), OK);
        let new = TempFile::new().unwrap();
        new.as_file().write_all_at(&[0xab; 4096], 0).unwrap();
        new.as_file().set_len(2 << 20).unwrap();
        let backend = RawFile::open(new.as_path(), false).unwrap();
        let changed = block
            .swap_backend(Box::new(backend), new.as_path().display().to_string())
            .unwrap();
        assert!(changed);
        assert_eq!(block.capacity(), 4096);
        let mut c = [0u8; 8];
        block.read_config(0, &mut c);
        assert_eq!(u64::from_le_bytes(c), 4096);
        assert_eq!(
            file_bytes(&img, 512, 512),
            vec![0x5a; 512],
            "old image kept the write"
        );
        // A read now comes from the new image, also past the old end.
        header(&mem, HDR, VIRTIO_BLK_T_IN, 0);
        q.add(&[desc(HDR, 16, R), desc(DATA, 1024, W), desc(STATUS, 1, W)]);
        block.process_queue(0);
        assert_eq!(status(&mem, STATUS), OK);
        assert_eq!(guest_bytes(&mem, DATA, 1024)[..1024], [0xab; 1024]);
        header(&mem, HDR, VIRTIO_BLK_T_IN, 3000);
        q.add(&[desc(HDR, 16, R), desc(DATA, 512, W), desc(STATUS, 1, W)]);
        block.process_queue(0);
        assert_eq!(status(&mem, STATUS), OK);
    }

    #[test]
    fn block_out_writes_guest_data_to_file() {
        let img = image();
        let mut block = file_block(&img, false);
        let mem = guest_memory();
        let mut q = TestQueue::new(&mem, 16);
        header(&mem, HDR, VIRTIO_BLK_T_OUT, 3);
        mem.write_slice(&[0xc3; 1024], GuestAddress(DATA)).unwrap();
        q.add(&[desc(HDR, 16, R), desc(DATA, 1024, R), desc(STATUS, 1, W)]);
        activate(&mut block, &mem, &q);
        block.process_queue(0);
        assert_eq!(status(&mem, STATUS), OK);
        assert_eq!(q.used(), vec![(0, 1)]);
        assert_eq!(file_bytes(&img, 3 * 512, 1024), vec![0xc3; 1024]);
        assert_eq!(file_bytes(&img, 2 * 512, 512), sector_pattern(2, 512));
        assert_eq!(file_bytes(&img, 5 * 512, 512), sector_pattern(5, 512));
    }

    #[test]
    fn block_flush_syncs_backend_before_completing() {
        let (backend, state) = MemBackend::new(1 << 16);
        let mut block = Block::with_backend(Box::new(backend), false, None);
        let mem = guest_memory();
        let mut q = TestQueue::new(&mem, 16);
        header(&mem, HDR, VIRTIO_BLK_T_FLUSH, 0);
        q.add(&[desc(HDR, 16, R), desc(STATUS, 1, W)]);
        activate(&mut block, &mem, &q);
        block.process_queue(0);
        assert_eq!(status(&mem, STATUS), OK);
        assert_eq!(q.used(), vec![(0, 1)]);
        assert_eq!(state.flushes.load(Ordering::SeqCst), 1);
        // And the VMM's flush at exit.
        block.flush().unwrap();
        assert_eq!(state.flushes.load(Ordering::SeqCst), 2);
    }

    #[test]
    fn block_flush_on_raw_file_completes_ok() {
        let img = image();
        let mut block = file_block(&img, false);
        let mem = guest_memory();
        let mut q = TestQueue::new(&mem, 16);
        header(&mem, HDR, VIRTIO_BLK_T_FLUSH, 0);
        q.add(&[desc(HDR, 16, R), desc(STATUS, 1, W)]);
        activate(&mut block, &mem, &q);
        block.process_queue(0);
        assert_eq!(status(&mem, STATUS), OK);
        block.flush().unwrap();
    }

    #[test]
    fn block_get_id_writes_padded_id() {
        let img = image();
        let mut block = file_block(&img, true);
        let mem = guest_memory();
        let mut q = TestQueue::new(&mem, 16);
        mem.write_slice(&[0xee; 0x300], GuestAddress(DATA)).unwrap();
        header(&mem, HDR, VIRTIO_BLK_T_GET_ID, 0);
        q.add(&[desc(HDR, 16, R), desc(DATA, 20, W), desc(STATUS, 1, W)]);
        // A short buffer gets the first bytes; a long one only 20.
        q.add(&[
            desc(HDR, 16, R),
            desc(DATA + 0x100, 5, W),
            desc(STATUS + 1, 1, W),
        ]);
        q.add(&[
            desc(HDR, 16, R),
            desc(DATA + 0x200, 64, W),
            desc(STATUS + 2, 1, W),
        ]);
        activate(&mut block, &mem, &q);
        block.process_queue(0);
        let mut want = b"ember-disk-0".to_vec();
        want.resize(20, 0);
        assert_eq!(guest_bytes(&mem, DATA, 20), want);
        assert_eq!(guest_bytes(&mem, DATA + 0x100, 5), b"ember");
        assert_eq!(guest_bytes(&mem, DATA + 0x200, 20), want);
        assert_eq!(guest_bytes(&mem, DATA + 0x200 + 20, 44), vec![0xee; 44]);
        assert_eq!([status(&mem, STATUS), status(&mem, STATUS + 1)], [OK, OK]);
        assert_eq!(status(&mem, STATUS + 2), OK);
        assert_eq!(q.used(), vec![(0, 21), (3, 6), (6, 21)]);
    }

    #[test]
    fn block_discard_frees_blocks_and_reads_zero() {
        let img = image();
        img.as_file().sync_all().unwrap();
        let before = img.as_file().metadata().unwrap().blocks();
        let mut block = file_block(&img, false);
        let mem = guest_memory();
        let mut q = TestQueue::new(&mem, 16);
        header(&mem, HDR, VIRTIO_BLK_T_DISCARD, 0);
        segment(&mem, DATA, 256, 1024, 0);
        q.add(&[desc(HDR, 16, R), desc(DATA, 16, R), desc(STATUS, 1, W)]);
        activate(&mut block, &mem, &q);
        block.process_queue(0);
        assert_eq!(status(&mem, STATUS), OK);
        assert_eq!(q.used(), vec![(0, 1)]);
        let after = img.as_file().metadata().unwrap().blocks();
        assert!(after < before, "st_blocks {before} -> {after}");
        assert_eq!(file_bytes(&img, 256 * 512, 1024 * 512), vec![0; 1024 * 512]);
        assert_eq!(file_bytes(&img, 255 * 512, 512), sector_pattern(255, 512));
        assert_eq!(file_bytes(&img, 1280 * 512, 512), sector_pattern(1280, 512));
        assert_eq!(img.as_file().metadata().unwrap().len(), 1 << 20);
    }

    #[test]
    fn block_write_zeroes_zeroes_range() {
        let img = image();
        let mut block = file_block(&img, false);
        let mem = guest_memory();
        let mut q = TestQueue::new(&mem, 16);
        header(&mem, HDR, VIRTIO_BLK_T_WRITE_ZEROES, 0);
        segment(&mem, DATA, 7, 3, 0);
        q.add(&[desc(HDR, 16, R), desc(DATA, 16, R), desc(STATUS, 1, W)]);
        activate(&mut block, &mem, &q);
        block.process_queue(0);
        assert_eq!(status(&mem, STATUS), OK);
        assert_eq!(file_bytes(&img, 7 * 512, 3 * 512), vec![0; 3 * 512]);
        assert_eq!(file_bytes(&img, 6 * 512, 512), sector_pattern(6, 512));
        assert_eq!(file_bytes(&img, 10 * 512, 512), sector_pattern(10, 512));
    }

    /// Cloud Hypervisor #8401: a chain of the header alone must complete
    /// (used length 0, nothing to write a status into) and not wedge the
    /// queue.
    #[test]
    fn block_header_only_chain_completes_and_next_request_works() {
        let img = image();
        let mut block = file_block(&img, false);
        let mem = guest_memory();
        let mut q = TestQueue::new(&mem, 16);
        header(&mem, HDR, VIRTIO_BLK_T_IN, 0);
        header(&mem, HDR + 0x100, VIRTIO_BLK_T_IN, 1);
        q.add(&[desc(HDR, 16, R)]);
        let irq = activate(&mut block, &mem, &q);
        block.process_queue(0);
        assert_eq!(q.used(), vec![(0, 0)]);
        assert_eq!(irq.count(), 1);

        q.add(&[
            desc(HDR + 0x100, 16, R),
            desc(DATA, 512, W),
            desc(STATUS, 1, W),
        ]);
        block.process_queue(0);
        assert_eq!(q.used(), vec![(0, 0), (1, 513)]);
        assert_eq!(status(&mem, STATUS), OK);
        assert_eq!(guest_bytes(&mem, DATA, 512), sector_pattern(1, 512));
        assert_eq!(irq.count(), 2);
    }

    /// Cloud Hypervisor #7803: every data descriptor of a request is used,
    /// in order.
    #[test]
    fn block_request_over_three_data_descriptors_uses_all_three() {
        let img = image();
        let mut block = file_block(&img, false);
        let mem = guest_memory();
        let mut q = TestQueue::new(&mem, 16);
        // Read sectors 20..24 into three out-of-order buffers.
        header(&mem, HDR, VIRTIO_BLK_T_IN, 20);
        let bufs = [(DATA + 0x4000, 512u32), (DATA, 1024), (DATA + 0x8000, 512)];
        let mut chain = vec![desc(HDR, 16, R)];
        chain.extend(bufs.iter().map(|(a, l)| desc(*a, *l, W)));
        chain.push(desc(STATUS, 1, W));
        q.add(&chain);
        let irq = activate(&mut block, &mem, &q);
        block.process_queue(0);
        assert_eq!(status(&mem, STATUS), OK);
        assert_eq!(
            guest_bytes(&mem, DATA + 0x4000, 512),
            sector_pattern(20, 512)
        );
        assert_eq!(guest_bytes(&mem, DATA, 1024), sector_pattern(21, 1024));
        assert_eq!(
            guest_bytes(&mem, DATA + 0x8000, 512),
            sector_pattern(23, 512)
        );
        assert_eq!(q.used(), vec![(0, 2049)]);

        // Write them back to sectors 100..104 and compare.
        header(&mem, HDR + 0x100, VIRTIO_BLK_T_OUT, 100);
        let mut chain = vec![desc(HDR + 0x100, 16, R)];
        chain.extend(bufs.iter().map(|(a, l)| desc(*a, *l, R)));
        chain.push(desc(STATUS + 1, 1, W));
        q.add(&chain);
        block.process_queue(0);
        assert_eq!(status(&mem, STATUS + 1), OK);
        assert_eq!(file_bytes(&img, 100 * 512, 2048), sector_pattern(20, 2048));
        assert_eq!(file_bytes(&img, 104 * 512, 512), sector_pattern(104, 512));
        assert_eq!(irq.count(), 2);
    }

    #[test]
    fn block_large_transfer_moves_bounded_chunks() {
        let (backend, state) = MemBackend::new(4 << 20);
        {
            let mut data = state.data.lock().unwrap();
            for (i, b) in data.iter_mut().enumerate() {
                *b = u8::try_from(i % 253).unwrap();
            }
        }
        let mut block = Block::with_backend(Box::new(backend), false, None);
        let mem = guest_memory();
        let mut q = TestQueue::new(&mem, 16);
        // 2700 KiB from sector 1 into three 900 KiB buffers, out of address
        // order: three backend calls (1 MiB, 1 MiB, the rest).
        header(&mem, HDR, VIRTIO_BLK_T_IN, 1);
        let len = 900 << 10;
        let bufs = [DATA + 0x1c_4000, DATA, DATA + 0xe_1000];
        q.add(&[
            desc(HDR, 16, R),
            desc(bufs[0], len, W),
            desc(bufs[1], len, W),
            desc(bufs[2], len, W),
            desc(STATUS, 1, W),
        ]);
        activate(&mut block, &mem, &q);
        block.process_queue(0);
        assert_eq!(status(&mem, STATUS), OK);
        let expect: Vec<u8> = (512..512 + 3 * len as usize)
            .map(|i| u8::try_from(i % 253).unwrap())
            .collect();
        let l = len as usize;
        for (i, b) in bufs.iter().enumerate() {
            assert_eq!(
                guest_bytes(&mem, *b, l),
                expect[i * l..(i + 1) * l],
                "buffer {i}"
            );
        }
        assert_eq!(state.largest_io.load(Ordering::SeqCst), IO_CHUNK);
        assert_eq!(state.ops.load(Ordering::SeqCst), 3);
    }

    #[test]
    fn block_counters_count_completed_requests_by_kind() {
        let img = image();
        let mut block = file_block(&img, false);
        let mem = guest_memory();
        let mut q = TestQueue::new(&mem, 16);
        header(&mem, HDR, VIRTIO_BLK_T_IN, 0);
        header(&mem, HDR + 0x10, VIRTIO_BLK_T_OUT, 8);
        header(&mem, HDR + 0x20, VIRTIO_BLK_T_FLUSH, 0);
        // Past the end of the 1 MiB disk: an error.
        header(&mem, HDR + 0x30, VIRTIO_BLK_T_IN, 4096);
        q.add(&[desc(HDR, 16, R), desc(DATA, 1024, W), desc(STATUS, 1, W)]);
        q.add(&[
            desc(HDR + 0x10, 16, R),
            desc(DATA, 512, R),
            desc(STATUS + 1, 1, W),
        ]);
        q.add(&[desc(HDR + 0x20, 16, R), desc(STATUS + 2, 1, W)]);
        q.add(&[
            desc(HDR + 0x30, 16, R),
            desc(DATA, 512, W),
            desc(STATUS + 3, 1, W),
        ]);
        activate(&mut block, &mem, &q);
        block.process_queue(0);
        assert_eq!(
            block.counters(),
            BlockCounters {
                reads: 1,
                read_bytes: 1024,
                writes: 1,
                write_bytes: 512,
                flushes: 1,
                other: 0,
                errors: 1,
                interrupts: 1,
            }
        );
    }

    #[test]
    fn block_raw_file_reads_and_writes_buffers_across_a_memory_region_boundary() {
        // Two guest memory regions that touch: a buffer may run from one
        // into the other, and the file backend's preadv/pwritev must split
        // it into one iovec per region.
        let img = image();
        let mut block = file_block(&img, false);
        let mem = GuestMemoryMmap::from_ranges(&[
            (GuestAddress(0), 0x20_0000),
            (GuestAddress(0x20_0000), 0x20_0000),
        ])
        .unwrap();
        assert_eq!(mem.num_regions(), 2);
        let mut q = TestQueue::new(&mem, 16);
        let across = 0x20_0000 - 0x300;
        header(&mem, HDR, VIRTIO_BLK_T_OUT, 4);
        let data: Vec<u8> = (0..0x1200u32)
            .map(|i| u8::try_from(i * 7 % 256).unwrap())
            .collect();
        mem.write_slice(&data[..0x200], GuestAddress(DATA)).unwrap();
        mem.write_slice(&data[0x200..], GuestAddress(across))
            .unwrap();
        q.add(&[
            desc(HDR, 16, R),
            desc(DATA, 0x200, R),
            desc(across, 0x1000, R),
            desc(STATUS, 1, W),
        ]);
        activate(&mut block, &mem, &q);
        block.process_queue(0);
        assert_eq!(status(&mem, STATUS), OK);
        assert_eq!(file_bytes(&img, 4 * 512, 0x1200), data);

        // And back, into different buffers on both sides of the boundary.
        header(&mem, HDR + 0x100, VIRTIO_BLK_T_IN, 4);
        let back = 0x20_0000 - 0x800;
        q.add(&[
            desc(HDR + 0x100, 16, R),
            desc(back, 0x1000, W),
            desc(DATA + 0x4000, 0x200, W),
            desc(STATUS + 1, 1, W),
        ]);
        block.process_queue(0);
        assert_eq!(status(&mem, STATUS + 1), OK);
        assert_eq!(guest_bytes(&mem, back, 0x1000), data[..0x1000]);
        assert_eq!(guest_bytes(&mem, DATA + 0x4000, 0x200), data[0x1000..]);
        assert_eq!(q.used(), vec![(0, 1), (4, 0x1201)]);
    }

    #[test]
    fn block_read_only_rejects_out_and_leaves_file_unchanged() {
        let img = image();
        let mut block = file_block(&img, true);
        let mem = guest_memory();
        let mut q = TestQueue::new(&mem, 16);
        header(&mem, HDR, VIRTIO_BLK_T_OUT, 0);
        mem.write_slice(&[0xc3; 512], GuestAddress(DATA)).unwrap();
        q.add(&[desc(HDR, 16, R), desc(DATA, 512, R), desc(STATUS, 1, W)]);
        activate(&mut block, &mem, &q);
        block.process_queue(0);
        assert_eq!(status(&mem, STATUS), IOERR);
        assert_eq!(q.used(), vec![(0, 1)]);
        assert_eq!(file_bytes(&img, 0, 512), sector_pattern(0, 512));
    }

    #[test]
    fn block_unknown_type_gets_unsupp() {
        let img = image();
        let mut block = file_block(&img, false);
        let mem = guest_memory();
        let mut q = TestQueue::new(&mem, 16);
        header(&mem, HDR, 0x1234, 0);
        q.add(&[desc(HDR, 16, R), desc(STATUS, 1, W)]);
        activate(&mut block, &mem, &q);
        block.process_queue(0);
        assert_eq!(status(&mem, STATUS), UNSUPP);
        assert_eq!(q.used(), vec![(0, 1)]);
    }

    #[test]
    fn block_malformed_requests_complete_with_ioerr() {
        let img = image();
        let mut block = file_block(&img, false);
        let mem = guest_memory();
        let mut q = TestQueue::new(&mem, 32);
        let end = MEM_END;
        // Short header, wrong direction, unaligned, past the end, outside
        // memory, sector overflow: each gets IOERR in its own status byte.
        header(&mem, HDR, VIRTIO_BLK_T_IN, 0);
        header(&mem, HDR + 0x100, VIRTIO_BLK_T_IN, 2047);
        header(&mem, HDR + 0x200, VIRTIO_BLK_T_OUT, u64::MAX);
        q.add(&[desc(HDR, 15, R), desc(DATA, 512, W), desc(STATUS, 1, W)]);
        q.add(&[desc(HDR, 16, R), desc(DATA, 512, R), desc(STATUS + 1, 1, W)]);
        q.add(&[desc(HDR, 16, R), desc(DATA, 500, W), desc(STATUS + 2, 1, W)]);
        q.add(&[
            desc(HDR + 0x100, 16, R),
            desc(DATA, 1024, W),
            desc(STATUS + 3, 1, W),
        ]);
        q.add(&[
            desc(HDR, 16, R),
            desc(end - 256, 512, W),
            desc(STATUS + 4, 1, W),
        ]);
        q.add(&[
            desc(HDR + 0x200, 16, R),
            desc(DATA, 512, R),
            desc(STATUS + 5, 1, W),
        ]);
        // Status outside memory: nothing to write, used length 0.
        q.add(&[desc(HDR, 16, R), desc(DATA, 512, W), desc(end, 1, W)]);
        let irq = activate(&mut block, &mem, &q);
        mem.write_slice(&[0xaa; 8], GuestAddress(STATUS)).unwrap();
        block.process_queue(0);
        for i in 0..6 {
            assert_eq!(status(&mem, STATUS + i), IOERR, "request {i}");
        }
        assert_eq!(
            q.used(),
            vec![(0, 1), (3, 1), (6, 1), (9, 1), (12, 1), (15, 1), (18, 0)]
        );
        assert_eq!(irq.count(), 1);
        // Nothing was read into the guest.
        assert_eq!(guest_bytes(&mem, DATA, 512), vec![0; 512]);
    }

    #[test]
    fn block_descriptor_loop_completes() {
        let img = image();
        let mut block = file_block(&img, false);
        let mem = guest_memory();
        let mut q = TestQueue::new(&mem, 16);
        header(&mem, HDR, VIRTIO_BLK_T_IN, 0);
        // 0 -> 1 -> 0 -> ...
        q.store(
            0,
            RawDescriptor::from(SplitDescriptor::new(HDR, 16, NEXT, 1)),
        );
        q.store(
            1,
            RawDescriptor::from(SplitDescriptor::new(DATA, 512, NEXT | W, 0)),
        );
        q.publish(0);
        let irq = activate(&mut block, &mem, &q);
        block.process_queue(0);
        assert_eq!(q.used(), vec![(0, 1)]);
        assert_eq!(status(&mem, DATA + 511), IOERR);
        assert_eq!(irq.count(), 1);
    }

    #[test]
    fn block_interrupt_triggered_once_per_call_that_used_chains() {
        let (backend, _) = MemBackend::new(1 << 16);
        let mut block = Block::with_backend(Box::new(backend), false, None);
        let mem = guest_memory();
        let mut q = TestQueue::new(&mem, 16);
        header(&mem, HDR, VIRTIO_BLK_T_IN, 0);
        for i in 0..3 {
            q.add(&[desc(HDR, 16, R), desc(DATA, 512, W), desc(STATUS + i, 1, W)]);
        }
        let irq = activate(&mut block, &mem, &q);
        block.process_queue(0);
        assert_eq!(q.used().len(), 3);
        assert_eq!(irq.count(), 1);
        // Nothing new: no interrupt.
        block.process_queue(0);
        assert_eq!(irq.count(), 1);
        // Another queue index: ignored.
        q.add(&[desc(HDR, 16, R), desc(DATA, 512, W), desc(STATUS, 1, W)]);
        block.process_queue(1);
        assert_eq!(q.used().len(), 3);
        assert_eq!(irq.count(), 1);
        block.process_queue(0);
        assert_eq!(q.used().len(), 4);
        assert_eq!(irq.count(), 2);
    }

    #[test]
    fn block_event_idx_interrupts_only_past_used_event_and_asks_for_the_next_chain() {
        let img = image();
        let mut block = file_block(&img, false);
        assert_ne!(block.avail_features() & (1 << VIRTIO_RING_F_EVENT_IDX), 0);
        let mem = guest_memory();
        let mut q = TestQueue::new(&mem, 16);
        header(&mem, HDR, VIRTIO_BLK_T_IN, 0);
        let features = block.avail_features();
        let irq = activate_with(&mut block, &mem, &q, features);
        // used_event (after the avail ring) = 2: interrupt once the device
        // has used chain 2, not before.
        let used_event = GuestAddress(q.avail_addr() + 4 + 2 * 16);
        mem.write_obj(2u16, used_event).unwrap();
        let avail_event = GuestAddress(q.used_addr() + 4 + 8 * 16);
        for i in 0..2 {
            q.add(&[desc(HDR, 16, R), desc(DATA, 512, W), desc(STATUS + i, 1, W)]);
        }
        block.process_queue(0);
        assert_eq!(q.used().len(), 2);
        assert_eq!(irq.count(), 0);
        // The device asks to be notified of the next chain, number 2.
        assert_eq!(mem.read_obj::<u16>(avail_event).unwrap(), 2);
        q.add(&[desc(HDR, 16, R), desc(DATA, 512, W), desc(STATUS + 2, 1, W)]);
        block.process_queue(0);
        assert_eq!(q.used().len(), 3);
        assert_eq!(irq.count(), 1);
        assert_eq!(mem.read_obj::<u16>(avail_event).unwrap(), 3);
    }

    #[test]
    fn block_reset_deactivates_and_keeps_backend() {
        let (backend, state) = MemBackend::new(1 << 16);
        state.data.lock().unwrap()[..512].fill(0x77);
        let mut block = Block::with_backend(Box::new(backend), false, None);
        let mem = guest_memory();
        let mut q = TestQueue::new(&mem, 16);
        header(&mem, HDR, VIRTIO_BLK_T_IN, 0);
        q.add(&[desc(HDR, 16, R), desc(DATA, 512, W), desc(STATUS, 1, W)]);
        // Not activated: nothing happens.
        block.process_queue(0);
        assert!(q.used().is_empty());
        activate(&mut block, &mem, &q);
        assert!(block.is_activated());
        block.reset();
        assert!(!block.is_activated());
        block.process_queue(0);
        assert!(q.used().is_empty());

        // Activated again on a fresh queue, the same backend serves it.
        let mut q = TestQueue::new(&mem, 16);
        q.add(&[desc(HDR, 16, R), desc(DATA, 512, W), desc(STATUS, 1, W)]);
        activate(&mut block, &mem, &q);
        block.process_queue(0);
        assert_eq!(q.used(), vec![(0, 513)]);
        assert_eq!(guest_bytes(&mem, DATA, 512), vec![0x77; 512]);
    }

    const MEM_END: u64 = crate::test_utils::MEM_SIZE as u64;

    /// Writes a random but plausible request header (and a segment after it)
    /// at each 256-byte slot of `0x1000..0x4_0000`.
    fn plant_headers(mem: &GuestMemoryMmap, rng: &mut XorShift) {
        let types = [
            VIRTIO_BLK_T_IN,
            VIRTIO_BLK_T_OUT,
            VIRTIO_BLK_T_FLUSH,
            VIRTIO_BLK_T_GET_ID,
            VIRTIO_BLK_T_DISCARD,
            VIRTIO_BLK_T_WRITE_ZEROES,
        ];
        for slot in (0x1000..0x4_0000u64).step_by(0x100) {
            let t = match rng.below(8) {
                i @ 0..=5 => types[usize::try_from(i).unwrap()],
                _ => rng.u32(),
            };
            header(mem, slot, t, rng.below(160));
            let flags = rng.below_u32(3);
            segment(mem, slot + 16, rng.below(160), rng.below_u32(64), flags);
        }
    }

    /// A random descriptor, mostly pointing at planted headers or elsewhere
    /// in `0x1000..mem_end` (never at the rings below 0x1000).
    fn random_desc(rng: &mut XorShift, mem_end: u64) -> RawDescriptor {
        let addr = match rng.below(10) {
            0..=4 => 0x1000 + rng.below(0x3f0) * 0x100,
            5..=7 => 0x1000 + rng.below(mem_end - 0x1000),
            8 => mem_end - rng.below(1024),
            _ => rng.next(),
        };
        let lens = [0, 1, 8, 15, 16, 17, 32, 512, 513, 528, 1024, 4096];
        let len = match rng.below(16) {
            i @ 0..=11 => lens[usize::try_from(i).unwrap()],
            12..=14 => rng.below_u32(8192),
            _ => rng.u32(),
        };
        let mut flags = rng.below_u16(4) & (NEXT | W);
        if rng.below(16) == 0 {
            flags |= INDIRECT;
        }
        let next = rng.below_u16(20);
        RawDescriptor::from(SplitDescriptor::new(addr, len, flags, next))
    }

    fn random_table(rng: &mut XorShift, mem_end: u64, size: u16) -> Vec<RawDescriptor> {
        (0..size).map(|_| random_desc(rng, mem_end)).collect()
    }

    /// Two-descriptor chains at even indices, mostly well formed: a header
    /// at a planted slot with or without OUT data or segments after it,
    /// then a device-writable buffer for IN data and the status or the
    /// status alone; each part is sometimes replaced at random.
    fn plausible_table(rng: &mut XorShift, mem_end: u64, size: u16) -> Vec<RawDescriptor> {
        let mut table = Vec::new();
        for i in (0..size).step_by(2) {
            let mut hdr = SplitDescriptor::new(0x1000 + rng.below(0x3f0) * 0x100, 16, NEXT, i + 1);
            if rng.below(8) == 0 {
                hdr = SplitDescriptor::from(random_desc(rng, mem_end));
            }
            let (hdr_len, data_len, data_flags) = if rng.below(2) == 0 {
                // Header, then IN / GET_ID data and the status together.
                let lens = [1, 17, 513, 1025, 4097, 21, 5];
                (16, lens[usize::try_from(rng.below(7)).unwrap()], W)
            } else {
                // Header and OUT data or segments together, then the status.
                let lens = [16, 32, 16 + 512, 16 + 1024, 48];
                (lens[usize::try_from(rng.below(5)).unwrap()], 1, W)
            };
            if rng.below(8) != 0 {
                hdr.set_len(hdr_len);
            }
            let addr = 0x4_0000 + rng.below(0x1000) * 0x100;
            let mut data = SplitDescriptor::new(addr, data_len, data_flags, 0);
            if rng.below(8) == 0 {
                data = SplitDescriptor::from(random_desc(rng, mem_end));
            }
            table.push(RawDescriptor::from(hdr));
            table.push(RawDescriptor::from(data));
        }
        table
    }

    #[test]
    fn block_random_descriptor_tables_do_not_panic() {
        const SIZE: u16 = 16;
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let mem_end = 1u64 << 20;
        let (backend, state) = MemBackend::new(64 << 10);
        let mut block = Block::with_backend(Box::new(backend), false, Some("fuzz".into()));
        let mut rng = XorShift(0x9e37_79b9_7f4a_7c15);
        let mut completed = 0;
        for _ in 0..2000 {
            plant_headers(&mem, &mut rng);
            let mut q = TestQueue::new(&mem, SIZE);
            let mut indirect = false;
            let table = if rng.below(2) == 0 {
                random_table(&mut rng, mem_end, SIZE)
            } else {
                plausible_table(&mut rng, mem_end, SIZE)
            };
            for (i, d) in (0..SIZE).zip(table.iter()) {
                indirect |= SplitDescriptor::from(*d).refers_to_indirect_table();
                q.store(i, *d);
            }
            let mut heads = Vec::new();
            for slot in 0..SIZE {
                // Mostly chain heads (which `plausible_table` puts at even
                // indices), some anything, some out of range.
                let head = match rng.below(4) {
                    0 | 1 => rng.below_u16(SIZE / 2) * 2,
                    2 => rng.below_u16(SIZE),
                    _ => rng.below_u16(SIZE + 2),
                };
                heads.push(head);
                q.set_avail_entry(slot, head);
            }
            let avail_idx = rng.below_u16(SIZE + 3);
            q.set_avail_idx(avail_idx);

            block.reset();
            let irq = activate(&mut block, &mem, &q);
            block.process_queue(0);

            // Direct descriptors stay above the rings; indirect tables hold
            // whatever the memory holds and may point the device at the
            // rings themselves, so only check the used ring without them.
            if indirect {
                continue;
            }
            let used = q.used_idx();
            if avail_idx <= SIZE {
                // Every chain with a valid head was completed.
                let valid = heads[..usize::from(avail_idx)]
                    .iter()
                    .filter(|h| **h < SIZE)
                    .count();
                assert_eq!(usize::from(used), valid);
                assert_eq!(irq.count(), usize::from(valid > 0));
                completed += valid;
            } else {
                // An available index too far ahead is refused outright.
                assert_eq!(used, 0);
            }
        }
        assert!(completed > 2000, "{completed}");
        // The random chains reached the backend, not only the parser.
        let ops = state.ops.load(Ordering::SeqCst);
        assert!(ops > 100, "{ops}");
    }
}
