//! The guest CPU's fingerprint: a compact, versioned description of what
//! the guest was given (model, identity, features, the CPUID words they
//! come from, TSC frequency), saved with snapshots and sent first in a
//! migration, so a destination refuses a guest it cannot run before
//! anything moves.

use kvm_bindings::kvm_cpuid_entry2;
use serde::{Deserialize, Serialize};

use super::features::{self, Location};
use super::{build, CpuModel, HostCpu, Reg};

/// Layout version of [`CpuFingerprint`].
pub const FINGERPRINT_VERSION: u32 = 1;

/// One CPUID register the guest saw.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FeatureWord {
    /// Leaf.
    pub leaf: u32,
    /// Subleaf.
    pub subleaf: u32,
    /// Register: `eax`, `ebx`, `ecx`, `edx`.
    pub reg: String,
    /// Its value.
    pub value: u32,
}

/// What a guest's CPU is, for deciding where it may run.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CpuFingerprint {
    /// [`FINGERPRINT_VERSION`].
    pub version: u32,
    /// The model (`host`, `x86-64-v3`, `EPYC-Rome-v1`, ...).
    pub model: String,
    /// Vendor id.
    pub vendor: String,
    /// Family.
    pub family: u32,
    /// Model number.
    pub model_number: u32,
    /// Stepping.
    pub stepping: u32,
    /// The features the guest was given (the model's, and any other the
    /// guest really saw that ember does not hide), QEMU's names.
    pub features: Vec<String>,
    /// Features the source host showed the guest though ember hid them
    /// (hosts that force CPUID bits, such as PVM).
    pub forced: Vec<String>,
    /// The feature words of the CPUID the guest saw.
    pub words: Vec<FeatureWord>,
    /// The guest's TSC frequency, when KVM reports it.
    pub tsc_khz: Option<u32>,
}

/// Why a destination refuses a guest.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FingerprintError {
    /// A fingerprint layout this ember does not read.
    #[error("CPU fingerprint version {0}; this ember reads version {FINGERPRINT_VERSION}")]
    Version(u32),
    /// Features the destination cannot provide.
    #[error(
        "this host cannot provide {} CPU feature(s) the guest (CPU model {model}) uses: {}",
        .missing.len(), .missing.join(" ")
    )]
    Missing {
        /// The guest's model.
        model: String,
        /// Every missing feature.
        missing: Vec<String>,
    },
}

fn reg_name(r: Reg) -> &'static str {
    match r {
        Reg::Eax => "eax",
        Reg::Ebx => "ebx",
        Reg::Ecx => "ecx",
        Reg::Edx => "edx",
    }
}

/// The named features set in `cpuid`.
pub fn named_features(cpuid: &[kvm_cpuid_entry2]) -> Vec<&'static str> {
    features::FEATURES
        .iter()
        .filter(|f| match f.location {
            Location::Cpuid {
                leaf,
                subleaf,
                reg,
                bit,
            } => build::bit_set(cpuid, leaf, subleaf, reg, bit),
            Location::Msr { .. } => false,
        })
        .map(|f| f.name)
        .collect()
}

impl CpuFingerprint {
    /// The fingerprint of a guest given `model`, whose vCPU 0 really has
    /// `effective` (`KVM_GET_CPUID2`).
    pub fn new(model: &CpuModel, effective: &[kvm_cpuid_entry2], tsc_khz: Option<u32>) -> Self {
        let masked = super::masked_names();
        // Topology bits are ember's to set on any host.
        let seen: Vec<&str> = named_features(effective)
            .into_iter()
            .filter(|n| !matches!(*n, "ht" | "cmp-legacy"))
            .collect();
        // What the guest was given: the model's features, and whatever
        // else it really sees that ember does not hide (a host may add
        // its own).
        let mut given: Vec<String> = model
            .guest
            .iter()
            .chain(seen.iter().filter(|n| !masked.contains(n)))
            .map(|s| s.to_string())
            .collect();
        given.sort();
        given.dedup();
        let forced = seen
            .iter()
            .filter(|n| masked.contains(n))
            .map(|n| n.to_string())
            .collect();
        let mut words = Vec::new();
        for f in features::FEATURES {
            if let Location::Cpuid {
                leaf, subleaf, reg, ..
            } = f.location
            {
                if words.iter().any(|w: &FeatureWord| {
                    w.leaf == leaf && w.subleaf == subleaf && w.reg == reg_name(reg)
                }) {
                    continue;
                }
                let value = (0..32)
                    .filter(|&b| build::bit_set(effective, leaf, subleaf, reg, b))
                    .fold(0u32, |v, b| v | 1 << b);
                words.push(FeatureWord {
                    leaf,
                    subleaf,
                    reg: reg_name(reg).into(),
                    value,
                });
            }
        }
        CpuFingerprint {
            version: FINGERPRINT_VERSION,
            model: model.name.clone(),
            vendor: model.vendor.clone(),
            family: model.family,
            model_number: model.model,
            stepping: model.stepping,
            features: given,
            forced,
            words,
            tsc_khz,
        }
    }

    /// Checks that `host` can run this guest: every feature it was given
    /// or shown must be available.
    pub fn check(&self, host: &HostCpu) -> Result<(), FingerprintError> {
        if self.version != FINGERPRINT_VERSION {
            return Err(FingerprintError::Version(self.version));
        }
        let mut missing: Vec<String> = Vec::new();
        for n in self.features.iter().chain(&self.forced) {
            let ok = features::find(n).is_some_and(|f| host.has(f));
            if !ok && !missing.contains(n) {
                missing.push(n.clone());
            }
        }
        if missing.is_empty() {
            Ok(())
        } else {
            Err(FingerprintError::Missing {
                model: self.model.clone(),
                missing,
            })
        }
    }

    /// What to report about the TSC on a host whose vCPUs tick at
    /// `host_khz` and that can (`scaling`) or cannot scale the TSC.
    pub fn tsc_note(&self, host_khz: Option<u32>, scaling: bool) -> Option<String> {
        let (want, have) = (self.tsc_khz?, host_khz?);
        // KVM tolerates 250 ppm without scaling.
        if u64::from(want.abs_diff(have)) * 4000 <= u64::from(want) {
            return None;
        }
        Some(if scaling {
            format!("the guest's TSC runs at {want} kHz; this host's at {have} kHz: scaled")
        } else {
            format!(
                "the guest's TSC ran at {want} kHz; this host's runs at {have} kHz and it cannot scale the TSC (no KVM_CAP_TSC_CONTROL): the guest's TSC rate changes"
            )
        })
    }
}
