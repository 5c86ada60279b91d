//! The PVH boot protocol (Xen's `hvm_start_info`, which Linux's
//! `CONFIG_PVH` entry takes): an ELF kernel carrying the
//! `XEN_ELFNOTE_PHYS32_ENTRY` note is entered there in 32-bit protected
//! mode, paging off, with EBX pointing at a `hvm_start_info` that gives the
//! command line, the memory map, the initrd as a module and the ACPI RSDP.
//! No zero page, no real-mode setup code: the kernel sets up its own page
//! tables from the 32-bit entry.

use ember_memory::{layout, GuestMemoryMmap, MemoryLayout};
use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info,
};
use vm_memory::{Bytes, GuestAddress};

use crate::bootparams::InitrdPlacement;
use crate::{Error, Result};

/// `hvm_start_info.magic`: "xEn3" with the high bit set.
pub const XEN_HVM_START_MAGIC_VALUE: u32 = 0x336e_c578;
/// The layout version written (1: with the memory map and the RSDP).
pub const START_INFO_VERSION: u32 = 1;
/// E820 types as the memory map carries them.
const E820_RAM: u32 = 1;

/// Where each structure goes: the start info, then the memory map, then
/// the module list, in the page [`layout::PVH_INFO_START`].
const MEMMAP_OFFSET: u64 = 0x40;
/// At most this many memory map entries fit before the module list.
pub const MAX_MEMMAP_ENTRIES: usize = 64;
const MODLIST_OFFSET: u64 = MEMMAP_OFFSET + (MAX_MEMMAP_ENTRIES as u64) * 24;

/// Writes `hvm_start_info` (and its memory map and module list) for a
/// guest of layout `ml`: the command line at [`layout::CMDLINE_START`],
/// `initrd` as the one module, `rsdp` if the VMM wrote ACPI tables.
/// Returns the start info's address (the vCPU's EBX).
pub fn write_start_info(
    mem: &GuestMemoryMmap,
    ml: &MemoryLayout,
    initrd: Option<InitrdPlacement>,
    rsdp: Option<u64>,
) -> Result<u64> {
    let base = layout::PVH_INFO_START;
    let write = |what: &'static str, e: vm_memory::GuestMemoryError| {
        Error::BootParams(format!("PVH {what}: {e}"))
    };
    let e820 = ml.e820();
    if e820.len() > MAX_MEMMAP_ENTRIES {
        return Err(Error::E820TooLarge(e820.len()));
    }
    for (i, entry) in e820.iter().enumerate() {
        let slot = hvm_memmap_table_entry {
            addr: entry.addr,
            size: entry.size,
            type_: entry.kind.type_code(),
            reserved: 0,
        };
        mem.write_obj(slot, GuestAddress(base + MEMMAP_OFFSET + 24 * i as u64))
            .map_err(|e| write("memory map", e))?;
    }
    let mut info = hvm_start_info {
        magic: XEN_HVM_START_MAGIC_VALUE,
        version: START_INFO_VERSION,
        cmdline_paddr: layout::CMDLINE_START,
        memmap_paddr: base + MEMMAP_OFFSET,
        memmap_entries: u32::try_from(e820.len()).map_err(|_| Error::E820TooLarge(e820.len()))?,
        rsdp_paddr: rsdp.unwrap_or(0),
        ..Default::default()
    };
    if let Some(i) = initrd {
        let module = hvm_modlist_entry {
            paddr: i.addr,
            size: i.size,
            cmdline_paddr: 0,
            reserved: 0,
        };
        mem.write_obj(module, GuestAddress(base + MODLIST_OFFSET))
            .map_err(|e| write("module list", e))?;
        info.nr_modules = 1;
        info.modlist_paddr = base + MODLIST_OFFSET;
    }
    mem.write_obj(info, GuestAddress(base))
        .map_err(|e| write("start info", e))?;
    Ok(base)
}

/// Whether `kind` is RAM in the memory map.
pub fn is_ram(kind: u32) -> bool {
    kind == E820_RAM
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn start_info_points_at_the_command_line_memory_map_initrd_and_rsdp() {
        let ml = MemoryLayout::new(64).unwrap();
        let mem = ml.create_guest_memory().unwrap();
        let initrd = InitrdPlacement {
            addr: 0x300_0000,
            size: 0x1234,
        };
        let at = write_start_info(&mem, &ml, Some(initrd), Some(0xe_0000)).unwrap();
        assert_eq!(at, layout::PVH_INFO_START);
        let info: hvm_start_info = mem.read_obj(GuestAddress(at)).unwrap();
        assert_eq!(info.magic, XEN_HVM_START_MAGIC_VALUE);
        assert_eq!(info.version, 1);
        assert_eq!(info.cmdline_paddr, layout::CMDLINE_START);
        assert_eq!(info.rsdp_paddr, 0xe_0000);
        assert_eq!(info.nr_modules, 1);
        let module: hvm_modlist_entry = mem.read_obj(GuestAddress(info.modlist_paddr)).unwrap();
        assert_eq!((module.paddr, module.size), (0x300_0000, 0x1234));
        let e820 = ml.e820();
        assert_eq!(info.memmap_entries as usize, e820.len());
        let mut ram = 0;
        for (i, want) in e820.iter().enumerate() {
            let got: hvm_memmap_table_entry = mem
                .read_obj(GuestAddress(info.memmap_paddr + 24 * i as u64))
                .unwrap();
            assert_eq!(
                (got.addr, got.size, got.type_),
                (want.addr, want.size, want.kind.type_code())
            );
            if is_ram(got.type_) {
                ram += got.size;
            }
        }
        assert!(ram > 60 << 20, "the map covers the guest's RAM: {ram}");
        // No initrd, no ACPI.
        write_start_info(&mem, &ml, None, None).unwrap();
        let info: hvm_start_info = mem.read_obj(GuestAddress(at)).unwrap();
        assert_eq!(
            (info.nr_modules, info.modlist_paddr, info.rsdp_paddr),
            (0, 0, 0)
        );
    }

    #[test]
    fn the_structures_fit_below_the_zero_page() {
        const {
            assert!(
                layout::PVH_INFO_START + MODLIST_OFFSET + 32 <= layout::ZERO_PAGE_START,
                "start info, memory map and module list fit in their page"
            );
        }
    }
}
