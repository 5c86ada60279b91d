//! ACPI tables for an x86_64 microVM booted without firmware.
//!
//! [`build`] turns a [`Machine`] (its vCPUs, interrupt controllers, PCI
//! windows and MMCONFIG area, power-off port and NUMA nodes) into one image
//! of tables laid out for a guest address: the RSDP first, then the DSDT,
//! MADT, MCFG, SRAT and SLIT (with NUMA nodes), the FADT and the XSDT. The
//! VMM copies the image to that address and gives Linux the RSDP's address
//! in `boot_params.acpi_rsdp_addr`.
//!
//! The FADT is hardware-reduced (no PM timer, no GPEs, no SCI): power-off
//! goes through the sleep control register, a byte-wide port where the
//! guest writes `SLP_EN | SLP_TYP << 2` with the `_S5` type [`S5_SLEEP_TYPE`]
//! (see [`is_power_off`]). The power button is a PNP0C0C device that a
//! Generic Event Device (ACPI0013) notifies when its one interrupt,
//! [`Machine::power_button_gsi`], fires: the host presses the button by
//! raising that GSI, and the guest's ACPI button driver reports the press.
//!
//! ```
//! use ember_acpi::{build, Machine, Window};
//!
//! let m = Machine {
//!     cpus: 2,
//!     lapic_addr: 0xfee0_0000,
//!     ioapic_addr: 0xfec0_0000,
//!     ecam: Window { base: 0xe000_0000, size: 1 << 20 },
//!     mmio32: Window { base: 0xc000_0000, size: 0x2000_0000 },
//!     mmio64: Window { base: 1 << 32, size: 1 << 36 },
//!     sleep_port: 0x600,
//!     power_button_gsi: 23,
//!     numa: Vec::new(),
//!     virtio_mmio: Vec::new(),
//! };
//! let tables = build(&m, 0xe_0000, 0x1_0000).unwrap();
//! assert_eq!(tables.rsdp, 0xe_0000);
//! assert_eq!(&tables.image[..8], b"RSD PTR ");
//! assert!(tables.tables.iter().any(|t| &t.signature == b"MCFG"));
//! ```
#![forbid(unsafe_code)]

mod dsdt;
mod srat;

use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::gas::{AccessSize, AddressSpace, GAS};
use acpi_tables::madt::{
    EnabledStatus, IoApic, LocalInterruptController, ProcessorLocalApic, MADT,
};
use acpi_tables::mcfg::MCFG;
use acpi_tables::rsdp::Rsdp;
use acpi_tables::slit::SLIT;
use acpi_tables::xsdt::XSDT;
use acpi_tables::Aml;

/// The OEM id in every table header.
pub const OEM_ID: [u8; 6] = *b"EMBER ";
/// The OEM table id in every table header.
pub const OEM_TABLE_ID: [u8; 8] = *b"EMBERVM ";
/// The OEM revision in every table header.
pub const OEM_REVISION: u32 = 1;
/// The sleep type `_S5` (soft off) names, written to the sleep control
/// register shifted left by 2.
pub const S5_SLEEP_TYPE: u8 = 5;
/// The sleep control register's enable bit (ACPI 6.5, 4.8.3.7).
pub const SLEEP_ENABLE: u8 = 1 << 5;
/// The most vCPUs a MADT of 8-byte local APIC entries names (APIC ids
/// 0..=254; the IOAPIC takes the id after the last vCPU).
pub const MAX_CPUS: u8 = 254;
/// The IOAPIC's pins (GSIs 0 to 23), as KVM's in-kernel IOAPIC has them.
pub const IOAPIC_PINS: u32 = 24;
/// The most NUMA nodes (proximity domains) the tables describe.
pub const MAX_NODES: usize = 64;

/// A range of guest physical addresses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Window {
    /// First address.
    pub base: u64,
    /// Size in bytes.
    pub size: u64,
}

impl Window {
    /// The last address in the window.
    pub fn last(&self) -> u64 {
        self.base + self.size.saturating_sub(1)
    }
}

/// A NUMA node as the guest sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Node {
    /// Its vCPUs (indexes, which are also their APIC ids).
    pub cpus: Vec<u8>,
    /// Its RAM ranges.
    pub memory: Vec<Window>,
    /// Its distance to every node, by node index (10 to itself).
    pub distances: Vec<u8>,
}

/// What the tables describe.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Machine {
    /// vCPUs, with APIC ids 0 to `cpus - 1`.
    pub cpus: u8,
    /// The local APICs' MMIO address.
    pub lapic_addr: u32,
    /// The IOAPIC's MMIO address (GSI base 0, id `cpus`).
    pub ioapic_addr: u32,
    /// The PCI MMCONFIG (ECAM) area for bus 0 onwards (1 MiB per bus).
    pub ecam: Window,
    /// The 32-bit PCI memory window.
    pub mmio32: Window,
    /// The 64-bit PCI memory window.
    pub mmio64: Window,
    /// The port of the sleep control register (status at the next port).
    pub sleep_port: u16,
    /// The IOAPIC pin (edge, active high) whose interrupt means the power
    /// button was pressed.
    pub power_button_gsi: u32,
    /// NUMA nodes: none for a machine without a NUMA layout (no SRAT or
    /// SLIT), else every vCPU and every byte of RAM in exactly one node.
    pub numa: Vec<Node>,
    /// virtio-mmio devices (`LNRO0005` in the DSDT), each a register
    /// window below 4 GiB and an edge-triggered IOAPIC pin.
    pub virtio_mmio: Vec<VirtioMmio>,
}

/// One virtio-mmio device as the DSDT describes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VirtioMmio {
    /// Its register window.
    pub window: Window,
    /// Its IOAPIC pin (edge, active high).
    pub gsi: u32,
}

/// One table of the image.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TableInfo {
    /// Its signature (`RSD ` for the RSDP).
    pub signature: [u8; 4],
    /// Its guest address.
    pub addr: u64,
    /// Its length in bytes.
    pub len: usize,
}

/// The tables laid out for one guest address.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Tables {
    /// Where the image goes.
    pub base: u64,
    /// The RSDP's address (the image's start).
    pub rsdp: u64,
    /// The bytes to copy to `base`.
    pub image: Vec<u8>,
    /// Every table, in the image's order.
    pub tables: Vec<TableInfo>,
}

/// Why the tables cannot be built.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Error {
    /// No vCPU, or more than a MADT of local APIC entries names.
    #[error("ACPI tables describe 1 to {MAX_CPUS} vCPUs, not {0}")]
    Cpus(u8),
    /// The NUMA layout is inconsistent.
    #[error("NUMA layout: {0}")]
    Numa(String),
    /// The tables do not fit the space given to them.
    #[error("the ACPI tables take {len} bytes, more than the {max} bytes reserved for them")]
    TooLarge {
        /// Their size.
        len: usize,
        /// The room.
        max: usize,
    },
    /// A window does not fit where the tables must describe it.
    #[error("{0} window {1:#x}+{2:#x} cannot be described")]
    Window(&'static str, u64, u64),
    /// The power button's interrupt is not one of the IOAPIC's pins.
    #[error("the power button's GSI {0} is not an IOAPIC pin (0 to {max})", max = IOAPIC_PINS - 1)]
    Gsi(u32),
}

/// Whether a byte written to the sleep control register asks for power-off
/// (`SLP_EN` with sleep type `_S5`).
pub fn is_power_off(value: u8) -> bool {
    value & SLEEP_ENABLE != 0 && (value >> 2) & 0x7 == S5_SLEEP_TYPE
}

fn bytes(t: &dyn Aml) -> Vec<u8> {
    let mut v = Vec::new();
    t.to_aml_bytes(&mut v);
    v
}

fn check(m: &Machine) -> Result<(), Error> {
    if m.cpus == 0 || m.cpus > MAX_CPUS {
        return Err(Error::Cpus(m.cpus));
    }
    let fits32 = |w: &Window| w.base.checked_add(w.size).is_some_and(|e| e <= 1 << 32);
    if !fits32(&m.mmio32) || m.mmio32.size == 0 {
        return Err(Error::Window("32-bit PCI", m.mmio32.base, m.mmio32.size));
    }
    if !fits32(&m.ecam) || m.ecam.size < 1 << 20 || m.ecam.size % (1 << 20) != 0 {
        return Err(Error::Window("MMCONFIG", m.ecam.base, m.ecam.size));
    }
    if m.mmio64.size == 0 || m.mmio64.base.checked_add(m.mmio64.size).is_none() {
        return Err(Error::Window("64-bit PCI", m.mmio64.base, m.mmio64.size));
    }
    if m.power_button_gsi >= IOAPIC_PINS {
        return Err(Error::Gsi(m.power_button_gsi));
    }
    for d in &m.virtio_mmio {
        if !fits32(&d.window) || d.window.size == 0 {
            return Err(Error::Window("virtio-mmio", d.window.base, d.window.size));
        }
        if d.gsi >= IOAPIC_PINS || d.gsi == m.power_button_gsi {
            return Err(Error::Gsi(d.gsi));
        }
    }
    if m.virtio_mmio.len() > 256 {
        return Err(Error::Window("virtio-mmio", 0, m.virtio_mmio.len() as u64));
    }
    srat::check_nodes(m)
}

/// Lays the tables of `m` out from guest address `base`, in at most
/// `max_len` bytes.
pub fn build(m: &Machine, base: u64, max_len: usize) -> Result<Tables, Error> {
    check(m)?;
    let mut image = Vec::new();
    let mut tables = Vec::new();
    // The RSDP goes first, written once the XSDT's address is known.
    let rsdp_len = Rsdp::len();
    image.resize(rsdp_len, 0);
    tables.push(TableInfo {
        signature: *b"RSD ",
        addr: base,
        len: rsdp_len,
    });
    let mut place = |sig: [u8; 4], data: Vec<u8>, image: &mut Vec<u8>| -> u64 {
        // Tables start 16-byte aligned.
        image.resize(image.len().div_ceil(16) * 16, 0);
        let addr = base + image.len() as u64;
        tables.push(TableInfo {
            signature: sig,
            addr,
            len: data.len(),
        });
        image.extend_from_slice(&data);
        addr
    };

    let dsdt = place(*b"DSDT", dsdt::build(m), &mut image);
    let mut xsdt_entries = vec![place(*b"APIC", madt(m), &mut image)];
    xsdt_entries.push(place(*b"MCFG", mcfg(m), &mut image));
    if !m.numa.is_empty() {
        xsdt_entries.push(place(*b"SRAT", srat::build(m), &mut image));
        xsdt_entries.push(place(*b"SLIT", slit(m), &mut image));
    }
    let fadt = place(*b"FACP", fadt(m, dsdt), &mut image);
    xsdt_entries.insert(0, fadt);
    let mut xsdt = XSDT::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    for e in xsdt_entries {
        xsdt.add_entry(e);
    }
    let xsdt = place(*b"XSDT", bytes(&xsdt), &mut image);
    image[..rsdp_len].copy_from_slice(&bytes(&Rsdp::new(OEM_ID, xsdt)));
    if image.len() > max_len {
        return Err(Error::TooLarge {
            len: image.len(),
            max: max_len,
        });
    }
    Ok(Tables {
        base,
        rsdp: base,
        image,
        tables,
    })
}

fn madt(m: &Machine) -> Vec<u8> {
    let mut madt = MADT::new(
        OEM_ID,
        OEM_TABLE_ID,
        OEM_REVISION,
        LocalInterruptController::Address(m.lapic_addr),
    );
    for cpu in 0..m.cpus {
        madt.add_structure(ProcessorLocalApic::new(cpu, cpu, EnabledStatus::Enabled));
    }
    madt.add_structure(IoApic::new(m.cpus, m.ioapic_addr, 0));
    bytes(&madt)
}

fn mcfg(m: &Machine) -> Vec<u8> {
    let mut mcfg = MCFG::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    mcfg.add_ecam(m.ecam.base, 0, 0, last_bus(m));
    bytes(&mcfg)
}

/// The last bus number the MMCONFIG area covers.
fn last_bus(m: &Machine) -> u8 {
    u8::try_from((m.ecam.size >> 20).saturating_sub(1)).unwrap_or(u8::MAX)
}

fn slit(m: &Machine) -> Vec<u8> {
    let n = m.numa.len();
    // check() bounded the nodes to MAX_NODES.
    let mut slit = SLIT::new(
        OEM_ID,
        OEM_TABLE_ID,
        OEM_REVISION,
        u32::try_from(n).unwrap_or(0),
    );
    for (a, node) in m.numa.iter().enumerate() {
        for (b, &d) in node.distances.iter().enumerate().skip(a + 1) {
            slit.set_distance(a, b, d);
        }
    }
    bytes(&slit)
}

fn fadt(m: &Machine, dsdt: u64) -> Vec<u8> {
    // IA-PC boot architecture flags: an 8042 is present (bit 1), no VGA
    // (bit 2), ASPM must not be touched (bit 4).
    const IAPC_8042: u16 = 1 << 1;
    const IAPC_NO_VGA: u16 = 1 << 2;
    const IAPC_NO_ASPM: u16 = 1 << 4;
    let mut f = FADTBuilder::new(OEM_ID, OEM_TABLE_ID, OEM_REVISION)
        .dsdt_64(dsdt)
        .flag(Flags::HwReducedAcpi)
        .flag(Flags::PwrButton)
        .flag(Flags::SlpButton);
    f.iapc_boot_arch = (IAPC_8042 | IAPC_NO_VGA | IAPC_NO_ASPM).into();
    f.sleep_control_reg = GAS::new(
        AddressSpace::SystemIo,
        8,
        0,
        AccessSize::ByteAccess,
        u64::from(m.sleep_port),
    );
    f.sleep_status_reg = GAS::new(
        AddressSpace::SystemIo,
        8,
        0,
        AccessSize::ByteAccess,
        u64::from(m.sleep_port) + 1,
    );
    f.hypervisor_vendor_identity = u64::from_le_bytes(*b"EMBERVMM").into();
    bytes(&f.finalize())
}

#[cfg(test)]
mod tests;
