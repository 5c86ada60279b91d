//! The control queue's chains: the readable bytes are gathered (at most
//! [`MAX_COMMAND_LEN`]), parsed and applied to the receive filter, and the
//! status byte goes into the first writable descriptor. A malformed chain
//! or a refused command gets [`VIRTIO_NET_ERR`] (if it has somewhere to
//! put it) and one warning; nothing the guest sends panics or blocks.

use ember_memory::GuestMemoryMmap;
use virtio_queue::DescriptorChain;
use vm_memory::{Bytes, GuestAddress};

use super::{complete, notify, tun_offloads, Active, Fault, Net, MAX_CHAIN_DESCS};
use crate::ctrl::{parse, Command, CtrlError, MAX_COMMAND_LEN, VIRTIO_NET_ERR, VIRTIO_NET_OK};

/// A control chain, read: the command bytes and where the status goes.
struct CtrlChain {
    bytes: Vec<u8>,
    status_at: Option<GuestAddress>,
}

/// Reads a control chain: readable descriptors first, then at least one
/// writable byte for the status.
fn read_chain(
    chain: DescriptorChain<&GuestMemoryMmap>,
    mem: &GuestMemoryMmap,
) -> (CtrlChain, Option<CtrlError>) {
    let mut out = CtrlChain {
        bytes: Vec::new(),
        status_at: None,
    };
    let mut more = false;
    for (i, d) in chain.enumerate() {
        more = d.has_next();
        if i >= MAX_CHAIN_DESCS {
            return (out, Some(CtrlError::Chain("too many descriptors".into())));
        }
        if d.is_write_only() {
            if out.status_at.is_none() && d.len() >= 1 {
                out.status_at = Some(d.addr());
            }
            continue;
        }
        if out.status_at.is_some() {
            return (
                out,
                Some(CtrlError::Chain(
                    "a readable descriptor after a writable one".into(),
                )),
            );
        }
        let len = usize::try_from(d.len()).unwrap_or(usize::MAX);
        let at = out.bytes.len();
        if len > MAX_COMMAND_LEN - at {
            return (
                out,
                Some(CtrlError::Chain(format!(
                    "more than {MAX_COMMAND_LEN} bytes of command"
                ))),
            );
        }
        out.bytes.resize(at + len, 0);
        if mem.read_slice(&mut out.bytes[at..], d.addr()).is_err() {
            return (
                out,
                Some(CtrlError::Chain(format!(
                    "guest memory at {:#x} is not accessible",
                    d.addr().0
                ))),
            );
        }
    }
    if more {
        return (out, Some(CtrlError::Chain("it ends in a bad link".into())));
    }
    if out.status_at.is_none() {
        return (
            out,
            Some(CtrlError::Chain("no writable byte for the status".into())),
        );
    }
    (out, None)
}

impl Net {
    /// Carries out every available control command.
    pub(super) fn process_ctrl(&mut self) {
        let Some(mut active) = self.active.take() else {
            return;
        };
        let Some(mut queue) = active.ctrl.take() else {
            self.active = Some(active);
            return;
        };
        let mem = active.mem.clone();
        let pairs_before = self.filter.queue_pairs();
        let mut used_any = false;
        let drained = ember_virtio::queue::drain(&mut queue, &mem, |queue, chain| {
            let head = chain.head_index();
            let (c, err) = read_chain(chain, &mem);
            let result = match err {
                Some(e) => Err(e),
                None => parse(&c.bytes).and_then(|cmd| self.carry_out(&cmd, &mut active)),
            };
            let status = match &result {
                Ok(()) => {
                    self.counters.ctrl_ok = self.counters.ctrl_ok.saturating_add(1);
                    VIRTIO_NET_OK
                }
                Err(e) => {
                    self.counters.ctrl_err = self.counters.ctrl_err.saturating_add(1);
                    self.log
                        .report(Fault::Ctrl, format_args!("control command refused: {e}"));
                    VIRTIO_NET_ERR
                }
            };
            let written = match c.status_at {
                Some(at) => u32::from(mem.write_obj(status, at).is_ok()),
                None => 0,
            };
            used_any |= complete(queue, &mem, head, written, &mut self.log);
        });
        if let Err(e) = drained {
            self.log.report(
                Fault::UsedRing,
                format_args!("cannot update the control ring's notification fields: {e}"),
            );
        }
        active.ctrl = Some(queue);
        if used_any {
            let index = active.ctrl_index;
            notify(&mut active, index, &mut self.log);
        }
        self.active = Some(active);
        let pairs = self.filter.queue_pairs();
        if pairs != pairs_before {
            self.set_active_pairs(pairs);
            // The pairs now in use are served (and their backends watched).
            for p in 0..usize::from(pairs) {
                self.rx_pass(p);
            }
        }
    }

    /// Applies one parsed command and what it changes outside the filter.
    fn carry_out(&mut self, cmd: &Command, active: &mut Active) -> Result<(), CtrlError> {
        self.filter.apply(cmd)?;
        match cmd {
            Command::MacAddr(_) => self.refresh_config(),
            Command::AnnounceAck => {
                self.announcing = false;
                self.refresh_config();
            }
            Command::GuestOffloads(mask) => {
                let flags = tun_offloads(mask & active.acked);
                if !self.set_offloads(flags) {
                    return Err(CtrlError::Offloads(*mask));
                }
                active.guest_csum = mask & (1 << super::VIRTIO_NET_F_GUEST_CSUM) != 0;
            }
            _ => {}
        }
        Ok(())
    }
}
