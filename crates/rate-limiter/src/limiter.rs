//! The rate limiter: two optional buckets, a timerfd to wake the device when
//! a blocked limiter may go on, and counters.

use std::fmt;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::time::{Duration, Instant};

use vmm_sys_util::timerfd::TimerFd;

use crate::bucket::{Reduction, TokenBucket};
use crate::clock::{Clock, MonotonicClock};
use crate::config::RateLimiterConfig;
use crate::state::{RateLimiterState, TokenBucketState};
use crate::timer::nonblocking_timer;
use crate::{BucketUpdate, Error, Result, TokenType};

/// The shortest time the limiter blocks for: waits are computed to the
/// nanosecond, but waking the event loop more often than this costs more
/// than it is worth (the refill itself stays exact).
pub const MIN_WAIT: Duration = Duration::from_millis(1);

/// What the limiter did, for metrics and tests.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    /// Bytes let through, less those given back with
    /// [`RateLimiter::manual_replenish`].
    pub bytes: u64,
    /// Requests let through, less those given back.
    pub ops: u64,
    /// [`RateLimiter::consume`] calls refused.
    pub throttled: u64,
    /// Times the limiter blocked and armed its timer.
    pub blocked: u64,
    /// Requests larger than their bucket, let through on credit.
    pub overdrawn: u64,
}

/// A rate limiter on bytes (bandwidth) and requests (ops), either or both,
/// compatible with Firecracker's.
///
/// A device asks [`consume`](Self::consume) before each request. When a
/// bucket runs short the request is refused and the limiter *blocks*: every
/// `consume` is refused until its timerfd ([`as_raw_fd`](AsRawFd::as_raw_fd))
/// becomes readable, which happens when enough tokens have been refilled
/// for the refused request. The device's event loop then calls
/// [`event_handler`](Self::event_handler) and retries its queue.
///
/// Time comes from a [`Clock`]: [`MonotonicClock`] by default (the clock the
/// timerfd runs on), a [`ManualClock`](crate::ManualClock) in tests.
pub struct RateLimiter<C: Clock = MonotonicClock> {
    bandwidth: Option<TokenBucket>,
    ops: Option<TokenBucket>,
    timer: TimerFd,
    /// When the limiter may go on, if it is blocked.
    blocked_until: Option<Instant>,
    clock: C,
    counters: Counters,
}

impl<C: Clock> fmt::Debug for RateLimiter<C> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RateLimiter")
            .field("bandwidth", &self.bandwidth)
            .field("ops", &self.ops)
            .field("blocked_until", &self.blocked_until)
            .field("counters", &self.counters)
            .finish_non_exhaustive()
    }
}

impl RateLimiter {
    /// A limiter on the monotonic clock. Its timerfd is made even when
    /// `config` limits nothing, so that a later
    /// [`update_buckets`](Self::update_buckets) needs no new descriptor
    /// (the device thread may be seccomp-confined by then).
    pub fn new(config: &RateLimiterConfig) -> Result<Self> {
        Self::with_clock(config, MonotonicClock)
    }

    /// A limiter restored from `state` on the monotonic clock.
    pub fn restore(state: &RateLimiterState) -> Result<Self> {
        Self::restore_with_clock(state, MonotonicClock)
    }
}

impl<C: Clock> RateLimiter<C> {
    /// A limiter that reads the time from `clock`.
    pub fn with_clock(config: &RateLimiterConfig, clock: C) -> Result<Self> {
        Ok(RateLimiter {
            bandwidth: config.bandwidth.and_then(|b| b.bucket()),
            ops: config.ops.and_then(|b| b.bucket()),
            timer: nonblocking_timer().map_err(Error::Timer)?,
            blocked_until: None,
            clock,
            counters: Counters::default(),
        })
    }

    /// A limiter restored from `state`, reading the time from `clock`. Each
    /// bucket resumes with its budget, burst, debt and refill progress; a
    /// limiter that was blocked blocks again for the time it had left.
    pub fn restore_with_clock(state: &RateLimiterState, clock: C) -> Result<Self> {
        let now = clock.now();
        let restore = |s: &Option<TokenBucketState>, bucket: &'static str| {
            s.as_ref()
                .map(|s| TokenBucket::restore(s, now))
                .transpose()
                .map_err(|reason| Error::State { bucket, reason })
        };
        let mut limiter = RateLimiter {
            bandwidth: restore(&state.bandwidth, "bandwidth")?,
            ops: restore(&state.ops, "ops")?,
            timer: nonblocking_timer().map_err(Error::Timer)?,
            blocked_until: None,
            clock,
            counters: Counters::default(),
        };
        if let Some(ns) = state.blocked_ns {
            limiter.block(now, Duration::from_nanos(ns));
        }
        Ok(limiter)
    }

    /// Takes `tokens` of `token_type` and says whether the request may go
    /// ahead. Always true when that type is not limited (and the limiter is
    /// not blocked).
    ///
    /// False when the limiter is blocked, or when the bucket has too few
    /// tokens: nothing is taken, the limiter blocks and its timer is armed
    /// for when there will be enough. A request larger than the bucket can
    /// ever hold is let through (true) but blocks the limiter until the
    /// tokens it overdrew have been refilled.
    pub fn consume(&mut self, tokens: u64, token_type: TokenType) -> bool {
        let now = self.clock.now();
        if let Some(until) = self.blocked_until {
            if now < until {
                self.counters.throttled += 1;
                return false;
            }
            // The timer has expired (its event may still be on its way).
            self.blocked_until = None;
        }
        let bucket = match token_type {
            TokenType::Bytes => self.bandwidth.as_mut(),
            TokenType::Ops => self.ops.as_mut(),
        };
        let reduction = bucket.map_or(Reduction::Done, |b| b.reduce(tokens, now));
        match reduction {
            Reduction::Done => {}
            Reduction::Wait(wait) => {
                self.counters.throttled += 1;
                self.counters.blocked += 1;
                self.block(now, wait);
                return false;
            }
            Reduction::Overdrawn(wait) => {
                self.counters.overdrawn += 1;
                self.counters.blocked += 1;
                self.block(now, wait);
            }
        }
        let counter = self.counter(token_type);
        *counter = counter.saturating_add(tokens);
        true
    }

    /// Gives back `tokens` of `token_type` that a device took but could not
    /// use (e.g. the bytes were granted, the request slot was not). It does
    /// not unblock a blocked limiter.
    pub fn manual_replenish(&mut self, tokens: u64, token_type: TokenType) {
        let bucket = match token_type {
            TokenType::Bytes => self.bandwidth.as_mut(),
            TokenType::Ops => self.ops.as_mut(),
        };
        if let Some(b) = bucket {
            b.replenish(tokens);
        }
        let counter = self.counter(token_type);
        *counter = counter.saturating_sub(tokens);
    }

    /// Whether the limiter is blocked: [`consume`](Self::consume) refuses
    /// everything until its time is up. It stays `true` until
    /// [`event_handler`](Self::event_handler) runs, or a `consume` after
    /// that time, so a device may skip its queue while this is set.
    pub fn is_blocked(&self) -> bool {
        self.blocked_until.is_some()
    }

    /// How much longer the limiter stays blocked, if it is.
    pub fn blocked_for(&self) -> Option<Duration> {
        self.blocked_until
            .map(|until| until.saturating_duration_since(self.clock.now()))
    }

    /// To be called when the timerfd is readable: reads it (without
    /// blocking) and unblocks the limiter. The device should then retry
    /// the requests it held back.
    ///
    /// # Errors
    ///
    /// [`Error::SpuriousEvent`] if the timer has not expired and the limiter
    /// is still blocked (nothing changes); [`Error::Timer`] if the read
    /// fails otherwise.
    pub fn event_handler(&mut self) -> Result<()> {
        match self.timer.wait() {
            Ok(_) => {
                self.blocked_until = None;
                Ok(())
            }
            Err(e) if e.errno() == libc::EAGAIN => match self.blocked_until {
                // Re-armed after the event was queued, or unblocked already.
                Some(until) if self.clock.now() < until => Err(Error::SpuriousEvent),
                _ => {
                    self.blocked_until = None;
                    Ok(())
                }
            },
            Err(e) => Err(Error::Timer(io::Error::from(e))),
        }
    }

    /// Changes the buckets while the device runs (Firecracker's `PATCH
    /// /drives` and `/network-interfaces`): [`BucketUpdate::None`] keeps a
    /// bucket, `Disabled` removes its limit, `Update` puts in a new, full
    /// bucket. A blocked limiter's timer is set to fire at once (in
    /// [`MIN_WAIT`]) so the device retries under the new limits.
    pub fn update_buckets(&mut self, bandwidth: BucketUpdate, ops: BucketUpdate) {
        let mut changed = false;
        for (slot, update) in [(&mut self.bandwidth, bandwidth), (&mut self.ops, ops)] {
            match update {
                BucketUpdate::None => {}
                BucketUpdate::Disabled => {
                    *slot = None;
                    changed = true;
                }
                BucketUpdate::Update(bucket) => {
                    *slot = Some(bucket);
                    changed = true;
                }
            }
        }
        if changed && self.is_blocked() {
            let now = self.clock.now();
            self.block(now, MIN_WAIT);
        }
    }

    /// [`update_buckets`](Self::update_buckets) from a `PATCH` body: a bucket
    /// left out is kept, one with size or refill_time 0 is removed.
    pub fn update_from_config(&mut self, patch: &RateLimiterConfig) {
        self.update_buckets(patch.bandwidth.into(), patch.ops.into());
    }

    /// The bucket of bytes, if limited.
    pub fn bandwidth(&self) -> Option<&TokenBucket> {
        self.bandwidth.as_ref()
    }

    /// The bucket of requests, if limited.
    pub fn ops(&self) -> Option<&TokenBucket> {
        self.ops.as_ref()
    }

    /// The configuration in force (what `GET /vm/config` shows).
    pub fn config(&self) -> RateLimiterConfig {
        RateLimiterConfig {
            bandwidth: self.bandwidth.as_ref().map(TokenBucket::config),
            ops: self.ops.as_ref().map(TokenBucket::config),
        }
    }

    /// What the limiter has done so far.
    pub fn counters(&self) -> Counters {
        self.counters
    }

    /// The limiter's state, to save in a snapshot.
    pub fn state(&self) -> RateLimiterState {
        let now = self.clock.now();
        RateLimiterState {
            bandwidth: self.bandwidth.as_ref().map(|b| b.state(now)),
            ops: self.ops.as_ref().map(|b| b.state(now)),
            blocked_ns: self
                .blocked_for()
                .map(|d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)),
        }
    }

    fn counter(&mut self, token_type: TokenType) -> &mut u64 {
        match token_type {
            TokenType::Bytes => &mut self.counters.bytes,
            TokenType::Ops => &mut self.counters.ops,
        }
    }

    /// Blocks until `now + wait` (at least [`MIN_WAIT`]) and arms the timer
    /// (re-arming resets it: an expiry not yet read is dropped).
    fn block(&mut self, now: Instant, wait: Duration) {
        let wait = wait.max(MIN_WAIT);
        // `Instant` spans about ±2^63 s on Linux and `wait` is at most
        // 2^64 ns, so the sum does not overflow.
        self.blocked_until = Some(now.checked_add(wait).unwrap_or(now));
        if let Err(e) = self.timer.reset(wait, None) {
            // Cannot happen for a valid timerfd and duration; the device
            // still wakes at its next queue notification.
            log::error!("rate limiter: cannot arm the timer for {wait:?}: {e}");
        }
    }
}

impl<C: Clock> AsRawFd for RateLimiter<C> {
    /// The timerfd for the event loop to watch for readability; on each
    /// event, call [`RateLimiter::event_handler`].
    fn as_raw_fd(&self) -> RawFd {
        self.timer.as_raw_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{BucketConfig, ManualClock};

    const MS: Duration = Duration::from_millis(1);
    const REQUEST: u64 = 4096;

    fn bucket(size: u64, one_time_burst: u64, refill_time: u64) -> Option<BucketConfig> {
        Some(BucketConfig {
            size,
            one_time_burst: Some(one_time_burst),
            refill_time,
        })
    }

    fn limiter(
        bandwidth: Option<BucketConfig>,
        ops: Option<BucketConfig>,
    ) -> (RateLimiter<ManualClock>, ManualClock) {
        let clock = ManualClock::new();
        let config = RateLimiterConfig { bandwidth, ops };
        (
            RateLimiter::with_clock(&config, clock.clone()).unwrap(),
            clock,
        )
    }

    /// A device's request: one op, then its bytes; the op is given back when
    /// the bytes are refused.
    fn request(l: &mut RateLimiter<ManualClock>, bytes: u64) -> bool {
        if !l.consume(1, TokenType::Ops) {
            return false;
        }
        if !l.consume(bytes, TokenType::Bytes) {
            l.manual_replenish(1, TokenType::Ops);
            return false;
        }
        true
    }

    /// Greedy 4 KiB requests for `secs` simulated seconds, sleeping (on the
    /// fake clock) exactly as long as the limiter says. Returns the
    /// requests that went through.
    fn run_greedy(l: &mut RateLimiter<ManualClock>, clock: &ManualClock, secs: u64) -> u64 {
        let end = Duration::from_secs(secs);
        let mut done = 0;
        loop {
            if request(l, REQUEST) {
                done += 1;
                continue;
            }
            let wait = l.blocked_for().unwrap();
            assert!(wait >= MIN_WAIT);
            if clock.elapsed() + wait > end {
                return done;
            }
            clock.advance(wait);
            // The timer is real but the clock is not: the handler sees the
            // deadline has passed on the limiter's clock and unblocks.
            l.event_handler().unwrap();
            assert!(!l.is_blocked());
        }
    }

    /// Tokens a bucket of `size` per `refill_ms` refills in `elapsed`.
    fn expected_refill(size: u64, refill_ms: u64, elapsed: Duration) -> u64 {
        let t = elapsed.as_nanos() * u128::from(size) / (u128::from(refill_ms) * 1_000_000);
        u64::try_from(t).unwrap()
    }

    #[test]
    fn limiter_greedy_bytes_rate_is_within_1_percent_after_burst() {
        // 1 MB every 300 ms (3.333 MB/s: not a whole number of ns per
        // byte), after a one-time burst of 5 MB; ops far from limiting.
        let (size, burst, refill_ms) = (1_000_000u64, 5_000_000, 300);
        let (mut l, clock) = limiter(bucket(size, burst, refill_ms), bucket(1_000_000, 0, 1000));
        let done = run_greedy(&mut l, &clock, 10);
        let bytes = done * REQUEST;
        // Burst and the initial full bucket go at once; then the rate.
        let refilled = bytes - burst - size;
        let expected = expected_refill(size, refill_ms, clock.elapsed());
        assert!(clock.elapsed() > Duration::from_millis(9_900));
        assert!(refilled <= expected, "{refilled} > {expected}");
        assert!(
            expected - refilled <= expected / 100,
            "{refilled} vs {expected}"
        );
        // In fact exact to within the one request that did not fit.
        assert!(expected - refilled < REQUEST, "{refilled} vs {expected}");
        assert_eq!(l.counters().bytes, bytes);
        assert_eq!(l.counters().ops, done);
    }

    #[test]
    fn limiter_greedy_ops_rate_is_within_1_percent() {
        // 997 requests/s (not a whole number of ns per op), 4 KiB each;
        // bytes far from limiting.
        let (size, refill_ms) = (997u64, 1000);
        let (mut l, clock) = limiter(bucket(1 << 30, 0, 1000), bucket(size, 0, refill_ms));
        let done = run_greedy(&mut l, &clock, 10);
        let refilled = done - size;
        let expected = expected_refill(size, refill_ms, clock.elapsed());
        assert!(clock.elapsed() > Duration::from_millis(9_900));
        assert!(refilled <= expected, "{refilled} > {expected}");
        assert!(
            expected - refilled <= expected / 100,
            "{refilled} vs {expected}"
        );
        assert!(expected - refilled <= 1, "{refilled} vs {expected}");
        assert_eq!(l.counters().bytes, done * REQUEST);
    }

    #[test]
    fn limiter_one_time_burst_is_consumed_before_the_bucket() {
        let (mut l, clock) = limiter(bucket(8 * REQUEST, 4 * REQUEST, 1000), None);
        for _ in 0..4 {
            assert!(l.consume(REQUEST, TokenType::Bytes));
        }
        let b = l.bandwidth().unwrap();
        assert_eq!((b.one_time_burst(), b.budget()), (0, 8 * REQUEST));
        for _ in 0..8 {
            assert!(l.consume(REQUEST, TokenType::Bytes));
        }
        // Empty now: one request's worth takes 1/8 of the refill time.
        assert!(!l.consume(REQUEST, TokenType::Bytes));
        assert_eq!(l.blocked_for(), Some(125 * MS));
        clock.advance(125 * MS);
        assert!(l.consume(REQUEST, TokenType::Bytes));
        // The burst never comes back.
        clock.advance(Duration::from_secs(60));
        assert!(l.consume(0, TokenType::Bytes));
        assert_eq!(l.bandwidth().unwrap().one_time_burst(), 0);
        assert_eq!(l.bandwidth().unwrap().budget(), 8 * REQUEST);
    }

    #[test]
    fn limiter_blocked_refuses_every_token_type_until_deadline() {
        let (mut l, clock) = limiter(bucket(100, 0, 100), None);
        assert!(l.consume(100, TokenType::Bytes));
        assert!(!l.consume(50, TokenType::Bytes));
        assert!(l.is_blocked());
        // Ops are not limited, but a blocked limiter refuses everything.
        assert!(!l.consume(1, TokenType::Ops));
        assert_eq!(l.counters().throttled, 2);
        assert_eq!(l.counters().blocked, 1);
        clock.advance(49 * MS);
        assert!(!l.consume(1, TokenType::Ops));
        assert!(matches!(l.event_handler(), Err(Error::SpuriousEvent)));
        clock.advance(MS);
        assert!(l.consume(50, TokenType::Bytes));
        assert!(!l.is_blocked());
    }

    #[test]
    fn limiter_unlimited_always_consumes() {
        let (mut l, _clock) = limiter(None, bucket(0, 0, 1000));
        assert!(l.ops().is_none());
        for _ in 0..1000 {
            assert!(l.consume(u64::MAX / 2000, TokenType::Bytes));
            assert!(l.consume(1, TokenType::Ops));
        }
        assert!(!l.is_blocked());
        assert_eq!(l.counters().ops, 1000);
    }

    #[test]
    fn limiter_request_larger_than_bucket_passes_then_blocks_for_debt() {
        let (mut l, clock) = limiter(bucket(64 * 1024, 0, 100), None);
        // 1 MiB through a 64 KiB bucket: passes at once, then 15 buckets'
        // worth are owed (1.5 s).
        assert!(l.consume(1 << 20, TokenType::Bytes));
        assert_eq!(l.blocked_for(), Some(1500 * MS));
        assert_eq!(l.counters().overdrawn, 1);
        assert!(!l.consume(1, TokenType::Bytes));
        // A second huge request passes when the debt is paid: never starved.
        clock.advance(1500 * MS);
        assert!(l.consume(1 << 20, TokenType::Bytes));
        assert_eq!(l.blocked_for(), Some(1600 * MS));
    }

    #[test]
    fn limiter_manual_replenish_returns_tokens() {
        let (mut l, _clock) = limiter(bucket(REQUEST, 0, 1000), bucket(1, 0, 1000));
        assert!(l.consume(1, TokenType::Ops));
        assert!(l.consume(REQUEST, TokenType::Bytes));
        l.manual_replenish(REQUEST, TokenType::Bytes);
        l.manual_replenish(1, TokenType::Ops);
        assert!(l.consume(1, TokenType::Ops));
        assert!(l.consume(REQUEST, TokenType::Bytes));
        assert!(!l.is_blocked());
        assert_eq!(l.counters().bytes, REQUEST);
        assert_eq!(l.counters().ops, 1);
    }

    #[test]
    fn limiter_update_buckets_replaces_keeps_or_removes() {
        let (mut l, clock) = limiter(bucket(100, 0, 1000), bucket(10, 0, 1000));
        assert!(l.consume(100, TokenType::Bytes));
        assert!(!l.consume(100, TokenType::Bytes));
        assert_eq!(l.blocked_for(), Some(1000 * MS));
        // A new, larger bucket: the blocked device is woken at once.
        l.update_buckets(
            BucketUpdate::Update(TokenBucket::new(1000, 0, 1000).unwrap()),
            BucketUpdate::None,
        );
        assert_eq!(l.blocked_for(), Some(MIN_WAIT));
        assert_eq!(l.ops().unwrap().size(), 10);
        clock.advance(MIN_WAIT);
        assert!(l.consume(1000, TokenType::Bytes));
        l.update_buckets(BucketUpdate::Disabled, BucketUpdate::Disabled);
        assert!(l.consume(1 << 40, TokenType::Bytes));
        assert!(l.config().is_unlimited());
        // A PATCH body: ops set, bandwidth left alone.
        l.update_from_config(&RateLimiterConfig {
            bandwidth: None,
            ops: bucket(5, 0, 100),
        });
        assert!(l.bandwidth().is_none());
        assert_eq!(
            l.config().ops,
            bucket(5, 0, 100).map(|b| BucketConfig {
                one_time_burst: None,
                ..b
            })
        );
    }

    #[test]
    fn limiter_state_restore_resumes_budget_and_block() {
        let (mut l, clock) = limiter(bucket(1000, 500, 1000), bucket(10, 0, 100));
        assert!(l.consume(1200, TokenType::Bytes));
        assert!(!l.consume(400, TokenType::Bytes));
        clock.advance(50 * MS);
        let state = l.state();
        assert_eq!(state.blocked_ns, Some(50_000_000));
        let json = serde_json::to_string(&state).unwrap();
        let state: RateLimiterState = serde_json::from_str(&json).unwrap();

        let clock2 = ManualClock::new();
        let mut r = RateLimiter::restore_with_clock(&state, clock2.clone()).unwrap();
        assert_eq!(r.config(), l.config());
        assert_eq!(r.blocked_for(), Some(50 * MS));
        assert!(!r.consume(1, TokenType::Ops));
        clock2.advance(50 * MS);
        // 300 left + 100 refilled over the 50 ms before and after.
        assert!(r.consume(400, TokenType::Bytes));
        assert_eq!(r.bandwidth().unwrap().budget(), 0);
        assert_eq!(r.bandwidth().unwrap().one_time_burst(), 0);
    }

    #[test]
    fn limiter_restore_bad_state_names_the_bucket() {
        let (l, _clock) = limiter(None, bucket(10, 0, 100));
        let mut state = l.state();
        state.ops.as_mut().unwrap().budget = 11;
        let e = RateLimiter::restore(&state).unwrap_err().to_string();
        assert_eq!(
            e,
            "rate limiter ops bucket state: budget 11 exceeds size 10"
        );
    }

    #[test]
    fn limiter_state_from_firecracker_fields_loads() {
        // Firecracker's field set: no debt, no blocked_ns.
        let state: RateLimiterState = serde_json::from_str(
            r#"{"ops": null, "bandwidth": {"config": {"size": 100, "one_time_burst": null,
                "refill_time": 10}, "budget": 7, "one_time_burst": 0, "elapsed_ns": 5}}"#,
        )
        .unwrap();
        let l = RateLimiter::restore(&state).unwrap();
        assert_eq!(l.bandwidth().unwrap().budget(), 7);
        assert!(!l.is_blocked());
    }

    #[test]
    #[allow(unsafe_code)]
    fn limiter_timerfd_becomes_readable_after_computed_wait() {
        // The real clock: 1000 bytes per 100 ms.
        let mut l = RateLimiter::new(&RateLimiterConfig {
            bandwidth: bucket(1000, 0, 100),
            ops: None,
        })
        .unwrap();
        assert!(l.consume(1000, TokenType::Bytes));
        let start = Instant::now();
        assert!(!l.consume(500, TokenType::Bytes));
        let wait = l.blocked_for().unwrap();
        // 500 tokens at 10 per ms, less what the time between the calls earned.
        assert!(wait <= 50 * MS && wait >= MIN_WAIT, "{wait:?}");
        // Not yet expired: the nonblocking read does not stall.
        assert!(matches!(l.event_handler(), Err(Error::SpuriousEvent)));

        let mut pfd = libc::pollfd {
            fd: l.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: `pfd` is one valid pollfd that lives across the call and
        // its fd is the limiter's open timerfd.
        let n = unsafe { libc::poll(&mut pfd, 1, 2000) };
        let waited = start.elapsed();
        assert_eq!(n, 1);
        assert!(waited >= wait, "{waited:?} < {wait:?}");
        assert!(waited < 1000 * MS, "{waited:?}");
        l.event_handler().unwrap();
        assert!(!l.is_blocked());
        assert!(l.consume(500, TokenType::Bytes));
    }
}
