//! The transmit path: a chain is gathered into one bounded buffer and
//! handed to the backend whole, or dropped.

use std::io;

use log::debug;
use virtio_queue::DescriptorChain;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

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

/// Copies the device-readable chain into `buf`; returns the frame. A chain
/// the queue stopped walking early (its last descriptor says there is a
/// next one) is malformed rather than sent cut short.
pub(super) fn gather<'b>(
    chain: DescriptorChain<&GuestMemoryMmap>,
    mem: &GuestMemoryMmap,
    buf: &'b mut [u8],
) -> std::result::Result<&'b [u8], TxError> {
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
        let end = usize::try_from(d.len())
            .ok()
            .and_then(|n| len.checked_add(n))
            .ok_or(TxError::TooLong)?;
        let dst = buf.get_mut(len..end).ok_or(TxError::TooLong)?;
        mem.read_slice(dst, d.addr())
            .map_err(|_| TxError::GuestMemory(d.addr()))?;
        len = end;
    }
    if more {
        return Err(TxError::Cut);
    }
    if len < VNET_HDR_LEN {
        return Err(TxError::TooShort(len));
    }
    buf.get(..len).ok_or(TxError::TooLong)
}

/// Hands one frame to the backend, counting it as sent or dropped.
pub(super) fn send(
    backend: &mut dyn NetBackend,
    frame: &[u8],
    c: &mut NetCounters,
    log: &mut FaultLog,
) {
    match backend.write(frame) {
        Ok(n) if n == frame.len() => {
            c.tx_packets = c.tx_packets.saturating_add(1);
            c.tx_bytes = c.tx_bytes.saturating_add(payload_len(frame.len()));
            return;
        }
        Ok(n) => log.report(
            Fault::TxBackend,
            format_args!("backend took {n} of {} bytes", frame.len()),
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
