//! Test helpers: a split virtqueue laid out in guest memory by hand, the way a (possibly
//! hostile) driver would, so device code can be driven without a guest.

use crate::vstate::memory::GuestMemoryMmap;
use std::os::fd::AsRawFd;
use virtio_queue::desc::split::Descriptor;
use virtio_queue::Queue;
use virtio_queue::QueueT;
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

use super::mmio::MmioInterrupt;
use super::registers::RegisterPage;
use super::{Activation, Interrupt};

pub const VRING_DESC_F_NEXT: u16 = 1;
pub const VRING_DESC_F_WRITE: u16 = 2;

pub const MEM_SIZE: usize = 4 << 20;
pub const DESC_TABLE: u64 = 0x1000;
pub const AVAIL_RING: u64 = 0x3000;
pub const USED_RING: u64 = 0x4000;
/// Where tests put request headers, data and status bytes.
pub const DATA: u64 = 0x10_0000;

pub fn memory() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).expect("test memory")
}

/// A driver's view of one queue of `size` entries at fixed addresses.
pub struct TestRing {
    pub mem: GuestMemoryMmap,
    pub size: u16,
    avail_idx: u16,
    desc_table: u64,
    avail_ring: u64,
    used_ring: u64,
}

impl TestRing {
    pub fn new(mem: &GuestMemoryMmap, size: u16) -> Self {
        Self::at(mem, size, 0)
    }

    /// A ring whose tables are moved up by `offset` (for devices with several queues).
    pub fn at(mem: &GuestMemoryMmap, size: u16, offset: u64) -> Self {
        TestRing {
            mem: mem.clone(),
            size,
            avail_idx: 0,
            desc_table: DESC_TABLE + offset,
            avail_ring: AVAIL_RING + offset,
            used_ring: USED_RING + offset,
        }
    }

    /// The device's queue for this ring.
    pub fn queue(&self) -> Queue {
        let mut q = Queue::new(self.size).expect("power of two");
        q.try_set_desc_table_address(GuestAddress(self.desc_table))
            .expect("aligned");
        q.try_set_avail_ring_address(GuestAddress(self.avail_ring))
            .expect("aligned");
        q.try_set_used_ring_address(GuestAddress(self.used_ring))
            .expect("aligned");
        q.set_ready(true);
        q
    }

    pub fn activation(&self, queues: Vec<Queue>, features: u64) -> (Activation, EventFd) {
        let irq = EventFd::new(0).expect("eventfd");
        let irq_clone = irq.try_clone().expect("clone");
        (
            Activation {
                mem: self.mem.clone(),
                queues,
                first_queue: 0,
                acked_features: features,
                interrupt: Interrupt::new(MmioInterrupt::new(
                    std::sync::Arc::new(RegisterPage::new().expect("register page")),
                    std::sync::Arc::new(irq_clone),
                )),
            },
            irq,
        )
    }

    /// Writes a raw descriptor table entry.
    pub fn set_desc(&self, index: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let at = GuestAddress(self.desc_table + u64::from(index) * 16);
        self.mem.write_obj(addr, at).expect("desc addr");
        self.mem
            .write_obj(len, GuestAddress(at.0 + 8))
            .expect("desc len");
        self.mem
            .write_obj(flags, GuestAddress(at.0 + 12))
            .expect("desc flags");
        self.mem
            .write_obj(next, GuestAddress(at.0 + 14))
            .expect("desc next");
    }

    /// Writes a chain of (addr, len, writable) buffers at descriptors `first..` and makes it
    /// available. Returns the head index.
    pub fn add_chain(&mut self, first: u16, buffers: &[(u64, u32, bool)]) -> u16 {
        for (i, (addr, len, writable)) in buffers.iter().enumerate() {
            let index = first + i as u16;
            let mut flags = if *writable { VRING_DESC_F_WRITE } else { 0 };
            if i + 1 < buffers.len() {
                flags |= VRING_DESC_F_NEXT;
            }
            self.set_desc(index, *addr, *len, flags, index + 1);
        }
        self.publish(first);
        first
    }

    /// Puts descriptor `head` in the available ring.
    pub fn publish(&mut self, head: u16) {
        let slot = u64::from(self.avail_idx % self.size);
        self.mem
            .write_obj(head, GuestAddress(self.avail_ring + 4 + slot * 2))
            .expect("avail ring");
        self.avail_idx = self.avail_idx.wrapping_add(1);
        self.mem
            .write_obj(self.avail_idx, GuestAddress(self.avail_ring + 2))
            .expect("avail idx");
    }

    pub fn used_idx(&self) -> u16 {
        self.mem
            .read_obj(GuestAddress(self.used_ring + 2))
            .expect("used idx")
    }

    /// The (id, len) of used ring entry `n`.
    pub fn used(&self, n: u16) -> (u32, u32) {
        let at = self.used_ring + 4 + u64::from(n % self.size) * 8;
        (
            self.mem.read_obj(GuestAddress(at)).expect("used id"),
            self.mem.read_obj(GuestAddress(at + 4)).expect("used len"),
        )
    }
}

pub fn desc(addr: u64, len: u32, writable: bool) -> Descriptor {
    Descriptor::new(addr, len, if writable { VRING_DESC_F_WRITE } else { 0 }, 0)
}

/// A clock for rate limits that moves only when the test says (milliseconds in the atomic).
pub fn fake_clock() -> (
    std::sync::Arc<std::sync::atomic::AtomicU64>,
    super::throttle::Clock,
) {
    let now = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let read = now.clone();
    let clock: super::throttle::Clock = std::sync::Arc::new(move || {
        std::time::Duration::from_millis(read.load(std::sync::atomic::Ordering::SeqCst))
    });
    (now, clock)
}

/// A small deterministic PRNG (xorshift64*) for property tests: reproducible without a crate.
pub struct Rng(pub u64);

impl Rng {
    pub fn next_u64(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }
}

/// Runs `test` on a thread of its own in a private network namespace (namespaces are per
/// thread, so the test's TAPs and `ip` commands see only that namespace, torn down with it).
/// Needs root, as CI runs: anything else fails loudly.
pub fn in_private_netns(test: impl FnOnce() + Send + 'static) {
    // SAFETY: geteuid has no preconditions.
    assert_eq!(
        unsafe { libc::geteuid() },
        0,
        "needs root for TAP devices and namespaces (CI runs as root)"
    );
    std::thread::spawn(move || {
        // SAFETY: unshare affects only the calling thread here.
        assert_eq!(
            unsafe { libc::unshare(libc::CLONE_NEWNET) },
            0,
            "unshare -n"
        );
        test();
    })
    .join()
    .expect("test thread");
}

/// A NIC backend without a TAP: one end of a datagram socket pair (frame boundaries kept, like
/// a TAP's); the test holds the other end as the "host network".
pub struct DatagramBackend(pub std::os::unix::net::UnixDatagram);

impl DatagramBackend {
    /// The backend (non-blocking, as a TAP is) and the host's end.
    pub fn pair() -> (Self, std::os::unix::net::UnixDatagram) {
        let (a, b) = std::os::unix::net::UnixDatagram::pair().expect("socketpair");
        a.set_nonblocking(true).expect("non-blocking");
        (DatagramBackend(a), b)
    }
}

impl std::os::fd::AsRawFd for DatagramBackend {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.0.as_raw_fd()
    }
}

impl super::net::NetBackend for DatagramBackend {
    fn name(&self) -> &str {
        "test"
    }
    fn set_offload(&self, _flags: u32) -> Result<(), super::tap::TapError> {
        Ok(())
    }
    fn readv(&self, iovs: &[libc::iovec]) -> std::io::Result<usize> {
        // SAFETY: the iovecs describe writable guest memory (checked by the device).
        let n = unsafe { libc::readv(self.as_raw_fd(), iovs.as_ptr(), iovs.len() as i32) };
        usize::try_from(n).map_err(|_| std::io::Error::last_os_error())
    }
    fn writev(&self, iovs: &[libc::iovec]) -> std::io::Result<usize> {
        // SAFETY: the iovecs describe readable guest memory (checked by the device).
        let n = unsafe { libc::writev(self.as_raw_fd(), iovs.as_ptr(), iovs.len() as i32) };
        usize::try_from(n).map_err(|_| std::io::Error::last_os_error())
    }
}
