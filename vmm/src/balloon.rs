//! The VM's virtio-balloon: created from the configuration, driven by the
//! API (`PATCH /balloon`, `GET /balloon/statistics`, ...).

use ember_virtio_balloon::{Balloon, BalloonConfig, StatTag};

use crate::virtio_devices::{attach, AttachContext, Attached};
use crate::{Error, Vmm};

/// The balloon on the PCI bus.
pub type BalloonDevice = Attached<Balloon>;

/// Puts a balloon configured as `config` on the PCI bus.
pub fn create(ctx: &mut AttachContext<'_>, config: BalloonConfig) -> Result<BalloonDevice, Error> {
    let device = Balloon::new(config).map_err(|e| Error::Balloon(e.to_string()))?;
    attach(ctx, "balloon", device)
}

/// The balloon's statistics as the API reports them.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Stats {
    /// Pages it aims at.
    pub target_pages: u32,
    /// Pages it holds.
    pub actual_pages: u32,
    /// The guest's latest values by Firecracker's names.
    pub values: Vec<(&'static str, u64)>,
    /// Seconds since they arrived (none yet: `None`).
    pub age_s: Option<f64>,
}

fn no_balloon() -> Error {
    Error::Balloon("no balloon device is configured".into())
}

impl Vmm {
    /// Whether the VM has a balloon.
    pub fn has_balloon(&self) -> bool {
        self.balloon.is_some()
    }

    fn balloon(&self) -> Result<&BalloonDevice, Error> {
        self.balloon.as_ref().ok_or_else(no_balloon)
    }

    /// The balloon's configuration with its current target.
    pub fn balloon_config(&self) -> Result<BalloonConfig, Error> {
        Ok(lock(self.balloon()?).device().config())
    }

    /// Sets the balloon's target and tells the guest.
    pub fn set_balloon_target(&self, mib: u32) -> Result<(), Error> {
        if u64::from(mib) > self.saved.machine.memory_mib {
            return Err(Error::Balloon(format!(
                "amount_mib = {mib} is more than the guest's {} MiB",
                self.saved.machine.memory_mib
            )));
        }
        let mut dev = lock(self.balloon()?);
        let changed = dev
            .device_mut()
            .set_target_mib(mib)
            .map_err(|e| Error::Balloon(e.to_string()))?;
        if changed && dev.is_running() {
            dev.signal_config_change()
                .map_err(|e| Error::Balloon(format!("cannot tell the guest: {e}")))?;
        }
        log::info!("balloon: target {mib} MiB");
        Ok(())
    }

    /// Changes the statistics interval (statistics stay on or off).
    pub fn set_balloon_stats_interval(&self, seconds: u16) -> Result<(), Error> {
        lock(self.balloon()?)
            .device_mut()
            .set_stats_interval(seconds)
            .map_err(|e| Error::Balloon(e.to_string()))
    }

    /// The balloon's statistics; an error if they were not enabled.
    pub fn balloon_stats(&self) -> Result<Stats, Error> {
        let dev = lock(self.balloon()?);
        let b = dev.device();
        if b.config().stats_polling_interval_s == 0 {
            return Err(Error::Balloon(
                "statistics were not enabled when the balloon was configured (stats_polling_interval_s = 0)".into(),
            ));
        }
        let (values, age_s) = match b.stats() {
            Some((s, at)) => (
                StatTag::ALL
                    .iter()
                    .filter_map(|t| s.get(*t).map(|v| (t.api_name(), v)))
                    .collect(),
                Some(at.elapsed().as_secs_f64()),
            ),
            None => (Vec::new(), None),
        };
        Ok(Stats {
            target_pages: b.target_pages(),
            actual_pages: b.actual_pages(),
            values,
            age_s,
        })
    }

    /// The balloon's counters, for the metrics.
    pub fn balloon_counters(&self) -> Option<ember_virtio_balloon::Counters> {
        self.balloon.as_ref().map(|b| lock(b).device().counters())
    }
}

fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}
