//! Tiny-guest KVM tests: a few bytes of hand-written 64-bit guest code,
//! loaded by ember as an ELF and entered like a kernel, exercise the vCPU
//! setup, the buses, the serial port, the i8042, exits and signals in
//! milliseconds even on a software hypervisor.
//!
//! The guest programs were assembled with GNU as (`as --64`, linked at
//! 0x100000); the source is kept next to each byte array.

use std::time::Duration;

use ember_tests::{
    kvm_available, run_ember, spawn_ember, tiny_elf, wait_all_threads_filtered, TempDir,
};

/// `puts`: writes the NUL-terminated string at %rsi to COM1.
///
/// ```text
/// puts: mov $0x3f8,%dx
/// 1:    lodsb ; test %al,%al ; jz 2f ; out %al,(%dx) ; jmp 1b
/// 2:    ret
/// ```
const PUTS: [u8; 13] = [
    0x66, 0xba, 0xf8, 0x03, 0xac, 0x84, 0xc0, 0x74, 0x03, 0xee, 0xeb, 0xf8, 0xc3,
];

/// Prints "Hello from a tiny guest\n", then resets through the i8042.
///
/// ```text
/// lea msg(%rip),%rsi ; call puts ; mov $0xfe,%al ; out %al,$0x64 ; hlt
/// puts: ...
/// msg: .asciz "Hello from a tiny guest\n"
/// ```
fn hello() -> Vec<u8> {
    let mut code = vec![
        0x48, 0x8d, 0x35, 0x17, 0x00, 0x00, 0x00, // lea msg(%rip),%rsi
        0xe8, 0x05, 0x00, 0x00, 0x00, // call puts
        0xb0, 0xfe, // mov $0xfe,%al
        0xe6, 0x64, // out %al,$0x64
        0xf4, // hlt
    ];
    code.extend(PUTS);
    code.extend(b"Hello from a tiny guest\n\0");
    code
}

/// Echoes every byte received on COM1 (polling LSR) until it sees 'q',
/// then resets.
///
/// ```text
/// 1: mov $0x3fd,%dx ; in (%dx),%al ; test $1,%al ; jz 1b
///    mov $0x3f8,%dx ; in (%dx),%al ; out %al,(%dx)
///    cmp $'q',%al ; jne 1b
///    mov $0xfe,%al ; out %al,$0x64 ; hlt
/// ```
const ECHO: [u8; 24] = [
    0x66, 0xba, 0xfd, 0x03, 0xec, 0xa8, 0x01, 0x74, 0xf7, 0x66, 0xba, 0xf8, 0x03, 0xec, 0xee, 0x3c,
    0x71, 0x75, 0xed, 0xb0, 0xfe, 0xe6, 0x64, 0xf4,
];

/// Writes and reads port 0x1234 and MMIO address 0xd000_0000 (nothing
/// lives at either), checks the reads saw all-ones, prints "ok\n" or
/// "bad\n", then resets.
///
/// ```text
/// mov $0x1234,%dx ; mov $0x55,%al ; out %al,(%dx) ; in (%dx),%al ; mov %al,%bl
/// mov $0xd0000000,%eax ; movl $0x12345678,(%rax) ; mov (%rax),%ecx
/// lea bad(%rip),%rsi ; cmp $0xff,%bl ; jne 1f ; cmp $-1,%ecx ; jne 1f
/// lea ok(%rip),%rsi
/// 1: call puts ; mov $0xfe,%al ; out %al,$0x64 ; hlt
/// puts: ... ; ok: .asciz "ok\n" ; bad: .asciz "bad\n"
/// ```
fn unhandled() -> Vec<u8> {
    let mut code = vec![
        0x66, 0xba, 0x34, 0x12, 0xb0, 0x55, 0xee, 0xec, 0x88, 0xc3, 0xb8, 0x00, 0x00, 0x00, 0xd0,
        0xc7, 0x00, 0x78, 0x56, 0x34, 0x12, 0x8b, 0x08, 0x48, 0x8d, 0x35, 0x2c, 0x00, 0x00, 0x00,
        0x80, 0xfb, 0xff, 0x75, 0x0c, 0x83, 0xf9, 0xff, 0x75, 0x07, 0x48, 0x8d, 0x35, 0x17, 0x00,
        0x00, 0x00, 0xe8, 0x05, 0x00, 0x00, 0x00, 0xb0, 0xfe, 0xe6, 0x64, 0xf4,
    ];
    code.extend(PUTS);
    code.extend(b"ok\n\0bad\n\0");
    code
}

/// Prints "R", then spins forever: `mov $0x3f8,%dx ; mov $'R',%al ; out %al,(%dx) ; 1: jmp 1b`.
const SPIN: [u8; 9] = [0x66, 0xba, 0xf8, 0x03, 0xb0, 0x52, 0xee, 0xeb, 0xfe];

/// `ud2` with an IDT that has no usable entry: #UD, #GP, #DF, triple fault.
const TRIPLE_FAULT: [u8; 2] = [0x0f, 0x0b];

const TIMEOUT: Duration = Duration::from_secs(30);

fn guest(dir: &TempDir, name: &str, code: &[u8]) -> String {
    dir.write(name, &tiny_elf(code))
        .to_string_lossy()
        .into_owned()
}

#[test]
fn tiny_serial_output_reaches_stdout_and_i8042_reset_exits_0() {
    if !kvm_available("tiny_serial_output_reaches_stdout_and_i8042_reset_exits_0") {
        return;
    }
    let dir = TempDir::new("hello");
    let k = guest(&dir, "hello.elf", &hello());
    let run = run_ember(&["--kernel", &k, "--memory", "16"], b"", TIMEOUT);
    run.check(run.code() == 0, "i8042 reset should exit 0");
    run.check(
        run.stdout == "Hello from a tiny guest\n",
        "stdout should be exactly the guest's output",
    );
}

#[test]
fn tiny_serial_input_reaches_the_guest_and_comes_back() {
    if !kvm_available("tiny_serial_input_reaches_the_guest_and_comes_back") {
        return;
    }
    let dir = TempDir::new("echo");
    let k = guest(&dir, "echo.elf", &ECHO);
    // More than the UART's 64-byte FIFO, so input flow control is exercised.
    let mut input: Vec<u8> = (0..300).map(|i| b'A' + (i % 26) as u8).collect();
    input.extend(b"\nq");
    let run = run_ember(&["--kernel", &k, "--memory", "16"], &input, TIMEOUT);
    run.check(run.code() == 0, "the guest resets after 'q'");
    run.check(
        run.stdout.as_bytes() == input.as_slice(),
        "every byte of input should come back, in order",
    );
}

#[test]
fn tiny_serial_goes_to_a_file_to_null_and_to_a_socket_client_and_bad_specs_fail_cleanly() {
    use std::io::{Read, Write};
    use std::os::unix::fs::PermissionsExt;
    use std::os::unix::net::UnixStream;
    if !kvm_available(
        "tiny_serial_goes_to_a_file_to_null_and_to_a_socket_client_and_bad_specs_fail_cleanly",
    ) {
        return;
    }
    let dir = TempDir::new("serial");
    let hello_k = guest(&dir, "hello.elf", &hello());
    let hello_args = |serial: &str| -> Vec<String> {
        ["--kernel", &hello_k, "--memory", "16", "--serial", serial]
            .iter()
            .map(|s| s.to_string())
            .collect()
    };
    let run_with = |args: &[String]| {
        let a: Vec<&str> = args.iter().map(String::as_str).collect();
        run_ember(&a, b"", TIMEOUT)
    };

    // file=: appended to what is there; a new file is the owner's alone.
    let log = dir.path("console.log");
    std::fs::write(&log, b"earlier\n").unwrap();
    let run = run_with(&hello_args(&format!("file={}", log.display())));
    run.check(run.code() == 0, "file=: the guest resets");
    run.check(run.stdout.is_empty(), "file=: nothing on stdout");
    let text = std::fs::read_to_string(&log).unwrap();
    run.check(
        text == "earlier\nHello from a tiny guest\n",
        &format!("file=: the output appended: {text:?}"),
    );
    let fresh = dir.path("fresh.log");
    let run = run_with(&hello_args(&format!("file={}", fresh.display())));
    let mode = std::fs::metadata(&fresh)
        .ok()
        .map(|m| m.permissions().mode() & 0o777);
    run.check(
        mode == Some(0o600),
        &format!("file=: created 0600: {mode:?}"),
    );

    // null: no output anywhere.
    let run = run_with(&hello_args("null"));
    run.check(
        run.code() == 0 && run.stdout.is_empty(),
        "null: the guest runs, nothing printed",
    );

    // socket=: a client types into the echo guest and reads it all back.
    let sock = dir.path("console.sock");
    let echo_k = guest(&dir, "echo.elf", &ECHO);
    let serial = format!("socket={}", sock.display());
    let vm = spawn_ember(
        &["--kernel", &echo_k, "--memory", "16", "--serial", &serial],
        b"",
    );
    let start = std::time::Instant::now();
    let mut client = loop {
        match UnixStream::connect(&sock) {
            Ok(c) => break Some(c),
            Err(_) if start.elapsed() < TIMEOUT => std::thread::sleep(Duration::from_millis(10)),
            Err(_) => break None,
        }
    };
    // More than the UART's FIFO: the client's input waits for the guest.
    // Capitals: a 'q' ends the guest.
    let mut input: Vec<u8> = (0..300).map(|i| b'A' + (i % 26) as u8).collect();
    input.extend(b"\nq");
    let mut echoed = Vec::new();
    if let Some(c) = client.as_mut() {
        c.set_read_timeout(Some(TIMEOUT)).unwrap();
        c.write_all(&input).unwrap();
        let mut buf = [0u8; 512];
        while echoed.len() < input.len() {
            match c.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => echoed.extend_from_slice(&buf[..n]),
            }
        }
    }
    let run = vm.finish(TIMEOUT);
    run.check(client.is_some(), "socket=: a client connects");
    run.check(run.code() == 0, "socket=: the guest resets after 'q'");
    run.check(
        echoed == input,
        &format!(
            "socket=: every byte typed comes back in order ({} of {})",
            echoed.len(),
            input.len()
        ),
    );
    run.check(run.stdout.is_empty(), "socket=: nothing on stdout");
    run.check(
        !sock.exists(),
        "socket=: the socket file is removed at exit",
    );

    // Bad specs: one clear error each, nothing created, the taken path kept.
    let taken = dir.write("taken", b"mine");
    let cases = [
        (
            "tty".to_string(),
            "--serial must be stdio, null, file=PATH or socket=PATH",
        ),
        (format!("socket={}", taken.display()), "the path exists"),
        (
            format!("file={}", dir.path("no/such/dir/c.log").display()),
            "--serial file=",
        ),
        ("socket=".to_string(), "--serial socket= needs a path"),
    ];
    for (spec, says) in cases {
        let run = run_with(&hello_args(&spec));
        run.check(run.code() != 0, &format!("{spec}: refused"));
        run.check(
            run.stderr.contains(says) && !run.stderr.contains("panicked"),
            &format!("{spec}: the error says {says:?}"),
        );
        run.check(
            run.stdout.is_empty(),
            &format!("{spec}: the guest did not run"),
        );
    }
    assert_eq!(
        std::fs::read(&taken).unwrap(),
        b"mine",
        "the taken path is kept"
    );
}

#[test]
fn tiny_unhandled_port_and_mmio_accesses_are_logged_and_ignored() {
    if !kvm_available("tiny_unhandled_port_and_mmio_accesses_are_logged_and_ignored") {
        return;
    }
    let dir = TempDir::new("unhandled");
    let k = guest(&dir, "unhandled.elf", &unhandled());
    let run = run_ember(&["--kernel", &k, "--memory", "16"], b"", TIMEOUT);
    run.check(run.code() == 0, "unhandled accesses are not fatal");
    run.check(run.stdout == "ok\n", "reads of nothing see all-ones");
    run.check(
        run.stderr.contains("unhandled") && run.stderr.contains("port write to 0x1234"),
        "the port access is logged",
    );
    run.check(
        run.stderr.contains("MMIO write to 0xd0000000"),
        "the MMIO access is logged",
    );
}

#[test]
fn tiny_triple_fault_ends_ember_with_0() {
    if !kvm_available("tiny_triple_fault_ends_ember_with_0") {
        return;
    }
    let dir = TempDir::new("triple");
    let k = guest(&dir, "triple.elf", &TRIPLE_FAULT);
    let run = run_ember(&["--kernel", &k, "--memory", "16"], b"", TIMEOUT);
    run.check(run.code() == 0, "a triple fault is a guest reboot");
    run.check(!run.stderr.contains("error"), "no error is reported");
}

fn signal_ends_a_spinning_guest(signal: i32, expected: i32) {
    let dir = TempDir::new("spin");
    let k = guest(&dir, "spin.elf", &SPIN);
    let mut ember = spawn_ember(&["--kernel", &k, "--memory", "16", "--vcpus", "2"], b"");
    assert!(
        ember.wait_for_output("R", TIMEOUT),
        "the guest should start spinning"
    );
    let sent = std::time::Instant::now();
    ember.signal(signal);
    let run = ember.finish(TIMEOUT);
    let took = sent.elapsed();
    run.check(run.code() == expected, &format!("exit status {expected}"));
    run.check(
        took < Duration::from_secs(1),
        &format!("ember took {took:?} to stop"),
    );
    run.check(!run.stderr.contains("panicked"), "no panic");
}

#[test]
fn tiny_sigterm_stops_a_spinning_guest_within_a_second_with_143() {
    if !kvm_available("tiny_sigterm_stops_a_spinning_guest_within_a_second_with_143") {
        return;
    }
    signal_ends_a_spinning_guest(libc::SIGTERM, 143);
}

#[test]
fn tiny_sigint_stops_a_spinning_guest_with_130() {
    if !kvm_available("tiny_sigint_stops_a_spinning_guest_with_130") {
        return;
    }
    signal_ends_a_spinning_guest(libc::SIGINT, 130);
}

#[test]
fn tiny_every_ember_thread_runs_under_a_seccomp_filter() {
    if !kvm_available("tiny_every_ember_thread_runs_under_a_seccomp_filter") {
        return;
    }
    let dir = TempDir::new("seccomp-threads");
    let k = guest(&dir, "spin.elf", &SPIN);
    // The default is --seccomp=on: no flag.
    let mut ember = spawn_ember(&["--kernel", &k, "--memory", "16", "--vcpus", "2"], b"");
    assert!(
        ember.wait_for_output("R", TIMEOUT),
        "the guest should start spinning"
    );
    // The event-loop thread, the migration thread and two vCPU threads.
    let (ok, seen) = wait_all_threads_filtered(ember.pid(), 4, Duration::from_secs(5));
    ember.signal(libc::SIGTERM);
    let run = ember.finish(TIMEOUT);
    assert!(
        ok,
        "every thread should show Seccomp: 2; saw (name, mode): {seen:?}"
    );
    let names: Vec<_> = seen
        .iter()
        .map(|(n, _)| n.as_str())
        .filter(|n| n.starts_with("ember"))
        .collect();
    assert_eq!(
        names,
        ["ember", "ember-migration", "ember-vcpu0", "ember-vcpu1"]
    );
    run.check(
        run.code() == 143,
        "SIGTERM still ends a filtered ember cleanly",
    );
    run.check(!run.stderr.contains("seccomp"), "no seccomp violation");
}

#[test]
fn tiny_seccomp_off_leaves_threads_unfiltered_and_log_mode_warns() {
    if !kvm_available("tiny_seccomp_off_leaves_threads_unfiltered_and_log_mode_warns") {
        return;
    }
    let dir = TempDir::new("seccomp-off");
    let k = guest(&dir, "spin.elf", &SPIN);
    for (mode, want) in [("off", "0"), ("log", "2")] {
        let flag = format!("--seccomp={mode}");
        let mut ember = spawn_ember(&["--kernel", &k, "--memory", "16", &flag], b"");
        assert!(
            ember.wait_for_output("R", TIMEOUT),
            "the guest should start"
        );
        std::thread::sleep(Duration::from_millis(200));
        let seen = ember_tests::thread_seccomp_modes(ember.pid());
        ember.signal(libc::SIGTERM);
        let run = ember.finish(TIMEOUT);
        let own = seen.iter().filter(|(n, _)| n.starts_with("ember")).count();
        assert_eq!(own, 3, "{mode}: threads {seen:?}");
        assert!(
            seen.iter().all(|(_, m)| m == want),
            "{mode}: every thread should show Seccomp: {want}; saw {seen:?}"
        );
        run.check(
            run.stderr.contains(&format!(
                "seccomp {}",
                if mode == "off" {
                    "is off"
                } else {
                    "in log mode"
                }
            )),
            &format!("{mode}: ember warns about it"),
        );
        run.check(run.code() == 143, "SIGTERM ends it");
    }
}

/// A pseudo-terminal pair; the test keeps the slave to read its settings.
fn openpty() -> (std::os::fd::OwnedFd, std::os::fd::OwnedFd) {
    use std::os::fd::FromRawFd;
    let (mut master, mut slave) = (0, 0);
    // SAFETY: openpty writes two new descriptors into the locals; the name,
    // termios and winsize arguments may be null.
    let ret = unsafe {
        libc::openpty(
            &mut master,
            &mut slave,
            std::ptr::null_mut(),
            std::ptr::null(),
            std::ptr::null(),
        )
    };
    assert_eq!(ret, 0, "openpty");
    // SAFETY: both descriptors are new and owned by nobody else.
    unsafe {
        (
            std::os::fd::OwnedFd::from_raw_fd(master),
            std::os::fd::OwnedFd::from_raw_fd(slave),
        )
    }
}

fn lflag(fd: &std::os::fd::OwnedFd) -> libc::tcflag_t {
    use std::os::fd::AsRawFd;
    // SAFETY: termios is plain data; tcgetattr fills it from an open tty.
    let mut t: libc::termios = unsafe { std::mem::zeroed() };
    // SAFETY: valid fd and pointer.
    assert_eq!(unsafe { libc::tcgetattr(fd.as_raw_fd(), &mut t) }, 0);
    t.c_lflag
}

#[test]
fn tiny_terminal_on_stdin_is_raw_while_running_and_restored_after_sigterm() {
    if !kvm_available("tiny_terminal_on_stdin_is_raw_while_running_and_restored_after_sigterm") {
        return;
    }
    let dir = TempDir::new("tty");
    let k = guest(&dir, "spin.elf", &SPIN);
    let (_master, slave) = openpty();
    let before = lflag(&slave);
    assert_ne!(
        before & libc::ICANON,
        0,
        "a new pty starts in canonical mode"
    );
    let mut child = std::process::Command::new(ember_tests::ember_bin())
        .args(["--kernel", &k, "--memory", "16"])
        .stdin(std::process::Stdio::from(slave.try_clone().unwrap()))
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut out = child.stdout.take().unwrap();
    let mut first = [0u8; 1];
    std::io::Read::read_exact(&mut out, &mut first).unwrap();
    assert_eq!(&first, b"R");
    let during = lflag(&slave);
    // SAFETY: kill() on our unreaped child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(143));
    assert_eq!(
        during & (libc::ICANON | libc::ECHO),
        0,
        "raw mode while running"
    );
    assert_eq!(lflag(&slave), before, "settings restored on exit");
}
