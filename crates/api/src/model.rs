//! Firecracker's schemas (`definitions` in the spec) as serde types, with
//! the spec's field names. Request bodies refuse unknown fields; required
//! fields are required; optional ones are `Option` or take the spec's
//! default. `tests/spec.rs` checks every type here against the spec's
//! copy in `spec/firecracker.json`.

use std::collections::BTreeMap;

use serde::{Deserialize, Deserializer, Serialize};

/// `GET /`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InstanceInfo {
    /// The VMM's name.
    pub app_name: String,
    /// The instance's id (`--id`).
    pub id: String,
    /// `Not started`, `Running` or `Paused`.
    pub state: String,
    /// The VMM's version.
    pub vmm_version: String,
}

/// `GET /version`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FirecrackerVersion {
    /// The version.
    pub firecracker_version: String,
}

/// The spec's `Error`: the body of every 4xx and 5xx answer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Error {
    /// What went wrong.
    pub fault_message: String,
}

/// [`Error`] under the name this crate first gave it.
pub type ApiError = Error;

/// `PUT /cpu-config`: a custom CPU template, modifiers over the host's
/// CPUID and MSRs (the spec's `CpuConfig`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CpuConfig {
    /// KVM capabilities to require (`"121"`) or not (`"!121"`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub kvm_capabilities: Vec<String>,
    /// CPUID leaf modifiers.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub cpuid_modifiers: Vec<CpuidLeafModifier>,
    /// MSR modifiers.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub msr_modifiers: Vec<MsrModifier>,
    /// aarch64 register modifiers.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub reg_modifiers: Vec<MsrModifier>,
    /// aarch64 vCPU features.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub vcpu_features: Vec<VcpuFeatures>,
}

/// One CPUID leaf's modifiers.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CpuidLeafModifier {
    /// Leaf (hex, binary or decimal text).
    pub leaf: String,
    /// Subleaf.
    pub subleaf: String,
    /// KVM's flags for the leaf.
    pub flags: u32,
    /// Register modifiers.
    pub modifiers: Vec<CpuidRegisterModifier>,
}

/// A bitmap over one CPUID register.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CpuidRegisterModifier {
    /// `eax`..`edx`.
    pub register: String,
    /// `0b` and 32 of `0`, `1`, `x`.
    pub bitmap: String,
}

/// A bitmap over one register by address (an MSR; an aarch64 register).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MsrModifier {
    /// Address (hex, binary or decimal text).
    pub addr: String,
    /// `0b` and 64 of `0`, `1`, `x`.
    pub bitmap: String,
}

/// An aarch64 vCPU feature modifier.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VcpuFeatures {
    /// Feature index.
    pub index: i32,
    /// Bitmap.
    pub bitmap: String,
}

/// Firecracker's (deprecated) static CPU templates.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum CpuTemplate {
    /// Intel C3.
    C3,
    /// Intel T2.
    T2,
    /// Intel T2S.
    T2S,
    /// Intel T2CL.
    T2CL,
    /// AMD T2A.
    T2A,
    /// Arm V1N1.
    V1N1,
    /// No template (the spec's default).
    #[default]
    None,
}

/// Guest memory backing.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum HugePages {
    /// 4 KiB pages (the spec's default).
    #[default]
    None,
    /// 2 MiB hugetlbfs pages.
    #[serde(rename = "2M")]
    Hugetlbfs2M,
    /// Transparent huge pages.
    Transparent,
}

/// `PUT /machine-config`, and `GET`'s answer.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MachineConfiguration {
    /// vCPUs, 1 to 32.
    pub vcpu_count: u8,
    /// Guest memory in MiB.
    pub mem_size_mib: u64,
    /// Simultaneous multithreading.
    #[serde(default)]
    pub smt: bool,
    /// Dirty page tracking (for diff snapshots).
    #[serde(default)]
    pub track_dirty_pages: bool,
    /// A static CPU template.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_template: Option<CpuTemplate>,
    /// Huge pages.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub huge_pages: Option<HugePages>,
}

/// `PATCH /machine-config`: the fields to change.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MachineConfigurationUpdate {
    /// vCPUs, 1 to 32.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vcpu_count: Option<u8>,
    /// Guest memory in MiB.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mem_size_mib: Option<u64>,
    /// Simultaneous multithreading.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub smt: Option<bool>,
    /// Dirty page tracking.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub track_dirty_pages: Option<bool>,
    /// A static CPU template.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_template: Option<CpuTemplate>,
    /// Huge pages.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub huge_pages: Option<HugePages>,
}

/// `PUT /boot-source`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BootSource {
    /// The kernel image on the host.
    pub kernel_image_path: String,
    /// The kernel command line.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot_args: Option<String>,
    /// The initrd on the host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initrd_path: Option<String>,
}

/// A token bucket of a rate limiter.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenBucket {
    /// Bucket size in tokens.
    pub size: u64,
    /// Initial extra tokens.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub one_time_burst: Option<u64>,
    /// Milliseconds to refill the bucket.
    pub refill_time: u64,
}

/// A rate limiter: bandwidth and operations.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimiter {
    /// Bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bandwidth: Option<TokenBucket>,
    /// Operations.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ops: Option<TokenBucket>,
}

/// A drive's cache type.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum CacheType {
    /// Flushes are not passed on (the spec's default).
    #[default]
    Unsafe,
    /// Flushes reach the disk.
    Writeback,
}

/// A drive's I/O engine.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum IoEngine {
    /// Synchronous I/O (the spec's default).
    #[default]
    Sync,
    /// io_uring.
    Async,
}

/// `PUT /drives/{drive_id}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Drive {
    /// The drive's id.
    pub drive_id: String,
    /// The root device's partition UUID.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partuuid: Option<String>,
    /// Whether the guest boots from it.
    pub is_root_device: bool,
    /// Cache type; absent means [`CacheType::Unsafe`] (`unwrap_or_default`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache_type: Option<CacheType>,
    /// Read-only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub is_read_only: Option<bool>,
    /// The image on the host.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path_on_host: Option<String>,
    /// Rate limiter.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limiter: Option<RateLimiter>,
    /// I/O engine; absent means [`IoEngine::Sync`] (`unwrap_or_default`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub io_engine: Option<IoEngine>,
    /// A vhost-user backend's socket.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub socket: Option<String>,
}

/// `PATCH /drives/{drive_id}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PartialDrive {
    /// The drive's id.
    pub drive_id: String,
    /// A new image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path_on_host: Option<String>,
    /// A new rate limiter.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limiter: Option<RateLimiter>,
}

/// `PUT /network-interfaces/{iface_id}`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkInterface {
    /// The interface's id.
    pub iface_id: String,
    /// The host tap.
    pub host_dev_name: String,
    /// The guest's MAC.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guest_mac: Option<String>,
    /// The MTU advertised to the guest (68 to 65535).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u32>,
    /// Receive rate limiter.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rx_rate_limiter: Option<RateLimiter>,
    /// Transmit rate limiter.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tx_rate_limiter: Option<RateLimiter>,
}

/// `PATCH /network-interfaces/{iface_id}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PartialNetworkInterface {
    /// The interface's id.
    pub iface_id: String,
    /// Receive rate limiter.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rx_rate_limiter: Option<RateLimiter>,
    /// Transmit rate limiter.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tx_rate_limiter: Option<RateLimiter>,
}

/// `PUT /actions` action types.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ActionType {
    /// Write the metrics now.
    FlushMetrics,
    /// Start the microVM.
    InstanceStart,
    /// Press Ctrl-Alt-Del.
    SendCtrlAltDel,
}

/// `PUT /actions`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InstanceActionInfo {
    /// The action.
    pub action_type: ActionType,
}

/// `PATCH /vm` states.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum VmState {
    /// Pause the vCPUs and devices.
    Paused,
    /// Run again.
    Resumed,
}

/// `PATCH /vm`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Vm {
    /// The wanted state.
    pub state: VmState,
}

/// `snapshot_type` of `PUT /snapshot/create`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum SnapshotType {
    /// Every page of guest memory.
    #[default]
    Full,
    /// The pages dirtied since the last snapshot.
    Diff,
}

/// `PUT /snapshot/create`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotCreateParams {
    /// Where guest memory goes.
    pub mem_file_path: String,
    /// Where the VM state goes.
    pub snapshot_path: String,
    /// Full (default) or Diff.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub snapshot_type: Option<SnapshotType>,
}

/// `backend_type` of a [`MemoryBackend`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum MemoryBackendType {
    /// Map the memory file.
    File,
    /// A page-fault handler listening on a Unix socket serves guest memory.
    Uffd,
}

/// How `PUT /snapshot/load` gets guest memory.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MemoryBackend {
    /// File or Uffd.
    pub backend_type: MemoryBackendType,
    /// The memory file, or the handler's socket.
    pub backend_path: String,
}

/// A tap to use instead of the one the snapshot names.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetworkOverride {
    /// The interface.
    pub iface_id: String,
    /// Its new tap.
    pub host_dev_name: String,
}

/// A vsock socket path to use on restore.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VsockOverride {
    /// The new socket path.
    pub uds_path: String,
}

/// `PUT /snapshot/load`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotLoadParams {
    /// Deprecated name of `track_dirty_pages`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enable_diff_snapshots: Option<bool>,
    /// Track dirty pages (for diff snapshots of the restored VM).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub track_dirty_pages: Option<bool>,
    /// Deprecated: the memory file (instead of `mem_backend`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mem_file_path: Option<String>,
    /// How guest memory is loaded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mem_backend: Option<MemoryBackend>,
    /// The VM state file.
    pub snapshot_path: String,
    /// Resume once loaded.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resume_vm: Option<bool>,
    /// Taps to use instead of the snapshot's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network_overrides: Option<Vec<NetworkOverride>>,
    /// The vsock device's socket instead of the snapshot's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vsock_override: Option<VsockOverride>,
    /// Advance kvmclock by the time since the snapshot.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clock_realtime: Option<bool>,
    /// Huge pages for the restored VM (only `Snapshot`/`None` served).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub huge_pages: Option<String>,
}

/// A log level; the spec's values, any case (`Warn` too, as Firecracker
/// accepts it).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub enum LogLevel {
    /// Nothing.
    Off,
    /// Errors.
    Error,
    /// Warnings and above.
    Warning,
    /// Information and above.
    Info,
    /// Debugging and above.
    Debug,
    /// Everything.
    Trace,
}

impl LogLevel {
    /// Parses a level name, any case.
    pub fn parse(s: &str) -> Option<LogLevel> {
        Some(match s.to_ascii_lowercase().as_str() {
            "off" => LogLevel::Off,
            "error" => LogLevel::Error,
            "warning" | "warn" => LogLevel::Warning,
            "info" => LogLevel::Info,
            "debug" => LogLevel::Debug,
            "trace" => LogLevel::Trace,
            _ => return None,
        })
    }
}

impl<'de> Deserialize<'de> for LogLevel {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        LogLevel::parse(&s).ok_or_else(|| {
            serde::de::Error::custom(format!(
                "unknown level `{s}`, expected one of Error, Warning, Info, Debug, Trace, Off"
            ))
        })
    }
}

/// `PUT /logger`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Logger {
    /// The file or named pipe.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log_path: Option<String>,
    /// The level.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub level: Option<LogLevel>,
    /// Write the level on each line.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub show_level: Option<bool>,
    /// Write the origin (file and line) on each line.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub show_log_origin: Option<bool>,
    /// Only this module path.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub module: Option<String>,
}

/// `PUT /metrics`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Metrics {
    /// The file or named pipe.
    pub metrics_path: String,
    /// Write the instance id on each line.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub emit_id: Option<bool>,
    /// Operator-defined pairs written on each line.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub properties: Option<BTreeMap<String, String>>,
}

/// A section of [`FullVmConfiguration`] that the spec lists and ember does
/// not serve yet. It has no values: such a section is refused when it is
/// read (`null` is taken as absent, as Firecracker writes absent sections),
/// and never written.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum NotSupported {}

/// Reads a section ember does not serve: `null` is absent, anything else
/// an error naming the key and what it belongs to.
fn refuse<'de, D: Deserializer<'de>>(
    d: D,
    key: &str,
    feature: &str,
) -> Result<Option<NotSupported>, D::Error> {
    match Option::<serde::de::IgnoredAny>::deserialize(d)? {
        None => Ok(None),
        Some(_) => Err(serde::de::Error::custom(format!(
            "`{key}` is not supported by ember yet ({feature})"
        ))),
    }
}

macro_rules! refuse_section {
    ($($name:ident: $key:literal, $feature:literal;)*) => {$(
        fn $name<'de, D: Deserializer<'de>>(d: D) -> Result<Option<NotSupported>, D::Error> {
            refuse(d, $key, $feature)
        }
    )*};
}

refuse_section! {
    refuse_memory_hotplug: "memory-hotplug", "memory hotplug";
    refuse_mmds_config: "mmds-config", "MMDS";
    refuse_pmem: "pmem", "virtio-pmem";
}

/// `GET /vm/config`, and Firecracker's `--config-file`. The spec's
/// sections ember does not serve yet are [`NotSupported`]: a file that
/// sets one is refused with a message naming it, never half applied.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FullVmConfiguration {
    /// `boot-source`.
    #[serde(
        rename = "boot-source",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub boot_source: Option<BootSource>,
    /// `drives` (always written, `[]` when there are none, as Firecracker).
    #[serde(default)]
    pub drives: Vec<Drive>,
    /// `machine-config`.
    #[serde(
        rename = "machine-config",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub machine_config: Option<MachineConfiguration>,
    /// `network-interfaces` (always written, as `drives`).
    #[serde(rename = "network-interfaces", default)]
    pub network_interfaces: Vec<NetworkInterface>,
    /// `logger`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub logger: Option<Logger>,
    /// `metrics`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics: Option<Metrics>,
    /// `balloon`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub balloon: Option<crate::balloon::Balloon>,
    /// `cpu-config`: a custom CPU template.
    #[serde(
        rename = "cpu-config",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub cpu_config: Option<CpuConfig>,
    /// `memory-hotplug`: not supported yet.
    #[serde(
        rename = "memory-hotplug",
        default,
        deserialize_with = "refuse_memory_hotplug",
        skip_serializing_if = "Option::is_none"
    )]
    pub memory_hotplug: Option<NotSupported>,
    /// `mmds-config`: not supported yet.
    #[serde(
        rename = "mmds-config",
        default,
        deserialize_with = "refuse_mmds_config",
        skip_serializing_if = "Option::is_none"
    )]
    pub mmds_config: Option<NotSupported>,
    /// `pmem`: not supported yet.
    #[serde(
        default,
        deserialize_with = "refuse_pmem",
        skip_serializing_if = "Option::is_none"
    )]
    pub pmem: Option<NotSupported>,
    /// `vsock`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vsock: Option<Vsock>,
    /// `entropy`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entropy: Option<EntropyDevice>,
}

/// `PUT /vsock` and the config file's `vsock`: a virtio-vsock device whose
/// host side is Unix sockets (`uds_path`, and `uds_path_<PORT>` for the
/// guest's connections).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Vsock {
    /// The guest's context id (3 or more).
    pub guest_cid: u64,
    /// The Unix socket host programs connect to.
    pub uds_path: String,
    /// Deprecated in the spec; accepted and ignored.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vsock_id: Option<String>,
}

/// `PUT /entropy` and the config file's `entropy`: a virtio-rng device.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EntropyDevice {
    /// A rate limit on what the guest may take.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limiter: Option<RateLimiter>,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `minimal` parses as `T`; with one more field it does not.
    fn refuses_extra<T: serde::de::DeserializeOwned>(minimal: &str) {
        serde_json::from_str::<T>(minimal).unwrap_or_else(|e| panic!("{minimal}: {e}"));
        let extra = format!(r#"{{"not_in_the_spec": 1, {}"#, &minimal[1..]);
        let e = serde_json::from_str::<T>(&extra).err();
        assert!(
            e.as_ref()
                .is_some_and(|e| e.to_string().contains("unknown field `not_in_the_spec`")),
            "{extra}: {e:?}"
        );
    }

    #[test]
    fn model_every_request_body_refuses_unknown_fields() {
        refuses_extra::<MachineConfiguration>(r#"{"vcpu_count":1,"mem_size_mib":128}"#);
        refuses_extra::<MachineConfigurationUpdate>(r#"{"mem_size_mib":128}"#);
        refuses_extra::<BootSource>(r#"{"kernel_image_path":"k"}"#);
        refuses_extra::<Drive>(r#"{"drive_id":"a","is_root_device":false}"#);
        refuses_extra::<PartialDrive>(r#"{"drive_id":"a"}"#);
        refuses_extra::<NetworkInterface>(r#"{"iface_id":"a","host_dev_name":"t"}"#);
        refuses_extra::<PartialNetworkInterface>(r#"{"iface_id":"a"}"#);
        refuses_extra::<RateLimiter>(r#"{"ops":{"size":1,"refill_time":1}}"#);
        refuses_extra::<TokenBucket>(r#"{"size":1,"refill_time":1}"#);
        refuses_extra::<InstanceActionInfo>(r#"{"action_type":"FlushMetrics"}"#);
        refuses_extra::<Vm>(r#"{"state":"Paused"}"#);
        refuses_extra::<Logger>(r#"{"level":"Info"}"#);
        refuses_extra::<Metrics>(r#"{"metrics_path":"m"}"#);
        refuses_extra::<FullVmConfiguration>(r#"{"drives":[]}"#);
        // Nested bodies too.
        assert!(serde_json::from_str::<Drive>(
            r#"{"drive_id":"a","is_root_device":false,"rate_limiter":{"ops":{"size":1,"refill_time":1,"x":0}}}"#
        )
        .is_err());
    }

    #[test]
    fn model_full_config_names_the_sections_ember_does_not_serve() {
        for key in ["memory-hotplug", "mmds-config", "pmem"] {
            let text = format!(r#"{{"drives": [], "{key}": {{"x": [1, 2]}}}}"#);
            let e = serde_json::from_str::<FullVmConfiguration>(&text).unwrap_err();
            let msg = e.to_string();
            assert!(
                msg.contains(&format!("`{key}` is not supported by ember yet")),
                "{key}: {msg}"
            );
            // Firecracker writes an absent section as null.
            let text = format!(r#"{{"{key}": null, "logger": null}}"#);
            let c: FullVmConfiguration = serde_json::from_str(&text).unwrap();
            assert_eq!(c, FullVmConfiguration::default());
        }
    }

    #[test]
    fn model_defaults_and_enums_follow_the_spec() {
        let m: MachineConfiguration =
            serde_json::from_str(r#"{"vcpu_count":2,"mem_size_mib":256}"#).unwrap();
        assert!(!m.smt && !m.track_dirty_pages);
        assert_eq!(m.cpu_template, None);
        let h: MachineConfiguration = serde_json::from_str(
            r#"{"vcpu_count":2,"mem_size_mib":256,"huge_pages":"2M","cpu_template":"None"}"#,
        )
        .unwrap();
        assert_eq!(h.huge_pages, Some(HugePages::Hugetlbfs2M));
        assert_eq!(h.cpu_template, Some(CpuTemplate::None));
        assert_eq!(CacheType::default(), CacheType::Unsafe);
        assert_eq!(IoEngine::default(), IoEngine::Sync);
        assert_eq!(HugePages::default(), HugePages::None);
        assert_eq!(CpuTemplate::default(), CpuTemplate::None);
        let d: Drive = serde_json::from_str(r#"{"drive_id":"a","is_root_device":false}"#).unwrap();
        assert_eq!(d.cache_type.unwrap_or_default(), CacheType::Unsafe);
        assert_eq!(d.io_engine.unwrap_or_default(), IoEngine::Sync);
        let l: Logger = serde_json::from_str(r#"{"level":"warn"}"#).unwrap();
        assert_eq!(l.level, Some(LogLevel::Warning));
        assert!(serde_json::from_str::<Logger>(r#"{"level":"loud"}"#).is_err());
    }

    #[test]
    fn model_full_config_round_trips_firecrackers_file_format() {
        let text = r#"{
          "boot-source": {"kernel_image_path": "vmlinux", "boot_args": "console=ttyS0 reboot=k panic=1"},
          "drives": [{"drive_id": "rootfs", "path_on_host": "rootfs.ext4", "is_root_device": true, "is_read_only": false}],
          "machine-config": {"vcpu_count": 2, "mem_size_mib": 1024, "smt": false},
          "network-interfaces": [{"iface_id": "eth0", "guest_mac": "AA:FC:00:00:00:01", "host_dev_name": "tap0"}]
        }"#;
        let c: FullVmConfiguration = serde_json::from_str(text).unwrap();
        assert_eq!(c.drives[0].drive_id, "rootfs");
        assert_eq!(c.machine_config.as_ref().unwrap().vcpu_count, 2);
        let again: FullVmConfiguration =
            serde_json::from_str(&serde_json::to_string(&c).unwrap()).unwrap();
        assert_eq!(again, c);
    }
}

/// Cloud Hypervisor's `MigrationMode`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum MigrationMode {
    /// Memory is copied while the guest runs, then the guest moves.
    #[default]
    Precopy,
    /// The guest moves at once and its memory follows on demand.
    Postcopy,
}

/// Cloud Hypervisor's `TimeoutStrategy`: what a migration that has not
/// converged by `timeout_s` does.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum TimeoutStrategy {
    /// Give up; the guest runs on at the source.
    #[default]
    Cancel,
    /// Hand over anyway, with a longer pause.
    Ignore,
}

/// `PUT /api/v1/vm.send-migration` (Cloud Hypervisor's
/// `VmSendMigrationData`, as `ch-remote send-migration` sends it: every
/// field present, `null` for the absent ones).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SendMigrationData {
    /// `tcp:HOST:PORT` or `unix:PATH`.
    pub destination_url: String,
    /// Pass guest memory as file descriptors (same host, Unix socket).
    #[serde(default)]
    pub local: bool,
    /// Keep the source VM (paused) after a successful migration.
    #[serde(default)]
    pub preserve_source: bool,
    /// The longest pause the migration aims for, in ms (default 300).
    #[serde(default)]
    pub downtime_ms: Option<u64>,
    /// The longest the whole migration may take, in s (default 3600).
    #[serde(default)]
    pub timeout_s: Option<u64>,
    /// What a migration that has not converged in `timeout_s` does.
    #[serde(default)]
    pub timeout_strategy: Option<TimeoutStrategy>,
    /// Parallel connections (1 to 128; ember uses one).
    #[serde(default)]
    pub connections: Option<u32>,
    /// TLS certificates (not supported by ember).
    #[serde(default)]
    pub tls_dir: Option<String>,
    /// Pre-copy or post-copy.
    #[serde(default)]
    pub memory_mode: Option<MigrationMode>,
    /// Ember's own: whether a pre-copy whose rounds stop shrinking
    /// switches to post-copy (default true; false keeps it pre-copy only,
    /// which a broken connection can never leave split between hosts).
    #[serde(default)]
    pub auto_postcopy: Option<bool>,
}

/// `PUT /api/v1/vm.receive-migration` (Cloud Hypervisor's
/// `VmReceiveMigrationData`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReceiveMigrationData {
    /// `tcp:HOST:PORT` or `unix:PATH` to listen on.
    pub receiver_url: String,
    /// TLS certificates (not supported by ember).
    #[serde(default)]
    pub tls_dir: Option<String>,
    /// Pre-copy or post-copy (the source decides; accepted for ch-remote).
    #[serde(default)]
    pub memory_mode: Option<MigrationMode>,
    /// VFIO devices' fds (ember has no VFIO: `null` or empty only).
    #[serde(default)]
    pub vfio_fds: Option<Vec<serde_json::Value>>,
    /// An iommufd (ember has none: `null` only).
    #[serde(default)]
    pub iommufd_fd: Option<i64>,
    /// Memory zones moved to other host NUMA nodes (empty only).
    #[serde(default)]
    pub zone_updates: Option<Vec<serde_json::Value>>,
}
