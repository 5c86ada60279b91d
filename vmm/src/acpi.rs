//! The guest's ACPI tables: what ember-acpi needs to know about this VM,
//! and the tables written into the legacy BIOS area for Linux to find
//! through `boot_params.acpi_rsdp_addr`.

use ember_acpi::{Machine, Node, Window};
use ember_memory::{layout, GuestMemoryMmap, MemoryLayout};
use vm_memory::{Bytes, GuestAddress};

use crate::{Error, Vmm};

/// Whether the guest will use ACPI: unless its command line says
/// `acpi=off` (it then finds its CPUs in the MP table, and PCI through
/// configuration mechanism #1).
pub fn guest_uses_acpi(cmdline: &str) -> bool {
    !cmdline.split_whitespace().any(|w| w == "acpi=off")
}

/// The machine the tables describe.
pub fn machine(
    ml: &MemoryLayout,
    vcpus: u8,
    numa: Vec<Node>,
    mmio: &[crate::virtio_devices::MmioPlacement],
) -> Machine {
    Machine {
        cpus: vcpus,
        lapic_addr: u32::try_from(layout::APIC_START).unwrap_or(0),
        ioapic_addr: u32::try_from(layout::IOAPIC_START).unwrap_or(0),
        ecam: Window {
            base: layout::PCI_MMCONFIG_START,
            size: layout::PCI_MMCONFIG_SIZE,
        },
        mmio32: Window {
            base: layout::MMIO32_BAR_START,
            size: layout::MMIO32_BAR_END - layout::MMIO32_BAR_START,
        },
        mmio64: Window {
            base: ml.mmio64_start(),
            size: crate::pci::MMIO64_SIZE,
        },
        sleep_port: layout::ACPI_SLEEP_PORT,
        power_button_gsi: layout::POWER_BUTTON_IRQ,
        numa,
        virtio_mmio: mmio
            .iter()
            .map(|p| ember_acpi::VirtioMmio {
                window: Window {
                    base: p.base,
                    size: layout::VIRTIO_MMIO_WINDOW,
                },
                gsi: p.irq,
            })
            .collect(),
    }
}

/// The guest's NUMA nodes as the tables describe them.
pub fn nodes(ml: &MemoryLayout, numa: &[crate::config::NumaNode]) -> Vec<Node> {
    numa.iter()
        .zip(crate::memory::node_windows(ml, numa))
        .map(|(n, memory)| Node {
            cpus: n.cpus.clone(),
            memory,
            distances: n.distances.clone(),
        })
        .collect()
}

/// Builds the tables of `m` and writes them at [`layout::ACPI_START`];
/// returns the RSDP's address.
pub fn write_tables(mem: &GuestMemoryMmap, m: &Machine) -> Result<u64, Error> {
    let room = usize::try_from(layout::ACPI_END - layout::ACPI_START).unwrap_or(0);
    let tables =
        ember_acpi::build(m, layout::ACPI_START, room).map_err(|e| Error::Acpi(e.to_string()))?;
    mem.write_slice(&tables.image, GuestAddress(tables.base))
        .map_err(|e| Error::Acpi(format!("cannot write the tables into guest memory: {e}")))?;
    let names: Vec<String> = tables
        .tables
        .iter()
        .map(|t| String::from_utf8_lossy(&t.signature).trim().to_string())
        .collect();
    log::debug!(
        "ACPI tables at {:#x} ({} bytes): {}",
        tables.base,
        tables.image.len(),
        names.join(" ")
    );
    Ok(tables.rsdp)
}

impl Vmm {
    /// Presses the ACPI power button: raises its GSI, the DSDT's Generic
    /// Event Device notifies `\_SB.PWRB`, and the guest's button driver
    /// reports the press (a guest that handles it shuts down and powers
    /// off through the sleep register). An `acpi=off` guest has no button.
    pub fn press_power_button(&self) -> crate::Result<()> {
        let button = self.power_button.as_ref().ok_or_else(|| {
            Error::Guest(
                "the guest has no ACPI power button: its command line says acpi=off".into(),
            )
        })?;
        button
            .write(1)
            .map_err(|e| Error::Guest(format!("power button: {e}")))?;
        log::info!("pressed the guest's ACPI power button");
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn acpi_is_on_unless_the_command_line_turns_it_off() {
        assert!(guest_uses_acpi("console=ttyS0 reboot=k"));
        assert!(guest_uses_acpi("console=ttyS0 noacpi=off"));
        assert!(!guest_uses_acpi("console=ttyS0 acpi=off quiet"));
    }

    #[test]
    fn tables_land_in_guest_memory_at_the_rsdp() {
        let ml = MemoryLayout::new(128).unwrap();
        let mem = ml.create_guest_memory().unwrap();
        let rsdp = write_tables(&mem, &machine(&ml, 2, Vec::new(), &[])).unwrap();
        assert_eq!(rsdp, layout::ACPI_START);
        let mut sig = [0u8; 8];
        mem.read_slice(&mut sig, GuestAddress(rsdp)).unwrap();
        assert_eq!(&sig, b"RSD PTR ");
    }
}
