//! `[[net]]`: virtio-net NICs on taps, and the `--net` flag.

use serde::{Deserialize, Serialize};

use super::ConfigError;

/// Most NICs per VM.
pub const MAX_NETS: usize = 8;
/// Longest interface name Linux accepts (IFNAMSIZ - 1).
pub const MAX_TAP_NAME: usize = 15;

/// One `[[net]]` table.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct NetConfig {
    /// An existing tap interface.
    pub tap: String,
    /// The guest's MAC address, `aa:bb:cc:dd:ee:ff`; derived from the tap
    /// name and the NIC's position when absent.
    pub mac: Option<String>,
    /// Offer checksum and segmentation offloads (TSO, UFO) to the guest.
    #[serde(default = "default_true")]
    pub offloads: bool,
    /// The API's name for the NIC (Firecracker's `iface_id`); `net<N>`
    /// (its position) when absent.
    #[serde(default)]
    pub iface_id: Option<String>,
    /// Host-side 802.1Q VLAN (1 to 4094): the guest's frames leave the tap
    /// tagged with it, and only its frames reach the guest, untagged.
    #[serde(default)]
    pub vlan: Option<u16>,
}

fn default_true() -> bool {
    true
}

/// Parses `aa:bb:cc:dd:ee:ff`.
pub fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = s.split(':');
    for byte in &mut mac {
        let p = parts.next()?;
        if p.len() != 2 {
            return None;
        }
        *byte = u8::from_str_radix(p, 16).ok()?;
    }
    parts.next().is_none().then_some(mac)
}

impl NetConfig {
    /// Parses `tap=NAME[,mac=MAC][,offloads=on|off][,vlan=ID]`.
    pub fn parse_flag(s: &str) -> Result<Self, ConfigError> {
        let bad = |why: String| ConfigError::NetFlag {
            flag: s.to_string(),
            why,
        };
        let (mut tap, mut mac, mut offloads, mut vlan) = (None, None, true, None);
        for part in s.split(',') {
            let (k, v) = part
                .split_once('=')
                .ok_or_else(|| bad(format!("`{part}` is not key=value")))?;
            match k {
                "tap" => tap = Some(v.to_string()),
                "mac" => mac = Some(v.to_string()),
                "offloads" => {
                    offloads = match v {
                        "on" | "true" | "yes" | "1" => true,
                        "off" | "false" | "no" | "0" => false,
                        _ => return Err(bad(format!("offloads must be on or off, not `{v}`"))),
                    }
                }
                "vlan" => {
                    vlan = Some(v.parse::<u16>().map_err(|_| {
                        bad(format!("vlan must be a VLAN id (1 to 4094), not `{v}`"))
                    })?);
                }
                _ => return Err(bad(format!("unknown key `{k}` (tap, mac, offloads, vlan)"))),
            }
        }
        let tap = tap.ok_or_else(|| bad("tap= is missing".to_string()))?;
        Ok(NetConfig {
            tap,
            mac,
            offloads,
            iface_id: None,
            vlan,
        })
    }

    /// The API's name for NIC `index`.
    pub fn iface_id(&self, index: usize) -> String {
        self.iface_id
            .clone()
            .unwrap_or_else(|| format!("net{index}"))
    }

    /// Checks the tap name and MAC of NIC `index`, and returns the MAC to use.
    pub fn validate(&self, index: usize) -> Result<[u8; 6], ConfigError> {
        if self.tap.is_empty()
            || self.tap.len() > MAX_TAP_NAME
            || self.tap.contains(['/', ' ', '\0'])
        {
            return Err(ConfigError::TapName(self.tap.clone()));
        }
        if let Some(vid) = self.vlan.filter(|v| !(1..=4094).contains(v)) {
            return Err(ConfigError::Vlan {
                tap: self.tap.clone(),
                vid,
            });
        }
        match &self.mac {
            Some(m) => {
                let mac = parse_mac(m).ok_or_else(|| ConfigError::Mac(m.clone()))?;
                if mac[0] & 1 == 1 {
                    return Err(ConfigError::Mac(m.clone()));
                }
                Ok(mac)
            }
            None => Ok(self.default_mac(index)),
        }
    }

    /// A stable, locally administered MAC derived from the tap name and
    /// the NIC's position: 52:54:00 (locally administered) + 3 bytes of
    /// FNV-1a.
    pub fn default_mac(&self, index: usize) -> [u8; 6] {
        let h = self
            .tap
            .bytes()
            .chain(index.to_le_bytes())
            .fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
                (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
            })
            .to_le_bytes();
        [0x52, 0x54, 0x00, h[0], h[1], h[2]]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn net_flag_parses_and_rejects() {
        let n = NetConfig::parse_flag("tap=tap0,mac=52:54:00:12:34:56,offloads=off").unwrap();
        assert_eq!(n.tap, "tap0");
        assert_eq!(n.validate(0).unwrap(), [0x52, 0x54, 0, 0x12, 0x34, 0x56]);
        assert!(!n.offloads);
        assert!(NetConfig::parse_flag("tap=tap1").unwrap().offloads);
        assert_eq!(
            NetConfig::parse_flag("tap=tap1,vlan=100").unwrap().vlan,
            Some(100)
        );
        for bad in [
            "tap=t,vlan=x",
            "tap=t,vlan=-1",
            "tap=t,vlan=70000",
            "",
            "mac=52:54:00:12:34:56",
            "tap=t,offloads=maybe",
            "tap=t,queues=2",
            "tap",
        ] {
            assert!(NetConfig::parse_flag(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn net_validate_rejects_bad_names_and_macs() {
        let n = |tap: &str, mac: Option<&str>| NetConfig {
            tap: tap.into(),
            mac: mac.map(str::to_string),
            offloads: true,
            iface_id: None,
            vlan: None,
        };
        assert!(matches!(
            n("", None).validate(0),
            Err(ConfigError::TapName(_))
        ));
        assert!(matches!(
            n("a-very-long-tap-name", None).validate(0),
            Err(ConfigError::TapName(_))
        ));
        for vid in [0, 4095, 9999] {
            let mut c = n("tap0", None);
            c.vlan = Some(vid);
            let e = c.validate(0).unwrap_err();
            assert!(matches!(e, ConfigError::Vlan { .. }), "{e}");
            assert!(e.to_string().contains("1 to 4094"), "{e}");
        }
        let mut ok = n("tap0", None);
        ok.vlan = Some(4094);
        assert!(ok.validate(0).is_ok());
        for m in [
            "52:54:00:12:34",
            "52:54:00:12:34:56:78",
            "zz:54:00:12:34:56",
            "01:00:5e:00:00:01",
            "5:54:00:12:34:56",
        ] {
            assert!(
                matches!(n("tap0", Some(m)).validate(0), Err(ConfigError::Mac(_))),
                "{m}"
            );
        }
    }

    #[test]
    fn net_default_mac_is_stable_local_and_distinct() {
        let a = NetConfig {
            tap: "tap0".into(),
            mac: None,
            offloads: true,
            iface_id: None,
            vlan: None,
        };
        let b = NetConfig {
            tap: "tap1".into(),
            mac: None,
            offloads: true,
            iface_id: None,
            vlan: None,
        };
        assert_eq!(a.default_mac(0), a.default_mac(0));
        assert_ne!(a.default_mac(0), b.default_mac(0));
        assert_ne!(a.default_mac(0), a.default_mac(1));
        assert_eq!(
            a.default_mac(0)[0] & 0b11,
            0b10,
            "unicast, locally administered"
        );
    }
}
