//! ApplyVms with the real agent on a private bus and the fake VMM: a dry run changes
//! nothing; an apply creates and starts; re-applying finds nothing to do; a VM killed behind
//! the agent's back is started again; a changed document updates, starts, shuts down and
//! deletes what documents own and leaves other VMs alone unless it is exclusive; the VMs
//! documents own are remembered across an agent restart; a bad document changes nothing;
//! failures are reported per action; one apply at a time.

mod common;

use std::time::Duration;

use common::*;
use futures_util::StreamExt;
use serde_json::{json, Value};
use thvc_nodeagent::client::{JobRemovedStream, ManagerProxy};

fn entry(name: &str, state: &str, spec: &str) -> Value {
    json!({"name": name, "state": state, "spec": serde_json::from_str::<Value>(spec).unwrap()})
}

fn doc(exclusive: bool, vms: &[Value]) -> String {
    json!({"exclusive": exclusive, "vms": vms}).to_string()
}

/// (vm, action) pairs of a plan or report.
fn actions(v: &Value) -> Vec<(String, String)> {
    let list = v.get("actions").unwrap_or(v);
    list.as_array()
        .expect("actions")
        .iter()
        .map(|a| {
            (
                a["vm"].as_str().unwrap().to_owned(),
                a["action"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

fn pairs(p: &[(&str, &str)]) -> Vec<(String, String)> {
    p.iter()
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect()
}

/// Applies `document`; returns the plan, and the job's result and report once it ended.
async fn apply(
    m: &ManagerProxy<'_>,
    removed: &mut JobRemovedStream,
    document: &str,
) -> (Value, Option<(String, Value)>) {
    let (plan, job) = m.apply_vms(document, false).await.expect("ApplyVms");
    let plan: Value = serde_json::from_str(&plan).expect("plan JSON");
    if job.as_str() == "/" {
        assert_eq!(plan["job"], "", "{plan}");
        return (plan, None);
    }
    assert_eq!(plan["job"], job.as_str());
    loop {
        let signal = tokio::time::timeout(Duration::from_secs(60), removed.next())
            .await
            .expect("the apply job ends within 60 s")
            .expect("JobRemoved");
        let args = signal.args().unwrap();
        if args.path.as_str() == job.as_str() {
            let report: Value = serde_json::from_str(&args.message).expect("report JSON");
            return (plan, Some((args.result.to_string(), report)));
        }
    }
}

async fn state(m: &ManagerProxy<'_>, name: &str) -> String {
    m.list_vms()
        .await
        .unwrap()
        .into_iter()
        .find(|(n, ..)| n == name)
        .map_or_else(|| "absent".into(), |(_, s, _)| s)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn apply_converges_reapply_is_free_and_drift_is_repaired() {
    let bus = TestBus::start();
    let dirs = NodeDirs::new();
    let mut agent = Agent::start(&bus, &dirs, &["--shutdown-timeout", "5"]);
    let conn = connect(&bus).await;
    let m = manager(&conn).await;
    let mut removed = m.receive_job_removed().await.unwrap();
    // Made by CreateVm: no document owns it.
    let manual = vm(&conn, m.create_vm("manual", &spec("")).await.unwrap()).await;
    manual.start().await.unwrap();

    let one = doc(
        false,
        &[
            entry("a", "running", &spec("")),
            entry("b", "stopped", &spec(r#","autostart":false"#)),
            entry("c", "running", &spec("")),
        ],
    );
    // A dry run: the plan, no job, nothing changed.
    let (plan, job) = m.apply_vms(&one, true).await.unwrap();
    assert_eq!(job.as_str(), "/");
    let plan: Value = serde_json::from_str(&plan).unwrap();
    assert_eq!(plan["dry_run"], true);
    assert_eq!(
        actions(&plan),
        pairs(&[
            ("a", "create"),
            ("b", "create"),
            ("c", "create"),
            ("a", "start"),
            ("c", "start")
        ])
    );
    assert_eq!(plan["left_alone"], json!(["manual"]));
    assert_eq!(
        m.list_vms().await.unwrap().len(),
        1,
        "a dry run creates nothing"
    );

    let (plan, end) = apply(&m, &mut removed, &one).await;
    assert_eq!(actions(&plan).len(), 5);
    let (result, report) = end.expect("a job");
    assert_eq!(result, "done", "{report}");
    assert!(
        report
            .as_array()
            .unwrap()
            .iter()
            .all(|a| a["result"] == "done"),
        "{report}"
    );
    assert_eq!(state(&m, "a").await, "running");
    assert_eq!(state(&m, "b").await, "defined");
    assert_eq!(state(&m, "c").await, "running");
    assert_eq!(state(&m, "manual").await, "running");

    // The same document again: nothing to do, no job.
    let (plan, end) = apply(&m, &mut removed, &one).await;
    assert!(end.is_none() && actions(&plan).is_empty(), "{plan}");
    assert_eq!(plan["unchanged"], json!(["a", "b", "c"]));

    // Drift: a's VMM killed behind the agent's back; the next apply starts it again.
    let path = m.get_vm("a").await.unwrap();
    let mut w = StateWatcher::new(&conn, &path).await;
    dirs.vmm_process("a")
        .expect("VMM recorded")
        .signal(libc::SIGKILL)
        .unwrap();
    w.wait_for("failed").await;
    let (plan, end) = apply(&m, &mut removed, &one).await;
    assert_eq!(actions(&plan), pairs(&[("a", "start")]));
    assert_eq!(plan["actions"][0]["reason"], "failed, wanted running");
    assert_eq!(end.unwrap().0, "done");
    assert_eq!(state(&m, "a").await, "running");

    // A changed document: a goes (shut down, deleted), c's memory grows (a running VM:
    // at its next start), b runs. manual is left alone.
    let two = doc(
        false,
        &[
            entry("b", "running", &spec(r#","autostart":true"#)),
            entry(
                "c",
                "running",
                r#"{"vcpus":1,"memory_mib":256,"kernel":"vmlinuz"}"#,
            ),
        ],
    );
    let (plan, end) = apply(&m, &mut removed, &two).await;
    assert_eq!(
        actions(&plan),
        pairs(&[
            ("a", "shutdown"),
            ("a", "delete"),
            ("b", "update"),
            ("c", "update"),
            ("b", "start")
        ])
    );
    assert_eq!(plan["actions"][2]["fields"], json!(["autostart"]));
    assert_eq!(plan["actions"][2]["effect"], "now");
    assert_eq!(plan["actions"][3]["fields"], json!(["memory_mib"]));
    assert_eq!(plan["actions"][3]["effect"], "next-start");
    assert_eq!(plan["left_alone"], json!(["manual"]));
    let (result, report) = end.unwrap();
    assert_eq!(result, "done", "{report}");
    assert_eq!(state(&m, "a").await, "absent");
    assert_eq!(state(&m, "b").await, "running");
    let c = vm(&conn, m.get_vm("c").await.unwrap()).await;
    let c_spec: Value = serde_json::from_str(&c.spec().await.unwrap()).unwrap();
    assert_eq!(c_spec["memory_mib"], 256);
    assert_eq!(
        c.state().await.unwrap(),
        "running",
        "an update restarts nothing"
    );
    let b = vm(&conn, m.get_vm("b").await.unwrap()).await;
    assert!(b.autostart().await.unwrap());

    // A restarted agent still knows what documents own: re-applying changes nothing.
    agent.kill9();
    let _agent = Agent::start(&bus, &dirs, &["--shutdown-timeout", "5"]);
    let conn = connect(&bus).await;
    let m = manager(&conn).await;
    let mut removed = m.receive_job_removed().await.unwrap();
    let (plan, end) = apply(&m, &mut removed, &two).await;
    assert!(end.is_none() && actions(&plan).is_empty(), "{plan}");
    assert_eq!(plan["left_alone"], json!(["manual"]));

    // An exclusive document owns the node: manual goes too.
    let three = doc(
        true,
        &[entry(
            "c",
            "stopped",
            r#"{"vcpus":1,"memory_mib":256,"kernel":"vmlinuz"}"#,
        )],
    );
    let (plan, end) = apply(&m, &mut removed, &three).await;
    let mut got = actions(&plan);
    got.sort();
    assert_eq!(
        got,
        pairs(&[
            ("b", "delete"),
            ("b", "shutdown"),
            ("c", "shutdown"),
            ("manual", "delete"),
            ("manual", "shutdown")
        ])
    );
    assert_eq!(end.unwrap().0, "done");
    let names: Vec<String> = vm_names(&m).await;
    assert_eq!(names, ["c"]);
    assert_eq!(state(&m, "c").await, "stopped");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_documents_change_nothing_and_failures_are_reported_per_action() {
    let bus = TestBus::start();
    let dirs = NodeDirs::new();
    // 512 MiB for VMs.
    let reserve = (host_memory_mib() - 512).to_string();
    let _agent = Agent::start(
        &bus,
        &dirs,
        &[
            "--shutdown-timeout",
            "3",
            "--stop-timeout",
            "2",
            "--memory-reserve-mib",
            &reserve,
        ],
    );
    let conn = connect(&bus).await;
    let m = manager(&conn).await;
    let mut removed = m.receive_job_removed().await.unwrap();

    // A VM whose kernel is not in the image store: refused whole, nothing created.
    let bad = doc(
        false,
        &[
            entry("fine", "running", &spec("")),
            entry(
                "nokernel",
                "running",
                r#"{"vcpus":1,"memory_mib":128,"kernel":"missing"}"#,
            ),
        ],
    );
    let e = m.apply_vms(&bad, false).await.expect_err("refused");
    assert_eq!(error_name(&e), "de.thueringen.thvc.node1.Error.InvalidSpec");
    assert!(error_message(&e).contains("nokernel"), "{e}");
    assert!(m.list_vms().await.unwrap().is_empty());
    for junk in ["", "{}", r#"{"vms": {}}"#, r#"{"vms": [{"name": "x"}]}"#] {
        let e = m.apply_vms(junk, true).await.expect_err(junk);
        assert_eq!(
            error_name(&e),
            "de.thueringen.thvc.node1.Error.InvalidSpec",
            "{junk}"
        );
    }

    // One VM too big for the node: its start fails, the others are done.
    let mixed = doc(
        false,
        &[
            entry("ok", "running", &spec("")),
            entry(
                "big",
                "running",
                r#"{"vcpus":1,"memory_mib":1024,"kernel":"vmlinuz"}"#,
            ),
        ],
    );
    let (_, end) = apply(&m, &mut removed, &mixed).await;
    let (result, report) = end.unwrap();
    assert_eq!(result, "failed");
    let by = |vm: &str, action: &str| {
        report
            .as_array()
            .unwrap()
            .iter()
            .find(|a| a["vm"] == vm && a["action"] == action)
            .cloned()
            .unwrap_or_else(|| panic!("{vm} {action} in {report}"))
    };
    assert_eq!(by("ok", "start")["result"], "done");
    assert_eq!(by("big", "create")["result"], "done");
    assert_eq!(by("big", "start")["result"], "failed");
    let error = by("big", "start")["error"].as_str().unwrap().to_owned();
    assert!(error.contains("VM big needs 1024 MiB"), "{error}");
    assert_eq!(state(&m, "ok").await, "running");

    // One apply at a time: while a VM that ignores the power button is being shut down
    // (3 s, then stopped), a second apply is Busy; a dry run still answers. Cancel then
    // skips what has not begun (the create and start of "later"); the shutdown finishes.
    let deaf_spec = spec_cmdline("fake.ignore_shutdown=1");
    let up = doc(false, &[entry("deaf", "running", &deaf_spec)]);
    let (_, end) = apply(&m, &mut removed, &up).await;
    assert_eq!(end.unwrap().0, "done");
    let down = doc(
        false,
        &[
            entry("deaf", "stopped", &deaf_spec),
            entry("later", "running", &spec("")),
        ],
    );
    let (plan, job) = m.apply_vms(&down, false).await.unwrap();
    assert_ne!(job.as_str(), "/", "{plan}");
    let e = m.apply_vms(&down, false).await.expect_err("Busy");
    assert_eq!(error_name(&e), "de.thueringen.thvc.node1.Error.Busy");
    m.apply_vms(&down, true)
        .await
        .expect("a dry run is not held up");
    cancel_job(&conn, job.as_str()).await.expect("Cancel");
    let report = loop {
        let signal = tokio::time::timeout(Duration::from_secs(30), removed.next())
            .await
            .unwrap()
            .unwrap();
        let args = signal.args().unwrap();
        if args.path.as_str() == job.as_str() {
            assert_eq!(args.result, "canceled", "{}", args.message);
            break serde_json::from_str::<Value>(&args.message).unwrap();
        }
    };
    let results: Vec<(String, String, String)> = report
        .as_array()
        .unwrap()
        .iter()
        .map(|a| {
            (
                a["vm"].as_str().unwrap().into(),
                a["action"].as_str().unwrap().into(),
                a["result"].as_str().unwrap().into(),
            )
        })
        .collect();
    let r = |vm: &str, action: &str, result: &str| (vm.into(), action.into(), result.into());
    assert_eq!(
        results,
        [
            r("deaf", "shutdown", "done"),
            r("later", "create", "canceled"),
            r("later", "start", "canceled")
        ]
    );
    assert_eq!(state(&m, "deaf").await, "stopped");
    assert_eq!(state(&m, "later").await, "absent");
    // The lock is released with the job: the same document again does the rest.
    let (plan, end) = apply(&m, &mut removed, &down).await;
    assert_eq!(
        actions(&plan),
        pairs(&[("later", "create"), ("later", "start")])
    );
    assert_eq!(end.unwrap().0, "done");
    let (_, end) = apply(&m, &mut removed, &down).await;
    assert!(end.is_none());
}
