//! `uffd_handshake`: the body a page-fault handler receives from a VMM
//! (Firecracker's JSON list of guest region mappings), through
//! `ember_uffd::parse_handshake`, which also validates the regions; a list
//! it accepts must hold regions that pass `validate_regions` and serialize
//! back to a body it accepts again.

/// The target.
pub fn uffd_handshake(data: &[u8]) {
    let Ok(regions) = ember_uffd::parse_handshake(data) else {
        return;
    };
    assert!(ember_uffd::validate_regions(&regions).is_ok());
    let again = serde_json::to_vec(&regions).expect("regions serialize");
    assert_eq!(ember_uffd::parse_handshake(&again).ok(), Some(regions));
}

/// Hand-made seeds: Firecracker's bodies (1.12 on, 1.7-1.11, before 1.7),
/// two regions, and broken ones.
pub fn seeds() -> Vec<crate::seeds::NamedSeed> {
    let one = r#"[{"base_host_virt_addr":140045439397888,"size":134217728,"offset":0,"page_size":4096,"page_size_kib":4096}]"#;
    let two = r#"[{"base_host_virt_addr":139637976727552,"size":3221225472,"offset":0,"page_size":4096,"page_size_kib":4096},{"base_host_virt_addr":139641271844864,"size":1073741824,"offset":3221225472,"page_size":4096,"page_size_kib":4096}]"#;
    let kib = r#"[{"base_host_virt_addr":140045439397888,"size":134217728,"offset":0,"page_size_kib":4096}]"#;
    let none = r#"[{"base_host_virt_addr":140045439397888,"size":134217728,"offset":0}]"#;
    let overlap = r#"[{"base_host_virt_addr":4096,"size":8192,"offset":0,"page_size":4096},{"base_host_virt_addr":8192,"size":4096,"offset":8192,"page_size":4096}]"#;
    vec![
        ("fc_1_12", one.into()),
        ("two_regions", two.into()),
        ("page_size_kib_only", kib.into()),
        ("no_page_size", none.into()),
        ("overlap", overlap.into()),
        ("empty", b"[]".to_vec()),
    ]
}
