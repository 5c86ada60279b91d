//! The handshake on the wire: one JSON list of region mappings, sent with
//! the userfaultfd as `SCM_RIGHTS`, exactly as Firecracker sends it.

use std::io::{self, Write};
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use userfaultfd::{FeatureFlags, Uffd, UffdBuilder};
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

use crate::{sys, Error, Result};

/// The largest handshake accepted (a region is about 120 bytes of JSON).
pub const MAX_HANDSHAKE_LEN: usize = 64 << 10;

/// Where one guest RAM region is in the VMM and in the memory file:
/// Firecracker's `GuestRegionUffdMapping`, field for field.
///
/// The contents of the region's `size` bytes are at `offset` in the memory
/// file and go to `base_host_virt_addr` in the VMM's address space.
///
/// On the wire it also carries `page_size_kib`, which Firecracker still
/// sends (with the same value, in bytes despite its name) for handlers
/// older than Firecracker 1.12. Reading accepts either key, and neither
/// (Firecracker before 1.7: the host's base page size).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(from = "WireMapping", into = "WireMapping")]
pub struct GuestRegionUffdMapping {
    /// The region's first byte in the VMM's address space.
    pub base_host_virt_addr: u64,
    /// The region's length in bytes.
    pub size: usize,
    /// Where the region's contents start in the memory file.
    pub offset: u64,
    /// The region's page size in bytes (4096, or 2 MiB for hugetlbfs).
    pub page_size: usize,
}

impl GuestRegionUffdMapping {
    /// Whether `addr` (a host virtual address in the VMM) is in the region.
    pub fn contains(&self, addr: u64) -> bool {
        addr >= self.base_host_virt_addr && addr - self.base_host_virt_addr < self.size as u64
    }
}

/// The JSON object: Firecracker's field names and order.
#[derive(Serialize, Deserialize)]
struct WireMapping {
    base_host_virt_addr: u64,
    size: usize,
    offset: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    page_size: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    page_size_kib: Option<usize>,
}

impl From<WireMapping> for GuestRegionUffdMapping {
    fn from(w: WireMapping) -> Self {
        // Before 1.7 Firecracker sent no page size: base pages then.
        let page_size = w
            .page_size
            .or(w.page_size_kib)
            .unwrap_or_else(sys::host_page_size);
        Self {
            base_host_virt_addr: w.base_host_virt_addr,
            size: w.size,
            offset: w.offset,
            page_size,
        }
    }
}

impl From<GuestRegionUffdMapping> for WireMapping {
    fn from(m: GuestRegionUffdMapping) -> Self {
        Self {
            base_host_virt_addr: m.base_host_virt_addr,
            size: m.size,
            offset: m.offset,
            page_size: Some(m.page_size),
            page_size_kib: Some(m.page_size),
        }
    }
}

/// Checks what the handler relies on: at least one region; each non-empty,
/// its page size a power of two no smaller than the host's, its address
/// and size multiples of it, its ends representable; no two overlapping.
pub fn validate_regions(regions: &[GuestRegionUffdMapping]) -> Result<()> {
    if regions.is_empty() {
        return Err(Error::NoRegions);
    }
    let host_page = sys::host_page_size();
    let bad = |index, reason: String| Err(Error::InvalidRegion { index, reason });
    let mut spans = Vec::with_capacity(regions.len());
    for (index, r) in regions.iter().enumerate() {
        let page = r.page_size;
        if !page.is_power_of_two() || page < host_page {
            return bad(
                index,
                format!("page size {page} is not a power of two of at least {host_page}"),
            );
        }
        if r.size == 0 || r.size % page != 0 {
            return bad(
                index,
                format!(
                    "size {:#x} is not a non-zero multiple of the page size",
                    r.size
                ),
            );
        }
        if r.base_host_virt_addr % page as u64 != 0 {
            return bad(
                index,
                format!(
                    "base_host_virt_addr {:#x} is not page aligned",
                    r.base_host_virt_addr
                ),
            );
        }
        let size = r.size as u64;
        let Some(end) = r.base_host_virt_addr.checked_add(size) else {
            return bad(index, "base_host_virt_addr + size overflows".into());
        };
        if r.offset.checked_add(size).is_none() {
            return bad(index, "offset + size overflows".into());
        }
        spans.push((r.base_host_virt_addr, end, index));
    }
    spans.sort_unstable();
    for pair in spans.windows(2) {
        let ((_, end, a), (start, _, b)) = (pair[0], pair[1]);
        if start < end {
            return bad(b, format!("it overlaps region {a}"));
        }
    }
    Ok(())
}

/// Parses and validates a handshake body.
pub fn parse_handshake(body: &[u8]) -> Result<Vec<GuestRegionUffdMapping>> {
    let regions: Vec<GuestRegionUffdMapping> =
        serde_json::from_slice(body).map_err(Error::HandshakeJson)?;
    validate_regions(&regions)?;
    Ok(regions)
}

/// Creates the userfaultfd the way Firecracker does for a `Uffd` restore:
/// close-on-exec, non-blocking (the handler's `poll` needs it), requiring
/// `UFFD_FEATURE_EVENT_REMOVE` (balloon `MADV_DONTNEED` reaches the
/// handler), not user-mode-only (KVM's own accesses to guest memory must
/// fault to the handler too). `/dev/userfaultfd` is used when it exists,
/// else the syscall. Register each region with `uffd.register(ptr, len)`
/// (mode `MISSING`) before [`send_handshake`].
pub fn create_vmm_uffd() -> userfaultfd::Result<Uffd> {
    UffdBuilder::new()
        .close_on_exec(true)
        .non_blocking(true)
        .user_mode_only(false)
        .require_features(FeatureFlags::EVENT_REMOVE)
        .create()
}

/// The VMM's side: sends `regions` as JSON with `uffd_fd` attached, in one
/// `sendmsg`, as Firecracker does. The caller must keep `stream` open until
/// the VM is done with its memory: the handler exits when it closes.
pub fn send_handshake(
    stream: &UnixStream,
    regions: &[GuestRegionUffdMapping],
    uffd_fd: RawFd,
) -> io::Result<()> {
    validate_regions(regions).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let body = serde_json::to_vec(regions).map_err(io::Error::other)?;
    if body.len() > MAX_HANDSHAKE_LEN {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            Error::HandshakeTooLarge,
        ));
    }
    let sent = loop {
        match stream.send_with_fd(&body[..], uffd_fd) {
            Ok(n) => break n,
            Err(e) if e.errno() == libc::EINTR => continue,
            Err(e) => return Err(io::Error::from_raw_os_error(e.errno())),
        }
    };
    // A stream socket may take only part of the body; the fd went with the
    // first part and the handler reads on until the JSON is complete.
    let mut rest = body.get(sent..).unwrap_or_default();
    let mut out = stream;
    while !rest.is_empty() {
        let n = out.write(rest)?;
        rest = &rest[n..];
    }
    Ok(())
}

/// A received handshake: the regions (validated) and the userfaultfd.
#[derive(Debug)]
pub struct Handshake {
    /// The guest RAM regions, in the order the VMM sent them.
    pub regions: Vec<GuestRegionUffdMapping>,
    /// The VMM's userfaultfd, set non-blocking.
    pub uffd: Uffd,
}

/// The handler's side: reads the handshake from the VMM's connection,
/// waiting at most `timeout` for each read. Reads until the JSON list is
/// complete (one read in practice), takes the one fd, checks that it is a
/// userfaultfd and makes sure it is non-blocking.
pub fn receive_handshake(stream: &UnixStream, timeout: Option<Duration>) -> Result<Handshake> {
    stream.set_read_timeout(timeout).map_err(Error::Receive)?;
    let received = read_handshake(stream, timeout);
    stream.set_read_timeout(None).map_err(Error::Receive)?;
    let (regions, file) = received?;
    let file = file.ok_or(Error::NoFd)?;
    match sys::fd_kind(file.as_raw_fd()) {
        Some(kind) if !kind.contains("[userfaultfd]") => return Err(Error::NotUserfaultfd(kind)),
        _ => {}
    }
    let fd = file.into_raw_fd();
    // SAFETY: `fd` was just received, is owned by nothing else (into_raw_fd
    // gave up the File's ownership) and is a userfaultfd as checked above.
    let uffd = unsafe { Uffd::from_raw_fd(fd) };
    // poll(2) on a blocking userfaultfd always says POLLERR. Firecracker
    // creates it non-blocking; the flag is shared with the VMM's copy, which
    // the VMM never reads.
    sys::set_nonblocking(fd).map_err(Error::NonBlocking)?;
    Ok(Handshake { regions, uffd })
}

fn read_handshake(
    stream: &UnixStream,
    timeout: Option<Duration>,
) -> Result<(Vec<GuestRegionUffdMapping>, Option<std::fs::File>)> {
    let mut buf = vec![0u8; MAX_HANDSHAKE_LEN];
    let mut len = 0;
    let mut fd = None;
    loop {
        let Some(space) = buf.get_mut(len..).filter(|s| !s.is_empty()) else {
            return Err(Error::HandshakeTooLarge);
        };
        let (n, file) = match stream.recv_with_fd(space) {
            Ok(got) => got,
            Err(e) if e.errno() == libc::EINTR => continue,
            Err(e) if e.errno() == libc::EAGAIN => {
                return Err(Error::HandshakeTimeout(timeout.unwrap_or_default()))
            }
            Err(e) if e.errno() == libc::ENOBUFS => return Err(Error::TooManyFds),
            Err(e) => return Err(Error::Receive(io::Error::from_raw_os_error(e.errno()))),
        };
        if let Some(file) = file {
            if fd.replace(file).is_some() {
                return Err(Error::TooManyFds);
            }
        }
        if n == 0 {
            return Err(Error::HandshakeTruncated(len));
        }
        len += n;
        match serde_json::from_slice::<Vec<GuestRegionUffdMapping>>(&buf[..len]) {
            Ok(regions) => {
                validate_regions(&regions)?;
                return Ok((regions, fd));
            }
            Err(e) if e.is_eof() => continue,
            Err(e) => return Err(Error::HandshakeJson(e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FC_1_17: &str = r#"[{"base_host_virt_addr":139637976727552,"size":3221225472,"offset":0,"page_size":4096,"page_size_kib":4096},{"base_host_virt_addr":139641271844864,"size":1073741824,"offset":3221225472,"page_size":4096,"page_size_kib":4096}]"#;

    fn region(base: u64, size: usize) -> GuestRegionUffdMapping {
        GuestRegionUffdMapping {
            base_host_virt_addr: base,
            size,
            offset: 0,
            page_size: 4096,
        }
    }

    fn reason(body: &str) -> String {
        crate::error_chain(&parse_handshake(body.as_bytes()).unwrap_err())
    }

    #[test]
    fn parse_firecracker_1_17_handshake_roundtrips_byte_for_byte() {
        let regions = parse_handshake(FC_1_17.as_bytes()).unwrap();
        assert_eq!(regions.len(), 2);
        assert_eq!(regions[1].offset, 3 << 30);
        assert_eq!(regions[1].size, 1 << 30);
        assert_eq!(serde_json::to_string(&regions).unwrap(), FC_1_17);
    }

    #[test]
    fn parse_old_page_size_kib_only_handshake_is_accepted() {
        let body = r#"[{"base_host_virt_addr":4096,"size":8192,"offset":0,"page_size_kib":4096}]"#;
        assert_eq!(parse_handshake(body.as_bytes()).unwrap()[0].page_size, 4096);
    }

    #[test]
    fn parse_pre_1_7_handshake_without_page_size_means_base_pages() {
        let body = r#"[{"base_host_virt_addr":4096,"size":8192,"offset":0}]"#;
        let regions = parse_handshake(body.as_bytes()).unwrap();
        assert_eq!(regions[0].page_size, sys::host_page_size());
    }

    #[test]
    fn parse_unknown_fields_are_ignored_like_firecracker_handlers() {
        let body =
            r#"[{"base_host_virt_addr":4096,"size":4096,"offset":0,"page_size":4096,"new":1}]"#;
        assert!(parse_handshake(body.as_bytes()).is_ok());
    }

    #[test]
    fn parse_malformed_handshakes_are_rejected_with_reasons() {
        assert!(reason("not json").contains("not a JSON list"));
        assert!(reason(r#"{"base_host_virt_addr":0}"#).contains("not a JSON list"));
        assert!(reason("[]").contains("no memory regions"));
        assert!(
            reason(r#"[{"base_host_virt_addr":0,"size":-1,"offset":0,"page_size":4096}]"#)
                .contains("not a JSON list")
        );
        assert!(
            reason(r#"[{"base_host_virt_addr":0,"size":4096,"offset":0,"page_size":3000}]"#)
                .contains("region 0 of the handshake is invalid: page size 3000")
        );
        assert!(reason(
            r#"[{"base_host_virt_addr":4097,"size":4096,"offset":0,"page_size":4096}]"#
        )
        .contains("not page aligned"));
        assert!(reason(
            r#"[{"base_host_virt_addr":18446744073709547520,"size":8192,"offset":0,"page_size":4096}]"#
        )
        .contains("overflows"));
    }

    #[test]
    fn validate_overlapping_regions_are_rejected() {
        let err = validate_regions(&[region(0x10000, 0x2000), region(0x11000, 0x1000)]);
        assert!(matches!(err, Err(Error::InvalidRegion { index: 1, .. })));
        assert!(validate_regions(&[region(0x10000, 0x1000), region(0x11000, 0x1000)]).is_ok());
    }

    #[test]
    fn receive_split_body_with_fd_is_reassembled() {
        let (vmm, handler) = UnixStream::pair().unwrap();
        let body = serde_json::to_vec(&[region(0x10000, 0x1000)]).unwrap();
        let (a, b) = body.split_at(10);
        let uffd = match create_vmm_uffd() {
            Ok(u) => u,
            Err(e) => {
                eprintln!("SKIPPED: userfaultfd unavailable: {e:?}");
                return;
            }
        };
        vmm.send_with_fd(a, uffd.as_raw_fd()).unwrap();
        (&vmm).write_all(b).unwrap();
        let got = receive_handshake(&handler, Some(Duration::from_secs(5))).unwrap();
        assert_eq!(got.regions, [region(0x10000, 0x1000)]);
    }

    #[test]
    fn receive_without_fd_is_refused() {
        let (vmm, handler) = UnixStream::pair().unwrap();
        let body = serde_json::to_vec(&[region(0x10000, 0x1000)]).unwrap();
        (&vmm).write_all(&body).unwrap();
        let err = receive_handshake(&handler, Some(Duration::from_secs(5))).unwrap_err();
        assert!(matches!(err, Error::NoFd), "{err}");
    }

    #[test]
    fn receive_non_uffd_fd_is_refused() {
        let (vmm, handler) = UnixStream::pair().unwrap();
        let (pipe, _) = UnixStream::pair().unwrap();
        let body = serde_json::to_vec(&[region(0x10000, 0x1000)]).unwrap();
        vmm.send_with_fd(&body[..], pipe.as_raw_fd()).unwrap();
        let err = receive_handshake(&handler, Some(Duration::from_secs(5))).unwrap_err();
        assert!(matches!(err, Error::NotUserfaultfd(_)), "{err}");
    }

    #[test]
    fn receive_silence_times_out() {
        let (_vmm, handler) = UnixStream::pair().unwrap();
        let err = receive_handshake(&handler, Some(Duration::from_millis(50))).unwrap_err();
        assert!(matches!(err, Error::HandshakeTimeout(_)), "{err}");
    }

    #[test]
    fn receive_hangup_mid_body_is_truncated() {
        let (vmm, handler) = UnixStream::pair().unwrap();
        (&vmm).write_all(b"[{\"base_host_virt_addr\":").unwrap();
        drop(vmm);
        let err = receive_handshake(&handler, Some(Duration::from_secs(5))).unwrap_err();
        assert!(matches!(err, Error::HandshakeTruncated(24)), "{err}");
    }
}
