//! Firecracker's userfaultfd handshake, both ends, and a page-fault handler
//! that serves a snapshot's memory file.
//!
//! When a snapshot is restored with the `Uffd` memory backend
//! (`PUT /snapshot/load` with `"mem_backend": {"backend_type": "Uffd",
//! "backend_path": SOCKET}`), the VMM maps guest RAM anonymously, creates a
//! userfaultfd, registers every RAM region with it in `MISSING` mode,
//! connects to the handler's listening Unix socket at `SOCKET` and sends, in
//! **one** `sendmsg`, a JSON list of [`GuestRegionUffdMapping`]s with the
//! userfaultfd attached as `SCM_RIGHTS`. From then on every first touch of a
//! guest page stops the toucher until the handler fills the page
//! (`UFFDIO_COPY` from the memory file at `offset + (fault - base)`, or
//! `UFFDIO_ZEROPAGE`). The VMM keeps its end of the socket open for as long
//! as it lives; the handler takes its closing as "the VMM is gone".
//!
//! The VMM side calls [`create_vmm_uffd`], registers its regions and calls
//! [`send_handshake`]; the handler side calls [`receive_handshake`], opens a
//! [`MemoryFile`] and runs [`serve`].
//!
//! ```
//! use ember_uffd::{parse_handshake, GuestRegionUffdMapping};
//!
//! // Byte for byte what Firecracker (1.12 on) sends for a 128 MiB guest.
//! let json = br#"[{"base_host_virt_addr":140045439397888,"size":134217728,"offset":0,"page_size":4096,"page_size_kib":4096}]"#;
//! let regions = parse_handshake(json).unwrap();
//! assert_eq!(regions[0].size, 128 << 20);
//! assert_eq!(regions[0].page_size, 4096);
//!
//! // What we send is what Firecracker sends: `page_size_kib` included.
//! let sent = serde_json::to_vec(&regions).unwrap();
//! assert_eq!(&sent[..], &json[..]);
//!
//! // Malformed input is an error, never a panic.
//! assert!(parse_handshake(b"[{\"size\": 1}]").is_err());
//! assert!(parse_handshake(b"[]").is_err());
//! ```
//!
//! The handler side, in outline (what the `ember-uffd-handler` binary does):
//!
//! ```no_run
//! use std::os::unix::net::UnixListener;
//! use std::path::Path;
//! use std::time::Duration;
//!
//! use ember_uffd::{receive_handshake, serve, MemoryFile};
//!
//! let memory = MemoryFile::open(Path::new("snapshot.mem"))?;
//! let listener = UnixListener::bind("/run/uffd.sock")?;
//! let (vmm, _) = listener.accept()?;
//! let handshake = receive_handshake(&vmm, Some(Duration::from_secs(10)))?;
//! let stats = serve(&handshake.uffd, &handshake.regions, &memory, &vmm)?;
//! eprintln!("served {} faults", stats.faults());
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

mod memfile;
mod protocol;
mod serve;
mod sys;

use std::io;
use std::time::Duration;

pub use memfile::MemoryFile;
pub use protocol::{
    create_vmm_uffd, parse_handshake, receive_handshake, send_handshake, validate_regions,
    GuestRegionUffdMapping, Handshake, MAX_HANDSHAKE_LEN,
};
pub use serve::{serve, ServeStats};
/// The userfaultfd crate this one is built on, so both ends use one version.
pub use userfaultfd;

/// Errors receiving the handshake, opening the memory file or serving faults.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// `recvmsg` on the VMM's connection failed.
    #[error("cannot receive the handshake from the VMM")]
    Receive(#[source] io::Error),
    /// The VMM connected but sent nothing in time.
    #[error("the VMM sent no complete handshake within {0:?}")]
    HandshakeTimeout(Duration),
    /// The VMM closed the connection mid-handshake.
    #[error("the VMM closed the connection after {0} bytes, before the handshake was complete")]
    HandshakeTruncated(usize),
    /// More than [`MAX_HANDSHAKE_LEN`] bytes without a complete JSON list.
    #[error("the handshake is larger than {MAX_HANDSHAKE_LEN} bytes")]
    HandshakeTooLarge,
    /// The body is not a JSON list of region mappings.
    #[error("the handshake is not a JSON list of guest region mappings")]
    HandshakeJson(#[source] serde_json::Error),
    /// The list is empty.
    #[error("the handshake lists no memory regions")]
    NoRegions,
    /// A region fails a check (alignment, overflow, overlap).
    #[error("region {index} of the handshake is invalid: {reason}")]
    InvalidRegion {
        /// Its index in the list.
        index: usize,
        /// What is wrong with it.
        reason: String,
    },
    /// No `SCM_RIGHTS` came with the body.
    #[error("the handshake carried no file descriptor (expected the userfaultfd)")]
    NoFd,
    /// More than one descriptor, or a truncated control message.
    #[error("the handshake carried more than one file descriptor")]
    TooManyFds,
    /// The descriptor is something else (a file, a pipe, ...).
    #[error("the file descriptor sent with the handshake is not a userfaultfd but {0}")]
    NotUserfaultfd(String),
    /// `fcntl(O_NONBLOCK)` on the received userfaultfd failed.
    #[error("cannot make the received userfaultfd non-blocking")]
    NonBlocking(#[source] io::Error),
    /// The memory file cannot be opened, sized or mapped.
    #[error("memory file {path}")]
    MemoryFile {
        /// The file.
        path: String,
        /// Why.
        #[source]
        source: io::Error,
    },
    /// The memory file has no bytes to serve.
    #[error("memory file {0} is empty")]
    EmptyMemoryFile(String),
    /// A region's contents would lie past the end of the memory file.
    #[error(
        "region {index} needs bytes {start:#x}..{end:#x} of memory file {path}, which has {len:#x}"
    )]
    RegionBeyondFile {
        /// Its index in the handshake.
        index: usize,
        /// First byte of the file it needs.
        start: u64,
        /// One past its last byte.
        end: u64,
        /// The memory file.
        path: String,
        /// The file's length.
        len: u64,
    },
    /// `poll` failed.
    #[error("cannot poll the userfaultfd and the VMM's socket")]
    Poll(#[source] io::Error),
    /// `poll` says the userfaultfd is in error.
    #[error("the userfaultfd is in error (the VMM must create it O_NONBLOCK and do UFFDIO_API)")]
    UffdPollError,
    /// Reading `uffd_msg`s failed.
    #[error("cannot read userfaultfd events")]
    ReadEvents(#[source] io::Error),
    /// The kernel reported a fault the handshake does not describe.
    #[error("page fault at {0:#x} is outside every region of the handshake")]
    FaultOutsideRegions(u64),
    /// `UFFDIO_COPY` or `UFFDIO_ZEROPAGE` failed.
    #[error("cannot populate guest page {addr:#x} with UFFDIO_{op}")]
    Populate {
        /// The page's host virtual address in the VMM.
        addr: u64,
        /// `COPY` or `ZEROPAGE`.
        op: &'static str,
        /// Why.
        #[source]
        source: io::Error,
    },
}

/// Results of this crate.
pub type Result<T> = std::result::Result<T, Error>;

/// `err` and each of its sources, joined with `": "`, on one line.
pub fn error_chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}
