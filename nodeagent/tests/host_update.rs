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

/// FailedVersions: a boot-counted UKI with no tries left on the ESP (`--esp`) is a version
/// systemd-boot rolled back from; the boot on which the agent first saw it is kept in the
/// state directory, across agent restarts and later boots, and dropped with the file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_versions_come_from_the_esp_and_keep_their_time() {
    let bus = TestBus::start();
    let dirs = NodeDirs::new();
    let os_release = dirs.root.path().join("os-release");
    std::fs::write(
        &os_release,
        "ID=debian\nIMAGE_ID=thvc-host\nIMAGE_VERSION=20261205.170000\n",
    )
    .unwrap();
    let esp = dirs.root.path().join("esp");
    let linux = esp.join("EFI/Linux");
    std::fs::create_dir_all(&linux).unwrap();
    for name in [
        "thvc-host_20261205.170000.efi",
        "thvc-host_20261205.180000+0-3.efi",
        "thvc-host_20261206.000000+2-1.efi",
        "other-os_1+0-3.efi",
    ] {
        std::fs::write(linux.join(name), "MZ").unwrap();
    }
    let log = dirs.root.path().join("agent.log");
    let args = [
        "--os-release",
        os_release.to_str().unwrap(),
        "--esp",
        esp.to_str().unwrap(),
    ];
    let mut agent = Agent::start_full(&bus, &dirs, &args, &[], &[], Some(&log));
    let conn = connect(&bus).await;
    let m = manager(&conn).await;
    let failed = m.failed_versions().await.unwrap();
    assert_eq!(failed.len(), 1, "{failed:?}");
    let (version, tries, since) = failed[0].clone();
    assert_eq!((version.as_str(), tries), ("20261205.180000", 3));
    let btime: u64 = std::fs::read_to_string("/proc/stat")
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("btime "))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert_eq!(since, btime * 1_000_000, "this boot");
    let logged = std::fs::read_to_string(&log).unwrap();
    assert_eq!(
        logged
            .matches(
                "version 20261205.180000 failed its 3 boot attempts; \
                 the node came back on 20261205.170000"
            )
            .count(),
        1,
        "warned once:\n{logged}"
    );

    // thvcctl status: in the JSON and a line for people.
    let thvcctl = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_thvcctl"))
            .args(["--bus", bus.address.as_str()])
            .args(args)
            .output()
            .expect("run thvcctl");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let v: serde_json::Value = serde_json::from_str(&thvcctl(&["--json", "status"])).unwrap();
    assert_eq!(v["failed_versions"][0]["version"], "20261205.180000");
    assert_eq!(v["failed_versions"][0]["tries"], 3);
    assert_eq!(v["failed_versions"][0]["since_usec"], since);
    let text = v["failed_versions"][0]["since"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(text.len() == 20 && text.ends_with('Z'), "{text}");
    let human = thvcctl(&["status"]);
    let line = human
        .lines()
        .find(|l| l.starts_with("Failed:"))
        .unwrap_or_else(|| panic!("no Failed line:\n{human}"));
    assert_eq!(
        line,
        format!(
            "Failed:    20261205.180000 (3 boot attempts; rolled back at the boot of {} UTC)",
            text.trim_end_matches('Z').replace('T', " ")
        )
    );

    // A restart keeps the time (and does not warn again); so does a record from an
    // earlier boot.
    agent.terminate();
    let record = dirs.state().join("failed-versions.json");
    assert!(record.exists());
    let _agent = Agent::start_full(&bus, &dirs, &args, &[], &[], Some(&log));
    assert_eq!(m.failed_versions().await.unwrap(), failed);
    drop(_agent);
    let earlier = r#"{"versions":{"20261205.180000":{"since_usec":1796497331000000}}}"#;
    std::fs::write(&record, earlier).unwrap();
    let _agent = Agent::start_full(&bus, &dirs, &args, &[], &[], Some(&log));
    assert_eq!(
        m.failed_versions().await.unwrap(),
        [("20261205.180000".to_owned(), 3, 1_796_497_331_000_000)]
    );
    assert!(thvcctl(&["status"]).contains(
        "Failed:    20261205.180000 (3 boot attempts; rolled back at the boot of \
             2026-12-05 19:02:11 UTC)"
    ));
    let logged = std::fs::read_to_string(&log).unwrap();
    assert_eq!(logged.matches("failed its 3 boot attempts").count(), 1);

    // The failed UKI removed: nothing failed, the record goes, status prints no line.
    std::fs::remove_file(linux.join("thvc-host_20261205.180000+0-3.efi")).unwrap();
    assert!(m.failed_versions().await.unwrap().is_empty());
    assert!(!record.exists());
    assert!(!thvcctl(&["status"]).contains("Failed:"));
    let v: serde_json::Value = serde_json::from_str(&thvcctl(&["--json", "status"])).unwrap();
    assert_eq!(v["failed_versions"], serde_json::json!([]));

    // No ESP at all: an empty list, not an error.
    std::fs::remove_dir_all(&esp).unwrap();
    assert!(m.failed_versions().await.unwrap().is_empty());
}
