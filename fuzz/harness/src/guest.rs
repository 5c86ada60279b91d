//! What every device target shares: a small guest memory with a hole, a
//! split queue the way a driver would set it up, an interrupt that counts,
//! and a logger that formats every message (so a bad `Display` shows up
//! too).

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Once;

use arbitrary::Arbitrary;
use ember_memory::GuestMemoryMmap;
use ember_virtio::{InterruptKind, VirtioInterrupt};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};

/// Guest RAM at 0: 64 KiB, where the input's memory image goes first.
pub const LOW_SIZE: usize = 0x1_0000;
/// A second RAM region after a 64 KiB hole, so buffers can run off the end
/// of RAM into the hole or start in it.
pub const HIGH_BASE: u64 = 0x2_0000;
/// Its size.
pub const HIGH_SIZE: usize = 0x1_0000;
/// The most image bytes that land in guest memory.
pub const IMAGE_MAX: usize = LOW_SIZE + HIGH_SIZE;

/// The guest memory of a device target: the two regions, filled from
/// `image` (low region first, then the high one); the rest is zero.
pub fn guest_memory(image: &[u8]) -> GuestMemoryMmap {
    let mem = GuestMemoryMmap::from_ranges(&[
        (GuestAddress(0), LOW_SIZE),
        (GuestAddress(HIGH_BASE), HIGH_SIZE),
    ])
    .expect("two fixed, disjoint regions are a valid guest memory");
    let (low, high) = image.split_at(image.len().min(LOW_SIZE));
    let high = &high[..high.len().min(HIGH_SIZE)];
    // Both writes fit their regions by construction.
    let _ = mem.write_slice(low, GuestAddress(0));
    let _ = mem.write_slice(high, GuestAddress(HIGH_BASE));
    mem
}

/// Writes `bytes` at `addr` if that is guest memory (a guest driver
/// changing its rings or buffers between notifications).
pub fn poke(mem: &GuestMemoryMmap, addr: u64, bytes: &[u8]) {
    let _ = mem.write_slice(bytes, GuestAddress(addr));
}

/// A split queue as a driver programs it: size and the three ring
/// addresses, read from the input as they are.
#[derive(Arbitrary, Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct QueueSetup {
    /// The queue size (a power of two up to the device's maximum).
    pub size: u16,
    /// The descriptor table.
    pub desc: u64,
    /// The available ring.
    pub avail: u64,
    /// The used ring.
    pub used: u64,
}

impl QueueSetup {
    /// The queue a transport would hand a device for this setup, or `None`
    /// where the transport would refuse it (a size above `max_size` or not
    /// a power of two, misaligned rings, rings outside guest memory): the
    /// transport only activates queues that pass `Queue::is_valid`.
    pub fn queue(&self, max_size: u16, mem: &GuestMemoryMmap, event_idx: bool) -> Option<Queue> {
        let mut q = Queue::new(max_size).ok()?;
        q.try_set_size(self.size).ok()?;
        q.try_set_desc_table_address(GuestAddress(self.desc)).ok()?;
        q.try_set_avail_ring_address(GuestAddress(self.avail))
            .ok()?;
        q.try_set_used_ring_address(GuestAddress(self.used)).ok()?;
        q.set_ready(true);
        if !q.is_valid(mem) {
            return None;
        }
        q.set_event_idx(event_idx);
        Some(q)
    }
}

/// The features a transport hands a device for a driver that acknowledged
/// `acked`: only what the device offers (`avail`), and always
/// VIRTIO_F_VERSION_1 (the transport refuses FEATURES_OK without it).
/// VIRTIO_RING_F_EVENT_IDX is on only if the device offers it.
pub fn negotiated(acked: u64, avail: u64) -> u64 {
    (acked & avail) | (1 << virtio_bindings::virtio_config::VIRTIO_F_VERSION_1)
}

/// The bytes of a bus access: `code` picks the width (1, 2, 4 or 8 by its
/// low two bits; with bit 7 set, any width from 0 to 15 by its low four
/// bits), filled with `value` little-endian, repeated past 8 bytes.
pub fn access(code: u8, value: u64, buf: &mut [u8; 16]) -> &mut [u8] {
    let width = if code & 0x80 != 0 {
        usize::from(code & 0xf)
    } else {
        1 << (code & 3)
    };
    let v = value.to_le_bytes();
    for (i, b) in buf.iter_mut().enumerate() {
        *b = v[i % 8];
    }
    &mut buf[..width]
}

/// An interrupt that counts, and fails when told to (to reach the
/// devices' error paths).
#[derive(Debug, Default)]
pub struct Irq {
    /// Interrupts raised.
    pub count: AtomicUsize,
    /// Whether raising one fails.
    pub fail: AtomicBool,
}

impl VirtioInterrupt for Irq {
    fn trigger(&self, _kind: InterruptKind) -> std::io::Result<()> {
        self.count.fetch_add(1, Ordering::Relaxed);
        if self.fail.load(Ordering::Relaxed) {
            return Err(std::io::ErrorKind::BrokenPipe.into());
        }
        Ok(())
    }
}

/// Formats every log record and throws it away.
struct SinkLogger;

impl log::Log for SinkLogger {
    fn enabled(&self, _metadata: &log::Metadata<'_>) -> bool {
        true
    }

    fn log(&self, record: &log::Record<'_>) {
        use std::io::Write;
        let _ = write!(std::io::sink(), "{}", record.args());
    }

    fn flush(&self) {}
}

static LOGGER: SinkLogger = SinkLogger;

/// Installs the formatting logger once per process (if no other logger
/// was installed first), at trace level, so every log message the code
/// under test builds is formatted.
pub fn init_logging() {
    static INIT: Once = Once::new();
    INIT.call_once(|| {
        if log::set_logger(&LOGGER).is_ok() {
            log::set_max_level(log::LevelFilter::Trace);
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn guest_memory_places_the_image_in_both_regions() {
        let mut image = vec![0u8; LOW_SIZE + 4];
        image[0] = 1;
        image[LOW_SIZE] = 2;
        let mem = guest_memory(&image);
        assert_eq!(mem.read_obj::<u8>(GuestAddress(0)).unwrap(), 1);
        assert_eq!(mem.read_obj::<u8>(GuestAddress(HIGH_BASE)).unwrap(), 2);
        assert!(mem.read_obj::<u8>(GuestAddress(LOW_SIZE as u64)).is_err());
    }

    #[test]
    fn queue_setup_refuses_what_a_transport_refuses() {
        let mem = guest_memory(&[]);
        let ok = QueueSetup {
            size: 16,
            desc: 0,
            avail: 0x100,
            used: 0x200,
        };
        assert!(ok.queue(256, &mem, false).is_some());
        for bad in [
            QueueSetup { size: 12, ..ok },
            QueueSetup { size: 512, ..ok },
            QueueSetup { desc: 8, ..ok },
            QueueSetup {
                used: LOW_SIZE as u64,
                ..ok
            },
        ] {
            assert!(bad.queue(256, &mem, false).is_none(), "{bad:?}");
        }
    }
}
