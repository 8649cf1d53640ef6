//! The virtio-pci transport (virtio 1.x, modern only) with MSI-X: one PCI function per
//! device whose BAR 0 holds the virtio structures the capabilities point at and the MSI-X
//! table.
//!
//! ```text
//! BAR 0 (32 KiB, 64-bit)   0x0000 common configuration   (features, status, queue set-up)
//!                          0x1000 ISR status             (read clears; config changes only)
//!                          0x2000 device configuration   (read-only)
//!                          0x3000 notifications          (4 bytes per queue, ioeventfds)
//!                          0x4000 MSI-X table            (one vector per queue + config)
//!                          0x5000 MSI-X PBA
//! ```
//!
//! Queue kicks end in ioeventfds at their notification address, as with virtio-mmio, so the
//! vCPU thread never sees them; they follow BAR 0 when the guest moves it. Each queue raises
//! the MSI-X vector its driver chose, through its own irqfd (see `pci::msix`), so there is no
//! shared interrupt status to read: an interrupt costs the guest no exit at all. Devices have
//! no INTx line (interrupt pin 0), like Cloud Hypervisor's: drivers that cannot use MSI-X
//! cannot drive them. The `VIRTIO_PCI_CAP_PCI_CFG` capability is a window into BAR 0 through
//! configuration space (for firmware that cannot map the BAR): the driver sets BAR, offset
//! and length (1, 2 or 4, aligned, inside BAR 0) in the capability and reads or writes its
//! data field; anything else reads zero and writes nothing.
//!
//! Every register and table write is guest input and goes through the same checks as
//! virtio-mmio's (`transport::VirtioCommon`): vector numbers past the table read back as
//! "no vector", queue set-up outside the set-up phase is ignored, bad rings need a reset.

use std::sync::atomic::{AtomicBool, AtomicU16, AtomicU8, Ordering};
use std::sync::Arc;

use crate::vstate::memory::GuestMemoryMmap;
use kvm_ioctls::{IoEventAddress, NoDatamatch, VmFd};
use vmm_sys_util::eventfd::EventFd;

use super::transport::{set_high, set_low, CommonState, StatusChange, VirtioCommon, WorkerGroup};
use super::*;
use crate::devices::pci::config::{Bar, BarKind, ConfigSpace, COMMAND, COMMAND_MEMORY_SPACE};
use crate::devices::pci::msix::{self, MsixTable, MsixVectors};
use crate::devices::pci::{inside_windows, PciDevice};
use crate::vstate::msi::GsiRouting;

/// Lines about what a driver did that it can repeat at will (resets, moving BAR 0, odd
/// writes): rate-limited for all virtio-pci devices together.
static GUEST_LOG: crate::devices::log_limit::LogLimit = crate::devices::log_limit::LogLimit::new(
    crate::devices::log_limit::DEFAULT_BURST,
    crate::devices::log_limit::DEFAULT_INTERVAL,
);

pub const VIRTIO_PCI_VENDOR: u16 = 0x1af4;
/// Modern virtio devices are 0x1040 + their virtio device type.
const MODERN_DEVICE_BASE: u16 = 0x1040;
/// "No MSI-X vector" for a queue or the configuration.
pub const NO_VECTOR: u16 = 0xffff;

pub const BAR_SIZE: u64 = 0x8000;
const COMMON: u64 = 0x0000;
const COMMON_LEN: u64 = 0x38;
const ISR: u64 = 0x1000;
const DEVICE_CONFIG: u64 = 0x2000;
const NOTIFY: u64 = 0x3000;
const NOTIFY_MULTIPLIER: u64 = 4;
const MSIX_TABLE: u64 = 0x4000;
const MSIX_PBA: u64 = 0x5000;
const REGION: u64 = 0x1000;

/// Vendor-specific capability ID, used for the virtio structures.
const CAP_VENDOR: u8 = 0x09;
const CAP_COMMON: u8 = 1;
const CAP_NOTIFY: u8 = 2;
const CAP_ISR: u8 = 3;
const CAP_DEVICE: u8 = 4;
const CAP_PCI_CFG: u8 = 5;
/// In the VIRTIO_PCI_CAP_PCI_CFG capability (from its ID): the BAR, offset, length and data.
const PCI_CFG_BAR: usize = 4;
const PCI_CFG_OFFSET: usize = 8;
const PCI_CFG_LENGTH: usize = 12;
const PCI_CFG_DATA: usize = 16;

/// ISR bit for a configuration change (queue bits are unused: every queue has its vector).
const ISR_CONFIG: u8 = 2;

#[derive(Debug, thiserror::Error)]
pub enum VirtioPciError {
    #[error(transparent)]
    Config(#[from] crate::devices::pci::config::ConfigError),
    #[error(transparent)]
    Msix(#[from] msix::MsixError),
    #[error("a device with {0} queues needs more MSI-X vectors than this transport has")]
    TooManyQueues(usize),
}

/// The interrupt side of a virtio-pci device, shared with its worker: which vector each queue
/// and the configuration use, the ISR and the needs-reset flag.
pub struct PciInterrupt {
    vectors: Arc<MsixVectors>,
    queue_vectors: Vec<AtomicU16>,
    config_vector: AtomicU16,
    isr: AtomicU8,
    needs_reset: AtomicBool,
}

impl PciInterrupt {
    fn new(vectors: Arc<MsixVectors>, queues: usize) -> Self {
        PciInterrupt {
            vectors,
            queue_vectors: (0..queues).map(|_| AtomicU16::new(NO_VECTOR)).collect(),
            config_vector: AtomicU16::new(NO_VECTOR),
            isr: AtomicU8::new(0),
            needs_reset: AtomicBool::new(false),
        }
    }

    /// A vector the driver chose, or NO_VECTOR if the table has no such entry.
    fn checked(&self, vector: u16) -> u16 {
        if usize::from(vector) < self.vectors.len() {
            vector
        } else {
            NO_VECTOR
        }
    }
}

impl InterruptTarget for PciInterrupt {
    fn queue_used(&self, queue: usize) -> Option<u16> {
        let vector = self.queue_vectors.get(queue)?.load(Ordering::SeqCst);
        (vector != NO_VECTOR).then_some(vector)
    }

    fn fire(&self, trigger: u16) {
        self.vectors.trigger(trigger);
    }

    fn needs_reset(&self) {
        self.needs_reset.store(true, Ordering::SeqCst);
        self.isr.fetch_or(ISR_CONFIG, Ordering::SeqCst);
        let vector = self.config_vector.load(Ordering::SeqCst);
        if vector != NO_VECTOR {
            self.vectors.trigger(vector);
        }
    }

    fn reset(&self) {
        self.isr.store(0, Ordering::SeqCst);
        self.needs_reset.store(false, Ordering::SeqCst);
        self.config_vector.store(NO_VECTOR, Ordering::SeqCst);
        for v in &self.queue_vectors {
            v.store(NO_VECTOR, Ordering::SeqCst);
        }
    }
}

/// The queues' notification eventfds and where KVM listens for them: at BAR 0's notify
/// region while the guest has memory decoding on.
struct Notifier {
    vm: Arc<VmFd>,
    events: Vec<EventFd>,
    at: Option<u64>,
}

impl Notifier {
    /// Moves the ioeventfds to the notify region of a BAR 0 at `bar` (None: nowhere).
    fn follow(&mut self, bar: Option<u64>) {
        if bar == self.at {
            return;
        }
        if let Some(old) = self.at.take() {
            for (q, evt) in self.events.iter().enumerate() {
                let addr = IoEventAddress::Mmio(notify_address(old, q));
                if let Err(e) = self.vm.unregister_ioevent(evt, &addr, NoDatamatch) {
                    crate::guest_log!(
                        tracing::Level::DEBUG,
                        GUEST_LOG,
                        "cannot remove a queue notification at {addr:?}: {e}"
                    );
                }
            }
        }
        if let Some(new) = bar {
            for (q, evt) in self.events.iter().enumerate() {
                let addr = IoEventAddress::Mmio(notify_address(new, q));
                if let Err(e) = self.vm.register_ioevent(evt, &addr, NoDatamatch) {
                    // Writes that miss the ioeventfd still reach `bar_write`, which kicks
                    // the queue: slower, not broken.
                    crate::guest_log!(
                        tracing::Level::DEBUG,
                        GUEST_LOG,
                        "cannot place a queue notification at {addr:?}: {e}"
                    );
                }
            }
            self.at = Some(new);
        }
    }

    /// A notification that reached the VMM instead of an ioeventfd.
    fn kick(&self, queue: usize) {
        if let Some(evt) = self.events.get(queue) {
            let _ = evt.write(1);
        }
    }
}

fn notify_address(bar: u64, queue: usize) -> u64 {
    bar.wrapping_add(NOTIFY + queue as u64 * NOTIFY_MULTIPLIER)
}

/// What a snapshot keeps of a virtio-pci device: what the guest programmed in its
/// configuration space, MSI-X table and common configuration.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct VirtioPciState {
    pub common: CommonState,
    pub config: Vec<u32>,
    pub msix_entries: Vec<[u32; 4]>,
    pub msix_pending: Vec<bool>,
    pub config_vector: u16,
    pub queue_vectors: Vec<u16>,
    pub isr: u8,
    pub needs_reset: bool,
}

/// What the device is, for `info` in the API.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PciDeviceSummary {
    pub vendor: u16,
    pub device: u16,
    pub vectors: usize,
}

pub struct VirtioPciDevice {
    config: ConfigSpace,
    common: VirtioCommon,
    interrupt: Arc<PciInterrupt>,
    msix: MsixTable,
    /// Where the MSI-X capability is in config space.
    msix_cap: usize,
    /// Where the VIRTIO_PCI_CAP_PCI_CFG capability is in config space.
    pci_cfg_cap: usize,
    device_config: Vec<u8>,
    notifier: Notifier,
    windows: Vec<(u64, u64)>,
}

/// What a virtio-pci device needs from the VM: its memory, the KVM VM for notifications and
/// vectors, and the routing table the vectors' messages go into.
pub struct PciPlatform<'a> {
    pub mem: &'a GuestMemoryMmap,
    pub vm: &'a Arc<VmFd>,
    pub routing: &'a Arc<GsiRouting>,
    /// The host bridge's memory windows (start, size): notifications are only placed where
    /// BAR 0 lies inside one, never over RAM or other devices.
    pub windows: &'a [(u64, u64)],
}

impl VirtioPciDevice {
    /// A device whose BAR 0 starts at `bar_address`; `queue_events` are its worker's queue
    /// eventfds (duplicates: KVM signals the same eventfd through either).
    pub fn new(
        info: DeviceInfo,
        platform: PciPlatform<'_>,
        workers: Vec<WorkerGroup>,
        queue_events: Vec<EventFd>,
        bar_address: u64,
    ) -> Result<Self, VirtioPciError> {
        let queues = info.queue_max_sizes.len();
        let vector_count = queues + 1;
        if vector_count > MAX_TRIGGERS || (vector_count as u64) * msix::ENTRY_SIZE > REGION {
            return Err(VirtioPciError::TooManyQueues(queues));
        }
        let vectors = Arc::new(MsixVectors::new(
            vector_count,
            platform.routing,
            platform.vm,
        )?);
        let msix = MsixTable::new(vectors.clone(), platform.routing.clone());
        let interrupt = Arc::new(PciInterrupt::new(vectors, queues));

        let device_type = info.device_type as u16;
        let mut config = ConfigSpace::new(
            VIRTIO_PCI_VENDOR,
            MODERN_DEVICE_BASE + device_type,
            class_of(info.device_type) << 8 | 1,
        );
        config.set_subsystem(VIRTIO_PCI_VENDOR, 0x40);
        config.add_bar(
            0,
            Bar {
                size: BAR_SIZE,
                kind: BarKind::Memory64 {
                    prefetchable: false,
                },
            },
            bar_address,
        )?;
        let device_config = info.config_space.clone();
        for (kind, offset, length) in [
            (CAP_COMMON, COMMON, COMMON_LEN),
            (CAP_ISR, ISR, 1),
            (CAP_DEVICE, DEVICE_CONFIG, device_config.len().max(1) as u64),
        ] {
            config.add_capability(CAP_VENDOR, &virtio_cap(16, kind, offset, length), &[])?;
        }
        let mut notify = virtio_cap(20, CAP_NOTIFY, NOTIFY, queues as u64 * NOTIFY_MULTIPLIER);
        notify.extend_from_slice(&(NOTIFY_MULTIPLIER as u32).to_le_bytes());
        config.add_capability(CAP_VENDOR, &notify, &[])?;
        // The window's BAR, offset, length and data are the driver's to write.
        let mut window_writable = [0u8; 20];
        window_writable[PCI_CFG_BAR] = 0xff;
        window_writable[PCI_CFG_OFFSET..].fill(0xff);
        let mut window = virtio_cap(20, CAP_PCI_CFG, 0, 0);
        window.extend_from_slice(&[0; 4]);
        let pci_cfg_cap = config.add_capability(CAP_VENDOR, &window, &window_writable)?;
        let (body, writable) = msix.capability(0, MSIX_TABLE as u32, MSIX_PBA as u32);
        let msix_cap = config.add_capability(msix::CAPABILITY_ID, &body, &writable)?;
        // Memory decoding on from the start: the BAR is placed as firmware would place it.
        config.write(COMMAND, &[COMMAND_MEMORY_SPACE as u8]);

        let common = VirtioCommon::new(
            info,
            platform.mem.clone(),
            Interrupt::new(interrupt.clone()),
            workers,
        );
        let mut device = VirtioPciDevice {
            config,
            common,
            interrupt,
            msix,
            msix_cap,
            pci_cfg_cap,
            device_config,
            notifier: Notifier {
                vm: platform.vm.clone(),
                events: queue_events,
                at: None,
            },
            windows: platform.windows.to_vec(),
        };
        device.follow_bar();
        Ok(device)
    }

    pub fn summary(&self) -> PciDeviceSummary {
        let id = self.config.register(0);
        PciDeviceSummary {
            vendor: id as u16,
            device: (id >> 16) as u16,
            vectors: self.msix.vectors().len(),
        }
    }

    /// What a snapshot keeps; the device's workers must be paused.
    pub fn state(&self) -> VirtioPciState {
        let (msix_entries, msix_pending) = self.msix.state();
        let i = &self.interrupt;
        VirtioPciState {
            common: self.common.state(),
            config: self.config.registers(),
            msix_entries,
            msix_pending,
            config_vector: i.config_vector.load(Ordering::SeqCst),
            queue_vectors: i
                .queue_vectors
                .iter()
                .map(|v| v.load(Ordering::SeqCst))
                .collect(),
            isr: i.isr.load(Ordering::SeqCst),
            needs_reset: i.needs_reset.load(Ordering::SeqCst),
        }
    }

    /// Takes a snapshot's state into this new device (guest memory already restored): the
    /// configuration space's writable bits (a moved BAR), the MSI-X table (routes follow),
    /// the vectors the driver chose, then the device itself, which starts where its used
    /// rings stand; notifications follow BAR 0.
    pub fn restore(&mut self, state: &VirtioPciState) -> Result<(), String> {
        if state.queue_vectors.len() != self.interrupt.queue_vectors.len() {
            return Err(format!(
                "{} queue vectors in the snapshot, {} here",
                state.queue_vectors.len(),
                self.interrupt.queue_vectors.len()
            ));
        }
        self.config.restore_registers(&state.config)?;
        let control = (self.config.register(self.msix_cap) >> 16) as u16;
        self.msix
            .restore(&state.msix_entries, &state.msix_pending, control)?;
        let i = &self.interrupt;
        for (slot, vector) in i.queue_vectors.iter().zip(&state.queue_vectors) {
            slot.store(i.checked(*vector), Ordering::SeqCst);
        }
        i.config_vector
            .store(i.checked(state.config_vector), Ordering::SeqCst);
        i.isr.store(state.isr, Ordering::SeqCst);
        i.needs_reset.store(state.needs_reset, Ordering::SeqCst);
        self.common.restore(&state.common)?;
        self.follow_bar();
        Ok(())
    }

    /// Keeps the queue notifications where BAR 0 is decoded now (inside a window).
    fn follow_bar(&mut self) {
        let windows = &self.windows;
        let decoded = self
            .config
            .decoded_bars()
            .into_iter()
            .find(|(bar, start, size)| *bar == 0 && inside_windows(windows, *start, *size))
            .map(|(_, address, _)| address);
        self.notifier.follow(decoded);
    }

    /// The common configuration structure as the driver reads it now.
    fn common_bytes(&self) -> [u8; COMMON_LEN as usize] {
        let c = &self.common;
        let q = c.selected_queue();
        let queue_vector = self
            .interrupt
            .queue_vectors
            .get(c.queue_sel as usize)
            .map_or(NO_VECTOR, |v| v.load(Ordering::SeqCst));
        let needs_reset = if self.interrupt.needs_reset.load(Ordering::SeqCst) {
            DEVICE_STATUS_NEEDS_RESET
        } else {
            0
        };
        let mut b = [0u8; COMMON_LEN as usize];
        let mut put = |at: usize, bytes: &[u8]| b[at..at + bytes.len()].copy_from_slice(bytes);
        put(0x00, &c.device_features_sel.to_le_bytes());
        put(0x04, &c.device_features_word().to_le_bytes());
        put(0x08, &c.driver_features_sel.to_le_bytes());
        put(0x0c, &c.driver_features_word().to_le_bytes());
        put(
            0x10,
            &self
                .interrupt
                .config_vector
                .load(Ordering::SeqCst)
                .to_le_bytes(),
        );
        put(0x12, &(c.queues.len() as u16).to_le_bytes());
        put(0x14, &[c.status | needs_reset, 0]);
        put(0x16, &(c.queue_sel as u16).to_le_bytes());
        put(0x18, &q.map_or(0, |q| q.size).to_le_bytes());
        put(0x1a, &queue_vector.to_le_bytes());
        put(0x1c, &u16::from(q.is_some_and(|q| q.ready)).to_le_bytes());
        put(0x1e, &(c.queue_sel as u16).to_le_bytes());
        put(0x20, &q.map_or(0, |q| q.desc_table).to_le_bytes());
        put(0x28, &q.map_or(0, |q| q.avail_ring).to_le_bytes());
        put(0x30, &q.map_or(0, |q| q.used_ring).to_le_bytes());
        b
    }

    fn common_write(&mut self, offset: u64, data: &[u8]) {
        let value = match *data {
            [a] => u64::from(a),
            [a, b] => u64::from(u16::from_le_bytes([a, b])),
            [a, b, c, d] => u64::from(u32::from_le_bytes([a, b, c, d])),
            [a, b, c, d, e, f, g, h] => u64::from_le_bytes([a, b, c, d, e, f, g, h]),
            _ => return,
        };
        let c = &mut self.common;
        let sel = c.queue_sel as usize;
        match (offset, data.len()) {
            (0x00, 4) => c.device_features_sel = value as u32,
            (0x08, 4) => c.driver_features_sel = value as u32,
            (0x0c, 4) => c.write_driver_features(value as u32),
            (0x10, 2) => {
                let vector = self.interrupt.checked(value as u16);
                self.interrupt.config_vector.store(vector, Ordering::SeqCst);
            }
            (0x14, 1) => {
                if c.write_status(value as u8) == StatusChange::Reset {
                    crate::guest_log!(
                        tracing::Level::DEBUG,
                        GUEST_LOG,
                        "{}: reset by the driver",
                        c.name()
                    );
                }
            }
            (0x16, 2) => c.queue_sel = value as u32,
            (0x18, 2) => c.with_queue(|q| q.size = value as u16),
            (0x1a, 2) => {
                let vector = self.interrupt.checked(value as u16);
                if let Some(v) = self.interrupt.queue_vectors.get(sel) {
                    v.store(vector, Ordering::SeqCst);
                }
            }
            (0x1c, 2) => c.with_queue(|q| q.ready = value == 1),
            (0x20, 8) => c.with_queue(|q| q.desc_table = value),
            (0x20, 4) => c.with_queue(|q| set_low(&mut q.desc_table, value as u32)),
            (0x24, 4) => c.with_queue(|q| set_high(&mut q.desc_table, value as u32)),
            (0x28, 8) => c.with_queue(|q| q.avail_ring = value),
            (0x28, 4) => c.with_queue(|q| set_low(&mut q.avail_ring, value as u32)),
            (0x2c, 4) => c.with_queue(|q| set_high(&mut q.avail_ring, value as u32)),
            (0x30, 8) => c.with_queue(|q| q.used_ring = value),
            (0x30, 4) => c.with_queue(|q| set_low(&mut q.used_ring, value as u32)),
            (0x34, 4) => c.with_queue(|q| set_high(&mut q.used_ring, value as u32)),
            _ => crate::guest_log!(
                tracing::Level::DEBUG,
                GUEST_LOG,
                "{}: ignored {}-byte write to common config {offset:#x}",
                c.name(),
                data.len()
            ),
        }
    }
}

/// A virtio structure capability (after its ID and next pointer): length, type, BAR 0, the
/// structure's offset and length in it.
fn virtio_cap(cap_len: u8, kind: u8, offset: u64, length: u64) -> Vec<u8> {
    let mut body = vec![cap_len, kind, 0, 0, 0, 0];
    body.extend_from_slice(&(offset as u32).to_le_bytes());
    body.extend_from_slice(&(length as u32).to_le_bytes());
    body
}

/// PCI class and subclass for a virtio device type.
fn class_of(device_type: u32) -> u32 {
    match device_type {
        TYPE_NET => 0x0002_0000,   // network, Ethernet
        TYPE_BLOCK => 0x0001_0000, // mass storage, SCSI (as QEMU's virtio-blk-pci)
        _ => 0x00ff_0000,          // other (0xff), as QEMU's virtio-rng-pci
    }
}

/// Copies `data.len()` bytes of `bytes` from `offset`; zeroes past its end.
fn read_bytes(bytes: &[u8], offset: u64, data: &mut [u8]) {
    for (i, d) in data.iter_mut().enumerate() {
        *d = usize::try_from(offset)
            .ok()
            .and_then(|o| o.checked_add(i))
            .and_then(|at| bytes.get(at))
            .copied()
            .unwrap_or(0);
    }
}

impl VirtioPciDevice {
    /// Whether a configuration access at `offset` of `len` bytes touches the PCI_CFG
    /// window's data field.
    fn touches_window_data(&self, offset: usize, len: usize) -> bool {
        let data = self.pci_cfg_cap + PCI_CFG_DATA;
        offset < data + 4 && data < offset + len
    }

    /// The BAR 0 access the PCI_CFG window is set to (offset, length), if it is a valid one:
    /// BAR 0, length 1, 2 or 4, aligned, inside the BAR.
    fn window(&self) -> Option<(u64, usize)> {
        let cap = self.pci_cfg_cap;
        let bar = self.config.register(cap + PCI_CFG_BAR) & 0xff;
        let offset = u64::from(self.config.register(cap + PCI_CFG_OFFSET));
        let length = self.config.register(cap + PCI_CFG_LENGTH) as usize;
        (bar == 0
            && matches!(length, 1 | 2 | 4)
            && offset.is_multiple_of(length as u64)
            && offset + length as u64 <= BAR_SIZE)
            .then_some((offset, length))
    }
}

impl PciDevice for VirtioPciDevice {
    fn config(&self) -> &ConfigSpace {
        &self.config
    }

    fn config_read(&mut self, offset: usize, data: &mut [u8]) {
        if self.touches_window_data(offset, data.len()) {
            // The window's data is BAR 0 read now (a read of the ISR clears it, as through
            // the BAR).
            let mut value = [0u8; 4];
            if let Some((at, length)) = self.window() {
                self.bar_read(0, at, &mut value[..length]);
            }
            self.config.write(self.pci_cfg_cap + PCI_CFG_DATA, &value);
        }
        self.config.read(offset, data);
    }

    fn config_write(&mut self, offset: usize, data: &[u8]) {
        self.config.write(offset, data);
        if self.touches_window_data(offset, data.len()) {
            if let Some((at, length)) = self.window() {
                let value = self
                    .config
                    .register(self.pci_cfg_cap + PCI_CFG_DATA)
                    .to_le_bytes();
                self.bar_write(0, at, &value[..length]);
            }
            return;
        }
        let control = self.msix_cap + msix::CONTROL_OFFSET;
        if offset < control + 2 && control < offset + data.len() {
            let value = (self.config.register(self.msix_cap) >> 16) as u16;
            self.msix.write_control(value);
        }
        self.follow_bar();
    }

    fn bar_read(&mut self, bar: usize, offset: u64, data: &mut [u8]) {
        if bar != 0 {
            data.fill(0xff);
            return;
        }
        match offset {
            COMMON..=0xfff => read_bytes(&self.common_bytes(), offset - COMMON, data),
            ISR..=0x1fff => {
                // Reading the ISR clears it.
                let isr = self.interrupt.isr.swap(0, Ordering::SeqCst);
                read_bytes(&[isr], offset - ISR, data);
            }
            DEVICE_CONFIG..=0x2fff => read_bytes(&self.device_config, offset - DEVICE_CONFIG, data),
            MSIX_TABLE..=0x4fff => self.msix.read_table(offset - MSIX_TABLE, data),
            MSIX_PBA..=0x5fff => self.msix.read_pba(offset - MSIX_PBA, data),
            _ => data.fill(0),
        }
    }

    fn bar_write(&mut self, bar: usize, offset: u64, data: &[u8]) {
        if bar != 0 {
            return;
        }
        match offset {
            COMMON..=0xfff => self.common_write(offset - COMMON, data),
            NOTIFY..=0x3fff => {
                let at = offset - NOTIFY;
                if at.is_multiple_of(NOTIFY_MULTIPLIER) {
                    self.notifier.kick((at / NOTIFY_MULTIPLIER) as usize);
                }
            }
            MSIX_TABLE..=0x4fff => self.msix.write_table(offset - MSIX_TABLE, data),
            // The ISR, the device configuration and the PBA are read-only.
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use vmm_sys_util::eventfd::EFD_NONBLOCK;

    use super::*;
    use crate::devices::virtio::testing::memory;
    use crate::devices::virtio::worker::WorkerControl;

    const WINDOW: (u64, u64) = (0xc000_0000, 0x1000_0000);

    /// A virtio-blk function with two queues on a real KVM VM (its vectors are irqfds).
    fn device() -> VirtioPciDevice {
        let kvm = kvm_ioctls::Kvm::new().expect("the unit tests need /dev/kvm");
        let vm = kvm.create_vm().expect("a VM");
        vm.create_irq_chip().expect("the in-kernel irqchip");
        let vm = Arc::new(vm);
        let routing = Arc::new(GsiRouting::new(vm.clone()));
        let info = DeviceInfo {
            device_type: TYPE_BLOCK,
            queue_max_sizes: vec![16, 16],
            features: VIRTIO_F_VERSION_1,
            config_space: vec![1, 2, 3, 4],
        };
        let events = (0..2)
            .map(|_| EventFd::new(EFD_NONBLOCK).expect("eventfd"))
            .collect();
        let workers = vec![WorkerGroup {
            control: WorkerControl::new().expect("control"),
            queues: 0..2,
        }];
        let platform = PciPlatform {
            mem: &memory(),
            vm: &vm,
            routing: &routing,
            windows: &[WINDOW],
        };
        VirtioPciDevice::new(info, platform, workers, events, WINDOW.0).expect("device")
    }

    /// The VIRTIO_PCI_CAP_PCI_CFG capability, found by walking the list as a driver does.
    fn window_cap(d: &VirtioPciDevice) -> usize {
        let mut at = (d.config.register(0x34) & 0xff) as usize;
        while at != 0 {
            let reg = d.config.register(at);
            if reg & 0xff == u32::from(CAP_VENDOR) && reg >> 24 == u32::from(CAP_PCI_CFG) {
                assert_eq!((reg >> 16) & 0xff, 20, "cap_len");
                return at;
            }
            at = ((reg >> 8) & 0xff) as usize;
        }
        panic!("no VIRTIO_PCI_CAP_PCI_CFG capability");
    }

    fn set_window(d: &mut VirtioPciDevice, cap: usize, bar: u8, offset: u32, length: u32) {
        d.config_write(cap + PCI_CFG_BAR, &[bar]);
        d.config_write(cap + PCI_CFG_OFFSET, &offset.to_le_bytes());
        d.config_write(cap + PCI_CFG_LENGTH, &length.to_le_bytes());
    }

    fn window_read(d: &mut VirtioPciDevice, cap: usize) -> u32 {
        let mut data = [0u8; 4];
        d.config_read(cap + PCI_CFG_DATA, &mut data);
        u32::from_le_bytes(data)
    }

    fn bar_read16(d: &mut VirtioPciDevice, offset: u64) -> u16 {
        let mut data = [0u8; 2];
        d.bar_read(0, offset, &mut data);
        u16::from_le_bytes(data)
    }

    #[test]
    fn the_pci_cfg_window_reads_and_writes_bar_0_through_configuration_space() {
        let mut d = device();
        let cap = window_cap(&d);
        // num_queues (common configuration 0x12, 16 bits).
        set_window(&mut d, cap, 0, 0x12, 2);
        assert_eq!(window_read(&mut d, cap) & 0xffff, 2, "num_queues");
        // The device configuration.
        set_window(&mut d, cap, 0, DEVICE_CONFIG as u32, 4);
        assert_eq!(window_read(&mut d, cap), u32::from_le_bytes([1, 2, 3, 4]));
        // A write: queue_select (0x16) = 1, seen through the BAR.
        set_window(&mut d, cap, 0, 0x16, 2);
        d.config_write(cap + PCI_CFG_DATA, &1u32.to_le_bytes());
        assert_eq!(bar_read16(&mut d, 0x16), 1, "queue_select");
        assert_eq!(bar_read16(&mut d, 0x18), 16, "queue_size of queue 1");
    }

    #[test]
    fn a_bad_pci_cfg_window_reads_zero_and_writes_nothing() {
        let mut d = device();
        let cap = window_cap(&d);
        set_window(&mut d, cap, 0, 0x16, 2);
        d.config_write(cap + PCI_CFG_DATA, &1u32.to_le_bytes());
        for (bar, offset, length) in [
            (1, 0x16, 2),            // another BAR
            (0, 0x16, 3),            // a length other than 1, 2, 4
            (0, 0x17, 2),            // unaligned
            (0, BAR_SIZE as u32, 4), // past the BAR
            (0, u32::MAX - 1, 2),    // far past it
            (0, 0x16, 0),            // nothing
        ] {
            set_window(&mut d, cap, bar, offset, length);
            assert_eq!(window_read(&mut d, cap), 0, "{bar} {offset:#x} {length}");
            d.config_write(cap + PCI_CFG_DATA, &0u32.to_le_bytes());
            assert_eq!(bar_read16(&mut d, 0x16), 1, "queue_select unchanged");
        }
    }

    fn msix_cap(d: &VirtioPciDevice) -> usize {
        d.msix_cap
    }

    #[test]
    fn a_restored_device_has_the_guests_bar_msix_table_and_vectors() {
        let mut d = device();
        // The guest moves BAR 0, enables MSI-X, programs and unmasks entry 1, picks vectors.
        let moved = WINDOW.0 + 0x10_0000;
        d.config_write(0x10, &(moved as u32).to_le_bytes());
        d.config_write(0x14, &((moved >> 32) as u32).to_le_bytes());
        let control = msix_cap(&d) + msix::CONTROL_OFFSET;
        d.config_write(control, &(1u16 << 15).to_le_bytes());
        let entry = MSIX_TABLE + msix::ENTRY_SIZE;
        d.bar_write(0, entry, &0xfee0_0000u32.to_le_bytes());
        d.bar_write(0, entry + 8, &0x4041u32.to_le_bytes());
        d.bar_write(0, entry + 12, &0u32.to_le_bytes());
        d.bar_write(0, 0x10, &0u16.to_le_bytes()); // config vector 0
        d.bar_write(0, 0x16, &0u16.to_le_bytes()); // queue 0 ...
        d.bar_write(0, 0x1a, &1u16.to_le_bytes()); // ... uses vector 1
        d.bar_write(0, 0x16, &1u16.to_le_bytes()); // queue 1 selected at the snapshot
        let saved: VirtioPciState =
            serde_json::from_value(serde_json::to_value(d.state()).expect("json")).expect("back");

        let mut r = device();
        r.restore(&saved).expect("restore");
        assert_eq!(r.config.bar(0).map(|b| b.1), Some(moved), "moved BAR");
        assert_eq!(r.notifier.at, Some(moved), "notifications follow it");
        let mut word = [0u8; 4];
        r.bar_read(0, entry + 8, &mut word);
        assert_eq!(u32::from_le_bytes(word), 0x4041, "MSI-X entry data");
        r.bar_read(0, entry + 12, &mut word);
        assert_eq!(u32::from_le_bytes(word), 0, "unmasked");
        assert!(r.msix.enabled());
        assert_eq!(bar_read16(&mut r, 0x16), 1, "queue_select");
        assert_eq!(bar_read16(&mut r, 0x10), 0, "config vector");
        r.bar_write(0, 0x16, &0u16.to_le_bytes());
        assert_eq!(bar_read16(&mut r, 0x1a), 1, "queue 0's vector");

        let mut short = saved.clone();
        short.queue_vectors.pop();
        assert!(device().restore(&short).is_err(), "another device's state");
    }
}
