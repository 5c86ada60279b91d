//! The two socket calls std does not offer, and the crate's only unsafe
//! code: a listening Unix socket whose file gets its mode between `bind`
//! and `listen` (so no client can connect while it is looser, and the
//! process umask, shared by every thread, is left alone), and `send`
//! without SIGPIPE.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;

/// Pending connections the kernel queues before `accept`.
const BACKLOG: libc::c_int = 128;

fn check(ret: libc::c_int) -> io::Result<()> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// `path` as a `sockaddr_un` and its length.
fn address(path: &Path) -> io::Result<(libc::sockaddr_un, libc::socklen_t)> {
    let bytes = path.as_os_str().as_bytes();
    let mut addr = libc::sockaddr_un {
        sun_family: libc::sa_family_t::try_from(libc::AF_UNIX)
            .map_err(|_| io::Error::from(io::ErrorKind::Unsupported))?,
        sun_path: [0; 108],
    };
    if bytes.is_empty() || bytes.contains(&0) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "a socket path must be non-empty and have no NUL byte",
        ));
    }
    // One byte stays for the terminating NUL.
    if bytes.len() >= addr.sun_path.len() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("a socket path is at most {} bytes", addr.sun_path.len() - 1),
        ));
    }
    for (dst, src) in addr.sun_path.iter_mut().zip(bytes) {
        *dst = libc::c_char::from_ne_bytes([*src]);
    }
    let len = std::mem::offset_of!(libc::sockaddr_un, sun_path) + bytes.len() + 1;
    let len =
        libc::socklen_t::try_from(len).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    Ok((addr, len))
}

/// A nonblocking listening socket at `path`, its file given `mode` before
/// it listens. The file is removed again if a later step fails.
pub(crate) fn listen(path: &Path, mode: u32) -> io::Result<UnixListener> {
    let (addr, len) = address(path)?;
    // SAFETY: socket() takes no pointers; the result is checked below.
    let fd = unsafe {
        libc::socket(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
            0,
        )
    };
    check(fd)?;
    // SAFETY: `fd` is a descriptor socket() just returned; nothing else
    // owns it, and the OwnedFd closes it once.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    // SAFETY: `addr` is an initialised sockaddr_un that outlives the call,
    // and `len` is no longer than it.
    check(unsafe {
        libc::bind(
            fd.as_raw_fd(),
            std::ptr::addr_of!(addr).cast::<libc::sockaddr>(),
            len,
        )
    })?;
    // Until listen() a connect() is refused, so nobody gets in while the
    // file still has the umask's mode.
    let listening = std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        // SAFETY: listen() takes no pointers; `fd` is our bound socket.
        .and_then(|()| check(unsafe { libc::listen(fd.as_raw_fd(), BACKLOG) }));
    if let Err(e) = listening {
        let _ = std::fs::remove_file(path);
        return Err(e);
    }
    Ok(UnixListener::from(fd))
}

/// Sends what the socket takes of `buf` without blocking and without
/// SIGPIPE when the client has gone (the `sendto` syscall).
pub(crate) fn send(stream: &UnixStream, buf: &[u8]) -> io::Result<usize> {
    // SAFETY: `buf` is valid for reads of `buf.len()` bytes for the call;
    // the descriptor is the stream's, open while it is borrowed.
    let n = unsafe {
        libc::send(
            stream.as_raw_fd(),
            buf.as_ptr().cast::<libc::c_void>(),
            buf.len(),
            libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT,
        )
    };
    usize::try_from(n).map_err(|_| io::Error::last_os_error())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sys_address_refuses_long_empty_and_nul_paths() {
        assert!(address(Path::new("")).is_err());
        assert!(address(Path::new("a\0b")).is_err());
        assert!(address(Path::new(&"x".repeat(108))).is_err());
        let (_, len) = address(Path::new(&"x".repeat(107))).unwrap();
        assert_eq!(usize::try_from(len).unwrap(), 2 + 107 + 1);
    }
}
