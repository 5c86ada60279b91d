//! Putting a virtio device before the guest, for every device type: on the
//! PCI bus (BAR, MSI-X vectors, ioeventfds, PCI slot, MMIO range) or on
//! virtio-mmio (register window, interrupt line, ioeventfds), and its
//! event-loop subscriber.

use std::sync::{Arc, Mutex};

use ember_memory::{layout, GuestMemoryMmap};
use ember_pci::PciBus;
use ember_virtio::{QueueEvents, VirtioDevice, VirtioPciDevice, VIRTIO_BAR_SIZE};
use kvm_ioctls::{IoEventAddress, NoDatamatch, VmFd};
use vm_device::bus::{MmioAddress, MmioRange};
use vm_device::device_manager::{IoManager, MmioManager};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

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
    /// With `transport = mmio`: where the devices go instead of the PCI bus.
    pub mmio: Option<MmioSlots>,
}

/// One virtio-mmio device's place.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MmioPlacement {
    /// The device's name (`virtio-blk0`).
    pub name: String,
    /// Its register window's address ([`layout::VIRTIO_MMIO_WINDOW`] bytes).
    pub base: u64,
    /// Its IOAPIC pin.
    pub irq: u32,
}

/// Hands out virtio-mmio windows and interrupt lines, in device order
/// (the same configuration always gets the same places: a restored VM
/// finds its devices where the guest left them).
#[derive(Debug)]
pub struct MmioSlots {
    placed: Vec<MmioPlacement>,
    isa_only: bool,
}

impl MmioSlots {
    /// Slots for a guest that uses ACPI (every line in
    /// [`layout::VIRTIO_MMIO_IRQS`], described in the DSDT) or not (the
    /// ISA lines the MP table routes, announced on the command line).
    pub fn new(acpi: bool) -> Self {
        MmioSlots {
            placed: Vec::new(),
            isa_only: !acpi,
        }
    }

    fn next(&mut self, name: &str) -> Result<MmioPlacement, Error> {
        let i = self.placed.len();
        let max = if self.isa_only {
            layout::VIRTIO_MMIO_ISA_IRQS
        } else {
            layout::VIRTIO_MMIO_IRQS.len()
        };
        if i >= max {
            return Err(Error::Bus(format!(
                "{name}: virtio-mmio has {max} interrupt lines{}, and the devices before it took them all (use fewer devices, or transport = pci)",
                if self.isa_only { " without ACPI" } else { "" }
            )));
        }
        let place = MmioPlacement {
            name: name.to_string(),
            base: layout::VIRTIO_MMIO_START + i as u64 * layout::VIRTIO_MMIO_WINDOW,
            irq: layout::VIRTIO_MMIO_IRQS[i],
        };
        self.placed.push(place.clone());
        Ok(place)
    }

    /// The devices placed so far.
    pub fn placements(&self) -> &[MmioPlacement] {
        &self.placed
    }

    /// The kernel parameters announcing them (Linux's
    /// `virtio_mmio.device=4K@0xd0000000:5`, one each).
    pub fn cmdline_params(&self) -> String {
        self.placed
            .iter()
            .map(|p| {
                format!(
                    " virtio_mmio.device={}K@{:#x}:{}",
                    layout::VIRTIO_MMIO_WINDOW >> 10,
                    p.base,
                    p.irq
                )
            })
            .collect()
    }
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
    if ctx.mmio.is_some() {
        return attach_mmio(ctx, name, device, own_thread);
    }
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
    subscribe(ctx, name, &dev, own_thread)?;
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

/// [`attach_on`] for `transport = mmio`: the device's register window on
/// the MMIO bus, its interrupt line through an irqfd, one ioeventfd per
/// queue on the notify register matching the queue's index.
fn attach_mmio<D: VirtioDevice + 'static>(
    ctx: &mut AttachContext<'_>,
    name: &str,
    device: D,
    own_thread: bool,
) -> Result<Attached<D>, Error> {
    let place = ctx
        .mmio
        .as_mut()
        .ok_or_else(|| Error::Bus(format!("{name}: no virtio-mmio slots")))?
        .next(name)?;
    let irq = EventFd::new(EFD_NONBLOCK).map_err(|e| Error::EventFd("virtio-mmio interrupt", e))?;
    ctx.vm
        .register_irqfd(&irq, place.irq)
        .map_err(|e| Error::Kvm("KVM_IRQFD", e))?;
    let dev = VirtioPciDevice::new_mmio(name, device, ctx.mem.clone(), place.base, irq)
        .map_err(|e| Error::Bus(format!("{name}: {e}")))?;
    for (q, evt) in dev.queue_evts().iter().enumerate() {
        let addr = IoEventAddress::Mmio(dev.notify_addr(q));
        let index = dev.notify_datamatch(q).unwrap_or(0);
        ctx.vm
            .register_ioevent(evt, &addr, index)
            .map_err(|e| Error::Kvm("KVM_IOEVENTFD", e))?;
    }
    let dev = Arc::new(Mutex::new(dev));
    let range = MmioRange::new(MmioAddress(place.base), layout::VIRTIO_MMIO_WINDOW)
        .map_err(|e| Error::Bus(format!("{name}: {e:?}")))?;
    ctx.io
        .register_mmio(range, dev.clone())
        .map_err(|e| Error::Bus(format!("{name}: {e:?}")))?;
    subscribe(ctx, name, &dev, own_thread)?;
    log::info!(
        "{name}: virtio-mmio at {:#x}, IRQ {}{}",
        place.base,
        place.irq,
        if own_thread {
            ", on its own I/O thread"
        } else {
            ""
        }
    );
    Ok(dev)
}

/// The device's queue (and backend) events go to the event loop's
/// subscribers, or to an I/O thread of its own.
fn subscribe<D: VirtioDevice + 'static>(
    ctx: &mut AttachContext<'_>,
    name: &str,
    dev: &Attached<D>,
    own_thread: bool,
) -> Result<(), Error> {
    let events = QueueEvents::new(dev.clone()).map_err(|e| Error::EventFd("virtio queue", e))?;
    let events: Subscriber = Arc::new(Mutex::new(events));
    if own_thread {
        ctx.io_threads.push((name.to_string(), events));
    } else {
        ctx.subscribers.push(events);
    }
    Ok(())
}
