//! The vCPU run loop under real KVM, with a guest that counts: pausing
//! stops the count, resuming restarts it, stopping ends the thread.
//! Skipped loudly when `/dev/kvm` is not usable.

use std::sync::Arc;
use std::time::{Duration, Instant};

use ember_memory::MemoryLayout;
use ember_vcpu::{kick_thread, register_kick_signal, RunState, Vcpu, VcpuControl, VcpuEnd};
use kvm_bindings::{kvm_userspace_memory_region, KVM_MAX_CPUID_ENTRIES};
use vm_device::device_manager::IoManager;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

const CODE_ADDR: u64 = 0x10_0000;
const COUNTER_ADDR: u64 = 0x5000;

/// `1: incq 0x5000 ; jmp 1b`
const COUNT_LOOP: [u8; 10] = [0x48, 0xff, 0x04, 0x25, 0x00, 0x50, 0x00, 0x00, 0xeb, 0xf6];

fn wait_until(what: &str, timeout: Duration, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn run_loop_pauses_resumes_and_stops_a_counting_guest() {
    let kvm = match kvm_ioctls::Kvm::new() {
        Ok(k) => k,
        Err(e) => {
            eprintln!("\n!!!!! SKIPPED run_loop test: /dev/kvm is not usable ({e}) !!!!!\n");
            return;
        }
    };
    let vm = kvm.create_vm().unwrap();
    vm.create_irq_chip().unwrap();
    let mem = MemoryLayout::new(16)
        .unwrap()
        .create_guest_memory()
        .unwrap();
    for (slot, r) in mem.iter().enumerate() {
        let region = kvm_userspace_memory_region {
            slot: u32::try_from(slot).unwrap(),
            flags: 0,
            guest_phys_addr: r.start_addr().0,
            memory_size: r.len(),
            userspace_addr: r.as_ptr() as u64,
        };
        // SAFETY: `mem` outlives the VM in this test and the region is a
        // live mapping of `r.len()` bytes.
        unsafe { vm.set_user_memory_region(region).unwrap() };
    }
    mem.write_slice(&COUNT_LOOP, GuestAddress(CODE_ADDR))
        .unwrap();

    let supported = kvm.get_supported_cpuid(KVM_MAX_CPUID_ENTRIES).unwrap();
    let mut vcpu = Vcpu::new(&vm, 0, Arc::new(IoManager::new())).unwrap();
    vcpu.set_cpuid(supported.as_slice(), 1).unwrap();
    vcpu.setup_boot(&mem, CODE_ADDR).unwrap();
    register_kick_signal().unwrap();

    let control = Arc::new(VcpuControl::default());
    let c = control.clone();
    let thread = std::thread::spawn(move || vcpu.run(&c));
    let count = || mem.read_obj::<u64>(GuestAddress(COUNTER_ADDR)).unwrap();

    wait_until("the guest counts", Duration::from_secs(10), || {
        count() > 1000
    });

    control.request(RunState::Paused);
    kick_thread(&thread).unwrap();
    std::thread::sleep(Duration::from_millis(100));
    let paused_at = count();
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(count(), paused_at, "a paused vCPU does not run the guest");

    control.request(RunState::Running);
    wait_until("the resumed guest counts", Duration::from_secs(10), || {
        count() > paused_at + 1000
    });

    control.request(RunState::Stopped);
    kick_thread(&thread).unwrap();
    let stopped = Instant::now();
    let end = thread.join().unwrap();
    assert_eq!(end, VcpuEnd::Stopped);
    assert!(
        stopped.elapsed() < Duration::from_secs(1),
        "the kick ended KVM_RUN promptly"
    );
}
