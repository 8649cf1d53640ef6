//! The systemd runner: VM `NAME` runs as `thvc-vm@NAME.service` (instance escaped like
//! `systemd-escape`), started and stopped through `org.freedesktop.systemd1` on the system
//! bus. systemd supervises the VMM, so VMs survive agent restarts by construction.
//!
//! The unit (shipped in systemd/ by the packaging) is expected to be:
//! ```ini
//! [Unit]
//! Description=thvc VM %I
//! [Service]
//! Type=exec
//! ExecStart=/usr/bin/thvc-nodeagent exec-vm --run-dir /run/thvc/vms/%I
//! KillMode=mixed
//! TimeoutStopSec=30
//! SuccessExitStatus=3
//! ```
//! `exec-vm` execs `thvc-vmm` with the argv the agent wrote to `vmm-args.json`, so the unit's
//! main PID is the VMM and `ExecMainStatus` is its exit status. There is no `Restart=`: the
//! agent decides about restarts (exit 3 = guest reboot) in both runners alike.
//!
//! A unit that ends inactive (exit 0, or 3 = guest reboot, a success for the unit) is
//! garbage-collected by systemd at once, and its `ExecMain*` properties with it: the agent
//! holds a reference on the unit (`Unit.Ref`) from start until it has read the exit status.
//!
//! Not exercised by the test suite on hosts without systemd as PID 1; tested in the image
//! (integration/image/boot-test).

use futures_util::future::BoxFuture;
use futures_util::{FutureExt, StreamExt};
use tokio::sync::OnceCell;
use zbus::zvariant::OwnedObjectPath;

use super::supervise::VmmArgv;
use super::{Adoption, ExitFuture, ExitOutcome, LaunchSpec, RunnerError, VmRunner, VmmUsage};
use crate::fsutil;
use crate::layout::{self, Layout};
use crate::names;

#[zbus::proxy(
    interface = "org.freedesktop.systemd1.Manager",
    default_service = "org.freedesktop.systemd1",
    default_path = "/org/freedesktop/systemd1"
)]
trait SystemdManager {
    fn start_unit(&self, name: &str, mode: &str) -> zbus::Result<OwnedObjectPath>;
    fn stop_unit(&self, name: &str, mode: &str) -> zbus::Result<OwnedObjectPath>;
    fn kill_unit(&self, name: &str, whom: &str, signal: i32) -> zbus::Result<()>;
    fn load_unit(&self, name: &str) -> zbus::Result<OwnedObjectPath>;
    fn reset_failed_unit(&self, name: &str) -> zbus::Result<()>;
}

#[zbus::proxy(
    interface = "org.freedesktop.systemd1.Unit",
    default_service = "org.freedesktop.systemd1"
)]
trait SystemdUnit {
    #[zbus(property)]
    fn active_state(&self) -> zbus::Result<String>;
    /// Keeps the unit loaded while this bus connection holds the reference (dropped by
    /// systemd if the agent goes away), like `systemd-run --wait` does.
    #[zbus(name = "Ref")]
    fn hold(&self) -> zbus::Result<()>;
    #[zbus(name = "Unref")]
    fn release(&self) -> zbus::Result<()>;
}

#[zbus::proxy(
    interface = "org.freedesktop.systemd1.Service",
    default_service = "org.freedesktop.systemd1"
)]
trait SystemdService {
    #[zbus(property)]
    fn exec_main_code(&self) -> zbus::Result<i32>;
    #[zbus(property)]
    fn exec_main_status(&self) -> zbus::Result<i32>;
    #[zbus(property)]
    fn exec_main_start_timestamp(&self) -> zbus::Result<u64>;
}

/// The unit's resource accounting (read uncached: these change without PropertiesChanged).
#[zbus::proxy(
    interface = "org.freedesktop.systemd1.Service",
    default_service = "org.freedesktop.systemd1"
)]
trait SystemdServiceUsage {
    #[zbus(property(emits_changed_signal = "false"), name = "CPUUsageNSec")]
    fn cpu_usage_nsec(&self) -> zbus::Result<u64>;
    #[zbus(property(emits_changed_signal = "false"))]
    fn memory_current(&self) -> zbus::Result<u64>;
}

// si_code values of ExecMainCode.
const CLD_EXITED: i32 = 1;
const CLD_KILLED: i32 = 2;
const CLD_DUMPED: i32 = 3;

pub struct SystemdRunner {
    layout: Layout,
    system_bus: OnceCell<zbus::Connection>,
}

fn sd_err(e: impl std::fmt::Display) -> RunnerError {
    RunnerError::Systemd(e.to_string())
}

impl SystemdRunner {
    pub fn new(layout: Layout) -> Self {
        SystemdRunner {
            layout,
            system_bus: OnceCell::new(),
        }
    }

    async fn bus(&self) -> Result<&zbus::Connection, RunnerError> {
        self.system_bus
            .get_or_try_init(|| async { zbus::Connection::system().await.map_err(sd_err) })
            .await
    }

    async fn manager(&self) -> Result<SystemdManagerProxy<'static>, RunnerError> {
        SystemdManagerProxy::new(self.bus().await?)
            .await
            .map_err(sd_err)
    }

    /// The object path of VM `name`'s unit (loaded if systemd has not yet).
    async fn unit_path(&self, name: &str) -> Result<OwnedObjectPath, RunnerError> {
        self.manager()
            .await?
            .load_unit(&names::vm_unit_name(name))
            .await
            .map_err(sd_err)
    }

    async fn unit_proxies(
        &self,
        name: &str,
    ) -> Result<(SystemdUnitProxy<'static>, SystemdServiceProxy<'static>), RunnerError> {
        let path = self.unit_path(name).await?;
        let bus = self.bus().await?;
        let unit = SystemdUnitProxy::builder(bus)
            .path(path.clone())
            .map_err(sd_err)?
            .build()
            .await
            .map_err(sd_err)?;
        let service = SystemdServiceProxy::builder(bus)
            .path(path)
            .map_err(sd_err)?
            .build()
            .await
            .map_err(sd_err)?;
        Ok((unit, service))
    }

    /// Resolves when the unit is inactive or failed, with the main process' exit status.
    fn watch_until_inactive(
        unit: SystemdUnitProxy<'static>,
        service: SystemdServiceProxy<'static>,
    ) -> ExitFuture {
        async move {
            let mut changes = unit.receive_active_state_changed().await;
            loop {
                match unit.active_state().await {
                    Ok(s) if s == "inactive" || s == "failed" => break,
                    Ok(_) => {}
                    Err(e) => return ExitOutcome::Unknown(format!("systemd: {e}")),
                }
                if changes.next().await.is_none() {
                    return ExitOutcome::Unknown("lost the system bus".to_owned());
                }
            }
            let outcome = exit_outcome(&service).await;
            // Read: systemd may collect the unit now.
            if let Err(e) = unit.release().await {
                tracing::debug!("Unref of a finished VM unit: {e}");
            }
            outcome
        }
        .boxed()
    }

    /// Holds the unit loaded until its exit status is read (see the module comment).
    async fn hold(unit: &SystemdUnitProxy<'_>, name: &str) {
        if let Err(e) = unit.hold().await {
            tracing::warn!(vm = %name, "cannot hold a reference on its unit ({e}); its exit status may be lost if it ends inactive");
        }
    }
}

async fn exit_outcome(service: &SystemdServiceProxy<'_>) -> ExitOutcome {
    let code = service.exec_main_code().await;
    let status = service.exec_main_status().await;
    match (code, status) {
        (Ok(CLD_EXITED), Ok(s)) => ExitOutcome::Exited(s),
        (Ok(CLD_KILLED | CLD_DUMPED), Ok(s)) => ExitOutcome::Signaled(s),
        (Ok(c), Ok(s)) => ExitOutcome::Unknown(format!("ExecMainCode={c} ExecMainStatus={s}")),
        (Err(e), _) | (_, Err(e)) => ExitOutcome::Unknown(format!("systemd: {e}")),
    }
}

impl VmRunner for SystemdRunner {
    fn kind(&self) -> &'static str {
        "systemd"
    }

    fn vmm_log_location(&self, name: &str) -> String {
        format!("journalctl -u {}", names::vm_unit_name(name))
    }

    fn launch<'a>(
        &'a self,
        spec: &'a LaunchSpec,
    ) -> BoxFuture<'a, Result<ExitFuture, RunnerError>> {
        async move {
            let err = |reason: String| RunnerError::Launch {
                vm: spec.name.clone(),
                reason,
            };
            let run_dir = self.layout.vm_run_dir(&spec.name);
            let argv = VmmArgv {
                vmm: spec.vmm.display().to_string(),
                args: spec.args.clone(),
                run_as: spec.run_as.clone(),
            };
            let data = serde_json::to_vec(&argv).map_err(|e| err(e.to_string()))?;
            // fsyncs: on a blocking thread, not on the threads that answer the bus.
            let (dir, log_dir, socket) = (
                run_dir.clone(),
                self.layout.vm_log_dir(&spec.name),
                self.layout.api_socket(&spec.name),
            );
            tokio::task::spawn_blocking(move || {
                fsutil::create_dir_all(&dir, 0o750)?;
                fsutil::create_dir_all(&log_dir, 0o750)?;
                fsutil::remove_durable(&socket)?;
                fsutil::write_atomic(&layout::vmm_args_file(&dir), &data, 0o640)
            })
            .await
            .map_err(|e| err(e.to_string()))?
            .map_err(|e| err(e.to_string()))?;
            let unit_name = names::vm_unit_name(&spec.name);
            let manager = self.manager().await?;
            // A previous failed run leaves the unit in "failed"; clear it (errors just mean
            // there was nothing to clear).
            let _ = manager.reset_failed_unit(&unit_name).await;
            let (unit, service) = self.unit_proxies(&spec.name).await?;
            Self::hold(&unit, &spec.name).await;
            // The watcher reads ActiveState before waiting for changes, so even a VMM that
            // exits before the watcher first runs is seen (with its exit status).
            let exited = Self::watch_until_inactive(unit.clone(), service);
            manager
                .start_unit(&unit_name, "replace")
                .await
                .map_err(|e| err(format!("StartUnit {unit_name}: {e}")))?;
            // Wait until the start job left "inactive" so the watcher does not resolve on the
            // state from before the start.
            let mut changes = unit.receive_active_state_changed().await;
            for _ in 0..50 {
                match unit.active_state().await {
                    Ok(s) if s != "inactive" => break,
                    Ok(_) => {}
                    Err(e) => return Err(sd_err(e)),
                }
                let _ = tokio::time::timeout(std::time::Duration::from_millis(100), changes.next())
                    .await;
            }
            Ok(exited)
        }
        .boxed()
    }

    fn adopt<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<Adoption, RunnerError>> {
        async move {
            let (unit, service) = self.unit_proxies(name).await?;
            let state = unit.active_state().await.map_err(sd_err)?;
            match state.as_str() {
                "active" | "activating" | "deactivating" | "reloading" => {
                    Self::hold(&unit, name).await;
                    Ok(Adoption::Running(Self::watch_until_inactive(unit, service)))
                }
                _ => {
                    let started = service.exec_main_start_timestamp().await.unwrap_or(0);
                    if started == 0 {
                        Ok(Adoption::NotRunning)
                    } else {
                        Ok(Adoption::Exited(exit_outcome(&service).await))
                    }
                }
            }
        }
        .boxed()
    }

    fn terminate<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<(), RunnerError>> {
        async move {
            self.manager()
                .await?
                .stop_unit(&names::vm_unit_name(name), "replace")
                .await
                .map_err(sd_err)?;
            Ok(())
        }
        .boxed()
    }

    fn kill<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<(), RunnerError>> {
        async move {
            self.manager()
                .await?
                .kill_unit(&names::vm_unit_name(name), "all", libc::SIGKILL)
                .await
                .map_err(sd_err)
        }
        .boxed()
    }

    fn forget<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<(), RunnerError>> {
        async move {
            let _ = self
                .manager()
                .await?
                .reset_failed_unit(&names::vm_unit_name(name))
                .await;
            super::remove_run_dir(name, self.layout.vm_run_dir(name)).await
        }
        .boxed()
    }

    fn usage<'a>(&'a self, name: &'a str) -> BoxFuture<'a, Result<Option<VmmUsage>, RunnerError>> {
        async move {
            let path = self.unit_path(name).await?;
            let usage = SystemdServiceUsageProxy::builder(self.bus().await?)
                .path(path)
                .map_err(sd_err)?
                .cache_properties(zbus::proxy::CacheProperties::No)
                .build()
                .await
                .map_err(sd_err)?;
            // u64::MAX: systemd does not know (the unit is not running, or its accounting
            // is off).
            let known = |v: u64| (v != u64::MAX).then_some(v);
            let cpu = known(usage.cpu_usage_nsec().await.map_err(sd_err)?);
            let memory = known(usage.memory_current().await.map_err(sd_err)?);
            if cpu.is_none() && memory.is_none() {
                return Ok(None);
            }
            Ok(Some(VmmUsage {
                cpu_seconds: cpu.map(|ns| ns as f64 / 1e9),
                rss_bytes: None,
                cgroup_memory_bytes: memory,
            }))
        }
        .boxed()
    }
}
