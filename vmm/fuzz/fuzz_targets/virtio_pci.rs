//! A hostile guest on the PCI platform with a real virtio-pci device on it: bus 0 holds the
//! host bridge (00:00.0) and a virtio-rng function (00:01.0) whose worker thread runs, with
//! its MSI-X vectors (irqfds, GSI routes) and queue notification (ioeventfd) in a real KVM
//! VM. The guest drives it through all three doors, interleaved: the configuration ports
//! (0xCF8-0xCFF), ECAM, and the host bridge's 32-bit memory window (BAR 0 wherever the guest
//! put it: common configuration, ISR, device configuration, notifications, MSI-X table and
//! PBA), with any offset, width (0 to 8 bytes) and value; it writes its RAM (rings,
//! descriptors) and lets the worker run.
//!
//! Each operation is either raw (any port, any ECAM offset, any window address) or aimed the
//! way a driver aims (a configuration register of a function on bus 0, a register of BAR 0
//! where it is now), so that the fuzzer gets past the set-up that deeper states need; one
//! operation is a driver's whole set-up of the device, another its reset.
//!
//! Whatever the guest did: nothing panics, both functions keep their identity, only the bits
//! config space marks writable changed (command, BAR 0, MSI-X enable and mask, the PCI_CFG
//! window's BAR, offset, length and data), absent
//! functions read all ones, and once memory decoding is off no queue notification of the
//! device is left in KVM.
#![no_main]

use std::sync::{Arc, Mutex, OnceLock};

use kvm_ioctls::{IoEventAddress, Kvm, NoDatamatch, VmFd};
use libfuzzer_sys::fuzz_target;
use thvc_vmm::devices::pci::{PciConfigIo, PciEcam, PciRoot, PciWindow};
use thvc_vmm::devices::virtio::pci::{self as virtio_pci, PciPlatform, VirtioPciDevice};
use thvc_vmm::devices::virtio::rng;
use thvc_vmm::devices::virtio::transport::WorkerGroup;
use thvc_vmm::devices::virtio::worker::{self, WorkerControl};
use thvc_vmm::devices::{BusDevice, VmExitRequest};
use thvc_vmm::vstate::memory::GuestMemoryMmap;
use thvc_vmm::vstate::msi::GsiRouting;
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// The host bridge's 32-bit window (start, size), as the VMM lays it out.
const WINDOW: (u64, u64) = (0xc000_0000, 0x1000_0000);
/// ECAM for bus 0.
const ECAM_SIZE: u64 = 1 << 20;
/// Guest RAM: room for rings and buffers, small enough that any 16-bit address hits it.
const MEM_SIZE: u64 = 0x1_0000;
/// Operations per input: enough for a driver's whole set-up, small enough for thousands of
/// runs per second.
const MAX_OPS: usize = 256;
/// One operation: kind, address (u32), width, 8 value bytes.
const RECORD: usize = 14;

const HOST_BRIDGE_ID: u32 = 0x0d57_8086;
/// Vendor 0x1af4, device 0x1040 + 4 (entropy source).
const VIRTIO_RNG_ID: u32 = 0x1044_1af4;
const ENABLE: u32 = 1 << 31;
const COMMAND: usize = 0x04;
const MEMORY_SPACE: u32 = 1 << 1;
const MSIX_CAPABILITY: u8 = 0x11;

/// BAR 0's layout (see `devices::virtio::pci`).
const COMMON: u64 = 0x0000;
const NOTIFY: u64 = 0x3000;
const MSIX_TABLE: u64 = 0x4000;
/// Where a driver's set-up puts queue 0's rings (the page below is for buffers).
const RINGS: [u64; 3] = [0x1000, 0x2000, 0x3000];

/// What all inputs share: one VM (VMs are slow to make and to destroy), with the in-kernel
/// irqchip irqfds and GSI routing need, and a placeholder ioeventfd at the notification
/// address of BAR 0's initial placement.
///
/// Each input's irqfds leave KVM with their eventfds, but ioeventfds do not: KVM keeps them
/// until they are removed or the VM goes, and removing one waits for an SRCU grace period
/// (milliseconds). So the placeholder holds that address for the whole process: every
/// device fails to register there (it logs that and kicks its queue from `bar_write`, as
/// always when no vCPU runs), leaves nothing behind while BAR 0 stays home, and the state
/// of the VM is the same at the start of every input. Registrations at addresses the guest
/// moved BAR 0 to succeed, and the device must take them out when decoding goes off.
struct Platform {
    vm: Arc<VmFd>,
    _placeholder: EventFd,
}

fn platform() -> &'static Platform {
    static PLATFORM: OnceLock<Platform> = OnceLock::new();
    PLATFORM.get_or_init(|| {
        let kvm = Kvm::new().expect("the virtio_pci fuzz target needs /dev/kvm");
        let vm = kvm.create_vm().expect("create a VM");
        vm.create_irq_chip().expect("create the in-kernel irqchip");
        let placeholder = EventFd::new(EFD_NONBLOCK).expect("eventfd");
        let home = IoEventAddress::Mmio(WINDOW.0 + NOTIFY);
        vm.register_ioevent(&placeholder, &home, NoDatamatch)
            .expect("placeholder ioeventfd");
        Platform {
            vm: Arc::new(vm),
            _placeholder: placeholder,
        }
    })
}

/// The configuration address register's value for a register of a function on bus 0.
fn address(device: u32, register: u32) -> u32 {
    ENABLE | device << 11 | register
}

fn access(door: &mut dyn BusDevice, offset: u64, write: bool, data: &mut [u8]) {
    if write {
        door.write(offset, data);
    } else {
        door.read(offset, data);
    }
}

/// The guest's view of the platform.
struct Guest {
    root: Arc<PciRoot>,
    io: PciConfigIo,
    ecam: PciEcam,
    window: PciWindow,
    mem: GuestMemoryMmap,
    /// The virtio function's MSI-X capability.
    msix: usize,
    /// Every address BAR 0 was decoded at (the device may have placed notifications there).
    decoded: Vec<u64>,
}

impl Guest {
    fn read32(&mut self, address: u32) -> u32 {
        self.io.write(0, &address.to_le_bytes());
        let mut data = [0u8; 4];
        self.io.read(4, &mut data);
        u32::from_le_bytes(data)
    }

    /// A function's 256 bytes of configuration space, dword by dword, through the ports.
    fn snapshot(&mut self, device: u32) -> [u32; 64] {
        std::array::from_fn(|i| self.read32(address(device, 4 * i as u32)))
    }

    /// Where BAR 0 of 00:01.0 is decoded now (memory space on), wherever that is.
    fn bar0(&self) -> Option<u64> {
        let read = |offset| {
            let mut data = [0u8; 4];
            self.root.config_read(0, 1, 0, offset, &mut data);
            u32::from_le_bytes(data)
        };
        (read(COMMAND) & MEMORY_SPACE != 0)
            .then(|| u64::from(read(0x14)) << 32 | u64::from(read(0x10) & !0xf))
    }

    fn note_bar0(&mut self) {
        if let Some(bar) = self.bar0() {
            if !self.decoded.contains(&bar) {
                self.decoded.push(bar);
            }
        }
    }

    /// The window offset of `offset` in BAR 0: where the guest decodes it now, or where it
    /// was first placed if that is not in the window.
    fn in_bar0(&self, offset: u64) -> u64 {
        let base = self
            .bar0()
            .filter(|bar| (WINDOW.0..WINDOW.0 + WINDOW.1).contains(bar))
            .unwrap_or(WINDOW.0);
        (base - WINDOW.0 + offset) % WINDOW.1
    }

    fn bar0_write(&mut self, offset: u64, data: &[u8]) {
        let at = self.in_bar0(offset);
        self.window.write(at, data);
    }

    fn run(&mut self, op: &[u8]) {
        let write = op[0] & 1 == 1;
        let a = [op[1], op[2], op[3], op[4]];
        let addr = u64::from(u32::from_le_bytes(a));
        let width = usize::from(op[5] % 9);
        let mut value = [0u8; 8];
        value.copy_from_slice(&op[6..RECORD]);
        let data = &mut value[..width];
        match (op[0] >> 1) % 8 {
            // Any of the eight configuration ports, and the eight after them.
            0 => access(&mut self.io, addr % 16, write, data),
            // A configuration register of the bridge, the virtio function or an absent one,
            // as drivers reach it: the address register, then the data window.
            1 => {
                let function = u32::from(a[2] & 0x80 != 0);
                let register = u32::from(a[0]);
                let selected = address(u32::from(a[1] % 3), function << 8 | register & 0xfc);
                self.io.write(0, &selected.to_le_bytes());
                access(&mut self.io, 4 + u64::from(a[0] % 4), write, data);
            }
            2 => access(&mut self.ecam, addr % ECAM_SIZE, write, data),
            3 => {
                let offset = u64::from(a[1] % 3) << 15 | u64::from(a[0]);
                access(&mut self.ecam, offset, write, data);
            }
            4 => access(&mut self.window, addr % WINDOW.1, write, data),
            // A register of one of BAR 0's regions, where the guest put BAR 0.
            5 => {
                let at = self.in_bar0(u64::from(a[1] % 8) << 12 | u64::from(a[0]));
                access(&mut self.window, at, write, data);
            }
            // The guest's CPU writes its RAM: anywhere, or in the first 256 bytes of the
            // buffers' page or of one of the rings a driver's set-up places. Or it lets the
            // worker process what was notified.
            6 if write => {
                let at = if a[1] & 0x80 == 0 {
                    u64::from(a[1] % 4) << 12 | u64::from(a[0])
                } else {
                    addr % MEM_SIZE
                };
                let _ = self.mem.write_slice(data, GuestAddress(at));
            }
            6 => std::thread::yield_now(),
            _ if write => self.driver_setup(value),
            // The driver resets the device.
            _ => self.bar0_write(COMMON + 0x14, &[0]),
        }
        if write && (op[0] >> 1) % 8 <= 3 {
            self.note_bar0();
        }
    }

    /// What a driver does to start the device (virtio 1.x, 3.1.1): features, queue 0 with its
    /// rings at `RINGS` and the size and MSI-X set-up `v` asks for, DRIVER_OK.
    fn driver_setup(&mut self, v: [u8; 8]) {
        let common = |offset: u64| COMMON + offset;
        self.bar0_write(common(0x14), &[0]);
        self.bar0_write(common(0x14), &[1 | 2]);
        self.bar0_write(common(0x08), &1u32.to_le_bytes());
        self.bar0_write(common(0x0c), &1u32.to_le_bytes()); // VIRTIO_F_VERSION_1
        self.bar0_write(common(0x14), &[1 | 2 | 8]);
        self.bar0_write(common(0x16), &0u16.to_le_bytes());
        self.bar0_write(common(0x18), &(64u16 >> (v[0] % 8)).to_le_bytes());
        for (i, ring) in RINGS.iter().enumerate() {
            self.bar0_write(common(0x20 + 8 * i as u64), &ring.to_le_bytes());
        }
        if v[1] & 1 != 0 {
            // MSI-X on, the configuration on vector 0, queue 0 on vector 1, both unmasked.
            let control = (self.msix + 2) as u64;
            self.ecam.write(1 << 15 | control, &0x8000u16.to_le_bytes());
            self.bar0_write(common(0x10), &0u16.to_le_bytes());
            self.bar0_write(common(0x1a), &1u16.to_le_bytes());
            for vector in 0..2u64 {
                let entry = MSIX_TABLE + 16 * vector;
                self.bar0_write(entry, &0xfee0_0000u64.to_le_bytes());
                self.bar0_write(entry + 8, &(0x30 + vector as u32).to_le_bytes());
                self.bar0_write(entry + 12, &0u32.to_le_bytes());
            }
        }
        self.bar0_write(common(0x1c), &1u16.to_le_bytes());
        self.bar0_write(common(0x14), &[1 | 2 | 8 | 4]);
    }
}

/// The bits of each dword the guest may change: the command register (I/O, memory, bus
/// master, INTx disable), BAR 0 (a 64-bit BAR of `BAR_SIZE` bytes, when `bar0` is set), the
/// MSI-X enable and function-mask bits of the capability at `msix`, if any, and the
/// VIRTIO_PCI_CAP_PCI_CFG window at `pci_cfg`, if any: its BAR byte, offset and length, and
/// its data, which reads whatever the window shows of BAR 0.
fn writable(bar0: bool, msix: Option<usize>, pci_cfg: Option<usize>) -> [u32; 64] {
    let mut mask = [0u32; 64];
    mask[COMMAND / 4] = 0x0407;
    if bar0 {
        mask[4] = !(virtio_pci::BAR_SIZE as u32 - 1);
        mask[5] = u32::MAX;
    }
    if let Some(at) = msix {
        mask[at / 4] = 0xc000_0000;
    }
    if let Some(at) = pci_cfg {
        mask[(at + 4) / 4] |= 0xff;
        for field in [8, 12, 16] {
            if let Some(m) = mask.get_mut((at + field) / 4) {
                *m = u32::MAX;
            }
        }
    }
    mask
}

/// Where the vendor capability of virtio `cfg_type` sits in a config space snapshot.
fn find_virtio_capability(config: &[u32; 64], cfg_type: u8) -> Option<usize> {
    let byte = |at: usize| (config[at / 4] >> (at % 4 * 8)) as u8;
    let mut at = usize::from(byte(0x34));
    for _ in 0..48 {
        if at < 0x40 || at % 4 != 0 || at > 0xfc {
            return None;
        }
        if byte(at) == 0x09 && byte(at + 3) == cfg_type {
            return Some(at);
        }
        at = usize::from(byte(at + 1));
    }
    None
}

/// Where the capability with `id` sits in a config space snapshot.
fn find_capability(config: &[u32; 64], id: u8) -> Option<usize> {
    let byte = |at: usize| (config[at / 4] >> (at % 4 * 8)) as u8;
    let mut at = usize::from(byte(0x34));
    for _ in 0..48 {
        if at < 0x40 || at % 4 != 0 {
            return None;
        }
        if byte(at) == id {
            return Some(at);
        }
        at = usize::from(byte(at + 1));
    }
    None
}

fn assert_only_writable_bits_changed(
    name: &str,
    before: &[u32; 64],
    after: &[u32; 64],
    mask: &[u32; 64],
) {
    for i in 0..64 {
        assert_eq!(
            (before[i] ^ after[i]) & !mask[i],
            0,
            "{name}: read-only bits of config dword {:#x} changed: {:#010x} -> {:#010x}",
            4 * i,
            before[i],
            after[i]
        );
    }
}

fuzz_target!(|input: &[u8]| {
    let vm = &platform().vm;
    let mem =
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)]).expect("memory");
    let routing = Arc::new(GsiRouting::new(vm.clone()));
    let mut root = PciRoot::new(vec![WINDOW]);

    // The device as the VMM wires it: the worker waits on the queue eventfds, KVM signals
    // duplicates of them at the notification addresses the device places.
    let (info, handler) = rng::new();
    let queue_events: Vec<EventFd> = (0..info.queue_max_sizes.len())
        .map(|_| EventFd::new(EFD_NONBLOCK).expect("eventfd"))
        .collect();
    // The device's notification eventfd as KVM knows it (a duplicate: the same eventfd).
    let probe = queue_events[0].try_clone().expect("eventfd duplicate");
    let notify_events = queue_events
        .iter()
        .map(|e| e.try_clone().expect("eventfd duplicate"))
        .collect();
    let control = WorkerControl::new().expect("control");
    // No seccomp filter: the fuzzer's own process needs more than a device worker may do.
    let worker = worker::spawn(
        "fuzz-rng".into(),
        Box::new(handler),
        queue_events,
        control.clone(),
        None,
    )
    .expect("worker thread");
    let bar = root.allocate_bar(0, virtio_pci::BAR_SIZE).expect("BAR 0");
    let device = VirtioPciDevice::new(
        info,
        PciPlatform {
            mem: &mem,
            vm,
            routing: &routing,
            windows: &[WINDOW],
        },
        vec![WorkerGroup {
            control: control.clone(),
            queues: 0..1,
        }],
        notify_events,
        bar,
    )
    .expect("virtio-pci device");
    assert_eq!(root.add(Arc::new(Mutex::new(device))).expect("a slot"), 1);
    let root = Arc::new(root);
    let mut guest = Guest {
        io: PciConfigIo::new(root.clone(), VmExitRequest::new().expect("eventfd")),
        ecam: PciEcam(root.clone()),
        window: PciWindow {
            root: root.clone(),
            base: WINDOW.0,
        },
        root,
        mem,
        msix: 0,
        decoded: Vec::new(),
    };
    let bridge_before = guest.snapshot(0);
    let device_before = guest.snapshot(1);
    let msix = find_capability(&device_before, MSIX_CAPABILITY);
    guest.msix = msix.expect("the device has an MSI-X capability");
    guest.io.write(0, &0u32.to_le_bytes());
    guest.note_bar0();

    // Each operation: kind (bit 0: write; the rest selects the door), a 32-bit address, a
    // width (0 to 8 bytes) and 8 value bytes, of which `width` are used.
    for op in input.chunks_exact(RECORD).take(MAX_OPS) {
        guest.run(op);
    }

    let bridge = guest.read32(address(0, 0));
    assert_eq!(bridge, HOST_BRIDGE_ID, "host bridge IDs");
    let device = guest.read32(address(1, 0));
    assert_eq!(device, VIRTIO_RNG_ID, "virtio-rng IDs");
    let bridge_after = guest.snapshot(0);
    let bridge_mask = writable(false, None, None);
    assert_only_writable_bits_changed("00:00.0", &bridge_before, &bridge_after, &bridge_mask);
    let device_after = guest.snapshot(1);
    // VIRTIO_PCI_CAP_PCI_CFG is cfg_type 5.
    let device_mask = writable(true, msix, find_virtio_capability(&device_before, 5));
    assert_only_writable_bits_changed("00:01.0", &device_before, &device_after, &device_mask);
    for absent in [
        address(2, 0),
        address(31, 0),
        address(1, 0) | 1 << 8,
        address(0, 0) | 7 << 8,
        address(0, 0) | 1 << 16,
        address(0, 0) | 0xff << 16,
    ] {
        let id = guest.read32(absent);
        assert_eq!(id, u32::MAX, "absent function {absent:#x}");
    }
    let mut id = [0u8; 4];
    guest.ecam.read(2 << 15, &mut id);
    assert_eq!(id, [0xff; 4], "00:02.0 through ECAM");

    // The guest turns memory decoding off: the device must take its notifications out of
    // KVM, wherever BAR 0 was. Removing the device's eventfd at any of those addresses must
    // find nothing (quick when it does; a leak would also stay in the shared VM).
    guest.io.write(0, &address(1, COMMAND as u32).to_le_bytes());
    guest.io.write(4, &[0, 0]);
    for bar in &guest.decoded {
        let at = IoEventAddress::Mmio(bar.wrapping_add(NOTIFY));
        assert!(
            vm.unregister_ioevent(&probe, &at, NoDatamatch).is_err(),
            "a queue notification at {at:?} outlived memory decoding"
        );
    }
    control.shutdown();
    worker.join().expect("the worker ends");
});
