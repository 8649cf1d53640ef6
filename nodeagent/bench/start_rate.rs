//! Benchmark (not a test): how fast the node agent defines and starts real VMs.
//!
//! The real `thvc-nodeagent` (direct runner) on a private dbus-daemon with the real
//! `thvc-vmm` (built next to the agent), N tiny guests (1 vCPU, Debian's kernel and the test
//! initramfs, which idles after printing `THVC-GUEST-READY`). Measures:
//! 1. CreateVm rate (one client, N VMs);
//! 2. per round: all N started at once; per VM, Start until State `running` and Start until
//!    the guest's first marker line in `ReadConsole`; the aggregate rates; then Stop of all
//!    N at once until `stopped`.
//!
//! Boots real guests, so it needs KVM that boots Linux and the guest assets: it runs in the
//! test VM (nested KVM under TCG, so guest boot times are far slower than on hardware):
//! ```text
//! integration/bench/agent-start.sh [--vms N] [--memory MIB] [--rounds R]
//! ```
//! Without KVM or its assets it fails and says so; it never prints numbers it did not measure.

#[path = "../tests/common/mod.rs"]
mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::*;
use thvc_nodeagent::client::VmProxy;

/// What the test initramfs prints first once its userspace runs (integration/guest/init).
const MARKER: &str = "THVC-GUEST-READY";
/// `hang`: the guest idles after its report, so it is still running when stopped.
const CMDLINE: &str = "console=ttyS0 panic=1 pci=off quiet thvc.action=hang";
/// Bound for one guest's boot: N nested guests share the test VM's two emulated CPUs.
const GUEST_TIMEOUT: Duration = Duration::from_secs(600);
/// ReadConsole polling interval; small against nested boot times of seconds.
const CONSOLE_POLL: Duration = Duration::from_millis(100);

const USAGE: &str = "usage: start_rate [--vms N] [--memory MIB] [--rounds R]";

struct Options {
    vms: usize,
    memory_mib: u32,
    rounds: usize,
}

fn parse_options() -> Result<Options, String> {
    let mut o = Options {
        vms: 8,
        memory_mib: 128,
        rounds: 3,
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        // cargo bench passes --bench to harness = false targets.
        if arg == "--bench" {
            continue;
        }
        let value = args.next().ok_or_else(|| format!("{arg} needs a value"))?;
        let number: usize = value
            .parse()
            .ok()
            .filter(|&n| n > 0)
            .ok_or_else(|| format!("{arg} takes a positive integer, got {value:?}"))?;
        match arg.as_str() {
            "--vms" => o.vms = number,
            "--memory" => {
                o.memory_mib = u32::try_from(number).map_err(|_| format!("--memory {value}"))?
            }
            "--rounds" => o.rounds = number,
            _ => return Err(format!("unknown argument {arg:?}")),
        }
    }
    Ok(o)
}

/// Per-VM timings of one round, from that VM's Start call.
struct Boot {
    running: Duration,
    marker: Duration,
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

fn median_f64(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[(v.len() - 1) / 2]
}

fn name(i: usize) -> String {
    format!("bench{i:02}")
}

/// The agent's log and the VM's VMM and console logs, for a failure message.
fn diagnostics(root: &Path, log_dir: &Path, vm: &str) -> String {
    let mut s = String::new();
    for p in [
        root.join("agent.log"),
        log_dir.join(vm).join("vmm.log"),
        log_dir.join(vm).join("console.log"),
    ] {
        let text = std::fs::read_to_string(&p).unwrap_or_else(|e| format!("({e})"));
        s += &format!("---- {}:\n{text}\n", p.display());
    }
    s
}

/// Starts `v`, waits for `running` (State signal) and then for the marker on its console.
async fn boot(
    conn: zbus::Connection,
    v: VmProxy<'static>,
    vm: String,
    root: PathBuf,
    log_dir: PathBuf,
) -> Result<Boot, String> {
    let fail = |what: String| format!("{vm}: {what}\n{}", diagnostics(&root, &log_dir, &vm));
    let path = v.inner().path().clone().into();
    let mut states = StateWatcher::new(&conn, &path).await;
    // Console offsets grow across the VM's runs: skip what earlier rounds' guests printed.
    let mut offset = 0u64;
    loop {
        let (data, next) = v
            .read_console(offset)
            .await
            .map_err(|e| fail(format!("ReadConsole: {e}")))?;
        offset = next;
        if data.is_empty() {
            break;
        }
    }
    let t0 = Instant::now();
    v.start()
        .await
        .map_err(|e| fail(format!("Start failed: {e}")))?;
    // The agent emits `running` before it answers Start: the signal is already queued.
    let seen = states.wait_for("running").await;
    let running = t0.elapsed();
    if seen != ["starting", "running"] {
        return Err(fail(format!("states {seen:?}")));
    }
    let mut console = String::new();
    loop {
        let (data, next) = v
            .read_console(offset)
            .await
            .map_err(|e| fail(format!("ReadConsole: {e}")))?;
        console.push_str(&String::from_utf8_lossy(&data));
        offset = next;
        if console.contains(MARKER) {
            return Ok(Boot {
                running,
                marker: t0.elapsed(),
            });
        }
        if t0.elapsed() > GUEST_TIMEOUT {
            return Err(fail(format!(
                "no {MARKER} on the console after {GUEST_TIMEOUT:?} (KVM that cannot boot \
                 Linux? this benchmark runs in the test VM)"
            )));
        }
        if data.is_empty() {
            tokio::time::sleep(CONSOLE_POLL).await;
        }
    }
}

/// Stops `v` and checks it is `stopped`; returns how long Stop took.
async fn stop(v: VmProxy<'static>, vm: String) -> Result<Duration, String> {
    let t0 = Instant::now();
    v.stop()
        .await
        .map_err(|e| format!("{vm}: Stop failed: {e}"))?;
    let took = t0.elapsed();
    let state = v.state().await.map_err(|e| format!("{vm}: State: {e}"))?;
    if state != "stopped" {
        return Err(format!("{vm}: state {state} after Stop"));
    }
    Ok(took)
}

/// Waits for every task; panics with the first failure's message.
async fn join_all<T>(tasks: Vec<tokio::task::JoinHandle<Result<T, String>>>) -> Vec<T> {
    let mut out = Vec::new();
    for t in tasks {
        match t.await {
            Ok(Ok(v)) => out.push(v),
            Ok(Err(msg)) => panic!("{msg}"),
            Err(e) => std::panic::resume_unwind(e.into_panic()),
        }
    }
    out
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|e| format!("({e})"))
}

fn main() {
    let opts = parse_options().unwrap_or_else(|e| {
        eprintln!("start_rate: {e}\n{USAGE}");
        std::process::exit(2);
    });
    assert!(
        Path::new("/dev/kvm").exists(),
        "/dev/kvm is missing: this benchmark boots real guests; run it in the test VM with \
         integration/bench/agent-start.sh"
    );
    let vmm = real_vmm();
    let dirs = node_dirs_with_guest_images();
    let bus = TestBus::start();
    let root = dirs.root.path().to_path_buf();
    let agent_log = root.join("agent.log");
    let _agent = Agent::start_full(
        &bus,
        &dirs,
        &[
            "--vmm",
            vmm.to_str().expect("utf-8 path"),
            "--start-timeout",
            "120",
            "--stop-timeout",
            "30",
        ],
        &[],
        &[("RUST_LOG", "info")],
        Some(&agent_log),
    );
    let spec = format!(
        r#"{{"vcpus":1,"memory_mib":{},"kernel":"vmlinuz","initrd":"guest.cpio.gz","cmdline":"{CMDLINE}"}}"#,
        opts.memory_mib
    );
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let load_before = loadavg();
    rt.block_on(async {
        let conn = connect(&bus).await;
        let m = manager(&conn).await;

        let t = Instant::now();
        let mut paths = Vec::new();
        for i in 0..opts.vms {
            paths.push(m.create_vm(&name(i), &spec).await.expect("CreateVm"));
        }
        let create_rate = opts.vms as f64 / t.elapsed().as_secs_f64();
        let mut vms = Vec::new();
        for p in paths {
            vms.push(vm(&conn, p).await);
        }

        let (mut running, mut marker, mut stops) = (Vec::new(), Vec::new(), Vec::new());
        let (mut all_running, mut all_marker, mut all_stopped) =
            (Vec::new(), Vec::new(), Vec::new());
        for round in 1..=opts.rounds {
            let t = Instant::now();
            let tasks = vms
                .iter()
                .enumerate()
                .map(|(i, v)| {
                    tokio::spawn(boot(
                        conn.clone(),
                        v.clone(),
                        name(i),
                        root.clone(),
                        dirs.log(),
                    ))
                })
                .collect();
            let boots = join_all(tasks).await;
            let last_running = boots.iter().map(|b| b.running).max().unwrap_or_default();
            let last_marker = boots.iter().map(|b| b.marker).max().unwrap_or_default();
            let wall = t.elapsed();

            let t = Instant::now();
            let tasks = vms
                .iter()
                .enumerate()
                .map(|(i, v)| tokio::spawn(stop(v.clone(), name(i))))
                .collect();
            let stopped = join_all(tasks).await;
            let stop_wall = t.elapsed();
            eprintln!(
                "round {round}: all running after {:.2} s, all guests ready after {:.2} s \
                 (round {:.2} s), all stopped after {:.2} s",
                last_running.as_secs_f64(),
                last_marker.as_secs_f64(),
                wall.as_secs_f64(),
                stop_wall.as_secs_f64()
            );
            all_running.push(opts.vms as f64 / last_running.as_secs_f64());
            all_marker.push(opts.vms as f64 / last_marker.as_secs_f64());
            all_stopped.push(opts.vms as f64 / stop_wall.as_secs_f64());
            running.extend(boots.iter().map(|b| b.running));
            marker.extend(boots.iter().map(|b| b.marker));
            stops.extend(stopped);
        }
        running.sort();
        marker.sort();
        stops.sort();

        let n = opts.vms;
        println!();
        println!(
            "thvc-nodeagent start benchmark: real thvc-vmm, real guests ({n} VMs of 1 vCPU, \
             {} MiB; {} rounds; {} CPUs)",
            opts.memory_mib,
            opts.rounds,
            thvc_nodeagent::hostinfo::cpus()
        );
        println!(
            "NESTED: the guests run on KVM inside a TCG-emulated test VM; absolute boot times \
             are far slower than on hardware."
        );
        println!("load average before / after: {load_before} / {}", loadavg());
        println!();
        println!("{:<56} {:>10}", "rate", "VMs/s");
        println!(
            "{:<56} {:>10.1}",
            format!("CreateVm, 1 client ({n} VMs)"),
            create_rate
        );
        println!(
            "{:<56} {:>10.2}",
            format!("Start {n} at once until all running (median)"),
            median_f64(all_running)
        );
        println!(
            "{:<56} {:>10.2}",
            format!("Start {n} at once until all print {MARKER} (median)"),
            median_f64(all_marker)
        );
        println!(
            "{:<56} {:>10.2}",
            format!("Stop {n} at once until all stopped (median)"),
            median_f64(all_stopped)
        );
        println!();
        println!(
            "{:<56} {:>10} {:>10} {:>8}",
            "per VM, all started at once", "p50 s", "max s", "samples"
        );
        for (what, v) in [
            ("Start until State running", &running),
            ("Start until console shows THVC-GUEST-READY", &marker),
            ("Stop until stopped", &stops),
        ] {
            println!(
                "{:<56} {:>10.3} {:>10.3} {:>8}",
                what,
                percentile(v, 0.5).as_secs_f64(),
                percentile(v, 1.0).as_secs_f64(),
                v.len()
            );
        }
    });
}
