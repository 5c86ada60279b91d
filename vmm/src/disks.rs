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
