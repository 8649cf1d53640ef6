//! What every virtio transport shares: feature negotiation, queue setup and the device
//! status state machine (virtio 1.x, section 2 and 3.1). The transports (`mmio`, `pci`) only
//! map their registers onto it.
//!
//! Everything here is driven by the guest's driver: a value it writes is accepted, refused
//! by leaving a status bit unset (FEATURES_OK, DRIVER_OK), or ignored; nothing panics, and a
//! setup the device cannot use makes it need a reset instead of starting it.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use crate::vstate::memory::GuestMemoryMmap;
use serde::{Deserialize, Serialize};
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestAddress;

use super::worker::WorkerControl;
use super::*;

/// A queue as the driver programmed it. Kept as plain register values and only turned into a
/// `Queue` (with every check) when the driver sets DRIVER_OK.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueConfig {
    pub max_size: u16,
    pub size: u16,
    pub ready: bool,
    pub desc_table: u64,
    pub avail_ring: u64,
    pub used_ring: u64,
}

/// Replaces the low 32 bits of a 64-bit register.
pub fn set_low(reg: &mut u64, value: u32) {
    *reg = (*reg & !0xffff_ffff) | u64::from(value);
}

/// Replaces the high 32 bits of a 64-bit register.
pub fn set_high(reg: &mut u64, value: u32) {
    *reg = (*reg & 0xffff_ffff) | (u64::from(value) << 32);
}

impl QueueConfig {
    pub fn new(max_size: u16) -> Self {
        QueueConfig {
            max_size,
            size: max_size,
            ..Default::default()
        }
    }

    /// A ready-to-use queue, or why the driver's setup is unusable.
    pub fn build(
        &self,
        mem: &GuestMemoryMmap,
        event_idx: bool,
        start: QueueStart,
    ) -> Result<Queue, String> {
        if !self.ready {
            return Err("not ready".into());
        }
        let mut q = Queue::new(self.max_size).map_err(|e| e.to_string())?;
        q.try_set_size(self.size).map_err(|_| {
            format!(
                "size {} is not a power of two up to {}",
                self.size, self.max_size
            )
        })?;
        q.try_set_desc_table_address(GuestAddress(self.desc_table))
            .map_err(|_| format!("descriptor table {:#x} is misaligned", self.desc_table))?;
        q.try_set_avail_ring_address(GuestAddress(self.avail_ring))
            .map_err(|_| format!("available ring {:#x} is misaligned", self.avail_ring))?;
        q.try_set_used_ring_address(GuestAddress(self.used_ring))
            .map_err(|_| format!("used ring {:#x} is misaligned", self.used_ring))?;
        q.set_event_idx(event_idx);
        q.set_ready(true);
        if !q.is_valid(mem) {
            return Err("rings lie outside guest memory".into());
        }
        if let QueueStart::AtUsedIndex = start {
            let used = q
                .used_idx(mem, Ordering::Acquire)
                .map_err(|e| format!("used ring unreadable: {e}"))?;
            q.set_next_avail(used.0);
            q.set_next_used(used.0);
        }
        Ok(q)
    }
}

/// Where a queue's device side starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QueueStart {
    /// At the beginning: the driver just set it up.
    Fresh,
    /// Where the used ring in guest memory says: a restored device. Every device here
    /// completes each chain it takes before its worker waits again (a rate-limited one is put
    /// back), so when the worker was paused every chain taken had been used: the next one to
    /// take is the used index.
    AtUsedIndex,
}

/// What a snapshot keeps of a device's transport-independent state.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CommonState {
    pub status: u8,
    pub device_features_sel: u32,
    pub driver_features_sel: u32,
    pub driver_features: u64,
    pub queue_sel: u32,
    pub queues: Vec<QueueConfig>,
    pub broken: bool,
}

/// A worker thread of a device and the device queues it serves.
pub struct WorkerGroup {
    pub control: Arc<WorkerControl>,
    pub queues: std::ops::Range<usize>,
}

/// Guest-caused warnings logged per device: a hostile driver must not flood the host's logs.
const GUEST_WARNINGS: u32 = 16;

/// The transport-independent state of one virtio device.
pub struct VirtioCommon {
    pub info: DeviceInfo,
    mem: GuestMemoryMmap,
    pub queues: Vec<QueueConfig>,
    interrupt: Interrupt,
    workers: Vec<WorkerGroup>,
    /// The status the driver set, as far as the device accepted it (DEVICE_NEEDS_RESET is
    /// the interrupt target's: the worker sets it concurrently).
    pub status: u8,
    pub device_features_sel: u32,
    pub driver_features_sel: u32,
    pub driver_features: u64,
    pub queue_sel: u32,
    /// Set when the worker did not let go of the queues on reset; the device is dead then.
    broken: bool,
    warnings_left: u32,
    /// Debug lines about the driver's register writes, which it can repeat in a loop.
    log: crate::devices::log_limit::LogLimit,
}

impl VirtioCommon {
    /// `workers` split the device's queues between them, in order, each queue in one group.
    pub fn new(
        info: DeviceInfo,
        mem: GuestMemoryMmap,
        interrupt: Interrupt,
        workers: Vec<WorkerGroup>,
    ) -> Self {
        let queues = info
            .queue_max_sizes
            .iter()
            .map(|max| QueueConfig::new(*max))
            .collect();
        VirtioCommon {
            info,
            mem,
            queues,
            interrupt,
            workers,
            status: 0,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            queue_sel: 0,
            broken: false,
            warnings_left: GUEST_WARNINGS,
            log: Default::default(),
        }
    }

    /// The 32 bits of the device's features that `device_features_sel` selects.
    pub fn device_features_word(&self) -> u32 {
        match self.device_features_sel {
            0 => self.info.features as u32,
            1 => (self.info.features >> 32) as u32,
            _ => 0,
        }
    }

    /// The 32 bits of the driver's features that `driver_features_sel` selects.
    pub fn driver_features_word(&self) -> u32 {
        match self.driver_features_sel {
            0 => self.driver_features as u32,
            1 => (self.driver_features >> 32) as u32,
            _ => 0,
        }
    }

    /// The driver's features, 32 bits at a time; frozen once FEATURES_OK is set.
    pub fn write_driver_features(&mut self, value: u32) {
        if self.status & DEVICE_STATUS_FEATURES_OK != 0 {
            return;
        }
        match self.driver_features_sel {
            0 => set_low(&mut self.driver_features, value),
            1 => set_high(&mut self.driver_features, value),
            _ => {}
        }
    }

    pub fn selected_queue(&self) -> Option<&QueueConfig> {
        self.queues.get(self.queue_sel as usize)
    }

    /// Queue registers may only change while the driver sets the device up.
    pub fn queue_setup_allowed(&self) -> bool {
        self.status & DEVICE_STATUS_FEATURES_OK != 0
            && self.status & (DEVICE_STATUS_DRIVER_OK | DEVICE_STATUS_FAILED) == 0
    }

    /// Changes the selected queue's configuration, if the driver may change it now.
    pub fn with_queue(&mut self, f: impl FnOnce(&mut QueueConfig)) {
        if !self.queue_setup_allowed() {
            return;
        }
        if let Some(q) = self.queues.get_mut(self.queue_sel as usize) {
            f(q);
        }
    }

    pub fn name(&self) -> &'static str {
        type_name(self.info.device_type)
    }

    /// A status write from the driver: 0 resets the device, otherwise the driver may only
    /// add bits (spec 2.1.1). Returns what happened, so the transport can reset its own state.
    pub fn write_status(&mut self, status: u8) -> StatusChange {
        if status == 0 {
            self.reset();
            return StatusChange::Reset;
        }
        if self.broken {
            return StatusChange::Ignored;
        }
        let newly = status & !self.status;
        if status & self.status != self.status {
            crate::guest_log!(
                tracing::Level::DEBUG,
                self.log,
                "{}: driver cleared status bits; ignored",
                self.name()
            );
            return StatusChange::Ignored;
        }
        let mut accepted = status;
        if newly & DEVICE_STATUS_FEATURES_OK != 0 && !self.features_acceptable() {
            // Leaving FEATURES_OK unset tells the driver we refuse its feature set.
            accepted &= !DEVICE_STATUS_FEATURES_OK;
        }
        if newly & DEVICE_STATUS_DRIVER_OK != 0 {
            if accepted & DEVICE_STATUS_FEATURES_OK == 0 {
                accepted &= !DEVICE_STATUS_DRIVER_OK;
            } else if let Err(why) = self.activate(QueueStart::Fresh) {
                self.guest_warning(&format!("cannot activate: {why}"));
                self.interrupt.signal_needs_reset();
                accepted &= !DEVICE_STATUS_DRIVER_OK;
            }
        }
        self.status = accepted;
        StatusChange::Updated
    }

    /// Logs something the guest's driver got wrong, a bounded number of times.
    pub fn guest_warning(&mut self, what: &str) {
        if self.warnings_left > 0 {
            self.warnings_left -= 1;
            let suffix = if self.warnings_left == 0 {
                " (further guest errors of this device are not logged)"
            } else {
                ""
            };
            tracing::warn!("{}: {what}{suffix}", self.name());
        }
    }

    fn features_acceptable(&mut self) -> bool {
        let unknown = self.driver_features & !self.info.features;
        if unknown != 0 {
            self.guest_warning(&format!(
                "driver asked for features {unknown:#x} the device does not offer"
            ));
            return false;
        }
        self.driver_features & VIRTIO_F_VERSION_1 != 0
    }

    /// Starts the workers of the queue groups the driver set up. A driver need not use every
    /// queue: one that does not know multiqueue (edk2's virtio-blk and virtio-net drivers,
    /// other systems' drivers) sets up only the first; a worker whose queues are all unready
    /// stays idle. Its queues all ready or none, and the first group ready: anything else
    /// is a setup the device cannot use.
    fn activate(&mut self, start: QueueStart) -> Result<(), String> {
        let event_idx = self.driver_features & VIRTIO_RING_F_EVENT_IDX != 0;
        let mut activations = Vec::new();
        for (g, group) in self.workers.iter().enumerate() {
            let configs = &self.queues[group.queues.clone()];
            if g > 0 && configs.iter().all(|q| !q.ready) {
                continue;
            }
            let queues = configs
                .iter()
                .zip(group.queues.clone())
                .map(|(q, i)| {
                    q.build(&self.mem, event_idx, start)
                        .map_err(|e| format!("queue {i}: {e}"))
                })
                .collect::<Result<Vec<Queue>, String>>()?;
            activations.push((g, queues));
        }
        for (g, queues) in activations {
            let group = &self.workers[g];
            group.control.activate(Activation {
                mem: self.mem.clone(),
                queues,
                first_queue: group.queues.start,
                acked_features: self.driver_features,
                interrupt: self.interrupt.for_worker(),
            });
        }
        Ok(())
    }

    /// What a snapshot keeps; the device's workers must be paused.
    pub fn state(&self) -> CommonState {
        CommonState {
            status: self.status,
            device_features_sel: self.device_features_sel,
            driver_features_sel: self.driver_features_sel,
            driver_features: self.driver_features,
            queue_sel: self.queue_sel,
            queues: self.queues.clone(),
            broken: self.broken,
        }
    }

    /// Takes a snapshot's state into this new device (guest memory already restored): a
    /// device the driver had started is started again where its used rings stand.
    pub fn restore(&mut self, state: &CommonState) -> Result<(), String> {
        let sizes: Vec<u16> = state.queues.iter().map(|q| q.max_size).collect();
        if sizes != self.info.queue_max_sizes {
            return Err(format!(
                "queue sizes {sizes:?} in the snapshot, {:?} here",
                self.info.queue_max_sizes
            ));
        }
        if state.driver_features & !self.info.features != 0 {
            return Err(format!(
                "the driver had features {:#x} this device does not offer",
                state.driver_features & !self.info.features
            ));
        }
        self.status = state.status;
        self.device_features_sel = state.device_features_sel;
        self.driver_features_sel = state.driver_features_sel;
        self.driver_features = state.driver_features;
        self.queue_sel = state.queue_sel;
        self.queues = state.queues.clone();
        self.broken = state.broken;
        if self.status & DEVICE_STATUS_DRIVER_OK != 0 && !self.broken {
            self.activate(QueueStart::AtUsedIndex)?;
        }
        Ok(())
    }

    fn reset(&mut self) {
        if self.status & DEVICE_STATUS_DRIVER_OK != 0 {
            // Every worker lets go of its queues (each reset waits for its worker).
            let stopped: Vec<bool> = self.workers.iter().map(|w| w.control.reset()).collect();
            if stopped.contains(&false) {
                tracing::error!(
                    "{}: a worker did not stop in time on reset; device disabled",
                    self.name()
                );
                self.broken = true;
            }
        }
        for q in &mut self.queues {
            *q = QueueConfig::new(q.max_size);
        }
        self.status = 0;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.driver_features = 0;
        self.queue_sel = 0;
        self.interrupt.clear();
    }
}

/// What a status write did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StatusChange {
    /// The driver wrote 0: the device is reset.
    Reset,
    /// The status is what the device accepted of the write.
    Updated,
    /// The write was not allowed (bits cleared, or the device is broken).
    Ignored,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::log_limit::{logged_lines, DEFAULT_BURST};
    use crate::devices::virtio::testing::{memory, TestRing};

    #[test]
    fn a_driver_clearing_status_bits_in_a_loop_gets_a_bounded_number_of_debug_lines() {
        let mem = memory();
        let (activation, _irq) = TestRing::new(&mem, 64).activation(Vec::new(), 0);
        let info = DeviceInfo {
            device_type: TYPE_RNG,
            queue_max_sizes: vec![64],
            features: VIRTIO_F_VERSION_1,
            config_space: Vec::new(),
        };
        let mut common = VirtioCommon::new(info, mem, activation.interrupt, Vec::new());
        assert_eq!(common.write_status(1), StatusChange::Updated, "ACKNOWLEDGE");
        let lines = logged_lines(tracing::Level::DEBUG, || {
            for _ in 0..1000 {
                // DRIVER without ACKNOWLEDGE: clears a bit, which only a reset may.
                assert_eq!(common.write_status(2), StatusChange::Ignored);
            }
        });
        assert_eq!(lines.len(), DEFAULT_BURST as usize, "{lines:?}");
        assert!(lines[0].contains("driver cleared status bits"), "{lines:?}");
        assert_eq!(common.status, 1, "the status stayed");
    }

    /// A block device with two queues, one worker each, as with two vCPUs.
    fn two_queue_device() -> (VirtioCommon, Vec<Arc<WorkerControl>>) {
        let mem = memory();
        let (activation, _irq) = TestRing::new(&mem, 64).activation(Vec::new(), 0);
        let info = DeviceInfo {
            device_type: TYPE_BLOCK,
            queue_max_sizes: vec![64, 64],
            features: VIRTIO_F_VERSION_1,
            config_space: Vec::new(),
        };
        let controls: Vec<_> = (0..2).map(|_| WorkerControl::new().unwrap()).collect();
        let workers = controls
            .iter()
            .enumerate()
            .map(|(i, c)| WorkerGroup {
                control: c.clone(),
                queues: i..i + 1,
            })
            .collect();
        let mut common = VirtioCommon::new(info, mem, activation.interrupt, workers);
        common.driver_features = VIRTIO_F_VERSION_1;
        (common, controls)
    }

    fn set_up(q: &mut QueueConfig, base: u64) {
        q.desc_table = base;
        q.avail_ring = base + 0x1000;
        q.used_ring = base + 0x2000;
        q.ready = true;
    }

    const UP_TO_FEATURES_OK: u8 = 1 | 2 | 8;
    const DRIVER_OK: u8 = UP_TO_FEATURES_OK | 4;

    #[test]
    fn a_driver_that_sets_up_only_the_first_queue_gets_a_working_device() {
        // edk2's virtio-blk driver knows one queue: it readies queue 0 and sets DRIVER_OK.
        let (mut common, controls) = two_queue_device();
        set_up(&mut common.queues[0], 0x10000);
        common.write_status(UP_TO_FEATURES_OK);
        assert_eq!(common.write_status(DRIVER_OK), StatusChange::Updated);
        assert_eq!(common.status, DRIVER_OK, "the device runs");
        assert_eq!(controls[0].pending_activations(), 1, "queue 0's worker");
        assert_eq!(controls[1].pending_activations(), 0, "queue 1's stays idle");
    }

    #[test]
    fn every_ready_queue_gets_its_worker_and_the_first_queue_is_required() {
        let (mut common, controls) = two_queue_device();
        set_up(&mut common.queues[0], 0x10000);
        set_up(&mut common.queues[1], 0x20000);
        common.write_status(UP_TO_FEATURES_OK);
        common.write_status(DRIVER_OK);
        assert_eq!(common.status, DRIVER_OK);
        assert!(controls.iter().all(|c| c.pending_activations() == 1));

        // Only queue 1: nothing the device can start with (queue 0 carries its requests).
        let (mut common, controls) = two_queue_device();
        set_up(&mut common.queues[1], 0x20000);
        common.write_status(UP_TO_FEATURES_OK);
        common.write_status(DRIVER_OK);
        assert_eq!(common.status, UP_TO_FEATURES_OK, "DRIVER_OK refused");
        assert!(controls.iter().all(|c| c.pending_activations() == 0));
    }
}
