//! 50 concurrent CreateVm calls from separate connections: each succeeds or fails cleanly,
//! and the VM table, the D-Bus objects and the files on disk agree afterwards.

mod common;

use std::collections::BTreeSet;

use common::*;
use thvc_nodeagent::client::{self, BusTarget};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_concurrent_creates_from_separate_connections() {
    let bus = TestBus::start();
    let dirs = NodeDirs::new();
    let _agent = Agent::start(&bus, &dirs, &[]);
    // 40 distinct names plus 10 that collide with one of them with another spec: exactly
    // one call per name may win, the rest must get AlreadyExists. (A collision with the
    // same spec is a retry and succeeds: idempotent.rs.)
    let names: Vec<String> = (0..50)
        .map(|i| {
            if i < 40 {
                format!("vm{i:02}")
            } else {
                format!("vm{:02}", i - 40)
            }
        })
        .collect();
    let mut tasks = Vec::new();
    for (i, name) in names.into_iter().enumerate() {
        let vm_spec = if i < 40 {
            spec("")
        } else {
            spec(r#","cmdline":"other""#)
        };
        let address = bus.address.clone();
        tasks.push(tokio::spawn(async move {
            let conn = client::connect(&BusTarget::Address(address))
                .await
                .expect("own connection");
            let m = manager(&conn).await;
            let r = m.create_vm(&name, &vm_spec).await;
            (name, r.map_err(|e| error_name(&e)))
        }));
    }
    let mut ok = Vec::new();
    let mut exists = 0;
    for t in tasks {
        let (name, r) = t.await.unwrap();
        match r {
            Ok(path) => {
                assert_eq!(path.as_str(), thvc_nodeagent::names::vm_object_path(&name));
                ok.push(name);
            }
            Err(e) => {
                assert_eq!(e, "de.thueringen.thvc.node1.Error.AlreadyExists", "{name}");
                exists += 1;
            }
        }
    }
    let ok_set: BTreeSet<String> = ok.iter().cloned().collect();
    assert_eq!(ok.len(), 40, "one success per distinct name");
    assert_eq!(ok_set.len(), 40);
    assert_eq!(exists, 10);

    let conn = connect(&bus).await;
    let m = manager(&conn).await;
    let listed: BTreeSet<String> = vm_names(&m).await.into_iter().collect();
    assert_eq!(listed, ok_set);
    let files: BTreeSet<String> = dirs
        .spec_files()
        .into_iter()
        .map(|f| f.trim_end_matches(".json").to_owned())
        .collect();
    assert_eq!(files, ok_set, "no stray or missing spec files");
    let om = zbus::fdo::ObjectManagerProxy::builder(&conn)
        .destination(client::BUS_NAME)
        .unwrap()
        .path(thvc_nodeagent::names::MANAGER_PATH)
        .unwrap()
        .build()
        .await
        .unwrap();
    // (zbus also lists the interface-less parent node .../vm; count VM objects.)
    let managed = om.get_managed_objects().await.unwrap();
    let vm_objects = managed
        .values()
        .filter(|ifaces| {
            ifaces
                .keys()
                .any(|k| k.as_str() == "de.thueringen.thvc.node1.Vm")
        })
        .count();
    assert_eq!(vm_objects, 40);

    // Concurrent starts and deletes on the same VMs stay consistent too.
    let mut tasks = Vec::new();
    for name in ok_set.iter().take(10).cloned() {
        let address = bus.address.clone();
        tasks.push(tokio::spawn(async move {
            let conn = client::connect(&BusTarget::Address(address)).await.unwrap();
            let m = manager(&conn).await;
            let v = vm(&conn, m.get_vm(&name).await.unwrap()).await;
            let (a, b) = tokio::join!(v.start(), m.delete_vm(&name));
            (name, a.is_ok(), b.is_ok())
        }));
    }
    for t in tasks {
        let (name, started, deleted) = t.await.unwrap();
        assert!(
            started != deleted || !started,
            "{name}: start and delete cannot both win"
        );
        if deleted {
            assert!(!dirs.spec_file(&name).exists());
            assert!(m.get_vm(&name).await.is_err());
        } else {
            let v = vm(&conn, m.get_vm(&name).await.unwrap()).await;
            assert_eq!(v.state().await.unwrap(), "running", "{name}");
            v.stop().await.unwrap();
        }
    }
}
