//! `thvc-nodeagent supervise-vm`: the per-VM supervisor process of the direct runner (the
//! role conmon plays for containers). It is deliberately tiny and synchronous: record own
//! identity, start the VMM, record its identity, wait, record the exit status, exit.
//!
//! Per-VM uids get KVM from their launcher (this one, or `exec-vm` under systemd), not from
//! a group: it opens /dev/kvm while it is still root and hands the VMM that descriptor
//! (`--kvm-fd`, the way Firecracker's jailer prepares a VMM's devices), so the VM's uid
//! holds no supplementary group and cannot open /dev/kvm, or anything else of group kvm, on
//! its own.
//!
//! SIGTERM to the supervisor is forwarded to the VMM (so stopping either stops the VM);
//! SIGHUP and SIGINT are ignored so a closing terminal or Ctrl-C at the agent does not reach
//! VMs.

use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::process::CommandExt;
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};

use thiserror::Error;

use crate::fsutil::{self, FsError};
use crate::layout;
use crate::procinfo::{ProcError, ProcessId};
use crate::runner::ExitRecord;
use crate::vmm_user::RunAs;

#[derive(Debug, Error)]
pub enum SuperviseError {
    #[error(transparent)]
    Fs(#[from] FsError),
    #[error(transparent)]
    Proc(#[from] ProcError),
    #[error("starting {vmm}: {source}")]
    Spawn {
        vmm: String,
        #[source]
        source: std::io::Error,
    },
    #[error("opening {KVM_DEVICE} for the VMM: {0}")]
    Kvm(std::io::Error),
    #[error("waiting for the VMM: {0}")]
    Wait(std::io::Error),
    #[error("encoding a record: {0}")]
    Json(#[from] serde_json::Error),
    #[error("closing the descriptors inherited from the agent: {0}")]
    CloseInherited(std::io::Error),
}

/// The device a launcher opens for a VMM that runs as a per-VM uid.
const KVM_DEVICE: &str = "/dev/kvm";

/// Opens /dev/kvm for a VMM about to run as a per-VM uid (close-on-exec until
/// [`keep_across_exec`]).
fn open_kvm() -> Result<OwnedFd, SuperviseError> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_CLOEXEC)
        .open(KVM_DEVICE)
        .map_err(SuperviseError::Kvm)?;
    Ok(file.into())
}

/// Clears close-on-exec on `fd`, so the VMM exec'd next inherits it. Only fcntl(2): safe
/// between fork and exec.
fn keep_across_exec(fd: RawFd) -> std::io::Result<()> {
    // SAFETY: fcntl on a descriptor this process owns; no memory is passed.
    if unsafe { libc::fcntl(fd, libc::F_SETFD, 0) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

static VMM_PID: AtomicI32 = AtomicI32::new(0);
static TERM_PENDING: AtomicBool = AtomicBool::new(false);

extern "C" fn on_sigterm(_: libc::c_int) {
    let pid = VMM_PID.load(Ordering::SeqCst);
    if pid > 0 {
        // SAFETY: kill is async-signal-safe.
        unsafe { libc::kill(pid, libc::SIGTERM) };
    } else {
        TERM_PENDING.store(true, Ordering::SeqCst);
    }
}

/// Runs the supervisor; returns the process exit code.
pub fn run(
    run_dir: &Path,
    vmm: &Path,
    args: &[String],
    run_as: Option<&RunAs>,
) -> Result<i32, SuperviseError> {
    // Nothing the agent had open belongs to a VM, and not all of it is close-on-exec (a
    // descriptor that came over D-Bus, such as a migration link, is not): kept here, it
    // outlived the agent in the supervisor and the VMM, and held the link open.
    // SAFETY: close_range only closes descriptors; the supervisor has opened nothing but
    // stdio yet, so no Rust object owns any of them.
    if unsafe { libc::syscall(libc::SYS_close_range, 3u32, u32::MAX, 0u32) } != 0 {
        return Err(SuperviseError::CloseInherited(
            std::io::Error::last_os_error(),
        ));
    }
    // SAFETY: installing signal dispositions before any other thread exists.
    unsafe {
        libc::signal(libc::SIGHUP, libc::SIG_IGN);
        libc::signal(libc::SIGINT, libc::SIG_IGN);
        libc::signal(
            libc::SIGTERM,
            on_sigterm as extern "C" fn(libc::c_int) as libc::sighandler_t,
        );
    }
    let me = ProcessId::of(std::process::id() as i32)?;
    fsutil::write_atomic(
        &layout::process_file(run_dir),
        &serde_json::to_vec(&me)?,
        0o644,
    )?;
    let mut cmd = Command::new(vmm);
    cmd.args(args);
    // Held open here until the VMM has its copy (spawn returns after its exec).
    let kvm = run_as.map(|_| open_kvm()).transpose()?;
    let kvm_fd = kvm.as_ref().map(AsRawFd::as_raw_fd);
    if let Some(fd) = kvm_fd {
        cmd.arg("--kvm-fd").arg(fd.to_string());
    }
    let run_as = run_as.cloned();
    // SAFETY: only async-signal-safe calls between fork and exec (signal, fcntl, and the
    // system calls of RunAs::switch on memory allocated before the fork).
    unsafe {
        cmd.pre_exec(move || {
            // Ignored dispositions survive exec; the VMM gets the defaults back.
            libc::signal(libc::SIGHUP, libc::SIG_DFL);
            libc::signal(libc::SIGINT, libc::SIG_DFL);
            if let Some(fd) = kvm_fd {
                keep_across_exec(fd)?;
            }
            if let Some(who) = &run_as {
                who.switch()?;
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn().map_err(|source| SuperviseError::Spawn {
        vmm: vmm.display().to_string(),
        source,
    })?;
    drop(kvm);
    let pid = child.id() as i32;
    VMM_PID.store(pid, Ordering::SeqCst);
    if TERM_PENDING.load(Ordering::SeqCst) {
        // SAFETY: plain kill(2).
        unsafe { libc::kill(pid, libc::SIGTERM) };
    }
    match ProcessId::of(pid) {
        Ok(id) => fsutil::write_atomic(
            &layout::vmm_process_file(run_dir),
            &serde_json::to_vec(&id)?,
            0o644,
        )?,
        Err(e) => tracing::warn!("cannot record the VMM's identity: {e}"),
    }
    let status = loop {
        match child.wait() {
            Ok(s) => break s,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(SuperviseError::Wait(e)),
        }
    };
    VMM_PID.store(0, Ordering::SeqCst);
    let record = ExitRecord {
        code: status.code(),
        signal: status.signal(),
    };
    fsutil::write_atomic(
        &layout::exit_file(run_dir),
        &serde_json::to_vec(&record)?,
        0o644,
    )?;
    let _ = fsutil::remove_durable(&layout::vmm_process_file(run_dir));
    Ok(0)
}

/// `thvc-nodeagent exec-vm`: the ExecStart of `thvc-vm@.service`. Replaces itself with the
/// VMM using the argv the agent wrote to the run directory, so systemd's main PID is the VMM.
pub fn exec_vm(run_dir: &Path) -> Result<std::convert::Infallible, SuperviseError> {
    let path = layout::vmm_args_file(run_dir);
    let data = std::fs::read(&path).map_err(|e| FsError::io("read", &path, e))?;
    let argv: VmmArgv = serde_json::from_slice(&data)?;
    // SAFETY: geteuid cannot fail.
    if argv.run_as.is_none() && unsafe { libc::geteuid() } == 0 {
        return Err(SuperviseError::Spawn {
            vmm: argv.vmm,
            source: std::io::Error::new(
                std::io::ErrorKind::PermissionDenied,
                "refusing to run a VMM as root: vmm-args.json names no user (the agent needs --vmm-uids)",
            ),
        });
    }
    let mut cmd = Command::new(&argv.vmm);
    cmd.args(&argv.args);
    // Open until exec; the VMM owns it from then on.
    let mut _kvm = None;
    if let Some(who) = &argv.run_as {
        // The unit runs this as root (with CAP_SETUID and CAP_SETGID only; /dev/kvm is
        // root's, mode 0660): open KVM for the VMM, then become the VM's own user, which
        // drops both capabilities, before the VMM runs.
        let kvm = open_kvm()?;
        keep_across_exec(kvm.as_raw_fd()).map_err(SuperviseError::Kvm)?;
        cmd.arg("--kvm-fd").arg(kvm.as_raw_fd().to_string());
        _kvm = Some(kvm);
        who.switch().map_err(|source| SuperviseError::Spawn {
            vmm: format!("{} (switching to {})", argv.vmm, who.to_arg()),
            source,
        })?;
    }
    let err = cmd.exec();
    Err(SuperviseError::Spawn {
        vmm: argv.vmm,
        source: err,
    })
}

/// The argv file of `exec-vm`.
#[derive(Debug, serde::Serialize, serde::Deserialize)]
pub struct VmmArgv {
    pub vmm: String,
    pub args: Vec<String>,
    /// Per-VM uids: who the VMM runs as (absent: the unit's user).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub run_as: Option<RunAs>,
}
