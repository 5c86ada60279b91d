//! virtio-rng: see README.md.
//!
//! ```
//! use ember_virtio::VirtioDevice;
//! use ember_virtio_rng::{EntropyConfig, Rng};
//!
//! let rng = Rng::new(&EntropyConfig::default()).unwrap();
//! assert_eq!(rng.device_type(), 4);
//! assert_eq!(rng.queue_max_sizes(), &[256]);
//! ```

use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;

use ember_memory::GuestMemoryMmap;
use ember_rate_limiter::{RateLimiter, RateLimiterConfig, RateLimiterState, TokenType};
use ember_virtio::queue::{drain_while, Flow};
use ember_virtio::{
    ActivateContext, ActivateError, BackendInterest, InterruptKind, VirtioDevice, VirtioInterrupt,
};
use log::warn;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};

/// virtio-rng's device id.
pub const VIRTIO_ID_RNG: u32 = 4;
/// Queue size.
pub const QUEUE_SIZE: u16 = 256;
/// The most bytes one request gets.
pub const MAX_REQUEST: usize = 64 * 1024;

/// Why an entropy device cannot be made or restored.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The rate limiter cannot be made.
    #[error("rate limiter: {0}")]
    RateLimiter(String),
    /// A saved state this device cannot take.
    #[error("entropy state: {0}")]
    State(String),
}

/// How the device is configured (Firecracker's `EntropyDevice` body; in
/// a TOML config, `[entropy]`).
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EntropyConfig {
    /// The rate limit (none by default).
    pub rate_limiter: Option<RateLimiterConfig>,
}

/// The device's saved state (plain data, versioned by the snapshot).
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct EntropyState {
    /// The rate limiter's buckets, if it has one.
    pub rate_limiter: Option<RateLimiterState>,
}

/// What the device did, for metrics and tests.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    /// Requests served.
    pub requests: u64,
    /// Bytes given to the guest.
    pub bytes: u64,
    /// Times the rate limiter held requests back.
    pub throttled: u64,
    /// Malformed chains (completed empty).
    pub bad_requests: u64,
}

struct Active {
    mem: GuestMemoryMmap,
    interrupt: Arc<dyn VirtioInterrupt>,
    queue: Queue,
}

/// The virtio-rng device.
pub struct Rng {
    config: EntropyConfig,
    limiter: Option<RateLimiter>,
    active: Option<Active>,
    counters: Counters,
    logged_bad: bool,
    queue_sizes: [u16; 1],
}

impl std::fmt::Debug for Rng {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Rng")
            .field("config", &self.config)
            .field("counters", &self.counters)
            .finish_non_exhaustive()
    }
}

/// Fills `buf` from getrandom(2).
#[allow(unsafe_code)]
fn fill_random(buf: &mut [u8]) -> std::io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        let rest = &mut buf[done..];
        // SAFETY: getrandom(2) writes at most `rest.len()` bytes into
        // `rest`, a live, exclusively borrowed buffer.
        let n = unsafe { libc::getrandom(rest.as_mut_ptr().cast(), rest.len(), 0) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        done += n.unsigned_abs();
    }
    Ok(())
}

impl Rng {
    /// A device for `config`.
    pub fn new(config: &EntropyConfig) -> Result<Self, Error> {
        let limiter = match &config.rate_limiter {
            Some(c) if !c.is_unlimited() => {
                Some(RateLimiter::new(c).map_err(|e| Error::RateLimiter(e.to_string()))?)
            }
            _ => None,
        };
        Ok(Rng {
            config: config.clone(),
            limiter,
            active: None,
            counters: Counters::default(),
            logged_bad: false,
            queue_sizes: [QUEUE_SIZE],
        })
    }

    /// The configuration.
    pub fn config(&self) -> &EntropyConfig {
        &self.config
    }

    /// What the device did so far.
    pub fn counters(&self) -> Counters {
        self.counters
    }

    /// The saved state.
    pub fn state(&self) -> EntropyState {
        EntropyState {
            rate_limiter: self.limiter.as_ref().map(RateLimiter::state),
        }
    }

    /// Takes a saved state (the limiter's buckets) before the restore
    /// activates the device.
    pub fn restore_state(&mut self, state: &EntropyState) -> Result<(), Error> {
        match (&state.rate_limiter, self.limiter.is_some()) {
            (None, false) => Ok(()),
            (Some(s), true) => {
                self.limiter =
                    Some(RateLimiter::restore(s).map_err(|e| Error::State(e.to_string()))?);
                Ok(())
            }
            (saved, _) => Err(Error::State(format!(
                "saved {} a rate limiter, the device was made {}",
                if saved.is_some() { "with" } else { "without" },
                if self.limiter.is_some() {
                    "with one"
                } else {
                    "without"
                },
            ))),
        }
    }

    fn bad(counters: &mut Counters, logged: &mut bool, what: &str) {
        counters.bad_requests = counters.bad_requests.saturating_add(1);
        if !std::mem::replace(logged, true) {
            warn!("virtio-rng: {what} (completed empty; further bad requests are counted, not logged)");
        }
    }

    fn process(&mut self) {
        let Some(active) = self.active.as_mut() else {
            return;
        };
        // A blocked limiter's timer runs the queue when it fires.
        if self.limiter.as_ref().is_some_and(RateLimiter::is_blocked) {
            return;
        }
        let Active {
            mem,
            interrupt,
            queue,
        } = active;
        let mem = &*mem;
        let (limiter, counters, logged) =
            (&mut self.limiter, &mut self.counters, &mut self.logged_bad);
        let mut used = false;
        let mut buf = Vec::new();
        let r = drain_while(queue, mem, |q, chain| {
            let head = chain.head_index();
            let descs: Vec<_> = chain
                .take(usize::from(QUEUE_SIZE))
                .map(|d| (d.addr().0, d.len(), d.is_write_only()))
                .collect();
            let size: u64 = descs.iter().map(|&(_, l, _)| u64::from(l)).sum();
            let want = usize::try_from(size)
                .unwrap_or(MAX_REQUEST)
                .min(MAX_REQUEST);
            let valid = descs.iter().all(|&(_, _, w)| w);
            if let (true, Some(l)) = (valid, limiter.as_mut()) {
                if !l.consume(1, TokenType::Ops) {
                    counters.throttled = counters.throttled.saturating_add(1);
                    return Flow::PutBack;
                }
                if !l.consume(want as u64, TokenType::Bytes) {
                    l.manual_replenish(1, TokenType::Ops);
                    counters.throttled = counters.throttled.saturating_add(1);
                    return Flow::PutBack;
                }
            }
            let mut written = 0usize;
            if !valid {
                Self::bad(
                    counters,
                    logged,
                    "a request with a device-readable descriptor",
                );
            } else {
                buf.resize(want, 0);
                if let Err(e) = fill_random(&mut buf) {
                    warn!("virtio-rng: getrandom: {e}");
                } else {
                    for &(addr, len, _) in &descs {
                        let n = usize::try_from(len).unwrap_or(0).min(want - written);
                        if n == 0 {
                            break;
                        }
                        if mem
                            .write_slice(&buf[written..written + n], GuestAddress(addr))
                            .is_err()
                        {
                            Self::bad(counters, logged, "a request buffer outside guest memory");
                            break;
                        }
                        written += n;
                    }
                }
            }
            counters.requests = counters.requests.saturating_add(1);
            counters.bytes = counters.bytes.saturating_add(written as u64);
            let len = u32::try_from(written).unwrap_or(0);
            if let Err(e) = q.add_used(mem, head, len) {
                warn!("virtio-rng: cannot complete a request: {e}");
            }
            used = true;
            Flow::Continue
        });
        if let Err(e) = r {
            warn!("virtio-rng: request queue: {e}");
        }
        if used && queue.needs_notification(mem).unwrap_or(true) {
            if let Err(e) = interrupt.trigger(InterruptKind::Queue(0)) {
                warn!("virtio-rng: cannot interrupt the guest: {e}");
            }
        }
    }
}

impl VirtioDevice for Rng {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_RNG
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn avail_features(&self) -> u64 {
        1u64 << virtio_bindings::virtio_config::VIRTIO_F_VERSION_1
    }

    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}

    fn activate(&mut self, mut ctx: ActivateContext) -> Result<(), ActivateError> {
        if ctx.queues.len() != 1 {
            return Err(ActivateError::QueueCount {
                expected: 1,
                got: ctx.queues.len(),
            });
        }
        let Some(queue) = ctx.queues.pop() else {
            return Err(ActivateError::QueueCount {
                expected: 1,
                got: 0,
            });
        };
        self.active = Some(Active {
            mem: ctx.mem,
            interrupt: ctx.interrupt,
            queue,
        });
        self.process();
        Ok(())
    }

    fn is_activated(&self) -> bool {
        self.active.is_some()
    }

    fn process_queue(&mut self, index: usize) {
        if index == 0 {
            self.process();
        }
    }

    fn reset(&mut self) {
        self.active = None;
    }

    fn queue_states(&self) -> Vec<virtio_queue::QueueState> {
        self.active
            .as_ref()
            .map(|a| vec![a.queue.state()])
            .unwrap_or_default()
    }

    fn backend_fd(&self) -> Option<RawFd> {
        self.limiter.as_ref().map(AsRawFd::as_raw_fd)
    }

    fn process_backend(&mut self) -> BackendInterest {
        if let Some(l) = self.limiter.as_mut() {
            if let Err(e) = l.event_handler() {
                log::debug!("virtio-rng: rate limiter: {e}");
            }
        }
        self.process();
        BackendInterest::Keep
    }
}

#[cfg(test)]
mod tests;
