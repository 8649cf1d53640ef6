//! Bonds, VLANs and VLAN-filtering bridges: the development host's kernel cannot create them,
//! so these run inside the test VM (Debian kernel with bonding and 8021q):
//!   integration/testvm/run -- target/.../vm_only-HASH --ignored --test-threads=1
//! (see nodeagent/netconf/README.md).

mod common;

use common::*;
use serde_json::Value;
use thvc_netconf::{parse_document, Netconf, Step, TapSpec};

const VM_ONLY: &str = "needs bonding+8021q: runs inside the test VM (integration/testvm)";

const EXAMPLE: &str = r#"{ "links": [
  {"name": "eth0", "kind": "physical", "mtu": 9000},
  {"name": "eth1", "kind": "physical", "mtu": 9000},
  {"name": "bond0", "kind": "bond", "mtu": 9000, "bond": {"mode": "802.3ad", "members": ["eth0", "eth1"], "miimon_ms": 100}},
  {"name": "bond0.100", "kind": "vlan", "vlan": {"parent": "bond0", "id": 100}},
  {"name": "br100", "kind": "bridge", "bridge": {"ports": ["bond0.100"], "stp": false},
   "addresses": ["10.100.0.5/24", "fd00:100::5/64"],
   "routes": [{"to": "0.0.0.0/0", "via": "10.100.0.1", "metric": 100}]},
  {"name": "old-br", "kind": "bridge", "state": "absent"} ] }"#;

fn info_data(name: &str) -> Value {
    link(name)["linkinfo"]["info_data"].clone()
}

fn lines(steps: &[Step]) -> Vec<String> {
    steps.iter().map(Step::to_string).collect()
}

/// The VLAN table of `port` as (vid, pvid, untagged), expanding ranges.
fn port_vlans(port: &str) -> Vec<(u64, bool, bool)> {
    let all = bridge_vlans();
    let mut table = Vec::new();
    for entry in all.as_array().into_iter().flatten() {
        if entry["ifname"] != port {
            continue;
        }
        for vlan in entry["vlans"].as_array().into_iter().flatten() {
            let first = vlan["vlan"].as_u64().expect("vlan id");
            let last = vlan["vlanEnd"].as_u64().unwrap_or(first);
            let flags: Vec<&str> = vlan["flags"]
                .as_array()
                .map(|f| f.iter().filter_map(Value::as_str).collect())
                .unwrap_or_default();
            for vid in first..=last {
                table.push((
                    vid,
                    flags.contains(&"PVID"),
                    flags.contains(&"Egress Untagged"),
                ));
            }
        }
    }
    table
}

#[test]
#[ignore = "needs bonding+8021q: runs inside the test VM (integration/testvm)"]
fn example_document_on_two_veth_nics() {
    let _ = VM_ONLY;
    in_netns(|state| async move {
        veth("eth0", "eth0-switch");
        veth("eth1", "eth1-switch");
        let doc = parse_document(EXAMPLE).expect("valid");
        let netconf = Netconf::new(&state).await.expect("netconf");
        let report = netconf.apply(&doc).await.expect("apply");
        assert!(report.changed);

        assert_eq!(kind("bond0").as_deref(), Some("bond"));
        let bond = info_data("bond0");
        assert_eq!(bond["mode"], "802.3ad", "{bond}");
        assert_eq!(bond["miimon"], 100, "{bond}");
        assert_eq!(mtu("bond0"), 9000);
        assert!(is_up("bond0"));
        for nic in ["eth0", "eth1"] {
            assert_eq!(master(nic).as_deref(), Some("bond0"), "{nic}");
            assert_eq!(mtu(nic), 9000, "{nic}");
            assert!(is_up(nic), "{nic}");
        }
        assert_eq!(kind("bond0.100").as_deref(), Some("vlan"));
        assert_eq!(info_data("bond0.100")["id"], 100);
        assert_eq!(link("bond0.100")["link"], "bond0");
        assert_eq!(master("bond0.100").as_deref(), Some("br100"));
        assert_eq!(kind("br100").as_deref(), Some("bridge"));
        assert_eq!(info_data("br100")["stp_state"], 0);
        assert!(is_up("br100"));
        assert_eq!(addresses("br100"), vec!["10.100.0.5/24", "fd00:100::5/64"]);
        assert!(routes("-4", "br100")
            .contains(&"default via 10.100.0.1 metric 100 proto static".to_string()));

        let before = snapshot();
        let again = netconf.apply(&doc).await.expect("second apply");
        assert!(!again.changed, "{again}");
        assert_eq!(before, snapshot());

        // Drift on the bond: a member pulled out and the MTU changed.
        ip(&["link", "set", "eth1", "nomaster"]);
        ip(&["link", "set", "bond0", "mtu", "1500"]);
        netconf.apply(&doc).await.expect("repair");
        assert_eq!(master("eth1").as_deref(), Some("bond0"));
        assert_eq!(mtu("bond0"), 9000);
        assert!(!netconf.apply(&doc).await.expect("apply").changed);

        // Options that can change live are changed in place.
        let tuned = EXAMPLE.replace(
            "\"miimon_ms\": 100",
            "\"miimon_ms\": 200, \"xmit_hash_policy\": \"layer3+4\"",
        );
        let report = netconf
            .apply(&parse_document(&tuned).expect("valid"))
            .await
            .expect("apply");
        assert_eq!(
            lines(&report.steps),
            vec!["~ bond0: bond miimon 200ms, xmit_hash_policy layer3+4"]
        );
        assert_eq!(info_data("bond0")["miimon"], 200);
        assert_eq!(info_data("bond0")["xmit_hash_policy"], "layer3+4");

        // A new bond mode re-creates the bond and the VLAN on it, and plugs it back in.
        let index_before = link("bond0")["ifindex"].clone();
        let backup = EXAMPLE.replace(
            "\"mode\": \"802.3ad\"",
            "\"mode\": \"active-backup\", \"primary\": \"eth1\"",
        );
        let doc = parse_document(&backup).expect("valid");
        let report = netconf.apply(&doc).await.expect("re-create");
        let text = lines(&report.steps);
        assert_eq!(
            text[0],
            "- delete vlan bond0.100 (its parent bond0 goes away)"
        );
        assert_eq!(
            text[1],
            "- delete bond bond0 (re-create: bond mode 802.3ad -> active-backup)"
        );
        assert_ne!(link("bond0")["ifindex"], index_before);
        assert_eq!(info_data("bond0")["mode"], "active-backup");
        assert_eq!(info_data("bond0")["primary"], "eth1");
        assert_eq!(master("eth0").as_deref(), Some("bond0"));
        assert_eq!(master("bond0.100").as_deref(), Some("br100"));
        assert!(routes("-4", "br100")
            .contains(&"default via 10.100.0.1 metric 100 proto static".to_string()));
        assert!(!netconf.apply(&doc).await.expect("apply").changed);

        // A new VLAN id re-creates only the VLAN.
        let doc = parse_document(&backup.replace("\"id\": 100", "\"id\": 200")).expect("valid");
        let report = netconf.apply(&doc).await.expect("re-create vlan");
        assert_eq!(
            lines(&report.steps),
            vec![
                "- delete vlan bond0.100 (re-create: VLAN id 100 -> 200)",
                "+ create vlan bond0.100 (id 200 on bond0)",
                "~ bond0.100: up",
                "~ bond0.100: enslave to br100",
            ]
        );
        assert_eq!(info_data("bond0.100")["id"], 200);
        assert!(!netconf.apply(&doc).await.expect("apply").changed);

        // Dropping everything but the NICs removes what we built and frees the NICs.
        let doc = parse_document(
            r#"{"links": [{"name": "eth0", "kind": "physical"}, {"name": "eth1", "kind": "physical"}]}"#,
        )
        .expect("valid");
        netconf.apply(&doc).await.expect("tear down");
        for gone in ["bond0", "bond0.100", "br100"] {
            assert!(!link_exists(gone), "{gone}");
        }
        assert!(link_exists("eth0") && link_exists("eth1"));
        assert_eq!(master("eth0"), None);
    });
}

#[test]
#[ignore = "needs bonding+8021q: runs inside the test VM (integration/testvm)"]
fn vlan_on_a_physical_nic_and_unmanaged_vlan_protects_its_parent() {
    in_netns(|state| async move {
        veth("eth0", "eth0-switch");
        let netconf = Netconf::new(&state).await.expect("netconf");
        let doc = parse_document(
            r#"{"links": [
                {"name": "eth0", "kind": "physical", "mtu": 9000},
                {"name": "br-m", "kind": "bridge", "bridge": {"ports": ["eth0"]}},
                {"name": "br-m.20", "kind": "vlan", "mtu": 9000, "vlan": {"parent": "br-m", "id": 20},
                 "addresses": ["192.0.2.10/24"]}]}"#,
        )
        .expect("valid");
        netconf.apply(&doc).await.expect("apply");
        assert_eq!(info_data("br-m.20")["id"], 20);
        assert_eq!(mtu("br-m.20"), 9000);
        assert!(!netconf.apply(&doc).await.expect("apply").changed);
        // Someone adds their own VLAN on our bridge; dropping the bridge must not kill it.
        ip(&[
            "link",
            "add",
            "link",
            "br-m",
            "name",
            "theirs.30",
            "type",
            "vlan",
            "id",
            "30",
        ]);
        let only_nic =
            parse_document(r#"{"links": [{"name": "eth0", "kind": "physical"}]}"#).expect("valid");
        let report = netconf.apply(&only_nic).await.expect("apply");
        assert_eq!(
            lines(&report.steps),
            vec!["- delete vlan br-m.20 (no longer in the document)"]
        );
        assert_eq!(
            report.notes,
            vec![
                "kept br-m: deleting it would destroy theirs.30, which thvc-netconf did not create"
            ]
        );
        assert!(link_exists("br-m") && link_exists("theirs.30"));
    });
}

#[test]
#[ignore = "needs bonding+8021q: runs inside the test VM (integration/testvm)"]
fn vlan_filtering_bridge_port_vlans_and_vm_tap_in_a_vlan() {
    in_netns(|state| async move {
        veth("eth0", "eth0-switch");
        let doc = parse_document(
            r#"{"links": [
                {"name": "eth0", "kind": "physical"},
                {"name": "br0", "kind": "bridge", "bridge": {"ports": ["eth0"], "vlan_filtering": true,
                  "port_vlans": {"eth0": {"vids": ["100-102", 200], "pvid": 10}}}}]}"#,
        )
        .expect("valid");
        let netconf = Netconf::new(&state).await.expect("netconf");
        netconf.apply(&doc).await.expect("apply");
        assert_eq!(info_data("br0")["vlan_filtering"], 1);
        assert_eq!(
            port_vlans("eth0"),
            vec![
                (10, true, true),
                (100, false, false),
                (101, false, false),
                (102, false, false),
                (200, false, false)
            ]
        );
        assert!(!netconf.apply(&doc).await.expect("apply").changed);

        // Drift: an extra VLAN and the native VLAN made tagged.
        ip_bridge(&["vlan", "add", "dev", "eth0", "vid", "999"]);
        ip_bridge(&["vlan", "add", "dev", "eth0", "vid", "10"]);
        let report = netconf.apply(&doc).await.expect("repair");
        assert_eq!(
            lines(&report.steps),
            vec!["~ eth0: vlans on br0: -999, +10 pvid untagged"]
        );
        assert_eq!(port_vlans("eth0").len(), 5);

        // A VM TAP in tenant VLAN 101: only that VLAN, untagged, as its PVID.
        let tap = TapSpec {
            name: "vm1-net0".into(),
            uid: 4242,
            gid: 4242,
            bridge: Some("br0".into()),
            vlan: Some(101),
            mtu: None,
        };
        netconf.create_tap(&tap).await.expect("tap");
        assert_eq!(port_vlans("vm1-net0"), vec![(101, true, true)]);
        assert_eq!(sysfs("vm1-net0", "owner"), "4242");
        assert!(!netconf.apply(&doc).await.expect("apply").changed);
        // Moved to another VLAN behind our back: put back by the next reconcile.
        ip_bridge(&[
            "vlan", "add", "dev", "vm1-net0", "vid", "102", "pvid", "untagged",
        ]);
        netconf.apply(&doc).await.expect("apply");
        assert_eq!(port_vlans("vm1-net0"), vec![(101, true, true)]);
        netconf.delete_tap("vm1-net0").await.expect("delete");
        assert!(!link_exists("vm1-net0"));
    });
}

fn ip_bridge(args: &[&str]) {
    let status = std::process::Command::new("bridge")
        .args(args)
        .status()
        .expect("run bridge");
    assert!(status.success(), "bridge {args:?}");
}
