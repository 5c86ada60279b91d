//! Where a migration goes: Cloud Hypervisor's URLs (`tcp:HOST:PORT`,
//! `unix:PATH`), a listener on the destination that accepts one source,
//! and the source's connection. A connection is one stream each way: the
//! migration stream forward, the replies back.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::time::Duration;

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
    /// Over a Unix socket.
    Unix(UnixStream),
}

impl Connection {
    /// A second handle on the same socket (one for each direction).
    pub fn try_clone(&self) -> std::io::Result<Connection> {
        Ok(match self {
            Connection::Tcp(s) => Connection::Tcp(s.try_clone()?),
            Connection::Unix(s) => Connection::Unix(s.try_clone()?),
        })
    }

    /// Ends the connection both ways: a read or write blocked on it (on
    /// any handle) returns at once. Used to cancel.
    pub fn shutdown(&self) -> std::io::Result<()> {
        match self {
            Connection::Tcp(s) => s.shutdown(std::net::Shutdown::Both),
            Connection::Unix(s) => s.shutdown(std::net::Shutdown::Both),
        }
    }

    /// Bounds every read (`None`: wait forever).
    pub fn set_read_timeout(&self, t: Option<Duration>) -> std::io::Result<()> {
        match self {
            Connection::Tcp(s) => s.set_read_timeout(t),
            Connection::Unix(s) => s.set_read_timeout(t),
        }
    }
}

impl Read for Connection {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Connection::Tcp(s) => s.read(buf),
            Connection::Unix(s) => s.read(buf),
        }
    }
}

impl Write for Connection {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            Connection::Tcp(s) => s.write(buf),
            Connection::Unix(s) => s.write(buf),
        }
    }
    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            Connection::Tcp(s) => s.flush(),
            Connection::Unix(s) => s.flush(),
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
            Listener::Unix(l, _) => Connection::Unix(l.accept().map_err(io)?.0),
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
        Url::Unix(p) => Connection::Unix(UnixStream::connect(p).map_err(io)?),
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
    fn nobody_listening_is_a_clear_error() {
        let e = connect(&"unix:/nonexistent/ember.sock".parse().unwrap()).unwrap_err();
        assert!(
            e.to_string()
                .starts_with("migration cannot connect to unix:/nonexistent/ember.sock"),
            "{e}"
        );
    }
}
