//! The real thvc-vmm binary's control API and sandbox, without booting a guest: the kernel is
//! a FIFO nobody writes, so the VMM blocks while loading it, after binding the API socket and
//! starting the API thread (which must already serve) and before any vCPU exists. Needs an
//! openable /dev/kvm (run as root, as CI does) but no KVM that boots Linux.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

const VMM: &str = env!("CARGO_BIN_EXE_thvc-vmm");
const TIMEOUT: Duration = Duration::from_secs(20);

/// A fresh directory for one test; it is removed when the guard drops, pass or fail.
fn temp_dir(name: &str) -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix(&format!("thvc-api-host-{name}-"))
        .tempdir()
        .expect("temp dir")
}

/// A FIFO opened read-write by us, so that the VMM's open() does not block but its read()
/// does, for as long as this lives.
struct StuckKernel {
    path: PathBuf,
    _fifo: std::fs::File,
}

impl StuckKernel {
    fn new(dir: &Path) -> StuckKernel {
        let path = dir.join("vmlinuz.fifo");
        let c = std::ffi::CString::new(path.to_str().expect("utf-8")).expect("no NUL");
        // SAFETY: mkfifo with a valid NUL-terminated path.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0, "mkfifo");
        let fifo = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .expect("open fifo");
        StuckKernel { path, _fifo: fifo }
    }
}

struct Vmm {
    child: Child,
    socket: PathBuf,
}

impl Vmm {
    fn start(dir: &Path, kernel: &StuckKernel, configure: impl FnOnce(&mut Command)) -> Vmm {
        let socket = dir.join("api.sock");
        let mut cmd = Command::new(VMM);
        cmd.arg("--kernel")
            .arg(&kernel.path)
            .arg("--api-socket")
            .arg(&socket)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        configure(&mut cmd);
        let child = cmd.spawn().expect("thvc-vmm starts");
        Vmm { child, socket }
    }

    /// Waits until the socket accepts connections.
    fn connect(&mut self) -> Client {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            if let Ok(stream) = UnixStream::connect(&self.socket) {
                return Client::new(stream);
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!(
                    "thvc-vmm exited ({status}) before serving: {}",
                    self.stderr()
                );
            }
            assert!(
                Instant::now() < deadline,
                "no API socket within {TIMEOUT:?}"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    fn stderr(&mut self) -> String {
        let mut s = String::new();
        if let Some(mut e) = self.child.stderr.take() {
            let _ = std::io::Read::read_to_string(&mut e, &mut s);
        }
        s
    }

    fn wait(&mut self) -> ExitStatus {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                return status;
            }
            assert!(Instant::now() < deadline, "thvc-vmm did not exit");
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    fn assert_running(&mut self) {
        assert_eq!(self.child.try_wait().expect("wait"), None, "thvc-vmm died");
    }

    /// `Name` and `Seccomp` of every thread.
    fn threads(&self) -> Vec<(String, String)> {
        let tasks = PathBuf::from(format!("/proc/{}/task", self.child.id()));
        let mut out = Vec::new();
        for task in std::fs::read_dir(tasks).expect("tasks").flatten() {
            let status = std::fs::read_to_string(task.path().join("status")).unwrap_or_default();
            let field = |key: &str| {
                status
                    .lines()
                    .find_map(|l| l.strip_prefix(key))
                    .unwrap_or("")
                    .trim()
                    .to_string()
            };
            out.push((field("Name:"), field("Seccomp:")));
        }
        out
    }
}

impl Drop for Vmm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

struct Client {
    stream: UnixStream,
    reader: BufReader<UnixStream>,
}

impl Client {
    fn new(stream: UnixStream) -> Client {
        stream.set_read_timeout(Some(TIMEOUT)).expect("timeout");
        let reader = BufReader::new(stream.try_clone().expect("clone"));
        Client { stream, reader }
    }

    fn request(&mut self, line: &[u8]) -> serde_json::Value {
        self.stream.write_all(line).expect("send");
        self.response()
    }

    fn response(&mut self) -> serde_json::Value {
        let mut line = String::new();
        self.reader.read_line(&mut line).expect("read");
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("{line:?}: {e}"))
    }
}

/// Sends the request line `bad` and asserts it is refused with an error containing `why`;
/// returns the answer.
fn refused(c: &mut Client, bad: &[u8], why: &str) -> serde_json::Value {
    let mut line = bad.to_vec();
    line.push(b'\n');
    let v = c.request(&line);
    assert_eq!(v["ok"], false, "{v}");
    let error = v["error"].as_str().unwrap_or_default();
    assert!(error.contains(why), "{why}: {v}");
    v
}

#[test]
fn serves_before_the_kernel_is_loaded_on_a_private_socket() {
    let tmp = temp_dir("early");
    let dir = tmp.path();
    let kernel = StuckKernel::new(dir);
    let mut vmm = Vmm::start(dir, &kernel, |_| {});
    let mut c = vmm.connect();
    assert_eq!(
        c.request(b"{\"request\":\"ping\"}\n"),
        serde_json::json!({"ok": true, "result": "pong"})
    );
    let info = c.request(b"{\"request\":\"info\"}\n");
    assert_eq!(info["ok"], true, "{info}");
    assert_eq!(info["result"]["state"], "running");
    assert_eq!(info["result"]["vcpus"], 1);
    assert_eq!(info["result"]["memory_mib"], 256);
    assert_eq!(info["result"]["pid"], vmm.child.id());
    let meta = std::fs::symlink_metadata(&vmm.socket).expect("socket");
    assert!(meta.file_type().is_socket());
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);
    // The API thread filters its syscalls from the start.
    let threads = vmm.threads();
    assert!(
        threads
            .iter()
            .any(|(name, seccomp)| name == "api" && seccomp == "2"),
        "{threads:?}"
    );
    vmm.assert_running();
}

#[test]
fn bad_requests_get_errors_and_the_vmm_keeps_serving() {
    let tmp = temp_dir("bad");
    let dir = tmp.path();
    let kernel = StuckKernel::new(dir);
    let mut vmm = Vmm::start(dir, &kernel, |_| {});
    let mut c = vmm.connect();
    for bad in [
        &b"\xff\xfe garbage\n"[..],
        b"{\"request\":\"format-disk\"}\n",
        b"{\"request\":42}\n",
        b"\n",
        b"{\"request\":\"ping\"\n",
    ] {
        let v = c.request(bad);
        assert_eq!(v["ok"], false, "{v}");
        assert!(v["error"].as_str().is_some_and(|e| !e.is_empty()), "{v}");
    }
    // A huge line: an error, then the connection is closed.
    let mut huge = Client::new(UnixStream::connect(&vmm.socket).expect("connect"));
    let mut writer = huge.stream.try_clone().expect("clone");
    let sender = std::thread::spawn(move || {
        let _ = writer.write_all(&vec![b'{'; 1 << 20]);
    });
    let v = huge.response();
    assert!(
        v["error"]
            .as_str()
            .is_some_and(|e| e.contains("longer than")),
        "{v}"
    );
    sender.join().expect("sender");
    // Half-closed connections and connect-and-leave.
    for _ in 0..50 {
        drop(UnixStream::connect(&vmm.socket).expect("connect"));
    }
    let mut half = Client::new(UnixStream::connect(&vmm.socket).expect("connect"));
    half.stream
        .write_all(b"{\"request\":\"ping\"}")
        .expect("send");
    half.stream
        .shutdown(std::net::Shutdown::Write)
        .expect("shutdown");
    assert_eq!(half.response()["result"], "pong");
    assert_eq!(c.request(b"{\"request\":\"ping\"}\n")["result"], "pong");
    vmm.assert_running();
}

#[test]
fn clients_cannot_starve_start_up_of_file_descriptors() {
    let tmp = temp_dir("nofile");
    let dir = tmp.path();
    let kernel = StuckKernel::new(dir);
    let mut vmm = Vmm::start(dir, &kernel, |cmd| {
        // SAFETY: setrlimit is async-signal-safe; runs in the child before exec.
        unsafe {
            cmd.pre_exec(|| {
                let limit = libc::rlimit {
                    rlim_cur: 48,
                    rlim_max: 48,
                };
                if libc::setrlimit(libc::RLIMIT_NOFILE, &limit) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    });
    let mut first = vmm.connect();
    assert_eq!(first.request(b"{\"request\":\"ping\"}\n")["result"], "pong");
    // More clients than descriptors: while starting, only a few are served and the others
    // are told so, so the VMM keeps what it needs for the VM itself.
    let mut crowd: Vec<Client> = (0..40)
        .map(|_| Client::new(UnixStream::connect(&vmm.socket).expect("connect")))
        .collect();
    let mut served = 0;
    for c in &mut crowd {
        // A refused client may already be hung up on (EPIPE); its answer is still there.
        let _ = c.stream.write_all(b"{\"request\":\"ping\"}\n");
        let v = c.response();
        if v["ok"] == true {
            served += 1;
        } else {
            let err = v["error"].as_str().unwrap_or_default();
            assert!(err.contains("too many connections"), "{v}");
        }
    }
    assert!(served <= 3, "{served} extra clients served during start-up");
    vmm.assert_running();
    drop(crowd);
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let mut c = Client::new(UnixStream::connect(&vmm.socket).expect("connect"));
        // While the crowd's connections are still being closed this one may be refused and
        // hung up on before it writes (EPIPE); the refusal is still there to read.
        let _ = c.stream.write_all(b"{\"request\":\"ping\"}\n");
        let v = c.response();
        if v["ok"] == true {
            break;
        }
        let err = v["error"].as_str().unwrap_or_default();
        assert!(err.contains("too many connections"), "{v}");
        assert!(Instant::now() < deadline, "never served again");
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(first.request(b"{\"request\":\"ping\"}\n")["result"], "pong");
    vmm.assert_running();
}

#[test]
fn stop_during_start_up_ends_the_vmm_with_status_0() {
    let tmp = temp_dir("stop");
    let dir = tmp.path();
    let kernel = StuckKernel::new(dir);
    let mut vmm = Vmm::start(dir, &kernel, |_| {});
    let mut c = vmm.connect();
    let v = c.request(b"{\"request\":\"stop\"}\n");
    assert_eq!(v["result"]["state"], "stopping", "{v}");
    let status = vmm.wait();
    assert_eq!(status.code(), Some(0), "{}", vmm.stderr());
}

#[test]
fn a_live_socket_is_never_taken_over_and_a_stale_one_is_replaced() {
    let tmp = temp_dir("stale");
    let dir = tmp.path();
    let kernel = StuckKernel::new(dir);
    let mut first = Vmm::start(dir, &kernel, |_| {});
    first.connect();
    let mut second = Vmm::start(dir, &kernel, |_| {});
    let status = second.wait();
    assert_eq!(status.code(), Some(1));
    let err = second.stderr();
    assert!(err.contains("another process is listening"), "{err}");
    // SIGKILL leaves the socket file behind; the next VMM replaces it.
    first.child.kill().expect("kill");
    first.child.wait().expect("reap");
    assert!(first.socket.exists());
    let mut third = Vmm::start(dir, &kernel, |_| {});
    let mut c = third.connect();
    assert_eq!(c.request(b"{\"request\":\"ping\"}\n")["result"], "pong");
}

#[test]
fn refuses_to_replace_a_file_that_is_not_a_socket() {
    let tmp = temp_dir("notsock");
    let dir = tmp.path();
    let kernel = StuckKernel::new(dir);
    std::fs::write(dir.join("api.sock"), b"keep me").expect("write");
    let mut vmm = Vmm::start(dir, &kernel, |_| {});
    assert_eq!(vmm.wait().code(), Some(1));
    assert!(vmm.stderr().contains("is not a socket"));
    assert_eq!(
        std::fs::read(dir.join("api.sock")).expect("kept"),
        b"keep me"
    );
}

/// The test hook exists only in debug builds, which is what `cargo test` runs.
#[cfg(debug_assertions)]
#[test]
fn a_forbidden_syscall_in_the_api_thread_kills_the_process() {
    let tmp = temp_dir("sigsys");
    let dir = tmp.path();
    let kernel = StuckKernel::new(dir);
    let mut vmm = Vmm::start(dir, &kernel, |cmd| {
        cmd.env("THVC_TEST_FORBIDDEN_SYSCALL", "api");
    });
    let status = vmm.wait();
    let stderr = vmm.stderr();
    assert_eq!(status.signal(), Some(libc::SIGSYS), "{status}: {stderr}");
    // The log says which syscall (openat: 257) ended it, and in which thread.
    assert!(
        stderr.contains("made the forbidden syscall 257"),
        "{stderr}"
    );
    // And with --seccomp off the same hook is harmless.
    let off = temp_dir("sigsys-off");
    let mut unfiltered = Vmm::start(off.path(), &kernel, |cmd| {
        cmd.env("THVC_TEST_FORBIDDEN_SYSCALL", "api")
            .args(["--seccomp", "off"]);
    });
    let mut c = unfiltered.connect();
    assert_eq!(c.request(b"{\"request\":\"ping\"}\n")["result"], "pong");
}

/// The API thread may send the vCPU kick signal, but only to its own process's threads: sent
/// to another process, tgkill kills the VMM (SIGSYS) and the other process never sees it.
#[cfg(debug_assertions)]
#[test]
fn tgkill_to_another_process_is_killed_by_seccomp() {
    let mut bystander = std::process::Command::new("sleep")
        .arg("60")
        .spawn()
        .expect("sleep");
    let tmp = temp_dir("tgkill");
    let dir = tmp.path();
    let kernel = StuckKernel::new(dir);
    let mut vmm = Vmm::start(dir, &kernel, |cmd| {
        cmd.env("THVC_TEST_FORBIDDEN_SYSCALL", "api")
            .env("THVC_TEST_TGKILL_PID", bystander.id().to_string());
    });
    let status = vmm.wait();
    let stderr = vmm.stderr();
    assert_eq!(status.signal(), Some(libc::SIGSYS), "{status}: {stderr}");
    assert!(stderr.contains("signals process"), "{stderr}");
    assert!(!stderr.contains("was allowed"), "{stderr}");
    let alive = bystander.try_wait().expect("try_wait");
    let _ = bystander.kill();
    let _ = bystander.wait();
    assert!(
        alive.is_none(),
        "the other process got the signal: {alive:?}"
    );
}

/// A descriptor the supervisor leaked (no O_CLOEXEC) is closed at start; one it handed over
/// on purpose (`--kvm-fd`) stays open.
#[test]
fn inherited_descriptors_are_closed_except_the_handed_ones() {
    use std::os::fd::AsRawFd;
    let tmp = temp_dir("closefds");
    let dir = tmp.path();
    let kernel = StuckKernel::new(dir);
    let secret = dir.join("another-vms-disk");
    std::fs::write(&secret, b"not for this VM").expect("write");
    let leaked = std::fs::File::open(&secret).expect("open");
    let kvm = std::fs::File::open("/dev/kvm").expect("/dev/kvm");
    let (leaked_fd, kvm_fd) = (leaked.as_raw_fd(), kvm.as_raw_fd());
    let mut vmm = Vmm::start(dir, &kernel, |cmd| {
        cmd.args(["--kvm-fd", "41"]);
        // SAFETY: dup2 is async-signal-safe; runs in the child before exec. The copies at 40
        // and 41 have no close-on-exec flag, as from a careless supervisor.
        unsafe {
            cmd.pre_exec(move || {
                if libc::dup2(leaked_fd, 40) < 0 || libc::dup2(kvm_fd, 41) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
    });
    let mut c = vmm.connect();
    assert_eq!(c.request(b"{\"request\":\"ping\"}\n")["result"], "pong");
    let fds = std::fs::read_dir(format!("/proc/{}/fd", vmm.child.id())).expect("fd dir");
    let targets: Vec<PathBuf> = fds
        .filter_map(|e| e.ok())
        .filter_map(|e| std::fs::read_link(e.path()).ok())
        .collect();
    assert!(
        !targets.contains(&secret),
        "the leaked descriptor is still open: {targets:?}"
    );
    assert!(
        targets.contains(&PathBuf::from("/dev/kvm")),
        "the handed /dev/kvm descriptor is gone: {targets:?}"
    );
}

/// Started as root with `--user`, the VMM attaches only a TAP that user could attach itself
/// (its owner or group): root with CAP_NET_ADMIN could attach any TAP, another VM's too.
#[test]
fn with_user_a_tap_of_another_user_is_refused() {
    const NOBODY: u32 = 65534;
    let tmp = temp_dir("asuser");
    let dir = tmp.path();
    let kernel = StuckKernel::new(dir);
    let user = format!("{NOBODY}:{NOBODY}");
    let tap = format!("thvcu{}", std::process::id() % 100_000);
    let made = Command::new("ip")
        .args(["tuntap", "add", &tap, "mode", "tap", "user", "1234"])
        .status()
        .expect("ip");
    assert!(made.success(), "ip tuntap add {tap}");
    let mut foreign_tap = Vmm::start(dir, &kernel, |cmd| {
        cmd.args(["--user", &user, "--net", &format!("tap={tap}")]);
    });
    let status = foreign_tap.wait();
    let err = foreign_tap.stderr();
    let _ = Command::new("ip").args(["link", "del", &tap]).status();
    assert_eq!(status.code(), Some(1), "{err}");
    assert!(err.contains("belongs to uid 1234"), "{err}");
}

#[test]
fn update_device_changes_rate_limits_and_refuses_bad_requests_without_changing_anything() {
    let tmp = temp_dir("limits");
    let dir = tmp.path();
    let kernel = StuckKernel::new(dir);
    let disk = dir.join("disk.raw");
    std::fs::write(&disk, vec![0u8; 1 << 20]).expect("disk image");
    let mut vmm = Vmm::start(dir, &kernel, |cmd| {
        cmd.arg("--disk")
            .arg(format!("path={},bandwidth=10M,ops=2000", disk.display()));
    });
    let mut c = vmm.connect();
    // The API serves while the devices are still being set up: wait for the last one (the
    // entropy device, set up after the disk).
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let v = c.request(b"{\"request\":\"update-device\",\"device\":\"virtio-rng0\"}\n");
        if v["ok"] == true {
            break;
        }
        assert!(Instant::now() < deadline, "devices never registered: {v}");
        std::thread::sleep(Duration::from_millis(10));
    }
    let v = c.request(b"{\"request\":\"update-device\",\"device\":\"virtio-blk0\"}\n");
    assert_eq!(v["result"]["bandwidth"], 10 << 20, "{v}");
    assert_eq!(v["result"]["ops"], 2000, "{v}");
    for (bad, why) in [
        (
            &br#"{"request":"update-device","device":"virtio-blk9","bandwidth":"1M"}"#[..],
            "unknown device",
        ),
        (
            br#"{"request":"update-device","device":"virtio-blk0","bandwidth":"fast"}"#,
            "bandwidth",
        ),
        (
            br#"{"request":"update-device","device":"virtio-blk0","ops":"50M","bandwidth":"1M"}"#,
            "ops",
        ),
        (
            br#"{"request":"update-device","device":"virtio-rng0","bandwidth-burst":"1K"}"#,
            "needs a bandwidth",
        ),
        (
            br#"{"request":"update-device","device":"virtio-blk0","speed":"1M"}"#,
            "unknown field",
        ),
    ] {
        refused(&mut c, bad, why);
    }
    // Nothing changed; then a valid change, a removal and "0".
    let v = c.request(b"{\"request\":\"update-device\",\"device\":\"virtio-blk0\"}\n");
    assert_eq!(v["result"]["bandwidth"], 10 << 20, "{v}");
    assert_eq!(v["result"]["ops"], 2000, "{v}");
    let v = c.request(
        b"{\"request\":\"update-device\",\"device\":\"virtio-blk0\",\"bandwidth\":\"50M\",\"ops\":null}\n",
    );
    assert_eq!(v["ok"], true, "{v}");
    assert_eq!(v["result"]["bandwidth"], 50 << 20, "{v}");
    assert_eq!(v["result"]["ops"], serde_json::Value::Null, "{v}");
    let v = c.request(
        b"{\"request\":\"update-device\",\"device\":\"virtio-blk0\",\"bandwidth\":\"0\"}\n",
    );
    assert_eq!(v["result"]["bandwidth"], serde_json::Value::Null, "{v}");
    let v = c.request(
        b"{\"request\":\"update-device\",\"device\":\"virtio-rng0\",\"bandwidth\":\"1K\"}\n",
    );
    assert_eq!(v["result"]["bandwidth"], 1024, "{v}");
    vmm.assert_running();
}

/// A NIC's receive and transmit limits are separate (`rx_*`, `tx_*` over the shared keys) and
/// each changeable at run time; a bad request changes neither. The VMM runs in a network
/// namespace of its own, so the TAP it creates is private and goes with it.
#[test]
fn update_device_changes_a_nics_rx_and_tx_limits_apart_and_refuses_bad_ones() {
    let tmp = temp_dir("nic-limits");
    let dir = tmp.path();
    let kernel = StuckKernel::new(dir);
    let mut vmm = Vmm::start(dir, &kernel, |cmd| {
        cmd.args([
            "--net",
            "tap=thvcapi0,bandwidth=10M,rx_ops=100,tx_bandwidth=1M,tx_bandwidth-burst=64K",
        ]);
        // SAFETY: unshare only changes the child's own namespace, between fork and exec.
        unsafe {
            cmd.pre_exec(|| {
                if libc::unshare(libc::CLONE_NEWNET) == 0 {
                    Ok(())
                } else {
                    Err(std::io::Error::last_os_error())
                }
            });
        }
    });
    let mut c = vmm.connect();
    let deadline = Instant::now() + TIMEOUT;
    loop {
        let v = c.request(b"{\"request\":\"update-device\",\"device\":\"virtio-rng0\"}\n");
        if v["ok"] == true {
            break;
        }
        assert!(Instant::now() < deadline, "devices never registered: {v}");
        std::thread::sleep(Duration::from_millis(10));
    }
    let dev = std::fs::read_to_string(format!("/proc/{}/net/dev", vmm.child.id()))
        .expect("the VMM's network devices");
    assert!(
        dev.contains("thvcapi0:"),
        "a real TAP in the VMM's namespace: {dev}"
    );
    let read = |c: &mut Client| {
        let v = c.request(b"{\"request\":\"update-device\",\"device\":\"virtio-net0\"}\n");
        assert_eq!(v["ok"], true, "{v}");
        v["result"].clone()
    };
    let v = read(&mut c);
    assert_eq!(v["rx"]["bandwidth"], 10 << 20, "{v}");
    assert_eq!(v["rx"]["ops"], 100, "{v}");
    assert_eq!(v["tx"]["bandwidth"], 1 << 20, "{v}");
    assert_eq!(v["tx"]["bandwidth-burst"], 64 << 10, "{v}");
    assert_eq!(v["tx"]["ops"], serde_json::Value::Null, "{v}");
    // One direction alone, then both through the shared key.
    let v = c.request(
        b"{\"request\":\"update-device\",\"device\":\"virtio-net0\",\"rx_bandwidth\":\"5M\"}\n",
    );
    assert_eq!(v["result"]["rx"]["bandwidth"], 5 << 20, "{v}");
    assert_eq!(v["result"]["tx"]["bandwidth"], 1 << 20, "{v}");
    let v = c.request(
        b"{\"request\":\"update-device\",\"device\":\"virtio-net0\",\"ops\":\"2000\",\"tx_ops\":null}\n",
    );
    assert_eq!(v["result"]["rx"]["ops"], 2000, "{v}");
    assert_eq!(v["result"]["tx"]["ops"], serde_json::Value::Null, "{v}");
    let set = read(&mut c);
    for (bad, why) in [
        (
            &br#"{"request":"update-device","device":"virtio-net0","rx_bandwidth":"1M","tx_bandwidth":"fast"}"#[..],
            "tx_bandwidth",
        ),
        (
            br#"{"request":"update-device","device":"virtio-net0","rx_bandwidth":"1M","tx_ops-burst":5}"#,
            "tx: ops-burst needs ops",
        ),
        (
            br#"{"request":"update-device","device":"virtio-net0","rx_ops":"1K"}"#,
            "rx_ops",
        ),
        (
            br#"{"request":"update-device","device":"virtio-rng0","tx_bandwidth":"1M"}"#,
            "rx_ and tx_ keys are for a NIC",
        ),
        (
            br#"{"request":"update-device","device":"virtio-net0","rx_speed":"1M"}"#,
            "unknown field",
        ),
        (
            br#"{"request":"update-device","device":"virtio-net1","rx_bandwidth":"1M"}"#,
            "unknown device",
        ),
    ] {
        let v = refused(&mut c, bad, why);
        assert_eq!(read(&mut c), set, "nothing changed by {v}");
    }
    vmm.assert_running();
}

/// `info` says how the guest came to have no PMU, and it matches this host's KVM: with a PMU
/// to offer (kvm's enable_pmu Y) the VMM must have disabled it for the VM, without one it
/// must say so (the VMM refuses to start on a host that has a PMU it cannot disable).
#[test]
fn info_reports_how_the_guest_pmu_is_off_as_this_hosts_kvm_has_it() {
    let tmp = temp_dir("pmu");
    let dir = tmp.path();
    let kernel = StuckKernel::new(dir);
    let mut vmm = Vmm::start(dir, &kernel, |_| {});
    let mut c = vmm.connect();
    let deadline = Instant::now() + TIMEOUT;
    let pmu = loop {
        let v = c.request(b"{\"request\":\"info\"}\n");
        assert_eq!(v["ok"], true, "{v}");
        if let Some(pmu) = v["result"]["pmu"].as_str() {
            break pmu.to_string();
        }
        assert_eq!(v["result"]["pmu"], serde_json::Value::Null, "{v}");
        assert!(
            Instant::now() < deadline,
            "no KVM VM within {TIMEOUT:?}: {v}"
        );
        std::thread::sleep(Duration::from_millis(10));
    };
    let enable_pmu = std::fs::read_to_string("/sys/module/kvm/parameters/enable_pmu")
        .map(|v| v.trim().to_string())
        .unwrap_or_default();
    let expected = if enable_pmu == "N" {
        "none-in-kvm"
    } else {
        "disabled-for-vm"
    };
    assert_eq!(pmu, expected, "kvm enable_pmu={enable_pmu:?}");
    eprintln!("this host: kvm enable_pmu={enable_pmu:?}, the VMM reports {pmu}");
    vmm.assert_running();
}
