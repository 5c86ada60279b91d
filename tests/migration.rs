//! Live migration between two "hosts": network namespaces joined by a veth
//! pair, one ember in each, the guest's disk on a path both see, a tap of
//! the same name and address in each (routed, not bridged).
//!
//! One boot of a real Linux guest whose test agent beats once a second
//! (checks a memory pattern, writes and syncs a numbered disk block,
//! prints a line) carries every check:
//!
//! 1. failures first, each leaving the guest running at the source with
//!    nothing lost: a destination whose CPU lacks a feature the guest uses
//!    (refused before memory moves, naming it), a destination without the
//!    guest's tap (it fails after the source let go of the disks: the
//!    source takes them back and resumes), a destination that is not
//!    there, or disappears at each phase of the stream (connected, after
//!    the start, mid-memory, at a round's end, after the state with the
//!    guest paused, after the disks were released), and a cancel
//!    mid-migration;
//! 2. a migration over TCP on the veth link to an ember driven through
//!    Cloud Hypervisor's API (`vm.receive-migration`), with the guest
//!    pinged from both namespaces: the source exits 0, the guest goes on
//!    at the destination (no reboot, next beat, memory and disk intact,
//!    clock continuous), answers pings there, and the destination tap
//!    sees the announce (RARP) frames; the ping gap is reported;
//! 3. a local migration (memory and tap handed over as descriptors) to an
//!    `ember --incoming` on the same host, the source killed right after
//!    the hand-over: the guest runs on;
//! 4. a copy over a Unix socket to a third host;
//! 5. a move over a rate-limited link (tc) slower than the guest dirties
//!    memory: the pre-copy rounds stop shrinking, the migration switches
//!    to post-copy by itself, the guest runs at the destination while its
//!    last pages follow, and every page is in its latest generation (the
//!    beat rewrites a word of each page once a second and checks it).
//!
//! The host then reads the disk and checks every block the guest wrote.
//! A second test feeds a destination bad streams without any guest.

use std::io::Write;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use ember_tests::beat::{beats, check_continued, check_disk, wait_beat};
use ember_tests::http::{Api, Client};
use ember_tests::peer::{destination, Vanish, VANISH_AT};
use ember_tests::{
    guest_kernel_dir, kvm_available, mapping_flags, netns_available, spawn_ember,
    spawn_ember_in_netns, spawn_ember_in_netns_env, thread_cpus, NetNs, Running, TempDir,
};
use serde_json::Value;

const BOOT: Duration = Duration::from_secs(300);
const HOST: &str = "10.205.0.1";
const GUEST: &str = "10.205.0.2";
const LINK_B: &str = "10.206.0.2";
const DISK_BYTES: usize = 4 << 20;
/// The beat's buffer: every page of it rewritten once a second, 24 MiB/s,
/// more than the rate-limited link of step 5 carries.
const BEAT_MIB: u32 = 24;
const LINK_E: &str = "10.207.0.2";
/// The rate of that link (tc tbf): 10 MB/s.
const SLOW_LINK: &str = "80mbit";

fn cmdline() -> String {
    format!(
        "console=ttyS0 quiet panic=1 ember.agent=on ember.sleep=3600 \
         ember.beat=vda:3600:{BEAT_MIB} ip={GUEST}::{HOST}:255.255.255.0::eth0:off"
    )
}

fn status(api: &mut Api) -> Value {
    let r = api
        .client
        .request("GET", "/api/v1/vm.migration-status", None);
    assert_eq!(r.status, 200, "{r:?}");
    r.json()
}

/// Polls the migration status until its state is one of `want`.
fn wait_state(api: &mut Api, want: &[&str], timeout: Duration) -> Value {
    let deadline = Instant::now() + timeout;
    loop {
        let s = status(api);
        if want.contains(&s["state"].as_str().unwrap_or("")) {
            return s;
        }
        assert!(Instant::now() < deadline, "migration never {want:?}: {s}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn send(api: &mut Api, url: &str) {
    // ch-remote's body, every field.
    let body = format!(
        r#"{{"destination_url":"{url}","local":false,"preserve_source":false,"downtime_ms":300,"timeout_s":3600,"timeout_strategy":"Cancel","connections":1,"tls_dir":null,"memory_mode":"Precopy"}}"#
    );
    let r = api
        .client
        .request("PUT", "/api/v1/vm.send-migration", Some(&body));
    assert_eq!(r.status, 204, "send-migration to {url}: {r:?}");
}

fn wait_path(p: &Path) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !p.exists() {
        assert!(Instant::now() < deadline, "{} never appeared", p.display());
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Waits for a TCP listener on `port` (":6000") in `ns`.
fn wait_listening(ns: &NetNs, port: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !ns.exec(&["ss", "-ltn"]).unwrap_or_default().contains(port) {
        assert!(Instant::now() < deadline, "the destination never listened");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A failed migration: the guest beats on at the source, every beat good.
fn goes_on_at_source(source: &mut Running, what: &str) -> u32 {
    let last = beats(&source.stdout_so_far()).last().map_or(0, |b| b.0);
    let out = wait_beat(source, last + 2, BOOT);
    let b = beats(&out);
    assert!(
        b.iter().any(|x| x.0 >= last + 2) && b.iter().all(|&(_, m, d)| m && d),
        "{what}: the guest runs on at the source:\n{out}"
    );
    last + 2
}

fn ping_log(ns: &NetNs, count: u32) -> std::process::Child {
    Command::new("ip")
        .args([
            "netns", "exec", &ns.name, "ping", "-D", "-n", "-i", "0.2", "-W", "1",
        ])
        .args(["-c", &count.to_string(), GUEST])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("ping")
}

/// The times (s, from `ping -D`) of the echo replies in a ping log.
fn reply_times(log: &str) -> Vec<f64> {
    log.lines()
        .filter(|l| l.contains("bytes from"))
        .filter_map(|l| l.strip_prefix('[')?.split(']').next()?.parse().ok())
        .collect()
}

#[test]
fn migration_moves_a_running_guest_between_hosts_and_survives_every_failure() {
    let name = "migration_moves_a_running_guest_between_hosts_and_survives_every_failure";
    if !kvm_available(name) || !netns_available(name) {
        return;
    }
    let dir = TempDir::new("migration");
    let kernel = guest_kernel_dir().join("vmlinux");
    let disk = dir.write("disk.img", &vec![0u8; DISK_BYTES]);
    let host_addr = format!("{HOST}/24");
    let a = NetNs::new("miga", &[("tap0", &host_addr)]).expect("netns a");
    let b = NetNs::new("migb", &[("tap0", &host_addr)]).expect("netns b");
    let c = NetNs::new("migc", &[("tap0", &host_addr)]).expect("netns c");
    let d = NetNs::new("migd", &[]).expect("netns d");
    a.link(&b, "10.206.0.1/24", &format!("{LINK_B}/24"))
        .expect("veth");
    let src_sock = dir.path("src.sock");
    let disk_flag = format!("path={}", disk.display());
    let cmd = cmdline();
    let mut source = spawn_ember_in_netns(
        &a.name,
        &[
            "--log-level",
            "info",
            "--api-sock",
            src_sock.to_str().unwrap(),
            "--kernel",
            kernel.to_str().unwrap(),
            // THP and the vCPU's pinning go with the guest, hop to hop.
            "--memory",
            "size=256,shared=on,thp=on",
            "--vcpu-affinity",
            "0=0",
            "--disk",
            &disk_flag,
            "--net",
            "tap=tap0",
            "--cmdline",
            &cmd,
        ],
        b"",
    );
    let booted = wait_beat(&mut source, 2, BOOT);
    assert!(
        beats(&booted).iter().any(|b| b.0 >= 2),
        "the guest beats:\n{booted}"
    );
    let pinged = a.exec(&["ping", "-c", "2", "-W", "5", GUEST]);
    assert!(pinged.is_ok(), "ping at the source: {pinged:?}");
    let mut api = Api::connect(&src_sock);
    assert_eq!(status(&mut api)["state"], "none");

    // 1a. A destination whose CPU lacks SSE4.2: refused before memory.
    let m1 = dir.path("m1.sock");
    let m1_url = format!("unix:{}", m1.display());
    let weak = spawn_ember_in_netns_env(
        &b.name,
        &["--incoming", &m1_url],
        &[("EMBER_TEST_HOST_CPU_REMOVE", "sse4.2")],
    );
    wait_path(&m1);
    send(&mut api, &m1_url);
    let s = wait_state(&mut api, &["failed"], Duration::from_secs(60));
    let error = s["error"].as_str().unwrap_or("");
    assert!(
        error.contains("refused") && error.contains("sse4.2"),
        "the refusal names the missing feature: {s}"
    );
    assert_eq!(s["pages_sent"], 0, "no memory moved: {s}");
    let run = weak.finish(Duration::from_secs(30));
    run.check(
        run.code() != 0,
        "the refusing destination exits with an error",
    );
    ember_tests::assert_clean_error(&run, &["sse4.2"]);
    goes_on_at_source(&mut source, "after the CPU refusal");

    // 1b. A destination without the guest's tap: it fails after the
    //     source released the disks; the source takes them back.
    let m2 = dir.path("m2.sock");
    let m2_url = format!("unix:{}", m2.display());
    let tapless = spawn_ember_in_netns(&d.name, &["--incoming", &m2_url], b"");
    wait_path(&m2);
    send(&mut api, &m2_url);
    let s = wait_state(&mut api, &["failed"], Duration::from_secs(120));
    assert!(
        s["error"].as_str().unwrap_or("").contains("tap0"),
        "the destination's failure is reported: {s}"
    );
    assert!(s["pages_sent"].as_u64().unwrap_or(0) > 0, "{s}");
    let run = tapless.finish(Duration::from_secs(30));
    ember_tests::assert_clean_error(&run, &["tap0"]);
    goes_on_at_source(&mut source, "after the destination failed to start");

    // 1c. A destination that disappears at each phase of the stream, and
    //     one that is not there at all: each time the migration fails
    //     with its reason, the log says so, and the guest runs on here.
    let mut vanished = Vec::new();
    for at in VANISH_AT {
        let m3 = dir.path("m3.sock");
        let _ = std::fs::remove_file(&m3);
        let peer = (at != Vanish::NotListening).then(|| {
            let listener = UnixListener::bind(&m3).unwrap();
            destination(listener, at)
        });
        send(&mut api, &format!("unix:{}", m3.display()));
        let s = wait_state(&mut api, &["failed"], Duration::from_secs(120));
        if let Some(peer) = peer {
            peer.join().unwrap();
        }
        let error = s["error"].as_str().unwrap_or("").to_string();
        let reason = if at == Vanish::NotListening {
            "cannot connect"
        } else {
            "the destination closed the connection"
        };
        assert!(
            error.contains(reason),
            "{at:?}: the reason is {reason:?}: {s}"
        );
        assert_eq!(api.state(), "Running", "{at:?}: the source runs the guest");
        goes_on_at_source(
            &mut source,
            &format!("after the destination vanished {at:?}"),
        );
        vanished.push((at, error));
    }
    for (at, error) in &vanished {
        eprintln!("destination vanished {at:?}: {error}");
    }
    // 1d. A destination that stops reading; the migration is cancelled.
    let m4 = dir.path("m4.sock");
    let listener = UnixListener::bind(&m4).unwrap();
    let (hold_tx, hold_rx) = std::sync::mpsc::channel::<()>();
    let stalling = std::thread::spawn(move || {
        let (conn, _) = listener.accept().unwrap();
        let mut back = conn.try_clone().unwrap();
        let mut r = ember_migration::Receiver::new(conn).unwrap();
        let _start = r.next().unwrap();
        ember_migration::write_reply(&mut back, &ember_migration::Reply::Ready).unwrap();
        // Holds the connection without reading until told.
        let _ = hold_rx.recv_timeout(Duration::from_secs(120));
    });
    send(&mut api, &format!("unix:{}", m4.display()));
    wait_state(&mut api, &["precopy"], Duration::from_secs(30));
    let r = api
        .client
        .request("PATCH", "/vm", Some(r#"{"state": "Paused"}"#));
    assert_eq!(r.status, 400, "no pause during a migration: {r:?}");
    assert!(r.fault().contains("migration is in progress"), "{r:?}");
    let r = api
        .client
        .request("PUT", "/api/v1/vm.migration-cancel", None);
    assert_eq!(r.status, 204, "{r:?}");
    let s = wait_state(&mut api, &["cancelled"], Duration::from_secs(30));
    assert!(s["error"].as_str().unwrap_or("").contains("cancel"), "{s}");
    let _ = hold_tx.send(());
    stalling.join().unwrap();
    let r = api
        .client
        .request("PUT", "/api/v1/vm.migration-cancel", None);
    assert_eq!(r.status, 400, "nothing left to cancel: {r:?}");
    goes_on_at_source(&mut source, "after the cancel");

    // 2. The real move, over TCP on the veth link, the destination driven
    //    through Cloud Hypervisor's API; pinged from both namespaces.
    let dst_sock = dir.path("dst.sock");
    let mut dest = spawn_ember_in_netns_env(
        &b.name,
        &["--api-sock", dst_sock.to_str().unwrap()],
        &[("EMBER_TEST_MIGRATION_STALL_AFTER_RELEASE_MS", "8000")],
    );
    wait_path(&dst_sock);
    let receiver = {
        let sock = dst_sock.clone();
        std::thread::spawn(move || {
            let mut c = Client::connect(&sock, Duration::from_secs(20));
            c.request(
                "PUT",
                "/api/v1/vm.receive-migration",
                Some(&format!(
                    r#"{{"receiver_url":"tcp:{LINK_B}:6000","tls_dir":null,"memory_mode":"Precopy","vfio_fds":null,"iommufd_fd":null,"zone_updates":[]}}"#
                )),
            )
        })
    };
    wait_listening(&b, ":6000");
    let capture = b.capture("tap0", Duration::from_secs(25));
    let ping_a = ping_log(&a, 60);
    let ping_b = ping_log(&b, 100);
    std::thread::sleep(Duration::from_secs(3));
    let before = source.stdout_so_far();
    let t = Instant::now();
    send(&mut api, &format!("tcp:{LINK_B}:6000"));
    let run = source.finish(Duration::from_secs(120));
    let moved_in = t.elapsed();
    run.check(run.code() == 0, "the source exits 0 once the guest moved");
    run.check(run.stderr.contains("migrated to"), "the source says so");
    run.check(!run.stderr.contains("panicked"), "no panic");
    // Every failed attempt before (CPU, tap, the vanishing peers, the
    // cancel) was logged with its reason; the three that had paused the
    // guest (no tap, gone after the state, gone after the release) say
    // it runs on here.
    let failed = run.stderr.matches("migration failed: ").count();
    let resumed = run.stderr.matches(": the guest runs on here").count();
    run.check(
        failed == 3 + VANISH_AT.len() && resumed == 3,
        &format!("each failure logged ({failed}) and the paused guest resumed ({resumed})"),
    );
    let before = before + &run.stdout;
    let reply = receiver.join().unwrap();
    assert_eq!(reply.status, 204, "receive-migration: {reply:?}");
    let last = beats(&before).iter().map(|b| b.0).max().unwrap();
    let after = wait_beat(&mut dest, last + 3, BOOT);
    let last_dest = check_continued(&after, &before, "the migrated guest");
    let pinged = b.exec(&["ping", "-c", "3", "-i", "0.3", "-W", "5", GUEST]);
    let pinged = pinged.unwrap_or_else(|e| panic!("ping at the destination: {e}"));
    assert!(pinged.contains(" 0% packet loss"), "{pinged}");
    let frames = capture.join().unwrap();
    let rarp: Vec<_> = frames
        .iter()
        .filter(|f| f.len() >= 42 && f[12..14] == [0x80, 0x35] && f[..6] == [0xff; 6])
        .collect();
    assert!(
        !rarp.is_empty(),
        "the destination announced the guest on its tap ({} frames seen)",
        frames.len()
    );
    assert!(
        rarp.iter().all(|f| f[6..12] == f[22..28]),
        "announced from the guest's MAC"
    );
    // The guest's driver was asked too (VIRTIO_NET_S_ANNOUNCE): its
    // gratuitous ARP (sender IP = target IP = its own) from the same MAC.
    let garp = frames.iter().any(|f| {
        f.len() >= 42
            && f[12..14] == [0x08, 0x06]
            && f[..6] == [0xff; 6]
            && f[6..12] == rarp[0][6..12]
            && f[28..32] == f[38..42]
    });
    assert!(garp, "the guest announced itself with a gratuitous ARP");
    let la = ping_a.wait_with_output().unwrap();
    let lb = ping_b.wait_with_output().unwrap();
    let (ta, tb) = (
        reply_times(&String::from_utf8_lossy(&la.stdout)),
        reply_times(&String::from_utf8_lossy(&lb.stdout)),
    );
    assert!(!ta.is_empty() && !tb.is_empty(), "replies on both sides");
    let gap = tb[0] - ta[ta.len() - 1];
    eprintln!(
        "migration over TCP: {:.2} s from the request to the source's exit; ping gap {:.2} s \
         (last reply at the source to first at the destination); {} announce frame(s); \
         source: {}",
        moved_in.as_secs_f64(),
        gap,
        rarp.len(),
        run.stderr
            .lines()
            .find(|l| l.contains("migrated to"))
            .unwrap_or("")
    );
    assert!(gap < 30.0, "the guest answered again at the destination");

    // 3. A local migration to `ember --incoming` on the same host: the
    //    memory (shared: the first source had it in a memfd, the TCP
    //    destination made one) and the tap are handed over as descriptors;
    //    the source, stalled after the release by the test hook, is killed.
    let m5 = dir.path("m5.sock");
    let m5_url = format!("unix:{}", m5.display());
    let hop_sock = dir.path("hop.sock");
    let mut hop = spawn_ember_in_netns(
        &b.name,
        &[
            "--log-level",
            "info",
            "--incoming",
            &m5_url,
            "--api-sock",
            hop_sock.to_str().unwrap(),
        ],
        b"",
    );
    wait_path(&m5);
    let mut dapi = Api::connect(&dst_sock);
    let before = dest.stdout_so_far();
    let r = dapi.client.request(
        "PUT",
        "/api/v1/vm.send-migration",
        Some(&format!(r#"{{"destination_url":"{m5_url}","local":true}}"#)),
    );
    assert_eq!(r.status, 204, "local send-migration: {r:?}");
    let last = beats(&before).iter().map(|b| b.0).max().unwrap();
    let after = wait_beat(&mut hop, last + 1, Duration::from_secs(60));
    assert!(
        beats(&after).iter().any(|b| b.0 > last),
        "the local destination runs the guest:\n{after}"
    );
    // The source is still in its stall: killed after the hand-over.
    dest.signal(libc::SIGKILL);
    let killed = dest.finish(Duration::from_secs(30));
    killed.check(
        std::os::unix::process::ExitStatusExt::signal(&killed.status) == Some(libc::SIGKILL),
        "the source was still there (stalled after the release) when killed",
    );
    killed.check(!killed.stderr.contains("seccomp"), "no filter violation");
    let before = before + &killed.stdout;
    let after = wait_beat(&mut hop, last + 3, BOOT);
    let last_local = check_continued(&after, &before, "the guest after the local migration");
    assert!(last_local > last_dest);
    let pinged = b.exec(&["ping", "-c", "2", "-W", "5", GUEST]);
    assert!(pinged.is_ok(), "ping on the handed-over tap: {pinged:?}");

    // 4. A copy over a Unix socket to a third host (its own tap0).
    let m6 = dir.path("m6.sock");
    let m6_url = format!("unix:{}", m6.display());
    let last_sock = dir.path("last.sock");
    let mut last_hop = spawn_ember_in_netns(
        &c.name,
        &[
            "--log-level",
            "info",
            "--incoming",
            &m6_url,
            "--api-sock",
            last_sock.to_str().unwrap(),
        ],
        b"",
    );
    wait_path(&m6);
    let mut hapi = Api::connect(&hop_sock);
    let before = hop.stdout_so_far();
    send(&mut hapi, &m6_url);
    let run = hop.finish(Duration::from_secs(60));
    run.check(
        run.code() == 0,
        "the local destination, a source now, exits 0",
    );
    let local_line = run
        .stderr
        .lines()
        .find(|l| l.contains("migrated to"))
        .unwrap_or("")
        .to_string();
    let before = before + &run.stdout;
    let last = beats(&before).iter().map(|b| b.0).max().unwrap();
    let after = wait_beat(&mut last_hop, last + 3, BOOT);
    let last_c = check_continued(&after, &before, "the guest on the third host");
    assert!(last_c > last_local);
    let pinged = c.exec(&["ping", "-c", "2", "-W", "5", GUEST]);
    assert!(pinged.is_ok(), "ping on the third host: {pinged:?}");
    eprintln!("over a Unix socket: {local_line}");

    // 5. Post-copy: to a fourth host over a link slower than the guest
    //    dirties its memory.
    let e = NetNs::new("mige", &[("tap0", &host_addr)]).expect("netns e");
    c.link(&e, "10.207.0.1/24", &format!("{LINK_E}/24"))
        .expect("veth");
    c.exec(&[
        "tc", "qdisc", "add", "dev", "veth0", "root", "tbf", "rate", SLOW_LINK, "burst", "64kb",
        "latency", "50ms",
    ])
    .expect("tc on the link");
    let mut post = spawn_ember_in_netns(
        &e.name,
        &[
            "--log-level",
            "info",
            "--incoming",
            &format!("tcp:{LINK_E}:6001"),
        ],
        b"",
    );
    wait_listening(&e, ":6001");
    let mut lapi = Api::connect(&last_sock);
    let before = last_hop.stdout_so_far();
    let t = Instant::now();
    send(&mut lapi, &format!("tcp:{LINK_E}:6001"));
    let s = wait_state(
        &mut lapi,
        &["postcopy", "completed", "failed"],
        Duration::from_secs(120),
    );
    assert_eq!(s["state"], "postcopy", "the rounds stopped shrinking: {s}");
    assert!(s["postcopy_pages_left"].as_u64().is_some(), "{s}");
    let run = last_hop.finish(BOOT);
    let took = t.elapsed();
    run.check(run.code() == 0, "the post-copy source exits 0");
    run.check(
        run.stderr.contains("switching to post-copy") && run.stderr.contains("and post-copy"),
        "the source switched to post-copy by itself",
    );
    run.check(!run.stderr.contains("panicked"), "no panic");
    let source_line = run
        .stderr
        .lines()
        .filter(|l| l.contains("post-copy") || l.contains("migrated to"))
        .collect::<Vec<_>>()
        .join("\n");
    let before = before + &run.stdout;
    let last = beats(&before).iter().map(|b| b.0).max().unwrap();
    let after = wait_beat(&mut post, last + 3, BOOT);
    let last_e = check_continued(&after, &before, "the guest after post-copy");
    assert!(last_e > last_c);
    let pinged = e.exec(&["ping", "-c", "2", "-W", "5", GUEST]);
    assert!(pinged.is_ok(), "ping after post-copy: {pinged:?}");
    eprintln!(
        "post-copy over {SLOW_LINK}: {:.1} s from the request to the source's exit\n{source_line}",
        took.as_secs_f64()
    );
    let ram_flags = mapping_flags(post.pid(), "ember-guest-ram");
    let pinned = thread_cpus(post.pid(), "ember-vcpu0");
    post.signal(libc::SIGKILL);
    let run = post.finish(BOOT);
    run.check(
        !ram_flags.is_empty() && ram_flags.iter().all(|f| f.split(' ').any(|w| w == "hg")),
        &format!("guest memory four hops on is still advised for THP: {ram_flags:?}"),
    );
    run.check(
        pinned.as_deref() == Some("0"),
        &format!("vCPU 0 is still pinned to host CPU 0: {pinned:?}"),
    );
    run.check(
        run.stderr.contains("post-copy done"),
        "the destination got every page",
    );
    run.check(!run.stderr.contains("panicked"), "no panic");
    run.check(!run.stderr.contains("seccomp"), "no filter violation");
    let last = beats(&(after + &run.stdout))
        .iter()
        .map(|b| b.0)
        .max()
        .unwrap();
    // Every block of every beat, across five embers.
    check_disk(&disk, last);
}

/// Feeds a destination (`ember --api-sock`, no VM) one stream over a Unix
/// socket; its answer to `vm.receive-migration`.
fn receive_bad(sock: &Path, listen: &Path, stream: &[u8]) -> ember_tests::http::Reply {
    let _ = std::fs::remove_file(listen);
    let body = format!(r#"{{"receiver_url":"unix:{}"}}"#, listen.display());
    let sock = sock.to_path_buf();
    let call = std::thread::spawn(move || {
        let mut c = Client::connect(&sock, Duration::from_secs(20));
        c.request("PUT", "/api/v1/vm.receive-migration", Some(&body))
    });
    wait_path(listen);
    let mut s = UnixStream::connect(listen).unwrap();
    let _ = s.write_all(stream);
    drop(s);
    call.join().unwrap()
}

#[test]
fn a_destination_refuses_bad_streams_clearly_and_keeps_serving() {
    let dir = TempDir::new("migration-bad");
    let sock = dir.path("api.sock");
    let listen = dir.path("in.sock");
    let ember = spawn_ember(&["--api-sock", sock.to_str().unwrap()], b"");
    let mut good = Vec::new();
    {
        let mut w = ember_migration::Writer::new(&mut good).unwrap();
        w.start(b"{\"not\": \"a hello\"}").unwrap();
    }
    let mut flipped = good.clone();
    let at = flipped.len() - 3;
    flipped[at] ^= 0x10;
    let mut version = good.clone();
    version[8] = 9;
    let mut order = Vec::new();
    {
        let mut w = ember_migration::Writer::new(&mut order).unwrap();
        w.zero_pages(0, &[0x1000]).unwrap();
    }
    let cases: [(&str, Vec<u8>, &str); 6] = [
        ("bad magic", b"EMBERMIX\x01\0\0\0".to_vec(), "bad magic"),
        ("version", version, "version 9 is not supported"),
        ("order", order, "out of order"),
        ("corrupt", flipped, "CRC64"),
        ("truncated", good[..good.len() - 5].to_vec(), "truncated"),
        (
            "hello",
            good.clone(),
            "the start of the stream is not valid",
        ),
    ];
    let mut api = Api::connect(&sock);
    for (what, stream, needle) in cases {
        let r = receive_bad(&sock, &listen, &stream);
        assert_eq!(r.status, 500, "{what}: {r:?}");
        let fault = r.fault();
        assert!(fault.contains(needle), "{what}: {fault}");
        assert!(
            !fault.contains('\n') && !fault.contains("panicked"),
            "{fault}"
        );
        // Nothing was built; the VMM serves on.
        assert_eq!(api.state(), "Not started", "{what}");
        assert!(!listen.exists(), "{what}: the listening socket is removed");
    }
    // Requests that cannot be served say why.
    for (method, path, body, needle) in [
        (
            "PUT",
            "/api/v1/vm.send-migration",
            r#"{"destination_url":"unix:/nowhere"}"#,
            "before starting",
        ),
        (
            "PUT",
            "/api/v1/vm.receive-migration",
            r#"{"receiver_url":"tcp:example.invalid:1"}"#,
            "must be an IP address",
        ),
        ("PUT", "/api/v1/vm.migration-cancel", "", "no migration"),
    ] {
        let body = (!body.is_empty()).then_some(body);
        let r = api.client.request(method, path, body);
        assert_eq!(r.status, 400, "{path}: {r:?}");
        assert!(r.fault().contains(needle), "{path}: {r:?}");
    }
    let r = api
        .client
        .request("GET", "/api/v1/vm.migration-status", None);
    assert_eq!((r.status, r.json()["state"].clone()), (200, "none".into()));
    ember.signal(libc::SIGTERM);
    let run = ember.finish(Duration::from_secs(30));
    run.check(!run.stderr.contains("panicked"), "no panic");
    // A destination waiting for its source ends at SIGTERM, as any ember.
    let waiting = dir.path("waiting.sock");
    let url = format!("unix:{}", waiting.display());
    let idle = spawn_ember(&["--incoming", &url], b"");
    wait_path(&waiting);
    let t = Instant::now();
    idle.signal(libc::SIGTERM);
    let run = idle.finish(Duration::from_secs(30));
    run.check(
        run.code() == 128 + libc::SIGTERM,
        "a waiting destination exits 143 at SIGTERM",
    );
    run.check(t.elapsed() < Duration::from_secs(5), "at once");
    run.check(!waiting.exists(), "its listening socket is removed");
    // The command line's destination refuses a bad URL in one line.
    let run = ember_tests::run_ember(
        &["--incoming", "udp:1.2.3.4:5"],
        b"",
        Duration::from_secs(30),
    );
    ember_tests::assert_clean_error(&run, &["udp:1.2.3.4:5", "tcp:HOST:PORT or unix:PATH"]);
}
