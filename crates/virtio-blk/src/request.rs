//! Parsing a virtio-blk request out of a descriptor chain (virtio 1.2,
//! section 5.2.6), before any I/O.
//!
//! The layout is not assumed (VIRTIO_F_VERSION_1 implies ANY_LAYOUT): the
//! device-readable bytes of a chain are the 16-byte header followed by any
//! data the device reads; the device-writable bytes are any data the device
//! writes followed by the status byte, the last byte of the last descriptor.
//! So a header may span descriptors, share one with OUT data, and the status
//! may share the last descriptor with IN data. [`parse`] checks all of it
//! (descriptor count, directions, guest-memory ranges, lengths, sectors
//! against the capacity) and returns a [`Request`] or a [`RequestError`].

use std::ops::Deref;

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_ID_BYTES, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_UNSUPP, VIRTIO_BLK_T_DISCARD,
    VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
    VIRTIO_BLK_T_WRITE_ZEROES, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
};
use virtio_queue::DescriptorChain;
use vm_memory::{Bytes, GuestAddress, GuestMemory, GuestMemoryBackend, Permissions};

/// The size of a sector: the unit of the header's `sector` and of capacity.
pub const SECTOR_SIZE: u64 = 512;
/// The size of the device's one queue.
pub const QUEUE_SIZE: u16 = 256;
/// The most data segments a request may have (config `seg_max`): the queue
/// size less the header and status descriptors.
pub const SEG_MAX: u32 = QUEUE_SIZE as u32 - 2;
/// The most descriptors [`parse`] accepts in one chain.
pub const MAX_DESCRIPTORS: usize = SEG_MAX as usize + 2;
/// The most sectors one discard segment may cover (config
/// `max_discard_sectors`).
pub const MAX_DISCARD_SECTORS: u32 = 1 << 21;
/// The most segments in one discard request (config `max_discard_seg`).
pub const MAX_DISCARD_SEG: u32 = 1;
/// The most sectors one write-zeroes segment may cover (config
/// `max_write_zeroes_sectors`).
pub const MAX_WRITE_ZEROES_SECTORS: u32 = 1 << 21;
/// The most segments in one write-zeroes request (config
/// `max_write_zeroes_seg`).
pub const MAX_WRITE_ZEROES_SEG: u32 = 1;
/// The length of the device id a GET_ID request returns.
pub const ID_BYTES: usize = VIRTIO_BLK_ID_BYTES as usize;

/// The length of the request header (`struct virtio_blk_outhdr`).
const HEADER_LEN: usize = 16;
/// The length of one discard / write-zeroes segment
/// (`struct virtio_blk_discard_write_zeroes`).
const SEGMENT_LEN: usize = 16;
/// Room for the largest segment list we accept.
const MAX_SEGMENT_BYTES: usize = SEGMENT_LEN
    * if MAX_DISCARD_SEG > MAX_WRITE_ZEROES_SEG {
        MAX_DISCARD_SEG as usize
    } else {
        MAX_WRITE_ZEROES_SEG as usize
    };

/// Why a descriptor chain is not a valid request. Every variant is the
/// guest's fault; [`RequestError::status`] is the status byte it earns.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    /// The chain has more descriptors than `seg_max` + 2.
    #[error("the descriptor chain is longer than {max} descriptors")]
    TooManyDescriptors {
        /// The most accepted.
        max: usize,
    },
    /// A descriptor's buffer is not inside guest memory.
    #[error("descriptor buffer at {addr:#x}, {len} bytes, is outside guest memory")]
    OutsideMemory {
        /// The buffer's guest address.
        addr: u64,
        /// Its length.
        len: u32,
    },
    /// A device-readable descriptor follows a device-writable one.
    #[error("a device-readable descriptor follows a device-writable one")]
    ReadableAfterWritable,
    /// The chain does not end in a device-writable descriptor with room for
    /// the status byte.
    #[error("the chain has no device-writable status byte at its end")]
    NoStatus,
    /// The device-readable part of the chain is shorter than the header.
    #[error("the request header needs 16 device-readable bytes, the chain has {len}")]
    HeaderTooShort {
        /// The device-readable bytes in the chain.
        len: u64,
    },
    /// The data buffer goes the wrong way for the request type: device-
    /// readable data for a read or get-id, device-writable data for a write,
    /// discard or write-zeroes.
    #[error("request type {request_type} has a data buffer in the wrong direction")]
    WrongDirection {
        /// The header's type.
        request_type: u32,
    },
    /// A read or write is not a whole number of sectors.
    #[error("data length {len} is not a multiple of 512")]
    UnalignedLength {
        /// The data length in bytes.
        len: u64,
    },
    /// The request reaches past the end of the disk (or overflows).
    #[error("sectors {sector}+{sectors} are past the end of the disk ({capacity} sectors)")]
    OutOfRange {
        /// The first sector.
        sector: u64,
        /// The number of sectors.
        sectors: u64,
        /// The disk's capacity in sectors.
        capacity: u64,
    },
    /// A write, discard or write-zeroes on a read-only disk.
    #[error("request type {request_type} writes to a read-only disk")]
    ReadOnly {
        /// The header's type.
        request_type: u32,
    },
    /// The request type is not one the device implements.
    #[error("request type {request_type} is not supported")]
    Unsupported {
        /// The header's type.
        request_type: u32,
    },
    /// A discard or write-zeroes data buffer is not 1 to the advertised
    /// maximum number of 16-byte segments.
    #[error("a {len}-byte segment list is not 1 to {max} 16-byte segments")]
    BadSegmentCount {
        /// The data length in bytes.
        len: u64,
        /// The most segments accepted.
        max: u32,
    },
    /// A discard or write-zeroes segment has flags the device does not
    /// support (any unknown flag, or UNMAP on a discard).
    #[error("segment flags {flags:#x} are not supported")]
    UnsupportedFlags {
        /// The segment's flags.
        flags: u32,
    },
    /// A discard or write-zeroes segment is larger than advertised.
    #[error("a segment of {num_sectors} sectors is more than the {max} advertised")]
    TooManySectors {
        /// The segment's sector count.
        num_sectors: u32,
        /// The advertised maximum.
        max: u32,
    },
    /// Guest memory could not be read although the range checked out.
    #[error("guest memory at {addr:#x} cannot be read")]
    GuestMemory {
        /// The address read.
        addr: u64,
    },
}

impl RequestError {
    /// The status byte the request completes with: UNSUPP for an unknown
    /// type or unknown segment flags, IOERR for everything else.
    pub fn status(&self) -> u8 {
        let status = match self {
            RequestError::Unsupported { .. } | RequestError::UnsupportedFlags { .. } => {
                VIRTIO_BLK_S_UNSUPP
            }
            _ => VIRTIO_BLK_S_IOERR,
        };
        // Both constants are small; the fallback is never taken.
        u8::try_from(status).unwrap_or(u8::MAX)
    }
}

/// A run of guest memory holding request data, in chain order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DataRegion {
    addr: GuestAddress,
    len: u32,
}

impl DataRegion {
    /// The guest address of the run.
    pub fn addr(&self) -> GuestAddress {
        self.addr
    }

    /// Its length in bytes.
    pub fn len(&self) -> u32 {
        self.len
    }

    /// Whether it is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// One discard or write-zeroes range, checked against the capacity.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Segment {
    sector: u64,
    num_sectors: u32,
    unmap: bool,
}

impl Segment {
    /// The first sector.
    pub fn sector(&self) -> u64 {
        self.sector
    }

    /// The number of sectors.
    pub fn num_sectors(&self) -> u32 {
        self.num_sectors
    }

    /// Whether the driver allows the range to be deallocated (write-zeroes
    /// only).
    pub fn unmap(&self) -> bool {
        self.unmap
    }

    /// The byte offset of the range on the disk.
    pub fn offset(&self) -> u64 {
        // `parse` checked that the end of the range, in bytes, fits a u64.
        self.sector.saturating_mul(SECTOR_SIZE)
    }

    /// The length of the range in bytes.
    pub fn len(&self) -> u64 {
        u64::from(self.num_sectors) * SECTOR_SIZE
    }

    /// Whether the range is empty.
    pub fn is_empty(&self) -> bool {
        self.num_sectors == 0
    }
}

/// What a request asks for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RequestKind {
    /// Read from `sector` into the (device-writable) data buffer.
    In {
        /// The first sector.
        sector: u64,
    },
    /// Write the (device-readable) data buffer at `sector`.
    Out {
        /// The first sector.
        sector: u64,
    },
    /// Make every completed write durable.
    Flush,
    /// Write the device id into the data buffer.
    GetId,
    /// Deallocate these ranges.
    Discard(Vec<Segment>),
    /// Zero these ranges.
    WriteZeroes(Vec<Segment>),
}

/// A validated request: its kind, its data buffer in guest memory and where
/// its status byte goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Request {
    kind: RequestKind,
    data: Vec<DataRegion>,
    data_len: u64,
    status: GuestAddress,
}

impl Request {
    /// What the request asks for.
    pub fn kind(&self) -> &RequestKind {
        &self.kind
    }

    /// The data buffer, in order: device-writable for `In` and `GetId`,
    /// device-readable for `Out`, `Discard` and `WriteZeroes` (whose segments
    /// are already parsed), empty for `Flush`. Each run is inside guest
    /// memory.
    pub fn data(&self) -> &[DataRegion] {
        &self.data
    }

    /// The total length of [`Request::data`] in bytes.
    pub fn data_len(&self) -> u64 {
        self.data_len
    }

    /// The guest address of the status byte.
    pub fn status_addr(&self) -> GuestAddress {
        self.status
    }
}

/// One descriptor as the parser sees it.
#[derive(Clone, Copy, Debug)]
struct Desc {
    addr: GuestAddress,
    len: u32,
    writable: bool,
}

/// Parses `chain` into a [`Request`] for a disk of `capacity` sectors.
///
/// Nothing is written to guest memory and no I/O is done; only the header
/// and any discard / write-zeroes segments are read. At most
/// [`MAX_DESCRIPTORS`] descriptors are visited.
pub fn parse<M>(
    mut chain: DescriptorChain<M>,
    capacity: u64,
    read_only: bool,
) -> Result<Request, RequestError>
where
    M: Deref,
    M::Target: GuestMemory,
{
    let descs = collect(&mut chain)?;
    let mem = chain.memory();
    check_descriptors(mem, &descs)?;
    let status = status_of(&descs).ok_or(RequestError::NoStatus)?;

    // One list of the non-empty buffers, device-readable ones first
    // (check_descriptors made sure of the order), less the status byte:
    // the readable part is `data[..split]`, the writable part the rest.
    let split = descs.iter().filter(|d| !d.writable && d.len > 0).count();
    let mut data: Vec<DataRegion> = regions(descs);
    drop_last_byte(&mut data);

    let readable_len = total_len(&data[..split]);
    if readable_len < HEADER_LEN as u64 {
        return Err(RequestError::HeaderTooShort { len: readable_len });
    }
    let mut header = [0u8; HEADER_LEN];
    read_regions(mem, &data[..split], &mut header)?;
    let (request_type, sector) = decode_header(&header);
    // Readable bytes after the header (every region is in guest memory, so
    // none is lost to an address overflow when the header is dropped).
    let readable_body = readable_len > HEADER_LEN as u64;
    let writable_body = data.len() > split;

    let kind = match request_type {
        VIRTIO_BLK_T_IN | VIRTIO_BLK_T_GET_ID => {
            only_writable(request_type, readable_body)?;
            data.drain(..split);
            if request_type == VIRTIO_BLK_T_IN {
                check_rw(sector, total_len(&data), capacity)?;
                RequestKind::In { sector }
            } else {
                RequestKind::GetId
            }
        }
        VIRTIO_BLK_T_OUT | VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES => {
            only_readable(request_type, writable_body, read_only)?;
            data.truncate(split);
            drop_prefix(&mut data, HEADER_LEN as u64);
            match request_type {
                VIRTIO_BLK_T_OUT => {
                    check_rw(sector, total_len(&data), capacity)?;
                    RequestKind::Out { sector }
                }
                VIRTIO_BLK_T_DISCARD => {
                    RequestKind::Discard(parse_segments(mem, &data, capacity, false)?)
                }
                _ => RequestKind::WriteZeroes(parse_segments(mem, &data, capacity, true)?),
            }
        }
        VIRTIO_BLK_T_FLUSH => {
            data.clear();
            RequestKind::Flush
        }
        _ => return Err(RequestError::Unsupported { request_type }),
    };
    let data_len = total_len(&data);
    Ok(Request {
        kind,
        data,
        data_len,
        status,
    })
}

/// Where the status byte of `chain` is, for completing a chain [`parse`]
/// rejected: the last byte of the last descriptor, if that descriptor is
/// device-writable, at least one byte long and that byte is in guest memory.
/// `None` also for a chain longer than [`MAX_DESCRIPTORS`].
pub fn status_address<M>(mut chain: DescriptorChain<M>) -> Option<GuestAddress>
where
    M: Deref,
    M::Target: GuestMemory,
{
    let descs = collect(&mut chain).ok()?;
    let status = status_of(&descs)?;
    chain
        .memory()
        .check_range(status, 1, Permissions::Write)
        .then_some(status)
}

/// Reads at most [`MAX_DESCRIPTORS`] descriptors of `chain`.
fn collect<M>(chain: &mut DescriptorChain<M>) -> Result<Vec<Desc>, RequestError>
where
    M: Deref,
    M::Target: GuestMemory,
{
    let mut descs = Vec::with_capacity(4);
    for d in chain.by_ref() {
        if descs.len() == MAX_DESCRIPTORS {
            return Err(RequestError::TooManyDescriptors {
                max: MAX_DESCRIPTORS,
            });
        }
        descs.push(Desc {
            addr: d.addr(),
            len: d.len(),
            writable: d.is_write_only(),
        });
    }
    Ok(descs)
}

/// Checks that each buffer is in guest memory and that no device-readable
/// buffer follows a device-writable one.
fn check_descriptors<M>(mem: &M, descs: &[Desc]) -> Result<(), RequestError>
where
    M: GuestMemory + ?Sized,
{
    let mut seen_writable = false;
    for d in descs {
        if d.writable {
            seen_writable = true;
        } else if seen_writable {
            return Err(RequestError::ReadableAfterWritable);
        }
        let access = if d.writable {
            Permissions::Write
        } else {
            Permissions::Read
        };
        // One lookup for a buffer inside one memory region (every buffer
        // but one that crosses into the next region, which `check_range`
        // then checks region by region).
        let in_memory = usize::try_from(d.len).is_ok_and(|len| {
            len == 0
                || mem
                    .physical_memory()
                    .is_some_and(|m| m.get_slice(d.addr, len).is_ok())
                || mem.check_range(d.addr, len, access)
        });
        if !in_memory {
            return Err(RequestError::OutsideMemory {
                addr: d.addr.0,
                len: d.len,
            });
        }
    }
    Ok(())
}

/// The address of the last byte of the last descriptor, if it is writable.
fn status_of(descs: &[Desc]) -> Option<GuestAddress> {
    let last = descs.last()?;
    if !last.writable || last.len == 0 {
        return None;
    }
    last.addr
        .0
        .checked_add(u64::from(last.len - 1))
        .map(GuestAddress)
}

/// The non-empty buffers of `descs`, as data regions (in `descs`'s
/// allocation: the two types have the same size, so the standard library
/// collects in place).
fn regions(descs: Vec<Desc>) -> Vec<DataRegion> {
    descs
        .into_iter()
        .filter(|d| d.len > 0)
        .map(|d| DataRegion {
            addr: d.addr,
            len: d.len,
        })
        .collect()
}

/// Removes the last byte (the status) from `writable`.
fn drop_last_byte(writable: &mut Vec<DataRegion>) {
    if let Some(last) = writable.last_mut() {
        last.len = last.len.saturating_sub(1);
        if last.len == 0 {
            writable.pop();
        }
    }
}

/// The total length of `regions` (at most [`MAX_DESCRIPTORS`] u32s, so no
/// overflow).
fn total_len(regions: &[DataRegion]) -> u64 {
    regions.iter().map(|r| u64::from(r.len)).sum()
}

/// Removes the first `n` bytes of `regions`, in place.
fn drop_prefix(regions: &mut Vec<DataRegion>, mut n: u64) {
    let mut kept = 0;
    for i in 0..regions.len() {
        let r = regions[i];
        let len = u64::from(r.len);
        if n >= len {
            n -= len;
            continue;
        }
        // n < r.len here, so both conversions succeed.
        let skip = u32::try_from(n).unwrap_or(r.len);
        n = 0;
        if let Some(addr) = r.addr.0.checked_add(u64::from(skip)) {
            regions[kept] = DataRegion {
                addr: GuestAddress(addr),
                len: r.len - skip,
            };
            kept += 1;
        }
    }
    regions.truncate(kept);
}

/// Fills `out` from the start of `regions`.
fn read_regions<M>(mem: &M, regions: &[DataRegion], out: &mut [u8]) -> Result<(), RequestError>
where
    M: GuestMemory + ?Sized,
{
    let mut done = 0;
    for r in regions {
        if done == out.len() {
            break;
        }
        let n = usize::try_from(r.len)
            .unwrap_or(usize::MAX)
            .min(out.len() - done);
        mem.read_slice(&mut out[done..done + n], r.addr)
            .map_err(|_| RequestError::GuestMemory { addr: r.addr.0 })?;
        done += n;
    }
    Ok(())
}

/// Splits a header into its type and sector.
fn decode_header(header: &[u8; HEADER_LEN]) -> (u32, u64) {
    let [t0, t1, t2, t3, _, _, _, _, s0, s1, s2, s3, s4, s5, s6, s7] = *header;
    (
        u32::from_le_bytes([t0, t1, t2, t3]),
        u64::from_le_bytes([s0, s1, s2, s3, s4, s5, s6, s7]),
    )
}

/// A request whose data the device writes must have no device-readable data.
fn only_writable(request_type: u32, readable: bool) -> Result<(), RequestError> {
    if !readable {
        Ok(())
    } else {
        Err(RequestError::WrongDirection { request_type })
    }
}

/// A request whose data the device reads must have no device-writable data
/// and, as it changes the disk, a writable disk.
fn only_readable(request_type: u32, writable: bool, read_only: bool) -> Result<(), RequestError> {
    if writable {
        return Err(RequestError::WrongDirection { request_type });
    }
    if read_only {
        return Err(RequestError::ReadOnly { request_type });
    }
    Ok(())
}

/// Checks a read or write of `len` bytes at `sector`.
fn check_rw(sector: u64, len: u64, capacity: u64) -> Result<(), RequestError> {
    if len % SECTOR_SIZE != 0 {
        return Err(RequestError::UnalignedLength { len });
    }
    check_range(sector, len / SECTOR_SIZE, capacity)
}

/// Checks that `sectors` sectors at `sector` are on the disk, without
/// overflow, and that the byte offset of their end fits a u64.
fn check_range(sector: u64, sectors: u64, capacity: u64) -> Result<(), RequestError> {
    let fits = sector
        .checked_add(sectors)
        .filter(|end| *end <= capacity)
        .and_then(|end| end.checked_mul(SECTOR_SIZE))
        .is_some();
    if fits {
        Ok(())
    } else {
        Err(RequestError::OutOfRange {
            sector,
            sectors,
            capacity,
        })
    }
}

/// Reads and checks the segment list of a discard (`write_zeroes` false) or
/// write-zeroes request.
fn parse_segments<M>(
    mem: &M,
    data: &[DataRegion],
    capacity: u64,
    write_zeroes: bool,
) -> Result<Vec<Segment>, RequestError>
where
    M: GuestMemory + ?Sized,
{
    let (max_seg, max_sectors, allowed_flags) = if write_zeroes {
        (
            MAX_WRITE_ZEROES_SEG,
            MAX_WRITE_ZEROES_SECTORS,
            VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
        )
    } else {
        (MAX_DISCARD_SEG, MAX_DISCARD_SECTORS, 0)
    };
    let len = total_len(data);
    let count = len / SEGMENT_LEN as u64;
    if len % SEGMENT_LEN as u64 != 0 || count == 0 || count > u64::from(max_seg) {
        return Err(RequestError::BadSegmentCount { len, max: max_seg });
    }
    let mut bytes = [0u8; MAX_SEGMENT_BYTES];
    // `count` is at most `max_seg`, so this is at most `MAX_SEGMENT_BYTES`.
    let used = usize::try_from(len)
        .unwrap_or(MAX_SEGMENT_BYTES)
        .min(MAX_SEGMENT_BYTES);
    read_regions(mem, data, &mut bytes[..used])?;

    let mut segments = Vec::with_capacity(used / SEGMENT_LEN);
    for raw in bytes[..used].chunks_exact(SEGMENT_LEN) {
        let mut field = [0u8; SEGMENT_LEN];
        field.copy_from_slice(raw);
        let [s0, s1, s2, s3, s4, s5, s6, s7, n0, n1, n2, n3, f0, f1, f2, f3] = field;
        let sector = u64::from_le_bytes([s0, s1, s2, s3, s4, s5, s6, s7]);
        let num_sectors = u32::from_le_bytes([n0, n1, n2, n3]);
        let flags = u32::from_le_bytes([f0, f1, f2, f3]);
        if flags & !allowed_flags != 0 {
            return Err(RequestError::UnsupportedFlags { flags });
        }
        if num_sectors > max_sectors {
            return Err(RequestError::TooManySectors {
                num_sectors,
                max: max_sectors,
            });
        }
        check_range(sector, u64::from(num_sectors), capacity)?;
        segments.push(Segment {
            sector,
            num_sectors,
            unmap: flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0,
        });
    }
    Ok(segments)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_utils::{
        desc, guest_memory, header, indirect, DATA, HDR, MEM_SIZE, NEXT, R, STATUS, W,
    };
    use ember_memory::GuestMemoryMmap;
    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::Bytes;

    const CAPACITY: u64 = 2048;

    fn parse_descs(
        mem: &GuestMemoryMmap,
        descs: &[RawDescriptor],
        read_only: bool,
    ) -> Result<Request, RequestError> {
        let vq = MockSplitQueue::new(mem, 16);
        let chain = vq.build_desc_chain(descs).unwrap();
        parse(chain, CAPACITY, read_only)
    }

    fn region(addr: u64, len: u32) -> DataRegion {
        DataRegion {
            addr: GuestAddress(addr),
            len,
        }
    }

    fn write_segment(mem: &GuestMemoryMmap, addr: u64, sector: u64, num: u32, flags: u32) {
        let mut seg = [0u8; 16];
        seg[..8].copy_from_slice(&sector.to_le_bytes());
        seg[8..12].copy_from_slice(&num.to_le_bytes());
        seg[12..].copy_from_slice(&flags.to_le_bytes());
        mem.write_slice(&seg, GuestAddress(addr)).unwrap();
    }

    #[test]
    fn request_parse_in_is_accepted() {
        let mem = guest_memory();
        header(&mem, HDR, VIRTIO_BLK_T_IN, 8);
        let req = parse_descs(
            &mem,
            &[desc(HDR, 16, R), desc(DATA, 1024, W), desc(STATUS, 1, W)],
            false,
        )
        .unwrap();
        assert_eq!(req.kind(), &RequestKind::In { sector: 8 });
        assert_eq!(req.data(), &[region(DATA, 1024)]);
        assert_eq!(req.data_len(), 1024);
        assert_eq!(req.status_addr(), GuestAddress(STATUS));
    }

    #[test]
    fn request_parse_out_is_accepted() {
        let mem = guest_memory();
        header(&mem, HDR, VIRTIO_BLK_T_OUT, 1);
        let req = parse_descs(
            &mem,
            &[desc(HDR, 16, R), desc(DATA, 512, R), desc(STATUS, 1, W)],
            false,
        )
        .unwrap();
        assert_eq!(req.kind(), &RequestKind::Out { sector: 1 });
        assert_eq!(req.data(), &[region(DATA, 512)]);
    }

    #[test]
    fn request_parse_flush_and_get_id_are_accepted() {
        let mem = guest_memory();
        header(&mem, HDR, VIRTIO_BLK_T_FLUSH, 0);
        let req = parse_descs(&mem, &[desc(HDR, 16, R), desc(STATUS, 1, W)], true).unwrap();
        assert_eq!(req.kind(), &RequestKind::Flush);
        assert!(req.data().is_empty());

        header(&mem, HDR, VIRTIO_BLK_T_GET_ID, 0);
        let req = parse_descs(
            &mem,
            &[desc(HDR, 16, R), desc(DATA, 20, W), desc(STATUS, 1, W)],
            true,
        )
        .unwrap();
        assert_eq!(req.kind(), &RequestKind::GetId);
        assert_eq!(req.data_len(), 20);
    }

    #[test]
    fn request_parse_get_id_with_readable_buffer_is_rejected() {
        let mem = guest_memory();
        header(&mem, HDR, VIRTIO_BLK_T_GET_ID, 0);
        let err = parse_descs(
            &mem,
            &[desc(HDR, 16, R), desc(DATA, 20, R), desc(STATUS, 1, W)],
            false,
        )
        .unwrap_err();
        assert_eq!(
            err,
            RequestError::WrongDirection {
                request_type: VIRTIO_BLK_T_GET_ID
            }
        );
    }

    #[test]
    fn request_parse_discard_and_write_zeroes_are_accepted() {
        let mem = guest_memory();
        header(&mem, HDR, VIRTIO_BLK_T_DISCARD, 0);
        write_segment(&mem, DATA, 16, 32, 0);
        let chain = [desc(HDR, 16, R), desc(DATA, 16, R), desc(STATUS, 1, W)];
        let req = parse_descs(&mem, &chain, false).unwrap();
        let seg = Segment {
            sector: 16,
            num_sectors: 32,
            unmap: false,
        };
        assert_eq!(req.kind(), &RequestKind::Discard(vec![seg]));
        assert_eq!((seg.offset(), seg.len()), (16 * 512, 32 * 512));

        header(&mem, HDR, VIRTIO_BLK_T_WRITE_ZEROES, 0);
        write_segment(&mem, DATA, 16, 32, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP);
        let req = parse_descs(&mem, &chain, false).unwrap();
        let seg = Segment {
            sector: 16,
            num_sectors: 32,
            unmap: true,
        };
        assert_eq!(req.kind(), &RequestKind::WriteZeroes(vec![seg]));
    }

    #[test]
    fn request_parse_bad_segment_count_is_rejected() {
        let mem = guest_memory();
        header(&mem, HDR, VIRTIO_BLK_T_DISCARD, 0);
        for len in [0, 8, 20, 32] {
            let mut chain = vec![desc(HDR, 16, R)];
            if len > 0 {
                chain.push(desc(DATA, len, R));
            }
            chain.push(desc(STATUS, 1, W));
            let err = parse_descs(&mem, &chain, false).unwrap_err();
            assert_eq!(
                err,
                RequestError::BadSegmentCount {
                    len: u64::from(len),
                    max: MAX_DISCARD_SEG
                }
            );
        }
    }

    #[test]
    fn request_parse_segment_flags_are_checked() {
        let mem = guest_memory();
        let chain = [desc(HDR, 16, R), desc(DATA, 16, R), desc(STATUS, 1, W)];
        // UNMAP is meaningless on a discard.
        header(&mem, HDR, VIRTIO_BLK_T_DISCARD, 0);
        write_segment(&mem, DATA, 0, 1, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP);
        let err = parse_descs(&mem, &chain, false).unwrap_err();
        assert_eq!(err, RequestError::UnsupportedFlags { flags: 1 });
        assert_eq!(u32::from(err.status()), VIRTIO_BLK_S_UNSUPP);
        // Unknown flags on a write-zeroes.
        header(&mem, HDR, VIRTIO_BLK_T_WRITE_ZEROES, 0);
        write_segment(&mem, DATA, 0, 1, 0x2);
        let err = parse_descs(&mem, &chain, false).unwrap_err();
        assert_eq!(err, RequestError::UnsupportedFlags { flags: 2 });
    }

    #[test]
    fn request_parse_segment_limits_are_checked() {
        let mem = guest_memory();
        let chain = [desc(HDR, 16, R), desc(DATA, 16, R), desc(STATUS, 1, W)];
        header(&mem, HDR, VIRTIO_BLK_T_WRITE_ZEROES, 0);
        write_segment(&mem, DATA, 0, MAX_WRITE_ZEROES_SECTORS + 1, 0);
        let err = parse_descs(&mem, &chain, false).unwrap_err();
        assert!(matches!(err, RequestError::TooManySectors { .. }));
        write_segment(&mem, DATA, CAPACITY - 1, 2, 0);
        let err = parse_descs(&mem, &chain, false).unwrap_err();
        assert!(matches!(err, RequestError::OutOfRange { .. }));
        write_segment(&mem, DATA, u64::MAX, 1, 0);
        let err = parse_descs(&mem, &chain, false).unwrap_err();
        assert!(matches!(err, RequestError::OutOfRange { .. }));
    }

    #[test]
    fn request_parse_short_header_is_rejected() {
        let mem = guest_memory();
        header(&mem, HDR, VIRTIO_BLK_T_IN, 0);
        let err = parse_descs(
            &mem,
            &[desc(HDR, 8, R), desc(DATA, 512, W), desc(STATUS, 1, W)],
            false,
        )
        .unwrap_err();
        assert_eq!(err, RequestError::HeaderTooShort { len: 8 });
        assert_eq!(u32::from(err.status()), VIRTIO_BLK_S_IOERR);
    }

    #[test]
    fn request_parse_writable_header_is_rejected() {
        let mem = guest_memory();
        header(&mem, HDR, VIRTIO_BLK_T_IN, 0);
        let err = parse_descs(
            &mem,
            &[desc(HDR, 16, W), desc(DATA, 512, W), desc(STATUS, 1, W)],
            false,
        )
        .unwrap_err();
        assert_eq!(err, RequestError::HeaderTooShort { len: 0 });
    }

    #[test]
    fn request_parse_split_header_and_shared_descriptors_are_accepted() {
        let mem = guest_memory();
        header(&mem, HDR, VIRTIO_BLK_T_OUT, 3);
        // Header over two descriptors: 10 bytes, then 6 bytes + 512 of data.
        let mut bytes = [0u8; 16];
        mem.read_slice(&mut bytes, GuestAddress(HDR)).unwrap();
        mem.write_slice(&bytes[..10], GuestAddress(0x5_0000))
            .unwrap();
        mem.write_slice(&bytes[10..], GuestAddress(0x6_0000))
            .unwrap();
        let req = parse_descs(
            &mem,
            &[
                desc(0x5_0000, 10, R),
                desc(0x6_0000, 6 + 512, R),
                desc(STATUS, 1, W),
            ],
            false,
        )
        .unwrap();
        assert_eq!(req.kind(), &RequestKind::Out { sector: 3 });
        assert_eq!(req.data(), &[region(0x6_0006, 512)]);

        // IN data and the status in one descriptor.
        header(&mem, HDR, VIRTIO_BLK_T_IN, 3);
        let req = parse_descs(&mem, &[desc(HDR, 16, R), desc(DATA, 1025, W)], false).unwrap();
        assert_eq!(req.data(), &[region(DATA, 1024)]);
        assert_eq!(req.status_addr(), GuestAddress(DATA + 1024));
    }

    #[test]
    fn request_parse_in_with_readable_data_is_rejected() {
        let mem = guest_memory();
        header(&mem, HDR, VIRTIO_BLK_T_IN, 0);
        let err = parse_descs(
            &mem,
            &[desc(HDR, 16, R), desc(DATA, 512, R), desc(STATUS, 1, W)],
            false,
        )
        .unwrap_err();
        assert_eq!(
            err,
            RequestError::WrongDirection {
                request_type: VIRTIO_BLK_T_IN
            }
        );
    }

    #[test]
    fn request_parse_out_with_writable_data_is_rejected() {
        let mem = guest_memory();
        header(&mem, HDR, VIRTIO_BLK_T_OUT, 0);
        let err = parse_descs(
            &mem,
            &[desc(HDR, 16, R), desc(DATA, 512, W), desc(STATUS, 1, W)],
            false,
        )
        .unwrap_err();
        assert_eq!(
            err,
            RequestError::WrongDirection {
                request_type: VIRTIO_BLK_T_OUT
            }
        );
    }

    #[test]
    fn request_parse_unaligned_length_is_rejected() {
        let mem = guest_memory();
        header(&mem, HDR, VIRTIO_BLK_T_IN, 0);
        let err = parse_descs(
            &mem,
            &[desc(HDR, 16, R), desc(DATA, 511, W), desc(STATUS, 1, W)],
            false,
        )
        .unwrap_err();
        assert_eq!(err, RequestError::UnalignedLength { len: 511 });
    }

    #[test]
    fn request_parse_past_capacity_is_rejected() {
        let mem = guest_memory();
        let chain = [desc(HDR, 16, R), desc(DATA, 1024, W), desc(STATUS, 1, W)];
        header(&mem, HDR, VIRTIO_BLK_T_IN, CAPACITY - 2);
        assert!(parse_descs(&mem, &chain, false).is_ok());
        header(&mem, HDR, VIRTIO_BLK_T_IN, CAPACITY - 1);
        let err = parse_descs(&mem, &chain, false).unwrap_err();
        assert_eq!(
            err,
            RequestError::OutOfRange {
                sector: CAPACITY - 1,
                sectors: 2,
                capacity: CAPACITY
            }
        );
    }

    #[test]
    fn request_parse_sector_overflow_is_rejected() {
        let mem = guest_memory();
        header(&mem, HDR, VIRTIO_BLK_T_OUT, u64::MAX);
        let chain = [desc(HDR, 16, R), desc(DATA, 1024, R), desc(STATUS, 1, W)];
        let err = parse_descs(&mem, &chain, false).unwrap_err();
        assert!(matches!(
            err,
            RequestError::OutOfRange {
                sector: u64::MAX,
                ..
            }
        ));
        // Even with a capacity that would admit it, the byte offset overflows.
        let vq = MockSplitQueue::new(&mem, 16);
        let err = parse(vq.build_desc_chain(&chain).unwrap(), u64::MAX, false).unwrap_err();
        assert!(matches!(err, RequestError::OutOfRange { .. }));
        header(&mem, HDR, VIRTIO_BLK_T_OUT, u64::MAX / 512);
        let err = parse(vq.build_desc_chain(&chain).unwrap(), u64::MAX, false).unwrap_err();
        assert!(matches!(err, RequestError::OutOfRange { .. }));
    }

    #[test]
    fn request_parse_descriptor_loop_is_cut() {
        let mem = guest_memory();
        header(&mem, HDR, VIRTIO_BLK_T_IN, 0);
        let vq = MockSplitQueue::new(&mem, 16);
        // 0 -> 1 -> 0 -> 1 ...: header, data, header, data ...
        let descs = [
            RawDescriptor::from(SplitDescriptor::new(HDR, 16, NEXT, 1)),
            RawDescriptor::from(SplitDescriptor::new(DATA, 512, NEXT | W, 0)),
        ];
        vq.add_desc_chains(&descs, 0).unwrap();
        let mut q: virtio_queue::Queue = vq.create_queue().unwrap();
        let chain = virtio_queue::QueueT::pop_descriptor_chain(&mut q, &mem).unwrap();
        let err = parse(chain.clone(), CAPACITY, false).unwrap_err();
        assert_eq!(err, RequestError::ReadableAfterWritable);
        // The status is the last byte of the last descriptor the (cut) walk saw.
        assert_eq!(status_address(chain), Some(GuestAddress(DATA + 511)));

        // A descriptor pointing at itself.
        let descs = [RawDescriptor::from(SplitDescriptor::new(HDR, 16, NEXT, 0))];
        vq.add_desc_chains(&descs, 0).unwrap();
        let chain = virtio_queue::QueueT::pop_descriptor_chain(&mut q, &mem).unwrap();
        assert_eq!(
            parse(chain.clone(), CAPACITY, false).unwrap_err(),
            RequestError::NoStatus
        );
        assert_eq!(status_address(chain), None);
    }

    #[test]
    fn request_parse_too_many_descriptors_is_rejected() {
        let mem = guest_memory();
        header(&mem, HDR, VIRTIO_BLK_T_IN, 0);
        // An indirect table of 300 descriptors: header, 298 x 512 B, status.
        let mut table = vec![(HDR, 16, R)];
        table.extend((0..298u64).map(|i| (DATA + i * 512, 512, W)));
        table.push((STATUS, 1, W));
        let ind = indirect(&mem, 0x20_0000, &table);
        let vq = MockSplitQueue::new(&mem, 16);
        let chain = vq.build_desc_chain(&[ind]).unwrap();
        assert_eq!(
            parse(chain.clone(), CAPACITY, false).unwrap_err(),
            RequestError::TooManyDescriptors {
                max: MAX_DESCRIPTORS
            }
        );
        assert_eq!(status_address(chain), None);

        // 256 is the limit, and it is accepted.
        let mut table = vec![(HDR, 16, R)];
        table.extend((0..254u64).map(|i| (DATA + i * 512, 512, W)));
        table.push((STATUS, 1, W));
        let ind = indirect(&mem, 0x20_0000, &table);
        let chain = vq.build_desc_chain(&[ind]).unwrap();
        let req = parse(chain, CAPACITY, false).unwrap();
        assert_eq!(req.data().len(), 254);
    }

    #[test]
    fn request_parse_address_outside_memory_is_rejected() {
        let mem = guest_memory();
        header(&mem, HDR, VIRTIO_BLK_T_IN, 0);
        let end = MEM_SIZE as u64;
        for (addr, len) in [(end, 512), (end - 256, 512), (u64::MAX - 255, 512)] {
            let err = parse_descs(
                &mem,
                &[desc(HDR, 16, R), desc(addr, len, W), desc(STATUS, 1, W)],
                false,
            )
            .unwrap_err();
            assert_eq!(err, RequestError::OutsideMemory { addr, len });
        }
        // The status byte too.
        let err = parse_descs(
            &mem,
            &[desc(HDR, 16, R), desc(DATA, 512, W), desc(end, 1, W)],
            false,
        )
        .unwrap_err();
        assert_eq!(err, RequestError::OutsideMemory { addr: end, len: 1 });
    }

    #[test]
    fn request_parse_header_only_chain_has_no_status() {
        let mem = guest_memory();
        header(&mem, HDR, VIRTIO_BLK_T_IN, 0);
        let vq = MockSplitQueue::new(&mem, 16);
        let chain = vq.build_desc_chain(&[desc(HDR, 16, R)]).unwrap();
        assert_eq!(
            parse(chain.clone(), CAPACITY, false).unwrap_err(),
            RequestError::NoStatus
        );
        assert_eq!(status_address(chain), None);
        // A zero-length last descriptor has no room for the status either.
        let chain = vq
            .build_desc_chain(&[desc(HDR, 16, R), desc(STATUS, 0, W)])
            .unwrap();
        assert_eq!(
            parse(chain, CAPACITY, false).unwrap_err(),
            RequestError::NoStatus
        );
    }

    #[test]
    fn request_parse_readable_after_writable_is_rejected() {
        let mem = guest_memory();
        header(&mem, HDR, VIRTIO_BLK_T_OUT, 0);
        let err = parse_descs(
            &mem,
            &[
                desc(HDR, 16, R),
                desc(STATUS, 1, W),
                desc(DATA, 512, R),
                desc(STATUS, 1, W),
            ],
            false,
        )
        .unwrap_err();
        assert_eq!(err, RequestError::ReadableAfterWritable);
    }

    #[test]
    fn request_parse_three_data_descriptors_are_kept_in_order() {
        let mem = guest_memory();
        header(&mem, HDR, VIRTIO_BLK_T_IN, 4);
        let req = parse_descs(
            &mem,
            &[
                desc(HDR, 16, R),
                desc(DATA + 0x2000, 512, W),
                desc(DATA, 1024, W),
                desc(DATA + 0x4000, 512, W),
                desc(STATUS, 1, W),
            ],
            false,
        )
        .unwrap();
        assert_eq!(
            req.data(),
            &[
                region(DATA + 0x2000, 512),
                region(DATA, 1024),
                region(DATA + 0x4000, 512)
            ]
        );
        assert_eq!(req.data_len(), 2048);
    }

    #[test]
    fn request_parse_read_only_disk_rejects_writes() {
        let mem = guest_memory();
        write_segment(&mem, DATA, 0, 1, 0);
        for t in [
            VIRTIO_BLK_T_OUT,
            VIRTIO_BLK_T_DISCARD,
            VIRTIO_BLK_T_WRITE_ZEROES,
        ] {
            header(&mem, HDR, t, 0);
            let len = if t == VIRTIO_BLK_T_OUT { 512 } else { 16 };
            let chain = [desc(HDR, 16, R), desc(DATA, len, R), desc(STATUS, 1, W)];
            assert!(parse_descs(&mem, &chain, false).is_ok());
            let err = parse_descs(&mem, &chain, true).unwrap_err();
            assert_eq!(err, RequestError::ReadOnly { request_type: t });
            assert_eq!(u32::from(err.status()), VIRTIO_BLK_S_IOERR);
        }
        // Reads stay allowed.
        header(&mem, HDR, VIRTIO_BLK_T_IN, 0);
        let chain = [desc(HDR, 16, R), desc(DATA, 512, W), desc(STATUS, 1, W)];
        assert!(parse_descs(&mem, &chain, true).is_ok());
    }

    #[test]
    fn request_parse_unknown_type_is_unsupported() {
        let mem = guest_memory();
        for t in [2, 3, 0x10, u32::MAX] {
            header(&mem, HDR, t, 0);
            let err =
                parse_descs(&mem, &[desc(HDR, 16, R), desc(STATUS, 1, W)], false).unwrap_err();
            assert_eq!(err, RequestError::Unsupported { request_type: t });
            assert_eq!(u32::from(err.status()), VIRTIO_BLK_S_UNSUPP);
        }
    }
}
