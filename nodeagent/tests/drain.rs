//! Drain and Undrain with the real agent on a private bus and the fake VMM: a drain refuses
//! new starts at once, shuts running VMs down (stopping one that ignores the power button
//! after the timeout), stays in force across an agent restart (no autostart), and Undrain
//! lifts it. The drain's stops count as the operator's: the control plane may have placed
//! those VMs elsewhere meanwhile, so autostart never brings them back on its own.

mod common;

use std::time::{Duration, Instant};

use common::*;
use futures_util::StreamExt;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_stops_every_vm_refuses_starts_and_survives_a_restart() {
    let bus = TestBus::start();
    let dirs = NodeDirs::new();
    // The agent's own shutdown timeout is far longer than the drain's: the drain's counts.
    let mut agent = Agent::start(
        &bus,
        &dirs,
        &["--shutdown-timeout", "120", "--stop-timeout", "2"],
    );
    let conn = connect(&bus).await;
    let m = manager(&conn).await;
    let polite = vm(&conn, m.create_vm("polite", &spec("")).await.unwrap()).await;
    let deaf = vm(
        &conn,
        m.create_vm("deaf", &spec_cmdline("fake.ignore_shutdown=1"))
            .await
            .unwrap(),
    )
    .await;
    let idle = vm(&conn, m.create_vm("idle", &spec("")).await.unwrap()).await;
    polite.start().await.unwrap();
    deaf.start().await.unwrap();
    // Autostart, never started: a restarted agent would start it, unless drained.
    idle.set_autostart(true).await.unwrap();
    assert!(!m.drained().await.unwrap());

    let mut removed = m.receive_job_removed().await.unwrap();
    let started = Instant::now();
    let job = m.drain(2).await.unwrap();
    assert!(m.drained().await.unwrap(), "drained at once");
    let err = idle.start().await.expect_err("no starts while drained");
    assert!(err.to_string().contains("drained"), "{err}");
    let signal = tokio::time::timeout(Duration::from_secs(20), removed.next())
        .await
        .expect("the drain ends")
        .expect("signal");
    let args = signal.args().unwrap();
    assert_eq!(args.path.as_str(), job.as_str());
    assert_eq!(args.result, "done", "{}", args.message);
    let took = started.elapsed();
    assert!(
        took >= Duration::from_secs(2),
        "the deaf VM got its 2 s before the stop: {took:?}"
    );
    for v in [&polite, &deaf, &idle] {
        let state = v.state().await.unwrap();
        assert!(state == "stopped" || state == "defined", "{state}");
    }

    // A restarted agent finds the node drained and starts nothing, not even autostart VMs.
    agent.kill9();
    let log = dirs.root.path().join("agent2.log");
    let _agent = Agent::start_full(
        &bus,
        &dirs,
        &["--shutdown-timeout", "120", "--stop-timeout", "2"],
        &[],
        &[("RUST_LOG", "info")],
        Some(&log),
    );
    let conn = connect(&bus).await;
    let m = manager(&conn).await;
    assert!(m.drained().await.unwrap(), "still drained after a restart");
    let idle = vm(&conn, m.get_vm("idle").await.unwrap()).await;
    // Recovery decided (and said so) before any autostart would have been started.
    let log2 = log.clone();
    eventually("the agent skipped autostart", || {
        let log = log2.clone();
        async move {
            std::fs::read_to_string(&log)
                .unwrap_or_default()
                .contains("the node is drained: no autostart")
        }
    })
    .await;
    assert_eq!(
        deaf.state().await.unwrap(),
        "stopped",
        "no autostart on a drained node"
    );
    assert!(dirs.vmm_process("deaf").is_none_or(|p| !p.is_alive()));

    m.undrain().await.unwrap();
    assert!(!m.drained().await.unwrap());
    idle.start().await.unwrap();
    assert_eq!(idle.state().await.unwrap(), "running");
    assert!(m.drain(0).await.is_err(), "a zero timeout is refused");
    assert!(
        !m.drained().await.unwrap(),
        "a refused drain changes nothing"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thvcctl_drains_and_undrains() {
    let bus = TestBus::start();
    let dirs = NodeDirs::new();
    let _agent = Agent::start(&bus, &dirs, &[]);
    let conn = connect(&bus).await;
    let m = manager(&conn).await;
    let v = vm(&conn, m.create_vm("web", &spec("")).await.unwrap()).await;
    v.start().await.unwrap();
    let address = bus.address.clone();
    let ctl = move |args: &'static [&'static str]| {
        let address = address.clone();
        async move {
            tokio::task::spawn_blocking(move || {
                std::process::Command::new(THVCCTL)
                    .arg("--bus")
                    .arg(&address)
                    .args(args)
                    .output()
                    .unwrap()
            })
            .await
            .unwrap()
        }
    };
    let out = ctl(&["host", "drain", "--timeout", "10"]).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        v.state().await.unwrap(),
        "stopped",
        "drain waited for the VM"
    );
    let status = ctl(&["status"]).await;
    assert!(String::from_utf8_lossy(&status.stdout).contains("Drained:   yes"));
    let out = ctl(&["host", "undrain"]).await;
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(!m.drained().await.unwrap());
}

/// DrainTo to a node ssh cannot reach (a stand-in ssh that fails as OpenSSH does): the node is
/// drained, every VM keeps running here, and the job fails naming each with what ssh said.
/// (The migration itself, and DrainTo's success, are tested with real guests and a real sshd
/// in tests/vm_guest.rs.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_to_an_unreachable_node_leaves_every_vm_running_here() {
    use std::os::unix::fs::PermissionsExt;
    let bus = TestBus::start();
    let dirs = NodeDirs::new();
    let ssh = dirs.root.path().join("ssh");
    std::fs::write(
        &ssh,
        // ssh -F CONFIG -T -o BatchMode=yes -- TARGET migrate-receive
        "#!/bin/sh\nwhile [ \"$1\" != -- ]; do shift; done\n\
         echo \"ssh: connect to host $2 port 22: Connection refused\" >&2\nexit 255\n",
    )
    .unwrap();
    std::fs::set_permissions(&ssh, std::fs::Permissions::from_mode(0o755)).unwrap();
    let config = dirs.root.path().join("ssh_config");
    std::fs::write(&config, "").unwrap();
    let _agent = Agent::start(
        &bus,
        &dirs,
        &[
            "--ssh",
            ssh.to_str().unwrap(),
            "--migration-ssh-config",
            config.to_str().unwrap(),
        ],
    );
    let conn = connect(&bus).await;
    let m = manager(&conn).await;
    let mut vms = Vec::new();
    for name in ["a", "b"] {
        let v = vm(&conn, m.create_vm(name, &spec("")).await.unwrap()).await;
        v.start().await.unwrap();
        vms.push(v);
    }

    let mut removed = m.receive_job_removed().await.unwrap();
    let job = m.drain_to(30, "node9").await.unwrap();
    assert!(m.drained().await.unwrap(), "drained at once");
    let args = loop {
        let signal = tokio::time::timeout(Duration::from_secs(30), removed.next())
            .await
            .expect("the drain ends")
            .expect("signal");
        let args = signal.args().unwrap();
        if args.path.as_str() == job.as_str() {
            break (args.result.to_string(), args.message.to_string());
        }
    };
    let (result, message) = args;
    assert_eq!(result, "failed", "{message}");
    assert!(message.contains("not every VM moved to node9"), "{message}");
    for name in ["a", "b"] {
        assert!(
            message.contains(&format!("migrating VM {name} to node9"))
                && message.contains("connect to host node9 port 22: Connection refused")
                && message.contains(&format!("(VM {name} is running here)")),
            "{name}: {message}"
        );
    }
    for v in &vms {
        assert_eq!(v.state().await.unwrap(), "running");
    }
    assert!(m.drained().await.unwrap());
    m.undrain().await.unwrap();
}
