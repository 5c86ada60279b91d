//! virtio-blk disks on the PCI bus.

use std::sync::{Arc, Mutex};

use ember_virtio::VirtioPciDevice;
use ember_virtio_blk::{Block, BlockConfig};

use crate::config::DiskConfig;
use crate::virtio_devices::{attach_on, AttachContext};
use crate::Error;

/// A disk as the VM holds it.
pub type DiskDevice = Arc<Mutex<VirtioPciDevice<Block>>>;

/// Creates one virtio-blk PCI function per disk, in order (the guest sees
/// them as vda, vdb, ...).
pub fn create_disks(
    ctx: &mut AttachContext<'_>,
    disks: &[DiskConfig],
) -> Result<Vec<DiskDevice>, Error> {
    let mut devices = Vec::with_capacity(disks.len());
    for (index, d) in disks.iter().enumerate() {
        let block = Block::new(&BlockConfig {
            id: d.id.clone(),
            // A configuration from before multiqueue had one queue.
            num_queues: d.num_queues.unwrap_or(1),
            queue_size: d
                .queue_size
                .unwrap_or(ember_virtio_blk::request::QUEUE_SIZE),
            io: d.io,
            cache: d.cache,
            werror: d.werror,
            rerror: d.rerror,
            ..BlockConfig::new(&d.path, d.format, d.read_only)
        })
        .map_err(|source| Error::Disk { index, source })?;
        let mut block = block;
        if let Some(l) = &d.rate_limiter {
            block
                .update_rate_limit(l)
                .map_err(|source| Error::Disk { index, source })?;
        }
        let name = format!("virtio-blk{index}");
        let dev = attach_on(ctx, &name, block, d.iothread)?;
        log::info!(
            "{name}: {} ({}, {} queues){}",
            d.path.display(),
            d.format,
            d.num_queues.unwrap_or(1),
            if d.read_only { ", read-only" } else { "" }
        );
        devices.push(dev);
    }
    Ok(devices)
}

/// Logs every disk's counters (at exit, `--log-level info`).
pub fn log_counters(disks: &[DiskDevice]) {
    for (i, d) in disks.iter().enumerate() {
        let d = d.lock().unwrap_or_else(|e| e.into_inner());
        let c = d.device().counters();
        let ring = d.device().io_uring_submitted();
        log::info!(
            "virtio-blk{i}: {} reads {} bytes, {} writes {} bytes, {} flushes, {} other, {} errors, {} interrupts, io={} ({ring} through the ring)",
            c.reads,
            c.read_bytes,
            c.writes,
            c.write_bytes,
            c.flushes,
            c.other,
            c.errors,
            c.interrupts,
            d.device().io_engine()
        );
    }
}

/// Flushes every writable disk to stable storage (at exit).
pub fn flush_all(disks: &[DiskDevice]) {
    for (i, d) in disks.iter().enumerate() {
        if let Err(e) = d
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .device_mut()
            .flush()
        {
            log::error!("virtio-blk{i}: flush at exit failed: {e}");
        }
    }
}

/// Tells every disk to set `flag` and write `wake` when a request the host
/// failed stops it (`werror`/`rerror` = stop): the VMM's loop then pauses
/// the VM.
pub fn watch_stops(
    disks: &[DiskDevice],
    flag: &std::sync::Arc<std::sync::atomic::AtomicBool>,
    wake: &vmm_sys_util::eventfd::EventFd,
) -> Result<(), Error> {
    for d in disks {
        let wake = wake
            .try_clone()
            .map_err(|e| Error::EventFd("disk stop wake-up", e))?;
        d.lock()
            .unwrap_or_else(|e| e.into_inner())
            .device_mut()
            .on_stop(flag.clone(), wake);
    }
    Ok(())
}

/// The disks a failed request stopped, each as `virtio-blkN (path): why`.
pub fn stopped(disks: &[DiskDevice]) -> Vec<String> {
    disks
        .iter()
        .enumerate()
        .filter_map(|(i, d)| {
            let d = d.lock().unwrap_or_else(|e| e.into_inner());
            d.device()
                .stopped()
                .map(|why| format!("virtio-blk{i} ({}): {why}", d.device().image()))
        })
        .collect()
}

/// Runs again the requests that stopped disks (the VM is paused and about
/// to resume). An error names the disk whose request fails again: the VM
/// must stay paused.
pub fn retry_stopped(disks: &[DiskDevice]) -> Result<(), String> {
    for (i, d) in disks.iter().enumerate() {
        let mut d = d.lock().unwrap_or_else(|e| e.into_inner());
        if d.device().stopped().is_none() {
            continue;
        }
        let path = d.device().image().to_string();
        d.device_mut()
            .retry()
            .map_err(|why| format!("virtio-blk{i} ({path}): {why}"))?;
    }
    Ok(())
}

/// Refuses to save the state while a disk holds failed io_uring requests:
/// they are in no ring, so the saved VM would lose them.
pub fn check_nothing_held(disks: &[DiskDevice]) -> Result<(), Error> {
    for (i, d) in disks.iter().enumerate() {
        let d = d.lock().unwrap_or_else(|e| e.into_inner());
        let n = d.device().held_requests();
        if n > 0 {
            return Err(Error::Lifecycle(format!(
                "virtio-blk{i} holds {n} failed requests (werror/rerror = stop, io = io_uring): resume the microVM once the host's fault is fixed, then save it"
            )));
        }
    }
    Ok(())
}
