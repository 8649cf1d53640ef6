//! Test harness: every test runs in its own network namespace (and mount namespace, so
//! /sys shows that network namespace) on a dedicated thread, with veth pairs as NICs.
//! The kernel state is checked with iproute2's JSON output, independently of our observer.

#![allow(dead_code)]

use std::future::Future;
use std::path::{Path, PathBuf};
use std::process::Command;

use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sched::{unshare, CloneFlags};
use serde_json::Value;

/// Runs `test` in a fresh network namespace on its own thread with a current-thread tokio
/// runtime. Fails loudly when namespaces cannot be made (tests need root).
pub fn in_netns<F, Fut>(test: F)
where
    F: FnOnce(PathBuf) -> Fut + Send + 'static,
    Fut: Future<Output = ()>,
{
    let thread = std::thread::spawn(move || {
        // Namespaces are per thread: this thread (and the processes it spawns) get new ones.
        unshare(CloneFlags::CLONE_NEWNET | CloneFlags::CLONE_NEWNS)
            .expect("unshare(CLONE_NEWNET|CLONE_NEWNS) failed: these tests must run as root");
        mount(
            None::<&str>,
            "/",
            None::<&str>,
            MsFlags::MS_REC | MsFlags::MS_PRIVATE,
            None::<&str>,
        )
        .expect("make mounts private");
        umount2("/sys", MntFlags::MNT_DETACH).expect("detach /sys");
        mount(
            Some("sysfs"),
            "/sys",
            Some("sysfs"),
            MsFlags::empty(),
            None::<&str>,
        )
        .expect("mount a sysfs for the new network namespace");
        let state_dir = std::env::temp_dir().join(format!(
            "netconf-test-{}-{:?}",
            std::process::id(),
            std::thread::current().id()
        ));
        let _ = std::fs::remove_dir_all(&state_dir);
        ip(&["link", "set", "lo", "up"]);
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("tokio runtime");
        runtime.block_on(test(state_dir.clone()));
        let _ = std::fs::remove_dir_all(&state_dir);
    });
    if let Err(panic) = thread.join() {
        std::panic::resume_unwind(panic);
    }
}

fn run(program: &str, args: &[&str]) -> String {
    let output = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}"));
    assert!(
        output.status.success(),
        "{program} {} failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// Runs `ip ARGS`, panicking with its stderr on failure.
pub fn ip(args: &[&str]) -> String {
    run("ip", args)
}

/// `ip -j ARGS` parsed.
pub fn ip_json(args: &[&str]) -> Value {
    let mut full = vec!["-j"];
    full.extend_from_slice(args);
    let text = ip(&full);
    serde_json::from_str(&text)
        .unwrap_or_else(|e| panic!("ip {full:?} output is not JSON ({e}): {text}"))
}

/// `bridge -j vlan show` parsed.
pub fn bridge_vlans() -> Value {
    serde_json::from_str(&run("bridge", &["-j", "vlan", "show"])).expect("bridge -j output")
}

/// Makes a veth pair standing in for a NIC (`name`) and its switch port (`peer`).
pub fn veth(name: &str, peer: &str) {
    ip(&["link", "add", name, "type", "veth", "peer", "name", peer]);
}

/// `ip -d link show NAME` as JSON (one object).
pub fn link(name: &str) -> Value {
    ip_json(&["-d", "link", "show", "dev", name])[0].clone()
}

pub fn link_exists(name: &str) -> bool {
    Path::new("/sys/class/net").join(name).exists()
}

pub fn mtu(name: &str) -> u64 {
    link(name)["mtu"].as_u64().expect("mtu")
}

pub fn master(name: &str) -> Option<String> {
    link(name)["master"].as_str().map(str::to_string)
}

pub fn is_up(name: &str) -> bool {
    link(name)["flags"]
        .as_array()
        .expect("flags")
        .iter()
        .any(|f| f == "UP")
}

pub fn kind(name: &str) -> Option<String> {
    link(name)["linkinfo"]["info_kind"]
        .as_str()
        .map(str::to_string)
}

/// Global addresses of `name` as "addr/len", sorted.
pub fn addresses(name: &str) -> Vec<String> {
    let info = ip_json(&["addr", "show", "dev", name]);
    let mut list: Vec<String> = info[0]["addr_info"]
        .as_array()
        .expect("addr_info")
        .iter()
        .filter(|a| a["scope"] == "global")
        .map(|a| format!("{}/{}", a["local"].as_str().unwrap_or("?"), a["prefixlen"]))
        .collect();
    list.sort();
    list
}

/// Routes through `name` in table `table` as "dst via gw metric m proto p" strings.
pub fn routes(family: &str, name: &str) -> Vec<String> {
    let info = ip_json(&[family, "route", "show", "table", "all", "dev", name]);
    let mut list: Vec<String> = info
        .as_array()
        .expect("routes")
        .iter()
        .filter(|r| r["type"].is_null() || r["type"] == "unicast")
        .filter(|r| r["table"].is_null() || r["table"] != "local")
        .map(|r| {
            let mut text = r["dst"].as_str().unwrap_or("?").to_string();
            if let Some(gw) = r["gateway"].as_str() {
                text.push_str(&format!(" via {gw}"));
            }
            if let Some(metric) = r["metric"].as_u64() {
                text.push_str(&format!(" metric {metric}"));
            }
            text.push_str(&format!(" proto {}", r["protocol"].as_str().unwrap_or("?")));
            text
        })
        .collect();
    list.sort();
    list
}

/// Everything about the namespace's links, addresses and routes, to prove "no change".
pub fn snapshot() -> String {
    // The kernel's operational state moves on its own (a veth's carrier, IPv6 duplicate
    // address detection, counters): it changed between two snapshots of one unchanged
    // configuration in a CI run. Kept: the configuration.
    const OPERATIONAL: [&str; 4] = ["NO-CARRIER", "LOWER_UP", "M-DOWN", "DORMANT"];
    let links = ip(&["-d", "-j", "link", "show"]);
    let links: Value = serde_json::from_str(&links).expect("links json");
    let links: Vec<Value> = links
        .as_array()
        .expect("links")
        .iter()
        .map(|l| {
            let flags: Vec<&Value> = l["flags"]
                .as_array()
                .map(|f| {
                    f.iter()
                        .filter(|f| !OPERATIONAL.contains(&f.as_str().unwrap_or("")))
                        .collect()
                })
                .unwrap_or_default();
            serde_json::json!({
                "ifname": l["ifname"], "mtu": l["mtu"], "flags": flags, "master": l["master"],
                "kind": l["linkinfo"]["info_kind"], "address": l["address"],
            })
        })
        .collect();
    let addrs = ip(&["-j", "addr", "show"]);
    let addrs: Value = serde_json::from_str(&addrs).expect("addresses json");
    let addrs: Vec<Value> = addrs
        .as_array()
        .expect("addresses")
        .iter()
        .map(|l| {
            let info: Vec<Value> = l["addr_info"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .map(|a| {
                            serde_json::json!({"family": a["family"], "local": a["local"],
                            "prefixlen": a["prefixlen"], "scope": a["scope"]})
                        })
                        .collect()
                })
                .unwrap_or_default();
            serde_json::json!({"ifname": l["ifname"], "addresses": info})
        })
        .collect();
    let routes =
        |family: &str| ip(&[family, "route", "show", "table", "all"]).replace(" linkdown", "");
    format!(
        "{}\n{}\n{}\n{}",
        serde_json::to_string_pretty(&links).unwrap_or_default(),
        serde_json::to_string_pretty(&addrs).unwrap_or_default(),
        routes("-4"),
        routes("-6"),
    )
}

pub fn sysfs(name: &str, attribute: &str) -> String {
    std::fs::read_to_string(Path::new("/sys/class/net").join(name).join(attribute))
        .unwrap_or_else(|e| panic!("/sys/class/net/{name}/{attribute}: {e}"))
        .trim()
        .to_string()
}
