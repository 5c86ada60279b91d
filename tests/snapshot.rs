//! Snapshots under KVM: a guest paused, saved to a state file and a memory
//! file, its process killed, and a new process continuing it; every bad
//! snapshot refused with one clear error while ember keeps serving.
//!
//! The tiny-guest test runs in seconds: a counting guest shows that the
//! restored vCPU goes on exactly where it stopped. The real-guest test
//! (Linux with a disk and a NIC) is in `snapshot_guest.rs`.

use std::os::unix::fs::MetadataExt;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use ember_tests::http::Api;
use ember_tests::{
    assert_clean_error, ember_bin, kvm_available, spawn_ember, spawn_ember_env, tiny_elf, Running,
    TempDir, TINY_COUNTER,
};

const TIMEOUT: Duration = Duration::from_secs(60);

/// Waits until the guest has printed at least `n` bytes; returns them.
fn wait_output(ember: &mut Running, n: usize) -> String {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let out = ember.stdout_so_far();
        if out.len() >= n || Instant::now() > deadline {
            return out;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn vcpu_threads(pid: i32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .map(|d| {
            d.flatten()
                .filter(|t| {
                    std::fs::read_to_string(t.path().join("comm"))
                        .is_ok_and(|c| c.starts_with("ember-vcpu"))
                })
                .count()
        })
        .unwrap_or(0)
}

fn files_in(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .collect();
    v.sort();
    v
}

/// CRC-64/XZ, as the state file's trailer.
fn crc64_xz(bytes: &[u8]) -> u64 {
    let mut crc = !0u64;
    for &b in bytes {
        crc ^= u64::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xc96c_5795_d787_0f42
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

fn load_body(state: &Path, mem: &str) -> String {
    format!(r#"{{"snapshot_path": "{}", {mem}}}"#, state.display())
}

fn file_backend(mem: &Path) -> String {
    format!(
        r#""mem_backend": {{"backend_type": "File", "backend_path": "{}"}}"#,
        mem.display()
    )
}

#[test]
fn snapshot_tiny_guest_continues_where_it_stopped_and_bad_snapshots_are_refused() {
    if !kvm_available(
        "snapshot_tiny_guest_continues_where_it_stopped_and_bad_snapshots_are_refused",
    ) {
        return;
    }
    let dir = TempDir::new("snapshot-tiny");
    let kernel = dir.write("counter.elf", &tiny_elf(&TINY_COUNTER));
    let disk = dir.write("disk.img", &vec![0u8; 1 << 20]);
    let (state, mem) = (dir.path("vm.state"), dir.path("vm.mem"));
    let sock = dir.path("api.sock");
    let disk_flag = format!("path={}", disk.display());
    let mut source = spawn_ember(
        &[
            "--api-sock",
            sock.to_str().unwrap(),
            "--kernel",
            kernel.to_str().unwrap(),
            "--memory",
            "32",
            "--disk",
            &disk_flag,
        ],
        b"",
    );
    let before = wait_output(&mut source, 16);
    assert!(before.len() >= 16, "the guest counts: {before:?}");
    let mut api = Api::connect(&sock);
    let create = format!(
        r#"{{"snapshot_path": "{}", "mem_file_path": "{}"}}"#,
        state.display(),
        mem.display()
    );
    let r = api.call("PUT", "/snapshot/create", Some(&create), 400);
    assert!(r.fault().contains("paused"), "{}", r.fault());
    api.call("PATCH", "/vm", Some(r#"{"state": "Paused"}"#), 204);
    api.call("PUT", "/snapshot/create", Some(&create), 204);
    let printed = source.stdout_so_far();
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(source.stdout_so_far(), printed, "nothing runs while paused");
    source.signal(libc::SIGKILL);
    let _ = source.finish(TIMEOUT);

    // 32 MiB of guest memory, a few pages of it touched: a sparse file.
    let m = std::fs::metadata(&mem).unwrap();
    assert_eq!(m.len(), 32 << 20);
    assert!(m.blocks() * 512 < 2 << 20, "zero pages are holes: {m:?}");
    let state_bytes = std::fs::read(&state).unwrap();
    assert_eq!(&state_bytes[..8], b"EMBERSNP");

    // A new process continues the count where the old one stopped.
    let mut restored = spawn_ember(
        &[
            "--restore",
            state.to_str().unwrap(),
            "--restore-mem",
            mem.to_str().unwrap(),
            "--resume",
        ],
        b"",
    );
    let after = wait_output(&mut restored, 8);
    restored.signal(libc::SIGTERM);
    let run = restored.finish(TIMEOUT);
    let last = printed.bytes().last().unwrap();
    let first = after.bytes().next();
    run.check(
        first == Some(b'0' + (last - b'0' + 1) % 8),
        &format!("the count goes on from {:?}: {after:?}", last as char),
    );

    // Bad snapshots, each refused by one ember that stays not started,
    // starts no vCPU, creates no file and then loads the good one.
    let sock2 = dir.path("api2.sock");
    let mut target = spawn_ember(&["--api-sock", sock2.to_str().unwrap()], b"");
    let mut api = Api::connect(&sock2);
    let bad = |name: &str, bytes: &[u8]| dir.write(name, bytes);
    let mut flipped = state_bytes.clone();
    let mid = flipped.len() / 2;
    flipped[mid] ^= 0x01;
    let mut version = state_bytes.clone();
    version[8..12].copy_from_slice(&2u32.to_le_bytes());
    let n = version.len() - 8;
    let crc = crc64_xz(&version[..n]);
    version[n..].copy_from_slice(&crc.to_le_bytes());
    let short_mem = dir.write("short.mem", &vec![0u8; 16 << 20]);
    let moved_disk = dir.path("disk.moved");
    std::fs::rename(&disk, &moved_disk).unwrap();
    let cases: Vec<(PathBuf, String, &str)> = vec![
        (
            bad("truncated.state", &state_bytes[..state_bytes.len() / 2]),
            file_backend(&mem),
            "truncated",
        ),
        (bad("flipped.state", &flipped), file_backend(&mem), "CRC64"),
        (
            bad("version.state", &version),
            file_backend(&mem),
            "format version 2 is not supported: this ember reads version 1",
        ),
        (
            state.clone(),
            file_backend(&short_mem),
            "the memory file is 16777216 bytes, the guest's RAM needs 33554432",
        ),
        (state.clone(), file_backend(&mem), "cannot open disk image"),
        (
            dir.path("missing.state"),
            file_backend(&mem),
            "No such file",
        ),
    ];
    let files = files_in(dir.path("").as_path());
    for (state_file, backend, needle) in &cases {
        let r = api.call(
            "PUT",
            "/snapshot/load",
            Some(&load_body(state_file, backend)),
            400,
        );
        assert!(
            r.fault().contains(needle),
            "{}: {:?} should say {needle:?}",
            state_file.display(),
            r.fault()
        );
        assert_eq!(api.state(), "Not started");
        assert_eq!(vcpu_threads(target.pid()), 0, "no vCPU was started");
    }
    assert_eq!(files_in(dir.path("").as_path()), files, "no file was left");

    // A page-fault handler that accepts the handshake and never serves.
    let uffd_sock = dir.path("uffd.sock");
    let listener = UnixListener::bind(&uffd_sock).unwrap();
    let hold = std::thread::spawn(move || listener.accept().map(|(s, _)| s));
    std::fs::rename(&moved_disk, &disk).unwrap();
    let t = Instant::now();
    let uffd = format!(
        r#""mem_backend": {{"backend_type": "Uffd", "backend_path": "{}"}}"#,
        uffd_sock.display()
    );
    let r = api.call(
        "PUT",
        "/snapshot/load",
        Some(&load_body(&state, &uffd)),
        400,
    );
    assert!(
        r.fault().contains("did not serve guest memory within 5 s"),
        "{}",
        r.fault()
    );
    assert!(t.elapsed() < Duration::from_secs(30), "the wait is bounded");
    assert_eq!(api.state(), "Not started");
    let _held = hold.join().unwrap();

    // Nothing changed: the good snapshot loads, paused, and resumes.
    api.call(
        "PUT",
        "/snapshot/load",
        Some(&load_body(&state, &file_backend(&mem))),
        204,
    );
    assert_eq!(api.state(), "Paused");
    let r = api.call(
        "PUT",
        "/snapshot/load",
        Some(&load_body(&state, &file_backend(&mem))),
        400,
    );
    assert!(
        r.fault().contains("not supported after starting"),
        "{}",
        r.fault()
    );
    api.call("PATCH", "/vm", Some(r#"{"state": "Resumed"}"#), 204);
    let again = wait_output(&mut target, 4);
    target.signal(libc::SIGTERM);
    let run = target.finish(TIMEOUT);
    run.check(
        again.bytes().next() == Some(b'0' + (last - b'0' + 1) % 8),
        &format!(
            "the second restore goes on from {:?} too: {again:?}",
            last as char
        ),
    );
    run.check(!run.stderr.contains("panicked"), "no panic");

    // The Uffd backend with ember's example page-fault handler.
    let handler_sock = dir.path("handler.sock");
    let handler = std::process::Command::new(ember_bin().with_file_name("ember-uffd-handler"))
        .args([&handler_sock, &mem])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("start ember-uffd-handler");
    let deadline = Instant::now() + TIMEOUT;
    while !handler_sock.exists() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    let sock4 = dir.path("api4.sock");
    let mut served = spawn_ember(&["--api-sock", sock4.to_str().unwrap()], b"");
    let mut api = Api::connect(&sock4);
    let uffd = format!(
        r#""mem_backend": {{"backend_type": "Uffd", "backend_path": "{}"}}, "resume_vm": true"#,
        handler_sock.display()
    );
    api.call(
        "PUT",
        "/snapshot/load",
        Some(&load_body(&state, &uffd)),
        204,
    );
    let by_uffd = wait_output(&mut served, 4);
    served.signal(libc::SIGTERM);
    let run = served.finish(TIMEOUT);
    run.check(
        by_uffd.bytes().next() == Some(b'0' + (last - b'0' + 1) % 8),
        &format!("served by the handler, the count goes on too: {by_uffd:?}"),
    );
    let out = handler
        .wait_with_output()
        .expect("the handler ends with the VMM");
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "the handler exits 0: {log}");
    assert!(log.contains("faults"), "the handler served faults: {log}");

    // A VM that already has configuration cannot load a snapshot.
    let sock3 = dir.path("api3.sock");
    let configured = spawn_ember(&["--api-sock", sock3.to_str().unwrap()], b"");
    let mut api = Api::connect(&sock3);
    api.call(
        "PUT",
        "/machine-config",
        Some(r#"{"vcpu_count": 1, "mem_size_mib": 32}"#),
        204,
    );
    let r = api.call(
        "PUT",
        "/snapshot/load",
        Some(&load_body(&state, &file_backend(&mem))),
        400,
    );
    assert!(
        r.fault()
            .contains("only allowed before any other configuration"),
        "{}",
        r.fault()
    );
    assert_eq!(api.state(), "Not started");
    configured.signal(libc::SIGTERM);
    let _ = configured.finish(TIMEOUT);
}

/// The guest's CPU fingerprint travels in the state file: a destination
/// that lacks features of the guest's model refuses, naming each one,
/// before it creates anything; one that lacks only what the guest never had
/// restores it.
#[test]
fn a_snapshot_refuses_a_host_without_its_cpu_features() {
    if !kvm_available("a_snapshot_refuses_a_host_without_its_cpu_features") {
        return;
    }
    let dir = TempDir::new("snapshot-cpu");
    let kernel = dir.write("counter.elf", &tiny_elf(&TINY_COUNTER));
    let (state, mem) = (dir.path("vm.state"), dir.path("vm.mem"));
    let sock = dir.path("api.sock");
    let mut source = spawn_ember(
        &[
            "--api-sock",
            sock.to_str().unwrap(),
            "--kernel",
            kernel.to_str().unwrap(),
            "--memory",
            "32",
            "--cpu",
            "x86-64-v2",
        ],
        b"",
    );
    wait_output(&mut source, 4);
    let mut api = Api::connect(&sock);
    api.call("PATCH", "/vm", Some(r#"{"state": "Paused"}"#), 204);
    let create = format!(
        r#"{{"snapshot_path": "{}", "mem_file_path": "{}"}}"#,
        state.display(),
        mem.display()
    );
    api.call("PUT", "/snapshot/create", Some(&create), 204);
    source.signal(libc::SIGKILL);
    let _ = source.finish(TIMEOUT);

    let args = [
        "--restore",
        state.to_str().unwrap(),
        "--restore-mem",
        mem.to_str().unwrap(),
        "--resume",
    ];
    let weak = spawn_ember_env(&args, &[("EMBER_TEST_HOST_CPU_REMOVE", "sse4.2,ssse3")]);
    let run = weak.finish(TIMEOUT);
    assert_clean_error(
        &run,
        &["cannot provide 2 CPU feature(s) the guest (CPU model x86-64-v2) uses: sse4.2 ssse3"],
    );
    run.check(run.stdout.is_empty(), "the guest did not run");
    // A host without what the guest never had (nor was shown) runs it.
    let mut fine = spawn_ember_env(
        &args,
        &[("EMBER_TEST_HOST_CPU_REMOVE", "3dnowprefetch,clzero")],
    );
    let after = wait_output(&mut fine, 4);
    fine.signal(libc::SIGTERM);
    let run = fine.finish(TIMEOUT);
    run.check(after.len() >= 4, "the restored guest counts on");
}

#[test]
fn snapshot_of_a_jailed_vm_lands_in_the_jail_and_restores() {
    let name = "snapshot_of_a_jailed_vm_lands_in_the_jail_and_restores";
    if !kvm_available(name) {
        return;
    }
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("\n!!!!! SKIPPED {name}: ember jail needs root !!!!!\n");
        return;
    }
    let dir = TempDir::new("snapshot-jail");
    let jail = dir.path("jail");
    std::fs::create_dir(&jail).unwrap();
    std::fs::set_permissions(&jail, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let kernel = dir.write("counter.elf", &tiny_elf(&TINY_COUNTER));
    let mut jailed = ember_tests::spawn_jailed(
        &jail,
        &["--kernel", kernel.to_str().unwrap(), "--memory", "32"],
    );
    let before = wait_output(&mut jailed, 8);
    assert!(before.len() >= 8, "the jailed guest counts: {before:?}");
    let mut api = Api::connect(&jail.join("run/api.sock"));
    api.call("PATCH", "/vm", Some(r#"{"state": "Paused"}"#), 204);
    // Paths are the jail's: /run is the jailed VM's writable directory.
    api.call(
        "PUT",
        "/snapshot/create",
        Some(r#"{"snapshot_path": "/run/vm.state", "mem_file_path": "/run/vm.mem"}"#),
        204,
    );
    let printed = jailed.stdout_so_far();
    jailed.signal(libc::SIGTERM);
    let run = jailed.finish(TIMEOUT);
    run.check(!run.stderr.contains("panicked"), "no panic");
    let (state, mem) = (jail.join("run/vm.state"), jail.join("run/vm.mem"));
    assert!(
        state.exists() && mem.exists(),
        "the snapshot is in the jail directory and outlives the jail"
    );
    let mut restored = spawn_ember(
        &[
            "--restore",
            state.to_str().unwrap(),
            "--restore-mem",
            mem.to_str().unwrap(),
            "--resume",
        ],
        b"",
    );
    let after = wait_output(&mut restored, 4);
    restored.signal(libc::SIGTERM);
    let run = restored.finish(TIMEOUT);
    let last = printed.bytes().last().unwrap();
    run.check(
        after.bytes().next() == Some(b'0' + (last - b'0' + 1) % 8),
        &format!("the count goes on from {:?}: {after:?}", last as char),
    );
}
