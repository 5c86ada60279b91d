//! Giving guest pages back to the host.
//!
//! A range of private anonymous memory is dropped with `MADV_DONTNEED` (it
//! reads as zeros when touched again); shared memory (a memfd, hugetlbfs)
//! with `MADV_REMOVE`, which frees the file's pages too. Memory mapped
//! private from a file (a restored snapshot) goes back to the file's
//! content, which is what the guest had before: the balloon's pages have no
//! content the guest relies on.

use ember_memory::GuestMemoryMmap;
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

/// What a discard gave back.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Discarded {
    /// Bytes given back.
    pub bytes: u64,
}

/// Gives back `len` bytes of guest memory at `addr`, which must lie within
/// one memory region, page-aligned.
#[allow(unsafe_code)]
pub fn discard(mem: &GuestMemoryMmap, addr: u64, len: u64) -> Result<Discarded, String> {
    if len == 0 {
        return Ok(Discarded::default());
    }
    if addr % 4096 != 0 || len % 4096 != 0 {
        return Err("not page-aligned".into());
    }
    let region = mem
        .find_region(GuestAddress(addr))
        .ok_or_else(|| "outside guest memory".to_string())?;
    let offset = addr - region.start_addr().0;
    if offset.checked_add(len).is_none_or(|end| end > region.len()) {
        return Err("runs past the end of its memory region".into());
    }
    let host = mem
        .get_host_address(GuestAddress(addr))
        .map_err(|e| e.to_string())?;
    let shared = vm_memory::mmap::MmapRegion::flags(region) & libc::MAP_SHARED != 0;
    let advice = if shared {
        libc::MADV_REMOVE
    } else {
        libc::MADV_DONTNEED
    };
    let len_usize = usize::try_from(len).map_err(|e| e.to_string())?;
    // SAFETY: [host, host + len) lies inside one region's live mapping
    // (checked above against the region's bounds). Dropping the pages
    // changes their content, never the mapping; the guest gave them up.
    let rc = unsafe { libc::madvise(host.cast(), len_usize, advice) };
    if rc != 0 {
        return Err(format!(
            "madvise({}): {}",
            if shared {
                "MADV_REMOVE"
            } else {
                "MADV_DONTNEED"
            },
            std::io::Error::last_os_error()
        ));
    }
    Ok(Discarded { bytes: len })
}
