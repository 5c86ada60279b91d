//! [`Qcow2`]: an open image. Opening (validation, locks, the backing
//! chain), lookups through the L1 and L2 tables, [`Qcow2::map`], resize,
//! flush and the lock hand-over. The read and write paths are in
//! `rw.rs`.

use std::fs::{File, TryLockError};
use std::io;
use std::path::{Path, PathBuf};

use crate::backing::{open_checked, Backing, Seen};
use crate::disk::{lock_file, Disk};
use crate::error::corrupt;
use crate::header::{field, incompat, to_usize, Header};
use crate::refcount::Refcounts;
use crate::table::{decode_table, encode_table, Entry, TableCache, COPIED, OFFSET_MASK};
use crate::{Error, Extent, ExtentKind, ImageFormat, Info, Result, MAX_L1_ENTRIES};

/// An open qcow2 image with its backing chain.
///
/// Every method that changes the image keeps it consistent on disk at
/// every step (see the crate docs); [`Qcow2::flush`] makes the writes so
/// far durable. Dropping it releases the locks.
#[derive(Debug)]
pub struct Qcow2 {
    pub(crate) path: PathBuf,
    pub(crate) disk: Disk,
    pub(crate) read_only: bool,
    pub(crate) hdr: Header,
    pub(crate) l1: Vec<u64>,
    pub(crate) l2: TableCache,
    /// Loaded when writable.
    pub(crate) refs: Option<Refcounts>,
    pub(crate) backing: Option<Box<Backing>>,
    /// The last compressed cluster inflated: its L2 entry and contents.
    pub(crate) inflated: Option<(u64, Vec<u8>)>,
    /// A length the file is known to have at least.
    pub(crate) known_len: u64,
}

/// A run of clusters of one kind, as the read path needs it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Run {
    /// Host bytes starting at `host`.
    Data {
        host: u64,
        copied: bool,
    },
    Zero,
    Unallocated,
    /// One compressed cluster (its raw L2 entry).
    Compressed {
        raw: u64,
    },
}

impl Qcow2 {
    /// Opens the image at `path` and its backing chain, and locks them:
    /// the image exclusively (or shared when `read_only`), its backing
    /// files shared and read-only.
    ///
    /// Every header field is checked against the file first. Refused,
    /// with an [`Error`] saying why: a file without the qcow2 magic,
    /// versions other than 2 and 3, clusters outside 512 B..2 MiB, tables
    /// outside the file, encryption, external data files, extended L2
    /// entries, zstd compression, unknown incompatible features, a
    /// backing chain that loops or is deeper than
    /// [`crate::MAX_CHAIN_DEPTH`]; and for a writable open, the dirty and
    /// corrupt bits and internal snapshots. A writable open clears the
    /// autoclear feature bits (this crate does not maintain bitmaps).
    pub fn open(path: &Path, read_only: bool) -> Result<Qcow2> {
        let mut seen = Seen::new();
        let file = open_checked(path, !read_only, &mut seen)?;
        Qcow2::from_file(path, file, read_only, &mut seen)
    }

    /// Opens the image in `file` (opened by [`open_checked`], which
    /// recorded it in `seen`), at `path`.
    pub(crate) fn from_file(
        path: &Path,
        file: File,
        read_only: bool,
        seen: &mut Seen,
    ) -> Result<Qcow2> {
        lock_file(&file, path, read_only)?;
        let mut disk = Disk::new(file);
        let hdr = Header::read(path, &disk)?;
        let p = || path.to_path_buf();
        if !read_only {
            if hdr.incompatible & incompat::CORRUPT != 0 {
                return Err(Error::Corrupt { path: p() });
            }
            if hdr.incompatible & incompat::DIRTY != 0 {
                return Err(Error::Dirty { path: p() });
            }
            if hdr.nb_snapshots > 0 {
                return Err(Error::Snapshots {
                    path: p(),
                    count: hdr.nb_snapshots,
                });
            }
        }
        let io = |what| {
            move |source| Error::Io {
                path: path.to_path_buf(),
                what,
                source,
            }
        };
        let mut raw = vec![0u8; to_usize(u64::from(hdr.l1_size) * 8)];
        disk.read_exact_at(&mut raw, hdr.l1_table_offset)
            .map_err(io("read the L1 table of"))?;
        let l1 = decode_table(&raw);
        let known_len = disk.len().map_err(io("find the size of"))?;
        let mut hdr = hdr;
        let refs = if read_only {
            None
        } else {
            let mut r = Refcounts::load(
                path,
                &disk,
                hdr.cluster_bits,
                hdr.refcount_order,
                hdr.refcount_table_offset,
                hdr.refcount_table_clusters,
            )
            .map_err(io("read the refcount table of"))?;
            let l1_end = hdr.l1_table_offset + u64::from(hdr.l1_size) * 8;
            r.avoid(hdr.l1_table_offset, l1_end.max(hdr.l1_table_offset + 1));
            if hdr.version == 3 && hdr.autoclear != 0 {
                disk.write_all_at(&0u64.to_be_bytes(), field::AUTOCLEAR)
                    .and_then(|()| disk.sync())
                    .map_err(io("clear the autoclear feature bits of"))?;
                hdr.autoclear = 0;
            }
            Some(r)
        };
        let backing = match &hdr.backing_file {
            Some(name) => Some(Box::new(Backing::open(
                path,
                name,
                hdr.backing_format,
                seen,
            )?)),
            None => None,
        };
        let cache = to_usize((8 << 20) >> hdr.cluster_bits).clamp(4, 32);
        Ok(Qcow2 {
            path: path.to_path_buf(),
            disk,
            read_only,
            hdr,
            l1,
            l2: TableCache::new(cache),
            refs,
            backing,
            inflated: None,
            known_len,
        })
    }

    /// The virtual disk's size in bytes.
    pub fn virtual_size(&self) -> u64 {
        self.hdr.size
    }

    /// The cluster size in bytes.
    pub fn cluster_size(&self) -> u64 {
        self.hdr.cluster_size()
    }

    /// The image file, for a VMM's own `preadv`/`pwritev` on
    /// [`ExtentKind::Data`] extents.
    pub fn file(&self) -> &File {
        self.disk.file()
    }

    /// The path the image was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The image's header facts.
    pub fn info(&self) -> Info {
        let h = &self.hdr;
        Info {
            version: h.version,
            compat: if h.version == 2 { "0.10" } else { "1.1" },
            cluster_size: h.cluster_size(),
            virtual_size: h.size,
            backing_file: h.backing_file.clone(),
            backing_format: h.backing_format,
            refcount_bits: h.refcount_bits(),
            dirty: h.incompatible & incompat::DIRTY != 0,
            corrupt: h.incompatible & incompat::CORRUPT != 0,
            lazy_refcounts: h.compatible & crate::header::COMPAT_LAZY_REFCOUNTS != 0,
            snapshots: h.nb_snapshots,
            bitmaps: h.has_bitmaps,
            unknown_extensions: h.unknown_extensions.clone(),
        }
    }

    /// Every file of the chain with its format, **this image first**, then
    /// its backing file, then that one's, down to the base.
    pub fn backing_chain(&self) -> Vec<(PathBuf, ImageFormat)> {
        let mut v = vec![(self.path.clone(), ImageFormat::Qcow2)];
        if let Some(b) = &self.backing {
            v.extend(b.chain());
        }
        v
    }

    /// Releases the locks of every file of the chain (a live migration
    /// hands the image over to its destination).
    pub fn unlock(&mut self) -> io::Result<()> {
        self.disk.file().unlock()?;
        match &mut self.backing {
            Some(b) => b.unlock(),
            None => Ok(()),
        }
    }

    /// Takes the locks again (the migration failed and the VM runs on); an
    /// error if another process took one meanwhile.
    pub fn relock(&mut self) -> io::Result<()> {
        relock_io(self.disk.file(), &self.path, self.read_only)?;
        match &mut self.backing {
            Some(b) => b.relock(),
            None => Ok(()),
        }
    }

    /// Makes every completed write durable: metadata updates are already
    /// ordered and written, so this is one `fdatasync` of the image file.
    pub fn flush(&mut self) -> io::Result<()> {
        if self.read_only {
            return Ok(());
        }
        if let Some(r) = &mut self.refs {
            r.flush(&mut self.disk)?;
        }
        self.disk.sync()
    }

    /// The first extent at `offset`, at most `len` bytes long (and never
    /// past the end of the disk; 0 bytes only if `len` is 0 or `offset`
    /// is the end).
    pub fn map(&mut self, offset: u64, len: u64) -> io::Result<Extent> {
        let len = len.min(self.hdr.size.saturating_sub(offset));
        if len == 0 {
            return Ok(Extent {
                kind: ExtentKind::Zero,
                len: 0,
            });
        }
        let (run, n) = self.run(offset, len)?;
        let kind = match run {
            Run::Data { host, copied: true } => ExtentKind::Data { host_offset: host },
            Run::Data {
                host,
                copied: false,
            } => ExtentKind::Shared { host_offset: host },
            Run::Zero => ExtentKind::Zero,
            Run::Unallocated => ExtentKind::Backing,
            Run::Compressed { .. } => ExtentKind::Compressed,
        };
        Ok(Extent { kind, len: n })
    }

    /// Grows the virtual disk to `new_size` bytes (a multiple of 512). If
    /// the L1 table must grow, a larger one is written and synced before
    /// the header points at it, and the old one is freed after.
    pub fn resize(&mut self, new_size: u64) -> Result<()> {
        let path = self.path.clone();
        if self.read_only {
            return Err(Error::ReadOnly { path: path.clone() });
        }
        let size = self.hdr.size;
        if new_size < size {
            return Err(Error::Shrink {
                path: path.clone(),
                size,
                new_size,
            });
        }
        if !new_size.is_multiple_of(512) || new_size > crate::MAX_VIRTUAL_SIZE {
            return Err(Error::Options {
                path: path.clone(),
                why: format!("new size {new_size}: a multiple of 512 bytes, at most 2^61"),
            });
        }
        let need = Header::l1_entries_for(self.hdr.cluster_bits, new_size);
        if need > MAX_L1_ENTRIES {
            return Err(Error::Options {
                path: path.clone(),
                why: format!(
                    "new size {new_size} needs an L1 table of {need} entries (at most {MAX_L1_ENTRIES} with {}-byte clusters)",
                    self.cluster_size()
                ),
            });
        }
        let io = |what| {
            let path = path.clone();
            move |source| Error::Io { path, what, source }
        };
        if need > crate::disk::len64(self.l1.len()) {
            self.grow_l1(need, new_size)
                .map_err(io("grow the L1 table of"))?;
        } else {
            let disk = &mut self.disk;
            disk.write_all_at(&new_size.to_be_bytes(), field::SIZE)
                .and_then(|()| disk.sync())
                .map_err(io("write the new size into"))?;
        }
        self.hdr.size = new_size;
        Ok(())
    }

    /// Moves the L1 table to a new place with `entries` entries and sets
    /// the virtual size to `size`, in one header update.
    fn grow_l1(&mut self, entries: u64, size: u64) -> io::Result<()> {
        let cs = self.cluster_size();
        let clusters = (entries * 8).div_ceil(cs);
        let Some(refs) = self.refs.as_mut() else {
            return Err(read_only_error(&self.path));
        };
        let start = refs.alloc_run(&mut self.disk, clusters)?;
        let mut l1 = self.l1.clone();
        l1.resize(to_usize(entries), 0);
        let mut bytes = encode_table(&l1);
        bytes.resize(to_usize(clusters * cs), 0);
        self.disk.write_all_at(&bytes, start)?;
        refs.flush(&mut self.disk)?;
        self.disk.sync()?;
        let l1_size =
            u32::try_from(entries).map_err(|_| corrupt(&self.path, "L1 table too large"))?;
        let mut hdr = [0u8; 24];
        hdr[..8].copy_from_slice(&size.to_be_bytes());
        hdr[12..16].copy_from_slice(&l1_size.to_be_bytes());
        hdr[16..].copy_from_slice(&start.to_be_bytes());
        self.disk.write_all_at(&hdr, field::SIZE)?;
        self.disk.sync()?;
        let old = self.hdr.l1_table_offset;
        let old_clusters = (u64::from(self.hdr.l1_size) * 8).div_ceil(cs);
        self.l1 = l1;
        self.hdr.l1_table_offset = start;
        self.hdr.l1_size = l1_size;
        refs.move_avoided(old, start, start + clusters * cs);
        for c in 0..old_clusters {
            refs.free(&mut self.disk, old + c * cs)?;
        }
        refs.flush(&mut self.disk)
    }

    /// The cluster index of guest `offset` in its L2 table, and the L1 index.
    pub(crate) fn indices(&self, guest_cluster: u64) -> (usize, usize) {
        let shift = self.hdr.cluster_bits - 3;
        (
            to_usize(guest_cluster >> shift),
            to_usize(guest_cluster & ((1u64 << shift) - 1)),
        )
    }

    /// The L2 table offset of L1 entry `i` (checked), and whether it is
    /// COPIED; `None` if unallocated.
    pub(crate) fn l2_offset(&mut self, i: usize) -> io::Result<Option<(u64, bool)>> {
        let raw = self.l1.get(i).copied().unwrap_or(0);
        let off = raw & OFFSET_MASK;
        if off == 0 {
            return Ok(None);
        }
        let cs = self.cluster_size();
        if !off.is_multiple_of(cs) {
            return Err(corrupt(
                &self.path,
                format!("l2_offset={off:#x} (L1 entry {i}): table is not cluster aligned; L1 entry corrupted"),
            ));
        }
        self.check_host(off, "L2 table")?;
        Ok(Some((off, raw & COPIED != 0)))
    }

    /// Fails unless the cluster at `host` is inside the file.
    pub(crate) fn check_host(&mut self, host: u64, what: &str) -> io::Result<()> {
        let end = host.saturating_add(self.cluster_size());
        if end <= self.known_len {
            return Ok(());
        }
        self.known_len = self.disk.len()?;
        if end <= self.known_len {
            return Ok(());
        }
        Err(corrupt(
            &self.path,
            format!(
                "{what} at {host:#x} is past the end of the file ({} bytes)",
                self.known_len
            ),
        ))
    }

    /// The L2 table at `off`, from the cache or the file.
    pub(crate) fn l2_table(&mut self, off: u64) -> io::Result<&mut Vec<u64>> {
        if self.l2.get(off).is_none() {
            let mut raw = vec![0u8; to_usize(self.cluster_size())];
            self.disk.read_exact_at(&mut raw, off)?;
            self.l2.insert(off, decode_table(&raw));
        }
        self.l2
            .get(off)
            .ok_or_else(|| io::Error::other("L2 cache lost a table"))
    }

    /// The raw L2 entry of guest cluster `gc` (0 if its table is not
    /// allocated).
    pub(crate) fn raw_entry(&mut self, gc: u64) -> io::Result<u64> {
        let (i, j) = self.indices(gc);
        match self.l2_offset(i)? {
            None => Ok(0),
            Some((off, _)) => Ok(self.l2_table(off)?.get(j).copied().unwrap_or(0)),
        }
    }

    /// The decoded, checked L2 entry of guest cluster `gc`.
    pub(crate) fn entry(&mut self, gc: u64) -> io::Result<(u64, Entry)> {
        let raw = self.raw_entry(gc)?;
        let e = Entry::decode(raw, self.hdr.cluster_bits);
        let cs = self.cluster_size();
        match e {
            Entry::Normal { host, .. } | Entry::Zero { host: Some(host), .. } if host % cs != 0 => {
                Err(corrupt(
                    &self.path,
                    format!("offset={host:#x} (guest offset {:#x}): cluster is not properly aligned; L2 entry corrupted", gc * cs),
                ))
            }
            _ => Ok((raw, e)),
        }
    }

    /// The run of clusters of one kind starting at guest `offset`, at most
    /// `len` bytes (`len` > 0 and inside the disk).
    pub(crate) fn run(&mut self, offset: u64, len: u64) -> io::Result<(Run, u64)> {
        let cs = self.cluster_size();
        let cb = self.hdr.cluster_bits;
        let within = offset & (cs - 1);
        let gc = offset >> cb;
        let (raw, first) = self.entry(gc)?;
        let mut n = (cs - within).min(len);
        let run = match first {
            Entry::Compressed { .. } => return Ok((Run::Compressed { raw }, n)),
            Entry::Normal { host, copied } => {
                self.check_host(host, "data cluster")?;
                Run::Data {
                    host: host + within,
                    copied,
                }
            }
            Entry::Zero { .. } => Run::Zero,
            Entry::Unallocated => Run::Unallocated,
        };
        let mut next = gc + 1;
        while n < len {
            let (_, e) = self.entry(next)?;
            let same = match (run, e) {
                (Run::Data { host, copied }, Entry::Normal { host: h, copied: c }) => {
                    c == copied && h == host - within + (next - gc) * cs && {
                        self.check_host(h, "data cluster")?;
                        true
                    }
                }
                (Run::Zero, Entry::Zero { .. }) | (Run::Unallocated, Entry::Unallocated) => true,
                _ => false,
            };
            if !same {
                break;
            }
            n += cs.min(len - n);
            next += 1;
        }
        Ok((run, n))
    }
}

/// The error of a write to a read-only image.
pub(crate) fn read_only_error(path: &Path) -> io::Error {
    io::Error::new(
        io::ErrorKind::PermissionDenied,
        format!("qcow2 image {} is open read-only", path.display()),
    )
}

/// Takes the lock on `file` again, as an `io::Error` naming the file.
pub(crate) fn relock_io(file: &File, path: &Path, shared: bool) -> io::Result<()> {
    let r = if shared {
        file.try_lock_shared()
    } else {
        file.try_lock()
    };
    match r {
        Ok(()) => Ok(()),
        Err(TryLockError::WouldBlock) => Err(io::Error::new(
            io::ErrorKind::WouldBlock,
            format!("{} is locked by another process", path.display()),
        )),
        Err(TryLockError::Error(e)) => Err(e),
    }
}
