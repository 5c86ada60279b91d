//! [`Qcow2Disk`]: a qcow2 image (with its backing chain) as a
//! [`BlockBackend`], and [`open_backend`], which opens an image by its
//! given format.
//!
//! Allocated clusters take the fast path: `ember_qcow2::Qcow2::map` says
//! where the guest's range lives in the image file, and the guest's buffers
//! are read or written there with `preadv`/`pwritev`, as a raw file's are.
//! Everything else (unallocated clusters, reads through the backing chain,
//! zero and compressed clusters, writes that allocate) goes through the
//! image's own `read_at`/`write_at` and a bounce buffer of at most
//! [`crate::IO_CHUNK`] bytes.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::path::{Path, PathBuf};

use ember_memory::Slice;
use ember_qcow2::{ExtentKind, ImageFormat, Qcow2};

use crate::backend::{vectored_io, BlockBackend, Direction, RawFile};
use crate::{CacheMode, Error, Result};

/// A qcow2 image, writable or read-only, with its backing files open
/// read-only.
pub struct Qcow2Disk {
    image: Qcow2,
    path: PathBuf,
}

impl std::fmt::Debug for Qcow2Disk {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Qcow2Disk")
            .field("path", &self.path)
            .field("virtual_size", &self.image.virtual_size())
            .finish_non_exhaustive()
    }
}

impl Qcow2Disk {
    /// Opens and locks the image and its backing chain.
    pub fn open(path: impl AsRef<Path>, read_only: bool) -> Result<Qcow2Disk> {
        let path = path.as_ref().to_path_buf();
        let image = Qcow2::open(&path, read_only).map_err(|source| match source {
            ember_qcow2::Error::Locked { path } => Error::Locked { path },
            source => Error::Qcow2 {
                path: path.clone(),
                source,
            },
        })?;
        Ok(Qcow2Disk { image, path })
    }

    /// The path the image was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Moves `len` bytes between the guest buffers `bufs` (starting `skip`
    /// bytes into them) and the virtual disk at `offset`, one extent at a
    /// time.
    fn transfer(&mut self, bufs: &[Slice<'_>], offset: u64, dir: Direction) -> io::Result<()> {
        let total: u64 = bufs.iter().map(|s| s.len() as u64).sum();
        let mut done = 0u64;
        while done < total {
            let at = offset + done;
            let want = (total - done).min(crate::IO_CHUNK as u64);
            let extent = self.image.map(at, want)?;
            let len = extent.len.min(want);
            if len == 0 {
                return Err(io::Error::other(format!(
                    "qcow2 image {}: no extent at offset {at}",
                    self.path.display()
                )));
            }
            let part = sub_slices(bufs, done, len);
            match (extent.kind, dir) {
                (ExtentKind::Data { host_offset }, _) => {
                    vectored_io(self.image.file(), &part, host_offset, dir)?
                }
                (_, Direction::Read) => {
                    let mut tmp = vec![0u8; usize::try_from(len).unwrap_or(usize::MAX)];
                    self.image.read_at(&mut tmp, at)?;
                    copy_to_guest(&part, &tmp);
                }
                (_, Direction::Write) => {
                    let mut tmp = vec![0u8; usize::try_from(len).unwrap_or(usize::MAX)];
                    copy_from_guest(&part, &mut tmp);
                    self.image.write_at(&tmp, at)?;
                }
            }
            done += len;
        }
        Ok(())
    }
}

/// The part `[from, from + len)` of the concatenation of `bufs`.
fn sub_slices<'a>(bufs: &[Slice<'a>], from: u64, len: u64) -> Vec<Slice<'a>> {
    let mut out = Vec::new();
    let mut start = 0u64;
    let end = from + len;
    for s in bufs {
        let s_len = s.len() as u64;
        let s_end = start + s_len;
        if s_end > from && start < end {
            let lo = from.saturating_sub(start);
            let hi = end.min(s_end) - start;
            // Both bounds are inside `s` (lo < hi <= its length, a usize).
            if let (Ok(lo), Ok(n)) = (usize::try_from(lo), usize::try_from(hi - lo)) {
                if let Ok(sub) = s.subslice(lo, n) {
                    out.push(sub);
                }
            }
        }
        start = s_end;
        if start >= end {
            break;
        }
    }
    out
}

/// Copies `src` into the guest buffers, in order.
fn copy_to_guest(bufs: &[Slice<'_>], src: &[u8]) {
    let mut at = 0;
    for s in bufs {
        let n = s.len().min(src.len() - at);
        s.copy_from(&src[at..at + n]);
        at += n;
    }
}

/// Fills `dst` from the guest buffers, in order.
fn copy_from_guest(bufs: &[Slice<'_>], dst: &mut [u8]) {
    let mut at = 0;
    for s in bufs {
        let n = s.len().min(dst.len() - at);
        s.copy_to(&mut dst[at..at + n]);
        at += n;
    }
}

impl BlockBackend for Qcow2Disk {
    fn size(&self) -> u64 {
        self.image.virtual_size()
    }

    fn read_at(&mut self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.image.read_at(buf, offset)
    }

    fn write_at(&mut self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.image.write_at(buf, offset)
    }

    fn read_vectored_at(&mut self, bufs: &[Slice<'_>], offset: u64) -> io::Result<()> {
        self.transfer(bufs, offset, Direction::Read)
    }

    fn write_vectored_at(&mut self, bufs: &[Slice<'_>], offset: u64) -> io::Result<()> {
        self.transfer(bufs, offset, Direction::Write)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.image.flush()
    }

    fn direct_target(&mut self, offset: u64, len: u64, _write: bool) -> Option<(RawFd, u64)> {
        // Only a run that is one allocated extent of the image file (its
        // clusters referenced only here, so written in place).
        match self.image.map(offset, len).ok()? {
            ember_qcow2::Extent {
                kind: ExtentKind::Data { host_offset },
                len: got,
            } if got == len => Some((self.image.file().as_raw_fd(), host_offset)),
            _ => None,
        }
    }

    fn discard(&mut self, offset: u64, len: u64) -> io::Result<()> {
        self.image.discard(offset, len)
    }

    fn write_zeroes(&mut self, offset: u64, len: u64) -> io::Result<()> {
        self.image.write_zeroes(offset, len)
    }

    fn unlock(&mut self) -> io::Result<()> {
        self.image.unlock()
    }

    fn relock(&mut self) -> io::Result<()> {
        self.image.relock()
    }
}

/// Opens the image at `path` as `format` says (never by its contents) and
/// locks it; `cache` is the host page cache's part (`cache=none`, direct
/// I/O, is for raw images: qcow2 metadata I/O is not block-aligned).
pub fn open_backend(
    path: &Path,
    format: ImageFormat,
    read_only: bool,
    cache: CacheMode,
) -> Result<Box<dyn BlockBackend>> {
    Ok(match format {
        ImageFormat::Raw => Box::new(RawFile::open_with(path, read_only, cache)?),
        ImageFormat::Qcow2 if cache == CacheMode::None => return Err(Error::Unsupported {
            path: path.to_path_buf(),
            what: "cache=none on a qcow2 image (direct I/O is for raw images; use cache=writeback)",
        }),
        ImageFormat::Qcow2 => Box::new(Qcow2Disk::open(path, read_only)?),
    })
}
