//! `virtio_net_stream`: the byte stream a user-mode NIC reads from passt
//! (QEMU's `-netdev stream` framing: a 4-byte big-endian length, then the
//! frame) through [`ember_virtio_net::StreamBackend`], over a real Unix
//! socket pair, arriving in pieces of a fuzzed size and read into buffers
//! of a fuzzed size; then the input's tail is written as guest frames and
//! the peer checks every length prefix.
//!
//! Input: one byte, the size of the pieces the peer writes (1 to 256); one
//! byte, the read buffer's size (0: `MAX_FRAME`, else that many bytes);
//! two bytes (little-endian), how much of the rest is the stream; the
//! stream; the rest, guest frames of 13 to 268 bytes each.
//!
//! Checked: no panic; a frame read is never longer than its buffer and its
//! header is zero; once the stream says it is closed or out of step it
//! stays so; what the backend writes is exactly `len(frame) - 12`, then the
//! frame without its header.

use std::io::{ErrorKind, Read, Write};
use std::os::unix::net::UnixStream;

use ember_virtio_net::{NetBackend, StreamBackend, MAX_FRAME, VNET_HDR_LEN};

/// The `virtio_net_stream` target.
pub fn virtio_net_stream(data: &[u8]) {
    let [piece, bufsize, n0, n1, rest @ ..] = data else {
        return;
    };
    let piece = usize::from(*piece) + 1;
    let buf_len = match bufsize {
        0 => MAX_FRAME,
        n => usize::from(*n),
    };
    let split = usize::from(u16::from_le_bytes([*n0, *n1])).min(rest.len());
    let (stream, frames) = rest.split_at(split);
    let Ok((ours, mut peer)) = UnixStream::pair() else {
        return;
    };
    let Ok(mut backend) = StreamBackend::new(ours) else {
        return;
    };
    let mut buf = vec![0u8; buf_len];
    let mut ended = false;
    for chunk in stream.chunks(piece) {
        // A stream out of step is not read any more: stop before the
        // socket fills.
        if ended || peer.write_all(chunk).is_err() {
            break;
        }
        ended |= drain(&mut backend, &mut buf, ended);
    }
    drop(peer.shutdown(std::net::Shutdown::Write));
    drain(&mut backend, &mut buf, ended);

    // Guest frames out: each arrives whole, prefixed by its length.
    let Ok(()) = peer.set_nonblocking(true) else {
        return;
    };
    let mut sent = Vec::new();
    let mut at = 0;
    while at < frames.len() {
        let len = 13 + usize::from(frames[at]);
        let frame = &frames[at..(at + len).min(frames.len())];
        at += len;
        if frame.len() < VNET_HDR_LEN {
            assert!(
                backend.write(frame).is_err(),
                "a frame shorter than its header"
            );
            continue;
        }
        match backend.write(frame) {
            Ok(n) => {
                assert_eq!(n, frame.len());
                sent.push(frame[VNET_HDR_LEN..].to_vec());
            }
            Err(e) => assert_eq!(e.kind(), ErrorKind::WouldBlock, "{e}"),
        }
    }
    let mut got = Vec::new();
    let mut chunk = [0u8; 4096];
    while let Ok(n) = peer.read(&mut chunk) {
        if n == 0 {
            break;
        }
        got.extend_from_slice(&chunk[..n]);
    }
    let mut at = 0;
    for frame in &sent {
        if at + 4 > got.len() {
            break;
        }
        let len = u32::from_be_bytes([got[at], got[at + 1], got[at + 2], got[at + 3]]) as usize;
        assert_eq!(len, frame.len(), "the length prefix");
        let end = (at + 4 + len).min(got.len());
        assert_eq!(&got[at + 4..end], &frame[..end - at - 4], "the frame");
        at += 4 + len;
    }
}

/// Reads frames until there are none; whether the stream ended (closed or
/// out of step), which it must not come back from.
fn drain(backend: &mut StreamBackend, buf: &mut [u8], ended_before: bool) -> bool {
    loop {
        match backend.read(buf) {
            Ok(0) => return true,
            Ok(n) => {
                assert!(!ended_before, "a frame after the stream ended");
                assert!(n <= buf.len(), "{n} bytes read into {}", buf.len());
                let hdr = VNET_HDR_LEN.min(n);
                assert!(buf[..hdr].iter().all(|&b| b == 0), "a zero header");
            }
            Err(e) if e.kind() == ErrorKind::WouldBlock => return ended_before,
            Err(e) => {
                assert_eq!(e.kind(), ErrorKind::InvalidData, "{e}");
                return true;
            }
        }
    }
}

/// Seeds: frames whole and cut, a length of 0 and one too long, short
/// buffers, guest frames out.
pub fn seeds() -> Vec<crate::seeds::NamedSeed> {
    let framed = |frames: &[&[u8]]| {
        let mut v = Vec::new();
        for f in frames {
            v.extend_from_slice(&u32::try_from(f.len()).unwrap_or(0).to_be_bytes());
            v.extend_from_slice(f);
        }
        v
    };
    let input = |piece: u8, buf: u8, stream: &[u8], out: &[u8]| {
        let mut v = vec![piece, buf];
        v.extend_from_slice(&u16::try_from(stream.len()).unwrap_or(0).to_le_bytes());
        v.extend_from_slice(stream);
        v.extend_from_slice(out);
        v
    };
    let arp = [0xffu8; 42];
    let big = vec![0x5au8; 1500];
    let mut guest = vec![29u8];
    guest.extend_from_slice(&[0u8; 41]);
    guest.push(0);
    guest.extend_from_slice(&[1u8; 12]);
    vec![
        (
            "whole_frames",
            input(255, 0, &framed(&[&arp, &big]), &guest),
        ),
        ("one_byte_pieces", input(0, 0, &framed(&[&arp, &arp]), &[])),
        ("short_buffer", input(16, 20, &framed(&[&big]), &[])),
        ("zero_length", input(255, 0, &[0, 0, 0, 0, 1, 2, 3], &[])),
        ("too_long", input(255, 0, &[0, 1, 0, 0, 9, 9, 9, 9], &guest)),
        ("cut_at_the_end", input(7, 0, &framed(&[&big])[..700], &[])),
    ]
}
