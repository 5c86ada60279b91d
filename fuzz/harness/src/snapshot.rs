//! `snapshot_state`: a snapshot state file, as `PUT /snapshot/load` and
//! `ember --restore` read it, then every check and component restore that
//! needs no KVM: the configuration the VM would be rebuilt with, the CPU
//! fingerprint's check against a host, the UART,
//! i8042 and CMOS states, and each disk's and NIC's transport state
//! restored into a freshly built virtio-pci function (which reactivates a
//! running device on the fuzzer's guest memory) and kicked.
//!
//! Input: one mode byte, then the file. With bit 0 of the mode set, the
//! rest is taken as the envelope's JSON body and wrapped with a valid
//! header and CRC, so the fuzzer explores the state itself rather than
//! stopping at the checksum; otherwise it is the file as is.

use std::os::unix::net::UnixDatagram;
use std::sync::Arc;

use ember_pci::{MsiMessage, MsiSink};
use ember_virtio::{VirtioDevice, VirtioPciDevice};
use ember_virtio_blk::Block;
use ember_virtio_net::Net;
use ember_vmm::snapshot::{config_for, LoadParams, MemorySource, VmState};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::blk::CheckedDisk;
use crate::guest::{guest_memory, init_logging};
use crate::net::SocketTap;
use crate::transport::BAR;

/// Wrap the input as a body with a valid header and CRC.
pub const MODE_WRAP: u8 = 1;

struct Msi;

impl MsiSink for Msi {
    fn configure(&self, _vector: u16, _msg: MsiMessage) -> std::io::Result<()> {
        Ok(())
    }
    fn fire(&self, _vector: u16) -> std::io::Result<()> {
        Ok(())
    }
}

/// A state file with a valid envelope around `body` (the seeds and
/// [`MODE_WRAP`] use it).
pub fn wrap(body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(body.len() + 28);
    out.extend_from_slice(&ember_snapshot::MAGIC);
    out.extend_from_slice(&ember_snapshot::FORMAT_VERSION.to_le_bytes());
    out.extend_from_slice(&(body.len() as u64).to_le_bytes());
    out.extend_from_slice(body);
    let crc = crc::Crc::<u64>::new(&crc::CRC_64_XZ).checksum(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    out
}

fn restore_into<D: VirtioDevice>(device: D, state: &ember_virtio::TransportState) {
    let mem = guest_memory(&[]);
    let Ok(mut dev) = VirtioPciDevice::new("fuzz", device, mem, BAR, Arc::new(Msi)) else {
        return;
    };
    if dev.restore_state(state).is_ok() {
        // A restored device must be running and hold its saved state.
        assert!(dev.is_running() || !state.activated);
        dev.kick();
    }
}

/// The target.
pub fn snapshot_state(data: &[u8]) {
    init_logging();
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let file = if mode & MODE_WRAP != 0 {
        wrap(rest)
    } else {
        rest.to_vec()
    };
    let Ok(env) = ember_snapshot::decode::<VmState>(&file) else {
        return;
    };
    let state = env.state;
    let load = LoadParams {
        state_path: "state".into(),
        memory: MemorySource::File("mem".into()),
        network_overrides: vec![("net0".into(), "tap1".into())],
        disk_overrides: Vec::new(),
        track_dirty_pages: true,
        vsock_override: Some("v.sock".into()),
    };
    let _ = config_for(&state, &load);
    // The CPU check a restore makes first, on a host like the fuzzer's.
    let _ = state.cpu.check(&crate::cpu::fuzz_host());
    if let (Ok(irq), Ok(drained)) = (EventFd::new(EFD_NONBLOCK), EventFd::new(EFD_NONBLOCK)) {
        let _ =
            ember_legacy::SerialDevice::from_state(irq, drained, std::io::sink(), &state.serial);
    }
    if let (Ok(reset), Ok(irq)) = (EventFd::new(EFD_NONBLOCK), EventFd::new(EFD_NONBLOCK)) {
        let _ = ember_legacy::I8042::new(reset, irq).restore_state(&state.i8042);
    }
    let _ = ember_legacy::Cmos::default().restore_state(&state.cmos);
    for d in state.disks.iter().take(4) {
        let disk = CheckedDisk::in_memory(0x1_0000, d.block.read_only);
        let block = Block::with_backend(Box::new(disk), d.block.read_only, None);
        let _ = block.check_state(&d.block);
        restore_into(block, &d.transport);
    }
    for n in state.nets.iter().take(4) {
        let Ok((dev_end, _peer)) = UnixDatagram::pair() else {
            return;
        };
        let _ = dev_end.set_nonblocking(true);
        let mut net = Net::with_backend(Box::new(SocketTap::new(dev_end, false)), n.net.mac, true);
        let _ = net.restore_state(&n.net);
        restore_into(net, &n.transport);
    }
}

/// A state as ember writes it, for a VM with a running disk and NIC whose
/// queues are in the fuzzer's guest memory.
fn sample_state() -> Option<VmState> {
    use ember_virtio::QueueState;
    let mem = guest_memory(&[]);
    let disk = CheckedDisk::in_memory(0x1_0000, false);
    let block = Block::with_backend(Box::new(disk), false, None);
    let block_state = block.state();
    let blk = VirtioPciDevice::new("fuzz", block, mem.clone(), BAR, Arc::new(Msi)).ok()?;
    let (dev_end, _peer) = UnixDatagram::pair().ok()?;
    let mac = [0x52, 0x54, 0, 1, 2, 3];
    let net = Net::with_backend(Box::new(SocketTap::new(dev_end, false)), mac, true);
    let net_state = net.state();
    let netdev = VirtioPciDevice::new("fuzz", net, mem, BAR, Arc::new(Msi)).ok()?;
    let running = |mut t: ember_virtio::TransportState, queues: usize| {
        t.status = 0xf;
        t.driver_features = 1 << 32;
        t.activated = true;
        t.queue_vectors = vec![0; queues];
        t.queues = (0..queues as u64)
            .map(|i| QueueState {
                max_size: 256,
                size: 16,
                ready: true,
                desc_table: 0x1000 + i * 0x1000,
                avail_ring: 0x4000 + i * 0x1000,
                used_ring: 0x8000 + i * 0x1000,
                next_avail: 3,
                next_used: 2,
                event_idx: false,
            })
            .collect();
        t.device_queues = t.queues.clone();
        t
    };
    let serial = {
        let (irq, drained) = (
            EventFd::new(EFD_NONBLOCK).ok()?,
            EventFd::new(EFD_NONBLOCK).ok()?,
        );
        ember_legacy::SerialDevice::new(irq, drained, std::io::sink()).state()
    };
    let i8042 = {
        let (reset, irq) = (
            EventFd::new(EFD_NONBLOCK).ok()?,
            EventFd::new(EFD_NONBLOCK).ok()?,
        );
        ember_legacy::I8042::new(reset, irq).state()
    };
    let host = crate::cpu::fuzz_host();
    let spec = ember_vcpu::model::CpuSpec::parse("EPYC-Rome,check").ok()?;
    let model = ember_vcpu::model::resolve(&spec, &host).ok()?;
    let cpu = ember_vcpu::model::fingerprint::CpuFingerprint::new(
        &model,
        &model.cpuid(&host).ok()?,
        Some(2_000_000),
    );
    let json = serde_json::json!({
        "version": 2,
        "machine": {"vcpus": 1, "memory_mib": 128, "cmdline": "console=ttyS0"},
        "cpu": cpu,
        "memory": [{"guest_addr": 0, "size": 134217728u64, "file_offset": 0}],
        "kvm": {
            "pic_master": vec![0u8; 520], "pic_slave": vec![0u8; 520], "ioapic": vec![0u8; 520],
            "pit": vec![0u8; 112], "clock": vec![0u8; 48]
        },
        "vcpus": [{
            "version": 1, "index": 0, "cpuid": [], "mp_state": vec![0u8; 4],
            "regs": vec![0u8; 144], "sregs": vec![0u8; 312], "xsave": vec![0u8; 4096],
            "xcrs": vec![0u8; 392], "debugregs": vec![0u8; 128], "lapic": vec![0u8; 1024],
            "msrs": [], "events": vec![0u8; 64]
        }],
        "serial": serial,
        "i8042": i8042,
        "cmos": ember_legacy::Cmos::default().state(),
        "disks": [{
            "config": {"path": "disk.img", "read_only": false, "id": null, "drive_id": "root", "root": true},
            "transport": running(blk.state(), 1),
            "block": block_state
        }],
        "nets": [{
            "config": {"tap": "tap0", "mac": null, "offloads": true, "iface_id": "net0"},
            "transport": running(netdev.state(), 2),
            "net": net_state
        }]
    });
    serde_json::from_value(json).ok()
}

/// The hand-made seeds: a whole state (raw file and wrapped body), and
/// files broken in the ways a bad snapshot is.
pub fn seeds() -> Vec<crate::seeds::NamedSeed> {
    let Some(state) = sample_state() else {
        return Vec::new();
    };
    let env = ember_snapshot::Envelope {
        ember_version: "1.0.0".into(),
        cpu: "fuzz".into(),
        kind: ember_snapshot::SnapshotKind::Full,
        state,
    };
    let Ok(file) = ember_snapshot::encode(&env) else {
        return Vec::new();
    };
    let body = file[20..file.len() - 8].to_vec();
    let with_mode = |mode: u8, bytes: &[u8]| [&[mode][..], bytes].concat();
    let mut flipped = file.clone();
    flipped[40] ^= 1;
    let mut version = file.clone();
    version[8] = 2;
    vec![
        ("file", with_mode(0, &file)),
        ("body", with_mode(MODE_WRAP, &body)),
        ("truncated", with_mode(0, &file[..file.len() / 2])),
        ("flipped", with_mode(0, &flipped)),
        ("version", with_mode(0, &version)),
        ("empty_body", with_mode(MODE_WRAP, b"{}")),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snapshot_seeds_decode_and_restore_running_devices() {
        let seeds = seeds();
        assert_eq!(seeds.len(), 6, "the sample state serializes");
        let file = &seeds[0].1[1..];
        let env = ember_snapshot::decode::<VmState>(file).unwrap();
        assert_eq!(env.state.disks.len(), 1);
        // The sample's devices come back running on the fuzzer's memory.
        let disk = CheckedDisk::in_memory(0x1_0000, false);
        let block = Block::with_backend(Box::new(disk), false, None);
        let mut dev =
            VirtioPciDevice::new("fuzz", block, guest_memory(&[]), BAR, Arc::new(Msi)).unwrap();
        dev.restore_state(&env.state.disks[0].transport).unwrap();
        assert!(dev.is_running());
        for (_, s) in &seeds {
            snapshot_state(s);
        }
        for (name, s) in &seeds[2..5] {
            assert!(
                ember_snapshot::decode::<VmState>(&s[1..]).is_err(),
                "{name}"
            );
        }
    }
}
