//! The disk store's operations on the node ([`crate::disks`] does the file work): who uses
//! a disk, and what that forbids.
//!
//! A disk is *used* by every VM whose spec names it (as written, or after resolving
//! symlinks), running or not: `DeleteDisk` refuses while any does, since the VM could not
//! start without it. `ResizeDisk` only grows and refuses while a using VM has a VMM
//! (starting, running, paused, stopping): the VMM sized the guest's disk at its start, so a
//! grown file would only be seen after a restart anyway, and one rule is easier to reason
//! about than "harmless unless it shrinks". A Start racing a ResizeDisk sees either size;
//! growing never harms the guest's data.
//!
//! Operations on one disk name are serialized (a second one gets `Busy`); `DeleteDisk`
//! also holds the membership lock, so no `CreateVm` naming the disk slips in between its
//! check and the removal. Long work (copies, qemu-img) runs in blocking threads and child
//! processes and holds neither the VM table nor the membership lock.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::Serialize;

use super::{blocking, io, Node, NodeError, VmState};
use crate::disks::{self, DiskError, DiskStore};

/// Registration of a running operation on a disk name; the name is free again on drop.
pub(super) struct DiskOp<'a> {
    node: &'a Node,
    name: String,
}

impl Drop for DiskOp<'_> {
    fn drop(&mut self) {
        if let Ok(mut ops) = self.node.disk_ops.lock() {
            ops.remove(&self.name);
        }
    }
}

impl From<DiskError> for NodeError {
    fn from(e: DiskError) -> Self {
        let msg = e.to_string();
        match e {
            DiskError::BadName(_) | DiskError::BadOptions(_) | DiskError::Shrink { .. } => {
                NodeError::InvalidArgument(msg)
            }
            DiskError::NotFound(_) | DiskError::ImageNotFound(_) => NodeError::NotFound(msg),
            DiskError::Exists(_) => NodeError::AlreadyExists(msg),
            DiskError::InvalidImage { .. } => NodeError::InvalidImage(msg),
            DiskError::NoSpace { .. } => NodeError::NoSpace(msg),
            DiskError::Tool(_) | DiskError::Fs(_) => NodeError::Io(msg),
        }
    }
}

/// A disk in `ListDisks`.
#[derive(Debug, Serialize)]
struct ListedDisk {
    name: String,
    size: u64,
    allocated: u64,
    /// VMs whose specs name the disk.
    users: Vec<String>,
}

impl Node {
    fn disk_store(&self) -> DiskStore {
        DiskStore {
            disks: self.stores.disks.clone(),
            images: self.stores.images.clone(),
            qemu_img: self.cfg.qemu_img.clone(),
        }
    }

    fn disk_op(&self, name: &str) -> Result<DiskOp<'_>, NodeError> {
        let mut ops = self.disk_ops.lock().map_err(io)?;
        if !ops.insert(name.to_owned()) {
            return Err(NodeError::Busy(format!(
                "another operation on disk {name} is in progress"
            )));
        }
        Ok(DiskOp {
            node: self,
            name: name.to_owned(),
        })
    }

    /// (VM, state) of every VM whose spec names one of `paths` (disk store paths), per path.
    async fn disk_users(
        &self,
        paths: Vec<PathBuf>,
    ) -> Result<BTreeMap<PathBuf, Vec<(String, VmState)>>, NodeError> {
        let vms: Vec<_> = self
            .list()
            .iter()
            .map(|vm| (vm.name.clone(), vm.spec(), vm.state()))
            .collect();
        let stores = self.stores.clone();
        blocking(move || {
            let mut users: BTreeMap<PathBuf, Vec<(String, VmState)>> =
                paths.iter().map(|p| (p.clone(), Vec::new())).collect();
            for (name, spec, state) in vms {
                let referenced = spec.referenced_disk_paths(&stores);
                for p in &paths {
                    let canonical = p.canonicalize().unwrap_or_else(|_| p.clone());
                    if referenced.iter().any(|r| *r == *p || *r == canonical) {
                        if let Some(u) = users.get_mut(p) {
                            u.push((name.clone(), state));
                        }
                    }
                }
            }
            users
        })
        .await
    }

    /// `CreateDisk`: returns the new disk's description as JSON.
    pub async fn create_disk(&self, name: &str, options_json: &str) -> Result<String, NodeError> {
        disks::validate_name(name)?;
        let opts = disks::parse_options(options_json)?;
        let _op = self.disk_op(name)?;
        let created = disks::create(&self.disk_store(), name, &opts).await?;
        tracing::info!(disk = %name, method = ?created.method, size = created.size, allocated = created.allocated, "disk created");
        serde_json::to_string(&created).map_err(io)
    }

    /// `ResizeDisk`: grows a disk no running VM uses.
    pub async fn resize_disk(&self, name: &str, size: u64) -> Result<(), NodeError> {
        let _op = self.disk_op(name)?;
        let store = self.disk_store();
        let path = disks::path_of(&store, name)?;
        let users = self.disk_users(vec![path.clone()]).await?;
        let running: Vec<&str> = users
            .get(&path)
            .into_iter()
            .flatten()
            .filter(|(_, state)| !state.is_down())
            .map(|(vm, _)| vm.as_str())
            .collect();
        if !running.is_empty() {
            return Err(NodeError::InUse(format!(
                "disk {name} is attached to running VM {}; stop it first (a guest sees a \
                 grown disk only after a restart anyway)",
                running.join(", ")
            )));
        }
        disks::resize(&store, name, size).await?;
        tracing::info!(disk = %name, size, "disk resized");
        Ok(())
    }

    /// `DeleteDisk`: removes a disk no VM's spec names.
    pub async fn delete_disk(&self, name: &str) -> Result<(), NodeError> {
        let _op = self.disk_op(name)?;
        let store = self.disk_store();
        let path = disks::path_of(&store, name)?;
        // No CreateVm naming it between the check and the removal.
        let _membership = self.membership.lock().await;
        let users = self.disk_users(vec![path.clone()]).await?;
        let names: Vec<&str> = users
            .get(&path)
            .into_iter()
            .flatten()
            .map(|(vm, _)| vm.as_str())
            .collect();
        if !names.is_empty() {
            return Err(NodeError::InUse(format!(
                "disk {name} is used by VM {} (its spec names it); delete the VM first",
                names.join(", ")
            )));
        }
        disks::delete(&store, name).await?;
        tracing::info!(disk = %name, "disk deleted");
        Ok(())
    }

    /// `ListDisks`: every disk with its sizes and the VMs using it, as JSON.
    pub async fn list_disks(&self) -> Result<String, NodeError> {
        let store = self.disk_store();
        let found = disks::list(&store).await?;
        let paths: Vec<PathBuf> = found.iter().map(|d| store.disks.join(&d.name)).collect();
        let users = self.disk_users(paths).await?;
        let listed: Vec<ListedDisk> = found
            .into_iter()
            .map(|d| {
                let users = users
                    .get(&store.disks.join(&d.name))
                    .map(|u| u.iter().map(|(vm, _)| vm.clone()).collect())
                    .unwrap_or_default();
                ListedDisk {
                    name: d.name,
                    size: d.size,
                    allocated: d.allocated,
                    users,
                }
            })
            .collect();
        serde_json::to_string(&listed).map_err(io)
    }
}
