//! Bad user input: each case must end ember with one clear error line
//! naming the problem, a non-zero exit and no panic.

use std::time::Duration;

use ember_tests::{
    assert_clean_error, guest_kernel_dir, kvm_available, netns_available, run_ember,
    spawn_ember_in_netns, tiny_elf, HostLock, NetNs, TempDir,
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
fn bad_boot_protocol_and_transport() {
    let dir = TempDir::new("protocol");
    let k = good_kernel(&dir);
    let run = run_ember(&["--kernel", &k, "--boot-protocol", "bios"], b"", TIMEOUT);
    assert_clean_error(&run, &["boot.protocol", "`bios`", "auto, linux64 or pvh"]);
    let run = run_ember(&["--kernel", &k, "--transport", "isa"], b"", TIMEOUT);
    assert_clean_error(&run, &["machine.transport", "`isa`", "pci or mmio"]);
    let run = run_ember(
        &[
            "--kernel",
            &k,
            "--transport",
            "pci",
            "--cmdline",
            "console=ttyS0 pci=off",
        ],
        b"",
        TIMEOUT,
    );
    assert_clean_error(
        &run,
        &["machine.transport", "pci=off hides every PCI device"],
    );
    if !kvm_available("bad_boot_protocol_and_transport") {
        return;
    }
    // PVH asked of a kernel without the note (this ELF has none).
    let run = run_ember(&["--kernel", &k, "--boot-protocol", "pvh"], b"", TIMEOUT);
    assert_clean_error(&run, &["k.elf", "has no PVH entry"]);
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
        &format!("[machine]\nvcpus = 1\nturbo = true\n[boot]\nkernel = \"{k}\"\n"),
    );
    assert_clean_error(&run, &["vm.toml", "turbo", "line 3"]);
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
        &["--kernel", &k, "--disk", "path=/x.img,cache=unsafe"],
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
    // Host-side VLAN ids: 1 to 4094, checked before any tap is opened.
    for (vlan, words) in [
        ("0", &["net.vlan = 0", "1 to 4094"][..]),
        ("4095", &["net.vlan = 4095", "1 to 4094"][..]),
        ("70000", &["vlan must be a VLAN id", "70000"][..]),
        ("x", &["vlan must be a VLAN id", "`x`"][..]),
    ] {
        let flag = format!("tap=tap0,vlan={vlan}");
        let run = run_ember(&["--kernel", &k, "--net", &flag], b"", TIMEOUT);
        assert_clean_error(&run, words);
    }
}

/// Queue pairs: 1 to 16, checked before any tap is opened; more than one
/// on a single-queue tap, which the kernel refuses, is one error naming the
/// fix, and nothing is left attached to the tap. vhost=on cannot go with
/// what ember does to the frames itself; where the host has no vhost-net
/// (this project's hosts), the NIC falls back to ember's own virtio-net
/// with one warning.
#[test]
fn bad_net_queues_and_vhost() {
    let dir = TempDir::new("netqueues");
    let k = good_kernel(&dir);
    for (queues, words) in [
        ("0", &["net.queues = 0", "1 to 16"][..]),
        ("17", &["net.queues = 17", "1 to 16"][..]),
        ("x", &["queues must be a number of queue pairs", "`x`"][..]),
    ] {
        let flag = format!("tap=tap0,queues={queues}");
        let run = run_ember(&["--kernel", &k, "--net", &flag], b"", TIMEOUT);
        assert_clean_error(&run, words);
    }
    for (flag, words) in [
        (
            "tap=tap0,vhost=on,vlan=5",
            &["net.vhost (tap tap0) cannot go with a host-side VLAN"][..],
        ),
        (
            "tap=tap0,vhost=on,rx_bw=1M/1s",
            &["net.vhost (tap tap0) cannot go with rate limits"][..],
        ),
        ("user,vhost=on", &["vhost= is for a NIC on a tap"][..]),
        (
            "tap=tap0,vhost=yes-please",
            &["vhost must be on or off"][..],
        ),
    ] {
        let run = run_ember(&["--kernel", &k, "--net", flag], b"", TIMEOUT);
        assert_clean_error(&run, words);
    }
    if !kvm_available("bad_net_queues_and_vhost") || !netns_available("bad_net_queues_and_vhost") {
        return;
    }
    let ns = NetNs::new("sq", &[("tap0", "10.203.0.1/24")]).expect("netns");
    let run = spawn_ember_in_netns(
        &ns.name,
        &["--kernel", &k, "--net", "tap=tap0,queues=2"],
        b"",
    )
    .finish(TIMEOUT);
    assert_clean_error(
        &run,
        &[
            "tap tap0 has one queue and 2 were asked for",
            "ip tuntap add tap0 mode tap multi_queue",
        ],
    );
    // The tap is free again: one queue of it boots.
    let run =
        spawn_ember_in_netns(&ns.name, &["--kernel", &k, "--net", "tap=tap0"], b"").finish(TIMEOUT);
    run.check(run.code() == 0, "a one-queue NIC on the same tap runs");
}

#[test]
fn bad_user_mode_nics() {
    let dir = TempDir::new("usernet");
    let k = good_kernel(&dir);
    let net = |flag: &str| run_ember(&["--kernel", &k, "--net", flag], b"", TIMEOUT);
    // Checked before anything starts.
    for (flag, words) in [
        (
            "user,hostfwd=tcp:127.0.0.1:99999-:22",
            &["hostfwd", "host port `99999` is not 1 to 65535"][..],
        ),
        (
            "user,hostfwd=tcp::2222-10.0.2.15:22",
            &["hostfwd", "a guest address (10.0.2.15) cannot be chosen"][..],
        ),
        (
            "user,hostfwd=sctp::1-:2",
            &["hostfwd", "the form is tcp:"][..],
        ),
        ("user,hostfwd=tcp:2222:22", &["hostfwd", "no `-`"][..]),
        (
            "user,hostfwd=tcp:localhost:2222-:22",
            &["not an IPv4 address"][..],
        ),
        ("user,offloads=on", &["user-mode NIC has no offloads"][..]),
        ("user,vlan=5", &["vlan= is for a NIC on a tap"][..]),
        ("user,tap=tap0", &["either on a tap or user-mode"][..]),
        (
            "tap=tap0,hostfwd=tcp::1-:2",
            &["hostfwd= is for a user-mode NIC"][..],
        ),
        (
            "user,socket=/x.sock,hostfwd=tcp::1-:2",
            &["hostfwd and socket do not go together"][..],
        ),
    ] {
        assert_clean_error(&net(flag), words);
    }
    if !kvm_available("bad_user_mode_nics") {
        return;
    }
    // No passt on the PATH.
    let flag = "user".to_string();
    let run = ember_tests::spawn_ember_env(
        &["--kernel", &k, "--net", &flag],
        &[("PATH", "/nonexistent")],
    )
    .finish(TIMEOUT);
    assert_clean_error(
        &run,
        &["NIC 0 (user-mode)", "needs passt", "apt-get install passt"],
    );
    // Nobody listening on the socket given.
    let run = net("user,socket=/nonexistent/passt.sock");
    assert_clean_error(
        &run,
        &["cannot connect to passt at /nonexistent/passt.sock"],
    );
    if std::process::Command::new("passt")
        .arg("--version")
        .output()
        .is_err()
    {
        panic!("passt is not installed (apt-get install passt; tools/test installs it)");
    }
    // A forward to a host port that is taken: passt's own words.
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let run = net(&format!("user,hostfwd=tcp:127.0.0.1:{port}-:22"));
    assert_clean_error(
        &run,
        &["NIC 0 (user-mode)", "passt exited", "Failed to bind"],
    );
    drop(taken);
    // passt started for NIC 0, then NIC 1 fails: ember exits with the
    // tap's error and passt goes with it (the port is free again).
    let run = run_ember(
        &[
            "--kernel",
            &k,
            "--net",
            &format!("user,hostfwd=tcp:127.0.0.1:{port}-:22"),
            "--net",
            "tap=embernotap9",
        ],
        b"",
        TIMEOUT,
    );
    assert_clean_error(&run, &["embernotap9"]);
    let free = (0..100).any(|_| {
        std::thread::sleep(Duration::from_millis(50));
        std::net::TcpListener::bind(("127.0.0.1", port)).is_ok()
    });
    assert!(free, "passt let go of port {port} when ember exited");
}

#[test]
fn bad_numa_layouts_affinity_and_memory_backends() {
    let dir = TempDir::new("numa");
    let k = good_kernel(&dir);
    let run = |extra: &[&str]| {
        let mut a = vec!["--kernel", k.as_str(), "--vcpus", "2"];
        if !extra.contains(&"--memory") {
            a.extend_from_slice(&["--memory", "256"]);
        }
        a.extend_from_slice(extra);
        run_ember(&a, b"", TIMEOUT)
    };
    let n0 = "node=0,cpus=0,memory=128";
    let n1 = "node=1,cpus=1,memory=128";
    for (extra, needles) in [
        (
            vec!["--numa", "node=0,cpus=0-1,memory=128", "--numa", n1],
            vec!["numa:", "vCPU 1 is in node 0 and in node 1"],
        ),
        (
            vec!["--numa", n0, "--numa", "node=1,cpus=1,memory=100"],
            vec!["numa:", "adds up to 228 MiB, the machine has 256 MiB"],
        ),
        (vec!["--numa", n0], vec!["numa:", "vCPU 1 is in no node"]),
        (
            vec![
                "--numa",
                "node=0,cpus=0,memory=128,host_node=7",
                "--numa",
                n1,
            ],
            vec!["numa:", "host node 7 does not exist"],
        ),
        (
            vec![
                "--numa",
                "node=0,cpus=0,memory=128,distances=1:5",
                "--numa",
                n1,
            ],
            vec!["numa:", "must be 11 to 254"],
        ),
        (
            vec!["--numa", "node=0,cpus=0,mem=128"],
            vec!["--numa node=0,cpus=0,mem=128", "unknown key \"mem\""],
        ),
        (
            vec!["--vcpu-affinity", "0=4095"],
            vec!["vcpu_affinity:", "host CPU 4095 is not online"],
        ),
        (
            vec!["--vcpu-affinity", "3=0"],
            vec!["vcpu_affinity:", "vCPU 3 does not exist"],
        ),
        (
            vec!["--memory", "size=256,hugepages=on,thp=on"],
            vec!["memory:", "exclude each other"],
        ),
        (
            vec!["--memory", "size=255,hugepages=on"],
            vec!["memory:", "not a multiple of the 2 MiB huge page"],
        ),
        (
            vec!["--memory", "size=256,hugepage_size=1G"],
            vec!["memory:", "hugepage_size is given without hugepages=on"],
        ),
        (
            vec!["--memory", "size=256,shared=on,mergeable=on"],
            vec![
                "memory:",
                "KSM merges neither shared=on nor hugepages=on pages",
            ],
        ),
    ] {
        let r = run(&extra);
        assert_clean_error(&r, &needles);
    }
}

#[test]
fn bad_hugepages_the_host_does_not_have_reserve_nothing() {
    if !kvm_available("bad_hugepages_the_host_does_not_have_reserve_nothing") {
        return;
    }
    let dir = TempDir::new("huge");
    let k = good_kernel(&dir);
    let free_path = "/sys/kernel/mm/hugepages/hugepages-2048kB/free_hugepages";
    // No other test reserves or frees huge pages meanwhile.
    let _lock = HostLock::take("hugepages");
    let free = || -> u64 {
        std::fs::read_to_string(free_path)
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0)
    };
    let before = free();
    // Twice what is free, and 64 pages more.
    let mib = (before * 2 + 64) * 2;
    let memory = format!("size={mib},hugepages=on");
    let run = run_ember(&["--kernel", &k, "--memory", &memory], b"", TIMEOUT);
    assert_clean_error(
        &run,
        &[
            "hugepages=on needs",
            "free 2M huge pages",
            &format!("the host has {before}"),
        ],
    );
    assert_eq!(free(), before, "no huge page stays reserved");
}
