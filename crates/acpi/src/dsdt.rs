//! The DSDT: the devices a guest cannot probe for, in AML.
//!
//! - `\_SB.PCI0`: the PCI host bridge (PNP0A08, compatible PNP0A03) with its
//!   bus range, the config ports, the I/O window and the 32- and 64-bit
//!   memory windows; Linux finds bus 0 through it.
//! - `\_SB.MRES`: a motherboard resource (PNP0C02) holding the MMCONFIG
//!   area, which Linux wants reserved before it uses the MCFG's window.
//! - `\_SB.COM1` (PNP0501), `\_SB.PS2K` (PNP0303) and `\_SB.RTC_` (PNP0B00):
//!   the legacy devices with their ports and interrupts.
//! - `\_SB.PWRB` (PNP0C0C), the power button, and `\_SB.GED0` (ACPI0013),
//!   a Generic Event Device with one edge-triggered interrupt whose `_EVT`
//!   notifies the button (0x80, "pressed"): the one event the GED carries,
//!   so it needs no status register.
//! - `\_SB.VRnn` (LNRO0005): the virtio-mmio devices, each with its
//!   register window and interrupt.
//! - `\_S5_`: the sleep type of soft-off, for power-off through the FADT's
//!   sleep control register.

use acpi_tables::aml::{
    AddressSpace, AddressSpaceCacheable, Device, EISAName, Interrupt, Memory32Fixed, Method, Name,
    Notify, Package, Path, ResourceTemplate, Scope, IO,
};
use acpi_tables::sdt::Sdt;
use acpi_tables::Aml;

use crate::{last_bus, Machine, OEM_ID, OEM_REVISION, OEM_TABLE_ID, S5_SLEEP_TYPE};

fn legacy(name: &str, hid: &str, io: &[(u16, u8)], irq: Option<u32>) -> Vec<u8> {
    let ios: Vec<IO> = io
        .iter()
        .map(|&(port, len)| IO::new(port, port, 1, len))
        .collect();
    let int = irq.map(|n| Interrupt::new(true, true, false, false, n));
    let mut res: Vec<&dyn Aml> = ios.iter().map(|i| i as &dyn Aml).collect();
    if let Some(i) = int.as_ref() {
        res.push(i);
    }
    let hid = EISAName::new(hid);
    let crs = ResourceTemplate::new(res);
    let mut out = Vec::new();
    Device::new(
        Path::new(name),
        vec![
            &Name::new("_HID".into(), &hid),
            &Name::new("_UID".into(), &0u8),
            &Name::new("_CRS".into(), &crs),
        ],
    )
    .to_aml_bytes(&mut out);
    out
}

fn pci_host_bridge(m: &Machine) -> Vec<u8> {
    let last = last_bus(m);
    let bus = AddressSpace::<u16>::new_bus_number(0, u16::from(last));
    let cfg_ports = IO::new(0xcf8, 0xcf8, 1, 8);
    let io_low = AddressSpace::<u16>::new_io(0x0000, 0x0cf7, None);
    let io_high = AddressSpace::<u16>::new_io(0x0d00, 0xffff, None);
    // check() made sure both ends of the 32-bit window fit in 32 bits.
    let mem32 = AddressSpace::<u32>::new_memory(
        AddressSpaceCacheable::NotCacheable,
        true,
        u32::try_from(m.mmio32.base).unwrap_or(0),
        u32::try_from(m.mmio32.last()).unwrap_or(0),
        None,
    );
    let mem64 = AddressSpace::<u64>::new_memory(
        AddressSpaceCacheable::NotCacheable,
        true,
        m.mmio64.base,
        m.mmio64.last(),
        None,
    );
    let crs = ResourceTemplate::new(vec![&bus, &cfg_ports, &io_low, &io_high, &mem32, &mem64]);
    let hid = EISAName::new("PNP0A08");
    let cid = EISAName::new("PNP0A03");
    let (hid, cid, crs) = (
        Name::new("_HID".into(), &hid),
        Name::new("_CID".into(), &cid),
        Name::new("_CRS".into(), &crs),
    );
    let (adr, seg, uid, bbn) = (
        Name::new("_ADR".into(), &0u8),
        Name::new("_SEG".into(), &0u8),
        Name::new("_UID".into(), &0u8),
        Name::new("_BBN".into(), &0u8),
    );
    // With NUMA nodes, the bridge (and so every device) is in node 0.
    let pxm = Name::new("_PXM".into(), &0u8);
    let mut children: Vec<&dyn Aml> = vec![&hid, &cid, &adr, &seg, &uid, &bbn, &crs];
    if !m.numa.is_empty() {
        children.push(&pxm);
    }
    let mut out = Vec::new();
    Device::new("PCI0".into(), children).to_aml_bytes(&mut out);
    out
}

fn mmconfig_reservation(m: &Machine) -> Vec<u8> {
    // check() made sure the area lies below 4 GiB.
    let area = Memory32Fixed::new(
        false,
        u32::try_from(m.ecam.base).unwrap_or(0),
        u32::try_from(m.ecam.size).unwrap_or(0),
    );
    let crs = ResourceTemplate::new(vec![&area]);
    let hid = EISAName::new("PNP0C02");
    let mut out = Vec::new();
    Device::new(
        "MRES".into(),
        vec![
            &Name::new("_HID".into(), &hid),
            &Name::new("_UID".into(), &1u8),
            &Name::new("_CRS".into(), &crs),
        ],
    )
    .to_aml_bytes(&mut out);
    out
}

/// The power button and the Generic Event Device that presses it.
fn power_button(m: &Machine) -> Vec<u8> {
    let mut out = Vec::new();
    let pnp0c0c = EISAName::new("PNP0C0C");
    Device::new(
        "PWRB".into(),
        vec![
            &Name::new("_HID".into(), &pnp0c0c),
            &Name::new("_UID".into(), &0u8),
        ],
    )
    .to_aml_bytes(&mut out);
    // Interrupt (ResourceConsumer, Edge, ActiveHigh, Exclusive) { gsi }
    let int = Interrupt::new(true, true, false, false, m.power_button_gsi);
    let crs = ResourceTemplate::new(vec![&int]);
    let button = Path::new("\\_SB_.PWRB");
    let pressed = 0x80u8;
    let notify = Notify::new(&button, &pressed);
    Device::new(
        "GED0".into(),
        vec![
            &Name::new("_HID".into(), &"ACPI0013"),
            &Name::new("_UID".into(), &0u8),
            &Name::new("_CRS".into(), &crs),
            // _EVT (Arg0 = the GSI): the GED has only the button's.
            &Method::new("_EVT".into(), 1, true, vec![&notify]),
        ],
    )
    .to_aml_bytes(&mut out);
    out
}

/// `\_SB.VRnn` (LNRO0005, Linux's virtio_mmio ACPI id): the register
/// window and the interrupt of each virtio-mmio device.
fn virtio_mmio(m: &Machine) -> Vec<u8> {
    let mut out = Vec::new();
    for (i, d) in m.virtio_mmio.iter().enumerate() {
        // check() made sure the windows lie below 4 GiB and there are at
        // most 256 of them.
        let uid = u8::try_from(i).unwrap_or(u8::MAX);
        let window = Memory32Fixed::new(
            true,
            u32::try_from(d.window.base).unwrap_or(0),
            u32::try_from(d.window.size).unwrap_or(0),
        );
        // Interrupt (ResourceConsumer, Edge, ActiveHigh, Exclusive) { gsi }
        let int = Interrupt::new(true, true, false, false, d.gsi);
        let crs = ResourceTemplate::new(vec![&window, &int]);
        Device::new(
            Path::new(&format!("VR{uid:02X}")),
            vec![
                &Name::new("_HID".into(), &"LNRO0005"),
                &Name::new("_UID".into(), &uid),
                &Name::new("_CRS".into(), &crs),
            ],
        )
        .to_aml_bytes(&mut out);
    }
    out
}

/// Raw AML bytes as an `Aml` object (for a scope's children).
struct Raw(Vec<u8>);

impl Aml for Raw {
    fn to_aml_bytes(&self, sink: &mut dyn acpi_tables::AmlSink) {
        sink.vec(&self.0);
    }
}

pub(crate) fn build(m: &Machine) -> Vec<u8> {
    let mut dsdt = Sdt::new(*b"DSDT", 36, 2, OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    let devices = [
        Raw(pci_host_bridge(m)),
        Raw(mmconfig_reservation(m)),
        Raw(legacy("COM1", "PNP0501", &[(0x3f8, 8)], Some(4))),
        Raw(legacy("PS2K", "PNP0303", &[(0x60, 1), (0x64, 1)], Some(1))),
        Raw(legacy("RTC_", "PNP0B00", &[(0x70, 2)], None)),
        Raw(power_button(m)),
        Raw(virtio_mmio(m)),
    ];
    let children: Vec<&dyn Aml> = devices.iter().map(|d| d as &dyn Aml).collect();
    let mut aml = Vec::new();
    Scope::new("\\_SB_".into(), children).to_aml_bytes(&mut aml);
    // \_S5_: Package (4) { SLP_TYPa, SLP_TYPb, reserved, reserved }.
    Name::new(
        "_S5_".into(),
        &Package::new(vec![&S5_SLEEP_TYPE, &0u8, &0u8, &0u8]),
    )
    .to_aml_bytes(&mut aml);
    dsdt.append_slice(&aml);
    dsdt.as_slice().to_vec()
}
