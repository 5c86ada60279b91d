//! The virtio-net device: its features and config space, the transmit
//! queue that hands the guest's frames to the backend, and the receive path
//! that copies the backend's frames into the guest's buffers.
//!
//! A transmitted frame goes from guest memory to the backend without a copy
//! of ours (`writev` on a tap). A received frame, header included, is
//! either read into one buffer of [`MAX_FRAME`] bytes allocated with the
//! device and copied into the guest's buffers (small frames, `rx.rs`), or
//! read straight into the guest's buffers (large frames, `direct.rs`); a
//! moving average of frame lengths picks the path. At most one received
//! frame per queue pair waits in the device for guest buffers.
//!
//! With several queue pairs (`VIRTIO_NET_F_MQ`, a multi-queue tap), each
//! pair has its own tap queue and receive state (`pairs.rs`); one event
//! loop serves them all. The driver says how many it uses through the
//! control queue, and the tap queues of the others are detached so the
//! kernel steers no frames to them.

use std::fmt;
use std::mem::{offset_of, size_of};
use std::os::fd::RawFd;
use std::sync::Arc;

use ember_memory::GuestMemoryMmap;
use ember_virtio::queue::Flow;
use ember_virtio::{
    ActivateContext, ActivateError, BackendInterest, InterruptKind, VirtioDevice, VirtioInterrupt,
};
use libc::{TUN_F_CSUM, TUN_F_TSO4, TUN_F_TSO6, TUN_F_TSO_ECN, TUN_F_UFO};
use log::{debug, warn};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ids::VIRTIO_ID_NET;
use virtio_bindings::virtio_net::{
    virtio_net_config, virtio_net_hdr_mrg_rxbuf, VIRTIO_NET_F_CSUM,
    VIRTIO_NET_F_CTRL_GUEST_OFFLOADS, VIRTIO_NET_F_CTRL_MAC_ADDR, VIRTIO_NET_F_CTRL_RX,
    VIRTIO_NET_F_CTRL_RX_EXTRA, VIRTIO_NET_F_CTRL_VLAN, VIRTIO_NET_F_CTRL_VQ,
    VIRTIO_NET_F_GUEST_ANNOUNCE, VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_ECN,
    VIRTIO_NET_F_GUEST_TSO4, VIRTIO_NET_F_GUEST_TSO6, VIRTIO_NET_F_GUEST_UFO,
    VIRTIO_NET_F_HOST_ECN, VIRTIO_NET_F_HOST_TSO4, VIRTIO_NET_F_HOST_TSO6, VIRTIO_NET_F_HOST_UFO,
    VIRTIO_NET_F_MAC, VIRTIO_NET_F_MQ, VIRTIO_NET_F_MRG_RXBUF, VIRTIO_NET_F_STATUS,
    VIRTIO_NET_S_LINK_UP,
};
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use virtio_queue::{Queue, QueueT};

use crate::backend::NetBackend;
use crate::ctrl::RxFilter;
use crate::tap::Tap;
use crate::{Error, Result};

mod control;
mod direct;
mod fault;
mod limits;
mod pairs;
mod rx;
mod status;
mod tx;
mod vhost_mode;

pub use status::rarp_announce;

use fault::{Fault, FaultLog};
use pairs::{Pair, QueuePair};

use rx::RxQueue;
use tx::{gather, send};

/// The size of the virtio-net header in front of every frame
/// (`struct virtio_net_hdr_mrg_rxbuf`; virtio 1.x always has
/// `num_buffers`).
pub const VNET_HDR_LEN: usize = size_of::<virtio_net_hdr_mrg_rxbuf>();

/// The largest frame moved in either direction, header included: the
/// header and 65,550 bytes (a 64 KiB segmentation-offload frame with its
/// Ethernet and VLAN headers).
pub const MAX_FRAME: usize = VNET_HDR_LEN + 65_550;

/// The control queue's size.
pub const CTRL_QUEUE_SIZE: u16 = 64;

/// The most queue pairs a NIC has (`queues=`; Linux attaches up to 256
/// queues to a tap, one event loop serves them all here).
pub const MAX_QUEUE_PAIRS: u16 = 16;

/// How much of a received frame the receive filter looks at: the header,
/// both MAC addresses and a VLAN tag.
const FILTER_HEAD: usize = VNET_HDR_LEN + 16;

/// The maximum size of each of the two queues.
pub const QUEUE_SIZE: u16 = 256;

/// Queue pair `p`'s receive queue's index.
fn rx_index(p: usize) -> u16 {
    u16::try_from(p * 2).unwrap_or(u16::MAX)
}

/// Queue pair `p`'s transmit queue's index.
fn tx_index(p: usize) -> u16 {
    rx_index(p).saturating_add(1)
}

/// Where `num_buffers` sits in the header.
const NUM_BUFFERS_AT: usize = offset_of!(virtio_net_hdr_mrg_rxbuf, num_buffers);

/// The most descriptors a chain may have: a queue's worth (virtio 1.2,
/// 2.7.5.3.1 and 2.7.13.3.1). Longer chains are malformed.
const MAX_CHAIN_DESCS: usize = QUEUE_SIZE as usize;

/// The most frames received in one pass; the tap stays watched (it is
/// level-triggered) and the rest come in the next pass.
const RX_BUDGET: usize = QUEUE_SIZE as usize;

/// The average received frame length (header included) from which frames
/// are read straight into guest buffers (`direct.rs`) rather than into the
/// device's buffer and copied. A `readv` over the several buffers that must
/// be offered for a frame of unknown length costs more than copying a small
/// frame: in `tools/bench/net`, 64-byte frames reach 0.85 of the tap's rate
/// copied and 0.69 direct, 64000-byte frames 0.52 copied and 0.58 direct.
const DIRECT_MIN_AVG: usize = 4096;

/// The moving average of frame lengths, with `len` added (weight 1/8).
fn average(avg: usize, len: usize) -> usize {
    avg - avg / 8 + len / 8
}

/// The size of `struct virtio_net_config`.
const CONFIG_SIZE: usize = size_of::<virtio_net_config>();

/// The offload features offered when the VMM asks for offloads.
const OFFLOAD_FEATURES: [u32; 10] = [
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
];

/// Which tap offload each guest-receive feature allows.
const GUEST_OFFLOADS: [(u32, u32); 5] = [
    (VIRTIO_NET_F_GUEST_CSUM, TUN_F_CSUM),
    (VIRTIO_NET_F_GUEST_TSO4, TUN_F_TSO4),
    (VIRTIO_NET_F_GUEST_TSO6, TUN_F_TSO6),
    (VIRTIO_NET_F_GUEST_ECN, TUN_F_TSO_ECN),
    (VIRTIO_NET_F_GUEST_UFO, TUN_F_UFO),
];

/// How [`Net::announce`] announced the NIC.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Announced {
    /// The device sent a RARP frame, and the driver was asked to announce
    /// itself (`VIRTIO_NET_S_ANNOUNCE`).
    RarpAndGuest,
    /// The device sent a RARP frame (the driver cannot announce itself).
    Rarp,
}

/// What a VMM says about one network interface.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetConfig {
    /// The host tap interface, which must exist.
    pub tap: String,
    /// The guest's MAC address (unicast).
    pub mac: [u8; 6],
    /// Whether to offer checksum and segmentation offloads.
    pub offloads: bool,
    /// Host-side 802.1Q: tag every frame the guest sends with this VLAN
    /// and hand it only this VLAN's frames, untagged
    /// ([`VlanBackend`](crate::VlanBackend)); 1 to 4094.
    pub vlan: Option<u16>,
    /// Queue pairs, 1 to [`MAX_QUEUE_PAIRS`]: more than one needs a
    /// multi-queue tap, one queue of it per pair.
    pub queues: u16,
}

/// What the device has done since it was built. Bytes count frames without
/// their virtio-net header; a dropped frame counts in `*_dropped` only.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NetCounters {
    /// Frames delivered to the guest.
    pub rx_packets: u64,
    /// Bytes delivered to the guest.
    pub rx_bytes: u64,
    /// Frames from the backend that no guest buffer could take, or shorter
    /// than the header.
    pub rx_dropped: u64,
    /// Frames the backend took from the guest.
    pub tx_packets: u64,
    /// Bytes the backend took from the guest.
    pub tx_bytes: u64,
    /// Malformed transmit chains and frames the backend refused.
    pub tx_dropped: u64,
    /// Frames the NIC's filters kept from the guest: another VLAN's on a
    /// host-side VLAN, or what the guest's receive filter (MAC, VLAN, RX
    /// mode) does not want.
    pub rx_filtered: u64,
    /// Control commands the device carried out.
    pub ctrl_ok: u64,
    /// Control commands refused (status `VIRTIO_NET_ERR`) or malformed.
    pub ctrl_err: u64,
}

/// What the device holds while activated.
struct Active {
    mem: GuestMemoryMmap,
    interrupt: Arc<dyn VirtioInterrupt>,
    /// The receive and transmit queues, by pair: one pair, or every pair
    /// the device has when VIRTIO_NET_F_MQ was negotiated.
    queues: Vec<QueuePair>,
    /// The control queue, when VIRTIO_NET_F_CTRL_VQ was negotiated.
    ctrl: Option<Queue>,
    /// The control queue's index: after the last pair's transmit queue.
    ctrl_index: u16,
    /// The negotiated features.
    acked: u64,
    /// VIRTIO_NET_F_MRG_RXBUF was negotiated: a frame may span chains.
    mrg_rxbuf: bool,
    /// VIRTIO_NET_F_GUEST_CSUM was negotiated: the header's flags pass.
    guest_csum: bool,
}

/// A virtio-net device with receive and transmit queue pairs, each over a
/// [`NetBackend`] (one pair on most NICs; one tap queue per pair on a
/// multi-queue NIC), and a control queue.
pub struct Net {
    /// The queue pairs' backends and receive state.
    pairs: Vec<Pair>,
    avail_features: u64,
    config: [u8; CONFIG_SIZE],
    queue_max_sizes: Vec<u16>,
    /// The MAC the device was built with (a reset goes back to it).
    base_mac: [u8; 6],
    /// What the control queue set: the MAC, RX modes, MAC and VLAN tables.
    filter: RxFilter,
    /// The backend works (`VIRTIO_NET_S_LINK_UP`).
    link_up: bool,
    /// The guest was asked to announce itself and has not acknowledged
    /// (`VIRTIO_NET_S_ANNOUNCE`).
    announcing: bool,
    active: Option<Active>,
    /// The rate limiters and the epoll the event loop watches (none if
    /// it could not be made: no limits then, the backend's fd watched).
    limits: Option<limits::Limits>,
    /// vhost-net, when it moves the frames (`vhost_mode.rs`).
    vhost: Option<crate::vhost::Vhost>,
    /// The largest frame the guest sent (without its header): above the
    /// MTU only with segmentation offload.
    tx_largest: u64,
    counters: NetCounters,
    log: FaultLog,
}

impl fmt::Debug for Net {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Net")
            .field("name", &self.log.name)
            .field("avail_features", &self.avail_features)
            .field("activated", &self.active.is_some())
            .field("pairs", &self.pairs.len())
            .field("counters", &self.counters)
            .finish_non_exhaustive()
    }
}

impl Net {
    /// Opens the existing tap `cfg.tap` (one queue per pair) and builds a
    /// device on it. A multicast or all-zero MAC address is an error.
    pub fn new(cfg: &NetConfig) -> Result<Net> {
        if cfg.mac[0] & 1 != 0 || cfg.mac == [0; 6] {
            return Err(Error::InvalidMac {
                name: cfg.tap.clone(),
                mac: cfg.mac,
            });
        }
        if let Some(vid) = cfg.vlan.filter(|v| !(1..=4094).contains(v)) {
            return Err(Error::Vlan {
                name: cfg.tap.clone(),
                vid,
            });
        }
        check_queues(&cfg.tap, cfg.queues)?;
        let taps = Tap::open_queues(&cfg.tap, cfg.queues)?;
        Net::with_taps(taps, cfg)
    }

    /// [`Net::new`] on tap queues already open (handed over by a live
    /// migration's source), one per queue pair.
    pub fn with_taps(taps: Vec<Tap>, cfg: &NetConfig) -> Result<Net> {
        check_queues(&cfg.tap, u16::try_from(taps.len()).unwrap_or(u16::MAX))?;
        let mut backends: Vec<Box<dyn NetBackend>> = Vec::with_capacity(taps.len());
        for tap in taps {
            backends.push(match cfg.vlan {
                Some(vid) => {
                    Box::new(crate::VlanBackend::new(Box::new(tap), vid).map_err(|e| {
                        Error::TapSetup {
                            name: cfg.tap.clone(),
                            what: "vlan",
                            source: e,
                        }
                    })?)
                }
                None => Box::new(tap),
            });
        }
        let mut net = Net::with_backends(backends, cfg.mac, cfg.offloads)?;
        net.log.name.clone_from(&cfg.tap);
        Ok(net)
    }

    /// The backends' descriptors (a tap's queues, by pair), to hand them
    /// over.
    pub fn backend_raw_fds(&self) -> Vec<RawFd> {
        self.pairs
            .iter()
            .filter_map(|p| p.backend.raw_fd())
            .collect()
    }

    /// The queue pairs the device has.
    pub fn queue_pairs(&self) -> u16 {
        u16::try_from(self.pairs.len()).unwrap_or(u16::MAX)
    }

    /// The queue pairs the driver uses (set through the control queue).
    pub fn active_queue_pairs(&self) -> u16 {
        self.filter.queue_pairs()
    }

    /// Builds a device on any backend (tests, other frame sources). With
    /// `offloads`, checksum and segmentation offloads are offered in both
    /// directions.
    pub fn with_backend(backend: Box<dyn NetBackend>, mac: [u8; 6], offloads: bool) -> Net {
        let limits = match limits::Limits::new(&[backend.raw_fd()]) {
            Ok(l) => Some(l),
            Err(e) => {
                warn!("virtio-net: no rate limits (their timers or epoll cannot be made: {e})");
                None
            }
        };
        Net::build(vec![backend], mac, offloads, limits)
    }

    /// Builds a device with one queue pair per backend (each backend one
    /// queue of a multi-queue tap, say); with more than one,
    /// `VIRTIO_NET_F_MQ` is offered. 1 to [`MAX_QUEUE_PAIRS`] backends.
    pub fn with_backends(
        backends: Vec<Box<dyn NetBackend>>,
        mac: [u8; 6],
        offloads: bool,
    ) -> Result<Net> {
        let name = "(custom backend)";
        check_queues(name, u16::try_from(backends.len()).unwrap_or(u16::MAX))?;
        let fds: Vec<Option<RawFd>> = backends.iter().map(|b| b.raw_fd()).collect();
        let limits = match limits::Limits::new(&fds) {
            Ok(l) => Some(l),
            // One queue pair can go on without (the event loop watches the
            // backend); several need the device's epoll.
            Err(e) if backends.len() == 1 => {
                warn!("virtio-net: no rate limits (their timers or epoll cannot be made: {e})");
                None
            }
            Err(e) => {
                return Err(Error::TapSetup {
                    name: name.to_string(),
                    what: "epoll over the queues",
                    source: e,
                })
            }
        };
        Ok(Net::build(backends, mac, offloads, limits))
    }

    fn build(
        backends: Vec<Box<dyn NetBackend>>,
        mac: [u8; 6],
        offloads: bool,
        limits: Option<limits::Limits>,
    ) -> Net {
        let n = u16::try_from(backends.len()).unwrap_or(1);
        let mut queue_max_sizes = vec![QUEUE_SIZE; usize::from(n) * 2];
        queue_max_sizes.push(CTRL_QUEUE_SIZE);
        let mut avail_features = features(offloads);
        if n > 1 {
            avail_features |= 1 << VIRTIO_NET_F_MQ;
        }
        Net {
            pairs: backends.into_iter().map(Pair::new).collect(),
            avail_features,
            config: config_space(mac, VIRTIO_NET_S_LINK_UP, n),
            queue_max_sizes,
            base_mac: mac,
            filter: RxFilter::new(mac),
            link_up: true,
            announcing: false,
            active: None,
            limits,
            vhost: None,
            tx_largest: 0,
            counters: NetCounters::default(),
            log: FaultLog::new("(custom backend)"),
        }
    }

    /// What the device has moved and dropped so far.
    pub fn counters(&self) -> NetCounters {
        let mut c = self.counters;
        for p in &self.pairs {
            c.rx_filtered = c.rx_filtered.saturating_add(p.backend.rx_filtered());
        }
        c
    }

    /// The largest frame the guest sent so far, without its header (above
    /// the MTU only with segmentation offload).
    pub fn largest_tx_frame(&self) -> u64 {
        self.tx_largest
    }

    /// The tap's name (or "(custom backend)").
    pub fn name(&self) -> &str {
        &self.log.name
    }

    /// Names the device in its log lines (a custom backend's NIC).
    pub fn set_name(&mut self, name: &str) {
        name.clone_into(&mut self.log.name);
    }

    /// Sends every available transmit chain of pair `p` to its backend.
    fn process_tx(&mut self, p: usize) {
        let (Some(active), Some(pair)) = (self.active.as_mut(), self.pairs.get_mut(p)) else {
            return;
        };
        let Some(queues) = active.queues.get_mut(p) else {
            return;
        };
        let mut used_any = false;
        let mut frame = Vec::new();
        let mem = &active.mem;
        let sent_before = self.counters.tx_packets;
        let mut largest = self.tx_largest;
        let (backend, counters, log) = (&mut *pair.backend, &mut self.counters, &mut self.log);
        let mut limiter = self.limits.as_mut().map(|l| &mut l.tx);
        let drained = ember_virtio::queue::drain_while(&mut queues.tx, mem, |queue, chain| {
            let head = chain.head_index();
            match gather(chain, mem, &mut frame) {
                Ok(len) => {
                    // Over the limit: the chain goes back until the
                    // limiter's timer fires.
                    if let Some(l) = limiter.as_deref_mut() {
                        if !limits::admit(l, payload_len(len)) {
                            return Flow::PutBack;
                        }
                    }
                    let before = counters.tx_packets;
                    send(backend, &frame, len, counters, log);
                    if counters.tx_packets > before {
                        largest = largest.max(payload_len(len));
                    }
                }
                Err(e) => {
                    counters.tx_dropped = counters.tx_dropped.saturating_add(1);
                    log.report(
                        Fault::TxChain,
                        format_args!("dropped transmit chain {head}: {e}"),
                    );
                }
            }
            used_any |= complete(queue, mem, head, 0, log);
            Flow::Continue
        });
        if let Err(e) = drained {
            self.log.report(
                Fault::UsedRing,
                format_args!("cannot update the transmit ring's notification fields: {e}"),
            );
        }
        pair.tx_packets = pair
            .tx_packets
            .saturating_add(self.counters.tx_packets - sent_before);
        self.tx_largest = largest;
        if used_any {
            notify(active, tx_index(p), &mut self.log);
        }
    }
}

/// The features offered.
fn features(offloads: bool) -> u64 {
    let mut f = (1u64 << VIRTIO_F_VERSION_1)
        | (1 << VIRTIO_RING_F_EVENT_IDX)
        | (1 << VIRTIO_NET_F_MAC)
        | (1 << VIRTIO_NET_F_STATUS)
        | (1 << VIRTIO_NET_F_MRG_RXBUF)
        | (1 << VIRTIO_NET_F_CTRL_VQ)
        | (1 << VIRTIO_NET_F_CTRL_RX)
        | (1 << VIRTIO_NET_F_CTRL_RX_EXTRA)
        | (1 << VIRTIO_NET_F_CTRL_VLAN)
        | (1 << VIRTIO_NET_F_CTRL_MAC_ADDR)
        | (1 << VIRTIO_NET_F_GUEST_ANNOUNCE);
    if offloads {
        for bit in OFFLOAD_FEATURES {
            f |= 1 << bit;
        }
        f |= 1 << VIRTIO_NET_F_CTRL_GUEST_OFFLOADS;
    }
    f
}

/// The tap offloads (`TUN_F_*`) the acknowledged features allow.
fn tun_offloads(acked: u64) -> u32 {
    GUEST_OFFLOADS
        .iter()
        .filter(|(bit, _)| acked & (1 << bit) != 0)
        .fold(0, |flags, (_, tun)| flags | tun)
}

/// Whether `queues` queue pairs can be had on NIC `name`.
fn check_queues(name: &str, queues: u16) -> Result<()> {
    if (1..=MAX_QUEUE_PAIRS).contains(&queues) {
        return Ok(());
    }
    Err(Error::QueuePairs {
        name: name.to_string(),
        queues,
        max: MAX_QUEUE_PAIRS,
    })
}

/// Lays out `struct virtio_net_config`: the MAC, the status
/// (`VIRTIO_NET_S_*`), `max_virtqueue_pairs`.
fn config_space(mac: [u8; 6], status: u32, pairs: u16) -> [u8; CONFIG_SIZE] {
    let mut c = [0u8; CONFIG_SIZE];
    let status = u16::try_from(status).unwrap_or(1);
    let mut put = |at: usize, bytes: &[u8]| {
        if let Some(dst) = c.get_mut(at..at + bytes.len()) {
            dst.copy_from_slice(bytes);
        }
    };
    put(offset_of!(virtio_net_config, mac), &mac);
    put(offset_of!(virtio_net_config, status), &status.to_le_bytes());
    put(
        offset_of!(virtio_net_config, max_virtqueue_pairs),
        &pairs.to_le_bytes(),
    );
    c
}

/// The frame's length without its header, as counted.
fn payload_len(len: usize) -> u64 {
    u64::try_from(len.saturating_sub(VNET_HDR_LEN)).unwrap_or(u64::MAX)
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_NET
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_max_sizes
    }

    fn avail_features(&self) -> u64 {
        self.avail_features
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        for (i, b) in data.iter_mut().enumerate() {
            *b = u64::try_from(i)
                .ok()
                .and_then(|i| offset.checked_add(i))
                .and_then(|at| usize::try_from(at).ok())
                .and_then(|at| self.config.get(at))
                .copied()
                .unwrap_or(0);
        }
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        // A modern driver writes no field of the net config space
        // (virtio 1.2, 5.1.4.2).
        debug!(
            "virtio-net {}: ignored {}-byte config write at {offset:#x}",
            self.log.name,
            data.len()
        );
    }

    fn activate(&mut self, ctx: ActivateContext) -> std::result::Result<(), ActivateError> {
        let got = ctx.queues.len();
        let acked = ctx.acked_features & self.avail_features;
        let want_ctrl = acked & (1 << VIRTIO_NET_F_CTRL_VQ) != 0;
        let mq = acked & (1 << VIRTIO_NET_F_MQ) != 0;
        // With VIRTIO_NET_F_MQ every pair the device has, and the control
        // queue after them (which MQ needs); one pair without.
        let pairs = if mq { self.pairs.len() } else { 1 };
        let expected = pairs * 2 + usize::from(want_ctrl);
        if got != expected || (mq && !want_ctrl) {
            return Err(ActivateError::QueueCount { expected, got });
        }
        let event_idx = acked & (1 << VIRTIO_RING_F_EVENT_IDX) != 0;
        let mut queues = ctx.queues.into_iter().map(|mut q| {
            q.set_event_idx(event_idx);
            q
        });
        let mut pair_queues = Vec::with_capacity(pairs);
        while pair_queues.len() < pairs {
            let (Some(rx), Some(tx)) = (queues.next(), queues.next()) else {
                return Err(ActivateError::QueueCount { expected, got });
            };
            pair_queues.push(QueuePair { rx, tx });
        }
        let ctrl = queues.next();
        let offloads = tun_offloads(acked);
        self.set_offloads(offloads);
        for p in &mut self.pairs {
            p.forget();
        }
        self.filter
            .set_features(acked, u16::try_from(pairs).unwrap_or(1));
        self.active = Some(Active {
            mem: ctx.mem,
            interrupt: ctx.interrupt,
            queues: pair_queues,
            ctrl,
            ctrl_index: rx_index(pairs),
            acked,
            mrg_rxbuf: acked & (1 << VIRTIO_NET_F_MRG_RXBUF) != 0,
            guest_csum: acked & (1 << VIRTIO_NET_F_GUEST_CSUM) != 0,
        });
        // The driver starts on the first pair (virtio 1.2, 5.1.6.5.5): the
        // other tap queues are detached. The backends are watched again at
        // the first receive pass (the driver's first receive notification,
        // on the event loop: this runs on a vCPU thread, whose seccomp
        // filter has no epoll_ctl).
        self.set_active_pairs(1);
        self.start_vhost(acked)
    }

    fn is_activated(&self) -> bool {
        self.active.is_some()
    }

    fn queue_states(&self) -> Vec<virtio_queue::QueueState> {
        let Some(a) = self.active.as_ref() else {
            return Vec::new();
        };
        let mut states = Vec::with_capacity(a.queues.len() * 2 + 1);
        for (q, pair) in a.queues.iter().zip(&self.pairs) {
            // Receive chains parked for the direct path were taken but not
            // used: the restored device takes them again.
            let mut rx = q.rx.state();
            let parked = u16::try_from(pair.rx_parked.chain_count()).unwrap_or(u16::MAX);
            rx.next_avail = rx.next_avail.wrapping_sub(parked);
            states.push(rx);
            states.push(q.tx.state());
        }
        states.extend(a.ctrl.as_ref().map(Queue::state));
        states
    }

    fn process_queue(&mut self, index: usize) {
        let Some(a) = self.active.as_ref() else {
            return;
        };
        if index == usize::from(a.ctrl_index) {
            self.process_ctrl();
        } else if let Some(v) = self.vhost.as_ref().filter(|v| v.running()) {
            v.kick(index);
        } else if index % 2 == 0 {
            // New receive buffers: deliver the waiting frame and read on
            // (a pair the driver uses).
            if index / 2 < usize::from(self.filter.queue_pairs()) {
                self.rx_pass(index / 2);
            }
        } else {
            self.process_tx(index / 2);
        }
    }

    fn reset(&mut self) {
        if let Some(v) = self.vhost.as_mut() {
            v.stop();
        }
        self.active = None;
        for p in &mut self.pairs {
            p.forget();
        }
        self.filter.reset(self.base_mac);
        self.announcing = false;
        self.refresh_config();
    }

    fn backend_fd(&self) -> Option<RawFd> {
        match &self.limits {
            Some(l) => Some(l.fd()),
            None => self.pairs.first().and_then(|p| p.backend.raw_fd()),
        }
    }

    fn process_backend(&mut self) -> BackendInterest {
        let Some(l) = self.limits.as_mut() else {
            return self.process_rx(0);
        };
        let ready = l.ready();
        if self.vhost.is_some() {
            self.vhost_calls(ready.calls);
            return BackendInterest::Keep;
        }
        let has_fd = l.has_backend_fd();
        if ready.tx_timer {
            for p in 0..self.pairs.len() {
                self.process_tx(p);
            }
        }
        let used = usize::from(self.filter.queue_pairs());
        // Backends without a descriptor are read whenever the loop asks.
        if !has_fd {
            let mut interest = BackendInterest::Pause;
            for p in 0..used.min(self.pairs.len()) {
                if self.process_rx(p) == BackendInterest::Keep {
                    interest = BackendInterest::Keep;
                }
            }
            return interest;
        }
        for p in 0..self.pairs.len() {
            if p >= used {
                // A detached tap queue polls as an error: unwatched.
                if ready.backend(p) {
                    if let Some(l) = self.limits.as_mut() {
                        l.watch_backend(p, false);
                    }
                }
            } else if ready.backend(p) || ready.rx_timer {
                self.rx_pass(p);
            }
        }
        BackendInterest::Keep
    }
}

/// Out of receive buffers: asks the driver to notify when it adds one (with
/// VIRTIO_RING_F_EVENT_IDX, `avail_event`; otherwise notifications are
/// never off on the receive queue). Whether buffers came meanwhile.
fn rearm(rx: &mut RxQueue<'_>) -> bool {
    match rx.queue.enable_notification(rx.mem) {
        Ok(more) => more,
        Err(e) => {
            rx.log.report(
                Fault::UsedRing,
                format_args!("cannot update the receive ring's notification fields: {e}"),
            );
            false
        }
    }
}

/// Puts `head` on `queue`'s used ring; whether it could.
fn complete(
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
    head: u16,
    len: u32,
    log: &mut FaultLog,
) -> bool {
    match queue.add_used(mem, head, len) {
        Ok(()) => true,
        Err(e) => {
            log.report(
                Fault::UsedRing,
                format_args!("cannot complete chain {head}: {e}"),
            );
            false
        }
    }
}

/// Interrupts the driver for queue `index` unless it asked not to be.
fn notify(active: &mut Active, index: u16, log: &mut FaultLog) {
    let queue = if index == active.ctrl_index {
        active.ctrl.as_mut()
    } else {
        let pair = active.queues.get_mut(usize::from(index / 2));
        match (pair, index % 2) {
            (Some(p), 0) => Some(&mut p.rx),
            (Some(p), _) => Some(&mut p.tx),
            (None, _) => None,
        }
    };
    let Some(queue) = queue else {
        return;
    };
    if !queue.needs_notification(&active.mem).unwrap_or(true) {
        return;
    }
    interrupt(active, index, log);
}

/// Interrupts the driver for queue `index`.
fn interrupt(active: &Active, index: u16, log: &mut FaultLog) {
    if let Err(e) = active.interrupt.trigger(InterruptKind::Queue(index)) {
        log.report(
            Fault::Interrupt,
            format_args!("cannot interrupt the guest: {e}"),
        );
    }
}

#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_ctrl;
#[cfg(test)]
mod tests_limits;
#[cfg(test)]
mod tests_mq;
