//! `[balloon]` / `--balloon`: a virtio-balloon device.
//!
//! ```toml
//! [balloon]
//! amount_mib = 0                 # the target: what the guest gives back
//! deflate_on_oom = true
//! stats_polling_interval_s = 1   # 0: no statistics
//! free_page_reporting = true
//! ```

use ember_virtio_balloon::BalloonConfig;

use super::{ConfigError, MemoryBackend};

/// Parses `--balloon amount_mib=MIB[,deflate_on_oom=on][,stats_polling_interval_s=S][,free_page_reporting=on]`.
pub fn parse_flag(flag: &str) -> Result<BalloonConfig, ConfigError> {
    let bad = |why: String| ConfigError::BalloonFlag {
        flag: flag.to_string(),
        why,
    };
    let mut b = BalloonConfig::default();
    for part in flag.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (k, v) = part
            .split_once('=')
            .ok_or_else(|| bad(format!("{part:?} is not KEY=VALUE")))?;
        let on = || match v {
            "on" | "true" => Ok(true),
            "off" | "false" => Ok(false),
            _ => Err(bad(format!("{k}={v}: expected on or off"))),
        };
        match k {
            "amount_mib" | "size" => {
                b.amount_mib = v
                    .parse()
                    .map_err(|_| bad(format!("{k}={v}: not a number of MiB")))?
            }
            "deflate_on_oom" => b.deflate_on_oom = on()?,
            "free_page_reporting" => b.free_page_reporting = on()?,
            "stats_polling_interval_s" | "stats" => {
                b.stats_polling_interval_s = v
                    .parse()
                    .map_err(|_| bad(format!("{k}={v}: not a number of seconds (0 to 65535)")))?
            }
            _ => {
                return Err(bad(format!(
                    "unknown key {k:?} (amount_mib, deflate_on_oom, stats_polling_interval_s, free_page_reporting)"
                )))
            }
        }
    }
    Ok(b)
}

/// The balloon fits the machine: no larger than its memory, and not on
/// hugetlbfs pages (a 4 KiB balloon page cannot be given back from a huge
/// page).
pub fn validate(
    b: &BalloonConfig,
    memory_mib: u64,
    backend: &MemoryBackend,
) -> Result<(), ConfigError> {
    if u64::from(b.amount_mib) > memory_mib {
        return Err(ConfigError::Balloon(format!(
            "amount_mib = {} is more than the guest's {memory_mib} MiB",
            b.amount_mib
        )));
    }
    if backend.hugepages.is_some() {
        return Err(ConfigError::Balloon(
            "a balloon cannot give back parts of hugetlbfs pages: use thp=on or 4 KiB pages".into(),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_parse_and_bad_ones_are_named() {
        let b = parse_flag(
            "amount_mib=64,deflate_on_oom=on,stats_polling_interval_s=2,free_page_reporting=on",
        )
        .unwrap();
        assert_eq!(
            b,
            BalloonConfig {
                amount_mib: 64,
                deflate_on_oom: true,
                stats_polling_interval_s: 2,
                free_page_reporting: true
            }
        );
        for (flag, why) in [
            ("amount_mib=x", "not a number of MiB"),
            ("deflate_on_oom=maybe", "expected on or off"),
            ("stats=70000", "0 to 65535"),
            ("hinting=on", "unknown key \"hinting\""),
            ("64", "is not KEY=VALUE"),
        ] {
            let e = parse_flag(flag).unwrap_err().to_string();
            assert!(
                e.starts_with(&format!("--balloon {flag}: ")) && e.contains(why),
                "{e}"
            );
        }
        let big = BalloonConfig {
            amount_mib: 300,
            ..b
        };
        let e = validate(&big, 256, &MemoryBackend::default()).unwrap_err();
        assert_eq!(
            e.to_string(),
            "balloon: amount_mib = 300 is more than the guest's 256 MiB"
        );
        let huge = MemoryBackend {
            hugepages: Some(super::super::HugePageSize::Size2M),
            ..Default::default()
        };
        assert!(validate(&b, 256, &huge)
            .unwrap_err()
            .to_string()
            .contains("hugetlbfs"));
    }
}
