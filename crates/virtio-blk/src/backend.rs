//! Where a block device's sectors live: the [`BlockBackend`] trait and
//! [`RawFile`], a raw image file (or host block device).
//!
//! This is the crate's only module with `unsafe`: the `flock` call.

use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use vmm_sys_util::fallocate::{fallocate, FallocateMode};

use crate::request::SECTOR_SIZE;
use crate::{Error, Result};

/// The storage behind a block device. Offsets and lengths are in bytes; the
/// device has checked them against [`BlockBackend::size`].
pub trait BlockBackend: Send {
    /// The size of the disk in bytes.
    fn size(&self) -> u64;
    /// Fills `buf` from `offset`.
    fn read_at(&mut self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    /// Writes all of `buf` at `offset`.
    fn write_at(&mut self, buf: &[u8], offset: u64) -> io::Result<()>;
    /// Makes every completed write durable.
    fn flush(&mut self) -> io::Result<()>;
    /// Deallocates `len` bytes at `offset` (a hint: their contents become
    /// unspecified).
    fn discard(&mut self, offset: u64, len: u64) -> io::Result<()>;
    /// Makes `len` bytes at `offset` read as zero.
    fn write_zeroes(&mut self, offset: u64, len: u64) -> io::Result<()>;
}

/// The zeroes written when a file cannot punch holes.
static ZEROES: [u8; 64 * 1024] = [0; 64 * 1024];

/// A raw disk image: sector `n` is bytes `512 * n ..` of the file.
///
/// [`RawFile::open`] takes an advisory `flock` on the file, exclusive when
/// writable and shared when read-only, and holds it until the `RawFile` is
/// dropped, so a second VMM cannot open the same image writable.
#[derive(Debug)]
pub struct RawFile {
    file: File,
    path: PathBuf,
    size: u64,
}

impl RawFile {
    /// Opens `path` read-write (or read-only), locks it and checks that its
    /// size is a whole number of 512-byte sectors.
    pub fn open(path: impl AsRef<Path>, read_only: bool) -> Result<RawFile> {
        let path = path.as_ref().to_path_buf();
        let file = OpenOptions::new()
            .read(true)
            .write(!read_only)
            .open(&path)
            .map_err(|source| Error::Open {
                path: path.clone(),
                source,
            })?;
        lock(&file, read_only).map_err(|source| {
            if source.kind() == io::ErrorKind::WouldBlock {
                Error::Locked { path: path.clone() }
            } else {
                Error::Lock {
                    path: path.clone(),
                    source,
                }
            }
        })?;
        // Seeking to the end also sizes block devices, whose metadata length
        // is 0.
        let size = (&file)
            .seek(SeekFrom::End(0))
            .map_err(|source| Error::Size {
                path: path.clone(),
                source,
            })?;
        if size % SECTOR_SIZE != 0 {
            return Err(Error::UnalignedSize { path, size });
        }
        Ok(RawFile { file, path, size })
    }

    /// The path the image was opened from.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl BlockBackend for RawFile {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&mut self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.file.read_exact_at(buf, offset)
    }

    fn write_at(&mut self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.file.write_all_at(buf, offset)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.file.sync_data()
    }

    fn discard(&mut self, offset: u64, len: u64) -> io::Result<()> {
        match punch_hole(&self.file, offset, len) {
            // Discard is a hint: a file that cannot deallocate keeps its data.
            Err(e) if cannot_punch(&e) => Ok(()),
            r => r,
        }
    }

    fn write_zeroes(&mut self, offset: u64, len: u64) -> io::Result<()> {
        match punch_hole(&self.file, offset, len) {
            Err(e) if cannot_punch(&e) => write_zeroes_slowly(&self.file, offset, len),
            r => r,
        }
    }
}

/// Deallocates `len` bytes at `offset`, keeping the file size; the range
/// then reads as zero.
fn punch_hole(file: &File, offset: u64, len: u64) -> io::Result<()> {
    if len == 0 {
        return Ok(());
    }
    fallocate(file, FallocateMode::PunchHole, true, offset, len).map_err(io::Error::from)
}

/// Whether `e` says the file (system) cannot punch holes at all.
fn cannot_punch(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EOPNOTSUPP | libc::ENOSYS | libc::ENODEV)
    )
}

/// Writes `len` zero bytes at `offset`, one bounded chunk at a time.
fn write_zeroes_slowly(file: &File, mut offset: u64, mut len: u64) -> io::Result<()> {
    while len > 0 {
        let n = usize::try_from(len).map_or(ZEROES.len(), |l| l.min(ZEROES.len()));
        file.write_all_at(&ZEROES[..n], offset)?;
        let n = u64::try_from(n).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        offset = offset
            .checked_add(n)
            .ok_or_else(|| io::Error::from(io::ErrorKind::InvalidInput))?;
        len -= n;
    }
    Ok(())
}

/// Takes a non-blocking `flock` on `file`: shared if `shared`, else
/// exclusive. Contention is `ErrorKind::WouldBlock`.
#[allow(unsafe_code)]
fn lock(file: &File, shared: bool) -> io::Result<()> {
    let op = if shared { libc::LOCK_SH } else { libc::LOCK_EX };
    // SAFETY: flock takes a file descriptor and an operation, and touches no
    // memory of ours. The descriptor is owned by `file`, which the borrow
    // keeps open for the duration of the call.
    let ret = unsafe { libc::flock(file.as_raw_fd(), op | libc::LOCK_NB) };
    if ret == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;
    use vmm_sys_util::tempfile::TempFile;

    fn image(len: u64) -> TempFile {
        let f = TempFile::new().unwrap();
        f.as_file().set_len(len).unwrap();
        f
    }

    #[test]
    fn raw_file_open_reports_size() {
        let img = image(1 << 20);
        let raw = RawFile::open(img.as_path(), false).unwrap();
        assert_eq!(raw.size(), 1 << 20);
        assert_eq!(raw.path(), img.as_path());
    }

    #[test]
    fn raw_file_missing_file_is_an_open_error() {
        let err = RawFile::open("/nonexistent/ember/disk.img", true).unwrap_err();
        assert!(matches!(err, Error::Open { .. }));
        assert!(err.to_string().contains("/nonexistent/ember/disk.img"));
    }

    #[test]
    fn raw_file_second_writable_open_is_locked() {
        let img = image(4096);
        let _first = RawFile::open(img.as_path(), false).unwrap();
        let err = RawFile::open(img.as_path(), false).unwrap_err();
        assert!(matches!(err, Error::Locked { ref path } if path == img.as_path()));
        let msg = err.to_string();
        assert!(msg.contains("another process"), "{msg}");
        assert!(msg.contains(&img.as_path().display().to_string()), "{msg}");
        // Nor can it be opened read-only while someone writes it.
        let err = RawFile::open(img.as_path(), true).unwrap_err();
        assert!(matches!(err, Error::Locked { .. }));
    }

    #[test]
    fn raw_file_read_only_opens_share_the_image() {
        let img = image(4096);
        let _a = RawFile::open(img.as_path(), true).unwrap();
        let _b = RawFile::open(img.as_path(), true).unwrap();
        let err = RawFile::open(img.as_path(), false).unwrap_err();
        assert!(matches!(err, Error::Locked { .. }));
    }

    #[test]
    fn raw_file_lock_is_released_on_drop() {
        let img = image(4096);
        drop(RawFile::open(img.as_path(), false).unwrap());
        RawFile::open(img.as_path(), false).unwrap();
    }

    #[test]
    fn raw_file_unaligned_size_is_rejected() {
        let img = image(1000);
        let err = RawFile::open(img.as_path(), false).unwrap_err();
        assert!(matches!(err, Error::UnalignedSize { size: 1000, .. }));
        let msg = err.to_string();
        assert!(msg.contains("1000"), "{msg}");
        assert!(msg.contains(&img.as_path().display().to_string()), "{msg}");
    }

    #[test]
    fn raw_file_reads_back_what_it_writes() {
        let img = image(8192);
        let mut raw = RawFile::open(img.as_path(), false).unwrap();
        raw.write_at(&[0xab; 512], 1024).unwrap();
        raw.flush().unwrap();
        let mut buf = [0u8; 1536];
        raw.read_at(&mut buf, 512).unwrap();
        assert!(buf[..512].iter().all(|b| *b == 0));
        assert!(buf[512..1024].iter().all(|b| *b == 0xab));
        assert!(buf[1024..].iter().all(|b| *b == 0));
        // Reading past the end is an error, not a short read.
        assert!(raw.read_at(&mut buf, 8192 - 512).is_err());
    }

    #[test]
    fn raw_file_discard_frees_blocks_and_reads_zero() {
        let img = image(0);
        img.as_file().write_all_at(&[0x5a; 1 << 20], 0).unwrap();
        img.as_file().sync_all().unwrap();
        let mut raw = RawFile::open(img.as_path(), false).unwrap();
        let before = img.as_file().metadata().unwrap().blocks();
        raw.discard(256 << 10, 512 << 10).unwrap();
        let after = img.as_file().metadata().unwrap().blocks();
        assert!(after < before, "st_blocks {before} -> {after}");
        assert_eq!(raw.size(), 1 << 20);
        let mut buf = vec![0u8; 1 << 20];
        raw.read_at(&mut buf, 0).unwrap();
        assert!(buf[..256 << 10].iter().all(|b| *b == 0x5a));
        assert!(buf[256 << 10..768 << 10].iter().all(|b| *b == 0));
        assert!(buf[768 << 10..].iter().all(|b| *b == 0x5a));
    }

    #[test]
    fn raw_file_write_zeroes_reads_zero() {
        let img = image(0);
        img.as_file().write_all_at(&[0x5a; 8192], 0).unwrap();
        let mut raw = RawFile::open(img.as_path(), false).unwrap();
        raw.write_zeroes(512, 1024).unwrap();
        let mut buf = [0u8; 8192];
        raw.read_at(&mut buf, 0).unwrap();
        assert!(buf[..512].iter().all(|b| *b == 0x5a));
        assert!(buf[512..1536].iter().all(|b| *b == 0));
        assert!(buf[1536..].iter().all(|b| *b == 0x5a));
    }

    #[test]
    fn raw_file_slow_write_zeroes_covers_several_chunks() {
        let img = image(0);
        let len = 3 * ZEROES.len() + 512;
        img.as_file()
            .write_all_at(&vec![0x5a; len + 512], 0)
            .unwrap();
        write_zeroes_slowly(img.as_file(), 512, len as u64).unwrap();
        let mut buf = vec![0u8; len + 512];
        img.as_file().read_exact_at(&mut buf, 0).unwrap();
        assert!(buf[..512].iter().all(|b| *b == 0x5a));
        assert!(buf[512..].iter().all(|b| *b == 0));
    }
}
