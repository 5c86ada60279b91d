//! A real Linux guest with a disk and a NIC, snapshotted and restored under
//! KVM: one boot, then
//!
//! 1. the guest's test agent beats once a second (checks a memory pattern
//!    it keeps, writes a numbered block to its disk and syncs it, prints a
//!    line); the host pings it through its tap;
//! 2. it is paused, snapshotted and its process killed;
//! 3. a new process restores it: the kernel log goes on (no second boot
//!    banner), the beats go on from the next number with the memory
//!    pattern intact, the disk writes go on where they were, and it
//!    answers ping on its tap;
//! 4. two diff snapshots of the restored guest, merged onto the full one
//!    (`ember snapshot rebase`), restore and pass the same checks;
//! 5. three clones restored at once from the same snapshot, each in its
//!    own network namespace on its own tap and disk copy (the load's
//!    overrides), all run; their memory (PSS) is reported.
//!
//! The host reads the disk images afterwards and checks every block the
//! guest wrote, byte for byte. The disk is served by an I/O thread of its
//! own (`iothread=on`), paused with the VM.

use std::path::Path;
use std::time::{Duration, Instant};

use ember_tests::beat::{beats, check_continued, check_disk, wait_beat};
use ember_tests::http::Api;
use ember_tests::{
    guest_kernel_dir, kvm_available, netns_available, run_ember, spawn_ember_in_netns, NetNs,
    TempDir,
};

const BOOT: Duration = Duration::from_secs(300);
const HOST: &str = "10.201.0.1";
const GUEST: &str = "10.201.0.2";
const DISK_BYTES: usize = 4 << 20;

fn cmdline() -> String {
    format!(
        "console=ttyS0 quiet panic=1 ember.agent=on ember.sleep=3600 \
         ember.beat=vda:3600:2 ip={GUEST}::{HOST}:255.255.255.0::eth0:off"
    )
}

fn ping(ns: &NetNs) -> Result<String, String> {
    ns.exec(&["ping", "-c", "3", "-i", "0.3", "-W", "5", GUEST])
}

/// Proportional set size of `pid`, in KiB.
fn pss_kib(pid: i32) -> u64 {
    field_kib(&format!("/proc/{pid}/smaps_rollup"), "Pss:")
}

fn field_kib(file: &str, key: &str) -> u64 {
    std::fs::read_to_string(file)
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with(key))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

#[test]
fn snapshot_real_guest_restores_and_clones_keep_memory_disk_and_network() {
    let name = "snapshot_real_guest_restores_and_clones_keep_memory_disk_and_network";
    if !kvm_available(name) || !netns_available(name) {
        return;
    }
    let dir = TempDir::new("snapshot-guest");
    let kernel = guest_kernel_dir().join("vmlinux");
    let disk = dir.write("disk.img", &vec![0u8; DISK_BYTES]);
    let (state, mem) = (dir.path("vm.state"), dir.path("vm.mem"));
    let sock = dir.path("api.sock");
    let host_addr = format!("{HOST}/24");
    let ns = NetNs::new("snap", &[("tap0", &host_addr)]).expect("netns");
    // The disk on its own I/O thread: it pauses for the snapshot, and the
    // restored guest and its clones get one too (the saved configuration).
    let disk_flag = format!("path={},iothread=on", disk.display());
    let cmd = cmdline();
    let mut source = spawn_ember_in_netns(
        &ns.name,
        &[
            "--api-sock",
            sock.to_str().unwrap(),
            "--kernel",
            kernel.to_str().unwrap(),
            "--memory",
            "256",
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
    let before = ping(&ns).unwrap_or_else(|e| panic!("ping before the snapshot: {e}"));
    assert!(before.contains(" 0% packet loss"), "{before}");

    let mut api = Api::connect(&sock);
    api.call("PATCH", "/vm", Some(r#"{"state": "Paused"}"#), 204);
    let source_rss = field_kib(&format!("/proc/{}/status", source.pid()), "VmRSS:");
    let create = format!(
        r#"{{"snapshot_path": "{}", "mem_file_path": "{}", "snapshot_type": "Full"}}"#,
        state.display(),
        mem.display()
    );
    api.call("PUT", "/snapshot/create", Some(&create), 204);
    let console = source.stdout_so_far();
    source.signal(libc::SIGKILL);
    let _ = source.finish(BOOT);
    let last = beats(&console).iter().map(|b| b.0).max().unwrap();
    assert!(
        beats(&console).iter().all(|&(_, m, d)| m && d),
        "beats before the snapshot are good:\n{console}"
    );
    let mem_meta = std::fs::metadata(&mem).unwrap();
    let allocated = std::os::unix::fs::MetadataExt::blocks(&mem_meta) * 512;
    eprintln!(
        "snapshot: memory file {} MiB apparent, {} MiB on disk; state file {} bytes; source RSS {} MiB",
        mem_meta.len() >> 20,
        allocated >> 20,
        std::fs::metadata(&state).unwrap().len(),
        source_rss >> 10
    );
    assert!(allocated < mem_meta.len() / 2, "zero pages are holes");
    // Clone disks: copies of the disk as the snapshot left it.
    let clone_disks: Vec<_> = (1..=3)
        .map(|k| {
            let p = dir.path(&format!("clone{k}.img"));
            std::fs::copy(&disk, &p).unwrap();
            p
        })
        .collect();

    let restore_args = |extra: &[String]| -> Vec<String> {
        let mut v = vec![
            "--restore".to_string(),
            state.display().to_string(),
            "--restore-mem".to_string(),
            mem.display().to_string(),
            "--resume".to_string(),
        ];
        v.extend_from_slice(extra);
        v
    };

    // 1. A new process continues the guest, tracking dirty pages; two diff
    //    snapshots of it follow.
    let sock_r = dir.path("restored.sock");
    let args = restore_args(&[
        "--api-sock".into(),
        sock_r.display().to_string(),
        "--restore-track-dirty-pages".into(),
    ]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let t = Instant::now();
    let mut restored = spawn_ember_in_netns(&ns.name, &args, b"");
    let after = wait_beat(&mut restored, last + 2, BOOT);
    eprintln!("restored: beat {} in {:?}", last + 2, t.elapsed());
    let after_ping = ping(&ns);
    let pinged = after_ping.unwrap_or_else(|e| panic!("ping after the restore: {e}"));
    assert!(
        pinged.contains(" 0% packet loss"),
        "the restored guest answers ping on its tap:\n{pinged}"
    );
    let threads = ember_tests::thread_seccomp_modes(restored.pid());
    assert!(
        threads.iter().any(|(n, _)| n == "ember-blk0"),
        "the restored disk has its I/O thread: {threads:?}"
    );
    let mut api = Api::connect(&sock_r);
    let diff = |api: &mut Api, name: &str| {
        api.call("PATCH", "/vm", Some(r#"{"state": "Paused"}"#), 204);
        let body = format!(
            r#"{{"snapshot_path": "{}", "mem_file_path": "{}", "snapshot_type": "Diff"}}"#,
            dir.path(&format!("{name}.state")).display(),
            dir.path(&format!("{name}.mem")).display()
        );
        api.call("PUT", "/snapshot/create", Some(&body), 204);
    };
    diff(&mut api, "diff1");
    let seen = beats(&after).iter().map(|b| b.0).max().unwrap();
    api.call("PATCH", "/vm", Some(r#"{"state": "Resumed"}"#), 204);
    wait_beat(&mut restored, seen + 2, BOOT);
    diff(&mut api, "diff2");
    let restored_console = restored.stdout_so_far();
    restored.signal(libc::SIGKILL);
    let run = restored.finish(BOOT);
    run.check(!run.stderr.contains("panicked"), "no panic");
    let last_restored = check_continued(&restored_console, &console, "the restored guest");
    // The disk holds every beat's block, before and after the restore.
    check_disk(&disk, last_restored);
    let on_disk =
        |p: &Path| std::os::unix::fs::MetadataExt::blocks(&std::fs::metadata(p).unwrap()) * 512;
    let (d1, d2) = (
        on_disk(&dir.path("diff1.mem")),
        on_disk(&dir.path("diff2.mem")),
    );
    eprintln!(
        "diffs: {} KiB and {} KiB on disk against the full snapshot's {} KiB",
        d1 >> 10,
        d2 >> 10,
        allocated >> 10
    );
    assert!(
        d1 < allocated / 2 && d2 < allocated / 2,
        "a diff holds what changed only"
    );

    // 2. Full + diff 1 + diff 2 merged: the merged snapshot restores.
    let merged = dir.path("merged.mem");
    std::fs::copy(&mem, &merged).unwrap();
    for d in ["diff1.mem", "diff2.mem"] {
        let run = run_ember(
            &[
                "snapshot",
                "rebase",
                "--memory-path",
                merged.to_str().unwrap(),
                "--diff-path",
                dir.path(d).to_str().unwrap(),
            ],
            b"",
            BOOT,
        );
        run.check(run.code() == 0, "rebase");
    }
    let diff2_state = dir.path("diff2.state");
    let args = [
        "--restore",
        diff2_state.to_str().unwrap(),
        "--restore-mem",
        merged.to_str().unwrap(),
        "--resume",
    ];
    let mut merged_vm = spawn_ember_in_netns(&ns.name, &args, b"");
    let out = wait_beat(&mut merged_vm, last_restored + 2, BOOT);
    let merged_ping = ping(&ns);
    merged_vm.signal(libc::SIGTERM);
    let run = merged_vm.finish(BOOT);
    let last_merged = check_continued(&out, &restored_console, "the merged snapshot's guest");
    let p = merged_ping.unwrap_or_else(|e| panic!("ping the merged snapshot's guest: {e}"));
    run.check(p.contains(" 0% packet loss"), &p);
    check_disk(&disk, last_merged);

    // 3. Three clones of the full snapshot at once, each on its own tap
    //    and disk.
    let mut clones = Vec::new();
    let mut spaces = Vec::new();
    for (k, clone_disk) in clone_disks.iter().enumerate() {
        let tap = format!("tap{}", k + 1);
        let cns = NetNs::new("clone", &[(&tap, &host_addr)]).expect("netns");
        let args = restore_args(&[
            "--restore-net".into(),
            format!("net0={tap}"),
            "--restore-disk".into(),
            format!("drive0={}", clone_disk.display()),
        ]);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        clones.push(spawn_ember_in_netns(&cns.name, &args, b""));
        spaces.push(cns);
    }
    let mut pss = Vec::new();
    for (k, c) in clones.iter_mut().enumerate() {
        let out = wait_beat(c, last + 2, BOOT);
        check_continued(&out, &console, &format!("clone {}", k + 1));
        pss.push(pss_kib(c.pid()));
    }
    for (k, cns) in spaces.iter().enumerate() {
        let p = ping(cns).unwrap_or_else(|e| panic!("ping clone {}: {e}", k + 1));
        assert!(p.contains(" 0% packet loss"), "clone {}: {p}", k + 1);
    }
    let mut lasts = Vec::new();
    for c in clones {
        c.signal(libc::SIGTERM);
        let run = c.finish(BOOT);
        run.check(!run.stderr.contains("panicked"), "no panic");
        lasts.push(beats(&run.stdout).iter().map(|b| b.0).max().unwrap());
    }
    for (d, l) in clone_disks.iter().zip(&lasts) {
        check_disk(d, *l);
    }
    let total: u64 = pss.iter().sum();
    eprintln!(
        "clones: PSS {:?} KiB, {} MiB in all; the source's RSS was {} MiB",
        pss,
        total >> 10,
        source_rss >> 10
    );
    assert!(
        total < source_rss * 2,
        "three clones share the snapshot's pages: {total} KiB of PSS for a {source_rss} KiB guest"
    );
}
