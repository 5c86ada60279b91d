//! Step 6: what the forked child does, and the plan it works from.
//!
//! Everything the child needs (C strings, pointer arrays, flags) is built
//! by [`ChildPlan::prepare`] before `fork`; after `fork` the child only
//! makes system calls. On failure it writes a fixed-size [`Failure`] record
//! to the error pipe, which the parent turns into an [`Error::Child`] with
//! the paths named.

use std::ffi::{CString, OsString};
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::PathBuf;

use libc::c_char;

use crate::error::{Error, Result};
use crate::mounts::{self, Errno};
use crate::privs;
use crate::spec::JailSpec;
use crate::sys::cstring;
use crate::validate::{EntryKind, Plan};

/// The steps the child takes, in order; the number is what crosses the pipe.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u32)]
pub(crate) enum Step {
    WaitRelease = 1,
    UnshareMounts,
    MakeSlave,
    BindJail,
    BindFile,
    RemountFile,
    JoinNetns,
    ChdirJail,
    PivotRoot,
    DetachOldRoot,
    ChdirRoot,
    RemountRoot,
    LimitFiles,
    LimitFileSize,
    DropBounding,
    ClearAmbient,
    ClearGroups,
    SetGid,
    SetUid,
    ClearCaps,
    NoNewPrivs,
    CloseFds,
    Exec,
}

impl Step {
    const ALL: [Step; 23] = [
        Step::WaitRelease,
        Step::UnshareMounts,
        Step::MakeSlave,
        Step::BindJail,
        Step::BindFile,
        Step::RemountFile,
        Step::JoinNetns,
        Step::ChdirJail,
        Step::PivotRoot,
        Step::DetachOldRoot,
        Step::ChdirRoot,
        Step::RemountRoot,
        Step::LimitFiles,
        Step::LimitFileSize,
        Step::DropBounding,
        Step::ClearAmbient,
        Step::ClearGroups,
        Step::SetGid,
        Step::SetUid,
        Step::ClearCaps,
        Step::NoNewPrivs,
        Step::CloseFds,
        Step::Exec,
    ];

    fn from_u32(n: u32) -> Option<Step> {
        Step::ALL.into_iter().find(|s| *s as u32 == n)
    }
}

/// What the child reports when a step fails: the step, which file (for
/// per-file steps) and the errno.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Failure {
    step: Step,
    index: u32,
    errno: Errno,
}

/// Size of a [`Failure`] record on the pipe.
pub(crate) const FAILURE_LEN: usize = 12;

impl Failure {
    fn new(step: Step, errno: Errno) -> Self {
        Failure {
            step,
            index: 0,
            errno,
        }
    }

    fn to_bytes(self) -> [u8; FAILURE_LEN] {
        let mut out = [0u8; FAILURE_LEN];
        let words = [self.step as u32, self.index, self.errno.unsigned_abs()];
        for (chunk, word) in out.chunks_exact_mut(4).zip(words) {
            chunk.copy_from_slice(&word.to_ne_bytes());
        }
        out
    }

    /// Decodes a record; `None` if it is short or unknown.
    pub(crate) fn from_bytes(bytes: &[u8]) -> Option<Self> {
        let word = |i: usize| {
            let b = bytes.get(i * 4..i * 4 + 4)?;
            Some(u32::from_ne_bytes(b.try_into().ok()?))
        };
        Some(Failure {
            step: Step::from_u32(word(0)?)?,
            index: word(1)?,
            errno: i32::try_from(word(2)?).ok()?,
        })
    }
}

/// A list of C strings with the null-terminated pointer array `execve` takes.
struct CStringArray {
    /// Owns what `ptrs` points at; never changed after construction.
    strings: Vec<CString>,
    ptrs: Vec<*const c_char>,
}

impl CStringArray {
    fn new(strings: Vec<CString>) -> Self {
        let mut ptrs: Vec<*const c_char> = strings.iter().map(|s| s.as_ptr()).collect();
        ptrs.push(std::ptr::null());
        CStringArray { strings, ptrs }
    }
}

/// One file bind: host path onto placeholder, then a remount with `flags`.
struct Bind {
    src: CString,
    dst: CString,
    flags: libc::c_ulong,
}

/// Everything the child needs, prepared before `fork`.
pub(crate) struct ChildPlan {
    dir: CString,
    binds: Vec<Bind>,
    netns: Option<RawFd>,
    root_flags: Option<libc::c_ulong>,
    max_open_files: u64,
    max_file_size: Option<u64>,
    uid: u32,
    gid: u32,
    program: CString,
    argv: CStringArray,
    envp: CStringArray,
    /// For messages: the jail directory, each bind's host and placeholder
    /// path, the netns file and the program.
    names: Names,
}

struct Names {
    dir: PathBuf,
    binds: Vec<(PathBuf, PathBuf)>,
    netns: Option<PathBuf>,
    program: PathBuf,
}

impl ChildPlan {
    /// Builds the child's C strings and flags from a validated plan.
    pub(crate) fn prepare(spec: &JailSpec, plan: &Plan) -> Result<Self> {
        let nul = |what: String| move |_| Error::NulByte { what };
        let mut binds = Vec::new();
        let mut bind_names = Vec::new();
        for entry in &plan.entries {
            // A writable directory is bound onto itself: its own mount, so
            // a read-only root does not cover it.
            let (host, remount_flags) = match &entry.kind {
                EntryKind::File {
                    host,
                    remount_flags,
                } => (host, remount_flags),
                EntryKind::Dir { remount_flags } => (&entry.dest, remount_flags),
                EntryKind::Device { .. } => continue,
            };
            binds.push(Bind {
                src: cstring(host).map_err(nul(format!("host file {}", host.display())))?,
                dst: cstring(&entry.dest).map_err(nul(format!("path {}", entry.dest.display())))?,
                flags: *remount_flags,
            });
            bind_names.push((host.clone(), entry.dest.clone()));
        }
        let root_flags = if spec.read_only_root {
            let flags = crate::sys::mount_flags(&plan.dir).map_err(|source| Error::JailDir {
                path: plan.dir.clone(),
                source,
            })?;
            Some(flags | libc::MS_RDONLY | libc::MS_NOSUID)
        } else {
            None
        };
        let program =
            cstring(&spec.program).map_err(nul(format!("program {}", spec.program.display())))?;
        let mut argv = vec![program.clone()];
        for arg in &spec.args {
            argv.push(CString::new(arg.as_bytes()).map_err(|_| Error::NulByte {
                what: "an argument".into(),
            })?);
        }
        Ok(ChildPlan {
            dir: cstring(&plan.dir)
                .map_err(nul(format!("jail directory {}", plan.dir.display())))?,
            binds,
            netns: plan.netns.as_ref().map(|f| f.as_raw_fd()),
            root_flags,
            max_open_files: spec.max_open_files,
            max_file_size: spec.max_file_size,
            uid: spec.uid,
            gid: spec.gid,
            program,
            argv: CStringArray::new(argv),
            envp: CStringArray::new(environment(&spec.env)?),
            names: Names {
                dir: plan.dir.clone(),
                binds: bind_names,
                netns: spec.netns.clone(),
                program: spec.program.clone(),
            },
        })
    }

    /// The error for a failure record read from the child.
    pub(crate) fn error(&self, record: &[u8]) -> Error {
        let Some(failure) = Failure::from_bytes(record) else {
            return Error::Child {
                what: "start (it sent an unreadable report)".to_string(),
                source: io::Error::from(io::ErrorKind::InvalidData),
            };
        };
        Error::Child {
            what: self.describe(failure),
            source: io::Error::from_raw_os_error(failure.errno),
        }
    }

    fn describe(&self, f: Failure) -> String {
        let n = &self.names;
        let dir = n.dir.display();
        let bind = usize::try_from(f.index).ok().and_then(|i| n.binds.get(i));
        let (host, dest) = bind.map_or((String::new(), String::new()), |(h, d)| {
            (h.display().to_string(), d.display().to_string())
        });
        match f.step {
            Step::WaitRelease => "wait for the parent's go-ahead".into(),
            Step::UnshareMounts => "create a mount namespace".into(),
            Step::MakeSlave => "make / a slave mount".into(),
            Step::BindJail => format!("bind-mount jail directory {dir} onto itself"),
            Step::BindFile => format!("bind-mount {host} onto {dest}"),
            Step::RemountFile => {
                format!("remount {dest} with its flags (read-only, nosuid, nodev)")
            }
            Step::JoinNetns => format!(
                "join network namespace {}",
                n.netns
                    .as_ref()
                    .map(|p| p.display().to_string())
                    .unwrap_or_default()
            ),
            Step::ChdirJail => format!("enter jail directory {dir}"),
            Step::PivotRoot => format!("pivot the root into {dir}"),
            Step::DetachOldRoot => "detach the old root".into(),
            Step::ChdirRoot => "enter the new root".into(),
            Step::RemountRoot => format!("remount jail root {dir} read-only"),
            Step::LimitFiles => format!("set RLIMIT_NOFILE to {}", self.max_open_files),
            Step::LimitFileSize => format!(
                "set RLIMIT_FSIZE to {}",
                self.max_file_size.unwrap_or_default()
            ),
            Step::DropBounding => "drop the capability bounding set".into(),
            Step::ClearAmbient => "clear the ambient capabilities".into(),
            Step::ClearGroups => "drop the supplementary groups".into(),
            Step::SetGid => format!("set gid {}", self.gid),
            Step::SetUid => format!("set uid {}", self.uid),
            Step::ClearCaps => "clear its capabilities".into(),
            Step::NoNewPrivs => "set no_new_privs".into(),
            Step::CloseFds => "close inherited file descriptors".into(),
            Step::Exec => format!("execute {} in the jail", n.program.display()),
        }
    }
}

/// The caller's environment with `extra` added (overriding), as `K=V`.
fn environment(extra: &[(OsString, OsString)]) -> Result<Vec<CString>> {
    let mut vars: Vec<(OsString, OsString)> = std::env::vars_os()
        .filter(|(k, _)| !extra.iter().any(|(e, _)| e == k))
        .collect();
    vars.extend(extra.iter().cloned());
    vars.into_iter()
        .map(|(k, v)| {
            let mut kv = k.clone().into_vec();
            kv.push(b'=');
            kv.extend_from_slice(v.as_bytes());
            CString::new(kv).map_err(|_| Error::NulByte {
                what: format!("environment variable {k:?}"),
            })
        })
        .collect()
}

/// The child's whole life after `fork`: confine, exec, or report and exit.
/// Never returns into the caller's code.
pub(crate) fn run_child(
    plan: &ChildPlan,
    release: RawFd,
    report: RawFd,
    fallback_max_fd: RawFd,
) -> ! {
    let outcome = catch_unwind(AssertUnwindSafe(|| {
        confine_and_exec(plan, release, report, fallback_max_fd)
    }));
    let code = match outcome {
        Ok(failure) => {
            let record = failure.to_bytes();
            // SAFETY: `record` is valid for its length; a failed write only
            // means the parent is gone.
            unsafe { libc::write(report, record.as_ptr().cast(), record.len()) };
            1
        }
        Err(_) => 127,
    };
    // SAFETY: _exit ends this process at once, without running the
    // caller's atexit handlers or destructors (they belong to the parent).
    unsafe { libc::_exit(code) }
}

/// Runs the steps in order; returns only on failure.
fn confine_and_exec(
    plan: &ChildPlan,
    release: RawFd,
    report: RawFd,
    fallback_max_fd: RawFd,
) -> Failure {
    let at = |step| move |errno| Failure::new(step, errno);
    let steps = || -> std::result::Result<Errno, Failure> {
        privs::reset_signals();
        wait_release(release).map_err(at(Step::WaitRelease))?;
        set_up_mounts(plan)?;
        if let Some(fd) = plan.netns {
            mounts::join_netns(fd).map_err(at(Step::JoinNetns))?;
        }
        enter_root(plan)?;
        privs::set_rlimit(libc::RLIMIT_NOFILE, plan.max_open_files)
            .map_err(at(Step::LimitFiles))?;
        if let Some(size) = plan.max_file_size {
            privs::set_rlimit(libc::RLIMIT_FSIZE, size).map_err(at(Step::LimitFileSize))?;
        }
        drop_privileges(plan)?;
        privs::close_fds_except(report, fallback_max_fd).map_err(at(Step::CloseFds))?;
        Ok(privs::exec(&plan.program, &plan.argv.ptrs, &plan.envp.ptrs))
    };
    match steps() {
        Ok(errno) => Failure::new(Step::Exec, errno),
        Err(failure) => failure,
    }
}

/// Blocks until the parent writes the go-ahead byte (EOF: it gave up).
fn wait_release(fd: RawFd) -> std::result::Result<(), Errno> {
    let mut byte = 0u8;
    loop {
        // SAFETY: reads at most one byte into `byte`.
        match unsafe { libc::read(fd, (&mut byte as *mut u8).cast(), 1) } {
            1 => return Ok(()),
            0 => return Err(libc::ECANCELED),
            _ if mounts::errno() == libc::EINTR => continue,
            _ => return Err(mounts::errno()),
        }
    }
}

/// New mount namespace, nothing propagating back, the jail directory
/// bound onto itself and each file bound onto its placeholder.
fn set_up_mounts(plan: &ChildPlan) -> std::result::Result<(), Failure> {
    let at = |step| move |errno| Failure::new(step, errno);
    mounts::unshare_mount_ns().map_err(at(Step::UnshareMounts))?;
    mounts::make_root_slave().map_err(at(Step::MakeSlave))?;
    mounts::bind(&plan.dir, &plan.dir, true).map_err(at(Step::BindJail))?;
    for (i, bind) in plan.binds.iter().enumerate() {
        let at_file = |step| {
            let index = u32::try_from(i).unwrap_or(u32::MAX);
            move |errno| Failure { step, index, errno }
        };
        mounts::bind(&bind.src, &bind.dst, false).map_err(at_file(Step::BindFile))?;
        mounts::remount_bind(&bind.dst, bind.flags).map_err(at_file(Step::RemountFile))?;
    }
    Ok(())
}

/// Pivots into the jail directory and detaches the host's root.
fn enter_root(plan: &ChildPlan) -> std::result::Result<(), Failure> {
    let at = |step| move |errno| Failure::new(step, errno);
    mounts::chdir(&plan.dir).map_err(at(Step::ChdirJail))?;
    mounts::pivot_root_here().map_err(at(Step::PivotRoot))?;
    mounts::detach_old_root().map_err(at(Step::DetachOldRoot))?;
    mounts::chdir(c"/").map_err(at(Step::ChdirRoot))?;
    if let Some(flags) = plan.root_flags {
        mounts::remount_bind(c"/", flags).map_err(at(Step::RemountRoot))?;
    }
    Ok(())
}

/// Capabilities, groups, gid, uid, no_new_privs: in this order, because
/// each drop needs a capability the next one removes.
fn drop_privileges(plan: &ChildPlan) -> std::result::Result<(), Failure> {
    let at = |step| move |errno| Failure::new(step, errno);
    privs::drop_bounding_set().map_err(at(Step::DropBounding))?;
    privs::clear_ambient().map_err(at(Step::ClearAmbient))?;
    privs::clear_groups().map_err(at(Step::ClearGroups))?;
    privs::set_gid(plan.gid).map_err(at(Step::SetGid))?;
    privs::set_uid(plan.uid).map_err(at(Step::SetUid))?;
    privs::clear_capabilities().map_err(at(Step::ClearCaps))?;
    privs::no_new_privs().map_err(at(Step::NoNewPrivs))?;
    Ok(())
}

impl std::fmt::Debug for ChildPlan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChildPlan")
            .field("dir", &self.dir)
            .field("program", &self.program)
            .field("args", &self.argv.strings)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failure_record_round_trips() {
        let f = Failure {
            step: Step::RemountFile,
            index: 7,
            errno: libc::EROFS,
        };
        assert_eq!(Failure::from_bytes(&f.to_bytes()), Some(f));
        for step in Step::ALL {
            assert_eq!(Step::from_u32(step as u32), Some(step));
        }
    }

    #[test]
    fn failure_record_short_or_unknown_is_rejected() {
        assert_eq!(Failure::from_bytes(&[1, 0, 0]), None);
        let mut bytes = Failure::new(Step::Exec, 2).to_bytes();
        bytes[..4].copy_from_slice(&999u32.to_ne_bytes());
        assert_eq!(Failure::from_bytes(&bytes), None);
    }

    #[test]
    fn environment_overrides_and_adds() {
        let env = environment(&[
            ("EMBER_JAIL_UNIT".into(), "1".into()),
            ("PATH".into(), "/x".into()),
        ])
        .unwrap();
        let env: Vec<&[u8]> = env.iter().map(|c| c.as_bytes()).collect();
        assert!(env.contains(&&b"EMBER_JAIL_UNIT=1"[..]));
        assert_eq!(env.iter().filter(|kv| kv.starts_with(b"PATH=")).count(), 1);
        assert!(env.contains(&&b"PATH=/x"[..]));
    }
}
