//! `thvc-nodeagent`: the node daemon (default), the network configurator front end
//! (`net plan|apply|show`), and the helpers it runs as other processes (`supervise-vm`,
//! `exec-vm`).

use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand, ValueEnum};
use thvc_nodeagent::auth::DEFAULT_CONTROL_GROUP;
use thvc_nodeagent::bus::{self, BUS_NAME};
use thvc_nodeagent::client::BusTarget;
use thvc_nodeagent::layout::Layout;
use thvc_nodeagent::network::Network;
use thvc_nodeagent::node::{Node, NodeConfig};
use thvc_nodeagent::runner::{self, direct::DirectRunner, systemd::SystemdRunner, VmRunner};
use thvc_nodeagent::vmm_user::{UidRange, VmmUser};
use thvc_nodeagent::{hostinfo, runner::supervise};

#[derive(Parser)]
#[command(
    name = "thvc-nodeagent",
    version,
    about = "thvc node agent (D-Bus: de.thueringen.thvc.node1)"
)]
struct Cli {
    #[command(flatten)]
    daemon: DaemonArgs,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(clap::Args)]
struct DaemonArgs {
    /// Persistent state (VM specs, image and disk stores, network document).
    #[arg(long, default_value = "/var/lib/thvc")]
    state_dir: PathBuf,
    /// Runtime state of this boot (process records, API sockets).
    #[arg(long, default_value = "/run/thvc")]
    run_dir: PathBuf,
    /// Console and VMM logs.
    #[arg(long, default_value = "/var/log/thvc")]
    log_dir: PathBuf,
    /// Bus to serve on: system, session, or a D-Bus address.
    #[arg(long, default_value = "system")]
    bus: String,
    /// The thvc-vmm binary (default: next to this binary, else /usr/bin/thvc-vmm).
    #[arg(long)]
    vmm: Option<PathBuf>,
    /// How VMMs are run: systemd units where systemd is PID 1, else supervised directly.
    #[arg(long, value_enum, default_value_t = RunnerKind::Auto)]
    runner: RunnerKind,
    /// User all VMMs run as (NAME or UID:GID, not root) when VMs have no uids of their own
    /// (no --vmm-uids; direct runner only); it owns their TAP devices. The VMM is started
    /// with `thvc-vmm --user` (the agent must run as root) [default: the agent's own user,
    /// no switch].
    #[arg(long, value_name = "USER")]
    vmm_user: Option<String>,
    /// Give each VM's VMM its own uid (and private group) from FIRST-LAST: it can open its
    /// own disks, TAPs, console and API socket and nothing of other VMs' (POSIX ACLs on the
    /// files; see the README, "Per-VM users"). Needs the agent to run as root; required by
    /// the systemd runner (thvc-vm@.service starts as root and switches to the VM's uid).
    #[arg(long, value_name = "FIRST-LAST")]
    vmm_uids: Option<String>,
    /// UEFI firmware (edk2 CloudHv) for VMs with `firmware: "uefi"`.
    #[arg(long, default_value = "/usr/share/thvc/firmware/CLOUDHV.fd")]
    firmware: PathBuf,
    /// ssh, which carries live migrations to other nodes.
    #[arg(long, default_value = "/usr/bin/ssh")]
    ssh: PathBuf,
    /// ssh's configuration for live migrations: the account (thvc-migrate), key and known
    /// hosts of the other nodes (see the README, "Live migration between nodes").
    #[arg(long, default_value = "/usr/lib/thvc/migration/ssh_config")]
    migration_ssh_config: PathBuf,
    /// qemu-img (Debian's qemu-utils), which converts qcow2 images into raw disks.
    #[arg(long, default_value = "/usr/bin/qemu-img")]
    qemu_img: PathBuf,
    /// Group whose members (besides root) may change state.
    #[arg(long, default_value = DEFAULT_CONTROL_GROUP)]
    control_group: String,
    /// ROLE=GROUP: members of GROUP may act in ROLE (vm-control, console, network, images,
    /// host); repeatable. Defaults: thvc-vmctl, thvc-console, thvc-network, thvc-images,
    /// thvc-host.
    #[arg(long = "role-group", value_name = "ROLE=GROUP")]
    role_groups: Vec<String>,
    /// journald's native socket for audit records (default: /run/systemd/journal/socket if
    /// it exists; without one, audit records are stderr lines).
    #[arg(long)]
    journal_socket: Option<PathBuf>,
    /// Seconds Shutdown waits for the guest to power off before stopping the VMM.
    #[arg(long, default_value_t = 60)]
    shutdown_timeout: u64,
    /// Seconds Start waits for the VMM's API socket before calling it running anyway.
    #[arg(long, default_value_t = 5)]
    start_timeout: u64,
    /// Seconds Stop waits after SIGTERM (and again after SIGKILL) for the VMM to exit.
    #[arg(long, default_value_t = 10)]
    stop_timeout: u64,
    /// vCPUs the node's VMs may have per host CPU (running and autostart VMs), e.g. 4 or 1.5
    /// (tenths count); memory is never overcommitted.
    #[arg(long, default_value = "4", value_parser = parse_ratio)]
    vcpu_overcommit: u32,
    /// Host memory (MiB) no VM may be given: the node's own share.
    #[arg(long, default_value_t = 1024)]
    memory_reserve_mib: u64,
    /// os-release file for ImageVersion.
    #[arg(long, default_value = "/etc/os-release")]
    os_release: PathBuf,
    /// The kernel's block devices (their partition labels give InstalledVersions).
    #[arg(long, default_value = "/sys/class/block")]
    sys_block: PathBuf,
    /// Where the ESP is mounted: boot-counted UKIs in its EFI/Linux give FailedVersions
    /// (the versions systemd-boot rolled back from).
    #[arg(long, default_value = "/boot")]
    esp: PathBuf,
    /// efivarfs, for SecureBoot (the firmware's Secure Boot state).
    #[arg(long, default_value = "/sys/firmware/efi/efivars")]
    efivars: PathBuf,
    /// The TPM2 storage root key's public half as systemd-tpm2-setup writes it, for
    /// TpmSrkPublicKey (the TPM2's identity).
    #[arg(long, default_value = "/run/systemd/tpm2-srk-public-key.pem")]
    tpm2_srk: PathBuf,
    /// /var's recovery key in its envelope for the operator's escrow certificate, as
    /// /usr/lib/thvc/var-recovery-key writes it, for VarRecoveryKey.
    #[arg(long, default_value = "/var/lib/thvc/var-recovery-key.p7m")]
    var_recovery_key: PathBuf,
    /// The fingerprint of the PCR key /var and the credentials are sealed to, as
    /// thvc-pcr-key-rollover.service writes it, for PcrKey.
    #[arg(long, default_value = "/var/lib/thvc/pcr-key")]
    pcr_key_file: PathBuf,
    /// Present at a provisioning boot (thvc-provisioning-generator: Secure Boot off, no /var
    /// on the disk yet, /var in memory), for Provisioning.
    #[arg(long, default_value = "/run/thvc/provisioning")]
    provisioning_flag: PathBuf,
    /// Program for host updates and reboots (Manager.Update, Manager.Reboot):
    /// `PATH check|install [URL]` prints the version found or installed (nothing: none
    /// newer), `PATH reboot` starts the reboot. Without it both are refused. The image
    /// sets it with a drop-in (/usr/lib/thvc/host-helper).
    #[arg(long, value_name = "PATH", env = "THVC_HOST_HELPER")]
    host_helper: Option<PathBuf>,
    /// Per-VM metrics in the Prometheus text format, rewritten (atomically, mode 0644) every
    /// --metrics-interval for node-exporter's textfile collector; "" writes none. The agent
    /// listens on no network port. [default: RUN_DIR/metrics/thvc.prom, i.e.
    /// /run/thvc/metrics/thvc.prom]
    #[arg(long, value_name = "PATH")]
    metrics_file: Option<std::ffi::OsString>,
    /// Seconds between two writes of --metrics-file.
    #[arg(long, default_value_t = 15, value_parser = clap::value_parser!(u64).range(1..))]
    metrics_interval: u64,
}

#[derive(Clone, Copy, ValueEnum)]
enum RunnerKind {
    Auto,
    Direct,
    Systemd,
}

#[derive(Subcommand)]
enum Command {
    /// Host network configuration (runs the configurator locally, not through the daemon).
    Net {
        #[command(subcommand)]
        action: NetAction,
    },
    /// Internal: supervise one VMM process (started by the daemon's direct runner).
    #[command(hide = true)]
    SuperviseVm {
        #[arg(long)]
        run_dir: PathBuf,
        /// Become UID:GID:GROUPS before starting the VMM (per-VM uids).
        #[arg(long)]
        run_as: Option<String>,
        /// The VMM program and its arguments.
        #[arg(last = true, required = true)]
        vmm_argv: Vec<String>,
    },
    /// The forced command of the thvc-migrate SSH account: receives a VM another node
    /// migrates here (its stdin and stdout are the link; see the README, "Live migration
    /// between nodes"). Talks to the agent on --bus.
    MigrateReceive,
    /// Internal: ExecStart of thvc-vm@.service; execs the VMM with the argv the daemon wrote.
    #[command(hide = true)]
    ExecVm {
        #[arg(long)]
        run_dir: PathBuf,
    },
}

#[derive(Subcommand)]
enum NetAction {
    /// Show the changes applying FILE would make.
    Plan { file: PathBuf },
    /// Apply FILE.
    Apply { file: PathBuf },
    /// Show the observed host network.
    Show,
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match cli.command {
        Some(Command::SuperviseVm {
            run_dir,
            run_as,
            vmm_argv,
        }) => {
            let Some((vmm, args)) = vmm_argv.split_first() else {
                bail!("supervise-vm needs the VMM program after --");
            };
            let run_as = run_as
                .as_deref()
                .map(thvc_nodeagent::vmm_user::RunAs::parse_arg)
                .transpose()?;
            let code = supervise::run(&run_dir, Path::new(vmm), args, run_as.as_ref())
                .context("supervising the VMM")?;
            std::process::exit(code);
        }
        Some(Command::ExecVm { run_dir }) => {
            supervise::exec_vm(&run_dir).context("starting the VMM")?;
            Ok(())
        }
        Some(Command::Net { action }) => runtime()?.block_on(net_command(&cli.daemon, action)),
        Some(Command::MigrateReceive) => {
            // One line on stderr: the source's job repeats it.
            if let Err(e) = runtime()?.block_on(migrate_receive(&cli.daemon)) {
                eprintln!("{e:#}");
                std::process::exit(1);
            }
            Ok(())
        }
        None => runtime()?.block_on(run_daemon(cli.daemon)),
    }
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")
}

async fn net_command(args: &DaemonArgs, action: NetAction) -> Result<()> {
    let network = Network::new(args.state_dir.join("net"));
    let read = |f: &Path| -> Result<String> {
        std::fs::read_to_string(f).with_context(|| format!("reading {}", f.display()))
    };
    let out = match action {
        NetAction::Plan { file } => network.plan(&read(&file)?).await?,
        NetAction::Apply { file } => network.apply(&read(&file)?).await?,
        NetAction::Show => network.show().await?,
    };
    println!("{out}");
    Ok(())
}

/// How long `migrate-receive` carries the link: the VMMs bound a migration's waits for each
/// other (60 s each) but not its length; a day is beyond any guest's memory.
const RECEIVE_LIMIT: Duration = Duration::from_secs(86_400);

/// `migrate-receive`: the header from stdin, then stdin and stdout to the agent's ReceiveVm.
/// Its exit status and stderr are what the source's ssh reports.
async fn migrate_receive(args: &DaemonArgs) -> Result<()> {
    use std::os::fd::AsFd;
    // Not through std's Stdin: its buffer would take the VMM's first bytes after the header.
    let unbuffered_stdin = std::fs::File::from(
        std::io::stdin()
            .as_fd()
            .try_clone_to_owned()
            .context("duplicating stdin")?,
    );
    let (header, unbuffered_stdin) = tokio::task::spawn_blocking(move || {
        let mut stdin = unbuffered_stdin;
        thvc_nodeagent::migration::Header::read_from(&mut stdin).map(|h| (h, stdin))
    })
    .await
    .context("reading the migration header")??;
    let conn = thvc_nodeagent::client::connect(&BusTarget::parse(&args.bus)).await?;
    let manager = thvc_nodeagent::client::ManagerProxy::new(&conn).await?;
    // The agent gets a socket of ours, not our stdin and stdout (sshd's pipes): it ends the
    // link with shutdown(), which no leftover copy of its descriptor can hold open.
    let (link, agents) =
        std::os::unix::net::UnixStream::pair().context("making the link's socketpair")?;
    let stdin = unbuffered_stdin;
    let stdout = std::fs::File::from(
        std::io::stdout()
            .as_fd()
            .try_clone_to_owned()
            .context("duplicating stdout")?,
    );
    let carried = tokio::task::spawn_blocking(move || {
        thvc_nodeagent::migration::carry_stdio(stdin, stdout, &link, RECEIVE_LIMIT)
    });
    let said = manager
        .receive_vm(&header.name, &header.spec, (&agents).into())
        .await
        .with_context(|| format!("receiving VM {}", header.name))?;
    drop(agents);
    // The VMM's last words (that the guest runs there) go out before we end.
    carried
        .await
        .context("carrying the link")?
        .context("carrying the link")?;
    eprintln!("{said}");
    Ok(())
}

fn default_vmm() -> PathBuf {
    if let Ok(exe) = std::env::current_exe() {
        if let Some(dir) = exe.parent() {
            let sibling = dir.join("thvc-vmm");
            if sibling.exists() {
                return sibling;
            }
        }
    }
    PathBuf::from("/usr/bin/thvc-vmm")
}

/// The user the VMMs run as, and whether the VMM must be told to switch to it (see
/// `vmm_user.rs`).
fn vmm_user(requested: Option<&str>) -> Result<(VmmUser, bool)> {
    let me = VmmUser::current();
    let Some(name) = requested else {
        return Ok((me, false));
    };
    let user = VmmUser::resolve(name)?;
    if user == me {
        return Ok((user, false));
    }
    if me.uid != 0 {
        bail!(
            "--vmm-user {name}: the direct runner switches the VMM to another user with \
             `thvc-vmm --user`, which needs the agent to run as root (it runs as uid {})",
            me.uid
        );
    }
    Ok((user, true))
}

/// Holds an exclusive lock on the run directory: two agents adopting the same VMMs would
/// fight over them.
fn lock_run_dir(run_dir: &Path) -> Result<std::fs::File> {
    std::fs::create_dir_all(run_dir).with_context(|| format!("creating {}", run_dir.display()))?;
    let path = run_dir.join("agent.lock");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    // SAFETY: flock on a valid fd.
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc != 0 {
        bail!(
            "another thvc-nodeagent already uses {} ({})",
            run_dir.display(),
            std::io::Error::last_os_error()
        );
    }
    Ok(file)
}

async fn run_daemon(args: DaemonArgs) -> Result<()> {
    let _lock = lock_run_dir(&args.run_dir)?;
    let metrics_file = match args.metrics_file {
        None => Some(args.run_dir.join("metrics").join("thvc.prom")),
        Some(p) if p.is_empty() => None,
        Some(p) => {
            let p = PathBuf::from(p);
            if p.file_name().is_none() {
                bail!("--metrics-file {}: not a file name", p.display());
            }
            Some(p)
        }
    };
    let layout = Layout::new(args.state_dir, args.run_dir, args.log_dir);
    let use_systemd = match args.runner {
        RunnerKind::Auto => runner::systemd_is_pid1(),
        RunnerKind::Direct => false,
        RunnerKind::Systemd => true,
    };
    let vmm_uids = args
        .vmm_uids
        .as_deref()
        .map(UidRange::parse)
        .transpose()
        .map_err(|e| anyhow::anyhow!("--vmm-uids: {e}"))?;
    if vmm_uids.is_some() && VmmUser::current().uid != 0 {
        bail!("--vmm-uids: switching each VMM to its VM's uid needs the agent to run as root");
    }
    if use_systemd && vmm_uids.is_none() {
        bail!(
            "the systemd runner needs --vmm-uids FIRST-LAST: thvc-vm@.service starts each VMM \
             as root and switches to its VM's own uid"
        );
    }
    let (vmm_user, vmm_switches_user) = if vmm_uids.is_some() {
        // Per VM; this user is not used.
        (VmmUser::current(), false)
    } else {
        vmm_user(args.vmm_user.as_deref())?
    };
    let vm_runner: Arc<dyn VmRunner> = if use_systemd {
        Arc::new(SystemdRunner::new(layout.clone()))
    } else {
        let exe = std::env::current_exe().context("locating this executable")?;
        Arc::new(DirectRunner::new(layout.clone(), exe))
    };
    let node_name = hostinfo::hostname();
    let mut role_groups = thvc_nodeagent::auth::RoleGroups::new(args.control_group.clone());
    for setting in &args.role_groups {
        role_groups
            .set(setting)
            .map_err(|e| anyhow::anyhow!("--role-group {e}"))?;
    }
    let cfg = NodeConfig {
        layout,
        vmm_binary: args.vmm.unwrap_or_else(default_vmm),
        firmware: args.firmware,
        qemu_img: args.qemu_img,
        vmm_user,
        vmm_switches_user,
        vmm_uids,
        role_groups,
        journal_socket: args
            .journal_socket
            .or_else(thvc_nodeagent::audit::default_socket),
        control_group: args.control_group,
        node_name,
        os_release: args.os_release,
        sys_block: args.sys_block,
        esp: args.esp,
        efivars: args.efivars,
        tpm2_srk: args.tpm2_srk,
        var_recovery_key: args.var_recovery_key,
        pcr_key: args.pcr_key_file,
        provisioning_flag: args.provisioning_flag,
        shutdown_timeout: Duration::from_secs(args.shutdown_timeout),
        start_timeout: Duration::from_secs(args.start_timeout),
        stop_timeout: Duration::from_secs(args.stop_timeout),
        vcpu_overcommit_tenths: args.vcpu_overcommit,
        memory_reserve_mib: args.memory_reserve_mib,
        migration: thvc_nodeagent::migration::SshLink {
            ssh: args.ssh,
            config: args.migration_ssh_config,
        },
    };
    tracing::info!(runner = vm_runner.kind(), vmm = %cfg.vmm_binary.display(), vmm_user = %cfg.vmm_user, "starting");
    let host: Arc<dyn thvc_nodeagent::host::HostControl> = match args.host_helper {
        Some(helper) => Arc::new(thvc_nodeagent::host::HelperHost::new(helper)),
        None => Arc::new(thvc_nodeagent::host::NoHost),
    };
    let node = Node::new(cfg, vm_runner, host)?;
    let target = BusTarget::parse(&args.bus);
    let conn = thvc_nodeagent::client::connect(&target).await?;
    bus::serve(&conn, node.clone())
        .await
        .context("serving the manager object")?;
    // The host network first: VMs adopted or autostarted below need their bridges.
    match std::env::var_os("CREDENTIALS_DIRECTORY") {
        Some(dir) => node.apply_network_credential(Path::new(&dir)).await,
        None => tracing::debug!("no CREDENTIALS_DIRECTORY: no network credential"),
    }
    node.recover().await?;
    // Take the name last: a client that sees it finds every object already in place.
    conn.request_name_with_flags(BUS_NAME, zbus::fdo::RequestNameFlags::DoNotQueue.into())
        .await
        .with_context(|| format!("acquiring the bus name {BUS_NAME}"))?;
    tracing::info!("serving {BUS_NAME}");
    let trimmer = node.clone();
    tokio::spawn(async move { trimmer.console_trim_loop().await });
    match metrics_file {
        Some(file) => {
            tracing::info!(file = %file.display(), interval_s = args.metrics_interval, "writing metrics");
            tokio::spawn(Node::metrics_loop(
                Arc::downgrade(&node),
                file,
                Duration::from_secs(args.metrics_interval),
            ));
        }
        None => tracing::info!("no metrics file (--metrics-file \"\")"),
    }
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
    tracing::info!("exiting; running VMs keep running and are re-adopted on the next start");
    Ok(())
}

/// A ratio such as "4" or "1.5" in tenths (40, 15), between 0.1 and 64.
fn parse_ratio(s: &str) -> Result<u32, String> {
    let err = || format!("{s:?} is not a ratio between 0.1 and 64 (one decimal at most)");
    let (whole, tenth) = match s.split_once('.') {
        Some((w, t)) if t.len() == 1 => (w, t),
        Some(_) => return Err(err()),
        None => (s, "0"),
    };
    let whole: u32 = whole.parse().map_err(|_| err())?;
    let tenth: u32 = tenth.parse().map_err(|_| err())?;
    let tenths = whole
        .checked_mul(10)
        .and_then(|w| w.checked_add(tenth))
        .ok_or_else(err)?;
    if (1..=640).contains(&tenths) {
        Ok(tenths)
    } else {
        Err(err())
    }
}
