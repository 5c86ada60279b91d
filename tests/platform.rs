//! The guest's platform: ACPI tables, the PCI host bridge through
//! MMCONFIG, NUMA nodes bound to host nodes, vCPU pinning, huge pages and
//! ACPI power-off by the power button. One real boot checks them together, from the guest's
//! console and from the host's /proc.
//!
//! The host has one NUMA node: both guest nodes are bound to host node 0,
//! one strictly and one preferred, and the test reads the policies back from
//! /proc/PID/numa_maps.

use std::time::Duration;

use ember_tests::http::Api;
use ember_tests::{
    agent_all, guest_kernel_dir, kvm_available, proc_kib, spawn_ember, thread_cpus, HostLock,
    TempDir,
};

const TIMEOUT: Duration = Duration::from_secs(600);

/// Raises the host's free 2 MiB huge pages by `pages` and puts the count
/// back when dropped.
struct HugePages {
    before: u64,
    _lock: HostLock,
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
        let lock = HostLock::take("hugepages");
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
        Ok(HugePages {
            before,
            _lock: lock,
        })
    }
}

impl Drop for HugePages {
    fn drop(&mut self) {
        let _ = std::fs::write(NR_HUGEPAGES, self.before.to_string());
    }
}

#[test]
fn acpi_numa_guest_finds_its_tables_bridge_and_nodes_on_bound_huge_pages_then_powers_off_by_its_button(
) {
    if !kvm_available(
        "acpi_numa_guest_finds_its_tables_bridge_and_nodes_on_bound_huge_pages_then_powers_off_by_its_button",
    ) {
        return;
    }
    let pages = match HugePages::reserve(128) {
        Ok(p) => p,
        Err(e) => panic!("cannot reserve 128 huge pages for the test: {e}"),
    };
    let dir = TempDir::new("platform");
    let sock = dir.path("api.sock");
    let kernel = guest_kernel_dir().join("vmlinux");
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let pin = if cpus > 1 { "0=1,1=0" } else { "0=0,1=0" };
    let mut vm = spawn_ember(
        &[
            "--api-sock",
            sock.to_str().unwrap(),
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
            // The agent waits (up to 600 s) for the power button.
            "console=ttyS0 reboot=k panic=1 ember.agent=on ember.after=poweroff ember.sleep=600",
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
    // The power button, once the agent is done and waiting: the guest
    // shuts down by itself, long before its 600 s are up.
    let sleeping = vm.wait_for_output("EMBER-AGENT sleeping", TIMEOUT);
    let pressed = std::time::Instant::now();
    if sleeping {
        let r = Api::connect(&sock)
            .client
            .request("PUT", "/api/v1/vm.power-button", None);
        assert_eq!(r.status, 204, "{r:?}");
    }
    let run = vm.finish(TIMEOUT);
    let shutdown = pressed.elapsed();
    drop(pages);
    run.check(up && sleeping, "the agent started and waits");
    run.check(run.code() == 0, "the guest powered off: exit status 0");
    run.check(
        run.stdout.contains("ACPI: button: Power Button [PWRB]")
            && run.stdout.contains("EMBER-AGENT power_button pressed=1")
            && shutdown < Duration::from_secs(120),
        &format!("the guest found its power button and powered off {shutdown:?} after the press"),
    );
    run.check(
        run.stderr.contains("pressed the guest's ACPI power button"),
        "ember logged the press",
    );
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
    // The power button came during the agent's sleep, before its `done`
    // line: no check may have reported an error.
    run.check(
        !console
            .lines()
            .any(|l| l.contains("EMBER-AGENT") && l.contains("error=")),
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

/// KSM's tunables, turned on fast for the test and put back when dropped
/// (KSM is host-wide).
struct Ksm {
    saved: Vec<(&'static str, String)>,
}

const KSM: &str = "/sys/kernel/mm/ksm";

impl Ksm {
    /// Saves the tunables and sets them fast, with ksmd stopped (`run`
    /// 0) until [`Ksm::run`].
    fn prepare() -> Result<Self, String> {
        let mut saved = Vec::new();
        for (k, v) in [
            ("pages_to_scan", "20000"),
            ("sleep_millisecs", "10"),
            ("run", "0"),
        ] {
            let path = format!("{KSM}/{k}");
            let old = std::fs::read_to_string(&path).map_err(|e| format!("{path}: {e}"))?;
            saved.push((k, old.trim().to_string()));
            std::fs::write(&path, v).map_err(|e| format!("{path}: {e}"))?;
        }
        Ok(Ksm { saved })
    }

    fn run(&self) -> Result<(), String> {
        std::fs::write(format!("{KSM}/run"), "1").map_err(|e| e.to_string())
    }

    fn read(name: &str) -> u64 {
        std::fs::read_to_string(format!("{KSM}/{name}"))
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0)
    }
}

impl Drop for Ksm {
    fn drop(&mut self) {
        for (k, v) in self.saved.iter().rev() {
            let _ = std::fs::write(format!("{KSM}/{k}"), v);
        }
    }
}

fn pss_mib(pid: i32) -> f64 {
    proc_kib(&format!("/proc/{pid}/smaps_rollup"), "Pss").map_or(0.0, |kib| kib as f64 / 1024.0)
}

fn ksm_pages(pid: i32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/ksm_merging_pages"))
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(0)
}

#[test]
fn ksm_merges_four_mergeable_guests_and_leaves_an_unmergeable_one_alone() {
    if !kvm_available("ksm_merges_four_mergeable_guests_and_leaves_an_unmergeable_one_alone") {
        return;
    }
    if !std::path::Path::new(KSM).exists() {
        panic!("this host has no KSM ({KSM}); the test needs CONFIG_KSM");
    }
    // ksmd waits until the guests are up, so the memory before merging is
    // measured; then it runs.
    let _ksm_lock = HostLock::take("ksm");
    let ksm = Ksm::prepare().expect("cannot set KSM up");
    let kernel = guest_kernel_dir().join("vmlinux");
    let cmdline = "console=ttyS0 reboot=k panic=1 quiet ember.agent=on ember.sleep=600";
    let spawn = |memory: &str| {
        spawn_ember(
            &[
                "--kernel",
                kernel.to_str().unwrap(),
                "--memory",
                memory,
                "--cmdline",
                cmdline,
            ],
            b"",
        )
    };
    let mut vms: Vec<_> = (0..4).map(|_| spawn("size=128,mergeable=on")).collect();
    let mut control = spawn("size=128,mergeable=off");
    let up = vms
        .iter_mut()
        .chain(std::iter::once(&mut control))
        .all(|vm| vm.wait_for_output("EMBER-AGENT sleeping", TIMEOUT));
    let pids: Vec<i32> = vms.iter().map(|v| v.pid()).collect();
    let pss_before: f64 = pids.iter().map(|&p| pss_mib(p)).sum();
    let sharing_before = Ksm::read("pages_sharing");
    let merged_before: Vec<u64> = pids.iter().map(|&p| ksm_pages(p)).collect();
    ksm.run().expect("cannot start ksmd");
    let t = std::time::Instant::now();
    // Until the four have merged at least 8 MiB each, or a minute passes.
    let rose = |p: i32, before: u64| ksm_pages(p) >= before + 2048;
    while t.elapsed() < Duration::from_secs(60)
        && !pids.iter().zip(&merged_before).all(|(&p, &b)| rose(p, b))
    {
        std::thread::sleep(Duration::from_millis(500));
    }
    std::thread::sleep(Duration::from_secs(3));
    let merged: Vec<u64> = pids.iter().map(|&p| ksm_pages(p)).collect();
    let pss_after: f64 = pids.iter().map(|&p| pss_mib(p)).sum();
    let sharing_after = Ksm::read("pages_sharing");
    let control_merged = ksm_pages(control.pid());
    let control_pss = pss_mib(control.pid());
    for vm in vms.iter().chain(std::iter::once(&control)) {
        vm.signal(libc::SIGTERM);
    }
    let runs: Vec<_> = vms.into_iter().map(|v| v.finish(TIMEOUT)).collect();
    let control = control.finish(TIMEOUT);
    control.check(up, "all five guests came up");
    // Per process (/proc/PID/ksm_merging_pages), not host-wide: KSM's
    // global pages_sharing also moves with every other process on the
    // host that merges or unmerges meanwhile, and fell on a CI host while
    // the four merged thousands of pages each.
    control.check(
        merged
            .iter()
            .zip(&merged_before)
            .all(|(&m, &b)| m >= b + 2048),
        &format!(
            "each mergeable guest merged 8 MiB or more: {merged_before:?} -> {merged:?} (pages)"
        ),
    );
    control.check(
        control_merged == 0,
        "the mergeable=off guest has nothing merged",
    );
    control.check(
        pss_before - pss_after >= 16.0,
        &format!("the four guests' memory (PSS) fell: {pss_before:.0} -> {pss_after:.0} MiB"),
    );
    for r in &runs {
        r.check(r.code() == 143, "SIGTERM ended the guest");
    }
    eprintln!(
        "KSM, 4 x 128 MiB guests: PSS {pss_before:.0} -> {pss_after:.0} MiB ({:.0} MiB saved, {:.0}%), host-wide pages_sharing {sharing_before} -> {sharing_after} in {:.1} s; the unmergeable guest: PSS {control_pss:.0} MiB, 0 merged",
        pss_before - pss_after,
        100.0 * (pss_before - pss_after) / pss_before.max(1.0),
        t.elapsed().as_secs_f64()
    );
}
