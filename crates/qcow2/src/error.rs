//! The crate's [`Error`]: every way opening, creating, checking or resizing
//! an image can fail, each message naming the file and what is wrong.

use std::io;
use std::path::PathBuf;

/// Everything that can go wrong with a qcow2 image outside the I/O path
/// (which returns [`std::io::Error`]s with messages of their own).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The file cannot be opened or created.
    #[error("cannot open {}", path.display())]
    Open {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// Another process holds a conflicting lock on the file (another VMM
    /// or `qemu-img` is using it).
    #[error("{} is locked by another process (another VMM or qemu using it?)", path.display())]
    Locked {
        /// The file.
        path: PathBuf,
    },
    /// Taking the lock failed for another reason.
    #[error("cannot lock {}", path.display())]
    Lock {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// Reading, writing or syncing the file failed.
    #[error("cannot {what} {}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// What was being done ("read the header of", "write the L1 table of", ...).
        what: &'static str,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The file does not start with the qcow2 magic `QFI\xfb`.
    #[error("{} is not a qcow2 image (no QFI\\xfb magic)", path.display())]
    NotQcow2 {
        /// The file.
        path: PathBuf,
    },
    /// A header field or table of the image is out of range or malformed.
    #[error("qcow2 image {}: invalid {field}: {why}", path.display())]
    Invalid {
        /// The file.
        path: PathBuf,
        /// The header field, extension or table.
        field: &'static str,
        /// What is wrong with it.
        why: String,
    },
    /// The image uses a feature this crate does not implement.
    #[error("qcow2 image {} uses {feature}, which is not supported", path.display())]
    Unsupported {
        /// The file.
        path: PathBuf,
        /// The feature, as the qcow2 specification names it.
        feature: String,
    },
    /// The image's dirty bit is set: its refcounts may be too low, and
    /// writing to it could corrupt it.
    #[error(
        "qcow2 image {} is dirty (its last writer did not finish updating the refcounts); \
         open it read-only, or repair it first with `ember img check -r all` or `qemu-img check -r all`",
        path.display()
    )]
    Dirty {
        /// The file.
        path: PathBuf,
    },
    /// The image's corrupt bit is set.
    #[error(
        "qcow2 image {} is marked corrupt; open it read-only, or repair it with `qemu-img check -r all`",
        path.display()
    )]
    Corrupt {
        /// The file.
        path: PathBuf,
    },
    /// The image has internal snapshots, which are only read.
    #[error(
        "qcow2 image {} has {count} internal snapshot(s); it can only be opened read-only \
         (delete them with `qemu-img snapshot -d` to write to it)",
        path.display()
    )]
    Snapshots {
        /// The file.
        path: PathBuf,
        /// How many.
        count: u32,
    },
    /// A write, resize or repair was asked of an image opened read-only.
    #[error("qcow2 image {} is open read-only", path.display())]
    ReadOnly {
        /// The file.
        path: PathBuf,
    },
    /// The backing chain names the same file twice.
    #[error("backing chain loops: {} is its own backing file (directly or through others)", path.display())]
    BackingLoop {
        /// The file met a second time.
        path: PathBuf,
    },
    /// The backing chain is longer than [`crate::MAX_CHAIN_DEPTH`].
    #[error("backing chain of {} is deeper than {max} images", path.display())]
    ChainTooDeep {
        /// The image whose backing file would exceed the depth.
        path: PathBuf,
        /// The limit.
        max: usize,
    },
    /// The backing file of an image cannot be opened.
    #[error("backing file {} of {}", backing.display(), image.display())]
    Backing {
        /// The image naming it.
        image: PathBuf,
        /// The backing file, resolved.
        backing: PathBuf,
        /// Why it cannot be opened.
        #[source]
        source: Box<Error>,
    },
    /// `resize` was asked to make the image smaller.
    #[error("cannot shrink qcow2 image {} from {size} to {new_size} bytes: shrinking is not supported", path.display())]
    Shrink {
        /// The file.
        path: PathBuf,
        /// Its virtual size.
        size: u64,
        /// The size asked for.
        new_size: u64,
    },
    /// The options given to [`crate::create`] or [`crate::Qcow2::resize`]
    /// are out of range.
    #[error("qcow2 image {}: {why}", path.display())]
    Options {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        why: String,
    },
    /// An image format name other than `raw` or `qcow2`.
    #[error("unknown image format `{0}` (expected raw or qcow2)")]
    UnknownFormat(String),
}

/// The crate's result type.
pub type Result<T> = std::result::Result<T, Error>;

/// An `InvalidData` I/O error saying what is wrong with the metadata of
/// the image at `path` (the I/O path's "corrupt image" error).
pub(crate) fn corrupt(path: &std::path::Path, what: impl std::fmt::Display) -> io::Error {
    let msg = format!("qcow2 image {}: {what}", path.display());
    log::error!("{msg}");
    io::Error::new(io::ErrorKind::InvalidData, msg)
}
