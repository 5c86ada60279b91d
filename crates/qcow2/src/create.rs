//! [`create`]: a new, empty qcow2 image laid out as `qemu-img create -f
//! qcow2` lays it out: the header cluster (with the backing format and,
//! for version 3, feature name table extensions, then the backing file
//! name), the refcount table, the refcount block(s), the L1 table.

use std::fs::OpenOptions;
use std::path::Path;

use crate::disk::{len64, lock_file, Disk};
use crate::header::{
    ext, to_usize, Header, FEATURE_NAMES, MAGIC, MAX_BACKING_NAME, V2_HEADER_LEN, V3_HEADER_LEN,
};
use crate::refcount::set_entry;
use crate::{Error, ImageFormat, Result, MAX_L1_ENTRIES, MAX_VIRTUAL_SIZE};

/// What [`create`] makes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CreateOptions {
    /// The virtual size in bytes (a multiple of 512).
    pub size: u64,
    /// The cluster size in bytes: a power of two from 512 to 2 MiB
    /// (default 65536).
    pub cluster_size: u32,
    /// 2 (`compat=0.10`) or 3 (`compat=1.1`, the default).
    pub version: u32,
    /// The backing file's name as it goes into the header: relative names
    /// are relative to the new image's directory. Not opened here.
    pub backing_file: Option<String>,
    /// The backing file's format, written as the backing format extension
    /// (without it, readers probe the backing file).
    pub backing_format: Option<ImageFormat>,
    /// The refcount width in bits: a power of two from 1 to 64 (default
    /// 16; version 2 allows only 16).
    pub refcount_bits: u32,
}

impl Default for CreateOptions {
    fn default() -> Self {
        CreateOptions {
            size: 0,
            cluster_size: 65536,
            version: 3,
            backing_file: None,
            backing_format: None,
            refcount_bits: 16,
        }
    }
}

/// Creates (or truncates) the qcow2 image at `path` with `opts`. The
/// result passes `qemu-img check`, and `qemu-img info` reports the same
/// virtual size, cluster size and backing file.
pub fn create(path: &Path, opts: &CreateOptions) -> Result<()> {
    let bad = |why: String| Error::Options {
        path: path.to_path_buf(),
        why,
    };
    let cs = u64::from(opts.cluster_size);
    if !cs.is_power_of_two() || !(512..=(2 << 20)).contains(&cs) {
        return Err(bad(format!(
            "cluster size {cs}: a power of two from 512 to 2097152 bytes"
        )));
    }
    let cluster_bits = cs.trailing_zeros();
    if opts.version != 2 && opts.version != 3 {
        return Err(bad(format!(
            "version {}: 2 (compat 0.10) or 3 (compat 1.1)",
            opts.version
        )));
    }
    let rb = opts.refcount_bits;
    if !rb.is_power_of_two() || rb > 64 || (opts.version == 2 && rb != 16) {
        return Err(bad(format!(
            "refcount bits {rb}: a power of two from 1 to 64 (only 16 with version 2)"
        )));
    }
    if !opts.size.is_multiple_of(512) || opts.size > MAX_VIRTUAL_SIZE {
        return Err(bad(format!(
            "size {}: a multiple of 512 bytes, at most 2^61",
            opts.size
        )));
    }
    let l1_entries = Header::l1_entries_for(cluster_bits, opts.size);
    if l1_entries > MAX_L1_ENTRIES {
        return Err(bad(format!(
            "size {} needs an L1 table of {l1_entries} entries (at most {MAX_L1_ENTRIES} with {cs}-byte clusters)",
            opts.size
        )));
    }
    if let Some(b) = &opts.backing_file {
        if b.is_empty() || len64(b.len()) > u64::from(MAX_BACKING_NAME) || b.contains('\0') {
            return Err(bad(format!(
                "backing file name {b:?}: 1 to {MAX_BACKING_NAME} bytes, no NUL"
            )));
        }
    } else if opts.backing_format.is_some() {
        return Err(bad("a backing format without a backing file".to_string()));
    }
    let header = header_cluster(opts, cluster_bits, l1_entries).map_err(bad)?;
    let layout = Layout::new(cs, rb, l1_entries);
    let mut header = header;
    put64(&mut header, 40, layout.l1 * cs);
    put64(&mut header, 48, layout.reftable * cs);
    put32(
        &mut header,
        56,
        u32::try_from(layout.reftable_clusters)
            .map_err(|_| bad("refcount table too large".into()))?,
    );

    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .map_err(|source| Error::Open {
            path: path.to_path_buf(),
            source,
        })?;
    lock_file(&file, path, false)?;
    let mut disk = Disk::new(file);
    let io = |source| Error::Io {
        path: path.to_path_buf(),
        what: "write the new image",
        source,
    };
    disk.set_len(0).map_err(io)?;
    disk.write_all_at(&header, 0).map_err(io)?;
    // The refcount table and blocks.
    let order = rb.trailing_zeros();
    let epb = cs * 8 / u64::from(rb);
    let mut table = vec![0u8; to_usize(layout.reftable_clusters * cs)];
    for b in 0..layout.blocks {
        let off = (layout.reftable + layout.reftable_clusters + b) * cs;
        table[to_usize(b * 8)..to_usize(b * 8 + 8)].copy_from_slice(&off.to_be_bytes());
        let mut block = vec![0u8; to_usize(cs)];
        for c in (b * epb)..((b + 1) * epb).min(layout.total) {
            set_entry(&mut block, to_usize(c - b * epb), order, 1);
        }
        disk.write_all_at(&block, off).map_err(io)?;
    }
    disk.write_all_at(&table, layout.reftable * cs)
        .map_err(io)?;
    disk.set_len(layout.total * cs).map_err(io)?;
    disk.sync().map_err(io)?;
    Ok(())
}

/// Where [`create`] puts things, in clusters.
struct Layout {
    reftable: u64,
    reftable_clusters: u64,
    blocks: u64,
    l1: u64,
    total: u64,
}

impl Layout {
    fn new(cs: u64, refcount_bits: u32, l1_entries: u64) -> Layout {
        let epb = cs * 8 / u64::from(refcount_bits);
        let l1_clusters = (l1_entries * 8).div_ceil(cs);
        let (mut t, mut b) = (1u64, 1u64);
        loop {
            let total = 1 + t + b + l1_clusters;
            let nb = total.div_ceil(epb);
            let nt = (nb * 8).div_ceil(cs);
            if nb == b && nt == t {
                return Layout {
                    reftable: 1,
                    reftable_clusters: t,
                    blocks: b,
                    l1: 1 + t + b,
                    total,
                };
            }
            b = nb.max(b);
            t = nt.max(t);
        }
    }
}

fn put32(b: &mut [u8], at: usize, v: u32) {
    b[at..at + 4].copy_from_slice(&v.to_be_bytes());
}

fn put64(b: &mut [u8], at: usize, v: u64) {
    b[at..at + 8].copy_from_slice(&v.to_be_bytes());
}

/// Appends a header extension (padded to 8 bytes).
fn push_ext(out: &mut Vec<u8>, kind: u32, data: &[u8]) {
    out.extend_from_slice(&kind.to_be_bytes());
    out.extend_from_slice(&u32::try_from(data.len()).unwrap_or(0).to_be_bytes());
    out.extend_from_slice(data);
    out.resize(out.len().div_ceil(8) * 8, 0);
}

/// The header cluster, without the table offsets.
fn header_cluster(
    opts: &CreateOptions,
    cluster_bits: u32,
    l1_entries: u64,
) -> std::result::Result<Vec<u8>, String> {
    let cs = 1usize << cluster_bits;
    let hlen = if opts.version == 3 {
        V3_HEADER_LEN
    } else {
        V2_HEADER_LEN
    };
    let mut h = vec![0u8; to_usize(u64::from(hlen))];
    put32(&mut h, 0, MAGIC);
    put32(&mut h, 4, opts.version);
    put32(&mut h, 20, cluster_bits);
    put64(&mut h, 24, opts.size);
    put32(
        &mut h,
        36,
        u32::try_from(l1_entries).map_err(|_| "L1 table too large".to_string())?,
    );
    if opts.version == 3 {
        put32(&mut h, 96, opts.refcount_bits.trailing_zeros());
        put32(&mut h, 100, hlen);
    }
    if let Some(f) = opts.backing_format {
        push_ext(&mut h, ext::BACKING_FORMAT, f.to_string().as_bytes());
    }
    let name = opts.backing_file.as_deref().unwrap_or("");
    let mut with_names = h.clone();
    if opts.version == 3 {
        let mut table = Vec::new();
        for (kind, bit, n) in FEATURE_NAMES {
            let mut e = [0u8; 48];
            e[0] = *kind;
            e[1] = *bit;
            e[2..2 + n.len()].copy_from_slice(n.as_bytes());
            table.extend_from_slice(&e);
        }
        push_ext(&mut with_names, ext::FEATURE_NAMES, &table);
    }
    // The feature name table is optional: left out if the backing file
    // name would not fit in a small cluster otherwise.
    let mut h = if with_names.len() + 8 + name.len() <= cs {
        with_names
    } else {
        h
    };
    h.extend_from_slice(&[0u8; 8]);
    if !name.is_empty() {
        let at = len64(h.len());
        put64(&mut h, 8, at);
        put32(&mut h, 16, u32::try_from(name.len()).unwrap_or(0));
        h.extend_from_slice(name.as_bytes());
    }
    if h.len() > cs {
        return Err(format!(
            "the header with a backing file name of {} bytes does not fit a {cs}-byte cluster",
            name.len()
        ));
    }
    h.resize(cs, 0);
    Ok(h)
}
