//! A vCPU's complete state as plain data, for snapshots and migration.
//!
//! Saved in the order KVM wants (MP state first: reading it makes KVM
//! accept pending INIT/SIPI events), restored in the order that keeps each
//! step valid: CPUID before anything that depends on it (XSAVE size, MSR
//! availability), special registers before MSRs (EFER), the LAPIC before
//! the vCPU events, MSRs with the TSC before the events.

use kvm_bindings::{
    kvm_cpuid_entry2, kvm_debugregs, kvm_lapic_state, kvm_mp_state, kvm_msr_entry, kvm_regs,
    kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave, CpuId, Msrs,
};
use kvm_ioctls::VcpuFd;
use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// The MSRs KVM's index list (`KVM_GET_MSR_INDEX_LIST`) leaves out but a
/// running Linux guest uses, saved as well.
pub const EXTRA_MSRS: &[u32] = &[
    0x10,        // IA32_TSC
    0x1b,        // IA32_APIC_BASE
    0x3b,        // IA32_TSC_ADJUST
    0xc000_0080, // EFER
    0xc000_0103, // TSC_AUX
    0x174,       // SYSENTER_CS
    0x175,       // SYSENTER_ESP
    0x176,       // SYSENTER_EIP
    0xc000_0081, // STAR
    0xc000_0082, // LSTAR
    0xc000_0083, // CSTAR
    0xc000_0084, // SFMASK
    0xc000_0102, // KERNEL_GS_BASE
    0x1a0,       // IA32_MISC_ENABLE
    0x277,       // PAT
    0x2ff,       // MTRRdefType
    0x250,       // MTRRfix64K_00000
    0x258,       // MTRRfix16K_80000
    0x259,       // MTRRfix16K_A0000
    0x268,       // MTRRfix4K_C0000 .. 0x26f
    0x269,
    0x26a,
    0x26b,
    0x26c,
    0x26d,
    0x26e,
    0x26f,
    0x200, // MTRRphysBase0 / Mask0 .. 7
    0x201,
    0x202,
    0x203,
    0x204,
    0x205,
    0x206,
    0x207,
    0x208,
    0x209,
    0x20a,
    0x20b,
    0x20c,
    0x20d,
    0x20e,
    0x20f,
    0x4b56_4d00, // MSR_KVM_WALL_CLOCK_NEW
    0x4b56_4d01, // MSR_KVM_SYSTEM_TIME_NEW
    0x4b56_4d02, // MSR_KVM_ASYNC_PF_EN
    0x4b56_4d03, // MSR_KVM_STEAL_TIME
    0x4b56_4d04, // MSR_KVM_PV_EOI_EN
    0x4b56_4d05, // MSR_KVM_POLL_CONTROL
    0x4b56_4d06, // MSR_KVM_ASYNC_PF_INT
    0x11,        // MSR_KVM_WALL_CLOCK (old)
    0x12,        // MSR_KVM_SYSTEM_TIME (old)
];

/// The MSRs to save: KVM's list and [`EXTRA_MSRS`], each once, in order.
pub fn msr_list(kvm_list: &[u32]) -> Vec<u32> {
    let mut v: Vec<u32> = kvm_list.iter().chain(EXTRA_MSRS).copied().collect();
    v.sort_unstable();
    v.dedup();
    v
}

/// The version of [`VcpuState`]'s layout.
pub const VCPU_STATE_VERSION: u32 = 1;

/// Everything KVM holds for one vCPU.
#[derive(Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VcpuState {
    /// Layout version ([`VCPU_STATE_VERSION`]).
    pub version: u32,
    /// The vCPU's index (and APIC id).
    pub index: u8,
    /// The CPUID the guest saw.
    pub cpuid: Vec<kvm_cpuid_entry2>,
    /// Running, halted, waiting for SIPI...
    pub mp_state: kvm_mp_state,
    /// General registers.
    pub regs: kvm_regs,
    /// Segment, control and descriptor-table registers.
    pub sregs: kvm_sregs,
    /// FPU, SSE and AVX state.
    pub xsave: kvm_xsave,
    /// Extended control registers (XCR0).
    pub xcrs: kvm_xcrs,
    /// Debug registers.
    pub debugregs: kvm_debugregs,
    /// The local APIC's registers.
    pub lapic: kvm_lapic_state,
    /// Model-specific registers.
    pub msrs: Vec<kvm_msr_entry>,
    /// Pending exceptions, interrupts, NMIs and SMIs.
    pub events: kvm_vcpu_events,
}

fn kvm(what: &'static str) -> impl Fn(kvm_ioctls::Error) -> Error {
    move |e| Error::Kvm(what, e)
}

/// Reads the MSRs of `list` that this vCPU has: KVM stops a batch at the
/// first MSR it cannot read, which is dropped and the rest read on.
fn read_msrs(fd: &VcpuFd, list: &[u32]) -> Result<Vec<kvm_msr_entry>> {
    let mut out = Vec::with_capacity(list.len());
    let mut rest = list;
    while !rest.is_empty() {
        let entries: Vec<kvm_msr_entry> = rest
            .iter()
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut msrs = Msrs::from_entries(&entries).map_err(|_| Error::CpuidTooLarge)?;
        let n = fd.get_msrs(&mut msrs).map_err(kvm("KVM_GET_MSRS"))?;
        out.extend_from_slice(&msrs.as_slice()[..n.min(rest.len())]);
        // Skip the one KVM could not read.
        rest = rest.get(n + 1..).unwrap_or(&[]);
    }
    Ok(out)
}

/// Saves the state of `fd`, a vCPU that is not running, reading the MSRs
/// of `msr_list`.
pub fn save(fd: &VcpuFd, index: u8, msr_list: &[u32]) -> Result<VcpuState> {
    let mp_state = fd.get_mp_state().map_err(kvm("KVM_GET_MP_STATE"))?;
    let regs = fd.get_regs().map_err(kvm("KVM_GET_REGS"))?;
    let sregs = fd.get_sregs().map_err(kvm("KVM_GET_SREGS"))?;
    let xsave = fd.get_xsave().map_err(kvm("KVM_GET_XSAVE"))?;
    let xcrs = fd.get_xcrs().map_err(kvm("KVM_GET_XCRS"))?;
    let debugregs = fd.get_debug_regs().map_err(kvm("KVM_GET_DEBUGREGS"))?;
    let lapic = fd.get_lapic().map_err(kvm("KVM_GET_LAPIC"))?;
    let cpuid = fd
        .get_cpuid2(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
        .map_err(kvm("KVM_GET_CPUID2"))?;
    let msrs = read_msrs(fd, msr_list)?;
    let events = fd.get_vcpu_events().map_err(kvm("KVM_GET_VCPU_EVENTS"))?;
    Ok(VcpuState {
        version: VCPU_STATE_VERSION,
        index,
        cpuid: cpuid.as_slice().to_vec(),
        mp_state,
        regs,
        sregs,
        xsave,
        xcrs,
        debugregs,
        lapic,
        msrs,
        events,
    })
}

/// Restores `state` into `fd`, a new vCPU that has not run.
pub fn restore(fd: &VcpuFd, state: &VcpuState) -> Result<()> {
    if state.version != VCPU_STATE_VERSION {
        return Err(Error::StateVersion {
            what: "vCPU",
            found: state.version,
            supported: VCPU_STATE_VERSION,
        });
    }
    let cpuid = CpuId::from_entries(&state.cpuid).map_err(|_| Error::CpuidTooLarge)?;
    fd.set_cpuid2(&cpuid).map_err(kvm("KVM_SET_CPUID2"))?;
    fd.set_mp_state(state.mp_state)
        .map_err(kvm("KVM_SET_MP_STATE"))?;
    fd.set_regs(&state.regs).map_err(kvm("KVM_SET_REGS"))?;
    fd.set_sregs(&state.sregs).map_err(kvm("KVM_SET_SREGS"))?;
    // SAFETY: the buffer is a whole kvm_xsave (4096 bytes), what
    // KVM_SET_XSAVE reads without KVM_CAP_XSAVE2 enabled; ember never
    // enables it.
    unsafe { fd.set_xsave(&state.xsave) }.map_err(kvm("KVM_SET_XSAVE"))?;
    fd.set_xcrs(&state.xcrs).map_err(kvm("KVM_SET_XCRS"))?;
    fd.set_debug_regs(&state.debugregs)
        .map_err(kvm("KVM_SET_DEBUGREGS"))?;
    fd.set_lapic(&state.lapic).map_err(kvm("KVM_SET_LAPIC"))?;
    let msrs = Msrs::from_entries(&state.msrs).map_err(|_| Error::CpuidTooLarge)?;
    let written = fd.set_msrs(&msrs).map_err(kvm("KVM_SET_MSRS"))?;
    if written != state.msrs.len() {
        let failed = state.msrs.get(written).map_or(0, |e| e.index);
        return Err(Error::MsrRejected(failed));
    }
    fd.set_vcpu_events(&state.events)
        .map_err(kvm("KVM_SET_VCPU_EVENTS"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn msr_list_has_kvm_and_extra_once() {
        let l = msr_list(&[0x10, 0xc000_0080, 0x1234]);
        assert!(l.contains(&0x1234));
        assert_eq!(l.iter().filter(|&&m| m == 0x10).count(), 1);
        assert!(l.contains(&0x4b56_4d01));
        assert!(l.windows(2).all(|w| w[0] < w[1]));
    }
}
