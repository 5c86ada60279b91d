//! Raw Ethernet on a host interface (`AF_PACKET`), for tests that must
//! see or write what IP cannot: VLAN tags, frames to another MAC, ARP.
//!
//! A frame sent on a tap goes to the tap's reader (ember); a frame ember
//! writes to the tap arrives here, with a VLAN tag the kernel took off into
//! `PACKET_AUXDATA` given back as [`Received::vlan`].

use std::ffi::CString;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::{Duration, Instant};

const ETH_P_ALL: u16 = 0x0003;
const PACKET_AUXDATA: libc::c_int = 8;
const TP_STATUS_VLAN_VALID: u32 = 1 << 4;
const PACKET_OUTGOING: u8 = 4;

/// `struct tpacket_auxdata`.
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct AuxData {
    status: u32,
    len: u32,
    snaplen: u32,
    mac: u16,
    net: u16,
    vlan_tci: u16,
    vlan_tpid: u16,
}

/// A frame that arrived on the interface.
#[derive(Clone, Debug)]
pub struct Received {
    /// The frame, Ethernet header first (a VLAN tag the kernel took off is
    /// not in it).
    pub frame: Vec<u8>,
    /// The VLAN id of a tagged frame (from the kernel's auxiliary data, or
    /// the frame's own tag if it kept it).
    pub vlan: Option<u16>,
}

/// An `AF_PACKET` socket bound to one interface of the calling thread's
/// network namespace.
pub struct PacketSocket {
    fd: OwnedFd,
    index: i32,
}

// The casts are of small kernel constants and struct sizes.
#[allow(
    clippy::cast_possible_truncation,
    clippy::cast_possible_wrap,
    clippy::cast_sign_loss
)]
impl PacketSocket {
    /// Opens a socket on `dev`, which must exist in this thread's namespace.
    pub fn open(dev: &str) -> PacketSocket {
        let name = CString::new(dev).expect("interface name");
        // SAFETY: plain syscalls; the socket is owned by the OwnedFd right
        // away, and every pointer passed is a live local of the given size.
        unsafe {
            let fd = libc::socket(
                libc::AF_PACKET,
                libc::SOCK_RAW,
                i32::from(ETH_P_ALL.to_be()),
            );
            assert!(
                fd >= 0,
                "AF_PACKET socket: {}",
                std::io::Error::last_os_error()
            );
            let fd = OwnedFd::from_raw_fd(fd);
            let index = libc::if_nametoindex(name.as_ptr()) as i32;
            assert!(index > 0, "no such interface {dev}");
            let mut addr: libc::sockaddr_ll = std::mem::zeroed();
            addr.sll_family = libc::AF_PACKET as u16;
            addr.sll_protocol = ETH_P_ALL.to_be();
            addr.sll_ifindex = index;
            let ret = libc::bind(
                fd.as_raw_fd(),
                std::ptr::addr_of!(addr).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            );
            assert_eq!(ret, 0, "bind AF_PACKET to {dev}");
            let on: libc::c_int = 1;
            let ret = libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_PACKET,
                PACKET_AUXDATA,
                std::ptr::addr_of!(on).cast(),
                std::mem::size_of::<libc::c_int>() as u32,
            );
            assert_eq!(ret, 0, "PACKET_AUXDATA");
            PacketSocket { fd, index }
        }
    }

    /// Sends `frame` (Ethernet header first, any tag inline) out of the
    /// interface.
    pub fn send(&self, frame: &[u8]) {
        // SAFETY: the socket is ours; `addr` and `frame` are live for the
        // call.
        let n = unsafe {
            let mut addr: libc::sockaddr_ll = std::mem::zeroed();
            addr.sll_family = libc::AF_PACKET as u16;
            addr.sll_ifindex = self.index;
            addr.sll_halen = 6;
            addr.sll_addr[..6].copy_from_slice(&frame[..6]);
            libc::sendto(
                self.fd.as_raw_fd(),
                frame.as_ptr().cast(),
                frame.len(),
                0,
                std::ptr::addr_of!(addr).cast(),
                std::mem::size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        assert_eq!(
            n,
            frame.len() as isize,
            "send a frame: {}",
            std::io::Error::last_os_error()
        );
    }

    /// The frames arriving (not those sent from this host) for `duration`.
    pub fn receive_for(&self, duration: Duration) -> Vec<Received> {
        let deadline = Instant::now() + duration;
        let mut out = Vec::new();
        let mut buf = vec![0u8; 65536];
        while let Some(left) = deadline.checked_duration_since(Instant::now()) {
            if let Some(r) = self.receive_one(&mut buf, left) {
                out.push(r);
            }
        }
        out
    }

    fn receive_one(&self, buf: &mut [u8], wait: Duration) -> Option<Received> {
        let mut pfd = libc::pollfd {
            fd: self.fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = wait.as_millis().clamp(1, 1000) as i32;
        // SAFETY: one live pollfd.
        if unsafe { libc::poll(&mut pfd, 1, ms) } <= 0 {
            return None;
        }
        let mut from: libc::sockaddr_ll = unsafe_zeroed();
        let mut control = [0u64; 16];
        let mut iov = libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        };
        let mut msg: libc::msghdr = unsafe_zeroed();
        msg.msg_name = std::ptr::addr_of_mut!(from).cast();
        msg.msg_namelen = std::mem::size_of::<libc::sockaddr_ll>() as u32;
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr().cast();
        msg.msg_controllen = std::mem::size_of_val(&control);
        // SAFETY: every pointer in `msg` is to a live local of the size
        // given.
        let n = unsafe { libc::recvmsg(self.fd.as_raw_fd(), &mut msg, libc::MSG_DONTWAIT) };
        if n <= 0 || from.sll_pkttype == PACKET_OUTGOING {
            return None;
        }
        let frame = buf[..n as usize].to_vec();
        let mut vlan = None;
        // SAFETY: walking the control messages recvmsg filled in, within
        // `msg_controllen`.
        unsafe {
            let mut c = libc::CMSG_FIRSTHDR(&msg);
            while !c.is_null() {
                if (*c).cmsg_level == libc::SOL_PACKET && (*c).cmsg_type == PACKET_AUXDATA {
                    let aux: AuxData = std::ptr::read_unaligned(libc::CMSG_DATA(c).cast());
                    if aux.status & TP_STATUS_VLAN_VALID != 0 {
                        vlan = Some(aux.vlan_tci & 0x0fff);
                    }
                }
                c = libc::CMSG_NXTHDR(&msg, c);
            }
        }
        if vlan.is_none() && frame.get(12..14) == Some(&[0x81, 0x00][..]) {
            vlan = frame
                .get(14..16)
                .map(|t| u16::from_be_bytes([t[0], t[1]]) & 0x0fff);
        }
        Some(Received { frame, vlan })
    }
}

/// A zeroed C struct.
fn unsafe_zeroed<T: Copy>() -> T {
    // SAFETY: only used for plain C structs (sockaddr_ll, msghdr) for which
    // all-zero bytes are a valid value.
    unsafe { std::mem::zeroed() }
}

/// An ARP request "who has `target` tell `sender_ip`" from `sender_mac`,
/// to Ethernet address `to`, tagged with `vlan` when given, padded to the
/// 60-byte minimum.
pub fn arp_request(
    sender_mac: [u8; 6],
    sender_ip: [u8; 4],
    to: [u8; 6],
    target: [u8; 4],
    vlan: Option<u16>,
) -> Vec<u8> {
    let mut f = to.to_vec();
    f.extend_from_slice(&sender_mac);
    if let Some(v) = vlan {
        f.extend_from_slice(&[0x81, 0x00]);
        f.extend_from_slice(&v.to_be_bytes());
    }
    let min = f.len() + 46;
    f.extend_from_slice(&[0x08, 0x06, 0, 1, 0x08, 0x00, 6, 4, 0, 1]);
    f.extend_from_slice(&sender_mac);
    f.extend_from_slice(&sender_ip);
    f.extend_from_slice(&[0; 6]);
    f.extend_from_slice(&target);
    f.resize(min, 0);
    f
}

/// An ARP reply in `frame` (untagged): (sender MAC, sender IP, target IP).
pub fn arp_reply(frame: &[u8]) -> Option<([u8; 6], [u8; 4], [u8; 4])> {
    if frame.get(12..14)? != [0x08, 0x06] || frame.get(20..22)? != [0, 2] {
        return None;
    }
    Some((
        frame.get(22..28)?.try_into().ok()?,
        frame.get(28..32)?.try_into().ok()?,
        frame.get(38..42)?.try_into().ok()?,
    ))
}
