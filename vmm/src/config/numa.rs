//! `[[numa]]` / `--numa` (guest NUMA nodes, each optionally bound to a host
//! node) and `vcpu_affinity` / `--vcpu-affinity` (vCPU threads pinned to
//! host CPUs).
//!
//! ```toml
//! [[numa]]
//! node = 0
//! cpus = "0-1"
//! memory_mib = 512
//! host_node = 0          # optional: mbind the node's memory there
//! policy = "bind"        # bind (strict, the default) or preferred
//! distances = "1:20"     # to other nodes; 20 when not given, 10 to itself
//! ```

use serde::Deserialize;

use super::ConfigError;

/// How a guest node's memory is bound to its host node.
#[derive(Clone, Copy, Debug, Default, serde::Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum NumaPolicy {
    /// Only that host node (`MPOL_BIND`): the guest fails to get memory
    /// rather than getting it elsewhere.
    #[default]
    Bind,
    /// That host node first, others when it is full (`MPOL_PREFERRED`).
    Preferred,
}

/// One `[[numa]]` table (or `--numa` flag).
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct NumaConfig {
    /// The guest node id: nodes are numbered 0 to N-1.
    pub node: u32,
    /// Its vCPUs: `0-1,4` (ranges and single ids).
    pub cpus: String,
    /// Its memory in MiB; the nodes' memory adds up to the machine's.
    pub memory_mib: u64,
    /// The host node its memory is bound to, if any.
    #[serde(default)]
    pub host_node: Option<u32>,
    /// How it is bound (only with `host_node`).
    #[serde(default)]
    pub policy: Option<NumaPolicy>,
    /// Distances to other guest nodes: `1:20,2:30`.
    #[serde(default)]
    pub distances: Option<String>,
}

/// A guest node after validation (also saved with a snapshot's machine,
/// and checked again by [`check_saved`] when read back).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NumaNode {
    /// Its vCPUs.
    pub cpus: Vec<u8>,
    /// Its memory in MiB.
    pub memory_mib: u64,
    /// Its host node and policy.
    pub host: Option<(u32, NumaPolicy)>,
    /// Distance to every node, by node id (10 to itself).
    pub distances: Vec<u8>,
}

/// The distance between two different nodes that no one gave.
pub const DEFAULT_REMOTE_DISTANCE: u8 = 20;
/// The distance from a node to itself.
pub const LOCAL_DISTANCE: u8 = 10;

fn numa_err(why: String) -> ConfigError {
    ConfigError::Numa(why)
}

/// Parses `0-1,4` into sorted ids (each at most `max`).
pub fn parse_id_list(text: &str, what: &str) -> Result<Vec<u64>, String> {
    let mut ids = Vec::new();
    for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let num = |s: &str| {
            s.trim()
                .parse::<u64>()
                .map_err(|_| format!("{what} {part:?} is not a number or a range like 0-3"))
        };
        let (a, b) = match part.split_once('-') {
            Some((a, b)) => (num(a)?, num(b)?),
            None => (num(part)?, num(part)?),
        };
        if a > b || b - a > 4096 {
            return Err(format!("{what} range {part:?} is empty or too large"));
        }
        ids.extend(a..=b);
    }
    if ids.is_empty() {
        return Err(format!("no {what} given"));
    }
    Ok(ids)
}

impl NumaConfig {
    /// Parses one `--numa` flag:
    /// `node=0,cpus=0-1,memory=512[,host_node=0][,policy=bind|preferred][,distances=1:20]`.
    /// A bare item after `cpus=` or `distances=` continues that list
    /// (`cpus=0-1,4`, `distances=1:20,2:30`).
    pub fn parse_flag(flag: &str) -> Result<Self, ConfigError> {
        let bad = |why: String| ConfigError::NumaFlag {
            flag: flag.to_string(),
            why,
        };
        let (mut node, mut cpus, mut memory, mut host_node, mut policy, mut distances) = (
            None,
            Vec::<String>::new(),
            None,
            None,
            None,
            Vec::<String>::new(),
        );
        let mut last = "";
        for part in flag.split(',').map(str::trim) {
            let Some((k, v)) = part.split_once('=') else {
                match last {
                    "cpus" => cpus.push(part.to_string()),
                    "distances" => distances.push(part.to_string()),
                    _ => return Err(bad(format!("{part:?} is not KEY=VALUE"))),
                }
                continue;
            };
            let num = |v: &str| {
                v.parse::<u64>()
                    .map_err(|_| bad(format!("{k}={v}: not a number")))
            };
            match k {
                "node" => {
                    node = Some(
                        u32::try_from(num(v)?).map_err(|_| bad(format!("node={v}: too large")))?,
                    )
                }
                "cpus" => cpus.push(v.to_string()),
                "memory" | "memory_mib" => memory = Some(num(v)?),
                "host_node" => {
                    host_node = Some(
                        u32::try_from(num(v)?)
                            .map_err(|_| bad(format!("host_node={v}: too large")))?,
                    )
                }
                "policy" => {
                    policy = Some(match v {
                        "bind" => NumaPolicy::Bind,
                        "preferred" => NumaPolicy::Preferred,
                        _ => return Err(bad(format!("policy={v}: expected bind or preferred"))),
                    })
                }
                "distances" => distances.push(v.to_string()),
                _ => {
                    return Err(bad(format!(
                        "unknown key {k:?} (node, cpus, memory, host_node, policy, distances)"
                    )))
                }
            }
            last = k;
        }
        Ok(NumaConfig {
            node: node.ok_or_else(|| bad("node= is missing".into()))?,
            cpus: if cpus.is_empty() {
                return Err(bad("cpus= is missing".into()));
            } else {
                cpus.join(",")
            },
            memory_mib: memory.ok_or_else(|| bad("memory= is missing (MiB)".into()))?,
            host_node,
            policy,
            distances: (!distances.is_empty()).then(|| distances.join(",")),
        })
    }
}

/// Validates the nodes against the machine: ids 0 to N-1 once each, every
/// vCPU in exactly one node, memory adding up, distances 11-254 to existing
/// other nodes and the same both ways. Returns the nodes by id.
pub fn validate(
    nodes: &[NumaConfig],
    vcpus: u8,
    memory_mib: u64,
) -> Result<Vec<NumaNode>, ConfigError> {
    if nodes.is_empty() {
        return Ok(Vec::new());
    }
    let n = nodes.len();
    if n > ember_acpi::MAX_NODES {
        return Err(numa_err(format!(
            "{n} nodes; at most {} are supported",
            ember_acpi::MAX_NODES
        )));
    }
    let mut by_id: Vec<Option<&NumaConfig>> = vec![None; n];
    for c in nodes {
        let slot = usize::try_from(c.node)
            .ok()
            .and_then(|i| by_id.get_mut(i))
            .ok_or_else(|| {
                numa_err(format!(
                    "node {} given, but with {n} nodes the ids must be 0 to {}",
                    c.node,
                    n - 1
                ))
            })?;
        if slot.is_some() {
            return Err(numa_err(format!("node {} is given twice", c.node)));
        }
        *slot = Some(c);
    }
    let by_id: Vec<&NumaConfig> = by_id.into_iter().flatten().collect();
    let mut owner: Vec<Option<usize>> = vec![None; usize::from(vcpus)];
    let mut out = Vec::with_capacity(n);
    let mut total = 0u64;
    let mut given = vec![vec![None::<u8>; n]; n];
    for (i, c) in by_id.iter().enumerate() {
        let ids = parse_id_list(&c.cpus, "vCPU").map_err(|e| numa_err(format!("node {i}: {e}")))?;
        let mut cpus = Vec::with_capacity(ids.len());
        for id in ids {
            let slot = usize::try_from(id)
                .ok()
                .and_then(|x| owner.get_mut(x))
                .ok_or_else(|| {
                    numa_err(format!(
                        "node {i} names vCPU {id}, the machine has {vcpus} vCPUs"
                    ))
                })?;
            if let Some(j) = slot {
                return Err(numa_err(format!(
                    "vCPU {id} is in node {j} and in node {i}"
                )));
            }
            *slot = Some(i);
            cpus.push(u8::try_from(id).unwrap_or(u8::MAX));
        }
        if c.memory_mib == 0 {
            return Err(numa_err(format!("node {i} has no memory (memory_mib = 0)")));
        }
        total = total.saturating_add(c.memory_mib);
        if c.policy.is_some() && c.host_node.is_none() {
            return Err(numa_err(format!("node {i}: policy needs host_node")));
        }
        for part in c
            .distances
            .iter()
            .flat_map(|d| d.split(','))
            .map(str::trim)
            .filter(|p| !p.is_empty())
        {
            let parsed = part.split_once(':').and_then(|(a, b)| {
                Some((
                    a.trim().parse::<usize>().ok()?,
                    b.trim().parse::<u64>().ok()?,
                ))
            });
            let Some((to, d)) = parsed else {
                return Err(numa_err(format!(
                    "node {i}: distance {part:?} is not NODE:DISTANCE"
                )));
            };
            if to >= n {
                return Err(numa_err(format!(
                    "node {i}: distance to node {to}, which does not exist"
                )));
            }
            if to == i {
                return Err(numa_err(format!(
                    "node {i}: a distance to itself is always {LOCAL_DISTANCE}"
                )));
            }
            let d = u8::try_from(d)
                .ok()
                .filter(|d| (11..=254).contains(d))
                .ok_or_else(|| {
                    numa_err(format!(
                        "node {i}: distance {d} to node {to} must be 11 to 254"
                    ))
                })?;
            given[i][to] = Some(d);
        }
        out.push(NumaNode {
            cpus,
            memory_mib: c.memory_mib,
            host: c.host_node.map(|h| (h, c.policy.unwrap_or_default())),
            distances: Vec::new(),
        });
    }
    if let Some(cpu) = owner.iter().position(Option::is_none) {
        return Err(numa_err(format!("vCPU {cpu} is in no node")));
    }
    if total != memory_mib {
        return Err(numa_err(format!(
            "the nodes' memory adds up to {total} MiB, the machine has {memory_mib} MiB"
        )));
    }
    for (i, node) in out.iter_mut().enumerate() {
        let mut row = Vec::with_capacity(n);
        for (j, back) in given.iter().enumerate() {
            let d = match (i == j, given[i][j], back[i]) {
                (true, _, _) => LOCAL_DISTANCE,
                (false, Some(a), Some(b)) if a != b => {
                    return Err(numa_err(format!(
                        "distance {i}->{j} is {a} but {j}->{i} is {b}: distances must be the same both ways"
                    )))
                }
                (false, Some(a), _) | (false, None, Some(a)) => a,
                (false, None, None) => DEFAULT_REMOTE_DISTANCE,
            };
            row.push(d);
        }
        node.distances = row;
    }
    Ok(out)
}

/// Parses `--vcpu-affinity 0=2,1=3` (or the same string in `[machine]
/// vcpu_affinity`): vCPU `V` runs on host CPU `C`; a bare item after
/// `V=C` adds another CPU to the same vCPU (`0=2,3` pins vCPU 0 to CPUs 2
/// and 3). Returns one entry per vCPU (empty: not pinned).
pub fn parse_affinity(text: &str, vcpus: u8) -> Result<Vec<Vec<usize>>, ConfigError> {
    let bad = |why: String| ConfigError::Affinity(why);
    let mut out = vec![Vec::new(); usize::from(vcpus)];
    let mut last: Option<usize> = None;
    for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (vcpu, cpus) = match part.split_once('=') {
            Some((v, c)) => {
                let v: usize = v
                    .trim()
                    .parse()
                    .map_err(|_| bad(format!("{part:?}: vCPU {v:?} is not a number")))?;
                if v >= usize::from(vcpus) {
                    return Err(bad(format!(
                        "vCPU {v} does not exist (the machine has {vcpus})"
                    )));
                }
                if !out[v].is_empty() {
                    return Err(bad(format!("vCPU {v} is given twice")));
                }
                (v, c)
            }
            None => (
                last.ok_or_else(|| bad(format!("{part:?} is not VCPU=HOST_CPU")))?,
                part,
            ),
        };
        let ids = parse_id_list(cpus, "host CPU").map_err(bad)?;
        out[vcpu].extend(
            ids.into_iter()
                .map(|c| usize::try_from(c).unwrap_or(usize::MAX)),
        );
        last = Some(vcpu);
    }
    Ok(out)
}

/// Checks a layout read back from a snapshot or a migration stream (input
/// from outside, like a configuration): every vCPU in exactly one node,
/// the nodes' memory adding up, a distance from each node to each, and
/// one affinity list per vCPU (or none at all).
pub fn check_saved(
    nodes: &[NumaNode],
    affinity: &[Vec<usize>],
    vcpus: u8,
    memory_mib: u64,
) -> Result<(), String> {
    if !affinity.is_empty() && affinity.len() != usize::from(vcpus) {
        return Err(format!(
            "{} vCPU affinity lists for {vcpus} vCPUs",
            affinity.len()
        ));
    }
    if nodes.is_empty() {
        return Ok(());
    }
    let mut seen = vec![false; usize::from(vcpus)];
    let mut total = 0u64;
    for (i, n) in nodes.iter().enumerate() {
        for &c in &n.cpus {
            match seen.get_mut(usize::from(c)) {
                Some(s) if !*s => *s = true,
                Some(_) => return Err(format!("NUMA node {i}: vCPU {c} is in two nodes")),
                None => return Err(format!("NUMA node {i}: vCPU {c} of {vcpus}")),
            }
        }
        total = total.saturating_add(n.memory_mib);
        if n.distances.len() != nodes.len() || n.distances.get(i) != Some(&LOCAL_DISTANCE) {
            return Err(format!("NUMA node {i}: distances {:?}", n.distances));
        }
    }
    if let Some(c) = seen.iter().position(|s| !s) {
        return Err(format!("vCPU {c} is in no NUMA node"));
    }
    if total != memory_mib {
        return Err(format!(
            "the NUMA nodes have {total} MiB, the machine {memory_mib} MiB"
        ));
    }
    Ok(())
}

/// The host's online CPUs and NUMA nodes, for the checks that need the
/// host (a pinned CPU or a bound node that does not exist).
pub fn check_host(nodes: &[NumaNode], affinity: &[Vec<usize>]) -> Result<(), ConfigError> {
    // A jailed VMM may not see /sys: mbind and sched_setaffinity then say
    // what is wrong themselves.
    if !std::path::Path::new("/sys/devices/system/cpu/online").exists() {
        return Ok(());
    }
    for (i, node) in nodes.iter().enumerate() {
        if let Some((h, _)) = node.host {
            let dir = format!("/sys/devices/system/node/node{h}");
            if !std::path::Path::new(&dir).exists() {
                let have = host_list("/sys/devices/system/node/online");
                return Err(numa_err(format!(
                    "node {i}: host node {h} does not exist (this host has nodes {have})"
                )));
            }
        }
    }
    let online = host_list("/sys/devices/system/cpu/online");
    let online_ids = parse_id_list(&online, "host CPU").unwrap_or_default();
    for (v, cpus) in affinity.iter().enumerate() {
        for &c in cpus {
            if !online_ids.contains(&(c as u64)) {
                return Err(ConfigError::Affinity(format!(
                    "vCPU {v}: host CPU {c} is not online (this host has CPUs {online})"
                )));
            }
        }
    }
    Ok(())
}

fn host_list(path: &str) -> String {
    std::fs::read_to_string(path)
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "0".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_saved_layout_is_checked_again() {
        let node = |cpus: Vec<u8>, mib, d: Vec<u8>| NumaNode {
            cpus,
            memory_mib: mib,
            host: Some((0, NumaPolicy::Preferred)),
            distances: d,
        };
        let good = vec![
            node(vec![0], 64, vec![10, 20]),
            node(vec![1], 64, vec![20, 10]),
        ];
        assert_eq!(check_saved(&good, &[vec![0], vec![1]], 2, 128), Ok(()));
        assert_eq!(check_saved(&[], &[], 2, 128), Ok(()));
        let text = serde_json::to_string(&good).unwrap();
        let back: Vec<NumaNode> = serde_json::from_str(&text).unwrap();
        assert_eq!(back, good);
        for (nodes, aff, want) in [
            (
                good.clone(),
                vec![vec![0]],
                "1 vCPU affinity lists for 2 vCPUs",
            ),
            (
                vec![
                    node(vec![0, 1], 64, vec![10, 20]),
                    node(vec![1], 64, vec![20, 10]),
                ],
                vec![],
                "NUMA node 1: vCPU 1 is in two nodes",
            ),
            (
                vec![
                    node(vec![0], 64, vec![10, 20]),
                    node(vec![1], 32, vec![20, 10]),
                ],
                vec![],
                "the NUMA nodes have 96 MiB, the machine 128 MiB",
            ),
            (
                vec![node(vec![0], 64, vec![10]), node(vec![1], 64, vec![20, 10])],
                vec![],
                "NUMA node 0: distances [10]",
            ),
            (
                vec![node(vec![0], 128, vec![10])],
                vec![],
                "vCPU 1 is in no NUMA node",
            ),
        ] {
            assert_eq!(check_saved(&nodes, &aff, 2, 128), Err(want.to_string()));
        }
    }

    fn node(flag: &str) -> NumaConfig {
        NumaConfig::parse_flag(flag).unwrap()
    }

    #[test]
    fn flags_parse_with_lists_and_defaults() {
        let n =
            node("node=1,cpus=0-1,4,memory=512,host_node=0,policy=preferred,distances=0:30,2:40");
        assert_eq!(n.node, 1);
        assert_eq!(n.cpus, "0-1,4");
        assert_eq!(n.memory_mib, 512);
        assert_eq!(
            (n.host_node, n.policy),
            (Some(0), Some(NumaPolicy::Preferred))
        );
        assert_eq!(n.distances.as_deref(), Some("0:30,2:40"));
        for (flag, why) in [
            ("cpus=0,memory=1", "node= is missing"),
            ("node=0,memory=1", "cpus= is missing"),
            ("node=0,cpus=0", "memory= is missing"),
            ("node=0,cpus=0,memory=x", "memory=x: not a number"),
            (
                "node=0,cpus=0,memory=1,policy=strict",
                "expected bind or preferred",
            ),
            ("node=0,cpus=0,memory=1,size=2", "unknown key \"size\""),
            ("node=0,memory=1,7", "\"7\" is not KEY=VALUE"),
        ] {
            let e = NumaConfig::parse_flag(flag).unwrap_err().to_string();
            assert!(e.contains(why), "{flag}: {e}");
            assert!(e.starts_with(&format!("--numa {flag}: ")), "{e}");
        }
    }

    #[test]
    fn layouts_validate_into_a_symmetric_matrix() {
        let nodes = [
            node("node=1,cpus=2-3,memory=256,distances=0:30"),
            node("node=0,cpus=0-1,memory=256"),
            node("node=2,cpus=4,memory=512,host_node=0"),
        ];
        let v = validate(&nodes, 5, 1024).unwrap();
        assert_eq!(v[0].cpus, vec![0, 1]);
        assert_eq!(v[1].cpus, vec![2, 3]);
        assert_eq!(v[0].distances, vec![10, 30, 20]);
        assert_eq!(v[1].distances, vec![30, 10, 20]);
        assert_eq!(v[2].distances, vec![20, 20, 10]);
        assert_eq!(v[2].host, Some((0, NumaPolicy::Bind)));
        assert!(validate(&[], 2, 128).unwrap().is_empty());
    }

    #[test]
    fn bad_layouts_name_the_problem() {
        let two = |a: &str, b: &str| vec![node(a), node(b)];
        for (nodes, vcpus, mem, why) in [
            (
                two("node=0,cpus=0-1,memory=128", "node=1,cpus=1,memory=128"),
                2,
                256,
                "vCPU 1 is in node 0 and in node 1",
            ),
            (
                two("node=0,cpus=0,memory=128", "node=1,cpus=1,memory=128"),
                3,
                256,
                "vCPU 2 is in no node",
            ),
            (
                two("node=0,cpus=0,memory=128", "node=1,cpus=1,memory=100"),
                2,
                256,
                "adds up to 228 MiB, the machine has 256 MiB",
            ),
            (
                two("node=0,cpus=0,memory=128", "node=2,cpus=1,memory=128"),
                2,
                256,
                "node 2 given, but with 2 nodes the ids must be 0 to 1",
            ),
            (
                two("node=0,cpus=0,memory=128", "node=0,cpus=1,memory=128"),
                2,
                256,
                "node 0 is given twice",
            ),
            (
                two("node=0,cpus=0,memory=128", "node=1,cpus=5,memory=128"),
                2,
                256,
                "node 1 names vCPU 5, the machine has 2 vCPUs",
            ),
            (
                two(
                    "node=0,cpus=0,memory=128,distances=1:20",
                    "node=1,cpus=1,memory=128,distances=0:30",
                ),
                2,
                256,
                "distances must be the same both ways",
            ),
            (
                two(
                    "node=0,cpus=0,memory=128,distances=1:5",
                    "node=1,cpus=1,memory=128",
                ),
                2,
                256,
                "must be 11 to 254",
            ),
            (
                two(
                    "node=0,cpus=0,memory=128,distances=3:20",
                    "node=1,cpus=1,memory=128",
                ),
                2,
                256,
                "distance to node 3, which does not exist",
            ),
            (
                two(
                    "node=0,cpus=0,memory=128,distances=0:20",
                    "node=1,cpus=1,memory=128",
                ),
                2,
                256,
                "a distance to itself is always 10",
            ),
            (
                two(
                    "node=0,cpus=0,memory=128,policy=bind",
                    "node=1,cpus=1,memory=128",
                ),
                2,
                256,
                "policy needs host_node",
            ),
            (
                two("node=0,cpus=0,memory=0", "node=1,cpus=1,memory=256"),
                2,
                256,
                "node 0 has no memory",
            ),
        ] {
            let e = validate(&nodes, vcpus, mem).unwrap_err().to_string();
            assert!(e.contains(why), "{why}: {e}");
            assert!(e.starts_with("numa: "), "{e}");
        }
    }

    #[test]
    fn affinity_parses_and_refuses_bad_pins() {
        assert_eq!(
            parse_affinity("0=2,1=3", 2).unwrap(),
            vec![vec![2], vec![3]]
        );
        assert_eq!(
            parse_affinity("1=0-1,3", 3).unwrap(),
            vec![vec![], vec![0, 1, 3], vec![]]
        );
        for (text, why) in [
            ("2=0", "vCPU 2 does not exist (the machine has 2)"),
            ("0=1,0=1", "vCPU 0 is given twice"),
            ("x=1", "vCPU \"x\" is not a number"),
            ("0=a", "not a number or a range"),
            ("1", "is not VCPU=HOST_CPU"),
        ] {
            let e = parse_affinity(text, 2).unwrap_err().to_string();
            assert!(e.contains(why), "{text}: {e}");
        }
        let pinned = parse_affinity("0=4095", 1).unwrap();
        let e = check_host(&[], &pinned).unwrap_err().to_string();
        assert!(e.contains("host CPU 4095 is not online"), "{e}");
        let far = NumaNode {
            cpus: vec![0],
            memory_mib: 128,
            host: Some((999, NumaPolicy::Bind)),
            distances: vec![10],
        };
        let e = check_host(&[far], &[]).unwrap_err().to_string();
        assert!(e.contains("host node 999 does not exist"), "{e}");
    }
}
