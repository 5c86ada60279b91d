//! The dirty bitmap of a guest memory region: one bit per 4 KiB page that
//! every write through vm-memory marks (ember's own writes into guest
//! memory: device data, used rings), or nothing at all when off. KVM's
//! dirty log covers the guest's writes; a diff snapshot and a live
//! migration's rounds unite the two. Ember keeps it on for every VM (as
//! Cloud Hypervisor does), so a migration can start at any time.

use vm_memory::bitmap::{AtomicBitmap, Bitmap, NewBitmap, RefSlice, WithBitmapSlice};

/// An [`AtomicBitmap`] that may be absent.
#[derive(Debug, Default)]
pub struct DirtyBitmap(Option<AtomicBitmap>);

impl DirtyBitmap {
    /// A bitmap for `len` bytes of memory when `on`, else none.
    pub fn new(on: bool, len: usize) -> Self {
        DirtyBitmap(on.then(|| AtomicBitmap::with_len(len)))
    }

    /// The pages marked since the last call, reset (bit `i` of word
    /// `i / 64` for page `i`); empty when tracking is off.
    pub fn take(&self) -> Vec<u64> {
        self.0
            .as_ref()
            .map(AtomicBitmap::get_and_reset)
            .unwrap_or_default()
    }

    /// Marks `len` bytes from byte `offset` of the region dirty.
    pub fn mark(&self, offset: usize, len: usize) {
        if let Some(b) = &self.0 {
            b.set_addr_range(offset, len);
        }
    }

    /// Whether tracking is on.
    pub fn is_on(&self) -> bool {
        self.0.is_some()
    }
}

impl<'a> WithBitmapSlice<'a> for DirtyBitmap {
    type S = Option<RefSlice<'a, AtomicBitmap>>;
}

impl Bitmap for DirtyBitmap {
    fn mark_dirty(&self, offset: usize, len: usize) {
        self.mark(offset, len);
    }

    fn dirty_at(&self, offset: usize) -> bool {
        self.0.as_ref().is_some_and(|b| b.dirty_at(offset))
    }

    fn slice_at(&self, offset: usize) -> <Self as WithBitmapSlice<'_>>::S {
        self.0.as_ref().map(|b| b.slice_at(offset))
    }
}

impl NewBitmap for DirtyBitmap {
    /// Off: regions made by `from_ranges` (tests, tools) track nothing.
    fn with_len(_len: usize) -> Self {
        DirtyBitmap(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::GuestMemoryMmap;
    use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

    fn region_bitmap(mem: &GuestMemoryMmap) -> &DirtyBitmap {
        vm_memory::mmap::MmapRegion::bitmap(mem.iter().next().unwrap())
    }

    #[test]
    fn dirty_bitmap_marks_writes_through_vm_memory_when_on() {
        let ml = crate::MemoryLayout::new(16).unwrap();
        let mem = ml.create_guest_memory_tracked(true).unwrap();
        mem.write_obj(7u32, GuestAddress(0x5004)).unwrap();
        let s = mem.get_slice(GuestAddress(0x9000), 0x2000).unwrap();
        s.write_slice(&[1; 0x2000], 0).unwrap();
        let map = region_bitmap(&mem).take();
        assert_eq!(map[0], (1 << 5) | (1 << 9) | (1 << 10));
        assert_eq!(region_bitmap(&mem).take()[0], 0, "take resets");
        assert!(mem.iter().next().unwrap().len() > 0);
    }

    #[test]
    fn dirty_bitmap_off_costs_nothing_and_reads_empty() {
        let ml = crate::MemoryLayout::new(16).unwrap();
        let mem = ml.create_guest_memory().unwrap();
        mem.write_obj(7u32, GuestAddress(0x5004)).unwrap();
        assert!(!region_bitmap(&mem).is_on());
        assert!(region_bitmap(&mem).take().is_empty());
    }
}
