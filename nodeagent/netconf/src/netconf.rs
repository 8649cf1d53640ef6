//! The public entry point: [`Netconf`] ties observe -> plan -> apply together with the
//! ownership file, and manages VM TAPs.

use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;

use serde::Serialize;
use tokio::sync::Mutex;
use tracing::{info, warn};

use crate::addr::IpCidr;
use crate::apply::{ExecError, Executor, Outcome};
use crate::document::{
    check_ifname, BondSpec, BridgeSpec, Document, LinkKind, LinkSpec, LinkState, PortVlanFlags,
    PortVlans, RouteSpec, ValidationErrors, VlanRange, VlanSpec, Zone, MAIN_TABLE,
};
use crate::model::{ObservedKind, ObservedLink, ObservedState};
use crate::observe::observe;
use crate::plan::{compute_plan, diff_port_vlans, NewLink, Plan, PlanError, Step};
use crate::state::{OwnedLink, OwnedTap, Ownership, StateError, StateLock, StateStore};
use crate::tap::{create_persistent_tap, TapError, TapSpec};

#[derive(Debug, thiserror::Error)]
pub enum NetconfError {
    #[error("{0}")]
    Invalid(#[from] ValidationErrors),
    #[error("{0}")]
    Conflict(#[from] PlanError),
    #[error("cannot open an rtnetlink socket: {0}")]
    Connect(std::io::Error),
    #[error("cannot read the kernel's network state: {0}")]
    Observe(Box<rtnetlink::Error>),
    #[error("{0}")]
    State(#[from] StateError),
    #[error(
        "step {number}/{total} failed: {step}: {source}\n{completed} earlier step(s) were \
         applied and kept; fix the cause and apply again to continue from there"
    )]
    StepFailed {
        number: usize,
        total: usize,
        step: String,
        completed: usize,
        source: Box<ExecError>,
    },
    #[error("{0}")]
    Tap(#[from] TapError),
    #[error("cannot read {path}: {source}")]
    ReadDocument {
        path: String,
        source: std::io::Error,
    },
    #[error("{0}")]
    Usage(String),
    #[error("internal error: {0}")]
    Internal(String),
}

impl NetconfError {
    /// Process exit status for the CLI: 2 for bad input, 1 for failures.
    pub fn exit_code(&self) -> i32 {
        match self {
            NetconfError::Invalid(_)
            | NetconfError::Usage(_)
            | NetconfError::ReadDocument { .. } => 2,
            _ => 1,
        }
    }
}

/// What an apply did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ApplyReport {
    /// Whether the kernel was changed.
    pub changed: bool,
    /// The steps that ran, in order.
    pub steps: Vec<Step>,
    pub notes: Vec<String>,
}

impl fmt::Display for ApplyReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.steps.is_empty() {
            writeln!(f, "no changes: the kernel already matches the document")?;
        } else {
            writeln!(f, "applied {} change(s):", self.steps.len())?;
            for step in &self.steps {
                writeln!(f, "  {step}")?;
            }
        }
        for note in &self.notes {
            writeln!(f, "note: {note}")?;
        }
        Ok(())
    }
}

/// The host network configurator for the current network namespace.
pub struct Netconf {
    handle: rtnetlink::Handle,
    store: StateStore,
    /// Serializes operations of this process; the state lock serializes processes.
    busy: Mutex<()>,
}

impl fmt::Debug for Netconf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Netconf")
            .field("state", &self.store.path())
            .finish()
    }
}

impl Netconf {
    /// Opens an rtnetlink connection in the current network namespace (of the calling
    /// thread) and uses `state_dir` for the ownership file. Needs a tokio runtime.
    pub async fn new(state_dir: &Path) -> Result<Netconf, NetconfError> {
        let store = StateStore::new(state_dir)?;
        let (connection, handle, _) = rtnetlink::new_connection().map_err(NetconfError::Connect)?;
        tokio::spawn(connection);
        Ok(Netconf {
            handle,
            store,
            busy: Mutex::new(()),
        })
    }

    async fn lock_state(&self) -> Result<StateLock, NetconfError> {
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || store.lock())
            .await
            .map_err(|e| NetconfError::Internal(format!("state lock task: {e}")))?
            .map_err(NetconfError::State)
    }

    /// Reads the ownership records on a blocking thread (not on the async runtime's threads,
    /// which may be answering other calls meanwhile).
    async fn load_state(&self) -> Result<Ownership, NetconfError> {
        let store = self.store.clone();
        tokio::task::spawn_blocking(move || store.load())
            .await
            .map_err(|e| NetconfError::Internal(format!("state read task: {e}")))?
            .map_err(NetconfError::State)
    }

    /// Writes the ownership records (an fsync or two) on a blocking thread.
    async fn save_state(&self, ownership: &Ownership) -> Result<(), NetconfError> {
        let (store, ownership) = (self.store.clone(), ownership.clone());
        tokio::task::spawn_blocking(move || store.save(&ownership))
            .await
            .map_err(|e| NetconfError::Internal(format!("state write task: {e}")))?
            .map_err(NetconfError::State)
    }

    async fn observe(&self) -> Result<ObservedState, NetconfError> {
        observe(&self.handle)
            .await
            .map_err(|e| NetconfError::Observe(Box::new(e)))
    }

    /// The steps `apply` would run now. Changes nothing.
    pub async fn plan(&self, doc: &Document) -> Result<Plan, NetconfError> {
        doc.validate()?;
        let _busy = self.busy.lock().await;
        let _lock = self.lock_state().await?;
        let mut ownership = self.load_state().await?;
        let observed = self.observe().await?;
        forget_stale_records(&mut ownership, &observed);
        Ok(compute_plan(doc, &observed, &ownership)?)
    }

    /// Brings the kernel to `doc`. Nothing happens if the document is invalid or conflicts
    /// with links thvc-netconf does not own. A failing step stops the run; what ran before
    /// stays and is recorded, so the next apply continues from there.
    pub async fn apply(&self, doc: &Document) -> Result<ApplyReport, NetconfError> {
        doc.validate()?;
        let _busy = self.busy.lock().await;
        let _lock = self.lock_state().await?;
        let mut ownership = self.load_state().await?;
        let observed = self.observe().await?;
        let forgot = forget_stale_records(&mut ownership, &observed);
        let plan = compute_plan(doc, &observed, &ownership)?;
        if plan.is_empty() {
            if forgot {
                self.save_state(&ownership).await?;
            }
            info!("network already matches the document");
            return Ok(ApplyReport {
                changed: false,
                steps: Vec::new(),
                notes: plan.notes,
            });
        }
        // Record intent before creating anything, so a crash mid-way cannot leave links
        // that we made but do not know are ours.
        for step in &plan.steps {
            if let Step::CreateLink { name, link, .. } = step {
                ownership.links.insert(
                    name.clone(),
                    OwnedLink {
                        kind: new_link_kind(link),
                        ifindex: None,
                    },
                );
            }
        }
        self.save_state(&ownership).await?;
        let known = observed.links.values().map(|l| (l.name.clone(), l.index));
        let mut executor = Executor::new(self.handle.clone(), known);
        let total = plan.steps.len();
        let mut done = Vec::new();
        for (i, step) in plan.steps.iter().enumerate() {
            info!(step = i + 1, total, "{step}");
            match executor.run(step).await {
                Ok(outcome) => {
                    match (step, outcome) {
                        (Step::CreateLink { name, link, .. }, Outcome::Created(index)) => {
                            // Insert, not update: a re-create's delete dropped the record.
                            ownership.links.insert(
                                name.clone(),
                                OwnedLink {
                                    kind: new_link_kind(link),
                                    ifindex: Some(index),
                                },
                            );
                        }
                        (Step::DeleteLink { name, .. }, _) => {
                            ownership.links.remove(name);
                        }
                        _ => {}
                    }
                    done.push(step.clone());
                }
                Err(source) => {
                    warn!(step = i + 1, total, "{step} failed: {source}");
                    // Creations that never happened must not stay as intents.
                    for later in &plan.steps[i..] {
                        if let Step::CreateLink { name, .. } = later {
                            if ownership
                                .links
                                .get(name)
                                .is_some_and(|r| r.ifindex.is_none())
                            {
                                ownership.links.remove(name);
                            }
                        }
                    }
                    self.save_state(&ownership).await?;
                    return Err(NetconfError::StepFailed {
                        number: i + 1,
                        total,
                        step: step.to_string(),
                        completed: i,
                        source: Box::new(source),
                    });
                }
            }
        }
        self.save_state(&ownership).await?;
        Ok(ApplyReport {
            changed: true,
            steps: done,
            notes: plan.notes,
        })
    }

    /// The current state as a document: links thvc-netconf manages plus physical ones.
    pub async fn show(&self) -> Result<Document, NetconfError> {
        let _busy = self.busy.lock().await;
        let ownership = {
            let _lock = self.lock_state().await?;
            self.load_state().await?
        };
        let observed = self.observe().await?;
        Ok(document_from_state(&observed, &ownership))
    }

    /// Creates a persistent TAP owned by `tap.uid`:`tap.gid`, plugs it into `tap.bridge`
    /// (with `tap.vlan` as its untagged PVID on a VLAN-filtering bridge) and brings it up.
    /// Calling it again with the same spec changes nothing.
    pub async fn create_tap(&self, tap: &TapSpec) -> Result<(), NetconfError> {
        if let Some(problem) = check_ifname(&tap.name) {
            return Err(TapError::Invalid(problem).into());
        }
        if let Some(vlan) = tap.vlan {
            if !(1..=4094).contains(&vlan) {
                return Err(
                    TapError::Invalid(format!("VLAN {vlan} is out of range 1..=4094")).into(),
                );
            }
            if tap.bridge.is_none() {
                return Err(TapError::Invalid("a VLAN needs a bridge".into()).into());
            }
        }
        if let Some(mtu) = tap.mtu {
            if !(68..=65535).contains(&mtu) {
                return Err(
                    TapError::Invalid(format!("MTU {mtu} is out of range 68..=65535")).into(),
                );
            }
        }
        let _busy = self.busy.lock().await;
        let _lock = self.lock_state().await?;
        let mut ownership = self.load_state().await?;
        let observed = self.observe().await?;
        forget_stale_records(&mut ownership, &observed);
        if ownership.links.contains_key(&tap.name) {
            return Err(TapError::Conflict(format!(
                "{} is a link of the network document, not a TAP",
                tap.name
            ))
            .into());
        }
        let bridge = match &tap.bridge {
            None => None,
            Some(name) => match observed.get(name) {
                Some(ObservedLink {
                    kind: ObservedKind::Bridge(bridge),
                    ..
                }) => {
                    if tap.vlan.is_some() && !bridge.vlan_filtering {
                        return Err(TapError::Conflict(format!(
                            "bridge {name} does not filter VLANs; cannot put {} in a VLAN",
                            tap.name
                        ))
                        .into());
                    }
                    Some((name.clone(), bridge.default_pvid))
                }
                Some(other) => {
                    return Err(TapError::Conflict(format!(
                        "{name} is a {}, not a bridge",
                        other.kind.describe()
                    ))
                    .into())
                }
                None => {
                    return Err(TapError::Conflict(format!("bridge {name} does not exist")).into())
                }
            },
        };
        let existing = observed.get(&tap.name);
        match existing {
            Some(link) if !ownership.owns_tap(link) => {
                return Err(TapError::NotOurs(tap.name.clone()).into())
            }
            Some(ObservedLink {
                kind: ObservedKind::Tun { uid, gid },
                ..
            }) if (*uid, *gid) != (Some(tap.uid), Some(tap.gid)) => {
                return Err(TapError::Conflict(format!(
                    "TAP {} exists with owner {uid:?}:{gid:?}, wanted {}:{}; delete it first",
                    tap.name, tap.uid, tap.gid
                ))
                .into())
            }
            _ => {}
        }
        let mut record = OwnedTap {
            uid: tap.uid,
            gid: tap.gid,
            bridge: tap.bridge.clone(),
            vlan: tap.vlan,
            mtu: tap.mtu,
            ifindex: existing.map(|l| l.index),
        };
        ownership.taps.insert(tap.name.clone(), record.clone());
        self.save_state(&ownership).await?;
        if existing.is_none() {
            if let Err(e) = create_persistent_tap(&tap.name, tap.uid, tap.gid) {
                ownership.taps.remove(&tap.name);
                self.save_state(&ownership).await?;
                return Err(e.into());
            }
        }
        // Configure it with the same steps the planner uses.
        let mut steps = Vec::new();
        let current = existing.cloned();
        if let Some(mtu) = tap.mtu {
            let from = current.as_ref().map(|l| l.mtu).unwrap_or(0);
            if from != mtu {
                steps.push(Step::SetMtu {
                    name: tap.name.clone(),
                    from,
                    to: mtu,
                });
            }
        }
        let current_master = current.as_ref().and_then(|l| l.master.clone());
        let mut port_vlans = current
            .as_ref()
            .and_then(|l| l.port_vlans.clone())
            .unwrap_or_default();
        match &bridge {
            Some((name, default_pvid)) if current_master.as_deref() != Some(name) => {
                steps.push(Step::Enslave {
                    name: tap.name.clone(),
                    master: name.clone(),
                    master_is_bond: false,
                    previous_master: current_master.clone(),
                });
                port_vlans = if *default_pvid == 0 {
                    BTreeMap::new()
                } else {
                    BTreeMap::from([(*default_pvid, PortVlanFlags::NATIVE)])
                };
            }
            None if current_master.is_some() => {
                steps.push(Step::Release {
                    name: tap.name.clone(),
                    master: current_master.clone().unwrap_or_default(),
                });
            }
            _ => {}
        }
        if let (Some((name, _)), Some(vlan)) = (&bridge, tap.vlan) {
            let desired = BTreeMap::from([(vlan, PortVlanFlags::NATIVE)]);
            let (remove, add) = diff_port_vlans(&port_vlans, &desired);
            if !remove.is_empty() || !add.is_empty() {
                steps.push(Step::SetPortVlans {
                    port: tap.name.clone(),
                    bridge: name.clone(),
                    remove,
                    add,
                });
            }
        }
        if !current.as_ref().is_some_and(|l| l.up) {
            steps.push(Step::SetState {
                name: tap.name.clone(),
                up: true,
            });
        }
        let mut executor = Executor::new(self.handle.clone(), Vec::new());
        let total = steps.len();
        for (i, step) in steps.iter().enumerate() {
            info!("tap {}: {step}", tap.name);
            executor
                .run(step)
                .await
                .map_err(|source| NetconfError::StepFailed {
                    number: i + 1,
                    total,
                    step: step.to_string(),
                    completed: i,
                    source: Box::new(source),
                })?;
        }
        record.ifindex =
            Some(
                executor
                    .index(&tap.name)
                    .await
                    .map_err(|source| NetconfError::StepFailed {
                        number: total,
                        total,
                        step: format!("look up TAP {}", tap.name),
                        completed: total,
                        source: Box::new(source),
                    })?,
            );
        ownership.taps.insert(tap.name.clone(), record);
        self.save_state(&ownership).await?;
        Ok(())
    }

    /// Deletes a TAP made by [`Netconf::create_tap`]. Deleting one that is already gone
    /// succeeds; a link of that name that create_tap did not make is refused.
    pub async fn delete_tap(&self, name: &str) -> Result<(), NetconfError> {
        let _busy = self.busy.lock().await;
        let _lock = self.lock_state().await?;
        let mut ownership = self.load_state().await?;
        let observed = self.observe().await?;
        let link = observed.get(name);
        if !ownership.taps.contains_key(name) {
            return match link {
                Some(_) => Err(TapError::NotOurs(name.to_string()).into()),
                None => Ok(()),
            };
        }
        if let Some(link) = link {
            if !ownership.owns_tap(link) {
                ownership.taps.remove(name);
                self.save_state(&ownership).await?;
                return Err(TapError::NotOurs(name.to_string()).into());
            }
            let step = Step::DeleteLink {
                name: name.to_string(),
                kind: "tap".into(),
                reason: "VM interface removed".into(),
            };
            let mut executor = Executor::new(self.handle.clone(), [(name.to_string(), link.index)]);
            executor
                .run(&step)
                .await
                .map_err(|source| NetconfError::StepFailed {
                    number: 1,
                    total: 1,
                    step: step.to_string(),
                    completed: 0,
                    source: Box::new(source),
                })?;
        }
        ownership.taps.remove(name);
        self.save_state(&ownership).await?;
        Ok(())
    }
}

fn new_link_kind(link: &NewLink) -> LinkKind {
    match link {
        NewLink::Bond { .. } => LinkKind::Bond,
        NewLink::Vlan { .. } => LinkKind::Vlan,
        NewLink::Bridge { .. } => LinkKind::Bridge,
    }
}

/// Drops ownership records that no longer describe a kernel link (deleted behind our back,
/// replaced by someone else's link of the same name, or intents that never materialized);
/// claims intents whose link exists. Returns whether anything changed.
fn forget_stale_records(ownership: &mut Ownership, observed: &ObservedState) -> bool {
    let before = ownership.clone();
    ownership
        .links
        .retain(|name, record| match observed.get(name) {
            Some(link) => match record.ifindex {
                Some(index) => index == link.index,
                None => link.kind.link_kind() == Some(record.kind),
            },
            None => false,
        });
    for (name, record) in ownership.links.iter_mut() {
        if record.ifindex.is_none() {
            record.ifindex = observed.get(name).map(|l| l.index);
        }
    }
    ownership
        .taps
        .retain(|name, record| match observed.get(name) {
            Some(link) => match record.ifindex {
                Some(index) => index == link.index,
                None => matches!(link.kind, ObservedKind::Tun { .. }),
            },
            None => false,
        });
    for (name, record) in ownership.taps.iter_mut() {
        if record.ifindex.is_none() {
            record.ifindex = observed.get(name).map(|l| l.index);
        }
    }
    *ownership != before
}

/// Renders kernel state as a document: links we own, and physical-like links.
pub fn document_from_state(observed: &ObservedState, ownership: &Ownership) -> Document {
    let members_of = |master: &str| -> Vec<String> {
        observed
            .links
            .values()
            .filter(|l| l.master.as_deref() == Some(master))
            .filter(|l| !matches!(l.kind, ObservedKind::Tun { .. }))
            .map(|l| l.name.clone())
            .collect()
    };
    let mut links: Vec<(u8, u32, LinkSpec)> = Vec::new();
    for link in observed.links.values() {
        let owned = ownership.owns(link);
        let physical = matches!(
            &link.kind,
            ObservedKind::Other { kind } if kind.is_none() || matches!(kind.as_deref(), Some("veth") | Some("dummy"))
        );
        if !owned && !physical {
            continue;
        }
        let Some(kind) = link.kind.link_kind() else {
            continue;
        };
        let mut spec = LinkSpec::new(&link.name, kind);
        spec.mtu = Some(link.mtu);
        spec.zone = Zone::from_group(link.group);
        spec.state = if link.up {
            LinkState::Up
        } else {
            LinkState::Down
        };
        if !physical {
            spec.mac = link.mac;
        }
        let addresses: Vec<IpCidr> = link.addresses.clone();
        let routes: Vec<RouteSpec> = link
            .routes
            .iter()
            .map(|r| RouteSpec {
                to: r.to,
                via: r.via,
                metric: Some(r.metric),
                table: (r.table != MAIN_TABLE).then_some(r.table),
                onlink: false,
            })
            .collect();
        if !physical || !addresses.is_empty() {
            spec.addresses = Some(addresses);
        }
        if !physical || !routes.is_empty() {
            spec.routes = Some(routes);
        }
        let layer = match &link.kind {
            ObservedKind::Bond(bond) => {
                let Some(mode) = bond.mode else { continue };
                let mut bond_spec = BondSpec::new(mode);
                bond_spec.members = members_of(&link.name);
                bond_spec.miimon_ms = bond.miimon_ms;
                bond_spec.updelay_ms = bond.updelay_ms;
                bond_spec.downdelay_ms = bond.downdelay_ms;
                bond_spec.lacp_rate = bond.lacp_rate.filter(|_| mode == crate::BondMode::Lacp);
                bond_spec.xmit_hash_policy = bond.xmit_hash_policy;
                bond_spec.primary = bond.primary.clone();
                bond_spec.min_links = bond.min_links;
                spec.bond = Some(bond_spec);
                1
            }
            ObservedKind::Vlan { parent, id } => {
                spec.vlan = Some(VlanSpec {
                    parent: parent.clone().unwrap_or_default(),
                    id: *id,
                });
                2
            }
            ObservedKind::Bridge(bridge) => {
                let ports = members_of(&link.name);
                let mut port_vlans = BTreeMap::new();
                if bridge.vlan_filtering {
                    for port in &ports {
                        if let Some(vlans) = observed
                            .get(port)
                            .and_then(|p| p.port_vlans.as_ref())
                            .and_then(port_vlans_from_table)
                        {
                            port_vlans.insert(port.clone(), vlans);
                        }
                    }
                }
                spec.bridge = Some(BridgeSpec {
                    ports,
                    stp: Some(bridge.stp),
                    vlan_filtering: Some(bridge.vlan_filtering),
                    port_vlans,
                });
                3
            }
            _ => 0,
        };
        links.push((layer, link.index, spec));
    }
    links.sort_by_key(|(layer, index, _)| (*layer, *index));
    Document {
        links: links.into_iter().map(|(_, _, spec)| spec).collect(),
    }
}

/// Expresses a port VLAN table in document terms, if it fits (tagged VLANs + one native).
fn port_vlans_from_table(table: &BTreeMap<u16, PortVlanFlags>) -> Option<PortVlans> {
    let mut vids: Vec<VlanRange> = Vec::new();
    let mut pvid = None;
    for (vid, flags) in table {
        if *flags == PortVlanFlags::NATIVE && pvid.is_none() {
            pvid = Some(*vid);
        } else if *flags == PortVlanFlags::TAGGED {
            match vids.last_mut() {
                Some(range) if range.last + 1 == *vid => range.last = *vid,
                _ => vids.push(VlanRange {
                    first: *vid,
                    last: *vid,
                }),
            }
        } else {
            return None;
        }
    }
    Some(PortVlans { vids, pvid })
}
