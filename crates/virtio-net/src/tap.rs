//! A Linux tap interface as a [`NetBackend`]: opened by name through
//! `/dev/net/tun` with `IFF_TAP | IFF_NO_PI | IFF_VNET_HDR`, so each frame
//! read or written carries the 12-byte virtio-net header in front.
//!
//! A tap is created by the administrator (`ip tuntap add NAME mode tap`),
//! never by [`Tap::open`]: TUNSETIFF creates an interface that does not
//! exist, so the name is looked up first, and an interface that was not
//! persistent (one TUNSETIFF has just created, because the tap was deleted
//! in between) is refused too.
//!
//! This is the crate's only module with `unsafe`: the ioctls and
//! `if_nametoindex`.
#![allow(unsafe_code)]

use std::ffi::CString;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;

use ember_memory::Slice;
use libc::{
    c_char, c_int, c_short, c_ulong, ifreq, IFF_ATTACH_QUEUE, IFF_DETACH_QUEUE, IFF_MULTI_QUEUE,
    IFF_NO_PI, IFF_PERSIST, IFF_TAP, IFF_VNET_HDR, IFNAMSIZ, TUNGETIFF, TUNSETIFF, TUNSETOFFLOAD,
    TUNSETQUEUE, TUNSETVNETHDRSZ,
};
use vm_memory::bitmap::Bitmap;
use vm_memory::volatile_memory::PtrGuardMut;
use vmm_sys_util::ioctl::{ioctl_with_mut_ref, ioctl_with_ref, ioctl_with_val};

use crate::backend::NetBackend;
use crate::device::VNET_HDR_LEN;
use crate::{Error, Result};

/// The tun/tap clone device.
const TUN_DEVICE: &str = "/dev/net/tun";

/// TUNSETIFF's flags for our taps: 0x5002, which fits the `short` the
/// kernel reads.
#[allow(clippy::cast_possible_truncation)]
const TAP_FLAGS: c_short = (IFF_TAP | IFF_NO_PI | IFF_VNET_HDR) as c_short;

/// TUNSETIFF's flags for one queue of a multi-queue tap (`ip tuntap add
/// NAME mode tap multi_queue`): 0x5102.
#[allow(clippy::cast_possible_truncation)]
const TAP_MQ_FLAGS: c_short = (IFF_TAP | IFF_NO_PI | IFF_VNET_HDR | IFF_MULTI_QUEUE) as c_short;

/// The most queues Linux attaches to one tap (`MAX_TAP_QUEUES`).
pub const MAX_TAP_QUEUES: u16 = 256;

/// An open tap interface. Reads and writes never block.
#[derive(Debug)]
pub struct Tap {
    file: File,
    name: String,
}

impl Tap {
    /// Attaches to the existing tap `name` in the caller's network
    /// namespace, non-blocking and close-on-exec, with a 12-byte vnet header.
    ///
    /// Errors: [`Error::TapName`] for a name Linux would refuse (empty, more
    /// than 15 bytes, `/`, `:` or whitespace), [`Error::TapMissing`] when no
    /// such interface exists, [`Error::NotTap`] for another kind of
    /// interface, [`Error::TapBusy`] when another file is attached to it,
    /// [`Error::TapOpen`] for permission errors.
    ///
    /// A multi-queue tap (`ip tuntap add NAME mode tap multi_queue`) is
    /// used with one queue.
    pub fn open(name: &str) -> Result<Tap> {
        let mut taps = Tap::open_queues(name, 1)?;
        taps.pop().ok_or_else(|| missing(name))
    }

    /// Attaches `queues` files to the existing tap `name`, one per queue
    /// pair of a multi-queue NIC (`IFF_MULTI_QUEUE`: the kernel spreads the
    /// frames it hands the tap over the queues by flow). One queue is
    /// [`Tap::open`]; more need a tap created multi-queue.
    ///
    /// Errors as [`Tap::open`], and [`Error::NotMultiQueue`] for more than
    /// one queue on a single-queue tap, [`Error::TapQueues`] when the tap
    /// takes fewer queues than asked (Linux attaches at most
    /// [`MAX_TAP_QUEUES`] to one tap, counting other processes' queues).
    pub fn open_queues(name: &str, queues: u16) -> Result<Vec<Tap>> {
        check_name(name)?;
        match if_index(name) {
            Ok(Some(_)) => {}
            Ok(None) => return Err(missing(name)),
            Err(source) => {
                return Err(Error::TapOpen {
                    name: name.to_string(),
                    source,
                })
            }
        }
        if queues <= 1 {
            return match attach(name, TAP_FLAGS) {
                // Perhaps a multi-queue tap: one queue of it.
                Err(Error::NotTap { .. }) => attach(name, TAP_MQ_FLAGS).map(|t| vec![t]),
                other => other.map(|t| vec![t]),
            };
        }
        let mut taps = Vec::with_capacity(usize::from(queues));
        for i in 0..queues {
            match attach(name, TAP_MQ_FLAGS) {
                Ok(t) => taps.push(t),
                Err(Error::NotTap { .. }) if i == 0 => {
                    // A single-queue tap refuses IFF_MULTI_QUEUE; is it one?
                    return Err(match attach(name, TAP_FLAGS) {
                        Ok(_) | Err(Error::TapBusy { .. }) => Error::NotMultiQueue {
                            name: name.to_string(),
                            queues,
                        },
                        Err(e) => e,
                    });
                }
                Err(Error::NotTap { .. } | Error::TapOpen { .. }) if i > 0 => {
                    return Err(Error::TapQueues {
                        name: name.to_string(),
                        queues,
                        attached: i,
                    });
                }
                Err(e) => return Err(e),
            }
        }
        Ok(taps)
    }

    /// Attaches this queue to its multi-queue tap again or detaches it
    /// (TUNSETQUEUE): the kernel steers no frames to a detached queue.
    /// `EINVAL` when the queue already is so, or the tap is not
    /// multi-queue.
    pub fn set_queue_enabled(&self, on: bool) -> io::Result<()> {
        let flags = if on {
            IFF_ATTACH_QUEUE
        } else {
            IFF_DETACH_QUEUE
        };
        let mut ifr = ifreq_for("", c_short::try_from(flags).unwrap_or(0));
        // SAFETY: TUNSETQUEUE reads one `struct ifreq`; `ifr` is one and
        // outlives the call. The fd is our open tap.
        let ret = unsafe { ioctl_with_mut_ref(&self.file, TUNSETQUEUE, &mut ifr) };
        check(ret)
    }

    /// A tap from a file already attached to it, as a live migration's
    /// source hands it over (`SCM_RIGHTS`): checked to be attached to the
    /// tap `name` with ember's flags (no packet information, a vnet
    /// header); its settings (header size, offloads) are the file's. A
    /// queue of a multi-queue tap that its device had detached is attached
    /// again (its device detaches what it does not use).
    pub fn from_file(file: File, name: &str) -> Result<Tap> {
        let (attached, flags) = iff(&file).map_err(|source| Error::TapSetup {
            name: name.to_string(),
            what: "TUNGETIFF",
            source,
        })?;
        if attached != name
            || c_int::from(flags) & (IFF_TAP | IFF_NO_PI | IFF_VNET_HDR)
                != (IFF_TAP | IFF_NO_PI | IFF_VNET_HDR)
        {
            return Err(Error::NotTap {
                name: format!("{name} (the descriptor handed over is attached to {attached:?}, flags {flags:#x})"),
            });
        }
        let tap = Tap {
            file,
            name: name.to_string(),
        };
        if c_int::from(flags) & IFF_MULTI_QUEUE != 0 {
            // EINVAL: attached already.
            match tap.set_queue_enabled(true) {
                Err(e) if e.raw_os_error() != Some(libc::EINVAL) => {
                    return Err(Error::TapSetup {
                        name: name.to_string(),
                        what: "TUNSETQUEUE",
                        source: e,
                    })
                }
                _ => {}
            }
        }
        Ok(tap)
    }

    /// The interface's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Sets the offloads the reader accepts (TUNSETOFFLOAD): a mask of
    /// `TUN_F_CSUM`, `TUN_F_TSO4`, `TUN_F_TSO6`, `TUN_F_TSO_ECN`,
    /// `TUN_F_UFO`. The kernel refuses TSO without `TUN_F_CSUM` and flags it
    /// does not know.
    pub fn set_offload(&self, flags: u32) -> io::Result<()> {
        // SAFETY: TUNSETOFFLOAD takes its argument by value and touches no
        // memory of ours; the fd is our open tap.
        let ret = unsafe { ioctl_with_val(&self.file, TUNSETOFFLOAD, c_ulong::from(flags)) };
        check(ret)
    }

    /// Reads one frame (vnet header first); `WouldBlock` when none waits.
    pub fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        (&self.file).read(buf)
    }

    /// Writes one frame (vnet header first).
    pub fn write(&self, buf: &[u8]) -> io::Result<usize> {
        (&self.file).write(buf)
    }

    /// Reads one frame (vnet header first) into guest buffers, one after the
    /// other, with one `readv`: the kernel copies it into guest memory
    /// itself. At most `UIO_MAXIOV` (1024) buffers; `WouldBlock` when no
    /// frame waits.
    pub fn read_vectored(&self, bufs: &[Slice<'_>]) -> io::Result<usize> {
        if bufs.len() > 1024 {
            return Err(io::ErrorKind::InvalidInput.into());
        }
        if let [one] = bufs {
            let guard = one.ptr_guard_mut();
            // SAFETY: the buffer is a VolatileSlice of guest memory, mapped
            // while `one` and `guard` borrow it; read writes at most its
            // length. Guest memory is only accessed volatilely or by the
            // kernel. The fd is our open tap.
            let ret =
                unsafe { libc::read(self.file.as_raw_fd(), guard.as_ptr().cast(), guard.len()) };
            let n = usize::try_from(ret).map_err(|_| io::Error::last_os_error())?;
            one.bitmap().mark_dirty(0, n);
            return Ok(n);
        }
        let ret = with_iovecs(bufs, |iov| {
            let count = libc::c_int::try_from(iov.len()).unwrap_or(libc::c_int::MAX);
            // SAFETY: every iovec describes a VolatileSlice of guest memory that
            // stays mapped while `bufs` and the guards `with_iovecs` holds borrow
            // it; readv writes at most `iov_len` bytes to each. Guest memory is
            // only ever accessed volatilely or by the kernel, so no Rust
            // reference to it is invalidated. There are at most 1024 iovecs
            // (checked above). The fd is our open tap.
            unsafe { libc::readv(self.file.as_raw_fd(), iov.as_ptr(), count) }
        });
        let n = usize::try_from(ret).map_err(|_| io::Error::last_os_error())?;
        let mut left = n;
        for s in bufs {
            let k = left.min(s.len());
            s.bitmap().mark_dirty(0, k);
            left -= k;
        }
        Ok(n)
    }

    /// Writes one frame (vnet header first) given as guest buffers, one
    /// after the other, with one `writev`: the kernel copies them from guest
    /// memory itself. At most `UIO_MAXIOV` (1024) buffers.
    pub fn write_vectored(&self, bufs: &[Slice<'_>]) -> io::Result<usize> {
        if bufs.len() > 1024 {
            return Err(io::ErrorKind::InvalidInput.into());
        }
        if let [one] = bufs {
            let guard = one.ptr_guard();
            // SAFETY: the buffer is a VolatileSlice of guest memory, mapped
            // while `one` and `guard` borrow it; write only reads it. The fd
            // is our open tap.
            let ret =
                unsafe { libc::write(self.file.as_raw_fd(), guard.as_ptr().cast(), guard.len()) };
            return usize::try_from(ret).map_err(|_| io::Error::last_os_error());
        }
        let ret = with_iovecs(bufs, |iov| {
            let count = libc::c_int::try_from(iov.len()).unwrap_or(libc::c_int::MAX);
            // SAFETY: every iovec describes a VolatileSlice of guest memory that
            // stays mapped while `bufs` and the guards `with_iovecs` holds borrow
            // it; writev only reads from them. There are at most 1024 iovecs
            // (checked above). The fd is our open tap.
            unsafe { libc::writev(self.file.as_raw_fd(), iov.as_ptr(), count) }
        });
        usize::try_from(ret).map_err(|_| io::Error::last_os_error())
    }
}

/// How many iovecs [`with_iovecs`] builds on the stack (a frame in the
/// guest's buffers needs a few: they are merged where adjacent).
const FEW_IOVECS: usize = 8;

/// Calls `f` with the iovecs of `bufs`, in order, while their pointer
/// guards are held: on the stack for up to [`FEW_IOVECS`], in a `Vec`
/// beyond (a system call per frame should not also cost an allocation).
fn with_iovecs<R>(bufs: &[Slice<'_>], f: impl FnOnce(&[libc::iovec]) -> R) -> R {
    fn iovec(g: &PtrGuardMut) -> libc::iovec {
        libc::iovec {
            iov_base: g.as_ptr().cast(),
            iov_len: g.len(),
        }
    }
    if bufs.len() <= FEW_IOVECS {
        let guards: [Option<PtrGuardMut>; FEW_IOVECS] =
            std::array::from_fn(|i| bufs.get(i).map(|s| s.ptr_guard_mut()));
        let mut iov = [libc::iovec {
            iov_base: std::ptr::null_mut(),
            iov_len: 0,
        }; FEW_IOVECS];
        for (slot, g) in iov.iter_mut().zip(guards.iter().flatten()) {
            *slot = iovec(g);
        }
        f(iov.get(..bufs.len()).unwrap_or_default())
    } else {
        let guards: Vec<PtrGuardMut> = bufs.iter().map(|s| s.ptr_guard_mut()).collect();
        let iov: Vec<libc::iovec> = guards.iter().map(iovec).collect();
        f(&iov)
    }
}

impl AsRawFd for Tap {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

impl AsFd for Tap {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }
}

impl NetBackend for Tap {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        Tap::read(self, buf)
    }

    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        Tap::write(self, buf)
    }

    fn write_vectored(&mut self, bufs: &[Slice<'_>]) -> io::Result<usize> {
        Tap::write_vectored(self, bufs)
    }

    fn read_vectored(&mut self, bufs: &[Slice<'_>]) -> io::Result<usize> {
        Tap::read_vectored(self, bufs)
    }

    fn set_offload(&mut self, flags: u32) -> io::Result<()> {
        Tap::set_offload(self, flags)
    }

    fn raw_fd(&self) -> Option<RawFd> {
        Some(self.as_raw_fd())
    }

    fn set_queue_enabled(&mut self, on: bool) -> io::Result<()> {
        Tap::set_queue_enabled(self, on)
    }

    fn tap_file(&self) -> Option<io::Result<File>> {
        Some(self.file.try_clone())
    }
}

fn missing(name: &str) -> Error {
    Error::TapMissing {
        name: name.to_string(),
    }
}

/// Refuses what the kernel's `dev_valid_name` refuses, before the name is
/// used anywhere.
fn check_name(name: &str) -> Result<()> {
    let reason = if name.is_empty() {
        "it is empty"
    } else if name.len() >= IFNAMSIZ {
        "it is longer than 15 bytes"
    } else if name == "." || name == ".." {
        "it is reserved"
    } else if name
        .bytes()
        .any(|b| b == b'/' || b == b':' || b == 0 || b.is_ascii_whitespace())
    {
        "it contains '/', ':', whitespace or NUL"
    } else {
        return Ok(());
    };
    Err(Error::TapName {
        name: name.to_string(),
        reason,
    })
}

/// The index of interface `name` in the calling thread's network namespace,
/// `None` when there is none. (Not `/sys/class/net`: sysfs shows the
/// namespace it was mounted in, which need not be ours.)
fn if_index(name: &str) -> io::Result<Option<u32>> {
    let c_name = CString::new(name).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: `c_name` is a NUL-terminated string that outlives the call;
    // if_nametoindex only reads it.
    let index = unsafe { libc::if_nametoindex(c_name.as_ptr()) };
    if index != 0 {
        return Ok(Some(index));
    }
    let err = io::Error::last_os_error();
    match err.raw_os_error() {
        Some(libc::ENODEV) | Some(0) | None => Ok(None),
        _ => Err(err),
    }
}

/// Opens the clone device, non-blocking (std adds close-on-exec).
fn open_tun() -> io::Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(TUN_DEVICE)
}

/// Attaches a new `/dev/net/tun` file to the tap `name` (which
/// [`check_name`] accepted) with TUNSETIFF's `flags` and configures it.
fn attach(name: &str, flags: c_short) -> Result<Tap> {
    let open_err = |source| Error::TapOpen {
        name: name.to_string(),
        source,
    };
    let file = open_tun().map_err(open_err)?;
    if let Err(e) = set_iff(&file, name, flags) {
        return Err(match e.raw_os_error() {
            Some(libc::EINVAL) => Error::NotTap {
                name: name.to_string(),
            },
            Some(libc::EBUSY) => Error::TapBusy {
                name: name.to_string(),
            },
            _ => open_err(e),
        });
    }
    let setup_err = |what, source| Error::TapSetup {
        name: name.to_string(),
        what,
        source,
    };
    let flags = iff_flags(&file).map_err(|e| setup_err("TUNGETIFF", e))?;
    if c_int::from(flags) & IFF_PERSIST == 0 {
        // The tap vanished after the lookup and TUNSETIFF created a
        // transient one, which closing `file` deletes.
        return Err(missing(name));
    }
    let hdr_len = c_int::try_from(VNET_HDR_LEN).unwrap_or(c_int::MAX);
    // SAFETY: TUNSETVNETHDRSZ reads one `int` through the pointer; `hdr_len`
    // is one and outlives the call.
    let ret = unsafe { ioctl_with_ref(&file, TUNSETVNETHDRSZ, &hdr_len) };
    check(ret).map_err(|e| setup_err("TUNSETVNETHDRSZ", e))?;
    Ok(Tap {
        file,
        name: name.to_string(),
    })
}

/// A `struct ifreq` holding `name` (at most 15 bytes) and `flags`.
fn ifreq_for(name: &str, flags: c_short) -> ifreq {
    // SAFETY: `ifreq` is plain data (byte arrays, integers and a union of
    // them with a raw pointer); all zeroes is a valid value of it.
    let mut ifr: ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in ifr.ifr_name.iter_mut().take(IFNAMSIZ - 1).zip(name.bytes()) {
        *dst = c_char::from_ne_bytes([src]);
    }
    ifr.ifr_ifru.ifru_flags = flags;
    ifr
}

/// TUNSETIFF: attaches `file` to the tun/tap `name` (creating it if it
/// does not exist).
fn set_iff(file: &File, name: &str, flags: c_short) -> io::Result<()> {
    let mut ifr = ifreq_for(name, flags);
    // SAFETY: TUNSETIFF reads and writes back one `struct ifreq`; `ifr` is
    // one and outlives the call.
    let ret = unsafe { ioctl_with_mut_ref(file, TUNSETIFF, &mut ifr) };
    check(ret)
}

/// TUNGETIFF: the flags of the tun/tap `file` is attached to.
fn iff_flags(file: &File) -> io::Result<c_short> {
    iff(file).map(|(_, flags)| flags)
}

/// TUNGETIFF: the name and flags of the tun/tap `file` is attached to.
fn iff(file: &File) -> io::Result<(String, c_short)> {
    let mut ifr = ifreq_for("", 0);
    // SAFETY: TUNGETIFF writes one `struct ifreq`; `ifr` is one and
    // outlives the call.
    let ret = unsafe { ioctl_with_mut_ref(file, TUNGETIFF, &mut ifr) };
    check(ret)?;
    let name: Vec<u8> = ifr
        .ifr_name
        .iter()
        .take_while(|&&c| c != 0)
        .map(|&c| c.to_ne_bytes()[0])
        .collect();
    // SAFETY: TUNGETIFF filled in `ifr_flags`; any bits are a valid `short`.
    let flags = unsafe { ifr.ifr_ifru.ifru_flags };
    Ok((String::from_utf8_lossy(&name).into_owned(), flags))
}

/// An ioctl's return value as a result.
fn check(ret: c_int) -> io::Result<()> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ember_memory::GuestMemoryMmap;
    use libc::{
        IFF_TUN, TUNGETVNETHDRSZ, TUNSETPERSIST, TUN_F_CSUM, TUN_F_TSO4, TUN_F_TSO6, TUN_F_TSO_ECN,
    };
    use std::os::fd::{FromRawFd, OwnedFd};
    use std::path::Path;
    use std::time::{Duration, Instant};
    use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

    #[test]
    fn tap_open_name_too_long_is_rejected() {
        let err = Tap::open("ember-tap-name-16").unwrap_err();
        assert!(matches!(err, Error::TapName { .. }), "{err}");
        assert!(err.to_string().contains("15 bytes"), "{err}");
        // 15 bytes is a valid name (that does not exist here).
        assert!(check_name("ember-tap-name1").is_ok());
    }

    #[test]
    fn tap_open_bad_characters_are_rejected() {
        for name in [
            "",
            ".",
            "..",
            "../../etc",
            "tap 0",
            "tap:0",
            "tap\n",
            "a\0b",
        ] {
            let err = Tap::open(name).unwrap_err();
            assert!(matches!(err, Error::TapName { .. }), "{name:?}: {err}");
        }
    }

    #[test]
    fn tap_missing_error_names_the_tap_and_the_fix() {
        let msg = missing("tap7").to_string();
        assert_eq!(
            msg,
            "tap tap7 does not exist: create it with `ip tuntap add tap7 mode tap`"
        );
    }

    /// Makes (or removes) a persistent tun/tap `name` in the current
    /// network namespace, as `ip tuntap add/del` would.
    fn set_persistent(name: &str, flags: c_int, persist: bool) {
        let file = open_tun().unwrap();
        set_iff(&file, name, c_short::try_from(flags).unwrap()).unwrap();
        // SAFETY: TUNSETPERSIST takes its argument by value.
        let ret = unsafe { ioctl_with_val(&file, TUNSETPERSIST, c_ulong::from(persist)) };
        check(ret).unwrap();
    }

    /// A socket of `family` in the current network namespace.
    fn socket(family: c_int, kind: c_int, protocol: c_int) -> OwnedFd {
        // SAFETY: socket takes no pointers.
        let fd = unsafe { libc::socket(family, kind | libc::SOCK_CLOEXEC, protocol) };
        assert!(fd >= 0, "socket: {}", io::Error::last_os_error());
        // SAFETY: `fd` was just opened and nothing else owns it.
        unsafe { OwnedFd::from_raw_fd(fd) }
    }

    /// Sets IFF_UP on `name` (SIOCSIFFLAGS).
    fn link_up(name: &str) {
        let sock = socket(libc::AF_INET, libc::SOCK_DGRAM, 0);
        let mut ifr = ifreq_for(name, 0);
        // SAFETY: SIOCGIFFLAGS writes one `struct ifreq`; `ifr` is one.
        check(unsafe { ioctl_with_mut_ref(&sock, libc::SIOCGIFFLAGS, &mut ifr) }).unwrap();
        // SAFETY: SIOCGIFFLAGS filled in `ifr_flags`; any bits are valid.
        let flags = unsafe { ifr.ifr_ifru.ifru_flags };
        ifr.ifr_ifru.ifru_flags = flags | c_short::try_from(libc::IFF_UP).unwrap();
        // SAFETY: SIOCSIFFLAGS reads one `struct ifreq`; `ifr` is one.
        check(unsafe { ioctl_with_ref(&sock, libc::SIOCSIFFLAGS, &ifr) }).unwrap();
    }

    /// Sends `frame` out of interface `ifindex` through a packet socket,
    /// so that the tap's reader receives it.
    fn send_out_of(ifindex: u32, frame: &[u8]) {
        let sock = socket(libc::AF_PACKET, libc::SOCK_RAW, 0);
        // SAFETY: `sockaddr_ll` is plain data; all zeroes is a valid value.
        let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        addr.sll_family = u16::try_from(libc::AF_PACKET).unwrap();
        addr.sll_protocol = u16::from_be_bytes([frame[12], frame[13]]).to_be();
        addr.sll_ifindex = c_int::try_from(ifindex).unwrap();
        addr.sll_halen = 6;
        addr.sll_addr[..6].copy_from_slice(&frame[..6]);
        let addr_len = libc::socklen_t::try_from(std::mem::size_of_val(&addr)).unwrap();
        // SAFETY: `frame` and `addr` are valid for the lengths given and
        // outlive the call, which only reads them.
        let sent = unsafe {
            libc::sendto(
                sock.as_raw_fd(),
                frame.as_ptr().cast(),
                frame.len(),
                0,
                std::ptr::from_ref(&addr).cast(),
                addr_len,
            )
        };
        assert_eq!(
            usize::try_from(sent).ok(),
            Some(frame.len()),
            "sendto: {}",
            io::Error::last_os_error()
        );
    }

    /// The packets `name` has received, from this thread's namespace's
    /// /proc/net/dev.
    fn rx_packets(name: &str) -> u64 {
        let dev = std::fs::read_to_string("/proc/thread-self/net/dev").unwrap();
        let line = dev
            .lines()
            .find_map(|l| l.trim_start().strip_prefix(&format!("{name}:")))
            .unwrap();
        line.split_whitespace().nth(1).unwrap().parse().unwrap()
    }

    /// A broadcast frame of a local experimental EtherType, 60 bytes.
    fn test_frame(tag: u8) -> Vec<u8> {
        let mut f = vec![0xff; 6];
        f.extend([0x02, 0, 0, 0, 0, 0x01, 0x88, 0xb5]);
        f.extend((0..46).map(|i| tag ^ i));
        f
    }

    /// Frames move through the tap with the 12-byte vnet header in front.
    fn traffic_checks(tap: &Tap) {
        link_up(tap.name());
        let index = if_index(tap.name()).unwrap().unwrap();

        // Guest to host: the kernel takes the frame behind the header.
        let before = rx_packets(tap.name());
        let out = [vec![0; VNET_HDR_LEN], test_frame(1)].concat();
        assert_eq!(tap.write(&out).unwrap(), out.len());
        assert_eq!(rx_packets(tap.name()), before + 1);

        // The same from guest memory, the header and frame split over three
        // buffers out of address order: one writev, one whole frame.
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x1_0000)]).unwrap();
        let out = [vec![0; VNET_HDR_LEN], test_frame(3)].concat();
        let parts = [(0x8000, 0..5), (0x1000, 5..40), (0x4000, 40..out.len())];
        for (addr, range) in &parts {
            mem.write_slice(&out[range.clone()], GuestAddress(*addr))
                .unwrap();
        }
        let bufs: Vec<_> = parts
            .iter()
            .map(|(addr, r)| mem.get_slice(GuestAddress(*addr), r.len()).unwrap())
            .collect();
        assert_eq!(tap.write_vectored(&bufs).unwrap(), out.len());
        assert_eq!(rx_packets(tap.name()), before + 2);

        // Host to guest: the frame arrives behind a header with no offloads.
        let sent = test_frame(2);
        send_out_of(index, &sent);
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut buf = vec![0xaa; 2048];
        loop {
            match tap.read(&mut buf) {
                // The kernel may send its own frames (IPv6) too: skip them.
                Ok(n) if buf[VNET_HDR_LEN..n] == sent[..] => {
                    assert_eq!(buf[..10], [0; 10]);
                    break;
                }
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    assert!(Instant::now() < deadline, "the frame never came");
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(e) => panic!("tap read: {e}"),
            }
        }

        // The same into guest memory, split over three buffers: one readv.
        let sent = test_frame(4);
        send_out_of(index, &sent);
        let deadline = Instant::now() + Duration::from_secs(5);
        let parts = [(0x9000, 7), (0x2000, 20), (0x5000, 4096)];
        let bufs: Vec<_> = parts
            .iter()
            .map(|(addr, len)| mem.get_slice(GuestAddress(*addr), *len).unwrap())
            .collect();
        loop {
            match tap.read_vectored(&bufs) {
                Ok(n) => {
                    let mut got = Vec::new();
                    for (addr, len) in parts {
                        let mut b = vec![0u8; len];
                        mem.read_slice(&mut b, GuestAddress(addr)).unwrap();
                        got.extend(b);
                    }
                    if got[VNET_HDR_LEN..n] == sent[..] {
                        assert_eq!(n, VNET_HDR_LEN + sent.len());
                        break;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    assert!(Instant::now() < deadline, "the frame never came");
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(e) => panic!("tap readv: {e}"),
            }
        }
    }

    fn vnet_hdr_size(tap: &Tap) -> c_int {
        let mut size: c_int = 0;
        // SAFETY: TUNGETVNETHDRSZ writes one `int`; `size` is one.
        let ret = unsafe { ioctl_with_mut_ref(&tap.file, TUNGETVNETHDRSZ, &mut size) };
        check(ret).unwrap();
        size
    }

    /// Runs in a network namespace of its own (the calling thread's only),
    /// so no interface of the host is touched and no frame leaves it.
    fn namespace_checks() {
        // Nothing by that name: refused, and not created either.
        let err = Tap::open("nosuchtap0").unwrap_err();
        assert!(matches!(err, Error::TapMissing { .. }), "{err}");
        assert!(
            err.to_string().contains("ip tuntap add nosuchtap0"),
            "{err}"
        );
        assert_eq!(if_index("nosuchtap0").unwrap(), None);

        // Not a tap.
        let err = Tap::open("lo").unwrap_err();
        assert!(matches!(err, Error::NotTap { .. }), "{err}");
        set_persistent("embertun0", IFF_TUN | IFF_NO_PI, true);
        let err = Tap::open("embertun0").unwrap_err();
        assert!(matches!(err, Error::NotTap { .. }), "{err}");
        set_persistent("embertun0", IFF_TUN | IFF_NO_PI, false);

        // An existing tap opens, with a 12-byte vnet header.
        set_persistent("embertest0", IFF_TAP | IFF_NO_PI, true);
        let mut tap = Tap::open("embertest0").unwrap();
        assert_eq!(tap.name(), "embertest0");
        assert_eq!(NetBackend::raw_fd(&tap), Some(tap.as_raw_fd()));
        assert_eq!(vnet_hdr_size(&tap), 12);
        let flags = c_int::from(iff_flags(&tap.file).unwrap());
        assert_ne!(flags & IFF_VNET_HDR, 0);
        assert_ne!(flags & IFF_TAP, 0);
        // The interface is down: nothing to read, and reading does not block.
        let mut buf = [0u8; 128];
        let err = NetBackend::read(&mut tap, &mut buf).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::WouldBlock);
        NetBackend::set_offload(
            &mut tap,
            TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6 | TUN_F_TSO_ECN,
        )
        .unwrap();
        NetBackend::set_offload(&mut tap, 0).unwrap();
        assert!(tap.set_offload(0x8000_0000).is_err());
        traffic_checks(&tap);
        // A second opener is refused while the first holds it.
        let err = Tap::open("embertest0").unwrap_err();
        assert!(matches!(err, Error::TapBusy { .. }), "{err}");
        drop(tap);

        // Deleted: refused again, and not brought back.
        set_persistent("embertest0", IFF_TAP | IFF_NO_PI, false);
        assert_eq!(if_index("embertest0").unwrap(), None);
        let err = Tap::open("embertest0").unwrap_err();
        assert!(matches!(err, Error::TapMissing { .. }), "{err}");
        assert_eq!(if_index("embertest0").unwrap(), None);

        // Deleted between the lookup and TUNSETIFF: the transient tap
        // TUNSETIFF makes is refused and goes away with the file.
        let err = attach("embertest1", TAP_FLAGS).unwrap_err();
        assert!(matches!(err, Error::TapMissing { .. }), "{err}");
        assert_eq!(if_index("embertest1").unwrap(), None);
    }

    /// An Ethernet/IPv4/UDP frame from 10.0.0.1:`port` to 10.0.0.2:9: a
    /// flow of its own, which a multi-queue tap steers by its hash.
    fn udp_frame(port: u16) -> Vec<u8> {
        let mut f = vec![0x02, 0, 0, 0, 0, 0x02, 0x02, 0, 0, 0, 0, 0x01, 0x08, 0x00];
        f.extend([0x45, 0, 0, 32, 0, 0, 0x40, 0, 64, 17, 0, 0]);
        f.extend([10, 0, 0, 1, 10, 0, 0, 2]);
        f.extend(port.to_be_bytes());
        f.extend([0, 9, 0, 12, 0, 0, 0xde, 0xad, 0xbe, 0xef]);
        f.resize(60, 0);
        f
    }

    /// Reads every frame of [`udp_frame`]'s flows from `queues` until
    /// `want` came (or 5 s passed); how many each queue got.
    fn udp_frames_per_queue(queues: &[&Tap], want: usize) -> Vec<usize> {
        let mut got = vec![0; queues.len()];
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut buf = vec![0u8; 2048];
        while got.iter().sum::<usize>() < want && Instant::now() < deadline {
            let mut idle = true;
            for (q, n) in queues.iter().zip(got.iter_mut()) {
                match q.read(&mut buf) {
                    Ok(len) => {
                        idle = false;
                        let f = &buf[VNET_HDR_LEN..len];
                        if f.len() >= 38 && f[12..14] == [8, 0] && f[26..30] == [10, 0, 0, 1] {
                            *n += 1;
                        }
                    }
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(e) => panic!("tap queue read: {e}"),
                }
            }
            if idle {
                std::thread::sleep(Duration::from_millis(5));
            }
        }
        got
    }

    /// Multi-queue taps: several queues of one, the kernel spreading flows
    /// over them, a detached queue getting nothing, and refusals.
    fn multi_queue_checks() {
        let mq = IFF_TAP | IFF_NO_PI | libc::IFF_MULTI_QUEUE;
        // A single-queue tap refuses two queues, naming the fix.
        set_persistent("embersq0", IFF_TAP | IFF_NO_PI, true);
        let err = Tap::open_queues("embersq0", 2).unwrap_err();
        assert!(
            matches!(err, Error::NotMultiQueue { queues: 2, .. }),
            "{err}"
        );
        assert!(
            err.to_string()
                .contains("ip tuntap add embersq0 mode tap multi_queue"),
            "{err}"
        );
        set_persistent("embersq0", IFF_TAP | IFF_NO_PI, false);
        // Not a tap at all.
        let err = Tap::open_queues("lo", 2).unwrap_err();
        assert!(matches!(err, Error::NotTap { .. }), "{err}");

        set_persistent("embermq0", mq, true);
        let taps = Tap::open_queues("embermq0", 2).unwrap();
        assert_eq!(taps.len(), 2);
        for t in &taps {
            assert_eq!(vnet_hdr_size(t), 12);
        }
        // One queue more, as a single-queue NIC would take it.
        let third = Tap::open("embermq0").unwrap();
        drop(third);
        link_up("embermq0");
        let index = if_index("embermq0").unwrap().unwrap();

        // 64 flows: the kernel spreads them over both queues.
        for port in 0..64 {
            send_out_of(index, &udp_frame(1000 + port));
        }
        let got = udp_frames_per_queue(&[&taps[0], &taps[1]], 64);
        assert_eq!(got.iter().sum::<usize>(), 64, "{got:?}");
        assert!(got[0] > 0 && got[1] > 0, "flows per queue: {got:?}");

        // The second queue detached: every flow comes to the first.
        taps[1].set_queue_enabled(false).unwrap();
        assert!(taps[1].set_queue_enabled(false).is_err());
        for port in 0..64 {
            send_out_of(index, &udp_frame(1000 + port));
        }
        assert_eq!(
            udp_frames_per_queue(&taps.iter().collect::<Vec<_>>(), 64),
            [64, 0]
        );

        // A detached queue handed over (a migration's) is attached again.
        let mut taps = taps;
        let second = taps.pop().unwrap();
        let second = Tap::from_file(second.file, "embermq0").unwrap();
        for port in 0..64 {
            send_out_of(index, &udp_frame(1000 + port));
        }
        let got = udp_frames_per_queue(&[&taps[0], &second], 64);
        assert!(got[0] > 0 && got[1] > 0, "flows per queue: {got:?}");

        // More queues than Linux attaches to a tap (256, these two too).
        let err = Tap::open_queues("embermq0", MAX_TAP_QUEUES).unwrap_err();
        assert!(
            matches!(err, Error::TapQueues { attached: 254, .. }),
            "{err}"
        );
        assert!(err.to_string().contains("took 254 of the 256"), "{err}");
        drop((taps, second));
        set_persistent("embermq0", mq, false);
        assert_eq!(if_index("embermq0").unwrap(), None);
    }

    #[test]
    fn tap_open_in_fresh_namespace_refuses_missing_and_accepts_existing() {
        std::thread::spawn(|| {
            if !Path::new(TUN_DEVICE).exists() {
                eprintln!("SKIPPED tap_open_in_fresh_namespace: no {TUN_DEVICE}");
                return;
            }
            // SAFETY: unshare takes no pointers; CLONE_NEWNET moves only this
            // thread, which ends with the test, into a new network namespace.
            if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
                let e = io::Error::last_os_error();
                eprintln!("SKIPPED tap_open_in_fresh_namespace: unshare(CLONE_NEWNET): {e}");
                return;
            }
            match open_tun() {
                Ok(_) => {
                    namespace_checks();
                    multi_queue_checks();
                }
                Err(e) => eprintln!("SKIPPED tap_open_in_fresh_namespace: {TUN_DEVICE}: {e}"),
            }
        })
        .join()
        .unwrap();
    }
}
