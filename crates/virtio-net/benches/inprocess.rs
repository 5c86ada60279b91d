//! In-process virtio-net benchmark on a real tap: a synthetic driver posts
//! rx buffers and tx chains on a real `GuestMemoryMmap`, the real device
//! code moves frames between them and the tap, and the same frames are then
//! moved by plain `read`/`write` on the tap (the physical limit here).
//!
//! Needs root: it makes its own network namespace (on its own thread) and a
//! tap in it; no traffic leaves that namespace. Transmitted frames go into
//! the namespace's stack, which drops them (unknown destination MAC);
//! received frames are injected with an AF_PACKET socket on the tap.
//!
//! Only the device's work is timed (`process_queue`/`process_backend`), not
//! the synthetic driver's posting of buffers, which is the guest's work.
//! Memory is already faulted in, as a running guest's is. Transmit: 256
//! guest buffers against as many host buffers of the same size, in turn.
//! Receive: the buffers a Linux driver posts with VIRTIO_NET_F_MRG_RXBUF
//! (256 of 1536 bytes for small frames, of 4096 for large ones, carved from
//! 32 KiB page fragments), against plain reads into as many host buffers as
//! frames those hold, each big enough for any frame; and, as the limit of
//! that layout, `readv` of each frame straight into those guest buffers
//! (adjacent ones merged), printed under the receive cases.
//!
//! `cargo bench -p ember-virtio-net --bench inprocess [-- --case 64-rx]`
//! (or `tools/bench/net`); a case is `<frame bytes>-<tx|rx>`.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ember_memory::GuestMemoryMmap;
use ember_virtio::{
    ActivateContext, BackendInterest, InterruptKind, VirtioDevice, VirtioInterrupt,
};
use ember_virtio_net::{Net, NetConfig, Tap, VNET_HDR_LEN};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_net::VIRTIO_NET_F_MRG_RXBUF;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

const TAP: &str = "benchtap0";
/// Rounds of device and host runs, alternated; the medians are compared.
const ROUNDS: usize = 7;
const QSIZE: u16 = 256;
const MEM: usize = 64 << 20;
/// Queue i's descriptor table, avail ring, used ring.
const RINGS: [(u64, u64, u64); 2] = [(0x1000, 0x3000, 0x4000), (0x6000, 0x8000, 0x9000)];
const RX_BUFS: u64 = 0x10_0000;
const TX_BUFS: u64 = 0x200_0000;
/// Spacing of the guest's buffers (and the host buffers' size): the largest frame.
const BUF: u32 = 65562;
/// The receive buffers a Linux driver posts with VIRTIO_NET_F_MRG_RXBUF:
/// 1536 bytes while frames are small, growing to a page for large ones
/// (drivers/net/virtio_net.c, `get_mergeable_buf_len`).
fn rx_buf_len(frame: usize) -> u32 {
    if frame <= 1500 {
        1536
    } else {
        4096
    }
}

/// How many receive buffers a frame of `len` bytes fills, and how many such
/// frames the queue's buffers hold.
fn rx_fit(len: usize) -> (usize, usize) {
    let per_frame = (VNET_HDR_LEN + len).div_ceil(rx_buf_len(len) as usize);
    (per_frame, usize::from(QSIZE) / per_frame)
}

/// The driver's page fragments its receive buffers are carved from.
const FRAG: u64 = 32 << 10;

/// Where the driver's `QSIZE` receive buffers of `len` bytes lie: one after
/// another in 32 KiB page fragments, the last of a fragment taking what is
/// left of it, as `add_recvbuf_mergeable` does; the fragments are apart.
fn rx_buffers(len: u32) -> Vec<(u64, u32)> {
    let per_frag = FRAG / u64::from(len);
    (0..u64::from(QSIZE))
        .map(|i| {
            let (frag, k) = (i / per_frag, i % per_frag);
            let addr = RX_BUFS + frag * 2 * FRAG + k * u64::from(len);
            let last = k + 1 == per_frag;
            let len = if last {
                u32::try_from(FRAG - k * u64::from(len)).unwrap()
            } else {
                len
            };
            (addr, len)
        })
        .collect()
}
const F_WRITE: u16 = 2;

struct NoInterrupt;
impl VirtioInterrupt for NoInterrupt {
    fn trigger(&self, _: InterruptKind) -> std::io::Result<()> {
        Ok(())
    }
}

struct Ring {
    desc: u64,
    avail: u64,
    used: u64,
    next: u16,
}

impl Ring {
    fn post(&mut self, mem: &GuestMemoryMmap, index: u16, addr: u64, len: u32, flags: u16) {
        let mut d = [0u8; 16];
        d[..8].copy_from_slice(&addr.to_le_bytes());
        d[8..12].copy_from_slice(&len.to_le_bytes());
        d[12..14].copy_from_slice(&flags.to_le_bytes());
        mem.write_slice(&d, GuestAddress(self.desc + u64::from(index) * 16))
            .unwrap();
        let slot = self.avail + 4 + 2 * u64::from(self.next % QSIZE);
        mem.write_obj(index, GuestAddress(slot)).unwrap();
        self.next = self.next.wrapping_add(1);
        mem.write_obj(self.next, GuestAddress(self.avail + 2))
            .unwrap();
    }

    fn used(&self, mem: &GuestMemoryMmap) -> u16 {
        mem.read_obj(GuestAddress(self.used + 2)).unwrap()
    }
}

fn sh(args: &[&str]) {
    let ok = Command::new(args[0])
        .args(&args[1..])
        .status()
        .map(|s| s.success());
    assert!(matches!(ok, Ok(true)), "{}", args.join(" "));
}

/// An AF_PACKET socket sending raw frames out of the tap (they arrive on
/// the tap's fd).
fn injector() -> OwnedFd {
    let proto = u16::try_from(libc::ETH_P_ALL).unwrap().to_be();
    // SAFETY: plain socket(2) call; the result is checked.
    let fd = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW, i32::from(proto)) };
    assert!(fd >= 0, "AF_PACKET socket");
    // SAFETY: fd is a new descriptor we own.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let name = std::ffi::CString::new(TAP).unwrap();
    // SAFETY: a NUL-terminated name.
    let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) };
    // SAFETY: sockaddr_ll is plain data.
    let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    sll.sll_family = u16::try_from(libc::AF_PACKET).unwrap();
    sll.sll_protocol = proto;
    sll.sll_ifindex = i32::try_from(ifindex).unwrap();
    // SAFETY: binding our socket to a valid sockaddr_ll of the right size.
    let ret = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            std::ptr::addr_of!(sll).cast(),
            u32::try_from(std::mem::size_of::<libc::sockaddr_ll>()).unwrap(),
        )
    };
    assert_eq!(ret, 0, "bind AF_PACKET");
    fd
}

fn inject(fd: &OwnedFd, frame: &[u8]) -> bool {
    // SAFETY: sending from a valid buffer on our socket.
    unsafe { libc::send(fd.as_raw_fd(), frame.as_ptr().cast(), frame.len(), 0) >= 0 }
}

fn frame(len: usize) -> Vec<u8> {
    let mut f = vec![0x5au8; len];
    f[..6].copy_from_slice(&[0x02, 0, 0, 0, 0, 0x99]); // unknown unicast destination
    f[6..12].copy_from_slice(&[0x02, 0, 0, 0, 0, 0x01]);
    f[12..14].copy_from_slice(&[0x88, 0xb5]); // local experimental ethertype
    f
}

fn device(mem: &GuestMemoryMmap) -> (Net, [Ring; 2]) {
    let mut net = Net::new(&NetConfig {
        tap: TAP.into(),
        mac: [0x52, 0x54, 0, 0, 0, 1],
        offloads: false,
        vlan: None,
        queues: 1,
    })
    .expect("open the bench tap");
    let mut queues = Vec::new();
    for (d, a, u) in RINGS {
        let mut q = Queue::new(QSIZE).unwrap();
        q.set_size(QSIZE);
        q.set_desc_table_address(Some(u32::try_from(d).unwrap()), Some(0));
        q.set_avail_ring_address(Some(u32::try_from(a).unwrap()), Some(0));
        q.set_used_ring_address(Some(u32::try_from(u).unwrap()), Some(0));
        q.set_ready(true);
        queues.push(q);
    }
    net.activate(ActivateContext {
        mem: mem.clone(),
        interrupt: Arc::new(NoInterrupt),
        queues,
        acked_features: (1 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_NET_F_MRG_RXBUF),
    })
    .unwrap();
    let rings = RINGS.map(|(desc, avail, used)| Ring {
        desc,
        avail,
        used,
        next: 0,
    });
    (net, rings)
}

/// Guest memory, every page touched (a running guest's memory is).
fn guest_memory() -> GuestMemoryMmap {
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM)]).unwrap();
    mem.write_slice(&vec![0u8; MEM], GuestAddress(0)).unwrap();
    mem
}

/// Host buffers as many and as large as the guest's, touched, each
/// starting on a page as the guest's buffers do: the kernel's copy runs at
/// a speed that depends on where its destination lies, and with buffers
/// from `malloc` the tap's own rate moved by a quarter from one build of
/// this program to the next.
struct HostBuffers {
    pool: Vec<u8>,
    /// Where the first page-aligned buffer starts in `pool`.
    first: usize,
}

/// Host buffers lie this far apart: [`BUF`] rounded up to pages.
const HOST_STRIDE: usize = (BUF as usize).next_multiple_of(4096);

impl HostBuffers {
    fn new() -> Self {
        let pool = vec![0u8; (usize::from(QSIZE) + 1) * HOST_STRIDE];
        let first = pool.as_ptr().align_offset(4096);
        HostBuffers { pool, first }
    }

    fn len(&self) -> usize {
        usize::from(QSIZE)
    }

    fn get(&self, i: usize) -> &[u8] {
        let at = self.first + i * HOST_STRIDE;
        &self.pool[at..at + BUF as usize]
    }

    fn get_mut(&mut self, i: usize) -> &mut [u8] {
        let at = self.first + i * HOST_STRIDE;
        &mut self.pool[at..at + BUF as usize]
    }
}

/// Frames/s transmitting `count` frames of `len` bytes through the device.
fn device_tx(len: usize, count: usize) -> f64 {
    let mem = guest_memory();
    let (mut net, mut rings) = device(&mem);
    let mut buf = vec![0u8; VNET_HDR_LEN];
    buf.extend(frame(len));
    for i in 0..u64::from(QSIZE) {
        mem.write_slice(&buf, GuestAddress(TX_BUFS + i * u64::from(BUF)))
            .unwrap();
    }
    let total = u32::try_from(buf.len()).unwrap();
    let mut elapsed = Duration::ZERO;
    let mut sent = 0;
    while sent < count {
        let batch = (count - sent).min(usize::from(QSIZE));
        for i in 0..batch {
            let i = u16::try_from(i).unwrap();
            rings[1].post(&mem, i, TX_BUFS + u64::from(i) * u64::from(BUF), total, 0);
        }
        let start = Instant::now();
        net.process_queue(1);
        elapsed += start.elapsed();
        assert_eq!(rings[1].used(&mem), rings[1].next, "tx chains completed");
        sent += batch;
    }
    count as f64 / elapsed.as_secs_f64()
}

/// Frames/s receiving `count` injected frames of `len` bytes through the
/// device, into receive buffers of the size a Linux driver posts.
fn device_rx(len: usize, count: usize, inj: &OwnedFd) -> f64 {
    let buf_len = rx_buf_len(len);
    let bufs = rx_buffers(buf_len);
    let mem = guest_memory();
    let (mut net, mut rings) = device(&mem);
    let f = frame(len);
    let (per_frame, fit) = rx_fit(len);
    let mut got = 0usize;
    let mut elapsed = Duration::ZERO;
    while got < count {
        // Repost the buffers the device used (in order, so buffer i is free
        // again when its turn comes; never more than the queue holds), inject
        // a batch the tap's queue can hold, deliver.
        let outstanding = rings[0].next.wrapping_sub(rings[0].used(&mem));
        for _ in outstanding..QSIZE {
            let i = rings[0].next % QSIZE;
            let (addr, len) = bufs[usize::from(i)];
            rings[0].post(&mem, i, addr, len, F_WRITE);
        }
        // As many frames as the posted buffers hold.
        let batch = (count - got).min(200).min(fit);
        for _ in 0..batch {
            assert!(inject(inj, &f), "inject");
        }
        let want = u16::try_from(batch * per_frame).unwrap();
        let before = rings[0].used(&mem);
        let start = Instant::now();
        net.process_queue(0);
        // Until the batch is in, or a pass finds the tap empty (frames
        // injected while a new tap's queue is still coming up are lost; the
        // plain reads below count only what arrives too).
        loop {
            let used = rings[0].used(&mem);
            if used.wrapping_sub(before) >= want
                || net.process_backend() == BackendInterest::Pause
                || rings[0].used(&mem) == used
            {
                break;
            }
        }
        elapsed += start.elapsed();
        got += usize::from(rings[0].used(&mem).wrapping_sub(before)) / per_frame;
    }
    count as f64 / elapsed.as_secs_f64()
}

/// The tap's own rate: plain write(2) of the same frames.
fn raw_tx(len: usize, count: usize) -> f64 {
    let tap = Tap::open(TAP).unwrap();
    let mut bufs = HostBuffers::new();
    let total = VNET_HDR_LEN + len;
    let f = frame(len);
    for i in 0..bufs.len() {
        bufs.get_mut(i)[VNET_HDR_LEN..total].copy_from_slice(&f);
    }
    let start = Instant::now();
    for i in 0..count {
        let _ = tap.write(&bufs.get(i % bufs.len())[..total]);
    }
    count as f64 / start.elapsed().as_secs_f64()
}

/// The iovecs of receive buffers `first..first + n` of `bufs` in `mem`,
/// adjacent ones merged into one.
fn merged_iovecs(mem: &GuestMemoryMmap, bufs: &[(u64, u32)]) -> Vec<libc::iovec> {
    let mut iov: Vec<libc::iovec> = Vec::new();
    for &(addr, len) in bufs {
        let p = mem.get_host_address(GuestAddress(addr)).unwrap();
        if let Some(last) = iov.last_mut() {
            if last.iov_base.cast::<u8>().wrapping_add(last.iov_len) == p {
                last.iov_len += len as usize;
                continue;
            }
        }
        iov.push(libc::iovec {
            iov_base: p.cast(),
            iov_len: len as usize,
        });
    }
    iov
}

/// Frames/s of `read_one(i)` (read the next frame into the i-th of `fit`
/// buffers; false when the tap is empty) on `count` injected frames of
/// `len` bytes, `fit` in flight at a time.
fn timed_reads(
    len: usize,
    count: usize,
    fit: usize,
    inj: &OwnedFd,
    mut read_one: impl FnMut(usize) -> bool,
) -> f64 {
    let f = frame(len);
    let (mut got, mut elapsed) = (0usize, Duration::ZERO);
    while got < count {
        let batch = (count - got).min(200).min(fit);
        for _ in 0..batch {
            assert!(inject(inj, &f), "inject");
        }
        let start = Instant::now();
        let mut n = 0;
        while n < batch && read_one((got + n) % fit) {
            n += 1;
        }
        elapsed += start.elapsed();
        got += n.max(1);
    }
    count as f64 / elapsed.as_secs_f64()
}

/// The limit of the guest's buffer layout: readv(2) of each injected frame
/// straight into the receive buffers a Linux driver posts (as many as the
/// frame fills, adjacent ones merged into one iovec), with nothing else.
fn layout_rx(len: usize, count: usize, inj: &OwnedFd) -> f64 {
    let tap = Tap::open(TAP).unwrap();
    let mem = guest_memory();
    let bufs = rx_buffers(rx_buf_len(len));
    let (per_frame, fit) = rx_fit(len);
    let iovecs: Vec<Vec<libc::iovec>> = (0..fit)
        .map(|i| merged_iovecs(&mem, &bufs[i * per_frame..(i + 1) * per_frame]))
        .collect();
    timed_reads(len, count, fit, inj, |i| {
        let iov = &iovecs[i];
        // SAFETY: the iovecs describe buffers inside `mem`, which is mapped
        // for the whole call; the kernel writes at most their lengths. The
        // fd is our open tap.
        let ret = unsafe {
            libc::readv(
                tap.as_raw_fd(),
                iov.as_ptr(),
                i32::try_from(iov.len()).unwrap(),
            )
        };
        ret > 0
    })
}

/// The tap's own rate: plain read(2) of injected frames.
fn raw_rx(len: usize, count: usize, inj: &OwnedFd) -> f64 {
    let tap = Tap::open(TAP).unwrap();
    // As many frames in flight as the device's receive buffers hold, each
    // read into a buffer that takes any frame.
    let (_, fit) = rx_fit(len);
    let mut bufs = HostBuffers::new();
    timed_reads(len, count, fit, inj, |i| tap.read(bufs.get_mut(i)).is_ok())
}

fn main() {
    let mut only = None;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        if a == "--case" {
            only = args.next();
        }
    }
    let result = std::thread::spawn(move || {
        // SAFETY: unshare affects only this thread's network namespace.
        if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
            eprintln!("SKIPPED: cannot make a network namespace (needs root)");
            return;
        }
        // Commands forked from this thread run in its namespace.
        sh(&["ip", "tuntap", "add", TAP, "mode", "tap"]);
        sh(&["ip", "link", "set", TAP, "mtu", "65000", "up"]);
        let inj = injector();
        println!(
            "{:<10} {:>4} {:>12} {:>10} {:>12} {:>10} {:>7}",
            "frames", "dir", "ember fr/s", "ember Gb/s", "tap fr/s", "tap Gb/s", "ratio"
        );
        for (len, count) in [(64usize, 200_000usize), (64_000, 20_000)] {
            for dir in ["tx", "rx"] {
                if only.as_ref().is_some_and(|c| *c != format!("{len}-{dir}")) {
                    continue;
                }
                let (mut dev, mut raw, mut layout) = (Vec::new(), Vec::new(), Vec::new());
                for _ in 0..ROUNDS {
                    if dir == "tx" {
                        dev.push(device_tx(len, count));
                        raw.push(raw_tx(len, count));
                    } else {
                        dev.push(device_rx(len, count, &inj));
                        raw.push(raw_rx(len, count, &inj));
                        layout.push(layout_rx(len, count, &inj));
                    }
                }
                dev.sort_by(f64::total_cmp);
                raw.sort_by(f64::total_cmp);
                layout.sort_by(f64::total_cmp);
                let gbps = |fps: f64| fps * len as f64 * 8.0 / 1e9;
                println!(
                    "{:<10} {:>4} {:>12.0} {:>10.2} {:>12.0} {:>10.2} {:>7.2}",
                    format!("{len} B"),
                    dir,
                    dev[ROUNDS / 2],
                    gbps(dev[ROUNDS / 2]),
                    raw[ROUNDS / 2],
                    gbps(raw[ROUNDS / 2]),
                    dev[ROUNDS / 2] / raw[ROUNDS / 2]
                );
                if let Some(&lim) = layout.get(ROUNDS / 2) {
                    // Not a case of its own: what readv into the guest's
                    // buffers alone reaches, for the limits in the docs.
                    println!(
                        "{:<10} {:>4} {:>12} {:>10} {:>12.0} {:>10.2} {:>7.2}   (tap readv into the guest's buffer layout)",
                        "",
                        "",
                        "",
                        "",
                        lim,
                        gbps(lim),
                        dev[ROUNDS / 2] / lim
                    );
                }
            }
        }
    })
    .join();
    if result.is_err() {
        std::process::exit(1);
    }
}
