//! What orchestrators do, end to end on one real guest: Firecracker's
//! getting-started sequence over the API (logger, boot source with
//! `pci=off`, root drive, NIC on a tap, machine config, vsock, entropy,
//! InstanceStart) with the same JSON bodies, then, while the guest runs:
//!
//! - the guest's hwrng (virtio-rng over virtio-mmio) gives it random bytes;
//! - the guest writes a second disk and reads a third one whole (both
//!   added with `PUT /drives`), over virtio-mmio announced in the DSDT; the
//!   host checks the written blocks and the guest's checksum of the read;
//! - the guest connects to a host listener on `<uds_path>_6000` and the two
//!   exchange 512 KiB each way, checked on both sides; a guest connection to
//!   a port no host program listens on is refused;
//! - a host program connects to the guest's echo listener through
//!   `uds_path` (`CONNECT 5000` / `OK <port>`) and 2 MiB come back intact,
//!   with the guest's checksum of them;
//! - 64 host connections at once, each echoed;
//! - a client that leaves mid-stream, a port no guest socket listens on (a
//!   clean close), and garbage on the socket (refused, ember unaffected:
//!   the next client goes through);
//! - the host pings the guest on its NIC.

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::time::Duration;

use ember_tests::http::Client;
use ember_tests::{
    agent_all, fnv1a, guest_kernel_dir, kvm_available, net_pattern_byte, netns_available,
    pattern_block, pattern_offsets, random_bytes, rootfs_image, spawn_ember_in_netns, NetNs,
    TempDir,
};

const BOOT_TIMEOUT: Duration = Duration::from_secs(900);
const MIB: u64 = 1024 * 1024;
/// The disk the guest writes: BLOCKS 4 KiB blocks of seed SEED.
const DISK_SIZE: u64 = 64 * MIB;
const BLOCKS: u64 = 32;
const SEED: u64 = 5151;
const LISTEN_PORT: u32 = 5000;
const HOST_PORT: u32 = 6000;
const GUEST_KIB: u64 = 512;
/// The echoed stream.
const ECHO_BYTES: u64 = 2 << 20;
/// Each of the 64 connections.
const EACH_BYTES: u64 = 32 * 1024;

fn put(api: &mut Client, path: &str, body: &str) {
    let r = api.request("PUT", path, Some(body));
    assert_eq!(r.status, 204, "PUT {path} {body}: {r:?}");
}

fn pattern(seed: u64, len: u64) -> Vec<u8> {
    (0..len).map(|pos| net_pattern_byte(seed, pos)).collect()
}

/// Connects through `uds` to guest port `port`: the `OK` line's host port.
fn connect(uds: &Path, port: u32) -> Result<(UnixStream, u32), String> {
    let mut s = UnixStream::connect(uds).map_err(|e| format!("connect: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(300))).unwrap();
    s.write_all(format!("CONNECT {port}\n").as_bytes())
        .map_err(|e| format!("write: {e}"))?;
    let mut line = Vec::new();
    let mut b = [0u8; 1];
    loop {
        match s.read(&mut b) {
            Ok(1) if b[0] == b'\n' => break,
            Ok(1) => line.push(b[0]),
            Ok(_) => return Err(format!("closed after {:?}", String::from_utf8_lossy(&line))),
            Err(e) => return Err(format!("read: {e}")),
        }
    }
    let line = String::from_utf8_lossy(&line).into_owned();
    let port = line
        .strip_prefix("OK ")
        .and_then(|p| p.parse().ok())
        .ok_or_else(|| format!("not an OK line: {line:?}"))?;
    Ok((s, port))
}

/// Connects as Kata's runtime does: a request the guest did not answer
/// within ember's (Firecracker's) 2 s is closed before `OK`, and tried
/// again (an emulated guest accepting 64 connections at once can be that
/// slow).
fn connect_retrying(uds: &Path, port: u32) -> Result<(UnixStream, u32), String> {
    let mut last = String::new();
    for _ in 0..10 {
        match connect(uds, port) {
            Ok(c) => return Ok(c),
            Err(e) if e.starts_with("closed after") => last = e,
            Err(e) => return Err(e),
        }
    }
    Err(last)
}

/// Sends `data` to the guest's echo listener and reads what comes back.
fn echo(uds: &Path, data: Vec<u8>) -> Result<Vec<u8>, String> {
    let (s, _) = connect_retrying(uds, LISTEN_PORT)?;
    let mut w = s.try_clone().map_err(|e| e.to_string())?;
    let writer = std::thread::spawn(move || {
        w.write_all(&data)?;
        w.shutdown(std::net::Shutdown::Write)
    });
    let mut got = Vec::new();
    let mut r = s;
    r.read_to_end(&mut got).map_err(|e| format!("read: {e}"))?;
    writer
        .join()
        .map_err(|_| "the writer failed".to_string())?
        .map_err(|e| format!("write: {e}"))?;
    Ok(got)
}

/// The host side of the guest's connection: reads the guest's pattern
/// (seed 1) to its end, answers with GUEST_KIB KiB of seed 2.
fn host_listener(path: PathBuf) -> std::thread::JoinHandle<Result<u64, String>> {
    let listener = UnixListener::bind(&path).expect("bind the host listener");
    std::thread::spawn(move || {
        let (mut s, _) = listener.accept().map_err(|e| e.to_string())?;
        s.set_read_timeout(Some(Duration::from_secs(600))).unwrap();
        let mut got = Vec::new();
        s.read_to_end(&mut got).map_err(|e| format!("read: {e}"))?;
        if got != pattern(1, GUEST_KIB * 1024) {
            return Err(format!(
                "the guest's {} bytes are not its pattern",
                got.len()
            ));
        }
        s.write_all(&pattern(2, GUEST_KIB * 1024))
            .map_err(|e| format!("write: {e}"))?;
        Ok(got.len() as u64)
    })
}

#[test]
fn firecracker_getting_started_with_vsock_and_entropy_on_a_pci_off_guest() {
    let name = "firecracker_getting_started_with_vsock_and_entropy_on_a_pci_off_guest";
    if !kvm_available(name) || !netns_available(name) {
        return;
    }
    let dir = TempDir::new("vsock");
    let ns = NetNs::new("vsock", &[("tap0", "172.16.0.1/30")]).expect("netns");
    let rootfs = dir.path("rootfs.ext4");
    std::fs::copy(rootfs_image(), &rootfs).unwrap();
    let written = dir.path("written.img");
    std::fs::File::create(&written)
        .unwrap()
        .set_len(DISK_SIZE)
        .unwrap();
    let read_bytes = random_bytes(7, usize::try_from(MIB).unwrap());
    let read = dir.write("read.img", &read_bytes);
    let uds = dir.path("v.sock");
    let api_sock = dir.path("firecracker.socket");
    let log = dir.path("firecracker.log");
    std::fs::File::create(&log).unwrap();
    let guest_side = host_listener(PathBuf::from(format!("{}_{HOST_PORT}", uds.display())));
    let api_flag = api_sock.to_str().unwrap().to_string();
    let mut ember = spawn_ember_in_netns(&ns.name, &["--api-sock", &api_flag], b"");
    let mut api = Client::connect(&api_sock, Duration::from_secs(10));

    // Firecracker's docs/getting-started.md, body for body (paths ours).
    put(
        &mut api,
        "/logger",
        &format!(
            r#"{{"log_path": "{}", "level": "Debug", "show_level": true, "show_log_origin": true}}"#,
            log.display()
        ),
    );
    let boot_args = format!(
        "console=ttyS0 reboot=k panic=1 pci=off ip=172.16.0.2::172.16.0.1:255.255.255.252::eth0:off \
         ember.agent=on ember.hwrng=4096 ember.blk_write=vdb:{SEED}:{BLOCKS} ember.blk_read=vdc \
         ember.vsock_listen={LISTEN_PORT} \
         ember.vsock_connect={HOST_PORT}:{GUEST_KIB}:{GUEST_KIB} ember.vsock_refused=6001 ember.sleep=900"
    );
    put(
        &mut api,
        "/boot-source",
        &format!(
            r#"{{"kernel_image_path": "{}", "boot_args": "{boot_args}"}}"#,
            guest_kernel_dir().join("vmlinux").display()
        ),
    );
    put(
        &mut api,
        "/drives/rootfs",
        &format!(
            r#"{{"drive_id": "rootfs", "path_on_host": "{}", "is_root_device": true, "is_read_only": false}}"#,
            rootfs.display()
        ),
    );
    for (id, path, ro) in [("written", &written, false), ("read", &read, true)] {
        put(
            &mut api,
            &format!("/drives/{id}"),
            &format!(
                r#"{{"drive_id": "{id}", "path_on_host": "{}", "is_root_device": false, "is_read_only": {ro}}}"#,
                path.display()
            ),
        );
    }
    put(
        &mut api,
        "/network-interfaces/net1",
        r#"{"iface_id": "net1", "guest_mac": "06:00:AC:10:00:02", "host_dev_name": "tap0"}"#,
    );
    put(
        &mut api,
        "/machine-config",
        r#"{"vcpu_count": 2, "mem_size_mib": 256}"#,
    );
    put(
        &mut api,
        "/vsock",
        &format!(r#"{{"guest_cid": 3, "uds_path": "{}"}}"#, uds.display()),
    );
    put(
        &mut api,
        "/entropy",
        r#"{"rate_limiter": {"bandwidth": {"size": 1048576, "refill_time": 100}}}"#,
    );
    let bad = api.request(
        "PUT",
        "/vsock",
        Some(r#"{"guest_cid": 1, "uds_path": "x"}"#),
    );
    assert_eq!(bad.status, 400, "{bad:?}");
    let config = api.request("GET", "/vm/config", None).json();
    assert_eq!(config["vsock"]["guest_cid"], 3, "{config}");
    assert!(config["entropy"]["rate_limiter"].is_object(), "{config}");
    put(&mut api, "/actions", r#"{"action_type": "InstanceStart"}"#);
    // Pre-boot only, as in Firecracker.
    let late = api.request("PUT", "/entropy", Some("{}"));
    assert_eq!(late.status, 400, "{late:?}");

    let listening = ember.wait_for_output("EMBER-AGENT vsock_listen", BOOT_TIMEOUT);
    assert!(listening, "the guest's listener: {}", ember.stdout_so_far());
    assert!(
        ember.wait_for_output("EMBER-AGENT sleeping", BOOT_TIMEOUT),
        "the agent's checks: {}",
        ember.stdout_so_far()
    );
    let guest_sent = guest_side.join().expect("the host listener");

    // A host program reaches the guest's listener: 2 MiB echoed.
    let data = pattern(3, ECHO_BYTES);
    let back = echo(&uds, data.clone());

    // 64 connections at once.
    let many: Vec<_> = (0..64u64)
        .map(|i| {
            let uds = uds.clone();
            std::thread::spawn(move || {
                let data = pattern(100 + i, EACH_BYTES);
                echo(&uds, data.clone()).map(|b| b == data)
            })
        })
        .collect();
    let many: Vec<_> = many.into_iter().map(|t| t.join().unwrap()).collect();

    // A client that leaves mid-stream.
    let left = connect_retrying(&uds, LISTEN_PORT).map(|(mut s, _)| {
        let _ = s.write_all(&pattern(4, 256 * 1024));
        drop(s);
    });
    // A port nobody listens on in the guest: a clean close.
    let nobody = match UnixStream::connect(&uds) {
        Ok(mut s) => {
            s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
            s.write_all(b"CONNECT 7777\n").unwrap();
            let mut b = Vec::new();
            s.read_to_end(&mut b).map(|_| b)
        }
        Err(e) => Err(e),
    };
    // Garbage: refused; the next client goes through.
    let garbage = UnixStream::connect(&uds).and_then(|mut s| {
        s.set_read_timeout(Some(Duration::from_secs(30)))?;
        s.write_all(b"GET / HTTP/1.1\r\n\r\n")?;
        let mut b = Vec::new();
        s.read_to_end(&mut b).map(|_| b)
    });
    let after_garbage = echo(&uds, b"still serving".to_vec());
    let ping = ns
        .exec(&["ping", "-c", "2", "-i", "0.5", "-W", "10", "172.16.0.2"])
        .unwrap_or_else(|e| e);
    // Ctrl-Alt-Del ends the guest's sleep.
    put(&mut api, "/actions", r#"{"action_type": "SendCtrlAltDel"}"#);
    let run = ember.finish(BOOT_TIMEOUT);

    let a = agent_all(&run.stdout);
    let ember_log = format!("{}{}", run.stderr, std::fs::read_to_string(&log).unwrap());
    run.check(run.code() == 0, "the guest restarts: exit 0");
    for line in ["vsock: virtio-mmio at", "entropy: virtio-mmio at"] {
        run.check(
            ember_log.contains(line),
            &format!("ember put the device on virtio-mmio ({line:?})"),
        );
    }
    // The DSDT announces them in order (LNRO0005).
    for line in [
        "virtio-blk0: virtio-mmio at 0xd0000000, IRQ 5",
        "virtio-blk1: virtio-mmio at 0xd0001000, IRQ 6",
        "virtio-blk2: virtio-mmio at 0xd0002000, IRQ 7",
    ] {
        run.check(ember_log.contains(line), &format!("ember logged {line:?}"));
    }
    let write = &a["blk_write"][0];
    run.check(
        write["errors"] == "0" && write["dev"] == "vdb",
        &format!("the guest wrote vdb: {write:?}"),
    );
    let image = std::fs::read(&written).unwrap();
    for off in pattern_offsets(SEED, BLOCKS, DISK_SIZE) {
        let o = usize::try_from(off).unwrap();
        run.check(
            image[o..o + 4096] == pattern_block(SEED, off)[..],
            &format!("block at {off:#x} holds the guest's pattern"),
        );
    }
    let r = &a["blk_read"][0];
    run.check(
        r["dev"] == "vdc"
            && r["bytes"] == MIB.to_string()
            && r["fnv1a"] == format!("{:016x}", fnv1a(&read_bytes)),
        &format!("the guest read vdc whole and right: {r:?}"),
    );
    let rng = &a["hwrng"][0];
    run.check(
        rng["name"].starts_with("virtio_rng")
            && rng["bytes"] == "4096"
            && rng["error"] == "0"
            && rng["distinct"].parse::<u32>().unwrap_or(0) > 200,
        &format!("the guest's hwrng is virtio-rng and gives random bytes: {rng:?}"),
    );
    let vc = &a["vsock_connect"][0];
    run.check(
        guest_sent == Ok(GUEST_KIB * 1024)
            && vc["recv_ok"] == "1"
            && vc["errors"] == "0"
            && vc["sent"] == (GUEST_KIB * 1024).to_string(),
        &format!("the guest's connection to <uds>_{HOST_PORT}: host {guest_sent:?}, guest {vc:?}"),
    );
    run.check(
        back.as_ref().is_ok_and(|b| *b == data),
        &format!(
            "2 MiB echoed through the guest: {:?}",
            back.as_ref().map(|b| b.len())
        ),
    );
    let conns = a.get("vsock_conn").cloned().unwrap_or_default();
    let hash = format!("{:016x}", fnv1a(&data));
    run.check(
        conns
            .iter()
            .any(|c| c["bytes"] == ECHO_BYTES.to_string() && c["fnv"] == hash),
        "the guest saw the 2 MiB with the host's checksum",
    );
    run.check(
        many.iter().all(|r| *r == Ok(true)),
        &format!(
            "64 connections at once, each echoed: {} of 64 ({:?})",
            many.iter().filter(|r| **r == Ok(true)).count(),
            many.iter().find(|r| **r != Ok(true))
        ),
    );
    run.check(left.is_ok(), &format!("the client that left: {left:?}"));
    run.check(
        a["vsock_listen"][0]["ret"] == "0",
        "the guest's listener is up",
    );
    let refused = &a["vsock_refused"][0];
    run.check(
        refused["ret"] == "-104",
        &format!("the guest's connection to a port without a host listener is reset: {refused:?}"),
    );
    run.check(
        nobody.as_ref().is_ok_and(|b| b.is_empty()),
        &format!("CONNECT to a port without a listener: a clean close ({nobody:?})"),
    );
    run.check(
        garbage.as_ref().is_ok_and(|b| b.is_empty()) || garbage.is_err(),
        &format!("garbage is refused: {garbage:?}"),
    );
    run.check(
        after_garbage.as_deref() == Ok(&b"still serving"[..]),
        &format!("ember serves the next client: {after_garbage:?}"),
    );
    run.check(
        ping.contains(" 2 received"),
        &format!("the host pings the guest on its virtio-mmio NIC:\n{ping}"),
    );
    let ended = run
        .stderr
        .lines()
        .chain(std::fs::read_to_string(&log).unwrap_or_default().lines())
        .find(|l| l.contains("vsock: ") && l.contains("host connections refused"))
        .map(str::to_owned);
    run.check(
        ended.as_deref().is_some_and(|l| {
            l.contains(" and 1 guest connections") && l.contains(", 1 host connections refused")
        }),
        &format!("ember's exit log counts the connections: {ended:?}"),
    );
    run.check(!uds.exists(), "the vsock socket file is gone with ember");
}
