//! The child's mount-namespace calls (step 6, first half). They run after
//! `fork`, so they only make system calls: no allocation, no locks.

use std::ffi::CStr;
use std::os::fd::RawFd;
use std::ptr;

/// An errno value.
pub(crate) type Errno = i32;

/// The current errno (reading it does not allocate).
pub(crate) fn errno() -> Errno {
    std::io::Error::last_os_error()
        .raw_os_error()
        .unwrap_or(libc::EIO)
}

/// `Ok` for a zero return, else the errno.
pub(crate) fn check(ret: libc::c_long) -> Result<(), Errno> {
    if ret == 0 {
        Ok(())
    } else {
        Err(errno())
    }
}

/// A new mount namespace for this process.
pub(crate) fn unshare_mount_ns() -> Result<(), Errno> {
    // SAFETY: unshare takes flags by value and touches no memory.
    check(unsafe { libc::unshare(libc::CLONE_NEWNS) }.into())
}

/// Makes every mount a slave (`mount --make-rslave /`): host mounts still
/// reach us, nothing we mount reaches the host.
pub(crate) fn make_root_slave() -> Result<(), Errno> {
    // SAFETY: a NUL-terminated literal; the null source, type and data
    // pointers are allowed for a propagation change.
    check(
        unsafe {
            libc::mount(
                ptr::null(),
                c"/".as_ptr(),
                ptr::null(),
                libc::MS_SLAVE | libc::MS_REC,
                ptr::null(),
            )
        }
        .into(),
    )
}

/// Bind-mounts `src` onto `dst` (with its submounts if `recursive`).
pub(crate) fn bind(src: &CStr, dst: &CStr, recursive: bool) -> Result<(), Errno> {
    let flags = libc::MS_BIND | if recursive { libc::MS_REC } else { 0 };
    // SAFETY: both paths are NUL-terminated and outlive the call; type and
    // data may be null for a bind mount.
    check(
        unsafe { libc::mount(src.as_ptr(), dst.as_ptr(), ptr::null(), flags, ptr::null()) }.into(),
    )
}

/// Changes the per-mount flags of the bind mount at `target` to `flags`
/// (`MS_RDONLY`, `MS_NOSUID`, ...): `MS_BIND | MS_REMOUNT` is added.
pub(crate) fn remount_bind(target: &CStr, flags: libc::c_ulong) -> Result<(), Errno> {
    let flags = flags | libc::MS_BIND | libc::MS_REMOUNT;
    // SAFETY: `target` is NUL-terminated and outlives the call; source,
    // type and data may be null for a bind remount.
    check(
        unsafe {
            libc::mount(
                ptr::null(),
                target.as_ptr(),
                ptr::null(),
                flags,
                ptr::null(),
            )
        }
        .into(),
    )
}

/// Joins the network namespace open at `fd`.
pub(crate) fn join_netns(fd: RawFd) -> Result<(), Errno> {
    // SAFETY: setns reads only its arguments; a bad fd is an error, not UB.
    check(unsafe { libc::setns(fd, libc::CLONE_NEWNET) }.into())
}

/// `chdir(path)`.
pub(crate) fn chdir(path: &CStr) -> Result<(), Errno> {
    // SAFETY: `path` is NUL-terminated and outlives the call.
    check(unsafe { libc::chdir(path.as_ptr()) }.into())
}

/// `pivot_root(".", ".")`: the current directory (a mount point) becomes
/// the root, and the old root is stacked on top of it, to be detached.
pub(crate) fn pivot_root_here() -> Result<(), Errno> {
    // SAFETY: pivot_root takes two NUL-terminated paths, both literals here.
    check(unsafe { libc::syscall(libc::SYS_pivot_root, c".".as_ptr(), c".".as_ptr()) })
}

/// Lazily unmounts the old root left on top of `.` by [`pivot_root_here`].
pub(crate) fn detach_old_root() -> Result<(), Errno> {
    // SAFETY: a NUL-terminated literal; umount2 reads nothing else.
    check(unsafe { libc::umount2(c".".as_ptr(), libc::MNT_DETACH) }.into())
}
