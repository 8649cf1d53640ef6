//! Per-thread seccomp-bpf allow-lists, built in memory at start-up (no JSON at run time).
//!
//! Every thread kind gets exactly the syscalls its run-time work needs; anything else kills the
//! whole process (SIGSYS). Set-up (opening files, creating the VM, spawning threads) happens
//! before the filters go on, so none of open/socket/clone/execve/... is on any list.
//!
//! * [`ThreadKind::Main`]: the event loop (signals, terminal input, exit).
//! * [`ThreadKind::Api`]: the control socket.
//! * [`ThreadKind::Vcpu`]: KVM_RUN and the port-I/O/MMIO device emulation it calls into.
//! * [`ThreadKind::DeviceWorker`]: virtio device threads (block I/O, TAP, entropy, rate
//!   limit timers).
//! * [`ThreadKind::Migration`]: an outgoing live migration (the dirty log, the stream).
//!
//! To extend a list, add to the `*_syscalls` function of that kind: the base list every Rust
//! thread needs is in [`base_syscalls`].

use std::collections::BTreeMap;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

use crate::config::{SeccompMode, Transport};

#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    #[error("cannot build the seccomp filter for {kind:?} threads: {source}")]
    Build {
        kind: ThreadKind,
        source: seccompiler::BackendError,
    },
    #[error("cannot compile the seccomp filter for {kind:?} threads: {source}")]
    Compile {
        kind: ThreadKind,
        source: seccompiler::BackendError,
    },
    #[error("cannot install the seccomp filter of this {kind:?} thread: {source}")]
    Apply {
        kind: ThreadKind,
        source: seccompiler::Error,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum ThreadKind {
    Main,
    Api,
    Vcpu,
    DeviceWorker,
    Migration,
}

impl ThreadKind {
    pub const ALL: [ThreadKind; 5] = [
        ThreadKind::Main,
        ThreadKind::Api,
        ThreadKind::Vcpu,
        ThreadKind::DeviceWorker,
        ThreadKind::Migration,
    ];

    pub fn name(self) -> &'static str {
        match self {
            ThreadKind::Main => "main",
            ThreadKind::Api => "api",
            ThreadKind::Vcpu => "vcpu",
            ThreadKind::DeviceWorker => "device-worker",
            ThreadKind::Migration => "migration",
        }
    }
}

/// `_IO(KVMIO, 0x80)`.
pub const KVM_RUN: u64 = 0xae80;
const TCGETS: u64 = 0x5401;
/// `_IOW('T', 208, unsigned int)`: the TAP offloads, set when the guest driver activates
/// virtio-net.
const TUNSETOFFLOAD: u64 = 0x4004_54d0;
const TCSETS: u64 = 0x5402;
/// `_IOW(KVMIO, 0x6a, struct kvm_irq_routing)`: MSI-X vectors the guest programs.
pub const KVM_SET_GSI_ROUTING: u64 = 0x4008_ae6a;
/// `_IOW(KVMIO, 0x79, struct kvm_ioeventfd)`: queue notifications following a moved BAR.
pub const KVM_IOEVENTFD: u64 = 0x4040_ae79;

/// The ioctls that read a vCPU's and the VM's state for a snapshot (`vstate::state`): the
/// numbers kvm-ioctls uses, made with the same vmm-sys-util macros.
mod snapshot_ioctls {
    #![allow(non_snake_case)]
    use kvm_bindings::{
        kvm_clock_data, kvm_cpuid2, kvm_debugregs, kvm_irqchip, kvm_lapic_state, kvm_mp_state,
        kvm_msrs, kvm_pit_state2, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave, KVMIO,
    };
    use kvm_bindings::{kvm_dirty_log, kvm_userspace_memory_region};
    use vmm_sys_util::{ioctl_io_nr, ioctl_ior_nr, ioctl_iow_nr, ioctl_iowr_nr};

    ioctl_ior_nr!(KVM_GET_REGS, KVMIO, 0x81, kvm_regs);
    ioctl_ior_nr!(KVM_GET_SREGS, KVMIO, 0x83, kvm_sregs);
    ioctl_iowr_nr!(KVM_GET_MSRS, KVMIO, 0x88, kvm_msrs);
    ioctl_ior_nr!(KVM_GET_LAPIC, KVMIO, 0x8e, kvm_lapic_state);
    ioctl_iowr_nr!(KVM_GET_CPUID2, KVMIO, 0x91, kvm_cpuid2);
    ioctl_ior_nr!(KVM_GET_MP_STATE, KVMIO, 0x98, kvm_mp_state);
    ioctl_ior_nr!(KVM_GET_VCPU_EVENTS, KVMIO, 0x9f, kvm_vcpu_events);
    ioctl_ior_nr!(KVM_GET_DEBUGREGS, KVMIO, 0xa1, kvm_debugregs);
    ioctl_io_nr!(KVM_GET_TSC_KHZ, KVMIO, 0xa3);
    ioctl_ior_nr!(KVM_GET_XSAVE, KVMIO, 0xa4, kvm_xsave);
    ioctl_ior_nr!(KVM_GET_XCRS, KVMIO, 0xa6, kvm_xcrs);
    ioctl_iowr_nr!(KVM_GET_IRQCHIP, KVMIO, 0x62, kvm_irqchip);
    ioctl_ior_nr!(KVM_GET_CLOCK, KVMIO, 0x7c, kvm_clock_data);
    ioctl_ior_nr!(KVM_GET_PIT2, KVMIO, 0x9f, kvm_pit_state2);
    ioctl_iow_nr!(
        KVM_SET_USER_MEMORY_REGION,
        KVMIO,
        0x46,
        kvm_userspace_memory_region
    );
    ioctl_iow_nr!(KVM_GET_DIRTY_LOG, KVMIO, 0x42, kvm_dirty_log);

    /// What a vCPU thread reads of its own vCPU.
    pub fn vcpu() -> Vec<u64> {
        [
            KVM_GET_REGS(),
            KVM_GET_SREGS(),
            KVM_GET_MSRS(),
            KVM_GET_LAPIC(),
            KVM_GET_CPUID2(),
            KVM_GET_MP_STATE(),
            KVM_GET_VCPU_EVENTS(),
            KVM_GET_DEBUGREGS(),
            KVM_GET_TSC_KHZ(),
            KVM_GET_XSAVE(),
            KVM_GET_XCRS(),
        ]
        .map(u64::from)
        .to_vec()
    }

    /// What a snapshot reads of the VM (the API thread's, or a migration's last step).
    pub fn vm() -> Vec<u64> {
        [KVM_GET_IRQCHIP(), KVM_GET_CLOCK(), KVM_GET_PIT2()]
            .map(u64::from)
            .to_vec()
    }

    /// What a live migration reads of the VM besides: the dirty log (and, with manual
    /// protection, its clearing), and the memory slots' logging flag (the slots themselves
    /// stay as they are).
    pub fn migration() -> Vec<u64> {
        vm().into_iter()
            .chain(
                [
                    KVM_SET_USER_MEMORY_REGION(),
                    KVM_GET_DIRTY_LOG(),
                    crate::persist::migration::KVM_CLEAR_DIRTY_LOG(),
                ]
                .map(u64::from),
            )
            .collect()
    }
}

/// A syscall and the argument conditions under which it is allowed (any of the rules; an
/// empty list: always). Every argument compared is a C `int` (or `unsigned int` for the ioctl
/// request), so only its low 32 bits count.
type Allowed = (i64, Vec<SeccompRule>);

fn always(syscall: libc::c_long) -> Allowed {
    (syscall, Vec::new())
}

/// Allowed when argument `index` equals one of `values`.
fn when_arg_is(syscall: libc::c_long, index: u8, values: &[u64]) -> Allowed {
    let rules = values
        .iter()
        .filter_map(|v| {
            SeccompCondition::new(index, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, *v)
                .and_then(|c| SeccompRule::new(vec![c]))
                .ok()
        })
        .collect();
    (syscall, rules)
}

/// tgkill(tgid, tid, sig) with one of `signals`, only to a thread of this process: the
/// thread group id (argument 0) must be our own pid, read when the filter is built (the VMM
/// never forks after that). Without that check a compromised thread could signal any process
/// of the VMM's user, e.g. another VM's VMM when the users are shared.
fn tgkill_own_threads(signals: &[u64]) -> Allowed {
    let own = u64::from(std::process::id());
    let rules = signals
        .iter()
        .filter_map(|sig| {
            let tgid = SeccompCondition::new(0, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, own);
            let signal = SeccompCondition::new(2, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, *sig);
            tgid.and_then(|t| signal.map(|s| vec![t, s]))
                .and_then(SeccompRule::new)
                .ok()
        })
        .collect();
    (libc::SYS_tgkill, rules)
}

/// Allowed when argument `index` has none of the bits in `mask` set.
fn when_bits_clear(syscall: libc::c_long, index: u8, mask: u64) -> Allowed {
    let rules = SeccompCondition::new(
        index,
        SeccompCmpArgLen::Dword,
        SeccompCmpOp::MaskedEq(mask),
        0,
    )
    .and_then(|c| SeccompRule::new(vec![c]))
    .map(|r| vec![r])
    .unwrap_or_default();
    (syscall, rules)
}

/// What any thread of this process needs at run time: memory (never executable), locks,
/// logging to stderr, signal return, thread exit, time, and abort() on an internal error.
fn base_syscalls() -> Vec<Allowed> {
    let no_exec = libc::PROT_EXEC as u64;
    vec![
        always(libc::SYS_brk),
        when_bits_clear(libc::SYS_mmap, 2, no_exec),
        when_bits_clear(libc::SYS_mprotect, 2, no_exec),
        always(libc::SYS_munmap),
        always(libc::SYS_mremap),
        always(libc::SYS_madvise),
        always(libc::SYS_futex),
        always(libc::SYS_sched_yield),
        always(libc::SYS_write),
        always(libc::SYS_close),
        // std checks a descriptor is open before closing it (OwnedFd's drop).
        when_arg_is(libc::SYS_fcntl, 1, &[libc::F_GETFD as u64]),
        always(libc::SYS_getrandom),
        always(libc::SYS_clock_gettime),
        always(libc::SYS_rt_sigreturn),
        always(libc::SYS_rt_sigprocmask),
        always(libc::SYS_restart_syscall),
        always(libc::SYS_sigaltstack),
        always(libc::SYS_exit),
        always(libc::SYS_exit_group),
        // abort() after a panic: getpid + tgkill(SIGABRT), so the crash is reported as such.
        always(libc::SYS_getpid),
        always(libc::SYS_gettid),
        tgkill_own_threads(&[libc::SIGABRT as u64]),
    ]
}

fn main_syscalls() -> Vec<Allowed> {
    vec![
        always(libc::SYS_epoll_wait),
        always(libc::SYS_epoll_pwait),
        always(libc::SYS_epoll_ctl),
        always(libc::SYS_read),
        // Restoring the host terminal on exit.
        when_arg_is(libc::SYS_ioctl, 1, &[TCGETS, TCSETS]),
    ]
}

fn api_syscalls() -> Vec<Allowed> {
    let kick = crate::vstate::control::kick_signal() as u64;
    vec![
        always(libc::SYS_epoll_wait),
        always(libc::SYS_epoll_pwait),
        always(libc::SYS_epoll_ctl),
        always(libc::SYS_accept4),
        always(libc::SYS_read),
        always(libc::SYS_recvfrom),
        always(libc::SYS_sendto),
        always(libc::SYS_shutdown),
        // Kicking vCPU threads out of KVM_RUN to pause them (pthread_kill).
        tgkill_own_threads(&[kick]),
        // Snapshots: the two files come with the request (SCM_RIGHTS), already open; the
        // interrupt controllers and clocks are read from the VM.
        always(libc::SYS_recvmsg),
        always(libc::SYS_pwrite64),
        always(libc::SYS_ftruncate),
        always(libc::SYS_fsync),
        when_arg_is(libc::SYS_ioctl, 1, &snapshot_ioctls::vm()),
    ]
}

/// The migration thread: the stream to the target (sent with `migrate`, already connected:
/// reads, writes, its timeouts), the dirty log, the VM's state for the last step, and kicking
/// the vCPUs out of KVM_RUN to pause them.
fn migration_syscalls() -> Vec<Allowed> {
    let kick = crate::vstate::control::kick_signal() as u64;
    vec![
        always(libc::SYS_read),
        socket_timeouts(),
        when_arg_is(libc::SYS_ioctl, 1, &snapshot_ioctls::migration()),
        tgkill_own_threads(&[kick]),
    ]
}

/// setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO or SO_SNDTIMEO, ...) only.
fn socket_timeouts() -> Allowed {
    let rules = [libc::SO_RCVTIMEO, libc::SO_SNDTIMEO]
        .iter()
        .filter_map(|opt| {
            let level = SeccompCondition::new(
                1,
                SeccompCmpArgLen::Dword,
                SeccompCmpOp::Eq,
                libc::SOL_SOCKET as u64,
            );
            let name =
                SeccompCondition::new(2, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, *opt as u64);
            level
                .and_then(|l| name.map(|n| vec![l, n]))
                .and_then(SeccompRule::new)
                .ok()
        })
        .collect();
    (libc::SYS_setsockopt, rules)
}

fn vcpu_syscalls(transport: Transport) -> Vec<Allowed> {
    let ioctls: &[u64] = match transport {
        // KVM_RUN is the only ioctl a running vCPU makes; the rest of its state was set up
        // before the filter went on.
        Transport::Mmio => &[KVM_RUN],
        // On PCI, the guest's configuration writes change VM state while it runs: MSI-X
        // routes when it programs a vector, ioeventfd addresses when it moves a BAR. They are
        // served on the vCPU thread that made the write, as in Cloud Hypervisor.
        Transport::Pci => &[KVM_RUN, KVM_SET_GSI_ROUTING, KVM_IOEVENTFD],
    };
    // A snapshot: each vCPU thread reads its own state (KVM_RUN with immediate_exit first).
    let ioctls: Vec<u64> = ioctls
        .iter()
        .copied()
        .chain(snapshot_ioctls::vcpu())
        .collect();
    vec![
        when_arg_is(libc::SYS_ioctl, 1, &ioctls),
        // Device emulation: eventfds (irqfd, queue notifications) and the console.
        always(libc::SYS_read),
        always(libc::SYS_writev),
    ]
}

/// Virtio device worker threads: disk I/O on image files, TAP reads/writes, eventfds, entropy.
fn device_worker_syscalls() -> Vec<Allowed> {
    vec![
        always(libc::SYS_epoll_wait),
        always(libc::SYS_epoll_pwait),
        always(libc::SYS_epoll_ctl),
        always(libc::SYS_read),
        always(libc::SYS_readv),
        always(libc::SYS_writev),
        always(libc::SYS_pread64),
        always(libc::SYS_pwrite64),
        always(libc::SYS_preadv),
        always(libc::SYS_pwritev),
        always(libc::SYS_preadv2),
        always(libc::SYS_pwritev2),
        always(libc::SYS_lseek),
        always(libc::SYS_fsync),
        always(libc::SYS_fdatasync),
        always(libc::SYS_fallocate),
        when_arg_is(libc::SYS_ioctl, 1, &[TUNSETOFFLOAD]),
        // Rate limits: arming the timer that wakes a throttled device (read clears it).
        always(libc::SYS_timerfd_settime),
    ]
}

/// The allow-list of a thread kind: the base list plus its own, merged per syscall.
pub fn allowed_syscalls(kind: ThreadKind, transport: Transport) -> BTreeMap<i64, Vec<SeccompRule>> {
    let own = match kind {
        ThreadKind::Main => main_syscalls(),
        ThreadKind::Api => api_syscalls(),
        ThreadKind::Vcpu => vcpu_syscalls(transport),
        ThreadKind::DeviceWorker => device_worker_syscalls(),
        ThreadKind::Migration => migration_syscalls(),
    };
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    for (syscall, conditions) in base_syscalls().into_iter().chain(own) {
        match rules.get_mut(&syscall) {
            // Already allowed unconditionally, or now becomes so.
            Some(existing) if existing.is_empty() => {}
            Some(existing) if conditions.is_empty() => existing.clear(),
            Some(existing) => existing.extend(conditions),
            None => {
                rules.insert(syscall, conditions);
            }
        }
    }
    rules
}

/// Compiles the filter of a thread kind; None when seccomp is off.
pub fn filter(
    kind: ThreadKind,
    mode: SeccompMode,
    transport: Transport,
) -> Result<Option<BpfProgram>, SeccompError> {
    let mismatch = match mode {
        SeccompMode::Off => return Ok(None),
        // SIGSYS to the thread, whose handler (`sandbox::install_sigsys_reporter`) reports
        // the syscall and ends the process by SIGSYS.
        SeccompMode::On => SeccompAction::Trap,
        SeccompMode::Log => SeccompAction::Log,
    };
    let filter = SeccompFilter::new(
        allowed_syscalls(kind, transport),
        mismatch,
        SeccompAction::Allow,
        TargetArch::x86_64,
    )
    .map_err(|source| SeccompError::Build { kind, source })?;
    let program: BpfProgram = filter
        .try_into()
        .map_err(|source| SeccompError::Compile { kind, source })?;
    Ok(Some(program))
}

/// Installs a filter on the calling thread (and sets no_new_privs, which seccomp requires).
pub fn apply(kind: ThreadKind, program: Option<&BpfProgram>) -> Result<(), SeccompError> {
    match program {
        Some(p) => {
            seccompiler::apply_filter(p).map_err(|source| SeccompError::Apply { kind, source })
        }
        None => Ok(()),
    }
}

/// All filters, compiled once at start-up and handed to the threads that install them.
#[derive(Debug, Clone, Default)]
pub struct Filters {
    pub main: Option<BpfProgram>,
    pub api: Option<BpfProgram>,
    pub vcpu: Option<BpfProgram>,
    pub device_worker: Option<BpfProgram>,
    pub migration: Option<BpfProgram>,
}

impl Filters {
    pub fn build(mode: SeccompMode, transport: Transport) -> Result<Filters, SeccompError> {
        Ok(Filters {
            main: filter(ThreadKind::Main, mode, transport)?,
            api: filter(ThreadKind::Api, mode, transport)?,
            vcpu: filter(ThreadKind::Vcpu, mode, transport)?,
            device_worker: filter(ThreadKind::DeviceWorker, mode, transport)?,
            migration: filter(ThreadKind::Migration, mode, transport)?,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_compiles_and_off_means_no_filter() {
        for kind in ThreadKind::ALL {
            let program = filter(kind, SeccompMode::On, Transport::Pci).expect("compiles");
            assert!(program.is_some_and(|p| !p.is_empty()), "{kind:?}");
            assert!(filter(kind, SeccompMode::Log, Transport::Mmio)
                .expect("compiles")
                .is_some());
            assert!(filter(kind, SeccompMode::Off, Transport::Mmio)
                .expect("off")
                .is_none());
        }
    }

    #[test]
    fn nothing_that_opens_or_spawns_is_allowed_anywhere() {
        for (kind, transport) in ThreadKind::ALL
            .into_iter()
            .flat_map(|k| [(k, Transport::Mmio), (k, Transport::Pci)])
        {
            let allowed = allowed_syscalls(kind, transport);
            for forbidden in [
                libc::SYS_open,
                libc::SYS_openat,
                libc::SYS_execve,
                libc::SYS_execveat,
                libc::SYS_clone,
                libc::SYS_clone3,
                libc::SYS_fork,
                libc::SYS_socket,
                libc::SYS_connect,
                libc::SYS_ptrace,
                libc::SYS_setuid,
                libc::SYS_unlink,
                libc::SYS_unlinkat,
                libc::SYS_mount,
                libc::SYS_kill,
            ] {
                assert!(
                    !allowed.contains_key(&forbidden),
                    "{kind:?} allows syscall {forbidden}"
                );
            }
        }
    }

    #[test]
    fn only_vcpus_may_run_kvm_and_only_api_may_accept() {
        let ioctl_rules = |kind| {
            allowed_syscalls(kind, Transport::Mmio)
                .get(&libc::SYS_ioctl)
                .map(Vec::len)
        };
        assert_eq!(
            ioctl_rules(ThreadKind::Vcpu),
            Some(12),
            "KVM_RUN and the 11 reads of a snapshot"
        );
        let pci = allowed_syscalls(ThreadKind::Vcpu, Transport::Pci);
        assert_eq!(
            pci.get(&libc::SYS_ioctl).map(Vec::len),
            Some(14),
            "and MSI routes and notification addresses on PCI"
        );
        assert_eq!(ioctl_rules(ThreadKind::Main), Some(2), "TCGETS, TCSETS");
        assert_eq!(
            ioctl_rules(ThreadKind::Api),
            Some(3),
            "the VM's interrupt controllers, kvmclock and PIT, for snapshots"
        );
        assert_eq!(
            ioctl_rules(ThreadKind::Migration),
            Some(6),
            "those, and the dirty log, its clearing and its flag"
        );
        for kind in ThreadKind::ALL {
            assert_eq!(
                allowed_syscalls(kind, Transport::Pci).contains_key(&libc::SYS_setsockopt),
                kind == ThreadKind::Migration,
                "only the migration sets its stream's timeouts: {kind:?}"
            );
        }
        assert_eq!(
            ioctl_rules(ThreadKind::DeviceWorker),
            Some(1),
            "TUNSETOFFLOAD"
        );
        for kind in ThreadKind::ALL {
            assert_eq!(
                allowed_syscalls(kind, Transport::Pci).contains_key(&libc::SYS_accept4),
                kind == ThreadKind::Api
            );
        }
    }

    #[test]
    fn only_device_workers_arm_rate_limit_timers() {
        for kind in ThreadKind::ALL {
            assert_eq!(
                allowed_syscalls(kind, Transport::Mmio).contains_key(&libc::SYS_timerfd_settime),
                kind == ThreadKind::DeviceWorker,
                "{kind:?}"
            );
        }
    }

    #[test]
    fn kvm_run_number_matches_the_kvm_headers() {
        // _IO(type, nr) = type << 8 | nr, with KVMIO = 0xAE.
        assert_eq!(KVM_RUN, (0xae << 8) | 0x80);
        // _IOW(type, nr, size) = 1 << 30 | size << 16 | type << 8 | nr.
        let iow = |nr: u64, size: usize| 1 << 30 | (size as u64) << 16 | 0xae << 8 | nr;
        assert_eq!(
            KVM_SET_GSI_ROUTING,
            iow(0x6a, std::mem::size_of::<kvm_bindings::kvm_irq_routing>())
        );
        assert_eq!(
            KVM_IOEVENTFD,
            iow(0x79, std::mem::size_of::<kvm_bindings::kvm_ioeventfd>())
        );
        // _IOR(type, nr, size) = 2 << 30 | ...
        let ior = |nr: u64, size: usize| 2 << 30 | (size as u64) << 16 | 0xae << 8 | nr;
        assert_eq!(
            snapshot_ioctls::vcpu()[0],
            ior(0x81, std::mem::size_of::<kvm_bindings::kvm_regs>()),
            "KVM_GET_REGS"
        );
        assert_eq!(snapshot_ioctls::vcpu()[8], 0xaea3, "KVM_GET_TSC_KHZ");
        assert_eq!(
            snapshot_ioctls::vm()[1],
            ior(0x7c, std::mem::size_of::<kvm_bindings::kvm_clock_data>()),
            "KVM_GET_CLOCK"
        );
        // The one the VMM defines itself, as <linux/kvm.h> has it.
        assert_eq!(
            crate::persist::migration::KVM_CLEAR_DIRTY_LOG(),
            0xc018_aec0,
            "KVM_CLEAR_DIRTY_LOG"
        );
        assert!(snapshot_ioctls::migration().contains(&0xc018_aec0));
    }

    #[test]
    fn conditional_and_unconditional_rules_merge_to_unconditional() {
        // tgkill: SIGABRT in the base list, the kick signal for the API thread.
        let api = allowed_syscalls(ThreadKind::Api, Transport::Mmio);
        assert_eq!(api.get(&libc::SYS_tgkill).map(Vec::len), Some(2));
        let main = allowed_syscalls(ThreadKind::Main, Transport::Mmio);
        assert_eq!(main.get(&libc::SYS_tgkill).map(Vec::len), Some(1));
        assert_eq!(main.get(&libc::SYS_read).map(Vec::len), Some(0), "always");
    }
}
