//! `virtio_net_tx` and `virtio_net_rx`: a guest memory image with both
//! queues' rings, and a sequence of driver and network actions, against a
//! virtio-net device whose tap is one end of a datagram socketpair.
//!
//! Input: [`NetHeader`], a section of operations, then the memory image.
//! The two targets read the same format; their operation tables differ
//! ([`TX_OPS`], [`RX_OPS`]): the transmit target only notifies the
//! transmit queue and changes guest memory, the receive target also
//! sends frames of any length into the tap and lets the device read them.
//!
//! The other end of the socketpair is read after every operation: every
//! frame the device transmitted must hold the virtio-net header and fit
//! [`MAX_FRAME`], and the device's counters must match what arrived. A
//! mismatch panics: it is a bug in the device.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixDatagram;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use arbitrary::Arbitrary;
use ember_memory::GuestMemoryMmap;
use ember_memory::Slice;
use ember_virtio::{ActivateContext, VirtioDevice};
use ember_virtio_net::{Net, NetBackend, MAX_FRAME, QUEUE_SIZE, VNET_HDR_LEN};
use libc::{TUN_F_CSUM, TUN_F_TSO4, TUN_F_TSO6, TUN_F_TSO_ECN, TUN_F_UFO};
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;

use crate::guest::{guest_memory, init_logging, negotiated, poke, Irq, QueueSetup};
use crate::input::Input;

/// `NetHeader::flags`: the device offers checksum and segmentation
/// offloads.
pub const FLAG_OFFLOADS: u8 = 1;
/// `NetHeader::flags`: raising an interrupt fails.
pub const FLAG_IRQ_FAILS: u8 = 2;
/// `NetHeader::flags`: setting the tap's offloads fails.
pub const FLAG_OFFLOAD_FAILS: u8 = 4;

/// The fixed part of the input.
#[derive(Arbitrary, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NetHeader {
    /// `FLAG_*` bits.
    pub flags: u8,
    /// The features the driver acknowledges (masked by the device's offer,
    /// VIRTIO_F_VERSION_1 added, as the transport does).
    pub acked: u64,
    /// The receive queue (0).
    pub rx: QueueSetup,
    /// The transmit queue (1).
    pub tx: QueueSetup,
}

/// What an operation does; an operation is its table index (the opcode
/// byte modulo the table's length) followed by its arguments.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NetOp {
    /// `process_queue(0)`: the driver added receive buffers.
    NotifyRx,
    /// `process_queue(1)`: the driver added frames to send.
    NotifyTx,
    /// `process_backend()`: the tap is readable.
    Backend,
    /// A frame arrives on the tap: u16 length, u8 "add 64 KiB" flag (bit
    /// 0), the 12 header bytes, u8 payload byte.
    Frame,
    /// Write to guest memory: u32 address, u8 length (up to 16), bytes.
    Poke,
    /// Reset the device and activate it again on fresh queues.
    Reset,
    /// The other end of the tap goes away.
    ClosePeer,
    /// Config space access (u8 offset, u8 length up to 16) and a
    /// notification of a queue that does not exist.
    Config,
}

/// The transmit target's operations.
pub const TX_OPS: &[NetOp] = &[
    NetOp::NotifyTx,
    NetOp::Poke,
    NetOp::Reset,
    NetOp::ClosePeer,
    NetOp::Config,
];

/// The receive target's operations.
pub const RX_OPS: &[NetOp] = &[
    NetOp::NotifyRx,
    NetOp::NotifyTx,
    NetOp::Backend,
    NetOp::Frame,
    NetOp::Poke,
    NetOp::Reset,
    NetOp::ClosePeer,
    NetOp::Config,
];

/// The offloads a tap accepts.
const TUN_OFFLOADS: u32 = TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6 | TUN_F_TSO_ECN | TUN_F_UFO;

/// A tap made of one end of a datagram socketpair: one frame per
/// datagram, non-blocking, a frame longer than the read buffer cut short,
/// as with a real tap.
pub(crate) struct SocketTap {
    sock: UnixDatagram,
    offload_fails: bool,
    /// Where `read_vectored` receives a frame before copying it into the
    /// guest's buffers (kept, so that a read does not allocate).
    rx_buf: Vec<u8>,
}

impl SocketTap {
    pub(crate) fn new(sock: UnixDatagram, offload_fails: bool) -> SocketTap {
        SocketTap {
            sock,
            offload_fails,
            rx_buf: Vec::new(),
        }
    }
}

impl NetBackend for SocketTap {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.sock.recv(buf)
    }

    /// As a tap's `readv`: one datagram into the buffers in turn (through a
    /// kept buffer: the harness has no `unsafe`).
    fn read_vectored(&mut self, bufs: &[Slice<'_>]) -> io::Result<usize> {
        let total: usize = bufs.iter().map(|s| s.len()).sum();
        if self.rx_buf.len() < total {
            self.rx_buf.resize(total, 0);
        }
        let n = self.sock.recv(&mut self.rx_buf[..total])?;
        let mut at = 0;
        for s in bufs {
            if at >= n {
                break;
            }
            let k = s.len().min(n - at);
            s.copy_from(&self.rx_buf[at..at + k]);
            at += k;
        }
        Ok(n)
    }

    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.sock.send(buf)
    }

    fn set_offload(&mut self, flags: u32) -> io::Result<()> {
        assert_eq!(
            flags & !TUN_OFFLOADS,
            0,
            "virtio-net bug: unknown tap offload flags {flags:#x}"
        );
        if self.offload_fails {
            return Err(io::ErrorKind::InvalidInput.into());
        }
        Ok(())
    }

    fn raw_fd(&self) -> Option<RawFd> {
        Some(self.sock.as_raw_fd())
    }
}

/// The device and the host's side of its tap.
pub(crate) struct Rig {
    pub(crate) net: Net,
    mem: GuestMemoryMmap,
    irq: Arc<Irq>,
    header: NetHeader,
    peer: Option<UnixDatagram>,
    buf: Vec<u8>,
    pub(crate) frames_in: u64,
    pub(crate) frames_out: u64,
    bytes_out: u64,
}

impl Rig {
    fn new(header: NetHeader, mem: GuestMemoryMmap) -> Option<Rig> {
        let (dev_end, peer) = UnixDatagram::pair().ok()?;
        dev_end.set_nonblocking(true).ok()?;
        peer.set_nonblocking(true).ok()?;
        let tap = SocketTap::new(dev_end, header.flags & FLAG_OFFLOAD_FAILS != 0);
        let mac = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];
        let net = Net::with_backend(Box::new(tap), mac, header.flags & FLAG_OFFLOADS != 0);
        let irq = Arc::new(Irq::default());
        irq.fail
            .store(header.flags & FLAG_IRQ_FAILS != 0, Ordering::Relaxed);
        Some(Rig {
            net,
            mem,
            irq,
            header,
            peer: Some(peer),
            buf: vec![0; 2 * MAX_FRAME],
            frames_in: 0,
            frames_out: 0,
            bytes_out: 0,
        })
    }

    /// Activates the device as the transport would; false if the
    /// transport would not (a queue is invalid).
    fn activate(&mut self) -> bool {
        // The control queue has its own target (`virtio_net_ctrl`).
        let acked = negotiated(self.header.acked, self.net.avail_features())
            & !(1 << virtio_bindings::virtio_net::VIRTIO_NET_F_CTRL_VQ);
        let event_idx = acked & (1 << VIRTIO_RING_F_EVENT_IDX) != 0;
        let (Some(rx), Some(tx)) = (
            self.header.rx.queue(QUEUE_SIZE, &self.mem, event_idx),
            self.header.tx.queue(QUEUE_SIZE, &self.mem, event_idx),
        ) else {
            return false;
        };
        let ctx = ActivateContext {
            mem: self.mem.clone(),
            interrupt: self.irq.clone(),
            queues: vec![rx, tx],
            acked_features: acked,
        };
        self.net.activate(ctx).is_ok()
    }

    /// Sends a frame into the tap, as the host network would.
    fn frame(&mut self, ops: &mut Input<'_>) {
        let len = usize::from(ops.u16()) + if ops.u8() & 1 != 0 { 0x1_0000 } else { 0 };
        let header = ops.bytes(VNET_HDR_LEN);
        let seed = ops.u8();
        let frame = &mut self.buf[..len];
        frame.fill(seed);
        let n = header.len().min(len);
        frame[..n].copy_from_slice(&header[..n]);
        if let Some(peer) = &self.peer {
            // A full socket drops the frame, as a full tap queue would.
            if peer.send(frame).is_ok() {
                self.frames_in += 1;
            }
        }
    }

    /// Reads what the device transmitted and checks it against the
    /// device's counters.
    fn drain(&mut self) {
        if let Some(peer) = &self.peer {
            while let Ok(n) = peer.recv(&mut self.buf) {
                assert!(
                    (VNET_HDR_LEN..=MAX_FRAME).contains(&n),
                    "virtio-net bug: transmitted a {n}-byte frame"
                );
                self.frames_out += 1;
                self.bytes_out += (n - VNET_HDR_LEN) as u64;
            }
        }
        let c = self.net.counters();
        assert_eq!(
            (c.tx_packets, c.tx_bytes),
            (self.frames_out, self.bytes_out),
            "virtio-net bug: the transmit counters do not match what the tap got"
        );
        assert!(
            c.rx_packets + c.rx_dropped <= self.frames_in,
            "virtio-net bug: {} frames received or dropped, {} sent: {c:?}",
            c.rx_packets + c.rx_dropped,
            self.frames_in
        );
    }

    fn run_op(&mut self, op: NetOp, ops: &mut Input<'_>) {
        match op {
            NetOp::NotifyRx => self.net.process_queue(0),
            NetOp::NotifyTx => self.net.process_queue(1),
            NetOp::Backend => {
                self.net.process_backend();
            }
            NetOp::Frame => self.frame(ops),
            NetOp::Poke => {
                let addr = u64::from(ops.u32());
                let len = usize::from(ops.u8() % 17);
                poke(&self.mem, addr, ops.bytes(len));
            }
            NetOp::Reset => {
                self.net.reset();
                self.activate();
            }
            NetOp::ClosePeer => self.peer = None,
            NetOp::Config => {
                let offset = u64::from(ops.u8());
                let mut buf = [0u8; 16];
                let len = usize::from(ops.u8() % 17);
                self.net.read_config(offset, &mut buf[..len]);
                self.net.write_config(offset, &buf[..len]);
                self.net.process_queue(2 + usize::from(ops.u8()));
            }
        }
        self.drain();
    }
}

/// Runs one input with the operations of `table`; the device afterwards,
/// if it was activated.
pub(crate) fn run(data: &[u8], table: &[NetOp], default: NetOp) -> Option<Rig> {
    init_logging();
    let mut input = Input::new(data);
    let header: NetHeader = input.read();
    let mut ops = input.section();
    let mem = guest_memory(input.rest());
    let mut rig = Rig::new(header, mem)?;
    if !rig.activate() {
        return None;
    }
    if ops.is_empty() {
        rig.run_op(default, &mut ops);
    }
    while !ops.is_empty() {
        let op = table[usize::from(ops.u8()) % table.len()];
        rig.run_op(op, &mut ops);
    }
    Some(rig)
}

/// The `virtio_net_tx` target.
pub fn virtio_net_tx(data: &[u8]) {
    run(data, TX_OPS, NetOp::NotifyTx);
}

/// The `virtio_net_rx` target.
pub fn virtio_net_rx(data: &[u8]) {
    run(data, RX_OPS, NetOp::Backend);
}
