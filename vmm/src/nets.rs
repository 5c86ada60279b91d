//! virtio-net NICs on taps, on the PCI bus.

use std::sync::{Arc, Mutex};

use ember_virtio::VirtioPciDevice;
use ember_virtio_net::{Net, NetConfig as DeviceConfig};

use crate::config::NetConfig;
use crate::virtio_devices::{attach, AttachContext};
use crate::Error;

/// A NIC as the VM holds it.
pub type NetDevice = Arc<Mutex<VirtioPciDevice<Net>>>;

/// Creates one virtio-net PCI function per NIC, in order (eth0, eth1, ...
/// in the guest). A tap that does not exist or cannot be opened is an error
/// before the VM starts. `taps`, when not empty, are the NICs' taps already
/// open (a local migration's), one per NIC.
pub fn create_nets(
    ctx: &mut AttachContext<'_>,
    nets: &[(NetConfig, [u8; 6])],
    taps: &[std::fs::File],
) -> Result<Vec<NetDevice>, Error> {
    if !taps.is_empty() && taps.len() != nets.len() {
        return Err(Error::Migration(format!(
            "{} taps handed over for {} NICs",
            taps.len(),
            nets.len()
        )));
    }
    let mut devices = Vec::with_capacity(nets.len());
    for (index, (n, mac)) in nets.iter().enumerate() {
        let cfg = DeviceConfig {
            tap: n.tap.clone(),
            mac: *mac,
            offloads: n.offloads,
            vlan: n.vlan,
        };
        let net = match taps.get(index) {
            Some(file) => file
                .try_clone()
                .map_err(|e| ember_virtio_net::Error::TapOpen {
                    name: n.tap.clone(),
                    source: e,
                })
                .and_then(|f| ember_virtio_net::Tap::from_file(f, &n.tap))
                .and_then(|tap| Net::with_tap(tap, &cfg)),
            None => Net::new(&cfg),
        }
        .map_err(|source| Error::Net { index, source })?;
        let name = format!("virtio-net{index}");
        let dev = attach(ctx, &name, net)?;
        log::info!(
            "{name}: tap {}, mac {}{}",
            n.tap,
            mac.map(|b| format!("{b:02x}")).join(":"),
            n.vlan.map(|v| format!(", vlan {v}")).unwrap_or_default()
        );
        devices.push(dev);
    }
    Ok(devices)
}

/// Logs every NIC's counters (at exit, `--log-level info`).
pub fn log_counters(nets: &[NetDevice]) {
    for (i, n) in nets.iter().enumerate() {
        let c = n
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .device()
            .counters();
        log::info!(
            "virtio-net{i}: rx {} packets {} bytes {} dropped, tx {} packets {} bytes {} dropped, \
             filtered {}, control {} ok {} refused",
            c.rx_packets,
            c.rx_bytes,
            c.rx_dropped,
            c.tx_packets,
            c.tx_bytes,
            c.tx_dropped,
            c.rx_filtered,
            c.ctrl_ok,
            c.ctrl_err
        );
    }
}
