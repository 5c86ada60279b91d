//! The device driven as a guest driver would, on a real guest memory, with
//! real Unix sockets on the host side.

// Test values are small: casts of lengths and indices cannot truncate.
#![allow(clippy::cast_possible_truncation)]

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::time::Duration;

use virtio_queue::desc::{split::Descriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use vm_memory::Address;

use super::packet::*;
use super::*;

const MEM: usize = 32 << 20;
const QSIZE: u16 = 256;
const WRITE: u16 = 2;
const CID: u64 = 3;
const RX_BUF: u32 = 4096;

use ember_virtio::CountingInterrupt as Irqs;

fn tmp_dir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("ember-vsock-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A driver: three queues, and where each chain's buffer is.
struct Driver<'m> {
    mem: &'m GuestMemoryMmap,
    vqs: Vec<MockSplitQueue<'m, GuestMemoryMmap>>,
    next_desc: [u16; 3],
    seen: [u16; 3],
    buffers: [Vec<u64>; 3],
    data: u64,
}

impl<'m> Driver<'m> {
    fn new(mem: &'m GuestMemoryMmap) -> Self {
        let vqs = (0..3)
            .map(|i| MockSplitQueue::create(mem, GuestAddress(0x1_0000 * i as u64), QSIZE))
            .collect();
        Driver {
            mem,
            vqs,
            next_desc: [0; 3],
            seen: [0; 3],
            buffers: Default::default(),
            data: 1 << 20,
        }
    }

    fn activate(&self, v: &mut Vsock) {
        v.activate(ActivateContext {
            mem: self.mem.clone(),
            interrupt: std::sync::Arc::new(Irqs::default()),
            queues: self.vqs.iter().map(|q| q.create_queue().unwrap()).collect(),
            acked_features: v.avail_features(),
        })
        .unwrap();
    }

    fn add(&mut self, q: usize, len: u32, flags: u16) -> u64 {
        let addr = self.data;
        self.data += u64::from(len).next_multiple_of(4096);
        let slot = self.next_desc[q];
        self.next_desc[q] += 1;
        self.vqs[q]
            .add_desc_chains(
                &[RawDescriptor::from(Descriptor::new(addr, len, flags, 0))],
                slot,
            )
            .unwrap();
        self.buffers[q].push(addr);
        addr
    }

    fn give_rx(&mut self, n: usize) {
        for _ in 0..n {
            self.add(0, RX_BUF, WRITE);
        }
    }

    fn send(&mut self, v: &mut Vsock, hdr: Header, payload: &[u8]) {
        let mut hdr = hdr;
        hdr.len = payload.len() as u32;
        let addr = self.add(1, (HDR_SIZE + payload.len()) as u32, 0);
        self.mem
            .write_slice(&hdr.to_bytes(), GuestAddress(addr))
            .unwrap();
        self.mem
            .write_slice(payload, GuestAddress(addr + HDR_SIZE as u64))
            .unwrap();
        v.process_queue(1);
    }

    /// The packets the device completed on the receive queue since last.
    fn received(&mut self) -> Vec<(Header, Vec<u8>)> {
        let used = self.vqs[0].used_addr();
        let idx: u16 = self.mem.read_obj(used.unchecked_add(2)).unwrap();
        let mut out = Vec::new();
        while self.seen[0] != idx {
            let at = used.unchecked_add(4 + 8 * u64::from(self.seen[0] % QSIZE));
            let id: u32 = self.mem.read_obj(at).unwrap();
            let len: u32 = self.mem.read_obj(at.unchecked_add(4)).unwrap();
            let addr = self.buffers[0][id as usize];
            let mut raw = [0u8; HDR_SIZE];
            self.mem.read_slice(&mut raw, GuestAddress(addr)).unwrap();
            let hdr = Header::from_bytes(&raw);
            assert_eq!(len as usize, HDR_SIZE + hdr.len as usize);
            let mut payload = vec![0u8; hdr.len as usize];
            self.mem
                .read_slice(&mut payload, GuestAddress(addr + HDR_SIZE as u64))
                .unwrap();
            out.push((hdr, payload));
            self.seen[0] = self.seen[0].wrapping_add(1);
        }
        out
    }
}

fn guest_hdr(op: u16, src_port: u32, dst_port: u32) -> Header {
    Header {
        src_cid: CID,
        dst_cid: HOST_CID,
        src_port,
        dst_port,
        type_: TYPE_STREAM,
        op,
        buf_alloc: 256 * 1024,
        ..Header::default()
    }
}

/// Serves the backend until `done` says so (at most 2 s).
fn pump(v: &mut Vsock, mut done: impl FnMut(&mut Vsock) -> bool) {
    for _ in 0..200 {
        v.process_backend();
        if done(v) {
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    panic!("the device did not get there");
}

fn device(dir: &std::path::Path) -> Vsock {
    Vsock::new(&VsockConfig {
        guest_cid: CID,
        uds_path: dir.join("v.sock"),
    })
    .unwrap()
}

fn read_line(s: &mut UnixStream) -> String {
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    while s.read(&mut b).unwrap() == 1 && b[0] != b'\n' {
        line.push(b[0]);
    }
    String::from_utf8(line).unwrap()
}

#[test]
fn headers_round_trip_and_bad_chains_are_refused() {
    let h = Header {
        src_cid: 3,
        dst_cid: 2,
        src_port: 1234,
        dst_port: 52,
        len: 9,
        type_: TYPE_STREAM,
        op: OP_RW,
        flags: 0,
        buf_alloc: 262_144,
        fwd_cnt: 77,
    };
    assert_eq!(Header::from_bytes(&h.to_bytes()), h);
    let m = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
    m.write_slice(&h.to_bytes(), GuestAddress(0x1000)).unwrap();
    // The header split over two descriptors, the payload in the second.
    let p = parse_tx(&m, &[(0x1000, 20, false), (0x1014, 24 + 9, false)]).unwrap();
    assert_eq!(p.hdr, h);
    assert_eq!(p.payload.len(), 9);
    assert_eq!(
        parse_tx(&m, &[(0x1000, 43, false)]),
        Err(PacketError::Short(43))
    );
    assert_eq!(
        parse_tx(&m, &[(0x1000, 44 + 8, false)]),
        Err(PacketError::Truncated {
            stated: 9,
            carried: 8
        })
    );
    assert_eq!(
        parse_tx(&m, &[(0x1000, 60, true)]),
        Err(PacketError::Direction)
    );
    assert_eq!(
        parse_tx(&m, &[(0x10_0000, 0x2000, false)]),
        Err(PacketError::Memory(0x10_0000))
    );
    let mut big = h;
    big.len = MAX_PAYLOAD + 1;
    m.write_slice(&big.to_bytes(), GuestAddress(0x1000))
        .unwrap();
    assert_eq!(
        parse_tx(&m, &[(0x1000, 0x2_0000, false)]),
        Err(PacketError::TooLong(MAX_PAYLOAD + 1))
    );
    assert!(RxBuffer::new(vec![(0, 40, true)]).is_err());
    assert!(RxBuffer::new(vec![(0, 100, false)]).is_err());
    assert_eq!(parse_connect(b"CONNECT 52"), Some(52));
    assert_eq!(parse_connect(b"CONNECT 4294967295 "), Some(u32::MAX));
    for bad in [
        &b"CONNECT"[..],
        b"CONNECT -1",
        b"connect 5",
        b"CONNECT 99999999999",
        b"\xff\xfe",
        b"CONNECT 5 6",
    ] {
        assert_eq!(parse_connect(bad), None, "{bad:?}");
    }
}

#[test]
fn a_host_program_reaches_a_guest_listener_and_both_ways_flow() {
    let dir = tmp_dir("host");
    let m = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM)]).unwrap();
    let mut v = device(&dir);
    let mut cid = [0u8; 8];
    v.read_config(0, &mut cid);
    assert_eq!(u64::from_le_bytes(cid), CID);
    let mut d = Driver::new(&m);
    d.give_rx(64);
    d.activate(&mut v);

    let mut host = UnixStream::connect(dir.join("v.sock")).unwrap();
    host.write_all(b"CONNECT 52\n").unwrap();
    let mut got = Vec::new();
    pump(&mut v, |_| {
        got.extend(d.received());
        !got.is_empty()
    });
    let (req, _) = got[0];
    assert_eq!(
        (req.op, req.dst_port, req.dst_cid, req.src_cid),
        (OP_REQUEST, 52, CID, HOST_CID)
    );
    assert!(req.src_port >= 1 << 30);
    let local = req.src_port;
    d.send(&mut v, guest_hdr(OP_RESPONSE, 52, local), &[]);
    assert_eq!(read_line(&mut host), format!("OK {local}"));

    // Host to guest: 100 KiB arrive in order, within the guest's credit.
    let data: Vec<u8> = (0..100 * 1024u32).map(|i| (i * 7 % 251) as u8).collect();
    host.write_all(&data).unwrap();
    let mut echoed = Vec::new();
    pump(&mut v, |_| {
        for (h, p) in d.received() {
            assert_eq!((h.op, h.src_port, h.dst_port), (OP_RW, local, 52));
            echoed.extend(p);
        }
        echoed.len() == data.len()
    });
    assert_eq!(echoed, data);

    // Guest to host.
    d.send(&mut v, guest_hdr(OP_RW, 52, local), b"from the guest");
    let mut buf = [0u8; 14];
    host.read_exact(&mut buf).unwrap();
    assert_eq!(&buf, b"from the guest");
    assert_eq!(v.counters().tx_bytes, 14);
    assert_eq!(v.counters().rx_bytes, data.len() as u64);

    // The guest closes: the host reads the end, the guest gets a reset.
    d.send(
        &mut v,
        guest_hdr(OP_SHUTDOWN, 52, local).with_flags(SHUTDOWN_RCV | SHUTDOWN_SEND),
        &[],
    );
    assert_eq!(host.read(&mut buf).unwrap(), 0);
    let rst: Vec<_> = d.received().into_iter().map(|(h, _)| h.op).collect();
    assert_eq!(rst, vec![OP_RST]);
    assert_eq!(v.connections(), 0);
    drop(v);
    assert!(
        !dir.join("v.sock").exists(),
        "the socket file goes with the device"
    );
}

#[test]
fn garbage_and_silence_on_the_socket_are_refused_and_the_device_goes_on() {
    let dir = tmp_dir("garbage");
    let m = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM)]).unwrap();
    let mut v = device(&dir);
    let mut d = Driver::new(&m);
    d.give_rx(16);
    d.activate(&mut v);
    let path = dir.join("v.sock");
    let mut clients = Vec::new();
    for junk in [
        &b"HELLO\n"[..],
        b"CONNECT x\n",
        &[b'A'; 100][..],
        b"CONNECT 99999999999\n",
    ] {
        let mut c = UnixStream::connect(&path).unwrap();
        c.write_all(junk).unwrap();
        clients.push(c);
    }
    pump(&mut v, |v| v.counters().refused_host == 4);
    for mut c in clients {
        c.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        let mut b = [0u8; 8];
        // The end, or a reset where it sent more than the device read.
        match c.read(&mut b) {
            Ok(n) => assert_eq!(n, 0, "a refused client reads the end"),
            Err(e) => assert_eq!(e.kind(), std::io::ErrorKind::ConnectionReset),
        }
    }
    assert!(d.received().is_empty(), "the guest heard nothing of them");
    // A good client still gets through.
    let mut c = UnixStream::connect(&path).unwrap();
    c.write_all(b"CONNECT 7\n").unwrap();
    let mut got = Vec::new();
    pump(&mut v, |_| {
        got.extend(d.received());
        !got.is_empty()
    });
    assert_eq!((got[0].0.op, got[0].0.dst_port), (OP_REQUEST, 7));
    // The guest has no listener there: it resets, the client reads the end.
    d.send(&mut v, guest_hdr(OP_RST, 7, got[0].0.src_port), &[]);
    let mut b = [0u8; 8];
    assert_eq!(c.read(&mut b).unwrap(), 0);
    assert_eq!(v.connections(), 0);
}

#[test]
fn the_guest_reaches_host_listeners_and_is_reset_where_none_listens() {
    let dir = tmp_dir("guest");
    let m = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM)]).unwrap();
    let mut v = device(&dir);
    let mut d = Driver::new(&m);
    d.give_rx(32);
    d.activate(&mut v);
    let listener = UnixListener::bind(dir.join("v.sock_1234")).unwrap();

    d.send(&mut v, guest_hdr(OP_REQUEST, 5000, 1234), &[]);
    let (mut s, _) = listener.accept().unwrap();
    let got = d.received();
    assert_eq!(
        (got[0].0.op, got[0].0.src_port, got[0].0.dst_port),
        (OP_RESPONSE, 1234, 5000)
    );
    d.send(&mut v, guest_hdr(OP_RW, 5000, 1234), b"ping");
    let mut b = [0u8; 4];
    s.read_exact(&mut b).unwrap();
    assert_eq!(&b, b"ping");
    s.write_all(b"pong").unwrap();
    drop(s);
    let mut all = Vec::new();
    pump(&mut v, |_| {
        all.extend(d.received());
        all.iter().any(|(h, _)| h.op == OP_SHUTDOWN)
    });
    assert_eq!((all[0].0.op, all[0].1.as_slice()), (OP_RW, &b"pong"[..]));
    let shut = all.last().unwrap().0;
    assert_eq!(shut.flags & SHUTDOWN_SEND, SHUTDOWN_SEND);

    // No listener on 4321, and a request from a wrong CID: resets / nothing.
    d.send(&mut v, guest_hdr(OP_REQUEST, 5001, 4321), &[]);
    let got = d.received();
    assert_eq!((got[0].0.op, got[0].0.dst_port), (OP_RST, 5001));
    let mut spoofed = guest_hdr(OP_REQUEST, 5002, 1234);
    spoofed.src_cid = 9;
    d.send(&mut v, spoofed, &[]);
    assert!(d.received().is_empty());
    assert_eq!(v.counters().refused_guest, 1);
}

#[test]
fn a_guest_that_ignores_its_credit_is_reset() {
    let dir = tmp_dir("credit");
    let m = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM)]).unwrap();
    let mut v = device(&dir);
    let mut d = Driver::new(&m);
    d.give_rx(32);
    d.activate(&mut v);
    let listener = UnixListener::bind(dir.join("v.sock_80")).unwrap();
    d.send(&mut v, guest_hdr(OP_REQUEST, 6000, 80), &[]);
    let (_s, _) = listener.accept().unwrap();
    assert_eq!(d.received()[0].0.op, OP_RESPONSE);
    // The host never reads: the socket buffer fills, then the device keeps
    // up to CONN_BUF bytes; past that the guest broke the protocol.
    let chunk = vec![0x5au8; MAX_PAYLOAD as usize];
    let mut reset = false;
    for _ in 0..64 {
        d.send(&mut v, guest_hdr(OP_RW, 6000, 80), &chunk);
        if d.received().iter().any(|(h, _)| h.op == OP_RST) {
            reset = true;
            break;
        }
    }
    assert!(reset, "no reset after 4 MiB against a 256 KiB credit");
    assert_eq!(v.connections(), 0);
}

impl Header {
    fn with_flags(mut self, flags: u32) -> Self {
        self.flags = flags;
        self
    }
}

#[test]
fn a_restored_device_tells_the_guest_its_transport_was_reset() {
    let dir = tmp_dir("restore");
    let m = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM)]).unwrap();
    let mut v = device(&dir);
    let state = v.state();
    assert_eq!(state.guest_cid, CID);
    let mut other = state.clone();
    other.guest_cid = 9;
    assert!(v.restore_state(&other).is_err(), "another CID is refused");
    v.restore_state(&state).unwrap();
    let mut d = Driver::new(&m);
    let event = d.add(2, 8, WRITE);
    m.write_obj(0xffff_ffffu32, GuestAddress(event)).unwrap();
    d.activate(&mut v);
    let used = d.vqs[2].used_addr();
    let idx: u16 = m.read_obj(used.unchecked_add(2)).unwrap();
    let len: u32 = m.read_obj(used.unchecked_add(8)).unwrap();
    let id: u32 = m.read_obj(GuestAddress(event)).unwrap();
    assert_eq!(
        (idx, len, id),
        (1, 4, 0),
        "one VIRTIO_VSOCK_EVENT_TRANSPORT_RESET"
    );
    assert_eq!(v.queue_states().len(), 3);
}
