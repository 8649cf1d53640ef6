//! Snapshots: a paused VM written into two files, and a new VMM process that continues it.
//!
//! A snapshot is a directory of two files (format in `docs` below and vmm/README.md):
//! `state.json`, everything but RAM (the machine description it was taken of, KVM's vCPU and
//! interrupt controller state, the devices' registers), and `memory`, guest RAM as a sparse
//! file. The VMM never opens a file once it runs (its seccomp filters allow no `open`), so
//! the `snapshot` request brings the two files, opened by the caller, over the API socket
//! (SCM_RIGHTS); `thvc-vmm --restore DIR` opens them while it starts, like every other file.
//!
//! What is not in a snapshot is what the restoring host provides: disk images and TAPs (given
//! to the restoring VMM like to the first one; disks must hold what they held, as on shared
//! storage), the kernel (already in guest RAM). A snapshot only restores into a VM of the same
//! shape: vCPUs, memory, transport, devices with the same features and configuration, and the
//! same guest CPU model (the CPUID the template gives on this host); anything else is refused
//! before the guest runs.
//!
//! The devices hold no request across a pause (see `devices::virtio::worker`): a snapshot of a
//! paused VM has nothing in flight, and each virtio queue continues where its used ring in
//! guest memory stands.

pub mod memory;
pub mod migration;
pub mod outgoing;
pub mod restore;

use std::fs::File;
use std::io::{Read, Write};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::vstate::memory::GuestMemoryMmap;
use kvm_bindings::{kvm_cpuid_entry2, CpuId};
use kvm_ioctls::VmFd;
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};

use crate::config::Transport;
use crate::devices::pci::{PciConfigIo, PciRoot};
use crate::devices::serial::{SerialDevice, SerialSnapshot};
use crate::devices::virtio::mmio::{MmioState, MmioTransport};
use crate::devices::virtio::pci::{VirtioPciDevice, VirtioPciState};
use crate::devices::virtio::worker::WorkerControl;
use crate::devices::virtio::{type_name, DeviceInfo};
use crate::vstate::control::VcpuControl;
use crate::vstate::state::{self, Raw, VcpuState, VmState};

/// The first field of every state file.
pub const FORMAT: &str = "thvc-vmm-snapshot";
/// Raised whenever a field's meaning changes; a VMM restores only its own version.
pub const VERSION: u32 = 1;
pub const STATE_FILE: &str = "state.json";
pub const MEMORY_FILE: &str = "memory";
/// A state file is a few hundred KiB (mostly hex of XSAVE areas); anything this large is not
/// one.
const MAX_STATE_BYTES: u64 = 64 << 20;
/// How long a snapshot waits for the vCPU threads to read their state.
const SAVE_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("snapshot {path}: cannot open {file}: {source}")]
    Open {
        path: String,
        file: &'static str,
        source: std::io::Error,
    },
    #[error("snapshot {path}: {STATE_FILE} is larger than {MAX_STATE_BYTES} bytes")]
    TooLarge { path: String },
    #[error("snapshot {path}: {STATE_FILE} is not a thvc-vmm snapshot: {reason}")]
    Invalid { path: String, reason: String },
    #[error("snapshot {path}: format version {found}; this thvc-vmm restores version {VERSION}")]
    Version { path: String, found: u32 },
    #[error("the snapshot cannot be restored here: {0}")]
    Mismatch(String),
}

/// The shape of the VM a snapshot was taken of; a restoring VM must have the same.
#[derive(Debug, Serialize, Deserialize)]
pub struct Machine {
    pub vcpus: u8,
    pub memory_mib: u64,
    pub transport: String,
    pub cpu_template: String,
    /// The guest CPU model: CPUID as the template made it for the first vCPU.
    pub cpuid: Vec<Raw<kvm_cpuid_entry2>>,
    pub devices: Vec<DeviceDescription>,
}

/// A virtio device as the guest's driver knows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceDescription {
    pub name: String,
    pub device_type: String,
    pub features: u64,
    pub queue_max_sizes: Vec<u16>,
    /// The device-specific configuration space (a disk's size, a NIC's MAC), hex.
    pub config_space: String,
}

impl DeviceDescription {
    pub fn new(name: &str, info: &DeviceInfo) -> Self {
        DeviceDescription {
            name: name.to_string(),
            device_type: type_name(info.device_type).to_string(),
            features: info.features,
            queue_max_sizes: info.queue_max_sizes.clone(),
            config_space: hex::encode(&info.config_space),
        }
    }

    /// Why this device cannot stand in for `saved`, if it cannot.
    fn differs_from(&self, saved: &DeviceDescription) -> Option<String> {
        let what = if self.device_type != saved.device_type {
            format!("is a {}, was a {}", self.device_type, saved.device_type)
        } else if self.features != saved.features {
            format!(
                "offers features {:#x}, offered {:#x}",
                self.features, saved.features
            )
        } else if self.queue_max_sizes != saved.queue_max_sizes {
            format!(
                "has queues {:?}, had {:?}",
                self.queue_max_sizes, saved.queue_max_sizes
            )
        } else if self.config_space != saved.config_space {
            let hint = match self.device_type.as_str() {
                "virtio-blk" => " (a disk of another size or serial?)",
                "virtio-net" => " (another MAC address? give the NIC's mac=)",
                _ => "",
            };
            format!("has another configuration{hint}")
        } else {
            return None;
        };
        Some(format!("{} {what}", self.name))
    }
}

/// One device's state, on its transport.
#[derive(Debug, Serialize, Deserialize)]
pub struct DeviceState {
    pub name: String,
    pub transport: TransportState,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TransportState {
    Mmio(MmioState),
    Pci(Box<VirtioPciState>),
}

/// The PCI platform besides its devices: the host bridge's registers and the configuration
/// address register (0xCF8).
#[derive(Debug, Serialize, Deserialize)]
pub struct PciPlatformState {
    pub bridge: Vec<u32>,
    pub config_address: u32,
}

/// Everything in `state.json`.
#[derive(Debug, Serialize, Deserialize)]
pub struct Snapshot {
    pub format: String,
    pub version: u32,
    pub machine: Machine,
    pub memory: Vec<memory::Range>,
    pub vm: VmState,
    pub vcpus: Vec<VcpuState>,
    pub serial: SerialSnapshot,
    pub devices: Vec<DeviceState>,
    /// On the PCI transport.
    pub pci: Option<PciPlatformState>,
}

fn cpuid_entries(cpuid: &CpuId) -> Vec<Raw<kvm_cpuid_entry2>> {
    cpuid.as_slice().iter().map(|e| Raw(*e)).collect()
}

fn cpuid_differences(
    saved: &[Raw<kvm_cpuid_entry2>],
    here: &[Raw<kvm_cpuid_entry2>],
) -> Vec<String> {
    let key = |e: &kvm_cpuid_entry2| (e.function, e.index);
    let regs = |e: &kvm_cpuid_entry2| (e.eax, e.ebx, e.ecx, e.edx);
    let mut diffs = Vec::new();
    for s in saved {
        match here.iter().find(|h| key(&h.0) == key(&s.0)) {
            Some(h) if regs(&h.0) == regs(&s.0) => {}
            Some(_) => diffs.push(format!("leaf {:#x}.{} differs", s.0.function, s.0.index)),
            None => diffs.push(format!(
                "leaf {:#x}.{} missing here",
                s.0.function, s.0.index
            )),
        }
    }
    for h in here {
        if !saved.iter().any(|s| key(&s.0) == key(&h.0)) {
            diffs.push(format!("leaf {:#x}.{} only here", h.0.function, h.0.index));
        }
    }
    diffs
}

impl Snapshot {
    /// Opens and parses a snapshot directory; returns it and its open memory file.
    pub fn open(dir: &Path) -> Result<(Snapshot, File), SnapshotError> {
        let path = dir.display().to_string();
        let open = |file: &'static str| {
            File::open(dir.join(file)).map_err(|source| SnapshotError::Open {
                path: path.clone(),
                file,
                source,
            })
        };
        let state = open(STATE_FILE)?;
        let memory = open(MEMORY_FILE)?;
        let mut text = Vec::new();
        state
            .take(MAX_STATE_BYTES + 1)
            .read_to_end(&mut text)
            .map_err(|source| SnapshotError::Open {
                path: path.clone(),
                file: STATE_FILE,
                source,
            })?;
        if text.len() as u64 > MAX_STATE_BYTES {
            return Err(SnapshotError::TooLarge { path });
        }
        Ok((Self::parse(&text, &path)?, memory))
    }

    fn parse(text: &[u8], path: &str) -> Result<Snapshot, SnapshotError> {
        let invalid = |reason: String| SnapshotError::Invalid {
            path: path.to_string(),
            reason,
        };
        // The header first, so that another version says so rather than failing on a field.
        #[derive(Deserialize)]
        struct Header {
            format: String,
            version: u32,
        }
        let header: Header = serde_json::from_slice(text).map_err(|e| invalid(e.to_string()))?;
        if header.format != FORMAT {
            return Err(invalid(format!("format \"{}\"", header.format)));
        }
        if header.version != VERSION {
            return Err(SnapshotError::Version {
                path: path.to_string(),
                found: header.version,
            });
        }
        let snapshot: Snapshot =
            serde_json::from_slice(text).map_err(|e| invalid(e.to_string()))?;
        if snapshot.vcpus.len() != usize::from(snapshot.machine.vcpus)
            || snapshot.devices.len() != snapshot.machine.devices.len()
        {
            return Err(invalid(
                "vCPU or device states do not match the machine".into(),
            ));
        }
        Ok(snapshot)
    }

    /// Refuses a VM this snapshot cannot continue in: another shape, devices or CPU model.
    pub fn check(&self, here: &Machine) -> Result<(), SnapshotError> {
        self.machine.check(here)
    }

    pub(crate) fn parse_state(text: &[u8], origin: &str) -> Result<Snapshot, SnapshotError> {
        Self::parse(text, origin)
    }
}

impl Machine {
    /// Refuses a VM that cannot continue this machine's guest.
    pub fn check(&self, here: &Machine) -> Result<(), SnapshotError> {
        let saved = self;
        let mut problems = Vec::new();
        if saved.vcpus != here.vcpus {
            problems.push(format!("{} vCPUs, {} here", saved.vcpus, here.vcpus));
        }
        if saved.memory_mib != here.memory_mib {
            problems.push(format!(
                "{} MiB of memory, {} MiB here",
                saved.memory_mib, here.memory_mib
            ));
        }
        if saved.transport != here.transport {
            problems.push(format!(
                "transport {}, {} here",
                saved.transport, here.transport
            ));
        }
        if saved.devices.len() != here.devices.len() {
            let names = |d: &[DeviceDescription]| {
                d.iter()
                    .map(|d| d.name.clone())
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            problems.push(format!(
                "devices [{}], here [{}]",
                names(&saved.devices),
                names(&here.devices)
            ));
        } else {
            problems.extend(
                here.devices
                    .iter()
                    .zip(&saved.devices)
                    .filter_map(|(h, s)| h.differs_from(s)),
            );
        }
        let cpu = cpuid_differences(&saved.cpuid, &here.cpuid);
        if !cpu.is_empty() {
            problems.push(format!(
                "the guest CPU model (template {}) is not the one this host gives with \
                 template {}: {}",
                saved.cpu_template,
                here.cpu_template,
                cpu.into_iter().take(8).collect::<Vec<_>>().join(", ")
            ));
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(SnapshotError::Mismatch(problems.join("; ")))
        }
    }
}

/// A device a snapshot saves and restores.
pub struct PersistDevice {
    pub description: DeviceDescription,
    pub transport: DeviceTransport,
}

pub enum DeviceTransport {
    Mmio(Arc<Mutex<MmioTransport>>),
    Pci(Arc<Mutex<VirtioPciDevice>>),
}

impl PersistDevice {
    fn state(&self) -> DeviceState {
        DeviceState {
            name: self.description.name.clone(),
            transport: match &self.transport {
                DeviceTransport::Mmio(t) => TransportState::Mmio(lock(t).state()),
                DeviceTransport::Pci(d) => TransportState::Pci(Box::new(lock(d).state())),
            },
        }
    }

    /// Takes `state` (of this device, on this transport) into the new device.
    pub fn restore(&self, state: &DeviceState) -> Result<(), String> {
        let name = &self.description.name;
        if *name != state.name {
            return Err(format!("device state of {} where {name} is", state.name));
        }
        match (&self.transport, &state.transport) {
            (DeviceTransport::Mmio(t), TransportState::Mmio(s)) => lock(t).restore(s),
            (DeviceTransport::Pci(d), TransportState::Pci(s)) => lock(d).restore(s),
            _ => Err("the snapshot's device is on another transport".into()),
        }
        .map_err(|e| format!("{name}: {e}"))
    }
}

/// The PCI platform's parts a snapshot keeps besides the devices.
pub struct PciPersist {
    pub root: Arc<PciRoot>,
    pub config_io: Arc<Mutex<PciConfigIo>>,
}

impl PciPersist {
    fn state(&self) -> PciPlatformState {
        PciPlatformState {
            bridge: self.root.bridge_registers(),
            config_address: lock(&self.config_io).address(),
        }
    }

    /// Takes the platform's state, after the devices' (the BAR map follows them all).
    pub fn restore(&self, state: Option<&PciPlatformState>) -> Result<(), String> {
        let state = state.ok_or("the snapshot has no PCI platform state")?;
        self.root.restore_bridge(&state.bridge)?;
        lock(&self.config_io).set_address(state.config_address);
        self.root.refresh_all();
        Ok(())
    }
}

/// What the VMM hands the control API so that it can pause the devices and write snapshots.
pub struct Persist {
    pub machine: MachineShape,
    pub vm: Arc<VmFd>,
    /// How a migration reads the dirty log.
    pub dirty_log: crate::vstate::vm::DirtyLog,
    pub mem: GuestMemoryMmap,
    pub serial: Arc<Mutex<SerialDevice>>,
    pub devices: Vec<PersistDevice>,
    /// On the PCI transport.
    pub pci: Option<PciPersist>,
    /// Every virtio worker, to pause with the vCPUs.
    pub workers: Vec<Arc<WorkerControl>>,
}

/// The VM's shape, as [`Machine`] records it.
pub struct MachineShape {
    pub vcpus: u8,
    pub memory_mib: u64,
    pub transport: Transport,
    pub cpu_template: String,
    pub cpuid: CpuId,
}

impl MachineShape {
    pub fn describe(&self, devices: Vec<DeviceDescription>) -> Machine {
        Machine {
            vcpus: self.vcpus,
            memory_mib: self.memory_mib,
            transport: match self.transport {
                Transport::Mmio => "mmio",
                Transport::Pci => "pci",
            }
            .to_string(),
            cpu_template: self.cpu_template.clone(),
            cpuid: cpuid_entries(&self.cpuid),
            devices,
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Persist {
    /// Stops every device worker between requests (after the vCPUs, so that no new request
    /// comes). On failure the workers already paused are resumed.
    pub fn pause_devices(&self) -> Result<(), String> {
        for (i, worker) in self.workers.iter().enumerate() {
            if !worker.pause() {
                for w in &self.workers[..=i] {
                    w.resume();
                }
                return Err("a device worker did not stop in time".into());
            }
        }
        Ok(())
    }

    pub fn resume_devices(&self) {
        for worker in &self.workers {
            worker.resume();
        }
    }

    /// The vCPUs' state, read first: completing a vCPU's last exit (see `state::save_vcpu`)
    /// may still write guest memory (a string `in`).
    pub(crate) fn save_vcpus(&self, vcpus: &VcpuControl) -> Result<Vec<VcpuState>, String> {
        vcpus.save_vcpus(SAVE_TIMEOUT)
    }

    /// Everything but RAM, of a paused VM whose memory is where `ranges` say.
    fn snapshot_state(
        &self,
        vcpu_states: Vec<VcpuState>,
        ranges: Vec<memory::Range>,
    ) -> Result<Snapshot, String> {
        let vm = state::save_vm(&self.vm).map_err(|e| e.to_string())?;
        let devices = self.devices.iter().map(PersistDevice::state).collect();
        let pci = self.pci.as_ref().map(PciPersist::state);
        let serial = lock(&self.serial).state();
        Ok(Snapshot {
            format: FORMAT.to_string(),
            version: VERSION,
            machine: self
                .machine
                .describe(self.devices.iter().map(|d| d.description.clone()).collect()),
            memory: ranges,
            vm,
            vcpus: vcpu_states,
            serial,
            devices,
            pci,
        })
    }

    /// The state of a paused VM for a migration's target (its RAM goes separately).
    pub(crate) fn state(&self, vcpu_states: Vec<VcpuState>) -> Result<Vec<u8>, String> {
        let snapshot = self.snapshot_state(vcpu_states, memory::ranges_of(&self.mem))?;
        serde_json::to_vec(&snapshot).map_err(|e| e.to_string())
    }

    /// Writes the paused VM into `files` (state, memory: opened by the caller, writable; both
    /// are truncated). The VM stays paused; the caller resumes or stops it.
    pub fn snapshot(&self, vcpus: &VcpuControl, files: Vec<File>) -> Result<Value, String> {
        let started = Instant::now();
        let [mut state_file, memory_file]: [File; 2] =
            files.try_into().map_err(|f: Vec<File>| {
                format!(
                    "snapshot takes two files, the state and the memory file, sent with the \
                 request (SCM_RIGHTS); got {}",
                    f.len()
                )
            })?;
        if !vcpus.is_paused() {
            return Err("pause the VM before taking a snapshot".into());
        }
        let vcpu_states = self.save_vcpus(vcpus)?;
        let (ranges, memory_bytes) =
            memory::save(&self.mem, &memory_file).map_err(|e| e.to_string())?;
        let snapshot = self.snapshot_state(vcpu_states, ranges)?;
        let text = serde_json::to_vec_pretty(&snapshot).map_err(|e| e.to_string())?;
        let write = |e: std::io::Error| format!("cannot write the state file: {e}");
        state_file.set_len(0).map_err(write)?;
        state_file.write_all(&text).map_err(write)?;
        // Both durable before the caller is told the snapshot exists.
        memory_file
            .sync_all()
            .map_err(|e| format!("cannot write the memory file: {e}"))?;
        state_file.sync_all().map_err(write)?;
        let seconds = started.elapsed().as_secs_f64();
        tracing::info!(memory_bytes, seconds, "snapshot written");
        Ok(json!({
            "state_bytes": text.len(),
            "memory_bytes": memory_bytes,
            "seconds": seconds,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn device(name: &str, config: &str) -> DeviceDescription {
        DeviceDescription {
            name: name.into(),
            device_type: "virtio-net".into(),
            features: 1 << 32,
            queue_max_sizes: vec![256, 256],
            config_space: config.into(),
        }
    }

    fn machine(vcpus: u8, devices: Vec<DeviceDescription>, eax: u32) -> Machine {
        Machine {
            vcpus,
            memory_mib: 256,
            transport: "mmio".into(),
            cpu_template: "host".into(),
            cpuid: vec![Raw(kvm_cpuid_entry2 {
                function: 1,
                eax,
                ..Default::default()
            })],
            devices,
        }
    }

    fn snapshot_of(machine: Machine) -> Snapshot {
        let text = json!({
            "format": FORMAT, "version": VERSION, "machine": machine, "memory": [],
            "vm": {"pic_master": "", "pic_slave": "", "ioapic": "", "pit": "", "clock": ""},
            "vcpus": [], "serial": {"baud_divisor_low": 0, "baud_divisor_high": 0,
            "interrupt_enable": 0, "interrupt_identification": 0, "line_control": 0,
            "line_status": 0, "modem_control": 0, "modem_status": 0, "scratch": 0,
            "in_buffer": []}, "devices": []
        });
        // The KVM structures are checked for size: a made-up state is refused there.
        let e = Snapshot::parse(text.to_string().as_bytes(), "x").expect_err("empty KVM state");
        assert!(e.to_string().contains("0 bytes where kvm_"), "{e}");
        Snapshot {
            format: FORMAT.into(),
            version: VERSION,
            machine,
            memory: Vec::new(),
            vm: serde_json::from_value(json!({
                "pic_master": hex::encode([0u8; 520]), "pic_slave": hex::encode([0u8; 520]),
                "ioapic": hex::encode([0u8; 520]), "pit": hex::encode([0u8; 112]),
                "clock": hex::encode([0u8; 48]),
            }))
            .expect("zeroed VM state"),
            vcpus: Vec::new(),
            serial: SerialSnapshot {
                baud_divisor_low: 0,
                baud_divisor_high: 0,
                interrupt_enable: 0,
                interrupt_identification: 0,
                line_control: 0,
                line_status: 0,
                modem_control: 0,
                modem_status: 0,
                scratch: 0,
                in_buffer: Vec::new(),
            },
            devices: Vec::new(),
            pci: None,
        }
    }

    #[test]
    fn only_a_vm_of_the_same_shape_devices_and_cpu_model_is_accepted() {
        let saved = snapshot_of(machine(2, vec![device("virtio-net0", "5254")], 0x906ea));
        saved
            .check(&machine(2, vec![device("virtio-net0", "5254")], 0x906ea))
            .expect("the same VM");
        let e = saved
            .check(&machine(1, vec![device("virtio-net0", "5255")], 0x806ea))
            .expect_err("another VM")
            .to_string();
        assert!(e.contains("2 vCPUs, 1 here"), "{e}");
        assert!(
            e.contains("virtio-net0 has another configuration (another MAC"),
            "{e}"
        );
        assert!(e.contains("leaf 0x1.0 differs"), "{e}");
        let e = saved
            .check(&machine(2, Vec::new(), 0x906ea))
            .expect_err("no NIC")
            .to_string();
        assert!(e.contains("devices [virtio-net0], here []"), "{e}");
    }

    #[test]
    fn other_formats_versions_and_garbage_are_refused_clearly() {
        let e = Snapshot::parse(b"{\"format\":\"qemu\",\"version\":1}", "d").expect_err("format");
        assert!(e.to_string().contains("format \"qemu\""), "{e}");
        let e = Snapshot::parse(
            format!("{{\"format\":\"{FORMAT}\",\"version\":99}}").as_bytes(),
            "d",
        )
        .expect_err("version");
        assert!(e.to_string().contains("format version 99"), "{e}");
        let e = Snapshot::parse(b"\x00\xff", "d").expect_err("garbage");
        assert!(e.to_string().contains("not a thvc-vmm snapshot"), "{e}");
    }
}
