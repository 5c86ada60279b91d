//! `qcow2_image`: a qcow2 image file as a user or an attacker could hand
//! one to ember, opened by `ember_qcow2::Qcow2::open` read-only and
//! writable, driven by a few reads, writes, zero writes, discards, maps,
//! flushes and a resize, then checked by `ember_qcow2::check`.
//!
//! Input: a two-byte little-endian length `n`, then `n` bytes of
//! operations (11 bytes each: kind, offset as 8 bytes, length in 512-byte
//! units as 2 bytes), then the image file. The image is written to a
//! private file on tmpfs (`/dev/shm` when there is one); a backing file it
//! names is opened as ember would open it (read-only, locked shared).
//!
//! Also checks what the crate promises of `map`: an extent inside the disk
//! is never empty and never longer than asked.

use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};

use ember_qcow2::{check, Qcow2};

/// The most bytes one operation reads or writes.
const MAX_IO: u64 = 64 * 1024;
/// Operations per input, at most.
const MAX_OPS: usize = 32;

/// A file of our own, removed when dropped.
struct Scratch(PathBuf);

impl Scratch {
    fn new(data: &[u8]) -> Option<Scratch> {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let dir = if std::path::Path::new("/dev/shm").is_dir() {
            PathBuf::from("/dev/shm")
        } else {
            std::env::temp_dir()
        };
        let path = dir.join(format!(
            "ember-fuzz-qcow2-{}-{}.qcow2",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::write(&path, data).ok()?;
        Some(Scratch(path))
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// One operation.
struct Op {
    kind: u8,
    offset: u64,
    len: u64,
}

fn ops(data: &[u8]) -> Vec<Op> {
    data.chunks_exact(11)
        .take(MAX_OPS)
        .map(|c| {
            let mut off = [0u8; 8];
            off.copy_from_slice(&c[1..9]);
            Op {
                kind: c[0],
                offset: u64::from_le_bytes(off),
                len: (u64::from(u16::from_le_bytes([c[9], c[10]])) * 512).min(MAX_IO),
            }
        })
        .collect()
}

/// Runs `ops` on an open image; writes only if `writable`.
fn drive(q: &mut Qcow2, ops: &[Op], writable: bool) {
    let size = q.virtual_size();
    for op in ops {
        // Mostly inside the disk, sometimes past its end.
        let offset = if op.kind & 0x80 != 0 {
            op.offset
        } else {
            op.offset % size.max(1)
        };
        let len = op.len.min(size.saturating_sub(offset));
        let n = usize::try_from(len).unwrap_or(0);
        match op.kind & 0x7 {
            0 => {
                let mut buf = vec![0u8; n];
                let _ = q.read_at(&mut buf, offset);
            }
            1 if writable => {
                let data: Vec<u8> = (0..n).map(|i| i.to_le_bytes()[0] ^ op.kind).collect();
                // A corrupt image may alias clusters, so what reads back is
                // not checked here (the crate's own tests do, on sound images).
                if q.write_at(&data, offset).is_ok() {
                    let mut back = vec![0u8; n];
                    let _ = q.read_at(&mut back, offset);
                }
            }
            2 if writable => {
                let _ = q.write_zeroes(offset, len);
            }
            3 if writable => {
                let _ = q.discard(offset, len);
            }
            4 => {
                if let Ok(e) = q.map(offset, len.max(1)) {
                    assert!(offset >= size || e.len > 0, "an extent is never empty");
                    assert!(e.len <= len.max(1), "an extent is never longer than asked");
                }
            }
            5 if writable => {
                let _ = q.flush();
            }
            6 if writable => {
                let _ = q.resize(size.saturating_add(op.len));
            }
            _ => {}
        }
    }
}

/// The target.
pub fn qcow2_image(data: &[u8]) {
    let Some((head, rest)) = data.split_first_chunk::<2>() else {
        return;
    };
    let n = usize::from(u16::from_le_bytes(*head)).min(rest.len());
    let (op_bytes, image) = rest.split_at(n);
    let ops = ops(op_bytes);
    let Some(file) = Scratch::new(image) else {
        return;
    };
    if let Ok(mut q) = Qcow2::open(&file.0, true) {
        drive(&mut q, &ops, false);
        let _ = q.info();
    }
    if let Ok(mut q) = Qcow2::open(&file.0, false) {
        drive(&mut q, &ops, true);
        let _ = q.flush();
    }
    if let Ok(report) = check(&file.0, false) {
        let _ = report.is_clean();
    }
}

/// Seeds: small images made by the crate itself (v3 and v2, 4 KiB and
/// 64 KiB clusters, written, zeroed and discarded), with operations.
pub fn seeds() -> Vec<crate::seeds::NamedSeed> {
    let mut out = Vec::new();
    let ops: Vec<u8> = [
        (1u8, 0u64, 8u16),
        (0, 4096, 16),
        (2, 8192, 8),
        (3, 0, 8),
        (4, 0, 128),
        (5, 0, 0),
        (6, 0, 128),
        (0x81, u64::MAX - 100, 8),
    ]
    .iter()
    .flat_map(|&(k, off, len)| {
        let mut v = vec![k];
        v.extend_from_slice(&off.to_le_bytes());
        v.extend_from_slice(&len.to_le_bytes());
        v
    })
    .collect();
    for (name, version, cluster_size, fill) in [
        ("v3_4k_written", 3u32, 4096u32, true),
        ("v3_64k_empty", 3, 65536, false),
        ("v2_4k_written", 2, 4096, true),
    ] {
        let Some(file) = Scratch::new(&[]) else {
            continue;
        };
        let made = ember_qcow2::create(
            &file.0,
            &ember_qcow2::CreateOptions {
                size: 256 * 1024,
                cluster_size,
                version,
                ..Default::default()
            },
        );
        if made.is_err() {
            continue;
        }
        if fill {
            if let Ok(mut q) = Qcow2::open(&file.0, false) {
                let _ = q.write_at(&[0xa5; 10_000], 1000);
                let _ = q.write_zeroes(65536, 8192);
                let _ = q.write_at(&[0x5a; 4096], 131072);
                let _ = q.discard(131072, 4096);
                let _ = q.flush();
            }
        }
        let Ok(image) = std::fs::read(&file.0) else {
            continue;
        };
        let mut seed = u16::try_from(ops.len()).unwrap_or(0).to_le_bytes().to_vec();
        seed.extend_from_slice(&ops);
        seed.extend_from_slice(&image);
        out.push((name, seed));
    }
    out
}
