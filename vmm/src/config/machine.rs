//! `[machine]`: vCPUs and memory.

use serde::Deserialize;

use super::ConfigError;

/// Most vCPUs Ember gives a guest: APIC ids 0..=253 (the MP table's limit).
pub const MAX_VCPUS: u8 = ember_loader::mptable::MAX_CPUS;
/// Default number of vCPUs.
pub const DEFAULT_VCPUS: u8 = 1;
/// Default guest memory in MiB.
pub const DEFAULT_MEMORY_MIB: u64 = 128;

/// The `[machine]` table.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct MachineConfig {
    /// Number of vCPUs, 1 to [`MAX_VCPUS`] (and at most what KVM allows).
    #[serde(default = "default_vcpus")]
    pub vcpus: u64,
    /// Guest RAM in MiB.
    #[serde(default = "default_memory_mib")]
    pub memory_mib: u64,
    /// Track the pages the guest and ember write (KVM's dirty log and
    /// ember's bitmap), so diff snapshots hold only what changed.
    #[serde(default)]
    pub track_dirty_pages: bool,
    /// The CPU model, QEMU's `-cpu` syntax:
    /// `MODEL[,+FEATURE][,-FEATURE][,enforce|,check]` (`host` when absent;
    /// `ember cpu list` lists the models).
    #[serde(default)]
    pub cpu: Option<String>,
    /// A Firecracker custom CPU template (`PUT /cpu-config`, the config
    /// file's `cpu-config`); in TOML, `cpu = "FILE.json"` names one.
    #[serde(skip)]
    pub cpu_template: Option<ember_vcpu::model::CustomTemplate>,
    /// Guest memory in a memfd mapped shared (`--memory size=MIB,shared=on`)
    /// instead of anonymous private memory: a local live migration hands
    /// the file to the destination instead of copying pages.
    #[serde(default)]
    pub shared: bool,
    /// Back guest memory with hugetlbfs pages (a memfd with
    /// `MFD_HUGETLB`), reserved when the VM is built.
    #[serde(default)]
    pub hugepages: bool,
    /// Their size: `2M` (the default) or `1G`.
    #[serde(default)]
    pub hugepage_size: Option<String>,
    /// Ask for transparent huge pages (`MADV_HUGEPAGE`).
    #[serde(default)]
    pub thp: bool,
    /// Touch all guest memory before the guest runs (`MADV_POPULATE_WRITE`).
    #[serde(default)]
    pub prefault: bool,
    /// Let KSM merge identical guest pages (`MADV_MERGEABLE`).
    #[serde(default)]
    pub mergeable: bool,
    /// vCPU threads pinned to host CPUs: `0=2,1=3`.
    #[serde(default)]
    pub vcpu_affinity: Option<String>,
    /// How the virtio devices reach the guest: `pci` or `mmio`; when
    /// absent, `mmio` if the command line says `pci=off` (as Firecracker's
    /// and Kata's guests do), else `pci`.
    #[serde(default)]
    pub transport: Option<Transport>,
}

/// The bus every virtio device of a VM is on.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Transport {
    /// Modern virtio-pci functions on the PCI bus (MSI-X interrupts).
    #[default]
    Pci,
    /// virtio-mmio register windows announced on the command line or in
    /// the DSDT (one IOAPIC line each).
    Mmio,
}

impl std::str::FromStr for Transport {
    type Err = ConfigError;

    fn from_str(s: &str) -> Result<Self, ConfigError> {
        match s {
            "pci" => Ok(Transport::Pci),
            "mmio" => Ok(Transport::Mmio),
            _ => Err(ConfigError::Transport(format!(
                "`{s}` is not a transport (pci or mmio)"
            ))),
        }
    }
}

impl std::fmt::Display for Transport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Transport::Pci => "pci",
            Transport::Mmio => "mmio",
        })
    }
}

/// Whether `cmdline` turns the guest's PCI off (`pci=off`).
pub fn pci_off(cmdline: &str) -> bool {
    cmdline
        .split_whitespace()
        .take_while(|w| *w != "--")
        .any(|w| w == "pci=off")
}

impl MachineConfig {
    /// The transport for a guest booted with `cmdline` (see
    /// [`MachineConfig::transport`]); `pci` with `pci=off` is refused.
    pub fn resolve_transport(&self, cmdline: &str) -> Result<Transport, ConfigError> {
        match (self.transport, pci_off(cmdline)) {
            (None, off) => Ok(if off { Transport::Mmio } else { Transport::Pci }),
            (Some(Transport::Pci), true) => Err(ConfigError::Transport(
                "transport = pci, but the command line's pci=off hides every PCI device from the guest (use transport = mmio, or drop pci=off)".into(),
            )),
            (Some(t), _) => Ok(t),
        }
    }
}

/// A huge page size for `hugepages=on`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum HugePageSize {
    /// 2 MiB.
    Size2M,
    /// 1 GiB.
    Size1G,
}

impl HugePageSize {
    /// Parses `2M` or `1G`.
    pub fn parse(text: &str) -> Option<Self> {
        match text {
            "2M" | "2m" | "2MiB" | "2048K" => Some(HugePageSize::Size2M),
            "1G" | "1g" | "1GiB" => Some(HugePageSize::Size1G),
            _ => None,
        }
    }

    /// Bytes per page.
    pub fn bytes(self) -> u64 {
        match self {
            HugePageSize::Size2M => 2 << 20,
            HugePageSize::Size1G => 1 << 30,
        }
    }
}

/// How guest memory is backed (also saved with a snapshot's machine).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MemoryBackend {
    /// In a memfd mapped shared.
    pub shared: bool,
    /// hugetlbfs pages of this size.
    pub hugepages: Option<HugePageSize>,
    /// `MADV_HUGEPAGE`.
    pub thp: bool,
    /// Populated before the guest runs.
    pub prefault: bool,
    /// `MADV_MERGEABLE`.
    pub mergeable: bool,
}

/// `--memory MIB` or `--memory size=MIB[,shared=on][,hugepages=on][,hugepage_size=2M|1G][,thp=on][,prefault=on][,mergeable=on]`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MemoryFlag {
    /// `size`.
    pub size_mib: Option<u64>,
    /// `shared`.
    pub shared: Option<bool>,
    /// `hugepages`.
    pub hugepages: Option<bool>,
    /// `hugepage_size`.
    pub hugepage_size: Option<String>,
    /// `thp`.
    pub thp: Option<bool>,
    /// `prefault`.
    pub prefault: Option<bool>,
    /// `mergeable`.
    pub mergeable: Option<bool>,
}

impl MemoryFlag {
    /// Parses the flag's value.
    pub fn parse(flag: &str) -> Result<Self, ConfigError> {
        let bad = |why: String| ConfigError::MemoryFlag {
            flag: flag.to_string(),
            why,
        };
        if let Ok(mib) = flag.parse::<u64>() {
            return Ok(MemoryFlag {
                size_mib: Some(mib),
                ..Default::default()
            });
        }
        let mut out = MemoryFlag::default();
        for part in flag.split(',') {
            let (k, v) = part
                .split_once('=')
                .ok_or_else(|| bad(format!("{part:?} is not KEY=VALUE")))?;
            match k {
                "size" => {
                    out.size_mib = Some(
                        v.parse()
                            .map_err(|_| bad(format!("size {v:?} is not a number of MiB")))?,
                    )
                }
                "hugepage_size" => {
                    HugePageSize::parse(v)
                        .ok_or_else(|| bad(format!("hugepage_size={v}: expected 2M or 1G")))?;
                    out.hugepage_size = Some(v.to_string());
                }
                "shared" | "hugepages" | "thp" | "prefault" | "mergeable" => {
                    let on = match v {
                        "on" | "true" => true,
                        "off" | "false" => false,
                        _ => return Err(bad(format!("{k}={v}: expected on or off"))),
                    };
                    let slot = match k {
                        "shared" => &mut out.shared,
                        "hugepages" => &mut out.hugepages,
                        "thp" => &mut out.thp,
                        "prefault" => &mut out.prefault,
                        _ => &mut out.mergeable,
                    };
                    *slot = Some(on);
                }
                _ => {
                    return Err(bad(format!(
                        "unknown key {k:?} (size, shared, hugepages, hugepage_size, thp, prefault, mergeable)"
                    )))
                }
            }
        }
        Ok(out)
    }
}

/// The CPU a configuration asks for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CpuChoice {
    /// `machine.cpu` (`host` when not given).
    pub text: String,
    /// `cpu-config`, which is the model when given.
    pub template: Option<ember_vcpu::model::CustomTemplate>,
}

impl CpuChoice {
    /// The parsed choice.
    pub fn spec(&self) -> Result<ember_vcpu::model::CpuSpec, ember_vcpu::model::ModelError> {
        match &self.template {
            Some(t) => {
                t.validate()?;
                Ok(ember_vcpu::model::CpuSpec::template(t.clone()))
            }
            None => ember_vcpu::model::CpuSpec::parse(&self.text),
        }
    }
}

fn default_vcpus() -> u64 {
    u64::from(DEFAULT_VCPUS)
}

fn default_memory_mib() -> u64 {
    DEFAULT_MEMORY_MIB
}

impl Default for MachineConfig {
    fn default() -> Self {
        MachineConfig {
            vcpus: default_vcpus(),
            memory_mib: default_memory_mib(),
            track_dirty_pages: false,
            cpu: None,
            cpu_template: None,
            shared: false,
            hugepages: false,
            hugepage_size: None,
            thp: false,
            prefault: false,
            mergeable: false,
            vcpu_affinity: None,
            transport: None,
        }
    }
}

impl MachineConfig {
    /// Checks the values that can be checked without the host: the vCPU
    /// count range and the memory layout.
    pub fn validate(&self) -> Result<u8, ConfigError> {
        if self.cpu_template.is_some() && self.cpu.as_deref().is_some_and(|c| c != "host") {
            return Err(ConfigError::Cpu(ember_vcpu::model::ModelError::Template(
                format!(
                    "machine.cpu = {:?} and a custom CPU template are both given: choose one",
                    self.cpu.as_deref().unwrap_or("")
                ),
            )));
        }
        self.cpu_choice().spec().map_err(ConfigError::Cpu)?;
        let vcpus = u8::try_from(self.vcpus)
            .ok()
            .filter(|v| (1..=MAX_VCPUS).contains(v))
            .ok_or(ConfigError::Vcpus(self.vcpus))?;
        ember_memory::MemoryLayout::new(self.memory_mib).map_err(ConfigError::Memory)?;
        Ok(vcpus)
    }

    /// The memory backend the keys ask for, checked: a hugepage size only
    /// with hugepages, and huge pages of one kind (hugetlbfs or THP).
    pub fn memory_backend(&self) -> Result<MemoryBackend, ConfigError> {
        let bad = |why: &str| ConfigError::MemoryBackend(why.to_string());
        let size = match self.hugepage_size.as_deref() {
            Some(s) => Some(HugePageSize::parse(s).ok_or_else(|| {
                ConfigError::MemoryBackend(format!("hugepage_size = {s:?}: expected 2M or 1G"))
            })?),
            None => None,
        };
        if size.is_some() && !self.hugepages {
            return Err(bad("hugepage_size is given without hugepages=on"));
        }
        if self.hugepages && self.thp {
            return Err(bad(
                "hugepages=on and thp=on exclude each other: hugetlbfs pages are huge already",
            ));
        }
        if self.mergeable && (self.shared || self.hugepages) {
            return Err(bad(
                "mergeable=on needs private anonymous memory: KSM merges neither shared=on nor hugepages=on pages",
            ));
        }
        let hugepages = self.hugepages.then(|| size.unwrap_or(HugePageSize::Size2M));
        if let Some(h) = hugepages {
            let mib = h.bytes() >> 20;
            if self.memory_mib % mib != 0 {
                return Err(ConfigError::MemoryBackend(format!(
                    "memory_mib = {} is not a multiple of the {mib} MiB huge page",
                    self.memory_mib
                )));
            }
        }
        Ok(MemoryBackend {
            shared: self.shared,
            hugepages,
            thp: self.thp,
            prefault: self.prefault,
            mergeable: self.mergeable,
        })
    }

    /// A CPU template file named relative to the config file's directory.
    pub fn resolve_paths(&mut self, base: &std::path::Path) {
        if let Some(cpu) = &mut self.cpu {
            let (model, rest) = cpu.split_once(',').unwrap_or((cpu.as_str(), ""));
            let path = std::path::Path::new(model.trim());
            if model.trim().ends_with(".json") && path.is_relative() {
                let joined = base.join(path).display().to_string();
                *cpu = if rest.is_empty() {
                    joined
                } else {
                    format!("{joined},{rest}")
                };
            }
        }
    }

    /// The CPU asked for.
    pub fn cpu_choice(&self) -> CpuChoice {
        CpuChoice {
            text: self.cpu.clone().unwrap_or_else(|| "host".into()),
            template: self.cpu_template.clone(),
        }
    }
}
