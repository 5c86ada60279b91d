//! Step 3: the jail's cgroup. Keys are cgroup v2 file names; each key's
//! controller is placed in the v2 hierarchy or in its own v1 hierarchy,
//! and on v1 the key is translated to the v1 files.

use std::fs::{self, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::thread;
use std::time::Duration;

use crate::error::{Error, Result};
use crate::mountinfo::{cgroup_mounts, CgroupMount};
use crate::spec::{CgroupVersion, JailSpec};

/// Where the kernel lists this process's mounts.
const MOUNTINFO: &str = "/proc/self/mountinfo";

/// How often, and how long apart, an empty cgroup's removal is retried:
/// the kernel can report a cgroup busy for a moment after its last task
/// was reaped.
const RMDIR_TRIES: u32 = 50;
const RMDIR_PAUSE: Duration = Duration::from_millis(2);

/// The cgroup hierarchies of this host.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Hierarchies {
    /// The v2 mount and the controllers its root offers (`cgroup.controllers`).
    pub v2: Option<(PathBuf, Vec<String>)>,
    /// Each v1 mount and its controllers.
    pub v1: Vec<(PathBuf, Vec<String>)>,
}

impl Hierarchies {
    /// Reads the hierarchies from `/proc/self/mountinfo`.
    pub(crate) fn read() -> Result<Self> {
        let probe_err = |path: &Path| {
            let path = path.to_path_buf();
            move |source| Error::CgroupProbe { path, source }
        };
        let text = fs::read_to_string(MOUNTINFO).map_err(probe_err(Path::new(MOUNTINFO)))?;
        let mut found = Hierarchies::default();
        for mount in cgroup_mounts(&text) {
            match mount {
                CgroupMount::V2(path) if found.v2.is_none() => {
                    let file = path.join("cgroup.controllers");
                    let list = fs::read_to_string(&file).map_err(probe_err(&file))?;
                    found.v2 = Some((path, list.split_whitespace().map(str::to_string).collect()));
                }
                CgroupMount::V2(_) => {}
                CgroupMount::V1(path, controllers) => found.v1.push((path, controllers)),
            }
        }
        Ok(found)
    }

    fn v2_root(&self, controller: &str) -> Option<&Path> {
        self.v2
            .as_ref()
            .filter(|(_, list)| list.iter().any(|c| c == controller))
            .map(|(path, _)| path.as_path())
    }

    fn v1_root(&self, controller: &str) -> Option<&Path> {
        self.v1
            .iter()
            .find(|(_, list)| list.iter().any(|c| c == controller))
            .map(|(path, _)| path.as_path())
    }
}

/// The cgroup directories a jail needs: one per hierarchy used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct CgroupPlan {
    /// The path from each hierarchy root to the jail's cgroup, without the id.
    pub parent: Vec<String>,
    /// The jail's id: the leaf directory's name.
    pub id: String,
    /// One entry per hierarchy.
    pub dirs: Vec<CgroupDir>,
}

/// The jail's cgroup in one hierarchy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct CgroupDir {
    /// Which kind of hierarchy.
    pub version: CgroupVersion,
    /// Its mount point.
    pub root: PathBuf,
    /// The controllers used in it (v2 enables them in `cgroup.subtree_control`).
    pub controllers: Vec<String>,
    /// Files to write in the jail's cgroup, in order, with their values.
    pub writes: Vec<(String, String)>,
}

impl CgroupPlan {
    /// The jail's cgroup directory in each hierarchy.
    pub(crate) fn leaves(&self) -> Vec<PathBuf> {
        self.dirs.iter().map(|d| self.leaf(&d.root)).collect()
    }

    fn leaf(&self, root: &Path) -> PathBuf {
        let mut path = root.to_path_buf();
        path.extend(&self.parent);
        path.push(&self.id);
        path
    }
}

impl JailSpec {
    /// The cgroup directories [`run`](crate::run) would create for this
    /// spec on this host (one per hierarchy used; none without limits).
    pub fn cgroup_dirs(&self) -> Result<Vec<PathBuf>> {
        Ok(plan(self)?.map(|p| p.leaves()).unwrap_or_default())
    }
}

/// Resolves the spec's limits against this host's hierarchies; `None`
/// when there are no limits.
pub(crate) fn plan(spec: &JailSpec) -> Result<Option<CgroupPlan>> {
    if spec.cgroup.is_empty() {
        return Ok(None);
    }
    plan_with(spec, &Hierarchies::read()?).map(Some)
}

/// [`plan`] against given hierarchies.
pub(crate) fn plan_with(spec: &JailSpec, hier: &Hierarchies) -> Result<CgroupPlan> {
    let mut plan = CgroupPlan {
        parent: parent_components(&spec.cgroup_parent)?,
        id: spec.id.clone(),
        dirs: Vec::new(),
    };
    for (key, value) in &spec.cgroup {
        let controller = controller_of(key)?;
        if value.trim().is_empty() || value.contains('\n') {
            return Err(Error::CgroupValue {
                key: key.clone(),
                value: value.clone(),
                reason: "it must be one non-empty line",
            });
        }
        let (version, root) = place(controller, spec.cgroup_version, hier)?;
        let writes = match version {
            CgroupVersion::V2 => vec![(key.clone(), value.clone())],
            CgroupVersion::V1 => translate_v1(key, value)?,
        };
        let index = match plan.dirs.iter().position(|d| d.root == root) {
            Some(i) => i,
            None => {
                plan.dirs.push(CgroupDir {
                    version,
                    root: root.to_path_buf(),
                    controllers: Vec::new(),
                    writes: Vec::new(),
                });
                plan.dirs.len() - 1
            }
        };
        if let Some(dir) = plan.dirs.get_mut(index) {
            if !dir.controllers.iter().any(|c| c == controller) {
                dir.controllers.push(controller.to_string());
            }
            dir.writes.extend(writes);
        }
    }
    Ok(plan)
}

/// Which hierarchy a controller goes to.
fn place<'h>(
    controller: &str,
    forced: Option<CgroupVersion>,
    hier: &'h Hierarchies,
) -> Result<(CgroupVersion, &'h Path)> {
    let unavailable = |detail| Error::CgroupControllerUnavailable {
        controller: controller.to_string(),
        detail,
    };
    let v2 = hier.v2_root(controller).map(|r| (CgroupVersion::V2, r));
    let v1 = hier.v1_root(controller).map(|r| (CgroupVersion::V1, r));
    match forced {
        Some(CgroupVersion::V2) => v2.ok_or_else(|| unavailable("it is not enabled in a cgroup v2 hierarchy")),
        Some(CgroupVersion::V1) => v1.ok_or_else(|| unavailable("no cgroup v1 hierarchy of it is mounted")),
        None => v2.or(v1).ok_or_else(|| {
            unavailable("it is neither enabled in the cgroup v2 hierarchy nor mounted as a cgroup v1 hierarchy")
        }),
    }
}

/// The parent path as plain names (`"a/b"` -> `["a", "b"]`; `""` -> `[]`).
fn parent_components(parent: &str) -> Result<Vec<String>> {
    if parent.is_empty() {
        return Ok(Vec::new());
    }
    let invalid = |reason| Error::CgroupParent {
        parent: parent.to_string(),
        reason,
    };
    parent
        .split('/')
        .map(|name| {
            if name.is_empty() || name == "." || name == ".." {
                Err(invalid(
                    "use a relative path of names, without `.`, `..` or empty parts",
                ))
            } else if !name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"_-.".contains(&b))
            {
                Err(invalid("names may only have [A-Za-z0-9_.-]"))
            } else {
                Ok(name.to_string())
            }
        })
        .collect()
}

/// The controller of a `<controller>.<file>` key.
pub(crate) fn controller_of(key: &str) -> Result<&str> {
    let invalid = |reason| Error::CgroupKey {
        key: key.to_string(),
        reason,
    };
    let (controller, file) = key
        .split_once('.')
        .ok_or_else(|| invalid("it must look like <controller>.<file>"))?;
    let controller_ok = controller
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
    // File names may have capitals (`hugetlb.2MB.max`) and more dots.
    let file_ok = file
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'.');
    if !controller_ok || !file_ok {
        return Err(invalid(
            "it may only have [a-z0-9_] then `.` then [A-Za-z0-9_.]",
        ));
    }
    if controller.is_empty()
        || file.is_empty()
        || file.starts_with('.')
        || file.ends_with('.')
        || file.contains("..")
    {
        return Err(invalid("it must look like <controller>.<file>"));
    }
    if controller == "cgroup" {
        return Err(invalid("cgroup core files are managed by the jail"));
    }
    Ok(controller)
}

/// The cgroup v1 files and values for a cgroup v2 key.
pub(crate) fn translate_v1(key: &str, value: &str) -> Result<Vec<(String, String)>> {
    let bad = |reason| Error::CgroupValue {
        key: key.to_string(),
        value: value.to_string(),
        reason,
    };
    let pair = |file: &str, v: &str| (file.to_string(), v.to_string());
    match key {
        "cpu.max" => {
            let mut words = value.split_whitespace();
            let quota = words
                .next()
                .ok_or_else(|| bad("expected \"QUOTA [PERIOD]\""))?;
            let period = words.next();
            if words.next().is_some() {
                return Err(bad("expected \"QUOTA [PERIOD]\""));
            }
            let quota = match quota {
                "max" => "-1",
                q if q.parse::<u64>().is_ok_and(|q| q > 0) => q,
                _ => {
                    return Err(bad(
                        "QUOTA must be \"max\" or a positive number of microseconds",
                    ))
                }
            };
            let mut writes = Vec::new();
            if let Some(period) = period {
                if !period.parse::<u64>().is_ok_and(|p| p > 0) {
                    return Err(bad("PERIOD must be a positive number of microseconds"));
                }
                // The period first: the quota is checked against it.
                writes.push(pair("cpu.cfs_period_us", period));
            }
            writes.push(pair("cpu.cfs_quota_us", quota));
            Ok(writes)
        }
        "memory.max" => Ok(vec![pair(
            "memory.limit_in_bytes",
            if value == "max" { "-1" } else { value },
        )]),
        "pids.max" => Ok(vec![pair("pids.max", value)]),
        _ => Err(Error::NoCgroupV1Equivalent {
            key: key.to_string(),
        }),
    }
}

/// The jail's cgroup directories as created. Dropping it removes them, and
/// any parent directory it created that is empty by then.
#[derive(Debug, Default)]
pub(crate) struct Cgroup {
    /// Each created leaf.
    leaves: Vec<PathBuf>,
    /// Each created parent, in creation order.
    parents: Vec<PathBuf>,
}

impl Cgroup {
    /// Creates the jail's cgroup in each hierarchy and writes its limits.
    pub(crate) fn create(plan: &CgroupPlan) -> Result<Self> {
        let mut made = Cgroup::default();
        for dir in &plan.dirs {
            let leaf = made.make_leaf(plan, dir)?;
            for (file, value) in &dir.writes {
                write_file(&leaf.join(file), value)?;
            }
        }
        Ok(made)
    }

    /// Makes `<root>/<parent...>/<id>`, enabling the controllers on the way
    /// for v2. Retries if a parent vanishes (another jail removed it as we
    /// went).
    fn make_leaf(&mut self, plan: &CgroupPlan, dir: &CgroupDir) -> Result<PathBuf> {
        let v2 = dir.version == CgroupVersion::V2;
        let mut attempts = 0;
        loop {
            attempts += 1;
            let mut path = dir.root.clone();
            if v2 {
                enable_controllers(&path, &dir.controllers)?;
            }
            for name in &plan.parent {
                path.push(name);
                match fs::create_dir(&path) {
                    Ok(()) => self.parents.push(path.clone()),
                    Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                    Err(source) => return Err(Error::CgroupCreate { path, source }),
                }
                if v2 {
                    enable_controllers(&path, &dir.controllers)?;
                }
            }
            path.push(&plan.id);
            match fs::create_dir(&path) {
                Ok(()) => {
                    self.leaves.push(path.clone());
                    return Ok(path);
                }
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                    return Err(Error::CgroupExists { path })
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound && attempts < 3 => continue,
                Err(source) => return Err(Error::CgroupCreate { path, source }),
            }
        }
    }

    /// Moves `pid` into the jail's cgroup in every hierarchy.
    pub(crate) fn attach(&self, pid: libc::pid_t) -> Result<()> {
        for leaf in &self.leaves {
            write_file(&leaf.join("cgroup.procs"), &pid.to_string())?;
        }
        Ok(())
    }

    /// Removes the jail's cgroups (logging what cannot go).
    pub(crate) fn remove(mut self) {
        self.remove_all();
    }

    fn remove_all(&mut self) {
        for leaf in self.leaves.drain(..).rev() {
            if let Err(e) = rmdir_retrying(&leaf) {
                log::warn!("cannot remove cgroup {}: {e}", leaf.display());
            }
        }
        let mut parents = std::mem::take(&mut self.parents);
        parents.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
        parents.dedup();
        for parent in parents {
            match fs::remove_dir(&parent) {
                Ok(()) => {}
                // Another jail is using it, or already removed it.
                Err(e)
                    if matches!(
                        e.raw_os_error(),
                        Some(libc::EBUSY | libc::ENOTEMPTY | libc::ENOENT)
                    ) => {}
                Err(e) => log::warn!("cannot remove cgroup {}: {e}", parent.display()),
            }
        }
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        self.remove_all();
    }
}

/// `rmdir`, retried while the cgroup is still busy.
fn rmdir_retrying(path: &Path) -> io::Result<()> {
    let mut tries = 0;
    loop {
        match fs::remove_dir(path) {
            Ok(()) => return Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) if e.raw_os_error() == Some(libc::EBUSY) && tries < RMDIR_TRIES => {
                tries += 1;
                thread::sleep(RMDIR_PAUSE);
            }
            Err(e) => return Err(e),
        }
    }
}

/// Enables each of `controllers` for the children of v2 cgroup `dir`,
/// unless it already is.
fn enable_controllers(dir: &Path, controllers: &[String]) -> Result<()> {
    let file = dir.join("cgroup.subtree_control");
    let enabled = fs::read_to_string(&file).map_err(|source| Error::CgroupProbe {
        path: file.clone(),
        source,
    })?;
    for controller in controllers {
        if !enabled.split_whitespace().any(|c| c == controller) {
            write_file(&file, &format!("+{controller}"))?;
        }
    }
    Ok(())
}

/// Writes `value` to an existing cgroup file, in one write.
fn write_file(path: &Path, value: &str) -> Result<()> {
    OpenOptions::new()
        .write(true)
        .open(path)
        .and_then(|mut f| f.write_all(value.as_bytes()))
        .map_err(|source| Error::CgroupWrite {
            path: path.to_path_buf(),
            value: value.to_string(),
            source,
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// This machine's layout: v2 at `/sys/fs/cgroup/unified` with only
    /// hugetlb, everything else on v1.
    fn hybrid() -> Hierarchies {
        let v1 = |name: &str, list: &[&str]| {
            (
                PathBuf::from("/sys/fs/cgroup").join(name),
                list.iter().map(|s| s.to_string()).collect(),
            )
        };
        Hierarchies {
            v2: Some(("/sys/fs/cgroup/unified".into(), vec!["hugetlb".into()])),
            v1: vec![
                v1("cpu,cpuacct", &["cpu", "cpuacct"]),
                v1("memory", &["memory"]),
                v1("pids", &["pids"]),
                v1("blkio", &["blkio"]),
            ],
        }
    }

    fn pure_v2() -> Hierarchies {
        let list = ["cpuset", "cpu", "io", "memory", "pids"];
        Hierarchies {
            v2: Some((
                "/sys/fs/cgroup".into(),
                list.iter().map(|s| s.to_string()).collect(),
            )),
            v1: Vec::new(),
        }
    }

    fn spec(limits: &[(&str, &str)]) -> JailSpec {
        let mut spec = JailSpec::new("vm0", "/", "/x");
        spec.cgroup = limits
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        spec
    }

    fn pairs(list: &[(&str, &str)]) -> Vec<(String, String)> {
        list.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn controller_of_valid_and_invalid_keys() {
        assert_eq!(controller_of("cpu.max").unwrap(), "cpu");
        assert_eq!(controller_of("memory.swap.max").unwrap(), "memory");
        assert_eq!(controller_of("hugetlb.2MB.max").unwrap(), "hugetlb");
        for key in [
            "cpu",
            ".max",
            "cpu.",
            "cpu..",
            "../cpu.max",
            "cpu/x.max",
            "CPU.max",
            "cpu.a..b",
            "cpu.m ax",
            "cgroup.procs",
            "",
        ] {
            assert!(controller_of(key).is_err(), "{key:?} must be refused");
        }
        assert_eq!(
            controller_of("cpumax").unwrap_err().to_string(),
            "cgroup key \"cpumax\" is invalid: it must look like <controller>.<file>"
        );
    }

    #[test]
    fn translate_v1_cpu_max_gives_period_then_quota() {
        assert_eq!(
            translate_v1("cpu.max", "50000 100000").unwrap(),
            pairs(&[
                ("cpu.cfs_period_us", "100000"),
                ("cpu.cfs_quota_us", "50000")
            ])
        );
        assert_eq!(
            translate_v1("cpu.max", "max 200000").unwrap(),
            pairs(&[("cpu.cfs_period_us", "200000"), ("cpu.cfs_quota_us", "-1")])
        );
        assert_eq!(
            translate_v1("cpu.max", "max").unwrap(),
            pairs(&[("cpu.cfs_quota_us", "-1")])
        );
    }

    #[test]
    fn translate_v1_bad_cpu_max_is_refused() {
        for value in ["", "-5 100000", "0", "50000 0", "50000 100000 1", "lots"] {
            assert!(
                translate_v1("cpu.max", value).is_err(),
                "{value:?} must be refused"
            );
        }
    }

    #[test]
    fn translate_v1_memory_and_pids() {
        assert_eq!(
            translate_v1("memory.max", "256M").unwrap(),
            pairs(&[("memory.limit_in_bytes", "256M")])
        );
        assert_eq!(
            translate_v1("memory.max", "max").unwrap(),
            pairs(&[("memory.limit_in_bytes", "-1")])
        );
        assert_eq!(
            translate_v1("pids.max", "64").unwrap(),
            pairs(&[("pids.max", "64")])
        );
    }

    #[test]
    fn translate_v1_other_key_has_no_equivalent() {
        assert_eq!(
            translate_v1("memory.high", "1G").unwrap_err().to_string(),
            "cgroup key memory.high has no cgroup v1 equivalent (only cpu.max, memory.max and pids.max are translated)"
        );
    }

    #[test]
    fn plan_hybrid_puts_each_controller_in_its_v1_hierarchy() {
        let plan = plan_with(
            &spec(&[("cpu.max", "50000 100000"), ("memory.max", "256M")]),
            &hybrid(),
        )
        .unwrap();
        assert_eq!(
            plan.leaves(),
            vec![
                PathBuf::from("/sys/fs/cgroup/cpu,cpuacct/ember/vm0"),
                PathBuf::from("/sys/fs/cgroup/memory/ember/vm0"),
            ]
        );
        assert!(plan.dirs.iter().all(|d| d.version == CgroupVersion::V1));
        assert_eq!(plan.dirs[0].writes.len(), 2);
    }

    #[test]
    fn plan_pure_v2_uses_one_dir_with_v2_names() {
        let mut s = spec(&[
            ("cpu.max", "50000 100000"),
            ("memory.max", "256M"),
            ("io.max", "8:0 rbps=1"),
        ]);
        s.cgroup_parent = "machine/ember".into();
        let plan = plan_with(&s, &pure_v2()).unwrap();
        assert_eq!(
            plan.leaves(),
            vec![PathBuf::from("/sys/fs/cgroup/machine/ember/vm0")]
        );
        let dir = &plan.dirs[0];
        assert_eq!(dir.version, CgroupVersion::V2);
        assert_eq!(dir.controllers, vec!["cpu", "memory", "io"]);
        assert_eq!(
            dir.writes[0],
            ("cpu.max".to_string(), "50000 100000".to_string())
        );
    }

    #[test]
    fn plan_unavailable_controller_is_named() {
        let err = plan_with(&spec(&[("io.max", "8:0 rbps=1")]), &hybrid()).unwrap_err();
        assert!(
            matches!(&err, Error::CgroupControllerUnavailable { controller, .. } if controller == "io")
        );
        let mut forced = spec(&[("cpu.max", "max")]);
        forced.cgroup_version = Some(CgroupVersion::V2);
        assert!(err
            .to_string()
            .starts_with("cgroup controller io is not available"));
        assert!(plan_with(&forced, &hybrid()).is_err());
        forced.cgroup_version = Some(CgroupVersion::V1);
        assert!(plan_with(&forced, &pure_v2()).is_err());
    }

    #[test]
    fn plan_bad_parent_is_refused() {
        for parent in ["/abs", "a/../b", "a//b", "a b"] {
            let mut s = spec(&[("pids.max", "1")]);
            s.cgroup_parent = parent.into();
            assert!(
                matches!(plan_with(&s, &pure_v2()), Err(Error::CgroupParent { .. })),
                "{parent}"
            );
        }
    }
}
