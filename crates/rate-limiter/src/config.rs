//! Configuration: Firecracker's JSON body and a compact command-line form.
//! See the crate docs for the command-line form.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::bucket::TokenBucket;
use crate::{BucketUpdate, Error, Result};

/// A token bucket's configuration: Firecracker's `TokenBucket` body.
///
/// A bucket with `size` or `refill_time` 0 is "no limit", as in
/// Firecracker's API (the command-line form rejects it instead).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BucketConfig {
    /// The capacity in tokens (bytes or requests).
    pub size: u64,
    /// Extra tokens available once, spent before the bucket's own.
    #[serde(default)]
    pub one_time_burst: Option<u64>,
    /// Milliseconds to refill an empty bucket: the rate is
    /// `size / refill_time` tokens per millisecond.
    pub refill_time: u64,
}

impl BucketConfig {
    /// Whether this configuration limits anything (`size` and
    /// `refill_time` both non-zero).
    pub fn is_limit(&self) -> bool {
        self.size > 0 && self.refill_time > 0
    }

    /// A full bucket of this configuration; `None` for no limit.
    pub fn bucket(&self) -> Option<TokenBucket> {
        TokenBucket::new(
            self.size,
            self.one_time_burst.unwrap_or(0),
            self.refill_time,
        )
    }
}

impl From<Option<BucketConfig>> for BucketUpdate {
    /// Firecracker's PATCH semantics: a missing bucket is left alone, a
    /// bucket with size or refill_time 0 removes the limit, any other
    /// replaces the bucket with a new, full one.
    fn from(config: Option<BucketConfig>) -> Self {
        match config {
            None => BucketUpdate::None,
            Some(c) => c
                .bucket()
                .map_or(BucketUpdate::Disabled, BucketUpdate::Update),
        }
    }
}

/// A rate limiter's configuration: Firecracker's `RateLimiter` body, as
/// found in `PUT`/`PATCH /drives` and `/network-interfaces`
/// (`rate_limiter`, `rx_rate_limiter`, `tx_rate_limiter`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimiterConfig {
    /// The bucket of bytes.
    #[serde(default)]
    pub bandwidth: Option<BucketConfig>,
    /// The bucket of requests.
    #[serde(default)]
    pub ops: Option<BucketConfig>,
}

impl RateLimiterConfig {
    /// Whether neither bucket limits anything.
    pub fn is_unlimited(&self) -> bool {
        !self.bandwidth.is_some_and(|b| b.is_limit()) && !self.ops.is_some_and(|b| b.is_limit())
    }
}

/// `n` times 1024 to the power of the suffix's rank.
fn parse_count(s: &str) -> std::result::Result<u64, String> {
    let (digits, shift) = match s.as_bytes().last() {
        Some(b'k' | b'K') => (&s[..s.len() - 1], 10),
        Some(b'm' | b'M') => (&s[..s.len() - 1], 20),
        Some(b'g' | b'G') => (&s[..s.len() - 1], 30),
        Some(b't' | b'T') => (&s[..s.len() - 1], 40),
        _ => (s, 0),
    };
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!(
            "`{s}` is not a number with an optional K, M, G or T suffix"
        ));
    }
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("`{s}` does not fit in 64 bits"))?;
    n.checked_mul(1u64 << shift)
        .ok_or_else(|| format!("`{s}` does not fit in 64 bits"))
}

/// Milliseconds from `N`, `Nms` or `Ns`.
fn parse_millis(s: &str) -> std::result::Result<u64, String> {
    let (digits, scale) = if let Some(d) = s.strip_suffix("ms") {
        (d, 1)
    } else if let Some(d) = s.strip_suffix('s') {
        (d, 1000)
    } else {
        (s, 1)
    };
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!(
            "refill time `{s}` is not a number of ms or s (e.g. 100ms, 1s)"
        ));
    }
    digits
        .parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(scale))
        .ok_or_else(|| format!("refill time `{s}` does not fit in 64 bits of milliseconds"))
}

fn parse_bucket(s: &str) -> std::result::Result<BucketConfig, String> {
    let (rate, burst) = match s.split_once('+') {
        Some((rate, burst)) => (rate, Some(burst)),
        None => (s, None),
    };
    let (size, time) = rate
        .split_once('/')
        .ok_or_else(|| format!("`{rate}` is not SIZE/TIME (e.g. 10M/1s)"))?;
    let size = parse_count(size)?;
    if size == 0 {
        return Err("size must be greater than 0 (leave the bucket out for no limit)".into());
    }
    let refill_time = parse_millis(time)?;
    if refill_time == 0 {
        return Err("refill time must be greater than 0".into());
    }
    let one_time_burst = match burst {
        None => None,
        Some(b) => Some(parse_count(b).map_err(|e| format!("burst: {e}"))?).filter(|&b| b > 0),
    };
    Ok(BucketConfig {
        size,
        one_time_burst,
        refill_time,
    })
}

impl FromStr for BucketConfig {
    type Err = Error;

    /// Parses `SIZE/TIME[+BURST]` (see the [crate docs](crate#command-line-form)).
    fn from_str(s: &str) -> Result<Self> {
        parse_bucket(s).map_err(|reason| Error::Parse {
            part: s.to_string(),
            reason,
        })
    }
}

impl FromStr for RateLimiterConfig {
    type Err = Error;

    /// Parses `bw=SIZE/TIME[+BURST]`, `ops=SIZE/TIME[+BURST]` or both,
    /// comma-separated (see the [crate docs](crate#command-line-form)).
    fn from_str(s: &str) -> Result<Self> {
        let bad = |part: &str, reason: String| Error::Parse {
            part: part.to_string(),
            reason,
        };
        if s.is_empty() {
            return Err(bad(
                s,
                "empty: expected bw=SIZE/TIME, ops=SIZE/TIME or both".into(),
            ));
        }
        let mut config = RateLimiterConfig::default();
        for part in s.split(',') {
            let (key, value) = part
                .split_once('=')
                .ok_or_else(|| bad(part, "not key=value (keys: bw, ops)".into()))?;
            let slot = match key {
                "bw" | "bandwidth" => &mut config.bandwidth,
                "ops" => &mut config.ops,
                _ => return Err(bad(part, format!("unknown key `{key}` (keys: bw, ops)"))),
            };
            if slot.is_some() {
                return Err(bad(part, format!("`{key}` is given twice")));
            }
            *slot = Some(parse_bucket(value).map_err(|reason| bad(part, reason))?);
        }
        Ok(config)
    }
}

/// `n` with the largest binary suffix that divides it exactly.
fn fmt_count(f: &mut fmt::Formatter<'_>, n: u64) -> fmt::Result {
    for (shift, suffix) in [(40, 'T'), (30, 'G'), (20, 'M'), (10, 'K')] {
        if n != 0 && n % (1u64 << shift) == 0 {
            return write!(f, "{}{suffix}", n >> shift);
        }
    }
    write!(f, "{n}")
}

impl fmt::Display for BucketConfig {
    /// The command-line form, which parses back to the same value when the
    /// bucket [is a limit](Self::is_limit).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt_count(f, self.size)?;
        if self.refill_time != 0 && self.refill_time % 1000 == 0 {
            write!(f, "/{}s", self.refill_time / 1000)?;
        } else {
            write!(f, "/{}ms", self.refill_time)?;
        }
        if let Some(burst) = self.one_time_burst.filter(|&b| b > 0) {
            write!(f, "+")?;
            fmt_count(f, burst)?;
        }
        Ok(())
    }
}

impl fmt::Display for RateLimiterConfig {
    /// The command-line form (empty when there is no bucket).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(bw) = &self.bandwidth {
            write!(f, "bw={bw}")?;
        }
        if let Some(ops) = &self.ops {
            let sep = if self.bandwidth.is_some() { "," } else { "" };
            write!(f, "{sep}ops={ops}")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_err(s: &str) -> String {
        s.parse::<RateLimiterConfig>().unwrap_err().to_string()
    }

    #[test]
    fn config_parse_both_buckets_with_suffixes_and_burst() {
        let c: RateLimiterConfig = "bw=10M/1s+100M,ops=1000/500ms".parse().unwrap();
        assert_eq!(
            c.bandwidth,
            Some(BucketConfig {
                size: 10 << 20,
                one_time_burst: Some(100 << 20),
                refill_time: 1000,
            })
        );
        assert_eq!(
            c.ops,
            Some(BucketConfig {
                size: 1000,
                one_time_burst: None,
                refill_time: 500,
            })
        );
        let c: RateLimiterConfig = "bandwidth=4k/250".parse().unwrap();
        assert_eq!(c.bandwidth.unwrap().size, 4096);
        assert_eq!(c.bandwidth.unwrap().refill_time, 250);
        assert_eq!(c.ops, None);
    }

    #[test]
    fn config_display_parses_back_to_same_config() {
        for s in [
            "bw=10M/1s+100M,ops=1000/500ms",
            "ops=3/7ms",
            "bw=1536/2s+1K",
        ] {
            let c: RateLimiterConfig = s.parse().unwrap();
            assert_eq!(c.to_string(), s);
            assert_eq!(c.to_string().parse::<RateLimiterConfig>().unwrap(), c);
        }
    }

    #[test]
    fn config_parse_bad_input_names_the_part() {
        assert!(parse_err("bw=10M/0").contains("`bw=10M/0`: refill time must be greater than 0"));
        assert!(parse_err("bw=0/1s").contains("size must be greater than 0"));
        assert!(parse_err("bw=10M/1s,iops=5/1s").contains("`iops=5/1s`: unknown key `iops`"));
        assert!(parse_err("ops=5/1s,ops=6/1s").contains("`ops` is given twice"));
        assert!(parse_err("bw=10X/1s").contains("`10X` is not a number"));
        assert!(parse_err("bw=10M").contains("not SIZE/TIME"));
        assert!(parse_err("bw=10M/1h").contains("refill time `1h`"));
        assert!(parse_err("bw=10M/1s+x").contains("burst: `x`"));
        assert!(parse_err("bw=16777216T/1s").contains("does not fit in 64 bits"));
        assert!(parse_err("ops=1/18446744073709552s").contains("does not fit"));
        assert!(parse_err("bw").contains("not key=value"));
        assert!(parse_err("").contains("empty"));
        assert!(parse_err("bw=10M/1s,").contains("not key=value"));
    }

    #[test]
    fn bucket_config_parse_alone_for_embedding_in_device_flags() {
        let b: BucketConfig = "1G/1s+0".parse().unwrap();
        assert_eq!(b.size, 1 << 30);
        assert_eq!(b.one_time_burst, None);
        let e = "1G/-1s".parse::<BucketConfig>().unwrap_err().to_string();
        assert!(e.starts_with("rate limiter `1G/-1s`"), "{e}");
    }

    #[test]
    fn config_json_uses_firecracker_field_names() {
        let c: RateLimiterConfig = serde_json::from_str(
            r#"{"bandwidth": {"size": 1048576, "one_time_burst": 0, "refill_time": 100},
                "ops": {"size": 100, "refill_time": 1000}}"#,
        )
        .unwrap();
        assert_eq!(c.bandwidth.unwrap().one_time_burst, Some(0));
        assert_eq!(c.ops.unwrap().one_time_burst, None);
        let empty: RateLimiterConfig = serde_json::from_str("{}").unwrap();
        assert!(empty.is_unlimited());
        let back: RateLimiterConfig =
            serde_json::from_str(&serde_json::to_string(&c).unwrap()).unwrap();
        assert_eq!(back, c);
    }

    #[test]
    fn config_json_unknown_field_is_rejected() {
        assert!(serde_json::from_str::<RateLimiterConfig>(r#"{"bytes": null}"#).is_err());
        assert!(serde_json::from_str::<BucketConfig>(
            r#"{"size": 1, "refill_time": 1, "burst": 2}"#
        )
        .is_err());
        assert!(serde_json::from_str::<BucketConfig>(r#"{"size": 1}"#).is_err());
    }

    #[test]
    fn bucket_update_from_config_follows_firecracker_patch() {
        assert!(matches!(BucketUpdate::from(None), BucketUpdate::None));
        let off = BucketConfig {
            size: 0,
            one_time_burst: None,
            refill_time: 100,
        };
        assert!(matches!(
            BucketUpdate::from(Some(off)),
            BucketUpdate::Disabled
        ));
        let on = BucketConfig { size: 10, ..off };
        assert!(matches!(BucketUpdate::from(Some(on)), BucketUpdate::Update(b) if b.size() == 10));
        assert!(!RateLimiterConfig {
            bandwidth: Some(on),
            ops: None
        }
        .is_unlimited());
        assert!(RateLimiterConfig {
            bandwidth: Some(off),
            ops: None
        }
        .is_unlimited());
    }
}
