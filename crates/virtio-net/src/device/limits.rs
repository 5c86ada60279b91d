//! Rate limits (Firecracker's token buckets: one limiter for what the
//! guest receives, one for what it sends, shared by the queue pairs) and
//! the device's own epoll, the one descriptor the event loop watches for
//! it: each pair's backend fd while the guest has receive buffers there
//! and the receive limiter lets frames through, and both limiters' timers.
//!
//! A frame the receive limiter refuses stays in the device (as one with
//! no guest buffer does) and the backend is left unwatched until the
//! limiter's timer fires; a transmit chain the transmit limiter refuses
//! goes back to the ring until its timer fires. Bytes count frames without
//! their virtio-net header; ops count frames. With a receive limit the
//! frames are copied into the guest's buffers (the direct path reads them
//! before their length, and so their cost, is known).

use std::os::fd::{AsRawFd, RawFd};

use ember_rate_limiter::{RateLimiter, RateLimiterConfig, TokenType};
use ember_virtio::BackendInterest;
use log::warn;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

/// The receive limiter's timer.
const TOKEN_RX_TIMER: u64 = 1;
/// The transmit limiter's timer.
const TOKEN_TX_TIMER: u64 = 2;
/// Queue pair `p`'s backend is `TOKEN_BACKEND + p` in the device's epoll.
const TOKEN_BACKEND: u64 = 16;
/// vhost-net's call eventfd of device queue `q` is `TOKEN_CALL + q`.
const TOKEN_CALL: u64 = 64;

/// What the device's epoll says is ready.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(super) struct Ready {
    /// The backends with frames (or failed), a bit per queue pair.
    backends: u64,
    /// The device queues vhost-net signalled, a bit per queue.
    pub calls: u64,
    /// The receive limiter's timer fired.
    pub rx_timer: bool,
    /// The transmit limiter's timer fired.
    pub tx_timer: bool,
}

impl Ready {
    /// Whether pair `p`'s backend has frames (or failed).
    pub fn backend(&self, p: usize) -> bool {
        u32::try_from(p)
            .ok()
            .and_then(|p| 1u64.checked_shl(p))
            .is_some_and(|bit| self.backends & bit != 0)
    }
}

/// The limiters and the epoll over the backend and their timers.
pub(super) struct Limits {
    epoll: Epoll,
    /// Each pair's backend fd (none: a backend without one).
    backend_fds: Vec<Option<RawFd>>,
    /// Whether each backend's fd is in the epoll now.
    watching: Vec<bool>,
    pub rx: RateLimiter,
    pub tx: RateLimiter,
}

impl std::fmt::Debug for Limits {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Limits")
            .field("watching", &self.watching)
            .field("rx", &self.rx.config())
            .field("tx", &self.tx.config())
            .finish_non_exhaustive()
    }
}

impl Limits {
    /// Unlimited limiters and the epoll, watching the pairs' `backend_fds`.
    pub fn new(backend_fds: &[Option<RawFd>]) -> std::io::Result<Limits> {
        let rx = RateLimiter::new(&RateLimiterConfig::default()).map_err(std::io::Error::other)?;
        let tx = RateLimiter::new(&RateLimiterConfig::default()).map_err(std::io::Error::other)?;
        let epoll = Epoll::new()?;
        for (fd, token) in [
            (rx.as_raw_fd(), TOKEN_RX_TIMER),
            (tx.as_raw_fd(), TOKEN_TX_TIMER),
        ] {
            epoll.ctl(
                ControlOperation::Add,
                fd,
                EpollEvent::new(EventSet::IN, token),
            )?;
        }
        let mut watching = Vec::with_capacity(backend_fds.len());
        for (p, fd) in backend_fds.iter().enumerate() {
            if let Some(fd) = fd {
                epoll.ctl(
                    ControlOperation::Add,
                    *fd,
                    EpollEvent::new(EventSet::IN, token(p)),
                )?;
            }
            watching.push(fd.is_some());
        }
        Ok(Limits {
            epoll,
            backend_fds: backend_fds.to_vec(),
            watching,
            rx,
            tx,
        })
    }

    /// The epoll's fd, for the event loop.
    pub fn fd(&self) -> RawFd {
        self.epoll.as_raw_fd()
    }

    /// Watches pair `p`'s backend fd or stops (no guest buffers, the
    /// receive limiter said no, the backend failed or its queue was
    /// detached). Stopping takes the fd out of the epoll: an fd in error
    /// (a deleted tap, a detached queue) is reported whatever its events.
    pub fn watch_backend(&mut self, p: usize, on: bool) {
        let (Some(Some(fd)), Some(watching)) = (self.backend_fds.get(p), self.watching.get_mut(p))
        else {
            return;
        };
        if on == *watching {
            return;
        }
        let (op, events) = if on {
            (ControlOperation::Add, EventSet::IN)
        } else {
            (ControlOperation::Delete, EventSet::empty())
        };
        match self.epoll.ctl(op, *fd, EpollEvent::new(events, token(p))) {
            Ok(()) => *watching = on,
            Err(e) => warn!("virtio-net: cannot change the watch of backend {p}: {e}"),
        }
    }

    /// Watches vhost-net's call eventfds instead of the backends: `calls`
    /// are (fd, device queue index).
    pub fn watch_calls(&mut self, calls: &[(RawFd, u16)]) -> std::io::Result<()> {
        for p in 0..self.backend_fds.len() {
            self.watch_backend(p, false);
        }
        for (fd, q) in calls {
            self.epoll.ctl(
                ControlOperation::Add,
                *fd,
                EpollEvent::new(EventSet::IN, TOKEN_CALL + u64::from(*q)),
            )?;
        }
        // No backend is watched again: vhost-net reads the taps.
        self.backend_fds.iter_mut().for_each(|fd| *fd = None);
        Ok(())
    }

    /// Whether the backends have descriptors (are in the epoll at all).
    pub fn has_backend_fd(&self) -> bool {
        self.backend_fds.first().is_some_and(Option::is_some)
    }

    /// What is ready, without waiting; a timer that fired is read and its
    /// limiter unblocked.
    pub fn ready(&mut self) -> Ready {
        let mut events = [EpollEvent::default(); 2 + 3 * super::MAX_QUEUE_PAIRS as usize];
        let n = self.epoll.wait(0, &mut events).unwrap_or(0);
        let mut ready = Ready::default();
        for e in &events[..n.min(events.len())] {
            match e.data() {
                t if t >= TOKEN_CALL => {
                    if let Some(bit) = u32::try_from(t - TOKEN_CALL)
                        .ok()
                        .and_then(|q| 1u64.checked_shl(q))
                    {
                        ready.calls |= bit;
                    }
                }
                t if t >= TOKEN_BACKEND => {
                    if let Some(bit) = u32::try_from(t - TOKEN_BACKEND)
                        .ok()
                        .and_then(|p| 1u64.checked_shl(p))
                    {
                        ready.backends |= bit;
                    }
                }
                TOKEN_RX_TIMER => {
                    // A spurious event leaves the limiter blocked.
                    ready.rx_timer = self.rx.event_handler().is_ok();
                }
                TOKEN_TX_TIMER => ready.tx_timer = self.tx.event_handler().is_ok(),
                _ => {}
            }
        }
        ready
    }
}

/// Gives back the tokens [`admit`] took for a frame of `bytes`.
pub(super) fn refund(limiter: &mut RateLimiter, bytes: u64) {
    limiter.manual_replenish(1, TokenType::Ops);
    if bytes > 0 {
        limiter.manual_replenish(bytes, TokenType::Bytes);
    }
}

/// Pair `p`'s backend's token.
fn token(p: usize) -> u64 {
    TOKEN_BACKEND.saturating_add(u64::try_from(p).unwrap_or(u64::MAX - TOKEN_BACKEND))
}

/// Takes one frame's tokens of `bytes` from `limiter`: one op and its
/// bytes, or none of them.
pub(super) fn admit(limiter: &mut RateLimiter, bytes: u64) -> bool {
    if !limiter.consume(1, TokenType::Ops) {
        return false;
    }
    if bytes > 0 && !limiter.consume(bytes, TokenType::Bytes) {
        limiter.manual_replenish(1, TokenType::Ops);
        return false;
    }
    true
}

impl Limits {
    /// Whether the receive limiter limits anything.
    pub fn rx_limited(&self) -> bool {
        !self.rx.config().is_unlimited()
    }
}

impl super::Net {
    /// A receive pass on pair `p`; with the device's epoll, its backend
    /// stays watched only while the pass could go on (guest buffers,
    /// tokens).
    pub(super) fn rx_pass(&mut self, p: usize) -> BackendInterest {
        if self.uses_vhost() {
            return BackendInterest::Keep;
        }
        let interest = self.process_rx(p);
        match self.limits.as_mut() {
            Some(l) if l.has_backend_fd() => {
                l.watch_backend(p, interest == BackendInterest::Keep);
                BackendInterest::Keep
            }
            _ => interest,
        }
    }

    /// Changes the receive and transmit limits (Firecracker's
    /// `rx_rate_limiter` and `tx_rate_limiter`, at start or by `PATCH
    /// /network-interfaces`): a bucket given replaces the old one (full),
    /// one with size or refill time 0 removes the limit, one left out is
    /// kept. Frames held back are retried at once under the new limits.
    pub fn update_rate_limits(
        &mut self,
        rx: Option<&RateLimiterConfig>,
        tx: Option<&RateLimiterConfig>,
    ) -> crate::Result<()> {
        if self.vhost.is_some() && (rx.is_some() || tx.is_some()) {
            return Err(crate::Error::RateLimiter(
                "this NIC runs on vhost-net, which moves its frames without ember: no rate \
                 limits"
                    .into(),
            ));
        }
        let Some(l) = self.limits.as_mut() else {
            return Err(crate::Error::RateLimiter(
                "this NIC has no rate limiter (its timers could not be made)".into(),
            ));
        };
        if let Some(rx) = rx {
            l.rx.update_from_config(rx);
        }
        if let Some(tx) = tx {
            l.tx.update_from_config(tx);
        }
        Ok(())
    }

    /// The receive and transmit limits now.
    pub fn rate_limits(&self) -> (RateLimiterConfig, RateLimiterConfig) {
        self.limits
            .as_ref()
            .map(|l| (l.rx.config(), l.tx.config()))
            .unwrap_or_default()
    }

    /// What the receive and transmit limiters let through and held back.
    pub fn rate_limiter_counters(
        &self,
    ) -> Option<(ember_rate_limiter::Counters, ember_rate_limiter::Counters)> {
        self.limits
            .as_ref()
            .map(|l| (l.rx.counters(), l.tx.counters()))
    }
}
