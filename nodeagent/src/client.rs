//! Client side of the D-Bus API, shared by `thvcctl`, the tests and the benchmark: typed
//! proxies and the ways to reach a node's bus (system, session, an address, or a remote
//! node's system bus over SSH, the way `busctl -H` does it).

use thiserror::Error;
use zbus::zvariant::OwnedObjectPath;

pub use crate::bus::BUS_NAME;

#[derive(Debug, Error)]
pub enum ClientError {
    #[error("connecting to the bus at {target}: {source}")]
    Connect {
        target: String,
        #[source]
        source: Box<zbus::Error>,
    },
    #[error("invalid remote host {0:?}: expected [USER@]HOST")]
    BadHost(String),
}

#[zbus::proxy(
    interface = "de.thueringen.thvc.node1.Manager",
    default_service = "de.thueringen.thvc.node1",
    default_path = "/de/thueringen/thvc/node1"
)]
pub trait Manager {
    #[zbus(property)]
    fn hostname(&self) -> zbus::Result<String>;
    #[zbus(property)]
    fn version(&self) -> zbus::Result<String>;
    #[zbus(property)]
    fn kvm_available(&self) -> zbus::Result<bool>;
    #[zbus(property)]
    fn cpus(&self) -> zbus::Result<u32>;
    #[zbus(property)]
    fn memory_bytes(&self) -> zbus::Result<u64>;
    #[zbus(property)]
    fn memory_available_bytes(&self) -> zbus::Result<u64>;
    #[zbus(property)]
    fn image_version(&self) -> zbus::Result<String>;
    #[zbus(property)]
    fn installed_versions(&self) -> zbus::Result<Vec<String>>;
    /// (version, boot attempts, µs since the epoch of the boot that came back without it)
    #[zbus(property)]
    fn failed_versions(&self) -> zbus::Result<Vec<(String, u64, u64)>>;
    /// The kernel clock is synchronised (absent from agents before it: UnknownProperty).
    #[zbus(property)]
    fn time_synchronized(&self) -> zbus::Result<bool>;
    /// bootctl's words ("enabled (user)", ...; absent from older agents: UnknownProperty).
    #[zbus(property)]
    fn secure_boot(&self) -> zbus::Result<String>;
    /// PEM; empty without a TPM2 (absent from older agents: UnknownProperty).
    #[zbus(property)]
    fn tpm_srk_public_key(&self) -> zbus::Result<String>;
    /// PEM CMS envelope; empty when none (absent from older agents: UnknownProperty).
    #[zbus(property)]
    fn var_recovery_key(&self) -> zbus::Result<String>;
    /// Hex SHA-256 of the PCR key /var is sealed to; empty when unknown (absent from older
    /// agents: UnknownProperty).
    #[zbus(property)]
    fn pcr_key(&self) -> zbus::Result<String>;
    /// A provisioning boot, /var in memory (absent from older agents: UnknownProperty).
    #[zbus(property)]
    fn provisioning(&self) -> zbus::Result<bool>;
    #[zbus(property)]
    fn network_state(&self) -> zbus::Result<String>;

    fn list_vms(&self) -> zbus::Result<Vec<(String, String, OwnedObjectPath)>>;
    fn get_vm(&self, name: &str) -> zbus::Result<OwnedObjectPath>;
    fn create_vm(&self, name: &str, spec_json: &str) -> zbus::Result<OwnedObjectPath>;
    fn delete_vm(&self, name: &str) -> zbus::Result<()>;
    fn apply_network(&self, document_json: &str, dry_run: bool) -> zbus::Result<String>;
    fn get_network(&self) -> zbus::Result<String>;
    fn apply_vms(
        &self,
        document_json: &str,
        dry_run: bool,
    ) -> zbus::Result<(String, OwnedObjectPath)>;
    fn pull_image(&self, url: &str, sha256: &str) -> zbus::Result<String>;
    fn pull_image_job(&self, url: &str, sha256: &str) -> zbus::Result<OwnedObjectPath>;
    fn drain(&self, timeout_seconds: u64) -> zbus::Result<OwnedObjectPath>;
    fn drain_to(&self, timeout_seconds: u64, target: &str) -> zbus::Result<OwnedObjectPath>;
    fn migrate_vm(&self, name: &str, target: &str) -> zbus::Result<OwnedObjectPath>;
    fn receive_vm(
        &self,
        name: &str,
        spec_json: &str,
        link: zbus::zvariant::Fd<'_>,
    ) -> zbus::Result<String>;
    fn undrain(&self) -> zbus::Result<()>;
    fn update(&self, url: &str, dry_run: bool) -> zbus::Result<OwnedObjectPath>;
    fn reboot(&self, timeout_seconds: u64) -> zbus::Result<OwnedObjectPath>;
    #[zbus(property)]
    fn drained(&self) -> zbus::Result<bool>;
    #[zbus(property)]
    fn allocated_vcpus(&self) -> zbus::Result<u64>;
    #[zbus(property)]
    fn vcpu_capacity(&self) -> zbus::Result<u64>;
    #[zbus(property)]
    fn allocated_memory_mib(&self) -> zbus::Result<u64>;
    #[zbus(property)]
    fn memory_capacity_mib(&self) -> zbus::Result<u64>;
    #[zbus(property)]
    fn image_store_free_bytes(&self) -> zbus::Result<u64>;
    #[zbus(property)]
    fn disk_store_free_bytes(&self) -> zbus::Result<u64>;
    fn list_images(&self) -> zbus::Result<Vec<(String, u64, String)>>;
    fn delete_image(&self, name: &str) -> zbus::Result<()>;
    fn create_disk(&self, name: &str, options_json: &str) -> zbus::Result<String>;
    fn resize_disk(&self, name: &str, size: u64) -> zbus::Result<()>;
    fn delete_disk(&self, name: &str) -> zbus::Result<()>;
    fn list_disks(&self) -> zbus::Result<String>;

    #[zbus(signal)]
    fn vm_new(&self, name: String, path: OwnedObjectPath) -> zbus::Result<()>;
    #[zbus(signal)]
    fn vm_removed(&self, name: String, path: OwnedObjectPath) -> zbus::Result<()>;

    fn list_jobs(&self) -> zbus::Result<Vec<(u32, String, String, String, OwnedObjectPath)>>;
    #[zbus(signal)]
    fn job_removed(
        &self,
        id: u32,
        path: OwnedObjectPath,
        result: String,
        message: String,
    ) -> zbus::Result<()>;
}

#[zbus::proxy(
    interface = "de.thueringen.thvc.node1.Vm",
    default_service = "de.thueringen.thvc.node1"
)]
pub trait Vm {
    #[zbus(property)]
    fn name(&self) -> zbus::Result<String>;
    #[zbus(property)]
    fn uuid(&self) -> zbus::Result<String>;
    #[zbus(property)]
    fn state(&self) -> zbus::Result<String>;
    #[zbus(property)]
    fn state_reason(&self) -> zbus::Result<String>;
    #[zbus(property)]
    fn spec(&self) -> zbus::Result<String>;
    #[zbus(property)]
    fn autostart(&self) -> zbus::Result<bool>;
    #[zbus(property)]
    fn set_autostart(&self, value: bool) -> zbus::Result<()>;

    fn start(&self) -> zbus::Result<()>;
    fn shutdown(&self) -> zbus::Result<()>;
    fn stop(&self) -> zbus::Result<()>;
    fn start_job(&self) -> zbus::Result<OwnedObjectPath>;
    fn shutdown_job(&self) -> zbus::Result<OwnedObjectPath>;
    fn stop_job(&self) -> zbus::Result<OwnedObjectPath>;
    fn pause(&self) -> zbus::Result<()>;
    fn resume(&self) -> zbus::Result<()>;
    fn info(&self) -> zbus::Result<String>;
    fn read_console(&self, offset: u64) -> zbus::Result<(Vec<u8>, u64)>;
}

/// Where the node's bus is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BusTarget {
    System,
    Session,
    /// A D-Bus address (`unix:path=...`).
    Address(String),
    /// A remote node's system bus: `ssh -xT [USER@]HOST systemd-stdio-bridge`.
    Ssh(String),
}

impl BusTarget {
    /// `system`, `session`, or an address.
    pub fn parse(s: &str) -> BusTarget {
        match s {
            "system" => BusTarget::System,
            "session" => BusTarget::Session,
            other => BusTarget::Address(other.to_owned()),
        }
    }
}

/// The `unixexec:` address that runs `ssh -xT -- HOST systemd-stdio-bridge` and uses its
/// stdin/stdout as the bus transport (what `busctl -H` does). `THVCCTL_SSH` replaces the
/// ssh program (tests use it to run the bridge locally). Built as a value, not parsed from a
/// string, so host names need no escaping.
pub fn ssh_address(host: &str) -> Result<zbus::address::Address, ClientError> {
    // A leading '-' would be taken as an ssh option (e.g. -oProxyCommand=...).
    if host.is_empty() || host.starts_with('-') || host.chars().any(|c| c.is_whitespace()) {
        return Err(ClientError::BadHost(host.to_owned()));
    }
    let ssh = std::env::var_os("THVCCTL_SSH").unwrap_or_else(|| "ssh".into());
    let args = ["-xT", "--", host, "systemd-stdio-bridge"]
        .iter()
        .map(std::ffi::OsString::from)
        .collect();
    let transport = zbus::address::transport::Transport::Unixexec(
        zbus::address::transport::Unixexec::new(ssh.into(), None, args),
    );
    Ok(zbus::address::Address::from(transport))
}

/// Connects to the bus `target`.
pub async fn connect(target: &BusTarget) -> Result<zbus::Connection, ClientError> {
    let describe = |t: &BusTarget| match t {
        BusTarget::System => "system bus".to_owned(),
        BusTarget::Session => "session bus".to_owned(),
        BusTarget::Address(a) => a.clone(),
        BusTarget::Ssh(h) => format!("system bus of {h} (over ssh)"),
    };
    let err = |source| ClientError::Connect {
        target: describe(target),
        source: Box::new(source),
    };
    let builder = match target {
        BusTarget::System => zbus::connection::Builder::system().map_err(err)?,
        BusTarget::Session => zbus::connection::Builder::session().map_err(err)?,
        BusTarget::Address(a) => zbus::connection::Builder::address(a.as_str()).map_err(err)?,
        BusTarget::Ssh(host) => {
            zbus::connection::Builder::address(ssh_address(host)?).map_err(err)?
        }
    };
    builder.build().await.map_err(err)
}

/// Proxy for the VM at `path`.
pub async fn vm_proxy(
    conn: &zbus::Connection,
    path: OwnedObjectPath,
) -> zbus::Result<VmProxy<'static>> {
    VmProxy::builder(conn)
        .path(path)?
        .cache_properties(zbus::proxy::CacheProperties::No)
        .build()
        .await
}

/// The D-Bus error name and message of a failed call, if it was a method error.
pub fn method_error(e: &zbus::Error) -> Option<(String, String)> {
    match e {
        zbus::Error::MethodError(name, desc, _) => {
            Some((name.to_string(), desc.clone().unwrap_or_default()))
        }
        zbus::Error::FDO(f) => {
            use zbus::DBusError;
            Some((
                f.name().to_string(),
                f.description().unwrap_or_default().to_owned(),
            ))
        }
        _ => None,
    }
}

#[zbus::proxy(
    interface = "de.thueringen.thvc.node1.Job",
    default_service = "de.thueringen.thvc.node1"
)]
pub trait Job {
    /// Bytes done and expected (0: unknown) of a pull-image job.
    #[zbus(property(emits_changed_signal = "false"))]
    fn progress(&self) -> zbus::Result<(u64, u64)>;
    #[zbus(property(emits_changed_signal = "false"))]
    fn status(&self) -> zbus::Result<String>;
    fn cancel(&self) -> zbus::Result<()>;
}
