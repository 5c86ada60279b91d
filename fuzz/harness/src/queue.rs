//! `virtio_queue_chain`: descriptor chains of any shape (loops, indirect
//! tables, chained indirect tables, huge lengths, buffers in the memory
//! hole) walked the way Ember's devices walk them.
//!
//! Input: [`ChainHeader`], then the memory image. Every available chain is
//! popped, walked whole (read-only and write-only views too) and parsed by
//! the block request parser, whose result is checked against what its
//! documentation promises; then it is returned on the used ring. The first
//! chains are also read with `ember_virtio::queue::ChainReader`, which must
//! agree with virtio-queue.

use arbitrary::Arbitrary;
use ember_memory::GuestMemoryMmap;
use ember_virtio::queue::{ChainError, ChainReader};
use ember_virtio_blk::request::{
    parse, status_address, RequestKind, MAX_DISCARD_SECTORS, MAX_WRITE_ZEROES_SECTORS, SECTOR_SIZE,
};
use virtio_queue::desc::split::Descriptor;
use virtio_queue::{DescriptorChain, Queue, QueueOwnedT, QueueT};
use vm_memory::{GuestMemory, Permissions};

use crate::guest::{guest_memory, init_logging, QueueSetup};
use crate::input::Input;

/// The largest queue virtio allows.
const QUEUE_MAX: u16 = 32768;

/// The fixed part of the input.
#[derive(Arbitrary, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ChainHeader {
    /// Bit 0: VIRTIO_RING_F_EVENT_IDX; bit 1: the disk is read-only.
    pub flags: u8,
    /// The disk's capacity in sectors, for the block parser.
    pub capacity: u64,
    /// The queue.
    pub queue: QueueSetup,
}

/// Checks a parsed request against what `ember_virtio_blk::request`
/// promises: data and status inside guest memory, lengths that add up,
/// sectors inside the disk.
fn check_request(mem: &GuestMemoryMmap, req: &ember_virtio_blk::Request, capacity: u64) {
    let mut total = 0u64;
    for r in req.data() {
        assert!(
            r.is_empty() || mem.check_range(r.addr(), r.len() as usize, Permissions::Read),
            "blk parse bug: data region {:#x}+{:#x} is not guest memory",
            r.addr().0,
            r.len()
        );
        total += u64::from(r.len());
    }
    assert_eq!(total, req.data_len(), "blk parse bug: data_len");
    assert!(
        mem.check_range(req.status_addr(), 1, Permissions::Write),
        "blk parse bug: status byte outside guest memory"
    );
    let in_disk = |sector: u64, sectors: u64| {
        sector
            .checked_add(sectors)
            .is_some_and(|end| end <= capacity)
    };
    match req.kind() {
        RequestKind::In { sector } | RequestKind::Out { sector } => {
            assert_eq!(req.data_len() % SECTOR_SIZE, 0, "blk parse bug: unaligned");
            assert!(
                in_disk(*sector, req.data_len() / SECTOR_SIZE),
                "blk parse bug: sectors past the disk"
            );
        }
        RequestKind::Discard(segs) | RequestKind::WriteZeroes(segs) => {
            let max = if matches!(req.kind(), RequestKind::Discard(_)) {
                MAX_DISCARD_SECTORS
            } else {
                MAX_WRITE_ZEROES_SECTORS
            };
            for s in segs {
                assert!(s.num_sectors() <= max, "blk parse bug: segment too large");
                assert!(
                    in_disk(s.sector(), u64::from(s.num_sectors())),
                    "blk parse bug: segment past the disk"
                );
                assert_eq!(s.offset(), s.sector() * SECTOR_SIZE);
            }
        }
        RequestKind::Flush | RequestKind::GetId => {}
    }
}

/// The most chains one input pops: what a device takes in one pass at
/// most (its queue size, at most 256 in Ember).
const MAX_POPS: usize = 256;
/// How many chains are walked to their end.
const FULL_WALKS: usize = 1;
/// How many chains are also walked the other ways (byte count, read-only
/// and write-only views) as far as a device would look.
const VIEW_WALKS: usize = 8;
/// How far a device looks into a chain: Ember's devices stop at 256
/// descriptors.
const DEVICE_WALK: usize = 300;

/// What [`ChainReader`] reads at one avail position: the chain count, the
/// head, the descriptors up to the first error and that error.
struct ReaderView {
    available: Option<u16>,
    head: Result<u16, ChainError>,
    descs: Vec<Descriptor>,
    error: Option<ChainError>,
}

impl ReaderView {
    fn read(reader: &ChainReader<'_>, pos: u16) -> ReaderView {
        let available = reader.available(pos);
        let head = reader.head(pos);
        let mut descs = Vec::new();
        let mut error = None;
        if let Ok(head) = head {
            for d in reader.chain(head).take(DEVICE_WALK) {
                match d {
                    Ok(d) => descs.push(d),
                    Err(e) => {
                        error = Some(e);
                        break;
                    }
                }
            }
        }
        ReaderView {
            available,
            head,
            descs,
            error,
        }
    }

    /// The reader must agree with virtio-queue's pop at the same position:
    /// a chain exactly when the avail index says there is one, the same
    /// head, and the same descriptors until the reader stops; where it
    /// stops virtio-queue stops too, except at an indirect descriptor,
    /// which virtio-queue follows.
    fn check(&self, popped: Option<DescriptorChain<&GuestMemoryMmap>>) {
        let expect = matches!(self.available, Some(n) if n > 0);
        assert_eq!(
            popped.is_some(),
            expect,
            "ChainReader: {:?} chains available",
            self.available
        );
        let Some(chain) = popped else {
            return;
        };
        match self.head {
            Ok(head) => assert_eq!(head, chain.head_index(), "ChainReader: head"),
            Err(ChainError::BadHead(head)) => {
                assert_eq!(head, chain.head_index(), "ChainReader: bad head");
            }
            Err(e) => panic!("ChainReader: head {e}"),
        }
        let key = |d: &Descriptor| (d.addr(), d.len(), d.flags(), d.next());
        let theirs: Vec<_> = chain.take(self.descs.len() + 1).collect();
        let ours: Vec<_> = self.descs.iter().map(key).collect();
        let common: Vec<_> = theirs.iter().take(ours.len()).map(key).collect();
        assert_eq!(ours, common, "ChainReader: descriptors");
        if !matches!(self.error, Some(ChainError::Indirect(_))) && self.descs.len() < DEVICE_WALK {
            assert_eq!(
                theirs.len(),
                ours.len(),
                "ChainReader: stopped ({:?}) where virtio-queue did not",
                self.error
            );
        }
    }
}

/// The `virtio_queue_chain` target.
pub fn virtio_queue_chain(data: &[u8]) {
    init_logging();
    let mut input = Input::new(data);
    let h: ChainHeader = input.read();
    let mem = guest_memory(input.rest());
    let event_idx = h.flags & 1 != 0;
    let read_only = h.flags & 2 != 0;
    let Some(mut q): Option<Queue> = h.queue.queue(QUEUE_MAX, &mem, event_idx) else {
        return;
    };
    // The most descriptors a chain can yield: the queue size (its
    // time-to-live), then one indirect table of up to 65535 entries.
    let longest = usize::from(q.size()) + usize::from(u16::MAX);
    let _ = q.disable_notification(&mem);
    // At most two rounds of the ring: the avail index says how many chains
    // there are, and a chain popped twice is the driver's doing.
    for i in 0..MAX_POPS.min(2 * usize::from(q.size())) {
        // What ember-virtio's reader sees at the same position, in the same
        // memory (add_used may have written into the rings).
        let seen = if i < VIEW_WALKS {
            ChainReader::new(&q, &mem).map(|r| ReaderView::read(&r, q.next_avail()))
        } else {
            None
        };
        let popped = q.pop_descriptor_chain(&mem);
        if let Some(seen) = seen {
            seen.check(popped.clone());
        }
        let Some(chain) = popped else {
            break;
        };
        let head = chain.head_index();
        if i < FULL_WALKS {
            // Loops and cycles through tables must end.
            let n = chain.clone().take(longest + 1).count();
            assert!(n <= longest, "virtio-queue: a chain of {n} descriptors");
        }
        let mut bytes = 0u64;
        if i < VIEW_WALKS {
            for d in chain.clone().take(DEVICE_WALK) {
                bytes += u64::from(d.len());
            }
            let _ = (
                chain.clone().readable().take(DEVICE_WALK).count(),
                chain.clone().writable().take(DEVICE_WALK).count(),
            );
        }
        let status = status_address(chain.clone());
        match parse(chain, h.capacity, read_only) {
            Ok(req) => {
                check_request(&mem, &req, h.capacity);
                assert_eq!(status, Some(req.status_addr()), "blk status address");
            }
            Err(e) => {
                let _ = (e.to_string(), e.status());
            }
        }
        let _ = q.add_used(&mem, head, u32::try_from(bytes).unwrap_or(u32::MAX));
        let _ = q.needs_notification(&mem);
    }
    let _ = q.enable_notification(&mem);
    if let Ok(iter) = q.iter(&mem) {
        for chain in iter.take(FULL_WALKS) {
            let _ = chain.take(DEVICE_WALK).count();
        }
    }
}
