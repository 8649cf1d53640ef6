//! Benchmark (not a test): `cargo bench -p thvc-nodeagent --bench apply_fleet [-- --vms N
//! --rounds R --vmm-uids]`.
//!
//! What a control plane sees when it hands a node its whole fleet at once: on a private
//! dbus-daemon with the real agent and the fake VMM test double, per round (a fresh agent):
//! 1. `ApplyVms` of N VMs (create + start; default 100) until its job ends, while a second
//!    client calls ListVms back to back: the apply's time and ListVms' p50/p99/max during it;
//! 2. the re-apply of the same document (no changes): its time, and ListVms meanwhile;
//! 3. ListVms on the quiet agent with the same N VMs running: the baseline, and the ratio
//!    of the p99 during the apply to it.
//!
//! With `--vmm-uids` the agent gives each VM's VMM a uid of its own (as the systemd runner
//! requires on a node: the ACL grants on each VM's files are part of every create and start);
//! without, every VMM runs as the agent's user, as before per-VM uids existed. Run as root.
//!
//! Prints medians over the rounds; nothing passes or fails.

#[path = "../tests/common/mod.rs"]
mod common;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use futures_util::StreamExt;

const USAGE: &str = "usage: apply_fleet [--vms N] [--rounds R] [--vmm-uids]";

/// The options: VMs per apply, rounds, per-VM VMM uids.
struct Options {
    vms: usize,
    rounds: usize,
    vmm_uids: bool,
}
const QUIET_SAMPLES: usize = 2000;

fn parse_options() -> Result<Options, String> {
    let (mut vms, mut rounds, mut vmm_uids) = (100, 3, false);
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        // cargo bench passes --bench to harness = false targets.
        if arg == "--bench" {
            continue;
        }
        if arg == "--vmm-uids" {
            vmm_uids = true;
            continue;
        }
        let value = args.next().ok_or_else(|| format!("{arg} needs a value"))?;
        let n: usize = value
            .parse()
            .ok()
            .filter(|&n| n > 0)
            .ok_or_else(|| format!("{arg} takes a positive integer, got {value:?}"))?;
        match arg.as_str() {
            "--vms" => vms = n,
            "--rounds" => rounds = n,
            _ => return Err(format!("unknown argument {arg:?}")),
        }
    }
    Ok(Options {
        vms,
        rounds,
        vmm_uids,
    })
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[(v.len() - 1) / 2]
}

fn document(vms: usize) -> String {
    let entries: Vec<serde_json::Value> = (0..vms)
        .map(|i| {
            serde_json::json!({
                "name": format!("fleet{i:03}"),
                "state": "running",
                "spec": {"vcpus": 1, "memory_mib": 64, "kernel": "vmlinuz"}
            })
        })
        .collect();
    serde_json::json!({ "vms": entries }).to_string()
}

/// ListVms back to back until `stop`; the sorted latencies.
async fn list_until(
    m: thvc_nodeagent::client::ManagerProxy<'static>,
    stop: Arc<AtomicBool>,
) -> Vec<Duration> {
    let mut v = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        let t = Instant::now();
        m.list_vms().await.expect("ListVms");
        v.push(t.elapsed());
    }
    v.sort();
    v
}

/// Applies `doc` while another client lists; (time until the job ended, ListVms latencies,
/// number of actions).
async fn apply_timed(bus: &TestBus, doc: &str) -> (Duration, Vec<Duration>, usize) {
    let conn = connect(bus).await;
    let m = manager(&conn).await;
    let lister_conn = connect(bus).await;
    let lister = manager(&lister_conn).await;
    let stop = Arc::new(AtomicBool::new(false));
    let listing = tokio::spawn(list_until(lister, stop.clone()));
    let mut removed = m.receive_job_removed().await.expect("subscribe");
    let t0 = Instant::now();
    let (plan, job) = m.apply_vms(doc, false).await.expect("ApplyVms");
    let plan: serde_json::Value = serde_json::from_str(&plan).expect("plan");
    let actions = plan["actions"].as_array().map_or(0, Vec::len);
    if job.as_str() != "/" {
        loop {
            let signal = removed.next().await.expect("JobRemoved");
            let args = signal.args().expect("args");
            if args.path.as_str() == job.as_str() {
                assert_eq!(args.result, "done", "the apply failed: {}", args.message);
                break;
            }
        }
    }
    let took = t0.elapsed();
    stop.store(true, Ordering::Relaxed);
    let lat = listing.await.expect("lister");
    (took, lat, actions)
}

fn main() {
    let Options {
        vms,
        rounds,
        vmm_uids,
    } = match parse_options() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("{e}\n{USAGE}");
            std::process::exit(2);
        }
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let doc = document(vms);
    let mut rows: Vec<[f64; 9]> = Vec::new();
    for round in 1..=rounds {
        let bus = TestBus::start();
        let dirs = NodeDirs::new();
        // Room for N one-vCPU VMs on a small host; memory stays within the host's.
        let uids = format!("600000-{}", 600000 + vms - 1);
        let mut args = vec!["--vcpu-overcommit", "64"];
        if vmm_uids {
            args.extend(["--vmm-uids", uids.as_str()]);
        }
        let _agent = Agent::start(&bus, &dirs, &args);
        let row = rt.block_on(async {
            let (apply, during, actions) = apply_timed(&bus, &doc).await;
            assert_eq!(actions, 2 * vms, "create and start per VM");
            let (reapply, during_re, actions) = apply_timed(&bus, &doc).await;
            assert_eq!(actions, 0, "the re-apply changes nothing");
            let conn = connect(&bus).await;
            let m = manager(&conn).await;
            let running = m
                .list_vms()
                .await
                .expect("ListVms")
                .iter()
                .filter(|v| v.1 == "running")
                .count();
            assert_eq!(running, vms);
            let mut quiet = Vec::with_capacity(QUIET_SAMPLES);
            for _ in 0..QUIET_SAMPLES {
                let t = Instant::now();
                m.list_vms().await.expect("ListVms");
                quiet.push(t.elapsed());
            }
            quiet.sort();
            [
                ms(apply),
                ms(percentile(&during, 0.5)),
                ms(percentile(&during, 0.99)),
                ms(*during.last().unwrap_or(&Duration::ZERO)),
                ms(reapply),
                ms(percentile(&during_re, 0.99)),
                ms(percentile(&quiet, 0.5)),
                ms(percentile(&quiet, 0.99)),
                during.len() as f64,
            ]
        });
        println!(
            "round {round}: apply {:.0} ms (ListVms during it: p50 {:.2} p99 {:.2} max {:.2} ms, {} calls); \
             re-apply {:.1} ms (p99 {:.2} ms); quiet ListVms p50 {:.2} p99 {:.2} ms",
            row[0], row[1], row[2], row[3], row[8], row[4], row[5], row[6], row[7]
        );
        rows.push(row);
    }
    let col = |i: usize| median(rows.iter().map(|r| r[i]).collect());
    let users = if vmm_uids {
        "a uid per VMM"
    } else {
        "VMMs as the agent's user"
    };
    println!(
        "\nApplyVms of {vms} VMs (create + start, fake VMM, {users}), medians of {rounds} rounds:"
    );
    println!("  apply until its job ended         {:>9.0} ms", col(0));
    println!(
        "  ListVms during it    p50 / p99    {:>9.2} / {:.2} ms (max {:.2})",
        col(1),
        col(2),
        col(3)
    );
    println!("  re-apply (no changes)             {:>9.1} ms", col(4));
    println!("  ListVms during the re-apply p99   {:>9.2} ms", col(5));
    println!(
        "  ListVms, quiet agent p50 / p99    {:>9.2} / {:.2} ms",
        col(6),
        col(7)
    );
    println!(
        "  p99 during the apply / quiet p99  {:>9.1}x",
        col(2) / col(7)
    );
}
