//! Host disk faults under a real guest, one boot. The guest's agent writes
//! 4 KiB blocks in order, each written and flushed before the next
//! (`ember.blk_fill`), on three disks whose host storage fails:
//!
//! 1. vda, `werror=stop,io=io_uring`, a raw image on a small tmpfs that a
//!    filler file shares: the tmpfs fills up, the write fails with ENOSPC
//!    and ember pauses the VM (`GET /` says "Paused") instead of failing
//!    the request. Resuming while the host is still full is refused and the
//!    VM stays paused; a snapshot is refused (the failed request is held
//!    outside the ring); once the filler is deleted, `PATCH /vm` resumes it,
//!    the request runs again and the guest finishes with no error: every
//!    block is in the image.
//! 2. vdb, `werror=report` (the default), a raw image on a full tmpfs: the
//!    guest's writes fail with an I/O error (VIRTIO_BLK_S_IOERR), ember
//!    goes on, and logs one line per burst of failures (two bursts, with
//!    successful rewrites between them) and one when they succeed again.
//! 3. vdc, `cache=writeback`, a loop device whose backing file sits on a
//!    full tmpfs: writes land in the host's page cache and the guest's
//!    flush fails with EIO when the host writes them back (the fsync
//!    error a real failing disk gives).
//!
//! On every disk, each block the guest saw written and flushed is in the
//! image (for vdc, in the loop device's backing file): no acknowledged
//! write is lost. The guest keeps running throughout and ends with exit 0.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use ember_tests::http::Api;
use ember_tests::{
    agent_all, guest_kernel_dir, kvm_available, pattern_block, spawn_ember, TempDir,
};

const BOOT_TIMEOUT: Duration = Duration::from_secs(900);
const MIB: u64 = 1 << 20;
const BLOCK: u64 = 4096;
/// Each image's size (sparse: the tmpfs under it is what runs out).
const IMAGE: u64 = 8 * MIB;
/// Blocks the guest writes on the stopping disk: 1.5 MiB, more than its
/// tmpfs holds beside the filler, less than it holds without.
const STOP_BLOCKS: u64 = 384;
/// Blocks the guest writes on the full disks: 2 MiB on a 1 MiB tmpfs.
const FILL_BLOCKS: u64 = 512;
/// Blocks rewritten between the two bursts of vdb.
const REWRITE: u64 = 8;

/// A tmpfs of `size` mounted on a new directory; unmounted when dropped.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(dir: &Path, size: &str) -> Tmpfs {
        std::fs::create_dir_all(dir).unwrap();
        run(
            "mount",
            &[
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size}"),
                "tmpfs",
                dir.to_str().unwrap(),
            ],
        )
        .unwrap_or_else(|e| panic!("mount a tmpfs (the test runs as root): {e}"));
        Tmpfs(dir.to_path_buf())
    }

    fn file(&self, name: &str, len: u64) -> PathBuf {
        let p = self.0.join(name);
        std::fs::File::create(&p).unwrap().set_len(len).unwrap();
        p
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = run("umount", &["-l", self.0.to_str().unwrap()]);
    }
}

/// A loop device over a file; detached when dropped.
struct Loop(String);

impl Loop {
    fn attach(file: &Path) -> Result<Loop, String> {
        run("losetup", &["-f", "--show", file.to_str().unwrap()]).map(Loop)
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = run("losetup", &["-d", &self.0]);
    }
}

/// Runs a host command; its trimmed stdout or why it failed.
fn run(cmd: &str, args: &[&str]) -> Result<String, String> {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .map_err(|e| format!("{cmd}: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
    } else {
        Err(format!(
            "{cmd} {args:?}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// The instance state `GET /` reports.
fn state(api: &mut Api) -> String {
    api.call("GET", "/", None, 200).json()["state"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

/// Whether blocks `from..to` of `image` hold the agent's blocks of `seed`.
fn blocks_hold(image: &[u8], seed: u64, from: u64, to: u64) -> Result<(), String> {
    for b in from..to {
        let off = b * BLOCK;
        let at = usize::try_from(off).unwrap();
        if image.get(at..at + 4096) != Some(&pattern_block(seed, off)[..]) {
            return Err(format!("block {b} is not the guest's (seed {seed})"));
        }
    }
    Ok(())
}

fn num(line: &std::collections::HashMap<String, String>, key: &str) -> u64 {
    line.get(key)
        .and_then(|v| v.parse().ok())
        .unwrap_or(u64::MAX)
}

#[test]
fn disk_faults_pause_on_werror_stop_report_in_bursts_and_lose_no_acknowledged_write() {
    let name = "disk_faults_pause_on_werror_stop_report_in_bursts_and_lose_no_acknowledged_write";
    if !kvm_available(name) {
        return;
    }
    let dir = TempDir::new("disk-faults");
    let stop_fs = Tmpfs::mount(&dir.path("stop"), "2m");
    let filler = stop_fs.0.join("filler");
    std::fs::write(&filler, vec![0x5a; usize::try_from(MIB).unwrap()]).unwrap();
    let stop_img = stop_fs.file("stop.img", IMAGE);
    let full_fs = Tmpfs::mount(&dir.path("full"), "1m");
    let full_img = full_fs.file("full.img", IMAGE);
    let eio_fs = Tmpfs::mount(&dir.path("eio"), "1m");
    let eio_backing = eio_fs.file("eio.img", IMAGE);
    // A host without loop devices runs the rest: the EIO part says it did
    // not run.
    let eio = Loop::attach(&eio_backing);
    let eio_disk = match &eio {
        Ok(l) => l.0.clone(),
        Err(e) => {
            eprintln!(
                "SKIPPED (part 3 of {name}): no loop device ({e}): the EIO on flush is not tested"
            );
            eio_backing.to_str().unwrap().to_string()
        }
    };
    let sock = dir.path("api.sock");
    let cmdline = format!(
        "console=ttyS0 reboot=k panic=1 quiet ember.agent=on \
         ember.blk_fill=vda:7:0:{STOP_BLOCKS},vdb:1:0:{FILL_BLOCKS},vdb:2:0:{REWRITE},vdb:3:1024:{REWRITE},vdc:4:0:{FILL_BLOCKS} \
         ember.sleep=900"
    );
    let stop_flag = format!("path={},werror=stop,io=io_uring", stop_img.display());
    let full_flag = format!("path={},werror=report", full_img.display());
    let eio_flag = format!("path={eio_disk},cache=writeback");
    let kernel = guest_kernel_dir().join("vmlinux");
    let mut vm = spawn_ember(
        &[
            "--api-sock",
            sock.to_str().unwrap(),
            "--kernel",
            kernel.to_str().unwrap(),
            "--memory",
            "256",
            "--cmdline",
            &cmdline,
            "--disk",
            &stop_flag,
            "--disk",
            &full_flag,
            "--disk",
            &eio_flag,
            "--log-level",
            "info",
        ],
        b"",
    );
    let mut api = Api::connect(&sock);

    // 1. The stopping disk fills up: the VM pauses.
    let t = Instant::now();
    let mut paused = false;
    while t.elapsed() < BOOT_TIMEOUT {
        if state(&mut api) == "Paused" {
            paused = true;
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(
        paused,
        "the VM pauses when vda's host fills up: {}",
        vm.stdout_so_far()
    );
    let before = vm.stdout_so_far();
    assert!(
        !before.contains("blk_fill dev=vda"),
        "the guest did not see its write fail: {before}"
    );
    // Still full: resuming is refused and the VM stays paused.
    let refused = api.call("PATCH", "/vm", Some(r#"{"state": "Resumed"}"#), 400);
    let fault = refused.fault();
    assert!(
        fault.contains("No space left on device") && fault.contains("stays paused"),
        "{fault}"
    );
    assert_eq!(state(&mut api), "Paused");
    // The failed io_uring request is outside the ring: no snapshot now.
    let snap = dir.path("snap.state");
    let mem = dir.path("snap.mem");
    let body = format!(
        r#"{{"snapshot_path": "{}", "mem_file_path": "{}"}}"#,
        snap.display(),
        mem.display()
    );
    let no_snap = api.call("PUT", "/snapshot/create", Some(&body), 400);
    assert!(
        no_snap.fault().contains("holds 1 failed requests"),
        "{no_snap:?}"
    );
    assert!(!snap.exists() && !mem.exists(), "nothing was written");
    // The host is fixed: the request runs again and the guest goes on.
    std::fs::remove_file(&filler).unwrap();
    api.call("PATCH", "/vm", Some(r#"{"state": "Resumed"}"#), 204);
    assert_eq!(state(&mut api), "Running");

    let sleeping = vm.wait_for_output("EMBER-AGENT sleeping", BOOT_TIMEOUT);
    assert_eq!(state(&mut api), "Running", "the faults did not stop ember");
    api.call(
        "PUT",
        "/actions",
        Some(r#"{"action_type": "SendCtrlAltDel"}"#),
        204,
    );
    let run = vm.finish(BOOT_TIMEOUT + Duration::from_secs(120));
    run.check(sleeping, "the agent finished its writes");
    run.check(run.code() == 0, "the guest restarts: exit 0");
    run.check(!run.stderr.contains("panicked"), "no panic");
    let fills = agent_all(&run.stdout)
        .remove("blk_fill")
        .unwrap_or_default();
    let fill = |dev: &str, seed: &str| {
        fills
            .iter()
            .find(|l| l.get("dev").map(String::as_str) == Some(dev) && l["seed"] == seed)
            .cloned()
            .unwrap_or_else(|| panic!("no blk_fill line for {dev} seed {seed}:\n{}", run.stdout))
    };

    for l in &fills {
        eprintln!("blk_fill {l:?}");
    }
    for l in run.stderr.lines().filter(|l| {
        l.contains(" failed: backend")
            || l.contains("succeed again")
            || l.contains("I/O error")
            || l.contains("went through")
    }) {
        eprintln!("ember: {l}");
    }

    // 1. Every block on the stopping disk, no error seen by the guest.
    let f = fill("vda", "7");
    run.check(
        num(&f, "ok") == STOP_BLOCKS && num(&f, "errors") == 0,
        &format!("vda: every write went through after the resume: {f:?}"),
    );
    let image = std::fs::read(&stop_img).unwrap();
    run.check(
        blocks_hold(&image, 7, 0, STOP_BLOCKS).is_ok(),
        &format!("vda: {:?}", blocks_hold(&image, 7, 0, STOP_BLOCKS)),
    );
    let stop_img_s = stop_img.display().to_string();
    run.check(
        run.stderr.lines().any(|l| {
            l.contains(&stop_img_s)
                && l.contains("write failed: No space left on device")
                && l.contains("werror=stop")
        }) && run.stderr.contains("paused on an I/O error")
            && run.stderr.contains("went through"),
        "ember logged the stop, the pause and the retry",
    );

    // 2. The full disk: failures reported, acknowledged blocks kept, one
    //    line per burst.
    let (first, rewrite, second) = (fill("vdb", "1"), fill("vdb", "2"), fill("vdb", "3"));
    let durable = num(&first, "durable");
    run.check(
        durable > REWRITE
            && durable < FILL_BLOCKS
            && num(&first, "ok") == durable
            && num(&first, "errors") == FILL_BLOCKS - durable,
        &format!("vdb: writes succeed until the host is full, then fail: {first:?}"),
    );
    run.check(
        num(&rewrite, "ok") == REWRITE && num(&second, "errors") == REWRITE,
        &format!(
            "vdb: rewrites of written blocks succeed, new blocks fail: {rewrite:?} {second:?}"
        ),
    );
    let image = std::fs::read(&full_img).unwrap();
    let kept = blocks_hold(&image, 2, 0, REWRITE).and(blocks_hold(&image, 1, REWRITE, durable));
    run.check(
        kept.is_ok(),
        &format!("vdb: every acknowledged block: {kept:?}"),
    );
    let full_s = full_img.display().to_string();
    let lines_with = |disk: &str, what: &str| {
        run.stderr
            .lines()
            .filter(|l| l.contains(disk) && l.contains(what))
            .count()
    };
    let bursts = lines_with(&full_s, "write failed: backend I/O failed: No space left");
    let recovered = lines_with(&full_s, "writes succeed again after");
    run.check(
        bursts == 2 && recovered == 1,
        &format!("vdb: two bursts logged once each ({bursts}), one recovery ({recovered})"),
    );

    // 3. The loop device: the flush fails with EIO; acknowledged blocks are
    //    in the backing file.
    let f = fill("vdc", "4");
    if eio.is_ok() {
        let durable = num(&f, "durable");
        run.check(
            durable > 0 && durable < FILL_BLOCKS && num(&f, "errors") > 0,
            &format!("vdc: flushes fail once the host's writeback fails: {f:?}"),
        );
        // Its writes succeed (into the host's page cache) between the
        // failed flushes: still one burst of failed flushes.
        run.check(
            lines_with(
                &eio_disk,
                "flush failed: backend I/O failed: Input/output error",
            ) == 1
                && lines_with(&eio_disk, "succeed again") == 0,
            "vdc: ember logged the burst of EIO once",
        );
        let backing = std::fs::read(&eio_backing).unwrap();
        let kept = blocks_hold(&backing, 4, 0, durable);
        run.check(
            kept.is_ok(),
            &format!("vdc: every acknowledged block: {kept:?}"),
        );
    }
    drop(eio);
}
