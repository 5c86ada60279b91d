//! CPU models under KVM: `ember cpu` lists and shows them, a model the
//! host cannot provide is refused before anything is created, a custom
//! Firecracker template goes through the API, and a real Linux kernel
//! prints the model's identity in its boot log, one model per vendor.

use std::time::Duration;

use ember_tests::http::Api;
use ember_tests::{
    assert_clean_error, guest_kernel_dir, kvm_available, run_ember, spawn_ember, tiny_elf, TempDir,
};
use serde_json::Value;

const TIMEOUT: Duration = Duration::from_secs(60);

fn json_of(args: &[&str]) -> Value {
    let run = run_ember(args, b"", TIMEOUT);
    run.check(run.code() == 0, "ember cpu ... --json");
    serde_json::from_str(&run.stdout).unwrap_or_else(|e| panic!("{e}: {}", run.stdout))
}

fn names(v: &Value) -> Vec<String> {
    v.as_array()
        .unwrap_or_else(|| panic!("not an array: {v}"))
        .iter()
        .map(|s| s.as_str().unwrap().to_string())
        .collect()
}

/// The host's /proc/cpuinfo flags.
fn host_flags() -> Vec<String> {
    let info = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    info.lines()
        .find(|l| l.starts_with("flags"))
        .map(|l| l.split_whitespace().skip(2).map(String::from).collect())
        .unwrap_or_default()
}

#[test]
fn cpu_models_are_listed_shown_enforced_and_set_through_the_api() {
    if !kvm_available("cpu_models_are_listed_shown_enforced_and_set_through_the_api") {
        return;
    }
    let list = json_of(&["cpu", "list", "--json"]);
    let rows = list.as_array().unwrap();
    let row = |n: &str| {
        rows.iter()
            .find(|r| r["name"] == n)
            .unwrap_or_else(|| panic!("{n} not listed"))
    };
    for n in [
        "host",
        "x86-64-v1",
        "x86-64-v2",
        "x86-64-v3",
        "x86-64-v4",
        "Skylake-Server-v1",
        "Cascadelake-Server-v1",
        "Icelake-Server-v1",
        "SapphireRapids-v1",
        "EPYC-v1",
        "EPYC-Rome-v1",
        "EPYC-Milan-v1",
        "EPYC-Genoa-v1",
    ] {
        row(n);
    }
    assert_eq!(row("host")["host_can_run"], true);
    assert_eq!(row("Skylake-Server-v1")["aliases"][0], "Skylake-Server");
    let amx = host_flags().iter().any(|f| f == "amx_tile");
    if !amx {
        assert_eq!(row("SapphireRapids-v1")["host_can_run"], false);
        assert!(names(&row("SapphireRapids-v1")["host_missing"]).contains(&"amx-tile".into()));
    }

    // The psABI level: its features, nothing the host lacks hidden away.
    let v3 = json_of(&["cpu", "show", "x86-64-v3", "--json"]);
    for key in [
        "model",
        "vendor",
        "features",
        "host_missing",
        "hidden",
        "cpuid",
    ] {
        assert!(!v3[key].is_null(), "{key} missing: {v3}");
    }
    assert_eq!(v3["model"], "x86-64-v3");
    let f = names(&v3["features"]);
    for want in ["avx2", "bmi2", "fma", "movbe", "sse4.2", "cx16", "lm"] {
        assert!(f.contains(&want.to_string()), "{want}: {f:?}");
    }
    assert!(!f.contains(&"avx512f".to_string()));
    // What ember hides everywhere, the model says.
    assert!(names(&v3["hidden"]).contains(&"xsave".to_string()), "{v3}");

    let sky = json_of(&["cpu", "show", "Skylake-Server,+avx512vnni,-hle", "--json"]);
    assert_eq!(sky["model"], "Skylake-Server-v1");
    assert_eq!(sky["vendor"], "GenuineIntel");
    assert_eq!(
        (sky["family"].as_u64(), sky["model_number"].as_u64()),
        (Some(6), Some(85))
    );
    let f = names(&sky["features"]);
    assert!(f.contains(&"avx512vnni".into()) && !f.contains(&"hle".into()));

    // A typo is one line with the closest name.
    let run = run_ember(
        &["cpu", "show", "Skylake-Server,+avx512vnnii"],
        b"",
        TIMEOUT,
    );
    assert_clean_error(&run, &["avx512vnnii", "did you mean \"avx512vnni\""]);

    // A model the host cannot provide: one line naming every missing
    // feature, before anything is created (no guest output, no socket).
    let dir = TempDir::new("cpu-enforce");
    let kernel = guest_kernel_dir().join("vmlinux");
    let sock = dir.path("api.sock");
    if !amx {
        let run = run_ember(
            &[
                "--kernel",
                kernel.to_str().unwrap(),
                "--cpu",
                "SapphireRapids",
                "--api-sock",
                sock.to_str().unwrap(),
            ],
            b"",
            TIMEOUT,
        );
        assert_clean_error(
            &run,
            &[
                "SapphireRapids-v1",
                "amx-tile",
                "amx-int8",
                "amx-bf16",
                ",check",
            ],
        );
        run.check(run.stdout.is_empty(), "no guest ran");
        run.check(!sock.exists(), "nothing was created");
    }

    // Firecracker's custom template through the API, and the static ones
    // refused with the way to go.
    let ember = spawn_ember(&["--api-sock", sock.to_str().unwrap()], b"");
    let mut api = Api::connect(&sock);
    let template = r#"{"cpuid_modifiers": [{"leaf": "0x7", "subleaf": "0x0", "flags": 1,
        "modifiers": [{"register": "ebx", "bitmap": "0bxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx0"}]}],
        "msr_modifiers": [{"addr": "0x1a0", "bitmap":
            "0bxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx1"}]}"#;
    api.call("PUT", "/cpu-config", Some(template), 204);
    let cfg = api.call("GET", "/vm/config", None, 200).json();
    assert_eq!(
        cfg["cpu-config"]["cpuid_modifiers"][0]["leaf"], "0x7",
        "{cfg}"
    );
    let bad = template.replace("0bxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx0", "0bxx");
    let r = api.call("PUT", "/cpu-config", Some(&bad), 400);
    assert!(r.fault().contains("has 2 bits, not 32"), "{}", r.fault());
    let r = api.call(
        "PUT",
        "/machine-config",
        Some(r#"{"vcpu_count": 1, "mem_size_mib": 64, "cpu_template": "T2"}"#),
        400,
    );
    assert!(r.fault().contains("PUT /cpu-config"), "{}", r.fault());
    // The good template is still there, and a guest starts with it (its
    // CPUID and MSR modifiers applied to a real vCPU).
    let cfg = api.call("GET", "/vm/config", None, 200).json();
    assert!(!cfg["cpu-config"].is_null(), "{cfg}");
    // hlt; jmp back.
    let kernel = dir.write("halt.elf", &tiny_elf(&[0xf4, 0xeb, 0xfd]));
    let boot = format!(r#"{{"kernel_image_path": "{}"}}"#, kernel.display());
    api.call("PUT", "/boot-source", Some(&boot), 204);
    api.call(
        "PUT",
        "/machine-config",
        Some(r#"{"vcpu_count": 2, "mem_size_mib": 32}"#),
        204,
    );
    api.call(
        "PUT",
        "/actions",
        Some(r#"{"action_type": "InstanceStart"}"#),
        204,
    );
    assert_eq!(api.state(), "Running");
    let r = api.call("PUT", "/cpu-config", Some(template), 400);
    assert!(r.fault().contains("start"), "{}", r.fault());
    ember.signal(libc::SIGTERM);
    let run = ember.finish(TIMEOUT);
    run.check(!run.stderr.contains("panicked"), "no panic");
}

/// One boot per vendor: Linux prints `smpboot: CPU0: <brand> (family: ..,
/// model: .., stepping: ..)` from the CPUID ember set, unless the host
/// forces its own identity, which ember then reports.
#[test]
fn the_guest_kernel_sees_each_vendors_model() {
    if !kvm_available("the_guest_kernel_sees_each_vendors_model") {
        return;
    }
    let kernel = guest_kernel_dir().join("vmlinux");
    let boot = |model: &str, vcpus: &str| {
        spawn_ember(
            &[
                "--kernel",
                kernel.to_str().unwrap(),
                "--cpu",
                model,
                "--vcpus",
                vcpus,
                "--memory",
                "128",
                "--cmdline",
                "console=ttyS0 reboot=k panic=1",
            ],
            b"",
        )
    };
    // Both at once: each ends when the kernel finds no root filesystem.
    // The AMD guest has two vCPUs: the model's CPUID with ember's topology.
    let intel = boot("SapphireRapids,check", "1");
    let amd = boot("EPYC-Rome,check", "2");
    let cases = [
        (
            intel.finish(Duration::from_secs(240)),
            "Intel Xeon Processor (SapphireRapids) (family: 0x6, model: 0x8f, stepping: 0x4)",
            "SapphireRapids-v1",
        ),
        (
            amd.finish(Duration::from_secs(240)),
            "AMD EPYC-Rome Processor (family: 0x17, model: 0x31, stepping: 0x0)",
            "EPYC-Rome-v1",
        ),
    ];
    for (run, line, model) in &cases {
        run.check(!run.stderr.contains("panicked"), "no panic");
        let seen = run.stdout.lines().find(|l| l.contains("smpboot: CPU0: "));
        run.check(seen.is_some(), "the kernel printed its CPU");
        let forced = run.stderr.contains(&format!(
            "CPU model {model}: this host shows the guest its own vendor"
        )) || run.stderr.contains(&format!(
            "CPU model {model}: this host shows the guest its own family"
        ));
        if forced {
            eprintln!("{model}: this host forces its own CPU identity; ember said so");
        } else {
            run.check(
                seen.unwrap().contains(line),
                &format!("the guest sees {line}"),
            );
        }
    }
    let (amd, ..) = &cases[1];
    amd.check(
        amd.stdout
            .contains("smpboot: Total of 2 processors activated"),
        "both vCPUs of the EPYC-Rome guest came up",
    );
    // `check` says what the guest goes without.
    let (intel, ..) = &cases[0];
    if !host_flags().iter().any(|f| f == "amx_tile") {
        intel.check(
            intel.stderr.contains("this host cannot provide") && intel.stderr.contains("amx-tile"),
            "the check warning names the missing features",
        );
    }
}
