//! The KVM VM: opened /dev/kvm, in-kernel IOAPIC/LAPIC/PIT, guest memory registered as slots.

use crate::vstate::coalesced::{CoalescedError, CoalescedRing};
use kvm_bindings::{
    kvm_pit_config, kvm_userspace_memory_region, CpuId, KVM_MAX_CPUID_ENTRIES, KVM_MEM_READONLY,
    KVM_PIT_SPEAKER_DUMMY,
};
use std::sync::Arc;

use crate::vstate::memory::GuestMemoryMmap;
use kvm_ioctls::{Cap, Kvm, VmFd};
use vm_memory::{Address, GuestMemoryBackend, GuestMemoryRegion};

use crate::arch::x86_64::layout::{KVM_IDENTITY_MAP_ADDR, KVM_TSS_ADDR};

#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("cannot open /dev/kvm: {0} (is KVM available and are you allowed to use it?)")]
    OpenKvm(kvm_ioctls::Error),
    #[error("/dev/kvm lacks a capability this VMM needs: {0:?}")]
    MissingCap(Cap),
    #[error(
        "this host's KVM cannot disable the guest PMU (KVM_CAP_PMU_CAPABILITY, Linux 5.18+) \
         and its kvm module has enable_pmu=Y: performance counters would be a side channel \
         between tenants (load kvm with enable_pmu=0 on such a host)"
    )]
    PmuStaysOn,
    #[error("KVM cannot {what}: {source}")]
    Kvm {
        what: &'static str,
        source: kvm_ioctls::Error,
    },
}

/// Capabilities without which the VMM cannot work; checked up front for a clear error.
const REQUIRED_CAPS: [Cap; 8] = [
    Cap::Irqchip,
    Cap::UserMemory,
    Cap::ReadonlyMem,
    Cap::SetTssAddr,
    Cap::Irqfd,
    Cap::Ioeventfd,
    Cap::ExtCpuid,
    Cap::IrqRouting,
];

/// Why the guest has no PMU: the VMM reports it (`info`'s `pmu`, a log line), so a test
/// that finds no PMU in a guest can tell which of the two ways got it there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PmuOff {
    /// KVM offered a virtual PMU and KVM_CAP_PMU_CAPABILITY turned it off for this VM.
    DisabledForVm,
    /// KVM offers no PMU to any VM: kvm's enable_pmu is N, set by the administrator or by
    /// KVM itself on a host without a usable PMU (a nested host under QEMU TCG, for one).
    NoneInKvm,
}

impl PmuOff {
    /// The name `info` reports.
    pub fn as_str(self) -> &'static str {
        match self {
            PmuOff::DisabledForVm => "disabled-for-vm",
            PmuOff::NoneInKvm => "none-in-kvm",
        }
    }
}

/// Turns KVM's virtual PMU off for this VM (before any vCPU exists, as KVM requires): no
/// performance counters, whatever the guest's CPUID says (on AMD, Linux uses the legacy
/// counters without asking CPUID). Where KVM lacks the capability, only a kvm module loaded
/// with enable_pmu=0 (no PMU for any VM) is accepted. KVM reports the capability only while
/// it has a PMU to offer (enable_pmu=Y).
fn disable_pmu(fd: &VmFd) -> Result<PmuOff, VmError> {
    let supported = fd.check_extension_raw(kvm_bindings::KVM_CAP_PMU_CAPABILITY.into());
    if supported & kvm_bindings::KVM_PMU_CAP_DISABLE as i32 != 0 {
        let mut cap = kvm_bindings::kvm_enable_cap {
            cap: kvm_bindings::KVM_CAP_PMU_CAPABILITY,
            ..Default::default()
        };
        cap.args[0] = kvm_bindings::KVM_PMU_CAP_DISABLE.into();
        fd.enable_cap(&cap).map_err(|source| VmError::Kvm {
            what: "disable the guest PMU",
            source,
        })?;
        return Ok(PmuOff::DisabledForVm);
    }
    match std::fs::read_to_string("/sys/module/kvm/parameters/enable_pmu") {
        Ok(v) if v.trim() == "N" => Ok(PmuOff::NoneInKvm),
        _ => Err(VmError::PmuStaysOn),
    }
}

/// How a live migration reads KVM's dirty log (`persist::migration`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DirtyLog {
    /// KVM_GET_DIRTY_LOG reads and write-protects again in one step, and turning logging
    /// on write-protects every page of a slot at once.
    Classic,
    /// KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2 with initially set bitmaps, as QEMU uses it:
    /// turning logging on protects nothing; KVM_CLEAR_DIRTY_LOG write-protects the pages a
    /// round takes, in chunks. Less work for KVM while the guest runs; and the whole-slot
    /// protection at once is the prime suspect for the source guests that crashed now and
    /// then right after logging began, under the test VM's nested emulation.
    Manual,
}

/// Turns on [`DirtyLog::Manual`] where KVM offers it (Linux 5.8 and later).
fn manual_dirty_log(fd: &VmFd) -> Result<DirtyLog, VmError> {
    let want = kvm_bindings::KVM_DIRTY_LOG_MANUAL_PROTECT_ENABLE
        | kvm_bindings::KVM_DIRTY_LOG_INITIALLY_SET;
    let supported = fd.check_extension_raw(kvm_bindings::KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2.into());
    if supported < 0 || supported as u32 & want != want {
        return Ok(DirtyLog::Classic);
    }
    let mut cap = kvm_bindings::kvm_enable_cap {
        cap: kvm_bindings::KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2,
        ..Default::default()
    };
    cap.args[0] = want.into();
    fd.enable_cap(&cap).map_err(|source| VmError::Kvm {
        what: "enable manual dirty log protection",
        source,
    })?;
    Ok(DirtyLog::Manual)
}

pub struct Vm {
    kvm: Kvm,
    /// The MSRs KVM can save and restore, read once (see `state`).
    msrs_to_save: Arc<[u32]>,
    /// Shared with the devices that change KVM state while the guest runs (MSI routes,
    /// notification addresses of moved BARs).
    fd: Arc<VmFd>,
    pmu: PmuOff,
    dirty_log: DirtyLog,
}

impl Vm {
    pub fn new() -> Result<Vm, VmError> {
        Self::with_kvm(Kvm::new().map_err(VmError::OpenKvm)?)
    }

    /// A VM on an already open /dev/kvm (opened before dropping privileges, or inherited).
    pub fn with_kvm(kvm: Kvm) -> Result<Vm, VmError> {
        for cap in REQUIRED_CAPS {
            if !kvm.check_extension(cap) {
                return Err(VmError::MissingCap(cap));
            }
        }
        let kvm_err = |what| move |source| VmError::Kvm { what, source };
        let fd = kvm.create_vm().map_err(kvm_err("create a VM"))?;
        let pmu = disable_pmu(&fd)?;
        let dirty_log = manual_dirty_log(&fd)?;
        fd.set_identity_map_address(KVM_IDENTITY_MAP_ADDR)
            .map_err(kvm_err("set the identity map address"))?;
        fd.set_tss_address(KVM_TSS_ADDR as usize)
            .map_err(kvm_err("set the TSS address"))?;
        fd.create_irq_chip()
            .map_err(kvm_err("create the in-kernel irqchip"))?;
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        fd.create_pit2(pit).map_err(kvm_err("create the PIT"))?;
        let msrs_to_save = kvm
            .get_msr_index_list()
            .map_err(kvm_err("list the MSRs it saves"))?
            .as_slice()
            .into();
        Ok(Vm {
            kvm,
            msrs_to_save,
            fd: Arc::new(fd),
            pmu,
            dirty_log,
        })
    }

    /// How a migration reads the dirty log.
    pub fn dirty_log(&self) -> DirtyLog {
        self.dirty_log
    }

    /// How the guest came to have no PMU.
    pub fn pmu(&self) -> PmuOff {
        self.pmu
    }

    /// The MSRs a snapshot of a vCPU reads.
    pub fn msrs_to_save(&self) -> Arc<[u32]> {
        self.msrs_to_save.clone()
    }

    pub fn fd(&self) -> &VmFd {
        &self.fd
    }

    /// KVM's ring of coalesced writes with `ports` (start, length) registered, mapped from
    /// `vcpu`'s fd; None where KVM cannot coalesce port writes.
    pub fn coalesced_ports(
        &self,
        vcpu: &impl std::os::fd::AsRawFd,
        ports: &[(u16, u32)],
    ) -> Result<Option<CoalescedRing>, CoalescedError> {
        CoalescedRing::for_ports(&self.kvm, &self.fd, vcpu, ports)
    }

    pub fn shared_fd(&self) -> Arc<VmFd> {
        self.fd.clone()
    }

    /// The most vCPUs KVM allows in one VM on this host.
    pub fn max_vcpus(&self) -> usize {
        self.kvm.get_max_vcpus()
    }

    pub fn supported_cpuid(&self) -> Result<CpuId, VmError> {
        self.kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(|source| VmError::Kvm {
                what: "report its supported CPUID",
                source,
            })
    }

    /// Registers every guest memory region as a KVM memory slot.
    pub fn register_memory(&self, mem: &GuestMemoryMmap) -> Result<(), VmError> {
        for (slot, region) in mem.iter().enumerate() {
            let host_addr =
                mem.get_host_address(region.start_addr())
                    .map_err(|_| VmError::Kvm {
                        what: "map guest memory",
                        source: kvm_ioctls::Error::new(libc::EFAULT),
                    })?;
            let region = kvm_userspace_memory_region {
                slot: slot as u32,
                guest_phys_addr: region.start_addr().raw_value(),
                memory_size: region.len(),
                userspace_addr: host_addr as u64,
                flags: 0,
            };
            // SAFETY: the region is a live mapping owned by `mem`, which outlives the VM's use
            // of it: the GuestMemoryMmap is kept alive for as long as any vCPU runs.
            unsafe { self.fd.set_user_memory_region(region) }.map_err(|source| VmError::Kvm {
                what: "register guest memory",
                source,
            })?;
        }
        Ok(())
    }

    /// Maps `size` bytes at `host_addr` read-only into the guest at `guest_addr` as memory
    /// slot `slot`: guest reads are served from it, guest writes exit as MMIO.
    ///
    /// # Safety
    /// The mapping must stay valid for as long as the VM runs.
    pub unsafe fn map_readonly(
        &self,
        slot: u32,
        guest_addr: u64,
        host_addr: u64,
        size: u64,
    ) -> Result<(), VmError> {
        let region = kvm_userspace_memory_region {
            slot,
            guest_phys_addr: guest_addr,
            memory_size: size,
            userspace_addr: host_addr,
            flags: KVM_MEM_READONLY,
        };
        // SAFETY: the caller keeps the mapping alive.
        unsafe { self.fd.set_user_memory_region(region) }.map_err(|source| VmError::Kvm {
            what: "map a device register page",
            source,
        })
    }
}
