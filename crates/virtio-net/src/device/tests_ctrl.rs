//! The control queue, driven by a synthetic driver on a real
//! `GuestMemoryMmap`: commands and their status bytes, the receive filter
//! they set on both receive paths, announce, link down, and saved state.

// Test data: every cast is of a small constant or length.
#![allow(clippy::cast_possible_truncation)]

use std::io;

use super::tests::CTRL_FEATURES;
use super::*;
use crate::ctrl::{VIRTIO_NET_ERR, VIRTIO_NET_OK};
use crate::state::NetState;
use crate::test_utils::{
    desc, guest_bytes, guest_memory, CountingInterrupt, MemBackend, MemState, TestQueue, XorShift,
    DATA, MEM_END, NEXT, R, RX_RING, TX_RING, W,
};
use vm_memory::{Bytes, GuestAddress};

const MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];
const OTHER: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x99];
const CTRL_RING: u64 = 0x8000;
/// Where commands and their status bytes go (after the receive buffers).
const CMD: u64 = 0x20_0000;
const ALL: u64 = (1 << virtio_bindings::virtio_config::VIRTIO_F_VERSION_1)
    | (1 << VIRTIO_NET_F_MAC)
    | (1 << VIRTIO_NET_F_STATUS)
    | (1 << VIRTIO_NET_F_MRG_RXBUF)
    | CTRL_FEATURES;

struct Rig<'m> {
    net: Net,
    state: Arc<MemState>,
    rxq: TestQueue<'m>,
    ctrlq: TestQueue<'m>,
    irq: Arc<CountingInterrupt>,
    mem: &'m GuestMemoryMmap,
    /// The next free byte at CMD.
    at: u64,
}

impl<'m> Rig<'m> {
    fn new(mem: &'m GuestMemoryMmap, acked: u64, rx_bufs: usize, buf_len: u32) -> Rig<'m> {
        let (backend, state) = MemBackend::new();
        let mut net = Net::with_backend(Box::new(backend), MAC, false);
        let mut rxq = TestQueue::new(mem, RX_RING, 256);
        for i in 0..rx_bufs {
            rxq.add(&[desc(DATA + i as u64 * 0x1_0000, buf_len, W)]);
        }
        let txq = TestQueue::new(mem, TX_RING, 16);
        let ctrlq = TestQueue::new(mem, CTRL_RING, 64);
        let irq = Arc::new(CountingInterrupt::default());
        let mut queues = vec![rxq.queue(), txq.queue()];
        if acked & (1 << VIRTIO_NET_F_CTRL_VQ) != 0 {
            queues.push(ctrlq.queue());
        }
        net.activate(ActivateContext {
            mem: mem.clone(),
            interrupt: irq.clone(),
            queues,
            acked_features: acked,
        })
        .unwrap();
        Rig {
            net,
            state,
            rxq,
            ctrlq,
            irq,
            mem,
            at: CMD,
        }
    }

    /// Sends one command (class, command, data) as a header descriptor, a
    /// data descriptor and a status byte, as Linux does; its status.
    fn send(&mut self, class: u32, cmd: u32, data: &[u8]) -> u8 {
        let hdr = self.at;
        let body = hdr + 2;
        let status = body + data.len() as u64;
        self.at = (status + 16) & !7;
        self.mem
            .write_slice(&[class as u8, cmd as u8], GuestAddress(hdr))
            .unwrap();
        self.mem.write_slice(data, GuestAddress(body)).unwrap();
        self.mem.write_obj(0xaau8, GuestAddress(status)).unwrap();
        let mut chain = vec![desc(hdr, 2, R | NEXT)];
        if !data.is_empty() {
            chain.push(desc(body, data.len() as u32, R | NEXT));
        }
        chain.push(desc(status, 1, W));
        let head = self.ctrlq.add(&chain);
        self.net.process_queue(2);
        let used = self.ctrlq.used();
        assert_eq!(
            used.last(),
            Some(&(u32::from(head), 1)),
            "completed with 1 byte"
        );
        self.mem.read_obj(GuestAddress(status)).unwrap()
    }

    fn promisc(&mut self, on: bool) {
        assert_eq!(self.send(0, 0, &[u8::from(on)]), VIRTIO_NET_OK);
    }

    /// Pushes frames to the backend and runs the receive path; the frames
    /// the guest got, by destination MAC and VLAN.
    fn receive(&mut self, frames: &[Vec<u8>]) -> Vec<Vec<u8>> {
        let before = self.rxq.used().len();
        for f in frames {
            self.state.push_frame(f.clone());
        }
        self.net.process_backend();
        self.rxq.used()[before..]
            .iter()
            .map(|&(id, len)| guest_bytes(self.mem, DATA + u64::from(id) * 0x1_0000, len as usize))
            .collect()
    }
}

/// A frame (header, Ethernet) to `dst`, tagged with `vid`, `len` bytes.
fn eth(dst: [u8; 6], vid: Option<u16>, len: usize) -> Vec<u8> {
    let mut f = vec![0u8; VNET_HDR_LEN];
    f.extend_from_slice(&dst);
    f.extend_from_slice(&OTHER);
    if let Some(v) = vid {
        f.extend_from_slice(&[0x81, 0x00]);
        f.extend_from_slice(&v.to_be_bytes());
    }
    f.extend_from_slice(&[0x08, 0x00]);
    f.resize(len, 0x5a);
    f
}

fn dst_of(f: &[u8]) -> [u8; 6] {
    f[VNET_HDR_LEN..VNET_HDR_LEN + 6].try_into().unwrap()
}

fn config(net: &Net) -> [u8; 8] {
    let mut c = [0u8; 8];
    net.read_config(0, &mut c);
    c
}

#[test]
fn ctrl_activate_needs_the_control_queue_when_negotiated() {
    let mem = guest_memory();
    let (backend, _) = MemBackend::new();
    let mut net = Net::with_backend(Box::new(backend), MAC, false);
    let q = TestQueue::new(&mem, RX_RING, 16);
    let err = net
        .activate(ActivateContext {
            mem: mem.clone(),
            interrupt: Arc::new(CountingInterrupt::default()),
            queues: vec![q.queue(), q.queue()],
            acked_features: ALL,
        })
        .unwrap_err();
    assert!(
        matches!(
            err,
            ActivateError::QueueCount {
                expected: 3,
                got: 2
            }
        ),
        "{err}"
    );
}

#[test]
fn ctrl_rx_mode_mac_table_and_vlans_filter_both_receive_paths() {
    let mem = guest_memory();
    let mut rig = Rig::new(&mem, ALL, 28, 0x1_0000);
    // Promiscuous until the driver says otherwise.
    let got = rig.receive(&[eth(OTHER, None, 100)]);
    assert_eq!(got.len(), 1);
    rig.promisc(false);
    // Small frames (the copying path), then large ones (the direct path,
    // once the average frame is large): the same filter on both.
    for len in [100, 9000] {
        if len == 9000 {
            let warm: Vec<_> = (0..8).map(|_| eth(MAC, None, len)).collect();
            assert_eq!(rig.receive(&warm).len(), 8);
        }
        let direct_reads = rig
            .state
            .vectored_reads
            .load(std::sync::atomic::Ordering::SeqCst);
        let got = rig.receive(&[
            eth(OTHER, None, len),
            eth(MAC, None, len),
            eth([0xff; 6], None, len),
            eth([0x01, 0, 0x5e, 0, 0, 1], None, len),
            eth(MAC, Some(100), len),
        ]);
        let dsts: Vec<_> = got.iter().map(|f| dst_of(f)).collect();
        assert_eq!(dsts, vec![MAC, [0xff; 6]], "len {len}");
        let direct = rig
            .state
            .vectored_reads
            .load(std::sync::atomic::Ordering::SeqCst)
            - direct_reads;
        // Five frames and the read that found none.
        assert_eq!(direct, if len == 9000 { 6 } else { 0 }, "len {len}");
    }
    // The guest joins a group and adds VLAN 100; sets a new MAC.
    let table = [
        0u32.to_le_bytes().to_vec(),
        1u32.to_le_bytes().to_vec(),
        vec![0x01, 0, 0x5e, 0, 0, 1],
    ]
    .concat();
    assert_eq!(rig.send(1, 0, &table), VIRTIO_NET_OK);
    assert_eq!(rig.send(2, 0, &100u16.to_le_bytes()), VIRTIO_NET_OK);
    assert_eq!(rig.send(1, 1, &OTHER), VIRTIO_NET_OK);
    assert_eq!(config(&rig.net)[..6], OTHER, "the config space shows it");
    assert_eq!(rig.net.mac(), OTHER);
    for len in [100, 9000] {
        let got = rig.receive(&[
            eth(MAC, None, len),
            eth(OTHER, Some(100), len),
            eth(OTHER, Some(200), len),
            eth([0x01, 0, 0x5e, 0, 0, 1], None, len),
            eth(OTHER, None, len),
        ]);
        assert_eq!(got.len(), 3, "len {len}");
        assert_eq!(got[0], {
            let mut f = eth(OTHER, Some(100), len);
            f[10] = 1; // num_buffers
            f
        });
        assert_eq!(dst_of(&got[1]), [0x01, 0, 0x5e, 0, 0, 1]);
        assert_eq!(dst_of(&got[2]), OTHER);
    }
    let c = rig.net.counters();
    assert_eq!(c.rx_filtered, 3 * 2 + 2 * 2);
    assert_eq!((c.ctrl_ok, c.ctrl_err), (4, 0));
    assert_eq!(rig.irq.count(2), 4, "one interrupt per command");
    // A reset goes back to the built MAC, promiscuous.
    rig.net.reset();
    assert_eq!(config(&rig.net)[..6], MAC);
}

#[test]
fn ctrl_refused_and_malformed_commands_get_err_and_change_nothing() {
    let mem = guest_memory();
    let acked = ALL & !(1 << VIRTIO_NET_F_CTRL_MAC_ADDR);
    let mut rig = Rig::new(&mem, acked, 8, 2048);
    rig.promisc(false);
    assert_eq!(rig.send(1, 1, &OTHER), VIRTIO_NET_ERR, "not negotiated");
    assert_eq!(rig.send(9, 9, &[]), VIRTIO_NET_ERR);
    assert_eq!(rig.send(2, 0, &5000u16.to_le_bytes()), VIRTIO_NET_ERR);
    assert_eq!(rig.send(4, 0, &1u16.to_le_bytes()), VIRTIO_NET_ERR, "no MQ");
    assert_eq!(config(&rig.net)[..6], MAC);

    // Chains without a status byte, with readable bytes after it, outside
    // guest memory, or too long: completed, no panic, counted.
    let s = CMD + 0x1000;
    mem.write_slice(&[0, 0, 1], GuestAddress(s)).unwrap();
    let bad: Vec<Vec<_>> = vec![
        vec![desc(s, 3, R)],
        vec![
            desc(s, 3, R | NEXT),
            desc(s + 8, 1, W | NEXT),
            desc(s, 1, R),
        ],
        vec![desc(MEM_END - 1, 3, R | NEXT), desc(s + 8, 1, W)],
        vec![desc(s, 0x10_0000, R | NEXT), desc(s + 8, 1, W)],
        vec![desc(s + 8, 0, W)],
    ];
    for chain in &bad {
        rig.ctrlq.add(chain);
    }
    rig.net.process_queue(2);
    let used = rig.ctrlq.used();
    assert_eq!(used.len(), 5 + bad.len());
    let c = rig.net.counters();
    assert_eq!((c.ctrl_ok, c.ctrl_err), (1, 4 + bad.len() as u64));
    // Still filtering (promiscuous mode stayed off).
    assert!(rig.receive(&[eth(OTHER, None, 100)]).is_empty());
}

#[test]
fn ctrl_random_chains_do_not_panic() {
    let mem = guest_memory();
    let mut rig = Rig::new(&mem, ALL, 4, 2048);
    let mut rng = XorShift(0x5eed_c0de);
    for _ in 0..2000 {
        let n = 1 + rng.below_usize(4);
        let mut chain = Vec::new();
        for i in 0..n {
            let addr = if rng.below(8) == 0 {
                rng.next()
            } else {
                CMD + rng.below(0x1000)
            };
            let len = rng.below_u32(64);
            let mut flags = if rng.below(2) == 0 { R } else { W };
            if i + 1 < n {
                flags |= NEXT;
            }
            chain.push(desc(addr, len, flags));
        }
        let mut junk = [0u8; 64];
        for b in &mut junk {
            *b = rng.below(8) as u8;
        }
        mem.write_slice(&junk, GuestAddress(CMD + rng.below(0x1000)))
            .unwrap();
        rig.ctrlq.add(&chain);
        rig.net.process_queue(2);
    }
    let c = rig.net.counters();
    assert_eq!(c.ctrl_ok + c.ctrl_err, 2000);
}

#[test]
fn ctrl_announce_sends_rarp_and_asks_a_guest_that_can() {
    let mem = guest_memory();
    let mut rig = Rig::new(&mem, ALL, 4, 2048);
    assert_eq!(rig.net.announce().unwrap(), Announced::RarpAndGuest);
    assert_eq!(rig.irq.config_count(), 1);
    assert_eq!(config(&rig.net)[6..8], [1 | 2, 0], "LINK_UP | ANNOUNCE");
    assert_eq!(rig.state.sent()[0][VNET_HDR_LEN..], rarp_announce(MAC)[..]);
    let saved = rig.net.state();
    assert!(saved.announcing);
    assert_eq!(rig.send(3, 0, &[]), VIRTIO_NET_OK);
    assert_eq!(config(&rig.net)[6..8], [1, 0]);

    // Without GUEST_ANNOUNCE: a RARP from the current MAC.
    let mut rig = Rig::new(&mem, ALL & !(1 << VIRTIO_NET_F_GUEST_ANNOUNCE), 4, 2048);
    assert_eq!(rig.send(1, 1, &OTHER), VIRTIO_NET_OK);
    assert_eq!(rig.net.announce().unwrap(), Announced::Rarp);
    let sent = rig.state.sent();
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0][VNET_HDR_LEN..], rarp_announce(OTHER)[..]);
    assert_eq!(rig.irq.config_count(), 0);
}

#[test]
fn ctrl_link_goes_down_once_when_the_backend_fails() {
    let mem = guest_memory();
    let mut rig = Rig::new(&mem, ALL, 4, 2048);
    assert!(rig.net.link_up());
    rig.state.push_error(io::ErrorKind::BrokenPipe);
    assert_eq!(rig.net.process_backend(), BackendInterest::Pause);
    assert!(!rig.net.link_up());
    assert_eq!(config(&rig.net)[6..8], [0, 0]);
    assert_eq!(rig.irq.config_count(), 1);
    rig.state.push_error(io::ErrorKind::BrokenPipe);
    rig.net.process_backend();
    assert_eq!(rig.irq.config_count(), 1, "told once");
}

#[test]
fn ctrl_filter_survives_a_snapshot() {
    let mem = guest_memory();
    let mut rig = Rig::new(&mem, ALL, 8, 2048);
    rig.promisc(false);
    assert_eq!(rig.send(1, 1, &OTHER), VIRTIO_NET_OK);
    assert_eq!(rig.send(2, 0, &7u16.to_le_bytes()), VIRTIO_NET_OK);
    let saved = rig.net.state();
    assert_eq!(saved.mac, MAC, "the built MAC, which the restore checks");
    let json = serde_json::to_string(&saved).unwrap();

    let mut back = Rig::new(&mem, ALL, 8, 2048);
    back.net
        .restore_state(&serde_json::from_str(&json).unwrap())
        .unwrap();
    assert_eq!(config(&back.net)[..6], OTHER);
    let got = back.receive(&[
        eth(MAC, None, 100),
        eth(OTHER, Some(7), 100),
        eth(OTHER, Some(8), 100),
    ]);
    assert_eq!(got.len(), 1);
    assert_eq!(dst_of(&got[0]), OTHER);

    // An older snapshot (no filter) still loads; a bad filter is refused.
    let old: NetState =
        serde_json::from_str(&format!("{{\"mac\":{:?},\"pending_frame\":null}}", MAC)).unwrap();
    assert!(old.filter.is_none() && !old.announcing);
    let mut bad = saved.clone();
    if let Some(f) = bad.filter.as_mut() {
        f.vlans = Some(vec![9999]);
    }
    let e = back.net.restore_state(&bad).unwrap_err();
    assert!(e.to_string().contains("9999"), "{e}");
}
