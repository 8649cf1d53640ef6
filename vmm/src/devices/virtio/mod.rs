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
pub mod pci;
pub mod registers;
pub mod rng;
pub mod tap;
pub mod throttle;
pub mod transport;
pub mod worker;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use crate::vstate::memory::GuestMemoryMmap;
use virtio_queue::{DescriptorChain, Queue, QueueOwnedT};

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

/// How a transport tells the driver about used buffers and about a device that needs a reset:
/// virtio-mmio sets a bit in its InterruptStatus register and raises its one line
/// (`mmio::MmioInterrupt`); virtio-pci raises the MSI-X vector the driver chose for the queue
/// (`pci::PciInterrupt`).
pub trait InterruptTarget: Send + Sync {
    /// Records that queue `queue` has new used buffers and returns the trigger (interrupt
    /// line or MSI-X vector, below [`MAX_TRIGGERS`]) that tells the driver; None when the
    /// driver asked for no interrupt for that queue.
    fn queue_used(&self, queue: usize) -> Option<u16>;
    /// Raises `trigger`.
    fn fire(&self, trigger: u16);
    /// DEVICE_NEEDS_RESET plus a configuration-change interrupt, as the virtio spec asks.
    fn needs_reset(&self);
    /// The driver reset the device: interrupt status and needs-reset are forgotten.
    fn reset(&self);
}

/// How many distinct triggers one device may have (its MSI-X table's most entries).
pub const MAX_TRIGGERS: usize = 128;

/// The device's interrupt as its worker sees it: a transport's [`InterruptTarget`] plus
/// coalescing.
///
/// Used-buffer interrupts can be coalesced: between `begin_batch` and `end_batch` (the worker
/// brackets everything it does in one wakeup with them) the transport records the used
/// buffers at once, but each trigger fires only once, at the end. A virtio-mmio device has one
/// interrupt line for all its queues, so a NIC's TX completions and received frames of the
/// same wakeup share one interrupt; with MSI-X each queue's vector fires once per wakeup.
#[derive(Clone)]
pub struct Interrupt {
    target: Arc<dyn InterruptTarget>,
    batching: Arc<AtomicBool>,
    /// Triggers to fire at the end of the batch, one bit each.
    deferred: Arc<[AtomicU64; MAX_TRIGGERS / 64]>,
}

impl Interrupt {
    pub fn new(target: Arc<dyn InterruptTarget>) -> Self {
        Interrupt {
            target,
            batching: Arc::new(AtomicBool::new(false)),
            deferred: Arc::new([AtomicU64::new(0), AtomicU64::new(0)]),
        }
    }

    /// Tells the driver that queue `queue` has new used buffers (at the end of the batch, if
    /// one is open).
    pub fn signal_used_queue(&self, queue: usize) {
        let Some(trigger) = self.target.queue_used(queue) else {
            return;
        };
        let word = usize::from(trigger) / 64;
        match self.deferred.get(word) {
            Some(bits) if self.batching.load(Ordering::SeqCst) => {
                bits.fetch_or(1 << (trigger % 64), Ordering::SeqCst);
            }
            _ => self.target.fire(trigger),
        }
    }

    /// From now on, used-buffer interrupts wait for `end_batch`.
    pub fn begin_batch(&self) {
        self.batching.store(true, Ordering::SeqCst);
    }

    /// Raises the interrupts deferred since `begin_batch`, if any.
    pub fn end_batch(&self) {
        self.batching.store(false, Ordering::SeqCst);
        for (word, bits) in self.deferred.iter().enumerate() {
            let mut pending = bits.swap(0, Ordering::SeqCst);
            while pending != 0 {
                let bit = pending.trailing_zeros();
                pending &= pending - 1;
                self.target.fire((word * 64) as u16 + bit as u16);
            }
        }
    }

    /// The driver broke the device (e.g. rings outside guest memory): DEVICE_NEEDS_RESET plus
    /// a configuration-change interrupt, never deferred.
    pub fn signal_needs_reset(&self) {
        self.target.needs_reset();
    }

    /// An interrupt for another worker of the same device: the same transport, its own
    /// batch (workers of one device run concurrently).
    pub fn for_worker(&self) -> Interrupt {
        Interrupt::new(self.target.clone())
    }

    /// The device was reset: nothing is pending any more.
    pub fn clear(&self) {
        for bits in self.deferred.iter() {
            bits.store(0, Ordering::SeqCst);
        }
        self.target.reset();
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

/// Serves every request available on `queue` (number `index` of its device, counted in
/// `counters`): `handle` gets each chain's descriptors and returns
/// the used length, or None to leave the chain on the queue for later (a rate limit; the
/// device's timer brings the worker back, so notifications stay off meanwhile). Re-checks after re-enabling notifications (no kick is lost) and interrupts
/// the driver if it asked for it. Returns false if the driver broke the queue.
pub fn serve_queue(
    index: usize,
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
    interrupt: &Interrupt,
    counters: &DeviceCounters,
    mut handle: impl FnMut(&[virtio_queue::desc::split::Descriptor]) -> Option<u32>,
) -> bool {
    use virtio_queue::QueueT;
    let mut used_any = false;
    'serve: loop {
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
            let Some(used_len) = handle(&descriptors) else {
                queue.go_to_previous_position();
                break 'serve;
            };
            if queue.add_used(mem, head, used_len).is_err() {
                return false;
            }
            counters.used(index, 1);
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
            Ok(true) => interrupt.signal_used_queue(index),
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
        // A driver can break, reset and reactivate a queue in a loop.
        static LOG: crate::devices::log_limit::LogLimit = crate::devices::log_limit::LogLimit::new(
            crate::devices::log_limit::DEFAULT_BURST,
            crate::devices::log_limit::DEFAULT_INTERVAL,
        );
        crate::guest_log!(
            tracing::Level::DEBUG,
            LOG,
            "virtio queue broken by the driver; device needs reset"
        );
        current.interrupt.signal_needs_reset();
    }
}

/// The whole queue work of a single-queue device (or group): serves every chain on the first
/// queue of `active` with `handle` (guest memory, the chain's descriptors -> used length);
/// a queue the driver broke stops the device (NEEDS_RESET).
pub fn serve_first_queue(
    active: &mut Option<Activation>,
    counters: &DeviceCounters,
    mut handle: impl FnMut(&GuestMemoryMmap, &[virtio_queue::desc::split::Descriptor]) -> Option<u32>,
) {
    with_active(&mut (), active, |_, a| {
        let mem = a.mem.clone();
        let Some(queue) = a.queues.first_mut() else {
            return false;
        };
        serve_queue(a.first_queue, queue, &mem, &a.interrupt, counters, |d| {
            handle(&mem, d)
        })
    });
}

/// What a device worker gets when the driver sets DRIVER_OK: its group's queues, the first
/// of which is the device's queue number `first_queue` (for interrupts and counters).
pub struct Activation {
    pub mem: GuestMemoryMmap,
    pub queues: Vec<Queue>,
    pub first_queue: usize,
    pub acked_features: u64,
    pub interrupt: Interrupt,
}

/// Part of a multiqueue device: a handler serving a contiguous range of the device's queues
/// on a worker thread of its own. A single-queue device is one group.
pub struct QueueGroup {
    pub handler: Box<dyn QueueHandler>,
    pub queues: std::ops::Range<usize>,
}

/// The device-specific half of a virtio device, run on its worker thread.
pub trait QueueHandler: Send {
    /// The driver set DRIVER_OK: start using these queues.
    fn activate(&mut self, activation: Activation);
    /// The driver reset the device: stop using the queues (they are dropped).
    fn reset(&mut self);
    /// Queue `index` (counted from the group's first queue) was kicked by the driver.
    fn queue_notified(&mut self, index: usize);
    /// The backend file descriptor to watch for input (the TAP device of a NIC).
    fn backend_fd(&self) -> Option<std::os::fd::RawFd> {
        None
    }
    /// The backend file descriptor is readable.
    fn backend_ready(&mut self) {}
    /// The rate limit timers to watch (see `throttle`), at most [`MAX_TIMERS`].
    fn timer_fds(&self) -> Vec<std::os::fd::RawFd> {
        Vec::new()
    }
    /// Rate limit timer `index` fired, or (index None) the limits changed: retry what waits.
    fn timer_fired(&mut self, _index: Option<usize>) {}
    /// The guest continues on this host after a restore or migration: tell the network
    /// (a NIC announces its MAC address; other devices have nothing to say).
    fn announce(&mut self) {}
}

/// The most rate limit timers one handler has (a NIC: receive and transmit).
pub const MAX_TIMERS: usize = 2;

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

/// Which counters a device keeps, so `info` names them for what they count.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub enum CounterKind {
    /// requests, bytes_read and bytes_written (from and to the disk), errors.
    #[default]
    Disk,
    /// rx_bytes, rx_packets (to the guest), tx_bytes, tx_packets (from it), errors.
    Net,
    /// requests and bytes (of entropy handed to the guest), errors.
    Entropy,
}

/// Per-device counters, readable while the VM runs (by the API's `info`), shared by the
/// device's workers: totals, and the buffers each queue used. The device's rate-limited log
/// of guest errors lives here too, shared the same way.
#[derive(Debug, Default)]
pub struct DeviceCounters {
    pub kind: CounterKind,
    pub requests: std::sync::atomic::AtomicU64,
    /// Disk: bytes read from the image; entropy: bytes handed out.
    pub bytes_read: std::sync::atomic::AtomicU64,
    /// Disk: bytes written to the image.
    pub bytes_written: std::sync::atomic::AtomicU64,
    /// Net: frames (vnet header included) and their bytes, received by the guest.
    pub rx_bytes: std::sync::atomic::AtomicU64,
    pub rx_packets: std::sync::atomic::AtomicU64,
    /// Net: frames (vnet header included) and their bytes, sent by the guest.
    pub tx_bytes: std::sync::atomic::AtomicU64,
    pub tx_packets: std::sync::atomic::AtomicU64,
    pub errors: std::sync::atomic::AtomicU64,
    /// Buffers used per queue (requests served, frames moved).
    pub queue_used: Box<[AtomicU64]>,
    /// Warnings about what the guest did, rate-limited (see `devices::log_limit`).
    pub guest_log: crate::devices::log_limit::LogLimit,
}

impl DeviceCounters {
    pub fn with_queues(kind: CounterKind, queues: usize) -> Self {
        DeviceCounters {
            kind,
            queue_used: (0..queues).map(|_| AtomicU64::new(0)).collect(),
            ..Default::default()
        }
    }

    pub fn add(counter: &std::sync::atomic::AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    /// Counts `n` used buffers on queue `queue` of the device.
    pub fn used(&self, queue: usize, n: u64) {
        if let Some(c) = self.queue_used.get(queue) {
            c.fetch_add(n, Ordering::Relaxed);
        }
    }
}
#[cfg(test)]
pub mod testing;

#[cfg(test)]
mod interrupt_tests {
    use super::*;
    use std::sync::Mutex;

    /// Records what the transport was asked to do; queue 3 has no trigger.
    #[derive(Default)]
    struct Recorder(Mutex<Vec<String>>);

    impl InterruptTarget for Recorder {
        fn queue_used(&self, queue: usize) -> Option<u16> {
            (queue != 3).then_some(queue as u16 * 10)
        }
        fn fire(&self, trigger: u16) {
            self.0.lock().expect("lock").push(format!("fire {trigger}"));
        }
        fn needs_reset(&self) {
            self.0.lock().expect("lock").push("needs reset".into());
        }
        fn reset(&self) {
            self.0.lock().expect("lock").push("reset".into());
        }
    }

    fn interrupt() -> (Interrupt, Arc<Recorder>) {
        let target = Arc::new(Recorder::default());
        (Interrupt::new(target.clone()), target)
    }

    fn taken(r: &Recorder) -> Vec<String> {
        std::mem::take(&mut *r.0.lock().expect("lock"))
    }

    #[test]
    fn outside_a_batch_every_signal_fires() {
        let (i, r) = interrupt();
        i.signal_used_queue(0);
        i.signal_used_queue(0);
        i.signal_used_queue(3);
        assert_eq!(taken(&r), ["fire 0", "fire 0"], "queue 3 has no trigger");
    }

    #[test]
    fn a_batch_fires_each_trigger_once_at_its_end() {
        let (i, r) = interrupt();
        i.begin_batch();
        i.signal_used_queue(1);
        i.signal_used_queue(12);
        i.signal_used_queue(1);
        assert!(taken(&r).is_empty(), "nothing before the batch ends");
        i.end_batch();
        assert_eq!(taken(&r), ["fire 10", "fire 120"]);
        // A batch without signals fires nothing; a trigger past the table is never deferred.
        i.begin_batch();
        i.end_batch();
        assert!(taken(&r).is_empty());
        i.begin_batch();
        i.signal_used_queue(20);
        assert_eq!(taken(&r), ["fire 200"]);
        i.end_batch();
    }

    #[test]
    fn needs_reset_is_never_deferred_and_clear_forgets_the_batch() {
        let (i, r) = interrupt();
        i.begin_batch();
        i.signal_used_queue(0);
        i.signal_needs_reset();
        assert_eq!(taken(&r), ["needs reset"]);
        i.clear();
        i.end_batch();
        assert_eq!(
            taken(&r),
            ["reset"],
            "the deferred interrupt died with the reset"
        );
    }
}
