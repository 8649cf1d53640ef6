//! virtio-net backed by a TAP device: frames move between the rings and the TAP with one
//! readv/writev each, straight from and into guest memory, vnet header included, so the
//! checksum and TSO offloads the guest and host agree on pass through untouched.

use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;

use crate::vstate::memory::GuestMemoryMmap;
use virtio_queue::desc::split::Descriptor;
use virtio_queue::{QueueOwnedT, QueueT};
use vm_memory::{GuestAddress, GuestMemoryBackend};

use super::tap::{
    Tap, TapError, TapQueues, TUN_F_CSUM, TUN_F_TSO4, TUN_F_TSO6, TUN_F_TSO_ECN, VNET_HDR_LEN,
};
use super::throttle::{Admit, SharedLimit, Throttle};
use super::{
    pop_chain, serve_first_queue, serve_queue, with_active, Activation, CounterKind,
    DeviceCounters, DeviceInfo, Popped, QueueGroup, QueueHandler, TYPE_NET, VIRTIO_F_VERSION_1,
    VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC,
};

const QUEUE_SIZE: u16 = 256;
/// The control queue carries a few small commands.
const CTRL_QUEUE_SIZE: u16 = 64;
const RX_QUEUE: usize = 0;
const TX_QUEUE: usize = 1;
/// Largest frame the guest may send: a 64 KiB TSO frame plus headers.
pub const MAX_TX_FRAME: u64 = 65536 + 256 + VNET_HDR_LEN as u64;
/// The most buffers one readv/writev takes (the kernel's UIO_MAXIOV): a chain with more
/// (indirect tables can hold thousands) is completed with an error, never retried forever.
pub const MAX_IOVECS: usize = libc::UIO_MAXIOV as usize;

const VIRTIO_NET_F_CSUM: u64 = 1 << 0;
const VIRTIO_NET_F_GUEST_CSUM: u64 = 1 << 1;
const VIRTIO_NET_F_MAC: u64 = 1 << 5;
const VIRTIO_NET_F_GUEST_TSO4: u64 = 1 << 7;
const VIRTIO_NET_F_GUEST_TSO6: u64 = 1 << 8;
const VIRTIO_NET_F_GUEST_ECN: u64 = 1 << 9;
const VIRTIO_NET_F_HOST_TSO4: u64 = 1 << 11;
const VIRTIO_NET_F_HOST_TSO6: u64 = 1 << 12;
const VIRTIO_NET_F_HOST_ECN: u64 = 1 << 13;
const VIRTIO_NET_F_CTRL_VQ: u64 = 1 << 17;
const VIRTIO_NET_F_MQ: u64 = 1 << 22;

/// Control queue: class and command of "set the number of queue pairs in use".
const VIRTIO_NET_CTRL_MQ: u8 = 4;
const VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET: u8 = 0;
const VIRTIO_NET_OK: u8 = 0;
const VIRTIO_NET_ERR: u8 = 1;

pub type MacAddr = [u8; 6];

/// Parses "52:54:00:12:34:56".
pub fn parse_mac(s: &str) -> Option<MacAddr> {
    let mut mac = [0u8; 6];
    let mut parts = s.split(':');
    for byte in &mut mac {
        let part = parts.next()?;
        if part.len() != 2 {
            return None;
        }
        *byte = u8::from_str_radix(part, 16).ok()?;
    }
    parts.next().is_none().then_some(mac)
}

pub fn format_mac(mac: &MacAddr) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// A stable, locally administered unicast MAC derived from the TAP name, for NICs given none.
pub fn default_mac(tap: &str) -> MacAddr {
    // FNV-1a: stable across runs and builds, unlike std's randomly keyed hasher.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in tap.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    let b = h.to_le_bytes();
    [0x52, 0x54, 0x00, b[0], b[1], b[2]]
}

/// Where a queue pair's frames go and come from: a TAP queue, or in tests and fuzzing a
/// datagram socket (it keeps frame boundaries the same way). One frame per readv/writev,
/// vnet header included; the descriptor is non-blocking and watched for input.
pub trait NetBackend: AsRawFd + Send {
    fn name(&self) -> &str;
    /// Which offloaded frames the backend may hand to the guest (TUN_F_*).
    fn set_offload(&self, flags: u32) -> Result<(), TapError>;
    fn readv(&self, iovs: &[libc::iovec]) -> std::io::Result<usize>;
    fn writev(&self, iovs: &[libc::iovec]) -> std::io::Result<usize>;
}

impl NetBackend for Tap {
    fn name(&self) -> &str {
        Tap::name(self)
    }
    fn set_offload(&self, flags: u32) -> Result<(), TapError> {
        Tap::set_offload(self, flags)
    }
    fn readv(&self, iovs: &[libc::iovec]) -> std::io::Result<usize> {
        Tap::readv(self, iovs)
    }
    fn writev(&self, iovs: &[libc::iovec]) -> std::io::Result<usize> {
        Tap::writev(self, iovs)
    }
}

/// The worker half of one queue pair (receive, transmit) and its TAP queue.
pub struct NetDevice {
    tap: Box<dyn NetBackend>,
    counters: Arc<DeviceCounters>,
    active: Option<Activation>,
    /// Rate limits of receiving and transmitting (see `throttle`), shared by the pairs.
    rx_throttle: Option<Throttle>,
    tx_throttle: Option<Throttle>,
    /// The NIC's MAC address, on the queue pair that announces it after a restore.
    announces: Option<MacAddr>,
}

/// The frame that tells the network where a moved guest is now, as QEMU's self-announce
/// sends it: a broadcast RARP request from the guest's MAC address (switches and bridges
/// learn the new port from its source address; nobody answers it).
pub fn announcement(mac: MacAddr) -> [u8; 60] {
    let mut frame = [0u8; 60];
    frame[..6].fill(0xff);
    frame[6..12].copy_from_slice(&mac);
    frame[12..14].copy_from_slice(&0x8035u16.to_be_bytes()); // RARP
    let arp = [0, 1, 8, 0, 6, 4, 0, 3]; // Ethernet, IPv4, lengths 6 and 4, reverse request
    frame[14..22].copy_from_slice(&arp);
    frame[22..28].copy_from_slice(&mac); // sender hardware address
    frame[32..38].copy_from_slice(&mac); // target hardware address
    frame
}

/// A NIC as the transport needs it: its description, the handlers of its queue groups (one
/// per queue pair, plus the control queue when there are several pairs) and its counters.
pub struct Nic {
    pub info: DeviceInfo,
    pub groups: Vec<QueueGroup>,
    pub counters: Arc<DeviceCounters>,
}

/// How many queue pairs a NIC on a named TAP gets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pairs {
    /// Exactly this many (asked for by the user): the TAP must allow it.
    Exactly(u16),
    /// This many if the TAP is multi_queue (or is created now), else one: the default, so a
    /// single-queue TAP that works today keeps working.
    UpTo(u16),
}

/// A NIC's rate limits, one per direction, shared by its queue pairs.
#[derive(Clone)]
pub struct NetLimits {
    pub rx: Arc<SharedLimit>,
    pub tx: Arc<SharedLimit>,
}

/// A NIC on the TAP called `tap_name`.
pub fn open(
    tap_name: &str,
    mac: MacAddr,
    pairs: Pairs,
    limits: Option<&NetLimits>,
) -> Result<Nic, TapError> {
    let taps = match pairs {
        Pairs::Exactly(n) | Pairs::UpTo(n) if n <= 1 => vec![Tap::open(tap_name)?],
        Pairs::Exactly(n) => Tap::open_queues(tap_name, TapQueues::Multi(n))?,
        Pairs::UpTo(n) => match Tap::open_queues(tap_name, TapQueues::Multi(n)) {
            Ok(taps) => taps,
            Err(e) => {
                tracing::info!(
                    "{e}; {tap_name} gets one queue pair (create the TAP multi_queue for {n})"
                );
                vec![Tap::open(tap_name)?]
            }
        },
    };
    new(taps, mac, limits)
}

/// A NIC on an inherited TAP descriptor (one queue pair); without a MAC, the default for the
/// TAP's name.
pub fn open_fd(
    fd: RawFd,
    mac: Option<MacAddr>,
    limits: Option<&NetLimits>,
) -> Result<Nic, TapError> {
    let tap = Tap::from_fd(fd)?;
    let mac = mac.unwrap_or_else(|| default_mac(tap.name()));
    new(vec![tap], mac, limits)
}

fn new(taps: Vec<Tap>, mac: MacAddr, limits: Option<&NetLimits>) -> Result<Nic, TapError> {
    let pairs = taps.len();
    let mut features = VIRTIO_F_VERSION_1
        | VIRTIO_RING_F_EVENT_IDX
        | VIRTIO_RING_F_INDIRECT_DESC
        | VIRTIO_NET_F_MAC
        | VIRTIO_NET_F_CSUM
        | VIRTIO_NET_F_GUEST_CSUM
        | VIRTIO_NET_F_GUEST_TSO4
        | VIRTIO_NET_F_GUEST_TSO6
        | VIRTIO_NET_F_GUEST_ECN
        | VIRTIO_NET_F_HOST_TSO4
        | VIRTIO_NET_F_HOST_TSO6
        | VIRTIO_NET_F_HOST_ECN;
    // struct virtio_net_config: mac, status (unused), max_virtqueue_pairs.
    let mut config_space = mac.to_vec();
    let mut queue_max_sizes = vec![QUEUE_SIZE; 2 * pairs];
    if pairs > 1 {
        features |= VIRTIO_NET_F_MQ | VIRTIO_NET_F_CTRL_VQ;
        config_space.extend_from_slice(&[0, 0]);
        config_space.extend_from_slice(&(pairs as u16).to_le_bytes());
        queue_max_sizes.push(CTRL_QUEUE_SIZE);
    }
    let counters = new_counters(queue_max_sizes.len());
    let mut groups = Vec::with_capacity(pairs + 1);
    for (k, tap) in taps.into_iter().enumerate() {
        let mut dev = NetDevice::with_backend(Box::new(tap), counters.clone());
        if k == 0 {
            dev.announces = Some(mac);
        }
        if let Some(l) = limits {
            dev.set_throttles(
                Throttle::new(l.rx.clone()).map_err(TapError::Timer)?,
                Throttle::new(l.tx.clone()).map_err(TapError::Timer)?,
            );
        }
        groups.push(QueueGroup {
            handler: Box::new(dev),
            queues: 2 * k..2 * k + 2,
        });
    }
    if pairs > 1 {
        groups.push(QueueGroup {
            handler: Box::new(NetControl {
                pairs: pairs as u16,
                counters: counters.clone(),
                active: None,
            }),
            queues: 2 * pairs..2 * pairs + 1,
        });
    }
    Ok(Nic {
        info: DeviceInfo {
            device_type: TYPE_NET,
            queue_max_sizes,
            features,
            config_space,
        },
        groups,
        counters,
    })
}

/// The control queue of a multiqueue NIC: the driver says how many queue pairs it uses.
/// Every pair is always served, so the command only needs checking and acknowledging;
/// anything else is refused (its features are not offered).
struct NetControl {
    pairs: u16,
    counters: Arc<DeviceCounters>,
    active: Option<Activation>,
}

/// Executes one control command: header (class, command), data, then the ack byte the
/// device writes. Returns the used length.
fn control_command(mem: &GuestMemoryMmap, descriptors: &[Descriptor], pairs: u16) -> u32 {
    use vm_memory::Bytes;
    let Some((ack, rest)) = descriptors.split_last() else {
        return 0;
    };
    if !ack.is_write_only() || ack.len() == 0 {
        return 0;
    }
    let mut command = Vec::new();
    for d in rest.iter().take(4) {
        if d.is_write_only() || d.len() > 64 {
            break;
        }
        let mut buf = vec![0u8; d.len() as usize];
        if mem.read_slice(&mut buf, GuestAddress(d.addr().0)).is_err() {
            break;
        }
        command.extend_from_slice(&buf);
    }
    let status = match command.as_slice() {
        [VIRTIO_NET_CTRL_MQ, VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET, lo, hi, ..]
            if (1..=pairs).contains(&u16::from_le_bytes([*lo, *hi])) =>
        {
            VIRTIO_NET_OK
        }
        _ => VIRTIO_NET_ERR,
    };
    match mem.write_obj(status, GuestAddress(ack.addr().0)) {
        Ok(()) => 1,
        Err(_) => 0,
    }
}

impl QueueHandler for NetControl {
    fn activate(&mut self, activation: Activation) {
        self.active = Some(activation);
    }

    fn reset(&mut self) {
        self.active = None;
    }

    fn queue_notified(&mut self, _index: usize) {
        let pairs = self.pairs;
        serve_first_queue(&mut self.active, &self.counters, |mem, d| {
            Some(control_command(mem, d, pairs))
        });
    }
}

/// The counters of a NIC with `queues` queues.
pub fn new_counters(queues: usize) -> Arc<DeviceCounters> {
    Arc::new(DeviceCounters::with_queues(CounterKind::Net, queues))
}

/// The TAP offloads matching what the guest driver accepted.
pub fn tap_offloads(acked: u64) -> u32 {
    let mut flags = 0;
    if acked & VIRTIO_NET_F_GUEST_CSUM != 0 {
        flags |= TUN_F_CSUM;
        if acked & VIRTIO_NET_F_GUEST_TSO4 != 0 {
            flags |= TUN_F_TSO4;
        }
        if acked & VIRTIO_NET_F_GUEST_TSO6 != 0 {
            flags |= TUN_F_TSO6;
        }
        if acked & VIRTIO_NET_F_GUEST_ECN != 0 {
            flags |= TUN_F_TSO_ECN;
        }
    }
    flags
}

/// Guest buffers of a chain for one direction, as iovecs; None if any descriptor has the
/// wrong direction, lies outside guest memory, or the chain exceeds `max_len`.
pub fn chain_iovecs(
    mem: &GuestMemoryMmap,
    descriptors: &[Descriptor],
    writable: bool,
    max_len: u64,
) -> Option<Vec<libc::iovec>> {
    let mut total = 0u64;
    let mut iovs = Vec::with_capacity(descriptors.len());
    for d in descriptors {
        if d.is_write_only() != writable {
            return None;
        }
        total += u64::from(d.len());
        if total > max_len {
            return None;
        }
        if d.len() == 0 {
            continue;
        }
        let slice = mem
            .get_slice(GuestAddress(d.addr().0), d.len() as usize)
            .ok()?;
        iovs.push(libc::iovec {
            iov_base: slice.ptr_guard_mut().as_ptr().cast(),
            iov_len: d.len() as usize,
        });
    }
    // A frame is at least its vnet header.
    (total >= VNET_HDR_LEN as u64).then_some(iovs)
}

impl NetDevice {
    /// One queue pair on `backend`, counting into `counters` (see [`new_counters`]).
    pub fn with_backend(backend: Box<dyn NetBackend>, counters: Arc<DeviceCounters>) -> Self {
        NetDevice {
            tap: backend,
            counters,
            active: None,
            rx_throttle: None,
            tx_throttle: None,
            announces: None,
        }
    }

    /// Limits receiving and transmitting, each by its own throttle.
    pub fn set_throttles(&mut self, rx: Throttle, tx: Throttle) {
        self.rx_throttle = Some(rx);
        self.tx_throttle = Some(tx);
    }

    pub fn counters(&self) -> Arc<DeviceCounters> {
        self.counters.clone()
    }

    /// Moves frames from the TAP into the guest's receive buffers until either runs out.
    fn process_rx(&mut self, active: &mut Activation) -> bool {
        let mem = active.mem.clone();
        let queue = &mut active.queues[RX_QUEUE];
        let mut used_any = false;
        loop {
            // Throttled: leave the frames in the TAP (the kernel queues or drops them, as
            // for a slow guest) until the timer fires.
            if let Some(t) = &mut self.rx_throttle {
                if t.admit_unsized() == Admit::Wait {
                    break;
                }
            }
            let chain = match pop_chain(queue, &mem) {
                Popped::Chain(chain) => chain,
                // No buffers: ask the guest to kick us when it adds some, and check once more
                // for buffers added in between.
                Popped::Empty => match queue.enable_notification(&mem) {
                    Ok(true) => continue,
                    Ok(false) => break,
                    Err(_) => return false,
                },
                Popped::Broken => return false,
            };
            let head = chain.head_index();
            let descriptors: Vec<Descriptor> = chain.collect();
            // A buffer the frame cannot go into is the guest's fault: it gets it back unused
            // (length 0) and the queue moves on; retrying it would stall receiving for good.
            let unusable = match chain_iovecs(&mem, &descriptors, true, u64::MAX) {
                Some(iovs) if iovs.len() <= MAX_IOVECS => match self.tap.readv(&iovs) {
                    Ok(n) => {
                        // Written behind vm-memory's back: for live migration's dirty set.
                        for d in &descriptors {
                            crate::vstate::memory::mark_written(
                                &mem,
                                GuestAddress(d.addr().0),
                                d.len() as usize,
                            );
                        }
                        if let Some(t) = &mut self.rx_throttle {
                            t.charge(n as u64);
                        }
                        DeviceCounters::add(&self.counters.rx_bytes, n as u64);
                        DeviceCounters::add(&self.counters.rx_packets, 1);
                        // A frame never exceeds the buffers it went into, which are in
                        // guest memory: it fits a u32, but never trust that blindly.
                        let used = u32::try_from(n).unwrap_or(u32::MAX);
                        if queue.add_used(&mem, head, used).is_err() {
                            return false;
                        }
                        self.counters.used(active.first_queue + RX_QUEUE, 1);
                        used_any = true;
                        continue;
                    }
                    Err(e) if e.raw_os_error() == Some(libc::EFAULT) => {
                        format!("receive buffer not writable: {e}")
                    }
                    Err(e) => {
                        // Nothing to read (EAGAIN) or a TAP error: give the buffer back.
                        queue.go_to_previous_position();
                        if e.kind() != std::io::ErrorKind::WouldBlock {
                            DeviceCounters::add(&self.counters.errors, 1);
                            crate::guest_log!(
                                tracing::Level::WARN,
                                self.counters.guest_log,
                                "TAP {} read failed: {e}",
                                self.tap.name()
                            );
                        }
                        break;
                    }
                },
                Some(iovs) => format!(
                    "receive chain of {} buffers, more than {MAX_IOVECS}",
                    iovs.len()
                ),
                None => "receive chain read-only, outside guest memory or too short".to_owned(),
            };
            DeviceCounters::add(&self.counters.errors, 1);
            crate::guest_log!(
                tracing::Level::DEBUG,
                self.counters.guest_log,
                "{}: {unusable}; buffer returned unused",
                self.tap.name()
            );
            if queue.add_used(&mem, head, 0).is_err() {
                return false;
            }
            self.counters.used(active.first_queue + RX_QUEUE, 1);
            used_any = true;
        }
        if used_any {
            match queue.needs_notification(&mem) {
                Ok(true) => active
                    .interrupt
                    .signal_used_queue(active.first_queue + RX_QUEUE),
                Ok(false) => {}
                Err(_) => return false,
            }
        }
        true
    }

    /// Sends every frame the guest queued for transmission.
    fn process_tx(&mut self, active: &mut Activation) -> bool {
        let mem = active.mem.clone();
        let (tap, counters) = (&self.tap, &self.counters);
        let throttle = &mut self.tx_throttle;
        serve_queue(
            active.first_queue + TX_QUEUE,
            &mut active.queues[TX_QUEUE],
            &mem,
            &active.interrupt,
            counters,
            |descriptors| {
                if let Some(t) = throttle.as_mut() {
                    let bytes: u64 = descriptors.iter().map(|d| u64::from(d.len())).sum();
                    if t.admit(bytes.min(MAX_TX_FRAME)) == Admit::Wait {
                        return None;
                    }
                }
                let failure = match chain_iovecs(&mem, descriptors, false, MAX_TX_FRAME) {
                    Some(iovs) if iovs.len() <= MAX_IOVECS => match tap.writev(&iovs) {
                        Ok(n) => {
                            DeviceCounters::add(&counters.tx_bytes, n as u64);
                            DeviceCounters::add(&counters.tx_packets, 1);
                            return Some(0);
                        }
                        Err(e) => format!("TAP write failed: {e}"),
                    },
                    Some(iovs) => {
                        format!("frame of {} buffers, more than {MAX_IOVECS}", iovs.len())
                    }
                    None => format!(
                        "frame writable, outside guest memory, shorter than its header or over \
                         {MAX_TX_FRAME} bytes"
                    ),
                };
                // Dropped, as a NIC drops a frame it cannot send; the guest gets it back.
                DeviceCounters::add(&counters.errors, 1);
                crate::guest_log!(
                    tracing::Level::DEBUG,
                    counters.guest_log,
                    "{}: {failure}; frame dropped",
                    tap.name()
                );
                Some(0)
            },
        )
    }

    fn with_active(&mut self, f: impl FnOnce(&mut Self, &mut Activation) -> bool) {
        let mut active = self.active.take();
        with_active(self, &mut active, f);
        self.active = active;
    }
}

impl QueueHandler for NetDevice {
    fn announce(&mut self) {
        let Some(mac) = self.announces else {
            return;
        };
        // The vnet header (no offloads), then the frame.
        let mut bytes = vec![0u8; VNET_HDR_LEN];
        bytes.extend_from_slice(&announcement(mac));
        let iov = [libc::iovec {
            iov_base: bytes.as_mut_ptr().cast(),
            iov_len: bytes.len(),
        }];
        if let Err(e) = self.tap.writev(&iov) {
            tracing::warn!(
                "{}: cannot announce the guest's MAC address: {e}",
                self.tap.name()
            );
        }
    }

    fn activate(&mut self, activation: Activation) {
        if activation.queues.len() != 2 {
            activation.interrupt.signal_needs_reset();
            return;
        }
        if let Err(e) = self
            .tap
            .set_offload(tap_offloads(activation.acked_features))
        {
            // The guest picks the offloads and can reset and activate the device in a loop.
            crate::guest_log!(
                tracing::Level::WARN,
                self.counters.guest_log,
                "{e}; continuing without offloads"
            );
            let _ = self.tap.set_offload(0);
        }
        self.active = Some(activation);
    }

    fn reset(&mut self) {
        self.active = None;
    }

    fn queue_notified(&mut self, index: usize) {
        let blocked = |t: &Option<Throttle>| t.as_ref().is_some_and(Throttle::is_blocked);
        match index {
            RX_QUEUE if !blocked(&self.rx_throttle) => self.with_active(Self::process_rx),
            TX_QUEUE if !blocked(&self.tx_throttle) => self.with_active(Self::process_tx),
            _ => {}
        }
    }

    fn timer_fds(&self) -> Vec<RawFd> {
        [&self.rx_throttle, &self.tx_throttle]
            .into_iter()
            .flatten()
            .map(Throttle::timer_fd)
            .collect()
    }

    /// Timer 0 is receiving's, 1 transmitting's; None (the limits changed): both.
    fn timer_fired(&mut self, index: Option<usize>) {
        for (i, queue) in [(0, RX_QUEUE), (1, TX_QUEUE)] {
            if index.is_some_and(|n| n != i) {
                continue;
            }
            let t = if queue == RX_QUEUE {
                &mut self.rx_throttle
            } else {
                &mut self.tx_throttle
            };
            if let Some(t) = t {
                t.unblock();
            }
            self.queue_notified(queue);
        }
    }

    fn backend_fd(&self) -> Option<RawFd> {
        Some(self.tap.as_raw_fd())
    }

    fn backend_ready(&mut self) {
        self.queue_notified(RX_QUEUE);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mac_parsing() {
        assert_eq!(
            parse_mac("52:54:00:ab:CD:ef"),
            Some([0x52, 0x54, 0, 0xab, 0xcd, 0xef])
        );
        for bad in [
            "",
            "52:54:00:ab:cd",
            "52:54:00:ab:cd:ef:01",
            "5:54:00:ab:cd:ef",
            "zz:54:00:ab:cd:ef",
        ] {
            assert_eq!(parse_mac(bad), None, "{bad}");
        }
        assert_eq!(format_mac(&[0x52, 0x54, 0, 1, 2, 3]), "52:54:00:01:02:03");
    }

    #[test]
    fn default_macs_are_stable_local_unicast_and_differ() {
        let a = default_mac("tap0");
        assert_eq!(a, default_mac("tap0"));
        assert_ne!(a, default_mac("tap1"));
        assert_eq!(a[0] & 0x01, 0, "unicast");
        assert_eq!(a[0] & 0x02, 0x02, "locally administered");
    }

    #[test]
    fn offloads_follow_the_guest() {
        assert_eq!(tap_offloads(0), 0);
        assert_eq!(
            tap_offloads(VIRTIO_NET_F_GUEST_TSO4),
            0,
            "TSO needs checksum offload"
        );
        assert_eq!(
            tap_offloads(
                VIRTIO_NET_F_GUEST_CSUM | VIRTIO_NET_F_GUEST_TSO4 | VIRTIO_NET_F_GUEST_TSO6
            ),
            TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6
        );
    }
}

#[cfg(test)]
mod chain_tests {
    use super::*;
    use crate::devices::virtio::testing::*;

    #[test]
    fn chain_iovecs_checks_direction_bounds_and_size() {
        let mem = memory();
        let ok = chain_iovecs(
            &mem,
            &[desc(DATA, 12, false), desc(DATA + 12, 100, false)],
            false,
            MAX_TX_FRAME,
        );
        assert_eq!(ok.map(|v| v.len()), Some(2));
        assert!(
            chain_iovecs(&mem, &[desc(DATA, 112, true)], false, MAX_TX_FRAME).is_none(),
            "direction"
        );
        assert!(
            chain_iovecs(&mem, &[desc(DATA, 8, false)], false, MAX_TX_FRAME).is_none(),
            "shorter than the vnet header"
        );
        assert!(
            chain_iovecs(&mem, &[desc(DATA, 70_000, false)], false, MAX_TX_FRAME).is_none(),
            "too large"
        );
        assert!(
            chain_iovecs(&mem, &[desc(MEM_SIZE as u64 - 8, 64, true)], true, u64::MAX).is_none(),
            "outside memory"
        );
        assert!(
            chain_iovecs(&mem, &[desc(u64::MAX - 4, 64, true)], true, u64::MAX).is_none(),
            "wraps"
        );
    }
}

/// The device on a datagram socket instead of a TAP (no root needed): hostile chains.
#[cfg(test)]
mod ring_tests {
    use std::sync::atomic::AtomicU64;
    use std::sync::atomic::Ordering::Relaxed;

    use vm_memory::Bytes;

    use super::*;
    use crate::devices::virtio::testing::*;
    use crate::rate_limiter::LimitConfig;

    const VRING_DESC_F_INDIRECT: u16 = 4;

    struct Nic {
        dev: NetDevice,
        rx: TestRing,
        tx: TestRing,
        host: std::os::unix::net::UnixDatagram,
        counters: Arc<DeviceCounters>,
    }

    #[test]
    fn a_restored_nic_announces_its_mac_once_from_its_first_pair() {
        let mut n = nic();
        n.dev.announce();
        n.host.set_nonblocking(true).expect("nonblocking");
        let mut buf = [0u8; 128];
        assert!(
            n.host.recv(&mut buf).is_err(),
            "no MAC to announce: nothing sent"
        );
        let mac = [0x52, 0x54, 0, 1, 2, 3];
        n.dev.announces = Some(mac);
        n.dev.announce();
        let len = n.host.recv(&mut buf).expect("the announcement");
        assert_eq!(len, VNET_HDR_LEN + 60);
        let frame = &buf[VNET_HDR_LEN..len];
        assert_eq!(frame[..6], [0xff; 6], "broadcast");
        assert_eq!(frame[6..12], mac, "from the guest's MAC");
        assert_eq!(frame[12..14], [0x80, 0x35], "RARP");
        assert_eq!(frame[20..22], [0, 3], "reverse request");
        assert_eq!(frame[22..28], mac);
    }

    fn nic() -> Nic {
        let mem = memory();
        let rx = TestRing::new(&mem, 256);
        let tx = TestRing::at(&mem, 256, 0x8000);
        let (backend, host) = DatagramBackend::pair();
        let counters = new_counters(2);
        let mut dev = NetDevice::with_backend(Box::new(backend), counters.clone());
        let (activation, _irq) = rx.activation(vec![rx.queue(), tx.queue()], VIRTIO_F_VERSION_1);
        dev.activate(activation);
        Nic {
            dev,
            rx,
            tx,
            host,
            counters,
        }
    }

    /// A NIC whose receive and transmit limits run on a fake clock (milliseconds in `now`).
    fn limited_nic(rx: LimitConfig, tx: LimitConfig) -> (Nic, Arc<AtomicU64>) {
        let mut n = nic();
        let (now, clock) = fake_clock();
        n.dev.set_throttles(
            Throttle::new(SharedLimit::with_clock(rx, clock.clone())).expect("timerfd"),
            Throttle::new(SharedLimit::with_clock(tx, clock)).expect("timerfd"),
        );
        (n, now)
    }

    /// A frame as the guest sends it: vnet header, then `len - 12` bytes of `fill`.
    fn frame(len: usize, fill: u8) -> Vec<u8> {
        let mut f = vec![0u8; VNET_HDR_LEN];
        f.resize(len, fill);
        f
    }

    #[test]
    fn a_throttled_transmit_leaves_frames_on_the_queue_and_sends_all_in_order_later() {
        // 1000 bytes/s with a 200-byte burst: two 100-byte frames go at once, then one per
        // 100 ms. Receiving is not limited.
        let (mut n, now) = limited_nic(
            LimitConfig::default(),
            LimitConfig {
                bandwidth: Some(1000),
                bandwidth_burst: Some(200),
                ..Default::default()
            },
        );
        let mem = n.tx.mem.clone();
        for i in 0..5u16 {
            let at = DATA + u64::from(i) * 0x100;
            mem.write_slice(&frame(100, i as u8 + 1), GuestAddress(at))
                .expect("frame");
            n.tx.add_chain(i, &[(at, 100, false)]);
        }
        n.dev.queue_notified(TX_QUEUE);
        assert_eq!(n.tx.used_idx(), 2, "the burst's two frames sent");
        now.store(50, Relaxed);
        n.dev.queue_notified(TX_QUEUE);
        assert_eq!(n.tx.used_idx(), 2, "a kick while throttled sends nothing");
        n.dev.timer_fired(Some(1));
        assert_eq!(n.tx.used_idx(), 2, "50 ms bring 50 bytes, not a frame");
        now.store(100, Relaxed);
        n.dev.timer_fired(Some(1));
        assert_eq!(n.tx.used_idx(), 3, "100 ms later, one more");
        now.store(300, Relaxed);
        n.dev.timer_fired(Some(1));
        assert_eq!(n.tx.used_idx(), 5, "the rest once their tokens are back");
        for i in 0..5u16 {
            assert_eq!(n.tx.used(i), (u32::from(i), 0), "in order");
        }
        n.host.set_nonblocking(true).expect("non-blocking");
        let mut got = [0u8; 256];
        for i in 0..5u8 {
            let len = n.host.recv(&mut got).expect("every frame arrived");
            assert_eq!(&got[..len], &frame(100, i + 1)[..], "frame {i}, in order");
        }
        assert!(n.host.recv(&mut got).is_err(), "nothing else");
        assert_eq!(n.counters.tx_packets.load(Relaxed), 5);
        assert_eq!(n.counters.tx_bytes.load(Relaxed), 500);
        assert_eq!(n.counters.errors.load(Relaxed), 0, "nothing dropped");
    }

    #[test]
    fn a_throttled_receive_delays_frames_into_the_guests_buffers_without_losing_any() {
        // 1000 bytes/s, 100-byte burst; a frame is charged once read (its size is known
        // then), so each 150-byte frame leaves a debt the next one waits for.
        let (mut n, now) = limited_nic(
            LimitConfig {
                bandwidth: Some(1000),
                bandwidth_burst: Some(100),
                ..Default::default()
            },
            LimitConfig::default(),
        );
        let mem = n.rx.mem.clone();
        for i in 0..3u16 {
            n.rx.add_chain(i, &[(DATA + u64::from(i) * 0x1000, 2048, true)]);
        }
        for i in 0..3u8 {
            n.host.send(&frame(150, 0xa0 + i)).expect("send");
        }
        n.dev.backend_ready();
        assert_eq!(n.rx.used_idx(), 1, "one frame, then the bucket is in debt");
        // Budget 100 - 150 = -50: the next frame needs 51 bytes' worth, 51 ms.
        now.store(50, Relaxed);
        n.dev.timer_fired(Some(0));
        n.dev.backend_ready();
        assert_eq!(n.rx.used_idx(), 1, "not before its tokens are back");
        now.store(51, Relaxed);
        n.dev.timer_fired(Some(0));
        assert_eq!(n.rx.used_idx(), 2);
        // 1 - 150 = -149: 150 ms more.
        now.store(200, Relaxed);
        n.dev.timer_fired(Some(0));
        assert_eq!(n.rx.used_idx(), 2);
        now.store(201, Relaxed);
        n.dev.timer_fired(Some(0));
        assert_eq!(n.rx.used_idx(), 3, "every frame delivered");
        for i in 0..3u16 {
            assert_eq!(n.rx.used(i), (u32::from(i), 150));
            let mut got = vec![0u8; 150];
            mem.read_slice(&mut got, GuestAddress(DATA + u64::from(i) * 0x1000))
                .expect("read");
            assert_eq!(got, frame(150, 0xa0 + i as u8), "frame {i} in buffer {i}");
        }
        assert_eq!(n.counters.rx_packets.load(Relaxed), 3);
        assert_eq!(n.counters.rx_bytes.load(Relaxed), 450);
        assert_eq!(n.counters.errors.load(Relaxed), 0);
        // Transmitting was never held back meanwhile.
        n.tx.add_chain(0, &[(DATA + 0x8000, 60, false)]);
        n.dev.queue_notified(TX_QUEUE);
        assert_eq!(n.tx.used_idx(), 1);
    }

    #[test]
    fn a_receive_chain_too_long_for_readv_is_returned_and_receiving_goes_on() {
        let mut n = nic();
        let mem = n.rx.mem.clone();
        // Head 0: an indirect table of 1100 writable 16-byte buffers (more than UIO_MAXIOV).
        let table = DATA + 0x10000;
        let count = 1100u64;
        for i in 0..count {
            let at = GuestAddress(table + i * 16);
            let next = if i + 1 < count { i as u16 + 1 } else { 0 };
            let flags = VRING_DESC_F_WRITE | if i + 1 < count { VRING_DESC_F_NEXT } else { 0 };
            mem.write_obj(DATA + 0x20000 + i * 16, at).expect("addr");
            mem.write_obj(16u32, GuestAddress(at.0 + 8)).expect("len");
            mem.write_obj(flags, GuestAddress(at.0 + 12))
                .expect("flags");
            mem.write_obj(next, GuestAddress(at.0 + 14)).expect("next");
        }
        n.rx.set_desc(0, table, (count * 16) as u32, VRING_DESC_F_INDIRECT, 0);
        n.rx.publish(0);
        // Head 1: an ordinary buffer.
        n.rx.add_chain(1, &[(DATA, 2048, true)]);
        let frame = vec![0x5au8; 100];
        n.host.send(&frame).expect("send");
        n.dev.backend_ready();
        assert_eq!(n.rx.used_idx(), 2, "both buffers used, nothing stalled");
        assert_eq!(n.rx.used(0), (0, 0), "the long chain came back empty");
        assert_eq!(n.rx.used(1), (1, 100), "the frame went to the next buffer");
        let mut got = vec![0u8; 100];
        mem.read_slice(&mut got, GuestAddress(DATA)).expect("read");
        assert_eq!(got, frame);
        assert_eq!(n.counters.errors.load(Relaxed), 1);
        assert_eq!(n.counters.rx_packets.load(Relaxed), 1);
        assert_eq!(n.counters.rx_bytes.load(Relaxed), 100);
    }

    #[test]
    fn receive_buffers_the_guest_broke_are_returned_without_a_frame() {
        let mut n = nic();
        n.rx.add_chain(0, &[(DATA, 2048, false)]); // read-only
        n.rx.add_chain(1, &[(MEM_SIZE as u64 + 4096, 2048, true)]); // outside memory
        n.rx.add_chain(2, &[(DATA, 4, true)]); // shorter than the vnet header
        n.dev.backend_ready();
        assert_eq!(n.rx.used_idx(), 3);
        for i in 0..3 {
            assert_eq!(n.rx.used(i), (u32::from(i), 0));
        }
        assert_eq!(n.counters.errors.load(Relaxed), 3);
        // Nothing was read from the host: a good buffer still gets the frame.
        n.host.send(&[1u8; 60]).expect("send");
        n.rx.add_chain(3, &[(DATA, 2048, true)]);
        n.dev.queue_notified(RX_QUEUE);
        assert_eq!(n.rx.used(3), (3, 60));
    }

    #[test]
    fn transmit_caps_the_frame_size_and_counts_frames_and_bytes() {
        let mut n = nic();
        let mem = n.tx.mem.clone();
        mem.write_slice(&[7u8; 74], GuestAddress(DATA))
            .expect("frame");
        n.tx.add_chain(0, &[(DATA, 12, false), (DATA + 12, 62, false)]);
        // One byte over the cap, in two buffers.
        let over = MAX_TX_FRAME as u32 + 1;
        n.tx.add_chain(
            2,
            &[(DATA, over / 2, false), (DATA, over - over / 2, false)],
        );
        n.dev.queue_notified(TX_QUEUE);
        assert_eq!(n.tx.used_idx(), 2, "both chains given back");
        assert_eq!(n.tx.used(0), (0, 0));
        assert_eq!(n.tx.used(1), (2, 0));
        let mut got = [0u8; 128];
        assert_eq!(n.host.recv(&mut got).expect("frame"), 74);
        n.host.set_nonblocking(true).expect("non-blocking");
        assert!(
            n.host.recv(&mut got).is_err(),
            "the oversized frame was dropped"
        );
        assert_eq!(n.counters.tx_packets.load(Relaxed), 1);
        assert_eq!(n.counters.tx_bytes.load(Relaxed), 74);
        assert_eq!(n.counters.errors.load(Relaxed), 1);
        assert_eq!(n.counters.rx_packets.load(Relaxed), 0);
    }
}

/// The device against a real TAP in a fresh network namespace: a frame the "guest" transmits
/// reaches the host kernel, and the kernel's answer arrives in the guest's receive buffers.
#[cfg(test)]
mod tap_tests {
    use std::process::Command;

    use vm_memory::Bytes;

    use super::*;
    use crate::devices::virtio::testing::*;

    const GUEST_MAC: MacAddr = [0x52, 0x54, 0x00, 0x12, 0x34, 0x56];

    fn ip(args: &[&str]) {
        let status = Command::new("ip").args(args).status().expect("ip runs");
        assert!(status.success(), "ip {args:?}");
    }

    fn arp_request() -> Vec<u8> {
        let mut f = vec![0u8; VNET_HDR_LEN]; // no offloads
        f.extend_from_slice(&[0xff; 6]);
        f.extend_from_slice(&GUEST_MAC);
        f.extend_from_slice(&[0x08, 0x06, 0, 1, 0x08, 0x00, 6, 4, 0, 1]);
        f.extend_from_slice(&GUEST_MAC);
        f.extend_from_slice(&[10, 9, 9, 2]);
        f.extend_from_slice(&[0; 6]);
        f.extend_from_slice(&[10, 9, 9, 1]);
        f
    }

    fn wait_readable(fd: RawFd) {
        let mut pfd = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        let n = unsafe { libc::poll(&mut pfd, 1, 10_000) };
        assert_eq!(n, 1, "the TAP became readable within 10 s");
    }

    #[test]
    fn arp_round_trip_through_a_real_tap() {
        in_private_netns(|| {
            let nic = open("thvctest0", GUEST_MAC, Pairs::UpTo(1), None).expect("TAP");
            assert_eq!(nic.info.config_space, GUEST_MAC, "one pair: the MAC only");
            assert_eq!(
                nic.info.features & (VIRTIO_NET_F_MQ | VIRTIO_NET_F_CTRL_VQ),
                0
            );
            let counters = nic.counters.clone();
            let mut dev = nic.groups.into_iter().next().expect("one group").handler;
            ip(&["link", "set", "thvctest0", "up"]);
            ip(&["addr", "add", "10.9.9.1/24", "dev", "thvctest0"]);

            let mem = memory();
            let mut rx = TestRing::new(&mem, 256);
            let mut tx = TestRing::at(&mem, 256, 0x8000);
            let (activation, irq) = rx.activation(vec![rx.queue(), tx.queue()], VIRTIO_F_VERSION_1);
            dev.activate(activation);
            // Two receive buffers (vnet header + frame), then the ARP request to send.
            rx.add_chain(0, &[(DATA, 2048, true)]);
            rx.add_chain(1, &[(DATA + 0x1000, 2048, true)]);
            let frame = arp_request();
            mem.write_slice(&frame, GuestAddress(DATA + 0x2000))
                .expect("frame");
            tx.add_chain(
                0,
                &[
                    (DATA + 0x2000, 12, false),
                    (DATA + 0x200c, frame.len() as u32 - 12, false),
                ],
            );
            dev.queue_notified(TX_QUEUE);
            assert_eq!(tx.used_idx(), 1, "frame sent");

            // The kernel answers; keep receiving until the ARP reply shows up (the kernel may
            // also send IPv6 neighbour discovery of its own first).
            let mut found = false;
            for n in 0..2u16 {
                if rx.used_idx() <= n {
                    wait_readable(dev.backend_fd().expect("the TAP"));
                    dev.backend_ready();
                }
                assert!(rx.used_idx() > n, "a frame was received");
                let (id, len) = rx.used(n);
                let base = DATA + u64::from(id) * 0x1000;
                let mut buf = vec![0u8; len as usize];
                mem.read_slice(&mut buf, GuestAddress(base)).expect("read");
                let eth = &buf[VNET_HDR_LEN..];
                if eth[12..14] == [0x08, 0x06] && eth[20..22] == [0, 2] {
                    assert_eq!(&eth[0..6], &GUEST_MAC, "reply to our MAC");
                    assert_eq!(&eth[28..32], &[10, 9, 9, 1], "from the host's address");
                    found = true;
                    break;
                }
            }
            assert!(found, "ARP reply received");
            assert!(irq.read().is_ok(), "guest interrupted");
            assert!(
                counters.tx_bytes.load(std::sync::atomic::Ordering::Relaxed) >= frame.len() as u64
            );
        });
    }

    #[test]
    fn several_pairs_on_a_multi_queue_tap_and_one_on_a_plain_one() {
        in_private_netns(|| {
            let nic = open("thvcmq0", GUEST_MAC, Pairs::Exactly(3), None).expect("TAP");
            let mq = VIRTIO_NET_F_MQ | VIRTIO_NET_F_CTRL_VQ;
            assert_eq!(nic.info.features & mq, mq);
            assert_eq!(
                nic.info.queue_max_sizes.len(),
                7,
                "3 pairs and the control queue"
            );
            assert_eq!(
                &nic.info.config_space[8..10],
                &[3, 0],
                "max_virtqueue_pairs"
            );
            let ranges: Vec<_> = nic.groups.iter().map(|g| g.queues.clone()).collect();
            assert_eq!(ranges, [0..2, 2..4, 4..6, 6..7]);
            assert_eq!(nic.counters.queue_used.len(), 7);
            // A TAP created single-queue: the default falls back to one pair, asking for
            // more is an error.
            ip(&["tuntap", "add", "dev", "thvcsq0", "mode", "tap", "vnet_hdr"]);
            let nic = open("thvcsq0", GUEST_MAC, Pairs::UpTo(4), None).expect("TAP");
            assert_eq!(nic.groups.len(), 1);
            assert!(open("thvcsq0", GUEST_MAC, Pairs::Exactly(2), None).is_err());
            // One pair on a TAP created multi_queue (the kernel refuses a plain attach to it).
            ip(&[
                "tuntap",
                "add",
                "dev",
                "thvcmq1",
                "mode",
                "tap",
                "vnet_hdr",
                "multi_queue",
            ]);
            let nic = open("thvcmq1", GUEST_MAC, Pairs::Exactly(1), None).expect("one queue");
            assert_eq!(nic.groups.len(), 1);
            assert_eq!(nic.info.features & mq, 0, "one pair: no MQ");
        });
    }

    #[test]
    fn the_control_queue_accepts_a_valid_pair_count_only() {
        let mem = memory();
        let command = |class: u8, cmd: u8, pairs: u16| {
            let mut bytes = vec![class, cmd];
            bytes.extend_from_slice(&pairs.to_le_bytes());
            mem.write_slice(&bytes, GuestAddress(DATA))
                .expect("command");
            mem.write_obj(0xffu8, GuestAddress(DATA + 0x100))
                .expect("ack");
            let used = control_command(
                &mem,
                &[
                    desc(DATA, 2, false),
                    desc(DATA + 2, 2, false),
                    desc(DATA + 0x100, 1, true),
                ],
                4,
            );
            let ack: u8 = mem.read_obj(GuestAddress(DATA + 0x100)).expect("ack");
            (used, ack)
        };
        assert_eq!(
            command(VIRTIO_NET_CTRL_MQ, VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET, 2),
            (1, VIRTIO_NET_OK)
        );
        assert_eq!(
            command(VIRTIO_NET_CTRL_MQ, VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET, 5),
            (1, VIRTIO_NET_ERR)
        );
        assert_eq!(
            command(VIRTIO_NET_CTRL_MQ, VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET, 0),
            (1, VIRTIO_NET_ERR)
        );
        assert_eq!(
            command(0, 0, 1),
            (1, VIRTIO_NET_ERR),
            "rx mode is not offered"
        );
        // No writable ack descriptor: nothing written, nothing used.
        assert_eq!(control_command(&mem, &[desc(DATA, 4, false)], 4), 0);
        assert_eq!(control_command(&mem, &[], 4), 0);
    }
}
