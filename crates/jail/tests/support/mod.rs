//! The probe: what the jailed copy of the test binary does and reports.

use std::ffi::CStr;
use std::fs::{self, OpenOptions};
use std::io::Read;
use std::time::{Duration, Instant};

/// Set in the jailed child's environment: the `probe` test does its work.
pub const PROBE_ENV: &str = "EMBER_JAIL_PROBE";
/// Milliseconds the probe sleeps after reporting.
pub const SLEEP_ENV: &str = "EMBER_JAIL_PROBE_SLEEP_MS";
/// Milliseconds the probe spins on the CPU after reporting (before sleeping).
pub const SPIN_ENV: &str = "EMBER_JAIL_PROBE_SPIN_MS";
/// Mebibytes the probe allocates and touches after reporting.
pub const ALLOC_ENV: &str = "EMBER_JAIL_PROBE_ALLOC_MB";
/// Exit code the probe exits with after reporting.
pub const EXIT_ENV: &str = "EMBER_JAIL_PROBE_EXIT";
/// `_LINUX_CAPABILITY_VERSION_3`.
const CAP_V3: u32 = 0x2008_0522;

/// Inside the jail: reports what the process sees to `/report`, one
/// `key=value` a line, then spins, allocates, sleeps or exits as its
/// environment says.
pub fn probe_main() {
    let mut report = String::new();
    for (key, value) in probe_values() {
        report.push_str(&format!("{key}={value}\n"));
    }
    print!("{report}");
    fs::write("/report", &report).expect("the probe cannot write /report");
    let knob = |name: &str| std::env::var(name).ok().and_then(|v| v.parse::<u64>().ok());
    if let Some(ms) = knob(SPIN_ENV) {
        let start = Instant::now();
        let mut x = 0u64;
        while start.elapsed() < Duration::from_millis(ms) {
            x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(7));
        }
    }
    if let Some(mb) = knob(ALLOC_ENV) {
        let len = usize::try_from(mb << 20).unwrap();
        let mut big = vec![0u8; len];
        for page in big.chunks_mut(4096) {
            page[0] = 1;
        }
        std::hint::black_box(&big);
    }
    if let Some(ms) = std::env::var(SLEEP_ENV).ok().and_then(|v| v.parse().ok()) {
        std::thread::sleep(Duration::from_millis(ms));
    }
    if let Some(code) = std::env::var(EXIT_ENV).ok().and_then(|v| v.parse().ok()) {
        std::process::exit(code);
    }
}

fn probe_values() -> Vec<(&'static str, String)> {
    // SAFETY: getuid, getgid, getpid and getgroups(0, NULL) only return numbers.
    let (uid, gid, pid, groups) = unsafe {
        (
            libc::getuid(),
            libc::getgid(),
            libc::getpid(),
            libc::getgroups(0, std::ptr::null_mut()),
        )
    };
    let mut root: Vec<String> = fs::read_dir("/")
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    root.sort();
    let errno_of = |r: std::io::Result<fs::File>| match r {
        Ok(_) => "ok".to_string(),
        Err(e) => format!("errno{}", e.raw_os_error().unwrap_or(0)),
    };
    let urandom = fs::File::open("/dev/urandom").and_then(|mut f| {
        let mut buf = [0u8; 16];
        f.read_exact(&mut buf).map(|()| buf.len())
    });
    vec![
        ("uid", uid.to_string()),
        ("gid", gid.to_string()),
        ("groups", groups.to_string()),
        ("pid", pid.to_string()),
        ("caps", capabilities()),
        ("bounding", count_caps(libc::PR_CAPBSET_READ, 0).to_string()),
        ("ambient", count_caps(libc::PR_CAP_AMBIENT, 1).to_string()),
        (
            "no_new_privs",
            prctl0(libc::PR_GET_NO_NEW_PRIVS).to_string(),
        ),
        ("root", root.join(",")),
        (
            "kvm",
            errno_of(OpenOptions::new().read(true).write(true).open("/dev/kvm")),
        ),
        ("urandom", format!("{urandom:?}")),
        (
            "ro_write",
            errno_of(OpenOptions::new().write(true).open("/data/ro.txt")),
        ),
        (
            "root_write",
            errno_of(OpenOptions::new().write(true).create_new(true).open("/new")),
        ),
        ("run_write", run_write()),
        ("sigusr1_blocked", sigusr1_blocked()),
        ("nofile", rlimit(libc::RLIMIT_NOFILE)),
        ("fsize", rlimit(libc::RLIMIT_FSIZE)),
        ("open_fds", open_fds()),
        ("ifaces", interfaces()),
    ]
}

/// Whether a file can be made (and removed again) in `/run`, the jail's
/// writable directory when it has one.
fn run_write() -> String {
    let path = "/run/probe-file";
    match fs::write(path, b"x").and_then(|()| fs::remove_file(path)) {
        Ok(()) => "ok".to_string(),
        Err(e) => format!("errno{}", e.raw_os_error().unwrap_or(0)),
    }
}

/// `effective/permitted/inheritable`, each as 64-bit hex, from capget.
fn capabilities() -> String {
    let mut header = [CAP_V3, 0];
    let mut data = [[0u32; 3]; 2];
    // SAFETY: version 3 capget writes two 3-word data structs, which `data` is.
    let ret = unsafe { libc::syscall(libc::SYS_capget, header.as_mut_ptr(), data.as_mut_ptr()) };
    if ret != 0 {
        return "capget-failed".into();
    }
    let set = |i: usize| (u64::from(data[1][i]) << 32) | u64::from(data[0][i]);
    format!("{:#x}/{:#x}/{:#x}", set(0), set(1), set(2))
}

/// How many capabilities 0..=63 a prctl query says are set.
fn count_caps(option: libc::c_int, sub: libc::c_ulong) -> usize {
    (0..64u64)
        .filter(|cap| {
            let zero: libc::c_ulong = 0;
            // SAFETY: PR_CAPBSET_READ / PR_CAP_AMBIENT_IS_SET take integers only.
            let ret = unsafe {
                if sub == 0 {
                    libc::prctl(option, *cap, zero, zero, zero)
                } else {
                    libc::prctl(option, sub, *cap, zero, zero)
                }
            };
            ret == 1
        })
        .count()
}

fn prctl0(option: libc::c_int) -> libc::c_int {
    let zero: libc::c_ulong = 0;
    // SAFETY: a query prctl taking integers only.
    unsafe { libc::prctl(option, zero, zero, zero, zero) }
}

fn rlimit(resource: libc::__rlimit_resource_t) -> String {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit fills `limit`.
    unsafe { libc::getrlimit(resource, &mut limit) };
    format!("{}/{}", limit.rlim_cur, limit.rlim_max)
}

/// Whether SIGUSR1 is blocked (the outer test blocks it in its own thread:
/// the jail must not pass the caller's signal mask on).
fn sigusr1_blocked() -> String {
    // SAFETY: an all-zero sigset_t is valid; pthread_sigmask only fills it.
    let mut mask: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: a query (null new set) of this thread's mask.
    unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, std::ptr::null(), &mut mask) };
    // SAFETY: `mask` is an initialized set.
    unsafe { libc::sigismember(&mask, libc::SIGUSR1) }.to_string()
}

/// Open descriptors above 2 (there is no /proc in the jail to list them).
fn open_fds() -> String {
    let open: Vec<String> = (3..256)
        // SAFETY: F_GETFD only queries a descriptor number.
        .filter(|fd| unsafe { libc::fcntl(*fd, libc::F_GETFD) } != -1)
        .map(|fd| fd.to_string())
        .collect();
    open.join(",")
}

/// The network interfaces this process sees.
fn interfaces() -> String {
    // SAFETY: if_nameindex returns a list terminated by a zero entry, or null.
    let list = unsafe { libc::if_nameindex() };
    if list.is_null() {
        return "if_nameindex-failed".into();
    }
    let mut names = Vec::new();
    let mut entry = list;
    // SAFETY: walking the array up to its terminating entry; each name is a
    // NUL-terminated string owned by the list until it is freed below.
    unsafe {
        while (*entry).if_index != 0 {
            names.push(
                CStr::from_ptr((*entry).if_name)
                    .to_string_lossy()
                    .into_owned(),
            );
            entry = entry.add(1);
        }
        libc::if_freenameindex(list);
    }
    names.sort();
    names.join(",")
}
