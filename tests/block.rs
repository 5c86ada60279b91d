//! virtio-blk with real guests: the guest agent reads, writes, discards and
//! stresses disks through the kernel's block layer, and the host checks the
//! image files' bytes. The four-disk boot serves the written disk with
//! `io=io_uring` and a read one with `io=io_uring,cache=none` (O_DIRECT);
//! its second boot reads the written blocks back with `io=sync`. The first
//! two disks are served by I/O threads of their own.
// Host-side test code on 64-bit hosts: sizes and offsets fit in usize.
#![allow(clippy::cast_possible_truncation)]

use std::collections::HashMap;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ember_tests::{
    agent_ok, fnv1a, guest_kernel_dir, kvm_available, pattern_block, pattern_offsets, random_bytes,
    run_ember, spawn_ember, tiny_elf, Run, TempDir,
};

const BOOT_TIMEOUT: Duration = Duration::from_secs(900);
const AGENT: &str = "console=ttyS0 reboot=k panic=1 quiet ember.agent=on";
const MIB: u64 = 1 << 20;

const BIG: u64 = 256 * MIB;
const STRESS_OFF: u64 = 200 * MIB;
const STRESS_LEN: u64 = 16 * MIB;
const DISCARD_OFF: u64 = 240 * MIB;
const ZERO_OFF: u64 = 248 * MIB;
const RANGE_LEN: u64 = 4 * MIB;
const PATTERN_BLOCKS: u64 = 64;

fn ember(args: &[String]) -> Run {
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    run_ember(&a, b"", BOOT_TIMEOUT)
}

fn disk_arg(path: &Path, extra: &str) -> [String; 2] {
    ["--disk".into(), format!("path={}{extra}", path.display())]
}

fn boot_args(cmdline: &str, disks: &[[String; 2]]) -> Vec<String> {
    let mut a = vec![
        "--kernel".to_string(),
        guest_kernel_dir()
            .join("vmlinux")
            .to_string_lossy()
            .into_owned(),
        "--memory".into(),
        "256".into(),
        "--cmdline".into(),
        cmdline.into(),
    ];
    for d in disks {
        a.extend(d.iter().cloned());
    }
    a
}

fn by_dev<'a>(lines: &'a [HashMap<String, String>], dev: &str) -> &'a HashMap<String, String> {
    lines
        .iter()
        .find(|l| l.get("dev").map(String::as_str) == Some(dev))
        .unwrap_or_else(|| panic!("no line for {dev}"))
}

/// A seed whose pattern blocks avoid the discard, zero-out and stress ranges.
fn pattern_seed() -> u64 {
    let clear = |off: u64| {
        ![
            (STRESS_OFF, STRESS_LEN),
            (DISCARD_OFF, RANGE_LEN),
            (ZERO_OFF, RANGE_LEN),
        ]
        .iter()
        .any(|&(o, l)| off + 4096 > o && off < o + l)
    };
    (1000..)
        .find(|&s| {
            pattern_offsets(s, PATTERN_BLOCKS, BIG)
                .into_iter()
                .all(clear)
        })
        .expect("a seed")
}

fn write_file(dir: &TempDir, name: &str, bytes: &[u8]) -> PathBuf {
    dir.write(name, bytes)
}

fn is_hole(path: &Path, off: u64, len: u64) -> bool {
    use std::os::fd::AsRawFd;
    let f = std::fs::File::open(path).unwrap();
    // SAFETY: lseek on a descriptor we own.
    let data = unsafe { libc::lseek(f.as_raw_fd(), off as libc::off_t, libc::SEEK_DATA) };
    data < 0 || data as u64 >= off + len
}

/// Four disks at once, each checked: a 16 MiB host-made disk read whole,
/// a 256 MiB disk written at scattered offsets, discarded, zeroed and
/// stressed by 4 kernel threads, a read-only disk, a small fourth disk;
/// MSI-X on every function; ids through GET_ID. Then a second boot reads
/// the scattered blocks back.
#[test]
fn block_four_disks_read_write_discard_stress_read_only_then_reboot_and_verify() {
    if !kvm_available("block_four_disks_read_write_discard_stress_read_only_then_reboot_and_verify")
    {
        return;
    }
    let dir = TempDir::new("blk4");
    let vda_bytes = random_bytes(1, 16 * MIB as usize);
    let vda = write_file(&dir, "vda.img", &vda_bytes);
    let vdb = dir.path("vdb.img");
    {
        use std::io::{Seek, SeekFrom, Write};
        let mut f = std::fs::File::create(&vdb).unwrap();
        f.set_len(BIG).unwrap();
        // Data where the guest will discard and zero, so the holes show.
        for off in [DISCARD_OFF, ZERO_OFF] {
            f.seek(SeekFrom::Start(off)).unwrap();
            f.write_all(&vec![0xab; RANGE_LEN as usize]).unwrap();
        }
    }
    let vdc_bytes = random_bytes(3, MIB as usize);
    let vdc = write_file(&dir, "vdc.img", &vdc_bytes);
    // An old mtime, so any write would show.
    let old = std::time::SystemTime::UNIX_EPOCH + Duration::from_secs(1_600_000_000);
    std::fs::File::options()
        .write(true)
        .open(&vdc)
        .unwrap()
        .set_modified(old)
        .unwrap();
    let vdc_mtime = std::fs::metadata(&vdc).unwrap().mtime();
    let vdd_bytes = random_bytes(4, 2 * MIB as usize);
    let vdd = write_file(&dir, "vdd.img", &vdd_bytes);

    let seed = pattern_seed();
    let kib = |b: u64| b / 1024;
    // loglevel=7 after quiet: the kernel's PCI and ACPI lines (KERN_INFO) are checked.
    let cmdline = format!(
        "{AGENT} loglevel=7 ember.pci=on ember.blk_serial=vda,vdb,vdc,vdd ember.blk_read=vda,vdd \
         ember.blk_write=vdb:{seed}:{PATTERN_BLOCKS} ember.blk_ro=vdc \
         ember.blk_discard=vdb:{}:{} ember.blk_zeroout=vdb:{}:{} \
         ember.blk_stress=vdb:4:8:{}:{}",
        kib(DISCARD_OFF),
        kib(RANGE_LEN),
        kib(ZERO_OFF),
        kib(RANGE_LEN),
        kib(STRESS_OFF),
        kib(STRESS_LEN)
    );
    let disks = [
        // vda and vdb on I/O threads of their own (sync and io_uring).
        disk_arg(&vda, ",id=alpha,iothread=on"),
        // The written, discarded and stressed disk on io_uring (the second
        // boot reads it back on io=sync); the read one also O_DIRECT.
        disk_arg(&vdb, ",id=bravo,io=io_uring,iothread=on"),
        disk_arg(&vdc, ",read_only=on,id=charlie"),
        disk_arg(&vdd, ",id=delta,io=io_uring,cache=none"),
    ];
    let mut args = boot_args(&cmdline, &disks);
    args.extend(["--log-level".into(), "info".into()]);
    let run = ember(&args);
    let a = agent_ok(&run);
    // The io_uring disks really went through their rings (ember's exit
    // counters: `N through the ring`).
    for i in [1, 3] {
        let line = run
            .stderr
            .lines()
            .find(|l| l.contains(&format!("virtio-blk{i}: ")) && l.contains("io=io_uring"))
            .unwrap_or_else(|| panic!("no counters for virtio-blk{i}:\n{}", run.stderr));
        let n: u64 = line
            .rsplit_once(" through the ring")
            .and_then(|(l, _)| l.rsplit_once('(').map(|(_, n)| n))
            .and_then(|n| n.parse().ok())
            .unwrap_or(0);
        // Every read, write and flush of a raw image goes to the ring.
        let words: Vec<&str> = line.split_whitespace().collect();
        let count = |what: &str| -> u64 {
            words
                .windows(2)
                .find(|w| w[1].trim_end_matches(',') == what)
                .and_then(|w| w[0].parse().ok())
                .unwrap_or(0)
        };
        let eligible = count("reads") + count("writes") + count("flushes");
        run.check(
            eligible > 10 && n == eligible,
            &format!("virtio-blk{i}: every read, write and flush went through io_uring: {line}"),
        );
    }

    // vda and vdb were served by their own threads, the others were not.
    for (i, own) in [(0, true), (1, true), (2, false), (3, false)] {
        let served = ember_tests::io_thread_served(&run.stderr, &format!("virtio-blk{i}"));
        run.check(
            if own {
                served.is_some_and(|n| n > 10)
            } else {
                served.is_none()
            },
            &format!("virtio-blk{i}: I/O thread {own}, it served {served:?} events"),
        );
    }

    // PCI through ACPI: the MCFG's MMCONFIG area taken, the host bridge
    // found from the DSDT, with devices on the bus.
    for needle in [
        "PCI: MMCONFIG for domain 0000 [bus 00-00] at [mem 0xe0000000-0xe00fffff]",
        "ACPI: PCI Root Bridge [PCI0] (domain 0000 [bus 00])",
    ] {
        run.check(
            run.stdout.contains(needle),
            &format!("the guest logged {needle:?}"),
        );
    }
    // PCI: the host bridge and one virtio-blk function per disk, MSI-X on.
    let pci = &a["pci"];
    run.check(
        pci.iter()
            .any(|l| l["vendor"] == "8086" && l["class"] == "060000"),
        "the guest found the host bridge",
    );
    let blk: Vec<_> = pci.iter().filter(|l| l["vendor"] == "1af4").collect();
    run.check(blk.len() == 4, "four virtio functions");
    run.check(
        blk.iter()
            .all(|l| l["device"] == "1042" && l["msix"] == "1"),
        "each is a modern virtio-blk with MSI-X enabled",
    );
    // Ids through GET_ID.
    for (dev, id) in [
        ("vda", "alpha"),
        ("vdb", "bravo"),
        ("vdc", "charlie"),
        ("vdd", "delta"),
    ] {
        run.check(
            by_dev(&a["blk_serial"], dev)["serial"] == id,
            &format!("{dev} serial {id}"),
        );
    }
    // Whole-disk reads match the host's bytes.
    for (dev, bytes) in [("vda", &vda_bytes), ("vdd", &vdd_bytes)] {
        let l = by_dev(&a["blk_read"], dev);
        run.check(
            l["bytes"] == bytes.len().to_string(),
            &format!("{dev} read whole"),
        );
        run.check(
            l["fnv1a"] == format!("{:016x}", fnv1a(bytes)),
            &format!("{dev} checksum matches the host's"),
        );
    }
    eprintln!(
        "guest read rate: {} KiB/s",
        by_dev(&a["blk_read"], "vda")["kib_per_s"]
    );
    // Scattered writes reached the file, every byte.
    run.check(
        by_dev(&a["blk_write"], "vdb")["errors"] == "0",
        "writes and fsync succeeded",
    );
    let image = std::fs::read(&vdb).unwrap();
    for off in pattern_offsets(seed, PATTERN_BLOCKS, BIG) {
        let o = off as usize;
        run.check(
            image[o..o + 4096] == pattern_block(seed, off)[..],
            &format!("block at {off:#x} holds the guest's pattern"),
        );
    }
    // Discard and write-zeroes punched holes.
    for (what, off) in [("blk_discard", DISCARD_OFF), ("blk_zeroout", ZERO_OFF)] {
        run.check(
            by_dev(&a[what], "vdb")["ret"] == "0",
            &format!("{what} succeeded"),
        );
        let o = off as usize;
        run.check(
            image[o..o + RANGE_LEN as usize].iter().all(|&b| b == 0),
            &format!("{what} range reads zero"),
        );
        run.check(
            is_hole(&vdb, off, RANGE_LEN),
            &format!("{what} punched a hole"),
        );
    }
    // Concurrent writers verified their data.
    let s = by_dev(&a["blk_stress"], "vdb");
    run.check(
        s["errors"] == "0" && s["mismatches"] == "0",
        "stress: no errors, no mismatches",
    );
    // The read-only disk refused the write and is untouched.
    run.check(
        by_dev(&a["blk_ro"], "vdc")["refused"] == "1",
        "the read-only disk refused",
    );
    run.check(
        std::fs::read(&vdc).unwrap() == vdc_bytes,
        "read-only image bytes unchanged",
    );
    run.check(
        std::fs::metadata(&vdc).unwrap().mtime() == vdc_mtime,
        "read-only image mtime unchanged",
    );

    // A second boot reads the scattered blocks back (the image is its only
    // disk now, so the guest calls it vda).
    let cmdline = format!("{AGENT} ember.blk_verify=vda:{seed}:{PATTERN_BLOCKS}");
    let run = ember(&boot_args(&cmdline, &[disk_arg(&vdb, "")]));
    let a = agent_ok(&run);
    let v = by_dev(&a["blk_verify"], "vda");
    run.check(
        v["mismatches"] == "0" && v["errors"] == "0",
        "second boot reads the pattern back",
    );
}

/// The kernel mounts an ext4 root disk read-write (no initramfs).
#[test]
fn block_ext4_root_disk_mounts_read_write() {
    if !kvm_available("block_ext4_root_disk_mounts_read_write") {
        return;
    }
    let image = ember_tests::rootfs_image();
    let dir = TempDir::new("root");
    let root = dir.path("root.ext4");
    std::fs::copy(&image, &root).unwrap();
    // On a hardware KVM host busybox reboots at once; here user space cannot
    // run, init faults, the kernel panics and reboots (panic=1): exit 0 both ways.
    let cmdline = "console=ttyS0 reboot=k panic=1 root=/dev/vda rw init=/bin/busybox -- reboot -f";
    let run = ember(&boot_args(cmdline, &[disk_arg(&root, "")]));
    run.check(run.code() == 0, "the guest ends by rebooting");
    run.check(
        run.stdout.contains("EXT4-fs (vda): mounted filesystem"),
        "ext4 mounted /dev/vda",
    );
    run.check(
        run.stdout
            .contains("VFS: Mounted root (ext4 filesystem) on device"),
        "the root was mounted read-write",
    );
}

/// A second ember cannot open an image another holds writable.
#[test]
fn block_second_ember_cannot_open_a_writable_image_in_use() {
    if !kvm_available("block_second_ember_cannot_open_a_writable_image_in_use") {
        return;
    }
    let dir = TempDir::new("lock");
    let img = write_file(&dir, "shared.img", &vec![0u8; MIB as usize]);
    // mov $0x3f8,%dx ; mov $'R',%al ; out %al,(%dx) ; 1: jmp 1b
    let k = dir.write(
        "spin.elf",
        &tiny_elf(&[0x66, 0xba, 0xf8, 0x03, 0xb0, 0x52, 0xee, 0xeb, 0xfe]),
    );
    let k = k.to_string_lossy().into_owned();
    let disk = format!("path={}", img.display());
    let mut first = spawn_ember(&["--kernel", &k, "--memory", "16", "--disk", &disk], b"");
    assert!(
        first.wait_for_output("R", Duration::from_secs(30)),
        "first ember runs"
    );
    let second = run_ember(
        &["--kernel", &k, "--memory", "16", "--disk", &disk],
        b"",
        Duration::from_secs(30),
    );
    let ro = format!("{disk},read_only=on");
    let third = run_ember(
        &["--kernel", &k, "--memory", "16", "--disk", &ro],
        b"",
        Duration::from_secs(30),
    );
    first.signal(libc::SIGTERM);
    let first = first.finish(Duration::from_secs(30));
    first.check(first.code() == 143, "the first ember ran until SIGTERM");
    ember_tests::assert_clean_error(&second, &["shared.img"]);
    second.check(
        second.stderr.contains("lock") || second.stderr.contains("in use"),
        "says the image is in use",
    );
    ember_tests::assert_clean_error(&third, &["shared.img"]);
}
