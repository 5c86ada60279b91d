//! The Intel MultiProcessor Specification 1.4 table: how a guest without
//! ACPI finds its CPUs, its IOAPIC and how ISA interrupts reach it.
//!
//! The table is built as bytes (little-endian, packed, as the spec lays it
//! out) and written into the BIOS area at [`MPTABLE_START`], where Linux's
//! `smp_scan_config` looks for the floating pointer.

use ember_memory::{layout, GuestMemoryMmap};
use vm_memory::{Bytes, GuestAddress};

use crate::{Error, Result};

/// Where the floating pointer structure goes (start of the BIOS ROM area,
/// scanned by Linux; not RAM in the e820 map).
pub const MPTABLE_START: u64 = 0xf_0000;
/// Most vCPUs the table can describe: APIC ids 0..=253, the IOAPIC takes the next id.
pub const MAX_CPUS: u8 = 254;

const SPEC_REV: u8 = 4;
const APIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = 0x11;
const CPU_ENABLED: u8 = 1;
const CPU_BOOTPROCESSOR: u8 = 2;
/// Family 6 signature and FPU + APIC feature flags, as firmware reports them.
const CPU_SIGNATURE: u32 = 0x600;
const CPU_FEATURES: u32 = (1 << 0) | (1 << 9);
const ENTRY_PROCESSOR: u8 = 0;
const ENTRY_BUS: u8 = 1;
const ENTRY_IOAPIC: u8 = 2;
const ENTRY_IO_INTERRUPT: u8 = 3;
const ENTRY_LOCAL_INTERRUPT: u8 = 4;
const INT_TYPE_INT: u8 = 0;
const INT_TYPE_NMI: u8 = 1;
const INT_TYPE_EXTINT: u8 = 3;
const BUS_ISA: u8 = 0;
const FLOATING_POINTER_LEN: usize = 16;
const HEADER_LEN: usize = 44;

fn checksum(bytes: &[u8]) -> u8 {
    bytes
        .iter()
        .fold(0u8, |acc, b| acc.wrapping_add(*b))
        .wrapping_neg()
}

/// Builds the configuration table (header and entries) for `cpus` vCPUs,
/// with the checksum filled in.
pub fn config_table(cpus: u8) -> Result<Vec<u8>> {
    if cpus == 0 || cpus > MAX_CPUS {
        return Err(Error::MpTableCpus(cpus));
    }
    let ioapic_id = cpus;
    let mut entries: Vec<u8> = Vec::new();
    let mut count: u16 = 0;
    for id in 0..cpus {
        let flags = CPU_ENABLED | if id == 0 { CPU_BOOTPROCESSOR } else { 0 };
        entries.extend([ENTRY_PROCESSOR, id, APIC_VERSION, flags]);
        entries.extend(CPU_SIGNATURE.to_le_bytes());
        entries.extend(CPU_FEATURES.to_le_bytes());
        entries.extend([0u8; 8]);
        count += 1;
    }
    entries.extend([ENTRY_BUS, BUS_ISA]);
    entries.extend(*b"ISA   ");
    count += 1;
    entries.extend([ENTRY_IOAPIC, ioapic_id, IOAPIC_VERSION, 1]);
    entries.extend(
        u32::try_from(layout::IOAPIC_START)
            .unwrap_or(0)
            .to_le_bytes(),
    );
    count += 1;
    // ISA IRQ n arrives on IOAPIC pin n, as KVM's default GSI routing has it.
    for irq in 0..16u8 {
        entries.extend([
            ENTRY_IO_INTERRUPT,
            INT_TYPE_INT,
            0,
            0,
            BUS_ISA,
            irq,
            ioapic_id,
            irq,
        ]);
        count += 1;
    }
    // LINT0: ExtINT from the PIC; LINT1: NMI; to every local APIC.
    entries.extend([
        ENTRY_LOCAL_INTERRUPT,
        INT_TYPE_EXTINT,
        0,
        0,
        BUS_ISA,
        0,
        0xff,
        0,
    ]);
    entries.extend([
        ENTRY_LOCAL_INTERRUPT,
        INT_TYPE_NMI,
        0,
        0,
        BUS_ISA,
        0,
        0xff,
        1,
    ]);
    count += 2;

    let length = u16::try_from(HEADER_LEN + entries.len()).map_err(|_| Error::MpTableCpus(cpus))?;
    let mut table = Vec::with_capacity(usize::from(length));
    table.extend(*b"PCMP");
    table.extend(length.to_le_bytes());
    table.push(SPEC_REV);
    table.push(0); // checksum, below
    table.extend(*b"EMBER   ");
    table.extend(*b"MICROVM     ");
    table.extend(0u32.to_le_bytes()); // OEM table pointer
    table.extend(0u16.to_le_bytes()); // OEM table size
    table.extend(count.to_le_bytes());
    table.extend(u32::try_from(layout::APIC_START).unwrap_or(0).to_le_bytes());
    table.extend(0u16.to_le_bytes()); // extended table length
    table.push(0); // extended table checksum
    table.push(0); // reserved
    debug_assert_eq!(table.len(), HEADER_LEN);
    table.extend(entries);
    table[7] = checksum(&table);
    Ok(table)
}

/// Builds the 16-byte floating pointer structure pointing at `table_addr`.
pub fn floating_pointer(table_addr: u32) -> [u8; FLOATING_POINTER_LEN] {
    let mut fp = [0u8; FLOATING_POINTER_LEN];
    fp[0..4].copy_from_slice(b"_MP_");
    fp[4..8].copy_from_slice(&table_addr.to_le_bytes());
    fp[8] = 1; // length in 16-byte units
    fp[9] = SPEC_REV;
    fp[10] = checksum(&fp);
    fp
}

/// Writes the MP table for `cpus` vCPUs into guest memory.
pub fn write_mptable(mem: &GuestMemoryMmap, cpus: u8) -> Result<()> {
    let table = config_table(cpus)?;
    let table_addr = MPTABLE_START + FLOATING_POINTER_LEN as u64;
    let fp = floating_pointer(u32::try_from(table_addr).unwrap_or(0));
    mem.write_slice(&fp, GuestAddress(MPTABLE_START))
        .map_err(Error::MpTableWrite)?;
    mem.write_slice(&table, GuestAddress(table_addr))
        .map_err(Error::MpTableWrite)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ember_memory::MemoryLayout;

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |a, x| a.wrapping_add(*x))
    }

    #[test]
    fn mptable_checksums_are_zero() {
        for cpus in [1, 2, 4, 64, MAX_CPUS] {
            let t = config_table(cpus).unwrap();
            assert_eq!(sum(&t), 0, "{cpus} cpus");
            assert_eq!(usize::from(u16::from_le_bytes([t[4], t[5]])), t.len());
        }
        assert_eq!(sum(&floating_pointer(0xf0010)), 0);
    }

    #[test]
    fn mptable_lists_every_cpu_with_the_first_as_bsp() {
        let t = config_table(3).unwrap();
        let count = u16::from_le_bytes([t[34], t[35]]);
        assert_eq!(count, 3 + 1 + 1 + 16 + 2);
        for id in 0..3usize {
            let e = &t[HEADER_LEN + 20 * id..HEADER_LEN + 20 * (id + 1)];
            assert_eq!(e[0], ENTRY_PROCESSOR);
            assert_eq!(usize::from(e[1]), id);
            assert_eq!(e[3] & CPU_BOOTPROCESSOR != 0, id == 0);
            assert_ne!(e[3] & CPU_ENABLED, 0);
        }
        let ioapic = &t[HEADER_LEN + 60 + 8..HEADER_LEN + 60 + 16];
        assert_eq!(ioapic[0], ENTRY_IOAPIC);
        assert_eq!(ioapic[1], 3, "IOAPIC id follows the CPUs");
        assert_eq!(
            u32::from_le_bytes([ioapic[4], ioapic[5], ioapic[6], ioapic[7]]),
            0xfec0_0000
        );
    }

    #[test]
    fn mptable_rejects_zero_and_too_many_cpus() {
        assert!(matches!(config_table(0), Err(Error::MpTableCpus(0))));
        assert!(matches!(config_table(255), Err(Error::MpTableCpus(255))));
    }

    #[test]
    fn write_mptable_puts_the_floating_pointer_where_linux_scans() {
        let mem = MemoryLayout::new(16)
            .unwrap()
            .create_guest_memory()
            .unwrap();
        write_mptable(&mem, 2).unwrap();
        let mut sig = [0u8; 4];
        mem.read_slice(&mut sig, GuestAddress(MPTABLE_START))
            .unwrap();
        assert_eq!(&sig, b"_MP_");
        let ptr: u32 = mem.read_obj(GuestAddress(MPTABLE_START + 4)).unwrap();
        mem.read_slice(&mut sig, GuestAddress(u64::from(ptr)))
            .unwrap();
        assert_eq!(&sig, b"PCMP");
    }
}
