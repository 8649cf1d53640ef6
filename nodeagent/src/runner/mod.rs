//! Running VMM processes: one `thvc-vmm` per running VM, behind the [`VmRunner`] trait.
//!
//! * [`direct::DirectRunner`] (development, tests, hosts without systemd as PID 1): the agent
//!   starts a small supervisor (`thvc-nodeagent supervise-vm`) in its own session, which
//!   starts the VMM, records its pid and start time, waits for it and records its exit
//!   status. Neither survives on the agent: both outlive an agent crash or restart, and the
//!   recorded exit status tells a restarted agent what happened meanwhile.
//! * [`systemd::SystemdRunner`] (production): each VM is the unit `thvc-vm@NAME.service`,
//!   started and stopped through `org.freedesktop.systemd1`; systemd is the supervisor.
//!
//! Runners are stateless: everything they need to find a VM's process again lives in the run
//! directory or in systemd, so a restarted agent adopts what is running.

pub mod direct;
pub mod supervise;
pub mod systemd;

use std::path::PathBuf;

use futures_util::future::BoxFuture;
use serde::{Deserialize, Serialize};
use thiserror::Error;

#[derive(Debug, Error)]
pub enum RunnerError {
    #[error("starting the VMM for {vm}: {reason}")]
    Launch { vm: String, reason: String },
    #[error("VM {vm}: {reason}")]
    Control { vm: String, reason: String },
    #[error("systemd: {0}")]
    Systemd(String),
}

/// What one run of the VMM needs.
#[derive(Debug, Clone)]
pub struct LaunchSpec {
    pub name: String,
    pub vmm: PathBuf,
    pub args: Vec<String>,
    /// Per-VM uids: the launcher (supervisor or `exec-vm`) becomes this user before it
    /// execs the VMM, so the VMM opens everything as its VM's user.
    pub run_as: Option<crate::vmm_user::RunAs>,
}

/// How a VMM process ended, as recorded by its supervisor.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExitRecord {
    #[serde(default)]
    pub code: Option<i32>,
    #[serde(default)]
    pub signal: Option<i32>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExitOutcome {
    /// Exit code of the VMM: 0 powered off / SIGTERM, 1 error, 2 usage, 3 reboot.
    Exited(i32),
    /// The VMM was killed by this signal.
    Signaled(i32),
    /// The exit status could not be determined (reason says why).
    Unknown(String),
}

impl From<ExitRecord> for ExitOutcome {
    fn from(r: ExitRecord) -> Self {
        match (r.code, r.signal) {
            (Some(c), _) => ExitOutcome::Exited(c),
            (None, Some(s)) => ExitOutcome::Signaled(s),
            (None, None) => ExitOutcome::Unknown("exit record is empty".to_owned()),
        }
    }
}

/// Resolves once the VMM process has ended.
pub type ExitFuture = BoxFuture<'static, ExitOutcome>;

pub enum Adoption {
    /// The VMM is still running; the future resolves when it ends.
    Running(ExitFuture),
    /// It ended while no agent was watching.
    Exited(ExitOutcome),
    /// No trace of a run in this boot.
    NotRunning,
}

pub trait VmRunner: Send + Sync {
    /// Short name for logs and the README ("direct", "systemd").
    fn kind(&self) -> &'static str;
    /// Where an operator finds the VMM's own output (its errors) for VM `name`.
    fn vmm_log_location(&self, name: &str) -> String;
    /// Starts the VMM; returns once the process exists.
    fn launch<'a>(&'a self, spec: &'a LaunchSpec)
        -> BoxFuture<'a, Result<ExitFuture, RunnerError>>;
    /// Finds a VMM started by an earlier agent.
    fn adopt<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<Adoption, RunnerError>>;
    /// Asks the VMM to stop (SIGTERM: the VMM exits 0).
    fn terminate<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<(), RunnerError>>;
    /// Kills the VMM (SIGKILL) when it did not stop in time.
    fn kill<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<(), RunnerError>>;
    /// Forgets a VM that is being deleted.
    fn forget<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<(), RunnerError>>;
    /// What the VMM of `name` has used so far, for the metrics; `None` if it does not run.
    fn usage<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<Option<VmmUsage>, RunnerError>>;
}

/// What a VMM has used, as its runner can tell ([`VmRunner::usage`]). Each runner knows
/// the VMM its own way: the direct runner has its pid record and reads /proc (VmRSS); the
/// systemd runner asks systemd about the unit's cgroup, since the agent's `ProtectProc=`
/// hides the VMMs' /proc entries (they run as other uids) and a cgroup counts the whole
/// unit.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct VmmUsage {
    /// User and system CPU time.
    pub cpu_seconds: Option<f64>,
    /// Resident memory of the VMM process (direct runner).
    pub rss_bytes: Option<u64>,
    /// Memory charged to the VM's unit cgroup, page cache included (systemd runner).
    pub cgroup_memory_bytes: Option<u64>,
}

/// Removes a deleted VM's run directory ([`VmRunner::forget`]) on tokio's blocking threads,
/// not on those that answer the bus.
async fn remove_run_dir(vm: &str, dir: PathBuf) -> Result<(), RunnerError> {
    let shown = dir.display().to_string();
    let removed = tokio::task::spawn_blocking(move || match std::fs::remove_dir_all(&dir) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e.to_string()),
        _ => Ok(()),
    })
    .await
    .unwrap_or_else(|e| Err(format!("the removal did not complete: {e}")));
    removed.map_err(|e| RunnerError::Control {
        vm: vm.to_owned(),
        reason: format!("removing {shown}: {e}"),
    })
}

/// thvc-vmm's exit status for a migration target (`--incoming`) that ended before its guest
/// ran: the guest is still on its source (vmm/README.md, "Exit status").
pub const VMM_EXIT_NOT_ARRIVED: i32 = 5;

/// A human-readable meaning of a VMM exit, for `failed` reasons.
pub fn describe_exit(outcome: &ExitOutcome) -> String {
    match outcome {
        ExitOutcome::Exited(0) => "the guest powered off".to_owned(),
        ExitOutcome::Exited(1) => "the VMM exited with status 1 (error)".to_owned(),
        ExitOutcome::Exited(2) => {
            "the VMM exited with status 2 (invalid usage or configuration)".to_owned()
        }
        ExitOutcome::Exited(3) => "the guest rebooted (VMM exit status 3)".to_owned(),
        ExitOutcome::Exited(4) => {
            "the guest crashed its vCPU (VMM exit status 4: an instruction KVM cannot emulate \
             or an unknown exit; the guest's fault, not the host's)"
                .to_owned()
        }
        ExitOutcome::Exited(VMM_EXIT_NOT_ARRIVED) => {
            "the migrated guest did not arrive (VMM exit status 5: the \
             migration target ended before the guest ran here; it is still on its source)"
                .to_owned()
        }
        ExitOutcome::Exited(c) => format!("the VMM exited with unexpected status {c}"),
        ExitOutcome::Signaled(s) => format!("the VMM was killed by signal {s}"),
        ExitOutcome::Unknown(r) => format!("the VMM ended with unknown status: {r}"),
    }
}

/// Which runner to use: systemd where it is PID 1, direct otherwise.
pub fn systemd_is_pid1() -> bool {
    // The same test sd_booted() makes.
    std::path::Path::new("/run/systemd/system").is_dir()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_vmm_exit_status_has_its_own_meaning() {
        let said: Vec<String> = (0..=6)
            .map(|c| describe_exit(&ExitOutcome::Exited(c)))
            .collect();
        assert!(
            said[4].contains("guest crashed") && said[4].contains("status 4"),
            "{}",
            said[4]
        );
        assert!(said[1].contains("error"));
        assert!(said[5].contains("did not arrive") && said[5].contains("status 5"));
        assert!(said[6].contains("unexpected status 6"));
        let mut distinct = said.clone();
        distinct.sort();
        distinct.dedup();
        assert_eq!(distinct.len(), said.len(), "{said:?}");
    }
}
