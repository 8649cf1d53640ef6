//! Job objects on the bus: `<manager path>/job/<id>`, interface `de.thueringen.thvc.node1.Job`,
//! served from [`NodeEvent::JobNew`](crate::node::NodeEvent) until the job ends; then the
//! Manager's `JobRemoved(u id, o path, s result, s message)` signal.

use std::sync::Arc;

use zbus::zvariant::{ObjectPath, OwnedObjectPath};
use zbus::{interface, Connection};

use super::{Manager, MANAGER_PATH};
use crate::names::vm_object_path;
use crate::node::jobs::{Job, JobResult};

pub const JOB_INTERFACE: &str = "de.thueringen.thvc.node1.Job";

pub struct JobObject {
    job: Arc<Job>,
}

#[interface(name = "de.thueringen.thvc.node1.Job")]
impl JobObject {
    #[zbus(property(emits_changed_signal = "const"))]
    fn id(&self) -> u32 {
        self.job.id
    }

    /// start, stop or shutdown.
    #[zbus(property(emits_changed_signal = "const"))]
    fn operation(&self) -> String {
        self.job.operation.as_str().to_owned()
    }

    /// The VM's object path.
    #[zbus(property(emits_changed_signal = "const"))]
    fn vm(&self) -> OwnedObjectPath {
        OwnedObjectPath::try_from(vm_object_path(&self.job.vm))
            .unwrap_or_else(|_| OwnedObjectPath::from(ObjectPath::from_static_str_unchecked("/")))
    }

    /// waiting or running.
    #[zbus(property(emits_changed_signal = "false"))]
    fn state(&self) -> String {
        self.job.state().to_owned()
    }
}

pub(super) async fn register_job(conn: &Connection, job: Arc<Job>) -> zbus::Result<()> {
    let path = job.path.clone();
    conn.object_server()
        .at(path.as_str(), JobObject { job })
        .await?;
    Ok(())
}

pub(super) async fn job_removed(conn: &Connection, job: &Job, result: JobResult, message: &str) {
    if let Err(e) = conn
        .object_server()
        .remove::<JobObject, _>(job.path.as_str())
        .await
    {
        tracing::warn!(job = job.id, "removing the job object: {e}");
    }
    let sent = async {
        let iface = conn
            .object_server()
            .interface::<_, Manager>(MANAGER_PATH)
            .await?;
        let path = ObjectPath::try_from(job.path.as_str())?;
        Manager::job_removed(
            iface.signal_emitter(),
            job.id,
            path,
            result.as_str(),
            message,
        )
        .await
    }
    .await;
    if let Err(e) = sent {
        tracing::warn!(job = job.id, "emitting JobRemoved: {e}");
    }
}
