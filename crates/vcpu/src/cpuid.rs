//! CPUID normalisation.
//!
//! KVM reports what it can virtualise (`KVM_GET_SUPPORTED_CPUID`); each vCPU
//! gets that set, made consistent with the VM's topology (one socket, one
//! thread per core, `vcpu_count` cores, APIC id = vCPU index) and with the
//! features masked that a guest must not use (see [`MASKED_FEATURES`]).
//!
//! The functions work on plain `kvm_cpuid_entry2` slices so they are unit
//! tested without `/dev/kvm`.

use kvm_bindings::kvm_cpuid_entry2;

/// `KVM_CPUID_FLAG_SIGNIFCANT_INDEX`: the entry depends on the subleaf.
pub(crate) const FLAG_SIGNIFICANT_INDEX: u32 = 1;

/// Which register of a CPUID leaf a feature bit lives in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Reg {
    /// EAX.
    Eax,
    /// EBX.
    Ebx,
    /// ECX.
    Ecx,
    /// EDX.
    Edx,
}

/// One feature bit Ember hides from guests, and why.
#[derive(Clone, Copy, Debug)]
pub struct MaskedFeature {
    /// CPUID leaf.
    pub leaf: u32,
    /// Subleaf (index), for leaves that have them.
    pub subleaf: u32,
    /// Register.
    pub reg: Reg,
    /// Bit number.
    pub bit: u32,
    /// Linux's name for the feature.
    pub name: &'static str,
    /// Why it is hidden.
    pub why: &'static str,
}

const fn masked(
    leaf: u32,
    subleaf: u32,
    reg: Reg,
    bit: u32,
    name: &'static str,
    why: &'static str,
) -> MaskedFeature {
    MaskedFeature {
        leaf,
        subleaf,
        reg,
        bit,
        name,
        why,
    }
}

const EMULATOR: &str = "the instructions it enables are missing from the software \
                        hypervisor's emulator and end the VM when met with interrupts off";
const NEEDS_XSAVE: &str = "its register state is only managed through XSAVE, which is hidden";

/// Every feature bit Ember clears, with the reason. With these hidden a
/// guest needs none of `noxsave nofsgsbase noinvpcid clearcpuid=popcnt,smap`.
pub const MASKED_FEATURES: &[MaskedFeature] = &[
    masked(1, 0, Reg::Ecx, 12, "fma", NEEDS_XSAVE),
    masked(
        1,
        0,
        Reg::Ecx,
        13,
        "cx16",
        "lock cmpxchg16b: missing from the emulator (SLUB's fast path uses it)",
    ),
    masked(1, 0, Reg::Ecx, 23, "popcnt", EMULATOR),
    masked(
        1,
        0,
        Reg::Ecx,
        26,
        "xsave",
        "xsave/xrstor(s): missing from the emulator",
    ),
    masked(1, 0, Reg::Ecx, 27, "osxsave", "follows xsave"),
    masked(1, 0, Reg::Ecx, 28, "avx", NEEDS_XSAVE),
    masked(1, 0, Reg::Ecx, 29, "f16c", NEEDS_XSAVE),
    masked(7, 0, Reg::Ebx, 0, "fsgsbase", EMULATOR),
    masked(7, 0, Reg::Ebx, 5, "avx2", NEEDS_XSAVE),
    masked(7, 0, Reg::Ebx, 10, "invpcid", EMULATOR),
    masked(7, 0, Reg::Ebx, 16, "avx512f", NEEDS_XSAVE),
    masked(7, 0, Reg::Ebx, 17, "avx512dq", NEEDS_XSAVE),
    masked(
        7,
        0,
        Reg::Ebx,
        20,
        "smap",
        "clac/stac: missing from the emulator",
    ),
    masked(7, 0, Reg::Ebx, 21, "avx512ifma", NEEDS_XSAVE),
    masked(7, 0, Reg::Ebx, 26, "avx512pf", NEEDS_XSAVE),
    masked(7, 0, Reg::Ebx, 27, "avx512er", NEEDS_XSAVE),
    masked(7, 0, Reg::Ebx, 28, "avx512cd", NEEDS_XSAVE),
    masked(7, 0, Reg::Ebx, 30, "avx512bw", NEEDS_XSAVE),
    masked(7, 0, Reg::Ebx, 31, "avx512vl", NEEDS_XSAVE),
    masked(7, 0, Reg::Ecx, 1, "avx512vbmi", NEEDS_XSAVE),
    masked(7, 0, Reg::Ecx, 3, "pku", NEEDS_XSAVE),
    masked(7, 0, Reg::Ecx, 4, "ospke", NEEDS_XSAVE),
    masked(7, 0, Reg::Ecx, 6, "avx512_vbmi2", NEEDS_XSAVE),
    masked(7, 0, Reg::Ecx, 11, "avx512_vnni", NEEDS_XSAVE),
    masked(7, 0, Reg::Ecx, 12, "avx512_bitalg", NEEDS_XSAVE),
    masked(7, 0, Reg::Ecx, 14, "avx512_vpopcntdq", NEEDS_XSAVE),
    masked(7, 0, Reg::Edx, 2, "avx512_4vnniw", NEEDS_XSAVE),
    masked(7, 0, Reg::Edx, 3, "avx512_4fmaps", NEEDS_XSAVE),
    masked(7, 0, Reg::Edx, 8, "avx512_vp2intersect", NEEDS_XSAVE),
    masked(7, 0, Reg::Edx, 22, "amx_bf16", NEEDS_XSAVE),
    masked(7, 0, Reg::Edx, 24, "amx_tile", NEEDS_XSAVE),
    masked(7, 0, Reg::Edx, 25, "amx_int8", NEEDS_XSAVE),
    masked(7, 1, Reg::Eax, 4, "avx_vnni", NEEDS_XSAVE),
    masked(7, 1, Reg::Eax, 5, "avx512_bf16", NEEDS_XSAVE),
    masked(
        0x8000_0007,
        0,
        Reg::Edx,
        8,
        "invtsc",
        "invariant TSC: Linux would switch its clocksource from kvm-clock to the TSC \
         late in boot (a stop_machine: 0.23 s of emulated guest time on a software \
         hypervisor); guests stay on kvm-clock, as under QEMU's -cpu host",
    ),
    masked(
        0x8000_0001,
        0,
        Reg::Ecx,
        22,
        "topoext",
        "leaf 0x8000001E is not provided; topology comes from leaves 0xB and 0x80000008",
    ),
];

/// Leaves removed entirely.
const REMOVED_LEAVES: &[(u32, &str)] = &[
    (0xd, "XSAVE state enumeration: XSAVE is hidden"),
    (
        0x1f,
        "V2 extended topology: leaf 0xB describes the topology",
    ),
    (
        0x8000_001e,
        "AMD extended APIC id / compute units: TOPOEXT is hidden",
    ),
];

/// The APIC id of vCPU `index` (Ember uses the vCPU index).
pub fn apic_id(index: u8) -> u32 {
    u32::from(index)
}

/// Number of bits needed to number `count` things (ceil(log2(count))).
fn bits_for(count: u32) -> u32 {
    if count <= 1 {
        0
    } else {
        32 - (count - 1).leading_zeros()
    }
}

pub(crate) fn reg_mut(e: &mut kvm_cpuid_entry2, reg: Reg) -> &mut u32 {
    match reg {
        Reg::Eax => &mut e.eax,
        Reg::Ebx => &mut e.ebx,
        Reg::Ecx => &mut e.ecx,
        Reg::Edx => &mut e.edx,
    }
}

pub(crate) fn leaf_matches(e: &kvm_cpuid_entry2, leaf: u32, subleaf: u32) -> bool {
    e.function == leaf && (e.flags & FLAG_SIGNIFICANT_INDEX == 0 || e.index == subleaf)
}

/// Normalises `entries` (KVM's supported CPUID) for vCPU `index` of
/// `count`, in place; returns the entries to keep (removed leaves dropped).
pub fn normalize(entries: &[kvm_cpuid_entry2], index: u8, count: u8) -> Vec<kvm_cpuid_entry2> {
    let count = u32::from(count.max(1));
    let id = apic_id(index);
    let core_bits = bits_for(count);
    let mut out: Vec<kvm_cpuid_entry2> = entries
        .iter()
        .filter(|e| !REMOVED_LEAVES.iter().any(|&(leaf, _)| leaf == e.function))
        .copied()
        .collect();

    for e in out.iter_mut() {
        for m in MASKED_FEATURES {
            if leaf_matches(e, m.leaf, m.subleaf) {
                *reg_mut(e, m.reg) &= !(1u32 << m.bit);
            }
        }
        match e.function {
            0x1 => {
                // EBX: APIC id [31:24], logical processors per package [23:16],
                // CLFLUSH line size [15:8] kept.
                e.ebx = (e.ebx & 0x0000_ffff) | (id << 24) | ((count & 0xff) << 16);
                // HTT: more than one logical processor in the package.
                if count > 1 {
                    e.edx |= 1 << 28;
                } else {
                    e.edx &= !(1 << 28);
                }
                // We are a hypervisor guest.
                e.ecx |= 1 << 31;
            }
            0x4 => {
                // Deterministic cache parameters: cores per package - 1 in
                // [31:26]; threads sharing the cache - 1 in [25:14] (one per
                // core for L1/L2, the whole package for L3).
                let cache_type = e.eax & 0x1f;
                if cache_type != 0 {
                    let level = (e.eax >> 5) & 0x7;
                    let sharing = if level >= 3 { count - 1 } else { 0 };
                    e.eax =
                        (e.eax & 0x3fff) | ((sharing & 0xfff) << 14) | (((count - 1) & 0x3f) << 26);
                }
            }
            0x6 => {
                // No thermal/power management interface to drive.
                e.ecx &= !(1 << 3); // energy-perf bias
            }
            0xb => normalize_topology_leaf(e, id, core_bits, count),
            0x8000_0001 => {
                // CmpLegacy: the package has more than one core.
                if count > 1 {
                    e.ecx |= 1 << 1;
                } else {
                    e.ecx &= !(1 << 1);
                }
            }
            0x8000_0008 => {
                // AMD: number of cores - 1 [7:0], APIC id core bits [15:12].
                e.ecx = (e.ecx & !0xf0ff) | ((count - 1) & 0xff) | ((core_bits & 0xf) << 12);
            }
            _ => {}
        }
    }
    out
}

/// Leaf 0xB (extended topology): level 0 is SMT (one thread per core),
/// level 1 is the core level with `count` cores; further levels are invalid.
fn normalize_topology_leaf(e: &mut kvm_cpuid_entry2, id: u32, core_bits: u32, count: u32) {
    e.flags |= FLAG_SIGNIFICANT_INDEX;
    e.edx = id;
    match e.index {
        0 => {
            e.eax = 0;
            e.ebx = 1;
            e.ecx = 1 << 8;
        }
        1 => {
            e.eax = core_bits;
            e.ebx = count;
            e.ecx = 1 | (2 << 8);
        }
        i => {
            e.eax = 0;
            e.ebx = 0;
            e.ecx = i & 0xff;
        }
    }
}

/// The word of Linux's `x86_capability` array (arch/x86/include/asm/cpufeatures.h)
/// that holds a CPUID register, so `word * 32 + bit` is the number
/// `clearcpuid=` takes.
fn linux_cap_word(leaf: u32, subleaf: u32, reg: Reg) -> Option<u32> {
    match (leaf, subleaf, reg) {
        (1, 0, Reg::Edx) => Some(0),
        (0x8000_0001, 0, Reg::Edx) => Some(1),
        (1, 0, Reg::Ecx) => Some(4),
        (0x8000_0001, 0, Reg::Ecx) => Some(6),
        (7, 0, Reg::Ebx) => Some(9),
        (7, 1, Reg::Eax) => Some(12),
        (7, 0, Reg::Ecx) => Some(16),
        (7, 0, Reg::Edx) => Some(18),
        _ => None,
    }
}

impl MaskedFeature {
    /// Linux's number for this feature (`X86_FEATURE_*`), as `clearcpuid=` takes it.
    pub fn linux_number(&self) -> Option<u32> {
        linux_cap_word(self.leaf, self.subleaf, self.reg).map(|w| w * 32 + self.bit)
    }

    fn is_set_in(&self, entries: &[kvm_cpuid_entry2]) -> bool {
        entries
            .iter()
            .filter(|e| leaf_matches(e, self.leaf, self.subleaf))
            .any(|e| {
                let mut e = *e;
                *reg_mut(&mut e, self.reg) & (1 << self.bit) != 0
            })
    }
}

/// The masked features that are still visible in `effective`, the CPUID a
/// vCPU really has (`KVM_GET_CPUID2` after `KVM_SET_CPUID2`). On a normal KVM
/// host this is empty; a host that passes its own feature bits through
/// (such as PVM, which overrides leaves 1 and 7) leaves some visible.
pub fn forced_features(effective: &[kvm_cpuid_entry2]) -> Vec<&'static MaskedFeature> {
    MASKED_FEATURES
        .iter()
        .filter(|m| m.is_set_in(effective))
        .collect()
}

/// Kernel parameters that make a Linux guest ignore `features` even though
/// CPUID shows them: `noxsave` for XSAVE (and everything built on it), then
/// `clearcpuid=` with Linux's feature numbers (numbers, not names, work on
/// kernels built without `X86_FEATURE_NAMES`). `None` when there is nothing
/// to hide.
pub fn kernel_params_hiding(features: &[&MaskedFeature]) -> Option<String> {
    let xsave = features.iter().any(|f| f.name == "xsave");
    let numbers: Vec<String> = features
        .iter()
        // XSAVE's dependents (AVX, AVX-512, PKU, ...) go with it.
        .filter(|f| !xsave || (f.name != "xsave" && f.why != NEEDS_XSAVE && f.name != "osxsave"))
        .filter(|f| f.name != "topoext")
        .filter_map(|f| f.linux_number())
        .map(|n| n.to_string())
        .collect();
    let mut params = Vec::new();
    if xsave {
        params.push("noxsave".to_string());
    }
    if !numbers.is_empty() {
        params.push(format!("clearcpuid={}", numbers.join(",")));
    }
    (!params.is_empty()).then(|| params.join(" "))
}

/// The guest's physical address width from leaf 0x8000_0008 (36 when absent,
/// as the architecture says).
pub fn phys_address_bits(entries: &[kvm_cpuid_entry2]) -> u8 {
    entries
        .iter()
        .find(|e| e.function == 0x8000_0008)
        .map(|e| (e.eax & 0xff) as u8)
        .filter(|&b| b >= 32)
        .unwrap_or(36)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(
        function: u32,
        index: u32,
        eax: u32,
        ebx: u32,
        ecx: u32,
        edx: u32,
    ) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            flags: if matches!(function, 4 | 7 | 0xb | 0xd) {
                FLAG_SIGNIFICANT_INDEX
            } else {
                0
            },
            eax,
            ebx,
            ecx,
            edx,
            ..Default::default()
        }
    }

    fn host() -> Vec<kvm_cpuid_entry2> {
        vec![
            entry(0, 0, 0x10, 0x6874_7541, 0x444d_4163, 0x6974_6e65),
            entry(1, 0, 0x00a0_0f11, 0x0010_0800, 0xfff8_3203, 0x178b_fbff),
            entry(4, 0, 0x0000_0121, 0, 0, 0),
            entry(4, 3, 0x0000_0163, 0, 0, 0),
            entry(7, 0, 0, 0xffff_ffff, 0xffff_ffff, 0xffff_ffff),
            entry(7, 1, 0xffff_ffff, 0, 0, 0),
            entry(0xb, 0, 1, 2, 0x100, 7),
            entry(0xb, 1, 4, 16, 0x201, 7),
            entry(0xd, 0, 7, 0x340, 0x340, 0),
            entry(0xd, 1, 0xf, 0, 0, 0),
            entry(0x8000_0001, 0, 0, 0, 0xffff_ffff, 0),
            entry(0x8000_0007, 0, 0, 0, 0, 0x0000_0100),
            entry(0x8000_0008, 0, 0x3030, 0, 0x700f, 0),
            entry(0x8000_001e, 0, 0, 0x100, 0, 0),
        ]
    }

    fn find(v: &[kvm_cpuid_entry2], function: u32, index: u32) -> kvm_cpuid_entry2 {
        *v.iter()
            .find(|e| e.function == function && e.index == index)
            .unwrap_or_else(|| panic!("leaf {function:#x}.{index} missing"))
    }

    #[test]
    fn normalize_masks_every_listed_feature() {
        let out = normalize(&host(), 0, 2);
        for m in MASKED_FEATURES {
            if let Some(e) = out.iter().find(|e| leaf_matches(e, m.leaf, m.subleaf)) {
                let mut e = *e;
                assert_eq!(
                    *reg_mut(&mut e, m.reg) & (1 << m.bit),
                    0,
                    "{} still set",
                    m.name
                );
            }
        }
        // The flags the guest command line used to need.
        let l1 = find(&out, 1, 0);
        assert_eq!(l1.ecx & (1 << 26), 0, "xsave");
        assert_eq!(l1.ecx & (1 << 23), 0, "popcnt");
        let l7 = find(&out, 7, 0);
        assert_eq!(l7.ebx & (1 << 0), 0, "fsgsbase");
        assert_eq!(l7.ebx & (1 << 10), 0, "invpcid");
        assert_eq!(l7.ebx & (1 << 20), 0, "smap");
        // Guests stay on kvm-clock.
        assert_eq!(find(&out, 0x8000_0007, 0).edx & (1 << 8), 0, "invtsc");
    }

    #[test]
    fn normalize_keeps_unmasked_features() {
        let out = normalize(&host(), 0, 1);
        let l7 = find(&out, 7, 0);
        assert_ne!(l7.ebx & (1 << 7), 0, "smep is not masked");
        assert_ne!(find(&out, 1, 0).edx & 1, 0, "fpu is kept");
    }

    #[test]
    fn normalize_removes_xsave_and_amd_topology_leaves() {
        let out = normalize(&host(), 0, 2);
        assert!(out.iter().all(|e| e.function != 0xd));
        assert!(out.iter().all(|e| e.function != 0x8000_001e));
        assert_eq!(out.len(), host().len() - 3);
    }

    #[test]
    fn normalize_sets_apic_id_and_count_in_leaf1() {
        let out = normalize(&host(), 3, 4);
        let l1 = find(&out, 1, 0);
        assert_eq!(l1.ebx >> 24, 3);
        assert_eq!((l1.ebx >> 16) & 0xff, 4);
        assert_eq!((l1.ebx >> 8) & 0xff, 0x08, "clflush size kept");
        assert_ne!(l1.edx & (1 << 28), 0, "htt");
        assert_ne!(l1.ecx & (1 << 31), 0, "hypervisor");
        let one = normalize(&host(), 0, 1);
        assert_eq!(find(&one, 1, 0).edx & (1 << 28), 0);
    }

    #[test]
    fn normalize_topology_leaf_describes_cores() {
        let out = normalize(&host(), 2, 3);
        let smt = find(&out, 0xb, 0);
        assert_eq!((smt.eax, smt.ebx, smt.ecx, smt.edx), (0, 1, 0x100, 2));
        let core = find(&out, 0xb, 1);
        assert_eq!((core.eax, core.ebx, core.ecx, core.edx), (2, 3, 0x201, 2));
    }

    #[test]
    fn normalize_cache_and_amd_core_counts() {
        let out = normalize(&host(), 0, 4);
        let l1d = find(&out, 4, 0);
        assert_eq!(l1d.eax >> 26, 3);
        assert_eq!((l1d.eax >> 14) & 0xfff, 0);
        let l3 = find(&out, 4, 3);
        assert_eq!((l3.eax >> 14) & 0xfff, 3);
        let amd = find(&out, 0x8000_0008, 0);
        assert_eq!(amd.ecx & 0xff, 3);
        assert_eq!((amd.ecx >> 12) & 0xf, 2);
        assert_ne!(find(&out, 0x8000_0001, 0).ecx & 2, 0, "cmp_legacy");
    }

    #[test]
    fn forced_features_empty_when_the_mask_holds() {
        let out = normalize(&host(), 0, 2);
        assert!(forced_features(&out).is_empty());
        assert_eq!(kernel_params_hiding(&[]), None);
    }

    #[test]
    fn forced_features_found_when_the_host_overrides_the_mask() {
        // What a PVM host returns from KVM_GET_CPUID2: its own leaf 1 and 7 bits.
        let forced = forced_features(&host());
        let names: Vec<_> = forced.iter().map(|f| f.name).collect();
        for n in ["xsave", "popcnt", "cx16", "fsgsbase", "invpcid", "smap"] {
            assert!(names.contains(&n), "{n} not found in {names:?}");
        }
        let params = kernel_params_hiding(&forced).unwrap();
        // X86_FEATURE_CX16 4*32+13, POPCNT 4*32+23, FSGSBASE 9*32+0,
        // INVPCID 9*32+10, SMAP 9*32+20.
        assert!(params.starts_with("noxsave clearcpuid="), "{params}");
        let list = params.split("clearcpuid=").nth(1).unwrap();
        let nums: Vec<u32> = list.split(',').map(|n| n.parse().unwrap()).collect();
        for n in [141, 151, 288, 298, 308] {
            assert!(nums.contains(&n), "{n} missing from {params}");
        }
        // Features that go with XSAVE are not listed one by one.
        assert!(!nums.contains(&(4 * 32 + 28)), "avx: {params}");
    }

    #[test]
    fn linux_numbers_match_cpufeatures_h() {
        let n = |name: &str| {
            MASKED_FEATURES
                .iter()
                .find(|f| f.name == name)
                .unwrap()
                .linux_number()
                .unwrap()
        };
        assert_eq!(n("popcnt"), 4 * 32 + 23);
        assert_eq!(n("smap"), 9 * 32 + 20);
        assert_eq!(n("pku"), 16 * 32 + 3);
        assert_eq!(n("avx512_bf16"), 12 * 32 + 5);
    }

    #[test]
    fn bits_for_counts() {
        assert_eq!([1, 2, 3, 4, 5, 8, 9].map(bits_for), [0, 1, 2, 2, 3, 3, 4]);
    }

    #[test]
    fn phys_bits_from_leaf_or_default() {
        assert_eq!(phys_address_bits(&host()), 48);
        assert_eq!(phys_address_bits(&[]), 36);
    }
}
