//! Step 2: placeholders in the jail directory, on the host, and their
//! removal. Everything created is recorded and removed again, deepest
//! first; nothing the jail did not create is ever removed.

use std::fs::{self, OpenOptions, Permissions};
use std::io;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::sys;
use crate::validate::{check_free, EntryKind, Plan};

/// Mode of the directories made on the way to an entry: the jailed uid
/// must be able to search them.
const DIR_MODE: u32 = 0o755;

/// What was created in the jail directory, in creation order. Dropping it
/// removes everything, deepest first.
#[derive(Debug, Default)]
pub(crate) struct Placeholders {
    created: Vec<(PathBuf, bool)>,
}

impl Placeholders {
    /// Creates an empty file for each file entry and a device node (owned
    /// by `uid:gid`) for each device, with any missing parent directories.
    /// On error, what was created so far is removed.
    pub(crate) fn create(plan: &Plan, uid: u32, gid: u32) -> Result<Self> {
        let mut made = Placeholders::default();
        for entry in &plan.entries {
            // Checked in `validate`; checked again here in case the
            // directory changed since, and because parents made for an
            // earlier entry are now in place.
            check_free(&plan.dir, &entry.rel)?;
            if let Some(parent) = entry.rel.parent() {
                made.make_dirs(&plan.dir, parent)?;
            }
            let path = &entry.dest;
            let create_err = |source| Error::Create {
                path: path.clone(),
                source,
            };
            match entry.kind {
                EntryKind::File { .. } => {
                    OpenOptions::new()
                        .write(true)
                        .create_new(true)
                        .mode(0o600)
                        .custom_flags(libc::O_NOFOLLOW)
                        .open(path)
                        .map_err(|e| exists_or(path, e))?;
                    made.created.push((path.clone(), false));
                }
                EntryKind::Dir { .. } => {
                    fs::create_dir(path).map_err(|e| exists_or(path, e))?;
                    made.created.push((path.clone(), true));
                    fs::set_permissions(path, Permissions::from_mode(0o700)).map_err(create_err)?;
                    std::os::unix::fs::lchown(path, Some(uid), Some(gid)).map_err(create_err)?;
                }
                EntryKind::Device { rdev } => {
                    sys::mknod_char(path, rdev).map_err(|e| exists_or(path, e))?;
                    made.created.push((path.clone(), false));
                    // mknod's mode went through the umask.
                    fs::set_permissions(path, Permissions::from_mode(0o600)).map_err(create_err)?;
                    std::os::unix::fs::lchown(path, Some(uid), Some(gid)).map_err(create_err)?;
                }
            }
        }
        Ok(made)
    }

    /// Makes each missing directory of `rel` under `dir`, recording it.
    fn make_dirs(&mut self, dir: &Path, rel: &Path) -> Result<()> {
        let mut path = dir.to_path_buf();
        for name in rel.iter() {
            path.push(name);
            match fs::symlink_metadata(&path) {
                Ok(meta) if meta.is_dir() => continue,
                Ok(_) => return Err(Error::NotADirectory { path }),
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(source) => return Err(Error::Create { path, source }),
            }
            fs::create_dir(&path).map_err(|e| exists_or(&path, e))?;
            self.created.push((path.clone(), true));
            // create_dir's mode went through the umask.
            fs::set_permissions(&path, Permissions::from_mode(DIR_MODE)).map_err(|source| {
                Error::Create {
                    path: path.clone(),
                    source,
                }
            })?;
        }
        Ok(())
    }

    /// Removes everything created, deepest first; logs what cannot go (a
    /// directory the jailed program put files in is left, with its files).
    pub(crate) fn remove(mut self) {
        self.remove_all();
    }

    fn remove_all(&mut self) {
        while let Some((path, is_dir)) = self.created.pop() {
            let removed = if is_dir {
                fs::remove_dir(&path)
            } else {
                fs::remove_file(&path)
            };
            match removed {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => log::warn!(
                    "cannot remove {} from the jail directory: {e}",
                    path.display()
                ),
            }
        }
    }
}

impl Drop for Placeholders {
    fn drop(&mut self) {
        self.remove_all();
    }
}

/// `PathExists` for EEXIST (never overwrite), else `Create`.
fn exists_or(path: &Path, source: io::Error) -> Error {
    if source.kind() == io::ErrorKind::AlreadyExists {
        Error::PathExists {
            path: path.to_path_buf(),
        }
    } else {
        Error::Create {
            path: path.to_path_buf(),
            source,
        }
    }
}
