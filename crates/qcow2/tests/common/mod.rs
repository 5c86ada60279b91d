//! Helpers shared by the integration tests: scratch directories, patterns,
//! and `qemu-img`/`qemu-io` (tests that need them skip loudly without).
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

/// Serialises the tests of one binary that run tools: a child process
/// holds copies of the parent's file descriptors (and so of their `flock`
/// locks) between its fork and its exec, so an image another thread just
/// closed can look locked for a moment.
pub fn serial() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// A scratch directory removed on drop.
pub struct Scratch(pub PathBuf);

impl Scratch {
    pub fn new(name: &str) -> Scratch {
        static N: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "ember-qcow2-{name}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Scratch(dir)
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// `len` bytes of a pattern that differs for every `seed` and offset.
pub fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24).to_le_bytes()[0]
        })
        .collect()
}

/// FNV-1a of a file's bytes.
pub fn hash_file(p: &Path) -> u64 {
    std::fs::read(p)
        .unwrap()
        .iter()
        .fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
            (h ^ u64::from(*b)).wrapping_mul(0x100_0000_01b3)
        })
}

/// The whole error chain on one line.
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut src = e.source();
    while let Some(e) = src {
        s.push_str(": ");
        s.push_str(&e.to_string());
        src = e.source();
    }
    s
}

/// Whether `tool` (qemu-img, qemu-io) is installed; says so loudly if not.
pub fn have(tool: &str, test: &str) -> bool {
    let ok = Command::new(tool)
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        eprintln!("SKIPPED {test}: {tool} is not installed");
    }
    ok
}

/// Runs a tool; returns (exit code, stdout + stderr).
pub fn run(tool: &str, args: &[&str]) -> (i32, String) {
    let o = Command::new(tool).args(args).output().unwrap();
    let mut s = String::from_utf8_lossy(&o.stdout).into_owned();
    s.push_str(&String::from_utf8_lossy(&o.stderr));
    (o.status.code().unwrap_or(-1), s)
}

pub fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// `qemu-img check` passes (exit 0).
pub fn qemu_check_clean(p: &Path) {
    let (code, out) = run("qemu-img", &["check", s(p)]);
    assert_eq!(code, 0, "qemu-img check {}:\n{out}", p.display());
}

/// The image's virtual disk as qemu-img reads it.
pub fn qemu_read_all(img: &Path, dir: &Scratch) -> Vec<u8> {
    let out = dir.path("qemu-out.raw");
    let (code, msg) = run("qemu-img", &["convert", "-O", "raw", s(img), s(&out)]);
    assert_eq!(code, 0, "qemu-img convert:\n{msg}");
    let v = std::fs::read(&out).unwrap();
    std::fs::remove_file(&out).unwrap();
    v
}
