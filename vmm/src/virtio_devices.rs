//! Putting a virtio device on the PCI bus, for every device type: BAR,
//! MSI-X vectors, ioeventfds, PCI slot, MMIO range, event-loop subscriber.

use std::sync::{Arc, Mutex};

use ember_memory::GuestMemoryMmap;
use ember_pci::PciBus;
use ember_virtio::{QueueEvents, VirtioDevice, VirtioPciDevice, VIRTIO_BAR_SIZE};
use kvm_ioctls::{IoEventAddress, NoDatamatch, VmFd};
use vm_device::bus::{MmioAddress, MmioRange};
use vm_device::device_manager::{IoManager, MmioManager};

use crate::event_loop::Subscriber;
use crate::pci::{BarAllocator, DeviceMsi, MsiRoutes};
use crate::Error;

/// What attaching a device needs from the VM being built.
pub struct AttachContext<'a> {
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
    /// Event-loop subscribers of the attached devices.
    pub subscribers: Vec<Subscriber>,
    /// Subscribers of devices served on I/O threads of their own, with
    /// the thread's name.
    pub io_threads: Vec<(String, Subscriber)>,
}

/// A virtio device on the PCI bus, shared by the buses and the event loop.
pub type Attached<D> = Arc<Mutex<VirtioPciDevice<D>>>;

/// Puts `device` on the PCI bus as `name` and returns it; its queue (and
/// backend) events are added to `ctx.subscribers`.
pub fn attach<D: VirtioDevice + 'static>(
    ctx: &mut AttachContext<'_>,
    name: &str,
    device: D,
) -> Result<Attached<D>, Error> {
    attach_on(ctx, name, device, false)
}

/// [`attach`], with the device's events served on an I/O thread of its own
/// (named `name`) when `own_thread`.
pub fn attach_on<D: VirtioDevice + 'static>(
    ctx: &mut AttachContext<'_>,
    name: &str,
    device: D,
    own_thread: bool,
) -> Result<Attached<D>, Error> {
    let vectors = u16::try_from(device.queue_max_sizes().len() + 1).unwrap_or(u16::MAX);
    let msi = Arc::new(DeviceMsi::new(ctx.routes, vectors)?);
    let bar = ctx.bars.allocate64(VIRTIO_BAR_SIZE)?;
    let dev = VirtioPciDevice::new(name, device, ctx.mem.clone(), bar, msi)
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
    let events = QueueEvents::new(dev.clone()).map_err(|e| Error::EventFd("virtio queue", e))?;
    let events: Subscriber = Arc::new(Mutex::new(events));
    if own_thread {
        ctx.io_threads.push((name.to_string(), events));
    } else {
        ctx.subscribers.push(events);
    }
    log::info!(
        "{name}: at 00:{slot:02x}.0, BAR {bar:#x}{}",
        if own_thread {
            ", on its own I/O thread"
        } else {
            ""
        }
    );
    Ok(dev)
}
