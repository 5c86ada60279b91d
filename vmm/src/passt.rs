//! User-mode networking: a NIC's frames go to passt (Debian's `passt`
//! package) over a Unix stream socket, in QEMU's `-netdev stream` framing
//! ([`ember_virtio_net::StreamBackend`]). passt gives the guest DHCP, DNS
//! and NAT to the host's network (its addresses copied from the host's
//! interface with the default route) and forwards host ports to it; no
//! tap, no root.
//!
//! Ember starts passt itself with one end of a socket pair (`passt -f -q
//! -F FD`), or connects to one the user started (`passt -s PATH`,
//! `socket=PATH`). A passt ember started says it is ready by writing its
//! PID to a pipe (`-P /dev/fd/N`: written once its ports are bound); if it
//! exits first, its own words (kept in a memfd given as its stderr) are
//! the error. It runs as `nobody` (passt drops root itself) in ember's
//! network namespace, and ends when ember does: its socket closes.
//!
//! Passt is started while VMs are built, on the thread that builds them,
//! which has no seccomp filter yet (the event-loop thread installs its
//! filter when the VM starts).

use std::fs::File;
use std::io::{self, Read, Seek};
use std::os::fd::{AsFd, AsRawFd, FromRawFd};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::config::net::UserNet;

/// How long passt may take to bind its ports and say it is ready.
const READY_TIMEOUT: Duration = Duration::from_secs(20);

/// The program ember starts.
pub const PASST: &str = "passt";

/// Why user-mode networking cannot start.
#[derive(Debug, thiserror::Error)]
pub enum PasstError {
    /// passt is not installed.
    #[error(
        "user-mode networking needs passt, which is not installed: \
         `apt-get install passt` (Debian's passt package)"
    )]
    Missing,
    /// A hostfwd does not parse.
    #[error("{0}")]
    HostFwd(String),
    /// passt exited before it was ready.
    #[error("passt exited ({status}) before it was ready: {said}")]
    Exited {
        /// Its exit status.
        status: String,
        /// What it printed.
        said: String,
    },
    /// passt did not say it was ready in time.
    #[error("passt did not start within {0:?}; it was killed")]
    Timeout(Duration),
    /// The user's passt cannot be reached.
    #[error("cannot connect to passt at {path}: {source}")]
    Connect {
        /// The socket's path.
        path: String,
        /// Why.
        source: io::Error,
    },
    /// A system call failed on the way.
    #[error("{what}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// Why it failed.
        source: io::Error,
    },
}

fn io_err(what: &'static str) -> impl FnOnce(io::Error) -> PasstError {
    move |source| PasstError::Io { what, source }
}

/// The socket to the NIC's passt: connected to the user's, or to one
/// started here (its PID returned too).
pub fn connect(user: &UserNet) -> Result<(UnixStream, Option<u32>), PasstError> {
    if let Some(path) = &user.socket {
        let sock = UnixStream::connect(path).map_err(|source| PasstError::Connect {
            path: path.display().to_string(),
            source,
        })?;
        return Ok((sock, None));
    }
    let mut args: Vec<String> = Vec::new();
    for f in user.forwards().map_err(PasstError::HostFwd)? {
        args.extend(f.passt_args());
    }
    let (sock, pid) = start(&args)?;
    Ok((sock, Some(pid)))
}

/// A pipe (read end, write end), both close-on-exec.
#[allow(unsafe_code)]
fn pipe() -> io::Result<(File, File)> {
    let mut fds = [0; 2];
    // SAFETY: pipe2 writes two descriptors into the array it is given.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: both descriptors are new and owned here.
    Ok(unsafe { (File::from_raw_fd(fds[0]), File::from_raw_fd(fds[1])) })
}

/// A memfd for passt's stderr.
#[allow(unsafe_code)]
fn memfd(name: &std::ffi::CStr) -> io::Result<File> {
    // SAFETY: memfd_create reads the NUL-terminated name and returns a new
    // descriptor or -1; nothing else is touched.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a new descriptor this function owns.
    Ok(unsafe { File::from_raw_fd(fd) })
}

/// Starts `passt -f -q -F FD -P /dev/fd/N ARGS` and waits until it is
/// ready.
fn start(args: &[String]) -> Result<(UnixStream, u32), PasstError> {
    let (ours, theirs) = UnixStream::pair().map_err(io_err("socketpair"))?;
    let (mut ready_r, ready_w) = pipe().map_err(io_err("pipe"))?;
    // passt opens its PID file after dropping to nobody: let it reopen
    // the pipe through /dev/fd.
    ready_w
        .set_permissions(std::fs::Permissions::from_mode(0o622))
        .map_err(io_err("fchmod the readiness pipe"))?;
    let mut said = memfd(c"passt-stderr").map_err(io_err("memfd"))?;
    let (sock_fd, ready_fd) = (theirs.as_raw_fd(), ready_w.as_raw_fd());
    let mut cmd = Command::new(PASST);
    cmd.args(["-f", "-q", "-F", &sock_fd.to_string()])
        .args(["-P", &format!("/dev/fd/{ready_fd}")])
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(said.try_clone().map_err(io_err("dup the memfd"))?);
    // SAFETY: between fork and exec the closure only calls fcntl, which
    // is async-signal-safe, on two descriptors this function holds open.
    #[allow(unsafe_code)]
    unsafe {
        cmd.pre_exec(move || {
            for fd in [sock_fd, ready_fd] {
                if libc::fcntl(fd, libc::F_SETFD, 0) < 0 {
                    return Err(io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(PasstError::Missing),
        Err(e) => {
            return Err(PasstError::Io {
                what: "cannot start passt",
                source: e,
            })
        }
    };
    drop(theirs);
    drop(ready_w);
    let deadline = Instant::now() + READY_TIMEOUT;
    // One read: passt writes its PID and keeps the pipe open; the pipe
    // ends empty if passt exits first.
    let mut pid_text = [0u8; 32];
    let ready = wait_readable(ready_r.as_fd(), deadline).map_err(io_err("wait for passt"))?
        && ready_r.read(&mut pid_text).is_ok_and(|n| n > 0);
    if ready {
        log::debug!("passt {} ready", child.id());
        return Ok((ours, child.id()));
    }
    // It exited (the pipe closed empty) or hangs.
    let status = loop {
        match child.try_wait() {
            Ok(Some(s)) => break Some(s),
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(10)),
            _ => break None,
        }
    };
    let Some(status) = status else {
        let _ = child.kill();
        let _ = child.wait();
        return Err(PasstError::Timeout(READY_TIMEOUT));
    };
    let mut text = String::new();
    let _ = said.rewind();
    let _ = said.read_to_string(&mut text);
    Err(PasstError::Exited {
        status: status.to_string(),
        said: summary(&text),
    })
}

/// passt's messages on one line, without its complaints about syslog.
fn summary(text: &str) -> String {
    let lines: Vec<&str> = text
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with("Failed to send") && !l.contains("to syslog"))
        .collect();
    if lines.is_empty() {
        "(it printed nothing)".to_string()
    } else {
        lines.join("; ")
    }
}

/// Waits until `fd` is readable (data or end of file) or `deadline`;
/// false at the deadline.
fn wait_readable(fd: std::os::fd::BorrowedFd<'_>, deadline: Instant) -> io::Result<bool> {
    use nix_poll::poll_one;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Ok(false);
        }
        match poll_one(fd, left) {
            Ok(r) => return Ok(r),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
}

mod nix_poll {
    use std::io;
    use std::os::fd::{AsRawFd, BorrowedFd};
    use std::time::Duration;

    /// `poll` on one descriptor for readability.
    #[allow(unsafe_code)]
    pub fn poll_one(fd: BorrowedFd<'_>, timeout: Duration) -> io::Result<bool> {
        let mut p = libc::pollfd {
            fd: fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = i32::try_from(timeout.as_millis())
            .unwrap_or(i32::MAX)
            .max(1);
        // SAFETY: one pollfd, valid for the call.
        let n = unsafe { libc::poll(&mut p, 1, ms) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(n > 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn passt_messages_lose_the_syslog_noise() {
        let text = "Failed to send 47 bytes to syslog\nDon't run as root. Changing to nobody...\n\
                    Failed to bind any port for '-t 2222', exiting\n";
        assert_eq!(
            summary(text),
            "Don't run as root. Changing to nobody...; Failed to bind any port for '-t 2222', exiting"
        );
        assert_eq!(summary(""), "(it printed nothing)");
    }

    #[test]
    fn a_socket_nobody_listens_on_is_one_clear_error() {
        let user = UserNet {
            hostfwd: vec![],
            socket: Some("/nonexistent/passt.sock".into()),
        };
        let e = connect(&user).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("cannot connect to passt at /nonexistent/passt.sock"),
            "{e}"
        );
    }

    /// With Debian's passt installed: it starts, binds the forward, and a
    /// second one on the same port says why it cannot.
    #[test]
    fn passt_starts_and_a_taken_port_is_its_own_error() {
        if Command::new(PASST).arg("--version").output().is_err() {
            eprintln!("SKIPPED: passt is not installed (apt-get install passt)");
            return;
        }
        let probe = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = probe.local_addr().unwrap().port();
        drop(probe);
        let fwd = UserNet {
            hostfwd: vec![format!("tcp:127.0.0.1:{port}-:22")],
            socket: None,
        };
        let (sock, pid) = match connect(&fwd) {
            Ok(x) => x,
            Err(e) if e.to_string().contains("interface") => {
                eprintln!("SKIPPED: passt finds no usable host interface here: {e}");
                return;
            }
            Err(e) => panic!("{e}"),
        };
        assert!(pid.is_some());
        // The port is passt's now.
        assert!(std::net::TcpListener::bind(("127.0.0.1", port)).is_err());
        let e = connect(&fwd).unwrap_err();
        assert!(matches!(e, PasstError::Exited { .. }), "{e}");
        assert!(e.to_string().contains("Failed to bind"), "{e}");
        assert!(!e.to_string().contains("syslog"), "{e}");
        // Closing the socket ends passt.
        drop(sock);
        let gone = (0..200).any(|_| {
            std::thread::sleep(Duration::from_millis(10));
            std::net::TcpListener::bind(("127.0.0.1", port)).is_ok()
        });
        assert!(gone, "passt let go of port {port} when its socket closed");
    }
}
