//! The qcow2 header (docs/interop/qcow2.txt in QEMU): its fields, its
//! extensions, and [`Header::read`], which validates every one of them
//! before anything else of the image is touched.
//!
//! Only fixed fields are ever written back, in place ([`field`]); the
//! extension area and the backing file name are never rewritten, so
//! extensions this crate does not know (bitmaps, ...) survive untouched.

use std::path::Path;

use crate::disk::Disk;
use crate::{Error, ImageFormat, Result};

/// `QFI\xfb`.
pub const MAGIC: u32 = 0x5146_49fb;
/// The length of a version 2 header (version 3's fixed part is 104 bytes).
pub(crate) const V2_HEADER_LEN: u32 = 72;
/// The header length this crate writes for version 3 (with the
/// compression type byte, padded to 8, as QEMU writes it).
pub(crate) const V3_HEADER_LEN: u32 = 112;

/// Smallest and largest cluster sizes, as powers of two (512 B, 2 MiB).
pub const MIN_CLUSTER_BITS: u32 = 9;
/// See [`MIN_CLUSTER_BITS`].
pub const MAX_CLUSTER_BITS: u32 = 21;
/// The largest L1 table, in entries (32 MiB, QEMU's limit).
pub const MAX_L1_ENTRIES: u64 = (32 << 20) / 8;
/// The largest refcount table, in bytes (8 MiB, QEMU's limit).
pub const MAX_REFTABLE_BYTES: u64 = 8 << 20;
/// The largest virtual size.
pub const MAX_VIRTUAL_SIZE: u64 = 1 << 61;
/// The most internal snapshots (QEMU's limit).
pub const MAX_SNAPSHOTS: u32 = 65536;
/// The longest backing file name (QEMU's limit).
pub const MAX_BACKING_NAME: u32 = 1023;

/// Byte offsets of the fixed fields this crate updates in place.
pub(crate) mod field {
    /// `size` (u64).
    pub const SIZE: u64 = 24;
    /// `refcount_table_offset` (u64), followed by `refcount_table_clusters` (u32).
    pub const REFTABLE_OFFSET: u64 = 48;
    /// `autoclear_features` (u64, version 3).
    pub const AUTOCLEAR: u64 = 88;
}

/// Incompatible feature bits.
pub(crate) mod incompat {
    pub const DIRTY: u64 = 1 << 0;
    pub const CORRUPT: u64 = 1 << 1;
    pub const EXTERNAL_DATA: u64 = 1 << 2;
    pub const COMPRESSION_TYPE: u64 = 1 << 3;
    pub const EXTENDED_L2: u64 = 1 << 4;
    pub const KNOWN: u64 = 0x1f;
}
/// Compatible feature bit 0.
pub(crate) const COMPAT_LAZY_REFCOUNTS: u64 = 1;
/// Autoclear bit 0: the bitmaps extension is consistent.
pub(crate) const AUTOCLEAR_BITMAPS: u64 = 1;

/// Header extension types.
pub(crate) mod ext {
    pub const END: u32 = 0;
    pub const BACKING_FORMAT: u32 = 0xe279_2aca;
    pub const FEATURE_NAMES: u32 = 0x6803_f857;
    pub const BITMAPS: u32 = 0x2385_2875;
    pub const CRYPTO: u32 = 0x0537_be77;
    pub const DATA_FILE: u32 = 0x4441_5441;
}

/// The feature name table QEMU writes (and this crate, for version 3):
/// (type: 0 incompatible, 1 compatible, 2 autoclear; bit; name).
pub(crate) const FEATURE_NAMES: &[(u8, u8, &str)] = &[
    (0, 0, "dirty bit"),
    (0, 1, "corrupt bit"),
    (0, 2, "external data file"),
    (0, 3, "compression type"),
    (0, 4, "extended L2 entries"),
    (1, 0, "lazy refcounts"),
    (2, 0, "bitmaps"),
    (2, 1, "raw external data"),
];

/// A parsed, validated header.
#[derive(Clone, Debug)]
pub(crate) struct Header {
    pub version: u32,
    pub cluster_bits: u32,
    pub size: u64,
    pub l1_size: u32,
    pub l1_table_offset: u64,
    pub refcount_table_offset: u64,
    pub refcount_table_clusters: u32,
    pub nb_snapshots: u32,
    pub snapshots_offset: u64,
    pub incompatible: u64,
    pub compatible: u64,
    pub autoclear: u64,
    pub refcount_order: u32,
    pub header_length: u32,
    pub backing_file: Option<String>,
    pub backing_format: Option<ImageFormat>,
    /// Names from the feature name table extension.
    pub feature_names: Vec<(u8, u8, String)>,
    /// Extension types this crate does not interpret (kept untouched).
    pub unknown_extensions: Vec<u32>,
    /// The bitmaps extension is present.
    pub has_bitmaps: bool,
}

fn be32(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_be_bytes(a)
}

fn be64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_be_bytes(a)
}

/// An [`Error::Invalid`] for `path`.
pub(crate) fn invalid(path: &Path, field: &'static str, why: impl Into<String>) -> Error {
    Error::Invalid {
        path: path.to_path_buf(),
        field,
        why: why.into(),
    }
}

fn unsupported(path: &Path, feature: impl Into<String>) -> Error {
    Error::Unsupported {
        path: path.to_path_buf(),
        feature: feature.into(),
    }
}

impl Header {
    /// The cluster size in bytes.
    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }

    /// The L1 entries a virtual size of `size` bytes needs.
    pub fn l1_entries_for(cluster_bits: u32, size: u64) -> u64 {
        let per_l2 = 1u64 << (2 * cluster_bits - 3);
        size.div_ceil(per_l2)
    }

    /// The refcount width in bits.
    pub fn refcount_bits(&self) -> u32 {
        1 << self.refcount_order
    }

    /// The name of incompatible/compatible/autoclear (`kind` 0/1/2) bit
    /// `bit`, from the image's feature name table if it has one.
    pub fn feature_name(&self, kind: u8, bit: u8) -> Option<&str> {
        self.feature_names
            .iter()
            .find(|(k, b, _)| *k == kind && *b == bit)
            .map(|(_, _, n)| n.as_str())
    }

    /// Reads and validates the header of the image at `path`, whose file
    /// is `disk`. Feature bits that only matter for writing (dirty,
    /// corrupt, snapshots) are left to the caller.
    pub fn read(path: &Path, disk: &Disk) -> Result<Header> {
        let io = |what| {
            move |source| Error::Io {
                path: path.to_path_buf(),
                what,
                source,
            }
        };
        let file_len = disk.len().map_err(io("find the size of"))?;
        let mut fixed = [0u8; V3_HEADER_LEN as usize];
        disk.read_or_zero_at(&mut fixed, 0)
            .map_err(io("read the header of"))?;
        if be32(&fixed, 0) != MAGIC {
            return Err(Error::NotQcow2 {
                path: path.to_path_buf(),
            });
        }
        if file_len < u64::from(V2_HEADER_LEN) {
            return Err(invalid(
                path,
                "header",
                format!("the file is only {file_len} bytes long"),
            ));
        }
        let version = be32(&fixed, 4);
        if version != 2 && version != 3 {
            return Err(invalid(
                path,
                "version",
                format!("{version} (only versions 2 and 3 exist)"),
            ));
        }
        let cluster_bits = be32(&fixed, 20);
        if !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&cluster_bits) {
            return Err(invalid(
                path,
                "cluster_bits",
                format!("{cluster_bits} (clusters of 2^{cluster_bits} bytes; 9 to 21 allowed, 512 B to 2 MiB)"),
            ));
        }
        let cs = 1u64 << cluster_bits;
        // The whole first cluster: extensions and the backing file name live there.
        let cs_usize = 1usize << cluster_bits;
        let mut first = vec![0u8; cs_usize];
        disk.read_or_zero_at(&mut first, 0)
            .map_err(io("read the header of"))?;

        let mut h = Header {
            version,
            cluster_bits,
            size: be64(&first, 24),
            l1_size: be32(&first, 36),
            l1_table_offset: be64(&first, 40),
            refcount_table_offset: be64(&first, 48),
            refcount_table_clusters: be32(&first, 56),
            nb_snapshots: be32(&first, 60),
            snapshots_offset: be64(&first, 64),
            incompatible: 0,
            compatible: 0,
            autoclear: 0,
            refcount_order: 4,
            header_length: V2_HEADER_LEN,
            backing_file: None,
            backing_format: None,
            feature_names: Vec::new(),
            unknown_extensions: Vec::new(),
            has_bitmaps: false,
        };
        let crypt_method = be32(&first, 32);
        let mut compression_type = 0u8;
        if version == 3 {
            h.incompatible = be64(&first, 72);
            h.compatible = be64(&first, 80);
            h.autoclear = be64(&first, 88);
            h.refcount_order = be32(&first, 96);
            h.header_length = be32(&first, 100);
            if h.header_length < 104 || u64::from(h.header_length) > cs {
                return Err(invalid(
                    path,
                    "header_length",
                    format!(
                        "{} (at least 104, at most the cluster size {cs})",
                        h.header_length
                    ),
                ));
            }
            if h.header_length > 104 {
                compression_type = first[104];
            }
        }
        let backing_offset = be64(&first, 8);
        let backing_size = be32(&first, 16);
        h.read_extensions(path, &first, backing_offset)?;
        h.check_features(path, crypt_method, compression_type)?;
        h.check_sizes(path, file_len)?;
        if backing_offset != 0 && backing_size != 0 {
            if backing_size > MAX_BACKING_NAME {
                return Err(invalid(
                    path,
                    "backing_file_size",
                    format!(
                        "{backing_size} bytes (a backing file name is at most {MAX_BACKING_NAME})"
                    ),
                ));
            }
            let end = backing_offset.checked_add(u64::from(backing_size));
            let (start, end) = match end {
                Some(end) if end <= cs => (to_usize(backing_offset), to_usize(end)),
                _ => {
                    return Err(invalid(
                        path,
                        "backing_file_offset",
                        format!("the backing file name at {backing_offset} ({backing_size} bytes) is not inside the first cluster ({cs} bytes)"),
                    ))
                }
            };
            let name = String::from_utf8(first[start..end].to_vec())
                .map_err(|_| invalid(path, "backing file name", "not UTF-8"))?;
            if name.contains('\0') {
                return Err(invalid(path, "backing file name", "contains a NUL byte"));
            }
            h.backing_file = Some(name);
        }
        Ok(h)
    }

    /// Walks the header extensions after the fixed header, up to the
    /// backing file name (or the end of the first cluster).
    fn read_extensions(&mut self, path: &Path, first: &[u8], backing_offset: u64) -> Result<()> {
        let cs = first.len();
        let mut at = to_usize(u64::from(self.header_length));
        let end = if backing_offset > u64::from(self.header_length) && backing_offset < len64(cs) {
            to_usize(backing_offset)
        } else {
            cs
        };
        while at + 8 <= end {
            let kind = be32(first, at);
            let len = to_usize(u64::from(be32(first, at + 4)));
            if kind == ext::END {
                break;
            }
            let data_start = at + 8;
            let data_end = match data_start.checked_add(len) {
                Some(e) if e <= end => e,
                _ => {
                    return Err(invalid(
                        path,
                        "header extension",
                        format!("extension {kind:#010x} at byte {at} is {len} bytes long and runs past the header area ({end} bytes)"),
                    ))
                }
            };
            let data = &first[data_start..data_end];
            match kind {
                ext::BACKING_FORMAT => {
                    let name = String::from_utf8_lossy(data);
                    let name = name.trim_end_matches('\0');
                    self.backing_format = Some(name.parse().map_err(|_| {
                        unsupported(path, format!("backing file format `{name}` (only raw and qcow2 backing files are)"))
                    })?);
                }
                ext::FEATURE_NAMES => {
                    for e in data.chunks_exact(48) {
                        let name = String::from_utf8_lossy(&e[2..]);
                        let name = name.trim_end_matches('\0').to_string();
                        self.feature_names.push((e[0], e[1], name));
                    }
                }
                ext::BITMAPS => self.has_bitmaps = true,
                ext::CRYPTO => {
                    return Err(unsupported(
                        path,
                        "full disk encryption (header extension 0x0537be77)",
                    ))
                }
                ext::DATA_FILE => {}
                other => self.unknown_extensions.push(other),
            }
            at = data_start + len.div_ceil(8) * 8;
        }
        Ok(())
    }

    /// Refuses features this crate cannot read.
    fn check_features(&self, path: &Path, crypt_method: u32, compression_type: u8) -> Result<()> {
        if crypt_method != 0 {
            let how = if crypt_method == 1 { "AES" } else { "LUKS" };
            return Err(unsupported(
                path,
                format!("{how} encryption (crypt_method {crypt_method})"),
            ));
        }
        if self.refcount_order > 6 {
            return Err(invalid(
                path,
                "refcount_order",
                format!(
                    "{} (refcounts of 1 to 64 bits: 0 to 6)",
                    self.refcount_order
                ),
            ));
        }
        let unknown = self.incompatible & !incompat::KNOWN;
        if unknown != 0 {
            let names: Vec<String> = (0u8..64)
                .filter(|b| unknown & (1u64 << b) != 0)
                .map(|b| match self.feature_name(0, b) {
                    Some(n) => format!("bit {b} ({n})"),
                    None => format!("bit {b}"),
                })
                .collect();
            return Err(unsupported(
                path,
                format!("unknown incompatible feature {}", names.join(", ")),
            ));
        }
        if self.incompatible & incompat::EXTERNAL_DATA != 0 {
            return Err(unsupported(
                path,
                "an external data file (incompatible feature bit 2)",
            ));
        }
        if self.incompatible & incompat::EXTENDED_L2 != 0 {
            return Err(unsupported(
                path,
                "extended L2 entries (subclusters, incompatible feature bit 4)",
            ));
        }
        let has_type_bit = self.incompatible & incompat::COMPRESSION_TYPE != 0;
        match (compression_type, has_type_bit) {
            (0, _) => Ok(()),
            (1, true) => Err(unsupported(
                path,
                "zstd compression (compression_type 1; only zlib is supported)",
            )),
            (t, _) => Err(invalid(
                path,
                "compression_type",
                format!("{t} (0 is zlib, 1 zstd with incompatible bit 3 set)"),
            )),
        }
    }

    /// Checks the sizes and offsets of the tables against the file.
    fn check_sizes(&self, path: &Path, file_len: u64) -> Result<()> {
        let cs = self.cluster_size();
        if !self.size.is_multiple_of(512) || self.size > MAX_VIRTUAL_SIZE {
            return Err(invalid(
                path,
                "size",
                format!("{} bytes (a multiple of 512, at most 2^61)", self.size),
            ));
        }
        let l1 = u64::from(self.l1_size);
        if l1 > MAX_L1_ENTRIES {
            return Err(invalid(
                path,
                "l1_size",
                format!("{l1} entries (at most {MAX_L1_ENTRIES}, a 32 MiB table)"),
            ));
        }
        let need = Header::l1_entries_for(self.cluster_bits, self.size);
        if l1 < need {
            return Err(invalid(
                path,
                "l1_size",
                format!(
                    "{l1} entries cannot map a virtual size of {} bytes (needs {need})",
                    self.size
                ),
            ));
        }
        if l1 > 0 {
            table_in_file(
                path,
                "l1_table_offset",
                self.l1_table_offset,
                l1 * 8,
                cs,
                file_len,
            )?;
        }
        let rt = u64::from(self.refcount_table_clusters);
        let max_rt = (MAX_REFTABLE_BYTES / cs).max(1);
        if rt == 0 || rt > max_rt {
            return Err(invalid(
                path,
                "refcount_table_clusters",
                format!("{rt} (1 to {max_rt} clusters: an 8 MiB table)"),
            ));
        }
        table_in_file(
            path,
            "refcount_table_offset",
            self.refcount_table_offset,
            rt * cs,
            cs,
            file_len,
        )?;
        if self.nb_snapshots > MAX_SNAPSHOTS {
            return Err(invalid(
                path,
                "nb_snapshots",
                format!("{} (at most {MAX_SNAPSHOTS})", self.nb_snapshots),
            ));
        }
        if self.nb_snapshots > 0 {
            table_in_file(
                path,
                "snapshots_offset",
                self.snapshots_offset,
                1,
                cs,
                file_len,
            )?;
        }
        Ok(())
    }
}

/// Checks that a table of `len` bytes at `offset` is cluster aligned and
/// inside a file of `file_len` bytes.
pub(crate) fn table_in_file(
    path: &Path,
    field: &'static str,
    offset: u64,
    len: u64,
    cs: u64,
    file_len: u64,
) -> Result<()> {
    if !offset.is_multiple_of(cs) || offset == 0 {
        return Err(invalid(
            path,
            field,
            format!("{offset:#x} is not a cluster-aligned offset after the header"),
        ));
    }
    match offset.checked_add(len) {
        Some(end) if end <= file_len => Ok(()),
        _ => Err(invalid(
            path,
            field,
            format!("the table at {offset:#x} ({len} bytes) runs past the end of the file ({file_len} bytes)"),
        )),
    }
}

/// A `u64` known to be small (at most a cluster, or an in-memory length)
/// as a `usize`.
pub(crate) fn to_usize(n: u64) -> usize {
    usize::try_from(n).unwrap_or(usize::MAX)
}

fn len64(n: usize) -> u64 {
    crate::disk::len64(n)
}

/// Reads the first bytes of `path` and says whether they are a qcow2
/// header's magic.
pub(crate) fn has_magic(file: &std::fs::File) -> std::io::Result<bool> {
    use std::os::unix::fs::FileExt;
    let mut m = [0u8; 4];
    let mut done = 0;
    while done < 4 {
        match file.read_at(&mut m[done..], len64(done)) {
            Ok(0) => return Ok(false),
            Ok(n) => done += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(u32::from_be_bytes(m) == MAGIC)
}
