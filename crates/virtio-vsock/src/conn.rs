//! One vsock connection between a guest socket and a host Unix stream:
//! its state, both directions' credit, and the bytes the guest sent that
//! the host has not taken yet (at most [`CONN_BUF`] of them: the guest may
//! not send more than the credit the device gave it).

use std::collections::VecDeque;
use std::io::{ErrorKind, Read, Write};
use std::num::Wrapping;
use std::os::unix::net::UnixStream;
use std::time::Instant;

use crate::packet::{
    Header, OP_CREDIT_UPDATE, OP_REQUEST, OP_RESPONSE, OP_RW, OP_SHUTDOWN, SHUTDOWN_RCV,
    SHUTDOWN_SEND, TYPE_STREAM,
};
use crate::HOST_CID;

/// The receive buffer the device offers the guest per connection
/// (`buf_alloc`): what it holds at most of one connection's guest data.
pub const CONN_BUF: u32 = 256 * 1024;
/// The device tells the guest about consumed bytes once this many have
/// gone to the host since it last told (and on every packet it sends).
const CREDIT_THRESHOLD: u32 = CONN_BUF / 4;

/// Where a connection is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    /// A host program asked for it (`CONNECT <port>`); the guest has not
    /// answered the request yet.
    LocalInit(Instant),
    /// Open both ways (until shut down).
    Established,
}

/// What a connection has to tell the guest next.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RxOp {
    /// `OP_REQUEST`: the host connects.
    Request,
    /// `OP_RESPONSE`: the host accepted the guest's request.
    Response,
    /// `OP_CREDIT_UPDATE`.
    CreditUpdate,
    /// Data from the host stream (`OP_RW`), or its end (`OP_SHUTDOWN`).
    Data,
}

/// Why a connection must be torn down (the guest gets `OP_RST`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Teardown {
    /// Both sides are done (not an error).
    Done,
    /// The guest broke the protocol.
    Protocol(&'static str),
    /// The host stream failed.
    Stream(String),
}

/// One connection.
#[derive(Debug)]
pub struct Conn {
    /// The host side's stream.
    pub stream: UnixStream,
    /// The host side's port.
    pub local_port: u32,
    /// The guest side's port.
    pub peer_port: u32,
    /// The guest's context id.
    pub guest_cid: u64,
    /// Where it is.
    pub state: State,
    // Guest to host.
    tx_buf: VecDeque<u8>,
    fwd_cnt: Wrapping<u32>,
    fwd_cnt_told: Wrapping<u32>,
    peer_shut_send: bool,
    peer_shut_rcv: bool,
    write_shut: bool,
    closing: bool,
    // Host to guest.
    peer_buf_alloc: u32,
    peer_fwd_cnt: Wrapping<u32>,
    rx_cnt: Wrapping<u32>,
    host_eof: bool,
    /// The host stream hung up (it is no longer watched; its data is read
    /// as credit allows until its end).
    pub hung_up: bool,
    /// The stream has data (or its end) to read.
    pub data_ready: bool,
    pending_request: bool,
    pending_response: bool,
    pending_credit: bool,
    /// In the muxer's receive queue.
    pub in_rxq: bool,
    /// The events the muxer's epoll watches for this stream.
    pub watched: u32,
}

impl Conn {
    /// A connection the host asked for: the guest gets `OP_REQUEST`.
    pub fn local(stream: UnixStream, guest_cid: u64, local_port: u32, peer_port: u32) -> Self {
        let mut c = Self::new(
            stream,
            guest_cid,
            local_port,
            peer_port,
            State::LocalInit(Instant::now()),
        );
        c.pending_request = true;
        c
    }

    /// A connection the guest asked for (`hdr`), accepted by a host
    /// listener: the guest gets `OP_RESPONSE`.
    pub fn peer(stream: UnixStream, hdr: &Header) -> Self {
        let mut c = Self::new(
            stream,
            hdr.src_cid,
            hdr.dst_port,
            hdr.src_port,
            State::Established,
        );
        c.peer_buf_alloc = hdr.buf_alloc;
        c.peer_fwd_cnt = Wrapping(hdr.fwd_cnt);
        c.pending_response = true;
        c
    }

    fn new(
        stream: UnixStream,
        guest_cid: u64,
        local_port: u32,
        peer_port: u32,
        state: State,
    ) -> Self {
        Conn {
            stream,
            local_port,
            peer_port,
            guest_cid,
            state,
            tx_buf: VecDeque::new(),
            fwd_cnt: Wrapping(0),
            fwd_cnt_told: Wrapping(0),
            peer_shut_send: false,
            peer_shut_rcv: false,
            write_shut: false,
            closing: false,
            peer_buf_alloc: 0,
            peer_fwd_cnt: Wrapping(0),
            rx_cnt: Wrapping(0),
            host_eof: false,
            hung_up: false,
            data_ready: false,
            pending_request: false,
            pending_response: false,
            pending_credit: false,
            in_rxq: false,
            watched: 0,
        }
    }

    /// Bytes the guest can take now.
    pub fn peer_credit(&self) -> u32 {
        let in_flight = (self.rx_cnt - self.peer_fwd_cnt).0;
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    fn established(&self) -> bool {
        self.state == State::Established
    }

    /// Whether the host stream may be read for the guest.
    fn may_read(&self) -> bool {
        self.established() && !self.host_eof && !self.peer_shut_rcv && self.peer_credit() > 0
    }

    /// The epoll events this stream wants (`EPOLLIN`, `EPOLLOUT`).
    pub fn wanted_events(&self) -> u32 {
        let mut e = 0;
        if self.may_read() && !self.data_ready {
            e |= libc::EPOLLIN as u32;
        }
        if !self.tx_buf.is_empty() {
            e |= libc::EPOLLOUT as u32;
        }
        e
    }

    /// The next thing to tell the guest, if any.
    pub fn next_rx_op(&self) -> Option<RxOp> {
        if self.pending_request {
            Some(RxOp::Request)
        } else if self.pending_response {
            Some(RxOp::Response)
        } else if self.data_ready && self.may_read() {
            Some(RxOp::Data)
        } else if self.pending_credit {
            Some(RxOp::CreditUpdate)
        } else {
            None
        }
    }

    /// A header from this connection to the guest.
    pub fn header(&mut self, op: u16) -> Header {
        self.fwd_cnt_told = self.fwd_cnt;
        self.pending_credit = false;
        Header {
            src_cid: HOST_CID,
            dst_cid: self.guest_cid,
            src_port: self.local_port,
            dst_port: self.peer_port,
            len: 0,
            type_: TYPE_STREAM,
            op,
            flags: 0,
            buf_alloc: CONN_BUF,
            fwd_cnt: self.fwd_cnt.0,
        }
    }

    /// The control packet for `op` (not `Data`), which is then done.
    pub fn control(&mut self, op: RxOp) -> Header {
        match op {
            RxOp::Request => {
                self.pending_request = false;
                self.header(OP_REQUEST)
            }
            RxOp::Response => {
                self.pending_response = false;
                self.header(OP_RESPONSE)
            }
            RxOp::CreditUpdate | RxOp::Data => self.header(OP_CREDIT_UPDATE),
        }
    }

    /// Reads host data for the guest into `buf` (at most the guest's
    /// credit). `Ok(Some(header))`: a packet to send with `buf[..len]`
    /// (`OP_RW`, or `OP_SHUTDOWN` at the stream's end); `Ok(None)`: nothing
    /// to read now (the stream is watched again).
    pub fn read_data(&mut self, buf: &mut [u8]) -> Result<Option<Header>, Teardown> {
        let room = buf.len().min(self.peer_credit() as usize);
        if room == 0 {
            self.data_ready = false;
            return Ok(None);
        }
        match self.stream.read(&mut buf[..room]) {
            Ok(0) => {
                self.host_eof = true;
                self.data_ready = false;
                let mut hdr = self.header(OP_SHUTDOWN);
                // A stream that hung up takes nothing more either.
                hdr.flags = SHUTDOWN_SEND | if self.hung_up { SHUTDOWN_RCV } else { 0 };
                Ok(Some(hdr))
            }
            Ok(n) => {
                self.rx_cnt += Wrapping(u32::try_from(n).unwrap_or(u32::MAX));
                let mut hdr = self.header(OP_RW);
                hdr.len = u32::try_from(n).unwrap_or(u32::MAX);
                Ok(Some(hdr))
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                self.data_ready = false;
                Ok(None)
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => Ok(None),
            Err(e) => Err(Teardown::Stream(format!("read: {e}"))),
        }
    }

    /// Takes what a guest packet says about its buffer space.
    pub fn peer_credit_from(&mut self, hdr: &Header) {
        self.peer_buf_alloc = hdr.buf_alloc;
        self.peer_fwd_cnt = Wrapping(hdr.fwd_cnt);
    }

    /// The guest accepted a host-initiated connection: the host program
    /// gets `OK <local_port>\n`.
    pub fn accepted(&mut self) -> Result<(), Teardown> {
        if self.established() {
            return Err(Teardown::Protocol("a response on an open connection"));
        }
        self.state = State::Established;
        let line = format!("OK {}\n", self.local_port);
        match self.stream.write(line.as_bytes()) {
            Ok(n) if n == line.len() => Ok(()),
            Ok(_) => Err(Teardown::Stream("the OK line did not fit".into())),
            Err(e) => Err(Teardown::Stream(format!("write: {e}"))),
        }
    }

    /// Guest data for the host stream: written now as far as the stream
    /// takes it, the rest kept (within the credit the guest was given).
    pub fn send(&mut self, data: &[u8]) -> Result<(), Teardown> {
        if !self.established() {
            return Err(Teardown::Protocol(
                "data before the connection was accepted",
            ));
        }
        if self.peer_shut_send {
            return Err(Teardown::Protocol("data after the guest shut down sending"));
        }
        let mut data = data;
        if self.tx_buf.is_empty() {
            let n = self.write_some(data)?;
            data = &data[n..];
        }
        if self.tx_buf.len() + data.len() > CONN_BUF as usize {
            return Err(Teardown::Protocol("data beyond the credit the device gave"));
        }
        self.tx_buf.extend(data);
        Ok(())
    }

    fn write_some(&mut self, data: &[u8]) -> Result<usize, Teardown> {
        let mut done = 0;
        while done < data.len() {
            match self.stream.write(&data[done..]) {
                Ok(0) => return Err(Teardown::Stream("write: the stream took nothing".into())),
                Ok(n) => done += n,
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(Teardown::Stream(format!("write: {e}"))),
            }
        }
        self.consumed(done);
        Ok(done)
    }

    fn consumed(&mut self, n: usize) {
        self.fwd_cnt += Wrapping(u32::try_from(n).unwrap_or(u32::MAX));
        if (self.fwd_cnt - self.fwd_cnt_told).0 >= CREDIT_THRESHOLD {
            self.pending_credit = true;
        }
    }

    /// The stream is writable: writes what is kept. Ends the stream's
    /// sending side once the guest shut down and all is written.
    pub fn flush(&mut self) -> Result<(), Teardown> {
        while !self.tx_buf.is_empty() {
            let (front, _) = self.tx_buf.as_slices();
            let front = front.to_vec();
            let n = self.write_some(&front)?;
            self.tx_buf.drain(..n);
            if n < front.len() {
                break;
            }
        }
        self.after_flush()
    }

    fn after_flush(&mut self) -> Result<(), Teardown> {
        if !self.tx_buf.is_empty() {
            return Ok(());
        }
        if self.closing {
            return Err(Teardown::Done);
        }
        if self.peer_shut_send && !self.write_shut {
            self.write_shut = true;
            let _ = self.stream.shutdown(std::net::Shutdown::Write);
        }
        Ok(())
    }

    /// `OP_SHUTDOWN` from the guest.
    pub fn shutdown(&mut self, flags: u32) -> Result<(), Teardown> {
        self.peer_shut_send |= flags & SHUTDOWN_SEND != 0;
        self.peer_shut_rcv |= flags & SHUTDOWN_RCV != 0;
        if self.peer_shut_send && self.peer_shut_rcv {
            // The guest closed: what it sent reaches the host, then reset.
            self.closing = true;
        }
        self.after_flush()
    }

    /// `OP_CREDIT_REQUEST` from the guest.
    pub fn credit_requested(&mut self) {
        self.pending_credit = true;
    }

    /// Both directions are over: the host's stream ended and the guest
    /// will send nothing more.
    pub fn finished(&self) -> bool {
        self.host_eof
            && self.peer_shut_send
            && self.tx_buf.is_empty()
            && self.next_rx_op().is_none()
    }
}
