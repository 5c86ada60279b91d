//! Jails this test binary itself and checks, from inside (the `probe` test,
//! which reports to a writable file) and from outside, what the jail did.
//! Needs root; without it every test prints "SKIPPED: not root" and passes.

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use ember_jail::{current_exe_files, Error, JailFile, JailSpec};

mod support;

use support::{ALLOC_ENV, EXIT_ENV, PROBE_ENV, SLEEP_ENV, SPIN_ENV};

/// The cgroup parent the tests use (not the real `ember`).
const CGROUP_PARENT: &str = "ember-jail-test";

/// One jail at a time: the signal test signals the whole process, and the
/// tests share a cgroup parent.
static SERIAL: Mutex<()> = Mutex::new(());

/// Inside the jail (with `EMBER_JAIL_PROBE=1`): the probe. Outside: nothing.
#[test]
fn probe() {
    if std::env::var_os(PROBE_ENV).is_some() {
        support::probe_main();
    }
}

// ---------------------------------------------------------------- fixtures

/// Prints to the real stderr, past the test harness's capture.
fn loud(message: &str) {
    let _ = writeln!(std::io::stderr(), "{message}");
}

fn is_root() -> bool {
    // SAFETY: geteuid only returns a number.
    let root = unsafe { libc::geteuid() } == 0;
    if !root {
        loud("\n**********************************************\n*** SKIPPED: not root (ember-jail tests need root)\n**********************************************");
    }
    root
}

/// A fresh directory under /tmp holding the jail directory and host files.
struct Fixture {
    base: PathBuf,
    jail: PathBuf,
    report: PathBuf,
    ro: PathBuf,
}

impl Fixture {
    fn new(name: &str) -> Self {
        let base = PathBuf::from(format!("/tmp/ember-jail-it-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&base);
        let jail = base.join("jail");
        fs::create_dir_all(&jail).unwrap();
        for dir in [&base, &jail] {
            fs::set_permissions(dir, fs::Permissions::from_mode(0o755)).unwrap();
        }
        let report = base.join("report");
        let ro = base.join("ro.txt");
        for (file, text) in [(&report, ""), (&ro, "read-only\n")] {
            fs::write(file, text).unwrap();
            // World-writable on the host: only the jail's read-only bind may stop a write.
            fs::set_permissions(file, fs::Permissions::from_mode(0o666)).unwrap();
        }
        Fixture {
            base,
            jail,
            report,
            ro,
        }
    }

    /// A spec running the probe as nobody, with the report, a read-only
    /// file and the devices that exist here.
    fn probe_spec(&self, id: &str) -> JailSpec {
        let mut spec = JailSpec::new(id, &self.jail, "/probe");
        spec.files = current_exe_files(Path::new("/probe")).unwrap();
        spec.files.push(JailFile::writable(&self.report, "/report"));
        spec.files
            .push(JailFile::read_only(&self.ro, "/data/ro.txt"));
        spec.devices = ["/dev/kvm", "/dev/urandom"]
            .iter()
            .map(PathBuf::from)
            .filter(|d| d.exists())
            .collect();
        spec.args = ["--exact", "probe", "--nocapture", "--test-threads=1"]
            .iter()
            .map(Into::into)
            .collect();
        spec.env = vec![(PROBE_ENV.into(), "1".into())];
        spec.cgroup_parent = CGROUP_PARENT.into();
        spec
    }

    fn report(&self) -> BTreeMap<String, String> {
        fs::read_to_string(&self.report)
            .unwrap()
            .lines()
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn jail_entries(&self) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(&self.jail)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.base);
    }
}

/// Blocks SIGUSR1 in the calling thread until dropped.
struct SigUsr1Blocked(libc::sigset_t);

impl SigUsr1Blocked {
    fn new() -> Self {
        // SAFETY: an all-zero sigset_t is valid; the calls fill or read it.
        let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
        // SAFETY: `set` is writable, then read by pthread_sigmask.
        unsafe {
            libc::sigemptyset(&mut set);
            libc::sigaddset(&mut set, libc::SIGUSR1);
            libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        }
        SigUsr1Blocked(set)
    }
}

impl Drop for SigUsr1Blocked {
    fn drop(&mut self) {
        // SAFETY: unblocks what `new` blocked, in this thread.
        unsafe { libc::pthread_sigmask(libc::SIG_UNBLOCK, &self.0, std::ptr::null_mut()) };
    }
}

/// The top-level names a spec puts in the jail root.
fn top_level(spec: &JailSpec) -> String {
    let paths = spec
        .files
        .iter()
        .map(|f| f.inside.clone())
        .chain(spec.devices.iter().cloned())
        .chain(spec.writable_dirs.iter().cloned());
    let mut names: Vec<String> = paths
        .filter_map(|p| p.iter().nth(1).map(|n| n.to_string_lossy().into_owned()))
        .collect();
    names.sort();
    names.dedup();
    names.join(",")
}

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// Polls `what` every 20 ms for up to 10 s.
fn wait_for<T>(what: &str, mut poll: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = poll() {
            return v;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "timed out waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

// ---------------------------------------------------------------- jailed runs

#[test]
fn run_probe_is_confined_and_cleaned_up() {
    if !is_root() {
        return;
    }
    let _serial = serial();
    let fx = Fixture::new("confined");
    let mut spec = fx.probe_spec("it-confined");
    spec.new_pid_ns = true;
    spec.max_open_files = 100;
    spec.max_file_size = Some(1 << 20);
    spec.read_only_root = true;
    spec.writable_dirs = vec!["/run".into()];
    let usr1 = SigUsr1Blocked::new();
    // A descriptor without close-on-exec, as a careless caller might hold.
    // SAFETY: opens /dev/null; closed below.
    let leaky = unsafe { libc::open(c"/dev/null".as_ptr(), libc::O_RDONLY) };
    assert!(leaky > 2);

    let status = ember_jail::run(&spec).unwrap();
    // SAFETY: `leaky` is ours and open.
    unsafe { libc::close(leaky) };
    drop(usr1);
    assert!(status.success(), "probe failed: {status}");

    let r = fx.report();
    assert_eq!(r["uid"], "65534");
    assert_eq!(r["gid"], "65534");
    assert_eq!(r["groups"], "0");
    assert_eq!(r["pid"], "1", "new_pid_ns: the probe is PID 1");
    assert_eq!(r["caps"], "0x0/0x0/0x0");
    assert_eq!(r["bounding"], "0");
    assert_eq!(r["ambient"], "0");
    assert_eq!(r["no_new_privs"], "1");
    assert_eq!(
        r["root"],
        top_level(&spec),
        "the jail root holds exactly what was put in"
    );
    if spec.devices.contains(&PathBuf::from("/dev/kvm")) {
        assert_eq!(r["kvm"], "ok", "nobody can open its own /dev/kvm node");
    }
    assert_eq!(r["urandom"], "Ok(16)");
    assert_eq!(r["ro_write"], format!("errno{}", libc::EROFS));
    assert_eq!(
        r["root_write"],
        format!("errno{}", libc::EROFS),
        "read_only_root"
    );
    assert_eq!(
        r["run_write"], "ok",
        "the writable directory under a read-only root"
    );
    assert_eq!(
        r["sigusr1_blocked"], "0",
        "the caller's signal mask is not inherited"
    );
    assert_eq!(r["nofile"], "100/100");
    assert_eq!(r["fsize"], "1048576/1048576");
    assert_eq!(
        r["open_fds"], "",
        "no descriptor above 2 leaks into the jail"
    );

    assert!(
        fx.jail_entries().is_empty(),
        "left in the jail: {:?}",
        fx.jail_entries()
    );
    // The PID namespace did not stick to this thread: it can still fork.
    assert!(std::process::Command::new("/bin/true")
        .status()
        .unwrap()
        .success());
}

#[test]
fn run_probe_exit_code_is_returned() {
    if !is_root() {
        return;
    }
    let _serial = serial();
    let fx = Fixture::new("exit");
    let mut spec = fx.probe_spec("it-exit");
    spec.env.push((EXIT_ENV.into(), "7".into()));
    let status = ember_jail::run(&spec).unwrap();
    assert_eq!(status.code(), Some(7));
    let r = fx.report();
    assert_eq!(
        r["root_write"],
        format!("errno{}", libc::EACCES),
        "writable root, but not for nobody"
    );
    assert_eq!(r["nofile"], "2048/2048");
    assert_eq!(
        fx.report()["pid"].parse::<i32>().map(|p| p > 1),
        Ok(true),
        "no new PID namespace"
    );
    assert!(fx.jail_entries().is_empty());
}

#[test]
fn run_probe_in_netns_sees_only_its_interfaces() {
    if !is_root() {
        return;
    }
    let _serial = serial();
    let name = format!("ember-jail-test-{}", std::process::id());
    let ip = |args: &[&str]| {
        std::process::Command::new("ip")
            .args(args)
            .status()
            .is_ok_and(|s| s.success())
    };
    if !ip(&["netns", "add", &name]) {
        loud("SKIPPED: netns test: `ip netns add` is not available");
        return;
    }
    let fx = Fixture::new("netns");
    let mut spec = fx.probe_spec("it-netns");
    spec.netns = Some(PathBuf::from("/run/netns").join(&name));
    let status = ember_jail::run(&spec);
    ip(&["netns", "delete", &name]);
    assert!(status.unwrap().success());
    assert_eq!(fx.report()["ifaces"], "lo");
    assert!(fx.jail_entries().is_empty());
}

/// Checks the cgroup files of the cgroup test in each of `dirs` (v1 or v2
/// names) and that `pid` is in each; returns the controllers checked.
fn check_limits(dirs: &[PathBuf], pid: u32) -> Vec<&'static str> {
    let mut checked = Vec::new();
    for dir in dirs {
        let read = |file: &str| {
            fs::read_to_string(dir.join(file))
                .ok()
                .map(|s| s.trim().to_string())
        };
        assert_eq!(
            read("cgroup.procs").as_deref(),
            Some(pid.to_string().as_str()),
            "{}",
            dir.display()
        );
        if let Some(quota) = read("cpu.cfs_quota_us") {
            assert_eq!(
                (quota.as_str(), read("cpu.cfs_period_us").unwrap().as_str()),
                ("20000", "100000")
            );
            checked.push("cpu");
        }
        if let Some(max) = read("cpu.max") {
            assert_eq!(max, "20000 100000");
            checked.push("cpu");
        }
        if let Some(limit) = read("memory.limit_in_bytes").or_else(|| read("memory.max")) {
            assert_eq!(limit, "268435456");
            checked.push("memory");
        }
        if let Some(max) = read("pids.max") {
            assert_eq!(max, "64");
            checked.push("pids");
        }
    }
    checked
}

#[test]
fn run_cgroup_limits_hold_while_running_and_are_removed_after() {
    if !is_root() {
        return;
    }
    let _serial = serial();
    let fx = Fixture::new("cgroup");
    let mut spec = fx.probe_spec("it-cgroup");
    spec.cgroup = vec![
        ("cpu.max".into(), "20000 100000".into()),
        ("memory.max".into(), "256M".into()),
        ("pids.max".into(), "64".into()),
    ];
    // Spin long enough to be throttled at 20% of a CPU, even on a busy host.
    spec.env.push((SPIN_ENV.into(), "3000".into()));
    let dirs = spec.cgroup_dirs().unwrap();
    assert!(!dirs.is_empty());
    let parents: Vec<PathBuf> = dirs
        .iter()
        .map(|d| d.parent().unwrap().to_path_buf())
        .collect();
    let parents_existed: Vec<bool> = parents.iter().map(|p| p.exists()).collect();

    let runner = {
        let spec = spec.clone();
        std::thread::spawn(move || ember_jail::run(&spec))
    };
    let pid: u32 = wait_for("the child in cgroup.procs", || {
        fs::read_to_string(dirs[0].join("cgroup.procs"))
            .ok()
            .and_then(|s| s.lines().next().and_then(|l| l.parse().ok()))
    });
    let own = fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    let member = format!(":/{CGROUP_PARENT}/it-cgroup");
    assert!(
        own.lines().filter(|l| l.ends_with(&member)).count() >= 1,
        "{own}"
    );

    let mut checked = check_limits(&dirs, pid);
    checked.sort();
    assert_eq!(checked, ["cpu", "memory", "pids"]);
    // The quota is enforced, not just written: the spinning probe gets throttled.
    let cpu_dir = dirs.iter().find(|d| d.join("cpu.stat").exists()).unwrap();
    wait_for("the spinning probe to be throttled", || {
        let stat = fs::read_to_string(cpu_dir.join("cpu.stat")).ok()?;
        let throttled = stat.lines().find_map(|l| l.strip_prefix("nr_throttled "))?;
        (throttled.trim().parse::<u64>().ok()? > 0).then_some(())
    });

    let status = runner.join().unwrap().unwrap();
    assert!(status.success());
    for dir in &dirs {
        assert!(!dir.exists(), "{} is left", dir.display());
    }
    for (parent, existed) in parents.iter().zip(parents_existed) {
        assert_eq!(
            parent.exists(),
            existed,
            "{} was created and must go",
            parent.display()
        );
    }
    assert!(fx.jail_entries().is_empty());
}

/// The cgroup v2 mount point, from mountinfo.
fn cgroup2_mount() -> Option<PathBuf> {
    let info = fs::read_to_string("/proc/self/mountinfo").ok()?;
    info.lines().find_map(|line| {
        let fields: Vec<&str> = line.split(' ').collect();
        let dash = fields.iter().position(|f| *f == "-")?;
        let mount = fields.get(4)?;
        (fields.get(dash + 1) == Some(&"cgroup2")).then(|| PathBuf::from(mount))
    })
}

#[test]
fn run_cgroup_v2_limit_with_v1_limit_in_one_jail() {
    if !is_root() {
        return;
    }
    let _serial = serial();
    let Some(v2) = cgroup2_mount() else {
        loud("SKIPPED: no cgroup v2 hierarchy");
        return;
    };
    let offers_hugetlb = fs::read_to_string(v2.join("cgroup.controllers"))
        .is_ok_and(|c| c.split_whitespace().any(|w| w == "hugetlb"));
    if !offers_hugetlb || !Path::new("/sys/kernel/mm/hugepages/hugepages-2048kB").exists() {
        loud("SKIPPED: the cgroup v2 hierarchy has no hugetlb controller with 2 MB pages");
        return;
    }
    let root_control = v2.join("cgroup.subtree_control");
    let was_enabled = fs::read_to_string(&root_control)
        .unwrap()
        .contains("hugetlb");

    let fx = Fixture::new("v2");
    let mut spec = fx.probe_spec("it-v2");
    // hugetlb goes to v2; pids to wherever it lives (v1 on a hybrid host).
    spec.cgroup = vec![
        ("hugetlb.2MB.max".into(), "4M".into()),
        ("pids.max".into(), "32".into()),
    ];
    spec.env.push((SLEEP_ENV.into(), "1000".into()));
    let dirs = spec.cgroup_dirs().unwrap();
    let v2_leaf = v2.join(CGROUP_PARENT).join("it-v2");
    assert!(dirs.contains(&v2_leaf), "{dirs:?}");

    let runner = {
        let spec = spec.clone();
        std::thread::spawn(move || ember_jail::run(&spec))
    };
    let pid: u32 = wait_for("the child in the v2 cgroup", || {
        fs::read_to_string(v2_leaf.join("cgroup.procs"))
            .ok()
            .and_then(|s| s.lines().next().and_then(|l| l.parse().ok()))
    });
    let own = fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    assert!(
        own.lines()
            .any(|l| l == format!("0::/{CGROUP_PARENT}/it-v2")),
        "{own}"
    );
    let read = |path: PathBuf| fs::read_to_string(path).unwrap().trim().to_string();
    assert_eq!(read(v2_leaf.join("hugetlb.2MB.max")), "4194304");
    let pids_dir = dirs.iter().find(|d| d.join("pids.max").exists()).unwrap();
    assert_eq!(read(pids_dir.join("pids.max")), "32");

    let status = runner.join().unwrap().unwrap();
    if !was_enabled {
        // Leave the host's root as it was (the jail enables, never disables).
        fs::write(&root_control, "-hugetlb").unwrap();
    }
    assert!(status.success());
    assert!(dirs.iter().all(|d| !d.exists()), "{dirs:?}");
    assert!(!v2.join(CGROUP_PARENT).exists());
    assert!(fx.jail_entries().is_empty());
}

#[test]
fn run_memory_limit_is_enforced() {
    if !is_root() {
        return;
    }
    let _serial = serial();
    let fx = Fixture::new("oom");
    let mut spec = fx.probe_spec("it-oom");
    spec.cgroup = vec![("memory.max".into(), "32M".into())];
    spec.env.push((ALLOC_ENV.into(), "256".into()));
    let status = ember_jail::run(&spec).unwrap();
    assert_eq!(fx.report()["uid"], "65534", "the probe ran");
    assert_eq!(
        status.signal(),
        Some(libc::SIGKILL),
        "the OOM killer ends the probe: {status}"
    );
    assert!(spec.cgroup_dirs().unwrap().iter().all(|d| !d.exists()));
    assert!(fx.jail_entries().is_empty());
}

#[test]
fn run_forwards_sigterm_to_the_child() {
    if !is_root() {
        return;
    }
    let _serial = serial();
    let fx = Fixture::new("signal");
    let mut spec = fx.probe_spec("it-signal");
    spec.env.push((SLEEP_ENV.into(), "30000".into()));
    let runner = {
        let spec = spec.clone();
        std::thread::spawn(move || ember_jail::run(&spec))
    };
    // The report is written after exec, so the handler is in place by then.
    wait_for("the probe's report", || {
        fs::metadata(&fx.report).ok().filter(|m| m.len() > 0)
    });
    // SAFETY: signals this process; run's handler forwards it to the child.
    unsafe { libc::kill(libc::getpid(), libc::SIGTERM) };
    let status = runner.join().unwrap().unwrap();
    assert_eq!(status.signal(), Some(libc::SIGTERM));
    // The previous disposition (default) is back.
    // SAFETY: an all-zero sigaction is valid; sigaction only fills it.
    let mut old: libc::sigaction = unsafe { std::mem::zeroed() };
    // SAFETY: querying (null new action) the SIGTERM disposition.
    unsafe { libc::sigaction(libc::SIGTERM, std::ptr::null(), &mut old) };
    assert_eq!(old.sa_sigaction, libc::SIG_DFL);
    assert!(fx.jail_entries().is_empty());
}

// ---------------------------------------------------------------- failures

#[test]
fn run_exec_failure_in_child_is_reported_and_cleaned_up() {
    if !is_root() {
        return;
    }
    let _serial = serial();
    let fx = Fixture::new("noexec");
    let mut spec = fx.probe_spec("it-noexec");
    // A text file (mode 0666, not executable) as the program.
    spec.files.push(JailFile::read_only(&fx.ro, "/notexec"));
    spec.program = "/notexec".into();
    let err = ember_jail::run(&spec).unwrap_err();
    assert_eq!(
        err.to_string(),
        "jailed child could not execute /notexec in the jail"
    );
    assert!(
        matches!(&err, Error::Child { source, .. } if source.raw_os_error() == Some(libc::EACCES))
    );
    assert!(fx.jail_entries().is_empty());
}

#[test]
fn run_cgroup_write_failure_removes_everything() {
    if !is_root() {
        return;
    }
    let _serial = serial();
    let fx = Fixture::new("badlimit");
    let mut spec = fx.probe_spec("it-badlimit");
    spec.cgroup = vec![("memory.max".into(), "lots".into())];
    let dirs = spec.cgroup_dirs().unwrap();
    let err = ember_jail::run(&spec).unwrap_err();
    assert!(matches!(err, Error::CgroupWrite { .. }), "{err}");
    assert!(err.to_string().contains("\"lots\""), "{err}");
    assert!(
        fx.jail_entries().is_empty(),
        "placeholders made before the cgroup are removed"
    );
    assert!(dirs.iter().all(|d| !d.exists()));
}

#[test]
fn run_bad_input_creates_nothing() {
    if !is_root() {
        return;
    }
    let _serial = serial();
    let fx = Fixture::new("bad");
    let good = fx.probe_spec("it-bad");

    let mut missing_dir = good.clone();
    missing_dir.dir = fx.base.join("nonexistent");
    let err = ember_jail::run(&missing_dir).unwrap_err();
    assert_eq!(
        err.to_string(),
        format!("cannot use jail directory {}", missing_dir.dir.display())
    );

    let mut root = good.clone();
    root.uid = 0;
    assert!(matches!(
        ember_jail::run(&root),
        Err(Error::RootNotAllowed { .. })
    ));

    let mut missing_file = good.clone();
    missing_file
        .files
        .push(JailFile::read_only(fx.base.join("nope.so"), "/lib/nope.so"));
    assert!(matches!(
        ember_jail::run(&missing_file),
        Err(Error::HostFile { .. })
    ));

    let mut no_controller = good.clone();
    no_controller.cgroup = vec![("nosuch.max".into(), "1".into())];
    let err = ember_jail::run(&no_controller).unwrap_err();
    assert!(
        matches!(&err, Error::CgroupControllerUnavailable { controller, .. } if controller == "nosuch")
    );
    if !io_controller_available() {
        no_controller.cgroup = vec![("io.max".into(), "8:0 rbps=1048576".into())];
        let err = ember_jail::run(&no_controller).unwrap_err();
        assert!(
            err.to_string()
                .starts_with("cgroup controller io is not available"),
            "{err}"
        );
    }
    assert!(
        fx.jail_entries().is_empty(),
        "bad input left {:?}",
        fx.jail_entries()
    );
    assert!(!Path::new("/sys/fs/cgroup/unified")
        .join(CGROUP_PARENT)
        .exists());
}

#[test]
fn run_existing_path_in_jail_is_kept_and_nothing_created() {
    if !is_root() {
        return;
    }
    let _serial = serial();
    let fx = Fixture::new("exists");
    let spec = fx.probe_spec("it-exists");
    fs::create_dir(fx.jail.join("data")).unwrap();
    fs::write(fx.jail.join("data/ro.txt"), "mine").unwrap();
    let err = ember_jail::run(&spec).unwrap_err();
    assert!(matches!(err, Error::PathExists { .. }), "{err}");
    assert_eq!(fx.jail_entries(), ["data"]);
    assert_eq!(
        fs::read_to_string(fx.jail.join("data/ro.txt")).unwrap(),
        "mine"
    );
}

/// Whether a cgroup v2 hierarchy here offers `io` (then `io.max` is valid).
fn io_controller_available() -> bool {
    [
        "/sys/fs/cgroup/cgroup.controllers",
        "/sys/fs/cgroup/unified/cgroup.controllers",
    ]
    .iter()
    .filter_map(|f| fs::read_to_string(f).ok())
    .any(|c| c.split_whitespace().any(|w| w == "io"))
}
