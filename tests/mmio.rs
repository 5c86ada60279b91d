//! virtio-mmio with real guests booted with `pci=off`, as Firecracker's and
//! Kata's are (ember picks the MMIO transport from it):
//!
//! 1. With ACPI: the devices are in the DSDT (LNRO0005). The guest's agent
//!    writes a disk and reads another one whole, the host pings it through
//!    its NIC on a tap, and the host checks the written bytes.
//! 2. Without ACPI (`acpi=off`): the devices are on the kernel command
//!    line (`virtio_mmio.device=4K@ADDR:IRQ`, ISA interrupt lines routed by
//!    the MP table). The kernel mounts an ext4 root disk read-write.

use std::time::Duration;

use ember_tests::{
    agent_ok, fnv1a, guest_kernel_dir, kvm_available, netns_available, pattern_block,
    pattern_offsets, random_bytes, run_ember, spawn_ember_in_netns, NetNs, TempDir,
};

const BOOT_TIMEOUT: Duration = Duration::from_secs(900);
const MIB: u64 = 1024 * 1024;
const DISK_SIZE: u64 = 64 * MIB;
const BLOCKS: u64 = 32;
const SEED: u64 = 5151;

#[test]
fn mmio_pci_off_guest_finds_its_disks_and_nic_in_the_dsdt_and_on_the_command_line() {
    let name = "mmio_pci_off_guest_finds_its_disks_and_nic_in_the_dsdt_and_on_the_command_line";
    if !kvm_available(name) || !netns_available(name) {
        return;
    }
    let dir = TempDir::new("mmio");
    let ns = NetNs::new("mmio", &[("tap0", "10.202.0.1/24")]).expect("netns");
    let written = dir.path("written.img");
    std::fs::File::create(&written)
        .unwrap()
        .set_len(DISK_SIZE)
        .unwrap();
    let read_bytes = random_bytes(7, usize::try_from(MIB).unwrap());
    let read = dir.write("read.img", &read_bytes);
    let kernel = guest_kernel_dir().join("vmlinux");
    let cmdline = format!(
        "console=ttyS0 reboot=k panic=1 quiet pci=off ember.agent=on \
         ip=10.202.0.2::10.202.0.1:255.255.255.0::eth0:off \
         ember.blk_write=vda:{SEED}:{BLOCKS} ember.blk_read=vdb ember.sleep=20"
    );
    let written_flag = format!("path={}", written.display());
    let read_flag = format!("path={},read_only=on", read.display());
    let args = [
        "--kernel",
        kernel.to_str().unwrap(),
        "--memory",
        "256",
        "--cmdline",
        &cmdline,
        "--disk",
        &written_flag,
        "--disk",
        &read_flag,
        "--net",
        "tap=tap0",
        "--log-level",
        "info",
    ];
    let mut vm = spawn_ember_in_netns(&ns.name, &args, b"");
    let sleeping = vm.wait_for_output("EMBER-AGENT sleeping", BOOT_TIMEOUT);
    let ping = ns
        .exec(&["ping", "-c", "3", "-i", "0.5", "-W", "10", "10.202.0.2"])
        .unwrap_or_else(|e| e);
    let run = vm.finish(BOOT_TIMEOUT);
    run.check(sleeping, "the agent reached its sleep");
    let a = agent_ok(&run);
    // Ember put the devices on virtio-mmio, in order.
    for line in [
        "virtio-blk0: virtio-mmio at 0xd0000000, IRQ 5",
        "virtio-blk1: virtio-mmio at 0xd0001000, IRQ 6",
        "virtio-net0: virtio-mmio at 0xd0002000, IRQ 7",
    ] {
        run.check(run.stderr.contains(line), &format!("ember logged {line:?}"));
    }
    run.check(
        ping.contains(" 3 received"),
        &format!("the host pings the guest on its virtio-mmio NIC:\n{ping}"),
    );
    let write = &a["blk_write"][0];
    run.check(
        write["errors"] == "0" && write["dev"] == "vda",
        &format!("the guest wrote vda: {write:?}"),
    );
    let image = std::fs::read(&written).unwrap();
    for off in pattern_offsets(SEED, BLOCKS, DISK_SIZE) {
        let o = usize::try_from(off).unwrap();
        run.check(
            image[o..o + 4096] == pattern_block(SEED, off)[..],
            &format!("block at {off:#x} holds the guest's pattern"),
        );
    }
    let r = &a["blk_read"][0];
    run.check(
        r["dev"] == "vdb"
            && r["bytes"] == MIB.to_string()
            && r["fnv1a"] == format!("{:016x}", fnv1a(&read_bytes)),
        &format!("the guest read vdb whole and right: {r:?}"),
    );

    // Without ACPI: the command line announces the devices; an ext4 root.
    let root = dir.path("root.ext4");
    std::fs::copy(ember_tests::rootfs_image(), &root).unwrap();
    let root_flag = format!("path={},root=on", root.display());
    // User space cannot run here: init faults, the kernel panics and
    // reboots (panic=1); on a hardware host busybox reboots. Exit 0 both ways.
    let cmdline = "console=ttyS0 reboot=k panic=1 pci=off acpi=off init=/bin/busybox -- reboot -f";
    let run = run_ember(
        &[
            "--kernel",
            kernel.to_str().unwrap(),
            "--memory",
            "128",
            "--cmdline",
            cmdline,
            "--disk",
            &root_flag,
            "--log-level",
            "info",
        ],
        b"",
        BOOT_TIMEOUT,
    );
    run.check(run.code() == 0, "the guest ends by itself: exit 0");
    run.check(
        run.stdout.contains("virtio_mmio.device=4K@0xd0000000:5"),
        "the kernel's command line announces the disk",
    );
    let mounted = run
        .stdout
        .lines()
        .find(|l| l.contains("VFS: Mounted root (ext4 filesystem)"));
    run.check(
        run.stdout.contains("EXT4-fs (vda): mounted filesystem")
            && mounted.is_some_and(|l| !l.contains("readonly")),
        &format!("the kernel mounted the ext4 root read-write over virtio-mmio: {mounted:?}"),
    );
}
