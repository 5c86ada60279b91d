//! CPU feature names and where each lives.
//!
//! The names are QEMU's (`-cpu Model,+name`), so a libvirt or QEMU user
//! recognises them; the locations come from the Intel SDM (vol. 2A, CPUID)
//! and AMD's APM (vol. 3, appendix E). A feature is a CPUID bit or a bit of
//! `IA32_ARCH_CAPABILITIES` (MSR 0x10a), which KVM emulates and a model sets.

use super::Reg;

/// Where a feature bit lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Location {
    /// A CPUID bit.
    Cpuid {
        /// Leaf (EAX in).
        leaf: u32,
        /// Subleaf (ECX in); 0 for leaves without subleaves.
        subleaf: u32,
        /// Output register.
        reg: Reg,
        /// Bit number.
        bit: u32,
    },
    /// A bit of a model-specific register.
    Msr {
        /// MSR index.
        index: u32,
        /// Bit number.
        bit: u32,
    },
}

/// One named feature.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Feature {
    /// QEMU's canonical name.
    pub name: &'static str,
    /// Where it lives.
    pub location: Location,
}

/// `IA32_ARCH_CAPABILITIES`.
pub const MSR_ARCH_CAPABILITIES: u32 = 0x10a;

const fn c(name: &'static str, leaf: u32, subleaf: u32, reg: Reg, bit: u32) -> Feature {
    Feature {
        name,
        location: Location::Cpuid {
            leaf,
            subleaf,
            reg,
            bit,
        },
    }
}

const fn m(name: &'static str, bit: u32) -> Feature {
    Feature {
        name,
        location: Location::Msr {
            index: MSR_ARCH_CAPABILITIES,
            bit,
        },
    }
}

use Reg::{Eax, Ebx, Ecx, Edx};

/// Extended leaves.
const X1: u32 = 0x8000_0001;
const X7: u32 = 0x8000_0007;
const X8: u32 = 0x8000_0008;
const XA: u32 = 0x8000_000a;
const X21: u32 = 0x8000_0021;

/// Every feature ember knows by name.
pub const FEATURES: &[Feature] = &[
    // Leaf 1 EDX.
    c("fpu", 1, 0, Edx, 0),
    c("vme", 1, 0, Edx, 1),
    c("de", 1, 0, Edx, 2),
    c("pse", 1, 0, Edx, 3),
    c("tsc", 1, 0, Edx, 4),
    c("msr", 1, 0, Edx, 5),
    c("pae", 1, 0, Edx, 6),
    c("mce", 1, 0, Edx, 7),
    c("cx8", 1, 0, Edx, 8),
    c("apic", 1, 0, Edx, 9),
    c("sep", 1, 0, Edx, 11),
    c("mtrr", 1, 0, Edx, 12),
    c("pge", 1, 0, Edx, 13),
    c("mca", 1, 0, Edx, 14),
    c("cmov", 1, 0, Edx, 15),
    c("pat", 1, 0, Edx, 16),
    c("pse36", 1, 0, Edx, 17),
    c("pn", 1, 0, Edx, 18),
    c("clflush", 1, 0, Edx, 19),
    c("ds", 1, 0, Edx, 21),
    c("acpi", 1, 0, Edx, 22),
    c("mmx", 1, 0, Edx, 23),
    c("fxsr", 1, 0, Edx, 24),
    c("sse", 1, 0, Edx, 25),
    c("sse2", 1, 0, Edx, 26),
    c("ss", 1, 0, Edx, 27),
    c("ht", 1, 0, Edx, 28),
    c("tm", 1, 0, Edx, 29),
    c("pbe", 1, 0, Edx, 31),
    // Leaf 1 ECX.
    c("pni", 1, 0, Ecx, 0),
    c("pclmulqdq", 1, 0, Ecx, 1),
    c("dtes64", 1, 0, Ecx, 2),
    c("monitor", 1, 0, Ecx, 3),
    c("ds-cpl", 1, 0, Ecx, 4),
    c("vmx", 1, 0, Ecx, 5),
    c("smx", 1, 0, Ecx, 6),
    c("est", 1, 0, Ecx, 7),
    c("tm2", 1, 0, Ecx, 8),
    c("ssse3", 1, 0, Ecx, 9),
    c("cid", 1, 0, Ecx, 10),
    c("fma", 1, 0, Ecx, 12),
    c("cx16", 1, 0, Ecx, 13),
    c("xtpr", 1, 0, Ecx, 14),
    c("pdcm", 1, 0, Ecx, 15),
    c("pcid", 1, 0, Ecx, 17),
    c("dca", 1, 0, Ecx, 18),
    c("sse4.1", 1, 0, Ecx, 19),
    c("sse4.2", 1, 0, Ecx, 20),
    c("x2apic", 1, 0, Ecx, 21),
    c("movbe", 1, 0, Ecx, 22),
    c("popcnt", 1, 0, Ecx, 23),
    c("tsc-deadline", 1, 0, Ecx, 24),
    c("aes", 1, 0, Ecx, 25),
    c("xsave", 1, 0, Ecx, 26),
    c("avx", 1, 0, Ecx, 28),
    c("f16c", 1, 0, Ecx, 29),
    c("rdrand", 1, 0, Ecx, 30),
    c("hypervisor", 1, 0, Ecx, 31),
    // Leaf 6 EAX.
    c("arat", 6, 0, Eax, 2),
    // Leaf 7.0 EBX.
    c("fsgsbase", 7, 0, Ebx, 0),
    c("tsc-adjust", 7, 0, Ebx, 1),
    c("sgx", 7, 0, Ebx, 2),
    c("bmi1", 7, 0, Ebx, 3),
    c("hle", 7, 0, Ebx, 4),
    c("avx2", 7, 0, Ebx, 5),
    c("fdp-excptn-only", 7, 0, Ebx, 6),
    c("smep", 7, 0, Ebx, 7),
    c("bmi2", 7, 0, Ebx, 8),
    c("erms", 7, 0, Ebx, 9),
    c("invpcid", 7, 0, Ebx, 10),
    c("rtm", 7, 0, Ebx, 11),
    c("zero-fcs-fds", 7, 0, Ebx, 13),
    c("mpx", 7, 0, Ebx, 14),
    c("avx512f", 7, 0, Ebx, 16),
    c("avx512dq", 7, 0, Ebx, 17),
    c("rdseed", 7, 0, Ebx, 18),
    c("adx", 7, 0, Ebx, 19),
    c("smap", 7, 0, Ebx, 20),
    c("avx512ifma", 7, 0, Ebx, 21),
    c("pcommit", 7, 0, Ebx, 22),
    c("clflushopt", 7, 0, Ebx, 23),
    c("clwb", 7, 0, Ebx, 24),
    c("intel-pt", 7, 0, Ebx, 25),
    c("avx512pf", 7, 0, Ebx, 26),
    c("avx512er", 7, 0, Ebx, 27),
    c("avx512cd", 7, 0, Ebx, 28),
    c("sha-ni", 7, 0, Ebx, 29),
    c("avx512bw", 7, 0, Ebx, 30),
    c("avx512vl", 7, 0, Ebx, 31),
    // Leaf 7.0 ECX.
    c("avx512vbmi", 7, 0, Ecx, 1),
    c("umip", 7, 0, Ecx, 2),
    c("pku", 7, 0, Ecx, 3),
    c("waitpkg", 7, 0, Ecx, 5),
    c("avx512vbmi2", 7, 0, Ecx, 6),
    c("gfni", 7, 0, Ecx, 8),
    c("vaes", 7, 0, Ecx, 9),
    c("vpclmulqdq", 7, 0, Ecx, 10),
    c("avx512vnni", 7, 0, Ecx, 11),
    c("avx512bitalg", 7, 0, Ecx, 12),
    c("avx512-vpopcntdq", 7, 0, Ecx, 14),
    c("la57", 7, 0, Ecx, 16),
    c("rdpid", 7, 0, Ecx, 22),
    c("bus-lock-detect", 7, 0, Ecx, 24),
    c("cldemote", 7, 0, Ecx, 25),
    c("movdiri", 7, 0, Ecx, 27),
    c("movdir64b", 7, 0, Ecx, 28),
    c("sgxlc", 7, 0, Ecx, 30),
    c("pks", 7, 0, Ecx, 31),
    // Leaf 7.0 EDX.
    c("avx512-4vnniw", 7, 0, Edx, 2),
    c("avx512-4fmaps", 7, 0, Edx, 3),
    c("fsrm", 7, 0, Edx, 4),
    c("avx512-vp2intersect", 7, 0, Edx, 8),
    c("md-clear", 7, 0, Edx, 10),
    c("serialize", 7, 0, Edx, 14),
    c("tsx-ldtrk", 7, 0, Edx, 16),
    c("pconfig", 7, 0, Edx, 18),
    c("arch-lbr", 7, 0, Edx, 19),
    c("amx-bf16", 7, 0, Edx, 22),
    c("avx512-fp16", 7, 0, Edx, 23),
    c("amx-tile", 7, 0, Edx, 24),
    c("amx-int8", 7, 0, Edx, 25),
    c("spec-ctrl", 7, 0, Edx, 26),
    c("stibp", 7, 0, Edx, 27),
    c("flush-l1d", 7, 0, Edx, 28),
    c("arch-capabilities", 7, 0, Edx, 29),
    c("core-capability", 7, 0, Edx, 30),
    c("ssbd", 7, 0, Edx, 31),
    // Leaf 7.1 EAX.
    c("sha512", 7, 1, Eax, 0),
    c("sm3", 7, 1, Eax, 1),
    c("sm4", 7, 1, Eax, 2),
    c("avx-vnni", 7, 1, Eax, 4),
    c("avx512-bf16", 7, 1, Eax, 5),
    c("cmpccxadd", 7, 1, Eax, 7),
    c("fzrm", 7, 1, Eax, 10),
    c("fsrs", 7, 1, Eax, 11),
    c("fsrc", 7, 1, Eax, 12),
    c("fred", 7, 1, Eax, 17),
    c("lkgs", 7, 1, Eax, 18),
    c("wrmsrns", 7, 1, Eax, 19),
    c("amx-fp16", 7, 1, Eax, 21),
    c("avx-ifma", 7, 1, Eax, 23),
    c("lam", 7, 1, Eax, 26),
    // Leaf 7.1 EDX.
    c("avx-vnni-int8", 7, 1, Edx, 4),
    c("avx-ne-convert", 7, 1, Edx, 5),
    c("amx-complex", 7, 1, Edx, 8),
    c("avx-vnni-int16", 7, 1, Edx, 10),
    c("prefetchiti", 7, 1, Edx, 14),
    // Leaf 0xD.1 EAX.
    c("xsaveopt", 0xd, 1, Eax, 0),
    c("xsavec", 0xd, 1, Eax, 1),
    c("xgetbv1", 0xd, 1, Eax, 2),
    c("xsaves", 0xd, 1, Eax, 3),
    c("xfd", 0xd, 1, Eax, 4),
    // Leaf 0x8000_0001 EDX (the AMD copies of leaf 1 EDX bits are not
    // features of their own: ember copies them on AMD models).
    c("syscall", X1, 0, Edx, 11),
    c("nx", X1, 0, Edx, 20),
    c("mmxext", X1, 0, Edx, 22),
    c("fxsr-opt", X1, 0, Edx, 25),
    c("pdpe1gb", X1, 0, Edx, 26),
    c("rdtscp", X1, 0, Edx, 27),
    c("lm", X1, 0, Edx, 29),
    c("3dnowext", X1, 0, Edx, 30),
    c("3dnow", X1, 0, Edx, 31),
    // Leaf 0x8000_0001 ECX.
    c("lahf-lm", X1, 0, Ecx, 0),
    c("cmp-legacy", X1, 0, Ecx, 1),
    c("svm", X1, 0, Ecx, 2),
    c("extapic", X1, 0, Ecx, 3),
    c("cr8legacy", X1, 0, Ecx, 4),
    c("abm", X1, 0, Ecx, 5),
    c("sse4a", X1, 0, Ecx, 6),
    c("misalignsse", X1, 0, Ecx, 7),
    c("3dnowprefetch", X1, 0, Ecx, 8),
    c("osvw", X1, 0, Ecx, 9),
    c("ibs", X1, 0, Ecx, 10),
    c("xop", X1, 0, Ecx, 11),
    c("skinit", X1, 0, Ecx, 12),
    c("wdt", X1, 0, Ecx, 13),
    c("lwp", X1, 0, Ecx, 15),
    c("fma4", X1, 0, Ecx, 16),
    c("tce", X1, 0, Ecx, 17),
    c("nodeid-msr", X1, 0, Ecx, 19),
    c("tbm", X1, 0, Ecx, 21),
    c("topoext", X1, 0, Ecx, 22),
    c("perfctr-core", X1, 0, Ecx, 23),
    c("perfctr-nb", X1, 0, Ecx, 24),
    // Leaf 0x8000_0007 EDX.
    c("invtsc", X7, 0, Edx, 8),
    // Leaf 0x8000_0008 EBX.
    c("clzero", X8, 0, Ebx, 0),
    c("xsaveerptr", X8, 0, Ebx, 2),
    c("wbnoinvd", X8, 0, Ebx, 9),
    c("ibpb", X8, 0, Ebx, 12),
    c("ibrs", X8, 0, Ebx, 14),
    c("amd-stibp", X8, 0, Ebx, 15),
    c("stibp-always-on", X8, 0, Ebx, 17),
    c("amd-ssbd", X8, 0, Ebx, 24),
    c("virt-ssbd", X8, 0, Ebx, 25),
    c("amd-no-ssb", X8, 0, Ebx, 26),
    c("amd-psfd", X8, 0, Ebx, 28),
    // Leaf 0x8000_000a EDX (SVM features).
    c("npt", XA, 0, Edx, 0),
    c("lbrv", XA, 0, Edx, 1),
    c("svm-lock", XA, 0, Edx, 2),
    c("nrip-save", XA, 0, Edx, 3),
    c("tsc-scale", XA, 0, Edx, 4),
    c("vmcb-clean", XA, 0, Edx, 5),
    c("flushbyasid", XA, 0, Edx, 6),
    c("decodeassists", XA, 0, Edx, 7),
    c("pause-filter", XA, 0, Edx, 10),
    c("pfthreshold", XA, 0, Edx, 12),
    c("avic", XA, 0, Edx, 13),
    c("v-vmsave-vmload", XA, 0, Edx, 15),
    c("vgif", XA, 0, Edx, 16),
    c("vnmi", XA, 0, Edx, 25),
    c("svme-addr-chk", XA, 0, Edx, 28),
    // Leaf 0x8000_0021 EAX.
    c("no-nested-data-bp", X21, 0, Eax, 0),
    c("lfence-always-serializing", X21, 0, Eax, 2),
    c("null-sel-clr-base", X21, 0, Eax, 6),
    c("auto-ibrs", X21, 0, Eax, 8),
    c("sbpb", X21, 0, Eax, 27),
    c("ibpb-brtype", X21, 0, Eax, 28),
    c("srso-no", X21, 0, Eax, 29),
    // IA32_ARCH_CAPABILITIES.
    m("rdctl-no", 0),
    m("ibrs-all", 1),
    m("rsba", 2),
    m("skip-l1dfl-vmentry", 3),
    m("ssb-no", 4),
    m("mds-no", 5),
    m("pschange-mc-no", 6),
    m("tsx-ctrl", 7),
    m("taa-no", 8),
    m("sbdr-ssdp-no", 13),
    m("fbsdp-no", 14),
    m("psdp-no", 15),
    m("fb-clear", 17),
    m("bhi-no", 20),
    m("pbrsb-no", 24),
    m("gds-no", 26),
    m("rfds-no", 27),
];

/// The spelling a feature name is compared in: lower case, `_` and `.` as
/// `-` (QEMU accepts `sse4_2`, `sse4.2` and `sse4-2` alike).
fn key(name: &str) -> String {
    name.trim()
        .to_ascii_lowercase()
        .chars()
        .map(|c| if c == '_' || c == '.' { '-' } else { c })
        .collect()
}

/// Other spellings users bring: Linux's `/proc/cpuinfo` names and QEMU's
/// older aliases.
const ALIASES: &[(&str, &str)] = &[
    ("sse3", "pni"),
    ("pclmuldq", "pclmulqdq"),
    ("lzcnt", "abm"),
    ("sha", "sha-ni"),
    ("avx512-vnni", "avx512vnni"),
    ("avx512-bitalg", "avx512bitalg"),
    ("avx512-vbmi2", "avx512vbmi2"),
    ("avx512-vbmi", "avx512vbmi"),
    ("tsc-deadline-timer", "tsc-deadline"),
    ("tsxldtrk", "tsx-ldtrk"),
    ("pausefilter", "pause-filter"),
    ("cr8-legacy", "cr8legacy"),
    ("nonstop-tsc", "invtsc"),
    ("dts", "ds"),
];

/// The feature called `name` (any accepted spelling).
pub fn find(name: &str) -> Option<&'static Feature> {
    // The canonical spelling, without allocating: ember's own lists use it.
    if let Some(f) = FEATURES.iter().find(|f| f.name == name) {
        return Some(f);
    }
    let k = key(name);
    let k = ALIASES
        .iter()
        .find(|(a, _)| *a == k)
        .map_or(k.as_str(), |(_, to)| to);
    FEATURES.iter().find(|f| same_key(f.name, k))
}

/// `key(name) == k` without allocating.
fn same_key(name: &str, k: &str) -> bool {
    name.len() == k.len()
        && name.bytes().zip(k.bytes()).all(|(a, b)| {
            let a = match a.to_ascii_lowercase() {
                b'_' | b'.' => b'-',
                c => c,
            };
            a == b
        })
}

/// The feature at a CPUID location, if ember knows one there.
pub fn at_cpuid(leaf: u32, subleaf: u32, reg: Reg, bit: u32) -> Option<&'static Feature> {
    let want = Location::Cpuid {
        leaf,
        subleaf,
        reg,
        bit,
    };
    FEATURES.iter().find(|f| f.location == want)
}

/// Edit distance, for suggestions.
pub(crate) fn distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1; b.len() + 1];
        for (j, &cb) in b.iter().enumerate() {
            let sub = prev[j] + usize::from(ca != cb);
            cur[j + 1] = sub.min(prev[j + 1] + 1).min(cur[j] + 1);
        }
        prev = cur;
    }
    prev[b.len()]
}

/// The known name closest to `name`, when one is close enough to be a typo.
pub fn closest(name: &str) -> Option<&'static str> {
    let k = key(name);
    FEATURES
        .iter()
        .map(|f| (distance(&k, &key(f.name)), f.name))
        .min()
        .filter(|&(d, _)| d <= 2.max(k.len() / 3))
        .map(|(_, n)| n)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_locations_are_unique() {
        for (i, a) in FEATURES.iter().enumerate() {
            for b in &FEATURES[i + 1..] {
                assert_ne!(a.name, b.name);
                assert_ne!(a.location, b.location, "{} and {}", a.name, b.name);
            }
        }
    }

    #[test]
    fn spellings_and_aliases_resolve() {
        assert_eq!(find("sse4_2").unwrap().name, "sse4.2");
        assert_eq!(find("SSE4-1").unwrap().name, "sse4.1");
        assert_eq!(find("lahf_lm").unwrap().name, "lahf-lm");
        assert_eq!(find("sse3").unwrap().name, "pni");
        assert_eq!(find("avx512_vnni").unwrap().name, "avx512vnni");
        assert_eq!(find("amx_tile").unwrap().name, "amx-tile");
        assert!(find("avx1024").is_none());
    }

    #[test]
    fn locations_match_the_manuals() {
        let at = |n: &str| find(n).unwrap().location;
        assert_eq!(
            at("avx512f"),
            Location::Cpuid {
                leaf: 7,
                subleaf: 0,
                reg: Ebx,
                bit: 16
            }
        );
        assert_eq!(
            at("amx-tile"),
            Location::Cpuid {
                leaf: 7,
                subleaf: 0,
                reg: Edx,
                bit: 24
            }
        );
        assert_eq!(
            at("lm"),
            Location::Cpuid {
                leaf: X1,
                subleaf: 0,
                reg: Edx,
                bit: 29
            }
        );
        assert_eq!(
            at("mds-no"),
            Location::Msr {
                index: 0x10a,
                bit: 5
            }
        );
        assert_eq!(at_cpuid(1, 0, Ecx, 20).unwrap().name, "sse4.2");
    }

    #[test]
    fn typos_get_the_closest_name() {
        assert_eq!(closest("avx512bf16"), Some("avx512-bf16"));
        assert_eq!(closest("amx-til"), Some("amx-tile"));
        assert_eq!(closest("avx512dqq"), Some("avx512dq"));
        assert_eq!(closest("completely-unknown-thing"), None);
    }
}
