//! The balloon's bodies in Firecracker's spec: `PUT|GET /balloon`
//! ([`Balloon`]), `PATCH /balloon` ([`BalloonUpdate`]),
//! `GET /balloon/statistics` ([`BalloonStats`]) and
//! `PATCH /balloon/statistics` ([`BalloonStatsUpdate`]).

use serde::{Deserialize, Serialize};

/// `PUT /balloon`, `GET /balloon`, and the config file's `balloon`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Balloon {
    /// Target balloon size in MiB.
    pub amount_mib: u32,
    /// Deflate when the guest runs short of memory.
    pub deflate_on_oom: bool,
    /// Seconds between statistics; 0 (the default) turns them off.
    #[serde(default)]
    pub stats_polling_interval_s: u16,
    /// Free page hinting: not supported by ember (free page reporting is).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub free_page_hinting: Option<bool>,
    /// Free page reporting.
    #[serde(default)]
    pub free_page_reporting: bool,
}

/// `PATCH /balloon`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BalloonUpdate {
    /// The new target in MiB.
    pub amount_mib: u32,
}

/// `PATCH /balloon/statistics`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BalloonStatsUpdate {
    /// The new interval in seconds.
    pub stats_polling_interval_s: u16,
}

/// `GET /balloon/statistics`: the targets and the guest's latest values
/// (a value the guest did not give is left out).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BalloonStats {
    /// Pages the balloon aims to hold.
    pub target_pages: u32,
    /// Pages it holds.
    pub actual_pages: u32,
    /// The target in MiB.
    pub target_mib: u32,
    /// What it holds in MiB.
    pub actual_mib: u32,
    /// The guest's statistics by Firecracker's names (`free_memory`, ...).
    #[serde(flatten)]
    pub values: std::collections::BTreeMap<String, u64>,
}
