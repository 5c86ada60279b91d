//! `[vsock]` / `--vsock` and `[entropy]` / `--entropy`: the devices
//! orchestrators expect (Firecracker's `PUT /vsock` and `PUT /entropy`).
//!
//! ```toml
//! [vsock]
//! guest_cid = 3                  # the guest's context id (3 or more)
//! uds_path = "/run/vm0/v.sock"   # host programs connect here
//!
//! [entropy]                      # a virtio-rng fed from getrandom(2)
//! rate_limiter = { bandwidth = { size = 1048576, refill_time = 1000 } }
//! ```

use ember_rate_limiter::RateLimiterConfig;
use ember_virtio_rng::EntropyConfig;
use ember_virtio_vsock::VsockConfig;

use super::ConfigError;

/// Parses `--vsock cid=CID,uds_path=PATH` (also `guest_cid=` and
/// Cloud Hypervisor's `socket=`).
pub fn parse_vsock(flag: &str) -> Result<VsockConfig, ConfigError> {
    let bad = |why: String| ConfigError::DeviceFlag {
        name: "vsock",
        flag: flag.to_string(),
        why,
    };
    let (mut cid, mut path) = (None, None);
    for part in flag.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (k, v) = part
            .split_once('=')
            .ok_or_else(|| bad(format!("{part:?} is not KEY=VALUE")))?;
        match k {
            "cid" | "guest_cid" => {
                cid = Some(
                    v.parse::<u64>()
                        .map_err(|_| bad(format!("{k}={v}: not a context id")))?,
                )
            }
            "uds_path" | "socket" | "path" => path = Some(v.into()),
            _ => return Err(bad(format!("unknown key {k:?} (cid, uds_path)"))),
        }
    }
    let config = VsockConfig {
        guest_cid: cid.ok_or_else(|| bad("cid=CID is missing".into()))?,
        uds_path: path.ok_or_else(|| bad("uds_path=PATH is missing".into()))?,
    };
    config.validate().map_err(|e| bad(e.to_string()))?;
    Ok(config)
}

/// Parses `--entropy` (`on`, or a rate limit: `bw=SIZE/TIME,ops=SIZE/TIME`).
pub fn parse_entropy(flag: &str) -> Result<EntropyConfig, ConfigError> {
    let flag = flag.trim();
    if flag.is_empty() || flag == "on" {
        return Ok(EntropyConfig::default());
    }
    let limit: RateLimiterConfig = flag.parse().map_err(|e| ConfigError::DeviceFlag {
        name: "entropy",
        flag: flag.to_string(),
        why: format!("{e} (on, or a rate limit: bw=SIZE/TIME,ops=SIZE/TIME)"),
    })?;
    Ok(EntropyConfig {
        rate_limiter: Some(limit),
    })
}

/// The vsock device's settings, as the configuration file gives them.
pub fn validate_vsock(v: &VsockConfig) -> Result<(), ConfigError> {
    v.validate().map_err(|e| ConfigError::Device {
        name: "vsock",
        why: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vsock_and_entropy_flags_parse_and_bad_ones_are_named() {
        let v = parse_vsock("cid=3,uds_path=/tmp/v.sock").unwrap();
        assert_eq!((v.guest_cid, v.uds_path.to_str()), (3, Some("/tmp/v.sock")));
        assert_eq!(parse_vsock("guest_cid=9,socket=/a").unwrap().guest_cid, 9);
        for (flag, why) in [
            (
                "cid=2,uds_path=/a",
                "guest_cid = 2 is not a guest context id",
            ),
            ("uds_path=/a", "cid=CID is missing"),
            ("cid=3", "uds_path=PATH is missing"),
            ("cid=x,uds_path=/a", "cid=x: not a context id"),
            ("cid=3,uds_path=/a,port=5", "unknown key \"port\""),
        ] {
            let e = parse_vsock(flag).unwrap_err().to_string();
            assert!(
                e.starts_with(&format!("--vsock {flag}: ")) && e.contains(why),
                "{e}"
            );
        }
        let long = format!("cid=3,uds_path=/{}", "a".repeat(120));
        assert!(parse_vsock(&long)
            .unwrap_err()
            .to_string()
            .contains("must fit a Unix socket address"));
        assert_eq!(parse_entropy("on").unwrap(), EntropyConfig::default());
        let e = parse_entropy("bw=1M/1s").unwrap();
        assert!(e.rate_limiter.is_some());
        assert!(parse_entropy("fast")
            .unwrap_err()
            .to_string()
            .starts_with("--entropy fast: "));
    }
}
