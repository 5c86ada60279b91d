//! Multiqueue, driven by a synthetic driver on a real `GuestMemoryMmap`:
//! what the device offers, activation with one or every pair, the driver's
//! `VQ_PAIRS_SET` attaching and detaching the backends' queues, frames on
//! each pair's queues and backend, and saved state.

// Test data: every cast is of a small constant or length.
#![allow(clippy::cast_possible_truncation)]

use std::sync::atomic::Ordering;

use super::tests::CTRL_FEATURES;
use super::*;
use crate::ctrl::{VIRTIO_NET_ERR, VIRTIO_NET_OK};
use crate::test_utils::{
    desc, guest_bytes, guest_memory, CountingInterrupt, MemBackend, MemState, TestQueue, DATA, R,
    RX_RING, TX_RING, W,
};
use vm_memory::{Bytes, GuestAddress};

const MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];
const CTRL_RING: u64 = 0x8000;
const RX1_RING: u64 = 0xa000;
const TX1_RING: u64 = 0xc000;
/// Pair 1's receive buffers.
const DATA1: u64 = 0x30_0000;
/// Control commands and their status bytes.
const CMD: u64 = 0x20_0000;
/// Pair 0's transmit frames, then pair 1's.
const TX_DATA: u64 = 0x38_0000;
const MQ: u64 = (1 << virtio_bindings::virtio_config::VIRTIO_F_VERSION_1)
    | (1 << VIRTIO_NET_F_MAC)
    | (1 << VIRTIO_NET_F_MRG_RXBUF)
    | CTRL_FEATURES
    | (1 << VIRTIO_NET_F_MQ);

/// A two-pair NIC on in-memory backends and a driver for it.
struct Mq<'m> {
    net: Net,
    backends: [Arc<MemState>; 2],
    rxq: [TestQueue<'m>; 2],
    txq: [TestQueue<'m>; 2],
    ctrlq: TestQueue<'m>,
    irq: Arc<CountingInterrupt>,
    mem: &'m GuestMemoryMmap,
}

fn two_pairs() -> (Net, [Arc<MemState>; 2]) {
    let (b0, s0) = MemBackend::new();
    let (b1, s1) = MemBackend::new();
    let net = Net::with_backends(vec![Box::new(b0), Box::new(b1)], MAC, false).unwrap();
    (net, [s0, s1])
}

impl<'m> Mq<'m> {
    /// Activated with `acked`: every queue with VIRTIO_NET_F_MQ, the first
    /// pair and the control queue without.
    fn new(mem: &'m GuestMemoryMmap, acked: u64) -> Mq<'m> {
        let (mut net, backends) = two_pairs();
        let mut rxq = [
            TestQueue::new(mem, RX_RING, 16),
            TestQueue::new(mem, RX1_RING, 16),
        ];
        for i in 0..4u64 {
            rxq[0].add(&[desc(DATA + i * 0x1000, 0x1000, W)]);
            rxq[1].add(&[desc(DATA1 + i * 0x1000, 0x1000, W)]);
        }
        let txq = [
            TestQueue::new(mem, TX_RING, 16),
            TestQueue::new(mem, TX1_RING, 16),
        ];
        let ctrlq = TestQueue::new(mem, CTRL_RING, 16);
        let queues = if acked & (1 << VIRTIO_NET_F_MQ) != 0 {
            vec![
                rxq[0].queue(),
                txq[0].queue(),
                rxq[1].queue(),
                txq[1].queue(),
                ctrlq.queue(),
            ]
        } else {
            vec![rxq[0].queue(), txq[0].queue(), ctrlq.queue()]
        };
        let irq = Arc::new(CountingInterrupt::default());
        net.activate(ActivateContext {
            mem: mem.clone(),
            interrupt: irq.clone(),
            queues,
            acked_features: acked,
        })
        .unwrap();
        Mq {
            net,
            backends,
            rxq,
            txq,
            ctrlq,
            irq,
            mem,
        }
    }

    /// Sends VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET on the control queue (index
    /// `ctrl`); its status.
    fn pairs_set(&mut self, ctrl: usize, n: u16) -> u8 {
        let status = CMD + 8;
        self.mem.write_slice(&[4, 0], GuestAddress(CMD)).unwrap();
        self.mem
            .write_slice(&n.to_le_bytes(), GuestAddress(CMD + 2))
            .unwrap();
        self.mem.write_obj(0xaau8, GuestAddress(status)).unwrap();
        self.ctrlq
            .add(&[desc(CMD, 2, R), desc(CMD + 2, 2, R), desc(status, 1, W)]);
        self.net.process_queue(ctrl);
        self.mem.read_obj(GuestAddress(status)).unwrap()
    }

    /// What pair `p`'s receive queue got, in order, each a header (with
    /// `num_buffers` 1) and a frame.
    fn received(&self, p: usize) -> Vec<Vec<u8>> {
        let base = [DATA, DATA1][p];
        self.rxq[p]
            .used()
            .iter()
            .map(|&(id, len)| {
                let mut f = guest_bytes(self.mem, base + u64::from(id) * 0x1000, len as usize);
                assert_eq!(f[10..12], [1, 0], "num_buffers");
                f[10] = 0;
                f
            })
            .collect()
    }

    /// Puts a frame tagged `tag` on pair `p`'s transmit queue and notifies.
    fn send(&mut self, p: usize, tag: u8) {
        let at = TX_DATA + p as u64 * 0x1000 + u64::from(tag) * 0x80;
        self.mem.write_slice(&frame(tag), GuestAddress(at)).unwrap();
        self.txq[p].add(&[desc(at, 72, R)]);
        self.net.process_queue(p * 2 + 1);
    }
}

/// A header and a 60-byte frame to the NIC's MAC, tagged.
fn frame(tag: u8) -> Vec<u8> {
    let mut f = vec![0u8; VNET_HDR_LEN];
    f.extend_from_slice(&MAC);
    f.extend_from_slice(&[0x52, 0x54, 0, 0, 0, 9, 0x08, 0x00]);
    f.resize(VNET_HDR_LEN + 60, tag);
    f
}

/// A frame that needs two of the tests' 4 KiB receive buffers.
fn big(tag: u8) -> Vec<u8> {
    let mut f = frame(tag);
    f.resize(6000, tag);
    f
}

#[test]
fn mq_is_offered_with_several_pairs_and_the_config_says_how_many() {
    let (net, _) = two_pairs();
    assert_ne!(net.avail_features() & (1 << VIRTIO_NET_F_MQ), 0);
    assert_eq!(net.queue_max_sizes().len(), 5);
    assert_eq!(net.queue_pairs(), 2);
    let mut pairs = [0u8; 2];
    net.read_config(
        offset_of!(virtio_net_config, max_virtqueue_pairs) as u64,
        &mut pairs,
    );
    assert_eq!(u16::from_le_bytes(pairs), 2);

    let (b, _) = MemBackend::new();
    let one = Net::with_backend(Box::new(b), MAC, false);
    assert_eq!(one.avail_features() & (1 << VIRTIO_NET_F_MQ), 0);
    assert_eq!(one.queue_max_sizes().len(), 3);

    // No pairs, or more than the device supports.
    let err = Net::with_backends(Vec::new(), MAC, false).unwrap_err();
    assert!(matches!(err, Error::QueuePairs { queues: 0, .. }), "{err}");
    let many: Vec<Box<dyn NetBackend>> = (0..=MAX_QUEUE_PAIRS)
        .map(|_| Box::new(MemBackend::new().0) as Box<dyn NetBackend>)
        .collect();
    let err = Net::with_backends(many, MAC, false).unwrap_err();
    assert!(err.to_string().contains("1 to 16"), "{err}");
}

#[test]
fn mq_activation_needs_every_queue_and_the_control_queue() {
    let mem = guest_memory();
    let (mut net, _) = two_pairs();
    let q = |base| TestQueue::new(&mem, base, 16).queue();
    // MQ with the first pair and the control queue only.
    let err = net
        .activate(ActivateContext {
            mem: mem.clone(),
            interrupt: Arc::new(CountingInterrupt::default()),
            queues: vec![q(RX_RING), q(TX_RING), q(CTRL_RING)],
            acked_features: MQ,
        })
        .unwrap_err();
    assert!(
        matches!(
            err,
            ActivateError::QueueCount {
                expected: 5,
                got: 3
            }
        ),
        "{err}"
    );
    // MQ without the control queue, which it needs.
    let err = net
        .activate(ActivateContext {
            mem: mem.clone(),
            interrupt: Arc::new(CountingInterrupt::default()),
            queues: vec![q(RX_RING), q(TX_RING), q(RX1_RING), q(TX1_RING)],
            acked_features: MQ & !(1 << VIRTIO_NET_F_CTRL_VQ),
        })
        .unwrap_err();
    assert!(matches!(err, ActivateError::QueueCount { .. }), "{err}");
    assert!(!net.is_activated());
}

#[test]
fn mq_the_driver_starts_on_one_pair_and_vq_pairs_set_brings_the_second() {
    let mem = guest_memory();
    let mut mq = Mq::new(&mem, MQ);
    // Activation: the first pair only; the second backend's queue is
    // detached and never read.
    assert_eq!(mq.net.active_queue_pairs(), 1);
    assert_eq!(*mq.backends[1].queue_calls.lock().unwrap(), [false]);
    assert!(mq.backends[0].queue_calls.lock().unwrap().is_empty());
    mq.backends[0].push_frame(frame(1));
    mq.net.process_backend();
    assert_eq!(mq.received(0), [frame(1)]);
    assert_eq!(mq.backends[1].reads.load(Ordering::SeqCst), 0);
    assert!(mq.net.link_up());

    // Out of range: refused, nothing changes.
    assert_eq!(mq.pairs_set(4, 3), VIRTIO_NET_ERR);
    assert_eq!(mq.pairs_set(4, 0), VIRTIO_NET_ERR);
    assert_eq!(mq.net.active_queue_pairs(), 1);

    // Two pairs: the second queue is attached, and each backend's frames
    // go to its own pair's receive queue, with that queue's interrupt.
    assert_eq!(mq.pairs_set(4, 2), VIRTIO_NET_OK);
    assert_eq!(mq.irq.count(4), 3);
    assert_eq!(mq.net.active_queue_pairs(), 2);
    assert_eq!(*mq.backends[1].queue_calls.lock().unwrap(), [false, true]);
    mq.backends[0].push_frame(frame(2));
    mq.backends[1].push_frame(frame(3));
    mq.backends[1].push_frame(frame(4));
    mq.net.process_backend();
    assert_eq!(mq.received(0), [frame(1), frame(2)]);
    assert_eq!(mq.received(1), [frame(3), frame(4)]);
    assert!(mq.irq.count(2) >= 1);

    // Transmit: each pair's chains go to its own backend.
    mq.send(0, 5);
    mq.send(1, 6);
    mq.send(1, 7);
    assert_eq!(mq.backends[0].sent(), [frame(5)]);
    assert_eq!(mq.backends[1].sent(), [frame(6), frame(7)]);
    assert_eq!(mq.txq[1].used().len(), 2);
    assert!(mq.irq.count(3) >= 1);
    let c = mq.net.counters();
    assert_eq!((c.rx_packets, c.tx_packets), (4, 3));
    assert_eq!(mq.net.pair_packets(), [(2, 1), (2, 2)]);
    assert_eq!(mq.net.largest_tx_frame(), 60);

    // Back to one: the second queue is detached; a frame it had waiting
    // for guest buffers is dropped and its queue is read no more.
    mq.backends[1].push_frame(frame(10));
    mq.backends[1].push_frame(big(11));
    mq.net.process_backend();
    assert_eq!(mq.received(1).len(), 3);
    assert!(mq.net.pairs[1].rx_pending.is_some());
    assert_eq!(mq.pairs_set(4, 1), VIRTIO_NET_OK);
    assert_eq!(
        *mq.backends[1].queue_calls.lock().unwrap(),
        [false, true, false]
    );
    assert!(mq.net.pairs[1].rx_pending.is_none());
    assert_eq!(mq.net.counters().rx_dropped, 1);
    let reads = mq.backends[1].reads.load(Ordering::SeqCst);
    mq.rxq[1].add(&[desc(DATA1, 0x1000, W)]);
    mq.net.process_queue(2);
    mq.net.process_backend();
    assert_eq!(mq.backends[1].reads.load(Ordering::SeqCst), reads);
    assert!(mq.net.link_up(), "a detached queue is not a dead backend");
}

#[test]
fn mq_a_driver_without_mq_gets_one_pair_and_the_control_queue_at_two() {
    let mem = guest_memory();
    let mut mq = Mq::new(&mem, MQ & !(1 << VIRTIO_NET_F_MQ));
    assert_eq!(*mq.backends[1].queue_calls.lock().unwrap(), [false]);
    // VQ_PAIRS_SET is not negotiated.
    assert_eq!(mq.pairs_set(2, 2), VIRTIO_NET_ERR);
    assert_eq!(mq.net.active_queue_pairs(), 1);
    mq.backends[0].push_frame(frame(1));
    mq.net.process_backend();
    assert_eq!(mq.received(0), [frame(1)]);
    mq.send(0, 2);
    assert_eq!(mq.backends[0].sent(), [frame(2)]);
    assert_eq!(mq.net.queue_states().len(), 3);
}

#[test]
fn mq_saved_state_keeps_the_pairs_in_use_and_each_pending_frame() {
    let mem = guest_memory();
    let mut mq = Mq::new(&mem, MQ);
    assert_eq!(mq.pairs_set(4, 2), VIRTIO_NET_OK);
    // Three of pair 1's four buffers taken, then a frame that needs two
    // waits in the device.
    for i in 0..3 {
        mq.backends[1].push_frame(frame(20 + i));
    }
    mq.backends[1].push_frame(big(23));
    mq.net.process_backend();
    let state = mq.net.state();
    assert_eq!(state.pending_frame, None);
    assert_eq!(state.pair_pending, [(1, big(23))]);
    assert_eq!(state.filter.as_ref().unwrap().queue_pairs, 2);
    assert_eq!(mq.net.queue_states().len(), 5);

    // Restored on a new two-pair device (reactivated by its transport).
    let mut to = Mq::new(&mem, MQ);
    to.net.restore_state(&state).unwrap();
    assert_eq!(to.net.active_queue_pairs(), 2);
    assert_eq!(*to.backends[1].queue_calls.lock().unwrap(), [false, true]);
    assert_eq!(to.net.pairs[1].rx_pending, Some(big(23).len()));

    // A one-pair device refuses it, and is left as it was.
    let (b, _) = MemBackend::new();
    let mut one = Net::with_backend(Box::new(b), MAC, false);
    let err = one.restore_state(&state).unwrap_err();
    assert!(err.to_string().contains("queue pair 1"), "{err}");
    assert_eq!(one.pairs[0].rx_pending, None);
}
