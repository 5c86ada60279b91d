//! The fault loop: read userfaultfd events, fill each faulting page.

use std::collections::VecDeque;
use std::io::{self, Read};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;

use userfaultfd::{Event, EventBuffer, Uffd};

use crate::{sys, validate_regions, Error, GuestRegionUffdMapping, MemoryFile, Result};

/// Events read per `read(2)` of the userfaultfd.
const EVENT_BATCH: usize = 64;
/// How long to wait before retrying faults the kernel refused with EAGAIN
/// (a `remove` is in flight), when no new event arrives meanwhile.
const RETRY_MS: i32 = 1;

/// What [`serve`] did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ServeStats {
    /// Pages filled from the memory file (`UFFDIO_COPY`).
    pub pages_copied: u64,
    /// Pages filled with zeros: holes of the file, and pages the VMM removed.
    pub zero_pages: u64,
    /// Faults on pages that were already present when the handler got to
    /// them (another fault on the same page was served first).
    pub already_present: u64,
    /// Faults on ranges the VMM unmapped meanwhile (ENOENT), dropped.
    pub dropped: u64,
    /// `UFFD_EVENT_REMOVE` events (balloon `MADV_DONTNEED`).
    pub remove_events: u64,
    /// Other events (fork, remap, unmap), which the VMM does not ask for.
    pub other_events: u64,
    /// Populate attempts the kernel asked to retry (EAGAIN).
    pub retries: u64,
}

impl ServeStats {
    /// Page faults resolved: copied plus zeroed.
    pub fn faults(&self) -> u64 {
        self.pages_copied + self.zero_pages
    }
}

/// Serves page faults on `uffd` from `memory` until the VMM closes its end
/// of `vmm`, the connection the handshake came on (Firecracker keeps it
/// open for as long as it runs, so this happens when the VMM exits), or
/// until the VMM's address space is gone.
///
/// A fault at `addr` in region `r` is filled with the `r.page_size` bytes at
/// `r.offset + (page - r.base_host_virt_addr)` of the memory file, or with
/// zeros where that is a hole of the file or where the VMM removed the page
/// (`UFFD_EVENT_REMOVE`: the guest gave it back through the balloon, so it
/// must come back zeroed, not with its snapshot contents).
pub fn serve(
    uffd: &Uffd,
    regions: &[GuestRegionUffdMapping],
    memory: &MemoryFile,
    vmm: &UnixStream,
) -> Result<ServeStats> {
    validate_regions(regions)?;
    check_regions_fit(regions, memory)?;
    vmm.set_nonblocking(true).map_err(Error::Poll)?;
    let mut server = Server {
        uffd,
        memory,
        regions: regions.iter().map(RegionState::new).collect(),
        host_page: sys::host_page_size(),
        zeros: Vec::new(),
        stats: ServeStats::default(),
    };
    server.run(vmm)?;
    Ok(server.stats)
}

fn check_regions_fit(regions: &[GuestRegionUffdMapping], memory: &MemoryFile) -> Result<()> {
    let len = memory.len() as u64;
    for (index, r) in regions.iter().enumerate() {
        let end = r.offset.saturating_add(r.size as u64);
        if end > len {
            return Err(Error::RegionBeyondFile {
                index,
                start: r.offset,
                end,
                path: memory.path().to_owned(),
                len,
            });
        }
    }
    Ok(())
}

/// A region and the pages of it the VMM removed.
struct RegionState {
    map: GuestRegionUffdMapping,
    /// One bit per page; empty until the first removal.
    removed: Vec<u64>,
}

impl RegionState {
    fn new(map: &GuestRegionUffdMapping) -> Self {
        Self {
            map: *map,
            removed: Vec::new(),
        }
    }

    fn pages(&self) -> usize {
        self.map.size / self.map.page_size
    }

    fn is_removed(&self, page: usize) -> bool {
        self.removed
            .get(page / 64)
            .is_some_and(|w| w & (1 << (page % 64)) != 0)
    }

    /// Marks the pages overlapping `[start, end)` (host addresses) removed.
    fn mark_removed(&mut self, start: u64, end: u64) {
        let base = self.map.base_host_virt_addr;
        let region_end = base + self.map.size as u64;
        let (lo, hi) = (start.max(base), end.min(region_end));
        if lo >= hi {
            return;
        }
        if self.removed.is_empty() {
            self.removed = vec![0; self.pages().div_ceil(64)];
        }
        let page = self.map.page_size as u64;
        // Both are below pages(), a usize.
        let first = usize::try_from((lo - base) / page).unwrap_or(usize::MAX);
        let last = usize::try_from((hi - base).div_ceil(page)).unwrap_or(usize::MAX);
        for p in first..last.min(self.pages()) {
            if let Some(w) = self.removed.get_mut(p / 64) {
                *w |= 1 << (p % 64);
            }
        }
    }
}

/// How one populate attempt ended.
enum Outcome {
    Done,
    Retry,
    VmmGone,
}

struct Server<'a> {
    uffd: &'a Uffd,
    memory: &'a MemoryFile,
    regions: Vec<RegionState>,
    host_page: usize,
    /// A page of zeros for huge-page regions, which UFFDIO_ZEROPAGE does
    /// not support; allocated on first use.
    zeros: Vec<u8>,
    stats: ServeStats,
}

impl Server<'_> {
    fn run(&mut self, vmm: &UnixStream) -> Result<()> {
        let mut events = EventBuffer::new(EVENT_BATCH);
        let mut pending: VecDeque<u64> = VecDeque::new();
        loop {
            let timeout = if pending.is_empty() { -1 } else { RETRY_MS };
            let ready = sys::poll_two(self.uffd.as_raw_fd(), vmm.as_raw_fd(), timeout)
                .map_err(Error::Poll)?;
            if ready.vmm != 0 && vmm_hung_up(vmm, ready.vmm) {
                return Ok(());
            }
            if ready.uffd & (libc::POLLERR | libc::POLLNVAL) != 0 {
                return Err(Error::UffdPollError);
            }
            if ready.uffd & libc::POLLIN != 0 {
                self.read_events(&mut events, &mut pending)?;
            }
            // Removes of this batch were applied first; now the faults.
            while let Some(&addr) = pending.front() {
                match self.serve_fault(addr)? {
                    Outcome::Done => {
                        pending.pop_front();
                    }
                    Outcome::Retry => break,
                    Outcome::VmmGone => return Ok(()),
                }
            }
        }
    }

    /// Reads what is queued: removes are applied at once, faults queued.
    fn read_events(&mut self, buf: &mut EventBuffer, pending: &mut VecDeque<u64>) -> Result<()> {
        let events = self
            .uffd
            .read_events(buf)
            .map_err(|e| Error::ReadEvents(to_io(e)))?;
        for event in events {
            match event.map_err(|e| Error::ReadEvents(to_io(e)))? {
                Event::Pagefault { addr, .. } => pending.push_back(addr as u64),
                Event::Remove { start, end } => {
                    self.stats.remove_events += 1;
                    for r in &mut self.regions {
                        r.mark_removed(start as u64, end as u64);
                    }
                }
                _ => self.stats.other_events += 1,
            }
        }
        Ok(())
    }

    fn serve_fault(&mut self, addr: u64) -> Result<Outcome> {
        let region = self
            .regions
            .iter()
            .find(|r| r.map.contains(addr))
            .ok_or(Error::FaultOutsideRegions(addr))?;
        let map = region.map;
        let page_size = map.page_size;
        let page = addr & !(page_size as u64 - 1);
        let in_region = page - map.base_host_virt_addr;
        let index = usize::try_from(in_region).unwrap_or(usize::MAX) / page_size;
        let file_offset = map.offset + in_region;
        if region.is_removed(index) || self.memory.is_hole(file_offset, page_size as u64) {
            return self.zero(page, page_size);
        }
        // Inside the file: serve() checked every region fits.
        let src = self
            .memory
            .bytes_at(file_offset, page_size)
            .ok_or(Error::FaultOutsideRegions(addr))?;
        self.copy(src, page, page_size)
    }

    fn zero(&mut self, page: u64, len: usize) -> Result<Outcome> {
        if len != self.host_page {
            // Huge pages: UFFDIO_ZEROPAGE is for base pages only.
            if self.zeros.len() != len {
                self.zeros = vec![0; len];
            }
            let zeros = self.zeros.as_ptr();
            let outcome = self.copy(zeros, page, len)?;
            if let Outcome::Done = outcome {
                self.stats.pages_copied -= 1;
                self.stats.zero_pages += 1;
            }
            return Ok(outcome);
        }
        // SAFETY: `page` is a page-aligned page of a region the VMM
        // registered with this userfaultfd; ZEROPAGE only maps zeros there,
        // in the VMM's address space, and touches no memory of ours.
        let result = unsafe { self.uffd.zeropage(page as *mut libc::c_void, len, true) };
        match result {
            Ok(_) => {
                self.stats.zero_pages += 1;
                Ok(Outcome::Done)
            }
            Err(e) => self.failed(page, len, "ZEROPAGE", e),
        }
    }

    fn copy(&mut self, src: *const u8, page: u64, len: usize) -> Result<Outcome> {
        // SAFETY: `src` points at `len` readable bytes (the read-only memory
        // file mapping, bounds-checked by `bytes_at`, or `self.zeros`), which
        // the kernel only reads; `page` is a page-aligned page of a region
        // the VMM registered with this userfaultfd, written in the VMM's
        // address space, not ours.
        let result = unsafe {
            self.uffd
                .copy(src.cast(), page as *mut libc::c_void, len, true)
        };
        match result {
            Ok(_) => {
                self.stats.pages_copied += 1;
                Ok(Outcome::Done)
            }
            Err(e) => self.failed(page, len, "COPY", e),
        }
    }

    /// Sorts a failed COPY or ZEROPAGE into retry, done, gone or error.
    fn failed(
        &mut self,
        page: u64,
        len: usize,
        op: &'static str,
        err: userfaultfd::Error,
    ) -> Result<Outcome> {
        let err = to_io(err);
        match err.raw_os_error() {
            // A non-cooperative event (remove) is queued: read it first.
            Some(libc::EAGAIN) => {
                self.stats.retries += 1;
                Ok(Outcome::Retry)
            }
            // Filled meanwhile; make sure the faulting thread is awake.
            Some(libc::EEXIST) => {
                self.stats.already_present += 1;
                let _ = self.uffd.wake(page as *mut libc::c_void, len);
                Ok(Outcome::Done)
            }
            Some(libc::ENOENT) => {
                self.stats.dropped += 1;
                Ok(Outcome::Done)
            }
            // The VMM's address space is gone: it exited.
            Some(libc::ESRCH) => Ok(Outcome::VmmGone),
            _ => Err(Error::Populate {
                addr: page,
                op,
                source: err,
            }),
        }
    }
}

/// Whether the VMM closed its end; stray bytes it sends are discarded.
fn vmm_hung_up(vmm: &UnixStream, revents: libc::c_short) -> bool {
    if revents & (libc::POLLHUP | libc::POLLRDHUP | libc::POLLERR | libc::POLLNVAL) != 0 {
        return true;
    }
    let mut buf = [0u8; 512];
    let mut reader = vmm;
    loop {
        match reader.read(&mut buf) {
            Ok(0) => return true,
            Ok(_) => continue,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return false,
            Err(_) => return true,
        }
    }
}

/// The errno inside a userfaultfd error, where there is one.
fn to_io(err: userfaultfd::Error) -> io::Error {
    use userfaultfd::Error as E;
    match err {
        E::CopyFailed(errno) | E::ZeropageFailed(errno) | E::SystemError(errno) => {
            io::Error::from_raw_os_error(errno as i32)
        }
        E::PartiallyCopied(_) => io::Error::from_raw_os_error(libc::EAGAIN),
        other => io::Error::other(other),
    }
}
