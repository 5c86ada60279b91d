//! `migration_stream`: bytes as a destination reads them from a migration
//! connection (`ember_migration::Receiver`): the header, then events until
//! the release or the first error. Every page batch it accepts must hold
//! page-aligned addresses and whole pages, and the pages go into the
//! fuzzer's guest memory (`ember_migration::memory::apply`) as a
//! destination writes them; the start is parsed as ember's `Hello` and the
//! state as ember's `State` payload (`ember_vmm::migration::decode_state`),
//! as the destination does. The same bytes are also read as the back
//! channel a source reads (replies, post-copy page requests).

use crate::guest::guest_memory;
use ember_migration::{Event, Receiver, PAGE_SIZE};

/// The target.
pub fn migration_stream(data: &[u8]) {
    // The same bytes as a back channel, as a source reads it (replies,
    // post-copy page requests): every request it accepts is bounded.
    let mut back = data;
    for _ in 0..64 {
        match ember_migration::read_reply(&mut back) {
            Ok(ember_migration::Reply::PageRequest(g)) => {
                assert!(!g.is_empty() && g.len() <= ember_migration::MAX_BATCH);
            }
            Ok(_) => {}
            Err(_) => break,
        }
    }
    let Ok(mut r) = Receiver::new(data) else {
        return;
    };
    let mem = guest_memory(&[]);
    for _ in 0..1024 {
        match r.next() {
            Ok(e @ (Event::Pages(_) | Event::ZeroPages(_))) => {
                let (Event::Pages(b) | Event::ZeroPages(b)) = &e else {
                    unreachable!()
                };
                assert!(b.gpas().iter().all(|g| g % PAGE_SIZE as u64 == 0));
                assert!(b.pages().all(|(_, p)| p.len() == PAGE_SIZE));
                let _ = ember_migration::memory::apply(&mem, &e);
            }
            Err(_) => return,
            // A post-copy stream goes on with pages after the release.
            Ok(Event::Release) => {}
            Ok(Event::Postcopy(set)) => {
                let _ = set.count();
                // As a destination does: the stale pages leave memory.
                let _ = ember_vmm::migration::discard_stale(&mem, &set);
            }
            Ok(Event::End | Event::Sync) => {}
            Ok(Event::Start(p)) => {
                let _ = serde_json::from_slice::<ember_vmm::migration::Hello>(&p);
            }
            Ok(Event::MemoryFd(p)) => {
                let _ = serde_json::from_slice::<ember_vmm::migration::MemoryFile>(&p);
            }
            Ok(Event::State(p)) => {
                let _ = ember_vmm::migration::decode_state(&p);
            }
        }
    }
}

/// Hand-made seeds: a whole stream, and the ways one breaks.
pub fn seeds() -> Vec<crate::seeds::NamedSeed> {
    let mut good = Vec::new();
    {
        let mut w = ember_migration::Writer::new(&mut good).expect("vec");
        let page = [0xa5u8; PAGE_SIZE];
        let _ = w.start(br#"{"cpu": {"version": 1}, "machine": {"vcpus": 1}}"#);
        let _ = w.pages(0, &[(0, &page[..]), (0x1000, &page[..])]);
        let _ = w.zero_pages(0, &[0x2000, 0x3000]);
        let _ = w.sync();
        let _ = w.pages(1, &[(0x1000, &page[..])]);
        let _ = w.state(b"\x01{}");
        let _ = w.end();
        let _ = w.release();
    }
    let mut flipped = good.clone();
    flipped[40] ^= 1;
    let mut version = good.clone();
    version[8] = 2;
    let mut no_start = Vec::new();
    {
        let mut w = ember_migration::Writer::new(&mut no_start).expect("vec");
        let _ = w.zero_pages(0, &[0]);
    }
    let mut postcopy = Vec::new();
    {
        let mut w = ember_migration::Writer::new(&mut postcopy).expect("vec");
        let page = [0x5au8; PAGE_SIZE];
        let _ = w.start(br#"{"cpu": {"version": 1}, "machine": {"vcpus": 1}}"#);
        let _ = w.pages(0, &[(0, &page[..]), (0x1000, &page[..])]);
        let _ = w.postcopy(&ember_migration::PageSet {
            maps: vec![vec![0b11], vec![]],
        });
        let _ = w.state(b"\x01{}");
        let _ = w.end();
        let _ = w.release();
        let _ = w.pages(2, &[(0x1000, &page[..])]);
        let _ = w.pages(2, &[(0, &page[..])]);
    }
    let mut replies = Vec::new();
    for reply in [
        ember_migration::Reply::Ready,
        ember_migration::Reply::Synced,
        ember_migration::Reply::PageRequest(vec![0x1000, 0x2000]),
        ember_migration::Reply::Done,
        ember_migration::Reply::PostcopyDone,
    ] {
        let _ = ember_migration::write_reply(&mut replies, &reply);
    }
    vec![
        ("stream", good.clone()),
        ("replies", replies),
        ("postcopy", postcopy),
        ("truncated", good[..good.len() / 2].to_vec()),
        ("flipped", flipped),
        ("version", version),
        ("no_start", no_start),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn migration_seeds_run_and_the_stream_writes_its_pages() {
        for (_, s) in seeds() {
            migration_stream(&s);
        }
        let (_, good) = &seeds()[0];
        let mut r = Receiver::new(&good[..]).unwrap();
        let mut pages = 0;
        while let Ok(e) = r.next() {
            if let Event::Pages(b) = &e {
                pages += b.gpas().len();
            }
            if e == Event::End {
                break;
            }
        }
        assert_eq!(pages, 3);
    }
}
