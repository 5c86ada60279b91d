//! Unit tests for the configuration space.

use super::*;

fn params() -> PciConfigParams {
    PciConfigParams {
        vendor_id: 0x1af4,
        device_id: 0x1041,
        revision: 1,
        class: 0x02,
        subclass: 0x00,
        prog_if: 0,
        subsystem_vendor_id: 0x1af4,
        subsystem_id: 0x40,
    }
}

fn bar(index: u8, addr: u64, size: u64, kind: BarKind) -> PciBar {
    PciBar {
        index,
        addr,
        size,
        kind,
        prefetchable: false,
    }
}

fn with_bars() -> PciConfiguration {
    let mut c = PciConfiguration::new(&params());
    c.add_bar(bar(0, 0xc000_1000, 0x1000, BarKind::Mem32))
        .unwrap();
    c.add_bar(PciBar {
        prefetchable: true,
        ..bar(2, 0x1_0000_0000, 0x4000, BarKind::Mem64)
    })
    .unwrap();
    c.add_bar(bar(4, 0xc040, 0x20, BarKind::Io)).unwrap();
    c
}

#[test]
fn config_new_sets_identity_and_header_type() {
    let c = PciConfiguration::new(&params());
    assert_eq!(c.read_u32(0x00), 0x1041_1af4);
    assert_eq!(c.read_u32(0x08), 0x0200_0001);
    assert_eq!(c.read_u32(0x0c), 0);
    assert_eq!(c.read_u32(0x2c), 0x0040_1af4);
    assert_eq!(c.read_u32(0x34), 0);
    assert_eq!(c.read_u32(0x3c), 0);
}

#[test]
fn config_read_only_fields_ignore_writes() {
    let mut c = PciConfiguration::new(&params());
    assert_eq!(c.write_u32(0x00, 0xdead_beef), None);
    c.write_u32(0x08, 0xffff_ffff);
    c.write(0x0b, &[0x55]);
    c.write(0x0e, &[0x80]);
    c.write_u32(0x2c, 0);
    assert_eq!(c.read_u32(0x00), 0x1041_1af4);
    assert_eq!(c.read_u32(0x08), 0x0200_0001);
    assert_eq!(c.read_u32(0x0c), 0);
    assert_eq!(c.read_u32(0x2c), 0x0040_1af4);
}

#[test]
fn config_command_register_keeps_only_writable_bits() {
    let mut c = PciConfiguration::new(&params());
    c.write(0x04, &[0xff, 0xff]);
    let mut cmd = [0u8; 2];
    c.read(0x04, &mut cmd);
    assert_eq!(u16::from_le_bytes(cmd), 0x0407);
    c.write(0x04, &[0x02, 0x00]);
    c.read(0x04, &mut cmd);
    assert_eq!(u16::from_le_bytes(cmd), 0x0002);
}

#[test]
fn config_status_w1c_bits_clear_and_others_are_read_only() {
    let mut c = PciConfiguration::new(&params());
    // The device latched every error bit plus bits it owns.
    c.put(STATUS, &0xf910u16.to_le_bytes());
    // Writing 0 changes nothing.
    c.write(0x06, &[0, 0]);
    assert_eq!(c.read_u32(0x04) >> 16, 0xf910);
    // Writing 1 to bits 8 and 15 clears just those; bit 4 stays.
    c.write(0x06, &0x8110u16.to_le_bytes());
    assert_eq!(c.read_u32(0x04) >> 16, 0x7810);
    // A dword write to command+status clears status bits too.
    c.write_u32(0x04, 0xffff_0006);
    assert_eq!(c.read_u32(0x04), 0x0010_0006);
}

#[test]
fn config_bar_sizing_probe_returns_size_mask() {
    let mut c = with_bars();
    assert_eq!(c.write_u32(0x10, 0xffff_ffff), None);
    assert_eq!(c.read_u32(0x10), 0xffff_f000);
    assert_eq!(c.write_u32(0x10, 0xc000_1000), None);
    assert_eq!(c.read_u32(0x10), 0xc000_1000);
    assert_eq!(c.bar(0).unwrap().addr, 0xc000_1000);
}

#[test]
fn config_bar_sizing_64bit_covers_both_halves() {
    let mut c = with_bars();
    assert_eq!(c.read_u32(0x18), 0x0000_000c);
    assert_eq!(c.read_u32(0x1c), 0x0000_0001);
    assert_eq!(c.write_u32(0x18, 0xffff_ffff), None);
    assert_eq!(c.read_u32(0x18), 0xffff_c00c);
    assert_eq!(c.write_u32(0x18, 0x0000_0000), None);
    assert_eq!(c.write_u32(0x1c, 0xffff_ffff), None);
    assert_eq!(c.read_u32(0x1c), 0xffff_ffff);
    assert_eq!(c.write_u32(0x1c, 0x0000_0001), None);
    assert_eq!(c.read_u32(0x18), 0x0000_000c);
    assert_eq!(c.read_u32(0x1c), 0x0000_0001);
    assert_eq!(c.bar(2).unwrap().addr, 0x1_0000_0000);
    assert_eq!(c.bar(3), None);
}

#[test]
fn config_bar_sizing_io_sets_io_bit() {
    let mut c = with_bars();
    assert_eq!(c.read_u32(0x20), 0xc041);
    assert_eq!(c.write_u32(0x20, 0xffff_ffff), None);
    assert_eq!(c.read_u32(0x20), 0xffff_ffe1);
    assert_eq!(c.write_u32(0x20, 0xc040), None);
    assert_eq!(c.read_u32(0x20), 0xc041);
}

#[test]
fn config_bar_large_64bit_sizes_through_upper_half() {
    let mut c = PciConfiguration::new(&params());
    c.add_bar(bar(0, 0x2_0000_0000, 0x2_0000_0000, BarKind::Mem64))
        .unwrap();
    c.write_u32(0x10, 0xffff_ffff);
    assert_eq!(c.read_u32(0x10), 0x4);
    assert_eq!(c.write_u32(0x14, 0xffff_ffff), None);
    assert_eq!(c.read_u32(0x14), 0xffff_fffe);
    assert_eq!(
        c.write_u32(0x14, 0x4),
        Some(BarMove {
            index: 0,
            old: 0x2_0000_0000,
            new: 0x4_0000_0000,
            size: 0x2_0000_0000,
        })
    );
}

#[test]
fn config_bar_move_is_reported_once() {
    let mut c = with_bars();
    let mv = c.write_u32(0x10, 0xd000_0000);
    assert_eq!(
        mv,
        Some(BarMove {
            index: 0,
            old: 0xc000_1000,
            new: 0xd000_0000,
            size: 0x1000
        })
    );
    assert_eq!(c.write_u32(0x10, 0xd000_0000), None);
    assert_eq!(c.bar(0).unwrap().addr, 0xd000_0000);
    // Low bits below the size are read-only, so this is the same address.
    assert_eq!(c.write_u32(0x10, 0xd000_0fff), None);
}

#[test]
fn config_bar_move_64bit_reports_combined_address_per_dword() {
    let mut c = with_bars();
    let first = c.write_u32(0x18, 0x8000_0000).unwrap();
    assert_eq!((first.old, first.new), (0x1_0000_0000, 0x1_8000_0000));
    let second = c.write_u32(0x1c, 0x2).unwrap();
    assert_eq!((second.old, second.new), (0x1_8000_0000, 0x2_8000_0000));
    assert_eq!(second.index, 2);
    assert_eq!(c.bar(2).unwrap().addr, 0x2_8000_0000);
}

#[test]
fn config_bar_io_move_reported() {
    let mut c = with_bars();
    let mv = c.write(0x20, &[0x80, 0xc0]).unwrap();
    assert_eq!((mv.index, mv.old, mv.new), (4, 0xc040, 0xc080));
}

#[test]
fn config_empty_bar_slot_and_rom_read_zero_and_ignore_writes() {
    let mut c = with_bars();
    for off in [0x14u16, 0x24, 0x30] {
        assert_eq!(c.write_u32(off, 0xffff_ffff), None);
        assert_eq!(c.read_u32(off), 0);
    }
}

#[test]
fn config_add_bar_rejects_bad_bars() {
    let mut c = with_bars();
    let bad = [
        bar(6, 0, 0x1000, BarKind::Mem32),
        bar(5, 0, 0x1000, BarKind::Mem64),
        bar(0, 0xe000_0000, 0x1000, BarKind::Mem32),
        bar(3, 0xe000_0000, 0x1000, BarKind::Mem32),
        bar(5, 0xe000_0000, 0x1800, BarKind::Mem32),
        bar(5, 0xe000_0000, 8, BarKind::Mem32),
        bar(5, 0xe000_0800, 0x1000, BarKind::Mem32),
        bar(5, 0x1_0000_0000, 0x1000, BarKind::Mem32),
        bar(5, 0x10, 2, BarKind::Io),
        PciBar {
            prefetchable: true,
            ..bar(5, 0x10, 4, BarKind::Io)
        },
    ];
    for b in bad {
        assert!(c.add_bar(b).is_err(), "{b:?} accepted");
    }
    assert!(c.add_bar(bar(5, 0x10, 4, BarKind::Io)).is_ok());
}

#[test]
fn config_capability_list_walk_ends_at_zero() {
    let mut c = PciConfiguration::new(&params());
    let first = c.add_capability(0x09, &[1, 2, 3]).unwrap();
    let second = c.add_capability(0x11, &[0; 10]).unwrap();
    assert_eq!((first, second), (0x40, 0x48));
    assert_ne!(c.read_u32(0x04) >> 16 & 0x10, 0);
    let mut ids = Vec::new();
    let mut ptr = c.read_u32(0x34) & 0xfc;
    while ptr != 0 {
        let header = c.read_u32(u16::try_from(ptr).unwrap());
        ids.push(header & 0xff);
        ptr = (header >> 8) & 0xfc;
        assert!(ids.len() < 48, "capability loop");
    }
    assert_eq!(ids, vec![0x09, 0x11]);
    assert_eq!(c.read_u32(0x40) >> 16, 0x0201);
}

#[test]
fn config_capability_body_read_only_unless_set_writable() {
    let mut c = PciConfiguration::new(&params());
    let off = c.add_capability(0x11, &[0x03, 0x00]).unwrap();
    let ctl = u16::from(off) + 2;
    c.write(ctl, &[0xff, 0xff]);
    assert_eq!(c.read_u32(u16::from(off)) >> 16, 0x0003);
    c.set_writable(off + 2, &[0x00, 0xc0]);
    c.write(ctl, &[0xff, 0xff]);
    assert_eq!(c.read_u32(u16::from(off)) >> 16, 0xc003);
    // The next pointer stays read-only.
    c.write(u16::from(off) + 1, &[0x80]);
    assert_eq!(c.read_u32(u16::from(off)) >> 8 & 0xff, 0);
}

#[test]
fn config_capability_space_full_is_an_error() {
    let mut c = PciConfiguration::new(&params());
    assert!(c.add_capability(0x09, &[0; 174]).is_ok());
    assert!(c.add_capability(0x09, &[0; 32]).is_err());
    assert!(c.add_capability(0x09, &[0; 14]).is_ok());
    assert!(c.add_capability(0x09, &[]).is_err());
}

#[test]
fn config_access_sizes_and_unaligned_offsets() {
    let mut c = PciConfiguration::new(&params());
    let mut b1 = [0u8; 1];
    let mut b2 = [0u8; 2];
    let mut b4 = [0u8; 4];
    c.read(0x01, &mut b1);
    assert_eq!(b1, [0x1a]);
    c.read(0x01, &mut b2);
    assert_eq!(b2, [0x1a, 0x41]);
    c.read(0x01, &mut b4);
    assert_eq!(b4, [0x1a, 0x41, 0x10, 0x00]);
    let mut b3 = [0u8; 3];
    c.read(0x00, &mut b3);
    assert_eq!(b3, [0xff; 3]);
    // Interrupt line is scratch, reachable through an unaligned write.
    c.write(0x3b, &[0x11, 0x22, 0x33, 0x44]);
    assert_eq!(c.read_u32(0x3c), 0x0000_0022);
    c.write(0x3c, &[0x0a, 0x0b, 0x0c]);
    assert_eq!(c.read_u32(0x3c), 0x0000_0022);
    // Across the end: the extended space reads 0, past 4 KiB all-ones.
    c.write(0xfe, &[1, 2, 3, 4]);
    c.read(0xfe, &mut b4);
    assert_eq!(b4, [0, 0, 0, 0]);
    c.read(0x0ffe, &mut b4);
    assert_eq!(b4, [0, 0, 0xff, 0xff]);
    c.read(u16::MAX, &mut b2);
    assert_eq!(b2, [0xff, 0xff]);
    assert_eq!(c.write(u16::MAX, &[1, 2, 3, 4]), None);
}
