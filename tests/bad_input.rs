//! Bad user input: each case must end ember with one clear error line
//! naming the problem, a non-zero exit and no panic.

use std::time::Duration;

use ember_tests::{
    assert_clean_error, guest_kernel_dir, kvm_available, run_ember, tiny_elf, TempDir,
};

const TIMEOUT: Duration = Duration::from_secs(60);

/// A valid tiny guest (resets at once), for cases where the kernel is not the problem.
fn good_kernel(dir: &TempDir) -> String {
    // mov $0xfe,%al ; out %al,$0x64 ; hlt
    let elf = tiny_elf(&[0xb0, 0xfe, 0xe6, 0x64, 0xf4]);
    dir.write("k.elf", &elf).to_string_lossy().into_owned()
}

fn ember_with_config(dir: &TempDir, toml: &str) -> ember_tests::Run {
    let cfg = dir.write("vm.toml", toml.as_bytes());
    run_ember(&["--config", &cfg.to_string_lossy()], b"", TIMEOUT)
}

#[test]
fn bad_missing_kernel_file() {
    let run = run_ember(&["--kernel", "/nonexistent/vmlinux"], b"", TIMEOUT);
    assert_clean_error(&run, &["boot.kernel", "/nonexistent/vmlinux"]);
}

#[test]
fn bad_no_kernel_at_all() {
    let run = run_ember(&["--vcpus", "1"], b"", TIMEOUT);
    assert_clean_error(&run, &["no kernel"]);
}

#[test]
fn bad_random_bytes_as_kernel() {
    if !kvm_available("bad_random_bytes_as_kernel") {
        return;
    }
    let dir = TempDir::new("random");
    // A fixed pseudo-random sequence (xorshift), 64 KiB.
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let bytes: Vec<u8> = (0..65536)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x.to_le_bytes()[4]
        })
        .collect();
    let k = dir.write("random.bin", &bytes);
    let run = run_ember(&["--kernel", &k.to_string_lossy()], b"", TIMEOUT);
    assert_clean_error(
        &run,
        &["random.bin", "neither an ELF vmlinux nor a bzImage"],
    );
}

#[test]
fn bad_truncated_bzimage() {
    if !kvm_available("bad_truncated_bzimage") {
        return;
    }
    let dir = TempDir::new("trunc");
    let full = std::fs::read(guest_kernel_dir().join("bzImage")).expect("read bzImage");
    let k = dir.write("bzImage.half", &full[..full.len() / 2]);
    let run = run_ember(&["--kernel", &k.to_string_lossy()], b"", TIMEOUT);
    assert_clean_error(&run, &["bzImage.half", "truncated"]);
}

#[test]
fn bad_zero_vcpus() {
    let dir = TempDir::new("vcpus0");
    let k = good_kernel(&dir);
    let run = ember_with_config(
        &dir,
        &format!("[machine]\nvcpus = 0\n[boot]\nkernel = \"{k}\"\n"),
    );
    assert_clean_error(&run, &["machine.vcpus = 0"]);
}

#[test]
fn bad_more_vcpus_than_allowed() {
    let dir = TempDir::new("vcpusmax");
    let k = good_kernel(&dir);
    let run = run_ember(&["--kernel", &k, "--vcpus", "4096"], b"", TIMEOUT);
    assert_clean_error(&run, &["machine.vcpus = 4096"]);
}

#[test]
fn bad_zero_memory() {
    let dir = TempDir::new("mem0");
    let k = good_kernel(&dir);
    let run = ember_with_config(
        &dir,
        &format!("[machine]\nmemory_mib = 0\n[boot]\nkernel = \"{k}\"\n"),
    );
    assert_clean_error(&run, &["memory_mib"]);
}

#[test]
fn bad_memory_the_host_cannot_map() {
    if !kvm_available("bad_memory_the_host_cannot_map") {
        return;
    }
    let dir = TempDir::new("memhuge");
    let k = good_kernel(&dir);
    // 150 TiB: more than a process's 128 TiB of address space.
    let run = run_ember(&["--kernel", &k, "--memory", "157286400"], b"", TIMEOUT);
    assert_clean_error(&run, &["157286400 MiB"]);
}

#[test]
fn bad_unknown_config_key() {
    let dir = TempDir::new("unknown");
    let k = good_kernel(&dir);
    let run = ember_with_config(
        &dir,
        &format!("[machine]\nvcpus = 1\nhugepages = true\n[boot]\nkernel = \"{k}\"\n"),
    );
    assert_clean_error(&run, &["vm.toml", "hugepages", "line 3"]);
}

#[test]
fn bad_malformed_toml() {
    let dir = TempDir::new("malformed");
    let run = ember_with_config(&dir, "[machine\nvcpus = 2\n");
    assert_clean_error(&run, &["vm.toml", "line 1"]);
}

#[test]
fn bad_missing_config_file() {
    let run = run_ember(&["--config", "/nonexistent/vm.toml"], b"", TIMEOUT);
    assert_clean_error(&run, &["/nonexistent/vm.toml"]);
}

#[test]
fn bad_missing_initrd() {
    let dir = TempDir::new("noinitrd");
    let k = good_kernel(&dir);
    let run = run_ember(
        &["--kernel", &k, "--initrd", "/nonexistent/initrd.cpio"],
        b"",
        TIMEOUT,
    );
    assert_clean_error(&run, &["boot.initrd", "/nonexistent/initrd.cpio"]);
}

#[test]
fn bad_initrd_that_does_not_fit() {
    if !kvm_available("bad_initrd_that_does_not_fit") {
        return;
    }
    let dir = TempDir::new("biginitrd");
    let k = good_kernel(&dir);
    let initrd = dir.path("big.cpio");
    // A sparse 100 MiB file for a 64 MiB guest.
    std::fs::File::create(&initrd)
        .and_then(|f| f.set_len(100 << 20))
        .expect("create sparse initrd");
    let run = run_ember(
        &[
            "--kernel",
            &k,
            "--memory",
            "64",
            "--initrd",
            &initrd.to_string_lossy(),
        ],
        b"",
        TIMEOUT,
    );
    assert_clean_error(&run, &["big.cpio", "does not fit", "64 MiB"]);
}

#[test]
fn bad_unknown_flag_is_one_line() {
    let run = run_ember(&["--frobnicate"], b"", TIMEOUT);
    run.check(run.code() == 2, "usage errors exit 2");
    run.check(run.stderr.lines().count() == 1, "one line");
    run.check(run.stderr.contains("--frobnicate"), "names the flag");
}

#[test]
fn bad_disk_missing_file() {
    let dir = TempDir::new("diskmissing");
    let k = good_kernel(&dir);
    let run = run_ember(
        &["--kernel", &k, "--disk", "path=/nonexistent/disk.img"],
        b"",
        TIMEOUT,
    );
    assert_clean_error(&run, &["disk.path", "/nonexistent/disk.img"]);
}

#[test]
fn bad_disk_flag() {
    let dir = TempDir::new("diskflag");
    let k = good_kernel(&dir);
    let run = run_ember(
        &["--kernel", &k, "--disk", "path=/x.img,cache=none"],
        b"",
        TIMEOUT,
    );
    assert_clean_error(&run, &["--disk", "cache"]);
}

#[test]
fn bad_too_many_disks() {
    let dir = TempDir::new("disks9");
    let k = good_kernel(&dir);
    let mut args = vec!["--kernel".to_string(), k];
    for i in 0..9 {
        let p = dir.write(&format!("d{i}.img"), &[0u8; 512]);
        args.push("--disk".into());
        args.push(format!("path={}", p.display()));
    }
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    let run = run_ember(&a, b"", TIMEOUT);
    assert_clean_error(&run, &["9 disks", "at most 8"]);
}

#[test]
fn bad_disk_size_not_a_multiple_of_512() {
    if !kvm_available("bad_disk_size_not_a_multiple_of_512") {
        return;
    }
    let dir = TempDir::new("diskodd");
    let k = good_kernel(&dir);
    let img = dir.write("odd.img", &[0u8; 1000]);
    let disk = format!("path={}", img.display());
    let run = run_ember(&["--kernel", &k, "--disk", &disk], b"", TIMEOUT);
    assert_clean_error(&run, &["odd.img", "512"]);
}

#[test]
fn bad_tap_that_does_not_exist() {
    if !kvm_available("bad_tap_that_does_not_exist") {
        return;
    }
    let dir = TempDir::new("notap");
    let k = good_kernel(&dir);
    let run = run_ember(&["--kernel", &k, "--net", "tap=embernotap9"], b"", TIMEOUT);
    assert_clean_error(&run, &["embernotap9"]);
}

#[test]
fn bad_net_flag_and_mac() {
    let dir = TempDir::new("netflag");
    let k = good_kernel(&dir);
    let run = run_ember(
        &["--kernel", &k, "--net", "tap=tap0,mac=01:02:03:04:05:06"],
        b"",
        TIMEOUT,
    );
    assert_clean_error(&run, &["net.mac", "01:02:03:04:05:06"]);
    let run = run_ember(&["--kernel", &k, "--net", "name=tap0"], b"", TIMEOUT);
    assert_clean_error(&run, &["--net", "name"]);
}
