//! Running one parsed request on the backend: the [`Executor`] borrows the
//! device's backend, memory and counters for one pass over a queue, moves
//! the data straight between the guest's buffers and the backend, and
//! writes the status byte.

use std::io;

use ember_memory::{GuestMemoryMmap, Slice};
use log::{debug, warn};
use virtio_bindings::virtio_blk::{VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK};
use virtio_queue::DescriptorChain;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use crate::backend::BlockBackend;
use crate::device::{first, status_byte, BlockCounters, IoClass, Logged, IO_CHUNK};
use crate::request::{self, DataRegion, Request, RequestKind, ID_BYTES, SECTOR_SIZE};
use crate::uring::{OpKind, Submission, Uring};
use crate::ErrorPolicy;

/// Why an accepted request failed; it completes with IOERR. Only logged, so
/// the message carries the cause.
#[derive(Debug, thiserror::Error)]
pub(crate) enum ExecError {
    /// The backend failed.
    #[error("backend I/O failed: {0}")]
    Backend(io::Error),
    /// Guest memory at this address could not be accessed.
    #[error("guest memory at {:#x} is not accessible", .0 .0)]
    GuestMemory(GuestAddress),
    /// The data buffer ended before the data (parse makes this impossible).
    #[error("the data buffer is too short")]
    ShortBuffer,
}

/// The result of running a request.
pub(crate) type ExecResult<T> = std::result::Result<T, ExecError>;

/// Everything running a request needs, borrowed from the device apart from
/// its queue.
pub(crate) struct Executor<'a> {
    pub(crate) backend: &'a mut dyn BlockBackend,
    pub(crate) id: &'a [u8; ID_BYTES],
    pub(crate) mem: &'a GuestMemoryMmap,
    pub(crate) disk: &'a str,
    pub(crate) capacity: u64,
    pub(crate) read_only: bool,
    pub(crate) logged: &'a mut Logged,
    pub(crate) counters: &'a mut BlockCounters,
    /// The guest buffers of the transfer under way (kept between requests
    /// so that a batch allocates once).
    pub(crate) slices: Vec<Slice<'a>>,
    /// What failed writes and reads do.
    pub(crate) werror: ErrorPolicy,
    pub(crate) rerror: ErrorPolicy,
    /// Why the disk stops, when a request failed under a stopping policy.
    pub(crate) stop: &'a mut Option<String>,
}

/// The policy that applies to a request of `kind`: `rerror` for reads,
/// `werror` for what changes the disk, none for get-id.
pub(crate) fn policy_for(
    werror: ErrorPolicy,
    rerror: ErrorPolicy,
    kind: &RequestKind,
) -> ErrorPolicy {
    match kind {
        RequestKind::In { .. } => rerror,
        RequestKind::Out { .. }
        | RequestKind::Flush
        | RequestKind::Discard(_)
        | RequestKind::WriteZeroes(_) => werror,
        RequestKind::GetId => ErrorPolicy::Report,
    }
}

/// What a request of `kind` does, for log lines.
pub(crate) fn op_name(kind: &RequestKind) -> &'static str {
    match kind {
        RequestKind::In { .. } => "read",
        RequestKind::Out { .. } => "write",
        RequestKind::Flush => "flush",
        RequestKind::GetId => "get-id",
        RequestKind::Discard(_) => "discard",
        RequestKind::WriteZeroes(_) => "write-zeroes",
    }
}

impl Executor<'_> {
    /// Parses a chain against this disk.
    pub(crate) fn parse(
        &self,
        chain: DescriptorChain<&GuestMemoryMmap>,
    ) -> std::result::Result<Request, request::RequestError> {
        request::parse(chain, self.capacity, self.read_only)
    }

    /// Runs a chain [`Executor::parse`] parsed and writes its status byte.
    /// Returns the used length: the bytes written to the guest (data and
    /// status), 0 if the status could not be written; `None` if the
    /// request failed under a stopping policy ([`Executor::complete`]).
    pub(crate) fn complete_parsed(
        &mut self,
        chain: DescriptorChain<&GuestMemoryMmap>,
        parsed: std::result::Result<Request, request::RequestError>,
    ) -> Option<u32> {
        let (status_addr, status, written) = match parsed {
            Ok(req) => return self.complete(&req),
            Err(e) => {
                self.counters.errors = self.counters.errors.saturating_add(1);
                if first(&mut self.logged.malformed) {
                    let disk = self.disk;
                    warn!("virtio-blk {disk}: malformed request: {e} (more at debug level)");
                } else {
                    debug!("virtio-blk {}: malformed request: {e}", self.disk);
                }
                (request::status_address(chain), e.status(), 0)
            }
        };
        Some(self.write_status(status_addr, status, written))
    }

    /// Runs an accepted request and writes its status byte; the used
    /// length. `None`: the host failed it under a stopping policy: no
    /// status is written, `stop` says why, and the caller keeps the
    /// request for a retry.
    pub(crate) fn complete(&mut self, req: &Request) -> Option<u32> {
        let (status, written) = match self.run(req) {
            Ok(written) => {
                self.count(req);
                if let Some(class) = IoClass::of(req.kind()) {
                    self.logged.backend_ok(self.disk, class);
                }
                (status_byte(VIRTIO_BLK_S_OK), written)
            }
            Err(ExecError::Backend(e))
                if policy_for(self.werror, self.rerror, req.kind()).stops_on(&e) =>
            {
                *self.stop = Some(format!("{} failed: {e}", op_name(req.kind())));
                return None;
            }
            Err(e) => {
                self.counters.errors = self.counters.errors.saturating_add(1);
                self.log_exec_error(&e, IoClass::of(req.kind()));
                (status_byte(VIRTIO_BLK_S_IOERR), 0)
            }
        };
        Some(self.write_status(Some(req.status_addr()), status, written))
    }

    /// Writes a status byte; the used length (0 if it could not be written).
    fn write_status(&mut self, addr: Option<GuestAddress>, status: u8, written: u32) -> u32 {
        let Some(addr) = addr else {
            return 0;
        };
        match self.mem.write_obj(status, addr) {
            Ok(()) => written.saturating_add(1),
            Err(_) => {
                self.log_exec_error(&ExecError::GuestMemory(addr), None);
                0
            }
        }
    }

    /// Hands a read, a write or a flush to the io_uring engine, if the
    /// backend can say where its bytes live (and, under `O_DIRECT`, the
    /// guest's buffers are aligned). False: the caller runs it.
    pub(crate) fn submit_to_ring(
        &mut self,
        u: &mut Uring,
        queue: u16,
        head: u16,
        req: &Request,
    ) -> bool {
        let len = req.data_len();
        let target = match req.kind() {
            RequestKind::In { sector } | RequestKind::Out { sector } => {
                let Ok(offset) = byte_offset(*sector) else {
                    return false;
                };
                let write = matches!(req.kind(), RequestKind::Out { .. });
                let kind = if write { OpKind::Write } else { OpKind::Read };
                self.backend
                    .direct_target(offset, len, write)
                    .map(|(fd, at)| (kind, fd, at))
            }
            RequestKind::Flush => self.backend.flush_target().map(|fd| (OpKind::Flush, fd, 0)),
            _ => None,
        };
        let Some((kind, fd, offset)) = target else {
            return false;
        };
        let regions: Vec<(GuestAddress, usize)> = if kind == OpKind::Flush {
            Vec::new()
        } else {
            req.data()
                .iter()
                .map(|r| (r.addr(), usize::try_from(r.len()).unwrap_or(usize::MAX)))
                .collect()
        };
        if let Some(align) = self.backend.dio_align() {
            let a = u64::try_from(align).unwrap_or(512);
            if offset % a != 0 || regions.iter().any(|&(g, n)| g.0 % a != 0 || n % align != 0) {
                return false;
            }
        }
        let s = Submission {
            queue,
            head,
            status: req.status_addr(),
            kind,
            fd,
            offset,
            regions: &regions,
            keep: (policy_for(self.werror, self.rerror, req.kind()) != ErrorPolicy::Report)
                .then_some(req),
        };
        match u.submit(&s, self.mem) {
            Ok(submitted) => submitted,
            Err(e) => {
                debug!("virtio-blk {}: io_uring submission: {e}", self.disk);
                false
            }
        }
    }

    /// Counts a request that completed with OK.
    fn count(&mut self, req: &Request) {
        let c = &mut *self.counters;
        match req.kind() {
            RequestKind::In { .. } => {
                c.reads = c.reads.saturating_add(1);
                c.read_bytes = c.read_bytes.saturating_add(req.data_len());
            }
            RequestKind::Out { .. } => {
                c.writes = c.writes.saturating_add(1);
                c.write_bytes = c.write_bytes.saturating_add(req.data_len());
            }
            RequestKind::Flush => c.flushes = c.flushes.saturating_add(1),
            RequestKind::GetId | RequestKind::Discard(_) | RequestKind::WriteZeroes(_) => {
                c.other = c.other.saturating_add(1);
            }
        }
    }

    pub(crate) fn log_exec_error(&mut self, e: &ExecError, class: Option<IoClass>) {
        let flag = match (e, class) {
            (ExecError::Backend(_), Some(class)) => {
                self.logged.backend_failed(self.disk, class, e);
                return;
            }
            (ExecError::Backend(_), None) => &mut self.logged.guest_memory,
            (ExecError::GuestMemory(_) | ExecError::ShortBuffer, _) => {
                &mut self.logged.guest_memory
            }
        };
        if first(flag) {
            let disk = self.disk;
            warn!("virtio-blk {disk}: request failed: {e} (more at debug level)");
        } else {
            debug!("virtio-blk {}: request failed: {e}", self.disk);
        }
    }

    /// Runs an accepted request; returns the data bytes written to the guest.
    fn run(&mut self, req: &Request) -> ExecResult<u32> {
        let backend = ExecError::Backend;
        match req.kind() {
            RequestKind::In { sector } => {
                self.read_to_guest(byte_offset(*sector)?, req.data(), req.data_len())?;
                Ok(u32::try_from(req.data_len()).unwrap_or(u32::MAX))
            }
            RequestKind::Out { sector } => {
                self.write_from_guest(byte_offset(*sector)?, req.data(), req.data_len())?;
                Ok(0)
            }
            RequestKind::Flush => {
                self.backend.flush().map_err(backend)?;
                Ok(0)
            }
            RequestKind::GetId => {
                let n = usize::try_from(req.data_len()).map_or(ID_BYTES, |l| l.min(ID_BYTES));
                Cursor::new(req.data()).write_guest(self.mem, &self.id[..n])?;
                Ok(u32::try_from(n).unwrap_or(0))
            }
            RequestKind::Discard(segments) => {
                for s in segments {
                    self.backend.discard(s.offset(), s.len()).map_err(backend)?;
                }
                Ok(0)
            }
            RequestKind::WriteZeroes(segments) => {
                for s in segments {
                    self.backend
                        .write_zeroes(s.offset(), s.len())
                        .map_err(backend)?;
                }
                Ok(0)
            }
        }
    }

    /// Reads `len` bytes at `offset` from the backend straight into the
    /// guest's buffers `data`, at most [`IO_CHUNK`] bytes per backend call.
    fn read_to_guest(&mut self, offset: u64, data: &[DataRegion], len: u64) -> ExecResult<()> {
        self.transfer(offset, data, len, false)
    }

    /// Writes `len` bytes of the guest's buffers `data` to the backend at
    /// `offset`, at most [`IO_CHUNK`] bytes per backend call.
    fn write_from_guest(&mut self, offset: u64, data: &[DataRegion], len: u64) -> ExecResult<()> {
        self.transfer(offset, data, len, true)
    }

    /// Moves `len` bytes between the backend at `offset` and the guest's
    /// buffers `data` (to the backend if `write`), handing the backend guest
    /// memory itself: no copy through a buffer of the device's.
    fn transfer(
        &mut self,
        mut offset: u64,
        data: &[DataRegion],
        len: u64,
        write: bool,
    ) -> ExecResult<()> {
        let mem = self.mem;
        let mut cursor = Cursor::new(data);
        let mut left = len;
        while left > 0 {
            let want = chunk_len(left, IO_CHUNK);
            self.slices.clear();
            let mut got = 0;
            while got < want {
                let (addr, n) = cursor.next_run(want - got).ok_or(ExecError::ShortBuffer)?;
                // A run may cross from one memory region into the next.
                for s in mem.get_slices(addr, n) {
                    self.slices
                        .push(s.map_err(|_| ExecError::GuestMemory(addr))?);
                }
                got += n;
            }
            if write {
                self.backend.write_vectored_at(&self.slices, offset)
            } else {
                self.backend.read_vectored_at(&self.slices, offset)
            }
            .map_err(ExecError::Backend)?;
            (offset, left) = advance(offset, left, want)?;
        }
        Ok(())
    }
}

/// The byte offset of `sector` (`parse` checked that it fits).
fn byte_offset(sector: u64) -> ExecResult<u64> {
    sector
        .checked_mul(SECTOR_SIZE)
        .ok_or_else(|| ExecError::Backend(io::ErrorKind::InvalidInput.into()))
}

/// The size of the next chunk: `left`, at most `max`.
fn chunk_len(left: u64, max: usize) -> usize {
    usize::try_from(left).map_or(max, |l| l.min(max))
}

/// Moves `offset` forward and `left` back by `n` bytes.
fn advance(offset: u64, left: u64, n: usize) -> ExecResult<(u64, u64)> {
    let n = u64::try_from(n).map_err(|_| ExecError::ShortBuffer)?;
    let offset = offset
        .checked_add(n)
        .ok_or_else(|| ExecError::Backend(io::ErrorKind::InvalidInput.into()))?;
    Ok((offset, left.saturating_sub(n)))
}

/// A position in a request's data buffer, which moves forward as bytes are
/// copied in or out.
struct Cursor<'a> {
    regions: &'a [DataRegion],
    index: usize,
    offset: u32,
}

impl<'a> Cursor<'a> {
    fn new(regions: &'a [DataRegion]) -> Self {
        Cursor {
            regions,
            index: 0,
            offset: 0,
        }
    }

    /// The next run of at most `max` bytes, and moves past it.
    fn next_run(&mut self, max: usize) -> Option<(GuestAddress, usize)> {
        loop {
            let r = self.regions.get(self.index)?;
            let left = r.len().saturating_sub(self.offset);
            if left == 0 {
                self.index += 1;
                self.offset = 0;
                continue;
            }
            let n = usize::try_from(left).map_or(max, |l| l.min(max));
            let addr = r.addr().0.checked_add(u64::from(self.offset))?;
            // n <= left, a u32.
            self.offset += u32::try_from(n).unwrap_or(left);
            return Some((GuestAddress(addr), n));
        }
    }

    /// Copies `src` to the guest at the cursor.
    fn write_guest(&mut self, mem: &GuestMemoryMmap, src: &[u8]) -> ExecResult<()> {
        let mut done = 0;
        while done < src.len() {
            let (addr, n) = self
                .next_run(src.len() - done)
                .ok_or(ExecError::ShortBuffer)?;
            mem.write_slice(&src[done..done + n], addr)
                .map_err(|_| ExecError::GuestMemory(addr))?;
            done += n;
        }
        Ok(())
    }
}
