//! The io_uring engine's completions: on their queues' used rings with
//! one interrupt per queue, or, failed under a stopping policy, held for
//! [`Block::retry`].

use ember_virtio::InterruptKind;
use log::warn;
use virtio_bindings::virtio_blk::VIRTIO_BLK_S_IOERR;
use virtio_queue::QueueT;
use vm_memory::Bytes;

use super::{first, status_byte, Active, Block, BlockCounters, Held, Logged};
use crate::exec::{op_name, policy_for};
use crate::uring::{Done, OpKind};

impl Block {
    /// Waits for every request in flight on the io_uring engine and
    /// completes them to the guest (a pause, a snapshot, a migration, a
    /// drive swap or the exit comes next). Nothing to do on `io=sync`.
    pub fn drain(&mut self) {
        let (Some(uring), Some(active)) = (self.uring.as_mut(), self.active.as_ref()) else {
            return;
        };
        if uring.in_flight() == 0 {
            return;
        }
        if let Err(e) = uring.wait_all(&active.mem) {
            warn!(
                "virtio-blk {}: waiting for io_uring requests: {e}",
                self.disk
            );
        }
        self.publish_completions();
    }

    /// Puts the requests the ring completed on their queues' used rings
    /// and interrupts the queues that need it.
    pub(super) fn publish_completions(&mut self) {
        let (Some(uring), Some(active)) = (self.uring.as_mut(), self.active.as_mut()) else {
            return;
        };
        let done = uring.take_done();
        if done.is_empty() {
            return;
        }
        let was_stopped = self.stopped.is_some();
        let mut touched = vec![false; active.queues.len()];
        for mut d in done {
            // Failed and kept by the ring (a stopping policy): held, or
            // completed with IOERR after all.
            if let (Some(e), Some(req)) = (&d.error, d.req.take()) {
                if policy_for(self.werror, self.rerror, req.kind()).stops_on(e) {
                    let why = format!("{} failed: {e}", op_name(req.kind()));
                    self.stopped.get_or_insert(why);
                    self.held.push(Held {
                        queue: d.queue,
                        head: d.head,
                        req,
                    });
                    continue;
                }
                d.used_len = u32::from(
                    active
                        .mem
                        .write_obj(status_byte(VIRTIO_BLK_S_IOERR), req.status_addr())
                        .is_ok(),
                );
            }
            count_done(&mut self.counters, &mut self.logged, &self.disk, &d);
            let Some(queue) = active.queues.get_mut(usize::from(d.queue)) else {
                continue;
            };
            match queue.add_used(&active.mem, d.head, d.used_len) {
                Ok(()) => touched[usize::from(d.queue)] = true,
                Err(e) => {
                    if first(&mut self.logged.used_ring) {
                        warn!(
                            "virtio-blk {}: cannot complete chain {}: {e}",
                            self.disk, d.head
                        );
                    }
                }
            }
        }
        interrupt_touched(
            active,
            &touched,
            &mut self.counters,
            &mut self.logged,
            &self.disk,
        );
        if !was_stopped && self.stopped.is_some() {
            self.note_stop();
        }
    }
}

/// Interrupts each queue in `touched` whose driver wants it.
pub(super) fn interrupt_touched(
    active: &mut Active,
    touched: &[bool],
    counters: &mut BlockCounters,
    logged: &mut Logged,
    disk: &str,
) {
    for (i, queue) in active.queues.iter_mut().enumerate() {
        if !touched.get(i).copied().unwrap_or(false)
            || !queue.needs_notification(&active.mem).unwrap_or(true)
        {
            continue;
        }
        counters.interrupts = counters.interrupts.saturating_add(1);
        let q = u16::try_from(i).unwrap_or(u16::MAX);
        if let Err(e) = active.interrupt.trigger(InterruptKind::Queue(q)) {
            if first(&mut logged.interrupt) {
                warn!("virtio-blk {disk}: cannot interrupt the guest: {e}");
            }
        }
    }
}

/// Counts a request the ring completed (and logs its failure: the first
/// of a burst at warn level).
pub(super) fn count_done(c: &mut BlockCounters, logged: &mut Logged, disk: &str, d: &Done) {
    if let Some(e) = &d.error {
        c.errors = c.errors.saturating_add(1);
        logged.backend_failed(
            disk,
            d.kind.class(),
            &format_args!("backend I/O failed: {e}"),
        );
        return;
    }
    logged.backend_ok(disk, d.kind.class());
    match d.kind {
        OpKind::Read => {
            c.reads = c.reads.saturating_add(1);
            c.read_bytes = c.read_bytes.saturating_add(d.bytes);
        }
        OpKind::Write => {
            c.writes = c.writes.saturating_add(1);
            c.write_bytes = c.write_bytes.saturating_add(d.bytes);
        }
        OpKind::Flush => c.flushes = c.flushes.saturating_add(1),
    }
}
