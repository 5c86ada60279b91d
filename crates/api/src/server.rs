//! The API server: HTTP/1.1 on a Unix socket, one thread, nonblocking
//! sockets and epoll, so a slow or half-sent request never holds up
//! another client. Requests are answered in order per connection
//! (pipelining works); connections are kept alive unless the client says
//! otherwise.

use std::collections::BTreeMap;
use std::io::{ErrorKind, Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use crate::http::{parse_message, Parsed, MAX_HEAD};
use crate::request::Request;
use crate::response::Response;
use crate::{Error, Result};

/// The largest request body (Firecracker's limit).
pub const MAX_BODY: usize = 51200;
/// The most connections served at once; one more is told so and closed.
pub const MAX_CONNECTIONS: usize = 64;
/// A request that stays half-sent this long has its connection closed.
pub const PARTIAL_REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// A client that leaves this much of its answers unread is closed.
pub const MAX_PENDING_OUTPUT: usize = 1 << 20;
/// The most bytes kept from a client before they make up a request.
const MAX_INPUT: usize = MAX_HEAD + MAX_BODY + 64 * 1024;

const LISTENER: u64 = 0;
const STOP: u64 = 1;
const FIRST_CONNECTION: u64 = 2;

/// One client.
struct Connection {
    stream: UnixStream,
    input: Vec<u8>,
    output: Vec<u8>,
    /// No more requests are read: the last answer ends the connection.
    closing: bool,
    /// Waiting for room to write (EPOLLOUT registered).
    writing: bool,
    /// When the unanswered bytes in `input` started arriving.
    partial_since: Option<Instant>,
}

/// What the server has seen, readable from any thread (for metrics).
#[derive(Debug, Default)]
pub struct ServerStats {
    /// Requests received (valid or not).
    pub requests: AtomicU64,
    /// Requests refused before reaching the handler (malformed HTTP or
    /// body, unknown or unsupported endpoint).
    pub bad_requests: AtomicU64,
    /// Connections accepted.
    pub connections: AtomicU64,
    /// Connections refused for being one too many.
    pub refused_connections: AtomicU64,
}

impl ServerStats {
    fn count(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }
}

/// Serves Firecracker's API on one Unix socket.
#[derive(Debug)]
pub struct Server {
    listener: UnixListener,
    path: PathBuf,
    stats: Arc<ServerStats>,
    // Made with the socket, so the thread that serves needs no
    // `epoll_create1` (its seccomp filter can leave it out).
    epoll: Epoll,
}

fn io_err(path: &Path) -> impl Fn(std::io::Error) -> Error + '_ {
    move |source| Error::Socket {
        path: path.to_owned(),
        source,
    }
}

/// Removes a stale socket file at `path`; refuses a live one or anything
/// that is not a socket.
fn clear_path(path: &Path) -> Result<()> {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io_err(path)(e)),
    };
    if !meta.file_type().is_socket() {
        return Err(Error::NotASocket(path.to_owned()));
    }
    match UnixStream::connect(path) {
        Ok(_) => Err(Error::InUse(path.to_owned())),
        Err(_) => {
            log::info!("api: replacing the stale socket {}", path.display());
            std::fs::remove_file(path).map_err(io_err(path))
        }
    }
}

impl Server {
    /// Creates the socket at `path` with mode 0600 (a stale socket file is
    /// replaced; a live one is an error). Call it before starting threads:
    /// the umask is narrowed while the socket is made.
    pub fn bind(path: &Path) -> Result<Server> {
        clear_path(path)?;
        // SAFETY: umask only swaps the process's file-mode mask.
        let old = unsafe { libc::umask(0o177) };
        let bound = UnixListener::bind(path);
        // SAFETY: as above, restoring the previous mask.
        unsafe { libc::umask(old) };
        let listener = bound.map_err(io_err(path))?;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
            .map_err(io_err(path))?;
        listener.set_nonblocking(true).map_err(io_err(path))?;
        let epoll = Epoll::new().map_err(Error::Epoll)?;
        Ok(Server {
            listener,
            path: path.to_owned(),
            stats: Arc::default(),
            epoll,
        })
    }

    /// The socket's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The server's counters.
    pub fn stats(&self) -> Arc<ServerStats> {
        self.stats.clone()
    }

    /// Serves until `stop` is written. Each valid request is passed to
    /// `handler`, whose answer is sent; an invalid one gets its 400 without
    /// reaching it.
    pub fn run(
        &mut self,
        handler: &mut dyn FnMut(Request) -> Response,
        stop: &EventFd,
    ) -> Result<()> {
        let epoll = &self.epoll;
        let add = |fd: i32, token: u64| {
            epoll
                .ctl(
                    ControlOperation::Add,
                    fd,
                    EpollEvent::new(EventSet::IN, token),
                )
                .map_err(Error::Epoll)
        };
        add(self.listener.as_raw_fd(), LISTENER)?;
        add(stop.as_raw_fd(), STOP)?;
        let mut conns: BTreeMap<u64, Connection> = BTreeMap::new();
        let mut next = FIRST_CONNECTION;
        let mut events = vec![EpollEvent::default(); 64];
        loop {
            let n = match epoll.wait(1000, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => return Err(Error::Epoll(e)),
            };
            for ev in &events[..n] {
                match ev.data() {
                    STOP => return Ok(()),
                    LISTENER => self.accept(epoll, &mut conns, &mut next),
                    token => {
                        let Some(conn) = conns.get_mut(&token) else {
                            continue;
                        };
                        let keep = serve(conn, ev.event_set(), handler, &self.stats)
                            && update_interest(epoll, token, conn);
                        if !keep {
                            drop_connection(epoll, &mut conns, token);
                        }
                    }
                }
            }
            // Half-sent requests do not hold a connection forever.
            let stale: Vec<u64> = conns
                .iter()
                .filter(|(_, c)| {
                    c.partial_since
                        .is_some_and(|t| t.elapsed() > PARTIAL_REQUEST_TIMEOUT)
                })
                .map(|(t, _)| *t)
                .collect();
            for token in stale {
                log::info!("api: closing a connection whose request stayed incomplete");
                drop_connection(epoll, &mut conns, token);
            }
        }
    }

    fn accept(&self, epoll: &Epoll, conns: &mut BTreeMap<u64, Connection>, next: &mut u64) {
        loop {
            let stream = match self.listener.accept() {
                Ok((s, _)) => s,
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => {
                    log::warn!("api: accept: {e}");
                    return;
                }
            };
            if stream.set_nonblocking(true).is_err() {
                continue;
            }
            if conns.len() >= MAX_CONNECTIONS {
                ServerStats::count(&self.stats.refused_connections);
                let busy = Response::fault(
                    503,
                    &format!("too many connections (at most {MAX_CONNECTIONS}); try again"),
                );
                let _ = (&stream).write(&busy.to_http_bytes(false));
                continue;
            }
            ServerStats::count(&self.stats.connections);
            let token = *next;
            *next += 1;
            let registered = epoll.ctl(
                ControlOperation::Add,
                stream.as_raw_fd(),
                EpollEvent::new(EventSet::IN | EventSet::READ_HANG_UP, token),
            );
            if let Err(e) = registered {
                log::warn!("api: cannot watch a connection: {e}");
                continue;
            }
            conns.insert(
                token,
                Connection {
                    stream,
                    input: Vec::new(),
                    output: Vec::new(),
                    closing: false,
                    writing: false,
                    partial_since: None,
                },
            );
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Reads what the client sent, answers every whole request, and writes
/// what fits. Returns whether the connection stays open.
fn serve(
    conn: &mut Connection,
    events: EventSet,
    handler: &mut dyn FnMut(Request) -> Response,
    stats: &ServerStats,
) -> bool {
    let mut eof = false;
    if events.intersects(EventSet::IN | EventSet::READ_HANG_UP | EventSet::HANG_UP) && !conn.closing
    {
        let mut buf = [0u8; 16 * 1024];
        loop {
            match conn.stream.read(&mut buf) {
                Ok(0) => {
                    eof = true;
                    break;
                }
                Ok(n) => {
                    conn.input.extend_from_slice(&buf[..n]);
                    if conn.input.len() > MAX_INPUT {
                        break;
                    }
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(_) => return false,
            }
        }
    }
    answer(conn, handler, stats);
    if !flush(conn) {
        return false;
    }
    if conn.output.len() > MAX_PENDING_OUTPUT {
        log::info!("api: closing a client that does not read its answers");
        return false;
    }
    // The client is gone (or ends the connection) once the answers are out.
    !((eof || conn.closing) && conn.output.is_empty())
}

/// Answers every whole request in the input, in order.
fn answer(
    conn: &mut Connection,
    handler: &mut dyn FnMut(Request) -> Response,
    stats: &ServerStats,
) {
    while !conn.closing && !conn.input.is_empty() {
        match parse_message(&conn.input, MAX_BODY) {
            Parsed::Incomplete => {
                if conn.input.len() > MAX_INPUT {
                    ServerStats::count(&stats.requests);
                    ServerStats::count(&stats.bad_requests);
                    let r = Response::fault(400, "request too large");
                    conn.output.extend(r.to_http_bytes(false));
                    conn.closing = true;
                    conn.input.clear();
                } else if conn.partial_since.is_none() {
                    conn.partial_since = Some(Instant::now());
                }
                break;
            }
            Parsed::Invalid {
                status,
                message,
                close,
            } => {
                ServerStats::count(&stats.requests);
                ServerStats::count(&stats.bad_requests);
                conn.output
                    .extend(Response::fault(status, &message).to_http_bytes(!close));
                conn.input.clear();
                conn.closing |= close;
                conn.partial_since = None;
            }
            Parsed::Complete {
                method,
                path,
                body,
                keep_alive,
                consumed,
            } => {
                conn.input.drain(..consumed);
                conn.partial_since = None;
                ServerStats::count(&stats.requests);
                let response = match Request::parse(&method, &path, &body) {
                    Ok(request) => handler(request),
                    Err(e) => {
                        ServerStats::count(&stats.bad_requests);
                        Response::fault(e.status(), &e.to_string())
                    }
                };
                conn.output.extend(response.to_http_bytes(keep_alive));
                if !keep_alive {
                    conn.closing = true;
                }
            }
        }
    }
}

/// Writes what the socket takes. Returns false if the client is gone.
fn flush(conn: &mut Connection) -> bool {
    while !conn.output.is_empty() {
        match conn.stream.write(&conn.output) {
            Ok(0) => return false,
            Ok(n) => {
                conn.output.drain(..n);
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => break,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(_) => return false,
        }
    }
    true
}

/// Watches for room to write while answers are pending, for input
/// otherwise.
fn update_interest(epoll: &Epoll, token: u64, conn: &mut Connection) -> bool {
    let want_out = !conn.output.is_empty();
    if want_out == conn.writing {
        return true;
    }
    let mut set = EventSet::READ_HANG_UP;
    set |= if want_out {
        EventSet::OUT
    } else {
        EventSet::IN
    };
    conn.writing = want_out;
    epoll
        .ctl(
            ControlOperation::Modify,
            conn.stream.as_raw_fd(),
            EpollEvent::new(set, token),
        )
        .is_ok()
}

fn drop_connection(epoll: &Epoll, conns: &mut BTreeMap<u64, Connection>, token: u64) {
    if let Some(conn) = conns.remove(&token) {
        let _ = epoll.ctl(
            ControlOperation::Delete,
            conn.stream.as_raw_fd(),
            EpollEvent::default(),
        );
        let _ = conn.stream.shutdown(std::net::Shutdown::Both);
    }
}
