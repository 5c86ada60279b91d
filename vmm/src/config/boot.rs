//! `[boot]`: kernel, initrd, command line.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::ConfigError;

/// Command line used when none is given: serial console, reboot through the
/// i8042 (which ends ember), reboot on panic.
pub const DEFAULT_CMDLINE: &str = "console=ttyS0 reboot=k panic=1";

/// The `[boot]` table.
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct BootConfig {
    /// ELF vmlinux or bzImage, detected from the file.
    pub kernel: Option<PathBuf>,
    /// Optional initrd / initramfs.
    pub initrd: Option<PathBuf>,
    /// Kernel command line.
    pub cmdline: Option<String>,
    /// How the kernel is entered: `auto` (the default: PVH when the ELF
    /// kernel has the PVH note, as Firecracker and Cloud Hypervisor do,
    /// else the 64-bit entry), `linux64` or `pvh`.
    #[serde(default)]
    pub protocol: Option<String>,
}

impl BootConfig {
    /// Makes relative paths relative to `base` (the config file's directory).
    pub fn resolve_paths(&mut self, base: &Path) {
        for p in [&mut self.kernel, &mut self.initrd].into_iter().flatten() {
            if p.is_relative() {
                *p = base.join(&*p);
            }
        }
    }

    /// The kernel path; an error when there is none.
    pub fn kernel(&self) -> Result<&Path, ConfigError> {
        self.kernel.as_deref().ok_or(ConfigError::NoKernel)
    }

    /// The command line, or [`DEFAULT_CMDLINE`].
    pub fn cmdline(&self) -> &str {
        self.cmdline.as_deref().unwrap_or(DEFAULT_CMDLINE)
    }

    /// Checks that the files exist and are regular files, so a typo fails
    /// before anything is created.
    pub fn validate(&self) -> Result<(), ConfigError> {
        check_file("boot.kernel", self.kernel()?)?;
        if let Some(initrd) = &self.initrd {
            check_file("boot.initrd", initrd)?;
        }
        if self.cmdline().len() >= ember_memory::layout::CMDLINE_MAX_SIZE {
            return Err(ConfigError::CmdlineTooLong(self.cmdline().len()));
        }
        self.protocol()?;
        Ok(())
    }

    /// The boot protocol (`auto` when not given).
    pub fn protocol(&self) -> Result<ember_loader::BootProtocol, ConfigError> {
        self.protocol
            .as_deref()
            .map_or(Ok(ember_loader::BootProtocol::Auto), |p| {
                p.parse().map_err(ConfigError::BootProtocol)
            })
    }
}

fn check_file(key: &'static str, path: &Path) -> Result<(), ConfigError> {
    match std::fs::metadata(path) {
        Ok(m) if m.is_file() => Ok(()),
        Ok(_) => Err(ConfigError::NotAFile {
            key,
            path: path.to_owned(),
        }),
        Err(source) => Err(ConfigError::File {
            key,
            path: path.to_owned(),
            source,
        }),
    }
}
