//! `api_request`: bytes as they arrive on the API socket, through
//! `ember_api` (HTTP parsing with the body limit, routing, the body's
//! schema and checks, each body serialised back), then every request that
//! changes the configuration applied to a `VmConfig` the way the VMM
//! applies it (`ember_vmm::config::firecracker`), and the result validated
//! as `InstanceStart` would. The same bytes are also tried as a
//! Firecracker `--config-file`. Every error is formatted as `ember` prints
//! it.

use ember_api::http::{parse_message, Parsed};
use ember_api::model::FullVmConfiguration;
use ember_api::{Request, MAX_BODY};
use ember_vmm::config::firecracker as fc;
use ember_vmm::config::VmConfig;

use crate::guest::init_logging;
use crate::seeds::NamedSeed;

fn apply(cfg: &mut VmConfig, request: &Request) {
    let r = match request {
        Request::PutMachineConfig(m) => fc::apply_machine(cfg, m),
        Request::PatchMachineConfig(m) => fc::apply_machine_update(cfg, m),
        Request::PutBootSource(b) => fc::apply_boot_source(cfg, b),
        Request::PutDrive(d) => fc::apply_drive(cfg, d),
        Request::PutNetworkInterface(n) => fc::apply_net(cfg, n),
        Request::PutCpuConfig(c) => fc::apply_cpu_config(cfg, c),
        _ => Ok(()),
    };
    if let Err(e) = r {
        let _ = ember_vmm::error_chain(&e);
    }
}

/// The target.
pub fn api_request(data: &[u8]) {
    init_logging();
    ember_api::fuzz_request(data);
    let mut cfg = VmConfig::default();
    let mut rest = data;
    for _ in 0..64 {
        let Parsed::Complete {
            method,
            path,
            body,
            consumed,
            ..
        } = parse_message(rest, MAX_BODY)
        else {
            break;
        };
        if let Ok(request) = Request::parse(&method, &path, &body) {
            apply(&mut cfg, &request);
        }
        rest = &rest[consumed..];
    }
    match cfg.validate() {
        Ok(valid) => assert!(valid.vcpus >= 1),
        Err(e) => {
            let _ = ember_vmm::error_chain(&e);
        }
    }
    let view = fc::to_api(&cfg);
    let text = serde_json::to_string(&view).expect("the configuration serialises");
    let back: FullVmConfiguration = serde_json::from_str(&text).expect("and parses back");
    assert_eq!(back, view);
    if let Ok(full) = serde_json::from_slice::<FullVmConfiguration>(data) {
        if let Err(e) = fc::from_api(&full) {
            let _ = ember_vmm::error_chain(&e);
        }
    }
}

/// One HTTP request with a JSON body.
fn http(method: &str, path: &str, body: &str) -> String {
    if body.is_empty() {
        format!("{method} {path} HTTP/1.1\r\nHost: localhost\r\n\r\n")
    } else {
        format!(
            "{method} {path} HTTP/1.1\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
    }
}

/// The hand-made seeds (see `crate::seeds`): one per kind of traffic,
/// each checked by the tests below to do what its name says.
pub fn seeds() -> Vec<NamedSeed> {
    let configure = [
        http("PUT", "/machine-config", r#"{"vcpu_count": 2, "mem_size_mib": 256}"#),
        http(
            "PUT",
            "/boot-source",
            r#"{"kernel_image_path": "/proc/self/exe", "boot_args": "console=ttyS0"}"#,
        ),
        http(
            "PUT",
            "/drives/root",
            r#"{"drive_id": "root", "path_on_host": "/proc/self/exe", "is_root_device": true, "is_read_only": true}"#,
        ),
        http(
            "PUT",
            "/network-interfaces/eth0",
            r#"{"iface_id": "eth0", "host_dev_name": "tap0", "guest_mac": "06:00:AC:10:00:02"}"#,
        ),
        http("PATCH", "/machine-config", r#"{"mem_size_mib": 512}"#),
        http("PUT", "/actions", r#"{"action_type": "InstanceStart"}"#),
    ]
    .concat();
    let lifecycle = [
        http("GET", "/", ""),
        http("GET", "/version", ""),
        http("PATCH", "/vm", r#"{"state": "Paused"}"#),
        http("PATCH", "/vm", r#"{"state": "Resumed"}"#),
        http("GET", "/vm/config", ""),
        http("PUT", "/actions", r#"{"action_type": "SendCtrlAltDel"}"#),
    ]
    .concat();
    let observe = [
        http(
            "PUT",
            "/logger",
            r#"{"log_path": "/dev/null", "level": "Debug", "show_level": true}"#,
        ),
        http(
            "PUT",
            "/metrics",
            r#"{"metrics_path": "/dev/null", "emit_id": true, "properties": {"a": "b"}}"#,
        ),
        http(
            "PATCH",
            "/drives/root",
            r#"{"drive_id": "root", "path_on_host": "/x"}"#,
        ),
    ]
    .concat();
    let bad = [
        http(
            "PUT",
            "/machine-config",
            r#"{"vcpu_count": 0, "mem_size_mib": 1, "x": 1}"#,
        ),
        http(
            "PUT",
            "/drives/a",
            r#"{"drive_id": "b", "is_root_device": false}"#,
        ),
        http("PUT", "/balloon", r#"{"amount_mib": 1}"#),
        http("DELETE", "/", ""),
        "PUT / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n".to_string(),
    ]
    .concat();
    let config_file = r#"{"boot-source": {"kernel_image_path": "/proc/self/exe"},
 "drives": [{"drive_id": "rootfs", "path_on_host": "/proc/self/exe", "is_root_device": true}],
 "machine-config": {"vcpu_count": 1, "mem_size_mib": 128},
 "network-interfaces": [{"iface_id": "eth0", "host_dev_name": "tap0"}]}"#;
    let patch_and_get = [
        http("GET", "/machine-config?x=1", ""),
        http("PATCH", "/machine-config", r#"{"vcpu_count": 4, "smt": false}"#),
        http(
            "PUT",
            "/drives/scratch",
            r#"{"drive_id": "scratch", "path_on_host": "/proc/self/exe", "is_root_device": false, "cache_type": "Writeback", "io_engine": "Sync", "rate_limiter": {"bandwidth": {"size": 0, "refill_time": 0}}}"#,
        ),
        http(
            "PATCH",
            "/drives/scratch",
            r#"{"drive_id": "scratch", "rate_limiter": {"ops": {"size": 100, "one_time_burst": 10, "refill_time": 1000}}}"#,
        ),
        http(
            "PATCH",
            "/network-interfaces/eth0",
            r#"{"iface_id": "eth0", "rx_rate_limiter": {"bandwidth": {"size": 1000, "refill_time": 10}}}"#,
        ),
        http(
            "PUT",
            "/network-interfaces/eth1",
            r#"{"iface_id": "eth1", "host_dev_name": "tap1", "mtu": 9000}"#,
        ),
        http(
            "PUT",
            "/balloon",
            r#"{"amount_mib": 64, "deflate_on_oom": true, "stats_polling_interval_s": 1, "free_page_reporting": true}"#,
        ),
        http("PATCH", "/balloon", r#"{"amount_mib": 32}"#),
        http("GET", "/balloon/statistics", ""),
        http("PUT", "/api/v1/vm.power-button", ""),
        http("GET", "/vm/config", ""),
        http("PUT", "/vsock", r#"{"guest_cid": 3, "uds_path": "/v"}"#),
        http("PUT", "/entropy", "{}"),
    ]
    .concat();
    let unsupported = [
        http("GET", "/balloon/hinting/status", ""),
        http("PATCH", "/balloon/hinting/stop", "{}"),
        http("PUT", "/serial", r#"{"serial_out_path": "/s"}"#),
        http("PUT", "/pmem/p0", r#"{"id": "p0", "path_on_host": "/p"}"#),
        http("GET", "/mmds", ""),
        http("PUT", "/mmds/config", "{}"),
        http("GET", "/hotplug/memory", ""),
        http("GET", "/vsock", ""),
        http("PUT", "/pmem", "{}"),
    ]
    .concat();
    let bad_values = [
        http("PATCH", "/machine-config", "{}"),
        http("PUT", "/machine-config", r#"{"vcpu_count": 33, "mem_size_mib": 0}"#),
        http(
            "PUT",
            "/network-interfaces/eth0",
            r#"{"iface_id": "eth0", "host_dev_name": "tap0", "guest_mac": "06:00:AC:10:00", "mtu": 67}"#,
        ),
        http(
            "PUT",
            "/drives/a-b",
            r#"{"drive_id": "a-b", "is_root_device": false}"#,
        ),
        http(
            "PUT",
            "/drives/d",
            r#"{"drive_id": "d", "is_root_device": false, "rate_limiter": {"ops": {"size": 18446744073709551615, "refill_time": 1}}}"#,
        ),
        http("PUT", "/logger", r#"{"level": "loud"}"#),
        http("PUT", "/boot-source", ""),
        "GET / HTTP/1.1\r\nContent-Length: 2\r\n\r\n{}".to_string(),
    ]
    .concat();
    let framing = [
        "GET /version HTTP/1.0\r\nConnection: keep-alive\r\n\r\n".to_string(),
        {
            let body = r#"{"action_type": "FlushMetrics"}"#;
            let n = body.len();
            format!("PUT /actions HTTP/1.1\r\nExpect: 100-continue\r\nContent-Length: {n}\r\ncontent-length: {n}\r\n\r\n{body}")
        },
        "GET / HTTP/1.1\r\nConnection: keep-alive, close\r\n\r\n".to_string(),
        http("GET", "/", ""),
    ]
    .concat();
    let over_limit = format!(
        "PUT /boot-source HTTP/1.1\r\nContent-Length: 51201\r\n\r\n{{\"kernel_image_path\": \"{}\"}}",
        "a".repeat(64)
    );
    let snapshot = [
        http("PATCH", "/vm", r#"{"state": "Paused"}"#),
        http(
            "PUT",
            "/snapshot/create",
            r#"{"snapshot_path": "/s", "mem_file_path": "/m", "snapshot_type": "Diff"}"#,
        ),
        http(
            "PUT",
            "/snapshot/load",
            r#"{"snapshot_path": "/s", "mem_backend": {"backend_type": "Uffd", "backend_path": "/u"}, "track_dirty_pages": true, "resume_vm": true, "network_overrides": [{"iface_id": "net0", "host_dev_name": "tap1"}]}"#,
        ),
        http(
            "PUT",
            "/snapshot/load",
            r#"{"snapshot_path": "/s", "mem_file_path": "/m", "enable_diff_snapshots": false}"#,
        ),
    ]
    .concat();
    let cpu = [
        http(
            "PUT",
            "/cpu-config",
            r#"{"kvm_capabilities": ["!121"], "cpuid_modifiers": [{"leaf": "0x7", "subleaf": "0x0", "flags": 1, "modifiers": [{"register": "ebx", "bitmap": "0bxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx0"}]}], "msr_modifiers": [{"addr": "0x10a", "bitmap": "0bxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx0000"}]}"#,
        ),
        http(
            "PUT",
            "/cpu-config",
            r#"{"cpuid_modifiers": [{"leaf": "zz", "subleaf": "0", "flags": 0, "modifiers": []}]}"#,
        ),
        http(
            "PUT",
            "/machine-config",
            r#"{"vcpu_count": 1, "mem_size_mib": 64, "cpu_template": "T2"}"#,
        ),
    ]
    .concat();
    vec![
        ("cpu_config", cpu.into_bytes()),
        ("snapshot", snapshot.into_bytes()),
        ("configure", configure.into_bytes()),
        ("lifecycle", lifecycle.into_bytes()),
        ("observe", observe.into_bytes()),
        ("patch_and_get", patch_and_get.into_bytes()),
        ("unsupported", unsupported.into_bytes()),
        ("bad", bad.into_bytes()),
        ("bad_values", bad_values.into_bytes()),
        ("framing", framing.into_bytes()),
        ("over_limit", over_limit.into_bytes()),
        (
            "half_sent",
            http("PUT", "/machine-config", r#"{"vcpu_count": 1}"#).as_bytes()[..50].to_vec(),
        ),
        ("config_file", config_file.as_bytes().to_vec()),
    ]
}

#[cfg(test)]
mod tests {
    use ember_api::{handle_bytes, Exchange, RequestError, Response};

    use super::*;

    fn seed(name: &str) -> Vec<u8> {
        seeds()
            .into_iter()
            .find(|(n, _)| *n == name)
            .unwrap_or_else(|| panic!("no seed {name}"))
            .1
    }

    /// The seed answered as the server answers it, and what reached the
    /// handler.
    fn run(name: &str) -> (Exchange, Vec<Request>) {
        let mut seen = Vec::new();
        let ex = handle_bytes(&seed(name), MAX_BODY, &mut |r| {
            seen.push(r);
            Response::no_content()
        });
        (ex, seen)
    }

    #[test]
    fn api_seeds_of_valid_traffic_reach_the_handler_whole() {
        for (name, requests) in [
            ("configure", 6),
            ("lifecycle", 6),
            ("observe", 3),
            ("patch_and_get", 13),
            ("snapshot", 4),
        ] {
            let (ex, seen) = run(name);
            assert_eq!(
                seen.len(),
                requests,
                "{name}: {:?}",
                String::from_utf8_lossy(&ex.output)
            );
            assert_eq!((ex.refused, ex.close), (0, false), "{name}");
            assert_eq!(ex.consumed, seed(name).len(), "{name}");
        }
    }

    #[test]
    fn api_seeds_of_bad_traffic_are_refused_before_the_handler() {
        let (ex, seen) = run("bad_values");
        assert!(seen.is_empty(), "{seen:?}");
        assert_eq!(ex.refused, 8);
        let mut rest = seed("unsupported");
        let mut unsupported = 0;
        while let Parsed::Complete {
            method,
            path,
            body,
            consumed,
            ..
        } = parse_message(&rest, MAX_BODY)
        {
            if let Err(RequestError::Unsupported { .. }) = Request::parse(&method, &path, &body) {
                unsupported += 1;
            }
            rest.drain(..consumed);
        }
        assert!(rest.is_empty());
        assert_eq!(
            unsupported, 7,
            "the last two are spec paths with the wrong shape"
        );
        let (ex, seen) = run("over_limit");
        assert!(seen.is_empty() && ex.close);
        assert!(String::from_utf8_lossy(&ex.output).contains("the limit is 51200"));
        let (ex, _) = run("half_sent");
        assert_eq!((ex.requests, ex.consumed), (0, 0));
        assert!(serde_json::from_slice::<FullVmConfiguration>(&seed("config_file")).is_ok());
    }

    #[test]
    fn api_seed_framing_stops_at_the_request_that_closes() {
        let (ex, seen) = run("framing");
        assert_eq!(seen.len(), 3, "{seen:?}");
        assert!(ex.close);
        for s in seeds() {
            api_request(&s.1);
        }
    }
}
