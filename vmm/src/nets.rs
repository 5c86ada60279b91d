//! virtio-net NICs on taps or on user-mode networking (passt), on the PCI
//! bus.

use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex};

use ember_rate_limiter::RateLimiterConfig;
use ember_virtio::VirtioPciDevice;
use ember_virtio_net::{Net, NetConfig as DeviceConfig, StreamBackend};

use crate::config::net::NetKind;
use crate::config::NetConfig;
use crate::virtio_devices::{attach, AttachContext};
use crate::Error;

/// A NIC as the VM holds it.
pub type NetDevice = Arc<Mutex<VirtioPciDevice<Net>>>;

/// Creates one virtio-net PCI function per NIC, in order (eth0, eth1, ...
/// in the guest). A tap that does not exist or cannot be opened, or a
/// passt that cannot start, is an error before the VM starts. `taps`, when
/// not empty, are the NICs' descriptors already open (a local migration's:
/// a tap's queues, or a user-mode NIC's socket to its passt), NIC after
/// NIC.
pub fn create_nets(
    ctx: &mut AttachContext<'_>,
    nets: &[(NetConfig, [u8; 6])],
    taps: &[std::fs::File],
) -> Result<Vec<NetDevice>, Error> {
    let want: usize = nets.iter().map(|(n, _)| n.descriptors()).sum();
    if !taps.is_empty() && taps.len() != want {
        return Err(Error::Migration(format!(
            "{} tap descriptors handed over for {} NICs, which have {want} queues",
            taps.len(),
            nets.len()
        )));
    }
    let mut devices = Vec::with_capacity(nets.len());
    let mut handed = taps;
    for (index, (n, mac)) in nets.iter().enumerate() {
        let (mine, rest) = handed.split_at(n.descriptors().min(handed.len()));
        handed = rest;
        let net = match n.kind() {
            NetKind::Tap(tap) => {
                tap_nic(n, tap, *mac, mine).map_err(|source| Error::Net { index, source })?
            }
            NetKind::User(user) => {
                let (sock, what) = match mine.first() {
                    Some(file) => (
                        file.try_clone()
                            .map(|f| UnixStream::from(std::os::fd::OwnedFd::from(f)))
                            .map_err(|e| Error::UserNet {
                                index,
                                source: crate::passt::PasstError::Io {
                                    what: "the socket handed over",
                                    source: e,
                                },
                            })?,
                        "passt handed over".to_string(),
                    ),
                    None => {
                        let (sock, pid) = crate::passt::connect(user)
                            .map_err(|source| Error::UserNet { index, source })?;
                        let what = match (pid, &user.socket) {
                            (Some(pid), _) => format!("passt {pid}"),
                            (None, Some(p)) => format!("passt at {}", p.display()),
                            (None, None) => "passt".to_string(),
                        };
                        (sock, what)
                    }
                };
                let backend = StreamBackend::new(sock).map_err(|e| Error::UserNet {
                    index,
                    source: crate::passt::PasstError::Io {
                        what: "the socket to passt",
                        source: e,
                    },
                })?;
                let mut net = Net::with_backend(Box::new(backend), *mac, false);
                net.set_name(&format!("user{index} ({what})"));
                net
            }
        };
        let mut net = net;
        if n.vhost {
            match net.enable_vhost(ctx.mem) {
                Ok(()) => log::info!("virtio-net{index}: vhost-net moves the frames"),
                Err(e) => log::warn!(
                    "virtio-net{index} ({}): vhost=on, but {e}; the NIC runs on ember's own \
                     virtio-net",
                    n.label()
                ),
            }
        }
        if n.rx_rate_limiter.is_some() || n.tx_rate_limiter.is_some() {
            net.update_rate_limits(n.rx_rate_limiter.as_ref(), n.tx_rate_limiter.as_ref())
                .map_err(|source| Error::Net { index, source })?;
        }
        let name = format!("virtio-net{index}");
        let dev = attach(ctx, &name, net)?;
        let fwd = match n.kind() {
            NetKind::User(u) if !u.hostfwd.is_empty() => {
                format!(", hostfwd {}", u.hostfwd.join(" "))
            }
            _ => String::new(),
        };
        log::info!(
            "{name}: {}, mac {}{}{}{fwd}",
            match n.kind() {
                NetKind::Tap(t) => format!("tap {t}"),
                NetKind::User(_) => "user-mode (passt)".to_string(),
            },
            mac.map(|b| format!("{b:02x}")).join(":"),
            n.vlan.map(|v| format!(", vlan {v}")).unwrap_or_default(),
            if n.queues > 1 {
                format!(", {} queue pairs", n.queues)
            } else {
                String::new()
            }
        );
        devices.push(dev);
    }
    Ok(devices)
}

/// A NIC on the tap `tap`: opened by name (one queue per pair), or the
/// descriptors a local migration handed over.
fn tap_nic(
    n: &NetConfig,
    tap: &str,
    mac: [u8; 6],
    handed: &[std::fs::File],
) -> Result<Net, ember_virtio_net::Error> {
    let cfg = DeviceConfig {
        tap: tap.to_string(),
        mac,
        offloads: n.offloads,
        vlan: n.vlan,
        queues: n.queues,
    };
    if handed.is_empty() {
        return Net::new(&cfg);
    }
    let taps = handed
        .iter()
        .map(|file| {
            file.try_clone()
                .map_err(|e| ember_virtio_net::Error::TapOpen {
                    name: tap.to_string(),
                    source: e,
                })
                .and_then(|f| ember_virtio_net::Tap::from_file(f, tap))
        })
        .collect::<Result<Vec<_>, _>>()?;
    Net::with_taps(taps, &cfg)
}

/// Changes NIC `index`'s limits live; the limits now in force.
pub fn patch_rate_limits(
    nets: &[NetDevice],
    index: usize,
    rx: Option<&RateLimiterConfig>,
    tx: Option<&RateLimiterConfig>,
) -> Result<(RateLimiterConfig, RateLimiterConfig), Error> {
    let net = nets
        .get(index)
        .ok_or_else(|| Error::Guest(format!("no NIC {index}")))?;
    let mut dev = net.lock().unwrap_or_else(|e| e.into_inner());
    dev.device_mut()
        .update_rate_limits(rx, tx)
        .map_err(|source| Error::Net { index, source })?;
    let (rx, tx) = dev.device().rate_limits();
    log::info!("virtio-net{index}: rate limits now rx {rx}, tx {tx}");
    Ok((rx, tx))
}

/// Logs every NIC's counters (at exit, `--log-level info`).
pub fn log_counters(nets: &[NetDevice]) {
    for (i, n) in nets.iter().enumerate() {
        let dev = n.lock().unwrap_or_else(|e| e.into_inner());
        let c = dev.device().counters();
        let pairs = dev.device().pair_packets();
        let per_pair = if pairs.len() > 1 {
            let each: Vec<String> = pairs.iter().map(|(r, t)| format!("{r}/{t}")).collect();
            format!(
                ", {} of {} queue pairs in use, rx/tx packets by pair: {}",
                dev.device().active_queue_pairs(),
                pairs.len(),
                each.join(" ")
            )
        } else {
            String::new()
        };
        log::info!(
            "virtio-net{i}: rx {} packets {} bytes {} dropped, tx {} packets {} bytes {} dropped, \
             filtered {}, control {} ok {} refused, largest tx frame {} bytes{per_pair}",
            c.rx_packets,
            c.rx_bytes,
            c.rx_dropped,
            c.tx_packets,
            c.tx_bytes,
            c.tx_dropped,
            c.rx_filtered,
            c.ctrl_ok,
            c.ctrl_err,
            dev.device().largest_tx_frame()
        );
    }
}
