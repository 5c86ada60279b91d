//! The register state a vCPU needs for the Linux 64-bit boot protocol:
//! long mode with identity-mapped page tables, a flat GDT, an empty IDT,
//! RSI pointing at the zero page.
//!
//! The values are computed by plain functions (unit-tested); [`crate::Vcpu`]
//! hands them to KVM.

use ember_memory::layout;
use kvm_bindings::{kvm_dtable, kvm_fpu, kvm_msr_entry, kvm_regs, kvm_segment, kvm_sregs};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

/// Errors writing boot structures into guest memory.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The GDT or IDT could not be written.
    #[error("cannot write the boot GDT/IDT into guest memory")]
    WriteDescriptorTables(#[source] vm_memory::GuestMemoryError),
    /// The page tables could not be written.
    #[error("cannot write the boot page tables into guest memory")]
    WritePageTables(#[source] vm_memory::GuestMemoryError),
}

// Control register and EFER bits (Intel SDM vol. 3, 2.5 and 2.2.1).
const X86_CR0_PE: u64 = 1 << 0;
const X86_CR0_ET: u64 = 1 << 4;
const X86_CR0_PG: u64 = 1 << 31;
const X86_CR4_PAE: u64 = 1 << 5;
const EFER_LME: u64 = 1 << 8;
const EFER_LMA: u64 = 1 << 10;

/// Selector of the 64-bit code segment.
pub const CODE_SELECTOR: u16 = 0x08;
/// Selector of the data segment.
pub const DATA_SELECTOR: u16 = 0x10;
/// Selector of the TSS.
pub const TSS_SELECTOR: u16 = 0x18;

/// Builds a GDT entry from flags, base and limit (SDM vol. 3, 3.4.5).
pub const fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    (((base as u64) & 0xff00_0000) << (56 - 24))
        | (((flags as u64) & 0x0000_f0ff) << 40)
        | (((limit as u64) & 0x000f_0000) << (48 - 16))
        | (((base as u64) & 0x00ff_ffff) << 16)
        | ((limit as u64) & 0x0000_ffff)
}

/// The boot GDT: null, 64-bit code, data, TSS.
pub const BOOT_GDT: [u64; layout::BOOT_GDT_ENTRIES] = [
    gdt_entry(0, 0, 0),
    gdt_entry(0xa09b, 0, 0xfffff),
    gdt_entry(0xc093, 0, 0xfffff),
    gdt_entry(0x808b, 0, 0xfffff),
];

/// The PVH boot GDT: null, 32-bit code, data, TSS (the kernel loads its
/// own GDT first thing; these are the segments it starts in).
pub const PVH_GDT: [u64; layout::BOOT_GDT_ENTRIES] = [
    gdt_entry(0, 0, 0),
    gdt_entry(0xc09b, 0, 0xfffff),
    gdt_entry(0xc093, 0, 0xfffff),
    gdt_entry(0x008b, 0, 0x67),
];

/// Decodes a GDT entry into the segment KVM wants.
pub fn segment_from_gdt(entry: u64, table_index: u8) -> kvm_segment {
    let base = ((entry >> 16) & 0x00ff_ffff) | ((entry >> 32) & 0xff00_0000);
    let limit = (entry & 0xffff) | ((entry >> 32) & 0x000f_0000);
    let bit = |n: u32| ((entry >> n) & 1) as u8;
    let limit = u32::try_from(limit).unwrap_or(u32::MAX);
    let granular = bit(55) == 1;
    kvm_segment {
        base,
        // With 4 KiB granularity the limit counts pages.
        limit: if granular {
            (limit << 12) | 0xfff
        } else {
            limit
        },
        selector: u16::from(table_index) * 8,
        type_: ((entry >> 40) & 0xf) as u8,
        present: bit(47),
        dpl: ((entry >> 45) & 0x3) as u8,
        db: bit(54),
        s: bit(44),
        l: bit(53),
        g: bit(55),
        avl: bit(52),
        unusable: u8::from(bit(47) == 0),
        padding: 0,
    }
}

/// General-purpose registers at the kernel's 64-bit entry point.
pub fn boot_regs(entry: u64) -> kvm_regs {
    kvm_regs {
        rflags: 0x2,
        rip: entry,
        rsp: layout::BOOT_STACK_POINTER,
        rbp: layout::BOOT_STACK_POINTER,
        rsi: layout::ZERO_PAGE_START,
        ..Default::default()
    }
}

/// Points `sregs` at the GDT `gdt` (written at [`layout::BOOT_GDT_START`])
/// and the empty IDT, with CS from entry 1, every data segment from entry
/// 2 and TR from entry 3.
fn flat_segments(sregs: &mut kvm_sregs, gdt: &[u64; layout::BOOT_GDT_ENTRIES]) {
    sregs.gdt = kvm_dtable {
        base: layout::BOOT_GDT_START,
        limit: u16::try_from(std::mem::size_of_val(gdt) - 1).unwrap_or(u16::MAX),
        padding: [0; 3],
    };
    sregs.idt = kvm_dtable {
        base: layout::BOOT_IDT_START,
        limit: u16::try_from(std::mem::size_of::<u64>() - 1).unwrap_or(u16::MAX),
        padding: [0; 3],
    };
    let data = segment_from_gdt(gdt[2], 2);
    sregs.cs = segment_from_gdt(gdt[1], 1);
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = segment_from_gdt(gdt[3], 3);
}

/// General-purpose registers at a PVH entry point: EBX holds the
/// `hvm_start_info` address (the PVH ABI), everything else starts clear.
pub fn pvh_regs(entry: u64, start_info: u64) -> kvm_regs {
    kvm_regs {
        rflags: 0x2,
        rip: entry,
        rbx: start_info,
        ..Default::default()
    }
}

/// Writes the PVH GDT and IDT into guest memory and returns `sregs` for
/// the PVH entry: 32-bit protected mode, flat segments, paging off, CR4
/// and EFER clear.
pub fn pvh_sregs<M: GuestMemoryBackend>(mem: &M, mut sregs: kvm_sregs) -> Result<kvm_sregs, Error> {
    write_gdt(mem, &PVH_GDT)?;
    flat_segments(&mut sregs, &PVH_GDT);
    sregs.cr0 = X86_CR0_PE | X86_CR0_ET;
    sregs.cr3 = 0;
    sregs.cr4 = 0;
    sregs.efer = 0;
    Ok(sregs)
}

/// Writes the GDT, IDT and identity page tables into guest memory and
/// returns `sregs` changed for 64-bit long mode.
pub fn boot_sregs<M: GuestMemoryBackend>(
    mem: &M,
    mut sregs: kvm_sregs,
) -> Result<kvm_sregs, Error> {
    write_descriptor_tables(mem)?;
    write_page_tables(mem)?;

    flat_segments(&mut sregs, &BOOT_GDT);

    sregs.cr0 |= X86_CR0_PE | X86_CR0_ET | X86_CR0_PG;
    sregs.cr3 = layout::PML4_START;
    sregs.cr4 |= X86_CR4_PAE;
    sregs.efer |= EFER_LME | EFER_LMA;
    Ok(sregs)
}

fn write_descriptor_tables<M: GuestMemoryBackend>(mem: &M) -> Result<(), Error> {
    write_gdt(mem, &BOOT_GDT)
}

/// Writes `gdt` at [`layout::BOOT_GDT_START`] and an empty IDT.
fn write_gdt<M: GuestMemoryBackend>(mem: &M, gdt: &[u64]) -> Result<(), Error> {
    for (i, entry) in gdt.iter().enumerate() {
        mem.write_obj(*entry, GuestAddress(layout::BOOT_GDT_START + 8 * i as u64))
            .map_err(Error::WriteDescriptorTables)?;
    }
    mem.write_obj(0u64, GuestAddress(layout::BOOT_IDT_START))
        .map_err(Error::WriteDescriptorTables)
}

/// Identity-maps the first [`layout::IDENTITY_MAP_GIB`] GiB with 2 MiB pages:
/// one PML4 entry, one PDPT, one page directory per GiB.
fn write_page_tables<M: GuestMemoryBackend>(mem: &M) -> Result<(), Error> {
    const PRESENT_RW: u64 = 0x3;
    const PAGE_SIZE_2M: u64 = 0x80;
    mem.write_obj(
        layout::PDPTE_START | PRESENT_RW,
        GuestAddress(layout::PML4_START),
    )
    .map_err(Error::WritePageTables)?;
    for gib in 0..layout::IDENTITY_MAP_GIB {
        let pd = layout::PDE_START + gib * 4096;
        mem.write_obj(pd | PRESENT_RW, GuestAddress(layout::PDPTE_START + gib * 8))
            .map_err(Error::WritePageTables)?;
        for i in 0..512u64 {
            let addr = (gib << 30) | (i << 21);
            mem.write_obj(addr | PAGE_SIZE_2M | PRESENT_RW, GuestAddress(pd + i * 8))
                .map_err(Error::WritePageTables)?;
        }
    }
    Ok(())
}

/// The FPU state Linux expects at boot: x87 control word 0x37f, MXCSR 0x1f80.
pub fn boot_fpu() -> kvm_fpu {
    kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    }
}

/// MSR indices (Linux arch/x86/include/asm/msr-index.h; kvm-bindings does
/// not carry them).
pub mod msr {
    /// IA32_SYSENTER_CS.
    pub const IA32_SYSENTER_CS: u32 = 0x174;
    /// IA32_SYSENTER_ESP.
    pub const IA32_SYSENTER_ESP: u32 = 0x175;
    /// IA32_SYSENTER_EIP.
    pub const IA32_SYSENTER_EIP: u32 = 0x176;
    /// STAR: syscall segment selectors.
    pub const STAR: u32 = 0xc000_0081;
    /// LSTAR: 64-bit syscall entry.
    pub const LSTAR: u32 = 0xc000_0082;
    /// CSTAR: compat syscall entry.
    pub const CSTAR: u32 = 0xc000_0083;
    /// SYSCALL_MASK: RFLAGS mask on syscall.
    pub const SYSCALL_MASK: u32 = 0xc000_0084;
    /// KERNEL_GS_BASE.
    pub const KERNEL_GS_BASE: u32 = 0xc000_0102;
    /// IA32_TSC.
    pub const IA32_TSC: u32 = 0x10;
    /// IA32_MISC_ENABLE.
    pub const IA32_MISC_ENABLE: u32 = 0x1a0;
    /// IA32_MISC_ENABLE: fast string operations.
    pub const MISC_ENABLE_FAST_STRING: u64 = 1;
    /// MTRRdefType.
    pub const MTRR_DEF_TYPE: u32 = 0x2ff;
    /// MTRRdefType: MTRRs enabled, default type write-back.
    pub const MTRR_ENABLE_WB: u64 = (1 << 11) | 6;
}

/// The MSRs set on every vCPU before its first run.
pub fn boot_msrs() -> Vec<kvm_msr_entry> {
    let e = |index, data| kvm_msr_entry {
        index,
        data,
        ..Default::default()
    };
    vec![
        e(msr::IA32_SYSENTER_CS, 0),
        e(msr::IA32_SYSENTER_ESP, 0),
        e(msr::IA32_SYSENTER_EIP, 0),
        e(msr::STAR, 0),
        e(msr::CSTAR, 0),
        e(msr::KERNEL_GS_BASE, 0),
        e(msr::SYSCALL_MASK, 0),
        e(msr::LSTAR, 0),
        e(msr::IA32_TSC, 0),
        e(msr::IA32_MISC_ENABLE, msr::MISC_ENABLE_FAST_STRING),
        e(msr::MTRR_DEF_TYPE, msr::MTRR_ENABLE_WB),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;
    use ember_memory::MemoryLayout;

    #[test]
    fn pvh_sregs_enter_flat_32_bit_protected_mode_without_paging() {
        let mem =
            vm_memory::GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        let sregs = pvh_sregs(&mem, kvm_sregs::default()).unwrap();
        assert_eq!(
            sregs.cr0,
            X86_CR0_PE | X86_CR0_ET,
            "protected mode, no paging"
        );
        assert_eq!((sregs.cr4, sregs.efer, sregs.cr3), (0, 0, 0));
        assert_eq!(
            (sregs.cs.db, sregs.cs.l, sregs.cs.g, sregs.cs.type_),
            (1, 0, 1, 0xb),
            "32-bit code"
        );
        assert_eq!((sregs.cs.base, sregs.cs.limit), (0, 0xffff_ffff));
        assert_eq!(
            (sregs.ds.db, sregs.ds.type_, sregs.ss.limit),
            (1, 0x3, 0xffff_ffff)
        );
        assert_eq!(sregs.tr.type_, 0xb, "a busy TSS");
        let code: u64 = mem
            .read_obj(GuestAddress(layout::BOOT_GDT_START + 8))
            .unwrap();
        assert_eq!(code, 0x00cf_9b00_0000_ffff);
        let r = pvh_regs(0x100_0abc, 0x6000);
        assert_eq!((r.rip, r.rbx, r.rflags, r.rsi), (0x100_0abc, 0x6000, 2, 0));
    }

    #[test]
    fn gdt_entry_encodes_flat_code_segment() {
        assert_eq!(gdt_entry(0xa09b, 0, 0xfffff), 0x00af_9b00_0000_ffff);
        assert_eq!(gdt_entry(0xc093, 0, 0xfffff), 0x00cf_9300_0000_ffff);
    }

    #[test]
    fn segment_from_gdt_decodes_long_mode_code() {
        let cs = segment_from_gdt(BOOT_GDT[1], 1);
        assert_eq!(cs.selector, CODE_SELECTOR);
        assert_eq!((cs.l, cs.db, cs.g, cs.present, cs.s), (1, 0, 1, 1, 1));
        assert_eq!(cs.type_, 0xb);
        assert_eq!(cs.limit, 0xffff_ffff);
        assert_eq!(cs.unusable, 0);
        let ds = segment_from_gdt(BOOT_GDT[2], 2);
        assert_eq!(
            (ds.selector, ds.db, ds.l, ds.type_),
            (DATA_SELECTOR, 1, 0, 3)
        );
        let tr = segment_from_gdt(BOOT_GDT[3], 3);
        assert_eq!((tr.selector, tr.s, tr.type_), (TSS_SELECTOR, 0, 0xb));
        let null = segment_from_gdt(BOOT_GDT[0], 0);
        assert_eq!(null.unusable, 1);
    }

    #[test]
    fn boot_sregs_enter_long_mode_with_identity_tables() {
        let mem = MemoryLayout::new(64)
            .unwrap()
            .create_guest_memory()
            .unwrap();
        let sregs = boot_sregs(&mem, kvm_sregs::default()).unwrap();
        assert_ne!(sregs.cr0 & X86_CR0_PG, 0);
        assert_ne!(sregs.cr0 & X86_CR0_PE, 0);
        assert_ne!(sregs.cr4 & X86_CR4_PAE, 0);
        assert_eq!(sregs.efer & (EFER_LME | EFER_LMA), EFER_LME | EFER_LMA);
        assert_eq!(sregs.cr3, layout::PML4_START);
        assert_eq!(sregs.gdt.base, layout::BOOT_GDT_START);
        assert_eq!(sregs.gdt.limit, 31);

        let pml4: u64 = mem.read_obj(GuestAddress(layout::PML4_START)).unwrap();
        assert_eq!(pml4, layout::PDPTE_START | 3);
        // The last 2 MiB page of the 4th GiB maps itself (the LAPIC lives there).
        let pdpt3: u64 = mem
            .read_obj(GuestAddress(layout::PDPTE_START + 24))
            .unwrap();
        let pd3 = pdpt3 & !0xfff;
        let last: u64 = mem.read_obj(GuestAddress(pd3 + 511 * 8)).unwrap();
        assert_eq!(last, 0xffe0_0000 | 0x83);
        let gdt1: u64 = mem
            .read_obj(GuestAddress(layout::BOOT_GDT_START + 8))
            .unwrap();
        assert_eq!(gdt1, BOOT_GDT[1]);
    }

    #[test]
    fn boot_regs_point_rsi_at_the_zero_page() {
        let r = boot_regs(0x100_0000);
        assert_eq!(r.rip, 0x100_0000);
        assert_eq!(r.rsi, layout::ZERO_PAGE_START);
        assert_eq!(r.rflags, 2);
    }

    #[test]
    fn boot_msrs_enable_mtrr_write_back() {
        let m = boot_msrs();
        let def = m.iter().find(|e| e.index == msr::MTRR_DEF_TYPE).unwrap();
        assert_eq!(def.data, (1 << 11) | 6);
    }
}
