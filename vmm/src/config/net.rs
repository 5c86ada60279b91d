//! `[[net]]`: virtio-net NICs on taps or on user-mode networking (passt),
//! and the `--net` flag.

use std::net::Ipv4Addr;
use std::path::PathBuf;

use ember_rate_limiter::{BucketConfig, RateLimiterConfig};
use serde::{Deserialize, Serialize};

use super::ConfigError;

/// Most NICs per VM.
pub const MAX_NETS: usize = 8;
/// Most queue pairs per NIC.
pub const MAX_NET_QUEUES: u16 = ember_virtio_net::MAX_QUEUE_PAIRS;
/// Longest interface name Linux accepts (IFNAMSIZ - 1).
pub const MAX_TAP_NAME: usize = 15;

/// One `[[net]]` table.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct NetConfig {
    /// An existing tap interface (a tap NIC); exactly one of `tap` and
    /// `user` is given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tap: Option<String>,
    /// User-mode networking through passt (no tap, no root).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<UserNet>,
    /// The guest's MAC address, `aa:bb:cc:dd:ee:ff`; derived from the tap
    /// name and the NIC's position when absent.
    pub mac: Option<String>,
    /// Offer checksum and segmentation offloads (TSO, UFO) to the guest
    /// (a tap NIC's; a user-mode NIC has none, whatever this says).
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
    /// Queue pairs (1 to 16): more than one needs a multi-queue tap
    /// (`ip tuntap add NAME mode tap multi_queue`); the guest uses as
    /// many as it has vCPUs, at most.
    #[serde(default = "one", skip_serializing_if = "is_one")]
    pub queues: u16,
    /// Move the frames with the host kernel's vhost-net
    /// (`/dev/vhost-net`); without it, ember's own virtio-net does, and
    /// says so. Not with a host-side VLAN or rate limits.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub vhost: bool,
    /// What the guest receives: Firecracker's token buckets (bytes, frames).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rx_rate_limiter: Option<RateLimiterConfig>,
    /// What the guest sends.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tx_rate_limiter: Option<RateLimiterConfig>,
}

fn default_true() -> bool {
    true
}

/// `on`/`off` and their synonyms.
fn on_off(v: &str) -> Option<bool> {
    match v {
        "on" | "true" | "yes" | "1" => Some(true),
        "off" | "false" | "no" | "0" => Some(false),
        _ => None,
    }
}

fn one() -> u16 {
    1
}

#[allow(clippy::trivially_copy_pass_by_ref)]
fn is_one(n: &u16) -> bool {
    *n == 1
}

/// A user-mode NIC: passt gives the guest DHCP, DNS and NAT to the host's
/// network, and forwards host ports to it.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct UserNet {
    /// Host ports forwarded to the guest, in QEMU's syntax:
    /// `tcp:[HOSTADDR]:HOSTPORT-:GUESTPORT` (or `udp:`).
    #[serde(default)]
    pub hostfwd: Vec<String>,
    /// A passt already listening on this Unix socket (`passt -s PATH`),
    /// instead of one ember starts.
    #[serde(default)]
    pub socket: Option<PathBuf>,
}

/// What a NIC is attached to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NetKind<'a> {
    /// An existing tap.
    Tap(&'a str),
    /// User-mode networking.
    User(&'a UserNet),
}

/// A forwarding protocol.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Proto {
    /// TCP (passt's `-t`).
    Tcp,
    /// UDP (passt's `-u`).
    Udp,
}

/// One `hostfwd=`: a host port forwarded to a guest port.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HostFwd {
    /// TCP or UDP.
    pub proto: Proto,
    /// The host address to listen on; every address when absent.
    pub host_addr: Option<Ipv4Addr>,
    /// The host port.
    pub host_port: u16,
    /// The guest port.
    pub guest_port: u16,
}

impl HostFwd {
    /// Parses QEMU's `tcp:[HOSTADDR]:HOSTPORT-[GUESTADDR]:GUESTPORT`; the
    /// guest address must be empty (passt forwards to the guest's one
    /// address).
    pub fn parse(s: &str) -> Result<HostFwd, String> {
        let form = "the form is tcp:[HOSTADDR]:HOSTPORT-:GUESTPORT (or udp:)";
        let (proto, rest) = match s.split_once(':') {
            Some(("tcp", rest)) => (Proto::Tcp, rest),
            Some(("udp", rest)) => (Proto::Udp, rest),
            Some(("", rest)) => (Proto::Tcp, rest),
            _ => return Err(format!("hostfwd `{s}`: {form}")),
        };
        let (host, guest) = rest
            .split_once('-')
            .ok_or_else(|| format!("hostfwd `{s}`: no `-` between host and guest; {form}"))?;
        let port = |p: &str, side: &str| -> Result<u16, String> {
            p.parse::<u16>()
                .ok()
                .filter(|&n| n != 0)
                .ok_or_else(|| format!("hostfwd `{s}`: {side} port `{p}` is not 1 to 65535"))
        };
        let (haddr, hport) = host
            .rsplit_once(':')
            .ok_or_else(|| format!("hostfwd `{s}`: {form}"))?;
        let host_addr = match haddr {
            "" => None,
            a => Some(a.parse::<Ipv4Addr>().map_err(|_| {
                format!("hostfwd `{s}`: host address `{a}` is not an IPv4 address")
            })?),
        };
        let (gaddr, gport) = guest.rsplit_once(':').unwrap_or(("", guest));
        if !gaddr.is_empty() {
            return Err(format!(
                "hostfwd `{s}`: a guest address ({gaddr}) cannot be chosen: passt forwards \
                 to the guest's one address; leave it empty (`-:{gport}`)"
            ));
        }
        Ok(HostFwd {
            proto,
            host_addr,
            host_port: port(hport, "host")?,
            guest_port: port(gport, "guest")?,
        })
    }

    /// passt's option and its value: `-t 127.0.0.1/2222:22`.
    pub fn passt_args(&self) -> [String; 2] {
        let flag = match self.proto {
            Proto::Tcp => "-t",
            Proto::Udp => "-u",
        };
        let spec = match self.host_addr {
            Some(a) => format!("{a}/{}:{}", self.host_port, self.guest_port),
            None => format!("{}:{}", self.host_port, self.guest_port),
        };
        [flag.to_string(), spec]
    }
}

impl UserNet {
    /// The forwards, parsed.
    pub fn forwards(&self) -> Result<Vec<HostFwd>, String> {
        self.hostfwd.iter().map(|h| HostFwd::parse(h)).collect()
    }
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
    /// Parses `tap=NAME[,mac=MAC][,offloads=on|off][,vlan=ID][,queues=N][,vhost=on|off]` or
    /// `user[,hostfwd=tcp:[ADDR]:PORT-:PORT]...[,socket=PATH][,mac=MAC]`,
    /// either with `[,rx_bw=SIZE/TIME[+BURST]][,rx_ops=...][,tx_bw=...]
    /// [,tx_ops=...]` (bytes and frames the guest receives and sends).
    pub fn parse_flag(s: &str) -> Result<Self, ConfigError> {
        let bad = |why: String| ConfigError::NetFlag {
            flag: s.to_string(),
            why,
        };
        let (mut tap, mut mac, mut offloads, mut vlan) = (None, None, true, None);
        let mut queues = 1;
        let mut vhost = false;
        let mut user: Option<UserNet> = None;
        let (mut rx_limit, mut tx_limit): (Option<RateLimiterConfig>, Option<RateLimiterConfig>) =
            (None, None);
        for (i, part) in s.split(',').enumerate() {
            if i == 0 && part == "user" {
                user = Some(UserNet::default());
                continue;
            }
            let (k, v) = part
                .split_once('=')
                .ok_or_else(|| bad(format!("`{part}` is not key=value")))?;
            let user_only = |what: &str| {
                bad(format!(
                    "{what}= is for a user-mode NIC (`--net user,{what}=...`)"
                ))
            };
            match k {
                "hostfwd" => user
                    .as_mut()
                    .ok_or_else(|| user_only("hostfwd"))?
                    .hostfwd
                    .push(v.to_string()),
                "socket" => {
                    user.as_mut().ok_or_else(|| user_only("socket"))?.socket = Some(v.into());
                }
                "tap" => tap = Some(v.to_string()),
                "rx_bw" | "rx_ops" | "tx_bw" | "tx_ops" => {
                    let bucket: BucketConfig = v.parse().map_err(|e| bad(format!("{k}: {e}")))?;
                    let limiter = if k.starts_with("rx") {
                        rx_limit.get_or_insert_with(Default::default)
                    } else {
                        tx_limit.get_or_insert_with(Default::default)
                    };
                    if k.ends_with("ops") {
                        limiter.ops = Some(bucket);
                    } else {
                        limiter.bandwidth = Some(bucket);
                    }
                }
                "mac" => mac = Some(v.to_string()),
                "offloads" => {
                    offloads = on_off(v)
                        .ok_or_else(|| bad(format!("offloads must be on or off, not `{v}`")))?;
                }
                "vhost" => {
                    vhost = on_off(v)
                        .ok_or_else(|| bad(format!("vhost must be on or off, not `{v}`")))?;
                }
                "vlan" => {
                    vlan = Some(v.parse::<u16>().map_err(|_| {
                        bad(format!("vlan must be a VLAN id (1 to 4094), not `{v}`"))
                    })?);
                }
                "queues" => {
                    queues = v.parse::<u16>().map_err(|_| {
                        bad(format!(
                            "queues must be a number of queue pairs (1 to {MAX_NET_QUEUES}), not `{v}`"
                        ))
                    })?;
                }
                _ => {
                    return Err(bad(format!(
                        "unknown key `{k}` (tap, mac, offloads, vlan, queues, vhost, rx_bw, \
                         rx_ops, tx_bw, tx_ops; user, hostfwd, socket)"
                    )))
                }
            }
        }
        match (&tap, &user) {
            (None, None) => return Err(bad("tap= or user is missing".to_string())),
            (Some(_), Some(_)) => {
                return Err(bad(
                    "a NIC is either on a tap or user-mode, not both".to_string()
                ))
            }
            _ => {}
        }
        if user.is_some() {
            if s.split(',').any(|p| p.starts_with("offloads=")) && offloads {
                return Err(bad(
                    "a user-mode NIC has no offloads: passt's frames carry no virtio-net header"
                        .to_string(),
                ));
            }
            offloads = false;
        }
        Ok(NetConfig {
            tap,
            user,
            mac,
            offloads,
            iface_id: None,
            vlan,
            queues,
            vhost,
            rx_rate_limiter: rx_limit,
            tx_rate_limiter: tx_limit,
        })
    }

    /// What the NIC is attached to (after [`NetConfig::validate`]: exactly
    /// one of a tap and user-mode networking).
    pub fn kind(&self) -> NetKind<'_> {
        match (&self.tap, &self.user) {
            (Some(t), _) => NetKind::Tap(t),
            (None, Some(u)) => NetKind::User(u),
            (None, None) => NetKind::Tap(""),
        }
    }

    /// The descriptors a local migration hands over for this NIC: a
    /// tap's queues, or the one socket to passt.
    pub fn descriptors(&self) -> usize {
        match self.kind() {
            NetKind::Tap(_) => usize::from(self.queues),
            NetKind::User(_) => 1,
        }
    }

    /// The NIC's tap, if it has one.
    pub fn tap_name(&self) -> Option<&str> {
        self.tap.as_deref()
    }

    /// A name for messages: the tap's, or `user` (with its socket).
    pub fn label(&self) -> String {
        match self.kind() {
            NetKind::Tap(t) => t.to_string(),
            NetKind::User(UserNet {
                socket: Some(p), ..
            }) => format!("user ({})", p.display()),
            NetKind::User(_) => "user".to_string(),
        }
    }

    /// The API's name for NIC `index`.
    pub fn iface_id(&self, index: usize) -> String {
        self.iface_id
            .clone()
            .unwrap_or_else(|| format!("net{index}"))
    }

    /// Checks the tap name or user-mode options, the VLAN and the MAC of
    /// NIC `index`, and returns the MAC to use.
    pub fn validate(&self, index: usize) -> Result<[u8; 6], ConfigError> {
        let user_net = |why: String| ConfigError::UserNet { index, why };
        match (&self.tap, &self.user) {
            (Some(tap), None) => {
                if tap.is_empty() || tap.len() > MAX_TAP_NAME || tap.contains(['/', ' ', '\0']) {
                    return Err(ConfigError::TapName(tap.clone()));
                }
            }
            (None, Some(user)) => {
                user.forwards().map_err(user_net)?;
                if user.socket.is_some() && !user.hostfwd.is_empty() {
                    return Err(user_net(
                        "hostfwd and socket do not go together: a passt started by you \
                         forwards the ports you gave it"
                            .to_string(),
                    ));
                }
                if self.vlan.is_some() {
                    return Err(user_net(
                        "vlan= is for a NIC on a tap (passt has no VLANs)".to_string(),
                    ));
                }
                if self.vhost {
                    return Err(user_net(
                        "vhost= is for a NIC on a tap (vhost-net moves frames to and from a tap)"
                            .to_string(),
                    ));
                }
                if self.queues != 1 {
                    return Err(user_net(
                        "queues= is for a NIC on a multi-queue tap (passt's socket is one \
                         stream)"
                            .to_string(),
                    ));
                }
            }
            (None, None) => return Err(user_net("neither tap nor user is given".to_string())),
            (Some(_), Some(_)) => {
                return Err(user_net(
                    "both tap and user are given: a NIC is one or the other".to_string(),
                ))
            }
        }
        if let Some(vid) = self.vlan.filter(|v| !(1..=4094).contains(v)) {
            return Err(ConfigError::Vlan {
                tap: self.label(),
                vid,
            });
        }
        if self.vhost && self.vlan.is_some() {
            return Err(ConfigError::NetVhost {
                tap: self.label(),
                why: "a host-side VLAN (ember tags the frames; vhost-net would not)",
            });
        }
        if self.vhost && (self.rx_rate_limiter.is_some() || self.tx_rate_limiter.is_some()) {
            return Err(ConfigError::NetVhost {
                tap: self.label(),
                why: "rate limits (ember does not see the frames vhost-net moves)",
            });
        }
        if !(1..=MAX_NET_QUEUES).contains(&self.queues) {
            return Err(ConfigError::NetQueues {
                tap: self.label(),
                queues: self.queues,
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

    /// A stable, locally administered MAC derived from the tap name (or
    /// `user`) and the NIC's position: 52:54:00 (locally administered) + 3
    /// bytes of FNV-1a.
    pub fn default_mac(&self, index: usize) -> [u8; 6] {
        let h = self
            .tap
            .as_deref()
            .unwrap_or("user")
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
        assert_eq!(n.tap.as_deref(), Some("tap0"));
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
            "tap=t,queues=x",
            "tap=t,queues=-2",
            "tap",
        ] {
            assert!(NetConfig::parse_flag(bad).is_err(), "{bad}");
        }
        let n = NetConfig::parse_flag("tap=tap1,queues=2").unwrap();
        assert_eq!(n.queues, 2);
        assert!(n.validate(0).is_ok());
        assert_eq!(NetConfig::parse_flag("tap=tap1").unwrap().queues, 1);
        assert!(NetConfig::parse_flag("tap=tap1,vhost=on").unwrap().vhost);
        assert!(!NetConfig::parse_flag("tap=tap1").unwrap().vhost);
        assert!(NetConfig::parse_flag("tap=t,vhost=maybe").is_err());
        for (flag, why) in [
            (
                "tap=t,queues=0",
                "net.queues = 0 (tap t) is out of range: 1 to 16",
            ),
            (
                "tap=t,queues=17",
                "net.queues = 17 (tap t) is out of range: 1 to 16",
            ),
            ("user,queues=2", "passt's socket is one stream"),
            ("user,vhost=on", "vhost= is for a NIC on a tap"),
            (
                "tap=t,vhost=on,vlan=5",
                "net.vhost (tap t) cannot go with a host-side VLAN",
            ),
            (
                "tap=t,vhost=on,tx_bw=1M/1s",
                "net.vhost (tap t) cannot go with rate limits",
            ),
        ] {
            let err = NetConfig::parse_flag(flag)
                .unwrap()
                .validate(0)
                .unwrap_err();
            assert!(err.to_string().contains(why), "{flag}: {err}");
        }
    }

    #[test]
    fn net_flag_takes_rate_limits() {
        let n = NetConfig::parse_flag("tap=tap0,rx_bw=10M/1s+20M,tx_ops=1000/1s,tx_bw=1M/100ms")
            .unwrap();
        let rx = n.rx_rate_limiter.unwrap();
        assert_eq!(rx.bandwidth.unwrap().size, 10 << 20);
        assert_eq!(rx.bandwidth.unwrap().one_time_burst, Some(20 << 20));
        assert!(rx.ops.is_none());
        let tx = n.tx_rate_limiter.unwrap();
        assert_eq!(tx.ops.unwrap().size, 1000);
        assert_eq!(tx.bandwidth.unwrap().refill_time, 100);
        for bad in ["tap=t,rx_bw=10M", "tap=t,tx_ops=0/1s", "tap=t,rx_bw=x/1s"] {
            let e = NetConfig::parse_flag(bad).unwrap_err().to_string();
            assert!(e.contains("_bw:") || e.contains("_ops:"), "{bad}: {e}");
        }
        let t: NetConfig = toml::from_str(
            "tap = \"tap0\"\nrx_rate_limiter = { bandwidth = { size = 1000, refill_time = 100 } }",
        )
        .unwrap();
        assert_eq!(t.rx_rate_limiter.unwrap().bandwidth.unwrap().size, 1000);
    }

    #[test]
    fn user_mode_flags_and_forwards_parse() {
        let n = NetConfig::parse_flag(
            "user,hostfwd=tcp:127.0.0.1:2222-:22,hostfwd=udp::5353-:53,mac=52:54:00:00:00:09",
        )
        .unwrap();
        assert_eq!(n.tap, None);
        assert!(!n.offloads, "a user-mode NIC has none");
        assert!(matches!(n.kind(), NetKind::User(_)));
        assert_eq!(n.label(), "user");
        let fwd = n.user.as_ref().unwrap().forwards().unwrap();
        assert_eq!(
            fwd[0].passt_args(),
            ["-t".to_string(), "127.0.0.1/2222:22".to_string()]
        );
        assert_eq!(
            fwd[1].passt_args(),
            ["-u".to_string(), "5353:53".to_string()]
        );
        assert_eq!(n.validate(0).unwrap(), [0x52, 0x54, 0, 0, 0, 9]);
        // QEMU leaves out the protocol for TCP.
        assert_eq!(HostFwd::parse("::80-:8080").unwrap().proto, Proto::Tcp);
        let s = NetConfig::parse_flag("user,socket=/run/passt.sock").unwrap();
        assert_eq!(s.label(), "user (/run/passt.sock)");
        assert!(s.validate(1).is_ok());
        assert_ne!(s.default_mac(0), s.default_mac(1));
        // In a config file.
        let t: NetConfig = toml::from_str("user = { hostfwd = [\"tcp::2222-:22\"] }").unwrap();
        assert_eq!(t.user.unwrap().hostfwd, ["tcp::2222-:22"]);
        for bad in [
            "tcp:1.2.3.4:0-:22",
            "tcp::22-:0",
            "tcp::22-:x",
            "icmp::1-:2",
            "tcp::1-10.0.0.1:2",
            "tcp:1.2.3:1-:2",
            "tcp",
        ] {
            assert!(HostFwd::parse(bad).is_err(), "{bad}");
        }
        let both = NetConfig {
            user: Some(UserNet::default()),
            ..NetConfig::parse_flag("tap=tap0").unwrap()
        };
        assert!(both
            .validate(0)
            .unwrap_err()
            .to_string()
            .contains("both tap and user"));
    }

    #[test]
    fn net_validate_rejects_bad_names_and_macs() {
        let n = |tap: &str, mac: Option<&str>| NetConfig {
            tap: Some(tap.into()),
            user: None,
            mac: mac.map(str::to_string),
            offloads: true,
            iface_id: None,
            vlan: None,
            queues: 1,
            vhost: false,
            rx_rate_limiter: None,
            tx_rate_limiter: None,
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
            tap: Some("tap0".into()),
            user: None,
            mac: None,
            offloads: true,
            iface_id: None,
            vlan: None,
            queues: 1,
            vhost: false,
            rx_rate_limiter: None,
            tx_rate_limiter: None,
        };
        let b = NetConfig {
            tap: Some("tap1".into()),
            user: None,
            mac: None,
            offloads: true,
            iface_id: None,
            vlan: None,
            queues: 1,
            vhost: false,
            rx_rate_limiter: None,
            tx_rate_limiter: None,
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
