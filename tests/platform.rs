//! The guest's platform: ACPI tables, the PCI host bridge through
//! MMCONFIG, NUMA nodes bound to host nodes, vCPU pinning, huge pages and
//! ACPI power-off. One real boot checks them together, from the guest's
//! console and from the host's /proc.
//!
//! The host has one NUMA node: both guest nodes are bound to host node 0,
//! one strictly and one preferred, and the test reads the policies back from
//! /proc/PID/numa_maps.

use std::time::Duration;

use ember_tests::{agent_all, guest_kernel_dir, kvm_available, spawn_ember};

const TIMEOUT: Duration = Duration::from_secs(600);

/// Raises the host's free 2 MiB huge pages by `pages` and puts the count
/// back when dropped.
struct HugePages {
    before: u64,
}

const NR_HUGEPAGES: &str = "/proc/sys/vm/nr_hugepages";

impl HugePages {
    fn reserve(pages: u64) -> Result<Self, String> {
        let read = || -> Result<u64, String> {
            std::fs::read_to_string(NR_HUGEPAGES)
                .map_err(|e| e.to_string())?
                .trim()
                .parse()
                .map_err(|e| format!("{e}"))
        };
        let before = read()?;
        std::fs::write(NR_HUGEPAGES, (before + pages).to_string()).map_err(|e| e.to_string())?;
        let got = read()?;
        if got < before + pages {
            let _ = std::fs::write(NR_HUGEPAGES, before.to_string());
            return Err(format!(
                "asked for {} huge pages, got {got}",
                before + pages
            ));
        }
        Ok(HugePages { before })
    }
}

impl Drop for HugePages {
    fn drop(&mut self) {
        let _ = std::fs::write(NR_HUGEPAGES, self.before.to_string());
    }
}

fn thread_cpus(pid: i32, name: &str) -> Option<String> {
    for task in std::fs::read_dir(format!("/proc/{pid}/task")).ok()? {
        let dir = task.ok()?.path();
        let comm = std::fs::read_to_string(dir.join("comm")).unwrap_or_default();
        if comm.trim() == name {
            let status = std::fs::read_to_string(dir.join("status")).ok()?;
            return status
                .lines()
                .find(|l| l.starts_with("Cpus_allowed_list:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .map(str::to_string);
        }
    }
    None
}

#[test]
fn acpi_numa_guest_finds_its_tables_bridge_and_nodes_on_bound_huge_pages_then_powers_off() {
    if !kvm_available(
        "acpi_numa_guest_finds_its_tables_bridge_and_nodes_on_bound_huge_pages_then_powers_off",
    ) {
        return;
    }
    let pages = match HugePages::reserve(128) {
        Ok(p) => p,
        Err(e) => panic!("cannot reserve 128 huge pages for the test: {e}"),
    };
    let kernel = guest_kernel_dir().join("vmlinux");
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let pin = if cpus > 1 { "0=1,1=0" } else { "0=0,1=0" };
    let mut vm = spawn_ember(
        &[
            "--kernel",
            kernel.to_str().unwrap(),
            "--vcpus",
            "2",
            "--memory",
            "size=256,hugepages=on,hugepage_size=2M,prefault=on",
            "--numa",
            "node=0,cpus=0,memory=128,host_node=0",
            "--numa",
            "node=1,cpus=1,memory=128,host_node=0,policy=preferred,distances=0:25",
            "--vcpu-affinity",
            pin,
            "--log-level",
            "info",
            // Not quiet: the kernel's own ACPI, PCI and NUMA lines are checked.
            "--cmdline",
            "console=ttyS0 reboot=k panic=1 ember.agent=on ember.after=poweroff ember.sleep=2",
        ],
        b"",
    );
    // Host side, while the guest runs: the vCPU threads' pinning, each
    // node's policy and the huge pages behind guest memory.
    let up = vm.wait_for_output("EMBER-AGENT hello", TIMEOUT);
    let pid = vm.pid();
    let affinity: Vec<Option<String>> = (0..2)
        .map(|i| thread_cpus(pid, &format!("ember-vcpu{i}")))
        .collect();
    let numa_maps = std::fs::read_to_string(format!("/proc/{pid}/numa_maps")).unwrap_or_default();
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).unwrap_or_default();
    let run = vm.finish(TIMEOUT);
    drop(pages);
    run.check(up, "the agent started");
    run.check(run.code() == 0, "the guest powered off: exit status 0");
    run.check(
        run.stderr.contains("the guest powered off (ACPI S5)"),
        "power-off came through the ACPI sleep register",
    );
    let want: Vec<String> = pin.split(',').map(|p| p[2..].to_string()).collect();
    run.check(
        affinity == vec![Some(want[0].clone()), Some(want[1].clone())],
        &format!("vCPU threads pinned as {pin}: {affinity:?}"),
    );
    // The guest memory's two halves: bound strictly and preferred, both on
    // host node 0, on huge pages, every page there (prefault).
    let guest: Vec<&str> = numa_maps
        .lines()
        .filter(|l| l.contains("ember-guest-ram-huge"))
        .collect();
    let pages_on_node0 = |l: &str| {
        l.split_whitespace()
            .find_map(|w| w.strip_prefix("N0="))
            .and_then(|n| n.parse::<u64>().ok())
            .unwrap_or(0)
    };
    run.check(
        guest
            .iter()
            .any(|l| l.contains(" bind:0 ") && l.contains(" huge ") && pages_on_node0(l) == 64)
            && guest.iter().any(|l| {
                l.contains(" prefer:0 ") && l.contains(" huge ") && pages_on_node0(l) == 64
            }),
        &format!(
            "numa_maps shows node 0 bound and node 1 preferred, 64 huge pages each:\n{}",
            guest.join("\n")
        ),
    );
    run.check(
        smaps.contains("ember-guest-ram-huge") && smaps.contains("KernelPageSize:     2048 kB"),
        "smaps shows 2 MiB pages behind guest memory",
    );

    // Guest side: the tables, the bridge through MMCONFIG with no device,
    // the nodes and their distances.
    let console = &run.stdout;
    for needle in [
        "ACPI: RSDP 0x00000000000E0000",
        "ACPI: XSDT ",
        "ACPI: FACP ",
        "ACPI: DSDT ",
        "ACPI: APIC ",
        "ACPI: MCFG ",
        "ACPI: SRAT ",
        "ACPI: SLIT ",
        "ACPI: Using ACPI (MADT) for SMP configuration information",
        "PCI: MMCONFIG for domain 0000 [bus 00-00] at [mem 0xe0000000-0xe00fffff]",
        "PCI: MMCONFIG at [mem 0xe0000000-0xe00fffff] reserved",
        "ACPI: PCI Root Bridge [PCI0] (domain 0000 [bus 00])",
        "pci 0000:00:00.0: [8086:0d57] type 00 class 0x060000",
        "SRAT: PXM 0 -> APIC 0x00 -> Node 0",
        "SRAT: PXM 1 -> APIC 0x01 -> Node 1",
        "ACPI: SRAT: Node 0 PXM 0 [mem 0x00000000-0x07ffffff]",
        "ACPI: SRAT: Node 1 PXM 1 [mem 0x08000000-0x0fffffff]",
        "smp: Brought up 2 nodes, 2 CPUs",
        "ACPI: PM: (supports S0 S5)",
        "ACPI: PM: Preparing to enter system sleep state S5",
    ] {
        run.check(
            console.contains(needle),
            &format!("the guest logged {needle:?}"),
        );
    }
    run.check(
        !console.contains("No config space access function found"),
        "the guest found PCI config space",
    );
    let agent = agent_all(console);
    run.check(
        agent
            .get("done")
            .and_then(|d| d.last())
            .and_then(|d| d.get("failed"))
            .map(String::as_str)
            == Some("0"),
        "no agent check failed",
    );
    let platform = agent
        .get("platform")
        .and_then(|p| p.last())
        .cloned()
        .unwrap_or_default();
    run.check(
        platform.get("acpi").map(String::as_str) == Some("on")
            && platform.get("nodes").map(String::as_str) == Some("2"),
        "the guest runs on ACPI with 2 nodes",
    );
    let nodes = agent.get("numa").cloned().unwrap_or_default();
    let field = |i: usize, k: &str| {
        nodes
            .get(i)
            .and_then(|n| n.get(k))
            .cloned()
            .unwrap_or_default()
    };
    run.check(nodes.len() == 2, "one agent line per node");
    run.check(
        field(0, "cpus") == "0" && field(1, "cpus") == "1",
        "node 0 has vCPU 0, node 1 has vCPU 1",
    );
    for i in 0..2 {
        let mib: u64 = field(i, "mem_mib").parse().unwrap_or(0);
        run.check(
            (120..=128).contains(&mib),
            &format!("node {i} has about 128 MiB: {mib}"),
        );
    }
    run.check(
        field(0, "distances") == "10,25" && field(1, "distances") == "25,10",
        "the SLIT distances are the configured ones",
    );
}
