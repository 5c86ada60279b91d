//! The seccomp filters kill: each case runs in a child process (this test
//! binary again, as a probe) that installs one thread kind's filter and
//! then makes one forbidden syscall. The child must die of SIGSYS, after a
//! line naming the syscall; an allowed syscall must not kill it.
//!
//! What no thread kind may do, whatever an attacker who took it over
//! wants: open a file with the old `open(2)`, exec, ptrace, mount, make
//! memory executable (`mmap`/`mprotect` with `PROT_EXEC`), start a process
//! (`clone`), open a raw packet socket. Per kind on top: the vCPU and API
//! threads open no path and no socket at all; the event loop opens paths
//! (new images, snapshot files, the log; a jail bounds what it sees) and
//! Unix streams only; the migration thread TCP and Unix streams only.

use std::os::unix::process::ExitStatusExt;
use std::process::Command;

use ember_vmm::seccomp::{Filters, Mode, ThreadKind};

const PROBE_ENV: &str = "EMBER_SECCOMP_PROBE";

/// What the probe does after installing the filter.
fn forbidden_call(call: &str) {
    let path = c"/etc/hostname";
    let argv = [path.as_ptr(), std::ptr::null()];
    // SAFETY (for every arm): raw syscalls with valid pointers to live
    // C strings/arrays or plain integers; each is expected to be refused by
    // the filter before the kernel acts on it. If one were allowed, it
    // could at worst open a file, fail to exec a non-executable file,
    // open a socket, or make this probe traceable: harmless here.
    let ret = match call {
        // SAFETY: see above.
        "open" => unsafe { libc::syscall(libc::SYS_open, path.as_ptr(), libc::O_RDONLY) },
        // SAFETY: see above.
        "openat" => unsafe {
            libc::syscall(
                libc::SYS_openat,
                libc::AT_FDCWD,
                path.as_ptr(),
                libc::O_RDONLY,
            )
        },
        // SAFETY: see above.
        "execve" => unsafe {
            libc::syscall(
                libc::SYS_execve,
                path.as_ptr(),
                argv.as_ptr(),
                std::ptr::null::<*const libc::c_char>(),
            )
        },
        // SAFETY: see above.
        "socket" => unsafe { libc::syscall(libc::SYS_socket, libc::AF_INET, libc::SOCK_STREAM, 0) },
        // SAFETY: see above.
        "ptrace" => unsafe { libc::syscall(libc::SYS_ptrace, libc::PTRACE_TRACEME, 0, 0, 0) },
        // SAFETY: see above.
        "packet_socket" => unsafe {
            libc::syscall(libc::SYS_socket, libc::AF_PACKET, libc::SOCK_RAW, 0)
        },
        // SAFETY: see above.
        "mount" => unsafe {
            libc::syscall(
                libc::SYS_mount,
                c"none".as_ptr(),
                c"/tmp".as_ptr(),
                c"tmpfs".as_ptr(),
                0,
                std::ptr::null::<libc::c_void>(),
            )
        },
        // Executable memory, new or made so.
        // SAFETY: see above.
        "mmap" => unsafe {
            libc::syscall(
                libc::SYS_mmap,
                0,
                4096,
                libc::PROT_READ | libc::PROT_EXEC,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        },
        // SAFETY: see above.
        "mprotect" => unsafe {
            libc::syscall(
                libc::SYS_mprotect,
                0x1000,
                4096,
                libc::PROT_READ | libc::PROT_EXEC,
            )
        },
        // A new process.
        // SAFETY: see above.
        "clone" => unsafe { libc::syscall(libc::SYS_clone, libc::SIGCHLD, 0, 0, 0, 0) },
        // KVM_GET_API_VERSION: a real KVM ioctl, but not one a vCPU thread may make.
        // SAFETY: see above.
        "ioctl" => unsafe { libc::syscall(libc::SYS_ioctl, 0, 0xae00, 0) },
        // An allowed call: the probe must live through it.
        // SAFETY: see above.
        "write" => unsafe { libc::syscall(libc::SYS_write, 2, c"alive\n".as_ptr(), 6) },
        other => panic!("unknown probe call {other}"),
    };
    println!("probe survived {call}: returned {ret}");
}

/// The probe: only does anything when run by [`run_probe`].
#[test]
fn seccomp_probe() {
    let Ok(spec) = std::env::var(PROBE_ENV) else {
        return;
    };
    let (kind, call) = spec.split_once(':').expect("kind:call");
    let kind = match kind {
        "vcpu" => ThreadKind::Vcpu,
        "vmm" => ThreadKind::Vmm,
        "api" => ThreadKind::Api,
        "migration" => ThreadKind::Migration,
        other => panic!("unknown kind {other}"),
    };
    let filters = Filters::new(Mode::On).expect("filters compile");
    filters
        .install(kind, "probe-thread")
        .expect("filter installs");
    forbidden_call(call);
    // Exit here without running the harness's remaining syscalls under
    // the filter (they are not what is being tested).
    // SAFETY: _exit ends the process immediately; nothing needs dropping.
    unsafe { libc::_exit(0) };
}

struct ProbeResult {
    status: std::process::ExitStatus,
    stdout: String,
    stderr: String,
}

fn run_probe(kind: &str, call: &str) -> ProbeResult {
    let out = Command::new(std::env::current_exe().expect("current_exe"))
        .args([
            "--exact",
            "seccomp_probe",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(PROBE_ENV, format!("{kind}:{call}"))
        .output()
        .expect("run the probe");
    ProbeResult {
        status: out.status,
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

fn assert_killed(kind: &str, call: &str, nr: libc::c_long) {
    let r = run_probe(kind, call);
    assert_eq!(
        r.status.signal(),
        Some(libc::SIGSYS),
        "{kind} filter, {call}: the probe should die of SIGSYS; status {:?}\nstdout: {}\nstderr: {}",
        r.status,
        r.stdout,
        r.stderr
    );
    // The syscall's name is the call's last word (`packet_socket`: socket).
    let name = call.rsplit('_').next().unwrap_or(call);
    let want = format!("thread probe-thread made forbidden syscall {nr} ({name})");
    let lines: Vec<_> = r.stderr.lines().filter(|l| l.contains("seccomp")).collect();
    assert_eq!(
        lines.len(),
        1,
        "{kind} filter, {call}: one seccomp line expected; stderr: {}",
        r.stderr
    );
    assert!(
        lines[0].starts_with("ember: error: seccomp: ") && lines[0].contains(&want),
        "{kind} filter, {call}: the line should name the thread and syscall ({want}); got: {}",
        lines[0]
    );
    assert!(
        !r.stdout.contains("probe survived"),
        "{kind} filter, {call}: the syscall ran: {}",
        r.stdout
    );
}

#[test]
fn vcpu_filter_kills_open_execve_socket_ptrace_and_unlisted_ioctls() {
    assert_killed("vcpu", "open", libc::SYS_open);
    assert_killed("vcpu", "openat", libc::SYS_openat);
    assert_killed("vcpu", "execve", libc::SYS_execve);
    assert_killed("vcpu", "socket", libc::SYS_socket);
    assert_killed("vcpu", "ptrace", libc::SYS_ptrace);
    assert_killed("vcpu", "ioctl", libc::SYS_ioctl);
}

#[test]
fn event_loop_filter_kills_execve_and_ptrace() {
    assert_killed("vmm", "execve", libc::SYS_execve);
    assert_killed("vmm", "ptrace", libc::SYS_ptrace);
    assert_killed("vmm", "socket", libc::SYS_socket);
    assert_killed("vmm", "open", libc::SYS_open);
    assert_killed("vmm", "ioctl", libc::SYS_ioctl);
}

#[test]
fn api_filter_kills_open_execve_socket_and_unlisted_ioctls() {
    assert_killed("api", "openat", libc::SYS_openat);
    assert_killed("api", "execve", libc::SYS_execve);
    assert_killed("api", "socket", libc::SYS_socket);
    assert_killed("api", "ioctl", libc::SYS_ioctl);
}

#[test]
fn no_thread_kind_may_mount_exec_memory_fork_or_open_packet_sockets() {
    for kind in ["vcpu", "vmm", "api", "migration"] {
        assert_killed(kind, "open", libc::SYS_open);
        assert_killed(kind, "execve", libc::SYS_execve);
        assert_killed(kind, "ptrace", libc::SYS_ptrace);
        assert_killed(kind, "mount", libc::SYS_mount);
        assert_killed(kind, "mmap", libc::SYS_mmap);
        assert_killed(kind, "mprotect", libc::SYS_mprotect);
        assert_killed(kind, "clone", libc::SYS_clone);
        assert_killed(kind, "packet_socket", libc::SYS_socket);
    }
    // The migration thread opens no file either.
    assert_killed("migration", "openat", libc::SYS_openat);
}

#[test]
fn allowed_syscalls_do_not_kill() {
    for kind in ["vcpu", "vmm", "api", "migration"] {
        let r = run_probe(kind, "write");
        assert!(
            r.status.success(),
            "{kind} filter: write must be allowed; status {:?}, stderr: {}",
            r.status,
            r.stderr
        );
        assert!(r.stderr.contains("alive"), "stderr: {}", r.stderr);
        assert!(
            r.stdout.contains("probe survived write"),
            "stdout: {}",
            r.stdout
        );
    }
}
