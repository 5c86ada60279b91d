//! The crate's one error type. Each message names the path, key or id that
//! failed and leaves the kernel's words to the `source`.

use std::io;
use std::path::PathBuf;

/// Why a jail could not be set up, run or described.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The jail directory does not exist or cannot be resolved.
    #[error("cannot use jail directory {path}")]
    JailDir {
        /// The directory given.
        path: PathBuf,
        /// What the kernel said.
        #[source]
        source: io::Error,
    },
    /// The jail directory is not a directory.
    #[error("jail directory {path} is not a directory")]
    JailDirNotDir {
        /// The path given.
        path: PathBuf,
    },
    /// The jail would run as root and `allow_root` is not set.
    #[error(
        "refusing to run the jail as uid {uid} gid {gid}: uid 0 or gid 0 is root; pass --allow-root (JailSpec::allow_root) to allow it"
    )]
    RootNotAllowed {
        /// The uid asked for.
        uid: u32,
        /// The gid asked for.
        gid: u32,
    },
    /// The jail id is empty, too long or has characters outside `[A-Za-z0-9_-]`.
    #[error("jail id {id:?} is invalid: use 1 to 64 characters from [A-Za-z0-9_-]")]
    InvalidId {
        /// The id given.
        id: String,
    },
    /// A path inside the jail is relative, has `..`, is `/` itself, or
    /// clashes with another entry.
    #[error("path {path} inside the jail is invalid: {reason}")]
    InsidePath {
        /// The path given.
        path: PathBuf,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// A host file to put in the jail is missing or cannot be examined.
    #[error("cannot use host file {path}")]
    HostFile {
        /// The host path given.
        path: PathBuf,
        /// What the kernel said.
        #[source]
        source: io::Error,
    },
    /// A host file to put in the jail is a directory (only files can be bound).
    #[error("host path {path} is a directory; only files can be put in a jail")]
    HostFileIsDir {
        /// The host path given.
        path: PathBuf,
    },
    /// A device to recreate in the jail is missing or cannot be examined.
    #[error("cannot use device {path}")]
    Device {
        /// The device path given.
        path: PathBuf,
        /// What the kernel said.
        #[source]
        source: io::Error,
    },
    /// A device to recreate in the jail is not a character device.
    #[error("{path} is not a character device")]
    NotCharDevice {
        /// The path given.
        path: PathBuf,
    },
    /// The network namespace file cannot be opened.
    #[error("cannot open network namespace {path}")]
    NetNs {
        /// The namespace file given.
        path: PathBuf,
        /// What the kernel said.
        #[source]
        source: io::Error,
    },
    /// The program to run is not one of the jail's files.
    #[error("program {path} is not among the jail's files (JailSpec::files)")]
    ProgramNotInJail {
        /// The program path given.
        path: PathBuf,
    },
    /// An argument, environment entry or path has a NUL byte.
    #[error("{what} contains a NUL byte")]
    NulByte {
        /// Which string.
        what: String,
    },
    /// The cgroup parent path is not a relative path of plain names.
    #[error("cgroup parent {parent:?} is invalid: {reason}")]
    CgroupParent {
        /// The parent given.
        parent: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// A cgroup key is not of the form `<controller>.<file>`.
    #[error("cgroup key {key:?} is invalid: {reason}")]
    CgroupKey {
        /// The key given.
        key: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// A cgroup value cannot be used for its key.
    #[error("cgroup value {value:?} for {key} is invalid: {reason}")]
    CgroupValue {
        /// The key.
        key: String,
        /// The value given.
        value: String,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// No mounted cgroup hierarchy offers the controller.
    #[error("cgroup controller {controller} is not available: {detail}")]
    CgroupControllerUnavailable {
        /// The controller (the part of a key before the first `.`).
        controller: String,
        /// Where it was looked for.
        detail: &'static str,
    },
    /// A cgroup v2 key that cgroup v1 cannot express.
    #[error("cgroup key {key} has no cgroup v1 equivalent (only cpu.max, memory.max and pids.max are translated)")]
    NoCgroupV1Equivalent {
        /// The key given.
        key: String,
    },
    /// `/proc/self/mountinfo` or a hierarchy's `cgroup.controllers` cannot be read.
    #[error("cannot read {path}")]
    CgroupProbe {
        /// The file read.
        path: PathBuf,
        /// What the kernel said.
        #[source]
        source: io::Error,
    },
    /// The jail's cgroup already exists (is a jail with this id running?).
    #[error("cgroup {path} already exists (is another jail with this id running?)")]
    CgroupExists {
        /// The cgroup directory.
        path: PathBuf,
    },
    /// A cgroup directory cannot be created.
    #[error("cannot create cgroup {path}")]
    CgroupCreate {
        /// The cgroup directory.
        path: PathBuf,
        /// What the kernel said.
        #[source]
        source: io::Error,
    },
    /// A cgroup file cannot be read or written.
    #[error("cannot write {value:?} to {path}")]
    CgroupWrite {
        /// The cgroup file.
        path: PathBuf,
        /// What was written.
        value: String,
        /// What the kernel said.
        #[source]
        source: io::Error,
    },
    /// A path to create in the jail directory already exists.
    #[error("{path} already exists in the jail directory")]
    PathExists {
        /// The host path of the entry.
        path: PathBuf,
    },
    /// A directory on the way to an entry is a symbolic link or not a directory.
    #[error("{path} in the jail directory is not a directory (symbolic links are refused)")]
    NotADirectory {
        /// The host path of the component.
        path: PathBuf,
    },
    /// A placeholder, directory or device node cannot be created in the jail.
    #[error("cannot create {path}")]
    Create {
        /// The host path being created.
        path: PathBuf,
        /// What the kernel said.
        #[source]
        source: io::Error,
    },
    /// A process-level call (pipe, fork, namespace, wait) failed.
    #[error("{what} failed")]
    Syscall {
        /// The call, and what it was for.
        what: &'static str,
        /// What the kernel said.
        #[source]
        source: io::Error,
    },
    /// The child failed while confining itself or exec'ing the program.
    #[error("jailed child could not {what}")]
    Child {
        /// The step that failed, with its paths.
        what: String,
        /// What the kernel said.
        #[source]
        source: io::Error,
    },
    /// The running binary (or its ELF headers, or `/proc/self/maps`) cannot be read.
    #[error("cannot read {path}")]
    Exe {
        /// The file read.
        path: PathBuf,
        /// What the kernel said.
        #[source]
        source: io::Error,
    },
    /// The running binary is not an ELF file this crate understands.
    #[error("{path} is not a valid ELF file: {reason}")]
    Elf {
        /// The file read.
        path: PathBuf,
        /// What is wrong with it.
        reason: &'static str,
    },
}

/// The result of this crate's operations.
pub type Result<T> = std::result::Result<T, Error>;
