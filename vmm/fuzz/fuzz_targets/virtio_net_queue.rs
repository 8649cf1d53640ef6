//! A hostile virtio-net driver: the fuzz input becomes the receive and transmit rings (descriptor
//! tables, available rings), the frames the "host network" sends and the guest's buffer
//! contents. The TAP is replaced by a datagram socket pair, which keeps frame boundaries the
//! way a TAP does. The device must never panic, hang, use more buffers than were published,
//! or send a frame larger than the TX cap.
#![no_main]

use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixDatagram;
use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use thvc_vmm::devices::virtio::mmio::MmioInterrupt;
use thvc_vmm::devices::virtio::net::{self, NetBackend, NetDevice, MAX_TX_FRAME};
use thvc_vmm::devices::virtio::registers::RegisterPage;
use thvc_vmm::devices::virtio::tap::TapError;
use thvc_vmm::devices::virtio::{Activation, Interrupt, QueueHandler};
use thvc_vmm::vstate::memory::GuestMemoryMmap;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

const MEM_SIZE: usize = 1 << 20;
const QUEUE_SIZE: u16 = 16;
/// Descriptor table, available ring and used ring of each queue.
const RINGS: [(u64, u64, u64); 2] = [(0x1000, 0x2000, 0x3000), (0x4000, 0x5000, 0x6000)];
const DATA: u64 = 0x8000;
const RX: usize = 0;
const TX: usize = 1;

/// The TAP substitute: one end of a datagram socket pair.
struct Datagram(UnixDatagram);

impl AsRawFd for Datagram {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}

impl NetBackend for Datagram {
    fn name(&self) -> &str {
        "fuzz"
    }
    fn set_offload(&self, _flags: u32) -> Result<(), TapError> {
        Ok(())
    }
    fn readv(&self, iovs: &[libc::iovec]) -> std::io::Result<usize> {
        // SAFETY: the device hands us iovecs it checked against guest memory.
        let n = unsafe { libc::readv(self.as_raw_fd(), iovs.as_ptr(), iovs.len() as i32) };
        usize::try_from(n).map_err(|_| std::io::Error::last_os_error())
    }
    fn writev(&self, iovs: &[libc::iovec]) -> std::io::Result<usize> {
        // SAFETY: as for readv; the kernel only reads them.
        let n = unsafe { libc::writev(self.as_raw_fd(), iovs.as_ptr(), iovs.len() as i32) };
        usize::try_from(n).map_err(|_| std::io::Error::last_os_error())
    }
}

/// Takes up to `n` bytes off the front of `input`.
fn take<'a>(input: &mut &'a [u8], n: usize) -> &'a [u8] {
    let (head, rest) = input.split_at(n.min(input.len()));
    *input = rest;
    head
}

fn queue(mem: &GuestMemoryMmap, index: usize, input: &mut &[u8], published: u16) -> Queue {
    let (desc, avail, used) = RINGS[index];
    let table = take(input, usize::from(QUEUE_SIZE) * 16);
    mem.write_slice(table, GuestAddress(desc)).expect("desc");
    let ring = take(input, 2 * usize::from(QUEUE_SIZE));
    mem.write_slice(ring, GuestAddress(avail + 4))
        .expect("ring");
    mem.write_obj(published, GuestAddress(avail + 2))
        .expect("idx");
    let mut q = Queue::new(QUEUE_SIZE).expect("queue");
    q.try_set_desc_table_address(GuestAddress(desc))
        .expect("aligned");
    q.try_set_avail_ring_address(GuestAddress(avail))
        .expect("aligned");
    q.try_set_used_ring_address(GuestAddress(used))
        .expect("aligned");
    q.set_ready(true);
    q
}

fuzz_target!(|input: &[u8]| {
    if input.len() < 4 {
        return;
    }
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).expect("memory");
    let published = [u16::from(input[0] % 24), u16::from(input[1] % 24)];
    let frames = usize::from(input[2] % 8);
    let frame_len = 1 + usize::from(input[3]) * 8;
    let mut rest = &input[4..];
    let queues = vec![
        queue(&mem, RX, &mut rest, published[RX]),
        queue(&mem, TX, &mut rest, published[TX]),
    ];
    // Frames from the host, then whatever the guest put in its buffers.
    let (backend, host) = UnixDatagram::pair().expect("socketpair");
    backend.set_nonblocking(true).expect("non-blocking");
    host.set_nonblocking(true).expect("non-blocking");
    for _ in 0..frames {
        let frame = take(&mut rest, frame_len);
        let _ = host.send(frame);
    }
    let data = take(&mut rest, MEM_SIZE - DATA as usize);
    mem.write_slice(data, GuestAddress(DATA)).expect("data");

    let counters = net::new_counters(2);
    let mut device = NetDevice::with_backend(Box::new(Datagram(backend)), counters);
    let irq = Arc::new(EventFd::new(0).expect("eventfd"));
    device.activate(Activation {
        mem: mem.clone(),
        queues,
        first_queue: 0,
        acked_features: 1 << 32 | 1 << 28,
        interrupt: Interrupt::new(MmioInterrupt::new(
            Arc::new(RegisterPage::new().expect("register page")),
            irq,
        )),
    });
    device.queue_notified(TX);
    device.backend_ready();
    device.queue_notified(RX);

    for (index, (_, _, used_ring)) in RINGS.iter().enumerate() {
        let used: u16 = mem.read_obj(GuestAddress(used_ring + 2)).expect("used idx");
        assert!(used <= published[index], "queue {index}: used {used}");
    }
    let mut buf = vec![0u8; 2 * MAX_TX_FRAME as usize];
    while let Ok(n) = host.recv(&mut buf) {
        assert!(n as u64 <= MAX_TX_FRAME, "a {n}-byte frame went out");
    }
});
