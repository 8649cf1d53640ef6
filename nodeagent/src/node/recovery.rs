//! Recovery after an agent (re)start: persisted VMs are loaded, running VMMs re-adopted,
//! exits that happened meanwhile reported, autostart VMs started.

use super::*;
use crate::runner::VMM_EXIT_NOT_ARRIVED;

impl Node {
    // ----- recovery ------------------------------------------------------------------------

    /// Loads persisted VMs, re-adopts running VMMs, reports exits that happened while no
    /// agent ran, and starts autostart VMs. Call after [`Node::subscribe`] (the transport serves
    /// the loaded VMs' objects).
    pub async fn recover(&self) -> Result<(), NodeError> {
        // Blocking file work (a directory of specs, fsyncs for new UUIDs) off the runtime
        // threads, like every other call's.
        let layout = self.cfg.layout.clone();
        let (first_since_boot, mut names_found, incoming) = blocking(move || {
            let first_since_boot = !layout.boot_marker().exists();
            let found = load_specs(&layout)?;
            let incoming = incoming_markers(&layout, &found);
            Ok::<_, NodeError>((first_since_boot, found, incoming))
        })
        .await??;
        names_found.sort_by(|a, b| a.0.cmp(&b.0));
        let mut loaded = Vec::new();
        {
            // No CreateVm of the same names meanwhile.
            let _membership = self.membership.lock().await;
            for (name, spec) in names_found {
                let vm = Vm::new(&name, spec, VmState::Defined, String::new());
                if self.cfg.vmm_uids.is_some() {
                    let stored = self.stored_uid(&name).await;
                    match self.allocate_uid(&name, stored).await {
                        Ok(uid) => vm.lock().vmm_uid = uid,
                        Err(e) => tracing::error!(vm = %name, "{e}"),
                    }
                }
                // In the table before its object is announced, as in `create`.
                self.table().insert(name.clone(), vm.clone());
                if let Err(e) = self.publish(NodeEvent::VmAdded(vm.clone())).await {
                    tracing::error!(vm = %name, "serving the VM's object: {e}");
                }
                loaded.push(vm);
            }
        }
        let mut to_autostart = Vec::new();
        let mut never_arrived = Vec::new();
        for vm in &loaded {
            let terminal = self.read_terminal(&vm.name).await;
            let pending = terminal.as_ref().and_then(|t| t.pending);
            let incoming = incoming.contains(&vm.name);
            match self.runner.adopt(&vm.name).await {
                Ok(Adoption::Running(exited)) => {
                    let vmm_state =
                        vmm_api::call(&self.cfg.layout.api_socket(&vm.name), Request::Info)
                            .await
                            .ok()
                            .and_then(|v| v.get("state")?.as_str().map(str::to_owned));
                    let paused = vmm_state.as_deref() == Some("paused");
                    let waiting = vmm_state.as_deref() == Some("migrating-in");
                    let generation = {
                        let mut st = vm.lock();
                        st.generation += 1;
                        st.process = true;
                        st.taps = (0..st.spec.nics.len())
                            .map(|i| names::tap_name(&vm.name, i))
                            .collect();
                        st.generation
                    };
                    let (state, note) = if incoming && waiting {
                        // Its guest never arrived: the source still has it (below).
                        never_arrived.push(vm.name.clone());
                        (VmState::Starting, "receiving a live migration")
                    } else if paused {
                        (VmState::Paused, "")
                    } else {
                        (VmState::Running, "")
                    };
                    self.set_state(vm, state, note).await;
                    tracing::info!(vm = %vm.name, "re-adopted running VMM");
                    self.watch_exit(vm, generation, exited);
                    if incoming && !waiting && vmm_state.is_some() {
                        // Migrated in: the guest runs here, the agent ended before it said so.
                        tracing::info!(vm = %vm.name, "the migrated guest runs here");
                        self.forget_incoming(&vm.name).await;
                    }
                    if let Some(kind) = pending {
                        // The previous agent died during a Stop or Shutdown: finish it.
                        tracing::info!(vm = %vm.name, ?kind, "finishing the stop the previous agent began");
                        if let Some(node) = self.arc() {
                            let vm = vm.clone();
                            tokio::spawn(async move {
                                let graceful = kind == PendingStop::Shutdown;
                                if let Err(e) = node.stop(&vm.name, graceful).await {
                                    tracing::warn!(vm = %vm.name, "finishing the stop failed: {e}");
                                }
                            });
                        }
                    }
                }
                Ok(Adoption::Exited(ExitOutcome::Exited(VMM_EXIT_NOT_ARRIVED))) if incoming => {
                    // Its VMM said so itself: the guest never ran here.
                    never_arrived.push(vm.name.clone());
                }
                Ok(Adoption::Exited(_)) | Ok(Adoption::NotRunning) if incoming => {
                    // A ReceiveVm cut short, its VMM gone: whether the guest ever ran here
                    // cannot be known any more, so it neither starts nor goes by itself.
                    tracing::warn!(vm = %vm.name, "an incoming live migration was cut short; the VM waits for the operator");
                    self.set_state(vm, VmState::Failed, INCOMING_CUT_SHORT)
                        .await;
                }
                Ok(Adoption::Exited(_)) | Ok(Adoption::NotRunning) if pending.is_some() => {
                    // Stopped as the operator asked; the agent died before recording it.
                    tracing::info!(vm = %vm.name, "VMM gone after a Stop the previous agent began");
                    self.end_run(vm, VmState::Stopped, "stopped", true).await;
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
        for name in never_arrived {
            tracing::warn!(vm = %name, "an incoming live migration was cut short before the guest arrived; removing what it made here");
            self.abandon_incoming(&name).await;
        }
        if first_since_boot {
            let marker = self.cfg.layout.boot_marker();
            if let Ok(Err(e)) = blocking(move || fsutil::write_atomic(&marker, b"", 0o644)).await {
                tracing::warn!("cannot write boot marker: {e}");
            }
        }
        if self.is_drained() && !to_autostart.is_empty() {
            tracing::info!(
                vms = to_autostart.len(),
                "the node is drained: no autostart (Undrain to lift)"
            );
            to_autostart.clear();
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
}

/// What a VM left by an incoming migration that an agent's end cut short says, when its
/// VMM is gone: the source's MigrateVm failed, so its guest most likely runs there still,
/// but the agent may have ended right after the guest began to run here.
const INCOMING_CUT_SHORT: &str =
    "an incoming live migration was cut short (the agent ended during it) and its VMM is gone: \
     if the VM still runs on the node it came from, delete it here; if not, start it here";

/// The names of the loaded VMs with an incoming marker (`Layout::incoming_marker`); markers
/// without a spec (the agent ended before it wrote the spec) are removed. Blocking.
fn incoming_markers(layout: &Layout, loaded: &[(String, VmSpec)]) -> HashSet<String> {
    let mut marked = HashSet::new();
    let Ok(entries) = std::fs::read_dir(layout.specs_dir()) else {
        return marked;
    };
    for entry in entries.flatten() {
        let file = entry.file_name().to_string_lossy().into_owned();
        let Some(name) = file.strip_suffix(".incoming") else {
            continue;
        };
        if loaded.iter().any(|(n, _)| n == name) {
            marked.insert(name.to_owned());
        } else if let Err(e) = fsutil::remove_durable(&entry.path()) {
            tracing::warn!("removing {}: {e}", entry.path().display());
        }
    }
    marked
}

/// The persisted specs (`<state>/vms/NAME.json`); files that do not load are logged and
/// skipped. Blocking.
fn load_specs(layout: &Layout) -> Result<Vec<(String, VmSpec)>, NodeError> {
    let dir = layout.specs_dir();
    let mut found = Vec::new();
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
            if let Err(e) = give_uuid(&layout.spec_file(name), name, &mut spec) {
                tracing::error!("VM {name}: {e}");
                continue;
            }
        }
        found.push((name.to_owned(), spec));
    }
    Ok(found)
}

/// Gives a loaded spec without a UUID one and persists it, so the guest sees the same UUID
/// from now on. Blocking.
fn give_uuid(file: &Path, name: &str, spec: &mut VmSpec) -> Result<(), NodeError> {
    spec.fill_uuid().map_err(io)?;
    let data = serde_json::to_vec_pretty(&spec).map_err(io)?;
    fsutil::write_atomic(file, &data, 0o640).map_err(io)?;
    tracing::info!(vm = %name, uuid = spec.uuid.as_deref().unwrap_or(""), "assigned a UUID");
    Ok(())
}
