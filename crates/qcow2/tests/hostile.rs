//! Hostile and damaged images: each is refused (or its bad table reported
//! at the first I/O through it) with an error that names the problem, and
//! nothing panics, `check` included.
// Host-side test code on 64-bit hosts: sizes and offsets fit in usize.
#![allow(clippy::cast_possible_truncation)]

mod common;

use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use common::*;
use ember_qcow2::{check, create, CreateOptions, Error, Qcow2};

const CS: u64 = 65536;
/// Where `create` puts things in a 1 MiB image with 64 KiB clusters, and
/// where the first write puts its L2 table and data.
const L1: u64 = 3 * CS;
const L2: u64 = 4 * CS;
const DATA: u64 = 5 * CS;

/// A v3 image with the first cluster written.
fn image(dir: &Scratch) -> PathBuf {
    let p = dir.path("h.qcow2");
    create(
        &p,
        &CreateOptions {
            size: 1 << 20,
            ..CreateOptions::default()
        },
    )
    .unwrap();
    let mut q = Qcow2::open(&p, false).unwrap();
    q.write_at(&pattern(1, 65536), 0).unwrap();
    drop(q);
    p
}

fn patch(p: &Path, at: u64, bytes: &[u8]) {
    std::fs::OpenOptions::new()
        .write(true)
        .open(p)
        .unwrap()
        .write_all_at(bytes, at)
        .unwrap();
}

fn read64(p: &Path, at: u64) -> u64 {
    let mut b = [0u8; 8];
    std::fs::File::open(p)
        .unwrap()
        .read_exact_at(&mut b, at)
        .unwrap();
    u64::from_be_bytes(b)
}

/// Opening fails (read-only and writable) with a message containing
/// every word of `want`; `check` does not panic either.
fn refused(p: &Path, want: &[&str]) {
    for ro in [true, false] {
        let e = Qcow2::open(p, ro).expect_err("a hostile image opened");
        let msg = chain(&e);
        for w in want {
            assert!(msg.contains(w), "{msg:?} should mention {w:?}");
        }
    }
    let _ = check(p, false);
}

#[test]
fn hostile_header_fields_are_refused_by_name() {
    let cases: &[(u64, &[u8], &[&str])] = &[
        (0, b"QFI\x00", &["not a qcow2 image"]),
        (4, &4u32.to_be_bytes(), &["version", "4"]),
        (20, &30u32.to_be_bytes(), &["cluster_bits", "30"]),
        (20, &8u32.to_be_bytes(), &["cluster_bits"]),
        (24, &1000u64.to_be_bytes(), &["size", "multiple of 512"]),
        (24, &(1u64 << 62).to_be_bytes(), &["size"]),
        (32, &1u32.to_be_bytes(), &["AES encryption"]),
        (32, &2u32.to_be_bytes(), &["encryption"]),
        (36, &u32::MAX.to_be_bytes(), &["l1_size", "at most"]),
        (
            36,
            &100_000u32.to_be_bytes(),
            &["l1_table_offset", "past the end of the file"],
        ),
        (36, &0u32.to_be_bytes(), &["l1_size", "cannot map"]),
        (
            40,
            &(1u64 << 40).to_be_bytes(),
            &["l1_table_offset", "past the end"],
        ),
        (
            40,
            &(L1 + 8).to_be_bytes(),
            &["l1_table_offset", "cluster-aligned"],
        ),
        (
            48,
            &(CS + 512).to_be_bytes(),
            &["refcount_table_offset", "cluster-aligned"],
        ),
        (
            48,
            &(1u64 << 50).to_be_bytes(),
            &["refcount_table_offset", "past the end"],
        ),
        (56, &0u32.to_be_bytes(), &["refcount_table_clusters"]),
        (56, &100_000u32.to_be_bytes(), &["refcount_table_clusters"]),
        (60, &1_000_000u32.to_be_bytes(), &["nb_snapshots"]),
        (
            72,
            &(1u64 << 7).to_be_bytes(),
            &["unknown incompatible feature bit 7"],
        ),
        (72, &(1u64 << 2).to_be_bytes(), &["external data file"]),
        (72, &(1u64 << 4).to_be_bytes(), &["extended L2"]),
        (96, &7u32.to_be_bytes(), &["refcount_order", "7"]),
        (100, &50u32.to_be_bytes(), &["header_length"]),
        (100, &(1u32 << 20).to_be_bytes(), &["header_length"]),
        // A backing file name 2000 bytes long, and one outside the cluster.
        (
            8,
            &[0, 0, 0, 0, 0, 0, 2, 0, 0, 0, 0x07, 0xd0],
            &["backing_file_size", "2000"],
        ),
        (
            8,
            &[0, 0, 0, 0, 0, 0, 0xff, 0xf0, 0, 0, 0, 0x20],
            &["backing_file_offset", "first cluster"],
        ),
        // An extension longer than the header cluster.
        (
            112,
            &[0x12, 0x34, 0x56, 0x78, 0x7f, 0, 0, 0],
            &["header extension", "0x12345678"],
        ),
        // Full disk encryption header extension.
        (
            112,
            &[0x05, 0x37, 0xbe, 0x77, 0, 0, 0, 8],
            &["encryption", "0x0537be77"],
        ),
    ];
    for (at, bytes, want) in cases {
        let dir = Scratch::new("hdr");
        let p = image(&dir);
        patch(&p, *at, bytes);
        refused(&p, want);
    }
}

#[test]
fn hostile_zstd_compression_type_is_refused() {
    let dir = Scratch::new("zstd");
    let p = image(&dir);
    patch(&p, 72, &(1u64 << 3).to_be_bytes());
    patch(&p, 104, &[1]);
    refused(&p, &["zstd"]);
}

#[test]
fn hostile_truncated_header_is_refused() {
    let dir = Scratch::new("short");
    let p = dir.path("s.qcow2");
    std::fs::write(&p, b"QFI\xfb\x00\x00\x00\x03").unwrap();
    refused(&p, &["only 8 bytes"]);
    std::fs::write(&p, b"").unwrap();
    refused(&p, &["not a qcow2 image"]);
}

#[test]
fn hostile_unknown_incompatible_bit_is_named_from_the_feature_table() {
    let dir = Scratch::new("named");
    let p = image(&dir);
    // The feature name table starts at 112 + 8; rename entry 0 (bit 0)
    // to describe bit 9.
    let mut e = [0u8; 48];
    e[1] = 9;
    e[2..12].copy_from_slice(b"frobnicate");
    patch(&p, 120, &e);
    patch(&p, 72, &(1u64 << 9).to_be_bytes());
    refused(&p, &["bit 9 (frobnicate)"]);
}

#[test]
fn hostile_corrupt_and_dirty_bits_refuse_writable_open_only() {
    for (bit, want) in [(1u64 << 1, "marked corrupt"), (1u64, "dirty")] {
        let dir = Scratch::new("bits");
        let p = image(&dir);
        patch(&p, 72, &bit.to_be_bytes());
        let e = Qcow2::open(&p, false).unwrap_err();
        assert!(e.to_string().contains(want), "{e}");
        assert!(e.to_string().contains("check -r all"), "{e}");
        let mut q = Qcow2::open(&p, true).unwrap();
        let mut b = vec![0u8; 65536];
        q.read_at(&mut b, 0).unwrap();
        assert_eq!(b, pattern(1, 65536));
        let info = q.info();
        assert_eq!((info.corrupt, info.dirty), (bit == 2, bit == 1));
    }
}

/// Reading (read-only) and writing (writable) cluster 0 fail with a
/// message containing `want`; nothing panics.
fn io_fails(p: &Path, want: &str) {
    let mut q = Qcow2::open(p, true).unwrap();
    let mut b = vec![0u8; 4096];
    let e = q.read_at(&mut b, 0).unwrap_err();
    assert!(
        e.to_string().contains(want),
        "read: {e} should mention {want:?}"
    );
    assert!(q.map(0, 4096).is_err());
    drop(q);
    let r = check(p, false).unwrap();
    assert!(r.corruptions > 0, "{r:?}");
    let mut q = Qcow2::open(p, false).unwrap();
    let e = q.write_at(&b, 0).unwrap_err();
    assert!(
        e.to_string().contains(want),
        "write: {e} should mention {want:?}"
    );
    // Whatever these do to the damaged entry, they must not panic.
    let _ = q.discard(0, 1 << 20);
    let _ = q.write_zeroes(0, 1 << 20);
}

#[test]
fn hostile_l2_table_past_the_end_of_the_file_fails_io() {
    let dir = Scratch::new("l2eof");
    let p = image(&dir);
    patch(&p, L1, &((1u64 << 40) | (1 << 63)).to_be_bytes());
    io_fails(&p, "past the end of the file");
}

#[test]
fn hostile_unaligned_l2_table_fails_io() {
    let dir = Scratch::new("l2align");
    let p = image(&dir);
    patch(&p, L1, &((L2 + 512) | (1 << 63)).to_be_bytes());
    io_fails(&p, "not cluster aligned");
}

#[test]
fn hostile_data_cluster_past_the_end_and_unaligned_fail_io() {
    let dir = Scratch::new("dataeof");
    let p = image(&dir);
    patch(&p, L2, &((1u64 << 45) | (1 << 63)).to_be_bytes());
    io_fails(&p, "past the end of the file");
    let dir2 = Scratch::new("dataalign");
    let p = image(&dir2);
    patch(&p, L2, &((DATA + 4096) | (1 << 63)).to_be_bytes());
    io_fails(&p, "not properly aligned");
}

#[test]
fn hostile_compressed_garbage_fails_reads_with_a_named_error() {
    let dir = Scratch::new("zgarbage");
    let p = image(&dir);
    // Compressed, 4 sectors at DATA (which holds random bytes), and one
    // pointing far past the end of the file.
    let shift = 62 - (16 - 8);
    patch(&p, L2, &((1u64 << 62) | (3 << shift) | DATA).to_be_bytes());
    patch(
        &p,
        L2 + 8,
        &((1u64 << 62) | (3 << shift) | (1u64 << 40)).to_be_bytes(),
    );
    let mut q = Qcow2::open(&p, true).unwrap();
    let mut b = vec![0u8; 100];
    for at in [0, 65536] {
        let e = q.read_at(&mut b, at).unwrap_err();
        assert!(e.to_string().contains("compressed cluster"), "{e}");
    }
    let _ = check(&p, false).unwrap();
}

#[test]
fn hostile_refcount_block_past_the_end_fails_allocating_writes() {
    let dir = Scratch::new("rbeof");
    let p = image(&dir);
    patch(&p, CS, &(1u64 << 40).to_be_bytes());
    let mut q = Qcow2::open(&p, false).unwrap();
    // In place: no refcounts needed.
    q.write_at(b"fine", 0).unwrap();
    let e = q.write_at(b"alloc", 300_000).unwrap_err();
    assert!(e.to_string().contains("refcount block 0"), "{e}");
    drop(q);
    let r = check(&p, false).unwrap();
    assert!(
        r.messages
            .iter()
            .any(|m| m.contains("refcount block 0 is outside image")),
        "{r:?}"
    );
}

#[test]
fn hostile_refcounts_of_zero_never_hand_out_the_header_or_tables() {
    let dir = Scratch::new("rc0");
    let p = image(&dir);
    // Every refcount 0: the allocator must still not reuse the header,
    // the L1 or refcount table.
    patch(&p, 2 * CS, &[0u8; 64]);
    let mut q = Qcow2::open(&p, false).unwrap();
    q.write_at(&pattern(2, 3 * 65536), 65536).unwrap();
    drop(q);
    let q = Qcow2::open(&p, true).unwrap();
    assert_eq!(q.virtual_size(), 1 << 20);
    assert_eq!(read64(&p, 40), L1, "header intact");
}

#[test]
fn header_unknown_extension_is_kept_and_autoclear_bits_cleared() {
    let dir = Scratch::new("ext");
    let p = image(&dir);
    // Replace the end marker (at 504) with an unknown extension, then a
    // new end marker.
    let mut ext = Vec::new();
    ext.extend_from_slice(&0x1234_5678u32.to_be_bytes());
    ext.extend_from_slice(&5u32.to_be_bytes());
    ext.extend_from_slice(b"hello\0\0\0");
    ext.extend_from_slice(&[0u8; 8]);
    patch(&p, 504, &ext);
    patch(&p, 88, &3u64.to_be_bytes());
    let before = std::fs::read(&p).unwrap()[96..1024].to_vec();
    let info = Qcow2::open(&p, true).unwrap().info();
    assert_eq!(info.unknown_extensions, vec![0x1234_5678]);
    {
        let mut q = Qcow2::open(&p, false).unwrap();
        q.write_at(&pattern(3, 200_000), 100_000).unwrap();
        q.resize(3 << 20).unwrap();
    }
    let after = std::fs::read(&p).unwrap();
    assert_eq!(&after[96..1024], &before[..], "extensions untouched");
    assert_eq!(read64(&p, 88), 0, "autoclear bits cleared");
    assert!(check(&p, false).unwrap().is_clean());
}

#[test]
fn hostile_every_byte_of_the_header_flipped_never_panics() {
    let dir = Scratch::new("flip");
    let p = image(&dir);
    let orig = std::fs::read(&p).unwrap();
    for at in 0..520usize {
        for v in [0xffu8, 0x80, 0x01] {
            let mut bytes = orig.clone();
            bytes[at] ^= v;
            std::fs::write(&p, &bytes).unwrap();
            for ro in [true, false] {
                if let Ok(mut q) = Qcow2::open(&p, ro) {
                    let mut b = vec![0u8; 70_000];
                    let _ = q.read_at(&mut b, 0);
                    if !ro {
                        let _ = q.write_at(&b, 30_000);
                        let _ = q.discard(0, 200_000);
                    }
                }
            }
            let _ = check(&p, false);
        }
    }
    let _: Option<Error> = None;
}
