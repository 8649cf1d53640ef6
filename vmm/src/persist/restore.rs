//! A new VM takes over a guest: from a snapshot directory (`--restore`), or from a live
//! migration's source (`--incoming`). Called by `vmm::run` once the VM is built (memory,
//! devices, vCPUs created) and before anything runs; the sandbox is not on yet.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::Mutex;

use super::memory::MemoryFileError;
use super::migration::{self, MigrationError};
use super::{Machine, PciPersist, PersistDevice, Snapshot, SnapshotError};
use crate::config::MigrationAddr;
use crate::devices::serial::SerialDevice;
use crate::vstate::memory::GuestMemoryMmap;
use crate::vstate::vcpu::{Vcpu, VcpuError};
use crate::vstate::vm::Vm;

#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    #[error(transparent)]
    Snapshot(#[from] SnapshotError),
    #[error("cannot restore the snapshot's memory: {0}")]
    Memory(#[from] MemoryFileError),
    #[error(transparent)]
    Vcpu(#[from] VcpuError),
    #[error("cannot restore the guest: {0}")]
    Invalid(String),
    #[error("--incoming {addr}: cannot {what}: {source}")]
    Incoming {
        addr: String,
        what: &'static str,
        source: io::Error,
    },
    #[error("incoming migration failed: {0}")]
    Migration(#[from] MigrationError),
}

/// The listening socket of `--incoming`, bound while the VMM starts.
pub enum IncomingListener {
    Unix(std::os::unix::net::UnixListener, String),
    Tcp(std::net::TcpListener, String),
}

impl IncomingListener {
    /// A Unix socket gets mode 0600 (0660 with `group_access`) from the umask at bind time,
    /// with no window where others may connect: whoever connects gives this VMM its guest.
    /// Called while the process is single-threaded (the umask is process-wide).
    pub fn bind(addr: &MigrationAddr, group_access: bool) -> Result<Self, RestoreError> {
        let error = |what| {
            let addr = addr.to_string();
            move |source| RestoreError::Incoming { addr, what, source }
        };
        Ok(match addr {
            MigrationAddr::Unix(path) => {
                let mask = if group_access { 0o117 } else { 0o177 };
                // SAFETY: umask only swaps the process's file mode mask.
                let old = unsafe { libc::umask(mask) };
                let bound = std::os::unix::net::UnixListener::bind(path);
                // SAFETY: as above, restoring it.
                unsafe { libc::umask(old) };
                IncomingListener::Unix(bound.map_err(error("listen"))?, addr.to_string())
            }
            MigrationAddr::Tcp(host_port) => IncomingListener::Tcp(
                std::net::TcpListener::bind(host_port.as_str()).map_err(error("listen"))?,
                addr.to_string(),
            ),
        })
    }

    /// Waits for the source to connect; None when a stop signal came first.
    pub fn accept(&self, signals: &OwnedFd) -> Result<Option<File>, RestoreError> {
        let (fd, addr) = match self {
            IncomingListener::Unix(l, a) => (l.as_raw_fd(), a),
            IncomingListener::Tcp(l, a) => (l.as_raw_fd(), a),
        };
        let error = |what| {
            let addr = addr.clone();
            move |source| RestoreError::Incoming { addr, what, source }
        };
        let mut fds = [
            libc::pollfd {
                fd,
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: signals.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        loop {
            // SAFETY: two valid pollfds for descriptors we own.
            let n = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(error("wait for the source")(e));
            }
            if fds[1].revents != 0 {
                return Ok(None);
            }
            if fds[0].revents != 0 {
                break;
            }
        }
        let timeouts = Some(migration::PEER_TIMEOUT);
        let stream: OwnedFd = match self {
            IncomingListener::Unix(l, _) => {
                let (s, _) = l.accept().map_err(error("accept the source"))?;
                s.set_read_timeout(timeouts)
                    .map_err(error("set a timeout"))?;
                s.set_write_timeout(timeouts)
                    .map_err(error("set a timeout"))?;
                s.into()
            }
            IncomingListener::Tcp(l, _) => {
                let (s, peer) = l.accept().map_err(error("accept the source"))?;
                tracing::info!(%peer, "migration source connected");
                s.set_read_timeout(timeouts)
                    .map_err(error("set a timeout"))?;
                s.set_write_timeout(timeouts)
                    .map_err(error("set a timeout"))?;
                s.set_nodelay(true).map_err(error("set TCP_NODELAY"))?;
                s.into()
            }
        };
        Ok(Some(File::from(stream)))
    }
}

/// Continues a snapshot's guest in the VM just built (devices wired, vCPUs created, nothing
/// run yet): checks that this VM is the snapshot's, then memory, interrupt controllers and
/// clocks, vCPUs, the serial port and the virtio devices (which start where their rings are).
pub fn restore(
    vm: &Vm,
    mem: &GuestMemoryMmap,
    vcpus: &[Vcpu],
    serial: &Mutex<SerialDevice>,
    devices: (&[PersistDevice], Option<&PciPersist>),
    (snapshot, memory): (&Snapshot, &File),
    here: Machine,
) -> Result<(), RestoreError> {
    snapshot.check(&here)?;
    super::memory::load(mem, memory, &snapshot.memory)?;
    restore_state(vm, vcpus, serial, devices, snapshot)
}

/// The target's side of a live migration up to the device state: checks the source's
/// machine against this VM (and answers), then takes guest memory until the state comes.
pub fn receive_migration(
    stream: &mut File,
    mem: &GuestMemoryMmap,
    here: &Machine,
) -> Result<Snapshot, RestoreError> {
    let hello = migration::expect(stream, migration::HELLO)?;
    let checked = serde_json::from_slice::<Machine>(&hello)
        .map_err(|e| format!("the source's machine description is not valid: {e}"))
        .and_then(|saved| saved.check(here).map_err(|e| e.to_string()));
    migration::write_message(
        stream,
        migration::READY,
        &[&migration::answer_json(&checked)],
    )
    .map_err(MigrationError::from)?;
    checked.map_err(RestoreError::Invalid)?;
    let snapshot = migration::receive_memory(stream, mem)?;
    snapshot.check(here)?;
    Ok(snapshot)
}

/// The state of a snapshot (whose memory is in place) into the VM just built.
pub fn restore_state(
    vm: &Vm,
    vcpus: &[Vcpu],
    serial: &Mutex<SerialDevice>,
    (devices, pci): (&[PersistDevice], Option<&PciPersist>),
    snapshot: &Snapshot,
) -> Result<(), RestoreError> {
    crate::vstate::state::restore_vm(vm.fd(), &snapshot.vm)
        .map_err(|e| RestoreError::Invalid(e.to_string()))?;
    for (vcpu, state) in vcpus.iter().zip(&snapshot.vcpus) {
        vcpu.restore(state)?;
    }
    serial
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .restore(&snapshot.serial)
        .map_err(RestoreError::Invalid)?;
    for (device, state) in devices.iter().zip(&snapshot.devices) {
        device.restore(state).map_err(RestoreError::Invalid)?;
    }
    if let Some(pci) = pci {
        pci.restore(snapshot.pci.as_ref())
            .map_err(RestoreError::Invalid)?;
    }
    Ok(())
}
