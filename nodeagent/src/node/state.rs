//! Observable VM state: transitions, their events, and the terminal records a restarted
//! agent reads back.

use super::*;

impl Node {
    // ----- state changes -------------------------------------------------------------------

    /// Publishes a change of `vm`'s properties; a VM no longer in the table (deleted, its
    /// object withdrawn) has nobody left to tell.
    pub(super) async fn emit(&self, vm: &Vm, props: &[VmProperty]) {
        let Some(vm) = self.get(&vm.name).ok().filter(|v| std::ptr::eq(&**v, vm)) else {
            return;
        };
        let _ = self.publish(NodeEvent::VmChanged(vm, props.to_vec())).await;
    }

    /// Sets the state if `check` accepts the current status; emits PropertiesChanged.
    pub(super) async fn transition(
        &self,
        vm: &Vm,
        check: impl FnOnce(&VmStatus) -> bool,
        state: VmState,
        reason: String,
    ) -> bool {
        let mut changed = Vec::new();
        {
            let mut st = vm.lock();
            if !check(&st) {
                return false;
            }
            if st.state != state {
                changed.push(VmProperty::State);
            }
            if st.reason != reason {
                changed.push(VmProperty::StateReason);
            }
            if changed.is_empty() {
                return true;
            }
            tracing::info!(vm = %vm.name, from = st.state.as_str(), to = state.as_str(), %reason, "state change");
            st.state = state;
            st.reason = reason;
        }
        vm.state_tx.send_replace(state);
        self.emit(vm, &changed).await;
        true
    }

    pub(super) async fn set_state(&self, vm: &Vm, state: VmState, reason: impl Into<String>) {
        self.transition(vm, |_| true, state, reason.into()).await;
    }

    /// Records a terminal state (durably first, so a client that saw it and a restarted
    /// agent agree; and a Stop or DeleteVm that waited for it finds the record written),
    /// then shows it.
    pub(super) async fn end_run(
        &self,
        vm: &Vm,
        state: VmState,
        reason: impl Into<String>,
        operator_stopped: bool,
    ) {
        let reason = reason.into();
        self.persist_terminal(vm, state, &reason, operator_stopped)
            .await;
        self.set_state(vm, state, reason).await;
    }

    pub(super) async fn persist_terminal(
        &self,
        vm: &Vm,
        state: VmState,
        reason: &str,
        operator_stopped: bool,
    ) {
        let status = TerminalStatus {
            state,
            reason: reason.to_owned(),
            operator_stopped,
            pending: None,
        };
        self.write_status(vm, &status).await;
    }

    /// Records that a Stop or Shutdown of `vm` is under way, before it acts (see
    /// [`TerminalStatus::pending`]).
    pub(super) async fn persist_pending_stop(&self, vm: &Vm, kind: PendingStop) {
        let status = TerminalStatus {
            state: VmState::Stopping,
            reason: "stop requested".to_owned(),
            operator_stopped: true,
            pending: Some(kind),
        };
        self.write_status(vm, &status).await;
    }

    /// A Stop of a VM that is already down: keep its state, note the operator's intent.
    pub(super) async fn record_operator_stop(&self, vm: &Vm) {
        let name = vm.name.clone();
        let previous = match self.read_terminal(&name).await {
            Some(t) if t.operator_stopped => return,
            Some(t) => Some(t),
            None => None,
        };
        let (state, reason) = match previous {
            Some(t) => (t.state, t.reason),
            None => (vm.state(), vm.state_reason()),
        };
        self.persist_terminal(vm, state, &reason, true).await;
    }

    /// Removes the terminal record (a VM that runs has none).
    pub(super) async fn clear_terminal(&self, vm: &Vm) {
        let path = self.cfg.layout.status_file(&vm.name);
        if let Ok(Err(e)) = blocking(move || fsutil::remove_durable(&path)).await {
            tracing::warn!(vm = %vm.name, "cannot remove the terminal record: {e}");
        }
    }

    async fn write_status(&self, vm: &Vm, status: &TerminalStatus) {
        let data = serde_json::to_vec(status).unwrap_or_default();
        let dir = self.cfg.layout.vm_run_dir(&vm.name);
        let path = self.cfg.layout.status_file(&vm.name);
        let result = blocking(move || {
            fsutil::create_dir_all(&dir, 0o750)
                .and_then(|()| fsutil::write_atomic(&path, &data, 0o640))
                .map_err(io)
        })
        .await;
        if let Err(e) = result.and_then(|r| r) {
            tracing::warn!(vm = %vm.name, "cannot record terminal state: {e}");
        }
    }

    pub(super) async fn read_terminal(&self, name: &str) -> Option<TerminalStatus> {
        let path = self.cfg.layout.status_file(name);
        let data = blocking(move || std::fs::read(path)).await.ok()?.ok()?;
        serde_json::from_slice(&data).ok()
    }
}
