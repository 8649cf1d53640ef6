//! Lifecycle of one VM: start (and restart after a guest reboot), the watch on its VMM
//! process, stop, graceful shutdown, pause and resume.

use super::*;

impl Node {
    // ----- lifecycle -----------------------------------------------------------------------

    pub async fn start(&self, name: &str) -> Result<(), NodeError> {
        let vm = self.get(name)?;
        let _ops = vm.ops.lock().await;
        vm.ensure_exists()?;
        let state = vm.state();
        match state {
            // Idempotent: a retried Start (or one that waited behind another Start) finds
            // the VM running, or restarting after a guest reboot, as asked.
            VmState::Running | VmState::Starting => return Ok(()),
            VmState::Paused => {
                return Err(NodeError::InvalidState(format!(
                    "VM {name} is paused; Resume it instead"
                )))
            }
            VmState::Stopping => {
                return Err(NodeError::InvalidState(format!("VM {name} is stopping")))
            }
            VmState::Defined | VmState::Stopped | VmState::Failed => {}
        }
        self.refuse_if_drained(name)?;
        let _admission = self.admit(&vm)?;
        vm.lock().stop_requested = false;
        vm.lock().reboots.clear();
        self.launch_locked(&vm, &Launch::Boot).await
    }

    /// Starts the VMM; the caller holds `vm.ops`. Returns once the VM is running (or failed):
    /// a booted one once its VMM answers, a migrating one once its guest arrived.
    pub(super) async fn launch_locked(&self, vm: &Arc<Vm>, how: &Launch) -> Result<(), NodeError> {
        let spec = vm.spec();
        let resolved = {
            let (spec, stores, name) = (spec.clone(), self.stores.clone(), vm.name.clone());
            blocking(move || spec.resolve(&name, &stores)).await?
        };
        let resolved = match resolved {
            Ok(r) => r,
            Err(e) => {
                let msg = format!("VM {}: {e}", vm.name);
                self.end_run(vm, VmState::Failed, msg.clone(), false).await;
                return Err(NodeError::InvalidSpec(msg));
            }
        };
        if let Err(e) = self.check_firmware(&resolved).await {
            let msg = format!("VM {}: {e}", vm.name);
            self.end_run(vm, VmState::Failed, msg.clone(), false).await;
            return Err(NodeError::Io(msg));
        }
        // From the spec as it is now, at every start (and restart after a reboot).
        let seed_disk = match &resolved.seed {
            Some(files) => match self.write_seed(&vm.name, &resolved.uuid, files).await {
                Ok(path) => Some(path),
                Err(e) => {
                    let msg = format!("VM {}: {e}", vm.name);
                    self.end_run(vm, VmState::Failed, msg.clone(), false).await;
                    return Err(NodeError::Io(msg));
                }
            },
            None => None,
        };
        if let Err(e) = self.prepare_access(vm, &resolved, seed_disk.clone()).await {
            let msg = format!("VM {}: {e}", vm.name);
            self.end_run(vm, VmState::Failed, msg.clone(), false).await;
            return Err(NodeError::Io(msg));
        }
        let (owner, run_as) = self.vmm_identity(vm);
        // A run in progress has no terminal status.
        let status_file = self.cfg.layout.status_file(&vm.name);
        let _ = blocking(move || fsutil::remove_durable(&status_file)).await;
        let (incoming, reason) = match how {
            Launch::Boot => {
                // A VM left from a cut-short migration (see `recover`): booting it here is
                // the operator's answer to where it runs.
                self.forget_incoming(&vm.name).await;
                (None, "")
            }
            Launch::Incoming(socket) => {
                // The VMM binds it and fails on a stale one.
                let stale = socket.clone();
                let _ = blocking(move || std::fs::remove_file(stale)).await;
                (Some(socket.clone()), "receiving a live migration")
            }
        };
        self.set_state(vm, VmState::Starting, reason).await;
        let mut taps = Vec::new();
        for (i, nic) in resolved.nics.iter().enumerate() {
            let tap = TapRequest {
                name: names::tap_name(&vm.name, i),
                uid: owner.uid,
                gid: owner.gid,
                bridge: nic.bridge.clone(),
                vlan: nic.vlan,
                mtu: None,
            };
            if let Err(e) = self.network.create_tap(&tap).await {
                self.delete_taps(&taps).await;
                let msg = format!("VM {}: {e}", vm.name);
                self.end_run(vm, VmState::Failed, msg.clone(), false).await;
                return Err(NodeError::Network(msg));
            }
            taps.push(tap.name);
        }
        let params = VmmRunParams {
            console_log: self.cfg.layout.console_log(&vm.name),
            api_socket: self.cfg.layout.api_socket(&vm.name),
            taps: taps.clone(),
            switch_to_user: (run_as.is_none() && self.cfg.vmm_switches_user)
                .then_some(self.cfg.vmm_user),
            firmware: self.cfg.firmware.clone(),
            seed_disk,
            incoming,
        };
        let launch = LaunchSpec {
            name: vm.name.clone(),
            vmm: self.cfg.vmm_binary.clone(),
            args: spec::vmm_args(&resolved, &params),
            run_as,
        };
        let generation = {
            let mut st = vm.lock();
            st.generation += 1;
            st.taps = taps.clone();
            st.generation
        };
        let exited = match self.runner.launch(&launch).await {
            Ok(f) => f,
            Err(e) => {
                self.delete_taps(&taps).await;
                let msg = e.to_string();
                self.end_run(vm, VmState::Failed, msg.clone(), false).await;
                return Err(NodeError::Vmm(msg));
            }
        };
        vm.lock().process = true;
        self.watch_exit(vm, generation, exited);
        self.wait_ready(vm, generation, how).await
    }

    /// Builds the VM's NoCloud seed volume in its run directory (a tmpfs: the seed is
    /// rebuilt at every start, and the run directory is the one the VMM may read under the
    /// systemd unit); returns its path.
    pub(super) async fn write_seed(
        &self,
        name: &str,
        uuid: &str,
        files: &SeedFiles,
    ) -> Result<PathBuf, String> {
        let path = self.cfg.layout.seed_image(name);
        // The VMM's --disk option separates its parameters with commas.
        if path.to_string_lossy().contains(',') {
            return Err(format!(
                "the cloud-init seed path {} contains ',', which thvc-vmm's --disk cannot take",
                path.display()
            ));
        }
        let dir = self.cfg.layout.vm_run_dir(name);
        let (files, id, target) = (files.clone(), seed::volume_id(uuid), path.clone());
        blocking(move || {
            fsutil::create_dir_all(&dir, 0o750).map_err(|e| e.to_string())?;
            seed::write(&target, &files, id).map_err(|e| e.to_string())
        })
        .await
        .map_err(|e| e.to_string())??;
        Ok(path)
    }

    /// A firmware-booted VM needs the agent's firmware file: say so clearly instead of
    /// letting the VMM fail on it.
    pub(super) async fn check_firmware(&self, resolved: &ResolvedSpec) -> Result<(), String> {
        if !matches!(resolved.boot, Boot::Firmware(_)) {
            return Ok(());
        }
        let path = self.cfg.firmware.clone();
        let meta = blocking({
            let path = path.clone();
            move || std::fs::metadata(path)
        })
        .await
        .map_err(|e| e.to_string())?;
        match meta {
            Ok(m) if m.is_file() => Ok(()),
            Ok(_) => Err(format!(
                "the UEFI firmware {} is not a regular file",
                path.display()
            )),
            Err(e) => Err(format!(
                "the UEFI firmware {} cannot be used ({e}): install it or start \
                 thvc-nodeagent with --firmware PATH",
                path.display()
            )),
        }
    }

    pub(super) fn watch_exit(&self, vm: &Arc<Vm>, generation: u64, exited: ExitFuture) {
        let Some(node) = self.arc() else { return };
        let vm = vm.clone();
        tokio::spawn(async move {
            let outcome = exited.await;
            node.on_exit(&vm, generation, outcome).await;
        });
    }

    /// Waits until the VMM answers on its API socket. A VMM that serves no API socket is
    /// taken as running once it survived the start timeout. A migration's target runs once
    /// its VMM says the guest arrived (no longer `migrating-in`): that takes as long as the
    /// source needs, which the VMMs bound (their waits for the peer, the source's rounds).
    pub(super) async fn wait_ready(
        &self,
        vm: &Arc<Vm>,
        generation: u64,
        how: &Launch,
    ) -> Result<(), NodeError> {
        let deadline = Instant::now() + self.cfg.start_timeout;
        let socket = self.cfg.layout.api_socket(&vm.name);
        let mut rx = vm.state_tx.subscribe();
        let mut poll = Duration::from_millis(2);
        loop {
            {
                let st = vm.lock();
                let incoming = matches!(how, Launch::Incoming(_));
                if incoming && st.generation == generation {
                    // A migration target's guest has arrived only once its VMM said so; a
                    // VMM that ended first failed, whatever its end has been recorded as
                    // yet (its exit may be noticed before the state says so).
                    match st.state {
                        VmState::Running | VmState::Paused => return Ok(()),
                        VmState::Starting if st.process => {}
                        VmState::Failed => return Err(NodeError::Vmm(st.reason.clone())),
                        _ => {
                            return Err(NodeError::Vmm(format!(
                                "the migrated guest did not arrive: its VMM ended (see {})",
                                self.runner.vmm_log_location(&vm.name)
                            )))
                        }
                    }
                } else if st.generation != generation
                    || !st.process
                    || st.state != VmState::Starting
                {
                    // Also stop waiting when this run's process is gone: a reboot during
                    // start is restarted by a task that needs the ops lock we hold.
                    return match st.state {
                        VmState::Failed => Err(NodeError::Vmm(st.reason.clone())),
                        _ => Ok(()),
                    };
                }
            }
            if socket.exists() && self.vmm_ready(&socket, how).await {
                self.transition(
                    vm,
                    |st| st.generation == generation && st.state == VmState::Starting,
                    VmState::Running,
                    String::new(),
                )
                .await;
                continue;
            }
            if Instant::now() >= deadline && matches!(how, Launch::Boot) {
                let note = if socket.exists() {
                    "the VMM's API socket does not answer"
                } else {
                    "the VMM serves no API socket: Pause, Resume and Info are unavailable"
                };
                tracing::warn!(vm = %vm.name, "{note}");
                self.transition(
                    vm,
                    |st| st.generation == generation && st.state == VmState::Starting,
                    VmState::Running,
                    note.to_owned(),
                )
                .await;
                continue;
            }
            // Wake on a state change (exit) or poll the socket again, backing off from 2 ms
            // (a VMM binds its socket within milliseconds) to 50 ms.
            let _ = tokio::time::timeout(poll, rx.changed()).await;
            poll = (poll * 2).min(Duration::from_millis(50));
        }
    }

    /// Does the VMM at `socket` run its guest (see [`Node::wait_ready`])?
    async fn vmm_ready(&self, socket: &Path, how: &Launch) -> bool {
        match how {
            Launch::Boot => vmm_api::call(socket, Request::Ping).await.is_ok(),
            Launch::Incoming(_) => vmm_api::call(socket, Request::Info)
                .await
                .is_ok_and(|info| info["state"] != "migrating-in"),
        }
    }

    pub(super) async fn delete_taps(&self, taps: &[String]) {
        for t in taps {
            if let Err(e) = self.network.delete_tap(t).await {
                tracing::warn!("deleting TAP {t}: {e}");
            }
        }
    }

    /// Handles the end of a VMM process.
    pub(super) async fn on_exit(&self, vm: &Arc<Vm>, generation: u64, outcome: ExitOutcome) {
        let (stop_requested, taps, reboot_ok, migrating_to) = {
            let mut st = vm.lock();
            if st.generation != generation {
                return;
            }
            st.process = false;
            let now = Instant::now();
            while st
                .reboots
                .front()
                .is_some_and(|t| now.duration_since(*t) > REBOOT_WINDOW)
            {
                st.reboots.pop_front();
            }
            let reboot_ok = st.reboots.len() < MAX_REBOOTS;
            if outcome == ExitOutcome::Exited(3) && reboot_ok {
                st.reboots.push_back(now);
            }
            (
                st.stop_requested,
                std::mem::take(&mut st.taps),
                reboot_ok,
                st.migrating_to.clone(),
            )
        };
        self.delete_taps(&taps).await;
        tracing::info!(vm = %vm.name, ?outcome, stop_requested, "VMM exited");
        if let (Some(target), ExitOutcome::Exited(0)) = (migrating_to, &outcome) {
            // The MigrateVm job tells whether the guest went (and then deletes the VM
            // here) or powered off meanwhile; either way nothing is to be restarted.
            self.end_run(vm, VmState::Stopped, format!("migrated to {target}"), true)
                .await;
            return;
        }
        if stop_requested {
            let reason = match &outcome {
                ExitOutcome::Exited(0) | ExitOutcome::Exited(3) => "stopped".to_owned(),
                other => format!("stopped ({})", describe_exit(other)),
            };
            self.end_run(vm, VmState::Stopped, reason, true).await;
            return;
        }
        self.handle_unattended_exit(vm, generation, outcome, reboot_ok)
            .await;
    }

    /// An exit nobody asked for: power-off, reboot or failure.
    pub(super) async fn handle_unattended_exit(
        &self,
        vm: &Arc<Vm>,
        generation: u64,
        outcome: ExitOutcome,
        reboot_ok: bool,
    ) {
        let log = self.runner.vmm_log_location(&vm.name);
        match outcome {
            ExitOutcome::Exited(0) => {
                let reason = describe_exit(&outcome);
                self.end_run(vm, VmState::Stopped, reason, false).await;
            }
            ExitOutcome::Exited(3) if reboot_ok => {
                self.set_state(vm, VmState::Starting, "the guest rebooted; restarting")
                    .await;
                let Some(node) = self.arc() else { return };
                let vm = vm.clone();
                tokio::spawn(async move {
                    let _ops = vm.ops.lock().await;
                    {
                        let st = vm.lock();
                        // Stopped (or restarted) by someone else meanwhile.
                        if st.generation != generation
                            || st.deleted
                            || st.stop_requested
                            || st.state != VmState::Starting
                        {
                            return;
                        }
                    }
                    if let Err(e) = node.launch_locked(&vm, &Launch::Boot).await {
                        tracing::warn!(vm = %vm.name, "restart after reboot failed: {e}");
                    }
                });
            }
            ExitOutcome::Exited(3) => {
                let reason = format!(
                    "the guest rebooted more than {MAX_REBOOTS} times within {}s; giving up (see {})",
                    REBOOT_WINDOW.as_secs(),
                    self.cfg.layout.console_log(&vm.name).display()
                );
                self.end_run(vm, VmState::Failed, reason, false).await;
            }
            other => {
                let reason = format!("{} (see {log})", describe_exit(&other));
                self.end_run(vm, VmState::Failed, reason, false).await;
            }
        }
    }

    /// Waits until the VMM process of `vm` is gone and its end handled (recorded, TAPs
    /// removed, the state down), at most `timeout`. (The process flag alone drops as the
    /// exit is noticed: a Stop returning then could still show `stopping`.)
    pub(super) async fn wait_run_ended(&self, vm: &Vm, timeout: Duration) -> bool {
        let ended = || {
            let st = vm.lock();
            !st.process && st.state.is_down()
        };
        let mut rx = vm.state_tx.subscribe();
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if ended() {
                return true;
            }
            match tokio::time::timeout_at(deadline, rx.changed()).await {
                Ok(Ok(())) => continue,
                Ok(Err(_)) | Err(_) => return ended(),
            }
        }
    }

    /// A Shutdown's wait for the guest to power off: at most the shutdown timeout, and a
    /// Stop ends it early ([`Vm::cut_shutdown_short`]).
    pub(super) async fn wait_power_off(&self, vm: &Vm) -> PowerOff {
        let stop_now = vm.stop_now.notified();
        tokio::pin!(stop_now);
        // Registered before the flag is set: a Stop that sees the flag reaches this wait.
        stop_now.as_mut().enable();
        {
            let mut st = vm.lock();
            if st.stops_waiting > 0 {
                // A Stop came before this wait began and waits for this Shutdown to end.
                return PowerOff::CutShort;
            }
            st.awaiting_power_off = true;
        }
        let outcome = tokio::select! {
            biased;
            ended = self.wait_run_ended(vm, self.cfg.shutdown_timeout) => {
                if ended { PowerOff::Done } else { PowerOff::TimedOut }
            }
            () = &mut stop_now => PowerOff::CutShort,
        };
        vm.lock().awaiting_power_off = false;
        outcome
    }

    /// Stop (SIGTERM, then SIGKILL) or Shutdown (ACPI power button first).
    pub async fn stop(&self, name: &str, graceful: bool) -> Result<(), NodeError> {
        let vm = self.get(name)?;
        // A Stop does not queue behind a Shutdown that waits for the guest (60 s by
        // default): it ends that wait, and the Shutdown stops the VMM right away.
        let (cut_short, waiting) = if graceful {
            (false, None)
        } else {
            let (cut, guard) = vm.stop_waiting();
            (cut, Some(guard))
        };
        let _ops = vm.ops.lock().await;
        drop(waiting);
        if cut_short && vm.ensure_exists().is_err() {
            // The Shutdown it cut short stopped the VM, and a DeleteVm that waited for that
            // shutdown deleted it before this Stop got its turn: stopped, as asked.
            return Ok(());
        }
        vm.ensure_exists()?;
        let state = vm.state();
        if state.is_down() {
            // Idempotent: the VM is down, as asked (by this Stop through a Shutdown it cut
            // short, or earlier). The operator's intent is recorded all the same, so a
            // restarted agent does not autostart it.
            if !cut_short {
                self.record_operator_stop(&vm).await;
            }
            return Ok(());
        }
        // The intent is durable before anything is done: an agent killed during the stop
        // finishes it when it comes back instead of restarting (or autostarting) the VM.
        // (Before `stop_requested`: an exit noticed from then on records the real end,
        // which this record must not overwrite.)
        let kind = if graceful {
            PendingStop::Shutdown
        } else {
            PendingStop::Stop
        };
        self.persist_pending_stop(&vm, kind).await;
        let has_process = {
            let mut st = vm.lock();
            st.stop_requested = true;
            st.process
        };
        let result = self.stop_running(&vm, state, graceful, has_process).await;
        if result.is_err() && vm.lock().process {
            // Not stopped after all: a running VM has no terminal record.
            self.clear_terminal(&vm).await;
        }
        result
    }

    /// The body of Stop/Shutdown for a VM that is up; the caller holds `vm.ops` and has
    /// recorded the intent.
    async fn stop_running(
        &self,
        vm: &Arc<Vm>,
        state: VmState,
        graceful: bool,
        has_process: bool,
    ) -> Result<(), NodeError> {
        let name = vm.name.as_str();
        if !has_process {
            // Between a reboot exit and its restart: nothing to stop.
            self.end_run(vm, VmState::Stopped, "stopped", true).await;
            return Ok(());
        }
        // Unless the VMM exited meanwhile: its end (stopped, as asked) must not be
        // overwritten.
        self.transition(vm, |st| st.process, VmState::Stopping, String::new())
            .await;
        let socket = self.cfg.layout.api_socket(name);
        if graceful {
            if state == VmState::Paused {
                // A paused guest cannot react to the power button.
                let _ = vmm_api::call(&socket, Request::Resume).await;
            }
            match vmm_api::call(&socket, Request::Shutdown).await {
                Ok(_) => match self.wait_power_off(vm).await {
                    PowerOff::Done => return Ok(()),
                    PowerOff::TimedOut => {
                        tracing::warn!(vm = %name, timeout = ?self.cfg.shutdown_timeout, "guest did not power off in time; stopping the VMM");
                    }
                    PowerOff::CutShort => {
                        tracing::info!(vm = %name, "Stop requested during the shutdown; stopping the VMM");
                    }
                },
                Err(e) => {
                    tracing::warn!(vm = %name, "graceful shutdown not possible ({e}); stopping the VMM");
                }
            }
        }
        self.runner.terminate(name).await.map_err(io)?;
        if self.wait_run_ended(vm, self.cfg.stop_timeout).await {
            return Ok(());
        }
        tracing::warn!(vm = %name, "VMM ignored SIGTERM; killing it");
        self.runner.kill(name).await.map_err(io)?;
        if self.wait_run_ended(vm, self.cfg.stop_timeout).await {
            return Ok(());
        }
        Err(NodeError::Io(format!(
            "VM {name}: the VMM did not exit after SIGKILL"
        )))
    }

    pub async fn pause(&self, name: &str) -> Result<(), NodeError> {
        self.pause_resume(name, true).await
    }

    pub async fn resume(&self, name: &str) -> Result<(), NodeError> {
        self.pause_resume(name, false).await
    }

    pub(super) async fn pause_resume(&self, name: &str, pause: bool) -> Result<(), NodeError> {
        let vm = self.get(name)?;
        let _ops = vm.ops.lock().await;
        vm.ensure_exists()?;
        let (from, to, request) = if pause {
            (VmState::Running, VmState::Paused, Request::Pause)
        } else {
            (VmState::Paused, VmState::Running, Request::Resume)
        };
        let state = vm.state();
        if state != from {
            return Err(NodeError::InvalidState(format!(
                "VM {name} is {}; {} needs it {}",
                state.as_str(),
                if pause { "Pause" } else { "Resume" },
                from.as_str()
            )));
        }
        vmm_api::call(&self.cfg.layout.api_socket(name), request)
            .await
            .map_err(|e| vmm_err(name, e))?;
        self.transition(&vm, |st| st.state == from, to, String::new())
            .await;
        Ok(())
    }

    pub async fn info(&self, name: &str) -> Result<String, NodeError> {
        let vm = self.get(name)?;
        if !vm.lock().process {
            return Err(NodeError::InvalidState(format!(
                "VM {name} is {}; Info needs a running VMM",
                vm.state().as_str()
            )));
        }
        let v = vmm_api::call(&self.cfg.layout.api_socket(name), Request::Info)
            .await
            .map_err(|e| vmm_err(name, e))?;
        Ok(v.to_string())
    }

    pub async fn read_console(&self, name: &str, offset: u64) -> Result<(Vec<u8>, u64), NodeError> {
        self.get(name)?;
        let path = self.cfg.layout.console_log(name);
        tokio::task::spawn_blocking(move || console::read(&path, offset))
            .await
            .map_err(io)?
            .map_err(io)
    }
}
