//! The KVM VM: `/dev/kvm`, the VM fd, the in-kernel irqchip and PIT, and
//! guest memory registered as KVM memory slots.

use ember_memory::{layout, GuestMemoryMmap};
use kvm_bindings::{
    kvm_pit_config, kvm_userspace_memory_region, CpuId, KVM_MAX_CPUID_ENTRIES,
    KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{Kvm, VmFd};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

use crate::Error;

/// An open `/dev/kvm` and what it says about itself.
#[derive(Debug)]
pub struct Hypervisor {
    /// The system fd.
    pub kvm: Kvm,
    /// `KVM_GET_SUPPORTED_CPUID`.
    pub supported_cpuid: CpuId,
    /// `KVM_CAP_MAX_VCPUS`.
    pub max_vcpus: usize,
    /// `KVM_GET_MSR_INDEX_LIST`: the MSRs a snapshot saves (with the
    /// vcpu crate's extras).
    pub msr_list: Vec<u32>,
}

impl Hypervisor {
    /// Opens `/dev/kvm` and reads its limits.
    pub fn open() -> Result<Self, Error> {
        let kvm = Kvm::new().map_err(Error::OpenKvm)?;
        let supported_cpuid = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(|e| Error::Kvm("KVM_GET_SUPPORTED_CPUID", e))?;
        let max_vcpus = kvm.get_max_vcpus();
        let msr_list = kvm
            .get_msr_index_list()
            .map(|l| l.as_slice().to_vec())
            .unwrap_or_default();
        Ok(Hypervisor {
            kvm,
            supported_cpuid,
            max_vcpus,
            msr_list,
        })
    }

    /// Checks `vcpus` against what KVM allows.
    pub fn check_vcpus(&self, vcpus: u8) -> Result<(), Error> {
        if usize::from(vcpus) > self.max_vcpus {
            return Err(Error::TooManyVcpus {
                asked: vcpus,
                max: self.max_vcpus,
            });
        }
        Ok(())
    }

    /// The guest's physical address width.
    pub fn phys_address_bits(&self) -> u8 {
        ember_vcpu::cpuid::phys_address_bits(self.supported_cpuid.as_slice())
    }
}

/// Creates the VM with the in-kernel irqchip (PIC, IOAPIC, LAPICs) and PIT,
/// and registers `mem` as its RAM (slot `i` for region `i`), with KVM's
/// dirty log on when `track_dirty`.
pub fn create_vm(hv: &Hypervisor, mem: &GuestMemoryMmap, track_dirty: bool) -> Result<VmFd, Error> {
    let vm = hv
        .kvm
        .create_vm()
        .map_err(|e| Error::Kvm("KVM_CREATE_VM", e))?;
    // Memory first: once the irqchip and the TSS exist, KVM has private
    // memory slots of its own and every slot added after them waits for
    // an SRCU grace period (7 ms here for one 256 MiB slot, against 0.2 ms
    // before them; as Firecracker orders it).
    register_memory(&vm, mem, track_dirty)?;
    vm.set_tss_address(usize::try_from(layout::KVM_TSS_ADDRESS).unwrap_or(0))
        .map_err(|e| Error::Kvm("KVM_SET_TSS_ADDR", e))?;
    vm.set_identity_map_address(layout::KVM_IDENTITY_MAP_ADDRESS)
        .map_err(|e| Error::Kvm("KVM_SET_IDENTITY_MAP_ADDR", e))?;
    vm.create_irq_chip()
        .map_err(|e| Error::Kvm("KVM_CREATE_IRQCHIP", e))?;
    let pit = kvm_pit_config {
        // KVM answers port 0x61 (the speaker / PIT gate) itself.
        flags: KVM_PIT_SPEAKER_DUMMY,
        ..Default::default()
    };
    vm.create_pit2(pit)
        .map_err(|e| Error::Kvm("KVM_CREATE_PIT2", e))?;
    Ok(vm)
}

/// Turns KVM's dirty log on or off for every slot of a running VM (a live
/// migration's rounds need it; KVM changes only the slot's flags).
pub fn set_dirty_log(vm: &VmFd, mem: &GuestMemoryMmap, on: bool) -> Result<(), Error> {
    register_memory(vm, mem, on)
}

fn register_memory(vm: &VmFd, mem: &GuestMemoryMmap, track_dirty: bool) -> Result<(), Error> {
    for (slot, region) in mem.iter().enumerate() {
        let region_desc = kvm_userspace_memory_region {
            slot: u32::try_from(slot).map_err(|_| Error::TooManyRegions)?,
            flags: if track_dirty {
                kvm_bindings::KVM_MEM_LOG_DIRTY_PAGES
            } else {
                0
            },
            guest_phys_addr: region.start_addr().0,
            memory_size: region.len(),
            userspace_addr: region.as_ptr() as u64,
        };
        // SAFETY: the region is a live mapping of `region.len()` bytes owned
        // by `mem`, which the caller keeps alive as long as the VM exists
        // (both live in `Vmm` and the VM fd is dropped first); slots do not
        // overlap because vm-memory's regions do not. Registering a slot
        // again with the same address and size changes only its flags.
        unsafe { vm.set_user_memory_region(region_desc) }
            .map_err(|e| Error::Kvm("KVM_SET_USER_MEMORY_REGION", e))?;
    }
    Ok(())
}

/// The pages written since the last call (or since the slots were made),
/// one bitmap per region of `mem`, bit `i` for page `i`: KVM's dirty log
/// (the guest's writes, read and reset) united with each region's bitmap
/// (ember's own writes through vm-memory, read and reset).
pub fn take_dirty_pages(vm: &VmFd, mem: &GuestMemoryMmap) -> Result<Vec<Vec<u64>>, Error> {
    let mut maps = Vec::new();
    for (slot, region) in mem.iter().enumerate() {
        let slot = u32::try_from(slot).map_err(|_| Error::TooManyRegions)?;
        let size = usize::try_from(region.len()).map_err(|_| Error::TooManyRegions)?;
        let mut kvm = vm
            .get_dirty_log(slot, size)
            .map_err(|e| Error::Kvm("KVM_GET_DIRTY_LOG", e))?;
        let ours = vm_memory::mmap::MmapRegion::bitmap(region).take();
        for (k, o) in kvm.iter_mut().zip(ours) {
            *k |= o;
        }
        maps.push(kvm);
    }
    Ok(maps)
}

/// Marks the pages of `maps` (as [`take_dirty_pages`] returned them) dirty
/// again in ember's bitmaps, after a snapshot that could not be written.
pub fn mark_dirty(mem: &GuestMemoryMmap, maps: &[Vec<u64>]) {
    for (region, map) in mem.iter().zip(maps) {
        let bitmap = vm_memory::mmap::MmapRegion::bitmap(region);
        for (w, word) in map.iter().enumerate() {
            for b in 0..64 {
                if word & (1 << b) != 0 {
                    bitmap.mark((w * 64 + b) * 4096, 4096);
                }
            }
        }
    }
}
