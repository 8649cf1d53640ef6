//! A hostile driver on the virtio-mmio register window: any sequence of 32-bit register reads
//! and writes (status changes, feature bits, queue setup with any sizes and addresses). The
//! transport must never panic, and never start the device with unusable queues.
#![no_main]

use std::sync::Arc;

use libfuzzer_sys::fuzz_target;
use thvc_vmm::devices::virtio::mmio::{MmioInterrupt, MmioTransport};
use thvc_vmm::devices::virtio::registers::RegisterPage;
use thvc_vmm::devices::virtio::transport::WorkerGroup;
use thvc_vmm::devices::virtio::worker::{self, WorkerControl};
use thvc_vmm::devices::virtio::{Activation, DeviceInfo, QueueHandler};
use thvc_vmm::devices::BusDevice;
use thvc_vmm::vstate::memory::GuestMemoryMmap;
use vm_memory::GuestAddress;
use vmm_sys_util::eventfd::EventFd;

struct Sink;

impl QueueHandler for Sink {
    fn activate(&mut self, a: Activation) {
        assert!(!a.queues.is_empty());
    }
    fn reset(&mut self) {}
    fn queue_notified(&mut self, _index: usize) {}
}

fuzz_target!(|input: &[u8]| {
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).expect("memory");
    let control = WorkerControl::new().expect("control");
    // No seccomp filter: the fuzzer's own process needs more than a device worker may do.
    let worker = worker::spawn("fuzz".into(), Box::new(Sink), vec![], control.clone(), None)
        .expect("worker thread");
    let info = DeviceInfo {
        device_type: 2,
        queue_max_sizes: vec![16, 256],
        features: (1 << 32) | (1 << 29) | 0x7f,
        config_space: vec![0xab; 60],
    };
    let registers = Arc::new(RegisterPage::new().expect("register page"));
    let interrupt = MmioInterrupt::new(registers, Arc::new(EventFd::new(0).expect("eventfd")));
    let workers = vec![WorkerGroup {
        control: control.clone(),
        queues: 0..1,
    }];
    let mut transport = MmioTransport::new(info, mem, interrupt, workers, None);
    // Each 6-byte record: offset (u16, 4-byte aligned within 0x200), then a 32-bit value;
    // the high bit of the offset's first byte selects a read.
    for record in input.chunks_exact(6) {
        let offset = u64::from(u16::from_le_bytes([record[0] & 0x7f, record[1]]) & 0x1fc);
        let value = [record[2], record[3], record[4], record[5]];
        if record[0] & 0x80 != 0 {
            let mut data = [0u8; 4];
            transport.read(offset, &mut data);
        } else {
            transport.write(offset, &value);
        }
    }
    control.shutdown();
    worker.join().expect("worker ends");
});
