//! Kernel images: format detection, checks linux-loader does not make, loading.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

use ember_memory::{layout, GuestMemoryMmap};
use linux_loader::loader::bootparam::setup_header;
use linux_loader::loader::{BzImage, Elf, KernelLoader};
use vm_memory::GuestAddress;

use crate::{Error, Result};

/// Offset of the setup header in a bzImage.
const SETUP_HEADER_OFFSET: u64 = 0x1f1;
/// "HdrS", the setup header's magic.
const HDRS_MAGIC: u32 = 0x5372_6448;
/// xloadflags: the kernel has a 64-bit entry point at `startup_64` (+0x200).
const XLF_KERNEL_64: u16 = 1;
/// Boot protocol 2.12 introduced xloadflags.
const MIN_BOOT_PROTOCOL: u16 = 0x020c;
/// The 64-bit entry of a bzImage's protected-mode code.
const BZIMAGE_64BIT_ENTRY_OFFSET: u64 = 0x200;

/// What a kernel file is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KernelFormat {
    /// An ELF `vmlinux`, entered at its ELF entry point in 64-bit mode.
    Elf,
    /// A bzImage, entered at its 64-bit entry point.
    BzImage,
}

/// A kernel in guest memory.
#[derive(Clone, Debug)]
pub struct LoadedKernel {
    /// The image's format.
    pub format: KernelFormat,
    /// The 64-bit entry point (guest physical).
    pub entry: u64,
    /// The first address above the loaded image.
    pub end: u64,
    /// The bzImage's setup header, for boot_params.
    pub setup_header: Option<setup_header>,
}

/// Reads the first bytes of `file` and says what kind of kernel it is.
pub fn detect_format(path: &Path, file: &mut File) -> Result<KernelFormat> {
    let io = |source| Error::KernelRead {
        path: path.to_owned(),
        source,
    };
    let mut magic = [0u8; 4];
    file.seek(SeekFrom::Start(0)).map_err(io)?;
    let n = read_up_to(file, &mut magic).map_err(io)?;
    if n == 4 && magic == *b"\x7fELF" {
        return Ok(KernelFormat::Elf);
    }
    let mut hdrs = [0u8; 4];
    file.seek(SeekFrom::Start(0x202)).map_err(io)?;
    let n = read_up_to(file, &mut hdrs).map_err(io)?;
    if n == 4 && u32::from_le_bytes(hdrs) == HDRS_MAGIC {
        return Ok(KernelFormat::BzImage);
    }
    Err(Error::UnknownKernelFormat(path.to_owned()))
}

fn read_up_to(file: &mut File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match file.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

/// Checks a bzImage's setup header against the file: the protocol must have
/// a 64-bit entry, and the file must hold all the code the header announces
/// (linux-loader would load a truncated image without a word).
fn check_bzimage(path: &Path, file: &mut File) -> Result<()> {
    let io = |source| Error::KernelRead {
        path: path.to_owned(),
        source,
    };
    let len = file.metadata().map_err(io)?.len();
    let mut raw = [0u8; 0x80];
    file.seek(SeekFrom::Start(SETUP_HEADER_OFFSET))
        .map_err(io)?;
    if read_up_to(file, &mut raw).map_err(io)? < raw.len() {
        return Err(Error::TruncatedKernel(path.to_owned()));
    }
    // Offsets relative to 0x1f1 (Documentation/x86/boot.rst).
    let setup_sects = match raw[0] {
        0 => 4u64,
        n => u64::from(n),
    };
    let syssize = u64::from(u32::from_le_bytes([raw[3], raw[4], raw[5], raw[6]]));
    let version = u16::from_le_bytes([raw[0x206 - 0x1f1], raw[0x207 - 0x1f1]]);
    let xloadflags = u16::from_le_bytes([raw[0x236 - 0x1f1], raw[0x237 - 0x1f1]]);
    if version < MIN_BOOT_PROTOCOL || xloadflags & XLF_KERNEL_64 == 0 {
        return Err(Error::NoLongModeEntry(path.to_owned()));
    }
    let needed = (setup_sects + 1) * 512 + syssize * 16;
    if len < needed {
        return Err(Error::TruncatedKernel(path.to_owned()));
    }
    Ok(())
}

/// Loads the kernel at `path` into `mem`: an ELF vmlinux where its program
/// headers say, a bzImage's protected-mode code at 1 MiB.
pub fn load_kernel(mem: &GuestMemoryMmap, path: &Path) -> Result<LoadedKernel> {
    let mut file = File::open(path).map_err(|source| Error::KernelOpen {
        path: path.to_owned(),
        source,
    })?;
    let format = detect_format(path, &mut file)?;
    if format == KernelFormat::BzImage {
        check_bzimage(path, &mut file)?;
    }
    file.seek(SeekFrom::Start(0))
        .map_err(|source| Error::KernelRead {
            path: path.to_owned(),
            source,
        })?;
    let himem = Some(GuestAddress(layout::HIMEM_START));
    let load = |source| Error::KernelLoad {
        path: path.to_owned(),
        source,
    };
    match format {
        KernelFormat::Elf => {
            let r = Elf::load(mem, None, &mut file, himem).map_err(load)?;
            Ok(LoadedKernel {
                format,
                entry: r.kernel_load.0,
                end: r.kernel_end,
                setup_header: None,
            })
        }
        KernelFormat::BzImage => {
            let r = BzImage::load(mem, None, &mut file, himem).map_err(load)?;
            Ok(LoadedKernel {
                format,
                entry: r.kernel_load.0 + BZIMAGE_64BIT_ENTRY_OFFSET,
                end: r.kernel_end,
                setup_header: r.setup_header,
            })
        }
    }
}
