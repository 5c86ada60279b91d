//! Kernel images: format detection, checks linux-loader does not make, loading.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

use ember_memory::{layout, GuestMemoryMmap};
use linux_loader::loader::bootparam::setup_header;
use linux_loader::loader::elf::PvhBootCapability;
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
    /// The PVH entry point (an ELF kernel with the
    /// `XEN_ELFNOTE_PHYS32_ENTRY` note, Linux's `CONFIG_PVH`).
    pub pvh_entry: Option<u64>,
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
            let pvh_entry = match r.pvh_boot_cap {
                PvhBootCapability::PvhEntryPresent(at) => Some(at.0),
                _ => None,
            };
            Ok(LoadedKernel {
                format,
                entry: r.kernel_load.0,
                end: r.kernel_end,
                setup_header: None,
                pvh_entry,
            })
        }
        KernelFormat::BzImage => {
            let r = BzImage::load(mem, None, &mut file, himem).map_err(load)?;
            Ok(LoadedKernel {
                format,
                entry: r.kernel_load.0 + BZIMAGE_64BIT_ENTRY_OFFSET,
                end: r.kernel_end,
                setup_header: r.setup_header,
                pvh_entry: None,
            })
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ember_memory::MemoryLayout;
    use std::io::Write;

    struct Tmp(std::path::PathBuf);
    impl Drop for Tmp {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    fn file(name: &str, bytes: &[u8]) -> (Tmp, File) {
        let p = std::env::temp_dir().join(format!("ember-loader-{}-{name}", std::process::id()));
        std::fs::File::create(&p).unwrap().write_all(bytes).unwrap();
        let f = File::open(&p).unwrap();
        (Tmp(p), f)
    }

    /// A synthetic bzImage: `setup_sects` = 1, `syssize` paragraphs of code
    /// announced, `code` bytes present.
    fn bzimage(version: u16, xloadflags: u16, syssize: u32, code: usize) -> Vec<u8> {
        let mut b = vec![0u8; 1024 + code];
        b[0x1f1] = 1; // setup_sects: setup is 2 sectors with the boot sector
        b[0x1f4..0x1f8].copy_from_slice(&syssize.to_le_bytes());
        b[0x202..0x206].copy_from_slice(&HDRS_MAGIC.to_le_bytes());
        b[0x206..0x208].copy_from_slice(&version.to_le_bytes());
        b[0x211] = 1; // loadflags: LOADED_HIGH
        b[0x214..0x218].copy_from_slice(&0x10_0000u32.to_le_bytes()); // code32_start
        b[0x236..0x238].copy_from_slice(&xloadflags.to_le_bytes());
        b
    }

    #[test]
    fn detect_format_recognises_elf_and_bzimage() {
        let (t, mut f) = file("elf", b"\x7fELF\x02\x01\x01");
        assert_eq!(detect_format(&t.0, &mut f).unwrap(), KernelFormat::Elf);
        let (t, mut f) = file("bz", &bzimage(0x020f, 1, 1, 16));
        assert_eq!(detect_format(&t.0, &mut f).unwrap(), KernelFormat::BzImage);
    }

    #[test]
    fn detect_format_rejects_other_files() {
        for (name, bytes) in [
            ("empty", &b""[..]),
            ("short", b"\x7fEL"),
            ("text", b"hello world"),
        ] {
            let (t, mut f) = file(name, bytes);
            assert!(matches!(
                detect_format(&t.0, &mut f),
                Err(Error::UnknownKernelFormat(_))
            ));
        }
    }

    #[test]
    fn bzimage_shorter_than_its_header_says_is_truncated() {
        // 64 paragraphs (1024 bytes) announced, 512 present.
        let (t, mut f) = file("trunc", &bzimage(0x020f, 1, 64, 512));
        assert!(matches!(
            check_bzimage(&t.0, &mut f),
            Err(Error::TruncatedKernel(_))
        ));
        let (t, mut f) = file("whole", &bzimage(0x020f, 1, 64, 1024));
        assert!(check_bzimage(&t.0, &mut f).is_ok());
    }

    #[test]
    fn bzimage_without_64bit_entry_is_rejected() {
        let (t, mut f) = file("old", &bzimage(0x020a, 1, 1, 16));
        assert!(matches!(
            check_bzimage(&t.0, &mut f),
            Err(Error::NoLongModeEntry(_))
        ));
        let (t, mut f) = file("no64", &bzimage(0x020f, 0, 1, 16));
        assert!(matches!(
            check_bzimage(&t.0, &mut f),
            Err(Error::NoLongModeEntry(_))
        ));
    }

    #[test]
    fn bzimage_is_loaded_at_1mib_and_entered_at_plus_0x200() {
        let ml = MemoryLayout::new(16).unwrap();
        let mem = ml.create_guest_memory().unwrap();
        let mut img = bzimage(0x020f, 1, 2, 32);
        img[1024..1056].copy_from_slice(&[0xab; 32]);
        let t = Tmp(std::env::temp_dir().join(format!("ember-loader-{}-load", std::process::id())));
        std::fs::write(&t.0, &img).unwrap();
        let k = load_kernel(&mem, &t.0).unwrap();
        assert_eq!(k.format, KernelFormat::BzImage);
        assert_eq!(k.entry, 0x10_0200);
        assert!(k.setup_header.is_some());
        let mut first = [0u8; 4];
        vm_memory::Bytes::read_slice(&mem, &mut first, GuestAddress(0x10_0000)).unwrap();
        assert_eq!(first, [0xab; 4]);
    }

    #[test]
    fn missing_kernel_is_an_open_error_naming_the_file() {
        let mem = MemoryLayout::new(16)
            .unwrap()
            .create_guest_memory()
            .unwrap();
        let e = load_kernel(&mem, Path::new("/nonexistent/vmlinux")).unwrap_err();
        assert!(e.to_string().contains("/nonexistent/vmlinux"));
    }
}
