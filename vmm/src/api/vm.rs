//! What each API request does to the VM.

use std::fs::File;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use serde_json::{json, Value};

use super::protocol::{Change, DeviceUpdate, LimitChanges};
use super::{ApiHandler, Reply, Request};
use crate::config::Boot;
use crate::devices::ged::PowerButton;
use crate::devices::metrics::DeviceRegistry;
use crate::devices::virtio::throttle::{Direction, LimitRegistry, LimitSetting};
use crate::exit::{ExitReason, VmExitRequest};
use crate::persist::outgoing::Outgoing;
use crate::persist::Persist;
use crate::rate_limiter::{parse_bytes, parse_ops, LimitConfig, RateError};
use crate::vstate::control::{VcpuControl, VcpuStats};

pub use crate::vstate::control::PAUSE_TIMEOUT;
/// Clients served at once while the VMM is still setting up: the rest of the descriptor
/// budget (RLIMIT_NOFILE) is left for the VM's own eventfds, devices and vCPUs.
pub const CONNECTIONS_DURING_START: usize = 4;

/// The static facts `info` reports.
#[derive(Debug, Clone)]
pub struct VmSummary {
    pub vcpus: u8,
    pub memory_mib: u64,
    pub boot: Boot,
    /// The SMBIOS system UUID, if one was given.
    pub uuid: Option<String>,
    /// The CPU model (`--cpu-template`).
    pub cpu_template: String,
}

/// The VM as the control API sees it; shared with the VMM, which fills in the power button
/// once the devices exist.
pub struct VmApi {
    summary: VmSummary,
    started: Instant,
    vcpus: Arc<VcpuControl>,
    vcpu_stats: Vec<Arc<VcpuStats>>,
    devices: DeviceRegistry,
    limits: LimitRegistry,
    exit: VmExitRequest,
    power_button: OnceLock<PowerButton>,
    /// The devices to pause and the state to snapshot, once the VM is built.
    persist: OnceLock<Arc<Persist>>,
    /// The migration thread, once the VM is built.
    outgoing: OnceLock<Outgoing>,
    /// How the guest has no PMU (`vstate::vm::PmuOff`), once the KVM VM exists.
    pmu: OnceLock<&'static str>,
    shutdown_requested: AtomicBool,
    /// Set once the main thread runs its event loop and so acts on exit requests.
    event_loop_running: AtomicBool,
}

impl VmApi {
    pub fn new(
        summary: VmSummary,
        vcpus: Arc<VcpuControl>,
        devices: DeviceRegistry,
        exit: VmExitRequest,
    ) -> Self {
        let vcpu_stats = (0..summary.vcpus)
            .map(|_| Arc::new(VcpuStats::default()))
            .collect();
        VmApi {
            summary,
            started: Instant::now(),
            vcpus,
            vcpu_stats,
            devices,
            limits: LimitRegistry::default(),
            exit,
            power_button: OnceLock::new(),
            persist: OnceLock::new(),
            outgoing: OnceLock::new(),
            pmu: OnceLock::new(),
            shutdown_requested: AtomicBool::new(false),
            event_loop_running: AtomicBool::new(false),
        }
    }

    /// The devices whose rate limits `update-device` changes (filled as they are set up).
    pub fn with_limits(mut self, limits: LimitRegistry) -> Self {
        self.limits = limits;
        self
    }

    /// `update-device`: checks every value first, so a bad one changes nothing.
    fn update_device(&self, update: &DeviceUpdate) -> Result<Value, String> {
        let handle = self.limits.find(&update.device).ok_or_else(|| {
            format!(
                "unknown device \"{}\"; rate-limited devices: {}",
                update.device.chars().take(64).collect::<String>(),
                self.limits.names().join(", ")
            )
        })?;
        let all = ParsedChanges::parse(&update.all, "")?;
        let rx = ParsedChanges::parse(&update.rx, "rx_")?;
        let tx = ParsedChanges::parse(&update.tx, "tx_")?;
        let setting = handle.update(|direction, current| match direction {
            None if !(update.rx.is_empty() && update.tx.is_empty()) => Err(format!(
                "{} has one rate limit: rx_ and tx_ keys are for a NIC's directions \
                 (virtio-netN)",
                update.device
            )),
            None => all.apply(current, ""),
            Some(Direction::Rx) => all.overridden_by(&rx).apply(current, "rx: "),
            Some(Direction::Tx) => all.overridden_by(&tx).apply(current, "tx: "),
        })?;
        tracing::info!(device = %update.device, ?setting, "rate limit changed");
        Ok(setting_json(&update.device, &setting))
    }

    /// The exit counters of vCPU `id`, for its thread to update.
    pub fn vcpu_stats(&self, id: u8) -> Arc<VcpuStats> {
        self.vcpu_stats
            .get(usize::from(id))
            .cloned()
            .unwrap_or_default()
    }

    /// The main thread is about to wait for exit requests.
    pub fn set_event_loop_running(&self) {
        self.event_loop_running.store(true, Ordering::SeqCst);
    }

    pub fn set_power_button(&self, button: PowerButton) {
        let _ = self.power_button.set(button);
    }

    /// What pause, resume and snapshot act on besides the vCPUs.
    pub fn set_persist(&self, persist: Arc<Persist>) {
        let _ = self.persist.set(persist);
    }

    /// Where `migrate` sends its work.
    pub fn set_outgoing(&self, outgoing: Outgoing) {
        let _ = self.outgoing.set(outgoing);
    }

    /// Refuses what would change the guest under a running migration: it pauses and resumes
    /// the guest itself, and a guest powered off or snapshotted meanwhile would arrive on the
    /// target as something else than what the request asked for.
    fn refuse_while_migrating(&self, request: &Request) -> Result<(), String> {
        match self.outgoing.get() {
            Some(outgoing) if outgoing.control().is_running() => Err(format!(
                "a migration is running: {} waits until it ended (or migrate-cancel)",
                request.as_str()
            )),
            _ => Ok(()),
        }
    }

    /// `migrate`: hands the stream to the migration thread; answered when it ended.
    fn start_migration(
        &self,
        files: Vec<File>,
        options: crate::persist::migration::MigrateOptions,
    ) -> Result<super::server::Deferred, String> {
        let outgoing = self
            .outgoing
            .get()
            .ok_or("the VM is still starting; try again")?;
        let [stream]: [File; 1] = files.try_into().map_err(|f: Vec<File>| {
            format!(
                "migrate takes one file, the stream to the target (a connected socket), sent \
                 with the request (SCM_RIGHTS); got {}",
                f.len()
            )
        })?;
        let (deferred, answerer) = super::deferred();
        let exit = self.exit.clone();
        outgoing.start(
            stream,
            options,
            Box::new(move |result| {
                let migrated = result.is_ok();
                let answer = result.map(|report| {
                    tracing::info!(?report, "migrated; the guest runs on the target");
                    json!({
                        "rounds": report.rounds,
                        "bytes": report.bytes,
                        "downtime_ms": report.downtime.as_millis() as u64,
                        "total_ms": report.total.as_millis() as u64,
                    })
                });
                // Normally the API ends the VMM once the answer is out (after_response); a
                // client that left gets none, and the guest runs on the target all the same.
                if !answerer.answer(answer) && migrated {
                    exit.request(ExitReason::Migrated);
                }
            }),
        )?;
        Ok(deferred)
    }

    /// How the guest came to have no PMU, for `info`.
    pub fn set_pmu(&self, how: &'static str) {
        let _ = self.pmu.set(how);
    }

    fn state(&self) -> &'static str {
        // An incoming VMM serves its API while it waits for and receives the source's
        // guest: its supervisor must not take it for a running guest before that is done.
        if matches!(self.summary.boot, Boot::Incoming(_))
            && !self.event_loop_running.load(Ordering::SeqCst)
        {
            "migrating-in"
        } else if self.vcpus.is_paused() {
            "paused"
        } else if self.shutdown_requested.load(Ordering::SeqCst) {
            "shutting-down"
        } else {
            "running"
        }
    }

    fn info(&self) -> Value {
        let exits: Vec<Value> = self
            .vcpu_stats
            .iter()
            .enumerate()
            .map(|(id, stats)| {
                let mut v = json!(stats.snapshot());
                v["vcpu"] = json!(id);
                v
            })
            .collect();
        let mut info = json!({
            "state": self.state(),
            "pid": std::process::id(),
            "vcpus": self.summary.vcpus,
            "memory_mib": self.summary.memory_mib,
            "uptime_ms": u64::try_from(self.started.elapsed().as_millis()).unwrap_or(u64::MAX),
            "uuid": self.summary.uuid,
            "cpu_template": self.summary.cpu_template,
            "pmu": self.pmu.get(),
            "devices": self.devices.snapshot(),
            "vcpu_exits": exits,
        });
        match &self.summary.boot {
            Boot::Kernel {
                kernel,
                initrd,
                cmdline,
            } => {
                info["kernel"] = json!(kernel.to_string_lossy());
                info["initrd"] = json!(initrd.as_ref().map(|p| p.to_string_lossy()));
                info["cmdline"] = json!(cmdline);
            }
            Boot::Firmware(firmware) => info["firmware"] = json!(firmware.to_string_lossy()),
            Boot::Restore(dir) => info["restored_from"] = json!(dir.to_string_lossy()),
            Boot::Incoming(addr) => info["migrated_in_on"] = json!(addr.to_string()),
        }
        if let Some(migration) = self.outgoing.get().and_then(|o| o.control().json()) {
            info["migration"] = migration;
        }
        info
    }

    fn state_result(&self) -> Value {
        json!({ "state": self.state() })
    }
}

/// One setting of `update-device`, its value parsed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Parsed {
    Keep,
    Remove,
    Set(u64),
}

/// The four settings of one limit as `update-device` changes them.
#[derive(Debug, Clone, Copy)]
struct ParsedChanges {
    bandwidth: Parsed,
    bandwidth_burst: Parsed,
    ops: Parsed,
    ops_burst: Parsed,
}

impl ParsedChanges {
    /// Parses every value given; errors name the key as written (`prefix`: `rx_`, `tx_`).
    fn parse(c: &LimitChanges, prefix: &str) -> Result<Self, String> {
        let parse =
            |change: &Change, key: &str, parse: fn(&str) -> Result<u64, RateError>| match change {
                Change::Keep => Ok(Parsed::Keep),
                Change::Remove => Ok(Parsed::Remove),
                Change::Set(text) => parse(text)
                    .map(|n| {
                        if n > 0 {
                            Parsed::Set(n)
                        } else {
                            Parsed::Remove
                        }
                    })
                    .map_err(|e| format!("{prefix}{key}: {e}")),
            };
        Ok(ParsedChanges {
            bandwidth: parse(&c.bandwidth, "bandwidth", parse_bytes)?,
            bandwidth_burst: parse(&c.bandwidth_burst, "bandwidth-burst", parse_bytes)?,
            ops: parse(&c.ops, "ops", parse_ops)?,
            ops_burst: parse(&c.ops_burst, "ops-burst", parse_ops)?,
        })
    }

    /// These changes with a direction's own (`rx_*`, `tx_*`) winning where given.
    fn overridden_by(&self, own: &ParsedChanges) -> ParsedChanges {
        let pick = |own: Parsed, all: Parsed| if own == Parsed::Keep { all } else { own };
        ParsedChanges {
            bandwidth: pick(own.bandwidth, self.bandwidth),
            bandwidth_burst: pick(own.bandwidth_burst, self.bandwidth_burst),
            ops: pick(own.ops, self.ops),
            ops_burst: pick(own.ops_burst, self.ops_burst),
        }
    }

    /// The setting `current` becomes; `what` prefixes errors (a NIC's direction).
    fn apply(&self, mut config: LimitConfig, what: &str) -> Result<LimitConfig, String> {
        let set = |slot: &mut Option<u64>, change: Parsed| match change {
            Parsed::Keep => {}
            Parsed::Remove => *slot = None,
            Parsed::Set(n) => *slot = Some(n),
        };
        set(&mut config.bandwidth, self.bandwidth);
        set(&mut config.bandwidth_burst, self.bandwidth_burst);
        set(&mut config.ops, self.ops);
        set(&mut config.ops_burst, self.ops_burst);
        // A burst outlives its rate only if explicitly kept: removing the rate removes it.
        if config.bandwidth.is_none() && self.bandwidth_burst == Parsed::Keep {
            config.bandwidth_burst = None;
        }
        if config.ops.is_none() && self.ops_burst == Parsed::Keep {
            config.ops_burst = None;
        }
        config.check().map_err(|e| format!("{what}{e}"))?;
        Ok(config)
    }
}

fn limits_json(c: &LimitConfig) -> Value {
    json!({
        "bandwidth": c.bandwidth,
        "bandwidth-burst": c.bandwidth_burst,
        "ops": c.ops,
        "ops-burst": c.ops_burst,
    })
}

/// `update-device`'s answer: the device's limit, or a NIC's `rx` and `tx` limits.
fn setting_json(device: &str, setting: &LimitSetting) -> Value {
    match setting {
        LimitSetting::One(c) => {
            let mut v = limits_json(c);
            v["device"] = json!(device);
            v
        }
        LimitSetting::RxTx { rx, tx } => json!({
            "device": device,
            "rx": limits_json(rx),
            "tx": limits_json(tx),
        }),
    }
}

impl ApiHandler for VmApi {
    fn handle(&self, request: Request) -> Result<Value, String> {
        if matches!(
            request,
            Request::Pause | Request::Resume | Request::Shutdown | Request::Snapshot
        ) {
            self.refuse_while_migrating(&request)?;
        }
        match request {
            Request::Ping => Ok(json!("pong")),
            Request::Info => Ok(self.info()),
            Request::Pause => {
                self.vcpus.pause(PAUSE_TIMEOUT).map_err(|e| e.to_string())?;
                // Then the devices: no new request comes from a paused guest, and no input
                // (a NIC's) reaches its memory until resume.
                if let Some(persist) = self.persist.get() {
                    if let Err(e) = persist.pause_devices() {
                        self.vcpus.resume();
                        return Err(e);
                    }
                }
                tracing::info!("VM paused");
                Ok(self.state_result())
            }
            Request::Resume => {
                if let Some(persist) = self.persist.get() {
                    persist.resume_devices();
                }
                self.vcpus.resume();
                tracing::info!("VM resumed");
                Ok(self.state_result())
            }
            Request::Snapshot => self
                .persist
                .get()
                .ok_or("the VM is still starting; try again")?
                .snapshot(&self.vcpus, Vec::new()),
            Request::Migrate(_) => Err("migrate takes one file, the stream to the target (a \
                                        connected socket), sent with the request (SCM_RIGHTS); \
                                        got none"
                .into()),
            Request::MigrateCancel => self
                .outgoing
                .get()
                .ok_or("no migration is running")?
                .control()
                .cancel(),
            Request::Shutdown => {
                if self.vcpus.is_paused() {
                    return Err("the VM is paused and cannot react to the power button; \
                                resume it first"
                        .into());
                }
                let button = self
                    .power_button
                    .get()
                    .ok_or("the VM is still starting; try again")?;
                button
                    .press()
                    .map_err(|e| format!("cannot press the power button: {e}"))?;
                self.shutdown_requested.store(true, Ordering::SeqCst);
                tracing::info!("power button pressed");
                Ok(self.state_result())
            }
            Request::Stop => Ok(json!({ "state": "stopping" })),
            Request::UpdateDevice(update) => self.update_device(&update),
        }
    }

    fn handle_with_files(&self, request: Request, files: Vec<File>) -> Reply {
        match request {
            Request::Snapshot => Reply::Now(self.refuse_while_migrating(&request).and_then(|()| {
                self.persist
                    .get()
                    .ok_or("the VM is still starting; try again")?
                    .snapshot(&self.vcpus, files)
            })),
            Request::Migrate(options) => match self.start_migration(files, options) {
                Ok(deferred) => Reply::Later(deferred),
                Err(e) => Reply::Now(Err(e)),
            },
            other if files.is_empty() => Reply::Now(self.handle(other)),
            other => Reply::Now(Err(format!("{} takes no files", other.as_str()))),
        }
    }

    fn connection_limit(&self) -> usize {
        if self.event_loop_running.load(Ordering::SeqCst) {
            super::server::MAX_CONNECTIONS
        } else {
            CONNECTIONS_DURING_START
        }
    }

    fn after_response(&self, request: Request) {
        if let Request::Migrate(_) = request {
            // The guest runs on the target now; this VMM ends once the answer is out (or
            // its client left: see start_migration).
            self.exit.request(ExitReason::Migrated);
        }
        if request == Request::Stop {
            tracing::info!("stop requested through the API");
            self.exit.request(ExitReason::Stopped);
            if !self.event_loop_running.load(Ordering::SeqCst) {
                // The main thread is still setting up (say, reading a slow initrd) and will
                // not look at the exit latch until it is done; stop means now. Nothing needs
                // restoring yet: the terminal is put in raw mode only when the loop starts.
                std::process::exit(ExitReason::Stopped.status());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::ged::Ged;
    use std::sync::Mutex;
    use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

    fn api() -> (VmApi, VmExitRequest) {
        let exit = VmExitRequest::new().expect("eventfd");
        let api = VmApi::new(
            VmSummary {
                vcpus: 2,
                memory_mib: 512,
                boot: Boot::Kernel {
                    kernel: "/k".into(),
                    initrd: None,
                    cmdline: "console=ttyS0".into(),
                },
                uuid: Some("0123abcd-0000-4000-8000-00000000beef".into()),
                cpu_template: "x86-64-v3".into(),
            },
            Arc::new(VcpuControl::new()),
            DeviceRegistry::default(),
            exit.clone(),
        );
        (api, exit)
    }

    #[test]
    fn info_reports_config_state_and_counters() {
        let (api, _) = api();
        VcpuStats::count(&api.vcpu_stats(1).mmio);
        let info = api.handle(Request::Info).expect("info");
        assert_eq!(info["state"], "running");
        assert_eq!(info["vcpus"], 2);
        assert_eq!(info["memory_mib"], 512);
        assert_eq!(info["kernel"], "/k");
        assert_eq!(info["initrd"], Value::Null);
        assert_eq!(info["cmdline"], "console=ttyS0");
        assert_eq!(info["uuid"], "0123abcd-0000-4000-8000-00000000beef");
        assert_eq!(info["cpu_template"], "x86-64-v3");
        assert_eq!(info["firmware"], Value::Null);
        assert_eq!(info["pmu"], Value::Null, "no KVM VM yet");
        api.set_pmu("none-in-kvm");
        assert_eq!(
            api.handle(Request::Info).expect("info")["pmu"],
            "none-in-kvm"
        );
        assert_eq!(info["vcpu_exits"][1]["vcpu"], 1);
        assert_eq!(info["vcpu_exits"][1]["mmio"], 1);
        assert_eq!(info["vcpu_exits"][1]["total"], 1);
        assert_eq!(info["devices"], json!([]));
        assert!(info["uptime_ms"].is_u64());
    }

    #[test]
    fn a_nics_directions_change_together_or_alone_and_a_bad_request_changes_neither() {
        use crate::devices::virtio::throttle::{DeviceLimits, LimitHandle, SharedLimit};
        let registry = LimitRegistry::default();
        let one = |bandwidth| {
            SharedLimit::new(LimitConfig {
                bandwidth,
                ..Default::default()
            })
        };
        let (rx, tx) = (one(Some(1000)), one(Some(2000)));
        registry.add(LimitHandle {
            device: "virtio-net0".into(),
            limits: DeviceLimits::RxTx {
                rx: rx.clone(),
                tx: tx.clone(),
            },
            workers: Vec::new(),
        });
        let blk = one(None);
        registry.add(LimitHandle {
            device: "virtio-blk0".into(),
            limits: DeviceLimits::One(blk.clone()),
            workers: Vec::new(),
        });
        let (api, _) = api();
        let api = api.with_limits(registry);
        let request = |line: &str| match crate::api::protocol::parse_request(line.as_bytes()) {
            Ok(r) => api.handle(r),
            Err(e) => Err(e.to_string()),
        };
        let v = request(r#"{"request":"update-device","device":"virtio-net0"}"#).expect("read");
        assert_eq!(v["rx"]["bandwidth"], 1000, "{v}");
        assert_eq!(v["tx"]["bandwidth"], 2000, "{v}");
        assert_eq!(
            v["bandwidth"],
            Value::Null,
            "a NIC answers per direction: {v}"
        );
        // One direction alone.
        let v = request(
            r#"{"request":"update-device","device":"virtio-net0","rx_bandwidth":"5M","rx_ops":10}"#,
        )
        .expect("rx");
        assert_eq!(v["rx"]["bandwidth"], 5 << 20, "{v}");
        assert_eq!(v["rx"]["ops"], 10, "{v}");
        assert_eq!(tx.config().bandwidth, Some(2000), "tx untouched");
        assert_eq!(
            rx.config().bandwidth,
            Some(5 << 20),
            "the shared limit changed"
        );
        // A plain key sets both; a direction's key wins for its direction.
        let v = request(
            r#"{"request":"update-device","device":"virtio-net0","ops":50,"tx_ops":null,"tx_bandwidth-burst":"1K"}"#,
        )
        .expect("both");
        assert_eq!(v["rx"]["ops"], 50, "{v}");
        assert_eq!(v["tx"]["ops"], Value::Null, "{v}");
        assert_eq!(v["tx"]["bandwidth-burst"], 1024, "{v}");
        assert_eq!(v["rx"]["bandwidth-burst"], Value::Null, "{v}");
        // Refused, naming the key or direction, and nothing changed in either direction.
        let before = (rx.config(), tx.config(), blk.config());
        for (bad, why) in [
            (
                r#"{"request":"update-device","device":"virtio-net0","rx_bandwidth":"1M","tx_bandwidth":"fast"}"#,
                "tx_bandwidth: 'fast'",
            ),
            (
                r#"{"request":"update-device","device":"virtio-net0","rx_bandwidth":"1M","tx_ops-burst":3,"ops":null}"#,
                "tx: ops-burst needs ops",
            ),
            (
                r#"{"request":"update-device","device":"virtio-net0","bandwidth":"1M","tx_bandwidth":0,"tx_bandwidth-burst":5}"#,
                "tx: bandwidth-burst needs a bandwidth",
            ),
            (
                r#"{"request":"update-device","device":"virtio-blk0","rx_bandwidth":"1M"}"#,
                "rx_ and tx_ keys are for a NIC",
            ),
            (
                r#"{"request":"update-device","device":"virtio-net0","rx_speed":"1M"}"#,
                "unknown field \"rx_speed\"",
            ),
        ] {
            let e = request(bad).expect_err(bad);
            assert!(e.contains(why), "{bad}: {e}");
            assert_eq!((rx.config(), tx.config(), blk.config()), before, "{bad}");
        }
        // Removing a rate takes its burst along, per direction.
        let v =
            request(r#"{"request":"update-device","device":"virtio-net0","tx_bandwidth":null}"#)
                .expect("remove");
        assert_eq!(v["tx"]["bandwidth"], Value::Null, "{v}");
        assert_eq!(v["tx"]["bandwidth-burst"], Value::Null, "{v}");
        assert_eq!(v["rx"]["bandwidth"], 5 << 20, "{v}");
        let v = request(r#"{"request":"update-device","device":"virtio-blk0","bandwidth":"2K"}"#)
            .expect("blk");
        assert_eq!(
            v,
            json!({"device": "virtio-blk0", "bandwidth": 2048,
            "bandwidth-burst": null, "ops": null, "ops-burst": null})
        );
    }

    #[test]
    fn pause_resume_and_their_states() {
        let (api, _) = api();
        assert_eq!(api.handle(Request::Pause), Ok(json!({"state": "paused"})));
        assert_eq!(
            api.handle(Request::Pause),
            Ok(json!({"state": "paused"})),
            "idempotent"
        );
        let err = api.handle(Request::Shutdown).expect_err("paused");
        assert!(err.contains("resume it first"), "{err}");
        assert_eq!(api.handle(Request::Resume), Ok(json!({"state": "running"})));
        assert_eq!(api.handle(Request::Resume), Ok(json!({"state": "running"})));
    }

    #[test]
    fn shutdown_presses_the_power_button_once_it_exists() {
        let (api, exit) = api();
        let err = api.handle(Request::Shutdown).expect_err("no button yet");
        assert!(err.contains("still starting"), "{err}");
        let irq = Arc::new(EventFd::new(EFD_NONBLOCK).expect("eventfd"));
        let registry = DeviceRegistry::default();
        let ged = Arc::new(Mutex::new(Ged::new(
            irq.clone(),
            &registry.register("ged", "ged"),
        )));
        api.set_power_button(PowerButton::new(ged));
        assert_eq!(
            api.handle(Request::Shutdown),
            Ok(json!({"state": "shutting-down"}))
        );
        assert_eq!(irq.read().expect("irq"), 1);
        assert_eq!(exit.reason(), None, "the guest decides when to power off");
    }

    #[test]
    fn stop_answers_first_then_ends_the_vm() {
        let (api, exit) = api();
        api.set_event_loop_running();
        assert_eq!(api.handle(Request::Stop), Ok(json!({"state": "stopping"})));
        assert_eq!(exit.reason(), None);
        api.after_response(Request::Stop);
        assert_eq!(exit.reason(), Some(ExitReason::Stopped));
        assert_eq!(api.handle(Request::Ping), Ok(json!("pong")));
    }
}
