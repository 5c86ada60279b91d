//! The qcow2 image format (QEMU's `docs/interop/qcow2.txt`) as a block
//! backend for a VMM: open an image with its backing chain, read, write,
//! discard, write zeroes, resize and flush; create images as
//! `qemu-img create -f qcow2` does; check and repair them as
//! `qemu-img check [-r leaks]` does.
//!
//! - [`Qcow2`] is an open image. Its file is locked (`flock`: exclusive
//!   when writable, shared when read-only; backing files shared) so two
//!   VMMs cannot write one image. [`Qcow2::map`] says where a range of the
//!   virtual disk lives, so a VMM can move allocated clusters between the
//!   image file and guest memory itself (`preadv`/`pwritev`, no copy) and
//!   take [`Qcow2::read_at`]/[`Qcow2::write_at`] for everything else.
//! - [`create`] makes a new image; [`check`] walks every table of one and
//!   compares the reference counts; [`probe`] tells a qcow2 file by its
//!   magic (only when asked: a VMM opens a disk in the format it is told,
//!   never the one its contents claim).
//!
//! Versions 2 and 3 are read and written; compressed clusters (zlib) are
//! read; raw and qcow2 backing files, chains up to [`MAX_CHAIN_DEPTH`]
//! deep. Encryption, external data files, extended L2 entries and zstd
//! compression are refused at open with an [`Error`] naming them; images
//! with internal snapshots, a dirty or a corrupt bit open read-only only.
//!
//! Crash consistency: whatever point a write is interrupted at (SIGKILL,
//! or power loss after the guest's last flush), the image keeps no
//! corruption `qemu-img check` would report, only, at worst, leaked
//! clusters. Refcounts are raised and synced before anything uses the
//! clusters; data is written before the L2 entries that point at it, a new
//! L2 table before the L1 entry; references are dropped before refcounts.
//!
//! ```
//! use ember_qcow2::{create, CreateOptions, ExtentKind, Qcow2};
//!
//! let dir = std::env::temp_dir().join(format!("ember-qcow2-doc-{}", std::process::id()));
//! std::fs::create_dir_all(&dir).unwrap();
//! let path = dir.join("disk.qcow2");
//! create(&path, &CreateOptions { size: 1 << 30, ..CreateOptions::default() })?;
//!
//! let mut disk = Qcow2::open(&path, false)?;
//! assert_eq!(disk.virtual_size(), 1 << 30);
//! disk.write_at(b"hello", 4096)?;
//! disk.flush()?;
//!
//! let mut buf = [0u8; 5];
//! disk.read_at(&mut buf, 4096)?;
//! assert_eq!(&buf, b"hello");
//! // The cluster is now allocated: a VMM may read it straight from the file.
//! assert!(matches!(disk.map(4096, 5)?.kind, ExtentKind::Data { .. }));
//! drop(disk);
//!
//! assert!(ember_qcow2::check(&path, false)?.is_clean());
//! # std::fs::remove_dir_all(&dir).unwrap();
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
#![forbid(unsafe_code)]

mod backing;
mod check;
mod compress;
mod create;
mod disk;
mod error;
mod header;
mod image;
mod refcount;
mod rw;
mod table;

#[cfg(test)]
mod crash_tests;

use std::fmt;
use std::path::Path;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

pub use check::{check, CheckReport};
pub use create::{create, CreateOptions};
pub use error::{Error, Result};
pub use header::{MAX_CLUSTER_BITS, MAX_L1_ENTRIES, MAX_VIRTUAL_SIZE, MIN_CLUSTER_BITS};
pub use image::Qcow2;

/// The deepest backing chain [`Qcow2::open`] follows (the image itself
/// included).
pub const MAX_CHAIN_DEPTH: usize = 64;

/// How a disk image file is laid out.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ImageFormat {
    /// Sector `n` is bytes `512 * n ..` of the file.
    #[default]
    Raw,
    /// A qcow2 image.
    Qcow2,
}

impl FromStr for ImageFormat {
    type Err = Error;

    fn from_str(s: &str) -> Result<ImageFormat> {
        match s {
            "raw" => Ok(ImageFormat::Raw),
            "qcow2" => Ok(ImageFormat::Qcow2),
            other => Err(Error::UnknownFormat(other.to_string())),
        }
    }
}

impl fmt::Display for ImageFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ImageFormat::Raw => "raw",
            ImageFormat::Qcow2 => "qcow2",
        })
    }
}

/// Tells a qcow2 image from anything else by its first four bytes
/// (`QFI\xfb`); anything else is [`ImageFormat::Raw`].
///
/// Only for tools that are asked to guess (`ember img info` without `-f`):
/// a VMM must open a disk in the format its configuration names, or a guest
/// that writes a qcow2 header into its raw disk would make the host open
/// the file as qcow2 next time (and read any host file the header names).
/// [`Qcow2::open`] itself probes only a backing file whose image names no
/// backing format, as QEMU does.
pub fn probe(path: &Path) -> Result<ImageFormat> {
    let file = backing::open_checked(path, false, &mut Vec::new())?;
    probe_file(path, &file)
}

/// What [`probe`] says of `file`, open at `path`.
pub(crate) fn probe_file(path: &Path, file: &std::fs::File) -> Result<ImageFormat> {
    match header::has_magic(file) {
        Ok(true) => Ok(ImageFormat::Qcow2),
        Ok(false) => Ok(ImageFormat::Raw),
        Err(source) => Err(Error::Io {
            path: path.to_path_buf(),
            what: "read the first bytes of",
            source,
        }),
    }
}

/// A run of the virtual disk that lives in one kind of place: what
/// [`Qcow2::map`] returns.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Extent {
    /// Where the run lives.
    pub kind: ExtentKind,
    /// Its length in bytes (at least 1, at most what was asked).
    pub len: u64,
}

/// Where a run of the virtual disk lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExtentKind {
    /// Contiguous, uncompressed bytes of the image file starting at
    /// `host_offset`, referenced only here (refcount 1): they may be read
    /// and written in place.
    Data {
        /// Where the run starts in the image file.
        host_offset: u64,
    },
    /// Contiguous bytes of the image file that are shared (refcount above
    /// 1, e.g. with an internal snapshot): they may be read in place, but a
    /// write must go through [`Qcow2::write_at`], which copies them first.
    Shared {
        /// Where the run starts in the image file.
        host_offset: u64,
    },
    /// Reads as zeros.
    Zero,
    /// Not allocated in this image: reads come from the backing chain, or
    /// are zeros if there is none.
    Backing,
    /// A compressed cluster: only [`Qcow2::read_at`] can read it.
    Compressed,
}

/// What [`Qcow2::info`] reports about an image (its own header, not its
/// backing files').
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Info {
    /// 2 or 3.
    pub version: u32,
    /// `"0.10"` for version 2, `"1.1"` for version 3 (as `qemu-img info`
    /// names them).
    pub compat: &'static str,
    /// The cluster size in bytes.
    pub cluster_size: u64,
    /// The virtual disk's size in bytes.
    pub virtual_size: u64,
    /// The backing file name as the header has it (not resolved).
    pub backing_file: Option<String>,
    /// The backing file format the header names, if it names one.
    pub backing_format: Option<ImageFormat>,
    /// The refcount width in bits.
    pub refcount_bits: u32,
    /// The dirty bit (refcounts may be stale).
    pub dirty: bool,
    /// The corrupt bit.
    pub corrupt: bool,
    /// The lazy refcounts compatible feature.
    pub lazy_refcounts: bool,
    /// Internal snapshots.
    pub snapshots: u32,
    /// The image has persistent dirty bitmaps (kept, not maintained).
    pub bitmaps: bool,
    /// Header extensions this crate does not interpret, by type (kept
    /// untouched).
    pub unknown_extensions: Vec<u32>,
}
