//! The zero page (`struct boot_params`), the command line and the initrd.

use std::fs::File;
use std::path::Path;

use ember_memory::{layout, E820Entry, GuestMemoryMmap, MemoryLayout};
use linux_loader::cmdline::Cmdline;
use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params};
use vm_memory::{Bytes, GuestAddress};

use crate::kernel::LoadedKernel;
use crate::{Error, Result};

const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448;
/// "Undefined" boot loader id (Documentation/x86/boot.rst).
const KERNEL_LOADER_OTHER: u8 = 0xff;
/// Linux x86_64's default CONFIG_PHYSICAL_ALIGN.
const KERNEL_MIN_ALIGNMENT: u32 = 0x0100_0000;
/// The highest address an initrd may end at when the kernel does not say
/// (an ELF vmlinux has no setup header): 2 GiB, the x86_64 default.
const DEFAULT_INITRD_ADDR_MAX: u64 = 0x7fff_ffff;
const PAGE_SIZE: u64 = 4096;

/// Where the initrd went.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct InitrdPlacement {
    /// Guest physical address.
    pub addr: u64,
    /// Size in bytes.
    pub size: u64,
}

/// Validates the command line and writes it at [`layout::CMDLINE_START`].
pub fn write_cmdline(mem: &GuestMemoryMmap, cmdline: &str) -> Result<usize> {
    let cl = Cmdline::try_from(cmdline, layout::CMDLINE_MAX_SIZE)
        .map_err(|e| Error::Cmdline(e.to_string()))?;
    linux_loader::loader::load_cmdline(mem, GuestAddress(layout::CMDLINE_START), &cl)
        .map_err(|e| Error::Cmdline(e.to_string()))?;
    // The terminating NUL counts in cmdline_size.
    Ok(cmdline.len() + 1)
}

/// Chooses where an initrd of `size` bytes goes: the highest page-aligned
/// address that ends below both the end of low RAM and `addr_max`, and
/// starts above the kernel. `None` when there is no such address, also
/// when the kernel claims memory up to the top of the address space (an
/// ELF segment's memory size comes from the file as it is).
pub fn place_initrd(
    ml: &MemoryLayout,
    kernel_end: u64,
    size: u64,
    addr_max: u64,
) -> Option<InitrdPlacement> {
    let limit = ml.end_of_low_ram().min(addr_max.saturating_add(1));
    let addr = limit.checked_sub(size)? & !(PAGE_SIZE - 1);
    let kernel_end = kernel_end.checked_next_multiple_of(PAGE_SIZE)?;
    (addr >= kernel_end && size > 0).then_some(InitrdPlacement { addr, size })
}

/// Reads the initrd at `path` into guest memory above the kernel.
pub fn load_initrd(
    mem: &GuestMemoryMmap,
    ml: &MemoryLayout,
    kernel: &LoadedKernel,
    path: &Path,
) -> Result<InitrdPlacement> {
    let mut file = File::open(path).map_err(|source| Error::InitrdOpen {
        path: path.to_owned(),
        source,
    })?;
    let size = file
        .metadata()
        .map_err(|source| Error::InitrdOpen {
            path: path.to_owned(),
            source,
        })?
        .len();
    if size == 0 {
        return Err(Error::InitrdEmpty(path.to_owned()));
    }
    let addr_max = kernel
        .setup_header
        .map(|h| u64::from(h.initrd_addr_max))
        .filter(|&m| m != 0)
        .unwrap_or(DEFAULT_INITRD_ADDR_MAX);
    let placement =
        place_initrd(ml, kernel.end, size, addr_max).ok_or_else(|| Error::InitrdTooLarge {
            path: path.to_owned(),
            size,
            mem_mib: ml.size_mib(),
        })?;
    let len = usize::try_from(size).map_err(|_| Error::InitrdTooLarge {
        path: path.to_owned(),
        size,
        mem_mib: ml.size_mib(),
    })?;
    mem.read_exact_volatile_from(GuestAddress(placement.addr), &mut file, len)
        .map_err(|source| Error::InitrdRead {
            path: path.to_owned(),
            source,
        })?;
    Ok(placement)
}

/// Builds `boot_params`: the kernel's setup header (bzImage) or a minimal
/// one (ELF), the command line, the initrd and the e820 map.
pub fn build_boot_params(
    ml: &MemoryLayout,
    kernel: &LoadedKernel,
    cmdline_size: usize,
    initrd: Option<InitrdPlacement>,
) -> Result<boot_params> {
    let mut params = boot_params::default();
    if let Some(hdr) = kernel.setup_header {
        params.hdr = hdr;
    }
    params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    params.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
    params.hdr.header = KERNEL_HDR_MAGIC;
    if params.hdr.kernel_alignment == 0 {
        params.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT;
    }
    params.hdr.cmd_line_ptr = u32::try_from(layout::CMDLINE_START).unwrap_or(0);
    params.hdr.cmdline_size =
        u32::try_from(cmdline_size).map_err(|_| Error::Cmdline("too long".into()))?;
    if let Some(i) = initrd {
        params.hdr.ramdisk_image = u32::try_from(i.addr).map_err(|_| Error::InitrdPlacement)?;
        params.hdr.ramdisk_size = u32::try_from(i.size).map_err(|_| Error::InitrdPlacement)?;
    }
    let e820 = ml.e820();
    if e820.len() > params.e820_table.len() {
        return Err(Error::E820TooLarge(e820.len()));
    }
    for (slot, E820Entry { addr, size, kind }) in params.e820_table.iter_mut().zip(e820.iter()) {
        *slot = boot_e820_entry {
            addr: *addr,
            size: *size,
            r#type: kind.type_code(),
        };
    }
    params.e820_entries = u8::try_from(e820.len()).map_err(|_| Error::E820TooLarge(e820.len()))?;
    Ok(params)
}

/// Writes `params` at [`layout::ZERO_PAGE_START`].
pub fn write_boot_params(mem: &GuestMemoryMmap, params: &boot_params) -> Result<()> {
    let bp = BootParams::new(params, GuestAddress(layout::ZERO_PAGE_START));
    LinuxBootConfigurator::write_bootparams::<GuestMemoryMmap>(&bp, mem)
        .map_err(|e| Error::BootParams(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernel::KernelFormat;
    use vm_memory::Bytes;

    fn elf_kernel() -> LoadedKernel {
        LoadedKernel {
            format: KernelFormat::Elf,
            entry: 0x100_0000,
            end: 0x200_0000,
            setup_header: None,
            pvh_entry: None,
        }
    }

    #[test]
    fn initrd_goes_to_the_top_of_low_ram_page_aligned() {
        let ml = MemoryLayout::new(128).unwrap();
        let p = place_initrd(&ml, 0x200_0000, 5000, DEFAULT_INITRD_ADDR_MAX).unwrap();
        assert_eq!(p.addr % PAGE_SIZE, 0);
        assert!(p.addr + p.size <= 128 << 20);
        assert!(p.addr + p.size > (128 << 20) - 2 * PAGE_SIZE);
    }

    #[test]
    fn initrd_respects_addr_max_in_a_large_guest() {
        let ml = MemoryLayout::new(5120).unwrap();
        let p = place_initrd(&ml, 0x200_0000, 1 << 20, DEFAULT_INITRD_ADDR_MAX).unwrap();
        assert!(p.addr + p.size <= DEFAULT_INITRD_ADDR_MAX + 1);
    }

    #[test]
    fn initrd_that_would_overlap_the_kernel_does_not_fit() {
        let ml = MemoryLayout::new(64).unwrap();
        assert!(place_initrd(&ml, 0x200_0000, 63 << 20, DEFAULT_INITRD_ADDR_MAX).is_none());
        assert!(place_initrd(&ml, 0x200_0000, 1 << 40, DEFAULT_INITRD_ADDR_MAX).is_none());
        assert!(place_initrd(&ml, 0x200_0000, 0, DEFAULT_INITRD_ADDR_MAX).is_none());
    }

    /// Found by the `loader_elf` fuzz target: an ELF vmlinux whose
    /// PT_LOAD memory size reaches the top of the address space made the
    /// page rounding of the kernel's end overflow (a panic in debug builds,
    /// an initrd placed inside the kernel's claimed memory in release).
    #[test]
    fn initrd_placement_with_kernel_end_near_u64_max_is_an_error() {
        let ml = MemoryLayout::new(16).unwrap();
        for end in [u64::MAX, u64::MAX - PAGE_SIZE + 2, 1 << 63] {
            assert_eq!(
                place_initrd(&ml, end, 4096, DEFAULT_INITRD_ADDR_MAX),
                None,
                "{end:#x}"
            );
        }
    }

    #[test]
    fn boot_params_carry_e820_cmdline_and_initrd() {
        let ml = MemoryLayout::new(5120).unwrap();
        let initrd = InitrdPlacement {
            addr: 0x7000_0000,
            size: 0x1000,
        };
        let p = build_boot_params(&ml, &elf_kernel(), 42, Some(initrd)).unwrap();
        let hdr = p.hdr;
        assert_eq!({ hdr.boot_flag }, 0xaa55);
        assert_eq!({ hdr.header }, KERNEL_HDR_MAGIC);
        assert_eq!({ hdr.type_of_loader }, 0xff);
        assert_eq!({ hdr.cmd_line_ptr }, 0x2_0000);
        assert_eq!({ hdr.cmdline_size }, 42);
        assert_eq!({ hdr.ramdisk_image }, 0x7000_0000);
        assert_eq!({ hdr.ramdisk_size }, 0x1000);
        // Low RAM, RAM from 1 MiB, MMCONFIG (reserved), RAM above 4 GiB.
        assert_eq!(p.e820_entries, 4);
        let table = p.e820_table;
        let (e2, e3) = (table[2], table[3]);
        assert_eq!({ e2.addr }, layout::PCI_MMCONFIG_START);
        assert_eq!({ e2.r#type }, 2);
        assert_eq!({ e3.addr }, 1 << 32);
        assert_eq!({ e3.r#type }, 1);
    }

    #[test]
    fn boot_params_keep_the_bzimage_header() {
        let mut hdr = linux_loader::loader::bootparam::setup_header {
            version: 0x020f,
            initrd_addr_max: 0x7fff_ffff,
            kernel_alignment: 0x20_0000,
            ..Default::default()
        };
        hdr.xloadflags = 1;
        let k = LoadedKernel {
            format: KernelFormat::BzImage,
            entry: 0x10_0200,
            end: 0x40_0000,
            setup_header: Some(hdr),
            pvh_entry: None,
        };
        let ml = MemoryLayout::new(64).unwrap();
        let p = build_boot_params(&ml, &k, 1, None).unwrap();
        let h = p.hdr;
        assert_eq!({ h.version }, 0x020f);
        assert_eq!({ h.kernel_alignment }, 0x20_0000);
        assert_eq!({ h.ramdisk_size }, 0);
    }

    #[test]
    fn cmdline_is_written_nul_terminated() {
        let mem = MemoryLayout::new(16)
            .unwrap()
            .create_guest_memory()
            .unwrap();
        let n = write_cmdline(&mem, "console=ttyS0 quiet").unwrap();
        assert_eq!(n, 20);
        let mut buf = [0u8; 20];
        mem.read_slice(&mut buf, GuestAddress(layout::CMDLINE_START))
            .unwrap();
        assert_eq!(&buf, b"console=ttyS0 quiet\0");
    }

    #[test]
    fn cmdline_too_long_is_rejected() {
        let mem = MemoryLayout::new(16)
            .unwrap()
            .create_guest_memory()
            .unwrap();
        let long = "a".repeat(layout::CMDLINE_MAX_SIZE + 1);
        assert!(matches!(write_cmdline(&mem, &long), Err(Error::Cmdline(_))));
    }

    #[test]
    fn boot_params_are_written_to_the_zero_page() {
        let ml = MemoryLayout::new(16).unwrap();
        let mem = ml.create_guest_memory().unwrap();
        let p = build_boot_params(&ml, &elf_kernel(), 1, None).unwrap();
        write_boot_params(&mem, &p).unwrap();
        let magic: u32 = mem
            .read_obj(GuestAddress(layout::ZERO_PAGE_START + 0x202))
            .unwrap();
        assert_eq!(magic, KERNEL_HDR_MAGIC);
        let n: u8 = mem
            .read_obj(GuestAddress(layout::ZERO_PAGE_START + 0x1e8))
            .unwrap();
        assert_eq!(n, 3);
    }
}
