//! Backing chains: a raw base, a qcow2 overlay on it and another on that;
//! writes reach only the top, reads go through, partial-cluster writes
//! copy the rest of the cluster up, loops and over-deep chains are
//! refused.
// Host-side test code on 64-bit hosts: sizes and offsets fit in usize.
#![allow(clippy::cast_possible_truncation)]

mod common;

use std::path::Path;

use common::*;
use ember_qcow2::{
    check, create, CreateOptions, Error, ExtentKind, ImageFormat, Qcow2, MAX_CHAIN_DEPTH,
};

fn overlay(path: &Path, size: u64, backing: &str, fmt: Option<ImageFormat>, version: u32) {
    create(
        path,
        &CreateOptions {
            size,
            cluster_size: 4096,
            version,
            backing_file: Some(backing.into()),
            backing_format: fmt,
            ..CreateOptions::default()
        },
    )
    .unwrap();
}

#[test]
fn chain_writes_reach_only_the_top_and_reads_go_through() {
    let _serial = serial();
    let dir = Scratch::new("chain");
    let size = 1u64 << 20;
    // The base is shorter than the disk: past its end reads are zeros.
    let base_data = pattern(1, 600_000);
    std::fs::write(dir.path("base.raw"), &base_data).unwrap();
    let mut model = vec![0u8; size as usize];
    model[..600_000].copy_from_slice(&base_data);

    overlay(
        &dir.path("mid.qcow2"),
        size,
        "base.raw",
        Some(ImageFormat::Raw),
        3,
    );
    {
        let mut mid = Qcow2::open(&dir.path("mid.qcow2"), false).unwrap();
        // Partial clusters: the rest comes from the base.
        mid.write_at(&pattern(2, 100), 4096 + 10).unwrap();
        mid.write_at(&pattern(3, 9000), 598_000).unwrap();
    }
    model[4106..4206].copy_from_slice(&pattern(2, 100));
    model[598_000..607_000].copy_from_slice(&pattern(3, 9000));
    // No backing format: the qcow2 backing file is probed.
    overlay(&dir.path("top.qcow2"), size, "mid.qcow2", None, 3);
    let base_hash = hash_file(&dir.path("base.raw"));
    let mid_hash = hash_file(&dir.path("mid.qcow2"));

    let top = dir.path("top.qcow2");
    let mut q = Qcow2::open(&top, false).unwrap();
    let chain = q.backing_chain();
    assert_eq!(chain.len(), 3);
    assert_eq!(chain[0], (top.clone(), ImageFormat::Qcow2));
    assert_eq!(chain[1].1, ImageFormat::Qcow2);
    assert_eq!(chain[2], (dir.path("base.raw"), ImageFormat::Raw));
    for (i, (off, len)) in [
        (4096u64 + 50, 10usize),
        (0, 5),
        (500_000, 20_000),
        (size - 100, 100),
    ]
    .into_iter()
    .enumerate()
    {
        let d = pattern(10 + i as u64, len);
        q.write_at(&d, off).unwrap();
        model[off as usize..off as usize + len].copy_from_slice(&d);
    }
    q.discard(8192, 8192).unwrap();
    model[8192..16384].fill(0);
    let mut all = vec![0u8; size as usize];
    q.read_at(&mut all, 0).unwrap();
    assert!(all == model, "reads through the chain differ");
    assert_eq!(
        q.map(12288, 4096).unwrap().kind,
        ExtentKind::Zero,
        "v3 discard hides the backing file"
    );
    assert_eq!(q.map(16384, 4096).unwrap().kind, ExtentKind::Backing);
    q.flush().unwrap();
    drop(q);

    assert_eq!(
        hash_file(&dir.path("base.raw")),
        base_hash,
        "base unchanged"
    );
    assert_eq!(hash_file(&dir.path("mid.qcow2")), mid_hash, "mid unchanged");
    assert!(check(&top, false).unwrap().is_clean());
    if have("qemu-img", "chain") {
        qemu_check_clean(&top);
        assert!(qemu_read_all(&top, &dir) == model, "qemu reads other bytes");
    }
}

#[test]
fn chain_backing_files_are_locked_shared() {
    let _serial = serial();
    let dir = Scratch::new("chain-lock");
    std::fs::write(dir.path("base.raw"), vec![0u8; 65536]).unwrap();
    overlay(
        &dir.path("top.qcow2"),
        65536,
        "base.raw",
        Some(ImageFormat::Raw),
        3,
    );
    let q = Qcow2::open(&dir.path("top.qcow2"), false).unwrap();
    // Another overlay on the same base: fine (shared).
    overlay(
        &dir.path("other.qcow2"),
        65536,
        "base.raw",
        Some(ImageFormat::Raw),
        3,
    );
    let other = Qcow2::open(&dir.path("other.qcow2"), false).unwrap();
    // The base opened writable by someone else: refused.
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(dir.path("base.raw"))
        .unwrap();
    assert!(f.try_lock().is_err());
    drop((q, other));
    assert!(f.try_lock().is_ok());
}

#[test]
fn chain_v2_overlay_discard_lets_the_backing_file_show() {
    let _serial = serial();
    let dir = Scratch::new("chain-v2");
    std::fs::write(dir.path("base.raw"), vec![0x5au8; 65536]).unwrap();
    overlay(
        &dir.path("top.qcow2"),
        65536,
        "base.raw",
        Some(ImageFormat::Raw),
        2,
    );
    let mut q = Qcow2::open(&dir.path("top.qcow2"), false).unwrap();
    q.write_at(&[1u8; 4096], 0).unwrap();
    q.discard(0, 4096).unwrap();
    let mut b = [0u8; 4096];
    q.read_at(&mut b, 0).unwrap();
    assert!(b.iter().all(|x| *x == 0x5a));
    // write_zeroes on v2 writes zeros instead.
    q.write_zeroes(0, 4096).unwrap();
    q.read_at(&mut b, 0).unwrap();
    assert!(b.iter().all(|x| *x == 0));
    drop(q);
    assert!(check(&dir.path("top.qcow2"), false).unwrap().is_clean());
}

#[test]
fn chain_loops_are_refused_naming_the_file() {
    let _serial = serial();
    let dir = Scratch::new("loop");
    // a -> a
    let a = dir.path("a.qcow2");
    overlay(&a, 65536, "a.qcow2", Some(ImageFormat::Qcow2), 3);
    for ro in [true, false] {
        let e = Qcow2::open(&a, ro).unwrap_err();
        assert!(matches!(e, Error::BackingLoop { .. }), "{}", chain(&e));
        assert!(
            chain(&e).contains("a.qcow2") && chain(&e).contains("loops"),
            "{}",
            chain(&e)
        );
    }
    // a -> b -> a
    overlay(&a, 65536, "b.qcow2", Some(ImageFormat::Qcow2), 3);
    overlay(&dir.path("b.qcow2"), 65536, "a.qcow2", None, 3);
    let e = Qcow2::open(&a, true).unwrap_err();
    assert!(matches!(e, Error::BackingLoop { .. }), "{}", chain(&e));
    // a -> raw a
    overlay(&a, 65536, "a.qcow2", Some(ImageFormat::Raw), 3);
    let e = Qcow2::open(&a, true).unwrap_err();
    assert!(matches!(e, Error::BackingLoop { .. }), "{}", chain(&e));
    assert!(
        check(&a, false).unwrap().is_clean(),
        "check does not follow backing files"
    );
}

#[test]
fn chain_deeper_than_the_limit_is_refused() {
    let _serial = serial();
    let dir = Scratch::new("deep");
    std::fs::write(dir.path("l0"), vec![0u8; 4096]).unwrap();
    for i in 1..=MAX_CHAIN_DEPTH {
        let fmt = if i == 1 {
            ImageFormat::Raw
        } else {
            ImageFormat::Qcow2
        };
        overlay(
            &dir.path(&format!("l{i}")),
            4096,
            &format!("l{}", i - 1),
            Some(fmt),
            3,
        );
    }
    // MAX_CHAIN_DEPTH - 1 qcow2 overlays over the raw base: exactly the limit.
    assert!(Qcow2::open(&dir.path(&format!("l{}", MAX_CHAIN_DEPTH - 1)), true).is_ok());
    let e = Qcow2::open(&dir.path(&format!("l{MAX_CHAIN_DEPTH}")), true).unwrap_err();
    assert!(matches!(e, Error::ChainTooDeep { .. }), "{}", chain(&e));
}

#[test]
fn chain_missing_backing_file_names_both_files() {
    let _serial = serial();
    let dir = Scratch::new("missing");
    overlay(
        &dir.path("top.qcow2"),
        65536,
        "nowhere.raw",
        Some(ImageFormat::Raw),
        3,
    );
    let e = Qcow2::open(&dir.path("top.qcow2"), true).unwrap_err();
    let msg = chain(&e);
    assert!(
        msg.contains("nowhere.raw") && msg.contains("top.qcow2"),
        "{msg}"
    );
}

#[test]
fn chain_smaller_qcow2_backing_reads_zeros_past_its_end() {
    let _serial = serial();
    let dir = Scratch::new("small-backing");
    create(
        &dir.path("base.qcow2"),
        &CreateOptions {
            size: 8192,
            ..CreateOptions::default()
        },
    )
    .unwrap();
    Qcow2::open(&dir.path("base.qcow2"), false)
        .unwrap()
        .write_at(&[7u8; 8192], 0)
        .unwrap();
    overlay(
        &dir.path("top.qcow2"),
        65536,
        "base.qcow2",
        Some(ImageFormat::Qcow2),
        3,
    );
    let mut q = Qcow2::open(&dir.path("top.qcow2"), false).unwrap();
    // A partial write to the cluster straddling the base's end.
    q.write_at(&[1u8; 10], 0).unwrap();
    let mut b = vec![9u8; 65536];
    q.read_at(&mut b, 0).unwrap();
    assert!(b[..10].iter().all(|x| *x == 1));
    assert!(b[10..8192].iter().all(|x| *x == 7));
    assert!(b[8192..].iter().all(|x| *x == 0));
}

#[test]
fn chain_backing_file_that_is_a_fifo_or_a_character_device_is_refused_without_blocking() {
    let _serial = serial();
    let dir = Scratch::new("fifo");
    let fifo = dir.path("pipe");
    let status = std::process::Command::new("mkfifo")
        .arg(&fifo)
        .status()
        .expect("mkfifo");
    assert!(status.success());
    for backing in [fifo.to_str().unwrap(), "/dev/zero"] {
        let top = dir.path("top.qcow2");
        overlay(&top, 1 << 20, backing, None, 3);
        let e = Qcow2::open(&top, true).unwrap_err();
        assert!(
            chain(&e).contains("not a regular file or a block device"),
            "{backing}: {}",
            chain(&e)
        );
    }
}
