//! Queue pairs: each pair's backend (one queue of a multi-queue tap) and
//! receive state, and the pairs the driver uses. The driver starts on the
//! first pair and asks for more through the control queue
//! (`VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET`); the tap queues of the pairs it
//! does not use are detached (`TUNSETQUEUE`), so the kernel steers no
//! frames to queues nobody reads.

use virtio_queue::{Queue, QueueT};

use super::direct::ParkedChains;
use super::{Fault, Net, MAX_FRAME, QUEUE_SIZE};
use crate::backend::NetBackend;

/// One queue pair's receive and transmit queues, while activated.
pub(super) struct QueuePair {
    pub rx: Queue,
    pub tx: Queue,
}

/// One queue pair's backend and receive state.
pub(super) struct Pair {
    pub backend: Box<dyn NetBackend>,
    /// The received frame being delivered, header first.
    pub rx_buf: Vec<u8>,
    /// The length of a frame in `rx_buf` waiting for guest buffers.
    pub rx_pending: Option<usize>,
    /// The chains (head, bytes) one received frame is going into.
    pub rx_chains: Vec<(u16, u32)>,
    /// Receive chains taken for the direct path and not yet used.
    pub rx_parked: ParkedChains,
    /// A moving average of the received frames' lengths (header
    /// included), which picks the receive path.
    pub rx_avg: usize,
    /// The backend's queue is attached (frames come to it).
    pub enabled: bool,
    /// Frames delivered to the guest on this pair.
    pub rx_packets: u64,
    /// Frames the guest sent on this pair.
    pub tx_packets: u64,
}

impl Pair {
    pub fn new(backend: Box<dyn NetBackend>) -> Pair {
        Pair {
            backend,
            rx_buf: vec![0; MAX_FRAME],
            rx_pending: None,
            rx_chains: Vec::with_capacity(usize::from(QUEUE_SIZE)),
            rx_parked: ParkedChains::default(),
            rx_avg: 0,
            enabled: true,
            rx_packets: 0,
            tx_packets: 0,
        }
    }

    /// Forgets the receive state (reset, activation: the queue is gone or
    /// new).
    pub fn forget(&mut self) {
        self.rx_pending = None;
        self.rx_parked.forget();
        self.rx_avg = 0;
    }
}

impl Net {
    /// The frames each queue pair delivered to the guest and took from
    /// it: (received, sent), by pair.
    pub fn pair_packets(&self) -> Vec<(u64, u64)> {
        self.pairs
            .iter()
            .map(|p| (p.rx_packets, p.tx_packets))
            .collect()
    }

    /// Uses the first `n` queue pairs: their backends' queues attached,
    /// the others' detached. A frame waiting on a pair that goes out of
    /// use is dropped, and its parked receive chains go back to its queue.
    /// No epoll change here (this runs on a vCPU thread at activation):
    /// the event loop unwatches a detached queue when it polls as an
    /// error, and a receive pass watches one attached again.
    pub(super) fn set_active_pairs(&mut self, n: u16) {
        let several = self.pairs.len() > 1;
        for (i, pair) in self.pairs.iter_mut().enumerate() {
            let on = i < usize::from(n);
            if !on {
                if pair.rx_pending.take().is_some() {
                    self.counters.rx_dropped = self.counters.rx_dropped.saturating_add(1);
                }
                if let Some(q) = self.active.as_mut().and_then(|a| a.queues.get_mut(i)) {
                    let parked = u16::try_from(pair.rx_parked.chain_count()).unwrap_or(0);
                    q.rx.set_next_avail(q.rx.next_avail().wrapping_sub(parked));
                }
                pair.rx_parked.forget();
            }
            if pair.enabled == on || !several {
                continue;
            }
            match pair.backend.set_queue_enabled(on) {
                Ok(()) => pair.enabled = on,
                Err(e) => self.log.report(
                    Fault::Queues,
                    format_args!(
                        "cannot {} the backend's queue {i}: {e}",
                        if on { "attach" } else { "detach" }
                    ),
                ),
            }
        }
    }

    /// Tells the backends which offloads the driver accepts (a tap's are
    /// the tap's, whichever queue sets them; a detached queue refuses).
    pub(super) fn set_offloads(&mut self, flags: u32) -> bool {
        let mut ok = true;
        for pair in self.pairs.iter_mut().filter(|p| p.enabled) {
            if let Err(e) = pair.backend.set_offload(flags) {
                self.log.report(
                    Fault::Offload,
                    format_args!("cannot set tap offloads {flags:#x}, going on without: {e}"),
                );
                ok = false;
            }
        }
        ok
    }
}
