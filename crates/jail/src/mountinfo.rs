//! Finding the cgroup hierarchies in `/proc/self/mountinfo`.

use std::ffi::OsString;
use std::os::unix::ffi::OsStringExt;
use std::path::PathBuf;

/// A mounted cgroup hierarchy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum CgroupMount {
    /// The unified (v2) hierarchy at this mount point.
    V2(PathBuf),
    /// A v1 hierarchy at this mount point, with the controllers it carries
    /// (`cpu` and `cpuacct` for a co-mounted `cpu,cpuacct`).
    V1(PathBuf, Vec<String>),
}

/// Super options of a v1 cgroup mount that are not controllers (besides
/// `name=...` and the like).
const NOT_CONTROLLERS: [&str; 7] = [
    "rw",
    "ro",
    "xattr",
    "noprefix",
    "clone_children",
    "cpuset_v2_mode",
    "favordynmods",
];

/// The cgroup mounts in a `/proc/<pid>/mountinfo` text, in order. Lines
/// that are not cgroup mounts, or are malformed, are skipped.
///
/// A line is `ID PARENT MAJ:MIN ROOT MOUNTPOINT OPTIONS [OPTIONAL...] - FSTYPE SOURCE SUPEROPTIONS`.
pub(crate) fn cgroup_mounts(text: &str) -> Vec<CgroupMount> {
    text.lines().filter_map(parse_line).collect()
}

fn parse_line(line: &str) -> Option<CgroupMount> {
    let fields: Vec<&str> = line.split(' ').collect();
    let mount_point = unescape(fields.get(4)?);
    let dash = fields.iter().skip(6).position(|f| *f == "-")? + 6;
    let fstype = *fields.get(dash + 1)?;
    let super_options = *fields.get(dash + 3)?;
    match fstype {
        "cgroup2" => Some(CgroupMount::V2(mount_point)),
        "cgroup" => {
            let controllers = super_options
                .split(',')
                .filter(|o| !NOT_CONTROLLERS.contains(o) && !o.contains('='))
                .map(str::to_string)
                .collect();
            Some(CgroupMount::V1(mount_point, controllers))
        }
        _ => None,
    }
}

/// Undoes mountinfo's octal escapes (`\040` for a space).
fn unescape(field: &str) -> PathBuf {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while let Some(&b) = bytes.get(i) {
        let octal = bytes
            .get(i + 1..i + 4)
            .filter(|d| b == b'\\' && d.iter().all(|c| (b'0'..=b'7').contains(c)))
            .map(|d| d.iter().fold(0u32, |acc, c| acc * 8 + u32::from(c - b'0')))
            .and_then(|v| u8::try_from(v).ok());
        match octal {
            Some(v) => {
                out.push(v);
                i += 4;
            }
            None => {
                out.push(b);
                i += 1;
            }
        }
    }
    PathBuf::from(OsString::from_vec(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    const HYBRID: &str = "\
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu,cpuacct rw,nosuid,nodev,noexec,relatime shared:8 - cgroup cgroup rw,cpu,cpuacct
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime shared:3 master:1 - cgroup cgroup rw,xattr,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw,nsdelegate
42 27 254:0 /run/netns /run/netns rw,relatime shared:1 - ext4 /dev/vda rw,discard";

    #[test]
    fn cgroup_mounts_hybrid_finds_v1_and_v2() {
        assert_eq!(
            cgroup_mounts(HYBRID),
            vec![
                CgroupMount::V1(
                    "/sys/fs/cgroup/cpu,cpuacct".into(),
                    vec!["cpu".into(), "cpuacct".into()]
                ),
                CgroupMount::V1("/sys/fs/cgroup/memory".into(), vec!["memory".into()]),
                CgroupMount::V1("/sys/fs/cgroup/systemd".into(), vec![]),
                CgroupMount::V2("/sys/fs/cgroup/unified".into()),
            ]
        );
    }

    #[test]
    fn cgroup_mounts_pure_v2_and_escaped_mount_point() {
        let text = "29 23 0:26 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw,nsdelegate,memory_recursiveprot\n\
                    50 29 0:40 / /mnt/my\\040cgroups rw - cgroup2 none rw";
        assert_eq!(
            cgroup_mounts(text),
            vec![
                CgroupMount::V2("/sys/fs/cgroup".into()),
                CgroupMount::V2("/mnt/my cgroups".into()),
            ]
        );
    }

    #[test]
    fn cgroup_mounts_malformed_lines_are_skipped() {
        assert!(cgroup_mounts("garbage\n1 2 3\n1 2 0:1 / /x rw - cgroup2\n\\").is_empty());
    }
}
