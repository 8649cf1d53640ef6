//! Authorization: callers other than root and members of the control group may read but
//! not change anything. The client runs as `nobody` (uid 65534) in a child process.

mod common;

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::process::{Command, Stdio};

use common::*;

const NOBODY: u32 = 65534;

/// Runs thvcctl as `nobody`; returns (success, stdout, stderr).
fn thvcctl_as_nobody(
    bin: &std::path::Path,
    bus: &TestBus,
    args: &[&str],
    stdin: &str,
) -> (bool, String, String) {
    let mut full = vec!["--bus", &bus.address];
    full.extend_from_slice(args);
    run_as_nobody(bin, &full, stdin)
}

/// Runs `program ARGS` as `nobody` with `stdin`; returns (success, stdout, stderr).
fn run_as_nobody(program: &std::path::Path, args: &[&str], stdin: &str) -> (bool, String, String) {
    let mut child = Command::new(program)
        .args(args)
        .uid(NOBODY)
        .gid(NOBODY)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run as nobody");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Whether link `name` exists in the network namespace of process `pid`.
fn link_in(pid: i32, name: &str) -> bool {
    Command::new(require_tool("nsenter", "util-linux"))
        .args(["-t", &pid.to_string(), "-n", "ip", "link", "show", name])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .expect("run nsenter ip")
        .success()
}

use std::os::unix::process::CommandExt as _;

/// A copy of thvcctl that `nobody` can execute wherever the build directory is.
fn thvcctl_copy(dir: &std::path::Path) -> std::path::PathBuf {
    let bin = dir.join("thvcctl");
    std::fs::copy(THVCCTL, &bin).unwrap();
    std::fs::set_permissions(&bin, std::fs::Permissions::from_mode(0o755)).unwrap();
    bin
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn callers_outside_the_control_group_may_read_but_not_change() {
    let bus = TestBus::start();
    let dirs = NodeDirs::new();
    let bin = thvcctl_copy(bus.dir.path());
    let _agent = Agent::start(
        &bus,
        &dirs,
        &["--control-group", "thvc-control-test-absent"],
    );
    let conn = connect(&bus).await;
    let m = manager(&conn).await;
    let path = m.create_vm("mine", &spec("")).await.unwrap();
    let mine = vm(&conn, path).await;
    mine.start().await.unwrap();

    let denied: &[&[&str]] = &[
        &["vm", "create", "theirs", "-"],
        &["vm", "stop", "mine"],
        &["vm", "shutdown", "mine"],
        &["vm", "pause", "mine"],
        &["vm", "delete", "mine"],
        &["vm", "console", "mine"],
        &["vm", "autostart", "mine", "on"],
        &["image", "pull", "http://127.0.0.1:9/x.img", &"0".repeat(64)],
    ];
    for args in denied {
        let (ok, _, err) = thvcctl_as_nobody(&bin, &bus, args, &spec(""));
        assert!(!ok, "{args:?} must be denied");
        assert!(
            err.contains("de.thueringen.thvc.node1.Error.AccessDenied")
                || err.contains("org.freedesktop.DBus.Error.AccessDenied"),
            "{args:?}: {err}"
        );
        assert!(
            err.contains("uid 65534"),
            "the message names the caller: {err}"
        );
    }
    // Nothing changed.
    assert_eq!(dirs.spec_files(), vec!["mine.json"]);
    assert_eq!(mine.state().await.unwrap(), "running");
    assert!(!mine.autostart().await.unwrap());

    // Reading is allowed.
    let (ok, out, err) = thvcctl_as_nobody(&bin, &bus, &["--json", "vm", "list"], "");
    assert!(ok, "{err}");
    let list: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(list[0]["name"], "mine");
    assert_eq!(list[0]["state"], "running");
    let (ok, _, err) = thvcctl_as_nobody(&bin, &bus, &["status"], "");
    assert!(ok, "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn members_of_the_control_group_may_change_state() {
    let bus = TestBus::start();
    let dirs = NodeDirs::new();
    let bin = thvcctl_copy(bus.dir.path());
    // nobody's primary group is nogroup on Debian: make that the control group.
    let group = if thvc_nodeagent::auth::group_id("nogroup").unwrap().is_some() {
        "nogroup"
    } else {
        "nobody"
    };
    let _agent = Agent::start(&bus, &dirs, &["--control-group", group]);
    let (ok, _, err) = thvcctl_as_nobody(&bin, &bus, &["vm", "create", "theirs", "-"], &spec(""));
    assert!(ok, "{err}");
    let (ok, _, err) = thvcctl_as_nobody(&bin, &bus, &["vm", "start", "theirs"], "");
    assert!(ok, "{err}");
    let (ok, _, err) = thvcctl_as_nobody(&bin, &bus, &["vm", "stop", "theirs"], "");
    assert!(ok, "{err}");
    let (ok, _, err) = thvcctl_as_nobody(&bin, &bus, &["vm", "delete", "theirs"], "");
    assert!(ok, "{err}");
    assert!(dirs.spec_files().is_empty());
}

/// One role group at a time is given to `nobody` (through its primary group): each role may
/// do its own action class and nothing of the others'; Spec and Info stay hidden from everyone
/// but vm-control. The agent runs in a network namespace of its own, so the network role's
/// apply really makes its bridge.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_role_may_do_its_class_only() {
    require_tool("unshare", "util-linux");
    let dbus_send = require_tool("dbus-send", "dbus-bin");
    let group = if thvc_nodeagent::auth::group_id("nogroup").unwrap().is_some() {
        "nogroup"
    } else {
        "nobody"
    };
    let zero = "0".repeat(64);
    let bridge = r#"{"links": [{"name": "br0", "kind": "bridge", "mtu": 1500}]}"#;
    // (command, role it needs, stdin). Some calls fail after the check (image pull of a closed
    // port; update and reboot on an agent without a host helper), so the test tells "denied"
    // from "allowed" by the error name, not by success.
    let cases: &[(&[&str], &str, &str)] = &[
        (&["vm", "stop", "mine"], "vm-control", ""),
        (&["vm", "pause", "mine"], "vm-control", ""),
        (&["vm", "autostart", "mine", "off"], "vm-control", ""),
        // An empty document: refused as invalid once the role allows the call.
        (&["vm", "apply", "-"], "vm-control", ""),
        (&["vm", "apply", "--dry-run", "-"], "vm-control", ""),
        (&["vm", "console", "mine"], "console", ""),
        (
            &["image", "pull", "http://127.0.0.1:9/x.img", &zero],
            "images",
            "",
        ),
        (&["image", "delete", "nonexistent.img"], "images", ""),
        (&["disk", "delete", "nonexistent"], "images", ""),
        // A dry run is a read: everyone may plan.
        (&["net", "plan", "-"], "read", bridge),
        (&["net", "apply", "-"], "network", bridge),
        // Last: the drain shuts `mine` down.
        (&["host", "drain", "--timeout", "5"], "host", ""),
        (&["host", "undrain"], "host", ""),
        (&["host", "update", "--check"], "host", ""),
        (&["host", "update"], "host", ""),
        (&["host", "reboot", "--timeout", "1"], "host", ""),
    ];
    for role in ["vm-control", "console", "images", "network", "host"] {
        let bus = TestBus::start();
        let dirs = NodeDirs::new();
        let bin = thvcctl_copy(bus.dir.path());
        let setting = format!("{role}={group}");
        let agent = Agent::start_with(
            &bus,
            &dirs,
            &[
                "--control-group",
                "thvc-control-test-absent",
                "--role-group",
                &setting,
            ],
            IN_NEW_NETNS,
        );
        let conn = connect(&bus).await;
        let m = manager(&conn).await;
        let mine = vm(&conn, m.create_vm("mine", &spec("")).await.unwrap()).await;
        mine.start().await.unwrap();
        // Spec and Info: vm-control only; the rest of `vm info` works for everyone. (Before the
        // cases: vm-control may stop the VM.)
        let (ok, out, err) = thvcctl_as_nobody(&bin, &bus, &["--json", "vm", "info", "mine"], "");
        assert!(ok, "role {role}: vm info: {err}");
        let info: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(info["state"], "running", "{out}");
        if role == "vm-control" {
            assert_eq!(info["spec"]["vcpus"], 1, "{out}");
            assert!(info["vmm"].get("unavailable").is_none(), "{out}");
        } else {
            assert!(info["spec"].get("hidden").is_some(), "role {role}: {out}");
            assert!(
                info["vmm"]["unavailable"]
                    .as_str()
                    .unwrap_or("")
                    .contains("vm-control"),
                "role {role}: {out}"
            );
        }
        for (args, needs, stdin) in cases {
            let (ok, out, err) = thvcctl_as_nobody(&bin, &bus, args, stdin);
            let denied = err.contains("AccessDenied");
            assert_eq!(
                denied,
                role != *needs && *needs != "read",
                "role {role}: {args:?} (needs {needs}): {err}"
            );
            if args[0] == "net" && !denied {
                assert!(ok, "role {role}: {args:?}: {err}");
                assert!(out.contains("br0"), "role {role}: {args:?}: {out}");
            }
        }
        // Only the network role's apply made the bridge (the plan made nothing).
        assert_eq!(
            link_in(agent.pid(), "br0"),
            role == "network",
            "role {role}"
        );
        assert!(!m.drained().await.unwrap(), "role {role}: undrained again");

        // A drain job cannot be canceled, but only the host role hears so: the others are
        // refused first. (A VM that ignores the power button keeps the job running.)
        let stubborn = vm(
            &conn,
            m.create_vm("stubborn", &spec_cmdline("fake.ignore_shutdown=1"))
                .await
                .unwrap(),
        )
        .await;
        stubborn.start().await.unwrap();
        let job = m.drain(60).await.unwrap();
        let (ok, _, err) = run_as_nobody(
            &dbus_send,
            &[
                &format!("--bus={}", bus.address),
                "--print-reply",
                "--dest=de.thueringen.thvc.node1",
                job.as_str(),
                "de.thueringen.thvc.node1.Job.Cancel",
            ],
            "",
        );
        assert!(!ok, "role {role}: a drain job was canceled");
        let want = if role == "host" {
            "de.thueringen.thvc.node1.Error.InvalidState"
        } else {
            "de.thueringen.thvc.node1.Error.AccessDenied"
        };
        assert!(
            err.contains(want),
            "role {role}: Cancel of a drain job: {err}"
        );
        stubborn.stop().await.unwrap();
    }
}

/// Each state-changing call, allowed, refused or failed, is one journal record with the
/// caller, the action, the VM and the result; reads are not recorded. A job's end is one
/// more (done, failed, canceled), and so is each action an ApplyVms job carries out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn state_changes_are_audited_to_the_journal() {
    let bus = TestBus::start();
    let dirs = NodeDirs::new();
    let bin = thvcctl_copy(bus.dir.path());
    let journal_path = bus.dir.path().join("journal.socket");
    let journal = std::os::unix::net::UnixDatagram::bind(&journal_path).unwrap();
    journal
        .set_read_timeout(Some(std::time::Duration::from_secs(10)))
        .unwrap();
    // 512 MiB for VMs: an apply's start of a 1 GiB VM fails.
    let reserve = (host_memory_mib() - 512).to_string();
    let _agent = Agent::start(
        &bus,
        &dirs,
        &[
            "--control-group",
            "thvc-control-test-absent",
            "--journal-socket",
            journal_path.to_str().unwrap(),
            "--memory-reserve-mib",
            &reserve,
        ],
    );
    let conn = connect(&bus).await;
    let m = manager(&conn).await;
    let mut buf = vec![0u8; 65536];
    let mut next = || {
        let n = journal.recv(&mut buf).expect("an audit record arrives");
        journal_fields(&buf[..n])
    };

    let path = m.create_vm("web1", &spec("")).await.unwrap();
    let r = next();
    assert_eq!(r["THVC_ACTION"], "CreateVm", "{r:?}");
    assert_eq!(r["THVC_CALLER_UID"], "0");
    assert_eq!(r["THVC_VM"], "web1");
    assert_eq!(r["THVC_RESULT"], "ok");
    assert_eq!(r["SYSLOG_IDENTIFIER"], "thvc-nodeagent");

    let web1 = vm(&conn, path).await;
    web1.start().await.unwrap();
    let r = next();
    assert_eq!(
        (r["THVC_ACTION"].as_str(), r["THVC_RESULT"].as_str()),
        ("Start", "ok")
    );

    // Refused: nobody may not stop it (thvcctl uses the job variant).
    let (ok, _, _) = thvcctl_as_nobody(&bin, &bus, &["vm", "stop", "web1"], "");
    assert!(!ok);
    let r = next();
    assert_eq!(r["THVC_ACTION"], "StopJob", "{r:?}");
    assert_eq!(r["THVC_CALLER_UID"], NOBODY.to_string());
    assert_eq!(r["THVC_VM"], "web1");
    assert_eq!(r["THVC_RESULT"], "denied");
    assert!(r["THVC_ERROR"].contains("vm-control"), "{r:?}");

    // Reads leave no record; a failed change does, with its error.
    m.list_vms().await.unwrap();
    let err = m.delete_vm("nonexistent").await.unwrap_err();
    assert_eq!(error_name(&err), "de.thueringen.thvc.node1.Error.NotFound");
    let r = next();
    assert_eq!(r["THVC_ACTION"], "DeleteVm", "{r:?}");
    assert_eq!(r["THVC_VM"], "nonexistent");
    assert_eq!(r["THVC_RESULT"], "failed");
    assert!(!r["THVC_ERROR"].is_empty());
    assert!(!r.contains_key("THVC_JOB"), "{r:?}");

    // A job: the call's record names it, and its end is a record of its own under the same
    // caller, action and VM (the two may arrive in either order).
    let job = web1.stop_job().await.unwrap();
    let id = job_id(&job);
    let rs = [next(), next()];
    let call = one(&rs, "ok");
    let end = one(&rs, "done");
    for r in [call, end] {
        assert_eq!(r["THVC_ACTION"], "StopJob", "{r:?}");
        assert_eq!(r["THVC_CALLER_UID"], "0");
        assert_eq!(r["THVC_VM"], "web1");
        assert_eq!(r["THVC_JOB"], id, "{r:?}");
        assert_eq!(r["SYSLOG_IDENTIFIER"], "thvc-nodeagent");
    }
    assert_eq!(end["PRIORITY"], "6");
    assert!(
        end["MESSAGE"].contains(&format!("job {id} done")),
        "{end:?}"
    );

    // A job that fails: its end says so, with JobRemoved's message.
    let zero = "0".repeat(64);
    let closed = "http://127.0.0.1:9/x.img";
    let job = m.pull_image_job(closed, &zero).await.unwrap();
    let id = job_id(&job);
    let rs = [next(), next()];
    assert_eq!(one(&rs, "ok")["THVC_JOB"], id);
    let end = one(&rs, "failed");
    assert_eq!(end["THVC_ACTION"], "PullImageJob", "{end:?}");
    assert_eq!(end["THVC_VM"], closed);
    assert_eq!(end["THVC_JOB"], id);
    assert!(end["THVC_ERROR"].contains("127.0.0.1:9"), "{end:?}");
    assert_eq!(end["PRIORITY"], "5");

    // A canceled job (a server that never answers keeps the pull waiting): the Cancel is
    // a call of its own, the end says canceled.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/x.img", silent.local_addr().unwrap());
    let job = m.pull_image_job(&url, &zero).await.unwrap();
    let id = job_id(&job);
    let r = next();
    assert_eq!(
        (r["THVC_ACTION"].as_str(), r["THVC_RESULT"].as_str()),
        ("PullImageJob", "ok")
    );
    cancel_job(&conn, job.as_str()).await.unwrap();
    let rs = [next(), next()];
    let cancel = one(&rs, "ok");
    assert_eq!(cancel["THVC_ACTION"], "CancelJob", "{cancel:?}");
    assert_eq!(cancel["THVC_VM"], url);
    let end = one(&rs, "canceled");
    assert_eq!(end["THVC_ACTION"], "PullImageJob", "{end:?}");
    assert_eq!(end["THVC_JOB"], id);
    assert!(end["THVC_ERROR"].contains("canceled"), "{end:?}");

    // ApplyVms: each action it carries out is a record as the caller's, under the apply's
    // job; one start fails (beyond capacity), so the job ends failed with the report.
    let vm_doc = |name: &str, memory_mib: u64| {
        serde_json::json!({"name": name, "state": "running", "spec":
            {"vcpus": 1, "memory_mib": memory_mib, "kernel": "vmlinuz"}})
    };
    let doc = serde_json::json!({"vms": [vm_doc("doc1", 128), vm_doc("doc2", 1024)]});
    let (_, job) = m.apply_vms(&doc.to_string(), false).await.unwrap();
    let id = job_id(&job);
    let rs: Vec<_> = (0..6).map(|_| next()).collect();
    for r in &rs {
        assert_eq!(r["THVC_CALLER_UID"], "0", "{r:?}");
        assert_eq!(r["THVC_JOB"], id, "{r:?}");
    }
    let seen: Vec<(&str, &str, &str)> = rs
        .iter()
        .map(|r| {
            (
                r["THVC_ACTION"].as_str(),
                r["THVC_VM"].as_str(),
                r["THVC_RESULT"].as_str(),
            )
        })
        .collect();
    let at = |want: (&str, &str, &str)| {
        seen.iter()
            .position(|s| *s == want)
            .unwrap_or_else(|| panic!("no record {want:?} in {seen:?}"))
    };
    at(("ApplyVms", "", "ok"));
    assert!(at(("ApplyVms.create", "doc1", "ok")) < at(("ApplyVms.start", "doc1", "ok")));
    assert!(at(("ApplyVms.create", "doc2", "ok")) < at(("ApplyVms.start", "doc2", "failed")));
    let end = &rs[at(("ApplyVms", "", "failed"))];
    assert!(end["THVC_ERROR"].contains("doc2"), "{end:?}");
    let failed_start = &rs[at(("ApplyVms.start", "doc2", "failed"))];
    assert!(
        failed_start["THVC_ERROR"].contains("needs 1024 MiB of memory"),
        "{failed_start:?}"
    );
}

/// The id of the job at `path` (its last element), as the audit records write it.
fn job_id(path: &zbus::zvariant::OwnedObjectPath) -> String {
    path.as_str().rsplit('/').next().unwrap().to_owned()
}

/// The one record among `records` with THVC_RESULT `result`.
fn one<'a>(
    records: &'a [std::collections::HashMap<String, String>],
    result: &str,
) -> &'a std::collections::HashMap<String, String> {
    let found: Vec<_> = records
        .iter()
        .filter(|r| r["THVC_RESULT"] == result)
        .collect();
    assert_eq!(found.len(), 1, "one {result} record: {records:?}");
    found[0]
}
