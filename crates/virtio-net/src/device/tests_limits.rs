#![allow(unsafe_code, clippy::cast_possible_truncation)]
//! Rate limits on a device driven by a synthetic driver: frames over the
//! limit wait (transmit chains in the ring, a received frame in the
//! device) until the limiter's timer fires, and go on then, in order.

use std::os::fd::BorrowedFd;
use std::time::{Duration, Instant};

use ember_rate_limiter::{BucketConfig, RateLimiterConfig};
use vm_memory::{Bytes, GuestAddress};

use super::*;
use crate::test_utils::{
    desc, guest_bytes, guest_memory, CountingInterrupt, MemBackend, TestQueue, DATA, R, RX_RING,
    TX_RING, W,
};

const MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];
const BASIC: u64 = (1 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_NET_F_MAC);

fn limit(bandwidth: Option<(u64, u64)>, ops: Option<(u64, u64)>) -> RateLimiterConfig {
    let bucket = |(size, refill_time)| BucketConfig {
        size,
        one_time_burst: None,
        refill_time,
    };
    RateLimiterConfig {
        bandwidth: bandwidth.map(bucket),
        ops: ops.map(bucket),
    }
}

fn activate(net: &mut Net, mem: &GuestMemoryMmap, rx: &TestQueue, tx: &TestQueue) {
    net.activate(ActivateContext {
        mem: mem.clone(),
        interrupt: Arc::new(CountingInterrupt::default()),
        queues: vec![rx.queue(), tx.queue()],
        acked_features: BASIC,
    })
    .unwrap();
}

/// Waits (up to 2 s) until the device's epoll is readable: a limiter's
/// timer fired.
fn wait_for_timer(net: &Net) -> bool {
    let fd = net.backend_fd().expect("the device's epoll");
    // SAFETY: the fd is the device's epoll, open while `net` lives.
    let fd = unsafe { BorrowedFd::borrow_raw(fd) };
    let mut p = [nix_poll(fd)];
    let deadline = Instant::now() + Duration::from_secs(2);
    while Instant::now() < deadline {
        // SAFETY: one pollfd, valid for the call.
        if unsafe { libc::poll(p.as_mut_ptr(), 1, 20) } > 0 {
            return true;
        }
    }
    false
}

fn nix_poll(fd: BorrowedFd<'_>) -> libc::pollfd {
    use std::os::fd::AsRawFd;
    libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    }
}

#[test]
fn tx_over_the_limit_waits_in_the_ring_and_goes_on_when_the_timer_fires() {
    let (backend, state) = MemBackend::new();
    let mut net = Net::with_backend(Box::new(backend), MAC, false);
    // Two frames, then one every 50 ms.
    net.update_rate_limits(None, Some(&limit(None, Some((2, 100)))))
        .unwrap();
    let mem = guest_memory();
    let rxq = TestQueue::new(&mem, RX_RING, 16);
    let mut txq = TestQueue::new(&mem, TX_RING, 16);
    for i in 0..5u64 {
        let at = DATA + i * 0x1000;
        mem.write_slice(&[i as u8; 112], GuestAddress(at)).unwrap();
        txq.add(&[desc(at, 112, R)]);
    }
    activate(&mut net, &mem, &rxq, &txq);
    net.process_queue(1);
    assert_eq!(state.sent().len(), 2, "two frames under the limit");
    assert_eq!(txq.used().len(), 2, "the rest stay in the ring");
    let started = Instant::now();
    while state.sent().len() < 5 && started.elapsed() < Duration::from_secs(3) {
        assert!(wait_for_timer(&net), "the transmit limiter's timer fires");
        net.process_backend();
    }
    let sent = state.sent();
    assert_eq!(sent.len(), 5);
    for (i, f) in sent.iter().enumerate() {
        assert!(f.iter().all(|&b| b == i as u8), "frame {i} in order");
    }
    assert_eq!(txq.used().len(), 5);
    assert!(
        started.elapsed() >= Duration::from_millis(100),
        "three more frames at 20/s took {:?}",
        started.elapsed()
    );
    let (_, tx) = net.rate_limits();
    assert_eq!(tx.ops.unwrap().size, 2);
}

#[test]
fn rx_over_the_limit_waits_in_the_device_and_a_patch_lets_it_through() {
    let (backend, state) = MemBackend::new();
    let mut net = Net::with_backend(Box::new(backend), MAC, false);
    // 1000 bytes, refilled over 10 s: two 600-byte frames do not fit.
    net.update_rate_limits(Some(&limit(Some((1000, 10_000)), None)), None)
        .unwrap();
    let mem = guest_memory();
    let mut rxq = TestQueue::new(&mem, RX_RING, 16);
    let txq = TestQueue::new(&mem, TX_RING, 16);
    for i in 0..4u64 {
        rxq.add(&[desc(DATA + i * 0x1000, 2000, W)]);
    }
    activate(&mut net, &mem, &rxq, &txq);
    let frame = |seed: u8| {
        let mut f = vec![0u8; VNET_HDR_LEN];
        f.extend(std::iter::repeat_n(seed, 600));
        f
    };
    for seed in 1..=3 {
        state.push_frame(frame(seed));
    }
    net.process_backend();
    assert_eq!(rxq.used().len(), 1, "one frame under the limit");
    assert_eq!(
        state.waiting(),
        1,
        "the second waits in the device, the third in the backend"
    );
    assert_eq!(net.counters().rx_packets, 1);
    // More buffers do not help: the limit does.
    net.process_queue(0);
    assert_eq!(rxq.used().len(), 1);
    // Lifting the limit lets them through, in order.
    net.update_rate_limits(Some(&limit(Some((0, 0)), None)), None)
        .unwrap();
    assert!(wait_for_timer(&net), "a blocked limiter fires at once");
    net.process_backend();
    assert_eq!(rxq.used().len(), 3);
    for i in 0..3u64 {
        let got = guest_bytes(&mem, DATA + i * 0x1000 + VNET_HDR_LEN as u64, 600);
        assert!(got.iter().all(|&b| b == i as u8 + 1), "frame {i}");
    }
    assert!(net.rate_limits().0.is_unlimited());
}

#[test]
fn a_nic_reports_no_limits_until_given_some() {
    let (backend, _) = MemBackend::new();
    let net = Net::with_backend(Box::new(backend), MAC, false);
    let (rx, tx) = net.rate_limits();
    assert!(rx.is_unlimited() && tx.is_unlimited());
    assert!(net.rate_limiter_counters().is_some());
}

#[test]
fn rx_frame_admitted_then_short_of_buffers_is_not_charged_twice() {
    let (backend, state) = MemBackend::new();
    let mut net = Net::with_backend(Box::new(backend), MAC, false);
    // One frame per 10 s: a second charge would hold the frame that long.
    net.update_rate_limits(Some(&limit(None, Some((1, 10_000)))), None)
        .unwrap();
    let mem = guest_memory();
    let mut rxq = TestQueue::new(&mem, RX_RING, 16);
    let txq = TestQueue::new(&mem, TX_RING, 16);
    net.activate(ActivateContext {
        mem: mem.clone(),
        interrupt: Arc::new(CountingInterrupt::default()),
        queues: vec![rxq.queue(), txq.queue()],
        acked_features: BASIC | (1 << VIRTIO_NET_F_MRG_RXBUF),
    })
    .unwrap();
    // A 6000-byte frame and one 4 KiB buffer: read, let through, and left
    // waiting for a second buffer.
    let mut frame = vec![0u8; VNET_HDR_LEN];
    frame.extend_from_slice(&MAC);
    frame.resize(6000, 0x5a);
    state.push_frame(frame.clone());
    rxq.add(&[desc(DATA, 0x1000, W)]);
    net.process_queue(0);
    assert_eq!(net.pairs[0].rx_pending, Some(6000));
    assert!(rxq.used().is_empty());
    // The second buffer: the frame goes in at once, its token not taken
    // again.
    rxq.add(&[desc(DATA + 0x1000, 0x1000, W)]);
    net.process_queue(0);
    assert_eq!(net.pairs[0].rx_pending, None);
    assert_eq!(rxq.used(), [(0, 0x1000), (1, 6000 - 0x1000)]);
    let mut got = guest_bytes(&mem, DATA, 0x1000);
    got.extend(guest_bytes(&mem, DATA + 0x1000, 6000 - 0x1000));
    assert_eq!(got[VNET_HDR_LEN..], frame[VNET_HDR_LEN..]);
}
