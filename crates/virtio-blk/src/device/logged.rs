//! What the device logs about failures: the first of each kind at warn
//! level, the rest at debug level; the host's failures in bursts, per
//! kind of request, with a line when a burst ends.

use std::fmt;

use log::{debug, info, warn};

use crate::request::RequestKind;

/// Which guest or host faults have been logged at warn level already; later
/// ones go to debug level so a misbehaving guest cannot flood the log.
#[derive(Debug, Default)]
pub(crate) struct Logged {
    pub(crate) malformed: bool,
    /// Per [`IoClass`]: a burst of host failures is under way (its first
    /// one was logged).
    pub(crate) backend: [bool; 3],
    /// Per [`IoClass`]: requests the host failed in the current burst.
    pub(crate) burst: [u64; 3],
    pub(crate) guest_memory: bool,
    pub(crate) used_ring: bool,
    pub(crate) interrupt: bool,
}

/// What the host does for a request, for counting bursts of failures: a
/// host whose writes succeed (into its page cache) while its flushes fail
/// is in one burst of failed flushes, not in many short ones.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum IoClass {
    Read,
    /// Writes, discards and write-zeroes.
    Write,
    Flush,
}

impl IoClass {
    /// The class of a request (none for get-id, which the host does not
    /// see).
    pub(crate) fn of(kind: &RequestKind) -> Option<IoClass> {
        match kind {
            RequestKind::In { .. } => Some(IoClass::Read),
            RequestKind::Out { .. } | RequestKind::Discard(_) | RequestKind::WriteZeroes(_) => {
                Some(IoClass::Write)
            }
            RequestKind::Flush => Some(IoClass::Flush),
            RequestKind::GetId => None,
        }
    }

    fn name(self) -> (&'static str, &'static str) {
        match self {
            IoClass::Read => ("read", "reads"),
            IoClass::Write => ("write", "writes"),
            IoClass::Flush => ("flush", "flushes"),
        }
    }
}

impl Logged {
    /// The host failed a request: the first failure of a burst (of its
    /// class) is logged at warn level, the rest at debug level.
    pub(crate) fn backend_failed(&mut self, disk: &str, class: IoClass, what: &dyn fmt::Display) {
        let i = class as usize;
        let (op, ops) = class.name();
        self.burst[i] = self.burst[i].saturating_add(1);
        if first(&mut self.backend[i]) {
            warn!("virtio-blk {disk}: {op} failed: {what} (the rest of this burst of failed {ops} at debug level)");
        } else {
            debug!("virtio-blk {disk}: {op} failed: {what}");
        }
    }

    /// The host did a request: a burst of failures of its class, if one
    /// was under way, has ended.
    pub(crate) fn backend_ok(&mut self, disk: &str, class: IoClass) {
        let i = class as usize;
        if std::mem::take(&mut self.backend[i]) {
            let n = std::mem::take(&mut self.burst[i]);
            info!(
                "virtio-blk {disk}: {} succeed again after {n} failed",
                class.name().1
            );
        }
    }
}

/// Whether `flag` is being set for the first time (and sets it).
pub(crate) fn first(flag: &mut bool) -> bool {
    !std::mem::replace(flag, true)
}
