//! A process jailer, after Firecracker's `jailer`, as a library: [`run`]
//! starts a program as an unprivileged user, in its own mount namespace
//! pivoted into a jail directory that holds only the files and device
//! nodes it was given, in its own cgroup, optionally in a network and a
//! new PID namespace, with every capability dropped and `no_new_privs`
//! set; waits for it; removes everything it created; and returns its exit
//! status.
//!
//! It must be called as root (it mounts, creates device nodes and cgroups,
//! and changes uid).
//!
//! ```no_run
//! use std::path::Path;
//! use ember_jail::{current_exe_files, JailSpec};
//!
//! // Run this very binary again, jailed, as `/ember --jailed`.
//! let mut spec = JailSpec::new("vm0", "/srv/jail/vm0", "/ember");
//! spec.files = current_exe_files(Path::new("/ember"))?;
//! spec.devices = vec!["/dev/kvm".into(), "/dev/net/tun".into()];
//! spec.cgroup = vec![
//!     ("cpu.max".into(), "50000 100000".into()),
//!     ("memory.max".into(), "256M".into()),
//! ];
//! spec.new_pid_ns = true;
//! spec.args = vec!["--jailed".into()];
//! let status = ember_jail::run(&spec)?;
//! println!("jailed VMM exited with {status}");
//! # Ok::<(), ember_jail::Error>(())
//! ```
//!
//! The steps, in order (see the README for what each one stops):
//!
//! 1. validate the spec against the host, creating nothing;
//! 2. create empty placeholders and device nodes in the jail directory;
//! 3. create the cgroup (v2, or v1 per controller) and write its limits;
//! 4. fork (into a new PID namespace if asked);
//! 5. parent: move the child into the cgroup, release it, wait for it
//!    (forwarding SIGINT, SIGTERM, SIGHUP), then remove the cgroup and
//!    the placeholders;
//! 6. child: new mount namespace, bind mounts, network namespace,
//!    `pivot_root`, rlimits, capabilities, uid/gid, `no_new_privs`, close
//!    inherited descriptors, `execve`.

mod cgroup;
mod child;
mod error;
mod fs;
mod libs;
mod mountinfo;
mod mounts;
mod privs;
mod process;
mod signals;
mod spec;
mod sys;
mod validate;

use std::process::ExitStatus;

pub use error::{Error, Result};
pub use libs::current_exe_files;
pub use spec::{
    CgroupVersion, JailFile, JailSpec, DEFAULT_CGROUP_PARENT, DEFAULT_MAX_OPEN_FILES, NOBODY,
};

/// Runs `spec.program` jailed as `spec` says, waits for it, cleans up, and
/// returns its exit status.
///
/// Bad input is refused before anything is created. Whatever is created
/// (placeholders, device nodes, cgroups) is removed before this returns,
/// on success and on error alike. A failure inside the child (a mount, the
/// exec) comes back as [`Error::Child`] naming the step and path.
///
/// While the child runs, SIGINT, SIGTERM and SIGHUP sent to the caller are
/// forwarded to it instead (a PID 1 in a new PID namespace ignores those it
/// has no handler for). Call it from one thread per jail; concurrent calls
/// are supported.
pub fn run(spec: &JailSpec) -> Result<ExitStatus> {
    let plan = validate::validate(spec)?;
    let child = child::ChildPlan::prepare(spec, &plan)?;
    let placeholders = fs::Placeholders::create(&plan, spec.uid, spec.gid)?;
    let cgroup = plan
        .cgroup
        .as_ref()
        .map(cgroup::Cgroup::create)
        .transpose()?;
    log::debug!("jail {}: starting {}", spec.id, spec.program.display());
    let status = process::spawn_and_wait(&child, cgroup.as_ref(), spec.new_pid_ns);
    if let Some(cgroup) = cgroup {
        cgroup.remove();
    }
    placeholders.remove();
    status
}
