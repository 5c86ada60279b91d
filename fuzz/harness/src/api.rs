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

fn apply(cfg: &mut VmConfig, request: &Request) {
    let r = match request {
        Request::PutMachineConfig(m) => fc::apply_machine(cfg, m),
        Request::PatchMachineConfig(m) => fc::apply_machine_update(cfg, m),
        Request::PutBootSource(b) => fc::apply_boot_source(cfg, b),
        Request::PutDrive(d) => fc::apply_drive(cfg, d),
        Request::PutNetworkInterface(n) => fc::apply_net(cfg, n),
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
