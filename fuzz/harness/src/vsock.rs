//! `virtio_vsock`: the vsock packet parser, on its own and through a
//! virtio-vsock device whose host side is real Unix sockets.
//!
//! The harness lays the three queues out at fixed places (16 entries each)
//! and builds chains the way a driver would, from the input's operations,
//! each an opcode byte (modulo [`OPS`]) and its arguments:
//!
//! - [`Op::GuestSend`]: a packet from the guest: op, ports, flags, credit
//!   fields, a payload (its stated and real lengths may differ), and a
//!   layout byte (header split over two descriptors, a writable descriptor,
//!   a wrong CID or type); the transmit queue is then processed.
//! - [`Op::RxBuffers`]: receive buffers of any size (some too small for a
//!   header), then the receive queue is processed.
//! - [`Op::Backend`]: the host side's events are served.
//! - [`Op::HostConnect`] / [`Op::HostWrite`] / [`Op::HostClose`]: a host
//!   program connects to `uds_path` and writes a line (any bytes), writes
//!   more, or leaves.
//! - [`Op::HostAccept`]: the host listener on `<uds_path>_1234` accepts a
//!   guest connection and answers.
//! - [`Op::Parse`]: raw descriptors (any addresses, lengths, directions)
//!   through `parse_tx` and `RxBuffer::new`, and bytes through
//!   `parse_connect`.
//! - [`Op::Reset`]: the driver resets the device and sets it up again.
//!
//! What the device promises: it never completes a receive buffer with more
//! bytes than the buffer holds, and never keeps more than
//! [`MAX_CONNECTIONS`] connections.

// Every cast is of a small bounded value (descriptor indices, lengths of a
// few KiB).
#![allow(clippy::cast_possible_truncation)]

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use ember_memory::GuestMemoryMmap;
use ember_virtio::{ActivateContext, VirtioDevice};
use ember_virtio_vsock::packet::{Header, HDR_SIZE, TYPE_STREAM};
use ember_virtio_vsock::{
    parse_connect, parse_tx, RxBuffer, Vsock, VsockConfig, HOST_CID, MAX_CONNECTIONS,
};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};

use crate::guest::{guest_memory, init_logging, poke, Irq, HIGH_BASE};
use crate::input::Input;

/// The guest's CID.
const CID: u64 = 3;
/// The host port a host listener serves.
const HOST_PORT: u32 = 1234;
/// Entries per queue.
const QSIZE: u16 = 16;
/// Where each queue's descriptor table, avail and used rings are.
const QUEUES: [(u64, u64, u64); 3] = [
    (0x0000, 0x0100, 0x0200),
    (0x0400, 0x0500, 0x0600),
    (0x0800, 0x0900, 0x0a00),
];
/// Receive buffers: 16 slots of 4 KiB in the high region.
const RX_BUF: u64 = HIGH_BASE;
/// Transmit buffers: 8 slots of 4 KiB from here.
const TX_BUF: u64 = 0x8000;
const WRITE: u16 = 2;
const NEXT: u16 = 1;

/// The operations.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    /// A packet from the guest.
    GuestSend,
    /// Receive buffers.
    RxBuffers,
    /// Host-side events.
    Backend,
    /// A host program connects.
    HostConnect,
    /// A host program writes.
    HostWrite,
    /// A host program leaves.
    HostClose,
    /// The host listener accepts.
    HostAccept,
    /// The parsers alone.
    Parse,
    /// Driver reset.
    Reset,
}

/// Opcode byte modulo this list's length.
pub const OPS: [Op; 9] = [
    Op::GuestSend,
    Op::RxBuffers,
    Op::Backend,
    Op::HostConnect,
    Op::HostWrite,
    Op::HostClose,
    Op::HostAccept,
    Op::Parse,
    Op::Reset,
];

/// A driver's view of its queues.
struct Driver {
    mem: GuestMemoryMmap,
    avail: [u16; 3],
    slot: [u16; 3],
    /// Each receive descriptor's size, by head.
    rx_sizes: [u32; QSIZE as usize],
    seen_used: u16,
}

impl Driver {
    /// A driver that set its queues up afresh: empty rings.
    fn new(mem: &GuestMemoryMmap) -> Self {
        for (_, a, u) in QUEUES {
            poke(mem, a, &[0; 4]);
            poke(mem, u, &[0; 4]);
        }
        Driver {
            mem: mem.clone(),
            avail: [0; 3],
            slot: [0; 3],
            rx_sizes: [0; QSIZE as usize],
            seen_used: 0,
        }
    }

    fn queues(&self) -> Vec<Queue> {
        QUEUES
            .iter()
            .filter_map(|&(d, a, u)| {
                let mut q = Queue::new(QSIZE).ok()?;
                q.set_size(QSIZE);
                q.set_desc_table_address(Some(d as u32), Some(0));
                q.set_avail_ring_address(Some(a as u32), Some(0));
                q.set_used_ring_address(Some(u as u32), Some(0));
                q.set_ready(true);
                Some(q)
            })
            .collect()
    }

    fn desc(&self, q: usize, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let mut d = [0u8; 16];
        d[..8].copy_from_slice(&addr.to_le_bytes());
        d[8..12].copy_from_slice(&len.to_le_bytes());
        d[12..14].copy_from_slice(&flags.to_le_bytes());
        d[14..].copy_from_slice(&next.to_le_bytes());
        poke(&self.mem, QUEUES[q].0 + 16 * u64::from(i % QSIZE), &d);
    }

    /// Publishes a chain starting at descriptor `head`.
    fn publish(&mut self, q: usize, head: u16) {
        let ring = QUEUES[q].1;
        let at = ring + 4 + 2 * u64::from(self.avail[q] % QSIZE);
        poke(&self.mem, at, &(head % QSIZE).to_le_bytes());
        self.avail[q] = self.avail[q].wrapping_add(1);
        poke(&self.mem, ring + 2, &self.avail[q].to_le_bytes());
    }

    fn next_slot(&mut self, q: usize, n: u16) -> u16 {
        let s = self.slot[q];
        self.slot[q] = (self.slot[q] + n) % QSIZE;
        s
    }

    /// Checks every receive completion since the last look: never more
    /// bytes than the buffer holds.
    fn check_rx_used(&mut self) {
        let used = QUEUES[0].2;
        let Ok(idx) = self.mem.read_obj::<u16>(GuestAddress(used + 2)) else {
            return;
        };
        while self.seen_used != idx {
            let at = used + 4 + 8 * u64::from(self.seen_used % QSIZE);
            let id: u32 = self.mem.read_obj(GuestAddress(at)).unwrap_or(0);
            let len: u32 = self.mem.read_obj(GuestAddress(at + 4)).unwrap_or(0);
            let size = self.rx_sizes[(id % u32::from(QSIZE)) as usize];
            assert!(
                len <= size,
                "receive buffer {id} of {size} bytes completed with {len}"
            );
            self.seen_used = self.seen_used.wrapping_add(1);
        }
    }
}

/// A path no other run of this process uses.
fn uds_path() -> PathBuf {
    static N: AtomicU64 = AtomicU64::new(0);
    let n = N.fetch_add(1, Ordering::Relaxed);
    std::env::temp_dir().join(format!("ember-fuzz-vsock-{}-{n}", std::process::id()))
}

/// The `virtio_vsock` target.
pub fn virtio_vsock(data: &[u8]) {
    init_logging();
    let mut input = Input::new(data);
    let mut ops = input.section();
    let mem = guest_memory(input.rest());
    let uds = uds_path();
    let host_path = PathBuf::from(format!("{}_{HOST_PORT}", uds.display()));
    let _ = std::fs::remove_file(&host_path);
    let Ok(listener) = UnixListener::bind(&host_path) else {
        return;
    };
    let _ = listener.set_nonblocking(true);
    let Ok(mut dev) = Vsock::new(&VsockConfig {
        guest_cid: CID,
        uds_path: uds.clone(),
    }) else {
        let _ = std::fs::remove_file(&host_path);
        return;
    };
    // The rings start empty whatever the image holds there.
    let mut driver = Driver::new(&mem);
    let activate = |dev: &mut Vsock, driver: &Driver| {
        dev.activate(ActivateContext {
            mem: mem.clone(),
            interrupt: Arc::new(Irq::default()),
            queues: driver.queues(),
            acked_features: dev.avail_features(),
        })
        .is_ok()
    };
    if !activate(&mut dev, &driver) {
        return;
    }
    let mut hosts: Vec<UnixStream> = Vec::new();
    let mut accepted: Vec<UnixStream> = Vec::new();
    while !ops.is_empty() {
        match OPS[usize::from(ops.u8()) % OPS.len()] {
            Op::GuestSend => guest_send(&mut ops, &mut dev, &mut driver),
            Op::RxBuffers => {
                let count = ops.u8() % 8;
                for _ in 0..count {
                    let size = u32::from(ops.u16() % 4200);
                    let head = driver.next_slot(0, 1);
                    driver.rx_sizes[usize::from(head)] = size;
                    let addr = RX_BUF + 4096 * u64::from(head % 16);
                    driver.desc(0, head, addr, size, WRITE, 0);
                    driver.publish(0, head);
                }
                dev.process_queue(0);
            }
            Op::Backend => {
                dev.process_backend();
            }
            Op::HostConnect => {
                let n = usize::from(ops.u8() % 40);
                let line = ops.bytes(n);
                if hosts.len() < 8 {
                    if let Ok(mut s) = UnixStream::connect(&uds) {
                        let _ = s.set_nonblocking(true);
                        let _ = s.write_all(line);
                        hosts.push(s);
                    }
                }
            }
            Op::HostWrite => {
                let i = usize::from(ops.u8());
                let n = usize::from(ops.u16() % 8192);
                let bytes = ops.bytes(n);
                let len = hosts.len() + accepted.len();
                if len > 0 {
                    let i = i % len;
                    let s = if i < hosts.len() {
                        &mut hosts[i]
                    } else {
                        &mut accepted[i - hosts.len()]
                    };
                    let _ = s.write(bytes);
                    let mut sink = [0u8; 4096];
                    let _ = s.read(&mut sink);
                }
            }
            Op::HostClose => {
                let i = usize::from(ops.u8());
                if !hosts.is_empty() {
                    hosts.swap_remove(i % hosts.len());
                } else if !accepted.is_empty() {
                    accepted.swap_remove(i % accepted.len());
                }
            }
            Op::HostAccept => {
                if let Ok((s, _)) = listener.accept() {
                    let _ = s.set_nonblocking(true);
                    accepted.push(s);
                }
            }
            Op::Parse => parse(&mut ops, &mem),
            Op::Reset => {
                dev.reset();
                driver = Driver::new(&mem);
                if !activate(&mut dev, &driver) {
                    break;
                }
            }
        }
        driver.check_rx_used();
        assert!(dev.connections() <= MAX_CONNECTIONS);
    }
    drop(dev);
    let _ = std::fs::remove_file(&host_path);
    assert!(!uds.exists(), "the device removes its socket file");
}

/// A packet from the guest, laid out from the input.
fn guest_send(ops: &mut Input<'_>, dev: &mut Vsock, driver: &mut Driver) {
    let op = ops.u8() % 9;
    let src_port = ops.u32();
    let dst_port = if ops.u8() % 2 == 0 {
        HOST_PORT
    } else {
        ops.u32()
    };
    let flags = u32::from(ops.u8());
    let buf_alloc = ops.u32();
    let fwd_cnt = ops.u32();
    let layout = ops.u8();
    let real = ops.u16() % 4000;
    let stated = if layout & 8 != 0 {
        ops.u32()
    } else {
        u32::from(real)
    };
    let payload = ops.bytes(usize::from(real));
    let hdr = Header {
        src_cid: if layout & 16 != 0 { 9 } else { CID },
        dst_cid: HOST_CID,
        src_port,
        dst_port,
        len: stated,
        type_: if layout & 32 != 0 { 2 } else { TYPE_STREAM },
        op: u16::from(op),
        flags,
        buf_alloc,
        fwd_cnt,
    };
    let head = driver.next_slot(1, 2);
    let addr = TX_BUF + 4096 * u64::from(head / 2 % 8);
    poke(&driver.mem, addr, &hdr.to_bytes());
    poke(&driver.mem, addr + HDR_SIZE as u64, payload);
    let total = (HDR_SIZE + payload.len()) as u32;
    let write = if layout & 4 != 0 { WRITE } else { 0 };
    if layout & 1 != 0 {
        // The header split over two descriptors.
        let cut = u32::from(layout >> 6) * 10 + 1;
        driver.desc(1, head, addr, cut, NEXT, (head + 1) % QSIZE);
        driver.desc(1, head + 1, addr + u64::from(cut), total - cut, write, 0);
    } else {
        driver.desc(1, head, addr, total, write, 0);
    }
    driver.publish(1, head);
    dev.process_queue(1);
}

/// The parsers on their own.
fn parse(ops: &mut Input<'_>, mem: &GuestMemoryMmap) {
    let n = ops.u8() % 4;
    let descs: Vec<_> = (0..n)
        .map(|_| {
            (
                ops.u64() % 0x4_0000,
                ops.u32() % 0x2_0000,
                ops.u8() % 2 == 1,
            )
        })
        .collect();
    if let Ok(p) = parse_tx(mem, &descs) {
        assert!(p.payload.len() as u64 <= u64::from(ember_virtio_vsock::MAX_PAYLOAD));
    }
    if let Ok(b) = RxBuffer::new(descs) {
        // Into a memory of its own: the device's rings stay the driver's.
        let scratch = guest_memory(&[]);
        let _ = b.write(&scratch, &Header::default(), &[0x5a; 64]);
    }
    let len = usize::from(ops.u8() % 40);
    let _ = parse_connect(ops.bytes(len));
}

/// Seeds: a guest connection to the host listener with data both ways, a
/// host connection to a guest port, garbage on the socket, and the
/// parsers.
pub fn seeds() -> Vec<crate::seeds::NamedSeed> {
    use crate::input::Seed;
    let op = |o: Op| OPS.iter().position(|x| *x == o).unwrap_or(0) as u8;
    let send = |s: &mut Seed, vop: u8, payload: &[u8], layout: u8| {
        s.u8(op(Op::GuestSend)).u8(vop).u32(5000).u8(0);
        s.u8(0).u32(262_144).u32(0).u8(layout);
        s.u16(payload.len() as u16).raw(payload);
    };
    let rx = |s: &mut Seed, n: u8| {
        s.u8(op(Op::RxBuffers)).u8(n);
        for _ in 0..n {
            s.u16(4096);
        }
    };
    let input = |ops: &Seed| {
        let mut s = Seed::new();
        s.section(ops);
        s.into_bytes()
    };

    let mut guest = Seed::new();
    rx(&mut guest, 4);
    send(&mut guest, 1, &[], 0); // REQUEST to the host listener
    guest.u8(op(Op::HostAccept));
    send(&mut guest, 5, b"hello from the guest", 1); // RW, split header
    guest.u8(op(Op::HostWrite)).u8(0).u16(5).raw(b"hello");
    guest.u8(op(Op::Backend));
    rx(&mut guest, 2);
    send(&mut guest, 7, &[], 0); // CREDIT_REQUEST
    send(&mut guest, 4, &[], 0); // SHUTDOWN
    send(&mut guest, 3, &[], 0); // RST

    let mut host = Seed::new();
    rx(&mut host, 4);
    let line = b"CONNECT 52\n";
    host.u8(op(Op::HostConnect)).u8(line.len() as u8).raw(line);
    host.u8(op(Op::Backend));
    host.u8(op(Op::HostConnect)).u8(9).raw(b"GARBAGE!\n");
    host.u8(op(Op::Backend));
    host.u8(op(Op::HostWrite)).u8(0).u16(4).raw(b"data");
    host.u8(op(Op::Backend)).u8(op(Op::HostClose)).u8(0);
    host.u8(op(Op::Backend)).u8(op(Op::Reset));
    rx(&mut host, 1);

    let mut parse = Seed::new();
    parse.u8(op(Op::Parse)).u8(2);
    parse
        .u64(TX_BUF)
        .u32(20)
        .u8(0)
        .u64(TX_BUF + 20)
        .u32(100)
        .u8(0);
    parse.u8(11).raw(b"CONNECT 99\n");
    vec![
        ("guest_connects", input(&guest)),
        ("host_connects", input(&host)),
        ("parsers", input(&parse)),
    ]
}
