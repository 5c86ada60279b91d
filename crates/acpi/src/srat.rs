//! The SRAT (System Resource Affinity Table): which proximity domain each
//! vCPU and each RAM range is in. acpi_tables' SRAT has no entry for x86
//! local APICs, so the table is put together here on its generic `Sdt`.

use acpi_tables::sdt::Sdt;
use acpi_tables::srat::MemoryAffinity;

use crate::{bytes, Error, Machine, MAX_NODES, OEM_ID, OEM_REVISION, OEM_TABLE_ID};

/// Local APIC affinity entry (type 0, 16 bytes; ACPI 6.5, 5.2.16.1).
fn apic_affinity(domain: u32, apic_id: u8) -> [u8; 16] {
    let d = domain.to_le_bytes();
    let mut e = [0u8; 16];
    e[0] = 0; // type
    e[1] = 16; // length
    e[2] = d[0]; // proximity domain [7:0]
    e[3] = apic_id;
    e[4..8].copy_from_slice(&1u32.to_le_bytes()); // enabled
    e[8] = 0; // local SAPIC EID
    e[9..12].copy_from_slice(&d[1..4]); // proximity domain [31:8]
                                        // Clock domain 0 (bytes 12..16).
    e
}

pub(crate) fn build(m: &Machine) -> Vec<u8> {
    // Header, then 4 reserved bytes that must hold 1 and 8 reserved bytes.
    let mut sdt = Sdt::new(*b"SRAT", 48, 3, OEM_ID, OEM_TABLE_ID, OEM_REVISION);
    sdt.write_u32(36, 1);
    for (domain, node) in (0u32..).zip(&m.numa) {
        for &cpu in &node.cpus {
            sdt.append_slice(&apic_affinity(domain, cpu));
        }
    }
    for (domain, node) in (0u32..).zip(&m.numa) {
        for w in &node.memory {
            sdt.append_slice(&bytes(
                &MemoryAffinity::new(domain, w.base, w.size).enabled(),
            ));
        }
    }
    sdt.as_slice().to_vec()
}

/// Every vCPU in exactly one node, a full symmetric distance matrix with 10
/// on its diagonal and 11-254 elsewhere.
pub(crate) fn check_nodes(m: &Machine) -> Result<(), Error> {
    let n = m.numa.len();
    if n == 0 {
        return Ok(());
    }
    let bad = |s: String| Err(Error::Numa(s));
    if n > MAX_NODES {
        return bad(format!("{n} nodes, at most {MAX_NODES}"));
    }
    let mut owner = vec![None; usize::from(m.cpus)];
    for (i, node) in m.numa.iter().enumerate() {
        for &cpu in &node.cpus {
            match owner.get_mut(usize::from(cpu)) {
                None => {
                    return bad(format!(
                        "node {i} names vCPU {cpu}, the machine has {}",
                        m.cpus
                    ))
                }
                Some(Some(j)) => return bad(format!("vCPU {cpu} is in node {j} and in node {i}")),
                Some(slot) => *slot = Some(i),
            }
        }
        if node.distances.len() != n {
            return bad(format!(
                "node {i} has {} distances for {n} nodes",
                node.distances.len()
            ));
        }
        for (j, &d) in node.distances.iter().enumerate() {
            let want_local = i == j;
            if want_local && d != 10 {
                return bad(format!(
                    "node {i}'s distance to itself is {d}, it must be 10"
                ));
            }
            if !want_local && !(11..=254).contains(&d) {
                return bad(format!("distance {i}->{j} is {d}: it must be 11 to 254"));
            }
            if m.numa[j].distances.get(i).is_some_and(|&back| back != d) {
                return bad(format!(
                    "distance {i}->{j} is {d} but {j}->{i} is {}: distances must be symmetric",
                    m.numa[j].distances[i]
                ));
            }
        }
    }
    if let Some(cpu) = owner.iter().position(Option::is_none) {
        return bad(format!("vCPU {cpu} is in no node"));
    }
    Ok(())
}
