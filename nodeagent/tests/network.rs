//! Host network through the agent, for real: the agent runs in its own network namespace
//! (`unshare -n`, with a sysfs for it), applies a bridge document through thvc-netconf, and
//! gives a VM's NIC a TAP on that bridge for as long as the VM runs. The kernel state is
//! checked with iproute2 inside that namespace.

mod common;

use std::path::Path;
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
    let agent = Agent::start_with(&bus, &dirs, &[], IN_NEW_NETNS);
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
    // No --vmm-user: the VMM runs as the agent's user, which owns the TAP.
    // SAFETY: geteuid/getegid cannot fail.
    let (uid, gid) = unsafe { (libc::geteuid(), libc::getegid()) };
    assert_eq!(
        cat_in(pid, &format!("/sys/class/net/{tap}/owner")),
        uid.to_string()
    );
    assert_eq!(
        cat_in(pid, &format!("/sys/class/net/{tap}/group")),
        gid.to_string()
    );
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

/// The agent (with `args`) in its own network namespace, with bridge br0 applied.
async fn agent_with_bridge(
    bus: &TestBus,
    dirs: &NodeDirs,
    args: &[&str],
) -> (
    Agent,
    zbus::Connection,
    thvc_nodeagent::client::ManagerProxy<'static>,
) {
    require_tool("unshare", "util-linux");
    require_tool("ip", "iproute2");
    let agent = Agent::start_with(bus, dirs, args, IN_NEW_NETNS);
    let conn = connect(bus).await;
    let m = manager(&conn).await;
    m.apply_network(r#"{"links": [{"name": "br0", "kind": "bridge"}]}"#, false)
        .await
        .expect("apply");
    (agent, conn, m)
}

/// uid and primary gid of a local user, through NSS (`id`).
fn user_ids(name: &str) -> (u32, u32) {
    let id = |flag: &str| -> u32 {
        let out = Command::new("id").args([flag, name]).output().expect("id");
        assert!(out.status.success(), "no user {name}");
        String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse()
            .expect("numeric id")
    };
    (id("-u"), id("-g"))
}

/// `--vmm-user`: the direct runner starts the VMM with `--user`, and the VM's TAP belongs to
/// that user, so the VMM can attach to it without CAP_NET_ADMIN; another unprivileged user
/// cannot. Without the flag (the other test) the TAP belongs to the agent's own user.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vm_taps_belong_to_the_vmm_user() {
    let (uid, gid) = user_ids("nobody");
    let bus = TestBus::start();
    let dirs = NodeDirs::new();
    let (agent, conn, m) = agent_with_bridge(&bus, &dirs, &["--vmm-user", "nobody"]).await;
    let pid = agent.pid();
    let path = m
        .create_vm("owned", &spec(r#","nics":[{"bridge":"br0"}]"#))
        .await
        .unwrap();
    let v = vm(&conn, path).await;
    v.start().await.expect("start");
    let tap = thvc_nodeagent::names::tap_name("owned", 0);

    let sys = format!("/sys/class/net/{tap}");
    assert_eq!(cat_in(pid, &format!("{sys}/owner")), uid.to_string());
    assert_eq!(cat_in(pid, &format!("{sys}/group")), gid.to_string());
    let vmm = dirs.vmm_process("owned").expect("VMM recorded").pid;
    assert_eq!(
        proc_ids(vmm, "Uid:"),
        vec![uid; 4],
        "the VMM runs as nobody"
    );
    assert_eq!(proc_ids(vmm, "Gid:"), vec![gid; 4]);
    let (console, _) = v.read_console(0).await.unwrap();
    assert!(
        String::from_utf8_lossy(&console).contains(&format!("running as user {uid}:{gid}")),
        "{}",
        String::from_utf8_lossy(&console)
    );

    // What thvc-vmm under thvc-vm@.service does: attach without capabilities.
    attach_tap_as(pid, uid, gid, &tap).expect("the VMM user attaches to its TAP");
    let other = attach_tap_as(pid, uid - 1, gid - 1, &tap).expect_err("another user cannot");
    assert_eq!(other.raw_os_error(), Some(libc::EPERM), "{other}");

    v.stop().await.unwrap();
    assert!(!ip_in(pid, &["link", "show", &tap]).0, "TAP removed");
}

/// `--vmm-uids`: each VM's VMM runs as a uid of its own, and that user can open its own
/// disk, TAP, console and API socket and none of another VM's; a deleted VM's uid goes to
/// the next VM without the old VM's disk.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_vmm_runs_as_its_own_user_and_opens_only_its_own_files() {
    let bus = TestBus::start();
    let dirs = NodeDirs::new();
    let (agent, conn, m) = agent_with_bridge(&bus, &dirs, &["--vmm-uids", "500000-500099"]).await;
    let pid = agent.pid();
    let disks = dirs.state().join("disks");
    // b's kernel sits in a subdirectory of the image store (an image named by its URL path)
    // that others may not search, as the agent's umask makes them in the image.
    let sub = dirs.state().join("images").join("guest");
    std::fs::create_dir(&sub).unwrap();
    std::fs::write(sub.join("vmlinuz"), b"b's kernel").unwrap();
    std::fs::set_permissions(&sub, std::os::unix::fs::PermissionsExt::from_mode(0o750)).unwrap();
    for (name, uid, kernel) in [("a", 500000u32, "vmlinuz"), ("b", 500001, "guest/vmlinuz")] {
        std::fs::write(disks.join(format!("{name}.img")), vec![0u8; 4096]).unwrap();
        let spec = format!(
            r#"{{"vcpus":1,"memory_mib":128,"kernel":"{kernel}","disks":[{{"path":"{name}.img"}}],"nics":[{{"bridge":"br0"}}]}}"#
        );
        let v = vm(&conn, m.create_vm(name, &spec).await.unwrap()).await;
        v.start()
            .await
            .expect("start: the VMM opens its disk as its own user");
        let vmm = dirs.vmm_process(name).expect("VMM recorded").pid;
        assert_eq!(proc_ids(vmm, "Uid:"), vec![uid; 4], "VM {name}");
        assert_eq!(proc_ids(vmm, "Groups:"), Vec::<u32>::new(), "VM {name}");
        // Its launcher opened /dev/kvm for it: the VM's uid has no group that could.
        let (console, _) = v.read_console(0).await.unwrap();
        let console = String::from_utf8_lossy(&console);
        assert!(
            console.contains("KVM from descriptor"),
            "VM {name}: {console}"
        );
        assert_eq!(
            try_as(uid, uid, "rw", Path::new("/dev/kvm")),
            Err(libc::EACCES)
        );
        assert_eq!(
            proc_ids(vmm, "Gid:"),
            vec![uid; 4],
            "VM {name}: its private group"
        );
        let tap = thvc_nodeagent::names::tap_name(name, 0);
        assert_eq!(
            cat_in(pid, &format!("/sys/class/net/{tap}/owner")),
            uid.to_string()
        );
    }
    let (a, b) = (500000, 500001);
    let file = |vm: &str, f: &str| match f {
        "disk" => disks.join(format!("{vm}.img")),
        "console" => dirs.log().join(vm).join("console.log"),
        _ => dirs.run().join("vms").join(vm).join("api.sock"),
    };
    // VM a's user: its own disk (read-write), console and API socket; nothing of b's.
    assert_eq!(try_as(a, a, "rw", &file("a", "disk")), Ok(()));
    assert_eq!(try_as(a, a, "rw", &file("a", "console")), Ok(()));
    assert_eq!(try_as(a, a, "connect", &file("a", "api")), Ok(()));
    assert_eq!(try_as(a, a, "read", &file("b", "disk")), Err(libc::EACCES));
    assert_eq!(
        try_as(a, a, "read", &file("b", "console")),
        Err(libc::EACCES)
    );
    assert_eq!(
        try_as(a, a, "connect", &file("b", "api")),
        Err(libc::EACCES)
    );
    assert_eq!(try_as(b, b, "rw", &file("a", "disk")), Err(libc::EACCES));
    // Kernels: each VM's user reads its own (world-readable when placed) and not the other's.
    let kernel_b = sub.join("vmlinuz");
    assert_eq!(try_as(b, b, "read", &kernel_b), Ok(()));
    assert_eq!(try_as(a, a, "read", &kernel_b), Err(libc::EACCES));
    let tap_b = thvc_nodeagent::names::tap_name("b", 0);
    attach_tap_as(pid, a, a, &thvc_nodeagent::names::tap_name("a", 0))
        .expect("VM a's user attaches to its TAP");
    let e = attach_tap_as(pid, a, a, &tap_b).expect_err("not to b's");
    assert_eq!(e.raw_os_error(), Some(libc::EPERM), "{e}");
    // The run directory is sticky: the VMM may create files there (its socket) but not
    // remove or replace the agent's.
    let record = dirs.run().join("vms").join("a").join("process.json");
    assert!(record.exists());
    assert_eq!(try_as(a, a, "unlink", &record), Err(libc::EPERM));

    // A second start (the same as a restart after a guest reboot) finds its files as
    // before: the VMM binds its socket and opens its disk and console again.
    let va = vm(&conn, m.get_vm("a").await.unwrap()).await;
    va.stop().await.unwrap();
    va.start().await.expect("a second start as the VM's user");
    assert_eq!(try_as(a, a, "connect", &file("a", "api")), Ok(()));

    // b goes; c gets b's uid, and with it nothing of b's disk.
    let vb = vm(&conn, m.get_vm("b").await.unwrap()).await;
    vb.stop().await.unwrap();
    m.delete_vm("b").await.unwrap();
    let c = vm(&conn, m.create_vm("c", &spec("")).await.unwrap()).await;
    c.start().await.unwrap();
    let vmm = dirs.vmm_process("c").expect("VMM recorded").pid;
    assert_eq!(proc_ids(vmm, "Uid:"), vec![b; 4], "the freed uid is reused");
    assert_eq!(try_as(b, b, "read", &file("b", "disk")), Err(libc::EACCES));
    // Uids are kept across agent restarts.
    assert_eq!(
        std::fs::read_to_string(dirs.state().join("vms").join("a.uid"))
            .unwrap()
            .trim(),
        "500000"
    );
}

/// A VMM user that does not exist, or root, stops the agent at start with a clear error.
#[test]
fn bad_vmm_user_is_refused_at_start() {
    let dirs = NodeDirs::new();
    for (user, expect) in [
        ("no-such-user-thvc", "does not exist"),
        ("0:0", "must not run as root"),
        ("12:x", "two decimal numbers"),
    ] {
        let out = Command::new(AGENT)
            .args(["--bus", "unix:path=/nonexistent", "--runner", "direct"])
            .arg("--state-dir")
            .arg(dirs.state())
            .arg("--run-dir")
            .arg(dirs.run())
            .arg("--log-dir")
            .arg(dirs.log())
            .args(["--vmm-user", user])
            .output()
            .expect("run the agent");
        assert!(!out.status.success(), "{user}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(expect), "{user}: {err}");
    }
}

/// The agent in a fresh network + mount namespace with its own sysfs, with the systemd
/// credential directory `creds` and its log in `log`.
fn agent_with_credentials(bus: &TestBus, dirs: &NodeDirs, creds: &Path, log: &Path) -> Agent {
    Agent::start_full(
        bus,
        dirs,
        &[],
        IN_NEW_NETNS,
        &[
            ("CREDENTIALS_DIRECTORY", creds.to_str().expect("utf-8 path")),
            ("RUST_LOG", "info"),
        ],
        Some(log),
    )
}

/// An autostart VM with a NIC on `bridge`, written as a spec file before the agent starts.
fn write_autostart_vm(dirs: &NodeDirs, name: &str, bridge: Option<&str>) {
    let nics = bridge
        .map(|b| format!(r#","nics":[{{"bridge":"{b}","mac":"52:54:00:00:00:01"}}]"#))
        .unwrap_or_default();
    std::fs::create_dir_all(dirs.state().join("vms")).unwrap();
    std::fs::write(
        dirs.spec_file(name),
        spec(&format!(r#"{nics},"autostart":true"#)),
    )
    .unwrap();
}

/// `$CREDENTIALS_DIRECTORY/thvc.network` (ImportCredential= in thvc-nodeagent.service) is
/// applied at start like ApplyNetwork, before VMs are autostarted: an autostart VM with a
/// NIC on the credential's bridge comes up on it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn network_credential_is_applied_before_vms_start() {
    require_tool("unshare", "util-linux");
    require_tool("ip", "iproute2");
    let bus = TestBus::start();
    let dirs = NodeDirs::new();
    let creds = dirs.root.path().join("credentials");
    std::fs::create_dir(&creds).unwrap();
    let doc = r#"{"links": [{"name": "brcred", "kind": "bridge", "addresses": ["10.79.0.1/24"]}]}"#;
    std::fs::write(creds.join("thvc.network"), doc).unwrap();
    write_autostart_vm(&dirs, "credvm", Some("brcred"));
    let log = dirs.root.path().join("agent.log");
    let agent = agent_with_credentials(&bus, &dirs, &creds, &log);
    let pid = agent.pid();
    let conn = connect(&bus).await;
    let m = manager(&conn).await;

    // The name is taken after the credential was applied.
    assert_eq!(m.network_state().await.unwrap(), "configured");
    let (ok, out) = ip_in(pid, &["addr", "show", "brcred"]);
    assert!(ok && out.contains("\"10.79.0.1\""), "{out}");
    assert_eq!(
        std::fs::read_to_string(dirs.state().join("network.json")).unwrap(),
        doc,
        "kept like an ApplyNetwork document"
    );
    let v = vm(&conn, m.get_vm("credvm").await.unwrap()).await;
    let tap = thvc_nodeagent::names::tap_name("credvm", 0);
    eventually("the autostart VM running", || async {
        v.state().await.unwrap() == "running"
    })
    .await;
    let (ok, out) = ip_in(pid, &["link", "show", &tap]);
    assert!(ok, "TAP {tap} exists");
    let link: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(link[0]["master"], "brcred", "{out}");
    let log = std::fs::read_to_string(&log).unwrap();
    assert!(
        log.contains("applying the network document from credential")
            && log.contains("thvc.network applied"),
        "{log}"
    );
    v.stop().await.unwrap();
}

/// An invalid credential changes nothing, is logged with the validation errors, and shows in
/// NetworkState; the agent still starts and starts VMs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_network_credential_is_reported_and_the_agent_still_starts() {
    require_tool("unshare", "util-linux");
    require_tool("ip", "iproute2");
    let bus = TestBus::start();
    let dirs = NodeDirs::new();
    let creds = dirs.root.path().join("credentials");
    std::fs::create_dir(&creds).unwrap();
    std::fs::write(
        creds.join("thvc.network"),
        r#"{"links": [{"name": "brok", "kind": "bridge"}, {"name": "brbad", "kind": "hub"}]}"#,
    )
    .unwrap();
    write_autostart_vm(&dirs, "plainvm", None);
    let log = dirs.root.path().join("agent.log");
    let agent = agent_with_credentials(&bus, &dirs, &creds, &log);
    let pid = agent.pid();
    let conn = connect(&bus).await;
    let m = manager(&conn).await;

    let state = m.network_state().await.unwrap();
    assert!(
        state.starts_with("failed: network credential thvc.network is invalid")
            && state.contains("links[1].kind"),
        "{state}"
    );
    assert!(!state.contains('\n'), "one line: {state:?}");
    for link in ["brok", "brbad"] {
        assert!(!ip_in(pid, &["link", "show", link]).0, "{link} not created");
    }
    assert!(!dirs.state().join("network.json").exists());
    let v = vm(&conn, m.get_vm("plainvm").await.unwrap()).await;
    eventually("the autostart VM running", || async {
        v.state().await.unwrap() == "running"
    })
    .await;
    let log = std::fs::read_to_string(&log).unwrap();
    assert!(
        log.contains("thvc.network is invalid") && log.contains("links[1].kind"),
        "{log}"
    );
    // A later ApplyNetwork clears the failure.
    m.apply_network(r#"{"links": [{"name": "brok", "kind": "bridge"}]}"#, false)
        .await
        .unwrap();
    assert_eq!(m.network_state().await.unwrap(), "configured");
    v.stop().await.unwrap();
}

/// CREDENTIALS_DIRECTORY without thvc.network: nothing is applied.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_network_credential_leaves_the_network_unconfigured() {
    require_tool("unshare", "util-linux");
    let bus = TestBus::start();
    let dirs = NodeDirs::new();
    let creds = dirs.root.path().join("credentials");
    std::fs::create_dir(&creds).unwrap();
    std::fs::write(creds.join("thvc.other"), "not for the network").unwrap();
    let log = dirs.root.path().join("agent.log");
    let _agent = agent_with_credentials(&bus, &dirs, &creds, &log);
    let m = manager(&connect(&bus).await).await;
    assert_eq!(m.network_state().await.unwrap(), "unconfigured");
    assert!(!dirs.state().join("network.json").exists());
    let log = std::fs::read_to_string(&log).unwrap();
    assert!(log.contains("no network credential"), "{log}");
}
