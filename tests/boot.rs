//! Real-kernel boots: Ember's guest kernel (tools/guest/build-kernel) under
//! KVM, checked by what the guest test agent prints on the console.
//!
//! A boot costs 20-60 s on the project's software hypervisor, so each boot
//! checks several things at once.

use std::collections::HashMap;
use std::path::Path;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use ember_tests::{
    agent_lines, guest_kernel_dir, kvm_available, newc_cpio, run_ember, spawn_ember, Run, TempDir,
};

const BOOT_TIMEOUT: Duration = Duration::from_secs(600);
const AGENT_CMDLINE: &str = "console=ttyS0 reboot=k panic=1 quiet ember.agent=on";

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

type AgentLines = HashMap<String, HashMap<String, String>>;

/// Checks what every agent boot must show: the agent finished with no
/// failed check, it saw `vcpus` CPUs and memory within 5% of `memory_mib`,
/// and the CMOS clock agrees with the host's.
fn check_agent(run: &Run, vcpus: u32, memory_mib: u64) -> AgentLines {
    let agent = agent_lines(&run.stdout);
    run.check(agent.contains_key("done"), "the agent finished");
    run.check(
        agent["done"].get("failed").map(String::as_str) == Some("0"),
        "no agent check failed",
    );
    let cpus = &agent["cpus"];
    let v = vcpus.to_string();
    run.check(
        cpus["online"] == v && cpus["present"] == v,
        &format!("the guest sees {vcpus} vCPUs"),
    );
    let present: f64 = agent["mem"]["present_kib"].parse().unwrap_or(0.0);
    let want = (memory_mib * 1024) as f64;
    run.check(
        (present - want).abs() / want <= 0.05,
        &format!("guest memory {present} KiB within 5% of {want} KiB"),
    );
    let cmos: i64 = agent["clock"]["cmos_epoch"].parse().unwrap_or(0);
    run.check(
        (cmos - now()).abs() < 600,
        &format!("CMOS time {cmos} close to the host's {}", now()),
    );
    agent
}

fn args(kernel: &Path, vcpus: u32, memory_mib: u64, cmdline: &str) -> Vec<String> {
    vec![
        "--kernel".into(),
        kernel.to_string_lossy().into_owned(),
        "--vcpus".into(),
        vcpus.to_string(),
        "--memory".into(),
        memory_mib.to_string(),
        "--cmdline".into(),
        cmdline.into(),
    ]
}

fn run_args(a: &[String]) -> Run {
    let a: Vec<&str> = a.iter().map(String::as_str).collect();
    run_ember(&a, b"", BOOT_TIMEOUT)
}

#[test]
fn boot_vmlinux_1_vcpu_128_mib_with_initrd_reaches_the_agent() {
    if !kvm_available("boot_vmlinux_1_vcpu_128_mib_with_initrd_reaches_the_agent") {
        return;
    }
    let dir = TempDir::new("initrd");
    let token = format!("ember-initrd-{}", std::process::id());
    let initrd = dir.write("initrd.cpio", &newc_cpio(&[("marker", token.as_bytes())]));
    let mut a = args(
        &guest_kernel_dir().join("vmlinux"),
        1,
        128,
        &format!("{AGENT_CMDLINE} ember.read_file=/marker"),
    );
    a.extend(["--initrd".into(), initrd.to_string_lossy().into_owned()]);
    a.extend(["--log-level".into(), "info".into()]);
    let run = run_args(&a);
    run.check(run.code() == 0, "the agent restarts the machine: exit 0");
    // The vmlinux has the PVH note: entered there by default, the initrd
    // handed over as the start info's module.
    run.check(
        run.stderr.contains("PVH entry"),
        &format!("booted through the PVH entry:\n{}", run.stderr),
    );
    let agent = check_agent(&run, 1, 128);
    run.check(
        agent["hello"]
            .get("kernel")
            .is_some_and(|k| k.starts_with("6.1")),
        "the agent names the kernel",
    );
    run.check(
        agent["file"].get("content") == Some(&token),
        "the agent read the file the initrd carried",
    );
    eprintln!(
        "boot 1 vCPU / 128 MiB: {:.1} s, peak RSS {} KiB",
        run.elapsed.as_secs_f64(),
        run.max_rss_kib
    );
}

/// Two vCPUs, 1 GiB; the agent halts the machine instead of restarting it,
/// so ember keeps running until SIGTERM, which must end it within a second
/// with status 143 (the vCPUs are kicked out of a halted state).
#[test]
fn boot_vmlinux_2_vcpus_1_gib_then_sigterm_ends_ember_within_a_second() {
    if !kvm_available("boot_vmlinux_2_vcpus_1_gib_then_sigterm_ends_ember_within_a_second") {
        return;
    }
    let mut a = args(
        &guest_kernel_dir().join("vmlinux"),
        2,
        1024,
        &format!("{AGENT_CMDLINE} ember.after=halt"),
    );
    // The same vmlinux through its 64-bit entry (the others take PVH).
    a.extend(["--boot-protocol", "linux64", "--log-level", "info"].map(String::from));
    let a: Vec<&str> = a.iter().map(String::as_str).collect();
    let mut ember = spawn_ember(&a, b"");
    let done = ember.wait_for_output("EMBER-AGENT done", BOOT_TIMEOUT);
    // Let the guest reach its halt loop.
    std::thread::sleep(Duration::from_secs(2));
    let sent = Instant::now();
    ember.signal(libc::SIGTERM);
    let run = ember.finish(BOOT_TIMEOUT);
    let took = sent.elapsed();
    run.check(done, "the agent finished");
    run.check(
        run.stderr.contains("64-bit entry"),
        "booted through the 64-bit entry when asked",
    );
    check_agent(&run, 2, 1024);
    run.check(run.code() == 143, "SIGTERM exits 143");
    run.check(
        took < Duration::from_secs(1),
        &format!("ember took {took:?} to stop after SIGTERM"),
    );
}

#[test]
fn boot_vmlinux_4_vcpus_5_gib_across_the_mmio_hole() {
    if !kvm_available("boot_vmlinux_4_vcpus_5_gib_across_the_mmio_hole") {
        return;
    }
    // acpi=off: the guest finds its vCPUs and IOAPIC in the MP table and
    // ignores the ACPI tables (tests/platform.rs boots with them).
    let run = run_args(&args(
        &guest_kernel_dir().join("vmlinux"),
        4,
        5120,
        &format!("{AGENT_CMDLINE} acpi=off"),
    ));
    run.check(run.code() == 0, "the agent restarts the machine: exit 0");
    let agent = check_agent(&run, 4, 5120);
    run.check(
        agent
            .get("platform")
            .and_then(|p| p.get("acpi"))
            .map(String::as_str)
            == Some("off"),
        "the guest runs without ACPI",
    );
    // Guest memory is mapped MAP_NORESERVE: only touched pages count.
    run.check(
        run.max_rss_kib < 1024 * 1024,
        &format!(
            "ember's peak RSS {} KiB is far below 5 GiB",
            run.max_rss_kib
        ),
    );
    eprintln!(
        "boot 4 vCPUs / 5 GiB: {:.1} s, peak RSS {} KiB",
        run.elapsed.as_secs_f64(),
        run.max_rss_kib
    );
}

/// The bzImage path: the decompressor's first console line shows the loader
/// entered the 64-bit entry point correctly; with LZ4 the decompressor is
/// quick enough here that the kernel then boots to the agent.
#[test]
fn boot_bzimage_decompresses_and_reaches_the_agent() {
    if !kvm_available("boot_bzimage_decompresses_and_reaches_the_agent") {
        return;
    }
    let run = run_args(&args(
        &guest_kernel_dir().join("bzImage"),
        1,
        256,
        &format!("{AGENT_CMDLINE} earlyprintk=serial"),
    ));
    run.check(
        run.stdout.contains("Decompressing Linux"),
        "the decompressor printed its first line",
    );
    run.check(run.code() == 0, "the agent restarts the machine: exit 0");
    check_agent(&run, 1, 256);
}
