//! TEST DOUBLE of `thvc-vmm` for the node agent's tests and benchmark. It boots nothing: it
//! honours thvc-vmm's command line, exit codes (0 off/SIGTERM, 1 error, 2 usage, 3 reboot)
//! and API socket protocol, and writes a fake boot log to the serial file, so the agent's
//! lifecycle handling is tested against real processes before real guests boot here.
//!
//! Behaviour is steered through the kernel command line, the way a real guest would be:
//!   fake.exit=N fake.exit_after_ms=M   exit with status N after M ms ("crash", "power off")
//!   fake.reboot_once=PATH              exit 3 (reboot) unless PATH exists; creates PATH
//!   fake.ignore_shutdown=1             acknowledge "shutdown" but keep running
//!   fake.ignore_sigterm=1              ignore SIGTERM (to test the SIGKILL escalation)
//!   fake.console_bytes=N               write N bytes of console output at boot
//!   fake.no_api=1                      serve no API socket (like a VMM without the API)
//!   fake.hang_info=1                   never answer "info" (a hung VMM)
//!
//! `info` lists devices as thvc-vmm does (`devices[]` with `name`, `kind`, `counters`):
//! `serial0`, then `virtio-blk<i>` per `--disk` and `virtio-net<i>` per `--net` with
//! thvc-vmm's counter names and fixed values (disk i: requests 10+i, bytes_read
//! 4096*(i+1), bytes_written 512*(i+1); NIC i: rx_bytes 1000+i, rx_packets 10, tx_bytes
//! 2000+i, tx_packets 20; errors 0).
//!
//! `--incoming unix:PATH` (instead of `--kernel`, as a migration target) listens at PATH and
//! reports `info` state `migrating-in` until the source's stream brings the line `RUN`: then
//! it answers `RESUMED` and the guest runs. A stream that ends before `RUN` is a failed
//! migration, as for thvc-vmm: exit 5 (the guest did not arrive).
//!
//! `--user UID:GID` switches user once the console and API socket are open, like thvc-vmm.
//! `--firmware PATH` instead of `--kernel` (it needs `--transport pci`, as thvc-vmm's UEFI
//! boot does) and `--platform uuid=UUID` are checked the way thvc-vmm checks them, so a
//! command line the real VMM would refuse fails here too (exit 2).

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixListener;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

static PAUSED: AtomicBool = AtomicBool::new(false);
/// Waiting for a migration's guest (`--incoming`).
static MIGRATING_IN: AtomicBool = AtomicBool::new(false);

extern "C" fn exit_zero(_: libc::c_int) {
    // SAFETY: _exit is async-signal-safe.
    unsafe { libc::_exit(0) };
}

fn usage(msg: &str) -> ! {
    eprintln!("thvc-fake-vmm: {msg}");
    std::process::exit(2);
}

fn main() {
    let mut args = std::env::args().skip(1);
    let mut opts: HashMap<String, String> = HashMap::new();
    let mut disks = Vec::new();
    let mut nets = Vec::new();
    while let Some(a) = args.next() {
        if a == "--api-socket-group" {
            // The real VMM makes its socket 0660; the fake one's follows the umask.
            continue;
        }
        let takes_value = [
            "--kernel",
            "--firmware",
            "--transport",
            "--cpu-template",
            "--platform",
            "--initrd",
            "--cmdline",
            "--cpus",
            "--memory",
            "--serial",
            "--disk",
            "--net",
            "--api-socket",
            "--config",
            "--user",
            "--kvm-fd",
            "--incoming",
        ];
        if !takes_value.contains(&a.as_str()) {
            usage(&format!("unknown argument {a}"));
        }
        let Some(v) = args.next() else {
            usage(&format!("{a} needs a value"))
        };
        match a.as_str() {
            "--disk" => disks.push(v),
            "--net" => nets.push(v),
            _ => {
                opts.insert(a, v);
            }
        }
    }
    let incoming = opts.get("--incoming").map(|a| {
        for o in ["--kernel", "--firmware", "--initrd", "--cmdline"] {
            if opts.contains_key(o) {
                usage(&format!(
                    "{o} is not for --incoming: the guest comes from the source"
                ));
            }
        }
        let path = a
            .strip_prefix("unix:")
            .unwrap_or_else(|| usage(&format!("--incoming {a}: expected unix:PATH")));
        let _ = std::fs::remove_file(path);
        UnixListener::bind(path).unwrap_or_else(|e| {
            eprintln!("thvc-fake-vmm: incoming socket {path}: {e}");
            std::process::exit(1);
        })
    });
    let kernel = match (opts.get("--kernel"), opts.get("--firmware")) {
        _ if incoming.is_some() => String::new(),
        (Some(k), None) => k.clone(),
        (None, Some(f)) => {
            if opts.get("--transport").map(String::as_str) != Some("pci") {
                usage("--firmware needs --transport pci");
            }
            for o in ["--initrd", "--cmdline"] {
                if opts.contains_key(o) {
                    usage(&format!("{o} is for --kernel, not --firmware"));
                }
            }
            if disks.is_empty() {
                usage("--firmware boots from the first --disk; there is none");
            }
            f.clone()
        }
        _ => usage("exactly one of --kernel and --firmware is required"),
    };
    if incoming.is_none() && !std::path::Path::new(&kernel).is_file() {
        eprintln!("thvc-fake-vmm: kernel or firmware {kernel} not found");
        std::process::exit(1);
    }
    // Read as thvc-vmm reads them, with the rights of the user it runs as.
    let boot_files = std::iter::once(&kernel).filter(|_| incoming.is_none());
    for file in boot_files.chain(opts.get("--initrd")) {
        if let Err(e) = std::fs::File::open(file) {
            eprintln!("thvc-fake-vmm: {file}: {e}");
            std::process::exit(1);
        }
    }
    if let Some(t) = opts.get("--transport") {
        if t != "mmio" && t != "pci" {
            usage(&format!("--transport {t}: mmio or pci"));
        }
    }
    if let Some(p) = opts.get("--platform") {
        let ok = p.strip_prefix("uuid=").is_some_and(|u| {
            u.len() == 36
                && u.char_indices().all(|(i, c)| match i {
                    8 | 13 | 18 | 23 => c == '-',
                    _ => c.is_ascii_digit() || ('a'..='f').contains(&c),
                })
        });
        if !ok {
            usage(&format!("--platform {p}: expected uuid=<lower-case UUID>"));
        }
    }
    for d in &disks {
        let path = d
            .split(',')
            .find_map(|p| p.strip_prefix("path="))
            .unwrap_or_else(|| usage(&format!("--disk {d}: path= missing")));
        if !std::path::Path::new(path).is_file() {
            eprintln!("thvc-fake-vmm: disk {path} not found");
            std::process::exit(1);
        }
        // Opened as thvc-vmm opens it: read-write unless read-only, as the user it runs as.
        let readonly = d.split(',').any(|p| p == "readonly=on");
        if let Err(e) = std::fs::OpenOptions::new()
            .read(true)
            .write(!readonly)
            .open(path)
        {
            eprintln!("thvc-fake-vmm: disk {path}: {e}");
            std::process::exit(1);
        }
    }
    let cmdline = opts.get("--cmdline").cloned().unwrap_or_default();
    let fake: HashMap<&str, &str> = cmdline
        .split_whitespace()
        .filter_map(|t| t.strip_prefix("fake.")?.split_once('='))
        .collect();
    let flag = |k: &str| fake.get(k).is_some_and(|v| *v == "1");
    let num = |k: &str| fake.get(k).and_then(|v| v.parse::<u64>().ok());

    // SAFETY: installing a signal disposition at startup.
    unsafe {
        if flag("ignore_sigterm") {
            libc::signal(libc::SIGTERM, libc::SIG_IGN);
        } else {
            libc::signal(
                libc::SIGTERM,
                exit_zero as extern "C" fn(libc::c_int) as libc::sighandler_t,
            );
        }
    }

    let console: Arc<Mutex<Box<dyn Write + Send>>> =
        Arc::new(Mutex::new(match opts.get("--serial").map(String::as_str) {
            Some(s) if s.starts_with("file:") => {
                let path = &s["file:".len()..];
                match std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                {
                    Ok(f) => Box::new(f),
                    Err(e) => {
                        eprintln!("thvc-fake-vmm: serial {path}: {e}");
                        std::process::exit(1);
                    }
                }
            }
            Some("none") => Box::new(std::io::sink()),
            _ => Box::new(std::io::stdout()),
        }));
    let say = |msg: &str| {
        if let Ok(mut c) = console.lock() {
            let _ = c.write_all(msg.as_bytes());
            let _ = c.flush();
        }
    };
    say(&format!(
        "fake-vmm: booting {kernel} cpus={} memory={} cmdline={cmdline:?}\n",
        opts.get("--cpus").map(String::as_str).unwrap_or("1"),
        opts.get("--memory").map(String::as_str).unwrap_or("512"),
    ));
    for d in &disks {
        say(&format!("fake-vmm: disk {d}\n"));
    }
    for n in &nets {
        say(&format!("fake-vmm: net {n}\n"));
    }
    if let Some(n) = num("console_bytes") {
        let line = "fake-vmm: console filler 0123456789abcdefghijklmnopqrstuvwxyz\n";
        let mut left = n as usize;
        while left > 0 {
            let take = left.min(line.len());
            say(&line[..take]);
            left -= take;
        }
    }

    if let Some(listener) = incoming {
        MIGRATING_IN.store(true, Ordering::SeqCst);
        std::thread::spawn(move || receive_guest(listener));
    }
    if let Some(code) = num("exit") {
        let after = num("exit_after_ms").unwrap_or(0);
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(after));
            std::process::exit(code as i32);
        });
    }
    say("fake-vmm: guest running\n");

    let cpus: u64 = opts.get("--cpus").and_then(|c| c.parse().ok()).unwrap_or(1);
    let memory: u64 = opts
        .get("--memory")
        .and_then(|c| c.parse().ok())
        .unwrap_or(512);
    let ignore_shutdown = flag("ignore_shutdown");
    let reboot_marker = fake.get("reboot_once").map(|p| p.to_string());
    // Like thvc-vmm: open everything (console above, API socket here), then switch user.
    let listener = opts
        .get("--api-socket")
        .filter(|_| !flag("no_api"))
        .map(|sock| {
            let _ = std::fs::remove_file(sock);
            UnixListener::bind(sock).unwrap_or_else(|e| {
                eprintln!("thvc-fake-vmm: api socket {sock}: {e}");
                std::process::exit(1);
            })
        });
    if let Some(fd) = opts.get("--kvm-fd") {
        // As thvc-vmm: an inherited descriptor of /dev/kvm (the real one asks it for KVM's
        // API version; the fake reads what it names).
        let named = std::fs::read_link(format!("/proc/self/fd/{fd}"));
        if !matches!(&named, Ok(p) if p == std::path::Path::new("/dev/kvm")) {
            eprintln!("thvc-fake-vmm: --kvm-fd {fd}: not /dev/kvm ({named:?})");
            std::process::exit(1);
        }
        say(&format!("fake-vmm: KVM from descriptor {fd}\n"));
    }
    if let Some(user) = opts.get("--user") {
        switch_user(user);
        say(&format!("fake-vmm: running as user {user}\n"));
    }
    if let Some(listener) = listener {
        let api = Api {
            cpus,
            memory,
            ignore_shutdown,
            hang_info: flag("hang_info"),
            devices: fake_devices(disks.len(), nets.len()),
        };
        std::thread::spawn(move || serve_api(listener, api));
    }
    if let Some(path) = reboot_marker {
        if !std::path::Path::new(&path).exists() {
            // Reboot once the guest ran for a moment (and the API answered).
            std::thread::sleep(Duration::from_millis(300));
            let _ = std::fs::write(&path, b"rebooted\n");
            say("fake-vmm: guest requests reboot\n");
            std::process::exit(3);
        }
    }
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}

/// The migration target's side (see the module docs): one source, `RUN` or exit 1.
fn receive_guest(listener: UnixListener) {
    let Ok((stream, _)) = listener.accept() else {
        std::process::exit(1);
    };
    let mut reader = BufReader::new(&stream);
    let mut line = String::new();
    while reader.read_line(&mut line).is_ok_and(|n| n > 0) {
        if line.trim() == "RUN" {
            MIGRATING_IN.store(false, Ordering::SeqCst);
            let _ = (&stream).write_all(b"RESUMED\n");
            return;
        }
        line.clear();
    }
    eprintln!("thvc-fake-vmm: the migration stream ended before the guest arrived");
    std::process::exit(5);
}

/// `--user UID:GID`, as thvc-vmm does it: no supplementary groups, then gid, then uid.
fn switch_user(spec: &str) {
    let parsed = spec
        .split_once(':')
        .and_then(|(u, g)| Some((u.parse::<u32>().ok()?, g.parse::<u32>().ok()?)));
    let Some((uid, gid)) = parsed.filter(|(u, g)| *u != 0 && *g != 0) else {
        usage(&format!("invalid user {spec:?}: UID:GID, not root"))
    };
    // SAFETY: plain credential syscalls, checked one by one.
    let ok = unsafe {
        libc::setgroups(0, std::ptr::null()) == 0
            && libc::setresgid(gid, gid, gid) == 0
            && libc::setresuid(uid, uid, uid) == 0
    };
    if !ok {
        eprintln!(
            "thvc-fake-vmm: switching to {spec}: {}",
            std::io::Error::last_os_error()
        );
        std::process::exit(1);
    }
}

/// The devices `info` reports, in thvc-vmm's format (see the module docs).
fn fake_devices(disks: usize, nets: usize) -> serde_json::Value {
    let mut devices = vec![serde_json::json!({
        "name": "serial0", "kind": "serial", "counters": {"bytes_written": 0}
    })];
    for i in 0..disks as u64 {
        devices.push(serde_json::json!({
            "name": format!("virtio-blk{i}"), "kind": "virtio-blk",
            "counters": {"bytes_read": 4096 * (i + 1), "bytes_written": 512 * (i + 1),
                         "errors": 0, "requests": 10 + i}
        }));
    }
    for i in 0..nets as u64 {
        devices.push(serde_json::json!({
            "name": format!("virtio-net{i}"), "kind": "virtio-net",
            "counters": {"errors": 0, "rx_bytes": 1000 + i, "rx_packets": 10,
                         "tx_bytes": 2000 + i, "tx_packets": 20}
        }));
    }
    serde_json::Value::Array(devices)
}

struct Api {
    cpus: u64,
    memory: u64,
    ignore_shutdown: bool,
    hang_info: bool,
    devices: serde_json::Value,
}

fn serve_api(listener: UnixListener, api: Api) {
    let Api {
        cpus,
        memory,
        ignore_shutdown,
        hang_info,
        devices,
    } = api;
    {
        {
            for stream in listener.incoming().flatten() {
                let devices = devices.clone();
                std::thread::spawn(move || {
                    let mut reader = BufReader::new(&stream);
                    let mut line = String::new();
                    while reader.read_line(&mut line).is_ok_and(|n| n > 0) {
                        let req: serde_json::Value =
                            serde_json::from_str(line.trim()).unwrap_or_default();
                        let (resp, then_exit) = match req["request"].as_str() {
                            Some("ping") => {
                                (serde_json::json!({"ok": true, "result": "pong"}), false)
                            }
                            Some("info") if hang_info => loop {
                                std::thread::sleep(Duration::from_secs(3600));
                            },
                            Some("info") => (
                                serde_json::json!({"ok": true, "result": {
                                    "fake": true,
                                    "state": if MIGRATING_IN.load(Ordering::SeqCst) {
                                        "migrating-in"
                                    } else if PAUSED.load(Ordering::SeqCst) {
                                        "paused"
                                    } else {
                                        "running"
                                    },
                                    "vcpus": cpus, "memory_mib": memory, "pid": std::process::id(),
                                    "devices": devices}}),
                                false,
                            ),
                            Some("pause") => {
                                PAUSED.store(true, Ordering::SeqCst);
                                (serde_json::json!({"ok": true, "result": null}), false)
                            }
                            Some("resume") => {
                                PAUSED.store(false, Ordering::SeqCst);
                                (serde_json::json!({"ok": true, "result": null}), false)
                            }
                            Some("shutdown") => (
                                serde_json::json!({"ok": true, "result": null}),
                                !ignore_shutdown,
                            ),
                            Some("stop") => (serde_json::json!({"ok": true, "result": null}), true),
                            _ => (
                                serde_json::json!({"ok": false, "error": format!("unknown request {}", line.trim())}),
                                false,
                            ),
                        };
                        let mut w = &stream;
                        let _ = w.write_all(format!("{resp}\n").as_bytes());
                        if then_exit {
                            std::thread::sleep(Duration::from_millis(50));
                            std::process::exit(0);
                        }
                        line.clear();
                    }
                });
            }
        }
    }
}
