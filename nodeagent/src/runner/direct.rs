//! The direct runner: the agent starts `thvc-nodeagent supervise-vm` per VM (see
//! [`super::supervise`]) in a new session, with stdout/stderr going to `<log>/<name>/vmm.log`
//! (never a pipe to the agent: a dead agent must not take VMMs down with SIGPIPE).

use std::os::unix::process::CommandExt as _;
use std::path::PathBuf;
use std::process::Stdio;

use futures_util::future::BoxFuture;
use futures_util::FutureExt;

use super::{
    Adoption, ExitFuture, ExitOutcome, ExitRecord, LaunchSpec, RunnerError, VmRunner, VmmUsage,
};
use crate::fsutil;
use crate::layout::{self, Layout};
use crate::procinfo::{self, read_record, ProcessId};

pub struct DirectRunner {
    layout: Layout,
    /// The agent binary, which also implements `supervise-vm`.
    agent_exe: PathBuf,
}

/// How long a supervisor may take to start its VMM and record it (launch and adopt wait).
const VMM_RECORD_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

/// How long a supervisor whose VMM has ended may take to record the exit and go.
const SUPERVISOR_WIND_DOWN: std::time::Duration = std::time::Duration::from_secs(5);

impl DirectRunner {
    pub fn new(layout: Layout, agent_exe: PathBuf) -> Self {
        DirectRunner { layout, agent_exe }
    }

    fn exit_outcome(&self, name: &str) -> ExitOutcome {
        let run_dir = self.layout.vm_run_dir(name);
        match read_record::<ExitRecord>(&layout::exit_file(&run_dir)) {
            Ok(Some(r)) => r.into(),
            Ok(None) => ExitOutcome::Unknown(
                "its supervisor ended without recording an exit status".to_owned(),
            ),
            Err(e) => ExitOutcome::Unknown(format!("unreadable exit record: {e}")),
        }
    }

    /// How the run ended once its supervisor is gone. If the supervisor died without
    /// recording an exit (killed), the VMM may still run: keep watching it rather than
    /// report a running VM as ended (another start would then share its disks).
    async fn outcome_after_supervisor(&self, name: &str) -> ExitOutcome {
        let outcome = self.exit_outcome(name);
        if !matches!(outcome, ExitOutcome::Unknown(_)) {
            return outcome;
        }
        if let Some(vmm) = self.vmm(name).filter(|v| v.is_alive()) {
            tracing::warn!(vm = %name, pid = vmm.pid, "supervisor gone; watching the VMM directly");
            if let Err(e) = vmm.wait_exit().await {
                return ExitOutcome::Unknown(format!("cannot watch the VMM: {e}"));
            }
            return ExitOutcome::Unknown(
                "its supervisor died, so the VMM's exit status was not recorded".to_owned(),
            );
        }
        outcome
    }

    fn supervisor(&self, name: &str) -> Option<ProcessId> {
        read_record::<ProcessId>(&layout::process_file(&self.layout.vm_run_dir(name)))
            .ok()
            .flatten()
    }

    fn vmm(&self, name: &str) -> Option<ProcessId> {
        read_record::<ProcessId>(&layout::vmm_process_file(&self.layout.vm_run_dir(name)))
            .ok()
            .flatten()
    }

    fn signal(&self, name: &str, signal: i32) -> Result<(), RunnerError> {
        let ctl = |reason: String| RunnerError::Control {
            vm: name.to_owned(),
            reason,
        };
        // Prefer the VMM itself; before it is recorded (or after it ended) the supervisor
        // forwards SIGTERM, and SIGKILL to it ends the run as well.
        if let Some(vmm) = self.vmm(name) {
            if vmm.signal(signal).map_err(|e| ctl(e.to_string()))? {
                return Ok(());
            }
        }
        if let Some(sup) = self.supervisor(name) {
            sup.signal(signal).map_err(|e| ctl(e.to_string()))?;
        }
        Ok(())
    }

    async fn launch_inner(&self, spec: &LaunchSpec) -> Result<ExitFuture, RunnerError> {
        let err = |reason: String| RunnerError::Launch {
            vm: spec.name.clone(),
            reason,
        };
        let run_dir = self.layout.vm_run_dir(&spec.name);
        // The run directory's records of the last run go durably (fsyncs): on a blocking
        // thread, not on the threads that answer the bus.
        let stale = [
            layout::process_file(&run_dir),
            layout::vmm_process_file(&run_dir),
            layout::exit_file(&run_dir),
            self.layout.api_socket(&spec.name),
        ];
        let (dir, log_dir, log_path) = (
            run_dir.clone(),
            self.layout.vm_log_dir(&spec.name),
            self.layout.vmm_log(&spec.name),
        );
        let (log, log2) = tokio::task::spawn_blocking(move || {
            fsutil::create_dir_all(&dir, 0o750).map_err(|e| e.to_string())?;
            for f in stale {
                fsutil::remove_durable(&f).map_err(|e| e.to_string())?;
            }
            fsutil::create_dir_all(&log_dir, 0o750).map_err(|e| e.to_string())?;
            let log = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&log_path)
                .map_err(|e| format!("{}: {e}", log_path.display()))?;
            let log2 = log
                .try_clone()
                .map_err(|e| format!("{}: {e}", log_path.display()))?;
            Ok::<_, String>((log, log2))
        })
        .await
        .map_err(|e| err(e.to_string()))?
        .map_err(err)?;
        let mut cmd = std::process::Command::new(&self.agent_exe);
        cmd.arg("supervise-vm").arg("--run-dir").arg(&run_dir);
        if let Some(who) = &spec.run_as {
            cmd.arg("--run-as").arg(who.to_arg());
        }
        cmd.arg("--")
            .arg(&spec.vmm)
            .args(&spec.args)
            .stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(log2))
            .env_remove("RUST_LOG");
        // SAFETY: setsid is async-signal-safe; it detaches the supervisor from the agent's
        // session and process group so signals aimed at the agent do not reach VMs.
        unsafe {
            cmd.pre_exec(|| {
                if libc::setsid() < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut child = tokio::process::Command::from(cmd)
            .kill_on_drop(false)
            .spawn()
            .map_err(|e| err(format!("{}: {e}", self.agent_exe.display())))?;
        let pid = child.id().map(|p| p as i32).unwrap_or(0);
        // Record the supervisor here too: it also records itself, but only once it runs.
        if let Ok(id) = ProcessId::of(pid) {
            if let Ok(data) = serde_json::to_vec(&id) {
                let file = layout::process_file(&run_dir);
                let _ =
                    tokio::task::spawn_blocking(move || fsutil::write_atomic(&file, &data, 0o644))
                        .await;
            }
        }
        let layout = self.layout.clone();
        let name = spec.name.clone();
        let fut = async move {
            // Callers expect the VMM's identity to be on record once launch returned (Stop
            // signals the VMM itself); the supervisor writes it right after spawning.
            let vmm_file = layout::vmm_process_file(&layout.vm_run_dir(&name));
            let deadline = tokio::time::Instant::now() + VMM_RECORD_WAIT;
            while !vmm_file.exists() && tokio::time::Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    break;
                }
                tokio::time::sleep(std::time::Duration::from_millis(2)).await;
            }
            child
        };
        let mut child = fut.await;
        let layout = self.layout.clone();
        let name = spec.name.clone();
        let fut = async move {
            let status = child.wait().await;
            let runner = DirectRunner::new(layout, PathBuf::new());
            match runner.outcome_after_supervisor(&name).await {
                ExitOutcome::Unknown(reason) => ExitOutcome::Unknown(match status {
                    Ok(s) => format!("{reason} (supervisor {s})"),
                    Err(e) => format!("{reason} (waiting for the supervisor: {e})"),
                }),
                known => known,
            }
        };
        Ok(fut.boxed())
    }
}

impl VmRunner for DirectRunner {
    fn kind(&self) -> &'static str {
        "direct"
    }

    fn vmm_log_location(&self, name: &str) -> String {
        self.layout.vmm_log(name).display().to_string()
    }

    fn launch<'a>(
        &'a self,
        spec: &'a LaunchSpec,
    ) -> BoxFuture<'a, Result<ExitFuture, RunnerError>> {
        async move { self.launch_inner(spec).await }.boxed()
    }

    fn adopt<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<Adoption, RunnerError>> {
        async move {
            let Some(sup) = self.supervisor(name) else {
                return Ok(Adoption::NotRunning);
            };
            let mut vmm = self.vmm(name);
            // A start the previous agent began: its supervisor records the VMM right after
            // spawning it. Wait for that as launch does, rather than call a VM running whose
            // VMM does not exist yet (a loaded machine showed that moment).
            let deadline = tokio::time::Instant::now() + VMM_RECORD_WAIT;
            while vmm.is_none() && sup.is_alive() && tokio::time::Instant::now() < deadline {
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                vmm = self.vmm(name);
            }
            let vmm_alive = vmm.as_ref().is_some_and(|v| v.is_alive());
            if vmm.is_some() && !vmm_alive && sup.is_alive() {
                // The VMM has ended and its supervisor is recording the exit: report how it
                // ended, not a moment of "running" for a VM whose process is gone.
                if tokio::time::timeout(SUPERVISOR_WIND_DOWN, sup.wait_exit())
                    .await
                    .is_ok_and(|r| r.is_ok())
                {
                    return Ok(Adoption::Exited(self.exit_outcome(name)));
                }
            }
            if sup.is_alive() || vmm_alive {
                let layout = self.layout.clone();
                let name = name.to_owned();
                let fut = async move {
                    if let Err(e) = sup.wait_exit().await {
                        return ExitOutcome::Unknown(format!("cannot watch the supervisor: {e}"));
                    }
                    DirectRunner::new(layout, PathBuf::new())
                        .outcome_after_supervisor(&name)
                        .await
                };
                return Ok(Adoption::Running(fut.boxed()));
            }
            Ok(Adoption::Exited(self.exit_outcome(name)))
        }
        .boxed()
    }

    fn terminate<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<(), RunnerError>> {
        async move { self.signal(name, libc::SIGTERM) }.boxed()
    }

    fn kill<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<(), RunnerError>> {
        async move { self.signal(name, libc::SIGKILL) }.boxed()
    }

    fn forget<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<(), RunnerError>> {
        async move { super::remove_run_dir(name, self.layout.vm_run_dir(name)).await }.boxed()
    }

    fn usage<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<Option<VmmUsage>, RunnerError>> {
        let vmm_file = layout::vmm_process_file(&self.layout.vm_run_dir(name));
        let vm = name.to_owned();
        async move {
            // Record and /proc reads: blocking, off the threads that answer the bus.
            tokio::task::spawn_blocking(move || {
                let Some(id) = read_record::<ProcessId>(&vmm_file).ok().flatten() else {
                    return Ok(None);
                };
                if !id.is_alive() {
                    return Ok(None);
                }
                let usage = procinfo::usage(id.pid).map_err(|e| RunnerError::Control {
                    vm: vm.clone(),
                    reason: e.to_string(),
                })?;
                Ok(Some(VmmUsage {
                    cpu_seconds: Some(usage.cpu_seconds),
                    rss_bytes: Some(usage.rss_bytes),
                    cgroup_memory_bytes: None,
                }))
            })
            .await
            .unwrap_or_else(|e| {
                Err(RunnerError::Control {
                    vm: name.to_owned(),
                    reason: format!("reading the VMM's usage did not complete: {e}"),
                })
            })
        }
        .boxed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The agent comes back just after a VMM died while its supervisor is still writing the
    /// exit record: the VM is reported as ended, with the recorded status, never "running".
    #[tokio::test]
    async fn adopting_a_dead_vmm_whose_supervisor_is_winding_down_reports_its_exit() {
        let dir = tempfile::tempdir().unwrap();
        let layout = Layout::new(
            dir.path().join("s"),
            dir.path().join("r"),
            dir.path().join("l"),
        );
        let run_dir = layout.vm_run_dir("vm");
        std::fs::create_dir_all(&run_dir).unwrap();

        let mut vmm = std::process::Command::new("sleep")
            .arg("0.1")
            .spawn()
            .unwrap();
        let vmm_id = ProcessId::of(vmm.id() as i32).unwrap();
        vmm.wait().unwrap();
        let exit_file = layout::exit_file(&run_dir);
        let mut sup = std::process::Command::new("sh")
            .arg("-c")
            .arg(r#"sleep 0.5; printf '{"signal":9}' > "$0""#)
            .arg(&exit_file)
            .spawn()
            .unwrap();
        let sup_id = ProcessId::of(sup.id() as i32).unwrap();
        let record = |path: PathBuf, id: &ProcessId| {
            std::fs::write(path, serde_json::to_vec(id).unwrap()).unwrap()
        };
        record(layout::vmm_process_file(&run_dir), &vmm_id);
        record(layout::process_file(&run_dir), &sup_id);

        let runner = DirectRunner::new(layout, PathBuf::new());
        match runner.adopt("vm").await.unwrap() {
            Adoption::Exited(outcome) => assert_eq!(outcome, ExitOutcome::Signaled(9)),
            Adoption::Running(_) => panic!("a VM whose VMM is gone was adopted as running"),
            Adoption::NotRunning => panic!("the recorded run was not found"),
        }
        sup.wait().unwrap();
    }
}
