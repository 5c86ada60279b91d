//! Real-kernel boots: Ember's guest kernel (tools/guest/build-kernel) under
//! KVM, checked by what the guest test agent prints on the console.
//!
//! A boot costs 20-60 s on the project's software hypervisor, so each boot
//! checks several things at once.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use ember_tests::{agent_lines, guest_kernel_dir, kvm_available, run_ember, spawn_ember, Run};

const BOOT_TIMEOUT: Duration = Duration::from_secs(600);
const AGENT_CMDLINE: &str = "console=ttyS0 reboot=k panic=1 quiet ember.agent=on";

fn now() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// Boots the ELF vmlinux with the agent and checks what every boot must show.
fn boot_agent(
    vcpus: u32,
    memory_mib: u64,
) -> (
    Run,
    std::collections::HashMap<String, std::collections::HashMap<String, String>>,
) {
    let kernel = guest_kernel_dir().join("vmlinux");
    let (v, m) = (vcpus.to_string(), memory_mib.to_string());
    let run = run_ember(
        &[
            "--kernel",
            &kernel.to_string_lossy(),
            "--vcpus",
            &v,
            "--memory",
            &m,
            "--cmdline",
            AGENT_CMDLINE,
        ],
        b"",
        BOOT_TIMEOUT,
    );
    let agent = agent_lines(&run.stdout);
    run.check(run.code() == 0, "the agent restarts the machine: exit 0");
    run.check(agent.contains_key("done"), "the agent finished");
    run.check(
        agent["done"].get("failed").map(String::as_str) == Some("0"),
        "no agent check failed",
    );
    let cpus = &agent["cpus"];
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
    // The CMOS clock follows the host's.
    let cmos: i64 = agent["clock"]["cmos_epoch"].parse().unwrap_or(0);
    run.check(
        (cmos - now()).abs() < 600,
        &format!("CMOS time {cmos} close to the host's {}", now()),
    );
    (run, agent)
}

#[test]
fn boot_vmlinux_1_vcpu_128_mib_reaches_the_agent() {
    if !kvm_available("boot_vmlinux_1_vcpu_128_mib_reaches_the_agent") {
        return;
    }
    let (run, agent) = boot_agent(1, 128);
    run.check(
        agent["hello"]
            .get("kernel")
            .is_some_and(|k| k.starts_with("6.1")),
        "the agent names the kernel",
    );
    eprintln!(
        "boot 1 vCPU / 128 MiB: {:.1} s, peak RSS {} KiB",
        run.elapsed.as_secs_f64(),
        run.max_rss_kib
    );
}

#[test]
fn boot_vmlinux_2_vcpus_1_gib_reaches_the_agent() {
    if !kvm_available("boot_vmlinux_2_vcpus_1_gib_reaches_the_agent") {
        return;
    }
    let (run, _) = boot_agent(2, 1024);
    eprintln!("boot 2 vCPUs / 1 GiB: {:.1} s", run.elapsed.as_secs_f64());
}

#[test]
fn boot_vmlinux_4_vcpus_5_gib_across_the_mmio_hole() {
    if !kvm_available("boot_vmlinux_4_vcpus_5_gib_across_the_mmio_hole") {
        return;
    }
    let (run, _) = boot_agent(4, 5120);
    // Guest memory is mapped MAP_NORESERVE and only touched pages count.
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

/// The bzImage's decompressor runs fully emulated here (minutes), so the
/// test waits for its first console line, which proves the loader entered
/// the kernel's 64-bit entry correctly; then SIGTERM must end ember within
/// a second with 143.
#[test]
fn boot_bzimage_enters_the_decompressor_and_sigterm_ends_it() {
    if !kvm_available("boot_bzimage_enters_the_decompressor_and_sigterm_ends_it") {
        return;
    }
    let kernel = guest_kernel_dir().join("bzImage");
    let mut ember = spawn_ember(
        &[
            "--kernel",
            &kernel.to_string_lossy(),
            "--memory",
            "256",
            "--cmdline",
            "console=ttyS0 earlyprintk=serial reboot=k panic=1",
        ],
        b"",
    );
    let seen = ember.wait_for_output("Decompressing Linux", BOOT_TIMEOUT);
    let sent = std::time::Instant::now();
    ember.signal(libc::SIGTERM);
    let run = ember.finish(Duration::from_secs(900));
    let took = sent.elapsed();
    run.check(seen, "the decompressor printed its first line");
    run.check(run.code() == 143, "SIGTERM exits 143");
    run.check(
        took < Duration::from_secs(1),
        &format!("ember took {took:?} to stop after SIGTERM"),
    );
}
