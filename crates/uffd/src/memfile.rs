//! The snapshot's memory file, mapped read-only, with its holes known.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::ptr::NonNull;

use crate::{Error, Result};

/// A memory file mapped read-only (`MAP_PRIVATE`, nothing read ahead), and
/// the ranges of it that hold data: the rest are holes of a sparse file,
/// which the handler serves with `UFFDIO_ZEROPAGE` without reading them.
#[derive(Debug)]
pub struct MemoryFile {
    ptr: NonNull<u8>,
    len: usize,
    /// Sorted, disjoint `[start, end)` data ranges (`SEEK_DATA`/`SEEK_HOLE`).
    data: Vec<(u64, u64)>,
    path: String,
}

// SAFETY: the mapping is read-only and owned by this value alone; nothing
// in it is mutated through `ptr`, so it may be used from any thread.
unsafe impl Send for MemoryFile {}
// SAFETY: as above; shared access only ever reads.
unsafe impl Sync for MemoryFile {}

impl MemoryFile {
    /// Opens and maps `path`.
    pub fn open(path: &Path) -> Result<Self> {
        let name = path.display().to_string();
        let err = |source| Error::MemoryFile {
            path: name.clone(),
            source,
        };
        let file = File::open(path).map_err(err)?;
        let file_len = file.metadata().map_err(err)?.len();
        if file_len == 0 {
            return Err(Error::EmptyMemoryFile(name));
        }
        let len = usize::try_from(file_len)
            .map_err(|_| err(io::Error::from(io::ErrorKind::FileTooLarge)))?;
        let data = data_ranges(&file, file_len).map_err(err)?;
        // SAFETY: a fresh read-only private mapping of `len` bytes of an open
        // file; the kernel picks the address, so no existing memory is
        // affected. The result is checked below.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_PRIVATE | libc::MAP_NORESERVE,
                file.as_raw_fd(),
                0,
            )
        };
        if addr == libc::MAP_FAILED {
            return Err(err(io::Error::last_os_error()));
        }
        let ptr = NonNull::new(addr.cast::<u8>()).ok_or_else(|| err(io::Error::other("mmap")))?;
        Ok(Self {
            ptr,
            len,
            data,
            path: name,
        })
    }

    /// The file's length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the file is empty (never: [`MemoryFile::open`] refuses that).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The path it was opened from, for messages.
    pub fn path(&self) -> &str {
        &self.path
    }

    /// Whether `[offset, offset + len)` is entirely a hole of the file.
    pub fn is_hole(&self, offset: u64, len: u64) -> bool {
        let end = offset.saturating_add(len);
        let first = self.data.partition_point(|&(_, e)| e <= offset);
        self.data.get(first).is_none_or(|&(s, _)| s >= end)
    }

    /// The address of `len` bytes at `offset` in the mapping, if they are
    /// all in the file.
    pub(crate) fn bytes_at(&self, offset: u64, len: usize) -> Option<*const u8> {
        let offset = usize::try_from(offset).ok()?;
        if offset.checked_add(len)? > self.len {
            return None;
        }
        // SAFETY: offset + len <= self.len, so the result stays inside the
        // mapping.
        Some(unsafe { self.ptr.as_ptr().add(offset) }.cast_const())
    }
}

impl Drop for MemoryFile {
    fn drop(&mut self) {
        // SAFETY: `ptr` and `len` are the mapping made in `open`, unmapped
        // once, here; no reference into it outlives `self`.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}

/// The data ranges of `file` by `SEEK_DATA`/`SEEK_HOLE`; the whole file
/// where the filesystem cannot tell.
fn data_ranges(file: &File, len: u64) -> io::Result<Vec<(u64, u64)>> {
    match scan_data_ranges(file, len) {
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => Ok(vec![(0, len)]),
        other => other,
    }
}

fn scan_data_ranges(file: &File, len: u64) -> io::Result<Vec<(u64, u64)>> {
    let mut ranges = Vec::new();
    let mut pos = 0u64;
    while pos < len {
        let Some(start) = seek(file, pos, libc::SEEK_DATA)? else {
            break; // ENXIO: only a hole from `pos` to the end.
        };
        let end = seek(file, start, libc::SEEK_HOLE)?.unwrap_or(len).min(len);
        if end <= start {
            break;
        }
        ranges.push((start, end));
        pos = end;
    }
    Ok(ranges)
}

/// `lseek(fd, pos, whence)`: `None` for ENXIO (no data/hole past `pos`).
fn seek(file: &File, pos: u64, whence: libc::c_int) -> io::Result<Option<u64>> {
    let pos =
        libc::off_t::try_from(pos).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: lseek on an open fd only moves its offset (unused: the file is
    // read through the mapping); no memory is passed.
    let got = unsafe { libc::lseek(file.as_raw_fd(), pos, whence) };
    if got < 0 {
        let err = io::Error::last_os_error();
        return match err.raw_os_error() {
            Some(libc::ENXIO) => Ok(None),
            _ => Err(err),
        };
    }
    Ok(Some(got.unsigned_abs()))
}
