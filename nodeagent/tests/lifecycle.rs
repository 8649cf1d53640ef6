//! How the agent reacts to what VMMs do: power-off, crash, reboot (exit 3), reboot loops,
//! guests ignoring the power button, VMMs ignoring SIGTERM, VMMs without an API socket, and
//! the bounded console log.

mod common;

use std::time::{Duration, Instant};

use common::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guest_power_off_crash_and_reboot() {
    let bus = TestBus::start();
    let dirs = NodeDirs::new();
    let _agent = Agent::start(&bus, &dirs, &[]);
    let conn = connect(&bus).await;
    let m = manager(&conn).await;

    // Power-off (exit 0) without anyone asking: stopped, with the reason.
    let path = m
        .create_vm("off", &spec_cmdline("fake.exit=0 fake.exit_after_ms=300"))
        .await
        .unwrap();
    let off = vm(&conn, path.clone()).await;
    let mut w = StateWatcher::new(&conn, &path).await;
    off.start().await.unwrap();
    w.wait_for("stopped").await;
    assert_eq!(off.state_reason().await.unwrap(), "the guest powered off");

    // Crash (exit 1): failed, with the reason.
    let path = m
        .create_vm("crash", &spec_cmdline("fake.exit=1 fake.exit_after_ms=300"))
        .await
        .unwrap();
    let crash = vm(&conn, path.clone()).await;
    let mut w = StateWatcher::new(&conn, &path).await;
    crash.start().await.unwrap();
    assert_eq!(
        w.wait_for("failed").await,
        ["starting", "running", "failed"]
    );
    let reason = crash.state_reason().await.unwrap();
    assert!(reason.contains("status 1"), "{reason}");
    // A failed VM can be started again (and fails again), or deleted.
    m.delete_vm("crash").await.unwrap();

    // Killed by a signal behind the agent's back: failed, naming the signal.
    let path = m.create_vm("killed", &spec("")).await.unwrap();
    let killed = vm(&conn, path.clone()).await;
    killed.start().await.unwrap();
    let mut w = StateWatcher::new(&conn, &path).await;
    let vmm = dirs.vmm_process("killed").expect("VMM recorded");
    vmm.signal(libc::SIGKILL).unwrap();
    w.wait_for("failed").await;
    assert!(killed.state_reason().await.unwrap().contains("signal 9"));

    // Reboot (exit 3): the agent starts a new VMM and the VM is running again.
    let marker = dirs.root.path().join("rebooted");
    let path = m
        .create_vm(
            "reboot",
            &spec_cmdline(&format!("fake.reboot_once={}", marker.display())),
        )
        .await
        .unwrap();
    let reboot = vm(&conn, path.clone()).await;
    let mut w = StateWatcher::new(&conn, &path).await;
    reboot.start().await.unwrap();
    let seen = w.wait_count(4).await;
    assert_eq!(
        seen[..4],
        ["starting", "running", "starting", "running"],
        "{seen:?}"
    );
    assert!(marker.exists(), "the first run rebooted");
    assert_eq!(reboot.state().await.unwrap(), "running");
    assert!(dirs.vmm_process("reboot").expect("VMM").is_alive());

    // A guest that reboots forever is given up on.
    let path = m
        .create_vm("loop", &spec_cmdline("fake.exit=3 fake.exit_after_ms=0"))
        .await
        .unwrap();
    let looping = vm(&conn, path.clone()).await;
    let mut w = StateWatcher::new(&conn, &path).await;
    let _ = looping.start().await;
    w.wait_for("failed").await;
    let reason = looping.state_reason().await.unwrap();
    assert!(reason.contains("rebooted more than"), "{reason}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_and_stop_escalate_when_ignored() {
    let bus = TestBus::start();
    let dirs = NodeDirs::new();
    let _agent = Agent::start(
        &bus,
        &dirs,
        &["--shutdown-timeout", "1", "--stop-timeout", "1"],
    );
    let conn = connect(&bus).await;
    let m = manager(&conn).await;

    // The guest ignores the power button: after the shutdown timeout the VMM is stopped.
    let path = m
        .create_vm("deaf", &spec_cmdline("fake.ignore_shutdown=1"))
        .await
        .unwrap();
    let deaf = vm(&conn, path).await;
    deaf.start().await.unwrap();
    let vmm = dirs.vmm_process("deaf").unwrap();
    let t = Instant::now();
    deaf.shutdown().await.unwrap();
    assert!(
        t.elapsed() >= Duration::from_secs(1),
        "waited for the guest first"
    );
    assert_eq!(deaf.state().await.unwrap(), "stopped");
    assert!(!vmm.is_alive());

    // The VMM ignores SIGTERM: Stop kills it.
    let path = m
        .create_vm("stubborn", &spec_cmdline("fake.ignore_sigterm=1"))
        .await
        .unwrap();
    let stubborn = vm(&conn, path).await;
    stubborn.start().await.unwrap();
    let vmm = dirs.vmm_process("stubborn").unwrap();
    stubborn.stop().await.unwrap();
    assert_eq!(stubborn.state().await.unwrap(), "stopped");
    assert!(!vmm.is_alive());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vmm_without_api_socket_runs_but_pause_and_info_say_why_not() {
    let bus = TestBus::start();
    let dirs = NodeDirs::new();
    let _agent = Agent::start(&bus, &dirs, &[]);
    let conn = connect(&bus).await;
    let m = manager(&conn).await;
    let path = m
        .create_vm("noapi", &spec_cmdline("fake.no_api=1"))
        .await
        .unwrap();
    let v = vm(&conn, path).await;
    v.start().await.unwrap();
    assert_eq!(v.state().await.unwrap(), "running");
    assert!(v.state_reason().await.unwrap().contains("no API socket"));
    for e in [
        v.pause().await.unwrap_err(),
        v.info().await.map(|_| ()).unwrap_err(),
    ] {
        assert_eq!(error_name(&e), "de.thueringen.thvc.node1.Error.Vmm");
        assert!(
            error_message(&e).contains("no API socket"),
            "{}",
            error_message(&e)
        );
    }
    // Shutdown falls back to stopping the VMM.
    v.shutdown().await.unwrap();
    assert_eq!(v.state().await.unwrap(), "stopped");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn console_log_is_bounded_and_offsets_stay_valid() {
    let bus = TestBus::start();
    let dirs = NodeDirs::new();
    let _agent = Agent::start(&bus, &dirs, &[]);
    let conn = connect(&bus).await;
    let m = manager(&conn).await;
    let total: u64 = 4 << 20;
    let path = m
        .create_vm(
            "chatty",
            &spec_cmdline(&format!("fake.console_bytes={total}")),
        )
        .await
        .unwrap();
    let v = vm(&conn, path).await;
    v.start().await.unwrap();
    let log = dirs.log().join("chatty/console.log");
    // The agent trims in the background; wait until the window start moved.
    let v2 = v.clone();
    eventually("console trim", || {
        let v = v2.clone();
        async move {
            let (data, next) = v.read_console(0).await.unwrap();
            next - data.len() as u64 > 0
        }
    })
    .await;
    let size = std::fs::metadata(&log).unwrap().len();
    assert!(size > total, "apparent size keeps every offset: {size}");
    let blocks = std::os::unix::fs::MetadataExt::blocks(&std::fs::metadata(&log).unwrap()) * 512;
    assert!(
        blocks
            <= thvc_nodeagent::console::KEEP_BYTES
                + thvc_nodeagent::console::TRIM_SLACK
                + (1 << 20),
        "disk use is bounded: {blocks} bytes allocated"
    );
    // Reading from 0 resumes at the window start; reading on to the end works in 64 KiB steps.
    let (first, mut off) = v.read_console(0).await.unwrap();
    assert!(!first.is_empty() && first.len() <= 64 << 10);
    assert!(first.iter().all(|&b| b != 0), "no hole bytes");
    loop {
        let (d, n) = v.read_console(off).await.unwrap();
        if d.is_empty() {
            break;
        }
        off = n;
    }
    assert_eq!(off, size);
    v.stop().await.unwrap();
}
