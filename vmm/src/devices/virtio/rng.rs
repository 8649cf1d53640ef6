//! virtio-rng: guest buffers filled from the host's getrandom(2), so guests never stall
//! waiting for entropy at boot.

use std::sync::Arc;

use crate::vstate::memory::GuestMemoryMmap;
use virtio_queue::desc::split::Descriptor;
use vm_memory::{Address, Bytes};

use super::throttle::{Admit, Throttle};
use super::{
    serve_first_queue, Activation, CounterKind, DeviceCounters, DeviceInfo, QueueHandler, TYPE_RNG,
    VIRTIO_F_VERSION_1,
};

const QUEUE_SIZE: u16 = 64;
/// The most entropy handed out per request: plenty for any driver, bounded for a hostile one.
const MAX_REQUEST_BYTES: usize = 64 * 1024;

pub struct RngDevice {
    counters: Arc<DeviceCounters>,
    active: Option<Activation>,
    throttle: Option<Throttle>,
}

pub fn new() -> (DeviceInfo, RngDevice) {
    (
        DeviceInfo {
            device_type: TYPE_RNG,
            queue_max_sizes: vec![QUEUE_SIZE],
            features: VIRTIO_F_VERSION_1,
            config_space: Vec::new(),
        },
        RngDevice {
            counters: Arc::new(DeviceCounters::with_queues(CounterKind::Entropy, 1)),
            active: None,
            throttle: None,
        },
    )
}

/// Fills the chain's device-writable buffers with random bytes; returns how many it wrote.
pub fn fill_chain(mem: &GuestMemoryMmap, descriptors: &[Descriptor]) -> u32 {
    let mut written = 0usize;
    let mut buf = vec![0u8; 4096];
    for d in descriptors.iter().filter(|d| d.is_write_only()) {
        let want = (d.len() as usize).min(MAX_REQUEST_BYTES - written);
        let mut done = 0;
        while done < want {
            let chunk = (want - done).min(buf.len());
            // SAFETY: getrandom writes at most `chunk` bytes into our buffer.
            let n = unsafe { libc::getrandom(buf.as_mut_ptr().cast(), chunk, 0) };
            if n <= 0 {
                return written as u32;
            }
            let n = n as usize;
            let Some(at) = d.addr().checked_add(done as u64) else {
                return written as u32;
            };
            if mem.write_slice(&buf[..n], at).is_err() {
                return written as u32;
            }
            done += n;
            written += n;
        }
        if written >= MAX_REQUEST_BYTES {
            break;
        }
    }
    written as u32
}

impl RngDevice {
    /// Limits the entropy handed out by `throttle` (bytes: what a request asks for).
    pub fn set_throttle(&mut self, throttle: Throttle) {
        self.throttle = Some(throttle);
    }

    pub fn counters(&self) -> Arc<DeviceCounters> {
        self.counters.clone()
    }
}

impl QueueHandler for RngDevice {
    fn activate(&mut self, activation: Activation) {
        self.active = Some(activation);
    }

    fn reset(&mut self) {
        self.active = None;
    }

    fn queue_notified(&mut self, _index: usize) {
        if self.throttle.as_ref().is_some_and(Throttle::is_blocked) {
            return;
        }
        let counters = &self.counters;
        let throttle = &mut self.throttle;
        serve_first_queue(&mut self.active, counters, |mem, descriptors| {
            if let Some(t) = throttle.as_mut() {
                let asked: u64 = descriptors
                    .iter()
                    .filter(|d| d.is_write_only())
                    .map(|d| u64::from(d.len()))
                    .sum();
                if t.admit(asked.min(MAX_REQUEST_BYTES as u64)) == Admit::Wait {
                    return None;
                }
            }
            let n = fill_chain(mem, descriptors);
            DeviceCounters::add(&counters.requests, 1);
            DeviceCounters::add(&counters.bytes_read, u64::from(n));
            Some(n)
        });
    }

    fn timer_fds(&self) -> Vec<std::os::fd::RawFd> {
        self.throttle.iter().map(Throttle::timer_fd).collect()
    }

    fn timer_fired(&mut self, _index: Option<usize>) {
        if let Some(t) = &mut self.throttle {
            t.unblock();
        }
        self.queue_notified(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::testing::*;

    #[test]
    fn fills_writable_buffers_only_and_caps_the_amount() {
        let mem = memory();
        let n = fill_chain(
            &mem,
            &[
                desc(DATA, 64, true),
                desc(DATA + 64, 64, false),
                desc(DATA + 128, 32, true),
            ],
        );
        assert_eq!(n, 96);
        let mut buf = [0u8; 64];
        mem.read_slice(&mut buf, vm_memory::GuestAddress(DATA))
            .expect("read");
        assert_ne!(buf, [0u8; 64], "random bytes written");
        let huge = fill_chain(&mem, &[desc(DATA, 1 << 20, true)]);
        assert_eq!(huge as usize, MAX_REQUEST_BYTES);
        let outside = fill_chain(
            &mem,
            &[
                desc(MEM_SIZE as u64 - 16, 4096, true),
                desc(u64::MAX - 8, 64, true),
            ],
        );
        assert_eq!(outside, 0, "nothing written outside guest memory");
    }

    #[test]
    fn a_throttled_request_waits_on_the_queue_and_none_is_dropped() {
        use crate::devices::virtio::throttle::SharedLimit;
        use crate::rate_limiter::LimitConfig;
        use std::sync::atomic::Ordering::SeqCst;

        let mem = memory();
        let mut ring = TestRing::new(&mem, 64);
        let (_, mut dev) = new();
        // 64 bytes/s with a 64-byte burst: one 64-byte request at once, then one a second.
        let (now, clock) = fake_clock();
        let limit = SharedLimit::with_clock(
            LimitConfig {
                bandwidth: Some(64),
                bandwidth_burst: Some(64),
                ..Default::default()
            },
            clock,
        );
        dev.set_throttle(Throttle::new(limit.clone()).expect("timerfd"));
        let (activation, irq) = ring.activation(vec![ring.queue()], VIRTIO_F_VERSION_1);
        dev.activate(activation);
        for i in 0..3u16 {
            ring.add_chain(i, &[(DATA + u64::from(i) * 64, 64, true)]);
        }
        dev.queue_notified(0);
        assert_eq!(ring.used_idx(), 1, "the burst: one request");
        assert_eq!(irq.read().expect("irq"), 1);
        now.store(500, SeqCst);
        dev.queue_notified(0);
        assert_eq!(ring.used_idx(), 1, "a kick while throttled changes nothing");
        dev.timer_fired(Some(0));
        assert_eq!(
            ring.used_idx(),
            1,
            "half a second: half the bytes, not the request"
        );
        now.store(1000, SeqCst);
        dev.timer_fired(Some(0));
        assert_eq!(ring.used_idx(), 2);
        now.store(2000, SeqCst);
        dev.timer_fired(Some(0));
        assert_eq!(ring.used_idx(), 3, "all served");
        for i in 0..3u16 {
            assert_eq!(ring.used(i), (u32::from(i), 64), "in order, in full");
            let mut buf = [0u8; 64];
            mem.read_slice(&mut buf, vm_memory::GuestAddress(DATA + u64::from(i) * 64))
                .expect("read");
            assert_ne!(buf, [0u8; 64], "request {i} got random bytes");
        }
        let counters = dev.counters();
        assert_eq!(counters.requests.load(SeqCst), 3);
        assert_eq!(counters.bytes_read.load(SeqCst), 192);
        // Limit removed at run time: the next requests go at once.
        limit.update(LimitConfig::default());
        for i in 3..8u16 {
            ring.add_chain(i, &[(DATA + u64::from(i) * 64, 64, true)]);
        }
        dev.queue_notified(0);
        assert_eq!(ring.used_idx(), 8);
    }

    #[test]
    fn serves_a_ring() {
        let mem = memory();
        let mut ring = TestRing::new(&mem, 64);
        let (_, mut dev) = new();
        let (activation, irq) = ring.activation(vec![ring.queue()], VIRTIO_F_VERSION_1);
        dev.activate(activation);
        ring.add_chain(0, &[(DATA, 32, true)]);
        ring.add_chain(1, &[(DATA + 64, 16, true)]);
        dev.queue_notified(0);
        assert_eq!(ring.used_idx(), 2);
        assert_eq!(ring.used(0), (0, 32));
        assert_eq!(ring.used(1), (1, 16));
        assert_eq!(irq.read().expect("irq"), 1);
    }
}
