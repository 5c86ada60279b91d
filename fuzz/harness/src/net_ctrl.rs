//! `virtio_net_ctrl`: the control queue's command parser and the receive
//! filter it sets, both on their own and through a virtio-net device's
//! control queue in guest memory, against a shadow filter.
//!
//! Input: the features the driver acknowledges (u64), then operations,
//! each an opcode byte (modulo [`CTRL_OPS`]) and its arguments:
//!
//! - [`CtrlOp::Command`]: u8 class, u8 command, u16 data length, the data,
//!   u8 layout (bit 0: header and data in one descriptor; bit 1: no status
//!   byte; bit 2: a readable descriptor after the status). The bytes go
//!   into guest memory as a driver lays them out and the device carries
//!   the command out; the shadow [`RxFilter`] parses and applies the same
//!   bytes. A well-formed chain's status byte must be what the shadow
//!   says, and the device's saved filter must equal the shadow's.
//! - [`CtrlOp::Parse`]: u16 length and raw bytes, parsed (and applied to
//!   the shadow when they parse): the parser alone, at any length.
//! - [`CtrlOp::Frame`]: a destination picked from the filter's own
//!   addresses or the input, an optional VLAN tag: the shadow's verdict
//!   must not change when the frame is longer.
//! - [`CtrlOp::Reset`], [`CtrlOp::Announce`], [`CtrlOp::Restore`] (the
//!   device's state through JSON into a fresh device, which must save the
//!   same state).

// Every cast is of a small bounded value: at most 4 descriptors, lengths
// under 64 KiB, table indices, the descriptor flag constants.
#![allow(clippy::cast_possible_truncation)]

use std::io;
use std::os::fd::RawFd;
use std::sync::Arc;

use ember_memory::GuestMemoryMmap;
use ember_virtio::{ActivateContext, VirtioDevice};
use ember_virtio_net::ctrl::{parse, RxFilter, MAX_COMMAND_LEN, VIRTIO_NET_ERR, VIRTIO_NET_OK};
use ember_virtio_net::{Net, NetBackend, NetState, CTRL_QUEUE_SIZE, QUEUE_SIZE};
use virtio_bindings::virtio_net::VIRTIO_NET_F_CTRL_VQ;
use virtio_bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};

use crate::guest::{guest_memory, init_logging, negotiated, Irq};
use crate::input::Input;

/// The operations.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CtrlOp {
    /// A command through the device's control queue.
    Command,
    /// Raw bytes through the parser.
    Parse,
    /// A frame through the shadow filter.
    Frame,
    /// Reset the device and activate it again.
    Reset,
    /// Announce the NIC.
    Announce,
    /// Save the device's state and restore it into a fresh device.
    Restore,
}

/// The operation table.
pub const CTRL_OPS: &[CtrlOp] = &[
    CtrlOp::Command,
    CtrlOp::Parse,
    CtrlOp::Frame,
    CtrlOp::Reset,
    CtrlOp::Announce,
    CtrlOp::Restore,
];

const MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];
/// The control ring: 16 entries at 0 (descriptors, then the available and
/// used rings); the receive and transmit rings after it.
const RING: u64 = 0;
const RING_SIZE: u16 = 16;
const RX_RING: u64 = 0x400;
const TX_RING: u64 = 0x800;
/// Where a command's bytes go, and its status byte.
const CMD: u64 = 0x1000;
const CMD_MAX: usize = 0xd000;
const STATUS: u64 = 0xf000;

/// Swallows frames, never has one.
struct Sink;

impl NetBackend for Sink {
    fn read(&mut self, _buf: &mut [u8]) -> io::Result<usize> {
        Err(io::ErrorKind::WouldBlock.into())
    }
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        Ok(buf.len())
    }
    fn set_offload(&mut self, _flags: u32) -> io::Result<()> {
        Ok(())
    }
    fn raw_fd(&self) -> Option<RawFd> {
        None
    }
}

/// A queue at `base` of `size` entries, laid out as `split_layout` says.
fn queue(base: u64, size: u16, max: u16) -> Option<Queue> {
    let (avail, used) = split_layout(base, size);
    let mut q = Queue::new(max).ok()?;
    q.try_set_size(size).ok()?;
    q.try_set_desc_table_address(GuestAddress(base)).ok()?;
    q.try_set_avail_ring_address(GuestAddress(avail)).ok()?;
    q.try_set_used_ring_address(GuestAddress(used)).ok()?;
    q.set_ready(true);
    Some(q)
}

/// The available and used rings' addresses after a table of `size`.
fn split_layout(base: u64, size: u16) -> (u64, u64) {
    let avail = base + 16 * u64::from(size);
    let used = (avail + 6 + 2 * u64::from(size) + 3) & !3;
    (avail, used)
}

struct Rig {
    net: Net,
    mem: GuestMemoryMmap,
    acked: u64,
    shadow: RxFilter,
    /// The driver's next descriptor and available index.
    next_desc: u16,
    avail_idx: u16,
}

impl Rig {
    fn activate(net: &mut Net, mem: &GuestMemoryMmap, acked: u64) -> bool {
        let (Some(rx), Some(tx), Some(ctrl)) = (
            queue(RX_RING, 4, QUEUE_SIZE),
            queue(TX_RING, 4, QUEUE_SIZE),
            queue(RING, RING_SIZE, CTRL_QUEUE_SIZE),
        ) else {
            return false;
        };
        let mut queues = vec![rx, tx];
        if acked & (1 << VIRTIO_NET_F_CTRL_VQ) != 0 {
            queues.push(ctrl);
        }
        net.activate(ActivateContext {
            mem: mem.clone(),
            interrupt: Arc::new(Irq::default()),
            queues,
            acked_features: acked,
        })
        .is_ok()
    }

    fn fresh_shadow(&self) -> RxFilter {
        let mut f = RxFilter::new(MAC);
        f.set_features(self.acked, 1);
        f
    }

    /// Makes a chain of `descs` (addr, len, writable) available.
    fn add_chain(&mut self, descs: &[(u64, u32, bool)]) {
        let (avail, _) = split_layout(RING, RING_SIZE);
        let n = descs.len() as u16;
        let head = self.next_desc;
        for (i, &(addr, len, write)) in descs.iter().enumerate() {
            let i = i as u16;
            let mut flags = if write { VRING_DESC_F_WRITE as u16 } else { 0 };
            let mut next = 0;
            if i + 1 < n {
                flags |= VRING_DESC_F_NEXT as u16;
                next = (head + i + 1) % RING_SIZE;
            }
            let at = RING + 16 * u64::from((head + i) % RING_SIZE);
            let mut d = [0u8; 16];
            d[..8].copy_from_slice(&addr.to_le_bytes());
            d[8..12].copy_from_slice(&len.to_le_bytes());
            d[12..14].copy_from_slice(&flags.to_le_bytes());
            d[14..16].copy_from_slice(&next.to_le_bytes());
            let _ = self.mem.write_slice(&d, GuestAddress(at));
        }
        self.next_desc = (head + n) % RING_SIZE;
        let slot = avail + 4 + 2 * u64::from(self.avail_idx % RING_SIZE);
        let _ = self.mem.write_obj(head, GuestAddress(slot));
        self.avail_idx = self.avail_idx.wrapping_add(1);
        let _ = self.mem.write_obj(self.avail_idx, GuestAddress(avail + 2));
    }

    fn command(&mut self, ops: &mut Input<'_>) {
        let (class, cmd) = (ops.u8(), ops.u8());
        let len = usize::from(ops.u16()).min(CMD_MAX.min(MAX_COMMAND_LEN) - 2);
        let data = ops.bytes(len);
        let layout = ops.u8();
        let mut bytes = vec![class, cmd];
        bytes.extend_from_slice(data);
        let _ = self.mem.write_slice(&bytes, GuestAddress(CMD));
        let _ = self.mem.write_obj(0xaau8, GuestAddress(STATUS));
        let mut descs = Vec::new();
        if layout & 1 != 0 || data.is_empty() {
            descs.push((CMD, bytes.len() as u32, false));
        } else {
            descs.push((CMD, 2, false));
            descs.push((CMD + 2, data.len() as u32, false));
        }
        let well_formed = layout & 6 == 0;
        if layout & 2 == 0 {
            descs.push((STATUS, 1, true));
        }
        if layout & 4 != 0 {
            descs.push((CMD, 2, false));
        }
        self.add_chain(&descs);
        let active = self.net.is_activated() && self.acked & (1 << VIRTIO_NET_F_CTRL_VQ) != 0;
        self.net.process_queue(2);
        let status: u8 = self.mem.read_obj(GuestAddress(STATUS)).unwrap_or(0);
        if !active {
            assert_eq!(
                status, 0xaa,
                "virtio-net bug: a control queue that is not there answered"
            );
            return;
        }
        if well_formed {
            let want = match parse(&bytes).and_then(|c| self.shadow.apply(&c)) {
                Ok(()) => VIRTIO_NET_OK,
                Err(_) => VIRTIO_NET_ERR,
            };
            assert_eq!(
                status, want,
                "virtio-net bug: status {status} for {bytes:02x?}, the parser says {want}"
            );
        } else if layout & 2 == 0 {
            assert_eq!(
                status, VIRTIO_NET_ERR,
                "virtio-net bug: a malformed chain succeeded"
            );
        }
        self.check();
    }

    /// The device's filter is the shadow's.
    fn check(&self) {
        if !self.net.is_activated() {
            return;
        }
        let saved = self.net.state().filter;
        assert_eq!(
            saved,
            Some(self.shadow.state()),
            "virtio-net bug: the device's filter is not what its commands set"
        );
        assert_eq!(self.net.mac(), self.shadow.mac());
    }

    fn frame(&mut self, ops: &mut Input<'_>) {
        let s = self.shadow.state();
        let pick = ops.u8();
        let dst = match pick % 6 {
            0 => s.mac,
            1 => [0xff; 6],
            2 => s.unicast.first().copied().unwrap_or(MAC),
            3 => s
                .multicast
                .first()
                .copied()
                .unwrap_or([1, 0, 0x5e, 0, 0, 1]),
            4 => [ops.u8(), ops.u8(), ops.u8(), ops.u8(), ops.u8(), ops.u8()],
            _ => [0x02, 0, 0, 0, 0, 1],
        };
        let mut f = dst.to_vec();
        f.extend_from_slice(&MAC);
        if pick & 0x80 != 0 {
            f.extend_from_slice(&[0x81, 0x00]);
            f.extend_from_slice(&ops.u16().to_be_bytes());
        }
        // A runt or cut tag is judged without a panic.
        let cut = usize::from(ops.u8()) % (f.len() + 1);
        let _ = self.shadow.accepts(&f[..cut]);
        let whole = self.shadow.accepts(&f);
        f.resize(1514, 0);
        assert_eq!(
            self.shadow.accepts(&f),
            whole,
            "receive filter bug: the verdict depends on the payload"
        );
    }

    fn run(&mut self, op: CtrlOp, ops: &mut Input<'_>) {
        match op {
            CtrlOp::Command => self.command(ops),
            CtrlOp::Parse => {
                let len = usize::from(ops.u16());
                let bytes = ops.bytes(len);
                if let Ok(c) = parse(bytes) {
                    assert_eq!(parse(bytes), Ok(c.clone()));
                    let before = self.shadow.clone();
                    if self.shadow.apply(&c).is_err() {
                        assert_eq!(self.shadow, before, "a refused command changed the filter");
                    }
                    // Keep the device in step with the shadow.
                    self.shadow = before;
                }
            }
            CtrlOp::Frame => self.frame(ops),
            CtrlOp::Reset => {
                self.net.reset();
                self.shadow = self.fresh_shadow();
                self.next_desc = 0;
                self.avail_idx = 0;
                let (avail, used) = split_layout(RING, RING_SIZE);
                let _ = self.mem.write_slice(&[0u8; 0x100], GuestAddress(avail));
                let _ = self.mem.write_slice(&[0u8; 0x100], GuestAddress(used));
                Rig::activate(&mut self.net, &self.mem, self.acked);
                self.check();
            }
            CtrlOp::Announce => {
                let _ = self.net.announce();
            }
            CtrlOp::Restore => {
                let saved = self.net.state();
                let json = serde_json::to_string(&saved).expect("a state serializes");
                let back: NetState = serde_json::from_str(&json).expect("and parses back");
                let mut fresh = Net::with_backend(Box::new(Sink), MAC, true);
                if self.net.is_activated() {
                    // As a restore does: the transport activates it first.
                    let mem = guest_memory(&[]);
                    Rig::activate(&mut fresh, &mem, self.acked);
                }
                fresh
                    .restore_state(&back)
                    .expect("virtio-net bug: a device refuses its own state");
                assert_eq!(
                    fresh.state(),
                    saved,
                    "virtio-net bug: a restored device saves another state"
                );
            }
        }
    }
}

/// The `virtio_net_ctrl` target.
pub fn virtio_net_ctrl(data: &[u8]) {
    run(data);
}

/// Runs one input; the rig afterwards, if the device was activated.
fn run(data: &[u8]) -> Option<Rig> {
    init_logging();
    let mut input = Input::new(data);
    let acked_in = input.u64();
    let mut ops = input.section();
    let mem = guest_memory(&[]);
    let mut net = Net::with_backend(Box::new(Sink), MAC, true);
    let acked = negotiated(acked_in, net.avail_features());
    if !Rig::activate(&mut net, &mem, acked) {
        return None;
    }
    let mut rig = Rig {
        net,
        mem,
        acked,
        shadow: RxFilter::new(MAC),
        next_desc: 0,
        avail_idx: 0,
    };
    rig.shadow = rig.fresh_shadow();
    while !ops.is_empty() {
        let op = CTRL_OPS[usize::from(ops.u8()) % CTRL_OPS.len()];
        rig.run(op, &mut ops);
    }
    Some(rig)
}

/// The target's seeds: what Linux sends when an interface comes up, the
/// MAC, VLAN and announce commands, malformed chains, and a driver without
/// the control queue.
pub fn seeds() -> Vec<crate::seeds::NamedSeed> {
    use crate::input::Seed;
    let op = |o: CtrlOp| CTRL_OPS.iter().position(|x| *x == o).unwrap_or(0) as u8;
    let all: u64 = !0;
    let command = |s: &mut Seed, class: u8, cmd: u8, data: &[u8], layout: u8| {
        s.u8(op(CtrlOp::Command)).u8(class).u8(cmd);
        s.u16(data.len() as u16).raw(data).u8(layout);
    };
    let table = |uni: &[[u8; 6]], multi: &[[u8; 6]]| {
        let mut v = (uni.len() as u32).to_le_bytes().to_vec();
        uni.iter().for_each(|m| v.extend_from_slice(m));
        v.extend_from_slice(&(multi.len() as u32).to_le_bytes());
        multi.iter().for_each(|m| v.extend_from_slice(m));
        v
    };
    let input = |acked: u64, ops: &Seed| {
        let mut s = Seed::new();
        s.u64(acked).section(ops);
        s.into_bytes()
    };

    let mut up = Seed::new();
    command(&mut up, 0, 0, &[0], 0);
    command(&mut up, 0, 1, &[0], 0);
    command(
        &mut up,
        1,
        0,
        &table(&[], &[[1, 0, 0x5e, 0, 0, 1], [0x33, 0x33, 0, 0, 0, 1]]),
        0,
    );
    for pick in [0u8, 1, 3, 5] {
        up.u8(op(CtrlOp::Frame)).u8(pick).u8(14);
    }
    up.u8(op(CtrlOp::Frame)).u8(0x80).u16(100).u8(15);

    let mut mac_vlan = Seed::new();
    command(&mut mac_vlan, 0, 0, &[0], 1);
    command(&mut mac_vlan, 1, 1, &[0x52, 0x54, 0, 0xaa, 0xbb, 0xcc], 0);
    command(&mut mac_vlan, 2, 0, &100u16.to_le_bytes(), 0);
    command(&mut mac_vlan, 2, 0, &5u16.to_le_bytes(), 0);
    command(&mut mac_vlan, 2, 1, &5u16.to_le_bytes(), 0);
    mac_vlan.u8(op(CtrlOp::Announce));
    command(&mut mac_vlan, 3, 0, &[], 0);
    command(&mut mac_vlan, 5, 0, &1u64.to_le_bytes(), 0);
    command(&mut mac_vlan, 0, 5, &[1], 0);
    mac_vlan.u8(op(CtrlOp::Restore));
    mac_vlan.u8(op(CtrlOp::Frame)).u8(0x80).u16(100).u8(20);
    mac_vlan.u8(op(CtrlOp::Reset));
    command(&mut mac_vlan, 0, 2, &[1], 0);

    let mut bad = Seed::new();
    command(&mut bad, 9, 9, &[], 0);
    command(&mut bad, 0, 0, &[0], 2);
    command(&mut bad, 0, 0, &[0], 4);
    command(&mut bad, 2, 0, &[0xff, 0xff], 0);
    command(&mut bad, 4, 0, &2u16.to_le_bytes(), 0);
    command(&mut bad, 1, 0, &[0xff, 0xff, 0xff, 0xff], 0);
    bad.u8(op(CtrlOp::Parse)).u16(3).raw(&[1, 0, 7]);

    let mut no_ctrl = Seed::new();
    command(&mut no_ctrl, 0, 0, &[0], 0);
    no_ctrl.u8(op(CtrlOp::Restore));

    vec![
        ("linux_ifup", input(all, &up)),
        ("mac_vlan_announce", input(all, &mac_vlan)),
        ("malformed", input(all, &bad)),
        (
            "no_control_queue",
            input(all & !(1 << VIRTIO_NET_F_CTRL_VQ), &no_ctrl),
        ),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seed(name: &str) -> Vec<u8> {
        seeds().into_iter().find(|(n, _)| *n == name).unwrap().1
    }

    #[test]
    fn net_ctrl_seeds_reach_the_filter() {
        let rig = run(&seed("linux_ifup")).unwrap();
        let f = rig.net.state().filter.unwrap();
        assert!(!f.promisc && !f.all_multi);
        assert_eq!(f.multicast.len(), 2);
        let c = rig.net.counters();
        assert_eq!((c.ctrl_ok, c.ctrl_err), (3, 0));

        // Reset at the end: back to the built MAC, one command after it.
        let rig = run(&seed("mac_vlan_announce")).unwrap();
        let c = rig.net.counters();
        assert_eq!((c.ctrl_ok, c.ctrl_err), (9, 0));
        assert_eq!(rig.net.mac(), MAC);
        assert!(rig.net.state().filter.unwrap().all_uni);

        let rig = run(&seed("malformed")).unwrap();
        let c = rig.net.counters();
        assert_eq!((c.ctrl_ok, c.ctrl_err), (0, 6));

        let rig = run(&seed("no_control_queue")).unwrap();
        assert_eq!(rig.net.counters().ctrl_ok + rig.net.counters().ctrl_err, 0);
    }
}
