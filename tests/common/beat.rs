//! The test agent's heartbeat (`ember.beat=DEV:SECONDS:MEM_MIB`, see
//! tools/guest/agent/ember_agent_beat.c) as the snapshot and migration
//! tests read it: beat lines, the disk blocks they wrote, and the checks
//! that a guest moved elsewhere went on where it was.

use std::path::Path;
use std::time::{Duration, Instant};

use crate::{agent_all, Running};

/// The beat lines printed so far: (n, mem_ok, disk_ok).
pub fn beats(console: &str) -> Vec<(u32, bool, bool)> {
    // Only whole lines: the console may be read while a line is half out.
    let whole = console.rfind('\n').map_or("", |i| &console[..=i]);
    agent_all(whole)
        .remove("beat")
        .unwrap_or_default()
        .iter()
        .map(|b| {
            let n = b.get("n").and_then(|v| v.parse().ok()).unwrap_or(u32::MAX);
            (
                n,
                b.get("mem_ok").is_some_and(|v| v == "1"),
                b.get("disk_ok").is_some_and(|v| v == "1"),
            )
        })
        .collect()
}

/// Waits until the console shows beat `n` (or later); the console.
pub fn wait_beat(ember: &mut Running, n: u32, timeout: Duration) -> String {
    let deadline = Instant::now() + timeout;
    loop {
        let out = ember.stdout_so_far();
        if beats(&out).iter().any(|b| b.0 >= n) || Instant::now() > deadline {
            return out;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The block the agent writes for beat `n`.
pub fn beat_block(n: u32) -> Vec<u8> {
    let head = format!("EMBER-BEAT {n:08}\n");
    let mut b: Vec<u8> = (0..4096u32)
        .map(|i| (n.wrapping_mul(31).wrapping_add(i) & 0xff) as u8)
        .collect();
    b[..head.len()].copy_from_slice(head.as_bytes());
    b
}

/// Checks that `disk` holds beats `0..=last`, byte for byte.
pub fn check_disk(disk: &Path, last: u32) {
    let bytes = std::fs::read(disk).unwrap();
    for n in 0..=last {
        let at = n as usize * 4096;
        assert!(
            bytes[at..at + 4096] == beat_block(n)[..],
            "{}: block {n} is not beat {n}'s",
            disk.display()
        );
    }
    // Killed between a write and its line, the guest may have written
    // one more; nothing beyond that.
    let after = (last as usize + 2) * 4096;
    assert!(
        bytes[after..after + 4096].iter().all(|&b| b == 0),
        "{}: nothing written after beat {}",
        disk.display(),
        last + 1
    );
}

/// The guest's uptime (ms, its boot clock) at beat `n`.
pub fn uptime_at(console: &str, n: u32) -> Option<u64> {
    let whole = console.rfind('\n').map_or("", |i| &console[..=i]);
    agent_all(whole)
        .remove("beat")?
        .iter()
        .find(|b| b.get("n").and_then(|v| v.parse().ok()) == Some(n))?
        .get("uptime_ms")?
        .parse()
        .ok()
}

/// The beats of a restored guest: they start right after the last one of
/// `before` (the console up to the snapshot), all with the memory pattern
/// intact and the disk write done, and the guest's clock goes on from
/// where it was (restored kvmclock: no reset, no jump).
pub fn check_continued(console: &str, before: &str, who: &str) -> u32 {
    let last = beats(before).iter().map(|b| b.0).max().unwrap();
    // A line the guest was printing when it was paused is split: its start
    // is the end of `before`, its rest the start of `console`.
    let unfinished = before.rfind('\n').map_or(before, |i| &before[i + 1..]);
    let console = &format!("{unfinished}{console}");
    let b = beats(console);
    assert!(
        !b.is_empty(),
        "{who}: no beat after the restore:\n{console}"
    );
    assert_eq!(
        b[0].0,
        last + 1,
        "{who}: the beats go on from {last}:\n{console}"
    );
    for w in b.windows(2) {
        assert_eq!(w[1].0, w[0].0 + 1, "{who}: beats in order");
    }
    assert!(
        b.iter().all(|&(_, mem, disk)| mem && disk),
        "{who}: memory pattern intact and disk writes done:\n{console}"
    );
    assert!(
        !console.contains("Linux version"),
        "{who}: no second boot:\n{console}"
    );
    let (t0, t1) = (
        uptime_at(before, last).unwrap(),
        uptime_at(console, last + 1).unwrap(),
    );
    assert!(
        t0 < t1 && t1 < t0 + 10_000,
        "{who}: the guest's clock goes on (beat {last} at {t0} ms, the next at {t1} ms)"
    );
    b.last().unwrap().0
}
