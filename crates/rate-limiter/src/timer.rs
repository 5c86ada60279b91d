//! The limiter's timerfd, made nonblocking. The crate's only `unsafe`.
#![allow(unsafe_code)]

use std::io;
use std::os::fd::AsRawFd;

use vmm_sys_util::timerfd::TimerFd;

/// A one-shot-capable timerfd whose read never blocks: the limiter reads it
/// when the event loop says it is readable, and a read of a timer that did
/// not expire (a spurious or stale wake-up) must not stall the loop.
pub(crate) fn nonblocking_timer() -> io::Result<TimerFd> {
    let timer = TimerFd::new().map_err(io::Error::from)?;
    let fd = timer.as_raw_fd();
    // SAFETY: fcntl(2) on a descriptor that `timer` owns and keeps open for
    // the whole block; F_GETFL and F_SETFL only read and set its status
    // flags and touch no memory of ours.
    let rc = unsafe {
        let flags = libc::fcntl(fd, libc::F_GETFL);
        if flags < 0 {
            flags
        } else {
            libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK)
        }
    };
    if rc < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(timer)
}
