//! The VM's virtio-vsock and virtio-rng (entropy) devices: created from
//! the configuration, reported in metrics and the exit log.

use ember_virtio_rng::{EntropyConfig, Rng};
use ember_virtio_vsock::{Vsock, VsockConfig};

use crate::virtio_devices::{attach, AttachContext, Attached};
use crate::Error;

/// The vsock device on its bus.
pub type VsockDevice = Attached<Vsock>;
/// The entropy device on its bus.
pub type EntropyDevice = Attached<Rng>;

/// Puts a vsock device configured as `config` on the bus; binds its
/// `uds_path`.
pub fn create_vsock(
    ctx: &mut AttachContext<'_>,
    config: &VsockConfig,
) -> Result<VsockDevice, Error> {
    let device = Vsock::new(config).map_err(|e| Error::Device {
        name: "vsock",
        why: e.to_string(),
    })?;
    let dev = attach(ctx, "vsock", device)?;
    log::info!(
        "vsock: guest CID {}, host programs connect to {}",
        config.guest_cid,
        config.uds_path.display()
    );
    Ok(dev)
}

/// Puts an entropy device configured as `config` on the bus.
pub fn create_entropy(
    ctx: &mut AttachContext<'_>,
    config: &EntropyConfig,
) -> Result<EntropyDevice, Error> {
    let device = Rng::new(config).map_err(|e| Error::Device {
        name: "entropy",
        why: e.to_string(),
    })?;
    attach(ctx, "entropy", device)
}

/// The vsock device's counters as metrics (Firecracker's `vsock` group
/// names where it has them).
pub fn vsock_metrics(c: &ember_virtio_vsock::Counters, open: usize) -> Vec<(&'static str, u64)> {
    vec![
        ("conns_added", c.host_connections + c.guest_connections),
        ("host_conns_added", c.host_connections),
        ("guest_conns_added", c.guest_connections),
        ("conns_removed", c.closed),
        ("conns_open", open as u64),
        ("rx_bytes_count", c.rx_bytes),
        ("tx_bytes_count", c.tx_bytes),
        ("host_conns_refused", c.refused_host),
        ("rx_packets_refused", c.refused_guest),
        ("bad_chains", c.bad_packets),
    ]
}

/// The entropy device's counters as metrics (Firecracker's `entropy`
/// group names where it has them).
pub fn entropy_metrics(c: &ember_virtio_rng::Counters) -> Vec<(&'static str, u64)> {
    vec![
        ("entropy_event_count", c.requests),
        ("entropy_bytes", c.bytes),
        ("entropy_rate_limiter_throttled", c.throttled),
        ("entropy_event_fails", c.bad_requests),
    ]
}
