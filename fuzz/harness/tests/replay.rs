//! Replays every seed in `fuzz/corpus/<target>/` and every saved crash in
//! `fuzz/regressions/<target>/` through its target, so that a bug the
//! fuzzer once found stays fixed and every seed still runs clean.
//!
//! Fails when a target has no corpus directory or an empty one, or when
//! `fuzz/regressions/` has a directory that is not a target's.

use std::fs;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The files of `dir`, sorted, without dotfiles (`.gitkeep`).
fn files(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file())
        .filter(|p| !p.file_name().unwrap().to_string_lossy().starts_with('.'))
        .collect();
    v.sort();
    v
}

/// Runs each file through `run`; returns the files that panicked.
fn replay(run: fn(&[u8]), files: &[PathBuf]) -> Vec<String> {
    let mut failed = Vec::new();
    for f in files {
        let data = fs::read(f).unwrap();
        if catch_unwind(AssertUnwindSafe(|| run(&data))).is_err() {
            failed.push(f.display().to_string());
        }
    }
    failed
}

#[test]
fn replay_every_seed_and_regression() {
    let fuzz = fuzz_dir();
    let mut failed = Vec::new();
    let mut total = 0;
    for (name, run) in ember_fuzz_harness::TARGETS {
        let corpus = fuzz.join("corpus").join(name);
        assert!(
            corpus.is_dir(),
            "target {name} has no seed directory {}",
            corpus.display()
        );
        let seeds = files(&corpus);
        assert!(!seeds.is_empty(), "target {name} has no seeds");
        total += seeds.len();
        failed.extend(replay(*run, &seeds));
        let regressions = fuzz.join("regressions").join(name);
        if regressions.is_dir() {
            let saved = files(&regressions);
            total += saved.len();
            failed.extend(replay(*run, &saved));
        }
    }
    assert!(failed.is_empty(), "these inputs panicked: {failed:#?}");
    println!("replayed {total} inputs");
}

#[test]
fn replay_regression_directories_are_targets() {
    let dir = fuzz_dir().join("regressions");
    if !dir.is_dir() {
        return;
    }
    for entry in fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            assert!(
                ember_fuzz_harness::target(&name).is_some(),
                "fuzz/regressions/{name} is not a fuzz target"
            );
        }
    }
}
