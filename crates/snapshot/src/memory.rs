//! The memory file: guest RAM regions laid end to end, in guest address
//! order, each at the [`MemoryRegion::file_offset`] the state file records.
//!
//! A **full** snapshot writes every page that is not all zeros; zero pages
//! stay holes of a sparse file, so an idle 4 GiB guest takes little disk.
//! A **diff** writes only the pages a dirty bitmap marks, zero or not (a
//! page the guest zeroed must overwrite the base's old content), into the
//! same layout: [`apply_diff`] copies a diff's data ranges onto a full
//! snapshot's file, giving the full snapshot of the later moment.
//!
//! ```
//! use ember_snapshot::memory::{write_memory, Pages};
//! use ember_memory::GuestMemoryMmap;
//! use vm_memory::{Bytes, GuestAddress};
//!
//! let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
//! mem.write_slice(b"hello", GuestAddress(0x3000)).unwrap();
//! let file = vmm_sys_util::tempfile::TempFile::new().unwrap().into_file();
//! let (regions, stats) = write_memory(&file, &mem, Pages::NonZero).unwrap();
//! assert_eq!(regions[0].size, 1 << 20);
//! assert_eq!(stats.pages_written, 1);
//! assert_eq!(file.metadata().unwrap().len(), 1 << 20);
//! ```

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;

use serde::{Deserialize, Serialize};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

/// The page size of the memory file's holes and of dirty bitmaps.
pub const PAGE_SIZE: u64 = PAGE as u64;
const PAGE: usize = 4096;
const CHUNK: usize = 1 << 20;

/// One guest RAM region and where it is in the memory file.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemoryRegion {
    /// Guest physical address.
    pub guest_addr: u64,
    /// Bytes.
    pub size: u64,
    /// Offset in the memory file.
    pub file_offset: u64,
}

/// Which pages to write.
#[derive(Clone, Copy, Debug)]
pub enum Pages<'a> {
    /// Every page that is not all zeros.
    NonZero,
    /// The pages whose bit is set: one bitmap per region, bit `i` of word
    /// `i / 64` for the region's page `i`.
    Dirty(&'a [Vec<u64>]),
}

/// What [`write_memory`] did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct WriteStats {
    /// Pages written.
    pub pages_written: u64,
    /// The file's apparent length (all regions).
    pub file_len: u64,
}

/// The regions of `mem` as the memory file lays them out.
pub fn layout<M: GuestMemoryBackend>(mem: &M) -> Vec<MemoryRegion> {
    let mut offset = 0;
    mem.iter()
        .map(|r| {
            let region = MemoryRegion {
                guest_addr: r.start_addr().0,
                size: r.len(),
                file_offset: offset,
            };
            offset += r.len();
            region
        })
        .collect()
}

/// The memory file length the regions need.
pub fn required_len(regions: &[MemoryRegion]) -> u64 {
    regions
        .iter()
        .map(|r| r.file_offset.saturating_add(r.size))
        .max()
        .unwrap_or(0)
}

fn is_zero(page: &[u8]) -> bool {
    let (head, words, tail) = {
        // SAFETY: any bit pattern is a valid u64; align_to only reinterprets
        // the aligned middle of the slice.
        unsafe { page.align_to::<u64>() }
    };
    head.iter().all(|&b| b == 0) && tail.iter().all(|&b| b == 0) && words.iter().all(|&w| w == 0)
}

fn bit(bitmap: &[u64], page: u64) -> bool {
    usize::try_from(page / 64)
        .ok()
        .and_then(|w| bitmap.get(w))
        .is_some_and(|w| w & (1 << (page % 64)) != 0)
}

/// Writes `mem` into `file` (truncated first, so what is not written is a
/// hole) and returns the layout the state file records.
pub fn write_memory<M: GuestMemoryBackend>(
    file: &File,
    mem: &M,
    pages: Pages<'_>,
) -> std::io::Result<(Vec<MemoryRegion>, WriteStats)> {
    let regions = layout(mem);
    let total = required_len(&regions);
    file.set_len(0)?;
    file.set_len(total)?;
    let mut stats = WriteStats {
        pages_written: 0,
        file_len: total,
    };
    let mut buf = vec![0u8; CHUNK];
    let page = PAGE;
    for (index, (region, r)) in mem.iter().zip(&regions).enumerate() {
        let dirty = match pages {
            Pages::NonZero => None,
            Pages::Dirty(maps) => Some(maps.get(index).map(Vec::as_slice).unwrap_or(&[])),
        };
        let slice = region
            .as_volatile_slice()
            .map_err(|e| std::io::Error::other(format!("guest memory: {e}")))?;
        let mut off = 0usize;
        let len = usize::try_from(r.size).map_err(std::io::Error::other)?;
        while off < len {
            let n = CHUNK.min(len - off);
            let first_page = (off / page) as u64;
            // Skip a chunk with no dirty page without copying it.
            if let Some(map) = dirty {
                if !(0..(n / page) as u64).any(|p| bit(map, first_page + p)) {
                    off += n;
                    continue;
                }
            }
            let sub = slice
                .subslice(off, n)
                .map_err(|e| std::io::Error::other(format!("guest memory: {e}")))?;
            sub.copy_to(&mut buf[..n]);
            // Write runs of wanted pages with one pwrite each.
            let mut p = 0usize;
            while p < n {
                let want = |q: usize| match dirty {
                    None => !is_zero(&buf[q..q + page]),
                    Some(map) => bit(map, first_page + (q / page) as u64),
                };
                if !want(p) {
                    p += page;
                    continue;
                }
                let start = p;
                while p < n && want(p) {
                    p += page;
                }
                file.write_all_at(&buf[start..p], r.file_offset + (off + start) as u64)?;
                stats.pages_written += ((p - start) / page) as u64;
            }
            off += n;
        }
    }
    Ok((regions, stats))
}

fn seek(file: &File, offset: u64, whence: libc::c_int) -> std::io::Result<Option<u64>> {
    let off = libc::off_t::try_from(offset).map_err(std::io::Error::other)?;
    // SAFETY: lseek on an fd the caller's File owns; no memory is passed.
    let r = unsafe { libc::lseek(file.as_raw_fd(), off, whence) };
    if r < 0 {
        let e = std::io::Error::last_os_error();
        // ENXIO: no data (or hole) at or after `offset`.
        if e.raw_os_error() == Some(libc::ENXIO) {
            return Ok(None);
        }
        return Err(e);
    }
    Ok(u64::try_from(r).ok())
}

/// Copies every data range of the diff memory file `diff` onto `base` at
/// the same offsets; returns the bytes copied. `base` must be at least as
/// long as `diff` (both have the same VM's layout).
pub fn apply_diff(base: &File, diff: &File) -> std::io::Result<u64> {
    let diff_len = diff.metadata()?.len();
    let base_len = base.metadata()?.len();
    if base_len < diff_len {
        return Err(std::io::Error::other(format!(
            "the base memory file is {base_len} bytes, the diff {diff_len}: not the same VM"
        )));
    }
    let mut copied = 0u64;
    let mut at = 0u64;
    let mut buf = vec![0u8; CHUNK];
    while at < diff_len {
        let Some(start) = seek(diff, at, libc::SEEK_DATA)? else {
            break;
        };
        let end = seek(diff, start, libc::SEEK_HOLE)?
            .unwrap_or(diff_len)
            .min(diff_len);
        let mut pos = start;
        while pos < end {
            let n = usize::try_from((end - pos).min(CHUNK as u64)).unwrap_or(CHUNK);
            diff.read_exact_at(&mut buf[..n], pos)?;
            base.write_all_at(&buf[..n], pos)?;
            pos += n as u64;
            copied += n as u64;
        }
        at = end;
    }
    Ok(copied)
}

/// Bytes of `file` that hold data (not holes), from its block count.
pub fn allocated_bytes(file: &File) -> std::io::Result<u64> {
    use std::os::unix::fs::MetadataExt;
    Ok(file.metadata()?.blocks() * 512)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ember_memory::GuestMemoryMmap;
    use vm_memory::{Bytes, GuestAddress};
    use vmm_sys_util::tempfile::TempFile;

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[
            (GuestAddress(0), 4 << 20),
            (GuestAddress(1 << 32), 2 << 20),
        ])
        .unwrap()
    }

    fn tmp() -> File {
        TempFile::new().unwrap().into_file()
    }

    #[test]
    fn write_memory_full_skips_zero_pages_and_keeps_layout() {
        let m = mem();
        m.write_slice(&[7; 10], GuestAddress(0x1000)).unwrap();
        m.write_slice(&[9; 5000], GuestAddress((1 << 32) + 0x10_0000))
            .unwrap();
        let f = tmp();
        let (regions, stats) = write_memory(&f, &m, Pages::NonZero).unwrap();
        assert_eq!(regions.len(), 2);
        assert_eq!(regions[1].file_offset, 4 << 20);
        assert_eq!(stats.pages_written, 1 + 2);
        assert_eq!(f.metadata().unwrap().len(), 6 << 20);
        let mut b = [0u8; 10];
        f.read_exact_at(&mut b, 0x1000).unwrap();
        assert_eq!(b, [7; 10]);
        f.read_exact_at(&mut b, (4 << 20) + 0x10_0000 + 4990)
            .unwrap();
        assert_eq!(b, [9; 10]);
        assert!(allocated_bytes(&f).unwrap() < 1 << 20);
    }

    #[test]
    fn write_memory_dirty_writes_marked_pages_even_zero() {
        let m = mem();
        m.write_slice(&[1; 4096], GuestAddress(0)).unwrap();
        m.write_slice(&[2; 4096], GuestAddress(0x2000)).unwrap();
        // Page 1 (zero) and page 2 dirty in region 0, nothing in region 1.
        let maps = vec![vec![0b110u64], vec![]];
        let f = tmp();
        let (_, stats) = write_memory(&f, &m, Pages::Dirty(&maps)).unwrap();
        assert_eq!(stats.pages_written, 2);
        let mut b = [9u8; 4];
        f.read_exact_at(&mut b, 0).unwrap();
        assert_eq!(b, [0; 4], "page 0 was not dirty: a hole");
        f.read_exact_at(&mut b, 0x2000).unwrap();
        assert_eq!(b, [2; 4]);
    }

    #[test]
    fn apply_diff_overwrites_only_diff_pages_including_zeroed_ones() {
        let m = mem();
        m.write_slice(&[1; 8192], GuestAddress(0)).unwrap();
        m.write_slice(&[3; 4096], GuestAddress(0x5000)).unwrap();
        let base = tmp();
        write_memory(&base, &m, Pages::NonZero).unwrap();
        // The guest zeroes page 1 and writes page 5.
        m.write_slice(&[0; 4096], GuestAddress(0x1000)).unwrap();
        m.write_slice(&[4; 4096], GuestAddress(0x5000)).unwrap();
        let maps = vec![vec![(1 << 1) | (1 << 5)], vec![]];
        let diff = tmp();
        write_memory(&diff, &m, Pages::Dirty(&maps)).unwrap();
        let copied = apply_diff(&base, &diff).unwrap();
        assert_eq!(copied, 2 * 4096);
        let full_now = tmp();
        write_memory(&full_now, &m, Pages::NonZero).unwrap();
        let mut a = vec![0u8; 6 << 20];
        let mut b = vec![0u8; 6 << 20];
        base.read_exact_at(&mut a, 0).unwrap();
        full_now.read_exact_at(&mut b, 0).unwrap();
        assert!(a == b, "base + diff equals a full snapshot of now");
    }

    #[test]
    fn apply_diff_refuses_a_shorter_base() {
        let (a, b) = (tmp(), tmp());
        a.set_len(4096).unwrap();
        b.set_len(8192).unwrap();
        assert!(apply_diff(&a, &b).is_err());
    }
}
