//! The guest's memory statistics (virtio 1.2, 5.5.6.3): a buffer of
//! 10-byte entries, a 16-bit tag and a 64-bit value, little-endian.

use std::collections::BTreeMap;

/// At most this many bytes of a statistics buffer are read (more tags than
/// virtio defines).
pub const MAX_BYTES: usize = 10 * 32;

/// The tags virtio defines.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
#[repr(u16)]
pub enum StatTag {
    /// Bytes swapped in.
    SwapIn = 0,
    /// Bytes swapped out.
    SwapOut = 1,
    /// Major faults.
    MajorFaults = 2,
    /// Minor faults.
    MinorFaults = 3,
    /// Free memory in bytes.
    FreeMemory = 4,
    /// Total memory in bytes.
    TotalMemory = 5,
    /// Available memory in bytes.
    AvailableMemory = 6,
    /// Disk caches in bytes.
    DiskCaches = 7,
    /// Successful hugetlb allocations.
    HugetlbAllocations = 8,
    /// Failed hugetlb allocations.
    HugetlbFailures = 9,
    /// OOM kills.
    OomKill = 10,
    /// Allocation stalls.
    AllocStall = 11,
    /// Pages scanned by kswapd.
    AsyncScan = 12,
    /// Pages scanned directly.
    DirectScan = 13,
    /// Pages reclaimed by kswapd.
    AsyncReclaim = 14,
    /// Pages reclaimed directly.
    DirectReclaim = 15,
}

impl StatTag {
    /// Every tag, in tag order.
    pub const ALL: [StatTag; 16] = [
        StatTag::SwapIn,
        StatTag::SwapOut,
        StatTag::MajorFaults,
        StatTag::MinorFaults,
        StatTag::FreeMemory,
        StatTag::TotalMemory,
        StatTag::AvailableMemory,
        StatTag::DiskCaches,
        StatTag::HugetlbAllocations,
        StatTag::HugetlbFailures,
        StatTag::OomKill,
        StatTag::AllocStall,
        StatTag::AsyncScan,
        StatTag::DirectScan,
        StatTag::AsyncReclaim,
        StatTag::DirectReclaim,
    ];

    /// Firecracker's name for it in `GET /balloon/statistics`.
    pub fn api_name(self) -> &'static str {
        match self {
            StatTag::SwapIn => "swap_in",
            StatTag::SwapOut => "swap_out",
            StatTag::MajorFaults => "major_faults",
            StatTag::MinorFaults => "minor_faults",
            StatTag::FreeMemory => "free_memory",
            StatTag::TotalMemory => "total_memory",
            StatTag::AvailableMemory => "available_memory",
            StatTag::DiskCaches => "disk_caches",
            StatTag::HugetlbAllocations => "hugetlb_allocations",
            StatTag::HugetlbFailures => "hugetlb_failures",
            StatTag::OomKill => "oom_kill",
            StatTag::AllocStall => "alloc_stall",
            StatTag::AsyncScan => "async_scan",
            StatTag::DirectScan => "direct_scan",
            StatTag::AsyncReclaim => "async_reclaim",
            StatTag::DirectReclaim => "direct_reclaim",
        }
    }
}

/// One statistics report: the values the guest gave, by tag.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct BalloonStats {
    values: BTreeMap<StatTag, u64>,
}

impl BalloonStats {
    /// Parses a buffer; `None` if its length is not a whole number of
    /// entries. Unknown tags are skipped (newer guests define more).
    pub fn parse(bytes: &[u8]) -> Option<Self> {
        if bytes.is_empty() || bytes.len() % 10 != 0 {
            return None;
        }
        let mut values = BTreeMap::new();
        for e in bytes.chunks_exact(10) {
            let tag = u16::from_le_bytes([e[0], e[1]]);
            let mut v = [0u8; 8];
            v.copy_from_slice(&e[2..10]);
            if let Some(t) = StatTag::ALL.get(usize::from(tag)) {
                values.insert(*t, u64::from_le_bytes(v));
            }
        }
        Some(BalloonStats { values })
    }

    /// The value of `tag`, if the guest gave it.
    pub fn get(&self, tag: StatTag) -> Option<u64> {
        self.values.get(&tag).copied()
    }

    /// Every value the guest gave.
    pub fn iter(&self) -> impl Iterator<Item = (StatTag, u64)> + '_ {
        self.values.iter().map(|(t, v)| (*t, *v))
    }
}
