//! The virtio-mmio transport (version 2, "modern"): the register window the driver programs,
//! feature negotiation, queue setup and the device status state machine.

use std::sync::Arc;

use virtio_queue::{Queue, QueueT};
use vm_memory::{GuestAddress, GuestMemoryMmap};

use super::worker::WorkerControl;
use super::*;
use crate::devices::BusDevice;

const MAGIC_VALUE: u32 = 0x7472_6976; // "virt"
const MMIO_VERSION: u32 = 2;
const VENDOR_ID: u32 = 0x5448_5643; // "THVC"

const REG_MAGIC: u64 = 0x000;
const REG_VERSION: u64 = 0x004;
const REG_DEVICE_ID: u64 = 0x008;
const REG_VENDOR_ID: u64 = 0x00c;
const REG_DEVICE_FEATURES: u64 = 0x010;
const REG_DEVICE_FEATURES_SEL: u64 = 0x014;
const REG_DRIVER_FEATURES: u64 = 0x020;
const REG_DRIVER_FEATURES_SEL: u64 = 0x024;
const REG_QUEUE_SEL: u64 = 0x030;
const REG_QUEUE_NUM_MAX: u64 = 0x034;
const REG_QUEUE_NUM: u64 = 0x038;
const REG_QUEUE_READY: u64 = 0x044;
pub const REG_QUEUE_NOTIFY: u64 = 0x050;
const REG_INTERRUPT_STATUS: u64 = 0x060;
const REG_INTERRUPT_ACK: u64 = 0x064;
const REG_STATUS: u64 = 0x070;
const REG_QUEUE_DESC_LOW: u64 = 0x080;
const REG_QUEUE_DESC_HIGH: u64 = 0x084;
const REG_QUEUE_DRIVER_LOW: u64 = 0x090;
const REG_QUEUE_DRIVER_HIGH: u64 = 0x094;
const REG_QUEUE_DEVICE_LOW: u64 = 0x0a0;
const REG_QUEUE_DEVICE_HIGH: u64 = 0x0a4;
const REG_CONFIG_GENERATION: u64 = 0x0fc;
const CONFIG_SPACE: u64 = 0x100;

/// A queue as the driver programmed it. Kept as plain register values and only turned into a
/// `Queue` (with every check) when the driver sets DRIVER_OK.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct QueueConfig {
    pub max_size: u16,
    pub size: u16,
    pub ready: bool,
    pub desc_table: u64,
    pub avail_ring: u64,
    pub used_ring: u64,
}

fn set_low(reg: &mut u64, value: u32) {
    *reg = (*reg & !0xffff_ffff) | u64::from(value);
}

fn set_high(reg: &mut u64, value: u32) {
    *reg = (*reg & 0xffff_ffff) | (u64::from(value) << 32);
}

impl QueueConfig {
    fn new(max_size: u16) -> Self {
        QueueConfig {
            max_size,
            size: max_size,
            ..Default::default()
        }
    }

    /// A ready-to-use queue, or why the driver's setup is unusable.
    pub fn build(&self, mem: &GuestMemoryMmap, event_idx: bool) -> Result<Queue, String> {
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
        Ok(q)
    }
}

pub struct MmioTransport {
    info: DeviceInfo,
    mem: GuestMemoryMmap,
    queues: Vec<QueueConfig>,
    interrupt: Interrupt,
    worker: Arc<WorkerControl>,
    status: u8,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    queue_sel: u32,
    /// Set when the worker did not let go of the queues on reset; the device is dead then.
    broken: bool,
    /// Guest-caused warnings still to log: a hostile driver must not flood the host's logs.
    warnings_left: u32,
}

const GUEST_WARNINGS: u32 = 16;

impl MmioTransport {
    pub fn new(
        info: DeviceInfo,
        mem: GuestMemoryMmap,
        interrupt: Interrupt,
        worker: Arc<WorkerControl>,
    ) -> Self {
        let queues = info
            .queue_max_sizes
            .iter()
            .map(|max| QueueConfig::new(*max))
            .collect();
        MmioTransport {
            info,
            mem,
            queues,
            interrupt,
            worker,
            status: 0,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            queue_sel: 0,
            broken: false,
            warnings_left: GUEST_WARNINGS,
        }
    }

    fn selected_queue(&mut self) -> Option<&mut QueueConfig> {
        self.queues.get_mut(self.queue_sel as usize)
    }

    /// Queue registers may only change while the driver sets the device up.
    fn queue_setup_allowed(&self) -> bool {
        self.status & DEVICE_STATUS_FEATURES_OK != 0
            && self.status & (DEVICE_STATUS_DRIVER_OK | DEVICE_STATUS_FAILED) == 0
    }

    fn read_reg(&self, offset: u64) -> u32 {
        match offset {
            REG_MAGIC => MAGIC_VALUE,
            REG_VERSION => MMIO_VERSION,
            REG_DEVICE_ID => self.info.device_type,
            REG_VENDOR_ID => VENDOR_ID,
            REG_DEVICE_FEATURES => match self.device_features_sel {
                0 => self.info.features as u32,
                1 => (self.info.features >> 32) as u32,
                _ => 0,
            },
            REG_QUEUE_NUM_MAX => self
                .queues
                .get(self.queue_sel as usize)
                .map_or(0, |q| u32::from(q.max_size)),
            REG_QUEUE_READY => self
                .queues
                .get(self.queue_sel as usize)
                .map_or(0, |q| u32::from(q.ready)),
            REG_INTERRUPT_STATUS => self.interrupt.status(),
            REG_STATUS => u32::from(self.status | self.interrupt.needs_reset_bits()),
            REG_CONFIG_GENERATION => 0,
            _ => {
                tracing::debug!("{}: read of unknown register {offset:#x}", self.name());
                0
            }
        }
    }

    fn write_reg(&mut self, offset: u64, value: u32) {
        let setup = self.queue_setup_allowed();
        match offset {
            REG_DEVICE_FEATURES_SEL => self.device_features_sel = value,
            REG_DRIVER_FEATURES_SEL => self.driver_features_sel = value,
            REG_DRIVER_FEATURES if self.status & DEVICE_STATUS_FEATURES_OK == 0 => {
                match self.driver_features_sel {
                    0 => {
                        self.driver_features =
                            (self.driver_features & !0xffff_ffff) | u64::from(value)
                    }
                    1 => {
                        self.driver_features =
                            (self.driver_features & 0xffff_ffff) | (u64::from(value) << 32)
                    }
                    _ => {}
                }
            }
            REG_QUEUE_SEL => self.queue_sel = value,
            // Sizes are checked when the queue is built: a size that is zero, too large or not
            // a power of two makes activation fail cleanly.
            REG_QUEUE_NUM if setup => self.with_queue(|q| q.size = value.min(0xffff) as u16),
            REG_QUEUE_READY if setup => self.with_queue(|q| q.ready = value == 1),
            REG_QUEUE_DESC_LOW if setup => self.with_queue(|q| set_low(&mut q.desc_table, value)),
            REG_QUEUE_DESC_HIGH if setup => self.with_queue(|q| set_high(&mut q.desc_table, value)),
            REG_QUEUE_DRIVER_LOW if setup => self.with_queue(|q| set_low(&mut q.avail_ring, value)),
            REG_QUEUE_DRIVER_HIGH if setup => {
                self.with_queue(|q| set_high(&mut q.avail_ring, value))
            }
            REG_QUEUE_DEVICE_LOW if setup => self.with_queue(|q| set_low(&mut q.used_ring, value)),
            REG_QUEUE_DEVICE_HIGH if setup => {
                self.with_queue(|q| set_high(&mut q.used_ring, value))
            }
            REG_INTERRUPT_ACK => self.interrupt.ack(value),
            REG_STATUS => self.write_status(value as u8),
            // Notifications arrive through ioeventfds; a write that reaches us here (no
            // ioeventfd match, e.g. an out-of-range queue index) is ignored.
            REG_QUEUE_NOTIFY => {}
            _ => tracing::debug!(
                "{}: ignored write {value:#x} to register {offset:#x} in status {:#x}",
                self.name(),
                self.status
            ),
        }
    }

    fn with_queue(&mut self, f: impl FnOnce(&mut QueueConfig)) {
        if let Some(q) = self.selected_queue() {
            f(q);
        }
    }

    fn name(&self) -> &'static str {
        type_name(self.info.device_type)
    }

    fn write_status(&mut self, status: u8) {
        if status == 0 {
            self.reset();
            return;
        }
        if self.broken {
            return;
        }
        let newly = status & !self.status;
        // The driver may only add bits (spec 2.1.1), except for reset handled above.
        if status & self.status != self.status {
            tracing::debug!("{}: driver cleared status bits; ignored", self.name());
            return;
        }
        let mut accepted = status;
        if newly & DEVICE_STATUS_FEATURES_OK != 0 && !self.features_acceptable() {
            // Leaving FEATURES_OK unset tells the driver we refuse its feature set.
            accepted &= !DEVICE_STATUS_FEATURES_OK;
        }
        if newly & DEVICE_STATUS_DRIVER_OK != 0 {
            if accepted & DEVICE_STATUS_FEATURES_OK == 0 {
                accepted &= !DEVICE_STATUS_DRIVER_OK;
            } else if let Err(why) = self.activate() {
                self.guest_warning(&format!("cannot activate: {why}"));
                self.interrupt.signal_needs_reset();
                accepted &= !DEVICE_STATUS_DRIVER_OK;
            }
        }
        self.status = accepted;
    }

    /// Logs something the guest's driver got wrong, a bounded number of times.
    fn guest_warning(&mut self, what: &str) {
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

    fn activate(&mut self) -> Result<(), String> {
        let event_idx = self.driver_features & VIRTIO_RING_F_EVENT_IDX != 0;
        let queues = self
            .queues
            .iter()
            .enumerate()
            .map(|(i, q)| {
                q.build(&self.mem, event_idx)
                    .map_err(|e| format!("queue {i}: {e}"))
            })
            .collect::<Result<Vec<_>, String>>()?;
        self.worker.activate(Activation {
            mem: self.mem.clone(),
            queues,
            acked_features: self.driver_features,
            interrupt: self.interrupt.clone(),
        });
        Ok(())
    }

    fn reset(&mut self) {
        if self.status & DEVICE_STATUS_DRIVER_OK != 0 && !self.worker.reset() {
            tracing::error!(
                "{}: worker did not stop in time on reset; device disabled",
                self.name()
            );
            self.broken = true;
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

impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= CONFIG_SPACE {
            let start = (offset - CONFIG_SPACE) as usize;
            for (i, byte) in data.iter_mut().enumerate() {
                *byte = start
                    .checked_add(i)
                    .and_then(|at| self.info.config_space.get(at))
                    .copied()
                    .unwrap_or(0);
            }
            return;
        }
        // Registers are 32 bits wide and must be accessed as such.
        if data.len() == 4 && offset.is_multiple_of(4) {
            data.copy_from_slice(&self.read_reg(offset).to_le_bytes());
        } else {
            data.fill(0);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= CONFIG_SPACE {
            tracing::debug!("{}: config space is read-only", self.name());
            return;
        }
        if let (4, true) = (data.len(), offset.is_multiple_of(4)) {
            let value = u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
            self.write_reg(offset, value);
        }
    }
}
