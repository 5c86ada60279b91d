//! L1 and L2 table entries and [`TableCache`], the bounded LRU cache of L2
//! tables (write-through: the cache never holds anything the file does
//! not).

/// Entry flag: the cluster's refcount is exactly 1 (it may be written in
/// place).
pub(crate) const COPIED: u64 = 1 << 63;
/// L2 entry flag: a compressed cluster.
pub(crate) const COMPRESSED: u64 = 1 << 62;
/// L2 entry flag (standard clusters): the cluster reads as zeros.
pub(crate) const ZERO: u64 = 1;
/// The host offset of an L1 entry or a standard L2 entry (bits 9-55).
pub(crate) const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;

/// A decoded L2 entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Entry {
    /// Not allocated in this image: the backing chain (or zeros) shows.
    Unallocated,
    /// Reads as zeros; `host` is a preallocated cluster, if any.
    Zero { host: Option<u64>, copied: bool },
    /// Data at `host`.
    Normal { host: u64, copied: bool },
    /// Compressed data: `len` bytes at `offset` (not aligned).
    Compressed { offset: u64, len: u64 },
}

impl Entry {
    /// Decodes a raw L2 entry of an image with `cluster_bits`.
    pub(crate) fn decode(raw: u64, cluster_bits: u32) -> Entry {
        if raw & COMPRESSED != 0 {
            let shift = 62 - (cluster_bits - 8);
            let offset = raw & ((1u64 << shift) - 1);
            let sectors = ((raw >> shift) & ((1u64 << (cluster_bits - 8)) - 1)) + 1;
            let len = (sectors * 512).saturating_sub(offset & 511);
            return Entry::Compressed { offset, len };
        }
        let copied = raw & COPIED != 0;
        let host = raw & OFFSET_MASK;
        if raw & ZERO != 0 {
            let host = if host == 0 { None } else { Some(host) };
            return Entry::Zero { host, copied };
        }
        if host == 0 {
            Entry::Unallocated
        } else {
            Entry::Normal { host, copied }
        }
    }

    /// The host clusters (first and last offset) this entry holds a
    /// reference to, if any.
    pub(crate) fn host_range(self, cluster_size: u64) -> Option<(u64, u64)> {
        match self {
            Entry::Unallocated | Entry::Zero { host: None, .. } => None,
            Entry::Zero { host: Some(h), .. } | Entry::Normal { host: h, .. } => Some((h, h)),
            Entry::Compressed { offset, len } => {
                let first = offset & !(cluster_size - 1);
                let last = offset.saturating_add(len.max(1) - 1) & !(cluster_size - 1);
                Some((first, last))
            }
        }
    }
}

/// Decodes a table cluster of big-endian entries.
pub(crate) fn decode_table(bytes: &[u8]) -> Vec<u64> {
    bytes
        .chunks_exact(8)
        .map(|c| {
            let mut a = [0u8; 8];
            a.copy_from_slice(c);
            u64::from_be_bytes(a)
        })
        .collect()
}

/// Encodes entries as big-endian bytes.
pub(crate) fn encode_table(entries: &[u64]) -> Vec<u8> {
    entries.iter().flat_map(|e| e.to_be_bytes()).collect()
}

/// A bounded LRU cache of tables, keyed by their host offset, most recently
/// used first.
#[derive(Debug)]
pub(crate) struct TableCache {
    cap: usize,
    tables: Vec<(u64, Vec<u64>)>,
}

impl TableCache {
    /// A cache of at most `cap` tables (at least 1).
    pub(crate) fn new(cap: usize) -> TableCache {
        TableCache {
            cap: cap.max(1),
            tables: Vec::new(),
        }
    }

    /// The table at `offset`, if cached (it becomes the most recent).
    pub(crate) fn get(&mut self, offset: u64) -> Option<&mut Vec<u64>> {
        let i = self.tables.iter().position(|(o, _)| *o == offset)?;
        if i != 0 {
            let t = self.tables.remove(i);
            self.tables.insert(0, t);
        }
        self.tables.first_mut().map(|(_, t)| t)
    }

    /// Caches `table` as the table at `offset`, evicting the least
    /// recently used one if full.
    pub(crate) fn insert(&mut self, offset: u64, table: Vec<u64>) {
        self.remove(offset);
        if self.tables.len() >= self.cap {
            self.tables.pop();
        }
        self.tables.insert(0, (offset, table));
    }

    /// Forgets the table at `offset`.
    pub(crate) fn remove(&mut self, offset: u64) {
        self.tables.retain(|(o, _)| *o != offset);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entry_decode_compressed_gives_offset_and_length() {
        // 64 KiB clusters: the size field starts at bit 54.
        let raw = COMPRESSED | (3u64 << 54) | 0x1_0200;
        assert_eq!(
            Entry::decode(raw, 16),
            Entry::Compressed {
                offset: 0x1_0200,
                len: 4 * 512
            }
        );
    }

    #[test]
    fn entry_decode_zero_flag_with_and_without_host() {
        assert_eq!(
            Entry::decode(ZERO, 16),
            Entry::Zero {
                host: None,
                copied: false
            }
        );
        assert_eq!(
            Entry::decode(COPIED | 0x30000 | ZERO, 16),
            Entry::Zero {
                host: Some(0x30000),
                copied: true
            }
        );
        assert_eq!(Entry::decode(COPIED, 16), Entry::Unallocated);
    }

    #[test]
    fn table_cache_full_evicts_least_recent() {
        let mut c = TableCache::new(2);
        c.insert(1, vec![1]);
        c.insert(2, vec![2]);
        assert!(c.get(1).is_some());
        c.insert(3, vec![3]);
        assert!(c.get(2).is_none());
        assert!(c.get(1).is_some() && c.get(3).is_some());
    }
}
