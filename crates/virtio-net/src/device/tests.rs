use std::io;
use std::sync::atomic::Ordering;

use super::*;
use crate::test_utils::{
    desc, guest_bytes, guest_memory, CountingInterrupt, MemBackend, MemState, TestQueue, XorShift,
    DATA, INDIRECT, MEM_END, MEM_SIZE, NEXT, R, RX_RING, TX_RING, W,
};
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use vm_memory::{Bytes, GuestAddress};

const MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];
const VERSION_1: u64 = 1 << VIRTIO_F_VERSION_1;
const MRG: u64 = 1 << VIRTIO_NET_F_MRG_RXBUF;
const EVENT_IDX: u64 = 1 << VIRTIO_RING_F_EVENT_IDX;
const BASIC: u64 = VERSION_1 | (1 << VIRTIO_NET_F_MAC) | (1 << VIRTIO_NET_F_STATUS);
/// The control queue's features, offered with or without offloads.
pub(super) const CTRL_FEATURES: u64 = (1 << VIRTIO_NET_F_CTRL_VQ)
    | (1 << VIRTIO_NET_F_CTRL_RX)
    | (1 << VIRTIO_NET_F_CTRL_RX_EXTRA)
    | (1 << VIRTIO_NET_F_CTRL_VLAN)
    | (1 << VIRTIO_NET_F_CTRL_MAC_ADDR)
    | (1 << VIRTIO_NET_F_GUEST_ANNOUNCE);
const KEEP: BackendInterest = BackendInterest::Keep;
const PAUSE: BackendInterest = BackendInterest::Pause;

fn new_net(offloads: bool) -> (Net, Arc<MemState>) {
    let (backend, state) = MemBackend::new();
    (Net::with_backend(Box::new(backend), MAC, offloads), state)
}

fn activate(
    net: &mut Net,
    mem: &GuestMemoryMmap,
    rx: &TestQueue,
    tx: &TestQueue,
    acked: u64,
) -> Arc<CountingInterrupt> {
    let irq = Arc::new(CountingInterrupt::default());
    net.activate(ActivateContext {
        mem: mem.clone(),
        interrupt: irq.clone(),
        queues: vec![rx.queue(), tx.queue()],
        // These tests have no control queue (tests_ctrl.rs has).
        acked_features: acked & !(1 << VIRTIO_NET_F_CTRL_VQ),
    })
    .unwrap();
    irq
}

/// A frame of `len` bytes, header included: header bytes 1, 2, ...,
/// `num_buffers` 0xeeee (the tap leaves it as it was), then a pattern.
fn frame(len: usize, seed: u8) -> Vec<u8> {
    (0..len)
        .map(|i| match i {
            0..10 => u8::try_from(i + 1).unwrap(),
            10 | 11 => 0xee,
            _ => u8::try_from((i * 7 + usize::from(seed)) % 251).unwrap(),
        })
        .collect()
}

/// What the guest should find: `f` with `num_buffers` filled in, and the
/// offload fields cleared unless GUEST_CSUM was negotiated.
fn expected_rx(f: &[u8], num_buffers: u16, guest_csum: bool) -> Vec<u8> {
    let mut v = f.to_vec();
    if !guest_csum {
        v[..10].fill(0);
    }
    v[10..12].copy_from_slice(&num_buffers.to_le_bytes());
    v
}

/// A tx frame: a 12-byte header then `len` payload bytes.
fn put_tx_frame(mem: &GuestMemoryMmap, hdr: u64, data: u64, len: usize) -> Vec<u8> {
    let h: Vec<u8> = (1..=12).collect();
    let d: Vec<u8> = (0..len).map(|i| u8::try_from(i % 253).unwrap()).collect();
    mem.write_slice(&h, GuestAddress(hdr)).unwrap();
    mem.write_slice(&d, GuestAddress(data)).unwrap();
    [h, d].concat()
}

fn counters(rx: (u64, u64, u64), tx: (u64, u64, u64)) -> NetCounters {
    NetCounters {
        rx_packets: rx.0,
        rx_bytes: rx.1,
        rx_dropped: rx.2,
        tx_packets: tx.0,
        tx_bytes: tx.1,
        tx_dropped: tx.2,
        ..NetCounters::default()
    }
}

#[test]
fn net_features_depend_on_offloads() {
    let (plain, _) = new_net(false);
    assert_eq!(
        plain.avail_features(),
        BASIC | MRG | EVENT_IDX | CTRL_FEATURES
    );
    let (full, _) = new_net(true);
    let f = full.avail_features();
    assert_eq!(f & (BASIC | MRG | EVENT_IDX), BASIC | MRG | EVENT_IDX);
    for bit in [
        VIRTIO_NET_F_CSUM,
        VIRTIO_NET_F_GUEST_CSUM,
        VIRTIO_NET_F_GUEST_TSO4,
        VIRTIO_NET_F_GUEST_TSO6,
        VIRTIO_NET_F_GUEST_ECN,
        VIRTIO_NET_F_GUEST_UFO,
        VIRTIO_NET_F_HOST_TSO4,
        VIRTIO_NET_F_HOST_TSO6,
        VIRTIO_NET_F_HOST_ECN,
        VIRTIO_NET_F_HOST_UFO,
    ] {
        assert_ne!(f & (1 << bit), 0, "bit {bit}");
    }
    assert_ne!(f & (1 << VIRTIO_NET_F_CTRL_GUEST_OFFLOADS), 0);
    assert_eq!(
        (f & !(BASIC | MRG | EVENT_IDX | CTRL_FEATURES)).count_ones(),
        11
    );
    assert_eq!(full.device_type(), VIRTIO_ID_NET);
    assert_eq!(full.queue_max_sizes(), &[256, 256, 64]);
    // The device's own epoll: its rate limiters' timers (the backend has
    // no descriptor).
    assert!(full.backend_fd().is_some());
}

#[test]
fn net_config_space_has_mac_and_link_up() {
    let (mut net, _) = new_net(false);
    let mut c = [0xffu8; CONFIG_SIZE + 8];
    net.read_config(0, &mut c);
    assert_eq!(c[..6], MAC);
    assert_eq!(c[6..8], [1, 0]);
    // max_virtqueue_pairs: 1 (read only with VIRTIO_NET_F_MQ).
    assert_eq!(c[8..10], [1, 0]);
    assert!(c[10..].iter().all(|b| *b == 0));
    let mut status = [0xffu8; 2];
    net.read_config(6, &mut status);
    assert_eq!(u16::from_le_bytes(status), 1);
    let mut one = [0u8; 1];
    net.read_config(3, &mut one);
    assert_eq!(one, [0x12]);
    for offset in [CONFIG_SIZE as u64, 4096, u64::MAX - 1, u64::MAX] {
        let mut d = [0xffu8; 4];
        net.read_config(offset, &mut d);
        assert_eq!(d, [0; 4], "offset {offset}");
    }
    // Writes are ignored.
    net.write_config(0, &[0; 8]);
    net.write_config(u64::MAX, &[1; 3]);
    net.read_config(0, &mut c);
    assert_eq!(c[..6], MAC);
    assert_eq!(c[6..8], [1, 0]);
}

#[test]
fn net_new_with_multicast_mac_is_refused() {
    for mac in [[0x01, 0, 0x5e, 0, 0, 1], [0; 6], [0xff; 6]] {
        let err = Net::new(&NetConfig {
            tap: "tap0".to_string(),
            mac,
            offloads: false,
            vlan: None,
            queues: 1,
        })
        .unwrap_err();
        assert!(matches!(err, Error::InvalidMac { .. }), "{err}");
        assert!(err.to_string().contains("tap0"), "{err}");
    }
}

#[test]
fn net_activate_needs_two_queues() {
    let (mut net, _) = new_net(false);
    let mem = guest_memory();
    let rxq = TestQueue::new(&mem, RX_RING, 16);
    let txq = TestQueue::new(&mem, TX_RING, 16);
    for queues in [
        vec![],
        vec![rxq.queue()],
        vec![rxq.queue(), txq.queue(), txq.queue()],
    ] {
        let got = queues.len();
        let err = net
            .activate(ActivateContext {
                mem: mem.clone(),
                interrupt: Arc::new(CountingInterrupt::default()),
                queues,
                acked_features: VERSION_1,
            })
            .unwrap_err();
        assert!(
            matches!(err, ActivateError::QueueCount { expected: 2, got: g } if g == got),
            "{err}"
        );
        assert!(!net.is_activated());
    }
}

#[test]
fn net_activate_sets_tun_offloads_from_acked_guest_features() {
    let (mut net, state) = new_net(true);
    let mem = guest_memory();
    let rxq = TestQueue::new(&mem, RX_RING, 16);
    let txq = TestQueue::new(&mem, TX_RING, 16);
    let g = |bit: u32| 1u64 << bit;
    let cases = [
        (VERSION_1, 0),
        (VERSION_1 | g(VIRTIO_NET_F_GUEST_CSUM), TUN_F_CSUM),
        (
            VERSION_1
                | g(VIRTIO_NET_F_GUEST_CSUM)
                | g(VIRTIO_NET_F_GUEST_TSO4)
                | g(VIRTIO_NET_F_GUEST_ECN),
            TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO_ECN,
        ),
        // Host-side offloads say nothing about what the tap may send.
        (
            VERSION_1 | g(VIRTIO_NET_F_CSUM) | g(VIRTIO_NET_F_HOST_TSO4),
            0,
        ),
        (
            net.avail_features(),
            TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6 | TUN_F_TSO_ECN | TUN_F_UFO,
        ),
    ];
    for (acked, _) in cases {
        net.reset();
        activate(&mut net, &mem, &rxq, &txq, acked);
    }
    let want: Vec<u32> = cases.iter().map(|(_, flags)| *flags).collect();
    assert_eq!(*state.offloads.lock().unwrap(), want);

    // Features that were not offered are not honoured.
    let (mut plain, state) = new_net(false);
    activate(&mut plain, &mem, &rxq, &txq, u64::MAX);
    assert_eq!(*state.offloads.lock().unwrap(), vec![0]);
}

#[test]
fn net_activate_survives_offload_failure() {
    let (mut net, state) = new_net(true);
    *state.offload_fails.lock().unwrap() = true;
    let mem = guest_memory();
    let mut rxq = TestQueue::new(&mem, RX_RING, 16);
    let txq = TestQueue::new(&mem, TX_RING, 16);
    rxq.add(&[desc(DATA, 2048, W)]);
    activate(&mut net, &mem, &rxq, &txq, features(true));
    assert!(net.is_activated());
    state.push_frame(frame(100, 1));
    net.process_backend();
    assert_eq!(net.counters().rx_packets, 1);
}

#[test]
fn tx_frame_reaches_backend_with_its_header() {
    let (mut net, state) = new_net(false);
    let mem = guest_memory();
    let rxq = TestQueue::new(&mem, RX_RING, 16);
    let mut txq = TestQueue::new(&mem, TX_RING, 16);
    // Header alone, then the frame in two pieces.
    let f = put_tx_frame(&mem, DATA, DATA + 0x100, 150);
    txq.add(&[
        desc(DATA, 12, R),
        desc(DATA + 0x100, 100, R),
        desc(DATA + 0x164, 50, R),
    ]);
    // Header and frame in one descriptor.
    let g = put_tx_frame(&mem, DATA + 0x1000, DATA + 0x100c, 60);
    txq.add(&[desc(DATA + 0x1000, 72, R)]);
    let irq = activate(&mut net, &mem, &rxq, &txq, BASIC);
    net.process_queue(1);
    assert_eq!(state.sent(), vec![f, g]);
    assert_eq!(txq.used(), vec![(0, 0), (3, 0)]);
    assert_eq!(irq.count(1), 1);
    assert_eq!(irq.count(0), 0);
    assert_eq!(net.counters(), counters((0, 0, 0), (2, 210, 0)));
    // Nothing new: no interrupt.
    net.process_queue(1);
    assert_eq!(irq.count(1), 1);
}

#[test]
fn tx_chain_too_short_is_dropped_and_counted() {
    let (mut net, state) = new_net(false);
    let mem = guest_memory();
    let rxq = TestQueue::new(&mem, RX_RING, 16);
    let mut txq = TestQueue::new(&mem, TX_RING, 16);
    txq.add(&[desc(DATA, 11, R)]);
    txq.add(&[desc(DATA, 0, R)]);
    txq.add(&[desc(DATA, 6, R), desc(DATA + 6, 5, R)]);
    // Exactly a header (an empty frame) goes through.
    txq.add(&[desc(DATA, 12, R)]);
    let irq = activate(&mut net, &mem, &rxq, &txq, BASIC);
    net.process_queue(1);
    assert_eq!(state.sent().len(), 1);
    assert_eq!(txq.used(), vec![(0, 0), (1, 0), (2, 0), (4, 0)]);
    assert_eq!(irq.count(1), 1);
    assert_eq!(net.counters(), counters((0, 0, 0), (1, 0, 3)));
}

#[test]
fn tx_chain_too_long_is_dropped_and_counted() {
    let (mut net, state) = new_net(true);
    let mem = guest_memory();
    let rxq = TestQueue::new(&mem, RX_RING, 16);
    let mut txq = TestQueue::new(&mem, TX_RING, 16);
    let max = u32::try_from(MAX_FRAME).unwrap();
    txq.add(&[desc(DATA, max, R), desc(DATA, 1, R)]);
    txq.add(&[desc(DATA, 12, R), desc(DATA, u32::MAX, R)]);
    txq.add(&[desc(DATA, 12, R), desc(DATA + 0x2_0000, max - 12, R)]);
    let irq = activate(&mut net, &mem, &rxq, &txq, features(true));
    net.process_queue(1);
    let sent = state.sent();
    assert_eq!(sent.len(), 1);
    assert_eq!(sent[0].len(), MAX_FRAME);
    assert_eq!(txq.used().len(), 3);
    assert_eq!(irq.count(1), 1);
    let payload = u64::try_from(MAX_FRAME - 12).unwrap();
    assert_eq!(net.counters(), counters((0, 0, 0), (1, payload, 2)));
}

#[test]
fn tx_chain_with_writable_descriptor_is_dropped_and_counted() {
    let (mut net, state) = new_net(false);
    let mem = guest_memory();
    let rxq = TestQueue::new(&mem, RX_RING, 16);
    let mut txq = TestQueue::new(&mem, TX_RING, 16);
    put_tx_frame(&mem, DATA, DATA + 12, 100);
    txq.add(&[desc(DATA, 12, R), desc(DATA + 12, 100, W)]);
    txq.add(&[desc(DATA, 112, W)]);
    // Outside guest memory.
    txq.add(&[desc(MEM_END - 4, 112, R)]);
    let irq = activate(&mut net, &mem, &rxq, &txq, BASIC);
    net.process_queue(1);
    assert!(state.sent().is_empty());
    assert_eq!(txq.used(), vec![(0, 0), (2, 0), (3, 0)]);
    assert_eq!(irq.count(1), 1);
    assert_eq!(net.counters(), counters((0, 0, 0), (0, 0, 3)));
}

#[test]
fn tx_chain_with_a_loop_is_dropped_and_counted() {
    let (mut net, state) = new_net(false);
    let mem = guest_memory();
    let rxq = TestQueue::new(&mem, RX_RING, 16);
    let mut txq = TestQueue::new(&mem, TX_RING, 16);
    put_tx_frame(&mem, DATA, DATA + 12, 100);
    // 0 -> 1 -> 0 -> ...
    txq.store(
        0,
        RawDescriptor::from(SplitDescriptor::new(DATA, 12, NEXT, 1)),
    );
    txq.store(
        1,
        RawDescriptor::from(SplitDescriptor::new(DATA, 12, NEXT, 0)),
    );
    txq.publish(0);
    // A next index past the table.
    txq.store(
        2,
        RawDescriptor::from(SplitDescriptor::new(DATA, 112, NEXT, 16)),
    );
    txq.publish(2);
    activate(&mut net, &mem, &rxq, &txq, BASIC);
    net.process_queue(1);
    assert!(state.sent().is_empty());
    assert_eq!(txq.used(), vec![(0, 0), (2, 0)]);
    assert_eq!(net.counters(), counters((0, 0, 0), (0, 0, 2)));
}

#[test]
fn tx_backend_refusal_drops_and_counts_the_frame() {
    let (mut net, state) = new_net(false);
    let mem = guest_memory();
    let rxq = TestQueue::new(&mem, RX_RING, 16);
    let mut txq = TestQueue::new(&mem, TX_RING, 16);
    let f = put_tx_frame(&mem, DATA, DATA + 12, 40);
    let irq = activate(&mut net, &mem, &rxq, &txq, BASIC);
    for kind in [io::ErrorKind::WouldBlock, io::ErrorKind::BrokenPipe] {
        *state.write_error.lock().unwrap() = Some(kind);
        txq.add(&[desc(DATA, 52, R)]);
        net.process_queue(1);
    }
    *state.write_error.lock().unwrap() = None;
    txq.add(&[desc(DATA, 52, R)]);
    net.process_queue(1);
    assert_eq!(state.sent(), vec![f]);
    assert_eq!(txq.used(), vec![(0, 0), (1, 0), (2, 0)]);
    assert_eq!(irq.count(1), 3);
    assert_eq!(net.counters(), counters((0, 0, 0), (1, 40, 2)));
}

#[test]
fn rx_frame_gets_num_buffers_one_without_mergeable_buffers() {
    let (mut net, state) = new_net(false);
    let mem = guest_memory();
    let mut rxq = TestQueue::new(&mem, RX_RING, 16);
    let txq = TestQueue::new(&mem, TX_RING, 16);
    // The header split over two descriptors, num_buffers in the second.
    rxq.add(&[desc(DATA, 4, W), desc(DATA + 0x100, 2000, W)]);
    rxq.add(&[desc(DATA + 0x1000, 2000, W)]);
    rxq.add(&[desc(DATA + 0x2000, 2000, W)]);
    let irq = activate(&mut net, &mem, &rxq, &txq, BASIC);
    let (f, g) = (frame(500, 1), frame(60, 2));
    state.push_frame(f.clone());
    state.push_frame(g.clone());
    // Two frames, then nothing to read: keep watching.
    assert_eq!(net.process_backend(), KEEP);
    let want = expected_rx(&f, 1, false);
    assert_eq!(guest_bytes(&mem, DATA, 4), want[..4]);
    assert_eq!(guest_bytes(&mem, DATA + 0x100, 496), want[4..]);
    assert_eq!(
        guest_bytes(&mem, DATA + 0x1000, 60),
        expected_rx(&g, 1, false)
    );
    assert_eq!(rxq.used(), vec![(0, 500), (2, 60)]);
    assert_eq!(irq.count(0), 1);
    assert_eq!(net.counters(), counters((2, 488 + 48, 0), (0, 0, 0)));
}

#[test]
fn rx_header_flags_pass_only_with_guest_csum() {
    let (mut net, state) = new_net(true);
    let mem = guest_memory();
    let mut rxq = TestQueue::new(&mem, RX_RING, 16);
    let txq = TestQueue::new(&mem, TX_RING, 16);
    rxq.add(&[desc(DATA, 2000, W)]);
    let acked = BASIC | (1 << VIRTIO_NET_F_GUEST_CSUM);
    activate(&mut net, &mem, &rxq, &txq, acked);
    let f = frame(100, 3);
    state.push_frame(f.clone());
    net.process_backend();
    assert_eq!(guest_bytes(&mem, DATA, 100), expected_rx(&f, 1, true));
    assert_eq!(guest_bytes(&mem, DATA, 4), [1, 2, 3, 4]);
}

#[test]
fn rx_frame_too_big_for_buffer_is_dropped_and_nothing_written_past_it() {
    let (mut net, state) = new_net(false);
    let mem = guest_memory();
    let mut rxq = TestQueue::new(&mem, RX_RING, 16);
    let txq = TestQueue::new(&mem, TX_RING, 16);
    let canary = [0xabu8; 64];
    mem.write_slice(&canary, GuestAddress(DATA + 100)).unwrap();
    mem.write_slice(&canary, GuestAddress(DATA + 0x1000 + 50))
        .unwrap();
    rxq.add(&[desc(DATA, 60, W), desc(DATA + 0x1000, 40, W)]);
    let irq = activate(&mut net, &mem, &rxq, &txq, BASIC);
    state.push_frame(frame(300, 4));
    state.push_frame(frame(101, 5));
    let small = frame(100, 6);
    state.push_frame(small.clone());
    assert_eq!(net.process_backend(), PAUSE);
    assert_eq!(guest_bytes(&mem, DATA + 100, 64), canary);
    assert_eq!(guest_bytes(&mem, DATA + 0x1000 + 50, 64), canary);
    // The chain was given back and took the frame that fits.
    assert_eq!(rxq.used(), vec![(0, 100)]);
    let want = expected_rx(&small, 1, false);
    assert_eq!(guest_bytes(&mem, DATA, 60), want[..60]);
    assert_eq!(guest_bytes(&mem, DATA + 0x1000, 40), want[60..]);
    assert_eq!(irq.count(0), 1);
    assert_eq!(net.counters(), counters((1, 88, 2), (0, 0, 0)));
}

#[test]
fn rx_mergeable_frame_spans_three_chains() {
    let (mut net, state) = new_net(false);
    let mem = guest_memory();
    let mut rxq = TestQueue::new(&mem, RX_RING, 16);
    let txq = TestQueue::new(&mem, TX_RING, 16);
    for i in 0..4 {
        rxq.add(&[desc(DATA + i * 0x1000, 1000, W)]);
    }
    let irq = activate(&mut net, &mem, &rxq, &txq, BASIC | MRG);
    let f = frame(2500, 7);
    state.push_frame(f.clone());
    assert_eq!(net.process_backend(), KEEP);
    assert_eq!(rxq.used(), vec![(0, 1000), (1, 1000), (2, 500)]);
    let mut got = guest_bytes(&mem, DATA, 1000);
    got.extend(guest_bytes(&mem, DATA + 0x1000, 1000));
    got.extend(guest_bytes(&mem, DATA + 0x2000, 500));
    assert_eq!(got, expected_rx(&f, 3, false));
    assert_eq!(irq.count(0), 1);
    assert_eq!(net.counters(), counters((1, 2488, 0), (0, 0, 0)));

    // A small frame takes one chain, and says so.
    let g = frame(80, 8);
    state.push_frame(g.clone());
    assert_eq!(net.process_backend(), PAUSE);
    assert_eq!(rxq.used()[3], (3, 80));
    assert_eq!(
        guest_bytes(&mem, DATA + 0x3000, 80),
        expected_rx(&g, 1, false)
    );
}

#[test]
fn rx_direct_frames_go_straight_into_parked_mergeable_chains() {
    let (mut net, state) = new_net(false);
    let mem = guest_memory();
    let mut rxq = TestQueue::new(&mem, RX_RING, 32);
    let txq = TestQueue::new(&mem, TX_RING, 32);
    // 24 page-sized buffers, as Linux posts with mergeable buffers: more
    // than MAX_FRAME in all (even after these frames), so frames are read
    // straight into them.
    for i in 0..24 {
        rxq.add(&[desc(DATA + i * 0x1000, 4096, W)]);
    }
    let irq = activate(&mut net, &mem, &rxq, &txq, BASIC | MRG);
    // Large frames came before: the direct path is in use.
    net.pairs[0].rx_avg = MAX_FRAME;
    let frames = [frame(9000, 1), frame(60, 2), frame(5000, 3)];
    for f in &frames {
        state.push_frame(f.clone());
    }
    assert_eq!(net.process_backend(), KEEP);
    // Three frames, then WouldBlock.
    assert_eq!(state.vectored_reads.load(Ordering::SeqCst), 4);
    assert_eq!(
        rxq.used(),
        vec![(0, 4096), (1, 4096), (2, 808), (3, 60), (4, 4096), (5, 904)]
    );
    let at = |chain: u64, len: usize| guest_bytes(&mem, DATA + chain * 0x1000, len);
    let mut first = at(0, 4096);
    first.extend(at(1, 4096));
    first.extend(at(2, 808));
    assert_eq!(first, expected_rx(&frames[0], 3, false));
    assert_eq!(at(3, 60), expected_rx(&frames[1], 1, false));
    let mut third = at(4, 4096);
    third.extend(at(5, 904));
    assert_eq!(third, expected_rx(&frames[2], 2, false));
    // Nothing past the frames, and one interrupt for the pass.
    assert_eq!(at(2, 4096)[808..], [0u8; 4096 - 808]);
    assert_eq!(irq.count(0), 1);
    assert_eq!(
        net.counters(),
        counters((3, 9000 + 60 + 5000 - 36, 0), (0, 0, 0))
    );
}

#[test]
fn rx_direct_path_takes_frames_that_fit_fewer_buffers_than_the_largest_frame_needs() {
    let (mut net, state) = new_net(false);
    let mem = guest_memory();
    let mut rxq = TestQueue::new(&mem, RX_RING, 32);
    let txq = TestQueue::new(&mem, TX_RING, 32);
    // 17 x 4 KiB just hold MAX_FRAME; after one frame, 16 do not: the
    // device's buffer takes what they cannot, and frames that fit them
    // still go straight in.
    for i in 0..17 {
        rxq.add(&[desc(DATA + i * 0x1000, 4096, W)]);
    }
    activate(&mut net, &mem, &rxq, &txq, BASIC | MRG);
    net.pairs[0].rx_avg = MAX_FRAME;
    let (a, b, c) = (frame(60, 1), frame(70, 2), frame(5000, 3));
    for f in [&a, &b, &c] {
        state.push_frame(f.clone());
    }
    assert_eq!(net.process_backend(), KEEP);
    // Three frames read straight into guest buffers, then WouldBlock; no
    // plain read, so no copy.
    assert_eq!(state.vectored_reads.load(Ordering::SeqCst), 4);
    assert_eq!(state.reads.load(Ordering::SeqCst), 4);
    assert_eq!(rxq.used(), vec![(0, 60), (1, 70), (2, 4096), (3, 904)]);
    assert_eq!(guest_bytes(&mem, DATA, 60), expected_rx(&a, 1, false));
    assert_eq!(
        guest_bytes(&mem, DATA + 0x1000, 70),
        expected_rx(&b, 1, false)
    );
    let mut got = guest_bytes(&mem, DATA + 0x2000, 4096);
    got.extend(guest_bytes(&mem, DATA + 0x3000, 904));
    assert_eq!(got, expected_rx(&c, 2, false));
}

#[test]
fn rx_direct_buffers_across_two_memory_regions_get_the_frame_whole() {
    let (mut net, state) = new_net(false);
    // Two adjacent regions meeting half-way (as hot-plugged or split
    // memory does); the guest's buffers run across the seam.
    let half = MEM_SIZE / 2;
    let seam = u64::try_from(half).unwrap();
    let mem = GuestMemoryMmap::from_ranges(&[
        (GuestAddress(0), half),
        (GuestAddress(seam), MEM_SIZE - half),
    ])
    .unwrap();
    let mut rxq = TestQueue::new(&mem, RX_RING, 32);
    let txq = TestQueue::new(&mem, TX_RING, 32);
    // 18 adjacent 4 KiB buffers from 7 KiB below the seam, the second
    // one straddling it by 1 KiB.
    let first = seam - 0x2000 + 0x400;
    for i in 0..18 {
        rxq.add(&[desc(first + i * 0x1000, 4096, W)]);
    }
    activate(&mut net, &mem, &rxq, &txq, BASIC | MRG);
    net.pairs[0].rx_avg = MAX_FRAME;
    let (a, b) = (frame(10_000, 1), frame(3000, 2));
    state.push_frame(a.clone());
    state.push_frame(b.clone());
    assert_eq!(net.process_backend(), KEEP);
    // Both went straight in (no plain read) and read back whole.
    assert_eq!(
        state.reads.load(Ordering::SeqCst),
        state.vectored_reads.load(Ordering::SeqCst)
    );
    assert_eq!(rxq.used(), vec![(0, 4096), (1, 4096), (2, 1808), (3, 3000)]);
    assert_eq!(guest_bytes(&mem, first, 10_000), expected_rx(&a, 3, false));
    assert_eq!(
        guest_bytes(&mem, first + 0x3000, 3000),
        expected_rx(&b, 1, false)
    );
}

#[test]
fn rx_direct_frame_larger_than_the_posted_buffers_waits_whole_for_more() {
    let (mut net, state) = new_net(false);
    let mem = guest_memory();
    let mut rxq = TestQueue::new(&mem, RX_RING, 32);
    let txq = TestQueue::new(&mem, TX_RING, 32);
    // 8 KiB posted, a 9000-byte frame: its head goes into the guest's
    // buffers, its tail into the device's, and it then waits, whole, in
    // the device without using a buffer.
    for i in 0..2 {
        rxq.add(&[desc(DATA + i * 0x1000, 4096, W)]);
    }
    let irq = activate(&mut net, &mem, &rxq, &txq, BASIC | MRG | EVENT_IDX);
    net.pairs[0].rx_avg = MAX_FRAME;
    let (big, next) = (frame(9000, 4), frame(3000, 5));
    state.push_frame(big.clone());
    state.push_frame(next.clone());
    assert_eq!(net.process_backend(), PAUSE);
    assert_eq!(state.vectored_reads.load(Ordering::SeqCst), 1);
    assert_eq!(rxq.used(), vec![]);
    assert_eq!(irq.count(0), 0);
    // The guest posts more: the waiting frame goes in first, header fields
    // cleared as on the copying path, then the next one.
    for i in 2..6 {
        rxq.add(&[desc(DATA + i * 0x1000, 4096, W)]);
    }
    net.process_queue(0);
    assert_eq!(rxq.used(), vec![(0, 4096), (1, 4096), (2, 808), (3, 3000)]);
    let mut got = guest_bytes(&mem, DATA, 8192);
    got.extend(guest_bytes(&mem, DATA + 0x2000, 808));
    assert_eq!(got, expected_rx(&big, 3, false));
    assert_eq!(
        guest_bytes(&mem, DATA + 0x3000, 3000),
        expected_rx(&next, 1, false)
    );
    assert_eq!(
        net.counters(),
        counters((2, 9000 + 3000 - 2 * VNET_HDR_LEN as u64, 0), (0, 0, 0))
    );
}

#[test]
fn rx_path_follows_the_frame_sizes() {
    let (mut net, state) = new_net(false);
    let mem = guest_memory();
    let mut rxq = TestQueue::new(&mem, RX_RING, 64);
    let txq = TestQueue::new(&mem, TX_RING, 64);
    for i in 0..40 {
        rxq.add(&[desc(DATA + i * 0x1000, 4096, W)]);
    }
    activate(&mut net, &mem, &rxq, &txq, BASIC | MRG);
    // Small frames are copied; a large one makes the average large, and
    // the frames after it go straight into guest buffers.
    let frames = [
        frame(60, 1),
        frame(65_000, 2),
        frame(100, 3),
        frame(3000, 4),
    ];
    for f in &frames {
        state.push_frame(f.clone());
    }
    assert_eq!(net.process_backend(), KEEP);
    // 100, 3000, then WouldBlock went direct; 60 and 65000 were copied
    // (the mock's vectored read counts as a read too).
    let direct = state.vectored_reads.load(Ordering::SeqCst);
    assert_eq!(direct, 3);
    assert_eq!(state.reads.load(Ordering::SeqCst) - direct, 2);
    let used = rxq.used();
    assert_eq!(used.len(), 1 + 16 + 1 + 1);
    assert_eq!(used[0], (0, 60));
    assert_eq!(used[17], (17, 100));
    assert_eq!(used[18], (18, 3000));
    assert_eq!(
        guest_bytes(&mem, DATA, 60),
        expected_rx(&frames[0], 1, false)
    );
    let mut second = Vec::new();
    for i in 1..17 {
        second.extend(guest_bytes(&mem, DATA + i * 0x1000, 4096));
    }
    second.truncate(65_000);
    assert_eq!(second, expected_rx(&frames[1], 16, false));
    assert_eq!(
        guest_bytes(&mem, DATA + 17 * 0x1000, 100),
        expected_rx(&frames[2], 1, false)
    );
    assert_eq!(
        guest_bytes(&mem, DATA + 18 * 0x1000, 3000),
        expected_rx(&frames[3], 1, false)
    );
    assert_eq!(net.counters().rx_packets, 4);
}

#[test]
fn rx_no_buffers_pauses_and_delivers_after_process_queue() {
    let (mut net, state) = new_net(false);
    let mem = guest_memory();
    let mut rxq = TestQueue::new(&mem, RX_RING, 16);
    let txq = TestQueue::new(&mem, TX_RING, 16);
    let irq = activate(&mut net, &mem, &rxq, &txq, BASIC);
    let f = frame(300, 9);
    state.push_frame(f.clone());
    // No buffers: the tap is not even read.
    assert_eq!(net.process_backend(), PAUSE);
    assert_eq!(state.reads.load(Ordering::SeqCst), 0);
    assert_eq!(state.waiting(), 1);
    rxq.add(&[desc(DATA, 2000, W)]);
    net.process_queue(0);
    assert_eq!(rxq.used(), vec![(0, 300)]);
    assert_eq!(guest_bytes(&mem, DATA, 300), expected_rx(&f, 1, false));
    assert_eq!(irq.count(0), 1);
}

#[test]
fn rx_frame_read_without_room_waits_in_the_device() {
    let (mut net, state) = new_net(false);
    let mem = guest_memory();
    let mut rxq = TestQueue::new(&mem, RX_RING, 16);
    let txq = TestQueue::new(&mem, TX_RING, 16);
    rxq.add(&[desc(DATA, 100, W)]);
    let irq = activate(&mut net, &mem, &rxq, &txq, BASIC | MRG);
    let f = frame(250, 10);
    state.push_frame(f.clone());
    state.push_frame(frame(50, 11));
    assert_eq!(net.process_backend(), PAUSE);
    // Read, but not delivered: nothing used, one frame still in the backend.
    assert_eq!(net.pairs[0].rx_pending, Some(250));
    assert!(rxq.used().is_empty());
    assert_eq!(state.waiting(), 1);
    assert_eq!(irq.count(0), 0);
    assert_eq!(net.counters(), NetCounters::default());
    // Again without new buffers: still waiting, and no second frame read.
    assert_eq!(net.process_backend(), PAUSE);
    assert_eq!(state.waiting(), 1);

    rxq.add(&[desc(DATA + 0x1000, 200, W)]);
    net.process_queue(0);
    assert_eq!(rxq.used(), vec![(0, 100), (1, 150)]);
    let mut got = guest_bytes(&mem, DATA, 100);
    got.extend(guest_bytes(&mem, DATA + 0x1000, 150));
    assert_eq!(got, expected_rx(&f, 2, false));
    assert_eq!(net.pairs[0].rx_pending, None);
    assert_eq!(irq.count(0), 1);
    // The second frame was not read: no buffer was left for it.
    assert_eq!(state.waiting(), 1);
    assert_eq!(net.counters(), counters((1, 238, 0), (0, 0, 0)));
}

#[test]
fn rx_mergeable_frame_larger_than_the_ring_is_dropped() {
    let (mut net, state) = new_net(false);
    let mem = guest_memory();
    let mut rxq = TestQueue::new(&mem, RX_RING, 4);
    let txq = TestQueue::new(&mem, TX_RING, 16);
    let canary = [0x5au8; 16];
    for i in 0..4 {
        mem.write_slice(&canary, GuestAddress(DATA + i * 0x1000 + 100))
            .unwrap();
        rxq.add(&[desc(DATA + i * 0x1000, 100, W)]);
    }
    activate(&mut net, &mem, &rxq, &txq, BASIC | MRG);
    state.push_frame(frame(1000, 12));
    let g = frame(150, 13);
    state.push_frame(g.clone());
    net.process_backend();
    for i in 0..4 {
        assert_eq!(guest_bytes(&mem, DATA + i * 0x1000 + 100, 16), canary);
    }
    // The buffers were given back and took the next frame.
    assert_eq!(rxq.used(), vec![(0, 100), (1, 50)]);
    assert_eq!(net.counters(), counters((1, 138, 1), (0, 0, 0)));
    assert_eq!(net.pairs[0].rx_pending, None);
}

#[test]
fn event_idx_tx_asks_for_the_next_chain_and_rx_rearms_when_out_of_buffers() {
    let (mut net, state) = new_net(false);
    let mem = guest_memory();
    let mut rxq = TestQueue::new(&mem, RX_RING, 16);
    let mut txq = TestQueue::new(&mem, TX_RING, 16);
    let avail_event = |q: &TestQueue| GuestAddress(q.used_addr() + 4 + 8 * 16);
    let used_event = |q: &TestQueue| GuestAddress(q.avail_addr() + 4 + 2 * 16);
    let irq = activate(&mut net, &mem, &rxq, &txq, BASIC | EVENT_IDX);
    // Transmit: after two chains the device asks to hear of chain 2, and
    // interrupts only once it has used the chain the driver named (1).
    mem.write_obj(1u16, used_event(&txq)).unwrap();
    for i in 0..2 {
        put_tx_frame(&mem, DATA + i * 0x1000, DATA + i * 0x1000 + 12, 60);
        txq.add(&[desc(DATA + i * 0x1000, 72, R)]);
    }
    net.process_queue(1);
    assert_eq!(txq.used().len(), 2);
    assert_eq!(state.sent().len(), 2);
    assert_eq!(mem.read_obj::<u16>(avail_event(&txq)).unwrap(), 2);
    assert_eq!(irq.count(1), 1);
    mem.write_obj(5u16, used_event(&txq)).unwrap();
    put_tx_frame(&mem, DATA + 0x2000, DATA + 0x2000 + 12, 60);
    txq.add(&[desc(DATA + 0x2000, 72, R)]);
    net.process_queue(1);
    assert_eq!(mem.read_obj::<u16>(avail_event(&txq)).unwrap(), 3);
    assert_eq!(irq.count(1), 1, "used_event 5 not reached");

    // Receive with no buffers: the device pauses and asks to hear of the
    // first buffer (avail_event 0 -> next_avail 0 is already so), then of
    // the one after the buffer it used.
    state.push_frame(frame(100, 1));
    assert_eq!(net.process_backend(), PAUSE);
    rxq.add(&[desc(DATA + 0x8000, 2000, W)]);
    net.process_queue(0);
    assert_eq!(rxq.used(), vec![(0, 100)]);
    state.push_frame(frame(100, 2));
    assert_eq!(net.process_backend(), PAUSE);
    assert_eq!(mem.read_obj::<u16>(avail_event(&rxq)).unwrap(), 1);
    // The frame waits in the tap until a buffer comes.
    assert_eq!(state.waiting(), 1);
    rxq.add(&[desc(DATA + 0x9000, 2000, W)]);
    net.process_queue(0);
    assert_eq!(rxq.used(), vec![(0, 100), (1, 100)]);
}

#[test]
fn event_idx_rx_interrupts_once_used_event_is_among_the_used_entries() {
    // On both receive paths: copying (small frames) and direct.
    for direct in [false, true] {
        let (mut net, state) = new_net(false);
        let mem = guest_memory();
        let mut rxq = TestQueue::new(&mem, RX_RING, 32);
        let txq = TestQueue::new(&mem, TX_RING, 32);
        let used_event = GuestAddress(rxq.avail_addr() + 4 + 2 * 32);
        for i in 0..24 {
            rxq.add(&[desc(DATA + i * 0x1000, 4096, W)]);
        }
        let irq = activate(&mut net, &mem, &rxq, &txq, BASIC | MRG | EVENT_IDX);
        if direct {
            net.pairs[0].rx_avg = MAX_FRAME;
        }
        // The driver wants to hear of entry 2: a pass using entries 0 and 1
        // does not interrupt, the pass using entries 2 to 4 does.
        mem.write_obj(2u16, used_event).unwrap();
        for seed in 0..2 {
            state.push_frame(frame(100, seed));
        }
        assert_eq!(net.process_backend(), KEEP);
        assert_eq!(rxq.used().len(), 2, "direct {direct}");
        assert_eq!(irq.count(0), 0, "direct {direct}");
        for seed in 2..5 {
            state.push_frame(frame(100, seed));
        }
        assert_eq!(net.process_backend(), KEEP);
        assert_eq!(rxq.used().len(), 5, "direct {direct}");
        assert_eq!(irq.count(0), 1, "direct {direct}");
        // used_event left behind: later entries do not interrupt.
        state.push_frame(frame(100, 5));
        assert_eq!(net.process_backend(), KEEP);
        assert_eq!(irq.count(0), 1, "direct {direct}");
        // A frame over three buffers with used_event at its second: it does.
        mem.write_obj(7u16, used_event).unwrap();
        state.push_frame(frame(9000, 6));
        assert_eq!(net.process_backend(), KEEP);
        assert_eq!(rxq.used().len(), 9, "direct {direct}");
        assert_eq!(irq.count(0), 2, "direct {direct}");
        let reads = state.vectored_reads.load(Ordering::SeqCst);
        assert_eq!(reads > 0, direct);
    }
}

#[test]
fn rx_malformed_first_chain_is_completed_empty_and_the_frame_goes_on() {
    let (mut net, state) = new_net(false);
    let mem = guest_memory();
    let mut rxq = TestQueue::new(&mem, RX_RING, 16);
    let txq = TestQueue::new(&mem, TX_RING, 16);
    rxq.add(&[desc(DATA, 2000, R)]);
    rxq.add(&[desc(DATA + 0x1000, 8, W)]);
    rxq.add(&[desc(MEM_END - 10, 100, W)]);
    rxq.add(&[desc(DATA + 0x2000, 0, W)]);
    // 5 -> 6 -> 5 -> ...: 16 descriptors of 4 bytes, and no end.
    rxq.store(
        5,
        RawDescriptor::from(SplitDescriptor::new(DATA, 4, NEXT | W, 6)),
    );
    rxq.store(
        6,
        RawDescriptor::from(SplitDescriptor::new(DATA, 4, NEXT | W, 5)),
    );
    rxq.publish(5);
    rxq.store(7, desc(DATA + 0x3000, 2000, W));
    rxq.publish(7);
    let irq = activate(&mut net, &mem, &rxq, &txq, BASIC);
    let f = frame(100, 14);
    state.push_frame(f.clone());
    net.process_backend();
    assert_eq!(
        rxq.used(),
        vec![(0, 0), (1, 0), (2, 0), (3, 0), (5, 0), (7, 100)]
    );
    assert_eq!(
        guest_bytes(&mem, DATA + 0x3000, 100),
        expected_rx(&f, 1, false)
    );
    assert_eq!(irq.count(0), 1);
    assert_eq!(net.counters(), counters((1, 88, 0), (0, 0, 0)));
}

#[test]
fn rx_malformed_chain_inside_a_frame_drops_it() {
    let (mut net, state) = new_net(false);
    let mem = guest_memory();
    let mut rxq = TestQueue::new(&mem, RX_RING, 16);
    let txq = TestQueue::new(&mem, TX_RING, 16);
    rxq.add(&[desc(DATA, 100, W)]);
    rxq.add(&[desc(DATA + 0x1000, 100, R)]);
    rxq.add(&[desc(DATA + 0x2000, 2000, W)]);
    activate(&mut net, &mem, &rxq, &txq, BASIC | MRG);
    state.push_frame(frame(250, 15));
    let g = frame(90, 16);
    state.push_frame(g.clone());
    net.process_backend();
    assert_eq!(rxq.used(), vec![(0, 0), (1, 0), (2, 90)]);
    assert_eq!(
        guest_bytes(&mem, DATA + 0x2000, 90),
        expected_rx(&g, 1, false)
    );
    assert_eq!(net.counters(), counters((1, 78, 1), (0, 0, 0)));
}

#[test]
fn rx_backend_results_decide_the_interest() {
    let (mut net, state) = new_net(false);
    let mem = guest_memory();
    let mut rxq = TestQueue::new(&mem, RX_RING, 16);
    let txq = TestQueue::new(&mem, TX_RING, 16);
    // Not activated: pause, and do not read.
    state.push_frame(frame(60, 17));
    assert_eq!(net.process_backend(), PAUSE);
    assert_eq!(state.reads.load(Ordering::SeqCst), 0);
    for i in 0..8 {
        rxq.add(&[desc(DATA + i * 0x1000, 2000, W)]);
    }
    activate(&mut net, &mem, &rxq, &txq, BASIC);
    // A frame, an interrupted read, a runt, then nothing: keep watching.
    state.push_error(io::ErrorKind::Interrupted);
    state.push_frame(vec![1; 11]);
    assert_eq!(net.process_backend(), KEEP);
    assert_eq!(net.counters(), counters((1, 48, 1), (0, 0, 0)));
    // A failing backend (the tap was deleted): pause.
    state.push_error(io::ErrorKind::Other);
    state.push_frame(frame(60, 18));
    assert_eq!(net.process_backend(), PAUSE);
    assert_eq!(net.counters().rx_packets, 1);
    assert_eq!(net.process_backend(), KEEP);
    assert_eq!(net.counters().rx_packets, 2);
    // A closed backend (a zero-length read): pause.
    state.push_frame(Vec::new());
    assert_eq!(net.process_backend(), PAUSE);
    assert_eq!(rxq.used().len(), 2);
}

#[test]
fn rx_interrupts_once_per_pass() {
    let (mut net, state) = new_net(false);
    let mem = guest_memory();
    let mut rxq = TestQueue::new(&mem, RX_RING, 16);
    let txq = TestQueue::new(&mem, TX_RING, 16);
    for i in 0..10 {
        rxq.add(&[desc(DATA + i * 0x1000, 2000, W)]);
    }
    let irq = activate(&mut net, &mem, &rxq, &txq, BASIC);
    for i in 0..5 {
        state.push_frame(frame(64, i));
    }
    net.process_backend();
    assert_eq!(irq.count(0), 1);
    assert_eq!(rxq.used().len(), 5);
    // Nothing read: no interrupt.
    net.process_backend();
    assert_eq!(irq.count(0), 1);
    state.push_frame(frame(64, 9));
    net.process_queue(0);
    assert_eq!(irq.count(0), 2);
    assert_eq!(irq.count(1), 0);
}

#[test]
fn rx_pass_reads_at_most_a_budget_of_frames() {
    let (mut net, state) = new_net(false);
    let mem = guest_memory();
    let mut rxq = TestQueue::new(&mem, RX_RING, 256);
    let txq = TestQueue::new(&mem, TX_RING, 16);
    for _ in 0..256 {
        rxq.add(&[desc(DATA, 100, W)]);
    }
    activate(&mut net, &mem, &rxq, &txq, BASIC);
    for i in 0..300 {
        state.push_frame(frame(20, u8::try_from(i % 256).unwrap()));
    }
    assert_eq!(net.process_backend(), KEEP);
    assert_eq!(net.counters().rx_packets, 256);
    assert_eq!(state.waiting(), 44);
}

#[test]
fn net_counters_add_up_over_both_queues() {
    let (mut net, state) = new_net(false);
    let mem = guest_memory();
    let mut rxq = TestQueue::new(&mem, RX_RING, 16);
    let mut txq = TestQueue::new(&mem, TX_RING, 16);
    rxq.add(&[desc(DATA, 200, W)]);
    rxq.add(&[desc(DATA + 0x1000, 200, W)]);
    put_tx_frame(&mem, DATA + 0x2000, DATA + 0x200c, 30);
    txq.add(&[desc(DATA + 0x2000, 42, R)]);
    txq.add(&[desc(DATA + 0x2000, 42, R)]);
    txq.add(&[desc(DATA + 0x2000, 4, R)]);
    activate(&mut net, &mem, &rxq, &txq, BASIC);
    state.push_frame(frame(112, 1));
    state.push_frame(frame(500, 2));
    state.push_frame(frame(62, 3));
    state.push_frame(vec![0; 3]);
    net.process_backend();
    net.process_queue(1);
    assert_eq!(net.counters(), counters((2, 150, 1), (2, 60, 1)));
    // The runt was never read: no buffer was left.
    assert_eq!(state.waiting(), 1);
}

#[test]
fn net_reset_drops_pending_frame_and_keeps_counters_and_backend() {
    let (mut net, state) = new_net(false);
    let mem = guest_memory();
    let mut rxq = TestQueue::new(&mem, RX_RING, 16);
    let txq = TestQueue::new(&mem, TX_RING, 16);
    rxq.add(&[desc(DATA, 100, W)]);
    rxq.add(&[desc(DATA + 0x1000, 100, W)]);
    activate(&mut net, &mem, &rxq, &txq, BASIC | MRG);
    state.push_frame(frame(50, 1));
    state.push_frame(frame(300, 2));
    assert_eq!(net.process_backend(), PAUSE);
    assert_eq!(net.pairs[0].rx_pending, Some(300));
    assert!(net.is_activated());
    net.reset();
    assert!(!net.is_activated());
    assert_eq!(net.pairs[0].rx_pending, None);
    // Not activated: queues are not touched.
    net.process_queue(0);
    net.process_queue(1);
    net.process_queue(7);
    assert_eq!(net.process_backend(), PAUSE);
    assert_eq!(net.counters(), counters((1, 38, 0), (0, 0, 0)));

    // Activated again on fresh queues, the same backend serves them.
    let mut rxq = TestQueue::new(&mem, RX_RING, 16);
    let txq = TestQueue::new(&mem, TX_RING, 16);
    rxq.add(&[desc(DATA, 2000, W)]);
    activate(&mut net, &mem, &rxq, &txq, BASIC);
    let g = frame(70, 3);
    state.push_frame(g.clone());
    net.process_backend();
    assert_eq!(rxq.used(), vec![(0, 70)]);
    assert_eq!(guest_bytes(&mem, DATA, 70), expected_rx(&g, 1, false));
    assert_eq!(net.counters(), counters((2, 96, 0), (0, 0, 0)));
}

#[test]
fn net_process_queue_out_of_range_is_ignored() {
    let (mut net, state) = new_net(false);
    let mem = guest_memory();
    let mut rxq = TestQueue::new(&mem, RX_RING, 16);
    let mut txq = TestQueue::new(&mem, TX_RING, 16);
    rxq.add(&[desc(DATA, 2000, W)]);
    put_tx_frame(&mem, DATA + 0x1000, DATA + 0x100c, 20);
    txq.add(&[desc(DATA + 0x1000, 32, R)]);
    let irq = activate(&mut net, &mem, &rxq, &txq, BASIC);
    state.push_frame(frame(60, 1));
    for index in [2, 3, usize::MAX] {
        net.process_queue(index);
    }
    assert!(rxq.used().is_empty());
    assert!(txq.used().is_empty());
    assert_eq!(irq.count(0) + irq.count(1), 0);
}

/// Guest memory the random descriptors stay in (when not wild).
const ZONE: (u64, u64) = (DATA, 0x5_0000);
/// Guest memory no tame descriptor reaches.
const CANARY: u64 = 0x5_0000;
const CANARY_LEN: usize = 0x1000;

/// A random descriptor and whether it may reach past [`ZONE`] into guest
/// memory (wild addresses, lengths crossing the zone, indirect tables).
fn random_desc(rng: &mut XorShift, size: u16, allow_wild: bool) -> (RawDescriptor, bool) {
    let lens = [0, 1, 11, 12, 13, 60, 100, 1514, 1526, 4096, 65_562, 65_563];
    let mut len = match rng.below(16) {
        i @ 0..=11 => lens[usize::try_from(i).unwrap()],
        12..=14 => rng.below_u32(70_000),
        _ => rng.u32(),
    };
    let zone_len = ZONE.1 - ZONE.0;
    let mut wild = false;
    let pick = if allow_wild {
        rng.below(16)
    } else {
        rng.below(14)
    };
    let addr = match pick {
        0..=11 => {
            len = len.min(u32::try_from(zone_len).unwrap());
            ZONE.0 + rng.below(zone_len - u64::from(len) + 1)
        }
        12 | 13 => MEM_END + rng.below(1 << 20),
        14 => {
            wild = true;
            MEM_END - rng.below(256)
        }
        _ => {
            wild = true;
            rng.next()
        }
    };
    let mut flags = rng.below_u16(4) & (NEXT | W);
    if allow_wild && rng.below(16) == 0 {
        flags |= INDIRECT;
        wild = true;
    }
    let next = rng.below_u16(size + 2);
    let d = RawDescriptor::from(SplitDescriptor::new(addr, len, flags, next));
    (d, wild)
}

/// Fills `q` with random descriptors (wild ones in half of the calls) and
/// available entries; returns the available index and whether any
/// descriptor was wild.
fn random_queue(rng: &mut XorShift, q: &mut TestQueue, size: u16) -> (u16, bool) {
    let mut wild = false;
    let allow_wild = rng.below(2) == 0;
    for i in 0..size {
        let (d, w) = random_desc(rng, size, allow_wild);
        wild |= w;
        q.store(i, d);
    }
    for slot in 0..size {
        let head = match rng.below(4) {
            0..=2 => rng.below_u16(size),
            _ => rng.below_u16(size + 2),
        };
        q.set_avail_entry(slot, head);
    }
    let avail_idx = rng.below_u16(size + 3);
    q.set_avail_idx(avail_idx);
    (avail_idx, wild)
}

#[test]
fn tx_random_descriptor_tables_do_not_panic() {
    const SIZE: u16 = 16;
    let mem = guest_memory();
    let (mut net, state) = new_net(true);
    let mut rng = XorShift(0x2545_f491_4f6c_dd1d);
    let mut popped = 0u64;
    for _ in 0..2000 {
        let rxq = TestQueue::new(&mem, RX_RING, SIZE);
        let mut txq = TestQueue::new(&mem, TX_RING, SIZE);
        let (avail_idx, _) = random_queue(&mut rng, &mut txq, SIZE);
        net.reset();
        let acked = net.avail_features() & rng.next();
        let irq = activate(&mut net, &mem, &rxq, &txq, acked | VERSION_1);
        net.process_queue(1);
        if avail_idx <= SIZE {
            // Every available chain was taken, sent or dropped.
            popped += u64::from(avail_idx);
            assert!(usize::from(txq.used_idx()) <= usize::from(avail_idx));
            assert_eq!(irq.count(1), usize::from(txq.used_idx() > 0));
        } else {
            assert_eq!(txq.used_idx(), 0);
        }
        let c = net.counters();
        assert_eq!(c.tx_packets + c.tx_dropped, popped);
    }
    let c = net.counters();
    assert!(c.tx_packets > 100 && c.tx_dropped > 100, "{c:?}");
    for f in state.sent() {
        assert!((VNET_HDR_LEN..=MAX_FRAME).contains(&f.len()));
    }
}

#[test]
fn rx_random_descriptor_tables_do_not_panic() {
    const SIZE: u16 = 16;
    let mem = guest_memory();
    let (mut net, state) = new_net(true);
    let mut rng = XorShift(0x9e37_79b9_7f4a_7c15);
    let lens = [5, 12, 13, 60, 300, 1514, 9000, 65_562, 70_000];
    let mut pushed = 0u64;
    let mut tame_rounds = 0;
    for _ in 0..2000 {
        mem.write_slice(&[0xc5; CANARY_LEN], GuestAddress(CANARY))
            .unwrap();
        let mut rxq = TestQueue::new(&mem, RX_RING, SIZE);
        let txq = TestQueue::new(&mem, TX_RING, SIZE);
        let (_, wild) = random_queue(&mut rng, &mut rxq, SIZE);
        for _ in 0..=rng.below(4) {
            let len = lens[rng.below_usize(lens.len())];
            state.push_frame(frame(len, rng.below_u16(256).to_le_bytes()[0]));
            pushed += 1;
        }
        net.reset();
        let acked = net.avail_features() & rng.next();
        let irq = activate(&mut net, &mem, &rxq, &txq, acked | VERSION_1);
        net.process_backend();
        if rng.below(2) == 0 {
            net.process_queue(0);
        }
        assert!(irq.count(0) <= 2);
        if !wild {
            // (Wild descriptors may have written over the rings.)
            for (_, len) in rxq.used() {
                assert!(usize::try_from(len).unwrap() <= MAX_FRAME);
            }
            tame_rounds += 1;
            assert_eq!(guest_bytes(&mem, CANARY, CANARY_LEN), [0xc5; CANARY_LEN]);
        }
        // Every frame read is delivered, dropped, or waiting in the device
        // (until the reset of the next round drops it).
        let c = net.counters();
        let pending = u64::from(net.pairs[0].rx_pending.is_some());
        let waiting = u64::try_from(state.waiting()).unwrap();
        let lost_in_resets = pushed - waiting - pending - c.rx_packets - c.rx_dropped;
        assert!(lost_in_resets < 2000);
    }
    let c = net.counters();
    assert!(c.rx_packets > 100 && c.rx_dropped > 100, "{c:?}");
    assert!(tame_rounds > 100, "{tame_rounds}");
}

#[test]
fn announce_writes_one_rarp_frame_from_the_nics_mac_behind_a_zero_vnet_header() {
    let (mut net, state) = new_net(true);
    net.announce().unwrap();
    let sent = state.sent();
    assert_eq!(sent.len(), 1);
    let (hdr, f) = sent[0].split_at(VNET_HDR_LEN);
    assert!(hdr.iter().all(|&b| b == 0));
    assert_eq!(f.len(), 60);
    assert_eq!(&f[..6], &[0xff; 6], "broadcast");
    assert_eq!(&f[6..12], &MAC, "from the guest's MAC");
    assert_eq!(&f[12..14], &[0x80, 0x35], "RARP");
    assert_eq!(&f[14..22], &[0, 1, 8, 0, 6, 4, 0, 3], "reverse request");
    assert_eq!((&f[22..28], &f[32..38]), (&MAC[..], &MAC[..]));
}
