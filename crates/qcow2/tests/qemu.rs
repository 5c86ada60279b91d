//! Interoperability with QEMU 10's `qemu-img` and `qemu-io`: images QEMU
//! wrote read back exactly here, and images written here pass
//! `qemu-img check` and convert to exactly the bytes written. Each test
//! skips (loudly) without the tools.
// Host-side test code on 64-bit hosts: sizes and offsets fit in usize.
#![allow(clippy::cast_possible_truncation)]

mod common;

use common::*;
use ember_qcow2::{check, create, CreateOptions, Error, ExtentKind, ImageFormat, Qcow2};

/// The whole virtual disk as ember reads it.
fn ember_read_all(p: &std::path::Path) -> Vec<u8> {
    let mut q = Qcow2::open(p, true).unwrap();
    let mut v = vec![0u8; q.virtual_size() as usize];
    q.read_at(&mut v, 0).unwrap();
    v
}

fn qemu_io(img: &std::path::Path, cmd: &str) {
    let (code, out) = run("qemu-io", &["-f", "qcow2", "-c", cmd, s(img)]);
    assert_eq!(code, 0, "qemu-io {cmd}:\n{out}");
    assert!(!out.contains("error"), "qemu-io {cmd}:\n{out}");
}

#[test]
fn qemu_io_written_image_reads_back_exactly() {
    let _serial = serial();
    let name = "qemu_io_written_image_reads_back_exactly";
    if !have("qemu-img", name) || !have("qemu-io", name) {
        return;
    }
    for compat in ["0.10", "1.1"] {
        let dir = Scratch::new("qemu-io");
        let img = dir.path("q.qcow2");
        let o = format!("compat={compat},cluster_size=4096");
        let (code, out) = run(
            "qemu-img",
            &["create", "-f", "qcow2", "-o", &o, s(&img), "4M"],
        );
        assert_eq!(code, 0, "{out}");
        qemu_io(&img, "write -P 0xab 0 100k");
        qemu_io(&img, "write -P 0x11 1000 3000");
        qemu_io(&img, "write -P 0x22 2M 5k");
        qemu_io(&img, "write -z 8k 8k");
        qemu_io(&img, "discard 64k 16k");
        let want = qemu_read_all(&img, &dir);
        assert!(
            ember_read_all(&img) == want,
            "compat {compat}: ember reads other bytes"
        );
        assert!(check(&img, false).unwrap().is_clean());
        // ember writes into QEMU's image; QEMU reads ember's writes.
        let mut model = want;
        {
            let mut q = Qcow2::open(&img, false).unwrap();
            for (i, off) in [500u64, 70_000, 1 << 21, 3_000_000].into_iter().enumerate() {
                let data = pattern(i as u64, 9000);
                q.write_at(&data, off).unwrap();
                model[off as usize..off as usize + 9000].copy_from_slice(&data);
            }
            q.flush().unwrap();
        }
        qemu_check_clean(&img);
        assert!(
            qemu_read_all(&img, &dir) == model,
            "compat {compat}: qemu reads other bytes"
        );
    }
}

#[test]
fn qemu_compressed_image_reads_back_and_takes_writes() {
    let _serial = serial();
    let name = "qemu_compressed_image_reads_back_and_takes_writes";
    if !have("qemu-img", name) {
        return;
    }
    let dir = Scratch::new("compressed");
    let raw = dir.path("src.raw");
    let mut data = Vec::new();
    for i in 0..40_000u32 {
        data.extend_from_slice(format!("line {i:08} of compressible text\n").as_bytes());
    }
    data.resize(2 << 20, 0);
    data[(1 << 20)..(1 << 20) + 70_000].copy_from_slice(&pattern(9, 70_000));
    std::fs::write(&raw, &data).unwrap();
    let img = dir.path("c.qcow2");
    let (code, out) = run(
        "qemu-img",
        &[
            "convert",
            "-c",
            "-f",
            "raw",
            "-O",
            "qcow2",
            "-o",
            "cluster_size=4096",
            s(&raw),
            s(&img),
        ],
    );
    assert_eq!(code, 0, "{out}");
    {
        let mut q = Qcow2::open(&img, true).unwrap();
        assert_eq!(q.map(0, 4096).unwrap().kind, ExtentKind::Compressed);
    }
    assert!(ember_read_all(&img) == data, "ember inflates other bytes");
    assert!(check(&img, false).unwrap().is_clean());
    // A partial write into a compressed cluster: read-modify-write into a
    // new cluster, the old one's refcount dropped.
    {
        let mut q = Qcow2::open(&img, false).unwrap();
        q.write_at(b"EMBER", 4096 + 100).unwrap();
        q.write_at(&pattern(4, 10_000), 200_000).unwrap();
        q.discard(8192, 4096).unwrap();
        q.flush().unwrap();
    }
    data[4196..4201].copy_from_slice(b"EMBER");
    data[200_000..210_000].copy_from_slice(&pattern(4, 10_000));
    data[8192..12288].fill(0);
    assert!(ember_read_all(&img) == data);
    qemu_check_clean(&img);
    assert!(qemu_read_all(&img, &dir) == data, "qemu reads other bytes");
    let r = check(&img, false).unwrap();
    assert!(r.is_clean(), "{r:?}");
}

#[test]
fn qemu_img_info_of_an_ember_image_with_a_backing_file_matches() {
    let _serial = serial();
    let name = "qemu_img_info_of_an_ember_image_with_a_backing_file_matches";
    if !have("qemu-img", name) {
        return;
    }
    for version in [2, 3] {
        let dir = Scratch::new("info");
        std::fs::write(dir.path("base.raw"), vec![0u8; 1 << 20]).unwrap();
        let img = dir.path("top.qcow2");
        create(
            &img,
            &CreateOptions {
                size: 3 << 20,
                cluster_size: 16384,
                version,
                backing_file: Some("base.raw".into()),
                backing_format: Some(ImageFormat::Raw),
                ..CreateOptions::default()
            },
        )
        .unwrap();
        let (code, out) = run("qemu-img", &["info", "--output", "json", s(&img)]);
        assert_eq!(code, 0, "{out}");
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(v["format"], "qcow2");
        assert_eq!(v["virtual-size"], 3 << 20);
        assert_eq!(v["cluster-size"], 16384);
        assert_eq!(v["backing-filename"], "base.raw");
        assert_eq!(v["backing-filename-format"], "raw");
        let compat = if version == 2 { "0.10" } else { "1.1" };
        assert_eq!(v["format-specific"]["data"]["compat"], compat);
        qemu_check_clean(&img);
        // Plain images of several sizes and widths check clean too.
        for (size, cs, rb) in [
            (0u64, 65536u32, 16u32),
            (1 << 40, 65536, 16),
            (100 << 20, 512, 64),
            (1 << 30, 2 << 20, 1),
        ] {
            let p = dir.path("plain.qcow2");
            let rb = if version == 2 { 16 } else { rb };
            create(
                &p,
                &CreateOptions {
                    size,
                    cluster_size: cs,
                    version,
                    refcount_bits: rb,
                    ..CreateOptions::default()
                },
            )
            .unwrap();
            qemu_check_clean(&p);
            let (_, out) = run("qemu-img", &["info", "--output", "json", s(&p)]);
            let v: serde_json::Value = serde_json::from_str(&out).unwrap();
            assert_eq!(v["virtual-size"], size);
            assert!(check(&p, false).unwrap().is_clean());
        }
    }
}

#[test]
fn qemu_preallocated_and_1bit_refcount_images_take_ember_writes() {
    let _serial = serial();
    let name = "qemu_preallocated_and_1bit_refcount_images_take_ember_writes";
    if !have("qemu-img", name) {
        return;
    }
    for o in [
        "preallocation=metadata,cluster_size=4096",
        "refcount_bits=1,cluster_size=512",
        "refcount_bits=64,lazy_refcounts=on",
    ] {
        let dir = Scratch::new("prealloc");
        let img = dir.path("p.qcow2");
        let (code, out) = run(
            "qemu-img",
            &["create", "-f", "qcow2", "-o", o, s(&img), "2M"],
        );
        assert_eq!(code, 0, "{out}");
        let mut model = vec![0u8; 2 << 20];
        {
            let mut q = Qcow2::open(&img, false).unwrap();
            for (i, off) in [0u64, 4000, 300_000, (2 << 20) - 7000]
                .into_iter()
                .enumerate()
            {
                let d = pattern(i as u64 + 50, 7000);
                q.write_at(&d, off).unwrap();
                model[off as usize..off as usize + 7000].copy_from_slice(&d);
            }
            q.write_zeroes(300_000, 4000).unwrap();
            model[300_000..304_000].fill(0);
            q.flush().unwrap();
        }
        qemu_check_clean(&img);
        assert!(
            qemu_read_all(&img, &dir) == model,
            "{o}: qemu reads other bytes"
        );
        assert!(ember_read_all(&img) == model, "{o}");
        assert!(check(&img, false).unwrap().is_clean(), "{o}");
    }
}

#[test]
fn qemu_snapshot_image_reads_but_refuses_writable_open() {
    let _serial = serial();
    let name = "qemu_snapshot_image_reads_but_refuses_writable_open";
    if !have("qemu-img", name) || !have("qemu-io", name) {
        return;
    }
    let dir = Scratch::new("snap");
    let img = dir.path("s.qcow2");
    run("qemu-img", &["create", "-f", "qcow2", s(&img), "1M"]);
    qemu_io(&img, "write -P 0x33 0 128k");
    let (code, out) = run("qemu-img", &["snapshot", "-c", "one", s(&img)]);
    assert_eq!(code, 0, "{out}");
    qemu_io(&img, "write -P 0x44 0 64k");
    let mut want = vec![0u8; 1 << 20];
    want[..65536].fill(0x44);
    want[65536..131072].fill(0x33);
    assert!(ember_read_all(&img) == want);
    let mut q = Qcow2::open(&img, true).unwrap();
    assert_eq!(q.info().snapshots, 1);
    assert!(matches!(
        q.map(65536, 4096).unwrap().kind,
        ExtentKind::Shared { .. }
    ));
    drop(q);
    let e = Qcow2::open(&img, false).unwrap_err();
    assert!(matches!(e, Error::Snapshots { count: 1, .. }), "{e}");
    assert!(e.to_string().contains("snapshot"), "{e}");
    // check walks the snapshot's tables too: no false leaks.
    let r = check(&img, false).unwrap();
    assert!(r.is_clean(), "{r:?}");
}

#[test]
fn qemu_bitmap_image_opens_writable_and_keeps_its_extension() {
    let _serial = serial();
    let name = "qemu_bitmap_image_opens_writable_and_keeps_its_extension";
    if !have("qemu-img", name) {
        return;
    }
    let dir = Scratch::new("bitmap");
    let img = dir.path("b.qcow2");
    run("qemu-img", &["create", "-f", "qcow2", s(&img), "1M"]);
    let (code, out) = run("qemu-img", &["bitmap", "--add", s(&img), "b0"]);
    if code != 0 {
        eprintln!("SKIPPED {name}: qemu-img bitmap --add failed: {out}");
        return;
    }
    assert!(Qcow2::open(&img, true).unwrap().info().bitmaps);
    let header_before = std::fs::read(&img).unwrap()[104..512].to_vec();
    {
        let mut q = Qcow2::open(&img, false).unwrap();
        q.write_at(b"data", 0).unwrap();
    }
    let bytes = std::fs::read(&img).unwrap();
    assert_eq!(
        &bytes[104..512],
        &header_before[..],
        "extension area untouched"
    );
    assert_eq!(&bytes[88..96], &[0u8; 8], "autoclear bits cleared");
    let (code, out) = run("qemu-img", &["check", s(&img)]);
    // The bitmap's clusters may show as leaks to QEMU now: never corruption.
    assert!(code == 0 || code == 3, "qemu-img check:\n{out}");
    let r = check(&img, true).unwrap();
    assert_eq!(r.corruptions, 0, "{r:?}");
}
