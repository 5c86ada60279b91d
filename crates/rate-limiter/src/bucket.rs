//! One token bucket: the arithmetic, with the time passed in.
//!
//! All sums are done in `u128` token-nanoseconds, so any `u64` size, burst
//! and refill time works without overflow; the fraction of a token earned
//! but not yet granted is kept exactly for the next refill, so the long-run
//! rate is exactly `size / refill_time`, however often the bucket is used.

use std::time::{Duration, Instant};

use crate::config::BucketConfig;
use crate::state::TokenBucketState;

const NS_PER_MS: u128 = 1_000_000;

fn saturating_u64(x: u128) -> u64 {
    u64::try_from(x).unwrap_or(u64::MAX)
}

/// What [`TokenBucket::reduce`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reduction {
    /// The tokens were taken.
    Done,
    /// Not enough tokens; nothing was taken. Enough will have been refilled
    /// after this long.
    Wait(Duration),
    /// The request is larger than the bucket can ever hold: it was let
    /// through, everything in the bucket was taken and the rest is owed.
    /// The debt is paid off (and the bucket usable again) after this long.
    Overdrawn(Duration),
}

/// A token bucket: `size` tokens refilled linearly over `refill_time_ms`
/// milliseconds, plus a `one_time_burst` of extra tokens that is spent first
/// and never refilled.
///
/// A new bucket is full. Requests larger than `size` plus the remaining
/// burst, which could never fit, are let through on credit (see
/// [`Reduction::Overdrawn`]): the bucket goes into debt and refills pay the
/// debt off before anything can be taken again, so a large request is
/// never starved and the average rate still holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TokenBucket {
    size: u64,
    refill_time_ms: u64,
    initial_one_time_burst: u64,
    one_time_burst: u64,
    budget: u64,
    debt: u64,
    /// The instant the budget was last brought up to date; `None` until the
    /// bucket is first used (it is full until then, so the time is moot).
    last_update: Option<Instant>,
    /// The fraction of a token earned by then, in token-nanoseconds
    /// (`elapsed_ns * size`), always below one token's worth
    /// (`refill_time` in ns).
    earned: u128,
}

impl TokenBucket {
    /// A full bucket of `size` tokens that refills completely in
    /// `refill_time_ms` milliseconds, with `one_time_burst` extra tokens.
    ///
    /// `None` when `size` or `refill_time_ms` is 0: as in Firecracker, such
    /// a bucket means "no limit".
    pub fn new(size: u64, one_time_burst: u64, refill_time_ms: u64) -> Option<Self> {
        if size == 0 || refill_time_ms == 0 {
            return None;
        }
        Some(TokenBucket {
            size,
            refill_time_ms,
            initial_one_time_burst: one_time_burst,
            one_time_burst,
            budget: size,
            debt: 0,
            last_update: None,
            earned: 0,
        })
    }

    /// Takes `tokens` at time `now`: from the one-time burst first, then
    /// from the budget; either all of them or, if there are not enough,
    /// none (see [`Reduction`]).
    pub fn reduce(&mut self, tokens: u64, now: Instant) -> Reduction {
        self.refill(now);
        if self.debt > 0 {
            return Reduction::Wait(self.wait_for(u128::from(self.debt)));
        }
        let available = u128::from(self.one_time_burst) + u128::from(self.budget);
        let wanted = u128::from(tokens);
        if wanted <= available {
            let from_burst = tokens.min(self.one_time_burst);
            self.one_time_burst -= from_burst;
            self.budget -= tokens - from_burst;
            return Reduction::Done;
        }
        if wanted > u128::from(self.size) + u128::from(self.one_time_burst) {
            // It would never fit: let it through and owe the rest.
            self.debt = saturating_u64(wanted - available);
            self.one_time_burst = 0;
            self.budget = 0;
            return Reduction::Overdrawn(self.wait_for(u128::from(self.debt)));
        }
        Reduction::Wait(self.wait_for(wanted - available))
    }

    /// Gives `tokens` back (a request that took them could not be
    /// completed): they pay off any debt, then refill the budget up to
    /// `size`, then the one-time burst up to its initial amount.
    pub fn replenish(&mut self, tokens: u64) {
        let paid = tokens.min(self.debt);
        self.debt -= paid;
        let rest = tokens - paid;
        let to_budget = rest.min(self.size - self.budget);
        self.budget += to_budget;
        let rest = rest - to_budget;
        self.one_time_burst = self
            .one_time_burst
            .saturating_add(rest)
            .min(self.initial_one_time_burst);
    }

    /// The capacity in tokens.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Milliseconds to refill an empty bucket.
    pub fn refill_time_ms(&self) -> u64 {
        self.refill_time_ms
    }

    /// The one-time burst as configured.
    pub fn initial_one_time_burst(&self) -> u64 {
        self.initial_one_time_burst
    }

    /// What is left of the one-time burst.
    pub fn one_time_burst(&self) -> u64 {
        self.one_time_burst
    }

    /// Tokens in the bucket as of its last use (the burst not included).
    pub fn budget(&self) -> u64 {
        self.budget
    }

    /// Tokens owed by a request larger than the bucket.
    pub fn debt(&self) -> u64 {
        self.debt
    }

    /// The configuration this bucket was made from.
    pub fn config(&self) -> BucketConfig {
        BucketConfig {
            size: self.size,
            one_time_burst: (self.initial_one_time_burst > 0)
                .then_some(self.initial_one_time_burst),
            refill_time: self.refill_time_ms,
        }
    }

    fn refill_ns(&self) -> u128 {
        u128::from(self.refill_time_ms) * NS_PER_MS
    }

    /// Brings the budget up to date at `now`, paying debt first.
    fn refill(&mut self, now: Instant) {
        let Some(last) = self.last_update else {
            self.last_update = Some(now);
            return;
        };
        let now = now.max(last);
        self.last_update = Some(now);
        let missing = u128::from(self.debt) + u128::from(self.size - self.budget);
        if missing == 0 {
            // Full: time spent full earns nothing.
            self.earned = 0;
            return;
        }
        // At most 2^64 ns, so `elapsed * size` fits in a u128.
        let elapsed = now
            .saturating_duration_since(last)
            .as_nanos()
            .min(u128::from(u64::MAX));
        let refill_ns = self.refill_ns();
        let earned = (elapsed * u128::from(self.size)).saturating_add(self.earned);
        let tokens = earned / refill_ns;
        if tokens >= missing {
            self.debt = 0;
            self.budget = self.size;
            self.earned = 0;
            return;
        }
        // Keep the fraction of a token already earned, exactly.
        self.earned = earned % refill_ns;
        // `tokens < missing`: the debt, then the budget, absorb them all.
        let to_debt = tokens.min(u128::from(self.debt));
        self.debt -= saturating_u64(to_debt);
        self.budget += saturating_u64(tokens - to_debt);
    }

    /// How long after the last refill until `need` more tokens have been
    /// refilled (counting the fraction of a token already earned).
    fn wait_for(&self, need: u128) -> Duration {
        let ns = need.checked_mul(self.refill_ns()).map_or(u128::MAX, |t| {
            t.saturating_sub(self.earned)
                .div_ceil(u128::from(self.size))
        });
        Duration::from_nanos(saturating_u64(ns))
    }

    /// The bucket's saved state at `now`.
    pub(crate) fn state(&self, now: Instant) -> TokenBucketState {
        let since = self
            .last_update
            .map_or(0, |last| now.saturating_duration_since(last).as_nanos());
        let elapsed_ns = saturating_u64(since + self.earned / u128::from(self.size));
        TokenBucketState {
            config: self.config(),
            budget: self.budget,
            one_time_burst: self.one_time_burst,
            debt: self.debt,
            elapsed_ns,
        }
    }

    /// A bucket from its saved state, its refill resumed at `now`; `Err`
    /// says what is wrong with the state.
    pub(crate) fn restore(state: &TokenBucketState, now: Instant) -> Result<Self, String> {
        let config = &state.config;
        let initial_burst = config.one_time_burst.unwrap_or(0);
        let mut bucket = TokenBucket::new(config.size, initial_burst, config.refill_time)
            .ok_or_else(|| {
                format!(
                    "size {} and refill_time {} are not a limit (both must be > 0)",
                    config.size, config.refill_time
                )
            })?;
        if state.budget > config.size {
            return Err(format!(
                "budget {} exceeds size {}",
                state.budget, config.size
            ));
        }
        if state.one_time_burst > initial_burst {
            return Err(format!(
                "one_time_burst {} exceeds the configured {initial_burst}",
                state.one_time_burst
            ));
        }
        bucket.budget = state.budget;
        bucket.one_time_burst = state.one_time_burst;
        bucket.debt = state.debt;
        bucket.last_update = Some(
            now.checked_sub(Duration::from_nanos(state.elapsed_ns))
                .unwrap_or(now),
        );
        Ok(bucket)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    #[test]
    fn bucket_new_zero_size_or_refill_is_no_limit() {
        assert!(TokenBucket::new(0, 10, 1000).is_none());
        assert!(TokenBucket::new(10, 10, 0).is_none());
        assert!(TokenBucket::new(10, 0, 1).is_some());
    }

    #[test]
    fn bucket_reduce_full_bucket_then_waits_exact_time() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(1000, 0, 1000).unwrap();
        assert_eq!(b.reduce(1000, t0), Reduction::Done);
        assert_eq!(b.budget(), 0);
        // 1 token per ms: 250 tokens take 250 ms.
        assert_eq!(b.reduce(250, t0), Reduction::Wait(250 * MS));
        // Failure takes nothing; 100 ms later 100 tokens are back.
        assert_eq!(b.reduce(250, t0 + 100 * MS), Reduction::Wait(150 * MS));
        assert_eq!(b.budget(), 100);
        assert_eq!(b.reduce(250, t0 + 250 * MS), Reduction::Done);
        assert_eq!(b.budget(), 0);
    }

    #[test]
    fn bucket_refill_fraction_of_token_carries_over() {
        let t0 = Instant::now();
        // 3 tokens per 10 ms: one token every 3.333 ms.
        let mut b = TokenBucket::new(3, 0, 10).unwrap();
        assert_eq!(b.reduce(3, t0), Reduction::Done);
        let mut t = t0;
        let mut granted = 0u64;
        // Poll every 1 ms for 1 s: 300 tokens, no more, none lost.
        for _ in 0..1000 {
            t += MS;
            if b.reduce(1, t) == Reduction::Done {
                granted += 1;
            }
        }
        assert_eq!(granted, 300);
    }

    #[test]
    fn bucket_one_time_burst_is_spent_first_and_not_refilled() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(100, 500, 1000).unwrap();
        assert_eq!(b.reduce(450, t0), Reduction::Done);
        assert_eq!((b.one_time_burst(), b.budget()), (50, 100));
        // Straddles the burst and the budget.
        assert_eq!(b.reduce(120, t0), Reduction::Done);
        assert_eq!((b.one_time_burst(), b.budget()), (0, 30));
        // A full refill period restores the budget, never the burst.
        assert_eq!(b.reduce(0, t0 + 10_000 * MS), Reduction::Done);
        assert_eq!((b.one_time_burst(), b.budget()), (0, 100));
    }

    #[test]
    fn bucket_reduce_short_with_burst_left_takes_nothing() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(100, 50, 1000).unwrap();
        assert_eq!(b.reduce(100, t0), Reduction::Done);
        assert_eq!((b.one_time_burst(), b.budget()), (0, 50));
        let mut b = TokenBucket::new(100, 50, 1000).unwrap();
        assert_eq!(b.reduce(120, t0), Reduction::Done);
        assert_eq!(b.reduce(40, t0), Reduction::Wait(100 * MS));
        assert_eq!((b.one_time_burst(), b.budget()), (0, 30));
    }

    #[test]
    fn bucket_reduce_larger_than_size_overdraws_then_blocks_until_paid() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(1000, 0, 1000).unwrap();
        // 3.5 buckets' worth: 1000 taken now, 2500 owed = 2.5 s.
        assert_eq!(b.reduce(3500, t0), Reduction::Overdrawn(2500 * MS));
        assert_eq!(b.debt(), 2500);
        assert_eq!(b.reduce(1, t0 + 1000 * MS), Reduction::Wait(1500 * MS));
        assert_eq!(b.debt(), 1500);
        // Paid off at 2.5 s; the next token comes 1 ms later.
        assert_eq!(b.reduce(1, t0 + 2500 * MS), Reduction::Wait(MS));
        assert_eq!(b.debt(), 0);
        assert_eq!(b.reduce(1, t0 + 2501 * MS), Reduction::Done);
        assert_eq!((b.debt(), b.budget()), (0, 0));
    }

    #[test]
    fn bucket_reduce_larger_than_size_but_within_burst_is_plain() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(1000, 5000, 1000).unwrap();
        assert_eq!(b.reduce(5500, t0), Reduction::Done);
        assert_eq!((b.one_time_burst(), b.budget(), b.debt()), (0, 500, 0));
    }

    #[test]
    fn bucket_replenish_pays_debt_then_budget_then_burst() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(100, 50, 1000).unwrap();
        assert_eq!(b.reduce(300, t0), Reduction::Overdrawn(1500 * MS));
        b.replenish(200);
        assert_eq!((b.debt(), b.budget(), b.one_time_burst()), (0, 50, 0));
        b.replenish(1000);
        assert_eq!((b.debt(), b.budget(), b.one_time_burst()), (0, 100, 50));
    }

    #[test]
    fn bucket_time_spent_full_earns_nothing() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(1000, 0, 1000).unwrap();
        assert_eq!(b.reduce(0, t0), Reduction::Done);
        // Full for 10 s, then drained: it must not refill from t0.
        assert_eq!(b.reduce(1000, t0 + 10_000 * MS), Reduction::Done);
        assert_eq!(b.reduce(1000, t0 + 10_000 * MS), Reduction::Wait(1000 * MS));
    }

    #[test]
    fn bucket_extreme_values_do_not_overflow() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(u64::MAX, u64::MAX, u64::MAX).unwrap();
        assert_eq!(b.reduce(u64::MAX, t0), Reduction::Done);
        assert_eq!(b.reduce(u64::MAX, t0), Reduction::Done);
        assert!(matches!(b.reduce(u64::MAX, t0), Reduction::Wait(_)));
        let mut b = TokenBucket::new(1, 0, u64::MAX).unwrap();
        assert_eq!(
            b.reduce(u64::MAX, t0),
            Reduction::Overdrawn(Duration::from_nanos(u64::MAX))
        );
        let mut b = TokenBucket::new(u64::MAX, 0, 1).unwrap();
        assert_eq!(b.reduce(u64::MAX, t0), Reduction::Done);
        assert_eq!(b.reduce(u64::MAX, t0 + MS), Reduction::Done);
    }

    #[test]
    fn bucket_state_round_trip_keeps_budget_and_refill_progress() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new(1000, 300, 1000).unwrap();
        assert_eq!(b.reduce(1200, t0), Reduction::Done);
        let state = b.state(t0 + 40 * MS);
        assert_eq!(state.elapsed_ns, 40_000_000);
        let mut restored = TokenBucket::restore(&state, t0 + 40 * MS).unwrap();
        assert_eq!(restored.config(), b.config());
        assert_eq!(
            restored.reduce(200, t0 + 100 * MS),
            b.reduce(200, t0 + 100 * MS)
        );
        assert_eq!(restored.budget(), b.budget());
    }

    #[test]
    fn bucket_restore_inconsistent_state_is_rejected() {
        let now = Instant::now();
        let mut state = TokenBucket::new(100, 10, 1000).unwrap().state(now);
        state.budget = 101;
        assert!(TokenBucket::restore(&state, now)
            .unwrap_err()
            .contains("budget 101"));
        state.budget = 0;
        state.one_time_burst = 11;
        assert!(TokenBucket::restore(&state, now)
            .unwrap_err()
            .contains("one_time_burst 11"));
        state.config.refill_time = 0;
        assert!(TokenBucket::restore(&state, now).is_err());
    }
}
