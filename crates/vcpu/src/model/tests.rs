use super::fingerprint::{named_features, CpuFingerprint, FingerprintError};
use super::*;

/// A host whose KVM offers every named feature but `lacking`.
fn host(lacking: &[&str]) -> HostCpu {
    HostCpu::with_every_feature().without(lacking).unwrap()
}

fn model(name: &str) -> &'static ModelDef {
    find_model(name).unwrap_or_else(|| panic!("{name}"))
}

fn has(m: &ModelDef, f: &str) -> bool {
    m.feature_names().any(|n| n == f)
}

/// What the vendors' documentation says each generation added, checked
/// against the table (which comes from QEMU): a wrong row or a generator
/// mistake shows here.
#[test]
fn every_model_has_its_generations_features() {
    let table: &[(&str, &str, &str)] = &[
        ("Skylake-Server", "avx512f avx512dq avx512cd avx512bw avx512vl clwb clflushopt pku hle rtm invpcid tsc-deadline", "avx512vnni avx512vbmi gfni la57 sse4a amx-tile"),
        ("Cascadelake-Server", "avx512f avx512vnni clwb pku spec-ctrl ssbd", "avx512vbmi gfni la57 amx-tile"),
        ("Icelake-Server", "avx512vnni avx512vbmi avx512vbmi2 gfni vaes vpclmulqdq avx512bitalg avx512-vpopcntdq la57 umip wbnoinvd", "amx-tile avx512-fp16 serialize"),
        ("SapphireRapids", "amx-tile amx-int8 amx-bf16 avx512-fp16 avx-vnni avx512-bf16 serialize tsx-ldtrk fsrm rdpid arch-capabilities mds-no", "sse4a clzero"),
        ("EPYC", "sha-ni sse4a misalignsse topoext adx rdseed", "avx512f clwb umip rdpid wbnoinvd pku vaes"),
        ("EPYC-Rome", "clwb umip rdpid wbnoinvd clzero sha-ni ibpb", "avx512f pku vaes"),
        ("EPYC-Milan", "pku fsrm invpcid ibpb amd-ssbd", "avx512f vaes la57"),
        ("EPYC-Genoa", "avx512f avx512vnni avx512vbmi gfni la57 vaes avx512-bf16 auto-ibrs pku", "amx-tile avx512-fp16 serialize hle"),
    ];
    for (name, with, without) in table {
        let m = model(name);
        for f in with.split_whitespace() {
            assert!(has(m, f), "{name} lacks {f}");
        }
        for f in without.split_whitespace() {
            assert!(!has(m, f), "{name} has {f}");
        }
    }
}

#[test]
fn identities_and_abi_levels() {
    let ids: &[(&str, Vendor, u32, u32, u32, u8)] = &[
        ("Skylake-Server", Vendor::Intel, 6, 85, 4, 4),
        ("Cascadelake-Server", Vendor::Intel, 6, 85, 6, 4),
        ("Icelake-Server", Vendor::Intel, 6, 134, 0, 4),
        ("Icelake-Server-v4", Vendor::Intel, 6, 106, 0, 4),
        ("SapphireRapids", Vendor::Intel, 6, 143, 4, 4),
        ("EPYC", Vendor::Amd, 23, 1, 2, 3),
        ("EPYC-Rome", Vendor::Amd, 23, 49, 0, 3),
        ("EPYC-Milan", Vendor::Amd, 25, 1, 1, 3),
        ("EPYC-Genoa", Vendor::Amd, 25, 17, 0, 4),
    ];
    for &(name, vendor, family, model_no, stepping, level) in ids {
        let m = model(name);
        assert_eq!(
            (m.vendor, m.family, m.model, m.stepping),
            (vendor, family, model_no, stepping),
            "{name}"
        );
        let reached = (1..=4)
            .take_while(|&l| {
                abi_level_features(l)
                    .iter()
                    .all(|f| f == &"hypervisor" || has(m, f))
            })
            .last()
            .unwrap_or(0);
        assert_eq!(reached, level, "{name}: psABI level");
    }
}

#[test]
fn every_model_feature_is_a_known_name() {
    for m in MODELS {
        for n in m.feature_names() {
            assert_eq!(
                features::find(n).map(|f| f.name),
                Some(n),
                "{}: {n}",
                m.name
            );
        }
        assert!(m.brand.len() <= 47, "{}", m.name);
    }
    // Versions and aliases as QEMU has them.
    assert_eq!(model("Skylake-Server").name, "Skylake-Server-v1");
    assert_eq!(model("skylake-server-ibrs").name, "Skylake-Server-v2");
    assert_eq!(
        MODELS
            .iter()
            .filter(|m| m.name.starts_with("Icelake-Server-v"))
            .count(),
        7
    );
}

#[test]
fn parse_options() {
    let s = CpuSpec::parse("Skylake-Server,+avx512vnni,-hle,rtm=off,check").unwrap();
    assert!(matches!(s.base, Base::Named(m) if m.name == "Skylake-Server-v1"));
    assert_eq!(s.add, vec!["avx512vnni"]);
    assert_eq!(s.remove, vec!["hle", "rtm"]);
    assert_eq!(s.mode, Mode::Check);
    assert!(matches!(
        CpuSpec::parse("x86-64-v3").unwrap().base,
        Base::Level(3)
    ));
    assert!(matches!(CpuSpec::parse("host").unwrap().base, Base::Host));
    assert_eq!(CpuSpec::parse("EPYC,enforce").unwrap().mode, Mode::Enforce);
    // The last word on a feature wins.
    let s = CpuSpec::parse("EPYC,+avx512f,-avx512f").unwrap();
    assert!(s.add.is_empty());
    assert_eq!(s.remove, vec!["avx512f"]);
}

#[test]
fn parse_errors_suggest_the_closest_name() {
    let e = CpuSpec::parse("Skylake-Server,+avx512vnnii").unwrap_err();
    assert_eq!(
        e,
        ModelError::UnknownFeature {
            name: "avx512vnnii".into(),
            suggestion: Some("avx512vnni")
        }
    );
    assert!(e.to_string().contains("did you mean \"avx512vnni\""), "{e}");
    let e = CpuSpec::parse("Skylake-Sever").unwrap_err();
    assert!(
        e.to_string().contains("did you mean \"Skylake-Server\""),
        "{e}"
    );
    assert!(matches!(
        CpuSpec::parse("x86-64-v5"),
        Err(ModelError::UnknownModel { .. })
    ));
    assert_eq!(
        CpuSpec::parse("EPYC,fast").unwrap_err(),
        ModelError::BadOption("fast".into())
    );
    assert_eq!(
        CpuSpec::parse("EPYC,+").unwrap_err(),
        ModelError::BadOption("+".into())
    );
}

#[test]
fn enforce_names_every_missing_feature_and_check_drops_them() {
    let h = host(&[
        "amx-tile",
        "amx-int8",
        "amx-bf16",
        "avx512-fp16",
        "serialize",
    ]);
    let e = resolve(&CpuSpec::parse("SapphireRapids").unwrap(), &h).unwrap_err();
    let ModelError::HostMissing { model, missing } = &e else {
        panic!("{e}")
    };
    assert_eq!(model, "SapphireRapids-v1");
    assert_eq!(
        missing,
        &vec![
            "amx-bf16",
            "amx-int8",
            "amx-tile",
            "avx512-fp16",
            "serialize"
        ]
    );
    assert!(e.to_string().contains("amx-tile"), "{e}");
    let m = resolve(&CpuSpec::parse("SapphireRapids,check").unwrap(), &h).unwrap();
    assert_eq!(m.host_missing.len(), 5);
    assert!(
        m.features.contains(&"amx-tile"),
        "the model's own set keeps it"
    );
    assert!(!m.guest.contains(&"amx-tile"), "the guest does not get it");
    let cpuid = m.cpuid(&h).unwrap();
    assert!(!named_features(&cpuid).contains(&"amx-tile"));
    // Removing them by name is as good.
    let spec = "SapphireRapids,-amx-tile,-amx-int8,-amx-bf16,-avx512-fp16,-serialize";
    assert!(resolve(&CpuSpec::parse(spec).unwrap(), &h).is_ok());
}

#[test]
fn hidden_features_are_reported_and_withheld() {
    let m = resolve(&CpuSpec::parse("x86-64-v3").unwrap(), &host(&[])).unwrap();
    for f in ["avx", "avx2", "xsave", "fma", "f16c", "popcnt", "cx16"] {
        assert!(m.hidden.contains(&f), "{f} not hidden: {:?}", m.hidden);
        assert!(!m.guest.contains(&f), "{f} given");
    }
    assert!(m.guest.contains(&"sse4.2") && m.guest.contains(&"bmi2"));
    assert!(m.host_missing.is_empty());
}

#[test]
fn kvm_defaults_as_qemu() {
    let m = resolve(&CpuSpec::parse("EPYC-Genoa").unwrap(), &host(&[])).unwrap();
    assert!(m.features.contains(&"x2apic"));
    for f in ["svm", "npt", "nrip-save", "vnmi"] {
        assert!(!m.features.contains(&f), "{f}");
    }
    // Asked for explicitly, it is there.
    let m = resolve(&CpuSpec::parse("EPYC-Genoa,+npt").unwrap(), &host(&[])).unwrap();
    assert!(m.features.contains(&"npt"));
}

#[test]
fn named_model_cpuid_round_trips() {
    let h = host(&[]);
    for name in ["Skylake-Server", "EPYC-Rome", "SapphireRapids-v3"] {
        let m = resolve(&CpuSpec::parse(name).unwrap(), &h).unwrap();
        let cpuid = m.cpuid(&h).unwrap();
        let def = m.definition().unwrap();
        let (vendor, family, model_no, stepping, brand) = build::identity(&cpuid);
        assert_eq!(vendor, def.vendor.id());
        assert_eq!(
            (family, model_no, stepping),
            (def.family, def.model, def.stepping)
        );
        assert_eq!(brand, def.brand);
        let mut got = named_features(&cpuid);
        // Topology bits: set per vCPU by `normalize`.
        got.retain(|n| *n != "ht" && *n != "cmp-legacy");
        got.sort_unstable();
        let mut want = m.guest.clone();
        want.retain(|n| {
            !matches!(
                features::find(n).unwrap().location,
                features::Location::Msr { .. }
            )
        });
        assert_eq!(got, want, "{name}");
        let l0 = cpuid.iter().find(|e| e.function == 0).unwrap();
        assert_eq!(l0.eax, def.level.min(0x10));
        assert!(cpuid
            .iter()
            .all(|e| e.function >= 0x4000_0000 || e.function <= l0.eax));
        let leaf4 = cpuid.iter().filter(|e| e.function == 4).count();
        match def.vendor {
            Vendor::Intel => assert_eq!(leaf4, 5, "{name}: four caches and the end"),
            Vendor::Amd => {
                assert_eq!(leaf4, 0);
                let l3 = cpuid
                    .iter()
                    .find(|e| e.function == 0x8000_0006)
                    .unwrap()
                    .edx;
                assert_eq!((l3 >> 18) * 512, def.caches.l3.kib);
            }
        }
    }
    // x86-64-vN keeps the host's identity.
    let m = resolve(&CpuSpec::parse("x86-64-v2").unwrap(), &h).unwrap();
    assert_eq!(
        (m.vendor.as_str(), m.family, m.model),
        ("AuthenticAMD", 25, 17)
    );
    let cpuid = m.cpuid(&h).unwrap();
    assert!(!named_features(&cpuid).contains(&"avx512f"));
}

#[test]
fn fingerprint_refuses_a_weaker_host() {
    let strong = host(&[]);
    let m = resolve(&CpuSpec::parse("Cascadelake-Server").unwrap(), &strong).unwrap();
    let fp = CpuFingerprint::new(&m, &m.cpuid(&strong).unwrap(), Some(2_000_000));
    let text = serde_json::to_string(&fp).unwrap();
    let back: CpuFingerprint = serde_json::from_str(&text).unwrap();
    assert_eq!(back, fp);
    assert_eq!(fp.check(&strong), Ok(()));
    // avx512vnni is hidden by ember everywhere: the guest never had it.
    assert!(!fp.features.contains(&"avx512vnni".to_string()));
    let weak = host(&["avx512vnni", "clwb", "adx"]);
    assert_eq!(
        fp.check(&weak),
        Err(FingerprintError::Missing {
            model: "Cascadelake-Server-v1".into(),
            missing: vec!["adx".into(), "clwb".into()]
        })
    );
    let mut old = fp.clone();
    old.version = 9;
    assert_eq!(old.check(&strong), Err(FingerprintError::Version(9)));
    assert_eq!(fp.tsc_note(Some(2_000_100), false), None);
    let note = fp.tsc_note(Some(2_500_000), false).unwrap();
    assert!(note.contains("no KVM_CAP_TSC_CONTROL"), "{note}");
}
