//! The x86_64 guest physical address space, in one place.
//!
//! ```text
//! 0x0000_0000 - 0x0009_FBFF  low RAM: GDT, IDT, zero page, page tables, command line
//! 0x0009_FC00 - 0x0009_FFFF  EBDA: the MP table
//! 0x000A_0000 - 0x000F_FFFF  legacy VGA / BIOS area (not RAM in the e820 map):
//!                            ACPI tables from 0xE_0000, MP table at 0xF_0000
//! 0x0010_0000 - 0xBFFF_FFFF  RAM (kernel at 1 MiB or where its ELF headers say)
//! 0xC000_0000 - 0xFFFF_FFFF  32-bit MMIO hole: PCI BARs, MMCONFIG at
//!                            0xE000_0000 (reserved in the e820 map), IOAPIC, LAPIC
//! 0x1_0000_0000 -            RAM above 4 GiB, then 64-bit BARs above the end of RAM
//! ```

/// Start of guest RAM.
pub const RAM_START: u64 = 0;

/// The GDT used for 64-bit boot.
pub const BOOT_GDT_START: u64 = 0x500;
/// Number of entries in the boot GDT (null, code, data, TSS).
pub const BOOT_GDT_ENTRIES: usize = 4;
/// The (empty) IDT used for boot.
pub const BOOT_IDT_START: u64 = 0x520;
/// Initial stack pointer of the boot vCPU.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// The zero page: Linux `boot_params`.
pub const ZERO_PAGE_START: u64 = 0x7000;
/// The PVH boot's `hvm_start_info`, memory map and module list (one page).
pub const PVH_INFO_START: u64 = 0x6000;
/// Identity page tables: PML4.
pub const PML4_START: u64 = 0x9000;
/// Identity page tables: the one PDPT.
pub const PDPTE_START: u64 = 0xa000;
/// Identity page tables: page directories (one per identity-mapped GiB).
pub const PDE_START: u64 = 0xb000;
/// How many GiB the boot page tables identity-map with 2 MiB pages (the
/// whole 32-bit space, so code running before the kernel's own page tables
/// can reach the MMIO hole).
pub const IDENTITY_MAP_GIB: u64 = 4;
/// The kernel command line.
pub const CMDLINE_START: u64 = 0x2_0000;
/// Largest command line accepted (Linux x86 COMMAND_LINE_SIZE).
pub const CMDLINE_MAX_SIZE: usize = 2048;
/// Extended BIOS data area, where the MP table lives.
pub const EBDA_START: u64 = 0x9_fc00;
/// End of the low RAM region (where the legacy VGA/BIOS area starts).
pub const LOW_RAM_END: u64 = 0xa_0000;
/// The ACPI tables (RSDP first) in the legacy BIOS area.
pub const ACPI_START: u64 = 0xe_0000;
/// End (exclusive) of the ACPI tables' room: where the MP table starts.
pub const ACPI_END: u64 = 0xf_0000;
/// Start of high memory: where kernels are loaded.
pub const HIMEM_START: u64 = 0x10_0000;

/// Start of the 32-bit MMIO hole.
pub const MMIO_HOLE_START: u64 = 0xc000_0000;
/// End (exclusive) of the 32-bit MMIO hole: 4 GiB.
pub const MMIO_HOLE_END: u64 = 0x1_0000_0000;
/// Size of the 32-bit MMIO hole.
pub const MMIO_HOLE_SIZE: u64 = MMIO_HOLE_END - MMIO_HOLE_START;
/// Where 32-bit PCI BARs are allocated: from the hole's start up to the
/// virtio-mmio windows.
pub const MMIO32_BAR_START: u64 = MMIO_HOLE_START;
/// End (exclusive) of the 32-bit BAR window.
pub const MMIO32_BAR_END: u64 = VIRTIO_MMIO_START;
/// virtio-mmio register windows, one page each, from here up to the
/// MMCONFIG area (outside the PCI host bridge's windows).
pub const VIRTIO_MMIO_START: u64 = 0xd000_0000;
/// The size of one virtio-mmio window.
pub const VIRTIO_MMIO_WINDOW: u64 = 0x1000;
/// The IOAPIC pins virtio-mmio devices take, in order: the free ISA IRQs
/// first (a guest without ACPI reaches those through the MP table), then
/// the pins above 15 (described in the DSDT).
pub const VIRTIO_MMIO_IRQS: [u32; 17] = [
    5, 6, 7, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22,
];
/// How many of [`VIRTIO_MMIO_IRQS`] a guest without ACPI can use.
pub const VIRTIO_MMIO_ISA_IRQS: usize = 10;
/// The PCI MMCONFIG (ECAM) area: configuration space by MMIO.
pub const PCI_MMCONFIG_START: u64 = 0xe000_0000;
/// Its size: bus 0 only (1 MiB per bus).
pub const PCI_MMCONFIG_SIZE: u64 = 1 << 20;
/// The hardware-reduced ACPI sleep control (and, next, status) register.
pub const ACPI_SLEEP_PORT: u16 = 0x600;
/// The IOAPIC's MMIO window.
pub const IOAPIC_START: u64 = 0xfec0_0000;
/// The local APIC's MMIO window.
pub const APIC_START: u64 = 0xfee0_0000;

/// KVM's TSS region (three pages), placed just below the IOAPIC window.
pub const KVM_TSS_ADDRESS: u64 = 0xfeff_d000;
/// KVM's identity-map page, placed just below the TSS.
pub const KVM_IDENTITY_MAP_ADDRESS: u64 = 0xfeff_c000;

/// GSI of the first serial port (COM1).
pub const SERIAL_IRQ: u32 = 4;
/// The i8042 keyboard's IOAPIC pin (IRQ 1, as on every PC).
pub const KEYBOARD_IRQ: u32 = 1;
/// The IOAPIC pin of the ACPI power button's event (the DSDT's GED0):
/// the last pin, so the ones below stay in one run for other devices.
pub const POWER_BUTTON_IRQ: u32 = 23;
/// Number of IOAPIC pins KVM's in-kernel IOAPIC has.
pub const IOAPIC_PINS: u32 = 24;

// The layout is checked when the crate compiles: nothing below overlaps.
const _: () = {
    assert!(BOOT_GDT_START + 8 * BOOT_GDT_ENTRIES as u64 <= BOOT_IDT_START);
    assert!(ZERO_PAGE_START + 4096 <= PML4_START);
    assert!(BOOT_IDT_START + 8 <= PVH_INFO_START && PVH_INFO_START + 4096 <= ZERO_PAGE_START);
    assert!(BOOT_STACK_POINTER < PML4_START);
    assert!(PML4_START + 4096 <= PDPTE_START);
    assert!(PDPTE_START + 4096 <= PDE_START);
    assert!(PDE_START + IDENTITY_MAP_GIB * 4096 <= CMDLINE_START);
    assert!(CMDLINE_START + CMDLINE_MAX_SIZE as u64 <= EBDA_START);
    assert!(EBDA_START < LOW_RAM_END && LOW_RAM_END <= HIMEM_START);
    assert!(ACPI_START >= LOW_RAM_END && ACPI_END <= HIMEM_START);
    assert!(MMIO32_BAR_END <= VIRTIO_MMIO_START);
    assert!(
        VIRTIO_MMIO_START + VIRTIO_MMIO_IRQS.len() as u64 * VIRTIO_MMIO_WINDOW
            <= PCI_MMCONFIG_START
    );
    assert!(PCI_MMCONFIG_START + PCI_MMCONFIG_SIZE <= IOAPIC_START);
    assert!(MMIO32_BAR_END <= IOAPIC_START && IOAPIC_START < APIC_START);
    assert!(KVM_IDENTITY_MAP_ADDRESS + 4096 <= KVM_TSS_ADDRESS);
    assert!(POWER_BUTTON_IRQ < IOAPIC_PINS);
    assert!(KVM_TSS_ADDRESS >= APIC_START + 4096);
    assert!(KVM_TSS_ADDRESS + 3 * 4096 <= MMIO_HOLE_END);
};
