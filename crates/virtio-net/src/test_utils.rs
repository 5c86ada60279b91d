//! Test helpers: guest memory, hand-built split queues, a counting
//! interrupt, an in-memory backend and a random number generator.

use std::collections::VecDeque;
use std::io;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use ember_memory::GuestMemoryMmap;
use ember_virtio::{InterruptKind, VirtioInterrupt};
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};

use crate::backend::NetBackend;

/// Guest memory size of [`guest_memory`].
pub const MEM_SIZE: usize = 4 << 20;
/// The end of guest memory.
pub const MEM_END: u64 = MEM_SIZE as u64;
/// Where the receive queue's rings go.
pub const RX_RING: u64 = 0;
/// Where the transmit queue's rings go.
pub const TX_RING: u64 = 0x4000;
/// Where tests put frame buffers.
pub const DATA: u64 = 0x1_0000;
/// Descriptor flags: device-readable.
pub const R: u16 = 0;
pub use flags::{INDIRECT, NEXT, W};

/// The virtio-bindings descriptor flags (u32 constants) as the u16 a
/// descriptor holds; they are 1, 2 and 4, so the casts are exact.
#[allow(clippy::cast_possible_truncation)]
mod flags {
    use virtio_bindings::virtio_ring::{
        VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE,
    };

    /// Descriptor flags: device-writable.
    pub const W: u16 = VRING_DESC_F_WRITE as u16;
    /// Descriptor flags: chained.
    pub const NEXT: u16 = VRING_DESC_F_NEXT as u16;
    /// Descriptor flags: an indirect table.
    pub const INDIRECT: u16 = VRING_DESC_F_INDIRECT as u16;
}

pub fn guest_memory() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap()
}

/// A descriptor; NEXT and `next` are filled in by whoever chains it.
pub fn desc(addr: u64, len: u32, flags: u16) -> RawDescriptor {
    RawDescriptor::from(SplitDescriptor::new(addr, len, flags, 0))
}

pub fn guest_bytes(mem: &GuestMemoryMmap, addr: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0; len];
    mem.read_slice(&mut v, GuestAddress(addr)).unwrap();
    v
}

/// A driver-side split queue at `base` that chains are added to one after
/// another: descriptor table, then the available ring, then the used ring,
/// all within 0x2000 bytes for queues of up to 256 entries.
///
/// Not `MockSplitQueue`: its ring layout sizes the available ring by entry
/// count rather than bytes, so the used ring overlaps available entries
/// from `size / 2` on, which a device writing its used ring then clobbers.
pub struct TestQueue<'a> {
    mem: &'a GuestMemoryMmap,
    base: u64,
    size: u16,
    next_desc: u16,
    avail_idx: u16,
}

impl<'a> TestQueue<'a> {
    pub fn new(mem: &'a GuestMemoryMmap, base: u64, size: u16) -> Self {
        assert!(size <= 256);
        mem.write_slice(&[0; 0x2000], GuestAddress(base)).unwrap();
        TestQueue {
            mem,
            base,
            size,
            next_desc: 0,
            avail_idx: 0,
        }
    }

    pub fn avail_addr(&self) -> u64 {
        self.base + 16 * u64::from(self.size)
    }

    pub fn used_addr(&self) -> u64 {
        (self.avail_addr() + 6 + 2 * u64::from(self.size) + 3) & !3
    }

    /// Writes descriptor `index` as is.
    pub fn store(&self, index: u16, d: RawDescriptor) {
        self.mem
            .write_obj(d, GuestAddress(self.base + 16 * u64::from(index)))
            .unwrap();
    }

    /// Writes `head` into available-ring entry `slot`.
    pub fn set_avail_entry(&self, slot: u16, head: u16) {
        let addr = self.avail_addr() + 4 + 2 * u64::from(slot % self.size);
        self.mem.write_obj(head, GuestAddress(addr)).unwrap();
    }

    /// Sets the available ring's index.
    pub fn set_avail_idx(&mut self, idx: u16) {
        self.avail_idx = idx;
        self.mem
            .write_obj(idx, GuestAddress(self.avail_addr() + 2))
            .unwrap();
    }

    /// Makes the chain at `head` available.
    pub fn publish(&mut self, head: u16) {
        self.set_avail_entry(self.avail_idx, head);
        self.set_avail_idx(self.avail_idx.wrapping_add(1));
    }

    /// Adds one chain made of `descs` (their NEXT flags and `next` fields
    /// are set here) and makes it available; returns its head.
    pub fn add(&mut self, descs: &[RawDescriptor]) -> u16 {
        let n = u16::try_from(descs.len()).unwrap();
        let head = self.next_desc;
        for (i, d) in descs.iter().enumerate() {
            let d = SplitDescriptor::from(*d);
            let i = u16::try_from(i).unwrap();
            let (flags, next) = if i + 1 < n {
                (d.flags() | NEXT, (head + i + 1) % self.size)
            } else {
                (d.flags() & !NEXT, 0)
            };
            let d = SplitDescriptor::new(d.addr().0, d.len(), flags, next);
            self.store((head + i) % self.size, RawDescriptor::from(d));
        }
        self.next_desc = (self.next_desc + n) % self.size;
        self.publish(head);
        head
    }

    /// A device-side queue on these rings, as a transport would hand it over.
    pub fn queue(&self) -> Queue {
        let mut q = Queue::new(self.size).unwrap();
        q.try_set_size(self.size).unwrap();
        q.try_set_desc_table_address(GuestAddress(self.base))
            .unwrap();
        q.try_set_avail_ring_address(GuestAddress(self.avail_addr()))
            .unwrap();
        q.try_set_used_ring_address(GuestAddress(self.used_addr()))
            .unwrap();
        q.set_ready(true);
        assert!(q.is_valid(self.mem));
        q
    }

    /// The used ring's index.
    pub fn used_idx(&self) -> u16 {
        self.mem
            .read_obj(GuestAddress(self.used_addr() + 2))
            .unwrap()
    }

    /// The used ring: (head, len) of each used element.
    pub fn used(&self) -> Vec<(u32, u32)> {
        (0..self.used_idx())
            .map(|i| {
                let at = self.used_addr() + 4 + 8 * u64::from(i % self.size);
                let id: u32 = self.mem.read_obj(GuestAddress(at)).unwrap();
                let len: u32 = self.mem.read_obj(GuestAddress(at + 4)).unwrap();
                (id, len)
            })
            .collect()
    }
}

/// An interrupt that counts its triggers per queue.
#[derive(Debug, Default)]
pub struct CountingInterrupt {
    counts: [AtomicUsize; 8],
    config: AtomicUsize,
}

impl CountingInterrupt {
    /// How often queue `index` was signalled.
    pub fn count(&self, index: usize) -> usize {
        self.counts[index].load(Ordering::SeqCst)
    }

    /// How often the configuration-change interrupt was raised.
    pub fn config_count(&self) -> usize {
        self.config.load(Ordering::SeqCst)
    }
}

impl VirtioInterrupt for CountingInterrupt {
    fn trigger(&self, kind: InterruptKind) -> io::Result<()> {
        match kind {
            InterruptKind::Queue(i) => self.counts[usize::from(i)].fetch_add(1, Ordering::SeqCst),
            InterruptKind::Config => self.config.fetch_add(1, Ordering::SeqCst),
        };
        Ok(())
    }
}

/// What a [`MemBackend`] read gives next.
#[derive(Debug)]
pub enum Incoming {
    Frame(Vec<u8>),
    Error(io::ErrorKind),
}

/// What a [`MemBackend`] shares with the test that made it.
#[derive(Debug, Default)]
pub struct MemState {
    /// Frames (and errors) for the device to read, in order; then
    /// `WouldBlock`.
    pub incoming: Mutex<VecDeque<Incoming>>,
    /// Frames the device wrote.
    pub sent: Mutex<Vec<Vec<u8>>>,
    /// The error every write fails with, if any.
    pub write_error: Mutex<Option<io::ErrorKind>>,
    /// Every `set_offload` argument.
    pub offloads: Mutex<Vec<u32>>,
    /// Whether `set_offload` fails.
    pub offload_fails: Mutex<bool>,
    /// Reads attempted.
    pub reads: AtomicUsize,
    /// Of those, reads straight into guest buffers (`read_vectored`).
    pub vectored_reads: AtomicUsize,
    /// The queue was detached (`set_queue_enabled(false)`): reads and
    /// writes fail with `EBADFD`, as a detached tap queue's do.
    pub detached: AtomicBool,
    /// Every `set_queue_enabled` argument.
    pub queue_calls: Mutex<Vec<bool>>,
}

impl MemState {
    pub fn push_frame(&self, frame: Vec<u8>) {
        self.incoming
            .lock()
            .unwrap()
            .push_back(Incoming::Frame(frame));
    }

    pub fn push_error(&self, kind: io::ErrorKind) {
        self.incoming
            .lock()
            .unwrap()
            .push_back(Incoming::Error(kind));
    }

    pub fn waiting(&self) -> usize {
        self.incoming.lock().unwrap().len()
    }

    pub fn sent(&self) -> Vec<Vec<u8>> {
        self.sent.lock().unwrap().clone()
    }
}

/// Frames in memory, for tests.
#[derive(Debug)]
pub struct MemBackend(pub Arc<MemState>);

impl MemBackend {
    pub fn new() -> (MemBackend, Arc<MemState>) {
        let state = Arc::new(MemState::default());
        (MemBackend(state.clone()), state)
    }
}

impl NetBackend for MemBackend {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.0.reads.fetch_add(1, Ordering::SeqCst);
        if self.0.detached.load(Ordering::SeqCst) {
            return Err(io::Error::from_raw_os_error(libc::EBADFD));
        }
        match self.0.incoming.lock().unwrap().pop_front() {
            None => Err(io::ErrorKind::WouldBlock.into()),
            Some(Incoming::Error(kind)) => Err(kind.into()),
            Some(Incoming::Frame(f)) => {
                let n = f.len().min(buf.len());
                buf[..n].copy_from_slice(&f[..n]);
                Ok(n)
            }
        }
    }

    /// As the default (a read into a buffer, then copied), counted.
    fn read_vectored(&mut self, bufs: &[ember_memory::Slice<'_>]) -> io::Result<usize> {
        self.0.vectored_reads.fetch_add(1, Ordering::SeqCst);
        let mut frame = vec![0u8; bufs.iter().map(|s| s.len()).sum()];
        let n = self.read(&mut frame)?;
        let mut at = 0;
        for s in bufs {
            let k = s.len().min(n - at);
            s.copy_from(&frame[at..at + k]);
            at += k;
        }
        Ok(n)
    }

    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.0.detached.load(Ordering::SeqCst) {
            return Err(io::Error::from_raw_os_error(libc::EBADFD));
        }
        if let Some(kind) = *self.0.write_error.lock().unwrap() {
            return Err(kind.into());
        }
        self.0.sent.lock().unwrap().push(buf.to_vec());
        Ok(buf.len())
    }

    fn set_offload(&mut self, flags: u32) -> io::Result<()> {
        self.0.offloads.lock().unwrap().push(flags);
        if *self.0.offload_fails.lock().unwrap() {
            return Err(io::ErrorKind::InvalidInput.into());
        }
        Ok(())
    }

    fn raw_fd(&self) -> Option<RawFd> {
        None
    }

    fn set_queue_enabled(&mut self, on: bool) -> io::Result<()> {
        self.0.queue_calls.lock().unwrap().push(on);
        if self.0.detached.load(Ordering::SeqCst) != on {
            return Err(io::Error::from_raw_os_error(libc::EINVAL));
        }
        self.0.detached.store(!on, Ordering::SeqCst);
        Ok(())
    }
}

/// A deterministic xorshift64 generator.
pub struct XorShift(pub u64);

impl XorShift {
    pub fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    /// A value below `n`.
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    pub fn below_u16(&mut self, n: u16) -> u16 {
        u16::try_from(self.below(u64::from(n))).unwrap()
    }

    pub fn below_u32(&mut self, n: u32) -> u32 {
        u32::try_from(self.below(u64::from(n))).unwrap()
    }

    pub fn below_usize(&mut self, n: usize) -> usize {
        usize::try_from(self.below(n as u64)).unwrap()
    }

    pub fn u32(&mut self) -> u32 {
        u32::try_from(self.next() >> 32).unwrap()
    }
}
