//! Seccomp: one allow-list filter per thread kind, compiled once at start
//! with seccompiler from the tables in [`rules`], installed by each thread
//! before it touches guest-controlled data.
//!
//! A syscall outside a thread's list traps (`SECCOMP_RET_TRAP`): ember
//! writes one line naming the thread and the syscall, and the kernel kills
//! the process with SIGSYS (see `sigsys.rs`). In `log` mode such syscalls
//! are allowed and the kernel logs them (`dmesg`: `audit: type=1326 ...
//! syscall=N`), to build the lists.

mod names;
pub mod rules;
mod sigsys;

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;

use seccompiler::{BpfProgram, SeccompAction, SeccompFilter, TargetArch};

/// Seccomp errors.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A table names the same syscall twice.
    #[error("seccomp table lists syscall {0} twice")]
    DuplicateRule(libc::c_long),
    /// seccompiler refused a rule or the filter.
    #[error("cannot compile a seccomp filter")]
    Compile(#[source] seccompiler::BackendError),
    /// The filter cannot be turned into BPF.
    #[error("cannot compile a seccomp filter to BPF")]
    Bpf(#[source] seccompiler::BackendError),
    /// The SIGSYS handler cannot be installed.
    #[error("cannot install the SIGSYS handler")]
    Handler(#[source] std::io::Error),
    /// The kernel refused the filter.
    #[error("cannot install the seccomp filter of thread {0}")]
    Install(String, #[source] seccompiler::Error),
}

/// What a forbidden syscall does.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Mode {
    /// Kill the process, after one line naming the thread and syscall.
    #[default]
    On,
    /// Allow it and let the kernel log it (to build the lists).
    Log,
    /// No filters at all.
    Off,
}

impl FromStr for Mode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "on" => Ok(Mode::On),
            "log" => Ok(Mode::Log),
            "off" => Ok(Mode::Off),
            other => Err(format!(
                "invalid seccomp mode '{other}' (expected on, log or off)"
            )),
        }
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Mode::On => "on",
            Mode::Log => "log",
            Mode::Off => "off",
        })
    }
}

/// The kinds of thread ember runs, each with its own filter.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ThreadKind {
    /// The main thread once it runs the event loop.
    Vmm,
    /// A vCPU thread.
    Vcpu,
    /// The API server thread.
    Api,
    /// The live-migration worker.
    Migration,
}

impl ThreadKind {
    /// The allow-list of this kind.
    pub fn rules(self) -> Vec<rules::Rule> {
        match self {
            ThreadKind::Vmm => rules::vmm(),
            ThreadKind::Vcpu => rules::vcpu(),
            ThreadKind::Api => rules::api(),
            ThreadKind::Migration => rules::migration(),
        }
    }
}

/// The compiled filters, shared by the threads that install them.
#[derive(Clone, Debug)]
pub struct Filters {
    mode: Mode,
    vmm: Arc<BpfProgram>,
    vcpu: Arc<BpfProgram>,
    api: Arc<BpfProgram>,
    migration: Arc<BpfProgram>,
}

fn compile(kind: ThreadKind, mode: Mode) -> Result<BpfProgram, Error> {
    let mismatch = match mode {
        Mode::Log => SeccompAction::Log,
        _ => SeccompAction::Trap,
    };
    let filter = SeccompFilter::new(
        rules::to_map(&kind.rules())?,
        mismatch,
        SeccompAction::Allow,
        TargetArch::x86_64,
    )
    .map_err(Error::Compile)?;
    BpfProgram::try_from(filter).map_err(Error::Bpf)
}

impl Filters {
    /// Compiles every thread kind's filter for `mode`, and (unless off)
    /// installs the SIGSYS handler.
    pub fn new(mode: Mode) -> Result<Self, Error> {
        if mode != Mode::Off {
            sigsys::install_handler().map_err(Error::Handler)?;
            quiet_allocator();
        }
        Ok(Filters {
            mode,
            vmm: Arc::new(compile(ThreadKind::Vmm, mode)?),
            vcpu: Arc::new(compile(ThreadKind::Vcpu, mode)?),
            api: Arc::new(compile(ThreadKind::Api, mode)?),
            migration: Arc::new(compile(ThreadKind::Migration, mode)?),
        })
    }

    /// The mode the filters were compiled for.
    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// Installs `kind`'s filter on the calling thread, named `thread` in
    /// violation reports. From here on the thread can only make the
    /// syscalls of its list.
    pub fn install(&self, kind: ThreadKind, thread: &str) -> Result<(), Error> {
        if self.mode == Mode::Off {
            return Ok(());
        }
        let program = match kind {
            ThreadKind::Vmm => &self.vmm,
            ThreadKind::Vcpu => &self.vcpu,
            ThreadKind::Api => &self.api,
            ThreadKind::Migration => &self.migration,
        };
        sigsys::set_thread_name(thread);
        seccompiler::apply_filter(program).map_err(|e| Error::Install(thread.to_string(), e))?;
        log::debug!(
            "seccomp: thread {thread}: {:?} filter installed ({} rules, mode {})",
            kind,
            kind.rules().len(),
            self.mode
        );
        Ok(())
    }
}

/// Keeps glibc's allocator from opening files under a filter: shrinking a
/// thread's heap makes glibc read `/proc/sys/vm/overcommit_memory` once
/// (an `openat` the filters forbid; the migration thread freeing its
/// 1 MiB batches hit it). A fixed trim threshold above a thread heap's
/// largest size (64 MiB) means thread heaps are never shrunk, only
/// unmapped whole, and blocks of 128 KiB or more are always mapped and
/// unmapped on their own (no dynamic threshold).
#[allow(unsafe_code)]
fn quiet_allocator() {
    // SAFETY: mallopt changes allocator parameters; called before the
    // filtered threads start, with a valid option and value.
    let ok = unsafe { libc::mallopt(libc::M_TRIM_THRESHOLD, 128 << 20) };
    if ok != 1 {
        log::warn!("mallopt(M_TRIM_THRESHOLD) failed: a thread may trip its filter freeing memory");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_compiles_and_has_reasons() {
        for kind in [
            ThreadKind::Vmm,
            ThreadKind::Vcpu,
            ThreadKind::Api,
            ThreadKind::Migration,
        ] {
            let rules = kind.rules();
            assert!(rules.iter().all(|r| !r.why.is_empty()));
            assert!(!compile(kind, Mode::On).unwrap().is_empty());
            assert!(!compile(kind, Mode::Log).unwrap().is_empty());
        }
    }

    #[test]
    fn the_migration_thread_may_use_sockets_and_the_dirty_log_only() {
        let nrs: Vec<_> = ThreadKind::Migration.rules().iter().map(|r| r.nr).collect();
        for forbidden in [
            libc::SYS_open,
            libc::SYS_openat,
            libc::SYS_execve,
            libc::SYS_ptrace,
            libc::SYS_clone,
            libc::SYS_clone3,
            libc::SYS_fork,
            libc::SYS_mount,
            libc::SYS_bind,
            libc::SYS_listen,
            libc::SYS_accept4,
            libc::SYS_unlink,
        ] {
            assert!(!nrs.contains(&forbidden), "migration allows {forbidden}");
        }
        for needed in [libc::SYS_socket, libc::SYS_connect, libc::SYS_ioctl] {
            assert!(nrs.contains(&needed), "migration needs {needed}");
        }
    }

    #[test]
    fn lists_are_narrow() {
        let nrs = |k: ThreadKind| k.rules().iter().map(|r| r.nr).collect::<Vec<_>>();
        for kind in [ThreadKind::Vmm, ThreadKind::Vcpu, ThreadKind::Api] {
            for forbidden in [
                libc::SYS_open,
                libc::SYS_openat,
                libc::SYS_execve,
                libc::SYS_socket,
                libc::SYS_ptrace,
                libc::SYS_clone,
                libc::SYS_clone3,
                libc::SYS_fork,
                libc::SYS_mount,
            ] {
                // The event loop opens images (PATCH /drives) and the log
                // file (SIGHUP); nothing else opens files.
                if kind == ThreadKind::Vmm && forbidden == libc::SYS_openat {
                    continue;
                }
                // The event loop makes Unix streams for vsock, nothing else.
                if kind == ThreadKind::Vmm && forbidden == libc::SYS_socket {
                    let rules = kind.rules();
                    let rule = rules.iter().find(|r| r.nr == forbidden);
                    assert!(
                        rule.is_some_and(|r| r.when.len() == 1
                            && r.when[0]
                                .iter()
                                .any(|c| c.index == 0 && c.value == libc::AF_UNIX as u64)),
                        "the event loop's socket(2) is for AF_UNIX only"
                    );
                    continue;
                }
                assert!(
                    !nrs(kind).contains(&forbidden),
                    "{kind:?} allows {forbidden}"
                );
            }
        }
    }

    #[test]
    fn modes_parse() {
        assert_eq!("on".parse::<Mode>(), Ok(Mode::On));
        assert_eq!("log".parse::<Mode>(), Ok(Mode::Log));
        assert_eq!("off".parse::<Mode>(), Ok(Mode::Off));
        assert!("yes".parse::<Mode>().unwrap_err().contains("'yes'"));
    }
}
