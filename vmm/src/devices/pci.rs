//! The PCI root bus as the guest's firmware-less x86 kernel first meets it: configuration
//! mechanism #1 (the address register at 0xCF8, the data window at 0xCFC) and bus 0 with a
//! host bridge at 00:00.0.
//!
//! Why it exists before any PCI device does: a stock distribution kernel (Debian's, among
//! others) probes for a PCI configuration method at boot and, finding none, logs
//! "PCI: Fatal: No config space access function found" at error level into every guest's
//! journal. Linux accepts mechanism #1 when the address register reads back what was written
//! and bus 0 has a host bridge (`pci_sanity_check`); then it says "Using configuration type 1"
//! and goes on. This is also the first piece of the PCI platform (issue #16): devices, ECAM
//! and the host bridge in the DSDT are to attach to the same root.
//!
//! The chipset's reset control register (0xCF9, inside the same eight ports) resets the VM
//! when the guest sets its reset bit, as on the PIIX/ICH chipsets Linux's `reboot=pci` expects.
//!
//! Everything here is guest-controlled input: any port, width and value must be harmless.
//! Reads of absent functions and registers see all ones, as on real hardware.

use super::{BusDevice, VmExitRequest};
use crate::exit::ExitReason;

/// The configuration address register; the data window follows at +4.
pub const PCI_CONFIG_PORT: u16 = 0xcf8;
/// 0xCF8-0xCFF: address (4), with the reset control register at 0xCF9, and data (4).
pub const PCI_CONFIG_PORT_COUNT: u16 = 8;

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

/// One function's 256-byte configuration space: its registers and which of their bits the
/// guest may change.
pub struct ConfigSpace {
    registers: [u32; 64],
    writable: [u32; 64],
}

impl ConfigSpace {
    /// A type-0 header with the given identity; only the command register is writable.
    pub fn new(vendor: u16, device: u16, class_revision: u32) -> Self {
        let mut registers = [0u32; 64];
        registers[0] = u32::from(device) << 16 | u32::from(vendor);
        registers[2] = class_revision;
        let mut writable = [0u32; 64];
        // Command: I/O space, memory space, bus master (nothing behind a host bridge uses
        // them, but a guest that sets them reads them back).
        writable[1] = 0x0000_0007;
        ConfigSpace {
            registers,
            writable,
        }
    }

    /// Reads `data.len()` (1, 2 or 4) bytes at byte `offset`; anything else reads all ones.
    pub fn read(&self, offset: usize, data: &mut [u8]) {
        let Some(reg) = self.access(offset, data.len()) else {
            data.fill(0xff);
            return;
        };
        let bytes = self.registers[reg].to_le_bytes();
        let start = offset % 4;
        data.copy_from_slice(&bytes[start..start + data.len()]);
    }

    /// Writes `data` at byte `offset`, changing only writable bits; other writes are ignored.
    pub fn write(&mut self, offset: usize, data: &[u8]) {
        let Some(reg) = self.access(offset, data.len()) else {
            return;
        };
        let start = offset % 4;
        let mut value = self.registers[reg].to_le_bytes();
        value[start..start + data.len()].copy_from_slice(data);
        let value = u32::from_le_bytes(value);
        let mask = self.writable[reg];
        self.registers[reg] = (self.registers[reg] & !mask) | (value & mask);
    }

    /// The register index of a naturally aligned access of 1, 2 or 4 bytes inside the space.
    fn access(&self, offset: usize, len: usize) -> Option<usize> {
        let aligned = matches!(len, 1 | 2 | 4) && offset.is_multiple_of(len);
        let reg = offset / 4;
        (aligned && reg < self.registers.len()).then_some(reg)
    }
}

/// Configuration mechanism #1 over bus 0, which holds the host bridge.
pub struct PciConfigIo {
    address: u32,
    host_bridge: ConfigSpace,
    exit: VmExitRequest,
}

impl PciConfigIo {
    pub fn new(exit: VmExitRequest) -> Self {
        PciConfigIo {
            address: 0,
            host_bridge: ConfigSpace::new(
                HOST_BRIDGE_VENDOR,
                HOST_BRIDGE_DEVICE,
                CLASS_HOST_BRIDGE,
            ),
            exit,
        }
    }

    /// The function the address register selects, with the register's byte offset; None when
    /// the register is disabled or nothing is there.
    fn selected(&mut self) -> Option<(&mut ConfigSpace, usize)> {
        if self.address & ENABLE_BIT == 0 {
            return None;
        }
        let bus = (self.address >> 16) & 0xff;
        let device_function = (self.address >> 8) & 0xff;
        let register = (self.address & 0xfc) as usize;
        (bus == 0 && device_function == 0).then_some((&mut self.host_bridge, register))
    }
}

impl BusDevice for PciConfigIo {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match offset {
            // The address register, whole (Linux's probe reads back what it wrote).
            0 if data.len() == 4 => data.copy_from_slice(&self.address.to_le_bytes()),
            4..=7 => {
                let byte = (offset - 4) as usize;
                match self.selected() {
                    Some((space, register)) => space.read(register + byte, data),
                    None => data.fill(0xff),
                }
            }
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
                let byte = (offset - 4) as usize;
                if let Some((space, register)) = self.selected() {
                    space.write(register + byte, data);
                }
            }
            // Byte accesses to the address register (Linux writes 0xCFB while probing), the
            // reset control register without the reset bit: nothing to do.
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config_io() -> (PciConfigIo, VmExitRequest) {
        let exit = VmExitRequest::new().expect("eventfd");
        (PciConfigIo::new(exit.clone()), exit)
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
        assert_eq!(read32(&mut io), 0x0000_0007);
        io.write(4, &[0x00]);
        assert_eq!(read32(&mut io), 0);
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
