//! The host side (Firecracker's "hybrid" vsock): one listening Unix socket
//! for host-initiated connections (`CONNECT <port>\n`, answered
//! `OK <host_port>\n`), and `<uds_path>_<port>` for the guest's.
//!
//! Every host stream, the listener and a timer are in one epoll set whose
//! fd the VMM's event loop watches as the device's backend fd; nothing here
//! blocks. A stream is watched for reading only while the guest has credit
//! for its data and no read of it is already queued, so a busy stream
//! neither spins the loop nor buffers on the host.

use std::collections::{HashMap, VecDeque};
use std::io::{ErrorKind, Read};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use log::{debug, warn};
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::timerfd::TimerFd;

use crate::conn::{Conn, RxOp, State, Teardown};
use crate::packet::{
    Header, OP_CREDIT_REQUEST, OP_CREDIT_UPDATE, OP_REQUEST, OP_RESPONSE, OP_RST, OP_RW,
    OP_SHUTDOWN, TYPE_STREAM,
};
use crate::{Counters, Error, HOST_CID};

/// Connections open at once, at most (Firecracker's limit is 1023).
pub const MAX_CONNECTIONS: usize = 1024;
/// Host streams that have not sent their `CONNECT` line yet, at most; a
/// new one beyond it pushes out the oldest.
const MAX_HANDSHAKES: usize = 64;
/// Host connections accepted per pass: a storm of connections cannot keep
/// the event loop from its other work (the listener stays readable, so the
/// next pass takes the next ones).
const ACCEPT_BATCH: usize = 16;
/// epoll rounds per pass, for the same reason.
const POLL_ROUNDS: usize = 4;
/// The longest `CONNECT <port>\n` line.
const MAX_LINE: usize = 32;
/// How long the guest has to answer a host-initiated request.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);
/// Resets waiting for the guest with no connection behind them, at most.
const MAX_STRAY: usize = 1024;
/// Host-initiated connections get host ports from here up.
const FIRST_LOCAL_PORT: u32 = 1 << 30;

/// Where an epoll event comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Source {
    Listener,
    Timer,
    Handshake,
    Conn(u32, u32),
}

/// A packet the device must send the guest, with its payload length in
/// the caller's buffer.
pub type RxPacket = (Header, usize);

/// The host side of one vsock device.
pub struct Muxer {
    guest_cid: u64,
    uds_path: PathBuf,
    listener: UnixListener,
    epoll: Epoll,
    timer: TimerFd,
    sources: HashMap<RawFd, Source>,
    handshakes: VecDeque<(UnixStream, Vec<u8>)>,
    conns: HashMap<(u32, u32), Conn>,
    rxq: VecDeque<(u32, u32)>,
    stray: VecDeque<Header>,
    next_port: u32,
    /// What it did, for metrics and tests.
    pub counters: Counters,
    logged_bad_line: bool,
    /// The guest's driver is up.
    guest_ready: bool,
}

impl std::fmt::Debug for Muxer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Muxer")
            .field("uds_path", &self.uds_path)
            .field("connections", &self.conns.len())
            .finish_non_exhaustive()
    }
}

/// Removes a socket file nobody listens on (a VMM before this one left it).
fn clear_stale(path: &Path) -> Result<(), Error> {
    use std::os::unix::fs::FileTypeExt;
    let Ok(meta) = std::fs::symlink_metadata(path) else {
        return Ok(());
    };
    let busy = || {
        Error::Socket(format!(
            "{}: exists and is not a stale socket",
            path.display()
        ))
    };
    if !meta.file_type().is_socket() {
        return Err(busy());
    }
    match UnixStream::connect(path) {
        Err(e) if e.kind() == ErrorKind::ConnectionRefused => std::fs::remove_file(path)
            .map_err(|e| Error::Socket(format!("{}: {e}", path.display()))),
        _ => Err(Error::Socket(format!(
            "{}: another program listens on it",
            path.display()
        ))),
    }
}

/// Connects to a host listener without blocking (a listener whose backlog
/// is full refuses rather than stalls the event loop).
#[allow(unsafe_code)]
fn connect_nonblocking(path: &Path) -> std::io::Result<UnixStream> {
    use std::os::unix::ffi::OsStrExt;
    let bytes = path.as_os_str().as_bytes();
    // SAFETY: sockaddr_un is plain data; all zeroes is a valid value.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    if bytes.len() >= addr.sun_path.len() {
        return Err(std::io::Error::from_raw_os_error(libc::ENAMETOOLONG));
    }
    addr.sun_family = libc::sa_family_t::try_from(libc::AF_UNIX).unwrap_or(1);
    for (d, s) in addr.sun_path.iter_mut().zip(bytes) {
        *d = *s as libc::c_char;
    }
    // SAFETY: socket(2) with constant arguments; the result is checked.
    let fd = unsafe {
        libc::socket(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` is a new socket no one else owns.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    let len = libc::socklen_t::try_from(std::mem::size_of::<libc::sockaddr_un>()).unwrap_or(110);
    // SAFETY: `addr` is a valid sockaddr_un of `len` bytes that outlives
    // the call; `fd` is open.
    let rc = unsafe { libc::connect(fd, std::ptr::addr_of!(addr).cast(), len) };
    if rc < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(UnixStream::from(owned))
}

/// Parses `CONNECT <port>` (the newline taken off).
pub fn parse_connect(line: &[u8]) -> Option<u32> {
    let line = std::str::from_utf8(line).ok()?.trim();
    let port = line.strip_prefix("CONNECT ")?.trim();
    if port.is_empty() || !port.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    port.parse().ok()
}

impl Muxer {
    /// Binds `uds_path` (a stale socket file there is replaced) for a
    /// guest with context id `guest_cid`.
    pub fn new(guest_cid: u64, uds_path: &Path) -> Result<Self, Error> {
        clear_stale(uds_path)?;
        let listener = UnixListener::bind(uds_path)
            .map_err(|e| Error::Socket(format!("{}: {e}", uds_path.display())))?;
        let mut m = Muxer {
            guest_cid,
            uds_path: uds_path.to_path_buf(),
            listener,
            epoll: Epoll::new().map_err(|e| Error::Socket(format!("epoll: {e}")))?,
            timer: TimerFd::new().map_err(|e| Error::Socket(format!("timerfd: {e}")))?,
            sources: HashMap::new(),
            handshakes: VecDeque::new(),
            conns: HashMap::new(),
            rxq: VecDeque::new(),
            stray: VecDeque::new(),
            next_port: FIRST_LOCAL_PORT,
            counters: Counters::default(),
            logged_bad_line: false,
            guest_ready: false,
        };
        let io = |e: std::io::Error| Error::Socket(format!("{}: {e}", uds_path.display()));
        m.listener.set_nonblocking(true).map_err(io)?;
        let (lfd, tfd) = (m.listener.as_raw_fd(), m.timer.as_raw_fd());
        m.watch(lfd, Source::Listener, libc::EPOLLIN as u32)
            .map_err(io)?;
        m.watch(tfd, Source::Timer, libc::EPOLLIN as u32)
            .map_err(io)?;
        Ok(m)
    }

    /// The epoll fd the VMM's event loop watches.
    pub fn epoll_fd(&self) -> RawFd {
        self.epoll.as_raw_fd()
    }

    /// The listening socket's path.
    pub fn uds_path(&self) -> &Path {
        &self.uds_path
    }

    /// Connections open now.
    pub fn connections(&self) -> usize {
        self.conns.len()
    }

    fn watch(&mut self, fd: RawFd, source: Source, events: u32) -> std::io::Result<()> {
        let ev = EpollEvent::new(EventSet::from_bits_truncate(events), fd as u64);
        self.epoll.ctl(ControlOperation::Add, fd, ev)?;
        self.sources.insert(fd, source);
        Ok(())
    }

    fn unwatch(&mut self, fd: RawFd) {
        if self.sources.remove(&fd).is_some() {
            let _ = self
                .epoll
                .ctl(ControlOperation::Delete, fd, EpollEvent::default());
        }
    }

    /// Serves what the epoll set reports, without waiting.
    pub fn poll(&mut self) {
        let mut events = [EpollEvent::default(); 64];
        // What is left stays ready: the event loop calls again after its
        // other work.
        for _ in 0..POLL_ROUNDS {
            let n = match self.epoll.wait(0, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) => {
                    warn!("virtio-vsock: epoll_wait: {e}");
                    return;
                }
            };
            for ev in &events[..n] {
                let fd = ev.fd();
                let set = ev.event_set();
                match self.sources.get(&fd).copied() {
                    Some(Source::Listener) => self.accept(),
                    Some(Source::Timer) => self.expire(),
                    Some(Source::Handshake) => self.handshake(fd),
                    Some(Source::Conn(l, p)) => self.stream_event((l, p), set),
                    None => {}
                }
            }
            if n < events.len() {
                return;
            }
        }
    }

    fn accept(&mut self) {
        for _ in 0..ACCEPT_BATCH {
            match self.listener.accept() {
                Ok((stream, _)) => {
                    if stream.set_nonblocking(true).is_err() {
                        continue;
                    }
                    if self.handshakes.len() >= MAX_HANDSHAKES {
                        if let Some((old, _)) = self.handshakes.pop_front() {
                            self.unwatch(old.as_raw_fd());
                        }
                    }
                    let fd = stream.as_raw_fd();
                    if self
                        .watch(fd, Source::Handshake, libc::EPOLLIN as u32)
                        .is_ok()
                    {
                        self.handshakes.push_back((stream, Vec::new()));
                    }
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => {
                    warn!("virtio-vsock: accept on {}: {e}", self.uds_path.display());
                    return;
                }
            }
        }
    }

    fn refuse_line(&mut self, why: &str) {
        self.counters.refused_host = self.counters.refused_host.saturating_add(1);
        if !std::mem::replace(&mut self.logged_bad_line, true) {
            warn!(
                "virtio-vsock: a host connection on {} {why}: closed (further ones are counted, not logged)",
                self.uds_path.display()
            );
        }
    }

    /// Reads a waiting host stream's `CONNECT` line, a byte at a time (what
    /// follows the line is the connection's data).
    fn handshake(&mut self, fd: RawFd) {
        let Some(i) = self
            .handshakes
            .iter()
            .position(|(s, _)| s.as_raw_fd() == fd)
        else {
            self.unwatch(fd);
            return;
        };
        let port = loop {
            let (stream, line) = &mut self.handshakes[i];
            let mut byte = [0u8; 1];
            match stream.read(&mut byte) {
                Ok(0) => break Err("closed before its CONNECT line"),
                Ok(_) if byte[0] == b'\n' => {
                    break parse_connect(line).ok_or("sent a line that is not CONNECT <port>")
                }
                Ok(_) if line.len() >= MAX_LINE => break Err("sent no CONNECT line"),
                Ok(_) => line.push(byte[0]),
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => break Err("failed before its CONNECT line"),
            }
        };
        self.unwatch(fd);
        let Some((stream, _)) = self.handshakes.remove(i) else {
            return;
        };
        match port {
            Err(why) => self.refuse_line(why),
            Ok(port) => self.connect_guest(stream, port),
        }
    }

    fn free_local_port(&mut self) -> Option<u32> {
        for _ in 0..=MAX_CONNECTIONS {
            let port = self.next_port;
            self.next_port = self.next_port.checked_add(1).unwrap_or(FIRST_LOCAL_PORT);
            if !self.conns.keys().any(|&(l, _)| l == port) {
                return Some(port);
            }
        }
        None
    }

    /// A host program asked for guest port `port`.
    fn connect_guest(&mut self, stream: UnixStream, port: u32) {
        // Nothing could answer: refused now rather than after the request
        // timeout (a storm of them would pile up).
        if !self.guest_ready {
            self.refuse_line("came before the guest's vsock driver was up");
            return;
        }
        if self.conns.len() >= MAX_CONNECTIONS {
            self.refuse_line("came with the connection limit reached");
            return;
        }
        let Some(local) = self.free_local_port() else {
            return;
        };
        let conn = Conn::local(stream, self.guest_cid, local, port);
        if self.add_conn(conn) {
            self.counters.host_connections = self.counters.host_connections.saturating_add(1);
            self.arm_timer();
        }
    }

    fn add_conn(&mut self, mut conn: Conn) -> bool {
        let key = (conn.local_port, conn.peer_port);
        let fd = conn.stream.as_raw_fd();
        conn.watched = conn.wanted_events();
        if let Err(e) = self.watch(fd, Source::Conn(key.0, key.1), conn.watched) {
            warn!("virtio-vsock: cannot watch a stream: {e}");
            return false;
        }
        self.conns.insert(key, conn);
        self.requeue(key);
        true
    }

    fn arm_timer(&mut self) {
        let oldest = self
            .conns
            .values()
            .filter_map(|c| match c.state {
                State::LocalInit(t) => Some(t),
                State::Established => None,
            })
            .min();
        let due = oldest.map(|t| (t + REQUEST_TIMEOUT).saturating_duration_since(Instant::now()));
        let r = match due {
            Some(d) => self.timer.reset(d.max(Duration::from_millis(1)), None),
            None => self.timer.clear(),
        };
        if let Err(e) = r {
            warn!("virtio-vsock: request timer: {e}");
        }
    }

    /// Host-initiated requests the guest did not answer in time.
    fn expire(&mut self) {
        let _ = self.timer.wait();
        let now = Instant::now();
        let late: Vec<_> = self
            .conns
            .iter()
            .filter(|(_, c)| matches!(c.state, State::LocalInit(t) if now >= t + REQUEST_TIMEOUT))
            .map(|(k, _)| *k)
            .collect();
        for key in late {
            debug!("virtio-vsock: guest port {} did not answer in time", key.1);
            self.kill(key, true);
        }
        self.arm_timer();
    }

    fn stream_event(&mut self, key: (u32, u32), set: EventSet) {
        let Some(conn) = self.conns.get_mut(&key) else {
            return;
        };
        // Hang-ups and errors are reported whatever the interest: such a
        // stream is not watched again (see settle).
        if set.intersects(EventSet::HANG_UP | EventSet::ERROR) {
            conn.hung_up = true;
        }
        if set
            .intersects(EventSet::IN | EventSet::HANG_UP | EventSet::ERROR | EventSet::READ_HANG_UP)
        {
            conn.data_ready = true;
        }
        let mut result = Ok(());
        if set.contains(EventSet::OUT) {
            result = conn.flush();
        }
        if conn.state != State::Established && conn.hung_up {
            // The host program left before the guest answered.
            result = Err(Teardown::Stream("closed before the guest answered".into()));
        }
        self.settle(key, result);
    }

    /// After a change to a connection: tears it down on `result`'s error,
    /// else updates what its stream is watched for and queues it for the
    /// guest.
    fn settle(&mut self, key: (u32, u32), result: Result<(), Teardown>) {
        if let Err(t) = result {
            match &t {
                Teardown::Done => {}
                Teardown::Protocol(why) => debug!("virtio-vsock: guest port {}: {why}", key.1),
                Teardown::Stream(why) => debug!("virtio-vsock: guest port {}: {why}", key.1),
            }
            self.kill(key, true);
            return;
        }
        let Some(conn) = self.conns.get_mut(&key) else {
            return;
        };
        if conn.finished() {
            self.kill(key, true);
            return;
        }
        let fd = conn.stream.as_raw_fd();
        if conn.hung_up {
            // Hang-ups are reported whatever the interest: stop watching;
            // its data is read as the guest's credit allows.
            self.unwatch(fd);
        } else {
            let want = conn.wanted_events();
            if want != conn.watched {
                conn.watched = want;
                let ev = EpollEvent::new(EventSet::from_bits_truncate(want), fd as u64);
                if let Err(e) = self.epoll.ctl(ControlOperation::Modify, fd, ev) {
                    warn!("virtio-vsock: cannot watch a stream: {e}");
                }
            }
        }
        self.requeue(key);
    }

    fn requeue(&mut self, key: (u32, u32)) {
        if let Some(conn) = self.conns.get_mut(&key) {
            if !conn.in_rxq && conn.next_rx_op().is_some() {
                conn.in_rxq = true;
                self.rxq.push_back(key);
            }
        }
    }

    /// Closes a connection, telling the guest (`OP_RST`) when `tell`.
    fn kill(&mut self, key: (u32, u32), tell: bool) {
        let Some(mut conn) = self.conns.remove(&key) else {
            return;
        };
        // The receive queue holds live connections only (at most
        // MAX_CONNECTIONS), whether or not the guest takes packets.
        if conn.in_rxq {
            self.rxq.retain(|k| *k != key);
        }
        self.unwatch(conn.stream.as_raw_fd());
        if tell {
            let hdr = conn.header(OP_RST);
            self.push_stray(hdr);
        }
        self.counters.closed = self.counters.closed.saturating_add(1);
    }

    fn push_stray(&mut self, hdr: Header) {
        if self.stray.len() < MAX_STRAY {
            self.stray.push_back(hdr);
        }
    }

    fn reset_for(&mut self, hdr: &Header) {
        // Never answer a reset with a reset.
        if hdr.op != OP_RST {
            self.push_stray(Header {
                src_cid: HOST_CID,
                dst_cid: hdr.src_cid,
                src_port: hdr.dst_port,
                dst_port: hdr.src_port,
                type_: TYPE_STREAM,
                op: OP_RST,
                ..Header::default()
            });
        }
    }

    /// Whether anything waits for a receive buffer.
    pub fn has_rx(&self) -> bool {
        !self.stray.is_empty() || !self.rxq.is_empty()
    }

    /// The next packet for the guest, its payload put in `buf` (a receive
    /// buffer's room). `None`: nothing to send now.
    pub fn next_rx(&mut self, buf: &mut [u8]) -> Option<RxPacket> {
        if let Some(hdr) = self.stray.pop_front() {
            return Some((hdr, 0));
        }
        while let Some(key) = self.rxq.pop_front() {
            let Some(conn) = self.conns.get_mut(&key) else {
                continue;
            };
            conn.in_rxq = false;
            let Some(op) = conn.next_rx_op() else {
                continue;
            };
            let packet = match op {
                RxOp::Data => match conn.read_data(buf) {
                    Ok(Some(hdr)) => {
                        let len = hdr.len as usize;
                        if hdr.op == OP_RW {
                            self.counters.rx_bytes =
                                self.counters.rx_bytes.saturating_add(len as u64);
                        }
                        Some((hdr, len))
                    }
                    Ok(None) => None,
                    Err(t) => {
                        self.settle(key, Err(t));
                        continue;
                    }
                },
                other => Some((conn.control(other), 0)),
            };
            self.settle(key, Ok(()));
            if packet.is_some() {
                return packet;
            }
        }
        None
    }

    /// A packet the guest sent; its payload is `payload`.
    pub fn handle_tx(&mut self, hdr: &Header, payload: &[u8]) {
        if hdr.src_cid != self.guest_cid || hdr.dst_cid != HOST_CID || hdr.type_ != TYPE_STREAM {
            self.counters.refused_guest = self.counters.refused_guest.saturating_add(1);
            if hdr.type_ != TYPE_STREAM && hdr.src_cid == self.guest_cid {
                self.reset_for(hdr);
            }
            return;
        }
        let key = (hdr.dst_port, hdr.src_port);
        if !self.conns.contains_key(&key) {
            if hdr.op == OP_REQUEST {
                self.connect_host(hdr);
            } else {
                self.reset_for(hdr);
            }
            return;
        }
        let Some(conn) = self.conns.get_mut(&key) else {
            return;
        };
        conn.peer_credit_from(hdr);
        let result = match hdr.op {
            OP_RESPONSE => conn.accepted(),
            OP_RW => {
                self.counters.tx_bytes =
                    self.counters.tx_bytes.saturating_add(payload.len() as u64);
                conn.send(payload)
            }
            OP_SHUTDOWN => conn.shutdown(hdr.flags),
            OP_RST => {
                self.kill(key, false);
                return;
            }
            OP_CREDIT_UPDATE => Ok(()),
            OP_CREDIT_REQUEST => {
                conn.credit_requested();
                Ok(())
            }
            _ => Err(Teardown::Protocol("an unknown or misplaced operation")),
        };
        if hdr.op == OP_RESPONSE {
            self.arm_timer();
        }
        self.settle(key, result);
    }

    /// The guest connects to host port `hdr.dst_port`: a host program
    /// listens on `<uds_path>_<port>`, or the guest gets a reset.
    fn connect_host(&mut self, hdr: &Header) {
        if self.conns.len() >= MAX_CONNECTIONS {
            self.reset_for(hdr);
            return;
        }
        let mut path = self.uds_path.clone().into_os_string();
        path.push(format!("_{}", hdr.dst_port));
        match connect_nonblocking(Path::new(&path)) {
            Ok(stream) => {
                if self.add_conn(Conn::peer(stream, hdr)) {
                    self.counters.guest_connections =
                        self.counters.guest_connections.saturating_add(1);
                } else {
                    self.reset_for(hdr);
                }
            }
            Err(e) => {
                debug!(
                    "virtio-vsock: guest connects to {}: {e}",
                    Path::new(&path).display()
                );
                self.reset_for(hdr);
            }
        }
    }

    /// Whether the guest's driver is up (the device is activated): until
    /// it is, host connections asking for a guest port are refused at
    /// once.
    pub fn set_guest_ready(&mut self, ready: bool) {
        self.guest_ready = ready;
    }

    /// Drops every connection (the guest's transport was reset: after a
    /// restore its sockets are gone).
    pub fn reset(&mut self) {
        let keys: Vec<_> = self.conns.keys().copied().collect();
        for key in keys {
            self.kill(key, false);
        }
        self.rxq.clear();
        self.stray.clear();
        self.arm_timer();
    }
}

impl Drop for Muxer {
    fn drop(&mut self) {
        // The socket file goes with the device.
        let _ = std::fs::remove_file(&self.uds_path);
    }
}
