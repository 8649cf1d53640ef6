//! PullImage against a real HTTP server on 127.0.0.1: verified downloads land under their
//! name, anything else (bad digest, HTTP errors, an agent killed mid-download) leaves no
//! file under the final name.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::sync::mpsc;
use std::time::Duration;

use common::*;
use sha2::{Digest, Sha256};

fn body(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 7 % 251) as u8).collect()
}

/// Serves /good.img and /other.img (the same bytes), /a/vmlinuz (the same) and /b/vmlinuz
/// (half of them), /slow.img (half, then stalls),
/// anything else 404. Returns the base URL and a receiver told when /slow.img stalled.
fn http_server(content: Vec<u8>) -> (String, mpsc::Receiver<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let (stalled_tx, stalled_rx) = mpsc::channel();
    std::thread::spawn(move || {
        for stream in listener.incoming().flatten() {
            let content = content.clone();
            let stalled_tx = stalled_tx.clone();
            std::thread::spawn(move || {
                let mut reader = BufReader::new(&stream);
                let mut request = String::new();
                if reader.read_line(&mut request).is_err() {
                    return;
                }
                loop {
                    let mut h = String::new();
                    if reader.read_line(&mut h).is_err() || h == "\r\n" || h.is_empty() {
                        break;
                    }
                }
                let path = request.split_whitespace().nth(1).unwrap_or("").to_owned();
                let mut w = &stream;
                match path.as_str() {
                    "/good.img" | "/other.img" => {
                        let _ = write!(
                            w,
                            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                            content.len()
                        );
                        let _ = w.write_all(&content);
                    }
                    // Two files of one name in two directories, with different contents.
                    "/a/vmlinuz" | "/b/vmlinuz" => {
                        let half = if path == "/a/vmlinuz" {
                            &content[..]
                        } else {
                            &content[..content.len() / 2]
                        };
                        let _ = write!(
                            w,
                            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                            half.len()
                        );
                        let _ = w.write_all(half);
                    }
                    "/slow.img" => {
                        let _ = write!(
                            w,
                            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                            content.len()
                        );
                        let _ = w.write_all(&content[..content.len() / 2]);
                        let _ = w.flush();
                        let _ = stalled_tx.send(());
                        std::thread::sleep(Duration::from_secs(30));
                    }
                    _ => {
                        let _ = write!(
                            w,
                            "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                        );
                    }
                }
            });
        }
    });
    (base, stalled_rx)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pull_verifies_and_never_leaves_partial_files() {
    let content = body(3 << 20);
    let sha = hex::encode(Sha256::digest(&content));
    let (base, stalled) = http_server(content.clone());
    let bus = TestBus::start();
    let dirs = NodeDirs::new();
    let mut agent = Agent::start(&bus, &dirs, &[]);
    let conn = connect(&bus).await;
    let m = manager(&conn).await;
    let images = dirs.state().join("images");

    let path = m
        .pull_image(&format!("{base}/good.img"), &sha)
        .await
        .expect("pull");
    assert_eq!(path, images.join("good.img").display().to_string());
    assert_eq!(std::fs::read(&path).unwrap(), content);
    let listed = m.list_images().await.unwrap();
    assert!(
        listed.contains(&("good.img".to_owned(), content.len() as u64, sha.clone())),
        "{listed:?}"
    );
    // Pulling the same image again is a no-op that returns the same path.
    assert_eq!(
        m.pull_image(&format!("{base}/good.img"), &sha)
            .await
            .unwrap(),
        path
    );
    // Same name, other digest: refused, the existing image is untouched.
    let e = m
        .pull_image(&format!("{base}/good.img"), &"ab".repeat(32))
        .await
        .unwrap_err();
    assert_eq!(
        error_name(&e),
        "de.thueringen.thvc.node1.Error.AlreadyExists"
    );

    // Wrong digest: nothing under the final name, no leftovers.
    let e = m
        .pull_image(&format!("{base}/other.img"), &"00".repeat(32))
        .await
        .unwrap_err();
    assert_eq!(
        error_name(&e),
        "de.thueringen.thvc.node1.Error.ChecksumMismatch"
    );
    assert!(error_message(&e).contains(&sha), "names the actual digest");
    assert!(!images.join("other.img").exists());
    let partial: Vec<_> = std::fs::read_dir(images.join(".partial"))
        .map(|d| d.flatten().collect())
        .unwrap_or_default();
    assert!(partial.is_empty(), "{partial:?}");

    // HTTP errors and malformed arguments.
    let e = m
        .pull_image(&format!("{base}/missing.img"), &sha)
        .await
        .unwrap_err();
    assert_eq!(error_name(&e), "de.thueringen.thvc.node1.Error.Download");
    assert!(error_message(&e).contains("404"), "{}", error_message(&e));
    for (url, digest) in [
        (format!("{base}/good.img"), "xyz".to_owned()),
        ("ftp://127.0.0.1/x.img".to_owned(), sha.clone()),
        (format!("{base}/"), sha.clone()),
        ("not a url".to_owned(), sha.clone()),
        (format!("{base}/..%2fescape.img"), sha.clone()),
    ] {
        let e = m.pull_image(&url, &digest).await.unwrap_err();
        assert_eq!(
            error_name(&e),
            "de.thueringen.thvc.node1.Error.InvalidArgument",
            "{url} {digest}"
        );
    }

    // The agent dies in the middle of a download: no file under the final name, and the
    // partial download is cleaned up by the next agent.
    let address = bus.address.clone();
    let slow_url = format!("{base}/slow.img");
    let sha2 = sha.clone();
    let pull = tokio::spawn(async move {
        let c =
            thvc_nodeagent::client::connect(&thvc_nodeagent::client::BusTarget::Address(address))
                .await
                .unwrap();
        manager(&c).await.pull_image(&slow_url, &sha2).await
    });
    tokio::task::spawn_blocking(move || stalled.recv_timeout(TIMEOUT).expect("download started"))
        .await
        .unwrap();
    let partial_dir = images.join(".partial");
    let pd = partial_dir.clone();
    eventually("partial file written", || {
        let pd = pd.clone();
        async move {
            std::fs::read_dir(&pd)
                .map(|d| {
                    d.flatten()
                        .any(|e| e.metadata().map(|m| m.len() > 0).unwrap_or(false))
                })
                .unwrap_or(false)
        }
    })
    .await;
    agent.kill9();
    assert!(pull.await.unwrap().is_err());
    assert!(!images.join("slow.img").exists());
    let _agent2 = Agent::start(&bus, &dirs, &[]);
    assert!(!partial_dir.exists() || std::fs::read_dir(&partial_dir).unwrap().next().is_none());
    assert!(!images.join("slow.img").exists());
}

/// Runs `openssl ARGS` in `dir`; fails the test with openssl's stderr.
fn openssl(dir: &std::path::Path, args: &[&str]) {
    let out = std::process::Command::new(require_tool("openssl", "openssl"))
        .current_dir(dir)
        .args(args)
        .output()
        .expect("run openssl");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A CA `<name>-ca.pem` and a server certificate for 127.0.0.1 signed by it
/// (`<name>-server.pem`, key `<name>-server.key`), as an image server would have.
fn make_pki(dir: &std::path::Path, name: &str) {
    let ca_key = format!("{name}-ca.key");
    let ca = format!("{name}-ca.pem");
    let key = format!("{name}-server.key");
    let csr = format!("{name}-server.csr");
    let cert = format!("{name}-server.pem");
    let ext = format!("{name}-server.ext");
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            &ca_key,
            "-out",
            &ca,
            "-days",
            "2",
            "-subj",
            &format!("/CN=thvc test CA {name}"),
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign",
        ],
    );
    openssl(
        dir,
        &[
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            &key,
            "-out",
            &csr,
            "-subj",
            "/CN=127.0.0.1",
        ],
    );
    std::fs::write(
        dir.join(&ext),
        "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n",
    )
    .unwrap();
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            &ca,
            "-CAkey",
            &ca_key,
            "-CAcreateserial",
            "-out",
            &cert,
            "-days",
            "2",
            "-extfile",
            &ext,
        ],
    );
}

/// `openssl s_server -WWW` serving the files of `dir` over TLS on 127.0.0.1; killed on drop.
struct TlsServer {
    child: std::process::Child,
    base: String,
}

impl TlsServer {
    fn start(dir: &std::path::Path, name: &str) -> TlsServer {
        // A free port: bind, note it, release it for s_server (which cannot report one).
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = std::process::Command::new(require_tool("openssl", "openssl"))
            .current_dir(dir)
            .args(["s_server", "-quiet", "-WWW", "-accept"])
            .arg(format!("127.0.0.1:{port}"))
            .args(["-cert", &format!("{name}-server.pem")])
            .args(["-key", &format!("{name}-server.key")])
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("start openssl s_server");
        let server = TlsServer {
            child,
            base: format!("https://127.0.0.1:{port}"),
        };
        let deadline = std::time::Instant::now() + TIMEOUT;
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                std::time::Instant::now() < deadline,
                "openssl s_server did not listen on {port}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        server
    }
}

impl Drop for TlsServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// PullImage over HTTPS (reqwest + rustls, the system's CA store): a server whose CA the
/// agent trusts (SSL_CERT_FILE, which rustls-native-certs reads instead of the system
/// store) serves a verified image; a server with a certificate from another CA is refused
/// with a Download error and leaves nothing behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pull_over_https_verifies_the_server_certificate() {
    let content = body(1 << 20);
    let sha = hex::encode(Sha256::digest(&content));
    let dirs = NodeDirs::new();
    let www = dirs.root.path().join("www");
    std::fs::create_dir(&www).unwrap();
    std::fs::write(www.join("tls.img"), &content).unwrap();
    make_pki(&www, "trusted");
    make_pki(&www, "stranger");
    let trusted = TlsServer::start(&www, "trusted");
    let stranger = TlsServer::start(&www, "stranger");
    let bus = TestBus::start();
    let ca = www.join("trusted-ca.pem");
    let _agent = Agent::start_full(
        &bus,
        &dirs,
        &[],
        &[],
        &[("SSL_CERT_FILE", ca.to_str().unwrap())],
        None,
    );
    let m = manager(&connect(&bus).await).await;
    let images = dirs.state().join("images");

    let e = m
        .pull_image(&format!("{}/tls.img", stranger.base), &sha)
        .await
        .unwrap_err();
    assert_eq!(error_name(&e), "de.thueringen.thvc.node1.Error.Download");
    assert!(
        error_message(&e).contains("certificate") || error_message(&e).contains("UnknownIssuer"),
        "{}",
        error_message(&e)
    );
    assert!(!images.join("tls.img").exists());

    let path = m
        .pull_image(&format!("{}/tls.img", trusted.base), &sha)
        .await
        .expect("pull over https");
    assert_eq!(std::fs::read(&path).unwrap(), content);
    assert!(m.list_images().await.unwrap().contains(&(
        "tls.img".to_owned(),
        content.len() as u64,
        sha
    )));
}

/// Images are named by their URL path, so `.../a/vmlinuz` and `.../b/vmlinuz` do not collide;
/// specs use those names; DeleteImage refuses while a VM uses an image and removes it with
/// its digest otherwise.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn images_are_named_by_url_path_and_deleted_when_unused() {
    let content = body(1 << 20);
    let sha_a = hex::encode(Sha256::digest(&content));
    let sha_b = hex::encode(Sha256::digest(&content[..content.len() / 2]));
    let (base, _) = http_server(content.clone());
    let bus = TestBus::start();
    let dirs = NodeDirs::new();
    let _agent = Agent::start(&bus, &dirs, &[]);
    let conn = connect(&bus).await;
    let m = manager(&conn).await;
    let images = dirs.state().join("images");

    let a = m
        .pull_image(&format!("{base}/a/vmlinuz"), &sha_a)
        .await
        .unwrap();
    let b = m
        .pull_image(&format!("{base}/b/vmlinuz"), &sha_b)
        .await
        .unwrap();
    assert_eq!(a, images.join("a/vmlinuz").display().to_string());
    assert_eq!(b, images.join("b/vmlinuz").display().to_string());
    assert_eq!(std::fs::read(&a).unwrap(), content);
    assert_eq!(std::fs::read(&b).unwrap(), &content[..content.len() / 2]);
    let listed = m.list_images().await.unwrap();
    assert!(
        listed.contains(&("a/vmlinuz".to_owned(), content.len() as u64, sha_a.clone()))
            && listed.contains(&(
                "b/vmlinuz".to_owned(),
                (content.len() / 2) as u64,
                sha_b.clone()
            )),
        "{listed:?}"
    );
    // A single-segment URL keeps its plain name, as before.
    let good = m
        .pull_image(&format!("{base}/good.img"), &sha_a)
        .await
        .unwrap();
    assert_eq!(good, images.join("good.img").display().to_string());

    // A VM names the image as ListImages shows it.
    let kernel_a = r#"{"vcpus":1,"memory_mib":128,"kernel":"a/vmlinuz"}"#;
    m.create_vm("uses-a", kernel_a)
        .await
        .expect("spec naming a/vmlinuz");
    let e = m.delete_image("a/vmlinuz").await.unwrap_err();
    assert_eq!(error_name(&e), "de.thueringen.thvc.node1.Error.InUse");
    assert!(
        error_message(&e).contains("uses-a"),
        "{}",
        error_message(&e)
    );
    assert!(
        images.join("a/vmlinuz").is_file(),
        "refused: nothing removed"
    );

    // Unused: removed with its digest and the directory it leaves empty.
    m.delete_image("b/vmlinuz").await.expect("DeleteImage");
    assert!(!images.join("b").exists());
    assert!(!images.join(".meta/b/vmlinuz.sha256").exists());
    assert!(!images.join(".meta/b").exists());
    let names: Vec<String> = m
        .list_images()
        .await
        .unwrap()
        .into_iter()
        .map(|i| i.0)
        .collect();
    // (vmlinuz is the test kernel every NodeDirs has.)
    assert_eq!(names, ["a/vmlinuz", "good.img", "vmlinuz"]);
    // Gone is NotFound; malformed names are refused before touching anything.
    let e = m.delete_image("b/vmlinuz").await.unwrap_err();
    assert_eq!(error_name(&e), "de.thueringen.thvc.node1.Error.NotFound");
    for bad in [
        "../specs/x.json",
        "/etc/passwd",
        "a/../good.img",
        ".meta/a/vmlinuz.sha256",
        "",
    ] {
        let e = m.delete_image(bad).await.unwrap_err();
        assert_eq!(
            error_name(&e),
            "de.thueringen.thvc.node1.Error.InvalidArgument",
            "{bad:?}"
        );
    }
    assert!(images.join("good.img").is_file());
    // Once the VM is gone, its image may go too.
    m.delete_vm("uses-a").await.unwrap();
    m.delete_image("a/vmlinuz")
        .await
        .expect("DeleteImage after DeleteVm");
    assert!(!images.join("a").exists());
}

/// The digest is written before the image is published: when it cannot be written, the
/// image is not published at all (never an image without its digest), and nothing is left
/// behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_image_is_never_published_without_its_digest() {
    let content = body(1 << 20);
    let sha = hex::encode(Sha256::digest(&content));
    let (base, _) = http_server(content.clone());
    let bus = TestBus::start();
    let dirs = NodeDirs::new();
    let _agent = Agent::start(&bus, &dirs, &[]);
    let conn = connect(&bus).await;
    let m = manager(&conn).await;
    let images = dirs.state().join("images");
    // A directory where the digest file goes: writing the digest fails.
    let blocker = images.join(".meta/good.img.sha256");
    std::fs::create_dir_all(blocker.join("x")).unwrap();
    let e = m
        .pull_image(&format!("{base}/good.img"), &sha)
        .await
        .unwrap_err();
    assert_eq!(error_name(&e), "de.thueringen.thvc.node1.Error.Io", "{e}");
    assert!(
        !images.join("good.img").exists(),
        "published without its digest"
    );
    let partial: Vec<_> = std::fs::read_dir(images.join(".partial"))
        .map(|d| d.flatten().collect())
        .unwrap_or_default();
    assert!(partial.is_empty(), "{partial:?}");
    // With the obstacle gone the same pull succeeds, digest and all.
    std::fs::remove_dir_all(&blocker).unwrap();
    m.pull_image(&format!("{base}/good.img"), &sha)
        .await
        .unwrap();
    assert_eq!(
        std::fs::read_to_string(&blocker).unwrap().trim(),
        sha.as_str()
    );
}

/// Leftovers of an agent that died mid-write are removed from every store at the next
/// start: temporary files of atomic writes (specs, the node's state, disks, run records,
/// images), partial downloads, digests of images never published. Real files stay.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leftover_temporary_files_are_removed_from_every_store_at_start() {
    let bus = TestBus::start();
    let dirs = NodeDirs::new();
    let mut agent = Agent::start(&bus, &dirs, &[]);
    {
        let conn = connect(&bus).await;
        let m = manager(&conn).await;
        m.create_vm("keep", &spec("")).await.unwrap();
        vm(&conn, m.get_vm("keep").await.unwrap())
            .await
            .stop()
            .await
            .unwrap();
    }
    // What the killed agent left (its temporary files name it).
    let dead = agent.pid();
    agent.kill9();
    let state = dirs.state();
    let images = state.join("images");
    let leftovers = [
        state.join(format!(".network.json.tmp.{dead}.0")),
        state.join(format!("vms/.keep.json.tmp.{dead}.1")),
        state.join(format!("disks/.root.img.tmp.{dead}.2")),
        images.join(format!(".vmlinuz.tmp.{dead}.3")),
        images.join(format!("sub/.kernel.tmp.{dead}.4")),
        images.join(format!(".partial/.x.img.tmp.{dead}.5")),
        images.join(".meta/never-published.img.sha256"),
        images.join(format!(".meta/sub/.kernel.sha256.tmp.{dead}.6")),
        dirs.run().join(format!(".booted.tmp.{dead}.7")),
        dirs.run()
            .join(format!("vms/keep/.status.json.tmp.{dead}.8")),
    ];
    for f in &leftovers {
        std::fs::create_dir_all(f.parent().unwrap()).unwrap();
        std::fs::write(f, b"partial").unwrap();
    }
    // A VM supervisor outlives the agent and may be writing a record right now: its
    // temporary file (this test's process stands in for it) is not the dead agent's.
    let live = dirs
        .run()
        .join(format!("vms/keep/.exit.json.tmp.{}.9", std::process::id()));
    std::fs::write(&live, b"partial").unwrap();
    let keep: Vec<std::path::PathBuf> = [
        state.join("vms/keep.json"),
        images.join("vmlinuz"),
        dirs.run().join("vms/keep/status.json"),
        live,
    ]
    .into_iter()
    .collect();
    for f in &keep {
        assert!(f.exists(), "{} exists before the restart", f.display());
    }
    let _agent2 = Agent::start(&bus, &dirs, &[]);
    let conn = connect(&bus).await;
    manager(&conn).await.list_vms().await.unwrap();
    for f in &leftovers {
        assert!(!f.exists(), "{} was not removed", f.display());
    }
    for f in &keep {
        assert!(f.exists(), "{} was removed", f.display());
    }
}
