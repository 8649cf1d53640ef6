//! Reconciliation against the real kernel, each test in a fresh network namespace.
//! Needs root (CI runs as root). Bonds, VLANs and VLAN filtering are in vm_only.rs.

mod common;

use common::*;
use thvc_netconf::{parse_document, Netconf, NetconfError, Step, TapSpec};

const BRIDGE_DOC: &str = r#"{ "links": [
  {"name": "nic0", "kind": "physical", "mtu": 9000},
  {"name": "nic1", "kind": "physical", "mtu": 9000},
  {"name": "br100", "kind": "bridge", "mtu": 9000, "bridge": {"ports": ["nic0", "nic1"], "stp": false},
   "addresses": ["10.100.0.5/24", "fd00:100::5/64"],
   "routes": [{"to": "0.0.0.0/0", "via": "10.100.0.1", "metric": 100},
              {"to": "10.50.0.0/16", "via": "10.100.0.254", "table": 100},
              {"to": "fd01::/64", "via": "fd00:100::1"}]},
  {"name": "old-br", "kind": "bridge", "state": "absent"} ] }"#;

fn assert_bridge_doc_applied() {
    assert_eq!(kind("br100").as_deref(), Some("bridge"));
    assert_eq!(link("br100")["linkinfo"]["info_data"]["stp_state"], 0);
    for nic in ["nic0", "nic1"] {
        assert_eq!(master(nic).as_deref(), Some("br100"), "{nic}");
        assert_eq!(mtu(nic), 9000, "{nic}");
        assert!(is_up(nic), "{nic}");
    }
    assert_eq!(mtu("br100"), 9000);
    assert!(is_up("br100"));
    assert_eq!(addresses("br100"), vec!["10.100.0.5/24", "fd00:100::5/64"]);
    let v4 = routes("-4", "br100");
    assert!(
        v4.contains(&"default via 10.100.0.1 metric 100 proto static".to_string()),
        "{v4:?}"
    );
    assert!(
        v4.contains(&"10.50.0.0/16 via 10.100.0.254 proto static".to_string()),
        "{v4:?}"
    );
    // The kernel's own prefix route is still there.
    assert!(
        v4.contains(&"10.100.0.0/24 proto kernel".to_string()),
        "{v4:?}"
    );
    let table100 = ip(&["route", "show", "table", "100"]);
    assert!(
        table100.contains("10.50.0.0/16 via 10.100.0.254 dev br100"),
        "{table100}"
    );
    let v6 = routes("-6", "br100");
    assert!(
        v6.contains(&"fd01::/64 via fd00:100::1 metric 1024 proto static".to_string()),
        "{v6:?}"
    );
}

#[test]
fn bridge_with_ports_mtu_addresses_and_routes_then_second_apply_changes_nothing() {
    in_netns(|state| async move {
        veth("nic0", "sw0");
        veth("nic1", "sw1");
        let doc = parse_document(BRIDGE_DOC).expect("valid");
        let netconf = Netconf::new(&state).await.expect("netconf");
        let plan = netconf.plan(&doc).await.expect("plan");
        assert!(!plan.is_empty());
        let report = netconf.apply(&doc).await.expect("apply");
        assert!(report.changed);
        assert_eq!(report.steps, plan.steps);
        assert_bridge_doc_applied();

        let before = snapshot();
        let again = netconf.apply(&doc).await.expect("second apply");
        assert!(!again.changed, "second apply changed: {again}");
        assert!(again.steps.is_empty());
        assert_eq!(
            again.to_string(),
            "no changes: the kernel already matches the document\n"
        );
        assert!(netconf.plan(&doc).await.expect("plan").is_empty());
        assert_eq!(before, snapshot());
        // A new Netconf (new process, same state dir) agrees.
        let fresh = Netconf::new(&state).await.expect("netconf");
        assert!(fresh.plan(&doc).await.expect("plan").is_empty());
        let ownership = std::fs::read_to_string(state.join("ownership.json")).expect("state file");
        assert!(ownership.contains("\"br100\""), "{ownership}");
        assert!(
            !ownership.contains("nic0"),
            "physical links are never owned: {ownership}"
        );
    });
}

#[test]
fn drift_behind_its_back_is_put_back() {
    in_netns(|state| async move {
        veth("nic0", "sw0");
        veth("nic1", "sw1");
        let doc = parse_document(BRIDGE_DOC).expect("valid");
        let netconf = Netconf::new(&state).await.expect("netconf");
        netconf.apply(&doc).await.expect("apply");
        let link_local_before = ip(&["-6", "addr", "show", "dev", "nic0", "scope", "link"]);

        ip(&["link", "set", "br100", "mtu", "1500"]);
        ip(&["addr", "del", "10.100.0.5/24", "dev", "br100"]); // takes the gateway routes too
        ip(&["addr", "add", "10.100.0.77/24", "dev", "br100"]);
        ip(&[
            "route",
            "add",
            "192.168.77.0/24",
            "via",
            "10.100.0.9",
            "dev",
            "br100",
        ]);
        ip(&["link", "set", "nic1", "nomaster"]);
        ip(&["link", "set", "nic0", "down"]);

        let plan = netconf.plan(&doc).await.expect("plan");
        let text = plan.to_string();
        for expected in [
            "~ nic0: up",
            "~ br100: mtu 1500 -> 9000",
            "~ nic1: enslave to br100",
            "- br100: route 192.168.77.0/24 via 10.100.0.9 metric 0",
            "- br100: address 10.100.0.77/24",
            "+ br100: address 10.100.0.5/24",
            "+ br100: route 0.0.0.0/0 via 10.100.0.1 metric 100",
        ] {
            assert!(text.contains(expected), "missing {expected:?} in\n{text}");
        }
        let report = netconf.apply(&doc).await.expect("repair");
        assert!(report.changed);
        assert_bridge_doc_applied();
        assert!(!routes("-4", "br100")
            .iter()
            .any(|r| r.starts_with("192.168.77.0/24")));
        // Kernel-made state is not ours: link-local addresses and prefix routes stay.
        assert_eq!(
            link_local_before
                .lines()
                .filter(|l| l.contains("fe80::"))
                .count(),
            ip(&["-6", "addr", "show", "dev", "nic0", "scope", "link"])
                .lines()
                .filter(|l| l.contains("fe80::"))
                .count()
        );
        assert!(routes("-6", "br100")
            .iter()
            .any(|r| r.starts_with("fd00:100::/64")));
        assert!(!netconf.apply(&doc).await.expect("apply").changed);

        // The bridge itself deleted behind our back: re-created with everything on it.
        ip(&["link", "del", "br100"]);
        let report = netconf.apply(&doc).await.expect("re-create");
        assert!(report
            .steps
            .iter()
            .any(|s| s.to_string() == "+ create bridge br100 (stp off)"));
        assert_bridge_doc_applied();
        assert!(!netconf.apply(&doc).await.expect("apply").changed);
    });
}

#[test]
fn absent_and_dropped_links_are_removed_only_when_ours() {
    in_netns(|state| async move {
        veth("nic0", "sw0");
        // Unmanaged: a bridge someone else made, and a veth nobody mentions.
        ip(&["link", "add", "foreign-br", "type", "bridge"]);
        ip(&["link", "set", "sw0", "master", "foreign-br"]);
        let netconf = Netconf::new(&state).await.expect("netconf");
        let first = parse_document(
            r#"{"links": [
                {"name": "nic0", "kind": "physical"},
                {"name": "br-a", "kind": "bridge", "bridge": {"ports": ["nic0"]}},
                {"name": "br-b", "kind": "bridge", "addresses": ["10.1.0.1/24"]}]}"#,
        )
        .expect("valid");
        netconf.apply(&first).await.expect("apply");
        assert!(link_exists("br-a") && link_exists("br-b"));

        let second = parse_document(
            r#"{"links": [
                {"name": "nic0", "kind": "physical"},
                {"name": "br-b", "kind": "bridge", "state": "absent"},
                {"name": "foreign-br", "kind": "bridge", "state": "absent"}]}"#,
        )
        .expect("valid");
        let report = netconf.apply(&second).await.expect("apply");
        let lines: Vec<String> = report.steps.iter().map(Step::to_string).collect();
        assert_eq!(
            lines,
            vec![
                "- delete bridge br-a (no longer in the document)",
                "- delete bridge br-b (absent in the document)",
            ]
        );
        assert_eq!(
            report.notes,
            vec!["foreign-br is marked absent but was not created by thvc-netconf; left alone"]
        );
        assert!(!link_exists("br-a") && !link_exists("br-b"));
        assert!(link_exists("foreign-br"));
        assert_eq!(master("sw0").as_deref(), Some("foreign-br"));
        assert!(link_exists("nic0"), "physical links are never deleted");
        assert_eq!(master("nic0"), None, "released when its bridge went away");
        assert!(!netconf.apply(&second).await.expect("apply").changed);
    });
}

#[test]
fn foreign_link_in_the_way_is_a_conflict_and_nothing_changes() {
    in_netns(|state| async move {
        veth("nic0", "sw0");
        // A veth named like a bridge of the document: not ours, cannot become a bridge.
        veth("br0", "br0-peer");
        let before = snapshot();
        let netconf = Netconf::new(&state).await.expect("netconf");
        let doc = parse_document(
            r#"{"links": [{"name": "nic0", "kind": "physical", "mtu": 2000},
                          {"name": "br0", "kind": "bridge", "bridge": {"ports": ["nic0"]}}]}"#,
        )
        .expect("valid");
        match netconf.apply(&doc).await {
            Err(NetconfError::Conflict(conflict)) => assert_eq!(
                conflict.conflicts,
                vec!["br0 exists but was not created by thvc-netconf and cannot be changed in place (kind veth -> bridge); remove or rename it by hand"]
            ),
            other => panic!("expected a conflict, got {other:?}"),
        }
        assert_eq!(before, snapshot());
    });
}

#[test]
fn invalid_documents_are_rejected_whole_with_every_error() {
    in_netns(|state| async move {
        veth("nic0", "sw0");
        let before = snapshot();
        let json = r#"{"links": [
            {"name": "nic0", "kind": "physical", "mtu": 9000},
            {"name": "br0", "kind": "bridge", "bridge": {"ports": ["nic0", "nic9"]},
             "addresses": ["10.0.0.1/24", "10.0.0.400/24"]},
            {"name": "br1", "kind": "bridge", "bridge": {"ports": ["nic0"]},
             "routes": [{"to": "10.9.0.0/16", "via": "172.16.0.1"}]},
            {"name": "this-name-is-too-long", "kind": "bridge"}]}"#;
        let errors = parse_document(json).expect_err("invalid");
        let lines: Vec<String> = errors.errors().iter().map(|e| e.to_string()).collect();
        assert_eq!(
            lines,
            vec![
                "links[1].addresses[1]: \"10.0.0.400/24\" is not a CIDR: \"10.0.0.400\" is not an IPv4 or IPv6 address",
                "links[3].name: interface name \"this-name-is-too-long\" is 21 bytes long, Linux allows at most 15",
                "links[1].bridge.ports[1]: \"nic9\" is not defined in the document (declare NICs with kind \"physical\")",
                "links[2].bridge.ports[0]: \"nic0\" is already enslaved to \"br0\"; a link has one master",
                "links[2].routes[0].via: gateway 172.16.0.1 is not inside any IPv4 address prefix of \"br1\"; add an address in its subnet or set \"onlink\": true",
            ]
        );
        assert!(errors
            .to_string()
            .starts_with("invalid network document (5 problems):\n"));
        // A document built in code is validated by apply too; the valid part is not applied.
        let mut doc = parse_document(
            r#"{"links": [{"name": "nic0", "kind": "physical", "mtu": 9000},
                          {"name": "br0", "kind": "bridge", "bridge": {"ports": ["nic0"]}}]}"#,
        )
        .expect("valid");
        doc.links[1]
            .bridge
            .as_mut()
            .expect("bridge")
            .ports
            .push("nic9".into());
        let netconf = Netconf::new(&state).await.expect("netconf");
        match netconf.apply(&doc).await {
            Err(NetconfError::Invalid(errors)) => assert_eq!(
                errors.errors()[0].to_string(),
                "links[1].bridge.ports[1]: \"nic9\" is not defined in the document (declare NICs with kind \"physical\")"
            ),
            other => panic!("expected invalid, got {other:?}"),
        }
        assert_eq!(before, snapshot());
        assert!(!state.join("ownership.json").exists());
    });
}

#[test]
fn failure_half_way_stops_keeps_what_was_done_and_the_next_apply_continues() {
    in_netns(|state| async move {
        veth("nic0", "sw0");
        let doc = parse_document(
            r#"{"links": [
                {"name": "nic0", "kind": "physical", "mtu": 9000},
                {"name": "nic1", "kind": "physical", "mtu": 9000},
                {"name": "br0", "kind": "bridge", "mtu": 9000, "bridge": {"ports": ["nic0", "nic1"]},
                 "addresses": ["10.7.0.1/24"]}]}"#,
        )
        .expect("valid");
        let netconf = Netconf::new(&state).await.expect("netconf");
        let plan = netconf.plan(&doc).await.expect("plan");
        assert!(plan.notes.contains(
            &"physical link nic1 does not exist; steps that need it will fail".to_string()
        ));
        let error = netconf.apply(&doc).await.expect_err("nic1 is missing");
        let message = error.to_string();
        match &error {
            NetconfError::StepFailed {
                step, completed, ..
            } => {
                assert_eq!(step, "~ nic1: enslave to br0");
                assert_eq!(*completed, 4);
            }
            other => panic!("expected a step failure, got {other:?}"),
        }
        assert!(
            message
                .starts_with("step 5/8 failed: ~ nic1: enslave to br0: link nic1 does not exist"),
            "{message}"
        );
        // What ran before the failure is there and consistent, and recorded as ours.
        assert_eq!(master("nic0").as_deref(), Some("br0"));
        assert_eq!(mtu("br0"), 9000);
        assert!(!is_up("br0"));
        assert!(std::fs::read_to_string(state.join("ownership.json"))
            .expect("state")
            .contains("\"br0\""));

        // The NIC shows up; the next apply continues from where it stopped.
        veth("nic1", "sw1");
        let report = netconf.apply(&doc).await.expect("apply");
        let lines: Vec<String> = report.steps.iter().map(Step::to_string).collect();
        assert_eq!(
            lines,
            vec![
                "~ nic1: mtu 1500 -> 9000",
                "~ nic1: up",
                "~ nic1: enslave to br0",
                "~ br0: up",
                "+ br0: address 10.7.0.1/24",
            ]
        );
        assert_eq!(master("nic1").as_deref(), Some("br0"));
        assert_eq!(addresses("br0"), vec!["10.7.0.1/24"]);
        assert!(!netconf.apply(&doc).await.expect("apply").changed);
    });
}

#[test]
fn taps_are_created_owned_plugged_left_alone_by_reconcile_and_deleted() {
    in_netns(|state| async move {
        veth("nic0", "sw0");
        let doc = parse_document(
            r#"{"links": [{"name": "nic0", "kind": "physical"},
                          {"name": "br0", "kind": "bridge", "mtu": 9000, "bridge": {"ports": ["nic0"]}}]}"#,
        )
        .expect("valid");
        let netconf = Netconf::new(&state).await.expect("netconf");
        netconf.apply(&doc).await.expect("apply");
        let tap = TapSpec {
            name: "vm7-net0".into(),
            uid: 1234,
            gid: 5678,
            bridge: Some("br0".into()),
            vlan: None,
            mtu: Some(9000),
        };
        netconf.create_tap(&tap).await.expect("create tap");
        assert_eq!(sysfs("vm7-net0", "owner"), "1234");
        assert_eq!(sysfs("vm7-net0", "group"), "5678");
        // IFF_TAP | IFF_NO_PI | IFF_VNET_HDR, and persistent (IFF_PERSIST 0x0800).
        assert_eq!(sysfs("vm7-net0", "tun_flags"), "0x5802");
        assert_eq!(kind("vm7-net0").as_deref(), Some("tun"));
        assert_eq!(master("vm7-net0").as_deref(), Some("br0"));
        assert_eq!(mtu("vm7-net0"), 9000);
        assert!(is_up("vm7-net0"));
        // Idempotent.
        netconf.create_tap(&tap).await.expect("create tap again");
        // Reconcile leaves the VM's port alone...
        let report = netconf.apply(&doc).await.expect("apply");
        assert!(!report.changed, "{report}");
        // ...and plugs it back if it was unplugged behind our back.
        ip(&["link", "set", "vm7-net0", "nomaster"]);
        let report = netconf.apply(&doc).await.expect("apply");
        assert_eq!(
            report.steps.iter().map(Step::to_string).collect::<Vec<_>>(),
            vec!["~ vm7-net0: enslave to br0"]
        );
        assert_eq!(master("vm7-net0").as_deref(), Some("br0"));
        // A document cannot claim the TAP.
        let claim = parse_document(r#"{"links": [{"name": "vm7-net0", "kind": "bridge"}]}"#)
            .expect("valid");
        assert!(matches!(
            netconf.apply(&claim).await,
            Err(NetconfError::Conflict(_))
        ));
        // A conflicting owner is refused rather than silently changed.
        let other_owner = TapSpec {
            uid: 1,
            ..tap.clone()
        };
        assert!(netconf.create_tap(&other_owner).await.is_err());

        netconf.delete_tap("vm7-net0").await.expect("delete tap");
        assert!(!link_exists("vm7-net0"));
        netconf
            .delete_tap("vm7-net0")
            .await
            .expect("deleting a gone TAP is fine");

        // TAPs it did not create are never deleted, nor is any other link.
        ip(&["tuntap", "add", "dev", "foreign-tap", "mode", "tap"]);
        assert!(matches!(
            netconf.delete_tap("foreign-tap").await,
            Err(NetconfError::Tap(thvc_netconf::TapError::NotOurs(_)))
        ));
        assert!(matches!(
            netconf.delete_tap("br0").await,
            Err(NetconfError::Tap(_))
        ));
        assert!(link_exists("foreign-tap") && link_exists("br0"));
        // Bad requests are refused before anything happens.
        for bad in [
            TapSpec {
                name: "a-name-longer-than-15".into(),
                ..tap.clone()
            },
            TapSpec {
                bridge: Some("nope0".into()),
                ..tap.clone()
            },
            TapSpec {
                bridge: Some("nic0".into()),
                ..tap.clone()
            },
            TapSpec {
                vlan: Some(100),
                ..tap.clone()
            }, // br0 does not filter VLANs
            TapSpec {
                vlan: Some(5000),
                ..tap.clone()
            },
        ] {
            assert!(netconf.create_tap(&bad).await.is_err(), "{bad:?}");
            assert!(!link_exists(&bad.name));
        }
    });
}

#[test]
fn show_renders_current_state_as_a_document_that_applies_as_no_change() {
    in_netns(|state| async move {
        veth("nic0", "sw0");
        veth("nic1", "sw1");
        let doc = parse_document(BRIDGE_DOC).expect("valid");
        let netconf = Netconf::new(&state).await.expect("netconf");
        netconf.apply(&doc).await.expect("apply");
        let shown = netconf.show().await.expect("show");
        let br = shown.link("br100").expect("br100 shown");
        assert_eq!(br.mtu, Some(9000));
        assert_eq!(
            br.bridge.as_ref().expect("bridge").ports,
            vec!["nic0", "nic1"]
        );
        assert_eq!(br.addresses.as_ref().expect("addresses").len(), 2);
        assert_eq!(br.routes.as_ref().expect("routes").len(), 3);
        assert!(shown.link("nic0").is_some() && shown.link("sw0").is_some());
        assert!(shown.link("lo").is_none());
        let reparsed =
            parse_document(&shown.to_json_pretty()).expect("show output is a valid document");
        assert!(netconf.plan(&reparsed).await.expect("plan").is_empty());
    });
}

#[test]
fn cli_plan_apply_show() {
    in_netns(|state| async move {
        veth("nic0", "sw0");
        veth("nic1", "sw1");
        let file = state.with_extension("json");
        std::fs::create_dir_all(&state).expect("state dir");
        std::fs::write(&file, BRIDGE_DOC).expect("write doc");
        let bin = env!("CARGO_BIN_EXE_thvc-netconf");
        let run = |args: &[&str]| {
            let output = std::process::Command::new(bin)
                .arg("--state-dir")
                .arg(&state)
                .args(args)
                .output()
                .expect("run thvc-netconf");
            (
                output.status.code(),
                String::from_utf8_lossy(&output.stdout).into_owned(),
                String::from_utf8_lossy(&output.stderr).into_owned(),
            )
        };
        let path = file.to_str().expect("utf-8 path");
        let (code, out, _) = run(&["plan", path]);
        assert_eq!(code, Some(0));
        assert!(out.contains("+ create bridge br100 (stp off)"), "{out}");
        assert!(!link_exists("br100"), "plan changes nothing");
        let (code, out, _) = run(&["apply", path]);
        assert_eq!(code, Some(0));
        assert!(out.starts_with("applied "), "{out}");
        assert_bridge_doc_applied();
        let (code, out, _) = run(&["--json", "apply", path]);
        assert_eq!(code, Some(0));
        let report: serde_json::Value = serde_json::from_str(&out).expect("json report");
        assert_eq!(report["changed"], false);
        let (code, out, _) = run(&["show"]);
        assert_eq!(code, Some(0));
        assert!(parse_document(&out)
            .expect("valid document")
            .link("br100")
            .is_some());
        std::fs::write(&file, r#"{"links": [{"name": "x", "kind": "vlan"}]}"#).expect("write");
        let (code, _, err) = run(&["apply", path]);
        assert_eq!(code, Some(2));
        assert!(
            err.contains("links[0].vlan: a vlan needs a `vlan` section"),
            "{err}"
        );
        let (code, _, err) = run(&["frobnicate"]);
        assert_eq!(code, Some(2));
        assert!(err.contains("usage:"), "{err}");
        let _ = std::fs::remove_file(&file);
    });
}

/// The link's interface group, which the host firewall matches as its zone.
fn netdev_group(name: &str) -> u32 {
    let path = format!("/sys/class/net/{name}/netdev_group");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    text.trim().parse().expect("a number")
}

#[test]
fn zones_become_interface_groups_and_drift_is_put_back() {
    in_netns(|state| async move {
        veth("nic0", "sw0");
        veth("nic1", "sw1");
        // A link the document does not list keeps its group.
        veth("other0", "sw2");
        ip(&["link", "set", "other0", "group", "1"]);
        let doc = parse_document(
            r#"{ "links": [
  {"name": "nic0", "kind": "physical", "zone": "management", "addresses": ["10.0.9.5/24"]},
  {"name": "nic1", "kind": "physical"},
  {"name": "br100", "kind": "bridge", "bridge": {"ports": ["nic1"]}, "addresses": ["192.168.77.1/24"]} ] }"#,
        )
        .expect("valid");
        let netconf = Netconf::new(&state).await.expect("netconf");
        let report = netconf.apply(&doc).await.expect("apply");
        assert!(
            report
                .to_string()
                .contains("~ nic0: zone isolated -> management"),
            "{report}"
        );
        assert_eq!(netdev_group("nic0"), 1);
        assert_eq!(netdev_group("nic1"), 0);
        assert_eq!(netdev_group("br100"), 0);
        assert_eq!(netdev_group("other0"), 1);
        assert!(netconf.plan(&doc).await.expect("plan").is_empty());
        let shown = netconf.show().await.expect("show");
        let nic0 = shown.links.iter().find(|l| l.name == "nic0").expect("nic0");
        assert_eq!(nic0.zone, thvc_netconf::Zone::Management);

        // Someone opens the VM bridge to host services behind the agent's back.
        ip(&["link", "set", "br100", "group", "1"]);
        let plan = netconf.plan(&doc).await.expect("plan");
        assert_eq!(
            plan.to_string().trim(),
            "1. ~ br100: zone management -> isolated",
            "{plan}"
        );
        netconf.apply(&doc).await.expect("repair");
        assert_eq!(netdev_group("br100"), 0);
    });
}

/// `net.ipv4.conf.NAME.forwarding` as this network namespace has it.
fn ipv4_forwarding(name: &str) -> bool {
    let path = format!("/proc/sys/net/ipv4/conf/{name}/forwarding");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
    text.trim() == "1"
}

/// A network namespace of its own beside the test's (a VM, a management peer), with one
/// end of a veth pair moved into it, addressed and routed.
struct Peer {
    name: String,
}

impl Peer {
    fn new(role: &str, link: &str, address: &str, gateway: &str) -> Peer {
        let name = format!("{role}-{}", std::process::id());
        ip(&["netns", "add", &name]);
        ip(&["link", "set", link, "netns", &name]);
        ip(&["-n", &name, "link", "set", "lo", "up"]);
        ip(&["-n", &name, "address", "add", address, "dev", link]);
        ip(&["-n", &name, "link", "set", link, "up"]);
        ip(&["-n", &name, "route", "add", "default", "via", gateway]);
        Peer { name }
    }

    /// Whether one echo request to `to` is answered within a second.
    fn pings(&self, to: &str) -> bool {
        std::process::Command::new("ip")
            .args(["netns", "exec", &self.name, "ping", "-c1", "-W1", "-n", to])
            .output()
            .unwrap_or_else(|e| panic!("cannot run ping: {e}"))
            .status
            .success()
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        let _ = std::process::Command::new("ip")
            .args(["netns", "delete", &self.name])
            .status();
    }
}

/// The host image's firewall, loaded into the test's network namespace as
/// thvc-firewall.service loads it on a node.
fn load_host_firewall() {
    let ruleset = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../image/mkosi/mkosi.extra/usr/lib/thvc/firewall.nft"
    );
    let output = std::process::Command::new("nft")
        .args(["-f", ruleset])
        .output()
        .unwrap_or_else(|e| panic!("cannot run nft (Debian: nftables): {e}"));
    assert!(
        output.status.success(),
        "nft -f {ruleset}: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}

#[test]
fn a_routed_zone_is_forwarded_to_the_management_network_and_nowhere_else() {
    in_netns(|state| async move {
        load_host_firewall();
        veth("mgmt0", "up0");
        veth("nic1", "vm0");
        veth("nic2", "vm1");
        let doc = |zone: &str| {
            parse_document(&format!(
                r#"{{ "links": [
  {{"name": "mgmt0", "kind": "physical", "zone": "management", "addresses": ["10.0.9.5/24"]}},
  {{"name": "nic1", "kind": "physical"}},
  {{"name": "br100", "kind": "bridge", "bridge": {{"ports": ["nic1"]}}, "zone": "{zone}",
    "addresses": ["192.168.77.1/24"]}},
  {{"name": "nic2", "kind": "physical"}},
  {{"name": "br200", "kind": "bridge", "bridge": {{"ports": ["nic2"]}},
    "addresses": ["192.168.78.1/24"]}} ] }}"#
            ))
            .expect("valid")
        };
        // Upstream: a management peer that routes the VM network to the node.
        let upstream = Peer::new("upstream", "up0", "10.0.9.1/24", "10.0.9.5");
        let vm = Peer::new("vm", "vm0", "192.168.77.10/24", "192.168.77.1");
        let other = Peer::new("other", "vm1", "192.168.78.10/24", "192.168.78.1");

        let netconf = Netconf::new(&state).await.expect("netconf");
        netconf.apply(&doc("isolated")).await.expect("apply");
        for link in ["mgmt0", "br100", "br200", "all"] {
            assert!(
                !ipv4_forwarding(link),
                "{link} forwards without a routed zone"
            );
        }
        assert!(!vm.pings("10.0.9.1"), "an isolated VM network was routed");

        let report = netconf.apply(&doc("routed")).await.expect("apply routed");
        let text = report.to_string();
        assert!(text.contains("~ br100: zone isolated -> routed"), "{text}");
        assert!(
            text.contains("~ br100: IPv4 forwarding off -> on"),
            "{text}"
        );
        assert!(
            text.contains("~ mgmt0: IPv4 forwarding off -> on"),
            "{text}"
        );
        assert_eq!(netdev_group("br100"), 2);
        assert!(ipv4_forwarding("br100") && ipv4_forwarding("mgmt0"));
        // Per link, not the whole node: net.ipv4.ip_forward stays 0.
        assert!(!ipv4_forwarding("all") && !ipv4_forwarding("br200"));
        assert!(netconf.plan(&doc("routed")).await.expect("plan").is_empty());

        // Both ways between the routed VM network and the management network ...
        assert!(vm.pings("10.0.9.1"), "the routed VM cannot reach upstream");
        assert!(
            upstream.pings("192.168.77.10"),
            "upstream cannot reach the VM"
        );
        // ... but not into the isolated one, nor to the node's own services.
        ip(&[
            "-n",
            &upstream.name,
            "route",
            "add",
            "192.168.78.0/24",
            "via",
            "10.0.9.5",
        ]);
        assert!(
            !upstream.pings("192.168.78.10"),
            "an isolated network was routed"
        );
        assert!(
            !other.pings("192.168.77.10"),
            "isolated -> routed was forwarded"
        );
        assert!(
            !vm.pings("192.168.78.10"),
            "routed -> isolated was forwarded"
        );
        assert!(
            !vm.pings("10.0.9.5"),
            "a routed VM reached the node's own address"
        );

        // The firewall holds by itself: with forwarding turned on behind the agent's back
        // on the isolated bridge, still nothing crosses; the next apply turns it off.
        std::fs::write("/proc/sys/net/ipv4/conf/br200/forwarding", "1").expect("drift");
        assert!(
            !upstream.pings("192.168.78.10"),
            "the firewall let management -> isolated"
        );
        assert!(
            !other.pings("10.0.9.1"),
            "the firewall let isolated -> management"
        );
        let plan = netconf.plan(&doc("routed")).await.expect("plan");
        assert_eq!(
            plan.to_string().trim(),
            "1. ~ br200: IPv4 forwarding on -> off",
            "{plan}"
        );
        netconf.apply(&doc("routed")).await.expect("repair");
        assert!(!ipv4_forwarding("br200"));

        // Drift is put back, and without a routed link nothing forwards again.
        std::fs::write("/proc/sys/net/ipv4/conf/br100/forwarding", "0").expect("drift");
        let plan = netconf.plan(&doc("routed")).await.expect("plan");
        assert_eq!(
            plan.to_string().trim(),
            "1. ~ br100: IPv4 forwarding off -> on",
            "{plan}"
        );
        netconf
            .apply(&doc("isolated"))
            .await
            .expect("back to isolated");
        assert!(!ipv4_forwarding("br100") && !ipv4_forwarding("mgmt0"));
        assert!(
            !vm.pings("10.0.9.1"),
            "still routed after the zone was removed"
        );
    });
}
