//! The files a jail needs to exec the running binary: the binary, its ELF
//! interpreter (`PT_INTERP`) and the shared libraries mapped right now.

use std::ffi::OsString;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::ffi::OsStringExt;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::spec::JailFile;

/// Where the kernel lists this process's mappings.
const MAPS: &str = "/proc/self/maps";

/// `PT_INTERP`: the program header naming the ELF interpreter.
const PT_INTERP: u32 = 3;

/// The longest interpreter path read (`PATH_MAX`).
const MAX_INTERP_LEN: u64 = 4096;

/// The files a jail needs to exec the binary that is running now: the
/// binary itself at `inside`, its ELF interpreter at the interpreter's
/// path (none for a static binary), and every shared library this process
/// has mapped, each at its own path; all read-only.
///
/// Libraries the program would only `dlopen` later (NSS modules, for one)
/// are not mapped yet and so not listed.
pub fn current_exe_files(inside: &Path) -> Result<Vec<JailFile>> {
    let exe = std::env::current_exe().map_err(|source| Error::Exe {
        path: PathBuf::from("/proc/self/exe"),
        source,
    })?;
    let mut files = vec![JailFile::read_only(&exe, inside)];
    let mut add = |path: PathBuf| {
        if !files.iter().any(|f| f.inside == path) {
            files.push(JailFile::read_only(path.clone(), path));
        }
    };
    if let Some(interp) = elf_interpreter(&exe)? {
        add(interp);
    }
    let maps = std::fs::read_to_string(MAPS).map_err(|source| Error::Exe {
        path: PathBuf::from(MAPS),
        source,
    })?;
    for lib in mapped_libraries(&maps) {
        if lib != exe {
            add(lib);
        }
    }
    Ok(files)
}

/// The `PT_INTERP` path of ELF file `path`, or `None` if it has none
/// (a static binary).
pub(crate) fn elf_interpreter(path: &Path) -> Result<Option<PathBuf>> {
    let io_err = |source| Error::Exe {
        path: path.to_path_buf(),
        source,
    };
    let bad = |reason| Error::Elf {
        path: path.to_path_buf(),
        reason,
    };
    let mut file = File::open(path).map_err(io_err)?;
    let mut header = [0u8; 64];
    file.read_exact(&mut header)
        .map_err(|_| bad("shorter than an ELF header"))?;
    let elf = ElfHeader::parse(&header).ok_or_else(|| bad("bad ELF header"))?;
    for i in 0..u64::from(elf.phnum) {
        let mut ph = [0u8; 56];
        let entry = ph
            .get_mut(..elf.entry_len())
            .ok_or_else(|| bad("bad program header size"))?;
        let offset = i
            .checked_mul(u64::from(elf.phentsize))
            .and_then(|o| o.checked_add(elf.phoff))
            .ok_or_else(|| bad("program headers out of range"))?;
        file.seek(SeekFrom::Start(offset)).map_err(io_err)?;
        file.read_exact(entry)
            .map_err(|_| bad("program headers past the end of the file"))?;
        let Some((p_type, p_offset, p_filesz)) = elf.program_header(entry) else {
            return Err(bad("bad program header"));
        };
        if p_type != PT_INTERP {
            continue;
        }
        if p_filesz == 0 || p_filesz > MAX_INTERP_LEN {
            return Err(bad("bad PT_INTERP size"));
        }
        let mut interp = Vec::new();
        file.seek(SeekFrom::Start(p_offset)).map_err(io_err)?;
        file.by_ref()
            .take(p_filesz)
            .read_to_end(&mut interp)
            .map_err(io_err)?;
        let end = interp.iter().position(|b| *b == 0).unwrap_or(interp.len());
        interp.truncate(end);
        if interp.first() != Some(&b'/') {
            return Err(bad("PT_INTERP is not an absolute path"));
        }
        return Ok(Some(PathBuf::from(OsString::from_vec(interp))));
    }
    Ok(None)
}

/// The fields of an ELF header needed to walk the program headers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct ElfHeader {
    is64: bool,
    little: bool,
    phoff: u64,
    phentsize: u16,
    phnum: u16,
}

impl ElfHeader {
    fn parse(h: &[u8; 64]) -> Option<Self> {
        if h.get(..4)? != b"\x7fELF" {
            return None;
        }
        let is64 = match h.get(4)? {
            1 => false,
            2 => true,
            _ => return None,
        };
        let little = match h.get(5)? {
            1 => true,
            2 => false,
            _ => return None,
        };
        let r = Reader { bytes: h, little };
        let (phoff, phentsize, phnum) = if is64 {
            (r.u64(32)?, r.u16(54)?, r.u16(56)?)
        } else {
            (u64::from(r.u32(28)?), r.u16(42)?, r.u16(44)?)
        };
        let want = if is64 { 56 } else { 32 };
        (phentsize >= want).then_some(ElfHeader {
            is64,
            little,
            phoff,
            phentsize,
            phnum,
        })
    }

    /// The bytes of a program header that are read (`Elf64_Phdr` or `Elf32_Phdr`).
    fn entry_len(&self) -> usize {
        if self.is64 {
            56
        } else {
            32
        }
    }

    /// `(p_type, p_offset, p_filesz)` of one program header.
    fn program_header(&self, ph: &[u8]) -> Option<(u32, u64, u64)> {
        let r = Reader {
            bytes: ph,
            little: self.little,
        };
        if self.is64 {
            Some((r.u32(0)?, r.u64(8)?, r.u64(32)?))
        } else {
            Some((r.u32(0)?, u64::from(r.u32(4)?), u64::from(r.u32(16)?)))
        }
    }
}

/// Bounds-checked integer reads in the file's byte order.
struct Reader<'a> {
    bytes: &'a [u8],
    little: bool,
}

impl Reader<'_> {
    fn array<const N: usize>(&self, at: usize) -> Option<[u8; N]> {
        self.bytes.get(at..at.checked_add(N)?)?.try_into().ok()
    }

    fn u16(&self, at: usize) -> Option<u16> {
        let a = self.array(at)?;
        Some(if self.little {
            u16::from_le_bytes(a)
        } else {
            u16::from_be_bytes(a)
        })
    }

    fn u32(&self, at: usize) -> Option<u32> {
        let a = self.array(at)?;
        Some(if self.little {
            u32::from_le_bytes(a)
        } else {
            u32::from_be_bytes(a)
        })
    }

    fn u64(&self, at: usize) -> Option<u64> {
        let a = self.array(at)?;
        Some(if self.little {
            u64::from_le_bytes(a)
        } else {
            u64::from_be_bytes(a)
        })
    }
}

/// The file-backed shared libraries in a `/proc/<pid>/maps` text, each
/// once, in order: paths whose file name has `.so` as a whole suffix or
/// before a version (`libc.so.6`); deleted files are skipped.
pub(crate) fn mapped_libraries(maps: &str) -> Vec<PathBuf> {
    let mut libs: Vec<PathBuf> = Vec::new();
    for line in maps.lines() {
        // address perms offset dev inode pathname
        let mut rest = line;
        for _ in 0..5 {
            rest = rest.trim_start().split_once(' ').map_or("", |(_, r)| r);
        }
        let path = rest.trim_start();
        if !path.starts_with('/') || path.ends_with(" (deleted)") {
            continue;
        }
        let name = path.rsplit('/').next().unwrap_or_default();
        let is_lib = name.ends_with(".so") || name.contains(".so.");
        let path = PathBuf::from(path);
        if is_lib && !libs.contains(&path) {
            libs.push(path);
        }
    }
    libs
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn elf_interpreter_of_test_binary_is_ld_linux() {
        let interp = elf_interpreter(Path::new("/proc/self/exe")).unwrap();
        assert_eq!(interp, Some(PathBuf::from("/lib64/ld-linux-x86-64.so.2")));
    }

    #[test]
    fn elf_interpreter_of_non_elf_is_an_error() {
        let err = elf_interpreter(Path::new("/proc/self/status")).unwrap_err();
        assert_eq!(
            err.to_string(),
            "/proc/self/status is not a valid ELF file: bad ELF header"
        );
        let err = elf_interpreter(Path::new("/nonexistent/bin")).unwrap_err();
        assert_eq!(err.to_string(), "cannot read /nonexistent/bin");
    }

    #[test]
    fn elf_header_without_interp_is_static() {
        // A minimal ELF64 little-endian header with one PT_LOAD header.
        let mut elf = vec![0u8; 64 + 56];
        elf[..4].copy_from_slice(b"\x7fELF");
        elf[4] = 2;
        elf[5] = 1;
        elf[32..40].copy_from_slice(&64u64.to_le_bytes());
        elf[54..56].copy_from_slice(&56u16.to_le_bytes());
        elf[56..58].copy_from_slice(&1u16.to_le_bytes());
        elf[64..68].copy_from_slice(&1u32.to_le_bytes());
        let path = std::env::temp_dir().join(format!("ember-jail-static-{}", std::process::id()));
        std::fs::write(&path, &elf).unwrap();
        let got = elf_interpreter(&path);
        std::fs::remove_file(&path).unwrap();
        assert_eq!(got.unwrap(), None);
    }

    #[test]
    fn elf_header_truncated_program_headers_are_an_error() {
        let header: [u8; 64] = {
            let mut h = [0u8; 64];
            h[..4].copy_from_slice(b"\x7fELF");
            h[4] = 2;
            h[5] = 1;
            h[54..56].copy_from_slice(&8u16.to_le_bytes());
            h
        };
        // Program headers smaller than Elf64_Phdr are refused.
        assert_eq!(ElfHeader::parse(&header), None);
    }

    #[test]
    fn mapped_libraries_parses_sample_maps() {
        let maps = "\
55d0c0a00000-55d0c0a2a000 r--p 00000000 fe:00 1234 /usr/bin/ember
7f00aa000000-7f00aa028000 r--p 00000000 fe:00 222 /usr/lib/x86_64-linux-gnu/libc.so.6
7f00aa028000-7f00aa1bd000 r-xp 00028000 fe:00 222 /usr/lib/x86_64-linux-gnu/libc.so.6
7f00ab000000-7f00ab001000 r--p 00000000 fe:00 333 /opt/my libs/libfoo.so
7f00ab100000-7f00ab101000 r--p 00000000 fe:00 334 /usr/lib/libgone.so.1 (deleted)
7f00ab200000-7f00ab201000 r--p 00000000 fe:00 335 /usr/lib/locale/C.utf8/LC_CTYPE
7f00ab300000-7f00ab301000 r--p 00000000 fe:00 336 /usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2
7ffd1c000000-7ffd1c021000 rw-p 00000000 00:00 0                          [stack]
7ffd1c1f0000-7ffd1c1f2000 r-xp 00000000 00:00 0                          [vdso]";
        assert_eq!(
            mapped_libraries(maps),
            vec![
                PathBuf::from("/usr/lib/x86_64-linux-gnu/libc.so.6"),
                PathBuf::from("/opt/my libs/libfoo.so"),
                PathBuf::from("/usr/lib/x86_64-linux-gnu/ld-linux-x86-64.so.2"),
            ]
        );
    }

    #[test]
    fn current_exe_files_lists_exe_interp_and_libc() {
        let files = current_exe_files(Path::new("/app")).unwrap();
        assert_eq!(files[0].inside, Path::new("/app"));
        assert_eq!(files[0].host, std::env::current_exe().unwrap());
        assert_eq!(files[1].inside, Path::new("/lib64/ld-linux-x86-64.so.2"));
        assert!(files.iter().all(|f| !f.writable));
        assert!(
            files.iter().any(|f| f
                .inside
                .file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("libc.so"))),
            "{files:?}"
        );
    }
}
