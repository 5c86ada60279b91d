//! Live migration: a running VM moves to another ember over TCP or a Unix
//! socket, with the guest paused only for the last dirty pages and its
//! device state ([`ember_migration`]'s stream).
//!
//! ```text
//! source (worker thread)                    destination (VMM thread, nothing built yet)
//!   Start {fingerprint, machine, memory} -->  checks the CPU and layout  (Refused: nothing moved)
//!                                        <--  Ready
//!   KVM dirty log on
//!   round 0: every non-zero page among   -->  written into fresh guest memory
//!            those ever touched, Sync    <--  Synced (all of it is in guest memory)
//!   round n: the pages dirtied since,    -->  (until they fit the downtime at the
//!            Sync                        <--  Synced   measured bandwidth, or the round
//!                                              limit; or post-copy: see `postcopy`)
//!   VMM thread pauses the guest, saves
//!   its state (disks flushed)
//!   last dirty pages, State, End        -->  decodes the state
//!                                        <--  Received
//!   releases the disks' locks, Release   -->  builds the VM (takes the locks), resumes it
//!                                        <--  Done
//!   the source process exits 0                 announces the NICs (RARP)
//! ```
//!
//! Any failure before `Release` leaves the guest running at the source
//! (resumed if it was paused for the hand-over); the destination had
//! built nothing. After `Release` the source takes its disk locks back
//! and resumes only if it gets them all: a destination that runs the
//! guest holds them, so the guest runs on exactly one side. A VM with
//! no writable disk, whose destination cannot be asked, stays paused at
//! the source (said in the log).
//!
//! The `State` payload is one byte (1: run the guest at the destination,
//! 0: it was paused at the source and stays paused) and the snapshot
//! state envelope ([`ember_snapshot::encode`]), so a migration and a
//! snapshot share the state format and its checks.

mod postcopy;
mod receive;
mod send;
mod touched;

use std::time::Duration;

use ember_migration::transport::Url;
use serde::{Deserialize, Serialize};

pub use postcopy::{discard_stale, Incoming, IncomingStats};
pub use receive::{receive, Env, Received};
pub use send::{Outcome, Shared, ToVmm, VmParts, Worker};

use crate::snapshot::Machine;
use ember_vcpu::model::fingerprint::CpuFingerprint;

/// What the destination checks before any memory moves (`Start`).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Hello {
    /// The sender's version (informational).
    pub ember_version: String,
    /// The layout of the state that will follow.
    pub vm_state_version: u32,
    /// The guest's CPU: the destination must give every feature.
    pub cpu: CpuFingerprint,
    /// vCPUs and memory size.
    pub machine: Machine,
    /// Guest RAM: (guest address, size) of each region.
    pub memory: Vec<(u64, u64)>,
}

/// A local migration's `MemoryFd` payload: where each region lies in the
/// memfd that rides on the frame.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemoryFile {
    /// Offset of each region in the file, in the `Hello`'s region order.
    pub offsets: Vec<u64>,
}

/// How to send.
#[derive(Debug, Clone)]
pub struct SendParams {
    /// Where.
    pub url: ember_migration::transport::Url,
    /// The longest pause aimed for.
    pub downtime: Duration,
    /// The longest the whole migration may take.
    pub timeout: Duration,
    /// Hand over at the timeout anyway (Cloud Hypervisor's `Ignore`)
    /// instead of giving up (`Cancel`).
    pub ignore_timeout: bool,
    /// The most pre-copy rounds after the first (then hand over, with a
    /// longer pause).
    pub max_rounds: u32,
    /// Hand the memory over as a file descriptor instead of copying it
    /// (same host, Unix socket, shared memory).
    pub local: bool,
    /// When the guest moves before all its memory.
    pub postcopy: Postcopy,
}

/// When a migration switches to post-copy (the guest runs at the
/// destination, its last dirty pages follow on demand).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Postcopy {
    /// Never: pre-copy rounds until they converge, the round limit or the
    /// timeout.
    Never,
    /// When the dirty set stops shrinking (or at the round limit).
    Auto,
    /// Right after the first full pass (`memory_mode: Postcopy`).
    Now,
}

/// Pre-copy rounds after the first full pass, at most (QEMU has no limit
/// but throttles; this bounds a busy guest's migration without one).
pub const MAX_ROUNDS: u32 = 30;

/// Where a migration is, for `GET /api/v1/vm.migration-status`.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct Progress {
    /// `none`, `connecting`, `precopy`, `handover`, `postcopy`,
    /// `completed`, `failed` or `cancelled`.
    pub state: String,
    /// The destination.
    pub destination_url: String,
    /// The current pre-copy round (0: the full pass).
    pub round: u32,
    /// Pages sent with their data, all rounds.
    pub pages_sent: u64,
    /// Zero pages sent as addresses.
    pub zero_pages_sent: u64,
    /// Bytes written to the connection.
    pub bytes_sent: u64,
    /// Pages the guest dirtied during the last round.
    pub dirty_pages: u64,
    /// Pages dirtied per second during the last round.
    pub dirty_rate_pages_per_s: f64,
    /// Measured throughput of the last round, MiB/s.
    pub bandwidth_mib_per_s: f64,
    /// The pause the remaining dirty pages would cost now, ms.
    pub expected_downtime_ms: f64,
    /// The pause the guest had (once handed over), ms.
    pub downtime_ms: Option<f64>,
    /// Since the start, ms.
    pub total_ms: f64,
    /// Post-copy: stale pages not sent yet.
    pub postcopy_pages_left: u64,
    /// Post-copy: the destination's page requests.
    pub page_requests: u64,
    /// Post-copy: pages sent because the guest touched them.
    pub pages_sent_on_request: u64,
    /// Why it failed.
    pub error: Option<String>,
}

/// Decodes a `State` payload: whether to run the guest, and the state.
pub fn decode_state(
    payload: &[u8],
) -> Result<(bool, ember_snapshot::Envelope<crate::snapshot::VmState>), String> {
    let (&flag, rest) = payload
        .split_first()
        .ok_or_else(|| "the migration state is empty".to_string())?;
    if flag > 1 {
        return Err(format!("the migration state's run flag is {flag}"));
    }
    let env: ember_snapshot::Envelope<crate::snapshot::VmState> =
        ember_snapshot::decode(rest).map_err(|e| crate::error_chain(&e))?;
    if env.state.version != crate::snapshot::VM_STATE_VERSION {
        return Err(format!(
            "VM state version {} is not supported (this ember reads {})",
            env.state.version,
            crate::snapshot::VM_STATE_VERSION
        ));
    }
    Ok((flag == 1, env))
}

/// A migration URL as ember uses it: TCP addresses must be numeric (the
/// migration thread may not read resolver files), `localhost` aside.
pub fn parse_url(text: &str) -> crate::Result<Url> {
    let url: Url = text
        .parse()
        .map_err(|e| crate::Error::Migration(crate::error_chain(&e)))?;
    match url {
        Url::Tcp(addr) => {
            let addr = match addr.strip_prefix("localhost:") {
                Some(port) => format!("127.0.0.1:{port}"),
                None => addr,
            };
            addr.parse::<std::net::SocketAddr>().map_err(|_| {
                crate::Error::Migration(format!(
                    "{text:?}: the address must be an IP address and a port (tcp:192.0.2.1:6000, tcp:[::1]:6000)"
                ))
            })?;
            Ok(Url::Tcp(addr))
        }
        unix => Ok(unix),
    }
}

/// Counts the set bits of dirty-page bitmaps.
pub fn count_pages(maps: &[Vec<u64>]) -> u64 {
    maps.iter()
        .flat_map(|m| m.iter())
        .map(|w| u64::from(w.count_ones()))
        .sum()
}

/// `a |= b`, bitmap by bitmap.
pub fn unite(a: &mut Vec<Vec<u64>>, b: &[Vec<u64>]) {
    if a.len() < b.len() {
        a.resize(b.len(), Vec::new());
    }
    for (x, y) in a.iter_mut().zip(b) {
        if x.len() < y.len() {
            x.resize(y.len(), 0);
        }
        for (w, v) in x.iter_mut().zip(y) {
            *w |= v;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bitmaps_unite_and_count() {
        let mut a = vec![vec![0b1010u64], vec![]];
        unite(&mut a, &[vec![0b0110, 1 << 63], vec![3]]);
        assert_eq!(a, vec![vec![0b1110, 1 << 63], vec![3]]);
        assert_eq!(count_pages(&a), 6);
    }

    #[test]
    fn a_state_payload_is_checked() {
        assert!(decode_state(&[]).unwrap_err().contains("empty"));
        assert!(decode_state(&[7, 1, 2]).unwrap_err().contains("run flag"));
        let e = decode_state(&[1, 1, 2, 3]).unwrap_err();
        assert!(!e.is_empty());
    }
}
