//! The device on vhost-net ([`crate::vhost`]): the workers get the queue
//! pairs at activation and let go of them at reset; the guest's
//! notifications are passed on to them, their signals become the queues'
//! interrupts. The control queue, the config space and the taps' settings
//! stay the device's.

use ember_virtio::ActivateError;

use super::{interrupt, Fault, Net};
use crate::vhost::{Vhost, VhostError};

impl Net {
    /// Moves the frames with vhost-net from now on: one instance per queue
    /// pair, on the same tap queues. Done before the VM runs (it changes
    /// the device's epoll). An error leaves the device as it was (ember's
    /// own data path); so does a backend vhost-net cannot take (a
    /// host-side VLAN, a socket).
    pub fn enable_vhost(&mut self, mem: &ember_memory::GuestMemoryMmap) -> Result<(), VhostError> {
        let taps = self.vhost_taps()?;
        let vhost = Vhost::open(taps, mem)?;
        self.use_vhost(vhost)
    }

    /// [`Net::enable_vhost`] with the instances already made (tests).
    pub fn use_vhost(&mut self, vhost: Vhost) -> Result<(), VhostError> {
        let Some(l) = self.limits.as_mut() else {
            return Err(VhostError::EventFd(std::io::Error::other(
                "the device has no epoll to watch vhost-net's signals in",
            )));
        };
        l.watch_calls(&vhost.call_fds())
            .map_err(VhostError::EventFd)?;
        self.vhost = Some(vhost);
        Ok(())
    }

    /// Each queue pair's tap queue, for vhost-net.
    pub fn vhost_taps(&self) -> Result<Vec<std::fs::File>, VhostError> {
        self.pairs
            .iter()
            .map(|p| match p.backend.tap_file() {
                Some(Ok(f)) => Ok(f),
                Some(Err(e)) => Err(VhostError::EventFd(e)),
                None => Err(VhostError::Missing(
                    "vhost-net moves frames between a plain tap and the guest: not with a \
                     host-side VLAN or user-mode networking"
                        .into(),
                )),
            })
            .collect()
    }

    /// Whether vhost-net moves this NIC's frames.
    pub fn uses_vhost(&self) -> bool {
        self.vhost.is_some()
    }

    /// Hands the activated queue pairs to vhost-net, if the device uses it.
    pub(super) fn start_vhost(&mut self, acked: u64) -> Result<(), ActivateError> {
        let (Some(v), Some(a)) = (self.vhost.as_mut(), self.active.as_ref()) else {
            return Ok(());
        };
        let queues: Vec<_> = a.queues.iter().map(|q| (&q.rx, &q.tx)).collect();
        if let Err(e) = v.start(acked, &queues) {
            v.stop();
            self.active = None;
            self.log.report(Fault::Queues, format_args!("{e}"));
            return Err(ActivateError::Device(e.to_string()));
        }
        Ok(())
    }

    /// Interrupts the driver for each queue vhost-net signalled (`calls`, a
    /// bit per device queue).
    pub(super) fn vhost_calls(&mut self, calls: u64) {
        let (Some(v), Some(a)) = (self.vhost.as_ref(), self.active.as_ref()) else {
            return;
        };
        for q in 0..64u16 {
            if calls & (1 << q) != 0 && v.take_call(usize::from(q)) {
                interrupt(a, q, &mut self.log);
            }
        }
    }
}
