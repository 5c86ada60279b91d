//! Where a block device's sectors live: the [`BlockBackend`] trait and
//! [`RawFile`], a raw image file (or host block device).
//!
//! This is the crate's only module with `unsafe`: the `flock`, `preadv` and
//! `pwritev` calls.

use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::FileExt;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use ember_memory::Slice;
use vm_memory::bitmap::Bitmap;
use vmm_sys_util::fallocate::{fallocate, FallocateMode};

use crate::request::SECTOR_SIZE;
use crate::{CacheMode, Error, Result};

/// The storage behind a block device. Offsets and lengths are in bytes; the
/// device has checked them against [`BlockBackend::size`].
pub trait BlockBackend: Send {
    /// The size of the disk in bytes.
    fn size(&self) -> u64;
    /// Fills `buf` from `offset`.
    fn read_at(&mut self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    /// Writes all of `buf` at `offset`.
    fn write_at(&mut self, buf: &[u8], offset: u64) -> io::Result<()>;
    /// Fills the guest buffers `bufs`, one after the other, from `offset`.
    ///
    /// The default copies through a buffer with [`BlockBackend::read_at`];
    /// [`RawFile`] reads straight into guest memory with `preadv`.
    fn read_vectored_at(&mut self, bufs: &[Slice<'_>], offset: u64) -> io::Result<()> {
        let mut offset = offset;
        for s in bufs {
            let mut tmp = vec![0u8; s.len()];
            self.read_at(&mut tmp, offset)?;
            s.copy_from(&tmp);
            offset = next_offset(offset, s.len())?;
        }
        Ok(())
    }
    /// Writes the guest buffers `bufs`, one after the other, at `offset`.
    ///
    /// The default copies through a buffer with [`BlockBackend::write_at`];
    /// [`RawFile`] writes straight from guest memory with `pwritev`.
    fn write_vectored_at(&mut self, bufs: &[Slice<'_>], offset: u64) -> io::Result<()> {
        let mut offset = offset;
        for s in bufs {
            let mut tmp = vec![0u8; s.len()];
            s.copy_to(&mut tmp[..]);
            self.write_at(&tmp, offset)?;
            offset = next_offset(offset, s.len())?;
        }
        Ok(())
    }
    /// Makes every completed write durable.
    fn flush(&mut self) -> io::Result<()>;
    /// Deallocates `len` bytes at `offset` (a hint: their contents become
    /// unspecified).
    fn discard(&mut self, offset: u64, len: u64) -> io::Result<()>;
    /// Makes `len` bytes at `offset` read as zero.
    fn write_zeroes(&mut self, offset: u64, len: u64) -> io::Result<()>;
    /// Where `len` bytes at `offset` of the disk live as one run of one
    /// host file, for an engine that moves them itself (io_uring): the
    /// file and the offset in it. `None` when the backend must do the I/O
    /// (a qcow2 allocation, a backing file, a compressed cluster).
    fn direct_target(&mut self, _offset: u64, _len: u64, _write: bool) -> Option<(RawFd, u64)> {
        None
    }
    /// The host file whose `fdatasync` is the whole of a flush, if a flush
    /// is nothing more.
    fn flush_target(&self) -> Option<RawFd> {
        None
    }
    /// The alignment of buffers, offsets and lengths the backend's direct
    /// I/O (`O_DIRECT`) needs, if it has any.
    fn dio_align(&self) -> Option<usize> {
        None
    }
    /// Drops the image's lock (a live migration hands the image to its
    /// destination); nothing to do for a backend without one.
    fn unlock(&mut self) -> io::Result<()> {
        Ok(())
    }
    /// Takes the lock again (the migration failed and the VM runs on).
    fn relock(&mut self) -> io::Result<()> {
        Ok(())
    }
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
    read_only: bool,
    /// Opened with `O_DIRECT` (`cache=none`): buffers, offsets and lengths
    /// must be multiples of [`DIO_ALIGN`]; others go through a bounce
    /// buffer.
    direct: bool,
}

/// The alignment `cache=none` asks of direct I/O: the 512-byte logical
/// block of almost every host disk (a disk with 4 KiB logical blocks is
/// refused when the image is opened).
pub const DIO_ALIGN: usize = 512;

impl RawFile {
    /// Opens `path` read-write (or read-only) through the page cache,
    /// locks it and checks that its size is a whole number of 512-byte
    /// sectors.
    pub fn open(path: impl AsRef<Path>, read_only: bool) -> Result<RawFile> {
        RawFile::open_with(path, read_only, CacheMode::Writeback)
    }

    /// [`RawFile::open`] with the host cache mode: `cache=none` opens
    /// with `O_DIRECT` and checks that a 512-byte direct read works.
    pub fn open_with(path: impl AsRef<Path>, read_only: bool, cache: CacheMode) -> Result<RawFile> {
        let path = path.as_ref().to_path_buf();
        let direct = cache == CacheMode::None;
        let file = OpenOptions::new()
            .read(true)
            .write(!read_only)
            .custom_flags(if direct { libc::O_DIRECT } else { 0 })
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
        if direct && size > 0 {
            let mut probe = AlignedBuf::new(DIO_ALIGN);
            file.read_exact_at(probe.as_mut(), 0)
                .map_err(|source| Error::Open {
                    path: path.clone(),
                    source: io::Error::new(
                        source.kind(),
                        format!(
                            "cache=none: a {DIO_ALIGN}-byte O_DIRECT read fails ({source}); \
                             the host disk may have 4 KiB logical blocks: use cache=writeback"
                        ),
                    ),
                })?;
        }
        Ok(RawFile {
            file,
            path,
            size,
            read_only,
            direct,
        })
    }

    /// Whether direct I/O can take these buffers at `offset` as they are.
    fn aligned(&self, bufs: &[Slice<'_>], offset: u64) -> bool {
        !self.direct
            || (offset % DIO_ALIGN as u64 == 0
                && bufs.iter().all(|s| {
                    s.len() % DIO_ALIGN == 0 && (s.ptr_guard().as_ptr() as usize) % DIO_ALIGN == 0
                }))
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

    fn unlock(&mut self) -> io::Result<()> {
        unlock(&self.file)
    }

    fn relock(&mut self) -> io::Result<()> {
        lock(&self.file, self.read_only)
    }

    fn read_at(&mut self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        if self.direct && !is_aligned(buf.as_ptr(), buf.len(), offset) {
            let mut bounce = AlignedBuf::new(buf.len());
            self.file.read_exact_at(bounce.as_mut(), offset)?;
            buf.copy_from_slice(bounce.as_mut());
            return Ok(());
        }
        self.file.read_exact_at(buf, offset)
    }

    fn write_at(&mut self, buf: &[u8], offset: u64) -> io::Result<()> {
        if self.direct && !is_aligned(buf.as_ptr(), buf.len(), offset) {
            let mut bounce = AlignedBuf::new(buf.len());
            bounce.as_mut().copy_from_slice(buf);
            return self.file.write_all_at(bounce.as_mut(), offset);
        }
        self.file.write_all_at(buf, offset)
    }

    fn read_vectored_at(&mut self, bufs: &[Slice<'_>], offset: u64) -> io::Result<()> {
        if !self.aligned(bufs, offset) {
            // O_DIRECT and a guest buffer off the 512-byte grid: through
            // an aligned bounce buffer (the offset is a sector's).
            let total = bufs.iter().map(Slice::len).sum();
            let mut bounce = AlignedBuf::new(total);
            self.file.read_exact_at(bounce.as_mut(), offset)?;
            let mut at = 0;
            for s in bufs {
                s.copy_from(&bounce.as_mut()[at..at + s.len()]);
                at += s.len();
            }
            return Ok(());
        }
        vectored_io(&self.file, bufs, offset, Direction::Read)
    }

    fn write_vectored_at(&mut self, bufs: &[Slice<'_>], offset: u64) -> io::Result<()> {
        if !self.aligned(bufs, offset) {
            let total = bufs.iter().map(Slice::len).sum();
            let mut bounce = AlignedBuf::new(total);
            let mut at = 0;
            for s in bufs {
                s.copy_to(&mut bounce.as_mut()[at..at + s.len()]);
                at += s.len();
            }
            return self.file.write_all_at(bounce.as_mut(), offset);
        }
        vectored_io(&self.file, bufs, offset, Direction::Write)
    }

    fn direct_target(&mut self, offset: u64, _len: u64, _write: bool) -> Option<(RawFd, u64)> {
        Some((self.file.as_raw_fd(), offset))
    }

    fn flush_target(&self) -> Option<RawFd> {
        Some(self.file.as_raw_fd())
    }

    fn dio_align(&self) -> Option<usize> {
        self.direct.then_some(DIO_ALIGN)
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
            Err(e) if cannot_punch(&e) => self.write_zeroes_slowly(offset, len),
            r => r,
        }
    }
}

/// `offset + len`, or an error if it overflows.
fn next_offset(offset: u64, len: usize) -> io::Result<u64> {
    u64::try_from(len)
        .ok()
        .and_then(|l| offset.checked_add(l))
        .ok_or_else(|| io::Error::from(io::ErrorKind::InvalidInput))
}

/// Which way [`vectored_io`] moves the bytes.
#[derive(Clone, Copy, PartialEq, Eq)]
pub(crate) enum Direction {
    /// File to memory (`preadv`).
    Read,
    /// Memory to file (`pwritev`).
    Write,
}

/// The most buffers handed to one `preadv`/`pwritev` (Linux's `UIO_MAXIOV`
/// is 1024; a virtio-blk request has at most the queue size).
const MAX_IOVECS: usize = 64;

/// Moves every byte of `bufs` between guest memory and `file` at `offset`
/// with `preadv`/`pwritev`, without a copy through a buffer of ours: short
/// transfers continue where they stopped, `EINTR` retries, and the end of
/// the file before the last byte is `UnexpectedEof`.
#[allow(unsafe_code)]
pub(crate) fn vectored_io(
    file: &File,
    bufs: &[Slice<'_>],
    mut offset: u64,
    dir: Direction,
) -> io::Result<()> {
    if let [one] = bufs {
        return single_io(file, one, offset, dir);
    }
    // The first buffer not yet done, and how far into it we are.
    let mut index = 0;
    let mut skip = 0usize;
    let mut iovecs = Vec::new();
    let mut guards = Vec::new();
    loop {
        // Skip finished and empty buffers, so that a transfer of 0 bytes
        // can only mean the end of the file.
        while index < bufs.len() && bufs[index].len() == skip {
            index += 1;
            skip = 0;
        }
        if index == bufs.len() {
            break;
        }
        iovecs.clear();
        guards.clear();
        for (i, s) in bufs[index..].iter().take(MAX_IOVECS).enumerate() {
            let from = if i == 0 { skip } else { 0 };
            let guard = s.ptr_guard_mut();
            iovecs.push(libc::iovec {
                // `from` < the slice's length (a finished slice moves
                // `index` on), so the pointer stays inside the slice.
                iov_base: guard.as_ptr().wrapping_add(from).cast(),
                iov_len: s.len() - from,
            });
            guards.push(guard);
        }
        let count = iovecs.len();
        let off = libc::off_t::try_from(offset)
            .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        // `count` <= MAX_IOVECS, which fits a c_int.
        let n_iov = libc::c_int::try_from(count).unwrap_or(libc::c_int::MAX);
        let fd = file.as_raw_fd();
        let ret = match dir {
            // SAFETY: each of the `count` iovecs describes the unread part of
            // a VolatileSlice of guest memory, which stays mapped while
            // `bufs` (and `guards`) borrow it; the kernel writes at most
            // `iov_len` bytes of each. Guest memory is shared with the guest
            // and only ever accessed volatilely or by the kernel, so no Rust
            // reference to it is invalidated.
            Direction::Read => unsafe { libc::preadv(fd, iovecs.as_ptr(), n_iov, off) },
            // SAFETY: as above; the kernel only reads the buffers.
            Direction::Write => unsafe { libc::pwritev(fd, iovecs.as_ptr(), n_iov, off) },
        };
        let Some(done) = progress(ret, dir)? else {
            continue;
        };
        if dir == Direction::Read {
            mark_dirty(&bufs[index..], skip, done);
        }
        offset = next_offset(offset, done)?;
        // Move `index`/`skip` past the `done` bytes.
        let mut left = done;
        while left > 0 && index < bufs.len() {
            let rest = bufs[index].len() - skip;
            if left >= rest {
                left -= rest;
                index += 1;
                skip = 0;
            } else {
                skip += left;
                left = 0;
            }
        }
    }
    Ok(())
}

/// What a `pread`/`pwrite`/`preadv`/`pwritev` result means: bytes moved,
/// `None` to try again (`EINTR`), or the error (the end of the file before
/// the last byte is `UnexpectedEof`, a write of nothing `WriteZero`).
fn progress(ret: isize, dir: Direction) -> io::Result<Option<usize>> {
    match usize::try_from(ret) {
        Ok(0) => Err(match dir {
            Direction::Read => io::ErrorKind::UnexpectedEof.into(),
            Direction::Write => io::ErrorKind::WriteZero.into(),
        }),
        Ok(n) => Ok(Some(n)),
        Err(_) => {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                Ok(None)
            } else {
                Err(e)
            }
        }
    }
}

/// [`vectored_io`] for one buffer: plain `pread`/`pwrite`, no iovec.
#[allow(unsafe_code)]
fn single_io(file: &File, buf: &Slice<'_>, mut offset: u64, dir: Direction) -> io::Result<()> {
    let guard = buf.ptr_guard_mut();
    let mut done = 0usize;
    while done < buf.len() {
        let off = libc::off_t::try_from(offset)
            .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        // `done` < the slice's length, so the pointer stays inside it.
        let ptr = guard.as_ptr().wrapping_add(done);
        let len = buf.len() - done;
        let ret = match dir {
            // SAFETY: `ptr..ptr + len` is the unread part of a VolatileSlice
            // of guest memory, mapped while `buf` and `guard` borrow it; the
            // kernel writes at most `len` bytes there. Guest memory is only
            // ever accessed volatilely or by the kernel, so no Rust reference
            // to it is invalidated.
            Direction::Read => unsafe { libc::pread(file.as_raw_fd(), ptr.cast(), len, off) },
            // SAFETY: as above; the kernel only reads the buffer.
            Direction::Write => unsafe { libc::pwrite(file.as_raw_fd(), ptr.cast(), len, off) },
        };
        let Some(n) = progress(ret, dir)? else {
            continue;
        };
        if dir == Direction::Read {
            buf.bitmap().mark_dirty(done, n);
        }
        done += n;
        offset = next_offset(offset, n)?;
    }
    Ok(())
}

/// Records in the slices' dirty bitmaps the `len` bytes the kernel wrote,
/// starting `skip` bytes into `bufs[0]`.
fn mark_dirty(bufs: &[Slice<'_>], mut skip: usize, mut len: usize) {
    for s in bufs {
        if len == 0 {
            break;
        }
        let n = (s.len() - skip).min(len);
        s.bitmap().mark_dirty(skip, n);
        len -= n;
        skip = 0;
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

impl RawFile {
    /// Writes `len` zero bytes at `offset`, one bounded chunk at a time.
    fn write_zeroes_slowly(&mut self, mut offset: u64, mut len: u64) -> io::Result<()> {
        while len > 0 {
            let n = usize::try_from(len).map_or(ZEROES.len(), |l| l.min(ZEROES.len()));
            self.write_at(&ZEROES[..n], offset)?;
            let n = u64::try_from(n).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
            offset = offset
                .checked_add(n)
                .ok_or_else(|| io::Error::from(io::ErrorKind::InvalidInput))?;
            len -= n;
        }
        Ok(())
    }
}

/// Whether a buffer at `ptr` of `len` bytes at file `offset` suits direct
/// I/O as it is.
fn is_aligned(ptr: *const u8, len: usize, offset: u64) -> bool {
    (ptr as usize) % DIO_ALIGN == 0 && len % DIO_ALIGN == 0 && offset % DIO_ALIGN as u64 == 0
}

/// A zeroed byte buffer whose start is [`DIO_ALIGN`]-aligned (a bounce
/// buffer for `O_DIRECT`).
struct AlignedBuf {
    bytes: Vec<u8>,
    start: usize,
    len: usize,
}

impl AlignedBuf {
    fn new(len: usize) -> AlignedBuf {
        let bytes = vec![0u8; len + DIO_ALIGN];
        let start = bytes.as_ptr().align_offset(DIO_ALIGN);
        AlignedBuf { bytes, start, len }
    }

    fn as_mut(&mut self) -> &mut [u8] {
        &mut self.bytes[self.start..self.start + self.len]
    }
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

/// Drops `file`'s `flock`.
#[allow(unsafe_code)]
fn unlock(file: &File) -> io::Result<()> {
    // SAFETY: as in `lock`: a descriptor `file` keeps open, no memory.
    let ret = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_UN) };
    if ret == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ember_memory::GuestMemoryMmap;
    use std::os::unix::fs::MetadataExt;
    use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};
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
    fn raw_file_lock_hands_over_and_back() {
        let img = image(4096);
        let mut source = RawFile::open(img.as_path(), false).unwrap();
        source.unlock().unwrap();
        // The destination takes the image while the source keeps its fd.
        let dest = RawFile::open(img.as_path(), false).unwrap();
        let e = source.relock().unwrap_err();
        assert_eq!(
            e.kind(),
            io::ErrorKind::WouldBlock,
            "held by the destination"
        );
        drop(dest);
        source.relock().unwrap();
        assert!(matches!(
            RawFile::open(img.as_path(), false),
            Err(Error::Locked { .. })
        ));
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

    /// Guest memory with `n` slices of the given lengths, 64 KiB apart.
    fn slices_of(mem: &GuestMemoryMmap, lens: &[usize]) -> Vec<Slice<'static>> {
        // The slices borrow `mem`; tests keep `mem` alive longer than them.
        let mem: &'static GuestMemoryMmap = Box::leak(Box::new(mem.clone()));
        lens.iter()
            .enumerate()
            .map(|(i, &l)| mem.get_slice(GuestAddress(0x1_0000 * i as u64), l).unwrap())
            .collect()
    }

    #[test]
    fn raw_file_vectored_io_goes_straight_to_guest_memory() {
        let img = image(0);
        let pattern: Vec<u8> = (0..0x4000u32)
            .map(|i| u8::try_from(i % 249).unwrap())
            .collect();
        img.as_file().write_all_at(&pattern, 0).unwrap();
        let mut raw = RawFile::open(img.as_path(), false).unwrap();
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        // An empty slice in the middle is skipped, not handed over alone.
        let bufs = slices_of(&mem, &[0x200, 0, 0x1000, 0x600]);
        raw.read_vectored_at(&bufs, 0x400).unwrap();
        let mut got = vec![0u8; 0x200];
        mem.read_slice(&mut got, GuestAddress(0)).unwrap();
        assert_eq!(got, pattern[0x400..0x600]);
        let mut got = vec![0u8; 0x1000];
        mem.read_slice(&mut got, GuestAddress(0x2_0000)).unwrap();
        assert_eq!(got, pattern[0x600..0x1600]);
        let mut got = vec![0u8; 0x600];
        mem.read_slice(&mut got, GuestAddress(0x3_0000)).unwrap();
        assert_eq!(got, pattern[0x1600..0x1c00]);

        // Written back elsewhere, in the same order.
        raw.write_vectored_at(&bufs, 0x8000).unwrap();
        raw.flush().unwrap();
        let mut back = vec![0u8; 0x1800];
        img.as_file().read_exact_at(&mut back, 0x8000).unwrap();
        assert_eq!(back, pattern[0x400..0x1c00]);
    }

    #[test]
    fn raw_file_vectored_io_takes_more_buffers_than_one_call_holds() {
        let img = image(0);
        let n = MAX_IOVECS * 2 + 3;
        let pattern: Vec<u8> = (0..n * 512)
            .map(|i| u8::try_from(i % 241).unwrap())
            .collect();
        img.as_file().write_all_at(&pattern, 0).unwrap();
        let mut raw = RawFile::open(img.as_path(), false).unwrap();
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x100_0000)]).unwrap();
        let lens = vec![512; n];
        let bufs = slices_of(&mem, &lens);
        raw.read_vectored_at(&bufs, 0).unwrap();
        for (i, s) in bufs.iter().enumerate() {
            let mut got = vec![0u8; 512];
            s.copy_to(&mut got[..]);
            assert_eq!(got, pattern[i * 512..(i + 1) * 512], "buffer {i}");
        }
    }

    #[test]
    fn raw_file_vectored_read_past_the_end_is_an_error() {
        let img = image(4096);
        let mut raw = RawFile::open(img.as_path(), false).unwrap();
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        let bufs = slices_of(&mem, &[2048, 4096]);
        let err = raw.read_vectored_at(&bufs, 0).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
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
        RawFile::open(img.as_path(), false)
            .unwrap()
            .write_zeroes_slowly(512, len as u64)
            .unwrap();
        let mut buf = vec![0u8; len + 512];
        img.as_file().read_exact_at(&mut buf, 0).unwrap();
        assert!(buf[..512].iter().all(|b| *b == 0x5a));
        assert!(buf[512..].iter().all(|b| *b == 0));
    }
}
