//! Capacity accounting and the admission of starts, with the real agent on a private bus and
//! the fake VMM: running and autostart VMs hold their vCPUs and memory, memory is never
//! overcommitted, vCPUs up to the configured ratio; a start beyond either is refused with
//! the numbers.

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
