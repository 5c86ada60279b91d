//! The PCI side of the VM: the bus on config mechanism #1, BAR addresses,
//! and MSI-X delivered through KVM GSI routes and irqfds.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use ember_memory::{layout, MemoryLayout};
use ember_pci::{
    BarMove, MsiMessage, MsiSink, PciBus, PciConfigIo, PciConfigMmio, PCI_CONFIG_IO_PORT,
    PCI_CONFIG_IO_PORT_SIZE,
};
use kvm_bindings::{
    kvm_irq_routing_entry, kvm_irq_routing_irqchip, kvm_irq_routing_msi, KvmIrqRouting,
    KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE, KVM_IRQ_ROUTING_IRQCHIP,
    KVM_IRQ_ROUTING_MSI,
};
use kvm_ioctls::VmFd;
use vm_allocator::{AddressAllocator, AllocPolicy};
use vm_device::bus::{MmioAddress, MmioRange, PioAddress, PioAddressOffset, PioRange};
use vm_device::device_manager::{IoManager, MmioManager, PioManager};
use vm_device::MutDevicePio;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::Error;

/// The first GSI given to MSI-X vectors (after the IOAPIC's pins).
const FIRST_MSI_GSI: u32 = layout::IOAPIC_PINS;
/// Space for 64-bit BARs above RAM.
pub const MMIO64_SIZE: u64 = 1 << 36;

/// The VM's GSI routing table: KVM's default irqchip routes plus one MSI
/// route per configured vector. KVM_SET_GSI_ROUTING replaces the whole
/// table, so it is kept here and sent whole on every change.
pub struct MsiRoutes {
    vm: Arc<VmFd>,
    msi: Mutex<BTreeMap<u32, MsiMessage>>,
    next_gsi: Mutex<u32>,
}

impl std::fmt::Debug for MsiRoutes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MsiRoutes").finish_non_exhaustive()
    }
}

fn irqchip_entry(gsi: u32, chip: u32, pin: u32) -> kvm_irq_routing_entry {
    let mut e = kvm_irq_routing_entry {
        gsi,
        type_: KVM_IRQ_ROUTING_IRQCHIP,
        ..Default::default()
    };
    e.u.irqchip = kvm_irq_routing_irqchip { irqchip: chip, pin };
    e
}

fn msi_entry(gsi: u32, msg: MsiMessage) -> kvm_irq_routing_entry {
    let mut e = kvm_irq_routing_entry {
        gsi,
        type_: KVM_IRQ_ROUTING_MSI,
        ..Default::default()
    };
    e.u.msi = kvm_irq_routing_msi {
        address_lo: u32::try_from(msg.addr & 0xffff_ffff).unwrap_or(0),
        address_hi: u32::try_from(msg.addr >> 32).unwrap_or(0),
        data: msg.data,
        ..Default::default()
    };
    e
}

/// KVM's default routing (virt/kvm/irqchip.c): GSI 0-15 to the PIC and the
/// IOAPIC pin of the same number, 16-23 to the IOAPIC only.
fn default_routes() -> Vec<kvm_irq_routing_entry> {
    let mut v = Vec::new();
    for gsi in 0..layout::IOAPIC_PINS {
        v.push(irqchip_entry(gsi, KVM_IRQCHIP_IOAPIC, gsi));
        if gsi < 16 {
            let chip = if gsi < 8 {
                KVM_IRQCHIP_PIC_MASTER
            } else {
                KVM_IRQCHIP_PIC_SLAVE
            };
            v.push(irqchip_entry(gsi, chip, gsi % 8));
        }
    }
    v
}

impl MsiRoutes {
    /// Routes for `vm`.
    pub fn new(vm: Arc<VmFd>) -> Self {
        MsiRoutes {
            vm,
            msi: Mutex::new(BTreeMap::new()),
            next_gsi: Mutex::new(FIRST_MSI_GSI),
        }
    }

    fn allocate_gsi(&self) -> u32 {
        let mut next = self.next_gsi.lock().unwrap_or_else(|e| e.into_inner());
        let gsi = *next;
        *next += 1;
        gsi
    }

    fn set(&self, gsi: u32, msg: MsiMessage) -> std::io::Result<()> {
        let mut msi = self.msi.lock().unwrap_or_else(|e| e.into_inner());
        msi.insert(gsi, msg);
        let mut entries = default_routes();
        entries.extend(msi.iter().map(|(&g, &m)| msi_entry(g, m)));
        let routing = KvmIrqRouting::from_entries(&entries)
            .map_err(|_| std::io::Error::other("too many GSI routes"))?;
        self.vm
            .set_gsi_routing(&routing)
            .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))
    }
}

/// The MSI-X vectors of one device: a GSI and an irqfd per vector.
pub struct DeviceMsi {
    routes: Arc<MsiRoutes>,
    vectors: Vec<(u32, EventFd)>,
}

impl std::fmt::Debug for DeviceMsi {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeviceMsi")
            .field("vectors", &self.vectors.len())
            .finish_non_exhaustive()
    }
}

impl DeviceMsi {
    /// Allocates `count` GSIs and registers an irqfd for each.
    pub fn new(routes: &Arc<MsiRoutes>, count: u16) -> Result<Self, Error> {
        let mut vectors = Vec::with_capacity(usize::from(count));
        for _ in 0..count {
            let gsi = routes.allocate_gsi();
            let evt = EventFd::new(EFD_NONBLOCK).map_err(|e| Error::EventFd("MSI-X vector", e))?;
            routes
                .vm
                .register_irqfd(&evt, gsi)
                .map_err(|e| Error::Kvm("KVM_IRQFD", e))?;
            vectors.push((gsi, evt));
        }
        Ok(DeviceMsi {
            routes: routes.clone(),
            vectors,
        })
    }
}

impl MsiSink for DeviceMsi {
    fn configure(&self, vector: u16, msg: MsiMessage) -> std::io::Result<()> {
        match self.vectors.get(usize::from(vector)) {
            Some((gsi, _)) => self.routes.set(*gsi, msg),
            None => Ok(()),
        }
    }

    fn fire(&self, vector: u16) -> std::io::Result<()> {
        match self.vectors.get(usize::from(vector)) {
            Some((_, evt)) => evt.write(1),
            None => Ok(()),
        }
    }
}

/// Hands out BAR addresses: 32-bit BARs in the MMIO hole, 64-bit BARs above RAM.
#[derive(Debug)]
pub struct BarAllocator {
    mmio64: AddressAllocator,
}

impl BarAllocator {
    /// The windows for a guest with layout `ml`.
    pub fn new(ml: &MemoryLayout) -> Result<Self, Error> {
        let mmio64 = AddressAllocator::new(ml.mmio64_start(), MMIO64_SIZE)
            .map_err(|e| Error::Bus(format!("64-bit BAR window: {e}")))?;
        Ok(BarAllocator { mmio64 })
    }

    /// A naturally aligned 64-bit BAR of `size` bytes.
    pub fn allocate64(&mut self, size: u64) -> Result<u64, Error> {
        self.mmio64
            .allocate(size, size, AllocPolicy::FirstMatch)
            .map(|r| r.start())
            .map_err(|e| Error::Bus(format!("no room for a {size:#x}-byte BAR: {e}")))
    }
}

/// Creates the PCI bus (host bridge at 00:00.0); devices are added to it,
/// then [`attach_config_ports`] makes it visible to the guest.
pub fn create_bus() -> Arc<Mutex<PciBus>> {
    Arc::new(Mutex::new(PciBus::new()))
}

/// Ports 0xCF8-0xCFF of a VM without a PCI bus: reads float high (all
/// ones) and writes are dropped, as on a machine without a PCI host bridge.
/// Linux probes these ports at boot (and finds no configuration mechanism);
/// answering them keeps its probe out of the unhandled-port warnings.
struct NoPciBus;

impl MutDevicePio for NoPciBus {
    fn pio_read(&mut self, _base: PioAddress, _offset: PioAddressOffset, data: &mut [u8]) {
        data.fill(0xff);
    }

    fn pio_write(&mut self, _base: PioAddress, _offset: PioAddressOffset, _data: &[u8]) {}
}

/// Puts `bus` on configuration mechanism #1 (ports 0xCF8-0xCFF) and on
/// MMCONFIG if the guest uses ACPI (whose DSDT names the host bridge) or
/// any device was added to it; returns whether it did. A guest with
/// `acpi=off` and no devices finds no PCI at all, as on a VMM without a PCI
/// bus: Linux then skips the scan of bus 0 and the host bridge's set-up,
/// which take 0.4 s of emulated guest time on a software hypervisor
/// (docs/performance.md).
pub fn attach_config_ports(
    io: &mut IoManager,
    bus: &Arc<Mutex<PciBus>>,
    acpi: bool,
) -> Result<bool, Error> {
    let devices = bus.lock().map(|b| b.device_count()).unwrap_or(0);
    let range = PioRange::new(PioAddress(PCI_CONFIG_IO_PORT), PCI_CONFIG_IO_PORT_SIZE)
        .map_err(|e| Error::Bus(format!("{e:?}")))?;
    if devices == 0 && !acpi {
        log::info!("no PCI devices: the guest gets no PCI bus");
        io.register_pio(range, Arc::new(Mutex::new(NoPciBus)))
            .map_err(|e| Error::Bus(format!("PCI config ports: {e:?}")))?;
        return Ok(false);
    }
    let config_io = PciConfigIo::new(bus.clone(), Box::new(bar_moved));
    io.register_pio(range, Arc::new(Mutex::new(config_io)))
        .map_err(|e| Error::Bus(format!("PCI config ports: {e:?}")))?;
    let mmconfig = PciConfigMmio::new(bus.clone(), Box::new(bar_moved));
    let range = MmioRange::new(
        MmioAddress(layout::PCI_MMCONFIG_START),
        layout::PCI_MMCONFIG_SIZE,
    )
    .map_err(|e| Error::Bus(format!("{e:?}")))?;
    io.register_mmio(range, Arc::new(Mutex::new(mmconfig)))
        .map_err(|e| Error::Bus(format!("PCI MMCONFIG: {e:?}")))?;
    Ok(true)
}

fn bar_moved(dev: u8, moved: BarMove) {
    log::warn!(
        "PCI device {dev}: the guest moved BAR {} from {:#x} to {:#x}; ember does not relocate BARs yet, the device stays at its old address",
        moved.index,
        moved.old,
        moved.new
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_routes_match_kvm() {
        let r = default_routes();
        assert_eq!(r.len(), 24 + 16);
        // GSI 9 goes to IOAPIC pin 9 and slave PIC pin 1.
        let gsi9: Vec<_> = r.iter().filter(|e| e.gsi == 9).collect();
        assert_eq!(gsi9.len(), 2);
        // SAFETY: irqchip entries were written through the irqchip member.
        let pins: Vec<_> = gsi9.iter().map(|e| unsafe { e.u.irqchip }).collect();
        assert!(pins
            .iter()
            .any(|p| p.irqchip == KVM_IRQCHIP_IOAPIC && p.pin == 9));
        assert!(pins
            .iter()
            .any(|p| p.irqchip == KVM_IRQCHIP_PIC_SLAVE && p.pin == 1));
        assert!(r
            .iter()
            .filter(|e| e.gsi >= 16)
            .all(|e| e.type_ == KVM_IRQ_ROUTING_IRQCHIP));
    }

    #[test]
    fn msi_entry_splits_the_address() {
        let e = msi_entry(
            30,
            MsiMessage {
                addr: 0x1_fee0_1000,
                data: 0x4041,
            },
        );
        // SAFETY: the entry was written through the msi member.
        let m = unsafe { e.u.msi };
        assert_eq!((e.gsi, e.type_), (30, KVM_IRQ_ROUTING_MSI));
        assert_eq!(
            (m.address_lo, m.address_hi, m.data),
            (0xfee0_1000, 1, 0x4041)
        );
    }

    fn config_read_u32(io: &IoManager, device: u8, offset: u8) -> Option<u32> {
        let addr = 0x8000_0000u32 | (u32::from(device) << 11) | u32::from(offset);
        io.pio_write(PioAddress(PCI_CONFIG_IO_PORT), &addr.to_le_bytes())
            .ok()?;
        let mut data = [0u8; 4];
        io.pio_read(PioAddress(PCI_CONFIG_IO_PORT + 4), &mut data)
            .ok()?;
        Some(u32::from_le_bytes(data))
    }

    #[test]
    fn a_bus_without_devices_is_not_on_the_config_ports() {
        let mut io = IoManager::new();
        let bus = create_bus();
        assert!(!attach_config_ports(&mut io, &bus, false).unwrap());
        // No host bridge answers; and Linux's probe for mechanism #1 (write
        // 0x80000000 to 0xCF8, read it back) fails, as does #2's (bytes
        // written to 0xCF8/0xCFA read back as 0).
        assert_eq!(config_read_u32(&io, 0, 0), Some(0xffff_ffff));
        io.pio_write(
            PioAddress(PCI_CONFIG_IO_PORT),
            &0x8000_0000u32.to_le_bytes(),
        )
        .unwrap();
        let mut back = [0u8; 4];
        io.pio_read(PioAddress(PCI_CONFIG_IO_PORT), &mut back)
            .unwrap();
        assert_eq!(u32::from_le_bytes(back), 0xffff_ffff);
        io.pio_write(PioAddress(PCI_CONFIG_IO_PORT + 2), &[0])
            .unwrap();
        let mut b = [0u8; 1];
        io.pio_read(PioAddress(PCI_CONFIG_IO_PORT + 2), &mut b)
            .unwrap();
        assert_eq!(b, [0xff]);
    }

    #[test]
    fn a_bus_with_a_device_is_on_the_config_ports() {
        let mut io = IoManager::new();
        let bus = create_bus();
        let dev: Arc<Mutex<dyn ember_pci::PciDevice>> =
            Arc::new(Mutex::new(ember_pci::HostBridge::new()));
        assert_eq!(bus.lock().unwrap().add_device(dev).unwrap(), 1);
        assert!(attach_config_ports(&mut io, &bus, false).unwrap());
        // Vendor 0x8086, device 0x0d57 at 00:00.0 and at the added 00:01.0;
        // nothing at 00:02.0.
        assert_eq!(config_read_u32(&io, 0, 0), Some(0x0d57_8086));
        assert_eq!(config_read_u32(&io, 1, 0), Some(0x0d57_8086));
        assert_eq!(config_read_u32(&io, 2, 0), Some(0xffff_ffff));
    }

    #[test]
    fn an_acpi_guest_gets_the_host_bridge_on_both_mechanisms_without_devices() {
        let mut io = IoManager::new();
        let bus = create_bus();
        assert!(attach_config_ports(&mut io, &bus, true).unwrap());
        assert_eq!(config_read_u32(&io, 0, 0), Some(0x0d57_8086));
        let mut id = [0u8; 4];
        io.mmio_read(MmioAddress(layout::PCI_MMCONFIG_START), &mut id)
            .unwrap();
        assert_eq!(u32::from_le_bytes(id), 0x0d57_8086);
        // Device 1 (none) through MMCONFIG.
        io.mmio_read(MmioAddress(layout::PCI_MMCONFIG_START + (1 << 15)), &mut id)
            .unwrap();
        assert_eq!(id, [0xff; 4]);
    }

    #[test]
    fn bar_allocator_aligns_above_ram() {
        let ml = MemoryLayout::new(5120).unwrap();
        let mut a = BarAllocator::new(&ml).unwrap();
        let b1 = a.allocate64(0x8000).unwrap();
        let b2 = a.allocate64(0x8000).unwrap();
        assert!(b1 >= ml.end_of_ram());
        assert_eq!(b1 % 0x8000, 0);
        assert_eq!(b2, b1 + 0x8000);
    }
}
