//! One PCI function's 256-byte configuration space (type 0 header): its registers, which of
//! their bits the guest may change, its BARs and its capability list.
//!
//! Every write is guest input. Only bits marked writable change, so identity, class, BAR
//! type bits and capability contents stay what the device said; a BAR keeps its size because
//! its low address bits are read-only, which is exactly what BAR sizing relies on (the guest
//! writes all ones and reads back the size mask). Accesses that are not naturally aligned
//! 1, 2 or 4 bytes read all ones and write nothing.

/// Offset of the command register and its bits the guest may set.
pub const COMMAND: usize = 0x04;
pub const COMMAND_IO_SPACE: u16 = 1 << 0;
pub const COMMAND_MEMORY_SPACE: u16 = 1 << 1;
pub const COMMAND_BUS_MASTER: u16 = 1 << 2;
pub const COMMAND_INTX_DISABLE: u16 = 1 << 10;
/// "Has a capability list" in the status register.
const STATUS_CAPABILITIES: u32 = 1 << 4;
/// The first BAR register.
pub const BAR0: usize = 0x10;
pub const BAR_COUNT: usize = 6;
const SUBSYSTEM: usize = 0x2c;
const CAPABILITIES_POINTER: usize = 0x34;
/// Where capabilities start (after the type 0 header).
const FIRST_CAPABILITY: usize = 0x40;
pub const SIZE: usize = 256;

/// Bits 2:1 of a memory BAR: 64-bit.
const BAR_MEM_64: u32 = 0b10 << 1;
const BAR_PREFETCHABLE: u32 = 1 << 3;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BarKind {
    Memory32,
    Memory64 { prefetchable: bool },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bar {
    pub size: u64,
    pub kind: BarKind,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("BAR {0} does not exist or is taken")]
    BarSlot(usize),
    #[error("BAR size {0:#x} is not a power of two of at least 16 bytes (4 GiB at most for a 32-bit BAR)")]
    BarSize(u64),
    #[error("the capabilities do not fit the configuration space")]
    CapabilitiesFull,
}

pub struct ConfigSpace {
    registers: [u32; SIZE / 4],
    writable: [u32; SIZE / 4],
    bars: [Option<Bar>; BAR_COUNT],
    /// BAR registers in use (a 64-bit BAR takes two).
    taken: [bool; BAR_COUNT],
    /// Where the next capability goes, and the last one's "next" byte.
    next_capability: usize,
    last_link: usize,
}

impl ConfigSpace {
    /// A type-0 header with the given identity; the command register's I/O, memory, bus
    /// master and INTx-disable bits are writable, nothing else yet.
    pub fn new(vendor: u16, device: u16, class_revision: u32) -> Self {
        let mut registers = [0u32; SIZE / 4];
        registers[0] = u32::from(device) << 16 | u32::from(vendor);
        registers[2] = class_revision;
        let mut writable = [0u32; SIZE / 4];
        writable[COMMAND / 4] = u32::from(
            COMMAND_IO_SPACE | COMMAND_MEMORY_SPACE | COMMAND_BUS_MASTER | COMMAND_INTX_DISABLE,
        );
        ConfigSpace {
            registers,
            writable,
            bars: [None; BAR_COUNT],
            taken: [false; BAR_COUNT],
            next_capability: FIRST_CAPABILITY,
            last_link: CAPABILITIES_POINTER,
        }
    }

    pub fn set_subsystem(&mut self, vendor: u16, id: u16) {
        self.registers[SUBSYSTEM / 4] = u32::from(id) << 16 | u32::from(vendor);
    }

    /// Adds a memory BAR at `index` (a 64-bit one takes `index + 1` too) of `size` bytes,
    /// placed at `address` until the guest moves it.
    pub fn add_bar(&mut self, index: usize, bar: Bar, address: u64) -> Result<(), ConfigError> {
        let wide = matches!(bar.kind, BarKind::Memory64 { .. });
        let last = index + usize::from(wide);
        if last >= BAR_COUNT || self.taken[index..=last].iter().any(|t| *t) {
            return Err(ConfigError::BarSlot(index));
        }
        let fits = if wide { true } else { bar.size <= 1 << 32 };
        if !bar.size.is_power_of_two() || bar.size < 16 || !fits {
            return Err(ConfigError::BarSize(bar.size));
        }
        let mask = !(bar.size - 1);
        let flags = match bar.kind {
            BarKind::Memory32 => 0,
            BarKind::Memory64 { prefetchable } => {
                BAR_MEM_64 | if prefetchable { BAR_PREFETCHABLE } else { 0 }
            }
        };
        let reg = BAR0 / 4 + index;
        self.writable[reg] = (mask as u32) & !0xf;
        self.registers[reg] = (address as u32 & self.writable[reg]) | flags;
        if wide {
            self.writable[reg + 1] = (mask >> 32) as u32;
            self.registers[reg + 1] = (address >> 32) as u32 & self.writable[reg + 1];
        }
        self.bars[index] = Some(bar);
        self.taken[index..=last].fill(true);
        Ok(())
    }

    /// The BAR at `index`: its description and where the guest put it.
    pub fn bar(&self, index: usize) -> Option<(Bar, u64)> {
        let bar = (*self.bars.get(index)?)?;
        let reg = BAR0 / 4 + index;
        let low = u64::from(self.registers[reg] & !0xf);
        let high = match bar.kind {
            BarKind::Memory32 => 0,
            BarKind::Memory64 { .. } => u64::from(self.registers[reg + 1]) << 32,
        };
        Some((bar, high | low))
    }

    /// The BARs the device decodes now: (index, address, size) of each, none while the
    /// guest has memory space disabled in the command register.
    pub fn decoded_bars(&self) -> Vec<(usize, u64, u64)> {
        if self.command() & COMMAND_MEMORY_SPACE == 0 {
            return Vec::new();
        }
        (0..BAR_COUNT)
            .filter_map(|i| self.bar(i).map(|(bar, address)| (i, address, bar.size)))
            .collect()
    }

    pub fn command(&self) -> u16 {
        self.registers[COMMAND / 4] as u16
    }

    /// Adds a capability: `id`, then `body` (the bytes after the id and next pointer);
    /// `writable` gives, byte by byte from the id on, which bits the guest may change
    /// (shorter than the capability: the rest is read-only). Returns its offset.
    pub fn add_capability(
        &mut self,
        id: u8,
        body: &[u8],
        writable: &[u8],
    ) -> Result<usize, ConfigError> {
        let at = self.next_capability;
        let len = 2 + body.len();
        let end = at + len;
        if end > SIZE {
            return Err(ConfigError::CapabilitiesFull);
        }
        self.set_byte(at, id);
        self.set_byte(at + 1, 0);
        for (i, b) in body.iter().enumerate() {
            self.set_byte(at + 2 + i, *b);
        }
        for (i, mask) in writable.iter().take(len).enumerate() {
            let reg = (at + i) / 4;
            self.writable[reg] |= u32::from(*mask) << ((at + i) % 4 * 8);
        }
        self.set_byte(self.last_link, at as u8);
        self.registers[COMMAND / 4] |= STATUS_CAPABILITIES << 16;
        self.last_link = at + 1;
        // Capabilities are dword-aligned.
        self.next_capability = end.next_multiple_of(4);
        Ok(at)
    }

    fn set_byte(&mut self, offset: usize, value: u8) {
        let shift = offset % 4 * 8;
        let reg = &mut self.registers[offset / 4];
        *reg = (*reg & !(0xff << shift)) | (u32::from(value) << shift);
    }

    /// The registers, for a snapshot.
    pub fn registers(&self) -> Vec<u32> {
        self.registers.to_vec()
    }

    /// Takes a snapshot's registers: only the bits the guest may write change (the rest is
    /// the device's identity, which the restoring VM already has).
    pub fn restore_registers(&mut self, saved: &[u32]) -> Result<(), String> {
        if saved.len() != self.registers.len() {
            return Err(format!(
                "{} configuration registers in the snapshot, {} here",
                saved.len(),
                self.registers.len()
            ));
        }
        for ((reg, mask), value) in self.registers.iter_mut().zip(self.writable).zip(saved) {
            *reg = (*reg & !mask) | (value & mask);
        }
        Ok(())
    }

    /// The 32-bit register holding byte `offset` (device code reading its own capabilities).
    pub fn register(&self, offset: usize) -> u32 {
        self.registers.get(offset / 4).copied().unwrap_or(0)
    }

    /// Reads `data.len()` (1, 2 or 4) bytes at byte `offset`; anything else reads all ones.
    /// Offsets past the 256 bytes (PCIe extended space through ECAM) read zero: no extended
    /// capabilities.
    pub fn read(&self, offset: usize, data: &mut [u8]) {
        if !aligned(offset, data.len()) {
            data.fill(0xff);
            return;
        }
        let Some(register) = self.registers.get(offset / 4) else {
            data.fill(0);
            return;
        };
        let bytes = register.to_le_bytes();
        let start = offset % 4;
        data.copy_from_slice(&bytes[start..start + data.len()]);
    }

    /// Writes `data` at byte `offset`, changing only writable bits; other writes are ignored.
    pub fn write(&mut self, offset: usize, data: &[u8]) {
        if !aligned(offset, data.len()) || offset / 4 >= self.registers.len() {
            return;
        }
        let reg = offset / 4;
        let start = offset % 4;
        let mut value = self.registers[reg].to_le_bytes();
        value[start..start + data.len()].copy_from_slice(data);
        let value = u32::from_le_bytes(value);
        let mask = self.writable[reg];
        self.registers[reg] = (self.registers[reg] & !mask) | (value & mask);
    }
}

/// A naturally aligned access of 1, 2 or 4 bytes.
fn aligned(offset: usize, len: usize) -> bool {
    matches!(len, 1 | 2 | 4) && offset.is_multiple_of(len)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read32(c: &ConfigSpace, offset: usize) -> u32 {
        let mut d = [0u8; 4];
        c.read(offset, &mut d);
        u32::from_le_bytes(d)
    }

    fn write32(c: &mut ConfigSpace, offset: usize, v: u32) {
        c.write(offset, &v.to_le_bytes());
    }

    const BAR: Bar = Bar {
        size: 0x8000,
        kind: BarKind::Memory64 {
            prefetchable: false,
        },
    };

    /// A virtio-net-like function with a 32 KiB 64-bit BAR 0 at 0xc000_0000.
    fn with_bar0() -> ConfigSpace {
        let mut c = ConfigSpace::new(0x1af4, 0x1041, 0x0200_0001);
        c.add_bar(0, BAR, 0xc000_0000).expect("free");
        c
    }

    #[test]
    fn restored_registers_change_only_writable_bits() {
        let mut c = with_bar0();
        write32(&mut c, BAR0, 0xd000_0000);
        let mut saved = c.registers();
        saved[0] = 0xdead_beef; // the identity is not the snapshot's to change
        let mut fresh = with_bar0();
        fresh.restore_registers(&saved).expect("restore");
        assert_eq!(read32(&fresh, 0), 0x1041_1af4);
        assert_eq!(fresh.bar(0).map(|b| b.1), Some(0xd000_0000), "moved BAR");
        assert!(fresh.restore_registers(&saved[..3]).is_err());
    }

    #[test]
    fn a_64_bit_bar_sizes_and_moves() {
        let mut c = with_bar0();
        assert_eq!(read32(&c, BAR0), 0xc000_0004, "address and 64-bit type");
        // Sizing, as Linux does it: all ones, read back, restore.
        write32(&mut c, BAR0, 0xffff_ffff);
        write32(&mut c, BAR0 + 4, 0xffff_ffff);
        assert_eq!(read32(&c, BAR0), 0xffff_8004);
        assert_eq!(read32(&c, BAR0 + 4), 0xffff_ffff);
        // Moved above 4 GiB.
        write32(&mut c, BAR0, 0x1234_5678);
        write32(&mut c, BAR0 + 4, 0x10);
        assert_eq!(c.bar(0).map(|b| b.1), Some(0x10_1234_0000));
        assert!(c.decoded_bars().is_empty(), "memory space is off");
        c.write(COMMAND, &[COMMAND_MEMORY_SPACE as u8]);
        assert_eq!(c.decoded_bars(), vec![(0, 0x10_1234_0000, 0x8000)]);
        assert!(c.add_bar(1, BAR, 0).is_err(), "BAR 1 is BAR 0's upper half");
        assert!(c.add_bar(5, BAR, 0).is_err(), "no BAR 6 for the upper half");
    }

    #[test]
    fn a_32_bit_bar_and_bad_sizes() {
        let mut c = ConfigSpace::new(1, 2, 0);
        let bar = |size| Bar {
            size,
            kind: BarKind::Memory32,
        };
        assert_eq!(c.add_bar(2, bar(24), 0), Err(ConfigError::BarSize(24)));
        assert_eq!(c.add_bar(2, bar(8), 0), Err(ConfigError::BarSize(8)));
        c.add_bar(2, bar(0x1000), 0xc000_1000).expect("free");
        write32(&mut c, BAR0 + 8, 0xffff_ffff);
        assert_eq!(read32(&c, BAR0 + 8), 0xffff_f000);
        assert_eq!(read32(&c, BAR0 + 12), 0, "the next BAR does not exist");
    }

    #[test]
    fn capabilities_chain_and_only_marked_bits_change() {
        let mut c = ConfigSpace::new(1, 2, 0);
        let first = c.add_capability(0x09, &[16, 1, 0, 0], &[]).expect("fits");
        let second = c
            .add_capability(0x11, &[0x03, 0x00], &[0, 0, 0, 0xc0])
            .expect("fits");
        assert_eq!((first, second), (0x40, 0x48));
        assert_eq!(read32(&c, CAPABILITIES_POINTER) & 0xff, 0x40);
        assert_ne!(read32(&c, COMMAND) & (STATUS_CAPABILITIES << 16), 0);
        assert_eq!(read32(&c, first) & 0xffff, 0x4809, "id, then next");
        assert_eq!(read32(&c, second), 0x0003_0011, "last: next is 0");
        write32(&mut c, second, 0xffff_ffff);
        assert_eq!(read32(&c, second), 0xc003_0011, "only the top two bits");
        let mut full = ConfigSpace::new(1, 2, 0);
        assert!(full.add_capability(9, &[0; 180], &[]).is_ok());
        assert_eq!(
            full.add_capability(9, &[0; 40], &[]),
            Err(ConfigError::CapabilitiesFull)
        );
    }

    #[test]
    fn identity_is_read_only_and_odd_accesses_are_harmless() {
        let mut c = ConfigSpace::new(0x8086, 0x0d57, 0x0600_0000);
        write32(&mut c, 0, 0);
        assert_eq!(read32(&c, 0), 0x0d57_8086);
        let mut three = [0u8; 3];
        c.read(0, &mut three);
        assert_eq!(three, [0xff; 3]);
        c.write(1, &[0, 0]);
        assert_eq!(read32(&c, 0x400), 0, "extended space reads zero");
        c.write(0xffc, &[1, 2, 3, 4]);
        c.write(usize::MAX - 3, &[1, 2, 3, 4]);
    }
}
