//! `thvc-nodeagent supervise-vm`: the per-VM supervisor process of the direct runner (the
//! role conmon plays for containers). It is deliberately tiny and synchronous: record own
//! identity, start the VMM, record its identity, wait, record the exit status, exit.
//!
//! SIGTERM to the supervisor is forwarded to the VMM (so stopping either stops the VM);
//! SIGHUP and SIGINT are ignored so a closing terminal or Ctrl-C at the agent does not reach
//! VMs.

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
    #[error("waiting for the VMM: {0}")]
    Wait(std::io::Error),
    #[error("encoding a record: {0}")]
    Json(#[from] serde_json::Error),
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
    let run_as = run_as.cloned();
    // SAFETY: only async-signal-safe calls between fork and exec (signal, and the system
    // calls of RunAs::switch on memory allocated before the fork).
    unsafe {
        cmd.pre_exec(move || {
            // Ignored dispositions survive exec; the VMM gets the defaults back.
            libc::signal(libc::SIGHUP, libc::SIG_DFL);
            libc::signal(libc::SIGINT, libc::SIG_DFL);
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
    if let Some(who) = &argv.run_as {
        // The unit runs this as root (with CAP_SETUID and CAP_SETGID only): become the
        // VM's own user, which drops both, before the VMM runs.
        who.switch().map_err(|source| SuperviseError::Spawn {
            vmm: format!("{} (switching to {})", argv.vmm, who.to_arg()),
            source,
        })?;
    }
    let err = Command::new(&argv.vmm).args(&argv.args).exec();
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
