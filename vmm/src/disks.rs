//! virtio-blk disks on the PCI bus.

use std::sync::{Arc, Mutex};

use ember_virtio::VirtioPciDevice;
use ember_virtio_blk::{Block, BlockConfig};

use crate::config::DiskConfig;
use crate::virtio_devices::{attach, AttachContext};
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
            path: d.path.clone(),
            read_only: d.read_only,
            id: d.id.clone(),
        })
        .map_err(|source| Error::Disk { index, source })?;
        let name = format!("virtio-blk{index}");
        let dev = attach(ctx, &name, block)?;
        log::info!(
            "{name}: {}{}",
            d.path.display(),
            if d.read_only { ", read-only" } else { "" }
        );
        devices.push(dev);
    }
    Ok(devices)
}

/// Logs every disk's counters (at exit, `--log-level info`).
pub fn log_counters(disks: &[DiskDevice]) {
    for (i, d) in disks.iter().enumerate() {
        let c = d
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .device()
            .counters();
        log::info!(
            "virtio-blk{i}: {} reads {} bytes, {} writes {} bytes, {} flushes, {} other, {} errors, {} interrupts",
            c.reads,
            c.read_bytes,
            c.writes,
            c.write_bytes,
            c.flushes,
            c.other,
            c.errors,
            c.interrupts
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
