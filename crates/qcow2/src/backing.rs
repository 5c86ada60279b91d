//! Backing files: where an image's unallocated clusters read from. A raw
//! file or a qcow2 image (itself with a backing chain), always opened
//! read-only with a shared lock; reads past its end are zeros.

use std::fs::{File, OpenOptions};
use std::io;
use std::path::{Path, PathBuf};

use crate::disk::{len64, lock_file, Disk};
use crate::image::Qcow2;
use crate::{Error, ImageFormat, Result, MAX_CHAIN_DEPTH};

/// An open backing file.
#[derive(Debug)]
pub(crate) enum Backing {
    /// A raw file of `size` bytes.
    Raw {
        path: PathBuf,
        disk: Disk,
        size: u64,
    },
    /// A qcow2 image and its own chain.
    Qcow2(Box<Qcow2>),
}

/// Where the backing file `name` of the image at `image` is: relative
/// names are taken from the directory of the image that names them.
pub(crate) fn resolve(image: &Path, name: &str) -> PathBuf {
    let p = Path::new(name);
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        image.parent().unwrap_or(Path::new("")).join(p)
    }
}

/// The files already open in a chain, by device and inode: a file met
/// twice (under any name, through any link) is a loop.
pub(crate) type Seen = Vec<(u64, u64)>;

/// Opens `path` for a chain: without blocking (a FIFO named by a hostile
/// image would block a plain open), refusing anything that is neither a
/// regular file nor a block device (a FIFO or a character device would
/// stream endless bytes), a file met twice, or a chain too deep. Only
/// `openat` and a stat of the open descriptor: a running VMM's seccomp
/// filter allows those where it swaps a disk.
pub(crate) fn open_checked(path: &Path, write: bool, seen: &mut Seen) -> Result<File> {
    use std::os::unix::fs::{FileTypeExt, MetadataExt, OpenOptionsExt};
    let open_err = |source| Error::Open {
        path: path.to_path_buf(),
        source,
    };
    let file = OpenOptions::new()
        .read(true)
        .write(write)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open(path)
        .map_err(open_err)?;
    let meta = file.metadata().map_err(open_err)?;
    let t = meta.file_type();
    if !(t.is_file() || t.is_block_device()) {
        return Err(Error::Invalid {
            path: path.to_path_buf(),
            field: "image file",
            why: "not a regular file or a block device".into(),
        });
    }
    let id = (meta.dev(), meta.ino());
    if seen.contains(&id) {
        return Err(Error::BackingLoop {
            path: path.to_path_buf(),
        });
    }
    if seen.len() >= MAX_CHAIN_DEPTH {
        return Err(Error::ChainTooDeep {
            path: path.to_path_buf(),
            max: MAX_CHAIN_DEPTH,
        });
    }
    seen.push(id);
    Ok(file)
}

impl Backing {
    /// Opens the backing file `name` of `image`, in `format` (or, if the
    /// image names none, the format its magic says, as QEMU does).
    pub(crate) fn open(
        image: &Path,
        name: &str,
        format: Option<ImageFormat>,
        seen: &mut Seen,
    ) -> Result<Backing> {
        let path = resolve(image, name);
        let wrap = |source: Error| match source {
            e
            @ (Error::BackingLoop { .. } | Error::ChainTooDeep { .. } | Error::Backing { .. }) => e,
            source => Error::Backing {
                image: image.to_path_buf(),
                backing: path.clone(),
                source: Box::new(source),
            },
        };
        let file = open_checked(&path, false, seen).map_err(wrap)?;
        let format = match format {
            Some(f) => f,
            None => crate::probe_file(&path, &file).map_err(wrap)?,
        };
        match format {
            ImageFormat::Qcow2 => Ok(Backing::Qcow2(Box::new(
                Qcow2::from_file(&path, file, true, seen).map_err(wrap)?,
            ))),
            ImageFormat::Raw => Backing::open_raw(&path, file).map_err(wrap),
        }
    }

    fn open_raw(path: &Path, file: File) -> Result<Backing> {
        lock_file(&file, path, true)?;
        let disk = Disk::new(file);
        let size = disk.len().map_err(|source| Error::Io {
            path: path.to_path_buf(),
            what: "find the size of",
            source,
        })?;
        Ok(Backing::Raw {
            path: path.to_path_buf(),
            disk,
            size,
        })
    }

    /// Reads `buf` at `offset`; bytes past the end of the backing file
    /// are zeros.
    pub(crate) fn read_at(&mut self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let size = match self {
            Backing::Raw { size, .. } => *size,
            Backing::Qcow2(q) => q.virtual_size(),
        };
        let n = if offset >= size {
            0
        } else {
            crate::header::to_usize((size - offset).min(len64(buf.len())))
        };
        let (inside, past) = buf.split_at_mut(n);
        past.fill(0);
        if inside.is_empty() {
            return Ok(());
        }
        match self {
            Backing::Raw { disk, .. } => disk.read_or_zero_at(inside, offset),
            Backing::Qcow2(q) => q.read_at(inside, offset),
        }
    }

    /// The files of this backing chain, this one first.
    pub(crate) fn chain(&self) -> Vec<(PathBuf, ImageFormat)> {
        match self {
            Backing::Raw { path, .. } => vec![(path.clone(), ImageFormat::Raw)],
            Backing::Qcow2(q) => q.backing_chain(),
        }
    }

    pub(crate) fn unlock(&mut self) -> io::Result<()> {
        match self {
            Backing::Raw { disk, .. } => disk.file().unlock(),
            Backing::Qcow2(q) => q.unlock(),
        }
    }

    pub(crate) fn relock(&mut self) -> io::Result<()> {
        match self {
            Backing::Raw { disk, path, .. } => crate::image::relock_io(disk.file(), path, true),
            Backing::Qcow2(q) => q.relock(),
        }
    }
}
