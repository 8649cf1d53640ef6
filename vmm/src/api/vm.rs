//! What each API request does to the VM.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::protocol::{Change, DeviceUpdate};
use super::{ApiHandler, Request};
use crate::config::Boot;
use crate::devices::ged::PowerButton;
use crate::devices::metrics::DeviceRegistry;
use crate::devices::virtio::throttle::LimitRegistry;
use crate::exit::{ExitReason, VmExitRequest};
use crate::rate_limiter::{parse_bytes, parse_ops, LimitConfig, RateError};
use crate::vstate::control::{VcpuControl, VcpuStats};

/// How long `pause` waits for every vCPU to stop; under the node agent's 5 s request timeout.
pub const PAUSE_TIMEOUT: Duration = Duration::from_secs(3);
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
        let mut config = handle.config();
        let apply = |slot: &mut Option<u64>,
                     change: &Change,
                     key: &str,
                     parse: fn(&str) -> Result<u64, RateError>|
         -> Result<(), String> {
            match change {
                Change::Keep => {}
                Change::Remove => *slot = None,
                Change::Set(text) => {
                    let n = parse(text).map_err(|e| format!("{key}: {e}"))?;
                    *slot = (n > 0).then_some(n);
                }
            }
            Ok(())
        };
        apply(
            &mut config.bandwidth,
            &update.bandwidth,
            "bandwidth",
            parse_bytes,
        )?;
        apply(
            &mut config.bandwidth_burst,
            &update.bandwidth_burst,
            "bandwidth-burst",
            parse_bytes,
        )?;
        apply(&mut config.ops, &update.ops, "ops", parse_ops)?;
        apply(
            &mut config.ops_burst,
            &update.ops_burst,
            "ops-burst",
            parse_ops,
        )?;
        // A burst outlives its rate only if explicitly kept: removing the rate removes it.
        if config.bandwidth.is_none() && update.bandwidth_burst == Change::Keep {
            config.bandwidth_burst = None;
        }
        if config.ops.is_none() && update.ops_burst == Change::Keep {
            config.ops_burst = None;
        }
        config.check()?;
        handle.update(config);
        tracing::info!(device = %update.device, ?config, "rate limit changed");
        Ok(limits_json(&update.device, &config))
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

    fn state(&self) -> &'static str {
        if self.vcpus.is_paused() {
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
        }
        info
    }

    fn state_result(&self) -> Value {
        json!({ "state": self.state() })
    }
}

fn limits_json(device: &str, c: &LimitConfig) -> Value {
    json!({
        "device": device,
        "bandwidth": c.bandwidth,
        "bandwidth-burst": c.bandwidth_burst,
        "ops": c.ops,
        "ops-burst": c.ops_burst,
    })
}

impl ApiHandler for VmApi {
    fn handle(&self, request: Request) -> Result<Value, String> {
        match request {
            Request::Ping => Ok(json!("pong")),
            Request::Info => Ok(self.info()),
            Request::Pause => {
                self.vcpus.pause(PAUSE_TIMEOUT).map_err(|e| e.to_string())?;
                tracing::info!("VM paused");
                Ok(self.state_result())
            }
            Request::Resume => {
                self.vcpus.resume();
                tracing::info!("VM resumed");
                Ok(self.state_result())
            }
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

    fn connection_limit(&self) -> usize {
        if self.event_loop_running.load(Ordering::SeqCst) {
            super::server::MAX_CONNECTIONS
        } else {
            CONNECTIONS_DURING_START
        }
    }

    fn after_response(&self, request: Request) {
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
        assert_eq!(info["vcpu_exits"][1]["vcpu"], 1);
        assert_eq!(info["vcpu_exits"][1]["mmio"], 1);
        assert_eq!(info["vcpu_exits"][1]["total"], 1);
        assert_eq!(info["devices"], json!([]));
        assert!(info["uptime_ms"].is_u64());
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
