//! Planner tests on modeled kernel states. `simulate` plays a plan onto a model the way the
//! kernel would, so "apply, then plan again" can be checked to be empty (idempotence).

use super::*;
use crate::document::parse_document;
use crate::state::{OwnedLink, OwnedTap};

const EXAMPLE: &str = r#"{ "links": [
  {"name": "eth0", "kind": "physical", "mtu": 9000},
  {"name": "eth1", "kind": "physical", "mtu": 9000},
  {"name": "bond0", "kind": "bond", "mtu": 9000, "bond": {"mode": "802.3ad", "members": ["eth0", "eth1"], "miimon_ms": 100}},
  {"name": "bond0.100", "kind": "vlan", "vlan": {"parent": "bond0", "id": 100}},
  {"name": "br100", "kind": "bridge", "bridge": {"ports": ["bond0.100"], "stp": false},
   "addresses": ["10.100.0.5/24", "fd00:100::5/64"],
   "routes": [{"to": "0.0.0.0/0", "via": "10.100.0.1", "metric": 100}]},
  {"name": "old-br", "kind": "bridge", "state": "absent"} ] }"#;

fn nic(index: u32, name: &str) -> ObservedLink {
    let mut link = ObservedLink::new(index, name, ObservedKind::Other { kind: None });
    link.perm_mac = Some(MacAddr([0x52, 0x54, 0, 0, 0, index as u8]));
    link.mac = link.perm_mac;
    link
}

fn kernel_with_nics() -> ObservedState {
    let mut state = ObservedState::default();
    state.insert(ObservedLink::new(1, "lo", ObservedKind::Loopback));
    state.insert(nic(2, "eth0"));
    state.insert(nic(3, "eth1"));
    state
}

/// Plays `plan` onto `state` as the kernel would; new links get fresh ifindexes and, when
/// `ownership` is given, are recorded as ours (like the executor does).
fn simulate(
    state: &ObservedState,
    plan: &Plan,
    mut ownership: Option<&mut Ownership>,
) -> ObservedState {
    let mut state = state.clone();
    let mut next_index = state.links.values().map(|l| l.index).max().unwrap_or(0) + 1;
    for step in &plan.steps {
        match step {
            Step::DeleteLink { name, .. } => {
                state.links.remove(name);
                let uppers: Vec<String> = state
                    .links
                    .values()
                    .filter(|l| matches!(&l.kind, ObservedKind::Vlan { parent: Some(p), .. } if p == name))
                    .map(|l| l.name.clone())
                    .collect();
                assert!(
                    uppers.is_empty(),
                    "{name} deleted before its VLANs {uppers:?}"
                );
                for link in state.links.values_mut() {
                    if link.master.as_ref() == Some(name) {
                        link.master = None;
                        link.port_vlans = None;
                    }
                }
                if let Some(o) = ownership.as_deref_mut() {
                    o.links.remove(name);
                }
            }
            Step::CreateLink {
                name,
                link,
                mtu,
                mac,
            } => {
                assert!(state.get(name).is_none(), "{name} created twice");
                let kind = match link {
                    NewLink::Bond {
                        mode,
                        lacp_rate,
                        options,
                    } => ObservedKind::Bond(ObservedBond {
                        mode: Some(*mode),
                        lacp_rate: *lacp_rate,
                        miimon_ms: options.miimon_ms,
                        updelay_ms: options.updelay_ms,
                        downdelay_ms: options.downdelay_ms,
                        xmit_hash_policy: options.xmit_hash_policy,
                        min_links: options.min_links,
                        primary: None,
                    }),
                    NewLink::Vlan { parent, id } => {
                        assert!(
                            state.get(parent).is_some(),
                            "vlan {name} created before parent {parent}"
                        );
                        ObservedKind::Vlan {
                            parent: Some(parent.clone()),
                            id: *id,
                        }
                    }
                    NewLink::Bridge {
                        stp,
                        vlan_filtering,
                    } => ObservedKind::Bridge(ObservedBridge {
                        stp: stp.unwrap_or(false),
                        vlan_filtering: vlan_filtering.unwrap_or(false),
                        default_pvid: 1,
                    }),
                };
                let mut new = ObservedLink::new(next_index, name, kind);
                new.mtu = mtu.unwrap_or(1500);
                new.mac = *mac;
                state.insert(new);
                if let Some(o) = ownership.as_deref_mut() {
                    let kind = state.get(name).and_then(|l| l.kind.link_kind()).unwrap();
                    o.links.insert(
                        name.clone(),
                        OwnedLink {
                            kind,
                            ifindex: Some(next_index),
                        },
                    );
                }
                next_index += 1;
            }
            Step::SetMtu { name, to, .. } => state.links.get_mut(name).unwrap().mtu = *to,
            Step::SetZone { name, to, .. } => state.links.get_mut(name).unwrap().group = to.group(),
            Step::SetForwarding { name, to, .. } => {
                state.links.get_mut(name).unwrap().forwarding = *to
            }
            Step::SetMac { name, to, .. } => state.links.get_mut(name).unwrap().mac = Some(*to),
            Step::SetBondOptions { name, options } => {
                let Some(ObservedKind::Bond(bond)) = state.links.get_mut(name).map(|l| &mut l.kind)
                else {
                    panic!("{name} is not a bond")
                };
                bond.miimon_ms = options.miimon_ms.or(bond.miimon_ms);
                bond.updelay_ms = options.updelay_ms.or(bond.updelay_ms);
                bond.downdelay_ms = options.downdelay_ms.or(bond.downdelay_ms);
                bond.xmit_hash_policy = options.xmit_hash_policy.or(bond.xmit_hash_policy);
                bond.min_links = options.min_links.or(bond.min_links);
                bond.primary = options.primary.clone().or(bond.primary.clone());
            }
            Step::SetBridgeOptions {
                name,
                stp,
                vlan_filtering,
            } => {
                let Some(ObservedKind::Bridge(bridge)) =
                    state.links.get_mut(name).map(|l| &mut l.kind)
                else {
                    panic!("{name} is not a bridge")
                };
                bridge.stp = stp.unwrap_or(bridge.stp);
                bridge.vlan_filtering = vlan_filtering.unwrap_or(bridge.vlan_filtering);
            }
            Step::Enslave {
                name,
                master,
                master_is_bond,
                ..
            } => {
                let master_link = state
                    .get(master)
                    .unwrap_or_else(|| panic!("{name} enslaved to missing {master}"))
                    .clone();
                let link = state
                    .links
                    .get_mut(name)
                    .unwrap_or_else(|| panic!("missing member {name}"));
                link.master = Some(master.clone());
                if *master_is_bond {
                    link.up = true;
                    link.mtu = master_link.mtu;
                    link.port_vlans = None;
                } else {
                    link.port_vlans = Some(BTreeMap::from([(1, PortVlanFlags::NATIVE)]));
                }
            }
            Step::Release { name, .. } => {
                let link = state.links.get_mut(name).unwrap();
                link.master = None;
                link.port_vlans = None;
            }
            Step::SetPortVlans {
                port, remove, add, ..
            } => {
                let table = state
                    .links
                    .get_mut(port)
                    .unwrap()
                    .port_vlans
                    .get_or_insert_with(BTreeMap::new);
                for vid in remove {
                    table.remove(vid);
                }
                for entry in add {
                    table.insert(
                        entry.vid,
                        PortVlanFlags {
                            pvid: entry.pvid,
                            untagged: entry.untagged,
                        },
                    );
                }
            }
            Step::SetState { name, up } => state.links.get_mut(name).unwrap().up = *up,
            Step::DelRoute { link, route } => state
                .links
                .get_mut(link)
                .unwrap()
                .routes
                .retain(|r| r != route),
            Step::DelAddress { link, address } => state
                .links
                .get_mut(link)
                .unwrap()
                .addresses
                .retain(|a| a != address),
            Step::AddAddress { link, address } => {
                state.links.get_mut(link).unwrap().addresses.push(*address)
            }
            Step::AddRoute { link, route, .. } => {
                let link = state.links.get_mut(link).unwrap();
                assert!(link.up, "route added on {} while down", link.name);
                link.routes.push(*route)
            }
        }
    }
    state
}

fn lines(plan: &Plan) -> Vec<String> {
    plan.steps.iter().map(|s| s.to_string()).collect()
}

#[test]
fn example_from_bare_nics_is_ordered_masters_before_members() {
    let doc = parse_document(EXAMPLE).unwrap();
    let plan = compute_plan(&doc, &kernel_with_nics(), &Ownership::default()).unwrap();
    assert_eq!(
        lines(&plan),
        vec![
            "~ eth0: mtu 1500 -> 9000",
            "~ eth1: mtu 1500 -> 9000",
            "+ create bond bond0 (mode 802.3ad, miimon 100ms, mtu 9000)",
            "~ eth0: enslave to bond0",
            "~ eth1: enslave to bond0",
            "~ bond0: up",
            "+ create vlan bond0.100 (id 100 on bond0)",
            "~ bond0.100: up",
            "+ create bridge br100 (stp off)",
            "~ bond0.100: enslave to br100",
            "~ br100: up",
            "+ br100: address 10.100.0.5/24",
            "+ br100: address fd00:100::5/64",
            "+ br100: route 0.0.0.0/0 via 10.100.0.1 metric 100",
        ]
    );
    let text = plan.to_string();
    assert!(
        text.starts_with("  1. ~ eth0: mtu 1500 -> 9000\n"),
        "{text}"
    );
    let json: serde_json::Value = serde_json::from_str(&plan.to_json_pretty()).unwrap();
    assert_eq!(json["steps"][2]["op"], "create_link");
    assert_eq!(json["steps"][2]["link"]["kind"], "bond");
    assert_eq!(json["steps"][2]["link"]["mode"], "802.3ad");
}

#[test]
fn a_routed_link_forwards_with_the_management_ones_zone_first() {
    let routed = |zone: &str| {
        parse_document(&format!(
            r#"{{ "links": [
  {{"name": "eth0", "kind": "physical", "zone": "management"}},
  {{"name": "br0", "kind": "bridge", "bridge": {{"ports": ["eth1"]}}, "zone": "{zone}"}},
  {{"name": "eth1", "kind": "physical"}} ] }}"#
        ))
        .unwrap()
    };
    let mut ownership = Ownership::default();
    let kernel = kernel_with_nics();
    let plan = compute_plan(&routed("routed"), &kernel, &ownership).unwrap();
    assert_eq!(
        lines(&plan),
        vec![
            "~ eth0: zone isolated -> management",
            "~ eth0: IPv4 forwarding off -> on",
            "~ eth0: up",
            "~ eth1: up",
            "+ create bridge br0",
            "~ eth1: enslave to br0",
            "~ br0: zone isolated -> routed",
            "~ br0: IPv4 forwarding off -> on",
            "~ br0: up",
        ]
    );
    let kernel = simulate(&kernel, &plan, Some(&mut ownership));
    assert!(compute_plan(&routed("routed"), &kernel, &ownership)
        .unwrap()
        .is_empty());
    // Without a routed link, nothing forwards (management links included).
    let plan = compute_plan(&routed("isolated"), &kernel, &ownership).unwrap();
    assert_eq!(
        lines(&plan),
        vec![
            "~ eth0: IPv4 forwarding on -> off",
            "~ br0: zone routed -> isolated",
            "~ br0: IPv4 forwarding on -> off",
        ]
    );
}

#[test]
fn second_plan_after_apply_is_empty() {
    let doc = parse_document(EXAMPLE).unwrap();
    let mut ownership = Ownership::default();
    let kernel = kernel_with_nics();
    let plan = compute_plan(&doc, &kernel, &ownership).unwrap();
    let after = simulate(&kernel, &plan, Some(&mut ownership));
    let again = compute_plan(&doc, &after, &ownership).unwrap();
    assert!(again.is_empty(), "{again}");
    assert_eq!(
        again.to_string(),
        "no changes: the kernel matches the document\n"
    );
    assert_eq!(ownership.links.len(), 3);
}

fn applied_example() -> (Document, ObservedState, Ownership) {
    let doc = parse_document(EXAMPLE).unwrap();
    let mut ownership = Ownership::default();
    let kernel = kernel_with_nics();
    let plan = compute_plan(&doc, &kernel, &ownership).unwrap();
    let after = simulate(&kernel, &plan, Some(&mut ownership));
    (doc, after, ownership)
}

#[test]
fn drift_is_repaired_with_minimal_steps() {
    let (doc, mut kernel, ownership) = applied_example();
    let br = kernel.links.get_mut("br100").unwrap();
    br.mtu = 1400;
    br.addresses.retain(|a| a.is_ipv4());
    br.addresses.push("10.100.0.99/24".parse().unwrap());
    br.routes.push(ObservedRoute {
        to: "192.168.0.0/16".parse().unwrap(),
        via: Some("10.100.0.1".parse().unwrap()),
        metric: 0,
        table: 254,
    });
    kernel.links.get_mut("bond0.100").unwrap().master = None;
    kernel.links.get_mut("bond0").unwrap().up = false;
    let plan = compute_plan(&doc, &kernel, &ownership).unwrap();
    assert_eq!(
        lines(&plan),
        vec![
            "~ bond0: up",
            "~ bond0.100: enslave to br100",
            "- br100: route 192.168.0.0/16 via 10.100.0.1 metric 0",
            "- br100: address 10.100.0.99/24",
            "+ br100: address fd00:100::5/64",
        ]
    );
    // br100 has no mtu in the document: its MTU is left alone.
    let after = simulate(&kernel, &plan, None);
    assert!(compute_plan(&doc, &after, &ownership).unwrap().is_empty());
}

#[test]
fn removed_and_absent_links_only_when_ours() {
    let (_, mut kernel, mut ownership) = applied_example();
    // Someone else's bridge with the same name as an absent one, and an unmanaged veth.
    kernel.insert(ObservedLink::new(
        40,
        "old-br",
        ObservedKind::Bridge(ObservedBridge::default()),
    ));
    kernel.insert(ObservedLink::new(
        41,
        "veth9",
        ObservedKind::Other {
            kind: Some("veth".into()),
        },
    ));
    // A bridge we made earlier that is no longer in the document.
    kernel.insert(ObservedLink::new(
        42,
        "br-old2",
        ObservedKind::Bridge(ObservedBridge::default()),
    ));
    ownership.links.insert(
        "br-old2".into(),
        OwnedLink {
            kind: LinkKind::Bridge,
            ifindex: Some(42),
        },
    );
    let doc = parse_document(EXAMPLE).unwrap();
    let plan = compute_plan(&doc, &kernel, &ownership).unwrap();
    assert_eq!(
        lines(&plan),
        vec!["- delete bridge br-old2 (no longer in the document)"]
    );
    assert_eq!(
        plan.notes,
        vec!["old-br is marked absent but was not created by thvc-netconf; left alone"]
    );
    // Ours and absent: deleted.
    ownership.links.insert(
        "old-br".into(),
        OwnedLink {
            kind: LinkKind::Bridge,
            ifindex: Some(40),
        },
    );
    let plan = compute_plan(&doc, &kernel, &ownership).unwrap();
    assert!(lines(&plan).contains(&"- delete bridge old-br (absent in the document)".to_string()));
    // Same name but re-created by someone else (other ifindex): not ours any more.
    ownership.links.insert(
        "old-br".into(),
        OwnedLink {
            kind: LinkKind::Bridge,
            ifindex: Some(39),
        },
    );
    let plan = compute_plan(&doc, &kernel, &ownership).unwrap();
    assert!(!lines(&plan).iter().any(|l| l.contains("old-br")));
}

#[test]
fn immutable_changes_recreate_owned_links_and_their_uppers() {
    let (_, kernel, ownership) = applied_example();
    let changed = EXAMPLE.replace("\"802.3ad\"", "\"active-backup\"");
    let doc = parse_document(&changed).unwrap();
    let plan = compute_plan(&doc, &kernel, &ownership).unwrap();
    assert_eq!(
        lines(&plan),
        vec![
            "- delete vlan bond0.100 (its parent bond0 goes away)",
            "- delete bond bond0 (re-create: bond mode 802.3ad -> active-backup)",
            "+ create bond bond0 (mode active-backup, miimon 100ms, mtu 9000)",
            "~ eth0: enslave to bond0",
            "~ eth1: enslave to bond0",
            "~ bond0: up",
            "+ create vlan bond0.100 (id 100 on bond0)",
            "~ bond0.100: up",
            "~ bond0.100: enslave to br100",
        ]
    );
    let mut ownership = ownership;
    let after = simulate(&kernel, &plan, Some(&mut ownership));
    assert!(compute_plan(&doc, &after, &ownership).unwrap().is_empty());

    // A VLAN id change re-creates only the VLAN.
    let doc2 = parse_document(&EXAMPLE.replace("\"id\": 100", "\"id\": 200")).unwrap();
    let plan = compute_plan(&doc2, &kernel, &ownership_after_first_apply()).unwrap();
    assert_eq!(
        lines(&plan),
        vec![
            "- delete vlan bond0.100 (re-create: VLAN id 100 -> 200)",
            "+ create vlan bond0.100 (id 200 on bond0)",
            "~ bond0.100: up",
            "~ bond0.100: enslave to br100",
        ]
    );
}

fn ownership_after_first_apply() -> Ownership {
    applied_example().2
}

#[test]
fn foreign_links_are_never_recreated() {
    let mut kernel = kernel_with_nics();
    // Someone made a bridge called bond0.
    kernel.insert(ObservedLink::new(
        9,
        "bond0",
        ObservedKind::Bridge(ObservedBridge::default()),
    ));
    kernel.insert(ObservedLink::new(
        10,
        "eth2",
        ObservedKind::Bridge(ObservedBridge::default()),
    ));
    let doc = parse_document(&EXAMPLE.replace(
        r#"{"name": "old-br""#,
        r#"{"name": "eth2", "kind": "physical"}, {"name": "old-br""#,
    ))
    .unwrap();
    let error = compute_plan(&doc, &kernel, &Ownership::default()).unwrap_err();
    assert_eq!(
        error.conflicts,
        vec![
            "bond0 exists but was not created by thvc-netconf and cannot be changed in place (kind bridge -> bond); remove or rename it by hand",
            "eth2 is a bridge in the kernel, not a physical link",
        ]
    );
}

#[test]
fn foreign_bridge_of_the_right_kind_is_managed_in_place() {
    let mut kernel = kernel_with_nics();
    kernel.insert(ObservedLink::new(
        9,
        "br0",
        ObservedKind::Bridge(ObservedBridge::default()),
    ));
    kernel.insert(ObservedLink::new(
        10,
        "veth1",
        ObservedKind::Other {
            kind: Some("veth".into()),
        },
    ));
    kernel.links.get_mut("veth1").unwrap().master = Some("br0".into());
    let doc = parse_document(
        r#"{"links": [
        {"name": "eth0", "kind": "physical"},
        {"name": "br0", "kind": "bridge", "mtu": 9000, "bridge": {"ports": ["eth0"]}}]}"#,
    )
    .unwrap();
    let plan = compute_plan(&doc, &kernel, &Ownership::default()).unwrap();
    assert_eq!(
        lines(&plan),
        vec![
            "~ eth0: up",
            "~ eth0: enslave to br0",
            "~ veth1: release from br0 (not listed there)",
            "~ br0: mtu 1500 -> 9000",
            "~ br0: up",
        ]
    );
}

#[test]
fn vm_taps_are_left_on_bridges_and_reattached() {
    let doc = parse_document(r#"{"links": [{"name": "br0", "kind": "bridge"}]}"#).unwrap();
    let mut kernel = ObservedState::default();
    let mut bridge = ObservedLink::new(5, "br0", ObservedKind::Bridge(ObservedBridge::default()));
    bridge.up = true;
    kernel.insert(bridge);
    let mut tap = ObservedLink::new(
        6,
        "vm1-tap0",
        ObservedKind::Tun {
            uid: Some(1000),
            gid: Some(1000),
        },
    );
    tap.master = Some("br0".into());
    kernel.insert(tap);
    // A TAP someone else plugged: left alone too.
    let mut foreign = ObservedLink::new(
        7,
        "tapx",
        ObservedKind::Tun {
            uid: None,
            gid: None,
        },
    );
    foreign.master = Some("br0".into());
    kernel.insert(foreign);
    let mut ownership = Ownership::default();
    ownership.links.insert(
        "br0".into(),
        OwnedLink {
            kind: LinkKind::Bridge,
            ifindex: Some(5),
        },
    );
    ownership.taps.insert(
        "vm1-tap0".into(),
        OwnedTap {
            uid: 1000,
            gid: 1000,
            bridge: Some("br0".into()),
            vlan: None,
            mtu: None,
            ifindex: Some(6),
        },
    );
    assert!(compute_plan(&doc, &kernel, &ownership).unwrap().is_empty());
    // Unplugged behind our back: plugged back.
    kernel.links.get_mut("vm1-tap0").unwrap().master = None;
    let plan = compute_plan(&doc, &kernel, &ownership).unwrap();
    assert_eq!(lines(&plan), vec!["~ vm1-tap0: enslave to br0"]);
    // A document naming a TAP is refused.
    let bad = parse_document(r#"{"links": [{"name": "vm1-tap0", "kind": "bridge"}]}"#).unwrap();
    assert!(compute_plan(&bad, &kernel, &ownership).is_err());
}

#[test]
fn physical_links_by_mac_and_missing_ones() {
    let doc = parse_document(r#"{"links": [
        {"name": "uplink", "kind": "physical", "mac": "52:54:00:00:00:03", "mtu": 9000},
        {"name": "ghost", "kind": "physical", "mac": "52:54:00:00:00:99"},
        {"name": "bond0", "kind": "bond", "bond": {"mode": "active-backup", "members": ["uplink", "ghost"], "primary": "uplink"}}]}"#)
    .unwrap();
    let plan = compute_plan(&doc, &kernel_with_nics(), &Ownership::default()).unwrap();
    assert_eq!(
        lines(&plan),
        vec![
            "~ eth1: mtu 1500 -> 9000",
            "+ create bond bond0 (mode active-backup)",
            "~ eth1: enslave to bond0",
            "~ ghost: enslave to bond0",
            "~ bond0: bond primary eth1",
            "~ bond0: up",
        ]
    );
    assert_eq!(
        plan.notes,
        vec![
            "no physical link has MAC 52:54:00:00:00:99 (document name \"ghost\")",
            "physical link ghost does not exist; steps that need it will fail",
        ]
    );
}

#[test]
fn addresses_on_physical_links_are_managed_only_when_listed() {
    let mut kernel = kernel_with_nics();
    kernel
        .links
        .get_mut("eth0")
        .unwrap()
        .addresses
        .push("192.0.2.10/24".parse().unwrap());
    kernel.links.get_mut("eth0").unwrap().up = true;
    let doc = parse_document(r#"{"links": [{"name": "eth0", "kind": "physical"}]}"#).unwrap();
    assert!(compute_plan(&doc, &kernel, &Ownership::default())
        .unwrap()
        .is_empty());
    let doc =
        parse_document(r#"{"links": [{"name": "eth0", "kind": "physical", "addresses": []}]}"#)
            .unwrap();
    let plan = compute_plan(&doc, &kernel, &Ownership::default()).unwrap();
    assert_eq!(lines(&plan), vec!["- eth0: address 192.0.2.10/24"]);
}

#[test]
fn bridge_port_vlans_are_diffed() {
    let doc = parse_document(
        r#"{"links": [
        {"name": "eth0", "kind": "physical"},
        {"name": "br0", "kind": "bridge", "bridge": {"ports": ["eth0"], "vlan_filtering": true,
          "port_vlans": {"eth0": {"vids": ["100-102"], "pvid": 10}}}}]}"#,
    )
    .unwrap();
    let kernel = kernel_with_nics();
    let mut ownership = Ownership::default();
    let plan = compute_plan(&doc, &kernel, &ownership).unwrap();
    assert_eq!(
        lines(&plan),
        vec![
            "~ eth0: up",
            "+ create bridge br0 (vlan_filtering on)",
            "~ eth0: enslave to br0",
            "~ eth0: vlans on br0: -1, +10 pvid untagged, +100, +101, +102",
            "~ br0: up",
        ]
    );
    let mut after = simulate(&kernel, &plan, Some(&mut ownership));
    assert!(compute_plan(&doc, &after, &ownership).unwrap().is_empty());
    // Drift: a VLAN added by hand and the native VLAN made tagged.
    let table = after
        .links
        .get_mut("eth0")
        .unwrap()
        .port_vlans
        .as_mut()
        .unwrap();
    table.insert(999, PortVlanFlags::TAGGED);
    table.insert(10, PortVlanFlags::TAGGED);
    let plan = compute_plan(&doc, &after, &ownership).unwrap();
    assert_eq!(
        lines(&plan),
        vec!["~ eth0: vlans on br0: -999, +10 pvid untagged"]
    );
}

#[test]
fn unowned_vlan_blocks_deleting_its_parent() {
    let (_, mut kernel, ownership) = applied_example();
    kernel.insert(ObservedLink::new(
        50,
        "bond0.7",
        ObservedKind::Vlan {
            parent: Some("bond0".into()),
            id: 7,
        },
    ));
    // The document drops everything built on the NICs.
    let doc = parse_document(r#"{"links": [{"name": "eth0", "kind": "physical"}]}"#).unwrap();
    let plan = compute_plan(&doc, &kernel, &ownership).unwrap();
    assert_eq!(
        lines(&plan),
        vec![
            "- delete vlan bond0.100 (no longer in the document)",
            "- delete bridge br100 (no longer in the document)"
        ]
    );
    assert_eq!(
        plan.notes,
        vec!["kept bond0: deleting it would destroy bond0.7, which thvc-netconf did not create"]
    );
    // Re-creating bond0 (mode change) is impossible without destroying bond0.7.
    let changed = parse_document(&EXAMPLE.replace("\"802.3ad\"", "\"balance-xor\"")).unwrap();
    let error = compute_plan(&changed, &kernel, &ownership).unwrap_err();
    assert_eq!(
        error.conflicts,
        vec!["re-creating bond0 would destroy bond0.7, which thvc-netconf did not create"]
    );
}

#[test]
fn bond_options_change_in_place() {
    let (_, kernel, ownership) = applied_example();
    let doc = parse_document(&EXAMPLE.replace(
        "\"miimon_ms\": 100",
        "\"miimon_ms\": 200, \"xmit_hash_policy\": \"layer3+4\", \"min_links\": 1",
    ))
    .unwrap();
    let plan = compute_plan(&doc, &kernel, &ownership).unwrap();
    assert_eq!(
        lines(&plan),
        vec!["~ bond0: bond miimon 200ms, xmit_hash_policy layer3+4, min_links 1"]
    );
}
