//! `ember jail`: a jailed ember boots the guest with a disk and a NIC as an
//! unprivileged user with no capabilities, rooted in the jail directory, in
//! its own PID namespace and cgroup, and leaves nothing behind; bad jail
//! input fails cleanly and creates nothing.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ember_tests::{
    agent_lines, assert_clean_error, guest_kernel_dir, kvm_available, netns_available,
    pattern_block, pattern_offsets, run_ember, spawn_ember, tiny_elf, wait_all_threads_filtered,
    NetNs, TempDir,
};

const BOOT_TIMEOUT: Duration = Duration::from_secs(900);
const NOBODY: u32 = 65534;
const MIB: u64 = 1024 * 1024;
const DISK_SIZE: u64 = 64 * MIB;
const BLOCKS: u64 = 32;
const SEED: u64 = 4242;

/// Jails need root (mounts, device nodes, cgroups, setuid); says so loudly when not.
fn root(test: &str) -> bool {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == 0 {
        return true;
    }
    eprintln!("\n!!!!! SKIPPED {test}: ember jail needs root !!!!!\n");
    false
}

/// An empty jail directory (0755, so the jailed uid can look up its files).
fn jail_dir(dir: &TempDir) -> PathBuf {
    let jail = dir.path("jail");
    std::fs::create_dir(&jail).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&jail, std::fs::Permissions::from_mode(0o755)).unwrap();
    jail
}

fn entries(dir: &Path) -> Vec<String> {
    let mut v: Vec<_> = std::fs::read_dir(dir)
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// Every cgroup directory named `ember/<id>` in any mounted hierarchy.
fn cgroup_dirs(id: &str) -> Vec<PathBuf> {
    let mut found = Vec::new();
    for base in ["/sys/fs/cgroup", "/sys/fs/cgroup/unified"] {
        let direct = Path::new(base).join("ember").join(id);
        if direct.exists() {
            found.push(direct);
        }
        for e in std::fs::read_dir(base).into_iter().flatten().flatten() {
            let p = e.path().join("ember").join(id);
            if p.exists() && !found.contains(&p) {
                found.push(p);
            }
        }
    }
    found
}

/// `field:` of /proc/<pid>/status, whitespace-split.
fn status_field(pid: i32, field: &str) -> Vec<String> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .map(|v| v.split_whitespace().map(String::from).collect())
        .unwrap_or_default()
}

/// The only child of `pid` (the jailed ember under `ember jail`).
fn child_of(pid: i32) -> Option<i32> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children")).ok()?;
    text.split_whitespace().next()?.parse().ok()
}

#[test]
fn jail_boots_the_guest_with_disk_and_net_unprivileged_and_leaves_nothing_behind() {
    let test = "jail_boots_the_guest_with_disk_and_net_unprivileged_and_leaves_nothing_behind";
    if !root(test) || !kvm_available(test) || !netns_available(test) {
        return;
    }
    let ns = NetNs::with_tap_owner("jail", &[("tap0", "10.201.0.1/24")], Some(NOBODY))
        .expect("netns with a tap owned by nobody");
    let dir = TempDir::new("jail-boot");
    let jail = jail_dir(&dir);
    let disk = dir.path("disk.img");
    std::fs::File::create(&disk)
        .unwrap()
        .set_len(DISK_SIZE)
        .unwrap();
    // The jailed uid must be able to write its disk.
    std::os::unix::fs::chown(&disk, Some(NOBODY), Some(NOBODY)).unwrap();
    let id = format!("test-{}", std::process::id());
    let kernel = guest_kernel_dir().join("vmlinux");
    let cmdline = format!(
        "console=ttyS0 reboot=k panic=1 quiet ember.agent=on ember.pci=on \
         ip=10.201.0.2::10.201.0.1:255.255.255.0::eth0:off \
         ember.blk_write=vda:{SEED}:{BLOCKS} ember.sleep=20"
    );
    let netns = format!("/var/run/netns/{}", ns.name);
    let nobody = NOBODY.to_string();
    let args = [
        "jail",
        "--dir",
        jail.to_str().unwrap(),
        "--uid",
        &nobody,
        "--gid",
        &nobody,
        "--id",
        &id,
        "--netns",
        &netns,
        "--new-pid-ns",
        "--cgroup",
        "cpu.max=100000 100000",
        "--cgroup",
        "memory.max=1G",
        "--kernel",
        kernel.to_str().unwrap(),
        "--memory",
        "256",
        "--cmdline",
        &cmdline,
        "--disk",
        // On its own I/O thread: that thread is filtered too.
        &format!("path={},iothread=on", disk.display()),
        "--net",
        "tap=tap0",
        "--log-level",
        "info",
    ];
    let mut ember = spawn_ember(&args, b"");
    let sleeping = ember.wait_for_output("EMBER-AGENT sleeping", BOOT_TIMEOUT);

    // While the guest sleeps: look at the jailed ember from outside.
    let jailed = child_of(ember.pid());
    let mut seen = Vec::new();
    if let Some(pid) = jailed {
        let root = std::fs::metadata(format!("/proc/{pid}/root")).ok();
        let jail_meta = std::fs::metadata(&jail).unwrap();
        seen.push((
            "root is the jail dir",
            root.is_some_and(|r| r.dev() == jail_meta.dev() && r.ino() == jail_meta.ino()),
        ));
        let root_listing = entries(Path::new(&format!("/proc/{pid}/root")));
        seen.push((
            "the root holds only the VM's files",
            ["dev", "ember", "lib64", "usr", "vm"]
                .iter()
                .all(|e| root_listing.contains(&e.to_string()))
                && root_listing.len() <= 6,
        ));
        let uid = status_field(pid, "Uid:");
        let gid = status_field(pid, "Gid:");
        seen.push((
            "uid is nobody",
            uid.len() == 4 && uid.iter().all(|u| *u == nobody),
        ));
        seen.push((
            "gid is nogroup",
            gid.len() == 4 && gid.iter().all(|g| *g == nobody),
        ));
        for cap in ["CapInh:", "CapPrm:", "CapEff:", "CapBnd:", "CapAmb:"] {
            let v = status_field(pid, cap);
            seen.push((cap, v.len() == 1 && v[0].trim_start_matches('0').is_empty()));
        }
        seen.push(("no_new_privs", status_field(pid, "NoNewPrivs:") == ["1"]));
        let nspid = status_field(pid, "NSpid:");
        seen.push((
            "PID 1 of a new PID namespace",
            nspid.last().map(String::as_str) == Some("1"),
        ));
        let cgroup = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap_or_default();
        seen.push((
            "in its own cgroup",
            cgroup.contains(&format!("/ember/{id}")),
        ));
        seen.push(("its cgroup exists", !cgroup_dirs(&id).is_empty()));
        // The event loop, the migration thread, the vCPU, the disk's.
        let (filtered, threads) = wait_all_threads_filtered(pid, 4, Duration::from_secs(5));
        eprintln!("jailed ember threads: {threads:?}");
        seen.push(("every thread under seccomp", filtered));
        seen.push((
            "the disk's I/O thread runs",
            threads.iter().any(|(n, _)| n == "ember-blk0"),
        ));
    }
    let ping = ns
        .exec(&["ping", "-c", "3", "-i", "0.5", "-W", "10", "10.201.0.2"])
        .unwrap_or_else(|e| e);
    let run = ember.finish(BOOT_TIMEOUT);
    run.check(sleeping, "the jailed guest's agent reached its sleep");
    run.check(jailed.is_some(), "ember jail runs the VM as its child");
    for (what, ok) in seen {
        run.check(ok, what);
    }
    run.check(
        ping.contains(" 3 received"),
        &format!("the host pings the jailed guest through the tap:\n{ping}"),
    );
    run.check(run.code() == 0, "the jailed guest restarts: exit 0");
    let served = ember_tests::io_thread_served(&run.stderr, "virtio-blk0");
    run.check(
        served.is_some_and(|n| n > 0),
        &format!("the disk's requests went through its I/O thread: {served:?} events"),
    );
    let agent = agent_lines(&run.stdout);
    run.check(
        agent
            .get("blk_write")
            .and_then(|l| l.get("errors"))
            .map(String::as_str)
            == Some("0"),
        "the guest wrote its disk",
    );
    run.check(
        agent
            .get("done")
            .and_then(|d| d.get("failed"))
            .map(String::as_str)
            == Some("0"),
        "no agent check failed",
    );
    let image = std::fs::read(&disk).unwrap();
    for off in pattern_offsets(SEED, BLOCKS, DISK_SIZE) {
        let o = usize::try_from(off).unwrap();
        run.check(
            image[o..o + 4096] == pattern_block(SEED, off)[..],
            &format!("block at {off:#x} holds the guest's pattern"),
        );
    }
    run.check(
        entries(&jail).is_empty(),
        &format!("the jail dir is empty again: {:?}", entries(&jail)),
    );
    run.check(
        cgroup_dirs(&id).is_empty(),
        &format!("the cgroup is gone: {:?}", cgroup_dirs(&id)),
    );
}

/// Runs `ember jail` with `jail_args`, a tiny kernel and nothing else.
fn jail_fails(dir: &TempDir, jail: &Path, jail_args: &[&str]) -> ember_tests::Run {
    let kernel = dir.write("tiny.elf", &tiny_elf(&[0xf4]));
    let kernel = kernel.to_str().unwrap();
    let mut args = vec!["jail", "--dir", jail.to_str().unwrap()];
    args.extend(jail_args);
    args.extend(["--kernel", kernel, "--memory", "16"]);
    run_ember(&args, b"", Duration::from_secs(30))
}

#[test]
fn jail_bad_input_fails_cleanly_and_creates_nothing() {
    if !root("jail_bad_input_fails_cleanly_and_creates_nothing") {
        return;
    }
    let dir = TempDir::new("jail-bad");
    let jail = jail_dir(&dir);

    let missing = dir.path("no-such-jail");
    let run = jail_fails(&dir, &missing, &["--uid", "65534", "--gid", "65534"]);
    assert_clean_error(&run, &["jail directory", "no-such-jail"]);
    run.check(!missing.exists(), "the missing jail dir is not created");

    let run = jail_fails(&dir, &jail, &["--uid", "0", "--gid", "0"]);
    assert_clean_error(&run, &["uid 0", "--allow-root"]);
    run.check(entries(&jail).is_empty(), "nothing created for uid 0");

    let id = format!("bad-{}", std::process::id());
    let run = jail_fails(
        &dir,
        &jail,
        &[
            "--uid",
            "65534",
            "--gid",
            "65534",
            "--id",
            &id,
            "--cgroup",
            "io.max=8:0 rbps=1",
        ],
    );
    assert_clean_error(&run, &["cgroup controller io is not available"]);
    run.check(
        entries(&jail).is_empty(),
        "nothing created for a missing controller",
    );
    run.check(cgroup_dirs(&id).is_empty(), "no cgroup created");

    let run = jail_fails(
        &dir,
        &jail,
        &["--uid", "65534", "--gid", "65534", "--cgroup", "cpu.max"],
    );
    run.check(run.code() == 2, "a malformed flag is a usage error");
    run.check(run.stderr.lines().count() == 1, "one line");
    run.check(
        run.stderr.contains("KEY=VALUE"),
        "says what --cgroup expects",
    );
    run.check(entries(&jail).is_empty(), "nothing created for a bad flag");
}

#[test]
fn jail_serves_the_api_from_its_run_directory_and_removes_it() {
    if !root("jail_serves_the_api_from_its_run_directory_and_removes_it") {
        return;
    }
    let dir = TempDir::new("jail-api");
    let jail = jail_dir(&dir);
    let ember = ember_tests::spawn_jailed(&jail, &[]);
    let sock = jail.join("run/api.sock");
    let mut c = ember_tests::http::Client::connect(&sock, Duration::from_secs(30));
    let r = c.request("GET", "/", None);
    assert_eq!(r.status, 200, "{r:?}");
    assert_eq!(r.json()["state"], "Not started");
    let meta = std::fs::metadata(&sock).unwrap();
    assert_eq!(meta.uid(), NOBODY, "the jailed ember made the socket");
    assert_eq!(meta.mode() & 0o777, 0o600);
    // A kernel outside the jail cannot be seen from inside it.
    let kernel = dir.write("vmlinux", b"not a kernel");
    let r = c.request(
        "PUT",
        "/boot-source",
        Some(&format!(
            r#"{{"kernel_image_path": "{}"}}"#,
            kernel.display()
        )),
    );
    assert_eq!(r.status, 400, "{r:?}");
    drop(c);
    ember.signal(libc::SIGTERM);
    let run = ember.finish(Duration::from_secs(30));
    assert!(!run.stderr.contains("panicked"), "{}", run.stderr);
    assert_eq!(
        entries(&jail),
        Vec::<String>::new(),
        "the jail is left empty"
    );
}

/// The API inside a jail, walked with a tiny guest and a disk: what the
/// API allows works with the jail's paths (a disk swap to an image in the
/// jail, pause, a snapshot into the jail's /run, resume, a live migration
/// to a destination listening in the jail's /run, after which the jailed
/// ember exits), and nothing outside the jail can be reached through it (a
/// disk swap to a host path, to /etc/shadow or /proc/self/exe, a snapshot
/// where the jailed user cannot write are each refused with one line,
/// changing nothing; a migration to a socket outside fails, the guest
/// running on).
#[test]
fn jail_api_walk_reaches_only_the_jail() {
    let name = "jail_api_walk_reaches_only_the_jail";
    if !root(name) || !kvm_available(name) {
        return;
    }
    let dir = TempDir::new("jail-walk");
    let jail = jail_dir(&dir);
    let kernel = dir.write("counter.elf", &tiny_elf(&ember_tests::TINY_COUNTER));
    let disk = dir.write("disk.img", &vec![0u8; 1 << 20]);
    // The jailed user writes the disk (its owner's job, as with
    // Firecracker's jailer).
    std::os::unix::fs::chown(&disk, Some(NOBODY), Some(NOBODY)).unwrap();
    let disk_flag = format!("path={}", disk.display());
    let mut ember = ember_tests::spawn_jailed(
        &jail,
        &[
            "--kernel",
            kernel.to_str().unwrap(),
            "--memory",
            "32",
            "--disk",
            &disk_flag,
            "--log-level",
            "info",
        ],
    );
    let mut api = ember_tests::http::Api::connect(&jail.join("run/api.sock"));
    assert_eq!(api.call("GET", "/", None, 200).json()["state"], "Running");
    // A swap to an image the jail sees (its /run, the jailed user's).
    let new_image = jail.join("run/new.img");
    std::fs::write(&new_image, vec![0u8; 2 << 20]).unwrap();
    std::os::unix::fs::chown(&new_image, Some(NOBODY), Some(NOBODY)).unwrap();
    api.call(
        "PATCH",
        "/drives/drive0",
        Some(r#"{"drive_id": "drive0", "path_on_host": "/run/new.img"}"#),
        204,
    );
    // Host paths do not exist inside; /etc/shadow and /proc are not there.
    let outside = dir.write("outside.img", &vec![0u8; 1 << 20]);
    for path in [outside.to_str().unwrap(), "/etc/shadow", "/proc/self/exe"] {
        let body = format!(r#"{{"drive_id": "drive0", "path_on_host": "{path}"}}"#);
        api.call("PATCH", "/drives/drive0", Some(&body), 400);
    }
    let config = api.call("GET", "/vm/config", None, 200).json();
    assert_eq!(
        config["drives"][0]["path_on_host"], "/run/new.img",
        "the refused swaps changed nothing: {config}"
    );
    api.call("PATCH", "/vm", Some(r#"{"state": "Paused"}"#), 204);
    // The jailed user cannot write the jail's /vm: refused, nothing made.
    api.call(
        "PUT",
        "/snapshot/create",
        Some(r#"{"snapshot_path": "/vm/x.state", "mem_file_path": "/vm/x.mem"}"#),
        400,
    );
    api.call(
        "PUT",
        "/snapshot/create",
        Some(r#"{"snapshot_path": "/run/vm.state", "mem_file_path": "/run/vm.mem"}"#),
        204,
    );
    let state = jail.join("run/vm.state");
    assert!(state.exists(), "the snapshot is in the jail");
    assert_eq!(
        std::fs::metadata(&state).unwrap().uid(),
        NOBODY,
        "made by the jailed user"
    );
    api.call("PATCH", "/vm", Some(r#"{"state": "Resumed"}"#), 204);
    let printed = ember.stdout_so_far().len();
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while ember.stdout_so_far().len() == printed && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(ember.stdout_so_far().len() > printed, "the guest runs on");
    // A migration to a socket outside the jail fails (it is not there),
    // the guest running on; one to a destination in the jail's /run moves
    // it, and the jailed ember exits as a migrated source does.
    let outside = dir.path("outside-mig.sock");
    let _listening = std::os::unix::net::UnixListener::bind(&outside).unwrap();
    let migrate = |api: &mut ember_tests::http::Api, url: &str| {
        let body = format!(r#"{{"destination_url": "{url}"}}"#);
        let r = api
            .client
            .request("PUT", "/api/v1/vm.send-migration", Some(&body));
        assert_eq!(r.status, 204, "send-migration {url}: {r:?}");
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        loop {
            let s = api
                .client
                .request("GET", "/api/v1/vm.migration-status", None)
                .json();
            let state = s["state"].as_str().unwrap_or("").to_string();
            if state == "failed" || state == "completed" {
                return s;
            }
            assert!(std::time::Instant::now() < deadline, "{s}");
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    let s = migrate(&mut api, &format!("unix:{}", outside.display()));
    assert_eq!(s["state"], "failed", "a host path is not in the jail: {s}");
    assert_eq!(
        api.state(),
        "Running",
        "the guest runs on after the refusal"
    );
    let inside = jail.join("run/mig.sock");
    let listener = std::os::unix::net::UnixListener::bind(&inside).unwrap();
    std::os::unix::fs::chown(&inside, Some(NOBODY), Some(NOBODY)).unwrap();
    let peer = ember_tests::peer::destination(listener, ember_tests::peer::Vanish::Never);
    let body = r#"{"destination_url": "unix:/run/mig.sock"}"#;
    let r = api
        .client
        .request("PUT", "/api/v1/vm.send-migration", Some(body));
    assert_eq!(r.status, 204, "send-migration in the jail: {r:?}");
    drop(api);
    let run = ember.finish(Duration::from_secs(60));
    peer.join().expect("the destination took the whole stream");
    run.check(!run.stderr.contains("panicked"), "no panic");
    run.check(
        !run.stderr.contains("seccomp"),
        "nothing the API did tripped a filter",
    );
    run.check(
        run.code() == 0 && run.stderr.contains("migrated to unix:/run/mig.sock"),
        "the jailed ember migrated the guest and exited",
    );
}
