//! Manager.Update and Manager.Reboot with the real agent on a private bus, the fake VMM and
//! a host helper script (`--host-helper`, the contract of crate::host): an update check and
//! install report the helper's version, a refused update carries the helper's reason, a
//! second update while one runs is Busy, a reboot shuts every VM down (stopping the one that
//! ignores the power button) before the helper is asked to reboot and refuses starts from
//! then on; a failed reboot allows starts again. Without a helper both are refused at
//! the call, and no VM is touched.

mod common;

use std::path::{Path, PathBuf};
use std::time::Duration;

use common::*;
use futures_util::StreamExt;

const HELPER: &str = r#"#!/bin/bash
set -euo pipefail
dir=$(dirname "$0")
echo "$*" >> "$dir/calls"
case $1 in
check|install)
    url=${2:-}
    case $url in
    *bad*) echo "Verifying SHA256SUMS: BAD signature" >&2; exit 1 ;;
    *none*) exit 0 ;;
    *slow*) while [ ! -e "$dir/gate" ]; do sleep 0.05; done ;;
    esac
    echo 20261205.2 ;;
reboot)
    [ ! -e "$dir/reboot-fails" ] || { echo "Failed to start reboot.target: Access denied" >&2; exit 1; } ;;
esac
"#;

fn helper(dirs: &NodeDirs) -> PathBuf {
    use std::os::unix::fs::PermissionsExt;
    let dir = dirs.root.path().join("helper");
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("host-helper");
    std::fs::write(&path, HELPER).unwrap();
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
    path
}

fn calls(helper: &Path) -> Vec<String> {
    std::fs::read_to_string(helper.with_file_name("calls"))
        .unwrap_or_default()
        .lines()
        .map(str::to_owned)
        .collect()
}

async fn job_end(
    removed: &mut thvc_nodeagent::client::JobRemovedStream,
    job: &zbus::zvariant::OwnedObjectPath,
) -> (String, String) {
    loop {
        let signal = tokio::time::timeout(Duration::from_secs(30), removed.next())
            .await
            .expect("the job ends")
            .expect("signal");
        let args = signal.args().unwrap();
        if args.path.as_str() == job.as_str() {
            return (args.result.to_string(), args.message.to_string());
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn update_and_reboot_go_through_the_host_helper() {
    let bus = TestBus::start();
    let dirs = NodeDirs::new();
    let helper = helper(&dirs);
    let h = helper.display().to_string();
    let _agent = Agent::start(
        &bus,
        &dirs,
        &[
            "--host-helper",
            &h,
            "--shutdown-timeout",
            "120",
            "--stop-timeout",
            "2",
        ],
    );
    let conn = connect(&bus).await;
    let m = manager(&conn).await;
    let mut removed = m.receive_job_removed().await.unwrap();

    // Check, install, nothing newer, refused: the helper's answer is the job's.
    let job = m.update("http://10.0.2.2:8080/update", true).await.unwrap();
    let (result, message) = job_end(&mut removed, &job).await;
    assert_eq!(result, "done");
    assert_eq!(
        message,
        "20261205.2 is available at http://10.0.2.2:8080/update"
    );
    let job = m.update("", false).await.unwrap();
    let (result, message) = job_end(&mut removed, &job).await;
    assert_eq!(result, "done");
    assert!(
        message.starts_with("installed 20261205.2 from the configured update server"),
        "{message}"
    );
    let job = m.update("http://x/none", false).await.unwrap();
    let (_, message) = job_end(&mut removed, &job).await;
    assert!(message.starts_with("no newer version"), "{message}");
    let job = m.update("http://x/bad", false).await.unwrap();
    let (result, message) = job_end(&mut removed, &job).await;
    assert_eq!(result, "failed");
    assert_eq!(message, "Verifying SHA256SUMS: BAD signature");
    assert_eq!(
        calls(&helper),
        [
            "check http://10.0.2.2:8080/update",
            "install",
            "install http://x/none",
            "install http://x/bad"
        ]
    );
    // A URL the helper must never see is refused at the call.
    let err = m.update("http://x/a b", false).await.unwrap_err();
    assert!(error_name(&err).ends_with("InvalidArgument"), "{err}");

    // One update at a time; the bus answers meanwhile.
    let slow = m.update("http://x/slow", false).await.unwrap();
    let err = m.update("http://x/other", true).await.unwrap_err();
    assert!(error_name(&err).ends_with("Busy"), "{err}");
    assert!(m.list_vms().await.is_ok());
    std::fs::write(helper.with_file_name("gate"), "").unwrap();
    let (result, _) = job_end(&mut removed, &slow).await;
    assert_eq!(result, "done");

    // thvcctl host update: the job's message, or its failure as the error.
    let thvcctl = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_thvcctl"))
            .args(["--bus", bus.address.as_str(), "host", "update"])
            .args(args)
            .output()
            .expect("run thvcctl");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).trim().to_owned(),
            String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        )
    };
    let (ok, out, err) = thvcctl(&["--check", "http://u/1"]);
    assert!(ok, "{err}");
    assert_eq!(out, "20261205.2 is available at http://u/1");
    let (ok, _, err) = thvcctl(&["http://u/bad"]);
    assert!(!ok);
    assert!(
        err.contains("update failed: Verifying SHA256SUMS: BAD signature"),
        "{err}"
    );

    // A reboot whose helper fails: the VMs are down, the job says why, starts work again.
    let polite = vm(&conn, m.create_vm("polite", &spec("")).await.unwrap()).await;
    let deaf = vm(
        &conn,
        m.create_vm("deaf", &spec_cmdline("fake.ignore_shutdown=1"))
            .await
            .unwrap(),
    )
    .await;
    polite.start().await.unwrap();
    deaf.start().await.unwrap();
    std::fs::write(helper.with_file_name("reboot-fails"), "").unwrap();
    let job = m.reboot(2).await.unwrap();
    let (result, message) = job_end(&mut removed, &job).await;
    assert_eq!(result, "failed");
    assert_eq!(message, "Failed to start reboot.target: Access denied");
    assert_eq!(polite.state().await.unwrap(), "stopped");
    assert_eq!(deaf.state().await.unwrap(), "stopped");
    polite
        .start()
        .await
        .expect("starts allowed after a failed reboot");

    // The reboot: every VM down first (the deaf one stopped after 2 s), then the helper.
    std::fs::remove_file(helper.with_file_name("reboot-fails")).unwrap();
    deaf.start().await.unwrap();
    let job = m.reboot(2).await.unwrap();
    let err = m.reboot(2).await.unwrap_err();
    assert!(error_name(&err).ends_with("Busy"), "{err}");
    let (result, message) = job_end(&mut removed, &job).await;
    assert_eq!(result, "done", "{message}");
    assert_eq!(polite.state().await.unwrap(), "stopped");
    assert_eq!(deaf.state().await.unwrap(), "stopped");
    assert_eq!(calls(&helper).last().map(String::as_str), Some("reboot"));
    assert_eq!(
        calls(&helper).iter().filter(|c| *c == "reboot").count(),
        2,
        "one failed and one good reboot"
    );
    let err = polite.start().await.expect_err("no starts while rebooting");
    assert!(err.to_string().contains("rebooting"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_host_helper_update_and_reboot_are_refused() {
    let bus = TestBus::start();
    let dirs = NodeDirs::new();
    let _agent = Agent::start(&bus, &dirs, &[]);
    let conn = connect(&bus).await;
    let m = manager(&conn).await;
    let running = vm(&conn, m.create_vm("running", &spec("")).await.unwrap()).await;
    running.start().await.unwrap();
    for err in [
        m.update("", true).await.unwrap_err(),
        m.reboot(5).await.unwrap_err(),
    ] {
        assert!(error_name(&err).ends_with("InvalidState"), "{err}");
        assert!(error_message(&err).contains("no host control"), "{err}");
    }
    assert_eq!(
        running.state().await.unwrap(),
        "running",
        "a reboot that cannot happen shuts nothing down"
    );
    assert!(running.start().await.is_ok(), "starts still allowed");
}
