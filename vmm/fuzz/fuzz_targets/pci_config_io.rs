//! A hostile guest on the PCI configuration ports (0xCF8-0xCFF): any sequence of reads and
//! writes of any width at any of the eight ports. Nothing may panic, the host bridge's
//! identity never changes, and the data window of anything but 00:00.0 reads all ones.
#![no_main]

use libfuzzer_sys::fuzz_target;
use std::sync::Arc;

use thvc_vmm::devices::pci::{PciConfigIo, PciRoot};
use thvc_vmm::devices::{BusDevice, VmExitRequest};

fn read32(io: &mut PciConfigIo, address: u32) -> u32 {
    io.write(0, &address.to_le_bytes());
    let mut data = [0u8; 4];
    io.read(4, &mut data);
    u32::from_le_bytes(data)
}

fuzz_target!(|input: &[u8]| {
    let exit = VmExitRequest::new().expect("eventfd");
    let root = Arc::new(PciRoot::new(vec![(0xc000_0000, 0x1000_0000)]));
    let mut io = PciConfigIo::new(root, exit);
    // Each operation: [kind, port offset, width, 4 data bytes].
    for op in input.chunks_exact(7) {
        let offset = u64::from(op[1] % 16); // beyond the 8 ports too
        let width = usize::from(op[2] % 9);
        let mut data = [op[3], op[4], op[5], op[6], 0, 0, 0, 0];
        if op[0] & 1 == 0 {
            io.read(offset, &mut data[..width]);
        } else {
            io.write(offset, &data[..width]);
        }
    }
    assert_eq!(read32(&mut io, 0x8000_0000), 0x0d57_8086, "host bridge IDs");
    assert_eq!(
        read32(&mut io, 0x8000_0800),
        0xffff_ffff,
        "00:01.0 is absent"
    );
    assert_eq!(read32(&mut io, 0x8001_0000), 0xffff_ffff, "bus 1 is absent");
});
