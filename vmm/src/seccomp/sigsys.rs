//! What happens when a thread makes a syscall its filter does not allow:
//! the filter returns `SECCOMP_RET_TRAP`, the kernel raises SIGSYS on that
//! thread, and this handler writes one line naming the thread and the
//! syscall, then makes the kernel kill the whole process with SIGSYS.
//!
//! The handler only uses `write(2)` (allowed by every filter) and then
//! repeats the forbidden syscall: SIGSYS is blocked while the handler runs,
//! and a seccomp trap with SIGSYS blocked makes the kernel reset SIGSYS to
//! its default action (terminate with a core dump) and deliver it, killing
//! every thread. Nothing here allocates or takes a lock.

use std::cell::Cell;
use std::io;

use super::names::NAMES;

/// Longest thread name the line carries (Linux's limit is 15 bytes).
const NAME_LEN: usize = 16;

thread_local! {
    /// This thread's name, as the violation line prints it. Set when the
    /// filter is installed; a plain `Cell` so the handler can read it
    /// without locks or allocation.
    static THREAD_NAME: Cell<[u8; NAME_LEN]> = const { Cell::new([0; NAME_LEN]) };
}

/// `si_code` of a SIGSYS raised by seccomp.
const SYS_SECCOMP: libc::c_int = 1;

/// Records `name` as this thread's name for the violation line.
pub(super) fn set_thread_name(name: &str) {
    let mut buf = [0u8; NAME_LEN];
    let n = name.len().min(NAME_LEN);
    buf[..n].copy_from_slice(&name.as_bytes()[..n]);
    THREAD_NAME.with(|c| c.set(buf));
}

/// Installs the SIGSYS handler for the whole process (idempotent).
pub(super) fn install_handler() -> io::Result<()> {
    // SAFETY: an all-zero sigaction is a valid value to fill in.
    let mut act: libc::sigaction = unsafe { std::mem::zeroed() };
    act.sa_sigaction = handler as *const () as libc::sighandler_t;
    act.sa_flags = libc::SA_SIGINFO;
    // SAFETY: `act.sa_mask` is a valid sigset_t owned by this frame.
    unsafe { libc::sigemptyset(&mut act.sa_mask) };
    // SAFETY: `act` is a fully initialised sigaction whose handler is an
    // `extern "C"` function with the SA_SIGINFO signature, valid for the
    // life of the process; the old action is not wanted (null).
    let ret = unsafe { libc::sigaction(libc::SIGSYS, &act, std::ptr::null_mut()) };
    if ret != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// A small line buffer on the stack.
struct Line {
    buf: [u8; 160],
    len: usize,
}

impl Line {
    fn push(&mut self, bytes: &[u8]) {
        let room = self.buf.len() - self.len;
        let n = bytes.len().min(room);
        self.buf[self.len..self.len + n].copy_from_slice(&bytes[..n]);
        self.len += n;
    }

    fn push_number(&mut self, mut n: u64) {
        let mut digits = [0u8; 20];
        let mut i = digits.len();
        loop {
            i -= 1;
            // n % 10 < 10, so the cast cannot truncate.
            digits[i] = b'0' + u8::try_from(n % 10).unwrap_or(0);
            n /= 10;
            if n == 0 {
                break;
            }
        }
        self.push(&digits[i..]);
    }
}

/// The violation line for syscall `nr` made by thread `name` (NUL-padded).
fn violation_line(name: &[u8; NAME_LEN], nr: i64) -> Line {
    let mut line = Line {
        buf: [0; 160],
        len: 0,
    };
    let end = name.iter().position(|&b| b == 0).unwrap_or(NAME_LEN);
    line.push(b"ember: error: seccomp: thread ");
    line.push(if end == 0 { b"?" } else { &name[..end] });
    line.push(b" made forbidden syscall ");
    line.push_number(nr.unsigned_abs());
    let known = usize::try_from(nr)
        .ok()
        .and_then(|i| NAMES.get(i))
        .filter(|s| !s.is_empty());
    if let Some(sys) = known {
        line.push(b" (");
        line.push(sys.as_bytes());
        line.push(b")");
    }
    line.push(b"; killing ember\n");
    line
}

extern "C" fn handler(sig: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    if sig != libc::SIGSYS || info.is_null() || ctx.is_null() {
        return;
    }
    // SAFETY: the kernel passes a valid siginfo_t for an SA_SIGINFO handler.
    let code = unsafe { (*info).si_code };
    if code != SYS_SECCOMP {
        return;
    }
    // SAFETY: for SIGSYS with SYS_SECCOMP, the kernel's siginfo layout puts
    // `si_syscall` (an int) at byte 24: after si_signo, si_errno, si_code,
    // padding (16 bytes) and `si_call_addr` (8 bytes). The struct is 128
    // bytes, so the read is in bounds.
    let nr = unsafe {
        info.cast::<u8>()
            .add(24)
            .cast::<libc::c_int>()
            .read_unaligned()
    };
    let name = THREAD_NAME.with(Cell::get);
    let line = violation_line(&name, i64::from(nr));
    // SAFETY: writes `line.len` initialised bytes from a stack buffer to
    // stderr; write(2) is async-signal-safe and allowed by every filter.
    unsafe { libc::write(2, line.buf.as_ptr().cast(), line.len) };

    // SAFETY: the kernel passes a valid ucontext_t for an SA_SIGINFO handler.
    let gregs = unsafe { (*ctx.cast::<libc::ucontext_t>()).uc_mcontext.gregs };
    let arg = |r: libc::c_int| gregs[usize::try_from(r).unwrap_or(0)];
    // SAFETY: repeats the syscall the filter just refused, with the same
    // number and arguments, so the filter refuses it again: with SIGSYS
    // blocked in this handler, the kernel then kills the process with
    // SIGSYS. It never runs.
    unsafe {
        libc::syscall(
            libc::c_long::from(nr),
            arg(libc::REG_RDI),
            arg(libc::REG_RSI),
            arg(libc::REG_RDX),
            arg(libc::REG_R10),
            arg(libc::REG_R8),
            arg(libc::REG_R9),
        )
    };
    // Not reached; if it were, still end the process.
    // SAFETY: _exit(2) ends the process without running any Rust code.
    unsafe { libc::_exit(128 + libc::SIGSYS) };
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(line: &Line) -> String {
        String::from_utf8(line.buf[..line.len].to_vec()).unwrap()
    }

    #[test]
    fn line_names_thread_and_syscall() {
        let mut name = [0u8; NAME_LEN];
        name[..11].copy_from_slice(b"ember-vcpu0");
        assert_eq!(
            text(&violation_line(&name, 59)),
            "ember: error: seccomp: thread ember-vcpu0 made forbidden syscall 59 (execve); killing ember\n"
        );
        assert_eq!(
            text(&violation_line(&[0; NAME_LEN], 400)),
            "ember: error: seccomp: thread ? made forbidden syscall 400; killing ember\n"
        );
        assert!(text(&violation_line(&name, 101)).contains("101 (ptrace)"));
    }

    #[test]
    fn long_names_are_cut() {
        set_thread_name("a-very-long-thread-name-indeed");
        let name = THREAD_NAME.with(Cell::get);
        assert_eq!(&name, b"a-very-long-thre");
    }
}
