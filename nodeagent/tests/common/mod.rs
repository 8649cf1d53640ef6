//! Test harness: a private dbus-daemon per test, the real `thvc-nodeagent` binary against it
//! with temporary state/run/log directories, and the fake VMM test double. Missing tools
//! (dbus-daemon, busctl) fail the test loudly; nothing is skipped.

#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use thvc_nodeagent::client::{self, BusTarget, ManagerProxy, VmProxy};
use thvc_nodeagent::procinfo::ProcessId;
use zbus::zvariant::OwnedObjectPath;

mod access;
#[allow(unused_imports)]
pub use access::*;

pub const AGENT: &str = env!("CARGO_BIN_EXE_thvc-nodeagent");
pub const THVCCTL: &str = env!("CARGO_BIN_EXE_thvcctl");
pub const FAKE_VMM: &str = env!("CARGO_BIN_EXE_thvc-fake-vmm");
pub const TIMEOUT: Duration = Duration::from_secs(20);

/// Finds `tool` in PATH or fails the test with how to install it.
pub fn require_tool(tool: &str, package: &str) -> PathBuf {
    let path = std::env::var_os("PATH").unwrap_or_default();
    for dir in std::env::split_paths(&path) {
        let candidate = dir.join(tool);
        if candidate.is_file() {
            return candidate;
        }
    }
    panic!(
        "{tool} is not installed, but these tests need it: install the Debian package \
         `{package}` (nodeagent/tests/install-deps.sh does)"
    );
}

/// The file named by the environment variable `var` (a guest asset such as
/// `THVC_GUEST_VMLINUX`), or a failure saying how to get it: real guests boot only inside
/// the test VM, whose runner sets these variables.
pub fn asset(var: &str) -> PathBuf {
    match std::env::var_os(var) {
        Some(p) if Path::new(&p).is_file() => PathBuf::from(p),
        Some(p) => panic!("{var}={} is not a file", PathBuf::from(p).display()),
        None => panic!(
            "{var} is not set: real guests boot only inside the test VM; use \
             integration/testvm/run with the env from integration/testvm/assets --print-env"
        ),
    }
}

/// The real VMM, built by cargo into the same directory as the agent.
pub fn real_vmm() -> PathBuf {
    let vmm = Path::new(AGENT)
        .parent()
        .expect("the agent binary has a directory")
        .join("thvc-vmm");
    assert!(
        vmm.is_file(),
        "{} is missing: build it into the same target directory (cargo build -p thvc-vmm, \
         or cargo test --workspace --no-run; --release for the benchmarks)",
        vmm.display()
    );
    vmm
}

/// Node directories whose image store holds the test guest (from the test VM's assets):
/// Debian's PVH ELF kernel as `vmlinuz` (a bzImage costs ~40 s of decompression under
/// TCG) and the test initramfs as `guest.cpio.gz`.
pub fn node_dirs_with_guest_images() -> NodeDirs {
    let kernel = asset("THVC_GUEST_VMLINUX");
    let initramfs = asset("THVC_GUEST_INITRAMFS");
    let dirs = NodeDirs::new();
    std::fs::copy(&kernel, dirs.state().join("images/vmlinuz")).expect("copy the kernel");
    std::fs::copy(&initramfs, dirs.state().join("images/guest.cpio.gz"))
        .expect("copy the initramfs");
    dirs
}

/// A private dbus-daemon listening on a socket in its own directory.
pub struct TestBus {
    pub dir: tempfile::TempDir,
    pub address: String,
    child: Child,
}

impl TestBus {
    /// A bus that lets everyone own and call everything: the agent checks callers itself.
    pub fn start() -> TestBus {
        Self::start_with_policy(
            r#"  <policy context="default">
    <allow user="*"/>
    <allow own="*"/>
    <allow send_destination="*"/>
    <allow receive_sender="*"/>
  </policy>"#,
        )
    }

    /// A bus whose configuration is `policy` (`<policy>` and `<include>` elements) after the
    /// socket and EXTERNAL authentication.
    pub fn start_with_policy(policy: &str) -> TestBus {
        let daemon = require_tool("dbus-daemon", "dbus-daemon");
        let dir = tempfile::Builder::new()
            .prefix("thvc-bus-")
            .tempdir()
            .expect("temp dir");
        // Other uids (the authorization tests) must reach the socket.
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))
            .expect("chmod bus dir");
        let socket = dir.path().join("bus");
        let config = dir.path().join("bus.conf");
        std::fs::write(
            &config,
            format!(
                r#"<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <listen>unix:path={}</listen>
  <auth>EXTERNAL</auth>
{policy}
</busconfig>
"#,
                socket.display()
            ),
        )
        .expect("write bus config");
        // Its messages (a policy's "Rejected send message" for every refused call) go to a
        // log file, shown if it does not start.
        let log = dir.path().join("dbus-daemon.log");
        let mut child = Command::new(daemon)
            .arg(format!("--config-file={}", config.display()))
            .arg("--nofork")
            .arg("--print-address=1")
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&log).expect("create the dbus-daemon log"))
            .spawn()
            .expect("start dbus-daemon");
        let stdout = child.stdout.take().expect("dbus-daemon stdout");
        let mut line = String::new();
        BufReader::new(stdout)
            .read_line(&mut line)
            .expect("read dbus-daemon address");
        let address = line.trim().to_owned();
        assert!(
            address.starts_with("unix:"),
            "dbus-daemon printed no address: {line:?}; its log: {}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
        TestBus {
            dir,
            address,
            child,
        }
    }
}

impl Drop for TestBus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// State, run and log directories of one node, with a kernel in the image store.
pub struct NodeDirs {
    pub root: tempfile::TempDir,
}

impl NodeDirs {
    pub fn new() -> NodeDirs {
        let root = tempfile::Builder::new()
            .prefix("thvc-node-")
            .tempdir()
            .expect("temp dir");
        let d = NodeDirs { root };
        std::fs::create_dir_all(d.state().join("images")).expect("images dir");
        std::fs::create_dir_all(d.state().join("disks")).expect("disks dir");
        std::fs::write(d.state().join("images/vmlinuz"), b"not really a kernel\n").expect("kernel");
        d
    }
    pub fn state(&self) -> PathBuf {
        self.root.path().join("state")
    }
    pub fn run(&self) -> PathBuf {
        self.root.path().join("run")
    }
    pub fn log(&self) -> PathBuf {
        self.root.path().join("log")
    }
    pub fn spec_file(&self, vm: &str) -> PathBuf {
        self.state().join("vms").join(format!("{vm}.json"))
    }
    pub fn spec_files(&self) -> Vec<String> {
        let mut v: Vec<String> = std::fs::read_dir(self.state().join("vms"))
            .map(|rd| {
                rd.flatten()
                    .map(|e| e.file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        v.sort();
        v
    }
    /// The VMM process recorded for `vm` by its supervisor.
    pub fn vmm_process(&self, vm: &str) -> Option<ProcessId> {
        let data = std::fs::read(self.run().join("vms").join(vm).join("vmm.json")).ok()?;
        serde_json::from_slice(&data).ok()
    }
    /// Kills every supervisor and VMM recorded in the run directory (test cleanup).
    pub fn kill_all_vms(&self) {
        let Ok(rd) = std::fs::read_dir(self.run().join("vms")) else {
            return;
        };
        for e in rd.flatten() {
            for f in ["vmm.json", "process.json"] {
                if let Ok(data) = std::fs::read(e.path().join(f)) {
                    if let Ok(p) = serde_json::from_slice::<ProcessId>(&data) {
                        let _ = p.signal(libc::SIGKILL);
                    }
                }
            }
        }
    }
}

impl Drop for NodeDirs {
    fn drop(&mut self) {
        self.kill_all_vms();
    }
}

/// A running `thvc-nodeagent`.
pub struct Agent {
    pub child: Child,
}

impl Agent {
    /// Starts the agent on `bus` and waits until it owns its bus name.
    pub fn start(bus: &TestBus, dirs: &NodeDirs, extra: &[&str]) -> Agent {
        Self::start_with(bus, dirs, extra, &[])
    }

    /// Like [`Agent::start`], with a command prefix (e.g. `unshare -n`). `extra` may
    /// replace the fake VMM (`--vmm PATH`) and the start timeout.
    pub fn start_with(bus: &TestBus, dirs: &NodeDirs, extra: &[&str], prefix: &[&str]) -> Agent {
        Self::start_full(bus, dirs, extra, prefix, &[], None)
    }

    /// Like [`Agent::start_with`], with extra environment variables (they override the
    /// defaults, RUST_LOG included) and, when `log` is given, stderr appended to that file.
    pub fn start_full(
        bus: &TestBus,
        dirs: &NodeDirs,
        extra: &[&str],
        prefix: &[&str],
        env: &[(&str, &str)],
        log: Option<&Path>,
    ) -> Agent {
        let mut cmd = match prefix.split_first() {
            Some((p, rest)) => {
                let mut c = Command::new(p);
                c.args(rest).arg(AGENT);
                c
            }
            None => Command::new(AGENT),
        };
        cmd.arg("--bus")
            .arg(&bus.address)
            .arg("--state-dir")
            .arg(dirs.state())
            .arg("--run-dir")
            .arg(dirs.run())
            .arg("--log-dir")
            .arg(dirs.log())
            .arg("--runner")
            .arg("direct");
        // Defaults that `extra` may replace (the guest tests run the real VMM).
        if !extra.contains(&"--vmm") {
            cmd.args(["--vmm", FAKE_VMM]);
        }
        if !extra.contains(&"--start-timeout") {
            cmd.args(["--start-timeout", "2"]);
        }
        cmd.args(extra)
            .env(
                "RUST_LOG",
                std::env::var("THVC_TEST_LOG").unwrap_or_else(|_| "warn".to_owned()),
            )
            .envs(env.iter().copied())
            .stdin(Stdio::null());
        if let Some(log) = log {
            let file = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(log)
                .expect("open the agent's log file");
            cmd.stderr(file);
        }
        let child = cmd.spawn().expect("start thvc-nodeagent");
        let mut agent = Agent { child };
        agent.wait_ready(bus);
        agent
    }

    fn wait_ready(&mut self, bus: &TestBus) {
        let deadline = Instant::now() + TIMEOUT;
        let child = &mut self.child;
        // Its own thread and runtime: callers may be inside a tokio runtime already.
        std::thread::scope(|scope| {
            scope
                .spawn(|| {
                    let rt = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                        .expect("runtime");
                    rt.block_on(async {
                        let conn = client::connect(&BusTarget::Address(bus.address.clone()))
                            .await
                            .expect("connect to test bus");
                        let dbus = zbus::fdo::DBusProxy::new(&conn).await.expect("dbus proxy");
                        let name = zbus::names::BusName::try_from(client::BUS_NAME).expect("name");
                        loop {
                            if dbus.name_has_owner(name.clone()).await.unwrap_or(false) {
                                return;
                            }
                            if let Ok(Some(status)) = child.try_wait() {
                                panic!("thvc-nodeagent exited during startup: {status}");
                            }
                            assert!(
                                Instant::now() < deadline,
                                "thvc-nodeagent did not take its bus name"
                            );
                            tokio::time::sleep(Duration::from_millis(20)).await;
                        }
                    })
                })
                .join()
                .unwrap_or_else(|p| std::panic::resume_unwind(p));
        });
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// SIGKILL, as a crash would.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM, as systemd would; returns the exit status.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        // SAFETY: plain kill(2) on our child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        self.child.wait().expect("wait agent")
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The host's RAM in MiB (MemTotal), as the agent sees it.
pub fn host_memory_mib() -> u64 {
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap();
    let kb: u64 = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap();
    kb / 1024
}

/// The names ListVms gives, in its order (by name).
pub async fn vm_names(m: &ManagerProxy<'_>) -> Vec<String> {
    m.list_vms()
        .await
        .unwrap()
        .into_iter()
        .map(|v| v.0)
        .collect()
}

/// Calls `Cancel` on the job at `job`.
pub async fn cancel_job(conn: &zbus::Connection, job: &str) -> zbus::Result<()> {
    conn.call_method(
        Some("de.thueringen.thvc.node1"),
        job,
        Some("de.thueringen.thvc.node1.Job"),
        "Cancel",
        &(),
    )
    .await
    .map(drop)
}

/// A client connection to the test bus.
pub async fn connect(bus: &TestBus) -> zbus::Connection {
    client::connect(&BusTarget::Address(bus.address.clone()))
        .await
        .expect("connect to test bus")
}

pub async fn manager(conn: &zbus::Connection) -> ManagerProxy<'static> {
    ManagerProxy::builder(conn)
        .cache_properties(zbus::proxy::CacheProperties::No)
        .build()
        .await
        .expect("manager proxy")
}

pub async fn vm(conn: &zbus::Connection, path: OwnedObjectPath) -> VmProxy<'static> {
    client::vm_proxy(conn, path).await.expect("vm proxy")
}

/// A minimal valid spec; `extra` is appended inside the object (start it with a comma).
/// Runs the command, asserts it succeeded (its stderr otherwise) and returns its stdout.
#[allow(dead_code)]
pub fn stdout_of(cmd: &mut std::process::Command) -> String {
    let out = cmd.output().expect("run the command");
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub fn spec(extra: &str) -> String {
    format!(r#"{{"vcpus":1,"memory_mib":128,"kernel":"vmlinuz"{extra}}}"#)
}

/// A spec whose fake guest is steered by `fake` (see the fake VMM's doc).
pub fn spec_cmdline(fake: &str) -> String {
    spec(&format!(r#","cmdline":"console=ttyS0 {fake}""#))
}

/// The D-Bus error name of a failed call.
pub fn error_name(e: &zbus::Error) -> String {
    client::method_error(e)
        .map(|(n, _)| n)
        .unwrap_or_else(|| format!("not a method error: {e}"))
}

pub fn error_message(e: &zbus::Error) -> String {
    client::method_error(e)
        .map(|(_, m)| m)
        .unwrap_or_else(|| e.to_string())
}

/// Collects the values of the VM's `State` property from PropertiesChanged signals.
pub struct StateWatcher {
    stream: zbus::proxy::SignalStream<'static>,
    pub seen: Vec<String>,
}

impl StateWatcher {
    pub async fn new(conn: &zbus::Connection, path: &OwnedObjectPath) -> StateWatcher {
        let props = zbus::fdo::PropertiesProxy::builder(conn)
            .destination(client::BUS_NAME)
            .expect("destination")
            .path(path.clone())
            .expect("path")
            .build()
            .await
            .expect("properties proxy");
        let stream = props
            .inner()
            .receive_signal("PropertiesChanged")
            .await
            .expect("subscribe PropertiesChanged");
        StateWatcher {
            stream,
            seen: Vec::new(),
        }
    }

    /// Waits until `State` becomes `want` (fails after TIMEOUT); returns the states seen.
    pub async fn wait_for(&mut self, want: &str) -> Vec<String> {
        self.wait_until(|seen| seen.last().map(String::as_str) == Some(want), want)
            .await
    }

    /// Waits until `n` State changes were seen.
    pub async fn wait_count(&mut self, n: usize) -> Vec<String> {
        self.wait_until(|seen| seen.len() >= n, &format!("{n} changes"))
            .await
    }

    async fn wait_until(&mut self, done: impl Fn(&[String]) -> bool, want: &str) -> Vec<String> {
        let deadline = tokio::time::Instant::now() + TIMEOUT;
        loop {
            if done(&self.seen) {
                return self.seen.clone();
            }
            let msg = tokio::time::timeout_at(deadline, self.stream.next())
                .await
                .unwrap_or_else(|_| panic!("State never became {want}; saw {:?}", self.seen))
                .expect("signal stream ended");
            let body = msg.body();
            let (iface, changed, _): (
                String,
                std::collections::HashMap<String, zbus::zvariant::OwnedValue>,
                Vec<String>,
            ) = body.deserialize().expect("PropertiesChanged body");
            assert_eq!(iface, "de.thueringen.thvc.node1.Vm");
            if let Some(v) = changed.get("State") {
                let s: String = v
                    .try_clone()
                    .expect("clone")
                    .try_into()
                    .expect("State is a string");
                self.seen.push(s);
            }
        }
    }
}

/// Polls `check` until it returns true (bounded by TIMEOUT).
pub async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + TIMEOUT;
    while !check().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// Path of a file inside the test crate.
pub fn crate_file(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
}

/// A wrapper for `Agent::start_with`: the agent in a network namespace of its own, with a
/// matching /sys (so /sys/class/net shows that namespace's links).
pub const IN_NEW_NETNS: &[&str] = &[
    "unshare",
    "--net",
    "--mount",
    "--",
    "sh",
    "-c",
    "mount -t sysfs sysfs /sys && exec \"$0\" \"$@\"",
];

/// Parses one journald native-protocol datagram (binary-safe fields only, as the agent
/// writes them) into its fields.
pub fn journal_fields(mut d: &[u8]) -> std::collections::HashMap<String, String> {
    let mut fields = std::collections::HashMap::new();
    while !d.is_empty() {
        let nl = d
            .iter()
            .position(|&b| b == b'\n')
            .expect("key ends in a newline");
        let key = String::from_utf8(d[..nl].to_vec()).unwrap();
        assert!(
            !key.contains('='),
            "the agent writes length-prefixed fields: {key}"
        );
        let len = u64::from_le_bytes(d[nl + 1..nl + 9].try_into().unwrap()) as usize;
        let value = String::from_utf8(d[nl + 9..nl + 9 + len].to_vec()).unwrap();
        assert_eq!(d[nl + 9 + len], b'\n');
        d = &d[nl + 10 + len..];
        fields.insert(key, value);
    }
    fields
}
