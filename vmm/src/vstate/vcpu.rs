//! One vCPU: its KVM fd, its boot state, and the thread that runs it.

use std::sync::Arc;

use kvm_bindings::CpuId;
use kvm_ioctls::{VcpuExit, VcpuFd};
use seccompiler::BpfProgram;

use crate::arch::x86_64::regs::BootEntry;
use crate::arch::x86_64::{cpuid, interrupts, regs};
use crate::devices::Bus;
use crate::exit::{ExitReason, VmExitRequest};
use crate::sandbox::{self, ThreadKind};
use crate::vstate::coalesced::CoalescedRing;
use crate::vstate::control::{set_current_kvm_run, VcpuControl, VcpuStats, Wake};
use crate::vstate::state::{self, StateError, VcpuState};
use crate::vstate::vm::Vm;

#[derive(Debug, thiserror::Error)]
pub enum VcpuError {
    #[error("KVM cannot {what} for vCPU {id}: {source}")]
    Kvm {
        id: u8,
        what: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error("vCPU {id}: {source}")]
    Regs { id: u8, source: regs::RegsError },
    #[error("vCPU {id}: {source}")]
    State { id: u8, source: StateError },
    #[error("cannot start the thread of vCPU {id}: {source}")]
    Spawn { id: u8, source: std::io::Error },
}

const KVM_SYSTEM_EVENT_SHUTDOWN: u32 = 1;

/// What a KVM_EXIT_INTERNAL_ERROR suberror means.
fn internal_error_name(suberror: u32) -> &'static str {
    match suberror {
        kvm_bindings::KVM_INTERNAL_ERROR_EMULATION => "instruction emulation failed",
        kvm_bindings::KVM_INTERNAL_ERROR_SIMUL_EX => "exception while delivering an exception",
        kvm_bindings::KVM_INTERNAL_ERROR_DELIVERY_EV => "event delivery failed",
        kvm_bindings::KVM_INTERNAL_ERROR_UNEXPECTED_EXIT_REASON => "unexpected exit reason",
        _ => "unknown suberror",
    }
}
const KVM_SYSTEM_EVENT_RESET: u32 = 2;
const KVM_SYSTEM_EVENT_CRASH: u32 = 3;

/// What a vCPU thread shares with the rest of the VMM.
pub struct VcpuRuntime {
    /// The gate it passes before each KVM_RUN (start, pause, resume).
    pub control: Arc<VcpuControl>,
    pub stats: Arc<VcpuStats>,
    /// Its seccomp filter, installed first thing on the thread; None with `--seccomp off`.
    pub filter: Option<BpfProgram>,
}

pub struct Vcpu {
    id: u8,
    fd: VcpuFd,
    pio: Bus,
    mmio: Bus,
    exit: VmExitRequest,
    /// The VM's coalesced port writes, replayed before each port exit is handled.
    coalesced: Option<Arc<CoalescedRing>>,
    /// The MSRs a snapshot saves (KVM's list, read once per VM).
    msrs_to_save: Arc<[u32]>,
}

impl Vcpu {
    pub fn new(
        vm: &Vm,
        id: u8,
        pio: Bus,
        mmio: Bus,
        exit: VmExitRequest,
    ) -> Result<Vcpu, VcpuError> {
        let fd = vm
            .fd()
            .create_vcpu(u64::from(id))
            .map_err(|source| VcpuError::Kvm {
                id,
                what: "create the vCPU",
                source,
            })?;
        Ok(Vcpu {
            id,
            fd,
            pio,
            mmio,
            exit,
            coalesced: None,
            msrs_to_save: vm.msrs_to_save(),
        })
    }

    /// The vCPU's KVM fd (for mappings the VM shares through it).
    pub fn fd(&self) -> &VcpuFd {
        &self.fd
    }

    /// Replays `ring`'s buffered port writes before each port exit.
    pub fn set_coalesced(&mut self, ring: Arc<CoalescedRing>) {
        self.coalesced = Some(ring);
    }

    pub fn id(&self) -> u8 {
        self.id
    }

    /// CPUID, MSRs, registers and LAPIC for the 64-bit boot protocol. Application processors
    /// get the same state; KVM keeps them waiting for the guest's INIT/SIPI.
    pub fn configure(
        &self,
        supported_cpuid: &CpuId,
        vcpu_count: u8,
        entry: BootEntry,
    ) -> Result<(), VcpuError> {
        let id = self.id;
        let kvm = |what| move |source| VcpuError::Kvm { id, what, source };
        self.fd
            .set_cpuid2(&cpuid::vcpu_cpuid(supported_cpuid, id, vcpu_count))
            .map_err(kvm("set CPUID"))?;
        regs::setup_vcpu_regs(&self.fd, entry).map_err(|source| VcpuError::Regs { id, source })?;
        let mut lapic = self.fd.get_lapic().map_err(kvm("read the LAPIC"))?;
        interrupts::set_lint(&mut lapic);
        self.fd.set_lapic(&lapic).map_err(kvm("set the LAPIC"))?;
        Ok(())
    }

    /// Puts a snapshot's state into this new vCPU instead of [`Self::configure`]'s boot state.
    pub fn restore(&self, saved: &VcpuState) -> Result<(), VcpuError> {
        state::restore_vcpu(&self.fd, saved).map_err(|source| VcpuError::State {
            id: self.id,
            source,
        })
    }

    /// This vCPU's state, read on its own thread while the VM is paused.
    fn save_state(&mut self) -> Result<VcpuState, VcpuError> {
        let id = self.id;
        // Port writes KVM buffered (the PCI address register) belong to the devices' state.
        if let Some(ring) = &self.coalesced {
            ring.drain(&self.pio);
        }
        state::save_vcpu(&mut self.fd, id, &self.msrs_to_save)
            .map_err(|source| VcpuError::State { id, source })
    }

    /// Starts the vCPU's thread. It installs `runtime.filter`, then waits at the gate of
    /// `runtime.control` until the VMM releases the vCPUs.
    pub fn spawn(self, runtime: VcpuRuntime) -> Result<(), VcpuError> {
        let id = self.id;
        let control = runtime.control.clone();
        control.thread_starting();
        match std::thread::Builder::new()
            .name(format!("vcpu{id}"))
            .stack_size(crate::THREAD_STACK_SIZE)
            .spawn(move || self.run(runtime))
        {
            Ok(handle) => {
                control.add_thread(handle);
                Ok(())
            }
            Err(source) => {
                control.thread_finished();
                Err(VcpuError::Spawn { id, source })
            }
        }
    }

    fn run(mut self, runtime: VcpuRuntime) {
        set_current_kvm_run(self.fd.get_kvm_run());
        match sandbox::seccomp::apply(ThreadKind::Vcpu, runtime.filter.as_ref()) {
            Err(e) => {
                tracing::error!("vCPU {}: {e}", self.id);
                self.exit.request(ExitReason::VcpuError);
            }
            Ok(()) => {
                sandbox::test_forbidden_syscall(ThreadKind::Vcpu);
                let mut save_round = 0;
                loop {
                    if runtime.control.wait_until_runnable(&mut save_round) == Wake::SaveState {
                        let saved = self.save_state().map_err(|e| e.to_string());
                        runtime.control.deliver_state(saved);
                        continue;
                    }
                    if self.exit.reason().is_some() {
                        break;
                    }
                    if let Some(reason) = self.run_once(&runtime.stats) {
                        self.exit.request(reason);
                        break;
                    }
                }
            }
        }
        set_current_kvm_run(std::ptr::null_mut());
        runtime.control.thread_finished();
    }

    /// The suberror and data of the KVM_EXIT_INTERNAL_ERROR that just happened.
    fn internal_error(&mut self) -> (u32, Vec<u64>) {
        let run = self.fd.get_kvm_run();
        // SAFETY: the exit reason is KVM_EXIT_INTERNAL_ERROR, so `internal` is the union
        // member KVM filled in; ndata is clamped to the array.
        let internal = unsafe { run.__bindgen_anon_1.internal };
        let n = (internal.ndata as usize).min(internal.data.len());
        (internal.suberror, internal.data[..n].to_vec())
    }

    /// Runs the guest until its next exit and handles it; returns why the VM must end, if so.
    fn run_once(&mut self, stats: &VcpuStats) -> Option<ExitReason> {
        let id = self.id;
        let result = self.fd.run();
        let counter = match &result {
            Ok(VcpuExit::IoIn(..) | VcpuExit::IoOut(..)) => &stats.io,
            Ok(VcpuExit::MmioRead(..) | VcpuExit::MmioWrite(..)) => &stats.mmio,
            Ok(VcpuExit::Hlt) => &stats.hlt,
            Err(e) if e.errno() == libc::EINTR => &stats.interrupted,
            _ => &stats.other,
        };
        VcpuStats::count(counter);
        match result {
            Ok(VcpuExit::IoIn(port, data)) => {
                if let Some(ring) = &self.coalesced {
                    ring.drain(&self.pio);
                }
                self.pio.read(u64::from(port), data)
            }
            Ok(VcpuExit::IoOut(port, data)) => {
                if let Some(ring) = &self.coalesced {
                    ring.drain(&self.pio);
                }
                self.pio.write(u64::from(port), data)
            }
            Ok(VcpuExit::MmioRead(addr, data)) => self.mmio.read(addr, data),
            Ok(VcpuExit::MmioWrite(addr, data)) => self.mmio.write(addr, data),
            Ok(VcpuExit::Hlt) => {}
            Ok(VcpuExit::Shutdown) => {
                // A triple fault: Linux's last resort to reboot, or a broken guest.
                tracing::warn!("vCPU {id}: guest triple-faulted; treating it as a reset");
                return Some(ExitReason::GuestReset);
            }
            Ok(VcpuExit::SystemEvent(kind, _)) => match kind {
                KVM_SYSTEM_EVENT_SHUTDOWN => return Some(ExitReason::GuestPowerOff),
                KVM_SYSTEM_EVENT_RESET | KVM_SYSTEM_EVENT_CRASH => {
                    return Some(ExitReason::GuestReset)
                }
                other => tracing::warn!("vCPU {id}: ignoring system event {other}"),
            },
            Ok(VcpuExit::FailEntry(reason, cpu)) => {
                tracing::error!("vCPU {id}: KVM failed to enter the guest (hardware reason {reason:#x}, cpu {cpu})");
                return Some(ExitReason::VcpuError);
            }
            Ok(VcpuExit::InternalError) => {
                let (suberror, data) = self.internal_error();
                tracing::error!(
                    "vCPU {id}: the guest crashed its vCPU: KVM internal error {suberror} \
                     ({}), data {data:x?}",
                    internal_error_name(suberror)
                );
                return Some(ExitReason::GuestFault);
            }
            Ok(VcpuExit::Unknown) => {
                tracing::error!("vCPU {id}: the guest crashed its vCPU: unknown hardware exit");
                return Some(ExitReason::GuestFault);
            }
            Ok(VcpuExit::Exception) => {
                tracing::error!("vCPU {id}: the guest crashed its vCPU: unhandled exception");
                return Some(ExitReason::GuestFault);
            }
            Ok(other) => {
                tracing::error!("vCPU {id}: unexpected exit {other:?}");
                return Some(ExitReason::VcpuError);
            }
            Err(e) if e.errno() == libc::EINTR => {
                // Kicked (see vstate::control): clear the flag the signal handler set, so the
                // next KVM_RUN enters the guest again once the gate lets us.
                self.fd.set_kvm_immediate_exit(0);
            }
            Err(e) if e.errno() == libc::EAGAIN => {}
            Err(e) => {
                tracing::error!("vCPU {id}: KVM_RUN failed: {e}");
                return Some(ExitReason::VcpuError);
            }
        }
        None
    }
}
