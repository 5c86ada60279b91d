//! The I/O path of [`Qcow2`]: reads (coalesced over contiguous host
//! clusters, through the backing chain, inflating compressed clusters),
//! writes (in place when the clusters are allocated and COPIED; otherwise
//! allocating, with copy-on-write of the rest of each new cluster),
//! discard and write-zeroes.
//!
//! An allocating write, in order: (1) refcounts of every new cluster (data
//! and L2 tables) raised, (2) one `fdatasync`, (3) data written, (4) L2
//! entries written (a new L2 table whole, then synced), (5) L1 entries;
//! then, if it replaced clusters (compressed, shared), (6) a sync and the
//! old refcounts dropped. A crash anywhere leaves, at worst, leaked
//! clusters.

use std::io;

use crate::disk::len64;
use crate::error::corrupt;
use crate::header::to_usize;
use crate::image::{read_only_error, Qcow2, Run};
use crate::table::{encode_table, Entry, COPIED, ZERO};

/// What a write does with one cluster.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Action {
    /// Allocated with refcount 1: written in place.
    InPlace,
    /// A preallocated zero cluster: written whole in place, then its entry
    /// loses the zero flag.
    Fill,
    /// A new cluster is allocated (the old one, if any, released after).
    Alloc,
}

/// One cluster of a write.
#[derive(Clone, Copy, Debug)]
struct Slot {
    gc: u64,
    raw: u64,
    entry: Entry,
    action: Action,
    /// The host cluster written.
    host: u64,
    /// Where in the cluster the write starts, and how many bytes.
    within: u64,
    len: u64,
    /// Where in the caller's buffer.
    start: usize,
}

/// Clusters changed per metadata commit by discard and write-zeroes.
const ZERO_BATCH: u64 = 16384;
/// The largest buffer of zeros written at once.
const ZERO_CHUNK: u64 = 1 << 20;

/// An L1 index and the new L2 table allocated for it.
type NewTables = Vec<(usize, u64)>;

impl Qcow2 {
    fn check_range(&self, offset: u64, len: u64, what: &str) -> io::Result<()> {
        match offset.checked_add(len) {
            Some(end) if end <= self.hdr.size => Ok(()),
            _ => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "qcow2 image {}: {what} of {len} bytes at {offset} goes past the end of the disk ({} bytes)",
                    self.path.display(),
                    self.hdr.size
                ),
            )),
        }
    }

    fn check_writable(&self) -> io::Result<()> {
        if self.read_only {
            Err(read_only_error(&self.path))
        } else {
            Ok(())
        }
    }

    /// Fills `buf` from the virtual disk at `offset`.
    pub fn read_at(&mut self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.check_range(offset, len64(buf.len()), "read")?;
        let cs = self.cluster_size();
        let mut done = 0usize;
        while done < buf.len() {
            let at = offset + len64(done);
            let (run, n) = self.run(at, len64(buf.len() - done))?;
            let part = &mut buf[done..done + to_usize(n)];
            match run {
                Run::Data { host, .. } => self.disk.read_exact_at(part, host).map_err(|e| {
                    if e.kind() == io::ErrorKind::UnexpectedEof {
                        corrupt(
                            &self.path,
                            format!("data at {host:#x} is past the end of the file"),
                        )
                    } else {
                        e
                    }
                })?,
                Run::Zero => part.fill(0),
                Run::Unallocated => self.read_backing(part, at)?,
                Run::Compressed { raw } => {
                    let within = to_usize(at & (cs - 1));
                    let data = self.inflate(raw)?;
                    part.copy_from_slice(&data[within..within + part.len()]);
                }
            }
            done += part.len();
        }
        Ok(())
    }

    fn read_backing(&mut self, buf: &mut [u8], at: u64) -> io::Result<()> {
        match &mut self.backing {
            Some(b) => b.read_at(buf, at),
            None => {
                buf.fill(0);
                Ok(())
            }
        }
    }

    /// The contents of the compressed cluster whose L2 entry is `raw`.
    fn inflate(&mut self, raw: u64) -> io::Result<&[u8]> {
        if self.inflated.as_ref().is_none_or(|(r, _)| *r != raw) {
            let Entry::Compressed { offset, len } = Entry::decode(raw, self.hdr.cluster_bits)
            else {
                return Err(corrupt(&self.path, "not a compressed cluster"));
            };
            let mut input = vec![0u8; to_usize(len)];
            self.disk.read_or_zero_at(&mut input, offset)?;
            let cs = to_usize(self.cluster_size());
            let out = crate::compress::inflate_cluster(&input, cs).map_err(|why| {
                corrupt(
                    &self.path,
                    format!("compressed cluster at {offset:#x}: {why}"),
                )
            })?;
            self.inflated = Some((raw, out));
        }
        match &self.inflated {
            Some((_, data)) => Ok(data),
            None => Err(corrupt(&self.path, "compressed cluster lost")),
        }
    }

    /// The whole current contents of guest cluster `gc` (for copy-on-write).
    fn old_contents(&mut self, s: &Slot) -> io::Result<Vec<u8>> {
        let cs = self.cluster_size();
        let mut v = vec![0u8; to_usize(cs)];
        match s.entry {
            Entry::Unallocated => self.read_backing(&mut v, s.gc * cs)?,
            Entry::Zero { .. } => {}
            Entry::Normal { host, .. } => {
                self.check_host(host, "data cluster")?;
                self.disk.read_exact_at(&mut v, host)?;
            }
            Entry::Compressed { .. } => v.copy_from_slice(self.inflate(s.raw)?),
        }
        Ok(v)
    }

    /// Writes all of `buf` to the virtual disk at `offset`.
    pub fn write_at(&mut self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.check_writable()?;
        self.check_range(offset, len64(buf.len()), "write")?;
        let cs = self.cluster_size();
        let mut slots = Vec::new();
        let mut done = 0usize;
        while done < buf.len() {
            let at = offset + len64(done);
            let gc = at >> self.hdr.cluster_bits;
            let within = at & (cs - 1);
            let len = (cs - within).min(len64(buf.len() - done));
            let (raw, entry) = self.entry(gc)?;
            let (action, host) = match entry {
                Entry::Normal { host, copied: true } => (Action::InPlace, host),
                Entry::Zero {
                    host: Some(host),
                    copied: true,
                } => (Action::Fill, host),
                _ => (Action::Alloc, 0),
            };
            if host != 0 {
                self.check_host(host, "data cluster")?;
            }
            slots.push(Slot {
                gc,
                raw,
                entry,
                action,
                host,
                within,
                len,
                start: done,
            });
            done += to_usize(len);
        }
        let needs_meta = slots.iter().any(|s| s.action != Action::InPlace);
        let mut new_tables = Vec::new();
        if needs_meta {
            let gcs: Vec<u64> = slots
                .iter()
                .filter(|s| s.action != Action::InPlace)
                .map(|s| s.gc)
                .collect();
            new_tables = self.tables_to_make(&gcs)?;
            let Some(refs) = self.refs.as_mut() else {
                return Err(read_only_error(&self.path));
            };
            for t in &mut new_tables {
                t.1 = refs.alloc(&mut self.disk)?;
            }
            for s in slots.iter_mut().filter(|s| s.action == Action::Alloc) {
                s.host = refs.alloc(&mut self.disk)?;
            }
            refs.flush(&mut self.disk)?;
            self.disk.sync()?;
        }
        self.write_data(&slots, buf)?;
        if needs_meta {
            let updates: Vec<(u64, u64)> = slots
                .iter()
                .filter(|s| s.action != Action::InPlace)
                .map(|s| (s.gc, s.host | COPIED))
                .collect();
            let freed: Vec<Entry> = slots
                .iter()
                .filter(|s| s.action == Action::Alloc)
                .map(|s| s.entry)
                .collect();
            self.commit(&updates, &new_tables, &freed)?;
        }
        Ok(())
    }

    /// The L1 indices among guest clusters `gcs` whose L2 table must be
    /// made (none yet, or a shared one), each once.
    fn tables_to_make(&mut self, gcs: &[u64]) -> io::Result<NewTables> {
        let mut out: NewTables = Vec::new();
        let mut last = None;
        for &gc in gcs {
            let (i, _) = self.indices(gc);
            if last == Some(i) {
                continue;
            }
            last = Some(i);
            if self.l2_offset(i)?.is_none_or(|(_, copied)| !copied) && !out.iter().any(|t| t.0 == i)
            {
                out.push((i, 0));
            }
        }
        Ok(out)
    }

    /// Step (3): the data of a write, contiguous host ranges in one
    /// `pwrite`, partial new clusters completed from their old contents.
    fn write_data(&mut self, slots: &[Slot], buf: &[u8]) -> io::Result<()> {
        let cs = self.cluster_size();
        let direct = |s: &Slot| s.action == Action::InPlace || s.len == cs;
        let mut i = 0;
        while i < slots.len() {
            let s = slots[i];
            if direct(&s) {
                let host = s.host + s.within;
                let mut end = host + s.len;
                let mut j = i + 1;
                while j < slots.len() && direct(&slots[j]) && slots[j].host + slots[j].within == end
                {
                    end += slots[j].len;
                    j += 1;
                }
                let from = s.start;
                let to = from + to_usize(end - host);
                self.disk.write_all_at(&buf[from..to], host)?;
                self.known_len = self.known_len.max(end);
                i = j;
                continue;
            }
            let mut c = match s.action {
                Action::Fill => vec![0u8; to_usize(cs)],
                _ => self.old_contents(&s)?,
            };
            let w = to_usize(s.within);
            c[w..w + to_usize(s.len)].copy_from_slice(&buf[s.start..s.start + to_usize(s.len)]);
            self.disk.write_all_at(&c, s.host)?;
            self.known_len = self.known_len.max(s.host + cs);
            i += 1;
        }
        Ok(())
    }

    /// Steps (4) to (6): writes the L2 entries `updates` (guest cluster,
    /// raw entry; ascending), whole new tables for `new_tables` (their
    /// clusters already allocated and synced) followed by a sync and the
    /// L1 entries, then after another sync drops the references the
    /// `freed` entries held.
    fn commit(
        &mut self,
        updates: &[(u64, u64)],
        new_tables: &[(usize, u64)],
        freed: &[Entry],
    ) -> io::Result<()> {
        let cs = self.cluster_size();
        let mut replaced = Vec::new();
        let mut k = 0;
        while k < updates.len() {
            let (i, _) = self.indices(updates[k].0);
            let mut e = k;
            while e < updates.len() && self.indices(updates[e].0).0 == i {
                e += 1;
            }
            let group = &updates[k..e];
            k = e;
            if let Some(&(_, new_off)) = new_tables.iter().find(|t| t.0 == i) {
                let mut table = match self.l2_offset(i)? {
                    Some((old, _)) => {
                        let t = self.l2_table(old)?.clone();
                        self.l2.remove(old);
                        replaced.push(old);
                        t
                    }
                    None => vec![0u64; to_usize(cs / 8)],
                };
                for &(gc, raw) in group {
                    table[self.indices(gc).1] = raw;
                }
                self.disk.write_all_at(&encode_table(&table), new_off)?;
                self.known_len = self.known_len.max(new_off + cs);
                self.l2.insert(new_off, table);
                continue;
            }
            let Some((off, _)) = self.l2_offset(i)? else {
                return Err(corrupt(
                    &self.path,
                    format!("L1 entry {i} lost its L2 table"),
                ));
            };
            let js: Vec<(usize, u64)> = group
                .iter()
                .map(|&(gc, raw)| (self.indices(gc).1, raw))
                .collect();
            let table = self.l2_table(off)?;
            let mut writes = Vec::new();
            let mut a = 0;
            while a < js.len() {
                let mut b = a + 1;
                while b < js.len() && js[b].0 == js[b - 1].0 + 1 {
                    b += 1;
                }
                for &(j, raw) in &js[a..b] {
                    table[j] = raw;
                }
                let (j0, j1) = (js[a].0, js[b - 1].0);
                writes.push((off + 8 * len64(j0), encode_table(&table[j0..=j1])));
                a = b;
            }
            for (at, bytes) in writes {
                self.disk.write_all_at(&bytes, at)?;
            }
        }
        if !new_tables.is_empty() {
            self.disk.sync()?;
            for &(i, off) in new_tables {
                let raw = off | COPIED;
                self.l1[i] = raw;
                let at = self.hdr.l1_table_offset + 8 * len64(i);
                self.disk.write_all_at(&raw.to_be_bytes(), at)?;
            }
        }
        let frees_any = !replaced.is_empty() || freed.iter().any(|e| e.host_range(cs).is_some());
        if frees_any {
            self.disk.sync()?;
            self.inflated = None;
            let Some(refs) = self.refs.as_mut() else {
                return Err(read_only_error(&self.path));
            };
            for (first, last) in freed.iter().filter_map(|e| e.host_range(cs)) {
                let mut c = first;
                while c <= last {
                    refs.free(&mut self.disk, c)?;
                    c += cs;
                }
            }
            for t in replaced {
                refs.free(&mut self.disk, t)?;
            }
            refs.flush(&mut self.disk)?;
        }
        Ok(())
    }

    /// Deallocates `len` bytes at `offset`: whole clusters lose their data
    /// (on version 3 with a backing file they become zero clusters, so the
    /// backing file does not show through; on version 2 it does, as in
    /// QEMU); the bytes of partial clusters are zeroed.
    pub fn discard(&mut self, offset: u64, len: u64) -> io::Result<()> {
        self.check_writable()?;
        self.check_range(offset, len, "discard")?;
        let zero_flag = self.hdr.version >= 3 && self.backing.is_some();
        self.clear(offset, len, if zero_flag { ZERO } else { 0 })
    }

    /// Makes `len` bytes at `offset` read as zeros: whole clusters become
    /// zero clusters on version 3 (their data released); partial clusters,
    /// and every cluster of a version 2 image, get zeros written (unless
    /// they already read as zeros).
    pub fn write_zeroes(&mut self, offset: u64, len: u64) -> io::Result<()> {
        self.check_writable()?;
        self.check_range(offset, len, "write-zeroes")?;
        if self.hdr.version < 3 {
            return self.zero_bytes(offset, len);
        }
        self.clear(offset, len, ZERO)
    }

    /// Sets the whole clusters of the range to `target` (0 or ZERO) and
    /// zeroes the bytes of its partial ends.
    fn clear(&mut self, offset: u64, len: u64, target: u64) -> io::Result<()> {
        if len == 0 {
            return Ok(());
        }
        let cs = self.cluster_size();
        let end = offset + len;
        let first = offset.div_ceil(cs) * cs;
        // The disk's last cluster counts as whole when the range reaches
        // the end of the disk.
        let last = if end == self.hdr.size {
            end.div_ceil(cs) * cs
        } else {
            end / cs * cs
        };
        if first >= last {
            return self.zero_bytes(offset, len);
        }
        if offset < first {
            self.zero_bytes(offset, first - offset)?;
        }
        let cb = self.hdr.cluster_bits;
        self.clear_clusters(first >> cb, last >> cb, target)?;
        if last < end {
            self.zero_bytes(last, end - last)?;
        }
        Ok(())
    }

    /// Sets the L2 entries of guest clusters `[from, to)` to `target`,
    /// dropping what they referenced; clusters that already read as they
    /// will are left alone.
    fn clear_clusters(&mut self, from: u64, to: u64, target: u64) -> io::Result<()> {
        let zero_unallocated = self.hdr.version >= 3 && self.backing.is_some();
        let per_table = self.cluster_size() / 8;
        let mut gc = from;
        while gc < to {
            let batch_end = (gc + ZERO_BATCH).min(to);
            let mut updates = Vec::new();
            let mut freed = Vec::new();
            while gc < batch_end {
                let (i, _) = self.indices(gc);
                if !zero_unallocated && self.l2_offset(i)?.is_none() {
                    gc = (gc / per_table + 1) * per_table;
                    continue;
                }
                let (raw, e) = self.entry(gc)?;
                let new = match e {
                    Entry::Unallocated if zero_unallocated => ZERO,
                    Entry::Unallocated | Entry::Zero { host: None, .. } => {
                        gc += 1;
                        continue;
                    }
                    _ => target,
                };
                if new != raw {
                    updates.push((gc, new));
                    freed.push(e);
                }
                gc += 1;
            }
            if updates.is_empty() {
                continue;
            }
            let gcs: Vec<u64> = updates.iter().map(|u| u.0).collect();
            let mut new_tables = self.tables_to_make(&gcs)?;
            if !new_tables.is_empty() {
                let Some(refs) = self.refs.as_mut() else {
                    return Err(read_only_error(&self.path));
                };
                for t in &mut new_tables {
                    t.1 = refs.alloc(&mut self.disk)?;
                }
                refs.flush(&mut self.disk)?;
                self.disk.sync()?;
            }
            self.commit(&updates, &new_tables, &freed)?;
        }
        Ok(())
    }

    /// Writes zeros over `len` bytes at `offset`, skipping what already
    /// reads as zeros.
    fn zero_bytes(&mut self, offset: u64, len: u64) -> io::Result<()> {
        let end = offset + len;
        let mut at = offset;
        let zeros = vec![0u8; to_usize(ZERO_CHUNK.min(len))];
        while at < end {
            let (run, n) = self.run(at, (end - at).min(ZERO_CHUNK))?;
            let reads_zero = match run {
                Run::Zero => true,
                Run::Unallocated => self.backing.is_none(),
                _ => false,
            };
            if !reads_zero {
                self.write_at(&zeros[..to_usize(n)], at)?;
            }
            at += n;
        }
        Ok(())
    }
}
