//! In-process virtio-blk benchmark: a synthetic driver fills a split
//! virtqueue on a real `GuestMemoryMmap` with batches of requests, the real
//! device code processes them against a raw file, and the same sizes and
//! offsets are then run as plain `pread`/`pwrite` on the same file.
//!
//! `cargo bench -p ember-virtio-blk --bench inprocess [-- --file PATH --size-mib N --case NAME]`
//! (or `tools/bench/blk`). Both sides hit the host's page cache after the
//! first pass: the figures compare the device path's CPU cost with the
//! host's own syscalls, not disk speed.
//!
//! Only the device's work is timed (`process_queue`: popping the chains,
//! parsing, the I/O, the used ring), not the synthetic driver's filling of
//! the ring, which is the guest's work. Both sides move the same bytes to
//! and from the same amount of memory, already faulted in as a running
//! guest's is: the device into a batch's worth of guest buffers, the host
//! into an equally large buffer cycled through in the same order.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ember_memory::GuestMemoryMmap;
use ember_virtio::{ActivateContext, InterruptKind, VirtioDevice, VirtioInterrupt};
use ember_virtio_blk::{Block, RawFile};
use virtio_bindings::virtio_blk::{VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};

const QUEUE_SIZE: u16 = 256;
/// Rounds of device and host runs, alternated; the medians are compared.
const ROUNDS: usize = 7;
const DESC: u64 = 0x1000;
const AVAIL: u64 = 0x3000;
const USED: u64 = 0x4000;
const HEADERS: u64 = 0x1_0000;
const STATUS: u64 = 0x2_0000;
const DATA: u64 = 0x10_0000;
const MEM: usize = 80 << 20;
const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;

struct NoInterrupt;
impl VirtioInterrupt for NoInterrupt {
    fn trigger(&self, _kind: InterruptKind) -> std::io::Result<()> {
        Ok(())
    }
}

/// A minimal virtio driver for one queue.
struct Driver {
    mem: GuestMemoryMmap,
    avail_idx: u16,
}

impl Driver {
    fn desc(&self, index: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let base = GuestAddress(DESC + u64::from(index) * 16);
        let mut d = [0u8; 16];
        d[..8].copy_from_slice(&addr.to_le_bytes());
        d[8..12].copy_from_slice(&len.to_le_bytes());
        d[12..14].copy_from_slice(&flags.to_le_bytes());
        d[14..].copy_from_slice(&next.to_le_bytes());
        self.mem.write_slice(&d, base).unwrap();
    }

    /// Queues `batch` requests of `len` bytes at byte `offsets`.
    fn submit(&mut self, write: bool, len: u32, offsets: &[u64]) {
        for (i, &off) in offsets.iter().enumerate() {
            let i16 = u16::try_from(i).unwrap();
            let head = i16 * 3;
            let hdr = HEADERS + 16 * i as u64;
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
                DATA + i as u64 * u64::from(len),
                len,
                data_flags,
                head + 2,
            );
            self.desc(head + 2, STATUS + i as u64, 1, F_WRITE, 0);
            let slot = AVAIL + 4 + 2 * u64::from(self.avail_idx.wrapping_add(i16) % QUEUE_SIZE);
            self.mem.write_obj(head, GuestAddress(slot)).unwrap();
        }
        self.avail_idx = self
            .avail_idx
            .wrapping_add(u16::try_from(offsets.len()).unwrap());
        self.mem
            .write_obj(self.avail_idx, GuestAddress(AVAIL + 2))
            .unwrap();
    }

    fn used_idx(&self) -> u16 {
        self.mem.read_obj(GuestAddress(USED + 2)).unwrap()
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

fn run_device(case: &Case, path: &PathBuf, offs: &[u64]) -> Duration {
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM)]).unwrap();
    let mut q = Queue::new(QUEUE_SIZE).unwrap();
    q.set_size(QUEUE_SIZE);
    q.set_desc_table_address(Some(u32::try_from(DESC).unwrap()), Some(0));
    q.set_avail_ring_address(Some(u32::try_from(AVAIL).unwrap()), Some(0));
    q.set_used_ring_address(Some(u32::try_from(USED).unwrap()), Some(0));
    q.set_ready(true);
    let backend = RawFile::open(path, false).unwrap();
    let mut dev = Block::with_backend(Box::new(backend), false, None);
    dev.activate(ActivateContext {
        mem: mem.clone(),
        interrupt: Arc::new(NoInterrupt),
        queues: vec![q],
        acked_features: 1 << VIRTIO_F_VERSION_1,
    })
    .unwrap();
    // A running guest's memory is faulted in: touch every page first.
    let zero = vec![0u8; MEM];
    mem.write_slice(&zero, GuestAddress(0)).unwrap();
    let mut drv = Driver { mem, avail_idx: 0 };
    let batch = batch_size(case);
    let mut busy = Duration::ZERO;
    for chunk in offs.chunks(batch) {
        drv.submit(case.write, case.len, chunk);
        let start = Instant::now();
        dev.process_queue(0);
        busy += start.elapsed();
        assert_eq!(drv.used_idx(), drv.avail_idx, "every request completed");
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

fn run_host(case: &Case, path: &PathBuf, offs: &[u64]) -> Duration {
    let f = File::options().read(true).write(true).open(path).unwrap();
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

fn main() {
    let mut args = std::env::args().skip(1);
    let mut path = std::env::temp_dir().join(format!("ember-blk-bench-{}.img", std::process::id()));
    let mut size_mib: u64 = 256;
    let mut only: Option<String> = None;
    while let Some(a) = args.next() {
        match a.as_str() {
            "--case" => only = args.next(),
            "--file" => path = PathBuf::from(args.next().expect("--file PATH")),
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
        "{:<14} {:>12} {:>10} {:>14} {:>10} {:>7}",
        "case", "ember req/s", "ember MB/s", "host req/s", "host MB/s", "ratio"
    );
    let mut seed = 0x2545_f491_4f6c_dd1d_u64;
    for case in cases
        .iter()
        .filter(|c| only.as_deref().is_none_or(|o| o == c.name))
    {
        let offs = offsets(case, size, &mut seed);
        // Warm the page cache for both sides, then alternate the rounds.
        run_host(case, &path, &offs);
        let mut dev = Vec::new();
        let mut host = Vec::new();
        for _ in 0..ROUNDS {
            dev.push(run_device(case, &path, &offs));
            host.push(run_host(case, &path, &offs));
        }
        dev.sort();
        host.sort();
        let rate = |d: Duration| case.requests as f64 / d.as_secs_f64();
        let mbs = |d: Duration| rate(d) * f64::from(case.len) / 1e6;
        println!(
            "{:<14} {:>12.0} {:>10.1} {:>14.0} {:>10.1} {:>7.2}",
            case.name,
            rate(dev[ROUNDS / 2]),
            mbs(dev[ROUNDS / 2]),
            rate(host[ROUNDS / 2]),
            mbs(host[ROUNDS / 2]),
            rate(dev[ROUNDS / 2]) / rate(host[ROUNDS / 2])
        );
    }
    let _ = std::fs::remove_file(&path);
}
