//! Long operations as jobs, like systemd's: `StartJob`/`StopJob`/`ShutdownJob` return a job at
//! once and the operation runs on its own task; the job is announced ([`NodeEvent::JobNew`])
//! before the caller gets its path, and [`NodeEvent::JobRemoved`] carries its result when it
//! ends. The transport serves the job object meanwhile (D-Bus clients' 25 s call timeout no
//! longer limits a Shutdown that waits 60 s for the guest).

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex as StdMutex};

use super::{Node, NodeError, NodeEvent};
use crate::names::MANAGER_PATH;

/// What a job does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobOperation {
    Start,
    Stop,
    Shutdown,
}

impl JobOperation {
    pub fn as_str(self) -> &'static str {
        match self {
            JobOperation::Start => "start",
            JobOperation::Stop => "stop",
            JobOperation::Shutdown => "shutdown",
        }
    }
}

/// How a job ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobResult {
    Done,
    Failed,
}

impl JobResult {
    pub fn as_str(self) -> &'static str {
        match self {
            JobResult::Done => "done",
            JobResult::Failed => "failed",
        }
    }
}

/// One job. Its state is `waiting` until its task runs, then `running`.
#[derive(Debug)]
pub struct Job {
    pub id: u32,
    pub operation: JobOperation,
    pub vm: String,
    /// `<manager path>/job/<id>`.
    pub path: String,
    running: StdMutex<bool>,
}

impl Job {
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
    ) -> Result<Arc<Job>, NodeError> {
        // Refuse unknown VMs at once rather than in a failed job.
        self.get(name)?;
        let id = self.jobs.next_id.fetch_add(1, Ordering::Relaxed) + 1;
        let job = Arc::new(Job {
            id,
            operation,
            vm: name.to_owned(),
            path: format!("{MANAGER_PATH}/job/{id}"),
            running: StdMutex::new(false),
        });
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
            let name = task_job.vm.clone();
            let outcome = match task_job.operation {
                JobOperation::Start => node.start(&name).await,
                JobOperation::Stop => node.stop(&name, false).await,
                JobOperation::Shutdown => node.stop(&name, true).await,
            };
            let (result, message) = match outcome {
                Ok(()) => (JobResult::Done, String::new()),
                Err(e) => (JobResult::Failed, e.to_string()),
            };
            node.forget_job(&task_job);
            let _ = node
                .publish(NodeEvent::JobRemoved(task_job, result, message))
                .await;
        });
        Ok(job)
    }

    fn forget_job(&self, job: &Arc<Job>) {
        self.jobs
            .list
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|j| !Arc::ptr_eq(j, job));
    }
}
