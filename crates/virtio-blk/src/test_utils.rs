//! Test helpers: guest memory, hand-built descriptor chains, a counting
//! interrupt and an in-memory backend.

use std::io;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use ember_memory::GuestMemoryMmap;
use ember_memory::Slice;
use ember_virtio::{InterruptKind, VirtioInterrupt};
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};

use crate::backend::BlockBackend;

/// Guest memory size of [`guest_memory`].
pub const MEM_SIZE: usize = 4 << 20;
/// Where tests put request headers.
pub const HDR: u64 = 0x1_0000;
/// Where tests put status bytes.
pub const STATUS: u64 = 0x1_8000;
/// Where tests put data buffers.
pub const DATA: u64 = 0x10_0000;
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

/// Writes a request header at `addr`.
pub fn header(mem: &GuestMemoryMmap, addr: u64, request_type: u32, sector: u64) {
    let mut h = [0u8; 16];
    h[..4].copy_from_slice(&request_type.to_le_bytes());
    h[8..].copy_from_slice(&sector.to_le_bytes());
    mem.write_slice(&h, GuestAddress(addr)).unwrap();
}

/// Writes an indirect table of `(addr, len, flags)` entries, chained in
/// order, at `table`, and returns the descriptor that points at it.
pub fn indirect(mem: &GuestMemoryMmap, table: u64, entries: &[(u64, u32, u16)]) -> RawDescriptor {
    for (i, (addr, len, flags)) in entries.iter().enumerate() {
        let i16 = u16::try_from(i).unwrap();
        let (flags, next) = if i + 1 < entries.len() {
            (flags | NEXT, i16 + 1)
        } else {
            (*flags, 0)
        };
        let d = RawDescriptor::from(SplitDescriptor::new(*addr, *len, flags, next));
        mem.write_obj(d, GuestAddress(table + 16 * i as u64))
            .unwrap();
    }
    let len = u32::try_from(16 * entries.len()).unwrap();
    desc(table, len, INDIRECT)
}

/// A driver-side split queue that chains are added to one after another:
/// descriptor table at 0, then the available ring, then the used ring, all
/// below 0x1000 for queues of up to 64 entries.
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
    pub fn new(mem: &'a GuestMemoryMmap, size: u16) -> Self {
        Self::at(mem, size, 0)
    }

    /// A queue whose rings start at `base` instead of 0 (a second queue
    /// of a multiqueue device: 0x1000 up to 0xf000).
    pub fn at(mem: &'a GuestMemoryMmap, size: u16, base: u64) -> Self {
        assert!(size <= 64 && base % 0x1000 == 0 && base < HDR);
        mem.write_slice(&[0; 0x1000], GuestAddress(base)).unwrap();
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
    /// are set here) and makes it available.
    pub fn add(&mut self, descs: &[RawDescriptor]) {
        let n = u16::try_from(descs.len()).unwrap();
        let head = self.next_desc;
        for (i, d) in descs.iter().enumerate() {
            let d = SplitDescriptor::from(*d);
            let i = u16::try_from(i).unwrap();
            let (flags, next) = if i + 1 < n {
                (d.flags() | NEXT, head + i + 1)
            } else {
                (d.flags() & !NEXT, 0)
            };
            let d = SplitDescriptor::new(d.addr().0, d.len(), flags, next);
            self.store(head + i, RawDescriptor::from(d));
        }
        self.next_desc += n;
        self.publish(head);
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

/// An interrupt that counts its triggers.
#[derive(Debug, Default)]
pub struct CountingInterrupt {
    count: AtomicUsize,
    kinds: Mutex<Vec<InterruptKind>>,
}

impl CountingInterrupt {
    pub fn count(&self) -> usize {
        self.count.load(Ordering::SeqCst)
    }

    /// Every interrupt so far, in order.
    pub fn kinds(&self) -> Vec<InterruptKind> {
        self.kinds.lock().unwrap().clone()
    }
}

impl VirtioInterrupt for CountingInterrupt {
    fn trigger(&self, kind: InterruptKind) -> io::Result<()> {
        assert!(matches!(kind, InterruptKind::Queue(_)), "{kind:?}");
        self.count.fetch_add(1, Ordering::SeqCst);
        self.kinds.lock().unwrap().push(kind);
        Ok(())
    }
}

/// What a [`MemBackend`] shares with the test that made it.
#[derive(Debug, Default)]
pub struct MemState {
    pub data: Mutex<Vec<u8>>,
    pub flushes: AtomicUsize,
    pub ops: AtomicUsize,
    pub largest_io: AtomicUsize,
    /// While set, writes, flushes, discards and write-zeroes fail with this
    /// errno (a host fault).
    pub write_fault: Mutex<Option<i32>>,
    /// While set, reads fail with this errno.
    pub read_fault: Mutex<Option<i32>>,
}

impl MemState {
    /// Writes fail with `errno` from now on (`None`: they work again).
    pub fn fail_writes(&self, errno: Option<i32>) {
        *self.write_fault.lock().unwrap() = errno;
    }

    /// Reads fail with `errno` from now on (`None`: they work again).
    pub fn fail_reads(&self, errno: Option<i32>) {
        *self.read_fault.lock().unwrap() = errno;
    }
}

/// A disk in a `Vec`, for tests.
#[derive(Debug)]
pub struct MemBackend(pub Arc<MemState>);

impl MemBackend {
    pub fn new(size: usize) -> (MemBackend, Arc<MemState>) {
        let state = Arc::new(MemState {
            data: Mutex::new(vec![0; size]),
            ..MemState::default()
        });
        (MemBackend(state.clone()), state)
    }

    /// The injected fault, if one is set for this direction.
    fn fault(&self, write: bool) -> io::Result<()> {
        let f = if write {
            &self.0.write_fault
        } else {
            &self.0.read_fault
        };
        match *f.lock().unwrap() {
            Some(errno) => Err(io::Error::from_raw_os_error(errno)),
            None => Ok(()),
        }
    }

    fn range(&self, offset: u64, len: usize) -> io::Result<std::ops::Range<usize>> {
        self.0.ops.fetch_add(1, Ordering::SeqCst);
        self.0.largest_io.fetch_max(len, Ordering::SeqCst);
        let size = self.0.data.lock().unwrap().len();
        let start = usize::try_from(offset).map_err(|_| io::ErrorKind::InvalidInput)?;
        match start.checked_add(len) {
            Some(end) if end <= size => Ok(start..end),
            _ => Err(io::ErrorKind::UnexpectedEof.into()),
        }
    }
}

impl BlockBackend for MemBackend {
    fn size(&self) -> u64 {
        self.0.data.lock().unwrap().len() as u64
    }

    fn read_at(&mut self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.fault(false)?;
        let r = self.range(offset, buf.len())?;
        buf.copy_from_slice(&self.0.data.lock().unwrap()[r]);
        Ok(())
    }

    fn write_at(&mut self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.fault(true)?;
        let r = self.range(offset, buf.len())?;
        self.0.data.lock().unwrap()[r].copy_from_slice(buf);
        Ok(())
    }

    /// One backend call for all of `bufs`, as a file's `preadv` would be.
    fn read_vectored_at(&mut self, bufs: &[Slice<'_>], offset: u64) -> io::Result<()> {
        self.fault(false)?;
        let total = bufs.iter().map(|s| s.len()).sum();
        let r = self.range(offset, total)?;
        let data = self.0.data.lock().unwrap();
        let mut at = r.start;
        for s in bufs {
            s.copy_from(&data[at..at + s.len()]);
            at += s.len();
        }
        Ok(())
    }

    /// One backend call for all of `bufs`, as a file's `pwritev` would be.
    fn write_vectored_at(&mut self, bufs: &[Slice<'_>], offset: u64) -> io::Result<()> {
        self.fault(true)?;
        let total = bufs.iter().map(|s| s.len()).sum();
        let r = self.range(offset, total)?;
        let mut data = self.0.data.lock().unwrap();
        let mut at = r.start;
        for s in bufs {
            s.copy_to(&mut data[at..at + s.len()]);
            at += s.len();
        }
        Ok(())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.fault(true)?;
        self.0.flushes.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }

    fn discard(&mut self, offset: u64, len: u64) -> io::Result<()> {
        self.write_zeroes(offset, len)
    }

    fn write_zeroes(&mut self, offset: u64, len: u64) -> io::Result<()> {
        self.fault(true)?;
        let len = usize::try_from(len).map_err(|_| io::ErrorKind::InvalidInput)?;
        let r = self.range(offset, len)?;
        self.0.data.lock().unwrap()[r].fill(0);
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

    pub fn u32(&mut self) -> u32 {
        u32::try_from(self.next() >> 32).unwrap()
    }
}
