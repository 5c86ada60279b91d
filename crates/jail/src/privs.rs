//! The child's privilege drop and exec (step 6, second half). Like
//! `mounts`, only system calls: this runs after `fork`.

use std::ffi::CStr;
use std::os::fd::RawFd;
use std::ptr;

use libc::c_char;

use crate::mounts::{check, errno, Errno};

/// `_LINUX_CAPABILITY_VERSION_3` from `<linux/capability.h>` (libc has no
/// capability definitions): 64-bit capability sets, as two 32-bit words.
pub(crate) const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;

/// The highest capability number `PR_CAPBSET_DROP` is tried with; the
/// kernel's own last one (`/proc/sys/kernel/cap_last_cap`) answers EINVAL
/// above it, which ends the loop.
const MAX_CAP: libc::c_ulong = 63;

/// `struct __user_cap_header_struct`.
#[repr(C)]
pub(crate) struct CapHeader {
    /// `_LINUX_CAPABILITY_VERSION_3`.
    pub version: u32,
    /// 0: this thread.
    pub pid: libc::c_int,
}

/// `struct __user_cap_data_struct`: one 32-bit word of each set.
#[repr(C)]
#[derive(Clone, Copy, Default)]
pub(crate) struct CapData {
    /// Effective set word.
    pub effective: u32,
    /// Permitted set word.
    pub permitted: u32,
    /// Inheritable set word.
    pub inheritable: u32,
}

/// Unused prctl arguments: the kernel reads them as `unsigned long` and
/// refuses non-zero ones, so they are passed at that width.
const ZERO: libc::c_ulong = 0;

/// The highest signal number (`NSIG - 1` on Linux).
const MAX_SIGNAL: libc::c_int = 64;

/// Puts every signal back to its default action and unblocks all: the
/// caller's ignored signals (Rust ignores SIGPIPE) and blocked mask would
/// otherwise survive `execve`, and a handler the caller installed must not
/// run in the child before it. Signals that cannot be changed (SIGKILL,
/// SIGSTOP, the C library's internal ones) are skipped.
pub(crate) fn reset_signals() {
    for sig in 1..=MAX_SIGNAL {
        // SAFETY: SIG_DFL needs no handler; an invalid signal number is an
        // EINVAL, not UB.
        unsafe { libc::signal(sig, libc::SIG_DFL) };
    }
    // SAFETY: an all-zero sigset_t is a valid set; sigemptyset makes it empty.
    let mut empty: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `empty` is a writable sigset_t; the mask call only reads it.
    unsafe {
        libc::sigemptyset(&mut empty);
        libc::pthread_sigmask(libc::SIG_SETMASK, &empty, ptr::null_mut());
    }
}

/// Sets `resource` to `value`, soft and hard.
pub(crate) fn set_rlimit(resource: libc::__rlimit_resource_t, value: u64) -> Result<(), Errno> {
    let limit = libc::rlimit {
        rlim_cur: value,
        rlim_max: value,
    };
    // SAFETY: `limit` is a valid rlimit the kernel only reads.
    check(unsafe { libc::setrlimit(resource, &limit) }.into())
}

/// Drops every capability from the bounding set, so no exec can regain one.
pub(crate) fn drop_bounding_set() -> Result<(), Errno> {
    for cap in 0..=MAX_CAP {
        // SAFETY: PR_CAPBSET_DROP takes the capability number by value.
        if unsafe { libc::prctl(libc::PR_CAPBSET_DROP, cap, ZERO, ZERO, ZERO) } != 0 {
            match errno() {
                // Past the kernel's last capability.
                libc::EINVAL if cap > 0 => return Ok(()),
                e => return Err(e),
            }
        }
    }
    Ok(())
}

/// Empties the ambient capability set.
pub(crate) fn clear_ambient() -> Result<(), Errno> {
    let clear = libc::c_ulong::from(libc::PR_CAP_AMBIENT_CLEAR_ALL.unsigned_abs());
    // SAFETY: the prctl takes only integers.
    check(unsafe { libc::prctl(libc::PR_CAP_AMBIENT, clear, ZERO, ZERO, ZERO) }.into())
}

/// No supplementary groups.
pub(crate) fn clear_groups() -> Result<(), Errno> {
    // SAFETY: a zero-length list; the null pointer is not read.
    check(unsafe { libc::setgroups(0, ptr::null()) }.into())
}

/// Real, effective and saved gid.
pub(crate) fn set_gid(gid: u32) -> Result<(), Errno> {
    // SAFETY: setresgid takes integers only.
    check(unsafe { libc::setresgid(gid, gid, gid) }.into())
}

/// Real, effective and saved uid (for a non-zero uid, this also clears the
/// permitted and effective capabilities).
pub(crate) fn set_uid(uid: u32) -> Result<(), Errno> {
    // SAFETY: setresuid takes integers only.
    check(unsafe { libc::setresuid(uid, uid, uid) }.into())
}

/// Empties the effective, permitted and inheritable sets (needed when the
/// jail runs as uid 0, where `setresuid` keeps them).
pub(crate) fn clear_capabilities() -> Result<(), Errno> {
    let header = CapHeader {
        version: LINUX_CAPABILITY_VERSION_3,
        pid: 0,
    };
    let data = [CapData::default(); 2];
    // SAFETY: version 3 reads one header and two data structs, both live
    // and of the layout the kernel expects.
    check(unsafe { libc::syscall(libc::SYS_capset, &header, data.as_ptr()) })
}

/// `PR_SET_NO_NEW_PRIVS`: no exec may gain privileges (setuid, file caps).
pub(crate) fn no_new_privs() -> Result<(), Errno> {
    let on: libc::c_ulong = 1;
    // SAFETY: the prctl takes only integers.
    check(unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, on, ZERO, ZERO, ZERO) }.into())
}

/// Closes every descriptor from 3 up except `keep` (`fallback_max` bounds
/// the loop used if the kernel has no `close_range`).
pub(crate) fn close_fds_except(keep: RawFd, fallback_max: RawFd) -> Result<(), Errno> {
    let keep_u = u32::try_from(keep).map_err(|_| libc::EBADF)?;
    let ranges = if keep_u >= 3 {
        [(3, keep_u - 1), (keep_u.saturating_add(1), u32::MAX)]
    } else {
        [(3, u32::MAX), (1, 0)]
    };
    for (first, last) in ranges {
        if first > last {
            continue;
        }
        // SAFETY: close_range takes integers; closing descriptors this
        // process will never use again (it execs next) is sound.
        let ret = unsafe { libc::syscall(libc::SYS_close_range, first, last, 0u32) };
        if ret != 0 {
            if errno() != libc::ENOSYS {
                return Err(errno());
            }
            for fd in 3..fallback_max {
                if fd != keep {
                    // SAFETY: as above; EBADF for a closed fd is ignored.
                    unsafe { libc::close(fd) };
                }
            }
            return Ok(());
        }
    }
    Ok(())
}

/// `execve`; only returns (with the errno) if it failed.
pub(crate) fn exec(program: &CStr, argv: &[*const c_char], envp: &[*const c_char]) -> Errno {
    // SAFETY: `program` is NUL-terminated; `argv` and `envp` are
    // null-terminated arrays of pointers to NUL-terminated strings that
    // outlive the call (see `CStringArray`).
    unsafe { libc::execve(program.as_ptr(), argv.as_ptr(), envp.as_ptr()) };
    errno()
}
