//! Step 1: check a [`JailSpec`] against the host before anything is
//! created, and turn it into a [`Plan`] of host paths, device numbers and
//! mount flags.

use std::collections::BTreeSet;
use std::fs::File;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Component, Path, PathBuf};

use crate::cgroup::{self, CgroupPlan};
use crate::error::{Error, Result};
use crate::spec::JailSpec;
use crate::sys;

/// Longest jail id accepted.
const MAX_ID_LEN: usize = 64;

/// A validated spec: everything `run` creates, as host paths.
#[derive(Debug)]
pub(crate) struct Plan {
    /// The jail directory, canonical.
    pub dir: PathBuf,
    /// Files then devices, in the spec's order.
    pub entries: Vec<Entry>,
    /// The network namespace to join, opened (close-on-exec).
    pub netns: Option<File>,
    /// The cgroup directories to create, if any limit was asked for.
    pub cgroup: Option<CgroupPlan>,
}

/// One thing to put in the jail.
#[derive(Debug)]
pub(crate) struct Entry {
    /// Its path inside the jail, relative (`usr/lib/libc.so.6`).
    pub rel: PathBuf,
    /// Its path on the host, under the jail directory.
    pub dest: PathBuf,
    /// What it is.
    pub kind: EntryKind,
}

/// What a jail entry is.
#[derive(Debug)]
pub(crate) enum EntryKind {
    /// A host file bind-mounted onto an empty placeholder.
    File {
        /// The host file.
        host: PathBuf,
        /// The `MS_*` flags of the bind after its remount.
        remount_flags: libc::c_ulong,
    },
    /// A writable directory: made empty and owned by the jailed uid, then
    /// bind-mounted onto itself with these `MS_*` flags.
    Dir {
        /// The flags of its bind after the remount.
        remount_flags: libc::c_ulong,
    },
    /// A character-device node made with `mknod`.
    Device {
        /// The host node's device number.
        rdev: u64,
    },
}

/// Checks `spec` and resolves it against the host, creating nothing.
pub(crate) fn validate(spec: &JailSpec) -> Result<Plan> {
    let dir = jail_dir(&spec.dir)?;
    check_ids(spec)?;
    let mut entries = Vec::with_capacity(spec.files.len() + spec.devices.len());
    for file in &spec.files {
        let rel = inside_relative(&file.inside)?;
        let remount_flags = host_file_flags(&file.host, file.writable)?;
        entries.push(Entry {
            dest: dir.join(&rel),
            rel,
            kind: EntryKind::File {
                host: file.host.clone(),
                remount_flags,
            },
        });
    }
    for device in &spec.devices {
        let rel = inside_relative(device)?;
        let rdev = char_device(device)?;
        entries.push(Entry {
            dest: dir.join(&rel),
            rel,
            kind: EntryKind::Device { rdev },
        });
    }
    for d in &spec.writable_dirs {
        let rel = inside_relative(d)?;
        let flags = sys::mount_flags(&dir).map_err(|source| Error::JailDir {
            path: dir.clone(),
            source,
        })?;
        entries.push(Entry {
            dest: dir.join(&rel),
            rel,
            kind: EntryKind::Dir {
                remount_flags: (flags & !libc::MS_RDONLY)
                    | libc::MS_NOSUID
                    | libc::MS_NODEV
                    | libc::MS_NOEXEC,
            },
        });
    }
    check_clashes(&entries)?;
    check_program(spec, &entries)?;
    check_strings(spec)?;
    for entry in &entries {
        check_free(&dir, &entry.rel)?;
    }
    let netns = match &spec.netns {
        Some(path) => Some(File::open(path).map_err(|source| Error::NetNs {
            path: path.clone(),
            source,
        })?),
        None => None,
    };
    let cgroup = cgroup::plan(spec)?;
    Ok(Plan {
        dir,
        entries,
        netns,
        cgroup,
    })
}

/// The canonical jail directory, which must exist and be a directory.
fn jail_dir(dir: &Path) -> Result<PathBuf> {
    let canonical = dir.canonicalize().map_err(|source| Error::JailDir {
        path: dir.to_path_buf(),
        source,
    })?;
    if !canonical.is_dir() {
        return Err(Error::JailDirNotDir {
            path: dir.to_path_buf(),
        });
    }
    Ok(canonical)
}

/// Refuses root without `allow_root`, and ids outside `[A-Za-z0-9_-]{1,64}`.
fn check_ids(spec: &JailSpec) -> Result<()> {
    if (spec.uid == 0 || spec.gid == 0) && !spec.allow_root {
        return Err(Error::RootNotAllowed {
            uid: spec.uid,
            gid: spec.gid,
        });
    }
    let id_ok = !spec.id.is_empty()
        && spec.id.len() <= MAX_ID_LEN
        && spec
            .id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
    if !id_ok {
        return Err(Error::InvalidId {
            id: spec.id.clone(),
        });
    }
    Ok(())
}

/// `inside` as a relative path of plain names (`/usr/lib` -> `usr/lib`).
pub(crate) fn inside_relative(inside: &Path) -> Result<PathBuf> {
    let invalid = |reason| Error::InsidePath {
        path: inside.to_path_buf(),
        reason,
    };
    if inside.as_os_str().as_bytes().contains(&0) {
        return Err(invalid("it contains a NUL byte"));
    }
    let mut components = inside.components();
    if components.next() != Some(Component::RootDir) {
        return Err(invalid("it must be absolute"));
    }
    let mut rel = PathBuf::new();
    for component in components {
        match component {
            Component::Normal(name) => rel.push(name),
            Component::CurDir => {}
            Component::ParentDir => return Err(invalid("it must not contain `..`")),
            Component::RootDir | Component::Prefix(_) => {
                return Err(invalid("it is not a plain path"))
            }
        }
    }
    if rel.as_os_str().is_empty() {
        return Err(invalid("it is the jail root itself"));
    }
    Ok(rel)
}

/// Checks a host file and returns the flags its read-only or writable bind gets.
fn host_file_flags(host: &Path, writable: bool) -> Result<libc::c_ulong> {
    let host_err = |source| Error::HostFile {
        path: host.to_path_buf(),
        source,
    };
    let meta = std::fs::metadata(host).map_err(host_err)?;
    if meta.is_dir() {
        return Err(Error::HostFileIsDir {
            path: host.to_path_buf(),
        });
    }
    let is_device = meta.file_type().is_char_device() || meta.file_type().is_block_device();
    // Keep the flags of the mount the file lives on (noexec, atime, ro): a
    // bind remount replaces them all.
    let mut flags = sys::mount_flags(host).map_err(host_err)? | libc::MS_NOSUID;
    if !is_device {
        flags |= libc::MS_NODEV;
    }
    if !writable {
        flags |= libc::MS_RDONLY;
    }
    Ok(flags)
}

/// The device number of a host character device.
fn char_device(path: &Path) -> Result<u64> {
    let meta = std::fs::metadata(path).map_err(|source| Error::Device {
        path: path.to_path_buf(),
        source,
    })?;
    if !meta.file_type().is_char_device() {
        return Err(Error::NotCharDevice {
            path: path.to_path_buf(),
        });
    }
    Ok(meta.rdev())
}

/// Refuses two entries at one path, or an entry below another (a file
/// cannot hold a directory).
fn check_clashes(entries: &[Entry]) -> Result<()> {
    let mut seen = BTreeSet::new();
    for entry in entries {
        if !seen.insert(entry.rel.as_path()) {
            return Err(Error::InsidePath {
                path: Path::new("/").join(&entry.rel),
                reason: "it is listed twice",
            });
        }
    }
    for entry in entries {
        if entry.rel.ancestors().skip(1).any(|a| seen.contains(a)) {
            return Err(Error::InsidePath {
                path: Path::new("/").join(&entry.rel),
                reason: "one of its parent directories is another file of the jail",
            });
        }
    }
    Ok(())
}

/// The program must be one of the files (so it exists once the root is pivoted).
fn check_program(spec: &JailSpec, entries: &[Entry]) -> Result<()> {
    let not_in_jail = || Error::ProgramNotInJail {
        path: spec.program.clone(),
    };
    let rel = inside_relative(&spec.program).map_err(|_| not_in_jail())?;
    let found = entries
        .iter()
        .any(|e| e.rel == rel && matches!(e.kind, EntryKind::File { .. }));
    if found {
        Ok(())
    } else {
        Err(not_in_jail())
    }
}

/// Arguments and environment become C strings: no NUL bytes.
fn check_strings(spec: &JailSpec) -> Result<()> {
    let nul = |what: String| Err(Error::NulByte { what });
    if spec.dir.as_os_str().as_bytes().contains(&0) {
        return nul(format!("jail directory {}", spec.dir.display()));
    }
    for file in &spec.files {
        if file.host.as_os_str().as_bytes().contains(&0) {
            return nul(format!("host file {}", file.host.display()));
        }
    }
    for (i, arg) in spec.args.iter().enumerate() {
        if arg.as_bytes().contains(&0) {
            return nul(format!("argument {}", i + 1));
        }
    }
    for (key, value) in &spec.env {
        if key.as_bytes().contains(&0)
            || key.as_bytes().contains(&b'=')
            || value.as_bytes().contains(&0)
        {
            return nul(format!(
                "environment variable {key:?} (or it has `=` in its name)"
            ));
        }
    }
    Ok(())
}

/// `rel` must not exist under `dir`, and each existing directory on the way
/// must be a real directory, not a symbolic link (a previous jail's program
/// could have planted one to make us create files elsewhere on the host).
pub(crate) fn check_free(dir: &Path, rel: &Path) -> Result<()> {
    let mut path = dir.to_path_buf();
    let mut names = rel.iter().peekable();
    while let Some(name) = names.next() {
        path.push(name);
        let last = names.peek().is_none();
        match std::fs::symlink_metadata(&path) {
            Ok(_) if last => return Err(Error::PathExists { path }),
            Ok(meta) if meta.is_dir() => {}
            Ok(_) => return Err(Error::NotADirectory { path }),
            // Nothing there: everything below is to be created.
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(source) => return Err(Error::Create { path, source }),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::JailFile;

    fn spec_in(dir: &Path) -> JailSpec {
        let mut spec = JailSpec::new("unit", dir, "/bin/true");
        spec.files
            .push(JailFile::read_only("/proc/self/exe", "/bin/true"));
        spec
    }

    fn message(spec: &JailSpec) -> String {
        validate(spec)
            .expect_err("spec must be refused")
            .to_string()
    }

    #[test]
    fn validate_missing_dir_names_it() {
        let msg = message(&spec_in(Path::new("/nonexistent/ember-jail-dir")));
        assert_eq!(msg, "cannot use jail directory /nonexistent/ember-jail-dir");
    }

    #[test]
    fn validate_dir_that_is_a_file_is_refused() {
        let msg = message(&spec_in(Path::new("/proc/self/status")));
        assert_eq!(msg, "jail directory /proc/self/status is not a directory");
    }

    #[test]
    fn validate_uid_zero_without_allow_root_says_allow_root() {
        let mut spec = spec_in(Path::new("/"));
        spec.uid = 0;
        let msg = message(&spec);
        assert!(
            msg.contains("uid 0") && msg.contains("--allow-root"),
            "{msg}"
        );
        spec.uid = 1000;
        spec.gid = 0;
        assert!(message(&spec).contains("--allow-root"));
    }

    #[test]
    fn validate_bad_ids_are_refused() {
        for id in ["", "a/b", "..", "vm 1", &"x".repeat(65)] {
            let mut spec = spec_in(Path::new("/"));
            spec.id = id.to_string();
            assert_eq!(
                message(&spec),
                format!("jail id {id:?} is invalid: use 1 to 64 characters from [A-Za-z0-9_-]")
            );
        }
    }

    #[test]
    fn validate_relative_inside_path_is_refused() {
        let mut spec = spec_in(Path::new("/"));
        spec.files
            .push(JailFile::read_only("/proc/self/exe", "etc/passwd"));
        assert_eq!(
            message(&spec),
            "path etc/passwd inside the jail is invalid: it must be absolute"
        );
    }

    #[test]
    fn validate_dotdot_inside_path_is_refused() {
        let mut spec = spec_in(Path::new("/"));
        spec.files
            .push(JailFile::read_only("/proc/self/exe", "/lib/../../etc/x"));
        assert_eq!(
            message(&spec),
            "path /lib/../../etc/x inside the jail is invalid: it must not contain `..`"
        );
    }

    #[test]
    fn validate_missing_host_file_names_it() {
        let mut spec = spec_in(Path::new("/"));
        spec.files
            .push(JailFile::read_only("/nonexistent/lib.so", "/lib.so"));
        assert_eq!(message(&spec), "cannot use host file /nonexistent/lib.so");
    }

    #[test]
    fn validate_duplicate_and_nested_entries_are_refused() {
        let mut spec = spec_in(Path::new("/"));
        spec.files
            .push(JailFile::read_only("/proc/self/exe", "/bin/true"));
        assert!(message(&spec).contains("/bin/true inside the jail is invalid: it is listed twice"));
        let mut spec = spec_in(Path::new("/"));
        spec.files
            .push(JailFile::read_only("/proc/self/exe", "/bin/true/x"));
        assert!(message(&spec).contains("parent directories is another file"));
    }

    #[test]
    fn validate_program_outside_files_is_refused() {
        let mut spec = spec_in(Path::new("/"));
        spec.program = "/bin/false".into();
        assert_eq!(
            message(&spec),
            "program /bin/false is not among the jail's files (JailSpec::files)"
        );
    }

    #[test]
    fn validate_non_char_device_is_refused() {
        let mut spec = spec_in(Path::new("/"));
        spec.devices.push("/proc/self/status".into());
        assert_eq!(
            message(&spec),
            "/proc/self/status is not a character device"
        );
    }

    #[test]
    fn validate_existing_entry_in_jail_dir_is_refused() {
        let dir =
            std::env::temp_dir().join(format!("ember-jail-unit-exists-{}", std::process::id()));
        std::fs::create_dir_all(dir.join("bin")).unwrap();
        std::fs::write(dir.join("bin/true"), b"mine").unwrap();
        let canonical = dir.canonicalize().unwrap();
        let msg = message(&spec_in(&dir));
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(
            msg,
            format!(
                "{}/bin/true already exists in the jail directory",
                canonical.display()
            )
        );
    }

    #[test]
    fn validate_symlink_in_jail_dir_is_refused() {
        let dir =
            std::env::temp_dir().join(format!("ember-jail-unit-symlink-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::os::unix::fs::symlink("/etc", dir.join("bin")).unwrap();
        let canonical = dir.canonicalize().unwrap();
        let msg = message(&spec_in(&dir));
        std::fs::remove_dir_all(&dir).unwrap();
        assert_eq!(
            msg,
            format!(
                "{}/bin in the jail directory is not a directory (symbolic links are refused)",
                canonical.display()
            )
        );
    }

    #[test]
    fn validate_nul_in_argument_is_refused() {
        let mut spec = spec_in(&std::env::temp_dir());
        spec.args.push("a\0b".into());
        assert_eq!(message(&spec), "argument 1 contains a NUL byte");
    }

    #[test]
    fn inside_relative_strips_root_and_dots() {
        assert_eq!(
            inside_relative(Path::new("/usr/./lib/x")).unwrap(),
            Path::new("usr/lib/x")
        );
        assert!(inside_relative(Path::new("/")).is_err());
    }
}
