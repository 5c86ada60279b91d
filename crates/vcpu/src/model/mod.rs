//! CPU models: what the guest's CPU looks like.
//!
//! A model is data ([`ModelDef`], [`table::MODELS`]): vendor,
//! family/model/stepping, brand string, CPUID levels, caches and a feature
//! set named as QEMU names features ([`features`]). A [`CpuSpec`]
//! (`MODEL[,+feat][,-feat][,enforce|,check]`, as QEMU's `-cpu`) is resolved
//! against what the host's KVM can give ([`HostCpu`]) into a [`CpuModel`]:
//! the model's own features, those the host cannot provide
//! (`host_missing`: an error with `enforce`, dropped with a warning with
//! `check`), those ember hides on every host ([`crate::cpuid::MASKED_FEATURES`]),
//! and the CPUID the vCPUs get ([`CpuModel::cpuid`]).
//!
//! Models: `host` (KVM's supported CPUID, the default), the x86-64 psABI
//! levels `x86-64-v1`..`x86-64-v4` (features only: the host's vendor,
//! family/model and caches are kept), QEMU's named server models in every
//! version QEMU defines (`Skylake-Server-v1`..; the unversioned name is v1,
//! as in QEMU), and Firecracker's custom CPU templates ([`template`]).

mod build;
pub mod features;
pub mod fingerprint;
mod table;
pub mod template;

use std::collections::BTreeSet;
use std::fmt;
use std::str::FromStr;

use kvm_bindings::kvm_cpuid_entry2;
use serde::{Deserialize, Serialize};

pub use crate::cpuid::Reg;
pub use build::{decode_signature, identity, set_feature};
use features::{Feature, Location};
pub use table::MODELS;
pub use template::CustomTemplate;

/// A CPU vendor.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Vendor {
    /// GenuineIntel.
    Intel,
    /// AuthenticAMD.
    Amd,
}

impl Vendor {
    /// The 12-byte identification string of CPUID leaf 0.
    pub fn id(self) -> &'static str {
        match self {
            Vendor::Intel => "GenuineIntel",
            Vendor::Amd => "AuthenticAMD",
        }
    }
}

/// One cache level's geometry (64-byte lines).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cache {
    /// Size in KiB.
    pub kib: u32,
    /// Associativity.
    pub ways: u32,
}

/// A model's caches.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CacheSet {
    /// L1 data.
    pub l1d: Cache,
    /// L1 instruction.
    pub l1i: Cache,
    /// L2, per core.
    pub l2: Cache,
    /// L3, shared by the package.
    pub l3: Cache,
}

/// A named CPU model.
#[derive(Clone, Copy, Debug)]
pub struct ModelDef {
    /// QEMU's versioned name (`Skylake-Server-v1`).
    pub name: &'static str,
    /// Other names for it (`Skylake-Server`).
    pub aliases: &'static [&'static str],
    /// Vendor.
    pub vendor: Vendor,
    /// Family (the displayed one: base + extended).
    pub family: u32,
    /// Model (the displayed one: extended << 4 | base).
    pub model: u32,
    /// Stepping.
    pub stepping: u32,
    /// Brand string (leaves 0x8000_0002..4).
    pub brand: &'static str,
    /// Highest basic leaf.
    pub level: u32,
    /// Highest extended leaf.
    pub xlevel: u32,
    /// Caches.
    pub caches: &'static CacheSet,
    /// Features, QEMU's names separated by whitespace.
    pub features: &'static str,
}

impl ModelDef {
    /// The feature names.
    pub fn feature_names(&self) -> impl Iterator<Item = &'static str> {
        self.features.split_whitespace()
    }
}

/// The x86-64 psABI levels (System V ABI, AMD64 supplement, 3.1.1), each
/// adding to the one before, with the architectural features every x86-64
/// CPU has (APIC, MSRs, PAE, NX...) in v1, as `qemu64` has them.
const ABI_LEVELS: [&str; 4] = [
    "fpu de pse tsc msr pae mce cx8 apic sep mtrr pge mca cmov pat pse36 clflush mmx fxsr \
     sse sse2 syscall nx lm hypervisor",
    "cx16 lahf-lm popcnt pni sse4.1 sse4.2 ssse3",
    "avx avx2 bmi1 bmi2 f16c fma abm movbe xsave",
    "avx512f avx512bw avx512cd avx512dq avx512vl",
];

/// The features of psABI level `level` (1..=4).
pub fn abi_level_features(level: u8) -> Vec<&'static str> {
    ABI_LEVELS[..usize::from(level.clamp(1, 4))]
        .iter()
        .flat_map(|l| l.split_whitespace())
        .collect()
}

/// Adjustments QEMU makes to every model under KVM (its
/// `kvm_default_props`), made by ember too: x2APIC on (KVM's in-kernel
/// APIC makes it cheap); no SVM (so none of its leaf 0x8000_000a features),
/// no VMX: ember offers no nested virtualisation; no MONITOR/MWAIT and no
/// ACPI thermal control, which KVM does not virtualise.
pub const KVM_DEFAULTS_ON: &[&str] = &["x2apic"];
/// See [`KVM_DEFAULTS_ON`].
pub const KVM_DEFAULTS_OFF: &[&str] = &["svm", "vmx", "monitor", "acpi"];

fn kvm_defaults(set: &mut BTreeSet<&'static str>) {
    set.extend(KVM_DEFAULTS_ON.iter().copied());
    set.retain(|n| {
        !KVM_DEFAULTS_OFF.contains(n)
            && !matches!(
                features::find(n).map(|f| f.location),
                Some(Location::Cpuid {
                    leaf: 0x8000_000a,
                    ..
                })
            )
    });
}

/// What a model is built on.
#[derive(Clone, Debug)]
pub enum Base {
    /// KVM's supported CPUID (today's behaviour).
    Host,
    /// An x86-64 psABI level, 1..=4.
    Level(u8),
    /// A named model.
    Named(&'static ModelDef),
    /// A Firecracker custom CPU template applied to the host's CPUID.
    Template(Box<CustomTemplate>),
}

/// What happens to model features the host cannot provide.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    /// Refuse the model (the default for named models and levels).
    Enforce,
    /// Warn and drop them.
    Check,
}

/// A parsed `--cpu` value.
#[derive(Clone, Debug)]
pub struct CpuSpec {
    /// The model.
    pub base: Base,
    /// `+feat`.
    pub add: Vec<&'static str>,
    /// `-feat`.
    pub remove: Vec<&'static str>,
    /// `enforce` or `check`.
    pub mode: Mode,
    /// The text it was parsed from.
    pub text: String,
}

/// Errors in choosing a CPU model.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ModelError {
    /// No model has that name.
    #[error("unknown CPU model {name:?}{}; `ember cpu list` lists them", hint(.suggestion))]
    UnknownModel {
        /// The name.
        name: String,
        /// The closest model name.
        suggestion: Option<String>,
    },
    /// No feature has that name.
    #[error("unknown CPU feature {name:?}{}", hint(.suggestion))]
    UnknownFeature {
        /// The name.
        name: String,
        /// The closest feature name.
        suggestion: Option<&'static str>,
    },
    /// A malformed option.
    #[error("bad CPU option {0:?}: expected +FEATURE, -FEATURE, FEATURE=on|off, enforce or check")]
    BadOption(String),
    /// The host cannot provide model features and the mode is `enforce`.
    #[error(
        "this host cannot provide {} feature(s) of CPU model {model}: {} (add `,check` to drop them with a warning, or `,-FEATURE` to remove one)",
        .missing.len(), .missing.join(" ")
    )]
    HostMissing {
        /// The model.
        model: String,
        /// Every missing feature.
        missing: Vec<&'static str>,
    },
    /// A Firecracker template is invalid.
    #[error("CPU template: {0}")]
    Template(String),
}

fn hint<T: fmt::Debug>(s: &Option<T>) -> String {
    s.as_ref()
        .map(|s| format!(" (did you mean {s:?}?)"))
        .unwrap_or_default()
}

/// The named model called `name` (versioned, alias, any case).
pub fn find_model(name: &str) -> Option<&'static ModelDef> {
    MODELS.iter().find(|m| {
        m.name.eq_ignore_ascii_case(name) || m.aliases.iter().any(|a| a.eq_ignore_ascii_case(name))
    })
}

/// Every model name `ember cpu list` shows: `host`, the levels, the named
/// models.
pub fn model_names() -> Vec<&'static str> {
    let mut v = vec!["host", "x86-64-v1", "x86-64-v2", "x86-64-v3", "x86-64-v4"];
    v.extend(MODELS.iter().map(|m| m.name));
    v
}

fn closest_model(name: &str) -> Option<String> {
    let all = model_names()
        .into_iter()
        .chain(MODELS.iter().flat_map(|m| m.aliases.iter().copied()));
    all.map(|n| {
        (
            features::distance(&name.to_lowercase(), &n.to_lowercase()),
            n,
        )
    })
    .min()
    .filter(|&(d, _)| d <= 3)
    .map(|(_, n)| n.to_string())
}

fn feature(name: &str) -> Result<&'static str, ModelError> {
    features::find(name)
        .map(|f| f.name)
        .ok_or_else(|| ModelError::UnknownFeature {
            name: name.to_string(),
            suggestion: features::closest(name),
        })
}

impl CpuSpec {
    /// `host`, with nothing added or removed.
    pub fn host() -> Self {
        CpuSpec {
            base: Base::Host,
            add: Vec::new(),
            remove: Vec::new(),
            mode: Mode::Enforce,
            text: "host".into(),
        }
    }

    /// A Firecracker custom template as the model (`PUT /cpu-config`):
    /// what the host cannot provide is dropped with a warning.
    pub fn template(t: CustomTemplate) -> Self {
        CpuSpec {
            base: Base::Template(Box::new(t)),
            add: Vec::new(),
            remove: Vec::new(),
            mode: Mode::Check,
            text: "template".into(),
        }
    }

    /// The model's name as the user would see it.
    pub fn model_name(&self) -> String {
        match &self.base {
            Base::Host => "host".into(),
            Base::Level(l) => format!("x86-64-v{l}"),
            Base::Named(m) => m.name.into(),
            Base::Template(_) => "template".into(),
        }
    }

    /// Parses `MODEL[,+feat][,-feat][,feat=on|off][,enforce|,check]`;
    /// a model that names a `.json` file is a Firecracker custom CPU
    /// template read from it.
    pub fn parse(text: &str) -> Result<Self, ModelError> {
        let mut parts = text.split(',');
        let name = parts.next().unwrap_or("").trim();
        let (base, mut mode) = if name.eq_ignore_ascii_case("host") {
            (Base::Host, Mode::Enforce)
        } else if let Some(l) = name
            .strip_prefix("x86-64-v")
            .and_then(|l| l.parse::<u8>().ok())
            .filter(|l| (1..=4).contains(l))
        {
            (Base::Level(l), Mode::Enforce)
        } else if let Some(m) = find_model(name) {
            (Base::Named(m), Mode::Enforce)
        } else if name.ends_with(".json") {
            let t = CustomTemplate::from_file(std::path::Path::new(name))?;
            (Base::Template(Box::new(t)), Mode::Check)
        } else {
            return Err(ModelError::UnknownModel {
                name: name.to_string(),
                suggestion: closest_model(name),
            });
        };
        let (mut add, mut remove) = (Vec::new(), Vec::new());
        for opt in parts.map(str::trim) {
            match opt {
                "enforce" => mode = Mode::Enforce,
                "check" => mode = Mode::Check,
                _ => {
                    let (f, on) = if let Some(f) = opt.strip_prefix('+') {
                        (f, true)
                    } else if let Some(f) = opt.strip_prefix('-') {
                        (f, false)
                    } else if let Some(f) = opt.strip_suffix("=on") {
                        (f, true)
                    } else if let Some(f) = opt.strip_suffix("=off") {
                        (f, false)
                    } else {
                        return Err(ModelError::BadOption(opt.to_string()));
                    };
                    if f.is_empty() {
                        return Err(ModelError::BadOption(opt.to_string()));
                    }
                    let f = feature(f)?;
                    add.retain(|&a| a != f);
                    remove.retain(|&r| r != f);
                    if on { &mut add } else { &mut remove }.push(f);
                }
            }
        }
        Ok(CpuSpec {
            base,
            add,
            remove,
            mode,
            text: text.trim().to_string(),
        })
    }
}

impl FromStr for CpuSpec {
    type Err = ModelError;
    fn from_str(s: &str) -> Result<Self, ModelError> {
        Self::parse(s)
    }
}

/// What the host's KVM can give a guest.
#[derive(Clone, Debug)]
pub struct HostCpu {
    /// `KVM_GET_SUPPORTED_CPUID`.
    pub cpuid: Vec<kvm_cpuid_entry2>,
    /// The `IA32_ARCH_CAPABILITIES` bits KVM emulates (its feature MSR).
    pub arch_capabilities: u64,
    /// `KVM_CAP_TSC_DEADLINE_TIMER` (not in the supported CPUID).
    pub tsc_deadline: bool,
}

impl HostCpu {
    /// Whether the host can give a guest `f`.
    pub fn has(&self, f: &Feature) -> bool {
        match (f.name, f.location) {
            // Ember sets it: every guest runs under a hypervisor.
            ("hypervisor", _) => true,
            ("tsc-deadline", _) => self.tsc_deadline,
            (_, Location::Msr { bit, .. }) => self.arch_capabilities & (1 << bit) != 0,
            (
                _,
                Location::Cpuid {
                    leaf,
                    subleaf,
                    reg,
                    bit,
                },
            ) => build::bit_set(&self.cpuid, leaf, subleaf, reg, bit),
        }
    }

    /// Every named feature the host can give.
    pub fn features(&self) -> Vec<&'static str> {
        features::FEATURES
            .iter()
            .filter(|f| self.has(f))
            .map(|f| f.name)
            .collect()
    }

    /// Takes `names` away, as a weaker host would not have them (for tests:
    /// ember reads `EMBER_TEST_HOST_CPU_REMOVE`).
    pub fn without(mut self, names: &[&str]) -> Result<Self, ModelError> {
        for n in names {
            let f = features::find(n).ok_or_else(|| ModelError::UnknownFeature {
                name: n.to_string(),
                suggestion: features::closest(n),
            })?;
            match f.location {
                Location::Msr { bit, .. } => self.arch_capabilities &= !(1 << bit),
                Location::Cpuid {
                    leaf,
                    subleaf,
                    reg,
                    bit,
                } => build::set_bit(&mut self.cpuid, leaf, subleaf, reg, bit, false),
            }
            if f.name == "tsc-deadline" {
                self.tsc_deadline = false;
            }
        }
        Ok(self)
    }

    /// A made-up host offering every feature ember names: an AMD family 25
    /// model 17 with basic leaves to 0x10 and extended ones to
    /// 0x8000_0021. For tests and fuzzing, with [`HostCpu::without`].
    pub fn with_every_feature() -> Self {
        let mut cpuid = Vec::new();
        for leaf in (0..=0x10).chain(0x8000_0000..=0x8000_0021) {
            cpuid.push(kvm_cpuid_entry2 {
                function: leaf,
                flags: u32::from(matches!(leaf, 4 | 7 | 0xb | 0xd)),
                ..Default::default()
            });
        }
        for leaf in [7, 0xd] {
            cpuid.push(kvm_cpuid_entry2 {
                function: leaf,
                index: 1,
                flags: 1,
                ..Default::default()
            });
        }
        // "AuthenticAMD", family 25 model 17 stepping 1.
        (cpuid[0].eax, cpuid[0].ebx, cpuid[0].edx, cpuid[0].ecx) =
            (0x10, 0x6874_7541, 0x6974_6e65, 0x444d_4163);
        cpuid[1].eax = 0x00a1_0f11;
        for f in features::FEATURES {
            build::set_feature(&mut cpuid, f.name, true);
        }
        HostCpu {
            cpuid,
            arch_capabilities: u64::MAX,
            tsc_deadline: true,
        }
    }

    /// The host's vendor.
    pub fn vendor(&self) -> Option<Vendor> {
        build::vendor_of(&self.cpuid)
    }
}

/// A model resolved against a host: what the guest's CPU will be.
#[derive(Clone, Debug)]
pub struct CpuModel {
    /// The model's name (`host`, `x86-64-v3`, `Skylake-Server-v1`, `template`).
    pub name: String,
    /// What the user asked for.
    pub requested: String,
    /// The vendor id the guest sees.
    pub vendor: String,
    /// Family.
    pub family: u32,
    /// Model.
    pub model: u32,
    /// Stepping.
    pub stepping: u32,
    /// Brand string.
    pub brand: String,
    /// The model's own features after `+`/`-`, sorted.
    pub features: Vec<&'static str>,
    /// Model features the host cannot provide.
    pub host_missing: Vec<&'static str>,
    /// Model features ember hides on every host.
    pub hidden: Vec<&'static str>,
    /// What the guest is given: features less missing and hidden.
    pub guest: Vec<&'static str>,
    /// `enforce` or `check`.
    pub mode: Mode,
    base: Base,
}

/// The names of ember's masked features, as QEMU names them.
pub fn masked_names() -> Vec<&'static str> {
    crate::cpuid::MASKED_FEATURES
        .iter()
        .filter_map(|m| features::at_cpuid(m.leaf, m.subleaf, m.reg, m.bit))
        .map(|f| f.name)
        .collect()
}

#[cfg(test)]
mod tests;

/// Resolves `spec` on `host`. With `enforce`, a model feature the host
/// cannot provide is [`ModelError::HostMissing`], naming every one.
pub fn resolve(spec: &CpuSpec, host: &HostCpu) -> Result<CpuModel, ModelError> {
    let mut set: BTreeSet<&'static str> = match &spec.base {
        Base::Host => host.features().into_iter().collect(),
        Base::Level(l) => abi_level_features(*l).into_iter().collect(),
        Base::Named(m) => m
            .feature_names()
            .filter_map(features::find)
            .map(|f| f.name)
            .collect(),
        Base::Template(t) => {
            let entries = t.apply_cpuid(&host.cpuid)?;
            let probe = HostCpu {
                cpuid: entries,
                arch_capabilities: 0,
                tsc_deadline: host.tsc_deadline,
            };
            probe
                .features()
                .into_iter()
                .filter(|n| {
                    !matches!(
                        features::find(n).map(|f| f.location),
                        Some(Location::Msr { .. })
                    )
                })
                .collect()
        }
    };
    if matches!(spec.base, Base::Named(_) | Base::Level(_)) {
        kvm_defaults(&mut set);
    }
    set.extend(spec.add.iter().copied());
    for r in &spec.remove {
        set.remove(r);
    }
    let by_name = |n: &str| features::find(n).expect("names in the set are known");
    let host_missing: Vec<_> = set
        .iter()
        .copied()
        .filter(|n| !host.has(by_name(n)))
        .collect();
    if spec.mode == Mode::Enforce && !host_missing.is_empty() {
        return Err(ModelError::HostMissing {
            model: spec.model_name(),
            missing: host_missing,
        });
    }
    let masked = masked_names();
    let hidden: Vec<_> = set
        .iter()
        .copied()
        .filter(|n| masked.contains(n) && !host_missing.contains(n))
        .collect();
    let guest: Vec<_> = set
        .iter()
        .copied()
        .filter(|n| !host_missing.contains(n) && !hidden.contains(n))
        .collect();
    let host_id = build::identity(&host.cpuid);
    let (vendor, family, model, stepping, brand) = match &spec.base {
        Base::Named(m) => (
            m.vendor.id().to_string(),
            m.family,
            m.model,
            m.stepping,
            m.brand.to_string(),
        ),
        _ => host_id,
    };
    Ok(CpuModel {
        name: spec.model_name(),
        requested: spec.text.clone(),
        vendor,
        family,
        model,
        stepping,
        brand,
        features: set.into_iter().collect(),
        host_missing,
        hidden,
        guest,
        mode: spec.mode,
        base: spec.base.clone(),
    })
}

impl CpuModel {
    /// The CPUID every vCPU starts from (before the per-vCPU topology and
    /// ember's masks, [`crate::cpuid::normalize`]).
    pub fn cpuid(&self, host: &HostCpu) -> Result<Vec<kvm_cpuid_entry2>, ModelError> {
        match &self.base {
            Base::Host => Ok(host.cpuid.clone()),
            Base::Template(t) => {
                let mut e = t.apply_cpuid(&host.cpuid)?;
                // `check`: what the host cannot give is dropped.
                for n in &self.host_missing {
                    build::set_feature(&mut e, n, false);
                }
                for n in &self.features {
                    if !self.host_missing.contains(n) {
                        build::set_feature(&mut e, n, true);
                    }
                }
                Ok(e)
            }
            Base::Level(_) => Ok(build::with_features(&host.cpuid, &self.guest, None)),
            Base::Named(m) => Ok(build::with_features(&host.cpuid, &self.guest, Some(m))),
        }
    }

    /// MSR values the vCPUs get at boot, as (index, value) — after
    /// `read(index)` gives the value KVM set by default.
    pub fn msrs(&self, host: &HostCpu, read: impl Fn(u32) -> Option<u64>) -> Vec<(u32, u64)> {
        match &self.base {
            Base::Host => Vec::new(),
            Base::Template(t) => t.apply_msrs(read),
            // KVM takes the MSR only when the guest's CPUID says it exists.
            Base::Level(_) | Base::Named(_) if self.guest.contains(&"arch-capabilities") => {
                let mut v = 0u64;
                for n in &self.guest {
                    if let Some(Location::Msr { bit, .. }) = features::find(n).map(|f| f.location) {
                        v |= 1 << bit;
                    }
                }
                vec![(features::MSR_ARCH_CAPABILITIES, v & host.arch_capabilities)]
            }
            Base::Level(_) | Base::Named(_) => Vec::new(),
        }
    }

    /// The named model's definition, if it is one.
    pub fn definition(&self) -> Option<&'static ModelDef> {
        match self.base {
            Base::Named(m) => Some(m),
            _ => None,
        }
    }
}
