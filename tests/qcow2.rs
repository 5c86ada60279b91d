//! qcow2 disks with real guests, checked by Debian's `qemu-img`:
//!
//! 1. One boot, two vCPUs, four qcow2 disks (each with a queue per vCPU,
//!    one with `num_queues=1`): the root filesystem (an ext4 image
//!    `qemu-img convert` made into qcow2) mounted read-write as the root
//!    (`root=on`); an image `ember img create` made, written at scattered
//!    offsets, discarded, zeroed and stressed by the guest's agent (on
//!    `io=io_uring`); a
//!    three-image backing chain (raw base, a qcow2 `qemu-io` wrote into,
//!    an overlay `ember img` made) read whole and written; an image with
//!    compressed clusters read whole. Afterwards `qemu-img check` is clean
//!    on every image, `qemu-img convert -O raw` shows the guest's writes,
//!    the base images are unchanged, `e2fsck` finds the root filesystem
//!    clean, and `ember img info`/`check`/`convert` agree with qemu-img.
//! 2. Crash consistency: ember is killed with SIGKILL while the guest
//!    writes and flushes a block a second on a qcow2 disk with 4 KiB
//!    clusters (every write allocates), or while two kernel threads write,
//!    flush and verify blocks all over it; `qemu-img check` finds no
//!    corruption and every block the guest saw flushed is in the image.
//!    `EMBER_QCOW2_CRASH_ROUNDS` sets the number of kills (1 by default:
//!    tests/crash.rs kills ember many times on a qcow2 disk, each from a
//!    restored snapshot rather than a boot).
//!    The first round also swaps a second qcow2 disk through `PATCH
//!    /drives` while the guest writes: the seccomp-filtered event loop
//!    opens the new overlay and its raw backing file, refuses a FIFO at
//!    once, and the guest goes on beating.
// Host-side test code on 64-bit hosts: sizes and offsets fit in usize.
#![allow(clippy::cast_possible_truncation)]

use std::collections::HashMap;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use ember_tests::beat::{beat_block, beats, wait_beat};
use ember_tests::http::Api;
use ember_tests::run_tool as tool;
use ember_tests::{
    agent_ok, ember_img, fnv1a, guest_kernel_dir, kvm_available, pattern_block, pattern_offsets,
    random_bytes, run_ember, spawn_ember, Run, TempDir,
};
use serde_json::Value;

const BOOT_TIMEOUT: Duration = Duration::from_secs(900);
const MIB: u64 = 1 << 20;

fn ok(cmd: &str, args: &[&str]) -> String {
    let (code, out) = tool(cmd, args);
    assert_eq!(code, 0, "{cmd} {args:?} failed:\n{out}");
    out
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// qemu-img is a Debian package (qemu-utils); tools/test installs it.
fn qemu_img_available(test: &str) -> bool {
    let here = Command::new("qemu-img").arg("--version").output().is_ok()
        && Command::new("qemu-io").arg("--version").output().is_ok();
    // CI installs them (tools/test): missing there is a failure, not a skip.
    assert!(
        here || std::env::var_os("CI").is_none(),
        "{test}: qemu-img/qemu-io are missing under CI (tools/test installs qemu-utils)"
    );
    if !here {
        eprintln!(
            "\n!!! SKIPPED {test}: qemu-img/qemu-io are missing (apt-get install qemu-utils)\n"
        );
    }
    here
}

fn qemu_check_json(path: &Path) -> (i32, Value) {
    let (code, out) = tool("qemu-img", &["check", "--output", "json", s(path)]);
    let json = out.find('{').map_or(Value::Null, |i| {
        serde_json::from_str(&out[i..]).unwrap_or(Value::Null)
    });
    (code, json)
}

fn info_json(cmd: &str, path: &Path) -> Value {
    let out = if cmd == "ember" {
        let (code, out) = ember_img(&["info", "--output", "json", s(path)]);
        assert_eq!(code, 0, "ember img info {}:\n{out}", path.display());
        out
    } else {
        ok("qemu-img", &["info", "--output", "json", s(path)])
    };
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{cmd} info JSON: {e}\n{out}"))
}

fn to_raw(path: &Path, out: &Path) -> Vec<u8> {
    ok("qemu-img", &["convert", "-O", "raw", s(path), s(out)]);
    std::fs::read(out).unwrap()
}

/// A compressible 1 MiB pattern: text lines with a counter.
fn compressible() -> Vec<u8> {
    let mut v = Vec::with_capacity(MIB as usize);
    let mut i = 0u64;
    while v.len() < MIB as usize {
        v.extend_from_slice(format!("ember qcow2 compressed line {i:08}\n").as_bytes());
        i += 1;
    }
    v.truncate(MIB as usize);
    v
}

const VDB: u64 = 64 * MIB;
const VDB_DISCARD: u64 = 40 * MIB;
const VDB_ZERO: u64 = 48 * MIB;
const VDB_STRESS: u64 = 56 * MIB;
const RANGE: u64 = 4 * MIB;
const BLOCKS: u64 = 48;

/// A seed whose vdb blocks miss the discard, zero and stress ranges, and
/// whose vdc blocks stay in the chain's 2 MiB.
fn seed_clear_of(ranges: &[(u64, u64)], size: u64) -> u64 {
    (7000..)
        .find(|&s| {
            pattern_offsets(s, BLOCKS, size)
                .into_iter()
                .all(|off| !ranges.iter().any(|&(o, l)| off + 4096 > o && off < o + l))
        })
        .expect("a seed")
}

#[test]
fn qcow2_root_chain_compressed_and_written_disks_check_clean_in_qemu_img() {
    let name = "qcow2_root_chain_compressed_and_written_disks_check_clean_in_qemu_img";
    if !kvm_available(name) || !qemu_img_available(name) {
        return;
    }
    let dir = TempDir::new("qcow2");
    // vda: the root filesystem, made qcow2 by qemu-img.
    let root_ext4 = ember_tests::rootfs_image();
    let root = dir.path("root.qcow2");
    ok(
        "qemu-img",
        &[
            "convert",
            "-f",
            "raw",
            "-O",
            "qcow2",
            s(&root_ext4),
            s(&root),
        ],
    );
    // vdb: made by ember img.
    let vdb = dir.path("vdb.qcow2");
    let (code, out) = ember_img(&["create", "-f", "qcow2", s(&vdb), "64M"]);
    assert_eq!(code, 0, "ember img create:\n{out}");
    assert!(out.contains("fmt=qcow2"), "create says what it made: {out}");
    // Data where the guest will discard and zero, written by qemu-io.
    for off in [VDB_DISCARD, VDB_ZERO] {
        ok(
            "qemu-io",
            &[
                "-f",
                "qcow2",
                "-c",
                &format!("write -P 0xab {off} {RANGE}"),
                s(&vdb),
            ],
        );
    }
    // vdc: raw base <- qcow2 (qemu-io wrote 64 KiB at 1 MiB) <- overlay.
    let base_bytes = random_bytes(21, 2 * MIB as usize);
    let base = dir.write("base.raw", &base_bytes);
    let mid = dir.path("mid.qcow2");
    ok(
        "qemu-img",
        &[
            "create",
            "-f",
            "qcow2",
            "-b",
            "base.raw",
            "-F",
            "raw",
            s(&mid),
        ],
    );
    ok(
        "qemu-io",
        &["-f", "qcow2", "-c", "write -P 0x5a 1M 64k", s(&mid)],
    );
    let top = dir.path("top.qcow2");
    let (code, out) = ember_img(&[
        "create",
        "-f",
        "qcow2",
        "-b",
        "mid.qcow2",
        "-F",
        "qcow2",
        s(&top),
    ]);
    assert_eq!(code, 0, "ember img create -b:\n{out}");
    let mut chain = base_bytes.clone();
    chain[MIB as usize..(MIB + 65536) as usize].fill(0x5a);
    let base_hash = fnv1a(&std::fs::read(&base).unwrap());
    let mid_hash = fnv1a(&std::fs::read(&mid).unwrap());
    // vdd: compressed clusters, made by qemu-img convert -c.
    let comp_bytes = compressible();
    let comp_raw = dir.write("comp.raw", &comp_bytes);
    let comp = dir.path("comp.qcow2");
    ok(
        "qemu-img",
        &[
            "convert",
            "-c",
            "-f",
            "raw",
            "-O",
            "qcow2",
            s(&comp_raw),
            s(&comp),
        ],
    );
    assert!(
        std::fs::metadata(&comp).unwrap().len() < MIB / 2,
        "qemu-img compressed the clusters"
    );

    let vdb_seed = seed_clear_of(
        &[(VDB_DISCARD, RANGE), (VDB_ZERO, RANGE), (VDB_STRESS, RANGE)],
        VDB,
    );
    let vdc_seed = 99;
    let kib = |b: u64| b / 1024;
    let cmdline = format!(
        "console=ttyS0 reboot=k panic=1 quiet loglevel=7 ember.agent=on ember.after=continue \
         ember.blk_read=vdc,vdd ember.blk_write=vdb:{vdb_seed}:{BLOCKS},vdc:{vdc_seed}:{BLOCKS} \
         ember.blk_discard=vdb:{}:{} ember.blk_zeroout=vdb:{}:{} ember.blk_stress=vdb:2:8:{}:{} \
         init=/bin/busybox -- reboot -f",
        kib(VDB_DISCARD),
        kib(RANGE),
        kib(VDB_ZERO),
        kib(RANGE),
        kib(VDB_STRESS),
        kib(RANGE),
    );
    let kernel = guest_kernel_dir().join("vmlinux");
    let disks = [
        format!("path={},format=qcow2,root=on", root.display()),
        // Written, discarded, zeroed and stressed through io_uring: the
        // allocated clusters go to the ring, the rest runs in ember.
        format!("path={},format=qcow2,id=vdb,io=io_uring", vdb.display()),
        format!("path={},format=qcow2", top.display()),
        format!(
            "path={},format=qcow2,read_only=on,num_queues=1",
            comp.display()
        ),
    ];
    let mut args = vec![
        "--kernel",
        s(&kernel),
        "--vcpus",
        "2",
        "--memory",
        "256",
        "--cmdline",
        &cmdline,
    ];
    for d in &disks {
        args.extend(["--disk", d]);
    }
    let run: Run = run_ember(&args, b"", BOOT_TIMEOUT);
    // The guest ends by rebooting after the root is mounted: exit 0.
    let all = agent_ok(&run);
    run.check(
        run.stdout.contains("EXT4-fs (vda): mounted filesystem"),
        "ext4 mounted the qcow2 root",
    );
    run.check(
        run.stdout
            .contains("VFS: Mounted root (ext4 filesystem) on device"),
        "the qcow2 root was mounted read-write",
    );
    // Multiqueue: a queue per vCPU unless the disk says otherwise.
    let queues = |n: usize| {
        run.stdout
            .matches(&format!("{n}/0/0 default/read/poll queues"))
            .count()
    };
    run.check(
        queues(2) == 3 && queues(1) == 1,
        "three disks with a queue per vCPU (2), one with num_queues=1",
    );
    let read = |dev: &str| -> HashMap<String, String> {
        all["blk_read"]
            .iter()
            .find(|l| l.get("dev").map(String::as_str) == Some(dev))
            .cloned()
            .unwrap_or_else(|| panic!("no blk_read line for {dev}"))
    };
    run.check(
        read("vdc")["fnv1a"] == format!("{:016x}", fnv1a(&chain)),
        "the guest reads the backing chain's contents through the overlay",
    );
    run.check(
        read("vdd")["fnv1a"] == format!("{:016x}", fnv1a(&comp_bytes)),
        "the guest reads the compressed clusters right",
    );

    // qemu-img finds every image clean.
    for img in [&root, &vdb, &top, &mid, &comp] {
        let (code, json) = qemu_check_json(img);
        assert_eq!(code, 0, "qemu-img check {}: {json}", img.display());
        assert_eq!(json["check-errors"], 0, "{}: {json}", img.display());
        assert!(json.get("corruptions").is_none() && json.get("leaks").is_none());
        let (code, out) = ember_img(&["check", s(img)]);
        assert_eq!(code, 0, "ember img check {}:\n{out}", img.display());
        assert!(out.contains("No errors were found on the image."), "{out}");
    }
    // vdb holds the guest's blocks; discard and zero-out read as zeros.
    let vdb_raw = to_raw(&vdb, &dir.path("vdb.raw"));
    for off in pattern_offsets(vdb_seed, BLOCKS, VDB) {
        assert!(
            vdb_raw[off as usize..off as usize + 4096] == pattern_block(vdb_seed, off)[..],
            "vdb block at {off} holds the guest's pattern"
        );
    }
    for off in [VDB_DISCARD, VDB_ZERO] {
        assert!(
            vdb_raw[off as usize..(off + RANGE) as usize]
                .iter()
                .all(|&b| b == 0),
            "vdb range at {off} reads as zeros"
        );
    }
    // The chain: base and mid unchanged, the overlay holds the writes.
    assert_eq!(
        fnv1a(&std::fs::read(&base).unwrap()),
        base_hash,
        "base.raw unchanged"
    );
    assert_eq!(
        fnv1a(&std::fs::read(&mid).unwrap()),
        mid_hash,
        "mid.qcow2 unchanged"
    );
    let mut want = chain.clone();
    for off in pattern_offsets(vdc_seed, BLOCKS, 2 * MIB) {
        want[off as usize..off as usize + 4096].copy_from_slice(&pattern_block(vdc_seed, off));
    }
    let top_raw = to_raw(&top, &dir.path("top.raw"));
    assert!(
        top_raw == want,
        "the chain reads base + mid + the guest's writes"
    );
    // ember img convert agrees with qemu-img convert, both ways.
    let ember_raw = dir.path("top.ember.raw");
    let (code, out) = ember_img(&["convert", "-O", "raw", s(&top), s(&ember_raw)]);
    assert_eq!(code, 0, "ember img convert:\n{out}");
    assert!(
        std::fs::read(&ember_raw).unwrap() == want,
        "ember img convert flattens the chain"
    );
    let back = dir.path("top.ember.qcow2");
    let (code, out) = ember_img(&[
        "convert",
        "-f",
        "raw",
        "-O",
        "qcow2",
        s(&ember_raw),
        s(&back),
    ]);
    assert_eq!(code, 0, "ember img convert -O qcow2:\n{out}");
    assert_eq!(
        qemu_check_json(&back).0,
        0,
        "qemu-img checks ember's converted image"
    );
    assert!(
        to_raw(&back, &dir.path("back.raw")) == want,
        "qemu-img reads ember's qcow2"
    );
    // The root: the guest's mount wrote its superblock; the filesystem is clean.
    let root_raw = dir.path("root.raw");
    let after = to_raw(&root, &root_raw);
    let before = std::fs::read(&root_ext4).unwrap();
    assert!(
        after[1024..2048] != before[1024..2048],
        "the guest's mount wrote the ext4 superblock through qcow2"
    );
    ok("e2fsck", &["-fn", s(&root_raw)]);
    // ember img info reports what qemu-img info does.
    for img in [&vdb, &top, &comp, &base] {
        let (e, q) = (info_json("ember", img), info_json("qemu-img", img));
        for key in [
            "format",
            "virtual-size",
            "actual-size",
            "cluster-size",
            "backing-filename",
            "backing-filename-format",
            "full-backing-filename",
            "dirty-flag",
        ] {
            assert_eq!(e.get(key), q.get(key), "{}: info key {key}", img.display());
        }
        if q.get("format-specific").is_some() {
            assert_eq!(
                e["format-specific"]["data"]["compat"],
                q["format-specific"]["data"]["compat"],
                "{}: compat",
                img.display()
            );
            assert_eq!(
                e["format-specific"]["data"]["refcount-bits"],
                q["format-specific"]["data"]["refcount-bits"]
            );
        }
    }
}

#[test]
fn qcow2_sigkill_while_the_guest_flushes_leaves_a_consistent_image_with_every_flushed_write() {
    let name =
        "qcow2_sigkill_while_the_guest_flushes_leaves_a_consistent_image_with_every_flushed_write";
    if !kvm_available(name) || !qemu_img_available(name) {
        return;
    }
    let rounds: u32 = std::env::var("EMBER_QCOW2_CRASH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1);
    let dir = TempDir::new("qcow2-kill");
    let kernel = guest_kernel_dir().join("vmlinux");
    let mut leaks_total = 0u64;
    for round in 0..rounds {
        let img = dir.path(&format!("crash{round}.qcow2"));
        let (code, out) = ember_img(&[
            "create",
            "-f",
            "qcow2",
            "-o",
            "cluster_size=4096",
            s(&img),
            "16M",
        ]);
        assert_eq!(code, 0, "ember img create:\n{out}");
        let disk = format!("path={},format=qcow2", img.display());
        // Odd rounds: killed while 2 threads write, flush and verify 4 KiB
        // blocks all over the second half of the disk (allocating as they
        // go), before the beats start; even rounds: during the beats.
        let stress = round % 2 == 1;
        let cmdline = format!(
            "console=ttyS0 reboot=k panic=1 quiet ember.agent=on \
             ember.beat=vda:600:1 ember.sleep=600{}",
            if stress {
                " ember.blk_stress=vda:2:2000:8192:8192"
            } else {
                ""
            }
        );
        // Round 0 also swaps a second qcow2 disk through the API while the
        // guest writes (the seccomp-filtered event loop opens the new image
        // and its backing file), and refuses a FIFO without blocking.
        let swap = round == 0;
        let sock = dir.path("api.sock");
        let swap_disk;
        let mut args = vec![
            "--kernel",
            s(&kernel),
            "--memory",
            "128",
            "--cmdline",
            &cmdline,
            "--disk",
            &disk,
        ];
        if swap {
            let small = dir.path("swap-small.qcow2");
            assert_eq!(ember_img(&["create", "-f", "qcow2", s(&small), "1M"]).0, 0);
            swap_disk = format!("path={},format=qcow2,drive_id=swap", small.display());
            args.extend(["--api-sock", s(&sock), "--disk", &swap_disk]);
        }
        let mut vm = spawn_ember(&args, b"");
        // Kill at a different beat, and a different moment in it, each round.
        let at = 2 + (round * 3) % 7;
        let pause = Duration::from_millis(u64::from(round * 337 % 1000));
        let out = if stress {
            assert!(
                vm.wait_for_output("EMBER-AGENT numa", BOOT_TIMEOUT),
                "round {round}: the agent starts"
            );
            // Kill while clusters are being allocated: once the image has
            // grown by 16 clusters (the guest is slow here), a moment on.
            let grown = std::time::Instant::now();
            while std::fs::metadata(&img).map_or(0, |m| m.len()) < 36 * 4096
                && grown.elapsed() < Duration::from_secs(300)
            {
                std::thread::sleep(Duration::from_millis(100));
            }
            std::thread::sleep(pause);
            vm.stdout_so_far()
        } else {
            let mut out = wait_beat(&mut vm, at, BOOT_TIMEOUT);
            if swap {
                swap_drive_while_running(&dir, &sock);
                out = wait_beat(&mut vm, at + 1, Duration::from_secs(60));
                assert!(
                    beats(&out).iter().any(|b| b.0 > at),
                    "the guest beats on after the drive swap:\n{out}"
                );
            }
            std::thread::sleep(pause);
            out
        };
        vm.signal(libc::SIGKILL);
        // `finish` counts from the spawn: the boot and the beats are in it.
        let run = vm.finish(BOOT_TIMEOUT + Duration::from_secs(600));
        let seen = beats(&out);
        if stress {
            assert!(
                !run.stdout.contains("blk_stress"),
                "round {round}: killed before the stress ended"
            );
        } else {
            assert!(
                seen.iter().any(|b| b.0 >= at),
                "round {round}: the guest beat to {at} before the kill:\n{}",
                run.stdout
            );
        }
        assert!(
            seen.iter().all(|&(_, _, disk)| disk),
            "round {round}: every beat's write and flush succeeded"
        );
        let (code, json) = qemu_check_json(&img);
        assert!(
            code == 0 || code == 3,
            "round {round}: qemu-img check finds no corruption (exit {code}): {json}"
        );
        assert_eq!(json["check-errors"], 0, "round {round}: {json}");
        assert!(json.get("corruptions").is_none(), "round {round}: {json}");
        leaks_total += json.get("leaks").and_then(Value::as_u64).unwrap_or(0);
        if stress {
            let allocated = json["allocated-clusters"].as_u64().unwrap_or(0);
            assert!(
                allocated > 16,
                "round {round}: the stress had allocated clusters when killed: {json}"
            );
        }
        let raw = to_raw(&img, &dir.path(&format!("crash{round}.raw")));
        for &(n, _, _) in &seen {
            let at = n as usize * 4096;
            assert!(
                raw[at..at + 4096] == beat_block(n)[..],
                "round {round}: beat {n}'s flushed block is in the image"
            );
        }
        eprintln!(
            "round {round}: killed {}, qemu-img check exit {code}",
            if stress {
                "during the stress".to_string()
            } else {
                format!("after beat {}", seen.iter().map(|b| b.0).max().unwrap_or(0))
            }
        );
    }
    eprintln!("{rounds} kills: {leaks_total} leaked clusters in all (no corruption)");
}

/// `PATCH /drives/swap` on a running, seccomp-filtered VM: a FIFO is
/// refused at once (not opened for reading, which would block), then a
/// bigger qcow2 overlay on a raw base is swapped in and the configuration
/// says so.
fn swap_drive_while_running(dir: &TempDir, sock: &Path) {
    let mut api = Api::connect(sock);
    let fifo = dir.path("swap.fifo");
    let c = std::ffi::CString::new(s(&fifo)).unwrap();
    // SAFETY: a valid NUL-terminated path; mkfifo only creates the node.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    let body = |p: &Path| {
        format!(
            r#"{{"drive_id": "swap", "path_on_host": "{}"}}"#,
            p.display()
        )
    };
    let r = api.call("PATCH", "/drives/swap", Some(&body(&fifo)), 400);
    assert!(
        r.fault().contains("not a regular file or a block device"),
        "{}",
        r.fault()
    );
    let base = dir.write("swap-base.raw", &random_bytes(5, (4 * MIB) as usize));
    let big = dir.path("swap-big.qcow2");
    let (code, out) = ember_img(&[
        "create",
        "-f",
        "qcow2",
        "-b",
        s(&base),
        "-F",
        "raw",
        s(&big),
        "8M",
    ]);
    assert_eq!(code, 0, "{out}");
    api.call("PATCH", "/drives/swap", Some(&body(&big)), 204);
    let cfg = api.call("GET", "/vm/config", None, 200).json();
    let drives = cfg["drives"].as_array().expect("drives");
    assert!(
        drives
            .iter()
            .any(|d| d["drive_id"] == "swap" && d["path_on_host"] == s(&big)),
        "the configuration names the new image: {cfg}"
    );
}
