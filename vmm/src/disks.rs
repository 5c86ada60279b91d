//! virtio-blk disks on the PCI bus.

use std::sync::{Arc, Mutex};

use ember_memory::GuestMemoryMmap;
use ember_pci::PciBus;
use ember_virtio::{QueueEvents, VirtioDevice, VirtioPciDevice, VIRTIO_BAR_SIZE};
use ember_virtio_blk::{Block, BlockConfig};
use kvm_ioctls::{IoEventAddress, NoDatamatch, VmFd};
use vm_device::bus::{MmioAddress, MmioRange};
use vm_device::device_manager::{IoManager, MmioManager};

use crate::config::DiskConfig;
use crate::pci::{BarAllocator, DeviceMsi, MsiRoutes};
use crate::Error;

/// A disk as the VM holds it.
pub type DiskDevice = Arc<Mutex<VirtioPciDevice<Block>>>;

/// What the disks need from the VM being built.
pub struct DiskContext<'a> {
    /// The VM, for ioeventfds.
    pub vm: &'a VmFd,
    /// Guest memory.
    pub mem: &'a GuestMemoryMmap,
    /// The MMIO bus.
    pub io: &'a mut IoManager,
    /// The PCI bus.
    pub bus: &'a Mutex<PciBus>,
    /// BAR addresses.
    pub bars: &'a mut BarAllocator,
    /// MSI routes.
    pub routes: &'a Arc<MsiRoutes>,
}

/// Creates one virtio-blk PCI function per disk, in order (the guest sees
/// them as vda, vdb, ...), and returns them with their event-loop subscribers.
pub fn create_disks(
    ctx: &mut DiskContext<'_>,
    disks: &[DiskConfig],
) -> Result<(Vec<DiskDevice>, Vec<QueueEvents<Block>>), Error> {
    let mut devices = Vec::with_capacity(disks.len());
    let mut subscribers = Vec::with_capacity(disks.len());
    for (index, d) in disks.iter().enumerate() {
        let block = Block::new(&BlockConfig {
            path: d.path.clone(),
            read_only: d.read_only,
            id: d.id.clone(),
        })
        .map_err(|source| Error::Disk { index, source })?;
        let vectors = u16::try_from(block.queue_max_sizes().len() + 1).unwrap_or(u16::MAX);
        let msi = Arc::new(DeviceMsi::new(ctx.routes, vectors)?);
        let bar = ctx.bars.allocate64(VIRTIO_BAR_SIZE)?;
        let name = format!("virtio-blk{index}");
        let dev = VirtioPciDevice::new(&name, block, ctx.mem.clone(), bar, msi)
            .map_err(|e| Error::Bus(format!("{name}: {e}")))?;
        for (q, evt) in dev.queue_evts().iter().enumerate() {
            ctx.vm
                .register_ioevent(evt, &IoEventAddress::Mmio(dev.notify_addr(q)), NoDatamatch)
                .map_err(|e| Error::Kvm("KVM_IOEVENTFD", e))?;
        }
        let dev = Arc::new(Mutex::new(dev));
        let slot = ctx
            .bus
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .add_device(dev.clone())
            .map_err(|e| Error::Bus(format!("{name}: {e}")))?;
        let range = MmioRange::new(MmioAddress(bar), VIRTIO_BAR_SIZE)
            .map_err(|e| Error::Bus(format!("{name}: {e:?}")))?;
        ctx.io
            .register_mmio(range, dev.clone())
            .map_err(|e| Error::Bus(format!("{name}: {e:?}")))?;
        log::info!(
            "{name}: {} at 00:{slot:02x}.0, BAR {bar:#x}{}",
            d.path.display(),
            if d.read_only { ", read-only" } else { "" }
        );
        subscribers
            .push(QueueEvents::new(dev.clone()).map_err(|e| Error::EventFd("virtio queue", e))?);
        devices.push(dev);
    }
    Ok((devices, subscribers))
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
