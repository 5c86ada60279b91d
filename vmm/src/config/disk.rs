//! `[[disk]]`: virtio-blk disks, and the `--disk` flag.

use std::path::{Path, PathBuf};

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
    /// The raw image file; its size must be a multiple of 512.
    pub path: PathBuf,
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
}

impl DiskConfig {
    /// Parses `path=FILE[,read_only=on|off][,id=ID]`.
    pub fn parse_flag(s: &str) -> Result<Self, ConfigError> {
        let bad = |why: String| ConfigError::DiskFlag {
            flag: s.to_string(),
            why,
        };
        let mut path = None;
        let mut read_only = false;
        let mut id = None;
        for part in s.split(',') {
            let (k, v) = part
                .split_once('=')
                .ok_or_else(|| bad(format!("`{part}` is not key=value")))?;
            match k {
                "path" => path = Some(PathBuf::from(v)),
                "read_only" | "ro" => {
                    read_only = match v {
                        "on" | "true" | "yes" | "1" => true,
                        "off" | "false" | "no" | "0" => false,
                        _ => return Err(bad(format!("read_only must be on or off, not `{v}`"))),
                    }
                }
                "id" => id = Some(v.to_string()),
                _ => return Err(bad(format!("unknown key `{k}` (path, read_only, id)"))),
            }
        }
        let path = path.ok_or_else(|| bad("path= is missing".to_string()))?;
        Ok(DiskConfig {
            path,
            read_only,
            id,
            drive_id: None,
            root: false,
        })
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

    /// Checks the id and that the file exists and is a regular file.
    pub fn validate(&self, index: usize) -> Result<(), ConfigError> {
        if let Some(id) = &self.id {
            if id.len() > MAX_ID_LEN {
                return Err(ConfigError::DiskId {
                    index,
                    len: id.len(),
                });
            }
        }
        match std::fs::metadata(&self.path) {
            Ok(m) if m.is_file() => Ok(()),
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
