//! A virtio-blk device (virtio 1.2, section 5.2) for microVMs.
//!
//! - [`request`] turns a descriptor chain into a checked, typed [`Request`]
//!   before any I/O; it is a pure function of the chain, the capacity and the
//!   read-only flag, so a fuzzer can call it directly.
//! - [`backend`] holds the [`BlockBackend`] trait the device does its I/O
//!   through, and [`RawFile`], a raw disk image (or block device) with an
//!   advisory lock so that two VMMs cannot write one image.
//! - [`qcow2`] holds [`Qcow2Disk`], a qcow2 image and its backing chain
//!   (the `ember-qcow2` crate) as a backend, and [`open_backend`], which
//!   opens an image in the format it is given.
//! - [`device`] holds [`Block`], an [`ember_virtio::VirtioDevice`]: one or more queues,
//!   read, write, flush, get-id, discard and write-zeroes.
//!
//! The transport hands the device guest memory, an interrupt and its queue
//! on activation, and calls `process_queue(0)` when the driver notifies.
//!
//! ```
//! use ember_virtio::VirtioDevice;
//! use ember_virtio_blk::{Block, BlockConfig};
//! use virtio_bindings::virtio_ids::VIRTIO_ID_BLOCK;
//! use vmm_sys_util::tempfile::TempFile;
//!
//! let image = TempFile::new().unwrap();
//! image.as_file().set_len(1 << 20).unwrap();
//! let disk = Block::new(&BlockConfig {
//!     id: Some("rootfs".to_string()),
//!     ..BlockConfig::new(image.as_path(), ember_virtio_blk::ImageFormat::Raw, false)
//! })?;
//! assert_eq!(disk.device_type(), VIRTIO_ID_BLOCK);
//!
//! // The capacity, in 512-byte sectors, is the first field of the config space.
//! let mut capacity = [0u8; 8];
//! disk.read_config(0, &mut capacity);
//! assert_eq!(u64::from_le_bytes(capacity), 2048);
//! # Ok::<(), ember_virtio_blk::Error>(())
//! ```
#![deny(unsafe_code)]

pub mod backend;
pub mod device;
mod exec;
pub mod qcow2;
pub mod request;
pub mod state;
mod uring;

#[cfg(test)]
mod test_utils;

use std::io;
use std::path::PathBuf;

pub use backend::{BlockBackend, RawFile};
pub use device::{
    check_queues, Block, BlockConfig, BlockCounters, IO_CHUNK, MAX_QUEUES, MAX_QUEUE_SIZE,
};
pub use ember_qcow2::ImageFormat;
pub use qcow2::{open_backend, Qcow2Disk};
pub use request::{parse, status_address, DataRegion, Request, RequestError, RequestKind, Segment};
pub use state::BlockState;

/// Why a disk could not be opened or flushed.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A saved state does not fit the rebuilt device.
    #[error("saved state does not match: {0}")]
    StateMismatch(String),
    /// The disk image could not be opened.
    #[error("cannot open disk image {}", path.display())]
    Open {
        /// The image.
        path: PathBuf,
        /// What `open` said.
        #[source]
        source: io::Error,
    },
    /// Another process holds the image's advisory lock.
    #[error(
        "disk image {} is locked: another process (another VMM?) holds it open",
        path.display()
    )]
    Locked {
        /// The image.
        path: PathBuf,
    },
    /// Taking the advisory lock failed for a reason other than contention.
    #[error("cannot lock disk image {}", path.display())]
    Lock {
        /// The image.
        path: PathBuf,
        /// What `flock` said.
        #[source]
        source: io::Error,
    },
    /// A qcow2 image cannot be opened: its header, tables or backing chain
    /// are refused (the source names the file and the problem).
    #[error("cannot open the qcow2 disk")]
    Qcow2 {
        /// The image.
        path: PathBuf,
        /// What is wrong with it.
        #[source]
        source: ember_qcow2::Error,
    },
    /// The rate limiter cannot be used.
    #[error("disk {disk}: rate limiter: {why}")]
    RateLimiter {
        /// The disk.
        disk: String,
        /// What is wrong.
        why: String,
    },
    /// The queue count or size is not allowed.
    #[error("disk image {}: {why}", path.display())]
    Queues {
        /// The image.
        path: PathBuf,
        /// What is wrong.
        why: String,
    },
    /// The size of the image could not be read.
    #[error("cannot find the size of disk image {}", path.display())]
    Size {
        /// The image.
        path: PathBuf,
        /// What `lseek` said.
        #[source]
        source: io::Error,
    },
    /// The image is not a whole number of 512-byte sectors.
    #[error("disk image {} is {size} bytes, not a multiple of 512", path.display())]
    UnalignedSize {
        /// The image.
        path: PathBuf,
        /// Its size in bytes.
        size: u64,
    },
    /// The serial id is longer than virtio-blk's 20 bytes.
    #[error("id {id:?} of disk image {} is {len} bytes, more than 20", path.display())]
    IdTooLong {
        /// The image.
        path: PathBuf,
        /// The id given.
        id: String,
        /// Its length in bytes.
        len: usize,
    },
    /// A combination of options this backend cannot serve.
    #[error("disk image {}: {what} is not supported", path.display())]
    Unsupported {
        /// The image.
        path: PathBuf,
        /// What was asked.
        what: &'static str,
    },
    /// The io_uring engine cannot be set up (the kernel has no io_uring,
    /// or `io_uring_disabled` forbids it).
    #[error("disk image {}: io=io_uring: cannot set up the ring (use io=sync)", path.display())]
    IoUring {
        /// The image.
        path: PathBuf,
        /// What the kernel said.
        #[source]
        source: io::Error,
    },
    /// Flushing the disk to stable storage failed.
    #[error("cannot flush disk {disk}")]
    Flush {
        /// The disk (its image's path).
        disk: String,
        /// What the backend said.
        #[source]
        source: io::Error,
    },
}

/// The result of this crate's fallible host-side operations.
pub type Result<T> = std::result::Result<T, Error>;

/// How a disk's requests reach the host: Firecracker's `io_engine`, QEMU's
/// `aio=`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum IoEngine {
    /// `preadv`/`pwritev`/`fdatasync` on the event loop, one request at a
    /// time.
    #[default]
    Sync,
    /// io_uring: many requests in flight, completions on the event loop.
    IoUring,
}

impl std::str::FromStr for IoEngine {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "sync" => Ok(IoEngine::Sync),
            "io_uring" => Ok(IoEngine::IoUring),
            _ => Err(format!("io = {s:?}: it must be sync or io_uring")),
        }
    }
}

impl std::fmt::Display for IoEngine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            IoEngine::Sync => "sync",
            IoEngine::IoUring => "io_uring",
        })
    }
}

/// Whether a disk's I/O goes through the host's page cache: QEMU's
/// `cache=`, Firecracker's `cache_type`. Guest flushes reach the disk in
/// both.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CacheMode {
    /// Through the page cache (the default).
    #[default]
    Writeback,
    /// `O_DIRECT`: around the page cache (raw images).
    None,
}

impl std::str::FromStr for CacheMode {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "writeback" => Ok(CacheMode::Writeback),
            "none" => Ok(CacheMode::None),
            _ => Err(format!("cache = {s:?}: it must be writeback or none")),
        }
    }
}

impl std::fmt::Display for CacheMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            CacheMode::Writeback => "writeback",
            CacheMode::None => "none",
        })
    }
}

/// What a disk does when the host fails one of its requests: QEMU's
/// `werror=` (writes, flushes, discards, write-zeroes) and `rerror=`
/// (reads).
///
/// `Stop` and `Enospc` keep the failed request (it is neither completed
/// nor forgotten), stop the disk's queues and ask the VMM to pause the VM
/// ([`Block::on_stop`]); [`Block::retry`] runs the request again when the
/// user resumes it. QEMU's `ignore` is not offered: it tells the guest that
/// a write which failed succeeded.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorPolicy {
    /// The request completes with `VIRTIO_BLK_S_IOERR` (the default, and
    /// Firecracker's behaviour).
    #[default]
    Report,
    /// Every failure stops the VM.
    Stop,
    /// Only "no space left on device" stops the VM; other failures are
    /// reported (QEMU's default for writes).
    Enospc,
}

impl ErrorPolicy {
    /// Whether a request that failed with `e` stops the VM.
    pub fn stops_on(self, e: &io::Error) -> bool {
        match self {
            ErrorPolicy::Report => false,
            ErrorPolicy::Stop => true,
            ErrorPolicy::Enospc => e.raw_os_error() == Some(libc::ENOSPC),
        }
    }

    /// Parses the value of `key` (`werror` or `rerror`; `rerror` takes no
    /// `enospc`, as in QEMU).
    pub fn parse(key: &str, s: &str) -> std::result::Result<Self, String> {
        match s {
            "report" => Ok(ErrorPolicy::Report),
            "stop" => Ok(ErrorPolicy::Stop),
            "enospc" if key != "rerror" => Ok(ErrorPolicy::Enospc),
            "ignore" => Err(format!(
                "{key} = \"ignore\" is not offered: the guest would be told that failed I/O succeeded"
            )),
            _ if key == "rerror" => Err(format!("{key} = {s:?}: it must be report or stop")),
            _ => Err(format!("{key} = {s:?}: it must be report, stop or enospc")),
        }
    }
}

impl std::fmt::Display for ErrorPolicy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ErrorPolicy::Report => "report",
            ErrorPolicy::Stop => "stop",
            ErrorPolicy::Enospc => "enospc",
        })
    }
}
