//! The live-migration stream: a header, then frames, each CRC-64 checked,
//! in an order the [`Receiver`] enforces. See the crate README for the
//! layout.
//!
//! ```
//! use ember_migration::{Kind, Receiver, Event, Writer, PAGE_SIZE};
//! let mut out = Vec::new();
//! let mut w = Writer::new(&mut out).unwrap();
//! w.start(b"{\"cpu\": {}}").unwrap();
//! w.pages(0, &[(0x1000, &[7u8; PAGE_SIZE][..])]).unwrap();
//! w.zero_pages(0, &[0x2000]).unwrap();
//! w.state(b"{}").unwrap();
//! w.end().unwrap();
//! let mut r = Receiver::new(&out[..]).unwrap();
//! assert!(matches!(r.next().unwrap(), Event::Start(_)));
//! let Event::Pages(b) = r.next().unwrap() else { panic!() };
//! assert_eq!(b.pages().next().unwrap(), (0x1000, &[7u8; PAGE_SIZE][..]));
//! assert!(matches!(r.next().unwrap(), Event::ZeroPages(_)));
//! assert!(matches!(r.next().unwrap(), Event::State(_)));
//! assert!(matches!(r.next().unwrap(), Event::End));
//! let _ = Kind::End;
//! ```

use std::io::{Read, Write};

pub mod memory;
pub mod transport;

/// First bytes of a stream.
pub const MAGIC: [u8; 8] = *b"EMBERMIG";
/// The stream layout this crate reads and writes.
pub const VERSION: u32 = 1;
/// Guest page size.
pub const PAGE_SIZE: usize = 4096;
/// Largest frame payload accepted (a batch of 4096 pages and its header).
pub const MAX_FRAME: usize = 17 << 20;
/// Most pages in one batch.
pub const MAX_BATCH: usize = 4096;

const FRAME_HEAD: usize = 8;
const CRC: crc::Crc<u64> = crc::Crc::<u64>::new(&crc::CRC_64_XZ);

/// A frame's kind.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    /// What the destination checks before memory moves.
    Start = 1,
    /// A batch of pages.
    Pages = 2,
    /// A batch of zero pages (addresses only).
    ZeroPages = 3,
    /// The device and vCPU state.
    State = 4,
    /// The source has sent everything.
    End = 5,
    /// The source released its disk locks: the destination may take them
    /// and run the guest. On a Unix socket it may carry file descriptors
    /// (`SCM_RIGHTS`; ember: the NICs' taps).
    Release = 6,
    /// Guest memory as a file descriptor instead of pages (a local
    /// migration, Unix socket only): the payload says how the regions lie
    /// in the file, the descriptor rides on the frame (`SCM_RIGHTS`).
    MemoryFd = 7,
    /// Post-copy: the pages the destination holds out of date (dirtied
    /// since they were sent), as one bitmap per memory region. After the
    /// release the source sends them (on request first, the rest in the
    /// background) as `Pages` while the guest runs at the destination.
    Postcopy = 8,
    /// The end of a pre-copy round: the destination answers `Synced` once
    /// it has written everything before it into guest memory (so a round
    /// is timed end to end, and nothing is left queued when the guest
    /// pauses).
    Sync = 9,
    /// Back channel: the destination accepts the start.
    Ready = 16,
    /// Back channel: the destination refuses, with a reason.
    Refused = 17,
    /// Back channel: the destination runs the guest.
    Done = 18,
    /// Back channel: the destination holds the whole state and is ready to
    /// take the disks.
    Received = 19,
    /// Back channel, post-copy: the guest touched these pages; send them
    /// first.
    PageRequest = 20,
    /// Back channel, post-copy: every out-of-date page has arrived; the
    /// source may end.
    PostcopyDone = 21,
    /// Back channel: everything before the `Sync` is in guest memory.
    Synced = 22,
}

impl Kind {
    fn from_u8(b: u8) -> Option<Self> {
        Some(match b {
            1 => Kind::Start,
            2 => Kind::Pages,
            3 => Kind::ZeroPages,
            4 => Kind::State,
            5 => Kind::End,
            6 => Kind::Release,
            7 => Kind::MemoryFd,
            8 => Kind::Postcopy,
            9 => Kind::Sync,
            16 => Kind::Ready,
            17 => Kind::Refused,
            18 => Kind::Done,
            19 => Kind::Received,
            20 => Kind::PageRequest,
            21 => Kind::PostcopyDone,
            22 => Kind::Synced,
            _ => return None,
        })
    }
}

/// What is wrong with a stream. Each names the problem.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Reading or writing the connection failed.
    #[error("migration stream: {0}")]
    Io(#[from] std::io::Error),
    /// The stream ended inside a header or frame.
    #[error("migration stream truncated: {0}")]
    Truncated(&'static str),
    /// Not a migration stream.
    #[error("not an ember migration stream (bad magic)")]
    Magic,
    /// Another layout version.
    #[error("migration stream version {0} is not supported: this ember speaks version {VERSION}")]
    Version(u32),
    /// An unknown frame kind.
    #[error("migration stream: unknown frame kind {0}")]
    UnknownKind(u8),
    /// A frame longer than [`MAX_FRAME`].
    #[error("migration stream: a frame of {0} bytes is longer than the limit ({MAX_FRAME})")]
    TooLong(usize),
    /// A frame's checksum does not match.
    #[error("migration stream corrupt: CRC64 {found:#018x} of a {kind:?} frame does not match {expected:#018x}")]
    Crc {
        /// The frame's kind.
        kind: Kind,
        /// In the frame.
        found: u64,
        /// Computed.
        expected: u64,
    },
    /// A frame in the wrong place.
    #[error("migration stream out of order: {got:?} after {after}")]
    Order {
        /// What came.
        got: Kind,
        /// What came before.
        after: &'static str,
    },
    /// A malformed batch.
    #[error("migration stream: bad page batch: {0}")]
    Batch(String),
    /// A malformed post-copy page set.
    #[error("migration stream: bad post-copy page set: {0}")]
    Postcopy(String),
}

/// The result type of this crate.
pub type Result<T> = std::result::Result<T, Error>;

/// Writes a stream (or the back channel) to `W`.
pub struct Writer<W: Write> {
    out: W,
}

impl<W: Write> Writer<W> {
    /// Writes the header.
    pub fn new(mut out: W) -> Result<Self> {
        out.write_all(&MAGIC)?;
        out.write_all(&VERSION.to_le_bytes())?;
        Ok(Writer { out })
    }

    /// A writer for the back channel (no header: the forward stream's
    /// header covers the connection).
    pub fn back_channel(out: W) -> Self {
        Writer { out }
    }

    /// Writes one frame.
    pub fn frame(&mut self, kind: Kind, payload: &[u8]) -> Result<()> {
        if payload.len() > MAX_FRAME {
            return Err(Error::TooLong(payload.len()));
        }
        let len = u32::try_from(payload.len()).map_err(|_| Error::TooLong(payload.len()))?;
        let mut head = [0u8; FRAME_HEAD];
        head[0] = kind as u8;
        head[4..].copy_from_slice(&len.to_le_bytes());
        let mut digest = CRC.digest();
        digest.update(&head);
        digest.update(payload);
        self.out.write_all(&head)?;
        self.out.write_all(payload)?;
        self.out.write_all(&digest.finalize().to_le_bytes())?;
        Ok(())
    }

    /// `Start`.
    pub fn start(&mut self, payload: &[u8]) -> Result<()> {
        self.frame(Kind::Start, payload)
    }

    /// A batch of pages of round `round`: (guest address, page).
    pub fn pages(&mut self, round: u32, pages: &[(u64, &[u8])]) -> Result<()> {
        let mut p = batch_head(round, pages.len())?;
        for (gpa, _) in pages {
            p.extend_from_slice(&gpa.to_le_bytes());
        }
        for (gpa, page) in pages {
            if page.len() != PAGE_SIZE {
                return Err(Error::Batch(format!(
                    "the page at {gpa:#x} is {} bytes",
                    page.len()
                )));
            }
            p.extend_from_slice(page);
        }
        self.frame(Kind::Pages, &p)
    }

    /// A batch of zero pages.
    pub fn zero_pages(&mut self, round: u32, gpas: &[u64]) -> Result<()> {
        let mut p = batch_head(round, gpas.len())?;
        for gpa in gpas {
            p.extend_from_slice(&gpa.to_le_bytes());
        }
        self.frame(Kind::ZeroPages, &p)
    }

    /// `Sync`, then a flush: the end of a round.
    pub fn sync(&mut self) -> Result<()> {
        self.frame(Kind::Sync, &[])?;
        self.out.flush()?;
        Ok(())
    }

    /// `Postcopy`: the pages still to come after the release.
    pub fn postcopy(&mut self, set: &PageSet) -> Result<()> {
        self.frame(Kind::Postcopy, &set.encode()?)
    }

    /// `State`.
    pub fn state(&mut self, payload: &[u8]) -> Result<()> {
        self.frame(Kind::State, payload)
    }

    /// `End`, then a flush.
    pub fn end(&mut self) -> Result<()> {
        self.frame(Kind::End, &[])?;
        self.out.flush()?;
        Ok(())
    }

    /// `Release`, then a flush.
    pub fn release(&mut self) -> Result<()> {
        self.frame(Kind::Release, &[])?;
        self.out.flush()?;
        Ok(())
    }

    /// Pushes buffered frames out (before waiting for a reply).
    pub fn flush(&mut self) -> Result<()> {
        self.out.flush()?;
        Ok(())
    }

    /// The connection.
    pub fn into_inner(self) -> W {
        self.out
    }
}

/// One frame's bytes, to send in one `sendmsg` with file descriptors
/// riding on it ([`transport::Connection::send_with_fds`]).
pub fn frame_bytes(kind: Kind, payload: &[u8]) -> Result<Vec<u8>> {
    let mut out = Vec::with_capacity(payload.len() + 16);
    Writer::back_channel(&mut out).frame(kind, payload)?;
    Ok(out)
}

fn batch_head(round: u32, count: usize) -> Result<Vec<u8>> {
    if count == 0 || count > MAX_BATCH {
        return Err(Error::Batch(format!(
            "{count} pages (1 to {MAX_BATCH} per batch)"
        )));
    }
    let n = u32::try_from(count).map_err(|_| Error::Batch(format!("{count} pages")))?;
    let mut p = Vec::with_capacity(8 + count * (8 + PAGE_SIZE));
    p.extend_from_slice(&round.to_le_bytes());
    p.extend_from_slice(&n.to_le_bytes());
    Ok(p)
}

/// Most memory regions a [`PageSet`] may describe.
pub const MAX_REGIONS: usize = 64;

/// A set of guest pages: one bitmap per memory region (in the guest
/// memory's region order), bit `i % 64` of word `i / 64` for the region's
/// page `i`, as KVM's dirty log.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PageSet {
    /// The bitmaps.
    pub maps: Vec<Vec<u64>>,
}

impl PageSet {
    /// `regions:u32le`, then per region `words:u32le` and the words.
    fn encode(&self) -> Result<Vec<u8>> {
        let bad = |s: String| Error::Postcopy(s);
        if self.maps.len() > MAX_REGIONS {
            return Err(bad(format!("{} regions", self.maps.len())));
        }
        let words: usize = self.maps.iter().map(Vec::len).sum();
        let mut p = Vec::with_capacity(4 + 4 * self.maps.len() + 8 * words);
        p.extend_from_slice(&u32::try_from(self.maps.len()).unwrap_or(0).to_le_bytes());
        for m in &self.maps {
            let n = u32::try_from(m.len()).map_err(|_| bad(format!("{} words", m.len())))?;
            p.extend_from_slice(&n.to_le_bytes());
            for w in m {
                p.extend_from_slice(&w.to_le_bytes());
            }
        }
        Ok(p)
    }

    /// Checks and decodes a `Postcopy` payload.
    pub fn decode(payload: &[u8]) -> Result<Self> {
        let bad = |s: String| Error::Postcopy(s);
        let mut rest = payload;
        let u32_at = |rest: &mut &[u8], what: &str| -> Result<usize> {
            let (head, tail) = rest
                .split_first_chunk::<4>()
                .ok_or_else(|| bad(format!("truncated at the {what}")))?;
            *rest = tail;
            Ok(u32::from_le_bytes(*head) as usize)
        };
        let regions = u32_at(&mut rest, "region count")?;
        if regions > MAX_REGIONS {
            return Err(bad(format!("{regions} regions (at most {MAX_REGIONS})")));
        }
        let mut maps = Vec::with_capacity(regions);
        for i in 0..regions {
            let words = u32_at(&mut rest, "word count")?;
            let bytes = words
                .checked_mul(8)
                .filter(|b| *b <= rest.len())
                .ok_or_else(|| bad(format!("region {i}: {words} words, the frame is shorter")))?;
            let (map, tail) = rest.split_at(bytes);
            rest = tail;
            maps.push(
                map.chunks_exact(8)
                    .map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes")))
                    .collect(),
            );
        }
        if !rest.is_empty() {
            return Err(bad(format!("{} bytes after the last region", rest.len())));
        }
        Ok(PageSet { maps })
    }

    /// How many pages are in the set.
    pub fn count(&self) -> u64 {
        self.maps
            .iter()
            .flatten()
            .map(|w| u64::from(w.count_ones()))
            .sum()
    }

    /// Whether page `page` of region `region` is in the set.
    pub fn contains(&self, region: usize, page: usize) -> bool {
        self.maps
            .get(region)
            .and_then(|m| m.get(page / 64))
            .is_some_and(|w| w & (1 << (page % 64)) != 0)
    }
}

/// A checked batch: guest addresses page-aligned, sizes consistent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PageBatch {
    /// The pre-copy round it belongs to.
    pub round: u32,
    gpas: Vec<u64>,
    data: Vec<u8>,
}

impl PageBatch {
    fn decode(payload: &[u8], with_data: bool) -> Result<Self> {
        let bad = |s: String| Error::Batch(s);
        if payload.len() < 8 {
            return Err(bad(format!(
                "{} bytes, shorter than its head",
                payload.len()
            )));
        }
        let round = u32::from_le_bytes(payload[0..4].try_into().expect("4 bytes"));
        let count = u32::from_le_bytes(payload[4..8].try_into().expect("4 bytes")) as usize;
        if count == 0 || count > MAX_BATCH {
            return Err(bad(format!("{count} pages (1 to {MAX_BATCH} per batch)")));
        }
        let want = 8 + count * 8 + if with_data { count * PAGE_SIZE } else { 0 };
        if payload.len() != want {
            return Err(bad(format!(
                "{count} pages need {want} bytes, the frame has {}",
                payload.len()
            )));
        }
        let gpas: Vec<u64> = payload[8..8 + count * 8]
            .chunks_exact(8)
            .map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes")))
            .collect();
        if let Some(g) = gpas.iter().find(|g| *g % PAGE_SIZE as u64 != 0) {
            return Err(bad(format!("address {g:#x} is not page-aligned")));
        }
        if let Some(g) = gpas
            .iter()
            .find(|g| g.checked_add(PAGE_SIZE as u64).is_none())
        {
            return Err(bad(format!("address {g:#x} overflows")));
        }
        let data = if with_data {
            payload[8 + count * 8..].to_vec()
        } else {
            Vec::new()
        };
        Ok(PageBatch { round, gpas, data })
    }

    /// The guest addresses.
    pub fn gpas(&self) -> &[u64] {
        &self.gpas
    }

    /// (address, page) pairs; empty for a zero-page batch.
    pub fn pages(&self) -> impl Iterator<Item = (u64, &[u8])> {
        self.gpas
            .iter()
            .copied()
            .zip(self.data.chunks_exact(PAGE_SIZE))
    }
}

/// What the receiver read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// The start payload.
    Start(Vec<u8>),
    /// Pages to write into guest memory.
    Pages(PageBatch),
    /// Pages to zero.
    ZeroPages(PageBatch),
    /// The device and vCPU state.
    State(Vec<u8>),
    /// The source sent everything; only `Release` may follow.
    End,
    /// The source released its disks; nothing may follow.
    Release,
    /// Guest memory is in the file whose descriptor came with this frame;
    /// the payload describes it.
    MemoryFd(Vec<u8>),
    /// Post-copy: these pages the destination holds are out of date; they
    /// come as `Pages` after the release.
    Postcopy(PageSet),
    /// The end of a round: answer `Synced`.
    Sync,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Phase {
    Start,
    Memory,
    End,
    Handover,
    /// Post-copy, after the release: only pages.
    Postcopy,
    Done,
}

/// Reads one frame: (kind, payload).
pub fn read_frame<R: Read>(input: &mut R) -> Result<(Kind, Vec<u8>)> {
    let mut head = [0u8; FRAME_HEAD];
    read_exact(input, &mut head, "frame head")?;
    let kind = Kind::from_u8(head[0]).ok_or(Error::UnknownKind(head[0]))?;
    let len = u32::from_le_bytes(head[4..].try_into().expect("4 bytes")) as usize;
    if len > MAX_FRAME {
        return Err(Error::TooLong(len));
    }
    let mut payload = vec![0u8; len];
    read_exact(input, &mut payload, "frame payload")?;
    let mut crc = [0u8; 8];
    read_exact(input, &mut crc, "frame checksum")?;
    let mut digest = CRC.digest();
    digest.update(&head);
    digest.update(&payload);
    let (found, expected) = (u64::from_le_bytes(crc), digest.finalize());
    if found != expected {
        return Err(Error::Crc {
            kind,
            found,
            expected,
        });
    }
    Ok((kind, payload))
}

fn read_exact<R: Read>(input: &mut R, buf: &mut [u8], what: &'static str) -> Result<()> {
    input.read_exact(buf).map_err(|e| match e.kind() {
        std::io::ErrorKind::UnexpectedEof => Error::Truncated(what),
        _ => Error::Io(e),
    })
}

/// The destination's side: reads the header, then one [`Event`] at a time,
/// in the only order a stream may have.
pub struct Receiver<R: Read> {
    input: R,
    phase: Phase,
    postcopy: bool,
}

impl<R: Read> Receiver<R> {
    /// Reads and checks the header.
    pub fn new(mut input: R) -> Result<Self> {
        let mut head = [0u8; 12];
        read_exact(&mut input, &mut head, "header")?;
        if head[..8] != MAGIC {
            return Err(Error::Magic);
        }
        let version = u32::from_le_bytes(head[8..].try_into().expect("4 bytes"));
        if version != VERSION {
            return Err(Error::Version(version));
        }
        Ok(Receiver {
            input,
            phase: Phase::Start,
            postcopy: false,
        })
    }

    /// The next event; an error for anything out of order or malformed.
    #[allow(clippy::should_implement_trait)]
    pub fn next(&mut self) -> Result<Event> {
        if self.phase == Phase::Done {
            return Err(Error::Order {
                got: Kind::Release,
                after: "the end of the stream",
            });
        }
        let (kind, payload) = read_frame(&mut self.input)?;
        let after = match self.phase {
            Phase::Start => "the header",
            Phase::Memory => "the start",
            Phase::End => "the state",
            Phase::Handover => "the end",
            Phase::Postcopy => "the release of a post-copy migration",
            Phase::Done => "the release",
        };
        let out_of_order = Error::Order { got: kind, after };
        let event = match (self.phase, kind) {
            (Phase::Start, Kind::Start) => {
                self.phase = Phase::Memory;
                Event::Start(payload)
            }
            (Phase::Memory, Kind::Pages) => Event::Pages(PageBatch::decode(&payload, true)?),
            (Phase::Memory, Kind::ZeroPages) => {
                Event::ZeroPages(PageBatch::decode(&payload, false)?)
            }
            (Phase::Memory, Kind::MemoryFd) if !self.postcopy => Event::MemoryFd(payload),
            (Phase::Memory, Kind::Sync) if payload.is_empty() => Event::Sync,
            (Phase::Memory, Kind::Postcopy) if !self.postcopy => {
                let set = PageSet::decode(&payload)?;
                self.postcopy = true;
                Event::Postcopy(set)
            }
            (Phase::Memory, Kind::State) => {
                self.phase = Phase::End;
                Event::State(payload)
            }
            (Phase::End, Kind::End) if payload.is_empty() => {
                self.phase = Phase::Handover;
                Event::End
            }
            (Phase::Handover, Kind::Release) if payload.is_empty() => {
                self.phase = if self.postcopy {
                    Phase::Postcopy
                } else {
                    Phase::Done
                };
                Event::Release
            }
            (Phase::Postcopy, Kind::Pages) => Event::Pages(PageBatch::decode(&payload, true)?),
            _ => return Err(out_of_order),
        };
        Ok(event)
    }

    /// The connection.
    pub fn into_inner(self) -> R {
        self.input
    }
}

/// The destination's answers on the back channel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// The start was accepted: send memory.
    Ready,
    /// Refused, with the reason (the source keeps running).
    Refused(String),
    /// The destination runs the guest.
    Done,
    /// The destination holds the whole state: release the disks.
    Received,
    /// Post-copy: send these pages first.
    PageRequest(Vec<u64>),
    /// Post-copy: every page arrived.
    PostcopyDone,
    /// Everything before the `Sync` is in guest memory.
    Synced,
}

/// Writes a reply, in one `write_all` (replies from several threads do
/// not interleave a frame's parts; the caller still serializes them).
pub fn write_reply<W: Write>(mut out: W, reply: &Reply) -> Result<()> {
    let mut frame = Vec::new();
    let mut w = Writer::back_channel(&mut frame);
    match reply {
        Reply::Ready => w.frame(Kind::Ready, &[]),
        Reply::Refused(why) => w.frame(Kind::Refused, why.as_bytes()),
        Reply::Done => w.frame(Kind::Done, &[]),
        Reply::Received => w.frame(Kind::Received, &[]),
        Reply::PageRequest(gpas) => {
            if gpas.is_empty() || gpas.len() > MAX_BATCH {
                return Err(Error::Batch(format!("a request for {} pages", gpas.len())));
            }
            let p: Vec<u8> = gpas.iter().flat_map(|g| g.to_le_bytes()).collect();
            w.frame(Kind::PageRequest, &p)
        }
        Reply::PostcopyDone => w.frame(Kind::PostcopyDone, &[]),
        Reply::Synced => w.frame(Kind::Synced, &[]),
    }?;
    out.write_all(&frame)?;
    out.flush()?;
    Ok(())
}

/// Reads a reply.
pub fn read_reply<R: Read>(mut input: R) -> Result<Reply> {
    let (kind, payload) = read_frame(&mut input)?;
    match kind {
        Kind::Ready if payload.is_empty() => Ok(Reply::Ready),
        Kind::Refused => Ok(Reply::Refused(
            String::from_utf8_lossy(&payload).into_owned(),
        )),
        Kind::Done if payload.is_empty() => Ok(Reply::Done),
        Kind::Received if payload.is_empty() => Ok(Reply::Received),
        Kind::PageRequest => {
            if payload.is_empty() || payload.len() % 8 != 0 || payload.len() > MAX_BATCH * 8 {
                return Err(Error::Batch(format!(
                    "a page request of {} bytes",
                    payload.len()
                )));
            }
            Ok(Reply::PageRequest(
                payload
                    .chunks_exact(8)
                    .map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes")))
                    .collect(),
            ))
        }
        Kind::PostcopyDone if payload.is_empty() => Ok(Reply::PostcopyDone),
        Kind::Synced if payload.is_empty() => Ok(Reply::Synced),
        other => Err(Error::Order {
            got: other,
            after: "a request on the back channel",
        }),
    }
}

#[cfg(test)]
mod tests;
