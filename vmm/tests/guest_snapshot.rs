//! Snapshots against a real guest on real KVM (run in the test VM, see guest_boot.rs): a
//! running guest that counts on its console and on its disk is paused, written into a
//! snapshot, its VMM killed; a new VMM restores it and the guest goes on counting where it
//! was, on the console and on the disk, with an uptime that continues; a VM of another shape
//! is refused.

mod common;

use std::fs::File;
use std::io::{BufRead, BufReader, Read};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use common::{tempdir, Guest, Transport};
use serde_json::Value;
use thvc_vmm::api::send_with_files;

/// A console line `THVC-COUNT=<n> up=<seconds>`.
fn count(line: &str) -> Option<(u64, f64)> {
    let rest = line.split("THVC-COUNT=").nth(1)?;
    let (n, up) = rest.trim().split_once(" up=")?;
    Some((n.parse().ok()?, up.parse().ok()?))
}

fn counts(guest: &Guest) -> Vec<(u64, f64)> {
    guest.seen().iter().filter_map(|l| count(l)).collect()
}

/// The guest went on where it was: no second boot, one count after the other.
fn assert_continued(guest: &mut Guest) {
    guest.collect();
    assert!(
        !guest.seen().iter().any(|l| l.contains("THVC-GUEST-READY")),
        "the guest did not boot again"
    );
    let numbers: Vec<u64> = counts(guest).iter().map(|c| c.0).collect();
    assert!(
        numbers.windows(2).all(|w| w[1] == w[0] + 1),
        "one count after the other: {numbers:?}"
    );
}

fn wait_count_above(guest: &mut Guest, n: u64) -> (u64, f64) {
    let line = guest.wait_until(&format!("THVC-COUNT above {n}"), |l| {
        count(l).is_some_and(|(c, _)| c > n)
    });
    count(&line).expect("count line")
}

/// One request with `files` sent along; the whole answer.
fn request_with_files(socket: &Path, request: &str, files: &[&dyn AsRawFd]) -> Value {
    request_with_files_line(socket, &format!("{{\"request\":\"{request}\"}}"), files)
}

fn request_with_files_line(socket: &Path, request: &str, files: &[&dyn AsRawFd]) -> Value {
    let stream = UnixStream::connect(socket).expect("API socket");
    stream
        .set_read_timeout(Some(Duration::from_secs(300)))
        .expect("timeout");
    let line = format!("{request}\n");
    let sent = send_with_files(&stream, line.as_bytes(), files).expect("send");
    assert_eq!(sent, line.len());
    let mut answer = String::new();
    BufReader::new(stream)
        .read_line(&mut answer)
        .expect("answer");
    if answer.is_empty() {
        // The VMM ended: the caller's assertion shows its stderr.
        return serde_json::json!({"ok": false, "error": "no answer: the VMM closed the connection"});
    }
    serde_json::from_str(&answer).unwrap_or_else(|e| panic!("answer {answer:?}: {e}"))
}

/// The count the guest last wrote to its disk (`count=<n>` in the first sector).
fn disk_count(disk: &Path) -> u64 {
    let mut sector = [0u8; 512];
    File::open(disk)
        .expect("disk")
        .read_exact(&mut sector)
        .expect("first sector");
    let text = String::from_utf8_lossy(&sector);
    text.trim_matches(char::from(0))
        .trim()
        .strip_prefix("count=")
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no count on the disk: {text:?}"))
}

fn create(path: &Path) -> File {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

#[test]
#[ignore = "needs KVM that boots Linux: runs in the test VM via integration/run-tests"]
fn a_snapshot_restored_in_a_new_vmm_continues_the_guest() {
    snapshot_and_restore(Transport::Mmio);
}

/// The same on virtio-pci: configuration space, moved BARs, MSI-X table and vectors.
#[test]
#[ignore = "needs KVM that boots Linux: runs in the test VM via integration/run-tests"]
fn a_snapshot_of_a_virtio_pci_guest_continues_too() {
    snapshot_and_restore(Transport::Pci);
}

fn snapshot_and_restore(transport: Transport) {
    let tmp = tempdir(&format!("snapshot-{transport:?}"));
    let dir = tmp.path();
    let (disk, disk_arg) = common::blank_disk(dir);
    let socket = dir.join("vm.sock");
    let snapshot = dir.join("snap");
    std::fs::create_dir_all(&snapshot).expect("snapshot dir");
    // boot_on adds the transport; a restoring VMM gets it with the rest of the shape.
    let shape = ["--cpus", "2", "--memory", "256"];
    let mut args = vec!["--api-socket", socket.to_str().expect("utf-8")];
    args.extend_from_slice(&["--disk", &disk_arg]);
    let mut guest = Guest::boot_on(
        transport,
        "thvc.action=counter",
        &[&shape[..], &args[..]].concat(),
    );
    wait_count_above(&mut guest, 10);

    let state_path = snapshot.join("state.json");
    let memory_path = snapshot.join("memory");
    let (state, memory) = (create(&state_path), create(&memory_path));
    let running = request_with_files(&socket, "snapshot", &[&state, &memory]);
    assert_eq!(running["ok"], false, "{running}");
    assert!(
        running["error"].as_str().unwrap_or("").contains("pause"),
        "{running}"
    );
    let down = std::time::Instant::now();
    assert_eq!(common::api_call(&socket, "pause")["state"], "paused");
    let one = request_with_files(&socket, "snapshot", &[&state]);
    assert!(
        one["error"]
            .as_str()
            .unwrap_or("")
            .contains("takes two files"),
        "{one}"
    );
    let taken = request_with_files(&socket, "snapshot", &[&state, &memory]);
    assert_eq!(taken["ok"], true, "{taken}");
    let memory_bytes = taken["result"]["memory_bytes"].as_u64().expect("bytes");
    assert!(
        memory_bytes > 1 << 20,
        "the guest's memory is in it: {taken}"
    );
    assert!(
        memory_bytes < 200 << 20,
        "untouched memory stays out of it (sparse): {taken}"
    );
    assert_eq!(
        std::fs::metadata(&memory_path).expect("memory").len(),
        256 << 20
    );
    // What the guest had done when it was paused; a line cut by the pause never ended.
    guest.collect();
    let (before, up_before) = *counts(&guest).last().expect("counts before");
    let disk_before = disk_count(&disk);
    // The guest prints a count, then writes it: the pause may fall in between.
    assert!(
        disk_before + 1 >= before,
        "{disk_before} on disk, {before} on the console"
    );
    guest.child.kill().expect("kill the VMM");
    let (_, console, _) = guest.finish();

    // A VM of another shape is refused before anything runs.
    let refused = Guest::start(&[
        "--restore",
        snapshot.to_str().expect("utf-8"),
        "--memory",
        "512",
        "--cpus",
        "2",
    ]);
    let (status, _, stderr) = refused.finish();
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("512 MiB here"), "{stderr}");
    assert!(
        stderr.contains("devices [virtio-blk0, virtio-rng0], here [virtio-rng0]"),
        "{stderr}"
    );

    let socket2 = dir.join("vm2.sock");
    let mut restore_args = vec![
        "--restore",
        snapshot.to_str().expect("utf-8"),
        "--api-socket",
        socket2.to_str().expect("utf-8"),
        "--disk",
        &disk_arg,
    ];
    restore_args.extend_from_slice(&shape);
    restore_args.extend_from_slice(transport.args());
    let mut restored = Guest::start_with(&restore_args, |cmd| {
        cmd.env("RUST_LOG", "info");
    });
    let (next, up_next) = wait_count_above(&mut restored, 0);
    eprintln!(
        "paused at count {before} (up {up_before} s, {disk_before} on disk), snapshot {taken}; \
         restored: count {next} (up {up_next} s)"
    );
    assert!(
        next == before + 1 || next == before + 2,
        "the count goes on from {before}: {next}\nconsole before:\n{console}"
    );
    // Never back; forward by at most the time the VM did not run (most restores here
    // continue where the guest was, some jump by that time: see vmm/README.md).
    assert!(
        up_next >= up_before && up_next < up_before + 5.0 + down.elapsed().as_secs_f64(),
        "uptime {up_before} s before, {up_next} s after a {:?} break",
        down.elapsed()
    );
    wait_count_above(&mut restored, next + 10);
    let info = common::api_call(&socket2, "info");
    assert_eq!(
        info["restored_from"],
        snapshot.to_str().expect("utf-8"),
        "{info}"
    );
    assert_eq!(common::api_call(&socket2, "pause")["state"], "paused");
    let disk_after = disk_count(&disk);
    assert!(
        disk_after > disk_before,
        "the restored guest writes its disk: {disk_before} -> {disk_after}"
    );
    assert_continued(&mut restored);
    common::api_call(&socket2, "stop");
    let (status, _, stderr) = restored.finish();
    assert_eq!(status.code(), Some(0), "{stderr}");
}

/// Waits until `path` exists (a VMM that just started binds it).
fn wait_for_socket(path: &Path, vmm: &mut Guest) {
    let deadline = std::time::Instant::now() + common::BOOT_TIMEOUT;
    while !path.exists() {
        assert!(
            vmm.child.try_wait().expect("wait").is_none(),
            "the target VMM ended before it listened"
        );
        assert!(
            std::time::Instant::now() < deadline,
            "{} never appeared",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A target that takes the first part of a migration and then dies: reads HELLO, answers
/// READY, reads a few memory messages, hangs up.
fn dying_target(listener: std::os::unix::net::UnixListener) -> std::thread::JoinHandle<usize> {
    std::thread::spawn(move || {
        use thvc_vmm::persist::migration::{expect, read_header, write_message, HELLO, READY};
        let (mut stream, _) = listener.accept().expect("source connects");
        expect(&mut stream, HELLO).expect("hello");
        write_message(&mut stream, READY, &[b"{\"ok\":true}"]).expect("ready");
        let mut messages = 0;
        for _ in 0..3 {
            let (_, len) = read_header(&mut stream).expect("a memory message");
            std::io::copy(&mut (&mut stream).take(len), &mut std::io::sink()).expect("payload");
            messages += 1;
        }
        messages
    })
}

fn migrate(socket: &Path, target: &Path) -> Value {
    let stream = UnixStream::connect(target).expect("connect to the target");
    request_with_files(socket, "migrate", &[&stream])
}

#[test]
#[ignore = "needs KVM that boots Linux: runs in the test VM via integration/run-tests"]
fn live_migration_moves_a_running_guest_to_another_vmm() {
    let tmp = tempdir("migration");
    let dir = tmp.path();
    let (disk, disk_arg) = common::blank_disk(dir);
    let source_api = dir.join("source.sock");
    let shape = [
        "--cpus",
        "2",
        "--memory",
        "256",
        "--disk",
        disk_arg.as_str(),
    ];
    let mut args = vec!["--api-socket", source_api.to_str().expect("utf-8")];
    args.extend_from_slice(&shape);
    // The guest also rewrites 32 MiB of its memory in a loop, all the time.
    let cmdline = format!(
        "{} thvc.action=counter thvc.dirty_mib=32",
        common::BASE_CMDLINE
    );
    let kernel = common::kernel();
    let initrd = common::initramfs();
    let mut boot = vec![
        "--kernel",
        kernel.to_str().expect("utf-8"),
        "--initrd",
        initrd.to_str().expect("utf-8"),
        "--cmdline",
        &cmdline,
    ];
    boot.extend_from_slice(&args);
    let mut source = Guest::start_with(&boot, |cmd| {
        cmd.env("RUST_LOG", "info");
    });
    let (first, _) = wait_count_above(&mut source, 5);

    // A guest that writes faster than the link carries within a 10 ms pause, in one round:
    // the migration gives up, the guest runs on here.
    let target = dir.join("never.sock");
    let never = std::os::unix::net::UnixListener::bind(&target).expect("bind");
    let sink = std::thread::spawn(move || {
        use thvc_vmm::persist::migration::{expect, read_header, write_message, HELLO, READY};
        let (mut stream, _) = never.accept().expect("source connects");
        expect(&mut stream, HELLO).expect("hello");
        write_message(&mut stream, READY, &[b"{\"ok\":true}"]).expect("ready");
        // Take memory until the source hangs up.
        while let Ok((_, len)) = read_header(&mut stream) {
            if std::io::copy(&mut (&mut stream).take(len), &mut std::io::sink()).is_err() {
                break;
            }
        }
    });
    let stream = UnixStream::connect(&target).expect("connect");
    let stuck = request_with_files_line(
        &source_api,
        "{\"request\":\"migrate\",\"downtime_ms\":10,\"max_rounds\":1}",
        &[&stream],
    );
    drop(stream);
    sink.join().expect("sink");
    if !stuck["error"]
        .as_str()
        .unwrap_or("")
        .contains("faster than the link carries it")
    {
        let (status, _, stderr) = source.finish();
        panic!("{stuck}; the source VMM: {status}, stderr:\n{stderr}");
    }
    assert_eq!(common::api_call(&source_api, "info")["state"], "running");
    let (first, _) = wait_count_above(&mut source, first + 3);

    // A migration under way leaves the API to others: its progress shows in info, a pause is
    // refused meanwhile, and migrate-cancel ends it even while the source is blocked writing
    // to a target that stopped reading. The guest runs on here.
    let stalled = dir.join("stalled.sock");
    let listener = std::os::unix::net::UnixListener::bind(&stalled).expect("bind");
    let (release, held) = std::sync::mpsc::channel::<()>();
    let stalling = std::thread::spawn(move || {
        use thvc_vmm::persist::migration::{expect, write_message, HELLO, READY};
        let (mut stream, _) = listener.accept().expect("source connects");
        expect(&mut stream, HELLO).expect("hello");
        write_message(&mut stream, READY, &[b"{\"ok\":true}"]).expect("ready");
        // Reads no memory, and keeps the connection until the test is done.
        let _ = held.recv();
    });
    let stream = UnixStream::connect(&stalled).expect("connect");
    let api = source_api.clone();
    let pending = std::thread::spawn(move || request_with_files(&api, "migrate", &[&stream]));
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let progress = loop {
        let info = common::api_call(&source_api, "info");
        let migration = &info["migration"];
        if migration["state"] == "precopy" && migration["bytes"].as_u64() > Some(0) {
            break migration.clone();
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no progress of the migration in info: {info}"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    eprintln!("a stalled migration's progress: {progress}");
    let refused = request_with_files_line(&source_api, "{\"request\":\"pause\"}", &[]);
    assert!(
        refused["error"]
            .as_str()
            .unwrap_or("")
            .contains("a migration is running"),
        "{refused}"
    );
    let canceled_at = std::time::Instant::now();
    let canceling = common::api_call(&source_api, "migrate-cancel");
    assert_eq!(canceling["migration"], "canceling", "{canceling}");
    let canceled = pending.join().expect("the migrate request");
    // The source was blocked writing to the stalled target: the cancel shut the stream
    // down, so it did not wait for the stream's 60 s timeout.
    assert!(
        canceled_at.elapsed() < Duration::from_secs(30),
        "the cancel took {:?}",
        canceled_at.elapsed()
    );
    assert!(
        canceled["error"]
            .as_str()
            .unwrap_or("")
            .contains("migration canceled (migrate-cancel); the VM runs on here"),
        "{canceled}"
    );
    release.send(()).expect("release the stalled target");
    stalling.join().expect("stalled target");
    let info = common::api_call(&source_api, "info");
    assert_eq!(info["state"], "running", "{info}");
    assert_eq!(info["migration"]["state"], "canceled", "{info}");
    let (first, _) = wait_count_above(&mut source, first + 3);

    // A target that dies halfway: the source keeps running as if nothing happened.
    let dying = dir.join("dying.sock");
    let dead = dying_target(std::os::unix::net::UnixListener::bind(&dying).expect("bind"));
    let failed = migrate(&source_api, &dying);
    assert_eq!(failed["ok"], false, "{failed}");
    assert!(
        failed["error"]
            .as_str()
            .unwrap_or("")
            .contains("the VM runs on here"),
        "{failed}"
    );
    assert_eq!(dead.join().expect("fake target"), 3);
    assert_eq!(common::api_call(&source_api, "info")["state"], "running");
    let (after_failure, _) = wait_count_above(&mut source, first + 5);

    // A target of another shape refuses before any memory is sent.
    let wrong = dir.join("wrong.sock");
    let mut refusing = Guest::start(&[
        "--incoming",
        &format!("unix:{}", wrong.display()),
        "--cpus",
        "2",
        "--memory",
        "512",
        "--disk",
        &disk_arg,
    ]);
    wait_for_socket(&wrong, &mut refusing);
    let refused = migrate(&source_api, &wrong);
    assert!(
        refused["error"]
            .as_str()
            .unwrap_or("")
            .contains("512 MiB here"),
        "{refused}"
    );
    let (status, _, stderr) = refusing.finish();
    // Exit status 5: the guest did not arrive (a supervisor removes what it made for it).
    assert_eq!(status.code(), Some(5), "{stderr}");
    assert!(stderr.contains("did not arrive"), "{stderr}");
    wait_count_above(&mut source, after_failure + 5);

    // The real move.
    let incoming = dir.join("incoming.sock");
    let target_api = dir.join("target.sock");
    let incoming_arg = format!("unix:{}", incoming.display());
    let mut target_args = vec![
        "--incoming",
        incoming_arg.as_str(),
        "--api-socket",
        target_api.to_str().expect("utf-8"),
    ];
    target_args.extend_from_slice(&shape);
    let mut target = Guest::start_with(&target_args, |cmd| {
        cmd.env("RUST_LOG", "info");
    });
    wait_for_socket(&incoming, &mut target);
    // With a pause long enough for whatever the guest dirties meanwhile.
    let stream = UnixStream::connect(&incoming).expect("connect to the target");
    let moved = request_with_files_line(
        &source_api,
        "{\"request\":\"migrate\",\"downtime_ms\":60000}",
        &[&stream],
    );
    assert_eq!(moved["ok"], true, "{moved}");
    let result = &moved["result"];
    assert!(result["bytes"].as_u64() > Some(1 << 20), "{moved}");
    let (status, console, stderr) = source.finish();
    assert_eq!(
        status.code(),
        Some(0),
        "the source ends once the target runs: {stderr}"
    );
    let (last, up_last) = console
        .lines()
        .rev()
        .find_map(count)
        .expect("counts on the source");
    let (next, up_next) = wait_count_above(&mut target, 0);
    eprintln!(
        "migrated: {moved}; source's last count {last} (up {up_last} s), target's first \
         {next} (up {up_next} s)"
    );
    assert!(
        next == last + 1 || next == last + 2,
        "the count goes on from {last}: {next}"
    );
    // The guest's clock goes on through the pause (kvmclock keeps the host's time): it
    // jumps by about the downtime, which under the nested emulation here takes seconds.
    let downtime_s = result["downtime_ms"].as_f64().unwrap_or(0.0) / 1000.0;
    assert!(
        up_next >= up_last && up_next < up_last + downtime_s + 2.0,
        "uptime {up_last} s on the source, {up_next} s on the target, {downtime_s} s downtime"
    );
    wait_count_above(&mut target, next + 10);
    let info = common::api_call(&target_api, "info");
    assert_eq!(info["migrated_in_on"], incoming_arg.as_str(), "{info}");
    assert_eq!(common::api_call(&target_api, "pause")["state"], "paused");
    assert!(
        disk_count(&disk) > next,
        "the migrated guest writes the shared disk"
    );
    assert_continued(&mut target);
    common::api_call(&target_api, "stop");
    let (status, _, stderr) = target.finish();
    assert_eq!(status.code(), Some(0), "{stderr}");
}

/// `transmitted` and `received` from ping's summary line.
fn ping_summary(output: &str) -> (u64, u64) {
    let line = output
        .lines()
        .find(|l| l.contains("packets transmitted"))
        .unwrap_or_else(|| panic!("no ping summary in {output:?}"));
    let number = |at: usize| -> u64 {
        line.split(", ")
            .nth(at)
            .and_then(|p| p.split(' ').next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("ping summary {line:?}"))
    };
    (number(0), number(1))
}

/// A guest on a bridge moves from one TAP to another: a ping from the host keeps going
/// through the migration (the target announces the guest's MAC address, so the bridge
/// forwards to the new port at once instead of after its 5-minute ageing), and a TCP
/// connection to the guest carries on. On virtio-pci, where the other migration test runs on
/// virtio-mmio: the NIC's MSI-X vectors and BAR move.
#[test]
#[ignore = "needs KVM that boots Linux: runs in the test VM via integration/run-tests"]
fn a_migrated_guest_answers_pings_and_keeps_its_tcp_connection() {
    let _lan = common::Lan::new();
    let tmp = tempdir("migration-net");
    let dir = tmp.path();
    let source_api = dir.join("source.sock");
    let mac = "52:54:00:77:00:02";
    let net = |tap: &str| format!("tap={tap},mac={mac}");
    let (net_a, net_b) = (net("thvctap-a"), net("thvctap-b"));
    let mut source = Guest::boot_on(
        Transport::Pci,
        "thvc.action=net thvc.ip=10.77.0.2/24 thvc.echo=7",
        &[
            "--api-socket",
            source_api.to_str().expect("utf-8"),
            "--net",
            &net_a,
        ],
    );
    source.wait_for("THVC-NET-UP=");
    source.wait_for("THVC-ECHO=7");
    let ping = |args: &[&str]| {
        std::process::Command::new("ping")
            .args(args)
            .arg("10.77.0.2")
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("ping runs")
    };
    let answered = ping(&["-c", "3", "-W", "5"])
        .wait_with_output()
        .expect("ping");
    assert!(answered.status.success(), "the guest answers on the source");

    let incoming = dir.join("incoming.sock");
    let incoming_arg = format!("unix:{}", incoming.display());
    let mut target = Guest::start(&[
        "--incoming",
        &incoming_arg,
        "--transport",
        "pci",
        "--net",
        &net_b,
    ]);
    wait_for_socket(&incoming, &mut target);
    // Five pings a second through the migration and 3 s after it; and a TCP conversation
    // with the guest's echo server on one connection, a numbered line every 50 ms, each
    // answer checked: the connection lives on through the move.
    let during = ping(&["-i", "0.2", "-W", "1"]);
    let echoed = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let conversation = {
        let (echoed, stop) = (echoed.clone(), stop.clone());
        let addr = std::net::SocketAddr::from(([10, 77, 0, 2], 7));
        let mut conn = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(10))
            .expect("connect to the guest's echo server");
        conn.set_read_timeout(Some(Duration::from_secs(30)))
            .expect("timeout");
        let mut reader = BufReader::new(conn.try_clone().expect("clone"));
        std::thread::spawn(move || {
            use std::io::Write;
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                let n = echoed.load(std::sync::atomic::Ordering::SeqCst);
                conn.write_all(format!("{n}\n").as_bytes())
                    .map_err(|e| format!("line {n}: {e}"))?;
                let mut line = String::new();
                reader
                    .read_line(&mut line)
                    .map_err(|e| format!("echo of line {n}: {e}"))?;
                if line.trim_end() != n.to_string() {
                    return Err(format!("line {n} came back as {line:?}"));
                }
                echoed.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                std::thread::sleep(Duration::from_millis(50));
            }
            Ok::<u64, String>(echoed.load(std::sync::atomic::Ordering::SeqCst))
        })
    };
    std::thread::sleep(Duration::from_secs(1));
    let moved = migrate(&source_api, &incoming);
    assert_eq!(moved["ok"], true, "{moved}");
    let echoed_at_move = echoed.load(std::sync::atomic::Ordering::SeqCst);
    assert!(
        echoed_at_move > 0,
        "the echo server answered before the move"
    );
    let downtime_ms = moved["result"]["downtime_ms"].as_u64().expect("downtime");
    let (status, _, stderr) = source.finish();
    assert_eq!(status.code(), Some(0), "{stderr}");
    std::thread::sleep(Duration::from_secs(3));
    // SAFETY: kill(2) on the ping child we started; SIGINT makes it print its summary.
    unsafe { libc::kill(during.id() as libc::pid_t, libc::SIGINT) };
    let out = during.wait_with_output().expect("ping ends");
    let (sent, received) = ping_summary(&String::from_utf8_lossy(&out.stdout));
    let lost = sent - received;
    stop.store(true, std::sync::atomic::Ordering::SeqCst);
    let lines = conversation
        .join()
        .expect("the conversation thread")
        .unwrap_or_else(|e| panic!("the TCP connection did not survive the move: {e}"));
    eprintln!(
        "migrated: {moved}; ping: {sent} sent, {received} answered; TCP: {lines} lines \
         echoed on one connection, {echoed_at_move} before the move"
    );
    assert!(
        lines >= echoed_at_move + 10,
        "the conversation went on after the move: {lines} lines, {echoed_at_move} before"
    );
    // What the pause itself costs at five a second, and a few for a slow nested test VM.
    assert!(
        lost <= downtime_ms / 200 + 5,
        "{lost} of {sent} pings lost across a {downtime_ms} ms pause"
    );
    let after = ping(&["-c", "3", "-W", "5"])
        .wait_with_output()
        .expect("ping");
    assert!(
        after.status.success(),
        "the guest answers through the target's TAP: {}",
        String::from_utf8_lossy(&after.stdout)
    );
    let _ = target.child.kill();
    let _ = target.finish();
}
