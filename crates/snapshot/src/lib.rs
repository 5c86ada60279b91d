//! Ember's snapshot files.
//!
//! A snapshot is two files: the **state file**, a versioned and checksummed
//! envelope around the VM's state (any serde type; ember's own is
//! `ember_vmm::snapshot::VmState`), and the **memory file**, guest RAM with
//! the regions laid end to end (see [`memory`]).
//!
//! The state file, all integers little-endian:
//!
//! | offset | size | field |
//! | --- | --- | --- |
//! | 0 | 8 | magic `EMBERSNP` |
//! | 8 | 4 | format version ([`FORMAT_VERSION`]) |
//! | 12 | 8 | body length `n` |
//! | 20 | n | body: JSON [`Envelope`] |
//! | 20 + n | 8 | CRC-64/XZ of bytes `0 .. 20 + n` |
//!
//! Reading checks, in order: the magic, the format version (so a file of
//! another version is named as such even if its layout changed), the
//! length, the CRC, then parses the body. Each failure is its own
//! [`Error`] naming the problem; nothing is trusted before the CRC matched.
//!
//! ```
//! use ember_snapshot::{decode, encode, Envelope, SnapshotKind};
//!
//! let env = Envelope {
//!     ember_version: "1.0.0".into(),
//!     cpu: "GenuineIntel 6/85/7".into(),
//!     kind: SnapshotKind::Full,
//!     state: vec![1u32, 2, 3],
//! };
//! let bytes = encode(&env).unwrap();
//! let back: Envelope<Vec<u32>> = decode(&bytes).unwrap();
//! assert_eq!(back.state, vec![1, 2, 3]);
//!
//! let mut bad = bytes.clone();
//! bad[30] ^= 1;
//! assert!(decode::<Vec<u32>>(&bad).unwrap_err().to_string().contains("CRC"));
//! ```

pub mod memory;

use std::io::{Read, Write};
use std::path::Path;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

/// The first 8 bytes of every state file.
pub const MAGIC: [u8; 8] = *b"EMBERSNP";
/// The format version this crate writes and reads.
pub const FORMAT_VERSION: u32 = 1;
/// The largest state body read (a VM's state is tens of KiB per vCPU).
pub const MAX_BODY_LEN: u64 = 64 << 20;

const HEADER_LEN: usize = 20;
const CRC_LEN: usize = 8;
const CRC: crc::Crc<u64> = crc::Crc::<u64>::new(&crc::CRC_64_XZ);

/// Errors reading or writing snapshot files.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The state file cannot be read or written.
    #[error("snapshot state file {path}")]
    Io {
        /// The file.
        path: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// Not a state file at all.
    #[error("not an ember snapshot state file (bad magic)")]
    Magic,
    /// A state file of another format version.
    #[error(
        "snapshot format version {found} is not supported: this ember reads version {supported}"
    )]
    Version {
        /// In the file.
        found: u32,
        /// What this build reads.
        supported: u32,
    },
    /// Shorter than its header says.
    #[error("the snapshot state file is truncated: {len} bytes, its header says {expected}")]
    Truncated {
        /// Actual length.
        len: u64,
        /// Length the header implies.
        expected: u64,
    },
    /// Longer than its header says.
    #[error("the snapshot state file has {extra} bytes after its checksum")]
    TrailingBytes {
        /// How many.
        extra: u64,
    },
    /// The body length is beyond [`MAX_BODY_LEN`].
    #[error("the snapshot state body is {0} bytes, more than the {MAX_BODY_LEN} allowed")]
    TooLarge(u64),
    /// The checksum does not match.
    #[error(
        "the snapshot state file is corrupt: CRC64 {found:#018x} does not match {computed:#018x}"
    )]
    Crc {
        /// Stored in the file.
        found: u64,
        /// Of the bytes read.
        computed: u64,
    },
    /// The body is not the state this ember expects.
    #[error("the snapshot state cannot be parsed: {0}")]
    Parse(String),
    /// The state cannot be serialized.
    #[error("the VM state cannot be serialized: {0}")]
    Serialize(String),
    /// A memory file operation failed.
    #[error("snapshot memory file {path}: {what}")]
    Memory {
        /// The file.
        path: String,
        /// What failed.
        what: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// Result type of this crate.
pub type Result<T> = std::result::Result<T, Error>;

/// Whether a memory file holds every page or only the dirtied ones.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum SnapshotKind {
    /// Every non-zero page (zero pages are holes).
    Full,
    /// Only pages dirtied since the previous snapshot, to be applied onto
    /// it (see [`memory::apply_diff`]).
    Diff,
}

/// The body of a state file.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Envelope<T> {
    /// The ember that wrote it (informational).
    pub ember_version: String,
    /// A description of the CPU the guest ran on (vendor, family, model,
    /// stepping), for the messages of a refused load.
    pub cpu: String,
    /// Full or diff.
    pub kind: SnapshotKind,
    /// The VM's state.
    pub state: T,
}

/// Serializes `env` into a state file's bytes.
pub fn encode<T: Serialize>(env: &Envelope<T>) -> Result<Vec<u8>> {
    let body = serde_json::to_vec(env).map_err(|e| Error::Serialize(e.to_string()))?;
    let mut out = Vec::with_capacity(HEADER_LEN + body.len() + CRC_LEN);
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    out.extend_from_slice(&(body.len() as u64).to_le_bytes());
    out.extend_from_slice(&body);
    let crc = CRC.checksum(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    Ok(out)
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    let mut x = [0u8; 4];
    x.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(x)
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    let mut x = [0u8; 8];
    x.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(x)
}

/// Checks a state file's header, length and CRC and returns its body.
pub fn check(bytes: &[u8]) -> Result<&[u8]> {
    let len = bytes.len() as u64;
    if bytes.len() < MAGIC.len() || bytes[..MAGIC.len()] != MAGIC {
        return Err(Error::Magic);
    }
    if bytes.len() < HEADER_LEN {
        return Err(Error::Truncated {
            len,
            expected: (HEADER_LEN + CRC_LEN) as u64,
        });
    }
    let version = u32_at(bytes, 8);
    if version != FORMAT_VERSION {
        return Err(Error::Version {
            found: version,
            supported: FORMAT_VERSION,
        });
    }
    let body_len = u64_at(bytes, 12);
    if body_len > MAX_BODY_LEN {
        return Err(Error::TooLarge(body_len));
    }
    let expected = body_len + (HEADER_LEN + CRC_LEN) as u64;
    if len < expected {
        return Err(Error::Truncated { len, expected });
    }
    if len > expected {
        return Err(Error::TrailingBytes {
            extra: len - expected,
        });
    }
    // body_len <= MAX_BODY_LEN, so it fits in usize.
    let end = HEADER_LEN + usize::try_from(body_len).map_err(|_| Error::TooLarge(body_len))?;
    let found = u64_at(bytes, end);
    let computed = CRC.checksum(&bytes[..end]);
    if found != computed {
        return Err(Error::Crc { found, computed });
    }
    Ok(&bytes[HEADER_LEN..end])
}

/// Checks and parses a state file's bytes.
pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<Envelope<T>> {
    let body = check(bytes)?;
    serde_json::from_slice(body).map_err(|e| Error::Parse(e.to_string()))
}

/// Reads a state file (at most [`MAX_BODY_LEN`] plus its header).
pub fn read_file(path: &Path) -> Result<Vec<u8>> {
    let io = |source| Error::Io {
        path: path.display().to_string(),
        source,
    };
    let f = std::fs::File::open(path).map_err(io)?;
    let mut bytes = Vec::new();
    f.take(MAX_BODY_LEN + (HEADER_LEN + CRC_LEN) as u64 + 1)
        .read_to_end(&mut bytes)
        .map_err(io)?;
    Ok(bytes)
}

/// Writes `bytes` to `path` whole or not at all: into a temporary file
/// beside it, synced, then renamed over `path`.
pub fn write_file(path: &Path, bytes: &[u8]) -> Result<()> {
    let io = |source| Error::Io {
        path: path.display().to_string(),
        source,
    };
    let tmp = temp_path(path);
    let result = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.map_err(io)
}

/// `dir/.name.tmp` for `dir/name`.
pub fn temp_path(path: &Path) -> std::path::PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    path.with_file_name(format!(".{name}.tmp"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Vec<u8> {
        encode(&Envelope {
            ember_version: "1.0.0".into(),
            cpu: "test".into(),
            kind: SnapshotKind::Full,
            state: serde_json::json!({"a": [1, 2, 3]}),
        })
        .unwrap()
    }

    #[test]
    fn decode_round_trips() {
        let b = sample();
        let e: Envelope<serde_json::Value> = decode(&b).unwrap();
        assert_eq!(e.state["a"][2], 3);
        assert_eq!(e.kind, SnapshotKind::Full);
    }

    #[test]
    fn decode_every_truncation_is_an_error() {
        let b = sample();
        for n in 0..b.len() {
            let err = decode::<serde_json::Value>(&b[..n]).unwrap_err();
            assert!(
                matches!(err, Error::Magic | Error::Truncated { .. }),
                "{n}: {err}"
            );
        }
    }

    #[test]
    fn decode_every_flipped_bit_is_an_error() {
        let b = sample();
        for i in 0..b.len() {
            let mut c = b.clone();
            c[i] ^= 0x10;
            assert!(decode::<serde_json::Value>(&c).is_err(), "byte {i}");
        }
    }

    #[test]
    fn decode_other_version_names_both() {
        let mut b = sample();
        b[8..12].copy_from_slice(&7u32.to_le_bytes());
        let msg = decode::<serde_json::Value>(&b).unwrap_err().to_string();
        assert!(
            msg.contains("version 7") && msg.contains("version 1"),
            "{msg}"
        );
    }

    #[test]
    fn decode_trailing_bytes_is_an_error() {
        let mut b = sample();
        b.push(0);
        assert!(matches!(
            decode::<serde_json::Value>(&b),
            Err(Error::TrailingBytes { extra: 1 })
        ));
    }

    #[test]
    fn decode_huge_length_is_refused_before_reading() {
        let mut b = sample();
        b[12..20].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(matches!(
            decode::<serde_json::Value>(&b),
            Err(Error::TooLarge(_))
        ));
    }

    #[test]
    fn decode_wrong_body_type_is_a_parse_error() {
        let b = sample();
        assert!(matches!(decode::<Vec<u8>>(&b), Err(Error::Parse(_))));
    }

    #[test]
    fn write_file_replaces_whole() {
        let dir = std::env::temp_dir().join(format!("ember-snap-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("state");
        write_file(&p, b"one").unwrap();
        write_file(&p, b"two").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"two");
        assert!(!temp_path(&p).exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
