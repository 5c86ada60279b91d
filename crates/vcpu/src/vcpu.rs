//! One vCPU: configuration for 64-bit boot and the run loop.
//!
//! The run loop is a small state machine driven by a [`VcpuControl`] shared
//! with the thread that owns the VM: `Running` runs the guest, `Paused`
//! waits, `Stopped` returns. A kick (a real-time signal) makes `KVM_RUN`
//! return at once, so the loop sees a new state promptly; the signal handler
//! sets the vCPU's `immediate_exit` so a kick that lands just before
//! `KVM_RUN` is not lost.

use std::cell::Cell;
use std::sync::{Arc, Condvar, Mutex};

use kvm_bindings::{kvm_lapic_state, kvm_run, CpuId, Msrs};
use kvm_ioctls::{VcpuFd, VmFd};
use vm_device::device_manager::IoManager;
use vm_memory::GuestMemoryBackend;

use crate::exit::{handle_exit, ExitAction, ExitCounts, GuestStop, SharedExitCounts, UnhandledLog};
use crate::state::{self, VcpuState};
use crate::{cpuid, regs, Error, Result};

/// What the owner of the VM asks of a vCPU.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RunState {
    /// Run the guest.
    Running,
    /// Stay out of the guest until resumed.
    Paused,
    /// Leave the run loop.
    Stopped,
}

/// Shared between a vCPU thread and its owner.
///
/// Pausing is a handshake: the owner requests [`RunState::Paused`] and
/// kicks the thread; the thread finishes any port or MMIO exit KVM still
/// has pending, tells the guest's kvmclock it was stopped, marks itself
/// parked and waits. [`VcpuControl::wait_parked`] returns once it has. A
/// thread whose run loop has ended counts as parked.
#[derive(Debug)]
pub struct VcpuControl {
    state: Mutex<ControlState>,
    changed: Condvar,
}

#[derive(Debug)]
struct ControlState {
    requested: RunState,
    parked: bool,
    save: SaveSlot,
}

/// A state save asked of a parked vCPU thread.
#[derive(Debug)]
enum SaveSlot {
    Idle,
    Requested,
    Done(std::result::Result<Box<VcpuState>, String>),
}

impl Default for VcpuControl {
    fn default() -> Self {
        VcpuControl {
            state: Mutex::new(ControlState {
                requested: RunState::Running,
                parked: false,
                save: SaveSlot::Idle,
            }),
            changed: Condvar::new(),
        }
    }
}

impl VcpuControl {
    fn lock(&self) -> std::sync::MutexGuard<'_, ControlState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Requests a state. The caller then kicks the thread (see
    /// [`crate::kick_thread`]) so a running guest notices.
    pub fn request(&self, state: RunState) {
        let mut s = self.lock();
        // Stopped is final.
        if s.requested != RunState::Stopped {
            s.requested = state;
        }
        self.changed.notify_all();
    }

    /// The requested state, blocking while it is `Paused` (with the thread
    /// marked parked meanwhile). A state save requested while parked runs
    /// `save` on this (the vCPU's) thread.
    fn wait_runnable(
        &self,
        mut save: impl FnMut() -> std::result::Result<VcpuState, String>,
    ) -> RunState {
        let mut s = self.lock();
        if s.requested == RunState::Paused {
            s.parked = true;
            self.changed.notify_all();
            loop {
                if matches!(s.save, SaveSlot::Requested) {
                    drop(s);
                    let result = save().map(Box::new);
                    s = self.lock();
                    s.save = SaveSlot::Done(result);
                    self.changed.notify_all();
                    continue;
                }
                if s.requested != RunState::Paused {
                    break;
                }
                s = self.changed.wait(s).unwrap_or_else(|e| e.into_inner());
            }
            s.parked = false;
        }
        s.requested
    }

    /// Has the parked vCPU thread save its state, and waits up to `timeout`
    /// for it. Fails if the thread is not parked (or has ended).
    pub fn save_parked(
        &self,
        timeout: std::time::Duration,
    ) -> std::result::Result<VcpuState, String> {
        let deadline = std::time::Instant::now() + timeout;
        let mut s = self.lock();
        if !s.parked || s.requested != RunState::Paused {
            return Err("the vCPU is not paused".into());
        }
        s.save = SaveSlot::Requested;
        self.changed.notify_all();
        loop {
            if let SaveSlot::Done(_) = s.save {
                let SaveSlot::Done(result) = std::mem::replace(&mut s.save, SaveSlot::Idle) else {
                    unreachable!("checked above");
                };
                return result.map(|b| *b);
            }
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                s.save = SaveSlot::Idle;
                return Err("the vCPU thread did not save its state in time".into());
            }
            s = self
                .changed
                .wait_timeout(s, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// Marks the run loop as ended for good: the thread is parked forever.
    pub fn mark_ended(&self) {
        let mut s = self.lock();
        s.parked = true;
        self.changed.notify_all();
    }

    /// Waits up to `timeout` for the thread to park (after a `Paused`
    /// request and a kick). Returns whether it did.
    pub fn wait_parked(&self, timeout: std::time::Duration) -> bool {
        let deadline = std::time::Instant::now() + timeout;
        let mut s = self.lock();
        while !s.parked {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            if left.is_zero() {
                return false;
            }
            s = self
                .changed
                .wait_timeout(s, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        true
    }

    /// Whether the thread is parked (or ended).
    pub fn is_parked(&self) -> bool {
        self.lock().parked
    }

    /// The requested state.
    pub fn state(&self) -> RunState {
        self.lock().requested
    }
}

/// Why a run loop ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VcpuEnd {
    /// The owner asked it to stop.
    Stopped,
    /// The guest stopped (reboot, power-off, halt).
    Guest(GuestStop),
    /// KVM failed; the message says how.
    Failed(String),
}

thread_local! {
    /// The `kvm_run` area of the vCPU this thread runs, for the kick handler.
    static KVM_RUN_AREA: Cell<*mut kvm_run> = const { Cell::new(std::ptr::null_mut()) };
}

/// The kick signal's handler: make the current (or next) `KVM_RUN` of this
/// thread's vCPU return at once.
pub(crate) extern "C" fn kick_handler(
    _num: libc::c_int,
    _info: *mut libc::siginfo_t,
    _ctx: *mut libc::c_void,
) {
    let area = KVM_RUN_AREA.with(|a| a.get());
    if !area.is_null() {
        // SAFETY: `area` was set by this thread from its own VcpuFd, whose
        // mapping of the kvm_run area outlives the run loop; the pointer is
        // cleared before the VcpuFd can be dropped. A volatile byte store is
        // async-signal-safe.
        unsafe { std::ptr::addr_of_mut!((*area).immediate_exit).write_volatile(1) };
    }
}

/// Local APIC register offsets (SDM vol. 3, 11.4.1) and delivery modes.
const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_NMI: u32 = 0x4;
const APIC_MODE_EXTINT: u32 = 0x7;

fn lapic_reg(state: &kvm_lapic_state, offset: usize) -> u32 {
    let b = |i: usize| state.regs[offset + i] as u8;
    u32::from_le_bytes([b(0), b(1), b(2), b(3)])
}

fn set_lapic_reg(state: &mut kvm_lapic_state, offset: usize, value: u32) {
    for (i, byte) in value.to_le_bytes().iter().enumerate() {
        state.regs[offset + i] = *byte as libc::c_char;
    }
}

fn set_delivery_mode(reg: u32, mode: u32) -> u32 {
    (reg & !0x700) | (mode << 8)
}

/// One vCPU of a VM.
pub struct Vcpu {
    fd: VcpuFd,
    index: u8,
    io: Arc<IoManager>,
    unhandled: UnhandledLog,
    exits: Arc<SharedExitCounts>,
    msr_list: Vec<u32>,
}

impl std::fmt::Debug for Vcpu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vcpu").field("index", &self.index).finish()
    }
}

impl Vcpu {
    /// Creates vCPU `index` on `vm`; its port and MMIO exits go to `io`.
    pub fn new(vm: &VmFd, index: u8, io: Arc<IoManager>) -> Result<Self> {
        let fd = vm
            .create_vcpu(u64::from(index))
            .map_err(|e| Error::Kvm("KVM_CREATE_VCPU", e))?;
        Ok(Vcpu {
            fd,
            index,
            io,
            unhandled: UnhandledLog::default(),
            exits: Arc::default(),
            msr_list: state::msr_list(&[]),
        })
    }

    /// The vCPU's index (and APIC id).
    pub fn index(&self) -> u8 {
        self.index
    }

    /// The MSRs a state save reads: KVM's index list
    /// (`KVM_GET_MSR_INDEX_LIST`) and [`state::EXTRA_MSRS`].
    pub fn set_msr_list(&mut self, kvm_list: &[u32]) {
        self.msr_list = state::msr_list(kvm_list);
    }

    /// Saves the state of this vCPU (not running).
    pub fn save_state(&self) -> Result<VcpuState> {
        state::save(&self.fd, self.index, &self.msr_list)
    }

    /// Restores `saved` into this new vCPU, instead of
    /// [`set_cpuid`](Self::set_cpuid) and [`setup_boot`](Self::setup_boot).
    pub fn restore_state(&mut self, saved: &VcpuState) -> Result<()> {
        if saved.index != self.index {
            return Err(Error::StateMismatch(format!(
                "the state of vcpu{} restored into vcpu{}",
                saved.index, self.index
            )));
        }
        state::restore(&self.fd, saved)
    }

    /// Sets CPUID from `base` (KVM's supported CPUID, or a CPU model's,
    /// see [`crate::model`]), normalised for `count` vCPUs, and returns the
    /// masked features the host keeps visible anyway (read back with
    /// `KVM_GET_CPUID2`): the guest must be told to ignore those some other
    /// way (see [`cpuid::kernel_params_hiding`]).
    pub fn set_cpuid(
        &self,
        base: &[kvm_bindings::kvm_cpuid_entry2],
        count: u8,
    ) -> Result<Vec<&'static cpuid::MaskedFeature>> {
        let entries = cpuid::normalize(base, self.index, count);
        let cpuid = CpuId::from_entries(&entries).map_err(|_| Error::CpuidTooLarge)?;
        self.fd
            .set_cpuid2(&cpuid)
            .map_err(|e| Error::Kvm("KVM_SET_CPUID2", e))?;
        let effective = self
            .fd
            .get_cpuid2(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
            .map_err(|e| Error::Kvm("KVM_GET_CPUID2", e))?;
        Ok(cpuid::forced_features(effective.as_slice()))
    }

    /// One MSR's value (`None` if KVM will not read it).
    pub fn msr(&self, index: u32) -> Option<u64> {
        let mut msrs = Msrs::from_entries(&[kvm_bindings::kvm_msr_entry {
            index,
            ..Default::default()
        }])
        .ok()?;
        match self.fd.get_msrs(&mut msrs) {
            Ok(1) => Some(msrs.as_slice()[0].data),
            _ => None,
        }
    }

    /// Sets MSRs; every one must be taken.
    pub fn set_msrs(&self, values: &[(u32, u64)]) -> Result<()> {
        let entries: Vec<_> = values
            .iter()
            .map(|&(index, data)| kvm_bindings::kvm_msr_entry {
                index,
                data,
                ..Default::default()
            })
            .collect();
        let msrs = Msrs::from_entries(&entries).map_err(|_| Error::CpuidTooLarge)?;
        let written = self
            .fd
            .set_msrs(&msrs)
            .map_err(|e| Error::Kvm("KVM_SET_MSRS", e))?;
        match entries.get(written) {
            Some(failed) => Err(Error::MsrRejected(failed.index)),
            None => Ok(()),
        }
    }

    /// The guest TSC's frequency (`KVM_GET_TSC_KHZ`).
    pub fn tsc_khz(&self) -> Option<u32> {
        self.fd.get_tsc_khz().ok()
    }

    /// Sets the guest TSC's frequency (`KVM_SET_TSC_KHZ`: needs TSC scaling
    /// unless it is the host's).
    pub fn set_tsc_khz(&self, khz: u32) -> Result<()> {
        self.fd
            .set_tsc_khz(khz)
            .map_err(|e| Error::Kvm("KVM_SET_TSC_KHZ", e))
    }

    /// The CPUID KVM applies to this vCPU now (`KVM_GET_CPUID2`).
    pub fn effective_cpuid(&self) -> Result<Vec<kvm_bindings::kvm_cpuid_entry2>> {
        let c = self
            .fd
            .get_cpuid2(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
            .map_err(|e| Error::Kvm("KVM_GET_CPUID2", e))?;
        Ok(c.as_slice().to_vec())
    }

    /// Sets MSRs, registers for a 64-bit entry at `entry` (page tables and
    /// GDT written into `mem`), the FPU, and LAPIC LINT0/LINT1.
    pub fn setup_boot<M: GuestMemoryBackend>(&mut self, mem: &M, entry: u64) -> Result<()> {
        self.setup_entry(mem, entry, None)
    }

    /// [`setup_boot`](Self::setup_boot) for a PVH entry: 32-bit protected
    /// mode at `entry`, EBX = `start_info` (the `hvm_start_info`).
    pub fn setup_boot_pvh<M: GuestMemoryBackend>(
        &mut self,
        mem: &M,
        entry: u64,
        start_info: u64,
    ) -> Result<()> {
        self.setup_entry(mem, entry, Some(start_info))
    }

    fn setup_entry<M: GuestMemoryBackend>(
        &mut self,
        mem: &M,
        entry: u64,
        pvh_start_info: Option<u64>,
    ) -> Result<()> {
        let msrs = Msrs::from_entries(&regs::boot_msrs()).map_err(|_| Error::CpuidTooLarge)?;
        let written = self
            .fd
            .set_msrs(&msrs)
            .map_err(|e| Error::Kvm("KVM_SET_MSRS", e))?;
        if written != msrs.as_slice().len() {
            let failed = msrs.as_slice()[written].index;
            return Err(Error::MsrRejected(failed));
        }

        let regs = match pvh_start_info {
            Some(info) => regs::pvh_regs(entry, info),
            None => regs::boot_regs(entry),
        };
        self.fd
            .set_regs(&regs)
            .map_err(|e| Error::Kvm("KVM_SET_REGS", e))?;
        let sregs = self
            .fd
            .get_sregs()
            .map_err(|e| Error::Kvm("KVM_GET_SREGS", e))?;
        let sregs = match pvh_start_info {
            Some(_) => regs::pvh_sregs(mem, sregs)?,
            None => regs::boot_sregs(mem, sregs)?,
        };
        self.fd
            .set_sregs(&sregs)
            .map_err(|e| Error::Kvm("KVM_SET_SREGS", e))?;
        self.fd
            .set_fpu(&regs::boot_fpu())
            .map_err(|e| Error::Kvm("KVM_SET_FPU", e))?;
        self.configure_lapic()
    }

    /// LINT0 delivers ExtINT (the PIC), LINT1 delivers NMI, as firmware leaves them.
    fn configure_lapic(&self) -> Result<()> {
        let mut lapic = self
            .fd
            .get_lapic()
            .map_err(|e| Error::Kvm("KVM_GET_LAPIC", e))?;
        let lvt0 = lapic_reg(&lapic, APIC_LVT0);
        set_lapic_reg(
            &mut lapic,
            APIC_LVT0,
            set_delivery_mode(lvt0, APIC_MODE_EXTINT),
        );
        let lvt1 = lapic_reg(&lapic, APIC_LVT1);
        set_lapic_reg(
            &mut lapic,
            APIC_LVT1,
            set_delivery_mode(lvt1, APIC_MODE_NMI),
        );
        self.fd
            .set_lapic(&lapic)
            .map_err(|e| Error::Kvm("KVM_SET_LAPIC", e))
    }

    /// The exits to the VMM so far, by kind.
    pub fn exit_counts(&self) -> ExitCounts {
        self.exits.snapshot()
    }

    /// The exit counters, readable from any thread while the vCPU runs.
    pub fn exit_counter(&self) -> Arc<SharedExitCounts> {
        self.exits.clone()
    }

    /// Runs the guest until `control` asks to stop or the guest stops.
    /// Must be called on the thread that will receive kicks.
    pub fn run(&mut self, control: &VcpuControl) -> VcpuEnd {
        let area: *mut kvm_run = self.fd.get_kvm_run();
        KVM_RUN_AREA.with(|a| a.set(area));
        let end = self.run_loop(control);
        KVM_RUN_AREA.with(|a| a.set(std::ptr::null_mut()));
        end
    }

    fn run_loop(&mut self, control: &VcpuControl) -> VcpuEnd {
        loop {
            // Clear a pending kick before looking at the state: a kick sent
            // after this point makes the next KVM_RUN return at once.
            self.fd.set_kvm_immediate_exit(0);
            match control.state() {
                RunState::Stopped => return VcpuEnd::Stopped,
                RunState::Paused => {
                    self.prepare_to_park();
                    let (fd, index, msrs) = (&self.fd, self.index, &self.msr_list);
                    let save = || state::save(fd, index, msrs).map_err(|e| crate::error_chain(&e));
                    if control.wait_runnable(save) == RunState::Stopped {
                        return VcpuEnd::Stopped;
                    }
                    continue;
                }
                RunState::Running => {}
            }
            let action = match self.fd.run() {
                Ok(exit) => {
                    self.exits.record(&exit);
                    handle_exit(self.index, exit, &self.io, &mut self.unhandled)
                }
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                    self.exits.record_interrupted();
                    ExitAction::Interrupted
                }
                Err(e) => ExitAction::Fail(format!("vcpu{}: KVM_RUN failed: {e}", self.index)),
            };
            match action {
                ExitAction::Continue | ExitAction::Interrupted => {}
                ExitAction::Stop(why) => return VcpuEnd::Guest(why),
                ExitAction::Fail(msg) => return VcpuEnd::Failed(msg),
            }
        }
    }

    /// Before parking: KVM completes a port-in or MMIO-read exit (copies
    /// the answer into the registers) only on the next `KVM_RUN`; one with
    /// `immediate_exit` set does that and returns at once without running
    /// guest code, so the parked vCPU's registers are whole. Then the
    /// guest's kvmclock is told it was stopped (`KVM_KVMCLOCK_CTRL`), so it
    /// does not report a soft lockup when it runs again.
    fn prepare_to_park(&mut self) {
        self.fd.set_kvm_immediate_exit(1);
        match self.fd.run() {
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {}
            Err(e) => log::warn!("vcpu{}: completing the last exit: {e}", self.index),
            Ok(_) => log::warn!("vcpu{}: KVM_RUN ran with immediate_exit set", self.index),
        }
        self.fd.set_kvm_immediate_exit(0);
        // EINVAL when the guest has not enabled kvmclock: nothing to tell.
        if let Err(e) = self.fd.kvmclock_ctrl() {
            log::debug!("vcpu{}: KVM_KVMCLOCK_CTRL: {e}", self.index);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delivery_mode_replaces_only_bits_8_to_10() {
        assert_eq!(
            set_delivery_mode(0x0001_0000, APIC_MODE_EXTINT),
            0x0001_0700
        );
        assert_eq!(set_delivery_mode(0x0001_0700, APIC_MODE_NMI), 0x0001_0400);
    }

    #[test]
    fn lapic_register_round_trips() {
        let mut s = kvm_lapic_state::default();
        set_lapic_reg(&mut s, APIC_LVT1, 0xdead_beef);
        assert_eq!(lapic_reg(&s, APIC_LVT1), 0xdead_beef);
        assert_eq!(lapic_reg(&s, APIC_LVT0), 0);
    }

    fn no_save() -> std::result::Result<VcpuState, String> {
        Err("no vCPU here".into())
    }

    #[test]
    fn control_save_parked_runs_on_the_parked_thread() {
        let c = Arc::new(VcpuControl::default());
        assert!(c.save_parked(std::time::Duration::from_millis(10)).is_err());
        c.request(RunState::Paused);
        let c2 = c.clone();
        let t = std::thread::spawn(move || {
            c2.wait_runnable(|| Err(format!("{:?}", std::thread::current().id())))
        });
        assert!(c.wait_parked(std::time::Duration::from_secs(5)));
        let tid = format!("{:?}", t.thread().id());
        let r = c.save_parked(std::time::Duration::from_secs(5));
        assert_eq!(r.unwrap_err(), tid, "the save ran on the vCPU thread");
        c.request(RunState::Running);
        assert_eq!(t.join().unwrap(), RunState::Running);
    }

    #[test]
    fn control_stopped_is_final() {
        let c = VcpuControl::default();
        c.request(RunState::Stopped);
        c.request(RunState::Running);
        assert_eq!(c.state(), RunState::Stopped);
        assert_eq!(c.wait_runnable(no_save), RunState::Stopped);
    }

    #[test]
    fn control_wait_parked_returns_once_the_thread_parks() {
        let c = Arc::new(VcpuControl::default());
        assert!(!c.wait_parked(std::time::Duration::from_millis(10)));
        c.request(RunState::Paused);
        let c2 = c.clone();
        let t = std::thread::spawn(move || c2.wait_runnable(no_save));
        assert!(c.wait_parked(std::time::Duration::from_secs(5)));
        assert!(c.is_parked());
        c.request(RunState::Running);
        assert_eq!(t.join().unwrap(), RunState::Running);
        assert!(!c.is_parked());
        c.mark_ended();
        assert!(c.wait_parked(std::time::Duration::from_millis(1)));
    }

    #[test]
    fn control_pause_blocks_until_resumed() {
        let c = Arc::new(VcpuControl::default());
        c.request(RunState::Paused);
        let c2 = c.clone();
        let t = std::thread::spawn(move || c2.wait_runnable(no_save));
        std::thread::sleep(std::time::Duration::from_millis(50));
        assert!(!t.is_finished());
        c.request(RunState::Running);
        assert_eq!(t.join().unwrap(), RunState::Running);
    }
}
