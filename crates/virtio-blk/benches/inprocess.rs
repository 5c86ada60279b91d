//! In-process virtio-blk benchmark: a synthetic driver fills a split
//! virtqueue on a real `GuestMemoryMmap` with batches of requests, the real
//! device code processes them against a raw file, and the same sizes and
//! offsets are then run as plain `pread`/`pwrite` on the same file.
//!
//! `cargo bench -p ember-virtio-blk --bench inprocess [-- --file PATH --size-mib N --case NAME --format raw|qcow2|raw-dio|both|all --io sync|io_uring|both --queues 1,4 --json-lines --rate-limit SPEC --seconds N]`
//! (or `tools/bench/blk`). Both sides hit the host's page cache after the
//! first pass: the figures compare the device path's CPU cost with the
//! host's own syscalls, not disk speed.
//!
//! `--format qcow2` runs the device on a qcow2 image of the same size whose
//! clusters are all allocated (`ember-qcow2`, the fast path a running
//! guest's disk takes once written), `both` (the default) runs raw and
//! qcow2 and prints qcow2's rate as a share of raw's; `raw-dio` is the raw
//! file with `cache=none` (`O_DIRECT`) on both sides, `all` the three.
//! `--io` picks the engines (both by default), `--queues` the queue counts
//! (a batch is split over the queues, each notified once per batch). `--rate-limit bw=SIZE/TIME,ops=SIZE/TIME` instead runs a
//! greedy driver against a rate-limited device for `--seconds` (default
//! 10), waiting on the limiter's timer as the event loop does, and
//! prints the rate achieved next to the configured one.
//!
//! Only the device's work is timed (`process_queue`: popping the chains,
//! parsing, the I/O, the used ring), not the synthetic driver's filling of
//! the ring, which is the guest's work. Both sides move the same bytes to
//! and from the same amount of memory, already faulted in as a running
//! guest's is: the device into a batch's worth of guest buffers, the host
//! into an equally large buffer cycled through in the same order.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ember_memory::GuestMemoryMmap;
use ember_rate_limiter::RateLimiterConfig;
use ember_virtio::{ActivateContext, InterruptKind, VirtioDevice, VirtioInterrupt};
use ember_virtio_blk::{Block, BlockBackend, CacheMode, IoEngine, Qcow2Disk, RawFile};
use virtio_bindings::virtio_blk::{VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};

const QUEUE_SIZE: u16 = 256;
/// Rounds of device and host runs, alternated; the medians are compared.
const ROUNDS: usize = 7;
/// Queue `q`'s rings are at `q * QUEUE_SPAN` past these.
const DESC: u64 = 0x1000;
const AVAIL: u64 = 0x3000;
const USED: u64 = 0x4000;
const QUEUE_SPAN: u64 = 0x4000;
/// Request headers and status bytes, `q * 0x1000` apart per queue.
const HEADERS: u64 = 0x2_0000;
const STATUS: u64 = 0x3_0000;
const DATA: u64 = 0x10_0000;
/// The most queues the benchmark drives.
const MAX_QUEUES: usize = 4;
const MEM: usize = 80 << 20;
const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;

struct NoInterrupt;
impl VirtioInterrupt for NoInterrupt {
    fn trigger(&self, _kind: InterruptKind) -> std::io::Result<()> {
        Ok(())
    }
}

/// A minimal virtio driver for queue `q`.
struct Driver {
    mem: GuestMemoryMmap,
    q: u64,
    avail_idx: u16,
}

impl Driver {
    fn desc(&self, index: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let base = GuestAddress(DESC + self.q * QUEUE_SPAN + u64::from(index) * 16);
        let mut d = [0u8; 16];
        d[..8].copy_from_slice(&addr.to_le_bytes());
        d[8..12].copy_from_slice(&len.to_le_bytes());
        d[12..14].copy_from_slice(&flags.to_le_bytes());
        d[14..].copy_from_slice(&next.to_le_bytes());
        self.mem.write_slice(&d, base).unwrap();
    }

    /// Queues requests of `len` bytes at byte `offsets`, into the data
    /// buffers from number `first` on.
    fn submit(&mut self, write: bool, len: u32, offsets: &[u64], first: usize) {
        let avail = AVAIL + self.q * QUEUE_SPAN;
        for (i, &off) in offsets.iter().enumerate() {
            let i16 = u16::try_from(i).unwrap();
            let head = i16 * 3;
            let hdr = HEADERS + self.q * 0x1000 + 16 * i as u64;
            let t = if write {
                VIRTIO_BLK_T_OUT
            } else {
                VIRTIO_BLK_T_IN
            };
            let mut h = [0u8; 16];
            h[..4].copy_from_slice(&t.to_le_bytes());
            h[8..].copy_from_slice(&(off / 512).to_le_bytes());
            self.mem.write_slice(&h, GuestAddress(hdr)).unwrap();
            let data_flags = if write { F_NEXT } else { F_NEXT | F_WRITE };
            self.desc(head, hdr, 16, F_NEXT, head + 1);
            self.desc(
                head + 1,
                DATA + (first + i) as u64 * u64::from(len),
                len,
                data_flags,
                head + 2,
            );
            self.desc(head + 2, STATUS + self.q * 0x1000 + i as u64, 1, F_WRITE, 0);
            let slot = avail + 4 + 2 * u64::from(self.avail_idx.wrapping_add(i16) % QUEUE_SIZE);
            self.mem.write_obj(head, GuestAddress(slot)).unwrap();
        }
        self.avail_idx = self
            .avail_idx
            .wrapping_add(u16::try_from(offsets.len()).unwrap());
        self.mem
            .write_obj(self.avail_idx, GuestAddress(avail + 2))
            .unwrap();
    }

    fn used_idx(&self) -> u16 {
        self.mem
            .read_obj(GuestAddress(USED + self.q * QUEUE_SPAN + 2))
            .unwrap()
    }
}

struct Case {
    name: &'static str,
    write: bool,
    len: u32,
    random: bool,
    requests: usize,
}

fn offsets(case: &Case, size: u64, seed: &mut u64) -> Vec<u64> {
    let blocks = size / u64::from(case.len);
    (0..case.requests as u64)
        .map(|i| {
            if case.random {
                *seed ^= *seed << 13;
                *seed ^= *seed >> 7;
                *seed ^= *seed << 17;
                (*seed % blocks) * u64::from(case.len)
            } else {
                (i % blocks) * u64::from(case.len)
            }
        })
        .collect()
}

/// Which image the device serves.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Format {
    Raw,
    Qcow2,
    /// The raw file with `cache=none` (`O_DIRECT`), the host side too.
    RawDirect,
}

impl Format {
    fn name(self) -> &'static str {
        match self {
            Format::Raw => "raw",
            Format::Qcow2 => "qcow2",
            Format::RawDirect => "raw-dio",
        }
    }
}

fn open(format: Format, raw: &Path, qcow2: &Path) -> Box<dyn BlockBackend> {
    match format {
        Format::Raw => Box::new(RawFile::open(raw, false).unwrap()),
        Format::RawDirect => Box::new(RawFile::open_with(raw, false, CacheMode::None).unwrap()),
        Format::Qcow2 => Box::new(Qcow2Disk::open(qcow2, false).unwrap()),
    }
}

/// How the device runs: its engine and its queue count.
#[derive(Clone, Copy)]
struct Setup {
    io: IoEngine,
    queues: usize,
}

/// A device on `backend` with `setup.queues` activated queues, and their
/// drivers.
fn device(backend: Box<dyn BlockBackend>, setup: Setup) -> (Block, Vec<Driver>) {
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM)]).unwrap();
    let queues = (0..setup.queues as u64)
        .map(|i| {
            let mut q = Queue::new(QUEUE_SIZE).unwrap();
            q.set_size(QUEUE_SIZE);
            let at = |a: u64| Some(u32::try_from(a + i * QUEUE_SPAN).unwrap());
            q.set_desc_table_address(at(DESC), Some(0));
            q.set_avail_ring_address(at(AVAIL), Some(0));
            q.set_used_ring_address(at(USED), Some(0));
            q.set_ready(true);
            q
        })
        .collect();
    let mut dev = Block::with_backend(backend, false, None);
    dev.set_queues(u16::try_from(setup.queues).unwrap(), QUEUE_SIZE);
    if setup.io == IoEngine::IoUring {
        dev.use_io_uring().expect("io_uring");
    }
    dev.activate(ActivateContext {
        mem: mem.clone(),
        interrupt: Arc::new(NoInterrupt),
        queues,
        acked_features: 1 << VIRTIO_F_VERSION_1,
    })
    .unwrap();
    // A running guest's memory is faulted in: touch every page first.
    let zero = vec![0u8; MEM];
    mem.write_slice(&zero, GuestAddress(0)).unwrap();
    let drivers = (0..setup.queues as u64)
        .map(|q| Driver {
            mem: mem.clone(),
            q,
            avail_idx: 0,
        })
        .collect();
    (dev, drivers)
}

/// Runs the requests a batch at a time, the batch split over the queues
/// (each queue notified once per batch), and waits for every completion
/// (through the backend fd on io_uring, as the event loop does).
fn run_device(case: &Case, backend: Box<dyn BlockBackend>, offs: &[u64], setup: Setup) -> Duration {
    let (mut dev, mut drvs) = device(backend, setup);
    let batch = batch_size(case);
    let fd = dev.backend_fd();
    let mut busy = Duration::ZERO;
    for chunk in offs.chunks(batch) {
        let per = chunk.len().div_ceil(setup.queues);
        for (q, part) in chunk.chunks(per).enumerate() {
            drvs[q].submit(case.write, case.len, part, q * per);
        }
        let start = Instant::now();
        for q in 0..setup.queues {
            dev.process_queue(q);
        }
        while drvs.iter().any(|d| d.used_idx() != d.avail_idx) {
            let mut pfd = libc::pollfd {
                fd: fd.expect("a backend fd"),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one pollfd on the device's fd, for at most 1 s.
            unsafe { libc::poll(&mut pfd, 1, 1000) };
            dev.process_backend();
        }
        busy += start.elapsed();
    }
    busy
}

/// Requests queued per notification: as many as fit the guest's data area,
/// at most 64.
fn batch_size(case: &Case) -> usize {
    usize::try_from((MEM as u64 - DATA) / u64::from(case.len))
        .unwrap()
        .clamp(1, 64)
}

fn run_host(case: &Case, path: &Path, offs: &[u64], direct: bool) -> Duration {
    use std::os::unix::fs::OpenOptionsExt;
    let f = File::options()
        .read(true)
        .write(true)
        .custom_flags(if direct { libc::O_DIRECT } else { 0 })
        .open(path)
        .unwrap();
    let len = case.len as usize;
    let batch = batch_size(case);
    // Page-aligned, as guest buffers are (the kernel's copy is slower to a
    // misaligned destination).
    let mut buf = vec![0x5au8; len * batch + 4096];
    let base = buf.as_ptr().align_offset(4096);
    let start = Instant::now();
    for (i, &off) in offs.iter().enumerate() {
        let at = base + (i % batch) * len;
        let b = &mut buf[at..at + len];
        if case.write {
            f.write_all_at(b, off).unwrap();
        } else {
            f.read_exact_at(b, off).unwrap();
        }
    }
    start.elapsed()
}

/// Runs a greedy driver on a device limited by `spec` for `seconds`: 4 KiB
/// reads (or 1 MiB, for a bandwidth-only limit) a batch at a time, waiting
/// on the limiter's timer when it blocks, as the event loop does. Prints
/// the rate achieved against the configured one.
fn run_rate_limit(spec: &str, raw: &Path, seconds: u64) {
    let config: RateLimiterConfig = spec
        .parse()
        .expect("--rate-limit bw=SIZE/TIME,ops=SIZE/TIME");
    let len: u32 = if config.ops.is_some() { 4096 } else { 1 << 20 };
    let setup = Setup {
        io: IoEngine::Sync,
        queues: 1,
    };
    let (mut dev, mut drvs) = device(Box::new(RawFile::open(raw, false).unwrap()), setup);
    let drv = &mut drvs[0];
    dev.update_rate_limit(&config).unwrap();
    let fd = dev.backend_fd().unwrap();
    let batch = 16usize;
    let offs: Vec<u64> = (0..batch as u64).map(|i| i * u64::from(len)).collect();
    let start = Instant::now();
    let mut done = 0u64;
    let mut pending = 0usize;
    while start.elapsed() < Duration::from_secs(seconds) {
        if pending == 0 {
            drv.submit(false, len, &offs, 0);
            pending = batch;
        }
        let before = drv.used_idx();
        dev.process_queue(0);
        if drv.used_idx() == before {
            // Blocked: wait for the timer, then the event loop's call.
            let mut pfd = libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one pollfd on the device's timerfd, for at most 1 s.
            unsafe { libc::poll(&mut pfd, 1, 1000) };
            dev.process_backend();
        }
        let got = usize::from(drv.used_idx().wrapping_sub(before));
        done += got as u64;
        pending -= got.min(pending);
    }
    let secs = start.elapsed().as_secs_f64();
    let c = dev.rate_limiter_counters().unwrap();
    let report = |what: &str, b: &ember_rate_limiter::BucketConfig, got: u64| {
        let burst = b.one_time_burst.unwrap_or(0) + b.size;
        let want = b.size as f64 * 1000.0 / b.refill_time as f64;
        let rate = got.saturating_sub(burst) as f64 / secs;
        println!(
            "rate limit {what}: configured {want:.0}/s, achieved {rate:.0}/s after the first {burst} ({:+.2}%), {} requests in {secs:.1} s, throttled {} times",
            (rate / want - 1.0) * 100.0,
            done,
            c.throttled
        );
    };
    if let Some(b) = &config.bandwidth {
        report("bytes", b, c.bytes);
    }
    if let Some(b) = &config.ops {
        report("ops", b, c.ops);
    }
}

/// Makes `qcow2` a qcow2 image with `raw`'s contents, every cluster allocated.
fn make_qcow2(raw: &Path, qcow2: &Path, size: u64) {
    ember_qcow2::create(
        qcow2,
        &ember_qcow2::CreateOptions {
            size,
            ..Default::default()
        },
    )
    .unwrap();
    let mut q = ember_qcow2::Qcow2::open(qcow2, false).unwrap();
    let f = File::open(raw).unwrap();
    let mut chunk = vec![0u8; 1 << 20];
    for off in (0..size).step_by(1 << 20) {
        f.read_exact_at(&mut chunk, off).unwrap();
        q.write_at(&chunk, off).unwrap();
    }
    q.flush().unwrap();
}

fn main() {
    let mut args = std::env::args().skip(1);
    let mut path = std::env::temp_dir().join(format!("ember-blk-bench-{}.img", std::process::id()));
    let mut size_mib: u64 = 256;
    let mut only: Option<String> = None;
    let mut formats = vec![Format::Raw, Format::Qcow2];
    let mut rate_limit: Option<String> = None;
    let mut seconds = 10u64;
    let mut engines = vec![IoEngine::Sync, IoEngine::IoUring];
    let mut queue_counts = vec![1usize];
    let mut json_lines = false;
    while let Some(a) = args.next() {
        match a.as_str() {
            "--case" => only = args.next(),
            "--file" => path = PathBuf::from(args.next().expect("--file PATH")),
            "--format" => {
                formats = match args.next().as_deref() {
                    Some("raw") => vec![Format::Raw],
                    Some("qcow2") => vec![Format::Qcow2],
                    Some("raw-dio") => vec![Format::RawDirect],
                    Some("both") => vec![Format::Raw, Format::Qcow2],
                    Some("all") => vec![Format::Raw, Format::Qcow2, Format::RawDirect],
                    _ => panic!("--format raw|qcow2|raw-dio|both|all"),
                }
            }
            "--rate-limit" => rate_limit = args.next(),
            "--io" => {
                engines = match args.next().as_deref() {
                    Some("sync") => vec![IoEngine::Sync],
                    Some("io_uring") => vec![IoEngine::IoUring],
                    Some("both") => vec![IoEngine::Sync, IoEngine::IoUring],
                    _ => panic!("--io sync|io_uring|both"),
                }
            }
            "--queues" => {
                queue_counts = args
                    .next()
                    .expect("--queues N[,N...]")
                    .split(',')
                    .map(|n| n.parse().expect("--queues N[,N...]"))
                    .collect();
                assert!(
                    queue_counts.iter().all(|&n| (1..=MAX_QUEUES).contains(&n)),
                    "--queues: 1 to {MAX_QUEUES}"
                );
            }
            "--json-lines" => json_lines = true,
            "--seconds" => {
                seconds = args
                    .next()
                    .and_then(|s| s.parse().ok())
                    .expect("--seconds N")
            }
            "--size-mib" => {
                size_mib = args
                    .next()
                    .and_then(|s| s.parse().ok())
                    .expect("--size-mib N")
            }
            _ => {}
        }
    }
    let size = size_mib << 20;
    {
        let f = File::create(&path).unwrap();
        // Real data, not a sparse file: write it once.
        let chunk = vec![0xa5u8; 1 << 20];
        for i in 0..size_mib {
            f.write_all_at(&chunk, i << 20).unwrap();
        }
        f.sync_all().unwrap();
    }
    if let Some(spec) = rate_limit {
        run_rate_limit(&spec, &path, seconds);
        let _ = std::fs::remove_file(&path);
        return;
    }
    let qcow2 = path.with_extension("qcow2");
    if formats.contains(&Format::Qcow2) {
        make_qcow2(&path, &qcow2, size);
    }
    let cases = [
        Case {
            name: "4k-randread",
            write: false,
            len: 4096,
            random: true,
            requests: 100_000,
        },
        Case {
            name: "4k-randwrite",
            write: true,
            len: 4096,
            random: true,
            requests: 100_000,
        },
        Case {
            name: "1m-seqread",
            write: false,
            len: 1 << 20,
            random: false,
            requests: 1024,
        },
        Case {
            name: "1m-seqwrite",
            write: true,
            len: 1 << 20,
            random: false,
            requests: 1024,
        },
    ];
    println!(
        "{:<14} {:<6} {:<8} {:>2} {:>12} {:>10} {:>12} {:>10} {:>7} {:>7}",
        "case",
        "format",
        "io",
        "q",
        "ember req/s",
        "ember MB/s",
        "host req/s",
        "host MB/s",
        "/host",
        "/raw"
    );
    let mut seed = 0x2545_f491_4f6c_dd1d_u64;
    for case in cases
        .iter()
        .filter(|c| only.as_deref().is_none_or(|o| o == c.name))
    {
        let offs = offsets(case, size, &mut seed);
        // Warm the page cache for both sides, then alternate the rounds.
        run_host(case, &path, &offs, false);
        let mut raw_rates = std::collections::HashMap::new();
        for &format in &formats {
            for &io in &engines {
                for &queues in &queue_counts {
                    let setup = Setup { io, queues };
                    let mut dev = Vec::new();
                    let mut host = Vec::new();
                    for _ in 0..ROUNDS {
                        dev.push(run_device(case, open(format, &path, &qcow2), &offs, setup));
                        host.push(run_host(case, &path, &offs, format == Format::RawDirect));
                    }
                    dev.sort();
                    host.sort();
                    let rate = |d: Duration| case.requests as f64 / d.as_secs_f64();
                    let mbs = |d: Duration| rate(d) * f64::from(case.len) / 1e6;
                    let r = rate(dev[ROUNDS / 2]);
                    let h = rate(host[ROUNDS / 2]);
                    let key = (io as u8, queues);
                    let vs_raw = match format {
                        Format::Raw => {
                            raw_rates.insert(key, r);
                            None
                        }
                        Format::Qcow2 => raw_rates.get(&key).map(|raw| r / raw),
                        Format::RawDirect => None,
                    };
                    let fmt = format.name();
                    println!(
                        "{:<14} {:<6} {:<8} {:>2} {:>12.0} {:>10.1} {:>12.0} {:>10.1} {:>7.2} {:>7}",
                        case.name,
                        fmt,
                        io.to_string(),
                        queues,
                        r,
                        mbs(dev[ROUNDS / 2]),
                        h,
                        mbs(host[ROUNDS / 2]),
                        r / h,
                        vs_raw.map_or("-".to_string(), |v| format!("{v:.2}"))
                    );
                    if json_lines {
                        println!(
                            "JSON {}",
                            serde_json::json!({
                                "case": case.name, "format": fmt, "io": io.to_string(),
                                "queues": queues, "req_s": r, "host_pread_req_s": h,
                                "block_size": case.len, "requests": case.requests,
                            })
                        );
                    }
                }
            }
        }
    }
    let _ = std::fs::remove_file(&qcow2);
    let _ = std::fs::remove_file(&path);
}
