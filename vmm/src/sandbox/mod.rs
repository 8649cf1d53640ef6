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

pub use privileges::{drop_privileges, PrivilegeError};
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

/// Debug builds only: `THVC_TEST_FORBIDDEN_SYSCALL=<thread kind>` makes that thread open a file
/// once its filter is on, which the filter must punish by killing the process. The tests use
/// it to prove the filters are enforced; release builds have no such hook.
#[cfg(debug_assertions)]
pub fn test_forbidden_syscall(kind: ThreadKind) {
    use std::sync::OnceLock;
    static TRIGGER: OnceLock<Option<String>> = OnceLock::new();
    // Reading the environment makes no syscall, so this is fine after the filter is on.
    let trigger = TRIGGER.get_or_init(|| std::env::var("THVC_TEST_FORBIDDEN_SYSCALL").ok());
    if trigger.as_deref() == Some(kind.name()) {
        tracing::warn!("test hook: {} thread opens a file", kind.name());
        let _ = std::fs::File::open("/etc/hostname");
        tracing::error!("test hook: the forbidden syscall was allowed");
    }
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
