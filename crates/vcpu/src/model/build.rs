//! Building a model's CPUID from the host's: identity (vendor,
//! family/model/stepping, brand), feature bits, levels and cache leaves.

use kvm_bindings::kvm_cpuid_entry2;

use super::features::{self, Location, FEATURES};
use super::{Cache, ModelDef, Reg, Vendor};

use crate::cpuid::{leaf_matches as matches, reg_mut as reg, FLAG_SIGNIFICANT_INDEX};

/// Whether `leaf.subleaf` `r` bit `bit` is set in `entries`.
pub fn bit_set(entries: &[kvm_cpuid_entry2], leaf: u32, subleaf: u32, r: Reg, bit: u32) -> bool {
    entries
        .iter()
        .filter(|e| matches(e, leaf, subleaf))
        .any(|e| *reg(&mut e.to_owned(), r) & (1 << bit) != 0)
}

/// The entry for `leaf.subleaf`, added (zeroed) if missing.
fn entry(entries: &mut Vec<kvm_cpuid_entry2>, leaf: u32, subleaf: u32) -> &mut kvm_cpuid_entry2 {
    let i = match entries.iter().position(|e| matches(e, leaf, subleaf)) {
        Some(i) => i,
        None => {
            entries.push(kvm_cpuid_entry2 {
                function: leaf,
                index: subleaf,
                flags: if matches!(leaf, 4 | 7 | 0xb | 0xd | 0x8000_001d) {
                    FLAG_SIGNIFICANT_INDEX
                } else {
                    0
                },
                ..Default::default()
            });
            entries.len() - 1
        }
    };
    &mut entries[i]
}

/// Sets or clears one bit, adding the leaf when setting.
pub fn set_bit(
    entries: &mut Vec<kvm_cpuid_entry2>,
    leaf: u32,
    sub: u32,
    r: Reg,
    bit: u32,
    on: bool,
) {
    if on {
        *reg(entry(entries, leaf, sub), r) |= 1 << bit;
    } else {
        for e in entries.iter_mut().filter(|e| matches(e, leaf, sub)) {
            *reg(e, r) &= !(1 << bit);
        }
    }
}

/// Sets or clears the CPUID bit of feature `name` (MSR features aside).
pub fn set_feature(entries: &mut Vec<kvm_cpuid_entry2>, name: &str, on: bool) {
    if let Some(Location::Cpuid {
        leaf,
        subleaf,
        reg,
        bit,
    }) = features::find(name).map(|f| f.location)
    {
        set_bit(entries, leaf, subleaf, reg, bit, on);
    }
}

fn regs_string(regs: &[u32]) -> String {
    let bytes: Vec<u8> = regs.iter().flat_map(|r| r.to_le_bytes()).collect();
    String::from_utf8_lossy(&bytes)
        .trim_end_matches('\0')
        .trim()
        .to_string()
}

fn get(entries: &[kvm_cpuid_entry2], leaf: u32) -> Option<&kvm_cpuid_entry2> {
    entries.iter().find(|e| e.function == leaf && e.index == 0)
}

/// The vendor of a CPUID.
pub fn vendor_of(entries: &[kvm_cpuid_entry2]) -> Option<Vendor> {
    get(entries, 0).and_then(|e| match regs_string(&[e.ebx, e.edx, e.ecx]).as_str() {
        "GenuineIntel" => Some(Vendor::Intel),
        "AuthenticAMD" => Some(Vendor::Amd),
        _ => None,
    })
}

/// (vendor id, family, model, stepping, brand) of a CPUID.
pub fn identity(entries: &[kvm_cpuid_entry2]) -> (String, u32, u32, u32, String) {
    let vendor = get(entries, 0)
        .map(|e| regs_string(&[e.ebx, e.edx, e.ecx]))
        .unwrap_or_default();
    let (family, model, stepping) = get(entries, 1).map_or((0, 0, 0), |e| decode_signature(e.eax));
    let brand: Vec<u32> = (0x8000_0002..=0x8000_0004)
        .filter_map(|l| get(entries, l))
        .flat_map(|e| [e.eax, e.ebx, e.ecx, e.edx])
        .collect();
    (vendor, family, model, stepping, regs_string(&brand))
}

/// Leaf 1 EAX from the displayed family/model/stepping.
pub fn encode_signature(family: u32, model: u32, stepping: u32) -> u32 {
    let (base_family, ext_family) = if family > 0xf {
        (0xf, family - 0xf)
    } else {
        (family, 0)
    };
    (ext_family & 0xff) << 20
        | ((model >> 4) & 0xf) << 16
        | (base_family & 0xf) << 8
        | (model & 0xf) << 4
        | (stepping & 0xf)
}

/// The displayed (family, model, stepping) of leaf 1 EAX.
pub fn decode_signature(eax: u32) -> (u32, u32, u32) {
    let base_family = (eax >> 8) & 0xf;
    let family = if base_family == 0xf {
        base_family + ((eax >> 20) & 0xff)
    } else {
        base_family
    };
    let model = if base_family == 0x6 || base_family == 0xf {
        ((eax >> 4) & 0xf) | (((eax >> 16) & 0xf) << 4)
    } else {
        (eax >> 4) & 0xf
    };
    (family, model, eax & 0xf)
}

/// The (leaf, subleaf, register) words that hold named CPUID features.
fn feature_words() -> Vec<(u32, u32, Reg)> {
    let mut v: Vec<(u32, u32, Reg)> = Vec::new();
    for f in FEATURES {
        if let Location::Cpuid {
            leaf, subleaf, reg, ..
        } = f.location
        {
            if !v.contains(&(leaf, subleaf, reg)) {
                v.push((leaf, subleaf, reg));
            }
        }
    }
    v
}

/// Bits of feature words that are not features ember chooses but state the
/// OS or the topology sets (OSXSAVE, OSPKE, HTT, CMP_LEGACY): kept as KVM
/// has them; [`crate::cpuid::normalize`] sets them per vCPU.
fn kept_bits(leaf: u32, subleaf: u32, r: Reg) -> u32 {
    match (leaf, subleaf, r) {
        (1, 0, Reg::Ecx) => 1 << 27,
        (1, 0, Reg::Edx) => 1 << 28,
        (7, 0, Reg::Ecx) => 1 << 4,
        (0x8000_0001, 0, Reg::Ecx) => 1 << 1,
        _ => 0,
    }
}

/// Leaf 1 EDX bits AMD repeats in 0x8000_0001 EDX (fpu..pat, pse36, mmx,
/// fxsr: every bit but the ones with other meanings there).
const AMD_EDX_ALIASES: u32 = 0x0183_f3ff;

/// The host's CPUID with exactly `guest` as its named features and, for a
/// named model, the model's identity, levels and caches.
pub fn with_features(
    host: &[kvm_cpuid_entry2],
    guest: &[&str],
    model: Option<&ModelDef>,
) -> Vec<kvm_cpuid_entry2> {
    let mut e = host.to_vec();
    for (leaf, sub, r) in feature_words() {
        let keep = kept_bits(leaf, sub, r);
        for x in e.iter_mut().filter(|x| matches(x, leaf, sub)) {
            *reg(x, r) &= keep;
        }
    }
    for n in guest {
        set_feature(&mut e, n, true);
    }
    let vendor = model.map(|m| m.vendor).or_else(|| vendor_of(host));
    if vendor == Some(Vendor::Amd) {
        let l1 = get(&e, 1).map_or(0, |x| x.edx);
        entry(&mut e, 0x8000_0001, 0).edx |= l1 & AMD_EDX_ALIASES;
    }
    if let Some(m) = model {
        set_identity(&mut e, m);
    }
    e
}

fn set_identity(e: &mut Vec<kvm_cpuid_entry2>, m: &ModelDef) {
    let id = m.vendor.id().as_bytes();
    let word = |i: usize| u32::from_le_bytes([id[i], id[i + 1], id[i + 2], id[i + 3]]);
    let (b, d, c) = (word(0), word(4), word(8));
    // Levels: the model's, but never past the leaves KVM offers.
    let max_basic = e
        .iter()
        .filter(|x| x.function < 0x4000_0000)
        .map(|x| x.function)
        .max();
    let max_ext = e
        .iter()
        .filter(|x| x.function >= 0x8000_0000)
        .map(|x| x.function)
        .max();
    let level = m.level.min(max_basic.unwrap_or(m.level));
    let xlevel = m
        .xlevel
        .max(0x8000_0008)
        .min(max_ext.unwrap_or(m.xlevel).max(0x8000_0008));
    // Basic leaves past the level and extended ones past the xlevel go.
    e.retain(|x| {
        let f = x.function;
        let beyond_basic = f > level && f < 0x4000_0000;
        let beyond_ext = f >= 0x8000_0000 && f > xlevel;
        !(beyond_basic || beyond_ext)
    });
    let l0 = entry(e, 0, 0);
    (l0.eax, l0.ebx, l0.edx, l0.ecx) = (level, b, d, c);
    let x0 = entry(e, 0x8000_0000, 0);
    x0.eax = xlevel;
    (x0.ebx, x0.edx, x0.ecx) = match m.vendor {
        Vendor::Amd => (b, d, c),
        Vendor::Intel => (0, 0, 0),
    };
    entry(e, 1, 0).eax = encode_signature(m.family, m.model, m.stepping);
    let mut brand = [0u8; 48];
    let n = m.brand.len().min(47);
    brand[..n].copy_from_slice(&m.brand.as_bytes()[..n]);
    for (i, leaf) in (0x8000_0002..=0x8000_0004).enumerate() {
        let w = |j: usize| {
            let o = i * 16 + j * 4;
            u32::from_le_bytes([brand[o], brand[o + 1], brand[o + 2], brand[o + 3]])
        };
        let x = entry(e, leaf, 0);
        (x.eax, x.ebx, x.ecx, x.edx) = (w(0), w(1), w(2), w(3));
    }
    set_caches(e, m);
}

/// AMD's associativity encoding (0x8000_0006; 9 = "see 0x8000_001D").
fn amd_assoc(ways: u32) -> u32 {
    match ways {
        1 => 1,
        2 => 2,
        3 => 3,
        4 => 4,
        6 => 5,
        8 => 6,
        16 => 8,
        32 => 0xa,
        48 => 0xb,
        64 => 0xc,
        96 => 0xd,
        128 => 0xe,
        _ => 9,
    }
}

/// Leaf 4 EAX..EDX for one cache (sharing fields are set per vCPU by
/// `normalize`).
fn leaf4(kind: u32, level: u32, c: Cache, inclusive: bool) -> [u32; 4] {
    let sets = c.kib * 1024 / (c.ways * 64);
    [
        kind | (level << 5) | (1 << 8),
        63 | ((c.ways - 1) << 22),
        sets - 1,
        if level == 3 { 1 << 2 } else { 0 } | if inclusive { 1 << 1 } else { 0 },
    ]
}

fn set_caches(e: &mut Vec<kvm_cpuid_entry2>, m: &ModelDef) {
    let c = m.caches;
    // L2 in 0x8000_0006 ECX (both vendors read it).
    let l2 = (c.l2.kib << 16) | (amd_assoc(c.l2.ways) << 12) | 64;
    match m.vendor {
        Vendor::Intel => {
            e.retain(|x| x.function != 4 && x.function != 2 && x.function != 0x8000_001d);
            // Leaf 2: descriptor 0xff, "see leaf 4".
            let x = entry(e, 2, 0);
            (x.eax, x.ebx, x.ecx, x.edx) = (0x00ff_0001, 0, 0, 0);
            let leaves = [
                leaf4(1, 1, c.l1d, false),
                leaf4(2, 1, c.l1i, false),
                leaf4(3, 2, c.l2, false),
                leaf4(3, 3, c.l3, false),
                [0; 4],
            ];
            for (i, r) in (0u32..).zip(leaves.iter()) {
                let x = entry(e, 4, i);
                (x.eax, x.ebx, x.ecx, x.edx) = (r[0], r[1], r[2], r[3]);
            }
            let x = entry(e, 0x8000_0006, 0);
            (x.ecx, x.edx) = (l2, 0);
            let x = entry(e, 0x8000_0005, 0);
            (x.ecx, x.edx) = (0, 0);
        }
        Vendor::Amd => {
            e.retain(|x| x.function != 4 && x.function != 2);
            let l1 = |c: Cache| (c.kib << 24) | (c.ways << 16) | (1 << 8) | 64;
            let x = entry(e, 0x8000_0005, 0);
            (x.ecx, x.edx) = (l1(c.l1d), l1(c.l1i));
            let x = entry(e, 0x8000_0006, 0);
            // L3 size in 512 KiB units.
            (x.ecx, x.edx) = (
                l2,
                ((c.l3.kib / 512) << 18) | (amd_assoc(c.l3.ways) << 12) | 64,
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signatures_round_trip() {
        for (f, m, s) in [
            (6, 85, 4),
            (6, 143, 4),
            (23, 1, 2),
            (25, 17, 0),
            (6, 106, 0),
            (15, 107, 1),
        ] {
            let eax = encode_signature(f, m, s);
            assert_eq!(decode_signature(eax), (f, m, s), "{eax:#x}");
        }
        // Skylake-SP: 0x50654; Genoa: 0xa10f10 (stepping 0).
        assert_eq!(encode_signature(6, 85, 4), 0x0005_0654);
        assert_eq!(encode_signature(25, 17, 0), 0x00a1_0f10);
    }

    #[test]
    fn leaf4_describes_the_cache() {
        let r = leaf4(
            3,
            3,
            Cache {
                kib: 28160,
                ways: 11,
            },
            false,
        );
        assert_eq!(r[0] & 0x1f, 3);
        assert_eq!((r[0] >> 5) & 7, 3);
        assert_eq!((r[1] >> 22) + 1, 11);
        assert_eq!((r[1] & 0xfff) + 1, 64);
        let size = ((r[1] >> 22) + 1) * ((r[1] & 0xfff) + 1) * (r[2] + 1);
        assert_eq!(size, 28160 * 1024);
    }
}
