//! `loader_bzimage` and `loader_elf`: any file as the kernel of a small
//! guest (16 MiB, two vCPUs, a 4 KiB initrd), loaded by
//! [`ember_loader::load`] as `ember` loads it: format detection, the
//! bzImage checks, linux-loader, initrd placement above the kernel, the
//! command line, boot_params with the e820 map, the MP table.
//!
//! Input: the kernel file. So that every input exercises the format it is
//! meant for, `loader_bzimage` writes the "HdrS" magic at 0x202 (and
//! spoils an ELF magic), and `loader_elf` writes the ELF magic at 0.

use std::io::Write;
use std::path::Path;

use ember_loader::{load, BootInfo, BootSpec};
use ember_memory::MemoryLayout;
use vmm_sys_util::tempfile::TempFile;

use crate::guest::init_logging;

/// Guest RAM of the loader targets, in MiB.
pub const MEM_MIB: u64 = 16;
/// The bzImage setup header's magic and where it is.
const HDRS: (&[u8; 4], usize) = (b"HdrS", 0x202);
/// The ELF magic.
const ELF_MAGIC: &[u8; 4] = b"\x7fELF";

/// Where the kernel and initrd files go: tmpfs if the host has it.
fn file_dir() -> &'static Path {
    let shm = Path::new("/dev/shm");
    if shm.is_dir() {
        shm
    } else {
        Path::new("/tmp")
    }
}

fn temp_file(bytes: &[u8]) -> Option<TempFile> {
    let f = TempFile::new_in(file_dir()).ok()?;
    f.as_file().write_all(bytes).ok()?;
    Some(f)
}

/// Loads `kernel` into a fresh small guest; errors are expected, panics
/// are bugs. `None` if the guest or the files could not be made.
pub(crate) fn run(kernel: &[u8]) -> Option<ember_loader::Result<BootInfo>> {
    init_logging();
    let ml = MemoryLayout::new(MEM_MIB).ok()?;
    let mem = ml.create_guest_memory().ok()?;
    let kernel_file = temp_file(kernel)?;
    let initrd_file = temp_file(&[0xc5; 4096])?;
    let spec = BootSpec {
        kernel: kernel_file.as_path(),
        initrd: Some(initrd_file.as_path()),
        cmdline: "console=ttyS0 reboot=k panic=1",
        vcpus: 2,
        acpi_rsdp: None,
        protocol: ember_loader::BootProtocol::Auto,
    };
    let result = load(&mem, &ml, &spec);
    match &result {
        Ok(boot) => drop(format!("{boot:?}")),
        Err(e) => drop(e.to_string()),
    }
    Some(result)
}

/// The `loader_bzimage` target.
pub fn loader_bzimage(data: &[u8]) {
    run(&bzimage_input(data));
}

/// The kernel file `loader_bzimage` loads for `data`.
pub(crate) fn bzimage_input(data: &[u8]) -> Vec<u8> {
    let mut kernel = data.to_vec();
    let (magic, at) = HDRS;
    if kernel.len() < at + magic.len() {
        kernel.resize(at + magic.len(), 0);
    }
    kernel[at..at + magic.len()].copy_from_slice(magic);
    if kernel.starts_with(ELF_MAGIC) {
        kernel[0] = 0;
    }
    kernel
}

/// The `loader_elf` target.
pub fn loader_elf(data: &[u8]) {
    run(&elf_input(data));
}

/// The kernel file `loader_elf` loads for `data`.
pub(crate) fn elf_input(data: &[u8]) -> Vec<u8> {
    let mut kernel = data.to_vec();
    if kernel.len() < ELF_MAGIC.len() {
        kernel.resize(ELF_MAGIC.len(), 0);
    }
    kernel[..ELF_MAGIC.len()].copy_from_slice(ELF_MAGIC);
    kernel
}
