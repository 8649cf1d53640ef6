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
//!
//! The node never calls the transport: it publishes [`NodeEvent`]s ([`events`]) that
//! [`crate::bus`] turns into D-Bus objects and signals. The work is split by job:
//!
//! - `state`: transitions, their events, terminal records;
//! - `vms`: the set of VMs (CreateVm, DeleteVm, Autostart, spec updates);
//! - `apply`: declarative VMs (ApplyVms);
//! - `access`: per-VM VMM users and what each may open;
//! - `lifecycle`: Start, the VMM's exit, Stop/Shutdown, Pause/Resume, Info, console;
//! - `recovery`: loading, re-adopting and autostarting after an agent (re)start;
//! - `net_ops`, `image_ops`, `disk_ops`: the host network and the image and disk stores;
//! - `metrics`: the per-VM series written for Prometheus (`--metrics-file`).

pub mod access;
pub mod apply;
pub mod capacity;
mod disk_ops;
mod drain;
pub mod events;
mod host_ops;
mod image_ops;
pub mod jobs;
mod lifecycle;
pub mod metrics;
mod migrate;
mod net_ops;
mod recovery;
mod state;
mod vms;

pub use events::{Ack, EventStream, NodeEvent};

use std::collections::{BTreeMap, HashSet, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex as StdMutex, Weak};
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
    /// A start would exceed the node's capacity (see [`capacity`]).
    #[error("{0}")]
    NoCapacity(String),
    #[error("{0}")]
    InvalidImage(String),
    /// An ApplyVms job whose actions did not all succeed; the message is its report.
    #[error("{0}")]
    Incomplete(String),
    /// A host update check or install failed (the update server, a refused signature or
    /// checksum, the installation).
    #[error("{0}")]
    Update(String),
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
    /// Per-VM uids (`--vmm-uids`): each VM's VMM runs as its own uid (see [`access`]).
    pub vmm_uids: Option<crate::vmm_user::UidRange>,
    pub control_group: String,
    /// Which groups grant which roles (the control group grants all).
    pub role_groups: crate::auth::RoleGroups,
    /// Where audit records go (journald's native socket); None: stderr lines.
    pub journal_socket: Option<PathBuf>,
    pub node_name: String,
    pub os_release: PathBuf,
    /// /sys/class/block: partition labels for the installed image versions.
    pub sys_block: PathBuf,
    /// The ESP's mount point: boot-counted UKIs for the failed image versions.
    pub esp: PathBuf,
    /// efivarfs: the firmware's Secure Boot state.
    pub efivars: PathBuf,
    /// The TPM2 storage root key's public half (PEM) systemd-tpm2-setup writes.
    pub tpm2_srk: PathBuf,
    /// /var's recovery key, enveloped for the operator's escrow certificate (PEM CMS).
    pub var_recovery_key: PathBuf,
    /// The PCR key /var and the credentials are sealed to (thvc-pcr-key-rollover).
    pub pcr_key: PathBuf,
    /// Exists at a provisioning boot (/var in memory; thvc-provisioning-generator).
    pub provisioning_flag: PathBuf,
    pub shutdown_timeout: Duration,
    pub start_timeout: Duration,
    /// vCPUs per host CPU, in tenths (`--vcpu-overcommit 4` = 40).
    pub vcpu_overcommit_tenths: u32,
    /// Host memory kept out of the VMs' reach.
    pub memory_reserve_mib: u64,
    /// After SIGTERM (and again after SIGKILL), how long to wait for the VMM to exit.
    pub stop_timeout: Duration,
    /// How this node reaches others for live migration (ssh and its configuration).
    pub migration: crate::migration::SshLink,
}

/// Terminal state persisted in the run directory, so a restarted agent reports it truthfully
/// and does not autostart a VM an operator stopped in this boot.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct TerminalStatus {
    state: VmState,
    reason: String,
    #[serde(default)]
    operator_stopped: bool,
    /// Written (with state `stopping`) before a Stop or Shutdown acts, replaced by the real
    /// end once the VMM is gone: an agent killed in between finds the operator's intent
    /// here when it comes back.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pending: Option<PendingStop>,
}

/// A Stop or Shutdown in progress (see [`TerminalStatus::pending`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
enum PendingStop {
    Stop,
    Shutdown,
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
    /// Stops waiting for the VM's operation lock: a Shutdown that reaches its wait for the
    /// guest while one waits ends at once (the Stop may have come before the wait began).
    stops_waiting: u32,
    /// The VM's own VMM uid (`--vmm-uids`), fixed for its life.
    vmm_uid: Option<u32>,
    /// The node a MigrateVm job is moving the guest to: the VMM's exit with status 0
    /// is then the migration's end (or a power-off meanwhile), not a power-off to act on.
    migrating_to: Option<String>,
}

/// How [`Node::launch_locked`] gets the VMM its guest.
pub(super) enum Launch {
    /// Boots the spec's kernel or firmware.
    Boot,
    /// Receives a migrating guest on this socket (`--incoming`).
    Incoming(PathBuf),
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

/// A Stop waiting for its VM's operation lock (see [`Vm::stop_waiting`]).
struct StopWaiting<'a>(&'a Vm);

impl Drop for StopWaiting<'_> {
    fn drop(&mut self) {
        let mut st = self.0.lock();
        st.stops_waiting = st.stops_waiting.saturating_sub(1);
    }
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
                stops_waiting: 0,
                vmm_uid: None,
                migrating_to: None,
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

    /// A Stop announces itself before it waits for the VM's operation lock: it ends the wait
    /// of a Shutdown for the guest if one waits (true then), and a Shutdown that gets there
    /// later ends its wait at once (see `wait_power_off`). The guard withdraws it.
    fn stop_waiting(&self) -> (bool, StopWaiting<'_>) {
        let mut st = self.lock();
        st.stops_waiting += 1;
        if st.awaiting_power_off {
            // Under the status lock: the waiting Shutdown is registered for it.
            self.stop_now.notify_waiters();
        }
        (st.awaiting_power_off, StopWaiting(self))
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
    /// Where the node's events go (see [`events`]).
    events: events::Publisher,
    /// Jobs in progress (see [`jobs`]).
    jobs: jobs::Jobs,
    /// Starts being admitted and autostart VMs being created (see [`capacity`]).
    admitted: StdMutex<capacity::Admitted>,
    /// Held by the ApplyVms job in progress (one at a time).
    apply: Arc<Mutex<()>>,
    /// No new starts (see [`drain`]); mirrors the state directory's `drained` file.
    drained: std::sync::atomic::AtomicBool,
    /// Host updates and reboots (see [`host_ops`]).
    host: Arc<dyn crate::host::HostControl>,
    /// Held by the update job in progress (one at a time).
    updating: Arc<Mutex<()>>,
    /// Set by Reboot: no new starts in this boot.
    rebooting: std::sync::atomic::AtomicBool,
    pulls: StdMutex<HashSet<String>>,
    /// Disk names with an operation in progress (see `disk_ops`).
    disk_ops: StdMutex<HashSet<String>>,
    /// VM names a ReceiveVm is bringing here (see `migrate`): one at a time per name.
    receiving: StdMutex<HashSet<String>>,
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
            ImageError::Download { .. }
            | ImageError::TooLarge { .. }
            | ImageError::Canceled { .. } => NodeError::Download(msg),
            ImageError::NotFound(_) => NodeError::NotFound(msg),
            ImageError::Fs(_) => NodeError::Io(msg),
        }
    }
}

fn vmm_err(vm: &str, e: VmmApiError) -> NodeError {
    NodeError::Vmm(format!("VM {vm}: {e}"))
}

impl Node {
    /// Creates the state directories and the node (no VMs loaded yet: see [`Node::recover`]).
    pub fn new(
        cfg: NodeConfig,
        runner: Arc<dyn VmRunner>,
        host: Arc<dyn crate::host::HostControl>,
    ) -> Result<Arc<Node>, NodeError> {
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
        if cfg.vmm_uids.is_some() {
            // Per-VM users reach their own files in these (the files' ACLs say which) but
            // may not list them: search permission for others, nothing more.
            use std::os::unix::fs::PermissionsExt;
            for dir in [
                l.images_dir(),
                l.disks_dir(),
                l.run_dir.join("vms"),
                l.log_dir.clone(),
            ] {
                let mode = std::fs::metadata(&dir).map_err(io)?.permissions().mode();
                if mode & 0o001 == 0 {
                    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(mode | 0o001))
                        .map_err(|e| io(format!("{}: {e}", dir.display())))?;
                }
            }
        }
        // What an earlier agent was writing when it died, in every store (blocking, but at
        // start, before anything is served): the node's own files (network.json, the boot
        // marker), specs, disks being made, images being pulled, and each VM's run
        // directory (terminal records, seeds).
        fsutil::remove_stale_temps(&l.state_dir);
        fsutil::remove_stale_temps(&l.specs_dir());
        fsutil::remove_stale_temps(&l.disks_dir());
        images::clean_store(&l.images_dir());
        fsutil::remove_stale_temps(&l.run_dir);
        if let Ok(entries) = std::fs::read_dir(l.run_dir.join("vms")) {
            for entry in entries.flatten() {
                fsutil::remove_stale_temps(&entry.path());
            }
        }
        let stores = Stores::new(&l.images_dir(), &l.disks_dir()).map_err(io)?;
        let http = images::http_client()?;
        let network = Network::new(l.state_dir.join("net"));
        let network_state = if l.network_file().exists() {
            "configured"
        } else {
            "unconfigured"
        };
        let drained = Node::drained_at_start(&cfg.layout);
        Ok(Arc::new_cyclic(|me| Node {
            cfg,
            stores,
            runner,
            network,
            vms: StdMutex::new(BTreeMap::new()),
            membership: Mutex::new(()),
            events: events::Publisher::default(),
            jobs: jobs::Jobs::default(),
            pulls: StdMutex::new(HashSet::new()),
            disk_ops: StdMutex::new(HashSet::new()),
            receiving: StdMutex::new(HashSet::new()),
            http,
            net_lock: Mutex::new(()),
            network_state: StdMutex::new(network_state.to_owned()),
            drained: std::sync::atomic::AtomicBool::new(drained),
            host,
            updating: Arc::new(Mutex::new(())),
            rebooting: std::sync::atomic::AtomicBool::new(false),
            admitted: StdMutex::new(capacity::Admitted::default()),
            apply: Arc::new(Mutex::new(())),
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
}
