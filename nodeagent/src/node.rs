//! The node: the table of VMs, their lifecycle state machine, and the operations the D-Bus
//! API exposes. The bus layer ([`crate::bus`]) only translates; all decisions are made here.
//!
//! ```text
//!   defined ──Start──▶ starting ──ready──▶ running ◀──Resume── paused
//!      ▲                 │   ▲               │  └────Pause────▶  │
//!      │                 │   └─exit 3 (reboot: restart)          │
//!    Create              ▼                   ▼                   ▼
//!                 failed ◀─unexpected exit── stopping ◀─Stop/Shutdown
//!                                            └──exit──▶ stopped
//! ```
//! Concurrency: one `ops` mutex per VM serializes lifecycle operations; the short `status`
//! mutex guards the observable fields so reads (ListVms, properties) never wait for a slow
//! Shutdown. No call may wait behind another VM's operation, so the locks are taken in one
//! order and the shared ones are never held while waiting:
//!
//! 1. `Vm::ops` (may be held for a whole Shutdown: 60 s and more),
//! 2. `Vm::spec_write`,
//! 3. `Node::membership`: serializes changes to the set of VMs (CreateVm, and DeleteVm once
//!    it holds the VM's locks), so 50 concurrent CreateVm calls see one consistent table,
//!    set of D-Bus objects and set of files; held for file writes and object registration,
//!    never while waiting for a VM's operation,
//! 4. the VM table (`Node::vms`), a plain mutex held only to read or change the map: every
//!    call (ListVms, GetVm, any call on any VM) looks VMs up through it, so it is never held
//!    across an `.await`.
//!
//! Blocking file work (fsync, canonicalize, directory removal) runs on tokio's blocking
//! threads ([`blocking`]), not on the few threads that answer the bus.

mod disk_ops;

use std::collections::{BTreeMap, HashSet, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex as StdMutex, OnceLock, Weak};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use thiserror::Error;
use tokio::sync::{watch, Mutex, Notify};

use crate::cloudinit::SeedFiles;
use crate::console;
use crate::fsutil;
use crate::images::{self, ImageError, ImageInfo};
use crate::layout::Layout;
use crate::names;
use crate::network::{NetError, Network, TapRequest};
use crate::runner::{describe_exit, Adoption, ExitFuture, ExitOutcome, LaunchSpec, VmRunner};
use crate::seed;
use crate::spec::{self, Boot, ResolvedSpec, Stores, VmSpec, VmmRunParams};
use crate::vmm_api::{self, Request, VmmApiError};
use crate::vmm_user::VmmUser;

/// Reboots tolerated within [`REBOOT_WINDOW`] before a VM is declared failed (a guest that
/// panics with panic=N on boot would otherwise loop forever).
const MAX_REBOOTS: usize = 10;
const REBOOT_WINDOW: Duration = Duration::from_secs(60);
/// How often console logs of running VMs are checked for trimming.
const CONSOLE_TRIM_INTERVAL: Duration = Duration::from_secs(2);
/// The systemd credential holding the node's network document, applied at start.
pub const NETWORK_CREDENTIAL: &str = "thvc.network";

#[derive(Debug, Error)]
pub enum NodeError {
    #[error("{0}")]
    InvalidSpec(String),
    #[error("{0}")]
    InvalidArgument(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    AlreadyExists(String),
    #[error("{0}")]
    InvalidState(String),
    #[error("{0}")]
    Network(String),
    #[error("{0}")]
    Io(String),
    #[error("{0}")]
    Vmm(String),
    #[error("{0}")]
    Download(String),
    #[error("{0}")]
    ChecksumMismatch(String),
    #[error("{0}")]
    Busy(String),
    #[error("{0}")]
    InUse(String),
    #[error("{0}")]
    NoSpace(String),
    #[error("{0}")]
    InvalidImage(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum VmState {
    Defined,
    Starting,
    Running,
    Paused,
    Stopping,
    Stopped,
    Failed,
}

impl VmState {
    pub fn as_str(self) -> &'static str {
        match self {
            VmState::Defined => "defined",
            VmState::Starting => "starting",
            VmState::Running => "running",
            VmState::Paused => "paused",
            VmState::Stopping => "stopping",
            VmState::Stopped => "stopped",
            VmState::Failed => "failed",
        }
    }
    /// States in which no VMM process exists and the VM may be started or deleted.
    fn is_down(self) -> bool {
        matches!(self, VmState::Defined | VmState::Stopped | VmState::Failed)
    }
}

pub struct NodeConfig {
    pub layout: Layout,
    pub vmm_binary: PathBuf,
    /// UEFI firmware for VMs with `firmware: "uefi"` (`--firmware`); checked at every
    /// start of such a VM, so installing it later needs no agent restart.
    pub firmware: PathBuf,
    /// `qemu-img`, for images imported into the disk store (`--qemu-img`).
    pub qemu_img: PathBuf,
    /// The user the VMMs run as; it owns their TAPs so the unprivileged VMM can attach.
    pub vmm_user: VmmUser,
    /// Start the VMM with `--user` (the direct runner, asked for another user than the
    /// agent's); the systemd runner's unit sets the user itself.
    pub vmm_switches_user: bool,
    pub control_group: String,
    pub node_name: String,
    pub os_release: PathBuf,
    pub shutdown_timeout: Duration,
    pub start_timeout: Duration,
    /// After SIGTERM (and again after SIGKILL), how long to wait for the VMM to exit.
    pub stop_timeout: Duration,
}

/// Terminal state persisted in the run directory, so a restarted agent reports it truthfully
/// and does not autostart a VM an operator stopped in this boot.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct TerminalStatus {
    state: VmState,
    reason: String,
    #[serde(default)]
    operator_stopped: bool,
}

struct VmStatus {
    spec: VmSpec,
    state: VmState,
    reason: String,
    /// Incremented on every launch; exit notifications of older runs are ignored.
    generation: u64,
    /// Set while a VMM process (of `generation`) exists.
    process: bool,
    stop_requested: bool,
    reboots: VecDeque<Instant>,
    taps: Vec<String>,
    /// Set (under the ops lock) when the VM is deleted: callers that looked it up before
    /// and waited for the lock must not act on it.
    deleted: bool,
    /// A Shutdown is waiting for the guest to power off; a Stop cuts that wait short
    /// through `Vm::stop_now` instead of waiting behind it.
    awaiting_power_off: bool,
}

pub struct Vm {
    pub name: String,
    pub path: String,
    ops: Mutex<()>,
    spec_write: Mutex<()>,
    /// Wakes a Shutdown waiting for the guest (see `VmStatus::awaiting_power_off`).
    stop_now: Notify,
    status: StdMutex<VmStatus>,
    state_tx: watch::Sender<VmState>,
}

/// How a Shutdown's wait for the guest ended.
enum PowerOff {
    Done,
    TimedOut,
    CutShort,
}

/// Which VM properties changed, for PropertiesChanged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VmProperty {
    State,
    StateReason,
    Spec,
    Autostart,
}

impl Vm {
    fn new(name: &str, spec: VmSpec, state: VmState, reason: String) -> Arc<Vm> {
        let (state_tx, _) = watch::channel(state);
        Arc::new(Vm {
            name: name.to_owned(),
            path: names::vm_object_path(name),
            ops: Mutex::new(()),
            spec_write: Mutex::new(()),
            stop_now: Notify::new(),
            status: StdMutex::new(VmStatus {
                spec,
                state,
                reason,
                generation: 0,
                process: false,
                stop_requested: false,
                reboots: VecDeque::new(),
                taps: Vec::new(),
                deleted: false,
                awaiting_power_off: false,
            }),
            state_tx,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, VmStatus> {
        // A panic while holding this lock cannot leave the plain fields inconsistent.
        self.status.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn state(&self) -> VmState {
        self.lock().state
    }
    pub fn state_reason(&self) -> String {
        self.lock().reason.clone()
    }
    pub fn spec(&self) -> VmSpec {
        self.lock().spec.clone()
    }
    pub fn spec_json(&self) -> String {
        serde_json::to_string(&self.lock().spec).unwrap_or_default()
    }
    pub fn autostart(&self) -> bool {
        self.lock().spec.autostart
    }
    /// The SMBIOS system UUID (fixed at creation, or when a spec from before UUIDs was
    /// loaded).
    pub fn uuid(&self) -> String {
        self.lock().spec.uuid.clone().unwrap_or_default()
    }

    /// Ends the wait of a Shutdown for the guest, if one waits: it stops the VMM at once.
    /// True if one waited.
    fn cut_shutdown_short(&self) -> bool {
        let st = self.lock();
        if st.awaiting_power_off {
            // Under the status lock: the waiting Shutdown is registered for it.
            self.stop_now.notify_waiters();
        }
        st.awaiting_power_off
    }

    /// NotFound if the VM was deleted after the caller looked it up.
    fn ensure_exists(&self) -> Result<(), NodeError> {
        if self.lock().deleted {
            Err(NodeError::NotFound(format!(
                "VM {:?} was deleted",
                self.name
            )))
        } else {
            Ok(())
        }
    }
}

pub struct Node {
    cfg: NodeConfig,
    stores: Stores,
    runner: Arc<dyn VmRunner>,
    network: Network,
    /// Never held across an `.await` (see the module docs).
    vms: StdMutex<BTreeMap<String, Arc<Vm>>>,
    /// Serializes changes to the set of VMs (see the module docs).
    membership: Mutex<()>,
    bus: OnceLock<zbus::Connection>,
    pulls: StdMutex<HashSet<String>>,
    /// Disk names with an operation in progress (see `disk_ops`).
    disk_ops: StdMutex<HashSet<String>>,
    http: reqwest::Client,
    net_lock: Mutex<()>,
    network_state: StdMutex<String>,
    me: Weak<Node>,
}

fn io(e: impl std::fmt::Display) -> NodeError {
    NodeError::Io(e.to_string())
}

/// Runs blocking file work (fsync, canonicalize, directory removal) on tokio's blocking
/// threads: on the runtime's own threads it would stall every other call meanwhile.
async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> T + Send + 'static,
) -> Result<T, NodeError> {
    tokio::task::spawn_blocking(work)
        .await
        .map_err(|e| NodeError::Io(format!("blocking file operation did not complete: {e}")))
}

impl From<NetError> for NodeError {
    fn from(e: NetError) -> Self {
        match e {
            NetError::InvalidDocument(m) => NodeError::InvalidSpec(m),
            other => NodeError::Network(other.to_string()),
        }
    }
}

impl From<ImageError> for NodeError {
    fn from(e: ImageError) -> Self {
        let msg = e.to_string();
        match e {
            ImageError::BadUrl { .. } | ImageError::BadDigest(_) => NodeError::InvalidArgument(msg),
            ImageError::Conflict { .. } => NodeError::AlreadyExists(msg),
            ImageError::Checksum { .. } => NodeError::ChecksumMismatch(msg),
            ImageError::Download { .. } | ImageError::TooLarge { .. } => NodeError::Download(msg),
            ImageError::Fs(_) => NodeError::Io(msg),
        }
    }
}

fn vmm_err(vm: &str, e: VmmApiError) -> NodeError {
    NodeError::Vmm(format!("VM {vm}: {e}"))
}

impl Node {
    /// Creates the state directories and the node (no VMs loaded yet: see [`Node::recover`]).
    pub fn new(cfg: NodeConfig, runner: Arc<dyn VmRunner>) -> Result<Arc<Node>, NodeError> {
        let l = &cfg.layout;
        for (dir, mode) in [
            (l.state_dir.clone(), 0o755),
            (l.specs_dir(), 0o750),
            (l.images_dir(), 0o755),
            (l.disks_dir(), 0o750),
            (l.run_dir.join("vms"), 0o750),
            (l.log_dir.clone(), 0o750),
        ] {
            fsutil::create_dir_all(&dir, mode).map_err(io)?;
        }
        fsutil::remove_stale_temps(&l.specs_dir());
        // Disks an earlier agent was making when it died.
        fsutil::remove_stale_temps(&l.disks_dir());
        images::clean_partials(&l.images_dir());
        let stores = Stores::new(&l.images_dir(), &l.disks_dir()).map_err(io)?;
        let http = images::http_client()?;
        let network = Network::new(l.state_dir.join("net"));
        let network_state = if l.network_file().exists() {
            "configured"
        } else {
            "unconfigured"
        };
        Ok(Arc::new_cyclic(|me| Node {
            cfg,
            stores,
            runner,
            network,
            vms: StdMutex::new(BTreeMap::new()),
            membership: Mutex::new(()),
            bus: OnceLock::new(),
            pulls: StdMutex::new(HashSet::new()),
            disk_ops: StdMutex::new(HashSet::new()),
            http,
            net_lock: Mutex::new(()),
            network_state: StdMutex::new(network_state.to_owned()),
            me: me.clone(),
        }))
    }

    fn arc(&self) -> Option<Arc<Node>> {
        self.me.upgrade()
    }

    pub fn config(&self) -> &NodeConfig {
        &self.cfg
    }

    pub fn runner_kind(&self) -> &'static str {
        self.runner.kind()
    }

    /// The connection on which objects are served and signals emitted.
    pub fn attach_bus(&self, conn: zbus::Connection) {
        let _ = self.bus.set(conn);
    }

    pub fn network_state(&self) -> String {
        self.network_state
            .lock()
            .map(|s| s.clone())
            .unwrap_or_default()
    }

    // ----- queries -------------------------------------------------------------------------

    /// The VM table, locked for a moment: never hold the guard across an `.await`.
    fn table(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, Arc<Vm>>> {
        // Every change to the map is a single insert or remove: a panic elsewhere while
        // the lock was held cannot leave it half-changed.
        self.vms.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn list(&self) -> Vec<Arc<Vm>> {
        self.table().values().cloned().collect()
    }

    pub fn get(&self, name: &str) -> Result<Arc<Vm>, NodeError> {
        self.table()
            .get(name)
            .cloned()
            .ok_or_else(|| NodeError::NotFound(format!("no VM named {name:?} on this node")))
    }

    // ----- state changes -------------------------------------------------------------------

    async fn emit(&self, vm: &Vm, props: &[VmProperty]) {
        if let Some(conn) = self.bus.get() {
            crate::bus::emit_vm_changed(conn, vm, props).await;
        }
    }

    /// Sets the state if `check` accepts the current status; emits PropertiesChanged.
    async fn transition(
        &self,
        vm: &Vm,
        check: impl FnOnce(&VmStatus) -> bool,
        state: VmState,
        reason: String,
    ) -> bool {
        let mut changed = Vec::new();
        {
            let mut st = vm.lock();
            if !check(&st) {
                return false;
            }
            if st.state != state {
                changed.push(VmProperty::State);
            }
            if st.reason != reason {
                changed.push(VmProperty::StateReason);
            }
            if changed.is_empty() {
                return true;
            }
            tracing::info!(vm = %vm.name, from = st.state.as_str(), to = state.as_str(), %reason, "state change");
            st.state = state;
            st.reason = reason;
        }
        vm.state_tx.send_replace(state);
        self.emit(vm, &changed).await;
        true
    }

    async fn set_state(&self, vm: &Vm, state: VmState, reason: impl Into<String>) {
        self.transition(vm, |_| true, state, reason.into()).await;
    }

    /// Records a terminal state (durably first, so a client that saw it and a restarted
    /// agent agree; and a Stop or DeleteVm that waited for it finds the record written),
    /// then shows it.
    async fn end_run(
        &self,
        vm: &Vm,
        state: VmState,
        reason: impl Into<String>,
        operator_stopped: bool,
    ) {
        let reason = reason.into();
        self.persist_terminal(vm, state, &reason, operator_stopped)
            .await;
        self.set_state(vm, state, reason).await;
    }

    async fn persist_terminal(
        &self,
        vm: &Vm,
        state: VmState,
        reason: &str,
        operator_stopped: bool,
    ) {
        let status = TerminalStatus {
            state,
            reason: reason.to_owned(),
            operator_stopped,
        };
        let data = serde_json::to_vec(&status).unwrap_or_default();
        let dir = self.cfg.layout.vm_run_dir(&vm.name);
        let path = self.cfg.layout.status_file(&vm.name);
        let result = blocking(move || {
            fsutil::create_dir_all(&dir, 0o750)
                .and_then(|()| fsutil::write_atomic(&path, &data, 0o640))
                .map_err(io)
        })
        .await;
        if let Err(e) = result.and_then(|r| r) {
            tracing::warn!(vm = %vm.name, "cannot record terminal state: {e}");
        }
    }

    fn read_terminal(&self, name: &str) -> Option<TerminalStatus> {
        let data = std::fs::read(self.cfg.layout.status_file(name)).ok()?;
        serde_json::from_slice(&data).ok()
    }

    // ----- create / delete -----------------------------------------------------------------

    pub async fn create(&self, name: &str, spec_json: &str) -> Result<Arc<Vm>, NodeError> {
        names::validate_vm_name(name).map_err(|e| NodeError::InvalidSpec(e.to_string()))?;
        let mut spec = spec::parse(spec_json).map_err(|e| NodeError::InvalidSpec(e.to_string()))?;
        spec.fill_macs(&self.cfg.node_name, name);
        spec.fill_uuid()
            .map_err(|e| NodeError::InvalidSpec(format!("VM {name}: {e}")))?;
        let resolved = {
            let (spec, stores, vm) = (spec.clone(), self.stores.clone(), name.to_owned());
            blocking(move || spec.resolve(&vm, &stores))
                .await?
                .map_err(|e| NodeError::InvalidSpec(format!("VM {name}: {e}")))?
        };
        let host_mib = crate::hostinfo::memory_bytes() >> 20;
        if host_mib > 0 && spec.memory_mib > host_mib {
            return Err(NodeError::InvalidSpec(format!(
                "VM {name}: memory_mib {} is more than this host's {host_mib} MiB of RAM",
                spec.memory_mib
            )));
        }
        // From here to the table insert, no other VM is created or deleted.
        let _membership = self.membership.lock().await;
        if self.table().contains_key(name) {
            return Err(NodeError::AlreadyExists(format!(
                "a VM named {name:?} already exists on this node"
            )));
        }
        // Two VMs writing one disk corrupts it: refuse writable disks already in use.
        let others: Vec<(String, VmSpec)> = self
            .list()
            .iter()
            .map(|vm| (vm.name.clone(), vm.spec()))
            .collect();
        let stores = self.stores.clone();
        let disks = resolved.disks;
        let new = name.to_owned();
        let conflict = blocking(move || {
            // Resolved before the lock: a DeleteDisk (which takes it) may have run since.
            for d in &disks {
                if !d.path.is_file() {
                    return Some(format!(
                        "VM {new}: disk {} was deleted meanwhile",
                        d.path.display()
                    ));
                }
            }
            for (other, other_spec) in others {
                let Ok(other_resolved) = other_spec.resolve(&other, &stores) else {
                    continue;
                };
                for d in &disks {
                    if let Some(o) = other_resolved.disks.iter().find(|o| o.path == d.path) {
                        if !(d.readonly && o.readonly) {
                            return Some(format!(
                                "VM {new}: disk {} is already attached to VM {other} (a disk may be shared only read-only)",
                                d.path.display(),
                            ));
                        }
                    }
                }
            }
            None
        })
        .await?;
        if let Some(msg) = conflict {
            return Err(NodeError::InvalidSpec(msg));
        }
        let data = serde_json::to_vec_pretty(&spec).map_err(io)?;
        let file = self.cfg.layout.spec_file(name);
        // A previous VM of the same name may have left a terminal status behind.
        let status_file = self.cfg.layout.status_file(name);
        {
            let file = file.clone();
            blocking(move || {
                fsutil::write_atomic(&file, &data, 0o640)?;
                let _ = fsutil::remove_durable(&status_file);
                Ok::<(), fsutil::FsError>(())
            })
            .await?
            .map_err(io)?;
        }
        let vm = Vm::new(name, spec, VmState::Defined, String::new());
        // In the table before its object is on the bus (registering announces it with
        // InterfacesAdded): a call on the new object finds the VM.
        self.table().insert(name.to_owned(), vm.clone());
        if let (Some(conn), Some(me)) = (self.bus.get(), self.arc()) {
            if let Err(e) = crate::bus::register_vm(conn, me, vm.clone()).await {
                vm.lock().deleted = true;
                self.table().remove(name);
                let _ = blocking(move || fsutil::remove_durable(&file)).await;
                return Err(io(format!("registering the D-Bus object of {name}: {e}")));
            }
        }
        drop(_membership);
        tracing::info!(vm = %name, "created");
        if let Some(conn) = self.bus.get() {
            crate::bus::emit_vm_new(conn, &vm).await;
        }
        Ok(vm)
    }

    pub async fn delete(&self, name: &str) -> Result<(), NodeError> {
        let vm = self.get(name)?;
        // Wait for the VM's own operations (a Shutdown may take minutes) holding nothing
        // that other calls need; a VM deleted meanwhile is caught by `ensure_exists`.
        let _ops = vm.ops.lock().await;
        let _w = vm.spec_write.lock().await;
        vm.ensure_exists()?;
        let state = vm.state();
        if !state.is_down() {
            return Err(NodeError::InvalidState(format!(
                "VM {name} is {}; stop it before deleting it",
                state.as_str()
            )));
        }
        // Held until the VM's files and object are gone, so a CreateVm of the same name
        // starts from a clean slate.
        let _membership = self.membership.lock().await;
        let spec_file = self.cfg.layout.spec_file(name);
        blocking(move || fsutil::remove_durable(&spec_file))
            .await?
            .map_err(io)?;
        vm.lock().deleted = true;
        self.table().remove(name);
        if let Err(e) = self.runner.forget(name).await {
            tracing::warn!(vm = %name, "cleaning up run state: {e}");
        }
        let log_dir = self.cfg.layout.vm_log_dir(name);
        let removed = blocking(move || match std::fs::remove_dir_all(&log_dir) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                Err(format!("removing {}: {e}", log_dir.display()))
            }
            _ => Ok(()),
        })
        .await;
        match removed {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(vm = %name, "{e}"),
            Err(e) => tracing::warn!(vm = %name, "removing the log directory: {e}"),
        }
        if let Some(conn) = self.bus.get() {
            crate::bus::unregister_vm(conn, &vm).await;
        }
        tracing::info!(vm = %name, "deleted");
        Ok(())
    }

    pub async fn set_autostart(&self, name: &str, autostart: bool) -> Result<(), NodeError> {
        let vm = self.get(name)?;
        // Delete holds spec_write while removing the spec file, so this cannot resurrect it.
        let _w = vm.spec_write.lock().await;
        vm.ensure_exists()?;
        let mut spec = vm.spec();
        if spec.autostart == autostart {
            return Ok(());
        }
        spec.autostart = autostart;
        let data = serde_json::to_vec_pretty(&spec).map_err(io)?;
        let file = self.cfg.layout.spec_file(name);
        blocking(move || fsutil::write_atomic(&file, &data, 0o640))
            .await?
            .map_err(io)?;
        vm.lock().spec = spec;
        self.emit(&vm, &[VmProperty::Autostart, VmProperty::Spec])
            .await;
        Ok(())
    }

    // ----- lifecycle -----------------------------------------------------------------------

    pub async fn start(&self, name: &str) -> Result<(), NodeError> {
        let vm = self.get(name)?;
        let _ops = vm.ops.lock().await;
        vm.ensure_exists()?;
        let state = vm.state();
        if !state.is_down() {
            return Err(NodeError::InvalidState(format!(
                "VM {name} is already {}",
                state.as_str()
            )));
        }
        vm.lock().stop_requested = false;
        vm.lock().reboots.clear();
        self.launch_locked(&vm).await
    }

    /// Starts the VMM; the caller holds `vm.ops`. Returns once the VM is running (or failed).
    async fn launch_locked(&self, vm: &Arc<Vm>) -> Result<(), NodeError> {
        let spec = vm.spec();
        let resolved = {
            let (spec, stores, name) = (spec.clone(), self.stores.clone(), vm.name.clone());
            blocking(move || spec.resolve(&name, &stores)).await?
        };
        let resolved = match resolved {
            Ok(r) => r,
            Err(e) => {
                let msg = format!("VM {}: {e}", vm.name);
                self.end_run(vm, VmState::Failed, msg.clone(), false).await;
                return Err(NodeError::InvalidSpec(msg));
            }
        };
        if let Err(e) = self.check_firmware(&resolved).await {
            let msg = format!("VM {}: {e}", vm.name);
            self.end_run(vm, VmState::Failed, msg.clone(), false).await;
            return Err(NodeError::Io(msg));
        }
        // From the spec as it is now, at every start (and restart after a reboot).
        let seed_disk = match &resolved.seed {
            Some(files) => match self.write_seed(&vm.name, &resolved.uuid, files).await {
                Ok(path) => Some(path),
                Err(e) => {
                    let msg = format!("VM {}: {e}", vm.name);
                    self.end_run(vm, VmState::Failed, msg.clone(), false).await;
                    return Err(NodeError::Io(msg));
                }
            },
            None => None,
        };
        // A run in progress has no terminal status.
        let status_file = self.cfg.layout.status_file(&vm.name);
        let _ = blocking(move || fsutil::remove_durable(&status_file)).await;
        self.set_state(vm, VmState::Starting, "").await;
        let mut taps = Vec::new();
        for (i, nic) in resolved.nics.iter().enumerate() {
            let tap = TapRequest {
                name: names::tap_name(&vm.name, i),
                uid: self.cfg.vmm_user.uid,
                gid: self.cfg.vmm_user.gid,
                bridge: nic.bridge.clone(),
                vlan: nic.vlan,
                mtu: None,
            };
            if let Err(e) = self.network.create_tap(&tap).await {
                self.delete_taps(&taps).await;
                let msg = format!("VM {}: {e}", vm.name);
                self.end_run(vm, VmState::Failed, msg.clone(), false).await;
                return Err(NodeError::Network(msg));
            }
            taps.push(tap.name);
        }
        let params = VmmRunParams {
            console_log: self.cfg.layout.console_log(&vm.name),
            api_socket: self.cfg.layout.api_socket(&vm.name),
            taps: taps.clone(),
            switch_to_user: self.cfg.vmm_switches_user.then_some(self.cfg.vmm_user),
            firmware: self.cfg.firmware.clone(),
            seed_disk,
        };
        let launch = LaunchSpec {
            name: vm.name.clone(),
            vmm: self.cfg.vmm_binary.clone(),
            args: spec::vmm_args(&resolved, &params),
        };
        let generation = {
            let mut st = vm.lock();
            st.generation += 1;
            st.taps = taps.clone();
            st.generation
        };
        let exited = match self.runner.launch(&launch).await {
            Ok(f) => f,
            Err(e) => {
                self.delete_taps(&taps).await;
                let msg = e.to_string();
                self.end_run(vm, VmState::Failed, msg.clone(), false).await;
                return Err(NodeError::Vmm(msg));
            }
        };
        vm.lock().process = true;
        self.watch_exit(vm, generation, exited);
        self.wait_ready(vm, generation).await
    }

    /// Builds the VM's NoCloud seed volume in its run directory (a tmpfs: the seed is
    /// rebuilt at every start, and the run directory is the one the VMM may read under the
    /// systemd unit); returns its path.
    async fn write_seed(
        &self,
        name: &str,
        uuid: &str,
        files: &SeedFiles,
    ) -> Result<PathBuf, String> {
        let path = self.cfg.layout.seed_image(name);
        // The VMM's --disk option separates its parameters with commas.
        if path.to_string_lossy().contains(',') {
            return Err(format!(
                "the cloud-init seed path {} contains ',', which thvc-vmm's --disk cannot take",
                path.display()
            ));
        }
        let dir = self.cfg.layout.vm_run_dir(name);
        let (files, id, target) = (files.clone(), seed::volume_id(uuid), path.clone());
        blocking(move || {
            fsutil::create_dir_all(&dir, 0o750).map_err(|e| e.to_string())?;
            seed::write(&target, &files, id).map_err(|e| e.to_string())
        })
        .await
        .map_err(|e| e.to_string())??;
        Ok(path)
    }

    /// A firmware-booted VM needs the agent's firmware file: say so clearly instead of
    /// letting the VMM fail on it.
    async fn check_firmware(&self, resolved: &ResolvedSpec) -> Result<(), String> {
        if !matches!(resolved.boot, Boot::Firmware(_)) {
            return Ok(());
        }
        let path = self.cfg.firmware.clone();
        let meta = blocking({
            let path = path.clone();
            move || std::fs::metadata(path)
        })
        .await
        .map_err(|e| e.to_string())?;
        match meta {
            Ok(m) if m.is_file() => Ok(()),
            Ok(_) => Err(format!(
                "the UEFI firmware {} is not a regular file",
                path.display()
            )),
            Err(e) => Err(format!(
                "the UEFI firmware {} cannot be used ({e}): install it or start \
                 thvc-nodeagent with --firmware PATH",
                path.display()
            )),
        }
    }

    fn watch_exit(&self, vm: &Arc<Vm>, generation: u64, exited: ExitFuture) {
        let Some(node) = self.arc() else { return };
        let vm = vm.clone();
        tokio::spawn(async move {
            let outcome = exited.await;
            node.on_exit(&vm, generation, outcome).await;
        });
    }

    /// Waits until the VMM answers on its API socket. A VMM that serves no API socket is
    /// taken as running once it survived the start timeout.
    async fn wait_ready(&self, vm: &Arc<Vm>, generation: u64) -> Result<(), NodeError> {
        let deadline = Instant::now() + self.cfg.start_timeout;
        let socket = self.cfg.layout.api_socket(&vm.name);
        let mut rx = vm.state_tx.subscribe();
        let mut poll = Duration::from_millis(2);
        loop {
            {
                let st = vm.lock();
                // Also stop waiting when this run's process is gone: a reboot during start
                // is restarted by a task that needs the ops lock we hold.
                if st.generation != generation || !st.process || st.state != VmState::Starting {
                    return match st.state {
                        VmState::Failed => Err(NodeError::Vmm(st.reason.clone())),
                        _ => Ok(()),
                    };
                }
            }
            if socket.exists() && vmm_api::call(&socket, Request::Ping).await.is_ok() {
                self.transition(
                    vm,
                    |st| st.generation == generation && st.state == VmState::Starting,
                    VmState::Running,
                    String::new(),
                )
                .await;
                continue;
            }
            if Instant::now() >= deadline {
                let note = if socket.exists() {
                    "the VMM's API socket does not answer"
                } else {
                    "the VMM serves no API socket: Pause, Resume and Info are unavailable"
                };
                tracing::warn!(vm = %vm.name, "{note}");
                self.transition(
                    vm,
                    |st| st.generation == generation && st.state == VmState::Starting,
                    VmState::Running,
                    note.to_owned(),
                )
                .await;
                continue;
            }
            // Wake on a state change (exit) or poll the socket again, backing off from 2 ms
            // (a VMM binds its socket within milliseconds) to 50 ms.
            let _ = tokio::time::timeout(poll, rx.changed()).await;
            poll = (poll * 2).min(Duration::from_millis(50));
        }
    }

    async fn delete_taps(&self, taps: &[String]) {
        for t in taps {
            if let Err(e) = self.network.delete_tap(t).await {
                tracing::warn!("deleting TAP {t}: {e}");
            }
        }
    }

    /// Handles the end of a VMM process.
    async fn on_exit(&self, vm: &Arc<Vm>, generation: u64, outcome: ExitOutcome) {
        let (stop_requested, taps, reboot_ok) = {
            let mut st = vm.lock();
            if st.generation != generation {
                return;
            }
            st.process = false;
            let now = Instant::now();
            while st
                .reboots
                .front()
                .is_some_and(|t| now.duration_since(*t) > REBOOT_WINDOW)
            {
                st.reboots.pop_front();
            }
            let reboot_ok = st.reboots.len() < MAX_REBOOTS;
            if outcome == ExitOutcome::Exited(3) && reboot_ok {
                st.reboots.push_back(now);
            }
            (st.stop_requested, std::mem::take(&mut st.taps), reboot_ok)
        };
        self.delete_taps(&taps).await;
        tracing::info!(vm = %vm.name, ?outcome, stop_requested, "VMM exited");
        if stop_requested {
            let reason = match &outcome {
                ExitOutcome::Exited(0) | ExitOutcome::Exited(3) => "stopped".to_owned(),
                other => format!("stopped ({})", describe_exit(other)),
            };
            self.end_run(vm, VmState::Stopped, reason, true).await;
            return;
        }
        self.handle_unattended_exit(vm, generation, outcome, reboot_ok)
            .await;
    }

    /// An exit nobody asked for: power-off, reboot or failure.
    async fn handle_unattended_exit(
        &self,
        vm: &Arc<Vm>,
        generation: u64,
        outcome: ExitOutcome,
        reboot_ok: bool,
    ) {
        let log = self.runner.vmm_log_location(&vm.name);
        match outcome {
            ExitOutcome::Exited(0) => {
                let reason = describe_exit(&outcome);
                self.end_run(vm, VmState::Stopped, reason, false).await;
            }
            ExitOutcome::Exited(3) if reboot_ok => {
                self.set_state(vm, VmState::Starting, "the guest rebooted; restarting")
                    .await;
                let Some(node) = self.arc() else { return };
                let vm = vm.clone();
                tokio::spawn(async move {
                    let _ops = vm.ops.lock().await;
                    {
                        let st = vm.lock();
                        // Stopped (or restarted) by someone else meanwhile.
                        if st.generation != generation
                            || st.deleted
                            || st.stop_requested
                            || st.state != VmState::Starting
                        {
                            return;
                        }
                    }
                    if let Err(e) = node.launch_locked(&vm).await {
                        tracing::warn!(vm = %vm.name, "restart after reboot failed: {e}");
                    }
                });
            }
            ExitOutcome::Exited(3) => {
                let reason = format!(
                    "the guest rebooted more than {MAX_REBOOTS} times within {}s; giving up (see {})",
                    REBOOT_WINDOW.as_secs(),
                    self.cfg.layout.console_log(&vm.name).display()
                );
                self.end_run(vm, VmState::Failed, reason, false).await;
            }
            other => {
                let reason = format!("{} (see {log})", describe_exit(&other));
                self.end_run(vm, VmState::Failed, reason, false).await;
            }
        }
    }

    /// Waits until the VMM process of `vm` is gone and its end handled (recorded, TAPs
    /// removed, the state down), at most `timeout`. (The process flag alone drops as the
    /// exit is noticed: a Stop returning then could still show `stopping`.)
    async fn wait_run_ended(&self, vm: &Vm, timeout: Duration) -> bool {
        let ended = || {
            let st = vm.lock();
            !st.process && st.state.is_down()
        };
        let mut rx = vm.state_tx.subscribe();
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if ended() {
                return true;
            }
            match tokio::time::timeout_at(deadline, rx.changed()).await {
                Ok(Ok(())) => continue,
                Ok(Err(_)) | Err(_) => return ended(),
            }
        }
    }

    /// A Shutdown's wait for the guest to power off: at most the shutdown timeout, and a
    /// Stop ends it early ([`Vm::cut_shutdown_short`]).
    async fn wait_power_off(&self, vm: &Vm) -> PowerOff {
        let stop_now = vm.stop_now.notified();
        tokio::pin!(stop_now);
        // Registered before the flag is set: a Stop that sees the flag reaches this wait.
        stop_now.as_mut().enable();
        vm.lock().awaiting_power_off = true;
        let outcome = tokio::select! {
            biased;
            ended = self.wait_run_ended(vm, self.cfg.shutdown_timeout) => {
                if ended { PowerOff::Done } else { PowerOff::TimedOut }
            }
            () = &mut stop_now => PowerOff::CutShort,
        };
        vm.lock().awaiting_power_off = false;
        outcome
    }

    /// Stop (SIGTERM, then SIGKILL) or Shutdown (ACPI power button first).
    pub async fn stop(&self, name: &str, graceful: bool) -> Result<(), NodeError> {
        let vm = self.get(name)?;
        // A Stop does not queue behind a Shutdown that waits for the guest (60 s by
        // default): it ends that wait, and the Shutdown stops the VMM right away.
        let cut_short = !graceful && vm.cut_shutdown_short();
        let _ops = vm.ops.lock().await;
        vm.ensure_exists()?;
        let state = vm.state();
        if state.is_down() {
            if cut_short {
                // The Shutdown it cut short stopped the VM, as asked.
                return Ok(());
            }
            return Err(NodeError::InvalidState(format!(
                "VM {name} is {}, not running",
                state.as_str()
            )));
        }
        let has_process = {
            let mut st = vm.lock();
            st.stop_requested = true;
            st.process
        };
        if !has_process {
            // Between a reboot exit and its restart: nothing to stop.
            self.end_run(&vm, VmState::Stopped, "stopped", true).await;
            return Ok(());
        }
        // Unless the VMM exited meanwhile: its end (stopped, as asked) must not be
        // overwritten.
        self.transition(&vm, |st| st.process, VmState::Stopping, String::new())
            .await;
        let socket = self.cfg.layout.api_socket(name);
        if graceful {
            if state == VmState::Paused {
                // A paused guest cannot react to the power button.
                let _ = vmm_api::call(&socket, Request::Resume).await;
            }
            match vmm_api::call(&socket, Request::Shutdown).await {
                Ok(_) => match self.wait_power_off(&vm).await {
                    PowerOff::Done => return Ok(()),
                    PowerOff::TimedOut => {
                        tracing::warn!(vm = %name, timeout = ?self.cfg.shutdown_timeout, "guest did not power off in time; stopping the VMM");
                    }
                    PowerOff::CutShort => {
                        tracing::info!(vm = %name, "Stop requested during the shutdown; stopping the VMM");
                    }
                },
                Err(e) => {
                    tracing::warn!(vm = %name, "graceful shutdown not possible ({e}); stopping the VMM");
                }
            }
        }
        self.runner.terminate(name).await.map_err(io)?;
        if self.wait_run_ended(&vm, self.cfg.stop_timeout).await {
            return Ok(());
        }
        tracing::warn!(vm = %name, "VMM ignored SIGTERM; killing it");
        self.runner.kill(name).await.map_err(io)?;
        if self.wait_run_ended(&vm, self.cfg.stop_timeout).await {
            return Ok(());
        }
        Err(NodeError::Io(format!(
            "VM {name}: the VMM did not exit after SIGKILL"
        )))
    }

    pub async fn pause(&self, name: &str) -> Result<(), NodeError> {
        self.pause_resume(name, true).await
    }

    pub async fn resume(&self, name: &str) -> Result<(), NodeError> {
        self.pause_resume(name, false).await
    }

    async fn pause_resume(&self, name: &str, pause: bool) -> Result<(), NodeError> {
        let vm = self.get(name)?;
        let _ops = vm.ops.lock().await;
        vm.ensure_exists()?;
        let (from, to, request) = if pause {
            (VmState::Running, VmState::Paused, Request::Pause)
        } else {
            (VmState::Paused, VmState::Running, Request::Resume)
        };
        let state = vm.state();
        if state != from {
            return Err(NodeError::InvalidState(format!(
                "VM {name} is {}; {} needs it {}",
                state.as_str(),
                if pause { "Pause" } else { "Resume" },
                from.as_str()
            )));
        }
        vmm_api::call(&self.cfg.layout.api_socket(name), request)
            .await
            .map_err(|e| vmm_err(name, e))?;
        self.transition(&vm, |st| st.state == from, to, String::new())
            .await;
        Ok(())
    }

    pub async fn info(&self, name: &str) -> Result<String, NodeError> {
        let vm = self.get(name)?;
        if !vm.lock().process {
            return Err(NodeError::InvalidState(format!(
                "VM {name} is {}; Info needs a running VMM",
                vm.state().as_str()
            )));
        }
        let v = vmm_api::call(&self.cfg.layout.api_socket(name), Request::Info)
            .await
            .map_err(|e| vmm_err(name, e))?;
        Ok(v.to_string())
    }

    pub async fn read_console(&self, name: &str, offset: u64) -> Result<(Vec<u8>, u64), NodeError> {
        self.get(name)?;
        let path = self.cfg.layout.console_log(name);
        tokio::task::spawn_blocking(move || console::read(&path, offset))
            .await
            .map_err(io)?
            .map_err(io)
    }

    // ----- recovery ------------------------------------------------------------------------

    /// Loads persisted VMs, re-adopts running VMMs, reports exits that happened while no
    /// agent ran, and starts autostart VMs. Call after [`Node::attach_bus`].
    pub async fn recover(&self) -> Result<(), NodeError> {
        let first_since_boot = !self.cfg.layout.boot_marker().exists();
        let dir = self.cfg.layout.specs_dir();
        let mut names_found = Vec::new();
        for entry in std::fs::read_dir(&dir).map_err(io)?.flatten() {
            let file = entry.file_name().to_string_lossy().into_owned();
            let Some(name) = file.strip_suffix(".json") else {
                continue;
            };
            if file.starts_with('.') {
                continue;
            }
            if let Err(e) = names::validate_vm_name(name) {
                tracing::error!("ignoring {}: {e}", entry.path().display());
                continue;
            }
            let mut spec = match std::fs::read_to_string(entry.path())
                .map_err(|e| e.to_string())
                .and_then(|s| spec::parse(&s).map_err(|e| e.to_string()))
            {
                Ok(s) => s,
                Err(e) => {
                    tracing::error!("VM {name}: cannot load {}: {e}", entry.path().display());
                    continue;
                }
            };
            if spec.uuid.is_none() {
                // Defined before VMs had UUIDs: fix one now, for good.
                if let Err(e) = self.give_uuid(name, &mut spec) {
                    tracing::error!("VM {name}: {e}");
                    continue;
                }
            }
            names_found.push((name.to_owned(), spec));
        }
        names_found.sort_by(|a, b| a.0.cmp(&b.0));
        let mut loaded = Vec::new();
        {
            // No CreateVm of the same names meanwhile.
            let _membership = self.membership.lock().await;
            for (name, spec) in names_found {
                let vm = Vm::new(&name, spec, VmState::Defined, String::new());
                // In the table before its object is announced, as in `create`.
                self.table().insert(name.clone(), vm.clone());
                if let (Some(conn), Some(me)) = (self.bus.get(), self.arc()) {
                    if let Err(e) = crate::bus::register_vm(conn, me, vm.clone()).await {
                        tracing::error!(vm = %name, "registering D-Bus object: {e}");
                    }
                }
                loaded.push(vm);
            }
        }
        let mut to_autostart = Vec::new();
        for vm in &loaded {
            let terminal = self.read_terminal(&vm.name);
            match self.runner.adopt(&vm.name).await {
                Ok(Adoption::Running(exited)) => {
                    let paused =
                        vmm_api::call(&self.cfg.layout.api_socket(&vm.name), Request::Info)
                            .await
                            .ok()
                            .and_then(|v| {
                                v.get("state")
                                    .and_then(|s| s.as_str())
                                    .map(|s| s == "paused")
                            })
                            .unwrap_or(false);
                    let generation = {
                        let mut st = vm.lock();
                        st.generation += 1;
                        st.process = true;
                        st.taps = (0..st.spec.nics.len())
                            .map(|i| names::tap_name(&vm.name, i))
                            .collect();
                        st.generation
                    };
                    let state = if paused {
                        VmState::Paused
                    } else {
                        VmState::Running
                    };
                    self.set_state(vm, state, "").await;
                    tracing::info!(vm = %vm.name, "re-adopted running VMM");
                    self.watch_exit(vm, generation, exited);
                }
                Ok(Adoption::Exited(outcome)) if terminal.is_none() => {
                    // It ended while no agent watched: handle it as if we had.
                    tracing::info!(vm = %vm.name, ?outcome, "VMM ended while the agent was away");
                    let generation = vm.lock().generation;
                    self.handle_unattended_exit(vm, generation, outcome, true)
                        .await;
                }
                Ok(Adoption::Exited(_)) | Ok(Adoption::NotRunning) => match terminal {
                    Some(t) => {
                        self.set_state(vm, t.state, t.reason).await;
                        if vm.autostart() && !t.operator_stopped && t.state == VmState::Stopped {
                            to_autostart.push(vm.clone());
                        }
                    }
                    None => {
                        if vm.autostart() {
                            to_autostart.push(vm.clone());
                        }
                    }
                },
                Err(e) => {
                    let reason = format!("cannot determine whether the VMM still runs: {e}");
                    self.set_state(vm, VmState::Failed, reason).await;
                }
            }
        }
        if first_since_boot {
            if let Err(e) = fsutil::write_atomic(&self.cfg.layout.boot_marker(), b"", 0o644) {
                tracing::warn!("cannot write boot marker: {e}");
            }
        }
        for vm in to_autostart {
            tracing::info!(vm = %vm.name, "autostart");
            let Some(node) = self.arc() else { break };
            tokio::spawn(async move {
                if let Err(e) = node.start(&vm.name).await {
                    tracing::warn!(vm = %vm.name, "autostart failed: {e}");
                }
            });
        }
        Ok(())
    }

    /// Gives a loaded spec without a UUID one and persists it, so the guest sees the same
    /// UUID from now on.
    fn give_uuid(&self, name: &str, spec: &mut VmSpec) -> Result<(), NodeError> {
        spec.fill_uuid().map_err(io)?;
        let data = serde_json::to_vec_pretty(&spec).map_err(io)?;
        fsutil::write_atomic(&self.cfg.layout.spec_file(name), &data, 0o640).map_err(io)?;
        tracing::info!(vm = %name, uuid = spec.uuid.as_deref().unwrap_or(""), "assigned a UUID");
        Ok(())
    }

    /// Keeps console logs of running VMs bounded (see [`crate::console`]). Runs forever.
    pub async fn console_trim_loop(&self) {
        let mut tick = tokio::time::interval(CONSOLE_TRIM_INTERVAL);
        loop {
            tick.tick().await;
            for vm in self.list() {
                if !vm.lock().process {
                    continue;
                }
                let path = self.cfg.layout.console_log(&vm.name);
                let r = tokio::task::spawn_blocking(move || {
                    console::trim(&path, console::KEEP_BYTES, console::TRIM_SLACK)
                })
                .await;
                if let Ok(Err(e)) = r {
                    tracing::warn!(vm = %vm.name, "trimming console log: {e}");
                }
            }
        }
    }

    // ----- network -------------------------------------------------------------------------

    pub async fn apply_network(
        &self,
        document_json: &str,
        dry_run: bool,
    ) -> Result<String, NodeError> {
        Network::validate(document_json)?;
        if dry_run {
            return Ok(self.network.plan(document_json).await?);
        }
        let _g = self.net_lock.lock().await;
        match self.network.apply(document_json).await {
            Ok(plan) => {
                fsutil::write_atomic(
                    &self.cfg.layout.network_file(),
                    document_json.as_bytes(),
                    0o640,
                )
                .map_err(io)?;
                self.set_network_state("configured").await;
                Ok(plan)
            }
            Err(e) => {
                self.set_network_state(&format!("failed: {e}")).await;
                Err(e.into())
            }
        }
    }

    /// Applies the network document handed to the agent as the systemd credential
    /// [`NETWORK_CREDENTIAL`] (`ImportCredential=` in thvc-nodeagent.service), exactly as
    /// `ApplyNetwork(document, false)` would. Never fails the agent: a missing credential
    /// changes nothing, a bad one is logged and shown in `NetworkState` (the host network
    /// stays as it is, so VMs still start on whatever is there). Call before
    /// [`Node::recover`], which starts VMs that need the bridges.
    pub async fn apply_network_credential(&self, credentials_dir: &Path) {
        let path = credentials_dir.join(NETWORK_CREDENTIAL);
        let document = match std::fs::read_to_string(&path) {
            Ok(d) => d,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                tracing::info!(
                    "no network credential {}: host network left as it is",
                    path.display()
                );
                return;
            }
            Err(e) => {
                let reason = format!("cannot read the network credential {}: {e}", path.display());
                tracing::error!("{reason}; host network left as it is");
                self.set_network_state(&format!("failed: {reason}")).await;
                return;
            }
        };
        tracing::info!(
            "applying the network document from credential {}",
            path.display()
        );
        match self.apply_network(&document, false).await {
            Ok(report) => {
                let changed = serde_json::from_str::<serde_json::Value>(&report)
                    .ok()
                    .and_then(|r| r.get("changed").and_then(|c| c.as_bool()));
                tracing::info!(
                    ?changed,
                    "network credential {} applied:\n{report}",
                    path.display()
                );
            }
            Err(NodeError::InvalidSpec(problems)) => {
                tracing::error!(
                    "the network credential {} is invalid; host network left as it is:\n{problems}",
                    path.display()
                );
                // One line for the property: the problems joined.
                let problems: Vec<&str> = problems.lines().map(str::trim).collect();
                self.set_network_state(&format!(
                    "failed: network credential {NETWORK_CREDENTIAL} is invalid: {}",
                    problems.join("; ")
                ))
                .await;
            }
            // apply_network already put the failure into NetworkState.
            Err(e) => tracing::error!(
                "applying the network credential {} failed: {e}",
                path.display()
            ),
        }
    }

    async fn set_network_state(&self, s: &str) {
        if let Ok(mut g) = self.network_state.lock() {
            *g = s.to_owned();
        }
        if let Some(conn) = self.bus.get() {
            crate::bus::emit_network_state_changed(conn).await;
        }
    }

    /// The host network as it is: links thvc-netconf manages plus physical ones, rendered
    /// as a document (applying it changes nothing). The last applied desired document is
    /// kept in `<state>/network.json`.
    pub async fn get_network(&self) -> Result<String, NodeError> {
        Ok(self.network.show().await?)
    }

    // ----- images --------------------------------------------------------------------------

    pub async fn pull_image(&self, url: &str, sha256: &str) -> Result<PathBuf, NodeError> {
        let parsed = reqwest::Url::parse(url)
            .map_err(|e| NodeError::InvalidArgument(format!("invalid image URL {url:?}: {e}")))?;
        let name = images::image_name_from_url(&parsed)?;
        {
            let mut pulls = self.pulls.lock().map_err(io)?;
            if !pulls.insert(name.clone()) {
                return Err(NodeError::Busy(format!(
                    "image {name} is already being pulled"
                )));
            }
        }
        let result = images::pull(&self.http, &self.cfg.layout.images_dir(), url, sha256).await;
        if let Ok(mut pulls) = self.pulls.lock() {
            pulls.remove(&name);
        }
        Ok(result?)
    }

    pub fn list_images(&self) -> Result<Vec<ImageInfo>, NodeError> {
        Ok(images::list(&self.cfg.layout.images_dir())?)
    }
}
