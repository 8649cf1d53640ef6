//! The D-Bus API end to end: real dbus-daemon, real agent binary, fake VMM processes.

mod common;

use std::collections::HashMap;

use common::*;
use futures_util::StreamExt;
use zbus::zvariant::OwnedObjectPath;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn whole_vm_lifecycle_with_signals_and_properties() {
    let bus = TestBus::start();
    let dirs = NodeDirs::new();
    let _agent = Agent::start(&bus, &dirs, &[]);
    let conn = connect(&bus).await;
    let m = manager(&conn).await;

    assert_eq!(m.version().await.unwrap(), env!("CARGO_PKG_VERSION"));
    assert!(m.cpus().await.unwrap() >= 1);
    assert!(m.memory_bytes().await.unwrap() >= m.memory_available_bytes().await.unwrap());
    assert_eq!(m.network_state().await.unwrap(), "unconfigured");
    assert!(!m.hostname().await.unwrap().is_empty());
    assert!(m.list_vms().await.unwrap().is_empty());

    let mut new_signals = m.receive_vm_new().await.unwrap();
    let mut removed_signals = m.receive_vm_removed().await.unwrap();

    let path = m
        .create_vm("web-1", &spec(r#","disks":[],"nics":[]"#))
        .await
        .expect("create");
    assert_eq!(path.as_str(), "/de/thueringen/thvc/node1/vm/web_2d1");
    let sig = tokio::time::timeout(TIMEOUT, new_signals.next())
        .await
        .expect("VmNew in time")
        .expect("stream");
    let args = sig.args().unwrap();
    assert_eq!(args.name, "web-1");
    assert_eq!(args.path, path);
    assert!(dirs.spec_file("web-1").is_file());

    assert_eq!(m.get_vm("web-1").await.unwrap(), path);
    assert_eq!(
        m.list_vms().await.unwrap(),
        vec![("web-1".to_owned(), "defined".to_owned(), path.clone())]
    );

    let vm = vm(&conn, path.clone()).await;
    assert_eq!(vm.name().await.unwrap(), "web-1");
    assert_eq!(vm.state().await.unwrap(), "defined");
    assert!(!vm.autostart().await.unwrap());
    let spec_back: serde_json::Value = serde_json::from_str(&vm.spec().await.unwrap()).unwrap();
    assert_eq!(spec_back["vcpus"], 1);
    assert_eq!(spec_back["kernel"], "vmlinuz");

    let mut states = StateWatcher::new(&conn, &path).await;
    vm.start().await.expect("start");
    assert_eq!(vm.state().await.unwrap(), "running");
    states.wait_for("running").await;
    let vmm = dirs.vmm_process("web-1").expect("VMM recorded");
    assert!(vmm.is_alive());

    // Info comes from the VMM's API.
    let info: serde_json::Value = serde_json::from_str(&vm.info().await.unwrap()).unwrap();
    assert_eq!(info["vcpus"], 1);
    assert_eq!(info["memory_mib"], 128);
    assert_eq!(info["pid"], vmm.pid);

    // Start of a running VM succeeds and changes nothing (idempotent, see idempotent.rs).
    vm.start().await.expect("Start of a running VM");
    assert_eq!(
        dirs.vmm_process("web-1").expect("VMM recorded").pid,
        vmm.pid
    );
    // Operations that do not fit the state are refused by name.
    let e = m.delete_vm("web-1").await.unwrap_err();
    assert_eq!(
        error_name(&e),
        "de.thueringen.thvc.node1.Error.InvalidState"
    );
    let e = vm.resume().await.unwrap_err();
    assert_eq!(
        error_name(&e),
        "de.thueringen.thvc.node1.Error.InvalidState"
    );

    vm.pause().await.expect("pause");
    assert_eq!(vm.state().await.unwrap(), "paused");
    let info: serde_json::Value = serde_json::from_str(&vm.info().await.unwrap()).unwrap();
    assert_eq!(info["state"], "paused");
    vm.resume().await.expect("resume");
    assert_eq!(vm.state().await.unwrap(), "running");

    // The console carries the (fake) boot log.
    let (data, next) = vm.read_console(0).await.unwrap();
    let text = String::from_utf8_lossy(&data);
    assert!(text.contains("fake-vmm: booting"), "{text}");
    assert_eq!(next, data.len() as u64);
    let (more, next2) = vm.read_console(next).await.unwrap();
    assert!(more.is_empty());
    assert_eq!(next2, next);

    // Shutdown: the fake guest powers off on the ACPI request.
    vm.shutdown().await.expect("shutdown");
    assert_eq!(vm.state().await.unwrap(), "stopped");
    assert!(!vmm.is_alive(), "VMM gone after Shutdown");

    // Start again, then Stop (SIGTERM).
    vm.start().await.expect("start again");
    let vmm2 = dirs.vmm_process("web-1").expect("VMM recorded");
    assert_ne!(vmm2, vmm);
    vm.stop().await.expect("stop");
    assert_eq!(vm.state().await.unwrap(), "stopped");
    assert!(!vmm2.is_alive());
    let seen = states.wait_count(10).await;
    let expected = [
        "starting", "running", "paused", "running", "stopping", "stopped", "starting", "running",
        "stopping", "stopped",
    ];
    assert_eq!(seen, expected, "State sequence from PropertiesChanged");

    // Autostart is read-write and persisted.
    vm.set_autostart(true).await.expect("set autostart");
    assert!(vm.autostart().await.unwrap());
    let on_disk: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dirs.spec_file("web-1")).unwrap()).unwrap();
    assert_eq!(on_disk["autostart"], true);

    m.delete_vm("web-1").await.expect("delete");
    let sig = tokio::time::timeout(TIMEOUT, removed_signals.next())
        .await
        .expect("VmRemoved in time")
        .expect("stream");
    assert_eq!(sig.args().unwrap().name, "web-1");
    assert!(m.list_vms().await.unwrap().is_empty());
    assert!(!dirs.spec_file("web-1").exists());
    let e = m.get_vm("web-1").await.unwrap_err();
    assert_eq!(error_name(&e), "de.thueringen.thvc.node1.Error.NotFound");
    let e = vm.state().await.unwrap_err();
    assert!(
        e.to_string().contains("UnknownObject") || e.to_string().contains("nknown"),
        "{e}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn object_manager_reports_vms_and_their_properties() {
    let bus = TestBus::start();
    let dirs = NodeDirs::new();
    let _agent = Agent::start(&bus, &dirs, &[]);
    let conn = connect(&bus).await;
    let m = manager(&conn).await;
    let om = zbus::fdo::ObjectManagerProxy::builder(&conn)
        .destination(thvc_nodeagent::client::BUS_NAME)
        .unwrap()
        .path(thvc_nodeagent::names::MANAGER_PATH)
        .unwrap()
        .build()
        .await
        .unwrap();
    let mut added = om.receive_interfaces_added().await.unwrap();
    let mut removed = om.receive_interfaces_removed().await.unwrap();
    let path = m.create_vm("db", &spec("")).await.unwrap();
    let sig = tokio::time::timeout(TIMEOUT, added.next())
        .await
        .expect("InterfacesAdded")
        .expect("stream");
    let args = sig.args().unwrap();
    assert_eq!(args.object_path.as_str(), path.as_str());
    assert!(args
        .interfaces_and_properties
        .contains_key("de.thueringen.thvc.node1.Vm"));

    let objects = om.get_managed_objects().await.unwrap();
    let ifaces = objects.get(&path).expect("VM object is managed");
    let props = ifaces
        .iter()
        .find(|(k, _)| k.as_str() == "de.thueringen.thvc.node1.Vm")
        .map(|(_, v)| v)
        .expect("Vm interface");
    let name: String = props["Name"].try_clone().unwrap().try_into().unwrap();
    let state: String = props["State"].try_clone().unwrap().try_into().unwrap();
    assert_eq!((name.as_str(), state.as_str()), ("db", "defined"));

    m.delete_vm("db").await.unwrap();
    let sig = tokio::time::timeout(TIMEOUT, removed.next())
        .await
        .expect("InterfacesRemoved")
        .expect("stream");
    assert_eq!(sig.args().unwrap().object_path.as_str(), path.as_str());
    let left = om.get_managed_objects().await.unwrap();
    assert!(!left.contains_key(&path), "{left:?}");
}

/// Extracts `<interface name="NAME">...</interface>` with whitespace normalized. The
/// comments inside are the members' documentation (zbus writes the doc comments into the
/// introspection), so they are compared too: the shipped files cannot keep stale docs. The
/// file's own header, outside the interface, is free text.
fn interface_block(xml: &str, name: &str) -> String {
    let s = xml;
    let open = format!("<interface name=\"{name}\">");
    let start = s
        .find(&open)
        .unwrap_or_else(|| panic!("{name} missing in:\n{xml}"));
    let end = s[start..].find("</interface>").expect("interface end") + start;
    s[start..end]
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn busctl_introspection_matches_the_shipped_xml() {
    let busctl = require_tool("busctl", "systemd");
    let bus = TestBus::start();
    let dirs = NodeDirs::new();
    let _agent = Agent::start(&bus, &dirs, &[]);
    let conn = connect(&bus).await;
    let m = manager(&conn).await;
    let path = m.create_vm("x", &spec("")).await.unwrap();
    // A job lives while it runs: a shutdown of a guest that ignores the power button.
    let deaf = vm(
        &conn,
        m.create_vm("deaf", &spec_cmdline("fake.ignore_shutdown=1"))
            .await
            .unwrap(),
    )
    .await;
    deaf.start().await.unwrap();
    let job = deaf.shutdown_job().await.unwrap();
    for (object, iface) in [
        (
            thvc_nodeagent::names::MANAGER_PATH,
            "de.thueringen.thvc.node1.Manager",
        ),
        (path.as_str(), "de.thueringen.thvc.node1.Vm"),
        (job.as_str(), "de.thueringen.thvc.node1.Job"),
    ] {
        let out = std::process::Command::new(&busctl)
            .arg(format!("--address={}", bus.address))
            .args([
                "introspect",
                "--xml-interface",
                thvc_nodeagent::client::BUS_NAME,
                object,
            ])
            .output()
            .expect("run busctl");
        assert!(
            out.status.success(),
            "busctl introspect failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let live = String::from_utf8(out.stdout).unwrap();
        let shipped = std::fs::read_to_string(crate_file(&format!("dbus/{iface}.xml")))
            .expect("shipped introspection XML");
        assert_eq!(
            interface_block(&live, iface),
            interface_block(&shipped, iface),
            "nodeagent/dbus/{iface}.xml is out of date with the live interface"
        );
    }
    // The human-readable form lists the members too.
    let out = std::process::Command::new(&busctl)
        .arg(format!("--address={}", bus.address))
        .args([
            "introspect",
            thvc_nodeagent::client::BUS_NAME,
            path.as_str(),
        ])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    for member in [".ReadConsole", ".Shutdown", ".Autostart", ".State"] {
        assert!(text.contains(member), "{member} missing:\n{text}");
    }

    // The Job object's Vm: the VM of a VM job, "/" for the others (a pull from a server that
    // never answers stays running).
    let job_vm = |job: zbus::zvariant::OwnedObjectPath| {
        let conn = conn.clone();
        async move {
            zbus::Proxy::new(
                &conn,
                "de.thueringen.thvc.node1",
                job,
                "de.thueringen.thvc.node1.Job",
            )
            .await
            .unwrap()
            .get_property::<zbus::zvariant::OwnedObjectPath>("Vm")
            .await
            .unwrap()
        }
    };
    assert_eq!(
        job_vm(job).await.as_str(),
        m.get_vm("deaf").await.unwrap().as_str()
    );
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/x.img", silent.local_addr().unwrap());
    let pull = m.pull_image_job(&url, &"0".repeat(64)).await.unwrap();
    assert_eq!(job_vm(pull.clone()).await.as_str(), "/");
    cancel_job(&conn, pull.as_str()).await.unwrap();
    deaf.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_specs_are_rejected_by_name_and_nothing_is_persisted() {
    let bus = TestBus::start();
    let dirs = NodeDirs::new();
    std::fs::write(dirs.root.path().join("outside.img"), b"x").unwrap();
    std::os::unix::fs::symlink(
        dirs.root.path().join("outside.img"),
        dirs.state().join("disks/escape.img"),
    )
    .unwrap();
    std::os::unix::fs::symlink("/etc", dirs.state().join("images/etc")).unwrap();
    std::fs::write(dirs.state().join("disks/root.img"), b"disk").unwrap();
    let _agent = Agent::start(&bus, &dirs, &[]);
    let conn = connect(&bus).await;
    let m = manager(&conn).await;

    let cases: Vec<(&str, String, &str)> = vec![
        ("a", "not json".into(), "not valid JSON"),
        ("a", spec(r#","cpus":2"#), "unknown field"),
        (
            "a",
            r#"{"vcpus":1,"kernel":"vmlinuz"}"#.into(),
            "memory_mib",
        ),
        (
            "a",
            r#"{"vcpus":0,"memory_mib":128,"kernel":"vmlinuz"}"#.into(),
            "vcpus",
        ),
        (
            "a",
            r#"{"vcpus":1,"memory_mib":1,"kernel":"vmlinuz"}"#.into(),
            "memory_mib",
        ),
        (
            "a",
            r#"{"vcpus":33,"memory_mib":128,"kernel":"vmlinuz"}"#.into(),
            "vcpus",
        ),
        (
            "a",
            r#"{"vcpus":1,"memory_mib":1000000,"kernel":"vmlinuz"}"#.into(),
            "RAM",
        ),
        (
            "a",
            r#"{"vcpus":1,"memory_mib":128,"kernel":"/etc/passwd"}"#.into(),
            "outside",
        ),
        (
            "a",
            r#"{"vcpus":1,"memory_mib":128,"kernel":"../../outside.img"}"#.into(),
            "outside",
        ),
        (
            "a",
            r#"{"vcpus":1,"memory_mib":128,"kernel":"etc/passwd"}"#.into(),
            "outside",
        ),
        (
            "a",
            r#"{"vcpus":1,"memory_mib":128,"kernel":"missing"}"#.into(),
            "cannot be used",
        ),
        ("a", spec(r#","disks":[{"path":"escape.img"}]"#), "outside"),
        ("a", spec(r#","disks":[{"path":"/dev/null"}]"#), "outside"),
        (
            "a",
            spec(r#","disks":[{"path":"root.img"},{"path":"root.img"}]"#),
            "already attached",
        ),
        (
            "a",
            spec(r#","disks":[{"path":"root.img","serial":"way-too-long-serial-number"}]"#),
            "serial",
        ),
        (
            "a",
            spec(r#","nics":[{"bridge":"br0","mac":"01:00:5e:00:00:01"}]"#),
            "unicast",
        ),
        (
            "a",
            spec(r#","nics":[{"bridge":"br0","vlan":4095}]"#),
            "vlan",
        ),
        (
            "a",
            spec(r#","nics":[{"bridge":"a bridge name that is too long"}]"#),
            "interface name",
        ),
        ("../evil", spec(""), "VM name"),
        ("", spec(""), "empty"),
        ("-x", spec(""), "VM name"),
    ];
    for (name, spec_json, needle) in &cases {
        let e = m.create_vm(name, spec_json).await.unwrap_err();
        assert_eq!(
            error_name(&e),
            "de.thueringen.thvc.node1.Error.InvalidSpec",
            "{name} {spec_json}: {e}"
        );
        let msg = error_message(&e);
        assert!(
            msg.contains(needle),
            "{spec_json}: message {msg:?} lacks {needle:?}"
        );
    }
    assert!(m.list_vms().await.unwrap().is_empty());
    assert!(dirs.spec_files().is_empty(), "{:?}", dirs.spec_files());

    // A valid one with a generated MAC; then a duplicate is AlreadyExists, and a second VM
    // may not take the first one's writable disk.
    let path = m
        .create_vm(
            "ok",
            &spec(r#","disks":[{"path":"root.img"}],"nics":[{"bridge":"br0"}]"#),
        )
        .await
        .expect("valid spec");
    let e = m.create_vm("ok", &spec("")).await.unwrap_err();
    assert_eq!(
        error_name(&e),
        "de.thueringen.thvc.node1.Error.AlreadyExists"
    );
    let e = m
        .create_vm("other", &spec(r#","disks":[{"path":"root.img"}]"#))
        .await
        .unwrap_err();
    assert_eq!(error_name(&e), "de.thueringen.thvc.node1.Error.InvalidSpec");
    assert!(error_message(&e).contains("already attached to VM ok"));
    let vm = vm(&conn, path).await;
    let s: serde_json::Value = serde_json::from_str(&vm.spec().await.unwrap()).unwrap();
    let mac = s["nics"][0]["mac"].as_str().expect("generated MAC");
    assert_eq!(mac.len(), 17);
    assert_eq!(dirs.spec_files(), vec!["ok.json"]);

    // Other methods report unknown VMs and bad arguments by name as well.
    let e = m.delete_vm("nope").await.unwrap_err();
    assert_eq!(error_name(&e), "de.thueringen.thvc.node1.Error.NotFound");
    // GetNetwork renders the host's links; the loopback device is not among them.
    let shown = m.get_network().await.expect("show");
    let doc: serde_json::Value = serde_json::from_str(&shown).expect("a JSON document");
    assert!(doc["links"].is_array(), "{shown}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_network_documents_are_rejected_and_nothing_changes() {
    let bus = TestBus::start();
    let dirs = NodeDirs::new();
    let _agent = Agent::start(&bus, &dirs, &[]);
    let conn = connect(&bus).await;
    let m = manager(&conn).await;
    for (doc, needle) in [
        ("nope", "not valid JSON"),
        (r#"{"interfaces": []}"#, "unknown field"),
        (
            r#"{"links": [{"name": "br0", "kind": "bridge", "colour": "red"}]}"#,
            "colour",
        ),
        (
            r#"{"links": [{"name": "this-name-is-far-too-long", "kind": "bridge"}]}"#,
            "name",
        ),
    ] {
        for dry_run in [true, false] {
            let e = m.apply_network(doc, dry_run).await.unwrap_err();
            assert_eq!(
                error_name(&e),
                "de.thueringen.thvc.node1.Error.InvalidSpec",
                "{doc}: {e}"
            );
            assert!(
                error_message(&e).contains(needle),
                "{doc}: {}",
                error_message(&e)
            );
        }
    }
    assert!(!dirs.state().join("network.json").exists());
    assert_eq!(m.network_state().await.unwrap(), "unconfigured");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn manager_reports_image_version_from_os_release() {
    let bus = TestBus::start();
    let dirs = NodeDirs::new();
    let os_release = dirs.root.path().join("os-release");
    std::fs::write(
        &os_release,
        "ID=thvc\nIMAGE_ID=thvc-host\nIMAGE_VERSION=\"2026.11.7\"\n",
    )
    .unwrap();
    // Slot A holds the booted version, slot B an update (root and verity partitions each).
    let sys_block = dirs.root.path().join("block");
    for (dev, label) in [
        ("vda2", "thvc-host_2026.11.7"),
        ("vda3", "thvc-host_2026.11.7"),
        ("vda4", "thvc-host_2026.11.10"),
        ("vda5", "thvc-host_2026.11.10"),
        ("vda6", "thvc-var"),
    ] {
        std::fs::create_dir_all(sys_block.join(dev)).unwrap();
        std::fs::write(
            sys_block.join(dev).join("uevent"),
            format!("MAJOR=254\nDEVTYPE=partition\nPARTNAME={label}\n"),
        )
        .unwrap();
    }
    // The firmware's variables of a node with Secure Boot in user mode, and its TPM2's SRK.
    let efivars = dirs.root.path().join("efivars");
    std::fs::create_dir_all(&efivars).unwrap();
    for (name, value) in [("SecureBoot", 1u8), ("SetupMode", 0), ("AuditMode", 0)] {
        std::fs::write(
            efivars.join(format!("{name}-8be4df61-93ca-11d2-aa0d-00e098032b8c")),
            [6, 0, 0, 0, value],
        )
        .unwrap();
    }
    let srk = dirs.root.path().join("tpm2-srk-public-key.pem");
    let srk_pem = "-----BEGIN PUBLIC KEY-----\nMFkwEwYHKoZIzj0CAQYIKoZIzj0DAQcDQgAE\n-----END PUBLIC KEY-----\n";
    std::fs::write(&srk, srk_pem).unwrap();
    let recovery = dirs.root.path().join("var-recovery-key.p7m");
    let provisioning = dirs.root.path().join("provisioning");
    let pcr_key = dirs.root.path().join("pcr-key");
    let _agent = Agent::start(
        &bus,
        &dirs,
        &[
            "--os-release",
            os_release.to_str().unwrap(),
            "--sys-block",
            sys_block.to_str().unwrap(),
            "--efivars",
            efivars.to_str().unwrap(),
            "--tpm2-srk",
            srk.to_str().unwrap(),
            "--var-recovery-key",
            recovery.to_str().unwrap(),
            "--provisioning-flag",
            provisioning.to_str().unwrap(),
            "--pcr-key-file",
            pcr_key.to_str().unwrap(),
        ],
    );
    let conn = connect(&bus).await;
    let m = manager(&conn).await;
    assert_eq!(m.image_version().await.unwrap(), "2026.11.7");
    assert_eq!(
        m.installed_versions().await.unwrap(),
        ["2026.11.7", "2026.11.10"],
        "oldest first, by version"
    );
    // TimeSynchronized is systemd-timedated's NTPSynchronized: none on this bus, so false;
    // then a timedated stand-in on the test's bus says true, and the agent follows it.
    assert_eq!(m.secure_boot().await.unwrap(), "enabled (user)");
    assert_eq!(m.tpm_srk_public_key().await.unwrap(), srk_pem);
    // thvcctl host tpm-srk prints it: the node's TPM2 identity.
    let out = stdout_of(std::process::Command::new(THVCCTL).args([
        "--bus",
        bus.address.as_str(),
        "host",
        "tpm-srk",
    ]));
    assert_eq!(out, srk_pem);
    std::fs::remove_file(&srk).unwrap();
    assert_eq!(m.tpm_srk_public_key().await.unwrap(), "", "no TPM2: empty");
    // /var's recovery key: none until the node made one; then its envelope, which thvcctl
    // host recovery-key prints for the control plane's escrow.
    assert_eq!(m.var_recovery_key().await.unwrap(), "");
    let recovery_args = ["--bus", bus.address.as_str(), "host", "recovery-key"];
    let none = std::process::Command::new(THVCCTL)
        .args(recovery_args)
        .output()
        .unwrap();
    assert!(!none.status.success());
    assert!(String::from_utf8_lossy(&none.stderr).contains("thvc.recovery-escrow"));
    let envelope =
        "-----BEGIN CMS-----\nMIIBxgYJKoZIhvcNAQcDoIIBtzCCAbMCAQAxggFu\n-----END CMS-----\n";
    std::fs::write(&recovery, envelope).unwrap();
    assert_eq!(m.var_recovery_key().await.unwrap(), envelope);
    let out = stdout_of(std::process::Command::new(THVCCTL).args(recovery_args));
    assert_eq!(out, envelope);
    // A provisioning boot (the generator's mark): the property and thvcctl status say so.
    let status_args = ["--bus", bus.address.as_str(), "status"];
    assert!(!m.provisioning().await.unwrap());
    assert!(
        !stdout_of(std::process::Command::new(THVCCTL).args(status_args)).contains("PROVISIONING")
    );
    std::fs::write(&provisioning, "").unwrap();
    assert!(m.provisioning().await.unwrap());
    assert!(
        stdout_of(std::process::Command::new(THVCCTL).args(status_args))
            .contains("PROVISIONING BOOT: /var is in memory")
    );
    let json = stdout_of(std::process::Command::new(THVCCTL).args([
        "--bus",
        bus.address.as_str(),
        "--json",
        "status",
    ]));
    assert!(json.contains("\"provisioning\":true"), "{json}");
    // The PCR key /var is sealed to: unknown until thvc-pcr-key-rollover wrote it; then
    // its fingerprint, in the property and both forms of thvcctl status.
    assert_eq!(m.pcr_key().await.unwrap(), "");
    assert!(
        stdout_of(std::process::Command::new(THVCCTL).args(status_args))
            .contains("PCR key:   not checked yet")
    );
    let fp = "0123456789abcdef".repeat(4);
    std::fs::write(&pcr_key, format!("{fp}\n")).unwrap();
    assert_eq!(m.pcr_key().await.unwrap(), fp);
    assert!(
        stdout_of(std::process::Command::new(THVCCTL).args(status_args)).contains(&format!(
            "PCR key:   {fp} (/var and the credentials sealed to it)"
        ))
    );
    let json = stdout_of(std::process::Command::new(THVCCTL).args([
        "--bus",
        bus.address.as_str(),
        "--json",
        "status",
    ]));
    assert!(json.contains(&format!("\"pcr_key\":\"{fp}\"")), "{json}");
    assert!(!m.time_synchronized().await.unwrap());
    let _timedated = fake_timedated(&bus, true).await;
    assert!(m.time_synchronized().await.unwrap());
    // All properties at once, as busctl/GetAll clients read them.
    let props = zbus::fdo::PropertiesProxy::builder(&conn)
        .destination(thvc_nodeagent::client::BUS_NAME)
        .unwrap()
        .path(thvc_nodeagent::names::MANAGER_PATH)
        .unwrap()
        .build()
        .await
        .unwrap();
    let all: HashMap<String, zbus::zvariant::OwnedValue> = props
        .get_all(zbus::names::InterfaceName::try_from("de.thueringen.thvc.node1.Manager").unwrap())
        .await
        .unwrap();
    for p in [
        "Hostname",
        "Version",
        "KvmAvailable",
        "Cpus",
        "MemoryBytes",
        "MemoryAvailableBytes",
        "ImageVersion",
        "InstalledVersions",
        "FailedVersions",
        "TimeSynchronized",
        "SecureBoot",
        "TpmSrkPublicKey",
        "VarRecoveryKey",
        "Provisioning",
        "NetworkState",
    ] {
        assert!(all.contains_key(p), "{p} missing from GetAll");
    }
    let _: Option<OwnedObjectPath> = None;
}

/// A stand-in for systemd-timedated on the test's bus: org.freedesktop.timedate1 with the
/// NTPSynchronized property the agent reads.
async fn fake_timedated(bus: &TestBus, synced: bool) -> zbus::Connection {
    struct Timedate(bool);
    #[zbus::interface(name = "org.freedesktop.timedate1")]
    impl Timedate {
        #[zbus(property, name = "NTPSynchronized")]
        fn ntp_synchronized(&self) -> bool {
            self.0
        }
    }
    zbus::connection::Builder::address(bus.address.as_str())
        .unwrap()
        .name("org.freedesktop.timedate1")
        .unwrap()
        .serve_at("/org/freedesktop/timedate1", Timedate(synced))
        .unwrap()
        .build()
        .await
        .unwrap()
}
