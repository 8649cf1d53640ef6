//! The virtio-mmio transport (version 2, "modern"): the register window the driver programs.
//! Feature negotiation, queues and the status state machine are `transport::VirtioCommon`'s.
//!
//! The driver reads the registers from the device's `RegisterPage`, mapped read-only into the
//! guest (no exit); its writes exit to `write`, which updates the state and re-publishes the
//! readable registers into the page before the vCPU continues.

use std::sync::Arc;

use crate::vstate::memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use super::registers::RegisterPage;
use super::transport::{set_high, set_low, CommonState, StatusChange, VirtioCommon, WorkerGroup};
use super::*;
use crate::devices::BusDevice;

/// Lines about register accesses a driver got wrong (it can repeat them at will): rate-limited
/// for all virtio-mmio devices together.
static GUEST_LOG: crate::devices::log_limit::LogLimit = crate::devices::log_limit::LogLimit::new(
    crate::devices::log_limit::DEFAULT_BURST,
    crate::devices::log_limit::DEFAULT_INTERVAL,
);

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
pub const REG_INTERRUPT_STATUS: u64 = 0x060;
pub const REG_INTERRUPT_ACK: u64 = 0x064;
pub const REG_STATUS: u64 = 0x070;
const REG_QUEUE_DESC_LOW: u64 = 0x080;
const REG_QUEUE_DESC_HIGH: u64 = 0x084;
const REG_QUEUE_DRIVER_LOW: u64 = 0x090;
const REG_QUEUE_DRIVER_HIGH: u64 = 0x094;
const REG_QUEUE_DEVICE_LOW: u64 = 0x0a0;
const REG_QUEUE_DEVICE_HIGH: u64 = 0x0a4;
const REG_CONFIG_GENERATION: u64 = 0x0fc;
const CONFIG_SPACE: u64 = 0x100;

/// The interrupt of a virtio-mmio device: the InterruptStatus register the driver reads (in
/// the device's register page) and the irqfd of its one line. The worker also sets
/// DEVICE_NEEDS_RESET in the page's Status register through it when the driver broke the
/// device.
///
/// The used-buffer bit is sticky: once set it stays set until the device is reset. The
/// driver acknowledges it on every interrupt, and that write is absorbed in the kernel by an
/// ioeventfd (no exit to the VMM), so the device never learns of it; the driver then finds
/// the bit on every interrupt of this device's exclusive line and looks at its rings, which
/// is what each interrupt is for. Other bits (configuration change) are acknowledged normally.
pub struct MmioInterrupt {
    registers: Arc<RegisterPage>,
    irqfd: Arc<EventFd>,
}

impl MmioInterrupt {
    pub fn new(registers: Arc<RegisterPage>, irqfd: Arc<EventFd>) -> Arc<Self> {
        Arc::new(MmioInterrupt { registers, irqfd })
    }

    pub fn status(&self) -> u32 {
        self.registers.load(REG_INTERRUPT_STATUS)
    }

    /// The driver's acknowledgement of `bits`; the used-buffer bit stays (see above).
    pub fn ack(&self, bits: u32) {
        self.registers
            .fetch_and(REG_INTERRUPT_STATUS, !(bits & !VIRTIO_MMIO_INT_VRING));
    }
}

impl InterruptTarget for MmioInterrupt {
    fn queue_used(&self, _queue: usize) -> Option<u16> {
        self.registers
            .fetch_or(REG_INTERRUPT_STATUS, VIRTIO_MMIO_INT_VRING);
        Some(0)
    }

    fn fire(&self, _trigger: u16) {
        if let Err(e) = self.irqfd.write(1) {
            tracing::warn!("cannot raise a virtio interrupt: {e}");
        }
    }

    fn needs_reset(&self) {
        self.registers
            .fetch_or(REG_STATUS, u32::from(DEVICE_STATUS_NEEDS_RESET));
        self.registers
            .fetch_or(REG_INTERRUPT_STATUS, VIRTIO_MMIO_INT_CONFIG);
        self.fire(0);
    }

    fn reset(&self) {
        self.registers.store(REG_INTERRUPT_STATUS, 0);
        self.registers.store(REG_STATUS, 0);
    }
}

/// What a snapshot keeps of a virtio-mmio device.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct MmioState {
    pub common: CommonState,
    /// InterruptStatus and Status as the driver reads them (DEVICE_NEEDS_RESET included).
    pub interrupt_status: u32,
    pub status_register: u32,
}

pub struct MmioTransport {
    common: VirtioCommon,
    interrupt: Arc<MmioInterrupt>,
    /// What the driver reads (shared with `interrupt`, mapped into the guest).
    registers: Arc<RegisterPage>,
    /// The ioeventfd that takes the driver's used-buffer acknowledgements in the kernel;
    /// never read (see `MmioInterrupt`), kept for as long as KVM writes to it.
    _ack_sink: Option<EventFd>,
}

impl MmioTransport {
    pub fn new(
        info: DeviceInfo,
        mem: GuestMemoryMmap,
        interrupt: Arc<MmioInterrupt>,
        workers: Vec<WorkerGroup>,
        ack_sink: Option<EventFd>,
    ) -> Self {
        let registers = interrupt.registers.clone();
        let end = (CONFIG_SPACE as usize + info.config_space.len()).min(RegisterPage::SIZE);
        registers.write_bytes(
            CONFIG_SPACE as usize,
            &info.config_space[..end - CONFIG_SPACE as usize],
        );
        let common = VirtioCommon::new(info, mem, Interrupt::new(interrupt.clone()), workers);
        let transport = MmioTransport {
            common,
            interrupt,
            registers,
            _ack_sink: ack_sink,
        };
        transport.publish();
        transport
    }

    /// Writes every register the driver may read whose value depends on the transport's
    /// state into the page. InterruptStatus belongs to `interrupt`; the config space is fixed.
    fn publish(&self) {
        let r = &self.registers;
        let c = &self.common;
        r.store(REG_MAGIC, MAGIC_VALUE);
        r.store(REG_VERSION, MMIO_VERSION);
        r.store(REG_DEVICE_ID, c.info.device_type);
        r.store(REG_VENDOR_ID, VENDOR_ID);
        r.store(REG_DEVICE_FEATURES, c.device_features_word());
        let selected = c.selected_queue();
        r.store(
            REG_QUEUE_NUM_MAX,
            selected.map_or(0, |q| u32::from(q.max_size)),
        );
        r.store(REG_QUEUE_READY, selected.map_or(0, |q| u32::from(q.ready)));
        // DEVICE_NEEDS_RESET is the worker's (it may set it concurrently); the rest is ours.
        r.store_masked(
            REG_STATUS,
            !u32::from(DEVICE_STATUS_NEEDS_RESET),
            u32::from(c.status),
        );
        r.store(REG_CONFIG_GENERATION, 0);
    }

    pub fn state(&self) -> MmioState {
        MmioState {
            common: self.common.state(),
            interrupt_status: self.registers.load(REG_INTERRUPT_STATUS),
            status_register: self.registers.load(REG_STATUS),
        }
    }

    /// Takes a snapshot's state into this new device (see `VirtioCommon::restore`).
    pub fn restore(&mut self, state: &MmioState) -> Result<(), String> {
        self.common.restore(&state.common)?;
        self.publish();
        self.registers.store(REG_STATUS, state.status_register);
        self.registers
            .store(REG_INTERRUPT_STATUS, state.interrupt_status);
        Ok(())
    }

    fn write_reg(&mut self, offset: u64, value: u32) {
        let c = &mut self.common;
        match offset {
            REG_DEVICE_FEATURES_SEL => c.device_features_sel = value,
            REG_DRIVER_FEATURES_SEL => c.driver_features_sel = value,
            REG_DRIVER_FEATURES => c.write_driver_features(value),
            REG_QUEUE_SEL => c.queue_sel = value,
            // Sizes are checked when the queue is built: a size that is zero, too large or not
            // a power of two makes activation fail cleanly.
            REG_QUEUE_NUM => c.with_queue(|q| q.size = value.min(0xffff) as u16),
            REG_QUEUE_READY => c.with_queue(|q| q.ready = value == 1),
            REG_QUEUE_DESC_LOW => c.with_queue(|q| set_low(&mut q.desc_table, value)),
            REG_QUEUE_DESC_HIGH => c.with_queue(|q| set_high(&mut q.desc_table, value)),
            REG_QUEUE_DRIVER_LOW => c.with_queue(|q| set_low(&mut q.avail_ring, value)),
            REG_QUEUE_DRIVER_HIGH => c.with_queue(|q| set_high(&mut q.avail_ring, value)),
            REG_QUEUE_DEVICE_LOW => c.with_queue(|q| set_low(&mut q.used_ring, value)),
            REG_QUEUE_DEVICE_HIGH => c.with_queue(|q| set_high(&mut q.used_ring, value)),
            REG_INTERRUPT_ACK => self.interrupt.ack(value),
            REG_STATUS => {
                if c.write_status(value as u8) == StatusChange::Reset {
                    self.registers.store(REG_STATUS, 0);
                }
            }
            // Notifications arrive through ioeventfds; a write that reaches us here (no
            // ioeventfd match, e.g. an out-of-range queue index) is ignored.
            REG_QUEUE_NOTIFY => {}
            _ => crate::guest_log!(
                tracing::Level::DEBUG,
                GUEST_LOG,
                "{}: ignored write {value:#x} to register {offset:#x} in status {:#x}",
                c.name(),
                c.status
            ),
        }
    }
}

impl BusDevice for MmioTransport {
    /// Reads normally come straight from the page in the guest; this serves them the same
    /// way when they exit anyway (e.g. an access KVM must emulate).
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        self.registers.read(offset, data);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= CONFIG_SPACE {
            crate::guest_log!(
                tracing::Level::DEBUG,
                GUEST_LOG,
                "{}: config space is read-only",
                self.common.name()
            );
            return;
        }
        // Registers are 32 bits wide and must be written as such.
        if let (4, true) = (data.len(), offset.is_multiple_of(4)) {
            let value = u32::from_le_bytes([data[0], data[1], data[2], data[3]]);
            self.write_reg(offset, value);
            self.publish();
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::mpsc;
    use std::time::Duration;

    use super::*;
    use crate::devices::virtio::testing::{memory, AVAIL_RING, DESC_TABLE, USED_RING};
    use crate::devices::virtio::worker::WorkerControl;

    /// Reports what the worker was told.
    struct Recorder(mpsc::Sender<String>);

    impl QueueHandler for Recorder {
        fn activate(&mut self, a: Activation) {
            let _ = self.0.send(format!(
                "activate {} queues features {:#x}",
                a.queues.len(),
                a.acked_features
            ));
        }
        fn reset(&mut self) {
            let _ = self.0.send("reset".into());
        }
        fn queue_notified(&mut self, index: usize) {
            let _ = self.0.send(format!("notify {index}"));
        }
    }

    const FEATURES: u64 = VIRTIO_F_VERSION_1 | (1 << 5);

    fn transport() -> (MmioTransport, mpsc::Receiver<String>, Arc<MmioInterrupt>) {
        let (tx, rx) = mpsc::channel();
        let control = WorkerControl::new().expect("control");
        let queue_evt = EventFd::new(0).expect("eventfd");
        crate::devices::virtio::worker::spawn(
            "test".into(),
            Box::new(Recorder(tx)),
            vec![queue_evt],
            control.clone(),
            None,
        )
        .expect("worker");
        let registers = Arc::new(RegisterPage::new().expect("register page"));
        let interrupt = MmioInterrupt::new(registers, Arc::new(EventFd::new(0).expect("irq")));
        let info = DeviceInfo {
            device_type: TYPE_BLOCK,
            queue_max_sizes: vec![16],
            features: FEATURES,
            config_space: vec![1, 2, 3, 4, 5, 6, 7, 8],
        };
        (
            MmioTransport::new(
                info,
                memory(),
                interrupt.clone(),
                vec![WorkerGroup {
                    control,
                    queues: 0..1,
                }],
                None,
            ),
            rx,
            interrupt,
        )
    }

    fn rd(t: &mut MmioTransport, off: u64) -> u32 {
        let mut d = [0u8; 4];
        t.read(off, &mut d);
        u32::from_le_bytes(d)
    }

    fn wr(t: &mut MmioTransport, off: u64, v: u32) {
        t.write(off, &v.to_le_bytes());
    }

    fn negotiate(t: &mut MmioTransport, features: u64) {
        wr(t, REG_STATUS, u32::from(DEVICE_STATUS_ACKNOWLEDGE));
        wr(
            t,
            REG_STATUS,
            u32::from(DEVICE_STATUS_ACKNOWLEDGE | DEVICE_STATUS_DRIVER),
        );
        wr(t, REG_DRIVER_FEATURES_SEL, 0);
        wr(t, REG_DRIVER_FEATURES, features as u32);
        wr(t, REG_DRIVER_FEATURES_SEL, 1);
        wr(t, REG_DRIVER_FEATURES, (features >> 32) as u32);
        wr(
            t,
            REG_STATUS,
            u32::from(DEVICE_STATUS_ACKNOWLEDGE | DEVICE_STATUS_DRIVER | DEVICE_STATUS_FEATURES_OK),
        );
    }

    fn setup_queue(t: &mut MmioTransport, size: u32) {
        wr(t, REG_QUEUE_SEL, 0);
        wr(t, REG_QUEUE_NUM, size);
        wr(t, REG_QUEUE_DESC_LOW, DESC_TABLE as u32);
        wr(t, REG_QUEUE_DESC_HIGH, 0);
        wr(t, REG_QUEUE_DRIVER_LOW, AVAIL_RING as u32);
        wr(t, REG_QUEUE_DEVICE_LOW, USED_RING as u32);
        wr(t, REG_QUEUE_READY, 1);
    }

    const ALL_OK: u32 = (DEVICE_STATUS_ACKNOWLEDGE
        | DEVICE_STATUS_DRIVER
        | DEVICE_STATUS_FEATURES_OK
        | DEVICE_STATUS_DRIVER_OK) as u32;

    #[test]
    fn identity_features_and_config() {
        let (mut t, _rx, _) = transport();
        assert_eq!(rd(&mut t, REG_MAGIC), 0x7472_6976);
        assert_eq!(rd(&mut t, REG_VERSION), 2);
        assert_eq!(rd(&mut t, REG_DEVICE_ID), TYPE_BLOCK);
        wr(&mut t, REG_DEVICE_FEATURES_SEL, 1);
        assert_eq!(rd(&mut t, REG_DEVICE_FEATURES), 1, "VERSION_1 is bit 32");
        wr(&mut t, REG_DEVICE_FEATURES_SEL, 0);
        assert_eq!(rd(&mut t, REG_DEVICE_FEATURES), 1 << 5);
        assert_eq!(rd(&mut t, REG_QUEUE_NUM_MAX), 16);
        wr(&mut t, REG_QUEUE_SEL, 7);
        assert_eq!(rd(&mut t, REG_QUEUE_NUM_MAX), 0, "no such queue");
        let mut cfg = [0u8; 4];
        t.read(CONFIG_SPACE + 6, &mut cfg);
        assert_eq!(cfg, [7, 8, 0, 0], "reads past the config space see zeroes");
        let mut odd = [0u8; 2];
        t.read(REG_MAGIC + 1, &mut odd);
        assert_eq!(
            odd,
            [b'i', b'r'],
            "reads see the page: any width, any alignment"
        );
        // What the guest reads is the page KVM maps into it, not a trap handler.
        let page = t.registers.clone();
        wr(&mut t, REG_QUEUE_SEL, 0);
        assert_eq!(page.load(REG_QUEUE_NUM_MAX), 16);
        assert_eq!(page.load(CONFIG_SPACE), 0x0403_0201);
    }

    #[test]
    fn full_setup_activates_the_worker_and_reset_stops_it() {
        let (mut t, rx, _) = transport();
        negotiate(&mut t, FEATURES);
        assert_ne!(
            rd(&mut t, REG_STATUS) & u32::from(DEVICE_STATUS_FEATURES_OK),
            0
        );
        setup_queue(&mut t, 8);
        wr(&mut t, REG_STATUS, ALL_OK);
        assert_eq!(rd(&mut t, REG_STATUS), ALL_OK);
        let got = rx.recv_timeout(Duration::from_secs(5)).expect("activation");
        assert_eq!(got, format!("activate 1 queues features {FEATURES:#x}"));
        // Queue registers are frozen while the device runs.
        wr(&mut t, REG_QUEUE_NUM, 4);
        wr(&mut t, REG_STATUS, 0);
        let rest: Vec<String> = rx
            .try_iter()
            .chain(rx.recv_timeout(Duration::from_secs(5)))
            .collect();
        assert!(rest.iter().any(|m| m == "reset"), "{rest:?}");
        assert_eq!(rd(&mut t, REG_STATUS), 0);
        assert_eq!(rd(&mut t, REG_QUEUE_READY), 0);
    }

    #[test]
    fn refuses_features_it_does_not_offer_or_legacy_drivers() {
        let (mut t, _rx, _) = transport();
        negotiate(&mut t, FEATURES | (1 << 9));
        assert_eq!(
            rd(&mut t, REG_STATUS) & u32::from(DEVICE_STATUS_FEATURES_OK),
            0
        );
        let (mut legacy, _rx2, _) = transport();
        negotiate(&mut legacy, 1 << 5);
        assert_eq!(
            rd(&mut legacy, REG_STATUS) & u32::from(DEVICE_STATUS_FEATURES_OK),
            0,
            "no VERSION_1"
        );
        // DRIVER_OK without FEATURES_OK does not start the device.
        wr(
            &mut legacy,
            REG_STATUS,
            u32::from(DEVICE_STATUS_ACKNOWLEDGE | DEVICE_STATUS_DRIVER | DEVICE_STATUS_DRIVER_OK),
        );
        assert_eq!(
            rd(&mut legacy, REG_STATUS) & u32::from(DEVICE_STATUS_DRIVER_OK),
            0
        );
    }

    #[test]
    fn bad_queues_make_the_device_need_a_reset_not_crash() {
        for (size, desc) in [
            (3u32, DESC_TABLE),
            (0, DESC_TABLE),
            (32, DESC_TABLE),
            (8, 1u64 << 40),
            (8, DESC_TABLE + 1),
        ] {
            let (mut t, rx, interrupt) = transport();
            negotiate(&mut t, FEATURES);
            setup_queue(&mut t, size);
            wr(&mut t, REG_QUEUE_DESC_LOW, desc as u32);
            wr(&mut t, REG_QUEUE_DESC_HIGH, (desc >> 32) as u32);
            wr(&mut t, REG_STATUS, ALL_OK);
            let status = rd(&mut t, REG_STATUS);
            assert_eq!(
                status & u32::from(DEVICE_STATUS_DRIVER_OK),
                0,
                "size {size} desc {desc:#x}"
            );
            assert_ne!(status & u32::from(DEVICE_STATUS_NEEDS_RESET), 0);
            assert_ne!(interrupt.status() & VIRTIO_MMIO_INT_CONFIG, 0);
            assert!(
                rx.recv_timeout(Duration::from_millis(100)).is_err(),
                "worker not activated"
            );
            // A reset brings it back.
            wr(&mut t, REG_STATUS, 0);
            assert_eq!(rd(&mut t, REG_STATUS), 0);
        }
    }

    #[test]
    fn random_register_writes_never_panic() {
        let mut rng = crate::devices::virtio::testing::Rng(42);
        for _ in 0..20 {
            let (mut t, _rx, _) = transport();
            for _ in 0..500 {
                let offset = rng.below(0x140) & !3;
                let value = match rng.below(3) {
                    0 => rng.next_u64() as u32,
                    1 => rng.below(16) as u32,
                    _ => ALL_OK,
                };
                if rng.below(2) == 0 {
                    wr(&mut t, offset, value);
                } else {
                    rd(&mut t, offset);
                }
            }
        }
    }

    #[test]
    fn the_used_buffer_bit_outlives_the_ack_the_config_bit_does_not() {
        let irqfd = Arc::new(EventFd::new(vmm_sys_util::eventfd::EFD_NONBLOCK).expect("eventfd"));
        let registers = Arc::new(RegisterPage::new().expect("register page"));
        let target = MmioInterrupt::new(registers.clone(), irqfd.clone());
        let i = Interrupt::new(target.clone());
        i.signal_needs_reset();
        i.signal_used_queue(1);
        assert_eq!(irqfd.read().ok(), Some(2), "one line for everything");
        assert_eq!(
            target.status(),
            VIRTIO_MMIO_INT_VRING | VIRTIO_MMIO_INT_CONFIG
        );
        assert_eq!(
            registers.load(REG_STATUS),
            u32::from(DEVICE_STATUS_NEEDS_RESET)
        );
        target.ack(VIRTIO_MMIO_INT_VRING | VIRTIO_MMIO_INT_CONFIG);
        assert_eq!(target.status(), VIRTIO_MMIO_INT_VRING);
        i.clear();
        assert_eq!(target.status(), 0, "a reset clears it");
        assert_eq!(registers.load(REG_STATUS), 0);
    }
}
