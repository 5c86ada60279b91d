//! What a jail is made of: the public [`JailSpec`] a caller fills in.

use std::ffi::OsString;
use std::path::PathBuf;

/// The uid and gid [`JailSpec::new`] picks: `nobody`/`nogroup` on most distributions.
pub const NOBODY: u32 = 65534;

/// The `RLIMIT_NOFILE` [`JailSpec::new`] picks (Firecracker's jailer default).
pub const DEFAULT_MAX_OPEN_FILES: u64 = 2048;

/// The cgroup parent [`JailSpec::new`] picks.
pub const DEFAULT_CGROUP_PARENT: &str = "ember";

/// Everything [`run`](crate::run) needs to confine and start one program.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JailSpec {
    /// Id of this jail: names its cgroup (`<cgroup_parent>/<id>`).
    /// `[A-Za-z0-9_-]`, 1 to 64 characters.
    pub id: String,
    /// The jail directory. Must already exist and be a directory; it
    /// becomes the child's root. The jailed uid must be able to search it
    /// (mode 0755 or similar): the jail does not change its mode.
    pub dir: PathBuf,
    /// The uid the program runs as.
    pub uid: u32,
    /// The gid the program runs as (with no supplementary groups).
    pub gid: u32,
    /// uid 0 or gid 0 is refused unless this is set.
    pub allow_root: bool,
    /// Host files made visible inside the jail (bind mounts).
    pub files: Vec<JailFile>,
    /// Host character-device nodes (e.g. `/dev/kvm`, `/dev/net/tun`)
    /// recreated inside at the same path with the same major/minor, mode
    /// 0600, owned by `uid:gid`.
    pub devices: Vec<PathBuf>,
    /// A network namespace to join (e.g. `/var/run/netns/NAME`), before
    /// privileges are dropped.
    pub netns: Option<PathBuf>,
    /// Put the child in a new PID namespace (it is PID 1 there).
    pub new_pid_ns: bool,
    /// Cgroup limits, as cgroup v2 file names and values: `("cpu.max",
    /// "50000 100000")`, `("memory.max", "256M")`, `("pids.max", "64")`.
    /// Empty: no cgroup is created.
    pub cgroup: Vec<(String, String)>,
    /// Where the jail's cgroup goes, relative to the hierarchy root
    /// (`ember` from [`JailSpec::new`]; empty means the root itself).
    pub cgroup_parent: String,
    /// Force a cgroup version; `None`: per controller, v2 if the v2
    /// hierarchy offers it, else v1 if a v1 hierarchy has it mounted.
    pub cgroup_version: Option<CgroupVersion>,
    /// `RLIMIT_NOFILE` for the child (soft = hard).
    pub max_open_files: u64,
    /// `RLIMIT_FSIZE` for the child (soft = hard), if any.
    pub max_file_size: Option<u64>,
    /// Remount the jail root read-only (files marked writable stay writable).
    pub read_only_root: bool,
    /// Directories (absolute paths inside the jail, e.g. `/run`) created
    /// empty, owned by `uid:gid` with mode 0700, and mounted writable (no
    /// exec, no devices, no setuid) even with a read-only root: where the
    /// program makes its sockets. The host sees them at the same place
    /// under the jail directory; each is removed at the end if the program
    /// left it empty.
    pub writable_dirs: Vec<PathBuf>,
    /// The program to exec, as a path inside the jail; it must be one of `files`.
    pub program: PathBuf,
    /// `argv[1..]` for the program (`argv[0]` is `program`).
    pub args: Vec<OsString>,
    /// Environment variables set for the program, on top of (and overriding)
    /// the caller's environment.
    pub env: Vec<(OsString, OsString)>,
}

/// A host file made visible inside the jail.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JailFile {
    /// The file on the host (symbolic links are followed).
    pub host: PathBuf,
    /// Where it appears inside the jail: absolute, without `..`.
    pub inside: PathBuf,
    /// Whether the jailed program may write it (else it is bound read-only).
    pub writable: bool,
}

/// A cgroup version.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CgroupVersion {
    /// Per-controller hierarchies (`/sys/fs/cgroup/<controller>`).
    V1,
    /// The unified hierarchy.
    V2,
}

impl JailSpec {
    /// A spec for jail `id` in `dir` running `program`, as `nobody`
    /// (65534:65534), with 2048 open files, cgroup parent `ember` and
    /// nothing else: add files (at least `program`), devices and limits.
    pub fn new(
        id: impl Into<String>,
        dir: impl Into<PathBuf>,
        program: impl Into<PathBuf>,
    ) -> Self {
        JailSpec {
            id: id.into(),
            dir: dir.into(),
            uid: NOBODY,
            gid: NOBODY,
            allow_root: false,
            files: Vec::new(),
            devices: Vec::new(),
            netns: None,
            new_pid_ns: false,
            cgroup: Vec::new(),
            cgroup_parent: DEFAULT_CGROUP_PARENT.to_string(),
            cgroup_version: None,
            max_open_files: DEFAULT_MAX_OPEN_FILES,
            max_file_size: None,
            read_only_root: false,
            writable_dirs: Vec::new(),
            program: program.into(),
            args: Vec::new(),
            env: Vec::new(),
        }
    }
}

impl JailFile {
    /// A read-only file at `inside`.
    pub fn read_only(host: impl Into<PathBuf>, inside: impl Into<PathBuf>) -> Self {
        JailFile {
            host: host.into(),
            inside: inside.into(),
            writable: false,
        }
    }

    /// A writable file at `inside`.
    pub fn writable(host: impl Into<PathBuf>, inside: impl Into<PathBuf>) -> Self {
        JailFile {
            host: host.into(),
            inside: inside.into(),
            writable: true,
        }
    }
}
