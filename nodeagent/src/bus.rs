//! The D-Bus face of the agent: `de.thueringen.thvc.node1.Manager` at
//! `/de/thueringen/thvc/node1`, one `de.thueringen.thvc.node1.Vm` object per VM below
//! `/de/thueringen/thvc/node1/vm/`, and `org.freedesktop.DBus.ObjectManager` at the manager's
//! path. Methods translate to [`Node`] calls and map [`NodeError`] to named D-Bus errors.
//! Methods that change state first check the caller (see [`crate::auth`]).

use std::collections::HashMap;
use std::sync::Arc;

use zbus::message::Header;
use zbus::object_server::SignalEmitter;
use zbus::zvariant::{ObjectPath, OwnedObjectPath, Value};
use zbus::{interface, Connection};

mod jobs;
pub use jobs::JOB_INTERFACE;

use crate::audit;
use crate::auth::Role;
use crate::host::UpdateAction;
use crate::hostinfo;
use crate::names::MANAGER_PATH;
use crate::node::jobs::{Job, JobOperation};
use crate::node::{EventStream, Node, NodeError, NodeEvent, Vm, VmProperty};

pub const BUS_NAME: &str = "de.thueringen.thvc.node1";
pub const MANAGER_INTERFACE: &str = "de.thueringen.thvc.node1.Manager";
pub const VM_INTERFACE: &str = "de.thueringen.thvc.node1.Vm";
pub const ERROR_PREFIX: &str = "de.thueringen.thvc.node1.Error";

/// Errors as they appear on the bus: `de.thueringen.thvc.node1.Error.<Variant>` with a
/// message meant for a person.
#[derive(Debug, zbus::DBusError)]
#[zbus(prefix = "de.thueringen.thvc.node1.Error")]
pub enum BusError {
    #[zbus(error)]
    ZBus(zbus::Error),
    /// A VM spec or network document was rejected; nothing was changed.
    InvalidSpec(String),
    /// A method argument other than a spec is malformed (URL, digest, ...).
    InvalidArgument(String),
    NotFound(String),
    AlreadyExists(String),
    /// The VM is not in a state that allows the operation.
    InvalidState(String),
    /// The caller is neither root nor in the control group.
    AccessDenied(String),
    Network(String),
    Io(String),
    /// The VMM failed or refused a request (or serves no API socket).
    Vmm(String),
    Download(String),
    ChecksumMismatch(String),
    /// The same operation is already in progress.
    Busy(String),
    /// A disk or image is used by a VM (DeleteDisk, DeleteImage), or a disk by a running
    /// one (ResizeDisk).
    InUse(String),
    /// The disk store has not enough free space for an import.
    NoSpace(String),
    /// A start would exceed the node's memory or vCPU capacity.
    NoCapacity(String),
    /// An image was refused: unsupported format, a backing or data file, corrupt.
    InvalidImage(String),
    /// An ApplyVms job whose actions did not all succeed (in JobRemoved's message only).
    Incomplete(String),
    /// A host update check or install failed.
    Update(String),
}

impl From<NodeError> for BusError {
    fn from(e: NodeError) -> Self {
        match e {
            NodeError::InvalidSpec(m) => BusError::InvalidSpec(m),
            NodeError::InvalidArgument(m) => BusError::InvalidArgument(m),
            NodeError::NotFound(m) => BusError::NotFound(m),
            NodeError::AlreadyExists(m) => BusError::AlreadyExists(m),
            NodeError::InvalidState(m) => BusError::InvalidState(m),
            NodeError::Network(m) => BusError::Network(m),
            NodeError::Io(m) => BusError::Io(m),
            NodeError::Vmm(m) => BusError::Vmm(m),
            NodeError::Download(m) => BusError::Download(m),
            NodeError::ChecksumMismatch(m) => BusError::ChecksumMismatch(m),
            NodeError::Busy(m) => BusError::Busy(m),
            NodeError::InUse(m) => BusError::InUse(m),
            NodeError::NoSpace(m) => BusError::NoSpace(m),
            NodeError::NoCapacity(m) => BusError::NoCapacity(m),
            NodeError::InvalidImage(m) => BusError::InvalidImage(m),
            NodeError::Incomplete(m) => BusError::Incomplete(m),
            NodeError::Update(m) => BusError::Update(m),
        }
    }
}

/// The caller's uid, from the bus (SO_PEERCRED: cannot be forged).
async fn caller_uid(conn: &Connection, header: Option<&Header<'_>>) -> Result<u32, BusError> {
    let sender = header
        .and_then(|h| h.sender())
        .ok_or_else(|| BusError::AccessDenied("the call has no sender".to_owned()))?;
    let dbus = zbus::fdo::DBusProxy::new(conn).await?;
    dbus.get_connection_unix_user(sender.clone().into())
        .await
        .map_err(|e| BusError::AccessDenied(format!("cannot identify the caller {sender}: {e}")))
}

/// Refuses the call unless the sender may act in `role` (see [`crate::auth`]).
async fn authorize(
    conn: &Connection,
    header: Option<&Header<'_>>,
    node: &Node,
    role: Role,
    action: &str,
) -> Result<u32, BusError> {
    let uid = caller_uid(conn, header).await?;
    let groups = node.config().role_groups.clone();
    let allowed = tokio::task::spawn_blocking(move || groups.may(uid, role))
        .await
        .map_err(|e| BusError::Io(e.to_string()))?
        .map_err(|e| BusError::Io(e.to_string()))?;
    if allowed {
        tracing::debug!(uid, action, role = role.as_str(), "authorized");
        Ok(uid)
    } else {
        tracing::info!(uid, action, role = role.as_str(), "denied");
        let groups = &node.config().role_groups;
        Err(BusError::AccessDenied(format!(
            "{action} needs the {} role: root or membership in group {} or {}; uid {uid} has none",
            role.as_str(),
            groups.group(role),
            groups.control
        )))
    }
}

/// A state-changing call that was authorized: [`Audit::done`] records how it ended.
struct Audit {
    uid: u32,
    action: &'static str,
    object: String,
    socket: Option<std::path::PathBuf>,
}

impl Audit {
    /// The caller, action and object, for a job this call starts: its end is recorded
    /// under them.
    fn origin(&self) -> audit::Origin {
        audit::Origin {
            uid: self.uid,
            action: self.action,
            object: self.object.clone(),
        }
    }

    /// Records the call's outcome in the audit trail and passes the result on.
    fn done<T, E: Into<BusError>>(self, result: Result<T, E>) -> Result<T, BusError> {
        self.done_with(result, |_| None)
    }

    /// [`Audit::done`] for a call that may start a job: `job` tells its id from the result.
    fn done_with<T, E: Into<BusError>>(
        self,
        result: Result<T, E>,
        job: impl FnOnce(&T) -> Option<u32>,
    ) -> Result<T, BusError> {
        let result = result.map_err(Into::into);
        let error = result.as_ref().err().map(|e| e.to_string());
        audit::record(
            self.socket.as_deref(),
            &audit::Record {
                action: self.action,
                uid: self.uid,
                object: &self.object,
                outcome: if result.is_ok() {
                    audit::Outcome::Ok
                } else {
                    audit::Outcome::Failed
                },
                error: error.as_deref(),
                job: result.as_ref().ok().and_then(job),
                message: None,
            },
        );
        result
    }
}

/// The job id for [`Audit::done_with`].
fn job_id(job: &Arc<Job>) -> Option<u32> {
    Some(job.id)
}

/// A call that starts a job: authorized for `role` and audited as `action` on `object`
/// (its end is audited under the same origin), `start` given the origin; returns the job's
/// path.
async fn job_call<Fut>(
    conn: &Connection,
    header: &Header<'_>,
    node: &Node,
    (role, action, object): (Role, &'static str, &str),
    start: impl FnOnce(audit::Origin) -> Fut,
) -> Result<OwnedObjectPath, BusError>
where
    Fut: std::future::Future<Output = Result<Arc<Job>, NodeError>>,
{
    let audit = authorize_change(conn, Some(header), node, role, action, object).await?;
    let origin = audit.origin();
    let job = audit.done_with(start(origin).await, job_id)?;
    owned_path(&job.path)
}

/// [`authorize`] for a state-changing call on `object` (a VM, image, disk; empty for the
/// node): a refusal is recorded in the audit trail, an authorized call returns its [`Audit`].
async fn authorize_change(
    conn: &Connection,
    header: Option<&Header<'_>>,
    node: &Node,
    role: Role,
    action: &'static str,
    object: &str,
) -> Result<Audit, BusError> {
    let socket = node.config().journal_socket.clone();
    match authorize(conn, header, node, role, action).await {
        Ok(uid) => Ok(Audit {
            uid,
            action,
            object: object.to_owned(),
            socket,
        }),
        Err(e) => {
            if let BusError::AccessDenied(m) = &e {
                let uid = caller_uid(conn, header).await.unwrap_or(u32::MAX);
                audit::record(
                    socket.as_deref(),
                    &audit::Record {
                        action,
                        uid,
                        object,
                        outcome: audit::Outcome::Denied,
                        error: Some(m),
                        job: None,
                        message: None,
                    },
                );
            }
            Err(e)
        }
    }
}

/// systemd-timedated, for Manager.TimeSynchronized.
#[zbus::proxy(
    interface = "org.freedesktop.timedate1",
    default_service = "org.freedesktop.timedate1",
    default_path = "/org/freedesktop/timedate1"
)]
trait Timedate {
    #[zbus(property(emits_changed_signal = "false"), name = "NTPSynchronized")]
    fn ntp_synchronized(&self) -> zbus::Result<bool>;
}

/// timedated's NTPSynchronized; false (logged) when it does not answer within 2 s.
async fn ntp_synchronized(conn: &Connection) -> bool {
    let ask = async {
        TimedateProxy::builder(conn)
            .cache_properties(zbus::proxy::CacheProperties::No)
            .build()
            .await?
            .ntp_synchronized()
            .await
    };
    match tokio::time::timeout(std::time::Duration::from_secs(2), ask).await {
        Ok(Ok(synced)) => synced,
        Ok(Err(e)) => {
            tracing::debug!("timedated: {e}; reporting the clock as not synchronised");
            false
        }
        Err(_) => {
            tracing::warn!(
                "timedated did not answer within 2 s; reporting the clock as not synchronised"
            );
            false
        }
    }
}

fn owned_path(p: &str) -> Result<OwnedObjectPath, BusError> {
    OwnedObjectPath::try_from(p.to_owned()).map_err(|e| BusError::ZBus(e.into()))
}

pub struct Manager {
    node: Arc<Node>,
    failed_versions: Arc<hostinfo::FailedVersions>,
}

impl Manager {
    pub fn new(node: Arc<Node>) -> Self {
        let c = node.config();
        let failed_versions = Arc::new(hostinfo::FailedVersions::new(
            &c.esp,
            &c.os_release,
            &c.layout.failed_versions_file(),
        ));
        Manager {
            node,
            failed_versions,
        }
    }
}

#[interface(name = "de.thueringen.thvc.node1.Manager")]
impl Manager {
    #[zbus(property(emits_changed_signal = "false"))]
    fn hostname(&self) -> String {
        hostinfo::hostname()
    }

    #[zbus(property(emits_changed_signal = "const"))]
    fn version(&self) -> String {
        env!("CARGO_PKG_VERSION").to_owned()
    }

    #[zbus(property(emits_changed_signal = "false"))]
    fn kvm_available(&self) -> bool {
        hostinfo::kvm_available()
    }

    /// Whether the host's clock is synchronised, as systemd-timedated judges it
    /// (`NTPSynchronized`: the kernel's NTP state from adjtimex, set by chrony or
    /// systemd-timesyncd once they discipline the clock). Asked over the bus, timedated
    /// starting on demand, rather than with adjtimex here: the agent's unit keeps
    /// ProtectClock=, whose filter refuses adjtimex even for reads. False when timedated
    /// does not answer within 2 s.
    #[zbus(property(emits_changed_signal = "false"))]
    async fn time_synchronized(&self, #[zbus(connection)] conn: &Connection) -> bool {
        ntp_synchronized(conn).await
    }

    #[zbus(property(emits_changed_signal = "const"))]
    fn cpus(&self) -> u32 {
        hostinfo::cpus()
    }

    #[zbus(property(emits_changed_signal = "const"))]
    fn memory_bytes(&self) -> u64 {
        hostinfo::memory_bytes()
    }

    #[zbus(property(emits_changed_signal = "false"))]
    fn memory_available_bytes(&self) -> u64 {
        hostinfo::memory_available_bytes()
    }

    #[zbus(property(emits_changed_signal = "const"))]
    fn image_version(&self) -> String {
        hostinfo::image_version(&self.node.config().os_release)
    }

    /// The image versions on this node's disks (the booted one and what an update
    /// installed beside it), oldest first.
    #[zbus(property(emits_changed_signal = "false"))]
    fn installed_versions(&self) -> Vec<String> {
        let c = self.node.config();
        hostinfo::installed_versions(&c.os_release, &c.sys_block)
    }

    /// The image versions systemd-boot rolled back from (boot-counted UKIs on the ESP with
    /// no tries left): (version, boot attempts, the boot that came back without it in µs
    /// since the epoch), oldest first.
    #[zbus(property(emits_changed_signal = "false"))]
    async fn failed_versions(&self) -> Vec<(String, u64, u64)> {
        let failed = self.failed_versions.clone();
        tokio::task::spawn_blocking(move || failed.read())
            .await
            .unwrap_or_default()
    }

    /// The firmware's Secure Boot state: "enabled (user)", "disabled (setup)", ...,
    /// "unsupported" (bootctl's words; image/README.md, "Secure Boot").
    #[zbus(property(emits_changed_signal = "const"))]
    fn secure_boot(&self) -> String {
        hostinfo::secure_boot(&self.node.config().efivars)
    }

    /// The public half of the node's TPM2 storage root key (PEM): the TPM2's identity for
    /// the fleet's records, and what `systemd-cryptenroll --tpm2-device-key` enrolls a
    /// volume to without the node; empty without a TPM2.
    #[zbus(property(emits_changed_signal = "false"))]
    fn tpm_srk_public_key(&self) -> String {
        hostinfo::tpm2_srk_public_key(&self.node.config().tpm2_srk)
    }

    /// /var's recovery key in a CMS envelope (PEM) for the operator's escrow certificate,
    /// for the control plane's escrow; empty when the node has none.
    #[zbus(property(emits_changed_signal = "false"))]
    fn var_recovery_key(&self) -> String {
        hostinfo::var_recovery_key(&self.node.config().var_recovery_key)
    }

    /// The PCR signing key /var and the credentials are sealed to (SHA-256 of its public key,
    /// hex; empty before the first rollover check): a fleet rotating that key publishes
    /// releases signed by the new key alone once every node reports it.
    #[zbus(property(emits_changed_signal = "false"))]
    fn pcr_key(&self) -> String {
        hostinfo::pcr_key(&self.node.config().pcr_key)
    }

    /// A provisioning boot: Secure Boot off and no /var on the disk yet, so /var is in
    /// memory and nothing of this boot is kept (VMs and disks made now are lost): the
    /// control plane places no workloads here until the node has booted with Secure Boot.
    #[zbus(property(emits_changed_signal = "false"))]
    fn provisioning(&self) -> bool {
        hostinfo::provisioning(&self.node.config().provisioning_flag)
    }

    #[zbus(property)]
    fn network_state(&self) -> String {
        self.node.network_state()
    }

    /// vCPUs of the running and autostart VMs (and starts being admitted).
    #[zbus(property(emits_changed_signal = "false"))]
    fn allocated_vcpus(&self) -> u64 {
        self.node.capacity().vcpus_allocated
    }

    /// vCPUs the node gives its VMs: host CPUs times the overcommit ratio.
    #[zbus(property(emits_changed_signal = "false"))]
    fn vcpu_capacity(&self) -> u64 {
        self.node.capacity().vcpus_capacity
    }

    /// Memory (MiB) of the running and autostart VMs (and starts being admitted).
    #[zbus(property(emits_changed_signal = "false"))]
    fn allocated_memory_mib(&self) -> u64 {
        self.node.capacity().memory_allocated_mib
    }

    /// Memory (MiB) the node gives its VMs: host RAM minus the host's reserve (never
    /// overcommitted).
    #[zbus(property(emits_changed_signal = "false"))]
    fn memory_capacity_mib(&self) -> u64 {
        self.node.capacity().memory_capacity_mib
    }

    /// Free bytes in the image store's file system.
    #[zbus(property(emits_changed_signal = "false"))]
    async fn image_store_free_bytes(&self) -> u64 {
        self.node.store_free_bytes().await.0
    }

    /// Free bytes in the disk store's file system.
    #[zbus(property(emits_changed_signal = "false"))]
    async fn disk_store_free_bytes(&self) -> u64 {
        self.node.store_free_bytes().await.1
    }

    /// True while the node is drained: no VM starts (see Drain).
    #[zbus(property)]
    fn drained(&self) -> bool {
        self.node.is_drained()
    }

    /// Drains the node: from now on no VM starts (persisted: the node stays drained across
    /// agent restarts and reboots, and autostart starts nothing); a drain job shuts every
    /// running VM down gracefully, in parallel, and stops those still running after
    /// `timeout_seconds`. Returns the job's path at once; JobRemoved tells when every VM is
    /// down. Draining a drained node starts another drain job.
    #[zbus(out_args("job"))]
    async fn drain(
        &self,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] conn: &Connection,
        timeout_seconds: u64,
    ) -> Result<OwnedObjectPath, BusError> {
        job_call(
            conn,
            &header,
            &self.node,
            (Role::Host, "Drain", ""),
            |origin| self.node.drain(timeout_seconds, origin),
        )
        .await
    }

    /// Drains the node as Drain does, but live-migrates every running VM to node `target`
    /// instead of shutting it down, one after the other; a migration still running after
    /// `timeout_seconds` is canceled. A VM that cannot move keeps running here and the job
    /// fails naming it. Returns the job's path at once: its `Progress` counts the VMs, its
    /// `Status` shows the migration in progress, its `Cancel` ends that one and skips the
    /// rest.
    #[zbus(out_args("job"))]
    async fn drain_to(
        &self,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] conn: &Connection,
        timeout_seconds: u64,
        target: String,
    ) -> Result<OwnedObjectPath, BusError> {
        job_call(
            conn,
            &header,
            &self.node,
            (Role::Host, "DrainTo", &target),
            |origin| self.node.drain_to(timeout_seconds, &target, origin),
        )
        .await
    }

    /// Checks for (`dry_run`) or installs a host image update from `url` ("": the node's
    /// configured update server) as a job: returns the job's path at once; JobRemoved's
    /// message says which version was found or installed (booted at the next reboot), or
    /// that none is newer. One update at a time (Busy).
    #[zbus(out_args("job"))]
    async fn update(
        &self,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] conn: &Connection,
        url: String,
        dry_run: bool,
    ) -> Result<OwnedObjectPath, BusError> {
        let (what, action) = if dry_run {
            ("UpdateCheck", UpdateAction::Check)
        } else {
            ("Update", UpdateAction::Install)
        };
        job_call(
            conn,
            &header,
            &self.node,
            (Role::Host, what, &url),
            |origin| self.node.start_update_job(&url, action, origin),
        )
        .await
    }

    /// Reboots the host as a job: no VM starts from now on, every running VM is shut down
    /// gracefully and stopped after `timeout_seconds`, then the host reboots. VMs with
    /// autostart start again on the next boot. The job fails (and starts are allowed
    /// again) if not every VM went down or the reboot could not start.
    #[zbus(out_args("job"))]
    async fn reboot(
        &self,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] conn: &Connection,
        timeout_seconds: u64,
    ) -> Result<OwnedObjectPath, BusError> {
        job_call(
            conn,
            &header,
            &self.node,
            (Role::Host, "Reboot", ""),
            |origin| self.node.start_reboot_job(timeout_seconds, origin),
        )
        .await
    }

    /// Lifts the drain: starts are allowed again. Starts nothing itself.
    async fn undrain(
        &self,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] conn: &Connection,
    ) -> Result<(), BusError> {
        authorize_change(conn, Some(&header), &self.node, Role::Host, "Undrain", "")
            .await?
            .done(self.node.undrain().await)
    }

    /// All VMs: (name, state, object path).
    #[zbus(out_args("vms"))]
    async fn list_vms(&self) -> Vec<(String, String, OwnedObjectPath)> {
        let mut out = Vec::new();
        for vm in self.node.list() {
            if let Ok(p) = owned_path(&vm.path) {
                out.push((vm.name.clone(), vm.state().as_str().to_owned(), p));
            }
        }
        out
    }

    #[zbus(out_args("path"))]
    async fn get_vm(&self, name: String) -> Result<OwnedObjectPath, BusError> {
        let vm = self.node.get(&name)?;
        owned_path(&vm.path)
    }

    #[zbus(out_args("path"))]
    async fn create_vm(
        &self,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] conn: &Connection,
        name: String,
        spec_json: String,
    ) -> Result<OwnedObjectPath, BusError> {
        let audit = authorize_change(
            conn,
            Some(&header),
            &self.node,
            Role::VmControl,
            "CreateVm",
            &name,
        )
        .await?;
        let vm = audit.done(self.node.create(&name, &spec_json).await)?;
        owned_path(&vm.path)
    }

    /// Live-migrates running VM `name` to node `target` (a host name for this node's
    /// migration ssh configuration) as a job: returns the job's path at once; its
    /// `Progress` and `Status` follow the migration, its `Cancel` ends it with the VM still
    /// running here; JobRemoved tells the result. Once the guest runs on the target the VM
    /// is deleted here (VmRemoved) and exists there. Disks must be on storage both nodes
    /// reach under the same path.
    #[zbus(out_args("job"))]
    async fn migrate_vm(
        &self,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] conn: &Connection,
        name: String,
        target: String,
    ) -> Result<OwnedObjectPath, BusError> {
        let call = (Role::VmControl, "MigrateVm", name.as_str());
        job_call(conn, &header, &self.node, call, |origin| {
            self.node.start_migrate_job(&name, &target, origin)
        })
        .await
    }

    /// The receiving end of another node's MigrateVm, called by `thvc-nodeagent
    /// migrate-receive` (the forced command of the thvc-migrate SSH account) with `link`, a
    /// stream socket to the SSH connection: creates VM `name` from `spec_json`, starts its
    /// VMM waiting for the guest and relays the link to it. Returns once the guest runs
    /// here, the link shut down; when it fails, the VM is removed again.
    #[zbus(out_args("result"))]
    async fn receive_vm(
        &self,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] conn: &Connection,
        name: String,
        spec_json: String,
        link: zbus::zvariant::OwnedFd,
    ) -> Result<String, BusError> {
        let audit = authorize_change(
            conn,
            Some(&header),
            &self.node,
            Role::Migrate,
            "ReceiveVm",
            &name,
        )
        .await?;
        audit.done(self.node.receive(&name, &spec_json, link.into()).await)
    }

    async fn delete_vm(
        &self,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] conn: &Connection,
        name: String,
    ) -> Result<(), BusError> {
        authorize_change(
            conn,
            Some(&header),
            &self.node,
            Role::VmControl,
            "DeleteVm",
            &name,
        )
        .await?
        .done(self.node.delete(&name).await)
    }

    /// Validates `document_json`, plans the changes and, unless `dry_run`, applies them.
    /// Returns the plan as JSON.
    #[zbus(out_args("plan_json"))]
    async fn apply_network(
        &self,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] conn: &Connection,
        document_json: String,
        dry_run: bool,
    ) -> Result<String, BusError> {
        if dry_run {
            return Ok(self.node.apply_network(&document_json, true).await?);
        }
        let audit = authorize_change(
            conn,
            Some(&header),
            &self.node,
            Role::Network,
            "ApplyNetwork",
            "",
        )
        .await?;
        audit.done(self.node.apply_network(&document_json, false).await)
    }

    /// Declarative VMs (see `node::apply`): checks the document, plans what makes the node
    /// match it and, unless `dry_run`, starts a job that carries the plan out. Returns the
    /// plan as JSON and the job's path ("/" for a dry run or when the node matches already);
    /// JobRemoved's message is the plan with each action's result.
    #[zbus(out_args("plan_json", "job"))]
    async fn apply_vms(
        &self,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] conn: &Connection,
        document_json: String,
        dry_run: bool,
    ) -> Result<(String, OwnedObjectPath), BusError> {
        let plan = if dry_run {
            // The plan names the VMs' spec fields that differ: for the control roles only.
            let uid =
                authorize(conn, Some(&header), &self.node, Role::VmControl, "ApplyVms").await?;
            let origin = audit::Origin {
                uid,
                action: "ApplyVms",
                object: String::new(),
            };
            self.node.apply_vms(&document_json, true, origin).await?
        } else {
            let audit = authorize_change(
                conn,
                Some(&header),
                &self.node,
                Role::VmControl,
                "ApplyVms",
                "",
            )
            .await?;
            let origin = audit.origin();
            audit.done_with(
                self.node.apply_vms(&document_json, false, origin).await,
                |plan| plan.job_id,
            )?
        };
        let job = if plan.job.is_empty() {
            "/"
        } else {
            plan.job.as_str()
        };
        Ok((plan.to_json(), owned_path(job)?))
    }

    /// The host network as observed now, as a document (links the node manages and
    /// physical links).
    #[zbus(out_args("document_json"))]
    async fn get_network(&self) -> Result<String, BusError> {
        Ok(self.node.get_network().await?)
    }

    /// Downloads `url` into the image store, verifying `sha256`; returns the image's path.
    #[zbus(out_args("image_path"))]
    async fn pull_image(
        &self,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] conn: &Connection,
        url: String,
        sha256: String,
    ) -> Result<String, BusError> {
        let audit = authorize_change(
            conn,
            Some(&header),
            &self.node,
            Role::Images,
            "PullImage",
            &url,
        )
        .await?;
        let path = audit.done(self.node.pull_image(&url, &sha256).await)?;
        Ok(path.display().to_string())
    }

    /// PullImage as a job: returns the job's path at once; its `Progress` shows the bytes,
    /// its `Cancel` stops the download, `JobRemoved` tells the result.
    #[zbus(out_args("job"))]
    async fn pull_image_job(
        &self,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] conn: &Connection,
        url: String,
        sha256: String,
    ) -> Result<OwnedObjectPath, BusError> {
        job_call(
            conn,
            &header,
            &self.node,
            (Role::Images, "PullImageJob", &url),
            |origin| self.node.start_pull_job(&url, &sha256, origin),
        )
        .await
    }

    /// Images in the store: (name, size in bytes, verified SHA-256 or "").
    #[zbus(out_args("images"))]
    async fn list_images(&self) -> Result<Vec<(String, u64, String)>, BusError> {
        Ok(self
            .node
            .list_images()
            .await?
            .into_iter()
            .map(|i| (i.name, i.size, i.sha256))
            .collect())
    }

    /// Deletes image `name` (as ListImages shows it) and its digest; refused (`InUse`)
    /// while any VM's spec uses it.
    async fn delete_image(
        &self,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] conn: &Connection,
        name: String,
    ) -> Result<(), BusError> {
        authorize_change(
            conn,
            Some(&header),
            &self.node,
            Role::Images,
            "DeleteImage",
            &name,
        )
        .await?
        .done(self.node.delete_image(&name).await)
    }

    /// Makes disk `name` in the disk store from `options_json`: `{"size": BYTES}` (empty,
    /// sparse) or `{"from_image": IMAGE, "size": BYTES?}` (a raw copy of a raw or qcow2
    /// image, grown to `size`). Returns the disk as JSON (name, path, size, allocated,
    /// source_format, method).
    #[zbus(out_args("disk_json"))]
    async fn create_disk(
        &self,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] conn: &Connection,
        name: String,
        options_json: String,
    ) -> Result<String, BusError> {
        authorize_change(
            conn,
            Some(&header),
            &self.node,
            Role::Images,
            "CreateDisk",
            &name,
        )
        .await?
        .done(self.node.create_disk(&name, &options_json).await)
    }

    /// Grows disk `name` to `size` bytes; refused while a running VM uses it.
    async fn resize_disk(
        &self,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] conn: &Connection,
        name: String,
        size: u64,
    ) -> Result<(), BusError> {
        authorize_change(
            conn,
            Some(&header),
            &self.node,
            Role::Images,
            "ResizeDisk",
            &name,
        )
        .await?
        .done(self.node.resize_disk(&name, size).await)
    }

    /// Deletes disk `name`; refused while any VM's spec names it.
    async fn delete_disk(
        &self,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] conn: &Connection,
        name: String,
    ) -> Result<(), BusError> {
        authorize_change(
            conn,
            Some(&header),
            &self.node,
            Role::Images,
            "DeleteDisk",
            &name,
        )
        .await?
        .done(self.node.delete_disk(&name).await)
    }

    /// Disks in the store as JSON: [{name, size, allocated, users: [VM names]}].
    #[zbus(out_args("disks_json"))]
    async fn list_disks(&self) -> Result<String, BusError> {
        Ok(self.node.list_disks().await?)
    }

    #[zbus(signal)]
    async fn vm_new(
        emitter: &SignalEmitter<'_>,
        name: &str,
        path: ObjectPath<'_>,
    ) -> zbus::Result<()>;

    /// Jobs in progress: (id, operation, VM name or image URL, state, job path).
    #[zbus(out_args("jobs"))]
    async fn list_jobs(&self) -> Vec<(u32, String, String, String, OwnedObjectPath)> {
        self.node
            .jobs()
            .iter()
            .filter_map(|j| {
                let path = OwnedObjectPath::try_from(j.path.clone()).ok()?;
                Some((
                    j.id,
                    j.operation.as_str().to_owned(),
                    if j.vm.is_empty() {
                        j.image_url.clone()
                    } else {
                        j.vm.clone()
                    },
                    j.state().to_owned(),
                    path,
                ))
            })
            .collect()
    }

    /// A job ended: result `done`, `failed` or `canceled`, with the error message, or when
    /// done: a pull-image job's image path, an apply-vms job's plan with each action's
    /// result, an update job's version found or installed, a reboot job's "every VM is
    /// down"; empty for VM and drain jobs.
    #[zbus(signal)]
    async fn job_removed(
        emitter: &SignalEmitter<'_>,
        id: u32,
        path: ObjectPath<'_>,
        result: &str,
        message: &str,
    ) -> zbus::Result<()>;

    #[zbus(signal)]
    async fn vm_removed(
        emitter: &SignalEmitter<'_>,
        name: &str,
        path: ObjectPath<'_>,
    ) -> zbus::Result<()>;
}

pub struct VmObject {
    node: Arc<Node>,
    vm: Arc<Vm>,
}

impl VmObject {
    async fn job(
        &self,
        conn: &Connection,
        header: &Header<'_>,
        operation: JobOperation,
        action: &'static str,
    ) -> Result<OwnedObjectPath, BusError> {
        let call = (Role::VmControl, action, self.vm.name.as_str());
        job_call(conn, header, &self.node, call, |origin| {
            self.node.start_job(&self.vm.name, operation, origin)
        })
        .await
    }
}

#[interface(name = "de.thueringen.thvc.node1.Vm")]
impl VmObject {
    #[zbus(property(emits_changed_signal = "const"))]
    fn name(&self) -> String {
        self.vm.name.clone()
    }

    /// The SMBIOS system UUID the guest sees (lower-case 8-4-4-4-12); fixed for the VM's
    /// lifetime.
    #[zbus(property(emits_changed_signal = "const"))]
    fn uuid(&self) -> String {
        self.vm.uuid()
    }

    /// defined, starting, running, paused, stopping, stopped or failed.
    #[zbus(property)]
    fn state(&self) -> String {
        self.vm.state().as_str().to_owned()
    }

    /// Why the VM is in its state (failure reason, "the guest powered off", ...); may be empty.
    #[zbus(property)]
    fn state_reason(&self) -> String {
        self.vm.state_reason()
    }

    /// The VM spec as JSON (with generated MAC addresses filled in). The kernel command line
    /// and cloud-init user data may carry secrets: callers without the vm-control role (and
    /// PropertiesChanged signals, which every reader receives) get the empty string instead.
    /// Empty rather than an error, so GetAll and GetManagedObjects keep working for readers.
    #[zbus(property)]
    async fn spec(
        &self,
        #[zbus(header)] header: Option<Header<'_>>,
        #[zbus(connection)] conn: &Connection,
    ) -> String {
        if header.is_none() {
            return String::new();
        }
        match authorize(
            conn,
            header.as_ref(),
            &self.node,
            Role::VmControl,
            "reading Spec",
        )
        .await
        {
            Ok(_) => self.vm.spec_json(),
            Err(_) => String::new(),
        }
    }

    #[zbus(property)]
    fn autostart(&self) -> bool {
        self.vm.autostart()
    }

    #[zbus(property)]
    async fn set_autostart(
        &self,
        value: bool,
        #[zbus(header)] header: Option<Header<'_>>,
        #[zbus(connection)] conn: &Connection,
    ) -> Result<(), zbus::fdo::Error> {
        let audit = authorize_change(
            conn,
            header.as_ref(),
            &self.node,
            Role::VmControl,
            "SetAutostart",
            &self.vm.name,
        )
        .await
        .map_err(to_fdo)?;
        audit
            .done(self.node.set_autostart(&self.vm.name, value).await)
            .map_err(to_fdo)
    }

    /// Starts the VM; returns once it runs. Of a running VM: succeeds, nothing done.
    async fn start(
        &self,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] conn: &Connection,
    ) -> Result<(), BusError> {
        authorize_change(
            conn,
            Some(&header),
            &self.node,
            Role::VmControl,
            "Start",
            &self.vm.name,
        )
        .await?
        .done(self.node.start(&self.vm.name).await)
    }

    /// Presses the ACPI power button, waits for the guest to power off (up to the agent's
    /// shutdown timeout), then stops the VMM. Of a VM that is down: succeeds, nothing done.
    async fn shutdown(
        &self,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] conn: &Connection,
    ) -> Result<(), BusError> {
        authorize_change(
            conn,
            Some(&header),
            &self.node,
            Role::VmControl,
            "Shutdown",
            &self.vm.name,
        )
        .await?
        .done(self.node.stop(&self.vm.name, true).await)
    }

    /// Stops the VMM (SIGTERM, then SIGKILL after 10 s); ends a Shutdown's wait for the
    /// guest. Of a VM that is down: succeeds, nothing done.
    async fn stop(
        &self,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] conn: &Connection,
    ) -> Result<(), BusError> {
        authorize_change(
            conn,
            Some(&header),
            &self.node,
            Role::VmControl,
            "Stop",
            &self.vm.name,
        )
        .await?
        .done(self.node.stop(&self.vm.name, false).await)
    }

    /// Start as a job: returns the job's path at once; `JobRemoved` tells the result.
    #[zbus(out_args("job"))]
    async fn start_job(
        &self,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] conn: &Connection,
    ) -> Result<OwnedObjectPath, BusError> {
        self.job(conn, &header, JobOperation::Start, "StartJob")
            .await
    }

    /// Stop as a job.
    #[zbus(out_args("job"))]
    async fn stop_job(
        &self,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] conn: &Connection,
    ) -> Result<OwnedObjectPath, BusError> {
        self.job(conn, &header, JobOperation::Stop, "StopJob").await
    }

    /// Shutdown as a job; a Stop (or StopJob) meanwhile ends its wait for the guest.
    #[zbus(out_args("job"))]
    async fn shutdown_job(
        &self,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] conn: &Connection,
    ) -> Result<OwnedObjectPath, BusError> {
        self.job(conn, &header, JobOperation::Shutdown, "ShutdownJob")
            .await
    }

    async fn pause(
        &self,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] conn: &Connection,
    ) -> Result<(), BusError> {
        authorize_change(
            conn,
            Some(&header),
            &self.node,
            Role::VmControl,
            "Pause",
            &self.vm.name,
        )
        .await?
        .done(self.node.pause(&self.vm.name).await)
    }

    async fn resume(
        &self,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] conn: &Connection,
    ) -> Result<(), BusError> {
        authorize_change(
            conn,
            Some(&header),
            &self.node,
            Role::VmControl,
            "Resume",
            &self.vm.name,
        )
        .await?
        .done(self.node.resume(&self.vm.name).await)
    }

    /// The VMM's own view of the VM (its API's `info` result), as JSON. Needs the vm-control
    /// role: it includes the kernel command line.
    #[zbus(out_args("json"))]
    async fn info(
        &self,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] conn: &Connection,
    ) -> Result<String, BusError> {
        authorize(conn, Some(&header), &self.node, Role::VmControl, "Info").await?;
        Ok(self.node.info(&self.vm.name).await?)
    }

    /// Up to 64 KiB of serial console output from `offset`, and the offset to ask for next.
    /// Offsets below the retained window resume at its start. Restricted like state changes:
    /// console output can contain secrets.
    #[zbus(out_args("data", "next_offset"))]
    async fn read_console(
        &self,
        #[zbus(header)] header: Header<'_>,
        #[zbus(connection)] conn: &Connection,
        offset: u64,
    ) -> Result<(Vec<u8>, u64), BusError> {
        authorize(
            conn,
            Some(&header),
            &self.node,
            Role::Console,
            "ReadConsole",
        )
        .await?;
        Ok(self.node.read_console(&self.vm.name, offset).await?)
    }
}

/// A property setter's error: zbus answers a Set with the standard errors only, so the
/// agent's error name goes into the message (`de.thueringen.thvc.node1.Error.NoCapacity:
/// ...`) and a refusal for capacity is LimitsExceeded.
fn to_fdo(e: BusError) -> zbus::fdo::Error {
    match e {
        BusError::AccessDenied(m) => zbus::fdo::Error::AccessDenied(m),
        e @ BusError::NoCapacity(_) => zbus::fdo::Error::LimitsExceeded(e.to_string()),
        BusError::ZBus(e) => zbus::fdo::Error::Failed(e.to_string()),
        other => zbus::fdo::Error::Failed(other.to_string()),
    }
}

/// Serves the manager and the object manager on `conn`, and from then on the node's events
/// (VM objects come and go, signals, PropertiesChanged): see [`crate::node::events`].
pub async fn serve(conn: &Connection, node: Arc<Node>) -> zbus::Result<()> {
    let server = conn.object_server();
    let manager = Manager::new(node.clone());
    // Once at start, so a rollback is logged at boot even if nobody reads the property.
    let failed = manager.failed_versions.clone();
    tokio::task::spawn_blocking(move || failed.read());
    server.at(MANAGER_PATH, manager).await?;
    server.at(MANAGER_PATH, zbus::fdo::ObjectManager).await?;
    let events = node.subscribe();
    tokio::spawn(pump_events(conn.clone(), Arc::downgrade(&node), events));
    Ok(())
}

/// Turns the node's events into D-Bus objects and signals, in order, until the node is gone.
async fn pump_events(conn: Connection, node: std::sync::Weak<Node>, mut events: EventStream) {
    while let Some((event, ack)) = events.next().await {
        tracing::trace!(?event, "node event");
        match event {
            NodeEvent::VmAdded(vm) => {
                let Some(node) = node.upgrade() else { break };
                ack.done(
                    register_vm(&conn, node, vm)
                        .await
                        .map_err(|e| format!("registering the D-Bus object: {e}")),
                );
            }
            NodeEvent::VmAnnounced(vm) => emit_manager_signal(&conn, &vm, true).await,
            NodeEvent::VmRemoved(vm) => unregister_vm(&conn, &vm).await,
            NodeEvent::VmChanged(vm, props) => emit_vm_changed(&conn, &vm, &props).await,
            NodeEvent::NetworkStateChanged => emit_network_state_changed(&conn).await,
            NodeEvent::DrainedChanged => emit_drained_changed(&conn).await,
            NodeEvent::JobNew(job) => ack.done(
                jobs::register_job(&conn, node.upgrade(), job)
                    .await
                    .map_err(|e| format!("registering the job object: {e}")),
            ),
            NodeEvent::JobChanged(job) => jobs::job_state_changed(&conn, &job).await,
            NodeEvent::JobRemoved(job, result, message) => {
                jobs::job_removed(&conn, &job, result, &message).await
            }
        }
    }
}

async fn register_vm(conn: &Connection, node: Arc<Node>, vm: Arc<Vm>) -> zbus::Result<()> {
    let path = vm.path.clone();
    conn.object_server()
        .at(path.as_str(), VmObject { node, vm })
        .await?;
    Ok(())
}

async fn unregister_vm(conn: &Connection, vm: &Vm) {
    if let Err(e) = conn
        .object_server()
        .remove::<VmObject, _>(vm.path.as_str())
        .await
    {
        tracing::warn!(vm = %vm.name, "removing D-Bus object: {e}");
    }
    emit_manager_signal(conn, vm, false).await;
}

async fn emit_manager_signal(conn: &Connection, vm: &Vm, added: bool) {
    let result = async {
        let emitter = SignalEmitter::new(conn, MANAGER_PATH)?;
        let path = ObjectPath::try_from(vm.path.as_str())?;
        if added {
            Manager::vm_new(&emitter, &vm.name, path).await
        } else {
            Manager::vm_removed(&emitter, &vm.name, path).await
        }
    }
    .await;
    if let Err(e) = result {
        tracing::warn!(vm = %vm.name, "emitting signal: {e}");
    }
}

/// PropertiesChanged for the given VM properties, with their new values.
async fn emit_vm_changed(conn: &Connection, vm: &Vm, props: &[VmProperty]) {
    let state = vm.state().as_str().to_owned();
    let reason = vm.state_reason();
    let autostart = vm.autostart();
    let mut changed: HashMap<&str, Value<'_>> = HashMap::new();
    // Spec is only invalidated: every reader receives signals, and it may carry secrets;
    // a vm-control caller re-reads it (Get), which checks the role.
    let mut invalidated: Vec<&str> = Vec::new();
    for p in props {
        match p {
            VmProperty::State => {
                changed.insert("State", Value::from(state.as_str()));
            }
            VmProperty::StateReason => {
                changed.insert("StateReason", Value::from(reason.as_str()));
            }
            VmProperty::Spec => invalidated.push("Spec"),
            VmProperty::Autostart => {
                changed.insert("Autostart", Value::from(autostart));
            }
        }
    }
    let result = async {
        let emitter = SignalEmitter::new(conn, vm.path.as_str())?;
        let iface = zbus::names::InterfaceName::try_from(VM_INTERFACE)?;
        zbus::fdo::Properties::properties_changed(&emitter, iface, changed, invalidated[..].into())
            .await
    }
    .await;
    if let Err(e) = result {
        tracing::warn!(vm = %vm.name, "emitting PropertiesChanged: {e}");
    }
}

async fn emit_drained_changed(conn: &Connection) {
    let result = async {
        let iface = conn
            .object_server()
            .interface::<_, Manager>(MANAGER_PATH)
            .await?;
        let manager = iface.get().await;
        manager.drained_changed(iface.signal_emitter()).await
    }
    .await;
    if let Err(e) = result {
        tracing::warn!("emitting Drained change: {e}");
    }
}

async fn emit_network_state_changed(conn: &Connection) {
    let result = async {
        let iface = conn
            .object_server()
            .interface::<_, Manager>(MANAGER_PATH)
            .await?;
        let manager = iface.get().await;
        manager.network_state_changed(iface.signal_emitter()).await
    }
    .await;
    if let Err(e) = result {
        tracing::warn!("emitting NetworkState change: {e}");
    }
}
