//! Guest- and neighbour-triggered denial of service, with a hostile tiny
//! guest on virtio-mmio: ember's own threads stay responsive (the API's
//! `GET /` answered within 50 ms throughout) and its memory stays
//! bounded.
//!
//! The guest is a driver written to hurt: it brings its virtio-blk up
//! through the MMIO registers with one descriptor whose `next` is itself
//! (an endless chain) and then, forever, publishes that chain again and
//! notifies the queue: millions of notifications, an avail index that
//! runs ahead of the ring, chains that never end. Meanwhile, from the
//! host, a vsock connection storm (thousands of connections to the Unix
//! socket, most sending `CONNECT` to a guest that never answers) and a
//! balloon the guest never answers (it never set its balloon up: inflate
//! and statistics requests stay unanswered).

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use ember_tests::http::{check_latency, Api};
use ember_tests::{kvm_available, proc_kib, spawn_ember, tiny_elf, Running, TempDir};

const TIMEOUT: Duration = Duration::from_secs(60);
/// The first virtio-mmio window (the disk's: devices are placed in order).
const MMIO: u32 = 0xd000_0000;
/// The ring, in guest memory: descriptors, avail, used; the data buffer.
const DESC: u32 = 0x20_0000;
const AVAIL: u32 = 0x20_1000;
const USED: u32 = 0x20_2000;
const DATA: u32 = 0x30_0000;
/// The API's promise under attack.
const API_BUDGET_MS: f64 = 50.0;

/// x86-64 machine code, one instruction at a time.
#[derive(Default)]
struct Code(Vec<u8>);

impl Code {
    /// `movl $value, addr` (an absolute address below 2 GiB).
    fn store32(&mut self, addr: u32, value: u32) -> &mut Self {
        self.0.extend([0xc7, 0x04, 0x25]);
        self.0.extend(addr.to_le_bytes());
        self.0.extend(value.to_le_bytes());
        self
    }

    /// `movl $value, off(%rbx)`: a register of the MMIO window in %rbx.
    fn mmio(&mut self, off: u32, value: u32) -> &mut Self {
        self.0.extend([0xc7, 0x83]);
        self.0.extend(off.to_le_bytes());
        self.0.extend(value.to_le_bytes());
        self
    }

    /// `mov $value, %ebx` (zero-extended into %rbx).
    fn rbx(&mut self, value: u32) -> &mut Self {
        self.0.push(0xbb);
        self.0.extend(value.to_le_bytes());
        self
    }

    /// `mov $0x3f8,%dx ; mov $c,%al ; out %al,(%dx)`: one byte on COM1.
    fn putc(&mut self, c: u8) -> &mut Self {
        self.0.extend([0x66, 0xba, 0xf8, 0x03, 0xb0, c, 0xee]);
        self
    }
}

/// The hostile driver. Virtio-mmio version 2 registers: DriverFeatures
/// 0x20, DriverFeaturesSel 0x24, QueueSel 0x30, QueueNum 0x38, QueueReady
/// 0x44, QueueNotify 0x50, Status 0x70, QueueDesc 0x80, QueueDriver 0x90,
/// QueueDevice 0xa0.
fn hostile_driver() -> Vec<u8> {
    let mut c = Code::default();
    // Descriptor 0: 16 bytes at DATA, NEXT, next = 0: itself, forever.
    c.store32(DESC, DATA)
        .store32(DESC + 4, 0)
        .store32(DESC + 8, 16)
        .store32(DESC + 12, 1);
    c.rbx(MMIO)
        .mmio(0x70, 1)
        .mmio(0x70, 3)
        .mmio(0x24, 1)
        .mmio(0x20, 1) // VIRTIO_F_VERSION_1 (bit 32)
        .mmio(0x24, 0)
        .mmio(0x20, 0)
        .mmio(0x70, 0xb) // FEATURES_OK
        .mmio(0x30, 0)
        .mmio(0x38, 16)
        .mmio(0x80, DESC)
        .mmio(0x84, 0)
        .mmio(0x90, AVAIL)
        .mmio(0x94, 0)
        .mmio(0xa0, USED)
        .mmio(0xa4, 0)
        .mmio(0x44, 1)
        .mmio(0x70, 0xf) // DRIVER_OK
        .putc(b'F');
    // loop: incw AVAIL+2 (the avail index; every ring slot is 0, the
    // endless chain) ; movl $0, 0x50(%rbx) (notify) ; jmp loop
    let top = c.0.len();
    c.0.extend([0x66, 0xff, 0x04, 0x25]);
    c.0.extend((AVAIL + 2).to_le_bytes());
    c.mmio(0x50, 0);
    let back = i8::try_from(top as isize - (c.0.len() as isize + 2)).unwrap();
    c.0.extend([0xeb, back.to_le_bytes()[0]]);
    c.0
}

/// `GET /` every 10 ms for `dur`; the round trips, in ms, or a panic
/// with what went wrong and ember's last words.
fn probe(api: &mut Api, vm: &mut Option<Running>, dur: Duration) -> Vec<f64> {
    api.probe_root(dur).unwrap_or_else(|e| {
        let vm = vm.take().expect("ember");
        vm.signal(libc::SIGKILL);
        let run = vm.finish(TIMEOUT);
        panic!("{e}; ember said:\n{}", run.stderr);
    })
}

/// Asserts the API kept its budget; prints the figures.
fn check_budget(what: &str, v: Vec<f64>) {
    check_latency(&format!("guest_dos: {what}"), v, API_BUDGET_MS);
}

fn rss_kib(vm: &Running) -> u64 {
    proc_kib(&format!("/proc/{}/status", vm.pid()), "VmRSS").unwrap_or(0)
}

#[test]
fn guest_dos_notification_flood_endless_chains_vsock_storm_and_a_mute_balloon() {
    let name = "guest_dos_notification_flood_endless_chains_vsock_storm_and_a_mute_balloon";
    if !kvm_available(name) {
        return;
    }
    let dir = TempDir::new("guest-dos");
    let kernel = dir.write("hostile.elf", &tiny_elf(&hostile_driver()));
    let disk = dir.write("disk.img", &vec![0u8; 1 << 20]);
    let sock = dir.path("api.sock");
    let uds = dir.path("v.sock");
    let disk_flag = format!("path={}", disk.display());
    let vsock_flag = format!("cid=3,uds_path={}", uds.display());
    let mut vm = Some(spawn_ember(
        &[
            "--api-sock",
            sock.to_str().unwrap(),
            "--kernel",
            kernel.to_str().unwrap(),
            "--memory",
            "64",
            "--transport",
            "mmio",
            "--disk",
            &disk_flag,
            "--vsock",
            &vsock_flag,
            "--balloon",
            "amount_mib=0,stats_polling_interval_s=1",
            "--log-level",
            "info",
        ],
        b"",
    ));
    let ember = vm.as_mut().unwrap();
    assert!(
        ember.wait_for_output("F", TIMEOUT),
        "the hostile driver brought its disk up: {}",
        ember.stdout_so_far()
    );
    let mut api = Api::connect(&sock);
    let rss_before = rss_kib(vm.as_ref().unwrap());

    // 1. The flood alone.
    check_budget(
        "notification flood with endless chains",
        probe(&mut api, &mut vm, Duration::from_secs(3)),
    );

    // 2. A vsock connection storm on top: 4 threads, each opening
    //    connections as fast as it can for 3 s; most ask for a port of a
    //    guest whose vsock is not even set up.
    let stop = Instant::now() + Duration::from_secs(3);
    let storm: Vec<_> = (0..4)
        .map(|i| {
            let uds = uds.clone();
            std::thread::spawn(move || {
                let mut opened = 0u32;
                let mut held = Vec::new();
                while Instant::now() < stop {
                    let Ok(mut s) = UnixStream::connect(&uds) else {
                        continue;
                    };
                    opened += 1;
                    if (opened + i) % 4 != 0 {
                        let _ = s.write_all(b"CONNECT 5000\n");
                    }
                    // Keep some open: the storm holds connections too.
                    if held.len() < 64 {
                        held.push(s);
                    }
                }
                opened
            })
        })
        .collect();
    let during_storm = probe(&mut api, &mut vm, Duration::from_secs(3));
    let opened: u32 = storm.into_iter().map(|t| t.join().unwrap()).sum();
    check_budget(
        &format!("... and a vsock storm of {opened} connections"),
        during_storm,
    );
    // The socket still serves: a client gets an answer (a close, since
    // the guest has no vsock driver) within the request timeout.
    let mut s = UnixStream::connect(&uds).expect("vsock socket still accepts");
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(b"CONNECT 5000\n").unwrap();
    let mut b = Vec::new();
    let answered = s.read_to_end(&mut b).is_ok();
    assert!(answered, "a vsock client after the storm gets its answer");

    // 3. A balloon the guest never answers: inflating and asking for
    //    statistics answer at once, the API keeps its budget.
    let t = Instant::now();
    let inflate = api
        .client
        .request("PATCH", "/balloon", Some(r#"{"amount_mib": 32}"#));
    let stats = api.client.request("GET", "/balloon/statistics", None);
    let balloon_ms = t.elapsed().as_secs_f64() * 1000.0;
    eprintln!(
        "guest_dos: mute balloon: PATCH /balloon {} and GET /balloon/statistics {} in {balloon_ms:.1} ms",
        inflate.status, stats.status
    );
    assert!(
        inflate.status == 204 || inflate.status == 400,
        "{inflate:?}"
    );
    assert!(balloon_ms < 2.0 * API_BUDGET_MS, "{balloon_ms} ms");
    check_budget(
        "... and a balloon that never answers",
        probe(&mut api, &mut vm, Duration::from_secs(2)),
    );

    let rss_after = rss_kib(vm.as_ref().unwrap());
    eprintln!("guest_dos: ember resident {rss_before} KiB before, {rss_after} KiB after");
    assert!(
        rss_after < rss_before + 16 * 1024,
        "ember's memory stays bounded: {rss_before} -> {rss_after} KiB"
    );
    drop(api);
    let vm = vm.take().unwrap();
    vm.signal(libc::SIGTERM);
    let run = vm.finish(TIMEOUT);
    run.check(run.code() == 143, "SIGTERM ends ember with 143");
    run.check(!run.stderr.contains("panicked"), "no panic");
    // The endless chains and the runaway index were refused, and said so
    // a bounded number of times (once per kind, then at debug level).
    let blk: Vec<&str> = run
        .stderr
        .lines()
        .filter(|l| l.contains("virtio-blk") && l.contains("warn"))
        .collect();
    eprintln!("guest_dos: ember's warnings about the disk: {blk:#?}");
    run.check(
        blk.len() <= 4 && blk.iter().filter(|l| l.contains("malformed")).count() <= 1,
        "the hostile driver cannot flood the log",
    );
}
