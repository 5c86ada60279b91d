//! `config`: arbitrary TOML through `ember_vmm::config` as `ember` reads it
//! (parse with unknown keys refused, paths resolved), command-line
//! overrides parsed the way `ember`'s flags are (`--disk`, `--net`,
//! `--kernel`, ...), then validation and the memory layout the VMM derives
//! from a valid config; every error is formatted as `ember` prints it.
//! Ember has no JSON configuration yet; when it does, it belongs here too.
//!
//! Input: the TOML text (invalid UTF-8 replaced), then optionally a NUL
//! byte and override lines, each one letter then the flag's value: `k`
//! kernel, `i` initrd, `c` cmdline, `v` vcpus, `m` memory MiB, `d` a
//! `--disk` value, `n` a `--net` value.

use std::path::{Path, PathBuf};

use ember_memory::MemoryLayout;
use ember_vmm::config::{net::parse_mac, DiskConfig, NetConfig, Overrides, VmConfig};

use crate::guest::init_logging;

/// Where relative paths in a fuzzed config point: nowhere.
const BASE: &str = "/nonexistent/ember-fuzz";

/// Formats an error and its sources on one line, as `ember` prints them.
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(inner) = source {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        source = inner.source();
    }
    s
}

/// Parses the override lines into `Overrides`; a flag `ember` would refuse
/// is formatted and skipped.
fn overrides(text: &str) -> Overrides {
    let mut o = Overrides::default();
    for line in text.lines() {
        let mut chars = line.chars();
        let Some(kind) = chars.next() else {
            continue;
        };
        let value = chars.as_str();
        match kind {
            'k' => o.kernel = Some(PathBuf::from(value)),
            'i' => o.initrd = Some(PathBuf::from(value)),
            'c' => o.cmdline = Some(value.to_string()),
            'v' => o.vcpus = value.parse().ok(),
            'm' => match ember_vmm::config::MemoryFlag::parse(value) {
                Ok(m) => o.memory = m,
                Err(e) => drop(chain(&e)),
            },
            'd' => match DiskConfig::parse_flag(value) {
                Ok(d) => o.disks.push(d),
                Err(e) => drop(chain(&e)),
            },
            'u' => match ember_vmm::config::NumaConfig::parse_flag(value) {
                Ok(n) => o.numa.push(n),
                Err(e) => drop(chain(&e)),
            },
            'a' => o.vcpu_affinity = Some(value.to_string()),
            'b' => match ember_vmm::config::balloon::parse_flag(value) {
                Ok(b) => o.balloon = Some(b),
                Err(e) => drop(chain(&e)),
            },
            's' => match ember_vmm::config::vsock::parse_vsock(value) {
                Ok(v) => o.vsock = Some(v),
                Err(e) => drop(chain(&e)),
            },
            'e' => match ember_vmm::config::vsock::parse_entropy(value) {
                Ok(v) => o.entropy = Some(v),
                Err(e) => drop(chain(&e)),
            },
            'n' => {
                let _ = parse_mac(value);
                match NetConfig::parse_flag(value) {
                    Ok(n) => o.nets.push(n),
                    Err(e) => drop(chain(&e)),
                }
            }
            _ => {}
        }
    }
    o
}

/// The `config` target.
pub fn config(data: &[u8]) {
    init_logging();
    let (toml, flags) = match data.iter().position(|&b| b == 0) {
        Some(at) => (&data[..at], &data[at + 1..]),
        None => (data, &[][..]),
    };
    let toml = String::from_utf8_lossy(toml);
    let flags = String::from_utf8_lossy(flags);
    let path = Path::new(BASE).join("vm.toml");
    let mut cfg = match VmConfig::from_toml(&toml, &path, Path::new(BASE)) {
        Ok(cfg) => cfg,
        Err(e) => {
            drop(chain(&e));
            VmConfig::default()
        }
    };
    cfg.apply(&overrides(&flags));
    for (i, n) in cfg.net.iter().enumerate() {
        let _ = n.default_mac(i);
    }
    match cfg.validate() {
        Ok(valid) => {
            drop(format!("{valid:?}"));
            memory_layout(valid.memory_mib);
        }
        Err(e) => drop(chain(&e)),
    }
}

/// What the VMM computes from a valid `memory_mib` before it maps
/// anything: the layout, the host's physical-address check (at the widths
/// x86 CPUs report), the e820 map and the 64-bit BAR window.
fn memory_layout(memory_mib: u64) {
    let Ok(ml) = MemoryLayout::new(memory_mib) else {
        return;
    };
    drop(ml.e820());
    for phys_bits in [36, 39, 46, 52] {
        if ml.check_phys_bits(phys_bits).is_ok() {
            let _ = ml.mmio64_start();
        }
    }
}
