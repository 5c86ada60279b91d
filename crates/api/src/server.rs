//! The API server: HTTP/1.1 on a Unix socket, one thread, nonblocking
//! sockets and epoll, so a slow or half-sent request never holds up
//! another client. Requests are answered in order per connection
//! (pipelining works); connections are kept alive unless the client says
//! otherwise. What a connection may hold is bounded: its input by the
//! request limits, its unsent answers by [`MAX_PENDING_OUTPUT`], its time
//! by [`Limits`].

use std::collections::BTreeMap;
use std::io::{ErrorKind, Read};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use crate::http::{handle_bytes, MAX_HEAD};
use crate::request::Request;
use crate::response::Response;
use crate::{sys, Error, Result};

/// The largest request body (Firecracker's limit).
pub const MAX_BODY: usize = 51200;
/// The most connections served at once by default; one more is told so
/// and closed.
pub const MAX_CONNECTIONS: usize = 64;
/// How long a request may stay half-sent, or answers unread, by default.
pub const PARTIAL_REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a connection with nothing in flight counts as in use, by
/// default.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(30);
/// A client that leaves this much of its answers unread is closed.
pub const MAX_PENDING_OUTPUT: usize = 1 << 20;
/// The mode of the socket file.
pub const SOCKET_MODE: u32 = 0o600;
/// The most bytes read from a client before they are answered. A request
/// still incomplete after [`handle_bytes`] is shorter than
/// `MAX_HEAD + MAX_BODY`, so this bounds a connection's input.
const MAX_INPUT: usize = MAX_HEAD + MAX_BODY + 64 * 1024;
/// The longest epoll wait: how often timeouts are looked at.
const MAX_TICK: Duration = Duration::from_secs(1);

const LISTENER: u64 = 0;
const STOP: u64 = 1;
const FIRST_CONNECTION: u64 = 2;

/// What the server allows its clients. [`Limits::default`] is what
/// [`Server::bind`] starts with.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Connections served at once; one more is answered 503 and closed
    /// (after making room by closing the longest-idle connection, if one
    /// has been idle for `idle_timeout`).
    pub max_connections: usize,
    /// A request half-sent, or answers left unread, for this long: the
    /// connection is closed.
    pub request_timeout: Duration,
    /// A connection with nothing in flight for this long may be closed to
    /// make room for a new client.
    pub idle_timeout: Duration,
    /// Also close every connection idle for `idle_timeout` even when
    /// there is room. Off by default: orchestrators keep one connection
    /// open across a guest's boot, and Firecracker does not close it.
    pub close_idle: bool,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: MAX_CONNECTIONS,
            request_timeout: PARTIAL_REQUEST_TIMEOUT,
            idle_timeout: IDLE_TIMEOUT,
            close_idle: false,
        }
    }
}

/// What a connection waits for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Interest {
    /// Requests (EPOLLIN, and EPOLLRDHUP for the client going away).
    Read,
    /// Room for its answers (EPOLLOUT only: no input is read meanwhile).
    Write,
}

/// One client.
struct Connection {
    stream: UnixStream,
    input: Vec<u8>,
    output: Vec<u8>,
    /// No more requests are read: the last answer ends the connection.
    closing: bool,
    /// The client shut its side.
    eof: bool,
    interest: Interest,
    /// When the unanswered bytes in `input` started arriving.
    partial_since: Option<Instant>,
    /// Since when answers wait for the client with no byte taken.
    unread_since: Option<Instant>,
    /// The last byte read or written.
    active: Instant,
}

impl Connection {
    fn new(stream: UnixStream, now: Instant) -> Self {
        Connection {
            stream,
            input: Vec::new(),
            output: Vec::new(),
            closing: false,
            eof: false,
            interest: Interest::Read,
            partial_since: None,
            unread_since: None,
            active: now,
        }
    }

    /// Nothing in flight.
    fn idle(&self) -> bool {
        self.input.is_empty() && self.output.is_empty()
    }

    /// Why the connection has had its time, if it has.
    fn expired(&self, limits: &Limits, now: Instant) -> Option<&'static str> {
        let over = |since: Instant, limit: Duration| now.saturating_duration_since(since) > limit;
        if self
            .partial_since
            .is_some_and(|t| over(t, limits.request_timeout))
        {
            Some("its request stayed incomplete")
        } else if self
            .unread_since
            .is_some_and(|t| over(t, limits.request_timeout))
        {
            Some("it does not read its answers")
        } else if limits.close_idle && self.idle() && over(self.active, limits.idle_timeout) {
            Some("it was idle")
        } else {
            None
        }
    }
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
    fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }
}

/// Serves Firecracker's API on one Unix socket.
#[derive(Debug)]
pub struct Server {
    listener: UnixListener,
    path: PathBuf,
    stats: Arc<ServerStats>,
    limits: Limits,
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

/// Removes a stale socket file at `path` (one nobody listens on); refuses
/// a live one or anything that is not a socket.
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
        Err(e) if e.kind() == ErrorKind::ConnectionRefused => {
            log::info!("api: replacing the stale socket {}", path.display());
            match std::fs::remove_file(path) {
                Err(e) if e.kind() != ErrorKind::NotFound => Err(io_err(path)(e)),
                _ => Ok(()),
            }
        }
        // Gone in the meantime: the path is free.
        Err(e) if e.kind() == ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_err(path)(e)),
    }
}

impl Server {
    /// Creates the socket at `path`, mode 0600 before it listens (a stale
    /// socket file is replaced; a live one is [`Error::InUse`], anything
    /// else at the path [`Error::NotASocket`]). Safe to call with other
    /// threads running.
    pub fn bind(path: &Path) -> Result<Server> {
        clear_path(path)?;
        let listener = sys::listen(path, SOCKET_MODE).map_err(io_err(path))?;
        let epoll = match Epoll::new() {
            Ok(epoll) => epoll,
            Err(e) => {
                let _ = std::fs::remove_file(path);
                return Err(Error::Epoll(e));
            }
        };
        Ok(Server {
            listener,
            path: path.to_owned(),
            stats: Arc::default(),
            limits: Limits::default(),
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

    /// What clients are allowed.
    pub fn limits(&self) -> Limits {
        self.limits
    }

    /// Changes what clients are allowed (from the next [`Server::run`]).
    pub fn set_limits(&mut self, limits: Limits) {
        self.limits = limits;
    }

    /// Serves until `stop` is readable (it is not read). Each valid request
    /// is passed to `handler`, whose answer is sent; an invalid one gets its
    /// 400 without reaching it. Connections are closed on return; `run` may
    /// be called again.
    pub fn run(
        &mut self,
        handler: &mut dyn FnMut(Request) -> Response,
        stop: &EventFd,
    ) -> Result<()> {
        let fds = [
            (self.listener.as_raw_fd(), LISTENER),
            (stop.as_raw_fd(), STOP),
        ];
        for (i, (fd, token)) in fds.iter().enumerate() {
            let added = self.epoll.ctl(
                ControlOperation::Add,
                *fd,
                EpollEvent::new(EventSet::IN, *token),
            );
            if let Err(e) = added {
                self.unwatch(&fds[..i]);
                return Err(Error::Epoll(e));
            }
        }
        let mut conns = BTreeMap::new();
        let served = self.serve_until_stopped(&mut conns, handler);
        for token in conns.keys().copied().collect::<Vec<_>>() {
            drop_connection(&self.epoll, &mut conns, token);
        }
        self.unwatch(&fds);
        served
    }

    fn unwatch(&self, fds: &[(i32, u64)]) {
        for (fd, _) in fds {
            let _ = self
                .epoll
                .ctl(ControlOperation::Delete, *fd, EpollEvent::default());
        }
    }

    /// How long to wait for events before looking at the timeouts.
    fn tick(&self) -> i32 {
        let shortest = self.limits.request_timeout.min(self.limits.idle_timeout) / 4;
        let tick = shortest.clamp(Duration::from_millis(10), MAX_TICK);
        i32::try_from(tick.as_millis()).unwrap_or(1000)
    }

    fn serve_until_stopped(
        &self,
        conns: &mut BTreeMap<u64, Connection>,
        handler: &mut dyn FnMut(Request) -> Response,
    ) -> Result<()> {
        let mut next = FIRST_CONNECTION;
        let mut events = vec![EpollEvent::default(); 64];
        loop {
            let n = match self.epoll.wait(self.tick(), &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => return Err(Error::Epoll(e)),
            };
            for ev in events.iter().take(n) {
                match ev.data() {
                    STOP => return Ok(()),
                    LISTENER => self.accept(conns, &mut next),
                    token => {
                        let Some(conn) = conns.get_mut(&token) else {
                            continue;
                        };
                        let keep = serve(conn, handler, &self.stats)
                            && update_interest(&self.epoll, token, conn);
                        if !keep {
                            drop_connection(&self.epoll, conns, token);
                        }
                    }
                }
            }
            // After the events, so bytes that waited while the handler ran
            // count before a connection is judged.
            let now = Instant::now();
            let expired: Vec<(u64, &str)> = conns
                .iter()
                .filter_map(|(t, c)| Some((*t, c.expired(&self.limits, now)?)))
                .collect();
            for (token, why) in expired {
                log::info!("api: closing a connection: {why}");
                drop_connection(&self.epoll, conns, token);
            }
        }
    }

    fn accept(&self, conns: &mut BTreeMap<u64, Connection>, next: &mut u64) {
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
            let now = Instant::now();
            if conns.len() >= self.limits.max_connections {
                self.make_room(conns, now);
            }
            if conns.len() >= self.limits.max_connections {
                ServerStats::add(&self.stats.refused_connections, 1);
                let busy = Response::fault(
                    503,
                    &format!(
                        "too many connections (at most {}); try again",
                        self.limits.max_connections
                    ),
                );
                let _ = sys::send(&stream, &busy.to_http_bytes(false));
                continue;
            }
            ServerStats::add(&self.stats.connections, 1);
            let token = *next;
            *next = next.wrapping_add(1).max(FIRST_CONNECTION);
            let registered = self.epoll.ctl(
                ControlOperation::Add,
                stream.as_raw_fd(),
                EpollEvent::new(EventSet::IN | EventSet::READ_HANG_UP, token),
            );
            if let Err(e) = registered {
                log::warn!("api: cannot watch a connection: {e}");
                continue;
            }
            conns.insert(token, Connection::new(stream, now));
        }
    }

    /// Closes the connection idle the longest, if it has been idle for
    /// `idle_timeout`.
    fn make_room(&self, conns: &mut BTreeMap<u64, Connection>, now: Instant) {
        let oldest = conns
            .iter()
            .filter(|(_, c)| c.idle())
            .filter(|(_, c)| now.saturating_duration_since(c.active) >= self.limits.idle_timeout)
            .min_by_key(|(_, c)| c.active)
            .map(|(t, _)| *t);
        if let Some(token) = oldest {
            log::info!("api: closing an idle connection to make room for a new one");
            drop_connection(&self.epoll, conns, token);
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
    handler: &mut dyn FnMut(Request) -> Response,
    stats: &ServerStats,
) -> bool {
    let now = Instant::now();
    if conn.interest == Interest::Read && !conn.closing && !conn.eof && !read(conn, now) {
        return false;
    }
    answer(conn, handler, stats, now);
    if !flush(conn, now) {
        return false;
    }
    if conn.output.len() > MAX_PENDING_OUTPUT {
        log::info!("api: closing a client that does not read its answers");
        return false;
    }
    // The client is gone (or the connection ends) once the answers are out.
    !((conn.eof || conn.closing) && conn.output.is_empty())
}

/// Reads until the socket is empty or the input is full. Returns false if
/// the connection failed.
fn read(conn: &mut Connection, now: Instant) -> bool {
    let mut buf = [0u8; 16 * 1024];
    while conn.input.len() <= MAX_INPUT {
        match conn.stream.read(&mut buf) {
            Ok(0) => {
                conn.eof = true;
                break;
            }
            Ok(n) => {
                conn.input
                    .extend_from_slice(buf.get(..n).unwrap_or_default());
                conn.active = now;
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => break,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(_) => return false,
        }
    }
    true
}

/// Answers every whole request in the input, in order.
fn answer(
    conn: &mut Connection,
    handler: &mut dyn FnMut(Request) -> Response,
    stats: &ServerStats,
    now: Instant,
) {
    if conn.closing || conn.input.is_empty() {
        return;
    }
    let ex = handle_bytes(&conn.input, MAX_BODY, handler);
    ServerStats::add(&stats.requests, ex.requests);
    ServerStats::add(&stats.bad_requests, ex.refused);
    conn.input.drain(..ex.consumed.min(conn.input.len()));
    conn.output.extend_from_slice(&ex.output);
    if ex.close {
        conn.closing = true;
        conn.input.clear();
    }
    conn.partial_since = match (conn.input.is_empty(), ex.consumed) {
        (true, _) => None,
        // A new request started after the ones just answered.
        (false, 1..) => Some(now),
        (false, 0) => conn.partial_since.or(Some(now)),
    };
}

/// Writes what the socket takes. Returns false if the client is gone.
fn flush(conn: &mut Connection, now: Instant) -> bool {
    while !conn.output.is_empty() {
        match sys::send(&conn.stream, &conn.output) {
            Ok(0) => return false,
            Ok(n) => {
                conn.output.drain(..n.min(conn.output.len()));
                conn.active = now;
                conn.unread_since = None;
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => break,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(_) => return false,
        }
    }
    if !conn.output.is_empty() && conn.unread_since.is_none() {
        conn.unread_since = Some(now);
    }
    true
}

/// Watches for room to write while answers are pending, for requests
/// otherwise. Returns false if epoll refuses.
fn update_interest(epoll: &Epoll, token: u64, conn: &mut Connection) -> bool {
    let want = if conn.output.is_empty() {
        Interest::Read
    } else {
        Interest::Write
    };
    if want == conn.interest {
        return true;
    }
    // Only EPOLLOUT while writing: a client that shut its side would
    // otherwise report EPOLLRDHUP on every wait.
    let set = match want {
        Interest::Read => EventSet::IN | EventSet::READ_HANG_UP,
        Interest::Write => EventSet::OUT,
    };
    conn.interest = want;
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
