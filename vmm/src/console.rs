//! Where the guest's console goes: `--serial stdio|null|file=PATH|socket=PATH`.
//!
//! `stdio` (the default) is the terminal or the pipes ember was started
//! with; `null` drops the output and gives no input; `file=PATH` appends the
//! output to a file (created `0600`); `socket=PATH` listens on a Unix socket
//! there, as a daemon's console must: one client at a time gets the output
//! and types the input (a new client takes over from the one before), and
//! what the guest prints while no client is connected, or faster than the
//! client reads, waits in a 64 KiB buffer (the oldest bytes go first) and
//! goes out with the next output or to the next client, so a client that
//! connects late still sees the end of the boot log. The guest never waits
//! for a client.

use std::collections::VecDeque;
use std::fmt;
use std::fs::File;
use std::io::{ErrorKind, Write};
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::{Arc, Mutex};

use std::os::fd::AsFd;

use crate::devices::ConsoleOut;
use crate::Error;

/// The most console output kept for a socket client that is not there or
/// not reading.
pub const BACKLOG: usize = 64 << 10;

/// Where the console goes.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub enum SerialSpec {
    /// ember's stdin and stdout.
    #[default]
    Stdio,
    /// Nowhere: output dropped, no input.
    Null,
    /// Output appended to this file; no input.
    File(PathBuf),
    /// A Unix socket listening here.
    Socket(PathBuf),
}

impl FromStr for SerialSpec {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let path = |p: &str, key: &str| {
            if p.is_empty() {
                Err(format!("--serial {key}= needs a path"))
            } else {
                Ok(PathBuf::from(p))
            }
        };
        match s {
            "stdio" => Ok(SerialSpec::Stdio),
            "null" | "off" => Ok(SerialSpec::Null),
            _ => match s.split_once('=') {
                Some(("file", p)) => Ok(SerialSpec::File(path(p, "file")?)),
                Some(("socket", p)) => Ok(SerialSpec::Socket(path(p, "socket")?)),
                _ => Err(format!(
                    "--serial must be stdio, null, file=PATH or socket=PATH, not `{s}`"
                )),
            },
        }
    }
}

impl fmt::Display for SerialSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SerialSpec::Stdio => f.write_str("stdio"),
            SerialSpec::Null => f.write_str("null"),
            SerialSpec::File(p) => write!(f, "file={}", p.display()),
            SerialSpec::Socket(p) => write!(f, "socket={}", p.display()),
        }
    }
}

/// The output side shared by the UART (a vCPU thread writes) and the event
/// loop (which accepts clients).
#[derive(Debug, Default)]
struct Shared {
    /// The client's socket as a file: write(2), which the vCPU threads'
    /// filter allows (a socket's send(2) is not; ember ignores SIGPIPE, so
    /// a client gone is an EPIPE error).
    client: Option<File>,
    backlog: VecDeque<u8>,
    dropped: u64,
}

impl Shared {
    /// Queues `data` and sends as much of the queue as the client takes.
    fn send(&mut self, data: &[u8]) {
        self.backlog.extend(data);
        let over = self.backlog.len().saturating_sub(BACKLOG);
        if over > 0 {
            self.backlog.drain(..over);
            self.dropped += over as u64;
        }
        self.pump();
    }

    fn pump(&mut self) {
        while let Some(client) = self.client.as_mut() {
            let (head, _) = self.backlog.as_slices();
            if head.is_empty() {
                return;
            }
            match client.write(head) {
                Ok(0) => self.client = None,
                Ok(n) => {
                    self.backlog.drain(..n);
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => {
                    log::info!("console: the socket client went away ({e})");
                    self.client = None;
                }
            }
        }
    }
}

/// The UART's output on a socket console.
#[derive(Debug)]
pub struct SocketOut(Arc<Mutex<Shared>>);

impl Write for SocketOut {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).send(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A socket console's listener, for the event loop; the socket file is
/// removed when it is dropped.
pub struct SocketConsole {
    listener: UnixListener,
    path: PathBuf,
    shared: Arc<Mutex<Shared>>,
}

impl fmt::Debug for SocketConsole {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SocketConsole")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

impl SocketConsole {
    /// Listens on `path` (which must not exist) and returns the listener
    /// and the UART's output.
    pub fn bind(path: &Path) -> Result<(Self, SocketOut), String> {
        if std::fs::symlink_metadata(path).is_ok() {
            return Err(format!(
                "--serial socket={}: the path exists (remove it, or choose another)",
                path.display()
            ));
        }
        let listener = UnixListener::bind(path)
            .map_err(|e| format!("--serial socket={}: cannot listen: {e}", path.display()))?;
        let nonblocking = listener.set_nonblocking(true);
        if let Err(e) = nonblocking {
            let _ = std::fs::remove_file(path);
            return Err(format!("--serial socket={}: {e}", path.display()));
        }
        let shared = Arc::new(Mutex::new(Shared::default()));
        Ok((
            SocketConsole {
                listener,
                path: path.to_path_buf(),
                shared: shared.clone(),
            },
            SocketOut(shared),
        ))
    }

    /// The listener (the event loop watches it).
    pub fn listener(&self) -> &UnixListener {
        &self.listener
    }

    /// Takes the clients waiting to connect; the last one becomes the
    /// console's client (earlier ones are closed) and is returned as the
    /// console's input, the backlog sent to it first.
    pub fn accept(&self) -> Option<File> {
        let mut newest = None;
        loop {
            match self.listener.accept() {
                Ok((stream, _)) => newest = Some(stream),
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) => {
                    log::warn!("console: cannot accept a client: {e}");
                    break;
                }
            }
        }
        let stream = newest?;
        if let Err(e) = stream.set_nonblocking(true) {
            log::warn!("console: a client's socket cannot be made nonblocking: {e}");
            return None;
        }
        let output = match stream.try_clone() {
            Ok(s) => File::from(std::os::fd::OwnedFd::from(s)),
            Err(e) => {
                log::warn!("console: cannot keep a client's socket: {e}");
                return None;
            }
        };
        let mut shared = self.shared.lock().unwrap_or_else(|e| e.into_inner());
        if shared.client.is_some() {
            log::info!("console: a new client on the socket takes over from the previous one");
        }
        if shared.dropped > 0 {
            log::info!(
                "console: {} bytes of output were dropped while no client read them",
                shared.dropped
            );
            shared.dropped = 0;
        }
        shared.client = Some(output);
        shared.pump();
        Some(File::from(std::os::fd::OwnedFd::from(stream)))
    }

    /// The client went away (its input ended): output waits in the backlog.
    pub fn disconnect(&self) {
        self.shared.lock().unwrap_or_else(|e| e.into_inner()).client = None;
    }
}

impl Drop for SocketConsole {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// The console: where the guest's serial output goes and where its input
/// comes from.
pub struct Console {
    /// Serial output.
    pub output: ConsoleOut,
    /// Serial input, if any.
    pub input: Option<File>,
    /// A socket console's listener (`--serial socket=PATH`): its clients
    /// give the input.
    pub socket: Option<SocketConsole>,
}

impl std::fmt::Debug for Console {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Console")
            .field("input", &self.input)
            .finish_non_exhaustive()
    }
}

impl Console {
    /// stdout and stdin.
    pub fn stdio() -> crate::Result<Self> {
        let input = std::io::stdin()
            .as_fd()
            .try_clone_to_owned()
            .map_err(Error::Console)?;
        Ok(Console {
            output: Box::new(std::io::stdout()),
            input: Some(File::from(input)),
            socket: None,
        })
    }

    /// The console `spec` names (`--serial`).
    pub fn open(spec: &SerialSpec) -> crate::Result<Self> {
        match spec {
            SerialSpec::Stdio => Self::stdio(),
            SerialSpec::Null => Ok(Console {
                output: Box::new(std::io::sink()),
                input: None,
                socket: None,
            }),
            SerialSpec::File(path) => {
                use std::os::unix::fs::OpenOptionsExt;
                let file = std::fs::OpenOptions::new()
                    .append(true)
                    .create(true)
                    .mode(0o600)
                    .open(path)
                    .map_err(|e| Error::Serial(format!("--serial file={}: {e}", path.display())))?;
                Ok(Console {
                    output: Box::new(file),
                    input: None,
                    socket: None,
                })
            }
            SerialSpec::Socket(path) => {
                let (socket, output) = SocketConsole::bind(path).map_err(Error::Serial)?;
                Ok(Console {
                    output: Box::new(output),
                    input: None,
                    socket: Some(socket),
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::os::unix::net::UnixStream;

    #[test]
    fn specs_parse_and_print_back() {
        for (text, spec) in [
            ("stdio", SerialSpec::Stdio),
            ("null", SerialSpec::Null),
            ("file=/tmp/c.log", SerialSpec::File("/tmp/c.log".into())),
            (
                "socket=/run/c.sock",
                SerialSpec::Socket("/run/c.sock".into()),
            ),
        ] {
            assert_eq!(text.parse::<SerialSpec>().unwrap(), spec);
            assert_eq!(spec.to_string(), text);
        }
        assert_eq!("off".parse::<SerialSpec>().unwrap(), SerialSpec::Null);
        for bad in ["", "tty", "file=", "socket=", "pipe=/x"] {
            let e = bad.parse::<SerialSpec>().unwrap_err();
            assert!(e.starts_with("--serial"), "{bad}: {e}");
        }
    }

    #[test]
    fn a_socket_client_gets_the_backlog_then_the_output_and_a_new_one_takes_over() {
        let dir = std::env::temp_dir().join(format!("ember-console-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("c.sock");
        let _ = std::fs::remove_file(&path);
        let (console, mut out) = SocketConsole::bind(&path).unwrap();
        assert!(
            SocketConsole::bind(&path)
                .unwrap_err()
                .contains("the path exists"),
            "a second console on the same path"
        );
        // Before any client: kept, at most BACKLOG bytes, the newest.
        out.write_all(&vec![b'x'; BACKLOG]).unwrap();
        out.write_all(b"boot log end\n").unwrap();
        assert!(console.accept().is_none(), "no client yet");
        let mut first = UnixStream::connect(&path).unwrap();
        let mut input = console.accept().expect("the client is taken");
        let mut got = vec![0u8; BACKLOG];
        first.read_exact(&mut got).unwrap();
        assert!(got.ends_with(b"boot log end\n"), "the backlog's end");
        assert_eq!(got.iter().filter(|&&b| b == b'x').count(), BACKLOG - 13);
        out.write_all(b"live\n").unwrap();
        let mut live = [0u8; 5];
        first.read_exact(&mut live).unwrap();
        assert_eq!(&live, b"live\n");
        // What the client types is the console's input.
        first.write_all(b"ls\n").unwrap();
        let mut typed = [0u8; 3];
        input.read_exact(&mut typed).unwrap();
        assert_eq!(&typed, b"ls\n");
        // A second client takes over: the first one's output stops.
        let mut second = UnixStream::connect(&path).unwrap();
        let _input2 = console.accept().expect("the new client");
        // The event loop drops the old client's input when it takes the new.
        drop(input);
        out.write_all(b"to second\n").unwrap();
        let mut buf = [0u8; 10];
        second.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"to second\n");
        first.set_nonblocking(true).unwrap();
        let mut rest = Vec::new();
        assert!(
            matches!(first.read_to_end(&mut rest), Ok(0)),
            "the first client is closed: {rest:?}"
        );
        // A client that does not read: the guest never waits.
        let start = std::time::Instant::now();
        for _ in 0..64 {
            out.write_all(&[b'y'; 16 << 10]).unwrap();
        }
        assert!(start.elapsed() < std::time::Duration::from_secs(5));
        drop(console);
        assert!(!path.exists(), "the socket file goes with the console");
        let _ = std::fs::remove_dir_all(&dir);
    }
}
