//! The agent dies (SIGKILL) in the middle of work and comes back: persisted state intact,
//! running VMMs re-adopted (same processes), exits that happened meanwhile reported
//! truthfully, autostart honoured, operator stops remembered. Then a host "reboot" (fresh
//! run directory): autostart VMs start.

mod common;

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};

use common::*;

const SETTLED: [&str; 5] = ["defined", "running", "paused", "stopped", "failed"];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_killed_mid_work_restarts_with_state_intact_and_vms_readopted() {
    let bus = TestBus::start();
    let dirs = NodeDirs::new();
    let mut agent = Agent::start(&bus, &dirs, &[]);
    let conn = connect(&bus).await;
    let m = manager(&conn).await;

    let keep = vm(&conn, m.create_vm("keep", &spec("")).await.unwrap()).await;
    keep.start().await.unwrap();
    keep.pause().await.unwrap();
    let keep_vmm = dirs.vmm_process("keep").unwrap();
    let opstop = vm(
        &conn,
        m.create_vm("opstop", &spec(r#","autostart":true"#))
            .await
            .unwrap(),
    )
    .await;
    opstop.start().await.unwrap();
    opstop.stop().await.unwrap();
    m.create_vm("auto", &spec(r#","autostart":true"#))
        .await
        .unwrap();
    let dies = vm(&conn, m.create_vm("dies", &spec("")).await.unwrap()).await;
    dies.start().await.unwrap();
    let dies_vmm = dirs.vmm_process("dies").unwrap();

    // Work in flight: 30 clients create and start VMs while the agent is killed.
    let created = Arc::new(Mutex::new(BTreeSet::new()));
    let mut tasks = Vec::new();
    for i in 0..30 {
        let address = bus.address.clone();
        let created = created.clone();
        tasks.push(tokio::spawn(async move {
            let Ok(c) = thvc_nodeagent::client::connect(
                &thvc_nodeagent::client::BusTarget::Address(address),
            )
            .await
            else {
                return;
            };
            let m = manager(&c).await;
            let name = format!("w{i:02}");
            if let Ok(path) = m.create_vm(&name, &spec("")).await {
                created.lock().unwrap().insert(name);
                if let Ok(v) = thvc_nodeagent::client::vm_proxy(&c, path).await {
                    let _ = v.start().await;
                }
            }
        }));
    }
    eventually("some creates done", || {
        let created = created.clone();
        async move { created.lock().unwrap().len() >= 5 }
    })
    .await;
    agent.kill9();
    for t in tasks {
        let _ = t.await;
    }
    let created = created.lock().unwrap().clone();
    assert!(created.len() >= 5);

    // While no agent runs, a VMM is killed.
    assert!(keep_vmm.is_alive(), "VMMs survive the agent");
    dies_vmm.signal(libc::SIGKILL).unwrap();
    let dies_vmm2 = dies_vmm;
    eventually("VMM gone", || async move { !dies_vmm2.is_alive() }).await;

    let _agent2 = Agent::start(&bus, &dirs, &[]);
    let conn = connect(&bus).await;
    let m = manager(&conn).await;

    // Every VM whose creation was confirmed exists, and every VM on disk is served.
    let listed: BTreeSet<String> = vm_names(&m).await.into_iter().collect();
    for name in &created {
        assert!(listed.contains(name), "{name} was confirmed but is gone");
    }
    let on_disk: BTreeSet<String> = dirs
        .spec_files()
        .into_iter()
        .map(|f| {
            assert!(
                f.ends_with(".json") && !f.starts_with('.'),
                "stray file {f}"
            );
            f.trim_end_matches(".json").to_owned()
        })
        .collect();
    assert_eq!(listed, on_disk);

    // Same VMM process, still paused, now supervised by the new agent.
    let keep = vm(&conn, m.get_vm("keep").await.unwrap()).await;
    assert_eq!(keep.state().await.unwrap(), "paused");
    let info: serde_json::Value = serde_json::from_str(&keep.info().await.unwrap()).unwrap();
    assert_eq!(info["pid"], keep_vmm.pid);
    keep.resume().await.unwrap();

    // Death while away: failed with the real reason.
    let dies = vm(&conn, m.get_vm("dies").await.unwrap()).await;
    assert_eq!(dies.state().await.unwrap(), "failed");
    let reason = dies.state_reason().await.unwrap();
    assert!(reason.contains("signal 9"), "{reason}");

    // The operator's stop is remembered: no autostart.
    let opstop = vm(&conn, m.get_vm("opstop").await.unwrap()).await;
    assert_eq!(opstop.state().await.unwrap(), "stopped");

    // Autostart VMs that were not stopped on purpose are started.
    let auto = vm(&conn, m.get_vm("auto").await.unwrap()).await;
    let a = auto.clone();
    eventually("auto running", || {
        let a = a.clone();
        async move { a.state().await.unwrap() == "running" }
    })
    .await;

    // Mid-work VMs settle into a truthful state.
    for name in &listed {
        let v = vm(&conn, m.get_vm(name).await.unwrap()).await;
        let v2 = v.clone();
        eventually("settled state", || {
            let v = v2.clone();
            async move { SETTLED.contains(&v.state().await.unwrap().as_str()) }
        })
        .await;
        if v.state().await.unwrap() == "running" {
            // A re-adopted VMM is really alive and controllable.
            assert!(dirs.vmm_process(name).expect("recorded").is_alive());
        }
    }

    // The re-adopted VMM is watched: stopping it works and is noticed.
    keep.stop().await.unwrap();
    assert_eq!(keep.state().await.unwrap(), "stopped");
    assert!(!keep_vmm.is_alive());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reboot_exit_while_agent_is_away_restarts_the_vm() {
    let bus = TestBus::start();
    let dirs = NodeDirs::new();
    let mut agent = Agent::start(&bus, &dirs, &[]);
    let conn = connect(&bus).await;
    let m = manager(&conn).await;
    let marker = dirs.root.path().join("rebooted");
    let v = vm(
        &conn,
        m.create_vm(
            "rb",
            &spec_cmdline(&format!("fake.reboot_once={}", marker.display())),
        )
        .await
        .unwrap(),
    )
    .await;
    v.start().await.unwrap();
    // Kill the agent before the guest reboots (the fake guest reboots after 300 ms).
    agent.kill9();
    let first = dirs.vmm_process("rb");
    let m2 = marker.clone();
    eventually("guest rebooted", || {
        let m2 = m2.clone();
        async move { m2.exists() }
    })
    .await;
    if let Some(p) = first {
        eventually("first VMM gone", || async move { !p.is_alive() }).await;
    }
    let _agent2 = Agent::start(&bus, &dirs, &[]);
    let conn = connect(&bus).await;
    let m = manager(&conn).await;
    let v = vm(&conn, m.get_vm("rb").await.unwrap()).await;
    let v2 = v.clone();
    eventually("restarted after reboot", || {
        let v = v2.clone();
        async move { v.state().await.unwrap() == "running" }
    })
    .await;
    assert!(dirs.vmm_process("rb").unwrap().is_alive());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_reboot_starts_autostart_vms_and_sigterm_leaves_vms_running() {
    let bus = TestBus::start();
    let dirs = NodeDirs::new();
    let mut agent = Agent::start(&bus, &dirs, &[]);
    {
        let conn = connect(&bus).await;
        let m = manager(&conn).await;
        let a = vm(
            &conn,
            m.create_vm("a", &spec(r#","autostart":true"#))
                .await
                .unwrap(),
        )
        .await;
        m.create_vm("b", &spec("")).await.unwrap();
        a.start().await.unwrap();
        a.stop().await.unwrap();
        let c = vm(&conn, m.create_vm("c", &spec("")).await.unwrap()).await;
        c.start().await.unwrap();
    }
    let c_vmm = dirs.vmm_process("c").unwrap();
    // A clean agent stop (SIGTERM, as systemd does) leaves VMs running.
    assert!(agent.terminate().success());
    assert!(c_vmm.is_alive());
    // "Reboot": every VMM is gone and the run directory (a tmpfs) is empty.
    dirs.kill_all_vms();
    eventually("VMM gone", || async move { !c_vmm.is_alive() }).await;
    std::fs::remove_dir_all(dirs.run()).unwrap();
    let _agent = Agent::start(&bus, &dirs, &[]);
    let conn = connect(&bus).await;
    let m = manager(&conn).await;
    let a = vm(&conn, m.get_vm("a").await.unwrap()).await;
    let a2 = a.clone();
    eventually("autostart after boot", || {
        let a = a2.clone();
        async move { a.state().await.unwrap() == "running" }
    })
    .await;
    for name in ["b", "c"] {
        let v = vm(&conn, m.get_vm(name).await.unwrap()).await;
        assert_eq!(v.state().await.unwrap(), "defined", "{name}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vmm_outliving_its_supervisor_is_still_reported_running_until_it_exits() {
    let bus = TestBus::start();
    let dirs = NodeDirs::new();
    let mut agent = Agent::start(&bus, &dirs, &[]);
    let conn = connect(&bus).await;
    let m = manager(&conn).await;
    let v = vm(&conn, m.create_vm("orphan", &spec("")).await.unwrap()).await;
    v.start().await.unwrap();
    let vmm = dirs.vmm_process("orphan").unwrap();
    let supervisor: thvc_nodeagent::procinfo::ProcessId =
        serde_json::from_slice(&std::fs::read(dirs.run().join("vms/orphan/process.json")).unwrap())
            .unwrap();
    // The supervisor is killed while this agent watches it...
    supervisor.signal(libc::SIGKILL).unwrap();
    eventually("supervisor gone", || async move { !supervisor.is_alive() }).await;
    assert!(vmm.is_alive());
    // ...the VM still runs, and is still reported and controllable as running. (Before the
    // fix the agent marked it failed within milliseconds of the supervisor's death; the
    // pause gives a regression the time to show.)
    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    assert_eq!(v.state().await.unwrap(), "running");
    // Also across an agent restart.
    agent.kill9();
    let _agent2 = Agent::start(&bus, &dirs, &[]);
    let conn = connect(&bus).await;
    let m = manager(&conn).await;
    let v = vm(&conn, m.get_vm("orphan").await.unwrap()).await;
    assert_eq!(v.state().await.unwrap(), "running");
    v.stop().await.unwrap();
    assert_eq!(v.state().await.unwrap(), "stopped");
    assert!(!vmm.is_alive());
}

/// The operator's Stop survives an agent SIGKILL in the middle of it: the intent is on disk
/// before the Stop acts, so the next agent finishes the stop (VMM still there) or records it
/// as stopped by the operator (VMM gone meanwhile), and neither VM is autostarted, then or
/// on the agent restart after.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_cut_short_by_agent_sigkill_is_remembered() {
    let bus = TestBus::start();
    let dirs = NodeDirs::new();
    // A VMM that ignores SIGTERM keeps the Stop waiting for the stop timeout.
    let mut agent = Agent::start(&bus, &dirs, &["--stop-timeout", "60"]);
    let conn = connect(&bus).await;
    let m = manager(&conn).await;
    let deaf = spec(r#","autostart":true,"cmdline":"console=ttyS0 fake.ignore_sigterm=1""#);
    let mut paths = Vec::new();
    for name in ["lives", "dies"] {
        let path = m.create_vm(name, &deaf).await.unwrap();
        vm(&conn, path.clone()).await.start().await.unwrap();
        paths.push(path);
    }
    let lives_vmm = dirs.vmm_process("lives").unwrap();
    let dies_vmm = dirs.vmm_process("dies").unwrap();
    // Autostarted by the next agent: once it runs, autostart has had its chance.
    m.create_vm("witness", &spec(r#","autostart":true"#))
        .await
        .unwrap();
    for path in &paths {
        let mut states = StateWatcher::new(&conn, path).await;
        let address = bus.address.clone();
        let path = path.clone();
        tokio::spawn(async move {
            let c = thvc_nodeagent::client::connect(&thvc_nodeagent::client::BusTarget::Address(
                address,
            ))
            .await
            .expect("own connection");
            // Cut short by the agent's death: the result does not matter.
            let _ = vm(&c, path).await.stop().await;
        });
        states.wait_for("stopping").await;
    }
    agent.kill9();
    assert!(
        lives_vmm.is_alive() && dies_vmm.is_alive(),
        "SIGTERM was ignored"
    );
    // One VMM ends while no agent runs.
    dies_vmm.signal(libc::SIGKILL).unwrap();
    let d = dies_vmm;
    eventually("VMM gone", || async move { !d.is_alive() }).await;

    let mut agent2 = Agent::start(&bus, &dirs, &["--stop-timeout", "1"]);
    let conn = connect(&bus).await;
    let m = manager(&conn).await;
    wait_running(&conn, &m, "witness").await;
    let dies = vm(&conn, m.get_vm("dies").await.unwrap()).await;
    assert_eq!(
        dies.state().await.unwrap(),
        "stopped",
        "not failed, not autostarted"
    );
    // The Stop of `lives` is finished: SIGTERM, then SIGKILL after the stop timeout.
    let lives = vm(&conn, m.get_vm("lives").await.unwrap()).await;
    let l = lives.clone();
    eventually("the interrupted stop finished", || {
        let l = l.clone();
        async move { l.state().await.unwrap() == "stopped" }
    })
    .await;
    assert!(!lives_vmm.is_alive());
    assert!(dirs.vmm_process("lives").is_none_or(|p| !p.is_alive()));
    assert!(dirs.vmm_process("dies").is_none_or(|p| !p.is_alive()));

    // Remembered across the next restart too: no autostart of either.
    m.create_vm("witness2", &spec(r#","autostart":true"#))
        .await
        .unwrap();
    agent2.kill9();
    let _agent3 = Agent::start(&bus, &dirs, &[]);
    let conn = connect(&bus).await;
    let m = manager(&conn).await;
    wait_running(&conn, &m, "witness2").await;
    for name in ["lives", "dies"] {
        let v = vm(&conn, m.get_vm(name).await.unwrap()).await;
        assert_eq!(v.state().await.unwrap(), "stopped", "{name}");
        assert!(
            dirs.vmm_process(name).is_none_or(|p| !p.is_alive()),
            "{name}"
        );
    }
}

async fn wait_running(
    conn: &zbus::Connection,
    m: &thvc_nodeagent::client::ManagerProxy<'static>,
    name: &str,
) {
    let v = vm(conn, m.get_vm(name).await.unwrap()).await;
    eventually("autostarted", || {
        let v = v.clone();
        async move { v.state().await.unwrap() == "running" }
    })
    .await;
}
