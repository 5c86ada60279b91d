//! Post-copy: the guest runs at the destination before all its memory has
//! arrived. The pages it holds out of date (dirtied at the source since
//! they were sent) are dropped and registered with a userfaultfd; a guest
//! touch of one stops the toucher until the page comes from the source.
//!
//! ```text
//! source (paused, keeps the memory)          destination (guest running)
//!                                             fault thread: a touch of a stale page
//!                                        <--    PageRequest(gpa...)
//!   requested pages first                -->  page thread: UFFDIO_COPY (wakes the toucher)
//!   the rest in the background, near the
//!   last request first                   -->  page thread: UFFDIO_COPY
//!                                        <--  PostcopyDone (every stale page placed;
//!   the source process exits 0                 the userfaultfd lets go of guest memory)
//! ```
//!
//! A touch of a page that is not stale (never sent: all zeros at the
//! source) is filled with zeros at once, without a round trip.
//!
//! The risk of post-copy, as in QEMU: once the guest runs at the
//! destination, its memory is split between the two hosts. If the
//! connection breaks, neither side can go on: the destination stops with
//! the count of missing pages, the source stays paused (it still holds
//! every page). `auto_postcopy: false` keeps a migration pre-copy only.

use std::io::BufReader;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use ember_memory::GuestMemoryMmap;
use ember_migration::transport::Connection;
use ember_migration::{write_reply, Event, PageSet, Receiver, Reply, MAX_BATCH, PAGE_SIZE};
use ember_uffd::userfaultfd::{Event as UffdEvent, EventBuffer, Uffd, UffdBuilder};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

use crate::seccomp::{Filters, ThreadKind};
use crate::{Error, Result};

const PAGE: u64 = PAGE_SIZE as u64;

/// One guest memory region as the post-copy threads see it.
#[derive(Clone, Copy, Debug)]
struct Region {
    gpa: u64,
    host: u64,
    pages: usize,
}

fn regions(mem: &GuestMemoryMmap) -> Vec<Region> {
    mem.iter()
        .map(|r| Region {
            gpa: r.start_addr().0,
            host: r.as_ptr() as u64,
            pages: usize::try_from(r.len()).unwrap_or(0) / PAGE_SIZE,
        })
        .collect()
}

/// A host address in guest memory as a pointer (ember is 64-bit only).
#[allow(clippy::cast_possible_truncation)]
fn host_ptr(addr: u64) -> *mut libc::c_void {
    addr as usize as *mut libc::c_void
}

/// (region, page) of a guest address.
fn by_gpa(regions: &[Region], gpa: u64) -> Option<(usize, usize)> {
    regions.iter().enumerate().find_map(|(i, r)| {
        let off = gpa.checked_sub(r.gpa)?;
        let page = usize::try_from(off / PAGE).ok()?;
        (page < r.pages).then_some((i, page))
    })
}

/// (region, page) of a host address in guest memory.
fn by_host(regions: &[Region], addr: u64) -> Option<(usize, usize)> {
    regions.iter().enumerate().find_map(|(i, r)| {
        let off = addr.checked_sub(r.host)?;
        let page = usize::try_from(off / PAGE).ok()?;
        (page < r.pages).then_some((i, page))
    })
}

/// A bitmap whose bits are set from several threads.
struct Bits(Vec<Vec<AtomicU64>>);

impl Bits {
    fn new(regions: &[Region]) -> Self {
        Bits(
            regions
                .iter()
                .map(|r| {
                    (0..r.pages.div_ceil(64))
                        .map(|_| AtomicU64::new(0))
                        .collect()
                })
                .collect(),
        )
    }

    /// Sets the bit; true if it was clear.
    fn set(&self, region: usize, page: usize) -> bool {
        let mask = 1u64 << (page % 64);
        self.0
            .get(region)
            .and_then(|m| m.get(page / 64))
            .is_some_and(|w| w.fetch_or(mask, Ordering::SeqCst) & mask == 0)
    }

    fn get(&self, region: usize, page: usize) -> bool {
        self.0
            .get(region)
            .and_then(|m| m.get(page / 64))
            .is_some_and(|w| w.load(Ordering::SeqCst) & (1 << (page % 64)) != 0)
    }
}

/// Checks the stale set against guest memory and drops those pages from
/// it (anonymous memory: `MADV_DONTNEED`; a memfd: a punched hole), so
/// that the next touch of each is a userfault. Run before registering.
pub fn discard_stale(mem: &GuestMemoryMmap, stale: &PageSet) -> Result<()> {
    let fail = |m: String| Error::Migration(m);
    let regions = regions(mem);
    if stale.maps.len() > regions.len() {
        return Err(fail(format!(
            "the post-copy page set has {} regions, guest memory {}",
            stale.maps.len(),
            regions.len()
        )));
    }
    for (i, (map, (r, region))) in stale
        .maps
        .iter()
        .zip(regions.iter().zip(mem.iter()))
        .enumerate()
    {
        if map.len() > r.pages.div_ceil(64)
            || map.iter().enumerate().any(|(w, bits)| {
                *bits != 0 && w * 64 + 63 - bits.leading_zeros() as usize >= r.pages
            })
        {
            return Err(fail(format!(
                "the post-copy page set of region {i} reaches past its {} pages",
                r.pages
            )));
        }
        let mut p = 0;
        while p < r.pages {
            if !stale.contains(i, p) {
                p += 1;
                continue;
            }
            let start = p;
            while p < r.pages && stale.contains(i, p) {
                p += 1;
            }
            let (off, len) = (start * PAGE_SIZE, (p - start) * PAGE_SIZE);
            match region.file_offset() {
                Some(fo) => {
                    let at = fo.start() + off as u64;
                    // SAFETY: fallocate on the memfd behind this region;
                    // punching a hole only drops pages of the file, whose
                    // mapping stays valid (they read back as zeros or,
                    // once registered, fault to the userfaultfd).
                    let rc = unsafe {
                        libc::fallocate(
                            fo.file().as_raw_fd(),
                            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                            libc::off_t::try_from(at).unwrap_or(libc::off_t::MAX),
                            libc::off_t::try_from(len).unwrap_or(0),
                        )
                    };
                    if rc < 0 {
                        return Err(fail(format!(
                            "cannot drop stale guest pages: {}",
                            std::io::Error::last_os_error()
                        )));
                    }
                }
                None => {
                    // SAFETY: the range lies inside this region's private
                    // anonymous mapping, which ember owns; MADV_DONTNEED
                    // only drops its pages (they come back zeroed or, once
                    // registered, through the userfaultfd).
                    let rc = unsafe {
                        libc::madvise(host_ptr(r.host + off as u64), len, libc::MADV_DONTNEED)
                    };
                    if rc < 0 {
                        return Err(fail(format!(
                            "cannot drop stale guest pages: {}",
                            std::io::Error::last_os_error()
                        )));
                    }
                }
            }
        }
    }
    Ok(())
}

/// What a post-copy did at the destination.
#[derive(Clone, Copy, Debug, Default)]
pub struct IncomingStats {
    /// Stale pages, all placed in the end.
    pub pages: u64,
    /// Guest touches of a stale page that had not arrived.
    pub faults: u64,
    /// Touches of never-sent pages, filled with zeros.
    pub zero_faults: u64,
    /// Page requests sent.
    pub requests: u64,
    /// From the resume to the last page.
    pub took: Duration,
}

struct Inner {
    uffd: Uffd,
    regions: Vec<Region>,
    stale: PageSet,
    placed: Bits,
    requested: Bits,
    left: AtomicU64,
    stop: AtomicBool,
    back: Mutex<std::fs::File>,
    wake: EventFd,
    result: Mutex<Option<std::result::Result<IncomingStats, String>>>,
    faults: AtomicU64,
    zero_faults: AtomicU64,
    requests: AtomicU64,
    started: Instant,
}

/// The destination's post-copy: two threads serve the guest's memory
/// until every stale page has arrived.
pub struct Incoming {
    inner: Arc<Inner>,
    conn: Connection,
    threads: Vec<JoinHandle<()>>,
    reported: bool,
}

impl std::fmt::Debug for Incoming {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Incoming")
            .field("left", &self.inner.left.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

type Stream = Receiver<BufReader<Connection>>;

impl Incoming {
    /// Registers guest memory with a new userfaultfd and starts the fault
    /// and page threads (each under the migration filter). `stream` is the
    /// forward stream after `Release`; `back` the connection for requests
    /// (written with write(2)); `wake` is written when it ends.
    pub fn start(
        mem: &GuestMemoryMmap,
        stale: PageSet,
        stream: Stream,
        back: &Connection,
        wake: EventFd,
        filters: &Filters,
    ) -> Result<Self> {
        let fail = |m: String| Error::Migration(format!("post-copy: {m}"));
        let uffd = UffdBuilder::new()
            .close_on_exec(true)
            .non_blocking(true)
            .user_mode_only(false)
            .create()
            .map_err(|e| fail(format!("cannot create a userfaultfd: {e}")))?;
        let regions = regions(mem);
        for r in &regions {
            uffd.register(host_ptr(r.host), r.pages * PAGE_SIZE)
                .map_err(|e| fail(format!("cannot register guest memory: {e}")))?;
        }
        let conn = back.try_clone().map_err(|e| fail(format!("socket: {e}")))?;
        let writer = std::fs::File::from(match back.try_clone() {
            Ok(Connection::Tcp(s)) => std::os::fd::OwnedFd::from(s),
            Ok(Connection::Unix(s, _)) => std::os::fd::OwnedFd::from(s),
            Err(e) => return Err(fail(format!("socket: {e}"))),
        });
        let inner = Arc::new(Inner {
            left: AtomicU64::new(stale.count()),
            placed: Bits::new(&regions),
            requested: Bits::new(&regions),
            uffd,
            regions,
            stale,
            stop: AtomicBool::new(false),
            back: Mutex::new(writer),
            wake,
            result: Mutex::new(None),
            faults: AtomicU64::new(0),
            zero_faults: AtomicU64::new(0),
            requests: AtomicU64::new(0),
            started: Instant::now(),
        });
        log::info!(
            "migration: post-copy: {} pages to come from the source",
            inner.left.load(Ordering::SeqCst)
        );
        let spawn = |name: &'static str, work: Box<dyn FnOnce(&Inner) + Send>| {
            let inner = inner.clone();
            let filters = filters.clone();
            std::thread::Builder::new()
                .name(format!("ember-{name}"))
                .spawn(move || match filters.install(ThreadKind::Migration, name) {
                    Ok(()) => work(&inner),
                    Err(e) => inner.finish(Err(crate::error_chain(&e))),
                })
                .map_err(|e| fail(format!("cannot start a thread: {e}")))
        };
        let faults = spawn("postcopy-faults", Box::new(|i: &Inner| i.serve_faults()))?;
        let pages = spawn(
            "postcopy-pages",
            Box::new(move |i: &Inner| i.receive_pages(stream)),
        );
        let pages = match pages {
            Ok(t) => t,
            Err(e) => {
                inner.stop.store(true, Ordering::SeqCst);
                let _ = faults.join();
                return Err(e);
            }
        };
        let threads = vec![faults, pages];
        Ok(Incoming {
            inner,
            conn,
            threads,
            reported: false,
        })
    }

    /// Writes `r` on the back channel, in turn with the fault thread's
    /// requests.
    pub fn reply(&self, r: &Reply) -> Result<()> {
        self.inner.reply(r).map_err(Error::Migration)
    }

    /// Once it ended: the stats, or why the guest cannot go on. `None`
    /// while pages are still coming (and after it was reported once).
    pub fn poll(&mut self) -> Option<std::result::Result<IncomingStats, String>> {
        if self.reported {
            return None;
        }
        let r = self
            .inner
            .result
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()?;
        self.reported = true;
        Some(r)
    }
}

impl Drop for Incoming {
    fn drop(&mut self) {
        let done = matches!(
            *self.inner.result.lock().unwrap_or_else(|e| e.into_inner()),
            Some(Ok(_))
        );
        self.inner.stop.store(true, Ordering::SeqCst);
        let _ = self.conn.shutdown();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
        if !done {
            // Closing the userfaultfd now would let a vCPU still waiting
            // for a missing page go on with a zero page: keep it open
            // until the process ends.
            std::mem::forget(self.inner.clone());
        }
    }
}

impl Inner {
    fn finish(&self, r: std::result::Result<IncomingStats, String>) {
        let mut slot = self.result.lock().unwrap_or_else(|e| e.into_inner());
        if slot.is_none() {
            *slot = Some(r);
            let _ = self.wake.write(1);
        }
    }

    fn done(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
            || self
                .result
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .is_some()
    }

    fn reply(&self, r: &Reply) -> std::result::Result<(), String> {
        let mut back = self.back.lock().unwrap_or_else(|e| e.into_inner());
        write_reply(&mut *back, r).map_err(|e| crate::error_chain(&e))
    }

    /// The fault thread: reads the userfaultfd, asks the source for stale
    /// pages, fills never-sent ones with zeros.
    fn serve_faults(&self) {
        let mut events = EventBuffer::new(64);
        let mut want = Vec::new();
        while !self.done() {
            let mut fd = libc::pollfd {
                fd: self.uffd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            // SAFETY: one valid pollfd that outlives the call, count 1.
            let n = unsafe { libc::poll(&mut fd, 1, 100) };
            if n <= 0 {
                continue;
            }
            let list = match self.uffd.read_events(&mut events) {
                Ok(l) => l,
                Err(e) => {
                    self.finish(Err(format!("reading the userfaultfd: {e}")));
                    return;
                }
            };
            for ev in list {
                let Ok(UffdEvent::Pagefault { addr, .. }) = ev else {
                    continue;
                };
                let addr = addr as u64 & !(PAGE - 1);
                let Some((r, p)) = by_host(&self.regions, addr) else {
                    continue;
                };
                if !self.stale.contains(r, p) {
                    self.zero_faults.fetch_add(1, Ordering::Relaxed);
                    // SAFETY: a page of guest memory registered with this
                    // userfaultfd; ZEROPAGE maps zeros there and touches no
                    // other memory. EEXIST (filled meanwhile) is fine.
                    let _ = unsafe { self.uffd.zeropage(host_ptr(addr), PAGE_SIZE, true) };
                    continue;
                }
                self.faults.fetch_add(1, Ordering::Relaxed);
                if self.placed.get(r, p) {
                    // Placed after the touch: that copy woke the toucher.
                    let _ = self.uffd.wake(host_ptr(addr), PAGE_SIZE);
                } else if self.requested.set(r, p) {
                    want.push(self.regions[r].gpa + p as u64 * PAGE);
                }
            }
            for chunk in want.chunks(MAX_BATCH) {
                self.requests.fetch_add(1, Ordering::Relaxed);
                if let Err(e) = self.reply(&Reply::PageRequest(chunk.to_vec())) {
                    self.finish(Err(format!("cannot ask the source for pages: {e}")));
                    return;
                }
            }
            want.clear();
        }
    }

    /// The page thread: places each page the source sends; when the last
    /// stale page is in, lets go of guest memory and tells the source.
    fn receive_pages(&self, mut stream: Stream) {
        if let Err(e) = self.pages(&mut stream) {
            if !self.stop.load(Ordering::SeqCst) {
                let left = self.left.load(Ordering::SeqCst);
                self.finish(Err(format!(
                    "{e}: {left} guest pages never arrived; the guest cannot go on"
                )));
            }
        }
    }

    fn pages(&self, stream: &mut Stream) -> std::result::Result<(), String> {
        while self.left.load(Ordering::SeqCst) > 0 {
            let batch = match stream.next() {
                Ok(Event::Pages(b)) => b,
                Ok(other) => return Err(format!("post-copy: unexpected {other:?}")),
                Err(e) => return Err(format!("post-copy: {}", crate::error_chain(&e))),
            };
            for (gpa, data) in batch.pages() {
                let (r, p) = by_gpa(&self.regions, gpa)
                    .filter(|&(r, p)| self.stale.contains(r, p))
                    .ok_or_else(|| format!("post-copy: page {gpa:#x} was not asked for"))?;
                if !self.placed.set(r, p) {
                    continue;
                }
                let dst = self.regions[r].host + p as u64 * PAGE;
                self.place(dst, data)?;
                self.left.fetch_sub(1, Ordering::SeqCst);
            }
        }
        for r in &self.regions {
            if let Err(e) = self.uffd.unregister(host_ptr(r.host), r.pages * PAGE_SIZE) {
                log::warn!("migration: post-copy: unregistering guest memory: {e}");
            }
        }
        self.reply(&Reply::PostcopyDone)?;
        self.finish(Ok(IncomingStats {
            pages: self.stale.count(),
            faults: self.faults.load(Ordering::Relaxed),
            zero_faults: self.zero_faults.load(Ordering::Relaxed),
            requests: self.requests.load(Ordering::Relaxed),
            took: self.started.elapsed(),
        }));
        Ok(())
    }

    fn place(&self, dst: u64, data: &[u8]) -> std::result::Result<(), String> {
        loop {
            // SAFETY: `data` is a whole page the kernel only reads; `dst` a
            // page of guest memory registered with this userfaultfd, which
            // the copy fills atomically and wakes its waiters.
            let r = unsafe {
                self.uffd
                    .copy(data.as_ptr().cast(), host_ptr(dst), PAGE_SIZE, true)
            };
            match r {
                Ok(_) => return Ok(()),
                Err(ember_uffd::userfaultfd::Error::CopyFailed(e)) if e as i32 == libc::EEXIST => {
                    // Present already (never expected: it was dropped).
                    return Ok(());
                }
                Err(ember_uffd::userfaultfd::Error::CopyFailed(e)) if e as i32 == libc::EAGAIN => {
                    continue
                }
                Err(ember_uffd::userfaultfd::Error::PartiallyCopied(_)) => continue,
                Err(e) => return Err(format!("post-copy: placing a page: {e}")),
            }
        }
    }
}

/// Pages the source pushes in one background batch (small: a page the
/// guest waits for queues behind at most this much).
const PUSH_BATCH: usize = 16;
/// The source's send buffer during post-copy.
pub const SEND_BUFFER: usize = 256 << 10;
/// How long the source waits for a word from the destination once every
/// page is sent.
const QUIET_LIMIT: Duration = Duration::from_secs(60);

/// What a post-copy did at the source.
#[derive(Clone, Copy, Debug, Default)]
pub struct OutgoingStats {
    /// Stale pages sent after the release.
    pub pages: u64,
    /// Of them, sent because the guest asked.
    pub requested: u64,
    /// Requests the destination made.
    pub requests: u64,
    /// When the destination said the guest runs (`Done`).
    pub running_at: Option<Instant>,
}

/// The source's side, after `Release`: answers the destination's page
/// requests first, pushes the other stale pages meanwhile (from just past
/// the last request: a guest touching a page soon touches its
/// neighbours), until the destination has the guest running (`Done`) and
/// every page (`PostcopyDone`). `progress` gets (pages left, stats) now
/// and then. `stats.running_at` is set even when this fails: from then on
/// the guest ran at the destination and must never run here again.
pub fn serve_source<W: std::io::Write>(
    w: &mut ember_migration::Writer<W>,
    back: &mut Connection,
    mem: &GuestMemoryMmap,
    stale: &PageSet,
    round: u32,
    stats: &mut OutgoingStats,
    progress: &dyn Fn(u64, &OutgoingStats),
) -> std::result::Result<(), String> {
    use vm_memory::{Bytes, GuestAddress};
    let regions = regions(mem);
    let mut left = stale.clone();
    let mut count = left.count();
    let mut cursor = (0usize, 0usize);
    let mut placed = false;
    let mut quiet = Instant::now();
    let mut pages: Vec<(u64, Vec<u8>)> = Vec::with_capacity(PUSH_BATCH);
    let io = |e: ember_migration::Error| format!("post-copy: {}", crate::error_chain(&e));
    let take = |left: &mut PageSet, r: usize, p: usize| -> bool {
        let hit = left.contains(r, p);
        if hit {
            left.maps[r][p / 64] &= !(1 << (p % 64));
        }
        hit
    };
    let send = |w: &mut ember_migration::Writer<W>,
                list: &[(u64, Vec<u8>)]|
     -> std::result::Result<(), String> {
        if list.is_empty() {
            return Ok(());
        }
        let refs: Vec<(u64, &[u8])> = list.iter().map(|(g, d)| (*g, &d[..])).collect();
        w.pages(round, &refs).map_err(io)?;
        w.flush().map_err(io)
    };
    let read = |gpa: u64| -> std::result::Result<Vec<u8>, String> {
        let mut page = vec![0u8; PAGE_SIZE];
        mem.read_slice(&mut page, GuestAddress(gpa))
            .map_err(|e| format!("post-copy: reading guest page {gpa:#x}: {e}"))?;
        Ok(page)
    };
    loop {
        let wait = if count > 0 { 0 } else { 200 };
        if back
            .wait_readable(wait)
            .map_err(|e| format!("post-copy: {e}"))?
        {
            quiet = Instant::now();
            match ember_migration::read_reply(&mut *back).map_err(io)? {
                Reply::PageRequest(gpas) => {
                    stats.requests += 1;
                    pages.clear();
                    for gpa in gpas {
                        // A page already sent is on its way.
                        let Some((r, p)) = by_gpa(&regions, gpa) else {
                            return Err(format!(
                                "post-copy: a request for page {gpa:#x}, outside guest memory"
                            ));
                        };
                        if take(&mut left, r, p) {
                            pages.push((gpa, read(gpa)?));
                            cursor = (r, p + 1);
                        }
                    }
                    count -= pages.len() as u64;
                    stats.pages += pages.len() as u64;
                    stats.requested += pages.len() as u64;
                    send(w, &pages)?;
                }
                Reply::Done => stats.running_at = Some(Instant::now()),
                Reply::PostcopyDone if count == 0 => placed = true,
                Reply::PostcopyDone => {
                    return Err(format!(
                        "post-copy: the destination says it has every page, {count} were not sent"
                    ))
                }
                Reply::Refused(why) => {
                    return Err(format!("the destination could not run the guest: {why}"))
                }
                other => return Err(format!("post-copy: the destination answered {other:?}")),
            }
            if placed && stats.running_at.is_some() {
                progress(0, stats);
                return Ok(());
            }
            continue;
        }
        if count == 0 {
            if quiet.elapsed() > QUIET_LIMIT {
                return Err(format!(
                    "post-copy: the destination said nothing for {} s after the last page",
                    QUIET_LIMIT.as_secs()
                ));
            }
            continue;
        }
        // The next stale pages from the cursor, wrapping around.
        pages.clear();
        let total: usize = regions.iter().map(|r| r.pages).sum();
        let mut scanned = 0;
        while pages.len() < PUSH_BATCH && scanned < total {
            let (r, p) = cursor;
            if r >= regions.len() {
                cursor = (0, 0);
                continue;
            }
            if p >= regions[r].pages {
                cursor = (r + 1, 0);
                continue;
            }
            scanned += 1;
            cursor = (r, p + 1);
            // A clean word of the bitmap at once.
            if p % 64 == 0
                && left
                    .maps
                    .get(r)
                    .and_then(|m| m.get(p / 64))
                    .copied()
                    .unwrap_or(0)
                    == 0
            {
                cursor = (r, p + 64);
                scanned += 63;
                continue;
            }
            if take(&mut left, r, p) {
                let gpa = regions[r].gpa + p as u64 * PAGE;
                pages.push((gpa, read(gpa)?));
            }
        }
        if pages.is_empty() {
            log::warn!("migration: post-copy: {count} pages counted but none found left");
            count = 0;
            continue;
        }
        count -= pages.len() as u64;
        stats.pages += pages.len() as u64;
        send(w, &pages)?;
        progress(count, stats);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ember_migration::transport::FdStash;
    use ember_migration::{read_reply, Writer};
    use std::os::unix::net::UnixStream;
    use vm_memory::{Bytes, GuestAddress};

    const MIB: usize = 1 << 20;

    fn memory() -> GuestMemoryMmap {
        let mem = GuestMemoryMmap::from_ranges(&[
            (GuestAddress(0), MIB),
            (GuestAddress(0x1000_0000), MIB),
        ])
        .unwrap();
        for (i, base) in [0u64, 0x1000_0000].into_iter().enumerate() {
            for p in 0..(MIB / PAGE_SIZE) as u64 {
                mem.write_obj(
                    0x1111_0000_0000 + i as u64 * 0x1000 + p,
                    GuestAddress(base + p * PAGE),
                )
                .unwrap();
            }
        }
        mem
    }

    fn page_of(gpa: u64) -> [u8; PAGE_SIZE] {
        let mut p = [0u8; PAGE_SIZE];
        p[..8].copy_from_slice(&(gpa ^ 0xfeed).to_le_bytes());
        p[PAGE_SIZE - 1] = 0x77;
        p
    }

    /// A connection on which a source has sent a post-copy stream up to
    /// its release: (the source's end, the destination's end).
    fn handed_over(set: &PageSet) -> (UnixStream, Connection) {
        let (dst, mut src) = UnixStream::pair().unwrap();
        let mut w = Writer::new(&mut src).unwrap();
        w.start(b"{}").unwrap();
        w.postcopy(set).unwrap();
        w.state(b"{}").unwrap();
        w.end().unwrap();
        w.release().unwrap();
        (src, Connection::Unix(dst, FdStash::default()))
    }

    /// The destination's threads on `dst`, once it read the release;
    /// `None` (said loudly) where this host has no userfaultfd.
    fn start(mem: &GuestMemoryMmap, set: &PageSet, dst: &Connection) -> Option<Incoming> {
        let mut stream = Receiver::new(BufReader::new(dst.try_clone().unwrap())).unwrap();
        while stream.next().unwrap() != Event::Release {}
        let wake = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let filters = Filters::new(crate::seccomp::Mode::Off).unwrap();
        match Incoming::start(mem, set.clone(), stream, dst, wake, &filters) {
            Ok(i) => Some(i),
            Err(e) if e.to_string().contains("userfaultfd") => {
                eprintln!("SKIPPED: no userfaultfd here: {e}");
                None
            }
            Err(e) => panic!("{e}"),
        }
    }

    #[test]
    fn stale_pages_are_dropped_and_bad_sets_refused() {
        let mem = memory();
        let set = PageSet {
            maps: vec![vec![0b110], vec![1]],
        };
        discard_stale(&mem, &set).unwrap();
        let word = |gpa: u64| mem.read_obj::<u64>(GuestAddress(gpa)).unwrap();
        assert_eq!(word(0), 0x1111_0000_0000);
        assert_eq!((word(0x1000), word(0x2000)), (0, 0));
        assert_eq!(word(0x3000), 0x1111_0000_0003);
        assert_eq!(word(0x1000_0000), 0);
        assert_eq!(word(0x1000_1000), 0x1111_0000_1001);
        for (maps, needle) in [
            (vec![vec![], vec![], vec![]], "3 regions"),
            (vec![vec![0; 5]], "reaches past its 256 pages"),
            (vec![vec![0, 0, 0, 1 << 63, 0]], "reaches past"),
            (vec![vec![0, 0, 0, 0, 1]], "reaches past"),
        ] {
            let e = discard_stale(&mem, &PageSet { maps }).unwrap_err();
            assert!(e.to_string().contains(needle), "{e}");
        }
    }

    /// The destination's threads against a source played by the test: a
    /// "guest" thread touches stale pages (blocked until they come), the
    /// source answers its requests and pushes the rest; every page ends
    /// with the source's contents, never-sent ones read as zeros, and the
    /// destination says it is done.
    #[test]
    fn the_destination_asks_for_what_the_guest_touches_and_places_every_page() {
        let mem = memory();
        // Stale: pages 1..=40 of region 0 and 5 of region 1; never sent
        // (zero at the source): page 100 of region 0.
        let mut maps = vec![vec![0u64; 4], vec![0u64; 4]];
        for p in 1..=40 {
            maps[0][p / 64] |= 1 << (p % 64);
        }
        maps[1][0] |= 1 << 5;
        let set = PageSet { maps };
        discard_stale(&mem, &set).unwrap();
        // Never sent either: region 0 page 100 dropped as a destination
        // that never received it would have it.
        discard_stale(
            &mem,
            &PageSet {
                maps: vec![vec![0, 1 << (100 - 64)]],
            },
        )
        .unwrap();

        let (mut src_w, dst) = handed_over(&set);
        let mut src_r = src_w.try_clone().unwrap();
        let Some(mut incoming) = start(&mem, &set, &dst) else {
            return;
        };
        // The guest touches page 7, then page 100 (zeros, no request),
        // then page 5 of region 1.
        let guest_mem = mem.clone();
        let guest = std::thread::spawn(move || {
            let a: u64 = guest_mem.read_obj(GuestAddress(7 * PAGE)).unwrap();
            let z: u64 = guest_mem.read_obj(GuestAddress(100 * PAGE)).unwrap();
            let b: u64 = guest_mem
                .read_obj(GuestAddress(0x1000_0000 + 5 * PAGE))
                .unwrap();
            (a, z, b)
        });
        // The source: answer the first two requests, then push the rest.
        let mut w = Writer::back_channel(&mut src_w);
        let mut sent = std::collections::HashSet::new();
        let mut requested = Vec::new();
        while requested.len() < 2 {
            match read_reply(&mut src_r).unwrap() {
                Reply::PageRequest(gpas) => {
                    for g in gpas {
                        requested.push(g);
                        if sent.insert(g) {
                            w.pages(1, &[(g, &page_of(g)[..])]).unwrap();
                        }
                    }
                }
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(requested, vec![7 * PAGE, 0x1000_0000 + 5 * PAGE]);
        let (a, z, b) = guest.join().unwrap();
        assert_eq!(a, (7 * PAGE) ^ 0xfeed);
        assert_eq!(z, 0, "a never-sent page reads as zeros");
        assert_eq!(b, (0x1000_0000 + 5 * PAGE) ^ 0xfeed);
        for p in 1..=40u64 {
            let g = p * PAGE;
            if sent.insert(g) {
                w.pages(1, &[(g, &page_of(g)[..])]).unwrap();
            }
        }
        // Sent twice: placed once, no harm.
        w.pages(1, &[(7 * PAGE, &page_of(7 * PAGE)[..])])
            .unwrap_or(());
        assert_eq!(read_reply(&mut src_r).unwrap(), Reply::PostcopyDone);
        let deadline = Instant::now() + Duration::from_secs(10);
        let stats = loop {
            if let Some(r) = incoming.poll() {
                break r.unwrap();
            }
            assert!(Instant::now() < deadline, "never finished");
            std::thread::sleep(Duration::from_millis(10));
        };
        assert_eq!(stats.pages, 41);
        assert!(stats.faults >= 2 && stats.zero_faults >= 1, "{stats:?}");
        for p in 1..=40u64 {
            let mut got = [0u8; PAGE_SIZE];
            mem.read_slice(&mut got, GuestAddress(p * PAGE)).unwrap();
            assert_eq!(got, page_of(p * PAGE), "page {p}");
        }
        assert_eq!(
            mem.read_obj::<u64>(GuestAddress(41 * PAGE)).unwrap(),
            0x1111_0000_0029,
            "pages not stale keep what they had"
        );
        drop(incoming);
    }

    #[test]
    fn a_destination_that_loses_its_source_says_how_many_pages_never_came() {
        let mem = memory();
        let set = PageSet {
            maps: vec![vec![0b1110]],
        };
        discard_stale(&mem, &set).unwrap();
        let (mut src_w, dst) = handed_over(&set);
        Writer::back_channel(&mut src_w)
            .pages(1, &[(PAGE, &page_of(PAGE)[..])])
            .unwrap();
        let Some(mut incoming) = start(&mem, &set, &dst) else {
            return;
        };
        drop(src_w);
        let deadline = Instant::now() + Duration::from_secs(10);
        let e = loop {
            if let Some(r) = incoming.poll() {
                break r.unwrap_err();
            }
            assert!(Instant::now() < deadline, "never noticed");
            std::thread::sleep(Duration::from_millis(10));
        };
        assert!(e.contains("2 guest pages never arrived"), "{e}");
        assert!(!e.contains('\n'), "{e}");
        // Dropping it keeps the userfaultfd (a vCPU waiting on a missing
        // page must not read zeros); the page that came is in place.
        assert_eq!(
            mem.read_obj::<u64>(GuestAddress(PAGE)).unwrap(),
            PAGE ^ 0xfeed
        );
        drop(incoming);
    }
}
