//! The control API against real guests on real KVM (run in the test VM, see guest_boot.rs):
//! pause really stops the guest, resume continues it, shutdown is a clean guest power-off
//! through the ACPI power button, stop ends the VM at once, and bad clients never disturb a
//! running guest. The guest's `tick` action prints THVC-TICK=<n> every 100 ms.

mod common;

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::{tempdir, Guest};
use serde_json::Value;

/// Long enough that a running guest prints several ticks even on a slow, loaded test VM.
const QUIET_WINDOW: Duration = Duration::from_secs(3);

struct Api {
    stream: UnixStream,
    reader: BufReader<UnixStream>,
}

impl Api {
    fn connect(path: &Path) -> Api {
        let stream = UnixStream::connect(path).expect("connect to the API socket");
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .expect("timeout");
        let reader = BufReader::new(stream.try_clone().expect("clone"));
        Api { stream, reader }
    }

    fn send(&mut self, bytes: &[u8]) -> Value {
        self.stream.write_all(bytes).expect("send");
        let mut line = String::new();
        self.reader.read_line(&mut line).expect("response");
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("response {line:?}: {e}"))
    }

    /// A request that must succeed; returns its result.
    fn call(&mut self, request: &str) -> Value {
        let v = self.send(format!("{{\"request\":\"{request}\"}}\n").as_bytes());
        assert_eq!(v["ok"], true, "{request}: {v}");
        v["result"].clone()
    }

    /// Bytes that must be refused; returns the error message.
    fn refused(&mut self, bytes: &[u8]) -> String {
        let v = self.send(bytes);
        assert_eq!(v["ok"], false, "{v}");
        v["error"].as_str().expect("error message").to_string()
    }
}

/// A booted guest with an API socket, and the guard of the socket's directory.
fn boot(action: &str, extra: &[&str]) -> (tempfile::TempDir, Guest, PathBuf) {
    let dir = tempdir(&format!("api-{action}"));
    let socket = dir.path().join("vm.sock");
    let _ = std::fs::remove_file(&socket);
    let mut args = vec!["--api-socket", socket.to_str().expect("utf-8")];
    args.extend_from_slice(extra);
    let mut guest = Guest::boot_with(action, &args, |cmd| {
        cmd.env("RUST_LOG", "info");
    });
    guest.wait_for("THVC-ACPID=started");
    (dir, guest, socket)
}

fn tick_number(line: &str) -> Option<u64> {
    line.split("THVC-TICK=").nth(1)?.trim().parse().ok()
}

fn last_tick(guest: &Guest) -> u64 {
    guest
        .seen()
        .iter()
        .filter_map(|l| tick_number(l))
        .max()
        .unwrap_or(0)
}

/// Waits for a tick numbered above `n`; returns its number.
fn wait_tick_above(guest: &mut Guest, n: u64) -> u64 {
    let line = guest.wait_until(&format!("THVC-TICK above {n}"), |l| {
        tick_number(l).is_some_and(|t| t > n)
    });
    tick_number(&line).expect("tick line")
}

fn total_exits(info: &Value) -> u64 {
    info["vcpu_exits"]
        .as_array()
        .expect("vcpu_exits")
        .iter()
        .map(|v| v["total"].as_u64().expect("total"))
        .sum()
}

#[test]
#[ignore = "needs KVM that boots Linux: runs in the test VM via integration/run-tests"]
fn ping_info_pause_resume_on_a_running_guest() {
    let (_dir, mut guest, socket) = boot("tick", &["--cpus", "2", "--memory", "300"]);
    let meta = std::fs::symlink_metadata(&socket).expect("socket exists");
    assert!(meta.file_type().is_socket());
    assert_eq!(meta.permissions().mode() & 0o777, 0o600, "socket mode");
    let first = wait_tick_above(&mut guest, 2);
    let mut api = Api::connect(&socket);
    assert_eq!(api.call("ping"), "pong");

    let info = api.call("info");
    assert_eq!(info["state"], "running");
    assert_eq!(info["vcpus"], 2);
    assert_eq!(info["memory_mib"], 300);
    assert_eq!(info["pid"], guest.child.id());
    assert!(info["cmdline"]
        .as_str()
        .expect("cmdline")
        .contains("thvc.action=tick"));
    assert_eq!(info["kernel"], common::kernel().to_str().expect("utf-8"));
    assert_eq!(info["initrd"], common::initramfs().to_str().expect("utf-8"));
    assert!(info["uptime_ms"].as_u64().expect("uptime") > 0);
    let exits = info["vcpu_exits"].as_array().expect("exits");
    assert_eq!(exits.len(), 2);
    assert!(
        exits.iter().all(|e| e["total"].as_u64() > Some(0)),
        "{info}"
    );
    let devices = info["devices"].as_array().expect("devices");
    let device = |name: &str| {
        devices
            .iter()
            .find(|d| d["name"] == name)
            .unwrap_or_else(|| panic!("no {name} in {info}"))
            .clone()
    };
    assert!(device("serial0")["counters"]["tx_bytes"].as_u64() > Some(0));
    assert_eq!(device("ged")["kind"], "acpi-ged");
    assert_eq!(device("virtio-rng0")["kind"], "virtio-rng");

    // Pause: the vCPUs stop, so the guest prints nothing and exits KVM no more.
    assert_eq!(api.call("pause"), serde_json::json!({"state": "paused"}));
    std::thread::sleep(QUIET_WINDOW);
    guest.collect(); // whatever was already in the console pipe
    let frozen_tick = last_tick(&guest);
    let frozen = api.call("info");
    assert_eq!(frozen["state"], "paused");
    std::thread::sleep(QUIET_WINDOW);
    let arrived = guest.collect();
    assert_eq!(
        arrived,
        0,
        "console output while paused: {:?}",
        &guest.seen()[guest.seen().len() - arrived..]
    );
    let still = api.call("info");
    assert_eq!(
        total_exits(&still),
        total_exits(&frozen),
        "vCPUs ran while paused"
    );
    assert!(frozen_tick >= first);

    // Resume: ticks go on from where they stopped.
    assert_eq!(api.call("resume"), serde_json::json!({"state": "running"}));
    let next = wait_tick_above(&mut guest, frozen_tick);
    assert_eq!(
        next,
        frozen_tick + 1,
        "the guest continues, it does not restart"
    );
    wait_tick_above(&mut guest, frozen_tick + 5);
    assert!(total_exits(&api.call("info")) > total_exits(&still));
    assert_eq!(api.call("info")["state"], "running");

    api.call("stop");
    let (status, _, stderr) = guest.finish();
    assert_eq!(status.code(), Some(0), "{stderr}");
}

#[test]
#[ignore = "needs KVM that boots Linux: runs in the test VM via integration/run-tests"]
fn shutdown_is_a_clean_guest_power_off_with_status_0() {
    let (_dir, mut guest, socket) = boot("tick", &[]);
    wait_tick_above(&mut guest, 2);
    let mut api = Api::connect(&socket);
    // Refused while paused: a paused guest cannot see the button.
    api.call("pause");
    let err = api.refused(b"{\"request\":\"shutdown\"}\n");
    assert!(err.contains("resume it first"), "{err}");
    api.call("resume");
    assert_eq!(
        api.call("shutdown"),
        serde_json::json!({"state": "shutting-down"})
    );
    let (status, console, stderr) = guest.finish();
    assert!(
        console.contains("THVC-POWER-BUTTON"),
        "the guest's power button handler ran: console:\n{console}"
    );
    assert_eq!(status.code(), Some(0), "stderr:\n{stderr}");
    assert!(
        stderr.contains("GuestPowerOff"),
        "ended by the guest's ACPI S5, not by the VMM: {stderr}"
    );
}

#[test]
#[ignore = "needs KVM that boots Linux: runs in the test VM via integration/run-tests"]
fn stop_ends_the_vm_at_once_with_status_0() {
    let (_dir, mut guest, socket) = boot("tick", &[]);
    wait_tick_above(&mut guest, 2);
    let mut api = Api::connect(&socket);
    assert_eq!(api.call("stop"), serde_json::json!({"state": "stopping"}));
    let (status, console, stderr) = guest.finish();
    assert_eq!(status.code(), Some(0), "stderr:\n{stderr}");
    assert!(!console.contains("THVC-POWER-BUTTON"), "no guest shutdown");
    assert!(
        stderr.contains("stop requested through the API"),
        "{stderr}"
    );
    assert!(
        stderr.contains("Stopped") && !stderr.contains("GuestPowerOff"),
        "{stderr}"
    );
}

#[test]
#[ignore = "needs KVM that boots Linux: runs in the test VM via integration/run-tests"]
fn bad_clients_get_errors_while_the_guest_keeps_running() {
    let (_dir, mut guest, socket) = boot("tick", &[]);
    let before = wait_tick_above(&mut guest, 2);
    let mut api = Api::connect(&socket);
    for (bytes, expected) in [
        (&b"\x00\x01\x02\xff\xfe\n"[..], "UTF-8"),
        (b"{\"request\":\"reboot\"}\n", "unknown request"),
        (b"{\"request\":\"ping\",\"as\":\"root\"}\n", "unknown field"),
        (b"not json at all\n", "invalid request"),
        (b"\n", "empty request"),
    ] {
        let err = api.refused(bytes);
        assert!(err.contains(expected), "{err:?} lacks {expected:?}");
    }
    // A huge body: an error, then the connection is closed.
    let mut huge = Api::connect(&socket);
    let mut writer = huge.stream.try_clone().expect("clone");
    let sender = std::thread::spawn(move || {
        let _ = writer.write_all(&vec![b'a'; 8 << 20]);
    });
    let mut line = String::new();
    huge.reader.read_line(&mut line).expect("answer");
    assert!(line.contains("longer than"), "{line}");
    sender.join().expect("sender");
    // Half-closed and abandoned connections.
    let mut half = UnixStream::connect(&socket).expect("connect");
    half.write_all(b"{\"request\":\"ping\"}").expect("send");
    half.shutdown(std::net::Shutdown::Write).expect("shutdown");
    let mut answer = String::new();
    std::io::Read::read_to_string(&mut half, &mut answer).expect("answer then EOF");
    assert!(answer.contains("pong"), "{answer}");
    let abandoned: Vec<UnixStream> = (0..100)
        .filter_map(|_| UnixStream::connect(&socket).ok())
        .collect();
    for mut s in abandoned.iter().take(10) {
        let _ = s.write_all(b"{\"request\":\"in");
    }
    drop(abandoned);

    // The guest never noticed, and the API still works.
    wait_tick_above(&mut guest, before + 10);
    assert_eq!(api.call("ping"), "pong");
    assert_eq!(api.call("info")["state"], "running");
    api.call("stop");
    let (status, _, stderr) = guest.finish();
    assert_eq!(status.code(), Some(0), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}

/// RLIMIT_NOFILE lowered on the running VMM to what it holds plus two: clients beyond that
/// cannot be accepted, which must cost neither the VMM nor the guest anything.
#[test]
#[ignore = "needs KVM that boots Linux: runs in the test VM via integration/run-tests"]
fn running_out_of_descriptors_is_survived() {
    let (_dir, mut guest, socket) = boot("tick", &[]);
    let before = wait_tick_above(&mut guest, 2);
    let pid = guest.child.id() as libc::pid_t;
    let open = std::fs::read_dir(format!("/proc/{pid}/fd"))
        .expect("fds")
        .count() as u64;
    let limit = libc::rlimit {
        rlim_cur: open + 2,
        rlim_max: open + 2,
    };
    // SAFETY: prlimit on our child with a valid struct; the old limit is not asked for.
    let rc = unsafe { libc::prlimit(pid, libc::RLIMIT_NOFILE, &limit, std::ptr::null_mut()) };
    assert_eq!(rc, 0, "prlimit: {}", std::io::Error::last_os_error());
    let crowd: Vec<UnixStream> = (0..20)
        .filter_map(|_| UnixStream::connect(&socket).ok())
        .collect();
    wait_tick_above(&mut guest, before + 10);
    drop(crowd);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(mut s) = UnixStream::connect(&socket) {
            let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
            let mut answer = String::new();
            if s.write_all(b"{\"request\":\"ping\"}\n").is_ok()
                && BufReader::new(s).read_line(&mut answer).is_ok()
                && answer.contains("pong")
            {
                break;
            }
        }
        assert!(Instant::now() < deadline, "the API never recovered");
        std::thread::sleep(Duration::from_millis(100));
    }
    Api::connect(&socket).call("stop");
    let (status, _, stderr) = guest.finish();
    assert_eq!(status.code(), Some(0), "{stderr}");
    assert!(
        stderr.contains("Too many open files"),
        "the limit was never hit, the test proves nothing: {stderr}"
    );
}
