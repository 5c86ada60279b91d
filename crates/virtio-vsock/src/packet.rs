//! virtio-vsock packets (virtio 1.2, 5.10.6): the 44-byte header, and
//! packets taken from and put into descriptor chains.
//!
//! Everything here reads guest-controlled bytes: a chain too short for its
//! header or its stated payload, a payload over [`MAX_PAYLOAD`], or
//! descriptors outside guest memory are refused with a [`PacketError`],
//! never trusted.

use ember_memory::GuestMemoryMmap;
use vm_memory::{Bytes, GuestAddress};

/// Bytes of a packet header.
pub const HDR_SIZE: usize = 44;
/// The largest payload a packet may carry (Linux's
/// `VIRTIO_VSOCK_MAX_PKT_BUF_SIZE`).
pub const MAX_PAYLOAD: u32 = 64 * 1024;

/// `type`: a stream socket, the only type the device offers.
pub const TYPE_STREAM: u16 = 1;

/// `op`: connect.
pub const OP_REQUEST: u16 = 1;
/// `op`: the connection is accepted.
pub const OP_RESPONSE: u16 = 2;
/// `op`: the connection is refused or torn down.
pub const OP_RST: u16 = 3;
/// `op`: the sender will not receive and/or send any more (`flags`).
pub const OP_SHUTDOWN: u16 = 4;
/// `op`: data.
pub const OP_RW: u16 = 5;
/// `op`: the sender's buffer space (`buf_alloc`, `fwd_cnt`) changed.
pub const OP_CREDIT_UPDATE: u16 = 6;
/// `op`: the sender asks for a credit update.
pub const OP_CREDIT_REQUEST: u16 = 7;

/// `flags` of `OP_SHUTDOWN`: the sender will receive no more data.
pub const SHUTDOWN_RCV: u32 = 1;
/// `flags` of `OP_SHUTDOWN`: the sender will send no more data.
pub const SHUTDOWN_SEND: u32 = 2;

/// A packet header, little-endian on the wire.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Header {
    /// Source context id.
    pub src_cid: u64,
    /// Destination context id.
    pub dst_cid: u64,
    /// Source port.
    pub src_port: u32,
    /// Destination port.
    pub dst_port: u32,
    /// Payload bytes.
    pub len: u32,
    /// Socket type ([`TYPE_STREAM`]).
    pub type_: u16,
    /// Operation (`OP_*`).
    pub op: u16,
    /// Operation flags (`SHUTDOWN_*` for `OP_SHUTDOWN`).
    pub flags: u32,
    /// The sender's receive buffer size.
    pub buf_alloc: u32,
    /// Bytes the sender has consumed from its receive buffer, ever (wraps).
    pub fwd_cnt: u32,
}

impl Header {
    /// Reads a header from its wire form.
    pub fn from_bytes(b: &[u8; HDR_SIZE]) -> Self {
        let u64_at = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().unwrap_or([0; 8]));
        let u32_at = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().unwrap_or([0; 4]));
        let u16_at = |o: usize| u16::from_le_bytes([b[o], b[o + 1]]);
        Header {
            src_cid: u64_at(0),
            dst_cid: u64_at(8),
            src_port: u32_at(16),
            dst_port: u32_at(20),
            len: u32_at(24),
            type_: u16_at(28),
            op: u16_at(30),
            flags: u32_at(32),
            buf_alloc: u32_at(36),
            fwd_cnt: u32_at(40),
        }
    }

    /// The header's wire form.
    pub fn to_bytes(&self) -> [u8; HDR_SIZE] {
        let mut b = [0u8; HDR_SIZE];
        b[0..8].copy_from_slice(&self.src_cid.to_le_bytes());
        b[8..16].copy_from_slice(&self.dst_cid.to_le_bytes());
        b[16..20].copy_from_slice(&self.src_port.to_le_bytes());
        b[20..24].copy_from_slice(&self.dst_port.to_le_bytes());
        b[24..28].copy_from_slice(&self.len.to_le_bytes());
        b[28..30].copy_from_slice(&self.type_.to_le_bytes());
        b[30..32].copy_from_slice(&self.op.to_le_bytes());
        b[32..36].copy_from_slice(&self.flags.to_le_bytes());
        b[36..40].copy_from_slice(&self.buf_alloc.to_le_bytes());
        b[40..44].copy_from_slice(&self.fwd_cnt.to_le_bytes());
        b
    }
}

/// Why a chain does not hold a packet.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PacketError {
    /// Fewer readable (or writable) bytes than a header.
    #[error("a chain of {0} bytes cannot hold a {HDR_SIZE}-byte header")]
    Short(usize),
    /// The header states more payload than the chain carries.
    #[error("the header says {stated} payload bytes, the chain carries {carried}")]
    Truncated {
        /// The header's `len`.
        stated: u32,
        /// The chain's bytes after the header.
        carried: u64,
    },
    /// The payload is over [`MAX_PAYLOAD`].
    #[error("a {0}-byte payload is over the {MAX_PAYLOAD}-byte limit")]
    TooLong(u32),
    /// A descriptor is outside guest memory.
    #[error("descriptor at {0:#x} is outside guest memory")]
    Memory(u64),
    /// A readable descriptor follows a writable one, or the reverse.
    #[error("the chain's descriptors are not all of one direction")]
    Direction,
}

/// One descriptor of a chain: guest address, length, device-writable.
pub type Desc = (u64, u32, bool);

/// A packet the driver sent (a transmit-queue chain): its header and
/// payload, copied out of guest memory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TxPacket {
    /// The header.
    pub hdr: Header,
    /// `hdr.len` bytes of payload (empty unless `OP_RW`).
    pub payload: Vec<u8>,
}

/// Walks `descs` from `skip` bytes in, over at most `len` bytes: calls `f`
/// with each piece's guest address and its range in the `len` bytes.
/// Returns how many bytes the chain had room for.
fn walk(
    descs: &[Desc],
    mut skip: u64,
    len: usize,
    mut f: impl FnMut(GuestAddress, std::ops::Range<usize>) -> Result<(), PacketError>,
) -> Result<usize, PacketError> {
    let mut at = 0usize;
    for &(addr, dlen, _) in descs {
        if at == len {
            break;
        }
        let dlen = u64::from(dlen);
        if skip >= dlen {
            skip -= dlen;
            continue;
        }
        let avail = usize::try_from(dlen - skip).unwrap_or(usize::MAX);
        let n = avail.min(len - at);
        let start = addr.checked_add(skip).ok_or(PacketError::Memory(addr))?;
        f(GuestAddress(start), at..at + n)?;
        at += n;
        skip = 0;
    }
    Ok(at)
}

/// Gathers `out.len()` bytes from `descs`, starting `skip` bytes in.
fn gather(
    mem: &GuestMemoryMmap,
    descs: &[Desc],
    skip: u64,
    out: &mut [u8],
) -> Result<(), PacketError> {
    walk(descs, skip, out.len(), |addr, r| {
        mem.read_slice(&mut out[r], addr)
            .map_err(|_| PacketError::Memory(addr.0))
    })
    .map(|_| ())
}

/// Scatters `data` into `descs`, starting `skip` bytes in; returns the
/// bytes written (all of `data` when the chain is long enough).
fn scatter(
    mem: &GuestMemoryMmap,
    descs: &[Desc],
    skip: u64,
    data: &[u8],
) -> Result<usize, PacketError> {
    walk(descs, skip, data.len(), |addr, r| {
        mem.write_slice(&data[r], addr)
            .map_err(|_| PacketError::Memory(addr.0))
    })
}

fn total(descs: &[Desc]) -> u64 {
    descs.iter().map(|&(_, len, _)| u64::from(len)).sum()
}

/// Reads the packet in a transmit chain (device-readable descriptors only).
pub fn parse_tx(mem: &GuestMemoryMmap, descs: &[Desc]) -> Result<TxPacket, PacketError> {
    if descs.iter().any(|&(_, _, writable)| writable) {
        return Err(PacketError::Direction);
    }
    let size = total(descs);
    if size < HDR_SIZE as u64 {
        return Err(PacketError::Short(usize::try_from(size).unwrap_or(0)));
    }
    let mut raw = [0u8; HDR_SIZE];
    gather(mem, descs, 0, &mut raw)?;
    let hdr = Header::from_bytes(&raw);
    // Only data packets carry a payload; others' `len` is not read.
    let len = if hdr.op == OP_RW { hdr.len } else { 0 };
    if len > MAX_PAYLOAD {
        return Err(PacketError::TooLong(len));
    }
    let carried = size - HDR_SIZE as u64;
    if u64::from(len) > carried {
        return Err(PacketError::Truncated {
            stated: len,
            carried,
        });
    }
    let mut payload = vec![0u8; len as usize];
    gather(mem, descs, HDR_SIZE as u64, &mut payload)?;
    Ok(TxPacket { hdr, payload })
}

/// A receive chain's device-writable space.
#[derive(Clone, Debug)]
pub struct RxBuffer {
    descs: Vec<Desc>,
    size: u64,
}

impl RxBuffer {
    /// Takes a receive chain (device-writable descriptors only, room for a
    /// header at least).
    pub fn new(descs: Vec<Desc>) -> Result<Self, PacketError> {
        if descs.iter().any(|&(_, _, writable)| !writable) {
            return Err(PacketError::Direction);
        }
        let size = total(&descs);
        if size < HDR_SIZE as u64 {
            return Err(PacketError::Short(usize::try_from(size).unwrap_or(0)));
        }
        Ok(RxBuffer { descs, size })
    }

    /// Payload bytes the buffer can take (at most [`MAX_PAYLOAD`]).
    pub fn payload_room(&self) -> usize {
        usize::try_from((self.size - HDR_SIZE as u64).min(u64::from(MAX_PAYLOAD))).unwrap_or(0)
    }

    /// Writes `hdr` (its `len` set to the payload's) and `payload`; returns
    /// the bytes written, the used length.
    pub fn write(
        &self,
        mem: &GuestMemoryMmap,
        hdr: &Header,
        payload: &[u8],
    ) -> Result<u32, PacketError> {
        let payload = &payload[..payload.len().min(self.payload_room())];
        let mut hdr = *hdr;
        hdr.len = u32::try_from(payload.len()).unwrap_or(MAX_PAYLOAD);
        scatter(mem, &self.descs, 0, &hdr.to_bytes())?;
        let n = scatter(mem, &self.descs, HDR_SIZE as u64, payload)?;
        Ok(u32::try_from(HDR_SIZE + n).unwrap_or(u32::MAX))
    }
}
