//! Firecracker's metrics: one JSON object per flush, written to the
//! metrics file (or named pipe) on `FlushMetrics` and every 60 s. The
//! groups and names are Firecracker's where ember has the same counter
//! (`api_server`, `get_api_requests`, `put_api_requests`,
//! `patch_api_requests`, `block`, `net`, `vcpu`, `balloon`, `vsock`,
//! `entropy`, `latencies_us`).

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::{json, Map, Value};

/// How often metrics are written without being asked.
pub const FLUSH_INTERVAL: Duration = Duration::from_secs(60);

/// Counts by name, in a group.
pub type Counters = BTreeMap<&'static str, u64>;

/// What metrics can fail at.
#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    /// The metrics file cannot be opened.
    #[error("cannot open the metrics file {}", .0.display())]
    Open(PathBuf, #[source] std::io::Error),
    /// Metrics were set up already.
    #[error("metrics are already set up (to {})", .0.display())]
    AlreadySet(PathBuf),
    /// No metrics file was set up.
    #[error("no metrics file: set one with PUT /metrics or --metrics-path")]
    NotSet,
    /// The file cannot be written.
    #[error("cannot write the metrics file {}", .0.display())]
    Write(PathBuf, #[source] std::io::Error),
}

/// The metrics sink and the counters only the instance keeps.
#[derive(Debug, Default)]
pub struct Metrics {
    sink: Option<(PathBuf, File)>,
    emit_id: bool,
    properties: BTreeMap<String, String>,
    last_flush: Option<Instant>,
    /// `get_api_requests`, `put_api_requests`, `patch_api_requests`, and
    /// `api_server`.
    pub api: BTreeMap<&'static str, Counters>,
    /// `latencies_us`: the last of each operation.
    pub latencies_us: Counters,
}

impl Metrics {
    /// Sets the file (once, as Firecracker does). A named pipe opens
    /// without waiting for its reader.
    pub fn set_sink(
        &mut self,
        path: &Path,
        emit_id: bool,
        properties: BTreeMap<String, String>,
    ) -> Result<(), MetricsError> {
        if let Some((p, _)) = &self.sink {
            return Err(MetricsError::AlreadySet(p.clone()));
        }
        let file = std::fs::OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(path)
            .map_err(|e| MetricsError::Open(path.to_owned(), e))?;
        self.sink = Some((path.to_owned(), file));
        self.emit_id = emit_id;
        self.properties = properties;
        self.last_flush = Some(Instant::now());
        Ok(())
    }

    /// Counts one API request in `group` (e.g. `put_api_requests`) under
    /// `name` (e.g. `machine_cfg_count`); a failed one also under
    /// `name` with `_count` replaced by `_fails`.
    pub fn count_api(&mut self, group: &'static str, name: &'static str, failed: bool) {
        let g = self.api.entry(group).or_default();
        *g.entry(name).or_default() += 1;
        if failed {
            *g.entry(fails_name(name)).or_default() += 1;
        }
    }

    /// Milliseconds until the next periodic flush (-1: none is due, no file).
    pub fn next_flush_ms(&self) -> i32 {
        match self.last_flush {
            Some(last) => {
                let left = FLUSH_INTERVAL.saturating_sub(last.elapsed());
                i32::try_from(left.as_millis()).unwrap_or(i32::MAX)
            }
            None => -1,
        }
    }

    /// Whether a periodic flush is due.
    pub fn due(&self) -> bool {
        self.last_flush
            .is_some_and(|last| last.elapsed() >= FLUSH_INTERVAL)
    }

    /// Writes one line: the instance's counters plus `devices` (groups of
    /// the running VM: `block`, `net`, `vcpu`).
    pub fn flush(
        &mut self,
        id: &str,
        devices: Vec<(&'static str, Counters)>,
    ) -> Result<(), MetricsError> {
        let Some((path, file)) = self.sink.as_mut() else {
            return Err(MetricsError::NotSet);
        };
        let mut obj = Map::new();
        let ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
            .unwrap_or(0);
        obj.insert("utc_timestamp_ms".into(), json!(ms));
        if self.emit_id {
            obj.insert("id".into(), json!(id));
        }
        if !self.properties.is_empty() {
            obj.insert("properties".into(), json!(self.properties));
        }
        for (group, counters) in self.api.iter().chain(devices.iter().map(|(g, c)| (g, c))) {
            obj.insert((*group).into(), json!(counters));
        }
        obj.insert("latencies_us".into(), json!(self.latencies_us));
        let mut line = Value::Object(obj).to_string();
        line.push('\n');
        self.last_flush = Some(Instant::now());
        file.write_all(line.as_bytes())
            .map_err(|e| MetricsError::Write(path.clone(), e))
    }
}

fn fails_name(name: &'static str) -> &'static str {
    // Firecracker pairs each `X_count` with `X_fails`.
    match name {
        "actions_count" => "actions_fails",
        "boot_source_count" => "boot_source_fails",
        "drive_count" => "drive_fails",
        "network_count" => "network_fails",
        "machine_cfg_count" => "machine_cfg_fails",
        "logger_count" => "logger_fails",
        "metrics_count" => "metrics_fails",
        "vm_count" => "vm_fails",
        "instance_info_count" => "instance_info_fails",
        "vmm_version_count" => "vmm_version_fails",
        "vm_config_count" => "vm_config_fails",
        "cpu_cfg_count" => "cpu_cfg_fails",
        "send_migration_count" => "send_migration_fails",
        "receive_migration_count" => "receive_migration_fails",
        "migration_cancel_count" => "migration_cancel_fails",
        "power_button_count" => "power_button_fails",
        _ => "other_fails",
    }
}

impl crate::Vmm {
    /// The running VM's counters in Firecracker's metric groups, summed
    /// over devices of a kind: `block`, `net`, `vcpu`.
    pub fn device_metrics(&self) -> Vec<(&'static str, Counters)> {
        fn add(group: &mut Counters, values: &[(&'static str, u64)]) {
            for (k, v) in values {
                *group.entry(k).or_default() += v;
            }
        }
        let (mut block, mut net, mut vcpu) = Default::default();
        for d in &self.disks {
            let c = d
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .device()
                .counters();
            add(
                &mut block,
                &[
                    ("read_count", c.reads),
                    ("read_bytes", c.read_bytes),
                    ("write_count", c.writes),
                    ("write_bytes", c.write_bytes),
                    ("flush_count", c.flushes),
                    ("invalid_reqs_count", c.errors),
                ],
            );
        }
        for n in &self.nets {
            let c = n
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .device()
                .counters();
            add(
                &mut net,
                &[
                    ("rx_packets_count", c.rx_packets),
                    ("rx_bytes_count", c.rx_bytes),
                    ("rx_dropped", c.rx_dropped),
                    ("tx_packets_count", c.tx_packets),
                    ("tx_bytes_count", c.tx_bytes),
                    ("tx_dropped", c.tx_dropped),
                ],
            );
        }
        for c in &self.exit_counters {
            let c = c.snapshot();
            add(
                &mut vcpu,
                &[
                    ("exit_io_in", c.io_in),
                    ("exit_io_out", c.io_out),
                    ("exit_mmio_read", c.mmio_read),
                    ("exit_mmio_write", c.mmio_write),
                    ("exit_interrupted", c.interrupted),
                    ("exit_other", c.other),
                ],
            );
        }
        let mut groups = vec![("block", block), ("net", net), ("vcpu", vcpu)];
        if let Some(c) = self.balloon_counters() {
            let mut balloon = Counters::default();
            add(
                &mut balloon,
                &[
                    ("inflate_count", c.inflated_pages),
                    ("deflate_count", c.deflated_pages),
                    ("stats_updates_count", c.stats_updates),
                    ("free_page_report_count", c.reported_bytes >> 12),
                    ("discarded_bytes", c.discarded_bytes),
                    ("event_fails", c.refused),
                ],
            );
            groups.push(("balloon", balloon));
        }
        if let Some(v) = &self.vsock {
            let v = v.lock().unwrap_or_else(|e| e.into_inner());
            let mut group = Counters::default();
            add(
                &mut group,
                &crate::vsock::vsock_metrics(&v.device().counters(), v.device().connections()),
            );
            groups.push(("vsock", group));
        }
        if let Some(e) = &self.entropy {
            let e = e.lock().unwrap_or_else(|e| e.into_inner());
            let mut group = Counters::default();
            add(
                &mut group,
                &crate::vsock::entropy_metrics(&e.device().counters()),
            );
            groups.push(("entropy", group));
        }
        groups
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_flush_writes_one_json_line_per_flush() {
        let dir = std::env::temp_dir().join(format!("ember-metrics-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("metrics");
        let mut m = Metrics::default();
        assert!(matches!(m.flush("x", vec![]), Err(MetricsError::NotSet)));
        m.set_sink(&path, true, BTreeMap::from([("k".into(), "v".into())]))
            .unwrap();
        assert!(matches!(
            m.set_sink(&path, false, BTreeMap::new()),
            Err(MetricsError::AlreadySet(_))
        ));
        m.count_api("put_api_requests", "machine_cfg_count", true);
        m.latencies_us.insert("pause_vm", 42);
        m.flush("vm1", vec![("block", Counters::from([("read_count", 3)]))])
            .unwrap();
        m.flush("vm1", vec![]).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 2);
        assert_eq!(lines[0]["id"], "vm1");
        assert_eq!(lines[0]["properties"]["k"], "v");
        assert_eq!(lines[0]["put_api_requests"]["machine_cfg_fails"], 1);
        assert_eq!(lines[0]["block"]["read_count"], 3);
        assert_eq!(lines[0]["latencies_us"]["pause_vm"], 42);
        assert!(lines[1]["utc_timestamp_ms"].as_u64().unwrap() > 1_700_000_000_000);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
