//! virtio-net with real guests on taps in network namespaces the tests
//! make (no traffic leaves them): the host pings the guest with large
//! patterned payloads, and the guest agent exchanges a TCP stream each way
//! with a host listener, both sides checking every byte.

use std::io::{Read, Write};
use std::net::TcpListener;
use std::time::Duration;

use ember_tests::{
    agent_lines, guest_kernel_dir, kvm_available, net_pattern_byte, netns_available,
    spawn_ember_in_netns, NetNs, Run,
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
fn listener(ns: &NetNs, send: u64) -> std::thread::JoinHandle<(u64, bool)> {
    ns.spawn(move || {
        let l = TcpListener::bind((HOST, PORT)).expect("bind the host listener");
        let (mut s, _) = l.accept().expect("the guest connects");
        s.set_read_timeout(Some(Duration::from_secs(600))).unwrap();
        let mut buf = vec![0u8; 65536];
        let (mut got, mut ok) = (0u64, true);
        loop {
            let n = s.read(&mut buf).expect("read from the guest");
            if n == 0 {
                break;
            }
            for (i, b) in buf[..n].iter().enumerate() {
                ok &= *b == net_pattern_byte(1, got + i as u64);
            }
            got += n as u64;
        }
        let out: Vec<u8> = (0..send).map(|p| net_pattern_byte(2, p)).collect();
        s.write_all(&out).expect("write to the guest");
        (got, ok)
    })
}

fn run_guest(ns: &NetNs, net: &str, cmdline: &str, ping: bool) -> (Run, Option<String>) {
    let kernel = guest_kernel_dir().join("vmlinux");
    let k = kernel.to_string_lossy();
    let mut ember = spawn_ember_in_netns(
        &ns.name,
        &[
            "--kernel",
            &k,
            "--memory",
            "256",
            "--net",
            net,
            "--cmdline",
            cmdline,
            "--log-level",
            "info",
        ],
        b"",
    );
    let mut ping_out = None;
    if ping {
        assert!(
            ember.wait_for_output("EMBER-AGENT sleeping", BOOT_TIMEOUT),
            "the agent reached its sleep"
        );
        ping_out = Some(
            ns.exec(&[
                "ping", "-c", "4", "-i", "0.5", "-W", "10", "-s", "8000", "-p", "c0ffee42", GUEST,
            ])
            .unwrap_or_else(|e| e),
        );
    }
    (ember.finish(BOOT_TIMEOUT), ping_out)
}

/// (packets, bytes) of tx in ember's exit counters for virtio-net0.
fn tx_counters(run: &Run) -> (u64, u64) {
    let line = run
        .stderr
        .lines()
        .find(|l| l.contains("virtio-net0: rx"))
        .unwrap_or_else(|| panic!("no counters in:\n{}", run.stderr));
    let words: Vec<&str> = line.split_whitespace().collect();
    let at = |w: &str| words.iter().position(|x| *x == w).unwrap();
    let tx = at("tx");
    (
        words[tx + 1].parse().unwrap(),
        words[tx + 3].parse().unwrap(),
    )
}

/// Pings with 8000-byte patterned payloads, then an 8 MiB TCP stream each
/// way (guest to host, host to guest) with every byte checked on both ends;
/// with offloads the guest's stream goes out as TSO frames larger than the MTU.
#[test]
fn net_ping_and_tcp_both_ways_through_a_tap_with_offloads() {
    if !kvm_available("net_ping_and_tcp_both_ways_through_a_tap_with_offloads")
        || !netns_available("net_ping_and_tcp_both_ways_through_a_tap_with_offloads")
    {
        return;
    }
    let ns = NetNs::new("net", &[("tap0", "10.200.0.1/24")]).expect("netns");
    const KIB: u64 = 8192;
    let host = listener(&ns, KIB * 1024);
    let cmdline = guest_cmdline(&format!(
        "ember.net_tcp={HOST}:{PORT}:{KIB}:{KIB} ember.sleep=30"
    ));
    let (run, ping) = run_guest(&ns, "tap=tap0", &cmdline, true);
    let ping = ping.unwrap();
    run.check(
        ping.contains(" 4 received") || ping.contains("4 packets received"),
        &format!("every ping came back:\n{ping}"),
    );
    run.check(
        !ping.contains("wrong data"),
        &format!("ping payloads intact:\n{ping}"),
    );
    let (got, ok) = host.join().expect("listener");
    run.check(run.code() == 0, "the agent restarts the machine");
    let agent = agent_lines(&run.stdout);
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
    let (packets, bytes) = tx_counters(&run);
    run.check(
        packets > 0 && bytes / packets > 1514,
        &format!("TSO: {bytes} bytes in {packets} tx frames"),
    );
}

/// With offloads off, the same stream still works, in MTU-sized frames.
#[test]
fn net_tcp_works_with_offloads_off() {
    if !kvm_available("net_tcp_works_with_offloads_off")
        || !netns_available("net_tcp_works_with_offloads_off")
    {
        return;
    }
    let ns = NetNs::new("nooff", &[("tap0", "10.200.0.1/24")]).expect("netns");
    const KIB: u64 = 1024;
    let host = listener(&ns, KIB * 1024);
    let cmdline = guest_cmdline(&format!("ember.net_tcp={HOST}:{PORT}:{KIB}:{KIB}"));
    let (run, _) = run_guest(&ns, "tap=tap0,offloads=off", &cmdline, false);
    let (got, ok) = host.join().expect("listener");
    run.check(run.code() == 0, "the agent restarts the machine");
    run.check(
        got == KIB * 1024 && ok,
        "the host received every byte, intact",
    );
    let tcp = &agent_lines(&run.stdout)["net_tcp"];
    run.check(
        tcp["recv_ok"] == "1",
        "the guest received every byte, intact",
    );
    let (packets, bytes) = tx_counters(&run);
    run.check(
        packets > 0 && bytes / packets <= 1514 + 12,
        &format!("no TSO: {bytes} bytes in {packets} frames"),
    );
}
