//! The sandbox a hostile guest would have to escape: per-thread seccomp allow-lists
//! ([`seccomp`]), no privileges ([`privileges`]) and only the file descriptors the VMM was
//! handed or opened before dropping them ([`open_kvm`]).
//!
//! Start-up order (see `vmm::run`): open everything (KVM, images, serial file, API socket)
//! -> drop privileges while single-threaded -> spawn threads, each installing its own filter
//! before doing any work -> the main thread installs its filter -> the vCPUs are released.

pub mod privileges;
pub mod seccomp;

use std::os::fd::{FromRawFd, RawFd};

use kvm_ioctls::Kvm;

pub use privileges::{check_tap_owner, drop_privileges, PrivilegeError};
pub use seccomp::{Filters, SeccompError, ThreadKind};

#[derive(Debug, thiserror::Error)]
pub enum KvmFdError {
    #[error("--kvm-fd {0}: not an open file descriptor")]
    NotOpen(RawFd),
    #[error("--kvm-fd {fd}: not /dev/kvm (KVM_GET_API_VERSION says {version}, expected 12)")]
    NotKvm { fd: RawFd, version: i32 },
    #[error("cannot open /dev/kvm: {0} (is KVM available and are you allowed to use it?)")]
    Open(kvm_ioctls::Error),
}

/// Installs the SIGSYS handler that reports a forbidden syscall. The filters trap
/// (`SECCOMP_RET_TRAP`, as Firecracker's do) instead of killing silently: an operator finds
/// in the VMM's log which syscall of which thread ended it, not just "killed by SIGSYS".
pub fn install_sigsys_reporter() -> std::io::Result<()> {
    // SAFETY: a zeroed sigaction with a valid handler and an empty mask.
    unsafe {
        let mut action: libc::sigaction = std::mem::zeroed();
        action.sa_sigaction = report_sigsys as *const () as usize;
        action.sa_flags = libc::SA_SIGINFO;
        libc::sigemptyset(&mut action.sa_mask);
        if libc::sigaction(libc::SIGSYS, &action, std::ptr::null_mut()) != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Writes `n` in decimal at the end of `buf`; returns where it starts.
fn decimal(mut n: u64, buf: &mut [u8; 20]) -> usize {
    let mut at = buf.len();
    loop {
        at -= 1;
        buf[at] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 || at == 0 {
            return at;
        }
    }
}

/// The SIGSYS handler: only write and gettid (allowed to every thread, async-signal-safe),
/// then the end the kill action would have been: one more forbidden call from inside the
/// handler, while SIGSYS is blocked, makes the kernel force its default action, so the
/// process dies by SIGSYS as before.
extern "C" fn report_sigsys(_: libc::c_int, info: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo; for SIGSYS its union holds `_sigsys`:
    // `void *_call_addr` at byte 16, `int _syscall` at byte 24 (x86_64).
    let nr = unsafe { info.cast::<u8>().add(24).cast::<i32>().read_unaligned() };
    // SAFETY: gettid has no arguments.
    let tid = unsafe { libc::syscall(libc::SYS_gettid) };
    let mut line = [0u8; 160];
    let mut len = 0;
    let mut put = |bytes: &[u8]| {
        let n = bytes.len().min(line.len() - len);
        line[len..len + n].copy_from_slice(&bytes[..n]);
        len += n;
    };
    let mut digits = [0u8; 20];
    put(b"thvc-vmm: seccomp: thread ");
    let at = decimal(tid.max(0) as u64, &mut digits);
    put(&digits[at..]);
    put(b" made the forbidden syscall ");
    let at = decimal(u64::from(nr.max(0) as u32), &mut digits);
    put(&digits[at..]);
    put(b" (see `ausyscall`); the VMM ends by SIGSYS\n");
    // SAFETY: write of our own stack buffer to stderr.
    unsafe { libc::write(2, line.as_ptr().cast(), len) };
    // SAFETY: getppid has no arguments and is on no allow-list: the filter traps it with
    // SIGSYS blocked, which the kernel turns into the default action.
    unsafe { libc::syscall(libc::SYS_getppid) };
    // Only reached without a filter (a test calling the handler): end the same way.
    // SAFETY: resetting SIGSYS to its default and raising it ends the process.
    unsafe {
        libc::signal(libc::SIGSYS, libc::SIG_DFL);
        libc::raise(libc::SIGSYS);
    }
}

/// The stable KVM API version every KVM since Linux 2.6.22 reports.
const KVM_API_VERSION: i32 = 12;

/// /dev/kvm: the inherited descriptor `fd` if given (checked to really be KVM, and made
/// close-on-exec), else a fresh open of /dev/kvm.
pub fn open_kvm(fd: Option<RawFd>) -> Result<Kvm, KvmFdError> {
    let Some(fd) = fd else {
        return Kvm::new().map_err(KvmFdError::Open);
    };
    // SAFETY: F_GETFD/F_SETFD only read/set the descriptor flags of `fd`.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFD) };
    if flags < 0 {
        return Err(KvmFdError::NotOpen(fd));
    }
    // SAFETY: as above. Failure only means it may leak into a child we never start.
    unsafe { libc::fcntl(fd, libc::F_SETFD, flags | libc::FD_CLOEXEC) };
    // SAFETY: KVM_GET_API_VERSION (_IO(0xAE, 0)) takes no argument and on any other kind of
    // file fails with ENOTTY/EINVAL instead of doing something.
    let version = unsafe { libc::ioctl(fd, 0xae00) };
    if version != KVM_API_VERSION {
        return Err(KvmFdError::NotKvm { fd, version });
    }
    // SAFETY: `fd` is an open /dev/kvm descriptor handed to us; from now on we own it.
    Ok(unsafe { Kvm::from_raw_fd(fd) })
}

/// Closes every descriptor from 3 up that the VMM was not explicitly handed (`keep`: the
/// `--kvm-fd` and `--net fd=N` descriptors). A supervisor that forgets O_CLOEXEC on one of its
/// own files (another VM's disk, a socket) must not leak it into a process a hostile guest
/// may take over. Called first thing, before the VMM opens anything of its own.
pub fn close_inherited_fds(keep: &[RawFd]) -> std::io::Result<()> {
    let mut keep: Vec<u32> = keep
        .iter()
        .filter_map(|fd| u32::try_from(*fd).ok())
        .filter(|fd| *fd >= 3)
        .collect();
    keep.sort_unstable();
    keep.dedup();
    let mut first = 3u32;
    for fd in keep.into_iter().chain(std::iter::once(u32::MAX)) {
        if fd > first {
            // SAFETY: close_range only closes descriptors; none of the ones in this range is
            // owned by Rust code (nothing has been opened yet but stdio).
            let r = unsafe { libc::syscall(libc::SYS_close_range, first, fd - 1, 0u32) };
            if r != 0 {
                return Err(std::io::Error::last_os_error());
            }
        }
        first = fd.saturating_add(1);
    }
    Ok(())
}

/// Debug builds only: `THVC_TEST_FORBIDDEN_SYSCALL=<thread kind>` makes that thread open a file
/// once its filter is on, which the filter must punish by killing the process. The tests use
/// it to prove the filters are enforced; release builds have no such hook.
#[cfg(debug_assertions)]
pub fn test_forbidden_syscall(kind: ThreadKind) {
    use std::sync::OnceLock;
    static TRIGGER: OnceLock<Option<String>> = OnceLock::new();
    // Reading the environment makes no syscall, so this is fine after the filter is on.
    let trigger = TRIGGER.get_or_init(|| std::env::var("THVC_TEST_FORBIDDEN_SYSCALL").ok());
    static TGKILL_PID: OnceLock<Option<i32>> = OnceLock::new();
    // THVC_TEST_TGKILL_PID=PID: instead of opening a file, the thread sends the signal it
    // may send to its own threads (the kick, or SIGABRT) to another process.
    let tgkill_pid = TGKILL_PID.get_or_init(|| {
        std::env::var("THVC_TEST_TGKILL_PID")
            .ok()
            .and_then(|pid| pid.parse().ok())
    });
    if trigger.as_deref() != Some(kind.name()) {
        return;
    }
    match tgkill_pid {
        Some(pid) => {
            tracing::warn!("test hook: {} thread signals process {pid}", kind.name());
            let signal = match kind {
                ThreadKind::Api | ThreadKind::Migration => crate::vstate::control::kick_signal(),
                _ => libc::SIGABRT,
            };
            // SAFETY: tgkill with plain integers; the target is a process the test started
            // to be signalled.
            unsafe { libc::syscall(libc::SYS_tgkill, *pid, *pid, signal) };
        }
        None => {
            tracing::warn!("test hook: {} thread opens a file", kind.name());
            let _ = std::fs::File::open("/etc/hostname");
        }
    }
    tracing::error!("test hook: the forbidden syscall was allowed");
}

#[cfg(not(debug_assertions))]
pub fn test_forbidden_syscall(_kind: ThreadKind) {}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

    #[test]
    fn kvm_fd_must_be_open_and_be_kvm() {
        let err = open_kvm(Some(1000)).expect_err("closed fd");
        assert!(
            err.to_string().contains("not an open file descriptor"),
            "{err}"
        );
        let file = std::fs::File::open("/dev/null").expect("/dev/null");
        let err = open_kvm(Some(file.as_raw_fd())).expect_err("not kvm");
        assert!(err.to_string().contains("not /dev/kvm"), "{err}");
    }
}
