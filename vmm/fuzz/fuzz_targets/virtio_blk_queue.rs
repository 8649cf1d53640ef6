//! A hostile virtio-blk driver: the fuzz input becomes the descriptor table, the available
//! ring and the request bytes in guest memory; the device processes the queue against a real
//! disk image. It must never panic, hang, or touch memory outside the guest.
#![no_main]

use std::sync::{Arc, OnceLock};

use libfuzzer_sys::fuzz_target;
use thvc_vmm::devices::virtio::mmio::MmioInterrupt;
use thvc_vmm::devices::virtio::registers::RegisterPage;
use thvc_vmm::devices::virtio::{block, Activation, Interrupt, QueueHandler};
use thvc_vmm::vstate::memory::GuestMemoryMmap;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

const MEM_SIZE: usize = 1 << 20;
const DESC_TABLE: u64 = 0x1000;
const AVAIL_RING: u64 = 0x3000;
const USED_RING: u64 = 0x4000;
const DATA: u64 = 0x8000;
const QUEUE_SIZE: u16 = 16;

fn disk() -> &'static std::path::PathBuf {
    static DISK: OnceLock<std::path::PathBuf> = OnceLock::new();
    DISK.get_or_init(|| {
        let path = std::env::temp_dir().join(format!("thvc-fuzz-disk-{}", std::process::id()));
        let f = std::fs::File::create(&path).expect("disk image");
        f.set_len(256 * 1024).expect("size");
        path
    })
}

fuzz_target!(|input: &[u8]| {
    if input.len() < 2 {
        return;
    }
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).expect("memory");
    let read_only = input[0] & 1 == 1;
    let published = input[1] % 24;
    // Descriptor table, then available ring entries, then request bytes: whatever the fuzzer
    // gives, truncated to what fits.
    let rest = &input[2..];
    let desc_len = rest.len().min(usize::from(QUEUE_SIZE) * 16);
    mem.write_slice(&rest[..desc_len], GuestAddress(DESC_TABLE))
        .expect("desc");
    let rest = &rest[desc_len..];
    let ring_len = rest.len().min(2 * usize::from(QUEUE_SIZE));
    mem.write_slice(&rest[..ring_len], GuestAddress(AVAIL_RING + 4))
        .expect("ring");
    mem.write_obj(u16::from(published), GuestAddress(AVAIL_RING + 2))
        .expect("idx");
    let rest = &rest[ring_len..];
    let data_len = rest.len().min(MEM_SIZE - DATA as usize);
    mem.write_slice(&rest[..data_len], GuestAddress(DATA))
        .expect("data");

    let mut queue = Queue::new(QUEUE_SIZE).expect("queue");
    queue
        .try_set_desc_table_address(GuestAddress(DESC_TABLE))
        .expect("aligned");
    queue
        .try_set_avail_ring_address(GuestAddress(AVAIL_RING))
        .expect("aligned");
    queue
        .try_set_used_ring_address(GuestAddress(USED_RING))
        .expect("aligned");
    queue.set_ready(true);
    let (_, mut devices) = block::open(disk(), read_only, Some("fuzz"), 1).expect("open disk");
    let Some(mut device) = devices.pop() else {
        return;
    };
    let irq = Arc::new(EventFd::new(0).expect("eventfd"));
    device.activate(Activation {
        mem: mem.clone(),
        queues: vec![queue],
        first_queue: 0,
        acked_features: 1 << 32,
        interrupt: Interrupt::new(MmioInterrupt::new(
            Arc::new(RegisterPage::new().expect("register page")),
            irq,
        )),
    });
    device.queue_notified(0);
    // The used index never runs ahead of what was published.
    let used: u16 = mem.read_obj(GuestAddress(USED_RING + 2)).expect("used idx");
    assert!(used <= u16::from(published));
});
