use super::*;

fn stream() -> Vec<u8> {
    let mut out = Vec::new();
    let mut w = Writer::new(&mut out).unwrap();
    w.start(br#"{"cpu":"x"}"#).unwrap();
    let a = [1u8; PAGE_SIZE];
    let b = [2u8; PAGE_SIZE];
    w.pages(0, &[(0, &a[..]), (0x10_0000, &b[..])]).unwrap();
    w.zero_pages(1, &[0x2000, 0x3000]).unwrap();
    w.pages(1, &[(0x1000, &b[..])]).unwrap();
    w.state(b"{}").unwrap();
    w.end().unwrap();
    out
}

fn all(bytes: &[u8]) -> Result<Vec<Event>> {
    let mut r = Receiver::new(bytes)?;
    let mut v = Vec::new();
    loop {
        let e = r.next()?;
        let end = e == Event::End;
        v.push(e);
        if end {
            return Ok(v);
        }
    }
}

#[test]
fn a_stream_round_trips() {
    let events = all(&stream()).unwrap();
    assert_eq!(events.len(), 6);
    assert_eq!(events[0], Event::Start(br#"{"cpu":"x"}"#.to_vec()));
    let Event::Pages(b) = &events[1] else {
        panic!("{:?}", events[1])
    };
    assert_eq!(b.round, 0);
    let pages: Vec<_> = b.pages().collect();
    assert_eq!(pages[0], (0, &[1u8; PAGE_SIZE][..]));
    assert_eq!(pages[1], (0x10_0000, &[2u8; PAGE_SIZE][..]));
    let Event::ZeroPages(z) = &events[2] else {
        panic!()
    };
    assert_eq!((z.round, z.gpas()), (1, &[0x2000, 0x3000][..]));
    assert_eq!(z.pages().count(), 0);
    assert_eq!(events[4], Event::State(b"{}".to_vec()));
}

#[test]
fn every_single_bit_flip_is_caught() {
    let good = stream();
    // Past the header, every flipped bit is a clean error (CRC, kind,
    // length or order), never a wrong event list.
    for i in 12..good.len() {
        for bit in [0, 7] {
            let mut bad = good.clone();
            bad[i] ^= 1 << bit;
            assert!(all(&bad).is_err(), "byte {i} bit {bit} went unnoticed");
        }
    }
}

#[test]
fn truncated_streams_say_so() {
    let good = stream();
    for cut in [0, 5, 12, 15, 30, good.len() - 1] {
        let e = all(&good[..cut]).unwrap_err();
        assert!(matches!(e, Error::Truncated(_)), "cut at {cut}: {e}");
    }
}

#[test]
fn header_version_and_order_are_checked() {
    let mut bad = stream();
    bad[0] = b'X';
    assert!(matches!(all(&bad), Err(Error::Magic)));
    let mut v2 = stream();
    v2[8] = 2;
    let e = all(&v2).unwrap_err();
    assert_eq!(
        e.to_string(),
        "migration stream version 2 is not supported: this ember speaks version 1"
    );
    // Pages before the start.
    let mut out = Vec::new();
    let mut w = Writer::new(&mut out).unwrap();
    w.zero_pages(0, &[0]).unwrap();
    let e = all(&out).unwrap_err();
    assert!(e.to_string().contains("ZeroPages after the header"), "{e}");
    // Nothing after the end.
    let mut out = stream();
    Writer::back_channel(&mut out).state(b"{}").unwrap();
    let mut r = Receiver::new(&out[..]).unwrap();
    for _ in 0..6 {
        r.next().unwrap();
    }
    assert!(matches!(r.next(), Err(Error::Order { .. })));
}

#[test]
fn bad_batches_are_refused() {
    let frame = |kind: Kind, payload: &[u8]| {
        let mut out = Vec::new();
        let mut w = Writer::new(&mut out).unwrap();
        w.start(b"").unwrap();
        w.frame(kind, payload).unwrap();
        let mut r = Receiver::new(&out[..]).unwrap();
        r.next().unwrap();
        r.next().unwrap_err().to_string()
    };
    let head = |count: u32| [0u32.to_le_bytes(), count.to_le_bytes()].concat();
    assert!(frame(Kind::Pages, &head(0)).contains("0 pages"));
    assert!(frame(Kind::Pages, &head(5000)).contains("5000 pages"));
    let mut unaligned = head(1);
    unaligned.extend_from_slice(&0x1001u64.to_le_bytes());
    assert!(frame(Kind::ZeroPages, &unaligned).contains("not page-aligned"));
    assert!(frame(Kind::Pages, &unaligned).contains("need 4112 bytes"));
    let mut top = head(1);
    top.extend_from_slice(&(!0xfffu64).to_le_bytes());
    assert!(frame(Kind::ZeroPages, &top).contains("overflows"));
    assert!(frame(Kind::Pages, &[1, 2]).contains("shorter than its head"));
    // A writer refuses to build bad batches too.
    let mut sink = Vec::new();
    let mut w = Writer::back_channel(&mut sink);
    assert!(w.pages(0, &[(0, &[0u8; 10][..])]).is_err());
    assert!(w.zero_pages(0, &[]).is_err());
}

#[test]
fn replies_round_trip() {
    for reply in [
        Reply::Ready,
        Reply::Refused("this host cannot provide avx512f".into()),
        Reply::Done,
    ] {
        let mut buf = Vec::new();
        write_reply(&mut buf, &reply).unwrap();
        assert_eq!(read_reply(&buf[..]).unwrap(), reply);
    }
    let mut buf = Vec::new();
    Writer::back_channel(&mut buf)
        .frame(Kind::Pages, &[])
        .unwrap();
    assert!(read_reply(&buf[..]).is_err());
}

#[test]
fn oversized_frames_are_refused_before_reading_them() {
    let mut out = Vec::new();
    out.extend_from_slice(&MAGIC);
    out.extend_from_slice(&VERSION.to_le_bytes());
    out.extend_from_slice(&[1, 0, 0, 0]);
    out.extend_from_slice(&u32::MAX.to_le_bytes());
    assert!(matches!(all(&out), Err(Error::TooLong(_))));
}

#[test]
fn release_comes_after_the_end_once_and_replies_round_trip() {
    let mut s = stream();
    Writer::back_channel(&mut s).release().unwrap();
    let mut r = Receiver::new(&s[..]).unwrap();
    while r.next().unwrap() != Event::End {}
    assert_eq!(r.next().unwrap(), Event::Release);
    assert!(matches!(r.next(), Err(Error::Order { .. })));
    // Release before the end is out of order.
    let mut early = Vec::new();
    let mut w = Writer::new(&mut early).unwrap();
    w.start(b"{}").unwrap();
    w.release().unwrap();
    let mut r = Receiver::new(&early[..]).unwrap();
    r.next().unwrap();
    assert!(matches!(
        r.next(),
        Err(Error::Order {
            got: Kind::Release,
            ..
        })
    ));
    for reply in [
        Reply::Ready,
        Reply::Received,
        Reply::Done,
        Reply::Refused("no avx512f".into()),
    ] {
        let mut b = Vec::new();
        write_reply(&mut b, &reply).unwrap();
        assert_eq!(read_reply(&b[..]).unwrap(), reply);
    }
}

#[test]
fn a_postcopy_stream_sends_pages_after_the_release() {
    let page = [9u8; PAGE_SIZE];
    let set = PageSet {
        maps: vec![vec![0b101], vec![0, 1 << 3]],
    };
    let mut out = Vec::new();
    let mut w = Writer::new(&mut out).unwrap();
    w.start(b"{}").unwrap();
    w.pages(0, &[(0, &page[..])]).unwrap();
    w.sync().unwrap();
    w.postcopy(&set).unwrap();
    w.state(b"{}").unwrap();
    w.end().unwrap();
    w.release().unwrap();
    w.pages(1, &[(0x2000, &page[..])]).unwrap();
    w.pages(1, &[(0, &page[..])]).unwrap();
    let mut r = Receiver::new(&out[..]).unwrap();
    r.next().unwrap();
    r.next().unwrap();
    assert_eq!(r.next().unwrap(), Event::Sync);
    let Event::Postcopy(got) = r.next().unwrap() else {
        panic!("no post-copy set")
    };
    assert_eq!(got, set);
    assert_eq!(got.count(), 3);
    assert!(got.contains(0, 0) && got.contains(0, 2) && got.contains(1, 67));
    assert!(!got.contains(0, 1) && !got.contains(2, 0) && !got.contains(1, 9999));
    assert!(matches!(r.next().unwrap(), Event::State(_)));
    assert_eq!(r.next().unwrap(), Event::End);
    assert_eq!(r.next().unwrap(), Event::Release);
    // Pages go on after the release, nothing else does.
    assert!(matches!(r.next().unwrap(), Event::Pages(_)));
    assert!(matches!(r.next().unwrap(), Event::Pages(_)));
    let mut more = out.clone();
    Writer::back_channel(&mut more).state(b"{}").unwrap();
    let mut r = Receiver::new(&more[..]).unwrap();
    for _ in 0..9 {
        r.next().unwrap();
    }
    let e = r.next().unwrap_err().to_string();
    assert!(e.contains("after the release of a post-copy"), "{e}");
    // A pre-copy stream takes no pages after the release, and a second
    // post-copy set is out of order.
    let mut s = stream();
    let mut w = Writer::back_channel(&mut s);
    w.release().unwrap();
    w.pages(1, &[(0, &page[..])]).unwrap();
    let mut r = Receiver::new(&s[..]).unwrap();
    while r.next().unwrap() != Event::Release {}
    assert!(matches!(r.next(), Err(Error::Order { .. })));
    let mut twice = Vec::new();
    let mut w = Writer::new(&mut twice).unwrap();
    w.start(b"{}").unwrap();
    w.postcopy(&set).unwrap();
    w.postcopy(&set).unwrap();
    let mut r = Receiver::new(&twice[..]).unwrap();
    r.next().unwrap();
    r.next().unwrap();
    assert!(matches!(r.next(), Err(Error::Order { .. })));
}

#[test]
fn bad_postcopy_sets_are_refused() {
    let bad = |payload: &[u8]| PageSet::decode(payload).unwrap_err().to_string();
    assert!(bad(&[]).contains("truncated at the region count"));
    assert!(bad(&[65, 0, 0, 0]).contains("65 regions"));
    assert!(bad(&[1, 0, 0, 0]).contains("truncated at the word count"));
    assert!(bad(&[1, 0, 0, 0, 2, 0, 0, 0, 1, 2, 3]).contains("2 words, the frame is shorter"));
    assert!(bad(&[1, 0, 0, 0, 0xff, 0xff, 0xff, 0xff]).contains("the frame is shorter"));
    assert!(bad(&[0, 0, 0, 0, 7]).contains("1 bytes after the last region"));
    assert_eq!(PageSet::decode(&[0, 0, 0, 0]).unwrap().count(), 0);
}

#[test]
fn page_requests_round_trip_and_are_bounded() {
    for reply in [
        Reply::PageRequest(vec![0x1000, 0x7fff_f000]),
        Reply::PostcopyDone,
        Reply::Synced,
    ] {
        let mut b = Vec::new();
        write_reply(&mut b, &reply).unwrap();
        assert_eq!(read_reply(&b[..]).unwrap(), reply);
    }
    let mut b = Vec::new();
    assert!(write_reply(&mut b, &Reply::PageRequest(Vec::new())).is_err());
    assert!(write_reply(&mut b, &Reply::PageRequest(vec![0; MAX_BATCH + 1])).is_err());
    for payload in [&[][..], &[1, 2, 3][..]] {
        let mut b = Vec::new();
        Writer::back_channel(&mut b)
            .frame(Kind::PageRequest, payload)
            .unwrap();
        assert!(read_reply(&b[..])
            .unwrap_err()
            .to_string()
            .contains("page request"));
    }
}
