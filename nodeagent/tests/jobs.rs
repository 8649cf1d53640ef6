//! Long operations as jobs: StartJob/ShutdownJob/StopJob return a job object at once, the job
//! is listed and served while it runs, and the Manager's JobRemoved tells its result.

mod common;

use std::time::{Duration, Instant};

use common::*;
use futures_util::StreamExt;
use zbus::zvariant::OwnedObjectPath;

const MANAGER: &str = "/de/thueringen/thvc/node1";

async fn job_removed_stream(conn: &zbus::Connection) -> zbus::proxy::SignalStream<'static> {
    let p = zbus::Proxy::new(
        conn,
        "de.thueringen.thvc.node1",
        MANAGER,
        "de.thueringen.thvc.node1.Manager",
    )
    .await
    .unwrap();
    p.receive_signal("JobRemoved").await.unwrap()
}

async fn call_job(conn: &zbus::Connection, vm: &OwnedObjectPath, method: &str) -> OwnedObjectPath {
    let reply = conn
        .call_method(
            Some("de.thueringen.thvc.node1"),
            vm.as_str(),
            Some("de.thueringen.thvc.node1.Vm"),
            method,
            &(),
        )
        .await
        .unwrap();
    reply.body().deserialize().unwrap()
}

async fn next_removed(
    stream: &mut zbus::proxy::SignalStream<'static>,
) -> (u32, OwnedObjectPath, String, String) {
    let msg = tokio::time::timeout(Duration::from_secs(20), stream.next())
        .await
        .expect("JobRemoved within 20 s")
        .expect("signal stream open");
    msg.body().deserialize().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jobs_return_at_once_and_report_their_result() {
    let bus = TestBus::start();
    let dirs = NodeDirs::new();
    let _agent = Agent::start(
        &bus,
        &dirs,
        &["--shutdown-timeout", "30", "--stop-timeout", "2"],
    );
    let conn = connect(&bus).await;
    let m = manager(&conn).await;
    let mut removed = job_removed_stream(&conn).await;
    let path = m
        .create_vm("deaf", &spec_cmdline("fake.ignore_shutdown=1"))
        .await
        .unwrap();
    let deaf = vm(&conn, path.clone()).await;

    // StartJob: a job path, then JobRemoved(done) and the VM runs.
    let job = call_job(&conn, &path, "StartJob").await;
    assert!(
        job.as_str().starts_with("/de/thueringen/thvc/node1/job/"),
        "{job}"
    );
    let (id, p, result, message) = next_removed(&mut removed).await;
    assert_eq!(
        (p.as_str(), result.as_str(), message.as_str()),
        (job.as_str(), "done", "")
    );
    assert!(id > 0);
    assert_eq!(deaf.state().await.unwrap(), "running");

    // ShutdownJob of a guest that ignores the power button: returns at once (the blocking
    // Shutdown would take the 30 s timeout), is listed and served while it waits.
    let t = Instant::now();
    let job = call_job(&conn, &path, "ShutdownJob").await;
    assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
    let jp = zbus::Proxy::new(
        &conn,
        "de.thueringen.thvc.node1",
        job.clone(),
        "de.thueringen.thvc.node1.Job",
    )
    .await
    .unwrap();
    let op: String = jp.get_property("Operation").await.unwrap();
    assert_eq!(op, "shutdown");
    let vm_path: OwnedObjectPath = jp.get_property("Vm").await.unwrap();
    assert_eq!(vm_path, path);
    let list: Vec<(u32, String, String, String, OwnedObjectPath)> = conn
        .call_method(
            Some("de.thueringen.thvc.node1"),
            MANAGER,
            Some("de.thueringen.thvc.node1.Manager"),
            "ListJobs",
            &(),
        )
        .await
        .unwrap()
        .body()
        .deserialize()
        .unwrap();
    assert_eq!(list.len(), 1, "{list:?}");
    assert_eq!(list[0].1, "shutdown");
    assert_eq!(list[0].2, "deaf");
    assert_eq!(list[0].3, "running");
    assert_eq!(list[0].4, job);

    // Replaced by a Stop: the shutdown job ends, done, and its object is gone.
    let stop = call_job(&conn, &path, "StopJob").await;
    let mut ended = Vec::new();
    for _ in 0..2 {
        let (_, p, result, message) = next_removed(&mut removed).await;
        ended.push((p.to_string(), result, message));
    }
    ended.sort();
    let mut want = vec![
        (job.to_string(), "done".to_owned(), String::new()),
        (stop.to_string(), "done".to_owned(), String::new()),
    ];
    want.sort();
    assert_eq!(ended, want);
    assert!(t.elapsed() < Duration::from_secs(20), "{:?}", t.elapsed());
    assert_eq!(deaf.state().await.unwrap(), "stopped");
    let gone = conn
        .call_method(
            Some("de.thueringen.thvc.node1"),
            job.as_str(),
            Some("org.freedesktop.DBus.Properties"),
            "Get",
            &("de.thueringen.thvc.node1.Job", "Operation"),
        )
        .await;
    assert!(gone.is_err(), "the job object is withdrawn");
}

/// thvcctl runs start/stop/shutdown as jobs: it waits for JobRemoved, or with `--no-wait`
/// prints the job path.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thvcctl_waits_for_jobs_or_returns_the_path() {
    let bus = TestBus::start();
    let dirs = NodeDirs::new();
    let _agent = Agent::start(&bus, &dirs, &[]);
    let conn = connect(&bus).await;
    let m = manager(&conn).await;
    let v = vm(&conn, m.create_vm("web", &spec("")).await.unwrap()).await;
    let ctl = |args: &[&str]| {
        let out = std::process::Command::new(THVCCTL)
            .arg("--bus")
            .arg(&bus.address)
            .args(args)
            .output()
            .unwrap();
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (ok, _, err) = ctl(&["vm", "start", "web"]);
    assert!(ok, "{err}");
    // It returned after the job ended: the VM runs now, no job is left.
    assert_eq!(v.state().await.unwrap(), "running");
    assert!(m.list_jobs().await.unwrap().is_empty());

    let mut removed = job_removed_stream(&conn).await;
    let (ok, out, err) = ctl(&["vm", "stop", "web", "--no-wait"]);
    assert!(ok, "{err}");
    let path = out.trim();
    assert!(path.starts_with("/de/thueringen/thvc/node1/job/"), "{out}");
    let (_, p, result, _) = next_removed(&mut removed).await;
    assert_eq!((p.as_str(), result.as_str()), (path, "done"));
    assert_eq!(v.state().await.unwrap(), "stopped");
}
