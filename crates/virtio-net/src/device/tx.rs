//! The transmit path: a chain's buffers are checked (device-readable, in
//! guest memory, a header's worth and at most [`MAX_FRAME`] bytes in all)
//! and handed to the backend whole as guest memory, without a copy of
//! ours, or the chain is dropped.

use std::io;

use ember_memory::GuestMemoryMmap;
use ember_memory::Slice;
use log::debug;
use virtio_queue::DescriptorChain;
use vm_memory::{GuestAddress, GuestMemoryBackend};

use super::{payload_len, Fault, FaultLog, NetCounters, MAX_CHAIN_DESCS, MAX_FRAME, VNET_HDR_LEN};
use crate::backend::NetBackend;

/// Why a transmit chain was dropped. Only logged.
#[derive(Debug, thiserror::Error)]
pub(super) enum TxError {
    #[error("it has a device-writable descriptor")]
    WritableDescriptor,
    #[error("it is longer than {MAX_FRAME} bytes")]
    TooLong,
    #[error("its {0} bytes do not hold the {VNET_HDR_LEN}-byte header")]
    TooShort(usize),
    #[error("it has more than {MAX_CHAIN_DESCS} descriptors")]
    TooManyDescriptors,
    #[error("guest memory at {:#x} is not accessible", .0 .0)]
    GuestMemory(GuestAddress),
    #[error("it ends in a bad link (a loop, an index out of range, or past 4 GiB)")]
    Cut,
}

/// Collects the device-readable chain's buffers into `bufs` (emptied
/// first) as slices of guest memory; returns the frame's length. A chain
/// the queue stopped walking early (its last descriptor says there is a
/// next one) is malformed rather than sent cut short.
pub(super) fn gather<'m>(
    chain: DescriptorChain<&'m GuestMemoryMmap>,
    mem: &'m GuestMemoryMmap,
    bufs: &mut Vec<Slice<'m>>,
) -> std::result::Result<usize, TxError> {
    bufs.clear();
    let mut len = 0usize;
    let mut more = false;
    for (i, d) in chain.enumerate() {
        if i >= MAX_CHAIN_DESCS {
            return Err(TxError::TooManyDescriptors);
        }
        more = d.has_next();
        if d.is_write_only() {
            return Err(TxError::WritableDescriptor);
        }
        let n = usize::try_from(d.len()).map_err(|_| TxError::TooLong)?;
        len = len
            .checked_add(n)
            .filter(|l| *l <= MAX_FRAME)
            .ok_or(TxError::TooLong)?;
        // A buffer may run from one memory region into the next.
        for s in mem.get_slices(d.addr(), n) {
            let s = s.map_err(|_| TxError::GuestMemory(d.addr()))?;
            bufs.push(s);
        }
    }
    if more {
        return Err(TxError::Cut);
    }
    if len < VNET_HDR_LEN {
        return Err(TxError::TooShort(len));
    }
    Ok(len)
}

/// Hands one frame to the backend, counting it as sent or dropped.
pub(super) fn send(
    backend: &mut dyn NetBackend,
    frame: &[Slice<'_>],
    len: usize,
    c: &mut NetCounters,
    log: &mut FaultLog,
) {
    match backend.write_vectored(frame) {
        Ok(n) if n == len => {
            c.tx_packets = c.tx_packets.saturating_add(1);
            c.tx_bytes = c.tx_bytes.saturating_add(payload_len(len));
            return;
        }
        Ok(n) => log.report(
            Fault::TxBackend,
            format_args!("backend took {n} of {len} bytes"),
        ),
        // A full tap queue: the frame is lost, as on a congested wire.
        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
            debug!("virtio-net {}: backend busy, frame dropped", log.name);
        }
        Err(e) => log.report(
            Fault::TxBackend,
            format_args!("cannot send a frame, dropped: {e}"),
        ),
    }
    c.tx_dropped = c.tx_dropped.saturating_add(1);
}
