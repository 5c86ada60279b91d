//! The control queue (`VIRTIO_NET_F_CTRL_VQ`, virtio 1.2, 5.1.6.5): its
//! command parser and the receive filter the commands set.
//!
//! A command is a chain of device-readable bytes, `class`, `command` and
//! the command's data, followed by one device-writable byte the device
//! sets to [`VIRTIO_NET_OK`] or [`VIRTIO_NET_ERR`]. [`parse`] turns the
//! readable bytes into a [`Command`] or names what is wrong with them; it
//! is pure, so the fuzz target `virtio_net_ctrl` drives it (and
//! [`RxFilter::apply`]) with anything.
//!
//! [`RxFilter`] holds what the commands set and decides, frame by frame,
//! what reaches the guest ([`RxFilter::accepts`]), as QEMU's virtio-net
//! does: promiscuous mode (on until the driver turns it off) passes
//! everything; a tagged frame passes only if its VLAN is in the table
//! (when `VIRTIO_NET_F_CTRL_VLAN` was negotiated); broadcast passes unless
//! `NOBCAST`; multicast by `NOMULTI`, `ALLMULTI` or the multicast table;
//! unicast by `NOUNI`, `ALLUNI`, the NIC's MAC or the unicast table. A
//! table of more than [`MAC_TABLE_ENTRIES`] addresses passes all of its
//! kind (as QEMU's overflow).
//!
//! ```
//! use ember_virtio_net::ctrl::{parse, Command, RxFilter};
//!
//! // VIRTIO_NET_CTRL_VLAN, VIRTIO_NET_CTRL_VLAN_ADD, vid 100.
//! let cmd = parse(&[2, 0, 100, 0]).unwrap();
//! assert_eq!(cmd, Command::VlanAdd(100));
//! assert!(parse(&[2, 0, 0x00, 0x10]).unwrap_err().to_string().contains("4096"));
//!
//! let mac = [0x52, 0x54, 0, 0, 0, 1];
//! let mut f = RxFilter::new(mac);
//! f.set_features(u64::MAX, 1);
//! let mut frame = [0u8; 60];
//! frame[..6].copy_from_slice(&[0x52, 0x54, 0, 0, 0, 2]);
//! assert!(f.accepts(&frame), "promiscuous until the driver says otherwise");
//! f.apply(&parse(&[0, 0, 0]).unwrap()).unwrap(); // PROMISC off
//! assert!(!f.accepts(&frame), "another host's unicast");
//! frame[..6].copy_from_slice(&mac);
//! assert!(f.accepts(&frame));
//! ```

use serde::{Deserialize, Serialize};
use virtio_bindings::virtio_net::{
    VIRTIO_NET_CTRL_ANNOUNCE, VIRTIO_NET_CTRL_ANNOUNCE_ACK, VIRTIO_NET_CTRL_GUEST_OFFLOADS,
    VIRTIO_NET_CTRL_GUEST_OFFLOADS_SET, VIRTIO_NET_CTRL_MAC, VIRTIO_NET_CTRL_MAC_ADDR_SET,
    VIRTIO_NET_CTRL_MAC_TABLE_SET, VIRTIO_NET_CTRL_MQ, VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET,
    VIRTIO_NET_CTRL_RX, VIRTIO_NET_CTRL_RX_ALLMULTI, VIRTIO_NET_CTRL_RX_ALLUNI,
    VIRTIO_NET_CTRL_RX_NOBCAST, VIRTIO_NET_CTRL_RX_NOMULTI, VIRTIO_NET_CTRL_RX_NOUNI,
    VIRTIO_NET_CTRL_RX_PROMISC, VIRTIO_NET_CTRL_VLAN, VIRTIO_NET_CTRL_VLAN_ADD,
    VIRTIO_NET_CTRL_VLAN_DEL, VIRTIO_NET_F_CTRL_MAC_ADDR, VIRTIO_NET_F_CTRL_RX,
    VIRTIO_NET_F_CTRL_RX_EXTRA, VIRTIO_NET_F_CTRL_VLAN, VIRTIO_NET_F_GUEST_ANNOUNCE,
    VIRTIO_NET_F_MQ,
};

/// The status byte of a command that took effect.
pub const VIRTIO_NET_OK: u8 = 0;
/// The status byte of a command that did not.
pub const VIRTIO_NET_ERR: u8 = 1;

/// Addresses kept per MAC table (unicast, multicast); a longer table
/// passes every address of its kind.
pub const MAC_TABLE_ENTRIES: usize = 64;

/// The most readable bytes one command may have: the header and two MAC
/// tables of 4,096 entries each (the Linux driver sends every address it
/// has; past [`MAC_TABLE_ENTRIES`] they only count).
pub const MAX_COMMAND_LEN: usize = 2 + 2 * (4 + 4096 * 6);

/// The highest VLAN id (12 bits).
pub const MAX_VID: u16 = 4095;

/// `VIRTIO_NET_CTRL_RX` switches, in command order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RxMode {
    /// Pass every frame.
    Promisc,
    /// Pass every multicast frame.
    AllMulti,
    /// Pass every unicast frame (`CTRL_RX_EXTRA`).
    AllUni,
    /// Drop every multicast frame (`CTRL_RX_EXTRA`).
    NoMulti,
    /// Drop every unicast frame (`CTRL_RX_EXTRA`).
    NoUni,
    /// Drop broadcast frames (`CTRL_RX_EXTRA`).
    NoBcast,
}

/// One parsed control command.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Command {
    /// Turns an [`RxMode`] on or off.
    Rx(RxMode, bool),
    /// Replaces the unicast and multicast MAC tables.
    MacTable {
        /// The unicast addresses.
        unicast: Vec<[u8; 6]>,
        /// The multicast addresses.
        multicast: Vec<[u8; 6]>,
    },
    /// Sets the NIC's own MAC address.
    MacAddr([u8; 6]),
    /// Adds a VLAN to the receive filter.
    VlanAdd(u16),
    /// Removes a VLAN from the receive filter.
    VlanDel(u16),
    /// The driver has announced itself (clears `VIRTIO_NET_S_ANNOUNCE`).
    AnnounceAck,
    /// Uses this many queue pairs.
    QueuePairs(u16),
    /// Sets the receive offloads (`VIRTIO_NET_F_GUEST_*` bits).
    GuestOffloads(u64),
}

impl Command {
    /// The feature bit the driver must have negotiated to send this.
    pub fn feature(&self) -> u32 {
        match self {
            Command::Rx(RxMode::Promisc | RxMode::AllMulti, _) | Command::MacTable { .. } => {
                VIRTIO_NET_F_CTRL_RX
            }
            Command::Rx(..) => VIRTIO_NET_F_CTRL_RX_EXTRA,
            Command::MacAddr(_) => VIRTIO_NET_F_CTRL_MAC_ADDR,
            Command::VlanAdd(_) | Command::VlanDel(_) => VIRTIO_NET_F_CTRL_VLAN,
            Command::AnnounceAck => VIRTIO_NET_F_GUEST_ANNOUNCE,
            Command::QueuePairs(_) => VIRTIO_NET_F_MQ,
            Command::GuestOffloads(_) => {
                virtio_bindings::virtio_net::VIRTIO_NET_F_CTRL_GUEST_OFFLOADS
            }
        }
    }
}

/// Why a command was refused (the driver gets [`VIRTIO_NET_ERR`]; the
/// device logs this).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum CtrlError {
    /// Fewer than the two header bytes.
    #[error("a command of {0} bytes has no class and command")]
    NoHeader(usize),
    /// A class or command this device does not have.
    #[error("unknown command {cmd} of class {class}")]
    Unknown {
        /// The class byte.
        class: u8,
        /// The command byte.
        cmd: u8,
    },
    /// The data is not the size the command needs.
    #[error("{what}: {got} bytes of data, {want}")]
    Length {
        /// The command.
        what: &'static str,
        /// The data's size.
        got: usize,
        /// What it should be.
        want: &'static str,
    },
    /// A VLAN id above 4095.
    #[error("VLAN id {0} is out of range (at most 4095)")]
    Vid(u16),
    /// A MAC address that cannot be the NIC's.
    #[error("{0} is not a unicast MAC address")]
    NotUnicast(String),
    /// A number of queue pairs the device does not have.
    #[error("{got} queue pairs asked for, the device has 1 to {max}")]
    QueuePairs {
        /// What the driver asked for.
        got: u16,
        /// The device's queue pairs.
        max: u16,
    },
    /// Offloads that were not negotiated.
    #[error("receive offloads {0:#x} were not negotiated")]
    Offloads(u64),
    /// The command needs a feature the driver did not negotiate.
    #[error("{what} without feature bit {bit} negotiated")]
    NotNegotiated {
        /// The command.
        what: String,
        /// The feature bit.
        bit: u32,
    },
    /// The chain itself is malformed.
    #[error("malformed chain: {0}")]
    Chain(String),
}

/// `aa:bb:cc:dd:ee:ff`.
fn mac_text(mac: &[u8; 6]) -> String {
    crate::mac_string(mac)
}

/// Parses one command's readable bytes: class, command, data.
pub fn parse(bytes: &[u8]) -> Result<Command, CtrlError> {
    let Some((&[class, cmd], data)) = bytes.split_first_chunk::<2>() else {
        return Err(CtrlError::NoHeader(bytes.len()));
    };
    let (c, m) = (u32::from(class), u32::from(cmd));
    let exact = |what: &'static str, want: usize, text: &'static str| {
        if data.len() == want {
            Ok(())
        } else {
            Err(CtrlError::Length {
                what,
                got: data.len(),
                want: text,
            })
        }
    };
    match c {
        VIRTIO_NET_CTRL_RX => {
            let mode = match m {
                VIRTIO_NET_CTRL_RX_PROMISC => RxMode::Promisc,
                VIRTIO_NET_CTRL_RX_ALLMULTI => RxMode::AllMulti,
                VIRTIO_NET_CTRL_RX_ALLUNI => RxMode::AllUni,
                VIRTIO_NET_CTRL_RX_NOMULTI => RxMode::NoMulti,
                VIRTIO_NET_CTRL_RX_NOUNI => RxMode::NoUni,
                VIRTIO_NET_CTRL_RX_NOBCAST => RxMode::NoBcast,
                _ => return Err(CtrlError::Unknown { class, cmd }),
            };
            exact("RX mode", 1, "1 (on or off)")?;
            Ok(Command::Rx(mode, data.first().is_some_and(|b| *b != 0)))
        }
        VIRTIO_NET_CTRL_MAC => match m {
            VIRTIO_NET_CTRL_MAC_TABLE_SET => {
                let (unicast, rest) = mac_table(data, "unicast")?;
                let (multicast, rest) = mac_table(rest, "multicast")?;
                if !rest.is_empty() {
                    return Err(CtrlError::Length {
                        what: "MAC_TABLE_SET",
                        got: data.len(),
                        want: "two tables exactly",
                    });
                }
                Ok(Command::MacTable { unicast, multicast })
            }
            VIRTIO_NET_CTRL_MAC_ADDR_SET => {
                exact("MAC_ADDR_SET", 6, "6")?;
                let mut mac = [0u8; 6];
                mac.copy_from_slice(data);
                if mac[0] & 1 != 0 || mac == [0; 6] {
                    return Err(CtrlError::NotUnicast(mac_text(&mac)));
                }
                Ok(Command::MacAddr(mac))
            }
            _ => Err(CtrlError::Unknown { class, cmd }),
        },
        VIRTIO_NET_CTRL_VLAN => {
            exact("VLAN", 2, "2 (a little-endian id)")?;
            let vid = u16::from_le_bytes([data[0], data[1]]);
            if vid > MAX_VID {
                return Err(CtrlError::Vid(vid));
            }
            match m {
                VIRTIO_NET_CTRL_VLAN_ADD => Ok(Command::VlanAdd(vid)),
                VIRTIO_NET_CTRL_VLAN_DEL => Ok(Command::VlanDel(vid)),
                _ => Err(CtrlError::Unknown { class, cmd }),
            }
        }
        VIRTIO_NET_CTRL_ANNOUNCE if m == VIRTIO_NET_CTRL_ANNOUNCE_ACK => {
            exact("ANNOUNCE_ACK", 0, "none")?;
            Ok(Command::AnnounceAck)
        }
        VIRTIO_NET_CTRL_MQ if m == VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET => {
            exact("MQ_VQ_PAIRS_SET", 2, "2 (a little-endian count)")?;
            Ok(Command::QueuePairs(u16::from_le_bytes([data[0], data[1]])))
        }
        VIRTIO_NET_CTRL_GUEST_OFFLOADS if m == VIRTIO_NET_CTRL_GUEST_OFFLOADS_SET => {
            exact("GUEST_OFFLOADS_SET", 8, "8 (a little-endian mask)")?;
            let mut b = [0u8; 8];
            b.copy_from_slice(data);
            Ok(Command::GuestOffloads(u64::from_le_bytes(b)))
        }
        _ => Err(CtrlError::Unknown { class, cmd }),
    }
}

/// One `struct virtio_net_ctrl_mac` (le32 count, then the addresses) off
/// the front of `data`; the addresses and what follows.
fn mac_table<'a>(
    data: &'a [u8],
    kind: &'static str,
) -> Result<(Vec<[u8; 6]>, &'a [u8]), CtrlError> {
    let short = |got| CtrlError::Length {
        what: if kind == "unicast" {
            "MAC_TABLE_SET unicast table"
        } else {
            "MAC_TABLE_SET multicast table"
        },
        got,
        want: "4 + 6 per entry",
    };
    let (count, rest) = data.split_first_chunk::<4>().ok_or(short(data.len()))?;
    let count = usize::try_from(u32::from_le_bytes(*count)).unwrap_or(usize::MAX);
    let bytes = count
        .checked_mul(6)
        .filter(|b| *b <= rest.len())
        .ok_or(short(data.len()))?;
    let (macs, rest) = rest.split_at(bytes);
    let table = macs
        .chunks_exact(6)
        .map(|c| {
            let mut m = [0u8; 6];
            m.copy_from_slice(c);
            m
        })
        .collect();
    Ok((table, rest))
}

/// What the control commands set, as a snapshot keeps it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RxFilterState {
    /// The NIC's current MAC address (the guest may have set it).
    pub mac: [u8; 6],
    /// `PROMISC`.
    pub promisc: bool,
    /// `ALLMULTI`.
    pub all_multi: bool,
    /// `ALLUNI`.
    pub all_uni: bool,
    /// `NOMULTI`.
    pub no_multi: bool,
    /// `NOUNI`.
    pub no_uni: bool,
    /// `NOBCAST`.
    pub no_bcast: bool,
    /// The unicast table (at most [`MAC_TABLE_ENTRIES`]).
    pub unicast: Vec<[u8; 6]>,
    /// The unicast table overflowed: every unicast address passes.
    pub unicast_overflow: bool,
    /// The multicast table (at most [`MAC_TABLE_ENTRIES`]).
    pub multicast: Vec<[u8; 6]>,
    /// The multicast table overflowed: every multicast address passes.
    pub multicast_overflow: bool,
    /// The VLANs in the filter table, ascending; `None` when the driver
    /// did not negotiate `VIRTIO_NET_F_CTRL_VLAN` (every VLAN passes).
    pub vlans: Option<Vec<u16>>,
    /// The queue pairs in use.
    pub queue_pairs: u16,
}

/// The receive filter the control queue sets.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RxFilter {
    s: RxFilterState,
    /// One bit per VLAN id; all set when VLAN filtering is off.
    vlan_bits: Box<[u64; 64]>,
    /// The negotiated features.
    acked: u64,
    /// The device's queue pairs.
    max_pairs: u16,
}

impl RxFilter {
    /// The filter of a reset device with MAC `mac`: promiscuous, no tables,
    /// every VLAN.
    pub fn new(mac: [u8; 6]) -> RxFilter {
        RxFilter {
            s: RxFilterState {
                mac,
                promisc: true,
                all_multi: false,
                all_uni: false,
                no_multi: false,
                no_uni: false,
                no_bcast: false,
                unicast: Vec::new(),
                unicast_overflow: false,
                multicast: Vec::new(),
                multicast_overflow: false,
                vlans: None,
                queue_pairs: 1,
            },
            vlan_bits: Box::new([u64::MAX; 64]),
            acked: 0,
            max_pairs: 1,
        }
    }

    /// The driver negotiated `acked` on a device with `max_pairs` queue
    /// pairs: with `VIRTIO_NET_F_CTRL_VLAN` the VLAN table starts empty
    /// (only untagged frames pass).
    pub fn set_features(&mut self, acked: u64, max_pairs: u16) {
        self.acked = acked;
        self.max_pairs = max_pairs.max(1);
        if acked & (1 << VIRTIO_NET_F_CTRL_VLAN) != 0 {
            self.s.vlans = Some(Vec::new());
            self.vlan_bits.fill(0);
        }
    }

    /// Back to the reset state, keeping the MAC the device was built with.
    pub fn reset(&mut self, mac: [u8; 6]) {
        *self = RxFilter::new(mac);
    }

    /// The current MAC address.
    pub fn mac(&self) -> [u8; 6] {
        self.s.mac
    }

    /// The queue pairs in use.
    pub fn queue_pairs(&self) -> u16 {
        self.s.queue_pairs
    }

    /// Whether `vid` passes the VLAN table.
    pub fn vlan_passes(&self, vid: u16) -> bool {
        let vid = usize::from(vid & MAX_VID);
        self.vlan_bits[vid / 64] & (1 << (vid % 64)) != 0
    }

    /// Applies a parsed command. A command whose feature was not
    /// negotiated, or whose values the device cannot take, changes nothing.
    pub fn apply(&mut self, cmd: &Command) -> Result<(), CtrlError> {
        let bit = cmd.feature();
        if self.acked & (1 << bit) == 0 {
            return Err(CtrlError::NotNegotiated {
                what: format!("{cmd:?}"),
                bit,
            });
        }
        let s = &mut self.s;
        match cmd {
            Command::Rx(mode, on) => {
                let flag = match mode {
                    RxMode::Promisc => &mut s.promisc,
                    RxMode::AllMulti => &mut s.all_multi,
                    RxMode::AllUni => &mut s.all_uni,
                    RxMode::NoMulti => &mut s.no_multi,
                    RxMode::NoUni => &mut s.no_uni,
                    RxMode::NoBcast => &mut s.no_bcast,
                };
                *flag = *on;
            }
            Command::MacTable { unicast, multicast } => {
                s.unicast_overflow = unicast.len() > MAC_TABLE_ENTRIES;
                s.unicast = if s.unicast_overflow {
                    Vec::new()
                } else {
                    unicast.clone()
                };
                s.multicast_overflow = multicast.len() > MAC_TABLE_ENTRIES;
                s.multicast = if s.multicast_overflow {
                    Vec::new()
                } else {
                    multicast.clone()
                };
            }
            Command::MacAddr(mac) => s.mac = *mac,
            Command::VlanAdd(vid) | Command::VlanDel(vid) => {
                let add = matches!(cmd, Command::VlanAdd(_));
                let v = usize::from(*vid);
                if add {
                    self.vlan_bits[v / 64] |= 1 << (v % 64);
                } else {
                    self.vlan_bits[v / 64] &= !(1 << (v % 64));
                }
                if let Some(list) = s.vlans.as_mut() {
                    list.retain(|x| x != vid);
                    if add {
                        list.push(*vid);
                        list.sort_unstable();
                    }
                }
            }
            Command::AnnounceAck => {}
            Command::QueuePairs(n) => {
                if *n == 0 || *n > self.max_pairs {
                    return Err(CtrlError::QueuePairs {
                        got: *n,
                        max: self.max_pairs,
                    });
                }
                s.queue_pairs = *n;
            }
            Command::GuestOffloads(mask) => {
                if mask & !self.acked != 0 {
                    return Err(CtrlError::Offloads(mask & !self.acked));
                }
            }
        }
        Ok(())
    }

    /// Whether a frame (Ethernet header first, no virtio-net header) passes.
    pub fn accepts(&self, frame: &[u8]) -> bool {
        let s = &self.s;
        if s.promisc {
            return true;
        }
        let Some(dst) = frame.first_chunk::<6>() else {
            return false;
        };
        if frame.get(12..14) == Some(&[0x81, 0x00][..]) {
            let Some(tci) = frame.get(14..16) else {
                return false;
            };
            if !self.vlan_passes(u16::from_be_bytes([tci[0], tci[1]])) {
                return false;
            }
        }
        if dst[0] & 1 != 0 {
            if *dst == [0xff; 6] {
                return !s.no_bcast;
            }
            if s.no_multi {
                return false;
            }
            return s.all_multi || s.multicast_overflow || s.multicast.contains(dst);
        }
        if s.no_uni {
            return false;
        }
        s.all_uni || s.unicast_overflow || *dst == s.mac || s.unicast.contains(dst)
    }

    /// The state to save.
    pub fn state(&self) -> RxFilterState {
        self.s.clone()
    }

    /// Puts a saved state back (after [`RxFilter::set_features`] with the
    /// restored features). A VLAN above 4095, a table longer than
    /// [`MAC_TABLE_ENTRIES`] or more queue pairs than the device has is
    /// refused.
    pub fn restore(&mut self, state: &RxFilterState) -> Result<(), CtrlError> {
        if state.unicast.len() > MAC_TABLE_ENTRIES || state.multicast.len() > MAC_TABLE_ENTRIES {
            return Err(CtrlError::Length {
                what: "saved MAC table",
                got: state.unicast.len().max(state.multicast.len()),
                want: "at most 64 entries",
            });
        }
        if state.queue_pairs == 0 || state.queue_pairs > self.max_pairs {
            return Err(CtrlError::QueuePairs {
                got: state.queue_pairs,
                max: self.max_pairs,
            });
        }
        let mut bits = Box::new([u64::MAX; 64]);
        if let Some(list) = &state.vlans {
            bits.fill(0);
            for &vid in list {
                if vid > MAX_VID {
                    return Err(CtrlError::Vid(vid));
                }
                bits[usize::from(vid) / 64] |= 1 << (vid % 64);
            }
        }
        self.vlan_bits = bits;
        self.s = state.clone();
        Ok(())
    }
}

#[cfg(test)]
mod tests;
