//! Long operations as jobs, like systemd's: `StartJob`/`StopJob`/`ShutdownJob` return a job at
//! once and the operation runs on its own task; the job is announced ([`NodeEvent::JobNew`])
//! before the caller gets its path, and [`NodeEvent::JobRemoved`] carries its result when it
//! ends. The transport serves the job object meanwhile (D-Bus clients' 25 s call timeout no
//! longer limits a Shutdown that waits 60 s for the guest).

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex as StdMutex};

use super::{Node, NodeError, NodeEvent};
use crate::audit::{self, Origin};
use crate::images::JobControl;
use crate::names::MANAGER_PATH;

/// What a job does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobOperation {
    Start,
    Stop,
    Shutdown,
    PullImage,
    Drain,
    ApplyVms,
    Update,
    Reboot,
    Migrate,
}

impl JobOperation {
    pub fn as_str(self) -> &'static str {
        match self {
            JobOperation::Start => "start",
            JobOperation::Stop => "stop",
            JobOperation::Shutdown => "shutdown",
            JobOperation::PullImage => "pull-image",
            JobOperation::Drain => "drain",
            JobOperation::ApplyVms => "apply-vms",
            JobOperation::Update => "update",
            JobOperation::Reboot => "reboot",
            JobOperation::Migrate => "migrate",
        }
    }
}

/// How a job ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobResult {
    Done,
    Failed,
    Canceled,
}

impl JobResult {
    pub fn as_str(self) -> &'static str {
        match self {
            JobResult::Done => "done",
            JobResult::Failed => "failed",
            JobResult::Canceled => "canceled",
        }
    }
}

/// One job. Its state is `waiting` until its task runs, then `running`.
#[derive(Debug)]
pub struct Job {
    pub id: u32,
    pub operation: JobOperation,
    /// The VM a VM job works on; empty for image pulls.
    pub vm: String,
    /// The URL an image pull fetches; empty for VM jobs.
    pub image_url: String,
    /// Progress and cancellation of an image pull (bytes), an ApplyVms (actions) or a
    /// migration (bytes sent, guest memory).
    pub(super) control: Option<Arc<JobControl>>,
    /// `<manager path>/job/<id>`.
    pub path: String,
    /// Who started it with which call: its end is audited under these.
    pub origin: Origin,
    running: StdMutex<bool>,
}

impl Job {
    /// Done and expected (0: unknown): bytes of an image pull, actions of an ApplyVms;
    /// (0, 0) for VM jobs.
    pub fn progress(&self) -> (u64, u64) {
        self.control.as_ref().map_or((0, 0), |p| p.progress())
    }

    /// The control of a job made with one (pulls, ApplyVms, migrations, DrainTo).
    pub(super) fn controlled(&self) -> Result<Arc<JobControl>, NodeError> {
        self.control.clone().ok_or_else(|| {
            NodeError::Io(format!(
                "{} job without its control",
                self.operation.as_str()
            ))
        })
    }

    /// What the job is doing, if it says (a migration: the VMM's progress as JSON).
    pub fn status(&self) -> String {
        self.control
            .as_ref()
            .map_or_else(String::new, |p| p.status())
    }

    /// Cancels an image pull (its partial download is removed, nothing is published) or an
    /// ApplyVms (actions not begun are skipped; those in progress finish). VM jobs
    /// cannot be canceled: a Stop ends a Shutdown in progress.
    pub fn cancel(&self) -> Result<(), NodeError> {
        match &self.control {
            Some(control) => {
                control.cancel();
                Ok(())
            }
            None => {
                let hint = match self.operation {
                    JobOperation::Shutdown => " (Stop ends a Shutdown in progress)",
                    JobOperation::Drain | JobOperation::Reboot => {
                        " (stopping its VMs ends their shutdowns)"
                    }
                    _ => "",
                };
                Err(NodeError::InvalidState(format!(
                    "a {} job cannot be canceled{hint}",
                    self.operation.as_str()
                )))
            }
        }
    }

    pub fn state(&self) -> &'static str {
        if *self.running.lock().unwrap_or_else(|p| p.into_inner()) {
            "running"
        } else {
            "waiting"
        }
    }
}

/// The node's jobs in progress.
#[derive(Default)]
pub(super) struct Jobs {
    next_id: AtomicU32,
    list: StdMutex<Vec<Arc<Job>>>,
}

impl Node {
    /// Jobs in progress, oldest first.
    pub fn jobs(&self) -> Vec<Arc<Job>> {
        self.jobs
            .list
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Starts `operation` on VM `name` as a job and returns it once it is announced.
    pub async fn start_job(
        self: &Arc<Self>,
        name: &str,
        operation: JobOperation,
        origin: Origin,
    ) -> Result<Arc<Job>, NodeError> {
        // Refuse unknown VMs at once rather than in a failed job.
        self.get(name)?;
        let job = self.new_job(operation, name, "", None, origin);
        self.run_job(job, move |node, job| async move {
            let name = job.vm.clone();
            match job.operation {
                JobOperation::Start => node.start(&name).await,
                JobOperation::Stop => node.stop(&name, false).await,
                JobOperation::Shutdown
                | JobOperation::PullImage
                | JobOperation::Drain
                | JobOperation::ApplyVms
                | JobOperation::Update
                | JobOperation::Reboot
                | JobOperation::Migrate => node.stop(&name, true).await,
            }
            .map(|()| String::new())
        })
        .await
    }

    /// Pulls an image as a job with byte progress, which `Cancel` stops.
    pub async fn start_pull_job(
        self: &Arc<Self>,
        url: &str,
        sha256: &str,
        origin: Origin,
    ) -> Result<Arc<Job>, NodeError> {
        // Bad arguments are refused at once, not in a failed job.
        let parsed = reqwest::Url::parse(url)
            .map_err(|e| NodeError::InvalidArgument(format!("invalid image URL {url:?}: {e}")))?;
        crate::images::image_name_from_url(&parsed)?;
        if sha256.len() != 64 || !sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(NodeError::InvalidArgument(format!(
                "invalid SHA-256 {sha256:?}: expected 64 hexadecimal digits"
            )));
        }
        let control = Arc::new(JobControl::default());
        let job = self.new_job(JobOperation::PullImage, "", url, Some(control), origin);
        let sha256 = sha256.to_owned();
        self.run_job(job, move |node, job| async move {
            let control = job.controlled()?;
            node.pull_image_with(&job.image_url, &sha256, &control)
                .await
                .map(|path| path.display().to_string())
        })
        .await
    }

    /// Live-migrates VM `name` to node `target` as a job: progress in bytes, `Status` the
    /// VMM's migration state, `Cancel` ends it with the VM still running here.
    pub async fn start_migrate_job(
        self: &Arc<Self>,
        name: &str,
        target: &str,
        origin: Origin,
    ) -> Result<Arc<Job>, NodeError> {
        // Bad arguments and a VM that cannot go are refused at once, not in a failed job.
        super::migrate::check_target(target)?;
        let vm = self.get(name)?;
        if vm.state() != super::VmState::Running {
            return Err(NodeError::InvalidState(format!(
                "VM {name} is {}: only a running VM migrates",
                vm.state().as_str()
            )));
        }
        let control = Arc::new(JobControl::default());
        let job = self.new_job(JobOperation::Migrate, name, "", Some(control), origin);
        let target = target.to_owned();
        self.run_job(job, move |node, job| async move {
            let control = job.controlled()?;
            node.migrate(&job.vm, &target, &control).await
        })
        .await
    }

    pub(super) fn new_job(
        &self,
        operation: JobOperation,
        vm: &str,
        image_url: &str,
        control: Option<Arc<JobControl>>,
        origin: Origin,
    ) -> Arc<Job> {
        let id = self.jobs.next_id.fetch_add(1, Ordering::Relaxed) + 1;
        Arc::new(Job {
            id,
            operation,
            vm: vm.to_owned(),
            image_url: image_url.to_owned(),
            control,
            path: format!("{MANAGER_PATH}/job/{id}"),
            origin,
            running: StdMutex::new(false),
        })
    }

    /// Lists and announces `job`, then runs `work` on its own task; JobRemoved tells how it
    /// ended, with `work`'s message when done (a pulled image's path) or the error, and so
    /// does the audit trail.
    pub(super) async fn run_job<F, Fut>(
        self: &Arc<Self>,
        job: Arc<Job>,
        work: F,
    ) -> Result<Arc<Job>, NodeError>
    where
        F: FnOnce(Arc<Node>, Arc<Job>) -> Fut + Send + 'static,
        Fut: std::future::Future<Output = Result<String, NodeError>> + Send + 'static,
    {
        self.jobs
            .list
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(job.clone());
        if let Err(e) = self.publish(NodeEvent::JobNew(job.clone())).await {
            self.forget_job(&job);
            return Err(NodeError::Io(format!("serving the job object: {e}")));
        }
        let node = self.clone();
        let task_job = job.clone();
        tokio::spawn(async move {
            *task_job.running.lock().unwrap_or_else(|p| p.into_inner()) = true;
            let _ = node.publish(NodeEvent::JobChanged(task_job.clone())).await;
            let outcome = work(node.clone(), task_job.clone()).await;
            let canceled = task_job.control.as_ref().is_some_and(|p| p.is_canceled());
            let (result, message) = match outcome {
                Ok(message) => (JobResult::Done, message),
                Err(e) if canceled => (JobResult::Canceled, e.to_string()),
                Err(e) => (JobResult::Failed, e.to_string()),
            };
            node.audit_end(&task_job, result, &message);
            node.forget_job(&task_job);
            let _ = node
                .publish(NodeEvent::JobRemoved(task_job, result, message))
                .await;
        });
        Ok(job)
    }

    /// The audit record of a job's end (see [`crate::audit`]).
    fn audit_end(&self, job: &Job, result: JobResult, message: &str) {
        let message = audit::clip(message);
        let (outcome, error, message) = match result {
            JobResult::Done => (
                audit::Outcome::Done,
                None,
                Some(&*message).filter(|m| !m.is_empty()),
            ),
            JobResult::Failed => (audit::Outcome::Failed, Some(&*message), None),
            JobResult::Canceled => (audit::Outcome::Canceled, Some(&*message), None),
        };
        audit::record(
            self.cfg.journal_socket.as_deref(),
            &audit::Record {
                action: job.origin.action,
                uid: job.origin.uid,
                object: &job.origin.object,
                outcome,
                error,
                job: Some(job.id),
                message,
            },
        );
    }

    fn forget_job(&self, job: &Arc<Job>) {
        self.jobs
            .list
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|j| !Arc::ptr_eq(j, job));
    }
}
