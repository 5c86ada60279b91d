//! `virtio_blk_request`: a guest memory image with a descriptor table and
//! rings, and a few driver actions, against a virtio-blk device on an
//! in-memory disk or a raw image file.
//!
//! Input: [`BlkHeader`], a section of operations ([`op`]; one notification
//! when empty), then the memory image (see [`crate::guest::guest_memory`]).
//!
//! The disk checks the device's side of the [`BlockBackend`] contract: no
//! I/O past the end of the disk, no write to a read-only disk, no transfer
//! larger than [`IO_CHUNK`]. A breach panics: it is a bug in the device.

use std::io;
use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use arbitrary::Arbitrary;
use ember_memory::GuestMemoryMmap;
use ember_virtio::{ActivateContext, VirtioDevice};
use ember_virtio_blk::{Block, BlockBackend, RawFile, IO_CHUNK};
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::tempfile::TempFile;

use crate::guest::{guest_memory, init_logging, poke, Irq, QueueSetup};
use crate::input::Input;

/// The device's one queue's maximum size (`ember_virtio_blk::request::QUEUE_SIZE`).
const QUEUE_MAX: u16 = ember_virtio_blk::request::QUEUE_SIZE;
/// The largest disk a target makes: 1 MiB.
const DISK_MAX: u64 = 1 << 20;

/// `BlkHeader::flags`: the disk is read-only.
pub const FLAG_READ_ONLY: u8 = 1;
/// `BlkHeader::flags`: the disk is a raw image file (tmpfs when there is
/// one) instead of memory.
pub const FLAG_RAW_FILE: u8 = 2;
/// `BlkHeader::flags`: raising an interrupt fails.
pub const FLAG_IRQ_FAILS: u8 = 4;
/// `BlkHeader::flags`: every backend operation fails.
pub const FLAG_BACKEND_FAILS: u8 = 8;

/// The fixed part of the input.
#[derive(Arbitrary, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BlkHeader {
    /// `FLAG_*` bits.
    pub flags: u8,
    /// The features the driver acknowledges; the device's offer masks
    /// them and VIRTIO_F_VERSION_1 is added, as the transport does.
    pub acked: u64,
    /// The disk's size in bytes (at most 1 MiB; a file is cut to whole
    /// sectors, as `RawFile` refuses anything else).
    pub disk_bytes: u32,
    /// The length of the device id (longer than 20 is cut by the device).
    pub id_len: u8,
    /// The queue.
    pub queue: QueueSetup,
}

/// Operation opcodes (the opcode byte modulo [`op::COUNT`]).
pub mod op {
    /// `process_queue(index)`: index byte follows (modulo 4).
    pub const NOTIFY: u8 = 0;
    /// Write to guest memory: u32 address, u8 length (up to 16), bytes.
    pub const POKE: u8 = 1;
    /// Reset the device and activate it again on a fresh queue.
    pub const RESET: u8 = 2;
    /// Config space access: u8 offset, u8 length (up to 16), then `flush`.
    pub const CONFIG: u8 = 3;
    /// How many there are.
    pub const COUNT: u8 = 4;
}

/// The disk behind the device, with the contract checks.
pub(crate) struct CheckedDisk {
    inner: Box<dyn BlockBackend>,
    size: u64,
    read_only: bool,
    fail: bool,
}

impl CheckedDisk {
    /// A checked in-memory disk of `bytes` bytes.
    pub(crate) fn in_memory(bytes: usize, read_only: bool) -> CheckedDisk {
        CheckedDisk {
            inner: Box::new(MemDisk(vec![0x5a; bytes])),
            size: bytes as u64,
            read_only,
            fail: false,
        }
    }

    fn check(&self, what: &str, offset: u64, len: u64, writes: bool) -> io::Result<()> {
        let end = offset.checked_add(len);
        assert!(
            end.is_some_and(|end| end <= self.size),
            "virtio-blk bug: {what} of {len:#x} bytes at {offset:#x} on a {:#x}-byte disk",
            self.size
        );
        assert!(
            !(writes && self.read_only),
            "virtio-blk bug: {what} on a read-only disk"
        );
        if self.fail {
            return Err(io::ErrorKind::Other.into());
        }
        Ok(())
    }

    fn check_chunk(len: usize) {
        assert!(
            len <= IO_CHUNK,
            "virtio-blk bug: a {len}-byte transfer is larger than IO_CHUNK"
        );
    }
}

impl BlockBackend for CheckedDisk {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&mut self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        Self::check_chunk(buf.len());
        self.check("read", offset, buf.len() as u64, false)?;
        self.inner.read_at(buf, offset)
    }

    fn write_at(&mut self, buf: &[u8], offset: u64) -> io::Result<()> {
        Self::check_chunk(buf.len());
        self.check("write", offset, buf.len() as u64, true)?;
        self.inner.write_at(buf, offset)
    }

    fn flush(&mut self) -> io::Result<()> {
        if self.fail {
            return Err(io::ErrorKind::Other.into());
        }
        self.inner.flush()
    }

    fn discard(&mut self, offset: u64, len: u64) -> io::Result<()> {
        self.check("discard", offset, len, true)?;
        self.inner.discard(offset, len)
    }

    fn write_zeroes(&mut self, offset: u64, len: u64) -> io::Result<()> {
        self.check("write-zeroes", offset, len, true)?;
        self.inner.write_zeroes(offset, len)
    }
}

/// A disk in memory. The checks are [`CheckedDisk`]'s; out-of-range
/// accesses here are errors, not panics.
pub(crate) struct MemDisk(pub(crate) Vec<u8>);

impl MemDisk {
    fn range(&mut self, offset: u64, len: u64) -> io::Result<&mut [u8]> {
        let start = usize::try_from(offset).map_err(|_| io::ErrorKind::InvalidInput)?;
        let len = usize::try_from(len).map_err(|_| io::ErrorKind::InvalidInput)?;
        start
            .checked_add(len)
            .and_then(|end| self.0.get_mut(start..end))
            .ok_or_else(|| io::ErrorKind::UnexpectedEof.into())
    }
}

impl BlockBackend for MemDisk {
    fn size(&self) -> u64 {
        self.0.len() as u64
    }

    fn read_at(&mut self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        buf.copy_from_slice(self.range(offset, buf.len() as u64)?);
        Ok(())
    }

    fn write_at(&mut self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.range(offset, buf.len() as u64)?.copy_from_slice(buf);
        Ok(())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }

    fn discard(&mut self, offset: u64, len: u64) -> io::Result<()> {
        self.write_zeroes(offset, len)
    }

    fn write_zeroes(&mut self, offset: u64, len: u64) -> io::Result<()> {
        self.range(offset, len)?.fill(0);
        Ok(())
    }
}

/// Where image files go: tmpfs if the host has it.
fn image_dir() -> &'static Path {
    let shm = Path::new("/dev/shm");
    if shm.is_dir() {
        shm
    } else {
        Path::new("/tmp")
    }
}

/// The backend the header asks for; the temp file (if any) lives as long
/// as the returned guard.
fn backend(h: &BlkHeader) -> Option<(Box<dyn BlockBackend>, Option<TempFile>)> {
    let read_only = h.flags & FLAG_READ_ONLY != 0;
    let bytes = u64::from(h.disk_bytes) % (DISK_MAX + 1);
    if h.flags & FLAG_RAW_FILE == 0 {
        let data = vec![0x5a; usize::try_from(bytes).ok()?];
        return Some((Box::new(MemDisk(data)), None));
    }
    let file = TempFile::new_in(image_dir()).ok()?;
    file.as_file().set_len(bytes - bytes % 512).ok()?;
    let raw = RawFile::open(file.as_path(), read_only).ok()?;
    Some((Box::new(raw), Some(file)))
}

/// A device on the disk the header describes, not yet activated.
pub(crate) struct Rig {
    pub(crate) block: Block,
    pub(crate) mem: GuestMemoryMmap,
    irq: Arc<Irq>,
    setup: QueueSetup,
    acked: u64,
    _file: Option<TempFile>,
}

impl Rig {
    fn new(h: &BlkHeader, mem: GuestMemoryMmap) -> Option<Rig> {
        let read_only = h.flags & FLAG_READ_ONLY != 0;
        let (inner, file) = backend(h)?;
        let size = inner.size();
        let disk = CheckedDisk {
            inner,
            size,
            read_only,
            fail: h.flags & FLAG_BACKEND_FAILS != 0,
        };
        let id: String = "ember-fuzz-disk-serial-0123456789"
            .chars()
            .take(usize::from(h.id_len))
            .collect();
        let block = Block::with_backend(Box::new(disk), read_only, Some(id));
        let irq = Arc::new(Irq::default());
        irq.fail
            .store(h.flags & FLAG_IRQ_FAILS != 0, Ordering::Relaxed);
        Some(Rig {
            block,
            mem,
            irq,
            setup: h.queue,
            acked: h.acked,
            _file: file,
        })
    }

    /// Activates the device as the transport would; false if the transport
    /// would not (invalid queue).
    fn activate(&mut self) -> bool {
        let acked = crate::guest::negotiated(self.acked, self.block.avail_features());
        let event_idx = acked & (1 << VIRTIO_RING_F_EVENT_IDX) != 0;
        let Some(queue) = self.setup.queue(QUEUE_MAX, &self.mem, event_idx) else {
            return false;
        };
        let ctx = ActivateContext {
            mem: self.mem.clone(),
            interrupt: self.irq.clone(),
            queues: vec![queue],
            acked_features: acked,
        };
        self.block.activate(ctx).is_ok()
    }

    fn run_op(&mut self, ops: &mut Input<'_>) {
        match ops.u8() % op::COUNT {
            op::NOTIFY => self.block.process_queue(usize::from(ops.u8() % 4)),
            op::POKE => {
                let addr = u64::from(ops.u32());
                let len = usize::from(ops.u8() % 17);
                poke(&self.mem, addr, ops.bytes(len));
            }
            op::RESET => {
                self.block.reset();
                self.activate();
            }
            _ => {
                let offset = u64::from(ops.u8());
                let mut buf = [0u8; 16];
                let len = usize::from(ops.u8() % 17);
                self.block.read_config(offset, &mut buf[..len]);
                self.block.write_config(offset, &buf[..len]);
                let _ = self.block.flush();
            }
        }
    }
}

/// The `virtio_blk_request` target.
pub fn virtio_blk_request(data: &[u8]) {
    run_request(data);
}

/// Runs a `virtio_blk_request` input; the device afterwards, if it was
/// activated.
pub(crate) fn run_request(data: &[u8]) -> Option<Rig> {
    init_logging();
    let mut input = Input::new(data);
    let header: BlkHeader = input.read();
    let mut ops = input.section();
    let mem = guest_memory(input.rest());
    let mut rig = Rig::new(&header, mem)?;
    if !rig.activate() {
        return None;
    }
    if ops.is_empty() {
        rig.block.process_queue(0);
    }
    while !ops.is_empty() {
        rig.run_op(&mut ops);
    }
    Some(rig)
}

/// `virtio_blk_chain`'s fixed layout: queue of 256 at 0 (available ring at
/// 0x1000, used ring at 0x1400), the request header at 0x2000, status
/// bytes at 0x2800, data from 0x3000, the indirect table at 0x9000.
pub mod layout {
    /// The queue size.
    pub const QUEUE: u16 = 256;
    /// The available ring.
    pub const AVAIL: u64 = 0x1000;
    /// The used ring.
    pub const USED: u64 = 0x1400;
    /// The request header.
    pub const HEADER: u64 = 0x2000;
    /// The status area.
    pub const STATUS: u64 = 0x2800;
    /// The data area; the input's payload is copied here.
    pub const DATA: u64 = 0x3000;
    /// The indirect descriptor table.
    pub const INDIRECT: u64 = 0x9000;
    /// The most descriptors in a chain.
    pub const MAX_DESCS: u8 = 16;
}

/// `ChainDesc::flags`: device-writable.
pub const DESC_WRITE: u8 = 1;
/// `ChainDesc::flags`: this descriptor and the rest go into an indirect
/// table, reached from here.
pub const DESC_INDIRECT: u8 = 2;
/// `ChainDesc::flags`: `next` is taken as it is instead of the following
/// descriptor (loops, jumps out of the table).
pub const DESC_JUMP: u8 = 4;

/// One descriptor of a `virtio_blk_chain` input.
#[derive(Arbitrary, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ChainDesc {
    /// Where the buffer is (modulo 8): header area, data area, status
    /// area, the high region, just below the end of low RAM, the hole, a
    /// raw 32-bit address, just below 2^64; `offset` is added (or, "just
    /// below", subtracted).
    pub place: u8,
    /// The offset in that place.
    pub offset: u32,
    /// The length.
    pub len: u32,
    /// `DESC_*` bits.
    pub flags: u8,
    /// The next index, with `DESC_JUMP`.
    pub next: u16,
}

impl ChainDesc {
    fn addr(&self) -> u64 {
        let off = u64::from(self.offset);
        match self.place % 8 {
            0 => layout::HEADER + off % 0x800,
            1 => layout::DATA + off,
            2 => layout::STATUS + off % 0x800,
            3 => crate::guest::HIGH_BASE + off,
            4 => (crate::guest::LOW_SIZE as u64).wrapping_sub(off % 0x2000),
            5 => crate::guest::LOW_SIZE as u64 + off,
            6 => off,
            _ => u64::MAX - off,
        }
    }
}

/// The fixed part of a `virtio_blk_chain` input.
#[derive(Arbitrary, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ChainHeader {
    /// `FLAG_*` bits, as for `virtio_blk_request`.
    pub flags: u8,
    /// The disk's size in bytes.
    pub disk_bytes: u32,
    /// The request header: type.
    pub request_type: u32,
    /// The request header: ioprio (ignored by the device).
    pub ioprio: u32,
    /// The request header: first sector.
    pub sector: u64,
    /// How many descriptors follow (modulo 17).
    pub count: u8,
}

/// Writes one chain of `descs` as descriptor 0 of the table at 0 (or
/// partly in the indirect table) and makes it available.
fn write_chain(mem: &GuestMemoryMmap, descs: &[ChainDesc]) {
    let indirect_at = descs.iter().position(|d| d.flags & DESC_INDIRECT != 0);
    let put = |table: u64, i: usize, d: &ChainDesc, last: bool, base: usize| {
        let next = if d.flags & DESC_JUMP != 0 {
            d.next
        } else {
            u16::try_from(i + 1 - base).unwrap_or(0)
        };
        let mut flags = if d.flags & DESC_WRITE != 0 { 2u16 } else { 0 };
        if !last || d.flags & DESC_JUMP != 0 {
            flags |= 1;
        }
        let mut raw = [0u8; 16];
        raw[..8].copy_from_slice(&d.addr().to_le_bytes());
        raw[8..12].copy_from_slice(&d.len.to_le_bytes());
        raw[12..14].copy_from_slice(&flags.to_le_bytes());
        raw[14..].copy_from_slice(&next.to_le_bytes());
        poke(mem, table + 16 * (i - base) as u64, &raw);
    };
    let direct = indirect_at.unwrap_or(descs.len());
    for (i, d) in descs[..direct].iter().enumerate() {
        put(0, i, d, i + 1 == descs.len() && indirect_at.is_none(), 0);
    }
    if let Some(k) = indirect_at {
        for (i, d) in descs.iter().enumerate().skip(k) {
            put(layout::INDIRECT, i, d, i + 1 == descs.len(), k);
        }
        // The table descriptor, in the slot of the first indirect one.
        let len = u32::try_from(16 * (descs.len() - k)).unwrap_or(0);
        let mut raw = [0u8; 16];
        raw[..8].copy_from_slice(&layout::INDIRECT.to_le_bytes());
        raw[8..12].copy_from_slice(&len.to_le_bytes());
        raw[12..14].copy_from_slice(&4u16.to_le_bytes());
        poke(mem, 16 * k as u64, &raw);
    }
    // avail: flags 0, idx 1, ring[0] = 0.
    poke(mem, layout::AVAIL, &[0, 0, 1, 0, 0, 0]);
}

/// The `virtio_blk_chain` target: one request whose descriptors are laid
/// out by the harness from a short list (where each buffer is, its length
/// and direction, indirect tables, jumps and loops), so the fuzzer works
/// on the request rather than on ring layout.
///
/// Input: [`ChainHeader`], that many [`ChainDesc`]s, then the payload
/// copied to the data area. Every chain the device takes must come back on
/// the used ring.
pub fn virtio_blk_chain(data: &[u8]) {
    run_chain(data);
}

/// Runs a `virtio_blk_chain` input; the device afterwards, if there was a
/// chain.
pub(crate) fn run_chain(data: &[u8]) -> Option<Rig> {
    init_logging();
    let mut input = Input::new(data);
    let h: ChainHeader = input.read();
    let descs: Vec<ChainDesc> = (0..h.count % (layout::MAX_DESCS + 1))
        .map(|_| input.read())
        .collect();
    let payload = input.rest();
    let mem = guest_memory(&[]);
    let mut header = [0u8; 16];
    header[..4].copy_from_slice(&h.request_type.to_le_bytes());
    header[4..8].copy_from_slice(&h.ioprio.to_le_bytes());
    header[8..].copy_from_slice(&h.sector.to_le_bytes());
    poke(&mem, layout::HEADER, &header);
    poke(&mem, layout::DATA, payload);
    if descs.is_empty() {
        return None;
    }
    write_chain(&mem, &descs);
    let blk = BlkHeader {
        flags: h.flags,
        acked: 0,
        disk_bytes: h.disk_bytes,
        id_len: 20,
        queue: QueueSetup {
            size: layout::QUEUE,
            desc: 0,
            avail: layout::AVAIL,
            used: layout::USED,
        },
    };
    let mut rig = Rig::new(&blk, mem)?;
    if !rig.activate() {
        return None;
    }
    rig.block.process_queue(0);
    // A device-writable buffer over the rings lets the request rewrite
    // them (the guest's own doing; the device may then rightly take more
    // chains, or the used index be overwritten); otherwise exactly the one
    // chain comes back.
    let over_rings = descs
        .iter()
        .any(|d| d.flags & DESC_WRITE != 0 && d.len > 0 && d.addr() < layout::HEADER);
    if !over_rings {
        let used: u16 = rig
            .mem
            .read_obj(GuestAddress(layout::USED + 2))
            .unwrap_or(0);
        assert_eq!(used, 1, "virtio-blk bug: the chain was not returned");
    }
    Some(rig)
}
