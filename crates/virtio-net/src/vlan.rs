//! Host-side 802.1Q: a [`VlanBackend`] puts every frame the guest sends on
//! one VLAN and hands the guest only that VLAN's frames, untagged, so
//! several guests can share one trunk while each sees a plain Ethernet.
//!
//! Toward the backend (a tap on a trunk), the 4-byte tag `0x8100 TCI` goes
//! after the source MAC; back from it, a frame must carry that tag (the
//! kernel writes a tag it holds out of band into the frame it gives a tap)
//! and loses it before the guest sees it. Everything else is dropped and
//! counted: untagged frames, other VLANs, and frames the guest tagged
//! itself (on an access port a guest cannot reach other VLANs by stacking
//! tags). The virtio-net header's `csum_start` moves with the tag;
//! segmentation offloads pass (the kernel segments tagged frames).
//!
//! The frames are copied once each way (the tap's zero-copy `readv` and
//! `writev` of guest memory give way to a buffer of the backend's).

use std::io;
use std::os::fd::RawFd;

use ember_memory::Slice;
use virtio_bindings::virtio_net::VIRTIO_NET_HDR_F_NEEDS_CSUM;

use crate::backend::NetBackend;
use crate::{MAX_FRAME, VNET_HDR_LEN};

/// 802.1Q's tag protocol identifier.
const TPID_8021Q: u16 = 0x8100;
/// 802.1ad's (a service tag, QinQ).
const TPID_8021AD: u16 = 0x88a8;
/// The tag's length.
const TAG_LEN: usize = 4;
/// Where the Ethernet type (or a tag) starts: after both MAC addresses.
const ETHERTYPE_AT: usize = 12;
/// `csum_start` in the virtio-net header (le16 at byte 6).
const CSUM_START_AT: usize = 6;

/// A [`NetBackend`] that tags and untags one VLAN over another backend.
pub struct VlanBackend {
    inner: Box<dyn NetBackend>,
    vid: u16,
    buf: Vec<u8>,
    dropped_rx: u64,
}

impl VlanBackend {
    /// Puts the frames through `inner` on VLAN `vid` (1 to 4094).
    pub fn new(inner: Box<dyn NetBackend>, vid: u16) -> io::Result<VlanBackend> {
        if !(1..=4094).contains(&vid) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("VLAN id {vid} is out of range (1 to 4094)"),
            ));
        }
        Ok(VlanBackend {
            inner,
            vid,
            buf: vec![0; MAX_FRAME + TAG_LEN],
            dropped_rx: 0,
        })
    }

    /// The VLAN.
    pub fn vid(&self) -> u16 {
        self.vid
    }

    /// Tags the guest's frame in `self.buf[..len]` in place (it has room
    /// for the tag); the tagged length.
    fn tag(&mut self, len: usize) -> io::Result<usize> {
        let eth = VNET_HDR_LEN + ETHERTYPE_AT;
        let frame = self.buf.get(..len).unwrap_or_default();
        let Some(ty) = frame.get(eth..eth + 2) else {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("a {len}-byte frame has no Ethernet header"),
            ));
        };
        let ty = u16::from_be_bytes([ty[0], ty[1]]);
        if ty == TPID_8021Q || ty == TPID_8021AD {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "the guest tagged a frame itself ({ty:#06x}) on VLAN {}",
                    self.vid
                ),
            ));
        }
        self.buf.copy_within(eth..len, eth + TAG_LEN);
        let mut tag = [0u8; TAG_LEN];
        tag[..2].copy_from_slice(&TPID_8021Q.to_be_bytes());
        tag[2..].copy_from_slice(&self.vid.to_be_bytes());
        if let Some(dst) = self.buf.get_mut(eth..eth + TAG_LEN) {
            dst.copy_from_slice(&tag);
        }
        shift_csum_start(&mut self.buf, true);
        Ok(len + TAG_LEN)
    }

    /// Reads frames from the inner backend until one is on the VLAN;
    /// leaves it untagged in `self.buf` and returns its length.
    fn read_own(&mut self) -> io::Result<usize> {
        loop {
            let n = self.inner.read(&mut self.buf)?;
            if n == 0 {
                return Ok(0);
            }
            let eth = VNET_HDR_LEN + ETHERTYPE_AT;
            let frame = self.buf.get(..n).unwrap_or_default();
            let ours = frame.get(eth..eth + TAG_LEN).is_some_and(|t| {
                u16::from_be_bytes([t[0], t[1]]) == TPID_8021Q
                    && u16::from_be_bytes([t[2], t[3]]) & 0x0fff == self.vid
            });
            if !ours {
                self.dropped_rx = self.dropped_rx.saturating_add(1);
                continue;
            }
            self.buf.copy_within(eth + TAG_LEN..n, eth);
            shift_csum_start(&mut self.buf, false);
            return Ok(n - TAG_LEN);
        }
    }
}

/// Moves the header's `csum_start` past (or back over) the tag when the
/// frame needs a checksum.
fn shift_csum_start(frame: &mut [u8], tagged: bool) {
    let needs = frame
        .first()
        .is_some_and(|f| u32::from(*f) & VIRTIO_NET_HDR_F_NEEDS_CSUM != 0);
    if !needs {
        return;
    }
    if let Some(b) = frame.get_mut(CSUM_START_AT..CSUM_START_AT + 2) {
        let start = u16::from_le_bytes([b[0], b[1]]);
        let tag = u16::try_from(TAG_LEN).unwrap_or(4);
        let moved = if tagged {
            start.saturating_add(tag)
        } else {
            start.saturating_sub(tag)
        };
        b.copy_from_slice(&moved.to_le_bytes());
    }
}

impl NetBackend for VlanBackend {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.read_own()?;
        let k = n.min(buf.len());
        buf[..k].copy_from_slice(&self.buf[..k]);
        Ok(n)
    }

    fn read_vectored(&mut self, bufs: &[Slice<'_>]) -> io::Result<usize> {
        let n = self.read_own()?;
        let mut at = 0;
        for s in bufs {
            if at >= n {
                break;
            }
            let k = s.len().min(n - at);
            s.copy_from(&self.buf[at..at + k]);
            at += k;
        }
        Ok(n)
    }

    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let len = buf.len().min(MAX_FRAME);
        self.buf[..len].copy_from_slice(&buf[..len]);
        let tagged = self.tag(len)?;
        let n = self.inner.write(&self.buf[..tagged])?;
        Ok(n.saturating_sub(TAG_LEN).min(buf.len()))
    }

    fn write_vectored(&mut self, bufs: &[Slice<'_>]) -> io::Result<usize> {
        let total: usize = bufs.iter().map(|s| s.len()).sum();
        if total > MAX_FRAME {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("a {total}-byte frame is longer than {MAX_FRAME}"),
            ));
        }
        let mut at = 0;
        for s in bufs {
            at += s.copy_to(&mut self.buf[at..total]);
        }
        let tagged = self.tag(total)?;
        let n = self.inner.write(&self.buf[..tagged])?;
        Ok(n.saturating_sub(TAG_LEN))
    }

    fn set_offload(&mut self, flags: u32) -> io::Result<()> {
        self.inner.set_offload(flags)
    }

    fn raw_fd(&self) -> Option<RawFd> {
        self.inner.raw_fd()
    }

    fn set_queue_enabled(&mut self, on: bool) -> io::Result<()> {
        self.inner.set_queue_enabled(on)
    }

    fn rx_filtered(&self) -> u64 {
        self.dropped_rx.saturating_add(self.inner.rx_filtered())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::VecDeque;
    use std::sync::{Arc, Mutex};

    /// Frames written and frames to read, shared with the test.
    #[derive(Default)]
    struct Wire {
        written: Vec<Vec<u8>>,
        to_read: VecDeque<Vec<u8>>,
    }

    struct Fake(Arc<Mutex<Wire>>);

    impl NetBackend for Fake {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            let f = self.0.lock().unwrap().to_read.pop_front();
            match f {
                Some(f) => {
                    buf[..f.len()].copy_from_slice(&f);
                    Ok(f.len())
                }
                None => Err(io::ErrorKind::WouldBlock.into()),
            }
        }
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().written.push(buf.to_vec());
            Ok(buf.len())
        }
        fn set_offload(&mut self, _flags: u32) -> io::Result<()> {
            Ok(())
        }
        fn raw_fd(&self) -> Option<RawFd> {
            None
        }
    }

    /// A header (NEEDS_CSUM, csum_start `start`) and an IPv4 frame, tagged
    /// with `vid` when given.
    fn frame(vid: Option<u16>, start: u16, body: &[u8]) -> Vec<u8> {
        let mut f = vec![0u8; VNET_HDR_LEN];
        f[0] = u8::try_from(VIRTIO_NET_HDR_F_NEEDS_CSUM).unwrap();
        f[CSUM_START_AT..CSUM_START_AT + 2].copy_from_slice(&start.to_le_bytes());
        f.extend_from_slice(&[0x52, 0x54, 0, 0, 0, 1, 0x52, 0x54, 0, 0, 0, 2]);
        if let Some(v) = vid {
            f.extend_from_slice(&[0x81, 0x00]);
            f.extend_from_slice(&v.to_be_bytes());
        }
        f.extend_from_slice(&[0x08, 0x00]);
        f.extend_from_slice(body);
        f
    }

    fn vlan(vid: u16) -> (VlanBackend, Arc<Mutex<Wire>>) {
        let wire = Arc::new(Mutex::new(Wire::default()));
        (
            VlanBackend::new(Box::new(Fake(wire.clone())), vid).unwrap(),
            wire,
        )
    }

    #[test]
    fn guest_frames_go_out_tagged_with_csum_start_moved() {
        let (mut v, wire) = vlan(100);
        let out = frame(None, 34, b"payload");
        assert_eq!(v.write(&out).unwrap(), out.len());
        let w = wire.lock().unwrap();
        assert_eq!(w.written, vec![frame(Some(100), 38, b"payload")]);
    }

    #[test]
    fn only_the_vlans_frames_come_in_untagged() {
        let (mut v, wire) = vlan(100);
        {
            let mut w = wire.lock().unwrap();
            w.to_read.push_back(frame(None, 34, b"untagged"));
            w.to_read.push_back(frame(Some(200), 38, b"vlan 200"));
            // Priority bits do not matter, the id does.
            w.to_read
                .push_back(frame(Some(0xe000 | 100), 38, b"vlan 100"));
            w.to_read.push_back(frame(Some(100), 38, b"second"));
        }
        let mut buf = vec![0u8; MAX_FRAME];
        let n = v.read(&mut buf).unwrap();
        assert_eq!(&buf[..n], &frame(None, 34, b"vlan 100")[..]);
        assert_eq!(v.rx_filtered(), 2);
        let n = v.read(&mut buf).unwrap();
        assert_eq!(&buf[..n], &frame(None, 34, b"second")[..]);
        assert_eq!(
            v.read(&mut buf).unwrap_err().kind(),
            io::ErrorKind::WouldBlock
        );
    }

    #[test]
    fn guest_tagged_frames_and_bad_ids_are_refused() {
        let (mut v, wire) = vlan(100);
        for tpid in [[0x81, 0x00], [0x88, 0xa8]] {
            let mut f = frame(None, 34, b"x");
            f[VNET_HDR_LEN + 12..VNET_HDR_LEN + 14].copy_from_slice(&tpid);
            let e = v.write(&f).unwrap_err();
            assert!(e.to_string().contains("tagged a frame itself"), "{e}");
        }
        let e = v.write(&[0u8; VNET_HDR_LEN + 10]).unwrap_err();
        assert!(e.to_string().contains("no Ethernet header"), "{e}");
        assert!(wire.lock().unwrap().written.is_empty());
        for bad in [0, 4095, 5000] {
            let e = VlanBackend::new(Box::new(Fake(wire.clone())), bad)
                .err()
                .unwrap();
            assert!(e.to_string().contains("out of range"), "{e}");
        }
    }

    #[test]
    fn frames_without_needs_csum_keep_their_header() {
        let (mut v, wire) = vlan(7);
        let mut out = frame(None, 0, b"abc");
        out[0] = 0;
        v.write(&out).unwrap();
        let w = wire.lock().unwrap();
        let mut want = frame(Some(7), 0, b"abc");
        want[0] = 0;
        assert_eq!(w.written[0], want);
    }
}
