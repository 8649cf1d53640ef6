//! Retried imperative calls succeed (issue #18): a control plane that lost a reply calls
//! again and must not get an error for what already happened. Start of a running VM, Stop of
//! a stopped one, CreateVm with the spec the VM has; a different spec is still refused. The
//! `Uuid` property tells one incarnation of a name from the next.

mod common;

use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn start_and_stop_are_idempotent() {
    let bus = TestBus::start();
    let dirs = NodeDirs::new();
    let _agent = Agent::start(&bus, &dirs, &[]);
    let conn = connect(&bus).await;
    let m = manager(&conn).await;
    let v = vm(&conn, m.create_vm("a", &spec("")).await.unwrap()).await;

    // Stop of a VM that never ran: nothing to do, no error.
    v.stop().await.expect("Stop of a defined VM");
    v.shutdown().await.expect("Shutdown of a defined VM");
    assert_eq!(v.state().await.unwrap(), "defined");

    v.start().await.unwrap();
    let vmm = dirs.vmm_process("a").expect("VMM recorded");
    // Start again, twice at once: the same VMM keeps running.
    let (r1, r2) = tokio::join!(v.start(), v.start());
    r1.expect("Start of a running VM");
    r2.expect("Start of a running VM");
    assert_eq!(v.state().await.unwrap(), "running");
    let again = dirs.vmm_process("a").expect("VMM recorded");
    assert_eq!(again.pid, vmm.pid, "no second VMM was launched");
    assert!(vmm.is_alive());

    // Paused is not "running": Start says what to do instead.
    v.pause().await.unwrap();
    let e = v.start().await.unwrap_err();
    assert_eq!(
        error_name(&e),
        "de.thueringen.thvc.node1.Error.InvalidState"
    );
    assert!(
        error_message(&e).contains("Resume"),
        "{}",
        error_message(&e)
    );
    v.resume().await.unwrap();

    v.stop().await.unwrap();
    assert!(!vmm.is_alive());
    let reason = v.state_reason().await.unwrap();
    // Stop (and Shutdown) of a stopped VM: success, state and reason unchanged.
    v.stop().await.expect("Stop of a stopped VM");
    v.shutdown().await.expect("Shutdown of a stopped VM");
    assert_eq!(v.state().await.unwrap(), "stopped");
    assert_eq!(v.state_reason().await.unwrap(), reason);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_with_the_same_spec_returns_the_existing_vm() {
    let bus = TestBus::start();
    let dirs = NodeDirs::new();
    let _agent = Agent::start(&bus, &dirs, &[]);
    let conn = connect(&bus).await;
    let m = manager(&conn).await;
    let nic = r#","nics":[{"bridge":"br0"}]"#;
    let path = m.create_vm("web", &spec(nic)).await.unwrap();
    let v = vm(&conn, path.clone()).await;
    let uuid = v.uuid().await.unwrap();
    let spec_file = std::fs::read(dirs.spec_file("web")).unwrap();
    // (A VM with a NIC cannot start here: no bridge. A running one is retried below.)

    // The retry: same path, same VM (UUID, MAC filled in the same way), untouched files,
    // the running VM left alone. Concurrent retries too.
    let same = spec(nic);
    let (a, b, c) = tokio::join!(
        m.create_vm("web", &same),
        m.create_vm("web", &same),
        m.create_vm("web", &same)
    );
    for r in [a, b, c] {
        assert_eq!(r.expect("CreateVm retry"), path);
    }
    assert_eq!(v.uuid().await.unwrap(), uuid);
    assert_eq!(std::fs::read(dirs.spec_file("web")).unwrap(), spec_file);
    // Naming the UUID it has is the same spec as well.
    let with_uuid = spec(&format!(r#"{nic},"uuid":"{uuid}""#));
    assert_eq!(m.create_vm("web", &with_uuid).await.unwrap(), path);

    // A different spec: still AlreadyExists, and the message says what differs.
    let e = m
        .create_vm("web", &spec(&format!(r#"{nic},"cmdline":"quiet""#)))
        .await
        .unwrap_err();
    assert_eq!(
        error_name(&e),
        "de.thueringen.thvc.node1.Error.AlreadyExists"
    );
    let msg = error_message(&e);
    assert!(
        msg.contains("different spec") && msg.contains("cmdline"),
        "{msg}"
    );
    let other_uuid = spec(&format!(
        r#"{nic},"uuid":"00000000-0000-4000-8000-000000000001""#
    ));
    let msg = error_message(&m.create_vm("web", &other_uuid).await.unwrap_err());
    assert!(msg.contains("uuid"), "{msg}");
    let msg = error_message(&m.create_vm("web", &spec("")).await.unwrap_err());
    assert!(msg.contains("nics"), "{msg}");
    assert_eq!(std::fs::read(dirs.spec_file("web")).unwrap(), spec_file);

    // A running VM is left alone by the retry.
    let run_path = m.create_vm("run", &spec("")).await.unwrap();
    let run = vm(&conn, run_path.clone()).await;
    run.start().await.unwrap();
    let vmm = dirs.vmm_process("run").unwrap();
    assert_eq!(m.create_vm("run", &spec("")).await.unwrap(), run_path);
    assert_eq!(run.state().await.unwrap(), "running");
    assert!(vmm.is_alive());
    run.stop().await.unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recreated_vm_gets_a_new_uuid_unless_the_spec_names_one() {
    let bus = TestBus::start();
    let dirs = NodeDirs::new();
    let _agent = Agent::start(&bus, &dirs, &[]);
    let conn = connect(&bus).await;
    let m = manager(&conn).await;

    let first = vm(&conn, m.create_vm("x", &spec("")).await.unwrap()).await;
    let uuid1 = first.uuid().await.unwrap();
    assert_eq!(uuid1.len(), 36, "{uuid1}");
    m.delete_vm("x").await.unwrap();
    let second = vm(&conn, m.create_vm("x", &spec("")).await.unwrap()).await;
    let uuid2 = second.uuid().await.unwrap();
    assert_eq!(uuid2.len(), 36, "{uuid2}");
    assert_ne!(uuid1, uuid2, "a new incarnation of the name has a new UUID");

    // A client-supplied UUID is kept (normalised to lower case) across incarnations.
    m.delete_vm("x").await.unwrap();
    let given = "6F1C1E4A-1B2C-4D3E-8F90-A1B2C3D4E5F6";
    let third = vm(
        &conn,
        m.create_vm("x", &spec(&format!(r#","uuid":"{given}""#)))
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(third.uuid().await.unwrap(), given.to_ascii_lowercase());
    // The same spec again, with the UUID in either case: the same VM.
    m.create_vm("x", &spec(&format!(r#","uuid":"{given}""#)))
        .await
        .expect("retry with the given UUID");
}
