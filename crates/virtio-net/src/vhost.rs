//! vhost-net: the host kernel moves the frames between the tap and the
//! guest's receive and transmit queues (`/dev/vhost-net`, one instance per
//! queue pair), through rust-vmm's `vhost` crate. The device keeps its
//! config space, its control queue and the tap's settings; a queue
//! notification from the guest is passed on to the vhost worker (its kick
//! eventfd), and the worker's "used buffers" signal (its call eventfd,
//! watched in the device's epoll) becomes the queue's interrupt. Both go
//! through ember's event loop: KVM's ioeventfd and irqfd are not wired to
//! the worker directly (a host with `/dev/vhost-net` to measure on would
//! show whether that hop matters).
//!
//! A host without `/dev/vhost-net` (this project's: it has no vhost_net
//! module) makes [`Vhost::open`] fail, and the VMM goes on with ember's own
//! data path, saying so. Snapshots and migration refuse a NIC that runs on
//! vhost-net: the worker's ring positions and the pages it writes are not
//! tracked.

use std::fs::File;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;

use ember_memory::GuestMemoryMmap;
use vhost::net::VhostNet;
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_net::VIRTIO_NET_F_MRG_RXBUF;
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// The device node.
pub const VHOST_NET_PATH: &str = "/dev/vhost-net";

/// The negotiated features vhost-net takes part in (the rings' layout and
/// the receive buffers'); the others are the device's.
pub const VHOST_FEATURES: u64 =
    (1 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_RING_F_EVENT_IDX) | (1 << VIRTIO_NET_F_MRG_RXBUF);

/// Why vhost-net cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum VhostError {
    /// No usable `/dev/vhost-net`.
    #[error(
        "{VHOST_NET_PATH} cannot be opened ({0}): load the vhost_net module \
         (`modprobe vhost_net`) or leave vhost off"
    )]
    Missing(String),
    /// An ioctl failed.
    #[error("vhost-net {what}: {source}")]
    Ioctl {
        /// What was being set.
        what: &'static str,
        /// What the crate said.
        source: vhost::Error,
    },
    /// The worker does not support a feature the driver negotiated.
    #[error("vhost-net lacks features {0:#x} the driver negotiated")]
    Features(u64),
    /// An eventfd could not be made.
    #[error("vhost-net eventfd: {0}")]
    EventFd(std::io::Error),
}

fn ioctl(what: &'static str) -> impl Fn(vhost::Error) -> VhostError {
    move |source| VhostError::Ioctl { what, source }
}

/// One vhost-net instance: what [`Vhost`] asks of it (`vhost_kern`'s
/// `Net` in a VMM, a recording fake in tests); the `vhost` crate's
/// traits, as a trait object.
#[allow(missing_docs)]
pub trait VhostNetHandle: Send {
    fn get_features(&self) -> vhost::Result<u64>;
    fn set_features(&self, features: u64) -> vhost::Result<()>;
    fn set_owner(&self) -> vhost::Result<()>;
    fn set_mem_table(&self, regions: &[VhostUserMemoryRegionInfo]) -> vhost::Result<()>;
    fn set_vring_num(&self, ring: usize, num: u16) -> vhost::Result<()>;
    fn set_vring_addr(&self, ring: usize, config: &VringConfigData) -> vhost::Result<()>;
    fn set_vring_base(&self, ring: usize, base: u16) -> vhost::Result<()>;
    fn set_vring_call(&self, ring: usize, fd: &EventFd) -> vhost::Result<()>;
    fn set_vring_kick(&self, ring: usize, fd: &EventFd) -> vhost::Result<()>;
    fn set_backend(&self, ring: usize, tap: Option<&File>) -> vhost::Result<()>;
}

impl<T: VhostNet + Send> VhostNetHandle for T {
    fn get_features(&self) -> vhost::Result<u64> {
        VhostBackend::get_features(self)
    }
    fn set_features(&self, features: u64) -> vhost::Result<()> {
        VhostBackend::set_features(self, features)
    }
    fn set_owner(&self) -> vhost::Result<()> {
        VhostBackend::set_owner(self)
    }
    fn set_mem_table(&self, regions: &[VhostUserMemoryRegionInfo]) -> vhost::Result<()> {
        VhostBackend::set_mem_table(self, regions)
    }
    fn set_vring_num(&self, ring: usize, num: u16) -> vhost::Result<()> {
        VhostBackend::set_vring_num(self, ring, num)
    }
    fn set_vring_addr(&self, ring: usize, config: &VringConfigData) -> vhost::Result<()> {
        VhostBackend::set_vring_addr(self, ring, config)
    }
    fn set_vring_base(&self, ring: usize, base: u16) -> vhost::Result<()> {
        VhostBackend::set_vring_base(self, ring, base)
    }
    fn set_vring_call(&self, ring: usize, fd: &EventFd) -> vhost::Result<()> {
        VhostBackend::set_vring_call(self, ring, fd)
    }
    fn set_vring_kick(&self, ring: usize, fd: &EventFd) -> vhost::Result<()> {
        VhostBackend::set_vring_kick(self, ring, fd)
    }
    fn set_backend(&self, ring: usize, tap: Option<&File>) -> vhost::Result<()> {
        VhostNet::set_backend(self, ring, tap)
    }
}

/// One queue pair on vhost-net: its instance, its tap queue, and the kick
/// and call eventfds of its receive (0) and transmit (1) rings.
struct VhostPair {
    handle: Box<dyn VhostNetHandle>,
    tap: File,
    kick: [EventFd; 2],
    call: [EventFd; 2],
}

/// vhost-net for every queue pair of a NIC.
pub struct Vhost {
    pairs: Vec<VhostPair>,
    /// The pairs whose workers run (between [`Vhost::start`] and
    /// [`Vhost::stop`]): all, or the first when the driver did not
    /// negotiate several.
    started: usize,
}

impl std::fmt::Debug for Vhost {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vhost")
            .field("pairs", &self.pairs.len())
            .field("started", &self.started)
            .finish_non_exhaustive()
    }
}

impl Vhost {
    /// Opens one vhost-net instance per tap queue in `taps`, makes this
    /// process its owner and gives it the guest's memory.
    pub fn open(taps: Vec<File>, mem: &GuestMemoryMmap) -> Result<Vhost, VhostError> {
        let mut handles: Vec<Box<dyn VhostNetHandle>> = Vec::with_capacity(taps.len());
        for _ in &taps {
            let h = vhost::vhost_kern::net::Net::new(Arc::new(mem.clone())).map_err(|e| {
                VhostError::Missing(match e {
                    vhost::Error::VhostOpen(io) => io.to_string(),
                    other => other.to_string(),
                })
            })?;
            handles.push(Box::new(h));
        }
        Vhost::with_handles(handles, taps, mem)
    }

    /// [`Vhost::open`] with instances already open (one per tap queue).
    pub fn with_handles(
        handles: Vec<Box<dyn VhostNetHandle>>,
        taps: Vec<File>,
        mem: &GuestMemoryMmap,
    ) -> Result<Vhost, VhostError> {
        let regions = memory_regions(mem);
        let mut pairs = Vec::with_capacity(handles.len());
        for (handle, tap) in handles.into_iter().zip(taps) {
            handle.set_owner().map_err(ioctl("SET_OWNER"))?;
            handle
                .set_mem_table(&regions)
                .map_err(ioctl("SET_MEM_TABLE"))?;
            let efd = || EventFd::new(EFD_NONBLOCK).map_err(VhostError::EventFd);
            pairs.push(VhostPair {
                handle,
                tap,
                kick: [efd()?, efd()?],
                call: [efd()?, efd()?],
            });
        }
        Ok(Vhost { pairs, started: 0 })
    }

    /// The call eventfds to watch, with the index of the device queue each
    /// one signals.
    pub fn call_fds(&self) -> Vec<(RawFd, u16)> {
        let mut fds = Vec::with_capacity(self.pairs.len() * 2);
        for (p, pair) in self.pairs.iter().enumerate() {
            for (ring, call) in pair.call.iter().enumerate() {
                let index = u16::try_from(p * 2 + ring).unwrap_or(u16::MAX);
                fds.push((call.as_raw_fd(), index));
            }
        }
        fds
    }

    /// Whether the workers run.
    pub fn running(&self) -> bool {
        self.started > 0
    }

    /// Hands the activated queues (receive and transmit, pair after pair;
    /// the pairs the driver set up) to their workers: the features, each
    /// ring's size, addresses and next available index, its eventfds, and
    /// the tap queue.
    pub fn start(&mut self, acked: u64, queues: &[(&Queue, &Queue)]) -> Result<(), VhostError> {
        let features = acked & VHOST_FEATURES;
        for (pair, (rx, tx)) in self.pairs.iter().zip(queues) {
            let h = &pair.handle;
            let offered = h.get_features().map_err(ioctl("GET_FEATURES"))?;
            if features & !offered != 0 {
                return Err(VhostError::Features(features & !offered));
            }
            h.set_features(features).map_err(ioctl("SET_FEATURES"))?;
            for (ring, q) in [*rx, *tx].into_iter().enumerate() {
                h.set_vring_num(ring, q.size())
                    .map_err(ioctl("SET_VRING_NUM"))?;
                let config = VringConfigData {
                    queue_max_size: q.max_size(),
                    queue_size: q.size(),
                    flags: 0,
                    desc_table_addr: q.desc_table(),
                    used_ring_addr: q.used_ring(),
                    avail_ring_addr: q.avail_ring(),
                    log_addr: None,
                };
                h.set_vring_addr(ring, &config)
                    .map_err(ioctl("SET_VRING_ADDR"))?;
                h.set_vring_base(ring, q.next_avail())
                    .map_err(ioctl("SET_VRING_BASE"))?;
                h.set_vring_call(ring, &pair.call[ring])
                    .map_err(ioctl("SET_VRING_CALL"))?;
                h.set_vring_kick(ring, &pair.kick[ring])
                    .map_err(ioctl("SET_VRING_KICK"))?;
            }
        }
        let started = queues.len().min(self.pairs.len());
        for (i, pair) in self.pairs.iter().take(started).enumerate() {
            for ring in 0..2 {
                if let Err(e) = pair.handle.set_backend(ring, Some(&pair.tap)) {
                    // Let go of what the earlier pairs took.
                    self.started = i + usize::from(ring == 1);
                    self.stop();
                    return Err(ioctl("NET_SET_BACKEND")(e));
                }
            }
        }
        self.started = started;
        // Buffers the driver posted before the workers started.
        for q in 0..started * 2 {
            self.kick(q);
        }
        Ok(())
    }

    /// Stops the workers (a device reset): they let go of the taps.
    pub fn stop(&mut self) {
        for pair in self.pairs.iter().take(self.started) {
            for ring in 0..2 {
                if let Err(e) = pair.handle.set_backend(ring, None) {
                    log::warn!("vhost-net: cannot detach the tap from ring {ring}: {e}");
                }
            }
        }
        self.started = 0;
    }

    /// Passes the guest's notification of device queue `index` on to its
    /// worker.
    pub fn kick(&self, index: usize) {
        let Some(pair) = self.pairs.get(index / 2) else {
            return;
        };
        if let Some(k) = pair.kick.get(index % 2) {
            if let Err(e) = k.write(1) {
                log::warn!("vhost-net: cannot kick queue {index}: {e}");
            }
        }
    }

    /// Reads (resets) the call eventfd of device queue `index`; whether the
    /// worker had signalled it.
    pub fn take_call(&self, index: usize) -> bool {
        self.pairs
            .get(index / 2)
            .and_then(|p| p.call.get(index % 2))
            .is_some_and(|c| c.read().is_ok())
    }
}

/// The vhost-net ioctls a device makes once the VM runs (the driver's
/// activation and reset, on a vCPU thread or, restoring, the VMM's), for
/// seccomp filters: (request, why).
pub fn runtime_ioctls() -> [(u64, &'static str); 8] {
    use vhost::vhost_kern::vhost_binding as b;
    let why = "vhost-net takes the queues when the driver activates the NIC";
    [
        (b::VHOST_GET_FEATURES(), why),
        (b::VHOST_SET_FEATURES(), why),
        (b::VHOST_SET_VRING_NUM(), why),
        (b::VHOST_SET_VRING_ADDR(), why),
        (b::VHOST_SET_VRING_BASE(), why),
        (b::VHOST_SET_VRING_CALL(), why),
        (b::VHOST_SET_VRING_KICK(), why),
        (
            b::VHOST_NET_SET_BACKEND(),
            "vhost-net takes the tap at activation and lets go of it at reset",
        ),
    ]
}

/// The guest's memory as vhost's table: each region's guest address, size
/// and address in this process.
pub fn memory_regions(mem: &GuestMemoryMmap) -> Vec<VhostUserMemoryRegionInfo> {
    mem.iter()
        .map(|r| VhostUserMemoryRegionInfo {
            guest_phys_addr: r.start_addr().0,
            memory_size: r.len(),
            userspace_addr: u64::try_from(r.as_ptr().expose_provenance()).unwrap_or(0),
            mmap_offset: 0,
            mmap_handle: -1,
        })
        .collect()
}

#[cfg(test)]
mod tests;
