//! Benchmark (not a test): `cargo bench -p thvc-nodeagent --bench dbus_latency`.
//!
//! On a private dbus-daemon with the real agent (and the fake VMM test double):
//! 1. rate of defining VMs (CreateVm) and of starting them (Start until running), one client
//!    and 10 concurrent clients;
//! 2. round-trip latency (p50, p99) of ListVms with 100 VMs defined, side by side with
//!    org.freedesktop.DBus.Peer.Ping to the agent on the same bus (the floor: bus daemon and
//!    zbus dispatch without any agent logic), and the ratio of the two.

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use common::*;
use thvc_nodeagent::client::{self, BusTarget};

const LATENCY_SAMPLES: usize = 3000;

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

async fn measure<F, Fut>(samples: usize, mut f: F) -> Vec<Duration>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    // Warm-up, then measure.
    for _ in 0..samples / 10 {
        f().await;
    }
    let mut v = Vec::with_capacity(samples);
    for _ in 0..samples {
        let t = Instant::now();
        f().await;
        v.push(t.elapsed());
    }
    v.sort();
    v
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let bus = TestBus::start();
    let dirs = NodeDirs::new();
    let _agent = Agent::start(&bus, &dirs, &[]);
    rt.block_on(async {
        let conn = connect(&bus).await;
        let m = manager(&conn).await;

        // --- define and start rates -------------------------------------------------------
        let t = Instant::now();
        for i in 0..50 {
            m.create_vm(&format!("seq{i:03}"), &spec(""))
                .await
                .expect("create");
        }
        let define_seq = 50.0 / t.elapsed().as_secs_f64();
        // Clients connect first; only the calls are timed.
        let mut clients = Vec::new();
        for _ in 0..10 {
            let conn = client::connect(&BusTarget::Address(bus.address.clone()))
                .await
                .unwrap();
            let m = manager(&conn).await;
            clients.push((conn, m));
        }
        let t = Instant::now();
        let mut tasks = Vec::new();
        for (c, (conn, m)) in clients.iter().cloned().enumerate() {
            tasks.push(tokio::spawn(async move {
                let _conn = conn;
                for i in 0..5 {
                    m.create_vm(&format!("par{c:02}x{i}"), &spec(""))
                        .await
                        .expect("create");
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        let define_par = 50.0 / t.elapsed().as_secs_f64();

        let mut seq_vms = Vec::new();
        for i in 0..25 {
            seq_vms.push(vm(&conn, m.get_vm(&format!("seq{i:03}")).await.unwrap()).await);
        }
        let t = Instant::now();
        for v in &seq_vms {
            v.start().await.expect("start");
        }
        let start_seq = 25.0 / t.elapsed().as_secs_f64();
        let mut vm_sets = Vec::new();
        for (c, (conn, m)) in clients.iter().take(5).enumerate() {
            let mut set = Vec::new();
            for i in 0..5 {
                let path = m.get_vm(&format!("par{c:02}x{i}")).await.unwrap();
                set.push(client::vm_proxy(conn, path).await.unwrap());
            }
            vm_sets.push(set);
        }
        let t = Instant::now();
        let mut tasks = Vec::new();
        for set in vm_sets {
            tasks.push(tokio::spawn(async move {
                for v in set {
                    v.start().await.expect("start");
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        let start_par = 25.0 / t.elapsed().as_secs_f64();
        let vms = m.list_vms().await.unwrap();
        assert_eq!(vms.len(), 100);
        let running = vms.iter().filter(|v| v.1 == "running").count();

        // --- latency ------------------------------------------------------------------------
        let peer = zbus::fdo::PeerProxy::builder(&conn)
            .destination(client::BUS_NAME)
            .unwrap()
            .path(thvc_nodeagent::names::MANAGER_PATH)
            .unwrap()
            .build()
            .await
            .unwrap();
        // Interleave rounds so drift affects both alike.
        let mut ping = Vec::new();
        let mut list = Vec::new();
        for _ in 0..3 {
            ping.extend(
                measure(LATENCY_SAMPLES / 3, || async {
                    peer.ping().await.expect("ping");
                })
                .await,
            );
            list.extend(
                measure(LATENCY_SAMPLES / 3, || async {
                    let v = m.list_vms().await.expect("list");
                    assert_eq!(v.len(), 100);
                })
                .await,
            );
        }
        ping.sort();
        list.sort();

        println!();
        println!(
            "thvc-nodeagent D-Bus benchmark (private dbus-daemon, fake VMM, {} CPUs)",
            thvc_nodeagent::hostinfo::cpus()
        );
        println!();
        println!(
            "{:<44} {:>10} {:>10} {:>10}",
            "round trip", "p50 us", "p99 us", "samples"
        );
        println!(
            "{:<44} {:>10.1} {:>10.1} {:>10}",
            "Peer.Ping (floor)",
            us(percentile(&ping, 0.5)),
            us(percentile(&ping, 0.99)),
            ping.len()
        );
        println!(
            "{:<44} {:>10.1} {:>10.1} {:>10}",
            format!("ListVms, 100 VMs ({running} running)"),
            us(percentile(&list, 0.5)),
            us(percentile(&list, 0.99)),
            list.len()
        );
        println!(
            "{:<44} {:>10.2} {:>10.2}",
            "ratio ListVms / Ping",
            us(percentile(&list, 0.5)) / us(percentile(&ping, 0.5)),
            us(percentile(&list, 0.99)) / us(percentile(&ping, 0.99))
        );
        println!();
        println!("{:<44} {:>10}", "rate", "VMs/s");
        println!("{:<44} {:>10.1}", "CreateVm, 1 client (50 VMs)", define_seq);
        println!(
            "{:<44} {:>10.1}",
            "CreateVm, 10 clients (50 VMs)", define_par
        );
        println!(
            "{:<44} {:>10.1}",
            "Start until running, 1 client (25 VMs)", start_seq
        );
        println!(
            "{:<44} {:>10.1}",
            "Start until running, 5 clients (25 VMs)", start_par
        );
    });
}
