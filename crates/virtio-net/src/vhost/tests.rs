//! vhost-net without `/dev/vhost-net` (this project's hosts have none):
//! the fallback's message, and what the device asks of vhost-net, checked
//! on recording instances: the memory table, each ring's size, addresses,
//! next index and eventfds, the tap queue, kicks and calls relayed, and
//! the workers let go at reset.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::sync::{Arc, Mutex};

use ember_virtio::{ActivateContext, VirtioDevice};
use virtio_bindings::virtio_net::VIRTIO_NET_F_CTRL_VQ;
use vmm_sys_util::eventfd::EventFd;

use super::*;
use crate::test_utils::{guest_memory, CountingInterrupt, MemBackend, TestQueue, MEM_SIZE};
use crate::Net;

const MAC: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];

/// What a recording instance was asked, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Asked {
    Owner,
    MemTable(Vec<(u64, u64)>),
    Features(u64),
    Num(usize, u16),
    Addr(usize, u64, u64, u64),
    Base(usize, u16),
    CallFd(usize),
    KickFd(usize),
    Backend(usize, Option<i32>),
}

/// The eventfds an instance was given, by ring: (call, kick).
type Fds = Arc<Mutex<Vec<(usize, EventFd, EventFd)>>>;

struct Recorder {
    calls: Arc<Mutex<Vec<Asked>>>,
    fds: Fds,
    offered: u64,
    call_fd: Mutex<Option<EventFd>>,
}

impl Recorder {
    fn new(offered: u64) -> (Recorder, Arc<Mutex<Vec<Asked>>>, Fds) {
        let calls = Arc::new(Mutex::new(Vec::new()));
        let fds = Arc::new(Mutex::new(Vec::new()));
        let r = Recorder {
            calls: calls.clone(),
            fds: fds.clone(),
            offered,
            call_fd: Mutex::new(None),
        };
        (r, calls, fds)
    }

    fn log(&self, c: Asked) -> vhost::Result<()> {
        self.calls.lock().unwrap().push(c);
        Ok(())
    }
}

impl VhostNetHandle for Recorder {
    fn get_features(&self) -> vhost::Result<u64> {
        Ok(self.offered)
    }
    fn set_features(&self, features: u64) -> vhost::Result<()> {
        self.log(Asked::Features(features))
    }
    fn set_owner(&self) -> vhost::Result<()> {
        self.log(Asked::Owner)
    }
    fn set_mem_table(&self, regions: &[VhostUserMemoryRegionInfo]) -> vhost::Result<()> {
        self.log(Asked::MemTable(
            regions
                .iter()
                .map(|r| (r.guest_phys_addr, r.memory_size))
                .collect(),
        ))
    }
    fn set_vring_num(&self, ring: usize, num: u16) -> vhost::Result<()> {
        self.log(Asked::Num(ring, num))
    }
    fn set_vring_addr(&self, ring: usize, c: &VringConfigData) -> vhost::Result<()> {
        self.log(Asked::Addr(
            ring,
            c.desc_table_addr,
            c.avail_ring_addr,
            c.used_ring_addr,
        ))
    }
    fn set_vring_base(&self, ring: usize, base: u16) -> vhost::Result<()> {
        self.log(Asked::Base(ring, base))
    }
    fn set_vring_call(&self, ring: usize, fd: &EventFd) -> vhost::Result<()> {
        *self.call_fd.lock().unwrap() = Some(fd.try_clone().unwrap());
        self.log(Asked::CallFd(ring))
    }
    fn set_vring_kick(&self, ring: usize, fd: &EventFd) -> vhost::Result<()> {
        let call = self.call_fd.lock().unwrap().take().unwrap();
        self.fds
            .lock()
            .unwrap()
            .push((ring, call, fd.try_clone().unwrap()));
        self.log(Asked::KickFd(ring))
    }
    fn set_backend(&self, ring: usize, tap: Option<&File>) -> vhost::Result<()> {
        self.log(Asked::Backend(ring, tap.map(AsRawFd::as_raw_fd)))
    }
}

#[test]
fn vhost_without_the_device_node_says_what_to_load() {
    let mem = guest_memory();
    let tap = File::open("/dev/null").unwrap();
    match Vhost::open(vec![tap], &mem) {
        Err(e @ VhostError::Missing(_)) => {
            let msg = e.to_string();
            assert!(msg.contains("/dev/vhost-net cannot be opened"), "{msg}");
            assert!(msg.contains("modprobe vhost_net"), "{msg}");
        }
        // A host with vhost-net: /dev/null is no tap, but opening and
        // owning the instance worked.
        Ok(_) => eprintln!("this host has /dev/vhost-net: the fallback is not exercised"),
        Err(e) => assert!(
            std::path::Path::new(VHOST_NET_PATH).exists(),
            "unexpected: {e}"
        ),
    }
}

#[test]
fn vhost_is_refused_for_a_backend_that_is_not_a_plain_tap() {
    let mem = guest_memory();
    let (b, _) = MemBackend::new();
    let mut net = Net::with_backend(Box::new(b), MAC, false);
    let err = net.enable_vhost(&mem).unwrap_err();
    assert!(err.to_string().contains("plain tap"), "{err}");
    assert!(!net.uses_vhost());
}

#[test]
fn vhost_gets_each_ring_and_the_tap_and_relays_kicks_and_calls() {
    let mem = guest_memory();
    let (rec, calls, fds) = Recorder::new(VHOST_FEATURES);
    let tap = File::open("/dev/null").unwrap();
    let tap_fd = tap.as_raw_fd();
    let vhost = Vhost::with_handles(vec![Box::new(rec)], vec![tap], &mem).unwrap();
    assert_eq!(
        *calls.lock().unwrap(),
        [Asked::Owner, Asked::MemTable(vec![(0, MEM_SIZE as u64)])]
    );
    let (b, state) = MemBackend::new();
    let mut net = Net::with_backend(Box::new(b), MAC, false);
    net.use_vhost(vhost).unwrap();
    assert!(net.uses_vhost());
    // No rate limits on a NIC whose frames ember does not see.
    let limit = ember_rate_limiter::RateLimiterConfig::default();
    assert!(net.update_rate_limits(Some(&limit), None).is_err());

    let rxq = TestQueue::new(&mem, 0, 256);
    let txq = TestQueue::new(&mem, 0x4000, 128);
    let ctrlq = TestQueue::new(&mem, 0x8000, 64);
    let mut tx = txq.queue();
    tx.set_next_avail(5);
    let irq = Arc::new(CountingInterrupt::default());
    let acked = (1 << VIRTIO_F_VERSION_1)
        | (1 << VIRTIO_RING_F_EVENT_IDX)
        | (1 << VIRTIO_NET_F_MRG_RXBUF)
        | (1 << VIRTIO_NET_F_CTRL_VQ);
    net.activate(ActivateContext {
        mem: mem.clone(),
        interrupt: irq.clone(),
        queues: vec![rxq.queue(), tx, ctrlq.queue()],
        acked_features: acked,
    })
    .unwrap();
    let want = [
        Asked::Features(VHOST_FEATURES),
        Asked::Num(0, 256),
        Asked::Addr(0, 0, rxq.avail_addr(), rxq.used_addr()),
        Asked::Base(0, 0),
        Asked::CallFd(0),
        Asked::KickFd(0),
        Asked::Num(1, 128),
        Asked::Addr(1, 0x4000, txq.avail_addr(), txq.used_addr()),
        Asked::Base(1, 5),
        Asked::CallFd(1),
        Asked::KickFd(1),
        Asked::Backend(0, Some(tap_fd)),
        Asked::Backend(1, Some(tap_fd)),
    ];
    assert_eq!(calls.lock().unwrap()[2..], want);

    let fds = fds.lock().unwrap();
    let (rx_call, rx_kick) = (&fds[0].1, &fds[0].2);
    let (tx_call, tx_kick) = (&fds[1].1, &fds[1].2);
    // Started: each ring kicked once for what the driver had posted.
    assert_eq!(rx_kick.read().unwrap(), 1);
    assert_eq!(tx_kick.read().unwrap(), 1);
    // The guest's notifications go to the worker; the device reads nothing.
    net.process_queue(0);
    net.process_queue(1);
    net.process_queue(1);
    assert_eq!(rx_kick.read().unwrap(), 1);
    assert_eq!(tx_kick.read().unwrap(), 2);
    // The worker's signals become the queues' interrupts.
    tx_call.write(1).unwrap();
    net.process_backend();
    assert_eq!((irq.count(0), irq.count(1)), (0, 1));
    rx_call.write(1).unwrap();
    net.process_backend();
    assert_eq!((irq.count(0), irq.count(1)), (1, 1));
    assert_eq!(state.reads.load(std::sync::atomic::Ordering::SeqCst), 0);

    // A reset lets go of the tap.
    net.reset();
    let c = calls.lock().unwrap();
    assert_eq!(
        c[c.len() - 2..],
        [Asked::Backend(0, None), Asked::Backend(1, None)]
    );
}

#[test]
fn vhost_without_a_negotiated_feature_fails_activation_clearly() {
    let mem = guest_memory();
    // The instance lacks mergeable receive buffers.
    let (rec, _, _) = Recorder::new(VHOST_FEATURES & !(1 << VIRTIO_NET_F_MRG_RXBUF));
    let tap = File::open("/dev/null").unwrap();
    let vhost = Vhost::with_handles(vec![Box::new(rec)], vec![tap], &mem).unwrap();
    let (b, _) = MemBackend::new();
    let mut net = Net::with_backend(Box::new(b), MAC, false);
    net.use_vhost(vhost).unwrap();
    let rxq = TestQueue::new(&mem, 0, 16);
    let txq = TestQueue::new(&mem, 0x4000, 16);
    let err = net
        .activate(ActivateContext {
            mem: mem.clone(),
            interrupt: Arc::new(CountingInterrupt::default()),
            queues: vec![rxq.queue(), txq.queue()],
            acked_features: (1 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_NET_F_MRG_RXBUF),
        })
        .unwrap_err();
    assert!(err.to_string().contains("lacks features 0x8000"), "{err}");
    assert!(!net.is_activated());
}

#[test]
fn vhost_starts_only_the_pairs_the_driver_set_up() {
    let mem = guest_memory();
    let (r0, calls0, _) = Recorder::new(VHOST_FEATURES);
    let (r1, calls1, _) = Recorder::new(VHOST_FEATURES);
    let taps = vec![
        File::open("/dev/null").unwrap(),
        File::open("/dev/null").unwrap(),
    ];
    let vhost = Vhost::with_handles(vec![Box::new(r0), Box::new(r1)], taps, &mem).unwrap();
    let (b0, _) = MemBackend::new();
    let (b1, _) = MemBackend::new();
    let mut net = Net::with_backends(vec![Box::new(b0), Box::new(b1)], MAC, false).unwrap();
    net.use_vhost(vhost).unwrap();
    // A driver without VIRTIO_NET_F_MQ: one pair and the control queue.
    let rxq = TestQueue::new(&mem, 0, 16);
    let txq = TestQueue::new(&mem, 0x4000, 16);
    let ctrlq = TestQueue::new(&mem, 0x8000, 16);
    net.activate(ActivateContext {
        mem: mem.clone(),
        interrupt: Arc::new(CountingInterrupt::default()),
        queues: vec![rxq.queue(), txq.queue(), ctrlq.queue()],
        acked_features: (1 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_NET_F_CTRL_VQ),
    })
    .unwrap();
    let backend_calls = |c: &Arc<Mutex<Vec<Asked>>>| {
        c.lock()
            .unwrap()
            .iter()
            .filter(|a| matches!(a, Asked::Backend(..)))
            .count()
    };
    assert_eq!(backend_calls(&calls0), 2);
    // The second instance got its memory table and nothing else.
    assert_eq!(calls1.lock().unwrap().len(), 2);
    net.reset();
    assert_eq!(backend_calls(&calls0), 4);
    assert_eq!(calls1.lock().unwrap().len(), 2);
}
