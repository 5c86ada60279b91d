//! [`StreamBackend`]: frames over a stream socket in QEMU's `-netdev
//! stream` framing, the protocol of passt (user-mode networking): each
//! frame is a 4-byte big-endian length, then the Ethernet frame, with no
//! virtio-net header. The backend adds a zeroed header to frames it reads
//! (no offloads: the guest checks checksums itself) and strips the
//! guest's from frames it writes, so a NIC on it must not offer offloads.
//!
//! Reads take one frame's bytes at a time from the socket and never more,
//! so frames still waiting keep the socket readable for a level-triggered
//! event loop. A frame the socket takes only in part is finished before
//! any other is written (the stream would be out of step otherwise); while
//! that rest cannot go, further frames are refused with
//! [`io::ErrorKind::WouldBlock`] (dropped, as on a congested wire).

use std::fs::File;
use std::io::{self, IoSlice, Read, Write};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;

use crate::backend::NetBackend;
use crate::device::{MAX_FRAME, VNET_HDR_LEN};

/// The longest Ethernet frame accepted from the stream (a 64 KiB frame
/// with its headers; passt's default MTU is 65520).
pub const MAX_STREAM_FRAME: usize = MAX_FRAME - VNET_HDR_LEN;

/// Frames over a stream socket, length-prefixed (see the module).
#[derive(Debug)]
pub struct StreamBackend {
    /// The socket, read and written with read(2) and writev(2) (what a
    /// VMM's seccomp filter allows for taps too, rather than recv/send).
    sock: File,
    /// The length prefix of the frame being read, and how much of it came.
    rx_len: [u8; 4],
    rx_len_got: usize,
    /// The frame being read (after its prefix) and how much of it came.
    rx_frame: Vec<u8>,
    rx_got: usize,
    /// The part of a frame the socket has not taken yet.
    tx_rest: Vec<u8>,
    /// The peer sent something that is not a frame: the stream is out of
    /// step and read as closed from then on.
    broken: bool,
}

impl StreamBackend {
    /// Uses `sock` (made non-blocking here), connected to a peer that
    /// speaks the framing.
    pub fn new(sock: UnixStream) -> io::Result<StreamBackend> {
        sock.set_nonblocking(true)?;
        Ok(StreamBackend {
            sock: File::from(OwnedFd::from(sock)),
            rx_len: [0; 4],
            rx_len_got: 0,
            rx_frame: vec![0; MAX_STREAM_FRAME],
            rx_got: 0,
            tx_rest: Vec::new(),
            broken: false,
        })
    }

    /// Bytes of a frame still waiting to be written.
    pub fn tx_backlog(&self) -> usize {
        self.tx_rest.len()
    }

    /// Writes what is left of a frame the socket took in part; true when
    /// nothing is left.
    fn flush_rest(&mut self) -> io::Result<bool> {
        while !self.tx_rest.is_empty() {
            match self.sock.write(&self.tx_rest) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => {
                    self.tx_rest.drain(..n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(true)
    }

    /// Reads into `buf` from the socket; `Ok(None)` at end of stream.
    fn read_some(sock: &mut File, buf: &mut [u8]) -> io::Result<Option<usize>> {
        loop {
            match sock.read(buf) {
                Ok(0) => return Ok(None),
                Ok(n) => return Ok(Some(n)),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }
}

impl NetBackend for StreamBackend {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.broken {
            return Ok(0);
        }
        // A frame half written goes on whenever the device looks at the
        // backend: the peer's answers bring it here.
        if !self.tx_rest.is_empty() {
            let _ = self.flush_rest();
        }
        while self.rx_len_got < 4 {
            match Self::read_some(&mut self.sock, &mut self.rx_len[self.rx_len_got..])? {
                None => return Ok(0),
                Some(n) => self.rx_len_got += n,
            }
        }
        let len = u32::from_be_bytes(self.rx_len) as usize;
        if len == 0 || len > MAX_STREAM_FRAME {
            self.broken = true;
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "the peer sent a frame of {len} bytes (1 to {MAX_STREAM_FRAME}): \
                     the stream is out of step, the NIC's link goes down"
                ),
            ));
        }
        while self.rx_got < len {
            match Self::read_some(&mut self.sock, &mut self.rx_frame[self.rx_got..len])? {
                None => return Ok(0),
                Some(n) => self.rx_got += n,
            }
        }
        self.rx_len_got = 0;
        self.rx_got = 0;
        let total = (VNET_HDR_LEN + len).min(buf.len());
        let hdr = VNET_HDR_LEN.min(buf.len());
        buf[..hdr].fill(0);
        buf[hdr..total].copy_from_slice(&self.rx_frame[..total - hdr]);
        Ok(total)
    }

    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let Some(frame) = buf.get(VNET_HDR_LEN..) else {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "a frame of {} bytes is shorter than the virtio-net header",
                    buf.len()
                ),
            ));
        };
        if frame.len() > MAX_STREAM_FRAME {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "a frame of {} bytes is longer than {MAX_STREAM_FRAME}",
                    frame.len()
                ),
            ));
        }
        if !self.flush_rest()? {
            return Err(io::ErrorKind::WouldBlock.into());
        }
        // At most MAX_STREAM_FRAME (checked above): it fits.
        let prefix = u32::try_from(frame.len()).unwrap_or(u32::MAX).to_be_bytes();
        let whole = prefix.len() + frame.len();
        let n = loop {
            match self
                .sock
                .write_vectored(&[IoSlice::new(&prefix), IoSlice::new(frame)])
            {
                Ok(n) => break n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        };
        if n < whole {
            log::debug!("stream backend: the socket took {n} of {whole} bytes");
            // The socket took part of the frame: the rest goes first next
            // time, and this frame counts as sent.
            self.tx_rest.extend_from_slice(&prefix[n.min(4)..]);
            self.tx_rest
                .extend_from_slice(&frame[n.saturating_sub(4)..]);
        }
        Ok(buf.len())
    }

    fn set_offload(&mut self, flags: u32) -> io::Result<()> {
        if flags == 0 {
            Ok(())
        } else {
            Err(io::Error::new(
                io::ErrorKind::Unsupported,
                "a stream backend carries no virtio-net header: no offloads",
            ))
        }
    }

    fn raw_fd(&self) -> Option<RawFd> {
        Some(self.sock.as_raw_fd())
    }
}

#[cfg(test)]
#[allow(clippy::cast_possible_truncation)]
mod tests {
    use super::*;

    fn pair() -> (StreamBackend, UnixStream) {
        let (a, b) = UnixStream::pair().unwrap();
        (StreamBackend::new(a).unwrap(), b)
    }

    fn with_header(frame: &[u8]) -> Vec<u8> {
        let mut v = vec![0xaa; VNET_HDR_LEN];
        v.extend_from_slice(frame);
        v
    }

    #[test]
    fn frames_written_carry_a_length_and_no_header() {
        let (mut be, mut peer) = pair();
        assert_eq!(be.write(&with_header(b"hello")).unwrap(), VNET_HDR_LEN + 5);
        assert_eq!(
            be.write(&with_header(&[7; 1500])).unwrap(),
            VNET_HDR_LEN + 1500
        );
        let mut got = vec![0; 4 + 5 + 4 + 1500];
        peer.read_exact(&mut got).unwrap();
        assert_eq!(&got[..4], &5u32.to_be_bytes());
        assert_eq!(&got[4..9], b"hello");
        assert_eq!(&got[9..13], &1500u32.to_be_bytes());
        assert!(got[13..].iter().all(|&b| b == 7));
        assert_eq!(
            be.write(&[0; 4]).unwrap_err().kind(),
            io::ErrorKind::InvalidInput
        );
    }

    #[test]
    fn frames_read_get_a_zero_header_even_when_they_come_in_pieces() {
        let (mut be, mut peer) = pair();
        let mut buf = vec![0xff; MAX_FRAME];
        assert_eq!(
            be.read(&mut buf).unwrap_err().kind(),
            io::ErrorKind::WouldBlock
        );
        // A prefix cut in two, then the frame in two pieces.
        let frame: Vec<u8> = (0..300u16).map(|i| i as u8).collect();
        peer.write_all(&300u32.to_be_bytes()[..3]).unwrap();
        assert_eq!(
            be.read(&mut buf).unwrap_err().kind(),
            io::ErrorKind::WouldBlock
        );
        peer.write_all(&300u32.to_be_bytes()[3..]).unwrap();
        peer.write_all(&frame[..100]).unwrap();
        assert_eq!(
            be.read(&mut buf).unwrap_err().kind(),
            io::ErrorKind::WouldBlock
        );
        peer.write_all(&frame[100..]).unwrap();
        // And a second frame behind it, whole.
        peer.write_all(&2u32.to_be_bytes()).unwrap();
        peer.write_all(b"ok").unwrap();
        assert_eq!(be.read(&mut buf).unwrap(), VNET_HDR_LEN + 300);
        assert!(buf[..VNET_HDR_LEN].iter().all(|&b| b == 0));
        assert_eq!(&buf[VNET_HDR_LEN..VNET_HDR_LEN + 300], &frame[..]);
        assert_eq!(be.read(&mut buf).unwrap(), VNET_HDR_LEN + 2);
        assert_eq!(&buf[VNET_HDR_LEN..VNET_HDR_LEN + 2], b"ok");
        // A short buffer gets the frame cut short.
        peer.write_all(&10u32.to_be_bytes()).unwrap();
        peer.write_all(&[9; 10]).unwrap();
        let mut short = [0u8; VNET_HDR_LEN + 4];
        assert_eq!(be.read(&mut short).unwrap(), VNET_HDR_LEN + 4);
        assert_eq!(&short[VNET_HDR_LEN..], &[9; 4]);
        drop(peer);
        assert_eq!(be.read(&mut buf).unwrap(), 0, "closed");
    }

    #[test]
    fn a_frame_length_out_of_range_breaks_the_stream() {
        for len in [0u32, MAX_STREAM_FRAME as u32 + 1, u32::MAX] {
            let (mut be, mut peer) = pair();
            peer.write_all(&len.to_be_bytes()).unwrap();
            peer.write_all(&[1; 64]).unwrap();
            let mut buf = vec![0; MAX_FRAME];
            let e = be.read(&mut buf).unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::InvalidData, "{len}");
            assert!(e.to_string().contains("out of step"), "{e}");
            assert_eq!(be.read(&mut buf).unwrap(), 0, "read as closed after");
        }
        // The longest frame is fine.
        let (mut be, mut peer) = pair();
        let big = vec![3u8; MAX_STREAM_FRAME];
        let writer = std::thread::spawn(move || {
            peer.write_all(&(MAX_STREAM_FRAME as u32).to_be_bytes())
                .unwrap();
            peer.write_all(&big).unwrap();
            peer
        });
        let mut buf = vec![0; MAX_FRAME];
        let n = loop {
            match be.read(&mut buf) {
                Ok(n) => break n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    std::thread::sleep(std::time::Duration::from_millis(1))
                }
                Err(e) => panic!("{e}"),
            }
        };
        assert_eq!(n, MAX_FRAME);
        drop(writer.join().unwrap());
    }

    #[test]
    fn a_full_socket_never_puts_the_stream_out_of_step() {
        let (mut be, mut peer) = pair();
        // Write numbered 9000-byte frames until the socket is full: the
        // first refused one is dropped whole, and one before it may have
        // gone in part.
        let frame = |i: u8| with_header(&[i; 9000]);
        let mut sent = Vec::new();
        for i in 0..=255u8 {
            match be.write(&frame(i)) {
                Ok(_) => sent.push(i),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => panic!("{e}"),
            }
        }
        assert!(sent.len() < 256, "the socket filled up");
        let backlog = be.tx_backlog();
        // Drain the peer side, then send one more: the rest goes first.
        peer.set_nonblocking(true).unwrap();
        let mut bytes = Vec::new();
        let mut chunk = vec![0; 65536];
        let mut drain = |bytes: &mut Vec<u8>| loop {
            match peer.read(&mut chunk) {
                Ok(n) => bytes.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => panic!("{e}"),
            }
        };
        drain(&mut bytes);
        be.write(&frame(250)).unwrap();
        sent.push(250);
        assert_eq!(be.tx_backlog(), 0, "had {backlog} bytes waiting");
        drain(&mut bytes);
        // Every frame sent arrived whole and in order.
        let mut at = 0;
        for &i in &sent {
            let len = u32::from_be_bytes(bytes[at..at + 4].try_into().unwrap()) as usize;
            assert_eq!(len, 9000);
            assert!(bytes[at + 4..at + 4 + len].iter().all(|&b| b == i));
            at += 4 + len;
        }
        assert_eq!(at, bytes.len());
    }

    #[test]
    fn offloads_are_refused_and_the_fd_is_the_socket() {
        let (mut be, _peer) = pair();
        assert!(be.set_offload(0).is_ok());
        assert!(be.set_offload(libc::TUN_F_CSUM).is_err());
        assert!(be.raw_fd().is_some());
    }
}
