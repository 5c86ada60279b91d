//! Firecracker's API over the real Unix socket, driven by an HTTP client:
//! configuration, bad input and its clear errors, and (under KVM) a real
//! guest started, paused and resumed through the API alone. Every
//! response is checked against Firecracker's published spec.

use std::path::Path;
use std::time::{Duration, Instant};

use ember_tests::http::{Api, Client};
use ember_tests::{agent_lines, guest_kernel_dir, kvm_available, spawn_ember, Running, TempDir};

const CONNECT: Duration = Duration::from_secs(20);

fn start_api(dir: &TempDir) -> (Running, std::path::PathBuf) {
    let sock = dir.path("api.sock");
    let ember = spawn_ember(
        &["--api-sock", sock.to_str().unwrap(), "--id", "vm-test"],
        b"",
    );
    (ember, sock)
}

fn fd_count(pid: i32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

fn rss_kib(pid: i32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

#[test]
fn api_bad_input_gets_clear_errors_and_ember_keeps_serving() {
    let dir = TempDir::new("api-bad");
    let (ember, sock) = start_api(&dir);
    let mut api = Api::connect(&sock);

    // The socket is private to its owner.
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&sock).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "socket mode {mode:o}");

    let info = api.call("GET", "/", None, 200).json();
    assert_eq!(info["state"], "Not started");
    assert_eq!(info["id"], "vm-test");
    let v = api.call("GET", "/version", None, 200).json();
    assert!(v["firecracker_version"]
        .as_str()
        .unwrap()
        .starts_with(char::is_numeric));

    let mc = "/machine-config";
    let bad_machine = [
        ("{", "malformed JSON"),
        (
            r#"{"vcpu_count": 2, "mem_size_mib": 256, "foo": 1}"#,
            "unknown field",
        ),
        (
            r#"{"vcpu_count": "two", "mem_size_mib": 256}"#,
            "wrong type",
        ),
        (r#"{"vcpu_count": 2}"#, "missing field"),
        (r#"{"vcpu_count": 0, "mem_size_mib": 256}"#, "zero vCPUs"),
        (r#"{"vcpu_count": 2, "mem_size_mib": 0}"#, "zero memory"),
        (
            r#"{"vcpu_count": -1, "mem_size_mib": 256}"#,
            "negative vCPUs",
        ),
        (
            r#"{"vcpu_count": 2, "mem_size_mib": 256, "smt": true}"#,
            "SMT",
        ),
    ];
    for (body, what) in bad_machine {
        let r = api.call("PUT", mc, Some(body), 400);
        eprintln!("{what}: {}", r.fault());
    }
    // Nothing changed.
    let m = api.call("GET", mc, None, 200).json();
    assert_eq!(m["vcpu_count"], 1);
    assert_eq!(m["mem_size_mib"], 128);
    api.call(
        "PUT",
        mc,
        Some(r#"{"vcpu_count": 2, "mem_size_mib": 256}"#),
        204,
    );
    api.call("PATCH", mc, Some(r#"{"mem_size_mib": 192}"#), 204);
    let m = api.call("GET", mc, None, 200).json();
    assert_eq!(
        (m["vcpu_count"].as_u64(), m["mem_size_mib"].as_u64()),
        (Some(2), Some(192))
    );

    let r = api.call(
        "PUT",
        "/boot-source",
        Some(r#"{"kernel_image_path": "/nonexistent/vmlinux"}"#),
        400,
    );
    assert!(r.fault().contains("/nonexistent/vmlinux"), "{r:?}");
    // A drive whose id differs from the path's, and one whose file is missing.
    api.call(
        "PUT",
        "/drives/root",
        Some(r#"{"drive_id": "other", "path_on_host": "/x", "is_root_device": true}"#),
        400,
    );
    api.call(
        "PUT",
        "/drives/root",
        Some(r#"{"drive_id": "root", "path_on_host": "/nonexistent.img", "is_root_device": true}"#),
        400,
    );
    let img = dir.write("disk.img", &vec![0u8; 1 << 20]);
    let drive = format!(
        r#"{{"drive_id": "root", "path_on_host": "{}", "is_root_device": true, "is_read_only": false}}"#,
        img.display()
    );
    api.call("PUT", "/drives/root", Some(&drive), 204);
    api.call(
        "PUT",
        "/network-interfaces/eth0",
        Some(r#"{"iface_id": "eth0", "host_dev_name": "tap0", "guest_mac": "01:00:5e:00:00:01"}"#),
        400,
    );
    // Rate limits: a bucket without its refill time is refused; a good
    // one is kept (GET /vm/config shows it); a PATCH needs a running VM.
    api.call(
        "PUT",
        "/network-interfaces/eth0",
        Some(r#"{"iface_id": "eth0", "host_dev_name": "tap0", "rx_rate_limiter": {"bandwidth": {"size": 1000}}}"#),
        400,
    );
    api.call(
        "PUT",
        "/network-interfaces/eth0",
        Some(r#"{"iface_id": "eth0", "host_dev_name": "tap0", "tx_rate_limiter": {"bandwidth": {"size": 1048576, "refill_time": 1000}, "ops": {"size": 100, "refill_time": 1000}}}"#),
        204,
    );
    let cfg = api.call("GET", "/vm/config", None, 200).json();
    assert_eq!(
        cfg["network-interfaces"][0]["tx_rate_limiter"]["bandwidth"]["size"], 1048576,
        "{cfg}"
    );
    assert_eq!(
        cfg["network-interfaces"][0]["tx_rate_limiter"]["ops"]["size"],
        100
    );
    let patched = api.call(
        "PATCH",
        "/network-interfaces/eth0",
        Some(r#"{"iface_id": "eth0", "rx_rate_limiter": {"bandwidth": {"size": 1000, "refill_time": 100}}}"#),
        400,
    );
    assert!(patched.fault().contains("before starting"), "{patched:?}");
    // The balloon before boot: no device yet, then one, changed, read back;
    // a bad body changes nothing.
    api.call("GET", "/balloon", None, 400);
    api.call(
        "PUT",
        "/balloon",
        Some(r#"{"amount_mib": 4096, "deflate_on_oom": true}"#),
        400,
    );
    api.call(
        "PUT",
        "/balloon",
        Some(r#"{"amount_mib": 8, "deflate_on_oom": true, "stats_polling_interval_s": 2}"#),
        204,
    );
    api.call("PATCH", "/balloon", Some(r#"{"amount_mib": 16}"#), 204);
    api.call("PATCH", "/balloon", Some(r#"{"amount_mib": -1}"#), 400);
    let b = api.call("GET", "/balloon", None, 200).json();
    assert_eq!(
        (
            b["amount_mib"].as_u64(),
            b["deflate_on_oom"].as_bool(),
            b["stats_polling_interval_s"].as_u64()
        ),
        (Some(16), Some(true), Some(2)),
        "{b}"
    );
    api.call("GET", "/balloon/statistics", None, 400);
    // Endpoints of later devices say they are not supported, never 204.
    for (method, path, body) in [
        ("PATCH", "/balloon/hinting/start", "{}"),
        ("PUT", "/serial", r#"{"serial_out_path": "/tmp/s"}"#),
        ("PUT", "/mmds/config", "{}"),
        (
            "PUT",
            "/snapshot/create",
            r#"{"snapshot_path": "/tmp/s", "mem_file_path": "/tmp/m"}"#,
        ),
    ] {
        let r = api.call(method, path, Some(body), 400);
        assert!(
            r.fault().contains("not supported"),
            "{method} {path}: {r:?}"
        );
    }
    // vsock bodies the spec or a Unix socket address cannot take.
    let long = format!("/tmp/{}", "v".repeat(100));
    for (body, why) in [
        (
            r#"{"guest_cid": 2, "uds_path": "/tmp/v.sock"}"#.to_string(),
            "guest_cid = 2 is not a guest context id",
        ),
        (
            r#"{"uds_path": "/tmp/v.sock"}"#.to_string(),
            "missing field `guest_cid`",
        ),
        (
            format!(r#"{{"guest_cid": 3, "uds_path": "{long}"}}"#),
            "must fit a Unix socket address",
        ),
    ] {
        let r = api.call("PUT", "/vsock", Some(&body), 400);
        assert!(r.fault().contains(why), "{body}: {r:?}");
    }
    let r = api.call(
        "PUT",
        "/entropy",
        Some(r#"{"rate_limiter": {"ops": {"size": 1}}}"#),
        400,
    );
    assert!(r.fault().contains("refill_time"), "{r:?}");
    // Unknown path and method.
    let r = api.client.request("GET", "/no-such-thing", None);
    assert_eq!(r.status, 400, "{r:?}");
    assert!(!r.fault().is_empty());
    let r = api.client.request("DELETE", "/machine-config", None);
    assert_eq!(r.status, 400, "{r:?}");
    // Starting without a kernel fails clearly and changes nothing.
    let r = api.call(
        "PUT",
        "/actions",
        Some(r#"{"action_type": "InstanceStart"}"#),
        400,
    );
    assert!(r.fault().contains("kernel"), "{r:?}");
    // Cloud Hypervisor's power button (not in Firecracker's spec).
    let r = api.client.request("PUT", "/api/v1/vm.power-button", None);
    assert_eq!(r.status, 400, "{r:?}");
    assert!(r.fault().contains("before starting"), "{r:?}");
    assert_eq!(api.state(), "Not started");
    api.call("PATCH", "/vm", Some(r#"{"state": "Paused"}"#), 400);

    // Logger and metrics (before start, as in Firecracker).
    let log = dir.path("ember.log");
    let metrics = dir.path("metrics.json");
    api.call(
        "PUT",
        "/logger",
        Some(&format!(
            r#"{{"log_path": "{}", "level": "Debug", "show_level": true, "show_log_origin": true}}"#,
            log.display()
        )),
        204,
    );
    api.call(
        "PUT",
        "/logger",
        Some(r#"{"log_path": "/nonexistent/dir/ember.log"}"#),
        400,
    );
    api.call(
        "PUT",
        "/metrics",
        Some(&format!(
            r#"{{"metrics_path": "{}", "emit_id": true}}"#,
            metrics.display()
        )),
        204,
    );
    api.call("GET", "/", None, 200);
    api.call(
        "PUT",
        "/actions",
        Some(r#"{"action_type": "FlushMetrics"}"#),
        204,
    );
    let line = std::fs::read_to_string(&metrics).unwrap();
    let m: serde_json::Value = serde_json::from_str(line.lines().last().unwrap()).unwrap();
    assert_eq!(m["id"], "vm-test", "{line}");
    // Refused in the API thread (malformed, out of range) or by the VMM.
    assert!(
        m["api_server"]["bad_requests_count"].as_u64().unwrap() >= 7,
        "{line}"
    );
    assert!(
        m["put_api_requests"]["machine_cfg_fails"].as_u64().unwrap() >= 1,
        "{line}"
    );
    assert!(
        m["get_api_requests"]["instance_info_count"]
            .as_u64()
            .unwrap()
            >= 2,
        "{line}"
    );
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        text.lines().any(|l| l.contains("[vm-test:")
            && l.contains(":DEBUG:")
            && l.contains("GetInstanceInfo")),
        "the log file has the API's debug lines with level and origin: {text}"
    );

    // SIGHUP reopens the log file (after a rotation, say).
    let rotated = dir.path("ember.log.1");
    std::fs::rename(&log, &rotated).unwrap();
    ember.signal(libc::SIGHUP);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !log.exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    api.call("GET", "/version", None, 200);
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(
        text.contains("GetVersion"),
        "the reopened log gets the new lines: {text}"
    );

    // The configuration as a whole, usable as a --config-file.
    let full = api.call("GET", "/vm/config", None, 200).json();
    assert_eq!(full["machine-config"]["mem_size_mib"], 192);
    assert_eq!(full["drives"][0]["drive_id"], "root");
    assert_eq!(full["drives"][0]["is_root_device"], true);

    // A body over the limit: 400, and the connection is closed.
    let mut big = Client::connect(&sock, CONNECT);
    let huge = format!(r#"{{"kernel_image_path": "{}"}}"#, "a".repeat(60_000));
    let r = big.request("PUT", "/boot-source", Some(&huge));
    assert_eq!(r.status, 400, "{r:?}");
    assert!(big.closed_by_server(Duration::from_secs(5)));
    // A request cut off mid-body does not hold up anyone else.
    let mut cut = Client::connect(&sock, CONNECT);
    cut.send_raw(b"PUT /machine-config HTTP/1.1\r\nContent-Length: 100\r\n\r\n{\"vcpu");
    assert_eq!(api.call("GET", "/", None, 200).status, 200);
    drop(cut);

    // 1000 requests: all answered, nothing leaks.
    let pid = ember.pid();
    for _ in 0..50 {
        api.call("GET", "/", None, 200);
    }
    let (fds, rss) = (fd_count(pid), rss_kib(pid));
    let t = Instant::now();
    for i in 0..1000 {
        if i % 2 == 0 {
            api.client.request("GET", "/", None);
        } else {
            let r = api
                .client
                .request("PUT", mc, Some(r#"{"vcpu_count": 0, "mem_size_mib": 1}"#));
            assert_eq!(r.status, 400);
        }
    }
    eprintln!("1000 requests in {:?}", t.elapsed());
    let (fds2, rss2) = (fd_count(pid), rss_kib(pid));
    assert_eq!(fds, fds2, "fds before and after 1000 requests");
    assert!(
        rss2 <= rss + 256,
        "RSS {rss} KiB -> {rss2} KiB after 1000 requests"
    );

    // A second ember cannot take a live socket.
    let second = spawn_ember(&["--api-sock", sock.to_str().unwrap()], b"");
    let run = second.finish(Duration::from_secs(20));
    assert_ne!(run.code(), 0);
    assert!(run.stderr.contains("api.sock"), "{}", run.stderr);
    assert!(!run.stderr.contains("panicked"), "{}", run.stderr);

    // SIGTERM ends it cleanly and removes the socket.
    drop(api);
    ember.signal(libc::SIGTERM);
    let run = ember.finish(Duration::from_secs(20));
    assert_eq!(run.code(), 128 + libc::SIGTERM, "{}", run.stderr);
    assert!(!run.stderr.contains("panicked"), "{}", run.stderr);
    assert!(!sock.exists(), "the socket is removed at exit");
}

#[test]
fn firecracker_command_line_version_and_config_file_errors() {
    let run = ember_tests::run_ember(&["--version"], b"", Duration::from_secs(10));
    assert_eq!(run.code(), 0);
    let first = run.stdout.lines().next().unwrap_or("");
    let version = first.split(' ').nth(1).unwrap_or("");
    assert!(first.starts_with("ember v"), "{first}");
    let parts: Vec<u32> = version
        .trim_start_matches('v')
        .split('.')
        .map(|p| p.parse().unwrap())
        .collect();
    // Kata refuses a Firecracker older than 0.21.1.
    assert!(parts >= vec![0, 21, 1], "{version}");

    let dir = TempDir::new("fc-config");
    for (body, needle) in [
        (
            r#"{"machine-config": {"vcpu_count": 1, "mem_size_mib": 128, "x": 1}}"#,
            "unknown field",
        ),
        (
            r#"{"boot-source": {"kernel_image_path": "/nonexistent/k"}}"#,
            "/nonexistent/k",
        ),
        ("not json", "config.json"),
    ] {
        let path = dir.write("config.json", body.as_bytes());
        let run = ember_tests::run_ember(
            &["--no-api", "--config-file", path.to_str().unwrap()],
            b"",
            Duration::from_secs(20),
        );
        ember_tests::assert_clean_error(&run, &[needle]);
    }
}

#[test]
fn api_stale_socket_file_is_replaced() {
    let dir = TempDir::new("api-stale");
    let sock = dir.path("api.sock");
    // A socket file nobody listens on.
    drop(std::os::unix::net::UnixListener::bind(&sock).unwrap());
    assert!(sock.exists());
    let ember = spawn_ember(&["--api-sock", sock.to_str().unwrap()], b"");
    let mut c = Client::connect(&sock, CONNECT);
    assert_eq!(c.request("GET", "/", None).status, 200);
    ember.signal(libc::SIGTERM);
    let run = ember.finish(Duration::from_secs(20));
    assert_eq!(run.code(), 128 + libc::SIGTERM, "{}", run.stderr);
}

fn guest_time(console: &str, needle: &str) -> f64 {
    console
        .lines()
        .find(|l| l.contains(needle))
        .and_then(|l| l.split(']').next())
        .and_then(|l| l.trim_start_matches('[').trim().parse().ok())
        .unwrap_or_else(|| panic!("no timestamped line with {needle:?} in:\n{console}"))
}

#[test]
fn api_real_guest_starts_pauses_resumes_and_ctrl_alt_del_ends_it() {
    if !kvm_available("api_real_guest_starts_pauses_resumes_and_ctrl_alt_del_ends_it") {
        return;
    }
    const PAUSE: Duration = Duration::from_secs(10);
    let kernel = guest_kernel_dir().join("vmlinux");
    let dir = TempDir::new("api-guest");
    let (mut ember, sock) = start_api(&dir);
    let mut api = Api::connect(&sock);
    let mc = "/machine-config";
    api.call(
        "PUT",
        mc,
        Some(r#"{"vcpu_count": 2, "mem_size_mib": 128}"#),
        204,
    );
    // The agent sleeps far longer than the test: only Ctrl-Alt-Del ends it.
    let boot = format!(
        r#"{{"kernel_image_path": "{}", "boot_args": "console=ttyS0 reboot=k panic=1 loglevel=6 ember.agent=on ember.sleep=600"}}"#,
        kernel.display()
    );
    // A small placeholder disk, swapped for a bigger image while running
    // (as Kata does); loglevel=6 shows the driver's notice of the new size.
    let placeholder = dir.write("placeholder.img", &vec![0u8; 1 << 20]);
    let real = dir.write("real.img", &vec![0x5au8; 4 << 20]);
    let drive = format!(
        r#"{{"drive_id": "scratch", "path_on_host": "{}", "is_root_device": false}}"#,
        placeholder.display()
    );
    api.call("PUT", "/drives/scratch", Some(&drive), 204);
    let patch = format!(
        r#"{{"drive_id": "scratch", "path_on_host": "{}"}}"#,
        real.display()
    );
    api.call("PATCH", "/drives/scratch", Some(&patch), 400);
    api.call("PUT", "/boot-source", Some(&boot), 204);
    let start = r#"{"action_type": "InstanceStart"}"#;
    api.call("PUT", "/actions", Some(start), 204);
    assert_eq!(api.state(), "Running");
    // After start: configuration is refused and changes nothing.
    api.call("PUT", "/actions", Some(start), 400);
    api.call("PUT", "/boot-source", Some(&boot), 400);
    api.call(
        "PUT",
        mc,
        Some(r#"{"vcpu_count": 1, "mem_size_mib": 128}"#),
        400,
    );
    let full = api.call("GET", "/vm/config", None, 200).json();
    assert_eq!(full["machine-config"]["vcpu_count"], 2);

    assert!(
        ember.wait_for_output("EMBER-AGENT sleeping", Duration::from_secs(600)),
        "the agent reached its sleep: {}",
        ember.stdout_so_far()
    );
    let sleeping_seen = Instant::now();
    let vm = "/vm";
    api.call("PATCH", vm, Some(r#"{"state": "Paused"}"#), 204);
    let paused_at = Instant::now();
    // Idempotent, as in Firecracker.
    api.call("PATCH", vm, Some(r#"{"state": "Paused"}"#), 204);
    assert_eq!(api.state(), "Paused");
    let cad = r#"{"action_type": "SendCtrlAltDel"}"#;
    api.call("PATCH", "/drives/scratch", Some(&patch), 400);
    api.call("PUT", "/actions", Some(cad), 400);
    let button = api.client.request("PUT", "/api/v1/vm.power-button", None);
    assert_eq!(button.status, 400, "{button:?}");
    assert!(button.fault().contains("paused"), "{button:?}");
    // What the guest wrote before the pause may still be in the pipe.
    std::thread::sleep(Duration::from_secs(1));
    let before = ember.stdout_so_far();
    std::thread::sleep(PAUSE);
    let after = ember.stdout_so_far();
    assert_eq!(
        after.len(),
        before.len(),
        "the console is silent while paused: {:?}",
        &after[before.len()..]
    );
    let paused_for = paused_at.elapsed().as_secs_f64();
    api.call("PATCH", vm, Some(r#"{"state": "Resumed"}"#), 204);
    api.call("PATCH", vm, Some(r#"{"state": "Resumed"}"#), 204);
    assert_eq!(api.state(), "Running");
    // The drive swap: unknown ids are refused; the guest hears of the new
    // capacity (8192 sectors of 512 bytes).
    api.call(
        "PATCH",
        "/drives/nosuch",
        Some(r#"{"drive_id": "nosuch", "path_on_host": "/x"}"#),
        400,
    );
    api.call("PATCH", "/drives/scratch", Some(&patch), 204);
    assert!(
        ember.wait_for_output("new size: 8192", Duration::from_secs(60)),
        "the guest saw the new capacity: {}",
        ember.stdout_so_far()
    );
    let full = api.call("GET", "/vm/config", None, 200).json();
    assert_eq!(
        full["drives"][0]["path_on_host"],
        real.display().to_string()
    );
    std::thread::sleep(Duration::from_secs(3));
    // Ctrl-Alt-Del: the guest's keyboard driver reboots it, which ends ember.
    let host = sleeping_seen.elapsed().as_secs_f64();
    api.call("PUT", "/actions", Some(cad), 204);
    drop(api);
    let run = ember.finish(Duration::from_secs(300));
    let agent = agent_lines(&run.stdout);
    run.check(agent["cpus"]["online"] == "2", "two vCPUs");
    run.check(
        !agent.contains_key("done"),
        "Ctrl-Alt-Del ended the guest before its sleep did",
    );
    run.check(
        run.stdout.contains("reboot: Restarting system"),
        "the guest rebooted",
    );
    run.check(run.code() == 0, "the guest's reboot ends ember with 0");
    // The guest's clock did not advance while it was paused: from the
    // sleeping line to the reboot it saw the host's time less the pause.
    let guest = guest_time(&run.stdout, "reboot: Restarting system")
        - guest_time(&run.stdout, "EMBER-AGENT sleeping");
    let want = host - paused_for;
    run.check(
        (guest - want).abs() < 3.0,
        &format!(
            "guest saw {guest:.2} s between the lines, the host {host:.2} s with a {paused_for:.2} s pause"
        ),
    );
    run.check(!Path::new(&sock).exists(), "the socket is removed at exit");
    run.check(!run.stderr.contains("panicked"), "no panic");
}
