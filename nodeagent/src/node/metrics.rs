//! Per-VM metrics for Prometheus: what the node knows about each VM (state, size), what its
//! runner knows about the VMM process (CPU time, memory) and the device counters the VMM
//! reports in its `info`, gathered every `--metrics-interval` and written to
//! `--metrics-file` for node-exporter's textfile collector (see [`crate::metrics`] for the
//! format and the file, and the README for the series).
//!
//! Gathering must never hold up the bus: the VM table is locked only to copy the list, each
//! VM's status lock only to copy its fields, the VMMs are asked concurrently with a timeout
//! of [`VMM_TIMEOUT`] each (a hung VMM costs one missing VM, marked by
//! `thvc_vm_metrics_up 0`, not a stalled scrape), and /proc and record reads run on the
//! blocking threads (in the runner).

use super::*;
use crate::metrics::{self, Family, Kind};
use crate::runner::VmmUsage;

/// How long one VMM may take to answer `info` (and its runner to say what it used) for one
/// round of metrics.
pub const VMM_TIMEOUT: Duration = Duration::from_secs(2);

/// The device counters of the VMM's `info` (`devices[]`: `name`, `kind`, `counters`; see
/// thvc-vmm's `devices/metrics.rs`) that become series, labelled with the VMM's device name
/// (`virtio-blk0`, `virtio-net1`: the spec's disks and NICs in order, see the README):
/// (device kind, counter name, series, help).
const DEVICE_SERIES: &[(&str, &str, &str, &str)] = &[
    (
        "virtio-blk",
        "bytes_read",
        "thvc_vm_disk_read_bytes_total",
        "Bytes the guest read from the disk.",
    ),
    (
        "virtio-blk",
        "bytes_written",
        "thvc_vm_disk_written_bytes_total",
        "Bytes the guest wrote to the disk.",
    ),
    (
        "virtio-blk",
        "requests",
        "thvc_vm_disk_requests_total",
        "Requests the guest made to the disk.",
    ),
    (
        "virtio-blk",
        "errors",
        "thvc_vm_disk_errors_total",
        "Disk requests that failed.",
    ),
    (
        "virtio-net",
        "rx_bytes",
        "thvc_vm_net_rx_bytes_total",
        "Bytes the guest received on the NIC.",
    ),
    (
        "virtio-net",
        "tx_bytes",
        "thvc_vm_net_tx_bytes_total",
        "Bytes the guest sent on the NIC.",
    ),
    (
        "virtio-net",
        "rx_packets",
        "thvc_vm_net_rx_packets_total",
        "Packets the guest received on the NIC.",
    ),
    (
        "virtio-net",
        "tx_packets",
        "thvc_vm_net_tx_packets_total",
        "Packets the guest sent on the NIC.",
    ),
    (
        "virtio-net",
        "errors",
        "thvc_vm_net_errors_total",
        "NIC operations that failed (backend errors, malformed frames).",
    ),
];

const ALL_STATES: [VmState; 7] = [
    VmState::Defined,
    VmState::Starting,
    VmState::Running,
    VmState::Paused,
    VmState::Stopping,
    VmState::Stopped,
    VmState::Failed,
];

/// One VM as the node sees it, copied out of its status lock.
struct VmFacts {
    name: String,
    uuid: String,
    state: VmState,
    vcpus: u32,
    memory_mib: u64,
    /// A VMM process exists (see `VmStatus::process`).
    process: bool,
}

/// What the VMM of a VM said, if it has one.
struct VmmFacts {
    /// `info` answered within [`VMM_TIMEOUT`].
    info: Option<serde_json::Value>,
    usage: Option<VmmUsage>,
}

impl Node {
    /// Writes the metrics to `file` now and every `interval` after, until the node is gone.
    /// A round that fails to write is logged (once per kind of failure in a row) and the
    /// next one tries again.
    pub async fn metrics_loop(node: Weak<Node>, file: PathBuf, interval: Duration) {
        if let Some(dir) = file.parent().map(Path::to_owned) {
            // What an agent killed while writing left behind.
            let _ = blocking(move || fsutil::remove_stale_temps(&dir)).await;
        }
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut last_error: Option<String> = None;
        loop {
            tick.tick().await;
            let Some(node) = node.upgrade() else {
                return;
            };
            let text = metrics::render(&node.collect_metrics().await);
            drop(node);
            let target = file.clone();
            let result = blocking(move || metrics::write_file(&target, &text))
                .await
                .and_then(|r| r.map_err(io));
            match result {
                Ok(()) => {
                    if last_error.take().is_some() {
                        tracing::info!(file = %file.display(), "writing metrics again");
                    }
                }
                Err(e) => {
                    let e = e.to_string();
                    if last_error.as_deref() != Some(&e) {
                        tracing::warn!(file = %file.display(), "cannot write metrics: {e}");
                    }
                    last_error = Some(e);
                }
            }
        }
    }

    /// The node's metric families, every VM's series in them.
    pub async fn collect_metrics(&self) -> Vec<Family> {
        let facts: Vec<VmFacts> = self
            .list()
            .iter()
            .map(|vm| {
                let st = vm.lock();
                VmFacts {
                    name: vm.name.clone(),
                    uuid: st.spec.uuid.clone().unwrap_or_default(),
                    state: st.state,
                    vcpus: st.spec.vcpus,
                    memory_mib: st.spec.memory_mib,
                    process: st.process,
                }
            })
            .collect();
        // Only VMs with a VMM are asked (`then_some` would ask them all and drop answers).
        let asked = futures_util::future::join_all(facts.iter().map(|f| async move {
            if f.process {
                Some(self.vmm_facts(&f.name).await)
            } else {
                None
            }
        }))
        .await;
        build_families(&facts, &asked)
    }

    /// Asks the VMM of `name` for its `info` and its runner for its usage, each within
    /// [`VMM_TIMEOUT`].
    async fn vmm_facts(&self, name: &str) -> VmmFacts {
        let socket = self.cfg.layout.api_socket(name);
        let info = async {
            match tokio::time::timeout(VMM_TIMEOUT, vmm_api::call(&socket, Request::Info)).await {
                Ok(Ok(v)) => Some(v),
                Ok(Err(e)) => {
                    tracing::debug!(vm = %name, "metrics: the VMM's info failed: {e}");
                    None
                }
                Err(_) => {
                    tracing::debug!(vm = %name, "metrics: the VMM's info took over {VMM_TIMEOUT:?}");
                    None
                }
            }
        };
        let usage = async {
            match tokio::time::timeout(VMM_TIMEOUT, self.runner.usage(name)).await {
                Ok(Ok(u)) => u,
                Ok(Err(e)) => {
                    tracing::debug!(vm = %name, "metrics: the VMM's usage: {e}");
                    None
                }
                Err(_) => None,
            }
        };
        let (info, usage) = tokio::join!(info, usage);
        VmmFacts { info, usage }
    }
}

/// The families from the VMs' facts (`asked[i]` belongs to `facts[i]`; `None`: no VMM).
fn build_families(facts: &[VmFacts], asked: &[Option<VmmFacts>]) -> Vec<Family> {
    let vm = |f: &VmFacts| vec![("vm", f.name.clone())];
    let mut info = Family::new(
        "thvc_vm_info",
        Kind::Gauge,
        "A VM of this node (always 1), with its UUID and state.",
    );
    let mut vcpus = Family::new(
        "thvc_vm_vcpus",
        Kind::Gauge,
        "vCPUs the VM's spec gives it.",
    );
    let mut memory = Family::new(
        "thvc_vm_memory_bytes",
        Kind::Gauge,
        "Memory the VM's spec gives it, in bytes.",
    );
    let mut running = Family::new(
        "thvc_vm_running",
        Kind::Gauge,
        "1 if the VM's state is running, else 0.",
    );
    let mut up = Family::new(
        "thvc_vm_metrics_up",
        Kind::Gauge,
        "For a VM with a VMM process: 1 if the VMM answered info for these metrics, 0 if not.",
    );
    let mut cpu = Family::new(
        "thvc_vm_cpu_seconds_total",
        Kind::Counter,
        "CPU time (user and system) of the VM's VMM (vCPUs and devices), in seconds.",
    );
    let mut rss = Family::new(
        "thvc_vm_memory_rss_bytes",
        Kind::Gauge,
        "Resident memory of the VM's VMM process (VmRSS; direct runner).",
    );
    let mut cgroup = Family::new(
        "thvc_vm_memory_cgroup_bytes",
        Kind::Gauge,
        "Memory charged to the VM's unit (systemd runner: MemoryCurrent, page cache included).",
    );
    let mut devices: Vec<Family> = DEVICE_SERIES
        .iter()
        .map(|(_, _, name, help)| Family::new(name, Kind::Counter, help))
        .collect();
    let mut per_state = Family::new("thvc_vms", Kind::Gauge, "VMs of this node by state.");

    for (f, vmm) in facts.iter().zip(asked) {
        info.push(
            vec![
                ("vm", f.name.clone()),
                ("uuid", f.uuid.clone()),
                ("state", f.state.as_str().to_owned()),
            ],
            1.0,
        );
        vcpus.push(vm(f), f64::from(f.vcpus));
        memory.push(vm(f), f.memory_mib.saturating_mul(1 << 20) as f64);
        running.push(
            vm(f),
            if f.state == VmState::Running {
                1.0
            } else {
                0.0
            },
        );
        let Some(vmm) = vmm else {
            continue;
        };
        up.push(vm(f), if vmm.info.is_some() { 1.0 } else { 0.0 });
        if let Some(u) = vmm.usage {
            if let Some(s) = u.cpu_seconds {
                cpu.push(vm(f), s);
            }
            if let Some(b) = u.rss_bytes {
                rss.push(vm(f), b as f64);
            }
            if let Some(b) = u.cgroup_memory_bytes {
                cgroup.push(vm(f), b as f64);
            }
        }
        let listed = vmm
            .info
            .as_ref()
            .and_then(|i| i["devices"].as_array())
            .into_iter()
            .flatten();
        for dev in listed {
            let (Some(name), Some(kind)) = (dev["name"].as_str(), dev["kind"].as_str()) else {
                continue;
            };
            for ((k, counter, _, _), family) in DEVICE_SERIES.iter().zip(devices.iter_mut()) {
                if *k != kind {
                    continue;
                }
                if let Some(v) = dev["counters"][*counter].as_u64() {
                    family.push(
                        vec![("vm", f.name.clone()), ("device", name.to_owned())],
                        v as f64,
                    );
                }
            }
        }
    }
    for state in ALL_STATES {
        let n = facts.iter().filter(|f| f.state == state).count();
        per_state.push(vec![("state", state.as_str().to_owned())], n as f64);
    }
    let mut out = vec![
        per_state, info, vcpus, memory, running, up, cpu, rss, cgroup,
    ];
    out.append(&mut devices);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts(name: &str, state: VmState, process: bool) -> VmFacts {
        VmFacts {
            name: name.to_owned(),
            uuid: format!("uuid-{name}"),
            state,
            vcpus: 2,
            memory_mib: 512,
            process,
        }
    }

    #[test]
    fn counters_end_in_total_and_every_family_has_a_name_of_its_own() {
        let families = build_families(&[], &[]);
        let mut names: Vec<&str> = families.iter().map(|f| f.name).collect();
        for f in &families {
            assert!(f.name.starts_with("thvc_"), "{}", f.name);
            assert_eq!(
                f.kind == Kind::Counter,
                f.name.ends_with("_total"),
                "{}: counters and only counters end in _total",
                f.name
            );
        }
        names.sort();
        names.dedup();
        assert_eq!(names.len(), families.len());
    }

    #[test]
    fn series_from_the_node_the_runner_and_the_vmm_info() {
        let vms = [
            facts("web", VmState::Running, true),
            facts("hung", VmState::Running, true),
            facts("off", VmState::Stopped, false),
        ];
        let info = serde_json::json!({"pid": 1, "devices": [
            {"name": "serial0", "kind": "serial", "counters": {"bytes": 9}},
            {"name": "virtio-blk0", "kind": "virtio-blk",
             "counters": {"requests": 3, "bytes_read": 4096, "bytes_written": 512, "errors": 0}},
            {"name": "virtio-net0", "kind": "virtio-net",
             "counters": {"rx_bytes": 100, "rx_packets": 2, "tx_bytes": 60, "tx_packets": 1, "errors": 0}},
        ]});
        let asked = [
            Some(VmmFacts {
                info: Some(info),
                usage: Some(VmmUsage {
                    cpu_seconds: Some(1.5),
                    rss_bytes: Some(4096),
                    cgroup_memory_bytes: None,
                }),
            }),
            Some(VmmFacts {
                info: None,
                usage: None,
            }),
            None,
        ];
        let text = metrics::render(&build_families(&vms, &asked));
        for line in [
            "thvc_vms{state=\"running\"} 2",
            "thvc_vms{state=\"stopped\"} 1",
            "thvc_vms{state=\"paused\"} 0",
            "thvc_vm_info{vm=\"web\",uuid=\"uuid-web\",state=\"running\"} 1",
            "thvc_vm_info{vm=\"off\",uuid=\"uuid-off\",state=\"stopped\"} 1",
            "thvc_vm_vcpus{vm=\"web\"} 2",
            "thvc_vm_memory_bytes{vm=\"web\"} 536870912",
            "thvc_vm_running{vm=\"web\"} 1",
            "thvc_vm_running{vm=\"off\"} 0",
            "thvc_vm_metrics_up{vm=\"web\"} 1",
            "thvc_vm_metrics_up{vm=\"hung\"} 0",
            "thvc_vm_cpu_seconds_total{vm=\"web\"} 1.5",
            "thvc_vm_memory_rss_bytes{vm=\"web\"} 4096",
            "thvc_vm_disk_read_bytes_total{vm=\"web\",device=\"virtio-blk0\"} 4096",
            "thvc_vm_disk_written_bytes_total{vm=\"web\",device=\"virtio-blk0\"} 512",
            "thvc_vm_disk_requests_total{vm=\"web\",device=\"virtio-blk0\"} 3",
            "thvc_vm_disk_errors_total{vm=\"web\",device=\"virtio-blk0\"} 0",
            "thvc_vm_net_rx_bytes_total{vm=\"web\",device=\"virtio-net0\"} 100",
            "thvc_vm_net_tx_bytes_total{vm=\"web\",device=\"virtio-net0\"} 60",
            "thvc_vm_net_rx_packets_total{vm=\"web\",device=\"virtio-net0\"} 2",
            "thvc_vm_net_tx_packets_total{vm=\"web\",device=\"virtio-net0\"} 1",
            "thvc_vm_net_errors_total{vm=\"web\",device=\"virtio-net0\"} 0",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} missing:\n{text}");
        }
        // No VMM, or no answer: no VMM series; the serial port is not mapped.
        for absent in [
            "thvc_vm_metrics_up{vm=\"off\"}",
            "thvc_vm_cpu_seconds_total{vm=\"hung\"}",
            "thvc_vm_cpu_seconds_total{vm=\"off\"}",
            "serial0",
        ] {
            assert!(!text.contains(absent), "{absent} present:\n{text}");
        }
    }
}
