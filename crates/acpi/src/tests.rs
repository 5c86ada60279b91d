use super::*;

fn machine(cpus: u8, numa: Vec<Node>) -> Machine {
    Machine {
        cpus,
        lapic_addr: 0xfee0_0000,
        ioapic_addr: 0xfec0_0000,
        ecam: Window {
            base: 0xe000_0000,
            size: 1 << 20,
        },
        mmio32: Window {
            base: 0xc000_0000,
            size: 0x2000_0000,
        },
        mmio64: Window {
            base: 1 << 32,
            size: 1 << 36,
        },
        sleep_port: 0x600,
        power_button_gsi: 23,
        numa,
        virtio_mmio: Vec::new(),
    }
}

fn two_nodes() -> Vec<Node> {
    vec![
        Node {
            cpus: vec![0, 1],
            memory: vec![Window {
                base: 0,
                size: 256 << 20,
            }],
            distances: vec![10, 20],
        },
        Node {
            cpus: vec![2, 3],
            memory: vec![Window {
                base: 256 << 20,
                size: 256 << 20,
            }],
            distances: vec![20, 10],
        },
    ]
}

const BASE: u64 = 0xe_0000;

fn table<'a>(t: &'a Tables, sig: &[u8; 4]) -> &'a [u8] {
    let info = t
        .tables
        .iter()
        .find(|i| &i.signature == sig)
        .unwrap_or_else(|| panic!("no {}", String::from_utf8_lossy(sig)));
    let at = usize::try_from(info.addr - t.base).unwrap();
    &t.image[at..at + info.len]
}

fn sum(b: &[u8]) -> u8 {
    b.iter().fold(0u8, |a, x| a.wrapping_add(*x))
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
}

#[test]
fn every_table_checksums_and_the_pointers_chain() {
    let t = build(&machine(4, two_nodes()), BASE, 0x1_0000).unwrap();
    let rsdp = table(&t, b"RSD ");
    assert_eq!(&rsdp[..8], b"RSD PTR ");
    assert_eq!(sum(&rsdp[..20]), 0, "RSDP v1 checksum");
    assert_eq!(sum(rsdp), 0, "RSDP extended checksum");
    for info in &t.tables[1..] {
        let b = table(&t, &info.signature);
        assert_eq!(&b[..4], &info.signature);
        assert_eq!(
            u32_at(b, 4) as usize,
            b.len(),
            "length of {:?}",
            info.signature
        );
        assert_eq!(sum(b), 0, "checksum of {:?}", info.signature);
        assert_eq!(info.addr % 16, 0);
    }
    // RSDP -> XSDT -> FACP, APIC, MCFG, SRAT, SLIT; FACP -> DSDT.
    let xsdt_addr = u64_at(rsdp, 24);
    let xsdt = table(&t, b"XSDT");
    assert_eq!(
        xsdt_addr,
        t.tables
            .iter()
            .find(|i| &i.signature == b"XSDT")
            .unwrap()
            .addr
    );
    let entries: Vec<u64> = (36..xsdt.len())
        .step_by(8)
        .map(|o| u64_at(xsdt, o))
        .collect();
    let named = |sig: &[u8; 4]| t.tables.iter().find(|i| &i.signature == sig).unwrap().addr;
    assert_eq!(
        entries,
        vec![
            named(b"FACP"),
            named(b"APIC"),
            named(b"MCFG"),
            named(b"SRAT"),
            named(b"SLIT")
        ]
    );
    let fadt = table(&t, b"FACP");
    assert_eq!(u64_at(fadt, 140), named(b"DSDT"), "X_DSDT");
    assert_ne!(u32_at(fadt, 112) & (1 << 20), 0, "hardware-reduced");
    // Sleep control register: system I/O, byte access, at the port.
    assert_eq!(fadt[244], 1);
    assert_eq!(u64_at(fadt, 248), 0x600);
    assert_eq!(u64_at(fadt, 260), 0x601);
}

#[test]
fn madt_lists_each_cpu_and_the_ioapic() {
    let t = build(&machine(3, Vec::new()), BASE, 0x1_0000).unwrap();
    let madt = table(&t, b"APIC");
    assert_eq!(u32_at(madt, 36), 0xfee0_0000);
    let mut at = 44;
    let mut apics = Vec::new();
    let mut ioapic = None;
    while at < madt.len() {
        let (kind, len) = (madt[at], usize::from(madt[at + 1]));
        match kind {
            0 => apics.push((madt[at + 2], madt[at + 3], u32_at(madt, at + 4))),
            1 => ioapic = Some((madt[at + 2], u32_at(madt, at + 4), u32_at(madt, at + 8))),
            other => panic!("unexpected MADT entry {other}"),
        }
        at += len;
    }
    assert_eq!(apics, vec![(0, 0, 1), (1, 1, 1), (2, 2, 1)]);
    assert_eq!(ioapic, Some((3, 0xfec0_0000, 0)));
    // No NUMA: no SRAT, no SLIT.
    assert!(!t.tables.iter().any(|i| &i.signature == b"SRAT"));
    assert!(!t.tables.iter().any(|i| &i.signature == b"SLIT"));
}

#[test]
fn mcfg_and_dsdt_describe_the_mmconfig_area_and_the_bridge() {
    let t = build(&machine(1, Vec::new()), BASE, 0x1_0000).unwrap();
    let mcfg = table(&t, b"MCFG");
    assert_eq!(u64_at(mcfg, 44), 0xe000_0000);
    assert_eq!((mcfg[54], mcfg[55]), (0, 0), "buses 0-0");
    let dsdt = table(&t, b"DSDT");
    let has = |needle: &[u8]| dsdt.windows(needle.len()).any(|w| w == needle);
    for name in [
        &b"PCI0"[..],
        b"MRES",
        b"COM1",
        b"PS2K",
        b"RTC_",
        b"_S5_",
        b"_CRS",
    ] {
        assert!(has(name), "DSDT lacks {}", String::from_utf8_lossy(name));
    }
    assert!(!has(b"_PXM"), "no NUMA, no _PXM");
    // PNP0A08 as an EISA id.
    assert!(has(&[0x41, 0xd0, 0x0a, 0x08]));
    // The 64-bit window's bounds as a QWord address space.
    assert!(has(&(1u64 << 32).to_le_bytes()));
    assert!(has(&((1u64 << 32) + (1 << 36) - 1).to_le_bytes()));
}

#[test]
fn srat_and_slit_carry_the_nodes() {
    let t = build(&machine(4, two_nodes()), BASE, 0x1_0000).unwrap();
    let srat = table(&t, b"SRAT");
    assert_eq!(u32_at(srat, 36), 1);
    let mut at = 48;
    let mut cpus = Vec::new();
    let mut mem = Vec::new();
    while at < srat.len() {
        let (kind, len) = (srat[at], usize::from(srat[at + 1]));
        match kind {
            0 => {
                assert_eq!(len, 16);
                cpus.push((srat[at + 3], srat[at + 2], u32_at(srat, at + 4)));
            }
            1 => {
                assert_eq!(len, 40);
                mem.push((
                    u32_at(srat, at + 2),
                    u64_at(srat, at + 8),
                    u64_at(srat, at + 16),
                ));
            }
            other => panic!("unexpected SRAT entry {other}"),
        }
        at += len;
    }
    assert_eq!(cpus, vec![(0, 0, 1), (1, 0, 1), (2, 1, 1), (3, 1, 1)]);
    assert_eq!(mem, vec![(0, 0, 256 << 20), (1, 256 << 20, 256 << 20)]);
    let dsdt = table(&t, b"DSDT");
    assert!(
        dsdt.windows(4).any(|w| w == b"_PXM"),
        "the bridge has a node"
    );
    let slit = table(&t, b"SLIT");
    assert_eq!(u64_at(slit, 36), 2);
    assert_eq!(&slit[44..48], &[10, 20, 20, 10]);
}

#[test]
fn bad_layouts_are_refused_naming_the_problem() {
    let mut two = two_nodes();
    two[1].cpus = vec![1, 2, 3];
    let e = build(&machine(4, two), BASE, 0x1_0000).unwrap_err();
    assert_eq!(
        e.to_string(),
        "NUMA layout: vCPU 1 is in node 0 and in node 1"
    );
    let mut two = two_nodes();
    two[1].cpus = vec![2];
    let e = build(&machine(4, two), BASE, 0x1_0000).unwrap_err();
    assert_eq!(e.to_string(), "NUMA layout: vCPU 3 is in no node");
    let mut two = two_nodes();
    two[0].distances = vec![10, 30];
    let e = build(&machine(4, two), BASE, 0x1_0000).unwrap_err();
    assert!(e.to_string().contains("must be symmetric"), "{e}");
    let mut two = two_nodes();
    two[1].distances = vec![20, 12];
    let e = build(&machine(4, two), BASE, 0x1_0000).unwrap_err();
    assert!(e.to_string().contains("distance to itself is 12"), "{e}");
    let mut two = two_nodes();
    two[0].cpus.push(9);
    let e = build(&machine(4, two), BASE, 0x1_0000).unwrap_err();
    assert!(e.to_string().contains("names vCPU 9"), "{e}");
    assert_eq!(
        build(&machine(0, Vec::new()), BASE, 0x1_0000).unwrap_err(),
        Error::Cpus(0)
    );
    assert_eq!(
        build(&machine(255, Vec::new()), BASE, 0x1_0000).unwrap_err(),
        Error::Cpus(255)
    );
    assert!(matches!(
        build(&machine(200, Vec::new()), BASE, 0x400).unwrap_err(),
        Error::TooLarge { max: 0x400, .. }
    ));
    let mut m = machine(1, Vec::new());
    m.ecam.size = 4096;
    assert!(matches!(
        build(&m, BASE, 0x1_0000).unwrap_err(),
        Error::Window("MMCONFIG", ..)
    ));
    let mut m = machine(1, Vec::new());
    m.power_button_gsi = 24;
    let e = build(&m, BASE, 0x1_0000).unwrap_err();
    assert_eq!(e, Error::Gsi(24));
    assert!(e
        .to_string()
        .contains("GSI 24 is not an IOAPIC pin (0 to 23)"));
}

#[test]
fn dsdt_has_a_power_button_pressed_by_a_generic_event_device() {
    let t = build(&machine(1, Vec::new()), BASE, 0x1_0000).unwrap();
    let dsdt = table(&t, b"DSDT");
    let has = |needle: &[u8]| dsdt.windows(needle.len()).any(|w| w == needle);
    assert!(has(b"PWRB") && has(b"GED0") && has(b"_EVT"));
    // PNP0C0C as an EISA id; ACPI0013 as a string.
    assert!(has(&[0x0c, 0x41, 0xd0, 0x0c, 0x0c]));
    assert!(has(b"\x0dACPI0013\0"));
    // Extended interrupt: consumer, edge, active high, exclusive, one GSI (23).
    assert!(has(&[0x89, 0x06, 0x00, 0x03, 0x01, 23, 0, 0, 0]));
    // Notify (\_SB_.PWRB, 0x80).
    assert!(has(b"\x86\\\x2e_SB_PWRB\x0a\x80"));
}

#[test]
fn dsdt_describes_each_virtio_mmio_device_with_its_window_and_interrupt() {
    let mut m = machine(1, Vec::new());
    m.virtio_mmio = vec![
        VirtioMmio {
            window: Window {
                base: 0xd000_0000,
                size: 0x1000,
            },
            gsi: 5,
        },
        VirtioMmio {
            window: Window {
                base: 0xd000_1000,
                size: 0x1000,
            },
            gsi: 16,
        },
    ];
    let t = build(&m, BASE, 0x1_0000).unwrap();
    let dsdt = table(&t, b"DSDT");
    let has = |needle: &[u8]| dsdt.windows(needle.len()).any(|w| w == needle);
    assert!(has(b"VR00") && has(b"VR01"));
    assert!(has(b"\x0dLNRO0005\0"));
    // Memory32Fixed (ReadWrite, 0xd0001000, 0x1000).
    assert!(has(&[
        0x86, 0x09, 0x00, 0x01, 0x00, 0x10, 0x00, 0xd0, 0x00, 0x10, 0x00, 0x00
    ]));
    // Extended interrupts on pins 5 and 16, edge, active high.
    assert!(has(&[0x89, 0x06, 0x00, 0x03, 0x01, 5, 0, 0, 0]));
    assert!(has(&[0x89, 0x06, 0x00, 0x03, 0x01, 16, 0, 0, 0]));
    // A pin the IOAPIC lacks, or the power button's, is refused.
    m.virtio_mmio[1].gsi = 23;
    assert_eq!(build(&m, BASE, 0x1_0000).unwrap_err(), Error::Gsi(23));
    m.virtio_mmio[1].gsi = 30;
    assert_eq!(build(&m, BASE, 0x1_0000).unwrap_err(), Error::Gsi(30));
    m.virtio_mmio[1].gsi = 16;
    m.virtio_mmio[1].window.base = 0xffff_ffff;
    assert!(matches!(
        build(&m, BASE, 0x1_0000).unwrap_err(),
        Error::Window("virtio-mmio", ..)
    ));
}

#[test]
fn power_off_is_slp_en_with_the_s5_type() {
    assert!(is_power_off(SLEEP_ENABLE | (S5_SLEEP_TYPE << 2)));
    assert!(!is_power_off(S5_SLEEP_TYPE << 2));
    assert!(!is_power_off(SLEEP_ENABLE | (3 << 2)));
    assert!(!is_power_off(0));
}
