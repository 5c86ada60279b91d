//! Ember's composer: it only wires the other crates together.
//!
//! config → memory → VM and irqchip → devices on the buses → kernel load →
//! vCPU threads → one epoll event loop → clean exit. The VM's life is one
//! [`instance::Instance`], which the command line and the API both drive.
//!
//! ```no_run
//! use ember_vmm::config::VmConfig;
//! use ember_vmm::instance::{Instance, InstanceOptions};
//! use ember_vmm::signals::StopSignals;
//! use ember_vmm::{seccomp, Console};
//!
//! let cfg = VmConfig::from_file("vm.toml".as_ref()).unwrap();
//! let opts = InstanceOptions {
//!     id: "vm0".into(),
//!     filters: seccomp::Filters::new(seccomp::Mode::On).unwrap(),
//!     started: std::time::Instant::now(),
//! };
//! // Before any thread starts: every thread inherits the signal mask.
//! let signals = StopSignals::block().unwrap();
//! // No API socket: configure from the file, then start.
//! let mut vm = Instance::new(opts, Console::stdio().unwrap(), signals, None).unwrap();
//! vm.configure(cfg).unwrap();
//! vm.start().unwrap();
//! let exit = vm.run().unwrap();
//! std::process::exit(exit.code());
//! ```

pub mod acpi;
pub mod api;
pub mod balloon;
pub mod config;
pub mod console;
pub mod cpu;
pub mod devices;
pub mod disks;
mod error;
pub mod event_loop;
mod exit;
pub mod img;
pub mod instance;
pub mod iothread;
pub mod jail;
pub mod logger;
pub mod memory;
pub mod metrics;
pub mod migration;
pub mod nets;
pub mod passt;
pub mod pci;
pub mod seccomp;
pub mod signals;
pub mod snapshot;
pub mod terminal;
pub mod uffd;
pub mod vcpus;
pub mod virtio_devices;
pub mod vm;
pub mod vsock;

use std::fs::File;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ember_loader::BootSpec;
use ember_memory::{GuestMemoryMmap, MemoryLayout};
use ember_vcpu::Vcpu;
use kvm_ioctls::VmFd;
use vm_device::device_manager::IoManager;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use config::ValidConfig;
pub use console::Console;
use devices::LegacyDevices;
pub use error::{error_chain, Error, Result};
use event_loop::{EventLoop, Pausable, VmInputs};
pub use exit::ExitReason;
use vcpus::{VcpuExitReport, VcpuThreads};
use vm::Hypervisor;

/// The kernel command line: the user's, plus the parameters that hide CPUID
/// features the host forces on (only on hosts that override CPUID, such as
/// PVM; see the vcpu crate's README).
fn guest_cmdline(user: &str, forced: &[&'static ember_vcpu::cpuid::MaskedFeature]) -> String {
    match ember_vcpu::cpuid::kernel_params_hiding(forced) {
        Some(params) => {
            let names: Vec<_> = forced.iter().map(|f| f.name).collect();
            log::info!(
                "the host keeps CPUID features visible that ember masks ({}); hiding them with: {params}",
                names.join(",")
            );
            // Kernel parameters: before any `--` (what follows is init's).
            let mut cmdline = user.to_string();
            config::insert_kernel_args(&mut cmdline, &format!(" {params}"));
            cmdline
        }
        None => user.to_string(),
    }
}

/// Guest memory for a new VM. Ember's own writes are always tracked (one
/// atomic OR per write, one bit per page), so a live migration can start
/// at any time; KVM's dirty log is turned on only when needed. `shared`:
/// the regions live in one memfd, packed, mapped `MAP_SHARED`.
pub(crate) fn create_memory(ml: &MemoryLayout, shared: bool) -> Result<GuestMemoryMmap> {
    if !shared {
        return Ok(ml.create_guest_memory_tracked(true)?);
    }
    let (offsets, size) = ml.packed_offsets();
    let file =
        memfd("ember-guest-ram").map_err(|e| Error::SharedMemory(format!("memfd_create: {e}")))?;
    file.set_len(size)
        .map_err(|e| Error::SharedMemory(format!("cannot size the memfd to {size} bytes: {e}")))?;
    ml.map_shared(&file, &offsets, true)
        .map_err(|e| Error::SharedMemory(e.to_string()))
}

/// A new memfd, close-on-exec.
fn memfd(name: &str) -> std::io::Result<File> {
    memfd_with(name, 0)
}

/// A new memfd with `MFD_CLOEXEC` and `flags` (`MFD_HUGETLB | MFD_HUGE_*`).
#[allow(unsafe_code)]
pub(crate) fn memfd_with(name: &str, flags: libc::c_uint) -> std::io::Result<File> {
    use std::os::fd::FromRawFd;
    let name = std::ffi::CString::new(name).map_err(|_| std::io::ErrorKind::InvalidInput)?;
    // SAFETY: a NUL-terminated name that lives across the call; the flags
    // are valid. The returned descriptor is new and owned by no one else.
    let fd = unsafe { libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC | flags) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` was just created and is owned here alone.
    Ok(unsafe { File::from_raw_fd(fd) })
}

/// How a VM's vCPUs and memory get their first contents.
#[derive(Clone, Copy)]
enum Boot<'a> {
    /// A fresh boot with this CPU.
    Fresh(&'a cpu::GuestCpu),
    /// A snapshot's or migration's state, and the taps a local migration's
    /// source handed over (one per NIC, in order; empty: open by name).
    Restore(&'a snapshot::VmState, &'a [File]),
}

/// A built VM: created, loaded, then started, paused, resumed and shut
/// down by its [`instance::Instance`]. Field order matters: vCPUs and the
/// VM fd are dropped before the guest memory they point into.
pub struct Vmm {
    vcpus: Vec<Vcpu>,
    threads: Option<VcpuThreads>,
    disks: Vec<disks::DiskDevice>,
    nets: Vec<nets::NetDevice>,
    balloon: Option<balloon::BalloonDevice>,
    vsock: Option<vsock::VsockDevice>,
    entropy: Option<vsock::EntropyDevice>,
    vm: Arc<VmFd>,
    inputs: Option<VmInputs>,
    pausable: Option<Pausable>,
    report: Arc<VcpuExitReport>,
    started: Instant,
    paused_clock: Option<kvm_bindings::kvm_clock_data>,
    start_paused: bool,
    track_dirty_pages: bool,
    i8042: Arc<std::sync::Mutex<ember_legacy::I8042>>,
    /// The ACPI power button's interrupt, for a guest that uses ACPI.
    power_button: Option<EventFd>,
    exit_counters: Vec<Arc<ember_vcpu::SharedExitCounts>>,
    saved: SavedParts,
    migration: Option<migration::Worker>,
    _uffd: Option<uffd::UffdBackend>,
    mem: GuestMemoryMmap,
}

/// What a snapshot needs besides the devices the VM drives.
struct SavedParts {
    serial: Arc<std::sync::Mutex<devices::Serial>>,
    cmos: Arc<std::sync::Mutex<ember_legacy::Cmos>>,
    machine: snapshot::Machine,
    disks: Vec<config::DiskConfig>,
    nets: Vec<config::NetConfig>,
    cpu: String,
    fingerprint: ember_vcpu::model::fingerprint::CpuFingerprint,
    cpu_choice: config::CpuChoice,
}

impl std::fmt::Debug for Vmm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vmm")
            .field("vcpus", &self.vcpus.len())
            .finish_non_exhaustive()
    }
}

/// How long a pause may wait for every vCPU to park.
const PAUSE_TIMEOUT: Duration = Duration::from_secs(2);

impl Vmm {
    /// Builds the VM described by `cfg`. Nothing runs yet. `started` is the
    /// process start, for timing logs. The caller has blocked the stop
    /// signals (see [`signals::StopSignals::block`]) before starting any
    /// thread.
    pub fn build(cfg: &ValidConfig, console: Console, started: Instant) -> Result<Self> {
        let hv = Hypervisor::open()?;
        hv.check_vcpus(cfg.vcpus)?;
        // The CPU model first: a host that cannot run it fails here,
        // before anything is created.
        let guest_cpu = cpu::GuestCpu::resolve(&hv, &cfg.cpu)?;
        let ml = MemoryLayout::new(cfg.memory_mib)?;
        ml.check_phys_bits(hv.phys_address_bits())?;
        config::numa::check_host(&cfg.numa, &cfg.vcpu_affinity)?;
        let mem = memory::create(&ml, &cfg.memory_backend, &cfg.numa)?;
        Self::assemble(
            &hv,
            cfg,
            &ml,
            mem,
            console,
            started,
            Boot::Fresh(&guest_cpu),
        )
    }

    fn assemble(
        hv: &Hypervisor,
        cfg: &ValidConfig,
        ml: &MemoryLayout,
        mem: GuestMemoryMmap,
        console: Console,
        started: Instant,
        boot: Boot<'_>,
    ) -> Result<Self> {
        let restore = match boot {
            Boot::Restore(s, _) => Some(s),
            Boot::Fresh(_) => None,
        };
        let t = Instant::now();
        let vm = Arc::new(vm::create_vm(hv, &mem, cfg.track_dirty_pages)?);
        log::debug!("assemble: VM created in {:?}", t.elapsed());

        let mut io = IoManager::new();
        let legacy_states = restore.map(|s| devices::LegacyStates {
            serial: &s.serial,
            i8042: &s.i8042,
            cmos: &s.cmos,
        });
        let legacy = LegacyDevices::create(&vm, &mut io, console.output, legacy_states)?;
        let bus = pci::create_bus();
        let routes = Arc::new(pci::MsiRoutes::new(vm.clone()));
        let mut bars = pci::BarAllocator::new(ml)?;
        let acpi = acpi::guest_uses_acpi(&cfg.cmdline);
        let mut attach = virtio_devices::AttachContext {
            vm: &vm,
            mem: &mem,
            io: &mut io,
            bus: &bus,
            bars: &mut bars,
            routes: &routes,
            subscribers: Vec::new(),
            io_threads: Vec::new(),
            mmio: (cfg.transport == config::Transport::Mmio)
                .then(|| virtio_devices::MmioSlots::new(acpi)),
        };
        let disks = disks::create_disks(&mut attach, &cfg.disks)?;
        let taps = match boot {
            Boot::Restore(_, taps) => taps,
            Boot::Fresh(_) => &[],
        };
        let nets = nets::create_nets(&mut attach, &cfg.nets, taps)?;
        let balloon = cfg
            .balloon
            .map(|b| balloon::create(&mut attach, b))
            .transpose()?;
        let vsock = cfg
            .vsock
            .as_ref()
            .map(|v| vsock::create_vsock(&mut attach, v))
            .transpose()?;
        let entropy = cfg
            .entropy
            .as_ref()
            .map(|e| vsock::create_entropy(&mut attach, e))
            .transpose()?;
        let device_events = attach.subscribers;
        let io_threads = attach.io_threads;
        let mmio = attach.mmio;
        pci::attach_config_ports(&mut io, &bus, acpi)?;
        let io = Arc::new(io);
        log::debug!("assemble: devices built at {:?}", t.elapsed());

        // CPUID first: what the host will not hide decides the command line.
        let mut vcpus = Vec::with_capacity(usize::from(cfg.vcpus));
        let mut forced = Vec::new();
        let mut fingerprint = None;
        let mut tsc_khz = None;
        for index in 0..cfg.vcpus {
            let mut vcpu = Vcpu::new(&vm, index, io.clone()).map_err(Error::Vcpu)?;
            vcpu.set_msr_list(&hv.msr_list);
            match boot {
                Boot::Restore(s, _) => {
                    if index == 0 {
                        // The saved guest's CPU must be one this host can
                        // give, feature for feature.
                        tsc_khz = cpu::check_fingerprint(hv, &s.cpu, &vcpu)?;
                        fingerprint = Some(s.cpu.clone());
                    }
                    if let Some(khz) = tsc_khz {
                        vcpu.set_tsc_khz(khz).map_err(Error::Vcpu)?;
                    }
                    vcpu.restore_state(&s.vcpus[usize::from(index)])
                        .map_err(Error::Vcpu)?
                }
                Boot::Fresh(c) => {
                    forced = vcpu.set_cpuid(&c.base, cfg.vcpus).map_err(Error::Vcpu)?;
                    if index == 0 {
                        let effective = vcpu.effective_cpuid().map_err(Error::Vcpu)?;
                        c.report_forced(&effective);
                        fingerprint = Some(ember_vcpu::model::fingerprint::CpuFingerprint::new(
                            &c.model,
                            &effective,
                            vcpu.tsc_khz(),
                        ));
                    }
                }
            }
            vcpus.push(vcpu);
        }
        log::debug!("assemble: vCPUs ready at {:?}", t.elapsed());
        let mut paused_clock = None;
        let cmdline = match restore {
            Some(s) => {
                snapshot::restore_kvm(&vm, &s.kvm)?;
                snapshot::restore_devices(&disks, &nets, balloon.as_ref(), s)?;
                snapshot::restore_vsock_entropy(vsock.as_ref(), entropy.as_ref(), s)?;
                paused_clock = Some(s.kvm.clock);
                cfg.cmdline.clone()
            }
            None => {
                let mut cmdline = guest_cmdline(&cfg.cmdline, &forced);
                let placed = mmio.as_ref().map_or(&[][..], |m| m.placements());
                if !acpi && !placed.is_empty() {
                    // Without ACPI the command line announces the
                    // virtio-mmio devices (with it, the DSDT does).
                    let params = mmio
                        .as_ref()
                        .map(|m| m.cmdline_params())
                        .unwrap_or_default();
                    config::insert_kernel_args(&mut cmdline, &params);
                    if cmdline.len() >= ember_memory::layout::CMDLINE_MAX_SIZE {
                        return Err(config::ConfigError::CmdlineTooLong(cmdline.len()).into());
                    }
                }
                let acpi_rsdp = if acpi {
                    let machine = acpi::machine(ml, cfg.vcpus, acpi::nodes(ml, &cfg.numa), placed);
                    Some(acpi::write_tables(&mem, &machine)?)
                } else {
                    None
                };
                let spec = BootSpec {
                    kernel: &cfg.kernel,
                    initrd: cfg.initrd.as_deref(),
                    cmdline: &cmdline,
                    vcpus: cfg.vcpus,
                    acpi_rsdp,
                    protocol: cfg.boot_protocol,
                };
                let loaded = ember_loader::load(&mem, ml, &spec)?;
                log::info!(
                    "loaded {:?} kernel {}, {} entry {:#x}",
                    loaded.kernel.format,
                    cfg.kernel.display(),
                    if loaded.pvh_start_info.is_some() {
                        "PVH"
                    } else {
                        "64-bit"
                    },
                    loaded.entry
                );
                for (index, vcpu) in (0u8..).zip(vcpus.iter_mut()) {
                    match loaded.pvh_start_info {
                        Some(info) => vcpu.setup_boot_pvh(&mem, loaded.entry, info),
                        None => vcpu.setup_boot(&mem, loaded.entry),
                    }
                    .map_err(Error::Vcpu)?;
                    if let Boot::Fresh(c) = boot {
                        c.apply_msrs(vcpu, index)?;
                    }
                }
                cmdline
            }
        };

        let vcpu_evt = EventFd::new(EFD_NONBLOCK).map_err(|e| Error::EventFd("vcpu exit", e))?;
        let report = Arc::new(VcpuExitReport::new(
            vcpu_evt
                .try_clone()
                .map_err(|e| Error::EventFd("vcpu exit", e))?,
        ));
        let cpu_text = snapshot::cpu_description(&match boot {
            Boot::Restore(s, _) => s.vcpus[0].cpuid.clone(),
            Boot::Fresh(c) => ember_vcpu::cpuid::normalize(&c.base, 0, cfg.vcpus),
        });
        let fingerprint = fingerprint.ok_or_else(|| Error::Guest("no vCPU".into()))?;
        let i8042 = legacy.i8042.clone();
        let power_button = acpi.then_some(legacy.power_button);
        let exit_counters = vcpus.iter().map(Vcpu::exit_counter).collect();
        let saved = SavedParts {
            serial: legacy.serial.clone(),
            cmos: legacy.cmos.clone(),
            machine: snapshot::Machine {
                vcpus: cfg.vcpus,
                memory_mib: cfg.memory_mib,
                cmdline,
                shared_memory: cfg.memory_shared,
                memory_backend: cfg.memory_backend,
                numa: cfg.numa.clone(),
                vcpu_affinity: cfg.vcpu_affinity.clone(),
                transport: cfg.transport,
            },
            disks: cfg.disks.clone(),
            nets: cfg.nets.iter().map(|(n, _)| n.clone()).collect(),
            cpu: cpu_text,
            fingerprint,
            cpu_choice: cfg.cpu.clone(),
        };
        let inputs = VmInputs {
            console_in: console.input,
            console_socket: console.socket,
            serial: legacy.serial,
            serial_drained: legacy.serial_input_drained,
            reset: legacy.reset,
            power_off: legacy.power_off,
            vcpu_evt,
            report: report.clone(),
            devices: device_events,
            io_threads,
        };
        Ok(Vmm {
            vcpus,
            threads: None,
            disks,
            nets,
            balloon,
            vsock,
            entropy,
            vm,
            inputs: Some(inputs),
            pausable: None,
            report,
            started,
            paused_clock,
            start_paused: restore.is_some(),
            track_dirty_pages: cfg.track_dirty_pages,
            i8042,
            power_button,
            exit_counters,
            saved,
            migration: None,
            _uffd: None,
            mem,
        })
    }

    /// Puts the VM's events into `event_loop` and starts the vCPUs and the
    /// migration worker (which reports through `wake`, an eventfd the loop
    /// watches). Every thread runs under its `filters` from before it
    /// first touches guest data: each vCPU and the worker install their
    /// own first thing, the calling thread (which serves the loop) right
    /// after starting them.
    pub fn start(
        &mut self,
        filters: &seccomp::Filters,
        event_loop: &mut EventLoop,
        wake: &EventFd,
    ) -> Result<()> {
        let inputs = self
            .inputs
            .take()
            .ok_or_else(|| Error::Guest("the VM was started twice".into()))?;
        let mut pausable = event_loop.add_vm(inputs, Some(filters))?;
        if self.start_paused {
            event_loop.pause(&mut pausable)?;
        }
        self.pausable = Some(pausable);
        self.migration = Some(migration::Worker::spawn(
            migration::VmParts {
                vm: self.vm.clone(),
                mem: self.mem.clone(),
                disks: self.disks.clone(),
                nets: self.nets.clone(),
                track_dirty_pages: self.track_dirty_pages,
                // Memory a userfaultfd handler fills has data in pages not
                // yet present.
                untouched_is_zero: self._uffd.is_none(),
            },
            wake.try_clone()
                .map_err(|e| Error::EventFd("migration wake-up", e))?,
            filters,
        )?);
        let vcpus = std::mem::take(&mut self.vcpus);
        let mut threads = VcpuThreads::start(
            vcpus,
            &self.saved.machine.vcpu_affinity,
            self.report.clone(),
            self.started,
            filters.clone(),
            self.start_paused,
        )?;
        if let Err(e) = filters.install(seccomp::ThreadKind::Vmm, "event-loop") {
            threads.stop(Duration::from_millis(500));
            return Err(e.into());
        }
        self.threads = Some(threads);
        Ok(())
    }

    /// Stops the guest: every vCPU parks (its pending exit completed), the
    /// console and devices leave the loop (no queue work, no tap reads, no
    /// interrupts), and the guest's clock is saved so that it does not
    /// advance while paused.
    pub fn pause(&mut self, event_loop: &mut EventLoop) -> Result<()> {
        let threads = self.threads.as_ref().ok_or_else(not_started)?;
        // All or nothing: a vCPU that does not park in time leaves the
        // whole VM running, not half paused.
        if let Err(e) = threads.pause(PAUSE_TIMEOUT) {
            threads.resume();
            return Err(e);
        }
        if let Some(p) = self.pausable.as_mut() {
            if let Err(e) = event_loop.pause(p) {
                event_loop.resume(p);
                threads.resume();
                return Err(e);
            }
        }
        // io=io_uring: what the guest submitted completes now, so a
        // snapshot or a migration sees no request in flight.
        for d in &self.disks {
            d.lock()
                .unwrap_or_else(|e| e.into_inner())
                .device_mut()
                .drain();
        }
        match self.vm.get_clock() {
            Ok(clock) => self.paused_clock = Some(clock),
            Err(e) => log::warn!("KVM_GET_CLOCK: {e}: the guest clock will jump by the pause"),
        }
        Ok(())
    }

    /// Runs the guest again from where [`Vmm::pause`] stopped it, with its
    /// clock where it was.
    pub fn resume(&mut self, event_loop: &mut EventLoop) -> Result<()> {
        let threads = self.threads.as_ref().ok_or_else(not_started)?;
        if let Some(mut clock) = self.paused_clock.take() {
            // Flags off: set exactly this value, not advanced by the time
            // that passed (KVM_CLOCK_REALTIME would do that).
            clock.flags = 0;
            if let Err(e) = self.vm.set_clock(&clock) {
                log::warn!("KVM_SET_CLOCK: {e}: the guest clock jumps by the pause");
            }
        }
        if let Some(p) = self.pausable.as_mut() {
            event_loop.resume(p);
        }
        threads.resume();
        Ok(())
    }

    /// Has each disk set `flag` and write `wake` when a failed request
    /// stops it (`werror`/`rerror` = stop).
    pub fn watch_disk_stops(
        &self,
        flag: &Arc<std::sync::atomic::AtomicBool>,
        wake: &EventFd,
    ) -> Result<()> {
        disks::watch_stops(&self.disks, flag, wake)
    }

    /// The disks a failed request stopped, and why.
    pub fn stopped_disks(&self) -> Vec<String> {
        disks::stopped(&self.disks)
    }

    /// Runs again what stopped the disks; an error says which fails again.
    pub fn retry_disks(&self) -> std::result::Result<(), String> {
        disks::retry_stopped(&self.disks)
    }

    /// Whether guest memory is a shared memfd (a local migration hands it
    /// over).
    pub fn shared_memory(&self) -> bool {
        self.saved.machine.shared_memory
    }

    /// The migration worker (once started).
    pub fn migration_worker(&self) -> Option<&migration::Worker> {
        self.migration.as_ref()
    }

    /// What a migration's destination checks first (`Start`).
    pub fn migration_hello(&self) -> Result<Vec<u8>> {
        use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
        let hello = migration::Hello {
            ember_version: env!("CARGO_PKG_VERSION").to_string(),
            vm_state_version: snapshot::VM_STATE_VERSION,
            cpu: self.saved.fingerprint.clone(),
            machine: self.saved.machine.clone(),
            memory: self
                .mem
                .iter()
                .map(|r| (r.start_addr().0, r.len()))
                .collect(),
        };
        serde_json::to_vec(&hello).map_err(|e| Error::Migration(e.to_string()))
    }

    /// The paused VM's `State` payload for a migration (see
    /// [`migration`]): whether the destination runs the guest, then the
    /// state envelope.
    pub fn migration_state(&mut self, run: bool) -> Result<Vec<u8>> {
        let state = self.save_state()?;
        let env = ember_snapshot::Envelope {
            ember_version: env!("CARGO_PKG_VERSION").to_string(),
            cpu: self.saved.cpu.clone(),
            kind: ember_snapshot::SnapshotKind::Full,
            state,
        };
        let mut out = vec![u8::from(run)];
        out.extend(ember_snapshot::encode(&env)?);
        Ok(out)
    }

    /// Announces every NIC where it now is (after a migration): a RARP frame
    /// from ember, and gratuitous ARPs from the guest where its driver can
    /// (`VIRTIO_NET_S_ANNOUNCE`).
    pub fn announce(&self) {
        for (i, n) in self.nets.iter().enumerate() {
            let mut n = n.lock().unwrap_or_else(|e| e.into_inner());
            match n.device_mut().announce() {
                Ok(ember_virtio_net::Announced::RarpAndGuest) => {
                    log::info!(
                        "virtio-net{i}: announced on {} (RARP; the guest was asked to \
                         announce itself too)",
                        n.device().name()
                    );
                }
                Ok(ember_virtio_net::Announced::Rarp) => {
                    log::info!("virtio-net{i}: announced on {} (RARP)", n.device().name());
                }
                Err(e) => log::warn!("virtio-net{i}: cannot announce: {e}"),
            }
        }
    }

    /// Whether [`start`](Self::start) leaves the VM paused (a restored VM).
    pub fn starts_paused(&self) -> bool {
        self.start_paused
    }

    /// Serves disk `index` (in [`ValidConfig::disks`] order) from the image
    /// at `path` from now on (Firecracker's `PATCH /drives`): the old image
    /// is flushed, the new one opened and locked, and the guest told of
    /// the new capacity with a configuration-change interrupt. The new
    /// image is in the disk's configured `format`.
    pub fn patch_drive(
        &self,
        index: usize,
        path: &std::path::Path,
        format: ember_virtio_blk::ImageFormat,
        cache: ember_virtio_blk::CacheMode,
    ) -> Result<()> {
        let disk = self
            .disks
            .get(index)
            .ok_or_else(|| Error::Guest(format!("no disk {index}")))?;
        let mut dev = disk.lock().unwrap_or_else(|e| e.into_inner());
        let read_only = dev.device().read_only();
        let backend = ember_virtio_blk::open_backend(path, format, read_only, cache)
            .map_err(|source| Error::Disk { index, source })?;
        let changed = dev
            .device_mut()
            .swap_backend(backend, path.display().to_string())
            .map_err(|source| Error::Disk { index, source })?;
        log::info!(
            "virtio-blk{index}: now {}{}",
            path.display(),
            if changed { ", new capacity" } else { "" }
        );
        dev.signal_config_change()
            .map_err(|e| Error::Guest(format!("virtio-blk{index}: config interrupt: {e}")))
    }

    /// Changes disk `index`'s rate limits live; the limits now in force.
    pub fn patch_drive_rate_limit(
        &self,
        index: usize,
        patch: &ember_rate_limiter::RateLimiterConfig,
    ) -> Result<ember_rate_limiter::RateLimiterConfig> {
        let disk = self
            .disks
            .get(index)
            .ok_or_else(|| Error::Guest(format!("no disk {index}")))?;
        let mut dev = disk.lock().unwrap_or_else(|e| e.into_inner());
        dev.device_mut()
            .update_rate_limit(patch)
            .map_err(|source| Error::Disk { index, source })?;
        let now = dev.device().rate_limit();
        log::info!("virtio-blk{index}: rate limit now {now}");
        Ok(now)
    }

    /// Changes NIC `index`'s receive and transmit limits live (a limit
    /// left out is kept); the limits now in force.
    pub fn patch_net_rate_limits(
        &self,
        index: usize,
        rx: Option<&ember_rate_limiter::RateLimiterConfig>,
        tx: Option<&ember_rate_limiter::RateLimiterConfig>,
    ) -> Result<(
        ember_rate_limiter::RateLimiterConfig,
        ember_rate_limiter::RateLimiterConfig,
    )> {
        nets::patch_rate_limits(&self.nets, index, rx, tx)
    }

    /// Presses Ctrl-Alt-Del on the guest's keyboard (Linux reboots, or
    /// signals init if it asked for that).
    pub fn send_ctrl_alt_del(&self) -> Result<()> {
        self.i8042
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .trigger_ctrl_alt_del()
            .map_err(|e| Error::Guest(format!("Ctrl-Alt-Del: {e}")))
    }

    /// Stops the vCPUs, flushes the disks and logs the device counters.
    pub fn shutdown(&mut self) {
        if let Some(mut threads) = self.threads.take() {
            threads.stop(Duration::from_millis(500));
        }
        // The disks' own threads end first: the flush below is the last
        // thing done to a disk.
        if let Some(p) = self.pausable.as_mut() {
            p.stop_io_threads();
        }
        disks::flush_all(&self.disks);
        disks::log_counters(&self.disks);
        nets::log_counters(&self.nets);
        if let Some(v) = &self.vsock {
            let c = v
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .device()
                .counters();
            log::info!(
                "vsock: {} host and {} guest connections, {} bytes to the guest, {} from it, {} host connections refused",
                c.host_connections, c.guest_connections, c.rx_bytes, c.tx_bytes, c.refused_host
            );
        }
        if let Some(e) = &self.entropy {
            let c = e
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .device()
                .counters();
            log::info!(
                "entropy: {} requests, {} bytes given, {} held back by the rate limiter",
                c.requests,
                c.bytes,
                c.throttled
            );
        }
    }
}

fn not_started() -> Error {
    Error::Guest("the VM has not been started".into())
}
