//! Loads a Linux kernel into x86_64 guest memory for a direct 64-bit boot.
//!
//! - [`kernel`]: an ELF `vmlinux` or a bzImage (detected from the file), on
//!   linux-loader, with the checks it leaves out (a truncated bzImage, a
//!   bzImage without a 64-bit entry point, a file that is neither).
//! - [`bootparams`]: the command line, the initrd (placed at the top of low
//!   RAM, above the kernel) and `boot_params` with the e820 map of an
//!   [`ember_memory::MemoryLayout`].
//! - [`mptable`]: an MP table so the guest finds every vCPU and the IOAPIC
//!   without ACPI.
//! - [`pvh`]: `hvm_start_info` for the PVH entry of a kernel that has one.
//!
//! [`load`] does all of it; the vCPU then starts at [`BootInfo::entry`] with
//! RSI pointing at the zero page.
//!
//! ```no_run
//! use std::path::Path;
//! use ember_loader::{load, BootSpec};
//! use ember_memory::MemoryLayout;
//!
//! let ml = MemoryLayout::new(128).unwrap();
//! let mem = ml.create_guest_memory().unwrap();
//! let spec = BootSpec {
//!     kernel: Path::new("vmlinux"),
//!     initrd: None,
//!     cmdline: "console=ttyS0 reboot=k panic=1",
//!     vcpus: 2,
//!     acpi_rsdp: None,
//!     protocol: ember_loader::BootProtocol::Auto,
//! };
//! let boot = load(&mem, &ml, &spec).unwrap();
//! println!("enter the kernel at {:#x}", boot.entry);
//! ```
#![forbid(unsafe_code)]

pub mod bootparams;
pub mod kernel;
pub mod mptable;
pub mod pvh;

use std::path::{Path, PathBuf};

use ember_memory::{GuestMemoryMmap, MemoryLayout};

pub use bootparams::InitrdPlacement;
pub use kernel::{KernelFormat, LoadedKernel};

/// Errors of this crate. Each names the file or structure at fault.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The kernel file cannot be opened.
    #[error("cannot open kernel {}", .path.display())]
    KernelOpen {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The kernel file cannot be read.
    #[error("cannot read kernel {}", .path.display())]
    KernelRead {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Neither an ELF nor a bzImage.
    #[error("kernel {} is neither an ELF vmlinux nor a bzImage", .0.display())]
    UnknownKernelFormat(PathBuf),
    /// The bzImage is shorter than its header says.
    #[error("kernel {} is truncated: the file is shorter than its header says", .0.display())]
    TruncatedKernel(PathBuf),
    /// The bzImage cannot be entered in 64-bit mode.
    #[error("kernel {} has no 64-bit entry point (boot protocol 2.12 or later with XLF_KERNEL_64 is needed)", .0.display())]
    NoLongModeEntry(PathBuf),
    /// linux-loader rejected the image or it does not fit in guest memory.
    #[error("cannot load kernel {} into guest memory ({source})", .path.display())]
    KernelLoad {
        /// The file.
        path: PathBuf,
        /// What linux-loader said; it is shown here because its own Display
        /// has no source chain.
        source: linux_loader::loader::Error,
    },
    /// The initrd cannot be opened.
    #[error("cannot open initrd {}", .path.display())]
    InitrdOpen {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The initrd is empty.
    #[error("initrd {} is empty", .0.display())]
    InitrdEmpty(PathBuf),
    /// The initrd does not fit between the kernel and the end of low RAM.
    #[error("initrd {} ({size} bytes) does not fit in {mem_mib} MiB of guest memory above the kernel", .path.display())]
    InitrdTooLarge {
        /// The file.
        path: PathBuf,
        /// Its size.
        size: u64,
        /// The guest's memory.
        mem_mib: u64,
    },
    /// The initrd cannot be read into guest memory.
    #[error("cannot read initrd {} into guest memory", .path.display())]
    InitrdRead {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: vm_memory::GuestMemoryError,
    },
    /// The initrd's placement does not fit the 32-bit boot_params fields.
    #[error("initrd placement does not fit in boot_params")]
    InitrdPlacement,
    /// The command line is invalid or too long.
    #[error("invalid kernel command line: {0}")]
    Cmdline(String),
    /// More e820 entries than boot_params holds.
    #[error("e820 map has {0} entries, more than boot_params holds")]
    E820TooLarge(usize),
    /// boot_params could not be written.
    #[error("cannot write boot_params: {0}")]
    BootParams(String),
    /// The MP table cannot describe this many vCPUs.
    #[error("the MP table cannot describe {0} vCPUs (1 to {max})", max = mptable::MAX_CPUS)]
    MpTableCpus(u8),
    /// The MP table could not be written.
    #[error("cannot write the MP table into guest memory")]
    MpTableWrite(#[source] vm_memory::GuestMemoryError),
    /// PVH was asked for and the kernel has no PVH entry note.
    #[error("kernel {} has no PVH entry (an ELF vmlinux built with CONFIG_PVH has one; a bzImage never does): use the 64-bit entry", .0.display())]
    NoPvhEntry(PathBuf),
}

/// Result type of this crate.
pub type Result<T> = std::result::Result<T, Error>;

/// What to boot.
#[derive(Clone, Debug)]
pub struct BootSpec<'a> {
    /// ELF vmlinux or bzImage.
    pub kernel: &'a Path,
    /// Optional initrd / initramfs.
    pub initrd: Option<&'a Path>,
    /// Kernel command line.
    pub cmdline: &'a str,
    /// Number of vCPUs, for the MP table.
    pub vcpus: u8,
    /// Where the ACPI tables' RSDP is, if the VMM wrote them
    /// (`boot_params.acpi_rsdp_addr`); the MP table is written either way,
    /// for a guest booted with `acpi=off`.
    pub acpi_rsdp: Option<u64>,
    /// How the kernel is entered.
    pub protocol: BootProtocol,
}

/// How the boot vCPU enters the kernel.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum BootProtocol {
    /// PVH when the kernel has the PVH note, else the 64-bit entry (what
    /// Firecracker and Cloud Hypervisor do).
    #[default]
    Auto,
    /// The Linux 64-bit boot protocol: long mode, RSI = the zero page.
    Linux64,
    /// PVH: 32-bit protected mode at the note's entry, EBX = the
    /// `hvm_start_info` (see [`pvh`]); refused for a kernel without the note.
    Pvh,
}

impl std::str::FromStr for BootProtocol {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "auto" => Ok(BootProtocol::Auto),
            "linux64" | "linux" => Ok(BootProtocol::Linux64),
            "pvh" => Ok(BootProtocol::Pvh),
            _ => Err(format!("boot protocol `{s}` is not auto, linux64 or pvh")),
        }
    }
}

impl std::fmt::Display for BootProtocol {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            BootProtocol::Auto => "auto",
            BootProtocol::Linux64 => "linux64",
            BootProtocol::Pvh => "pvh",
        })
    }
}

/// The result of [`load`].
#[derive(Clone, Debug)]
pub struct BootInfo {
    /// Where the boot vCPU starts: 64-bit mode with RSI = zero page, or
    /// with PVH 32-bit protected mode with EBX = [`BootInfo::pvh_start_info`].
    pub entry: u64,
    /// With PVH, the address of `hvm_start_info`; `None`: the 64-bit entry.
    pub pvh_start_info: Option<u64>,
    /// The kernel as loaded.
    pub kernel: LoadedKernel,
    /// Where the initrd went.
    pub initrd: Option<InitrdPlacement>,
}

/// Loads the kernel, the initrd and the command line, and writes
/// `boot_params` and the MP table.
pub fn load(mem: &GuestMemoryMmap, ml: &MemoryLayout, spec: &BootSpec<'_>) -> Result<BootInfo> {
    let kernel = kernel::load_kernel(mem, spec.kernel)?;
    let initrd = spec
        .initrd
        .map(|path| bootparams::load_initrd(mem, ml, &kernel, path))
        .transpose()?;
    let cmdline_size = bootparams::write_cmdline(mem, spec.cmdline)?;
    let mut params = bootparams::build_boot_params(ml, &kernel, cmdline_size, initrd)?;
    if let Some(rsdp) = spec.acpi_rsdp {
        params.acpi_rsdp_addr = rsdp;
    }
    bootparams::write_boot_params(mem, &params)?;
    mptable::write_mptable(mem, spec.vcpus)?;
    let pvh = match (spec.protocol, kernel.pvh_entry) {
        (BootProtocol::Linux64, _) | (BootProtocol::Auto, None) => None,
        (BootProtocol::Auto | BootProtocol::Pvh, Some(entry)) => Some(entry),
        (BootProtocol::Pvh, None) => return Err(Error::NoPvhEntry(spec.kernel.to_owned())),
    };
    let (entry, pvh_start_info) = match pvh {
        Some(entry) => (
            entry,
            Some(pvh::write_start_info(mem, ml, initrd, spec.acpi_rsdp)?),
        ),
        None => (kernel.entry, None),
    };
    Ok(BootInfo {
        entry,
        pvh_start_info,
        kernel,
        initrd,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal ELF kernel: 64 bytes of code at 1 MiB entered at its start,
    /// and with `pvh` a Xen PVH note giving `pvh` as the 32-bit entry.
    fn elf(pvh: Option<u32>) -> Vec<u8> {
        let phnum: u16 = if pvh.is_some() { 2 } else { 1 };
        let data_at = 64 + 56 * u64::from(phnum);
        let mut e = vec![0u8; 64];
        e[..4].copy_from_slice(b"\x7fELF");
        e[4] = 2; // ELFCLASS64
        e[5] = 1; // little-endian
        e[6] = 1;
        e[16..18].copy_from_slice(&2u16.to_le_bytes()); // ET_EXEC
        e[18..20].copy_from_slice(&62u16.to_le_bytes()); // EM_X86_64
        e[20..24].copy_from_slice(&1u32.to_le_bytes());
        e[24..32].copy_from_slice(&0x100_0000u64.to_le_bytes());
        e[32..40].copy_from_slice(&64u64.to_le_bytes());
        e[52..54].copy_from_slice(&64u16.to_le_bytes());
        e[54..56].copy_from_slice(&56u16.to_le_bytes());
        e[56..58].copy_from_slice(&phnum.to_le_bytes());
        let phdr = |kind: u32, offset: u64, addr: u64, size: u64| {
            let mut p = vec![0u8; 56];
            p[..4].copy_from_slice(&kind.to_le_bytes());
            p[4..8].copy_from_slice(&5u32.to_le_bytes());
            p[8..16].copy_from_slice(&offset.to_le_bytes());
            p[16..24].copy_from_slice(&addr.to_le_bytes());
            p[24..32].copy_from_slice(&addr.to_le_bytes());
            p[32..40].copy_from_slice(&size.to_le_bytes());
            p[40..48].copy_from_slice(&size.to_le_bytes());
            p[48..56].copy_from_slice(&0x1000u64.to_le_bytes());
            p
        };
        e.extend(phdr(1, data_at, 0x100_0000, 64));
        if pvh.is_some() {
            e.extend(phdr(4, data_at + 64, 0, 20));
        }
        e.extend([0x90u8; 64]);
        if let Some(entry) = pvh {
            // namesz 4, descsz 4, type 18 (XEN_ELFNOTE_PHYS32_ENTRY), "Xen\0".
            for w in [4u32, 4, 18] {
                e.extend(w.to_le_bytes());
            }
            e.extend(b"Xen\0");
            e.extend(entry.to_le_bytes());
        }
        e
    }

    fn boot(image: &[u8], protocol: BootProtocol) -> Result<BootInfo> {
        let ml = MemoryLayout::new(64).unwrap();
        let mem = ml.create_guest_memory().unwrap();
        let path = std::env::temp_dir().join(format!(
            "ember-loader-pvh-{}-{}",
            std::process::id(),
            image.len()
        ));
        std::fs::write(&path, image).unwrap();
        let spec = BootSpec {
            kernel: &path,
            initrd: None,
            cmdline: "console=ttyS0",
            vcpus: 1,
            acpi_rsdp: None,
            protocol,
        };
        let r = load(&mem, &ml, &spec);
        let _ = std::fs::remove_file(&path);
        r
    }

    #[test]
    fn a_kernel_with_the_pvh_note_is_entered_there_unless_told_otherwise() {
        let with = elf(Some(0x100_0020));
        let auto = boot(&with, BootProtocol::Auto).unwrap();
        assert_eq!(auto.kernel.pvh_entry, Some(0x100_0020));
        assert_eq!(
            (auto.entry, auto.pvh_start_info),
            (0x100_0020, Some(ember_memory::layout::PVH_INFO_START))
        );
        let pvh = boot(&with, BootProtocol::Pvh).unwrap();
        assert_eq!(pvh.entry, 0x100_0020);
        let linux = boot(&with, BootProtocol::Linux64).unwrap();
        assert_eq!((linux.entry, linux.pvh_start_info), (0x100_0000, None));
        // Without the note: the 64-bit entry, and PVH asked for is refused.
        let without = elf(None);
        let auto = boot(&without, BootProtocol::Auto).unwrap();
        assert_eq!((auto.entry, auto.pvh_start_info), (0x100_0000, None));
        let e = boot(&without, BootProtocol::Pvh).unwrap_err();
        assert!(matches!(e, Error::NoPvhEntry(_)));
        assert!(e.to_string().contains("has no PVH entry"), "{e}");
        assert_eq!("pvh".parse::<BootProtocol>(), Ok(BootProtocol::Pvh));
        assert!("bios"
            .parse::<BootProtocol>()
            .unwrap_err()
            .contains("`bios`"));
    }
}
