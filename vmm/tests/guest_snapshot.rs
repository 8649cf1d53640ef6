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

use common::{tempdir, Guest};
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

fn wait_count_above(guest: &mut Guest, n: u64) -> (u64, f64) {
    let line = guest.wait_until(&format!("THVC-COUNT above {n}"), |l| {
        count(l).is_some_and(|(c, _)| c > n)
    });
    count(&line).expect("count line")
}

/// One request with `files` sent along; the whole answer.
fn request_with_files(socket: &Path, request: &str, files: &[&dyn AsRawFd]) -> Value {
    let stream = UnixStream::connect(socket).expect("API socket");
    stream
        .set_read_timeout(Some(Duration::from_secs(120)))
        .expect("timeout");
    let line = format!("{{\"request\":\"{request}\"}}\n");
    let sent = send_with_files(&stream, line.as_bytes(), files).expect("send");
    assert_eq!(sent, line.len());
    let mut answer = String::new();
    BufReader::new(stream)
        .read_line(&mut answer)
        .expect("answer");
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
    let dir = tempdir("snapshot");
    let disk = dir.join("disk.img");
    std::fs::write(&disk, vec![0u8; 1 << 20]).expect("disk image");
    let disk_arg = format!("path={}", disk.display());
    let socket = dir.join("vm.sock");
    let snapshot = dir.join("snap");
    std::fs::create_dir_all(&snapshot).expect("snapshot dir");
    let shape = ["--cpus", "2", "--memory", "256"];
    let mut args = vec!["--api-socket", socket.to_str().expect("utf-8")];
    args.extend_from_slice(&shape);
    args.extend_from_slice(&["--disk", &disk_arg]);
    let mut guest = Guest::boot_with("counter", &args, |cmd| {
        cmd.env("RUST_LOG", "info");
    });
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
    assert!(
        disk_before >= before,
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
    assert!(
        up_next >= up_before && up_next < up_before + 5.0,
        "uptime {up_before} s before, {up_next} s after: it goes on, neither back nor \
         by the time the VM was not running"
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
    restored.collect();
    assert!(
        !restored
            .seen()
            .iter()
            .any(|l| l.contains("THVC-GUEST-READY")),
        "the guest did not boot again"
    );
    let numbers: Vec<u64> = counts(&restored).iter().map(|c| c.0).collect();
    assert!(
        numbers.windows(2).all(|w| w[1] == w[0] + 1),
        "one count after the other: {numbers:?}"
    );
    common::api_call(&socket2, "stop");
    let (status, _, stderr) = restored.finish();
    assert_eq!(status.code(), Some(0), "{stderr}");
    std::fs::remove_dir_all(&dir).expect("cleanup");
}
