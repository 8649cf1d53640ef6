//! Job objects on the bus: `<manager path>/job/<id>`, interface `de.thueringen.thvc.node1.Job`,
//! served from [`NodeEvent::JobNew`](crate::node::NodeEvent) until the job ends; then the
//! Manager's `JobRemoved(u id, o path, s result, s message)` signal.

use std::sync::Arc;

use zbus::zvariant::{ObjectPath, OwnedObjectPath};
use zbus::{interface, Connection};

use super::{authorize_change, BusError, Manager, Role, MANAGER_PATH};
use crate::names::vm_object_path;
use crate::node::jobs::JobOperation;
use crate::node::jobs::{Job, JobResult};
use crate::node::Node;
use zbus::message::Header;

pub const JOB_INTERFACE: &str = "de.thueringen.thvc.node1.Job";

pub struct JobObject {
    job: Arc<Job>,
    /// For authorizing Cancel; None once the node is gone.
    node: Option<Arc<Node>>,
}

#[interface(name = "de.thueringen.thvc.node1.Job")]
impl JobObject {
    #[zbus(property(emits_changed_signal = "const"))]
    fn id(&self) -> u32 {
        self.job.id
    }

    /// What the job does: start, stop or shutdown (a Vm's StartJob, StopJob, ShutdownJob),
    /// pull-image (PullImageJob), apply-vms (ApplyVms), drain (Drain), update (Update, also
    /// its dry run), reboot (Reboot) or migrate (MigrateVm).
    #[zbus(property(emits_changed_signal = "const"))]
    fn operation(&self) -> String {
        self.job.operation.as_str().to_owned()
    }

    /// The URL of a pull-image job, or the update server of an update job ("" for the
    /// others and for an update from the configured server).
    #[zbus(property(emits_changed_signal = "const"))]
    fn image_url(&self) -> String {
        self.job.image_url.clone()
    }

    /// (done, total), total 0 while not known. pull-image: bytes downloaded and the image's
    /// size (from Content-Length). apply-vms: the plan's actions finished (done, failed,
    /// skipped or canceled) and all of them. migrate: bytes sent (pre-copy rounds send
    /// pages again) and the guest's memory. start, stop, shutdown, drain, update and reboot
    /// report none: (0, 0); a drain or reboot job runs until every VM is down (a reboot's
    /// then until the host goes down), an update until its download is installed. Not
    /// signalled: read it while the job runs.
    #[zbus(property(emits_changed_signal = "false"))]
    fn progress(&self) -> (u64, u64) {
        self.job.progress()
    }

    /// What the job is doing, as JSON, where it says: a migrate job's VMM progress
    /// (`state` connecting, precopy, stop-and-copy, switching; `rounds`, `bytes`,
    /// `dirty_bytes`, `rate_bytes_per_s`, `expected_downtime_ms`, `elapsed_ms`); "" for the
    /// others. Not signalled: read it while the job runs.
    #[zbus(property(emits_changed_signal = "false"))]
    fn status(&self) -> String {
        self.job.status()
    }

    /// Cancels a pull-image job (nothing is stored; JobRemoved says `canceled`), an
    /// apply-vms job (actions not begun are skipped) or a migrate job (the VM keeps running
    /// here; canceled once the switch began, it completes). VM, drain, update and reboot jobs
    /// refuse (InvalidState): a Stop ends a Shutdown in progress. Needs the role that may
    /// start the job (images for a pull, host for drain, update and reboot, else vm-control).
    async fn cancel(
        &self,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] conn: &Connection,
    ) -> Result<(), BusError> {
        let Some(node) = &self.node else {
            return Err(BusError::InvalidState("the node is shutting down".into()));
        };
        // The role that may start the job: a drain, update or reboot job is the host role's
        // (it cannot be canceled, which the caller then hears as such, not as AccessDenied).
        let (role, object) = match self.job.operation {
            JobOperation::PullImage => (Role::Images, self.job.image_url.as_str()),
            JobOperation::Drain | JobOperation::Update | JobOperation::Reboot => {
                (Role::Host, self.job.image_url.as_str())
            }
            JobOperation::Start
            | JobOperation::Stop
            | JobOperation::Shutdown
            | JobOperation::ApplyVms
            | JobOperation::Migrate => (Role::VmControl, self.job.vm.as_str()),
        };
        authorize_change(conn, Some(&header), node, role, "CancelJob", object)
            .await?
            .done(self.job.cancel())
    }

    /// The VM's object path for start, stop, shutdown and migrate jobs; "/" for the others (an
    /// apply's VMs are in its plan, a drain's or reboot's are every VM).
    #[zbus(property(emits_changed_signal = "const"))]
    fn vm(&self) -> OwnedObjectPath {
        let root = || OwnedObjectPath::from(ObjectPath::from_static_str_unchecked("/"));
        if self.job.vm.is_empty() {
            return root();
        }
        OwnedObjectPath::try_from(vm_object_path(&self.job.vm)).unwrap_or_else(|_| root())
    }

    /// waiting or running (PropertiesChanged when it begins running).
    #[zbus(property)]
    fn state(&self) -> String {
        self.job.state().to_owned()
    }
}

pub(super) async fn register_job(
    conn: &Connection,
    node: Option<Arc<Node>>,
    job: Arc<Job>,
) -> zbus::Result<()> {
    let path = job.path.clone();
    conn.object_server()
        .at(path.as_str(), JobObject { job, node })
        .await?;
    Ok(())
}

pub(super) async fn job_state_changed(conn: &Connection, job: &Job) {
    let result = async {
        let iface = conn
            .object_server()
            .interface::<_, JobObject>(job.path.as_str())
            .await?;
        let object = iface.get().await;
        object.state_changed(iface.signal_emitter()).await
    }
    .await;
    if let Err(e) = result {
        // A job that ended at once may be gone already.
        tracing::debug!(job = job.id, "emitting State change: {e}");
    }
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
