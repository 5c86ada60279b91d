//! The `virtio_balloon` target: a virtio-balloon driven by a guest that
//! sets its queues up from the input, fills guest memory from it (page
//! frame arrays, statistics buffers, reported ranges) and then notifies
//! queues, polls statistics, changes the target and writes config space in
//! the input's order. Guest memory here is a copy of the input, so the
//! device's page discards act on it and nothing else.

use std::sync::Arc;

use arbitrary::Arbitrary;
use ember_virtio::{ActivateContext, VirtioDevice};
use ember_virtio_balloon::{Balloon, BalloonConfig};

use crate::guest::{guest_memory, init_logging, negotiated, Irq, QueueSetup};
use crate::input::Input;

/// How the balloon is configured and which features the driver takes.
#[derive(Arbitrary, Clone, Copy, Debug, Default)]
struct Header {
    amount_mib: u16,
    deflate_on_oom: bool,
    stats_interval_s: u8,
    free_page_reporting: bool,
    acked: u64,
    queues: [QueueSetup; 4],
}

/// The `virtio_balloon` target.
pub fn virtio_balloon(data: &[u8]) {
    init_logging();
    let mut input = Input::new(data);
    let header: Header = input.read();
    let mut ops = input.section();
    let mem = guest_memory(input.rest());
    let Ok(mut dev) = Balloon::new(BalloonConfig {
        amount_mib: u32::from(header.amount_mib),
        deflate_on_oom: header.deflate_on_oom,
        stats_polling_interval_s: u16::from(header.stats_interval_s % 4),
        free_page_reporting: header.free_page_reporting,
    }) else {
        return;
    };
    let acked = negotiated(header.acked, dev.avail_features());
    let wanted = 2
        + usize::from(acked & (1 << ember_virtio_balloon::F_STATS_VQ) != 0)
        + usize::from(acked & (1 << ember_virtio_balloon::F_REPORTING) != 0);
    let queues: Option<Vec<_>> = header.queues[..wanted]
        .iter()
        .map(|q| q.queue(ember_virtio_balloon::QUEUE_SIZE, &mem, false))
        .collect();
    let Some(queues) = queues else {
        return;
    };
    if dev
        .activate(ActivateContext {
            mem: mem.clone(),
            interrupt: Arc::new(Irq::default()),
            queues,
            acked_features: acked,
        })
        .is_err()
    {
        return;
    }
    if ops.is_empty() {
        for q in 0..wanted {
            dev.process_queue(q);
        }
    }
    while !ops.is_empty() {
        match ops.u8() % 6 {
            0..=1 => dev.process_queue(usize::from(ops.u8() % 5)),
            2 => {
                // The statistics timer fired (the device reads it without
                // waiting: a timerfd that did not fire reads nothing).
                dev.process_backend();
            }
            3 => {
                let _ = dev.set_target_mib(u32::from(ops.u16()));
            }
            4 => {
                let v = ops.u32().to_le_bytes();
                dev.write_config(u64::from(ops.u8() % 20), &v[..usize::from(ops.u8() % 5)]);
            }
            _ => {
                let mut b = [0u8; 8];
                dev.read_config(u64::from(ops.u8()), &mut b[..usize::from(ops.u8() % 9)]);
            }
        }
    }
    let c = dev.counters();
    // Never more given back than the guest has.
    assert!(c.discarded_bytes <= c.reported_bytes + c.inflated_pages * 4096);
}
