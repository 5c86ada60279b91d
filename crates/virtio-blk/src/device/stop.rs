//! What a disk does when the host fails a request under a stopping
//! [`ErrorPolicy`] (`werror=stop|enospc`, `rerror=stop`): it keeps the
//! request, stops its queues, tells the VMM (which pauses the VM), and runs
//! the request again when the user resumes the VM.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use ember_virtio::VirtioDevice;
use log::{info, warn};
use virtio_queue::QueueT;
use vmm_sys_util::eventfd::EventFd;

use super::completions::interrupt_touched;
use super::Block;
use crate::exec::Executor;
use crate::request::Request;
use crate::ErrorPolicy;

/// A request the io_uring engine saw fail under a stopping
/// [`ErrorPolicy`]: not completed; [`Block::retry`] runs it again.
#[derive(Debug)]
pub(super) struct Held {
    pub(super) queue: u16,
    pub(super) head: u16,
    pub(super) req: Request,
}

/// Who to tell that a disk stopped (see [`Block::on_stop`]).
#[derive(Debug)]
pub(super) struct StopNotify {
    flag: Arc<AtomicBool>,
    wake: EventFd,
}

impl Block {
    /// Sets what a failed write (`werror`) and a failed read (`rerror`) do.
    pub fn set_error_policy(&mut self, werror: ErrorPolicy, rerror: ErrorPolicy) {
        self.werror = werror;
        self.rerror = rerror;
    }

    /// The image, as the disk's log lines name it.
    pub fn image(&self) -> &str {
        &self.disk
    }

    /// What failed writes and reads do (`werror`, `rerror`).
    pub fn error_policy(&self) -> (ErrorPolicy, ErrorPolicy) {
        (self.werror, self.rerror)
    }

    /// When the disk stops, `flag` is set and `wake` written: the VMM's
    /// loop wakes up, sees the flag and pauses the VM.
    pub fn on_stop(&mut self, flag: Arc<AtomicBool>, wake: EventFd) {
        self.stop_notify = Some(StopNotify { flag, wake });
    }

    /// Why the disk is stopped (the host failed a request under a stopping
    /// policy), if it is.
    pub fn stopped(&self) -> Option<&str> {
        self.stopped.as_deref()
    }

    /// Failed io_uring requests waiting for [`Block::retry`] (they are in
    /// no ring: a snapshot now would lose them).
    pub fn held_requests(&self) -> usize {
        self.held.len()
    }

    /// Runs again what stopped the disk (the user resumed the VM): the
    /// requests io_uring saw fail, then the queues, where a failed
    /// synchronous request went back. Ok when they went through; an error,
    /// the disk stopped again, says why. The caller does not resume the VM
    /// then.
    pub fn retry(&mut self) -> std::result::Result<(), String> {
        let Some(why) = self.stopped.take() else {
            return Ok(());
        };
        if self.active.is_none() {
            self.held.clear();
            return Ok(());
        }
        self.retrying = true;
        self.retry_held();
        if self.stopped.is_none() {
            let queues = self.active.as_ref().map_or(0, |a| a.queues.len());
            for i in 0..queues {
                self.process_queue(i);
            }
        }
        self.retrying = false;
        match &self.stopped {
            Some(again) => Err(again.clone()),
            None => {
                info!(
                    "virtio-blk {}: the request that stopped the disk ({why}) went through",
                    self.disk
                );
                Ok(())
            }
        }
    }

    /// Runs the held io_uring requests in order, synchronously; one that
    /// fails to stop again stays held with the ones after it.
    fn retry_held(&mut self) {
        let held = std::mem::take(&mut self.held);
        let Some(active) = self.active.as_mut() else {
            return;
        };
        let mut stop = None;
        let mut exec = executor!(self, &active.mem, &mut stop);
        let mut touched = vec![false; active.queues.len()];
        let mut left = held.into_iter();
        let mut kept = None;
        for h in left.by_ref() {
            let Some(len) = exec.complete(&h.req) else {
                kept = Some(h);
                break;
            };
            let q = usize::from(h.queue);
            if let Some(queue) = active.queues.get_mut(q) {
                if queue.add_used(&active.mem, h.head, len).is_ok() {
                    touched[q] = true;
                }
            }
        }
        drop(exec);
        if let Some(h) = kept {
            self.held.push(h);
            self.held.extend(left);
            self.stopped = stop;
        }
        interrupt_touched(
            active,
            &touched,
            &mut self.counters,
            &mut self.logged,
            &self.disk,
        );
    }

    /// The disk has just stopped: says so and tells the VMM (not while
    /// [`Block::retry`] runs: its caller hears it from the result).
    pub(super) fn note_stop(&mut self) {
        if self.retrying {
            return;
        }
        let Some(why) = &self.stopped else {
            return;
        };
        warn!(
            "virtio-blk {}: {why} (werror={}, rerror={}): the request waits and the VM pauses until it is resumed",
            self.disk, self.werror, self.rerror
        );
        if let Some(n) = &self.stop_notify {
            n.flag.store(true, Ordering::SeqCst);
            if let Err(e) = n.wake.write(1) {
                warn!("virtio-blk {}: cannot wake the VMM: {e}", self.disk);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    use ember_virtio::{ActivateContext, VirtioDevice};
    use virtio_bindings::virtio_blk::{
        VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_IN, VIRTIO_BLK_T_OUT,
    };
    use vm_memory::{Bytes, GuestAddress};
    use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

    use crate::test_utils::{
        desc, guest_memory, header, CountingInterrupt, MemBackend, MemState, TestQueue, DATA, HDR,
        R, STATUS, W,
    };
    use crate::{Block, ErrorPolicy};

    const ENOSPC: i32 = libc::ENOSPC;
    const EIO: i32 = libc::EIO;

    struct Disk {
        block: Block,
        state: Arc<MemState>,
        flag: Arc<AtomicBool>,
        wake: EventFd,
    }

    fn disk(werror: ErrorPolicy, rerror: ErrorPolicy) -> Disk {
        let (backend, state) = MemBackend::new(1 << 16);
        let mut block = Block::with_backend(Box::new(backend), false, None);
        block.set_error_policy(werror, rerror);
        let flag = Arc::new(AtomicBool::new(false));
        let wake = EventFd::new(EFD_NONBLOCK).unwrap();
        block.on_stop(flag.clone(), wake.try_clone().unwrap());
        Disk {
            block,
            state,
            flag,
            wake,
        }
    }

    fn activate(block: &mut Block, mem: &ember_memory::GuestMemoryMmap, q: &TestQueue) {
        block
            .activate(ActivateContext {
                mem: mem.clone(),
                interrupt: Arc::new(CountingInterrupt::default()),
                queues: vec![q.queue()],
                acked_features: block.avail_features()
                    & !(1 << virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX),
            })
            .unwrap();
    }

    /// Request `i`: `kind` at sector `i`, 512 bytes of `0x40 + i` for a
    /// write, its status byte at STATUS + i.
    fn add(mem: &ember_memory::GuestMemoryMmap, q: &mut TestQueue, i: u64, kind: u32) {
        header(mem, HDR + 16 * i, kind, i);
        let data = DATA + 512 * i;
        mem.write_slice(&[0x40 + u8::try_from(i).unwrap(); 512], GuestAddress(data))
            .unwrap();
        mem.write_obj(0xffu8, GuestAddress(STATUS + i)).unwrap();
        match kind {
            VIRTIO_BLK_T_FLUSH => q.add(&[desc(HDR + 16 * i, 16, R), desc(STATUS + i, 1, W)]),
            VIRTIO_BLK_T_IN => q.add(&[
                desc(HDR + 16 * i, 16, R),
                desc(data, 512, W),
                desc(STATUS + i, 1, W),
            ]),
            _ => q.add(&[
                desc(HDR + 16 * i, 16, R),
                desc(data, 512, R),
                desc(STATUS + i, 1, W),
            ]),
        }
    }

    fn status(mem: &ember_memory::GuestMemoryMmap, i: u64) -> u32 {
        u32::from(mem.read_obj::<u8>(GuestAddress(STATUS + i)).unwrap())
    }

    #[test]
    fn report_completes_a_failed_write_with_ioerr_and_goes_on() {
        let mut d = disk(ErrorPolicy::Report, ErrorPolicy::Report);
        let mem = guest_memory();
        let mut q = TestQueue::new(&mem, 16);
        activate(&mut d.block, &mem, &q);
        d.state.fail_writes(Some(ENOSPC));
        add(&mem, &mut q, 0, VIRTIO_BLK_T_OUT);
        add(&mem, &mut q, 1, VIRTIO_BLK_T_FLUSH);
        d.block.process_queue(0);
        assert_eq!(q.used().len(), 2);
        assert_eq!(status(&mem, 0), VIRTIO_BLK_S_IOERR);
        assert_eq!(status(&mem, 1), VIRTIO_BLK_S_IOERR);
        assert_eq!(d.block.counters().errors, 2);
        assert!(d.block.stopped().is_none());
        assert!(!d.flag.load(Ordering::SeqCst));
        // The fault ends: the next write goes through (a new burst would be
        // logged again).
        d.state.fail_writes(None);
        add(&mem, &mut q, 2, VIRTIO_BLK_T_OUT);
        d.block.process_queue(0);
        assert_eq!(status(&mem, 2), VIRTIO_BLK_S_OK);
        assert_eq!(d.state.data.lock().unwrap()[1024], 0x42);
        assert_eq!(d.block.counters().writes, 1);
    }

    #[test]
    fn stop_keeps_the_failed_write_in_the_ring_until_a_retry_succeeds() {
        let mut d = disk(ErrorPolicy::Stop, ErrorPolicy::Report);
        let mem = guest_memory();
        let mut q = TestQueue::new(&mem, 16);
        activate(&mut d.block, &mem, &q);
        add(&mem, &mut q, 0, VIRTIO_BLK_T_OUT);
        d.block.process_queue(0);
        assert_eq!(status(&mem, 0), VIRTIO_BLK_S_OK, "before the fault");
        d.state.fail_writes(Some(ENOSPC));
        add(&mem, &mut q, 1, VIRTIO_BLK_T_OUT);
        add(&mem, &mut q, 2, VIRTIO_BLK_T_OUT);
        d.block.process_queue(0);
        // Not completed, not failed: the guest sees nothing.
        assert_eq!(q.used().len(), 1);
        assert_eq!(status(&mem, 1), 0xff);
        assert_eq!(status(&mem, 2), 0xff);
        let why = d.block.stopped().expect("stopped").to_string();
        assert!(why.starts_with("write failed: No space left"), "{why}");
        assert!(d.flag.swap(false, Ordering::SeqCst), "the VMM is told");
        assert_eq!(d.wake.read().unwrap(), 1);
        assert_eq!(d.block.held_requests(), 0, "io=sync: back in the ring");
        // Stopped: notifications do nothing.
        d.block.process_queue(0);
        assert_eq!(q.used().len(), 1);
        // Still failing: the retry says so and the disk stays stopped,
        // without a second notice.
        let again = d.block.retry().unwrap_err();
        assert!(again.starts_with("write failed"), "{again}");
        assert!(d.block.stopped().is_some());
        assert!(!d.flag.load(Ordering::SeqCst));
        assert_eq!(q.used().len(), 1);
        // Fixed: both writes go through, in order.
        d.state.fail_writes(None);
        d.block.retry().unwrap();
        assert!(d.block.stopped().is_none());
        assert_eq!(q.used().len(), 3);
        assert_eq!((status(&mem, 1), status(&mem, 2)), (0, 0));
        let data = d.state.data.lock().unwrap();
        assert_eq!((data[512], data[1024]), (0x41, 0x42));
        assert_eq!(d.block.counters().errors, 0, "nothing was reported failed");
    }

    #[test]
    fn enospc_stops_on_a_full_disk_and_reports_other_failures() {
        let mut d = disk(ErrorPolicy::Enospc, ErrorPolicy::Report);
        let mem = guest_memory();
        let mut q = TestQueue::new(&mem, 16);
        activate(&mut d.block, &mem, &q);
        d.state.fail_writes(Some(EIO));
        add(&mem, &mut q, 0, VIRTIO_BLK_T_FLUSH);
        d.block.process_queue(0);
        assert_eq!(status(&mem, 0), VIRTIO_BLK_S_IOERR, "EIO is reported");
        assert!(d.block.stopped().is_none());
        d.state.fail_writes(Some(ENOSPC));
        add(&mem, &mut q, 1, VIRTIO_BLK_T_FLUSH);
        d.block.process_queue(0);
        assert_eq!(status(&mem, 1), 0xff, "ENOSPC stops");
        assert!(d.block.stopped().unwrap().starts_with("flush failed"));
        d.state.fail_writes(None);
        d.block.retry().unwrap();
        assert_eq!(status(&mem, 1), VIRTIO_BLK_S_OK);
    }

    #[test]
    fn rerror_stop_holds_reads_and_a_reset_forgets_the_stop() {
        let mut d = disk(ErrorPolicy::Report, ErrorPolicy::Stop);
        let mem = guest_memory();
        let mut q = TestQueue::new(&mem, 16);
        activate(&mut d.block, &mem, &q);
        d.state.fail_reads(Some(EIO));
        add(&mem, &mut q, 0, VIRTIO_BLK_T_IN);
        d.block.process_queue(0);
        assert_eq!(status(&mem, 0), 0xff);
        assert!(d.block.stopped().unwrap().starts_with("read failed"));
        // Writes follow werror = report; the stopped disk takes none.
        d.state.fail_reads(None);
        d.block.reset();
        assert!(d.block.stopped().is_none(), "the driver is gone");
        assert!(d.block.retry().is_ok());
    }
}
