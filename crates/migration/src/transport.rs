//! Where a migration goes: Cloud Hypervisor's URLs (`tcp:HOST:PORT`,
//! `unix:PATH`), a listener on the destination that accepts one source,
//! and the source's connection. A connection is one stream each way: the
//! migration stream forward, the replies back.

use std::fs::File;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use vmm_sys_util::sock_ctrl_msg::ScmSocket;

/// Most file descriptors one read takes from a Unix socket.
pub const MAX_FDS: usize = 32;

/// The file descriptors a Unix connection has received, in order.
pub type FdStash = Arc<Mutex<Vec<File>>>;

/// A migration endpoint.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Url {
    /// `tcp:HOST:PORT`.
    Tcp(String),
    /// `unix:PATH`.
    Unix(PathBuf),
}

/// A bad URL, or a connection that cannot be made.
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// Not `tcp:HOST:PORT` or `unix:PATH`.
    #[error("migration URL {0:?}: expected tcp:HOST:PORT or unix:PATH")]
    Url(String),
    /// Listening, accepting or connecting failed.
    #[error("migration {what} {url}: {source}")]
    Io {
        /// What was being done.
        what: &'static str,
        /// Where.
        url: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

impl std::str::FromStr for Url {
    type Err = TransportError;
    fn from_str(s: &str) -> Result<Self, TransportError> {
        let bad = || TransportError::Url(s.to_string());
        if let Some(addr) = s.strip_prefix("tcp:") {
            let (host, port) = addr.rsplit_once(':').ok_or_else(bad)?;
            if host.is_empty() || port.parse::<u16>().is_err() {
                return Err(bad());
            }
            Ok(Url::Tcp(addr.to_string()))
        } else if let Some(path) = s.strip_prefix("unix:") {
            if path.is_empty() {
                return Err(bad());
            }
            Ok(Url::Unix(PathBuf::from(path)))
        } else {
            Err(bad())
        }
    }
}

impl std::fmt::Display for Url {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Url::Tcp(a) => write!(f, "tcp:{a}"),
            Url::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

/// One end of a migration connection.
#[derive(Debug)]
pub enum Connection {
    /// Over TCP.
    Tcp(TcpStream),
    /// Over a Unix socket: every read is a `recvmsg`, and the descriptors
    /// that come with the bytes are kept in the stash (shared by clones).
    Unix(UnixStream, FdStash),
}

impl Connection {
    /// A second handle on the same socket (one for each direction).
    pub fn try_clone(&self) -> std::io::Result<Connection> {
        Ok(match self {
            Connection::Tcp(s) => Connection::Tcp(s.try_clone()?),
            Connection::Unix(s, fds) => Connection::Unix(s.try_clone()?, fds.clone()),
        })
    }

    /// Sends `bytes`, the descriptors `fds` riding on the first of them
    /// (`SCM_RIGHTS`); a Unix socket only.
    pub fn send_with_fds(&mut self, bytes: &[u8], fds: &[RawFd]) -> std::io::Result<()> {
        let Connection::Unix(s, _) = self else {
            return Err(std::io::Error::new(
                std::io::ErrorKind::Unsupported,
                "file descriptors go over a Unix socket only",
            ));
        };
        if bytes.is_empty() {
            return Err(std::io::Error::from(std::io::ErrorKind::InvalidInput));
        }
        let sent = s
            .send_with_fds(&[bytes], fds)
            .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))?;
        s.write_all(&bytes[sent..])
    }

    /// Takes the descriptors received so far.
    pub fn take_fds(&self) -> Vec<File> {
        match self {
            Connection::Tcp(_) => Vec::new(),
            Connection::Unix(_, fds) => {
                std::mem::take(&mut *fds.lock().unwrap_or_else(|e| e.into_inner()))
            }
        }
    }

    /// Whether descriptors can travel on this connection.
    pub fn is_unix(&self) -> bool {
        matches!(self, Connection::Unix(..))
    }

    /// Ends the connection both ways: a read or write blocked on it (on
    /// any handle) returns at once. Used to cancel.
    pub fn shutdown(&self) -> std::io::Result<()> {
        match self {
            Connection::Tcp(s) => s.shutdown(std::net::Shutdown::Both),
            Connection::Unix(s, _) => s.shutdown(std::net::Shutdown::Both),
        }
    }

    /// Caps the socket's send buffer at `bytes` (post-copy: a page the
    /// guest waits for must not queue behind megabytes of background
    /// pages).
    pub fn set_send_buffer(&self, bytes: usize) -> std::io::Result<()> {
        let v = libc::c_int::try_from(bytes).unwrap_or(libc::c_int::MAX);
        // SAFETY: setsockopt reads an int from `v`, which outlives the call;
        // the descriptor is this connection's socket.
        let rc = unsafe {
            libc::setsockopt(
                self.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_SNDBUF,
                std::ptr::addr_of!(v).cast(),
                libc::socklen_t::try_from(std::mem::size_of::<libc::c_int>()).unwrap_or(4),
            )
        };
        if rc < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }

    /// Waits up to `timeout_ms` (0: just look, -1: forever) for bytes to
    /// read (or the peer's end); true if a read would not block. Reads
    /// are not buffered here, so this sees every byte not read yet.
    pub fn wait_readable(&self, timeout_ms: i32) -> std::io::Result<bool> {
        let mut fd = libc::pollfd {
            fd: self.as_raw_fd(),
            events: libc::POLLIN | libc::POLLRDHUP,
            revents: 0,
        };
        // SAFETY: one valid pollfd that outlives the call, count 1.
        let n = unsafe { libc::poll(&mut fd, 1, timeout_ms) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            return if e.kind() == std::io::ErrorKind::Interrupted {
                Ok(false)
            } else {
                Err(e)
            };
        }
        Ok(n > 0)
    }

    /// Bounds every read (`None`: wait forever).
    pub fn set_read_timeout(&self, t: Option<Duration>) -> std::io::Result<()> {
        match self {
            Connection::Tcp(s) => s.set_read_timeout(t),
            Connection::Unix(s, _) => s.set_read_timeout(t),
        }
    }
}

impl AsRawFd for Connection {
    fn as_raw_fd(&self) -> RawFd {
        match self {
            Connection::Tcp(s) => s.as_raw_fd(),
            Connection::Unix(s, _) => s.as_raw_fd(),
        }
    }
}

impl Read for Connection {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Connection::Tcp(s) => s.read(buf),
            Connection::Unix(s, stash) => {
                let mut fds = [-1 as RawFd; MAX_FDS];
                let mut iov = [libc::iovec {
                    iov_base: buf.as_mut_ptr().cast(),
                    iov_len: buf.len(),
                }];
                // SAFETY: the iovec points into `buf`, borrowed mutably for
                // the call, and the kernel writes at most its length.
                let (n, nfds) = unsafe { s.recv_with_fds(&mut iov, &mut fds) }
                    .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))?;
                let mut stash = stash.lock().unwrap_or_else(|e| e.into_inner());
                for &fd in &fds[..nfds.min(MAX_FDS)] {
                    // SAFETY: recvmsg gave us these descriptors; nothing
                    // else owns them.
                    stash.push(unsafe { File::from_raw_fd(fd) });
                }
                Ok(n)
            }
        }
    }
}

impl Write for Connection {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            Connection::Tcp(s) => s.write(buf),
            Connection::Unix(s, _) => s.write(buf),
        }
    }
    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            Connection::Tcp(s) => s.flush(),
            Connection::Unix(s, _) => s.flush(),
        }
    }
}

/// The destination's listener.
#[derive(Debug)]
pub enum Listener {
    /// TCP.
    Tcp(TcpListener),
    /// A Unix socket (its file is removed when the listener is dropped).
    Unix(UnixListener, PathBuf),
}

impl Listener {
    /// Listens at `url`. A Unix socket file that already exists is an
    /// error, not replaced: it may be another destination's.
    pub fn bind(url: &Url) -> Result<Self, TransportError> {
        let io = |source| TransportError::Io {
            what: "cannot listen on",
            url: url.to_string(),
            source,
        };
        Ok(match url {
            Url::Tcp(a) => Listener::Tcp(TcpListener::bind(a).map_err(io)?),
            Url::Unix(p) => Listener::Unix(UnixListener::bind(p).map_err(io)?, p.clone()),
        })
    }

    /// Waits for the source.
    /// Waits for a source, or until `stop` (a signalfd, an eventfd) is
    /// readable: `None` then.
    pub fn accept_unless(&self, stop: RawFd) -> Result<Option<Connection>, TransportError> {
        let fd = match self {
            Listener::Tcp(l) => l.as_raw_fd(),
            Listener::Unix(l, _) => l.as_raw_fd(),
        };
        loop {
            let mut fds = [
                libc::pollfd {
                    fd,
                    events: libc::POLLIN,
                    revents: 0,
                },
                libc::pollfd {
                    fd: stop,
                    events: libc::POLLIN,
                    revents: 0,
                },
            ];
            // SAFETY: two valid pollfds that outlive the call, count 2.
            let n = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
            if n < 0 {
                let e = std::io::Error::last_os_error();
                if e.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(TransportError::Io {
                    what: "cannot wait on",
                    url: self.url(),
                    source: e,
                });
            }
            if fds[1].revents != 0 {
                return Ok(None);
            }
            if fds[0].revents != 0 {
                return self.accept().map(Some);
            }
        }
    }

    /// Waits for a source.
    pub fn accept(&self) -> Result<Connection, TransportError> {
        let io = |source| TransportError::Io {
            what: "cannot accept on",
            url: self.url(),
            source,
        };
        Ok(match self {
            Listener::Tcp(l) => {
                let (s, _) = l.accept().map_err(io)?;
                s.set_nodelay(true).map_err(io)?;
                Connection::Tcp(s)
            }
            Listener::Unix(l, _) => Connection::Unix(l.accept().map_err(io)?.0, FdStash::default()),
        })
    }

    /// Where it listens (a TCP port chosen by the system included).
    pub fn url(&self) -> String {
        match self {
            Listener::Tcp(l) => l
                .local_addr()
                .map_or_else(|_| "tcp:?".into(), |a| format!("tcp:{a}")),
            Listener::Unix(_, p) => format!("unix:{}", p.display()),
        }
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let Listener::Unix(_, p) = self {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// Connects to a destination.
pub fn connect(url: &Url) -> Result<Connection, TransportError> {
    let io = |source| TransportError::Io {
        what: "cannot connect to",
        url: url.to_string(),
        source,
    };
    Ok(match url {
        Url::Tcp(a) => {
            let s = TcpStream::connect(a).map_err(io)?;
            s.set_nodelay(true).map_err(io)?;
            Connection::Tcp(s)
        }
        Url::Unix(p) => Connection::Unix(UnixStream::connect(p).map_err(io)?, FdStash::default()),
    })
}

#[cfg(test)]
mod tests {
    use std::io::BufWriter;

    use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

    use super::*;
    use crate::memory::{apply, send_memory, Round};
    use crate::{read_reply, write_reply, Event, Receiver, Reply, Writer};

    #[test]
    fn urls_parse_as_cloud_hypervisors() {
        assert_eq!(
            "tcp:10.0.0.2:6000".parse::<Url>().unwrap(),
            Url::Tcp("10.0.0.2:6000".into())
        );
        assert_eq!(
            "tcp:[::1]:6000".parse::<Url>().unwrap(),
            Url::Tcp("[::1]:6000".into())
        );
        assert_eq!(
            "unix:/run/mig.sock".parse::<Url>().unwrap(),
            Url::Unix("/run/mig.sock".into())
        );
        for bad in [
            "tcp:host",
            "tcp::80",
            "tcp:h:99999",
            "unix:",
            "http://x",
            "",
        ] {
            let e = bad.parse::<Url>().unwrap_err();
            assert!(
                e.to_string()
                    .contains("expected tcp:HOST:PORT or unix:PATH"),
                "{bad}"
            );
        }
    }

    /// A whole exchange over a real socket: the destination refuses or
    /// accepts the start, the memory arrives, the reply says done.
    fn exchange(url: Url, listener: Listener) {
        let dst_mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 4 << 20)]).unwrap();
        let dest = std::thread::spawn(move || {
            let conn = listener.accept().unwrap();
            let mut back = conn.try_clone().unwrap();
            let mut r = Receiver::new(conn).unwrap();
            let Event::Start(start) = r.next().unwrap() else {
                panic!("no start")
            };
            assert_eq!(start, b"cpu");
            write_reply(&mut back, &Reply::Ready).unwrap();
            loop {
                match r.next().unwrap() {
                    Event::End => break,
                    e => {
                        apply(&dst_mem, &e).unwrap();
                    }
                }
            }
            write_reply(&mut back, &Reply::Done).unwrap();
            dst_mem
        });
        let src = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 4 << 20)]).unwrap();
        for p in 0..1024u64 {
            src.write_obj(p * 7 + 1, GuestAddress(p * 4096)).unwrap();
        }
        let conn = connect(&url).unwrap();
        let mut back = conn.try_clone().unwrap();
        let mut w = Writer::new(BufWriter::new(conn)).unwrap();
        w.start(b"cpu").unwrap();
        w.flush().unwrap();
        assert_eq!(read_reply(&mut back).unwrap(), Reply::Ready);
        let stats = send_memory(&mut w, &src, 0, Round::All).unwrap();
        assert_eq!(stats.pages, 1024);
        w.state(b"{}").unwrap();
        w.end().unwrap();
        assert_eq!(read_reply(&mut back).unwrap(), Reply::Done);
        let dst = dest.join().unwrap();
        for p in 0..1024u64 {
            assert_eq!(
                dst.read_obj::<u64>(GuestAddress(p * 4096)).unwrap(),
                p * 7 + 1
            );
        }
    }

    #[test]
    fn a_stream_crosses_a_unix_socket_and_tcp() {
        let dir = std::env::temp_dir().join(format!("ember-mig-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("m.sock");
        let url: Url = format!("unix:{}", path.display()).parse().unwrap();
        let l = Listener::bind(&url).unwrap();
        // A second destination on the same path is refused.
        assert!(Listener::bind(&url)
            .unwrap_err()
            .to_string()
            .contains("cannot listen on unix:"));
        exchange(url, l);
        assert!(!path.exists(), "the socket file went with the listener");
        let l = Listener::bind(&"tcp:127.0.0.1:0".parse().unwrap()).unwrap();
        let url: Url = l.url().parse().unwrap();
        exchange(url, l);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn descriptors_ride_on_frames_through_a_buffered_receiver() {
        use std::io::{BufReader, Seek};
        use std::os::fd::AsRawFd;
        let dir = std::env::temp_dir().join(format!("ember-migfd-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let url: Url = format!("unix:{}", dir.join("f.sock").display())
            .parse()
            .unwrap();
        let l = Listener::bind(&url).unwrap();
        let dest = std::thread::spawn(move || {
            let conn = l.accept().unwrap();
            let probe = conn.try_clone().unwrap();
            let mut r = Receiver::new(BufReader::new(conn)).unwrap();
            assert!(matches!(r.next().unwrap(), Event::Start(_)));
            assert_eq!(r.next().unwrap(), Event::MemoryFd(b"layout".to_vec()));
            let mut mem = probe.take_fds();
            assert_eq!(mem.len(), 1, "the memory's descriptor came with its frame");
            assert!(matches!(r.next().unwrap(), Event::State(_)));
            assert_eq!(r.next().unwrap(), Event::End);
            assert_eq!(r.next().unwrap(), Event::Release);
            let taps = probe.take_fds();
            let mut text = String::new();
            mem[0].rewind().unwrap();
            mem[0].read_to_string(&mut text).unwrap();
            (text, taps.len())
        });
        let mut file = tempfile_with(b"guest memory");
        let mut conn = connect(&url).unwrap();
        let mut w = Writer::new(conn.try_clone().unwrap()).unwrap();
        w.start(b"hello").unwrap();
        let frame = crate::frame_bytes(crate::Kind::MemoryFd, b"layout").unwrap();
        conn.send_with_fds(&frame, &[file.as_raw_fd()]).unwrap();
        w.state(b"{}").unwrap();
        w.end().unwrap();
        let release = crate::frame_bytes(crate::Kind::Release, &[]).unwrap();
        let (a, b) = (tempfile_with(b"a"), tempfile_with(b"b"));
        conn.send_with_fds(&release, &[a.as_raw_fd(), b.as_raw_fd()])
            .unwrap();
        let (text, taps) = dest.join().unwrap();
        assert_eq!((text.as_str(), taps), ("guest memory", 2));
        // A TCP connection carries no descriptors.
        let l = Listener::bind(&"tcp:127.0.0.1:0".parse().unwrap()).unwrap();
        let mut tcp = connect(&l.url().parse().unwrap()).unwrap();
        assert!(!tcp.is_unix());
        let e = tcp.send_with_fds(b"x", &[file.as_raw_fd()]).unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::Unsupported);
        file.flush().unwrap();
        let _ = std::fs::remove_dir_all(&dir);
    }

    fn tempfile_with(bytes: &[u8]) -> File {
        let mut f = vmm_sys_util::tempfile::TempFile::new().unwrap().into_file();
        f.write_all(bytes).unwrap();
        f
    }

    #[test]
    fn nobody_listening_is_a_clear_error() {
        let e = connect(&"unix:/nonexistent/ember.sock".parse().unwrap()).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("migration cannot connect to unix:/nonexistent/ember.sock"),
            "{e}"
        );
    }
}
