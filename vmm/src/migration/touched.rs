//! Which pages of guest memory were ever touched, from the kernel's page
//! map: a page that is neither present nor swapped out in an anonymous
//! private mapping has never been written (or was dropped), so it reads as
//! zeros and the first pre-copy pass need not read it at all. An idle
//! 4 GiB guest touches a few percent of its memory: the pass reads those
//! instead of faulting in and testing a million zero pages.
//!
//! Only where "not present" means "zero": anonymous private memory that
//! ember filled itself. Not for memory mapped from a file or a memfd
//! (pages may be in the file but not mapped here), nor for memory a
//! userfaultfd handler fills on first touch (a snapshot's `Uffd` backend),
//! nor while a post-copy still brings pages in: the caller decides.

use std::fs::File;
use std::os::unix::fs::FileExt;

use ember_memory::GuestMemoryMmap;
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

/// `/proc/self/pagemap`: 8 bytes a page; bit 63 present, bit 62 swapped.
const PRESENT: u64 = 1 << 63;
const SWAPPED: u64 = 1 << 62;
/// Page-map entries read at a time (512 KiB).
const CHUNK: usize = 65536;

/// Opens this process's page map (before the migration thread's filter:
/// it may not open files).
pub fn open_pagemap() -> Option<File> {
    match File::open("/proc/self/pagemap") {
        Ok(f) => Some(f),
        Err(e) => {
            log::info!("migration: no /proc/self/pagemap ({e}): the first pass reads every page");
            None
        }
    }
}

/// One bitmap per region (KVM's dirty-log layout): the pages that may hold
/// data. Every page of a file-backed region is marked.
pub fn touched_pages(mem: &GuestMemoryMmap, pagemap: &File) -> std::io::Result<Vec<Vec<u64>>> {
    let mut maps = Vec::new();
    let mut entries = vec![0u8; CHUNK * 8];
    for region in mem.iter() {
        let pages = usize::try_from(region.len()).unwrap_or(0) / 4096;
        let mut map = vec![0u64; pages.div_ceil(64)];
        if region.file_offset().is_some() {
            for p in 0..pages {
                map[p / 64] |= 1 << (p % 64);
            }
            maps.push(map);
            continue;
        }
        let first = region.as_ptr() as u64 / 4096;
        let mut p = 0;
        while p < pages {
            let n = (pages - p).min(CHUNK);
            let buf = &mut entries[..n * 8];
            pagemap.read_exact_at(buf, (first + p as u64) * 8)?;
            for (i, e) in buf.chunks_exact(8).enumerate() {
                let e = u64::from_le_bytes(e.try_into().unwrap_or([0; 8]));
                if e & (PRESENT | SWAPPED) != 0 {
                    map[(p + i) / 64] |= 1 << ((p + i) % 64);
                }
            }
            p += n;
        }
        maps.push(map);
    }
    Ok(maps)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestAddress};

    #[test]
    fn written_pages_are_marked_and_untouched_ones_are_not() {
        let mem = GuestMemoryMmap::from_ranges(&[
            (GuestAddress(0), 1 << 20),
            (GuestAddress(1 << 32), 1 << 20),
        ])
        .unwrap();
        mem.write_obj(7u8, GuestAddress(3 * 4096 + 5)).unwrap();
        mem.write_obj(9u8, GuestAddress((1 << 32) + 200 * 4096))
            .unwrap();
        let pm = open_pagemap().expect("/proc/self/pagemap");
        let maps = touched_pages(&mem, &pm).unwrap();
        let marked: Vec<(usize, usize)> = maps
            .iter()
            .enumerate()
            .flat_map(|(r, m)| {
                (0..256)
                    .filter(move |p| m[p / 64] & (1 << (p % 64)) != 0)
                    .map(move |p| (r, p))
            })
            .collect();
        assert_eq!(marked, vec![(0, 3), (1, 200)]);
    }
}
