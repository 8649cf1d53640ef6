//! The KVM state of a VM and its vCPUs as a snapshot keeps it: read from KVM on a paused VM
//! and written back into a new one before its vCPUs first run.
//!
//! Every KVM structure is kept as KVM's own bytes ([`Raw`], hex in the snapshot's JSON) and
//! checked for its exact size when read back: a snapshot is input from outside the process and
//! a short or long field is an error, never a zero-padded register file. What is saved and in
//! which order it goes back follows Firecracker and Cloud Hypervisor: the MSRs KVM lists
//! (`KVM_GET_MSR_INDEX_LIST`, the architectural and KVM's paravirtual ones), the TSC deadline
//! after the TSC, vCPU events last.

use kvm_bindings::{
    kvm_clock_data, kvm_cpuid_entry2, kvm_debugregs, kvm_irqchip, kvm_lapic_state, kvm_mp_state,
    kvm_msr_entry, kvm_pit_state2, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave,
    CpuId, Msrs, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE,
    KVM_MAX_CPUID_ENTRIES, KVM_MAX_MSR_ENTRIES,
};
use kvm_ioctls::{VcpuFd, VmFd};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use zerocopy::{FromBytes, Immutable, IntoBytes};

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("KVM cannot {what}: {source}")]
    Kvm {
        what: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error("KVM took {done} of the {total} saved MSRs; MSR {index:#x} was refused")]
    MsrRefused {
        done: usize,
        total: usize,
        index: u32,
    },
    #[error("{0} saved CPUID entries or MSRs: more than KVM takes at once")]
    TooMany(usize),
}

fn kvm(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> StateError {
    move |source| StateError::Kvm { what, source }
}

/// A KVM structure as its bytes; serialized as a hex string of exactly its size.
pub struct Raw<T>(pub T);

impl<T> std::fmt::Debug for Raw<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Raw<{}>", std::any::type_name::<T>())
    }
}

impl<T: IntoBytes + Immutable> Serialize for Raw<T> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&hex::encode(self.0.as_bytes()))
    }
}

impl<'de, T: FromBytes> Deserialize<'de> for Raw<T> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        use serde::de::Error;
        let text = String::deserialize(deserializer)?;
        let bytes = hex::decode(&text).map_err(|e| D::Error::custom(format!("not hex: {e}")))?;
        T::read_from_bytes(&bytes).map(Raw).map_err(|_| {
            D::Error::custom(format!(
                "{} bytes where {} takes {}",
                bytes.len(),
                short_type_name::<T>(),
                std::mem::size_of::<T>()
            ))
        })
    }
}

fn short_type_name<T>() -> &'static str {
    let name = std::any::type_name::<T>();
    name.rsplit("::").next().unwrap_or(name)
}

/// MSRs whose value depends on another's: written last (the TSC deadline is relative to the
/// TSC; written before it, a pending timer could fire at once or never).
const MSR_IA32_TSC_DEADLINE: u32 = 0x6e0;

/// Puts the MSRs that must be written last at the end, the others in their saved order.
fn order_msrs(entries: &mut [kvm_msr_entry]) {
    entries.sort_by_key(|e| e.index == MSR_IA32_TSC_DEADLINE);
}

/// One vCPU's registers, as KVM holds them.
#[derive(Debug, Serialize, Deserialize)]
pub struct VcpuState {
    pub id: u8,
    /// This vCPU's CPUID (leaves that carry its APIC ID differ between vCPUs).
    pub cpuid: Vec<Raw<kvm_cpuid_entry2>>,
    pub msrs: Vec<Raw<kvm_msr_entry>>,
    pub regs: Raw<kvm_regs>,
    pub sregs: Raw<kvm_sregs>,
    pub xsave: Raw<kvm_xsave>,
    pub xcrs: Raw<kvm_xcrs>,
    pub debugregs: Raw<kvm_debugregs>,
    pub lapic: Raw<kvm_lapic_state>,
    pub mp_state: Raw<kvm_mp_state>,
    pub events: Raw<kvm_vcpu_events>,
    /// The guest's TSC frequency; None where KVM cannot tell it.
    pub tsc_khz: Option<u32>,
}

/// Reads every MSR of `indices` that KVM will give; an MSR it refuses is left out (KVM lists
/// some that only exist with features this guest lacks).
fn read_msrs(fd: &VcpuFd, indices: &[u32]) -> Result<Vec<Raw<kvm_msr_entry>>, StateError> {
    let mut saved = Vec::with_capacity(indices.len());
    let mut rest = indices;
    while !rest.is_empty() {
        let chunk = &rest[..rest.len().min(KVM_MAX_MSR_ENTRIES)];
        let entries: Vec<kvm_msr_entry> = chunk
            .iter()
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut msrs =
            Msrs::from_entries(&entries).map_err(|_| StateError::TooMany(chunk.len()))?;
        let read = fd.get_msrs(&mut msrs).map_err(kvm("read the MSRs"))?;
        saved.extend(msrs.as_slice()[..read].iter().map(|e| Raw(*e)));
        // KVM stops at the first MSR it refuses: skip that one.
        let consumed = if read < chunk.len() { read + 1 } else { read };
        rest = &rest[consumed..];
    }
    Ok(saved)
}

/// Reads the state of a vCPU that is not running (its thread parked outside KVM_RUN). An
/// exit the VMM handled last is completed first: KVM finishes a port or MMIO read into the
/// guest's registers only on the next KVM_RUN, which `immediate_exit` makes return at once.
pub fn save_vcpu(fd: &mut VcpuFd, id: u8, msr_indices: &[u32]) -> Result<VcpuState, StateError> {
    fd.set_kvm_immediate_exit(1);
    let flushed = fd.run().err().map(|e| e.errno());
    fd.set_kvm_immediate_exit(0);
    if let Some(errno) = flushed {
        if errno != libc::EINTR {
            return Err(StateError::Kvm {
                what: "complete the vCPU's last exit",
                source: kvm_ioctls::Error::new(errno),
            });
        }
    }
    let mp_state = fd.get_mp_state().map_err(kvm("read the MP state"))?;
    let cpuid = fd
        .get_cpuid2(KVM_MAX_CPUID_ENTRIES)
        .map_err(kvm("read CPUID"))?;
    let tsc_khz = fd.get_tsc_khz().ok();
    Ok(VcpuState {
        id,
        cpuid: cpuid.as_slice().iter().map(|e| Raw(*e)).collect(),
        regs: Raw(fd.get_regs().map_err(kvm("read the registers"))?),
        sregs: Raw(fd.get_sregs().map_err(kvm("read the system registers"))?),
        xsave: Raw(fd.get_xsave().map_err(kvm("read the XSAVE area"))?),
        xcrs: Raw(fd.get_xcrs().map_err(kvm("read the XCRs"))?),
        debugregs: Raw(fd
            .get_debug_regs()
            .map_err(kvm("read the debug registers"))?),
        lapic: Raw(fd.get_lapic().map_err(kvm("read the LAPIC"))?),
        msrs: read_msrs(fd, msr_indices)?,
        events: Raw(fd.get_vcpu_events().map_err(kvm("read the vCPU events"))?),
        mp_state: Raw(mp_state),
        tsc_khz,
    })
}

/// Writes `state` into a new vCPU before it first runs.
pub fn restore_vcpu(fd: &VcpuFd, state: &VcpuState) -> Result<(), StateError> {
    if let Some(khz) = state.tsc_khz {
        // A host of another TSC frequency scales the guest's; where KVM cannot, the guest
        // keeps running with a clock that drifts until NTP corrects it (as after QEMU's).
        if fd.get_tsc_khz().ok() != Some(khz) {
            if let Err(e) = fd.set_tsc_khz(khz) {
                tracing::warn!("cannot set the guest TSC to {khz} kHz: {e}");
            }
        }
    }
    let entries: Vec<kvm_cpuid_entry2> = state.cpuid.iter().map(|e| e.0).collect();
    let cpuid =
        CpuId::from_entries(&entries).map_err(|_| StateError::TooMany(state.cpuid.len()))?;
    fd.set_cpuid2(&cpuid).map_err(kvm("set CPUID"))?;
    fd.set_mp_state(state.mp_state.0)
        .map_err(kvm("set the MP state"))?;
    fd.set_regs(&state.regs.0)
        .map_err(kvm("set the registers"))?;
    fd.set_sregs(&state.sregs.0)
        .map_err(kvm("set the system registers"))?;
    // SAFETY: the XSAVE area is KVM's own layout, read back as it was saved; KVM checks it.
    unsafe { fd.set_xsave(&state.xsave.0) }.map_err(kvm("set the XSAVE area"))?;
    fd.set_xcrs(&state.xcrs.0).map_err(kvm("set the XCRs"))?;
    fd.set_debug_regs(&state.debugregs.0)
        .map_err(kvm("set the debug registers"))?;
    fd.set_lapic(&state.lapic.0).map_err(kvm("set the LAPIC"))?;
    let mut entries: Vec<kvm_msr_entry> = state.msrs.iter().map(|e| e.0).collect();
    order_msrs(&mut entries);
    for chunk in entries.chunks(KVM_MAX_MSR_ENTRIES) {
        let msrs = Msrs::from_entries(chunk).map_err(|_| StateError::TooMany(chunk.len()))?;
        let written = fd.set_msrs(&msrs).map_err(kvm("set the MSRs"))?;
        if written != chunk.len() {
            return Err(StateError::MsrRefused {
                done: written,
                total: chunk.len(),
                index: chunk[written].index,
            });
        }
    }
    fd.set_vcpu_events(&state.events.0)
        .map_err(kvm("set the vCPU events"))?;
    // Tells a guest with kvmclock that it was paused, so its watchdogs do not fire; not every
    // guest has kvmclock enabled (EINVAL then).
    let _ = fd.kvmclock_ctrl();
    Ok(())
}

/// The VM-wide interrupt controllers and clocks: the two PICs, the IOAPIC, the PIT, kvmclock.
#[derive(Debug, Serialize, Deserialize)]
pub struct VmState {
    pub pic_master: Raw<kvm_irqchip>,
    pub pic_slave: Raw<kvm_irqchip>,
    pub ioapic: Raw<kvm_irqchip>,
    pub pit: Raw<kvm_pit_state2>,
    pub clock: Raw<kvm_clock_data>,
}

fn irqchip(fd: &VmFd, chip_id: u32) -> Result<Raw<kvm_irqchip>, StateError> {
    let mut chip = kvm_irqchip {
        chip_id,
        ..Default::default()
    };
    fd.get_irqchip(&mut chip)
        .map_err(kvm("read the interrupt controllers"))?;
    Ok(Raw(chip))
}

pub fn save_vm(fd: &VmFd) -> Result<VmState, StateError> {
    let mut clock = fd.get_clock().map_err(kvm("read kvmclock"))?;
    // Only the clock's value goes back: the flags describe this host's TSC.
    clock.flags = 0;
    Ok(VmState {
        pic_master: irqchip(fd, KVM_IRQCHIP_PIC_MASTER)?,
        pic_slave: irqchip(fd, KVM_IRQCHIP_PIC_SLAVE)?,
        ioapic: irqchip(fd, KVM_IRQCHIP_IOAPIC)?,
        pit: Raw(fd.get_pit2().map_err(kvm("read the PIT"))?),
        clock: Raw(clock),
    })
}

/// Writes `state` into a new VM. The guest's kvmclock continues from the saved value: time
/// in the guest does not pass while it was not running, and never goes back.
pub fn restore_vm(fd: &VmFd, state: &VmState) -> Result<(), StateError> {
    for chip in [&state.pic_master, &state.pic_slave, &state.ioapic] {
        fd.set_irqchip(&chip.0)
            .map_err(kvm("set the interrupt controllers"))?;
    }
    fd.set_pit2(&state.pit.0).map_err(kvm("set the PIT"))?;
    let mut clock = state.clock.0;
    clock.flags = 0;
    fd.set_clock(&clock).map_err(kvm("set kvmclock"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raw_structures_round_trip_and_wrong_sizes_are_refused() {
        let regs = kvm_regs {
            rip: 0x1234_5678,
            rflags: 2,
            ..Default::default()
        };
        let json = serde_json::to_string(&Raw(regs)).expect("serialize");
        let back: Raw<kvm_regs> = serde_json::from_str(&json).expect("deserialize");
        assert_eq!(back.0, regs);

        let short = format!("\"{}\"", &json[1..json.len() - 3]);
        let e = serde_json::from_str::<Raw<kvm_regs>>(&short).expect_err("short");
        assert!(e.to_string().contains("where kvm_regs takes 144"), "{e}");
        let e = serde_json::from_str::<Raw<kvm_regs>>("\"zz\"").expect_err("not hex");
        assert!(e.to_string().contains("not hex"), "{e}");
        let e = serde_json::from_str::<Raw<kvm_regs>>("[1,2]").expect_err("not a string");
        assert!(e.to_string().contains("string"), "{e}");
    }

    #[test]
    fn the_tsc_deadline_goes_after_the_tsc() {
        let entry = |index| kvm_msr_entry {
            index,
            ..Default::default()
        };
        let mut msrs: Vec<_> = [0x6e0, 0x10, 0x174, 0x4b56_4d01].map(entry).into();
        order_msrs(&mut msrs);
        let order: Vec<u32> = msrs.iter().map(|e| e.index).collect();
        assert_eq!(order, [0x10, 0x174, 0x4b56_4d01, 0x6e0]);
    }
}
