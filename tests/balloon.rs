//! virtio-balloon with a real guest, driven through Firecracker's API on
//! the real socket, measured from the host: ember's resident memory
//! (/proc/PID/status VmRSS) falls when the balloon inflates and when the
//! guest reports memory it freed; statistics arrive every interval. A
//! snapshot keeps the balloon: restored, it has its size, its statistics
//! and answers the next target.

use std::path::Path;
use std::time::{Duration, Instant};

use ember_tests::http::Api;
use ember_tests::{guest_kernel_dir, kvm_available, proc_kib, spawn_ember, TempDir};

const TIMEOUT: Duration = Duration::from_secs(600);

fn rss_mib(pid: i32) -> u64 {
    proc_kib(&format!("/proc/{pid}/status"), "VmRSS").map_or(0, |kib| kib / 1024)
}

/// Polls `f` every 200 ms until it returns true or `limit` passes.
fn wait_until(limit: Duration, mut f: impl FnMut() -> bool) -> bool {
    let t = Instant::now();
    while t.elapsed() < limit {
        if f() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    false
}

fn metrics_lines(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// A 256 MiB guest whose memory is all resident (prefault): inflating the
/// balloon to 128 MiB gives about that much back to the host; deflating
/// returns it to the guest; statistics come every second.
#[test]
fn balloon_inflate_gives_memory_back_deflate_returns_it_and_stats_arrive_each_second() {
    if !kvm_available(
        "balloon_inflate_gives_memory_back_deflate_returns_it_and_stats_arrive_each_second",
    ) {
        return;
    }
    let dir = TempDir::new("balloon");
    let sock = dir.path("api.sock");
    let metrics = dir.path("metrics.json");
    let kernel = guest_kernel_dir().join("vmlinux");
    let mut vm = spawn_ember(
        &[
            "--api-sock",
            sock.to_str().unwrap(),
            "--metrics-path",
            metrics.to_str().unwrap(),
            "--kernel",
            kernel.to_str().unwrap(),
            "--memory",
            "size=256,prefault=on",
            "--balloon",
            "amount_mib=0,deflate_on_oom=on,stats_polling_interval_s=1",
            "--log-level",
            "info",
            "--cmdline",
            "console=ttyS0 reboot=k panic=1 quiet ember.agent=on ember.sleep=600",
        ],
        b"",
    );
    let up = vm.wait_for_output("EMBER-AGENT sleeping", TIMEOUT);
    let pid = vm.pid();
    let mut api = Api::connect(&sock);
    let before = rss_mib(pid);
    let config = api.call("GET", "/balloon", None, 200).json();
    // Statistics: the guest's totals, then a count every second.
    let stats_ready = wait_until(Duration::from_secs(20), || {
        api.call("GET", "/balloon/statistics", None, 200).json()["total_memory"]
            .as_u64()
            .is_some()
    });
    let total_before = api.call("GET", "/balloon/statistics", None, 200).json()["free_memory"]
        .as_u64()
        .unwrap_or(0);
    api.call(
        "PUT",
        "/actions",
        Some(r#"{"action_type":"FlushMetrics"}"#),
        204,
    );
    std::thread::sleep(Duration::from_secs(4));
    api.call(
        "PUT",
        "/actions",
        Some(r#"{"action_type":"FlushMetrics"}"#),
        204,
    );
    let lines = metrics_lines(&metrics);
    let updates = |i: usize| {
        lines.get(i).map_or(0, |l| {
            l["balloon"]["stats_updates_count"].as_u64().unwrap_or(0)
        })
    };
    let n = lines.len();
    let per_4s = updates(n.saturating_sub(1)).saturating_sub(updates(n.saturating_sub(2)));

    // Inflate by half the guest's memory.
    let t = Instant::now();
    api.call("PATCH", "/balloon", Some(r#"{"amount_mib":128}"#), 204);
    let inflated = wait_until(Duration::from_secs(120), || {
        api.call("GET", "/balloon/statistics", None, 200).json()["actual_mib"].as_u64() == Some(128)
    });
    let inflate_s = t.elapsed().as_secs_f64();
    let after_inflate = rss_mib(pid);
    let stats = api.call("GET", "/balloon/statistics", None, 200).json();
    let target = (stats["target_pages"].as_u64(), stats["target_mib"].as_u64());
    // The guest's totals shrink once it has sent new statistics.
    std::thread::sleep(Duration::from_millis(2500));
    let total_inflated = api.call("GET", "/balloon/statistics", None, 200).json()["free_memory"]
        .as_u64()
        .unwrap_or(0);

    // A snapshot with the balloon inflated: its pages are holes in the
    // memory file.
    let state_file = dir.path("vm.state");
    let mem_file = dir.path("vm.mem");
    api.call("PATCH", "/vm", Some(r#"{"state": "Paused"}"#), 204);
    api.call(
        "PUT",
        "/snapshot/create",
        Some(&format!(
            r#"{{"snapshot_path": "{}", "mem_file_path": "{}"}}"#,
            state_file.display(),
            mem_file.display()
        )),
        204,
    );
    api.call("PATCH", "/vm", Some(r#"{"state": "Resumed"}"#), 204);
    let mem_file_mib = std::fs::metadata(&mem_file)
        .map(|m| (std::os::unix::fs::MetadataExt::blocks(&m) * 512) >> 20)
        .unwrap_or(u64::MAX);

    // Deflate: the guest gets its memory back.
    api.call("PATCH", "/balloon", Some(r#"{"amount_mib":0}"#), 204);
    let deflated = wait_until(Duration::from_secs(120), || {
        api.call("GET", "/balloon/statistics", None, 200).json()["actual_mib"].as_u64() == Some(0)
    });
    std::thread::sleep(Duration::from_millis(2500));
    let total_after = api.call("GET", "/balloon/statistics", None, 200).json()["free_memory"]
        .as_u64()
        .unwrap_or(0);
    // Bad input changes nothing: more than the guest has, a stats toggle.
    let too_big = api
        .call("PATCH", "/balloon", Some(r#"{"amount_mib":1000}"#), 400)
        .fault();
    let toggle = api
        .call(
            "PATCH",
            "/balloon/statistics",
            Some(r#"{"stats_polling_interval_s":0}"#),
            400,
        )
        .fault();
    let put_late = api
        .call(
            "PUT",
            "/balloon",
            Some(r#"{"amount_mib":1,"deflate_on_oom":false}"#),
            400,
        )
        .fault();
    let still = api.call("GET", "/balloon", None, 200).json();
    vm.signal(libc::SIGTERM);
    let run = vm.finish(TIMEOUT);

    // The snapshot restored in another ember: the balloon is as it was
    // (128 MiB, statistics on), the held statistics buffer comes back, and
    // the restored guest deflates when asked.
    let sock2 = dir.path("api2.sock");
    let restored = spawn_ember(&["--api-sock", sock2.to_str().unwrap()], b"");
    let mut api2 = Api::connect(&sock2);
    api2.call(
        "PUT",
        "/snapshot/load",
        Some(&format!(
            r#"{{"snapshot_path": "{}", "mem_backend": {{"backend_type": "File", "backend_path": "{}"}}, "resume_vm": true}}"#,
            state_file.display(),
            mem_file.display()
        )),
        204,
    );
    let restored_config = api2.call("GET", "/balloon", None, 200).json();
    let restored_stats = wait_until(Duration::from_secs(30), || {
        let s = api2.call("GET", "/balloon/statistics", None, 200).json();
        s["actual_mib"].as_u64() == Some(128) && s["free_memory"].as_u64().is_some()
    });
    api2.call("PATCH", "/balloon", Some(r#"{"amount_mib":0}"#), 204);
    let restored_deflated = wait_until(Duration::from_secs(120), || {
        api2.call("GET", "/balloon/statistics", None, 200).json()["actual_mib"].as_u64() == Some(0)
    });
    restored.signal(libc::SIGTERM);
    let run2 = restored.finish(TIMEOUT);
    run2.check(
        restored_config["amount_mib"] == 128 && restored_config["stats_polling_interval_s"] == 1,
        &format!("the restored balloon has its size and interval: {restored_config}"),
    );
    run2.check(
        restored_stats,
        "the restored balloon holds 128 MiB and gets statistics",
    );
    run2.check(restored_deflated, "the restored guest deflated to 0");

    run.check(up, "the guest came up");
    run.check(
        config["amount_mib"] == 0
            && config["deflate_on_oom"] == true
            && config["stats_polling_interval_s"] == 1,
        &format!("GET /balloon reports the configuration: {config}"),
    );
    run.check(
        before >= 256,
        &format!("prefaulted: ember's RSS {before} MiB holds the guest's 256"),
    );
    run.check(stats_ready, "statistics arrived");
    run.check(
        (2..=6).contains(&per_4s),
        &format!("statistics every second: {per_4s} updates in 4 s"),
    );
    run.check(inflated, "the balloon reached 128 MiB");
    run.check(
        target == (Some(32768), Some(128)),
        &format!("target {target:?}"),
    );
    run.check(
        before.saturating_sub(after_inflate) >= 110,
        &format!("inflating 128 MiB dropped ember's RSS from {before} to {after_inflate} MiB"),
    );
    run.check(
        total_before.saturating_sub(total_inflated) >= 110 << 20,
        &format!("the guest's free memory fell by the balloon: {total_before} -> {total_inflated}"),
    );
    run.check(
        mem_file_mib + 100 <= 256,
        &format!("the inflated pages are holes in the snapshot's memory file: {mem_file_mib} MiB on disk"),
    );
    run.check(deflated, "the balloon deflated to 0");
    run.check(
        total_after + (16 << 20) >= total_before,
        &format!("deflating gave the guest its memory back: free {total_after} vs {total_before}"),
    );
    run.check(
        too_big.contains("amount_mib = 1000 is more than the guest's 256 MiB"),
        &too_big,
    );
    run.check(toggle.contains("cannot be disabled after boot"), &toggle);
    run.check(
        put_late.contains("not supported after starting the microVM"),
        &put_late,
    );
    run.check(still["amount_mib"] == 0, "refused requests changed nothing");
    eprintln!(
        "balloon: RSS {before} -> {after_inflate} MiB inflating 128 MiB in {inflate_s:.2} s ({:.0} MiB/s); guest free {} -> {} -> {} MiB; {per_4s} stats in 4 s",
        128.0 / inflate_s,
        total_before >> 20,
        total_inflated >> 20,
        total_after >> 20
    );
}

/// Free page reporting: the guest's agent touches 160 MiB, then frees it;
/// the guest reports the free pages and ember's RSS falls without any
/// balloon target.
#[test]
fn balloon_free_page_reporting_returns_memory_the_guest_freed() {
    if !kvm_available("balloon_free_page_reporting_returns_memory_the_guest_freed") {
        return;
    }
    let kernel = guest_kernel_dir().join("vmlinux");
    let mut vm = spawn_ember(
        &[
            "--kernel",
            kernel.to_str().unwrap(),
            "--memory",
            "256",
            "--balloon",
            "amount_mib=0,free_page_reporting=on",
            "--cmdline",
            "console=ttyS0 reboot=k panic=1 quiet ember.agent=on ember.hog=160:3 ember.sleep=600",
        ],
        b"",
    );
    let touched = vm.wait_for_output("EMBER-AGENT hog touched", TIMEOUT);
    let pid = vm.pid();
    let high = rss_mib(pid);
    let freed = vm.wait_for_output("EMBER-AGENT hog freed", TIMEOUT);
    let t = Instant::now();
    let mut low = high;
    let returned = wait_until(Duration::from_secs(60), || {
        low = rss_mib(pid);
        high.saturating_sub(low) >= 120
    });
    let took = t.elapsed().as_secs_f64();
    vm.signal(libc::SIGTERM);
    let run = vm.finish(TIMEOUT);
    run.check(touched && freed, "the agent touched and freed its memory");
    run.check(
        high >= 160,
        &format!("ember's RSS {high} MiB holds the touched memory"),
    );
    run.check(
        returned,
        &format!("free page reporting returned the freed memory: RSS {high} -> {low} MiB"),
    );
    eprintln!(
        "free page reporting: RSS {high} -> {low} MiB, {took:.1} s after the guest freed 160 MiB"
    );
}
