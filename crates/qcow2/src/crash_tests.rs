//! Crash ordering: every scenario is run again and again, the image file
//! "crashing" after its first N writes (writes, syncs, truncations and
//! hole punches count; every later one fails and reaches nothing, as after
//! SIGKILL), for every N until the scenario completes. After each crash the
//! image is reopened: `check` finds no corruption (leaks are allowed),
//! every byte reads, and every operation that returned `Ok` before the
//! crash reads back as written. With `qemu-img` installed it checks each
//! crashed image too (exit 0 or 3, never 2).

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::{check, create, CreateOptions, ImageFormat, Qcow2};

/// An operation of a scenario.
#[derive(Clone, Debug)]
enum Op {
    Write(u64, Vec<u8>),
    Discard(u64, u64),
    Zeroes(u64, u64),
    Resize(u64),
    Flush,
}

fn pattern(seed: u64, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| u8::try_from((i as u64 * 7 + seed * 13) % 251).unwrap_or(0) | 1)
        .collect()
}

struct Dir(PathBuf);

impl Dir {
    fn new(name: &str) -> Dir {
        // tmpfs when there is one: a crash point costs syncs, not disk time.
        let root = if Path::new("/dev/shm").is_dir() {
            PathBuf::from("/dev/shm")
        } else {
            std::env::temp_dir()
        };
        let d = root.join(format!("ember-qcow2-crash-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        Dir(d)
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn qemu_img() -> bool {
    Command::new("qemu-img")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

/// One crash test at a time: a `qemu-img` child holds copies of the
/// parent's descriptors (and their `flock` locks) between fork and exec, so
/// an image another test thread just closed could look locked.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Runs `ops` on copies of `base` crashing after N writes, for every N.
/// Returns how many crash points were tried.
fn crash_every_step(name: &str, base: &Path, ops: &[Op]) -> u64 {
    let qemu = qemu_img();
    if !qemu {
        eprintln!("crash test {name}: qemu-img is not installed; ember's check only");
    }
    let img = base.with_extension("crash");
    let mut all = Vec::new();
    for n in 0.. {
        std::fs::copy(base, &img).unwrap();
        let mut q = Qcow2::open(&img, false).unwrap();
        let size0 = q.virtual_size();
        q.disk.crash_after(Some(n));
        let mut done = Vec::new();
        for op in ops {
            let r = match op {
                Op::Write(off, d) => q.write_at(d, *off),
                Op::Discard(off, len) => q.discard(*off, *len),
                Op::Zeroes(off, len) => q.write_zeroes(*off, *len),
                Op::Resize(s) => q.resize(*s).map_err(std::io::Error::other),
                Op::Flush => q.flush(),
            };
            if r.is_err() {
                break;
            }
            done.push(op.clone());
        }
        let completed = done.len() == ops.len();
        drop(q);

        let r = check(&img, false).unwrap();
        assert_eq!(
            r.corruptions, 0,
            "{name}: crash after {n} writes: {:?}",
            r.messages
        );
        // qemu-img on every 8th crash point and the last: a fork and exec
        // costs tens of milliseconds here, ember's own check runs on all.
        if qemu && (n % 8 == 0 || completed) {
            let o = Command::new("qemu-img")
                .arg("check")
                .arg(&img)
                .output()
                .unwrap();
            let code = o.status.code().unwrap_or(-1);
            assert!(
                code == 0 || code == 3,
                "{name}: crash after {n} writes: qemu-img check:\n{}",
                String::from_utf8_lossy(&o.stdout)
            );
        }
        let mut q = Qcow2::open(&img, true).unwrap();
        let size = q.virtual_size();
        assert!(size == size0 || done.iter().any(|o| matches!(o, Op::Resize(_))) || !completed);
        // One buffer for every crash point: a fresh one a step would cost
        // its page faults each time (slow on a software hypervisor).
        all.resize(usize::try_from(size).unwrap(), 0);
        q.read_at(&mut all, 0)
            .unwrap_or_else(|e| panic!("{name}: crash after {n} writes: read: {e}"));
        for op in &done {
            match op {
                Op::Write(off, d) => {
                    let at = usize::try_from(*off).unwrap();
                    assert!(
                        all[at..at + d.len()] == d[..],
                        "{name}: crash after {n}: completed write at {off} lost"
                    );
                }
                Op::Zeroes(off, len) | Op::Discard(off, len) => {
                    let at = usize::try_from(*off).unwrap();
                    let len = usize::try_from(*len).unwrap();
                    assert!(
                        all[at..at + len].iter().all(|b| *b == 0),
                        "{name}: crash after {n}: zeroes at {off} lost"
                    );
                }
                Op::Resize(s) => assert_eq!(size, *s),
                Op::Flush => {}
            }
        }
        drop(q);
        if completed {
            let r = check(&img, false).unwrap();
            assert!(r.is_clean(), "{name}: uncrashed run leaks: {r:?}");
            return n;
        }
    }
    unreachable!()
}

fn new_image(path: &Path, size: u64, cs: u32, rb: u32, backing: Option<&str>) {
    create(
        path,
        &CreateOptions {
            size,
            cluster_size: cs,
            refcount_bits: rb,
            backing_file: backing.map(str::to_string),
            backing_format: backing.map(|_| ImageFormat::Raw),
            ..CreateOptions::default()
        },
    )
    .unwrap();
}

#[test]
fn crash_during_allocating_writes_with_cow_from_backing_leaves_no_corruption() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let d = Dir::new("alloc");
    std::fs::write(d.0.join("base.raw"), pattern(99, 1 << 20)).unwrap();
    let base = d.0.join("img.qcow2");
    // 512-byte clusters and 64-bit refcounts: an L2 table maps 32 KiB, a
    // refcount block covers 64 clusters, so writes make new L2 tables and
    // new refcount blocks.
    new_image(&base, 1 << 20, 512, 64, Some("base.raw"));
    {
        let mut q = Qcow2::open(&base, false).unwrap();
        q.write_at(&pattern(1, 3000), 100_000).unwrap();
    }
    let ops = [
        Op::Write(100, pattern(2, 40_000)),
        Op::Write(100_500, pattern(3, 1000)),
        Op::Flush,
        Op::Write(300_001, pattern(4, 70_000)),
        Op::Zeroes(500_000, 33_000),
        Op::Discard(600_000, 20_000),
    ];
    let steps = crash_every_step("alloc", &base, &ops);
    assert!(steps > 20, "{steps} crash points");
}

#[test]
fn crash_while_the_refcount_table_and_l1_grow_leaves_no_corruption() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let d = Dir::new("grow");
    let base = d.0.join("img.qcow2");
    // The refcount table covers 64 blocks of 64 clusters: 2 MiB of file.
    new_image(&base, 4 << 20, 512, 64, None);
    {
        let mut q = Qcow2::open(&base, false).unwrap();
        q.write_at(&pattern(5, 1_900_000), 0).unwrap();
    }
    let ops = [
        Op::Write(1_950_000, pattern(6, 200_000)),
        Op::Resize(64 << 20),
        Op::Write((64 << 20) - 3000, pattern(7, 3000)),
        Op::Discard(0, 1 << 20),
        Op::Flush,
    ];
    crash_every_step("grow", &base, &ops);
}

#[test]
fn crash_while_overwriting_compressed_clusters_leaves_no_corruption() {
    let _serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    if !qemu_img() {
        eprintln!("SKIPPED crash_while_overwriting_compressed_clusters: qemu-img is not installed");
        return;
    }
    let d = Dir::new("compressed");
    let raw = d.0.join("src.raw");
    let text: Vec<u8> = (0..300_000u32)
        .map(|i| b"compressible "[(i % 13) as usize])
        .collect();
    std::fs::write(&raw, &text).unwrap();
    let base = d.0.join("img.qcow2");
    let o = Command::new("qemu-img")
        .args([
            "convert",
            "-c",
            "-f",
            "raw",
            "-O",
            "qcow2",
            "-o",
            "cluster_size=4096",
        ])
        .arg(&raw)
        .arg(&base)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let ops = [
        Op::Write(4096 + 7, pattern(8, 10)),
        Op::Write(20_000, pattern(9, 20_000)),
        Op::Discard(65536, 65536),
        Op::Zeroes(200_000, 8192),
    ];
    crash_every_step("compressed", &base, &ops);
}
