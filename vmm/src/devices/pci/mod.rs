//! The PCI root: bus 0 of one PCI segment, reached through configuration mechanism #1 (the
//! address register at 0xCF8, the data window at 0xCFC), through ECAM (memory-mapped
//! configuration space, announced in the MCFG table), and through the BARs its devices
//! decode inside the host bridge's windows.
//!
//! A host bridge sits at 00:00.0, as on every PC: a stock distribution kernel probes for a
//! configuration method at boot and, finding none, logs "PCI: Fatal: No config space access
//! function found" at error level; Linux accepts mechanism #1 when the address register reads
//! back what was written and bus 0 has a host bridge (`pci_sanity_check`).
//!
//! BARs are decoded by looking up the accessed address in a map of the BARs the devices
//! decode now (memory space enabled, inside a window), rebuilt after every configuration
//! write of that device: the guest may size and move BARs at will, and the MMIO bus that the
//! vCPUs share never changes (it holds one entry per window).
//!
//! The chipset's reset control register (0xCF9, inside the same eight ports) resets the VM
//! when the guest sets its reset bit, as on the PIIX/ICH chipsets Linux's `reboot=pci` expects.
//!
//! Everything here is guest-controlled input: any port, address, width and value must be
//! harmless. Reads of absent functions and registers see all ones, as on real hardware.

pub mod config;
pub mod msix;

use std::sync::{Arc, Mutex, RwLock};

use super::{BusDevice, VmExitRequest};
use crate::exit::ExitReason;
pub use config::ConfigSpace;

/// The configuration address register; the data window follows at +4.
pub const PCI_CONFIG_PORT: u16 = 0xcf8;
/// 0xCF8-0xCFF: address (4), with the reset control register at 0xCF9, and data (4).
pub const PCI_CONFIG_PORT_COUNT: u16 = 8;
/// Devices on the bus (5 bits of device number).
pub const MAX_DEVICES: usize = 32;
/// Bytes of configuration space per function in ECAM.
const ECAM_FUNCTION_SIZE: u64 = 4096;

const ENABLE_BIT: u32 = 1 << 31;
/// Offset of the reset control register (0xCF9) inside the eight ports.
const RESET_CONTROL_OFFSET: u64 = 1;
/// "Reset CPU" in the reset control register.
const RESET_CPU: u8 = 1 << 2;

/// The host bridge's identity: Cloud Hypervisor's choice (an Intel host bridge ID), so guests
/// see what they already know from it.
const HOST_BRIDGE_VENDOR: u16 = 0x8086;
const HOST_BRIDGE_DEVICE: u16 = 0x0d57;
/// Class 06 (bridge), subclass 00 (host bridge), programming interface 00.
const CLASS_HOST_BRIDGE: u32 = 0x0600_0000;

#[derive(Debug, thiserror::Error)]
pub enum PciError {
    #[error("all {MAX_DEVICES} PCI slots of bus 0 are taken")]
    BusFull,
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    #[error("no room for a {size:#x}-byte BAR in the PCI window")]
    WindowFull { size: u64 },
}

/// A function on the bus. Configuration reads come from its `ConfigSpace` unless the device
/// serves some itself (virtio's PCI configuration access window); writes and BAR accesses
/// go to the device, which applies side effects (moving its notification addresses,
/// enabling MSI-X).
pub trait PciDevice: Send {
    fn config(&self) -> &ConfigSpace;
    fn config_read(&mut self, offset: usize, data: &mut [u8]) {
        self.config().read(offset, data);
    }
    fn config_write(&mut self, offset: usize, data: &[u8]);
    /// Takes a snapshot's configuration registers (writable bits only). Devices with more
    /// state than that restore it themselves, with their other state.
    fn restore_config(&mut self, _saved: &[u32]) -> Result<(), String> {
        Ok(())
    }
    fn bar_read(&mut self, bar: usize, offset: u64, data: &mut [u8]);
    fn bar_write(&mut self, bar: usize, offset: u64, data: &[u8]);
}

/// The host bridge: identity only.
struct HostBridge(ConfigSpace);

impl PciDevice for HostBridge {
    fn config(&self) -> &ConfigSpace {
        &self.0
    }
    fn config_write(&mut self, offset: usize, data: &[u8]) {
        self.0.write(offset, data);
    }
    fn restore_config(&mut self, saved: &[u32]) -> Result<(), String> {
        self.0.restore_registers(saved)
    }
    fn bar_read(&mut self, _bar: usize, _offset: u64, data: &mut [u8]) {
        data.fill(0xff);
    }
    fn bar_write(&mut self, _bar: usize, _offset: u64, _data: &[u8]) {}
}

pub type SharedPciDevice = Arc<Mutex<dyn PciDevice>>;

/// A BAR the bus decodes now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Decoded {
    start: u64,
    size: u64,
    slot: usize,
    bar: usize,
}

/// Bus 0: its devices by device number (function 0 only), the windows BARs may live in,
/// and the map of decoded BARs.
pub struct PciRoot {
    slots: Vec<SharedPciDevice>,
    windows: Vec<(u64, u64)>,
    decoded: RwLock<Vec<Decoded>>,
    /// Where the next BAR is placed in each window at set-up.
    next_free: Mutex<Vec<u64>>,
}

impl PciRoot {
    /// Bus 0 with the host bridge; `windows` are the (start, size) ranges BARs may decode in,
    /// the first one used to place BARs at set-up.
    pub fn new(windows: Vec<(u64, u64)>) -> Self {
        let bridge = ConfigSpace::new(HOST_BRIDGE_VENDOR, HOST_BRIDGE_DEVICE, CLASS_HOST_BRIDGE);
        let next_free = windows.iter().map(|w| w.0).collect();
        PciRoot {
            slots: vec![Arc::new(Mutex::new(HostBridge(bridge)))],
            windows,
            decoded: RwLock::new(Vec::new()),
            next_free: Mutex::new(next_free),
        }
    }

    /// The (start, size) ranges BARs decode in.
    pub fn windows(&self) -> &[(u64, u64)] {
        &self.windows
    }

    /// Where a new BAR of `size` bytes goes in window `window` (naturally aligned), as
    /// firmware would place it.
    pub fn allocate_bar(&self, window: usize, size: u64) -> Result<u64, PciError> {
        let mut next = self.next_free.lock().unwrap_or_else(|e| e.into_inner());
        let (Some(free), Some((start, len))) = (next.get_mut(window), self.windows.get(window))
        else {
            return Err(PciError::WindowFull { size });
        };
        let at = free
            .checked_next_multiple_of(size.max(1))
            .filter(|at| at.checked_add(size).is_some_and(|end| end <= start + len))
            .ok_or(PciError::WindowFull { size })?;
        *free = at + size;
        Ok(at)
    }

    /// Puts a device in the next free slot; returns its device number.
    pub fn add(&mut self, device: SharedPciDevice) -> Result<u8, PciError> {
        if self.slots.len() >= MAX_DEVICES {
            return Err(PciError::BusFull);
        }
        self.slots.push(device);
        let slot = self.slots.len() - 1;
        self.refresh(slot);
        Ok(slot as u8)
    }

    /// The function at bus/device/function, if there is one.
    fn function(&self, bus: u32, device: u32, function: u32) -> Option<(usize, &SharedPciDevice)> {
        let slot = device as usize;
        (bus == 0 && function == 0)
            .then(|| self.slots.get(slot).map(|d| (slot, d)))
            .flatten()
    }

    pub fn config_read(
        &self,
        bus: u32,
        device: u32,
        function: u32,
        offset: usize,
        data: &mut [u8],
    ) {
        match self.function(bus, device, function) {
            Some((_, dev)) => lock(dev).config_read(offset, data),
            None => data.fill(0xff),
        }
    }

    pub fn config_write(&self, bus: u32, device: u32, function: u32, offset: usize, data: &[u8]) {
        if let Some((slot, dev)) = self.function(bus, device, function) {
            lock(dev).config_write(offset, data);
            self.refresh(slot);
        }
    }

    /// The host bridge's configuration registers, for a snapshot.
    pub fn bridge_registers(&self) -> Vec<u32> {
        self.slots
            .first()
            .map(|b| lock(b).config().registers())
            .unwrap_or_default()
    }

    /// Takes a snapshot's host bridge registers.
    pub fn restore_bridge(&self, saved: &[u32]) -> Result<(), String> {
        match self.slots.first() {
            Some(bridge) => lock(bridge).restore_config(saved),
            None => Ok(()),
        }
    }

    /// Rebuilds the decoded-BAR map of every device (after a restore moved BARs).
    pub fn refresh_all(&self) {
        for slot in 0..self.slots.len() {
            self.refresh(slot);
        }
    }

    /// Rebuilds the decoded-BAR map for one device.
    fn refresh(&self, slot: usize) {
        let Some(dev) = self.slots.get(slot) else {
            return;
        };
        let bars = lock(dev).config().decoded_bars();
        let mut decoded = self.decoded.write().unwrap_or_else(|e| e.into_inner());
        decoded.retain(|d| d.slot != slot);
        for (bar, start, size) in bars {
            if inside_windows(&self.windows, start, size) {
                decoded.push(Decoded {
                    start,
                    size,
                    slot,
                    bar,
                });
            }
        }
    }

    /// The device, BAR and offset an address falls in.
    fn bar_at(&self, address: u64) -> Option<(SharedPciDevice, usize, u64)> {
        let decoded = self.decoded.read().unwrap_or_else(|e| e.into_inner());
        let d = decoded
            .iter()
            .find(|d| address >= d.start && address - d.start < d.size)?;
        Some((self.slots.get(d.slot)?.clone(), d.bar, address - d.start))
    }
}

/// Whether `size` bytes at `start` lie inside one of `windows` ((start, size) each).
pub fn inside_windows(windows: &[(u64, u64)], start: u64, size: u64) -> bool {
    windows.iter().any(|(w, len)| {
        start >= *w
            && start
                .checked_add(size)
                .is_some_and(|end| w.checked_add(*len).is_some_and(|w_end| end <= w_end))
    })
}

fn lock(dev: &SharedPciDevice) -> std::sync::MutexGuard<'_, dyn PciDevice + 'static> {
    dev.lock().unwrap_or_else(|e| e.into_inner())
}

/// Configuration mechanism #1 over the root bus, and the reset control register.
pub struct PciConfigIo {
    address: u32,
    root: Arc<PciRoot>,
    exit: VmExitRequest,
}

impl PciConfigIo {
    /// The address register (0xCF8), which a guest sets before its data access: a snapshot
    /// taken between the two keeps it.
    pub fn address(&self) -> u32 {
        self.address
    }

    pub fn set_address(&mut self, address: u32) {
        self.address = address;
    }

    pub fn new(root: Arc<PciRoot>, exit: VmExitRequest) -> Self {
        PciConfigIo {
            address: 0,
            root,
            exit,
        }
    }

    /// Bus, device, function and register offset the address register selects; None when
    /// it is disabled.
    fn selected(&self) -> Option<(u32, u32, u32, usize)> {
        if self.address & ENABLE_BIT == 0 {
            return None;
        }
        let bus = (self.address >> 16) & 0xff;
        let device = (self.address >> 11) & 0x1f;
        let function = (self.address >> 8) & 0x7;
        Some((bus, device, function, (self.address & 0xfc) as usize))
    }
}

impl BusDevice for PciConfigIo {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match offset {
            // The address register, whole (Linux's probe reads back what it wrote).
            0 if data.len() == 4 => data.copy_from_slice(&self.address.to_le_bytes()),
            4..=7 => match self.selected() {
                Some((bus, device, function, register)) => self.root.config_read(
                    bus,
                    device,
                    function,
                    register + (offset - 4) as usize,
                    data,
                ),
                None => data.fill(0xff),
            },
            _ => data.fill(0xff),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        match (offset, data) {
            (0, [a, b, c, d]) => self.address = u32::from_le_bytes([*a, *b, *c, *d]),
            (RESET_CONTROL_OFFSET, [value]) if value & RESET_CPU != 0 => {
                tracing::debug!("guest reset through the reset control register");
                self.exit.request(ExitReason::GuestReset);
            }
            (4..=7, _) => {
                if let Some((bus, device, function, register)) = self.selected() {
                    self.root.config_write(
                        bus,
                        device,
                        function,
                        register + (offset - 4) as usize,
                        data,
                    );
                }
            }
            // Byte accesses to the address register (Linux writes 0xCFB while probing), the
            // reset control register without the reset bit: nothing to do.
            _ => {}
        }
    }
}

/// ECAM: bus 0's configuration space as memory, 4 KiB per function.
pub struct PciEcam(pub Arc<PciRoot>);

impl PciEcam {
    fn decode(offset: u64) -> (u32, u32, u32, usize) {
        let bus = (offset >> 20) as u32;
        let device = ((offset >> 15) & 0x1f) as u32;
        let function = ((offset >> 12) & 0x7) as u32;
        (
            bus,
            device,
            function,
            (offset % ECAM_FUNCTION_SIZE) as usize,
        )
    }
}

impl BusDevice for PciEcam {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let (bus, device, function, register) = Self::decode(offset);
        self.0.config_read(bus, device, function, register, data);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let (bus, device, function, register) = Self::decode(offset);
        self.0.config_write(bus, device, function, register, data);
    }
}

/// One of the host bridge's memory windows on the MMIO bus: accesses go to the BAR that
/// decodes the address; nothing there reads all ones.
pub struct PciWindow {
    pub root: Arc<PciRoot>,
    pub base: u64,
}

impl BusDevice for PciWindow {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match self.root.bar_at(self.base.wrapping_add(offset)) {
            Some((dev, bar, at)) => lock(&dev).bar_read(bar, at, data),
            None => data.fill(0xff),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let Some((dev, bar, at)) = self.root.bar_at(self.base.wrapping_add(offset)) {
            lock(&dev).bar_write(bar, at, data);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config_io() -> (PciConfigIo, VmExitRequest) {
        let exit = VmExitRequest::new().expect("eventfd");
        let root = Arc::new(PciRoot::new(vec![(0xc000_0000, 0x1000_0000)]));
        (PciConfigIo::new(root, exit.clone()), exit)
    }

    fn select(io: &mut PciConfigIo, bus: u32, device: u32, function: u32, register: u32) {
        let address = ENABLE_BIT | bus << 16 | device << 11 | function << 8 | register;
        io.write(0, &address.to_le_bytes());
    }

    fn read32(io: &mut PciConfigIo) -> u32 {
        let mut data = [0u8; 4];
        io.read(4, &mut data);
        u32::from_le_bytes(data)
    }

    #[test]
    fn linux_finds_mechanism_one_and_a_host_bridge() {
        let (mut io, _) = config_io();
        // pci_check_type1: a byte to 0xCFB, then the address register reads back.
        io.write(3, &[0x01]);
        io.write(0, &0x8000_0000u32.to_le_bytes());
        let mut back = [0u8; 4];
        io.read(0, &mut back);
        assert_eq!(u32::from_le_bytes(back), 0x8000_0000);
        // pci_sanity_check: the class word at 0x0a of 00:00.0, read as 16 bits at 0xCFE.
        select(&mut io, 0, 0, 0, 0x08);
        let mut class = [0u8; 2];
        io.read(6, &mut class);
        assert_eq!(u16::from_le_bytes(class), 0x0600, "host bridge class");
        select(&mut io, 0, 0, 0, 0);
        assert_eq!(read32(&mut io), 0x0d57_8086);
    }

    #[test]
    fn absent_functions_and_disabled_accesses_read_all_ones() {
        let (mut io, _) = config_io();
        for (bus, device, function) in [(0, 1, 0), (0, 0, 1), (1, 0, 0), (255, 31, 7)] {
            select(&mut io, bus, device, function, 0);
            assert_eq!(read32(&mut io), 0xffff_ffff, "{bus}:{device}.{function}");
        }
        io.write(0, &0u32.to_le_bytes()); // enable bit clear
        assert_eq!(read32(&mut io), 0xffff_ffff);
    }

    #[test]
    fn only_the_command_register_bits_are_writable() {
        let (mut io, _) = config_io();
        select(&mut io, 0, 0, 0, 0);
        io.write(4, &0xffff_ffffu32.to_le_bytes());
        assert_eq!(read32(&mut io), 0x0d57_8086, "IDs are read-only");
        select(&mut io, 0, 0, 0, 0x04);
        io.write(4, &0xffff_ffffu32.to_le_bytes());
        assert_eq!(
            read32(&mut io),
            0x0000_0407,
            "I/O, memory, bus master, INTx disable"
        );
        io.write(4, &[0x00]);
        assert_eq!(
            read32(&mut io),
            0x0000_0400,
            "a byte write changes one byte"
        );
        select(&mut io, 0, 0, 0, 0x10);
        io.write(4, &0xffff_ffffu32.to_le_bytes());
        assert_eq!(read32(&mut io), 0, "no BARs");
    }

    #[test]
    fn odd_widths_and_offsets_are_harmless() {
        let (mut io, exit) = config_io();
        select(&mut io, 0, 0, 0, 0);
        let mut three = [0u8; 3];
        io.read(4, &mut three);
        assert_eq!(three, [0xff; 3]);
        let mut two = [0u8; 2];
        io.read(5, &mut two); // misaligned
        assert_eq!(two, [0xff; 2]);
        let mut empty: [u8; 0] = [];
        io.read(4, &mut empty);
        io.write(4, &[]);
        io.write(9, &[1, 2, 3, 4]);
        io.read(200, &mut two);
        assert_eq!(two, [0xff; 2]);
        assert_eq!(exit.reason(), None);
    }

    #[test]
    fn the_reset_control_register_resets_the_vm() {
        let (mut io, exit) = config_io();
        io.write(1, &[0x02]); // "system reset" select without "reset CPU"
        assert_eq!(exit.reason(), None);
        io.write(1, &[0x06]);
        assert_eq!(exit.reason(), Some(ExitReason::GuestReset));
    }
}
