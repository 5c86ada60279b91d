//! SIGINT and SIGTERM as events: blocked in every thread (the mask is set
//! before any thread starts, so threads inherit it) and read from a
//! signalfd by the event loop.

use std::fs::File;
use std::io::Read;
use std::os::fd::{AsRawFd, FromRawFd, RawFd};

/// The signals that end ember.
pub const STOP_SIGNALS: [libc::c_int; 2] = [libc::SIGINT, libc::SIGTERM];

/// The signals read from the signalfd: the stop signals, and SIGHUP
/// (reopen the log file).
pub const HANDLED_SIGNALS: [libc::c_int; 3] = [libc::SIGINT, libc::SIGTERM, libc::SIGHUP];

/// A signalfd for [`STOP_SIGNALS`].
#[derive(Debug)]
pub struct StopSignals {
    fd: File,
}

fn stop_set() -> libc::sigset_t {
    // SAFETY: sigset_t is plain data; sigemptyset initialises it.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid sigset_t.
    unsafe { libc::sigemptyset(&mut set) };
    for s in HANDLED_SIGNALS {
        // SAFETY: `set` is initialised and `s` is a valid signal number.
        unsafe { libc::sigaddset(&mut set, s) };
    }
    set
}

impl StopSignals {
    /// Blocks the stop signals in the calling thread (call it on the main
    /// thread before starting others) and opens a signalfd for them.
    pub fn block() -> std::io::Result<Self> {
        let set = stop_set();
        // SAFETY: `set` is a valid sigset_t; a null old-set pointer is allowed.
        let ret = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
        if ret != 0 {
            return Err(std::io::Error::from_raw_os_error(ret));
        }
        // SAFETY: `set` is valid; -1 asks for a new descriptor.
        let fd = unsafe { libc::signalfd(-1, &set, libc::SFD_CLOEXEC | libc::SFD_NONBLOCK) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: signalfd returned a new descriptor that nothing else owns.
        let fd = unsafe { File::from_raw_fd(fd) };
        Ok(StopSignals { fd })
    }

    /// The next pending stop signal, if any.
    pub fn read(&mut self) -> Option<libc::c_int> {
        let mut buf = [0u8; std::mem::size_of::<libc::signalfd_siginfo>()];
        match self.fd.read(&mut buf) {
            Ok(n) if n == buf.len() => {
                let signo = u32::from_ne_bytes([buf[0], buf[1], buf[2], buf[3]]);
                libc::c_int::try_from(signo).ok()
            }
            _ => None,
        }
    }
}

impl AsRawFd for StopSignals {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}
