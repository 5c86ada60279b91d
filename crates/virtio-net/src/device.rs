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
//! frame waits in the device for guest buffers.

use std::fmt;
use std::mem::{offset_of, size_of};
use std::sync::Arc;

use ember_memory::GuestMemoryMmap;
use ember_virtio::queue::{ChainReader, Flow, UsedRing};
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
    VIRTIO_NET_F_MAC, VIRTIO_NET_F_MRG_RXBUF, VIRTIO_NET_F_STATUS, VIRTIO_NET_S_LINK_UP,
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
mod rx;
mod status;
mod tx;

pub use status::rarp_announce;

use direct::{DirectOutcome, ParkedChains, PassSlices};
use fault::{Fault, FaultLog};

use rx::{has_available, read_frame, Delivery, ReadOutcome, RxQueue};
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

/// The control queue's index (after the one receive and transmit pair).
const CTRL: u16 = 2;

/// How much of a received frame the receive filter looks at: the header,
/// both MAC addresses and a VLAN tag.
const FILTER_HEAD: usize = VNET_HDR_LEN + 16;

/// The maximum size of each of the two queues.
pub const QUEUE_SIZE: u16 = 256;

/// The receive queue's index.
const RX: u16 = 0;
/// The transmit queue's index.
const TX: u16 = 1;

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
    rx: Queue,
    tx: Queue,
    /// The control queue, when VIRTIO_NET_F_CTRL_VQ was negotiated.
    ctrl: Option<Queue>,
    /// The negotiated features.
    acked: u64,
    /// VIRTIO_NET_F_MRG_RXBUF was negotiated: a frame may span chains.
    mrg_rxbuf: bool,
    /// VIRTIO_NET_F_GUEST_CSUM was negotiated: the header's flags pass.
    guest_csum: bool,
}

/// A virtio-net device with a receive and a transmit queue over a
/// [`NetBackend`].
pub struct Net {
    backend: Box<dyn NetBackend>,
    avail_features: u64,
    config: [u8; CONFIG_SIZE],
    queue_max_sizes: [u16; 3],
    /// The MAC the device was built with (a reset goes back to it).
    base_mac: [u8; 6],
    /// What the control queue set: the MAC, RX modes, MAC and VLAN tables.
    filter: RxFilter,
    /// The backend works (`VIRTIO_NET_S_LINK_UP`).
    link_up: bool,
    /// The guest was asked to announce itself and has not acknowledged
    /// (`VIRTIO_NET_S_ANNOUNCE`).
    announcing: bool,
    /// The received frame being delivered, header first.
    rx_buf: Vec<u8>,
    /// The length of a frame in `rx_buf` waiting for guest buffers.
    rx_pending: Option<usize>,
    /// The chains (head, bytes) one received frame is going into.
    rx_chains: Vec<(u16, u32)>,
    /// Receive chains taken for the direct path and not yet used.
    rx_parked: ParkedChains,
    /// A moving average of the received frames' lengths (header included),
    /// which picks the receive path.
    rx_avg: usize,
    active: Option<Active>,
    /// The rate limiters and the epoll the event loop watches (none if
    /// it could not be made: no limits then, the backend's fd watched).
    limits: Option<limits::Limits>,
    counters: NetCounters,
    log: FaultLog,
}

impl fmt::Debug for Net {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Net")
            .field("name", &self.log.name)
            .field("avail_features", &self.avail_features)
            .field("activated", &self.active.is_some())
            .field("rx_pending", &self.rx_pending)
            .field("counters", &self.counters)
            .finish_non_exhaustive()
    }
}

impl Net {
    /// Opens the existing tap `cfg.tap` and builds a device on it. A
    /// multicast or all-zero MAC address is an error.
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
        let tap = Tap::open(&cfg.tap)?;
        Net::with_tap(tap, cfg)
    }

    /// [`Net::new`] on a tap already open (handed over by a live
    /// migration's source).
    pub fn with_tap(tap: Tap, cfg: &NetConfig) -> Result<Net> {
        let backend: Box<dyn NetBackend> = match cfg.vlan {
            Some(vid) => Box::new(crate::VlanBackend::new(Box::new(tap), vid).map_err(|e| {
                Error::TapSetup {
                    name: cfg.tap.clone(),
                    what: "vlan",
                    source: e,
                }
            })?),
            None => Box::new(tap),
        };
        let mut net = Net::with_backend(backend, cfg.mac, cfg.offloads);
        net.log.name.clone_from(&cfg.tap);
        Ok(net)
    }

    /// The backend's descriptor (a tap's), to hand it over.
    pub fn backend_raw_fd(&self) -> Option<std::os::fd::RawFd> {
        self.backend.raw_fd()
    }

    /// Builds a device on any backend (tests, other frame sources). With
    /// `offloads`, checksum and segmentation offloads are offered in both
    /// directions.
    pub fn with_backend(backend: Box<dyn NetBackend>, mac: [u8; 6], offloads: bool) -> Net {
        let limits = match limits::Limits::new(backend.raw_fd()) {
            Ok(l) => Some(l),
            Err(e) => {
                warn!("virtio-net: no rate limits (their timers or epoll cannot be made: {e})");
                None
            }
        };
        Net {
            backend,
            avail_features: features(offloads),
            config: config_space(mac, VIRTIO_NET_S_LINK_UP),
            queue_max_sizes: [QUEUE_SIZE, QUEUE_SIZE, CTRL_QUEUE_SIZE],
            base_mac: mac,
            filter: RxFilter::new(mac),
            link_up: true,
            announcing: false,
            rx_buf: vec![0; MAX_FRAME],
            rx_pending: None,
            rx_chains: Vec::with_capacity(usize::from(QUEUE_SIZE)),
            rx_parked: ParkedChains::default(),
            rx_avg: 0,
            active: None,
            limits,
            counters: NetCounters::default(),
            log: FaultLog::new("(custom backend)"),
        }
    }

    /// What the device has moved and dropped so far.
    pub fn counters(&self) -> NetCounters {
        let mut c = self.counters;
        c.rx_filtered = c.rx_filtered.saturating_add(self.backend.rx_filtered());
        c
    }

    /// The tap's name (or "(custom backend)").
    pub fn name(&self) -> &str {
        &self.log.name
    }

    /// Names the device in its log lines (a custom backend's NIC).
    pub fn set_name(&mut self, name: &str) {
        name.clone_into(&mut self.log.name);
    }

    /// Sends every available transmit chain to the backend.
    fn process_tx(&mut self) {
        let Some(active) = self.active.as_mut() else {
            return;
        };
        let mut used_any = false;
        let mut frame = Vec::new();
        let mem = &active.mem;
        let (backend, counters, log) = (&mut *self.backend, &mut self.counters, &mut self.log);
        let mut limiter = self.limits.as_mut().map(|l| &mut l.tx);
        let drained = ember_virtio::queue::drain_while(&mut active.tx, mem, |queue, chain| {
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
                    send(backend, &frame, len, counters, log);
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
        if used_any {
            notify(active, TX, &mut self.log);
        }
    }

    /// Moves frames from the backend into the guest's receive buffers while
    /// there are both, at most [`RX_BUDGET`] of them; a frame read when no
    /// buffer is left waits in the device.
    fn process_rx(&mut self) -> BackendInterest {
        let Some(active) = self.active.as_mut() else {
            return BackendInterest::Pause;
        };
        let used = UsedRing::new(&active.rx, &active.mem);
        let reader = ChainReader::new(&active.rx, &active.mem);
        let mut rx = RxQueue {
            queue: &mut active.rx,
            mem: &active.mem,
            mrg_rxbuf: active.mrg_rxbuf,
            chains: &mut self.rx_chains,
            log: &mut self.log,
            used_any: false,
            used,
            reader,
        };
        let mut interest = BackendInterest::Keep;
        // The direct path (straight into guest buffers) until it cannot be
        // used; then the copying path for the rest of this pass.
        // A receive limit needs each frame's length before it reaches the
        // guest: frames are copied then.
        let limited = self.limits.as_ref().is_some_and(limits::Limits::rx_limited);
        let mut direct = self.rx_pending.is_none() && self.rx_avg >= DIRECT_MIN_AVG && !limited;
        let mut slices = PassSlices::default();
        if !direct {
            // The copying path takes chains in queue order from the first
            // parked one on.
            self.rx_parked.give_back(&mut rx, &mut slices);
        }
        // Whether the driver was already asked for a notification of new
        // buffers in this pass.
        let mut rearmed = false;
        // The backend failed or closed: the link goes down after this pass.
        let mut gone = false;
        for _ in 0..RX_BUDGET {
            if direct {
                match self.rx_parked.receive(
                    &mut rx,
                    &mut slices,
                    &mut *self.backend,
                    active.guest_csum,
                    &self.filter,
                    &mut self.rx_buf,
                ) {
                    DirectOutcome::Delivered(len) => {
                        let c = &mut self.counters;
                        c.rx_packets = c.rx_packets.saturating_add(1);
                        c.rx_bytes = c.rx_bytes.saturating_add(payload_len(len));
                        self.rx_avg = average(self.rx_avg, len);
                        if self.rx_avg < DIRECT_MIN_AVG {
                            self.rx_parked.give_back(&mut rx, &mut slices);
                            direct = false;
                        }
                        continue;
                    }
                    DirectOutcome::Pending(len) => {
                        self.rx_pending = Some(len);
                        direct = false;
                    }
                    DirectOutcome::Filtered => {
                        self.counters.rx_filtered = self.counters.rx_filtered.saturating_add(1);
                        continue;
                    }
                    DirectOutcome::Short => {
                        rx.log.report(
                            Fault::RxShort,
                            format_args!("dropped a frame shorter than its header"),
                        );
                        self.counters.rx_dropped = self.counters.rx_dropped.saturating_add(1);
                        continue;
                    }
                    DirectOutcome::Retry => continue,
                    DirectOutcome::Idle => break,
                    DirectOutcome::Closed(e) => {
                        match e {
                            None => rx
                                .log
                                .report(Fault::RxBackend, format_args!("the backend is closed")),
                            Some(e) => rx.log.report(
                                Fault::RxBackend,
                                format_args!(
                                    "cannot read from the backend (was the tap deleted?): {e}"
                                ),
                            ),
                        }
                        self.rx_parked.give_back(&mut rx, &mut slices);
                        interest = BackendInterest::Pause;
                        gone = true;
                        break;
                    }
                    DirectOutcome::Unusable => direct = false,
                }
            }
            let len = match self.rx_pending.take() {
                Some(len) => len,
                None if !has_available(rx.queue, rx.mem) => {
                    if !rearmed && rearm(&mut rx) {
                        rearmed = true;
                        continue;
                    }
                    interest = BackendInterest::Pause;
                    break;
                }
                None => match read_frame(
                    &mut *self.backend,
                    &mut self.rx_buf,
                    active.guest_csum,
                    rx.log,
                ) {
                    ReadOutcome::Frame(len) => len,
                    ReadOutcome::Short => {
                        self.counters.rx_dropped = self.counters.rx_dropped.saturating_add(1);
                        continue;
                    }
                    ReadOutcome::Retry => continue,
                    // Keep watching: the tap is level-triggered, so the
                    // event loop calls again once a frame is there.
                    ReadOutcome::Idle => break,
                    ReadOutcome::Stop => {
                        interest = BackendInterest::Pause;
                        gone = true;
                        break;
                    }
                },
            };
            let frame = self.rx_buf.get(..len).unwrap_or_default();
            if !self
                .filter
                .accepts(frame.get(VNET_HDR_LEN..).unwrap_or_default())
            {
                self.counters.rx_filtered = self.counters.rx_filtered.saturating_add(1);
                continue;
            }
            // Over the receive limit: the frame waits in the device and the
            // backend is left alone until the limiter's timer fires.
            if let Some(l) = self.limits.as_mut().filter(|_| limited) {
                if !limits::admit(&mut l.rx, payload_len(len)) {
                    self.rx_pending = Some(len);
                    interest = BackendInterest::Pause;
                    break;
                }
            }
            match rx.deliver(frame) {
                Delivery::Delivered => {
                    let c = &mut self.counters;
                    c.rx_packets = c.rx_packets.saturating_add(1);
                    c.rx_bytes = c.rx_bytes.saturating_add(payload_len(len));
                    self.rx_avg = average(self.rx_avg, len);
                    direct = self.rx_avg >= DIRECT_MIN_AVG && !limited;
                }
                Delivery::Dropped => {
                    self.counters.rx_dropped = self.counters.rx_dropped.saturating_add(1);
                }
                Delivery::NoBuffers => {
                    self.rx_pending = Some(len);
                    if !rearmed && rearm(&mut rx) {
                        rearmed = true;
                        continue;
                    }
                    interest = BackendInterest::Pause;
                    break;
                }
            }
        }
        let used_any = rx.used_any;
        match rx.finish() {
            Some(true) => interrupt(active, RX, &mut self.log),
            Some(false) => {}
            None if used_any => notify(active, RX, &mut self.log),
            None => {}
        }
        if gone {
            self.link_down();
        }
        interest
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

/// Lays out `struct virtio_net_config`: the MAC, the status
/// (`VIRTIO_NET_S_*`).
fn config_space(mac: [u8; 6], status: u32) -> [u8; CONFIG_SIZE] {
    let mut c = [0u8; CONFIG_SIZE];
    let status = u16::try_from(status).unwrap_or(1);
    let mut put = |at: usize, bytes: &[u8]| {
        if let Some(dst) = c.get_mut(at..at + bytes.len()) {
            dst.copy_from_slice(bytes);
        }
    };
    put(offset_of!(virtio_net_config, mac), &mac);
    put(offset_of!(virtio_net_config, status), &status.to_le_bytes());
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
        let expected = if want_ctrl { 3 } else { 2 };
        let mut queues = ctx.queues.into_iter();
        let (Some(mut rx), Some(mut tx)) = (queues.next(), queues.next()) else {
            return Err(ActivateError::QueueCount { expected, got });
        };
        let ctrl = queues.next();
        if ctrl.is_some() != want_ctrl || queues.next().is_some() {
            return Err(ActivateError::QueueCount { expected, got });
        }
        let event_idx = acked & (1 << VIRTIO_RING_F_EVENT_IDX) != 0;
        rx.set_event_idx(event_idx);
        tx.set_event_idx(event_idx);
        let offloads = tun_offloads(acked);
        if let Err(e) = self.backend.set_offload(offloads) {
            self.log.report(
                Fault::Offload,
                format_args!("cannot set tap offloads {offloads:#x}, going on without: {e}"),
            );
        }
        self.rx_pending = None;
        self.rx_parked.forget();
        self.rx_avg = 0;
        self.filter.set_features(acked, 1);
        let ctrl = ctrl.map(|mut q| {
            q.set_event_idx(event_idx);
            q
        });
        self.active = Some(Active {
            mem: ctx.mem,
            interrupt: ctx.interrupt,
            rx,
            tx,
            ctrl,
            acked,
            mrg_rxbuf: acked & (1 << VIRTIO_NET_F_MRG_RXBUF) != 0,
            guest_csum: acked & (1 << VIRTIO_NET_F_GUEST_CSUM) != 0,
        });
        // The backend is watched again at the first receive pass (the
        // driver's first receive notification, on the event loop: this
        // runs on a vCPU thread, whose seccomp filter has no epoll_ctl).
        Ok(())
    }

    fn is_activated(&self) -> bool {
        self.active.is_some()
    }

    fn queue_states(&self) -> Vec<virtio_queue::QueueState> {
        let Some(a) = self.active.as_ref() else {
            return Vec::new();
        };
        // Receive chains parked for the direct path were taken but not
        // used: the restored device takes them again.
        let mut rx = a.rx.state();
        let parked = u16::try_from(self.rx_parked.chain_count()).unwrap_or(u16::MAX);
        rx.next_avail = rx.next_avail.wrapping_sub(parked);
        let mut states = vec![rx, a.tx.state()];
        states.extend(a.ctrl.as_ref().map(Queue::state));
        states
    }

    fn process_queue(&mut self, index: usize) {
        if index == usize::from(RX) {
            // New receive buffers: deliver the waiting frame and read on.
            self.rx_pass();
        } else if index == usize::from(TX) {
            self.process_tx();
        } else if index == usize::from(CTRL) {
            self.process_ctrl();
        }
    }

    fn reset(&mut self) {
        self.active = None;
        self.rx_pending = None;
        self.rx_parked.forget();
        self.rx_avg = 0;
        self.filter.reset(self.base_mac);
        self.announcing = false;
        self.refresh_config();
    }

    fn backend_fd(&self) -> Option<std::os::fd::RawFd> {
        match &self.limits {
            Some(l) => Some(l.fd()),
            None => self.backend.raw_fd(),
        }
    }

    fn process_backend(&mut self) -> BackendInterest {
        let Some(l) = self.limits.as_mut() else {
            return self.process_rx();
        };
        let ready = l.ready();
        // A backend without a descriptor is read whenever the loop asks.
        if !l.has_backend_fd() {
            if ready.tx_timer {
                self.process_tx();
            }
            return self.process_rx();
        }
        if ready.tx_timer {
            self.process_tx();
        }
        if ready.backend || ready.rx_timer {
            self.rx_pass();
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
    let queue = match (index, active.ctrl.as_mut()) {
        (RX, _) => &mut active.rx,
        (CTRL, Some(ctrl)) => ctrl,
        _ => &mut active.tx,
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
