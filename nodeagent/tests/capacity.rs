//! Capacity accounting and the admission of starts, with the real agent on a private bus and
//! the fake VMM: running and autostart VMs hold their vCPUs and memory, memory is never
//! overcommitted, vCPUs up to the configured ratio; a start beyond either is refused with
//! the numbers. Creating an autostart VM and setting `Autostart` are admitted the same way.

mod common;

use common::*;

fn spec_sized(vcpus: u64, memory_mib: u64) -> String {
    format!(r#"{{"vcpus":{vcpus},"memory_mib":{memory_mib},"kernel":"vmlinuz"}}"#)
}

async fn prop(conn: &zbus::Connection, name: &str) -> u64 {
    let p = zbus::Proxy::new(
        conn,
        "de.thueringen.thvc.node1",
        "/de/thueringen/thvc/node1",
        "de.thueringen.thvc.node1.Manager",
    )
    .await
    .unwrap();
    p.get_property::<u64>(name).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn starts_beyond_memory_or_vcpu_capacity_are_refused() {
    let bus = TestBus::start();
    let dirs = NodeDirs::new();
    // 512 MiB for VMs, and vCPUs: host CPUs x 4.
    let reserve = (host_memory_mib() - 512).to_string();
    let _agent = Agent::start(&bus, &dirs, &["--memory-reserve-mib", &reserve]);
    let conn = connect(&bus).await;
    let m = manager(&conn).await;
    assert_eq!(prop(&conn, "MemoryCapacityMib").await, 512);
    let vcpu_capacity = prop(&conn, "VcpuCapacity").await;
    assert_eq!(
        vcpu_capacity,
        4 * u64::from(std::thread::available_parallelism().unwrap().get() as u32)
    );
    assert!(prop(&conn, "ImageStoreFreeBytes").await > 0);
    assert!(prop(&conn, "DiskStoreFreeBytes").await > 0);

    let a = vm(&conn, m.create_vm("a", &spec_sized(1, 256)).await.unwrap()).await;
    let b = vm(&conn, m.create_vm("b", &spec_sized(1, 256)).await.unwrap()).await;
    let c = vm(&conn, m.create_vm("c", &spec_sized(1, 128)).await.unwrap()).await;
    a.start().await.unwrap();
    assert_eq!(prop(&conn, "AllocatedMemoryMib").await, 256);
    // b stopped but autostart: it holds its memory too.
    b.set_autostart(true).await.unwrap();
    assert_eq!(prop(&conn, "AllocatedMemoryMib").await, 512);
    let err = c.start().await.expect_err("no memory left");
    let text = err.to_string();
    assert!(text.contains("NoCapacity"), "{text}");
    assert!(
        text.contains("needs 128 MiB") && text.contains("512 MiB"),
        "{text}"
    );
    assert_eq!(
        c.state().await.unwrap(),
        "defined",
        "a refused start changes nothing"
    );
    b.set_autostart(false).await.unwrap();
    c.start().await.unwrap();
    assert_eq!(prop(&conn, "AllocatedMemoryMib").await, 384);
    a.stop().await.unwrap();
    assert_eq!(prop(&conn, "AllocatedMemoryMib").await, 128);

    c.stop().await.unwrap();
    // vCPUs: VMs (of at most 32 vCPUs each) up to the whole allowance start, one more
    // vCPU does not.
    let mut left = vcpu_capacity - prop(&conn, "AllocatedVcpus").await;
    let mut i = 0;
    while left > 0 {
        let n = left.min(32);
        let name = format!("big{i}");
        let big = vm(&conn, m.create_vm(&name, &spec_sized(n, 64)).await.unwrap()).await;
        big.start().await.unwrap();
        left -= n;
        i += 1;
    }
    assert_eq!(prop(&conn, "AllocatedVcpus").await, vcpu_capacity);
    let one = vm(&conn, m.create_vm("one", &spec_sized(1, 64)).await.unwrap()).await;
    let err = one.start().await.expect_err("no vCPUs left").to_string();
    assert!(err.contains("NoCapacity") && err.contains("vCPUs"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_starts_cannot_both_take_the_last_memory() {
    let bus = TestBus::start();
    let dirs = NodeDirs::new();
    let reserve = (host_memory_mib() - 256).to_string();
    let _agent = Agent::start(&bus, &dirs, &["--memory-reserve-mib", &reserve]);
    let conn = connect(&bus).await;
    let m = manager(&conn).await;
    let mut vms = Vec::new();
    for name in ["x", "y", "z"] {
        vms.push(vm(&conn, m.create_vm(name, &spec_sized(1, 200)).await.unwrap()).await);
    }
    let results = futures_util::future::join_all(vms.iter().map(|v| v.start())).await;
    let started = results.iter().filter(|r| r.is_ok()).count();
    assert_eq!(started, 1, "{results:?}");
    for r in results.iter().filter_map(|r| r.as_ref().err()) {
        assert!(r.to_string().contains("NoCapacity"), "{r}");
    }
}

fn spec_autostart(vcpus: u64, memory_mib: u64, autostart: bool) -> String {
    format!(
        r#"{{"vcpus":{vcpus},"memory_mib":{memory_mib},"kernel":"vmlinuz","autostart":{autostart}}}"#
    )
}

/// An autostart VM holds capacity while it is down, so creating one or setting `Autostart` is
/// admitted like a start: refused with NoCapacity when memory (never overcommitted) or
/// vCPUs (by the ratio) would be exceeded, and nothing is changed then.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn autostart_is_admitted_like_a_start() {
    let bus = TestBus::start();
    let dirs = NodeDirs::new();
    // 512 MiB for VMs; one vCPU per host CPU.
    let reserve = (host_memory_mib() - 512).to_string();
    let _agent = Agent::start(
        &bus,
        &dirs,
        &["--memory-reserve-mib", &reserve, "--vcpu-overcommit", "1"],
    );
    let conn = connect(&bus).await;
    let m = manager(&conn).await;
    let cpus = std::thread::available_parallelism().unwrap().get() as u64;
    assert_eq!(prop(&conn, "VcpuCapacity").await, cpus);

    // CreateVm with autostart takes its memory at once...
    let a = vm(
        &conn,
        m.create_vm("a", &spec_autostart(1, 256, true))
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(prop(&conn, "AllocatedMemoryMib").await, 256);
    // ...so one that does not fit is refused, as its start would be, and not created.
    let err = m
        .create_vm("b", &spec_autostart(1, 384, true))
        .await
        .expect_err("384 MiB more do not fit in 512");
    assert_eq!(
        error_name(&err),
        "de.thueringen.thvc.node1.Error.NoCapacity"
    );
    let create_refusal = error_message(&err);
    assert!(
        create_refusal.contains("needs 384 MiB")
            && create_refusal.contains("256 MiB of the node's 512 MiB"),
        "{create_refusal}"
    );
    assert_eq!(dirs.spec_files(), vec!["a.json"]);
    assert_eq!(vm_names(&m).await, vec!["a"]);

    // Without autostart it holds nothing until it starts; its start and setting Autostart
    // are refused alike.
    let b = vm(
        &conn,
        m.create_vm("b", &spec_autostart(1, 384, false))
            .await
            .unwrap(),
    )
    .await;
    let start_refusal = error_message(&b.start().await.expect_err("does not fit"));
    assert_eq!(start_refusal, create_refusal);
    let err = b.set_autostart(true).await.expect_err("does not fit");
    // A property setter answers with standard errors only: LimitsExceeded, with the
    // agent's error and the same message.
    assert_eq!(
        error_name(&err),
        "org.freedesktop.DBus.Error.LimitsExceeded"
    );
    assert_eq!(
        error_message(&err),
        format!("de.thueringen.thvc.node1.Error.NoCapacity: {start_refusal}")
    );
    assert!(!b.autostart().await.unwrap());
    let stored: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dirs.spec_file("b")).unwrap()).unwrap();
    assert_eq!(stored["autostart"], false, "the refusal changed nothing");
    assert_eq!(prop(&conn, "AllocatedMemoryMib").await, 256);

    // Once a lets go, b fits; setting Autostart again on an autostart VM takes nothing more.
    a.set_autostart(false).await.unwrap();
    b.set_autostart(true).await.unwrap();
    b.set_autostart(true).await.unwrap();
    assert_eq!(prop(&conn, "AllocatedMemoryMib").await, 384);
    let err = a
        .set_autostart(true)
        .await
        .expect_err("256 MiB more do not fit");
    assert_eq!(
        error_name(&err),
        "org.freedesktop.DBus.Error.LimitsExceeded"
    );

    // vCPUs: b holds one of the host's CPUs, so a VM with all of them cannot autostart.
    let err = m
        .create_vm("wide", &spec_autostart(cpus, 64, true))
        .await
        .expect_err("one vCPU too many");
    assert_eq!(
        error_name(&err),
        "de.thueringen.thvc.node1.Error.NoCapacity"
    );
    assert!(error_message(&err).contains("vCPUs"), "{err}");
    let wide = vm(
        &conn,
        m.create_vm("wide", &spec_autostart(cpus, 64, false))
            .await
            .unwrap(),
    )
    .await;
    let err = wide
        .set_autostart(true)
        .await
        .expect_err("one vCPU too many");
    assert!(error_message(&err).contains("vCPUs"), "{err}");
    assert_eq!(prop(&conn, "AllocatedVcpus").await, 1);
}

/// A start and the creation of an autostart VM at the same time cannot both take the last
/// free memory: the creation is reserved under the lock starts are admitted under.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_start_and_an_autostart_create_cannot_both_take_the_last_memory() {
    let bus = TestBus::start();
    let dirs = NodeDirs::new();
    let reserve = (host_memory_mib() - 256).to_string();
    let _agent = Agent::start(&bus, &dirs, &["--memory-reserve-mib", &reserve]);
    let conn = connect(&bus).await;
    let m = manager(&conn).await;
    for round in 0..5 {
        let x = format!("x{round}");
        let y = format!("y{round}");
        let vx = vm(&conn, m.create_vm(&x, &spec_sized(1, 200)).await.unwrap()).await;
        let y_spec = spec_autostart(1, 200, true);
        let (started, created) = tokio::join!(vx.start(), m.create_vm(&y, &y_spec));
        assert!(
            started.is_ok() != created.is_ok(),
            "round {round}: exactly one fits: {started:?} {created:?}"
        );
        for e in [started.err(), created.err()].into_iter().flatten() {
            assert_eq!(error_name(&e), "de.thueringen.thvc.node1.Error.NoCapacity");
        }
        assert_eq!(prop(&conn, "AllocatedMemoryMib").await, 200);
        // Free it for the next round.
        vx.stop().await.unwrap();
        if m.get_vm(&y).await.is_ok() {
            m.delete_vm(&y).await.unwrap();
        }
        assert_eq!(prop(&conn, "AllocatedMemoryMib").await, 0);
    }
}
