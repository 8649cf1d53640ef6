//! The metrics file (`--metrics-file`, Prometheus text format for node-exporter's textfile
//! collector): a VM started with a disk and a NIC shows up with its info, running 1, CPU
//! seconds and the device counters its (fake) VMM reports; a VMM that never answers `info`
//! costs only its own series (`thvc_vm_metrics_up 0`) and stalls neither the others nor the
//! bus; a stopped VM reads running 0.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::time::{Duration, Instant};

use common::*;

/// Waits (bounded by TIMEOUT) until the metrics file holds every line in `want` and none
/// of `unwanted`; returns its content. A file that never gets there fails with its last
/// content.
async fn wait_for_metrics(file: &Path, want: &[&str], unwanted: &[&str]) -> String {
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let text = std::fs::read_to_string(file).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        if want.iter().all(|w| lines.contains(w)) && !unwanted.iter().any(|u| text.contains(u)) {
            return text;
        }
        assert!(
            Instant::now() < deadline,
            "timed out waiting for {want:?} without {unwanted:?} in {}:\n{text}",
            file.display()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_file_shows_vms_their_vmm_and_devices_and_survives_a_hung_vmm() {
    let bus = TestBus::start();
    let dirs = NodeDirs::new();
    std::fs::write(dirs.state().join("disks/root.img"), vec![0u8; 4096]).unwrap();
    let file = dirs.root.path().join("metrics/thvc.prom");
    let _agent = Agent::start_with(
        &bus,
        &dirs,
        &[
            "--metrics-file",
            file.to_str().unwrap(),
            "--metrics-interval",
            "1",
        ],
        IN_NEW_NETNS,
    );
    let conn = connect(&bus).await;
    let m = manager(&conn).await;
    m.apply_network(r#"{"links": [{"name": "br0", "kind": "bridge"}]}"#, false)
        .await
        .expect("apply the bridge");

    // A name with a character the label syntax escapes is impossible (VM names are
    // [a-z0-9-]); the text format's escaping is unit-tested in metrics.rs.
    let path = m
        .create_vm(
            "web-1",
            r#"{"vcpus":2,"memory_mib":256,"kernel":"vmlinuz",
                "disks":[{"path":"root.img"}],"nics":[{"bridge":"br0"}]}"#,
        )
        .await
        .unwrap();
    let web = vm(&conn, path.clone()).await;
    let uuid = web.uuid().await.unwrap();
    let path = m
        .create_vm("hung", &spec_cmdline("fake.hang_info=1"))
        .await
        .unwrap();
    let hung = vm(&conn, path).await;
    m.create_vm("idle", &spec("")).await.unwrap();

    // Before any start: every VM, none running, no VMM series.
    wait_for_metrics(
        &file,
        &[
            "thvc_vms{state=\"defined\"} 3",
            "thvc_vms{state=\"running\"} 0",
            &format!("thvc_vm_info{{vm=\"web-1\",uuid=\"{uuid}\",state=\"defined\"}} 1"),
            "thvc_vm_running{vm=\"web-1\"} 0",
        ],
        &["thvc_vm_metrics_up{", "thvc_vm_cpu_seconds_total{"],
    )
    .await;

    web.start().await.unwrap();
    hung.start().await.unwrap();
    let text = wait_for_metrics(
        &file,
        &[
            "thvc_vms{state=\"running\"} 2",
            "thvc_vms{state=\"defined\"} 1",
            &format!("thvc_vm_info{{vm=\"web-1\",uuid=\"{uuid}\",state=\"running\"}} 1"),
            "thvc_vm_vcpus{vm=\"web-1\"} 2",
            "thvc_vm_memory_bytes{vm=\"web-1\"} 268435456",
            "thvc_vm_running{vm=\"web-1\"} 1",
            "thvc_vm_running{vm=\"hung\"} 1",
            "thvc_vm_running{vm=\"idle\"} 0",
            "thvc_vm_metrics_up{vm=\"web-1\"} 1",
            // The hung VMM: its info timed out; the others' series are there all the same.
            "thvc_vm_metrics_up{vm=\"hung\"} 0",
            // The fake VMM's counters (see its module docs), under thvc-vmm's device names.
            "thvc_vm_disk_read_bytes_total{vm=\"web-1\",device=\"virtio-blk0\"} 4096",
            "thvc_vm_disk_written_bytes_total{vm=\"web-1\",device=\"virtio-blk0\"} 512",
            "thvc_vm_disk_requests_total{vm=\"web-1\",device=\"virtio-blk0\"} 10",
            "thvc_vm_disk_errors_total{vm=\"web-1\",device=\"virtio-blk0\"} 0",
            "thvc_vm_net_rx_bytes_total{vm=\"web-1\",device=\"virtio-net0\"} 1000",
            "thvc_vm_net_tx_bytes_total{vm=\"web-1\",device=\"virtio-net0\"} 2000",
            "thvc_vm_net_rx_packets_total{vm=\"web-1\",device=\"virtio-net0\"} 10",
            "thvc_vm_net_tx_packets_total{vm=\"web-1\",device=\"virtio-net0\"} 20",
            "# TYPE thvc_vm_cpu_seconds_total counter",
            "# TYPE thvc_vm_running gauge",
        ],
        &[],
    )
    .await;
    // CPU time and RSS of the real VMM processes (the direct runner reads /proc), also of
    // the hung one: they come from the runner, not from the VMM's answer.
    for vm in ["web-1", "hung"] {
        let cpu = text
            .lines()
            .find_map(|l| l.strip_prefix(&format!("thvc_vm_cpu_seconds_total{{vm=\"{vm}\"}} ")))
            .unwrap_or_else(|| panic!("no CPU seconds of {vm}:\n{text}"));
        assert!(cpu.parse::<f64>().is_ok_and(|s| s >= 0.0), "{cpu}");
        let rss = text
            .lines()
            .find_map(|l| l.strip_prefix(&format!("thvc_vm_memory_rss_bytes{{vm=\"{vm}\"}} ")))
            .unwrap_or_else(|| panic!("no RSS of {vm}:\n{text}"));
        assert!(rss.parse::<u64>().is_ok_and(|b| b > 0), "{rss}");
    }
    // Every family has its HELP and TYPE, once.
    for l in text.lines().filter(|l| !l.starts_with('#')) {
        let name = l.split(['{', ' ']).next().unwrap();
        assert_eq!(
            text.matches(&format!("# HELP {name} ")).count(),
            1,
            "HELP of {name}"
        );
        assert_eq!(
            text.matches(&format!("# TYPE {name} ")).count(),
            1,
            "TYPE of {name}"
        );
    }
    // node-exporter (another user) reads it; nothing else is left in the directory.
    let mode = std::fs::metadata(&file).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o644);

    // The hung VMM stalls no D-Bus call while rounds keep timing out on it.
    for _ in 0..20 {
        let t = Instant::now();
        m.list_vms().await.unwrap();
        assert!(
            t.elapsed() < Duration::from_millis(500),
            "ListVms took {:?}",
            t.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    web.stop().await.unwrap();
    hung.stop().await.unwrap();
    wait_for_metrics(
        &file,
        &[
            "thvc_vm_running{vm=\"web-1\"} 0",
            "thvc_vm_running{vm=\"hung\"} 0",
            &format!("thvc_vm_info{{vm=\"web-1\",uuid=\"{uuid}\",state=\"stopped\"}} 1"),
            "thvc_vms{state=\"stopped\"} 2",
            "thvc_vms{state=\"running\"} 0",
        ],
        &["thvc_vm_metrics_up{", "thvc_vm_cpu_seconds_total{"],
    )
    .await;
    let names: Vec<String> = std::fs::read_dir(file.parent().unwrap())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names, ["thvc.prom"], "no temporary files left");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_default_to_the_run_dir_and_an_empty_path_disables_them() {
    let bus = TestBus::start();
    let dirs = NodeDirs::new();
    let agent = Agent::start(&bus, &dirs, &["--metrics-interval", "1"]);
    let default = dirs.run().join("metrics/thvc.prom");
    wait_for_metrics(&default, &["thvc_vms{state=\"running\"} 0"], &[]).await;
    drop(agent);

    let bus = TestBus::start();
    let dirs = NodeDirs::new();
    let _agent = Agent::start(
        &bus,
        &dirs,
        &["--metrics-file", "", "--metrics-interval", "1"],
    );
    let conn = connect(&bus).await;
    manager(&conn).await.list_vms().await.unwrap();
    // Two intervals and more: nothing was written.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert!(!dirs.run().join("metrics").exists());
}
