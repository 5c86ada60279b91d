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
//! };
//! let boot = load(&mem, &ml, &spec).unwrap();
//! println!("enter the kernel at {:#x}", boot.entry);
//! ```
#![forbid(unsafe_code)]

pub mod bootparams;
pub mod kernel;
pub mod mptable;

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
}

/// The result of [`load`].
#[derive(Clone, Debug)]
pub struct BootInfo {
    /// Where the boot vCPU starts (64-bit mode, RSI = zero page).
    pub entry: u64,
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
    Ok(BootInfo {
        entry: kernel.entry,
        kernel,
        initrd,
    })
}
