use virtio_queue::desc::{split::Descriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use vm_memory::GuestMemoryBackend;

use super::*;

const MEM: usize = 8 << 20;
const WRITE: u16 = 2;

use ember_virtio::CountingInterrupt as Irqs;

fn mem() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM)]).unwrap()
}

fn desc(addr: u64, len: u32, flags: u16) -> RawDescriptor {
    RawDescriptor::from(Descriptor::new(addr, len, flags, 0))
}

/// Queues at 64 KiB steps from 0; data from 1 MiB.
fn queues(m: &GuestMemoryMmap, n: usize) -> Vec<MockSplitQueue<'_, GuestMemoryMmap>> {
    (0..n)
        .map(|i| MockSplitQueue::create(m, GuestAddress(0x1_0000 * i as u64), 64))
        .collect()
}

fn activate(
    b: &mut Balloon,
    m: &GuestMemoryMmap,
    vqs: &[MockSplitQueue<'_, GuestMemoryMmap>],
) -> Arc<Irqs> {
    let irqs = Arc::new(Irqs::default());
    b.activate(ActivateContext {
        mem: m.clone(),
        interrupt: irqs.clone(),
        queues: vqs.iter().map(|q| q.create_queue().unwrap()).collect(),
        acked_features: b.avail_features(),
    })
    .unwrap();
    irqs
}

/// Whether the statistics timer becomes readable within 3 s.
fn timer_fires(b: &Balloon) -> bool {
    let mut fds = [libc::pollfd {
        fd: b.backend_fd().unwrap(),
        events: libc::POLLIN,
        revents: 0,
    }];
    // SAFETY: poll(2) on one valid descriptor in a local array.
    #[allow(unsafe_code)]
    let n = unsafe { libc::poll(fds.as_mut_ptr(), 1, 3000) };
    n == 1
}

fn config(stats: u16, reporting: bool) -> BalloonConfig {
    BalloonConfig {
        amount_mib: 2,
        deflate_on_oom: true,
        stats_polling_interval_s: stats,
        free_page_reporting: reporting,
    }
}

fn fill(m: &GuestMemoryMmap, addr: u64, len: usize) {
    m.write_slice(&vec![0xa5; len], GuestAddress(addr)).unwrap();
}

fn nonzero(m: &GuestMemoryMmap, addr: u64, len: usize) -> usize {
    let mut v = vec![0u8; len];
    m.read_slice(&mut v, GuestAddress(addr)).unwrap();
    v.iter().filter(|&&b| b != 0).count()
}

#[test]
fn features_queues_and_config_follow_the_configuration() {
    let b = Balloon::new(config(0, false)).unwrap();
    assert_eq!(b.queue_max_sizes().len(), 2);
    assert_ne!(b.avail_features() & (1 << F_DEFLATE_ON_OOM), 0);
    assert_eq!(b.avail_features() & (1 << F_STATS_VQ | 1 << F_REPORTING), 0);
    let mut b = Balloon::new(config(5, true)).unwrap();
    assert_eq!(b.queue_max_sizes().len(), 4);
    let mut cfg = [0u8; 8];
    b.read_config(0, &mut cfg);
    assert_eq!(cfg, [0, 2, 0, 0, 0, 0, 0, 0], "num_pages 512, actual 0");
    b.write_config(4, &100u32.to_le_bytes());
    assert_eq!(b.actual_pages(), 100);
    b.write_config(0, &7u32.to_le_bytes());
    assert_eq!(b.target_pages(), 512, "the driver cannot write num_pages");
    assert!(b.set_target_mib(64).unwrap());
    assert!(!b.set_target_mib(64).unwrap());
    assert_eq!(b.target_pages(), 64 * 256);
    assert_eq!(b.set_target_mib(u32::MAX), Err(Error::TooLarge(u32::MAX)));
    assert_eq!(b.set_stats_interval(0), Err(Error::StatsToggle(true)));
    b.set_stats_interval(9).unwrap();
    assert_eq!(b.config().stats_polling_interval_s, 9);
    let mut off = Balloon::new(config(0, false)).unwrap();
    assert_eq!(
        off.set_stats_interval(3).unwrap_err().to_string(),
        "statistics were disabled when the balloon was configured and cannot be enabled after boot"
    );
}

#[test]
fn inflated_pages_are_given_back_and_bad_frames_refused() {
    let m = mem();
    let vqs = queues(&m, 2);
    let mut b = Balloon::new(config(0, false)).unwrap();
    let irqs = activate(&mut b, &m, &vqs);
    // Frames 0x200-0x203 and 0x300 (written first), one far outside memory.
    fill(&m, 0x20_0000, 4 * 4096);
    fill(&m, 0x30_0000, 4096);
    let pfns: Vec<u8> = [0x200u32, 0x201, 0x202, 0x203, 0x300, 0xfff_fff0]
        .iter()
        .flat_map(|p| p.to_le_bytes())
        .collect();
    m.write_slice(&pfns, GuestAddress(0x10_0000)).unwrap();
    vqs[0]
        .add_desc_chains(&[desc(0x10_0000, 24, 0)], 0)
        .unwrap();
    b.process_queue(0);
    assert_eq!(
        nonzero(&m, 0x20_0000, 4 * 4096),
        0,
        "inflated pages read as zeros"
    );
    assert_eq!(nonzero(&m, 0x30_0000, 4096), 0);
    assert_eq!(nonzero(&m, 0x20_4000, 4096), 0, "nothing else was written");
    let c = b.counters();
    assert_eq!(
        (c.inflated_pages, c.discarded_bytes, c.refused),
        (6, 5 * 4096, 1)
    );
    assert_eq!(vqs[0].used().idx().load(), 1);
    assert_eq!(irqs.count(), 1);
    // Deflate counts; a chain with no readable bytes completes all the same.
    m.write_slice(&0x200u32.to_le_bytes(), GuestAddress(0x10_1000))
        .unwrap();
    vqs[1]
        .add_desc_chains(&[desc(0x10_1000, 4, 0), desc(0x10_2000, 16, WRITE)], 0)
        .unwrap();
    b.process_queue(1);
    b.process_queue(7);
    assert_eq!(b.counters().deflated_pages, 1);
    assert_eq!(vqs[1].used().idx().load(), 2);
}

#[test]
fn reported_free_pages_are_given_back() {
    let m = mem();
    let vqs = queues(&m, 3);
    let mut b = Balloon::new(config(0, true)).unwrap();
    activate(&mut b, &m, &vqs);
    fill(&m, 0x40_0000, 0x20_0000);
    vqs[2]
        .add_desc_chains(
            &[
                desc(0x40_0000, 0x10_0000, WRITE | 1),
                desc(0x50_0000, 0x10_0000, WRITE),
            ],
            0,
        )
        .unwrap();
    // Chain the two descriptors: the mock leaves `next` 0, set it to 1.
    let d0 = Descriptor::new(0x40_0000, 0x10_0000, WRITE | 1, 1);
    vqs[2]
        .desc_table()
        .store(0, RawDescriptor::from(d0))
        .unwrap();
    b.process_queue(2);
    assert_eq!(nonzero(&m, 0x40_0000, 0x20_0000), 0);
    let c = b.counters();
    assert_eq!(
        (c.reported_bytes, c.discarded_bytes),
        (0x20_0000, 0x20_0000)
    );
    // A range past guest memory is refused, counted, and the chain completes.
    vqs[2]
        .add_desc_chains(&[desc(MEM as u64 - 4096, 0x2000, WRITE)], 2)
        .unwrap();
    b.process_queue(2);
    assert_eq!(b.counters().refused, 1);
    assert_eq!(vqs[2].used().idx().load(), 2);
}

#[test]
fn statistics_are_kept_and_the_buffer_returned_each_poll() {
    let m = mem();
    let vqs = queues(&m, 3);
    let mut b = Balloon::new(config(1, false)).unwrap();
    activate(&mut b, &m, &vqs);
    let mut buf = Vec::new();
    for (tag, v) in [(4u16, 1000u64), (5, 4096), (99, 7)] {
        buf.extend_from_slice(&tag.to_le_bytes());
        buf.extend_from_slice(&v.to_le_bytes());
    }
    m.write_slice(&buf, GuestAddress(0x10_0000)).unwrap();
    vqs[2]
        .add_desc_chains(&[desc(0x10_0000, 30, 0)], 0)
        .unwrap();
    b.process_queue(2);
    let (s, _) = b.stats().unwrap();
    assert_eq!(s.get(StatTag::FreeMemory), Some(1000));
    assert_eq!(s.get(StatTag::TotalMemory), Some(4096));
    assert_eq!(s.iter().count(), 2, "the unknown tag is skipped");
    // Held until the timer fires (1 s).
    assert_eq!(vqs[2].used().idx().load(), 0);
    let t = Instant::now();
    assert!(timer_fires(&b), "the statistics timer fired");
    assert_eq!(b.process_backend(), BackendInterest::Keep);
    assert!(t.elapsed() >= Duration::from_millis(900));
    assert_eq!(vqs[2].used().idx().load(), 1, "the buffer went back");
    // A short buffer is refused, not parsed.
    vqs[2].add_desc_chains(&[desc(0x10_0000, 7, 0)], 1).unwrap();
    b.process_queue(2);
    assert_eq!(b.counters().refused, 1);
    assert_eq!(b.counters().stats_updates, 1);
}

#[test]
fn a_driver_without_the_optional_queues_activates_with_two() {
    let m = mem();
    let vqs = queues(&m, 2);
    let mut b = Balloon::new(config(1, true)).unwrap();
    let irqs = Arc::new(Irqs::default());
    b.activate(ActivateContext {
        mem: m.clone(),
        interrupt: irqs.clone(),
        queues: vqs.iter().map(|q| q.create_queue().unwrap()).collect(),
        acked_features: 1 << virtio_bindings::virtio_config::VIRTIO_F_VERSION_1,
    })
    .unwrap();
    assert!(b.is_activated());
    b.reset();
    assert!(!b.is_activated());
    let e = b
        .activate(ActivateContext {
            mem: m.clone(),
            interrupt: irqs,
            queues: vqs.iter().map(|q| q.create_queue().unwrap()).collect(),
            acked_features: b.avail_features(),
        })
        .unwrap_err();
    assert!(e.to_string().contains("expected 4 queues"), "{e}");
    assert_eq!(m.num_regions(), 1);
}

#[test]
fn a_restored_balloon_keeps_its_size_and_returns_the_held_statistics_buffer() {
    let m = mem();
    let vqs = queues(&m, 3);
    let mut b = Balloon::new(config(1, false)).unwrap();
    activate(&mut b, &m, &vqs);
    b.write_config(4, &300u32.to_le_bytes());
    b.set_target_mib(3).unwrap();
    vqs[2]
        .add_desc_chains(&[desc(0x10_0000, 20, 0)], 0)
        .unwrap();
    b.process_queue(2);
    let saved = b.state();
    assert_eq!(saved.actual_pages, 300);
    assert_eq!(saved.stats_head, Some(0), "the device held the buffer");
    assert_eq!(saved.config.amount_mib, 3);
    // Plain data: it goes through serde and back.
    let text = serde_json::to_string(&saved).unwrap();
    let back: BalloonState = serde_json::from_str(&text).unwrap();
    assert_eq!(back, saved);

    // A device made from another configuration refuses it, unchanged.
    let mut other = Balloon::new(config(0, false)).unwrap();
    let e = other.restore_state(&back).unwrap_err();
    assert!(e.to_string().contains("balloon state: saved with"), "{e}");
    assert_eq!(other.state().actual_pages, 0);
    let mut bad = back;
    bad.stats_head = Some(u16::MAX);
    let mut fresh = Balloon::new(config(1, false)).unwrap();
    assert!(fresh.restore_state(&bad).is_err());

    // The same configuration (target 2, saved 3): the saved one wins, and
    // the held buffer goes back to the guest at the next interval.
    let mut r = Balloon::new(config(1, false)).unwrap();
    r.restore_state(&back).unwrap();
    let mut cfg = [0u8; 8];
    r.read_config(0, &mut cfg);
    assert_eq!(u32::from_le_bytes(cfg[0..4].try_into().unwrap()), 3 * 256);
    assert_eq!(u32::from_le_bytes(cfg[4..8].try_into().unwrap()), 300);
    let m2 = mem();
    let vqs2 = queues(&m2, 3);
    activate(&mut r, &m2, &vqs2);
    assert_eq!(r.state().stats_head, Some(0));
    assert!(timer_fires(&r), "the statistics timer fired");
    r.process_backend();
    assert_eq!(vqs2[2].used().idx().load(), 1, "the held buffer went back");
    assert_eq!(r.state().stats_head, None);
}
