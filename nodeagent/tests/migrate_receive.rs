//! The receiving end of a live migration (ReceiveVm) with the real agent on a private bus and
//! the fake VMM as the migration target (`--incoming`: it waits for the line `RUN` on the
//! source's stream, and exits 5, as thvc-vmm does, when the stream ends before it). The
//! test plays the source on the other end of the link.
//!
//! What matters here is the agent ending in the middle: a VM that came with a migration and
//! never arrived must not stay behind as a VM of its own (autostart would then boot a second
//! copy of a guest that still runs on its source, on the same shared disk), and one whose
//! fate cannot be known any more must wait for the operator instead of starting.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::Duration;

use common::*;

fn marker(dirs: &NodeDirs, vm: &str) -> PathBuf {
    dirs.state().join("vms").join(format!("{vm}.incoming"))
}

/// An autostart spec: a VM that must never boot by itself from a half-received definition.
fn moving_spec() -> String {
    spec(r#","autostart":true"#)
}

/// Starts ReceiveVm of `name` on the agent; returns the source's end of the link and the
/// call's task.
async fn receive(
    bus: &TestBus,
    name: &'static str,
) -> (UnixStream, tokio::task::JoinHandle<zbus::Result<String>>) {
    let (source, target) = UnixStream::pair().expect("socketpair");
    let conn = connect(bus).await;
    let call = tokio::spawn(async move {
        let m = manager(&conn).await;
        m.receive_vm(name, &moving_spec(), (&target).into()).await
    });
    (source, call)
}

/// Waits until VM `name` is being received: its VMM runs and says `migrating-in`.
async fn wait_receiving(bus: &TestBus, dirs: &NodeDirs, name: &str) {
    let conn = connect(bus).await;
    let m = manager(&conn).await;
    eventually("the VM is being received", || {
        let m = m.clone();
        let conn = conn.clone();
        async move {
            let Ok(path) = m.get_vm(name).await else {
                return false;
            };
            let v = vm(&conn, path).await;
            v.state().await.unwrap_or_default() == "starting"
                && v.state_reason().await.unwrap_or_default() == "receiving a live migration"
                && dirs.vmm_process(name).is_some_and(|p| p.is_alive())
        }
    })
    .await;
    assert!(
        marker(dirs, name).is_file(),
        "the incoming marker is on disk"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_received_guest_runs_here_and_its_marker_goes() {
    let bus = TestBus::start();
    let dirs = NodeDirs::new();
    let _agent = Agent::start(&bus, &dirs, &[]);
    let (source, call) = receive(&bus, "moved").await;
    wait_receiving(&bus, &dirs, "moved").await;

    // The source's last word; the target's VMM answers once the guest runs.
    (&source).write_all(b"RUN\n").unwrap();
    source
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let mut answer = String::new();
    BufReader::new(&source).read_line(&mut answer).unwrap();
    assert_eq!(answer, "RESUMED\n");
    source.shutdown(std::net::Shutdown::Both).unwrap();
    let said = tokio::time::timeout(Duration::from_secs(30), call)
        .await
        .expect("ReceiveVm returns once the source hung up")
        .unwrap()
        .expect("received");
    assert_eq!(said, "VM moved runs here");

    let conn = connect(&bus).await;
    let m = manager(&conn).await;
    let moved = vm(&conn, m.get_vm("moved").await.unwrap()).await;
    assert_eq!(moved.state().await.unwrap(), "running");
    assert!(!marker(&dirs, "moved").exists(), "no marker once it runs");
    assert!(dirs.spec_file("moved").is_file());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_killed_while_receiving_leaves_no_half_received_vm() {
    let bus = TestBus::start();
    let dirs = NodeDirs::new();
    let mut agent = Agent::start(&bus, &dirs, &[]);
    let (source, call) = receive(&bus, "moving").await;
    wait_receiving(&bus, &dirs, "moving").await;
    let vmm = dirs.vmm_process("moving").unwrap();

    agent.kill9();
    let err = call
        .await
        .unwrap()
        .expect_err("the call ends with its agent");
    eprintln!("ReceiveVm as its agent died: {err}");
    // The link ended with the agent: the source knows the guest did not move.
    source
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let mut rest = Vec::new();
    let read = std::io::Read::read_to_end(&mut &source, &mut rest);
    assert!(
        matches!(read, Ok(0)),
        "the source's end sees the link end: {read:?}"
    );

    // Whether its VMM has exited yet (it sees the end of the stream) or still waits when the
    // next agent looks: the VM goes, and nothing boots.
    let _agent = Agent::start(&bus, &dirs, &[]);
    let conn = connect(&bus).await;
    let m = manager(&conn).await;
    let m2 = m.clone();
    eventually("the half-received VM is removed", || {
        let m = m2.clone();
        async move { !vm_names(&m).await.contains(&"moving".to_string()) }
    })
    .await;
    eventually("its VMM is gone", || async move { !vmm.is_alive() }).await;
    assert!(!dirs.spec_file("moving").exists(), "its spec is gone");
    assert!(!marker(&dirs, "moving").exists(), "its marker is gone");
    // The name is free for the next try of the same migration.
    let (source, call) = receive(&bus, "moving").await;
    wait_receiving(&bus, &dirs, "moving").await;
    drop(source);
    let err = call.await.unwrap().expect_err("the source went away");
    assert!(
        error_message(&err).contains("did not arrive"),
        "the VMM's own words: {err}"
    );
    assert!(!vm_names(&m).await.contains(&"moving".to_string()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_receive_cut_short_by_a_node_reboot_waits_for_the_operator() {
    let bus = TestBus::start();
    let dirs = NodeDirs::new();
    let mut agent = Agent::start(&bus, &dirs, &[]);
    let (_source, call) = receive(&bus, "moving").await;
    wait_receiving(&bus, &dirs, "moving").await;
    let vmm = dirs.vmm_process("moving").unwrap();

    // "Reboot": agent and VMM gone, the run directory (a tmpfs) empty. Whether the guest ran
    // here for a moment cannot be told any more.
    agent.kill9();
    let _ = call.await;
    dirs.kill_all_vms();
    eventually("VMM gone", || async move { !vmm.is_alive() }).await;
    std::fs::remove_dir_all(dirs.run()).unwrap();
    let _agent = Agent::start(&bus, &dirs, &[]);
    let conn = connect(&bus).await;
    let m = manager(&conn).await;
    let moving = vm(&conn, m.get_vm("moving").await.unwrap()).await;
    let reason = moving.state_reason().await.unwrap();
    assert_eq!(moving.state().await.unwrap(), "failed", "{reason}");
    assert!(
        reason.contains("cut short") && reason.contains("delete it here"),
        "{reason}"
    );
    // Autostart is on, yet it stays down. (The agent spawns its autostarts before it takes
    // its bus name; a fake VMM's start takes milliseconds, so half a second is ample.)
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(moving.state().await.unwrap(), "failed");
    assert!(dirs.vmm_process("moving").is_none(), "nothing booted");
    assert!(marker(&dirs, "moving").is_file(), "the marker stays");

    // The operator's answer: it still runs on its source, so it goes here.
    m.delete_vm("moving").await.unwrap();
    assert!(!marker(&dirs, "moving").exists(), "the marker went with it");
    assert!(!dirs.spec_file("moving").exists());
}
