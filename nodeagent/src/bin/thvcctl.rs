//! `thvcctl`: command-line client of the thvc node agent (de.thueringen.thvc.node1).

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use serde_json::json;
use thvc_nodeagent::client::{self, BusTarget, ManagerProxy};

#[derive(Parser)]
#[command(
    name = "thvcctl",
    version,
    about = "Control a thvc node (VMs, images, network)"
)]
struct Cli {
    /// Operate on the system bus of a remote node over SSH (runs systemd-stdio-bridge there).
    #[arg(short = 'H', long = "host", value_name = "[USER@]HOST", global = true)]
    host: Option<String>,
    /// Bus to use: system (default), session, or a D-Bus address.
    #[arg(long, global = true, conflicts_with = "host")]
    bus: Option<String>,
    /// Machine-readable JSON output.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Node facts and VM counts.
    Status,
    /// Virtual machines.
    Vm {
        #[command(subcommand)]
        action: VmAction,
    },
    /// Host network configuration.
    Net {
        #[command(subcommand)]
        action: NetAction,
    },
    /// The node's image store.
    Image {
        #[command(subcommand)]
        action: ImageAction,
    },
    /// The node's disk store (raw disks for VMs).
    Disk {
        #[command(subcommand)]
        action: DiskAction,
    },
    /// Node-wide operations.
    Host {
        #[command(subcommand)]
        action: HostAction,
    },
}

#[derive(Subcommand)]
enum HostAction {
    /// No new VM starts; running VMs are shut down gracefully, stopped after the timeout.
    /// Waits until every VM is down.
    Drain {
        /// Seconds a VM gets to shut down before it is stopped (with --to: to migrate
        /// before its migration is canceled; default then 3600).
        #[arg(long)]
        timeout: Option<u64>,
        /// Live-migrate the running VMs to this node instead of shutting them down; those
        /// that cannot move keep running here (the command fails naming them).
        #[arg(long, value_name = "HOST")]
        to: Option<String>,
        /// Print the drain job's object path and return.
        #[arg(long)]
        no_wait: bool,
    },
    /// Allow VM starts again (starts nothing).
    Undrain,
    /// Install the newest host image version from the update server (default: the node's
    /// thvc.update-url) into the inactive slot; it boots at the next `host reboot`.
    Update {
        /// The update server (http://, https:// or file:///) instead of the node's.
        url: Option<String>,
        /// Only say which version the server offers beyond the installed ones.
        #[arg(long)]
        check: bool,
        /// Print the update job's object path and return.
        #[arg(long)]
        no_wait: bool,
    },
    /// Print the public half of the node's TPM2 storage root key (PEM): the TPM2's identity
    /// (what `systemd-cryptenroll --tpm2-device-key` enrolls a volume to offline).
    TpmSrk,
    /// Print /var's recovery key as the node keeps it: a CMS envelope (PEM) that only the
    /// operator's escrow certificate opens (`openssl cms -decrypt -inkey ESCROW.key`).
    RecoveryKey,
    /// Shut every VM down gracefully (stopped after the timeout), then reboot the host.
    /// Autostart VMs start again when it is back.
    Reboot {
        /// Seconds a VM gets to shut down before it is stopped.
        #[arg(long, default_value_t = 120)]
        timeout: u64,
        /// Print the reboot job's object path and return.
        #[arg(long)]
        no_wait: bool,
    },
}

#[derive(Subcommand)]
enum VmAction {
    /// List VMs with their states.
    List,
    /// Define a VM from a JSON spec file ("-" for stdin).
    Create {
        name: String,
        spec: PathBuf,
    },
    Start {
        name: String,
        /// Print the job's object path and return instead of waiting for the job.
        #[arg(long)]
        no_wait: bool,
    },
    /// Graceful: ACPI power button, then stop after the agent's timeout.
    Shutdown {
        name: String,
        /// Print the job's object path and return instead of waiting for the job.
        #[arg(long)]
        no_wait: bool,
    },
    /// Stop the VMM now.
    Stop {
        name: String,
        /// Print the job's object path and return instead of waiting for the job.
        #[arg(long)]
        no_wait: bool,
    },
    /// Live-migrate a running VM to another node (its disks on storage both reach); prints
    /// the progress, then what moved. The VM exists on HOST afterwards, not here.
    Migrate {
        name: String,
        /// The target node, as this node's migration ssh configuration names it.
        #[arg(value_name = "HOST")]
        target: String,
        /// Print the job's object path and return.
        #[arg(long)]
        no_wait: bool,
    },
    Pause {
        name: String,
    },
    Resume {
        name: String,
    },
    Delete {
        name: String,
    },
    /// State, UUID, spec and the VMM's own info.
    #[command(visible_alias = "show")]
    Info {
        name: String,
    },
    /// Print the serial console log.
    Console {
        name: String,
        /// Keep printing new output until interrupted.
        #[arg(short, long)]
        follow: bool,
    },
    /// Make the node's VMs match a document (JSON, "-" for stdin): creates, updates,
    /// starts, shuts down and deletes as it says; prints the plan, then each action's result.
    Apply {
        file: PathBuf,
        /// Print the plan only; nothing changes.
        #[arg(long)]
        dry_run: bool,
        /// Print the plan and the job's object path and return.
        #[arg(long)]
        no_wait: bool,
    },
    /// Set whether the VM starts with the node.
    Autostart {
        name: String,
        #[arg(value_parser = ["on", "off"])]
        value: String,
    },
}

#[derive(Subcommand)]
enum NetAction {
    /// Show what applying FILE would change (nothing is changed).
    Plan { file: PathBuf },
    /// Apply FILE to the node's network.
    Apply { file: PathBuf },
    /// Show the host network as it is now, as a document.
    Show,
}

#[derive(Subcommand)]
enum ImageAction {
    /// Download URL into the image store and verify its SHA-256.
    Pull {
        url: String,
        sha256: String,
        /// Print the job's object path and return at once.
        #[arg(long)]
        no_wait: bool,
    },
    List,
    /// Delete an image (NAME as `image list` shows it); refused while a VM uses it.
    Delete {
        name: String,
    },
}

#[derive(Subcommand)]
enum DiskAction {
    /// Make a disk: empty (--size) or a raw copy of an image (--from; qcow2 is converted).
    Create {
        name: String,
        /// Size (bytes, or with K, M, G, T: powers of 1024); with --from, grow to it.
        #[arg(long, value_parser = parse_size, required_unless_present = "from")]
        size: Option<u64>,
        /// An image in the node's image store.
        #[arg(long, value_name = "IMAGE")]
        from: Option<String>,
    },
    /// Grow a disk (never shrinks; not while a running VM uses it).
    Resize {
        name: String,
        #[arg(value_parser = parse_size)]
        size: u64,
    },
    /// Delete a disk no VM uses.
    Delete { name: String },
    /// Disks with their sizes and the VMs that use them.
    List,
}

/// `1048576`, `512M`, `20G`, `1.5T`, `10GiB`: K, M, G, T are powers of 1024.
fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let t = t
        .strip_suffix("iB")
        .or_else(|| t.strip_suffix("ib"))
        .or_else(|| t.strip_suffix('B'))
        .unwrap_or(t);
    let (num, shift) = match t.chars().last().map(|c| c.to_ascii_uppercase()) {
        Some('K') => (&t[..t.len() - 1], 10),
        Some('M') => (&t[..t.len() - 1], 20),
        Some('G') => (&t[..t.len() - 1], 30),
        Some('T') => (&t[..t.len() - 1], 40),
        _ => (t, 0),
    };
    let bad = || format!("{s:?} is not a size like 1073741824, 512M, 20G or 1.5T");
    if num.is_empty() || !num.bytes().all(|b| b.is_ascii_digit() || b == b'.') {
        return Err(bad());
    }
    if let Ok(n) = num.parse::<u64>() {
        return n.checked_mul(1u64 << shift).ok_or_else(bad);
    }
    // Fractions (1.5T) only with a unit, rounded down to whole bytes.
    let f: f64 = num.parse().map_err(|_| bad())?;
    let bytes = f * (1u64 << shift) as f64;
    if shift == 0 || !bytes.is_finite() || bytes >= u64::MAX as f64 {
        return Err(bad());
    }
    Ok(bytes as u64)
}

/// Bytes for people: `0 B`, `512 B`, `20.0 GiB`.
fn human(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["KiB", "MiB", "GiB", "TiB", "PiB"];
    if bytes < 1024 {
        return format!("{bytes} B");
    }
    let mut v = bytes as f64 / 1024.0;
    let mut unit = 0;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    format!("{v:.1} {}", UNITS[unit])
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("thvcctl: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // Show the D-Bus error name too: scripts and people grep for it.
            if let Some(z) = e.downcast_ref::<zbus::Error>() {
                if let Some((name, msg)) = client::method_error(z) {
                    eprintln!("thvcctl: {msg} [{name}]");
                    return ExitCode::FAILURE;
                }
            }
            eprintln!("thvcctl: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn read_input(path: &PathBuf) -> Result<String> {
    if path.as_os_str() == "-" {
        let mut s = String::new();
        std::io::Read::read_to_string(&mut std::io::stdin(), &mut s).context("reading stdin")?;
        Ok(s)
    } else {
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))
    }
}

async fn run(cli: Cli) -> Result<()> {
    let target = match (&cli.host, &cli.bus) {
        (Some(h), _) => BusTarget::Ssh(h.clone()),
        (None, Some(b)) => BusTarget::parse(b),
        (None, None) => BusTarget::System,
    };
    let conn = client::connect(&target).await?;
    let manager = ManagerProxy::builder(&conn)
        .cache_properties(zbus::proxy::CacheProperties::No)
        .build()
        .await?;
    let json_out = cli.json;
    match cli.command {
        Command::Status => status(&manager, json_out).await,
        Command::Vm { action } => vm(&conn, &manager, action, json_out).await,
        Command::Net { action } => {
            let out = match action {
                NetAction::Plan { file } => {
                    manager.apply_network(&read_input(&file)?, true).await?
                }
                NetAction::Apply { file } => {
                    manager.apply_network(&read_input(&file)?, false).await?
                }
                NetAction::Show => manager.get_network().await?,
            };
            println!("{out}");
            Ok(())
        }
        Command::Disk { action } => disk(&manager, action, json_out).await,
        Command::Host { action } => match action {
            HostAction::Drain {
                timeout,
                to,
                no_wait,
            } => {
                let mut removed = manager.receive_job_removed().await?;
                let job = match &to {
                    Some(target) => manager.drain_to(timeout.unwrap_or(3600), target).await?,
                    None => manager.drain(timeout.unwrap_or(120)).await?,
                };
                if no_wait {
                    println!("{}", job.as_str());
                    return Ok(());
                }
                wait_job(&mut removed, &job, "drain").await
            }
            HostAction::Undrain => Ok(manager.undrain().await?),
            HostAction::Update {
                url,
                check,
                no_wait,
            } => {
                let mut removed = manager.receive_job_removed().await?;
                let job = manager.update(url.as_deref().unwrap_or(""), check).await?;
                if no_wait {
                    println!("{}", job.as_str());
                    return Ok(());
                }
                let what = if check { "update check" } else { "update" };
                let (result, message) = job_end(&mut removed, &job, what).await?;
                if result != "done" {
                    anyhow::bail!("{what} {result}: {message}");
                }
                if json_out {
                    println!("{}", json!({ "result": result, "message": message }));
                } else {
                    println!("{message}");
                }
                Ok(())
            }
            HostAction::RecoveryKey => print_pem(
                manager.var_recovery_key().await?,
                "the node has no /var recovery key (it makes one when given the operator's escrow certificate: credential thvc.recovery-escrow)",
            ),
            HostAction::TpmSrk => print_pem(
                manager.tpm_srk_public_key().await?,
                "the node has no TPM2 storage root key (no TPM2, or systemd has not set it up)",
            ),
            HostAction::Reboot { timeout, no_wait } => {
                let mut removed = manager.receive_job_removed().await?;
                let job = manager.reboot(timeout).await?;
                if no_wait {
                    println!("{}", job.as_str());
                    return Ok(());
                }
                // The node may go down before its JobRemoved reaches us: the connection
                // ending after the reboot job began is the reboot itself.
                match job_removed(&mut removed, &job).await? {
                    Some((result, message)) if result != "done" => {
                        anyhow::bail!("reboot {result}: {message}")
                    }
                    Some((_, message)) => println!("{message}"),
                    None => println!("the node went down for its reboot (the connection ended)"),
                }
                Ok(())
            }
        },
        Command::Image { action } => match action {
            ImageAction::Pull {
                url,
                sha256,
                no_wait,
            } => {
                let Some(path) = pull_job(&manager, &url, &sha256, no_wait).await? else {
                    return Ok(());
                };
                if json_out {
                    println!("{}", json!({ "path": path }));
                } else {
                    println!("{path}");
                }
                Ok(())
            }
            ImageAction::List => {
                let images = manager.list_images().await?;
                if json_out {
                    let v: Vec<_> = images
                        .iter()
                        .map(|(n, s, h)| json!({"name": n, "size": s, "sha256": h}))
                        .collect();
                    println!("{}", serde_json::Value::Array(v));
                } else {
                    println!("{:<40} {:>14}  SHA256", "NAME", "SIZE");
                    for (n, s, h) in images {
                        println!("{n:<40} {s:>14}  {}", if h.is_empty() { "-" } else { &h });
                    }
                }
                Ok(())
            }
            ImageAction::Delete { name } => {
                manager.delete_image(&name).await?;
                Ok(())
            }
        },
    }
}

async fn disk(manager: &ManagerProxy<'_>, action: DiskAction, json_out: bool) -> Result<()> {
    match action {
        DiskAction::Create { name, size, from } => {
            let mut options = serde_json::Map::new();
            if let Some(size) = size {
                options.insert("size".into(), json!(size));
            }
            if let Some(image) = from {
                options.insert("from_image".into(), json!(image));
            }
            let created = manager
                .create_disk(&name, &serde_json::Value::Object(options).to_string())
                .await?;
            if json_out {
                println!("{created}");
            } else {
                let v: serde_json::Value = serde_json::from_str(&created)?;
                println!(
                    "created {name} ({}, {} allocated, {})",
                    human(v["size"].as_u64().unwrap_or(0)),
                    human(v["allocated"].as_u64().unwrap_or(0)),
                    v["method"].as_str().unwrap_or("")
                );
            }
        }
        DiskAction::Resize { name, size } => manager.resize_disk(&name, size).await?,
        DiskAction::Delete { name } => manager.delete_disk(&name).await?,
        DiskAction::List => {
            let listed = manager.list_disks().await?;
            if json_out {
                println!("{listed}");
            } else {
                let disks: Vec<serde_json::Value> = serde_json::from_str(&listed)?;
                println!("{:<40} {:>12} {:>12}  USERS", "NAME", "SIZE", "ALLOCATED");
                for d in disks {
                    let users: Vec<&str> = d["users"]
                        .as_array()
                        .map(|u| u.iter().filter_map(|v| v.as_str()).collect())
                        .unwrap_or_default();
                    println!(
                        "{:<40} {:>12} {:>12}  {}",
                        d["name"].as_str().unwrap_or(""),
                        human(d["size"].as_u64().unwrap_or(0)),
                        human(d["allocated"].as_u64().unwrap_or(0)),
                        if users.is_empty() {
                            "-".to_owned()
                        } else {
                            users.join(",")
                        }
                    );
                }
            }
        }
    }
    Ok(())
}

/// Prints a PEM property the agent keeps empty when there is none; none is an error.
fn print_pem(pem: String, none: &str) -> anyhow::Result<()> {
    if pem.is_empty() {
        anyhow::bail!("{none}");
    }
    print!("{pem}");
    Ok(())
}

/// A property agents older than this thvcctl may lack: None when the agent says
/// UnknownProperty, the value otherwise.
fn newer_property<T>(r: zbus::Result<T>) -> zbus::Result<Option<T>> {
    match r {
        Ok(v) => Ok(Some(v)),
        Err(e)
            if client::method_error(&e)
                .is_some_and(|(name, _)| name == "org.freedesktop.DBus.Error.UnknownProperty") =>
        {
            Ok(None)
        }
        Err(e) => Err(e),
    }
}

async fn status(manager: &ManagerProxy<'_>, json_out: bool) -> Result<()> {
    let vms = manager.list_vms().await?;
    let running = vms.iter().filter(|v| v.1 == "running").count();
    let failed = vms.iter().filter(|v| v.1 == "failed").count();
    // An agent older than this thvcctl lacks the newer properties (FailedVersions,
    // TimeSynchronized, SecureBoot, TpmSrkPublicKey): unknown (null), not an error (a fleet
    // runs mixed versions while an update rolls out).
    let failed_versions: Option<Vec<serde_json::Value>> =
        newer_property(manager.failed_versions().await)?.map(|list| {
            list.into_iter()
                .map(|(version, tries, since)| {
                    json!({
                        "version": version,
                        "tries": tries,
                        "since": rfc3339(since),
                        "since_usec": since,
                    })
                })
                .collect()
        });
    let time_synchronized = newer_property(manager.time_synchronized().await)?;
    let secure_boot = newer_property(manager.secure_boot().await)?;
    let tpm2 = newer_property(manager.tpm_srk_public_key().await)?.map(|pem| !pem.is_empty());
    let provisioning = newer_property(manager.provisioning().await)?;
    let pcr_key = newer_property(manager.pcr_key().await)?;
    let v = json!({
        "hostname": manager.hostname().await?,
        "version": manager.version().await?,
        "image_version": manager.image_version().await?,
        "installed_versions": manager.installed_versions().await?,
        "failed_versions": failed_versions,
        "kvm_available": manager.kvm_available().await?,
        "cpus": manager.cpus().await?,
        "memory_bytes": manager.memory_bytes().await?,
        "memory_available_bytes": manager.memory_available_bytes().await?,
        "network_state": manager.network_state().await?,
        "time_synchronized": time_synchronized,
        "secure_boot": secure_boot,
        "tpm2": tpm2,
        "provisioning": provisioning,
        "pcr_key": pcr_key,
        "drained": manager.drained().await?,
        "vcpus_allocated": manager.allocated_vcpus().await?,
        "vcpus_capacity": manager.vcpu_capacity().await?,
        "memory_allocated_mib": manager.allocated_memory_mib().await?,
        "memory_capacity_mib": manager.memory_capacity_mib().await?,
        "image_store_free_bytes": manager.image_store_free_bytes().await?,
        "disk_store_free_bytes": manager.disk_store_free_bytes().await?,
        "vms": vms.len(),
        "vms_running": running,
        "vms_failed": failed,
    });
    if json_out {
        println!("{v}");
    } else {
        let gib = |b: &serde_json::Value| b.as_u64().unwrap_or(0) as f64 / (1u64 << 30) as f64;
        println!("Host:      {}", v["hostname"].as_str().unwrap_or(""));
        let installed: Vec<&str> = v["installed_versions"]
            .as_array()
            .map(|a| a.iter().filter_map(|x| x.as_str()).collect())
            .unwrap_or_default();
        if installed.is_empty() {
            println!("Image:     {}", v["image_version"].as_str().unwrap_or(""));
        } else {
            println!(
                "Image:     {} (installed: {})",
                v["image_version"].as_str().unwrap_or(""),
                installed.join(", ")
            );
        }
        for f in v["failed_versions"].as_array().into_iter().flatten() {
            let tries = f["tries"].as_u64().unwrap_or(0);
            println!(
                "Failed:    {} ({tries} boot attempt{}; rolled back at the boot of {})",
                f["version"].as_str().unwrap_or(""),
                if tries == 1 { "" } else { "s" },
                utc_text(f["since_usec"].as_u64().unwrap_or(0))
            );
        }
        println!("Agent:     {}", v["version"].as_str().unwrap_or(""));
        println!(
            "KVM:       {}",
            if v["kvm_available"] == true {
                "yes"
            } else {
                "no"
            }
        );
        println!("CPUs:      {}", v["cpus"]);
        println!(
            "Memory:    {:.1} GiB total, {:.1} GiB available",
            gib(&v["memory_bytes"]),
            gib(&v["memory_available_bytes"])
        );
        println!("Network:   {}", v["network_state"].as_str().unwrap_or(""));
        match v["time_synchronized"].as_bool() {
            Some(true) => println!("Time:      synchronised"),
            Some(false) => println!("Time:      not synchronised"),
            None => println!("Time:      unknown (the agent does not report it)"),
        }
        println!(
            "Boot:      Secure Boot {}, {}",
            v["secure_boot"].as_str().unwrap_or("unknown"),
            match v["tpm2"].as_bool() {
                Some(true) => "TPM2 (thvcctl host tpm-srk)",
                Some(false) => "no TPM2",
                None => "TPM2 unknown",
            }
        );
        if v["provisioning"] == true {
            println!(
                "           PROVISIONING BOOT: /var is in memory, nothing of this boot is kept; \
                 seal the credentials, enroll the Secure Boot keys, reboot"
            );
        }
        match v["pcr_key"].as_str() {
            Some("") => println!("PCR key:   not checked yet (/var's sealing)"),
            Some(fp) => println!("PCR key:   {fp} (/var and the credentials sealed to it)"),
            None => println!("PCR key:   unknown (the agent does not report it)"),
        }
        println!(
            "Allocated: {} of {} vCPUs, {} of {} MiB (running and autostart VMs)",
            v["vcpus_allocated"],
            v["vcpus_capacity"],
            v["memory_allocated_mib"],
            v["memory_capacity_mib"]
        );
        println!(
            "Stores:    {:.1} GiB free for images, {:.1} GiB for disks",
            gib(&v["image_store_free_bytes"]),
            gib(&v["disk_store_free_bytes"])
        );
        if v["drained"] == true {
            println!("Drained:   yes (no VM starts; `thvcctl host undrain` lifts it)");
        }
        println!(
            "VMs:       {} ({running} running, {failed} failed)",
            vms.len()
        );
    }
    Ok(())
}

/// The `Uuid` of every VM object by path, from one GetManagedObjects call (not one
/// property read per VM).
async fn vm_uuids(conn: &zbus::Connection) -> Result<std::collections::HashMap<String, String>> {
    let om = zbus::fdo::ObjectManagerProxy::builder(conn)
        .destination(client::BUS_NAME)?
        .path(thvc_nodeagent::names::MANAGER_PATH)?
        .build()
        .await?;
    let mut out = std::collections::HashMap::new();
    for (path, ifaces) in om.get_managed_objects().await? {
        let uuid = ifaces
            .iter()
            .find(|(i, _)| i.as_str() == thvc_nodeagent::bus::VM_INTERFACE)
            .and_then(|(_, props)| props.get("Uuid"))
            .and_then(|v| String::try_from(v.try_clone().ok()?).ok());
        if let Some(uuid) = uuid {
            out.insert(path.to_string(), uuid);
        }
    }
    Ok(out)
}

async fn vm(
    conn: &zbus::Connection,
    manager: &ManagerProxy<'_>,
    action: VmAction,
    json_out: bool,
) -> Result<()> {
    let proxy = |name: String| async move {
        let path = manager.get_vm(&name).await?;
        Ok::<_, anyhow::Error>(client::vm_proxy(conn, path).await?)
    };
    match action {
        VmAction::List => {
            let vms = manager.list_vms().await?;
            let uuids = vm_uuids(conn).await?;
            let uuid_of = |p: &zbus::zvariant::OwnedObjectPath| {
                uuids.get(p.as_str()).cloned().unwrap_or_default()
            };
            if json_out {
                let v: Vec<_> = vms
                    .iter()
                    .map(|(n, s, p)| {
                        json!({"name": n, "state": s, "uuid": uuid_of(p), "path": p.as_str()})
                    })
                    .collect();
                println!("{}", serde_json::Value::Array(v));
            } else {
                println!("{:<32} {:<10} UUID", "NAME", "STATE");
                for (n, s, p) in &vms {
                    println!("{n:<32} {s:<10} {}", uuid_of(p));
                }
            }
        }
        VmAction::Apply {
            file,
            dry_run,
            no_wait,
        } => apply_vms(manager, &read_input(&file)?, dry_run, no_wait, json_out).await?,
        VmAction::Create { name, spec } => {
            let path = manager.create_vm(&name, &read_input(&spec)?).await?;
            if json_out {
                println!("{}", json!({"name": name, "path": path.as_str()}));
            } else {
                println!("created {name} ({})", path.as_str());
            }
        }
        VmAction::Start { name, no_wait } => {
            run_job(
                manager,
                &proxy(name.clone()).await?,
                JobKind::Start,
                &name,
                no_wait,
            )
            .await?
        }
        VmAction::Migrate {
            name,
            target,
            no_wait,
        } => migrate(manager, &name, &target, no_wait).await?,
        VmAction::Shutdown { name, no_wait } => {
            let vm = proxy(name.clone()).await?;
            run_job(manager, &vm, JobKind::Shutdown, &name, no_wait).await?
        }
        VmAction::Stop { name, no_wait } => {
            run_job(
                manager,
                &proxy(name.clone()).await?,
                JobKind::Stop,
                &name,
                no_wait,
            )
            .await?
        }
        VmAction::Pause { name } => proxy(name).await?.pause().await?,
        VmAction::Resume { name } => proxy(name).await?.resume().await?,
        VmAction::Delete { name } => manager.delete_vm(&name).await?,
        VmAction::Autostart { name, value } => {
            proxy(name).await?.set_autostart(value == "on").await?
        }
        VmAction::Info { name } => {
            let vm = proxy(name.clone()).await?;
            let state = vm.state().await?;
            let reason = vm.state_reason().await?;
            let uuid = vm.uuid().await?;
            // The agent hides the spec (empty) from callers without the vm-control role.
            let spec_text = vm.spec().await?;
            let spec: serde_json::Value = if spec_text.is_empty() {
                json!({ "hidden": "reading the spec needs the vm-control role" })
            } else {
                serde_json::from_str(&spec_text)?
            };
            // The VMM's view exists only while it runs.
            let vmm: serde_json::Value = match vm.info().await {
                Ok(s) => serde_json::from_str(&s).unwrap_or(serde_json::Value::String(s)),
                Err(e) => {
                    json!({ "unavailable": client::method_error(&e).map(|m| m.1).unwrap_or_else(|| e.to_string()) })
                }
            };
            let v = json!({"name": name, "uuid": uuid, "state": state, "state_reason": reason, "spec": spec, "vmm": vmm});
            if json_out {
                println!("{v}");
            } else {
                println!("{}", serde_json::to_string_pretty(&v)?);
            }
        }
        VmAction::Console { name, follow } => {
            let vm = proxy(name).await?;
            let mut offset = 0u64;
            let mut stdout = std::io::stdout();
            loop {
                let (data, next) = vm.read_console(offset).await?;
                if !data.is_empty() {
                    stdout.write_all(&data)?;
                    stdout.flush()?;
                }
                let caught_up = data.is_empty();
                offset = next;
                if caught_up {
                    if !follow {
                        break;
                    }
                    tokio::time::sleep(Duration::from_millis(250)).await;
                }
            }
        }
    }
    Ok(())
}

/// (year, month, day) of a day counted from 1970-01-01 (Howard Hinnant's `civil_from_days`).
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let month = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let year = yoe + era * 400 + i64::from(month <= 2);
    (year, month, day)
}

/// UTC date and time (to the second) of µs since the epoch.
fn utc_parts(usec: u64) -> (i64, u32, u32, u64, u64, u64) {
    let secs = usec / 1_000_000;
    let (y, m, d) = civil_from_days((secs / 86_400) as i64);
    let s = secs % 86_400;
    (y, m, d, s / 3600, s / 60 % 60, s % 60)
}

/// `2026-12-05T19:02:11Z`
fn rfc3339(usec: u64) -> String {
    let (y, m, d, hh, mm, ss) = utc_parts(usec);
    format!("{y:04}-{m:02}-{d:02}T{hh:02}:{mm:02}:{ss:02}Z")
}

/// `2026-12-05 19:02:11 UTC`
fn utc_text(usec: u64) -> String {
    let (y, m, d, hh, mm, ss) = utc_parts(usec);
    format!("{y:04}-{m:02}-{d:02} {hh:02}:{mm:02}:{ss:02} UTC")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utc_times() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(utc_text(951_782_400_000_000), "2000-02-29 00:00:00 UTC");
        assert_eq!(rfc3339(1_796_497_331_999_999), "2026-12-05T19:02:11Z");
        assert_eq!(utc_text(1_796_497_331_000_000), "2026-12-05 19:02:11 UTC");
        assert_eq!(rfc3339(4_102_444_799_000_000), "2099-12-31T23:59:59Z");
        assert_eq!(rfc3339(u64::MAX), "586524-01-19T08:01:49Z");
    }

    #[test]
    fn sizes() {
        assert_eq!(parse_size("1048576"), Ok(1 << 20));
        assert_eq!(parse_size("512K"), Ok(512 << 10));
        assert_eq!(parse_size("512M"), Ok(512 << 20));
        assert_eq!(parse_size("20G"), Ok(20 << 30));
        assert_eq!(parse_size("20g"), Ok(20 << 30));
        assert_eq!(parse_size("10GiB"), Ok(10 << 30));
        assert_eq!(parse_size("2T"), Ok(2 << 40));
        assert_eq!(parse_size("1.5G"), Ok(3 << 29));
        for bad in ["", "G", "-1G", "1.5", "1e3", "12X", "1 G x", "99999999999T"] {
            assert!(parse_size(bad).is_err(), "{bad:?}");
        }
        assert_eq!(human(0), "0 B");
        assert_eq!(human(1023), "1023 B");
        assert_eq!(human(1 << 20), "1.0 MiB");
        assert_eq!(human(20 << 30), "20.0 GiB");
        assert_eq!(human(3 << 39), "1.5 TiB");
    }
}

/// Pulls an image as an agent job, showing its progress on stderr (a bar on a terminal, a
/// line every few seconds otherwise); returns the image's path, or None with `no_wait` (the
/// job path is printed then).
async fn pull_job(
    manager: &client::ManagerProxy<'_>,
    url: &str,
    sha256: &str,
    no_wait: bool,
) -> anyhow::Result<Option<String>> {
    use futures_util::StreamExt;
    use std::io::{IsTerminal, Write};
    let mut removed = manager.receive_job_removed().await?;
    let job_path = manager.pull_image_job(url, sha256).await?;
    if no_wait {
        println!("{}", job_path.as_str());
        return Ok(None);
    }
    let job = client::JobProxy::builder(manager.inner().connection())
        .path(job_path.clone())?
        .build()
        .await?;
    let terminal = std::io::stderr().is_terminal();
    let mut tick = tokio::time::interval(std::time::Duration::from_millis(if terminal {
        200
    } else {
        5000
    }));
    let mut shown = false;
    loop {
        tokio::select! {
            signal = removed.next() => {
                let Some(signal) = signal else {
                    anyhow::bail!("the bus connection ended before the pull of {url} did");
                };
                let args = signal.args()?;
                if args.path.as_str() != job_path.as_str() {
                    continue;
                }
                if shown && terminal {
                    eprintln!();
                }
                if args.result == "done" {
                    return Ok(Some(args.message.to_string()));
                }
                anyhow::bail!("pull of {url} {}: {}", args.result, args.message);
            }
            _ = tick.tick() => {
                // The job may have ended between the signal and this read.
                let Ok((done, total)) = job.progress().await else { continue };
                let mib = |b: u64| b as f64 / (1024.0 * 1024.0);
                let text = match done.saturating_mul(100).checked_div(total) {
                    Some(pct) => {
                        let bar = "#".repeat((pct / 5).min(20) as usize);
                        format!("[{bar:<20}] {pct:>3}% {:.1}/{:.1} MiB", mib(done), mib(total))
                    }
                    None => format!("{:.1} MiB", mib(done)),
                };
                if terminal {
                    eprint!("\r{text}");
                    let _ = std::io::stderr().flush();
                } else {
                    eprintln!("pulling {url}: {text}");
                }
                shown = true;
            }
        }
    }
}

#[derive(Clone, Copy)]
enum JobKind {
    Start,
    Shutdown,
    Stop,
}

/// Runs a VM operation as an agent job: subscribes to JobRemoved first (a fast job could end
/// before a later subscription), calls the job method, then waits for the job's JobRemoved.
/// With `no_wait`, prints the job path and returns.
async fn run_job(
    manager: &client::ManagerProxy<'_>,
    vm: &client::VmProxy<'_>,
    kind: JobKind,
    name: &str,
    no_wait: bool,
) -> anyhow::Result<()> {
    let mut removed = manager.receive_job_removed().await?;
    let (job, what) = match kind {
        JobKind::Start => (vm.start_job().await?, "start"),
        JobKind::Shutdown => (vm.shutdown_job().await?, "shutdown"),
        JobKind::Stop => (vm.stop_job().await?, "stop"),
    };
    if no_wait {
        println!("{}", job.as_str());
        return Ok(());
    }
    wait_job(&mut removed, &job, &format!("{what} of {name}")).await
}

/// `vm migrate`: the job, its progress on stderr while it runs, its message at the end.
async fn migrate(
    manager: &client::ManagerProxy<'_>,
    name: &str,
    host: &str,
    no_wait: bool,
) -> anyhow::Result<()> {
    let mut removed = manager.receive_job_removed().await?;
    let job = manager.migrate_vm(name, host).await?;
    if no_wait {
        println!("{}", job.as_str());
        return Ok(());
    }
    let proxy = client::JobProxy::builder(manager.inner().connection())
        .path(job.clone())?
        .build()
        .await?;
    let what = format!("migration of {name} to {host}");
    let end = job_end(&mut removed, &job, &what);
    tokio::pin!(end);
    let (result, message) = loop {
        tokio::select! {
            end = &mut end => break end?,
            () = tokio::time::sleep(std::time::Duration::from_secs(1)) => {
                if let (Ok((sent, memory)), Ok(status)) = (proxy.progress().await, proxy.status().await) {
                    let phase = serde_json::from_str::<serde_json::Value>(&status)
                        .ok()
                        .and_then(|s| s["state"].as_str().map(str::to_owned))
                        .unwrap_or_default();
                    eprintln!("{name}: {phase} {} MiB sent of {} MiB memory", sent >> 20, memory >> 20);
                }
            }
        }
    };
    if result != "done" {
        anyhow::bail!("{what} {result}: {message}");
    }
    println!("{message}");
    Ok(())
}

/// Waits for `job`'s JobRemoved on `removed` (subscribed before the job was created); an
/// error unless it ended `done`.
async fn wait_job(
    removed: &mut client::JobRemovedStream,
    job: &zbus::zvariant::OwnedObjectPath,
    what: &str,
) -> anyhow::Result<()> {
    let (result, message) = job_end(removed, job, what).await?;
    if result == "done" {
        return Ok(());
    }
    anyhow::bail!("{what} {result}: {message}")
}

/// The result and message of `job`'s JobRemoved.
async fn job_end(
    removed: &mut client::JobRemovedStream,
    job: &zbus::zvariant::OwnedObjectPath,
    what: &str,
) -> anyhow::Result<(String, String)> {
    match job_removed(removed, job).await? {
        Some(end) => Ok(end),
        None => anyhow::bail!("the bus connection ended before the job ({what}) did"),
    }
}

/// `job`'s JobRemoved (result, message), or None if the connection ended first.
async fn job_removed(
    removed: &mut client::JobRemovedStream,
    job: &zbus::zvariant::OwnedObjectPath,
) -> anyhow::Result<Option<(String, String)>> {
    use futures_util::StreamExt;
    while let Some(signal) = removed.next().await {
        let args = signal.args()?;
        if args.path.as_str() == job.as_str() {
            return Ok(Some((args.result.to_string(), args.message.to_string())));
        }
    }
    Ok(None)
}

/// `vm apply`: the plan at once, then (unless a dry run) each action's result.
async fn apply_vms(
    manager: &ManagerProxy<'_>,
    document: &str,
    dry_run: bool,
    no_wait: bool,
    json_out: bool,
) -> Result<()> {
    let mut removed = manager.receive_job_removed().await?;
    let (plan_json, job) = manager.apply_vms(document, dry_run).await?;
    let plan: serde_json::Value =
        serde_json::from_str(&plan_json).context("the agent's plan is not JSON")?;
    let nothing = job.as_str() == "/";
    if json_out && (dry_run || nothing || no_wait) {
        println!("{plan_json}");
        return Ok(());
    }
    if !json_out {
        let actions = plan["actions"].as_array().map_or(&[][..], |a| a);
        if !actions.is_empty() {
            println!("plan:");
        }
        print_actions(actions);
        for (key, label) in [("unchanged", "unchanged"), ("left_alone", "left alone")] {
            let names: Vec<&str> = plan[key].as_array().map_or(Vec::new(), |a| {
                a.iter().filter_map(|n| n.as_str()).collect()
            });
            if !names.is_empty() {
                println!("{label}: {}", names.join(", "));
            }
        }
        if dry_run || nothing {
            if nothing && !dry_run {
                println!("nothing to do");
            }
            return Ok(());
        }
        if no_wait {
            println!("{}", job.as_str());
            return Ok(());
        }
    }
    let (result, message) = job_end(&mut removed, &job, "apply").await?;
    let report: Option<Vec<serde_json::Value>> = serde_json::from_str(&message).ok();
    match (&report, json_out) {
        (Some(_), true) => println!("{message}"),
        (Some(actions), false) => {
            println!("results:");
            print_actions(actions);
        }
        (None, _) => {}
    }
    if result == "done" {
        return Ok(());
    }
    match report {
        Some(_) => anyhow::bail!("apply {result}: not every action succeeded"),
        None => anyhow::bail!("apply {result}: {message}"),
    }
}

fn print_actions(actions: &[serde_json::Value]) {
    for a in actions {
        let s = |k: &str| a[k].as_str().unwrap_or("").to_owned();
        let mut line = format!("  {:<9} {:<24} {}", s("action"), s("vm"), s("reason"));
        if let Some(fields) = a["fields"].as_array() {
            let f: Vec<&str> = fields.iter().filter_map(|f| f.as_str()).collect();
            line.push_str(&format!(" ({})", f.join(", ")));
        }
        if let Some(effect) = a["effect"].as_str() {
            line.push_str(&format!(", takes effect: {effect}"));
        }
        if let Some(result) = a["result"].as_str() {
            line.push_str(&format!(": {result}"));
        }
        if let Some(error) = a["error"].as_str() {
            line.push_str(&format!(": {error}"));
        }
        println!("{line}");
    }
}
