//! Host network through the agent, for real: the agent runs in its own network namespace
//! (`unshare -n`, with a sysfs for it), applies a bridge document through thvc-netconf, and
//! gives a VM's NIC a TAP on that bridge for as long as the VM runs. The kernel state is
//! checked with iproute2 inside that namespace.

mod common;

use std::process::Command;

use common::*;

/// `ip -j ARGS` inside the agent's network namespace.
fn ip_in(pid: i32, args: &[&str]) -> (bool, String) {
    let out = Command::new(require_tool("nsenter", "util-linux"))
        .args(["-t", &pid.to_string(), "-n", "ip", "-j"])
        .args(args)
        .output()
        .expect("run nsenter ip");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apply_network_then_vm_nic_gets_a_tap_on_the_bridge() {
    require_tool("unshare", "util-linux");
    require_tool("ip", "iproute2");
    let bus = TestBus::start();
    let dirs = NodeDirs::new();
    let agent = Agent::start_with(
        &bus,
        &dirs,
        &[],
        &[
            "unshare",
            "--net",
            "--mount",
            "--",
            "sh",
            "-c",
            "mount -t sysfs sysfs /sys && exec \"$0\" \"$@\"",
        ],
    );
    let pid = agent.pid();
    let conn = connect(&bus).await;
    let m = manager(&conn).await;

    let doc = r#"{"links": [{"name": "br0", "kind": "bridge", "mtu": 1500}]}"#;
    let plan = m.apply_network(doc, true).await.expect("plan");
    assert!(plan.contains("br0"), "{plan}");
    assert!(
        !ip_in(pid, &["link", "show", "br0"]).0,
        "dry run changed nothing"
    );
    assert!(!dirs.state().join("network.json").exists());

    let report = m.apply_network(doc, false).await.expect("apply");
    assert!(report.contains("br0"), "{report}");
    let (ok, out) = ip_in(pid, &["-d", "link", "show", "br0"]);
    assert!(ok && out.contains("\"bridge\""), "{out}");
    assert_eq!(m.network_state().await.unwrap(), "configured");
    assert_eq!(
        std::fs::read_to_string(dirs.state().join("network.json")).unwrap(),
        doc,
        "the applied document is kept"
    );
    let shown: serde_json::Value = serde_json::from_str(&m.get_network().await.unwrap()).unwrap();
    assert!(
        shown["links"]
            .as_array()
            .unwrap()
            .iter()
            .any(|l| l["name"] == "br0" && l["kind"] == "bridge"),
        "{shown}"
    );
    // Applying again changes nothing.
    let again: serde_json::Value =
        serde_json::from_str(&m.apply_network(doc, false).await.unwrap()).unwrap();
    assert_eq!(again["changed"], false, "{again}");

    let path = m
        .create_vm("netvm", &spec(r#","nics":[{"bridge":"br0"}]"#))
        .await
        .unwrap();
    let v = vm(&conn, path).await;
    let mac = serde_json::from_str::<serde_json::Value>(&v.spec().await.unwrap()).unwrap()["nics"]
        [0]["mac"]
        .as_str()
        .unwrap()
        .to_owned();
    v.start().await.expect("start with a NIC");
    let tap = thvc_nodeagent::names::tap_name("netvm", 0);
    let (ok, out) = ip_in(pid, &["-d", "link", "show", &tap]);
    assert!(ok, "TAP {tap} exists while the VM runs");
    let link: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(link[0]["master"], "br0", "{out}");
    let (console, _) = v.read_console(0).await.unwrap();
    let console = String::from_utf8_lossy(&console);
    assert!(
        console.contains(&format!("net tap={tap},mac={mac}")),
        "{console}"
    );

    v.stop().await.unwrap();
    assert!(
        !ip_in(pid, &["link", "show", &tap]).0,
        "TAP removed when the VM stopped"
    );

    // A NIC on a bridge that does not exist: the start fails with a Network error and
    // leaves no TAP behind.
    let path = m
        .create_vm("nobridge", &spec(r#","nics":[{"bridge":"br9"}]"#))
        .await
        .unwrap();
    let nb = vm(&conn, path).await;
    let e = nb.start().await.unwrap_err();
    assert_eq!(
        error_name(&e),
        "de.thueringen.thvc.node1.Error.Network",
        "{e}"
    );
    assert_eq!(nb.state().await.unwrap(), "failed");
    let tap = thvc_nodeagent::names::tap_name("nobridge", 0);
    assert!(!ip_in(pid, &["link", "show", &tap]).0);
}

#[test]
fn agent_net_subcommand_plans_applies_and_shows_locally() {
    require_tool("unshare", "util-linux");
    let dirs = NodeDirs::new();
    let doc = dirs.root.path().join("net.json");
    std::fs::write(&doc, r#"{"links": [{"name": "br7", "kind": "bridge"}]}"#).unwrap();
    let bad = dirs.root.path().join("bad.json");
    std::fs::write(&bad, r#"{"links": [{"name": "br7", "kind": "hub"}]}"#).unwrap();
    let state = dirs.state();
    // plan, apply and show in one fresh network namespace.
    let script = format!(
        "mount -t sysfs sysfs /sys && A='{agent}' && S='{state}' && \
         \"$A\" --state-dir \"$S\" net plan '{doc}' && echo ---- && \
         \"$A\" --state-dir \"$S\" net apply '{doc}' && echo ---- && \
         \"$A\" --state-dir \"$S\" net show",
        agent = AGENT,
        state = state.display(),
        doc = doc.display()
    );
    let out = Command::new("unshare")
        .args(["--net", "--mount", "--", "sh", "-c", &script])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let parts: Vec<&str> = stdout.split("----").collect();
    assert_eq!(parts.len(), 3, "{stdout}");
    assert!(parts[0].contains("br7"), "plan: {}", parts[0]);
    let report: serde_json::Value = serde_json::from_str(parts[1].trim()).unwrap();
    assert_eq!(report["changed"], true);
    let shown: serde_json::Value = serde_json::from_str(parts[2].trim()).unwrap();
    assert!(shown["links"]
        .as_array()
        .unwrap()
        .iter()
        .any(|l| l["name"] == "br7"));

    let out = Command::new(AGENT)
        .args([
            "--state-dir",
            state.to_str().unwrap(),
            "net",
            "plan",
            bad.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("links[0].kind"),
        "names the problem's path: {err}"
    );
}
