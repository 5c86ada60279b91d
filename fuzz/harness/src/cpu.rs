//! `cpu_model`: a CPU choice as `--cpu`, `[machine] cpu` or `PUT
//! /cpu-config` gives it, resolved against a host and built into the CPUID
//! every vCPU would get, then a fingerprint of it checked against the host
//! and a weaker one. Checks what the model code promises: a model resolved
//! on a host is given only what the host has, never what ember hides, and
//! its fingerprint passes on that host.
//!
//! Input: one mode byte, then text: mode bit 0 clear, a `--cpu` value
//! (`MODEL[,+feat][,-feat][,enforce|,check]`; `.json` paths are refused
//! here so the fuzzer reads no files); set, a Firecracker custom template's
//! JSON.

use ember_vcpu::cpuid::normalize;
use ember_vcpu::model::fingerprint::{named_features, CpuFingerprint};
use ember_vcpu::model::{self, features, CpuSpec, CustomTemplate, HostCpu};

/// A host that offers every named feature but a few (AMX, LA57, PKU): an
/// AMD EPYC.
pub fn fuzz_host() -> HostCpu {
    let mut host = HostCpu::with_every_feature();
    host.arch_capabilities = 0x0c00_00eb;
    host.without(&["amx-tile", "amx-int8", "amx-bf16", "la57", "pku"])
        .expect("known names")
}

/// The target.
pub fn cpu_model(data: &[u8]) {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let text = String::from_utf8_lossy(rest);
    let spec = if mode & 1 == 0 {
        if text
            .split(',')
            .next()
            .unwrap_or("")
            .trim()
            .ends_with(".json")
        {
            return;
        }
        CpuSpec::parse(&text)
    } else {
        CustomTemplate::from_json(&text).map(CpuSpec::template)
    };
    let Ok(spec) = spec else {
        return;
    };
    let host = fuzz_host();
    let Ok(m) = model::resolve(&spec, &host) else {
        return;
    };
    let Ok(base) = m.cpuid(&host) else {
        return;
    };
    for count in [1u8, 3] {
        let cpuid = normalize(&base, count - 1, count);
        let seen = named_features(&cpuid);
        for hidden in model::masked_names() {
            assert!(!seen.contains(&hidden), "{hidden} given to the guest");
        }
        if !matches!(spec.base, model::Base::Template(_) | model::Base::Host) {
            for n in &seen {
                let f = features::find(n).expect("named");
                assert!(
                    host.has(f) || matches!(*n, "ht" | "cmp-legacy"),
                    "{n} given but the host lacks it"
                );
            }
        }
    }
    let _ = m.msrs(&host, |_| Some(0));
    let fp = CpuFingerprint::new(&m, &base, Some(2_000_000));
    assert!(fp.check(&host).is_ok(), "a guest resolved here runs here");
    let weaker = host.clone().without(&["sse4.2", "x2apic"]).expect("known");
    let _ = fp.check(&weaker);
    let text = serde_json::to_string(&fp).expect("serializes");
    assert_eq!(serde_json::from_str::<CpuFingerprint>(&text).ok(), Some(fp));
}

/// Hand-made seeds: models, options, typos, templates good and bad.
pub fn seeds() -> Vec<crate::seeds::NamedSeed> {
    let spec = |s: &str| [&[0u8][..], s.as_bytes()].concat();
    let json = |s: &str| [&[1u8][..], s.as_bytes()].concat();
    vec![
        ("host", spec("host")),
        ("abi_v3", spec("x86-64-v3")),
        (
            "skylake_opts",
            spec("Skylake-Server,+avx512vnni,-hle,rtm=off,check"),
        ),
        ("sapphire_enforce", spec("SapphireRapids")),
        ("sapphire_check", spec("SapphireRapids-v3,check")),
        ("genoa_npt", spec("EPYC-Genoa,+npt,enforce")),
        ("alias", spec("Cascadelake-Server-noTSX,-mds-no")),
        ("typo", spec("Skylake-Sever,+avx512vnnii")),
        ("bad_option", spec("EPYC,fast,+")),
        (
            "template",
            json(
                r#"{"kvm_capabilities":["!121"],"cpuid_modifiers":[{"leaf":"0x7","subleaf":"0x0","flags":1,"modifiers":[{"register":"ebx","bitmap":"0bxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx0"}]}],"msr_modifiers":[{"addr":"0x10a","bitmap":"0bxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx0000"}]}"#,
            ),
        ),
        (
            "template_bad_bitmap",
            json(
                r#"{"cpuid_modifiers":[{"leaf":"1","subleaf":"0","flags":0,"modifiers":[{"register":"ecx","bitmap":"0b12"}]}]}"#,
            ),
        ),
        ("template_empty", json("{}")),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpu_seeds_run_and_the_good_ones_resolve() {
        for (_, s) in seeds() {
            cpu_model(&s);
        }
        let host = fuzz_host();
        let m = model::resolve(&CpuSpec::parse("SapphireRapids,check").unwrap(), &host).unwrap();
        assert!(m.host_missing.contains(&"amx-tile"));
        assert!(model::resolve(&CpuSpec::parse("SapphireRapids").unwrap(), &host).is_err());
    }
}
