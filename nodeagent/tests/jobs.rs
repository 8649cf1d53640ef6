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
    // Its State becomes running with a PropertiesChanged (subscribed before the call).
    let rule = zbus::MatchRule::builder()
        .msg_type(zbus::message::Type::Signal)
        .interface("org.freedesktop.DBus.Properties")
        .unwrap()
        .member("PropertiesChanged")
        .unwrap()
        .path_namespace("/de/thueringen/thvc/node1/job")
        .unwrap()
        .build();
    let mut changes = zbus::MessageStream::for_match_rule(rule, &conn, None)
        .await
        .unwrap();
    let t = Instant::now();
    let job = call_job(&conn, &path, "ShutdownJob").await;
    assert!(t.elapsed() < Duration::from_secs(2), "{:?}", t.elapsed());
    loop {
        let msg = tokio::time::timeout(Duration::from_secs(10), changes.next())
            .await
            .expect("State PropertiesChanged within 10 s")
            .unwrap()
            .unwrap();
        if msg.header().path().map(|p| p.as_str()) != Some(job.as_str()) {
            continue;
        }
        let (iface, changed, _): (
            String,
            std::collections::HashMap<String, zbus::zvariant::OwnedValue>,
            Vec<String>,
        ) = msg.body().deserialize().unwrap();
        assert_eq!(iface, "de.thueringen.thvc.node1.Job");
        let state: String = changed["State"].clone().try_into().unwrap();
        assert_eq!(state, "running");
        break;
    }
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

/// An HTTP server for /paced.img whose body the test releases chunk by chunk (one chunk per
/// message on the returned sender; dropping the sender stalls the rest forever).
fn paced_server(content: Vec<u8>, chunk: usize) -> (String, std::sync::mpsc::Sender<()>) {
    use std::io::{BufRead, BufReader, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/paced.img", listener.local_addr().unwrap());
    let (go_tx, go_rx) = std::sync::mpsc::channel::<()>();
    std::thread::spawn(move || {
        let Some(Ok(stream)) = listener.incoming().next() else {
            return;
        };
        let mut reader = BufReader::new(&stream);
        loop {
            let mut line = String::new();
            if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                break;
            }
        }
        let mut w = &stream;
        let _ = write!(
            w,
            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
            content.len()
        );
        for piece in content.chunks(chunk) {
            if go_rx.recv().is_err() {
                // Stalled: keep the connection open until the client gives up.
                std::thread::sleep(Duration::from_secs(60));
                return;
            }
            let _ = w.write_all(piece);
            let _ = w.flush();
        }
    });
    (url, go_tx)
}

async fn call_manager(
    conn: &zbus::Connection,
    method: &str,
    url: &str,
    sha: &str,
) -> OwnedObjectPath {
    let reply = conn
        .call_method(
            Some("de.thueringen.thvc.node1"),
            MANAGER,
            Some("de.thueringen.thvc.node1.Manager"),
            method,
            &(url, sha),
        )
        .await
        .unwrap();
    reply.body().deserialize().unwrap()
}

async fn job_progress(conn: &zbus::Connection, job: &OwnedObjectPath) -> (u64, u64) {
    let p = zbus::Proxy::new(
        conn,
        "de.thueringen.thvc.node1",
        job.as_str(),
        "de.thueringen.thvc.node1.Job",
    )
    .await
    .unwrap();
    p.get_property::<(u64, u64)>("Progress").await.unwrap()
}

/// Polls the job's Progress until `done` bytes are in (the server sent exactly that much).
async fn wait_progress(conn: &zbus::Connection, job: &OwnedObjectPath, done: u64, total: u64) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let now = job_progress(conn, job).await;
        if now == (done, total) {
            return;
        }
        assert!(now.0 <= done, "more than was sent: {now:?}");
        assert!(
            Instant::now() < deadline,
            "progress stuck at {now:?}, want {done}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// PullImageJob returns at once; its Progress follows the bytes the server sends (released
/// chunk by chunk by the test), then JobRemoved says done and the image is in the store.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_image_pull_job_shows_its_progress() {
    use sha2::{Digest, Sha256};
    let bus = TestBus::start();
    let dirs = NodeDirs::new();
    let _agent = Agent::start(&bus, &dirs, &[]);
    let conn = connect(&bus).await;
    let content: Vec<u8> = (0..3 * 65536).map(|i| (i % 251) as u8).collect();
    let sha = hex::encode(Sha256::digest(&content));
    let (url, go) = paced_server(content.clone(), 65536);
    let mut removed = job_removed_stream(&conn).await;
    let job = call_manager(&conn, "PullImageJob", &url, &sha).await;
    let total = content.len() as u64;
    for sent in 1..=2u64 {
        go.send(()).unwrap();
        wait_progress(&conn, &job, sent * 65536, total).await;
    }
    // The last chunk ends the job (and its object): JobRemoved tells the rest.
    go.send(()).unwrap();
    let (_, path, result, message) = next_removed(&mut removed).await;
    assert_eq!((path, result.as_str()), (job, "done"), "{message}");
    let m = manager(&conn).await;
    let images = m.list_images().await.unwrap();
    assert!(
        images
            .iter()
            .any(|(name, size, digest)| name == "paced.img" && *size == total && *digest == sha),
        "{images:?}"
    );
}

/// Cancel stops a pull in the middle: JobRemoved says canceled and nothing is stored.
/// VM jobs refuse Cancel.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_image_pull_job_can_be_canceled_and_stores_nothing() {
    let bus = TestBus::start();
    let dirs = NodeDirs::new();
    let _agent = Agent::start(
        &bus,
        &dirs,
        &["--shutdown-timeout", "30", "--stop-timeout", "2"],
    );
    let conn = connect(&bus).await;
    let content = vec![7u8; 4 * 65536];
    let sha = "ab".repeat(32);
    let (url, go) = paced_server(content.clone(), 65536);
    let mut removed = job_removed_stream(&conn).await;
    let job = call_manager(&conn, "PullImageJob", &url, &sha).await;
    go.send(()).unwrap();
    wait_progress(&conn, &job, 65536, content.len() as u64).await;
    cancel_job(&conn, job.as_str()).await.unwrap();
    let (_, path, result, message) = next_removed(&mut removed).await;
    assert_eq!((path, result.as_str()), (job, "canceled"), "{message}");
    drop(go);
    let m = manager(&conn).await;
    let images = m.list_images().await.unwrap();
    assert!(!images.iter().any(|i| i.0 == "paced.img"), "{images:?}");
    let store = walk(&dirs.state().join("images"));
    assert!(
        store.iter().any(|p| p.ends_with("vmlinuz")),
        "not the store: {store:?}"
    );
    let leftovers: Vec<_> = store
        .into_iter()
        .filter(|p| !p.ends_with("vmlinuz"))
        .collect();
    assert!(leftovers.is_empty(), "files left behind: {leftovers:?}");

    // A VM job cannot be canceled: a Shutdown job waiting for a guest that ignores the power
    // button refuses, and a Stop ends it.
    let v = m
        .create_vm("deaf", &spec_cmdline("fake.ignore_shutdown=1"))
        .await
        .unwrap();
    vm(&conn, v.clone()).await.start().await.unwrap();
    let shutdown = call_job(&conn, &v, "ShutdownJob").await;
    let err = cancel_job(&conn, shutdown.as_str())
        .await
        .expect_err("a VM job refuses Cancel");
    assert!(err.to_string().contains("cannot be canceled"), "{err}");
    vm(&conn, v).await.stop().await.unwrap();
    let (_, path, result, _) = next_removed(&mut removed).await;
    assert_eq!((path, result.as_str()), (shutdown, "done"));
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            let p = e.path();
            if p.is_dir() {
                out.extend(walk(&p));
            } else {
                out.push(p);
            }
        }
    }
    out
}

/// Text a child process writes, read on a thread as it comes.
struct Captured(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl Captured {
    fn start(mut from: impl std::io::Read + Send + 'static) -> Captured {
        let buf = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let sink = buf.clone();
        std::thread::spawn(move || {
            let mut chunk = [0u8; 4096];
            while let Ok(n) = from.read(&mut chunk) {
                if n == 0 {
                    break;
                }
                sink.lock().unwrap().extend_from_slice(&chunk[..n]);
            }
        });
        Captured(buf)
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap()).into_owned()
    }

    /// Waits until `needle` has been written (fails after TIMEOUT with what was).
    async fn wait_for(&self, needle: &str) {
        let deadline = Instant::now() + TIMEOUT;
        while !self.text().contains(needle) {
            assert!(
                Instant::now() < deadline,
                "{needle:?} never appeared in {:?}",
                self.text()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// 4 MiB served 1 MiB at a time as the test says: (url, sha256, go).
fn paced_image() -> (String, String, std::sync::mpsc::Sender<()>) {
    use sha2::{Digest, Sha256};
    let content = vec![3u8; 4 << 20];
    let sha = hex::encode(Sha256::digest(&content));
    let (url, go) = paced_server(content, 1 << 20);
    (url, sha, go)
}

/// Waits for `child` on a blocking thread; returns its status.
async fn exit_of(mut child: std::process::Child) -> std::process::ExitStatus {
    tokio::task::spawn_blocking(move || child.wait().unwrap())
        .await
        .unwrap()
}

/// `thvcctl image pull` runs the pull as a job and prints the image's path when it is done.
/// Not on a terminal, its progress is a line every 5 s (the first at once): the test holds
/// the download at a quarter until a line says so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thvcctl_pulls_an_image_as_a_job() {
    let bus = TestBus::start();
    let dirs = NodeDirs::new();
    let _agent = Agent::start(&bus, &dirs, &[]);
    let (url, sha, go) = paced_image();
    go.send(()).unwrap();
    let mut child = std::process::Command::new(THVCCTL)
        .arg("--bus")
        .arg(&bus.address)
        .args(["image", "pull", &url, &sha])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = Captured::start(child.stdout.take().unwrap());
    let stderr = Captured::start(child.stderr.take().unwrap());
    stderr
        .wait_for(&format!(
            "pulling {url}: [#####               ]  25% 1.0/4.0 MiB\n"
        ))
        .await;
    for _ in 0..3 {
        go.send(()).unwrap();
    }
    let status = exit_of(child).await;
    let progress = stderr.text();
    assert!(status.success(), "{progress}");
    let lines: Vec<&str> = progress.lines().collect();
    assert!(
        lines.len() >= 2,
        "a line at once, then every 5 s: {progress:?}"
    );
    assert!(
        lines
            .iter()
            .all(|l| l.starts_with(&format!("pulling {url}: "))),
        "{progress:?}"
    );
    assert!(
        !progress.contains('\r'),
        "no bar off a terminal: {progress:?}"
    );
    let out = stdout.text();
    let path = std::path::PathBuf::from(out.trim());
    assert!(path.ends_with("paced.img"), "{out}");
    assert_eq!(std::fs::metadata(&path).unwrap().len(), 4 << 20);
}

/// On a terminal (`script` runs thvcctl on a pty) the progress is a bar redrawn in place
/// every 200 ms: the test lets the download go a quarter at a time and waits for each
/// quarter's bar; the line ends when the pull does and the image's path follows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thvcctl_draws_a_progress_bar_on_a_terminal() {
    let script = require_tool("script", "bsdutils");
    let bus = TestBus::start();
    let dirs = NodeDirs::new();
    let _agent = Agent::start(&bus, &dirs, &[]);
    let (url, sha, go) = paced_image();
    let command = format!(
        "'{THVCCTL}' --bus '{}' image pull '{url}' '{sha}'",
        bus.address
    );
    let mut child = std::process::Command::new(script)
        .args(["--quiet", "--return", "--command", &command, "/dev/null"])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // The pty carries stdout and stderr alike.
    let terminal = Captured::start(child.stdout.take().unwrap());
    let errors = Captured::start(child.stderr.take().unwrap());
    // The size is known from Content-Length before any byte arrives.
    terminal
        .wait_for("\r[                    ]   0% 0.0/4.0 MiB")
        .await;
    for bar in [
        "\r[#####               ]  25% 1.0/4.0 MiB",
        "\r[##########          ]  50% 2.0/4.0 MiB",
        "\r[###############     ]  75% 3.0/4.0 MiB",
    ] {
        go.send(()).unwrap();
        terminal.wait_for(bar).await;
    }
    go.send(()).unwrap();
    let status = exit_of(child).await;
    let shown = terminal.text();
    assert!(status.success(), "{shown:?} {}", errors.text());
    assert!(
        !shown.contains("pulling "),
        "no progress lines on a terminal: {shown:?}"
    );
    // The bar's line is ended, then the path is printed on a line of its own.
    let last = shown.trim_end().rsplit("\r\n").next().unwrap_or("");
    assert!(last.ends_with("paced.img"), "{shown:?}");
    assert!(
        shown.contains("MiB\r\n"),
        "the bar's line is ended: {shown:?}"
    );
}
