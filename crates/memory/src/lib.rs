//! Guest memory for x86_64 microVMs.
//!
//! This crate knows where things live in an x86_64 guest's physical address
//! space ([`layout`]), splits a RAM size into regions around the 32-bit MMIO
//! hole ([`MemoryLayout`]), describes that to the guest as an e820 map, and
//! maps the RAM with vm-memory (`MAP_PRIVATE | MAP_ANONYMOUS |
//! MAP_NORESERVE`, so a large guest costs nothing until it touches a page).
//!
//! ```
//! use ember_memory::{layout, E820Kind, MemoryLayout};
//! use vm_memory::GuestMemoryBackend;
//!
//! // A 4 GiB guest: 3 GiB below the MMIO hole, 1 GiB above 4 GiB.
//! let ml = MemoryLayout::new(4096).unwrap();
//! assert_eq!(ml.ram_regions().len(), 2);
//! assert_eq!(ml.ram_regions()[1].0, layout::MMIO_HOLE_END);
//! // RAM, and the PCI MMCONFIG area reserved.
//! assert_eq!(ml.e820().iter().filter(|e| e.kind == E820Kind::Reserved).count(), 1);
//!
//! let mem = ml.create_guest_memory().unwrap();
//! assert_eq!(mem.num_regions(), 2);
//! ```
#![forbid(unsafe_code)]

pub mod layout;

use vm_memory::GuestAddress;

pub mod dirty;

pub use dirty::DirtyBitmap;

/// Guest memory as every Ember crate uses it: mmap regions, each with a
/// [`DirtyBitmap`] that is on only when the VM tracks dirty pages.
pub type GuestMemoryMmap = vm_memory::GuestMemoryMmap<DirtyBitmap>;

/// A slice of [`GuestMemoryMmap`] (writes through it mark the bitmap).
pub type Slice<'a> = vm_memory::VolatileSlice<'a, vm_memory::bitmap::BS<'a, DirtyBitmap>>;

/// One MiB.
pub const MIB: u64 = 1 << 20;

/// Errors of this crate.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The memory size is zero.
    #[error("guest memory size must be at least 1 MiB")]
    ZeroSize,
    /// The memory size is too small to hold the boot structures and a kernel.
    #[error("guest memory of {0} MiB is too small: at least {min} MiB are needed", min = MIN_MEMORY_MIB)]
    TooSmall(u64),
    /// The memory size overflows the 64-bit address space or the guest's physical address width.
    #[error("guest memory of {size_mib} MiB does not fit in the guest's {phys_bits}-bit physical address space")]
    TooLarge {
        /// The requested size.
        size_mib: u64,
        /// The guest's physical address width.
        phys_bits: u8,
    },
    /// The host could not map the guest memory.
    #[error("the host cannot map {size_mib} MiB of guest memory")]
    Map {
        /// The requested size.
        size_mib: u64,
        /// What vm-memory reported.
        #[source]
        source: vm_memory::mmap::FromRangesError,
    },
}

/// Result type of this crate.
pub type Result<T> = std::result::Result<T, Error>;

/// Why guest memory cannot be mapped from a file.
#[derive(Debug, thiserror::Error)]
pub enum FileMapError {
    /// The file is shorter than the RAM it must hold.
    #[error("the memory file is {len} bytes, the guest's RAM needs {needed}")]
    TooShort {
        /// The file's length.
        len: u64,
        /// What the regions need.
        needed: u64,
    },
    /// The file cannot be read or mapped.
    #[error("cannot map the memory file: {0}")]
    Map(String),
}

/// Smallest guest this crate lays out: room for the boot structures below
/// 1 MiB and a kernel above it.
pub const MIN_MEMORY_MIB: u64 = 8;

/// What an e820 entry describes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum E820Kind {
    /// Usable RAM.
    Ram,
    /// Reserved: the guest must not use it as RAM.
    Reserved,
}

impl E820Kind {
    /// The e820 type number the Linux boot protocol uses.
    pub fn type_code(self) -> u32 {
        match self {
            E820Kind::Ram => 1,
            E820Kind::Reserved => 2,
        }
    }
}

/// One entry of the e820 memory map.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct E820Entry {
    /// First guest physical address.
    pub addr: u64,
    /// Size in bytes.
    pub size: u64,
    /// What it is.
    pub kind: E820Kind,
}

/// The RAM of one guest laid out around the 32-bit MMIO hole.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MemoryLayout {
    size_mib: u64,
    regions: Vec<(u64, u64)>,
}

impl MemoryLayout {
    /// Lays out `size_mib` MiB of RAM: up to the MMIO hole's start below
    /// 4 GiB, the rest from 4 GiB up.
    pub fn new(size_mib: u64) -> Result<Self> {
        if size_mib == 0 {
            return Err(Error::ZeroSize);
        }
        if size_mib < MIN_MEMORY_MIB {
            return Err(Error::TooSmall(size_mib));
        }
        let size = size_mib.checked_mul(MIB).ok_or(Error::TooLarge {
            size_mib,
            phys_bits: 64,
        })?;
        let below = size.min(layout::MMIO_HOLE_START);
        let mut regions = vec![(layout::RAM_START, below)];
        if size > below {
            let above = size - below;
            layout::MMIO_HOLE_END
                .checked_add(above)
                .ok_or(Error::TooLarge {
                    size_mib,
                    phys_bits: 64,
                })?;
            regions.push((layout::MMIO_HOLE_END, above));
        }
        Ok(MemoryLayout { size_mib, regions })
    }

    /// Checks that all RAM lies below `1 << phys_bits`, the guest's physical
    /// address width (CPUID 0x8000_0008), leaving room for 64-bit BARs.
    pub fn check_phys_bits(&self, phys_bits: u8) -> Result<()> {
        let limit = 1u64.checked_shl(u32::from(phys_bits)).unwrap_or(u64::MAX);
        if self.end_of_ram() > limit {
            return Err(Error::TooLarge {
                size_mib: self.size_mib,
                phys_bits,
            });
        }
        Ok(())
    }

    /// The RAM size in MiB.
    pub fn size_mib(&self) -> u64 {
        self.size_mib
    }

    /// The RAM regions as (guest address, size in bytes), in address order.
    pub fn ram_regions(&self) -> &[(u64, u64)] {
        &self.regions
    }

    /// The first address above the last byte of RAM.
    pub fn end_of_ram(&self) -> u64 {
        self.regions
            .last()
            .map(|&(start, size)| start + size)
            .unwrap_or(0)
    }

    /// The end (exclusive) of RAM below the MMIO hole.
    pub fn end_of_low_ram(&self) -> u64 {
        self.regions[0].0 + self.regions[0].1
    }

    /// Where 64-bit BARs may start: the first 1 GiB boundary above RAM and
    /// above 4 GiB.
    pub fn mmio64_start(&self) -> u64 {
        const GIB: u64 = 1 << 30;
        let end = self.end_of_ram().max(layout::MMIO_HOLE_END);
        end.div_ceil(GIB) * GIB
    }

    /// The e820 map the guest is given: low RAM up to the EBDA, RAM from
    /// 1 MiB to the hole (or the end of RAM), the PCI MMCONFIG area as
    /// reserved (Linux uses the MCFG's area only when the firmware reserved
    /// it), RAM above 4 GiB. The legacy area (EBDA to 1 MiB) and the rest
    /// of the MMIO hole are left out, so the guest never treats them as RAM.
    pub fn e820(&self) -> Vec<E820Entry> {
        let mut map = vec![E820Entry {
            addr: layout::RAM_START,
            size: layout::EBDA_START - layout::RAM_START,
            kind: E820Kind::Ram,
        }];
        let low_end = self.end_of_low_ram();
        if low_end > layout::HIMEM_START {
            map.push(E820Entry {
                addr: layout::HIMEM_START,
                size: low_end - layout::HIMEM_START,
                kind: E820Kind::Ram,
            });
        }
        map.push(E820Entry {
            addr: layout::PCI_MMCONFIG_START,
            size: layout::PCI_MMCONFIG_SIZE,
            kind: E820Kind::Reserved,
        });
        if let Some(&(start, size)) = self.regions.get(1) {
            map.push(E820Entry {
                addr: start,
                size,
                kind: E820Kind::Ram,
            });
        }
        map
    }

    /// Maps the guest's RAM from `file` (a snapshot's memory file), region
    /// `i` from byte `offsets[i]`, private and copy-on-write
    /// (`MAP_PRIVATE | MAP_NORESERVE`): nothing is copied up front, a page
    /// comes in from the page cache on its first touch, the guest's writes
    /// stay in this process, and clones mapped from one file share its
    /// unwritten pages.
    pub fn map_from_file(
        &self,
        file: &std::fs::File,
        offsets: &[u64],
        track_dirty: bool,
    ) -> std::result::Result<GuestMemoryMmap, FileMapError> {
        self.map_file(
            file,
            offsets,
            track_dirty,
            libc::MAP_PRIVATE | libc::MAP_NORESERVE,
        )
    }

    /// Maps the guest's RAM shared from `file` (a memfd, or one handed over
    /// by a live migration's source), region `i` from byte `offsets[i]`
    /// (`MAP_SHARED`): the guest's memory is the file's, seen by every
    /// process that maps it.
    pub fn map_shared(
        &self,
        file: &std::fs::File,
        offsets: &[u64],
        track_dirty: bool,
    ) -> std::result::Result<GuestMemoryMmap, FileMapError> {
        self.map_file(file, offsets, track_dirty, libc::MAP_SHARED)
    }

    /// Where each region lies in a file holding the whole RAM, regions one
    /// after the other: its offsets and the file's size.
    pub fn packed_offsets(&self) -> (Vec<u64>, u64) {
        let mut at = 0;
        let offsets = self
            .regions
            .iter()
            .map(|&(_, size)| {
                let o = at;
                at += size;
                o
            })
            .collect();
        (offsets, at)
    }

    fn map_file(
        &self,
        file: &std::fs::File,
        offsets: &[u64],
        track_dirty: bool,
        flags: i32,
    ) -> std::result::Result<GuestMemoryMmap, FileMapError> {
        use vm_memory::mmap::MmapRegionBuilder;
        use vm_memory::{FileOffset, GuestRegionMmap};
        let map = |e: String| FileMapError::Map(e);
        if offsets.len() != self.regions.len() {
            return Err(map(format!(
                "{} regions in the file's layout, {} in the guest's",
                offsets.len(),
                self.regions.len()
            )));
        }
        let len = file.metadata().map_err(|e| map(e.to_string()))?.len();
        // One descriptor shared by every region: who holds the memory can
        // tell the regions are in one file.
        let file = std::sync::Arc::new(file.try_clone().map_err(|e| map(e.to_string()))?);
        let mut regions = Vec::with_capacity(self.regions.len());
        for (&(start, size), &offset) in self.regions.iter().zip(offsets) {
            let needed = offset.saturating_add(size);
            if len < needed {
                return Err(FileMapError::TooShort { len, needed });
            }
            let size = usize::try_from(size).map_err(|e| map(e.to_string()))?;
            let region =
                MmapRegionBuilder::new_with_bitmap(size, DirtyBitmap::new(track_dirty, size))
                    .with_file_offset(FileOffset::from_arc(file.clone(), offset))
                    .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
                    .with_mmap_flags(flags)
                    .build()
                    .map_err(|e| map(e.to_string()))?;
            let region = GuestRegionMmap::new(region, GuestAddress(start))
                .ok_or_else(|| map("region overflows the address space".into()))?;
            regions.push(region);
        }
        GuestMemoryMmap::from_regions(regions).map_err(|e| map(e.to_string()))
    }

    /// Maps the RAM regions (anonymous, private, `MAP_NORESERVE`).
    pub fn create_guest_memory(&self) -> Result<GuestMemoryMmap> {
        self.create_guest_memory_tracked(false)
    }

    /// [`create_guest_memory`](Self::create_guest_memory), each region
    /// with a dirty bitmap when `track_dirty` (one bit per 4 KiB page).
    pub fn create_guest_memory_tracked(&self, track_dirty: bool) -> Result<GuestMemoryMmap> {
        use vm_memory::mmap::MmapRegionBuilder;
        use vm_memory::GuestRegionMmap;
        let too_large = |bits| Error::TooLarge {
            size_mib: self.size_mib,
            phys_bits: bits,
        };
        // No host maps more than its 47-bit user address space.
        if self.end_of_ram() > 1 << 47 {
            return Err(too_large(47));
        }
        let mut regions = Vec::with_capacity(self.regions.len());
        for &(start, size) in &self.regions {
            let size = usize::try_from(size).map_err(|_| too_large(64))?;
            let map_err = |e: vm_memory::mmap::MmapRegionError| Error::Map {
                size_mib: self.size_mib,
                source: vm_memory::mmap::FromRangesError::MmapRegion(e),
            };
            let region =
                MmapRegionBuilder::new_with_bitmap(size, DirtyBitmap::new(track_dirty, size))
                    .with_mmap_prot(libc::PROT_READ | libc::PROT_WRITE)
                    .with_mmap_flags(libc::MAP_ANONYMOUS | libc::MAP_NORESERVE | libc::MAP_PRIVATE)
                    .build()
                    .map_err(map_err)?;
            regions.push(GuestRegionMmap::new(region, GuestAddress(start)).ok_or(too_large(64))?);
        }
        GuestMemoryMmap::from_regions(regions).map_err(|e| Error::Map {
            size_mib: self.size_mib,
            source: vm_memory::mmap::FromRangesError::Collection(e),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestMemoryBackend};

    #[test]
    fn layout_zero_size_is_rejected() {
        assert!(matches!(MemoryLayout::new(0), Err(Error::ZeroSize)));
    }

    #[test]
    fn layout_tiny_size_is_rejected() {
        assert!(matches!(MemoryLayout::new(4), Err(Error::TooSmall(4))));
    }

    #[test]
    fn layout_small_guest_is_one_region_below_the_hole() {
        let ml = MemoryLayout::new(128).unwrap();
        assert_eq!(ml.ram_regions(), &[(0, 128 * MIB)]);
        assert_eq!(ml.end_of_ram(), 128 * MIB);
    }

    #[test]
    fn layout_guest_at_hole_start_has_no_high_region() {
        let ml = MemoryLayout::new(3072).unwrap();
        assert_eq!(ml.ram_regions(), &[(0, layout::MMIO_HOLE_START)]);
    }

    #[test]
    fn layout_large_guest_continues_above_4gib() {
        let ml = MemoryLayout::new(5120).unwrap();
        assert_eq!(
            ml.ram_regions(),
            &[
                (0, layout::MMIO_HOLE_START),
                (layout::MMIO_HOLE_END, 5120 * MIB - layout::MMIO_HOLE_START)
            ]
        );
        assert_eq!(ml.end_of_ram(), 5120 * MIB + layout::MMIO_HOLE_SIZE);
        let total: u64 = ml.ram_regions().iter().map(|r| r.1).sum();
        assert_eq!(total, 5120 * MIB);
    }

    #[test]
    fn layout_overflowing_size_is_rejected() {
        assert!(matches!(
            MemoryLayout::new(u64::MAX),
            Err(Error::TooLarge { .. })
        ));
    }

    #[test]
    fn layout_beyond_phys_bits_is_rejected() {
        let ml = MemoryLayout::new(1 << 20).unwrap(); // 1 TiB
        assert!(ml.check_phys_bits(48).is_ok());
        assert!(matches!(
            ml.check_phys_bits(39),
            Err(Error::TooLarge { phys_bits: 39, .. })
        ));
    }

    #[test]
    fn e820_small_guest_skips_legacy_area() {
        let ml = MemoryLayout::new(128).unwrap();
        let map = ml.e820();
        assert_eq!(
            map,
            vec![
                E820Entry {
                    addr: 0,
                    size: layout::EBDA_START,
                    kind: E820Kind::Ram
                },
                E820Entry {
                    addr: layout::HIMEM_START,
                    size: 128 * MIB - layout::HIMEM_START,
                    kind: E820Kind::Ram
                },
                E820Entry {
                    addr: layout::PCI_MMCONFIG_START,
                    size: layout::PCI_MMCONFIG_SIZE,
                    kind: E820Kind::Reserved
                },
            ]
        );
    }

    #[test]
    fn e820_never_covers_the_mmio_hole() {
        for mib in [8, 128, 3071, 3072, 3073, 5120, 65536] {
            let ml = MemoryLayout::new(mib).unwrap();
            for e in ml.e820().into_iter().filter(|e| e.kind == E820Kind::Ram) {
                let end = e.addr + e.size;
                assert!(
                    end <= layout::MMIO_HOLE_START || e.addr >= layout::MMIO_HOLE_END,
                    "{mib} MiB: {e:?} overlaps the hole"
                );
                assert!(
                    end <= layout::EBDA_START || e.addr >= layout::HIMEM_START,
                    "{mib} MiB: {e:?} overlaps the legacy area"
                );
            }
        }
    }

    #[test]
    fn e820_ram_adds_up_to_the_size_less_the_legacy_area() {
        let ml = MemoryLayout::new(5120).unwrap();
        let ram: u64 = ml
            .e820()
            .iter()
            .filter(|e| e.kind == E820Kind::Ram)
            .map(|e| e.size)
            .sum();
        assert_eq!(ram, 5120 * MIB - (layout::HIMEM_START - layout::EBDA_START));
    }

    #[test]
    fn mmio64_starts_above_ram_and_4gib() {
        assert_eq!(
            MemoryLayout::new(128).unwrap().mmio64_start(),
            layout::MMIO_HOLE_END
        );
        let ml = MemoryLayout::new(5120).unwrap();
        assert!(ml.mmio64_start() >= ml.end_of_ram());
        assert_eq!(ml.mmio64_start() % (1 << 30), 0);
    }

    #[test]
    fn guest_memory_spans_the_hole_and_is_usable() {
        let ml = MemoryLayout::new(4096).unwrap();
        let mem = ml.create_guest_memory().unwrap();
        assert_eq!(mem.num_regions(), 2);
        let high = GuestAddress(layout::MMIO_HOLE_END + 4096);
        mem.write_obj(0xdead_beef_u32, high).unwrap();
        assert_eq!(mem.read_obj::<u32>(high).unwrap(), 0xdead_beef);
        // The hole itself is not memory.
        assert!(mem
            .read_obj::<u32>(GuestAddress(layout::MMIO_HOLE_START))
            .is_err());
    }

    #[test]
    fn guest_memory_that_cannot_be_mapped_is_an_error() {
        // 2^46 MiB = 64 EiB of address space: no host can map that.
        let ml = MemoryLayout::new(1 << 43).unwrap();
        assert!(matches!(
            ml.create_guest_memory(),
            Err(Error::Map { .. }) | Err(Error::TooLarge { .. })
        ));
    }

    #[test]
    fn shared_mappings_of_one_file_see_each_others_writes() {
        // A 4 GiB layout has two regions; the file holds them packed.
        let ml = MemoryLayout::new(4096).unwrap();
        let (offsets, size) = ml.packed_offsets();
        assert_eq!(offsets, vec![0, ml.ram_regions()[0].1]);
        assert_eq!(size, 4096 << 20);
        let path = std::env::temp_dir().join(format!("ember-shared-{}", std::process::id()));
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        let _ = std::fs::remove_file(&path);
        file.set_len(size).unwrap();
        let a = ml.map_shared(&file, &offsets, true).unwrap();
        let b = ml.map_shared(&file, &offsets, false).unwrap();
        let high = GuestAddress(layout::MMIO_HOLE_END + 8192);
        a.write_obj(0x1234_5678_u32, high).unwrap();
        a.write_obj(7u8, GuestAddress(0x1000)).unwrap();
        assert_eq!(b.read_obj::<u32>(high).unwrap(), 0x1234_5678);
        assert_eq!(b.read_obj::<u8>(GuestAddress(0x1000)).unwrap(), 7);
        // A file too short for the layout is refused.
        file.set_len(size - 4096).unwrap();
        assert!(matches!(
            ml.map_shared(&file, &offsets, false),
            Err(FileMapError::TooShort { .. })
        ));
    }
}
