// Test data: every cast is of a small constant or length.
#![allow(clippy::cast_possible_truncation)]

use super::*;

const MAC: [u8; 6] = [0x52, 0x54, 0, 0x12, 0x34, 0x56];
const OTHER: [u8; 6] = [0x52, 0x54, 0, 0x12, 0x34, 0x99];
const BCAST: [u8; 6] = [0xff; 6];
const MCAST: [u8; 6] = [0x01, 0x00, 0x5e, 0, 0, 1];
const MCAST2: [u8; 6] = [0x33, 0x33, 0, 0, 0, 1];

/// An Ethernet frame to `dst`, tagged with `vid` when given.
fn eth(dst: [u8; 6], vid: Option<u16>) -> Vec<u8> {
    let mut f = dst.to_vec();
    f.extend_from_slice(&OTHER);
    if let Some(v) = vid {
        f.extend_from_slice(&[0x81, 0x00]);
        f.extend_from_slice(&v.to_be_bytes());
    }
    f.extend_from_slice(&[0x08, 0x00]);
    f.resize(60, 0);
    f
}

fn cmd(class: u32, cmd: u32, data: &[u8]) -> Vec<u8> {
    let mut v = vec![class as u8, cmd as u8];
    v.extend_from_slice(data);
    v
}

fn table(macs: &[[u8; 6]]) -> Vec<u8> {
    let mut v = u32::try_from(macs.len()).unwrap().to_le_bytes().to_vec();
    for m in macs {
        v.extend_from_slice(m);
    }
    v
}

fn filter() -> RxFilter {
    let mut f = RxFilter::new(MAC);
    f.set_features(u64::MAX, 4);
    f
}

fn run(f: &mut RxFilter, bytes: &[u8]) -> Result<(), CtrlError> {
    f.apply(&parse(bytes)?)
}

#[test]
fn ctrl_parse_names_every_malformed_command() {
    let cases: &[(&[u8], &str)] = &[
        (&[], "no class"),
        (&[0], "no class"),
        (&[9, 0], "unknown command 0 of class 9"),
        (&[0, 6, 1], "unknown command 6 of class 0"),
        (&[0, 0], "RX mode: 0 bytes"),
        (&[0, 0, 1, 1], "RX mode: 2 bytes"),
        (&[1, 1, 1, 2, 3], "MAC_ADDR_SET: 3 bytes"),
        (&[1, 1, 1, 0, 0, 0, 0, 1], "not a unicast"),
        (&[1, 1, 0, 0, 0, 0, 0, 0], "not a unicast"),
        (&[1, 2, 0, 0, 0, 0, 0, 0], "unknown command 2 of class 1"),
        (&[1, 0, 1, 0, 0, 0], "unicast table"),
        (&[1, 0, 0, 0, 0, 0], "multicast table"),
        (&[1, 0, 0xff, 0xff, 0xff, 0xff], "unicast table"),
        (&[2, 0, 1], "VLAN: 1 bytes"),
        (&[2, 0, 0, 0x10], "4096"),
        (&[2, 0, 0xff, 0xff], "65535"),
        (&[2, 2, 1, 0], "unknown command 2 of class 2"),
        (&[3, 0, 1], "ANNOUNCE_ACK: 1 bytes"),
        (&[3, 1], "unknown command 1 of class 3"),
        (&[4, 0, 1], "MQ_VQ_PAIRS_SET: 1 bytes"),
        (&[4, 1, 0, 0], "unknown command 1 of class 4"),
        (&[5, 0, 1, 2], "GUEST_OFFLOADS_SET: 2 bytes"),
    ];
    for (bytes, want) in cases {
        let e = parse(bytes).unwrap_err().to_string();
        assert!(e.contains(want), "{bytes:?}: {e} (wanted {want})");
    }
    // Trailing bytes after both tables.
    let mut t = cmd(1, 0, &[table(&[OTHER]), table(&[MCAST])].concat());
    t.push(0);
    assert!(parse(&t)
        .unwrap_err()
        .to_string()
        .contains("two tables exactly"));
}

#[test]
fn ctrl_parse_reads_every_command() {
    assert_eq!(
        parse(&[0, 0, 1]).unwrap(),
        Command::Rx(RxMode::Promisc, true)
    );
    assert_eq!(
        parse(&[0, 5, 0]).unwrap(),
        Command::Rx(RxMode::NoBcast, false)
    );
    assert_eq!(
        parse(&cmd(
            1,
            0,
            &[table(&[OTHER]), table(&[MCAST, MCAST2])].concat()
        ))
        .unwrap(),
        Command::MacTable {
            unicast: vec![OTHER],
            multicast: vec![MCAST, MCAST2]
        }
    );
    assert_eq!(parse(&cmd(1, 1, &OTHER)).unwrap(), Command::MacAddr(OTHER));
    assert_eq!(parse(&[2, 1, 0xff, 0x0f]).unwrap(), Command::VlanDel(4095));
    assert_eq!(parse(&[3, 0]).unwrap(), Command::AnnounceAck);
    assert_eq!(parse(&[4, 0, 2, 0]).unwrap(), Command::QueuePairs(2));
    assert_eq!(
        parse(&[5, 0, 2, 0, 0, 0, 0, 0, 0, 0]).unwrap(),
        Command::GuestOffloads(2)
    );
}

#[test]
fn ctrl_filter_is_promiscuous_until_the_driver_turns_it_off() {
    let mut f = filter();
    for dst in [MAC, OTHER, BCAST, MCAST] {
        assert!(f.accepts(&eth(dst, None)));
        assert!(
            f.accepts(&eth(dst, Some(7))),
            "VLANs too, while promiscuous"
        );
    }
    run(&mut f, &[0, 0, 0]).unwrap();
    assert!(f.accepts(&eth(MAC, None)));
    assert!(f.accepts(&eth(BCAST, None)));
    assert!(!f.accepts(&eth(OTHER, None)), "another host's unicast");
    assert!(!f.accepts(&eth(MCAST, None)), "a group not joined");
    assert!(!f.accepts(&eth(MAC, Some(7))), "a VLAN not added");
    assert!(!f.accepts(&eth(MAC, None)[..5]), "a runt");
    assert!(!f.accepts(&eth(MAC, Some(7))[..15]), "a cut tag");
}

#[test]
fn ctrl_rx_modes_and_tables_decide_what_passes() {
    let mut f = filter();
    run(&mut f, &[0, 0, 0]).unwrap();
    run(
        &mut f,
        &cmd(1, 0, &[table(&[OTHER]), table(&[MCAST])].concat()),
    )
    .unwrap();
    assert!(f.accepts(&eth(OTHER, None)));
    assert!(f.accepts(&eth(MCAST, None)));
    assert!(!f.accepts(&eth(MCAST2, None)));
    run(&mut f, &[0, 1, 1]).unwrap(); // ALLMULTI
    assert!(f.accepts(&eth(MCAST2, None)));
    run(&mut f, &[0, 3, 1]).unwrap(); // NOMULTI wins
    assert!(!f.accepts(&eth(MCAST, None)));
    assert!(
        f.accepts(&eth(BCAST, None)),
        "broadcast is not multicast here"
    );
    run(&mut f, &[0, 5, 1]).unwrap(); // NOBCAST
    assert!(!f.accepts(&eth(BCAST, None)));
    run(&mut f, &[0, 4, 1]).unwrap(); // NOUNI
    assert!(!f.accepts(&eth(MAC, None)));
    run(&mut f, &[0, 4, 0]).unwrap();
    run(&mut f, &[0, 2, 1]).unwrap(); // ALLUNI
    assert!(f.accepts(&eth([0x02, 9, 9, 9, 9, 9], None)));
    // An overflowing table passes its whole kind; a new table replaces it.
    let many: Vec<[u8; 6]> = (0..=64u8).map(|i| [0x01, 0, 0x5e, 0, 1, i]).collect();
    let mut f = filter();
    run(&mut f, &[0, 0, 0]).unwrap();
    run(&mut f, &cmd(1, 0, &[table(&[]), table(&many)].concat())).unwrap();
    assert!(f.accepts(&eth(MCAST2, None)));
    assert!(f.state().multicast_overflow && f.state().multicast.is_empty());
    run(&mut f, &cmd(1, 0, &[table(&[]), table(&[])].concat())).unwrap();
    assert!(!f.accepts(&eth(MCAST2, None)));
}

#[test]
fn ctrl_mac_addr_and_vlans_take_effect_and_reset_undoes_them() {
    let mut f = filter();
    run(&mut f, &[0, 0, 0]).unwrap();
    run(&mut f, &cmd(1, 1, &OTHER)).unwrap();
    assert_eq!(f.mac(), OTHER);
    assert!(f.accepts(&eth(OTHER, None)));
    assert!(!f.accepts(&eth(MAC, None)), "the old MAC is gone");
    run(&mut f, &[2, 0, 100, 0]).unwrap();
    run(&mut f, &[2, 0, 5, 0]).unwrap();
    assert!(f.accepts(&eth(OTHER, Some(100))));
    assert!(
        f.accepts(&eth(OTHER, Some(0x2000 | 5))),
        "priority bits aside"
    );
    assert!(!f.accepts(&eth(OTHER, Some(200))));
    assert_eq!(f.state().vlans, Some(vec![5, 100]));
    run(&mut f, &[2, 1, 100, 0]).unwrap();
    assert!(!f.accepts(&eth(OTHER, Some(100))));
    assert_eq!(f.state().vlans, Some(vec![5]));
    f.reset(MAC);
    assert_eq!(f.mac(), MAC);
    assert!(f.state().promisc && f.state().vlans.is_none());
}

#[test]
fn ctrl_commands_need_their_features_and_bounds() {
    let mut f = RxFilter::new(MAC);
    f.set_features(1 << VIRTIO_NET_F_CTRL_RX, 1);
    run(&mut f, &[0, 0, 0]).unwrap();
    for (bytes, bit) in [
        (vec![0, 2, 1], VIRTIO_NET_F_CTRL_RX_EXTRA),
        (cmd(1, 1, &OTHER), VIRTIO_NET_F_CTRL_MAC_ADDR),
        (vec![2, 0, 1, 0], VIRTIO_NET_F_CTRL_VLAN),
        (vec![3, 0], VIRTIO_NET_F_GUEST_ANNOUNCE),
        (vec![4, 0, 1, 0], VIRTIO_NET_F_MQ),
    ] {
        let before = f.clone();
        let e = run(&mut f, &bytes).unwrap_err();
        assert_eq!(
            e,
            CtrlError::NotNegotiated {
                what: format!("{:?}", parse(&bytes).unwrap()),
                bit
            }
        );
        assert_eq!(f, before, "a refused command changes nothing");
    }
    // Without CTRL_VLAN, every VLAN passes.
    assert!(f.accepts(&eth(MAC, Some(42))));
    let mut f = filter();
    for n in [0u16, 5] {
        let e = run(&mut f, &cmd(4, 0, &n.to_le_bytes())).unwrap_err();
        assert_eq!(e, CtrlError::QueuePairs { got: n, max: 4 });
    }
    run(&mut f, &cmd(4, 0, &4u16.to_le_bytes())).unwrap();
    assert_eq!(f.queue_pairs(), 4);
    let mut g = RxFilter::new(MAC);
    g.set_features(
        (1 << virtio_bindings::virtio_net::VIRTIO_NET_F_CTRL_GUEST_OFFLOADS) | 1,
        1,
    );
    assert_eq!(
        run(&mut g, &cmd(5, 0, &3u64.to_le_bytes())).unwrap_err(),
        CtrlError::Offloads(2)
    );
    run(&mut g, &cmd(5, 0, &1u64.to_le_bytes())).unwrap();
}

#[test]
fn ctrl_state_round_trips_and_bad_states_are_refused() {
    let mut f = filter();
    run(&mut f, &[0, 0, 0]).unwrap();
    run(&mut f, &cmd(1, 1, &OTHER)).unwrap();
    run(&mut f, &[2, 0, 100, 0]).unwrap();
    run(
        &mut f,
        &cmd(1, 0, &[table(&[MAC]), table(&[MCAST])].concat()),
    )
    .unwrap();
    let saved = f.state();
    let json = serde_json::to_string(&saved).unwrap();
    let back: RxFilterState = serde_json::from_str(&json).unwrap();
    let mut g = filter();
    g.restore(&back).unwrap();
    for frame in [
        eth(OTHER, Some(100)),
        eth(OTHER, Some(101)),
        eth(MAC, None),
        eth(MCAST, None),
        eth(MCAST2, None),
        eth([0x02, 1, 2, 3, 4, 5], None),
    ] {
        assert_eq!(g.accepts(&frame), f.accepts(&frame), "{frame:02x?}");
    }
    assert_eq!(g.state(), saved);

    let mut bad = saved.clone();
    bad.vlans = Some(vec![4096]);
    assert_eq!(g.restore(&bad).unwrap_err(), CtrlError::Vid(4096));
    let mut bad = saved.clone();
    bad.queue_pairs = 9;
    assert!(g.restore(&bad).is_err());
    let mut bad = saved.clone();
    bad.unicast = vec![MAC; 65];
    assert!(g.restore(&bad).is_err());
    assert_eq!(g.state(), saved, "a refused state changes nothing");
}
