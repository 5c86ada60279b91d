//! virtio-mmio with a real guest booted with `pci=off acpi=off`: the
//! devices are on the kernel command line (`virtio_mmio.device=4K@ADDR:IRQ`,
//! ISA interrupt lines routed by the MP table) and the kernel mounts an
//! ext4 root disk read-write.
//!
//! The ACPI case (devices in the DSDT as LNRO0005: disks written and read,
//! a NIC pinged, vsock and rng) runs in tests/vsock.rs, on the guest of
//! Firecracker's getting-started sequence: one boot checks both.

use std::time::Duration;

use ember_tests::{guest_kernel_dir, kvm_available, run_ember, TempDir};

const BOOT_TIMEOUT: Duration = Duration::from_secs(900);

#[test]
fn mmio_acpi_off_guest_mounts_its_ext4_root_from_a_command_line_device() {
    let name = "mmio_acpi_off_guest_mounts_its_ext4_root_from_a_command_line_device";
    if !kvm_available(name) {
        return;
    }
    let dir = TempDir::new("mmio");
    let kernel = guest_kernel_dir().join("vmlinux");
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
