//! Forwarding SIGINT, SIGTERM and SIGHUP to jailed children while the
//! caller waits for them.
//!
//! Dispositions are process-wide, so several concurrent [`run`](crate::run)
//! calls share one handler: it forwards to every registered child. The
//! first registration installs it, the last one restores what was there.

use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::Mutex;

/// The signals forwarded.
const FORWARDED: [libc::c_int; 3] = [libc::SIGINT, libc::SIGTERM, libc::SIGHUP];

/// How many jailed children can be forwarded to at once; more are still
/// run, just without forwarding (and with a warning).
const SLOTS: usize = 64;

/// The children to forward to; 0 is a free slot.
static CHILDREN: [AtomicI32; SLOTS] = [const { AtomicI32::new(0) }; SLOTS];

/// How many registrations are live, and the dispositions they replaced.
static STATE: Mutex<Installed> = Mutex::new(Installed {
    users: 0,
    previous: Vec::new(),
});

struct Installed {
    users: usize,
    /// Each signal whose handler was replaced, with what it was.
    previous: Vec<(libc::c_int, libc::sigaction)>,
}

/// The signal handler: forwards `sig` to every registered child.
extern "C" fn forward(sig: libc::c_int) {
    // SAFETY: __errno_location returns this thread's errno slot; saving and
    // restoring it keeps the interrupted code's errno intact.
    let saved = unsafe { *libc::__errno_location() };
    for slot in &CHILDREN {
        let pid = slot.load(Ordering::Relaxed);
        if pid > 0 {
            // SAFETY: kill is async-signal-safe and only sends a signal.
            unsafe { libc::kill(pid, sig) };
        }
    }
    // SAFETY: as above.
    unsafe { *libc::__errno_location() = saved };
}

/// A registered child; dropping it unregisters (and restores the previous
/// dispositions if it was the last).
#[derive(Debug)]
pub(crate) struct Forwarding {
    slot: Option<usize>,
}

impl Forwarding {
    /// Forwards the signals to `pid` until dropped.
    pub(crate) fn start(pid: libc::pid_t) -> Self {
        let slot = CHILDREN.iter().position(|s| {
            s.compare_exchange(0, pid, Ordering::SeqCst, Ordering::SeqCst)
                .is_ok()
        });
        if slot.is_none() {
            log::warn!(
                "{SLOTS} jails are running: signals are not forwarded to jailed child {pid}"
            );
            return Forwarding { slot };
        }
        let mut state = STATE.lock().unwrap_or_else(|e| e.into_inner());
        if state.users == 0 {
            state.previous = install();
        }
        state.users += 1;
        Forwarding { slot }
    }
}

impl Drop for Forwarding {
    fn drop(&mut self) {
        let Some(slot) = self.slot.and_then(|i| CHILDREN.get(i)) else {
            return;
        };
        slot.store(0, Ordering::SeqCst);
        let mut state = STATE.lock().unwrap_or_else(|e| e.into_inner());
        state.users = state.users.saturating_sub(1);
        if state.users == 0 {
            for (sig, old) in std::mem::take(&mut state.previous) {
                // SAFETY: `old` is the disposition sigaction returned for
                // this signal; putting it back is what it was saved for.
                unsafe { libc::sigaction(sig, &old, std::ptr::null_mut()) };
            }
        }
    }
}

/// Installs [`forward`] for each signal; returns the replaced dispositions.
fn install() -> Vec<(libc::c_int, libc::sigaction)> {
    // SAFETY: an all-zero sigaction (empty mask, no flags) is valid.
    let mut action: libc::sigaction = unsafe { std::mem::zeroed() };
    action.sa_sigaction = forward as extern "C" fn(libc::c_int) as libc::sighandler_t;
    // Restart the caller's other threads' system calls rather than fail them.
    action.sa_flags = libc::SA_RESTART;
    let mut previous = Vec::with_capacity(FORWARDED.len());
    for sig in FORWARDED {
        // SAFETY: as above.
        let mut old: libc::sigaction = unsafe { std::mem::zeroed() };
        // SAFETY: `action` is a valid disposition whose handler only does
        // async-signal-safe work; `old` is writable.
        if unsafe { libc::sigaction(sig, &action, &mut old) } == 0 {
            previous.push((sig, old));
        } else {
            log::warn!(
                "cannot forward signal {sig} to jailed children: {}",
                std::io::Error::last_os_error()
            );
        }
    }
    previous
}
