//! What the guest sees of the NIC besides its queues, and what a snapshot
//! keeps: the config space's MAC and status (link, announce), the link
//! going down with its backend, the NIC's saved state, and the announce
//! after a migration.

use ember_virtio::InterruptKind;
use virtio_bindings::virtio_net::{
    VIRTIO_NET_F_GUEST_ANNOUNCE, VIRTIO_NET_S_ANNOUNCE, VIRTIO_NET_S_LINK_UP,
};

use super::{config_space, Announced, Fault, Net, MAX_FRAME, VNET_HDR_LEN};
use crate::state::NetState;
use crate::{Error, Result};

impl Net {
    /// The MAC address the NIC answers to now (the guest may have set it
    /// through the control queue).
    pub fn mac(&self) -> [u8; 6] {
        self.filter.mac()
    }

    /// Whether the backend works (the guest sees the link up).
    pub fn link_up(&self) -> bool {
        self.link_up
    }

    /// Rewrites the config space's MAC and status fields.
    pub(super) fn refresh_config(&mut self) {
        let mut status = 0;
        if self.link_up {
            status |= VIRTIO_NET_S_LINK_UP;
        }
        if self.announcing {
            status |= VIRTIO_NET_S_ANNOUNCE;
        }
        self.config = config_space(self.filter.mac(), status, self.queue_pairs());
    }

    /// The backend failed: the link goes down (once, logged) and the guest
    /// is told through a config interrupt.
    pub(super) fn link_down(&mut self) {
        if !self.link_up {
            return;
        }
        self.link_up = false;
        self.refresh_config();
        self.log.report(
            Fault::Link,
            format_args!("link down: the backend is gone; the VM goes on without this NIC"),
        );
        if let Some(a) = self.active.as_ref() {
            if let Err(e) = a.interrupt.trigger(InterruptKind::Config) {
                self.log.report(
                    Fault::Interrupt,
                    format_args!("cannot interrupt the guest: {e}"),
                );
            }
        }
    }

    /// The NIC's own state (for a snapshot; the device is paused).
    pub fn state(&self) -> NetState {
        NetState {
            mac: self.base_mac,
            pending_frame: self.pairs.first().and_then(pending),
            pair_pending: self
                .pairs
                .iter()
                .enumerate()
                .skip(1)
                .filter_map(|(i, p)| Some((u16::try_from(i).ok()?, pending(p)?)))
                .collect(),
            filter: self.active.as_ref().map(|_| self.filter.state()),
            announcing: self.announcing,
        }
    }

    /// Puts a restored (and, through its transport, reactivated) device in
    /// `state`: a different MAC or an oversized frame is refused.
    pub fn restore_state(&mut self, state: &NetState) -> Result<()> {
        if state.mac != self.base_mac {
            return Err(Error::StateMismatch(format!(
                "saved with MAC {}, the device has {}",
                crate::mac_string(&state.mac),
                crate::mac_string(&self.base_mac)
            )));
        }
        let frames = state
            .pending_frame
            .iter()
            .map(|f| (0u16, f))
            .chain(state.pair_pending.iter().map(|(p, f)| (*p, f)));
        for (p, frame) in frames.clone() {
            if usize::from(p) >= self.pairs.len() || frame.len() > MAX_FRAME {
                return Err(Error::StateMismatch(format!(
                    "a pending frame of {} bytes on queue pair {p} (the device has {} pairs, \
                     frames of at most {MAX_FRAME} bytes)",
                    frame.len(),
                    self.pairs.len()
                )));
            }
        }
        let mut filter = self.filter.clone();
        if let Some(f) = &state.filter {
            filter
                .restore(f)
                .map_err(|e| Error::StateMismatch(format!("receive filter: {e}")))?;
        }
        self.filter = filter;
        self.announcing = state.announcing;
        self.refresh_config();
        self.set_active_pairs(self.filter.queue_pairs());
        for (p, frame) in frames {
            if let Some(pair) = self.pairs.get_mut(usize::from(p)) {
                if let Some(dst) = pair.rx_buf.get_mut(..frame.len()) {
                    dst.copy_from_slice(frame);
                    pair.rx_pending = Some(frame.len());
                }
            }
        }
        Ok(())
    }

    /// Tells the network where the guest now is, after a live migration
    /// (as QEMU's announce): the device writes one RARP frame from the
    /// NIC's MAC to the broadcast address, so switches learn the new port
    /// before the guest sends anything; and a driver that negotiated
    /// VIRTIO_NET_F_GUEST_ANNOUNCE is asked to announce itself too
    /// (`VIRTIO_NET_S_ANNOUNCE` and a config interrupt: it sends gratuitous
    /// ARPs for its addresses, which also update the neighbours' ARP
    /// caches, and acknowledges on the control queue).
    pub fn announce(&mut self) -> std::io::Result<Announced> {
        let frame = rarp_announce(self.filter.mac());
        let mut out = vec![0u8; VNET_HDR_LEN];
        out.extend_from_slice(&frame);
        if let Some(p) = self.pairs.first_mut() {
            p.backend.write(&out)?;
        }
        if let Some(a) = self.active.as_ref() {
            if a.ctrl.is_some() && a.acked & (1 << VIRTIO_NET_F_GUEST_ANNOUNCE) != 0 {
                self.announcing = true;
                self.refresh_config();
                if let Some(a) = self.active.as_ref() {
                    a.interrupt.trigger(InterruptKind::Config)?;
                }
                return Ok(Announced::RarpAndGuest);
            }
        }
        Ok(Announced::Rarp)
    }
}

/// The frame waiting in pair `p` for guest buffers.
fn pending(p: &super::Pair) -> Option<Vec<u8>> {
    p.rx_pending
        .and_then(|len| p.rx_buf.get(..len))
        .map(<[u8]>::to_vec)
}

/// A RARP "reverse request" for `mac`, padded to Ethernet's 60 bytes: what
/// QEMU sends to announce a migrated guest (RFC 903: hardware type 1,
/// protocol IPv4, opcode 3, sender and target hardware address `mac`).
pub fn rarp_announce(mac: [u8; 6]) -> Vec<u8> {
    let mut f = Vec::with_capacity(60);
    f.extend_from_slice(&[0xff; 6]);
    f.extend_from_slice(&mac);
    f.extend_from_slice(&0x8035u16.to_be_bytes());
    f.extend_from_slice(&[0, 1, 0x08, 0x00, 6, 4, 0, 3]);
    f.extend_from_slice(&mac);
    f.extend_from_slice(&[0; 4]);
    f.extend_from_slice(&mac);
    f.extend_from_slice(&[0; 4]);
    f.resize(60, 0);
    f
}
