//! [`check`]: `qemu-img check [-r leaks]` for one image. Walks the header,
//! the active L1 and its L2 tables, the snapshot table and each snapshot's
//! L1 and L2 tables, the refcount table and blocks; counts the references
//! to every host cluster and compares them with the stored refcounts.

use std::collections::HashMap;
use std::fs::OpenOptions;
use std::path::Path;

use crate::disk::{len64, lock_file, Disk};
use crate::header::{to_usize, Header, AUTOCLEAR_BITMAPS, MAX_L1_ENTRIES};
use crate::refcount::{get_entry, set_entry};
use crate::table::{decode_table, Entry, COPIED, OFFSET_MASK};
use crate::{Error, Result};

/// The most host clusters [`check`] counts (a 512 MiB table of counts).
const MAX_CHECK_CLUSTERS: u64 = 1 << 27;
/// The most bytes of snapshot table read.
const MAX_SNAPSHOT_TABLE: u64 = 64 << 20;

/// What [`check`] found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct CheckReport {
    /// References to clusters whose refcount is too low, misaligned or
    /// out-of-file tables and entries, wrong COPIED flags: errors that can
    /// lose data.
    pub corruptions: u64,
    /// Clusters whose refcount is higher than their references (wasted
    /// space, no harm).
    pub leaks: u64,
    /// Leaks repaired (with `repair`).
    pub leaks_fixed: u64,
    /// Guest clusters allocated in the active L1 (data, compressed,
    /// preallocated zero).
    pub allocated_clusters: u64,
    /// Guest clusters of the virtual disk.
    pub total_clusters: u64,
    /// Allocated guest clusters not right after the previous one in the
    /// file (compressed ones always count).
    pub fragmented_clusters: u64,
    /// The end of the last cluster in use.
    pub image_end_offset: u64,
    /// One line per problem, worded as `qemu-img check` words them.
    pub messages: Vec<String>,
}

impl CheckReport {
    /// No corruption, and no leak left.
    pub fn is_clean(&self) -> bool {
        self.corruptions == 0 && self.leaks == self.leaks_fixed
    }

    fn error(&mut self, msg: String) {
        self.corruptions += 1;
        self.messages.push(msg);
    }
}

/// The walk's state.
struct Walk<'a> {
    path: &'a Path,
    disk: &'a Disk,
    cs: u64,
    cluster_bits: u32,
    file_len: u64,
    /// References counted per host cluster.
    refs: Vec<u32>,
    report: CheckReport,
    /// (host offset, COPIED flag, what) of the active tables' entries, to
    /// compare with the refcounts.
    copied: Vec<(u64, bool, String)>,
    /// A table could not be walked: repairing leaks is unsafe.
    incomplete: bool,
    next_contiguous: u64,
}

impl Walk<'_> {
    /// Counts a reference to every cluster of `[off, off + len)`.
    fn add(&mut self, off: u64, len: u64, what: &str) {
        let first = off >> self.cluster_bits;
        let last = off.saturating_add(len.max(1) - 1) >> self.cluster_bits;
        for c in first..=last {
            match self.refs.get_mut(to_usize(c)) {
                Some(r) => *r = r.saturating_add(1),
                None => {
                    self.report.error(format!(
                        "ERROR {what} at {:#x} is outside the image (cluster {c}, {} bytes long)",
                        c << self.cluster_bits,
                        self.file_len
                    ));
                    return;
                }
            }
        }
    }

    fn read_table(&mut self, off: u64, bytes: u64) -> Option<Vec<u64>> {
        let mut raw = vec![0u8; to_usize(bytes)];
        match self.disk.read_exact_at(&mut raw, off) {
            Ok(()) => Some(decode_table(&raw)),
            Err(e) => {
                self.report
                    .error(format!("ERROR cannot read the table at {off:#x}: {e}"));
                self.incomplete = true;
                None
            }
        }
    }

    /// Walks an L1 table and its L2 tables; `active`: the image's own
    /// (fragmentation and COPIED checks).
    fn l1(&mut self, l1_off: u64, l1_size: u64, active: bool) {
        let Some(l1) = self.read_table(l1_off, l1_size * 8) else {
            return;
        };
        for (i, &e) in l1.iter().enumerate() {
            let l2 = e & OFFSET_MASK;
            if l2 == 0 {
                continue;
            }
            if !l2.is_multiple_of(self.cs) {
                self.report.error(format!(
                    "ERROR l2_offset={l2:#x}: Table is not cluster aligned; L1 entry corrupted"
                ));
                self.incomplete = true;
                continue;
            }
            if l2 >= self.file_len {
                self.report.error(format!(
                    "ERROR l2_offset={l2:#x}: L2 table is outside the image"
                ));
                self.incomplete = true;
                continue;
            }
            self.add(l2, self.cs, "L2 table");
            if active {
                self.copied.push((
                    l2,
                    e & COPIED != 0,
                    format!("ERROR OFLAG_COPIED L2 cluster: l1_index={i} l1_entry={e:x}"),
                ));
            }
            if let Some(table) = self.read_table(l2, self.cs) {
                self.l2(&table, active);
            }
        }
    }

    fn l2(&mut self, table: &[u64], active: bool) {
        for &raw in table {
            match Entry::decode(raw, self.cluster_bits) {
                Entry::Unallocated | Entry::Zero { host: None, .. } => {}
                Entry::Compressed { offset, len } => {
                    self.add(
                        offset & !511,
                        (len + (offset & 511)).max(1),
                        "compressed cluster",
                    );
                    if active {
                        self.report.allocated_clusters += 1;
                        self.report.fragmented_clusters += 1;
                    }
                }
                Entry::Normal { host, copied }
                | Entry::Zero {
                    host: Some(host),
                    copied,
                } => {
                    if host % self.cs != 0 {
                        self.report.error(format!(
                            "ERROR offset={host:x}: Cluster is not properly aligned; L2 entry corrupted."
                        ));
                        continue;
                    }
                    self.add(host, self.cs, "data cluster");
                    if active {
                        self.report.allocated_clusters += 1;
                        if self.next_contiguous != 0 && host != self.next_contiguous {
                            self.report.fragmented_clusters += 1;
                        }
                        self.next_contiguous = host + self.cs;
                        self.copied.push((
                            host,
                            copied,
                            format!("ERROR OFLAG_COPIED data cluster: l2_entry={raw:x}"),
                        ));
                    }
                }
            }
        }
    }

    /// Walks the snapshot table and every snapshot's tables.
    fn snapshots(&mut self, h: &Header) {
        let mut at = h.snapshots_offset;
        let start = at;
        for n in 0..h.nb_snapshots {
            let mut fixed = [0u8; 40];
            if at - start > MAX_SNAPSHOT_TABLE || self.disk.read_exact_at(&mut fixed, at).is_err() {
                self.report.error(format!(
                    "ERROR snapshot table: snapshot {n} at {at:#x} is outside the image"
                ));
                self.incomplete = true;
                return;
            }
            let be = |a: usize, n: usize| {
                fixed[a..a + n]
                    .iter()
                    .fold(0u64, |v, b| (v << 8) | u64::from(*b))
            };
            let (l1_off, l1_size) = (be(0, 8), be(8, 4));
            let len = 40 + be(36, 4) + be(12, 2) + be(14, 2);
            at += len.div_ceil(8) * 8;
            if l1_size > MAX_L1_ENTRIES
                || l1_off % self.cs != 0
                || l1_off.saturating_add(l1_size * 8) > self.file_len
            {
                self.report.error(format!(
                    "ERROR snapshot {n}: L1 table at {l1_off:#x} ({l1_size} entries) is invalid"
                ));
                self.incomplete = true;
                continue;
            }
            if l1_size > 0 {
                self.add(l1_off, l1_size * 8, "snapshot L1 table");
                self.l1(l1_off, l1_size, false);
            }
        }
        self.add(start, at - start, "snapshot table");
    }
}

/// Checks the image at `path` as `qemu-img check` does; with `repair`,
/// also lowers the refcounts of leaked clusters to their references
/// (`-r leaks`). Corruptions are reported, never repaired (nor leaks, when
/// the image also has errors that kept a table from being walked).
///
/// Takes the image's lock (exclusive to repair): an image in use is
/// [`Error::Locked`].
pub fn check(path: &Path, repair: bool) -> Result<CheckReport> {
    let file = OpenOptions::new()
        .read(true)
        .write(repair)
        .open(path)
        .map_err(|source| Error::Open {
            path: path.to_path_buf(),
            source,
        })?;
    lock_file(&file, path, !repair)?;
    let mut disk = Disk::new(file);
    let h = Header::read(path, &disk)?;
    let io = |what| {
        move |source| Error::Io {
            path: path.to_path_buf(),
            what,
            source,
        }
    };
    let file_len = disk.len().map_err(io("find the size of"))?;
    let cs = h.cluster_size();
    let nb = file_len.div_ceil(cs);
    if nb > MAX_CHECK_CLUSTERS {
        return Err(Error::Options {
            path: path.to_path_buf(),
            why: format!("{nb} clusters are too many to check (at most {MAX_CHECK_CLUSTERS})"),
        });
    }
    let mut w = Walk {
        path,
        disk: &disk,
        cs,
        cluster_bits: h.cluster_bits,
        file_len,
        refs: vec![0; to_usize(nb)],
        report: CheckReport {
            total_clusters: h.size.div_ceil(cs),
            ..CheckReport::default()
        },
        copied: Vec::new(),
        incomplete: false,
        next_contiguous: 0,
    };
    w.add(0, cs, "header");
    let l1_size = u64::from(h.l1_size);
    if l1_size > 0 {
        w.add(h.l1_table_offset, l1_size * 8, "L1 table");
        w.l1(h.l1_table_offset, l1_size, true);
    }
    let rt_bytes = u64::from(h.refcount_table_clusters) * cs;
    w.add(h.refcount_table_offset, rt_bytes, "refcount table");
    if h.nb_snapshots > 0 {
        w.snapshots(&h);
    }
    let reftable = w
        .read_table(h.refcount_table_offset, rt_bytes)
        .unwrap_or_default();
    // Each refcount block once, by table index.
    let mut blocks: Vec<Option<u64>> = Vec::with_capacity(reftable.len());
    let mut seen = HashMap::new();
    for (i, &raw) in reftable.iter().enumerate() {
        let off = raw & !0x1ff;
        if off == 0 {
            blocks.push(None);
            continue;
        }
        if raw & 0x1ff != 0 || off % cs != 0 {
            w.report.error(format!(
                "ERROR refcount block {i} is not cluster aligned; refcount table entry corrupted"
            ));
            w.incomplete = true;
            blocks.push(None);
            continue;
        }
        if off >= file_len {
            w.report
                .error(format!("ERROR refcount block {i} is outside image"));
            w.incomplete = true;
            blocks.push(None);
            continue;
        }
        w.add(off, cs, "refcount block");
        blocks.push(if seen.insert(off, i).is_some() {
            None
        } else {
            Some(off)
        });
    }
    let mut fixes = compare(&mut w, &h, &blocks)?;
    copied_flags(&mut w, &h, &blocks)?;
    let mut report = w.report;
    let incomplete = w.incomplete;
    if repair && !fixes.is_empty() {
        if h.has_bitmaps && h.autoclear & AUTOCLEAR_BITMAPS != 0 {
            report.messages.push(
                "Leaks not repaired: the image has persistent bitmaps, whose clusters this check does not walk (use qemu-img check -r leaks)".into(),
            );
        } else if incomplete || report.corruptions > 0 {
            report.messages.push(
                "Leaks not repaired: the image has errors (repair them first with qemu-img check -r all)".into(),
            );
        } else {
            repair_leaks(&mut disk, &h, &mut fixes).map_err(io("repair the refcounts of"))?;
            report.leaks_fixed = len64(fixes.len());
            for m in report.messages.iter_mut() {
                if let Some(rest) = m.strip_prefix("Leaked cluster ") {
                    *m = format!("Repairing cluster {rest}");
                }
            }
        }
    }
    Ok(report)
}

/// The stored refcount of cluster `c`.
fn stored(
    w: &Walk<'_>,
    h: &Header,
    blocks: &[Option<u64>],
    cache: &mut HashMap<u64, Vec<u8>>,
    c: u64,
) -> Result<u64> {
    let shift = h.cluster_bits + 3 - h.refcount_order;
    let Some(Some(off)) = blocks.get(to_usize(c >> shift)) else {
        return Ok(0);
    };
    let data = block(w, cache, *off)?;
    Ok(get_entry(
        data,
        to_usize(c & ((1u64 << shift) - 1)),
        h.refcount_order,
    ))
}

fn block<'c>(w: &Walk<'_>, cache: &'c mut HashMap<u64, Vec<u8>>, off: u64) -> Result<&'c Vec<u8>> {
    if let std::collections::hash_map::Entry::Vacant(e) = cache.entry(off) {
        let mut data = vec![0u8; to_usize(w.cs)];
        w.disk
            .read_or_zero_at(&mut data, off)
            .map_err(|source| Error::Io {
                path: w.path.to_path_buf(),
                what: "read a refcount block of",
                source,
            })?;
        e.insert(data);
    }
    cache.get(&off).ok_or_else(|| Error::Options {
        path: w.path.to_path_buf(),
        why: "refcount block cache".into(),
    })
}

/// Compares stored refcounts with the references counted; returns the
/// leaks as (cluster, references).
fn compare(w: &mut Walk<'_>, h: &Header, blocks: &[Option<u64>]) -> Result<Vec<(u64, u64)>> {
    let shift = h.cluster_bits + 3 - h.refcount_order;
    let epb = 1u64 << shift;
    let nb = len64(w.refs.len());
    let mut cache = HashMap::new();
    let mut fixes = Vec::new();
    let mut highest = 0u64;
    let covered = len64(blocks.len()) * epb;
    for (b, off) in blocks.iter().enumerate() {
        let base = len64(b) * epb;
        let end = match off {
            Some(_) => base + epb,
            None => (base + epb).min(nb),
        };
        if base >= end {
            continue;
        }
        let data = match off {
            Some(o) => Some(block(w, &mut cache, *o)?.clone()),
            None => None,
        };
        for c in base..end {
            let r = data
                .as_ref()
                .map_or(0, |d| get_entry(d, to_usize(c - base), h.refcount_order));
            let n = w.refs.get(to_usize(c)).map_or(0, |n| u64::from(*n));
            if r > 0 || n > 0 {
                highest = highest.max(c + 1);
            }
            if r < n {
                w.report
                    .error(format!("ERROR cluster {c} refcount={r} reference={n}"));
            } else if r > n {
                w.report.leaks += 1;
                w.report
                    .messages
                    .push(format!("Leaked cluster {c} refcount={r} reference={n}"));
                fixes.push((c, n));
            }
        }
    }
    for c in covered..nb {
        let n = u64::from(w.refs[to_usize(c)]);
        if n > 0 {
            highest = highest.max(c + 1);
            w.report
                .error(format!("ERROR cluster {c} refcount=0 reference={n}"));
        }
    }
    w.report.image_end_offset = highest * w.cs;
    Ok(fixes)
}

/// The COPIED flag of every active table entry must say "refcount 1".
fn copied_flags(w: &mut Walk<'_>, h: &Header, blocks: &[Option<u64>]) -> Result<()> {
    let mut cache = HashMap::new();
    for (host, copied, msg) in std::mem::take(&mut w.copied) {
        let r = stored(w, h, blocks, &mut cache, host >> h.cluster_bits)?;
        if (r == 1) != copied {
            w.report.error(format!("{msg} refcount={r}"));
        }
    }
    Ok(())
}

/// Lowers the refcount of each leaked cluster to its references.
fn repair_leaks(disk: &mut Disk, h: &Header, fixes: &mut [(u64, u64)]) -> std::io::Result<()> {
    let cs = h.cluster_size();
    let shift = h.cluster_bits + 3 - h.refcount_order;
    let mut raw = vec![0u8; to_usize(u64::from(h.refcount_table_clusters) * cs)];
    disk.read_exact_at(&mut raw, h.refcount_table_offset)?;
    let table = decode_table(&raw);
    fixes.sort_unstable();
    let mut i = 0;
    while i < fixes.len() {
        let b = fixes[i].0 >> shift;
        let off = table.get(to_usize(b)).copied().unwrap_or(0) & !0x1ff;
        let mut data = vec![0u8; to_usize(cs)];
        disk.read_exact_at(&mut data, off)?;
        while i < fixes.len() && fixes[i].0 >> shift == b {
            let (c, n) = fixes[i];
            set_entry(
                &mut data,
                to_usize(c & ((1u64 << shift) - 1)),
                h.refcount_order,
                n,
            );
            i += 1;
        }
        disk.write_all_at(&data, off)?;
    }
    disk.sync()
}
