//! Steps 4 and 5: fork the child (in a new PID namespace if asked), put it
//! in its cgroup, release it, learn whether its exec worked, and wait.

use std::convert::Infallible;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::process::ExitStatusExt;
use std::process::ExitStatus;

use crate::cgroup::Cgroup;
use crate::child::{self, ChildPlan, FAILURE_LEN};
use crate::error::{Error, Result};
use crate::signals::Forwarding;
use crate::sys;

/// The caller's own PID namespace, to return to after forking into a new one.
const OWN_PID_NS: &str = "/proc/self/ns/pid";

/// Forks the child, releases it once it is in its cgroup, and waits for
/// it; returns its exit status, or the step it failed at.
pub(crate) fn spawn_and_wait(
    plan: &ChildPlan,
    cgroup: Option<&Cgroup>,
    new_pid_ns: bool,
) -> Result<ExitStatus> {
    let (release_rd, release_wr) = sys::pipe().map_err(|source| Error::Syscall {
        what: "creating the release pipe",
        source,
    })?;
    let (report_rd, report_wr) = sys::pipe().map_err(|source| Error::Syscall {
        what: "creating the error pipe",
        source,
    })?;
    let fallback_max_fd = open_max();
    let pid = fork(new_pid_ns, || {
        // SAFETY: closing the parent's end of the release pipe in the
        // child, so it sees EOF if the parent gives up.
        unsafe { libc::close(release_wr.as_raw_fd()) };
        child::run_child(
            plan,
            release_rd.as_raw_fd(),
            report_wr.as_raw_fd(),
            fallback_max_fd,
        )
    })?;
    // The child's ends: the parent must not hold them, or it never sees EOF.
    drop(release_rd);
    drop(report_wr);

    let forwarding = Forwarding::start(pid);
    let released = cgroup.map_or(Ok(()), |c| c.attach(pid)).and_then(|()| {
        sys::write_all(&release_wr, &[1]).map_err(|source| Error::Syscall {
            what: "releasing the jailed child",
            source,
        })
    });
    if let Err(e) = released {
        sys::kill_and_reap(pid);
        return Err(e);
    }
    drop(release_wr);

    // EOF with nothing read: the exec succeeded (the pipe is close-on-exec).
    let mut record = [0u8; FAILURE_LEN];
    let read = sys::read_full(&report_rd, &mut record);
    let status = sys::wait(pid).map_err(|source| Error::Syscall {
        what: "waiting for the jailed child",
        source,
    })?;
    drop(forwarding);
    match read {
        Ok(0) => Ok(ExitStatus::from_raw(status)),
        Ok(n) => Err(plan.error(record.get(..n).unwrap_or_default())),
        Err(source) => Err(Error::Syscall {
            what: "reading the jailed child's error pipe",
            source,
        }),
    }
}

/// Forks; the child runs `child` (which never returns). With
/// `new_pid_ns`, the child is PID 1 of a new PID namespace and the calling
/// thread is put back in its own one afterwards, so its later forks are
/// unaffected (a PID namespace whose init has exited refuses new members).
fn fork(new_pid_ns: bool, child: impl FnOnce() -> Infallible) -> Result<libc::pid_t> {
    let own_ns = if new_pid_ns {
        let ns = File::open(OWN_PID_NS).map_err(|source| Error::Syscall {
            what: "opening /proc/self/ns/pid",
            source,
        })?;
        sys::unshare(libc::CLONE_NEWPID).map_err(|source| Error::Syscall {
            what: "creating a PID namespace",
            source,
        })?;
        Some(ns)
    } else {
        None
    };
    // SAFETY: the child only runs `child`, which makes system calls on data
    // prepared before the fork and ends in execve or _exit; the parent
    // carries on as before.
    let pid = unsafe { libc::fork() };
    if pid == 0 {
        child();
    }
    let fork_error = std::io::Error::last_os_error();
    if let Some(ns) = own_ns {
        if let Err(source) = sys::setns(&ns, libc::CLONE_NEWPID) {
            if pid > 0 {
                sys::kill_and_reap(pid);
            }
            return Err(Error::Syscall {
                what: "returning to the caller's PID namespace",
                source,
            });
        }
    }
    if pid < 0 {
        return Err(Error::Syscall {
            what: "fork",
            source: fork_error,
        });
    }
    Ok(pid)
}

/// The highest descriptor number to close by hand if `close_range` is missing.
fn open_max() -> i32 {
    // SAFETY: sysconf takes an integer and returns one.
    let max = unsafe { libc::sysconf(libc::_SC_OPEN_MAX) };
    i32::try_from(max)
        .ok()
        .filter(|m| *m > 0)
        .unwrap_or(1024)
        .min(1 << 20)
}
