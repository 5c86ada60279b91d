//! The virtio-mmio register file driven as Linux's virtio_mmio driver does,
//! on a real `GuestMemoryMmap`.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use ember_memory::GuestMemoryMmap;
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use vm_memory::GuestAddress;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::*;
use crate::device::{ActivateContext, ActivateError, InterruptKind};

#[derive(Default)]
struct Dummy {
    active: Option<ActivateContext>,
    resets: usize,
    processed: Arc<AtomicUsize>,
}

const FEATURE_33: u64 = 1 << 33;

impl VirtioDevice for Dummy {
    fn device_type(&self) -> u32 {
        virtio_bindings::virtio_ids::VIRTIO_ID_NET
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &[16, 32]
    }
    fn avail_features(&self) -> u64 {
        (1 << VIRTIO_F_VERSION_1) | FEATURE_33 | 1
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        data.fill(u8::try_from(offset).unwrap_or(0xee));
    }
    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
    fn activate(&mut self, ctx: ActivateContext) -> Result<(), ActivateError> {
        self.active = Some(ctx);
        Ok(())
    }
    fn is_activated(&self) -> bool {
        self.active.is_some()
    }
    fn process_queue(&mut self, index: usize) {
        self.processed.fetch_add(1, Ordering::SeqCst);
        if let Some(ctx) = &self.active {
            let _ = ctx
                .interrupt
                .trigger(InterruptKind::Queue(u16::try_from(index).unwrap()));
        }
    }
    fn reset(&mut self) {
        self.resets += 1;
        self.active = None;
    }
    fn queue_states(&self) -> Vec<virtio_queue::QueueState> {
        self.active
            .as_ref()
            .map(|a| a.queues.iter().map(|q| q.state()).collect())
            .unwrap_or_default()
    }
}

const BASE: u64 = 0xd000_0000;

fn setup() -> (VirtioPciDevice<Dummy>, EventFd) {
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
    let irq = EventFd::new(EFD_NONBLOCK).unwrap();
    let dev = VirtioPciDevice::new_mmio(
        "mmio-test",
        Dummy::default(),
        mem,
        BASE,
        irq.try_clone().unwrap(),
    )
    .unwrap();
    (dev, irq)
}

fn r(d: &mut VirtioPciDevice<Dummy>, off: u64) -> u32 {
    let mut b = [0u8; 4];
    d.mmio_reg_read(off, &mut b);
    u32::from_le_bytes(b)
}

fn w(d: &mut VirtioPciDevice<Dummy>, off: u64, v: u32) {
    d.mmio_reg_write(off, &v.to_le_bytes());
}

/// Linux's virtio_mmio probe and virtio core up to DRIVER_OK, with both
/// queues at valid addresses.
fn bring_up(d: &mut VirtioPciDevice<Dummy>) {
    w(d, STATUS, 0);
    w(d, STATUS, 1);
    w(d, STATUS, 1 | 2);
    let mut features = 0u64;
    for sel in 0..2 {
        w(d, DEVICE_FEATURES_SEL, sel);
        features |= u64::from(r(d, DEVICE_FEATURES)) << (32 * sel);
    }
    for sel in 0..2u32 {
        w(d, DRIVER_FEATURES_SEL, sel);
        w(
            d,
            DRIVER_FEATURES,
            u32::try_from((features >> (32 * sel)) & 0xffff_ffff).unwrap(),
        );
    }
    w(d, STATUS, 1 | 2 | 8);
    assert_eq!(r(d, STATUS) & 8, 8, "FEATURES_OK stays set");
    for (q, base) in [(0u32, 0x1000u64), (1, 0x8000)] {
        w(d, QUEUE_SEL, q);
        assert_eq!(r(d, QUEUE_READY), 0);
        let max = r(d, QUEUE_NUM_MAX);
        w(d, QUEUE_NUM, max);
        w(d, QUEUE_DESC_LOW, u32::try_from(base).unwrap());
        w(d, QUEUE_DESC_HIGH, 0);
        w(d, QUEUE_DRIVER_LOW, u32::try_from(base + 0x1000).unwrap());
        w(d, QUEUE_DRIVER_HIGH, 0);
        w(d, QUEUE_DEVICE_LOW, u32::try_from(base + 0x2000).unwrap());
        w(d, QUEUE_DEVICE_HIGH, 0);
        w(d, QUEUE_READY, 1);
    }
    w(d, STATUS, 1 | 2 | 8 | 4);
}

#[test]
fn mmio_registers_identify_a_modern_virtio_device() {
    let (mut d, _) = setup();
    assert_eq!(r(&mut d, MAGIC), 0x7472_6976);
    assert_eq!(r(&mut d, VERSION), 2);
    assert_eq!(
        r(&mut d, DEVICE_ID),
        virtio_bindings::virtio_ids::VIRTIO_ID_NET
    );
    assert_eq!(r(&mut d, VENDOR), VENDOR_ID);
    w(&mut d, DEVICE_FEATURES_SEL, 1);
    assert_eq!(r(&mut d, DEVICE_FEATURES), 1 | 2, "VERSION_1 and bit 33");
    w(&mut d, DEVICE_FEATURES_SEL, 7);
    assert_eq!(r(&mut d, DEVICE_FEATURES), 0);
    w(&mut d, QUEUE_SEL, 1);
    assert_eq!(r(&mut d, QUEUE_NUM_MAX), 32);
    w(&mut d, QUEUE_SEL, 2);
    assert_eq!(r(&mut d, QUEUE_NUM_MAX), 0, "no queue 2");
    assert_eq!(r(&mut d, SHM_LEN_LOW), u32::MAX, "no shared memory");
    // Device configuration at 0x100, any width.
    let mut b = [0u8; 2];
    d.mmio_reg_read(CONFIG + 3, &mut b);
    assert_eq!(b, [3, 3]);
    assert_eq!(d.notify_addr(1), BASE + QUEUE_NOTIFY);
    assert_eq!(d.notify_datamatch(1), Some(1));
    assert!(d.is_mmio());
}

#[test]
fn mmio_driver_ok_activates_and_interrupts_through_the_irq_line() {
    let (mut d, irq) = setup();
    bring_up(&mut d);
    assert!(d.is_running(), "DRIVER_OK activates");
    let active = d.device().active.as_ref().unwrap();
    assert_eq!(active.queues.len(), 2);
    assert_eq!(active.queues[1].desc_table(), 0x8000);
    assert_eq!(active.queues[1].size(), 32);
    // A notification (written here, no ioeventfd) reaches the queue's eventfd.
    w(&mut d, QUEUE_NOTIFY, 1);
    assert_eq!(d.queue_evts()[1].read().unwrap(), 1);
    w(&mut d, QUEUE_NOTIFY, 9);
    // The device uses buffers: the line fires and InterruptStatus says why.
    d.process_queue(0);
    assert_eq!(irq.read().unwrap(), 1);
    assert_eq!(r(&mut d, INTERRUPT_STATUS), 1);
    d.signal_config_change().unwrap();
    assert_eq!(r(&mut d, INTERRUPT_STATUS), 3);
    assert_eq!(r(&mut d, CONFIG_GENERATION), 1);
    w(&mut d, INTERRUPT_ACK, 1);
    assert_eq!(r(&mut d, INTERRUPT_STATUS), 2, "ACK clears what it names");
    w(&mut d, INTERRUPT_ACK, 2);
    assert_eq!(r(&mut d, INTERRUPT_STATUS), 0);
    // Reset (the probe's first write of 0 was one already).
    let resets = d.device().resets;
    w(&mut d, STATUS, 0);
    assert!(!d.is_running());
    assert_eq!(d.device().resets, resets + 1);
    assert_eq!(r(&mut d, STATUS), 0);
    w(&mut d, QUEUE_SEL, 0);
    assert_eq!(r(&mut d, QUEUE_READY), 0, "queues reset");
}

#[test]
fn mmio_misuse_is_refused_and_never_panics() {
    let (mut d, _) = setup();
    // Features without VERSION_1: FEATURES_OK does not stick.
    w(&mut d, STATUS, 1 | 2);
    w(&mut d, DRIVER_FEATURES_SEL, 0);
    w(&mut d, DRIVER_FEATURES, 1);
    w(&mut d, STATUS, 1 | 2 | 8);
    assert_eq!(r(&mut d, STATUS) & 8, 0);
    w(&mut d, STATUS, 0);
    bring_up(&mut d);
    // Queue registers are fixed once running.
    w(&mut d, QUEUE_SEL, 0);
    w(&mut d, QUEUE_DESC_LOW, 0x5000);
    w(&mut d, QUEUE_NUM, 8);
    assert_eq!(r(&mut d, QUEUE_DESC_LOW), 0x1000);
    assert_eq!(r(&mut d, QUEUE_NUM), 16);
    // Odd widths and offsets, unknown registers, a queue out of range.
    let mut one = [0xffu8; 1];
    d.mmio_reg_read(MAGIC, &mut one);
    assert_eq!(one, [0]);
    d.mmio_reg_write(STATUS, &[0]);
    d.mmio_reg_write(0x2, &[1, 2, 3, 4]);
    w(&mut d, 0x0f0, 1);
    w(&mut d, MAGIC, 1);
    w(&mut d, STATUS, 0x1ff);
    w(&mut d, QUEUE_SEL, u32::MAX);
    w(&mut d, QUEUE_NUM, 4);
    assert_eq!(r(&mut d, QUEUE_NUM_MAX), 0);
    assert!(d.is_running(), "none of it disturbed the running device");
    // A queue outside guest memory: NEEDS_RESET, not activation.
    w(&mut d, STATUS, 0);
    w(&mut d, STATUS, 1 | 2);
    w(&mut d, DRIVER_FEATURES_SEL, 1);
    w(&mut d, DRIVER_FEATURES, 1);
    w(&mut d, STATUS, 1 | 2 | 8);
    w(&mut d, QUEUE_SEL, 0);
    w(&mut d, QUEUE_NUM, 16);
    w(&mut d, QUEUE_DESC_LOW, 0xffff_f000);
    w(&mut d, QUEUE_DESC_HIGH, 0xffff);
    w(&mut d, QUEUE_READY, 1);
    w(&mut d, STATUS, 1 | 2 | 8 | 4);
    assert!(!d.is_running());
    assert_ne!(r(&mut d, STATUS) & 0x40, 0, "NEEDS_RESET");
}

#[test]
fn mmio_state_restores_a_running_device_on_a_new_transport() {
    let (mut d, _) = setup();
    bring_up(&mut d);
    d.process_queue(1);
    let state = d.state();
    let (mut fresh, irq) = setup();
    fresh.restore_state(&state).unwrap();
    assert!(fresh.is_running());
    assert_eq!(
        r(&mut fresh, INTERRUPT_STATUS),
        1,
        "the pending interrupt status"
    );
    w(&mut fresh, QUEUE_SEL, 1);
    assert_eq!(r(&mut fresh, QUEUE_DESC_LOW), 0x8000);
    fresh.kick();
    assert!(irq.read().unwrap() >= 1, "kick raises the line");
}
