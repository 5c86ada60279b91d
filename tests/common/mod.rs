//! Helpers for Ember's integration tests: finding the `ember` binary and the
//! guest kernel, building tiny guests, running ember with a deadline, and
//! reading the guest agent's lines.

pub mod beat;
pub mod http;
pub mod packet;
pub mod peer;

use std::collections::HashMap;
use std::io::{Read, Write};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// The workspace root.
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

/// The `ember` binary of the same profile as this test (`target/<profile>/ember`).
pub fn ember_bin() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    // target/<profile>/deps/<test>-<hash>
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("test binary lives in target/<profile>/deps");
    let bin = profile_dir.join("ember");
    assert!(
        bin.exists(),
        "{} does not exist: build it first (cargo build --release -p ember-vmm)",
        bin.display()
    );
    bin
}

/// Whether `/dev/kvm` can be used. When it cannot, says so loudly on stderr
/// so a skipped KVM test is never silently green.
pub fn kvm_available(test: &str) -> bool {
    match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
    {
        Ok(_) => true,
        Err(e) => {
            eprintln!(
                "\n!!!!! SKIPPED {test}: /dev/kvm is not usable ({e}); this KVM test did NOT run !!!!!\n"
            );
            false
        }
    }
}

/// The directory holding the guest kernel (`vmlinux`, `bzImage`):
/// `$EMBER_GUEST_KERNEL_DIR`, or the cache directory of the current recipe.
pub fn guest_kernel_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("EMBER_GUEST_KERNEL_DIR") {
        return PathBuf::from(dir);
    }
    let script = workspace_root().join("tools/guest/build-kernel");
    let out = Command::new(&script)
        .arg("--print-dir")
        .output()
        .expect("run tools/guest/build-kernel --print-dir");
    let dir = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
    assert!(
        out.status.success() && dir.join("done").exists(),
        "the guest kernel is not built ({}): run tools/guest/build-kernel",
        dir.display()
    );
    dir
}

/// Counts forever, printing the count's low three bits as a digit after
/// each delay: `01234567012...`; a restored guest prints the digit after
/// the last one it printed before the snapshot.
///
/// ```text
///       xor %ebx,%ebx ; mov $0x3f8,%dx
/// 1:    mov $0x10000,%ecx
/// 2:    dec %ecx ; jnz 2b
///       inc %ebx ; mov %ebx,%eax ; and $7,%al ; add $'0',%al ; out %al,(%dx)
///       jmp 1b
/// ```
pub const TINY_COUNTER: [u8; 26] = [
    0x31, 0xdb, 0x66, 0xba, 0xf8, 0x03, 0xb9, 0x00, 0x00, 0x01, 0x00, 0xff, 0xc9, 0x75, 0xfc, 0xff,
    0xc3, 0x89, 0xd8, 0x24, 0x07, 0x04, 0x30, 0xee, 0xeb, 0xec,
];

/// Prints `R`, then halts with interrupts off: a VM that costs the host no
/// CPU (for tests that run many at once).
///
/// ```text
///       mov $0x3f8,%dx ; mov $'R',%al ; out %al,(%dx)
///       cli
/// 1:    hlt ; jmp 1b
/// ```
pub const TINY_HALT: [u8; 11] = [
    0x66, 0xba, 0xf8, 0x03, 0xb0, 0x52, 0xee, 0xfa, 0xf4, 0xeb, 0xfd,
];

/// A minimal ELF64 executable whose one segment holds `code` at guest
/// physical (and virtual) address [`TINY_LOAD_ADDR`], entered there in
/// 64-bit mode by ember's loader like a vmlinux.
pub fn tiny_elf(code: &[u8]) -> Vec<u8> {
    const EHDR: u64 = 64;
    const PHDR: u64 = 56;
    let offset = EHDR + PHDR;
    let mut f = Vec::new();
    f.extend(b"\x7fELF");
    f.extend([2, 1, 1, 0]); // 64-bit, little-endian, version 1, SysV
    f.extend([0u8; 8]);
    f.extend(2u16.to_le_bytes()); // ET_EXEC
    f.extend(62u16.to_le_bytes()); // EM_X86_64
    f.extend(1u32.to_le_bytes());
    f.extend(TINY_LOAD_ADDR.to_le_bytes()); // e_entry
    f.extend(EHDR.to_le_bytes()); // e_phoff
    f.extend(0u64.to_le_bytes()); // e_shoff
    f.extend(0u32.to_le_bytes()); // e_flags
    f.extend(64u16.to_le_bytes()); // e_ehsize
    f.extend(56u16.to_le_bytes()); // e_phentsize
    f.extend(1u16.to_le_bytes()); // e_phnum
    f.extend(64u16.to_le_bytes()); // e_shentsize
    f.extend(0u16.to_le_bytes()); // e_shnum
    f.extend(0u16.to_le_bytes()); // e_shstrndx
    assert_eq!(f.len() as u64, EHDR);
    f.extend(1u32.to_le_bytes()); // PT_LOAD
    f.extend(5u32.to_le_bytes()); // R+X
    f.extend(offset.to_le_bytes()); // p_offset
    f.extend(TINY_LOAD_ADDR.to_le_bytes()); // p_vaddr
    f.extend(TINY_LOAD_ADDR.to_le_bytes()); // p_paddr
    f.extend((code.len() as u64).to_le_bytes()); // p_filesz
    f.extend((code.len() as u64).to_le_bytes()); // p_memsz
    f.extend(0x1000u64.to_le_bytes()); // p_align
    assert_eq!(f.len() as u64, offset);
    f.extend(code);
    f
}

/// Where tiny guests are loaded and entered.
pub const TINY_LOAD_ADDR: u64 = 0x10_0000;

/// A scratch directory removed on drop.
pub struct TempDir(PathBuf);

impl TempDir {
    /// A fresh directory under the system temp dir.
    pub fn new(tag: &str) -> Self {
        let dir = std::env::temp_dir().join(format!(
            "ember-test-{tag}-{}-{}",
            std::process::id(),
            Instant::now().elapsed().as_nanos()
        ));
        std::fs::create_dir_all(&dir).expect("create temp dir");
        TempDir(dir)
    }

    /// Path of `name` inside the directory.
    pub fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }

    /// Writes `bytes` to `name` and returns its path.
    pub fn write(&self, name: &str, bytes: &[u8]) -> PathBuf {
        let p = self.path(name);
        std::fs::write(&p, bytes).expect("write temp file");
        p
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// What a finished ember run left behind.
#[derive(Debug)]
pub struct Run {
    /// Exit status.
    pub status: ExitStatus,
    /// Everything on stdout (the guest console).
    pub stdout: String,
    /// Everything on stderr (ember's log and errors).
    pub stderr: String,
    /// Wall time from spawn to exit.
    pub elapsed: Duration,
    /// Peak resident set size of ember, in KiB (from wait4's rusage).
    pub max_rss_kib: u64,
}

impl Run {
    /// The exit code; panics with the output if ember died of a signal.
    pub fn code(&self) -> i32 {
        match self.status.code() {
            Some(c) => c,
            None => panic!(
                "ember died of signal {:?}\nstdout:\n{}\nstderr:\n{}",
                self.status.signal(),
                self.stdout,
                self.stderr
            ),
        }
    }

    /// Panics with the whole output unless `cond` holds.
    pub fn check(&self, cond: bool, what: &str) {
        assert!(
            cond,
            "{what}\nstatus: {:?}\nstdout:\n{}\nstderr:\n{}",
            self.status, self.stdout, self.stderr
        );
    }
}

/// A running ember whose output is collected in the background.
pub struct Running {
    child: Child,
    started: Instant,
    stdout_rx: mpsc::Receiver<Vec<u8>>,
    stdout_buf: Vec<u8>,
    stderr_thread: Option<std::thread::JoinHandle<Vec<u8>>>,
    reaped: bool,
}

impl Drop for Running {
    /// A test that fails before it finished its ember kills it, so a
    /// spinning guest does not outlive the test.
    fn drop(&mut self) {
        if !self.reaped {
            let _ = self.child.kill();
            wait4_blocking(self.pid());
        }
    }
}

fn reader<R: Read + Send + 'static>(mut r: R) -> mpsc::Receiver<Vec<u8>> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut buf = [0u8; 4096];
        loop {
            match r.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if tx.send(buf[..n].to_vec()).is_err() {
                        break;
                    }
                }
            }
        }
    });
    rx
}

/// Runs a host tool: its exit code and its stdout and stderr together.
pub fn run_tool(cmd: &str, args: &[&str]) -> (i32, String) {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("run {cmd}: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code().unwrap_or(-1), text)
}

/// `ember img ARGS`, as [`run_tool`].
pub fn ember_img(args: &[&str]) -> (i32, String) {
    let mut a = vec!["img"];
    a.extend_from_slice(args);
    run_tool(ember_bin().to_str().expect("a UTF-8 path"), &a)
}

/// Starts `ember ARGS` with `stdin` fed in and closed afterwards.
pub fn spawn_ember(args: &[&str], stdin: &[u8]) -> Running {
    spawn_command(Command::new(ember_bin()).args(args), stdin)
}

/// Starts `ember ARGS` inside network namespace `ns` (`ip netns exec`,
/// which execs ember itself, so the pid is ember's).
pub fn spawn_ember_in_netns(ns: &str, args: &[&str], stdin: &[u8]) -> Running {
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", ns]).arg(ember_bin()).args(args);
    spawn_command(&mut cmd, stdin)
}

/// `ember jail` as the jailed tests run it: in directory `jail`, as
/// nobody (65534), in a new PID namespace, its API socket `api.sock` in
/// the jail's `/run`; then `extra` (the VM's own flags).
pub fn spawn_jailed(jail: &Path, extra: &[&str]) -> Running {
    let mut args = vec![
        "jail",
        "--dir",
        jail.to_str().expect("a UTF-8 jail path"),
        "--uid",
        "65534",
        "--gid",
        "65534",
        "--new-pid-ns",
        "--api-sock",
        "api.sock",
    ];
    args.extend_from_slice(extra);
    spawn_ember(&args, b"")
}

/// [`spawn_ember_in_netns`] with extra environment variables.
pub fn spawn_ember_in_netns_env(ns: &str, args: &[&str], env: &[(&str, &str)]) -> Running {
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", ns])
        .arg(ember_bin())
        .args(args)
        .envs(env.iter().copied());
    spawn_command(&mut cmd, b"")
}

fn spawn_command(cmd: &mut Command, stdin: &[u8]) -> Running {
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn ember");
    let started = Instant::now();
    let mut input = child.stdin.take().expect("stdin");
    let data = stdin.to_vec();
    std::thread::spawn(move || {
        let _ = input.write_all(&data);
    });
    let stdout_rx = reader(child.stdout.take().expect("stdout"));
    let mut stderr = child.stderr.take().expect("stderr");
    let stderr_thread = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = stderr.read_to_end(&mut v);
        v
    });
    Running {
        child,
        started,
        stdout_rx,
        stdout_buf: Vec::new(),
        stderr_thread: Some(stderr_thread),
        reaped: false,
    }
}

impl Running {
    /// The process id.
    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// Waits until stdout contains `needle` (true) or `timeout` passes or
    /// stdout closes (false).
    pub fn wait_for_output(&mut self, needle: &str, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if String::from_utf8_lossy(&self.stdout_buf).contains(needle) {
                return true;
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return false;
            }
            match self.stdout_rx.recv_timeout(left) {
                Ok(chunk) => self.stdout_buf.extend(chunk),
                Err(mpsc::RecvTimeoutError::Timeout) => return false,
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    return String::from_utf8_lossy(&self.stdout_buf).contains(needle)
                }
            }
        }
    }

    /// Everything ember has printed on stdout so far.
    pub fn stdout_so_far(&mut self) -> String {
        while let Ok(chunk) = self.stdout_rx.try_recv() {
            self.stdout_buf.extend(chunk);
        }
        String::from_utf8_lossy(&self.stdout_buf).into_owned()
    }

    /// Sends `signal` to ember.
    pub fn signal(&self, signal: i32) {
        // SAFETY: kill() on the pid of a child we have not reaped.
        let ret = unsafe { libc::kill(self.pid(), signal) };
        assert_eq!(ret, 0, "kill({}, {signal})", self.pid());
    }

    /// Waits up to `timeout` for ember to exit (killing it after that) and
    /// collects its output.
    pub fn finish(mut self, timeout: Duration) -> Run {
        let deadline = self.started + timeout;
        let (status, rss) = loop {
            if let Some(r) = try_wait4(self.pid()) {
                self.reaped = true;
                break r;
            }
            if Instant::now() >= deadline {
                let _ = self.child.kill();
                wait4_blocking(self.pid());
                self.reaped = true;
                let stderr = self.collect_stderr();
                self.drain_stdout();
                panic!(
                    "ember did not exit within {timeout:?}; killed\nstdout:\n{}\nstderr:\n{stderr}",
                    String::from_utf8_lossy(&self.stdout_buf)
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        let elapsed = self.started.elapsed();
        self.drain_stdout();
        let stderr = self.collect_stderr();
        Run {
            status,
            stdout: String::from_utf8_lossy(&self.stdout_buf).into_owned(),
            stderr,
            elapsed,
            max_rss_kib: rss,
        }
    }

    fn drain_stdout(&mut self) {
        while let Ok(chunk) = self.stdout_rx.recv_timeout(Duration::from_millis(200)) {
            self.stdout_buf.extend(chunk);
        }
    }

    fn collect_stderr(&mut self) -> String {
        let v = self
            .stderr_thread
            .take()
            .and_then(|t| t.join().ok())
            .unwrap_or_default();
        String::from_utf8_lossy(&v).into_owned()
    }
}

fn rusage_to(status: i32, ru: &libc::rusage) -> (ExitStatus, u64) {
    (
        ExitStatus::from_raw(status),
        u64::try_from(ru.ru_maxrss).unwrap_or(0),
    )
}

fn try_wait4(pid: i32) -> Option<(ExitStatus, u64)> {
    let mut status = 0;
    // SAFETY: rusage is plain data; wait4 fills it.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: valid pointers to locals; pid is our unreaped child.
    let ret = unsafe { libc::wait4(pid, &mut status, libc::WNOHANG, &mut ru) };
    (ret == pid).then(|| rusage_to(status, &ru))
}

fn wait4_blocking(pid: i32) -> (ExitStatus, u64) {
    let mut status = 0;
    // SAFETY: rusage is plain data; wait4 fills it.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: valid pointers to locals; pid is our unreaped child.
    unsafe { libc::wait4(pid, &mut status, 0, &mut ru) };
    rusage_to(status, &ru)
}

/// Runs `ember ARGS` to completion with `stdin`, killing it after `timeout`.
pub fn run_ember(args: &[&str], stdin: &[u8], timeout: Duration) -> Run {
    spawn_ember(args, stdin).finish(timeout)
}

/// Starts `ember ARGS` with extra environment variables.
pub fn spawn_ember_env(args: &[&str], env: &[(&str, &str)]) -> Running {
    let mut cmd = Command::new(ember_bin());
    cmd.args(args).envs(env.iter().copied());
    spawn_command(&mut cmd, b"")
}

/// The host CPUs the thread named `name` of process `pid` may run on
/// (`Cpus_allowed_list`), if there is such a thread.
pub fn thread_cpus(pid: i32, name: &str) -> Option<String> {
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).ok()? {
        let dir = task.ok()?.path();
        let comm = std::fs::read_to_string(dir.join("comm")).unwrap_or_default();
        if comm.trim() == name {
            let status = std::fs::read_to_string(dir.join("status")).ok()?;
            return status
                .lines()
                .find(|l| l.starts_with("Cpus_allowed_list:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .map(str::to_string);
        }
    }
    None
}

/// The `VmFlags` of each mapping of process `pid` whose name contains
/// `name` (from /proc/PID/smaps).
pub fn mapping_flags(pid: i32, name: &str) -> Vec<String> {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).unwrap_or_default();
    let mut out = Vec::new();
    let mut inside = false;
    for line in smaps.lines() {
        if let Some(flags) = line.strip_prefix("VmFlags:") {
            if inside {
                out.push(flags.trim().to_string());
            }
        } else if line
            .split_whitespace()
            .next()
            .is_some_and(|w| w.contains('-') && !w.ends_with(':'))
        {
            inside = line.contains(name);
        }
    }
    out
}

/// The `EMBER-AGENT <check> k=v ...` lines of a console log, by check
/// name (the last line of each check).
pub fn agent_lines(console: &str) -> HashMap<String, HashMap<String, String>> {
    agent_all(console)
        .into_iter()
        .filter_map(|(check, mut lines)| lines.pop().map(|l| (check, l)))
        .collect()
}

/// Every agent line of a run that must have ended with exit 0 (the agent
/// restarts the machine) and a `done ... failed=0` line; fails the test
/// otherwise.
pub fn agent_ok(run: &Run) -> HashMap<String, Vec<HashMap<String, String>>> {
    let all = agent_all(&run.stdout);
    run.check(run.code() == 0, "the agent restarts the machine: exit 0");
    let done = agent_lines(&run.stdout);
    run.check(
        done.get("done")
            .and_then(|d| d.get("failed"))
            .map(String::as_str)
            == Some("0"),
        "no agent check failed",
    );
    all
}

/// Every `EMBER-AGENT <check> k=v ...` line of a console log, by check
/// name, in order (for checks that print one line per device or peer).
pub fn agent_all(console: &str) -> HashMap<String, Vec<HashMap<String, String>>> {
    let mut out: HashMap<String, Vec<HashMap<String, String>>> = HashMap::new();
    for line in console.lines() {
        let Some(rest) = line.split("EMBER-AGENT ").nth(1) else {
            continue;
        };
        let mut words = rest.split_whitespace();
        let Some(check) = words.next() else { continue };
        let kv = words
            .filter_map(|w| w.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        out.entry(check.to_string()).or_default().push(kv);
    }
    out
}

/// Asserts that ember failed cleanly: a non-zero exit, exactly one line on
/// stderr starting `ember: error:` and containing every one of `needles`,
/// and no panic.
pub fn assert_clean_error(run: &Run, needles: &[&str]) {
    let code = run.code();
    run.check(code != 0, "ember should have failed");
    run.check(
        !run.stderr.contains("panicked") && !run.stderr.contains("RUST_BACKTRACE"),
        "ember panicked",
    );
    let lines: Vec<&str> = run.stderr.lines().collect();
    run.check(lines.len() == 1, "expected exactly one line on stderr");
    run.check(
        lines[0].starts_with("ember: error: "),
        "the line should start with 'ember: error: '",
    );
    for n in needles {
        run.check(
            lines[0].contains(n),
            &format!("the error should mention {n:?}"),
        );
    }
}

/// An uncompressed "newc" cpio archive (what Linux unpacks as an initramfs)
/// holding regular files `(name, content)`, mode 0644.
pub fn newc_cpio(files: &[(&str, &[u8])]) -> Vec<u8> {
    fn pad4(v: &mut Vec<u8>) {
        while v.len() % 4 != 0 {
            v.push(0);
        }
    }
    fn entry(v: &mut Vec<u8>, ino: usize, name: &str, mode: u32, data: &[u8]) {
        let n = |x: usize| u32::try_from(x).expect("cpio field fits in 32 bits");
        let fields = [
            n(ino),
            mode,
            0,
            0,
            1,
            0,
            n(data.len()),
            0,
            0,
            0,
            0,
            n(name.len() + 1),
            0,
        ];
        v.extend(b"070701");
        for f in fields {
            v.extend(format!("{f:08x}").as_bytes());
        }
        v.extend(name.as_bytes());
        v.push(0);
        pad4(v);
        v.extend(data);
        pad4(v);
    }
    let mut v = Vec::new();
    for (i, (name, data)) in files.iter().enumerate() {
        entry(&mut v, i + 1, name, 0o100644, data);
    }
    entry(&mut v, 0, "TRAILER!!!", 0, &[]);
    v
}

/// SplitMix64, as the guest agent computes it (tools/guest/agent/ember_agent_block.c).
pub fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// The 4 KiB block the agent's `blk_write=DEV:SEED:COUNT` writes at byte offset `off`.
pub fn pattern_block(seed: u64, off: u64) -> Vec<u8> {
    (0..512u64)
        .flat_map(|j| splitmix64(seed ^ off ^ (j << 48)).to_le_bytes())
        .collect()
}

/// The byte offsets of the agent's `blk_write=DEV:SEED:COUNT` on a disk of `size` bytes.
pub fn pattern_offsets(seed: u64, count: u64, size: u64) -> Vec<u64> {
    let blocks = size / 4096;
    (0..count)
        .map(|i| (splitmix64(seed.wrapping_add(i)) % blocks) * 4096)
        .collect()
}

/// FNV-1a 64, as the agent's `blk_read` reports it.
pub fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x100_0000_01b3)
    })
}

/// `len` deterministic pseudo-random bytes from `seed`.
pub fn random_bytes(seed: u64, len: usize) -> Vec<u8> {
    (0..len.div_ceil(8) as u64)
        .flat_map(|i| splitmix64(seed ^ i.wrapping_mul(0x1000_0000_01b3)).to_le_bytes())
        .take(len)
        .collect()
}

/// Byte `pos` of the agent's TCP pattern stream with `seed`
/// (tools/guest/agent/ember_agent_net.c): word k is splitmix64(seed + k).
pub fn net_pattern_byte(seed: u64, pos: u64) -> u8 {
    splitmix64(seed + pos / 8).to_le_bytes()[(pos % 8) as usize]
}

/// A network namespace with a tap, removed (with everything in it) on drop.
pub struct NetNs {
    /// The namespace's name.
    pub name: String,
}

fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("ip: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        ))
    }
}

impl NetNs {
    /// Creates namespace `ember-<tag>-<pid>` with loopback up and taps
    /// `(name, host address/prefix)` up in it.
    pub fn new(tag: &str, taps: &[(&str, &str)]) -> Result<Self, String> {
        Self::with_tap_owner(tag, taps, None)
    }

    /// [`NetNs::new`], with the taps owned by `owner` (so an unprivileged
    /// process of that uid can attach to them).
    pub fn with_tap_owner(
        tag: &str,
        taps: &[(&str, &str)],
        owner: Option<u32>,
    ) -> Result<Self, String> {
        Self::make(tag, taps, owner, false)
    }

    /// [`NetNs::new`] with multi-queue taps (`ip tuntap add ... multi_queue`).
    pub fn multi_queue(tag: &str, taps: &[(&str, &str)]) -> Result<Self, String> {
        Self::make(tag, taps, None, true)
    }

    fn make(
        tag: &str,
        taps: &[(&str, &str)],
        owner: Option<u32>,
        multi_queue: bool,
    ) -> Result<Self, String> {
        // Unique even for tests running in parallel in one process.
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let name = format!("ember-{tag}-{}-{n}", std::process::id());
        let _ = ip(&["netns", "del", &name]);
        ip(&["netns", "add", &name])?;
        let ns = NetNs { name };
        ns.exec(&["ip", "link", "set", "lo", "up"])?;
        for (tap, addr) in taps {
            let user = owner.map(|u| u.to_string());
            let mut add = vec!["ip", "tuntap", "add", tap, "mode", "tap"];
            if let Some(u) = &user {
                add.extend(["user", u.as_str()]);
            }
            if multi_queue {
                add.push("multi_queue");
            }
            ns.exec(&add)?;
            ns.exec(&["ip", "addr", "add", addr, "dev", tap])?;
            ns.exec(&["ip", "link", "set", tap, "up"])?;
        }
        Ok(ns)
    }

    /// Runs a command in the namespace; its output.
    pub fn exec(&self, args: &[&str]) -> Result<String, String> {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.name])
            .args(args)
            .output()
            .map_err(|e| format!("{}: {e}", args.join(" ")))?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned()
            + &String::from_utf8_lossy(&out.stderr);
        if out.status.success() {
            Ok(text)
        } else {
            Err(format!("{}: {text}", args.join(" ")))
        }
    }

    /// Joins this namespace and `other` with a veth pair (`veth0` here,
    /// `veth1` there), addressed `a` and `b` (`ADDR/PREFIX`), both up: two
    /// "hosts" on one link.
    pub fn link(&self, other: &NetNs, a: &str, b: &str) -> Result<(), String> {
        self.exec(&[
            "ip",
            "link",
            "add",
            "veth0",
            "type",
            "veth",
            "peer",
            "name",
            "veth1",
            "netns",
            &other.name,
        ])?;
        self.exec(&["ip", "addr", "add", a, "dev", "veth0"])?;
        self.exec(&["ip", "link", "set", "veth0", "up"])?;
        other.exec(&["ip", "addr", "add", b, "dev", "veth1"])?;
        other.exec(&["ip", "link", "set", "veth1", "up"])?;
        Ok(())
    }

    /// Captures the frames arriving on `dev` in this namespace for
    /// `duration`, on a thread (an `AF_PACKET` socket); joined, the frames.
    // The casts are of small kernel constants and struct sizes.
    #[allow(
        clippy::cast_possible_truncation,
        clippy::cast_possible_wrap,
        clippy::cast_sign_loss
    )]
    pub fn capture(&self, dev: &str, duration: Duration) -> std::thread::JoinHandle<Vec<Vec<u8>>> {
        let dev = std::ffi::CString::new(dev).expect("name");
        self.spawn(move || {
            const ETH_P_ALL: u16 = 0x0003;
            // SAFETY: plain syscalls on a socket this closure owns; the
            // buffers passed are live locals of the given sizes.
            unsafe {
                let fd = libc::socket(
                    libc::AF_PACKET,
                    libc::SOCK_RAW,
                    i32::from(ETH_P_ALL.to_be()),
                );
                assert!(fd >= 0, "AF_PACKET socket");
                let index = libc::if_nametoindex(dev.as_ptr());
                assert!(index > 0, "no such device {dev:?}");
                let mut addr: libc::sockaddr_ll = std::mem::zeroed();
                addr.sll_family = libc::AF_PACKET as u16;
                addr.sll_protocol = ETH_P_ALL.to_be();
                addr.sll_ifindex = index as i32;
                let ret = libc::bind(
                    fd,
                    std::ptr::addr_of!(addr).cast(),
                    std::mem::size_of::<libc::sockaddr_ll>() as u32,
                );
                assert_eq!(ret, 0, "bind AF_PACKET");
                let tv = libc::timeval {
                    tv_sec: 0,
                    tv_usec: 200_000,
                };
                libc::setsockopt(
                    fd,
                    libc::SOL_SOCKET,
                    libc::SO_RCVTIMEO,
                    std::ptr::addr_of!(tv).cast(),
                    std::mem::size_of::<libc::timeval>() as u32,
                );
                let deadline = Instant::now() + duration;
                let mut frames = Vec::new();
                let mut buf = vec![0u8; 65536];
                while Instant::now() < deadline {
                    let n = libc::recv(fd, buf.as_mut_ptr().cast(), buf.len(), 0);
                    if n > 0 {
                        frames.push(buf[..n as usize].to_vec());
                    }
                }
                libc::close(fd);
                frames
            }
        })
    }

    /// Runs `f` on a new thread that has entered the namespace.
    pub fn spawn<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> std::thread::JoinHandle<T> {
        let path = format!("/var/run/netns/{}", self.name);
        std::thread::spawn(move || {
            use std::os::fd::AsRawFd;
            let ns = std::fs::File::open(&path).expect("open netns");
            // SAFETY: setns on an open namespace fd affects only this thread.
            let ret = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(ret, 0, "setns {path}");
            f()
        })
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        let _ = ip(&["netns", "del", &self.name]);
    }
}

/// Whether network namespaces and taps can be made here; says so loudly when not.
pub fn netns_available(test: &str) -> bool {
    match NetNs::new("probe", &[("tapprobe0", "10.254.254.1/30")]) {
        Ok(_) => true,
        Err(e) => {
            eprintln!(
                "\n!!!!! SKIPPED {test}: cannot make a network namespace with a tap ({e}) !!!!!\n"
            );
            false
        }
    }
}

/// Each thread of process `pid`: its name and the `Seccomp:` value of its
/// `/proc/<pid>/task/<tid>/status` (2 = filter mode).
pub fn thread_seccomp_modes(pid: i32) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return out;
    };
    for task in tasks.flatten() {
        let status = std::fs::read_to_string(task.path().join("status")).unwrap_or_default();
        let field = |key: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(key))
                .map(|v| v.trim().to_string())
                .unwrap_or_default()
        };
        out.push((field("Name:"), field("Seccomp:")));
    }
    out.sort();
    out
}

/// Waits up to `timeout` for process `pid` to run `threads` threads of its
/// own (named `ember*`) and for every thread of the process, including the
/// ones KVM starts in it (`kvm-nx-lpage-recovery`), to be in seccomp filter
/// mode; returns the last observation either way.
pub fn wait_all_threads_filtered(
    pid: i32,
    threads: usize,
    timeout: Duration,
) -> (bool, Vec<(String, String)>) {
    let deadline = Instant::now() + timeout;
    loop {
        let seen = thread_seccomp_modes(pid);
        let own = seen.iter().filter(|(n, _)| n.starts_with("ember")).count();
        let ok = own == threads && seen.iter().all(|(_, mode)| mode == "2");
        if ok || Instant::now() > deadline {
            return (ok, seen);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// How many device events ember's I/O thread `name` served, from its exit
/// line (`I/O thread virtio-blk0: served N device events`).
pub fn io_thread_served(stderr: &str, name: &str) -> Option<u64> {
    let key = format!("I/O thread {name}: served ");
    stderr.lines().find_map(|l| {
        l.split_once(&key)?
            .1
            .split_whitespace()
            .next()?
            .parse()
            .ok()
    })
}

/// A `Field:  N kB` line of a /proc file (`status`, `smaps_rollup`), in KiB.
pub fn proc_kib(path: &str, field: &str) -> Option<u64> {
    std::fs::read_to_string(path).ok().and_then(|s| {
        s.lines()
            .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|v| v.parse().ok())
    })
}

/// The ext4 root image `tools/guest/build-rootfs` makes (cached in
/// `~/.cache/ember`), building it first if needed.
pub fn rootfs_image() -> PathBuf {
    let out = Command::new(workspace_root().join("tools/guest/build-rootfs"))
        .output()
        .expect("run tools/guest/build-rootfs");
    assert!(
        out.status.success(),
        "build-rootfs: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    PathBuf::from(
        String::from_utf8_lossy(&out.stdout)
            .trim()
            .lines()
            .last()
            .unwrap_or(""),
    )
}

/// An exclusive hold on a host-wide resource (the huge page pool, KSM's
/// tunables) shared by tests that may run at once, in one test binary or
/// in several (tools/test runs the guest tests two at a time across
/// binaries): an advisory `flock` on `/tmp/ember-tests-NAME.lock`, let go
/// when dropped (or when the test process dies).
pub struct HostLock {
    _file: std::fs::File,
}

impl HostLock {
    /// Waits until no other test holds `name`.
    pub fn take(name: &str) -> HostLock {
        use std::os::fd::AsRawFd;
        let path = format!("/tmp/ember-tests-{name}.lock");
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .unwrap_or_else(|e| panic!("{path}: {e}"));
        // SAFETY: flock on a descriptor this function owns; no memory is
        // passed.
        let ret = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) };
        assert_eq!(ret, 0, "flock {path}: {}", std::io::Error::last_os_error());
        HostLock { _file: file }
    }
}
