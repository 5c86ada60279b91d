//! The guest's CPU: the model chosen in the configuration resolved against
//! this host's KVM (before anything is created), the CPUID and MSRs each
//! vCPU gets, the fingerprint a snapshot carries, and `ember cpu`.

use ember_vcpu::model::fingerprint::CpuFingerprint;
use ember_vcpu::model::{self, features, CpuModel, CpuSpec, HostCpu, Mode};
use kvm_bindings::{kvm_cpuid_entry2, kvm_msr_entry, Msrs};
use kvm_ioctls::Cap;
use serde_json::{json, Value};

use crate::config::CpuChoice;
use crate::vm::Hypervisor;
use crate::{Error, Result};

/// Test hook: feature names (comma-separated) treated as missing on this
/// host, to play a weaker migration or restore destination.
pub const TEST_REMOVE_ENV: &str = "EMBER_TEST_HOST_CPU_REMOVE";

/// Where the bits a host forces on every guest are read from.
#[derive(Clone, Copy)]
pub enum Probe<'a> {
    /// Nowhere: KVM's supported CPUID as it is (the `host` model needs
    /// nothing more).
    None,
    /// A throw-away VM and vCPU.
    NewVcpu,
    /// A vCPU of the VM being built, before its CPUID is set for good.
    Vcpu(&'a ember_vcpu::Vcpu),
}

/// What this host's KVM can give a guest: `KVM_GET_SUPPORTED_CPUID`, the
/// TSC deadline timer capability, KVM's `IA32_ARCH_CAPABILITIES` feature
/// MSR, and the bits the host shows every guest whatever its CPUID says
/// (read back through `probe`; PVM hosts pass their own leaf 1 and leaf 7
/// bits through, and their supported CPUID omits them: a guest runs those
/// natively, so the host provides them; a normal KVM host adds nothing).
pub fn host_cpu(hv: &Hypervisor, probe: Probe<'_>) -> Result<HostCpu> {
    let arch_capabilities = hv
        .kvm
        .get_msr_feature_index_list()
        .ok()
        .filter(|l| l.as_slice().contains(&features::MSR_ARCH_CAPABILITIES))
        .and_then(|_| {
            let mut m = Msrs::from_entries(&[kvm_msr_entry {
                index: features::MSR_ARCH_CAPABILITIES,
                ..Default::default()
            }])
            .ok()?;
            match hv.kvm.get_msrs(&mut m) {
                Ok(1) => Some(m.as_slice()[0].data),
                _ => None,
            }
        })
        .unwrap_or(0);
    let mut cpuid = hv.supported_cpuid.as_slice().to_vec();
    let effective = match probe {
        Probe::None => None,
        Probe::NewVcpu => probe_new_vcpu(hv),
        Probe::Vcpu(vcpu) => vcpu
            .set_cpuid(hv.supported_cpuid.as_slice(), 1)
            .and_then(|_| vcpu.effective_cpuid())
            .map_err(|e| log::debug!("CPUID probe: {e}"))
            .ok(),
    };
    if let Some(effective) = effective {
        let before = model::fingerprint::named_features(&cpuid);
        for name in model::fingerprint::named_features(&effective) {
            if !before.contains(&name) {
                model::set_feature(&mut cpuid, name, true);
            }
        }
    }
    let host = HostCpu {
        cpuid,
        arch_capabilities,
        tsc_deadline: hv.kvm.check_extension(Cap::TscDeadlineTimer),
    };
    match std::env::var(TEST_REMOVE_ENV) {
        Ok(list) if !list.trim().is_empty() => {
            let names: Vec<&str> = list.split(',').map(str::trim).collect();
            log::info!(
                "{TEST_REMOVE_ENV}: playing a host without {}",
                names.join(" ")
            );
            host.without(&names).map_err(Error::Cpu)
        }
        _ => Ok(host),
    }
}

/// The CPUID a throw-away vCPU really has after being given the supported
/// one.
fn probe_new_vcpu(hv: &Hypervisor) -> Option<Vec<kvm_cpuid_entry2>> {
    let probe = || -> std::result::Result<Vec<kvm_cpuid_entry2>, kvm_ioctls::Error> {
        let vm = hv.kvm.create_vm()?;
        let vcpu = vm.create_vcpu(0)?;
        vcpu.set_cpuid2(&hv.supported_cpuid)?;
        Ok(vcpu
            .get_cpuid2(kvm_bindings::KVM_MAX_CPUID_ENTRIES)?
            .as_slice()
            .to_vec())
    };
    probe().map_err(|e| log::debug!("CPUID probe: {e}")).ok()
}

/// The guest CPU of a VM being built.
#[derive(Clone, Debug)]
pub struct GuestCpu {
    /// The resolved model.
    pub model: CpuModel,
    /// The host it was resolved on.
    pub host: HostCpu,
    /// The CPUID every vCPU starts from.
    pub base: Vec<kvm_cpuid_entry2>,
    /// What the configuration said.
    pub choice: CpuChoice,
}

impl GuestCpu {
    /// Resolves `choice` on this host: with `enforce`, a feature the host
    /// cannot provide fails here, before anything is created.
    pub fn resolve(hv: &Hypervisor, choice: &CpuChoice) -> Result<Self> {
        let spec = choice.spec().map_err(Error::Cpu)?;
        // `host` is KVM's supported CPUID as it is; a model is checked
        // against everything the host provides.
        let probe = match spec.base {
            model::Base::Host => Probe::None,
            _ => Probe::NewVcpu,
        };
        let host = host_cpu(hv, probe)?;
        for cap in template_caps(&spec)? {
            if hv.kvm.check_extension_raw(u64::from(cap)) <= 0 {
                return Err(Error::Cpu(model::ModelError::Template(format!(
                    "the template requires KVM capability {cap}, which this host lacks"
                ))));
            }
        }
        let model = model::resolve(&spec, &host).map_err(Error::Cpu)?;
        if !model.host_missing.is_empty() && model.mode == Mode::Check {
            log::warn!(
                "CPU model {}: this host cannot provide {}; the guest goes without (check)",
                model.name,
                model.host_missing.join(" ")
            );
        }
        if model.name != "host" {
            log::info!(
                "CPU model {} ({} family {} model {} stepping {}, {:?}): {} features{}",
                model.name,
                model.vendor,
                model.family,
                model.model,
                model.stepping,
                model.brand,
                model.guest.len(),
                if model.hidden.is_empty() {
                    String::new()
                } else {
                    format!(
                        "; hidden by ember on every host: {}",
                        model.hidden.join(" ")
                    )
                }
            );
        }
        let base = model.cpuid(&host).map_err(Error::Cpu)?;
        Ok(GuestCpu {
            model,
            host,
            base,
            choice: choice.clone(),
        })
    }

    /// Sets the model's MSRs on vCPU `index` (after its boot MSRs). A
    /// template's MSR the host refuses is an error; a named model's
    /// `IA32_ARCH_CAPABILITIES` the host refuses is reported (vCPU 0) and
    /// the guest reads the host's value.
    pub fn apply_msrs(&self, vcpu: &ember_vcpu::Vcpu, index: u8) -> Result<()> {
        for (msr, value) in self.model.msrs(&self.host, |i| vcpu.msr(i)) {
            match vcpu.set_msrs(&[(msr, value)]) {
                Ok(()) => {}
                Err(e) if self.choice.template.is_none() => {
                    if index == 0 {
                        log::warn!(
                            "CPU model {}: this host does not let ember set MSR {msr:#x} to {value:#x} ({e}): the guest reads the host's value",
                            self.model.name
                        );
                    }
                }
                Err(e) => return Err(Error::Vcpu(e)),
            }
        }
        Ok(())
    }

    /// Warns about what the host shows the guest regardless of the model
    /// (`effective` is vCPU 0's `KVM_GET_CPUID2`): hosts such as PVM force
    /// their own identity or feature bits.
    pub fn report_forced(&self, effective: &[kvm_cpuid_entry2]) {
        if self.model.name == "host" {
            return;
        }
        let (vendor, family, model_no, stepping, brand) = model::identity(effective);
        let m = &self.model;
        let mut forced = Vec::new();
        if vendor != m.vendor {
            forced.push(format!("vendor {vendor} (model: {})", m.vendor));
        }
        if (family, model_no, stepping) != (m.family, m.model, m.stepping) {
            forced.push(format!(
                "family/model/stepping {family}/{model_no}/{stepping} (model: {}/{}/{})",
                m.family, m.model, m.stepping
            ));
        }
        if brand != m.brand {
            forced.push(format!("brand {brand:?} (model: {:?})", m.brand));
        }
        let seen = model::fingerprint::named_features(effective);
        let extra: Vec<_> = seen
            .iter()
            .filter(|n| !m.guest.contains(n) && !matches!(**n, "ht" | "cmp-legacy"))
            .copied()
            .collect();
        if !extra.is_empty() {
            forced.push(format!("features {}", extra.join(" ")));
        }
        if !forced.is_empty() {
            log::warn!(
                "CPU model {}: this host shows the guest its own {} regardless",
                m.name,
                forced.join(", ")
            );
        }
    }
}

fn template_caps(spec: &CpuSpec) -> Result<Vec<u32>> {
    match &spec.base {
        model::Base::Template(t) => t.required_capabilities().map_err(Error::Cpu),
        _ => Ok(Vec::new()),
    }
}

/// Checks a saved guest's fingerprint against this host before a restore:
/// refuses with every missing feature; reports a TSC rate it cannot keep.
/// Returns the TSC rate to give each vCPU, when this host can scale it.
pub fn check_fingerprint(
    hv: &Hypervisor,
    fp: &CpuFingerprint,
    vcpu: &ember_vcpu::Vcpu,
) -> Result<Option<u32>> {
    let host = host_cpu(hv, Probe::Vcpu(vcpu))?;
    fp.check(&host).map_err(Error::CpuMismatch)?;
    let scaling = hv.kvm.check_extension(Cap::TscControl);
    match fp.tsc_note(vcpu.tsc_khz(), scaling) {
        Some(note) => {
            log::warn!("{note}");
            Ok(fp.tsc_khz.filter(|_| scaling))
        }
        None => Ok(None),
    }
}

fn model_json(m: &CpuModel, cpuid: &[kvm_cpuid_entry2]) -> Value {
    let def = m.definition();
    let leaves: Vec<Value> = cpuid
        .iter()
        .map(|e| {
            json!({
                "leaf": format!("{:#x}", e.function),
                "subleaf": format!("{:#x}", e.index),
                "eax": format!("{:#010x}", e.eax),
                "ebx": format!("{:#010x}", e.ebx),
                "ecx": format!("{:#010x}", e.ecx),
                "edx": format!("{:#010x}", e.edx),
            })
        })
        .collect();
    json!({
        "model": m.name,
        "requested": m.requested,
        "aliases": def.map(|d| d.aliases.to_vec()).unwrap_or_default(),
        "vendor": m.vendor,
        "family": m.family,
        "model_number": m.model,
        "stepping": m.stepping,
        "brand": m.brand,
        "level": def.map(|d| d.level),
        "xlevel": def.map(|d| d.xlevel),
        "mode": m.mode,
        "features": m.features,
        "host_missing": m.host_missing,
        "hidden": m.hidden,
        "guest_features": m.guest,
        "cpuid": leaves,
    })
}

/// `ember cpu list`: every model, and whether this host runs it.
pub fn list(hv: &Hypervisor, as_json: bool) -> Result<String> {
    let host = host_cpu(hv, Probe::NewVcpu)?;
    let mut rows = Vec::new();
    for name in model::model_names() {
        let spec = CpuSpec::parse(&format!("{name},check")).map_err(Error::Cpu)?;
        let m = model::resolve(&spec, &host).map_err(Error::Cpu)?;
        rows.push((name, m));
    }
    if as_json {
        let v: Vec<Value> = rows
            .iter()
            .map(|(name, m)| {
                json!({
                    "name": name,
                    "aliases": m.definition().map(|d| d.aliases.to_vec()).unwrap_or_default(),
                    "vendor": m.vendor,
                    "host_can_run": m.host_missing.is_empty(),
                    "host_missing": m.host_missing,
                })
            })
            .collect();
        return Ok(serde_json::to_string_pretty(&v).unwrap_or_default());
    }
    let mut out = String::new();
    for (name, m) in rows {
        let alias = m
            .definition()
            .map(|d| d.aliases.join(" "))
            .unwrap_or_default();
        let verdict = if m.host_missing.is_empty() {
            "runs here".to_string()
        } else {
            format!("host lacks {}", m.host_missing.join(" "))
        };
        out.push_str(&format!(
            "{name:<24} {alias:<26} {:<13} {verdict}\n",
            m.vendor
        ));
    }
    Ok(out)
}

/// `ember cpu show SPEC`: what a guest would get here.
pub fn show(hv: &Hypervisor, text: &str, as_json: bool) -> Result<String> {
    let host = host_cpu(hv, Probe::NewVcpu)?;
    let mut spec = CpuSpec::parse(text).map_err(Error::Cpu)?;
    // Show a model the host cannot run too, with what it lacks.
    spec.mode = Mode::Check;
    let m = model::resolve(&spec, &host).map_err(Error::Cpu)?;
    let cpuid = ember_vcpu::cpuid::normalize(&m.cpuid(&host).map_err(Error::Cpu)?, 0, 1);
    if as_json {
        return Ok(serde_json::to_string_pretty(&model_json(&m, &cpuid)).unwrap_or_default());
    }
    let mut out = format!(
        "model       {}\nvendor      {}\nfamily      {} model {} stepping {}\nbrand       {}\nfeatures    {}\n",
        m.name,
        m.vendor,
        m.family,
        m.model,
        m.stepping,
        m.brand,
        m.features.join(" ")
    );
    out.push_str(&format!("host lacks  {}\n", m.host_missing.join(" ")));
    out.push_str(&format!("hidden      {}\n", m.hidden.join(" ")));
    out.push_str(&format!(
        "guest gets  {}\ncpuid (vCPU 0 of 1):\n",
        m.guest.join(" ")
    ));
    for e in cpuid {
        out.push_str(&format!(
            "  {:#010x}.{:<2} eax={:08x} ebx={:08x} ecx={:08x} edx={:08x}\n",
            e.function, e.index, e.eax, e.ebx, e.ecx, e.edx
        ));
    }
    Ok(out)
}

/// `ember cpu features`: every feature name ember knows, and where it lives.
pub fn feature_list(as_json: bool) -> String {
    use features::Location;
    let reg = |r: model::Reg| format!("{r:?}").to_lowercase();
    if as_json {
        let v: Vec<Value> = features::FEATURES
            .iter()
            .map(|f| match f.location {
                Location::Cpuid {
                    leaf,
                    subleaf,
                    reg: r,
                    bit,
                } => json!({"name": f.name, "cpuid": {"leaf": leaf, "subleaf": subleaf, "reg": reg(r), "bit": bit}}),
                Location::Msr { index, bit } => {
                    json!({"name": f.name, "msr": {"index": index, "bit": bit}})
                }
            })
            .collect();
        return serde_json::to_string_pretty(&v).unwrap_or_default();
    }
    features::FEATURES
        .iter()
        .map(|f| match f.location {
            Location::Cpuid {
                leaf,
                subleaf,
                reg: r,
                bit,
            } => format!(
                "{:<26} CPUID {leaf:#x}.{subleaf} {}[{bit}]\n",
                f.name,
                reg(r)
            ),
            Location::Msr { index, bit } => format!("{:<26} MSR {index:#x}[{bit}]\n", f.name),
        })
        .collect()
}
