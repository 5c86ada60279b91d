//! The limiter's saved state: plain serde data for snapshots.
//!
//! Times are relative (nanoseconds before the save), since an [`Instant`]
//! means nothing in another process. Fields added after Firecracker's set
//! have `#[serde(default)]`, so older states still load.
//!
//! [`Instant`]: std::time::Instant

use serde::{Deserialize, Serialize};

use crate::config::BucketConfig;

/// A token bucket's saved state.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenBucketState {
    /// The bucket's configuration (the initial one-time burst included).
    pub config: BucketConfig,
    /// Tokens in the bucket.
    pub budget: u64,
    /// What is left of the one-time burst.
    pub one_time_burst: u64,
    /// Tokens owed by a request larger than the bucket.
    #[serde(default)]
    pub debt: u64,
    /// Nanoseconds of refill already earned (since the budget was last
    /// brought up to date) when the state was saved.
    pub elapsed_ns: u64,
}

/// A rate limiter's saved state.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RateLimiterState {
    /// The bucket of bytes, if limited.
    pub bandwidth: Option<TokenBucketState>,
    /// The bucket of requests, if limited.
    pub ops: Option<TokenBucketState>,
    /// Nanoseconds the limiter was still to stay blocked, if it was: a
    /// restored limiter re-arms its timer so the device is woken to retry.
    #[serde(default)]
    pub blocked_ns: Option<u64>,
}
