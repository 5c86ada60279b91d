//! ember-api held to Firecracker's published spec (`spec/firecracker.json`):
//! its paths and methods, its schemas' fields, required fields, enum values
//! and defaults, and its `Error` body.

use std::collections::BTreeSet;

use ember_api::model::{
    ActionType, BootSource, CacheType, CpuConfig, CpuTemplate, CpuidLeafModifier, Drive,
    FirecrackerVersion, FullVmConfiguration, HugePages, InstanceActionInfo, InstanceInfo, IoEngine,
    LogLevel, Logger, MachineConfiguration, MachineConfigurationUpdate, MemoryBackend, Metrics,
    NetworkInterface, NetworkOverride, PartialDrive, PartialNetworkInterface, RateLimiter,
    SnapshotCreateParams, SnapshotLoadParams, TokenBucket, Vm, VmState,
};
use ember_api::{handle_bytes, model, Request, RequestError, Response, MAX_BODY};
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::{json, Value};

const SPEC: &str = include_str!("../spec/firecracker.json");

fn spec() -> Value {
    serde_json::from_str(SPEC).expect("the spec is JSON")
}

fn definition<'a>(spec: &'a Value, name: &str) -> &'a Value {
    let d = &spec["definitions"][name];
    assert!(d.is_object(), "no definition {name} in the spec");
    d
}

fn keys(v: &Value) -> BTreeSet<String> {
    v.as_object()
        .map(|o| o.keys().cloned().collect())
        .unwrap_or_default()
}

fn properties(def: &Value) -> BTreeSet<String> {
    keys(&def["properties"])
}

fn required(def: &Value) -> BTreeSet<String> {
    def["required"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|v| Some(v.as_str()?.to_string()))
                .collect()
        })
        .unwrap_or_default()
}

/// The routes ember serves, as the spec names them.
const SERVED: &[(&str, &str)] = &[
    ("GET", "/"),
    ("GET", "/version"),
    ("GET", "/machine-config"),
    ("PUT", "/machine-config"),
    ("PATCH", "/machine-config"),
    ("PUT", "/boot-source"),
    ("PUT", "/drives/{drive_id}"),
    ("PATCH", "/drives/{drive_id}"),
    ("PUT", "/network-interfaces/{iface_id}"),
    ("PATCH", "/network-interfaces/{iface_id}"),
    ("PUT", "/actions"),
    ("PATCH", "/vm"),
    ("GET", "/vm/config"),
    ("PUT", "/logger"),
    ("PUT", "/metrics"),
    ("PUT", "/snapshot/create"),
    ("PUT", "/snapshot/load"),
    ("PUT", "/cpu-config"),
    ("GET", "/balloon"),
    ("PUT", "/balloon"),
    ("PATCH", "/balloon"),
    ("GET", "/balloon/statistics"),
    ("PATCH", "/balloon/statistics"),
    ("PUT", "/vsock"),
    ("PUT", "/entropy"),
];

/// A spec path with each `{parameter}` replaced by an id.
fn concrete(path: &str) -> String {
    path.split('/')
        .map(|s| if s.starts_with('{') { "x1" } else { s })
        .collect::<Vec<_>>()
        .join("/")
}

#[test]
fn spec_every_path_and_method_is_served_or_says_unsupported() {
    let spec = spec();
    let mut served = BTreeSet::new();
    let mut unsupported = 0;
    for (path, item) in spec["paths"].as_object().expect("paths") {
        for method in keys(item).iter().filter(|m| *m != "parameters") {
            let method = method.to_uppercase();
            let body = if method == "GET" { "" } else { "{}" };
            match Request::parse(&method, &concrete(path), body.as_bytes()) {
                Err(e @ RequestError::InvalidPathMethod(..)) => {
                    panic!("{method} {path} is in the spec: {e}")
                }
                Err(RequestError::Unsupported { .. }) => unsupported += 1,
                // Served: the body `{}` may well be refused.
                _ => {
                    served.insert((method, path.clone()));
                }
            }
        }
    }
    let want: BTreeSet<(String, String)> = SERVED
        .iter()
        .map(|(m, p)| (m.to_string(), p.to_string()))
        .collect();
    assert_eq!(served, want, "the routes ember serves are the spec's");
    assert!(unsupported >= 13, "{unsupported}");
}

/// One model type against its definition.
struct Case {
    definition: &'static str,
    /// A value with every property of the definition.
    full: Value,
    /// Parses as the type and serialises back.
    again: fn(Value) -> Result<Value, String>,
    /// Received by ember (required fields and unknown ones matter), not
    /// only sent.
    received: bool,
    /// PATCH's subset of the definition: nothing is required.
    subset: bool,
}

fn again<T: DeserializeOwned + Serialize>(v: Value) -> Result<Value, String> {
    let t: T = serde_json::from_value(v).map_err(|e| e.to_string())?;
    serde_json::to_value(&t).map_err(|e| e.to_string())
}

fn bucket() -> Value {
    json!({"size": 1000, "one_time_burst": 10, "refill_time": 100})
}

fn limiter() -> Value {
    json!({"bandwidth": bucket(), "ops": bucket()})
}

fn cases() -> Vec<Case> {
    let case = |definition, full, again, received| Case {
        definition,
        full,
        again,
        received,
        subset: false,
    };
    let machine = json!({
        "vcpu_count": 2, "mem_size_mib": 256, "smt": true, "track_dirty_pages": true,
        "cpu_template": "T2", "huge_pages": "2M"
    });
    vec![
        case(
            "BootSource",
            json!({"kernel_image_path": "k", "boot_args": "console=ttyS0", "initrd_path": "i"}),
            again::<BootSource>,
            true,
        ),
        case(
            "Drive",
            json!({
                "drive_id": "d", "partuuid": "p", "is_root_device": true, "cache_type": "Writeback",
                "is_read_only": false, "path_on_host": "h", "rate_limiter": limiter(),
                "io_engine": "Async", "socket": "s"
            }),
            again::<Drive>,
            true,
        ),
        case(
            "PartialDrive",
            json!({"drive_id": "d", "path_on_host": "h", "rate_limiter": limiter()}),
            again::<PartialDrive>,
            true,
        ),
        case(
            "NetworkInterface",
            json!({
                "iface_id": "n", "host_dev_name": "tap0", "guest_mac": "06:00:ac:10:00:02",
                "mtu": 1500, "rx_rate_limiter": limiter(), "tx_rate_limiter": limiter()
            }),
            again::<NetworkInterface>,
            true,
        ),
        case(
            "PartialNetworkInterface",
            json!({"iface_id": "n", "rx_rate_limiter": limiter(), "tx_rate_limiter": limiter()}),
            again::<PartialNetworkInterface>,
            true,
        ),
        case(
            "MachineConfiguration",
            machine.clone(),
            again::<MachineConfiguration>,
            true,
        ),
        Case {
            subset: true,
            ..case(
                "MachineConfiguration",
                machine,
                again::<MachineConfigurationUpdate>,
                true,
            )
        },
        case("RateLimiter", limiter(), again::<RateLimiter>, true),
        case(
            "Vsock",
            json!({"guest_cid": 3, "uds_path": "/v.sock", "vsock_id": "vsock0"}),
            again::<model::Vsock>,
            true,
        ),
        case(
            "EntropyDevice",
            json!({"rate_limiter": limiter()}),
            again::<model::EntropyDevice>,
            true,
        ),
        case("TokenBucket", bucket(), again::<TokenBucket>, true),
        case(
            "InstanceActionInfo",
            json!({"action_type": "InstanceStart"}),
            again::<InstanceActionInfo>,
            true,
        ),
        case("Vm", json!({"state": "Paused"}), again::<Vm>, true),
        case(
            "SnapshotCreateParams",
            json!({"mem_file_path": "m", "snapshot_path": "s", "snapshot_type": "Diff"}),
            again::<SnapshotCreateParams>,
            true,
        ),
        case(
            "SnapshotLoadParams",
            json!({
                "enable_diff_snapshots": true, "track_dirty_pages": true, "mem_file_path": "m",
                "mem_backend": {"backend_type": "Uffd", "backend_path": "/u"},
                "snapshot_path": "s", "resume_vm": true,
                "network_overrides": [{"iface_id": "n", "host_dev_name": "tap1"}],
                "vsock_override": {"uds_path": "/v"}, "clock_realtime": false, "huge_pages": "None"
            }),
            again::<SnapshotLoadParams>,
            true,
        ),
        case(
            "MemoryBackend",
            json!({"backend_type": "File", "backend_path": "/m"}),
            again::<MemoryBackend>,
            true,
        ),
        case(
            "NetworkOverride",
            json!({"iface_id": "n", "host_dev_name": "tap1"}),
            again::<NetworkOverride>,
            true,
        ),
        case(
            "Logger",
            json!({
                "level": "Debug", "log_path": "/l", "show_level": true, "show_log_origin": false,
                "module": "api_server::request"
            }),
            again::<Logger>,
            true,
        ),
        case(
            "Metrics",
            json!({"metrics_path": "/m", "emit_id": true, "properties": {"a": "b"}}),
            again::<Metrics>,
            true,
        ),
        case(
            "CpuConfig",
            json!({
                "kvm_capabilities": ["!121"],
                "cpuid_modifiers": [{"leaf": "0x1", "subleaf": "0x0", "flags": 0,
                    "modifiers": [{"register": "ecx", "bitmap": "0bxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx1"}]}],
                "msr_modifiers": [{"addr": "0x10a", "bitmap": "0b1"}],
                "reg_modifiers": [{"addr": "0x0", "bitmap": "0b1"}],
                "vcpu_features": [{"index": 0, "bitmap": "0b1"}]
            }),
            again::<CpuConfig>,
            true,
        ),
        case(
            "CpuidLeafModifier",
            json!({"leaf": "0x1", "subleaf": "0x0", "flags": 0,
                "modifiers": [{"register": "ecx", "bitmap": "0b1"}]}),
            again::<CpuidLeafModifier>,
            true,
        ),
        case(
            "InstanceInfo",
            json!({"app_name": "ember", "id": "vm", "state": "Not started", "vmm_version": "1"}),
            again::<InstanceInfo>,
            false,
        ),
        case(
            "FirecrackerVersion",
            json!({"firecracker_version": "1.0.0"}),
            again::<FirecrackerVersion>,
            false,
        ),
        case(
            "Error",
            json!({"fault_message": "x"}),
            again::<model::Error>,
            false,
        ),
    ]
}

#[test]
fn spec_model_types_have_the_definitions_fields() {
    let spec = spec();
    for c in cases() {
        let def = definition(&spec, c.definition);
        let name = c.definition;
        assert_eq!(keys(&c.full), properties(def), "{name}: the test's value");
        let back = (c.again)(c.full.clone()).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_eq!(back, c.full, "{name} round trip");
        if !c.received {
            assert!(required(def).is_subset(&keys(&back)), "{name}");
            continue;
        }
        let required = if c.subset {
            BTreeSet::new()
        } else {
            required(def)
        };
        for field in properties(def) {
            let mut less = c.full.clone();
            less.as_object_mut().unwrap().remove(&field);
            let r = (c.again)(less);
            if required.contains(&field) {
                let e = r.expect_err(&format!("{name} without {field}"));
                assert!(e.contains(&format!("missing field `{field}`")), "{e}");
            } else {
                r.unwrap_or_else(|e| panic!("{name} without optional {field}: {e}"));
            }
        }
        let mut more = c.full.clone();
        more.as_object_mut()
            .unwrap()
            .insert("not_in_the_spec".into(), json!(1));
        let e = (c.again)(more).expect_err(name);
        assert!(e.contains("unknown field `not_in_the_spec`"), "{name}: {e}");
    }
}

#[test]
fn spec_full_vm_configuration_has_every_section() {
    let spec = spec();
    let def = definition(&spec, "FullVmConfiguration");
    let full = FullVmConfiguration {
        boot_source: Some(serde_json::from_value(json!({"kernel_image_path": "k"})).unwrap()),
        drives: vec![],
        machine_config: Some(
            serde_json::from_value(json!({"vcpu_count": 1, "mem_size_mib": 128})).unwrap(),
        ),
        network_interfaces: vec![],
        logger: Some(Logger::default()),
        metrics: Some(serde_json::from_value(json!({"metrics_path": "m"})).unwrap()),
        cpu_config: Some(serde_json::from_value(json!({"kvm_capabilities": ["!121"]})).unwrap()),
        balloon: Some(
            serde_json::from_value(json!({"amount_mib": 0, "deflate_on_oom": false})).unwrap(),
        ),
        vsock: Some(serde_json::from_value(json!({"guest_cid": 3, "uds_path": "v"})).unwrap()),
        entropy: Some(serde_json::from_value(json!({})).unwrap()),
        ..Default::default()
    };
    let served = keys(&serde_json::to_value(&full).unwrap());
    let mut refused = BTreeSet::new();
    for key in properties(def).difference(&served) {
        let text = format!(r#"{{"{key}": {{}}}}"#);
        let e = serde_json::from_str::<FullVmConfiguration>(&text).unwrap_err();
        assert!(
            e.to_string().contains("is not supported by ember yet"),
            "{key}: {e}"
        );
        refused.insert(key.clone());
    }
    assert_eq!(served.len() + refused.len(), properties(def).len());
    assert!(served.is_subset(&properties(def)), "{served:?}");
}

/// Lists every variant of an enum (the match fails to compile when one is
/// added and not listed).
macro_rules! variants {
    ($t:ident: $($v:ident),*) => {{
        let all = vec![$($t::$v),*];
        for v in &all {
            match v { $($t::$v)|* => {} }
        }
        all
    }};
}

/// `T`'s values are the spec's `enum` at `pointer`, both ways.
fn same_enum<T>(spec: &Value, pointer: &str, ours: Vec<T>)
where
    T: Serialize + DeserializeOwned + PartialEq + std::fmt::Debug,
{
    let values = spec
        .pointer(pointer)
        .and_then(Value::as_array)
        .expect(pointer);
    // The YAML's unquoted `Off` reads as false.
    let values: BTreeSet<String> = values
        .iter()
        .map(|v| v.as_str().map_or("Off".to_string(), str::to_string))
        .collect();
    let serialised: BTreeSet<String> = ours
        .iter()
        .map(|v| {
            serde_json::to_value(v)
                .unwrap()
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    assert_eq!(serialised, values, "{pointer}");
    for v in &values {
        let t: T = serde_json::from_value(json!(v)).unwrap_or_else(|e| panic!("{v}: {e}"));
        assert_eq!(serde_json::to_value(&t).unwrap(), json!(v));
    }
}

#[test]
fn spec_enums_have_the_spec_values() {
    let spec = spec();
    let d = "/definitions";
    same_enum(
        &spec,
        &format!("{d}/CpuTemplate/enum"),
        variants!(CpuTemplate: C3, T2, T2S, T2CL, T2A, V1N1, None),
    );
    same_enum(
        &spec,
        &format!("{d}/MachineConfiguration/properties/huge_pages/enum"),
        variants!(HugePages: None, Hugetlbfs2M, Transparent),
    );
    same_enum(
        &spec,
        &format!("{d}/Drive/properties/cache_type/enum"),
        variants!(CacheType: Unsafe, Writeback),
    );
    same_enum(
        &spec,
        &format!("{d}/Drive/properties/io_engine/enum"),
        variants!(IoEngine: Sync, Async),
    );
    same_enum(
        &spec,
        &format!("{d}/InstanceActionInfo/properties/action_type/enum"),
        variants!(ActionType: FlushMetrics, InstanceStart, SendCtrlAltDel),
    );
    same_enum(
        &spec,
        &format!("{d}/Vm/properties/state/enum"),
        variants!(VmState: Paused, Resumed),
    );
    same_enum(
        &spec,
        &format!("{d}/Logger/properties/level/enum"),
        variants!(LogLevel: Off, Error, Warning, Info, Debug, Trace),
    );
    // "The possible values are case-insensitive."
    for v in ["error", "WARNING", "iNfO", "debug", "TRACE", "off"] {
        serde_json::from_value::<LogLevel>(json!(v)).unwrap_or_else(|e| panic!("{v}: {e}"));
    }
}

#[test]
fn spec_defaults_are_the_spec_defaults() {
    let spec = spec();
    let d = |p: &str| spec.pointer(&format!("/definitions/{p}/default")).cloned();
    let ours = |v: Value| Some(v);
    assert_eq!(d("CpuTemplate"), ours(json!(CpuTemplate::default())));
    assert_eq!(
        d("MachineConfiguration/properties/huge_pages"),
        ours(json!(HugePages::default()))
    );
    assert_eq!(
        d("Drive/properties/cache_type"),
        ours(json!(CacheType::default()))
    );
    assert_eq!(
        d("Drive/properties/io_engine"),
        ours(json!(IoEngine::default()))
    );
    let m: MachineConfiguration =
        serde_json::from_value(json!({"vcpu_count": 1, "mem_size_mib": 1})).unwrap();
    assert_eq!(d("MachineConfiguration/properties/smt"), ours(json!(m.smt)));
    assert_eq!(
        d("MachineConfiguration/properties/track_dirty_pages"),
        ours(json!(m.track_dirty_pages))
    );
}

/// Every answer in `output`: status and body.
fn answers(mut output: &[u8]) -> Vec<(u16, Vec<u8>)> {
    let mut v = Vec::new();
    while !output.is_empty() {
        let mut headers = [httparse::EMPTY_HEADER; 8];
        let mut r = httparse::Response::new(&mut headers);
        let Ok(httparse::Status::Complete(head)) = r.parse(output) else {
            panic!("not HTTP: {}", String::from_utf8_lossy(output));
        };
        let length: usize = r
            .headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case("content-length"))
            .and_then(|h| std::str::from_utf8(h.value).ok()?.parse().ok())
            .unwrap();
        v.push((r.code.unwrap(), output[head..head + length].to_vec()));
        output = &output[head + length..];
    }
    v
}

#[test]
fn spec_every_error_body_is_the_error_schema() {
    let spec = spec();
    let error = definition(&spec, "Error");
    let fields = properties(error);
    // Each refused for a different reason: framing, routing, body, values.
    let inputs: Vec<Vec<u8>> = [
        "GET /nothing HTTP/1.1\r\n\r\n".to_string(),
        "DELETE / HTTP/1.1\r\n\r\n".into(),
        "PUT /balloon HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}".into(),
        "PUT /boot-source HTTP/1.1\r\n\r\n".into(),
        "GET / HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}".into(),
        "PUT /machine-config HTTP/1.1\r\nContent-Length: 1\r\n\r\n{".into(),
        "PUT /machine-config HTTP/1.1\r\nContent-Length: 36\r\n\r\n{\"vcpu_count\":0,\"mem_size_mib\":\"\\\"\"}".into(),
        "PUT /machine-config HTTP/1.1\r\nContent-Length: 33\r\n\r\n{\"vcpu_count\":0,\"mem_size_mib\":1}".into(),
        "PUT /drives/a HTTP/1.1\r\nContent-Length: 38\r\n\r\n{\"drive_id\":\"b\",\"is_root_device\":true}".into(),
        "PUT / HTTP/1.1\r\nContent-Length: 99999\r\n\r\n".into(),
        "PUT / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n".into(),
        "PUT / HTTP/1.1\r\nContent-Length: x\r\n\r\n".into(),
        "GET / HTTP/3\r\n\r\n".into(),
        format!("GET /{} HTTP/1.1\r\n\r\n", "a".repeat(9000)),
    ]
    .into_iter()
    .map(String::into_bytes)
    .collect();
    let mut bodies = vec![Response::fault(503, "too many connections").body.unwrap()];
    for input in &inputs {
        let ex = handle_bytes(input, MAX_BODY, &mut |r| {
            panic!("{r:?} reached the handler")
        });
        let all = answers(&ex.output);
        assert_eq!(all.len(), 1, "{}", String::from_utf8_lossy(input));
        assert_eq!(all[0].0, 400);
        bodies.push(all[0].1.clone());
    }
    for body in bodies {
        let v: Value = serde_json::from_slice(&body).expect("JSON");
        let obj = v.as_object().expect("an object");
        assert!(!obj.is_empty());
        for (k, val) in obj {
            assert!(fields.contains(k), "{k} is not in Error");
            let ty = error["properties"][k]["type"].as_str().unwrap();
            assert_eq!(ty, "string");
            assert!(val.is_string(), "{k}: {val}");
            assert!(!val.as_str().unwrap().contains('\n'), "one line: {val}");
        }
    }
}
