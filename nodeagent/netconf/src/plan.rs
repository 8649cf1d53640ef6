//! The planner: observed kernel state + document + ownership -> ordered steps.
//!
//! A pure function, so every ordering and ownership rule is unit-tested without netlink.
//! Order: (1) delete what must go, upper layers first; (2) walk the desired links lower
//! layers first (NIC -> bond -> vlan -> bridge); for each, create it or change it in place,
//! then enslave its members (so masters exist before members join), then its state, then
//! addresses, then routes (which need the link up and the gateway's subnet present).
//! Steps name links, not ifindexes: the executor resolves names when it runs, so a plan
//! stays readable and a missing NIC fails at its own step with its own name.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::fmt;

use serde::Serialize;

use crate::addr::{IpCidr, MacAddr};
use crate::document::{
    dependencies, BondMode, Document, LacpRate, LinkKind, LinkSpec, LinkState, PortVlanFlags,
    RouteSpec, XmitHashPolicy, Zone,
};
use crate::model::{
    ObservedBond, ObservedBridge, ObservedKind, ObservedLink, ObservedRoute, ObservedState,
};
use crate::state::Ownership;

/// Bond options that can change on a live bond (mode and lacp_rate re-create it).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize)]
pub struct BondOptions {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub miimon_ms: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub updelay_ms: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub downdelay_ms: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub xmit_hash_policy: Option<XmitHashPolicy>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub min_links: Option<u32>,
    /// Kernel name of the preferred member.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub primary: Option<String>,
}

impl BondOptions {
    pub fn is_empty(&self) -> bool {
        *self == BondOptions::default()
    }
}

impl fmt::Display for BondOptions {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let mut parts = Vec::new();
        if let Some(v) = self.miimon_ms {
            parts.push(format!("miimon {v}ms"));
        }
        if let Some(v) = self.updelay_ms {
            parts.push(format!("updelay {v}ms"));
        }
        if let Some(v) = self.downdelay_ms {
            parts.push(format!("downdelay {v}ms"));
        }
        if let Some(v) = self.xmit_hash_policy {
            parts.push(format!("xmit_hash_policy {v}"));
        }
        if let Some(v) = self.min_links {
            parts.push(format!("min_links {v}"));
        }
        if let Some(v) = &self.primary {
            parts.push(format!("primary {v}"));
        }
        f.write_str(&parts.join(", "))
    }
}

/// What a new link is made of.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum NewLink {
    Bond {
        mode: BondMode,
        #[serde(skip_serializing_if = "Option::is_none")]
        lacp_rate: Option<LacpRate>,
        options: BondOptions,
    },
    Vlan {
        parent: String,
        id: u16,
    },
    Bridge {
        #[serde(skip_serializing_if = "Option::is_none")]
        stp: Option<bool>,
        #[serde(skip_serializing_if = "Option::is_none")]
        vlan_filtering: Option<bool>,
    },
}

/// One VLAN entry to add on a bridge port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct PortVlanEntry {
    pub vid: u16,
    pub pvid: bool,
    pub untagged: bool,
}

/// One change to the kernel. Serialized with an `op` tag.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Step {
    DeleteLink {
        name: String,
        kind: String,
        reason: String,
    },
    CreateLink {
        name: String,
        link: NewLink,
        #[serde(skip_serializing_if = "Option::is_none")]
        mtu: Option<u32>,
        #[serde(skip_serializing_if = "Option::is_none")]
        mac: Option<MacAddr>,
    },
    SetMtu {
        name: String,
        from: u32,
        to: u32,
    },
    /// The link's firewall zone, as its interface group.
    SetZone {
        name: String,
        from: Zone,
        to: Zone,
    },
    /// IPv4 forwarding of what arrives on the link (on for routed links and, while the
    /// document has one, for management links).
    SetForwarding {
        name: String,
        from: bool,
        to: bool,
    },
    SetMac {
        name: String,
        from: Option<MacAddr>,
        to: MacAddr,
    },
    SetBondOptions {
        name: String,
        options: BondOptions,
    },
    SetBridgeOptions {
        name: String,
        #[serde(skip_serializing_if = "Option::is_none")]
        stp: Option<bool>,
        #[serde(skip_serializing_if = "Option::is_none")]
        vlan_filtering: Option<bool>,
    },
    Enslave {
        name: String,
        master: String,
        /// Bonds only take members that are down; the executor downs them first.
        master_is_bond: bool,
        #[serde(skip_serializing_if = "Option::is_none")]
        previous_master: Option<String>,
    },
    Release {
        name: String,
        master: String,
    },
    SetPortVlans {
        port: String,
        bridge: String,
        remove: Vec<u16>,
        add: Vec<PortVlanEntry>,
    },
    SetState {
        name: String,
        up: bool,
    },
    DelRoute {
        link: String,
        route: ObservedRoute,
    },
    DelAddress {
        link: String,
        address: IpCidr,
    },
    AddAddress {
        link: String,
        address: IpCidr,
    },
    AddRoute {
        link: String,
        route: ObservedRoute,
        #[serde(skip_serializing_if = "std::ops::Not::not")]
        onlink: bool,
    },
}

fn on_off(value: bool) -> &'static str {
    if value {
        "on"
    } else {
        "off"
    }
}

fn describe_route(route: &ObservedRoute) -> String {
    let mut text = route.to.to_string();
    if let Some(via) = route.via {
        text.push_str(&format!(" via {via}"));
    }
    text.push_str(&format!(" metric {}", route.metric));
    if route.table != crate::document::MAIN_TABLE {
        text.push_str(&format!(" table {}", route.table));
    }
    text
}

impl fmt::Display for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Step::DeleteLink { name, kind, reason } => {
                write!(f, "- delete {kind} {name} ({reason})")
            }
            Step::CreateLink {
                name,
                link,
                mtu,
                mac,
            } => {
                let mut extra = Vec::new();
                let kind = match link {
                    NewLink::Bond {
                        mode,
                        lacp_rate,
                        options,
                    } => {
                        extra.push(format!("mode {mode}"));
                        if let Some(rate) = lacp_rate {
                            extra.push(format!("lacp_rate {rate}"));
                        }
                        if !options.is_empty() {
                            extra.push(options.to_string());
                        }
                        "bond"
                    }
                    NewLink::Vlan { parent, id } => {
                        extra.push(format!("id {id} on {parent}"));
                        "vlan"
                    }
                    NewLink::Bridge {
                        stp,
                        vlan_filtering,
                    } => {
                        if let Some(stp) = stp {
                            extra.push(format!("stp {}", on_off(*stp)));
                        }
                        if let Some(vf) = vlan_filtering {
                            extra.push(format!("vlan_filtering {}", on_off(*vf)));
                        }
                        "bridge"
                    }
                };
                if let Some(mtu) = mtu {
                    extra.push(format!("mtu {mtu}"));
                }
                if let Some(mac) = mac {
                    extra.push(format!("mac {mac}"));
                }
                write!(f, "+ create {kind} {name}")?;
                if !extra.is_empty() {
                    write!(f, " ({})", extra.join(", "))?;
                }
                Ok(())
            }
            Step::SetMtu { name, from: 0, to } => write!(f, "~ {name}: mtu {to}"),
            Step::SetMtu { name, from, to } => write!(f, "~ {name}: mtu {from} -> {to}"),
            Step::SetZone { name, from, to } => write!(f, "~ {name}: zone {from} -> {to}"),
            Step::SetForwarding { name, from, to } => {
                let word = |on: &bool| if *on { "on" } else { "off" };
                write!(
                    f,
                    "~ {name}: IPv4 forwarding {} -> {}",
                    word(from),
                    word(to)
                )
            }
            Step::SetMac { name, from, to } => match from {
                Some(from) => write!(f, "~ {name}: mac {from} -> {to}"),
                None => write!(f, "~ {name}: mac -> {to}"),
            },
            Step::SetBondOptions { name, options } => write!(f, "~ {name}: bond {options}"),
            Step::SetBridgeOptions {
                name,
                stp,
                vlan_filtering,
            } => {
                let mut parts = Vec::new();
                if let Some(stp) = stp {
                    parts.push(format!("stp {}", on_off(*stp)));
                }
                if let Some(vf) = vlan_filtering {
                    parts.push(format!("vlan_filtering {}", on_off(*vf)));
                }
                write!(f, "~ {name}: bridge {}", parts.join(", "))
            }
            Step::Enslave {
                name,
                master,
                previous_master,
                ..
            } => match previous_master {
                Some(previous) => write!(f, "~ {name}: move from {previous} to {master}"),
                None => write!(f, "~ {name}: enslave to {master}"),
            },
            Step::Release { name, master } => {
                write!(f, "~ {name}: release from {master} (not listed there)")
            }
            Step::SetPortVlans {
                port,
                bridge,
                remove,
                add,
            } => {
                let mut parts: Vec<String> = remove.iter().map(|v| format!("-{v}")).collect();
                for entry in add {
                    let mut text = format!("+{}", entry.vid);
                    if entry.pvid {
                        text.push_str(" pvid");
                    }
                    if entry.untagged {
                        text.push_str(" untagged");
                    }
                    parts.push(text);
                }
                write!(f, "~ {port}: vlans on {bridge}: {}", parts.join(", "))
            }
            Step::SetState { name, up } => {
                write!(f, "~ {name}: {}", if *up { "up" } else { "down" })
            }
            Step::DelRoute { link, route } => {
                write!(f, "- {link}: route {}", describe_route(route))
            }
            Step::DelAddress { link, address } => write!(f, "- {link}: address {address}"),
            Step::AddAddress { link, address } => write!(f, "+ {link}: address {address}"),
            Step::AddRoute {
                link,
                route,
                onlink,
            } => {
                write!(f, "+ {link}: route {}", describe_route(route))?;
                if *onlink {
                    f.write_str(" onlink")?;
                }
                Ok(())
            }
        }
    }
}

/// Ordered changes that bring the kernel to the document.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize)]
pub struct Plan {
    pub steps: Vec<Step>,
    /// Things worth knowing that are not changes (skipped deletions, missing NICs...).
    pub notes: Vec<String>,
}

impl Plan {
    pub fn is_empty(&self) -> bool {
        self.steps.is_empty()
    }

    pub fn to_json_pretty(&self) -> String {
        serde_json::to_string_pretty(self).unwrap_or_else(|e| format!("{{\"error\": \"{e}\"}}"))
    }
}

impl fmt::Display for Plan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.steps.is_empty() {
            writeln!(f, "no changes: the kernel matches the document")?;
        } else {
            for (i, step) in self.steps.iter().enumerate() {
                writeln!(f, "{:>3}. {step}", i + 1)?;
            }
        }
        for note in &self.notes {
            writeln!(f, "note: {note}")?;
        }
        Ok(())
    }
}

/// Why no plan can reach the document without breaking the ownership rules.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the document cannot be applied:\n  {}", .conflicts.join("\n  "))]
pub struct PlanError {
    pub conflicts: Vec<String>,
}

enum Fate {
    Create,
    Recreate(String),
    Update,
    /// A physical link that is not there; steps touching it will fail at apply time.
    Missing,
}

/// Computes the steps that turn `observed` into `doc`, touching only what `ownership` and the
/// document allow. `doc` must be valid (see [`Document::validate`]).
pub fn compute_plan(
    doc: &Document,
    observed: &ObservedState,
    ownership: &Ownership,
) -> Result<Plan, PlanError> {
    let mut plan = Plan::default();
    let mut conflicts = Vec::new();
    let desired: Vec<&LinkSpec> = doc
        .links
        .iter()
        .filter(|l| l.state != LinkState::Absent)
        .collect();

    // Document name -> kernel name (they differ only for NICs matched by MAC).
    let mut kernel_name: HashMap<&str, String> = HashMap::new();
    for spec in &doc.links {
        let name = match (spec.kind, spec.mac) {
            (LinkKind::Physical, Some(mac)) => {
                let matches: Vec<&ObservedLink> = observed
                    .links
                    .values()
                    .filter(|l| {
                        l.kind.link_kind() == Some(LinkKind::Physical)
                            && l.identity_mac() == Some(mac)
                    })
                    .collect();
                match matches.as_slice() {
                    [one] => one.name.clone(),
                    [] => {
                        plan.notes.push(format!(
                            "no physical link has MAC {mac} (document name {:?})",
                            spec.name
                        ));
                        spec.name.clone()
                    }
                    many => {
                        let names: Vec<&str> = many.iter().map(|l| l.name.as_str()).collect();
                        conflicts.push(format!(
                            "{:?}: MAC {mac} matches several links: {}",
                            spec.name,
                            names.join(", ")
                        ));
                        spec.name.clone()
                    }
                }
            }
            _ => spec.name.clone(),
        };
        kernel_name.insert(spec.name.as_str(), name);
    }
    let kname = |doc_name: &str| -> String {
        kernel_name
            .get(doc_name)
            .cloned()
            .unwrap_or_else(|| doc_name.to_string())
    };

    for spec in &doc.links {
        if ownership.taps.contains_key(&kname(&spec.name)) {
            conflicts.push(format!(
                "{:?} is a VM TAP created by create_tap; it cannot be part of the document",
                spec.name
            ));
        }
    }

    // Decide the fate of every desired link.
    let mut fates: HashMap<String, Fate> = HashMap::new();
    for spec in &desired {
        let name = kname(&spec.name);
        let fate = match (observed.get(&name), spec.kind) {
            (None, LinkKind::Physical) => {
                plan.notes.push(format!(
                    "physical link {name} does not exist; steps that need it will fail"
                ));
                Fate::Missing
            }
            (None, _) => Fate::Create,
            (Some(link), LinkKind::Physical) => {
                if link.kind.link_kind() != Some(LinkKind::Physical) {
                    conflicts.push(format!(
                        "{name} is a {} in the kernel, not a physical link",
                        link.kind.describe()
                    ));
                }
                Fate::Update
            }
            (Some(link), _) => match incompatibility(spec, link, &kname) {
                None => Fate::Update,
                Some(reason) if ownership.owns(link) => Fate::Recreate(reason),
                Some(reason) => {
                    conflicts.push(format!(
                        "{name} exists but was not created by thvc-netconf and cannot be changed \
                         in place ({reason}); remove or rename it by hand"
                    ));
                    Fate::Update
                }
            },
        };
        fates.insert(name, fate);
    }

    // Links to delete: re-created ones, and ours that the document no longer wants.
    let desired_names: HashSet<String> = desired.iter().map(|s| kname(&s.name)).collect();
    let mut doomed: BTreeMap<String, String> = fates
        .iter()
        .filter_map(|(name, fate)| match fate {
            Fate::Recreate(reason) => Some((name.clone(), format!("re-create: {reason}"))),
            _ => None,
        })
        .collect();
    let absent: HashSet<&str> = doc
        .links
        .iter()
        .filter(|l| l.state == LinkState::Absent)
        .map(|l| l.name.as_str())
        .collect();
    for link in observed.links.values() {
        if desired_names.contains(&link.name) {
            continue;
        }
        let marked_absent = absent.contains(link.name.as_str());
        if ownership.owns(link) {
            let reason = if marked_absent {
                "absent in the document"
            } else {
                "no longer in the document"
            };
            doomed.insert(link.name.clone(), reason.to_string());
        } else if marked_absent {
            plan.notes.push(format!(
                "{} is marked absent but was not created by thvc-netconf; left alone",
                link.name
            ));
        }
    }
    // The kernel deletes VLANs together with their parent: account for them.
    loop {
        let mut changed = false;
        let uppers: Vec<(String, String)> = observed
            .links
            .values()
            .filter_map(|l| match &l.kind {
                ObservedKind::Vlan {
                    parent: Some(parent),
                    ..
                } if doomed.contains_key(parent) && !doomed.contains_key(&l.name) => {
                    Some((l.name.clone(), parent.clone()))
                }
                _ => None,
            })
            .collect();
        for (upper, parent) in uppers {
            let upper_link = observed.get(&upper);
            let owned = upper_link.is_some_and(|l| ownership.owns(l));
            let wanted = desired_names.contains(&upper);
            let parent_recreated = matches!(fates.get(&parent), Some(Fate::Recreate(_)));
            if owned {
                if wanted {
                    fates.insert(
                        upper.clone(),
                        Fate::Recreate(format!("its parent {parent} is re-created")),
                    );
                }
                doomed.insert(upper, format!("its parent {parent} goes away"));
                changed = true;
            } else if parent_recreated {
                conflicts.push(format!(
                    "re-creating {parent} would destroy {upper}, which thvc-netconf did not create"
                ));
            } else {
                plan.notes.push(format!(
                    "kept {parent}: deleting it would destroy {upper}, which thvc-netconf did not create"
                ));
                doomed.remove(&parent);
                changed = true;
                break;
            }
        }
        if !changed {
            break;
        }
    }
    if !conflicts.is_empty() {
        let mut seen = HashSet::new();
        conflicts.retain(|c| seen.insert(c.clone()));
        return Err(PlanError { conflicts });
    }

    // The state we expect once each planned step has run.
    let mut view = observed.clone();
    let mut doomed_order: Vec<(&String, &String)> = doomed.iter().collect();
    doomed_order.sort_by_key(|(name, _)| std::cmp::Reverse(depth(observed, name)));
    for (name, reason) in doomed_order {
        let kind = observed
            .get(name)
            .map(|l| l.kind.describe())
            .unwrap_or_else(|| "link".into());
        plan.steps.push(Step::DeleteLink {
            name: name.clone(),
            kind,
            reason: reason.clone(),
        });
        view.links.remove(name);
    }
    for link in view.links.values_mut() {
        if link.master.as_ref().is_some_and(|m| doomed.contains_key(m)) {
            link.master = None;
            link.port_vlans = None;
        }
    }

    // Masters of links (by kernel name) according to the document.
    let mut desired_master: HashMap<String, String> = HashMap::new();
    for spec in &desired {
        for member in spec.enslaved() {
            desired_master.insert(kname(member), kname(&spec.name));
        }
    }

    // The node routes only while the document has a routed link (Zone::Routed).
    let routing = desired.iter().any(|s| s.zone == Zone::Routed);

    for spec in topological_order(&desired) {
        let name = kname(&spec.name);
        let fate = fates.get(&name).unwrap_or(&Fate::Update);
        match fate {
            Fate::Missing => {}
            Fate::Create | Fate::Recreate(_) => {
                plan.steps.push(create_step(spec, &name, &kname));
                let kind = match spec.kind {
                    LinkKind::Bond => ObservedKind::Bond(ObservedBond {
                        mode: spec.bond.as_ref().map(|b| b.mode),
                        ..ObservedBond::default()
                    }),
                    LinkKind::Bridge => ObservedKind::Bridge(ObservedBridge {
                        stp: spec.bridge.as_ref().and_then(|b| b.stp).unwrap_or(false),
                        vlan_filtering: spec
                            .bridge
                            .as_ref()
                            .and_then(|b| b.vlan_filtering)
                            .unwrap_or(false),
                        default_pvid: 1,
                    }),
                    _ => ObservedKind::Other { kind: None },
                };
                let mut link = ObservedLink::new(0, &name, kind);
                link.mtu = match spec.kind {
                    // Unknown until set after the ports joined (see below): 0 forces the step.
                    LinkKind::Bridge => 0,
                    _ => spec.mtu.unwrap_or(link.mtu),
                };
                link.mac = spec.mac;
                view.insert(link);
            }
            Fate::Update => {
                if let Some(link) = view.links.get_mut(&name) {
                    update_in_place(spec, link, &mut plan.steps);
                }
            }
        }
        if !matches!(fate, Fate::Missing) {
            plan_members(
                spec,
                &name,
                &kname,
                &desired_master,
                ownership,
                &mut view,
                &mut plan.steps,
            );
            plan_bond_primary(spec, &name, &kname, &view, &mut plan.steps);
            // A bridge follows its smallest port's MTU until one is set explicitly (which
            // makes it stick), so a bridge's MTU is set once its ports have joined.
            if let (LinkKind::Bridge, Some(mtu), Some(link)) =
                (spec.kind, spec.mtu, view.links.get_mut(&name))
            {
                if link.mtu != mtu {
                    plan.steps.push(Step::SetMtu {
                        name: name.clone(),
                        from: link.mtu,
                        to: mtu,
                    });
                    link.mtu = mtu;
                }
            }
            plan_port_vlans(spec, &name, &kname, ownership, &view, &mut plan.steps);
        }
        let Some(link) = view.links.get_mut(&name) else {
            continue;
        };
        // The zone before the link comes up or gets addresses: a link never answers on a
        // port its zone closes.
        if link.group != spec.zone.group() {
            plan.steps.push(Step::SetZone {
                name: name.clone(),
                from: Zone::from_group(link.group),
                to: spec.zone,
            });
            link.group = spec.zone.group();
        }
        let forward = match spec.zone {
            Zone::Routed => true,
            Zone::Management => routing,
            Zone::Isolated => false,
        };
        if link.forwarding != forward {
            plan.steps.push(Step::SetForwarding {
                name: name.clone(),
                from: link.forwarding,
                to: forward,
            });
            link.forwarding = forward;
        }
        let want_up = spec.state == LinkState::Up;
        let joins_bond = desired_master.get(&name).is_some_and(|master| {
            link.master.as_ref() != Some(master)
                && desired
                    .iter()
                    .any(|s| kname(&s.name) == *master && s.kind == LinkKind::Bond)
        });
        if joins_bond {
            // Enslaving downs it and the bond brings it back up: no flap.
            link.up = want_up;
        } else if link.up != want_up {
            plan.steps.push(Step::SetState {
                name: name.clone(),
                up: want_up,
            });
            link.up = want_up;
        }
        plan_addresses_and_routes(spec, link, &mut plan.steps);
    }
    Ok(plan)
}

/// Why an existing link cannot be turned into `spec` without re-creating it.
fn incompatibility(
    spec: &LinkSpec,
    link: &ObservedLink,
    kname: &dyn Fn(&str) -> String,
) -> Option<String> {
    let Some(kind) = link.kind.link_kind() else {
        return Some(format!(
            "it is a {}, wanted {}",
            link.kind.describe(),
            spec.kind
        ));
    };
    if kind != spec.kind {
        return Some(format!("kind {} -> {}", link.kind.describe(), spec.kind));
    }
    match (&link.kind, spec) {
        (
            ObservedKind::Vlan { parent, id },
            LinkSpec {
                vlan: Some(vlan), ..
            },
        ) => {
            if *id != vlan.id {
                return Some(format!("VLAN id {id} -> {}", vlan.id));
            }
            let want_parent = kname(&vlan.parent);
            if parent.as_deref() != Some(want_parent.as_str()) {
                return Some(format!(
                    "VLAN parent {} -> {want_parent}",
                    parent.as_deref().unwrap_or("?")
                ));
            }
        }
        (
            ObservedKind::Bond(bond),
            LinkSpec {
                bond: Some(wanted), ..
            },
        ) => {
            if bond.mode != Some(wanted.mode) {
                let current = bond.mode.map(|m| m.to_string());
                return Some(format!(
                    "bond mode {} -> {}",
                    current.as_deref().unwrap_or("unknown"),
                    wanted.mode
                ));
            }
            if let Some(rate) = wanted.lacp_rate {
                if bond.lacp_rate != Some(rate) {
                    return Some(format!("lacp_rate -> {rate} (only settable while down)"));
                }
            }
        }
        _ => {}
    }
    None
}

fn create_step(spec: &LinkSpec, name: &str, kname: &dyn Fn(&str) -> String) -> Step {
    let link = match (spec.kind, &spec.bond, &spec.vlan, &spec.bridge) {
        (LinkKind::Bond, Some(bond), _, _) => NewLink::Bond {
            mode: bond.mode,
            lacp_rate: bond.lacp_rate,
            options: BondOptions {
                miimon_ms: bond.miimon_ms,
                updelay_ms: bond.updelay_ms,
                downdelay_ms: bond.downdelay_ms,
                xmit_hash_policy: bond.xmit_hash_policy,
                min_links: bond.min_links,
                // Set after the members joined: the kernel wants an enslaved link.
                primary: None,
            },
        },
        (LinkKind::Vlan, _, Some(vlan), _) => NewLink::Vlan {
            parent: kname(&vlan.parent),
            id: vlan.id,
        },
        (_, _, _, bridge) => NewLink::Bridge {
            stp: bridge.as_ref().and_then(|b| b.stp),
            vlan_filtering: bridge.as_ref().and_then(|b| b.vlan_filtering),
        },
    };
    Step::CreateLink {
        name: name.to_string(),
        link,
        mtu: if spec.kind == LinkKind::Bridge {
            None
        } else {
            spec.mtu
        },
        mac: if spec.kind == LinkKind::Physical {
            None
        } else {
            spec.mac
        },
    }
}

fn update_in_place(spec: &LinkSpec, link: &mut ObservedLink, steps: &mut Vec<Step>) {
    if let (Some(mtu), false) = (spec.mtu, spec.kind == LinkKind::Bridge) {
        if mtu != link.mtu {
            steps.push(Step::SetMtu {
                name: link.name.clone(),
                from: link.mtu,
                to: mtu,
            });
            link.mtu = mtu;
        }
    }
    if let (Some(mac), false) = (spec.mac, spec.kind == LinkKind::Physical) {
        if link.mac != Some(mac) {
            steps.push(Step::SetMac {
                name: link.name.clone(),
                from: link.mac,
                to: mac,
            });
            link.mac = Some(mac);
        }
    }
    match (&mut link.kind, &spec.bond, &spec.bridge) {
        (ObservedKind::Bond(current), Some(wanted), _) => {
            let mut options = BondOptions::default();
            fn differs<T: PartialEq + Copy>(
                wanted: Option<T>,
                current: &mut Option<T>,
            ) -> Option<T> {
                match wanted {
                    Some(w) if *current != Some(w) => {
                        *current = Some(w);
                        Some(w)
                    }
                    _ => None,
                }
            }
            options.miimon_ms = differs(wanted.miimon_ms, &mut current.miimon_ms);
            options.updelay_ms = differs(wanted.updelay_ms, &mut current.updelay_ms);
            options.downdelay_ms = differs(wanted.downdelay_ms, &mut current.downdelay_ms);
            options.xmit_hash_policy =
                differs(wanted.xmit_hash_policy, &mut current.xmit_hash_policy);
            options.min_links = differs(wanted.min_links, &mut current.min_links);
            if !options.is_empty() {
                steps.push(Step::SetBondOptions {
                    name: link.name.clone(),
                    options,
                });
            }
        }
        (ObservedKind::Bridge(current), _, Some(wanted)) => {
            let stp = wanted.stp.filter(|s| *s != current.stp);
            let vlan_filtering = wanted
                .vlan_filtering
                .filter(|v| *v != current.vlan_filtering);
            if stp.is_some() || vlan_filtering.is_some() {
                steps.push(Step::SetBridgeOptions {
                    name: link.name.clone(),
                    stp,
                    vlan_filtering,
                });
                current.stp = stp.unwrap_or(current.stp);
                current.vlan_filtering = vlan_filtering.unwrap_or(current.vlan_filtering);
            }
        }
        _ => {}
    }
}

#[allow(clippy::too_many_arguments)]
fn plan_members(
    spec: &LinkSpec,
    name: &str,
    kname: &dyn Fn(&str) -> String,
    desired_master: &HashMap<String, String>,
    ownership: &Ownership,
    view: &mut ObservedState,
    steps: &mut Vec<Step>,
) {
    let master_is_bond = spec.kind == LinkKind::Bond;
    let (default_pvid, master_mtu) = match view.get(name) {
        Some(ObservedLink {
            kind: ObservedKind::Bridge(bridge),
            mtu,
            ..
        }) => (bridge.default_pvid, *mtu),
        Some(link) => (0, link.mtu),
        None => (0, 0),
    };
    let mut wanted: Vec<String> = spec.enslaved().into_iter().map(kname).collect();
    if spec.kind == LinkKind::Bridge {
        // TAPs recorded for this bridge are re-attached (after a re-create, or if unplugged).
        for (tap, record) in &ownership.taps {
            if record.bridge.as_deref() == Some(name)
                && view.get(tap).is_some_and(|l| ownership.owns_tap(l))
            {
                wanted.push(tap.clone());
            }
        }
    }
    for member in &wanted {
        let current = view.get(member).and_then(|l| l.master.clone());
        if current.as_deref() == Some(name) {
            continue;
        }
        steps.push(Step::Enslave {
            name: member.clone(),
            master: name.to_string(),
            master_is_bond,
            previous_master: current,
        });
        if let Some(link) = view.links.get_mut(member) {
            link.master = Some(name.to_string());
            if master_is_bond {
                // The bond opens its members and gives them its MTU.
                link.up = true;
                link.mtu = master_mtu;
                link.port_vlans = None;
            } else {
                // A new bridge port starts with the bridge's default PVID.
                link.port_vlans = Some(if default_pvid == 0 {
                    BTreeMap::new()
                } else {
                    BTreeMap::from([(default_pvid, PortVlanFlags::NATIVE)])
                });
            }
        }
    }
    let extras: Vec<String> = view
        .links
        .values()
        .filter(|l| l.master.as_deref() == Some(name) && !wanted.contains(&l.name))
        // VM ports belong to the VM lifecycle, and links moving to another master of the
        // document are moved there directly.
        .filter(|l| !matches!(l.kind, ObservedKind::Tun { .. }))
        .filter(|l| !desired_master.contains_key(&l.name))
        .map(|l| l.name.clone())
        .collect();
    for extra in extras {
        steps.push(Step::Release {
            name: extra.clone(),
            master: name.to_string(),
        });
        if let Some(link) = view.links.get_mut(&extra) {
            link.master = None;
            link.port_vlans = None;
        }
    }
}

fn plan_bond_primary(
    spec: &LinkSpec,
    name: &str,
    kname: &dyn Fn(&str) -> String,
    view: &ObservedState,
    steps: &mut Vec<Step>,
) {
    let Some(primary) = spec.bond.as_ref().and_then(|b| b.primary.as_deref()) else {
        return;
    };
    let primary = kname(primary);
    let current = match view.get(name).map(|l| &l.kind) {
        Some(ObservedKind::Bond(bond)) => bond.primary.clone(),
        _ => None,
    };
    if current.as_deref() != Some(primary.as_str()) {
        steps.push(Step::SetBondOptions {
            name: name.to_string(),
            options: BondOptions {
                primary: Some(primary),
                ..BondOptions::default()
            },
        });
    }
}

fn plan_port_vlans(
    spec: &LinkSpec,
    name: &str,
    kname: &dyn Fn(&str) -> String,
    ownership: &Ownership,
    view: &ObservedState,
    steps: &mut Vec<Step>,
) {
    let Some(bridge) = spec
        .bridge
        .as_ref()
        .filter(|b| b.vlan_filtering == Some(true))
    else {
        return;
    };
    let mut tables: Vec<(String, BTreeMap<u16, PortVlanFlags>)> = bridge
        .port_vlans
        .iter()
        .map(|(port, vlans)| (kname(port), vlans.table()))
        .collect();
    for (tap, record) in &ownership.taps {
        if let (Some(vlan), Some(b)) = (record.vlan, record.bridge.as_deref()) {
            if b == name && view.get(tap).is_some() {
                tables.push((tap.clone(), BTreeMap::from([(vlan, PortVlanFlags::NATIVE)])));
            }
        }
    }
    for (port, desired) in tables {
        let current = view
            .get(&port)
            .and_then(|l| l.port_vlans.clone())
            .unwrap_or_default();
        let (remove, add) = diff_port_vlans(&current, &desired);
        if !remove.is_empty() || !add.is_empty() {
            steps.push(Step::SetPortVlans {
                port,
                bridge: name.to_string(),
                remove,
                add,
            });
        }
    }
}

/// VLANs to remove and entries to (re-)add so that `current` becomes `desired`.
pub fn diff_port_vlans(
    current: &BTreeMap<u16, PortVlanFlags>,
    desired: &BTreeMap<u16, PortVlanFlags>,
) -> (Vec<u16>, Vec<PortVlanEntry>) {
    let remove = current
        .keys()
        .filter(|vid| !desired.contains_key(vid))
        .copied()
        .collect();
    let add = desired
        .iter()
        .filter(|(vid, flags)| current.get(vid) != Some(flags))
        .map(|(vid, flags)| PortVlanEntry {
            vid: *vid,
            pvid: flags.pvid,
            untagged: flags.untagged,
        })
        .collect();
    (remove, add)
}

fn plan_addresses_and_routes(spec: &LinkSpec, link: &mut ObservedLink, steps: &mut Vec<Step>) {
    let desired_routes: Option<Vec<(ObservedRoute, bool)>> = spec.managed_routes().map(|routes| {
        routes
            .iter()
            .map(|r: &RouteSpec| (ObservedRoute::from_spec(r), r.onlink))
            .collect()
    });
    if let Some(desired) = &desired_routes {
        let keep: BTreeSet<ObservedRoute> = desired.iter().map(|(r, _)| *r).collect();
        for route in link.routes.iter().filter(|r| !keep.contains(r)) {
            steps.push(Step::DelRoute {
                link: link.name.clone(),
                route: *route,
            });
        }
    }
    if let Some(desired) = spec.managed_addresses() {
        for address in link.addresses.iter().filter(|a| !desired.contains(a)) {
            steps.push(Step::DelAddress {
                link: link.name.clone(),
                address: *address,
            });
        }
        for address in desired.iter().filter(|a| !link.addresses.contains(a)) {
            steps.push(Step::AddAddress {
                link: link.name.clone(),
                address: *address,
            });
        }
        link.addresses = desired;
    }
    if let Some(desired) = desired_routes {
        for (route, onlink) in &desired {
            if !link.routes.contains(route) {
                steps.push(Step::AddRoute {
                    link: link.name.clone(),
                    route: *route,
                    onlink: *onlink,
                });
            }
        }
        link.routes = desired.into_iter().map(|(r, _)| r).collect();
    }
}

/// VLAN nesting depth, so uppers are deleted before their lower links.
fn depth(observed: &ObservedState, name: &str) -> usize {
    let mut depth = 0;
    let mut current = name.to_string();
    while let Some(ObservedKind::Vlan {
        parent: Some(parent),
        ..
    }) = observed.get(&current).map(|l| &l.kind)
    {
        depth += 1;
        if depth > observed.links.len() {
            break;
        }
        current = parent.clone();
    }
    depth
}

/// Lower layers first (members and parents before the links built on them), otherwise in
/// document order. The document is acyclic (validated).
fn topological_order<'a>(desired: &[&'a LinkSpec]) -> Vec<&'a LinkSpec> {
    let by_name: HashMap<&str, &'a LinkSpec> =
        desired.iter().map(|l| (l.name.as_str(), *l)).collect();
    let mut done: HashSet<&str> = HashSet::new();
    let mut order = Vec::new();
    fn visit<'a>(
        link: &'a LinkSpec,
        by_name: &HashMap<&str, &'a LinkSpec>,
        done: &mut HashSet<&'a str>,
        order: &mut Vec<&'a LinkSpec>,
        guard: usize,
    ) {
        if guard == 0 || !done.insert(link.name.as_str()) {
            return;
        }
        for dep in dependencies(link) {
            if let Some(dep) = by_name.get(dep) {
                visit(dep, by_name, done, order, guard - 1);
            }
        }
        order.push(link);
    }
    for link in desired {
        visit(link, &by_name, &mut done, &mut order, desired.len() + 1);
    }
    order
}

#[cfg(test)]
mod tests;
