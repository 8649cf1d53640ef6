//! Declarative VMs: `ApplyVms(document, dry_run)`. A control plane states which VMs the node
//! should have and in which state; the agent compares that with what it has, makes a plan
//! and carries it out as one job, as ApplyNetwork does for the host network:
//!
//! ```json
//! { "exclusive": false,
//!   "vms": [ { "name": "web1", "state": "running", "spec": { "vcpus": 2, ... } } ] }
//! ```
//!
//! - `state` is `running` or `stopped`; `autostart` is the spec's own field.
//! - **Ownership.** The agent remembers which VMs documents name (`applied-vms.json` in its
//!   state directory). A VM a later document leaves out is shut down and deleted if a
//!   document had named it; VMs made by CreateVm are left alone, unless the document is
//!   `exclusive` (it owns the whole node: every VM it does not name goes). A document that
//!   names a VM made by CreateVm adopts it.
//! - **Updates.** A spec that differs replaces the stored one. A VM that is up keeps running
//!   as it was started: the new spec takes effect at its next start (a guest reboot is one,
//!   the VMM starts again), `autostart` at once; the plan says which (`effect`). A spec with
//!   another `uuid` is another VM: the old one is shut down and deleted, the new one created.
//! - **Drift.** The plan is made from the VMs' states now: a VM that went down behind the
//!   agent's back (its VMM killed, a guest that powered off) is started again.
//! - **Order.** Shutdowns (in parallel; graceful, stopped after the agent's shutdown
//!   timeout), deletes, updates, creates, then starts and resumes (a few at a time), so
//!   capacity freed comes before capacity taken. An action that fails skips the later
//!   actions on the same VM; the others go on. Cancel skips every action not begun.
//! - The whole document is checked first (names, specs, referenced files); a bad one is
//!   refused as a whole and nothing changes. Re-applying a document the node already
//!   matches finds no actions and starts no job. One ApplyVms runs at a time (Busy).
//!
//! The plan comes back at once; JobRemoved's message is the same plan with each action's
//! `result` (`done`, `failed` with `error`, `skipped`, `canceled`). Each action carried out is
//! an audit record of its own (`ApplyVms.create` of `web1`, ...): the trail says who changed a
//! VM whether through a call or a document (see [`crate::audit`]).

use std::collections::BTreeSet;

use super::jobs::{Job, JobOperation};
use super::*;
use crate::audit::{self, Origin};
use crate::images::JobControl;

/// More VMs than a node could ever run: a bound on the document, not a policy.
const MAX_VMS: usize = 4096;
/// Starts (and resumes) in flight at once: each launches a VMM and waits for its guest.
const PARALLEL_STARTS: usize = 8;
/// Stands in for the UUID while a spec without one is checked.
const PLACEHOLDER_UUID: &str = "00000000-0000-4000-8000-000000000000";

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Document {
    #[serde(default)]
    exclusive: bool,
    vms: Vec<Entry>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Entry {
    name: String,
    state: Desired,
    spec: serde_json::Value,
}

/// The state a document asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Desired {
    Running,
    Stopped,
}

/// One VM the document asks for, checked.
#[derive(Debug, Clone)]
pub struct Wanted {
    pub name: String,
    pub state: Desired,
    /// MACs filled in, the UUID normalized (absent: keep the VM's, or generate one).
    pub spec: VmSpec,
}

/// A VM as the node has it, for planning.
#[derive(Debug, Clone)]
pub struct Have {
    pub name: String,
    pub state: VmState,
    pub spec: VmSpec,
}

/// What an action does; the order of the variants is the order of execution.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ActionKind {
    Shutdown,
    Delete,
    Update,
    Create,
    Start,
    Resume,
}

impl ActionKind {
    /// As in the plan's JSON.
    pub fn as_str(self) -> &'static str {
        match self {
            ActionKind::Shutdown => "shutdown",
            ActionKind::Delete => "delete",
            ActionKind::Update => "update",
            ActionKind::Create => "create",
            ActionKind::Start => "start",
            ActionKind::Resume => "resume",
        }
    }
}

/// When an update takes effect.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Effect {
    Now,
    NextStart,
}

/// How an action ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    Done,
    Failed,
    /// An earlier action on the same VM failed.
    Skipped,
    Canceled,
}

#[derive(Debug, Clone, Serialize)]
pub struct Action {
    pub vm: String,
    pub action: ActionKind,
    pub reason: String,
    /// Updates: the spec fields that change.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub fields: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub effect: Option<Effect>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub result: Option<Outcome>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Creates and updates: the spec to store.
    #[serde(skip)]
    spec: Option<VmSpec>,
}

impl Action {
    fn new(vm: &str, action: ActionKind, reason: impl Into<String>) -> Action {
        Action {
            vm: vm.to_owned(),
            action,
            reason: reason.into(),
            fields: Vec::new(),
            effect: None,
            result: None,
            error: None,
            spec: None,
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Plan {
    pub dry_run: bool,
    pub exclusive: bool,
    pub actions: Vec<Action>,
    /// VMs of the document that need nothing.
    pub unchanged: Vec<String>,
    /// VMs the document does not name and does not own.
    pub left_alone: Vec<String>,
    /// The job carrying the plan out; empty for a dry run or when there is nothing to do.
    pub job: String,
    /// That job's id.
    #[serde(skip)]
    pub job_id: Option<u32>,
}

impl Plan {
    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).unwrap_or_default()
    }
}

/// The names documents manage, as stored.
#[derive(Debug, Default, Serialize, Deserialize)]
struct Applied {
    vms: BTreeSet<String>,
}

/// Parses and checks a document (no files: see [`Node::apply_vms`] for those).
pub fn parse_document(document: &str, node_name: &str) -> Result<(bool, Vec<Wanted>), NodeError> {
    let doc: Document = serde_json::from_str(document)
        .map_err(|e| NodeError::InvalidSpec(format!("the VM document is not valid: {e}")))?;
    if doc.vms.len() > MAX_VMS {
        return Err(NodeError::InvalidSpec(format!(
            "the VM document names {} VMs; at most {MAX_VMS}",
            doc.vms.len()
        )));
    }
    let mut seen = BTreeSet::new();
    let mut wanted = Vec::with_capacity(doc.vms.len());
    for (i, e) in doc.vms.into_iter().enumerate() {
        names::validate_vm_name(&e.name)
            .map_err(|err| NodeError::InvalidSpec(format!("vms[{i}]: {err}")))?;
        if !seen.insert(e.name.clone()) {
            return Err(NodeError::InvalidSpec(format!(
                "vms[{i}]: VM {:?} is named twice",
                e.name
            )));
        }
        let bad = |err: &dyn std::fmt::Display| {
            NodeError::InvalidSpec(format!("vms[{i}] ({}): {err}", e.name))
        };
        let mut spec: VmSpec = serde_json::from_value(e.spec).map_err(|err| bad(&err))?;
        if spec.uuid.is_some() {
            spec.fill_uuid().map_err(|err| bad(&err))?;
        }
        spec.fill_macs(node_name, &e.name);
        wanted.push(Wanted {
            name: e.name,
            state: e.state,
            spec,
        });
    }
    Ok((doc.exclusive, wanted))
}

/// The spec fields in which two specs differ.
pub(super) fn differing_fields(a: &VmSpec, b: &VmSpec) -> Vec<String> {
    let fields = |s: &VmSpec| match serde_json::to_value(s) {
        Ok(serde_json::Value::Object(m)) => m,
        _ => serde_json::Map::new(),
    };
    let (a, b) = (fields(a), fields(b));
    let keys: BTreeSet<&String> = a.keys().chain(b.keys()).collect();
    keys.into_iter()
        .filter(|k| a.get(*k) != b.get(*k))
        .cloned()
        .collect()
}

/// The actions that take the node from `have` to `wanted` (a pure function: the tests
/// check it without a node).
pub fn plan(
    wanted: &[Wanted],
    exclusive: bool,
    managed: &BTreeSet<String>,
    have: &[Have],
) -> (Vec<Action>, Vec<String>, Vec<String>) {
    let mut actions = Vec::new();
    let (mut unchanged, mut left_alone) = (Vec::new(), Vec::new());
    let wanted_names: BTreeSet<&str> = wanted.iter().map(|w| w.name.as_str()).collect();
    let up = |s: VmState| !s.is_down() && s != VmState::Stopping;
    for h in have {
        if wanted_names.contains(h.name.as_str()) {
            continue;
        }
        if exclusive || managed.contains(&h.name) {
            let why = if exclusive {
                "not in the document, which owns the node"
            } else {
                "no longer in the document"
            };
            if up(h.state) {
                actions.push(Action::new(&h.name, ActionKind::Shutdown, why));
            }
            actions.push(Action::new(&h.name, ActionKind::Delete, why));
        } else {
            left_alone.push(h.name.clone());
        }
    }
    for w in wanted {
        let Some(h) = have.iter().find(|h| h.name == w.name) else {
            let mut create = Action::new(&w.name, ActionKind::Create, "not on the node");
            create.spec = Some(w.spec.clone());
            actions.push(create);
            if w.state == Desired::Running {
                actions.push(Action::new(&w.name, ActionKind::Start, "wanted running"));
            }
            continue;
        };
        let before = actions.len();
        let mut spec = w.spec.clone();
        if spec.uuid.is_none() {
            spec.uuid = h.spec.uuid.clone();
        }
        if spec.uuid != h.spec.uuid {
            // Another incarnation of the name.
            let why = "the document's uuid is another VM's";
            if up(h.state) {
                actions.push(Action::new(&w.name, ActionKind::Shutdown, why));
            }
            actions.push(Action::new(&w.name, ActionKind::Delete, why));
            let mut create = Action::new(&w.name, ActionKind::Create, why);
            create.spec = Some(spec);
            actions.push(create);
            if w.state == Desired::Running {
                actions.push(Action::new(&w.name, ActionKind::Start, "wanted running"));
            }
            continue;
        }
        let fields = differing_fields(&spec, &h.spec);
        if !fields.is_empty() {
            let live = fields.iter().all(|f| f == "autostart");
            let mut update = Action::new(&w.name, ActionKind::Update, "the spec differs");
            update.effect = Some(if h.state.is_down() || live {
                Effect::Now
            } else {
                Effect::NextStart
            });
            update.fields = fields;
            update.spec = Some(spec);
            actions.push(update);
        }
        let state = h.state.as_str();
        match (w.state, h.state) {
            (Desired::Running, VmState::Paused) => actions.push(Action::new(
                &w.name,
                ActionKind::Resume,
                "paused, wanted running",
            )),
            (Desired::Running, s) if s.is_down() || s == VmState::Stopping => {
                actions.push(Action::new(
                    &w.name,
                    ActionKind::Start,
                    format!("{state}, wanted running"),
                ))
            }
            (Desired::Stopped, s) if up(s) => actions.push(Action::new(
                &w.name,
                ActionKind::Shutdown,
                format!("{state}, wanted stopped"),
            )),
            _ => {}
        }
        if actions.len() == before {
            unchanged.push(w.name.clone());
        }
    }
    // Stable: a VM's actions keep their order within a phase.
    actions.sort_by_key(|a| a.action);
    (actions, unchanged, left_alone)
}

impl Node {
    /// ApplyVms (see the module docs): checks the document, plans, and unless `dry_run`
    /// starts the job that carries the plan out; each action it carries out is audited
    /// under `origin`.
    pub async fn apply_vms(
        self: &Arc<Self>,
        document: &str,
        dry_run: bool,
        origin: Origin,
    ) -> Result<Plan, NodeError> {
        let (exclusive, wanted) = parse_document(document, &self.cfg.node_name)?;
        let host_mib = crate::hostinfo::memory_bytes() >> 20;
        if let Some(w) = wanted
            .iter()
            .find(|w| host_mib > 0 && w.spec.memory_mib > host_mib)
        {
            return Err(NodeError::InvalidSpec(format!(
                "VM {}: memory_mib {} is more than this host's {host_mib} MiB of RAM",
                w.name, w.spec.memory_mib
            )));
        }
        // Every referenced file resolves inside the stores, before anything changes.
        {
            let (specs, stores) = (wanted.clone(), self.stores.clone());
            blocking(move || {
                for w in &specs {
                    let mut spec = w.spec.clone();
                    // Not known yet for a VM still to be created (or one that keeps its own);
                    // a stand-in is enough to check the rest.
                    spec.uuid.get_or_insert_with(|| PLACEHOLDER_UUID.to_owned());
                    spec.resolve(&w.name, &stores)
                        .map_err(|e| NodeError::InvalidSpec(format!("VM {}: {e}", w.name)))?;
                }
                Ok::<(), NodeError>(())
            })
            .await??;
        }
        let guard = if dry_run {
            None
        } else {
            Some(self.apply.clone().try_lock_owned().map_err(|_| {
                NodeError::Busy("another ApplyVms is in progress; wait for its job".into())
            })?)
        };
        let managed = self.read_applied().await?;
        let have: Vec<Have> = self
            .list()
            .iter()
            .map(|vm| Have {
                name: vm.name.clone(),
                state: vm.state(),
                spec: vm.spec(),
            })
            .collect();
        let (actions, unchanged, left_alone) = plan(&wanted, exclusive, &managed, &have);
        let mut plan = Plan {
            dry_run,
            exclusive,
            actions,
            unchanged,
            left_alone,
            job: String::new(),
            job_id: None,
        };
        let Some(guard) = guard else {
            return Ok(plan);
        };
        // Managed from now on: the document's VMs and those it deletes (until they are gone).
        let named: BTreeSet<String> = wanted.iter().map(|w| w.name.clone()).collect();
        let deleting: BTreeSet<String> = plan
            .actions
            .iter()
            .filter(|a| a.action == ActionKind::Delete && !named.contains(&a.vm))
            .map(|a| a.vm.clone())
            .collect();
        let mut now_managed = named.clone();
        now_managed.extend(deleting.iter().cloned());
        if now_managed != managed {
            self.write_applied(&now_managed).await?;
        }
        if plan.actions.is_empty() {
            return Ok(plan);
        }
        let control = Arc::new(JobControl::default());
        control.set_total(plan.actions.len() as u64);
        let job = self.new_job(
            JobOperation::ApplyVms,
            "",
            "",
            Some(control.clone()),
            origin,
        );
        let actions = plan.actions.clone();
        let job = self
            .run_job(job, move |node, job: Arc<Job>| async move {
                let _one_at_a_time = guard;
                let done = node.carry_out(actions, &control, &job).await;
                // Deleted VMs are no longer managed; those that failed to go stay so.
                let mut still = named;
                still.extend(
                    done.iter()
                        .filter(|a| {
                            a.action == ActionKind::Delete
                                && a.result != Some(Outcome::Done)
                                && deleting.contains(&a.vm)
                        })
                        .map(|a| a.vm.clone()),
                );
                if let Err(e) = node.write_applied(&still).await {
                    tracing::warn!("recording the VMs documents manage: {e}");
                }
                let report = serde_json::to_string_pretty(&done).unwrap_or_default();
                if done.iter().all(|a| a.result == Some(Outcome::Done)) {
                    Ok(report)
                } else {
                    Err(NodeError::Incomplete(report))
                }
            })
            .await?;
        plan.job = job.path.clone();
        plan.job_id = Some(job.id);
        Ok(plan)
    }

    /// Runs the actions phase by phase (see the module docs); returns them with results.
    /// Each action carried out is audited as the apply's caller's `ApplyVms.<action>` of its
    /// VM (skipped and canceled ones are in the job's report only).
    async fn carry_out(
        self: &Arc<Self>,
        mut actions: Vec<Action>,
        control: &JobControl,
        job: &Job,
    ) -> Vec<Action> {
        let mut failed: BTreeSet<String> = BTreeSet::new();
        let mut i = 0;
        while i < actions.len() {
            let kind = actions[i].action;
            let end = actions[i..]
                .iter()
                .position(|a| a.action != kind)
                .map_or(actions.len(), |n| i + n);
            let parallel = match kind {
                ActionKind::Shutdown => end - i,
                ActionKind::Start | ActionKind::Resume => PARALLEL_STARTS,
                ActionKind::Delete | ActionKind::Update | ActionKind::Create => 1,
            };
            let phase = &mut actions[i..end];
            for chunk in phase.chunks_mut(parallel.max(1)) {
                let mut tasks = Vec::new();
                for a in chunk.iter_mut() {
                    if failed.contains(&a.vm) {
                        a.result = Some(Outcome::Skipped);
                        a.error = Some("an earlier action on this VM failed".into());
                        control.advance();
                        continue;
                    }
                    if control.is_canceled() {
                        a.result = Some(Outcome::Canceled);
                        control.advance();
                        continue;
                    }
                    let (node, act) = (self.clone(), a.clone());
                    tasks.push((a, tokio::spawn(async move { node.act(&act).await })));
                }
                for (a, task) in tasks {
                    let result = task.await.unwrap_or_else(|e| {
                        Err(NodeError::Io(format!("the action did not complete: {e}")))
                    });
                    match result {
                        Ok(()) => a.result = Some(Outcome::Done),
                        Err(e) => {
                            a.result = Some(Outcome::Failed);
                            a.error = Some(e.to_string());
                            failed.insert(a.vm.clone());
                        }
                    }
                    self.audit_action(job, a);
                    control.advance();
                }
            }
            i = end;
        }
        actions
    }

    fn audit_action(&self, job: &Job, a: &Action) {
        let action = format!("{}.{}", job.origin.action, a.action.as_str());
        audit::record(
            self.cfg.journal_socket.as_deref(),
            &audit::Record {
                action: &action,
                uid: job.origin.uid,
                object: &a.vm,
                outcome: if a.result == Some(Outcome::Done) {
                    audit::Outcome::Ok
                } else {
                    audit::Outcome::Failed
                },
                error: a.error.as_deref(),
                job: Some(job.id),
                message: None,
            },
        );
    }

    async fn act(&self, a: &Action) -> Result<(), NodeError> {
        let spec = || {
            a.spec.clone().ok_or_else(|| {
                NodeError::Io(format!("{:?} of VM {} without a spec", a.action, a.vm))
            })
        };
        match a.action {
            ActionKind::Shutdown => self.stop(&a.vm, true).await,
            ActionKind::Delete => match self.delete(&a.vm).await {
                Err(NodeError::NotFound(_)) => Ok(()),
                other => other,
            },
            ActionKind::Update => self.update_spec(&a.vm, spec()?).await,
            ActionKind::Create => {
                let json = serde_json::to_string(&spec()?).map_err(io)?;
                self.create(&a.vm, &json).await.map(drop)
            }
            ActionKind::Start => self.start(&a.vm).await,
            ActionKind::Resume => self.resume(&a.vm).await,
        }
    }

    async fn read_applied(&self) -> Result<BTreeSet<String>, NodeError> {
        let file = self.cfg.layout.applied_file();
        blocking(move || match std::fs::read(&file) {
            Ok(data) => serde_json::from_slice::<Applied>(&data)
                .map(|a| a.vms)
                .map_err(|e| NodeError::Io(format!("{} is damaged: {e}", file.display()))),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(BTreeSet::new()),
            Err(e) => Err(NodeError::Io(format!("reading {}: {e}", file.display()))),
        })
        .await?
    }

    async fn write_applied(&self, vms: &BTreeSet<String>) -> Result<(), NodeError> {
        let data = serde_json::to_vec_pretty(&Applied { vms: vms.clone() }).map_err(io)?;
        let file = self.cfg.layout.applied_file();
        blocking(move || fsutil::write_atomic(&file, &data, 0o644))
            .await?
            .map_err(io)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(vcpus: u32) -> VmSpec {
        spec::parse(&format!(
            r#"{{"vcpus": {vcpus}, "memory_mib": 128, "kernel": "k", "uuid": "0f3c1b2a-9d4e-4f6a-8b7c-1d2e3f4a5b6c"}}"#
        ))
        .unwrap()
    }
    fn want(name: &str, state: Desired, vcpus: u32) -> Wanted {
        Wanted {
            name: name.into(),
            state,
            spec: spec(vcpus),
        }
    }
    fn have(name: &str, state: VmState, vcpus: u32) -> Have {
        Have {
            name: name.into(),
            state,
            spec: spec(vcpus),
        }
    }
    fn kinds(actions: &[Action]) -> Vec<(String, ActionKind)> {
        actions.iter().map(|a| (a.vm.clone(), a.action)).collect()
    }

    #[test]
    fn a_node_that_matches_needs_nothing() {
        let w = [
            want("a", Desired::Running, 1),
            want("b", Desired::Stopped, 1),
        ];
        let h = [
            have("a", VmState::Running, 1),
            have("b", VmState::Failed, 1),
        ];
        let (actions, unchanged, _) = plan(&w, false, &BTreeSet::new(), &h);
        assert!(actions.is_empty(), "{actions:?}");
        assert_eq!(unchanged, ["a", "b"]);
    }

    #[test]
    fn the_plan_frees_before_it_takes_and_leaves_unmanaged_vms_alone() {
        let w = [
            want("new", Desired::Running, 1),
            want("grow", Desired::Running, 2),
            want("halt", Desired::Stopped, 1),
            want("nap", Desired::Running, 1),
        ];
        let h = [
            have("grow", VmState::Running, 1),
            have("halt", VmState::Running, 1),
            have("nap", VmState::Paused, 1),
            have("old", VmState::Running, 1),
            have("mine", VmState::Running, 1),
        ];
        let managed: BTreeSet<String> = ["old".to_string()].into();
        let (actions, _, left) = plan(&w, false, &managed, &h);
        use ActionKind::*;
        assert_eq!(
            kinds(&actions),
            [
                ("old".into(), Shutdown),
                ("halt".into(), Shutdown),
                ("old".into(), Delete),
                ("grow".into(), Update),
                ("new".into(), Create),
                ("new".into(), Start),
                ("nap".into(), Resume),
            ]
        );
        let update = &actions[3];
        assert_eq!(update.fields, ["vcpus"]);
        assert_eq!(update.effect, Some(Effect::NextStart));
        assert_eq!(left, ["mine"]);
        // An exclusive document owns the node.
        let (actions, _, left) = plan(&w, true, &managed, &h);
        assert!(left.is_empty());
        assert!(kinds(&actions).contains(&("mine".into(), Delete)));
    }

    #[test]
    fn drift_and_incarnations_are_planned() {
        // Down behind the agent's back: started again.
        let (actions, ..) = plan(
            &[want("a", Desired::Running, 1)],
            false,
            &BTreeSet::new(),
            &[have("a", VmState::Failed, 1)],
        );
        assert_eq!(kinds(&actions), [("a".into(), ActionKind::Start)]);
        // Another uuid: another VM of the same name.
        let mut w = want("a", Desired::Running, 1);
        w.spec.uuid = Some("11111111-2222-4333-8444-555555555555".into());
        let (actions, ..) = plan(
            &[w],
            false,
            &BTreeSet::new(),
            &[have("a", VmState::Running, 1)],
        );
        use ActionKind::*;
        assert_eq!(
            kinds(&actions),
            [
                ("a".into(), Shutdown),
                ("a".into(), Delete),
                ("a".into(), Create),
                ("a".into(), Start)
            ]
        );
        // No uuid in the document: the VM keeps its own; autostart changes live.
        let mut w = want("a", Desired::Running, 1);
        w.spec.uuid = None;
        w.spec.autostart = true;
        let (actions, ..) = plan(
            &[w],
            false,
            &BTreeSet::new(),
            &[have("a", VmState::Running, 1)],
        );
        assert_eq!(kinds(&actions), [("a".into(), Update)]);
        assert_eq!(actions[0].fields, ["autostart"]);
        assert_eq!(actions[0].effect, Some(Effect::Now));
    }

    #[test]
    fn bad_documents_are_refused_whole() {
        let node = "n";
        for (doc, why) in [
            ("[]", "not valid"),
            (
                r#"{"vms": [{"name": "a", "state": "up", "spec": {}}]}"#,
                "not valid",
            ),
            (r#"{"vms": [], "extra": 1}"#, "not valid"),
            (
                r#"{"vms": [{"name": "../x", "state": "running", "spec": {"vcpus": 1, "memory_mib": 128, "kernel": "k"}}]}"#,
                "vms[0]",
            ),
            (
                r#"{"vms": [{"name": "a", "state": "running", "spec": {"vcpus": 1, "memory_mib": 128, "kernel": "k"}}, {"name": "a", "state": "stopped", "spec": {"vcpus": 1, "memory_mib": 128, "kernel": "k"}}]}"#,
                "named twice",
            ),
            (
                r#"{"vms": [{"name": "a", "state": "running", "spec": {"vcpus": 1, "memory_mib": 128, "kernel": "k", "uuid": "nope"}}]}"#,
                "uuid",
            ),
            (
                r#"{"vms": [{"name": "a", "state": "running", "spec": {"vcpu": 1}}]}"#,
                "vms[0] (a)",
            ),
        ] {
            match parse_document(doc, node) {
                Err(NodeError::InvalidSpec(m)) => assert!(m.contains(why), "{doc}: {m}"),
                other => panic!("{doc}: {other:?}"),
            }
        }
    }
}
