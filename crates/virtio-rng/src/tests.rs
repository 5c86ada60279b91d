// Test values are small: casts of lengths and indices cannot truncate.
#![allow(clippy::cast_possible_truncation)]

use virtio_queue::desc::{split::Descriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;

use super::*;

const WRITE: u16 = 2;

use ember_virtio::CountingInterrupt as Irqs;

fn used(m: &GuestMemoryMmap, vq: &MockSplitQueue<'_, GuestMemoryMmap>) -> Vec<(u32, u32)> {
    let at = vq.used_addr();
    let idx: u16 = m.read_obj(at.unchecked_add(2)).unwrap();
    (0..u64::from(idx))
        .map(|i| {
            let e = at.unchecked_add(4 + 8 * i);
            (
                m.read_obj(e).unwrap(),
                m.read_obj(e.unchecked_add(4)).unwrap(),
            )
        })
        .collect()
}

use vm_memory::Address;

#[test]
fn requests_get_random_bytes_and_bad_ones_are_completed_empty() {
    let m = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 4 << 20)]).unwrap();
    let vq = MockSplitQueue::create(&m, GuestAddress(0), 16);
    let chains = [
        // Two descriptors of one request: 64 + 4032 bytes.
        RawDescriptor::from(Descriptor::new(0x10_0000, 64, WRITE | 1, 1)),
        RawDescriptor::from(Descriptor::new(0x10_1000, 4032, WRITE, 0)),
        // Device-readable: refused.
        RawDescriptor::from(Descriptor::new(0x11_0000, 64, 0, 0)),
        // Outside guest memory.
        RawDescriptor::from(Descriptor::new(0x100_0000, 64, WRITE, 0)),
        // Larger than a request gets.
        RawDescriptor::from(Descriptor::new(0x20_0000, 100_000, WRITE, 0)),
    ];
    vq.add_desc_chains(&chains, 0).unwrap();
    let mut rng = Rng::new(&EntropyConfig::default()).unwrap();
    assert!(rng.backend_fd().is_none());
    let irqs = Arc::new(Irqs::default());
    rng.activate(ActivateContext {
        mem: m.clone(),
        interrupt: irqs.clone(),
        queues: vec![vq.create_queue().unwrap()],
        acked_features: rng.avail_features(),
    })
    .unwrap();
    assert_eq!(
        used(&m, &vq),
        vec![(0, 4096), (2, 0), (3, 0), (4, MAX_REQUEST as u32)]
    );
    let mut a = vec![0u8; 4096];
    m.read_slice(&mut a, GuestAddress(0x10_0000)).unwrap();
    let mut b = vec![0u8; 4032];
    m.read_slice(&mut b, GuestAddress(0x10_1000)).unwrap();
    a[64..].copy_from_slice(&b);
    let distinct = a.iter().collect::<std::collections::HashSet<_>>().len();
    assert!(
        distinct > 200,
        "4 KiB of random bytes take most values ({distinct})"
    );
    let c = rng.counters();
    assert_eq!(
        (c.requests, c.bytes, c.bad_requests),
        (4, 4096 + MAX_REQUEST as u64, 2)
    );
    assert!(irqs.count() >= 1);
}

#[test]
fn the_rate_limiter_holds_requests_until_its_timer_fires() {
    let m = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 4 << 20)]).unwrap();
    let vq = MockSplitQueue::create(&m, GuestAddress(0), 16);
    let chains: Vec<_> = (0..4u64)
        .map(|i| RawDescriptor::from(Descriptor::new(0x10_0000 + i * 0x1000, 1024, WRITE, 0)))
        .collect();
    vq.add_desc_chains(&chains, 0).unwrap();
    // 2 KiB every 100 ms: two requests now, the others after refills.
    let config = EntropyConfig {
        rate_limiter: Some("bw=2K/100ms".parse().unwrap()),
    };
    let mut rng = Rng::new(&config).unwrap();
    let fd = rng.backend_fd().expect("the limiter's timer");
    rng.activate(ActivateContext {
        mem: m.clone(),
        interrupt: Arc::new(Irqs::default()),
        queues: vec![vq.create_queue().unwrap()],
        acked_features: rng.avail_features(),
    })
    .unwrap();
    assert_eq!(used(&m, &vq).len(), 2);
    assert!(rng.counters().throttled >= 1);
    let t0 = std::time::Instant::now();
    while used(&m, &vq).len() < 4 {
        let mut pfd = [libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        }];
        // SAFETY: poll(2) on one valid descriptor in a local array.
        #[allow(unsafe_code)]
        let n = unsafe { libc::poll(pfd.as_mut_ptr(), 1, 2000) };
        assert_eq!(n, 1, "the limiter's timer fires");
        rng.process_backend();
    }
    assert!(t0.elapsed() >= std::time::Duration::from_millis(80));
    let state = rng.state();
    assert!(state.rate_limiter.is_some());
    let mut plain = Rng::new(&EntropyConfig::default()).unwrap();
    assert!(plain.restore_state(&state).is_err());
    rng.restore_state(&state).unwrap();
}
