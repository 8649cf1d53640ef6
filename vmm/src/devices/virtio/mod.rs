//! Virtio 1.x devices on the virtio-mmio transport.
//!
//! ```text
//! driver reads ── register page, mapped read-only (no exit) <── publish ──┐
//! driver writes ── MMIO exit ──> vCPU thread: MmioTransport (features, queues, status)
//!                                            │ activate / reset (control eventfd)
//! guest kick ── ioeventfd ──> worker thread ─┴─> QueueHandler (blk, net, rng) ── irqfd ──> guest
//! interrupt ACK ── ioeventfd (absorbed in the kernel)
//! ```
//!
//! Queue notifications reach the device's worker thread through ioeventfds without a VM exit
//! to userspace, and interrupts go back through irqfds. The driver reads every register from
//! a page KVM maps read-only into the guest (`registers`), so an interrupt costs it no exit
//! to the VMM at all: the status read is a memory load and the acknowledgement ends in an
//! ioeventfd. The vCPU threads only see register writes during setup. Worker threads are
//! started with the VM (none are created later), so they can be sandboxed like every other
//! thread.

pub mod block;
pub mod mmio;
pub mod net;
pub mod registers;
pub mod rng;
pub mod tap;
pub mod worker;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use virtio_queue::{DescriptorChain, Queue, QueueOwnedT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use registers::RegisterPage;

pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;
pub const VIRTIO_RING_F_INDIRECT_DESC: u64 = 1 << 28;
pub const VIRTIO_RING_F_EVENT_IDX: u64 = 1 << 29;

pub const DEVICE_STATUS_ACKNOWLEDGE: u8 = 1;
pub const DEVICE_STATUS_DRIVER: u8 = 2;
pub const DEVICE_STATUS_DRIVER_OK: u8 = 4;
pub const DEVICE_STATUS_FEATURES_OK: u8 = 8;
pub const DEVICE_STATUS_NEEDS_RESET: u8 = 0x40;
pub const DEVICE_STATUS_FAILED: u8 = 0x80;

pub const VIRTIO_MMIO_INT_VRING: u32 = 1;
pub const VIRTIO_MMIO_INT_CONFIG: u32 = 2;

pub const TYPE_NET: u32 = 1;
pub const TYPE_BLOCK: u32 = 2;
pub const TYPE_RNG: u32 = 4;

/// The device's interrupt: the InterruptStatus register the driver reads (in the device's
/// register page) and the irqfd that raises the guest interrupt. The worker also sets
/// DEVICE_NEEDS_RESET in the page's Status register through it when the driver broke the
/// device.
///
/// The used-buffer bit is sticky: once set it stays set until the device is reset. The
/// driver acknowledges it on every interrupt, and that write is absorbed in the kernel by an
/// ioeventfd (no exit to the VMM), so the device never learns of it; the driver then finds
/// the bit on every interrupt of this device's exclusive line and looks at its rings, which
/// is what each interrupt is for. Other bits (configuration change) are acknowledged normally.
///
/// Used-buffer interrupts can be coalesced: between `begin_batch` and `end_batch` (the worker
/// brackets everything it does in one wakeup with them) the status bit is set at once but
/// the irqfd is written only once, at the end. A virtio-mmio device has one interrupt line
/// for all its queues, so a NIC's TX completions and received frames of the same wakeup
/// share one interrupt.
#[derive(Clone)]
pub struct Interrupt {
    registers: Arc<RegisterPage>,
    irqfd: Arc<EventFd>,
    batching: Arc<AtomicBool>,
    deferred: Arc<AtomicBool>,
}

impl Interrupt {
    pub fn new(registers: Arc<RegisterPage>, irqfd: Arc<EventFd>) -> Self {
        Interrupt {
            registers,
            irqfd,
            batching: Arc::new(AtomicBool::new(false)),
            deferred: Arc::new(AtomicBool::new(false)),
        }
    }

    /// The register page this interrupt's status lives in.
    pub fn registers(&self) -> &Arc<RegisterPage> {
        &self.registers
    }

    fn raise(&self, bit: u32) {
        self.registers.fetch_or(mmio::REG_INTERRUPT_STATUS, bit);
        self.trigger();
    }

    fn trigger(&self) {
        if let Err(e) = self.irqfd.write(1) {
            tracing::warn!("cannot raise a virtio interrupt: {e}");
        }
    }

    /// Tells the driver that a queue has new used buffers (at the end of the batch, if one
    /// is open).
    pub fn signal_used_queue(&self) {
        if self.batching.load(Ordering::SeqCst) {
            self.registers
                .fetch_or(mmio::REG_INTERRUPT_STATUS, VIRTIO_MMIO_INT_VRING);
            self.deferred.store(true, Ordering::SeqCst);
        } else {
            self.raise(VIRTIO_MMIO_INT_VRING);
        }
    }

    /// From now on, used-buffer interrupts wait for `end_batch`.
    pub fn begin_batch(&self) {
        self.batching.store(true, Ordering::SeqCst);
    }

    /// Raises the interrupt deferred since `begin_batch`, if any.
    pub fn end_batch(&self) {
        self.batching.store(false, Ordering::SeqCst);
        if self.deferred.swap(false, Ordering::SeqCst) {
            self.trigger();
        }
    }

    /// The driver broke the device (e.g. rings outside guest memory): DEVICE_NEEDS_RESET plus
    /// a configuration-change interrupt, as the virtio spec asks.
    pub fn signal_needs_reset(&self) {
        self.registers
            .fetch_or(mmio::REG_STATUS, u32::from(DEVICE_STATUS_NEEDS_RESET));
        self.raise(VIRTIO_MMIO_INT_CONFIG);
    }

    pub fn status(&self) -> u32 {
        self.registers.load(mmio::REG_INTERRUPT_STATUS)
    }

    /// The driver's acknowledgement of `bits`; the used-buffer bit stays (see above).
    pub fn ack(&self, bits: u32) {
        self.registers
            .fetch_and(mmio::REG_INTERRUPT_STATUS, !(bits & !VIRTIO_MMIO_INT_VRING));
    }

    fn clear(&self) {
        self.registers.store(mmio::REG_INTERRUPT_STATUS, 0);
        self.deferred.store(false, Ordering::SeqCst);
    }
}

/// The next available descriptor chain, told apart from an empty ring and from a ring the
/// driver broke (an available index more than a queue's worth ahead). `pop_descriptor_chain`
/// says `None` for both, and a device that waits for "empty" would spin forever on the latter.
pub enum Popped<'a> {
    Chain(DescriptorChain<&'a GuestMemoryMmap>),
    Empty,
    Broken,
}

pub fn pop_chain<'a>(queue: &mut Queue, mem: &'a GuestMemoryMmap) -> Popped<'a> {
    match queue.iter(mem) {
        Err(_) => Popped::Broken,
        Ok(mut available) => match available.next() {
            Some(chain) => Popped::Chain(chain),
            None => Popped::Empty,
        },
    }
}

/// Serves every request available on `queue`: `handle` gets each chain's descriptors and returns
/// the used length. Re-checks after re-enabling notifications (no kick is lost) and interrupts
/// the driver if it asked for it. Returns false if the driver broke the queue.
pub fn serve_queue(
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
    interrupt: &Interrupt,
    mut handle: impl FnMut(&[virtio_queue::desc::split::Descriptor]) -> u32,
) -> bool {
    use virtio_queue::QueueT;
    let mut used_any = false;
    loop {
        if queue.disable_notification(mem).is_err() {
            return false;
        }
        loop {
            let chain = match pop_chain(queue, mem) {
                Popped::Chain(chain) => chain,
                Popped::Empty => break,
                Popped::Broken => return false,
            };
            let head = chain.head_index();
            let descriptors: Vec<_> = chain.collect();
            let used_len = handle(&descriptors);
            if queue.add_used(mem, head, used_len).is_err() {
                return false;
            }
            used_any = true;
        }
        match queue.enable_notification(mem) {
            Ok(true) => continue,
            Ok(false) => break,
            Err(_) => return false,
        }
    }
    if used_any {
        match queue.needs_notification(mem) {
            Ok(true) => interrupt.signal_used_queue(),
            Ok(false) => {}
            Err(_) => return false,
        }
    }
    true
}

/// Runs `f` on the device's active queues; a broken queue stops the device (NEEDS_RESET).
pub fn with_active<D>(
    device: &mut D,
    active: &mut Option<Activation>,
    f: impl FnOnce(&mut D, &mut Activation) -> bool,
) {
    let Some(mut current) = active.take() else {
        return;
    };
    if f(device, &mut current) {
        *active = Some(current);
    } else {
        tracing::debug!("virtio queue broken by the driver; device needs reset");
        current.interrupt.signal_needs_reset();
    }
}

/// What a device worker gets when the driver sets DRIVER_OK.
pub struct Activation {
    pub mem: GuestMemoryMmap,
    pub queues: Vec<Queue>,
    pub acked_features: u64,
    pub interrupt: Interrupt,
}

/// The device-specific half of a virtio device, run on its worker thread.
pub trait QueueHandler: Send {
    /// The driver set DRIVER_OK: start using these queues.
    fn activate(&mut self, activation: Activation);
    /// The driver reset the device: stop using the queues (they are dropped).
    fn reset(&mut self);
    /// Queue `index` was kicked by the driver.
    fn queue_notified(&mut self, index: usize);
    /// The backend file descriptor to watch for input (the TAP device of a NIC).
    fn backend_fd(&self) -> Option<std::os::fd::RawFd> {
        None
    }
    /// The backend file descriptor is readable.
    fn backend_ready(&mut self) {}
}

/// The static description of a device that the transport presents to the driver.
pub struct DeviceInfo {
    pub device_type: u32,
    pub queue_max_sizes: Vec<u16>,
    pub features: u64,
    /// The device-specific configuration space, read-only for the driver.
    pub config_space: Vec<u8>,
}

/// A short name for logs and counters, e.g. "virtio-blk".
pub fn type_name(device_type: u32) -> &'static str {
    match device_type {
        TYPE_NET => "virtio-net",
        TYPE_BLOCK => "virtio-blk",
        TYPE_RNG => "virtio-rng",
        _ => "virtio",
    }
}

/// Per-device counters, readable while the VM runs (by the API's `info`).
#[derive(Debug, Default)]
pub struct DeviceCounters {
    pub requests: std::sync::atomic::AtomicU64,
    pub bytes_read: std::sync::atomic::AtomicU64,
    pub bytes_written: std::sync::atomic::AtomicU64,
    pub errors: std::sync::atomic::AtomicU64,
}

impl DeviceCounters {
    pub fn add(counter: &std::sync::atomic::AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }
}
#[cfg(test)]
pub mod testing;

#[cfg(test)]
mod interrupt_tests {
    use super::*;
    use vmm_sys_util::eventfd::EFD_NONBLOCK;

    fn interrupt() -> (Interrupt, Arc<EventFd>) {
        let irqfd = Arc::new(EventFd::new(EFD_NONBLOCK).expect("eventfd"));
        let registers = Arc::new(RegisterPage::new().expect("register page"));
        (Interrupt::new(registers, irqfd.clone()), irqfd)
    }

    #[test]
    fn outside_a_batch_every_signal_raises_the_interrupt() {
        let (i, irqfd) = interrupt();
        i.signal_used_queue();
        i.signal_used_queue();
        assert_eq!(irqfd.read().ok(), Some(2));
        assert_eq!(i.status(), VIRTIO_MMIO_INT_VRING);
    }

    #[test]
    fn a_batch_raises_one_interrupt_at_its_end() {
        let (i, irqfd) = interrupt();
        i.begin_batch();
        i.signal_used_queue();
        i.signal_used_queue();
        // The driver sees the status bit at once; the interrupt waits.
        assert_eq!(i.status(), VIRTIO_MMIO_INT_VRING);
        assert!(irqfd.read().is_err(), "no interrupt before the batch ends");
        i.end_batch();
        assert_eq!(irqfd.read().ok(), Some(1));
        // A batch without signals raises nothing.
        i.begin_batch();
        i.end_batch();
        assert!(irqfd.read().is_err());
    }

    #[test]
    fn the_used_buffer_bit_outlives_the_ack_the_config_bit_does_not() {
        let (i, irqfd) = interrupt();
        i.signal_needs_reset();
        i.signal_used_queue();
        assert_eq!(irqfd.read().ok(), Some(2));
        assert_eq!(i.status(), VIRTIO_MMIO_INT_VRING | VIRTIO_MMIO_INT_CONFIG);
        i.ack(VIRTIO_MMIO_INT_VRING | VIRTIO_MMIO_INT_CONFIG);
        assert_eq!(i.status(), VIRTIO_MMIO_INT_VRING);
        i.clear();
        assert_eq!(i.status(), 0, "a reset clears it");
    }

    #[test]
    fn needs_reset_is_never_deferred() {
        let (i, irqfd) = interrupt();
        i.begin_batch();
        i.signal_needs_reset();
        assert_eq!(irqfd.read().ok(), Some(1));
        assert_eq!(i.status(), VIRTIO_MMIO_INT_CONFIG);
        assert_eq!(
            i.registers().load(mmio::REG_STATUS),
            u32::from(DEVICE_STATUS_NEEDS_RESET)
        );
        i.end_batch();
    }
}
