//! Firecracker's custom CPU templates (`PUT /cpu-config`): CPUID and MSR
//! modifiers as bitmaps over the host's values, `0b` then one character a
//! bit from the most significant: `0` clears, `1` sets, `x` keeps.

use std::path::Path;

use kvm_bindings::kvm_cpuid_entry2;
use serde::{Deserialize, Serialize};

use super::{build, ModelError, Reg};

/// A custom CPU template, Firecracker's JSON schema (`CpuConfig`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CustomTemplate {
    /// KVM capabilities to require (`"121"`) or not (`"!121"`).
    #[serde(default)]
    pub kvm_capabilities: Vec<String>,
    /// CPUID modifiers.
    #[serde(default)]
    pub cpuid_modifiers: Vec<CpuidLeafModifier>,
    /// MSR modifiers.
    #[serde(default)]
    pub msr_modifiers: Vec<MsrModifier>,
    /// aarch64 only: refused on x86_64 when not empty.
    #[serde(default)]
    pub reg_modifiers: Vec<ArmRegisterModifier>,
    /// aarch64 only: refused on x86_64 when not empty.
    #[serde(default)]
    pub vcpu_features: Vec<VcpuFeatures>,
}

/// An aarch64 register modifier (parsed so the template's JSON is whole).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ArmRegisterModifier {
    /// Register address.
    pub addr: String,
    /// Bitmap.
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

/// Modifiers of one CPUID leaf.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CpuidLeafModifier {
    /// Leaf, as hex, binary or decimal text.
    pub leaf: String,
    /// Subleaf, likewise.
    pub subleaf: String,
    /// KVM's flags for the leaf (1: the subleaf is significant).
    pub flags: u32,
    /// One modifier per register.
    pub modifiers: Vec<CpuidRegisterModifier>,
}

/// A bitmap over one CPUID register.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CpuidRegisterModifier {
    /// `eax`, `ebx`, `ecx` or `edx`.
    pub register: String,
    /// `0b` and 32 characters.
    pub bitmap: String,
}

/// A bitmap over one MSR.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MsrModifier {
    /// MSR index, as hex, binary or decimal text.
    pub addr: String,
    /// `0b` and 64 characters.
    pub bitmap: String,
}

/// A parsed bitmap: the bits to change and their values.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Bitmap {
    /// 1 where the bitmap says `0` or `1`.
    pub mask: u64,
    /// The values there.
    pub value: u64,
}

impl Bitmap {
    /// Parses `0b...` of exactly `width` bit characters (`_` ignored).
    pub fn parse(s: &str, width: u32) -> Result<Self, String> {
        let body = s
            .strip_prefix("0b")
            .ok_or_else(|| format!("bitmap {s:?} does not start with 0b"))?;
        let bits: Vec<char> = body.chars().filter(|&c| c != '_').collect();
        if bits.len() != width as usize {
            return Err(format!("bitmap {s:?} has {} bits, not {width}", bits.len()));
        }
        let (mut mask, mut value) = (0u64, 0u64);
        for (i, c) in bits.iter().enumerate() {
            let bit = 1u64 << (width as usize - 1 - i);
            match c {
                '0' => mask |= bit,
                '1' => {
                    mask |= bit;
                    value |= bit
                }
                'x' | 'X' => {}
                _ => return Err(format!("bitmap {s:?}: {c:?} is not 0, 1 or x")),
            }
        }
        Ok(Bitmap { mask, value })
    }

    /// `old` with the bitmap applied.
    pub fn apply(&self, old: u64) -> u64 {
        (old & !self.mask) | self.value
    }
}

/// Parses `"0x1a"`, `"0b11"` or `"26"`.
pub fn parse_number(s: &str) -> Result<u32, String> {
    let t = s.trim();
    let r = if let Some(h) = t.strip_prefix("0x").or_else(|| t.strip_prefix("0X")) {
        u32::from_str_radix(h, 16)
    } else if let Some(b) = t.strip_prefix("0b") {
        u32::from_str_radix(&b.replace('_', ""), 2)
    } else {
        t.parse()
    };
    r.map_err(|_| format!("{s:?} is not a 32-bit number"))
}

fn register(s: &str) -> Result<Reg, String> {
    match s {
        "eax" => Ok(Reg::Eax),
        "ebx" => Ok(Reg::Ebx),
        "ecx" => Ok(Reg::Ecx),
        "edx" => Ok(Reg::Edx),
        _ => Err(format!("register {s:?} is not eax, ebx, ecx or edx")),
    }
}

impl CustomTemplate {
    /// Parses and checks a template's JSON.
    pub fn from_json(text: &str) -> Result<Self, ModelError> {
        let t: CustomTemplate =
            serde_json::from_str(text).map_err(|e| ModelError::Template(e.to_string()))?;
        t.validate()?;
        Ok(t)
    }

    /// Reads a template file.
    pub fn from_file(path: &Path) -> Result<Self, ModelError> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| ModelError::Template(format!("{}: {e}", path.display())))?;
        Self::from_json(&text).map_err(|e| match e {
            ModelError::Template(why) => ModelError::Template(format!("{}: {why}", path.display())),
            other => other,
        })
    }

    /// Checks every field (numbers, registers, bitmaps).
    pub fn validate(&self) -> Result<(), ModelError> {
        let t = ModelError::Template;
        if !self.reg_modifiers.is_empty() || !self.vcpu_features.is_empty() {
            return Err(t(
                "reg_modifiers and vcpu_features are for aarch64; this is x86_64".into(),
            ));
        }
        self.required_capabilities()?;
        for l in &self.cpuid_modifiers {
            parse_number(&l.leaf).map_err(t)?;
            parse_number(&l.subleaf).map_err(t)?;
            for m in &l.modifiers {
                register(&m.register).map_err(t)?;
                Bitmap::parse(&m.bitmap, 32).map_err(t)?;
            }
        }
        for m in &self.msr_modifiers {
            parse_number(&m.addr).map_err(t)?;
            Bitmap::parse(&m.bitmap, 64).map_err(t)?;
        }
        Ok(())
    }

    /// The KVM capabilities the template requires (`"!N"` entries, which
    /// ask not to require one, are accepted and need nothing).
    pub fn required_capabilities(&self) -> Result<Vec<u32>, ModelError> {
        let mut v = Vec::new();
        for c in &self.kvm_capabilities {
            if let Some(n) = c.strip_prefix('!') {
                parse_number(n).map_err(ModelError::Template)?;
            } else {
                v.push(parse_number(c).map_err(ModelError::Template)?);
            }
        }
        Ok(v)
    }

    /// `host` with the CPUID modifiers applied (a leaf the host lacks is
    /// added).
    pub fn apply_cpuid(
        &self,
        host: &[kvm_cpuid_entry2],
    ) -> Result<Vec<kvm_cpuid_entry2>, ModelError> {
        let t = ModelError::Template;
        let mut e = host.to_vec();
        for l in &self.cpuid_modifiers {
            let leaf = parse_number(&l.leaf).map_err(t)?;
            let sub = parse_number(&l.subleaf).map_err(t)?;
            for m in &l.modifiers {
                let r = register(&m.register).map_err(t)?;
                let b = Bitmap::parse(&m.bitmap, 32).map_err(t)?;
                for bit in 0..32 {
                    if b.mask & (1 << bit) != 0 {
                        build::set_bit(&mut e, leaf, sub, r, bit, b.value & (1 << bit) != 0);
                    }
                }
            }
        }
        Ok(e)
    }

    /// The MSR values: `read(index)` is the vCPU's value before.
    pub fn apply_msrs(&self, read: impl Fn(u32) -> Option<u64>) -> Vec<(u32, u64)> {
        self.msr_modifiers
            .iter()
            .filter_map(|m| {
                let addr = parse_number(&m.addr).ok()?;
                let b = Bitmap::parse(&m.bitmap, 64).ok()?;
                Some((addr, b.apply(read(addr).unwrap_or(0))))
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: &str = r#"{
        "kvm_capabilities": ["!121"],
        "cpuid_modifiers": [
            {"leaf": "0x7", "subleaf": "0x0", "flags": 1, "modifiers": [
                {"register": "ebx", "bitmap": "0bxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx0"}]},
            {"leaf": "0x1", "subleaf": "0", "flags": 0, "modifiers": [
                {"register": "ecx", "bitmap": "0bxxxxxxxxxxxxxxxxxxxxxxxxxxxx1xxx"}]}
        ],
        "msr_modifiers": [{"addr": "0x10a", "bitmap":
            "0b0000000000000000000000000000000000000000000000000000000000_xxxx01"}]
    }"#;

    #[test]
    fn firecracker_template_applies() {
        let t = CustomTemplate::from_json(T).unwrap();
        let host = vec![
            kvm_cpuid_entry2 {
                function: 7,
                flags: 1,
                ebx: 0xffff_ffff,
                ..Default::default()
            },
            kvm_cpuid_entry2 {
                function: 1,
                ..Default::default()
            },
        ];
        let e = t.apply_cpuid(&host).unwrap();
        assert_eq!(e[0].ebx, 0xffff_fffe, "fsgsbase cleared, the rest kept");
        assert_eq!(e[1].ecx, 1 << 3, "monitor set");
        assert_eq!(t.apply_msrs(|_| Some(0xff)), vec![(0x10a, 0x3d)]);
        assert!(t.required_capabilities().unwrap().is_empty());
    }

    #[test]
    fn bad_templates_name_the_problem() {
        let bad = [
            (
                r#"{"cpuid_modifiers":[{"leaf":"zz","subleaf":"0","flags":0,"modifiers":[]}]}"#,
                "not a 32-bit number",
            ),
            (
                r#"{"cpuid_modifiers":[{"leaf":"1","subleaf":"0","flags":0,"modifiers":[{"register":"esp","bitmap":"0b0"}]}]}"#,
                "esp",
            ),
            (
                r#"{"msr_modifiers":[{"addr":"0x10a","bitmap":"0b0101"}]}"#,
                "has 4 bits, not 64",
            ),
            (
                r#"{"msr_modifiers":[{"addr":"0x10a","bitmap":"0b0000000000000000000000000000000000000000000000000000000000000002"}]}"#,
                "not 0, 1 or x",
            ),
            (
                r#"{"vcpu_features":[{"index":0,"bitmap":"0b1"}]}"#,
                "aarch64",
            ),
            (r#"{"cpuid_modifiers":[], "surprise": 1}"#, "unknown field"),
        ];
        for (json, want) in bad {
            let e = CustomTemplate::from_json(json).unwrap_err().to_string();
            assert!(e.contains(want), "{json}: {e}");
        }
    }
}
