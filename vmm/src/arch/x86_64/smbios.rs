//! SMBIOS tables: the machine identity a guest reads from `/sys/class/dmi/id/` (or Windows
//! from WMI): the system UUID, serial number and product name.
//!
//! cloud-init, licensing and inventory tools recognise a machine by these, so a VM keeps the
//! same identity across restarts and nodes when its supervisor passes the same values. The
//! tables sit at `SMBIOS_START` (0xF0000) behind an SMBIOS 3.0 entry point: Linux finds it
//! there by scanning 0xF0000-0xFFFFF on direct kernel boot, and edk2's CloudHv firmware reads
//! it from that fixed address and republishes it in the UEFI configuration table.
//!
//! Three structures: BIOS information (type 0, saying this is a virtual machine), system
//! information (type 1) and the end-of-table marker (type 127).

use crate::vstate::memory::GuestMemoryMmap;
use vm_memory::{Bytes, GuestAddress};

use super::layout::{RESET_VECTOR, SMBIOS_START};
use crate::config::{parse_uuid, PlatformConfig};

#[derive(Debug, thiserror::Error)]
pub enum SmbiosError {
    #[error("the SMBIOS tables ({0} bytes) do not fit below the reset vector")]
    TooLarge(usize),
    #[error("cannot write the SMBIOS tables to guest memory: {0}")]
    GuestMemory(#[from] vm_memory::GuestMemoryError),
}

const MANUFACTURER: &str = "thvc";
const DEFAULT_PRODUCT: &str = "thvc-vmm";
const BIOS_VERSION: &str = env!("CARGO_PKG_VERSION");
/// The entry point is 24 bytes; the structure table follows, 16-byte aligned.
const ENTRY_POINT_LEN: u8 = 0x18;
const TABLE_OFFSET: u64 = 0x20;

const TYPE_BIOS: u8 = 0;
const TYPE_SYSTEM: u8 = 1;
const TYPE_END: u8 = 127;
/// BIOS characteristics: bit 3, "BIOS characteristics are not supported".
const BIOS_CHARACTERISTICS_NOT_SUPPORTED: u64 = 1 << 3;
/// BIOS characteristics extension byte 2: bit 3 UEFI is supported, bit 4 the tables describe
/// a virtual machine.
const BIOS_EXT2_UEFI: u8 = 1 << 3;
const BIOS_EXT2_VIRTUAL_MACHINE: u8 = 1 << 4;
/// System wake-up type: power switch.
const WAKEUP_POWER_SWITCH: u8 = 6;

/// One structure: the formatted area, then its strings (numbered from 1 in the order added),
/// then the double NUL that ends the string set.
struct Structure {
    formatted: Vec<u8>,
    strings: Vec<String>,
}

impl Structure {
    fn new(kind: u8, handle: u16) -> Self {
        let mut formatted = vec![kind, 0];
        formatted.extend_from_slice(&handle.to_le_bytes());
        Structure {
            formatted,
            strings: Vec::new(),
        }
    }

    fn byte(&mut self, b: u8) -> &mut Self {
        self.formatted.push(b);
        self
    }

    fn bytes(&mut self, b: &[u8]) -> &mut Self {
        self.formatted.extend_from_slice(b);
        self
    }

    /// Adds a string field: its number, or 0 ("none") for an empty string.
    fn string(&mut self, s: &str) -> &mut Self {
        if s.is_empty() {
            return self.byte(0);
        }
        self.strings.push(s.to_string());
        let n = self.strings.len() as u8;
        self.byte(n)
    }

    fn encode(&self, out: &mut Vec<u8>) {
        let mut formatted = self.formatted.clone();
        formatted[1] = formatted.len() as u8;
        out.extend_from_slice(&formatted);
        if self.strings.is_empty() {
            out.extend_from_slice(&[0, 0]);
        } else {
            for s in &self.strings {
                out.extend_from_slice(s.as_bytes());
                out.push(0);
            }
            out.push(0);
        }
    }
}

/// The UUID as SMBIOS stores it: the first three fields little-endian (SMBIOS 2.6 and
/// later), the rest in text order. All zeros means "no UUID".
fn smbios_uuid(platform: &PlatformConfig) -> [u8; 16] {
    let Some(mut u) = platform.uuid.as_deref().and_then(parse_uuid) else {
        return [0; 16];
    };
    u[0..4].reverse();
    u[4..6].reverse();
    u[6..8].reverse();
    u
}

/// The structure table for `platform`.
pub fn structures(platform: &PlatformConfig) -> Vec<u8> {
    let mut out = Vec::new();
    let mut bios = Structure::new(TYPE_BIOS, 0);
    bios.string(MANUFACTURER) // vendor
        .string(BIOS_VERSION)
        .bytes(&0u16.to_le_bytes()) // starting address segment: none, not a legacy BIOS
        .string("") // release date
        .byte(0) // ROM size
        .bytes(&BIOS_CHARACTERISTICS_NOT_SUPPORTED.to_le_bytes())
        .byte(0) // extension byte 1
        .byte(BIOS_EXT2_UEFI | BIOS_EXT2_VIRTUAL_MACHINE)
        .bytes(&[0, 0]) // system BIOS major/minor release
        .bytes(&[0xff, 0xff]); // no embedded controller firmware
    bios.encode(&mut out);

    let mut system = Structure::new(TYPE_SYSTEM, 1);
    system
        .string(MANUFACTURER)
        .string(platform.product.as_deref().unwrap_or(DEFAULT_PRODUCT))
        .string(BIOS_VERSION) // version
        .string(platform.serial.as_deref().unwrap_or(""))
        .bytes(&smbios_uuid(platform))
        .byte(WAKEUP_POWER_SWITCH)
        .string("") // SKU number
        .string(MANUFACTURER); // family
    system.encode(&mut out);

    Structure::new(TYPE_END, 2).encode(&mut out);
    out
}

/// The SMBIOS 3.0 (64-bit) entry point for a structure table of `table_len` bytes at
/// `table_addr`.
fn entry_point(table_addr: u64, table_len: u32) -> Vec<u8> {
    let mut ep = Vec::with_capacity(usize::from(ENTRY_POINT_LEN));
    ep.extend_from_slice(b"_SM3_");
    ep.push(0); // checksum, below
    ep.push(ENTRY_POINT_LEN);
    ep.extend_from_slice(&[3, 2, 0]); // version 3.2, docrev 0
    ep.push(1); // entry point revision: 3.0 format
    ep.push(0);
    ep.extend_from_slice(&table_len.to_le_bytes()); // structure table maximum size
    ep.extend_from_slice(&table_addr.to_le_bytes());
    let sum = ep.iter().fold(0u8, |a, b| a.wrapping_add(*b));
    ep[5] = sum.wrapping_neg();
    ep
}

/// Writes the entry point and the tables at `SMBIOS_START`.
pub fn write_smbios(mem: &GuestMemoryMmap, platform: &PlatformConfig) -> Result<(), SmbiosError> {
    let table = structures(platform);
    let table_addr = SMBIOS_START + TABLE_OFFSET;
    if table_addr + table.len() as u64 > RESET_VECTOR {
        return Err(SmbiosError::TooLarge(table.len()));
    }
    mem.write_slice(
        &entry_point(table_addr, table.len() as u32),
        GuestAddress(SMBIOS_START),
    )?;
    mem.write_slice(&table, GuestAddress(table_addr))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Splits a structure table into (type, formatted area, strings).
    fn parse(mut t: &[u8]) -> Vec<(u8, Vec<u8>, Vec<String>)> {
        let mut out = Vec::new();
        while !t.is_empty() {
            let len = usize::from(t[1]);
            let formatted = t[..len].to_vec();
            let mut rest = &t[len..];
            let mut strings = Vec::new();
            if rest[0] == 0 && rest[1] == 0 {
                rest = &rest[2..];
            } else {
                while rest[0] != 0 {
                    let end = rest.iter().position(|&b| b == 0).expect("NUL");
                    strings.push(String::from_utf8(rest[..end].to_vec()).expect("utf8"));
                    rest = &rest[end + 1..];
                }
                rest = &rest[1..];
            }
            out.push((formatted[0], formatted, strings));
            t = rest;
        }
        out
    }

    #[test]
    fn system_information_carries_the_identity() {
        let platform = PlatformConfig {
            uuid: Some("00112233-4455-6677-8899-aabbccddeeff".into()),
            serial: Some("node7/vm-a".into()),
            product: None,
        };
        let s = parse(&structures(&platform));
        assert_eq!(
            s.iter().map(|(k, _, _)| *k).collect::<Vec<_>>(),
            [0, 1, 127]
        );
        let (_, sys, strings) = &s[1];
        assert_eq!(sys.len(), 0x1b, "SMBIOS 2.4+ system information");
        let string = |n: u8| strings[usize::from(n) - 1].as_str();
        assert_eq!(string(sys[4]), "thvc", "manufacturer");
        assert_eq!(string(sys[5]), "thvc-vmm", "product");
        assert_eq!(string(sys[7]), "node7/vm-a", "serial");
        // Linux prints it as 00112233-4455-6677-8899-aabbccddeeff from this byte order.
        assert_eq!(
            sys[8..24],
            [
                0x33, 0x22, 0x11, 0x00, 0x55, 0x44, 0x77, 0x66, 0x88, 0x99, 0xaa, 0xbb, 0xcc, 0xdd,
                0xee, 0xff
            ]
        );
        let (_, bios, _) = &s[0];
        assert_eq!(bios.len(), 0x18);
        assert_ne!(bios[0x13] & BIOS_EXT2_VIRTUAL_MACHINE, 0);
        let (_, end, strings) = &s[2];
        assert_eq!((end.len(), strings.len()), (4, 0));
    }

    #[test]
    fn without_identity_the_uuid_is_absent_and_the_serial_empty() {
        let s = parse(&structures(&PlatformConfig::default()));
        let (_, sys, strings) = &s[1];
        assert_eq!(sys[8..24], [0; 16]);
        assert_eq!(sys[7], 0, "no serial string");
        assert_eq!(strings[usize::from(sys[5]) - 1], "thvc-vmm");
    }

    #[test]
    fn entry_point_checksums_and_points_at_the_table() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).expect("mem");
        write_smbios(&mem, &PlatformConfig::default()).expect("fits");
        let mut ep = [0u8; 24];
        mem.read_slice(&mut ep, GuestAddress(SMBIOS_START))
            .expect("read");
        assert_eq!(&ep[..5], b"_SM3_");
        assert_eq!(ep.iter().fold(0u8, |a, b| a.wrapping_add(*b)), 0);
        assert_eq!(usize::from(ep[6]), ep.len());
        let addr = u64::from_le_bytes(ep[16..24].try_into().expect("8 bytes"));
        let len = u32::from_le_bytes(ep[12..16].try_into().expect("4 bytes"));
        let table = structures(&PlatformConfig::default());
        assert_eq!(len as usize, table.len());
        let mut read = vec![0u8; table.len()];
        mem.read_slice(&mut read, GuestAddress(addr)).expect("read");
        assert_eq!(read, table);
    }
}
