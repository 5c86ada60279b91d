//! Guest and host faults, logged once at warn level and at debug level
//! after that.

use std::fmt;

use log::{debug, warn};

/// Guest and host faults, each logged at warn level once and at debug
/// level after that, so a misbehaving guest cannot flood the log.
#[derive(Clone, Copy, Debug)]
pub(super) enum Fault {
    TxChain,
    TxBackend,
    RxChain,
    RxTooBig,
    RxShort,
    RxBackend,
    UsedRing,
    Interrupt,
    Offload,
    Ctrl,
    Link,
    Queues,
}

/// Logs faults, naming the device.
#[derive(Debug)]
pub(super) struct FaultLog {
    pub(super) name: String,
    seen: [bool; 12],
}

impl FaultLog {
    pub(super) fn new(name: &str) -> Self {
        FaultLog {
            name: name.to_string(),
            seen: [false; 12],
        }
    }

    pub(super) fn report(&mut self, fault: Fault, what: fmt::Arguments<'_>) {
        let first = self
            .seen
            .get_mut(fault as usize)
            .is_some_and(|seen| !std::mem::replace(seen, true));
        if first {
            warn!("virtio-net {}: {what} (more at debug level)", self.name);
        } else {
            debug!("virtio-net {}: {what}", self.name);
        }
    }
}
