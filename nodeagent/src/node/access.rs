//! Per-VM VMM users (`--vmm-uids FIRST-LAST`): every VM gets a uid of its own for its whole
//! life (persisted as `<state>/vms/<name>.uid`), and its VMM runs as that uid with a private
//! group of the same number and no other group: its launcher opens /dev/kvm for it, then
//! switches before it execs the VMM, so the VMM opens everything else as its VM's user. What that user may open, the agent
//! grants before every start with POSIX ACL entries on files the agent owns
//! ([`crate::acl`]), and nothing else:
//!
//! - its writable disks read-write, its read-only disks, kernel and initrd read-only (and
//!   these files lose any permission for others: only the ACL says who may);
//! - its run directory (API socket, seed) and log directory (console), both sticky so the
//!   VMM cannot replace the agent's files in them; a default ACL entry hands the agent
//!   access to what the VMM creates there (its API socket), as the agent has no
//!   capability to override file permissions in the image;
//! - its TAPs are created owned by its uid (the kernel lets only the owner attach).
//!
//! Before granting, the same uid's entries on every other file of the stores are taken back
//! (a disk detached from the VM, or moved to another VM), and at DeleteVm all of them, so a
//! uid given to a later VM inherits nothing. Another VM's VMM has no entry on these files
//! and is neither their owner (the agent) nor in their group: it can open none of them.

use std::collections::HashSet;
use std::os::unix::fs::PermissionsExt;

use super::*;
use crate::acl::{self, Which, EXECUTE, READ, WRITE};
use crate::vmm_user::RunAs;

impl Node {
    /// A uid for VM `name` (the caller holds `membership`), persisted; None without
    /// `--vmm-uids`. Keeps `current` if it is still in the range and not taken.
    pub(super) async fn allocate_uid(
        &self,
        name: &str,
        current: Option<u32>,
    ) -> Result<Option<u32>, NodeError> {
        let Some(range) = self.cfg.vmm_uids else {
            return Ok(None);
        };
        let used: HashSet<u32> = self
            .list()
            .iter()
            .filter(|v| v.name != name)
            .filter_map(|v| v.lock().vmm_uid)
            .collect();
        if let Some(uid) = current.filter(|u| range.contains(*u) && !used.contains(u)) {
            return Ok(Some(uid));
        }
        let uid = range.free(&used).ok_or_else(|| {
            NodeError::NoCapacity(format!(
                "VM {name}: every VMM uid of {}-{} is taken ({} VMs); widen --vmm-uids",
                range.first,
                range.last,
                used.len()
            ))
        })?;
        let file = self.cfg.layout.uid_file(name);
        blocking(move || fsutil::write_atomic(&file, format!("{uid}\n").as_bytes(), 0o640))
            .await?
            .map_err(io)?;
        Ok(Some(uid))
    }

    /// The uid stored for VM `name`, if any (blocking read on a blocking thread).
    pub(super) async fn stored_uid(&self, name: &str) -> Option<u32> {
        let file = self.cfg.layout.uid_file(name);
        blocking(move || std::fs::read_to_string(file).ok())
            .await
            .ok()
            .flatten()
            .and_then(|s| s.trim().parse().ok())
    }

    /// Who VM `vm`'s VMM runs as: the owner of its TAPs and, with per-VM uids, the user its
    /// launcher becomes.
    pub(super) fn vmm_identity(&self, vm: &Vm) -> (VmmUser, Option<RunAs>) {
        match vm.lock().vmm_uid {
            Some(uid) => (
                VmmUser { uid, gid: uid },
                Some(RunAs {
                    uid,
                    gid: uid,
                    // No kvm group: the launcher hands the VMM /dev/kvm (runner/supervise.rs).
                    groups: Vec::new(),
                }),
            ),
            None => (self.cfg.vmm_user, None),
        }
    }

    /// Before a start with per-VM uids: takes back what the VM's uid may open elsewhere and
    /// grants what this start needs (see the module docs).
    pub(super) async fn prepare_access(
        &self,
        vm: &Vm,
        resolved: &ResolvedSpec,
        seed: Option<PathBuf>,
    ) -> Result<(), NodeError> {
        let Some(uid) = vm.lock().vmm_uid else {
            return Ok(());
        };
        let l = &self.cfg.layout;
        let mut files: Vec<(PathBuf, u16)> = resolved
            .disks
            .iter()
            .map(|d| {
                let perm = if d.readonly { READ } else { READ | WRITE };
                (d.path.clone(), perm)
            })
            .collect();
        if let Boot::Kernel { kernel, initrd, .. } = &resolved.boot {
            files.push((kernel.clone(), READ));
            files.extend(initrd.iter().map(|i| (i.clone(), READ)));
        }
        files.extend(seed.map(|s| (s, READ)));
        let stores = [l.disks_dir(), l.images_dir()];
        let dirs = [l.vm_run_dir(&vm.name), l.vm_log_dir(&vm.name)];
        let console = l.console_log(&vm.name);
        let name = vm.name.clone();
        blocking(move || {
            let keep: HashSet<&Path> = files.iter().map(|(p, _)| p.as_path()).collect();
            for store in &stores {
                revoke_in(store, uid, &keep);
            }
            // SAFETY: geteuid cannot fail.
            let agent = unsafe { libc::geteuid() };
            for dir in &dirs {
                fsutil::create_dir_all(dir, 0o750).map_err(|e| e.to_string())?;
                // Sticky: the VMM may create files here but not replace the agent's.
                std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o1750))
                    .map_err(|e| format!("{}: {e}", dir.display()))?;
                acl::grant(dir, Which::Access, uid, READ | WRITE | EXECUTE)
                    .and_then(|()| acl::grant(dir, Which::Default, agent, READ | WRITE | EXECUTE))
                    .map_err(|e| e.to_string())?;
            }
            console_file(&console, agent).map_err(|e| format!("{}: {e}", console.display()))?;
            acl::grant(&console, Which::Access, uid, READ | WRITE).map_err(|e| e.to_string())?;
            for (path, _) in &files {
                // The directories between a store and the file (an image named by its URL
                // path sits in subdirectories made under the agent's umask): search
                // permission for others, so the VMM reaches the file its ACL grants.
                if let Some(store) = stores.iter().find(|s| path.starts_with(s)) {
                    let mut dir = path.parent();
                    while let Some(d) =
                        dir.filter(|d| d.starts_with(store) && *d != store.as_path())
                    {
                        let mode = std::fs::metadata(d)
                            .map_err(|e| format!("{}: {e}", d.display()))?
                            .permissions()
                            .mode();
                        if mode & 0o001 == 0 {
                            std::fs::set_permissions(
                                d,
                                std::fs::Permissions::from_mode(mode | 0o001),
                            )
                            .map_err(|e| format!("{}: {e}", d.display()))?;
                        }
                        dir = d.parent();
                    }
                }
            }
            for (path, perm) in &files {
                // Others get nothing (a file placed world-readable would be every VMM's);
                // the ACL names who may.
                let mode = std::fs::metadata(path)
                    .map_err(|e| format!("{}: {e}", path.display()))?
                    .permissions()
                    .mode();
                if mode & 0o007 != 0 {
                    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode & !0o007))
                        .map_err(|e| format!("{}: {e}", path.display()))?;
                }
                acl::grant(path, Which::Access, uid, *perm)
                    .map_err(|e| format!("VM {name}: granting its VMM user {uid} access: {e}"))?;
            }
            Ok::<(), String>(())
        })
        .await?
        .map_err(NodeError::Io)
    }

    /// At DeleteVm: every right of the VM's uid on store files is taken back, and its uid
    /// file removed (the uid is free again).
    pub(super) async fn release_uid(&self, vm: &Vm) {
        let Some(uid) = vm.lock().vmm_uid else {
            return;
        };
        let l = &self.cfg.layout;
        let stores = [l.disks_dir(), l.images_dir()];
        let file = l.uid_file(&vm.name);
        let result = blocking(move || {
            for store in &stores {
                revoke_in(store, uid, &HashSet::new());
            }
            fsutil::remove_durable(&file)
        })
        .await;
        match result {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(vm = %vm.name, "removing its uid file: {e}"),
            Err(e) => tracing::warn!(vm = %vm.name, "releasing its uid: {e}"),
        }
    }
}

/// Takes back `uid`'s entries on the regular files under `dir` (recursively, hidden names
/// skipped: temporary files, pulls in progress) except `keep`. Blocking; failures are
/// logged (a file another process removed meanwhile, a file system without ACLs).
fn revoke_in(dir: &Path, uid: u32, keep: &HashSet<&Path>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        if entry.file_name().to_string_lossy().starts_with('.') {
            continue;
        }
        let path = entry.path();
        match entry.file_type() {
            Ok(t) if t.is_dir() => revoke_in(&path, uid, keep),
            Ok(t) if t.is_file() && !keep.contains(path.as_path()) => {
                match acl::revoke(&path, uid) {
                    Ok(true) => {
                        tracing::info!(uid, file = %path.display(), "took back a VMM user's access")
                    }
                    Ok(false) => {}
                    Err(e) => tracing::warn!(uid, "{e}"),
                }
            }
            _ => {}
        }
    }
}

/// The console log exists and is the agent's (a file left by a VMM of an earlier scheme
/// is replaced: the agent must own it to grant access and to trim it).
fn console_file(path: &Path, agent: u32) -> std::io::Result<()> {
    use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
    if let Ok(meta) = std::fs::symlink_metadata(path) {
        if meta.is_file() && meta.uid() == agent {
            return Ok(());
        }
        std::fs::remove_file(path)?;
    }
    std::fs::OpenOptions::new()
        .create_new(true)
        .append(true)
        .mode(0o640)
        .open(path)
        .map(drop)
}
