//! Guest memory over the stream: the source sends a round's pages from
//! guest memory (the first round every non-zero page, later rounds the
//! dirty ones, zero pages as addresses only), the destination writes what
//! it receives into its own guest memory.

use std::io::Write;

use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use crate::{Error, Event, Result, Writer, PAGE_SIZE};

/// Pages per frame the sender batches (1 MiB of data).
pub const SEND_BATCH: usize = 256;

/// Which pages a round sends.
#[derive(Clone, Copy, Debug)]
pub enum Round<'a> {
    /// Every page that is not all zeros (the destination starts zeroed).
    All,
    /// The pages whose bit is set, zero or not: one bitmap per region (in
    /// the guest memory's region order), bit `i % 64` of word `i / 64` for
    /// the region's page `i`, as KVM's dirty log.
    Dirty(&'a [Vec<u64>]),
    /// As `All`, but only among the pages whose bit is set (the others are
    /// known to be zero: never touched).
    Touched(&'a [Vec<u64>]),
}

/// What a round sent.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SendStats {
    /// Pages sent with their data.
    pub pages: u64,
    /// Zero pages sent as addresses.
    pub zero_pages: u64,
}

fn bit(map: &[u64], page: usize) -> bool {
    map.get(page / 64)
        .is_some_and(|w| w & (1 << (page % 64)) != 0)
}

struct Batches<'w, W: Write> {
    w: &'w mut Writer<W>,
    round: u32,
    data: Vec<u8>,
    gpas: Vec<u64>,
    zeros: Vec<u64>,
    stats: SendStats,
}

impl<W: Write> Batches<'_, W> {
    fn page(&mut self, gpa: u64, page: &[u8], send_zero: bool) -> Result<()> {
        if is_zero(page) {
            if send_zero {
                self.zeros.push(gpa);
                if self.zeros.len() == crate::MAX_BATCH {
                    self.flush_zeros()?;
                }
            }
            return Ok(());
        }
        self.gpas.push(gpa);
        self.data.extend_from_slice(page);
        if self.gpas.len() == SEND_BATCH {
            self.flush_pages()?;
        }
        Ok(())
    }

    fn flush_pages(&mut self) -> Result<()> {
        if self.gpas.is_empty() {
            return Ok(());
        }
        let pages: Vec<(u64, &[u8])> = self
            .gpas
            .iter()
            .copied()
            .zip(self.data.chunks_exact(PAGE_SIZE))
            .collect();
        self.w.pages(self.round, &pages)?;
        self.stats.pages += pages.len() as u64;
        self.gpas.clear();
        self.data.clear();
        Ok(())
    }

    fn flush_zeros(&mut self) -> Result<()> {
        if self.zeros.is_empty() {
            return Ok(());
        }
        self.w.zero_pages(self.round, &self.zeros)?;
        self.stats.zero_pages += self.zeros.len() as u64;
        self.zeros.clear();
        Ok(())
    }
}

/// Whether a page is all zeros: 64-byte blocks, each OR-ed a word at a
/// time (the first round checks every page of guest memory; byte by byte
/// that was most of a 256 MiB guest's migration time).
pub fn is_zero(page: &[u8]) -> bool {
    page.chunks(64).all(|block| {
        let mut words = block.chunks_exact(8);
        let mut acc = words.by_ref().fold(0u64, |a, w| {
            a | u64::from_ne_bytes([w[0], w[1], w[2], w[3], w[4], w[5], w[6], w[7]])
        });
        for &b in words.remainder() {
            acc |= u64::from(b);
        }
        acc == 0
    })
}

/// Sends round `round` of `mem`'s pages.
pub fn send_memory<W: Write, M: GuestMemoryBackend>(
    w: &mut Writer<W>,
    mem: &M,
    round: u32,
    which: Round<'_>,
) -> Result<SendStats> {
    let mut b = Batches {
        w,
        round,
        data: Vec::with_capacity(SEND_BATCH * PAGE_SIZE),
        gpas: Vec::with_capacity(SEND_BATCH),
        zeros: Vec::new(),
        stats: SendStats::default(),
    };
    let mut page = vec![0u8; PAGE_SIZE];
    for (index, region) in mem.iter().enumerate() {
        let base = region.start_addr().0;
        let pages = usize::try_from(region.len())
            .map_err(|_| Error::Batch("region size".into()))?
            / PAGE_SIZE;
        let (map, send_zero) = match which {
            Round::All => (None, false),
            Round::Dirty(maps) => (
                Some(maps.get(index).map(Vec::as_slice).unwrap_or(&[])),
                true,
            ),
            Round::Touched(maps) => (
                Some(maps.get(index).map(Vec::as_slice).unwrap_or(&[])),
                false,
            ),
        };
        for p in 0..pages {
            if let Some(map) = map {
                // Skip a clean word of the bitmap at once.
                if p % 64 == 0 && map.get(p / 64).copied().unwrap_or(0) == 0 {
                    continue;
                }
                if !bit(map, p) {
                    continue;
                }
            }
            let gpa = base + (p * PAGE_SIZE) as u64;
            mem.read_slice(&mut page, GuestAddress(gpa))
                .map_err(|e| Error::Batch(format!("reading guest page {gpa:#x}: {e}")))?;
            b.page(gpa, &page, send_zero)?;
        }
    }
    b.flush_pages()?;
    b.flush_zeros()?;
    Ok(b.stats)
}

/// Writes a received batch into `mem`; returns the pages written. A page
/// outside guest memory is an error naming it.
pub fn apply<M: GuestMemoryBackend>(mem: &M, event: &Event) -> Result<u64> {
    let outside = |gpa: u64| Error::Batch(format!("page {gpa:#x} is outside guest memory"));
    match event {
        Event::Pages(b) => {
            for (gpa, page) in b.pages() {
                mem.write_slice(page, GuestAddress(gpa))
                    .map_err(|_| outside(gpa))?;
            }
            Ok(b.gpas().len() as u64)
        }
        Event::ZeroPages(b) => {
            let zero = [0u8; PAGE_SIZE];
            for &gpa in b.gpas() {
                mem.write_slice(&zero, GuestAddress(gpa))
                    .map_err(|_| outside(gpa))?;
            }
            Ok(b.gpas().len() as u64)
        }
        _ => Ok(0),
    }
}

#[cfg(test)]
mod zero_tests {
    use super::is_zero;

    #[test]
    fn every_single_non_zero_byte_is_seen() {
        let mut page = vec![0u8; 4096];
        assert!(is_zero(&page));
        for i in [0, 7, 8, 63, 64, 1000, 4095] {
            page[i] = 0x80;
            assert!(!is_zero(&page), "byte {i}");
            page[i] = 0;
        }
        assert!(is_zero(&page[..13]));
        assert!(!is_zero(&[0, 0, 0, 0, 0, 0, 0, 0, 0, 1]));
    }
}

#[cfg(test)]
mod tests {
    use vm_memory::GuestMemoryMmap;

    use super::*;
    use crate::Receiver;

    fn memory() -> GuestMemoryMmap {
        // Two regions with a hole, as guest RAM around the MMIO gap.
        GuestMemoryMmap::from_ranges(&[
            (GuestAddress(0), 1 << 20),
            (GuestAddress(0x1_0000_0000), 1 << 20),
        ])
        .unwrap()
    }

    fn fill(mem: &GuestMemoryMmap, gpa: u64, byte: u8) {
        mem.write_slice(&[byte; PAGE_SIZE], GuestAddress(gpa))
            .unwrap();
    }

    fn receive(stream: &[u8], mem: &GuestMemoryMmap) -> u64 {
        let mut r = Receiver::new(stream).unwrap();
        let mut n = 0;
        loop {
            match r.next().unwrap() {
                Event::End => return n,
                e => n += apply(mem, &e).unwrap(),
            }
        }
    }

    fn same(a: &GuestMemoryMmap, b: &GuestMemoryMmap) -> bool {
        a.iter().zip(b.iter()).all(|(x, y)| {
            let len = usize::try_from(x.len()).unwrap();
            let (mut p, mut q) = (vec![0u8; len], vec![0u8; len]);
            a.read_slice(&mut p, x.start_addr()).unwrap();
            b.read_slice(&mut q, y.start_addr()).unwrap();
            p == q
        })
    }

    #[test]
    fn a_full_round_then_a_dirty_round_make_the_same_memory() {
        let src = memory();
        for (byte, gpa) in (1u8..).zip([0u64, 0x5000, 0xf_f000, 0x1_0000_0000, 0x1_000f_f000]) {
            fill(&src, gpa, byte);
        }
        // Every page of the high region: more than one batch.
        for p in 1..255u64 {
            src.write_slice(&p.to_le_bytes(), GuestAddress(0x1_0000_0000 + p * 0x1000))
                .unwrap();
        }
        let dst = memory();
        let mut out = Vec::new();
        let mut w = Writer::new(&mut out).unwrap();
        w.start(b"").unwrap();
        let stats = send_memory(&mut w, &src, 0, Round::All).unwrap();
        assert_eq!(stats.zero_pages, 0, "a first round skips zero pages");
        assert_eq!(stats.pages, 3 + 256, "{stats:?}");
        // Round 1: one page rewritten, one zeroed, one untouched but marked.
        fill(&src, 0x5000, 0xee);
        fill(&src, 0xf_f000, 0);
        let mut low = vec![0u64; 4];
        for p in [0x5, 0xff, 0x7] {
            low[p / 64] |= 1 << (p % 64);
        }
        let maps = vec![low, vec![0u64; 4]];
        let stats = send_memory(&mut w, &src, 1, Round::Dirty(&maps)).unwrap();
        assert_eq!(
            stats,
            SendStats {
                pages: 1,
                zero_pages: 2
            }
        );
        w.state(b"{}").unwrap();
        w.end().unwrap();
        receive(&out, &dst);
        assert!(same(&src, &dst), "the destination's memory is the source's");
    }

    #[test]
    fn a_touched_round_sends_the_non_zero_pages_among_the_marked_ones() {
        let src = memory();
        fill(&src, 0x5000, 1);
        fill(&src, 0x9000, 2);
        let mut low = vec![0u64; 4];
        // Page 5 marked and non-zero: sent; 6 marked but zero: skipped;
        // 9 non-zero but not marked: skipped (the caller said it is zero).
        low[0] |= (1 << 5) | (1 << 6);
        let maps = vec![low, vec![0u64; 4]];
        let mut out = Vec::new();
        let mut w = Writer::new(&mut out).unwrap();
        w.start(b"").unwrap();
        let stats = send_memory(&mut w, &src, 0, Round::Touched(&maps)).unwrap();
        assert_eq!(
            stats,
            SendStats {
                pages: 1,
                zero_pages: 0
            }
        );
        w.state(b"{}").unwrap();
        w.end().unwrap();
        let dst = memory();
        receive(&out, &dst);
        let word = |gpa: u64| dst.read_obj::<u8>(GuestAddress(gpa)).unwrap();
        assert_eq!((word(0x5000), word(0x9000)), (1, 0));
    }

    #[test]
    fn a_page_outside_guest_memory_is_refused() {
        let mut out = Vec::new();
        let mut w = Writer::new(&mut out).unwrap();
        w.start(b"").unwrap();
        w.zero_pages(0, &[0x8000_0000]).unwrap();
        let mut r = Receiver::new(&out[..]).unwrap();
        r.next().unwrap();
        let e = apply(&memory(), &r.next().unwrap()).unwrap_err();
        assert_eq!(
            e.to_string(),
            "migration stream: bad page batch: page 0x80000000 is outside guest memory"
        );
    }
}
