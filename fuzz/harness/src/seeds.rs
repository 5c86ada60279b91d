//! The hand-made seed corpus: for each target, a few inputs that each reach
//! a different path (a read, a write, an indirect table, a loop, a driver
//! setup, a BAR sizing, ...), so the fuzzer starts from inputs that mean
//! something. `cargo run -p ember-fuzz-harness --example write_seeds`
//! writes them to `fuzz/corpus/<target>/`; the tests below check that each
//! does what its name says. The `api_request` seeds (raw HTTP) are built in
//! `crate::api`, next to their target, and listed here with the others.

use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_WRITE_ZEROES,
};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_net::{
    VIRTIO_NET_F_CTRL_VQ, VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_TSO4, VIRTIO_NET_F_MRG_RXBUF,
};

use crate::blk::{self, ChainDesc, DESC_INDIRECT, DESC_JUMP, DESC_WRITE};
use crate::guest::{HIGH_BASE, LOW_SIZE};
use crate::input::Seed;
use crate::net::{NetOp, FLAG_OFFLOADS, RX_OPS, TX_OPS};
use crate::{legacy, pci, transport};

/// Descriptor flags.
const NEXT: u16 = 1;
const WRITE: u16 = 2;
const INDIRECT: u16 = 4;

/// Where the seeds put a queue of 16: table, available ring, used ring.
const DESC: u64 = 0x0;
const AVAIL: u64 = 0x100;
const USED: u64 = 0x200;
/// The transmit queue of the net seeds.
const TX_DESC: u64 = 0x400;
const TX_AVAIL: u64 = 0x500;
const TX_USED: u64 = 0x600;
/// Block requests: header, status, discard segments, data, indirect table.
const HDR: u64 = 0x1000;
const SEGMENT: u64 = 0x1100;
const STATUS: u64 = 0x1800;
const DATA: u64 = 0x2000;
const TABLE: u64 = 0x3000;

/// A guest memory image, from address 0.
#[derive(Clone, Debug, Default)]
pub struct Image(Vec<u8>);

impl Image {
    /// An empty image.
    pub fn new() -> Self {
        Image::default()
    }

    /// Writes `bytes` at `addr`, growing the image.
    pub fn put(&mut self, addr: u64, bytes: &[u8]) -> &mut Self {
        let at = usize::try_from(addr).unwrap_or(usize::MAX);
        let end = at.saturating_add(bytes.len());
        if self.0.len() < end {
            self.0.resize(end, 0);
        }
        self.0[at..end].copy_from_slice(bytes);
        self
    }

    /// Makes the image reach `end` (rings the device writes).
    pub fn reach(&mut self, end: u64) -> &mut Self {
        let end = usize::try_from(end).unwrap_or(0);
        if self.0.len() < end {
            self.0.resize(end, 0);
        }
        self
    }

    /// Writes descriptor `i` of the table at `table`.
    pub fn desc(&mut self, table: u64, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let mut d = [0u8; 16];
        d[..8].copy_from_slice(&addr.to_le_bytes());
        d[8..12].copy_from_slice(&len.to_le_bytes());
        d[12..14].copy_from_slice(&flags.to_le_bytes());
        d[14..].copy_from_slice(&next.to_le_bytes());
        self.put(table + 16 * u64::from(i), &d);
    }

    /// Chains `parts` (address, length, flags without NEXT) as descriptors
    /// `first..` of the table at `table`.
    pub fn chain(&mut self, table: u64, first: u16, parts: &[(u64, u32, u16)]) {
        for (k, &(addr, len, flags)) in parts.iter().enumerate() {
            let i = first + u16::try_from(k).unwrap_or(0);
            if k + 1 < parts.len() {
                self.desc(table, i, addr, len, flags | NEXT, i + 1);
            } else {
                self.desc(table, i, addr, len, flags, 0);
            }
        }
    }

    /// The available ring at `ring` with `heads`, index = their number.
    pub fn avail(&mut self, ring: u64, heads: &[u16]) {
        let idx = u16::try_from(heads.len()).unwrap_or(0);
        self.put(ring, &[0, 0]);
        self.put(ring + 2, &idx.to_le_bytes());
        for (k, h) in heads.iter().enumerate() {
            self.put(ring + 4 + 2 * k as u64, &h.to_le_bytes());
        }
    }

    /// A block request header at `addr`.
    pub fn blk_header(&mut self, addr: u64, request_type: u32, sector: u64) {
        let mut h = [0u8; 16];
        h[..4].copy_from_slice(&request_type.to_le_bytes());
        h[8..].copy_from_slice(&sector.to_le_bytes());
        self.put(addr, &h);
    }

    /// The bytes.
    pub fn bytes(&self) -> &[u8] {
        &self.0
    }
}

/// A guest address of the seeds' images as the u32 a `Poke` takes.
fn addr32(addr: u64) -> u32 {
    u32::try_from(addr).unwrap_or(u32::MAX)
}

fn queue_setup(s: &mut Seed, size: u16, desc: u64, avail: u64, used: u64) {
    s.u16(size).u64(desc).u64(avail).u64(used);
}

/// A named seed.
pub type NamedSeed = (&'static str, Vec<u8>);

// ---------------------------------------------------------------- blk ---

/// A `virtio_blk_request` input: header fields, operations, image.
fn blk_input(flags: u8, disk_bytes: u32, ops: &Seed, img: &Image) -> Vec<u8> {
    let mut s = Seed::new();
    s.u8(flags).u64(0).u32(disk_bytes).u8(8);
    queue_setup(&mut s, 16, DESC, AVAIL, USED);
    let mut img = img.clone();
    s.section(ops).raw(img.reach(USED + 0x100).bytes());
    s.into_bytes()
}

/// An image with one request: header, then `middle` descriptors, then the
/// status byte.
fn blk_one(request_type: u32, sector: u64, middle: &[(u64, u32, u16)]) -> Image {
    let mut img = Image::new();
    img.blk_header(HDR, request_type, sector);
    let mut parts = vec![(HDR, 16, 0)];
    parts.extend_from_slice(middle);
    parts.push((STATUS, 1, WRITE));
    img.chain(DESC, 0, &parts);
    img.avail(AVAIL, &[0]);
    img
}

fn segment(img: &mut Image, sector: u64, num: u32, flags: u32) {
    let mut seg = [0u8; 16];
    seg[..8].copy_from_slice(&sector.to_le_bytes());
    seg[8..12].copy_from_slice(&num.to_le_bytes());
    seg[12..].copy_from_slice(&flags.to_le_bytes());
    img.put(SEGMENT, &seg);
}

fn blk_seeds() -> Vec<NamedSeed> {
    let none = Seed::new();
    let disk = 0x1_0000;
    let mut v = Vec::new();
    v.push((
        "read",
        blk_input(
            0,
            disk,
            &none,
            &blk_one(VIRTIO_BLK_T_IN, 4, &[(DATA, 1024, WRITE)]),
        ),
    ));
    let mut w = blk_one(VIRTIO_BLK_T_OUT, 1, &[(DATA, 512, 0)]);
    w.put(DATA, &[0xab; 512]);
    v.push(("write", blk_input(0, disk, &none, &w)));
    v.push((
        "write_read_only",
        blk_input(blk::FLAG_READ_ONLY, disk, &none, &w),
    ));
    v.push((
        "flush",
        blk_input(0, disk, &none, &blk_one(VIRTIO_BLK_T_FLUSH, 0, &[])),
    ));
    v.push((
        "get_id",
        blk_input(
            0,
            disk,
            &none,
            &blk_one(VIRTIO_BLK_T_GET_ID, 0, &[(DATA, 20, WRITE)]),
        ),
    ));
    let mut d = blk_one(VIRTIO_BLK_T_DISCARD, 0, &[(SEGMENT, 16, 0)]);
    segment(&mut d, 2, 4, 0);
    v.push(("discard", blk_input(0, disk, &none, &d)));
    v.push((
        "discard_raw_file",
        blk_input(blk::FLAG_RAW_FILE, disk, &none, &d),
    ));
    let mut z = blk_one(VIRTIO_BLK_T_WRITE_ZEROES, 0, &[(SEGMENT, 16, 0)]);
    segment(&mut z, 8, 16, 1);
    v.push((
        "write_zeroes_raw_file",
        blk_input(blk::FLAG_RAW_FILE, disk, &none, &z),
    ));
    v.push((
        "unsupported",
        blk_input(0, disk, &none, &blk_one(99, 0, &[])),
    ));
    // Any layout: header and data in one descriptor, data and status in one.
    let mut a = Image::new();
    a.blk_header(DATA - 16, VIRTIO_BLK_T_OUT, 0);
    a.chain(DESC, 0, &[(DATA - 16, 16 + 512, 0), (STATUS, 1, WRITE)]);
    a.blk_header(HDR, VIRTIO_BLK_T_IN, 0);
    a.chain(DESC, 2, &[(HDR, 16, 0), (DATA, 513, WRITE)]);
    a.avail(AVAIL, &[0, 2]);
    v.push(("any_layout", blk_input(0, disk, &none, &a)));
    // An indirect table.
    let mut i = Image::new();
    i.blk_header(HDR, VIRTIO_BLK_T_IN, 0);
    i.chain(
        TABLE,
        0,
        &[(HDR, 16, 0), (DATA, 512, WRITE), (STATUS, 1, WRITE)],
    );
    i.desc(DESC, 0, TABLE, 48, INDIRECT, 0);
    i.avail(AVAIL, &[0]);
    v.push(("indirect", blk_input(0, disk, &none, &i)));
    // A descriptor that is its own next.
    let mut l = Image::new();
    l.blk_header(HDR, VIRTIO_BLK_T_IN, 0);
    l.desc(DESC, 0, HDR, 16, NEXT, 0);
    l.avail(AVAIL, &[0]);
    v.push(("loop", blk_input(0, disk, &none, &l)));
    // 64 KiB read into the high region; and one running into the hole.
    let big = blk_one(VIRTIO_BLK_T_IN, 0, &[(HIGH_BASE, 0x1_0000, WRITE)]);
    v.push(("read_high_region", blk_input(0, 0x2_0000, &none, &big)));
    let hole = blk_one(VIRTIO_BLK_T_IN, 0, &[(LOW_SIZE as u64 - 512, 1024, WRITE)]);
    v.push(("read_into_hole", blk_input(0, disk, &none, &hole)));
    // Two chains, a second notification after the driver publishes the
    // second, a reset, config reads.
    let mut two = blk_one(VIRTIO_BLK_T_IN, 0, &[(DATA, 512, WRITE)]);
    two.blk_header(HDR + 16, VIRTIO_BLK_T_FLUSH, 0);
    two.chain(DESC, 4, &[(HDR + 16, 16, 0), (STATUS + 1, 1, WRITE)]);
    two.put(AVAIL + 6, &4u16.to_le_bytes());
    let mut ops = Seed::new();
    ops.u8(blk::op::NOTIFY).u8(0);
    ops.u8(blk::op::POKE).u32(addr32(AVAIL + 2)).u8(2).u16(2);
    ops.u8(blk::op::NOTIFY).u8(0);
    ops.u8(blk::op::RESET);
    ops.u8(blk::op::NOTIFY).u8(0);
    ops.u8(blk::op::CONFIG).u8(0).u8(8);
    ops.u8(blk::op::NOTIFY).u8(1);
    v.push(("notify_poke_reset", blk_input(0, disk, &ops, &two)));
    v
}

fn chain_desc(s: &mut Seed, d: ChainDesc) {
    s.u8(d.place)
        .u32(d.offset)
        .u32(d.len)
        .u8(d.flags)
        .u16(d.next);
}

/// A `virtio_blk_chain` input.
fn blk_chain_input(
    flags: u8,
    request_type: u32,
    sector: u64,
    descs: &[ChainDesc],
    payload: &[u8],
) -> Vec<u8> {
    let mut s = Seed::new();
    s.u8(flags)
        .u32(0x1_0000)
        .u32(request_type)
        .u32(0)
        .u64(sector);
    s.u8(u8::try_from(descs.len()).unwrap_or(0));
    for d in descs {
        chain_desc(&mut s, *d);
    }
    s.raw(payload);
    s.into_bytes()
}

fn cd(place: u8, len: u32, flags: u8) -> ChainDesc {
    ChainDesc {
        place,
        offset: 0,
        len,
        flags,
        next: 0,
    }
}

fn blk_chain_seeds() -> Vec<NamedSeed> {
    let hdr = cd(0, 16, 0);
    let status = cd(2, 1, DESC_WRITE);
    let mut seg = [0u8; 16];
    seg[..8].copy_from_slice(&3u64.to_le_bytes());
    seg[8..12].copy_from_slice(&5u32.to_le_bytes());
    vec![
        (
            "read",
            blk_chain_input(
                0,
                VIRTIO_BLK_T_IN,
                2,
                &[hdr, cd(1, 1024, DESC_WRITE), status],
                &[],
            ),
        ),
        (
            "write",
            blk_chain_input(
                0,
                VIRTIO_BLK_T_OUT,
                0,
                &[hdr, cd(1, 512, 0), status],
                &[7; 512],
            ),
        ),
        (
            "discard",
            blk_chain_input(
                0,
                VIRTIO_BLK_T_DISCARD,
                0,
                &[hdr, cd(1, 16, 0), status],
                &seg,
            ),
        ),
        (
            "get_id_indirect",
            blk_chain_input(
                0,
                VIRTIO_BLK_T_GET_ID,
                0,
                &[hdr, cd(1, 20, DESC_WRITE | DESC_INDIRECT), status],
                &[],
            ),
        ),
        (
            "read_high",
            blk_chain_input(
                0,
                VIRTIO_BLK_T_IN,
                0,
                &[hdr, cd(3, 4096, DESC_WRITE), status],
                &[],
            ),
        ),
        (
            "loop",
            blk_chain_input(
                0,
                VIRTIO_BLK_T_IN,
                0,
                &[ChainDesc {
                    flags: DESC_JUMP,
                    ..hdr
                }],
                &[],
            ),
        ),
    ]
}

// ---------------------------------------------------------------- net ---

fn op_index(table: &[NetOp], op: NetOp) -> u8 {
    let i = table.iter().position(|o| *o == op).unwrap_or(0);
    u8::try_from(i).unwrap_or(0)
}

/// A net input: flags, acked features, both queues, operations, image.
fn net_input(flags: u8, acked: u64, ops: &Seed, img: &mut Image) -> Vec<u8> {
    let mut s = Seed::new();
    s.u8(flags).u64(acked);
    queue_setup(&mut s, 16, DESC, AVAIL, USED);
    queue_setup(&mut s, 16, TX_DESC, TX_AVAIL, TX_USED);
    s.section(ops).raw(img.reach(TX_USED + 0x100).bytes());
    s.into_bytes()
}

const VERSION_1: u64 = 1 << VIRTIO_F_VERSION_1;
const MRG: u64 = 1 << VIRTIO_NET_F_MRG_RXBUF;

/// Receive buffers: `n` chains of one `len`-byte writable descriptor.
fn rx_buffers(img: &mut Image, n: u16, len: u32) {
    let heads: Vec<u16> = (0..n).collect();
    for i in 0..n {
        img.desc(DESC, i, 0x4000 + u64::from(i) * 0x800, len, WRITE, 0);
    }
    img.avail(AVAIL, &heads);
}

/// An Ethernet-ish frame after the 12-byte header.
fn tx_frame(img: &mut Image, at: u64, payload: usize) {
    let mut f = vec![0u8; 12];
    f.extend((0..payload).map(|i| u8::try_from(i % 251).unwrap_or(0)));
    img.put(at, &f);
}

fn net_tx_seeds() -> Vec<NamedSeed> {
    let t = |op| op_index(TX_OPS, op);
    let mut notify = Seed::new();
    notify.u8(t(NetOp::NotifyTx));
    let mut v = Vec::new();

    let mut one = Image::new();
    tx_frame(&mut one, 0x1000, 60);
    one.desc(TX_DESC, 0, 0x1000, 72, 0, 0);
    one.avail(TX_AVAIL, &[0]);
    v.push(("one_descriptor", net_input(0, VERSION_1, &notify, &mut one)));

    let mut two = Image::new();
    tx_frame(&mut two, 0x1000, 1500);
    two.chain(TX_DESC, 0, &[(0x1000, 12, 0), (0x100c, 1500, 0)]);
    two.desc(TX_DESC, 2, 0x1000, 8, 0, 0); // shorter than the header
    two.avail(TX_AVAIL, &[0, 2]);
    v.push((
        "split_and_short",
        net_input(FLAG_OFFLOADS, VERSION_1, &notify, &mut two),
    ));

    let mut ind = Image::new();
    tx_frame(&mut ind, 0x1000, 100);
    ind.chain(TABLE, 0, &[(0x1000, 12, 0), (0x100c, 100, 0)]);
    ind.desc(TX_DESC, 0, TABLE, 32, INDIRECT, 0);
    ind.avail(TX_AVAIL, &[0]);
    v.push(("indirect", net_input(0, VERSION_1, &notify, &mut ind)));

    let mut long = Image::new();
    long.chain(TX_DESC, 0, &[(0, 0xf000, 0), (0, 0xf000, 0)]);
    long.desc(TX_DESC, 2, 0x1000, 72, WRITE, 0);
    long.avail(TX_AVAIL, &[0, 2]);
    v.push((
        "too_long_and_writable",
        net_input(0, VERSION_1, &notify, &mut long),
    ));

    let mut again = Image::new();
    tx_frame(&mut again, 0x1000, 60);
    again.desc(TX_DESC, 0, 0x1000, 72, 0, 0);
    again.desc(TX_DESC, 1, 0x1000, 72, 0, 0);
    again.avail(TX_AVAIL, &[0]);
    again.put(TX_AVAIL + 6, &1u16.to_le_bytes());
    let mut ops = Seed::new();
    ops.u8(t(NetOp::NotifyTx));
    ops.u8(t(NetOp::Poke))
        .u32(addr32(TX_AVAIL + 2))
        .u8(2)
        .u16(2);
    ops.u8(t(NetOp::NotifyTx)).u8(t(NetOp::Reset));
    ops.u8(t(NetOp::NotifyTx)).u8(t(NetOp::ClosePeer));
    ops.u8(t(NetOp::Poke))
        .u32(addr32(TX_AVAIL + 2))
        .u8(2)
        .u16(3);
    ops.u8(t(NetOp::NotifyTx));
    ops.u8(t(NetOp::Config)).u8(0).u8(8).u8(0);
    v.push((
        "poke_reset_close",
        net_input(0, VERSION_1, &ops, &mut again),
    ));
    v
}

/// A `Frame` operation of the receive table.
fn rx_frame(ops: &mut Seed, len: u16, big: bool, header: [u8; 12], seed: u8) {
    ops.u8(op_index(RX_OPS, NetOp::Frame))
        .u16(len)
        .u8(u8::from(big))
        .raw(&header)
        .u8(seed);
}

fn net_rx_seeds() -> Vec<NamedSeed> {
    let r = |op| op_index(RX_OPS, op);
    let mut v = Vec::new();

    let mut img = Image::new();
    rx_buffers(&mut img, 4, 2048);
    let mut ops = Seed::new();
    rx_frame(&mut ops, 60, false, [0; 12], 1);
    ops.u8(r(NetOp::Backend));
    v.push((
        "small_frame",
        net_input(0, VERSION_1, &ops, &mut img.clone()),
    ));

    let mut ops = Seed::new();
    rx_frame(&mut ops, 3000, false, [0; 12], 2);
    ops.u8(r(NetOp::Backend));
    let mut small = Image::new();
    rx_buffers(&mut small, 4, 1024);
    v.push((
        "merged_buffers",
        net_input(0, VERSION_1 | MRG, &ops, &mut small.clone()),
    ));
    v.push((
        "too_big_without_mrg",
        net_input(0, VERSION_1, &ops, &mut small),
    ));

    let mut ops = Seed::new();
    rx_frame(&mut ops, 5, false, [0; 12], 0);
    ops.u8(r(NetOp::Backend));
    rx_frame(&mut ops, 0, false, [0; 12], 0);
    ops.u8(r(NetOp::Backend));
    v.push((
        "short_then_closed",
        net_input(0, VERSION_1, &ops, &mut img.clone()),
    ));

    // Larger than every buffer of the queue together: dropped.
    let mut ops = Seed::new();
    rx_frame(&mut ops, u16::MAX, true, [0; 12], 3);
    ops.u8(r(NetOp::Backend));
    let mut full = Image::new();
    rx_buffers(&mut full, 16, 2048);
    v.push(("huge_frame", net_input(0, VERSION_1 | MRG, &ops, &mut full)));

    // No buffers at first: the frame waits; the driver adds one.
    let mut empty = img.clone();
    empty.put(AVAIL + 2, &0u16.to_le_bytes());
    let mut ops = Seed::new();
    rx_frame(&mut ops, 100, false, [0; 12], 4);
    ops.u8(r(NetOp::Backend));
    ops.u8(r(NetOp::Poke)).u32(addr32(AVAIL + 2)).u8(2).u16(1);
    ops.u8(r(NetOp::NotifyRx));
    ops.u8(r(NetOp::Reset)).u8(r(NetOp::NotifyRx));
    v.push((
        "no_buffers_then_one",
        net_input(0, VERSION_1, &ops, &mut empty),
    ));

    // Offloads negotiated: the header passes; and a frame to send too.
    let mut both = img.clone();
    tx_frame(&mut both, 0x1000, 60);
    both.desc(TX_DESC, 0, 0x1000, 72, 0, 0);
    both.avail(TX_AVAIL, &[0]);
    let mut ops = Seed::new();
    rx_frame(
        &mut ops,
        1514,
        false,
        [1, 4, 54, 0, 0xa8, 5, 34, 0, 16, 0, 0, 0],
        5,
    );
    ops.u8(r(NetOp::NotifyTx)).u8(r(NetOp::Backend));
    ops.u8(r(NetOp::ClosePeer)).u8(r(NetOp::Backend));
    let acked = VERSION_1 | MRG | 1 << VIRTIO_NET_F_GUEST_CSUM | 1 << VIRTIO_NET_F_GUEST_TSO4;
    v.push((
        "offloads_and_tx",
        net_input(FLAG_OFFLOADS, acked, &ops, &mut both),
    ));
    v
}

// -------------------------------------------------------------- queue ---

fn queue_input(flags: u8, capacity: u64, size: u16, img: &mut Image) -> Vec<u8> {
    let mut s = Seed::new();
    s.u8(flags).u64(capacity);
    queue_setup(&mut s, size, DESC, AVAIL, USED);
    s.raw(img.reach(USED + 0x100).bytes());
    s.into_bytes()
}

fn queue_seeds() -> Vec<NamedSeed> {
    let mut v = Vec::new();
    v.push((
        "read",
        queue_input(
            0,
            128,
            16,
            &mut blk_one(VIRTIO_BLK_T_IN, 4, &[(DATA, 1024, WRITE)]),
        ),
    ));
    let mut d = blk_one(VIRTIO_BLK_T_WRITE_ZEROES, 0, &[(SEGMENT, 16, 0)]);
    segment(&mut d, 2, 4, 1);
    v.push(("write_zeroes_event_idx", queue_input(1, 128, 16, &mut d)));
    // Indirect table whose last entry chains on to a second table (not
    // allowed), and a loop through the main table.
    let mut i = Image::new();
    i.blk_header(HDR, VIRTIO_BLK_T_IN, 0);
    i.chain(TABLE, 0, &[(HDR, 16, 0), (DATA, 512, WRITE)]);
    i.desc(TABLE, 2, TABLE, 48, INDIRECT, 0);
    i.desc(TABLE, 1, DATA, 512, WRITE | NEXT, 2);
    i.desc(DESC, 0, TABLE, 48, INDIRECT, 0);
    i.desc(DESC, 1, HDR, 16, NEXT, 2);
    i.desc(DESC, 2, DATA, 16, NEXT | WRITE, 1);
    i.avail(AVAIL, &[0, 1]);
    v.push(("nested_indirect_and_loop", queue_input(2, 128, 16, &mut i)));
    // Huge lengths and an index past the table.
    let mut h = Image::new();
    h.desc(DESC, 0, 0, u32::MAX, NEXT, 1);
    h.desc(DESC, 1, 0, u32::MAX, WRITE | NEXT, 300);
    h.avail(AVAIL, &[0, 40]);
    v.push((
        "huge_and_out_of_range",
        queue_input(0, u64::MAX, 16, &mut h),
    ));
    // A big queue: 1024 entries (the rings move accordingly).
    let mut b = blk_one(VIRTIO_BLK_T_FLUSH, 0, &[]);
    let mut s = Seed::new();
    s.u8(0).u64(0);
    queue_setup(&mut s, 1024, 0x4000, AVAIL, 0x8000);
    b.chain(0x4000, 0, &[(HDR, 16, 0), (STATUS, 1, WRITE)]);
    b.reach(0x8000 + 8 * 1024 + 6);
    s.raw(b.bytes());
    v.push(("queue_of_1024", s.into_bytes()));
    v
}

// ---------------------------------------------------------- transport ---

fn mmio_write(ops: &mut Seed, region: u8, offset: u16, width: u8, value: u64) {
    ops.u8(transport::op::MMIO_WRITE)
        .u8(region)
        .u16(offset)
        .u8(width)
        .u64(value);
}

fn mmio_read(ops: &mut Seed, region: u8, offset: u16, width: u8) {
    ops.u8(transport::op::MMIO_READ)
        .u8(region)
        .u16(offset)
        .u8(width);
}

/// Width codes of `guest::access`.
const W1: u8 = 0;
const W2: u8 = 1;
const W4: u8 = 2;
const W8: u8 = 3;

fn transport_seeds() -> Vec<NamedSeed> {
    use transport::op;
    let mut v = Vec::new();

    // virtio-blk: the driver's setup, a read, the interrupt, a reset, again.
    let mut ops = Seed::new();
    let init = |ops: &mut Seed| {
        ops.u8(op::DRIVER_INIT).u64(VERSION_1);
        queue_setup(ops, 16, DESC, AVAIL, USED);
        ops.u16(1);
    };
    init(&mut ops);
    mmio_write(&mut ops, 3, 0, W2, 0);
    ops.u8(op::EVENT_LOOP);
    mmio_read(&mut ops, 1, 0, W1);
    mmio_read(&mut ops, 0, 0x14, W1);
    ops.u8(op::RESET);
    init(&mut ops);
    mmio_write(&mut ops, 3, 0, W2, 0);
    ops.u8(op::EVENT_LOOP);
    let mut s = Seed::new();
    s.u8(0).section(&ops);
    let mut img = blk_one(VIRTIO_BLK_T_IN, 0, &[(DATA, 512, WRITE)]);
    s.raw(img.reach(USED + 0x100).bytes());
    v.push(("blk_setup_read_reset", s.into_bytes()));

    // Every register of every region, read at every width; the PCI header.
    let mut ops = Seed::new();
    for region in 0..6u8 {
        for offset in (0..0x40u16).step_by(2) {
            mmio_read(
                &mut ops,
                region,
                offset,
                [W1, W2, W4, W8][usize::from(offset / 2 % 4)],
            );
        }
    }
    for register in (0..0x80u8).step_by(4) {
        ops.u8(op::CONFIG_READ).u8(register).u8(W4);
    }
    let mut s = Seed::new();
    s.u8(0).section(&ops);
    v.push(("blk_read_everything", s.into_bytes()));

    // A driver that breaks the rules: DRIVER_OK first, features without
    // VERSION_1, a queue outside memory, changes after DRIVER_OK, odd
    // widths, a notify for a queue that does not exist.
    let mut ops = Seed::new();
    mmio_write(&mut ops, 0, 0x14, W1, 4);
    mmio_write(&mut ops, 0, 0x14, W1, 3);
    mmio_write(&mut ops, 0, 0x0c, W4, 1 << 5);
    mmio_write(&mut ops, 0, 0x14, W1, 11);
    ops.u8(op::RESET);
    ops.u8(op::DRIVER_INIT).u64(VERSION_1);
    queue_setup(&mut ops, 16, DESC, AVAIL, 0x10_0000_0000);
    ops.u16(0xffff);
    mmio_write(&mut ops, 0, 0x18, W2, 8);
    mmio_write(&mut ops, 0, 0x20, 0x83, 0x1234_5678);
    mmio_write(&mut ops, 3, 8, W2, 0);
    mmio_write(&mut ops, 6, 0x7ffe, W8, u64::MAX);
    ops.u8(op::EVENT_LOOP);
    let mut s = Seed::new();
    s.u8(transport::FLAG_MSI_FAILS).section(&ops);
    v.push(("blk_misbehaving_driver", s.into_bytes()));

    // virtio-net: setup with both queues, send a frame, receive one.
    let mut ops = Seed::new();
    ops.u8(op::DRIVER_INIT)
        .u64(VERSION_1 | MRG | (1 << VIRTIO_NET_F_CTRL_VQ));
    queue_setup(&mut ops, 16, DESC, AVAIL, USED);
    ops.u16(1);
    queue_setup(&mut ops, 16, TX_DESC, TX_AVAIL, TX_USED);
    ops.u16(2);
    // The control queue (the driver always sets it up).
    queue_setup(&mut ops, 16, 0x800, 0x900, 0xa00);
    ops.u16(3);
    mmio_write(&mut ops, 3, 4, W2, 1);
    ops.u8(op::EVENT_LOOP);
    ops.u8(op::FRAME).u16(80).u8(0);
    ops.u8(op::EVENT_LOOP);
    mmio_write(&mut ops, 3, 0, W2, 0);
    ops.u8(op::EVENT_LOOP);
    mmio_read(&mut ops, 2, 0, W8);
    let mut img = Image::new();
    rx_buffers(&mut img, 4, 2048);
    tx_frame(&mut img, 0x1000, 60);
    img.desc(TX_DESC, 0, 0x1000, 72, 0, 0);
    img.avail(TX_AVAIL, &[0]);
    let mut s = Seed::new();
    s.u8(transport::FLAG_NET).section(&ops);
    s.raw(img.reach(TX_USED + 0x100).bytes());
    v.push(("net_setup_tx_rx", s.into_bytes()));
    v
}

// --------------------------------------------------------------- mmio ---

fn mmio_seeds() -> Vec<NamedSeed> {
    use crate::mmio::{op, reg, FLAG_NET};
    let w = |ops: &mut Seed, offset: u64, width: u8, value: u64| {
        ops.u8(op::WRITE)
            .u16(u16::try_from(offset).unwrap_or(0))
            .u8(width)
            .u64(value);
    };
    let mut v = Vec::new();

    // virtio-blk: the driver's setup, a read notified, the interrupt, a
    // reset, again.
    let mut ops = Seed::new();
    let init = |ops: &mut Seed| {
        ops.u8(op::DRIVER_INIT).u64(VERSION_1);
        queue_setup(ops, 16, DESC, AVAIL, USED);
    };
    init(&mut ops);
    w(&mut ops, reg::QUEUE_NOTIFY, W4, 0);
    ops.u8(op::EVENT_LOOP);
    ops.u8(op::RESET);
    init(&mut ops);
    w(&mut ops, reg::QUEUE_NOTIFY, W4, 0);
    ops.u8(op::EVENT_LOOP);
    let mut s = Seed::new();
    s.u8(0).section(&ops);
    let mut img = blk_one(VIRTIO_BLK_T_IN, 0, &[(DATA, 512, WRITE)]);
    s.raw(img.reach(USED + 0x100).bytes());
    v.push(("blk_setup_read_reset", s.into_bytes()));

    // Every register and the start of the configuration at every width.
    let mut ops = Seed::new();
    for offset in (0..0x140u16).step_by(2) {
        ops.u8(op::READ)
            .u16(offset)
            .u8([W1, W2, W4, W8][usize::from(offset / 2 % 4)]);
    }
    let mut s = Seed::new();
    s.u8(0).section(&ops);
    v.push(("blk_read_everything", s.into_bytes()));

    // A driver that breaks the rules: DRIVER_OK first, no VERSION_1, a
    // queue outside memory, changes after DRIVER_OK, odd widths, a notify
    // of a queue that does not exist, a status above 8 bits.
    let mut ops = Seed::new();
    w(&mut ops, reg::STATUS, W4, 4);
    w(&mut ops, reg::STATUS, W4, 3);
    w(&mut ops, reg::DRIVER_FEATURES, W4, 1 << 5);
    w(&mut ops, reg::STATUS, W4, 11);
    ops.u8(op::RESET);
    ops.u8(op::DRIVER_INIT).u64(VERSION_1);
    queue_setup(&mut ops, 16, DESC, AVAIL, 0x10_0000_0000);
    w(&mut ops, reg::QUEUE_NUM, W4, 8);
    w(&mut ops, reg::QUEUE_DESC_LOW, W1, 0x1234);
    w(&mut ops, reg::QUEUE_NOTIFY, W4, 7);
    w(&mut ops, reg::STATUS, W4, 0x1ff);
    w(&mut ops, 0x102, W8, u64::MAX);
    ops.u8(op::EVENT_LOOP);
    let mut s = Seed::new();
    s.u8(0).section(&ops);
    v.push(("blk_misbehaving_driver", s.into_bytes()));

    // virtio-net: setup with all three queues, send a frame, receive one.
    let mut ops = Seed::new();
    ops.u8(op::DRIVER_INIT)
        .u64(VERSION_1 | MRG | (1 << VIRTIO_NET_F_CTRL_VQ));
    queue_setup(&mut ops, 16, DESC, AVAIL, USED);
    queue_setup(&mut ops, 16, TX_DESC, TX_AVAIL, TX_USED);
    queue_setup(&mut ops, 16, 0x800, 0x900, 0xa00);
    w(&mut ops, reg::QUEUE_NOTIFY, W4, 1);
    ops.u8(op::EVENT_LOOP);
    ops.u8(op::FRAME).u16(80).u8(0);
    ops.u8(op::EVENT_LOOP);
    w(&mut ops, reg::QUEUE_NOTIFY, W4, 0);
    ops.u8(op::EVENT_LOOP);
    let mut img = Image::new();
    rx_buffers(&mut img, 4, 2048);
    tx_frame(&mut img, 0x1000, 60);
    img.desc(TX_DESC, 0, 0x1000, 72, 0, 0);
    img.avail(TX_AVAIL, &[0]);
    let mut s = Seed::new();
    s.u8(FLAG_NET).section(&ops);
    s.raw(img.reach(TX_USED + 0x100).bytes());
    v.push(("net_setup_tx_rx", s.into_bytes()));
    v
}

// ---------------------------------------------------------------- pci ---

fn pci_select(ops: &mut Seed, device: u8, register: u8) {
    ops.u8(pci::op::SELECT).u8(device).u8(0).u8(register);
}

fn pci_seeds() -> Vec<NamedSeed> {
    use pci::op;
    let mut v = Vec::new();

    // Linux's probe: vendor, header type and class of every slot; the
    // capability list of the virtio function.
    let mut ops = Seed::new();
    for device in 0..4 {
        for register in [0x00, 0x08, 0x0c, 0x2c, 0x34, 0x3c] {
            pci_select(&mut ops, device, register);
            ops.u8(op::READ).u8(4).u8(W4);
        }
    }
    for register in (0x40..0x80).step_by(4) {
        pci_select(&mut ops, 1, register);
        ops.u8(op::READ).u8(4).u8(W4);
    }
    v.push(("enumerate", ops.into_bytes()));

    // Size every BAR of both functions, then move some.
    let mut ops = Seed::new();
    for device in 1..3 {
        for bar in 0..6 {
            ops.u8(op::BAR_SIZING).u8(bar).u8(device);
        }
    }
    for (device, register, value) in [
        (2u8, 0x10u8, 0xd000_0000u32),
        (2, 0x18, 0xe001),
        (2, 0x1c, 0x4000_0000),
        (2, 0x20, 3),
        (1, 0x10, 0x8000),
        (1, 0x14, 1),
    ] {
        pci_select(&mut ops, device, register);
        ops.u8(op::WRITE).u8(4).u8(W4).u32(value);
    }
    // The command register: memory and I/O decoding on.
    pci_select(&mut ops, 2, 0x04);
    ops.u8(op::WRITE).u8(4).u8(W2).u32(7);
    v.push(("bar_sizing_and_moves", ops.into_bytes()));

    // MSI-X: enable in the capability (0x40 + 2), program vector 0, mask
    // the function, read the PBA.
    let mut ops = Seed::new();
    pci_select(&mut ops, 1, 0x40);
    ops.u8(op::WRITE).u8(6).u8(W2).u32(0x8000);
    ops.u8(op::MSIX_WRITE).u16(0).u8(W8).u64(0xfee0_0000);
    ops.u8(op::MSIX_WRITE).u16(8).u8(W4).u64(0x41);
    ops.u8(op::MSIX_WRITE).u16(12).u8(W4).u64(0);
    ops.u8(op::MSIX_WRITE).u16(0x7c).u8(0x83).u64(u64::MAX);
    ops.u8(op::WRITE).u8(6).u8(W2).u32(0xc000);
    ops.u8(op::MSIX_READ).u8(0).u16(8).u8(W4);
    ops.u8(op::MSIX_READ).u8(1).u16(0).u8(W8);
    ops.u8(op::MSIX_READ).u8(1).u16(2).u8(W2);
    v.push(("msix", ops.into_bytes()));

    // Odd accesses: narrow and wide address-port accesses, disabled
    // config, other buses and functions, ports around the window.
    let mut ops = Seed::new();
    ops.u8(op::ADDRESS).u32(0x0000_0800);
    ops.u8(op::READ).u8(4).u8(W4);
    ops.u8(op::ADDRESS).u32(0x8001_0800);
    ops.u8(op::READ).u8(5).u8(W2);
    pci_select(&mut ops, 1, 0xff);
    ops.u8(op::READ).u8(7).u8(W4);
    ops.u8(op::WRITE).u8(1).u8(W2).u32(0xffff);
    for port in [0u8, 7, 0x10, 0x17, 0x1f] {
        ops.u8(op::RAW).u8(port).u8(0x85).u8(1).u32(0x8000_0000);
        ops.u8(op::RAW).u8(port).u8(W4).u8(0).u32(0);
    }
    v.push(("odd_accesses", ops.into_bytes()));
    v
}

// ------------------------------------------------------------- legacy ---

fn legacy_write(ops: &mut Seed, device: u8, offset: u8, value: u8) {
    ops.u8(legacy::op::WRITE)
        .u8(device)
        .u8(offset)
        .u8(W1)
        .u8(value);
}

fn legacy_read(ops: &mut Seed, device: u8, offset: u8) {
    ops.u8(legacy::op::READ).u8(device).u8(offset).u8(W1);
}

fn legacy_seeds() -> Vec<NamedSeed> {
    use legacy::op;
    let mut v = Vec::new();
    let now = 1_767_225_600; // 2026-01-01

    // Linux's 8250 setup, a line of output, console input read back.
    let mut s = Seed::new();
    s.u64(now);
    for (reg, val) in [
        (3, 0x80),
        (0, 1),
        (1, 0),
        (3, 3),
        (2, 0xc7),
        (4, 0x0b),
        (1, 0x0f),
    ] {
        legacy_write(&mut s, 0, reg, val);
    }
    for b in b"hello\n" {
        legacy_write(&mut s, 0, 0, *b);
    }
    s.u8(op::INPUT).u8(3).raw(b"ls\n");
    for reg in [5, 2, 0, 0, 0, 5, 6, 7] {
        legacy_read(&mut s, 0, reg);
    }
    s.u8(op::EVENTS);
    v.push(("serial", s.into_bytes()));

    // The i8042: status, a command that is not reset, then reset.
    let mut s = Seed::new();
    s.u64(now);
    legacy_read(&mut s, 1, 4);
    legacy_write(&mut s, 1, 4, 0xad);
    legacy_read(&mut s, 1, 0);
    legacy_write(&mut s, 1, 4, 0xfe);
    s.u8(op::EVENTS);
    v.push(("i8042_reset", s.into_bytes()));

    // The CMOS clock in BCD and binary, 24 and 12 hours, at odd times.
    let mut s = Seed::new();
    s.u64(now);
    let regs = [
        0x00, 0x02, 0x04, 0x06, 0x07, 0x08, 0x09, 0x32, 0x0a, 0x0b, 0x0c, 0x0d,
    ];
    for status_b in [0x02, 0x06, 0x00, 0x04] {
        legacy_write(&mut s, 2, 0, 0x0b);
        legacy_write(&mut s, 2, 1, status_b);
        for reg in regs {
            legacy_write(&mut s, 2, 0, reg);
            legacy_read(&mut s, 2, 1);
        }
    }
    s.u8(op::CLOCK).u64(u64::MAX);
    legacy_write(&mut s, 2, 0, 0x89);
    legacy_read(&mut s, 2, 1);
    legacy_write(&mut s, 2, 0, 0x50);
    legacy_write(&mut s, 2, 1, 0x55);
    legacy_read(&mut s, 2, 0);
    v.push(("cmos", s.into_bytes()));

    // Wide, narrow and unmapped accesses.
    let mut s = Seed::new();
    s.u64(0);
    for (port, width) in [
        (0x3f8u16, W4),
        (0x3ff, W2),
        (0x64, W8),
        (0x71, 0x80),
        (0xffff, W8),
        (0, W1),
    ] {
        s.u8(op::RAW).u16(port).u8(width).u8(1).u8(0xfe);
        s.u8(op::RAW).u16(port).u8(width).u8(0).u8(0);
    }
    v.push(("odd_accesses", s.into_bytes()));
    v
}

// ------------------------------------------------------------- loader ---

/// A synthetic bzImage as in `ember_loader`'s tests: setup_sects 1,
/// `syssize` paragraphs announced, `code` bytes present.
fn bzimage(version: u16, xloadflags: u16, syssize: u32, code: usize) -> Vec<u8> {
    let mut b = vec![0u8; 1024 + code];
    b[0x1f1] = 1;
    b[0x1f4..0x1f8].copy_from_slice(&syssize.to_le_bytes());
    b[0x202..0x206].copy_from_slice(b"HdrS");
    b[0x206..0x208].copy_from_slice(&version.to_le_bytes());
    b[0x211] = 1; // loadflags: LOADED_HIGH
    b[0x214..0x218].copy_from_slice(&0x10_0000u32.to_le_bytes());
    b[0x236..0x238].copy_from_slice(&xloadflags.to_le_bytes());
    b[1024..].fill(0x90);
    b
}

fn bzimage_seeds() -> Vec<NamedSeed> {
    let mut low_initrd_max = bzimage(0x020f, 1, 2, 32);
    low_initrd_max[0x22c..0x230].copy_from_slice(&0x10_0000u32.to_le_bytes());
    let mut setup_sects_0 = bzimage(0x020f, 1, 2, 32 + 3 * 512);
    setup_sects_0[0x1f1] = 0;
    vec![
        ("valid", bzimage(0x020f, 1, 2, 32)),
        ("initrd_addr_max_low", low_initrd_max),
        ("setup_sects_0", setup_sects_0),
        ("old_protocol", bzimage(0x020a, 1, 2, 32)),
        ("truncated", bzimage(0x020f, 1, 64, 512)),
    ]
}

/// A minimal ELF64 vmlinux: one PT_LOAD of `code` bytes at 1 MiB (memory
/// size `memsz`), entered there, and optionally a PT_NOTE.
fn elf(code: usize, memsz: u64, note: bool) -> Vec<u8> {
    let phnum: u16 = if note { 2 } else { 1 };
    let data_at = 64 + 56 * u64::from(phnum);
    let mut e = vec![0u8; 64];
    e[..4].copy_from_slice(b"\x7fELF");
    e[4] = 2; // ELFCLASS64
    e[5] = 1; // little-endian
    e[6] = 1; // version
    e[16..18].copy_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    e[18..20].copy_from_slice(&62u16.to_le_bytes()); // EM_X86_64
    e[20..24].copy_from_slice(&1u32.to_le_bytes());
    e[24..32].copy_from_slice(&0x10_0000u64.to_le_bytes()); // entry
    e[32..40].copy_from_slice(&64u64.to_le_bytes()); // phoff
    e[52..54].copy_from_slice(&64u16.to_le_bytes()); // ehsize
    e[54..56].copy_from_slice(&56u16.to_le_bytes()); // phentsize
    e[56..58].copy_from_slice(&phnum.to_le_bytes());
    let phdr = |kind: u32, offset: u64, addr: u64, filesz: u64, memsz: u64| {
        let mut p = vec![0u8; 56];
        p[..4].copy_from_slice(&kind.to_le_bytes());
        p[4..8].copy_from_slice(&5u32.to_le_bytes()); // R+X
        p[8..16].copy_from_slice(&offset.to_le_bytes());
        p[16..24].copy_from_slice(&addr.to_le_bytes());
        p[24..32].copy_from_slice(&addr.to_le_bytes());
        p[32..40].copy_from_slice(&filesz.to_le_bytes());
        p[40..48].copy_from_slice(&memsz.to_le_bytes());
        p[48..56].copy_from_slice(&0x1000u64.to_le_bytes());
        p
    };
    let code_len = code as u64;
    e.extend(phdr(1, data_at, 0x10_0000, code_len, memsz));
    if note {
        // A Xen PVH note: namesz 4, descsz 4, type 18, "Xen\0", entry.
        e.extend(phdr(4, data_at + code_len, 0, 20, 20));
    }
    e.extend(std::iter::repeat_n(0x90u8, code));
    if note {
        for w in [4u32, 4, 18] {
            e.extend(w.to_le_bytes());
        }
        e.extend(b"Xen\0");
        e.extend(0x10_0000u32.to_le_bytes());
    }
    e
}

fn elf_seeds() -> Vec<NamedSeed> {
    vec![
        ("valid", elf(64, 0x1000, false)),
        ("pvh_note", elf(64, 0x1000, true)),
        ("bss_to_the_top", elf(64, 0xf0_0000, false)),
    ]
}

// ------------------------------------------------------------- config ---

fn config_seeds() -> Vec<NamedSeed> {
    let full = r#"[machine]
vcpus = 2
memory_mib = 512

[boot]
kernel = "vmlinux"
initrd = "/boot/initramfs.cpio"
cmdline = "console=ttyS0 reboot=k panic=1"

[[disk]]
path = "rootfs.ext4"
read_only = false
id = "root"

[[net]]
tap = "tap0"
mac = "52:54:00:12:34:56"
offloads = true
"#;
    let mut with_flags = b"[machine]\nvcpus = 1\n".to_vec();
    with_flags.push(0);
    with_flags.extend_from_slice(
        b"k/proc/self/exe\nc console=ttyS0\nv4\nm64\nd path=/proc/self/exe,read_only=on,id=x\nd path=/proc/self/exe,werror=enospc,rerror=stop\nd path=/r,werror=ignore\nntap=tap1,mac=02:00:00:00:00:01,offloads=off\nntap0,mac=zz\n",
    );
    vec![
        ("full", full.as_bytes().to_vec()),
        ("flags", with_flags),
        (
            "errors",
            b"[machine]\nvcpus = 300\nmemory_mib = 1\n[boot]\nkernel = '/'\n[[net]]\ntap = 'a/b'\nmac = '01:00:00:00:00:00'\n".to_vec(),
        ),
        ("unknown_key", "[machine]\nvcpu = 2 # é\n".as_bytes().to_vec()),
        ("platform", platform_seed()),
    ]
}

/// NUMA nodes, pinning, memory backends, a balloon, vsock and entropy, in
/// TOML and flags.
fn platform_seed() -> Vec<u8> {
    let mut s = b"[machine]\nvcpus = 2\nmemory_mib = 256\nthp = true\nmergeable = true\nvcpu_affinity = \"0=0,1=1\"\n\
[[numa]]\nnode = 0\ncpus = \"0\"\nmemory_mib = 128\nhost_node = 0\n\
[[numa]]\nnode = 1\ncpus = \"1\"\nmemory_mib = 128\npolicy = \"preferred\"\ndistances = \"0:25\"\n\
[balloon]\namount_mib = 64\ndeflate_on_oom = true\nstats_polling_interval_s = 1\nfree_page_reporting = true\n\
[vsock]\nguest_cid = 3\nuds_path = \"v.sock\"\n\
[entropy]\nrate_limiter = { bandwidth = { size = 1048576, refill_time = 1000 } }\n"
        .to_vec();
    s.push(0);
    s.extend_from_slice(
        b"k/proc/self/exe\nmsize=256,hugepages=on,hugepage_size=2M,prefault=on\nunode=0,cpus=0-1,memory=256,distances=1:20\na0=0,1\nbamount_mib=8,stats=2,free_page_reporting=on\nscid=4,uds_path=/tmp/v.sock\nebw=1M/1s,ops=10/1s\n",
    );
    s
}

// ------------------------------------------------------------ balloon ---

/// `virtio_balloon` inputs: every queue with work (page frames to inflate
/// and deflate, a statistics buffer, two reported ranges), first processed
/// in order, then driven by operations.
fn balloon_seeds() -> Vec<NamedSeed> {
    const Q: [u64; 4] = [0x0, 0x400, 0x800, 0xc00];
    let mut img = Image::new();
    let pfns: Vec<u8> = [8u32, 9, 10, 0xffff_ffff]
        .iter()
        .flat_map(|p| p.to_le_bytes())
        .collect();
    img.put(0x2000, &pfns);
    img.desc(Q[0], 0, 0x2000, 16, 0, 0);
    img.avail(Q[0] + 0x100, &[0]);
    img.desc(Q[1], 0, 0x2000, 4, 0, 0);
    img.avail(Q[1] + 0x100, &[0]);
    let mut stats = Vec::new();
    for (tag, v) in [(4u16, 1u64 << 20), (5, 1 << 27)] {
        stats.extend_from_slice(&tag.to_le_bytes());
        stats.extend_from_slice(&v.to_le_bytes());
    }
    img.put(0x3000, &stats);
    img.desc(Q[2], 0, 0x3000, 20, 0, 0);
    img.avail(Q[2] + 0x100, &[0]);
    img.chain(Q[3], 0, &[(0x9000, 0x2000, WRITE), (0xf000, 0x2000, WRITE)]);
    img.avail(Q[3] + 0x100, &[0]);
    let input = |ops: &Seed, img: &mut Image| {
        let mut s = Seed::new();
        // amount_mib, deflate_on_oom, stats interval, reporting, acked.
        s.u16(16).u8(1).u8(1).u8(1).u64(u64::MAX);
        for q in Q {
            queue_setup(&mut s, 16, q, q + 0x100, q + 0x200);
        }
        s.section(ops).raw(img.reach(0x1_0000).bytes());
        s.into_bytes()
    };
    let mut ops = Seed::new();
    ops.u8(0)
        .u8(0)
        .u8(2)
        .u8(3)
        .u16(64)
        .u8(4)
        .u32(12)
        .u8(4)
        .u8(4)
        .u8(5)
        .u8(0)
        .u8(8);
    ops.u8(1).u8(2).u8(1).u8(3);
    vec![
        ("every_queue", input(&Seed::new(), &mut img.clone())),
        ("operations", input(&ops, &mut img)),
    ]
}

/// Every target's seeds, by target name.
pub fn all() -> Vec<(&'static str, Vec<NamedSeed>)> {
    vec![
        ("virtio_blk_request", blk_seeds()),
        ("virtio_blk_chain", blk_chain_seeds()),
        ("virtio_net_tx", net_tx_seeds()),
        ("virtio_net_rx", net_rx_seeds()),
        ("virtio_net_ctrl", crate::net_ctrl::seeds()),
        ("virtio_net_stream", crate::net_stream::seeds()),
        ("virtio_queue_chain", queue_seeds()),
        ("virtio_pci_transport", transport_seeds()),
        ("virtio_mmio_transport", mmio_seeds()),
        ("pci_config_space", pci_seeds()),
        ("legacy_ports", legacy_seeds()),
        ("loader_bzimage", bzimage_seeds()),
        ("loader_elf", elf_seeds()),
        ("config", config_seeds()),
        ("virtio_balloon", balloon_seeds()),
        ("api_request", crate::api::seeds()),
        ("snapshot_state", crate::snapshot::seeds()),
        ("uffd_handshake", crate::uffd::seeds()),
        ("cpu_model", crate::cpu::seeds()),
        ("migration_stream", crate::migration::seeds()),
        ("qcow2_image", crate::qcow2::seeds()),
        ("virtio_vsock", crate::vsock::seeds()),
    ]
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::Ordering;

    use ember_memory::GuestMemoryMmap;
    use vm_memory::{Bytes, GuestAddress};

    use super::*;

    fn byte(mem: &GuestMemoryMmap, addr: u64) -> u8 {
        mem.read_obj(GuestAddress(addr)).unwrap()
    }

    fn used_idx(mem: &GuestMemoryMmap, used: u64) -> u16 {
        mem.read_obj(GuestAddress(used + 2)).unwrap()
    }

    fn seed(list: &[NamedSeed], name: &str) -> Vec<u8> {
        list.iter()
            .find(|(n, _)| *n == name)
            .unwrap_or_else(|| panic!("no seed {name}"))
            .1
            .clone()
    }

    #[test]
    fn seeds_blk_request_complete_with_the_named_status() {
        const OK: u8 = 0;
        const IOERR: u8 = 1;
        const UNSUPP: u8 = 2;
        for (name, data) in blk_seeds() {
            let rig = crate::blk::run_request(&data).unwrap_or_else(|| panic!("{name}"));
            assert!(used_idx(&rig.mem, USED) >= 1, "{name}: nothing completed");
            let want = match name {
                "write_read_only" | "read_into_hole" => Some(IOERR),
                "unsupported" => Some(UNSUPP),
                "loop" => None,
                _ => Some(OK),
            };
            if let Some(want) = want {
                assert_eq!(byte(&rig.mem, STATUS), want, "{name}");
            }
        }
        let rig = crate::blk::run_request(&seed(&blk_seeds(), "read")).unwrap();
        assert_eq!(
            byte(&rig.mem, DATA + 1023),
            0x5a,
            "the disk's bytes were read"
        );
        let rig = crate::blk::run_request(&seed(&blk_seeds(), "get_id")).unwrap();
        assert_eq!(byte(&rig.mem, DATA), b'e', "the id was written");
        let rig = crate::blk::run_request(&seed(&blk_seeds(), "notify_poke_reset")).unwrap();
        // Two chains; after the reset the fresh queue starts over and
        // completes both again, rewriting the used ring from 0.
        assert_eq!(used_idx(&rig.mem, USED), 2);
    }

    #[test]
    fn seeds_blk_chain_complete_ok_except_the_loop() {
        for (name, data) in blk_chain_seeds() {
            let rig = crate::blk::run_chain(&data).unwrap_or_else(|| panic!("{name}"));
            let status = byte(&rig.mem, blk::layout::STATUS);
            if name != "loop" {
                assert_eq!(status, 0, "{name}");
            }
        }
    }

    #[test]
    fn seeds_net_tx_send_what_they_say() {
        for (name, want) in [
            ("one_descriptor", 1),
            ("split_and_short", 1),
            ("indirect", 1),
            ("too_long_and_writable", 0),
            ("poke_reset_close", 4),
        ] {
            let data = seed(&net_tx_seeds(), name);
            let rig = crate::net::run(&data, TX_OPS, NetOp::NotifyTx).unwrap();
            assert_eq!(rig.frames_out, want, "{name}");
            let c = rig.net.counters();
            if name != "one_descriptor" && name != "indirect" {
                assert!(c.tx_dropped >= 1, "{name}: {c:?}");
            }
        }
    }

    #[test]
    fn seeds_net_rx_deliver_or_drop_as_named() {
        for (name, delivered, dropped) in [
            ("small_frame", 1, 0),
            ("merged_buffers", 1, 0),
            ("too_big_without_mrg", 0, 1),
            ("short_then_closed", 0, 1),
            ("huge_frame", 0, 1),
            ("no_buffers_then_one", 1, 0),
            ("offloads_and_tx", 1, 0),
        ] {
            let data = seed(&net_rx_seeds(), name);
            let rig = crate::net::run(&data, RX_OPS, NetOp::Backend).unwrap();
            let c = rig.net.counters();
            assert_eq!((c.rx_packets, c.rx_dropped), (delivered, dropped), "{name}");
        }
        let data = seed(&net_rx_seeds(), "offloads_and_tx");
        let rig = crate::net::run(&data, RX_OPS, NetOp::Backend).unwrap();
        assert_eq!(rig.frames_out, 1);
    }

    #[test]
    fn seeds_transport_drive_the_device() {
        let data = seed(&transport_seeds(), "blk_setup_read_reset");
        let rig = crate::transport::run(&data).unwrap();
        assert_eq!(byte(&rig.mem, STATUS), 0, "the read completed OK");
        assert_eq!(byte(&rig.mem, DATA), 0x5a);
        // The used index starts over after the reset.
        assert_eq!(used_idx(&rig.mem, USED), 1);
        let data = seed(&transport_seeds(), "net_setup_tx_rx");
        let rig = crate::transport::run(&data).unwrap();
        assert_eq!(used_idx(&rig.mem, TX_USED), 1, "the frame was sent");
        assert_eq!(used_idx(&rig.mem, USED), 1, "a frame was received");
    }

    #[test]
    fn seeds_mmio_transport_drive_the_device() {
        let data = seed(&mmio_seeds(), "blk_setup_read_reset");
        let rig = crate::mmio::run(&data).unwrap();
        assert_eq!(byte(&rig.mem, STATUS), 0, "the read completed OK");
        assert_eq!(byte(&rig.mem, DATA), 0x5a);
        assert_eq!(used_idx(&rig.mem, USED), 1, "one read after the reset");
        let data = seed(&mmio_seeds(), "net_setup_tx_rx");
        let rig = crate::mmio::run(&data).unwrap();
        assert_eq!(used_idx(&rig.mem, TX_USED), 1, "the frame was sent");
        assert_eq!(used_idx(&rig.mem, USED), 1, "a frame was received");
        let data = seed(&mmio_seeds(), "blk_misbehaving_driver");
        let rig = crate::mmio::run(&data).unwrap();
        assert_eq!(
            used_idx(&rig.mem, USED),
            0,
            "nothing ran on a refused queue"
        );
    }

    #[test]
    fn seeds_pci_move_bars() {
        let data = seed(&pci_seeds(), "bar_sizing_and_moves");
        let rig = crate::pci::run(&data).unwrap();
        assert!(rig.moves.load(Ordering::Relaxed) >= 4);
        let data = seed(&pci_seeds(), "enumerate");
        let rig = crate::pci::run(&data).unwrap();
        assert_eq!(rig.moves.load(Ordering::Relaxed), 0, "sizing is not a move");
    }

    #[test]
    fn seeds_loaders_load_the_valid_kernels() {
        for (name, data) in bzimage_seeds() {
            let r = crate::loader::run(&crate::loader::bzimage_input(&data)).unwrap();
            let ok = matches!(name, "valid" | "setup_sects_0");
            assert_eq!(r.is_ok(), ok, "{name}: {r:?}");
        }
        for (name, data) in elf_seeds() {
            let r = crate::loader::run(&crate::loader::elf_input(&data)).unwrap();
            // The bss reaches the end of RAM: no room for the initrd.
            let ok = name != "bss_to_the_top";
            assert_eq!(r.is_ok(), ok, "{name}: {r:?}");
        }
    }

    #[test]
    fn seeds_every_target_has_some() {
        let all = all();
        for (name, _) in crate::TARGETS {
            let seeds = all.iter().find(|(n, _)| n == name);
            assert!(seeds.is_some_and(|(_, s)| !s.is_empty()), "{name}");
        }
        assert_eq!(all.len(), crate::TARGETS.len());
    }
}
