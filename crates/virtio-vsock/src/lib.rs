//! virtio-vsock with Firecracker's host side: see README.md.
//!
//! ```no_run
//! use ember_virtio::VirtioDevice;
//! use ember_virtio_vsock::{Vsock, VsockConfig};
//!
//! let v = Vsock::new(&VsockConfig {
//!     guest_cid: 3,
//!     uds_path: "/run/vm0/v.sock".into(),
//! })
//! .unwrap();
//! // rx, tx and event queues; the guest's CID in config space.
//! assert_eq!(v.queue_max_sizes().len(), 3);
//! let mut cid = [0u8; 8];
//! v.read_config(0, &mut cid);
//! assert_eq!(u64::from_le_bytes(cid), 3);
//! ```

mod conn;
mod muxer;
pub mod packet;
#[cfg(test)]
mod tests;

use std::path::PathBuf;
use std::sync::Arc;

use ember_memory::GuestMemoryMmap;
use ember_virtio::queue::drain;
use ember_virtio::{
    ActivateContext, ActivateError, BackendInterest, InterruptKind, VirtioDevice, VirtioInterrupt,
};
use log::warn;
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Bytes, GuestAddress};

pub use conn::CONN_BUF;
pub use muxer::{parse_connect, Muxer, MAX_CONNECTIONS, REQUEST_TIMEOUT};
pub use packet::{parse_tx, Header, PacketError, RxBuffer, TxPacket, HDR_SIZE, MAX_PAYLOAD};

/// virtio-vsock's device id.
pub const VIRTIO_ID_VSOCK: u32 = 19;
/// The host's context id.
pub const HOST_CID: u64 = 2;
/// The lowest context id a guest may have (0-2 are reserved).
pub const MIN_GUEST_CID: u64 = 3;
/// Queue size of every queue.
pub const QUEUE_SIZE: u16 = 256;
/// The event sent after a restore: the guest's connections are gone.
const EVENT_TRANSPORT_RESET: u32 = 0;
/// The longest `uds_path`: `<uds_path>_<port>` must fit a `sockaddr_un`.
pub const MAX_UDS_PATH: usize = 107 - "_4294967295".len();

const RX: usize = 0;
const TX: usize = 1;
const EVENT: usize = 2;

/// Why a vsock device cannot be made or restored.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The configuration is wrong.
    #[error("{0}")]
    Config(String),
    /// The Unix socket (or the epoll set or timer behind it) failed.
    #[error("{0}")]
    Socket(String),
    /// A saved state this device cannot take.
    #[error("vsock state: {0}")]
    State(String),
}

/// How the device is configured (Firecracker's `Vsock` body without the
/// deprecated `vsock_id`; in a TOML config, `[vsock]`).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VsockConfig {
    /// The guest's context id (3 or more).
    pub guest_cid: u64,
    /// The Unix socket host programs connect to; guest connections to
    /// host port P go to `<uds_path>_P`.
    pub uds_path: PathBuf,
}

impl VsockConfig {
    /// Checks the context id and the path's length.
    pub fn validate(&self) -> Result<(), Error> {
        if self.guest_cid < MIN_GUEST_CID || self.guest_cid > u64::from(u32::MAX) {
            return Err(Error::Config(format!(
                "guest_cid = {} is not a guest context id (3 to {})",
                self.guest_cid,
                u32::MAX
            )));
        }
        let len = self.uds_path.as_os_str().len();
        if len == 0 {
            return Err(Error::Config("uds_path is empty".into()));
        }
        if len > MAX_UDS_PATH {
            return Err(Error::Config(format!(
                "uds_path is {len} bytes; with its _<port> suffix it must fit a Unix socket address ({MAX_UDS_PATH} at most)"
            )));
        }
        Ok(())
    }
}

/// The device's saved state (plain data, versioned by the snapshot). The
/// connections are not saved: their host streams do not outlive the VMM,
/// and the restored device tells the guest its transport was reset.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct VsockState {
    /// The guest's context id.
    pub guest_cid: u64,
}

/// What the device did, for metrics and tests.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Counters {
    /// Connections host programs opened (`CONNECT` lines taken).
    pub host_connections: u64,
    /// Connections the guest opened to host listeners.
    pub guest_connections: u64,
    /// Connections closed.
    pub closed: u64,
    /// Bytes from the host to the guest.
    pub rx_bytes: u64,
    /// Bytes from the guest to the host.
    pub tx_bytes: u64,
    /// Host connections refused (no or a bad `CONNECT` line, too many).
    pub refused_host: u64,
    /// Guest packets refused (wrong addresses or type).
    pub refused_guest: u64,
    /// Malformed chains.
    pub bad_packets: u64,
}

struct Active {
    mem: GuestMemoryMmap,
    interrupt: Arc<dyn VirtioInterrupt>,
    queues: Vec<Queue>,
}

/// The virtio-vsock device.
pub struct Vsock {
    config: VsockConfig,
    muxer: Muxer,
    queue_sizes: [u16; 3],
    active: Option<Active>,
    scratch: Vec<u8>,
    logged_bad: bool,
    reset_on_activate: bool,
}

impl std::fmt::Debug for Vsock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vsock")
            .field("config", &self.config)
            .field("muxer", &self.muxer)
            .finish_non_exhaustive()
    }
}

impl Vsock {
    /// A device for `config`; binds `uds_path` (a stale socket file there
    /// is replaced; anything else there is an error).
    pub fn new(config: &VsockConfig) -> Result<Self, Error> {
        config.validate()?;
        Ok(Vsock {
            muxer: Muxer::new(config.guest_cid, &config.uds_path)?,
            config: config.clone(),
            queue_sizes: [QUEUE_SIZE; 3],
            active: None,
            scratch: vec![0; MAX_PAYLOAD as usize],
            logged_bad: false,
            reset_on_activate: false,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &VsockConfig {
        &self.config
    }

    /// What the device did so far.
    pub fn counters(&self) -> Counters {
        self.muxer.counters
    }

    /// Connections open now.
    pub fn connections(&self) -> usize {
        self.muxer.connections()
    }

    /// The saved state.
    pub fn state(&self) -> VsockState {
        VsockState {
            guest_cid: self.config.guest_cid,
        }
    }

    /// Takes a saved state before the transport's restore activates the
    /// device; the guest then gets a transport-reset event.
    pub fn restore_state(&mut self, state: &VsockState) -> Result<(), Error> {
        if state.guest_cid != self.config.guest_cid {
            return Err(Error::State(format!(
                "saved with guest_cid = {}, the device was made with {}",
                state.guest_cid, self.config.guest_cid
            )));
        }
        self.reset_on_activate = true;
        Ok(())
    }

    fn bad(&mut self, what: &str) {
        let c = &mut self.muxer.counters;
        c.bad_packets = c.bad_packets.saturating_add(1);
        if !std::mem::replace(&mut self.logged_bad, true) {
            warn!("virtio-vsock: {what} (dropped; further bad chains are counted, not logged)");
        }
    }

    fn interrupt(active: &mut Active, q: usize) {
        let Some(queue) = active.queues.get_mut(q) else {
            return;
        };
        if queue.needs_notification(&active.mem).unwrap_or(true) {
            let index = u16::try_from(q).unwrap_or(0);
            if let Err(e) = active.interrupt.trigger(InterruptKind::Queue(index)) {
                warn!("virtio-vsock: cannot interrupt the guest: {e}");
            }
        }
    }

    /// Takes every packet the guest sent.
    fn process_tx(&mut self) {
        let Some(active) = self.active.as_mut() else {
            return;
        };
        let mem = active.mem.clone();
        let mut packets = Vec::new();
        let r = drain(&mut active.queues[TX], &mem, |q, chain| {
            let head = chain.head_index();
            let descs: Vec<_> = chain
                .take(usize::from(QUEUE_SIZE))
                .map(|d| (d.addr().0, d.len(), d.is_write_only()))
                .collect();
            packets.push(parse_tx(&mem, &descs));
            if let Err(e) = q.add_used(&mem, head, 0) {
                warn!("virtio-vsock: cannot complete a transmit chain: {e}");
            }
        });
        if let Err(e) = r {
            warn!("virtio-vsock: transmit queue: {e}");
        }
        // Only for chains given back: a notification with nothing new
        // must not interrupt the guest.
        if !packets.is_empty() {
            Self::interrupt(active, TX);
        }
        for p in packets {
            match p {
                Ok(p) => self.muxer.handle_tx(&p.hdr, &p.payload),
                Err(e) => self.bad(&format!("transmit chain: {e}")),
            }
        }
    }

    /// Gives the guest what waits for it, while it has receive buffers.
    fn process_rx(&mut self) {
        let mut used = false;
        let mut retried = false;
        loop {
            let Some(active) = self.active.as_mut() else {
                return;
            };
            if !self.muxer.has_rx() {
                break;
            }
            let mem = active.mem.clone();
            let queue = &mut active.queues[RX];
            let Some(chain) = ember_virtio::queue::pop(queue, &mem) else {
                // Out of buffers: the driver notifies when it adds some.
                // Buffers added meanwhile are taken with one more look (a
                // corrupt avail index must not keep the loop going).
                match queue.enable_notification(&mem) {
                    Ok(true) if !std::mem::replace(&mut retried, true) => continue,
                    _ => break,
                }
            };
            let head = chain.head_index();
            let descs: Vec<_> = chain
                .take(usize::from(QUEUE_SIZE))
                .map(|d| (d.addr().0, d.len(), d.is_write_only()))
                .collect();
            let written = match RxBuffer::new(descs) {
                Err(e) => Err(e),
                Ok(buffer) => {
                    let room = buffer.payload_room();
                    match self.muxer.next_rx(&mut self.scratch[..room]) {
                        None => {
                            queue.go_to_previous_position();
                            break;
                        }
                        Some((hdr, len)) => buffer.write(&mem, &hdr, &self.scratch[..len]),
                    }
                }
            };
            let len = match written {
                Ok(n) => n,
                Err(e) => {
                    self.bad(&format!("receive chain: {e}"));
                    0
                }
            };
            let Some(active) = self.active.as_mut() else {
                return;
            };
            if let Err(e) = active.queues[RX].add_used(&mem, head, len) {
                warn!("virtio-vsock: cannot complete a receive chain: {e}");
            }
            used = true;
        }
        if let (true, Some(active)) = (used, self.active.as_mut()) {
            Self::interrupt(active, RX);
        }
    }

    /// Tells the guest its transport was reset (after a restore).
    fn send_reset_event(&mut self) {
        let Some(active) = self.active.as_mut() else {
            return;
        };
        let mem = active.mem.clone();
        let queue = &mut active.queues[EVENT];
        let Some(chain) = ember_virtio::queue::pop(queue, &mem) else {
            warn!("virtio-vsock: no event buffer for the transport reset");
            return;
        };
        let head = chain.head_index();
        let first = chain
            .take(1)
            .next()
            .filter(|d| d.is_write_only() && d.len() >= 4);
        let len = match first {
            Some(d) => match mem.write_obj(EVENT_TRANSPORT_RESET.to_le(), GuestAddress(d.addr().0))
            {
                Ok(()) => 4,
                Err(_) => 0,
            },
            None => 0,
        };
        if let Err(e) = queue.add_used(&mem, head, len) {
            warn!("virtio-vsock: cannot complete an event chain: {e}");
        }
        Self::interrupt(active, EVENT);
    }
}

impl VirtioDevice for Vsock {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_VSOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &self.queue_sizes
    }

    fn avail_features(&self) -> u64 {
        1u64 << virtio_bindings::virtio_config::VIRTIO_F_VERSION_1
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let config = self.config.guest_cid.to_le_bytes();
        for (i, b) in data.iter_mut().enumerate() {
            *b = usize::try_from(offset)
                .ok()
                .and_then(|o| o.checked_add(i))
                .and_then(|o| config.get(o))
                .copied()
                .unwrap_or(0);
        }
    }

    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}

    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
        if ctx.queues.len() != self.queue_sizes.len() {
            return Err(ActivateError::QueueCount {
                expected: self.queue_sizes.len(),
                got: ctx.queues.len(),
            });
        }
        self.active = Some(Active {
            mem: ctx.mem,
            interrupt: ctx.interrupt,
            queues: ctx.queues,
        });
        self.muxer.set_guest_ready(true);
        if std::mem::take(&mut self.reset_on_activate) {
            self.send_reset_event();
        }
        self.process_rx();
        Ok(())
    }

    fn is_activated(&self) -> bool {
        self.active.is_some()
    }

    fn process_queue(&mut self, index: usize) {
        match index {
            RX => self.process_rx(),
            TX => {
                self.process_tx();
                self.process_rx();
            }
            _ => {}
        }
    }

    fn reset(&mut self) {
        self.active = None;
        self.muxer.reset();
        self.muxer.set_guest_ready(false);
    }

    fn queue_states(&self) -> Vec<virtio_queue::QueueState> {
        self.active
            .as_ref()
            .map(|a| a.queues.iter().map(|q| q.state()).collect())
            .unwrap_or_default()
    }

    fn backend_fd(&self) -> Option<std::os::fd::RawFd> {
        Some(self.muxer.epoll_fd())
    }

    fn process_backend(&mut self) -> BackendInterest {
        self.muxer.poll();
        if self.active.is_some() {
            self.process_rx();
        }
        BackendInterest::Keep
    }
}
