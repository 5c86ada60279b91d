//! Reference counts: the refcount table, a bounded LRU cache of refcount
//! blocks, entries of any width (1 to 64 bits), and the cluster allocator.
//!
//! Ordering rules (crash consistency):
//! - a new refcount block describes itself and is written and synced
//!   before the refcount table points at it;
//! - a grown refcount table is written (with the blocks describing it) and
//!   synced before the header points at it; the old one is freed after;
//! - dirty entries of cached blocks are written by [`Refcounts::flush`],
//!   which callers run before the `fdatasync` that must cover them (and
//!   before anything that depends on them is written).

use std::io;
use std::path::{Path, PathBuf};

use crate::disk::Disk;
use crate::error::corrupt;
use crate::header::{field, to_usize, MAX_REFTABLE_BYTES};
use crate::table::{decode_table, encode_table};

/// The highest host offset an entry can hold (bits 9-55).
const MAX_HOST_OFFSET: u64 = 1 << 56;

/// One cached refcount block.
#[derive(Debug)]
struct Block {
    offset: u64,
    data: Vec<u8>,
    /// Bytes changed since the block was last written.
    dirty: Option<(usize, usize)>,
}

/// The image's reference counts.
#[derive(Debug)]
pub(crate) struct Refcounts {
    path: PathBuf,
    cluster_bits: u32,
    order: u32,
    /// The refcount table (raw entries: block offsets).
    pub table: Vec<u64>,
    pub table_offset: u64,
    pub table_clusters: u32,
    cache: Vec<Block>,
    cap: usize,
    /// Where the search for a free cluster starts (a cluster index).
    free_hint: u64,
    /// Byte ranges never handed out even if their refcount reads 0 (the
    /// header and the active L1 table: a damaged image must not make us
    /// overwrite them).
    avoid: Vec<(u64, u64)>,
    /// Clusters whose refcount dropped to 0, to be punched after the
    /// decrements are written.
    to_punch: Vec<u64>,
}

/// Reads refcount entry `i` of a block with `order`.
pub(crate) fn get_entry(data: &[u8], i: usize, order: u32) -> u64 {
    if order < 3 {
        let bits = 1usize << order;
        let per_byte = 8 >> order;
        let shift = (i % per_byte) * bits;
        u64::from(data[i / per_byte] >> shift) & ((1u64 << bits) - 1)
    } else {
        let n = 1usize << (order - 3);
        data[i * n..(i + 1) * n]
            .iter()
            .fold(0u64, |v, b| (v << 8) | u64::from(*b))
    }
}

/// Writes refcount entry `i` of a block with `order`; returns the byte
/// range changed.
pub(crate) fn set_entry(data: &mut [u8], i: usize, order: u32, value: u64) -> (usize, usize) {
    if order < 3 {
        let bits = 1usize << order;
        let per_byte = 8 >> order;
        let shift = (i % per_byte) * bits;
        let mask = u8::try_from((1u16 << bits) - 1).unwrap_or(u8::MAX);
        let v = u8::try_from(value & u64::from(mask)).unwrap_or(0);
        let b = &mut data[i / per_byte];
        *b = (*b & !(mask << shift)) | (v << shift);
        (i / per_byte, i / per_byte + 1)
    } else {
        let n = 1usize << (order - 3);
        let bytes = value.to_be_bytes();
        data[i * n..(i + 1) * n].copy_from_slice(&bytes[8 - n..]);
        (i * n, (i + 1) * n)
    }
}

/// The largest refcount of width `1 << order`.
#[cfg(test)]
pub(crate) fn max_refcount(order: u32) -> u64 {
    if order >= 6 {
        u64::MAX
    } else {
        (1u64 << (1u32 << order)) - 1
    }
}

impl Refcounts {
    /// The refcounts of an image whose table (`table_clusters` clusters at
    /// `table_offset`, already checked to be inside the file) is read now.
    pub(crate) fn load(
        path: &Path,
        disk: &Disk,
        cluster_bits: u32,
        order: u32,
        table_offset: u64,
        table_clusters: u32,
    ) -> io::Result<Refcounts> {
        let cs = 1u64 << cluster_bits;
        let mut raw = vec![0u8; to_usize(u64::from(table_clusters) * cs)];
        disk.read_exact_at(&mut raw, table_offset)?;
        let cap = to_usize((4 << 20) >> cluster_bits).clamp(2, 16);
        Ok(Refcounts {
            path: path.to_path_buf(),
            cluster_bits,
            order,
            table: decode_table(&raw),
            table_offset,
            table_clusters,
            cache: Vec::new(),
            cap,
            free_hint: 1,
            avoid: vec![
                (0, cs),
                (table_offset, table_offset + u64::from(table_clusters) * cs),
            ],
            to_punch: Vec::new(),
        })
    }

    fn cs(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// log2 of the entries per block.
    fn epb_shift(&self) -> u32 {
        self.cluster_bits + 3 - self.order
    }

    /// Marks the byte range `[start, end)` as never to be allocated.
    pub(crate) fn avoid(&mut self, start: u64, end: u64) {
        self.avoid.push((start, end));
    }

    /// Replaces the avoided range starting at `old_start`.
    pub(crate) fn move_avoided(&mut self, old_start: u64, start: u64, end: u64) {
        self.avoid.retain(|(s, _)| *s != old_start);
        self.avoid.push((start, end));
    }

    /// The offset of refcount block `b`, checked, or `None` if there is
    /// none.
    fn block_offset(&self, disk: &Disk, b: usize) -> io::Result<Option<u64>> {
        let raw = self.table.get(b).copied().unwrap_or(0);
        let off = raw & !0x1ff;
        if off == 0 {
            return Ok(None);
        }
        let cs = self.cs();
        if raw & 0x1ff != 0 || off % cs != 0 {
            return Err(corrupt(
                &self.path,
                format!("refcount block {b} at {off:#x} is not cluster aligned; refcount table entry corrupted"),
            ));
        }
        if off.saturating_add(cs) > disk.len()? {
            return Err(corrupt(
                &self.path,
                format!("refcount block {b} at {off:#x} is outside the file"),
            ));
        }
        Ok(Some(off))
    }

    /// The cached block at `offset`, read if needed (most recent first).
    fn block(&mut self, disk: &mut Disk, offset: u64) -> io::Result<&mut Block> {
        if let Some(i) = self.cache.iter().position(|b| b.offset == offset) {
            if i != 0 {
                let b = self.cache.remove(i);
                self.cache.insert(0, b);
            }
        } else {
            let mut data = vec![0u8; to_usize(self.cs())];
            disk.read_exact_at(&mut data, offset)?;
            if self.cache.len() >= self.cap {
                if let Some(mut old) = self.cache.pop() {
                    write_dirty(disk, &mut old)?;
                }
            }
            self.cache.insert(
                0,
                Block {
                    offset,
                    data,
                    dirty: None,
                },
            );
        }
        Ok(&mut self.cache[0])
    }

    /// The refcount of host cluster `idx`.
    pub(crate) fn get(&mut self, disk: &mut Disk, idx: u64) -> io::Result<u64> {
        let b = to_usize(idx >> self.epb_shift());
        let Some(off) = self.block_offset(disk, b)? else {
            return Ok(0);
        };
        let i = to_usize(idx & ((1u64 << self.epb_shift()) - 1));
        let order = self.order;
        Ok(get_entry(&self.block(disk, off)?.data, i, order))
    }

    /// Sets the refcount of host cluster `idx`, whose block must exist.
    pub(crate) fn set(&mut self, disk: &mut Disk, idx: u64, value: u64) -> io::Result<()> {
        let b = to_usize(idx >> self.epb_shift());
        let Some(off) = self.block_offset(disk, b)? else {
            return Err(corrupt(
                &self.path,
                format!("no refcount block for cluster {idx}"),
            ));
        };
        let i = to_usize(idx & ((1u64 << self.epb_shift()) - 1));
        let order = self.order;
        let block = self.block(disk, off)?;
        let (s, e) = set_entry(&mut block.data, i, order, value);
        block.dirty = Some(match block.dirty {
            Some((ds, de)) => (ds.min(s), de.max(e)),
            None => (s, e),
        });
        Ok(())
    }

    /// Writes every changed entry, then punches the clusters freed.
    pub(crate) fn flush(&mut self, disk: &mut Disk) -> io::Result<()> {
        for b in &mut self.cache {
            write_dirty(disk, b)?;
        }
        let cs = self.cs();
        for off in std::mem::take(&mut self.to_punch) {
            disk.punch_hole(off, cs)?;
        }
        Ok(())
    }

    /// Allocates one cluster (refcount 0 → 1) and returns its offset. The
    /// caller must [`Refcounts::flush`] and sync before using it.
    pub(crate) fn alloc(&mut self, disk: &mut Disk) -> io::Result<u64> {
        let mut idx = self.free_hint.max(1);
        let max_idx = MAX_HOST_OFFSET >> self.cluster_bits;
        loop {
            if idx >= max_idx {
                return Err(corrupt(&self.path, "the image file is full (64 PiB)"));
            }
            let off = idx << self.cluster_bits;
            if let Some(&(_, end)) = self.avoid.iter().find(|(s, e)| off >= *s && off < *e) {
                idx = end.div_ceil(self.cs()).max(idx + 1);
                continue;
            }
            let b = to_usize(idx >> self.epb_shift());
            if b >= self.table.len() {
                self.grow_table(disk, idx)?;
                continue;
            }
            if self.block_offset(disk, b)?.is_none() {
                self.new_block(disk, b, idx)?;
                idx += 1;
                continue;
            }
            if self.get(disk, idx)? == 0 {
                self.set(disk, idx, 1)?;
                self.free_hint = idx + 1;
                return Ok(off);
            }
            idx += 1;
        }
    }

    /// Allocates `n` contiguous clusters and returns the offset of the
    /// first. Clusters taken on the way that do not fit are given back.
    pub(crate) fn alloc_run(&mut self, disk: &mut Disk, n: u64) -> io::Result<u64> {
        let hint = self.free_hint;
        let mut run: Vec<u64> = Vec::new();
        while crate::disk::len64(run.len()) < n {
            let off = self.alloc(disk)?;
            if run.last().is_some_and(|last| last + self.cs() != off) {
                for c in run.drain(..) {
                    self.set(disk, c >> self.cluster_bits, 0)?;
                }
            }
            run.push(off);
        }
        if hint < self.free_hint {
            // Clusters given back below the run stay free for next time.
            self.free_hint = hint;
        }
        run.first()
            .copied()
            .ok_or_else(|| corrupt(&self.path, "empty cluster run"))
    }

    /// Drops one reference to the host cluster at `offset`. A cluster
    /// whose count reaches 0 is punched at the next flush.
    pub(crate) fn free(&mut self, disk: &mut Disk, offset: u64) -> io::Result<()> {
        let idx = offset >> self.cluster_bits;
        let r = self.get(disk, idx)?;
        if r == 0 {
            log::warn!(
                "qcow2 image {}: freeing cluster {idx} whose refcount is already 0",
                self.path.display()
            );
            return Ok(());
        }
        self.set(disk, idx, r - 1)?;
        if r == 1 {
            self.free_hint = self.free_hint.min(idx);
            self.to_punch.push(offset);
        }
        Ok(())
    }

    /// Makes refcount block `b` at cluster `idx`, which it covers (every
    /// cluster of its range has refcount 0 as it has no block yet): it
    /// counts itself.
    fn new_block(&mut self, disk: &mut Disk, b: usize, idx: u64) -> io::Result<()> {
        let off = idx << self.cluster_bits;
        let mut data = vec![0u8; to_usize(self.cs())];
        let i = to_usize(idx & ((1u64 << self.epb_shift()) - 1));
        set_entry(&mut data, i, self.order, 1);
        disk.write_all_at(&data, off)?;
        disk.sync()?;
        self.table[b] = off;
        disk.write_all_at(
            &off.to_be_bytes(),
            self.table_offset + 8 * crate::disk::len64(b),
        )?;
        self.cache.insert(
            0,
            Block {
                offset: off,
                data,
                dirty: None,
            },
        );
        if self.cache.len() > self.cap {
            if let Some(mut old) = self.cache.pop() {
                write_dirty(disk, &mut old)?;
            }
        }
        Ok(())
    }

    /// Grows the refcount table so that it covers cluster `need` (and
    /// more): the new table and the blocks describing it go at `need`
    /// (beyond what the old table covers, so free), are synced, then the
    /// header points at the new table and the old one is freed.
    fn grow_table(&mut self, disk: &mut Disk, need: u64) -> io::Result<()> {
        let cs = self.cs();
        let shift = self.epb_shift();
        let mut entries = (self.table.len() as u64).max(cs / 8) * 2;
        let (k, m, first_b) = loop {
            if entries * 8 > MAX_REFTABLE_BYTES {
                return Err(corrupt(
                    &self.path,
                    "the refcount table would grow past 8 MiB: the image file is too large for its cluster size",
                ));
            }
            let k = (entries * 8).div_ceil(cs);
            let mut m = 0u64;
            loop {
                let nb = ((need + k + m - 1) >> shift) - (need >> shift) + 1;
                if nb <= m {
                    break;
                }
                m = nb;
            }
            if (need + k + m - 1) >> shift < entries {
                break (k, m, need >> shift);
            }
            entries *= 2;
        };
        let end = need + k + m;
        let mut table = self.table.clone();
        table.resize(to_usize(entries), 0);
        for j in 0..m {
            let bi = first_b + j;
            let block_idx = need + k + j;
            let mut data = vec![0u8; to_usize(cs)];
            let lo = (bi << shift).max(need);
            let hi = ((bi + 1) << shift).min(end);
            for c in lo..hi {
                set_entry(
                    &mut data,
                    to_usize(c & ((1u64 << shift) - 1)),
                    self.order,
                    1,
                );
            }
            disk.write_all_at(&data, block_idx << self.cluster_bits)?;
            table[to_usize(bi)] = block_idx << self.cluster_bits;
        }
        let new_offset = need << self.cluster_bits;
        disk.write_all_at(&encode_table(&table), new_offset)?;
        disk.sync()?;
        let clusters =
            u32::try_from(k).map_err(|_| corrupt(&self.path, "refcount table too large"))?;
        let mut hdr = [0u8; 12];
        hdr[..8].copy_from_slice(&new_offset.to_be_bytes());
        hdr[8..].copy_from_slice(&clusters.to_be_bytes());
        disk.write_all_at(&hdr, field::REFTABLE_OFFSET)?;
        disk.sync()?;
        let (old_offset, old_clusters) = (self.table_offset, u64::from(self.table_clusters));
        self.table = table;
        self.table_offset = new_offset;
        self.table_clusters = clusters;
        self.move_avoided(old_offset, new_offset, new_offset + k * cs);
        for c in 0..old_clusters {
            self.free(disk, old_offset + c * cs)?;
        }
        self.flush(disk)
    }
}

/// Writes the changed bytes of `b`.
fn write_dirty(disk: &mut Disk, b: &mut Block) -> io::Result<()> {
    if let Some((s, e)) = b.dirty.take() {
        disk.write_all_at(&b.data[s..e], b.offset + crate::disk::len64(s))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refcount_entry_every_width_round_trips() {
        for order in 0..=6u32 {
            let mut data = vec![0u8; 512];
            let max = max_refcount(order);
            let n = (512 * 8) >> order;
            for i in 0..n {
                set_entry(&mut data, i, order, (i as u64) & max);
            }
            for i in 0..n {
                assert_eq!(
                    get_entry(&data, i, order),
                    (i as u64) & max,
                    "order {order} entry {i}"
                );
            }
        }
    }

    #[test]
    fn refcount_entry_sub_byte_is_lsb_first() {
        let mut data = vec![0u8; 1];
        set_entry(&mut data, 0, 0, 1);
        assert_eq!(data[0], 1);
        set_entry(&mut data, 1, 1, 3);
        assert_eq!(data[0], 0b1101);
    }
}
