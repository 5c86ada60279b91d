//! Reading and writing images ember creates: patterns across cluster
//! boundaries, partial clusters, zeroes, discard, resize, reopen; every
//! refcount width, versions 2 and 3, small and large clusters; each image
//! checked afterwards by `check` and (when installed) `qemu-img`.
// Host-side test code on 64-bit hosts: sizes and offsets fit in usize.
#![allow(clippy::cast_possible_truncation)]

mod common;

use common::*;
use ember_qcow2::{check, create, CreateOptions, Error, ExtentKind, ImageFormat, Qcow2};

fn opts(size: u64, cluster_size: u32, version: u32, refcount_bits: u32) -> CreateOptions {
    CreateOptions {
        size,
        cluster_size,
        version,
        refcount_bits,
        ..CreateOptions::default()
    }
}

/// A deterministic little generator.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

/// Random writes, zero writes, discards and reads on an image and a model
/// of it; reopened, checked by `check` and qemu-img at the end.
fn model_test(name: &str, o: CreateOptions, ops: usize, max_len: u64) {
    let dir = Scratch::new(name);
    let path = dir.path("m.qcow2");
    create(&path, &o).unwrap();
    let size = o.size;
    let mut model = vec![0u8; size as usize];
    let mut rng = Rng(0x1234_5678 ^ u64::from(o.cluster_size) ^ u64::from(o.refcount_bits));
    {
        let mut q = Qcow2::open(&path, false).unwrap();
        for i in 0..ops {
            let len = 1 + rng.below(max_len.min(size));
            let off = rng.below(size - len + 1);
            let (a, b) = (off as usize, (off + len) as usize);
            match rng.below(10) {
                0 => {
                    q.write_zeroes(off, len).unwrap();
                    model[a..b].fill(0);
                }
                1 => {
                    q.discard(off, len).unwrap();
                    model[a..b].fill(0);
                }
                2 | 3 => {
                    let mut buf = vec![0u8; len as usize];
                    q.read_at(&mut buf, off).unwrap();
                    assert!(
                        buf == model[a..b],
                        "{name}: op {i}: read {len} at {off} differs"
                    );
                }
                _ => {
                    let data = pattern(i as u64, len as usize);
                    q.write_at(&data, off).unwrap();
                    model[a..b].copy_from_slice(&data);
                }
            }
            if i % 16 == 0 {
                q.flush().unwrap();
            }
        }
        q.flush().unwrap();
    }
    let mut q = Qcow2::open(&path, true).unwrap();
    let mut all = vec![0u8; size as usize];
    q.read_at(&mut all, 0).unwrap();
    assert!(all == model, "{name}: contents after reopen differ");
    drop(q);
    let r = check(&path, false).unwrap();
    assert!(r.is_clean(), "{name}: check: {r:?}");
    if have("qemu-img", name) {
        qemu_check_clean(&path);
        assert!(
            qemu_read_all(&path, &dir) == model,
            "{name}: qemu-img reads other bytes"
        );
    }
}

#[test]
fn qcow2_random_ops_v3_64k_match_the_model() {
    let _serial = serial();
    model_test("v3-64k", opts(8 << 20, 65536, 3, 16), 300, 300_000);
}

#[test]
fn qcow2_random_ops_v2_64k_match_the_model() {
    let _serial = serial();
    model_test("v2-64k", opts(8 << 20, 65536, 2, 16), 300, 300_000);
}

#[test]
fn qcow2_random_ops_4k_clusters_8bit_refcounts_match_the_model() {
    let _serial = serial();
    model_test("v3-4k-8", opts(4 << 20, 4096, 3, 8), 400, 40_000);
}

#[test]
fn qcow2_random_ops_512b_clusters_1bit_refcounts_match_the_model() {
    let _serial = serial();
    model_test("v3-512-1", opts(1 << 20, 512, 3, 1), 400, 6000);
}

#[test]
fn qcow2_random_ops_512b_clusters_64bit_refcounts_grow_the_refcount_table() {
    let _serial = serial();
    // 64 refcounts per block, 64 blocks per table cluster: the table
    // covers 2 MiB of file and must grow.
    model_test("v3-512-64", opts(6 << 20, 512, 3, 64), 200, 200_000);
}

#[test]
fn qcow2_random_ops_4bit_and_32bit_refcounts_match_the_model() {
    let _serial = serial();
    model_test("v3-1k-4", opts(2 << 20, 1024, 3, 4), 200, 20_000);
    model_test("v3-2k-32", opts(2 << 20, 2048, 3, 32), 200, 20_000);
    model_test("v3-64k-2", opts(2 << 20, 65536, 3, 2), 100, 200_000);
}

#[test]
fn qcow2_write_across_cluster_boundaries_reads_back_after_reopen() {
    let _serial = serial();
    for version in [2, 3] {
        let dir = Scratch::new("boundaries");
        let path = dir.path("b.qcow2");
        create(&path, &opts(1 << 20, 4096, version, 16)).unwrap();
        let data = pattern(7, 10_000);
        {
            let mut q = Qcow2::open(&path, false).unwrap();
            q.write_at(&data, 4090).unwrap();
            q.write_at(b"xy", 4095).unwrap();
        }
        let mut q = Qcow2::open(&path, true).unwrap();
        let mut buf = vec![0u8; 10_020];
        q.read_at(&mut buf, 4080).unwrap();
        assert_eq!(&buf[..10], &[0u8; 10]);
        assert_eq!(&buf[10..15], &data[..5]);
        assert_eq!(&buf[15..17], b"xy");
        assert_eq!(&buf[17..10_010], &data[7..]);
        assert_eq!(&buf[10_010..], &[0u8; 10]);
        assert_eq!(q.info().version, version);
    }
}

#[test]
fn qcow2_open_read_only_refuses_writes() {
    let _serial = serial();
    let dir = Scratch::new("ro");
    let path = dir.path("ro.qcow2");
    create(&path, &opts(1 << 20, 65536, 3, 16)).unwrap();
    let mut q = Qcow2::open(&path, true).unwrap();
    let e = q.write_at(b"x", 0).unwrap_err();
    assert!(e.to_string().contains("read-only"), "{e}");
    assert!(q.discard(0, 65536).is_err());
    assert!(q.write_zeroes(0, 65536).is_err());
    assert!(matches!(q.resize(2 << 20), Err(Error::ReadOnly { .. })));
}

#[test]
fn qcow2_io_past_the_end_is_an_error() {
    let _serial = serial();
    let dir = Scratch::new("end");
    let path = dir.path("e.qcow2");
    create(&path, &opts(1 << 20, 65536, 3, 16)).unwrap();
    let mut q = Qcow2::open(&path, false).unwrap();
    let mut b = [0u8; 2];
    assert!(q.read_at(&mut b, (1 << 20) - 1).is_err());
    assert!(q.write_at(&b, u64::MAX).is_err());
    assert!(q.discard(1 << 20, 1).is_err());
    assert_eq!(q.map(1 << 20, 10).unwrap().len, 0);
}

#[test]
fn qcow2_resize_grows_the_l1_table_and_keeps_the_data() {
    let _serial = serial();
    let dir = Scratch::new("resize");
    let path = dir.path("r.qcow2");
    // 512-byte clusters: one L1 cluster maps 2 MiB.
    create(&path, &opts(1 << 20, 512, 3, 16)).unwrap();
    let data = pattern(3, 5000);
    {
        let mut q = Qcow2::open(&path, false).unwrap();
        q.write_at(&data, 1000).unwrap();
        q.resize(64 << 20).unwrap();
        assert_eq!(q.virtual_size(), 64 << 20);
        q.write_at(&data, (64 << 20) - 5000).unwrap();
        assert!(matches!(q.resize(1 << 20), Err(Error::Shrink { .. })));
        let e = q.resize(1 << 20).unwrap_err().to_string();
        assert!(e.contains("shrink"), "{e}");
    }
    let mut q = Qcow2::open(&path, true).unwrap();
    let mut buf = vec![0u8; 5000];
    q.read_at(&mut buf, 1000).unwrap();
    assert_eq!(buf, data);
    q.read_at(&mut buf, (64 << 20) - 5000).unwrap();
    assert_eq!(buf, data);
    drop(q);
    assert!(check(&path, false).unwrap().is_clean());
    if have("qemu-img", "resize") {
        qemu_check_clean(&path);
        let (_, out) = run("qemu-img", &["info", "--output", "json", s(&path)]);
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(v["virtual-size"], 64 << 20);
    }
}

#[test]
fn qcow2_resize_within_the_l1_table_updates_the_size() {
    let _serial = serial();
    let dir = Scratch::new("resize2");
    let path = dir.path("r.qcow2");
    create(&path, &opts(1 << 20, 65536, 2, 16)).unwrap();
    Qcow2::open(&path, false).unwrap().resize(3 << 20).unwrap();
    assert_eq!(Qcow2::open(&path, true).unwrap().virtual_size(), 3 << 20);
    assert!(check(&path, false).unwrap().is_clean());
}

#[test]
fn qcow2_discard_frees_clusters_and_reads_zero() {
    let _serial = serial();
    let dir = Scratch::new("discard");
    let path = dir.path("d.qcow2");
    create(&path, &opts(4 << 20, 65536, 3, 16)).unwrap();
    let mut q = Qcow2::open(&path, false).unwrap();
    q.write_at(&pattern(1, 1 << 20), 0).unwrap();
    q.flush().unwrap();
    let before = check_allocated(&path, &mut q);
    // Partial at both ends: 100 bytes zeroed, whole clusters freed.
    q.discard(65536 - 100, 3 * 65536 + 200).unwrap();
    let mut buf = vec![0xffu8; 3 * 65536 + 200];
    q.read_at(&mut buf, 65536 - 100).unwrap();
    assert!(buf.iter().all(|b| *b == 0));
    assert_eq!(q.map(65536, 3 * 65536).unwrap().kind, ExtentKind::Backing);
    let after = check_allocated(&path, &mut q);
    assert_eq!(after, before - 3);
    // The data before and after survives.
    let mut b = vec![0u8; 100];
    q.read_at(&mut b, 65536 - 200).unwrap();
    assert_eq!(b, pattern(1, 1 << 20)[65536 - 200..65536 - 100]);
}

fn check_allocated(path: &std::path::Path, q: &mut Qcow2) -> u64 {
    q.unlock().unwrap();
    let r = check(path, false).unwrap();
    q.relock().unwrap();
    assert!(r.is_clean(), "{r:?}");
    r.allocated_clusters
}

#[test]
fn qcow2_write_zeroes_v3_sets_zero_clusters_v2_writes_zeros() {
    let _serial = serial();
    for version in [2, 3] {
        let dir = Scratch::new("zeroes");
        let path = dir.path("z.qcow2");
        create(&path, &opts(1 << 20, 4096, version, 16)).unwrap();
        let mut q = Qcow2::open(&path, false).unwrap();
        q.write_at(&pattern(2, 65536), 0).unwrap();
        q.write_zeroes(100, 20_000).unwrap();
        let mut buf = vec![1u8; 20_000];
        q.read_at(&mut buf, 100).unwrap();
        assert!(buf.iter().all(|b| *b == 0), "v{version}");
        let kind = q.map(4096, 4096).unwrap().kind;
        if version == 3 {
            assert_eq!(kind, ExtentKind::Zero);
        } else {
            assert!(matches!(kind, ExtentKind::Data { .. }), "{kind:?}");
        }
        // Writing into a zero cluster makes it data again.
        q.write_at(b"abc", 4096 + 10).unwrap();
        let mut b = vec![9u8; 4096];
        q.read_at(&mut b, 4096).unwrap();
        assert_eq!(&b[10..13], b"abc");
        assert!(b[..10].iter().chain(&b[13..]).all(|x| *x == 0));
        drop(q);
        assert!(check(&path, false).unwrap().is_clean());
    }
}

#[test]
fn qcow2_map_reports_data_zero_and_backing_extents() {
    let _serial = serial();
    let dir = Scratch::new("map");
    let path = dir.path("m.qcow2");
    create(&path, &opts(1 << 20, 65536, 3, 16)).unwrap();
    let mut q = Qcow2::open(&path, false).unwrap();
    assert_eq!(q.map(0, 1 << 20).unwrap().kind, ExtentKind::Backing);
    assert_eq!(q.map(0, 1 << 20).unwrap().len, 1 << 20);
    q.write_at(&pattern(5, 3 * 65536), 0).unwrap();
    let e = q.map(100, 1 << 20).unwrap();
    let ExtentKind::Data { host_offset } = e.kind else {
        panic!("{e:?}")
    };
    assert_eq!(host_offset % 65536, 100);
    assert_eq!(e.len, 3 * 65536 - 100, "sequential clusters are contiguous");
    // The fast path: the bytes are in the file where map says.
    let mut b = [0u8; 16];
    std::os::unix::fs::FileExt::read_exact_at(q.file(), &mut b, host_offset).unwrap();
    assert_eq!(&b[..], &pattern(5, 3 * 65536)[100..116]);
    // An allocated cluster zeroed becomes a zero cluster; an unallocated
    // one already reads as zeros (no backing file) and stays as it is.
    q.write_zeroes(2 * 65536, 2 * 65536).unwrap();
    assert_eq!(q.map(3 * 65536, 65536).unwrap().kind, ExtentKind::Backing);
    assert_eq!(
        q.map(2 * 65536, 1 << 20).unwrap(),
        ember_qcow2::Extent {
            kind: ExtentKind::Zero,
            len: 65536
        }
    );
}

#[test]
fn qcow2_open_writable_twice_is_locked() {
    let _serial = serial();
    let dir = Scratch::new("lock");
    let path = dir.path("l.qcow2");
    create(&path, &opts(1 << 20, 65536, 3, 16)).unwrap();
    let mut q = Qcow2::open(&path, false).unwrap();
    assert!(matches!(
        Qcow2::open(&path, false),
        Err(Error::Locked { .. })
    ));
    assert!(matches!(
        Qcow2::open(&path, true),
        Err(Error::Locked { .. })
    ));
    q.unlock().unwrap();
    let other = Qcow2::open(&path, true).unwrap();
    assert!(
        q.relock().is_err(),
        "relock while another holds a shared lock"
    );
    drop(other);
    q.relock().unwrap();
    drop(q);
    let _a = Qcow2::open(&path, true).unwrap();
    let _b = Qcow2::open(&path, true).unwrap();
}

#[test]
fn create_invalid_options_are_refused_with_the_reason() {
    let _serial = serial();
    let dir = Scratch::new("opts");
    let path = dir.path("o.qcow2");
    let cases = [
        (opts(1000, 65536, 3, 16), "multiple of 512"),
        (opts(1 << 20, 1000, 3, 16), "cluster size"),
        (opts(1 << 20, 4 << 20, 3, 16), "cluster size"),
        (opts(1 << 20, 65536, 4, 16), "version"),
        (opts(1 << 20, 65536, 2, 8), "refcount bits"),
        (opts(1 << 20, 65536, 3, 128), "refcount bits"),
        (opts(1 << 61, 512, 3, 16), "L1 table"),
    ];
    for (o, want) in cases {
        let e = create(&path, &o).unwrap_err().to_string();
        assert!(e.contains(want), "{e} should say {want}");
    }
    let long = CreateOptions {
        size: 1 << 20,
        backing_file: Some("x".repeat(2000)),
        ..CreateOptions::default()
    };
    assert!(create(&path, &long)
        .unwrap_err()
        .to_string()
        .contains("backing file name"));
}

#[test]
fn probe_tells_qcow2_from_raw() {
    let _serial = serial();
    let dir = Scratch::new("probe");
    let q = dir.path("p.qcow2");
    create(&q, &opts(1 << 20, 65536, 3, 16)).unwrap();
    assert_eq!(ember_qcow2::probe(&q).unwrap(), ImageFormat::Qcow2);
    let r = dir.path("p.raw");
    std::fs::write(&r, [0u8; 512]).unwrap();
    assert_eq!(ember_qcow2::probe(&r).unwrap(), ImageFormat::Raw);
    std::fs::write(&r, b"QF").unwrap();
    assert_eq!(ember_qcow2::probe(&r).unwrap(), ImageFormat::Raw);
}

#[test]
fn image_format_parses_prints_and_serialises_lowercase() {
    let _serial = serial();
    assert_eq!("qcow2".parse::<ImageFormat>().unwrap(), ImageFormat::Qcow2);
    assert_eq!("raw".parse::<ImageFormat>().unwrap(), ImageFormat::Raw);
    let e = "vmdk".parse::<ImageFormat>().unwrap_err().to_string();
    assert!(e.contains("vmdk"), "{e}");
    assert_eq!(ImageFormat::Qcow2.to_string(), "qcow2");
    assert_eq!(
        serde_json::to_string(&ImageFormat::Qcow2).unwrap(),
        "\"qcow2\""
    );
    assert_eq!(
        serde_json::from_str::<ImageFormat>("\"raw\"").unwrap(),
        ImageFormat::Raw
    );
}

#[test]
fn qcow2_info_reports_the_header() {
    let _serial = serial();
    let dir = Scratch::new("info");
    let path = dir.path("i.qcow2");
    create(&path, &opts(1 << 30, 65536, 2, 16)).unwrap();
    let i = Qcow2::open(&path, true).unwrap().info();
    assert_eq!(
        (i.version, i.compat, i.cluster_size, i.virtual_size),
        (2, "0.10", 65536, 1 << 30)
    );
    assert_eq!(
        (i.refcount_bits, i.dirty, i.corrupt, i.snapshots),
        (16, false, false, 0)
    );
    create(&path, &opts(1 << 30, 65536, 3, 64)).unwrap();
    let i = Qcow2::open(&path, true).unwrap().info();
    assert_eq!((i.version, i.compat, i.refcount_bits), (3, "1.1", 64));
}
