//! Token-bucket rate limiting for block and network devices, compatible
//! with Firecracker's `RateLimiter` (its API body, its semantics and its
//! snapshot state): see README.md.
//!
//! A [`RateLimiter`] has an optional bucket of bytes and an optional bucket
//! of requests. The device asks it before each request; when a bucket runs
//! short the limiter blocks and arms a timerfd, and the device's event loop
//! calls [`RateLimiter::event_handler`] when that fd is readable and
//! retries its queue.
//!
//! ```
//! use std::os::fd::AsRawFd;
//!
//! use ember_rate_limiter::{RateLimiter, RateLimiterConfig, TokenType};
//!
//! // 1 MiB/s and 100 requests/s; also Firecracker's JSON body.
//! let config: RateLimiterConfig = "bw=1M/1s,ops=100/1s".parse().unwrap();
//! let mut limiter = RateLimiter::new(&config).unwrap();
//! // The event loop watches this fd for readability.
//! assert!(limiter.as_raw_fd() >= 0);
//!
//! // A request: one op, then its bytes; the bucket starts full.
//! assert!(limiter.consume(1, TokenType::Ops));
//! assert!(limiter.consume(1 << 20, TokenType::Bytes));
//! // The bytes bucket is empty: the next request is held back, the
//! // limiter is blocked and its timer armed for when 4 KiB are back.
//! assert!(limiter.consume(1, TokenType::Ops));
//! if !limiter.consume(4096, TokenType::Bytes) {
//!     limiter.manual_replenish(1, TokenType::Ops); // the op did not happen
//! }
//! assert!(limiter.is_blocked());
//! assert!(limiter.blocked_for().unwrap().as_millis() <= 4);
//! // ...when the fd is readable: limiter.event_handler(), then retry.
//! assert_eq!(limiter.counters().ops, 1);
//! ```
//!
//! # Command-line form
//!
//! A bucket is `SIZE/TIME[+BURST]`: `SIZE` tokens refilled over `TIME`,
//! with an optional one-time burst of `BURST` extra tokens.
//!
//! - `SIZE` and `BURST` are decimal integers with an optional binary suffix
//!   `K`, `M`, `G` or `T` (either case; ×1024, ×1024², …), for bytes and ops
//!   alike: `10M` is 10,485,760.
//! - `TIME` is a decimal integer with the unit `ms` or `s`; a bare number is
//!   milliseconds, Firecracker's `refill_time` unit.
//! - `SIZE` and `TIME` must be greater than 0 (leave the bucket out for no
//!   limit); a `BURST` of 0 means none. Values up to `u64::MAX` tokens and
//!   milliseconds are accepted; a suffix that overflows `u64` is an error.
//!
//! A limiter is one or both buckets, comma-separated:
//! `bw=SIZE/TIME[+BURST]` (bytes; `bandwidth=` also works) and
//! `ops=SIZE/TIME[+BURST]` (requests), e.g. `bw=10M/1s+100M,ops=1000/1s`:
//! 10 MiB/s after a first 100 MiB, and 1000 requests/s.
//!
//! A device flag that is itself a comma-separated `key=value` list takes the
//! two keys as its own and parses each value as a [`BucketConfig`]
//! (`value.parse()`).
//!
//! # Semantics
//!
//! - A bucket starts full; its one-time burst is spent before its own
//!   tokens and never comes back. A bucket with `size` or `refill_time` 0
//!   (in the JSON form) is no limit.
//! - Refills are computed from the elapsed time at each use, exactly (no
//!   rounding drift), and time spent full earns nothing.
//! - A refused request takes nothing; the limiter blocks (for both token
//!   types, as in Firecracker) until enough tokens for it are back, at
//!   least [`MIN_WAIT`], and its timerfd fires then.
//! - A request larger than the bucket can ever hold is let through, takes
//!   what is there and owes the rest: the limiter blocks until the debt is
//!   refilled, so the request is not starved and the rate still holds.
#![deny(unsafe_code)]

mod bucket;
mod clock;
mod config;
mod limiter;
mod state;
mod timer;

pub use bucket::{Reduction, TokenBucket};
pub use clock::{Clock, ManualClock, MonotonicClock};
pub use config::{BucketConfig, RateLimiterConfig};
pub use limiter::{Counters, RateLimiter, MIN_WAIT};
pub use state::{RateLimiterState, TokenBucketState};

/// What went wrong in this crate.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The timerfd cannot be made, armed or read.
    #[error("rate limiter timerfd")]
    Timer(#[source] std::io::Error),
    /// The event handler ran though the timer has not expired and the
    /// limiter is still blocked.
    #[error("rate limiter event before its timer expired")]
    SpuriousEvent,
    /// A command-line rate limiter or bucket is malformed.
    #[error("rate limiter `{part}`: {reason}")]
    Parse {
        /// The part of the input at fault.
        part: String,
        /// What is wrong with it.
        reason: String,
    },
    /// A saved state that cannot be restored.
    #[error("rate limiter {bucket} bucket state: {reason}")]
    State {
        /// `bandwidth` or `ops`.
        bucket: &'static str,
        /// What is wrong with it.
        reason: String,
    },
}

/// This crate's result.
pub type Result<T> = std::result::Result<T, Error>;

/// What a request's tokens count.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TokenType {
    /// Bytes, from the bandwidth bucket.
    Bytes,
    /// Requests, from the ops bucket.
    Ops,
}

/// A change to one bucket, for [`RateLimiter::update_buckets`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BucketUpdate {
    /// Keep the bucket as it is.
    None,
    /// Remove the bucket: no limit.
    Disabled,
    /// Replace the bucket with this one.
    Update(TokenBucket),
}
