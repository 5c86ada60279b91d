//! Snapshots: a paused VM's whole state to a state file and a memory file
//! ([`ember_snapshot`]'s formats), and a new VM rebuilt from them.
//!
//! The state ([`VmState`]) is made of each component's own state type,
//! from the crate that owns the component: vCPUs (`ember-vcpu`), the UART,
//! i8042 and CMOS (`ember-legacy`), each virtio-pci function's transport
//! and queues (`ember-virtio`), the disks and NICs (`ember-virtio-blk`,
//! `ember-virtio-net`), plus the VM-wide KVM state (PIC, IOAPIC, PIT,
//! kvmclock) and the configuration that says how to rebuild the devices:
//! disk images by path, taps by name. A restore builds the same machine
//! (same memory layout, same bus order, same BARs and GSIs), puts each
//! component in its saved state, and starts the vCPUs parked.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::time::Instant;

use ember_snapshot::memory::{MemoryRegion, Pages};
use ember_snapshot::{Envelope, SnapshotKind};
use ember_vcpu::VcpuState;
use ember_virtio::TransportState;
use kvm_bindings::{
    kvm_clock_data, kvm_irqchip, kvm_pit_state2, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE,
};
use kvm_ioctls::VmFd;
use serde::{Deserialize, Serialize};

use crate::config::{DiskConfig, NetConfig, ValidConfig};
use crate::{devices, disks, nets, vm, Vmm};
use crate::{Error, Result};
use ember_memory::MemoryLayout;

/// The version of [`VmState`]'s layout.
pub const VM_STATE_VERSION: u32 = 2;

/// The VM-wide state KVM holds.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KvmVmState {
    /// The master PIC.
    pub pic_master: kvm_irqchip,
    /// The slave PIC.
    pub pic_slave: kvm_irqchip,
    /// The IOAPIC.
    pub ioapic: kvm_irqchip,
    /// The PIT.
    pub pit: kvm_pit_state2,
    /// kvmclock when the VM was paused.
    pub clock: kvm_clock_data,
}

/// What the guest was built with, to build it again.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Machine {
    /// vCPUs.
    pub vcpus: u8,
    /// RAM in MiB.
    pub memory_mib: u64,
    /// The command line the kernel booted with (informational).
    pub cmdline: String,
    /// Guest memory was a shared memfd (a migration's destination makes
    /// it one too; a snapshot restores it private).
    #[serde(default)]
    pub shared_memory: bool,
    /// How guest memory was backed (huge pages, THP, KSM, prefault): a
    /// migration's destination builds it the same way; a snapshot restored
    /// from its memory file keeps what a file mapping can (not huge pages).
    #[serde(default)]
    pub memory_backend: crate::config::MemoryBackend,
    /// The guest's NUMA nodes and their host binding (the guest's own view
    /// is in its memory; this is where the host puts each node's pages).
    #[serde(default)]
    pub numa: Vec<crate::config::NumaNode>,
    /// Host CPUs each vCPU thread is pinned to (empty lists: not pinned).
    #[serde(default)]
    pub vcpu_affinity: Vec<Vec<usize>>,
    /// The bus of the virtio devices (the restored VM puts them at the
    /// same places on the same bus).
    #[serde(default)]
    pub transport: crate::config::Transport,
}

impl Machine {
    /// Checks the placement read back from outside (a state file, a
    /// migration stream) and that this host can give it.
    pub fn check_placement(&self) -> Result<()> {
        crate::config::numa::check_saved(
            &self.numa,
            &self.vcpu_affinity,
            self.vcpus,
            self.memory_mib,
        )
        .map_err(|e| Error::Restore(format!("the saved machine's placement: {e}")))?;
        crate::config::numa::check_host(&self.numa, &self.vcpu_affinity)?;
        Ok(())
    }
}

/// One disk: how to reopen it, and its state.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskSnapshot {
    /// Its configuration (the image's path).
    pub config: DiskConfig,
    /// The virtio-pci function.
    pub transport: TransportState,
    /// What the guest knows of the disk.
    pub block: ember_virtio_blk::BlockState,
}

/// One NIC: how to reopen it, and its state.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NetSnapshot {
    /// Its configuration (the tap's name).
    pub config: NetConfig,
    /// The virtio-pci function.
    pub transport: TransportState,
    /// The NIC's own state (MAC, a pending frame).
    pub net: ember_virtio_net::NetState,
}

/// The balloon: its configuration and size, and its virtio-pci function.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BalloonSnapshot {
    /// The virtio-pci function.
    pub transport: TransportState,
    /// The balloon's own state (configuration, size, a held statistics
    /// buffer).
    pub balloon: ember_virtio_balloon::BalloonState,
}

/// The vsock device: its configuration (the socket it binds again) and
/// its virtio function. Its connections are not saved (Firecracker's
/// rule): the restored guest is told its transport was reset.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VsockSnapshot {
    /// The configuration.
    pub config: ember_virtio_vsock::VsockConfig,
    /// The virtio function.
    pub transport: TransportState,
    /// The device's own state.
    pub vsock: ember_virtio_vsock::VsockState,
}

/// The entropy device: its configuration and virtio function.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EntropySnapshot {
    /// The configuration.
    pub config: ember_virtio_rng::EntropyConfig,
    /// The virtio function.
    pub transport: TransportState,
    /// The device's own state (its rate limiter's buckets).
    pub entropy: ember_virtio_rng::EntropyState,
}

/// A whole VM.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VmState {
    /// Layout version ([`VM_STATE_VERSION`]).
    pub version: u32,
    /// The machine.
    pub machine: Machine,
    /// The guest's CPU, checked against a destination before anything is
    /// created there.
    pub cpu: ember_vcpu::model::fingerprint::CpuFingerprint,
    /// Guest RAM in the memory file.
    pub memory: Vec<MemoryRegion>,
    /// PIC, IOAPIC, PIT, kvmclock.
    pub kvm: KvmVmState,
    /// Each vCPU.
    pub vcpus: Vec<VcpuState>,
    /// The UART.
    pub serial: ember_legacy::SerialState,
    /// The keyboard controller.
    pub i8042: ember_legacy::I8042State,
    /// The CMOS clock.
    pub cmos: ember_legacy::CmosState,
    /// Disks in bus order.
    pub disks: Vec<DiskSnapshot>,
    /// NICs in bus order.
    pub nets: Vec<NetSnapshot>,
    /// The balloon, if the VM has one.
    #[serde(default)]
    pub balloon: Option<BalloonSnapshot>,
    /// The vsock device, if the VM has one.
    #[serde(default)]
    pub vsock: Option<VsockSnapshot>,
    /// The entropy device, if the VM has one.
    #[serde(default)]
    pub entropy: Option<EntropySnapshot>,
}

/// Where a snapshot goes.
#[derive(Clone, Debug)]
pub struct CreateParams {
    /// The state file.
    pub state_path: PathBuf,
    /// The memory file.
    pub mem_path: PathBuf,
    /// Full or diff.
    pub kind: SnapshotKind,
}

/// What a snapshot took and wrote.
#[derive(Clone, Copy, Debug, Default)]
pub struct CreateStats {
    /// Milliseconds to save the state of devices and vCPUs.
    pub state_ms: f64,
    /// Milliseconds to write guest memory.
    pub memory_ms: f64,
    /// Pages written to the memory file.
    pub pages_written: u64,
    /// Bytes of the state file.
    pub state_bytes: u64,
}

/// Where a restored VM's memory comes from.
#[derive(Clone, Debug)]
pub enum MemorySource {
    /// The memory file, mapped privately.
    File(PathBuf),
    /// A page-fault handler listening on this Unix socket (Firecracker's
    /// `Uffd` backend).
    Uffd(PathBuf),
}

/// How to load a snapshot.
#[derive(Clone, Debug)]
pub struct LoadParams {
    /// The state file.
    pub state_path: PathBuf,
    /// Guest memory.
    pub memory: MemorySource,
    /// Taps to use instead of the snapshot's: (iface_id, tap).
    pub network_overrides: Vec<(String, String)>,
    /// Disk images to use instead of the snapshot's: (drive_id, path).
    pub disk_overrides: Vec<(String, PathBuf)>,
    /// Track dirty pages in the restored VM (for diff snapshots of it).
    pub track_dirty_pages: bool,
    /// The vsock device's socket instead of the snapshot's (Firecracker's
    /// `vsock_override`).
    pub vsock_override: Option<PathBuf>,
}

/// "vendor family/model/stepping" from CPUID leaves 0 and 1.
pub fn cpu_description(cpuid: &[kvm_bindings::kvm_cpuid_entry2]) -> String {
    let leaf = |f: u32| cpuid.iter().find(|e| e.function == f && e.index == 0);
    let vendor = leaf(0)
        .map(|e| {
            let mut v = Vec::with_capacity(12);
            for r in [e.ebx, e.edx, e.ecx] {
                v.extend_from_slice(&r.to_le_bytes());
            }
            String::from_utf8_lossy(&v).into_owned()
        })
        .unwrap_or_else(|| "unknown".into());
    let (family, model, stepping) = leaf(1).map_or((0, 0, 0), |e| {
        let base_family = (e.eax >> 8) & 0xf;
        let family = if base_family == 0xf {
            base_family + ((e.eax >> 20) & 0xff)
        } else {
            base_family
        };
        let model = ((e.eax >> 4) & 0xf) | (((e.eax >> 16) & 0xf) << 4);
        (family, model, e.eax & 0xf)
    });
    format!("{vendor} family {family} model {model} stepping {stepping}")
}

/// Saves the VM-wide KVM state; `clock` is kvmclock as saved at pause.
pub fn save_kvm(vm: &VmFd, clock: kvm_clock_data) -> Result<KvmVmState> {
    let chip = |id| -> Result<kvm_irqchip> {
        let mut c = kvm_irqchip {
            chip_id: id,
            ..Default::default()
        };
        vm.get_irqchip(&mut c)
            .map_err(|e| Error::Kvm("KVM_GET_IRQCHIP", e))?;
        Ok(c)
    };
    Ok(KvmVmState {
        pic_master: chip(KVM_IRQCHIP_PIC_MASTER)?,
        pic_slave: chip(KVM_IRQCHIP_PIC_SLAVE)?,
        ioapic: chip(KVM_IRQCHIP_IOAPIC)?,
        pit: vm.get_pit2().map_err(|e| Error::Kvm("KVM_GET_PIT2", e))?,
        clock,
    })
}

/// Restores the PIC, IOAPIC and PIT (kvmclock is set when the vCPUs are
/// let run).
pub fn restore_kvm(vm: &VmFd, s: &KvmVmState) -> Result<()> {
    let ids = [
        (&s.pic_master, KVM_IRQCHIP_PIC_MASTER),
        (&s.pic_slave, KVM_IRQCHIP_PIC_SLAVE),
        (&s.ioapic, KVM_IRQCHIP_IOAPIC),
    ];
    for (chip, id) in ids {
        if chip.chip_id != id {
            return Err(Error::Restore(format!(
                "irqchip {id} saved with chip id {}",
                chip.chip_id
            )));
        }
        vm.set_irqchip(chip)
            .map_err(|e| Error::Kvm("KVM_SET_IRQCHIP", e))?;
    }
    vm.set_pit2(&s.pit)
        .map_err(|e| Error::Kvm("KVM_SET_PIT2", e))?;
    Ok(())
}

/// The configuration to rebuild the saved VM with, the overrides applied.
pub fn config_for(state: &VmState, load: &LoadParams) -> Result<ValidConfig> {
    let mut disks: Vec<DiskConfig> = state.disks.iter().map(|d| d.config.clone()).collect();
    for (id, path) in &load.disk_overrides {
        let d = disks
            .iter_mut()
            .enumerate()
            .find(|(i, d)| d.drive_id(*i) == *id)
            .map(|(_, d)| d)
            .ok_or_else(|| Error::Restore(format!("no drive {id:?} in the snapshot")))?;
        d.path.clone_from(path);
    }
    let mut nets: Vec<(NetConfig, [u8; 6])> = state
        .nets
        .iter()
        .map(|n| (n.config.clone(), n.net.mac))
        .collect();
    for (id, tap) in &load.network_overrides {
        let n = nets
            .iter_mut()
            .enumerate()
            .find(|(i, (n, _))| {
                n.iface_id
                    .clone()
                    .unwrap_or_else(|| format!("net{i}"))
                    .eq(id)
            })
            .map(|(_, n)| n)
            .ok_or_else(|| {
                Error::Restore(format!("no network interface {id:?} in the snapshot"))
            })?;
        if n.0.user.is_some() {
            return Err(Error::Restore(format!(
                "network interface {id:?} is user-mode: it has no tap to override"
            )));
        }
        n.0.tap = Some(tap.clone());
    }
    if state.vcpus.len() != usize::from(state.machine.vcpus) || state.vcpus.is_empty() {
        return Err(Error::Restore(format!(
            "{} vCPU states for {} vCPUs",
            state.vcpus.len(),
            state.machine.vcpus
        )));
    }
    Ok(ValidConfig {
        vcpus: state.machine.vcpus,
        memory_mib: state.machine.memory_mib,
        memory_shared: false,
        memory_backend: state.machine.memory_backend,
        numa: state.machine.numa.clone(),
        vcpu_affinity: if state.machine.vcpu_affinity.is_empty() {
            vec![Vec::new(); usize::from(state.machine.vcpus)]
        } else {
            state.machine.vcpu_affinity.clone()
        },
        balloon: state.balloon.as_ref().map(|b| b.balloon.config),
        vsock: state.vsock.as_ref().map(|v| {
            let mut config = v.config.clone();
            if let Some(path) = &load.vsock_override {
                config.uds_path = path.clone();
            }
            config
        }),
        entropy: state.entropy.as_ref().map(|e| e.config.clone()),
        track_dirty_pages: load.track_dirty_pages,
        cpu: crate::config::CpuChoice {
            text: state.cpu.model.clone(),
            template: None,
        },
        kernel: PathBuf::new(),
        initrd: None,
        cmdline: state.machine.cmdline.clone(),
        transport: state.machine.transport,
        // The kernel is in guest memory, booted already.
        boot_protocol: ember_loader::BootProtocol::Auto,
        disks,
        nets,
    })
}

/// Reads and checks a state file. A diff snapshot's state file loads like
/// a full one's, with the memory file its diff was merged onto (see
/// [`ember_snapshot::memory::apply_diff`]).
pub fn read_state(path: &Path) -> Result<Envelope<VmState>> {
    let bytes = ember_snapshot::read_file(path)?;
    let env: Envelope<VmState> = ember_snapshot::decode(&bytes)?;
    if env.state.version != VM_STATE_VERSION {
        return Err(Error::Restore(format!(
            "VM state version {} is not supported (this ember reads {VM_STATE_VERSION})",
            env.state.version
        )));
    }
    Ok(env)
}

/// Writes the memory file and the state file, each whole or not at all
/// (temporary files renamed into place once both are written).
pub fn write_files(
    params: &CreateParams,
    mem: &ember_memory::GuestMemoryMmap,
    pages: Pages<'_>,
    env: &mut Envelope<VmState>,
) -> Result<(u64, u64, f64)> {
    let t = Instant::now();
    let mem_tmp = ember_snapshot::temp_path(&params.mem_path);
    let mem_err = |what: &str, source| {
        Error::Snapshot(ember_snapshot::Error::Memory {
            path: params.mem_path.display().to_string(),
            what: what.to_string(),
            source,
        })
    };
    let result = (|| {
        let file = File::create(&mem_tmp).map_err(|e| mem_err("cannot create", e))?;
        let (regions, stats) = ember_snapshot::memory::write_memory(&file, mem, pages)
            .map_err(|e| mem_err("write", e))?;
        file.sync_all().map_err(|e| mem_err("sync", e))?;
        env.state.memory = regions;
        let memory_ms = t.elapsed().as_secs_f64() * 1000.0;
        let bytes = ember_snapshot::encode(env)?;
        ember_snapshot::write_file(&params.state_path, &bytes)?;
        if let Err(e) = std::fs::rename(&mem_tmp, &params.mem_path) {
            // No state file without its memory.
            let _ = std::fs::remove_file(&params.state_path);
            return Err(mem_err("rename", e));
        }
        Ok((stats.pages_written, bytes.len() as u64, memory_ms))
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&mem_tmp);
    }
    result
}

/// Opens the memory file of a `File` load.
pub fn open_memory(path: &Path) -> Result<File> {
    File::open(path).map_err(|source| {
        Error::Snapshot(ember_snapshot::Error::Memory {
            path: path.display().to_string(),
            what: "cannot open".into(),
            source,
        })
    })
}

impl Vmm {
    /// Builds the VM saved in a snapshot: the same machine, each component
    /// in its saved state, guest memory from the snapshot's memory. Nothing
    /// runs yet; [`start`](Self::start) starts it paused.
    pub fn restore(
        load: &self::LoadParams,
        console: crate::Console,
        started: Instant,
    ) -> Result<Self> {
        let t = Instant::now();
        let env = self::read_state(&load.state_path)?;
        log::debug!("restore: state read in {:?}", t.elapsed());
        let state = &env.state;
        let mut cfg = self::config_for(state, load)?;
        state.machine.check_placement()?;
        let hv = crate::vm::Hypervisor::open()?;
        log::debug!("restore: /dev/kvm opened at {:?}", t.elapsed());
        hv.check_vcpus(cfg.vcpus)?;
        let ml = MemoryLayout::new(cfg.memory_mib)?;
        ml.check_phys_bits(hv.phys_address_bits())?;
        let layout: Vec<(u64, u64)> = state
            .memory
            .iter()
            .map(|r| (r.guest_addr, r.size))
            .collect();
        if layout != ml.ram_regions() {
            return Err(Error::Restore(format!(
                "the memory regions {layout:x?} do not match a {} MiB guest",
                cfg.memory_mib
            )));
        }
        let offsets: Vec<u64> = state.memory.iter().map(|r| r.file_offset).collect();
        let (mem, uffd) = match &load.memory {
            self::MemorySource::File(path) => {
                let file = self::open_memory(path)?;
                let mem = ml
                    .map_from_file(&file, &offsets, true)
                    .map_err(|e| Error::Restore(format!("{}: {e}", path.display())))?;
                (mem, None)
            }
            self::MemorySource::Uffd(socket) => {
                let mem = ml.create_guest_memory_tracked(true)?;
                let backend = crate::uffd::attach(
                    &mem,
                    socket,
                    &offsets,
                    crate::uffd::first_page_timeout(cfg.memory_mib),
                )?;
                (mem, Some(backend))
            }
        };
        // The saved backend, as far as a mapping of the memory file (or
        // one a userfaultfd handler fills) can have it.
        let saved = cfg.memory_backend;
        if let Some(size) = saved.hugepages {
            log::warn!(
                "the saved guest ran on {} KiB huge pages; restored from its memory, it runs on 4 KiB pages",
                size.bytes() >> 10
            );
        }
        let placed = crate::config::MemoryBackend {
            shared: false,
            hugepages: None,
            prefault: saved.prefault && uffd.is_none(),
            ..saved
        };
        crate::memory::place(&mem, &ml, &placed, &cfg.numa)?;
        // What it runs on now (a later snapshot or migration says so).
        cfg.memory_backend.hugepages = None;
        log::debug!("restore: memory mapped at {:?}", t.elapsed());
        let mut vmm = Self::assemble(
            &hv,
            &cfg,
            &ml,
            mem,
            console,
            started,
            crate::Boot::Restore(state, &[]),
        )?;
        vmm._uffd = uffd;
        log::info!(
            "restored {} (saved by ember {} on {}) in {:.2} ms",
            load.state_path.display(),
            env.ember_version,
            env.cpu,
            t.elapsed().as_secs_f64() * 1000.0
        );
        Ok(vmm)
    }

    /// The paused VM's whole state, memory aside (a snapshot's state file,
    /// a migration's `State`): each vCPU saves its own on its parked
    /// thread, the devices and KVM's VM-wide state are saved here, and the
    /// disks are flushed first, so what the guest saw written is on them.
    pub fn save_state(&mut self) -> Result<self::VmState> {
        let threads = self.threads.as_ref().ok_or_else(crate::not_started)?;
        let clock = self.paused_clock.ok_or_else(|| {
            Error::Lifecycle("the microVM must be paused to save its state".into())
        })?;
        crate::disks::check_nothing_held(&self.disks)?;
        let vhost = self.nets.iter().position(|n| {
            n.lock()
                .unwrap_or_else(|e| e.into_inner())
                .device()
                .uses_vhost()
        });
        if let Some(index) = vhost {
            return Err(Error::Lifecycle(format!(
                "NIC {index} runs on vhost-net, whose ring positions and the pages it writes \
                 ember cannot save: snapshots and migration need vhost=off"
            )));
        }
        let vcpus = threads.save_states(crate::PAUSE_TIMEOUT)?;
        let kvm = self::save_kvm(&self.vm, clock)?;
        let mut disks = Vec::with_capacity(self.disks.len());
        for (index, (d, config)) in self.disks.iter().zip(&self.saved.disks).enumerate() {
            let mut d = d.lock().unwrap_or_else(|e| e.into_inner());
            // What the guest saw written is on the disk the snapshot names.
            d.device_mut()
                .flush()
                .map_err(|source| Error::Disk { index, source })?;
            disks.push(self::DiskSnapshot {
                config: config.clone(),
                transport: d.state(),
                block: d.device().state(),
            });
        }
        let nets = self
            .nets
            .iter()
            .zip(&self.saved.nets)
            .map(|(n, config)| {
                let n = n.lock().unwrap_or_else(|e| e.into_inner());
                self::NetSnapshot {
                    config: config.clone(),
                    transport: n.state(),
                    net: n.device().state(),
                }
            })
            .collect();
        let lock = |m: &std::sync::Mutex<_>| -> ember_legacy::SerialState {
            let g: std::sync::MutexGuard<'_, devices::Serial> =
                m.lock().unwrap_or_else(|e| e.into_inner());
            g.state()
        };
        let state = self::VmState {
            version: self::VM_STATE_VERSION,
            machine: self.saved.machine.clone(),
            cpu: self.saved.fingerprint.clone(),
            memory: Vec::new(),
            kvm,
            vcpus,
            serial: lock(&self.saved.serial),
            i8042: self.i8042.lock().unwrap_or_else(|e| e.into_inner()).state(),
            cmos: self
                .saved
                .cmos
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .state(),
            disks,
            nets,
            balloon: self.balloon.as_ref().map(|b| {
                let b = b.lock().unwrap_or_else(|e| e.into_inner());
                self::BalloonSnapshot {
                    transport: b.state(),
                    balloon: b.device().state(),
                }
            }),
            vsock: self.vsock.as_ref().map(|v| {
                let v = v.lock().unwrap_or_else(|e| e.into_inner());
                self::VsockSnapshot {
                    config: v.device().config().clone(),
                    transport: v.state(),
                    vsock: v.device().state(),
                }
            }),
            entropy: self.entropy.as_ref().map(|e| {
                let e = e.lock().unwrap_or_else(|e| e.into_inner());
                self::EntropySnapshot {
                    config: e.device().config().clone(),
                    transport: e.state(),
                    entropy: e.device().state(),
                }
            }),
        };
        Ok(state)
    }

    /// Writes a snapshot of the paused VM: each vCPU saves its state on its
    /// own (parked) thread, the devices and KVM's VM-wide state are saved
    /// here, the disks are flushed, and guest memory goes to the memory
    /// file. The VM stays paused; a failure leaves no file behind.
    pub fn snapshot(&mut self, params: &self::CreateParams) -> Result<self::CreateStats> {
        let diff = params.kind == ember_snapshot::SnapshotKind::Diff;
        if diff && !self.track_dirty_pages {
            return Err(Error::Lifecycle(
                "a diff snapshot needs dirty page tracking (machine-config track_dirty_pages, or track_dirty_pages in the snapshot load)".into(),
            ));
        }
        let t = Instant::now();
        let state = self.save_state()?;
        let state_ms = t.elapsed().as_secs_f64() * 1000.0;
        let mut env = ember_snapshot::Envelope {
            ember_version: env!("CARGO_PKG_VERSION").to_string(),
            cpu: self.saved.cpu.clone(),
            kind: params.kind,
            state,
        };
        // The pages written since the last snapshot (or since the start):
        // taken (and reset) here, so the next diff is relative to this one.
        let dirty = if self.track_dirty_pages {
            Some(vm::take_dirty_pages(&self.vm, &self.mem)?)
        } else {
            None
        };
        let pages = match (&dirty, diff) {
            (Some(maps), true) => ember_snapshot::memory::Pages::Dirty(maps),
            _ => ember_snapshot::memory::Pages::NonZero,
        };
        let written = self::write_files(params, &self.mem, pages, &mut env);
        if let (Err(_), Some(maps)) = (&written, &dirty) {
            // A failed snapshot: the pages stay dirty for the next one.
            vm::mark_dirty(&self.mem, maps);
        }
        let (pages_written, state_bytes, memory_ms) = written?;
        Ok(self::CreateStats {
            state_ms,
            memory_ms,
            pages_written,
            state_bytes,
        })
    }
}

/// Puts each rebuilt disk and NIC in its saved state (the transport
/// reactivates a running device with its queues where they were), then
/// kicks it: queues processed, interrupts raised once.
pub(crate) fn restore_devices(
    disks: &[disks::DiskDevice],
    nets: &[nets::NetDevice],
    balloon: Option<&crate::balloon::BalloonDevice>,
    s: &self::VmState,
) -> Result<()> {
    if disks.len() != s.disks.len()
        || nets.len() != s.nets.len()
        || balloon.is_some() != s.balloon.is_some()
    {
        return Err(Error::Restore(
            "the device list does not match the snapshot".into(),
        ));
    }
    for (i, (d, saved)) in disks.iter().zip(&s.disks).enumerate() {
        let mut d = d.lock().unwrap_or_else(|e| e.into_inner());
        d.device()
            .check_state(&saved.block)
            .map_err(|source| Error::Disk { index: i, source })?;
        d.restore_state(&saved.transport).map_err(Error::Restore)?;
    }
    for (i, (n, saved)) in nets.iter().zip(&s.nets).enumerate() {
        let mut n = n.lock().unwrap_or_else(|e| e.into_inner());
        n.restore_state(&saved.transport).map_err(Error::Restore)?;
        n.device_mut()
            .restore_state(&saved.net)
            .map_err(|source| Error::Net { index: i, source })?;
    }
    if let (Some(b), Some(saved)) = (balloon, &s.balloon) {
        let mut b = b.lock().unwrap_or_else(|e| e.into_inner());
        // The device first: the transport's restore activates it.
        b.device_mut()
            .restore_state(&saved.balloon)
            .map_err(|e| Error::Balloon(e.to_string()))?;
        b.restore_state(&saved.transport).map_err(Error::Restore)?;
        b.kick();
    }
    for d in disks {
        d.lock().unwrap_or_else(|e| e.into_inner()).kick();
    }
    for n in nets {
        n.lock().unwrap_or_else(|e| e.into_inner()).kick();
    }
    Ok(())
}

/// Puts the rebuilt vsock and entropy devices in their saved state (the
/// vsock device then tells the guest its transport was reset).
pub(crate) fn restore_vsock_entropy(
    vsock: Option<&crate::vsock::VsockDevice>,
    entropy: Option<&crate::vsock::EntropyDevice>,
    s: &self::VmState,
) -> Result<()> {
    if vsock.is_some() != s.vsock.is_some() || entropy.is_some() != s.entropy.is_some() {
        return Err(Error::Restore(
            "the device list does not match the snapshot".into(),
        ));
    }
    if let (Some(v), Some(saved)) = (vsock, &s.vsock) {
        let mut v = v.lock().unwrap_or_else(|e| e.into_inner());
        v.device_mut()
            .restore_state(&saved.vsock)
            .map_err(|e| Error::Device {
                name: "vsock",
                why: e.to_string(),
            })?;
        v.restore_state(&saved.transport).map_err(Error::Restore)?;
        v.kick();
    }
    if let (Some(e), Some(saved)) = (entropy, &s.entropy) {
        let mut e = e.lock().unwrap_or_else(|e| e.into_inner());
        e.device_mut()
            .restore_state(&saved.entropy)
            .map_err(|err| Error::Device {
                name: "entropy",
                why: err.to_string(),
            })?;
        e.restore_state(&saved.transport).map_err(Error::Restore)?;
        e.kick();
    }
    Ok(())
}
