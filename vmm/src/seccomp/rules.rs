//! The allow-lists, one per thread kind, as data: every rule says why the
//! thread needs it. Nothing else is allowed; argument checks narrow the
//! rules where the syscall could do more than the thread needs (ioctl
//! numbers, memory protections, futex and signal targets).
//!
//! The lists were built by tracing ember (`strace -ff`, and `--seccomp=log`)
//! through every integration test: boot, console, block and net.

use std::collections::BTreeMap;

use seccompiler::{SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompRule};

use super::Error;

/// One allowed syscall: its number, when it is allowed (no conditions:
/// always; otherwise when any one of the condition sets holds), and why.
#[derive(Clone, Debug)]
pub struct Rule {
    /// The x86_64 syscall number.
    pub nr: libc::c_long,
    /// Alternative sets of argument checks; empty means unconditional.
    pub when: Vec<Vec<Check>>,
    /// Why the thread needs it.
    pub why: &'static str,
}

/// One argument check: `arg[index] & mask == value` (`mask` all ones for
/// plain equality).
#[derive(Clone, Copy, Debug)]
pub struct Check {
    /// Argument index, 0-5.
    pub index: u8,
    /// Bits compared.
    pub mask: u64,
    /// Value they must have.
    pub value: u64,
}

/// `arg[index] == value` (compared as 32 bits, which every checked argument is).
const fn eq(index: u8, value: u64) -> Check {
    Check {
        index,
        mask: 0xffff_ffff,
        value,
    }
}

/// `arg[index] & mask == 0`: none of `mask`'s bits set.
const fn none_of(index: u8, mask: u64) -> Check {
    Check {
        index,
        mask,
        value: 0,
    }
}

fn always(nr: libc::c_long, why: &'static str) -> Rule {
    Rule {
        nr,
        when: Vec::new(),
        why,
    }
}

fn only(nr: libc::c_long, when: Vec<Vec<Check>>, why: &'static str) -> Rule {
    Rule { nr, when, why }
}

/// `ioctl` with one of `requests` (the request is argument 1).
fn ioctls(requests: &[(u64, &'static str)], why: &'static str) -> Rule {
    only(
        libc::SYS_ioctl,
        requests.iter().map(|&(r, _)| vec![eq(1, r)]).collect(),
        why,
    )
}

// ioctl request numbers (`_IO`/`_IOW` of `<linux/kvm.h>`, `<linux/if_tun.h>`,
// `<asm-generic/ioctls.h>`).
const KVM_RUN: u64 = 0xae80;
/// `_IOW(KVMIO, 0x6a, struct kvm_irq_routing)`.
const KVM_SET_GSI_ROUTING: u64 = 0x4008_ae6a;
/// `_IOW('T', 208, unsigned int)`.
const TUNSETOFFLOAD: u64 = 0x4004_54d0;
/// `_IOW('T', 217, int)`: attach or detach a multi-queue tap's queue.
const TUNSETQUEUE: u64 = 0x4004_54d9;
/// `_IO(KVMIO, 0xad)`.
const KVM_KVMCLOCK_CTRL: u64 = 0xaead;
/// `_IOR(KVMIO, 0x7c, struct kvm_clock_data)` (48 bytes).
const KVM_GET_CLOCK: u64 = 0x8030_ae7c;
/// `_IOW(KVMIO, 0x7b, struct kvm_clock_data)`.
const KVM_SET_CLOCK: u64 = 0x4030_ae7b;
/// `_IOR(KVMIO, nr, size)` and `_IOWR(KVMIO, nr, size)`.
const fn kvm_ior(nr: u64, size: usize) -> u64 {
    (2 << 30) | ((size as u64) << 16) | (0xae << 8) | nr
}
const fn kvm_iowr(nr: u64, size: usize) -> u64 {
    (3 << 30) | ((size as u64) << 16) | (0xae << 8) | nr
}
use kvm_bindings as kb;
use std::mem::size_of;
/// What saving a vCPU's state reads (ember_vcpu::state::save).
const VCPU_SAVE: [(u64, &str); 10] = [
    (
        kvm_ior(0x98, size_of::<kb::kvm_mp_state>()),
        "KVM_GET_MP_STATE",
    ),
    (kvm_ior(0x81, size_of::<kb::kvm_regs>()), "KVM_GET_REGS"),
    (kvm_ior(0x83, size_of::<kb::kvm_sregs>()), "KVM_GET_SREGS"),
    (kvm_ior(0xa4, size_of::<kb::kvm_xsave>()), "KVM_GET_XSAVE"),
    (kvm_ior(0xa6, size_of::<kb::kvm_xcrs>()), "KVM_GET_XCRS"),
    (
        kvm_ior(0xa1, size_of::<kb::kvm_debugregs>()),
        "KVM_GET_DEBUGREGS",
    ),
    (
        kvm_ior(0x8e, size_of::<kb::kvm_lapic_state>()),
        "KVM_GET_LAPIC",
    ),
    (
        kvm_iowr(0x91, size_of::<kb::kvm_cpuid2>()),
        "KVM_GET_CPUID2",
    ),
    (kvm_iowr(0x88, size_of::<kb::kvm_msrs>()), "KVM_GET_MSRS"),
    (
        kvm_ior(0x9f, size_of::<kb::kvm_vcpu_events>()),
        "KVM_GET_VCPU_EVENTS",
    ),
];
/// `_IOWR(KVMIO, 0x62, struct kvm_irqchip)`.
const KVM_GET_IRQCHIP: u64 = kvm_iowr(0x62, size_of::<kb::kvm_irqchip>());
/// `_IOR(KVMIO, 0x9f, struct kvm_pit_state2)`.
const KVM_GET_PIT2: u64 = kvm_ior(0x9f, size_of::<kb::kvm_pit_state2>());
/// `_IOWR(KVMIO, 0x42, struct kvm_dirty_log)`.
const KVM_GET_DIRTY_LOG: u64 = (1 << 30) | (16 << 16) | (0xae << 8) | 0x42;
/// `_IOW(KVMIO, 0x46, struct kvm_userspace_memory_region)`.
const KVM_SET_USER_MEMORY_REGION: u64 = (1 << 30) | (32 << 16) | (0xae << 8) | 0x46;
/// `<linux/userfaultfd.h>`: `_IOWR(0xAA, 3, struct uffdio_copy)` (40 bytes).
const UFFDIO_COPY: u64 = 0xc028_aa03;
/// `_IOWR(0xAA, 4, struct uffdio_zeropage)` (32 bytes).
const UFFDIO_ZEROPAGE: u64 = 0xc020_aa04;
/// `_IOR(0xAA, 2, struct uffdio_range)` (16 bytes).
const UFFDIO_WAKE: u64 = 0x8010_aa02;
/// `_IOR(0xAA, 1, struct uffdio_range)`.
const UFFDIO_UNREGISTER: u64 = 0x8010_aa01;
const FIONBIO: u64 = 0x5421;
const TCGETS: u64 = 0x5401;
const TCSETS: u64 = 0x5402;

const PROT_EXEC: u64 = 0x4;
const FUTEX_CMD_MASK: u64 = 0x7f; // without FUTEX_PRIVATE_FLAG (128) and CLOCK_REALTIME (256)

/// What every ember thread does once running: memory for its own heap
/// (never executable), locks, signal returns, its own exit, log lines.
fn common() -> Vec<Rule> {
    vec![
        always(
            libc::SYS_write,
            "log lines on stderr, serial output on stdout, eventfd signals",
        ),
        only(
            libc::SYS_futex,
            [0, 1, 9, 10] // FUTEX_WAIT, FUTEX_WAKE, FUTEX_WAIT_BITSET, FUTEX_WAKE_BITSET
                .iter()
                .map(|&op| {
                    vec![Check {
                        index: 1,
                        mask: FUTEX_CMD_MASK,
                        value: op,
                    }]
                })
                .collect(),
            "mutexes, condvars and thread joins (wait/wake only: no requeue, no PI)",
        ),
        only(
            libc::SYS_mmap,
            vec![vec![none_of(2, PROT_EXEC)]],
            "the allocator's arenas and large blocks; never executable memory",
        ),
        only(
            libc::SYS_mprotect,
            vec![vec![none_of(2, PROT_EXEC)]],
            "the allocator growing an arena; never making memory executable",
        ),
        always(
            libc::SYS_munmap,
            "the allocator returning memory; thread stacks at exit",
        ),
        always(
            libc::SYS_mremap,
            "the allocator growing or shrinking a block of 128 KiB or more (its own mapping); keeps the mapping's protection",
        ),
        always(
            libc::SYS_madvise,
            "the allocator and thread exit releasing pages; the balloon giving guest pages back",
        ),
        always(libc::SYS_brk, "the allocator growing the main heap"),
        always(
            libc::SYS_rt_sigreturn,
            "return from a signal handler (the vCPU kick)",
        ),
        always(
            libc::SYS_rt_sigprocmask,
            "glibc masks signals around thread exit and pthread_kill",
        ),
        always(
            libc::SYS_close,
            "dropping devices, eventfds and vCPU fds at exit",
        ),
        always(
            libc::SYS_sigaltstack,
            "std removes the thread's signal stack at exit",
        ),
        always(libc::SYS_sched_yield, "spin loops in locks"),
        always(libc::SYS_exit, "the thread ends"),
        always(libc::SYS_exit_group, "the process ends"),
    ]
}

/// The event-loop (main) thread: epoll, device backends (disk files, taps),
/// console, signals, and shutting the vCPUs down.
pub fn vmm() -> Vec<Rule> {
    let mut rules = common();
    rules.extend([
        always(libc::SYS_epoll_wait, "the event loop waits"),
        always(
            libc::SYS_epoll_pwait,
            "the event loop waits (glibc may use epoll_pwait)",
        ),
        always(
            libc::SYS_epoll_ctl,
            "device backends pause and resume their fds",
        ),
        always(
            libc::SYS_read,
            "eventfds, signalfd, console input, tap frames",
        ),
        always(libc::SYS_readv, "tap frames into guest buffers"),
        always(
            libc::SYS_timerfd_settime,
            "the balloon's statistics timer (a new interval from the API)",
        ),
        always(libc::SYS_writev, "tap frames from guest buffers"),
        always(
            libc::SYS_io_uring_enter,
            "io=io_uring disks submit and wait (the ring takes only readv, writev and fsync)",
        ),
        always(libc::SYS_pread64, "disk reads"),
        always(libc::SYS_pwrite64, "disk writes"),
        always(libc::SYS_preadv, "disk reads into several guest buffers"),
        always(libc::SYS_pwritev, "disk writes from several guest buffers"),
        always(
            libc::SYS_fdatasync,
            "guest flushes reach the disk before they complete",
        ),
        always(libc::SYS_fsync, "final flush of the disks at exit"),
        only(
            libc::SYS_fallocate,
            // FALLOC_FL_KEEP_SIZE|FALLOC_FL_PUNCH_HOLE (3) and FALLOC_FL_ZERO_RANGE|KEEP_SIZE (0x11)
            vec![vec![eq(1, 0x3)], vec![eq(1, 0x11)]],
            "discard (punch a hole) and write-zeroes requests",
        ),
        ioctls(
            &[
                (TCGETS, "read terminal settings"),
                (TCSETS, "restore the terminal at exit"),
                (FIONBIO, "a console socket's client made nonblocking"),
                (
                    TUNSETOFFLOAD,
                    "apply the offloads the guest driver accepted",
                ),
                (
                    TUNSETQUEUE,
                    "the guest driver uses more or fewer of a multi-queue NIC's queue pairs",
                ),
                (KVM_GET_CLOCK, "save the guest clock when pausing"),
                (KVM_SET_CLOCK, "restore the guest clock when resuming"),
                (KVM_GET_IRQCHIP, "a snapshot saves the PIC and IOAPIC"),
                (KVM_GET_PIT2, "a snapshot saves the PIT"),
                (KVM_GET_DIRTY_LOG, "a diff snapshot reads the dirty pages"),
            ]
            .into_iter()
            .chain(ember_virtio_net::vhost::runtime_ioctls())
            .collect::<Vec<_>>(),
            "terminal restore; console clients; tap offloads; vhost-net of a restored NIC; the guest clock across a pause; snapshots",
        ),
        always(
            libc::SYS_ftruncate,
            "a snapshot sizes its sparse memory file",
        ),
        always(
            libc::SYS_rename,
            "a snapshot's files replace the old ones whole",
        ),
        always(
            libc::SYS_unlink,
            "a failed snapshot removes its temporary files",
        ),
        always(libc::SYS_fstat, "a snapshot checks its files' sizes"),
        always(
            libc::SYS_openat,
            "PATCH /drives opens the new image; SIGHUP reopens the log file (a jail limits what is visible)",
        ),
        only(
            libc::SYS_flock,
            // LOCK_SH|LOCK_NB (5), LOCK_EX|LOCK_NB (6)
            vec![vec![eq(1, 5)], vec![eq(1, 6)]],
            "lock the image PATCH /drives swaps in, without waiting",
        ),
        always(libc::SYS_lseek, "size the image PATCH /drives swaps in"),
        only(
            libc::SYS_statx,
            // AT_EMPTY_PATH (0x1000): a stat of an open descriptor, no path
            vec![vec![eq(2, 0x1000)]],
            "check the kind and identity of the image PATCH /drives opened",
        ),
        always(
            libc::SYS_shutdown,
            "a migration's cancel ends its connection (the worker's blocked I/O returns)",
        ),
        always(
            libc::SYS_accept4,
            "a client on the console socket (--serial socket=PATH) or the vsock socket",
        ),
        only(
            libc::SYS_socket,
            vec![vec![
                eq(0, libc::AF_UNIX as u64),
                Check {
                    index: 1,
                    mask: 0xf,
                    value: libc::SOCK_STREAM as u64,
                },
            ]],
            "vsock: a guest connection to a host listener (<uds_path>_<port>), a Unix stream only",
        ),
        always(
            libc::SYS_connect,
            "vsock: a guest connection to a host listener",
        ),
        only(
            libc::SYS_sendto,
            // No destination address (its low half, as every check here
            // compares 32 bits): on a connected stream only.
            vec![vec![eq(4, 0)]],
            "vsock: guest data to a host stream (send(2) with MSG_NOSIGNAL)",
        ),
        always(libc::SYS_recvfrom, "vsock: host data for the guest"),
        always(
            libc::SYS_getrandom,
            "virtio-rng fills the guest's buffers from getrandom(2)",
        ),
        only(
            libc::SYS_fcntl,
            vec![vec![eq(1, libc::F_DUPFD_CLOEXEC as u64)]],
            "a console socket's client is kept twice (output and input)",
        ),
        always(libc::SYS_getpid, "pthread_kill (kicking a vCPU thread)"),
        always(libc::SYS_gettid, "pthread_kill (kicking a vCPU thread)"),
        only(
            libc::SYS_tgkill,
            vec![vec![eq(2, sigrtmin())]],
            "kick a vCPU thread out of KVM_RUN with the kick signal only",
        ),
    ]);
    rules
}

/// A vCPU thread: `KVM_RUN`, and the device emulation its exits run
/// (port and MMIO writes to the UART and virtio devices).
pub fn vcpu() -> Vec<Rule> {
    let mut rules = common();
    rules.extend([
        always(
            libc::SYS_io_uring_enter,
            "a queue notification served here submits to an io=io_uring disk",
        ),
        ioctls(
            &[
                &[
                    (KVM_RUN, "enter the guest"),
                    (KVM_SET_GSI_ROUTING, "the guest programs an MSI-X vector"),
                    (TUNSETOFFLOAD, "the guest driver accepts tap offloads"),
                    (
                        TUNSETQUEUE,
                        "a multi-queue NIC starts on its first queue pair",
                    ),
                    (
                        KVM_KVMCLOCK_CTRL,
                        "tell the guest it was paused (no soft-lockup report)",
                    ),
                ][..],
                &VCPU_SAVE[..],
                &ember_virtio_net::vhost::runtime_ioctls()[..],
            ]
            .concat(),
            "enter the guest; MSI-X routes; tap offloads and vhost-net at driver activation; pause; a paused vCPU saves its state for a snapshot",
        ),
        always(libc::SYS_read, "eventfds"),
        always(
            libc::SYS_timerfd_settime,
            "the balloon's statistics timer, armed when the driver activates it",
        ),
    ]);
    rules
}

/// The API thread: a nonblocking HTTP server on a Unix socket that hands
/// requests to the VMM thread and waits for the answers.
pub fn api() -> Vec<Rule> {
    let mut rules = common();
    rules.extend([
        always(libc::SYS_epoll_wait, "the server waits for clients"),
        always(
            libc::SYS_epoll_pwait,
            "the server waits (glibc may use epoll_pwait)",
        ),
        always(
            libc::SYS_epoll_ctl,
            "clients come and go; output waits for room",
        ),
        always(libc::SYS_accept4, "a new client on the API socket"),
        always(libc::SYS_read, "requests; the stop eventfd"),
        always(libc::SYS_recvfrom, "requests"),
        always(libc::SYS_sendto, "responses"),
        always(libc::SYS_writev, "responses"),
        always(libc::SYS_shutdown, "closing a client"),
        always(libc::SYS_fcntl, "client sockets made nonblocking"),
        ioctls(
            &[(FIONBIO, "client sockets made nonblocking")],
            "client sockets made nonblocking",
        ),
        always(libc::SYS_unlink, "the socket file is removed at exit"),
    ]);
    rules
}

/// The live-migration worker: a stream socket to the destination (TCP or
/// Unix, made here: it is given the address, not a socket), KVM's dirty
/// log, guest memory reads, and the disks' locks at the hand-over.
pub fn migration() -> Vec<Rule> {
    let mut rules = common();
    let stream = |family: i32| {
        vec![
            eq(0, family as u64),
            Check {
                index: 1,
                mask: 0xf,
                value: libc::SOCK_STREAM as u64,
            },
        ]
    };
    rules.extend([
        only(
            libc::SYS_socket,
            vec![
                stream(libc::AF_INET),
                stream(libc::AF_INET6),
                stream(libc::AF_UNIX),
            ],
            "the connection to the destination: a TCP or Unix stream, nothing else",
        ),
        always(libc::SYS_connect, "connect to the destination"),
        always(libc::SYS_setsockopt, "TCP_NODELAY on the migration socket"),
        always(libc::SYS_sendto, "the migration stream (TCP send)"),
        always(
            libc::SYS_sendmsg,
            "a local migration hands the memfd and the taps over (SCM_RIGHTS)",
        ),
        always(libc::SYS_recvfrom, "the destination's answers (TCP)"),
        always(
            libc::SYS_recvmsg,
            "the destination's answers (Unix socket: every read may carry descriptors)",
        ),
        always(libc::SYS_shutdown, "a cancel ends the connection at once"),
        always(libc::SYS_fcntl, "std sets close-on-exec on a cloned socket"),
        always(libc::SYS_read, "post-copy: the userfaultfd's events"),
        always(
            libc::SYS_pread64,
            "the first pass reads /proc/self/pagemap (opened before the filter) to skip untouched pages",
        ),
        always(
            libc::SYS_poll,
            "post-copy: the source waits for page requests, the destination for faults",
        ),
        always(libc::SYS_ppoll, "poll, as glibc may make it"),
        ioctls(
            &[
                (
                    KVM_GET_DIRTY_LOG,
                    "the pages the guest wrote since the last round",
                ),
                (
                    KVM_SET_USER_MEMORY_REGION,
                    "turn the slots' dirty log on and off (flags only)",
                ),
                (UFFDIO_COPY, "post-copy: place a page that arrived"),
                (UFFDIO_ZEROPAGE, "post-copy: a never-sent page is zeros"),
                (UFFDIO_WAKE, "post-copy: wake a guest touch served meanwhile"),
                (
                    UFFDIO_UNREGISTER,
                    "post-copy: let go of guest memory once every page is in",
                ),
            ],
            "pre-copy rounds read and reset KVM's dirty log; post-copy serves the destination's userfaults",
        ),
        only(
            libc::SYS_flock,
            // LOCK_SH|LOCK_NB (5), LOCK_EX|LOCK_NB (6), LOCK_UN (8)
            vec![vec![eq(1, 5)], vec![eq(1, 6)], vec![eq(1, 8)]],
            "hand the disks' locks to the destination; take them back if it fails",
        ),
        always(
            libc::SYS_fdatasync,
            "flush a disk before its lock is released",
        ),
        always(libc::SYS_fsync, "flush a disk before its lock is released"),
    ]);
    rules
}

/// The kick signal's number (SIGRTMIN as glibc reports it).
fn sigrtmin() -> u64 {
    u64::try_from(libc::SIGRTMIN()).unwrap_or(34)
}

/// The rules as seccompiler wants them.
pub fn to_map(rules: &[Rule]) -> Result<BTreeMap<i64, Vec<SeccompRule>>, Error> {
    let mut map: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    for rule in rules {
        if map.contains_key(&rule.nr) {
            return Err(Error::DuplicateRule(rule.nr));
        }
        let mut compiled = Vec::with_capacity(rule.when.len());
        for set in &rule.when {
            let conds = set
                .iter()
                .map(|c| {
                    let op = if c.mask == 0xffff_ffff {
                        SeccompCmpOp::Eq
                    } else {
                        SeccompCmpOp::MaskedEq(c.mask)
                    };
                    SeccompCondition::new(c.index, SeccompCmpArgLen::Dword, op, c.value)
                })
                .collect::<Result<Vec<_>, _>>()
                .map_err(Error::Compile)?;
            compiled.push(SeccompRule::new(conds).map_err(Error::Compile)?);
        }
        map.insert(rule.nr, compiled);
    }
    Ok(map)
}

#[cfg(test)]
mod tests {
    #[test]
    fn tap_ioctl_numbers_are_the_kernels() {
        assert_eq!(super::TUNSETOFFLOAD, libc::TUNSETOFFLOAD);
        assert_eq!(super::TUNSETQUEUE, libc::TUNSETQUEUE);
    }
}
