//! Guest memory as the configuration asks for it: anonymous, in a memfd
//! (shared), or on hugetlbfs pages; transparent huge pages and KSM asked
//! for with `madvise`; each NUMA node's range bound to its host node with
//! `mbind`; and everything touched up front when prefaulted. The order
//! matters: the advice and the binding are in place before the first page
//! is faulted in.

use std::fs::File;

use ember_acpi::Window;
use ember_memory::{GuestMemoryMmap, MemoryLayout};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use crate::config::{HugePageSize, MemoryBackend, NumaNode, NumaPolicy};
use crate::Error;

fn err(what: String) -> Error {
    Error::MemoryBackend(what)
}

/// Maps guest memory for `ml` as `backend` says, binds each node of `numa`
/// that names a host node, and prefaults if asked.
pub(crate) fn create(
    ml: &MemoryLayout,
    backend: &MemoryBackend,
    numa: &[NumaNode],
) -> Result<GuestMemoryMmap, Error> {
    let mem = match backend.hugepages {
        Some(size) => hugetlb(ml, size)?,
        None => crate::create_memory(ml, backend.shared)?,
    };
    place(&mem, ml, backend, numa)?;
    Ok(mem)
}

/// Advises and binds memory already mapped (a fresh mapping, a restored
/// snapshot's memory file, a migration's): THP and KSM advice, each node's
/// binding, then the prefault. Must come before the guest touches it.
pub(crate) fn place(
    mem: &GuestMemoryMmap,
    ml: &MemoryLayout,
    backend: &MemoryBackend,
    numa: &[NumaNode],
) -> Result<(), Error> {
    if backend.thp {
        advise_all(mem, libc::MADV_HUGEPAGE, "MADV_HUGEPAGE (thp=on)")?;
    }
    if backend.mergeable {
        advise_all(mem, libc::MADV_MERGEABLE, "MADV_MERGEABLE (mergeable=on)")?;
    }
    for (i, (node, windows)) in numa.iter().zip(node_windows(ml, numa)).enumerate() {
        let Some((host, policy)) = node.host else {
            continue;
        };
        for w in windows {
            bind(mem, w, host, policy).map_err(|e| {
                err(format!(
                    "cannot bind node {i}'s memory at {:#x}+{:#x} to host node {host}: {e}",
                    w.base, w.size
                ))
            })?;
        }
        log::info!("NUMA node {i}: memory bound to host node {host} ({policy:?})");
    }
    if backend.prefault {
        let t = std::time::Instant::now();
        advise_all(
            mem,
            libc::MADV_POPULATE_WRITE,
            "MADV_POPULATE_WRITE (prefault=on)",
        )?;
        log::info!(
            "prefaulted {} MiB in {:.1} ms",
            ml.size_mib(),
            t.elapsed().as_secs_f64() * 1000.0
        );
    }
    Ok(())
}

/// Each node's guest-physical RAM: the nodes take the RAM in node order,
/// node 0 from address 0, skipping the MMIO hole (a node may span it).
pub fn node_windows(ml: &MemoryLayout, numa: &[NumaNode]) -> Vec<Vec<Window>> {
    let mut regions = ml.ram_regions().iter().copied();
    let mut current = regions.next();
    let mut out = Vec::with_capacity(numa.len());
    for node in numa {
        let mut left = node.memory_mib << 20;
        let mut windows = Vec::new();
        while left > 0 {
            let Some((start, size)) = current else {
                break;
            };
            let take = left.min(size);
            windows.push(Window {
                base: start,
                size: take,
            });
            left -= take;
            current = if take == size {
                regions.next()
            } else {
                Some((start + take, size - take))
            };
        }
        out.push(windows);
    }
    out
}

fn hugetlb(ml: &MemoryLayout, size: HugePageSize) -> Result<GuestMemoryMmap, Error> {
    let (kib, flag, name) = match size {
        HugePageSize::Size2M => (2048, libc::MFD_HUGE_2MB, "2M"),
        HugePageSize::Size1G => (1 << 20, libc::MFD_HUGE_1GB, "1G"),
    };
    let (offsets, total) = ml.packed_offsets();
    let needed = total / size.bytes();
    let dir = format!("/sys/kernel/mm/hugepages/hugepages-{kib}kB");
    let free: u64 = std::fs::read_to_string(format!("{dir}/free_hugepages"))
        .ok()
        .and_then(|s| s.trim().parse().ok())
        .ok_or_else(|| {
            err(format!(
                "hugepages=on: this host has no {name} huge pages ({dir})"
            ))
        })?;
    if free < needed {
        return Err(err(format!(
            "hugepages=on needs {needed} free {name} huge pages for {} MiB, the host has {free} (raise {dir}/nr_hugepages)",
            ml.size_mib()
        )));
    }
    let file = crate::memfd_with("ember-guest-ram-huge", libc::MFD_HUGETLB | flag)
        .map_err(|e| err(format!("memfd_create(MFD_HUGETLB, {name}): {e}")))?;
    file.set_len(total).map_err(|e| {
        err(format!(
            "cannot size the hugetlbfs memfd to {total} bytes: {e}"
        ))
    })?;
    // MAP_SHARED without MAP_NORESERVE: the kernel reserves every huge page
    // now, so a host that runs short fails here and never with a SIGBUS in
    // the guest.
    let mem = ml
        .map_shared(&file, &offsets, true)
        .map_err(|e| err(format!("cannot map {needed} {name} huge pages: {e}")))?;
    log::info!("guest memory: {needed} {name} huge pages (hugetlbfs memfd)");
    keep_open(file);
    Ok(mem)
}

/// The mapping holds its own reference to the memfd; this one can go.
fn keep_open(_file: File) {}

#[allow(unsafe_code)]
fn advise_all(mem: &GuestMemoryMmap, advice: libc::c_int, what: &str) -> Result<(), Error> {
    for region in mem.iter() {
        let len = usize::try_from(region.len()).unwrap_or(0);
        // SAFETY: the range is exactly one region's live mapping, owned by
        // `mem`; the advice changes how its pages are backed, not what the
        // mapping is, and nothing else uses it before the guest runs.
        let rc = unsafe { libc::madvise(region.as_ptr().cast(), len, advice) };
        if rc != 0 {
            return Err(err(format!(
                "{what} on {} MiB at guest {:#x}: {}",
                len >> 20,
                region.start_addr().0,
                std::io::Error::last_os_error()
            )));
        }
    }
    Ok(())
}

/// Binds the host pages behind guest range `w` to host node `node`.
#[allow(unsafe_code)]
fn bind(mem: &GuestMemoryMmap, w: Window, node: u32, policy: NumaPolicy) -> std::io::Result<()> {
    let host = mem
        .get_host_address(GuestAddress(w.base))
        .map_err(|e| std::io::Error::other(e.to_string()))?;
    let mut mask = [0u64; 16];
    let word = usize::try_from(node / 64).unwrap_or(usize::MAX);
    let slot = mask
        .get_mut(word)
        .ok_or_else(|| std::io::Error::other("host node number too large"))?;
    *slot |= 1 << (node % 64);
    let mode = match policy {
        NumaPolicy::Bind => libc::MPOL_BIND,
        NumaPolicy::Preferred => libc::MPOL_PREFERRED,
    };
    let len = usize::try_from(w.size).unwrap_or(0);
    // SAFETY: mbind(2) on a range inside one region's live mapping owned by
    // `mem` (node windows never cross a region); the node mask is a local
    // array of 1024 bits and maxnode says so (plus the kernel's off-by-one).
    let rc = unsafe {
        libc::syscall(
            libc::SYS_mbind,
            host,
            len,
            mode,
            mask.as_ptr(),
            mask.len() * 64 + 1,
            0,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Pins the calling thread to `cpus` (nothing to do when empty).
#[allow(unsafe_code)]
pub(crate) fn pin_thread(cpus: &[usize]) -> std::io::Result<()> {
    if cpus.is_empty() {
        return Ok(());
    }
    // SAFETY: cpu_set_t is plain data; all-zero is the empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    for &c in cpus {
        if c >= libc::CPU_SETSIZE as usize {
            return Err(std::io::Error::other(format!("CPU {c} is out of range")));
        }
        // SAFETY: `c` is below CPU_SETSIZE, the bits the set holds.
        unsafe { libc::CPU_SET(c, &mut set) };
    }
    // SAFETY: sched_setaffinity on the calling thread (0) with a set that
    // lives across the call and its exact size.
    let rc = unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(mib: u64) -> NumaNode {
        NumaNode {
            cpus: vec![0],
            memory_mib: mib,
            host: None,
            distances: vec![10],
        }
    }

    #[test]
    fn nodes_take_ram_in_order_across_the_hole() {
        let ml = MemoryLayout::new(4096).unwrap();
        let w = node_windows(&ml, &[node(1024), node(3072)]);
        assert_eq!(
            w[0],
            vec![Window {
                base: 0,
                size: 1 << 30
            }]
        );
        assert_eq!(
            w[1],
            vec![
                Window {
                    base: 1 << 30,
                    size: 2 << 30
                },
                Window {
                    base: 1 << 32,
                    size: 1 << 30
                },
            ]
        );
    }

    #[test]
    fn binding_and_advice_land_on_the_mapping() {
        let ml = MemoryLayout::new(64).unwrap();
        let mut nodes = vec![node(32), node(32)];
        nodes[0].host = Some((0, NumaPolicy::Bind));
        nodes[1].host = Some((0, NumaPolicy::Preferred));
        let backend = MemoryBackend {
            mergeable: true,
            thp: true,
            prefault: true,
            ..Default::default()
        };
        let mem = create(&ml, &backend, &nodes).unwrap();
        // Each half carries its policy: read back with get_mempolicy.
        for (i, want) in [(0u64, libc::MPOL_BIND), (32 << 20, libc::MPOL_PREFERRED)] {
            let addr = mem.get_host_address(GuestAddress(i)).unwrap();
            let mut mode: libc::c_int = -1;
            let mut mask = [0u64; 16];
            // SAFETY: get_mempolicy(2) with MPOL_F_ADDR on a live mapping,
            // writing into locals of the sizes given.
            #[allow(unsafe_code)]
            let rc = unsafe {
                libc::syscall(
                    libc::SYS_get_mempolicy,
                    &mut mode as *mut libc::c_int,
                    mask.as_mut_ptr(),
                    mask.len() * 64,
                    addr,
                    2, // MPOL_F_ADDR
                )
            };
            assert_eq!(rc, 0, "{}", std::io::Error::last_os_error());
            assert_eq!(mode, want, "guest {i:#x}");
            assert_eq!(mask[0] & 1, 1);
        }
        // Prefaulted: every page is resident.
        let smaps = std::fs::read_to_string("/proc/self/smaps").unwrap();
        let base = mem.get_host_address(GuestAddress(0)).unwrap() as usize;
        let block: Vec<&str> = smaps
            .split('\n')
            .skip_while(|l| !l.starts_with(&format!("{base:x}-")))
            .enumerate()
            // This mapping's fields, up to and with VmFlags (their number
            // grows with the kernel: 25 on 6.18).
            .take_while(|(i, l)| {
                *i == 0
                    || l.split_whitespace()
                        .next()
                        .is_some_and(|k| k.ends_with(':'))
            })
            .map(|(_, l)| l)
            .collect();
        let rss = block
            .iter()
            .find(|l| l.starts_with("Rss:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap();
        // mbind split the mapping at the nodes' boundary: this is node 0's
        // half, every page present, on transparent huge pages.
        assert!(rss >= 32 * 1024, "Rss {rss} kB of node 0's 32 MiB");
        let thp = block
            .iter()
            .find(|l| l.starts_with("AnonHugePages:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap();
        assert!(thp >= 16 * 1024, "AnonHugePages {thp} kB of 32 MiB");
        assert!(block
            .iter()
            .any(|l| l.starts_with("VmFlags:") && l.contains(" mg")));
        assert!(block
            .iter()
            .any(|l| l.starts_with("VmFlags:") && l.contains(" hg")));
    }

    #[test]
    fn too_few_huge_pages_is_a_clear_error() {
        // More 1 GiB pages than any test host has free.
        let ml = MemoryLayout::new(1 << 20).unwrap();
        let e = create(
            &ml,
            &MemoryBackend {
                hugepages: Some(HugePageSize::Size1G),
                ..Default::default()
            },
            &[],
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains("hugepages=on"), "{e}");
    }

    #[test]
    fn pinning_the_thread_changes_its_affinity() {
        std::thread::spawn(|| {
            pin_thread(&[0]).unwrap();
            let status = std::fs::read_to_string("/proc/thread-self/status").unwrap();
            let line = status
                .lines()
                .find(|l| l.starts_with("Cpus_allowed_list:"))
                .unwrap();
            assert_eq!(line.split_whitespace().nth(1), Some("0"));
        })
        .join()
        .unwrap();
    }
}
