//! The few libc calls outside the userfaultfd crate: page size, `poll`,
//! `O_NONBLOCK`.

use std::io;
use std::os::fd::RawFd;

/// The host's base page size.
pub(crate) fn host_page_size() -> usize {
    // SAFETY: sysconf reads a constant and touches no memory of ours.
    let size = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    usize::try_from(size).unwrap_or(4096)
}

/// What `poll` saw on the userfaultfd and on the VMM's socket.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Ready {
    pub uffd: libc::c_short,
    pub vmm: libc::c_short,
}

/// Waits up to `timeout_ms` (-1: forever) for an event on either fd. An
/// interrupted wait returns nothing ready.
pub(crate) fn poll_two(uffd: RawFd, vmm: RawFd, timeout_ms: i32) -> io::Result<Ready> {
    let mut fds = [
        libc::pollfd {
            fd: uffd,
            events: libc::POLLIN,
            revents: 0,
        },
        libc::pollfd {
            fd: vmm,
            events: libc::POLLIN | libc::POLLRDHUP,
            revents: 0,
        },
    ];
    // SAFETY: `fds` is a valid array of two pollfds that outlives the call,
    // and its length is passed with it.
    let n = unsafe { libc::poll(fds.as_mut_ptr(), 2, timeout_ms) };
    if n < 0 {
        let err = io::Error::last_os_error();
        if err.kind() == io::ErrorKind::Interrupted {
            return Ok(Ready::default());
        }
        return Err(err);
    }
    Ok(Ready {
        uffd: fds[0].revents,
        vmm: fds[1].revents,
    })
}

/// Sets `O_NONBLOCK` on `fd`'s open file description; returns whether it
/// was clear before.
pub(crate) fn set_nonblocking(fd: RawFd) -> io::Result<bool> {
    // SAFETY: F_GETFL on any fd number only returns flags or an error.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if flags < 0 {
        return Err(io::Error::last_os_error());
    }
    if flags & libc::O_NONBLOCK != 0 {
        return Ok(false);
    }
    // SAFETY: F_SETFL changes only the file status flags of the fd the
    // caller owns; no memory is passed.
    if unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(true)
}

/// What `fd` is, as `/proc/self/fd` names it (`anon_inode:[userfaultfd]`
/// for a userfaultfd); `None` without `/proc`.
pub(crate) fn fd_kind(fd: RawFd) -> Option<String> {
    std::fs::read_link(format!("/proc/self/fd/{fd}"))
        .ok()
        .map(|p| p.to_string_lossy().into_owned())
}
