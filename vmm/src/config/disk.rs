//! `[[disk]]`: virtio-blk disks, and the `--disk` flag.

use std::os::unix::fs::FileTypeExt;
use std::path::{Path, PathBuf};

use ember_rate_limiter::{BucketConfig, RateLimiterConfig};
pub use ember_virtio_blk::{CacheMode, ErrorPolicy, ImageFormat, IoEngine};
use serde::{Deserialize, Serialize};

use super::ConfigError;

/// Most disks per VM.
pub const MAX_DISKS: usize = 8;
/// Longest disk id (virtio-blk GET_ID returns 20 bytes).
pub const MAX_ID_LEN: usize = 20;

/// One `[[disk]]` table.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct DiskConfig {
    /// The image file (or host block device).
    pub path: PathBuf,
    /// How the image is laid out: `raw` (the default; its size must be a
    /// multiple of 512) or `qcow2`. Never guessed from the contents: a guest
    /// that writes a qcow2 header into a raw disk must not change what the
    /// host opens next time.
    #[serde(default, skip_serializing_if = "is_raw")]
    pub format: ImageFormat,
    /// The guest may not write.
    #[serde(default)]
    pub read_only: bool,
    /// Returned by GET_ID (`/sys/block/vdX/serial`), at most 20 bytes.
    pub id: Option<String>,
    /// The API's name for the disk (Firecracker's `drive_id`); `drive<N>`
    /// (its position) when absent.
    #[serde(default)]
    pub drive_id: Option<String>,
    /// The guest's root filesystem: put first (vda) and named on the
    /// kernel command line (`root=/dev/vda rw`, or `ro`), as Firecracker's
    /// `is_root_device` does. At most one disk.
    #[serde(default)]
    pub root: bool,
    /// With `root`: the root partition's unique id, so the command line
    /// says `root=PARTUUID=...` (Firecracker's `partuuid`) instead of
    /// `/dev/vda`, for images with a partition table.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partuuid: Option<String>,
    /// Request queues; one per vCPU when absent (a saved configuration
    /// always has the number the guest saw).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub num_queues: Option<u16>,
    /// Entries per queue (a power of two, 16 to 1024); 256 when absent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub queue_size: Option<u16>,
    /// Firecracker's token buckets: `bandwidth` (bytes) and `ops`
    /// (requests), each `{ size, one_time_burst, refill_time }` (ms).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limiter: Option<RateLimiterConfig>,
    /// How requests reach the host: `sync` (the default) or `io_uring`
    /// (many in flight; Firecracker's `io_engine = "Async"`).
    #[serde(default, skip_serializing_if = "is_default")]
    pub io: IoEngine,
    /// `writeback` (through the host page cache, the default) or `none`
    /// (`O_DIRECT`, raw images). Guest flushes reach the disk in both.
    #[serde(default, skip_serializing_if = "is_default")]
    pub cache: CacheMode,
    /// Serve the disk's queues on a thread of its own (QEMU's `iothread`)
    /// instead of the event loop: a busy disk then never delays the API,
    /// the console or a NIC, and disks run in parallel on a host with
    /// cores to spare. Off by default (one thread serves every device, as
    /// in Firecracker).
    #[serde(default, skip_serializing_if = "is_default")]
    pub iothread: bool,
    /// What a write, flush, discard or write-zeroes the host fails does
    /// (QEMU's `werror`): `report` (the guest gets an I/O error, the
    /// default), `stop` (the VM pauses until `PATCH /vm` resumes it, and
    /// the request runs again) or `enospc` (stop on a full host
    /// filesystem, report the rest).
    #[serde(
        default,
        skip_serializing_if = "is_default",
        deserialize_with = "werror"
    )]
    pub werror: ErrorPolicy,
    /// The same for reads (QEMU's `rerror`): `report` or `stop`.
    #[serde(
        default,
        skip_serializing_if = "is_default",
        deserialize_with = "rerror"
    )]
    pub rerror: ErrorPolicy,
}

fn policy<'de, D: serde::Deserializer<'de>>(d: D, key: &str) -> Result<ErrorPolicy, D::Error> {
    let s = <String as serde::Deserialize>::deserialize(d)?;
    ErrorPolicy::parse(key, &s).map_err(serde::de::Error::custom)
}

fn werror<'de, D: serde::Deserializer<'de>>(d: D) -> Result<ErrorPolicy, D::Error> {
    policy(d, "werror")
}

fn rerror<'de, D: serde::Deserializer<'de>>(d: D) -> Result<ErrorPolicy, D::Error> {
    policy(d, "rerror")
}

fn is_default<T: Default + PartialEq>(v: &T) -> bool {
    *v == T::default()
}

fn is_raw(f: &ImageFormat) -> bool {
    *f == ImageFormat::Raw
}

/// `on`/`off` (and the usual synonyms) as a bool.
fn on_off(v: &str) -> Option<bool> {
    match v {
        "on" | "true" | "yes" | "1" => Some(true),
        "off" | "false" | "no" | "0" => Some(false),
        _ => None,
    }
}

/// Whether `s` can be a partition's unique id: a GPT GUID
/// (`8-4-4-4-12` hex digits) or an MBR disk signature and partition
/// (`0eaa91a0-01`), as the kernel's `root=PARTUUID=` takes them.
pub fn valid_partuuid(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 36
        && s.split('-').all(|p| !p.is_empty())
        && s.chars().all(|c| c.is_ascii_hexdigit() || c == '-')
}

impl DiskConfig {
    /// Parses `path=FILE[,format=raw|qcow2][,io=sync|io_uring][,cache=writeback|none][,werror=report|stop|enospc][,rerror=report|stop][,iothread=on|off][,read_only=on|off][,id=ID][,root=on|off][,partuuid=UUID][,num_queues=N][,queue_size=N][,bw=SIZE/TIME[+BURST]][,ops=SIZE/TIME[+BURST]]`
    /// (`rate_limit=bw=...;ops=...` is the same as the last two).
    pub fn parse_flag(s: &str) -> Result<Self, ConfigError> {
        let bad = |why: String| ConfigError::DiskFlag {
            flag: s.to_string(),
            why,
        };
        let mut d = DiskConfig {
            path: PathBuf::new(),
            format: ImageFormat::Raw,
            read_only: false,
            id: None,
            drive_id: None,
            root: false,
            partuuid: None,
            num_queues: None,
            queue_size: None,
            rate_limiter: None,
            io: IoEngine::Sync,
            cache: CacheMode::Writeback,
            iothread: false,
            werror: ErrorPolicy::Report,
            rerror: ErrorPolicy::Report,
        };
        let mut path = None;
        for part in s.split(',') {
            let (k, v) = part
                .split_once('=')
                .ok_or_else(|| bad(format!("`{part}` is not key=value")))?;
            let flag = |key: &str| {
                on_off(v).ok_or_else(|| bad(format!("{key} must be on or off, not `{v}`")))
            };
            match k {
                "path" | "file" => path = Some(PathBuf::from(v)),
                "io" | "aio" => d.io = v.parse().map_err(bad)?,
                "cache" => d.cache = v.parse().map_err(bad)?,
                "werror" => d.werror = ErrorPolicy::parse(k, v).map_err(bad)?,
                "rerror" => d.rerror = ErrorPolicy::parse(k, v).map_err(bad)?,
                "format" => {
                    d.format = v
                        .parse()
                        .map_err(|_| bad(format!("format must be raw or qcow2, not `{v}`")))?
                }
                "read_only" | "ro" | "readonly" => d.read_only = flag("read_only")?,
                "id" | "serial" => d.id = Some(v.to_string()),
                "drive_id" => d.drive_id = Some(v.to_string()),
                "root" => d.root = flag("root")?,
                "iothread" => d.iothread = flag("iothread")?,
                "partuuid" => d.partuuid = Some(v.to_string()),
                "num_queues" | "queues" => {
                    d.num_queues = Some(
                        v.parse()
                            .map_err(|_| bad(format!("num_queues must be a number, not `{v}`")))?,
                    )
                }
                "queue_size" => {
                    d.queue_size = Some(
                        v.parse()
                            .map_err(|_| bad(format!("queue_size must be a number, not `{v}`")))?,
                    )
                }
                "bw" | "bandwidth" | "ops" => {
                    let bucket: BucketConfig = v.parse().map_err(|e| bad(format!("{k}: {e}")))?;
                    let limiter = d.rate_limiter.get_or_insert_with(Default::default);
                    if k == "ops" {
                        limiter.ops = Some(bucket);
                    } else {
                        limiter.bandwidth = Some(bucket);
                    }
                }
                // `rate_limit=bw=10M/1s;ops=1000/1s`: the limiter's own form
                // with `;` for its commas.
                "rate_limit" => {
                    let limiter: RateLimiterConfig = v
                        .replace(';', ",")
                        .parse()
                        .map_err(|e| bad(format!("rate_limit: {e}")))?;
                    d.rate_limiter = Some(limiter);
                }
                _ => {
                    return Err(bad(format!(
                        "unknown key `{k}` (path, format, read_only, id, drive_id, root, partuuid, num_queues, queue_size, bw, ops, rate_limit, io, cache, iothread, werror, rerror)"
                    )))
                }
            }
        }
        d.path = path.ok_or_else(|| bad("path= is missing".to_string()))?;
        Ok(d)
    }

    /// The API's name for disk `index`.
    pub fn drive_id(&self, index: usize) -> String {
        self.drive_id
            .clone()
            .unwrap_or_else(|| format!("drive{index}"))
    }

    /// Makes a relative path relative to `base`.
    pub fn resolve_path(&mut self, base: &Path) {
        if self.path.is_relative() {
            self.path = base.join(&self.path);
        }
    }

    /// Checks the id, the partition id and that the image exists and is a
    /// regular file or a block device.
    pub fn validate(&self, index: usize) -> Result<(), ConfigError> {
        ember_virtio_blk::check_queues(
            self.num_queues.unwrap_or(1),
            self.queue_size
                .unwrap_or(ember_virtio_blk::request::QUEUE_SIZE),
        )
        .map_err(|why| ConfigError::DiskOption { index, why })?;
        if self.cache == CacheMode::None && self.format == ImageFormat::Qcow2 {
            return Err(ConfigError::DiskOption {
                index,
                why: "cache = none is for raw images (qcow2 metadata I/O is not block-aligned); use cache = writeback".into(),
            });
        }
        if let Some(p) = &self.partuuid {
            if !self.root {
                return Err(ConfigError::DiskPartuuid {
                    index,
                    why: "is only used with root = true".into(),
                });
            }
            if !valid_partuuid(p) {
                return Err(ConfigError::DiskPartuuid {
                    index,
                    why: format!("{p:?} is not a partition id like 0eaa91a0-01 or a GUID"),
                });
            }
        }
        if let Some(id) = &self.id {
            if id.len() > MAX_ID_LEN {
                return Err(ConfigError::DiskId {
                    index,
                    len: id.len(),
                });
            }
        }
        match std::fs::metadata(&self.path) {
            Ok(m) if m.is_file() || m.file_type().is_block_device() => Ok(()),
            Ok(_) => Err(ConfigError::NotAFile {
                key: "disk.path",
                path: self.path.clone(),
            }),
            Err(source) => Err(ConfigError::File {
                key: "disk.path",
                path: self.path.clone(),
                source,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn disk_flag_takes_format_root_partuuid_queues_and_rate_limits() {
        let d = DiskConfig::parse_flag(
            "path=/r.qcow2,format=qcow2,root=on,partuuid=0eaa91a0-01,num_queues=4,queue_size=128,bw=10M/1s+20M,ops=1000/1s",
        )
        .unwrap();
        assert_eq!(d.format, ImageFormat::Qcow2);
        assert!(d.root);
        assert_eq!(d.partuuid.as_deref(), Some("0eaa91a0-01"));
        assert_eq!((d.num_queues, d.queue_size), (Some(4), Some(128)));
        let l = d.rate_limiter.unwrap();
        let bw = l.bandwidth.unwrap();
        assert_eq!(
            (bw.size, bw.one_time_burst, bw.refill_time),
            (10 << 20, Some(20 << 20), 1000)
        );
        assert_eq!(l.ops.unwrap().size, 1000);
        let same = DiskConfig::parse_flag("path=/r,rate_limit=bw=10M/1s+20M;ops=1000/1s").unwrap();
        let e = DiskConfig::parse_flag("path=/r,io=io_uring,cache=none,iothread=on").unwrap();
        assert_eq!((e.io, e.cache), (IoEngine::IoUring, CacheMode::None));
        assert!(e.iothread);
        assert!(!d.iothread, "on the event loop unless told");
        assert_eq!(
            DiskConfig::parse_flag("path=/r").unwrap().io,
            IoEngine::Sync
        );
        assert_eq!(same.rate_limiter, Some(l));
        assert_eq!(
            DiskConfig::parse_flag("path=/r").unwrap().format,
            ImageFormat::Raw,
            "raw unless told"
        );
        for (bad, says) in [
            ("path=/r,format=vmdk", "format must be raw or qcow2"),
            (
                "path=/r,io=aio",
                "io = \"aio\": it must be sync or io_uring",
            ),
            ("path=/r,cache=directsync", "it must be writeback or none"),
            ("path=/r,root=maybe", "root must be on or off"),
            ("path=/r,iothread=2", "iothread must be on or off"),
            ("path=/r,num_queues=x", "num_queues must be a number"),
            ("path=/r,bw=10M", "bw:"),
            ("path=/r,ops=0/1s", "ops:"),
            ("path=/r,rate_limit=bw=1M/0", "rate_limit:"),
            (
                "path=/r,werror=ignore",
                "werror = \"ignore\" is not offered: the guest would be told that failed I/O succeeded",
            ),
            (
                "path=/r,werror=halt",
                "werror = \"halt\": it must be report, stop or enospc",
            ),
            (
                "path=/r,rerror=enospc",
                "rerror = \"enospc\": it must be report or stop",
            ),
        ] {
            let e = DiskConfig::parse_flag(bad).unwrap_err().to_string();
            assert!(e.contains(says), "{bad}: {e}");
        }
    }

    #[test]
    fn disk_error_policies_parse_from_flags_and_toml_and_bad_ones_are_named() {
        let d = DiskConfig::parse_flag("path=/r,werror=enospc,rerror=stop").unwrap();
        assert_eq!(
            (d.werror, d.rerror),
            (ErrorPolicy::Enospc, ErrorPolicy::Stop)
        );
        let d: DiskConfig = toml::from_str("path = \"/r\"\nwerror = \"stop\"\n").unwrap();
        assert_eq!(
            (d.werror, d.rerror),
            (ErrorPolicy::Stop, ErrorPolicy::Report)
        );
        let e = toml::from_str::<DiskConfig>("path = \"/r\"\nrerror = \"enospc\"\n")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("rerror = \"enospc\": it must be report or stop"),
            "{e}"
        );
        let e = toml::from_str::<DiskConfig>("path = \"/r\"\nwerror = \"ignore\"\n")
            .unwrap_err()
            .to_string();
        assert!(e.contains("is not offered"), "{e}");
    }

    #[test]
    fn disk_validate_checks_partuuid_and_queues() {
        let exe = std::env::current_exe().unwrap();
        let mut d = DiskConfig::parse_flag(&format!("path={}", exe.display())).unwrap();
        d.validate(0).unwrap();
        d.partuuid = Some("0eaa91a0-01".into());
        assert!(
            d.validate(0)
                .unwrap_err()
                .to_string()
                .contains("only used with root"),
            "partuuid needs root"
        );
        d.root = true;
        d.validate(0).unwrap();
        for bad in ["", "xyz", "12--34", "0eaa91a0-01; rm -rf /"] {
            d.partuuid = Some(bad.into());
            assert!(d.validate(0).is_err(), "{bad:?}");
        }
        d.partuuid = Some("6a1b8ee3-0d43-4bf0-9d48-2b3d1f6e0c11".into());
        d.validate(0).unwrap();
        d.num_queues = Some(0);
        assert!(d
            .validate(0)
            .unwrap_err()
            .to_string()
            .contains("num_queues = 0"));
        d.num_queues = Some(2);
        d.queue_size = Some(100);
        assert!(d
            .validate(0)
            .unwrap_err()
            .to_string()
            .contains("queue_size = 100"));
        d.queue_size = None;
        d.format = ImageFormat::Qcow2;
        d.cache = CacheMode::None;
        assert!(d
            .validate(0)
            .unwrap_err()
            .to_string()
            .contains("cache = none is for raw images"));
    }

    #[test]
    fn disk_toml_takes_firecracker_rate_limiter_and_format() {
        let d: DiskConfig = toml::from_str(
            "path = \"/r.qcow2\"\nformat = \"qcow2\"\n[rate_limiter]\nbandwidth = { size = 1048576, refill_time = 100 }\n",
        )
        .unwrap();
        assert_eq!(d.format, ImageFormat::Qcow2);
        assert_eq!(d.rate_limiter.unwrap().bandwidth.unwrap().refill_time, 100);
        assert!(toml::from_str::<DiskConfig>("path = \"/r\"\nformat = \"vdi\"\n").is_err());
        let d: DiskConfig =
            toml::from_str("path = \"/r\"\nio = \"io_uring\"\ncache = \"none\"\n").unwrap();
        assert_eq!((d.io, d.cache), (IoEngine::IoUring, CacheMode::None));
        assert!(toml::from_str::<DiskConfig>("path = \"/r\"\nio = \"aio\"\n").is_err());
    }
}
