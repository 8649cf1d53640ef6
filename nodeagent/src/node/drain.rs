//! Drain: before a node's update (a reboot), the control plane empties it. `Drain(timeout)`
//! marks the node drained at once (persisted in the state directory, so a drained node stays
//! drained across agent restarts and reboots, and autostart starts nothing on it), refuses new
//! starts from then on, and runs a drain job: every running VM is shut down gracefully in
//! parallel, and those still running after `timeout` are stopped. `DrainTo(timeout, target)`
//! live-migrates them to another node instead, one after the other (each migration takes
//! the link's whole bandwidth; in parallel they would all converge later), and a VM that
//! cannot move keeps running here: the job fails naming it, and the control plane chooses
//! another target or a plain Drain. `Undrain` lifts the mark; it starts nothing (the
//! control plane decides what runs where).

use std::time::Duration;

use super::*;
use crate::fsutil;
use crate::node::jobs::{Job, JobOperation};

impl Node {
    /// Whether the node takes no new starts.
    pub fn is_drained(&self) -> bool {
        self.drained.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// The error for a start on a drained node.
    pub(super) fn refuse_if_drained(&self, name: &str) -> Result<(), NodeError> {
        if self.is_rebooting() {
            return Err(NodeError::InvalidState(format!(
                "the node is rebooting: VM {name} is not started here"
            )));
        }
        if self.is_drained() {
            return Err(NodeError::InvalidState(format!(
                "the node is drained: VM {name} is not started here (Undrain first)"
            )));
        }
        Ok(())
    }

    /// Reads the persisted mark (at start).
    pub(super) fn drained_at_start(layout: &crate::layout::Layout) -> bool {
        layout.drained_file().exists()
    }

    async fn set_drained(&self, drained: bool) -> Result<(), NodeError> {
        let file = self.cfg.layout.drained_file();
        // The mark on disk first: an agent killed right after this call still finds it.
        blocking(move || {
            if drained {
                fsutil::write_atomic(&file, b"drained\n", 0o644)
            } else {
                fsutil::remove_durable(&file)
            }
        })
        .await?
        .map_err(io)?;
        let was = self
            .drained
            .swap(drained, std::sync::atomic::Ordering::SeqCst);
        if was != drained {
            let _ = self.publish(NodeEvent::DrainedChanged).await;
        }
        Ok(())
    }

    /// Marks the node drained and starts the drain job (see the module docs).
    pub async fn drain(
        self: &Arc<Self>,
        timeout_seconds: u64,
        origin: crate::audit::Origin,
    ) -> Result<Arc<Job>, NodeError> {
        if !(1..=86_400).contains(&timeout_seconds) {
            return Err(NodeError::InvalidArgument(format!(
                "the drain timeout must be 1 to 86400 seconds, not {timeout_seconds}"
            )));
        }
        self.set_drained(true).await?;
        self.start_drain_job(Duration::from_secs(timeout_seconds), origin)
            .await
    }

    /// Marks the node drained and starts a job that migrates every running VM to `target`
    /// (see the module docs); a migration still running after `timeout_seconds` is canceled.
    pub async fn drain_to(
        self: &Arc<Self>,
        timeout_seconds: u64,
        target: &str,
        origin: crate::audit::Origin,
    ) -> Result<Arc<Job>, NodeError> {
        if !(1..=86_400).contains(&timeout_seconds) {
            return Err(NodeError::InvalidArgument(format!(
                "the migration timeout must be 1 to 86400 seconds, not {timeout_seconds}"
            )));
        }
        super::migrate::check_target(target)?;
        self.set_drained(true).await?;
        let control = Arc::new(crate::images::JobControl::default());
        let job = self.new_job(JobOperation::Drain, "", "", Some(control), origin);
        let (target, timeout) = (target.to_owned(), Duration::from_secs(timeout_seconds));
        self.run_job(job, move |node, job| async move {
            let control = job.controlled()?;
            node.migrate_all(&target, timeout, &control).await
        })
        .await
    }

    /// Migrates the running VMs to `target` one after the other (DrainTo's job).
    async fn migrate_all(
        &self,
        target: &str,
        timeout: Duration,
        control: &crate::images::JobControl,
    ) -> Result<String, NodeError> {
        let running = self.running_vms();
        control.set_total(running.len() as u64);
        let (mut moved, mut failures) = (0, Vec::new());
        for name in running {
            if control.is_canceled() {
                failures.push(format!("{name}: not migrated (the drain was canceled)"));
                continue;
            }
            if self.get(&name).map_or(true, |vm| vm.state().is_down()) {
                control.advance();
                continue;
            }
            let one = crate::images::JobControl::default();
            let migration = self.migrate(&name, target, &one);
            tokio::pin!(migration);
            let deadline = tokio::time::sleep(timeout);
            tokio::pin!(deadline);
            let (mut timed_out, mut canceled) = (false, false);
            let result = loop {
                tokio::select! {
                    result = &mut migration => break result,
                    () = &mut deadline, if !timed_out => {
                        timed_out = true;
                        one.cancel();
                    }
                    () = control.canceled(), if !canceled => {
                        canceled = true;
                        one.cancel();
                    }
                    () = tokio::time::sleep(Duration::from_millis(500)) => {
                        let migration: serde_json::Value =
                            serde_json::from_str(&one.status()).unwrap_or_default();
                        control.set_status(
                            serde_json::json!({"target": target, "vm": name, "migration": migration})
                                .to_string(),
                        );
                    }
                }
            };
            match result {
                Ok(_) => moved += 1,
                Err(e) if timed_out => {
                    failures.push(format!("{name}: not moved within {timeout:?} ({e})"))
                }
                Err(e) => failures.push(format!("{name}: {e}")),
            }
            control.advance();
        }
        if failures.is_empty() {
            Ok(format!(
                "the node is drained: {moved} VM(s) migrated to {target}"
            ))
        } else {
            Err(NodeError::Vmm(format!(
                "the node is drained, but not every VM moved to {target} (those still run \
                 here): {}",
                failures.join("; ")
            )))
        }
    }

    /// The VMs with a VMM now (a drain's work), by name.
    fn running_vms(&self) -> Vec<String> {
        self.list()
            .into_iter()
            .filter(|vm| !vm.state().is_down())
            .map(|vm| vm.name.clone())
            .collect()
    }

    pub async fn undrain(&self) -> Result<(), NodeError> {
        self.set_drained(false).await
    }

    async fn start_drain_job(
        self: &Arc<Self>,
        timeout: Duration,
        origin: crate::audit::Origin,
    ) -> Result<Arc<Job>, NodeError> {
        let job = self.new_job(JobOperation::Drain, "", "", None, origin);
        self.run_job(job, move |node, _job| async move {
            node.shut_down_all(timeout, "the node is drained")
                .await
                .map(|()| String::new())
        })
        .await
    }

    /// Shuts every running VM down gracefully, in parallel, and stops those still running
    /// after `timeout`. `context` starts the error when not every VM went down.
    pub(super) async fn shut_down_all(
        self: &Arc<Self>,
        timeout: Duration,
        context: &str,
    ) -> Result<(), NodeError> {
        let node = self;
        let running = node.running_vms();
        let mut tasks = Vec::new();
        for name in running {
            let node = node.clone();
            tasks.push(tokio::spawn(async move {
                let graceful = tokio::time::timeout(timeout, node.stop(&name, true)).await;
                let result = match graceful {
                    Ok(result) => result,
                    Err(_) => {
                        tracing::info!(vm = %name, "not down after {timeout:?}; stopping");
                        // A Stop ends the Shutdown still waiting for the guest.
                        node.stop(&name, false).await
                    }
                };
                result.map_err(|e| format!("{name}: {e}"))
            }));
        }
        let mut failures = Vec::new();
        for task in tasks {
            match task.await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => failures.push(e),
                Err(e) => failures.push(e.to_string()),
            }
        }
        if failures.is_empty() {
            Ok(())
        } else {
            Err(NodeError::Vmm(format!(
                "{context}, but not every VM stopped: {}",
                failures.join("; ")
            )))
        }
    }
}
