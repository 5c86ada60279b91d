//! Raw mode for a terminal on the console input, restored on every path.

use std::os::fd::{AsRawFd, BorrowedFd};

/// While alive, the terminal is in raw mode; dropping it restores the
/// settings it found (also when unwinding).
pub struct RawTerminal<'a> {
    fd: BorrowedFd<'a>,
    saved: libc::termios,
}

impl std::fmt::Debug for RawTerminal<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RawTerminal").field("fd", &self.fd).finish()
    }
}

impl<'a> RawTerminal<'a> {
    /// Puts `fd` in raw mode if it is a terminal; `None` if it is not one
    /// (a pipe, a file, /dev/null) or its settings cannot be read.
    pub fn enter(fd: BorrowedFd<'a>) -> Option<Self> {
        let raw_fd = fd.as_raw_fd();
        // SAFETY: isatty only inspects the descriptor, which `fd` keeps open.
        if unsafe { libc::isatty(raw_fd) } != 1 {
            return None;
        }
        // SAFETY: termios is plain data; all-zero is a valid value to overwrite.
        let mut saved: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: `saved` is a valid termios to write into; the fd is open.
        if unsafe { libc::tcgetattr(raw_fd, &mut saved) } != 0 {
            return None;
        }
        let mut raw = saved;
        // SAFETY: `raw` is a valid termios.
        unsafe { libc::cfmakeraw(&mut raw) };
        // Keep output post-processing so the host terminal still turns "\n" into "\r\n".
        raw.c_oflag = saved.c_oflag;
        // SAFETY: `raw` is a valid termios; the fd is open.
        if unsafe { libc::tcsetattr(raw_fd, libc::TCSANOW, &raw) } != 0 {
            return None;
        }
        Some(RawTerminal { fd, saved })
    }
}

impl Drop for RawTerminal<'_> {
    fn drop(&mut self) {
        // SAFETY: restores the termios read in `enter` on the same open fd.
        let ret = unsafe { libc::tcsetattr(self.fd.as_raw_fd(), libc::TCSANOW, &self.saved) };
        if ret != 0 {
            log::warn!("cannot restore the terminal settings");
        }
    }
}
