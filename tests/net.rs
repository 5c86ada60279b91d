//! virtio-net with real guests on taps and on user-mode networking (passt)
//! in network namespaces the tests make (no traffic leaves them): the host
//! pings the guest with large patterned payloads, and the guest agent
//! exchanges a TCP stream each way with a host listener, both sides
//! checking every byte.

use std::io::{Read, Write};
use std::net::TcpListener;
use std::time::Duration;

use ember_tests::http::{check_latency, Api};
use ember_tests::{
    agent_all, agent_lines, guest_kernel_dir, kvm_available, net_pattern_byte, netns_available,
    spawn_ember_in_netns, NetNs, Run, TempDir,
};

const BOOT_TIMEOUT: Duration = Duration::from_secs(900);
const HOST: &str = "10.200.0.1";
const GUEST: &str = "10.200.0.2";
const PORT: u16 = 5201;

fn guest_cmdline(extra: &str) -> String {
    format!(
        "console=ttyS0 reboot=k panic=1 quiet ember.agent=on \
         ip={GUEST}::{HOST}:255.255.255.0::eth0:off {extra}"
    )
}

/// Accepts one connection, reads until EOF checking the pattern with seed 1,
/// then sends `send` bytes of the pattern with seed 2 and closes. Returns
/// (bytes received, all matched).
/// A host-side TCP peer running in the namespace.
struct Listener {
    handle: std::thread::JoinHandle<(u64, bool, Duration)>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl Listener {
    /// Stops waiting for a connection (ember has exited) and returns
    /// (bytes received, all matched); (0, false) if the guest never came.
    fn finish(self) -> (u64, bool) {
        let (got, ok, _) = self.finish_timed();
        (got, ok)
    }

    /// [`Listener::finish`], with the time from the first byte received
    /// to the guest's end of stream.
    fn finish_timed(self) -> (u64, bool, Duration) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        self.handle.join().expect("listener thread")
    }
}

fn listener(ns: &NetNs, send: u64) -> Listener {
    listener_at(ns, HOST, PORT, send)
}

/// [`listener`] on `addr:port`.
fn listener_at(ns: &NetNs, addr: &'static str, port: u16, send: u64) -> Listener {
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stopped = stop.clone();
    let handle = ns.spawn(move || {
        let l = TcpListener::bind((addr, port)).expect("bind the host listener");
        // Never hang the test: give up on a guest that does not connect.
        l.set_nonblocking(true).expect("nonblocking listener");
        let deadline = std::time::Instant::now() + Duration::from_secs(600);
        let mut s = loop {
            match l.accept() {
                Ok((s, _)) => break s,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    if stopped.load(std::sync::atomic::Ordering::SeqCst)
                        || std::time::Instant::now() > deadline
                    {
                        return (0, false, Duration::ZERO);
                    }
                    std::thread::sleep(Duration::from_millis(50));
                }
                Err(e) => panic!("accept: {e}"),
            }
        };
        s.set_nonblocking(false).expect("blocking stream");
        s.set_read_timeout(Some(Duration::from_secs(600))).unwrap();
        let mut buf = vec![0u8; 65536];
        let (mut got, mut ok) = (0u64, true);
        let mut first = None;
        loop {
            let n = s.read(&mut buf).expect("read from the guest");
            if n == 0 {
                break;
            }
            first.get_or_insert_with(std::time::Instant::now);
            for (i, b) in buf[..n].iter().enumerate() {
                ok &= *b == net_pattern_byte(1, got + i as u64);
            }
            got += n as u64;
        }
        let took = first.map_or(Duration::ZERO, |t| t.elapsed());
        let out: Vec<u8> = (0..send).map(|p| net_pattern_byte(2, p)).collect();
        s.write_all(&out).expect("write to the guest");
        (got, ok, took)
    });
    Listener { handle, stop }
}

/// Starts ember in `ns` with the guest kernel, `nets` and `cmdline`.
fn spawn_guest(ns: &NetNs, nets: &[&str], cmdline: &str) -> ember_tests::Running {
    spawn_guest_with(ns, nets, cmdline, &[])
}

/// [`spawn_guest`] with more flags.
fn spawn_guest_with(
    ns: &NetNs,
    nets: &[&str],
    cmdline: &str,
    extra: &[&str],
) -> ember_tests::Running {
    let kernel = guest_kernel_dir().join("vmlinux");
    let k = kernel.to_string_lossy();
    let mut args = vec![
        "--kernel",
        &k,
        "--memory",
        "256",
        "--cmdline",
        cmdline,
        "--log-level",
        "info",
    ];
    for n in nets {
        args.extend(["--net", n]);
    }
    args.extend_from_slice(extra);
    spawn_ember_in_netns(&ns.name, &args, b"")
}

/// Pings with 8000-byte patterned payloads, then a 2 MiB TCP stream each
/// way (guest to host, host to guest) with every byte checked on both ends;
/// with offloads the guest's stream goes out as TSO frames larger than the
/// MTU. The NIC has two queue pairs on a multi-queue tap and the guest two
/// vCPUs: the guest turns both pairs on (`ethtool -L eth0 combined 2`
/// through the control queue), and 32 host connections to a closed guest
/// port, which the tap spreads over its queues by flow, are refused by the
/// guest kernel through both pairs (each CPU answers on its own transmit
/// queue), as the per-pair exit counters show.
#[test]
fn net_ping_and_tcp_both_ways_through_a_two_queue_tap_with_offloads() {
    let name = "net_ping_and_tcp_both_ways_through_a_two_queue_tap_with_offloads";
    if !kvm_available(name) || !netns_available(name) {
        return;
    }
    let ns = NetNs::multi_queue("net", &[("tap0", "10.200.0.1/24")]).expect("netns");
    const KIB: u64 = 2048;
    let host = listener(&ns, KIB * 1024);
    let cmdline = guest_cmdline(&format!(
        "ember.net_channels=eth0:2 ember.net_tcp={HOST}:{PORT}:{KIB}:{KIB} ember.sleep=30"
    ));
    let kernel = guest_kernel_dir().join("vmlinux");
    let k = kernel.to_string_lossy();
    let args = [
        "--kernel",
        &k,
        "--memory",
        "256",
        "--vcpus",
        "2",
        "--cmdline",
        &cmdline,
        "--log-level",
        "info",
        "--net",
        "tap=tap0,queues=2",
    ];
    let mut ember = spawn_ember_in_netns(&ns.name, &args, b"");
    assert!(
        ember.wait_for_output("EMBER-AGENT sleeping", BOOT_TIMEOUT),
        "the agent reached its sleep"
    );
    let ping = ns
        .exec(&[
            "ping", "-c", "4", "-i", "0.5", "-W", "10", "-s", "8000", "-p", "c0ffee42", GUEST,
        ])
        .unwrap_or_else(|e| e);
    let refused = ns
        .spawn(|| {
            (0..32)
                .filter(|_| {
                    let to = std::net::SocketAddr::from(([10, 200, 0, 2], 23));
                    matches!(
                        std::net::TcpStream::connect_timeout(&to, Duration::from_secs(10)),
                        Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused
                    )
                })
                .count()
        })
        .join()
        .expect("connect thread");
    let run = ember.finish(BOOT_TIMEOUT);
    run.check(
        ping.contains(" 4 received") || ping.contains("4 packets received"),
        &format!("every ping came back:\n{ping}"),
    );
    run.check(
        !ping.contains("wrong data"),
        &format!("ping payloads intact:\n{ping}"),
    );
    let (got, ok) = host.finish();
    run.check(run.code() == 0, "the agent restarts the machine");
    let agent = agent_lines(&run.stdout);
    let ch = &agent["net_channels"];
    run.check(
        ch["ret"] == "0" && ch["real_rx"] == "2" && ch["real_tx"] == "2",
        &format!("the guest brought up two queue pairs: {ch:?}"),
    );
    let tcp = &agent["net_tcp"];
    run.check(
        got == KIB * 1024 && ok,
        "the host received every byte the guest sent, intact",
    );
    run.check(
        tcp["recv"] == (KIB * 1024).to_string() && tcp["recv_ok"] == "1",
        "the guest received every byte, intact",
    );
    eprintln!(
        "agent TCP: guest->host {} KiB/s, host->guest {} KiB/s",
        tcp["send_kib_per_s"], tcp["recv_kib_per_s"]
    );
    let largest = largest_tx_frame(&run, 0);
    run.check(
        largest > 1514,
        &format!("TSO: the guest sent frames of up to {largest} bytes, above the MTU"),
    );
    run.check(
        refused == 32,
        &format!("the guest kernel refused all 32 connections: {refused}"),
    );
    let pairs = pair_counters(&run, 0);
    run.check(
        pairs.len() == 2 && pairs.iter().all(|&(rx, tx)| rx > 0 && tx > 0),
        &format!("frames went both ways on both queue pairs (rx/tx): {pairs:?}"),
    );
}

/// The largest frame NIC `nic`'s guest sent, from its exit counters.
fn largest_tx_frame(run: &Run, nic: usize) -> u64 {
    let tag = format!("virtio-net{nic}: rx");
    run.stderr
        .lines()
        .find(|l| l.contains(&tag))
        .and_then(|l| l.split_once("largest tx frame "))
        .and_then(|(_, rest)| rest.split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

/// The (received, sent) frames of each of NIC `nic`'s queue pairs, from
/// its exit counters.
fn pair_counters(run: &Run, nic: usize) -> Vec<(u64, u64)> {
    let tag = format!("virtio-net{nic}: rx");
    run.stderr
        .lines()
        .find(|l| l.contains(&tag))
        .and_then(|l| l.split_once("rx/tx packets by pair: "))
        .map(|(_, pairs)| {
            pairs
                .split_whitespace()
                .filter_map(|p| {
                    let (r, t) = p.split_once('/')?;
                    Some((r.parse().ok()?, t.parse().ok()?))
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Two NICs of two kinds in one boot. eth0 is user-mode (passt, no tap):
/// the guest kernel's `ip=dhcp` gets its address, mask and gateway from
/// passt (the boot log shows the answer), a TCP stream goes through
/// passt's NAT to a host listener (the gateway address is the host's
/// loopback), and a host port forward reaches the guest kernel,
/// which refuses the connection itself (its TCP reset counter moves).
/// eth1 is a tap with its own MAC, offloads off and a transmit rate limit:
/// its TCP stream goes in MTU-sized frames no faster than the limit.
/// Every byte is checked on both ends.
#[test]
fn net_user_mode_dhcp_nat_and_a_port_forward_next_to_a_tap_without_offloads() {
    use std::net::TcpStream;
    let name = "net_user_mode_dhcp_nat_and_a_port_forward_next_to_a_tap_without_offloads";
    if !kvm_available(name) || !netns_available(name) {
        return;
    }
    if std::process::Command::new("passt")
        .arg("--version")
        .output()
        .is_err()
    {
        panic!("passt is not installed (apt-get install passt; tools/test installs it)");
    }
    let ns = NetNs::new("user", &[("tap1", "10.201.0.1/24")]).expect("netns");
    // passt copies the host's addresses from the interface with the
    // default route: give the namespace one.
    for cmd in [
        "ip link add uplink0 type veth peer name uplink1",
        "ip addr add 192.168.77.1/24 dev uplink0",
        "ip link set uplink0 up",
        "ip link set uplink1 up",
        "ip route add default via 192.168.77.254",
    ] {
        ns.exec(&cmd.split(' ').collect::<Vec<_>>()).expect(cmd);
    }
    // The emulated guest moves about 100 KiB/s out and 25 KiB/s in.
    const KIB: u64 = 256;
    // eth1's transmit limit: a 32 KiB bucket refilled at 32 KiB/s.
    const LIMIT_KIB: u64 = 32;
    const FWD: u16 = 2222;
    // Guest to host only through passt: with Debian's passt 0.0~git20230309
    // a host-to-guest stream stalls or runs past its end, with ember and
    // with QEMU 7.2's -netdev stream alike (docs/network.md).
    let nat = listener_at(&ns, "127.0.0.1", PORT, 0);
    let tap = listener_at(&ns, "10.201.0.1", PORT + 1, KIB * 1024);
    // Not quiet: the kernel's IP-Config lines are checked.
    let cmdline = format!(
        "console=ttyS0 reboot=k panic=1 ember.agent=on ip=:::::eth0:dhcp \
         ember.net_addr=eth1:10.201.0.2:24 \
         ember.net_tcp=192.168.77.254:{PORT}:{KIB}:0,10.201.0.1:{}:{KIB}:{KIB} \
         ember.net_watch=60",
        PORT + 1
    );
    let mut ember = spawn_guest(
        &ns,
        &[
            &format!("user,hostfwd=tcp:127.0.0.1:{FWD}-:23,mac=52:54:00:aa:00:01"),
            &format!("tap=tap1,offloads=off,mac=52:54:00:aa:00:02,tx_bw={LIMIT_KIB}K/1s"),
        ],
        &cmdline,
    );
    let watching = ember.wait_for_output("EMBER-AGENT net_watch seconds", BOOT_TIMEOUT);
    // The forward: passt takes the host's connection and opens one to the
    // guest's port 23, where nothing listens.
    let host_side = ns
        .spawn(move || {
            let mut s = TcpStream::connect(("127.0.0.1", FWD)).map_err(|e| e.to_string())?;
            s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
            let mut buf = [0u8; 16];
            Ok::<_, String>(match s.read(&mut buf) {
                Ok(0) => "closed".to_string(),
                Ok(n) => format!("{n} bytes"),
                Err(e) => format!("error: {e}"),
            })
        })
        .join()
        .expect("the host side");
    // The watch looks every 200 ms.
    std::thread::sleep(Duration::from_secs(3));
    // passt killed under the running guest: the user-mode NIC's link goes
    // down, said once; the VM runs on (SIGTERM still finds it: 143).
    let passt = children_named(ember.pid(), "passt");
    assert_eq!(passt.len(), 1, "ember started one passt: {passt:?}");
    // SAFETY: kill() on the pid of ember's passt, read just above.
    let killed = unsafe { libc::kill(passt[0], libc::SIGKILL) };
    assert_eq!(killed, 0, "kill passt");
    std::thread::sleep(Duration::from_secs(2));
    ember.signal(libc::SIGTERM);
    let run = ember.finish(BOOT_TIMEOUT);
    run.check(
        run.code() == 143,
        "ember ran on after passt died and ended on SIGTERM",
    );
    run.check(
        run.stderr
            .lines()
            .filter(|l| l.contains("(passt ") && l.contains("link down"))
            .count()
            == 1,
        "passt's death took eth0's link down, said once",
    );
    run.check(watching, "the agent reached its watch");
    run.check(
        run.stdout
            .contains("IP-Config: Got DHCP answer from 192.168.77.254"),
        "the guest's DHCP request was answered by passt (the gateway)",
    );
    run.check(
        run.stdout.contains("hwaddr=52:54:00:aa:00:01")
            && run.stdout.contains("ipaddr=192.168.77.1")
            && run.stdout.contains("mask=255.255.255.0")
            && run.stdout.contains("gw=192.168.77.254"),
        "eth0 (its MAC) got the host's address, mask and gateway",
    );
    let mut took = Duration::ZERO;
    for (which, h) in [("user-mode eth0", nat), ("tap eth1", tap)] {
        let (got, ok, t) = h.finish_timed();
        run.check(
            got == KIB * 1024 && ok,
            &format!("{which}: the host received every byte the guest sent, intact"),
        );
        took = t;
    }
    // The limit: what is beyond the first bucket takes its refill time.
    let floor = Duration::from_secs_f64((KIB - LIMIT_KIB) as f64 / LIMIT_KIB as f64 * 0.9);
    let rate = KIB as f64 / took.as_secs_f64().max(0.001);
    run.check(
        took >= floor,
        &format!("eth1's {KIB} KiB under tx_bw={LIMIT_KIB}K/1s took {took:?} (at least {floor:?})"),
    );
    let all = agent_all(&run.stdout);
    run.check(all["net_addr"][0]["ret"] == "0", "eth1 configured");
    run.check(
        all["net_tcp"].len() == 2 && all["net_tcp"].iter().all(|l| l["recv_ok"] == "1"),
        &format!(
            "both exchanges ended, what the hosts sent reached the guest intact: {:?}",
            all["net_tcp"]
        ),
    );
    let rsts: Vec<u64> = all["net_watch"]
        .iter()
        .filter_map(|l| l.get("tcp_out_rsts")?.parse().ok())
        .collect();
    run.check(
        rsts.len() >= 2 && rsts.last() > rsts.first(),
        &format!(
            "the guest kernel reset the forwarded connection (host side: {host_side:?}; \
             tcp_out_rsts {rsts:?})"
        ),
    );
    run.check(
        run.stderr.contains("virtio-net0: user-mode (passt)")
            && run.stderr.contains("hostfwd tcp:127.0.0.1:2222-:23"),
        "ember logged the user-mode NIC and its forward",
    );
    let (packets, bytes) = {
        let c = nic_counters(&run, 1);
        (c["packets"][1], c["bytes"][1])
    };
    run.check(
        packets > 0 && bytes / packets <= 1514 + 12,
        &format!("eth1 without offloads: {bytes} bytes in {packets} tx frames, no TSO"),
    );
    let c0 = nic_counters(&run, 0);
    run.check(
        c0["packets"][0] > 0 && c0["packets"][1] > 0,
        &format!("eth0 moved frames both ways through passt: {c0:?}"),
    );
    eprintln!(
        "user-mode (passt) TCP: guest->host {} KiB/s; tap without offloads, tx limited to {LIMIT_KIB} KiB/s: {rate:.1} KiB/s at the host ({KIB} KiB in {took:?}), host->guest {} KiB/s",
        all["net_tcp"][0]["send_kib_per_s"],
        all["net_tcp"][1]["recv_kib_per_s"]
    );
}

/// The pids of `pid`'s children whose command starts with `name` (Debian's
/// passt runs as `passt.avx2` where it can).
fn children_named(pid: i32, name: &str) -> Vec<i32> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(child) = e.file_name().to_str().and_then(|n| n.parse::<i32>().ok()) else {
            continue;
        };
        let stat = std::fs::read_to_string(format!("/proc/{child}/stat")).unwrap_or_default();
        // pid (comm) state ppid ...
        let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
            continue;
        };
        let ppid = stat[close + 1..]
            .split_whitespace()
            .nth(1)
            .and_then(|p| p.parse::<i32>().ok());
        if stat[open + 1..close].starts_with(name) && ppid == Some(pid) {
            out.push(child);
        }
    }
    out
}

/// CPU time (user + system) of process `pid`, in clock ticks.
fn cpu_ticks(pid: i32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces): utime is the
    // 12th and stime the 13th field after ") ".
    let rest = stat.rsplit_once(") ").map(|(_, r)| r).unwrap_or("");
    let f: Vec<&str> = rest.split_whitespace().collect();
    f.get(11).and_then(|x| x.parse::<u64>().ok()).unwrap_or(0)
        + f.get(12).and_then(|x| x.parse::<u64>().ok()).unwrap_or(0)
}

/// Share of one core ember used over `d`.
fn cpu_share(pid: i32, d: Duration) -> f64 {
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    let before = cpu_ticks(pid);
    std::thread::sleep(d);
    (cpu_ticks(pid) - before) as f64 / hz / d.as_secs_f64()
}

/// UDP datagrams of 1400 bytes to the guest's discard port from inside
/// `ns` for `dur`, 200 every 5 ms (40,000 a second, 56 MB/s: some 40
/// times what the guest takes in here, and paced so that the sender does
/// not take a whole host CPU from the tests running beside it); how many
/// were sent.
fn flood(ns: &NetNs, dur: Duration) -> std::thread::JoinHandle<u64> {
    ns.spawn(move || {
        let s = std::net::UdpSocket::bind((HOST, 0)).expect("bind");
        let payload = [0x5au8; 1400];
        let start = std::time::Instant::now();
        let mut sent = 0u64;
        let mut tick = 0u32;
        while start.elapsed() < dur {
            for _ in 0..200 {
                if s.send_to(&payload, (GUEST, 9)).is_ok() {
                    sent += 1;
                }
            }
            tick += 1;
            let next = Duration::from_millis(5) * tick;
            if let Some(wait) = next.checked_sub(start.elapsed()) {
                std::thread::sleep(wait);
            }
        }
        sent
    })
}

/// Firecracker CVE-2020-16843: with the guest's receive queue full (its
/// interface down, buffers posted and filled) and the tap flooded, the
/// device must not spin; as soon as the guest refills its buffers, traffic
/// flows again. The API answers `GET /` within 50 ms throughout the flood,
/// and again while the guest's interface is up and taking the flood in.
#[test]
fn net_flooded_tap_with_a_full_rx_queue_does_not_spin_and_recovers() {
    if !kvm_available("net_flooded_tap_with_a_full_rx_queue_does_not_spin_and_recovers")
        || !netns_available("net_flooded_tap_with_a_full_rx_queue_does_not_spin_and_recovers")
    {
        return;
    }
    let ns = NetNs::new("flood", &[("tap0", "10.200.0.1/24")]).expect("netns");
    let dir = TempDir::new("net-flood");
    let sock = dir.path("api.sock");
    const KIB: u64 = 256;
    const MAC: &str = "52:54:00:aa:bb:01";
    let host = listener(&ns, KIB * 1024);
    let cmdline = guest_cmdline(&format!(
        "ember.net_pause=eth0:30 ember.net_tcp={HOST}:{PORT}:{KIB}:{KIB}"
    ));
    let net = format!("tap=tap0,mac={MAC}");
    let mut ember = spawn_guest_with(
        &ns,
        &[&net],
        &cmdline,
        &["--api-sock", sock.to_str().unwrap()],
    );
    assert!(
        ember.wait_for_output("state=down", BOOT_TIMEOUT),
        "the guest took its interface down"
    );
    // Frames reach the tap without ARP (the guest does not answer now).
    ns.exec(&[
        "ip",
        "neigh",
        "replace",
        GUEST,
        "lladdr",
        MAC,
        "dev",
        "tap0",
        "nud",
        "permanent",
    ])
    .expect("static neighbour");
    let mut api = Api::connect(&sock);
    let pid = ember.pid();
    let idle = cpu_share(pid, Duration::from_secs(4));
    let flooding = flood(&ns, Duration::from_secs(10));
    std::thread::sleep(Duration::from_secs(2));
    // The API is timed (a call every 10 ms) while ember's CPU is counted.
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
    let (ticks, t) = (cpu_ticks(pid), std::time::Instant::now());
    let full = api.probe_root(Duration::from_secs(6));
    let flooded = (cpu_ticks(pid) - ticks) as f64 / hz / t.elapsed().as_secs_f64();
    let sent = flooding.join().expect("flood");
    // The guest's interface comes up: flooded again while it takes frames in.
    let up = ember.wait_for_output("state=up", BOOT_TIMEOUT);
    let flooding = flood(&ns, Duration::from_secs(4));
    let taking = api.probe_root(Duration::from_secs(3));
    let sent_up = flooding.join().expect("flood");
    let run = ember.finish(BOOT_TIMEOUT);
    run.check(
        sent > 1000 && sent_up > 1000,
        &format!("the tap was flooded ({sent} and {sent_up} datagrams)"),
    );
    run.check(
        flooded < idle + 0.35 && flooded < 0.9,
        &format!(
            "ember spun while the queue was full: {flooded:.2} of a core flooded, {idle:.2} idle"
        ),
    );
    eprintln!("ember CPU: idle {idle:.2}, flooded with a full rx queue {flooded:.2} (of one core)");
    run.check(up, "the guest brought its interface up again");
    let full = full.unwrap_or_else(|e| panic!("{e}; ember said:\n{}", run.stderr));
    let taking = taking.unwrap_or_else(|e| panic!("{e}; ember said:\n{}", run.stderr));
    check_latency("tap flood, rx queue full", full, 50.0);
    check_latency("tap flood, guest receiving", taking, 50.0);
    // The TCP exchange is some 300 frames in; the rest is the flood the
    // guest took in while its interface was up.
    let c = nic_counters(&run, 0);
    eprintln!("NIC counters after the floods: {c:?}");
    run.check(
        c["packets"][0] > 600,
        &format!("the guest received the flood while up: {c:?}"),
    );
    let (got, ok) = host.finish();
    run.check(run.code() == 0, "the agent restarts the machine");
    run.check(
        got == KIB * 1024 && ok,
        "after the refill the host received every byte",
    );
    let tcp = &agent_lines(&run.stdout)["net_tcp"];
    run.check(
        tcp["recv_ok"] == "1",
        "after the refill the guest received every byte",
    );
}

/// A tap deleted under a running guest: the NIC's link goes down (logged
/// once, the guest told), nothing is sent through it, and ember keeps the
/// guest running to its end; a tap re-created with the name is not
/// rejoined.
#[test]
fn net_tap_removed_while_running_takes_the_link_down_and_the_guest_keeps_running() {
    if !kvm_available(
        "net_tap_removed_while_running_takes_the_link_down_and_the_guest_keeps_running",
    ) || !netns_available(
        "net_tap_removed_while_running_takes_the_link_down_and_the_guest_keeps_running",
    ) {
        return;
    }
    let ns = NetNs::new("gone", &[("tap0", "10.200.0.1/24")]).expect("netns");
    let cmdline = guest_cmdline("ember.net_wait=20 ember.net_udp=10.200.0.255:9:50");
    let mut ember = spawn_guest(&ns, &["tap=tap0"], &cmdline);
    assert!(
        ember.wait_for_output("EMBER-AGENT net_wait", BOOT_TIMEOUT),
        "the guest is up"
    );
    ns.exec(&["ip", "link", "del", "tap0"])
        .expect("delete the tap");
    // A tap of the same name made again is a new interface: ember does not
    // rejoin it (as Firecracker and QEMU), and the guest's broadcasts,
    // still going, do not reach it.
    ns.exec(&["ip", "tuntap", "add", "tap0", "mode", "tap"])
        .expect("re-create the tap");
    ns.exec(&["ip", "link", "set", "tap0", "up"])
        .expect("tap up");
    let frames = ns
        .capture("tap0", Duration::from_secs(3))
        .join()
        .expect("capture");
    let run = ember.finish(BOOT_TIMEOUT);
    let udp9 = frames
        .iter()
        .filter(|f| {
            // IPv4, UDP, destination port 9.
            let port = f.get(14).map(|v| 14 + usize::from(v & 0xf) * 4 + 2);
            f.get(12..14) == Some(&[0x08, 0x00][..])
                && f.get(23) == Some(&17)
                && port.and_then(|p| f.get(p..p + 2)) == Some(&[0, 9][..])
        })
        .count();
    run.check(
        udp9 == 0,
        &format!("the guest's datagrams did not reach the new tap ({udp9} did)"),
    );
    run.check(run.code() == 0, "the guest ran to its end");
    run.check(
        agent_lines(&run.stdout).contains_key("done"),
        "the agent finished",
    );
    let line = run
        .stderr
        .lines()
        .find(|l| l.contains("virtio-net0: rx"))
        .unwrap_or_default()
        .to_string();
    // The link goes down when the tap goes: the guest's driver sees it and
    // its kernel stops handing the NIC frames; any it sent before are
    // dropped and counted. Nothing reaches a tap that is gone.
    let c = nic_counters(&run, 0);
    run.check(
        c["packets"][1] == 0,
        &format!("nothing was sent through the vanished tap: {line}"),
    );
    run.check(
        run.stderr.contains("virtio-net") && run.stderr.matches("link down").count() == 1,
        "the device logged the failure and the link went down, once",
    );
}

/// The numbers in `virtio-netN`'s exit counters line: the word before
/// each of `keys` ("packets", "filtered", ...), in order of appearance.
fn nic_counters(run: &Run, nic: usize) -> std::collections::HashMap<String, Vec<u64>> {
    let tag = format!("virtio-net{nic}: rx");
    let line = run
        .stderr
        .lines()
        .find(|l| l.contains(&tag))
        .unwrap_or_else(|| panic!("no counters for NIC {nic} in:\n{}", run.stderr));
    let words: Vec<&str> = line
        .split_whitespace()
        .map(|w| w.trim_end_matches(','))
        .collect();
    let mut out: std::collections::HashMap<String, Vec<u64>> = Default::default();
    for (i, w) in words.iter().enumerate() {
        // "N packets", "N bytes", "N dropped", "filtered N", "control N ok",
        // "N refused".
        let n = match *w {
            "packets" | "bytes" | "dropped" | "ok" | "refused" => {
                i.checked_sub(1).and_then(|j| words[j].parse().ok())
            }
            "filtered" | "control" => words.get(i + 1).and_then(|x| x.parse().ok()),
            _ => None,
        };
        if let Some(n) = n {
            out.entry((*w).to_string()).or_default().push(n);
        }
    }
    out
}

/// Host-side VLAN and the control queue in one boot. eth0 is on
/// `vlan=100`: the guest changes its MAC (MAC_ADDR_SET); ARP requests tagged
/// 100 (broadcast, and unicast to the new MAC) are answered from the new MAC
/// tagged 100; untagged ones, VLAN 200's, and one unicast to the old MAC get
/// no answer. eth1 is a plain tap where the guest added VLAN 7 to its
/// filter (VLAN_ADD): frames tagged 7 reach it, frames tagged 8 are
/// filtered, as the exit counters show.
#[test]
fn net_host_vlan_and_the_guests_mac_and_vlan_filters() {
    use ember_tests::packet::{arp_reply, arp_request, PacketSocket};
    if !kvm_available("net_host_vlan_and_the_guests_mac_and_vlan_filters")
        || !netns_available("net_host_vlan_and_the_guests_mac_and_vlan_filters")
    {
        return;
    }
    let ns = NetNs::new(
        "vlan",
        &[("tap0", "10.200.0.1/24"), ("tap1", "10.201.0.1/24")],
    )
    .expect("netns");
    // No IPv6 chatter from the host side (it would only add to the counts).
    let _ = ns.exec(&["sysctl", "-qw", "net.ipv6.conf.all.disable_ipv6=1"]);
    const OLD: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];
    const NEW: [u8; 6] = [0x52, 0x54, 0x00, 0xaa, 0xbb, 0xcc];
    const ETH1: [u8; 6] = [0x52, 0x54, 0x00, 0x12, 0x34, 0x57];
    let cmdline = guest_cmdline(
        "ember.net_addr=eth1:10.201.0.2:24 ember.net_mac=eth0:52:54:00:aa:bb:cc \
         ember.net_vlan=eth1:7 ember.sleep=40",
    );
    let mut ember = spawn_guest(
        &ns,
        &[
            "tap=tap0,mac=52:54:00:12:34:56,vlan=100",
            "tap=tap1,mac=52:54:00:12:34:57",
        ],
        &cmdline,
    );
    assert!(
        ember.wait_for_output("EMBER-AGENT sleeping", BOOT_TIMEOUT),
        "the agent reached its sleep"
    );
    const HOST_MAC: [u8; 6] = [0x02, 0, 0, 0, 0, 1];
    const N: usize = 30;
    let replies = ns
        .spawn(move || {
            let tap0 = PacketSocket::open("tap0");
            let guest = [10, 200, 0, 2];
            let bcast = [0xff; 6];
            // Each request from its own sender IP, so a reply says which
            // request it answers.
            let requests = [
                (11u8, bcast, Some(100u16)),
                (12, bcast, None),
                (13, bcast, Some(200)),
                (14, OLD, Some(100)),
                (15, NEW, Some(100)),
            ];
            for (ip, to, vlan) in requests {
                tap0.send(&arp_request(HOST_MAC, [10, 200, 0, ip], to, guest, vlan));
            }
            let got = tap0.receive_for(Duration::from_secs(8));
            let tap1 = PacketSocket::open("tap1");
            for i in 0..N {
                for vid in [7u16, 8] {
                    let ip = [10, 201, 0, 100 + u8::try_from(i).unwrap()];
                    tap1.send(&arp_request(HOST_MAC, ip, ETH1, [10, 201, 0, 2], Some(vid)));
                }
            }
            std::thread::sleep(Duration::from_secs(3));
            got
        })
        .join()
        .expect("the host side");
    let run = ember.finish(BOOT_TIMEOUT);
    let agent = agent_lines(&run.stdout);
    run.check(
        agent["net_mac"]["ret"] == "0" && agent["net_vlan"]["ret"] == "0",
        "the guest set its MAC and added VLAN 7 through the control queue",
    );
    let answered: Vec<(u8, Option<u16>, [u8; 6])> = replies
        .iter()
        .filter_map(|r| {
            let (mac, ip, target) = arp_reply(&r.frame)?;
            (ip == [10, 200, 0, 2] && target[..3] == [10, 200, 0])
                .then_some((target[3], r.vlan, mac))
        })
        .collect();
    let mut who: Vec<u8> = answered.iter().map(|a| a.0).collect();
    who.sort_unstable();
    who.dedup();
    run.check(
        who == [11, 15],
        &format!(
            "only the requests tagged 100 to broadcast or the new MAC were answered: {answered:?}"
        ),
    );
    run.check(
        answered.iter().all(|a| a.1 == Some(100) && a.2 == NEW),
        &format!("every answer came from the new MAC, tagged 100: {answered:?}"),
    );
    run.check(
        replies.iter().all(|r| r.vlan == Some(100)),
        "nothing left the VLAN NIC untagged or on another VLAN",
    );
    let c0 = nic_counters(&run, 0);
    run.check(
        c0["filtered"][0] >= 3,
        &format!("the untagged, VLAN 200 and old-MAC requests were filtered: {c0:?}"),
    );
    run.check(
        c0["ok"][0] >= 3 && c0["refused"][0] == 0,
        &format!("the guest drove the control queue, nothing refused: {c0:?}"),
    );
    let c1 = nic_counters(&run, 1);
    run.check(
        c1["filtered"][0] >= N as u64 && c1["packets"][0] >= N as u64,
        &format!("VLAN 7 frames reached eth1, VLAN 8 ones were filtered: {c1:?}"),
    );
    run.check(
        c1["filtered"][0] < 2 * N as u64,
        &format!("VLAN 7 frames were not filtered: {c1:?}"),
    );
}
