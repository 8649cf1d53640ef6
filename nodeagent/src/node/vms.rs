//! The set of VMs: CreateVm, DeleteVm and spec changes (see the lock order in the module
//! docs of [`super`]).

use super::*;

impl Node {
    // ----- create / delete -----------------------------------------------------------------

    pub async fn create(&self, name: &str, spec_json: &str) -> Result<Arc<Vm>, NodeError> {
        names::validate_vm_name(name).map_err(|e| NodeError::InvalidSpec(e.to_string()))?;
        let mut spec = spec::parse(spec_json).map_err(|e| NodeError::InvalidSpec(e.to_string()))?;
        let uuid_given = spec.uuid.is_some();
        spec.fill_macs(&self.cfg.node_name, name);
        spec.fill_uuid()
            .map_err(|e| NodeError::InvalidSpec(format!("VM {name}: {e}")))?;
        // A retry (the reply to an earlier CreateVm got lost) finds its VM: no file work.
        if let Ok(vm) = self.get(name) {
            return existing_if_same(&vm, spec, uuid_given);
        }
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
        let existing = self.table().get(name).cloned();
        if let Some(vm) = existing {
            return existing_if_same(&vm, spec, uuid_given);
        }
        // An autostart VM holds its vCPUs and memory from now on, as a start would.
        let _reserved = self.reserve_creation(name, &spec)?;
        // Two VMs writing one disk corrupts it: refuse writable disks already in use.
        let disks = resolved.disks;
        let conflict = self.disk_conflict(name, disks).await?;
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
        let vmm_uid = match self.allocate_uid(name, None).await {
            Ok(uid) => uid,
            Err(e) => {
                let _ = blocking(move || fsutil::remove_durable(&file)).await;
                return Err(e);
            }
        };
        let vm = Vm::new(name, spec, VmState::Defined, String::new());
        vm.lock().vmm_uid = vmm_uid;
        // In the table before its object is on the bus (registering announces it with
        // InterfacesAdded): a call on the new object finds the VM.
        self.table().insert(name.to_owned(), vm.clone());
        if let Err(e) = self.publish(NodeEvent::VmAdded(vm.clone())).await {
            vm.lock().deleted = true;
            self.table().remove(name);
            let _ = blocking(move || fsutil::remove_durable(&file)).await;
            return Err(io(format!("serving the object of VM {name}: {e}")));
        }
        drop(_membership);
        tracing::info!(vm = %name, "created");
        let _ = self.publish(NodeEvent::VmAnnounced(vm.clone())).await;
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
        // A VM whose incoming migration was cut short (see `recover`) ends with it.
        self.forget_incoming(name).await;
        vm.lock().deleted = true;
        self.table().remove(name);
        self.release_uid(&vm).await;
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
        let _ = self.publish(NodeEvent::VmRemoved(vm.clone())).await;
        tracing::info!(vm = %name, "deleted");
        Ok(())
    }

    /// A writable disk of VM `name` that another VM uses, or one that is gone: the refusal's
    /// message. Two VMs writing one disk corrupts it; a disk may be shared only read-only.
    async fn disk_conflict(
        &self,
        name: &str,
        disks: Vec<spec::ResolvedDisk>,
    ) -> Result<Option<String>, NodeError> {
        let others: Vec<(String, VmSpec)> = self
            .list()
            .iter()
            .filter(|vm| vm.name != name)
            .map(|vm| (vm.name.clone(), vm.spec()))
            .collect();
        let stores = self.stores.clone();
        let new = name.to_owned();
        blocking(move || {
            // Resolved before the lock: a DeleteDisk (which takes it) may have run since.
            if let Some(d) = disks.iter().find(|d| !d.path.is_file()) {
                return Some(format!(
                    "VM {new}: disk {} was deleted meanwhile",
                    d.path.display()
                ));
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
        .await
    }

    /// Replaces the spec of an existing VM (ApplyVms' update). The UUID never changes (a new
    /// one is a new VM). A running VM keeps running as it was started: the new spec takes
    /// effect at its next start (a guest reboot is one: the VMM starts again); `autostart`
    /// takes effect at once. A VM that holds capacity (running or autostart) must still fit.
    pub async fn update_spec(&self, name: &str, mut spec: VmSpec) -> Result<(), NodeError> {
        let vm = self.get(name)?;
        let current = vm.spec();
        match &spec.uuid {
            None => spec.uuid = current.uuid.clone(),
            Some(u) if Some(u) != current.uuid.as_ref() => {
                return Err(NodeError::InvalidSpec(format!(
                    "VM {name}: the uuid of a VM cannot change ({} to {u}); a new uuid is a new \
                     VM: delete this one first",
                    current.uuid.as_deref().unwrap_or("none")
                )))
            }
            Some(_) => {}
        }
        spec.fill_macs(&self.cfg.node_name, name);
        let resolved = {
            let (spec, stores, vm) = (spec.clone(), self.stores.clone(), name.to_owned());
            blocking(move || spec.resolve(&vm, &stores))
                .await?
                .map_err(|e| NodeError::InvalidSpec(format!("VM {name}: {e}")))?
        };
        // The same order as CreateVm: no VM created or deleted meanwhile.
        let _w = vm.spec_write.lock().await;
        let _membership = self.membership.lock().await;
        vm.ensure_exists()?;
        if let Some(msg) = self.disk_conflict(name, resolved.disks).await? {
            return Err(NodeError::InvalidSpec(msg));
        }
        let old = vm.spec();
        if old == spec {
            return Ok(());
        }
        // Checked and swapped under the admission lock, so no start slips in between.
        self.swap_spec_if_fits(&vm, spec.clone())?;
        let data = serde_json::to_vec_pretty(&spec).map_err(io)?;
        let file = self.cfg.layout.spec_file(name);
        let written = blocking(move || fsutil::write_atomic(&file, &data, 0o640)).await;
        if let Err(e) = written.and_then(|r| r.map_err(io)) {
            vm.lock().spec = old;
            return Err(e);
        }
        tracing::info!(vm = %name, "spec updated");
        self.emit(&vm, &[VmProperty::Autostart, VmProperty::Spec])
            .await;
        Ok(())
    }

    pub async fn set_autostart(&self, name: &str, autostart: bool) -> Result<(), NodeError> {
        let vm = self.get(name)?;
        // Delete holds spec_write while removing the spec file, so this cannot resurrect it.
        let _w = vm.spec_write.lock().await;
        vm.ensure_exists()?;
        let old = vm.spec();
        if old.autostart == autostart {
            return Ok(());
        }
        let mut spec = old.clone();
        spec.autostart = autostart;
        // A VM that is down holds capacity once it autostarts: checked and set under the
        // admission lock (NoCapacity as for a start), undone if the file cannot be written.
        self.swap_spec_if_fits(&vm, spec.clone())?;
        let data = serde_json::to_vec_pretty(&spec).map_err(io)?;
        let file = self.cfg.layout.spec_file(name);
        let written = blocking(move || fsutil::write_atomic(&file, &data, 0o640)).await;
        if let Err(e) = written.and_then(|r| r.map_err(io)) {
            vm.lock().spec = old;
            return Err(e);
        }
        self.emit(&vm, &[VmProperty::Autostart, VmProperty::Spec])
            .await;
        Ok(())
    }
}

/// CreateVm of a name that exists: the existing VM if the spec is the one it was created
/// with (a retried call succeeds, like systemd's idempotent calls), AlreadyExists naming the
/// differences otherwise. A spec without a UUID matches any (the VM got a generated one);
/// MAC addresses left out are derived from the name, so they match too.
fn existing_if_same(
    vm: &Arc<Vm>,
    mut spec: VmSpec,
    uuid_given: bool,
) -> Result<Arc<Vm>, NodeError> {
    let current = vm.spec();
    if !uuid_given {
        spec.uuid = current.uuid.clone();
    }
    if spec == current {
        tracing::info!(vm = %vm.name, "CreateVm with the spec it has: nothing to do");
        return Ok(vm.clone());
    }
    let differ = super::apply::differing_fields(&spec, &current);
    Err(NodeError::AlreadyExists(format!(
        "a VM named {:?} already exists on this node with a different spec (differs in: {}); \
         delete it first or choose another name",
        vm.name,
        differ.join(", ")
    )))
}
