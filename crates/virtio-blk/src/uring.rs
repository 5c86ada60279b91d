//! The `io=io_uring` engine: reads, writes and flushes of a disk go to the
//! kernel as io_uring submissions straight between the image file and
//! guest memory, many at once; their completions come back on the event
//! loop through an eventfd.
//!
//! - The ring is made disabled, restricted to `READV`, `WRITEV` and
//!   `FSYNC` (and the `IO_DRAIN` flag), then enabled: nothing else can ever
//!   be submitted on it, whatever a bug in the device would try.
//! - A flush is an `fsync(DATASYNC)` with `IO_DRAIN`: it starts after every
//!   request submitted before it has completed, and completes after.
//! - Requests the ring cannot do alone (qcow2 allocation, backing-chain
//!   reads, discard, write-zeroes, get-id, buffers `O_DIRECT` cannot take)
//!   run synchronously, after everything in flight has completed, so no
//!   request overtakes one submitted before it.
//! - The device's one backend fd is an epoll fd holding the completion
//!   eventfd and the rate limiter's timer.
//! - Before a pause, a snapshot, a migration, a drive swap, a reset or the
//!   exit, [`Uring::wait_all`] waits for every request in flight.

use std::io;
use std::os::fd::{AsRawFd, RawFd};

use ember_memory::GuestMemoryMmap;
use io_uring::{opcode, register::Restriction, squeue, types, IoUring};
use vm_memory::bitmap::Bitmap;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::request::Request;

/// Submission queue entries per disk: the most requests in flight.
pub(crate) const RING_ENTRIES: u32 = 256;
/// The most buffers in one request the ring takes (`UIO_MAXIOV`).
const MAX_IOVECS: usize = 1024;

/// What an operation in flight does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum OpKind {
    /// File to guest memory.
    Read,
    /// Guest memory to file.
    Write,
    /// `fdatasync`.
    Flush,
}

impl OpKind {
    /// Its class, for counting bursts of failures.
    pub(crate) fn class(self) -> crate::device::IoClass {
        match self {
            OpKind::Read => crate::device::IoClass::Read,
            OpKind::Write => crate::device::IoClass::Write,
            OpKind::Flush => crate::device::IoClass::Flush,
        }
    }
}

/// A request the ring completed: the device writes its used element.
#[derive(Debug)]
pub(crate) struct Done {
    /// The queue it came from.
    pub(crate) queue: u16,
    /// Its chain's head.
    pub(crate) head: u16,
    /// Bytes written to the guest (data and status byte), 0 if the status
    /// byte could not be written.
    pub(crate) used_len: u32,
    /// What it did.
    pub(crate) kind: OpKind,
    /// Its data bytes.
    pub(crate) bytes: u64,
    /// The error, if it failed.
    pub(crate) error: Option<io::Error>,
    /// A failed request kept for a retry (its policy can stop the disk):
    /// its status byte is not written yet.
    pub(crate) req: Option<Request>,
}

/// One request in flight.
struct Op {
    queue: u16,
    head: u16,
    status: GuestAddress,
    kind: OpKind,
    bytes: u64,
    /// The guest buffers (guest address, length), to mark dirty after a read.
    regions: Vec<(GuestAddress, usize)>,
    /// The iovec array the submission points at: kept until completion.
    iovecs: Vec<libc::iovec>,
    /// The request, if a failure may stop the disk.
    req: Option<Request>,
}

// SAFETY: the iovec pointers point into guest memory, which the device's
// memory handle keeps mapped for the device's lifetime whichever thread
// holds the device; nothing about them is tied to a thread.
#[allow(unsafe_code)]
unsafe impl Send for Op {}

/// A request to submit: what [`Uring::submit`] takes.
pub(crate) struct Submission<'a> {
    pub(crate) queue: u16,
    pub(crate) head: u16,
    pub(crate) status: GuestAddress,
    pub(crate) kind: OpKind,
    /// The host file and the offset in it.
    pub(crate) fd: RawFd,
    pub(crate) offset: u64,
    /// The guest buffers, in order (empty for a flush).
    pub(crate) regions: &'a [(GuestAddress, usize)],
    /// The request, kept if it fails (its policy can stop the disk).
    pub(crate) keep: Option<&'a Request>,
}

/// A disk's io_uring, its completion eventfd and the epoll fd the event
/// loop watches.
pub(crate) struct Uring {
    ring: IoUring,
    eventfd: EventFd,
    epoll: Epoll,
    slots: Vec<Option<Op>>,
    free: Vec<usize>,
    in_flight: usize,
    submitted: u64,
    done: Vec<Done>,
}

impl std::fmt::Debug for Uring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Uring")
            .field("in_flight", &self.in_flight)
            .finish_non_exhaustive()
    }
}

impl Uring {
    /// Makes the ring (restricted to reads, writes and fsync) and the epoll
    /// fd holding its eventfd and `also` (the rate limiter's timer).
    pub(crate) fn new(also: Option<RawFd>) -> io::Result<Uring> {
        let ring = IoUring::builder().setup_r_disabled().build(RING_ENTRIES)?;
        let sub = ring.submitter();
        let drain = squeue::Flags::IO_DRAIN.bits();
        let eventfd = EventFd::new(EFD_NONBLOCK)?;
        sub.register_eventfd(eventfd.as_raw_fd())?;
        sub.register_restrictions(&mut [
            Restriction::sqe_op(opcode::Readv::CODE),
            Restriction::sqe_op(opcode::Writev::CODE),
            Restriction::sqe_op(opcode::Fsync::CODE),
            Restriction::sqe_flags_allowed(drain),
        ])?;
        // Once enabled, no register operation is allowed either (none is
        // listed): the eventfd went in first.
        sub.register_enable_rings()?;
        let epoll = Epoll::new()?;
        for fd in std::iter::once(eventfd.as_raw_fd()).chain(also) {
            epoll.ctl(
                ControlOperation::Add,
                fd,
                EpollEvent::new(EventSet::IN, u64::try_from(fd).unwrap_or(0)),
            )?;
        }
        let slots = usize::try_from(RING_ENTRIES).unwrap_or(256);
        Ok(Uring {
            ring,
            eventfd,
            epoll,
            slots: (0..slots).map(|_| None).collect(),
            free: (0..slots).rev().collect(),
            in_flight: 0,
            submitted: 0,
            done: Vec::new(),
        })
    }

    /// The fd the event loop watches: readable when a request completed or
    /// the rate limiter's timer fired.
    pub(crate) fn fd(&self) -> RawFd {
        self.epoll.as_raw_fd()
    }

    /// Whether no more requests can be submitted until some complete.
    pub(crate) fn is_full(&self) -> bool {
        self.free.is_empty()
    }

    /// Requests submitted so far.
    pub(crate) fn submitted(&self) -> u64 {
        self.submitted
    }

    /// Requests in flight.
    pub(crate) fn in_flight(&self) -> usize {
        self.in_flight
    }

    /// Submits a request. False (and nothing submitted) when it has too
    /// many buffers for one submission or the ring is full: the caller
    /// runs it itself.
    pub(crate) fn submit(&mut self, s: &Submission<'_>, mem: &GuestMemoryMmap) -> io::Result<bool> {
        if s.regions.len() > MAX_IOVECS {
            return Ok(false);
        }
        let Some(slot) = self.free.last().copied() else {
            return Ok(false);
        };
        let mut iovecs = Vec::with_capacity(s.regions.len());
        let mut bytes = 0u64;
        for &(addr, len) in s.regions {
            for slice in mem.get_slices(addr, len) {
                let slice = slice.map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
                let guard = slice.ptr_guard_mut();
                iovecs.push(libc::iovec {
                    iov_base: guard.as_ptr().cast(),
                    iov_len: slice.len(),
                });
                bytes += u64::try_from(slice.len()).unwrap_or(u64::MAX);
            }
        }
        if iovecs.len() > MAX_IOVECS {
            return Ok(false);
        }
        let fd = types::Fd(s.fd);
        let n = u32::try_from(iovecs.len()).unwrap_or(u32::MAX);
        let user_data = u64::try_from(slot).unwrap_or(u64::MAX);
        let entry = match s.kind {
            OpKind::Read => opcode::Readv::new(fd, iovecs.as_ptr(), n)
                .offset(s.offset)
                .build(),
            OpKind::Write => opcode::Writev::new(fd, iovecs.as_ptr(), n)
                .offset(s.offset)
                .build(),
            OpKind::Flush => opcode::Fsync::new(fd)
                .flags(types::FsyncFlags::DATASYNC)
                .build()
                .flags(squeue::Flags::IO_DRAIN),
        }
        .user_data(user_data);
        // SAFETY: the entry's iovec array lives in the slot's `Op` until
        // its completion is reaped (moving the Vec into the slot does not
        // move its heap buffer), and each iovec points into guest memory,
        // which stays mapped while the device holds `mem`'s regions (the
        // device waits for every request before it lets the memory go).
        // The kernel writes only inside the iovecs of a read.
        #[allow(unsafe_code)]
        let pushed = unsafe { self.ring.submission().push(&entry) };
        if pushed.is_err() {
            return Ok(false);
        }
        self.free.pop();
        self.slots[slot] = Some(Op {
            queue: s.queue,
            head: s.head,
            status: s.status,
            kind: s.kind,
            bytes,
            regions: s.regions.to_vec(),
            iovecs,
            req: s.keep.cloned(),
        });
        self.in_flight += 1;
        self.submitted += 1;
        // Sent to the kernel with the pass's others ([`Uring::flush`]).
        Ok(true)
    }

    /// Sends the entries queued so far to the kernel in one system call,
    /// then takes the completions already posted (page-cache hits complete
    /// during the call).
    pub(crate) fn flush(&mut self, mem: &GuestMemoryMmap) {
        if self.ring.submission().is_empty() {
            return;
        }
        // The entries stay queued if this fails (EBUSY, EINTR): the next
        // submit or wait sends them.
        if let Err(e) = self.ring.submit() {
            log::debug!("io_uring submit: {e} (sent with the next one)");
        }
        self.reap(mem);
    }

    /// Takes the completions the kernel posted (without waiting), writes
    /// their status bytes and marks read buffers dirty; they are then in
    /// [`Uring::take_done`].
    pub(crate) fn reap(&mut self, mem: &GuestMemoryMmap) {
        // Empty the eventfd first: a completion after this wakes us again.
        let _ = self.eventfd.read();
        let mut cq = self.ring.completion();
        cq.sync();
        let completed: Vec<(u64, i32)> = cq.map(|c| (c.user_data(), c.result())).collect();
        for (user_data, result) in completed {
            let Some(op) = usize::try_from(user_data)
                .ok()
                .and_then(|i| self.slots.get_mut(i).map(|s| (i, s.take())))
                .and_then(|(i, op)| op.map(|op| (i, op)))
            else {
                continue;
            };
            let (slot, op) = op;
            self.free.push(slot);
            self.in_flight -= 1;
            self.done.push(finish(op, result, mem));
        }
    }

    /// Waits until nothing is in flight (every completion reaped).
    pub(crate) fn wait_all(&mut self, mem: &GuestMemoryMmap) -> io::Result<()> {
        while self.in_flight > 0 {
            match self.ring.submit_and_wait(1) {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
            self.reap(mem);
        }
        Ok(())
    }

    /// The requests completed since the last call.
    pub(crate) fn take_done(&mut self) -> Vec<Done> {
        std::mem::take(&mut self.done)
    }
}

/// Ends a request: its status byte (OK only if every byte moved), its dirty
/// pages, its used element.
fn finish(op: Op, result: i32, mem: &GuestMemoryMmap) -> Done {
    let error = match u64::try_from(result) {
        Err(_) => Some(io::Error::from_raw_os_error(-result)),
        Ok(n) if op.kind != OpKind::Flush && n != op.bytes => Some(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            format!("{n} of {} bytes moved", op.bytes),
        )),
        Ok(_) => None,
    };
    if op.kind == OpKind::Read && error.is_none() {
        for &(addr, len) in &op.regions {
            for slice in mem.get_slices(addr, len).flatten() {
                slice.bitmap().mark_dirty(0, slice.len());
            }
        }
    }
    let status = if error.is_none() {
        crate::device::status_byte(virtio_bindings::virtio_blk::VIRTIO_BLK_S_OK)
    } else {
        crate::device::status_byte(virtio_bindings::virtio_blk::VIRTIO_BLK_S_IOERR)
    };
    let data = if op.kind == OpKind::Read && error.is_none() {
        u32::try_from(op.bytes).unwrap_or(u32::MAX)
    } else {
        0
    };
    drop(op.iovecs);
    // Kept for a retry: the device decides, and writes the status then.
    let req = op.req.filter(|_| error.is_some());
    let used_len = if req.is_some() {
        0
    } else {
        match mem.write_obj(status, op.status) {
            Ok(()) => data.saturating_add(1),
            Err(_) => 0,
        }
    };
    Done {
        queue: op.queue,
        head: op.head,
        used_len,
        kind: op.kind,
        bytes: op.bytes,
        error,
        req,
    }
}

// Test code on 64-bit hosts: the sizes fit in usize, the patterns are bytes.
#[cfg(test)]
#[allow(clippy::cast_possible_truncation)]
mod tests {
    use std::os::unix::fs::FileExt;
    use std::sync::Arc;

    use ember_virtio::{ActivateContext, VirtioDevice};
    use virtio_bindings::virtio_blk::{
        VIRTIO_BLK_S_OK, VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_IN,
        VIRTIO_BLK_T_OUT,
    };
    use vm_memory::{Bytes, GuestAddress};
    use vmm_sys_util::tempfile::TempFile;

    use crate::test_utils::{desc, guest_memory, header, CountingInterrupt, TestQueue, R, W};
    use crate::{Block, BlockConfig, CacheMode, ImageFormat, IoEngine};

    const SIZE: u64 = 1 << 20;
    /// Requests per run; each has its header, data and status apart.
    const N: u64 = 24;

    fn hdr(i: u64) -> u64 {
        0x1_0000 + 32 * i
    }
    fn status(i: u64) -> u64 {
        0x1_8000 + i
    }
    /// Data buffers 4 KiB apart; `skew` moves them off the 512-byte grid.
    fn data(i: u64, skew: u64) -> u64 {
        0x10_0000 + 0x2000 * i + skew
    }

    /// The same mixed workload on a fresh image, run by the engine and
    /// cache mode given: 12 writes of 4 KiB (two discontiguous buffers
    /// each), a flush, a discard, then 11 reads, spread over two queues in
    /// one notification each. Returns the image bytes, the guest's read
    /// buffers, the statuses, and the used lengths by queue.
    fn run(io: IoEngine, cache: CacheMode, format: ImageFormat, skew: u64) -> Run {
        let img = TempFile::new().unwrap();
        let path = img.as_path().to_path_buf();
        if format == ImageFormat::Qcow2 {
            std::fs::remove_file(&path).unwrap();
            let opts = ember_qcow2::CreateOptions {
                size: SIZE,
                ..Default::default()
            };
            ember_qcow2::create(&path, &opts).unwrap();
            // Half the disk allocated beforehand: those writes take the ring.
            let mut q = ember_qcow2::Qcow2::open(&path, false).unwrap();
            q.write_at(&vec![0x11; (SIZE / 2) as usize], 0).unwrap();
            q.flush().unwrap();
        } else {
            img.as_file()
                .write_all_at(&vec![0x11; (SIZE / 2) as usize], 0)
                .unwrap();
            img.as_file().set_len(SIZE).unwrap();
        }
        let mut block = Block::new(&BlockConfig {
            num_queues: 2,
            io,
            cache,
            ..BlockConfig::new(&path, format, false)
        })
        .unwrap();
        assert_eq!(block.io_engine(), io);
        let mem = guest_memory();
        let mut q0 = TestQueue::at(&mem, 64, 0x2000);
        let mut q1 = TestQueue::at(&mem, 64, 0x8000);
        let irq = Arc::new(CountingInterrupt::default());
        block
            .activate(ActivateContext {
                mem: mem.clone(),
                interrupt: irq.clone(),
                queues: vec![q0.queue(), q1.queue()],
                acked_features: block.avail_features() & !(1 << 29),
            })
            .unwrap();
        for i in 0..N {
            let q = if i % 2 == 0 { &mut q0 } else { &mut q1 };
            // Sectors spread over both halves of the disk.
            let sector = (i * 37 % 250) * 8;
            let (t, flags) = match i {
                12 => (VIRTIO_BLK_T_FLUSH, None),
                13 => (VIRTIO_BLK_T_DISCARD, None),
                _ if i < 12 => (VIRTIO_BLK_T_OUT, Some(R)),
                _ => (VIRTIO_BLK_T_IN, Some(W)),
            };
            header(&mem, hdr(i), t, sector);
            match flags {
                Some(f) => {
                    if f == R {
                        let bytes: Vec<u8> = (0..4096u64).map(|b| (b * 7 + i) as u8).collect();
                        mem.write_slice(&bytes, GuestAddress(data(i, skew)))
                            .unwrap();
                    }
                    q.add(&[
                        desc(hdr(i), 16, R),
                        desc(data(i, skew), 1024, f),
                        desc(data(i, skew) + 1024, 3072, f),
                        desc(status(i), 1, W),
                    ]);
                }
                None if t == VIRTIO_BLK_T_DISCARD => {
                    // One segment: 8 sectors at sector 16.
                    let mut seg = [0u8; 16];
                    seg[..8].copy_from_slice(&16u64.to_le_bytes());
                    seg[8..12].copy_from_slice(&8u32.to_le_bytes());
                    mem.write_slice(&seg, GuestAddress(data(i, 0))).unwrap();
                    q.add(&[
                        desc(hdr(i), 16, R),
                        desc(data(i, 0), 16, R),
                        desc(status(i), 1, W),
                    ]);
                }
                None => q.add(&[desc(hdr(i), 16, R), desc(status(i), 1, W)]),
            }
            // The writes go in one notification, then each later request
            // alone (so the flush and discard come after the writes).
            if i >= 11 {
                block.process_queue(0);
                block.process_queue(1);
            }
        }
        // Completions come back through the backend fd, as on the loop.
        let fd = block.backend_fd().unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while q0.used().len() + q1.used().len() < N as usize {
            assert!(std::time::Instant::now() < deadline, "completions arrive");
            let mut p = libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd, for the call only.
            #[allow(unsafe_code)]
            unsafe {
                libc::poll(&mut p, 1, 100)
            };
            block.process_backend();
        }
        let ring = block.io_uring_submitted();
        match (io, format, skew) {
            (IoEngine::Sync, ..) => assert_eq!(ring, 0),
            // All but the discard; the skewed buffers bounce instead.
            (IoEngine::IoUring, ImageFormat::Raw, 0) => assert_eq!(ring, N - 1),
            (IoEngine::IoUring, ImageFormat::Raw, _) => assert_eq!(ring, 1, "the flush"),
            // Requests on the allocated half, not the flush (qcow2 syncs
            // its refcounts too).
            (IoEngine::IoUring, ImageFormat::Qcow2, _) => {
                assert!(ring > 4 && ring < N - 4, "{ring}")
            }
        }
        let mut image = vec![0u8; SIZE as usize];
        if format == ImageFormat::Qcow2 {
            drop(block);
            let mut q = ember_qcow2::Qcow2::open(&path, true).unwrap();
            q.read_at(&mut image, 0).unwrap();
        } else {
            block.flush().unwrap();
            img.as_file().read_exact_at(&mut image, 0).unwrap();
        }
        let reads = (12..N)
            .filter(|&i| i > 13)
            .map(|i| {
                let mut v = vec![0u8; 4096];
                mem.read_slice(&mut v, GuestAddress(data(i, skew))).unwrap();
                v
            })
            .collect();
        let statuses = (0..N)
            .map(|i| mem.read_obj::<u8>(GuestAddress(status(i))).unwrap())
            .collect();
        let mut used = [q0.used(), q1.used()].map(|mut u| {
            u.sort_unstable();
            u
        });
        used.sort();
        Run {
            image,
            reads,
            statuses,
            used: used.to_vec(),
        }
    }

    #[derive(Debug, PartialEq)]
    struct Run {
        image: Vec<u8>,
        reads: Vec<Vec<u8>>,
        statuses: Vec<u8>,
        used: Vec<Vec<(u32, u32)>>,
    }

    #[test]
    fn io_uring_and_sync_leave_the_same_image_guest_buffers_and_used_rings() {
        let ok = u8::try_from(VIRTIO_BLK_S_OK).unwrap();
        for format in [ImageFormat::Raw, ImageFormat::Qcow2] {
            let sync = run(IoEngine::Sync, CacheMode::Writeback, format, 0);
            assert!(sync.statuses.iter().all(|&s| s == ok), "{format:?}");
            assert!(
                sync.image[..SIZE as usize / 2].iter().any(|&b| b != 0x11),
                "the writes landed"
            );
            let uring = run(IoEngine::IoUring, CacheMode::Writeback, format, 0);
            assert_eq!(sync, uring, "{format:?}: io_uring gives what sync gives");
        }
        // Direct I/O, aligned buffers (to the ring) and buffers 8 bytes
        // off the grid (bounced), with both engines.
        let reference = run(IoEngine::Sync, CacheMode::Writeback, ImageFormat::Raw, 8);
        for io in [IoEngine::Sync, IoEngine::IoUring] {
            for skew in [0, 8] {
                let direct = run(io, CacheMode::None, ImageFormat::Raw, skew);
                let want = if skew == 8 {
                    &reference
                } else {
                    &run(IoEngine::Sync, CacheMode::Writeback, ImageFormat::Raw, 0)
                };
                assert_eq!(&direct, want, "cache=none {io} skew {skew}");
            }
        }
    }

    #[test]
    fn cache_none_on_qcow2_is_refused_by_name() {
        let img = TempFile::new().unwrap();
        std::fs::remove_file(img.as_path()).unwrap();
        let opts = ember_qcow2::CreateOptions {
            size: SIZE,
            ..Default::default()
        };
        ember_qcow2::create(img.as_path(), &opts).unwrap();
        let err = Block::new(&BlockConfig {
            cache: CacheMode::None,
            ..BlockConfig::new(img.as_path(), ImageFormat::Qcow2, false)
        })
        .unwrap_err();
        assert!(
            err.to_string().contains("cache=none on a qcow2 image"),
            "{err}"
        );
    }

    #[test]
    fn the_ring_refuses_operations_it_was_not_made_for() {
        let mut u = super::Uring::new(None).unwrap();
        // An openat through the ring would bypass seccomp: restricted away.
        let path = c"/etc/hostname";
        let e = io_uring::opcode::OpenAt::new(io_uring::types::Fd(libc::AT_FDCWD), path.as_ptr())
            .build()
            .user_data(7);
        // SAFETY: the path outlives the call; no buffers.
        #[allow(unsafe_code)]
        unsafe {
            u.ring.submission().push(&e).unwrap();
        }
        u.ring.submit_and_wait(1).unwrap();
        let c = u.ring.completion().next().unwrap();
        assert_eq!(c.user_data(), 7);
        assert_eq!(c.result(), -libc::EACCES, "restricted opcode refused");
    }
}
