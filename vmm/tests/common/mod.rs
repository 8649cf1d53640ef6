//! Shared by the guest tests: a running thvc-vmm whose console is read line by line, and the
//! test assets (guest kernel and initramfs) from the test VM's environment.

#![allow(dead_code)] // each test binary uses a different part

use std::io::{BufRead, BufReader, Read};
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

pub const VMM: &str = env!("CARGO_BIN_EXE_thvc-vmm");
pub const BOOT_TIMEOUT: Duration = Duration::from_secs(180);
pub const BASE_CMDLINE: &str = "console=ttyS0 panic=1 pci=off quiet";

/// How the guest's virtio devices attach: the VMM's `--transport`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    Mmio,
    Pci,
}

impl Transport {
    /// The kernel command line without the action: with virtio-mmio the guest skips the PCI
    /// probe (`pci=off`), with virtio-pci it needs it.
    pub fn cmdline(self) -> &'static str {
        match self {
            Transport::Mmio => BASE_CMDLINE,
            Transport::Pci => "console=ttyS0 panic=1 quiet",
        }
    }

    pub fn args(self) -> &'static [&'static str] {
        match self {
            Transport::Mmio => &["--transport", "mmio"],
            Transport::Pci => &["--transport", "pci"],
        }
    }
}

pub fn asset(var: &str) -> PathBuf {
    match std::env::var_os(var) {
        Some(p) if PathBuf::from(&p).is_file() => PathBuf::from(p),
        Some(p) => panic!("{var}={} is not a file", PathBuf::from(p).display()),
        None => panic!(
            "{var} is not set: these tests boot real guests and run inside the test VM; \
             use integration/run-tests (or integration/testvm/run with the env from \
             integration/testvm/assets --print-env)"
        ),
    }
}

pub fn kernel() -> PathBuf {
    asset("THVC_GUEST_KERNEL")
}

pub fn initramfs() -> PathBuf {
    asset("THVC_GUEST_INITRAMFS")
}

/// A running thvc-vmm whose console output is collected line by line.
pub struct Guest {
    pub child: Child,
    lines: mpsc::Receiver<String>,
    seen: Vec<String>,
    stderr: std::thread::JoinHandle<String>,
}

impl Guest {
    pub fn start(args: &[&str]) -> Guest {
        Guest::start_with(args, |_| {})
    }

    /// Like `start`, with `configure` applied to the command first (environment, user, ...).
    pub fn start_with(args: &[&str], configure: impl FnOnce(&mut Command)) -> Guest {
        let mut cmd = Command::new(VMM);
        cmd.args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        configure(&mut cmd);
        let mut child = cmd.spawn().expect("thvc-vmm starts");
        let stdout = child.stdout.take().expect("piped stdout");
        let mut stderr = child.stderr.take().expect("piped stderr");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).split(b'\n') {
                let Ok(line) = line else { break };
                let line = String::from_utf8_lossy(&line).trim_end().to_string();
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let stderr = std::thread::spawn(move || {
            let mut s = String::new();
            let _ = stderr.read_to_string(&mut s);
            s
        });
        Guest {
            child,
            lines,
            seen: Vec::new(),
            stderr,
        }
    }

    pub fn boot(action: &str, extra: &[&str]) -> Guest {
        Guest::boot_with(action, extra, |_| {})
    }

    pub fn boot_with(action: &str, extra: &[&str], configure: impl FnOnce(&mut Command)) -> Guest {
        let cmdline = format!("{BASE_CMDLINE} thvc.action={action}");
        Guest::boot_kernel(&cmdline, extra, configure)
    }

    /// Boots the test kernel and initramfs with the devices on `transport`; `params` are the
    /// guest's kernel parameters after the transport's base command line (the action, ...).
    pub fn boot_on(transport: Transport, params: &str, extra: &[&str]) -> Guest {
        let cmdline = format!("{} {params}", transport.cmdline());
        let mut args = transport.args().to_vec();
        args.extend_from_slice(extra);
        Guest::boot_kernel(&cmdline, &args, |_| {})
    }

    /// The test kernel and initramfs with `cmdline`, then `extra`.
    fn boot_kernel(cmdline: &str, extra: &[&str], configure: impl FnOnce(&mut Command)) -> Guest {
        let kernel = kernel();
        let initrd = initramfs();
        let mut args = vec![
            "--kernel",
            kernel.to_str().expect("utf-8 path"),
            "--initrd",
            initrd.to_str().expect("utf-8 path"),
            "--cmdline",
            cmdline,
        ];
        args.extend_from_slice(extra);
        Guest::start_with(&args, configure)
    }

    /// Waits for a console line (old or new) for which `pred` holds and returns it.
    pub fn wait_until(&mut self, what: &str, pred: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + BOOT_TIMEOUT;
        let mut checked = 0;
        loop {
            if let Some(line) = self.seen[checked..].iter().find(|l| pred(l)) {
                return line.clone();
            }
            checked = self.seen.len();
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => self.seen.push(line),
                Err(mpsc::RecvTimeoutError::Disconnected) => self.console_closed(what),
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    let report = stuck_report(self.child.id());
                    let _ = self.child.kill();
                    panic!(
                        "no console line with {what} within {BOOT_TIMEOUT:?}; {report}\nconsole:\n{}",
                        self.seen.join("\n")
                    );
                }
            }
        }
    }

    /// Takes in the console lines that arrived meanwhile, without waiting; returns how many.
    pub fn collect(&mut self) -> usize {
        let before = self.seen.len();
        self.seen.extend(self.lines.try_iter());
        self.seen.len() - before
    }

    /// The console lines received so far (see `collect`).
    pub fn seen(&self) -> &[String] {
        &self.seen
    }

    /// Waits for a console line starting with `prefix` and returns the rest of it.
    pub fn wait_for(&mut self, prefix: &str) -> String {
        self.wait_for_within(prefix, BOOT_TIMEOUT)
    }

    /// Like `wait_for`, for steps that take longer than a boot (bulk transfers under the
    /// software-emulated test VM).
    pub fn wait_for_within(&mut self, prefix: &str, limit: Duration) -> String {
        match self.try_wait_for(prefix, limit) {
            Some(rest) => rest,
            None => {
                let report = stuck_report(self.child.id());
                let _ = self.child.kill();
                panic!(
                    "no console line with {prefix:?} within {limit:?}; {report}\nconsole:\n{}",
                    self.seen.join("\n")
                );
            }
        }
    }

    /// Like `wait_for_within`, but says None when the time is up (for bounded retries).
    pub fn try_wait_for(&mut self, prefix: &str, limit: Duration) -> Option<String> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(line) = self.seen.iter().find(|l| l.contains(prefix)) {
                let at = line.find(prefix).unwrap_or(0) + prefix.len();
                return Some(line[at..].to_string());
            }
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => self.seen.push(line),
                Err(mpsc::RecvTimeoutError::Timeout) => return None,
                Err(mpsc::RecvTimeoutError::Disconnected) => self.console_closed(prefix),
            }
        }
    }

    /// The console ended (the VMM exited) while a line was still awaited: say how it ended
    /// rather than wait out the deadline.
    fn console_closed(&mut self, awaited: &str) -> ! {
        let deadline = Instant::now() + Duration::from_secs(10);
        let status = loop {
            match self.child.try_wait() {
                Ok(Some(status)) => break format!("{status}"),
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(50))
                }
                Ok(None) => {
                    let _ = self.child.kill();
                    break "still running with its console closed (killed)".to_string();
                }
                Err(e) => break format!("unknown ({e})"),
            }
        };
        let stderr = std::mem::replace(&mut self.stderr, std::thread::spawn(String::new))
            .join()
            .unwrap_or_default();
        panic!(
            "the VMM's console ended before a line with {awaited:?}; VMM exit: {status}\n\
             stderr:\n{stderr}\nconsole:\n{}",
            self.seen.join("\n")
        );
    }

    /// Waits for the VMM to exit; returns its status, the full console and stderr.
    pub fn finish(mut self) -> (ExitStatus, String, String) {
        let deadline = Instant::now() + BOOT_TIMEOUT;
        let status = loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                break status;
            }
            if Instant::now() > deadline {
                let report = stuck_report(self.child.id());
                let _ = self.child.kill();
                panic!(
                    "thvc-vmm still running after {BOOT_TIMEOUT:?}; {report}\nconsole:\n{}",
                    self.seen.join("\n")
                );
            }
            // Poll the console meanwhile so the pipe never fills up.
            if let Ok(line) = self.lines.recv_timeout(Duration::from_millis(50)) {
                self.seen.push(line);
            }
        };
        self.seen.extend(self.lines.try_iter());
        let stderr = self.stderr.join().unwrap_or_default();
        (status, self.seen.join("\n"), stderr)
    }
}

/// Why a guest went silent, as seen from outside (like integration/bench/io.py's report):
/// each VMM thread's state, wait channel and system call, and the VM's KVM counters over
/// 3 s. Tells a VMM that hangs in user space (a vCPU thread outside KVM_RUN, syscall 16)
/// from a halted guest that waits for an interrupt (vCPUs asleep in kvm_vcpu_block, few
/// exits) from one that loops inside KVM (exits climbing, no mmio_exits): nested KVM under
/// TCG freezes guests of every VMM now and then, and this says which kind a freeze was.
pub fn stuck_report(pid: u32) -> String {
    use std::fmt::Write;
    let mut out = String::from("what the VMM and KVM were doing:");
    let tasks = format!("/proc/{pid}/task");
    let mut tids: Vec<u32> = match std::fs::read_dir(&tasks) {
        Ok(dir) => dir
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
            .collect(),
        Err(e) => return format!("{out} no threads ({e})"),
    };
    tids.sort_unstable();
    for tid in tids {
        let read = |name: &str| {
            std::fs::read_to_string(format!("{tasks}/{tid}/{name}"))
                .map(|s| s.trim().to_string())
                .unwrap_or_else(|_| "?".to_string())
        };
        let stat = read("stat");
        let state = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().next())
            .unwrap_or("?");
        let syscall = read("syscall");
        let syscall = syscall.split_whitespace().next().unwrap_or("?");
        let _ = write!(
            out,
            "\n  thread {tid} {}: state {state}, wchan {}, syscall {syscall}",
            read("comm"),
            read("wchan")
        );
    }
    let before = kvm_counters(pid);
    std::thread::sleep(Duration::from_secs(3));
    match (before, kvm_counters(pid)) {
        (Some(before), Some(after)) => {
            out.push_str("\n  KVM counters over 3 s:");
            for ((name, a), (_, b)) in before.iter().zip(&after) {
                let _ = write!(out, " {name} +{}", b.saturating_sub(*a));
            }
        }
        _ => out.push_str("\n  no KVM counters (debugfs)"),
    }
    out
}

/// The KVM debugfs counters of process `pid`'s VM (mounts debugfs in the test VM first).
fn kvm_counters(pid: u32) -> Option<Vec<(&'static str, u64)>> {
    const NAMES: [&str; 7] = [
        "exits",
        "mmio_exits",
        "io_exits",
        "halt_exits",
        "halt_wakeup",
        "irq_exits",
        "pf_taken",
    ];
    let root = std::path::Path::new("/sys/kernel/debug/kvm");
    if !root.is_dir() {
        let _ = Command::new("mount")
            .args(["-t", "debugfs", "debugfs", "/sys/kernel/debug"])
            .stderr(Stdio::null())
            .status();
    }
    let prefix = format!("{pid}-");
    let vm = std::fs::read_dir(root)
        .ok()?
        .filter_map(Result::ok)
        .find(|e| e.file_name().to_string_lossy().starts_with(&prefix))?
        .path();
    Some(
        NAMES
            .iter()
            .map(|&name| {
                let value = std::fs::read_to_string(vm.join(name))
                    .ok()
                    .and_then(|s| s.trim().parse().ok())
                    .unwrap_or(0);
                (name, value)
            })
            .collect(),
    )
}

pub fn number_after(guest: &mut Guest, prefix: &str) -> u64 {
    let value = guest.wait_for(prefix);
    value
        .trim()
        .parse()
        .unwrap_or_else(|_| panic!("{prefix}{value} is not a number"))
}

/// A 1 MiB disk image of zeros in `dir`, and the `--disk` argument for it.
pub fn blank_disk(dir: &std::path::Path) -> (PathBuf, String) {
    let disk = dir.join("disk.img");
    std::fs::write(&disk, vec![0u8; 1 << 20]).expect("disk image");
    let arg = format!("path={}", disk.display());
    (disk, arg)
}

/// A fresh directory for one test; it is removed when the guard drops, pass or fail.
pub fn tempdir(name: &str) -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix(&format!("thvc-vmm-test-{name}-"))
        .tempdir()
        .expect("create temp dir")
}

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("ip runs");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The host's side of a guest's NIC, as a user makes it: a TAP with vnet headers and an
/// address on the guest's subnet; removed when dropped.
pub struct HostTap(&'static str);

impl HostTap {
    /// The TAP `name` with `address` (CIDR notation).
    pub fn new(name: &'static str, address: &str) -> HostTap {
        let _ = Command::new("ip").args(["link", "del", name]).output();
        ip(&["tuntap", "add", "dev", name, "mode", "tap", "vnet_hdr"]);
        ip(&["addr", "add", address, "dev", name]);
        ip(&["link", "set", name, "up"]);
        HostTap(name)
    }
}

impl Drop for HostTap {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["link", "del", self.0]).output();
    }
}

/// Bridge and TAPs in the test VM's network stack, removed when dropped.
pub struct Lan;

impl Lan {
    pub fn new() -> Lan {
        Lan::with_taps(&["vnet_hdr"])
    }

    /// TAPs that a multiqueue NIC can attach several queues to.
    pub fn multi_queue() -> Lan {
        Lan::with_taps(&["vnet_hdr", "multi_queue"])
    }

    pub fn with_taps(flags: &[&str]) -> Lan {
        let _ = Command::new("ip").args(["link", "del", "thvcbr0"]).output();
        ip(&["link", "add", "thvcbr0", "type", "bridge"]);
        ip(&["addr", "add", "10.77.0.1/24", "dev", "thvcbr0"]);
        ip(&["link", "set", "thvcbr0", "up"]);
        for tap in ["thvctap-a", "thvctap-b"] {
            let _ = Command::new("ip").args(["link", "del", tap]).output();
            let mut add = vec!["tuntap", "add", "dev", tap, "mode", "tap"];
            add.extend_from_slice(flags);
            ip(&add);
            ip(&["link", "set", tap, "master", "thvcbr0"]);
            ip(&["link", "set", tap, "up"]);
        }
        Lan
    }
}

impl Drop for Lan {
    fn drop(&mut self) {
        for link in ["thvctap-a", "thvctap-b", "thvcbr0"] {
            let _ = Command::new("ip").args(["link", "del", link]).output();
        }
    }
}

/// One request on the VMM's API socket; the result of a successful answer.
pub fn api_call(socket: &std::path::Path, request: &str) -> serde_json::Value {
    use std::io::{BufRead, BufReader, Write};
    let mut stream = std::os::unix::net::UnixStream::connect(socket).expect("API socket");
    stream
        .set_read_timeout(Some(std::time::Duration::from_secs(30)))
        .expect("timeout");
    stream
        .write_all(format!("{{\"request\":\"{request}\"}}\n").as_bytes())
        .expect("send");
    let mut line = String::new();
    BufReader::new(stream).read_line(&mut line).expect("answer");
    let answer: serde_json::Value = serde_json::from_str(&line).expect("JSON answer");
    assert_eq!(answer["ok"], true, "{request}: {answer}");
    answer["result"].clone()
}
