//! Live migration between nodes: the source's MigrateVm job and the target's ReceiveVm
//! (the link between them: [`crate::migration`]).
//!
//! The VM object moves with the guest: the target creates it from the source's spec (same
//! name, UUID, MACs, disks) before its VMM receives the guest, and deletes it again when
//! the guest does not arrive; the source deletes its own once its VMM said the guest runs
//! on the target. Disks are not copied: they must be on storage both nodes reach under
//! the same path (a cluster file system or a network block device); a disk the target
//! cannot open fails its VMM's start, before anything of the guest moved.

use std::os::fd::OwnedFd;

use super::*;
use crate::images::JobControl;
use crate::migration::{self, MigrationError, SshLink};

/// How often a migration job updates its progress from the VMM.
const PROGRESS_INTERVAL: Duration = Duration::from_millis(500);
/// How long the source waits for ssh and its own VMM to end once the guest moved.
const AFTER_SWITCH: Duration = Duration::from_secs(30);
/// How long a failed migration waits for ssh to end by itself before killing it.
const SSH_LAST_WORDS: Duration = Duration::from_secs(2);
/// The most of ssh's error output a failed job repeats.
const SSH_SAID_MAX: usize = 4096;

impl From<MigrationError> for NodeError {
    fn from(e: MigrationError) -> Self {
        match e {
            MigrationError::BadTarget(_) => NodeError::InvalidArgument(e.to_string()),
            MigrationError::BadHeader(_) => NodeError::InvalidSpec(e.to_string()),
            MigrationError::Read(_) | MigrationError::Relay(_) => NodeError::Io(e.to_string()),
        }
    }
}

/// Refuses a target ssh could take for an option, before a job starts.
pub(super) fn check_target(target: &str) -> Result<(), NodeError> {
    Ok(migration::check_target(target)?)
}

impl Node {
    /// Moves running VM `name` to node `target` (MigrateVm's job): returns what moved.
    /// When it fails the VM still runs here, untouched, unless its guest powered off.
    pub(super) async fn migrate(
        &self,
        name: &str,
        target: &str,
        control: &JobControl,
    ) -> Result<String, NodeError> {
        check_target(target)?;
        let vm = self.get(name)?;
        let ops = vm.ops.lock().await;
        vm.ensure_exists()?;
        if vm.state() != VmState::Running {
            return Err(NodeError::InvalidState(format!(
                "VM {name} is {}: only a running VM migrates",
                vm.state().as_str()
            )));
        }
        let spec = vm.spec();
        control.set_total(spec.memory_mib << 20);
        let header = migration::Header::new(name, &vm.spec_json()).line();
        let (ours, vmm_end) = std::os::unix::net::UnixStream::pair().map_err(io)?;
        let mut ssh = spawn_ssh(&self.cfg.migration, target, ours.into())?;
        let said = collect_stderr(ssh.stderr.take());
        // The header goes first; the socket buffers it while ssh connects.
        let written =
            blocking(move || std::io::Write::write_all(&mut &vmm_end, &header).map(|()| vmm_end))
                .await?;
        vm.lock().migrating_to = Some(target.to_owned());
        tracing::info!(vm = %name, target, "live migration begins");
        let socket = self.cfg.layout.api_socket(name);
        let moved = match written {
            Ok(vmm_end) => watch_migration(
                &socket,
                vmm_api::migrate(&socket, vmm_end.into(), None),
                control,
            )
            .await
            .map_err(|e| e.to_string()),
            // ssh ended at once: what it said comes with the error below.
            Err(e) => Err(format!("writing the migration header to ssh: {e}")),
        };
        let report = match moved {
            Ok(report) => report,
            Err(e) => {
                // An ssh that failed ends by itself within moments, and what it said is
                // the cause (the VMM's error is its symptom): give it that moment.
                if tokio::time::timeout(SSH_LAST_WORDS, ssh.wait())
                    .await
                    .is_err()
                {
                    let _ = ssh.start_kill();
                    let _ = ssh.wait().await;
                }
                vm.lock().migrating_to = None;
                let said = said_by(said).await;
                let ssh_said = if said.trim().is_empty() {
                    String::new()
                } else {
                    format!("; ssh and the target said: {}", said.trim())
                };
                tracing::warn!(vm = %name, target, "live migration failed: {e}{ssh_said}");
                // The device state went out but no answer came back: the VMM keeps the guest
                // paused (the target may run it), and so must the VM's state say.
                let paused = vmm_api::call(&socket, Request::Info)
                    .await
                    .is_ok_and(|info| info["state"] == "paused");
                if paused && vm.state() == VmState::Running {
                    self.set_state(
                        &vm,
                        VmState::Paused,
                        format!(
                            "the migration to {target} ended without the target's answer: \
                             check whether the guest runs there, then Stop or Resume it here"
                        ),
                    )
                    .await;
                }
                return Err(NodeError::Vmm(format!(
                    "migrating VM {name} to {target}: {e}{ssh_said} (VM {name} is {} here)",
                    vm.state().as_str()
                )));
            }
        };
        // The guest runs on the target now; its VMM here ends by itself. ssh ends with the
        // target's receiver, which says whether its agent took the VM.
        let ssh_status = tokio::time::timeout(AFTER_SWITCH, ssh.wait()).await;
        if ssh_status.is_err() {
            let _ = ssh.start_kill();
            let _ = ssh.wait().await;
        }
        let said = said_by(said).await;
        let note = match ssh_status {
            Ok(Ok(status)) if status.success() => String::new(),
            Ok(Ok(status)) => format!(
                "; but the target's receiver ended with {status}: {}",
                said.trim()
            ),
            Ok(Err(e)) => format!("; but waiting for ssh failed: {e}"),
            Err(_) => format!("; but ssh did not end within {AFTER_SWITCH:?}"),
        };
        drop(ops);
        self.wait_down(&vm, AFTER_SWITCH).await;
        if !vm.state().is_down() {
            // It must not run a second copy of a guest that runs elsewhere.
            tracing::warn!(vm = %name, "the source VMM did not end after the switch: stopping it");
            self.stop(name, false).await?;
        }
        self.delete(name).await?;
        tracing::info!(vm = %name, target, %report, "live migration done{note}");
        Ok(format!(
            "VM {name} runs on {target}: {} bytes in {} rounds, {} ms downtime{note}",
            report["bytes"], report["rounds"], report["downtime_ms"]
        ))
    }

    /// Waits up to `limit` for `vm` to be down.
    async fn wait_down(&self, vm: &Vm, limit: Duration) {
        let mut rx = vm.state_tx.subscribe();
        let _ = tokio::time::timeout(limit, rx.wait_for(|s| s.is_down())).await;
    }

    /// Receives VM `name` from another node (ReceiveVm): creates it from `spec_json`,
    /// starts its VMM waiting for the guest, relays the link (a stream socket) to it, and
    /// returns once the guest runs here. When it fails, nothing of the VM stays here.
    pub async fn receive(
        &self,
        name: &str,
        spec_json: &str,
        link: OwnedFd,
    ) -> Result<String, NodeError> {
        let link = stream_socket(link)?;
        // Whatever happens, the receiver sees the link's end (see migration::relay).
        let ender = link.try_clone().map_err(io)?;
        let received = self.receive_link(name, spec_json, link).await;
        let _ = ender.shutdown(std::net::Shutdown::Both);
        received
    }

    async fn receive_link(
        &self,
        name: &str,
        spec_json: &str,
        link: std::os::unix::net::UnixStream,
    ) -> Result<String, NodeError> {
        self.refuse_if_drained(name)?;
        // Claimed before the VM exists: a second ReceiveVm of the same name (which
        // CreateVm's idempotence would hand the same VM) is refused, not run twice.
        let _claim = Receiving::claim(self, name)?;
        if self.get(name).is_ok() {
            return Err(NodeError::InvalidState(format!(
                "a VM named {name} exists on this node already"
            )));
        }
        // Durable before the VM's spec is: an agent that ends from here until the guest
        // runs finds it at its next start (see `Node::recover`).
        let marker = self.cfg.layout.incoming_marker(name);
        blocking(move || fsutil::write_atomic(&marker, b"receiving a live migration\n", 0o600))
            .await?
            .map_err(io)?;
        let received = match self.create(name, spec_json).await {
            Ok(vm) => self.receive_into(&vm, link).await,
            Err(e) => Err(e),
        };
        match received {
            Ok(()) => {
                self.forget_incoming(name).await;
                tracing::info!(vm = %name, "migrated VM received; it runs here");
                Ok(format!("VM {name} runs here"))
            }
            Err(e) => {
                tracing::warn!(vm = %name, "receiving the migrated VM failed: {e}");
                self.abandon_incoming(name).await;
                Err(e)
            }
        }
    }

    /// Removes what a ReceiveVm made of VM `name` whose guest did not arrive: its VMM
    /// (killed: it holds no guest), its definition and the incoming marker.
    pub(super) async fn abandon_incoming(&self, name: &str) {
        if self.get(name).is_ok() {
            if let Err(stop) = self.stop(name, false).await {
                tracing::warn!(vm = %name, "stopping its VMM: {stop}");
            }
            if let Err(delete) = self.delete(name).await {
                tracing::warn!(vm = %name, "removing it again: {delete}");
            }
        }
        self.forget_incoming(name).await;
    }

    /// The guest of VM `name` runs here (or its VM is gone): no incoming marker any more.
    pub(super) async fn forget_incoming(&self, name: &str) {
        let marker = self.cfg.layout.incoming_marker(name);
        let removed = blocking(move || fsutil::remove_durable(&marker)).await;
        if let Err(e) = removed.and_then(|r| r.map_err(io)) {
            tracing::warn!(vm = %name, "removing its incoming marker: {e}");
        }
    }

    async fn receive_into(
        &self,
        vm: &Arc<Vm>,
        link: std::os::unix::net::UnixStream,
    ) -> Result<(), NodeError> {
        let _ops = vm.ops.lock().await;
        vm.ensure_exists()?;
        let _admission = self.admit(vm)?;
        let socket = self.cfg.layout.incoming_socket(&vm.name);
        let relay = tokio::spawn(relay_when_listening(
            socket.clone(),
            self.cfg.start_timeout,
            link,
        ));
        if let Err(e) = self.launch_locked(vm, &Launch::Incoming(socket)).await {
            relay.abort();
            return Err(e);
        }
        // The VMM's last word (that the guest runs) is on its way to the source: the relay
        // ends once the source hung up.
        match tokio::time::timeout(AFTER_SWITCH, relay).await {
            Ok(Ok(Ok((inbound, outbound)))) => {
                tracing::info!(vm = %vm.name, inbound, outbound, "migration link ended")
            }
            Ok(Ok(Err(e))) => tracing::warn!(vm = %vm.name, "after the switch: {e}"),
            Ok(Err(e)) => tracing::warn!(vm = %vm.name, "the relay task: {e}"),
            Err(_) => tracing::warn!(vm = %vm.name, "the source did not hang up after the switch"),
        }
        Ok(())
    }
}

/// A name in [`Node::receiving`] for as long as its ReceiveVm runs.
struct Receiving<'a>(&'a Node, String);

impl<'a> Receiving<'a> {
    fn claim(node: &'a Node, name: &str) -> Result<Receiving<'a>, NodeError> {
        let mut receiving = node.receiving.lock().unwrap_or_else(|p| p.into_inner());
        if !receiving.insert(name.to_owned()) {
            return Err(NodeError::InvalidState(format!(
                "VM {name} is being received here already"
            )));
        }
        Ok(Receiving(node, name.to_owned()))
    }
}

impl Drop for Receiving<'_> {
    fn drop(&mut self) {
        let mut receiving = self.0.receiving.lock().unwrap_or_else(|p| p.into_inner());
        receiving.remove(&self.1);
    }
}

/// ReceiveVm's link, which must be a stream socket (it is shut down at the end).
fn stream_socket(fd: OwnedFd) -> Result<std::os::unix::net::UnixStream, NodeError> {
    use std::os::fd::AsRawFd as _;
    use std::os::unix::fs::FileTypeExt as _;
    // A descriptor that came over D-Bus is not close-on-exec: every supervisor and VMM the
    // agent started from then on inherited the link, and kept the source's end open after
    // the agent itself ended (the source then waited for an end that never came).
    // SAFETY: fcntl(F_SETFD) on a descriptor we own; no memory is passed.
    if unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFD, libc::FD_CLOEXEC) } != 0 {
        return Err(io(std::io::Error::last_os_error()));
    }
    let file = std::fs::File::from(fd);
    let is_socket = file.metadata().map_err(io)?.file_type().is_socket();
    let stream = std::os::unix::net::UnixStream::from(OwnedFd::from(file));
    // SO_TYPE: a stream socket, not a datagram one.
    let stream_type = nix::sys::socket::getsockopt(&stream, nix::sys::socket::sockopt::SockType);
    if is_socket && matches!(stream_type, Ok(nix::sys::socket::SockType::Stream)) {
        Ok(stream)
    } else {
        Err(NodeError::InvalidArgument(
            "ReceiveVm's link must be a stream socket".to_owned(),
        ))
    }
}

/// Runs ssh for the link.
fn spawn_ssh(
    link: &SshLink,
    target: &str,
    stream: OwnedFd,
) -> Result<tokio::process::Child, NodeError> {
    link.command(target, stream)
        .and_then(|mut cmd| cmd.spawn())
        .map_err(|e| NodeError::Io(format!("starting {}: {e}", link.ssh.display())))
}

/// The last [`SSH_SAID_MAX`] bytes ssh writes to stderr.
fn collect_stderr(stderr: Option<tokio::process::ChildStderr>) -> tokio::task::JoinHandle<String> {
    tokio::spawn(async move {
        use tokio::io::AsyncReadExt as _;
        let Some(mut stderr) = stderr else {
            return String::new();
        };
        let mut kept = Vec::new();
        let mut buf = [0u8; 1024];
        while let Ok(n) = stderr.read(&mut buf).await {
            if n == 0 {
                break;
            }
            kept.extend_from_slice(&buf[..n]);
            let excess = kept.len().saturating_sub(SSH_SAID_MAX);
            kept.drain(..excess);
        }
        String::from_utf8_lossy(&kept).into_owned()
    })
}

/// What [`collect_stderr`] kept, once ssh is gone.
async fn said_by(collected: tokio::task::JoinHandle<String>) -> String {
    tokio::time::timeout(Duration::from_secs(1), collected)
        .await
        .ok()
        .and_then(Result::ok)
        .unwrap_or_default()
}

/// Awaits the VMM's `migrate` answer while copying its progress into the job every
/// [`PROGRESS_INTERVAL`]; the job's Cancel asks the VMM to end the migration.
async fn watch_migration(
    socket: &Path,
    migrate: impl std::future::Future<Output = Result<serde_json::Value, VmmApiError>>,
    control: &JobControl,
) -> Result<serde_json::Value, VmmApiError> {
    tokio::pin!(migrate);
    let mut cancel_sent = false;
    loop {
        tokio::select! {
            answer = &mut migrate => return answer,
            () = control.canceled(), if !cancel_sent => {
                cancel_sent = true;
                if let Err(e) = vmm_api::call(socket, Request::MigrateCancel).await {
                    tracing::warn!("canceling the migration: {e}");
                }
            }
            () = tokio::time::sleep(PROGRESS_INTERVAL) => {
                if let Ok(info) = vmm_api::call(socket, Request::Info).await {
                    let progress = &info["migration"];
                    if let Some(bytes) = progress["bytes"].as_u64() {
                        control.set_done(bytes);
                    }
                    if progress.is_object() {
                        control.set_status(progress.to_string());
                    }
                }
            }
        }
    }
}

/// Connects to the incoming VMM's socket once it listens (within `limit`), then relays.
async fn relay_when_listening(
    socket: PathBuf,
    limit: Duration,
    link: std::os::unix::net::UnixStream,
) -> Result<(u64, u64), NodeError> {
    let deadline = Instant::now() + limit;
    let vmm = loop {
        match tokio::net::UnixStream::connect(&socket).await {
            Ok(s) => break s,
            Err(e) if Instant::now() >= deadline => {
                return Err(NodeError::Vmm(format!(
                    "the incoming VMM's socket {}: {e}",
                    socket.display()
                )))
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    };
    Ok(migration::relay(link, vmm).await?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_link_must_be_a_stream_socket() {
        let (pipe, _w) = nix::unistd::pipe().unwrap();
        let (datagram, _d) = std::os::unix::net::UnixDatagram::pair().unwrap();
        let (stream, _s) = std::os::unix::net::UnixStream::pair().unwrap();
        for refused in [pipe, OwnedFd::from(datagram)] {
            let e = stream_socket(refused).unwrap_err();
            assert!(matches!(e, NodeError::InvalidArgument(_)), "{e}");
        }
        stream_socket(OwnedFd::from(stream)).unwrap();
    }
}
